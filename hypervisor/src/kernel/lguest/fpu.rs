//! Lazy FPU/SSE state for guests: executes the decisions of the pure
//! [`FpuState`] policy with `fxsave64`/`fxrstor64`.
//!
//! The hypervisor is built soft-float and never touches x87/SSE registers,
//! so the registers hold whichever guest ran last. Each guest owns an
//! [`FxSlot`] (allocated with it, freed with it); the live registers are
//! saved only when a *different* guest is about to run, into the slot of
//! the guest they belong to, and a guest whose slot was never saved into
//! (every new or restarted guest) starts from the reset image, so no guest
//! ever sees another's registers.

use core::cell::UnsafeCell;

use rustyvisor::lguest::fpustate::{FpuState, Load};

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

/// One guest's saved x87/SSE state. Keep it boxed (its address is
/// remembered while its guest owns the registers) and call [`release`]
/// before freeing it.
pub struct FxSlot {
    area: FxArea,
    saved: bool,
}

impl FxSlot {
    /// A slot that was never saved into.
    pub fn new() -> alloc::boxed::Box<Self> {
        alloc::boxed::Box::new(Self {
            area: FxArea([0; 512]),
            saved: false,
        })
    }
}

extern crate alloc;

/// The policy and the slot of the guest whose state is live.
struct Fpu(UnsafeCell<(FpuState, *mut FxSlot)>);

// SAFETY: only the boot CPU runs guests, and every access below happens with
// interrupts off on that CPU (no interrupt handler touches this state).
unsafe impl Sync for Fpu {}

static FPU: Fpu = Fpu(UnsafeCell::new((FpuState::new(), core::ptr::null_mut())));

/// Makes the registers hold the state of guest `instance`, whose slot is
/// `slot`, saving the previous owner's into its own slot. CR0.TS must be
/// clear.
pub fn switch_to(instance: u64, slot: &mut FxSlot) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off, single CPU: this is the only reference.
        let (state, live) = unsafe { &mut *FPU.0.get() };
        let switch = state.switch_to(instance, slot.saved);
        if switch.save_owner.is_some() && !live.is_null() {
            // SAFETY: `*live` is the slot of the guest that owns the
            // registers: still allocated, because `release` (called before
            // a slot is freed) clears the owner. A 16-byte aligned 512-byte
            // area; CR4.OSFXSR is set (init_cpu) and CR0.TS is clear, so
            // FXSAVE does not fault; interrupts are off on the only CPU.
            unsafe {
                let prev = &mut **live;
                core::arch::asm!("fxsave64 [{}]", in(reg) &raw mut prev.area, options(nostack));
                prev.saved = true;
            }
        }
        let image: *const FxArea = match switch.load {
            Load::Keep => return,
            Load::Reset => &raw const RESET,
            Load::Saved => &raw const slot.area,
        };
        // SAFETY: a 16-byte aligned 512-byte FXSAVE image, written by
        // FXSAVE or the reset image (reserved MXCSR bits clear), so FXRSTOR
        // does not fault (OSFXSR set, TS clear, as above).
        unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) image, options(nostack)) };
        *live = slot;
    });
}

/// Guest `instance` is gone (its slot is about to be freed): its registers
/// need not be saved, and its slot is forgotten.
pub fn release(instance: u64) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off, single CPU: this is the only reference.
        let (state, live) = unsafe { &mut *FPU.0.get() };
        if state.live() == Some(instance) {
            *live = core::ptr::null_mut();
        }
        state.release(instance);
    });
}
