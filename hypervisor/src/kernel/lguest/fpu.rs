//! Lazy FPU/SSE state for guests: executes the decisions of the pure
//! [`FpuState`] policy with `fxsave64`/`fxrstor64`.
//!
//! The hypervisor is built soft-float and never touches x87/SSE registers,
//! so the registers hold whichever guest ran last. Each guest slot has an
//! FXSAVE area; the live registers are saved only when a *different* guest is
//! about to run, and a guest instance that has no saved state of its own
//! (every new or restarted guest) starts from the reset image, so no guest
//! ever sees another's registers.

use core::cell::UnsafeCell;

use rustyvisor::lguest::fpustate::{FpuState, Load};

use super::MAX_GUESTS;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct FxArea([u8; 512]);

/// Reset image: FCW 0x037F, MXCSR 0x1F80, all registers zero.
static RESET: FxArea = {
    let mut a = [0u8; 512];
    a[0] = 0x7F;
    a[1] = 0x03;
    a[24] = 0x80;
    a[25] = 0x1F;
    FxArea(a)
};

struct Fpu(UnsafeCell<(FpuState<MAX_GUESTS>, [FxArea; MAX_GUESTS])>);

// SAFETY: only the boot CPU runs guests, and every access below happens with
// interrupts off on that CPU (no interrupt handler touches this state).
unsafe impl Sync for Fpu {}

static FPU: Fpu = Fpu(UnsafeCell::new((
    FpuState::new(),
    [FxArea([0; 512]); MAX_GUESTS],
)));

/// Makes the registers hold the state of guest `instance` in `slot`, saving
/// the previous owner's. CR0.TS must be clear.
pub fn switch_to(slot: usize, instance: u64) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off, single CPU: this is the only reference.
        let (state, areas) = unsafe { &mut *FPU.0.get() };
        let switch = state.switch_to(slot, instance);
        if let Some(area) = switch.save_to.and_then(|s| areas.get_mut(s)) {
            // SAFETY: the areas are 16-byte aligned 512-byte FXSAVE images;
            // CR4.OSFXSR is set (init_cpu) and CR0.TS is clear, so FXSAVE
            // does not fault; interrupts are off on the only CPU.
            unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) area, options(nostack)) };
        }
        let image: *const FxArea = match switch.load {
            Load::Keep => return,
            Load::Reset => &raw const RESET,
            Load::Saved => match areas.get(slot) {
                Some(area) => area,
                None => &raw const RESET,
            },
        };
        // SAFETY: a 16-byte aligned 512-byte FXSAVE image, written by
        // FXSAVE or the reset image (reserved MXCSR bits clear), so FXRSTOR
        // does not fault (OSFXSR set, TS clear, as above).
        unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) image, options(nostack)) };
    });
}

/// Guest `instance` in `slot` is gone: its registers need not be saved.
pub fn release(slot: usize, instance: u64) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off, single CPU: this is the only reference.
        let (state, _) = unsafe { &mut *FPU.0.get() };
        state.release(slot, instance);
    });
}
