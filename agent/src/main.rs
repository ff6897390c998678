//! aula-agent (work in progress).

fn main() {
    println!("aula-agent");
}
