//! `mode=fresh`: nothing of a previous guest survives into a new one. Run
//! it as a module that restarts itself (`LHCALL_SHUTDOWN(RESTART)` at the
//! end of every boot): the launcher starts the same image again, in the same
//! place, up to three times, and every boot checks what the one before it
//! left behind, then leaves as much behind as it can:
//!
//! 1. **RAM**: every byte of guest memory the loader did not write (below
//!    the image above the command line, and above the image to the top of
//!    RAM) reads zero; afterwards all of it is filled with a pattern.
//! 2. **FPU/SSE**: the FXSAVE image at entry is the architectural reset
//!    state (FCW 0x037f, FSW 0, empty tag word, MXCSR 0x1f80, every x87 and
//!    XMM register zero); afterwards the guest loads non-default values into
//!    all of them.
//! 3. **Clock event**: with interrupts enabled and no clock event of its
//!    own, no timer interrupt arrives in [`WATCH_MS`]; afterwards the guest
//!    arms a clock event [`STRAY_MS`] ahead and restarts before it fires, so
//!    a host that does not cancel a dead guest's clock event delivers it to
//!    the next boot.
//!
//! Each boot prints its checks and `DONE: 3 passed, 0 failed`; the scenario
//! expects that four times, so a check that fails on any boot (or a boot
//! that stops early) fails it.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::trap::set_irq_handler;
use lguest_rt::{BootInfo, TrapFrame, check, hcall, irq, println};

/// How long a boot watches for a stray timer interrupt.
const WATCH_MS: u64 = 400;
/// How far ahead the clock event each boot leaves behind is armed: longer
/// than a restart takes, shorter than [`WATCH_MS`].
const STRAY_MS: u32 = 150;
/// Written over all free RAM before each restart.
const PATTERN: u32 = 0xA5C3_5A3C;

unsafe extern "C" {
    /// Start and end of the image (linker script `guests/guest.ld`).
    static __guest_start: u8;
    static __guest_end: u8;
}

static TICKS: AtomicU32 = AtomicU32::new(0);

fn tick(_f: &mut TrapFrame) {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// `[from, to)` ranges of guest memory nobody wrote at load time.
fn free_ranges(boot: &BootInfo) -> [(u32, u32); 2] {
    let cmdline_end = boot.cmdline_addr + boot.cmdline.len() as u32 + 1;
    let image_start = (&raw const __guest_start) as u32;
    let image_end = (&raw const __guest_end) as u32;
    let top = u32::try_from(boot.mem_bytes).unwrap_or(u32::MAX);
    [(cmdline_end, image_start), (image_end, top)]
}

pub fn run(boot: &BootInfo) {
    let fpu_clean = fpu_is_reset();
    let (dirty_at, dirty) = first_dirty_byte(boot);
    check!(
        dirty == 0,
        "fresh: all free RAM is zero (first nonzero byte at {dirty_at:#x}: {dirty:#x})"
    );
    check!(fpu_clean, "fresh: FPU/SSE registers are in the reset state");
    let strays = watch_for_ticks();
    check!(
        strays == 0,
        "fresh: no timer interrupt without a clock event ({strays} arrived)"
    );
    // Leave as much behind as possible for the next boot.
    fill_ram(boot);
    dirty_fpu();
    set_irq_handler(0, None);
    hcall::set_clockevent(STRAY_MS * 1_000_000);
    lguest_rt::test::summary();
    lguest_rt::restart("fresh: restart with a clock event armed");
}

fn first_dirty_byte(boot: &BootInfo) -> (u32, u8) {
    for (from, to) in free_ranges(boot) {
        let mut a = from;
        while a < to {
            // SAFETY: linear mode maps all guest RAM; `a` is below the top
            // of RAM and outside the image (no Rust object lives there).
            let b = unsafe { (a as *const u8).read_volatile() };
            if b != 0 {
                return (a, b);
            }
            a += 1;
        }
    }
    (0, 0)
}

fn fill_ram(boot: &BootInfo) {
    for (from, to) in free_ranges(boot) {
        let mut a = from.next_multiple_of(4);
        while a + 4 <= to {
            // SAFETY: as in `first_dirty_byte`; nothing of ours lives there.
            unsafe { (a as *mut u32).write_volatile(PATTERN) };
            a += 4;
        }
    }
}

#[repr(C, align(16))]
struct FxArea([u8; 512]);

fn fxsave() -> FxArea {
    let mut area = FxArea([0; 512]);
    // SAFETY: FXSAVE writes 512 bytes to a 16-byte-aligned buffer; the host
    // enables OSFXSR for guests and TS is clear (the guest never set it).
    unsafe { asm!("fxsave [{}]", in(reg) area.0.as_mut_ptr(), options(nostack)) };
    area
}

/// Whether the x87/SSE state is the one a new guest must see: FCW 0x037f,
/// FSW 0, abridged tag word 0 (all empty), MXCSR 0x1f80, and the eight
/// x87 and eight XMM registers (bytes 32..288) all zero.
fn fpu_is_reset() -> bool {
    let a = fxsave();
    let u16_at = |o: usize| u16::from_le_bytes([a.0[o], a.0[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([a.0[o], a.0[o + 1], a.0[o + 2], a.0[o + 3]]);
    let (fcw, fsw, ftw, mxcsr) = (u16_at(0), u16_at(2), a.0[4], u32_at(24));
    let regs_zero = a.0[32..288].iter().all(|&b| b == 0);
    if (fcw, fsw, ftw, mxcsr, regs_zero) != (0x037f, 0, 0, 0x1f80, true) {
        println!(
            "fresh: FPU state FCW {fcw:#x} FSW {fsw:#x} FTW {ftw:#x} MXCSR {mxcsr:#x}, \
             registers zero: {regs_zero}"
        );
        return false;
    }
    true
}

fn dirty_fpu() {
    let a = FxArea([0x5A; 512]);
    let fcw: u16 = 0x027f;
    let mxcsr: u32 = 0x9fc0; // FTZ | DAZ | all masked
    // SAFETY: loads x87 constants (the stack has room for eight), XMM
    // registers from a 16-byte-aligned buffer, and control words with
    // every exception still masked; nothing of this guest uses them after.
    unsafe {
        asm!(
            "fldpi", "fldpi", "fldpi", "fldpi", "fldpi", "fldpi", "fldpi", "fldpi",
            "fldcw [{fcw}]",
            "movaps xmm0, [{a}]", "movaps xmm1, [{a}]", "movaps xmm2, [{a}]",
            "movaps xmm3, [{a}]", "movaps xmm4, [{a}]", "movaps xmm5, [{a}]",
            "movaps xmm6, [{a}]", "movaps xmm7, [{a}]",
            "ldmxcsr [{mxcsr}]",
            a = in(reg) a.0.as_ptr(),
            fcw = in(reg) &raw const fcw,
            mxcsr = in(reg) &raw const mxcsr,
            options(nostack),
        );
    }
}

/// Timer interrupts that arrive in [`WATCH_MS`] with interrupts enabled and
/// irq 0 unmasked, without this guest arming a clock event.
fn watch_for_ticks() -> u32 {
    TICKS.store(0, Ordering::Relaxed);
    set_irq_handler(0, Some(tick));
    irq::unmask(0);
    irq::enable();
    let khz = u64::from(irq::tsc_khz().max(1));
    let start = lguest_rt::irq::rdtsc();
    while lguest_rt::irq::rdtsc().wrapping_sub(start) < WATCH_MS * khz {
        // Each exit lets the host deliver whatever is pending.
        hcall::send_interrupts();
    }
    irq::disable();
    TICKS.load(Ordering::Relaxed)
}
