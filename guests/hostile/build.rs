//! Link the guest with the shared `guests/guest.ld` (see `../build-common.rs`).
//!
//! Unlike the other guests, the ELF entry point is `hostile_start` (see
//! `src/main.rs`), which runs before the runtime's `_start` so that
//! `mode=beforeinit` can issue a hypercall before `LHCALL_LGUEST_INIT`.
//! ld.lld's `--entry` overrides the script's `ENTRY(_start)`.

include!("../build-common.rs");

fn main() {
    link_guest(&["--entry=hostile_start"]);
}
