//! Benchmark guest: measures, with `rdtsc`, how many instructions the basic
//! lguest paths cost, and prints one line per metric for `cargo xtask bench`:
//!
//! ```text
//! bench: name=hypercall_roundtrip value=412 unit=insn floor=native_int_roundtrip
//! ```
//!
//! Benches run under QEMU `-icount shift=0`, where the time-stamp counter
//! advances one tick per executed instruction, guest and hypervisor alike,
//! so a difference of two `rdtsc` readings is the path length in between.
//! `rdtsc` is allowed at CPL 1 (the host leaves CR4.TSD clear).
//!
//! | metric | one operation | floor |
//! |---|---|---|
//! | `guest_loop_overhead` | one iteration of the empty timing loop (`dec`, `jnz`) | — |
//! | `hypercall_roundtrip` | `mov eax, LHCALL_FLUSH_ASYNC; int $0x1f` with an empty async ring, until the next instruction | `native_int_roundtrip` |
//! | `async_hypercall` | one of 64 `LHCALL_SEND_INTERRUPTS` (a no-op) queued with `hcall::async_hcall` into the empty ring, plus 1/64 of the synchronous `LHCALL_FLUSH_ASYNC` that drains them | `native_int_roundtrip_per64` |
//! | `trap_reflect` | `int3` → host → the guest's own IDT gate (a stub that only jumps to the paravirt `iret`) → back after the `int3` | `native_int_roundtrip` |
//! | `irq_delivery` | `irq::enable()` with the timer irq pending: the `irq_enabled` store, the `irq_pending` check, `LHCALL_SEND_INTERRUPTS`, delivery to the guest's gate for vector 0x20 (a stub that counts the irq and jumps to the paravirt `iret`), and the return | `native_int_roundtrip` |
//!
//! The handlers are minimal assembly stubs installed for the measurement
//! (not the runtime's generic stub and Rust dispatch), so that the figures,
//! like the native floor's `iretq`-only stub, are the cost of the path and
//! not of the handler. The runtime's gates are put back afterwards.
//!
//! How the figures are formed:
//! - `hypercall_roundtrip`, `trap_reflect`: a batch is one `asm!` block:
//!   `rdtsc`, [`N`] iterations of the operation, `rdtsc`. The same block with
//!   no operation measures the empty loop; the value is (the minimum over
//!   [`BATCHES`] batches − the minimum empty batch) / [`N`]. The minimum
//!   discards a batch that a host interrupt happened to hit; under `-icount`
//!   all other batches are identical.
//! - `async_hypercall`: `rdtsc`, 64 `async_hcall`s and one `flush_async()`,
//!   `rdtsc`; the minimum over [`ASYNC_ROUNDS`] rounds, minus the cost of the
//!   bare `rdtsc` pair, divided by 64. The guest's queueing code (and its
//!   loop) is part of each entry's cost.
//! - `irq_delivery`: each of [`IRQ_OPS`] operations is timed on its own
//!   (an `rdtsc` pair around `irq::enable()`); the value is the minimum minus
//!   the cost of the bare `rdtsc` pair. Before each one (not timed): virtual
//!   interrupts off, the clock event armed [`IRQ_DELAY_NS`] ahead, and
//!   `LHCALL_FLUSH_ASYNC` exits until the host has flagged `irq_pending`.
//!
//! Values are printed as an integer when exact, else with one decimal.
//! After the last line the guest returns, which powers it off.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::seg::{IDT_TYPE_INTERRUPT, idt_gate};
use lguest_rt::guest_abi::{
    FIRST_EXTERNAL_VECTOR, KERNEL_CS, LHCALL_FLUSH_ASYNC, LHCALL_RING_SIZE, LHCALL_SEND_INTERRUPTS,
    trap,
};
use lguest_rt::{BootInfo, hcall, irq, println};

lguest_rt::entry!(main);

/// Iterations per timed batch (hypercall, trap).
const N: u32 = 1000;
/// Batches per metric; the minimum is kept.
const BATCHES: u32 = 5;
/// Timed fill-and-drain rounds of the async ring; the minimum is kept.
const ASYNC_ROUNDS: u32 = 20;
/// Individually timed irq deliveries; the minimum is kept.
const IRQ_OPS: u32 = 200;
/// Clock event delay before each irq delivery (ns; one instruction each
/// under `-icount shift=0`).
const IRQ_DELAY_NS: u32 = 20_000;
/// Give up waiting for `irq_pending` after this many exits.
const IRQ_WAIT_EXITS: u32 = 1_000_000;

