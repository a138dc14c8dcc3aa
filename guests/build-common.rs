// Shared by every guest's `build.rs` (`include!("../build-common.rs")`):
// link the guest with the shared `guests/guest.ld`, only when building for
// 32-bit x86 (a host build of a guest crate is meaningless anyway).

/// Emit the linker arguments every guest needs, then `extra` (each passed
/// as one `-C link-arg` to the binaries, e.g. `--entry=<symbol>`).
fn link_guest(extra: &[&str]) {
    let dir =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let script = dir.join("../guest.ld");
    let script = script.canonicalize().unwrap_or(script);
    println!("cargo::rerun-if-changed={}", script.display());
    println!("cargo::rerun-if-changed=../build-common.rs");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86") {
        println!("cargo::rustc-link-arg-bins=-T{}", script.display());
        // No RELRO segment: the GOT goes into .data (see guest.ld).
        println!("cargo::rustc-link-arg-bins=-znorelro");
        for arg in extra {
            println!("cargo::rustc-link-arg-bins={arg}");
        }
    }
}
