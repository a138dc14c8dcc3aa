//! Self-tests chosen with `selftest=` on the command line. Each prints a
//! `selftest: ...` line that the integration tests match; the fault tests
//! deliberately crash to prove the diagnostic path.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use rustyvisor::config::{Config, SelfTest};
use rustyvisor::mm::PAGE_SIZE;

use super::bootinfo::BootInfo;
use super::mem::{self, phys_to_virt};
use super::time;
use crate::kprintln;

extern crate alloc;

mod channel;
pub use channel::channel;

/// Runs every self-test the command line asked for.
pub fn run(cfg: &Config, _boot: &BootInfo) {
    for t in cfg.selftests.iter() {
        match t {
            SelfTest::Memory => {
                frames();
                heap();
            }
            SelfTest::Timer => timer(),
            SelfTest::PageFault => page_fault(),
            SelfTest::Divide => divide(),
            SelfTest::Panic => panic!("selftest panic: deliberate"),
            // Needs the guest machinery: run by `entry_fault` after it is up.
            SelfTest::EntryFault => {}
            SelfTest::Tasks => tasks(),
            // Needs guests and the lguest CPU setup: run by `channel`.
            SelfTest::Channel => {}
        }
    }
}

/// `selftest=entryfault` (after the lguest CPU setup): a return into a
/// guest that the CPU refuses, on the exit fast path, in the hypercall stub
/// and in a reflection stub, comes back as the guest's trap 256, never as a
/// host exception.
pub fn entry_fault(cfg: &Config) {
    if !cfg.selftests.contains(SelfTest::EntryFault) {
        return;
    }
    match super::lguest::probe::entry_fault_selftest() {
        Ok([fast, stub, reflect]) => kprintln!(
            "selftest: entryfault ok (refused returns came back as trap 256: fast path fault {fast}, hypercall stub fault {stub}, reflection stub fault {reflect})"
        ),
        Err(e) => fail(format_args!("entryfault: {e}")),
    }
}

/// What the tasks of `selftest=tasks` did, in order: (task, step).
static TASK_TRACE: super::sync::IrqMutex<Vec<(u64, u64)>> = super::sync::IrqMutex::new(Vec::new());
/// The event the waiter task of `selftest=tasks` blocks on.
static TASK_EVENT: super::sync::IrqMutex<Option<rustyvisor::sched::EventHandle>> =
    super::sync::IrqMutex::new(None);
/// (what the waiter took from the event, ns the sleeper slept, whether
/// the spinner was told to yield).
static TASK_RESULTS: super::sync::IrqMutex<(u64, u64, bool)> =
    super::sync::IrqMutex::new((0, 0, false));

fn task_body(arg: u64) {
    // Task `arg` takes `arg + 2` steps (2, 3, 4), yielding after each.
    for step in 0..arg + 2 {
        if super::task::current_name().as_deref() != Some("selftest") {
            fail(format_args!("tasks: task {arg} does not know who it is"));
        }
        TASK_TRACE.lock().push((arg, step));
        super::task::yield_now();
    }
}

fn task_waiter(_: u64) {
    let Some(e) = *TASK_EVENT.lock() else {
        return;
    };
    let n = super::task::wait_event(e);
    TASK_RESULTS.lock().0 = n;
}

fn task_signaller(_: u64) {
    // Let the waiter block first.
    super::task::yield_now();
    if let Some(e) = *TASK_EVENT.lock() {
        super::task::signal(e, 5);
    }
}

fn task_sleeper(_: u64) {
    let t0 = time::now_ns();
    super::task::sleep_ns(2_000_000);
    TASK_RESULTS.lock().1 = time::now_ns() - t0;
}

fn task_spinner(_: u64) {
    // Never yields of its own accord: only the slice timer can tell it to.
    let give_up = time::now_ns() + 10_000_000_000;
    while !super::task::need_resched() && time::now_ns() < give_up {
        core::hint::spin_loop();
    }
    TASK_RESULTS.lock().2 = super::task::need_resched();
}

