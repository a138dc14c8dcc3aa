//! Host tasks: kernel threads, each on its own guarded stack, scheduled by
//! the pure policy in [`rustyvisor::sched`].
//!
//! [`spawn`] makes a task that runs `entry(arg)` on a fresh [`KernelStack`]
//! (a guard page below it: an overflow faults instead of corrupting
//! memory). [`run`], called once on the boot CPU's main stack, is the
//! scheduler loop: it asks the policy what runs next, switches to that task
//! until it yields, blocks or ends, and halts the CPU when nothing is
//! runnable (until the next timer deadline or interrupt), freeing each
//! task's stack when it ends; it returns when no task is left.
//!
//! # Preemption
//!
//! Every pick arms a one-shot timer at the end of the task's time slice
//! (`sched::SLICE_NS`, 4 ms, or an earlier deadline of the policy's). When
//! it fires, or when an interrupt wakes a task that should run before the
//! current one ([`wake`], [`signal`]), [`need_resched`] becomes true. A task
//! running a guest reaches a preemption point at every guest exit (every
//! host interrupt makes the guest exit, and the run loop returns
//! "interrupted" to its launcher, which yields). Host code between those
//! points is short and bounded (a launcher's handling of one exit, the
//! console's handling of a few bytes), so a guest that never exits on its
//! own still loses the CPU at its slice end: it cannot starve the others.
//! Host tasks themselves are not preempted in the middle of host code, like
//! a kernel without in-kernel preemption.
//!
//! # Blocking
//!
//! [`block`] puts the running task to sleep on a [`WaitOn`] (a halted
//! guest, an event counter, a deadline) and switches to the loop; [`wake`]
//! and [`signal`] (safe from interrupt context) make it runnable again.
//! A halted guest's launcher checks "nothing deliverable" and blocks with
//! interrupts off, so an irq raised in between is never a lost wake-up.
//!
//! # The switch
//!
//! [`switch_context`] saves the callee-saved registers on the current
//! stack, stores the stack pointer, loads the other one and pops that
//! context's registers; `ret` then resumes it. A new task's stack is laid
//! out so that its first switch "returns" into [`task_trampoline`] with the
//! entry point in r12 and its argument in r13. Everything else a Rust
//! function may clobber is the caller's to save under the SysV ABI, which
//! is exactly how `switch_context` is called (an ordinary `extern "C"`
//! call). Switches happen with interrupts off; each side restores its own
//! interrupt flag afterwards. Only the boot CPU runs tasks.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::naked_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustyvisor::sched::{self, Decision, Scheduler, Wait};
pub use rustyvisor::sched::{EventHandle, TaskId, WaitOn, WakeReason};
use x86_64::instructions::interrupts;

use super::mem::KernelStack;
use super::sync::IrqMutex;
use super::time;

extern crate alloc;

/// Pages of a task's stack: 24 KiB, twice the deepest a launcher went in
/// the test scenarios (about 12 KiB, shadow paging with fast paths; the
/// summary line reports the peak of every run), so that an interrupt
/// taken at that depth still has room.
pub const TASK_STACK_PAGES: u64 = 6;

/// A task's entry point; `arg` is what [`spawn`] was given.
pub type Entry = fn(arg: u64);

/// A task's context. Boxed, so the address of `rsp` stays put while the
/// map of tasks changes.
struct Ctx {
    /// Its name, for messages.
    name: String,
    /// Saved stack pointer while it is not running.
    rsp: u64,
    /// Its stack (freed by the scheduler loop once the task has ended).
    _stack: KernelStack,
    /// The task returned from its entry point.
    done: bool,
}

struct Tasks {
    policy: Scheduler,
    ctx: BTreeMap<TaskId, Box<Ctx>>,
    /// The running task, if one is.
    current: Option<TaskId>,
    /// The scheduler loop's saved stack pointer while a task runs.
    loop_rsp: u64,
    /// The timer armed for the current decision's end.
    timer: Option<time::TimerId>,
}

static TASKS: IrqMutex<Option<Tasks>> = IrqMutex::new(None);

/// The running task should give the CPU back at its next preemption point.
static NEED_RESCHED: AtomicBool = AtomicBool::new(false);

