//! The shadow-paging benchmarks (`mode=shadow` and `mode=rrK`): the guest
//! turns on its own 2-level paging with [`lguest_rt::paging`] and times the
//! paths where the host's shadow page tables do the work.
//!
//! | metric | one operation | floor |
//! |---|---|---|
//! | `shadow_fault` | a write to a page the guest's tables map (present, writable, ACCESSED and DIRTY clear, so `SET_PTE` did not pre-install it): #PF → host → shadow fill (the guest PTE gets A and D, the shadow entry is installed writable) → the write completes | `native_page_fault` |
//! | `pgtable_switch` | `LHCALL_NEW_PGTABLE` alternating between two address spaces whose shadows are cached (`mov eax`, `mov ebx`, `int $0x1f`) | `native_cr3_write` |
//! | `pgtable_switch_rrK` | `LHCALL_NEW_PGTABLE` cycling through K address spaces, each switch followed by a write to one page already filled in that space (a miss costs the new shadow and that page's refill) | `native_cr3_write` |
//! | `guest_fork_like` | one address space's life: create it and map [`FORK_PAGES`] pages (`.create`), switch to it, write each page once, switch back (`.run`), unmap the pages and tear it down (`.teardown`) | — |
//!
//! The round robins each run in their own guest module (`mode=rr2`, `rr4`,
//! `rr8`, `rr16`), so that the hypervisor's per-guest line `guest bench
//! shadow paging: S switches (H to a cached shadow), ...` counts only that
//! round robin's switches. The guest prints, before it powers off,
//! `bench-switches: name=shadow_cache_hit_rate_rrK measured=M cold=C`: M
//! switches were made by the timed loops, C before them (the first
//! `NEW_PGTABLE` and the first switch to each of the K spaces: each to a
//! top-level table never loaded before, so necessarily a miss), and none
//! after. `cargo xtask bench` checks S = M + C and reports H / M as
//! `shadow_cache_hit_rate_rrK` (tests/src/bench.rs).
//!
//! **Where the timed code runs.** The runtime keeps its image mapped 1:1
//! below `kernel_address` ([`lguest_rt::paging`]), so to the host the
//! guest's own code, stack and statics are user-half pages, which a shadow
//! made on a cache miss (a reused slot keeps only its kernel half) would
//! have to refill. Linux's kernel lives above `PAGE_OFFSET` and never pays
//! that. The timed loops therefore run through the direct map: they are
//! position-independent assembly (relative jumps, arguments in registers
//! and on the stack, constants as immediates) called at
//! `PAGE_OFFSET + address`, and move the stack to its `PAGE_OFFSET` alias
//! for their duration; every page they touch apart from the measured ones
//! is in the kernel half, filled once per shadow and kept.
//!
//! **How the figures are formed.** As in the other benches: a batch is
//! `rdtsc`, the operation in a loop, `rdtsc`; the same loop without the
//! operation is timed too; the value is (minimum batch − minimum empty
//! batch) / operations, over [`BATCHES`] batches. The first batch pays the
//! kernel-half fills of the loop's own code and stack in each shadow; the
//! minimum discards it. `guest_fork_like` and its stages are timed with an
//! `rdtsc` pair around Rust code (minus the bare pair), the minimum over
//! [`FORK_ITERATIONS`] iterations, each stage's minimum on its own.

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::LHCALL_NEW_PGTABLE;
use lguest_rt::paging::{
    self, AddressSpace, Format, PAGE_ACCESSED, PAGE_DIRTY, PAGE_OFFSET, PAGE_PRESENT, PAGE_RW,
    PAGE_SIZE, PAGE_USER, USER_START,
};
use lguest_rt::{BootInfo, hcall, println};

use crate::{min_of, rdtsc, rdtsc_pair, report};

