//! The control channel: `/dev/lguest` semantics (lguest ABI era E4) over a
//! guest core.
//!
//! A [`Channel`] is the one object a launcher task holds per guest. It
//! implements the request protocol and all of its error cases; the actual
//! guest (hypercalls, traps, shadow paging, the world switch) sits behind the
//! [`GuestCore`] trait, so this file is pure and tested against a fake core.
//!
//! # `write(caller, words)`
//!
//! `words[0]` is the request ([`LhReq`]), the rest its payload. Checks run in
//! this order (Linux's order):
//!
//! 1. empty `words` ⇒ `EINVAL`;
//! 2. any request other than `INITIALIZE` before a successful `INITIALIZE`
//!    ⇒ `EINVAL` (unknown request numbers included);
//! 3. guest dead (killed, powered off or restarting) ⇒ `ENOENT`;
//! 4. per request:
//!
//! | Request | Payload | Result | Errors |
//! |---|---|---|---|
//! | `INITIALIZE` | base, pfnlimit, start | `Ok(24)` = [`INITIALIZE_RESULT`], the payload bytes consumed | `EBUSY` already initialised; `EPERM` caller ≠ owner; `EINVAL` < 3 payload words; the core's error (`ENOMEM`, `EFAULT`, `EINVAL`) — the channel then stays uninitialised and `INITIALIZE` may be retried |
//! | `GETDMA` | – | – | always `EINVAL` (E0-only request) |
//! | `IRQ` | irq | `Ok(0)` | `EINVAL` if missing or irq ≥ 32 |
//! | `BREAK` | 1 or 0 | `Ok(0)` | `EINVAL` if missing or not 0/1 |
//! | `EVENTFD` | addr, handle | `Ok(0)` | `EINVAL` if missing, addr = 0 or addr ≥ 2³²; the core's error (`EBADF`, `ENOSPC`, `ENOMEM`) |
//! | other | | | `EINVAL` |
//!
//! Payload words beyond what a request needs are ignored. `IRQ`, `BREAK` and
//! `EVENTFD` may come from any task (device service tasks raise their own
//! interrupts); only `INITIALIZE` and `read` are reserved to the owner.
//!
//! `BREAK`: upstream's E0–E3 `BREAK` blocked the writer until the launcher
//! released it; E4 dropped the request. We keep a non-blocking form:
//! `BREAK 1` makes the owner's next `read` return `EAGAIN` once, without
//! running the guest; `BREAK 0` withdraws a break that no `read` has
//! consumed yet. A core that learns of a break while the guest runs (an
//! "ongoing" read) reports [`RunExit::Break`], which also yields `EAGAIN`
//! and consumes any pending break.
//!
//! # `read(caller, buf)`
//!
//! | Condition (checked in this order) | Result |
//! |---|---|
//! | not initialised | `EINVAL` |
//! | caller ≠ owner | `EPERM` |
//! | guest dead with a reason | `ENOENT` (every time; fetch the text with [`Channel::read_reason`]) |
//! | guest asked for a restart | `ERESTART` (every time) |
//! | `buf.len() < 4` | `EINVAL` (checked before running, so a notify is never lost) |
//! | a `BREAK 1` is pending | `EAGAIN`, break consumed, guest not run |
//! | core: [`RunExit::Notify`]`(addr)` | `Ok(4)`, `buf[..4]` = addr little-endian |
//! | core: [`RunExit::Break`] | `EAGAIN` |
//! | core: [`RunExit::Dead`]`(reason)` | `ENOENT`; the channel is dead from now on |
//! | core: [`RunExit::Restart`] | `ERESTART`; the channel is dead from now on |
//! | core: [`RunExit::Interrupted`] | `EINTR`; the guest stays runnable |
//!
//! Only the first death counts: once dead, the core is never run again.
//!
//! # `close`
//!
//! Consumes the channel and calls [`GuestCore::release`] exactly once —
//! whether or not the guest was ever initialised. Dropping a channel does the
//! same.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use core::fmt;

use crate::fixedstr::FixedStr;
use guest_abi::lhreq::{DEATH_REASON_MAX, INITIALIZE_RESULT, NOTIFY_READ_LEN};
use guest_abi::{Errno, LGUEST_IRQS, LhReq};

use super::guestmem::MAX_GUEST_MEM;

/// Guest page size (`pfnlimit` counts these).
const GUEST_PAGE_SIZE: u64 = guest_abi::PAGE_SIZE as u64;

/// Identifies a host task (the launcher, a device service task, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

/// An event object a notify address can be bound to (our eventfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventHandle(pub u64);

/// Why a guest died: a UTF-8 string of at most [`DEATH_REASON_MAX`] (1023)
/// bytes, stored inline so that recording a death never allocates.
///
/// Build it with [`FixedStr::new`], [`FixedStr::format`] (for lguest's
/// printf-style kill strings, e.g.
/// `DeathReason::format(format_args!("bad read address {addr:#x} len {len}"))`)
/// or by `write!`ing into [`FixedStr::empty`]. Longer text is silently
/// truncated at a character boundary.
pub type DeathReason = FixedStr<DEATH_REASON_MAX>;

/// Why [`GuestCore::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "the reason is inline so killing a guest never allocates; the callee writes the \
              return slot in place, so the common Notify exit copies no more than a Box would"
)]
pub enum RunExit {
    /// The guest issued `LHCALL_NOTIFY` with this guest-physical address and
    /// no event handle is bound to it.
    Notify(u32),
    /// A break was requested while the guest ran.
    Break,
    /// The guest was killed or powered off (`LHCALL_SHUTDOWN` reason 1 gives
    /// `"power off: <message>"`, see `Vcpu::dead_reason`).
    Dead(DeathReason),
    /// The guest asked to be restarted (`LHCALL_SHUTDOWN` reason 2).
    Restart,
    /// The owner task must stop running the guest for now (our "signal
    /// pending"); the guest stays runnable.
    Interrupted,
}

