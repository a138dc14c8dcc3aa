//! Link the guest with the shared `guests/guest.ld` (see `../build-common.rs`).

include!("../build-common.rs");

fn main() {
    link_guest(&[]);
}