/// `selftest=tasks`: three tasks on their own stacks take turns (each step
/// a yield), each in its own order; a task blocked on an event wakes when
/// another signals it and takes the count; a sleeper sleeps at least its
/// time; a task that never yields is told to at its slice end; every stack
/// comes back.
fn tasks() {
    let (free_before, _, _) = mem::frame_counts();
    *TASK_EVENT.lock() = Some(super::task::new_event());
    let bodies: [(super::task::Entry, u64); 7] = [
        (task_body, 0),
        (task_body, 1),
        (task_body, 2),
        (task_waiter, 0),
        (task_signaller, 0),
        (task_sleeper, 0),
        (task_spinner, 0),
    ];
    for (entry, arg) in bodies {
        if super::task::spawn("selftest", entry, arg).is_err() {
            fail(format_args!("tasks: no stack for task {arg}"));
        }
    }
    let ended = super::task::run();
    if let Some(e) = TASK_EVENT.lock().take() {
        super::task::close_event(e);
    }
    let trace = core::mem::take(&mut *TASK_TRACE.lock());
    // Every task took its steps in order, and they took turns: no task
    // ran all its steps before another started.
    for task in 0..3u64 {
        let steps: Vec<u64> = trace
            .iter()
            .filter(|(t, _)| *t == task)
            .map(|(_, s)| *s)
            .collect();
        if steps != (0..task + 2).collect::<Vec<_>>() {
            fail(format_args!("tasks: task {task} took steps {steps:?}"));
        }
    }
    let first_of = |task: u64| trace.iter().position(|(t, _)| *t == task);
    let last_of = |task: u64| trace.iter().rposition(|(t, _)| *t == task);
    if !(0..3).all(|a| (0..3).all(|b| first_of(a) < last_of(b))) {
        fail(format_args!("tasks: no turns taken: {trace:?}"));
    }
    let (taken, slept, told) = *TASK_RESULTS.lock();
    if taken != 5 {
        fail(format_args!(
            "tasks: the waiter took {taken} from the event, expected 5"
        ));
    }
    if slept < 2_000_000 {
        fail(format_args!(
            "tasks: a 2 ms sleep returned after {slept} ns"
        ));
    }
    if !told {
        fail(format_args!(
            "tasks: a task that never yields was never preempted"
        ));
    }
    let (free_after, _, _) = mem::frame_counts();
    if ended != 7 || free_after != free_before {
        fail(format_args!(
            "tasks: {ended} of 7 ended, {} frames not returned",
            free_before.abs_diff(free_after)
        ));
    }
    kprintln!(
        "selftest: tasks ok (7 tasks: {} turns taken in order, an event, a sleep, a \
         preemption; every stack freed)",
        trace.len()
    );
}

fn fail(what: core::fmt::Arguments<'_>) -> ! {
    panic!("selftest failed: {what}");
}

/// Allocates many frames (all of them above 4 GiB, if any), checks they are
/// distinct and really usable RAM (pattern written and read back through the
/// direct map), frees them and checks the counts return to the baseline.
fn frames() {
    const COUNT: usize = 4096;
    let (free0, used0, managed) = mem::frame_counts();
    let mut got: Vec<u64> = Vec::with_capacity(COUNT);
    let mut above = 0u64;
    // Keep allocating until COUNT frames, or until one above 4 GiB shows up
    // when the machine has RAM there (bounded by the free count).
    let want_high = (free0 > 0) && summary_has_high();
    while got.len() < COUNT || (want_high && above == 0) {
        let Some(f) = mem::alloc_frame() else {
            break;
        };
        let pa = f.start_address();
        if pa >= 4 << 30 {
            above += 1;
        }
        got.push(pa);
        if got.len() as u64 >= free0 {
            break;
        }
    }
    let n = got.len() as u64;
    if n < (COUNT as u64).min(free0) {
        fail(format_args!(
            "only {n} of {free0} free frames could be allocated"
        ));
    }
    let (free1, used1, _) = mem::frame_counts();
    if free1 != free0 - n || used1 != used0 + n {
        fail(format_args!(
            "counts after alloc: free {free1} used {used1}, expected {} / {}",
            free0 - n,
            used0 + n
        ));
    }
    // Pattern check on a sample (every frame above 4 GiB, every 16th below).
    for (i, pa) in got.iter().enumerate() {
        if *pa >= 4 << 30 || i % 16 == 0 {
            let p = phys_to_virt(*pa) as *mut u64;
            let words = (PAGE_SIZE / 8) as usize;
            // SAFETY: the frame was just allocated to us and the direct map
            // covers all RAM.
            unsafe {
                for w in 0..words {
                    p.add(w).write_volatile(*pa ^ w as u64);
                }
                for w in 0..words {
                    if p.add(w).read_volatile() != *pa ^ w as u64 {
                        fail(format_args!("frame {pa:#x} does not hold a pattern"));
                    }
                }
            }
        }
    }
    got.sort_unstable();
    if got.windows(2).any(|w| w[0] == w[1]) {
        fail(format_args!("a frame was handed out twice"));
    }
    for pa in &got {
        match rustyvisor::mm::frame::PhysFrame::from_address(*pa) {
            Some(f) => mem::free_frame(f),
            None => fail(format_args!("unaligned frame {pa:#x}")),
        }
    }
    drop(got);
    let (free2, used2, _) = mem::frame_counts();
    if free2 != free0 || used2 != used0 {
        fail(format_args!(
            "counts did not return to baseline: free {free2} (was {free0}), used {used2} (was {used0})"
        ));
    }
    kprintln!("selftest: memory frames ok ({n} frames allocated and freed, {managed} managed)");
    if want_high {
        if above == 0 {
            fail(format_args!(
                "RAM above 4 GiB exists but no frame there was handed out"
            ));
        }
        kprintln!("selftest: memory above 4G ok ({above} frames above 4 GiB used)");
    }
}