/// Batches per metric; the minimum is kept.
const BATCHES: u32 = 5;
/// Pages one `shadow_fault` batch touches (one guest page table's quarter).
const FAULT_PAGES: u32 = 256;
/// `NEW_PGTABLE`s per `pgtable_switch` batch.
const SWITCHES: u32 = 1000;
/// Switches per round-robin batch (a multiple of every K).
const RR_SWITCHES: u32 = 480;
/// Pages one fork-like address space maps and touches.
const FORK_PAGES: u32 = 16;
/// Timed fork-like iterations (after [`FORK_WARMUP`] untimed ones).
const FORK_ITERATIONS: u32 = 20;
/// Untimed fork-like iterations first.
const FORK_WARMUP: u32 = 2;
/// The user page every measured touch starts at.
const TOUCH_VA: u32 = USER_START;

/// Flags of the measured user pages: present, writable, user, and neither
/// ACCESSED nor DIRTY, so that `SET_PTE` only records them and the first
/// touch is a shadow fill.
const CLEAN_RW: u64 = PAGE_PRESENT | PAGE_RW | PAGE_USER;
const _: () = assert!(CLEAN_RW & (PAGE_ACCESSED | PAGE_DIRTY) == 0);

/// Turns on the guest's own paging (2-level unless the command line says
/// `paging=pae`; the benches use the default).
fn paging_on(boot: &BootInfo) -> Format {
    let format = match Format::from_boot(boot) {
        Ok((f, _)) => f,
        Err(e) => panic!("bench: {e}"),
    };
    let km = paging::init(boot, format);
    println!(
        "paging on ({}): {} frames of kernel tables, {} MiB at {PAGE_OFFSET:#x}",
        format.name(),
        km.table_frames,
        km.mem >> 20
    );
    format
}

/// `mode=shadow`: `shadow_fault`, `pgtable_switch`, `guest_fork_like`.
pub fn run(boot: &BootInfo) {
    paging_on(boot);
    shadow_fault();
    pgtable_switch();
    fork_like();
}

/// `mode=rrK`: `pgtable_switch_rrK` and the declaration behind
/// `shadow_cache_hit_rate_rrK`.
pub fn round_robin(boot: &BootInfo, k: u32) {
    let (switch_name, hit_name) = rr_names(k);
    assert!(k as usize <= MAX_RR && RR_SWITCHES.is_multiple_of(k));
    paging_on(boot);
    // Cold switches: the first NEW_PGTABLE (paging::init), then one to each
    // new address space.
    let mut cold = 1;
    let spaces: [Option<AddressSpace>; MAX_RR] = core::array::from_fn(|i| {
        (i < k as usize).then(|| {
            let s = AddressSpace::new().expect("bench: a frame for a top-level table");
            s.map_new(TOUCH_VA, CLEAN_RW)
                .expect("bench: a frame for a touched page");
            s.switch_to();
            cold += 1;
            touch(TOUCH_VA);
            s
        })
    });
    let tops = tops_of(&spaces);
    let rounds = RR_SWITCHES / k;
    // From here on, every NEW_PGTABLE is a timed one.
    let (mut best, mut empty) = (u32::MAX, u32::MAX);
    for _ in 0..BATCHES {
        best = best.min(switch_batch(Routine::SwitchTouch, tops, k, rounds));
        empty = empty.min(switch_batch(Routine::SwitchEmpty, tops, k, rounds));
    }
    report(
        switch_name,
        u64::from(best.saturating_sub(empty)),
        RR_SWITCHES,
        "native_cr3_write",
    );
    println!(
        "bench-switches: name={hit_name} measured={} cold={cold}",
        BATCHES * RR_SWITCHES
    );
    // No switch after the timed loops: the host's count must be cold +
    // measured. The spaces are not destroyed (dropping an AddressSpace
    // leaves its frames allocated; the host frees every shadow and all
    // guest memory when the guest powers off): tearing them down would take
    // one more switch, a hit or a miss depending on K.
    let _ = spaces;
}

/// Most address spaces in a round robin.
const MAX_RR: usize = 16;

