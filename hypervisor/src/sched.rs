//! The scheduling policy for host tasks (docs/design.md, "Founding
//! decisions", 4): which task runs next and for how long, wait queues,
//! eventfd-like event counters and deadline timers. Pure: the kernel owns the
//! stacks, the context switch, the APIC timer and `hlt`, and asks a
//! [`Scheduler`] for every decision.
//!
//! # Tasks
//!
//! A task is a launcher (one per guest, the guest runs inside its `read()`),
//! a device service loop, or anything else the kernel runs on its own stack.
//! Ids ([`TaskId`], the control channel's) are handed out by
//! [`Scheduler::spawn`] and never reused. The idle loop is *not* a task:
//! with nothing runnable [`Scheduler::pick_next`] answers
//! [`Decision::Halt`] and the kernel halts until that deadline or an
//! interrupt. There is no fixed cap on tasks, queues, events or timers:
//! everything lives in `alloc` B-trees, bounded by memory alone.
//!
//! A task is in exactly one state ([`State`]): *runnable* (in the run queue),
//! *running* (picked and not yet accounted, at most one) or *blocked* on a
//! [`Wait`]: a wait queue, an event counter, a sleep (deadline only) or a
//! halted guest (woken by [`Scheduler::wake`], e.g. when an interrupt is
//! raised for it), each with an optional deadline that wakes it with
//! [`WakeReason::Timeout`]. A blocked task is never picked and costs nothing.
//!
//! # Policy: weighted virtual runtime
//!
//! Each task has a weight (default [`DEFAULT_WEIGHT`], from [`MIN_WEIGHT`]
//! to [`MAX_WEIGHT`]) and a virtual runtime: the CPU time it was charged,
//! scaled by `DEFAULT_WEIGHT / weight`. The runnable task with the smallest
//! virtual runtime runs next (ties first-come first-served), for at most one
//! **time slice** ([`Config::slice_ns`], default [`SLICE_NS`] = 4 ms) or
//! until the next timer deadline, whichever is earlier. So over any stretch
//! in which a set of tasks stays runnable, each gets CPU time in proportion
//! to its weight, within a few slices; a task that never yields is preempted
//! at its slice end and cannot starve the others.
//!
//! A new task starts at the queue's minimum virtual runtime (it cannot
//! claim the CPU for the time before it existed). A waking task is placed at
//! no less than that minimum minus [`Config::wake_credit_ns`] (half a slice
//! by default): a task that slept keeps no bank of unused time, but an
//! interactive task that wakes, works briefly and sleeps again sorts before
//! the CPU-bound ones, so it runs at the latest when the running task's slice
//! ends — and at once if the kernel honours [`Scheduler::need_resched`]
//! (true when the woken task's virtual runtime is more than
//! [`Config::wake_granularity_ns`] behind the running task's).
//!
//! Virtual runtimes are saturating `u64` nanoseconds: at the default weight
//! they last 584 years, at [`MIN_WEIGHT`] (1/1024 of the default) about
//! seven months of that task's CPU time.
//!
//! # Event counters, wait queues, timers
//!
//! * An **event** ([`EventHandle`], eventfd-like) is a `u64` counter:
//!   [`Scheduler::signal`] adds to it (saturating) and wakes every waiter;
//!   [`Scheduler::take_event`] reads and clears it. Blocking on an event
//!   whose counter is not zero does not block (the task stays runnable with
//!   [`WakeReason::Event`]), so the loop "take; if 0, block; yield" never
//!   loses a signal. Control-channel `EVENTFD` bindings name these handles.
//! * A **wait queue** ([`QueueId`]) is a FIFO of blocked tasks:
//!   [`Scheduler::notify_one`] wakes the longest waiter,
//!   [`Scheduler::notify_all`] all of them.
//! * A **timer** is a deadline: either a blocked task's timeout (internal)
//!   or a token timer ([`Scheduler::arm`], e.g. a guest's `SET_CLOCKEVENT`),
//!   optionally owned by a task so that [`Scheduler::exit`] cancels it.
//!   Fired tokens queue up for [`Scheduler::take_fired`]. Timer ids are never
//!   reused, so a stale id cancels nothing.
//!
//! # How the kernel drives it
//!
//! One `Scheduler` per CPU behind an interrupt-safe lock; `now` is the
//! monotonic clock in nanoseconds.
//!
//! * **Scheduling point** (a task yields or blocks, the timer interrupt
//!   preempts it, or the idle loop wakes): call [`Scheduler::pick_next`]`(now)`.
//!   It charges the running task (`now` minus the time it was picked; call
//!   [`Scheduler::account`] first to charge a measured time instead), fires
//!   every expired timer, and answers [`Decision::Run`]`{ task, until }`:
//!   arm the APIC one-shot at `until` and switch to `task` — or
//!   [`Decision::Halt`]`{ until }`: arm it at `until` (if any) and `sti; hlt`,
//!   then pick again. Drain [`Scheduler::take_fired`] after every
//!   `pick_next` and [`Scheduler::expire`].
//! * **Blocking** (a task waits): [`Scheduler::block`] with the running
//!   task's id and what it waits on, then a scheduling point. A halting
//!   guest's launcher blocks on [`WaitOn::Halted`] with the guest's clock
//!   event as deadline.
//! * **Interrupts** (timer, serial, …): [`Scheduler::expire`]`(now)`,
//!   [`Scheduler::signal`] / [`Scheduler::wake`] / `notify_*` as the device
//!   requires, then [`Scheduler::need_resched`]`(now)`: if true, preempt the
//!   running task on the way out of the interrupt (for a guest: the channel's
//!   `read()` returns `Interrupted`, and the launcher reaches a scheduling
//!   point).
//! * **Exit**: [`Scheduler::exit`] removes the task from every queue and
//!   cancels its timers; then a scheduling point.

