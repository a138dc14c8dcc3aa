//! Guest-physical memory: the one bounds-checked accessor every host access
//! to guest memory goes through (docs/design.md, "Founding decisions").
//!
//! A guest-physical address is an *allegation*: [`GuestMemory::read`] and
//! [`GuestMemory::write`] check `gpa + len <= limit` without overflow before
//! touching anything, and report a [`MemFault`] whose `Display` is lguest's
//! kill reason (`"bad read address 0x… len …"`).
//!
//! The bare-metal kernel implements [`GuestMemory`] over the launcher's
//! allocation; tests (and anything else) use [`VecMemory`].

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

/// Largest guest-physical memory size: 4 GiB minus one page (so every
/// in-bounds address and `limit` itself fit in a `u32`).
pub const MAX_GUEST_MEM: u32 = 0xFFFF_F000;

/// A rejected guest-memory access: `[gpa, gpa + len)` is not inside
/// `[0, limit)`. Its `Display` is lguest's kill reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemFault {
    /// Guest-physical start address of the access.
    pub gpa: u32,
    /// Length of the access in bytes (saturated at `u32::MAX`).
    pub len: u32,
    /// Whether it was a write.
    pub write: bool,
}

impl fmt::Display for MemFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.write { "write" } else { "read" };
        write!(f, "bad {dir} address {:#x} len {}", self.gpa, self.len)
    }
}

/// Check `[gpa, gpa + len)` against `[0, limit)` and return it as a `usize`
/// range. Overflow-checked; a zero-length access at `gpa <= limit` is fine.
#[inline]
pub fn check_range(
    limit: u32,
    gpa: u32,
    len: usize,
    write: bool,
) -> Result<Range<usize>, MemFault> {
    let fault = MemFault {
        gpa,
        len: u32::try_from(len).unwrap_or(u32::MAX),
        write,
    };
    let len32 = u32::try_from(len).map_err(|_| fault)?;
    let end = gpa.checked_add(len32).ok_or(fault)?;
    if end > limit {
        return Err(fault);
    }
    Ok(gpa as usize..end as usize)
}

/// Guest-physical memory `[0, limit)`.
///
/// Implementations must bounds-check every access (use [`check_range`]) and
/// never touch anything outside the guest's memory.
pub trait GuestMemory {
    /// Size of guest-physical memory in bytes (`pfnlimit * 4096`),
    /// at most [`MAX_GUEST_MEM`].
    fn limit(&self) -> u32;

    /// Copy `buf.len()` bytes from guest-physical `gpa` into `buf`.
    fn read(&self, gpa: u32, buf: &mut [u8]) -> Result<(), MemFault>;

    /// Copy `data` to guest-physical `gpa`.
    fn write(&mut self, gpa: u32, data: &[u8]) -> Result<(), MemFault>;

    /// Read one byte.
    fn read_u8(&self, gpa: u32) -> Result<u8, MemFault> {
        let mut b = [0u8; 1];
        self.read(gpa, &mut b)?;
        Ok(b[0])
    }

    /// Read a little-endian `u16`.
    fn read_u16(&self, gpa: u32) -> Result<u16, MemFault> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Read a little-endian `u32`.
    fn read_u32(&self, gpa: u32) -> Result<u32, MemFault> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Read a little-endian `u64`.
    fn read_u64(&self, gpa: u32) -> Result<u64, MemFault> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write one byte.
    fn write_u8(&mut self, gpa: u32, v: u8) -> Result<(), MemFault> {
        self.write(gpa, &[v])
    }

    /// Write a little-endian `u16`.
    fn write_u16(&mut self, gpa: u32, v: u16) -> Result<(), MemFault> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Write a little-endian `u32`.
    fn write_u32(&mut self, gpa: u32, v: u32) -> Result<(), MemFault> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Write a little-endian `u64`.
    fn write_u64(&mut self, gpa: u32, v: u64) -> Result<(), MemFault> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Write little-endian `u32`s to consecutive addresses from `gpa`
    /// (checked as one access first, so nothing is written if any of it is
    /// out of range).
    fn write_u32s(&mut self, gpa: u32, words: &[u32]) -> Result<(), MemFault> {
        let len = words.len().saturating_mul(4);
        check_range(self.limit(), gpa, len, true)?;
        let mut at = gpa;
        for &w in words {
            // In range: checked above.
            self.write(at, &w.to_le_bytes())?;
            at = at.wrapping_add(4);
        }
        Ok(())
    }

