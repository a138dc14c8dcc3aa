//! Links the bare-metal binary with the workspace linker script.
fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest)
        .parent()
        .expect("hypervisor/ sits inside the workspace");
    let script = root.join("linker.ld");
    let boot = root.join("boot").join("boot.S");
    println!("cargo::rerun-if-changed={}", script.display());
    println!("cargo::rerun-if-changed={}", boot.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo::rustc-link-arg-bins=-T{}", script.display());
        println!("cargo::rustc-link-arg-bins=--gc-sections");
        println!("cargo::rustc-link-arg-bins=-zmax-page-size=4096");
    }
}