fn summary_has_high() -> bool {
    let (_, _, managed) = mem::frame_counts();
    managed > 0 && mem::highest_frame_end() > (4 << 30)
}

/// Exercises the heap with many sizes, including one block larger than the
/// heap's current size (forcing it to grow), then checks usage returns to
/// the baseline.
fn heap() {
    let (used0, size0) = mem::heap_usage();
    let mut boxes: Vec<Box<[u8]>> = Vec::new();
    for i in 0..512usize {
        let len = 1 + (i * 37) % 3000;
        boxes.push(alloc::vec![(i & 0xFF) as u8; len].into_boxed_slice());
    }
    let big_len = size0 + (1 << 20);
    let big = alloc::vec![0xA5u8; big_len];
    for (i, b) in boxes.iter().enumerate() {
        if b.iter().any(|x| *x != (i & 0xFF) as u8) {
            fail(format_args!("heap block {i} was overwritten"));
        }
    }
    if big.iter().any(|x| *x != 0xA5) {
        fail(format_args!("large heap block was overwritten"));
    }
    let (_, size1) = mem::heap_usage();
    drop(big);
    drop(boxes);
    let (used2, _) = mem::heap_usage();
    if used2 != used0 {
        fail(format_args!(
            "heap usage {used2} after freeing, was {used0}"
        ));
    }
    kprintln!(
        "selftest: memory heap ok (grew from {} KiB to {} KiB, usage back to {used0} bytes)",
        size0 >> 10,
        size1 >> 10
    );
}

static FIRED: AtomicU64 = AtomicU64::new(0);
static ORDER: AtomicU64 = AtomicU64::new(0);

fn on_test_timer(arg: u64) {
    let n = FIRED.fetch_add(1, Ordering::SeqCst);
    // Record the firing order as base-16 digits.
    ORDER.fetch_or(arg << (4 * n), Ordering::SeqCst);
}

/// Arms three one-shot timers out of order and checks that they fire in
/// deadline order, not before their deadlines, while the CPU halts.
fn timer() {
    FIRED.store(0, Ordering::SeqCst);
    ORDER.store(0, Ordering::SeqCst);
    let start = time::now_ns();
    let plan = [(3_000_000u64, 3u64), (1_000_000, 1), (2_000_000, 2)];
    // All three are armed with interrupts off: under TCG on a loaded host the
    // CPU can stall for milliseconds between two instructions, and a timer
    // that expired before the next one was even armed would (correctly) fire
    // first. Armed together, they fire in deadline order however late.
    x86_64::instructions::interrupts::without_interrupts(|| {
        for (delay, id) in plan {
            time::arm_at(start + delay, on_test_timer, id);
        }
    });
    // Only catches a timer that never fires: a loaded host running this
    // under TCG can be slow, but not by seconds per millisecond.
    let give_up = start + 30_000_000_000;
    while FIRED.load(Ordering::SeqCst) < 3 {
        if time::now_ns() > give_up {
            fail(format_args!(
                "only {} of 3 timers fired within 30 s",
                FIRED.load(Ordering::SeqCst)
            ));
        }
        super::wait_for_interrupt();
    }
    let elapsed = time::now_ns() - start;
    let order = ORDER.load(Ordering::SeqCst);
    if order != 0x321 {
        fail(format_args!(
            "timers fired in order {order:#x}, expected 1,2,3"
        ));
    }
    if elapsed < 3_000_000 {
        fail(format_args!(
            "last timer fired after {elapsed} ns, before its 3 ms deadline"
        ));
    }
    kprintln!(
        "selftest: timer ok (3 one-shot timers fired in deadline order after {} us)",
        elapsed / 1000
    );
}

fn page_fault() {
    kprintln!("selftest: writing to unmapped address 0xdead0000");
    // SAFETY: not safe at all — this deliberately faults to exercise the
    // page-fault diagnostic; nothing is mapped at 0xdead0000.
    unsafe { (0xdead_0000 as *mut u64).write_volatile(0x1234) };
    fail(format_args!("write to an unmapped address did not fault"));
}

fn divide() {
    kprintln!("selftest: dividing by zero");
    // SAFETY: deliberately raises #DE (div by zero) to exercise the
    // diagnostic path; written in asm because Rust checks divisors.
    unsafe {
        core::arch::asm!(
            "xor ecx, ecx",
            "mov eax, 1",
            "xor edx, edx",
            "div ecx",
            out("eax") _, out("ecx") _, out("edx") _,
            options(nomem, nostack)
        );
    }
    fail(format_args!("division by zero did not fault"));
}
