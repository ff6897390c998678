//! aula-bootserver (work in progress).

fn main() {
    println!("aula-bootserver");
}
