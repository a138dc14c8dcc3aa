//! The lguest guest side of the hypervisor.
//!
//! Only the pure, host-testable parts live here; the bare-metal side (world
//! switch, guest RAM, the kernel core and launcher) is in the binary's
//! `kernel/lguest/`:
//!
//! - [`chan`]: the control channel — the `/dev/lguest` request protocol
//!   (`write` of `LHREQ_*` words, `read` = "run the guest until something
//!   happens", `close`) as a state machine over any [`chan::GuestCore`],
//!   and [`chan::check_initialize`], the `INITIALIZE` argument rules.
//! - [`vcpu`]: the per-guest state machine (hypercalls, async ring, trap
//!   reflection, virtual interrupts) and [`vcpu::TrapOwner`].
//! - [`segments`]: the guest's GDT and the selector checks.
//! - [`insn`]: decoding the instructions the host emulates after a #GP(0)
//!   (`cli`, `in`, `out`; `sgdt`, `sidt`, `smsw`, `sldt`, `str` under UMIP).
//! - [`guestmem`]: the bounds-checked guest-physical memory accessor.
//! - [`pagewalk`]: the guest's page-table formats (2-level, PAE) and the
//!   validating walk of a guest virtual address through them.
//! - [`shadow`]: shadow page tables — the long-mode tables the CPU really
//!   uses while a paging guest runs, derived from the guest's own tables,
//!   cached per guest `cr3`, capped and accounted (the kernel supplies
//!   frames through [`shadow::ShadowBackend`]).
//! - [`loader`]: ELF loading and `boot_params`.
//! - [`bzimage`]: Linux bzImage loading (boot protocol ≥ 2.07: setup
//!   header, zero page, command line, initrd) and [`bzimage::ImageKind`].
//! - [`console`]: guest text shown as data (escaped, capped, rate-limited).
//! - [`fpustate`]: which guest instance owns the FPU registers.
//! - [`gdtcache`]: whether the hardware GDT already holds a guest's entries.
//! - [`kill`]: kill reasons.
//! - [`spec`]: a guest module's command line (`name [mem=SIZE] [args...]`),
//!   shared with `cargo xtask`, which checks `--guest` with it.
//!
//! The ABI numbers and layouts come from the `guest-abi` crate; docs/abi.md
//! describes them.
//!
//! The modules that handle guest-controlled values (`bzimage`, `chan`,
//! `console`, `guestmem`, `insn`, `loader`, `pagewalk`, `segments`,
//! `shadow`, `spec`, `vcpu`) deny `clippy::indexing_slicing` and
//! `clippy::arithmetic_side_effects` outside their tests: every index is a
//! `get()`, every sum a checked, saturating or (where the operands are
//! bounded, said in a comment) wrapping operation.

pub mod bzimage;
pub mod chan;
pub mod console;
pub mod fpustate;
pub mod gdtcache;
pub mod guestmem;
pub mod insn;
pub mod kill;
pub mod loader;
pub mod pagewalk;
pub mod segments;
pub mod shadow;
pub mod spec;
pub mod vcpu;
