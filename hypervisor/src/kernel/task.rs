//! Host tasks: kernel threads, each on its own guarded stack, switched
//! cooperatively.
//!
//! This is the mechanism the launcher tasks of the next milestone build on
//! (docs/design.md, "Host tasks"): [`spawn`] makes a task that runs
//! `entry(arg)` on a fresh [`KernelStack`] (a guard page below it: an
//! overflow faults instead of corrupting memory), [`yield_now`] gives the
//! CPU back to the scheduler loop, and [`run`] (called on the boot stack)
//! runs every task, one after the other in turn, until all have returned,
//! freeing each stack as its task ends. A guest's run loop is a natural
//! yield point: every host interrupt makes the guest exit to it, so a
//! time-slice timer is enough to take the CPU back from a guest that never
//! exits on its own; the policy (who runs next, for how long) is the pure
//! scheduler's.
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
//! call). Interrupts stay enabled: at every instruction of the switch the
//! stack pointer is a valid stack (the old or the new one), which is all an
//! interrupt taken there needs. Only the boot CPU runs tasks.

use alloc::vec::Vec;
use core::arch::naked_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use super::mem::KernelStack;
use super::sync::IrqMutex;

extern crate alloc;

/// Pages of a task's stack.
pub const TASK_STACK_PAGES: u64 = 4;

/// A task's entry point; `arg` is what [`spawn`] was given.
pub type Entry = fn(arg: u64);

struct Task {
    /// Its name, for messages.
    name: &'static str,
    /// Saved stack pointer while it is not running.
    rsp: u64,
    /// Its stack (freed by the scheduler loop once the task has ended).
    _stack: KernelStack,
    /// The task returned from its entry point.
    done: bool,
}

struct Sched {
    tasks: Vec<Task>,
    /// Index of the running task, if one is.
    current: Option<usize>,
    /// The scheduler loop's saved stack pointer while a task runs.
    loop_rsp: u64,
}

static SCHED: IrqMutex<Sched> = IrqMutex::new(Sched {
    tasks: Vec::new(),
    current: None,
    loop_rsp: 0,
});

/// Tasks that ran to their end.
static FINISHED: AtomicU64 = AtomicU64::new(0);

/// Why a task could not be made.
#[derive(Debug)]
pub struct NoStack;

/// Makes a task that will run `entry(arg)` once [`run`] gets to it.
///
/// # Errors
///
/// [`NoStack`] when no stack can be allocated.
pub fn spawn(name: &'static str, entry: Entry, arg: u64) -> Result<(), NoStack> {
    let stack = KernelStack::new(TASK_STACK_PAGES).ok_or(NoStack)?;
    let top = stack.top();
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
    SCHED.lock().tasks.push(Task {
        name,
        rsp,
        _stack: stack,
        done: false,
    });
    Ok(())
}

/// Gives the CPU back to the scheduler loop; returns when this task's turn
/// comes again. Outside a task (on the boot stack) it does nothing.
pub fn yield_now() {
    let (save, to) = {
        let mut s = SCHED.lock();
        let Some(i) = s.current else {
            return;
        };
        let to = s.loop_rsp;
        let Some(t) = s.tasks.get_mut(i) else {
            return;
        };
        (&raw mut t.rsp, to)
    };
    // SAFETY: `save` points into the running task's entry of the task list,
    // which the loop leaves in place while the task is suspended (it only
    // removes tasks that are done); `to` is the loop's context, saved by its
    // own switch into this task.
    unsafe { switch_context(save, to) };
}

/// The name of the running task (`None` on the boot stack).
pub fn current_name() -> Option<&'static str> {
    let s = SCHED.lock();
    s.current.and_then(|i| s.tasks.get(i)).map(|t| t.name)
}

/// Runs every task in turn (each until it yields or ends) until none is
/// left, freeing each stack when its task has ended. Call on the boot
/// stack, not from a task. Returns how many tasks ended.
pub fn run() -> u64 {
    let before = FINISHED.load(Ordering::Relaxed);
    let mut next = 0usize;
    loop {
        let (save, to) = {
            let mut s = SCHED.lock();
            s.tasks.retain(|t| !t.done);
            if s.tasks.is_empty() {
                s.current = None;
                break;
            }
            let i = next % s.tasks.len();
            next = i + 1;
            s.current = Some(i);
            let to = s.tasks.get(i).map_or(0, |t| t.rsp);
            (&raw mut s.loop_rsp, to)
        };
        // SAFETY: `to` is a task's saved context (from `spawn` or its last
        // `yield_now`), on its own live stack; `save` is the loop's slot,
        // which the task's next switch back reads.
        unsafe { switch_context(save, to) };
        let mut s = SCHED.lock();
        s.current = None;
        // A task that ended removed itself from the turn order: retry the
        // same index (the next task moved into it).
        if s.tasks.iter().any(|t| t.done) {
            next = next.saturating_sub(1);
        }
    }
    FINISHED.load(Ordering::Relaxed) - before
}

/// Where a new task's first switch lands: calls `entry(arg)` (r12, r13)
/// and ends the task when it returns.
#[unsafe(naked)]
unsafe extern "C" fn task_trampoline() {
    naked_asm!(
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
    let to = {
        let mut s = SCHED.lock();
        if let Some(t) = s.current.and_then(|i| s.tasks.get_mut(i)) {
            t.done = true;
        }
        s.loop_rsp
    };
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
