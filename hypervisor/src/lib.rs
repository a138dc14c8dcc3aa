//! rustyvisor's portable core.
//!
//! This library holds the *pure* logic of the hypervisor: command-line
//! parsing, memory-map sanitising, the physical frame allocator, page-table
//! manipulation, timer queues, ring buffers (serial input; serial output
//! with whole-line records, [`txring`]), AML scanning, the lguest
//! core (control channel, vCPU state machine, GDT validation, guest memory
//! accessors, ELF loader, guest console), the host-task scheduling policy
//! ([`sched`]), the hypervisor console's input state machine
//! ([`hvconsole`]) and the virtio devices of the lguest bus ([`virtio`]:
//! virtqueues, device page, console, rng, block, net and the switch
//! between guests). None of it touches hardware, so
//! all of it is unit-tested on the host with `cargo test -p hypervisor`.
//! Architecture-specific code (boot, interrupts, the world switch into
//! guests, port I/O, the direct map) lives in the bare-metal binary, which
//! calls into this crate. There is no hardware virtualisation (no VMX or
//! SVM): lguest guests are paravirtualised and run at CPL 1 in
//! compatibility mode.
#![cfg_attr(not(test), no_std)]
// Pure logic only: every `unsafe` belongs to the bare-metal binary.
#![forbid(unsafe_code)]

pub mod acpi_s5;
pub mod bench;
pub mod config;
pub mod fixedstr;
pub mod hvconsole;
pub mod lguest;
pub mod mm;
pub mod ringbuf;
pub mod sched;
#[cfg(test)]
pub(crate) mod testutil;
pub mod txring;
pub mod units;
pub mod virtio;
