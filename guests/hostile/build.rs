//! Link the guest with the shared `guests/guest.ld` (only when building for
//! 32-bit x86; a host build of this crate is meaningless anyway).
//!
//! Unlike the other guests, the ELF entry point is `hostile_start` (see
//! `src/main.rs`), which runs before the runtime's `_start` so that
//! `mode=beforeinit` can issue a hypercall before `LHCALL_LGUEST_INIT`.
//! ld.lld's `--entry` overrides the script's `ENTRY(_start)`.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let script = dir.join("../guest.ld");
    let script = script.canonicalize().unwrap_or(script);
    println!("cargo::rerun-if-changed={}", script.display());
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86") {
        println!("cargo::rustc-link-arg-bins=-T{}", script.display());
        // No RELRO segment: the GOT goes into .data (see guest.ld).
        println!("cargo::rustc-link-arg-bins=-znorelro");
        println!("cargo::rustc-link-arg-bins=--entry=hostile_start");
    }
}