    /// Zero `len` bytes at `gpa` (checked as one access first, so nothing is
    /// written if any of it is out of range).
    fn zero(&mut self, gpa: u32, len: u32) -> Result<(), MemFault> {
        check_range(self.limit(), gpa, len as usize, true)?;
        const CHUNK: u32 = 512;
        let zeros = [0u8; CHUNK as usize];
        let mut done = 0u32;
        while done < len {
            let n = len.saturating_sub(done).min(CHUNK);
            // In range: checked above, `done + n <= len`.
            self.write(
                gpa.wrapping_add(done),
                zeros.get(..n as usize).unwrap_or(&[]),
            )?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// Read a NUL-terminated string of at most `max` bytes (not counting the
    /// NUL) at `gpa`, stopping early at a NUL or at the end of guest memory;
    /// invalid UTF-8 is replaced lossily. Fails only if `gpa` itself is
    /// outside guest memory (and `max > 0`).
    fn read_cstr(&self, gpa: u32, max: u32) -> Result<String, MemFault> {
        if max == 0 {
            return Ok(String::new());
        }
        // Never more than what lies between `gpa` and the end of memory.
        let window = self.limit().saturating_sub(gpa).min(max);
        let mut buf = vec![0u8; usize::try_from(window).unwrap_or(0)];
        let bytes = self.read_cstr_bytes(gpa, &mut buf)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// Reads the bytes of a NUL-terminated string at `gpa` into `buf`, as
    /// they are (no UTF-8 conversion): at most `buf.len()` bytes, stopping
    /// at the first NUL or at the end of guest memory. Fails only if `gpa`
    /// itself is outside guest memory.
    fn read_cstr_bytes<'b>(&self, gpa: u32, buf: &'b mut [u8]) -> Result<&'b [u8], MemFault> {
        let avail = self
            .limit()
            .checked_sub(gpa)
            .filter(|&a| a > 0)
            .ok_or(MemFault {
                gpa,
                len: 1,
                write: false,
            })?;
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let buf = buf.get_mut(..n).unwrap_or_default();
        self.read(gpa, buf)?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(buf.get(..end).unwrap_or_default())
    }
}

/// Guest memory backed by a `Vec<u8>` (tests, tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMemory {
    bytes: Vec<u8>,
}

impl VecMemory {
    /// `size` bytes of zeroed guest memory (clamped to [`MAX_GUEST_MEM`]).
    pub fn new(size: u32) -> Self {
        Self {
            bytes: vec![0; size.min(MAX_GUEST_MEM) as usize],
        }
    }

    /// All of guest memory.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    /// All of guest memory, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl GuestMemory for VecMemory {
    fn limit(&self) -> u32 {
        // `new` clamps the size, so this never saturates in practice.
        u32::try_from(self.bytes.len()).unwrap_or(MAX_GUEST_MEM)
    }

