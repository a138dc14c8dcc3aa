// Shared by every guest's `build.rs` (`include!("../build-common.rs")`):
// link the guest with the shared `guests/guest.ld`, only when building for
// 32-bit x86 (a host build of a guest crate is meaningless anyway).

/// Emit the linker arguments every guest needs, then `extra` (each passed
/// as one `-C link-arg` to the binaries, e.g. `--entry=<symbol>`).
#[allow(dead_code, reason = "a guest linked elsewhere uses `link_guest_at`")]
fn link_guest(extra: &[&str]) {
    link_guest_at(None, extra);
}

/// [`link_guest`] with the image at guest-physical `base` instead of
/// `guest.ld`'s 0x400000 (`None`): the script is copied into `OUT_DIR` with
/// that one address changed.
fn link_guest_at(base: Option<u32>, extra: &[&str]) {
    let dir =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let script = dir.join("../guest.ld");
    let script = script.canonicalize().unwrap_or(script);
    println!("cargo::rerun-if-changed={}", script.display());
    let script = match base {
        None => script,
        Some(base) => {
            let text = std::fs::read_to_string(&script).expect("guests/guest.ld is readable");
            let origin = ". = 0x400000;";
            assert!(text.contains(origin), "guest.ld no longer sets `{origin}`");
            let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
            let moved = out.join("guest.ld");
            std::fs::write(&moved, text.replace(origin, &format!(". = {base:#x};")))
                .expect("OUT_DIR is writable");
            moved
        }
    };
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