fn main(_boot: &BootInfo) {
    let empty = min_of(BATCHES, batch_empty);
    report("guest_loop_overhead", u64::from(empty), N, "-");

    let hcall = min_of(BATCHES, batch_hypercall);
    report(
        "hypercall_roundtrip",
        u64::from(hcall.saturating_sub(empty)),
        N,
        "native_int_roundtrip",
    );

    let pair = min_of(BATCHES * N, rdtsc_pair);
    let ring = min_of(ASYNC_ROUNDS, async_round);
    report(
        "async_hypercall",
        u64::from(ring.saturating_sub(pair)),
        LHCALL_RING_SIZE as u32,
        "native_int_roundtrip_per64",
    );

    let reflect = with_gate(trap::BP, 3, stub_address(StubKind::Int3), || {
        min_of(BATCHES, batch_int3)
    });
    report(
        "trap_reflect",
        u64::from(reflect.saturating_sub(empty)),
        N,
        "native_int_roundtrip",
    );

    let deliver = with_gate(
        FIRST_EXTERNAL_VECTOR,
        0,
        stub_address(StubKind::Irq),
        || irq_deliveries(IRQ_OPS),
    );
    report(
        "irq_delivery",
        u64::from(deliver.saturating_sub(pair)),
        1,
        "native_int_roundtrip",
    );
}

/// Print one `bench:` line: `total / ops` instructions, rounded to one
/// decimal (and shown without it when that is `.0`).
fn report(name: &str, total: u64, ops: u32, floor: &str) {
    let ops = u64::from(ops.max(1));
    let tenths = (total * 10 + ops / 2) / ops;
    if tenths.is_multiple_of(10) {
        println!(
            "bench: name={name} value={} unit=insn floor={floor}",
            tenths / 10
        );
    } else {
        println!(
            "bench: name={name} value={}.{} unit=insn floor={floor}",
            tenths / 10,
            tenths % 10
        );
    }
}

/// The smallest of `runs` results of `f`.
fn min_of(runs: u32, mut f: impl FnMut() -> u32) -> u32 {
    (0..runs).map(|_| f()).min().unwrap_or(0)
}

/// Low 32 bits of the time-stamp counter (every timed span here is far
/// below 2^32 instructions, so wrapping differences are exact).
#[inline(always)]
fn rdtsc() -> u32 {
    let lo: u32;
    // SAFETY: rdtsc only writes eax/edx. No `nomem`: the call doubles as a
    // compiler barrier so that the timed code stays between two readings.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") _, options(nostack)) };
    lo
}

/// Two back-to-back readings: the fixed cost subtracted from spans timed
/// with [`rdtsc`] around Rust code.
fn rdtsc_pair() -> u32 {
    let t0 = rdtsc();
    let t1 = rdtsc();
    t1.wrapping_sub(t0)
}

// The timed loops are single `asm!` blocks so that the compiler cannot
// change what lies between the two `rdtsc`s: the first reading's low half is
// pushed (every register but the loop counter may be clobbered by the
// operation), the loop counts down in a register of the compiler's choice
// outside eax..edx, and the second reading is subtracted from the popped
// first. The empty loop has exactly the same shape, so subtracting it
// leaves only the operation itself.

/// `N` iterations of nothing.
fn batch_empty() -> u32 {
    let elapsed: u32;
    // SAFETY: only registers declared here and two balanced stack slots.
    unsafe {
        core::arch::asm!(
            "rdtsc",
            "push eax",
            "2:",
            "dec {n}",
            "jnz 2b",
            "rdtsc",
            "pop ecx",
            "sub eax, ecx",
            n = inout(reg) N => _,
            out("eax") elapsed,
            out("ecx") _,
            out("edx") _,
        );
    }
    elapsed
}

/// `N` synchronous `LHCALL_FLUSH_ASYNC` hypercalls with an empty ring.
fn batch_hypercall() -> u32 {
    let elapsed: u32;
    // SAFETY: FLUSH_ASYNC changes no guest state (the ring is empty; the
    // runtime never leaves entries queued). The host returns with eax..edx
    // undefined: all four are declared clobbered. No `nomem`: the host reads
    // guest memory (the ring status) during the call.
    unsafe {
        core::arch::asm!(
            "rdtsc",
            "push eax",
            "2:",
            "mov eax, {nr}",
            "int 0x1f",
            "dec {n}",
            "jnz 2b",
            "rdtsc",
            "pop ecx",
            "sub eax, ecx",
            nr = const LHCALL_FLUSH_ASYNC,
            n = inout(reg) N => _,
            out("eax") elapsed,
            out("ebx") _,
            out("ecx") _,
            out("edx") _,
        );
    }
    elapsed
}

