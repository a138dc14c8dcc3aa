//! Link the guest with the shared `guests/guest.ld` (see `../build-common.rs`),
//! but at guest-physical 1 MiB rather than 4 MiB: the smallest guest the
//! hypervisor runs has 4 MiB of RAM, into which an image linked at 4 MiB
//! cannot load. Below 1 MiB are `boot_params` (0x0) and the command line
//! (0x1000).

include!("../build-common.rs");

fn main() {
    // No debug info: hundreds of copies of the module are loaded at once,
    // and every byte of a module is memory no guest gets.
    link_guest_at(Some(0x10_0000), &["--strip-debug"]);
}
