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
//! The modules that handle guest-controlled values deny
//! `clippy::indexing_slicing` and `clippy::arithmetic_side_effects` outside
//! their tests: every index is a `get()`, every sum a checked, saturating or
//! (where the operands are bounded, said in a comment) wrapping operation.

#[cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]
pub mod chan;
#[cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]
pub mod console;
pub mod fpustate;
pub mod gdtcache;
#[cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]
pub mod guestmem;
pub mod kill;
#[cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]
pub mod loader;
#[cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]
pub mod segments;
#[cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]
pub mod spec;
#[cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]
pub mod vcpu;
