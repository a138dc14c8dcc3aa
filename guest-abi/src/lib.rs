//! The lguest guest ABI as rustyvisor implements it.
//!
//! rustyvisor runs paravirtualized 32-bit lguest guests at CPL 1 in IA-32e
//! compatibility mode. It implements the **E4** lguest ABI — the one Linux
//! 3.10–4.0 i386 guests speak: `int $0x1f` hypercalls with register
//! arguments, `struct lguest_data` with `noirq_start`/`noirq_end`, the lguest
//! bus device page above guest RAM, `LHCALL_NOTIFY`, and host "linear" 1:1
//! paging until the guest's first `LHCALL_NEW_PGTABLE`. Every layout here is
//! byte-for-byte the Linux one and is pinned by compile-time assertions.
//!
//! This crate is `no_std`, has no dependencies and compiles for the host,
//! `x86_64-unknown-none` (the hypervisor) and `i586-unknown-linux-gnu` (the
//! guests). Layouts use fixed-width fields only.
//!
//! # Modules
//!
//! | Module | Contents |
//! |---|---|
//! | [`hcall`] | hypercall numbers ([`Hypercall`], `LHCALL_*`), register convention, async ring slot |
//! | [`data`] | [`LguestData`] (`struct lguest_data`) |
//! | [`irq`] | virtual irqs, trap numbers, error-code traps, shutdown reasons, frames |
//! | [`seg`] | selectors, GDT slots, [`SegmentDescriptor`], IDT gate encoding |
//! | [`lhreq`] | control-channel requests ([`LhReq`]) and [`Errno`] |
//! | [`device`] | lguest bus device page records, virtio ids, vring sizes |
//! | [`boot`] | `boot_params` offsets, e820, guest-physical memory map |
//! | [`paging`] | page-table entry bits and geometry of the 2-level and PAE formats, `PAGE_OFFSET` |
//! | [`testdata`] | the pattern of generated test disks and their checksum |
//!
//! The prose reference with all tables (including the host's validation
//! rules and kill reasons) is `docs/abi.md`.
//!
//! # Guest entry state
//!
//! The launcher loads the guest ELF's `PT_LOAD` segments at their physical
//! addresses and the core starts the guest with:
//!
//! | Register | Value |
//! |---|---|
//! | `eip` | ELF entry point (`e_entry`) |
//! | `cs` | [`KERNEL_CS`] (0x61) |
//! | `ds`, `es`, `ss` | [`KERNEL_DS`] (0x69) |
//! | `fs`, `gs` | 0 |
//! | `eflags` | [`INITIAL_EFLAGS`] (0x202: IF set in hardware; the *virtual* IF is `lguest_data.irq_enabled`) |
//! | `esi` | [`BOOT_PARAMS_ADDR`] (0): guest-physical address of `boot_params` |
//! | other GPRs, `esp` | 0 |
//!
//! Paging is the host's linear mode: guest virtual == guest physical for all
//! of guest RAM until the first `LHCALL_NEW_PGTABLE`. The guest IDT is empty
//! (no present gates) until the guest loads entries.
//!
//! # Guest-physical memory map
//!
//! | Range | Contents |
//! |---|---|
//! | `0x0000..0x1000` | `struct boot_params` |
//! | `0x1000..` | NUL-terminated command line |
//! | `0x100000..` | bzImage payload (Linux guests); ELF guests load at their `p_paddr` (our test guests: `0x400000`) |
//! | `[mem - initrd, mem)` | initrd, if any |
//! | `[mem, mem + 4 KiB)` | device page ([`device`]) |
//! | `mem + 4 KiB ..` | virtqueue rings, ≤ [`DEVICE_PAGES`] pages in total including the device page |
//!
//! `mem` is the RAM size (`e820_table[0].size`); `pfnlimit` covers RAM plus
//! the device pages.
#![no_std]
#![warn(missing_docs)]

pub mod boot;
pub mod data;
pub mod device;
pub mod hcall;
pub mod irq;
pub mod lhreq;
pub mod paging;
pub mod seg;
pub mod testdata;

pub use boot::{BOOT_PARAMS_ADDR, BootE820Entry, CMDLINE_ADDR, SetupHeader};
pub use data::{LguestData, Timespec32};
pub use device::{DEVICE_PAGES, LguestDeviceDesc, LguestVqconfig};
pub use hcall::*;
pub use irq::{
    FIRST_EXTERNAL_VECTOR, LGUEST_IRQS, LGUEST_SHUTDOWN_POWEROFF, LGUEST_SHUTDOWN_RESTART,
    X86_EFLAGS_IF, has_error_code, trap,
};
pub use lhreq::{Errno, LhReq};
pub use seg::{
    GDT_ENTRIES, GDT_ENTRY_TLS_MIN, GUEST_RESERVED_GDT, KERNEL_CS, KERNEL_DS, SegmentDescriptor,
    USER_CS, USER_DS,
};

/// Version of this crate's ABI definitions; bumped on any incompatible
/// change to a layout or number.
pub const ABI_VERSION: u32 = 1;

/// `EFLAGS` the guest starts with: IF (0x200) plus the always-one bit 1.
pub const INITIAL_EFLAGS: u32 = 0x202;

/// Guest page size.
pub const PAGE_SIZE: u32 = 4096;
