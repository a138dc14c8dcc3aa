//! Physical memory management: memory-map sanitising ([`region`]), the
//! physical frame allocator ([`frame`]) and x86_64 page-table logic
//! ([`paging`]).
//!
//! Everything here is pure logic over plain integers and caller-provided
//! storage; nothing in this module touches hardware or allocates.

pub mod frame;
pub mod paging;
pub mod region;

/// Size of a small (4 KiB) page / physical frame.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large (2 MiB) page.
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;
/// Size of a huge (1 GiB) page.
pub const HUGE_PAGE_SIZE: u64 = 1024 * 1024 * 1024;
/// Upper bound (exclusive) of architecturally possible physical addresses
/// (MAXPHYADDR is at most 52 bits on x86_64).
pub const PHYS_ADDR_LIMIT: u64 = 1 << 52;

/// Rounds `addr` down to a multiple of `align`. `align` of 0 is treated as 1.
#[must_use]
pub const fn align_down(addr: u64, align: u64) -> u64 {
    if align <= 1 {
        addr
    } else if align.is_power_of_two() {
        addr & !(align - 1)
    } else {
        addr - addr % align
    }
}

/// Rounds `addr` up to a multiple of `align`, or `None` on overflow.
/// `align` of 0 is treated as 1.
#[must_use]
pub const fn align_up(addr: u64, align: u64) -> Option<u64> {
    if align <= 1 {
        return Some(addr);
    }
    let down = align_down(addr, align);
    if down == addr {
        Some(addr)
    } else {
        down.checked_add(align)
    }
}

/// Whether `addr` is a multiple of `align` (`align` of 0 is treated as 1).
#[must_use]
pub const fn is_aligned(addr: u64, align: u64) -> bool {
    align_down(addr, align) == addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(0x1234, 0x1000), 0x1000);
        assert_eq!(align_up(0x1234, 0x1000), Some(0x2000));
        assert_eq!(align_up(0x2000, 0x1000), Some(0x2000));
        assert_eq!(align_up(u64::MAX, 0x1000), None);
        assert_eq!(align_up(7, 3), Some(9));
        assert_eq!(align_down(7, 3), 6);
        assert_eq!(align_up(5, 0), Some(5));
        assert!(is_aligned(0x4000, 0x1000));
        assert!(!is_aligned(0x4001, 0x1000));
    }
}
