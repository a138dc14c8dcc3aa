//! Density guest (`cargo xtask bench`, `tests/benches/guests.toml`): the
//! smallest useful guest, linked at 1 MiB (`build.rs`) so that it runs in
//! 4 MiB of RAM, the least `mem=` accepts.
//!
//! It prints `dense: up` (the hypervisor counts a guest as up from its first
//! line), then stays alive: it arms a clock event one second ahead and halts,
//! `alive=N` times (default 10), each wake-up being the clock interrupt; then
//! it prints `dense: alive for N ticks` and returns, which powers it off.
//! A guest that stopped running would never print the second line, and the
//! hypervisor counts at most how many were up at once (`density`), so the
//! figure is the number of guests alive together.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::trap::{TrapFrame, set_irq_handler};
use lguest_rt::{BootInfo, hcall, irq, println};

lguest_rt::entry!(main);

/// Clock interrupts taken.
static TICKS: AtomicU32 = AtomicU32::new(0);

fn tick(_f: &mut TrapFrame) {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// Seconds alive by default (`alive=N` changes it).
const ALIVE_TICKS: u32 = 10;

fn main(boot: &BootInfo) {
    println!("dense: up");
    let want = boot
        .arg("alive")
        .and_then(|v| v.parse().ok())
        .unwrap_or(ALIVE_TICKS);
    set_irq_handler(0, Some(tick));
    irq::unmask(0);
    while TICKS.load(Ordering::Relaxed) < want {
        let before = TICKS.load(Ordering::Relaxed);
        irq::disable();
        hcall::set_clockevent(1_000_000_000);
        // Wait for the tick without a lost wake-up: halt with interrupts
        // off; the host enables them to deliver the clock irq.
        while TICKS.load(Ordering::Relaxed) == before {
            hcall::halt();
            irq::disable();
        }
        irq::enable();
    }
    println!("dense: alive for {} ticks", TICKS.load(Ordering::Relaxed));
}
