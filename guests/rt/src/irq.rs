//! The guest's `struct lguest_data` and the virtual interrupt flag.
//!
//! The real `EFLAGS.IF` is always 1 while the guest runs; "interrupts off"
//! means `lguest_data.irq_enabled == 0`. The host checks that field before
//! delivering a virtual irq and, if it is 0, sets `irq_pending = 0x200`
//! instead; [`enable`] and [`restore`] then issue `LHCALL_SEND_INTERRUPTS`
//! so the pending irq arrives promptly.
//!
//! The host reads and writes `lguest_data` whenever the guest exits, so
//! every access here is volatile and ordered with compiler fences.

use core::cell::UnsafeCell;
use core::sync::atomic::{Ordering, compiler_fence};

use guest_abi::{LGUEST_IRQS, LHCALL_SEND_INTERRUPTS, LguestData, Timespec32, X86_EFLAGS_IF};

/// The shared page itself. `#[repr(transparent)]` so its address is the
/// address of the [`LguestData`].
#[repr(transparent)]
pub(crate) struct SharedData(UnsafeCell<LguestData>);

// SAFETY: single virtual CPU; all accesses are volatile reads/writes of
// individual fields through the raw pointer (never references), and the host
// only touches the data while the guest is stopped in an exit.
unsafe impl Sync for SharedData {}

/// The guest's `lguest_data`, in `.data` with Linux's initial contents
/// (irq 0 blocked, ring empty, `syscall_vec` 0x80, `kernel_address` 0 — the
/// runtime has no kernel/user split). The paravirt `iret` stub writes
/// `irq_enabled` (offset 0) directly by symbol.
pub(crate) static LGUEST_DATA: SharedData =
    SharedData(UnsafeCell::new(LguestData::guest_initial(0)));

const _: () = assert!(LguestData::OFF_IRQ_ENABLED == 0);

/// Raw pointer to the shared data.
#[inline]
pub(crate) fn data() -> *mut LguestData {
    LGUEST_DATA.0.get()
}

/// Volatile read of one `u32`-sized field of `lguest_data`.
macro_rules! read_field {
    ($field:ident) => {{
        // SAFETY: `data()` points to the live static; the field is aligned
        // and plain data; volatile because the host writes it.
        unsafe { (&raw const (*$crate::irq::data()).$field).read_volatile() }
    }};
}

/// Volatile write of one field of `lguest_data`.
macro_rules! write_field {
    ($field:ident, $value:expr) => {{
        let v = $value;
        // SAFETY: as in `read_field!`; the guest is the only writer while
        // it runs.
        unsafe { (&raw mut (*$crate::irq::data()).$field).write_volatile(v) }
    }};
}
pub(crate) use write_field;

/// Guest-physical (= virtual, linear mode) address of `lguest_data`, as
/// passed to `LHCALL_LGUEST_INIT`.
pub fn lguest_data_addr() -> u32 {
    data() as u32
}

/// Saved virtual interrupt state from [`save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct IrqFlags(pub u32);

impl IrqFlags {
    /// Whether interrupts were enabled.
    pub const fn enabled(self) -> bool {
        self.0 & X86_EFLAGS_IF != 0
    }
}

/// Whether virtual interrupts are enabled.
pub fn enabled() -> bool {
    read_field!(irq_enabled) & X86_EFLAGS_IF != 0
}

/// Disable virtual interrupts (`irq_enabled = 0`).
pub fn disable() {
    compiler_fence(Ordering::SeqCst);
    write_field!(irq_enabled, 0);
    compiler_fence(Ordering::SeqCst);
}

/// Enable virtual interrupts (`irq_enabled = 0x200`) and, if the host left
/// an irq pending meanwhile, ask for it with `LHCALL_SEND_INTERRUPTS`.
pub fn enable() {
    restore(IrqFlags(X86_EFLAGS_IF));
}