/// `N` `int3`s reflected to [`StubKind::Int3`], which returns at once.
fn batch_int3() -> u32 {
    let elapsed: u32;
    // SAFETY: the int3 gate points at a stub that leaves every register and
    // the frame untouched and returns through the paravirt iret to the
    // instruction after `int3`. The host pushes the 3-word frame below esp
    // (below our saved reading) and the iret pops it.
    unsafe {
        core::arch::asm!(
            "rdtsc",
            "push eax",
            "2:",
            "int3",
            "dec {n}",
            "jnz 2b",
            "rdtsc",
            "pop ecx",
            "sub eax, ecx",
            n = inout(reg) N => _,
            out("eax") elapsed,
            out("ecx") _,
            out("edx") _,
        );
    }
    elapsed
}

/// One fill of the whole async ring with no-op calls and the synchronous
/// flush that drains it, timed with [`rdtsc`] around the Rust code.
fn async_round() -> u32 {
    let t0 = rdtsc();
    for _ in 0..LHCALL_RING_SIZE {
        // SAFETY: SEND_INTERRUPTS has no arguments and changes no guest
        // state; run from the ring it is a no-op.
        unsafe { hcall::async_hcall(LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0) };
    }
    hcall::flush_async();
    let t1 = rdtsc();
    t1.wrapping_sub(t0)
}

/// Irqs counted by [`StubKind::Irq`].
static IRQS: AtomicU32 = AtomicU32::new(0);

/// `ops` timer irqs, each held back with interrupts off and then delivered
/// by `irq::enable()`; returns the smallest `rdtsc` span around that call
/// (including the `rdtsc` pair itself).
fn irq_deliveries(ops: u32) -> u32 {
    IRQS.store(0, Ordering::Relaxed);
    irq::unmask(0);
    let mut best = u32::MAX;
    for i in 0..ops {
        irq::disable();
        hcall::set_clockevent(IRQ_DELAY_NS);
        let mut exits = 0;
        // Any exit lets the host run its expired timers; with virtual
        // interrupts off it then flags `irq_pending` instead of delivering.
        while irq::pending() == 0 {
            assert!(exits < IRQ_WAIT_EXITS, "irq {i} never became pending");
            hcall::flush_async();
            exits += 1;
        }
        let t0 = rdtsc();
        irq::enable();
        let t1 = rdtsc();
        best = best.min(t1.wrapping_sub(t0));
        assert_eq!(
            IRQS.load(Ordering::Relaxed),
            i + 1,
            "irq {i} not delivered by irq::enable()"
        );
    }
    irq::mask(0);
    best
}

/// The measurement's own trap/irq entry points.
#[derive(Clone, Copy)]
enum StubKind {
    /// `int3`: the frame's eip already points past the instruction.
    Int3,
    /// Virtual irq: count it in [`IRQS`].
    Irq,
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    static bench_int3_stub: u8;
    static bench_irq_stub: u8;
}

fn stub_address(kind: StubKind) -> u32 {
    #[cfg(target_arch = "x86")]
    {
        match kind {
            StubKind::Int3 => hcall::phys(&raw const bench_int3_stub),
            StubKind::Irq => hcall::phys(&raw const bench_irq_stub),
        }
    }
    #[cfg(not(target_arch = "x86"))]
    {
        let _ = kind;
        0
    }
}

/// Point IDT `vector` at `handler` (interrupt gate, `dpl`) while `f` runs,
/// then give the vector back to the runtime's stub.
fn with_gate(vector: u32, dpl: u8, handler: u32, f: impl FnOnce() -> u32) -> u32 {
    let (low, high) = idt_gate(handler, KERNEL_CS, IDT_TYPE_INTERRUPT, dpl);
    // SAFETY: both bench stubs take the host's frame as is and leave through
    // the paravirt iret, as a gate target must.
    unsafe { hcall::load_idt_entry(vector, low, high) };
    let r = f();
    lguest_rt::trap::install_gate(vector, IDT_TYPE_INTERRUPT, dpl);
    r
}

// The bench handlers. The host enters them like the CPU would through an
// interrupt gate: EIP, CS, EFLAGS pushed on the current stack (no error code
// for these vectors) and virtual interrupts off. They keep the frame as it
// is and leave through the runtime's paravirt iret (`lguest_rt_iret`),
// which restores the virtual IF from the saved EFLAGS. `inc` changes only
// the flags, which the iret restores from the frame.
#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    ".pushsection .text.bench_stubs,\"ax\",@progbits",
    ".p2align 3",
    ".globl bench_int3_stub",
    "bench_int3_stub:",
    "jmp lguest_rt_iret",
    ".p2align 3",
    ".globl bench_irq_stub",
    "bench_irq_stub:",
    "inc dword ptr [{irqs}]",
    "jmp lguest_rt_iret",
    ".popsection",
    irqs = sym IRQS,
);
