//! The local APIC (xAPIC, memory-mapped): end of interrupt, the timer in
//! one-shot mode, and its calibration against the PIT.

use core::sync::atomic::{AtomicU64, Ordering};

use super::arch::cpu;
use super::mem;

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0xF0;
/// Vector of APIC internal errors.
pub const ERROR_VECTOR: u8 = 0xFE;
/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_EOI: u64 = 0xB0;
const REG_SVR: u64 = 0xF0;
const REG_ESR: u64 = 0x280;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_LINT0: u64 = 0x350;
const REG_LVT_LINT1: u64 = 0x360;
const REG_LVT_ERROR: u64 = 0x370;
const REG_TIMER_INIT: u64 = 0x380;
const REG_TIMER_CUR: u64 = 0x390;
const REG_TIMER_DIV: u64 = 0x3E0;

const IA32_APIC_BASE: u32 = 0x1B;
const LVT_MASKED: u32 = 1 << 16;

static BASE: AtomicU64 = AtomicU64::new(0);
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);

fn read(reg: u64) -> u32 {
    let base = BASE.load(Ordering::Relaxed);
    if base == 0 {
        return 0;
    }
    // SAFETY: `base` is the uncached MMIO mapping of this CPU's local APIC
    // page made in `init`, and `reg` is an architectural register offset.
    unsafe { ((base + reg) as *const u32).read_volatile() }
}

fn write(reg: u64, val: u32) {
    let base = BASE.load(Ordering::Relaxed);
    if base == 0 {
        return;
    }
    // SAFETY: as in `read`.
    unsafe { ((base + reg) as *mut u32).write_volatile(val) }
}

/// Maps and enables the local APIC at physical address `phys` (from the MADT,
/// or the IA32_APIC_BASE MSR), masks LINT0/1 and sets the spurious vector.
pub fn init(phys: Option<u64>) {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let msr = unsafe { cpu::rdmsr(IA32_APIC_BASE) };
    let phys = phys.unwrap_or(msr & 0xF_FFFF_F000);
    // Make sure the APIC is globally enabled (bit 11) in xAPIC mode.
    // SAFETY: setting the global enable bit keeps the base address unchanged.
    unsafe { cpu::wrmsr(IA32_APIC_BASE, msr | (1 << 11)) };
    let virt = mem::map_mmio(phys, 4096);
    BASE.store(virt, Ordering::Relaxed);
    write(REG_TPR, 0);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_LVT_ERROR, u32::from(ERROR_VECTOR));
    write(REG_ESR, 0);
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    eoi();
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Measures the timer's tick rate (divide-by-16) against the PIT, over 10 ms.
/// Returns ticks per second.
pub fn calibrate_timer() -> u64 {
    write(REG_TIMER_DIV, 0x3); // divide by 16
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    let elapsed = super::pit::measure(
        10,
        || write(REG_TIMER_INIT, u32::MAX),
        || u32::MAX - read(REG_TIMER_CUR),
    );
    write(REG_TIMER_INIT, 0);
    let hz = u64::from(elapsed) * 100;
    TIMER_HZ.store(hz, Ordering::Relaxed);
    hz
}

/// Timer ticks per second (0 before calibration).
pub fn timer_hz() -> u64 {
    TIMER_HZ.load(Ordering::Relaxed)
}

/// Arms the one-shot timer to fire in `ticks` timer ticks (0 disarms it).
pub fn arm_oneshot(ticks: u32) {
    write(REG_LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked
    write(REG_TIMER_INIT, ticks);
}