/// The metric names of round robin `k`: (`pgtable_switch_rrK`,
/// `shadow_cache_hit_rate_rrK`).
fn rr_names(k: u32) -> (&'static str, &'static str) {
    match k {
        2 => ("pgtable_switch_rr2", "shadow_cache_hit_rate_rr2"),
        4 => ("pgtable_switch_rr4", "shadow_cache_hit_rate_rr4"),
        8 => ("pgtable_switch_rr8", "shadow_cache_hit_rate_rr8"),
        16 => ("pgtable_switch_rr16", "shadow_cache_hit_rate_rr16"),
        _ => panic!("bench: no round robin of {k}: mode=rr2, rr4, rr8 or rr16"),
    }
}

/// The top-level tables of `spaces`, in a static the timed loop reads
/// through the direct map; returns its kernel virtual address.
fn tops_of(spaces: &[Option<AddressSpace>]) -> u32 {
    for (slot, s) in TOPS.iter().zip(spaces) {
        slot.store(s.as_ref().map_or(0, AddressSpace::top), Ordering::Relaxed);
    }
    // An array of AtomicU32 has the layout of [u32; MAX_RR].
    paging::kva(hcall::phys(&raw const TOPS))
}

/// The `cr3` values the switch loops cycle through.
static TOPS: [AtomicU32; MAX_RR] = [const { AtomicU32::new(0) }; MAX_RR];

/// One write to `va` from Rust (a fill if the shadow lacks the page).
fn touch(va: u32) {
    paging::probe_write(va, 0).expect("bench: a mapped page");
}

// ---- shadow_fault -------------------------------------------------------------------

fn shadow_fault() {
    let space = AddressSpace::new().expect("bench: a frame for a top-level table");
    let mut frames = [0u32; FAULT_PAGES as usize];
    for (i, f) in (0..).zip(frames.iter_mut()) {
        *f = space
            .map_new(TOUCH_VA + i * PAGE_SIZE, CLEAN_RW)
            .expect("bench: frames for the touched pages");
    }
    space.switch_to();
    let (mut best, mut empty) = (u32::MAX, u32::MAX);
    for _ in 0..BATCHES {
        // Every page clean and unaccessed again, and out of the shadow:
        // `SET_PTE` with A and D clear removes the shadow entry (keeping
        // the shadow's page table), so each touch is one fill.
        paging::lazy(|| {
            for (i, &f) in (0..).zip(frames.iter()) {
                space
                    .map(TOUCH_VA + i * PAGE_SIZE, f, CLEAN_RW | paging::PTE_OWNED)
                    .expect("bench: remap a touched page");
            }
        });
        best = best.min(touch_batch(Routine::Touch, TOUCH_VA, FAULT_PAGES));
        empty = empty.min(touch_batch(Routine::TouchEmpty, TOUCH_VA, FAULT_PAGES));
    }
    let e = space.entry(TOUCH_VA);
    assert!(
        e & (PAGE_ACCESSED | PAGE_DIRTY) == PAGE_ACCESSED | PAGE_DIRTY,
        "bench: the host set A and D on the touched page ({e:#x})"
    );
    report(
        "shadow_fault",
        u64::from(best.saturating_sub(empty)),
        FAULT_PAGES,
        "native_page_fault",
    );
    paging::switch_to_kernel();
    paging::lazy(|| {
        for i in 0..FAULT_PAGES {
            space.unmap(TOUCH_VA + i * PAGE_SIZE);
        }
    });
    space.destroy();
}

// ---- pgtable_switch ------------------------------------------------------------------

fn pgtable_switch() {
    let spaces = [AddressSpace::new(), AddressSpace::new()]
        .map(|s| Some(s.expect("bench: a frame for a top-level table")));
    // Both shadows made and cached.
    for s in spaces.iter().flatten() {
        s.switch_to();
    }
    let tops = tops_of(&spaces);
    let rounds = SWITCHES / 2;
    let (mut best, mut empty) = (u32::MAX, u32::MAX);
    for _ in 0..BATCHES {
        best = best.min(switch_batch(Routine::Switch, tops, 2, rounds));
        empty = empty.min(switch_batch(Routine::SwitchEmpty, tops, 2, rounds));
    }
    report(
        "pgtable_switch",
        u64::from(best.saturating_sub(empty)),
        SWITCHES,
        "native_cr3_write",
    );
    // The loop left the last space loaded behind the runtime's back.
    paging::switch_to_kernel();
    for s in spaces.into_iter().flatten() {
        s.destroy();
    }
}