/// Enable virtual interrupts (`irq_enabled = 0x200`) without asking for
/// one the host left pending: the next exit delivers it (for tests of when
/// the host delivers).
pub fn enable_quietly() {
    compiler_fence(Ordering::SeqCst);
    write_field!(irq_enabled, X86_EFLAGS_IF);
    compiler_fence(Ordering::SeqCst);
}

/// Disable virtual interrupts, returning the previous state.
#[inline]
pub fn save() -> IrqFlags {
    compiler_fence(Ordering::SeqCst);
    let flags = IrqFlags(read_field!(irq_enabled));
    write_field!(irq_enabled, 0);
    compiler_fence(Ordering::SeqCst);
    flags
}

/// Restore a state from [`save`]; like [`enable`] if it was enabled.
#[inline]
pub fn restore(flags: IrqFlags) {
    compiler_fence(Ordering::SeqCst);
    write_field!(irq_enabled, flags.0 & X86_EFLAGS_IF);
    compiler_fence(Ordering::SeqCst);
    if flags.enabled() && read_field!(irq_pending) != 0 {
        crate::hcall::sync0(LHCALL_SEND_INTERRUPTS);
    }
}

/// Run `f` with virtual interrupts disabled.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    let flags = save();
    let r = f();
    restore(flags);
    r
}

/// Block virtual irq `irq` (set its bit in `blocked_interrupts`).
///
/// # Panics
///
/// If `irq >= 32`.
pub fn mask(irq: u32) {
    assert!(irq < LGUEST_IRQS, "irq {irq} out of range");
    without(|| {
        let b = read_field!(blocked_interrupts);
        write_field!(blocked_interrupts, b | (1 << irq));
    });
}

/// Unblock virtual irq `irq`; if something is pending, ask the host to
/// deliver it.
///
/// # Panics
///
/// If `irq >= 32`.
pub fn unmask(irq: u32) {
    assert!(irq < LGUEST_IRQS, "irq {irq} out of range");
    let flags = save();
    let b = read_field!(blocked_interrupts);
    write_field!(blocked_interrupts, b & !(1 << irq));
    compiler_fence(Ordering::SeqCst);
    write_field!(irq_enabled, flags.0 & X86_EFLAGS_IF);
    compiler_fence(Ordering::SeqCst);
    if flags.enabled() {
        // The host only re-evaluates pending irqs on an exit; with interrupts
        // off, `enable`/`restore` will see `irq_pending` later.
        crate::hcall::sync0(LHCALL_SEND_INTERRUPTS);
    }
}

/// The `blocked_interrupts` bitmap.
pub fn blocked() -> u32 {
    read_field!(blocked_interrupts)
}

/// `lguest_data.irq_pending` (0x200 when the host holds back an irq).
pub fn pending() -> u32 {
    read_field!(irq_pending) as u32
}

/// `lguest_data.cr2`: faulting address of the last reflected page fault.
pub fn cr2() -> u32 {
    read_field!(cr2)
}

/// `lguest_data.time`: wall clock as last written by the host.
pub fn time() -> Timespec32 {
    read_field!(time)
}

/// `lguest_data.tsc_khz` (0 if the TSC must not be used).
pub fn tsc_khz() -> u32 {
    read_field!(tsc_khz)
}

/// The time-stamp counter (`rdtsc`, allowed at CPL 1 and 3: the host
/// leaves CR4.TSD clear).
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter into edx:eax.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Nanoseconds since an arbitrary start, from the TSC and the host's
/// [`tsc_khz`] (1 kHz if the host gave none).
pub fn now_ns() -> u64 {
    let khz = u64::from(tsc_khz().max(1));
    rdtsc().saturating_mul(1_000_000) / khz
}

/// `lguest_data.reserve_mem`: bytes at the top of 4 GiB the guest must not use.
pub fn reserve_mem() -> u32 {
    read_field!(reserve_mem)
}

/// A volatile copy of the whole structure.
pub fn snapshot() -> LguestData {
    // SAFETY: as in `read_field!`, for the whole (plain-data) structure.
    unsafe { data().read_volatile() }
}
