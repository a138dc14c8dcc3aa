//! `cargo xtask`: see `cargo xtask help`.

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(xtask::main(&argv));
}