// ---- guest_fork_like -------------------------------------------------------------------

/// Fork-like iterations: each creates an address space mapping
/// [`FORK_PAGES`] shared frames (clean, so each first touch is a fill),
/// runs in it, and tears it down with the hypercalls Linux's lguest makes
/// for `fork`, the child's run and `exit` + `wait`:
///
/// 1. `.create`: `AddressSpace::new` (Linux's `pgd_alloc`: a zeroed top
///    with the kernel entries copied, no hypercall) and, in lazy mode, the
///    mappings (`copy_page_range`: a page table, `SET_PGD`, and one
///    `SET_PTE` per page, queued in the async ring and flushed at the end);
/// 2. `.run`: `NEW_PGTABLE` to it (a miss: a new shadow), a write to each
///    page (a shadow fill each), `NEW_PGTABLE` back to the kernel's tables
///    (the parent) — through the direct map, like the other timed loops;
/// 3. `.teardown`: in lazy mode one `SET_PTE` of 0 per page (`exit_mmap`
///    clearing the PTEs), then `destroy` (free the page table with
///    `SET_PGD`, then the top; `free_pgtables`, `pgd_free`).
///
/// The frames behind the pages are allocated once and shared by every
/// iteration, like the pages a fork shares with its parent, so zeroing new
/// frames (guest work that Linux's copy-on-write fork does not do either)
/// stays out of the figure; the page table and the top are allocated (and
/// zeroed) each time.
fn fork_like() {
    let mut shared = [0u32; FORK_PAGES as usize];
    for f in &mut shared {
        *f = paging::alloc_frame().expect("bench: a shared frame");
    }
    let baseline = paging::free_frames();
    let pair = min_of(100, rdtsc_pair);
    let (mut total, mut create, mut run, mut teardown) = (u32::MAX, u32::MAX, u32::MAX, u32::MAX);
    for i in 0..FORK_WARMUP + FORK_ITERATIONS {
        let t0 = rdtsc();
        let space = AddressSpace::new().expect("bench: a frame for a top-level table");
        paging::lazy(|| {
            for (p, &f) in (0..).zip(shared.iter()) {
                space
                    .map(TOUCH_VA + p * PAGE_SIZE, f, CLEAN_RW)
                    .expect("bench: a frame for a page table");
            }
        });
        let t1 = rdtsc();
        fork_run(space.top(), paging::kernel_top(), TOUCH_VA, FORK_PAGES);
        let t2 = rdtsc();
        paging::lazy(|| {
            for p in 0..FORK_PAGES {
                space.unmap(TOUCH_VA + p * PAGE_SIZE);
            }
        });
        space.destroy();
        let t3 = rdtsc();
        assert_eq!(
            paging::free_frames(),
            baseline,
            "bench: fork-like iteration {i} gave every frame back"
        );
        if i >= FORK_WARMUP {
            total = total.min(t3.wrapping_sub(t0));
            create = create.min(t1.wrapping_sub(t0));
            run = run.min(t2.wrapping_sub(t1));
            teardown = teardown.min(t3.wrapping_sub(t2));
        }
    }
    let less_pair = |v: u32| u64::from(v.saturating_sub(pair));
    report("guest_fork_like", less_pair(total), 1, "-");
    report("guest_fork_like.create", less_pair(create), 1, "-");
    report("guest_fork_like.run", less_pair(run), 1, "-");
    report("guest_fork_like.teardown", less_pair(teardown), 1, "-");
    for f in shared {
        paging::free_frame(f);
    }
}

// ---- The timed loops ----------------------------------------------------------------------

