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
//! `rdtsc` is allowed at CPL 1 and 3 (the host leaves CR4.TSD clear).
//!
//! | metric | one operation | floor |
//! |---|---|---|
//! | `guest_loop_overhead` | one iteration of the empty timing loop (`dec`, `jnz`) | — |
//! | `hypercall_roundtrip` | `mov eax, LHCALL_FLUSH_ASYNC; int $0x1f` with an empty async ring, until the next instruction | `native_int_roundtrip` |
//! | `async_hypercall` | one of 64 `LHCALL_SEND_INTERRUPTS` (a no-op) queued with `hcall::async_hcall` into the empty ring, plus 1/64 of the synchronous `LHCALL_FLUSH_ASYNC` that drains them | `native_int_roundtrip_per64` |
//! | `trap_reflect` | `int3` → host → the guest's own IDT gate (a stub that only jumps to the paravirt `iret`) → back after the `int3` | `native_int_roundtrip` |
//! | `irq_delivery` | `irq::enable()` with the timer irq pending: the `irq_enabled` store, the `irq_pending` check, `LHCALL_SEND_INTERRUPTS`, delivery to the guest's gate for vector 0x20 (a stub that counts the irq and jumps to the paravirt `iret`), and the return | `native_int_roundtrip` |
//! | `guest_syscall` | at CPL 3: `int $0x80` → host → the guest's DPL-3 trap gate on the `SET_STACK` stack (a stub that only jumps to the paravirt `iret`) → `iretd` back to CPL 3 after the `int` | `native_syscall` |
//!
//! The floors are the hypervisor's (`native_int_roundtrip`: `int`/`iretq`
//! from CPL 1; `native_syscall`: the same from CPL 3; the `_per64` one is
//! 1/64 of the first). The goals of each metric are in `GOALS` in
//! `tests/src/bench.rs` and in `docs/benchmarks.md`.
//!
//! The handlers are minimal assembly stubs installed for the measurement
//! (not the runtime's generic stub and Rust dispatch), so that the figures,
//! like the native floor's `iretq`-only stub, are the cost of the path and
//! not of the handler. The runtime's gates are put back afterwards.
//!
//! How the figures are formed:
//! - `hypercall_roundtrip`, `trap_reflect`, `guest_syscall`: a batch is one
//!   `asm!` block (for `guest_syscall`, run at CPL 3: see below):
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
//! - `guest_syscall`: user mode is set up as lgtest's `mode=user` does it
//!   (flat DPL-3 segments in GDT slots 14/15, `LHCALL_SET_STACK`). Each batch
//!   enters CPL 3 through the paravirt iret, runs the loop there with the
//!   shape of the empty loop, and comes back to the kernel by `int3`, whose
//!   gate then points at `bench_user_exit`; the empty loop measured at CPL 1
//!   is subtracted (same instructions, same count).
//!
//! Values are printed as an integer when exact, else with one decimal.
//! After the last line the guest returns, which powers it off.
//!
//! # Modes
//!
//! `mode=` on the module command line picks what one module measures: the
//! paths above (no `mode=`, or `mode=paths`; the guest stays in the host's
//! linear mode), the shadow-paging paths (`mode=shadow`: `shadow_fault`,
//! `pgtable_switch`, `guest_fork_like`) or one round robin of K address
//! spaces (`mode=rr2`, `rr4`, `rr8`, `rr16`: `pgtable_switch_rrK`, and the
//! declaration the harness turns into `shadow_cache_hit_rate_rrK`); see
//! [`shadow`]. `tests/benches/lguest.toml` runs all six, one module each.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::irq::SYSCALL_VECTOR;
use lguest_rt::guest_abi::seg::{IDT_TYPE_INTERRUPT, IDT_TYPE_TRAP, SegmentDescriptor, idt_gate};
use lguest_rt::guest_abi::{
    FIRST_EXTERNAL_VECTOR, KERNEL_CS, KERNEL_DS, LHCALL_FLUSH_ASYNC, LHCALL_RING_SIZE,
    LHCALL_SEND_INTERRUPTS, USER_CS, USER_DS, trap,
};
use lguest_rt::stack::Stack;
use lguest_rt::{BootInfo, hcall, irq, println};

mod io;
mod shadow;

// `kernel_address` = PAGE_OFFSET for the modes that turn on paging; the
// host only uses it once the guest leaves linear mode (the first
// `NEW_PGTABLE`), which the default mode never does.
lguest_rt::entry!(main, kernel_address = lguest_rt::paging::PAGE_OFFSET);

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

