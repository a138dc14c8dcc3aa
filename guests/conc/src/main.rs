//! `conc`: a guest for the concurrency scenarios, one behaviour per boot
//! chosen with `mode=<name>` on the module command line.
//!
//! | mode | what |
//! |---|---|
//! | `ticker` | `count=N` (20) clock events `period=MS` (20 ms) apart, each awaited with HALT; prints `tick K` and at the end the worst wake-up lateness it saw, then powers off |
//! | `cpu` | computes for `ms=M` (300 ms) of TSC time without a single exit of its own, printing `cpu: K%` as it goes, then powers off |
//! | `spin` | turns virtual irqs off and spins forever without an exit: only the host's time slice takes the CPU back, only `kill` ends it |
//! | `haltblocked` | blocks every virtual irq, turns them off and halts forever: it must cost nothing, and only `kill` ends it |
//! | `fpu` | fills xmm0–xmm7 with a pattern from `val=N` and checks for `ms=M` (300 ms) that they keep it while other guests run on the same CPU (preempted at every slice end), then powers off |
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::trap::set_irq_handler;
use lguest_rt::{BootInfo, TrapFrame, hcall, irq, println};

lguest_rt::entry!(main);

fn main(boot: &BootInfo) {
    match boot.arg("mode") {
        Some("ticker") => ticker(num(boot.arg("count"), 20), num(boot.arg("period"), 20)),
        Some("cpu") => cpu(num(boot.arg("ms"), 300)),
        Some("spin") => spin(),
        Some("haltblocked") => halt_blocked(),
        Some("fpu") => fpu(num(boot.arg("val"), 1), num(boot.arg("ms"), 300)),
        other => println!("FAIL: unknown mode {other:?}"),
    }
}

fn num(s: Option<&str>, default: u32) -> u32 {
    s.and_then(|v| v.parse().ok()).unwrap_or(default)
}

static TICKS: AtomicU32 = AtomicU32::new(0);

fn on_tick(_: &mut TrapFrame) {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

fn ticker(count: u32, period_ms: u32) {
    set_irq_handler(0, Some(on_tick));
    irq::unmask(0);
    let period_ns = u64::from(period_ms) * 1_000_000;
    let mut worst = 0u64;
    for k in 1..=count {
        let armed = irq::now_ns();
        hcall::set_clockevent(period_ms.saturating_mul(1_000_000));
        loop {
            irq::disable();
            if TICKS.load(Ordering::Relaxed) >= k {
                irq::enable();
                break;
            }
            hcall::halt();
        }
        let late = irq::now_ns().saturating_sub(armed + period_ns);
        worst = worst.max(late);
        println!("tick {k}");
    }
    println!(
        "ticker done: {count} ticks, worst lateness {} ms",
        worst / 1_000_000
    );
}

fn cpu(ms: u32) {
    let start = irq::now_ns();
    let total = u64::from(ms) * 1_000_000;
    let mut shown = 0;
    let mut x = 1u32;
    loop {
        let done = irq::now_ns().saturating_sub(start);
        if done >= total {
            break;
        }
        let pct = done * 100 / total;
        if pct >= shown + 25 {
            shown = pct - pct % 25;
            println!("cpu: {shown}%");
        }
        for _ in 0..10_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        }
        core::hint::black_box(x);
    }
    println!("cpu: done");
}

fn spin() -> ! {
    println!("spinning with irqs off");
    irq::disable();
    loop {
        core::hint::spin_loop();
    }
}

fn halt_blocked() -> ! {
    for i in 0..32 {
        irq::mask(i);
    }
    println!("halting with every irq blocked");
    irq::disable();
    loop {
        hcall::halt();
    }
}

/// Loads `v` into every dword of xmm0–xmm7.
fn xmm_fill(v: u32) {
    let buf = [v; 4];
    // SAFETY: reads 16 bytes from `buf`; SSE is enabled for guests (the
    // host sets CR4.OSFXSR); only xmm registers change, none of which the
    // compiler uses here (soft-float target, declared clobbered anyway).
    unsafe {
        asm!(
            "movdqu xmm0, [{p}]", "movdqa xmm1, xmm0", "movdqa xmm2, xmm0",
            "movdqa xmm3, xmm0", "movdqa xmm4, xmm0", "movdqa xmm5, xmm0",
            "movdqa xmm6, xmm0", "movdqa xmm7, xmm0",
            p = in(reg) buf.as_ptr(),
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            options(nostack, readonly),
        );
    }
}

/// Stores xmm0–xmm7 (8 × 16 bytes).
fn xmm_read() -> [[u32; 4]; 8] {
    let mut out = [[0u32; 4]; 8];
    // SAFETY: writes 128 bytes into `out`; SSE is enabled for guests.
    unsafe {
        asm!(
            "movdqu [{p}], xmm0", "movdqu [{p} + 16], xmm1", "movdqu [{p} + 32], xmm2",
            "movdqu [{p} + 48], xmm3", "movdqu [{p} + 64], xmm4", "movdqu [{p} + 80], xmm5",
            "movdqu [{p} + 96], xmm6", "movdqu [{p} + 112], xmm7",
            p = in(reg) out.as_mut_ptr(),
            options(nostack),
        );
    }
    out
}

fn fpu(val: u32, ms: u32) {
    let pattern = 0x5a5a_0000 | (val & 0xffff);
    xmm_fill(pattern);
    let start = irq::now_ns();
    let total = u64::from(ms) * 1_000_000;
    let mut checks = 0u32;
    let mut bad = None;
    while irq::now_ns().saturating_sub(start) < total {
        // Nothing here touches xmm registers: only the host's switches
        // between guests could change them.
        let regs = xmm_read();
        if let Some((i, r)) = regs.iter().enumerate().find(|(_, r)| **r != [pattern; 4]) {
            bad = Some((i, r[0]));
            break;
        }
        checks += 1;
        for _ in 0..2000 {
            core::hint::spin_loop();
        }
    }
    match bad {
        None => println!("PASS: fpu: xmm0-7 kept {pattern:#x} over {checks} checks"),
        Some((i, v)) => println!("FAIL: fpu: xmm{i} holds {v:#x}, expected {pattern:#x}"),
    }
}