/// The guest engine behind a [`Channel`].
///
/// The channel guarantees: [`initialize`](GuestCore::initialize) is called
/// only while uninitialised and only from the owner; [`run`](GuestCore::run),
/// [`set_irq`](GuestCore::set_irq) (with `irq < 32`) and
/// [`set_eventfd`](GuestCore::set_eventfd) (with `0 < addr < 2³²`) only after
/// a successful `initialize` and before the guest died; `run` never again
/// after it returned [`RunExit::Dead`] or [`RunExit::Restart`];
/// [`release`](GuestCore::release) exactly once, last.
pub trait GuestCore {
    /// What a successful `INITIALIZE` produced (kept by the channel, see
    /// [`Channel::init`]); `()` if the core keeps everything itself.
    type Init;

    /// `LHREQ_INITIALIZE`: guest-physical 0 is at host address `base`, guest
    /// memory spans `pfnlimit` pages, execution starts at `start`.
    /// Errors: `ENOMEM`, `EFAULT`, `EINVAL`.
    fn initialize(&mut self, base: u64, pfnlimit: u64, start: u64) -> Result<Self::Init, Errno>;

    /// Run the guest in the calling task (`owner`) until something the
    /// launcher must see happens.
    fn run(&mut self, owner: TaskId) -> RunExit;

    /// `LHREQ_IRQ`: mark virtual irq `irq` (< 32) pending and wake the guest.
    fn set_irq(&mut self, irq: u32);

    /// `LHREQ_EVENTFD`: a later `LHCALL_NOTIFY(addr)` signals `fd` instead of
    /// returning to the launcher. Errors: `EBADF`, `ENOSPC`, `ENOMEM`.
    fn set_eventfd(&mut self, addr: u64, fd: EventHandle) -> Result<(), Errno>;

    /// `close()`: free everything the guest holds.
    fn release(&mut self);
}

/// What a core can accept for `LHREQ_INITIALIZE` (see [`check_initialize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitLimits {
    /// Largest guest memory (RAM plus device pages) in bytes; at most
    /// [`MAX_GUEST_MEM`], so every guest-physical address fits a `u32`.
    pub max_bytes: u32,
    /// Alignment (a power of two) both `base` and the memory size must have.
    pub align: u64,
}

/// Validated `LHREQ_INITIALIZE` arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitArgs {
    /// Host address of guest-physical 0.
    pub base: u64,
    /// Guest memory size in bytes (`pfnlimit * 4096`), the guest-memory
    /// accessor's limit.
    pub bytes: u32,
    /// Entry point: a guest-physical address inside guest memory.
    pub start: u32,
}

/// Validate the `INITIALIZE` payload (`base`, `pfnlimit`, `start`) against a
/// core's `limits`, before the core touches anything:
///
/// - `pfnlimit * 4096` neither overflows nor
///   exceeds `limits.max_bytes`, and is a multiple of `limits.align`:
///   else `EINVAL`;
/// - `start < pfnlimit * 4096` (so `pfnlimit` 0 is refused): else `EINVAL`;
/// - `base` is a multiple of `limits.align` and `base + bytes` does not
///   wrap: else `EFAULT`.
pub fn check_initialize(
    base: u64,
    pfnlimit: u64,
    start: u64,
    limits: InitLimits,
) -> Result<InitArgs, Errno> {
    let max = limits.max_bytes.min(MAX_GUEST_MEM);
    let bytes = pfnlimit
        .checked_mul(GUEST_PAGE_SIZE)
        .and_then(|b| u32::try_from(b).ok())
        .filter(|&b| b <= max && u64::from(b).is_multiple_of(limits.align))
        .ok_or(Errno::EINVAL)?;
    let start = u32::try_from(start)
        .ok()
        .filter(|&s| s < bytes)
        .ok_or(Errno::EINVAL)?;
    if !base.is_multiple_of(limits.align) || base.checked_add(u64::from(bytes)).is_none() {
        return Err(Errno::EFAULT);
    }
    Ok(InitArgs { base, bytes, start })
}

/// Lifecycle of a channel.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per guest; keeping the reason inline avoids allocating on the kill path"
)]
enum State<I> {
    /// Opened, no successful `INITIALIZE` yet.
    Fresh,
    /// Initialised and alive.
    Running(I),
    /// Killed or powered off; the first reason.
    Dead(DeathReason),
    /// Shut down with the restart reason.
    Restart,
}

/// One guest's control channel (an open `/dev/lguest`). See the module
/// documentation for the full semantics.
pub struct Channel<C: GuestCore> {
    core: C,
    owner: TaskId,
    state: State<C::Init>,
    break_pending: bool,
    released: bool,
}

impl<C: GuestCore> Channel<C> {
    /// Open a channel on `core` for the launcher task `owner`, the only task
    /// that may `INITIALIZE` and `read`.
    pub fn new(core: C, owner: TaskId) -> Self {
        Self {
            core,
            owner,
            state: State::Fresh,
            break_pending: false,
            released: false,
        }
    }

