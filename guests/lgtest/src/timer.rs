//! `mode=timer`: the clock event and the virtual interrupt flag.
//!
//! 1. Periodic: the irq-0 handler re-arms `LHCALL_SET_CLOCKEVENT(2 ms)`
//!    until [`TICKS`] ticks arrived; the kernel waits with HALT. Each tick's
//!    delivery time (`lguest_data.time`, which the host writes when it
//!    delivers) must be at least 2 ms after the previous one (the re-arm
//!    happens after that write), and the first at least 2 ms after the
//!    time seen before arming. No upper bound: TCG may be slow.
//! 2. `irq_enabled` off: the expired timer leaves `irq_pending` set and is
//!    not delivered, however many exits happen; enabling delivers it once.
//! 3. Blocked: with the timer pending and irq 0 set in
//!    `blocked_interrupts`, enabling interrupts and
//!    `LHCALL_SEND_INTERRUPTS` deliver nothing; unblocking delivers it
//!    once.

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::{FIRST_EXTERNAL_VECTOR, LHCALL_SEND_INTERRUPTS, Timespec32};
use lguest_rt::sync::IrqCell;
use lguest_rt::trap::set_irq_handler;
use lguest_rt::{BootInfo, TrapFrame, check, check_eq, hcall, irq};

/// Ticks of the periodic test.
const TICKS: usize = 8;
/// Clock-event period, in nanoseconds.
const PERIOD_NS: u32 = 2_000_000;

static COUNT: AtomicU32 = AtomicU32::new(0);
static VECTOR: AtomicU32 = AtomicU32::new(0);
static IRQS_ON: AtomicU32 = AtomicU32::new(u32::MAX);
/// Delivery time of each periodic tick (ns since the host's epoch).
static TIMES: IrqCell<[i64; TICKS]> = IrqCell::new([0; TICKS]);
/// Whether the handler re-arms the clock event.
static PERIODIC: AtomicU32 = AtomicU32::new(0);

fn ns(t: Timespec32) -> i64 {
    i64::from(t.tv_sec) * 1_000_000_000 + i64::from(t.tv_nsec)
}

/// Where the last tick interrupted the guest.
static TICK_EIP: AtomicU32 = AtomicU32::new(0);

fn tick(f: &mut TrapFrame) {
    IRQS_ON.store(u32::from(irq::enabled()), Ordering::Relaxed);
    TICK_EIP.store(f.eip, Ordering::Relaxed);
    VECTOR.store(f.vector, Ordering::Relaxed);
    let n = COUNT.fetch_add(1, Ordering::Relaxed) as usize;
    if PERIODIC.load(Ordering::Relaxed) != 0 {
        let now = ns(irq::time());
        TIMES.with(|t| {
            if let Some(slot) = t.get_mut(n) {
                *slot = now;
            }
        });
        if n + 1 < TICKS {
            hcall::set_clockevent(PERIOD_NS);
        }
    }
}

/// Some exits (each lets the host merge and try to deliver pending irqs).
fn exits(n: u32) {
    for _ in 0..n {
        hcall::send_interrupts();
    }
}

pub fn run(_boot: &BootInfo) {
    set_irq_handler(0, Some(tick));
    irq::unmask(0);
    periodic();
    irqs_off();
    noirq_window();
    blocked();
    irq::mask(0);
    set_irq_handler(0, None);
}

fn periodic() {
    COUNT.store(0, Ordering::Relaxed);
    PERIODIC.store(1, Ordering::Relaxed);
    let before = ns(irq::time());
    hcall::set_clockevent(PERIOD_NS);
    let mut halts = 0u32;
    loop {
        irq::disable();
        if COUNT.load(Ordering::Relaxed) as usize >= TICKS || halts == 10_000 {
            irq::enable();
            break;
        }
        halts += 1;
        hcall::halt();
    }
    PERIODIC.store(0, Ordering::Relaxed);
    check_eq!(
        COUNT.load(Ordering::Relaxed) as usize,
        TICKS,
        "periodic: {TICKS} ticks arrived"
    );
    check!(
        halts >= 1,
        "periodic: HALT woken by the timer ({halts} halts)"
    );
    check_eq!(
        VECTOR.load(Ordering::Relaxed),
        FIRST_EXTERNAL_VECTOR,
        "timer on vector 0x20"
    );
    check_eq!(
        IRQS_ON.load(Ordering::Relaxed),
        0,
        "irqs off in the timer handler"
    );
    let times = TIMES.with(|t| *t);
    let mut prev = before;
    let mut early = 0;
    for (k, &t) in times.iter().enumerate() {
        if t - prev < i64::from(PERIOD_NS) {
            lguest_rt::println!("lgtest: tick {k} after {} ns", t - prev);
            early += 1;
        }
        prev = t;
    }
    check_eq!(
        early,
        0,
        "periodic: no tick before its deadline ({PERIOD_NS} ns)"
    );
    lguest_rt::println!(
        "lgtest: {TICKS} ticks in {} us",
        (times[TICKS - 1] - before) / 1000
    );
}

