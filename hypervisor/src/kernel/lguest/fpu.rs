//! Lazy FPU/SSE state for guests.
//!
//! The hypervisor is built soft-float and never touches x87/SSE registers,
//! so the registers hold whichever guest ran last. Each guest slot has an
//! FXSAVE area; the live registers are saved only when a *different* guest is
//! about to run (`switch_to`), and a new guest starts from a clean image
//! (`reset`), so no guest ever sees another's registers.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::MAX_GUESTS;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct FxArea([u8; 512]);

/// Default image: FCW 0x037F, MXCSR 0x1F80, all registers zero.
const DEFAULT: FxArea = {
    let mut a = [0u8; 512];
    a[0] = 0x7F;
    a[1] = 0x03;
    a[24] = 0x80;
    a[25] = 0x1F;
    FxArea(a)
};

struct Areas(UnsafeCell<[FxArea; MAX_GUESTS]>);

// SAFETY: only the boot CPU runs guests, and every access below happens with
// interrupts off on that CPU (no interrupt handler touches these areas).
unsafe impl Sync for Areas {}

static AREAS: Areas = Areas(UnsafeCell::new([DEFAULT; MAX_GUESTS]));
/// Slot whose state is in the registers, or `NONE`.
static OWNER: AtomicUsize = AtomicUsize::new(NONE);
const NONE: usize = usize::MAX;

fn area(slot: usize) -> *mut FxArea {
    // Callers pass `slot < MAX_GUESTS` (KernelCore reduces it modulo).
    let slot = slot % MAX_GUESTS;
    // SAFETY: in-bounds element pointer of the static array.
    unsafe { AREAS.0.get().cast::<FxArea>().add(slot) }
}

/// A new guest in `slot` starts from the clean image.
pub fn reset(slot: usize) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off, single CPU: nobody else uses the area.
        unsafe { *area(slot) = DEFAULT };
        if OWNER.load(Ordering::Relaxed) == slot {
            OWNER.store(NONE, Ordering::Relaxed);
        }
    });
}

/// Makes the registers hold `slot`'s state, saving the previous owner's.
/// CR0.TS must be clear.
pub fn switch_to(slot: usize) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let owner = OWNER.load(Ordering::Relaxed);
        if owner == slot {
            return;
        }
        // SAFETY: the areas are 16-byte aligned 512-byte FXSAVE images;
        // CR4.OSFXSR is set (init_cpu) and CR0.TS is clear, so neither
        // instruction faults; interrupts are off on the only CPU.
        unsafe {
            if owner != NONE {
                core::arch::asm!("fxsave64 [{}]", in(reg) area(owner), options(nostack));
            }
            core::arch::asm!("fxrstor64 [{}]", in(reg) area(slot), options(nostack));
        }
        OWNER.store(slot, Ordering::Relaxed);
    });
}

/// The guest in `slot` is gone: its registers need not be saved.
pub fn release(slot: usize) {
    let _ = OWNER.compare_exchange(slot, NONE, Ordering::Relaxed, Ordering::Relaxed);
}
