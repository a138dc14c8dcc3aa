//! Time: a monotonic nanosecond clock (the TSC, calibrated against the PIT)
//! and one-shot deadline timers driven by the local APIC timer.
//!
//! Timers live in an ordered map keyed by (deadline, sequence number): no
//! fixed cap (a guest's clock event can never be dropped because others
//! hold every slot), bounded by memory alone; the heap is interrupt-safe, so
//! arming from interrupt context is fine. The APIC timer is always armed for
//! the earliest deadline. A timer's callback runs in interrupt context with
//! the timer lock released, so it may arm new timers.

extern crate alloc;

use alloc::collections::BTreeMap;
use core::sync::atomic::{AtomicU64, Ordering};

use super::apic;
use super::arch::cpu;
use super::sync::IrqMutex;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick as a 32.32 fixed-point number (`10^9 · 2^32 /
/// Hz`), so that [`now_ns`] is one multiplication and a shift instead of a
/// 128-bit division on every guest clock read.
static NS_PER_TICK_FP32: AtomicU64 = AtomicU64::new(0);
static TSC_BASE: AtomicU64 = AtomicU64::new(0);
static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);

/// A timer callback: called with the argument given at arming time.
pub type Callback = fn(u64);

/// One armed timer: its deadline first, so the map's order is firing order
/// (equal deadlines in arming order); ids are never reused, so a stale id
/// cancels nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId {
    deadline: u64,
    seq: u64,
}

struct Timers {
    armed: BTreeMap<TimerId, (Callback, u64)>,
    next_seq: u64,
}

static TIMERS: IrqMutex<Timers> = IrqMutex::new(Timers {
    armed: BTreeMap::new(),
    next_seq: 0,
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

/// Arms a one-shot timer that calls `cb(arg)` at `deadline_ns` (monotonic).
pub fn arm_at(deadline_ns: u64, cb: Callback, arg: u64) -> TimerId {
    let mut t = TIMERS.lock();
    let id = TimerId {
        deadline: deadline_ns,
        seq: t.next_seq,
    };
    t.next_seq = t.next_seq.wrapping_add(1);
    // The APIC only needs reprogramming when this is the new earliest.
    let earliest = t
        .armed
        .first_key_value()
        .is_none_or(|(first, _)| id < *first);
    t.armed.insert(id, (cb, arg));
    if earliest {
        reprogram(&t);
    }
    id
}

/// Arms a one-shot timer `delay_ns` from now.
pub fn arm_after(delay_ns: u64, cb: Callback, arg: u64) -> TimerId {
    arm_at(now_ns().saturating_add(delay_ns), cb, arg)
}

/// Cancels a timer; false if it already fired or was cancelled.
pub fn cancel(id: TimerId) -> bool {
    let mut t = TIMERS.lock();
    let was_first = t
        .armed
        .first_key_value()
        .is_some_and(|(first, _)| *first == id);
    if t.armed.remove(&id).is_none() {
        return false;
    }
    // A later deadline firing early would only cost a spurious interrupt,
    // but leaving the APIC armed for a cancelled earliest timer is cheap
    // to avoid.
    if was_first {
        reprogram(&t);
    }
    true
}

fn reprogram(t: &Timers) {
    let Some(deadline) = t.armed.first_key_value().map(|(id, _)| id.deadline) else {
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
            match t.armed.first_entry() {
                Some(e) if e.key().deadline <= now => e.remove(),
                _ => {
                    reprogram(&t);
                    return;
                }
            }
        };
        let (cb, arg) = fired;
        cb(arg);
    }
}
