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

    /// The bytes of `d` as the other side sees them in guest memory.
    fn bytes_of(d: &LguestData) -> &[u8] {
        // SAFETY: `LguestData` is `repr(C)` with only integer fields and no
        // padding (its 1392-byte size is the sum of the fields, asserted
        // above), so all `size_of` bytes are initialised; the slice borrows
        // `d`.
        unsafe {
            core::slice::from_raw_parts(
                core::ptr::from_ref(d).cast::<u8>(),
                size_of::<LguestData>(),
            )
        }
    }

    fn u32_at(b: &[u8], off: u32) -> u32 {
        let off = off as usize;
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Every field written through the struct is found by the host at its
    /// `OFF_*` byte offset, and nowhere else.
    #[test]
    fn struct_fields_are_at_their_byte_offsets() {
        let mut d = LguestData::guest_initial(0);
        let fields: [(u32, u32); 11] = [
            (LguestData::OFF_IRQ_ENABLED, 0x1111_0001),
            (LguestData::OFF_BLOCKED_INTERRUPTS, 0x1111_0002),
            (LguestData::OFF_CR2, 0x1111_0003),
            (LguestData::OFF_IRQ_PENDING, 0x1111_0004),
            (LguestData::OFF_RESERVE_MEM, 0x1111_0005),
            (LguestData::OFF_TSC_KHZ, 0x1111_0006),
            (LguestData::OFF_NOIRQ_START, 0x1111_0007),
            (LguestData::OFF_NOIRQ_END, 0x1111_0008),
            (LguestData::OFF_KERNEL_ADDRESS, 0x1111_0009),
            (LguestData::OFF_SYSCALL_VEC, 0x1111_000A),
            (LguestData::OFF_TIME, 0x1111_000B),
        ];
        d.irq_enabled = fields[0].1;
        d.blocked_interrupts = fields[1].1;
        d.cr2 = fields[2].1;
        d.irq_pending = fields[3].1 as i32;
        d.reserve_mem = fields[4].1;
        d.tsc_khz = fields[5].1;
        d.noirq_start = fields[6].1;
        d.noirq_end = fields[7].1;
        d.kernel_address = fields[8].1;
        d.syscall_vec = fields[9].1;
        d.time.tv_sec = fields[10].1 as i32;
        d.time.tv_nsec = 0x2222_0000;
        let b = bytes_of(&d);
        for (off, want) in fields {
            assert_eq!(u32_at(b, off), want, "offset {off}");
        }
        assert_eq!(u32_at(b, LguestData::OFF_TIME + 4), 0x2222_0000);
        // The last field ends the structure.
        assert_eq!(LguestData::OFF_SYSCALL_VEC as usize + 4, b.len());
    }

    /// Ring slot `n`'s status byte and its 20-byte arguments, written through
    /// the struct, are where `off_hcall_status(n)` / `off_hcall(n)` say; the
    /// slots tile the ring exactly.
    #[test]
    fn ring_slots_are_addressed_by_their_offsets() {
        let mut d = LguestData::guest_initial(0);
        for n in 0..LHCALL_RING_SIZE as u32 {
            d.hcall_status[n as usize] = n as u8;
            d.hcalls[n as usize] = HcallArgs {
                arg0: n << 8,
                arg1: n << 8 | 1,
                arg2: n << 8 | 2,
                arg3: n << 8 | 3,
                arg4: n << 8 | 4,
            };
        }
        let b = bytes_of(&d);
        for n in 0..LHCALL_RING_SIZE as u32 {
            assert_eq!(b[LguestData::off_hcall_status(n) as usize], n as u8);
            for k in 0..5 {
                assert_eq!(u32_at(b, LguestData::off_hcall(n) + 4 * k), n << 8 | k);
            }
        }
        // The status bytes end where the arguments start, the arguments
        // where the next field starts.
        assert_eq!(
            LguestData::off_hcall_status(LHCALL_RING_SIZE as u32),
            LguestData::off_hcall(0)
        );
        assert_eq!(
            LguestData::off_hcall(LHCALL_RING_SIZE as u32),
            LguestData::OFF_RESERVE_MEM
        );
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