/// Tasks that ran to their end.
static FINISHED: AtomicU64 = AtomicU64::new(0);

/// What a fresh task stack is filled with, so that how deep a task went can
/// be read off its stack when it ends.
const STACK_PAINT: u64 = 0x2153_544b_2153_544b;

/// The deepest any ended task's stack went, in bytes.
static STACK_PEAK: AtomicU64 = AtomicU64::new(0);

/// The deepest any ended task's stack went, and the size of a task stack,
/// in bytes.
pub fn stack_peak() -> (u64, u64) {
    (
        STACK_PEAK.load(Ordering::Relaxed),
        TASK_STACK_PAGES * rustyvisor::mm::PAGE_SIZE,
    )
}

/// Bytes of `stack` a task wrote to: from the top down to the lowest word
/// that no longer holds [`STACK_PAINT`].
fn stack_used(stack: &KernelStack) -> u64 {
    let mut a = stack.bottom();
    while a < stack.top() {
        // SAFETY: `[bottom, top)` is the ended task's own mapped stack,
        // which nothing uses any more (it is about to be freed).
        if unsafe { (a as *const u64).read_volatile() } != STACK_PAINT {
            break;
        }
        a += 8;
    }
    stack.top() - a
}

/// Runs `f` on the task table (made on first use).
fn with<R>(f: impl FnOnce(&mut Tasks) -> R) -> R {
    let mut g = TASKS.lock();
    let t = g.get_or_insert_with(|| Tasks {
        policy: Scheduler::default(),
        ctx: BTreeMap::new(),
        current: None,
        loop_rsp: 0,
        timer: None,
    });
    f(t)
}

/// Why a task could not be made.
#[derive(Debug)]
pub struct NoStack;

/// Makes a runnable task that will run `entry(arg)`.
///
/// # Errors
///
/// [`NoStack`] when no stack can be allocated.
pub fn spawn(name: &str, entry: Entry, arg: u64) -> Result<TaskId, NoStack> {
    let stack = KernelStack::new(TASK_STACK_PAGES).ok_or(NoStack)?;
    let top = stack.top();
    let mut a = stack.bottom();
    while a < top {
        // SAFETY: `[bottom, top)` is the freshly mapped stack, owned by
        // this task, not yet used by anyone.
        unsafe { (a as *mut u64).write_volatile(STACK_PAINT) };
        a += 8;
    }
    // The first switch pops six callee-saved registers (r15 first) and
    // returns into the trampoline with RSP = top, 16-byte aligned, as a
    // function's caller leaves it.
    let frame: [u64; 7] = [
        0,                                   // r15
        0,                                   // r14
        arg,                                 // r13
        entry as usize as u64,               // r12
        0,                                   // rbp
        0,                                   // rbx
        task_trampoline as *const () as u64, // return address
    ];
    let rsp = top - 8 * frame.len() as u64;
    for (i, v) in frame.iter().enumerate() {
        // SAFETY: `[rsp, top)` is the top of the freshly mapped stack,
        // owned by this task, not yet used by anyone.
        unsafe { ((rsp + 8 * i as u64) as *mut u64).write(*v) };
    }
    let ctx = Box::new(Ctx {
        name: String::from(name),
        rsp,
        _stack: stack,
        done: false,
    });
    Ok(with(|t| {
        let id = t.policy.spawn(sched::DEFAULT_WEIGHT);
        t.ctx.insert(id, ctx);
        id
    }))
}

/// The running task (`None` on the loop's own stack).
pub fn current() -> Option<TaskId> {
    with(|t| t.current)
}

/// The name of the running task (`None` on the loop's own stack).
pub fn current_name() -> Option<String> {
    with(|t| {
        let id = t.current?;
        t.ctx.get(&id).map(|c| c.name.clone())
    })
}

/// Whether the running task should yield at its next preemption point
/// (its slice is over, or a task that must run first woke).
#[inline]
pub fn need_resched() -> bool {
    NEED_RESCHED.load(Ordering::Relaxed)
}

