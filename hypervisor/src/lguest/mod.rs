//! The lguest guest side of the hypervisor.
//!
//! Only the pure, host-testable parts live here so far:
//!
//! - [`chan`]: the control channel — the `/dev/lguest` request protocol
//!   (`write` of `LHREQ_*` words, `read` = "run the guest until something
//!   happens", `close`) as a state machine over any [`chan::GuestCore`].
//! - [`spec`]: a guest module's command line (`name [mem=SIZE] [args...]`),
//!   shared with `cargo xtask`, which checks `--guest` with it.
//!
//! The ABI numbers and layouts come from the `guest-abi` crate.
//!
//! The modules that handle guest-controlled values (`chan`, `console`,
//! `guestmem`, `loader`, `segments`, `spec`, `vcpu`) deny
//! `clippy::indexing_slicing` and `clippy::arithmetic_side_effects` outside
//! their tests: every index is a `get()`, every sum a checked, saturating or
//! (where the operands are bounded, said in a comment) wrapping operation.

pub mod chan;
pub mod console;
pub mod fpustate;
pub mod gdtcache;
pub mod guestmem;
pub mod kill;
pub mod loader;
pub mod segments;
pub mod spec;
pub mod vcpu;