/// The bench to run, from `mode=` on the module command line: the basic
/// paths (the default, `mode=paths`), the shadow-paging benches
/// (`mode=shadow`) or one round robin of address spaces (`mode=rr2`, `rr4`,
/// `rr8`, `rr16`): see [`shadow`].
fn main(boot: &BootInfo) {
    match boot.arg("mode") {
        None | Some("paths") => paths(),
        Some("shadow") => shadow::run(boot),
        Some("console") => io::console(boot),
        Some("block") => io::block(boot),
        Some("netsend") => io::net_send(boot),
        Some("netecho") => io::net_echo(boot),
        Some(m) => match m.strip_prefix("rr").and_then(|k| k.parse().ok()) {
            Some(k) => shadow::round_robin(boot, k),
            None => panic!(
                "bench: unknown mode {m:?}: paths, shadow, rr2, rr4, rr8, rr16, console, block, \
                 netsend or netecho"
            ),
        },
    }
}

/// The basic paths (the metrics in the table above).
fn paths() {
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

    let reflect = with_gate(trap::BP, IDT_TYPE_INTERRUPT, 3, StubKind::Int3, || {
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
        IDT_TYPE_INTERRUPT,
        0,
        StubKind::Irq,
        || irq_deliveries(IRQ_OPS),
    );
    report(
        "irq_delivery",
        u64::from(deliver.saturating_sub(pair)),
        1,
        "native_int_roundtrip",
    );

    prepare_user_mode();
    // `int $0x80` through a DPL-3 trap gate, as Linux's system-call gate;
    // `int3` (DPL 3 like the runtime's own gate) ends each user-mode batch.
    let syscall = with_gate(SYSCALL_VECTOR, IDT_TYPE_TRAP, 3, StubKind::Syscall, || {
        with_gate(trap::BP, IDT_TYPE_TRAP, 3, StubKind::UserExit, || {
            min_of(BATCHES, batch_syscall)
        })
    });
    report(
        "guest_syscall",
        u64::from(syscall.saturating_sub(empty)),
        N,
        "native_syscall",
    );
}

/// Print one `bench:` line: `total / ops` instructions, rounded to one
/// decimal (and shown without it when that is `.0`).
fn report(name: &str, total: u64, ops: u32, floor: &str) {
    report_in(name, total, u64::from(ops), "insn", floor);
}

/// [`report`] in another unit (`insn/KiB`: `total` is instructions × 1024
/// and `ops` bytes).
fn report_in(name: &str, total: u64, ops: u64, unit: &str, floor: &str) {
    let ops = ops.max(1);
    let tenths = (total * 10 + ops / 2) / ops;
    if tenths.is_multiple_of(10) {
        println!(
            "bench: name={name} value={} unit={unit} floor={floor}",
            tenths / 10
        );
    } else {
        println!(
            "bench: name={name} value={}.{} unit={unit} floor={floor}",
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
    /// `int $0x80` from user mode: straight back through the paravirt iret.
    Syscall,
    /// `int3` from user mode at the end of a [`batch_syscall`] batch: back
    /// to the kernel code that entered user mode.
    UserExit,
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    static bench_int3_stub: u8;
    static bench_irq_stub: u8;
    static bench_syscall_stub: u8;
    static bench_user_exit: u8;
    /// Runs one user-mode batch of `n` `int $0x80`s ([`batch_syscall`]).
    fn bench_user_batch(n: u32) -> u32;
}

fn stub_address(kind: StubKind) -> u32 {
    #[cfg(target_arch = "x86")]
    {
        match kind {
            StubKind::Int3 => hcall::phys(&raw const bench_int3_stub),
            StubKind::Irq => hcall::phys(&raw const bench_irq_stub),
            StubKind::Syscall => hcall::phys(&raw const bench_syscall_stub),
            StubKind::UserExit => hcall::phys(&raw const bench_user_exit),
        }
    }
    #[cfg(not(target_arch = "x86"))]
    {
        let _ = kind;
        0
    }
}

/// Point IDT `vector` at the `stub` (a `gate_type` gate with `dpl`) while
/// `f` runs, then give the vector back to the runtime: its stub as an
/// interrupt gate with the same `dpl` (the runtime's own choice for the
/// vectors used here), or no gate for 0x80, which has none by default.
fn with_gate(vector: u32, gate_type: u32, dpl: u8, stub: StubKind, f: impl FnOnce() -> u32) -> u32 {
    let (low, high) = idt_gate(stub_address(stub), KERNEL_CS, gate_type, dpl);
    // SAFETY: the bench stubs take the host's frame as is and leave through
    // the paravirt iret, as a gate target must, except `bench_user_exit`,
    // which is only raised by the user-mode batch and returns to the kernel
    // code that entered it.
    unsafe { hcall::load_idt_entry(vector, low, high) };
    let r = f();
    if lguest_rt::trap::stub_address(vector).is_some() {
        lguest_rt::trap::install_gate(vector, IDT_TYPE_INTERRUPT, dpl);
    } else {
        // SAFETY: a not-present gate: `int $0x80` would fault (#GP) again,
        // as before the bench.
        unsafe { hcall::load_idt_entry(vector, 0, 0) };
    }
    r
}

const KSTACK_SIZE: usize = 8192;
const USTACK_SIZE: usize = 4096;

/// The `SET_STACK` stack: traps from user mode arrive here.
static KSTACK: Stack<KSTACK_SIZE> = Stack::new();
/// The user-mode batch's stack.
static USTACK: Stack<USTACK_SIZE> = Stack::new();

/// Kernel esp saved by `bench_user_batch`, restored by `bench_user_exit`.
static SAVED_ESP: AtomicU32 = AtomicU32::new(0);

/// What user mode needs, as lgtest's `mode=user` does it: flat DPL-3 code
/// and data segments in GDT slots 14/15 (selectors 0x73/0x7b) and a kernel
/// stack for traps from CPL 3. The runtime stays in the host's linear mode,
/// whose pages are all user-accessible, so no mapping is needed.
fn prepare_user_mode() {
    let ktop = KSTACK.top();
    // SAFETY: slots 14/15 are the user segments, unused by the runtime; the
    // kernel stack is reserved for traps from user mode.
    unsafe {
        hcall::load_gdt_entry(14, SegmentDescriptor::flat_code(3));
        hcall::load_gdt_entry(15, SegmentDescriptor::flat_data(3));
        hcall::set_stack(u32::from(KERNEL_DS), ktop, 2);
    }
}

/// One batch of `N` `int $0x80`s from user mode: enters CPL 3, runs the
/// timed loop there (same shape as [`batch_empty`]) and comes back through
/// `int3`; returns the ticks of the loop.
fn batch_syscall() -> u32 {
    #[cfg(target_arch = "x86")]
    {
        // SAFETY: the 0x80 and int3 gates point at `bench_syscall_stub` and
        // `bench_user_exit` (see `main`), user segments and the SET_STACK
        // stack are set ([`prepare_user_mode`]); the user code touches only
        // its own stack, and `bench_user_exit` resumes our caller with the
        // kernel's stack, data selectors and callee-saved registers.
        unsafe { bench_user_batch(N) }
    }
    #[cfg(not(target_arch = "x86"))]
    0
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
    // `int $0x80` from user mode (DPL-3 trap gate): the host has switched to
    // the SET_STACK stack and pushed the 5-word frame (EIP, CS, EFLAGS, ESP,
    // SS); the paravirt iret copies IF into irq_enabled (unchanged: a trap
    // gate left it on) and its `iretd` from CPL 1 to CPL 3 pops all five.
    ".p2align 3",
    ".globl bench_syscall_stub",
    "bench_syscall_stub:",
    "jmp lguest_rt_iret",
    ".popsection",
    irqs = sym IRQS,
);

// The user-mode batch for `guest_syscall`.
//
// `bench_user_batch(n)` (C ABI) saves the callee-saved registers and its esp,
// builds the 5-word iret frame for CPL 3 (user SS, the top of USTACK, EFLAGS
// with IF, user CS, the loop) and leaves through the paravirt iret, as
// lgtest's user mode does; ds/es are loaded with the user data selector first
// (an iret to CPL 3 would null the kernel's DPL-1 ones). The counter travels
// in edi, which the paravirt iret leaves alone.
//
// At CPL 3 the loop has exactly the shape of `batch_empty` (rdtsc, push, the
// operation, dec, jnz, rdtsc, pop, sub), so subtracting the empty loop leaves
// the `int $0x80` round trip. It then raises `int3`, whose gate (a trap gate,
// so irq_enabled stays as user mode had it: on) is `bench_user_exit`: at CPL 1
// on the SET_STACK stack, which it abandons, it reloads the kernel data
// selectors and the saved esp and returns to `bench_user_batch`'s caller with
// the elapsed ticks still in eax.
#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    ".pushsection .text.bench_user,\"ax\",@progbits",
    ".globl bench_user_batch",
    "bench_user_batch:",
    "push ebp",
    "push ebx",
    "push esi",
    "push edi",
    "mov dword ptr [{saved}], esp",
    "mov edi, dword ptr [esp + 20]",
    "push {user_ds}",
    "lea eax, [{ustack} + {ustack_size}]",
    "push eax",
    "push 0x202",
    "push {user_cs}",
    "lea eax, [2f]",
    "push eax",
    "mov eax, {user_ds}",
    "mov ds, ax",
    "mov es, ax",
    "jmp lguest_rt_iret",
    // CPL 3 from here to the int3.
    "2:",
    "rdtsc",
    "push eax",
    "3:",
    "int 0x80",
    "dec edi",
    "jnz 3b",
    "rdtsc",
    "pop ecx",
    "sub eax, ecx",
    "int3",
    "ud2",
    ".globl bench_user_exit",
    "bench_user_exit:",
    "mov ecx, {kernel_ds}",
    "mov ds, cx",
    "mov es, cx",
    "mov esp, dword ptr [{saved}]",
    "pop edi",
    "pop esi",
    "pop ebx",
    "pop ebp",
    "ret",
    ".popsection",
    saved = sym SAVED_ESP,
    ustack = sym USTACK,
    ustack_size = const USTACK_SIZE,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    kernel_ds = const KERNEL_DS,
);
