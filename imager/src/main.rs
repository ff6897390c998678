//! `aula-imager` command-line interface.

fn main() {
    println!("aula-imager");
}