/// The position-independent routines below.
#[derive(Clone, Copy)]
enum Routine {
    /// `touch(va, n)`: a write to each of `n` pages from `va`.
    Touch,
    /// The same loop without the writes.
    TouchEmpty,
    /// `switch(tops, k, rounds)`: `NEW_PGTABLE(tops[i])`.
    Switch,
    /// The same with a write to [`TOUCH_VA`] after each switch.
    SwitchTouch,
    /// The same loop without either.
    SwitchEmpty,
    /// `fork_run(top, back, va, n)`.
    ForkRun,
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    static bench_pg_touch: u8;
    static bench_pg_touch_empty: u8;
    static bench_pg_switch: u8;
    static bench_pg_switch_touch: u8;
    static bench_pg_switch_empty: u8;
    static bench_pg_fork_run: u8;
}

/// Where `r` runs: its `PAGE_OFFSET` alias.
fn routine(r: Routine) -> usize {
    #[cfg(target_arch = "x86")]
    {
        let sym = match r {
            Routine::Touch => &raw const bench_pg_touch,
            Routine::TouchEmpty => &raw const bench_pg_touch_empty,
            Routine::Switch => &raw const bench_pg_switch,
            Routine::SwitchTouch => &raw const bench_pg_switch_touch,
            Routine::SwitchEmpty => &raw const bench_pg_switch_empty,
            Routine::ForkRun => &raw const bench_pg_fork_run,
        };
        paging::kva(hcall::phys(sym)) as usize
    }
    #[cfg(not(target_arch = "x86"))]
    {
        let _ = r;
        0
    }
}

/// One switch batch (`Switch`, `SwitchTouch` or `SwitchEmpty`): `rounds`
/// rounds of `k` steps over the tables at `tops` (a kernel virtual
/// address); TSC ticks.
fn switch_batch(r: Routine, tops: u32, k: u32, rounds: u32) -> u32 {
    type F = extern "C" fn(u32, u32, u32) -> u32;
    assert!(matches!(
        r,
        Routine::Switch | Routine::SwitchTouch | Routine::SwitchEmpty
    ));
    if cfg!(not(target_arch = "x86")) {
        return 0;
    }
    // SAFETY: a switch routine has this signature; it is
    // position-independent code reached through the direct map, and it
    // switches only between the guest's own address spaces, all of which
    // map the kernel half (the routine, the stack's alias, `TOPS`) alike.
    let f: F = unsafe { core::mem::transmute(routine(r)) };
    f(tops, k, rounds)
}

/// One touch batch (`Touch` or `TouchEmpty`) of `n` pages from `va`; TSC
/// ticks.
fn touch_batch(r: Routine, va: u32, n: u32) -> u32 {
    type F = extern "C" fn(u32, u32) -> u32;
    assert!(matches!(r, Routine::Touch | Routine::TouchEmpty));
    if cfg!(not(target_arch = "x86")) {
        return 0;
    }
    // SAFETY: as in `switch_batch`; the touch loop writes only the
    // measured pages, which the current address space maps writable.
    let f: F = unsafe { core::mem::transmute(routine(r)) };
    f(va, n)
}

/// `NEW_PGTABLE(top)`, a write to each of `n` pages from `va`,
/// `NEW_PGTABLE(back)`.
fn fork_run(top: u32, back: u32, va: u32, n: u32) {
    type F = extern "C" fn(u32, u32, u32, u32);
    if cfg!(not(target_arch = "x86")) {
        return;
    }
    // SAFETY: as in `switch_batch`; `top` maps the pages written, `back` is
    // the address space the caller runs in.
    let f: F = unsafe { core::mem::transmute(routine(Routine::ForkRun)) };
    f(top, back, va, n);
}

// The routines are only ever called at their PAGE_OFFSET alias. Each moves
// the stack to its alias (`add esp, PAGE_OFFSET`) at entry and back before
// `ret`; the caller's return address was pushed on the 1:1 stack, which is
// the same memory. Hypercalls leave eax..edx undefined: the loops keep their
// state in esi, edi, ebp and on the stack. The measured pages are the only
// user-half addresses they touch.

