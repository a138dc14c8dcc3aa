//! Virtual interrupts, trap numbers and shutdown reasons.
//!
//! Virtual irq *n* (`n < LGUEST_IRQS`) is delivered through guest IDT vector
//! `FIRST_EXTERNAL_VECTOR + n`; irq 0 is the timer (`LHCALL_SET_CLOCKEVENT`),
//! the launcher hands out irqs from 1 upward.
//!
//! # Frames the host builds
//!
//! For a reflected trap or a virtual interrupt taken at the guest's own
//! privilege level (CPL 1) the host pushes, on the current guest stack:
//! `EFLAGS`, `CS`, `EIP` and — only for the vectors in
//! [`TRAPS_WITH_ERROR_CODE`] — the error code. The pushed `EFLAGS.IF` mirrors
//! `lguest_data.irq_enabled`. Coming from CPL 3 the host first switches to the
//! stack given by `LHCALL_SET_STACK` and pushes the old `SS` and `ESP`.
//! Delivery through an interrupt gate (type 0xE) clears `irq_enabled`.

/// Number of virtual interrupt lines.
pub const LGUEST_IRQS: u32 = 32;
/// Guest IDT vector of virtual irq 0.
pub const FIRST_EXTERNAL_VECTOR: u32 = 0x20;
/// The guest's system-call vector (`lguest_data.syscall_vec`).
pub const SYSCALL_VECTOR: u32 = 0x80;
/// The interrupt flag in `EFLAGS`, also the "enabled" value of
/// `lguest_data.irq_enabled` and `irq_pending`.
pub const X86_EFLAGS_IF: u32 = 0x200;
/// Number of IDT vectors.
pub const IDT_ENTRIES: u32 = 256;

/// `LHCALL_SHUTDOWN` reason: power off (the launcher exits).
pub const LGUEST_SHUTDOWN_POWEROFF: u32 = 1;
/// `LHCALL_SHUTDOWN` reason: restart (the control channel's `read` returns `ERESTART`).
pub const LGUEST_SHUTDOWN_RESTART: u32 = 2;

/// Exception vectors (Linux `X86_TRAP_*` names).
pub mod trap {
    /// Divide error.
    pub const DE: u32 = 0;
    /// Debug.
    pub const DB: u32 = 1;
    /// Non-maskable interrupt.
    pub const NMI: u32 = 2;
    /// Breakpoint (`int3`).
    pub const BP: u32 = 3;
    /// Overflow (`into`).
    pub const OF: u32 = 4;
    /// Bound range exceeded.
    pub const BR: u32 = 5;
    /// Invalid opcode.
    pub const UD: u32 = 6;
    /// Device not available (FPU use with CR0.TS set).
    pub const NM: u32 = 7;
    /// Double fault (error code).
    pub const DF: u32 = 8;
    /// Coprocessor segment overrun (legacy).
    pub const OLD_MF: u32 = 9;
    /// Invalid TSS (error code).
    pub const TS: u32 = 10;
    /// Segment not present (error code).
    pub const NP: u32 = 11;
    /// Stack-segment fault (error code).
    pub const SS: u32 = 12;
    /// General protection (error code).
    pub const GP: u32 = 13;
    /// Page fault (error code; address in `lguest_data.cr2`).
    pub const PF: u32 = 14;
    /// Spurious interrupt (reserved).
    pub const SPURIOUS: u32 = 15;
    /// x87 floating-point error.
    pub const MF: u32 = 16;
    /// Alignment check (error code).
    pub const AC: u32 = 17;
    /// Machine check.
    pub const MC: u32 = 18;
    /// SIMD floating-point exception (Linux: `X86_TRAP_XF`).
    pub const XM: u32 = 19;
}

/// The traps for which the frame carries an error code (lguest's list).
pub const TRAPS_WITH_ERROR_CODE: [u32; 7] = [
    trap::DF,
    trap::TS,
    trap::NP,
    trap::SS,
    trap::GP,
    trap::PF,
    trap::AC,
];

/// Whether trap `vector` pushes an error code (lguest's `has_err()`).
pub const fn has_error_code(vector: u32) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17)
}

/// Guest IDT vectors whose `LHCALL_LOAD_IDT_ENTRY` the host silently ignores:
/// NMI, double fault, spurious and the hypercall vector.
pub const IGNORED_IDT_VECTORS: [u32; 4] = [trap::NMI, trap::DF, trap::SPURIOUS, 0x1f];

/// The IDT vector of virtual irq `irq`, or `None` if `irq >= LGUEST_IRQS`.
pub const fn irq_vector(irq: u32) -> Option<u32> {
    if irq < LGUEST_IRQS {
        Some(FIRST_EXTERNAL_VECTOR + irq)
    } else {
        None
    }
}

/// The virtual irq delivered through `vector`, if any.
pub const fn vector_irq(vector: u32) -> Option<u32> {
    if vector >= FIRST_EXTERNAL_VECTOR && vector < FIRST_EXTERNAL_VECTOR + LGUEST_IRQS {
        Some(vector - FIRST_EXTERNAL_VECTOR)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_set() {
        for v in 0..256 {
            assert_eq!(has_error_code(v), TRAPS_WITH_ERROR_CODE.contains(&v), "{v}");
        }
    }

    #[test]
    fn trap_numbers() {
        assert_eq!(trap::DE, 0);
        assert_eq!(trap::UD, 6);
        assert_eq!(trap::NM, 7);
        assert_eq!(trap::GP, 13);
        assert_eq!(trap::PF, 14);
        assert_eq!(trap::XM, 19);
    }

    #[test]
    fn irq_vectors() {
        assert_eq!(irq_vector(0), Some(0x20));
        assert_eq!(irq_vector(31), Some(0x3f));
        assert_eq!(irq_vector(32), None);
        assert_eq!(vector_irq(0x20), Some(0));
        assert_eq!(vector_irq(0x3f), Some(31));
        assert_eq!(vector_irq(0x40), None);
        assert_eq!(vector_irq(0x1f), None);
    }

    #[test]
    fn misc_constants() {
        assert_eq!(LGUEST_IRQS, 32);
        assert_eq!(X86_EFLAGS_IF, 0x200);
        assert_eq!(LGUEST_SHUTDOWN_POWEROFF, 1);
        assert_eq!(LGUEST_SHUTDOWN_RESTART, 2);
        assert_eq!(SYSCALL_VECTOR, 0x80);
    }
}