// Task, queue and event ids come from the kernel's callers: every index is a
// `get()`, every sum a checked or saturating operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use core::fmt;

pub use crate::lguest::chan::{EventHandle, TaskId};

/// The default time slice: 4 ms. Long enough that a context switch every
/// slice costs well under 1% of the CPU, short enough that an interactive
/// task next to a few CPU-bound guests answers within a few milliseconds.
pub const SLICE_NS: u64 = 4_000_000;
/// The default weight (Linux's nice-0 load weight).
pub const DEFAULT_WEIGHT: u32 = 1024;
/// The smallest weight: 1/1024 of the default share.
pub const MIN_WEIGHT: u32 = 1;
/// The largest weight: 64 times the default share.
pub const MAX_WEIGHT: u32 = 64 * DEFAULT_WEIGHT;

/// Tunables; [`Config::default`] is what the kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Longest a task runs before the scheduler decides again (at least 1).
    pub slice_ns: u64,
    /// How far behind the minimum virtual runtime a waking task is placed
    /// (at most; a task that used more keeps its own virtual runtime).
    pub wake_credit_ns: u64,
    /// How far a runnable task's virtual runtime must be behind the
    /// running one's before [`Scheduler::need_resched`] says preempt now.
    pub wake_granularity_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            slice_ns: SLICE_NS,
            wake_credit_ns: SLICE_NS / 2,
            wake_granularity_ns: 1_000_000,
        }
    }
}

/// A wait queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);

/// A pending timer; ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId {
    deadline: u64,
    seq: u64,
}

impl TimerId {
    /// When the timer fires (or fired).
    #[must_use]
    pub const fn deadline(self) -> u64 {
        self.deadline
    }
}

/// What a blocked task waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOn {
    /// A wait queue: woken by `notify_one`/`notify_all` (FIFO).
    Queue(QueueId),
    /// An event counter: woken by `signal`.
    Event(EventHandle),
    /// Only the deadline (which is then required).
    Sleep,
    /// A halted guest: woken by [`Scheduler::wake`] (an interrupt raised for
    /// it) or the deadline (its clock event).
    Halted,
}

/// A blocking wait: what for, and until when at the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// What wakes the task.
    pub on: WaitOn,
    /// Wakes it with [`WakeReason::Timeout`] at this time, if not earlier.
    pub deadline: Option<u64>,
}

/// Why a blocked task became runnable ([`Scheduler::take_wake_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeReason {
    /// [`Scheduler::wake`].
    Explicit,
    /// `notify_one` / `notify_all` on its queue.
    Queue,
    /// Its event was signalled (or already non-zero when it blocked).
    Event,
    /// Its deadline passed.
    Timeout,
    /// Its queue or event was closed.
    Closed,
}

/// A task's state, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the CPU.
    Runnable,
    /// Picked by the last [`Scheduler::pick_next`], not yet accounted.
    Running,
    /// Blocked; never picked until woken.
    Blocked(Wait),
}