/// Switches from the running task to the scheduler loop; returns when the
/// task is picked again. `prepare` runs on the task table first, under its
/// lock, with the running task's id (e.g. to block it). Outside a task it
/// does nothing and returns `None`.
fn switch_to_loop(prepare: impl FnOnce(&mut Tasks, TaskId)) -> Option<TaskId> {
    let were = interrupts::are_enabled();
    interrupts::disable();
    let switch = with(|t| {
        let id = t.current?;
        prepare(t, id);
        let to = t.loop_rsp;
        let ctx = t.ctx.get_mut(&id)?;
        Some((id, &raw mut ctx.rsp, to))
    });
    let Some((id, save, to)) = switch else {
        if were {
            interrupts::enable();
        }
        return None;
    };
    // SAFETY: `save` points into the running task's boxed context, which
    // stays allocated while the task is suspended (the loop frees only
    // contexts of tasks that ended); `to` is the loop's context, saved by
    // its own switch into this task. Interrupts are off.
    unsafe { switch_context(save, to) };
    if were {
        interrupts::enable();
    }
    Some(id)
}

/// Gives the CPU back to the scheduler loop; the task stays runnable and
/// returns when its turn comes again. Outside a task it does nothing.
pub fn yield_now() {
    switch_to_loop(|_, _| {});
}

/// Blocks the running task on `on` until `deadline` at the latest, and
/// returns why it woke (`None` outside a task or if the policy refused the
/// wait, e.g. a sleep without deadline).
pub fn block(on: WaitOn, deadline: Option<u64>) -> Option<WakeReason> {
    let mut ok = false;
    let id = switch_to_loop(|t, id| {
        ok = t.policy.block(id, Wait { on, deadline }).is_ok();
    })?;
    if !ok {
        return None;
    }
    with(|t| t.policy.take_wake_reason(id))
}

/// Sleeps for `ns` nanoseconds (yields if 0).
pub fn sleep_ns(ns: u64) {
    block(
        WaitOn::Sleep,
        Some(time::now_ns().saturating_add(ns.max(1))),
    );
}

/// Makes `task` runnable if it is blocked (on anything: a halted guest's
/// interrupt, a kill). Safe from interrupt context.
pub fn wake(task: TaskId) {
    with(|t| {
        if t.policy.wake(task).unwrap_or(false) {
            check_resched(t);
        }
    });
}

/// A new event counter (eventfd-like).
pub fn new_event() -> EventHandle {
    with(|t| t.policy.new_event())
}

/// Closes an event; its waiters wake with `Closed`.
pub fn close_event(e: EventHandle) {
    with(|t| {
        let _ = t.policy.close_event(e);
    });
}

/// Adds `n` to an event's counter and wakes its waiters. Safe from
/// interrupt context.
pub fn signal(e: EventHandle, n: u64) {
    with(|t| {
        if t.policy.signal(e, n).unwrap_or(0) > 0 {
            check_resched(t);
        }
    });
}

/// Takes and clears an event's counter (0 if it is closed).
pub fn take_event(e: EventHandle) -> u64 {
    with(|t| t.policy.take_event(e).unwrap_or(0))
}

/// Waits until the event's counter is not zero, takes it and returns it
/// (0 if the event is closed or this is not a task).
pub fn wait_event(e: EventHandle) -> u64 {
    loop {
        match with(|t| t.policy.take_event(e)) {
            Ok(0) => {}
            Ok(n) => return n,
            Err(_) => return 0,
        }
        match block(WaitOn::Event(e), None) {
            Some(WakeReason::Closed) | None => return 0,
            Some(_) => {}
        }
    }
}

/// CPU time the task was charged, in nanoseconds.
pub fn cpu_ns(task: TaskId) -> u64 {
    with(|t| t.policy.cpu_ns(task).unwrap_or(0))
}

/// The policy's counters, the number of live tasks and of tasks waiting
/// for the CPU.
pub fn stats() -> (sched::Stats, usize, usize) {
    with(|t| (t.policy.stats(), t.ctx.len(), t.policy.runnable()))
}

fn check_resched(t: &Tasks) {
    if t.policy.need_resched(time::now_ns()) {
        NEED_RESCHED.store(true, Ordering::Relaxed);
    }
}

/// The decision timer: the slice ended or a deadline of the policy's
/// passed (a sleeping task's).
fn decision_timer(_: u64) {
    with(|t| {
        t.timer = None;
        t.policy.expire(time::now_ns());
        check_resched(t);
    });
}