/// Arm a 100 µs clock event with interrupts off and wait (with exits) until
/// the host reports it pending in `irq_pending`.
fn pending_with_irqs_off() -> bool {
    irq::disable();
    hcall::set_clockevent(100_000);
    let mut n = 0u32;
    while irq::pending() == 0 && n < 5_000_000 {
        hcall::send_interrupts();
        n += 1;
    }
    irq::pending() != 0
}

fn irqs_off() {
    COUNT.store(0, Ordering::Relaxed);
    check!(
        pending_with_irqs_off(),
        "irqs off: expired timer sets irq_pending"
    );
    exits(100);
    check_eq!(COUNT.load(Ordering::Relaxed), 0, "irqs off: not delivered");
    check_eq!(irq::pending(), 0x200, "irqs off: irq_pending stays 0x200");
    irq::enable();
    check_eq!(COUNT.load(Ordering::Relaxed), 1, "irqs on: delivered");
    exits(100);
    check_eq!(
        COUNT.load(Ordering::Relaxed),
        1,
        "irqs on: delivered exactly once"
    );
    check_eq!(irq::pending(), 0, "irq_pending cleared after delivery");
}

/// A pending irq is not delivered to a hypercall made from inside the
/// paravirt `iret`'s no-interrupt window, even with interrupts on; the next
/// hypercall from outside gets it.
fn noirq_window() {
    COUNT.store(0, Ordering::Relaxed);
    check!(pending_with_irqs_off(), "noirq: expired timer pending");
    // Interrupts on without asking for the pending one yet.
    irq::enable_quietly();
    lguest_rt::trap::noirq_hypercall(LHCALL_SEND_INTERRUPTS);
    // Once the window's `ret` has run, a delivery is allowed (any exit, e.g.
    // the host's poke or slice timer, may bring it before this check): the
    // rule is that none arrives with the guest inside the window.
    let (delivered, at) = (
        COUNT.load(Ordering::Relaxed),
        TICK_EIP.load(Ordering::Relaxed),
    );
    let d = irq::snapshot();
    check!(
        delivered == 0 || !(d.noirq_start..d.noirq_end).contains(&at),
        "noirq: nothing delivered inside the no-irq window"
    );
    hcall::send_interrupts();
    check_eq!(
        COUNT.load(Ordering::Relaxed),
        1,
        "noirq: delivered after the window"
    );
}

fn blocked() {
    COUNT.store(0, Ordering::Relaxed);
    check!(pending_with_irqs_off(), "blocked: expired timer pending");
    irq::mask(0);
    irq::enable();
    exits(100);
    check_eq!(
        COUNT.load(Ordering::Relaxed),
        0,
        "blocked irq not delivered with irqs on"
    );
    irq::unmask(0);
    check_eq!(COUNT.load(Ordering::Relaxed), 1, "unblocked irq delivered");
    exits(100);
    check_eq!(
        COUNT.load(Ordering::Relaxed),
        1,
        "unblocked irq delivered exactly once"
    );
}

/// Rounds of [`run_wake`]: together they sweep 4 µs (4000 instructions
/// under icount), several times the host's whole hypercall path.
const WAKE_ROUNDS: u32 = 4000;
/// Clock-event delta of the first round of [`run_wake`].
const WAKE_FIRST_NS: u32 = 50;

/// `mode=wake`: the lost wake-up race. Round `k` arms a clock event
/// `WAKE_FIRST_NS + k` ns ahead and halts at once. The scenario runs under
/// `-icount shift=0` (one virtual nanosecond per instruction, timers expire
/// exactly on time), so over the rounds the expiry sweeps, a few
/// instructions at a time, across the whole of the host's SET_CLOCKEVENT
/// return and HALT path, including the gap between its "anything pending?"
/// check and the instruction that halts the CPU. A host that does not close
/// that gap sleeps through such an expiry and, nothing else being armed,
/// never wakes: the scenario times out. Every round must be woken by its
/// own tick.
pub fn run_wake(_boot: &BootInfo) {
    set_irq_handler(0, Some(tick));
    irq::unmask(0);
    COUNT.store(0, Ordering::Relaxed);
    let mut halts = 0u32;
    for round in 0..WAKE_ROUNDS {
        irq::disable();
        hcall::set_clockevent(WAKE_FIRST_NS + round);
        while COUNT.load(Ordering::Relaxed) <= round {
            halts += 1;
            hcall::halt();
            irq::disable();
        }
        irq::enable();
    }
    check_eq!(
        COUNT.load(Ordering::Relaxed),
        WAKE_ROUNDS,
        "wake: every round woken by its own tick"
    );
    lguest_rt::println!("lgtest: {WAKE_ROUNDS} rounds, {halts} halts");
    irq::mask(0);
    set_irq_handler(0, None);
}