/// What the CPU does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run `task` until `until` at the latest (its slice end, or an earlier
    /// timer deadline): arm the timer interrupt there.
    Run {
        /// The task to switch to.
        task: TaskId,
        /// Absolute time of the next forced scheduling point.
        until: u64,
    },
    /// Nothing is runnable: halt until the next interrupt, arming the timer
    /// for `until` (the next deadline) if there is one.
    Halt {
        /// The earliest pending timer deadline.
        until: Option<u64>,
    },
}

/// A refused scheduler call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedError {
    /// No live task has this id.
    NoSuchTask(TaskId),
    /// No such (open) wait queue.
    NoSuchQueue(QueueId),
    /// No such (open) event.
    NoSuchEvent(EventHandle),
    /// The task is already blocked.
    AlreadyBlocked(TaskId),
    /// [`WaitOn::Sleep`] without a deadline would never wake.
    NoDeadline,
}

impl fmt::Display for SchedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchTask(t) => write!(f, "no task {}", t.0),
            Self::NoSuchQueue(q) => write!(f, "no wait queue {}", q.0),
            Self::NoSuchEvent(e) => write!(f, "no event {}", e.0),
            Self::AlreadyBlocked(t) => write!(f, "task {} is already blocked", t.0),
            Self::NoDeadline => f.write_str("a sleep needs a deadline"),
        }
    }
}

/// Counters for the console's `stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `Run` decisions that switched to a different task than the last one.
    pub switches: u64,
    /// `Halt` decisions.
    pub halts: u64,
    /// Tasks spawned.
    pub spawned: u64,
    /// Tasks exited.
    pub exited: u64,
    /// Timers fired (task timeouts and tokens).
    pub timers_fired: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TState {
    /// In the run queue under this key.
    Runnable(RunKey),
    Running,
    /// `waiter` is the key in the queue's or event's waiter list.
    Blocked {
        wait: Wait,
        waiter: u64,
        timer: Option<TimerId>,
    },
}

/// Run-queue order: virtual runtime, then enqueue order.
type RunKey = (u64, u64);

#[derive(Debug, Clone)]
struct Task {
    weight: u32,
    vruntime: u64,
    cpu_ns: u64,
    state: TState,
    wake: Option<WakeReason>,
    /// Token timers this task owns (cancelled on exit).
    owned: BTreeSet<TimerId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    /// A blocked task's deadline.
    Wake(TaskId),
    /// A token timer for the caller.
    Token { token: u64, owner: Option<TaskId> },
}

#[derive(Debug, Clone, Default)]
struct Event {
    count: u64,
    waiters: BTreeMap<u64, TaskId>,
}

/// The scheduler of one CPU; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: Config,
    tasks: BTreeMap<TaskId, Task>,
    runq: BTreeMap<RunKey, TaskId>,
    /// The running task and when it was picked.
    current: Option<(TaskId, u64)>,
    last_run: Option<TaskId>,
    min_vruntime: u64,
    timers: BTreeMap<TimerId, TimerKind>,
    fired: VecDeque<(TimerId, u64)>,
    events: BTreeMap<EventHandle, Event>,
    queues: BTreeMap<QueueId, BTreeMap<u64, TaskId>>,
    next_id: u64,
    next_seq: u64,
    stats: Stats,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

/// `ran_ns` in virtual time for `weight`: `ran_ns * DEFAULT_WEIGHT / weight`.
fn charge(ran_ns: u64, weight: u32) -> u64 {
    u128::from(ran_ns)
        .saturating_mul(u128::from(DEFAULT_WEIGHT))
        .checked_div(u128::from(weight.max(MIN_WEIGHT)))
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(u64::MAX)
}

