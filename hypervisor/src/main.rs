//! The rustyvisor bare-metal binary.
//!
//! Everything here only exists for `target_os = "none"`; the pure logic it uses
//! lives in the `rustyvisor` library next to it and is unit-tested on the host.
//! On the host this binary compiles to a stub that explains how to run it.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod kernel;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "rustyvisor is a bare-metal hypervisor: boot it with `cargo xtask run` \
         (QEMU) or write an ISO with `cargo xtask iso -o FILE`."
    );
    std::process::exit(2);
}