// u32 touch(u32 va, u32 n): n iterations of [op], va += 4096; ticks.
// [op] is a write of the counter to [ecx] (bench_pg_touch) or nothing.
macro_rules! touch_loop {
    ($name:literal $(, $op:literal)?) => {
        #[cfg(target_arch = "x86")]
        core::arch::global_asm!(
            ".pushsection .text.bench_pg,\"ax\",@progbits",
            concat!(".globl ", $name),
            concat!($name, ":"),
            "add esp, {po}",
            "push esi",
            "mov ecx, dword ptr [esp + 8]",
            "mov esi, dword ptr [esp + 12]",
            "rdtsc",
            "push eax",
            "2:",
            $($op,)?
            "add ecx, 4096",
            "dec esi",
            "jnz 2b",
            "rdtsc",
            "pop ecx",
            "sub eax, ecx",
            "pop esi",
            "sub esp, {po}",
            "ret",
            ".popsection",
            po = const PAGE_OFFSET,
        );
    };
}

touch_loop!("bench_pg_touch", "mov dword ptr [ecx], esi");
touch_loop!("bench_pg_touch_empty");

// u32 switch(const u32 *tops, u32 k, u32 rounds): `rounds` times, for i in
// 0..k: [ops]; ticks. Registers: edi = tops, esi = i, ebp = rounds; k stays
// on the stack ([esp + 28] once the first reading is pushed).
macro_rules! switch_loop {
    ($name:literal, [$($op:literal),*] $(, $arg:ident = $val:expr)*) => {
        #[cfg(target_arch = "x86")]
        core::arch::global_asm!(
            ".pushsection .text.bench_pg,\"ax\",@progbits",
            concat!(".globl ", $name),
            concat!($name, ":"),
            "add esp, {po}",
            "push ebp",
            "push ebx",
            "push esi",
            "push edi",
            "mov edi, dword ptr [esp + 20]",
            "mov ebp, dword ptr [esp + 28]",
            "rdtsc",
            "push eax",
            "2:",
            "xor esi, esi",
            "3:",
            $($op,)*
            "inc esi",
            "cmp esi, dword ptr [esp + 28]",
            "jb 3b",
            "dec ebp",
            "jnz 2b",
            "rdtsc",
            "pop ecx",
            "sub eax, ecx",
            "pop edi",
            "pop esi",
            "pop ebx",
            "pop ebp",
            "sub esp, {po}",
            "ret",
            ".popsection",
            po = const PAGE_OFFSET,
            $($arg = const $val,)*
        );
    };
}

switch_loop!(
    "bench_pg_switch",
    [
        "mov eax, {nr}",
        "mov ebx, dword ptr [edi + esi * 4]",
        "int 0x1f"
    ],
    nr = LHCALL_NEW_PGTABLE
);
switch_loop!(
    "bench_pg_switch_touch",
    [
        "mov eax, {nr}",
        "mov ebx, dword ptr [edi + esi * 4]",
        "int 0x1f",
        "mov dword ptr [{va}], esi"
    ],
    nr = LHCALL_NEW_PGTABLE,
    va = TOUCH_VA
);
switch_loop!("bench_pg_switch_empty", []);

// void fork_run(u32 top, u32 back, u32 va, u32 n): NEW_PGTABLE(top), write
// each of n pages from va, NEW_PGTABLE(back).
#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    ".pushsection .text.bench_pg,\"ax\",@progbits",
    ".globl bench_pg_fork_run",
    "bench_pg_fork_run:",
    "add esp, {po}",
    "push ebx",
    "push esi",
    "mov eax, {nr}",
    "mov ebx, dword ptr [esp + 12]",
    "int 0x1f",
    "mov ecx, dword ptr [esp + 20]",
    "mov esi, dword ptr [esp + 24]",
    "2:",
    "mov dword ptr [ecx], esi",
    "add ecx, 4096",
    "dec esi",
    "jnz 2b",
    "mov eax, {nr}",
    "mov ebx, dword ptr [esp + 16]",
    "int 0x1f",
    "pop esi",
    "pop ebx",
    "sub esp, {po}",
    "ret",
    ".popsection",
    po = const PAGE_OFFSET,
    nr = const LHCALL_NEW_PGTABLE,
);
