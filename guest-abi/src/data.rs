//! `struct lguest_data`: the page of state shared between guest and host.
//!
//! The guest owns a static [`LguestData`] and hands its guest-physical address
//! to the host with `LHCALL_LGUEST_INIT`. From then on both sides read and
//! write it (see the per-field docs for who writes what). The host must access
//! it only through its bounds-checked guest-memory accessor, using the byte
//! offsets in [`LguestData`]'s associated `OFF_*` constants.

use core::mem::{offset_of, size_of};

use crate::hcall::{HCALL_STATUS_EMPTY, HcallArgs, LHCALL_RING_SIZE};
use crate::irq::X86_EFLAGS_IF;

/// A 32-bit `struct timespec` as seen by an i386 guest.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timespec32 {
    /// Seconds since the epoch (`CLOCK_REALTIME`).
    pub tv_sec: i32,
    /// Nanoseconds, `0..1_000_000_000`.
    pub tv_nsec: i32,
}

/// `struct lguest_data` in the E4 (Linux 3.10–4.0) layout: no `pgdir`, with
/// `noirq_start`/`noirq_end`. 1392 bytes, 4-byte aligned.
///
/// | Off | Field | Writer |
/// |---|---|---|
/// | 0 | `irq_enabled` | guest (host on delivery / HALT) |
/// | 4 | `blocked_interrupts` | guest |
/// | 8 | `cr2` | host |
/// | 12 | `time` | host |
/// | 20 | `irq_pending` | host |
/// | 24 | `hcall_status[64]` | both |
/// | 88 | `hcalls[64]` | guest |
/// | 1368 | `reserve_mem` | host at INIT |
/// | 1372 | `tsc_khz` | host at INIT |
/// | 1376 | `noirq_start` | guest (read by host at INIT) |
/// | 1380 | `noirq_end` | guest (read by host at INIT) |
/// | 1384 | `kernel_address` | guest (read by host at INIT) |
/// | 1388 | `syscall_vec` | guest (read by host at INIT) |
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LguestData {
    /// Virtual interrupt flag: [`X86_EFLAGS_IF`] (0x200) = interrupts enabled,
    /// 0 = disabled. Only the IF bit is meaningful.
    pub irq_enabled: u32,
    /// Bitmap of the 32 virtual irqs; bit *n* set = irq *n* masked.
    pub blocked_interrupts: u32,
    /// Faulting address of the last page fault reflected to the guest.
    pub cr2: u32,
    /// Wall-clock time, rewritten by the host at INIT and on every
    /// interrupt-delivery attempt.
    pub time: Timespec32,
    /// Set by the host to 0x200 when an irq is pending while `irq_enabled` is
    /// 0; the guest then issues `LHCALL_SEND_INTERRUPTS` when it re-enables.
    pub irq_pending: i32,
    /// Async ring status bytes: [`HCALL_STATUS_EMPTY`] or
    /// [`HCALL_STATUS_READY`](crate::HCALL_STATUS_READY).
    pub hcall_status: [u8; LHCALL_RING_SIZE],
    /// Async ring arguments.
    pub hcalls: [HcallArgs; LHCALL_RING_SIZE],
    /// Bytes at the top of the 4 GiB guest space the guest must not use.
    pub reserve_mem: u32,
    /// TSC frequency in kHz if the host's TSC is usable, else 0.
    pub tsc_khz: u32,
    /// Start of the guest's `iret` window: the host never delivers an
    /// interrupt while `noirq_start <= eip < noirq_end`.
    pub noirq_start: u32,
    /// End (exclusive) of the no-interrupt window.
    pub noirq_end: u32,
    /// The guest's `PAGE_OFFSET`: mappings at or above it are identical in all
    /// of the guest's page tables (0 for a guest without a kernel/user split).
    pub kernel_address: u32,
    /// The guest's system-call vector; must be 0x80.
    pub syscall_vec: u32,
}

/// Defines `LguestData::OFF_*`, the byte offset of each field (from
/// `offset_of!`), and pins each at compile time to Linux's offset.
macro_rules! field_offsets {
    ($($name:ident: $field:ident = $off:literal,)*) => {
        impl LguestData {
            $(
                #[doc = concat!("Byte offset of `", stringify!($field), "`.")]
                pub const $name: u32 = offset_of!(LguestData, $field) as u32;
            )*
        }

        const _: () = {
            $(assert!(LguestData::$name == $off);)*
        };
    };
}

field_offsets! {
    OFF_IRQ_ENABLED: irq_enabled = 0,
    OFF_BLOCKED_INTERRUPTS: blocked_interrupts = 4,
    OFF_CR2: cr2 = 8,
    OFF_TIME: time = 12,
    OFF_IRQ_PENDING: irq_pending = 20,
    OFF_HCALL_STATUS: hcall_status = 24,
    OFF_HCALLS: hcalls = 88,
    OFF_RESERVE_MEM: reserve_mem = 1368,
    OFF_TSC_KHZ: tsc_khz = 1372,
    OFF_NOIRQ_START: noirq_start = 1376,
    OFF_NOIRQ_END: noirq_end = 1380,
    OFF_KERNEL_ADDRESS: kernel_address = 1384,
    OFF_SYSCALL_VEC: syscall_vec = 1388,
}