    /// Handle a `write` of `words` (request word + payload) by `caller`.
    /// Returns the byte count Linux would: [`INITIALIZE_RESULT`] for
    /// `INITIALIZE`, 0 for the others.
    pub fn write(&mut self, caller: TaskId, words: &[u64]) -> Result<usize, Errno> {
        let (&req, payload) = words.split_first().ok_or(Errno::EINVAL)?;
        let req = LhReq::try_from(req);
        match (&self.state, req) {
            (State::Fresh, Ok(LhReq::Initialize)) => {}
            (State::Fresh, _) => return Err(Errno::EINVAL),
            (State::Dead(_) | State::Restart, _) => return Err(Errno::ENOENT),
            (State::Running(_), _) => {}
        }
        match req {
            Ok(LhReq::Initialize) => self.initialize(caller, payload),
            Ok(LhReq::Irq) => {
                let irq = *payload.first().ok_or(Errno::EINVAL)?;
                let irq = u32::try_from(irq)
                    .ok()
                    .filter(|&i| i < LGUEST_IRQS)
                    .ok_or(Errno::EINVAL)?;
                self.core.set_irq(irq);
                Ok(0)
            }
            Ok(LhReq::Break) => {
                self.break_pending = match payload.first() {
                    Some(1) => true,
                    Some(0) => false,
                    _ => return Err(Errno::EINVAL),
                };
                Ok(0)
            }
            Ok(LhReq::Eventfd) => {
                let &[addr, handle, ..] = payload else {
                    return Err(Errno::EINVAL);
                };
                if addr == 0 || addr > u64::from(u32::MAX) {
                    return Err(Errno::EINVAL);
                }
                self.core.set_eventfd(addr, EventHandle(handle))?;
                Ok(0)
            }
            Ok(LhReq::GetDma) | Err(_) => Err(Errno::EINVAL),
        }
    }

    fn initialize(&mut self, caller: TaskId, payload: &[u64]) -> Result<usize, Errno> {
        if !matches!(self.state, State::Fresh) {
            return Err(Errno::EBUSY);
        }
        if caller != self.owner {
            return Err(Errno::EPERM);
        }
        let &[base, pfnlimit, start, ..] = payload else {
            return Err(Errno::EINVAL);
        };
        let init = self.core.initialize(base, pfnlimit, start)?;
        self.state = State::Running(init);
        Ok(INITIALIZE_RESULT)
    }

    /// Handle a `read` by `caller`: run the guest until it notifies, breaks,
    /// dies or is interrupted. Returns the number of bytes written to `buf`
    /// (always 4, a notify address).
    pub fn read(&mut self, caller: TaskId, buf: &mut [u8]) -> Result<usize, Errno> {
        match self.state {
            State::Fresh => return Err(Errno::EINVAL),
            _ if caller != self.owner => return Err(Errno::EPERM),
            State::Dead(_) => return Err(Errno::ENOENT),
            State::Restart => return Err(Errno::ERESTART),
            State::Running(_) => {}
        }
        let out = buf.get_mut(..NOTIFY_READ_LEN).ok_or(Errno::EINVAL)?;
        if core::mem::take(&mut self.break_pending) {
            return Err(Errno::EAGAIN);
        }
        match self.core.run(caller) {
            RunExit::Notify(addr) => {
                out.copy_from_slice(&addr.to_le_bytes());
                Ok(NOTIFY_READ_LEN)
            }
            RunExit::Break => {
                self.break_pending = false;
                Err(Errno::EAGAIN)
            }
            RunExit::Dead(reason) => {
                self.state = State::Dead(reason);
                Err(Errno::ENOENT)
            }
            RunExit::Restart => {
                self.state = State::Restart;
                Err(Errno::ERESTART)
            }
            RunExit::Interrupted => Err(Errno::EINTR),
        }
    }

    /// After a `read` returned `ENOENT`: copy the death reason plus a
    /// terminating NUL into `buf` (truncated to `buf.len()`), returning the
    /// bytes copied — lguest's "pread a ≤1023-byte reason". Repeatable.
    /// `ERESTART` if the guest restarts instead, `EINVAL` if it is not dead.
    pub fn read_reason(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        match &self.state {
            State::Dead(reason) => {
                let text = reason.as_str().as_bytes();
                let with_nul = text.iter().copied().chain(core::iter::once(0));
                let mut n = 0usize;
                for (dst, src) in buf.iter_mut().zip(with_nul) {
                    *dst = src;
                    n = n.saturating_add(1);
                }
                Ok(n)
            }
            State::Restart => Err(Errno::ERESTART),
            State::Fresh | State::Running(_) => Err(Errno::EINVAL),
        }
    }

    /// The death reason, once the guest died (not for a restart).
    pub fn death_reason(&self) -> Option<&str> {
        match &self.state {
            State::Dead(reason) => Some(reason.as_str()),
            _ => None,
        }
    }

    /// Whether `INITIALIZE` succeeded (the guest may have died since).
    pub fn is_initialized(&self) -> bool {
        !matches!(self.state, State::Fresh)
    }

    /// Whether the guest died or asked for a restart.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, State::Dead(_) | State::Restart)
    }

    /// Whether the guest asked for a restart.
    pub fn wants_restart(&self) -> bool {
        matches!(self.state, State::Restart)
    }

    /// Whether a `BREAK 1` is waiting for the owner's next `read`.
    pub fn break_pending(&self) -> bool {
        self.break_pending
    }

    /// The task that may `INITIALIZE` and `read`.
    pub fn owner(&self) -> TaskId {
        self.owner
    }

    /// What `INITIALIZE` produced, while the guest is alive.
    pub fn init(&self) -> Option<&C::Init> {
        match &self.state {
            State::Running(init) => Some(init),
            _ => None,
        }
    }

    /// The core, for inspection.
    pub fn core(&self) -> &C {
        &self.core
    }

    /// The core, mutably. Bypasses the protocol checks; for the code that
    /// owns the channel object (wiring, tests), never for the launcher.
    pub fn core_mut(&mut self) -> &mut C {
        &mut self.core
    }

    /// `close()`: release the core (exactly once) and drop the channel.
    pub fn close(self) {
        drop(self);
    }

    fn release_once(&mut self) {
        if !core::mem::replace(&mut self.released, true) {
            self.core.release();
        }
    }
}

