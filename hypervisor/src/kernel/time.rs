//! Time: a monotonic nanosecond clock (the TSC, calibrated against the PIT)
//! and one-shot deadline timers driven by the local APIC timer.
//!
//! Timers live in a fixed-size [`TimerQueue`]; the APIC timer is always armed
//! for the earliest deadline. A timer's callback runs in interrupt context
//! with the timer lock released, so it may arm new timers.

use core::sync::atomic::{AtomicU64, Ordering};

use rustyvisor::timerq::{TimerId, TimerQueue};

use super::apic;
use super::arch::cpu;
use super::sync::IrqMutex;

/// Maximum number of armed timers.
pub const MAX_TIMERS: usize = 64;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick as a 32.32 fixed-point number (`10^9 · 2^32 /
/// Hz`), so that [`now_ns`] is one multiplication and a shift instead of a
/// 128-bit division on every guest clock read.
static NS_PER_TICK_FP32: AtomicU64 = AtomicU64::new(0);
static TSC_BASE: AtomicU64 = AtomicU64::new(0);
static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);

/// A timer callback: called with the argument given at arming time.
pub type Callback = fn(u64);

struct Timers {
    queue: TimerQueue<MAX_TIMERS>,
    callbacks: [Option<(Callback, u64, TimerId)>; MAX_TIMERS],
}

static TIMERS: IrqMutex<Timers> = IrqMutex::new(Timers {
    queue: TimerQueue::new(),
    callbacks: [None; MAX_TIMERS],
});

/// Calibrates the TSC and the APIC timer against the PIT (10 ms each) and
/// starts the clock at zero. Returns (TSC Hz, APIC timer Hz).
pub fn init() -> (u64, u64) {
    let mut t0 = 0;
    let t1 = super::pit::measure(10, || t0 = cpu::rdtsc(), cpu::rdtsc);
    let tsc_hz = t1.saturating_sub(t0).saturating_mul(100).max(1);
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);
    let fp = (1_000_000_000u128 << 32) / u128::from(tsc_hz);
    NS_PER_TICK_FP32.store(u64::try_from(fp).unwrap_or(u64::MAX), Ordering::Relaxed);
    let apic_hz = apic::calibrate_timer();
    TSC_BASE.store(cpu::rdtsc(), Ordering::Relaxed);
    (tsc_hz, apic_hz)
}

/// Nanoseconds since [`init`] (0 before it).
#[inline]
pub fn now_ns() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let ticks = cpu::rdtsc().saturating_sub(TSC_BASE.load(Ordering::Relaxed));
    // ticks · (10^9 · 2^32 / Hz) / 2^32: one 64×64→128 multiply. The
    // factor is truncated to 2^-32 ns per tick, a drift of a few
    // microseconds per hour at GHz rates; it is the same for every reader,
    // so deadlines and guest clocks agree.
    let ns = (u128::from(ticks) * u128::from(NS_PER_TICK_FP32.load(Ordering::Relaxed))) >> 32;
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// TSC frequency in Hz.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Timer interrupts taken so far.
pub fn timer_irqs() -> u64 {
    TIMER_IRQS.load(Ordering::Relaxed)
}

/// Why a timer could not be armed.
#[derive(Debug)]
pub struct TimersFull;

/// Arms a one-shot timer that calls `cb(arg)` at `deadline_ns` (monotonic).
pub fn arm_at(deadline_ns: u64, cb: Callback, arg: u64) -> Result<TimerId, TimersFull> {
    let mut t = TIMERS.lock();
    let slot = t
        .callbacks
        .iter()
        .position(Option::is_none)
        .ok_or(TimersFull)?;
    let id = t
        .queue
        .insert(deadline_ns, slot as u64)
        .map_err(|_| TimersFull)?;
    if let Some(c) = t.callbacks.get_mut(slot) {
        *c = Some((cb, arg, id));
    }
    reprogram(&t);
    Ok(id)
}

/// Arms a one-shot timer `delay_ns` from now.
pub fn arm_after(delay_ns: u64, cb: Callback, arg: u64) -> Result<TimerId, TimersFull> {
    arm_at(now_ns().saturating_add(delay_ns), cb, arg)
}

/// Cancels a timer; false if it already fired or was cancelled.
pub fn cancel(id: TimerId) -> bool {
    let mut t = TIMERS.lock();
    if !t.queue.cancel(id) {
        return false;
    }
    for c in t.callbacks.iter_mut() {
        if matches!(c, Some((_, _, cid)) if *cid == id) {
            *c = None;
        }
    }
    reprogram(&t);
    true
}

fn reprogram(t: &Timers) {
    let Some(deadline) = t.queue.next_deadline() else {
        apic::arm_oneshot(0);
        return;
    };
    let hz = apic::timer_hz().max(1);
    let delta = deadline.saturating_sub(now_ns());
    let ticks = u128::from(delta) * u128::from(hz) / 1_000_000_000;
    // Too far away for the 32-bit counter: fire early and re-arm then.
    let ticks = u32::try_from(ticks).unwrap_or(u32::MAX).max(1);
    apic::arm_oneshot(ticks);
}

/// APIC timer interrupt: runs every expired timer's callback, re-arms.
pub fn on_timer_irq() {
    TIMER_IRQS.fetch_add(1, Ordering::Relaxed);
    loop {
        let now = now_ns();
        let fired = {
            let mut t = TIMERS.lock();
            match t.queue.pop_expired(now) {
                Some((_, token)) => t.callbacks.get_mut(token as usize).and_then(Option::take),
                None => {
                    reprogram(&t);
                    return;
                }
            }
        };
        if let Some((cb, arg, _)) = fired {
            cb(arg);
        }
    }
}
