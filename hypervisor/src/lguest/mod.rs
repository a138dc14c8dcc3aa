//! The lguest guest side of the hypervisor.
//!
//! Only the pure, host-testable parts live here so far:
//!
//! - [`chan`]: the control channel — the `/dev/lguest` request protocol
//!   (`write` of `LHREQ_*` words, `read` = "run the guest until something
//!   happens", `close`) as a state machine over any [`chan::GuestCore`].
//!
//! The ABI numbers and layouts come from the `guest-abi` crate.

pub mod chan;
pub mod console;
pub mod fpustate;
pub mod gdtcache;
pub mod guestmem;
pub mod kill;
pub mod loader;
pub mod segments;
pub mod vcpu;