impl Scheduler {
    /// An empty scheduler (`slice_ns` 0 is taken as 1).
    #[must_use]
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg: Config {
                slice_ns: cfg.slice_ns.max(1),
                ..cfg
            },
            tasks: BTreeMap::new(),
            runq: BTreeMap::new(),
            current: None,
            last_run: None,
            min_vruntime: 0,
            timers: BTreeMap::new(),
            fired: VecDeque::new(),
            events: BTreeMap::new(),
            queues: BTreeMap::new(),
            next_id: 1,
            next_seq: 0,
            stats: Stats::default(),
        }
    }

    /// The configuration in use.
    #[must_use]
    pub const fn config(&self) -> Config {
        self.cfg
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        s
    }

    fn id(&mut self) -> u64 {
        let s = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        s
    }

    fn task_mut(&mut self, task: TaskId) -> Result<&mut Task, SchedError> {
        self.tasks
            .get_mut(&task)
            .ok_or(SchedError::NoSuchTask(task))
    }

    /// Puts `task` (whose state is about to become runnable) in the run queue.
    fn enqueue(&mut self, task: TaskId) {
        let seq = self.seq();
        if let Some(t) = self.tasks.get_mut(&task) {
            let key = (t.vruntime, seq);
            t.state = TState::Runnable(key);
            self.runq.insert(key, task);
        }
    }

    fn update_min_vruntime(&mut self) {
        let cur = self
            .current
            .and_then(|(id, _)| self.tasks.get(&id))
            .filter(|t| t.state == TState::Running)
            .map(|t| t.vruntime);
        let queued = self.runq.keys().next().map(|k| k.0);
        let min = match (cur, queued) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(v) => v,
                None => return,
            },
        };
        self.min_vruntime = self.min_vruntime.max(min);
    }

    /// A new runnable task of `weight` (clamped to
    /// [`MIN_WEIGHT`]..=[`MAX_WEIGHT`]).
    pub fn spawn(&mut self, weight: u32) -> TaskId {
        let id = TaskId(self.id());
        self.tasks.insert(
            id,
            Task {
                weight: weight.clamp(MIN_WEIGHT, MAX_WEIGHT),
                vruntime: self.min_vruntime,
                cpu_ns: 0,
                state: TState::Running,
                wake: None,
                owned: BTreeSet::new(),
            },
        );
        self.enqueue(id);
        self.stats.spawned = self.stats.spawned.saturating_add(1);
        id
    }

    /// Changes a task's weight (clamped), from its next charge on.
    pub fn set_weight(&mut self, task: TaskId, weight: u32) -> Result<(), SchedError> {
        self.task_mut(task)?.weight = weight.clamp(MIN_WEIGHT, MAX_WEIGHT);
        Ok(())
    }

    /// Charges `task` for `ran_ns` of CPU time. If it is the running task,
    /// it stops running: back in the run queue, or still blocked if it
    /// blocked meanwhile. [`Self::pick_next`] does this itself for a task
    /// not yet accounted.
    pub fn account(&mut self, task: TaskId, ran_ns: u64) -> Result<(), SchedError> {
        let t = self.task_mut(task)?;
        t.vruntime = t.vruntime.saturating_add(charge(ran_ns, t.weight));
        t.cpu_ns = t.cpu_ns.saturating_add(ran_ns);
        let running = t.state == TState::Running;
        if let TState::Runnable(key) = t.state {
            // Charged while queued (e.g. time measured late): re-key it.
            self.runq.remove(&key);
            self.enqueue(task);
        }
        if self.current.is_some_and(|(id, _)| id == task) {
            self.current = None;
            if running {
                self.enqueue(task);
            }
        }
        self.update_min_vruntime();
        Ok(())
    }

    /// Decides what runs next at `now`: charges the running task (if
    /// [`Self::account`] did not), fires the expired timers, and picks the
    /// runnable task with the smallest virtual runtime for one slice (or to
    /// the next deadline).
    pub fn pick_next(&mut self, now: u64) -> Decision {
        if let Some((id, since)) = self.current {
            // The task exists: exit clears `current`.
            let _ = self.account(id, now.saturating_sub(since));
        }
        self.expire(now);
        let Some((_, task)) = self.runq.pop_first() else {
            self.stats.halts = self.stats.halts.saturating_add(1);
            self.last_run = None;
            return Decision::Halt {
                until: self.next_deadline(),
            };
        };
        if let Some(t) = self.tasks.get_mut(&task) {
            t.state = TState::Running;
        }
        self.current = Some((task, now));
        if self.last_run != Some(task) {
            self.stats.switches = self.stats.switches.saturating_add(1);
        }
        self.last_run = Some(task);
        self.update_min_vruntime();
        let slice_end = now.saturating_add(self.cfg.slice_ns);
        let until = self.next_deadline().map_or(slice_end, |d| d.min(slice_end));
        Decision::Run { task, until }
    }

    /// Whether the running task should be preempted now: its slice is over,
    /// or a runnable task's virtual runtime is more than
    /// [`Config::wake_granularity_ns`] behind its own (counting the time it
    /// has run since it was picked). With nothing running: whether anything
    /// is runnable (leave the halt loop).
    #[must_use]
    pub fn need_resched(&self, now: u64) -> bool {
        let Some(first) = self.runq.keys().next().map(|k| k.0) else {
            return false;
        };
        let Some((id, since)) = self.current else {
            return true;
        };
        let Some(t) = self.tasks.get(&id) else {
            return true;
        };
        let ran = now.saturating_sub(since);
        if ran >= self.cfg.slice_ns || t.state != TState::Running {
            return true;
        }
        let v = t.vruntime.saturating_add(charge(ran, t.weight));
        first.saturating_add(self.cfg.wake_granularity_ns) < v
    }

    /// Blocks `task` (running or runnable) on `wait`. On an event whose
    /// counter is not zero it does not block: the task stays as it is, with
    /// [`WakeReason::Event`].
    pub fn block(&mut self, task: TaskId, wait: Wait) -> Result<(), SchedError> {
        let state = self
            .tasks
            .get(&task)
            .ok_or(SchedError::NoSuchTask(task))?
            .state;
        if matches!(state, TState::Blocked { .. }) {
            return Err(SchedError::AlreadyBlocked(task));
        }
        let waiter = self.seq();
        match wait.on {
            WaitOn::Queue(q) => {
                self.queues
                    .get_mut(&q)
                    .ok_or(SchedError::NoSuchQueue(q))?
                    .insert(waiter, task);
            }
            WaitOn::Event(e) => {
                let ev = self.events.get_mut(&e).ok_or(SchedError::NoSuchEvent(e))?;
                if ev.count != 0 {
                    self.task_mut(task)?.wake = Some(WakeReason::Event);
                    return Ok(());
                }
                ev.waiters.insert(waiter, task);
            }
            WaitOn::Sleep if wait.deadline.is_none() => return Err(SchedError::NoDeadline),
            WaitOn::Sleep | WaitOn::Halted => {}
        }
        let timer = wait.deadline.map(|deadline| {
            let id = TimerId {
                deadline,
                seq: self.seq(),
            };
            self.timers.insert(id, TimerKind::Wake(task));
            id
        });
        if let TState::Runnable(key) = state {
            self.runq.remove(&key);
        }
        let t = self.task_mut(task)?;
        t.state = TState::Blocked {
            wait,
            waiter,
            timer,
        };
        t.wake = None;
        self.update_min_vruntime();
        Ok(())
    }

    /// Takes a blocked task's entry out of what it waited on: its waiter
    /// list and its timeout.
    fn forget_wait(&mut self, wait: Wait, waiter: u64, timer: Option<TimerId>) {
        match wait.on {
            WaitOn::Queue(q) => {
                if let Some(w) = self.queues.get_mut(&q) {
                    w.remove(&waiter);
                }
            }
            WaitOn::Event(e) => {
                if let Some(ev) = self.events.get_mut(&e) {
                    ev.waiters.remove(&waiter);
                }
            }
            WaitOn::Sleep | WaitOn::Halted => {}
        }
        if let Some(id) = timer {
            self.timers.remove(&id);
        }
    }

    /// Makes a blocked task runnable for `reason`: out of its waiter list,
    /// its timeout cancelled, its virtual runtime raised to at least the
    /// minimum minus the wake credit. `false` if it was not blocked.
    fn unblock(&mut self, task: TaskId, reason: WakeReason) -> bool {
        let floor = self.min_vruntime.saturating_sub(self.cfg.wake_credit_ns);
        let Some(t) = self.tasks.get_mut(&task) else {
            return false;
        };
        let TState::Blocked {
            wait,
            waiter,
            timer,
        } = t.state
        else {
            return false;
        };
        t.vruntime = t.vruntime.max(floor);
        t.wake = Some(reason);
        self.forget_wait(wait, waiter, timer);
        if self.current.is_some_and(|(id, _)| id == task) {
            // Blocked while still running (not yet accounted): it just keeps
            // running; accounting puts it back in the run queue.
            if let Some(t) = self.tasks.get_mut(&task) {
                t.state = TState::Running;
            }
        } else {
            self.enqueue(task);
        }
        true
    }

    /// Wakes a blocked task (whatever it waits on) with
    /// [`WakeReason::Explicit`]: a halted guest's interrupt, a kill.
    /// `Ok(false)` if it was not blocked (harmless: wakes may race).
    pub fn wake(&mut self, task: TaskId) -> Result<bool, SchedError> {
        if !self.tasks.contains_key(&task) {
            return Err(SchedError::NoSuchTask(task));
        }
        Ok(self.unblock(task, WakeReason::Explicit))
    }

    /// Why `task` last became runnable (taken: later calls answer `None`
    /// until it blocks and wakes again).
    pub fn take_wake_reason(&mut self, task: TaskId) -> Option<WakeReason> {
        self.tasks.get_mut(&task).and_then(|t| t.wake.take())
    }

    /// Removes `task` from everything: the run queue, its waiter list, its
    /// timeout and every token timer it owns. If it was running, nothing
    /// runs until the next [`Self::pick_next`].
    pub fn exit(&mut self, task: TaskId) -> Result<(), SchedError> {
        let t = self
            .tasks
            .remove(&task)
            .ok_or(SchedError::NoSuchTask(task))?;
        match t.state {
            TState::Runnable(key) => {
                self.runq.remove(&key);
            }
            TState::Running => {}
            TState::Blocked {
                wait,
                waiter,
                timer,
            } => {
                self.forget_wait(wait, waiter, timer);
            }
        }
        for id in &t.owned {
            self.timers.remove(id);
        }
        if self.current.is_some_and(|(id, _)| id == task) {
            self.current = None;
        }
        if self.last_run == Some(task) {
            self.last_run = None;
        }
        self.stats.exited = self.stats.exited.saturating_add(1);
        self.update_min_vruntime();
        Ok(())
    }

    /// A new event counter at 0.
    pub fn new_event(&mut self) -> EventHandle {
        let e = EventHandle(self.id());
        self.events.insert(e, Event::default());
        e
    }

    /// Adds `n` to the event's counter (saturating) and, if it is not zero,
    /// wakes every waiter. Returns how many tasks it woke.
    pub fn signal(&mut self, event: EventHandle, n: u64) -> Result<usize, SchedError> {
        let ev = self
            .events
            .get_mut(&event)
            .ok_or(SchedError::NoSuchEvent(event))?;
        ev.count = ev.count.saturating_add(n);
        if ev.count == 0 {
            return Ok(0);
        }
        let waiters = core::mem::take(&mut ev.waiters);
        Ok(waiters
            .values()
            .filter(|&&t| self.unblock(t, WakeReason::Event))
            .count())
    }

    /// Reads and clears the event's counter (eventfd `read`).
    pub fn take_event(&mut self, event: EventHandle) -> Result<u64, SchedError> {
        let ev = self
            .events
            .get_mut(&event)
            .ok_or(SchedError::NoSuchEvent(event))?;
        Ok(core::mem::take(&mut ev.count))
    }

    /// Closes an event: its waiters wake with [`WakeReason::Closed`] and
    /// the handle is refused from now on. Returns how many woke.
    pub fn close_event(&mut self, event: EventHandle) -> Result<usize, SchedError> {
        let ev = self
            .events
            .remove(&event)
            .ok_or(SchedError::NoSuchEvent(event))?;
        Ok(ev
            .waiters
            .values()
            .filter(|&&t| self.unblock(t, WakeReason::Closed))
            .count())
    }

    /// A new, empty wait queue.
    pub fn new_queue(&mut self) -> QueueId {
        let q = QueueId(self.id());
        self.queues.insert(q, BTreeMap::new());
        q
    }

    /// Wakes the longest waiter of `queue`, if any.
    pub fn notify_one(&mut self, queue: QueueId) -> Result<Option<TaskId>, SchedError> {
        let w = self
            .queues
            .get_mut(&queue)
            .ok_or(SchedError::NoSuchQueue(queue))?;
        let Some((_, task)) = w.pop_first() else {
            return Ok(None);
        };
        Ok(self.unblock(task, WakeReason::Queue).then_some(task))
    }

    /// Wakes every waiter of `queue`; returns how many.
    pub fn notify_all(&mut self, queue: QueueId) -> Result<usize, SchedError> {
        let w = self
            .queues
            .get_mut(&queue)
            .ok_or(SchedError::NoSuchQueue(queue))?;
        let waiters = core::mem::take(w);
        Ok(waiters
            .values()
            .filter(|&&t| self.unblock(t, WakeReason::Queue))
            .count())
    }

    /// Closes a wait queue: its waiters wake with [`WakeReason::Closed`].
    pub fn close_queue(&mut self, queue: QueueId) -> Result<usize, SchedError> {
        let w = self
            .queues
            .remove(&queue)
            .ok_or(SchedError::NoSuchQueue(queue))?;
        Ok(w.values()
            .filter(|&&t| self.unblock(t, WakeReason::Closed))
            .count())
    }

    /// A token timer at `deadline`; when it fires, `(id, token)` is queued
    /// for [`Self::take_fired`]. An `owner` (which must exist) cancels it
    /// by exiting.
    pub fn arm(
        &mut self,
        deadline: u64,
        token: u64,
        owner: Option<TaskId>,
    ) -> Result<TimerId, SchedError> {
        if let Some(o) = owner
            && !self.tasks.contains_key(&o)
        {
            return Err(SchedError::NoSuchTask(o));
        }
        let id = TimerId {
            deadline,
            seq: self.seq(),
        };
        if let Some(o) = owner.and_then(|o| self.tasks.get_mut(&o)) {
            o.owned.insert(id);
        }
        self.timers.insert(id, TimerKind::Token { token, owner });
        Ok(id)
    }

    /// Cancels a token timer; `false` if it fired, was cancelled, or is a
    /// task's timeout (those go with their wait).
    pub fn cancel(&mut self, id: TimerId) -> bool {
        match self.timers.get(&id) {
            Some(&TimerKind::Token { owner, .. }) => {
                self.timers.remove(&id);
                if let Some(o) = owner.and_then(|o| self.tasks.get_mut(&o)) {
                    o.owned.remove(&id);
                }
                true
            }
            _ => false,
        }
    }

    /// Whether a token timer is still pending.
    #[must_use]
    pub fn is_pending(&self, id: TimerId) -> bool {
        matches!(self.timers.get(&id), Some(TimerKind::Token { .. }))
    }

    /// Fires every timer due at `now` (deadline ≤ now), earliest first:
    /// a blocked task's timeout wakes it with [`WakeReason::Timeout`], a
    /// token timer is queued for [`Self::take_fired`]. Returns how many
    /// fired.
    pub fn expire(&mut self, now: u64) -> usize {
        let mut n: usize = 0;
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().deadline > now {
                break;
            }
            let (id, kind) = entry.remove_entry();
            match kind {
                TimerKind::Wake(task) => {
                    self.unblock(task, WakeReason::Timeout);
                }
                TimerKind::Token { token, owner } => {
                    if let Some(o) = owner.and_then(|o| self.tasks.get_mut(&o)) {
                        o.owned.remove(&id);
                    }
                    self.fired.push_back((id, token));
                }
            }
            n = n.saturating_add(1);
        }
        self.stats.timers_fired = self.stats.timers_fired.saturating_add(n as u64);
        n
    }

    /// The next fired token timer, in firing order.
    pub fn take_fired(&mut self) -> Option<(TimerId, u64)> {
        self.fired.pop_front()
    }

    /// The earliest pending deadline (timeouts and token timers).
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.keys().next().map(|id| id.deadline)
    }

    /// A task's state; `None` if it does not exist (never spawned, or
    /// exited).
    #[must_use]
    pub fn state(&self, task: TaskId) -> Option<State> {
        self.tasks.get(&task).map(|t| match t.state {
            TState::Runnable(_) => State::Runnable,
            TState::Running => State::Running,
            TState::Blocked { wait, .. } => State::Blocked(wait),
        })
    }

    /// CPU time charged to `task` so far.
    #[must_use]
    pub fn cpu_ns(&self, task: TaskId) -> Option<u64> {
        self.tasks.get(&task).map(|t| t.cpu_ns)
    }

    /// The running task (picked, not yet accounted).
    #[must_use]
    pub fn current(&self) -> Option<TaskId> {
        self.current.map(|(id, _)| id)
    }

    /// Live tasks, in id order.
    pub fn tasks(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks.keys().copied()
    }

    /// Number of live tasks.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is alive.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Number of tasks waiting for the CPU (not counting the running one).
    #[must_use]
    pub fn runnable(&self) -> usize {
        self.runq.len()
    }

    /// The counters.
    #[must_use]
    pub const fn stats(&self) -> Stats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