impl<C: GuestCore> Drop for Channel<C> {
    fn drop(&mut self) {
        self.release_once();
    }
}

impl<C: GuestCore> fmt::Debug for Channel<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Fresh => "fresh",
            State::Running(_) => "running",
            State::Dead(_) => "dead",
            State::Restart => "restart",
        };
        f.debug_struct("Channel")
            .field("owner", &self.owner)
            .field("state", &state)
            .field("death_reason", &self.death_reason())
            .field("break_pending", &self.break_pending)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;
    use std::vec::Vec;

    const OWNER: TaskId = TaskId(1);
    const OTHER: TaskId = TaskId(2);
    const INIT: u64 = LhReq::Initialize as u64;
    const GETDMA: u64 = LhReq::GetDma as u64;
    const IRQ: u64 = LhReq::Irq as u64;
    const BREAK: u64 = LhReq::Break as u64;
    const EVENTFD: u64 = LhReq::Eventfd as u64;

    /// Everything the fake core was asked to do.
    #[derive(Default, Debug)]
    struct Log {
        inits: Vec<(u64, u64, u64)>,
        runs: Vec<TaskId>,
        irqs: Vec<u32>,
        eventfds: Vec<(u64, EventHandle)>,
        releases: u32,
    }

    struct Fake {
        log: Rc<RefCell<Log>>,
        init_results: VecDeque<Result<(), Errno>>,
        exits: VecDeque<RunExit>,
        eventfd_result: Result<(), Errno>,
    }

    impl GuestCore for Fake {
        type Init = (u64, u64, u64);

        fn initialize(
            &mut self,
            base: u64,
            pfnlimit: u64,
            start: u64,
        ) -> Result<Self::Init, Errno> {
            self.log.borrow_mut().inits.push((base, pfnlimit, start));
            self.init_results.pop_front().unwrap_or(Ok(()))?;
            Ok((base, pfnlimit, start))
        }

        fn run(&mut self, owner: TaskId) -> RunExit {
            self.log.borrow_mut().runs.push(owner);
            self.exits
                .pop_front()
                .unwrap_or(RunExit::Dead(DeathReason::new("second death")))
        }

        fn set_irq(&mut self, irq: u32) {
            self.log.borrow_mut().irqs.push(irq);
        }

        fn set_eventfd(&mut self, addr: u64, fd: EventHandle) -> Result<(), Errno> {
            self.log.borrow_mut().eventfds.push((addr, fd));
            self.eventfd_result
        }

        fn release(&mut self) {
            self.log.borrow_mut().releases += 1;
        }
    }

    fn fake(exits: impl IntoIterator<Item = RunExit>) -> (Fake, Rc<RefCell<Log>>) {
        let log = Rc::new(RefCell::new(Log::default()));
        let f = Fake {
            log: log.clone(),
            init_results: VecDeque::new(),
            exits: exits.into_iter().collect(),
            eventfd_result: Ok(()),
        };
        (f, log)
    }

    fn fresh(exits: impl IntoIterator<Item = RunExit>) -> (Channel<Fake>, Rc<RefCell<Log>>) {
        let (f, log) = fake(exits);
        (Channel::new(f, OWNER), log)
    }

    fn running(exits: impl IntoIterator<Item = RunExit>) -> (Channel<Fake>, Rc<RefCell<Log>>) {
        let (mut ch, log) = fresh(exits);
        assert_eq!(
            ch.write(OWNER, &[INIT, 0x1000_0000, 0x4000, 0x40_0000]),
            Ok(24)
        );
        (ch, log)
    }

    fn dead(reason: &str) -> (Channel<Fake>, Rc<RefCell<Log>>) {
        let (mut ch, log) = running([RunExit::Dead(DeathReason::new(reason))]);
        let mut buf = [0u8; 4];
        assert_eq!(ch.read(OWNER, &mut buf), Err(Errno::ENOENT));
        (ch, log)
    }

    // ---- write: before INITIALIZE -------------------------------------

    #[test]
    fn empty_write_is_einval() {
        let (mut ch, _) = fresh([]);
        assert_eq!(ch.write(OWNER, &[]), Err(Errno::EINVAL));
        let (mut ch, _) = running([]);
        assert_eq!(ch.write(OWNER, &[]), Err(Errno::EINVAL));
    }

    #[test]
    fn requests_before_initialize_are_einval() {
        let (mut ch, log) = fresh([]);
        for words in [
            &[IRQ, 1][..],
            &[BREAK, 1],
            &[BREAK, 0],
            &[EVENTFD, 0x1000, 7],
            &[GETDMA, 0],
            &[5],
            &[u64::MAX],
        ] {
            assert_eq!(ch.write(OWNER, words), Err(Errno::EINVAL), "{words:?}");
            assert_eq!(ch.write(OTHER, words), Err(Errno::EINVAL), "{words:?}");
        }
        let log = log.borrow();
        assert!(log.irqs.is_empty() && log.eventfds.is_empty() && log.inits.is_empty());
        assert!(!ch.break_pending());
        assert!(!ch.is_initialized());
    }

    // ---- INITIALIZE ------------------------------------------------------

    #[test]
    fn initialize_returns_payload_bytes_and_passes_args() {
        let (mut ch, log) = fresh([]);
        assert_eq!(
            ch.write(OWNER, &[INIT, 0xAA00_0000, 0x8000, 0x40_1000]),
            Ok(INITIALIZE_RESULT)
        );
        assert_eq!(INITIALIZE_RESULT, 24);
        assert_eq!(log.borrow().inits, [(0xAA00_0000, 0x8000, 0x40_1000)]);
        assert!(ch.is_initialized() && !ch.is_dead());
        assert_eq!(ch.init(), Some(&(0xAA00_0000, 0x8000, 0x40_1000)));
    }

    #[test]
    fn initialize_ignores_extra_words() {
        let (mut ch, log) = fresh([]);
        assert_eq!(ch.write(OWNER, &[INIT, 1, 2, 3, 4, 5]), Ok(24));
        assert_eq!(log.borrow().inits, [(1, 2, 3)]);
    }

    #[test]
    fn initialize_too_short_is_einval() {
        let (mut ch, log) = fresh([]);
        for words in [&[INIT][..], &[INIT, 1], &[INIT, 1, 2]] {
            assert_eq!(ch.write(OWNER, words), Err(Errno::EINVAL));
        }
        assert!(log.borrow().inits.is_empty());
        assert!(!ch.is_initialized());
        assert_eq!(ch.write(OWNER, &[INIT, 1, 2, 3]), Ok(24));
    }

    #[test]
    fn initialize_twice_is_ebusy() {
        let (mut ch, log) = running([]);
        assert_eq!(ch.write(OWNER, &[INIT, 1, 2, 3]), Err(Errno::EBUSY));
        assert_eq!(ch.write(OTHER, &[INIT, 1, 2, 3]), Err(Errno::EBUSY));
        assert_eq!(ch.write(OWNER, &[INIT]), Err(Errno::EBUSY));
        assert_eq!(log.borrow().inits.len(), 1);
    }

    #[test]
    fn initialize_by_non_owner_is_eperm() {
        let (mut ch, log) = fresh([]);
        assert_eq!(ch.write(OTHER, &[INIT, 1, 2, 3]), Err(Errno::EPERM));
        assert!(log.borrow().inits.is_empty());
        assert!(!ch.is_initialized());
    }

    #[test]
    fn initialize_core_error_propagates_and_allows_retry() {
        let (mut f, log) = fake([]);
        f.init_results = [Err(Errno::ENOMEM), Err(Errno::EFAULT)].into();
        let mut ch = Channel::new(f, OWNER);
        assert_eq!(ch.write(OWNER, &[INIT, 1, 2, 3]), Err(Errno::ENOMEM));
        assert!(!ch.is_initialized());
        assert_eq!(ch.write(OWNER, &[IRQ, 1]), Err(Errno::EINVAL));
        assert_eq!(ch.write(OWNER, &[INIT, 1, 2, 3]), Err(Errno::EFAULT));
        assert_eq!(ch.write(OWNER, &[INIT, 4, 5, 6]), Ok(24));
        assert_eq!(log.borrow().inits.len(), 3);
        assert_eq!(ch.init(), Some(&(4, 5, 6)));
    }

    // ---- IRQ -------------------------------------------------------------

    #[test]
    fn irq_in_range_reaches_core_from_any_task() {
        let (mut ch, log) = running([]);
        assert_eq!(ch.write(OWNER, &[IRQ, 0]), Ok(0));
        assert_eq!(ch.write(OTHER, &[IRQ, 31]), Ok(0));
        assert_eq!(ch.write(OTHER, &[IRQ, 5, 99]), Ok(0));
        assert_eq!(log.borrow().irqs, [0, 31, 5]);
    }

    #[test]
    fn irq_out_of_range_or_missing_is_einval() {
        let (mut ch, log) = running([]);
        for words in [
            &[IRQ, 32][..],
            &[IRQ, 0x1_0000_0000],
            &[IRQ, u64::MAX],
            &[IRQ],
        ] {
            assert_eq!(ch.write(OWNER, words), Err(Errno::EINVAL), "{words:?}");
        }
        assert!(log.borrow().irqs.is_empty());
    }

    // ---- BREAK -----------------------------------------------------------

    #[test]
    fn break_makes_next_read_eagain_once() {
        let (mut ch, log) = running([RunExit::Notify(0x1234)]);
        assert_eq!(ch.write(OTHER, &[BREAK, 1]), Ok(0));
        assert!(ch.break_pending());
        let mut buf = [0u8; 4];
        assert_eq!(ch.read(OWNER, &mut buf), Err(Errno::EAGAIN));
        assert!(log.borrow().runs.is_empty(), "guest must not run");
        assert!(!ch.break_pending());
        assert_eq!(ch.read(OWNER, &mut buf), Ok(4));
        assert_eq!(log.borrow().runs.len(), 1);
    }

    #[test]
    fn break_zero_clears_pending_break() {
        let (mut ch, log) = running([RunExit::Notify(0x1234)]);
        assert_eq!(ch.write(OWNER, &[BREAK, 1]), Ok(0));
        assert_eq!(ch.write(OWNER, &[BREAK, 0]), Ok(0));
        assert!(!ch.break_pending());
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Ok(4));
        assert_eq!(log.borrow().runs.len(), 1);
        // BREAK 0 with nothing pending is fine too.
        assert_eq!(ch.write(OWNER, &[BREAK, 0]), Ok(0));
    }

    #[test]
    fn break_twice_is_still_one_eagain() {
        let (mut ch, _) = running([RunExit::Notify(8)]);
        assert_eq!(ch.write(OWNER, &[BREAK, 1]), Ok(0));
        assert_eq!(ch.write(OWNER, &[BREAK, 1]), Ok(0));
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::EAGAIN));
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Ok(4));
    }

    #[test]
    fn break_bad_payload_is_einval() {
        let (mut ch, _) = running([]);
        assert_eq!(ch.write(OWNER, &[BREAK]), Err(Errno::EINVAL));
        assert_eq!(ch.write(OWNER, &[BREAK, 2]), Err(Errno::EINVAL));
        assert_eq!(ch.write(OWNER, &[BREAK, u64::MAX]), Err(Errno::EINVAL));
        assert!(!ch.break_pending());
    }

    #[test]
    fn core_break_is_eagain_and_consumes_pending_break() {
        let (mut ch, _) = running([RunExit::Break, RunExit::Notify(4)]);
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::EAGAIN));
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Ok(4));
    }

    // ---- EVENTFD -----------------------------------------------------------

    #[test]
    fn eventfd_binds_address() {
        let (mut ch, log) = running([]);
        assert_eq!(ch.write(OTHER, &[EVENTFD, 0x7000, 3]), Ok(0));
        assert_eq!(ch.write(OWNER, &[EVENTFD, 0xFFFF_FFFF, 4, 0]), Ok(0));
        assert_eq!(
            log.borrow().eventfds,
            [(0x7000, EventHandle(3)), (0xFFFF_FFFF, EventHandle(4))]
        );
    }

    #[test]
    fn eventfd_bad_args_are_einval() {
        let (mut ch, log) = running([]);
        for words in [
            &[EVENTFD, 0, 3][..],
            &[EVENTFD, 0x1_0000_0000, 3],
            &[EVENTFD, 0x7000],
            &[EVENTFD],
        ] {
            assert_eq!(ch.write(OWNER, words), Err(Errno::EINVAL), "{words:?}");
        }
        assert!(log.borrow().eventfds.is_empty());
    }

    #[test]
    fn eventfd_core_error_propagates() {
        let (mut f, _) = fake([]);
        f.eventfd_result = Err(Errno::EBADF);
        let mut ch = Channel::new(f, OWNER);
        assert_eq!(ch.write(OWNER, &[INIT, 1, 2, 3]), Ok(24));
        assert_eq!(ch.write(OWNER, &[EVENTFD, 0x7000, 99]), Err(Errno::EBADF));
        assert!(!ch.is_dead());
    }

    // ---- GETDMA / unknown ----------------------------------------------------

    #[test]
    fn getdma_and_unknown_requests_are_einval() {
        let (mut ch, _) = running([]);
        for words in [
            &[GETDMA, 0][..],
            &[GETDMA],
            &[5, 1, 2],
            &[6],
            &[7],
            &[u64::MAX],
        ] {
            assert_eq!(ch.write(OWNER, words), Err(Errno::EINVAL), "{words:?}");
        }
        assert!(!ch.is_dead());
    }

    // ---- read ------------------------------------------------------------------

    #[test]
    fn read_before_initialize_is_einval() {
        let (mut ch, log) = fresh([RunExit::Notify(1)]);
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::EINVAL));
        assert_eq!(ch.read(OTHER, &mut [0u8; 4]), Err(Errno::EINVAL));
        assert!(log.borrow().runs.is_empty());
    }

    #[test]
    fn read_by_non_owner_is_eperm() {
        let (mut ch, log) = running([RunExit::Notify(1)]);
        assert_eq!(ch.read(OTHER, &mut [0u8; 4]), Err(Errno::EPERM));
        assert!(log.borrow().runs.is_empty());
        // Non-owner is EPERM even on a dead guest.
        let (mut ch, _) = dead("x");
        assert_eq!(ch.read(OTHER, &mut [0u8; 4]), Err(Errno::EPERM));
    }

    #[test]
    fn read_notify_returns_address_le() {
        let (mut ch, log) = running([RunExit::Notify(0x0040_2010), RunExit::Notify(0xFFFF_F000)]);
        let mut buf = [0xEEu8; 8];
        assert_eq!(ch.read(OWNER, &mut buf), Ok(4));
        assert_eq!(buf, [0x10, 0x20, 0x40, 0x00, 0xEE, 0xEE, 0xEE, 0xEE]);
        let mut buf = [0u8; 4];
        assert_eq!(ch.read(OWNER, &mut buf), Ok(4));
        assert_eq!(u32::from_le_bytes(buf), 0xFFFF_F000);
        assert_eq!(log.borrow().runs, [OWNER, OWNER]);
    }

    #[test]
    fn read_short_buffer_is_einval_without_running() {
        let (mut ch, log) = running([RunExit::Notify(0x1000)]);
        assert_eq!(ch.read(OWNER, &mut [0u8; 3]), Err(Errno::EINVAL));
        assert_eq!(ch.read(OWNER, &mut []), Err(Errno::EINVAL));
        assert!(log.borrow().runs.is_empty());
        // The notify was not lost.
        let mut buf = [0u8; 4];
        assert_eq!(ch.read(OWNER, &mut buf), Ok(4));
        assert_eq!(u32::from_le_bytes(buf), 0x1000);
    }

    #[test]
    fn read_short_buffer_does_not_consume_break() {
        let (mut ch, _) = running([]);
        assert_eq!(ch.write(OWNER, &[BREAK, 1]), Ok(0));
        assert_eq!(ch.read(OWNER, &mut [0u8; 2]), Err(Errno::EINVAL));
        assert!(ch.break_pending());
    }

    #[test]
    fn read_interrupted_is_eintr_and_guest_stays_alive() {
        let (mut ch, log) = running([RunExit::Interrupted, RunExit::Notify(0x2000)]);
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::EINTR));
        assert!(!ch.is_dead());
        assert_eq!(ch.write(OTHER, &[IRQ, 3]), Ok(0));
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Ok(4));
        assert_eq!(log.borrow().runs.len(), 2);
    }

    // ---- death -------------------------------------------------------------

    #[test]
    fn death_is_enoent_with_readable_reason() {
        let (mut ch, log) = dead("power off: bye");
        assert!(ch.is_dead() && !ch.wants_restart());
        assert_eq!(ch.death_reason(), Some("power off: bye"));
        assert_eq!(ch.init(), None);
        // Further reads: ENOENT, core never run again (first reason kept).
        for _ in 0..3 {
            assert_eq!(ch.read(OWNER, &mut [0u8; 64]), Err(Errno::ENOENT));
        }
        assert_eq!(log.borrow().runs.len(), 1);
        assert_eq!(ch.death_reason(), Some("power off: bye"));
        // The reason, NUL-terminated, repeatable.
        for _ in 0..2 {
            let mut buf = [0xFFu8; 1024];
            assert_eq!(ch.read_reason(&mut buf), Ok(15));
            assert_eq!(&buf[..15], b"power off: bye\0");
            assert_eq!(buf[15], 0xFF);
        }
    }

    #[test]
    fn read_reason_truncates_to_buffer() {
        let (ch, _) = dead("unhandled trap 13 at 0x401000 (0x0)");
        let mut buf = [0u8; 9];
        assert_eq!(ch.read_reason(&mut buf), Ok(9));
        assert_eq!(&buf, b"unhandled");
        let mut exact = [0xFFu8; 35];
        assert_eq!(ch.read_reason(&mut exact), Ok(35));
        assert_eq!(&exact, b"unhandled trap 13 at 0x401000 (0x0)");
        assert_eq!(ch.read_reason(&mut []), Ok(0));
    }

    #[test]
    fn read_reason_before_death_is_einval() {
        let (ch, _) = fresh([]);
        assert_eq!(ch.read_reason(&mut [0u8; 8]), Err(Errno::EINVAL));
        let (ch, _) = running([]);
        assert_eq!(ch.read_reason(&mut [0u8; 8]), Err(Errno::EINVAL));
        assert_eq!(ch.death_reason(), None);
    }

    #[test]
    fn every_write_after_death_is_enoent() {
        let (mut ch, log) = dead("bad");
        for words in [
            &[INIT, 1, 2, 3][..],
            &[IRQ, 1],
            &[IRQ, 99],
            &[BREAK, 1],
            &[EVENTFD, 0x1000, 1],
            &[EVENTFD, 0, 1],
            &[GETDMA],
            &[77],
        ] {
            assert_eq!(ch.write(OWNER, words), Err(Errno::ENOENT), "{words:?}");
            assert_eq!(ch.write(OTHER, words), Err(Errno::ENOENT), "{words:?}");
        }
        let log = log.borrow();
        assert!(log.irqs.is_empty() && log.eventfds.is_empty());
        assert_eq!(log.inits.len(), 1);
    }

    #[test]
    fn pending_break_is_taken_before_running_a_dying_guest() {
        let (mut ch, log) = running([RunExit::Dead(DeathReason::new("gone"))]);
        assert_eq!(ch.write(OWNER, &[BREAK, 1]), Ok(0));
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::EAGAIN));
        assert!(log.borrow().runs.is_empty());
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::ENOENT));
        assert_eq!(ch.death_reason(), Some("gone"));
    }

    #[test]
    fn restart_is_erestart_forever() {
        let (mut ch, log) = running([RunExit::Restart]);
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::ERESTART));
        assert!(ch.is_dead() && ch.wants_restart());
        assert_eq!(ch.read(OWNER, &mut [0u8; 4]), Err(Errno::ERESTART));
        assert_eq!(ch.read(OWNER, &mut [0u8; 1]), Err(Errno::ERESTART));
        assert_eq!(ch.read_reason(&mut [0u8; 16]), Err(Errno::ERESTART));
        assert_eq!(ch.death_reason(), None);
        assert_eq!(ch.write(OWNER, &[IRQ, 1]), Err(Errno::ENOENT));
        assert_eq!(ch.write(OWNER, &[INIT, 1, 2, 3]), Err(Errno::ENOENT));
        assert_eq!(log.borrow().runs.len(), 1);
    }

    // ---- close -------------------------------------------------------------

    #[test]
    fn close_releases_exactly_once() {
        let (ch, log) = running([]);
        ch.close();
        assert_eq!(log.borrow().releases, 1);
    }

    #[test]
    fn close_uninitialized_and_dead_release_once() {
        let (ch, log) = fresh([]);
        ch.close();
        assert_eq!(log.borrow().releases, 1);
        let (ch, log) = dead("x");
        assert_eq!(log.borrow().releases, 0);
        ch.close();
        assert_eq!(log.borrow().releases, 1);
    }

    #[test]
    fn drop_without_close_releases_once() {
        let (ch, log) = running([]);
        drop(ch);
        assert_eq!(log.borrow().releases, 1);
    }

    // ---- DeathReason ---------------------------------------------------------

    #[test]
    fn death_reason_truncates_at_1023_on_char_boundary() {
        let long = "x".repeat(2000);
        let r = DeathReason::new(&long);
        assert_eq!(r.len(), DEATH_REASON_MAX);
        assert_eq!(DEATH_REASON_MAX, 1023);
        // 'é' is 2 bytes: 511 of them = 1022 bytes, the 512th does not fit.
        let r = DeathReason::new(&"é".repeat(600));
        assert_eq!(r.len(), 1022);
        assert!(r.as_str().chars().all(|c| c == 'é'));
        let mut buf = [0u8; 1024];
        let (ch, _) = dead(&long);
        assert_eq!(ch.read_reason(&mut buf), Ok(1024));
        assert_eq!(buf[1023], 0);
    }

    #[test]
    fn death_reason_formats_kill_strings() {
        let r = DeathReason::format(format_args!(
            "bad read address {:#x} len {}",
            0x1234_5678u32, 4
        ));
        assert_eq!(r.as_str(), "bad read address 0x12345678 len 4");
        let r = DeathReason::format(format_args!(
            "unhandled trap {} at {:#x} ({:#x})",
            13, 0x40_1000, 0
        ));
        assert_eq!(r.as_str(), "unhandled trap 13 at 0x401000 (0x0)");
        let mut r = DeathReason::empty();
        assert!(r.is_empty());
        use core::fmt::Write as _;
        write!(r, "hypercall {} before INIT", 5).unwrap();
        assert_eq!(r.to_string(), "hypercall 5 before INIT");
        assert_eq!(std::format!("{r:?}"), "\"hypercall 5 before INIT\"");
    }

    #[test]
    fn death_reason_from_guest_bytes() {
        let mut r = DeathReason::new("power off: ");
        r.push_bytes_lossy(b"power\xFFoff\0garbage after nul");
        assert_eq!(r.as_str(), "power off: power\u{FFFD}off");
        let mut r = DeathReason::empty();
        r.push_bytes_lossy(&[b'a'; 2000]);
        assert_eq!(r.len(), DEATH_REASON_MAX);
    }

    #[test]
    fn debug_output_names_state() {
        let (ch, _) = dead("boom");
        let s = std::format!("{ch:?}");
        assert!(s.contains("dead") && s.contains("boom"), "{s}");
    }

    // ---- INITIALIZE argument validation --------------------------------------

    const LIMITS: InitLimits = InitLimits {
        max_bytes: 3 << 30,
        align: 2 << 20,
    };
    const BASE: u64 = 0xFFFF_8000_0040_0000;
    const PFN_16M: u64 = (16 << 20) / 4096;

    #[test]
    fn initialize_args_start_boundaries() {
        let bytes = 16u32 << 20;
        assert_eq!(
            check_initialize(BASE, PFN_16M, u64::from(bytes) - 1, LIMITS),
            Ok(InitArgs {
                base: BASE,
                bytes,
                start: bytes - 1
            })
        );
        assert_eq!(
            check_initialize(BASE, PFN_16M, 0, LIMITS).map(|a| a.start),
            Ok(0)
        );
        for start in [u64::from(bytes), u64::from(bytes) + 1, 1 << 32, u64::MAX] {
            assert_eq!(
                check_initialize(BASE, PFN_16M, start, LIMITS),
                Err(Errno::EINVAL),
                "start {start:#x}"
            );
        }
    }

    #[test]
    fn initialize_args_size_boundaries() {
        // No memory at all: nowhere to start.
        assert_eq!(check_initialize(BASE, 0, 0, LIMITS), Err(Errno::EINVAL));
        // Exactly the maximum is fine, one alignment unit more is not.
        let max_pfn = u64::from(LIMITS.max_bytes) / 4096;
        assert_eq!(
            check_initialize(BASE, max_pfn, 0, LIMITS).map(|a| a.bytes),
            Ok(3 << 30)
        );
        assert_eq!(
            check_initialize(BASE, max_pfn + 512, 0, LIMITS),
            Err(Errno::EINVAL)
        );
        // Not a multiple of the alignment.
        assert_eq!(
            check_initialize(BASE, PFN_16M + 1, 0, LIMITS),
            Err(Errno::EINVAL)
        );
        // pfnlimit * 4096 overflows u64 / does not fit u32.
        for pfn in [u64::MAX, u64::MAX / 4096 + 1, 1 << 20, (1 << 20) + 512] {
            assert_eq!(
                check_initialize(BASE, pfn, 0, LIMITS),
                Err(Errno::EINVAL),
                "{pfn:#x}"
            );
        }
        // Even a core that would take more never exceeds MAX_GUEST_MEM.
        let big = InitLimits {
            max_bytes: u32::MAX,
            align: 4096,
        };
        let top = u64::from(MAX_GUEST_MEM) / 4096;
        assert_eq!(
            check_initialize(0, top, 0, big).map(|a| a.bytes),
            Ok(MAX_GUEST_MEM)
        );
        assert_eq!(check_initialize(0, top + 1, 0, big), Err(Errno::EINVAL));
    }

    #[test]
    fn initialize_args_base() {
        assert_eq!(
            check_initialize(BASE + 4096, PFN_16M, 0, LIMITS),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            check_initialize(BASE + 1, PFN_16M, 0, LIMITS),
            Err(Errno::EFAULT)
        );
        // base + bytes would wrap.
        let last = u64::MAX - (LIMITS.align - 1);
        assert_eq!(
            check_initialize(last, PFN_16M, 0, LIMITS),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            check_initialize(0, PFN_16M, 0, LIMITS).map(|a| a.base),
            Ok(0)
        );
    }
}