impl LguestData {
    /// Size of the structure in bytes (1392).
    pub const SIZE: u32 = size_of::<LguestData>() as u32;

    /// Byte offset of async-ring status byte `slot` (`slot < 64`).
    pub const fn off_hcall_status(slot: u32) -> u32 {
        Self::OFF_HCALL_STATUS + slot
    }

    /// Byte offset of async-ring argument block `slot` (`slot < 64`).
    pub const fn off_hcall(slot: u32) -> u32 {
        Self::OFF_HCALLS + slot * size_of::<HcallArgs>() as u32
    }

    /// The contents a guest's static `lguest_data` starts with, as Linux's
    /// `arch/x86/lguest/boot.c` initialises it: interrupts off, irq 0 (timer)
    /// blocked, every ring slot empty, `syscall_vec` 0x80, `kernel_address` as
    /// given. The guest fills in `noirq_start`/`noirq_end` before
    /// `LHCALL_LGUEST_INIT` (the host reads them there).
    pub const fn guest_initial(kernel_address: u32) -> LguestData {
        LguestData {
            irq_enabled: 0,
            blocked_interrupts: 1,
            cr2: 0,
            time: Timespec32 {
                tv_sec: 0,
                tv_nsec: 0,
            },
            irq_pending: 0,
            hcall_status: [HCALL_STATUS_EMPTY; LHCALL_RING_SIZE],
            hcalls: [HcallArgs {
                arg0: 0,
                arg1: 0,
                arg2: 0,
                arg3: 0,
                arg4: 0,
            }; LHCALL_RING_SIZE],
            reserve_mem: 0,
            tsc_khz: 0,
            noirq_start: 0,
            noirq_end: 0,
            kernel_address,
            syscall_vec: crate::irq::SYSCALL_VECTOR,
        }
    }

    /// Whether the virtual interrupt flag is set.
    pub const fn irqs_enabled(&self) -> bool {
        self.irq_enabled & X86_EFLAGS_IF != 0
    }
}

const _: () = {
    assert!(offset_of!(Timespec32, tv_sec) == 0);
    assert!(offset_of!(Timespec32, tv_nsec) == 4);
    assert!(size_of::<Timespec32>() == 8);

    assert!(size_of::<LguestData>() == 1392);
    assert!(core::mem::align_of::<LguestData>() == 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets() {
        assert_eq!(LguestData::OFF_IRQ_ENABLED, 0);
        assert_eq!(LguestData::OFF_BLOCKED_INTERRUPTS, 4);
        assert_eq!(LguestData::OFF_CR2, 8);
        assert_eq!(LguestData::OFF_TIME, 12);
        assert_eq!(LguestData::OFF_IRQ_PENDING, 20);
        assert_eq!(LguestData::OFF_HCALL_STATUS, 24);
        assert_eq!(LguestData::OFF_HCALLS, 88);
        assert_eq!(LguestData::OFF_RESERVE_MEM, 1368);
        assert_eq!(LguestData::OFF_TSC_KHZ, 1372);
        assert_eq!(LguestData::OFF_NOIRQ_START, 1376);
        assert_eq!(LguestData::OFF_NOIRQ_END, 1380);
        assert_eq!(LguestData::OFF_KERNEL_ADDRESS, 1384);
        assert_eq!(LguestData::OFF_SYSCALL_VEC, 1388);
        assert_eq!(LguestData::SIZE, 1392);
    }

    #[test]
    fn ring_slot_offsets() {
        assert_eq!(LguestData::off_hcall_status(0), 24);
        assert_eq!(LguestData::off_hcall_status(63), 87);
        assert_eq!(LguestData::off_hcall(0), 88);
        assert_eq!(LguestData::off_hcall(1), 108);
        assert_eq!(LguestData::off_hcall(63), 88 + 63 * 20);
        assert_eq!(LguestData::off_hcall(64), LguestData::OFF_RESERVE_MEM);
    }

    #[test]
    fn guest_initial_contents() {
        let d = LguestData::guest_initial(0xC000_0000);
        assert!(!d.irqs_enabled());
        assert_eq!(d.blocked_interrupts, 1);
        assert!(d.hcall_status.iter().all(|&s| s == 0xFF));
        assert_eq!(d.syscall_vec, 0x80);
        assert_eq!(d.kernel_address, 0xC000_0000);
        assert_eq!(d.noirq_start, 0);
        assert_eq!(d.noirq_end, 0);
    }

    #[test]
    fn irqs_enabled_tests_only_if() {
        let mut d = LguestData::guest_initial(0);
        d.irq_enabled = 0x202;
        assert!(d.irqs_enabled());
        d.irq_enabled = 0x002;
        assert!(!d.irqs_enabled());
        d.irq_enabled = X86_EFLAGS_IF;
        assert!(d.irqs_enabled());
    }
}