    fn read(&self, gpa: u32, buf: &mut [u8]) -> Result<(), MemFault> {
        let r = check_range(self.limit(), gpa, buf.len(), false)?;
        let src = self.bytes.get(r).ok_or(MemFault {
            gpa,
            len: u32::try_from(buf.len()).unwrap_or(u32::MAX),
            write: false,
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, gpa: u32, data: &[u8]) -> Result<(), MemFault> {
        let r = check_range(self.limit(), gpa, data.len(), true)?;
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let dst = self.bytes.get_mut(r).ok_or(MemFault {
            gpa,
            len,
            write: true,
        })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn bounds() {
        let mut m = VecMemory::new(0x2000);
        assert_eq!(m.limit(), 0x2000);
        m.write_u32(0x1ffc, 0xdead_beef).unwrap();
        assert_eq!(m.read_u32(0x1ffc), Ok(0xdead_beef));
        assert_eq!(
            m.read_u32(0x1ffd),
            Err(MemFault {
                gpa: 0x1ffd,
                len: 4,
                write: false
            })
        );
        assert!(m.write_u32(0x1ffd, 0).is_err());
        assert!(m.read_u32(u32::MAX - 1).is_err());
        assert!(m.write(u32::MAX, &[1, 2]).is_err());
        // Zero-length at the very end is fine, one past isn't.
        assert!(m.read(0x2000, &mut []).is_ok());
        assert!(m.read(0x2001, &mut []).is_err());
        // Nothing was written by the failed writes.
        assert_eq!(m.read_u8(0x1fff), Ok(0xde));
    }

    #[test]
    fn fault_display() {
        let f = MemFault {
            gpa: 0x1234,
            len: 4,
            write: false,
        };
        assert_eq!(f.to_string(), "bad read address 0x1234 len 4");
        let f = MemFault {
            gpa: 0xffff_fff0,
            len: 24,
            write: true,
        };
        assert_eq!(f.to_string(), "bad write address 0xfffffff0 len 24");
    }

    #[test]
    fn check_range_overflow() {
        assert!(check_range(u32::MAX, u32::MAX, 1, false).is_err());
        assert!(check_range(MAX_GUEST_MEM, 0, usize::MAX, false).is_err());
        assert_eq!(check_range(0x1000, 0x10, 0x10, true), Ok(0x10..0x20));
    }

    #[test]
    fn ints_round_trip() {
        let mut m = VecMemory::new(64);
        m.write_u8(0, 0x12).unwrap();
        m.write_u16(2, 0x3456).unwrap();
        m.write_u64(8, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(m.read_u8(0), Ok(0x12));
        assert_eq!(m.read_u16(2), Ok(0x3456));
        assert_eq!(m.read_u64(8), Ok(0x0102_0304_0506_0708));
        assert_eq!(m.as_slice()[8], 0x08);
    }

    #[test]
    fn zero_fill() {
        let mut m = VecMemory::new(0x1000);
        m.as_mut_slice().fill(0xAA);
        m.zero(0x10, 0x900).unwrap();
        assert_eq!(m.as_slice()[0xf], 0xAA);
        assert!(m.as_slice()[0x10..0x910].iter().all(|&b| b == 0));
        assert_eq!(m.as_slice()[0x910], 0xAA);
        // Out of range: nothing written at all.
        assert!(m.zero(0xff0, 0x20).is_err());
        assert_eq!(m.as_slice()[0xff0], 0xAA);
        assert!(m.zero(0x1000, 0).is_ok());
    }

    #[test]
    fn cstr() {
        let mut m = VecMemory::new(0x100);
        m.write(0x10, b"hello\0world").unwrap();
        assert_eq!(m.read_cstr(0x10, 128).unwrap(), "hello");
        assert_eq!(m.read_cstr(0x10, 3).unwrap(), "hel");
        assert_eq!(m.read_cstr(0x16, 128).unwrap(), "world");
        // Stops at the end of memory.
        m.write(0xfc, b"abcd").unwrap();
        assert_eq!(m.read_cstr(0xfc, 128).unwrap(), "abcd");
        // Lossy UTF-8.
        m.write(0x40, &[0xff, b'x', 0]).unwrap();
        assert_eq!(m.read_cstr(0x40, 128).unwrap(), "\u{fffd}x");
        assert!(m.read_cstr(0x100, 128).is_err());
        assert!(m.read_cstr(u32::MAX, 128).is_err());
        assert_eq!(m.read_cstr(0x100, 0).unwrap(), "");
    }

    #[test]
    fn cstr_bytes_are_raw_and_bounded() {
        let mut m = VecMemory::new(0x100);
        m.write(0x10, b"hi\r\x1b\xff\0rest").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(m.read_cstr_bytes(0x10, &mut buf).unwrap(), b"hi\r\x1b\xff");
        // At most the buffer's size.
        let mut small = [0u8; 2];
        assert_eq!(m.read_cstr_bytes(0x10, &mut small).unwrap(), b"hi");
        // No NUL before the end of memory: up to the last byte, no further.
        m.write(0xfd, b"xyz").unwrap();
        assert_eq!(m.read_cstr_bytes(0xfd, &mut buf).unwrap(), b"xyz");
        assert_eq!(m.read_cstr_bytes(0xff, &mut buf).unwrap(), b"z");
        assert!(m.read_cstr_bytes(0x100, &mut buf).is_err());
        assert!(m.read_cstr_bytes(u32::MAX, &mut buf).is_err());
        assert_eq!(m.read_cstr_bytes(0x10, &mut []).unwrap(), b"");
    }

    #[test]
    fn clamped_size() {
        // Asking for all of u32 gives MAX_GUEST_MEM: the allocation is zeroed
        // lazily by the OS, and only the pages touched below are backed.
        let mut m = VecMemory::new(u32::MAX);
        assert_eq!(m.limit(), MAX_GUEST_MEM);
        assert_eq!(m.as_slice().len(), MAX_GUEST_MEM as usize);
        m.write_u32(MAX_GUEST_MEM - 4, 0x1234_5678).unwrap();
        assert_eq!(m.read_u32(MAX_GUEST_MEM - 4), Ok(0x1234_5678));
        assert!(m.read_u8(MAX_GUEST_MEM).is_err());
        assert_eq!(VecMemory::new(MAX_GUEST_MEM + 1).limit(), MAX_GUEST_MEM);
        assert_eq!(VecMemory::new(0).limit(), 0);
        assert_eq!(VecMemory::new(1).limit(), 1);
    }

    /// Guest memory the way the kernel's `HostGuestMemory` does it: the
    /// backing store is bigger than `limit` and the accessor trusts
    /// [`check_range`] alone, so an off-by-one there would touch the guard
    /// bytes past the limit (a host overrun) instead of failing.
    struct Guarded {
        limit: u32,
        bytes: Vec<u8>,
    }

    const GUARD: u8 = 0xA5;

    impl Guarded {
        fn new(limit: u32) -> Self {
            Self {
                limit,
                bytes: vec![GUARD; limit as usize + 64],
            }
        }
        fn guard_intact(&self) -> bool {
            self.bytes[self.limit as usize..]
                .iter()
                .all(|&b| b == GUARD)
        }
    }

    impl GuestMemory for Guarded {
        fn limit(&self) -> u32 {
            self.limit
        }
        fn read(&self, gpa: u32, buf: &mut [u8]) -> Result<(), MemFault> {
            let r = check_range(self.limit, gpa, buf.len(), false)?;
            buf.copy_from_slice(&self.bytes[r]);
            Ok(())
        }
        fn write(&mut self, gpa: u32, data: &[u8]) -> Result<(), MemFault> {
            let r = check_range(self.limit, gpa, data.len(), true)?;
            self.bytes[r].copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn check_range_exact_boundaries() {
        const L: u32 = 0x2000;
        // A range ending exactly at the limit is accepted...
        assert_eq!(check_range(L, L - 4, 4, false), Ok(0x1ffc..0x2000));
        assert_eq!(check_range(L, 0, L as usize, true), Ok(0..0x2000));
        assert_eq!(check_range(L, L - 1, 1, true), Ok(0x1fff..0x2000));
        // ... one byte more is refused, whichever end moves.
        let fault = |gpa, len, write| Err(MemFault { gpa, len, write });
        assert_eq!(check_range(L, L - 3, 4, false), fault(L - 3, 4, false));
        assert_eq!(
            check_range(L, 0, L as usize + 1, true),
            fault(0, L + 1, true)
        );
        assert_eq!(check_range(L, L, 1, true), fault(L, 1, true));
        // Zero length: fine up to and including the limit, not past it.
        assert_eq!(check_range(L, L, 0, false), Ok(0x2000..0x2000));
        assert_eq!(check_range(L, L + 1, 0, false), fault(L + 1, 0, false));
        assert_eq!(check_range(0, 0, 0, false), Ok(0..0));
        assert_eq!(check_range(0, 0, 1, false), fault(0, 1, false));
        // Wrap-around at u32::MAX never looks small.
        assert_eq!(
            check_range(u32::MAX, u32::MAX, 0, false),
            Ok(0xffff_ffff..0xffff_ffff)
        );
        assert_eq!(
            check_range(u32::MAX, u32::MAX, 1, true),
            fault(u32::MAX, 1, true)
        );
        assert_eq!(
            check_range(u32::MAX, u32::MAX - 1, 1, true),
            Ok(0xffff_fffe..0xffff_ffff)
        );
        assert_eq!(
            check_range(L, 0xffff_fff0, 0x20, false),
            fault(0xffff_fff0, 0x20, false)
        );
        assert_eq!(
            check_range(u32::MAX, 1, u32::MAX as usize, false),
            fault(1, u32::MAX, false)
        );
        // Lengths beyond u32 saturate in the report.
        assert_eq!(
            check_range(L, 0, usize::MAX, false),
            fault(0, u32::MAX, false)
        );
    }

    #[test]
    fn accessor_never_touches_past_the_limit() {
        const L: u32 = 0x1000;
        let mut m = Guarded::new(L);
        // Writes: last byte, last word, then one byte too far.
        m.write_u8(L - 1, 1).unwrap();
        m.write_u32(L - 4, 0x0403_0201).unwrap();
        assert!(m.write_u8(L, 0).is_err());
        assert!(m.write_u32(L - 3, 0).is_err());
        assert!(m.write_u64(L - 7, 0).is_err());
        assert!(m.write(L - 16, &[0; 17]).is_err());
        assert!(m.zero(L - 16, 17).is_err());
        m.zero(L - 16, 16).unwrap();
        m.write(L, &[]).unwrap();
        assert!(m.guard_intact());
        // Reads: the same boundaries.
        m.write_u32(L - 4, 0x0403_0201).unwrap();
        assert_eq!(m.read_u32(L - 4), Ok(0x0403_0201));
        assert_eq!(
            m.read_u8(L),
            Err(MemFault {
                gpa: L,
                len: 1,
                write: false
            })
        );
        assert!(m.read_u16(L - 1).is_err());
        assert!(m.read_u64(L - 4).is_err());
        let mut buf = [0u8; 5];
        assert!(m.read(L - 4, &mut buf).is_err());
        // A string running into the limit stops there, never reads past it.
        assert_eq!(m.read_cstr(L - 4, 128).unwrap(), "\u{1}\u{2}\u{3}\u{4}");
        assert_eq!(m.read_cstr(L - 1, 128).unwrap(), "\u{4}");
        assert!(m.read_cstr(L, 128).is_err());
        assert!(m.guard_intact());
    }
}