/// Re-arms the decision timer for `until`.
fn arm_decision(t: &mut Tasks, until: Option<u64>) {
    if let Some(id) = t.timer.take() {
        time::cancel(id);
    }
    t.timer = until.map(|u| time::arm_at(u, decision_timer, 0));
}

/// The scheduler loop: runs tasks as the policy decides until none is left,
/// halting while nothing is runnable. Call on the boot CPU's main stack,
/// not from a task. Returns how many tasks ended.
pub fn run() -> u64 {
    let before = FINISHED.load(Ordering::Relaxed);
    loop {
        interrupts::disable();
        let mut finished: Vec<Box<Ctx>> = Vec::new();
        let next = with(|t| {
            t.current = None;
            // Tasks that ended: their stacks are no longer in use.
            let done: Vec<TaskId> = t
                .ctx
                .iter()
                .filter(|(_, c)| c.done)
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                if let Some(c) = t.ctx.remove(&id) {
                    finished.push(c);
                }
            }
            if t.ctx.is_empty() {
                arm_decision(t, None);
                return None;
            }
            match t.policy.pick_next(time::now_ns()) {
                Decision::Run { task, until } => {
                    let Some(to) = t.ctx.get(&task).map(|c| c.rsp) else {
                        // Cannot happen (both maps change together); drop
                        // the stray id rather than pick it forever.
                        let _ = t.policy.exit(task);
                        return Some(None);
                    };
                    NEED_RESCHED.store(false, Ordering::Relaxed);
                    arm_decision(t, Some(until));
                    t.current = Some(task);
                    Some(Some((&raw mut t.loop_rsp, to)))
                }
                Decision::Halt { until } => {
                    arm_decision(t, until);
                    Some(None)
                }
            }
        });
        // Stacks are freed outside the lock, after reading how deep they
        // went.
        for c in &finished {
            STACK_PEAK.fetch_max(stack_used(&c._stack), Ordering::Relaxed);
        }
        drop(finished);
        match next {
            None => break,
            Some(Some((save, to))) => {
                // SAFETY: `to` is a task's saved context (from `spawn` or its
                // last switch to the loop), on its own live stack; `save` is
                // the loop's slot, which the task's next switch back reads.
                // Interrupts are off.
                unsafe { switch_context(save, to) };
            }
            // Nothing runnable: sleep until an interrupt (`sti; hlt`
            // together, so a wake-up between the decision and the halt is
            // not lost).
            Some(None) => super::wait_for_interrupt(),
        }
    }
    interrupts::enable();
    FINISHED.load(Ordering::Relaxed) - before
}

/// Where a new task's first switch lands: calls `entry(arg)` (r12, r13)
/// and ends the task when it returns.
#[unsafe(naked)]
unsafe extern "C" fn task_trampoline() {
    naked_asm!(
        // The loop switches with interrupts off; a task runs with them on.
        "sti",
        "mov rdi, r13",
        "call r12",
        "call {exit}",
        "ud2",
        exit = sym task_exit,
    )
}

/// The end of a task: marks it done and switches to the scheduler loop for
/// good (the loop frees its stack; this frame is never resumed).
extern "C" fn task_exit() -> ! {
    interrupts::disable();
    let to = with(|t| {
        if let Some(id) = t.current {
            let _ = t.policy.exit(id);
            if let Some(c) = t.ctx.get_mut(&id) {
                c.done = true;
            }
        }
        t.loop_rsp
    });
    FINISHED.fetch_add(1, Ordering::Relaxed);
    let mut dead = 0u64;
    // SAFETY: `to` is the loop's context; `dead` is a throw-away slot for
    // this task's stack pointer, which nobody will load again.
    unsafe { switch_context(&raw mut dead, to) };
    unreachable!("a finished task was resumed");
}

/// Saves the callee-saved registers and the stack pointer into `*save`,
/// loads `to` and resumes the context saved there.
///
/// # Safety
///
/// `save` must be writable; `to` must be a stack pointer saved by this
/// function (or laid out by [`spawn`]) on a stack that is still mapped and
/// not in use.
#[unsafe(naked)]
unsafe extern "C" fn switch_context(save: *mut u64, to: u64) {
    naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "mov [rdi], rsp",
        "mov rsp, rsi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
    )
}
