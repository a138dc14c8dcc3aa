//! Turning a (possibly bogus) firmware memory map into a clean list of
//! usable, page-aligned physical ranges.
//!
//! The firmware / bootloader memory map is untrusted: entries may be
//! unsorted, overlapping, zero-length or even wrap past `u64::MAX`.
//! [`build_usable`] sanitises it without allocating:
//!
//! 1. usable entries are merged into a sorted union;
//! 2. every non-usable entry is subtracted (non-usable wins on overlap);
//! 3. every caller-provided reserved range (image, boot info, modules, low
//!    1 MiB, ...) is subtracted;
//! 4. each remaining range is shrunk to whole 4 KiB pages.

use core::fmt;

use super::{PAGE_SIZE, PHYS_ADDR_LIMIT, align_down, align_up};

/// Default capacity for region lists (see [`UsableRegions`]).
pub const MAX_REGIONS: usize = 128;

/// A region list with the default capacity.
pub type UsableRegions = RegionList<MAX_REGIONS>;

/// A half-open physical address range `[start, end)`.
///
/// A range with `end <= start` is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PhysRange {
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte of the range.
    pub end: u64,
}

impl PhysRange {
    /// The empty range at address 0.
    pub const EMPTY: PhysRange = PhysRange { start: 0, end: 0 };

    /// Creates `[start, end)`.
    #[must_use]
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    /// Creates `[base, base + len)`, or `None` if that overflows `u64`.
    #[must_use]
    pub const fn from_base_len(base: u64, len: u64) -> Option<Self> {
        match base.checked_add(len) {
            Some(end) => Some(Self { start: base, end }),
            None => None,
        }
    }

    /// Creates `[base, min(base + len, u64::MAX))`, clamping instead of
    /// wrapping.
    #[must_use]
    pub const fn from_base_len_saturating(base: u64, len: u64) -> Self {
        Self {
            start: base,
            end: base.saturating_add(len),
        }
    }

    /// Length in bytes (0 for empty ranges).
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range contains no bytes.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `addr` lies inside the range.
    #[must_use]
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether `other` lies entirely inside `self` (empty ranges are
    /// contained in everything).
    #[must_use]
    pub const fn contains_range(&self, other: &PhysRange) -> bool {
        other.is_empty() || (self.start <= other.start && other.end <= self.end)
    }

    /// Whether the two ranges share at least one byte.
    #[must_use]
    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.start < other.end && other.start < self.end
    }

    /// The common part of both ranges, if non-empty.
    #[must_use]
    pub fn intersect(&self, other: &PhysRange) -> Option<PhysRange> {
        let r = PhysRange::new(self.start.max(other.start), self.end.min(other.end));
        if r.is_empty() { None } else { Some(r) }
    }

    /// `self` minus `other`: the (possibly empty) pieces left below and
    /// above `other`.
    #[must_use]
    pub fn subtract(&self, other: &PhysRange) -> (Option<PhysRange>, Option<PhysRange>) {
        if !self.overlaps(other) {
            return if self.is_empty() {
                (None, None)
            } else {
                (Some(*self), None)
            };
        }
        let below = PhysRange::new(self.start, other.start);
        let above = PhysRange::new(other.end, self.end);
        (
            (!below.is_empty()).then_some(below),
            (!above.is_empty()).then_some(above),
        )
    }

    /// Shrinks the range to whole `align`-sized blocks (start rounded up,
    /// end rounded down); `None` if nothing is left.
    #[must_use]
    pub fn align_inward(&self, align: u64) -> Option<PhysRange> {
        let start = align_up(self.start, align)?;
        let end = align_down(self.end, align);
        let r = PhysRange::new(start, end);
        if r.is_empty() { None } else { Some(r) }
    }

    /// Grows the range to whole `align`-sized blocks (start rounded down,
    /// end rounded up, saturating at the highest aligned address).
    #[must_use]
    pub fn align_outward(&self, align: u64) -> PhysRange {
        let start = align_down(self.start, align);
        let end = align_up(self.end, align).unwrap_or(align_down(u64::MAX, align));
        PhysRange::new(start, end)
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// Type of a firmware memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Free RAM.
    Usable,
    /// Reserved by firmware / hardware.
    Reserved,
    /// ACPI tables; reclaimable once they have been parsed (we don't).
    AcpiReclaimable,
    /// ACPI non-volatile storage.
    AcpiNvs,
    /// Defective RAM.
    BadMemory,
    /// Any other (unknown) type code.
    Other(u32),
}

impl MemoryKind {
    /// Whether the kind is usable RAM.
    #[must_use]
    pub const fn is_usable(self) -> bool {
        matches!(self, MemoryKind::Usable)
    }
}

/// One raw entry of the firmware memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemoryMapEntry {
    /// Physical base address.
    pub base: u64,
    /// Length in bytes (may be 0 or wrap past `u64::MAX`).
    pub len: u64,
    /// Entry type.
    pub kind: MemoryKind,
}

impl MemoryMapEntry {
    /// Creates an entry.
    #[must_use]
    pub const fn new(base: u64, len: u64, kind: MemoryKind) -> Self {
        Self { base, len, kind }
    }
}

/// Errors from region list manipulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// More disjoint ranges than the list's fixed capacity.
    TooManyRegions {
        /// The capacity that was exceeded.
        capacity: usize,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::TooManyRegions { capacity } => {
                write!(f, "memory map has more than {capacity} disjoint regions")
            }
        }
    }
}

/// A fixed-capacity, sorted list of disjoint, non-adjacent (merged)
/// physical ranges. Never allocates.
#[derive(Clone, Debug)]
pub struct RegionList<const N: usize> {
    ranges: [PhysRange; N],
    len: usize,
}

impl<const N: usize> Default for RegionList<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RegionList<N> {
    /// An empty list.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            ranges: [PhysRange::EMPTY; N],
            len: 0,
        }
    }

    /// The ranges, sorted by address, disjoint.
    #[must_use]
    pub fn as_slice(&self) -> &[PhysRange] {
        self.ranges.get(..self.len).unwrap_or(&[])
    }

    /// Iterates over the ranges in address order.
    pub fn iter(&self) -> core::slice::Iter<'_, PhysRange> {
        self.as_slice().iter()
    }

    /// Number of ranges.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the list is empty.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fixed capacity.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Sum of the lengths of all ranges.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.iter().map(PhysRange::len).fold(0, u64::saturating_add)
    }

    /// Whether `addr` lies in any range.
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        self.iter().any(|r| r.contains(addr))
    }

    /// Whether `r` overlaps any range.
    #[must_use]
    pub fn overlaps(&self, r: &PhysRange) -> bool {
        self.iter().any(|x| x.overlaps(r))
    }

    fn insert_at(&mut self, idx: usize, r: PhysRange) -> Result<(), RegionError> {
        if self.len >= N || idx > self.len {
            return Err(RegionError::TooManyRegions { capacity: N });
        }
        self.ranges.copy_within(idx..self.len, idx + 1);
        if let Some(slot) = self.ranges.get_mut(idx) {
            *slot = r;
        }
        self.len += 1;
        Ok(())
    }

    fn remove_at(&mut self, idx: usize) {
        if idx < self.len {
            self.ranges.copy_within(idx + 1..self.len, idx);
            self.len -= 1;
        }
    }

    /// Adds `r`, merging it with overlapping or adjacent ranges. Empty
    /// ranges are ignored. On error the list is unchanged.
    pub fn insert(&mut self, r: PhysRange) -> Result<(), RegionError> {
        if r.is_empty() {
            return Ok(());
        }
        // First range that ends at or after r.start (could touch/overlap).
        let first = self.as_slice().partition_point(|x| x.end < r.start);
        // One past the last range that starts at or before r.end.
        let last = self.as_slice().partition_point(|x| x.start <= r.end);
        if first >= last {
            return self.insert_at(first, r);
        }
        let mut merged = r;
        if let (Some(a), Some(b)) = (self.ranges.get(first), self.ranges.get(last - 1)) {
            merged.start = merged.start.min(a.start);
            merged.end = merged.end.max(b.end);
        }
        if let Some(slot) = self.ranges.get_mut(first) {
            *slot = merged;
        }
        // Drop the now-merged ranges first+1..last.
        let removed = last - first - 1;
        self.ranges.copy_within(last..self.len, first + 1);
        self.len -= removed;
        Ok(())
    }

    /// Removes every byte of `r` from the list, splitting a range if
    /// needed. On error (a split with the list full) the list is unchanged.
    pub fn remove(&mut self, r: PhysRange) -> Result<(), RegionError> {
        if r.is_empty() {
            return Ok(());
        }
        let mut i = self.as_slice().partition_point(|x| x.end <= r.start);
        while let Some(&cur) = self.ranges.get(i).filter(|_| i < self.len) {
            if cur.start >= r.end {
                break;
            }
            match cur.subtract(&r) {
                (None, None) => self.remove_at(i),
                (Some(lo), None) | (None, Some(lo)) => {
                    if let Some(slot) = self.ranges.get_mut(i) {
                        *slot = lo;
                    }
                    i += 1;
                }
                (Some(lo), Some(hi)) => {
                    // Only possible when r is strictly inside cur; nothing
                    // else can overlap r afterwards.
                    self.insert_at(i + 1, hi)?;
                    if let Some(slot) = self.ranges.get_mut(i) {
                        *slot = lo;
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Shrinks every range to whole `align` blocks, dropping ranges that
    /// become empty.
    pub fn align_inward(&mut self, align: u64) {
        let mut out = 0;
        for i in 0..self.len {
            let aligned = self.ranges.get(i).and_then(|r| r.align_inward(align));
            if let Some(a) = aligned {
                if let Some(slot) = self.ranges.get_mut(out) {
                    *slot = a;
                }
                out += 1;
            }
        }
        self.len = out;
    }

    /// Removes all ranges.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl<'a, const N: usize> IntoIterator for &'a RegionList<N> {
    type Item = &'a PhysRange;
    type IntoIter = core::slice::Iter<'a, PhysRange>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Statistics about a sanitised memory map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemorySummary {
    /// Bytes of usable RAM after carving out reserved ranges and page
    /// alignment (what the frame allocator will get).
    pub usable_bytes: u64,
    /// Bytes the map declares as anything other than usable (union of the
    /// non-usable entries, overlaps counted once).
    pub reserved_bytes: u64,
    /// Portion of `usable_bytes` at or above 4 GiB.
    pub above_4g_usable_bytes: u64,
    /// End (exclusive) of the highest usable range, 0 if there is none.
    pub highest_usable_end: u64,
}

impl MemorySummary {
    /// Computes the usable statistics of a list of usable ranges
    /// (`reserved_bytes` is left at 0).
    #[must_use]
    pub fn of_usable(usable: &[PhysRange]) -> Self {
        const FOUR_GIB: u64 = 4 << 30;
        let mut s = MemorySummary::default();
        for r in usable {
            s.usable_bytes = s.usable_bytes.saturating_add(r.len());
            if let Some(hi) = r.intersect(&PhysRange::new(FOUR_GIB, u64::MAX)) {
                s.above_4g_usable_bytes = s.above_4g_usable_bytes.saturating_add(hi.len());
            }
            if !r.is_empty() {
                s.highest_usable_end = s.highest_usable_end.max(r.end);
            }
        }
        s
    }
}

/// Sanitises a memory map into sorted, disjoint, page-aligned usable
/// ranges with every `reserved` range carved out.
///
/// * Non-usable entries win over overlapping usable entries.
/// * Zero-length entries are ignored.
/// * Entries that wrap past `u64::MAX`: non-usable ones are clamped to end
///   at `u64::MAX` (so they still carve), usable ones are discarded as bogus.
/// * Usable memory at or above [`PHYS_ADDR_LIMIT`] (2^52) is discarded.
///
/// Returns `Err` if more than `N` disjoint ranges would be needed (for the
/// usable or the non-usable union). Never allocates; uses two `N`-sized
/// lists on the stack (`16 * N` bytes each).
pub fn build_usable<const N: usize, I>(
    map: I,
    reserved: &[PhysRange],
) -> Result<(RegionList<N>, MemorySummary), RegionError>
where
    I: IntoIterator<Item = MemoryMapEntry>,
{
    let mut usable = RegionList::<N>::new();
    let mut non_usable = RegionList::<N>::new();
    for e in map {
        if e.len == 0 {
            continue;
        }
        if e.kind.is_usable() {
            let Some(r) = PhysRange::from_base_len(e.base, e.len) else {
                continue;
            };
            let r = PhysRange::new(r.start, r.end.min(PHYS_ADDR_LIMIT));
            usable.insert(r)?;
        } else {
            non_usable.insert(PhysRange::from_base_len_saturating(e.base, e.len))?;
        }
    }
    for r in non_usable.iter() {
        usable.remove(*r)?;
    }
    for r in reserved {
        usable.remove(*r)?;
    }
    usable.align_inward(PAGE_SIZE);
    let mut summary = MemorySummary::of_usable(usable.as_slice());
    summary.reserved_bytes = non_usable.total_bytes();
    Ok((usable, summary))
}

/// Convenience wrapper of [`build_usable`] for a slice of entries.
pub fn build_usable_from_slice<const N: usize>(
    map: &[MemoryMapEntry],
    reserved: &[PhysRange],
) -> Result<(RegionList<N>, MemorySummary), RegionError> {
    build_usable(map.iter().copied(), reserved)
}

/// Finds the lowest `align`-aligned address `a` such that
/// `[a, a + size)` lies inside one `usable` range, overlaps no `reserved`
/// range, and ends at or below `below`.
///
/// Meant for placing the frame bitmap before the allocator exists.
/// `usable` need not be sorted (the lowest fit over all ranges is
/// returned). `size == 0` yields `None`; `align == 0` is treated as 1.
#[must_use]
pub fn find_free_run(
    usable: &[PhysRange],
    reserved: &[PhysRange],
    size: u64,
    align: u64,
    below: u64,
) -> Option<u64> {
    if size == 0 {
        return None;
    }
    let mut best: Option<u64> = None;
    for u in usable {
        let limit = u.end.min(below);
        let mut cand = align_up(u.start, align)?;
        'search: loop {
            let end = match cand.checked_add(size) {
                Some(e) if e <= limit => e,
                _ => break 'search,
            };
            let run = PhysRange::new(cand, end);
            // Jump past the highest-ending overlapping reserved range.
            let blocker = reserved
                .iter()
                .filter(|r| r.overlaps(&run))
                .map(|r| r.end)
                .max();
            match blocker {
                None => {
                    best = Some(best.map_or(cand, |b| b.min(cand)));
                    break 'search;
                }
                Some(next) => match align_up(next, align) {
                    Some(n) if n > cand => cand = n,
                    _ => break 'search,
                },
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn usable(base: u64, len: u64) -> MemoryMapEntry {
        MemoryMapEntry::new(base, len, MemoryKind::Usable)
    }
    fn reserved(base: u64, len: u64) -> MemoryMapEntry {
        MemoryMapEntry::new(base, len, MemoryKind::Reserved)
    }
    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange::new(start, end)
    }

    fn check_invariants(list: &[PhysRange]) {
        for w in list.windows(2) {
            assert!(w[0].end < w[1].start, "not sorted/disjoint: {list:?}");
        }
        for x in list {
            assert!(!x.is_empty());
            assert_eq!(x.start % PAGE_SIZE, 0);
            assert_eq!(x.end % PAGE_SIZE, 0);
        }
    }

    #[test]
    fn range_helpers() {
        let a = r(0x1000, 0x5000);
        assert_eq!(a.len(), 0x4000);
        assert!(a.contains(0x1000));
        assert!(!a.contains(0x5000));
        assert!(a.overlaps(&r(0x4fff, 0x6000)));
        assert!(!a.overlaps(&r(0x5000, 0x6000)));
        assert!(!a.overlaps(&r(0x2000, 0x2000)));
        assert_eq!(a.intersect(&r(0x3000, 0x9000)), Some(r(0x3000, 0x5000)));
        assert_eq!(a.intersect(&r(0x5000, 0x9000)), None);
        assert_eq!(
            a.subtract(&r(0x2000, 0x3000)),
            (Some(r(0x1000, 0x2000)), Some(r(0x3000, 0x5000)))
        );
        assert_eq!(a.subtract(&r(0, 0x2000)), (None, Some(r(0x2000, 0x5000))));
        assert_eq!(
            a.subtract(&r(0x4000, 0x9000)),
            (Some(r(0x1000, 0x4000)), None)
        );
        assert_eq!(a.subtract(&r(0, 0x9000)), (None, None));
        assert_eq!(a.subtract(&r(0x9000, 0xa000)), (Some(a), None));
        assert!(a.contains_range(&r(0x2000, 0x3000)));
        assert!(!a.contains_range(&r(0x2000, 0x6000)));
        assert_eq!(r(0x1001, 0x2fff).align_inward(PAGE_SIZE), None);
        assert_eq!(
            r(0xfff, 0x3001).align_inward(PAGE_SIZE),
            Some(r(0x1000, 0x3000))
        );
        assert_eq!(r(0xfff, 0x3001).align_outward(PAGE_SIZE), r(0, 0x4000));
        assert_eq!(PhysRange::from_base_len(u64::MAX, 2), None);
        assert_eq!(r(5, 3).len(), 0);
        assert!(r(5, 3).is_empty());
    }

    #[test]
    fn list_insert_merges() {
        let mut l = RegionList::<8>::new();
        l.insert(r(0x5000, 0x6000)).unwrap();
        l.insert(r(0x1000, 0x2000)).unwrap();
        l.insert(r(0x3000, 0x4000)).unwrap();
        assert_eq!(
            l.as_slice(),
            &[r(0x1000, 0x2000), r(0x3000, 0x4000), r(0x5000, 0x6000)]
        );
        // Adjacent merge.
        l.insert(r(0x2000, 0x3000)).unwrap();
        assert_eq!(l.as_slice(), &[r(0x1000, 0x4000), r(0x5000, 0x6000)]);
        // Spanning merge.
        l.insert(r(0x800, 0x8000)).unwrap();
        assert_eq!(l.as_slice(), &[r(0x800, 0x8000)]);
        l.insert(r(0x9000, 0x9000)).unwrap();
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn list_remove_splits() {
        let mut l = RegionList::<8>::new();
        l.insert(r(0x1000, 0x9000)).unwrap();
        l.insert(r(0xa000, 0xc000)).unwrap();
        l.remove(r(0x2000, 0x3000)).unwrap();
        assert_eq!(
            l.as_slice(),
            &[r(0x1000, 0x2000), r(0x3000, 0x9000), r(0xa000, 0xc000)]
        );
        l.remove(r(0x8000, 0xb000)).unwrap();
        assert_eq!(
            l.as_slice(),
            &[r(0x1000, 0x2000), r(0x3000, 0x8000), r(0xb000, 0xc000)]
        );
        l.remove(r(0, 0x3800)).unwrap();
        assert_eq!(l.as_slice(), &[r(0x3800, 0x8000), r(0xb000, 0xc000)]);
        l.remove(r(0, u64::MAX)).unwrap();
        assert!(l.is_empty());
    }

    #[test]
    fn list_overflow_is_error_and_unchanged() {
        let mut l = RegionList::<2>::new();
        l.insert(r(0, 10)).unwrap();
        l.insert(r(20, 30)).unwrap();
        assert_eq!(
            l.insert(r(40, 50)),
            Err(RegionError::TooManyRegions { capacity: 2 })
        );
        assert_eq!(
            l.remove(r(2, 3)),
            Err(RegionError::TooManyRegions { capacity: 2 })
        );
        assert_eq!(l.as_slice(), &[r(0, 10), r(20, 30)]);
        // Merging never needs capacity.
        l.insert(r(5, 25)).unwrap();
        assert_eq!(l.as_slice(), &[r(0, 30)]);
        let mut z = RegionList::<0>::new();
        assert!(z.insert(r(0, 1)).is_err());
        assert!(z.remove(r(0, 1)).is_ok());
    }

    #[test]
    fn typical_qemu_map() {
        let map = [
            usable(0, 0x9fc00),
            reserved(0x9fc00, 0x400),
            reserved(0xf0000, 0x10000),
            usable(MIB, 511 * MIB),
            reserved(0xfffc0000, 0x40000),
            usable(4 * GIB, GIB),
        ];
        let res = [r(0, MIB), r(2 * MIB, 3 * MIB + 0x123)];
        let (list, sum) = build_usable_from_slice::<MAX_REGIONS>(&map, &res).unwrap();
        check_invariants(list.as_slice());
        assert_eq!(
            list.as_slice(),
            &[
                r(MIB, 2 * MIB),
                r(3 * MIB + 0x1000, 512 * MIB),
                r(4 * GIB, 5 * GIB)
            ]
        );
        assert_eq!(sum.usable_bytes, list.total_bytes());
        assert_eq!(sum.above_4g_usable_bytes, GIB);
        assert_eq!(sum.highest_usable_end, 5 * GIB);
        assert_eq!(sum.reserved_bytes, 0x400 + 0x10000 + 0x40000);
    }

    #[test]
    fn non_usable_wins_and_unsorted_overlapping() {
        let map = [
            usable(0x10_0000, 0x10_0000),
            reserved(0x18_0800, 0x1000),  // partial pages on both sides
            usable(0x15_0000, 0x20_0000), // overlaps first usable
            MemoryMapEntry::new(0x30_0000, 0x1000, MemoryKind::AcpiNvs),
            MemoryMapEntry::new(0x30_0000, 0x8000, MemoryKind::BadMemory),
            MemoryMapEntry::new(0x34_0000, 0x1000, MemoryKind::Other(77)),
            MemoryMapEntry::new(0x20_0000, 0x1000, MemoryKind::AcpiReclaimable),
            usable(0x1234, 0), // zero length
            reserved(0x5000_0000, 0),
        ];
        let (list, sum) = build_usable_from_slice::<16>(&map, &[]).unwrap();
        check_invariants(list.as_slice());
        assert_eq!(
            list.as_slice(),
            &[
                r(0x10_0000, 0x18_0000),
                r(0x18_2000, 0x20_0000),
                r(0x20_1000, 0x30_0000),
                r(0x30_8000, 0x34_0000),
                r(0x34_1000, 0x35_0000),
            ]
        );
        assert_eq!(sum.reserved_bytes, 0x1000 + 0x8000 + 0x1000 + 0x1000);
        assert_eq!(sum.above_4g_usable_bytes, 0);
    }

    #[test]
    fn wrapping_entries() {
        let map = [
            usable(0x1000, 0x10_0000),
            usable(u64::MAX - 0xfff, 0x10_0000), // wraps: discarded
            reserved(0x8000, u64::MAX),          // wraps: clamped, carves
            usable(PHYS_ADDR_LIMIT - 0x2000, 0x10_0000), // beyond MAXPHYADDR: clipped
        ];
        let (list, sum) = build_usable_from_slice::<16>(&map, &[]).unwrap();
        assert_eq!(list.as_slice(), &[r(0x1000, 0x8000)]);
        assert_eq!(sum.reserved_bytes, u64::MAX - 0x8000);
        let map = [usable(PHYS_ADDR_LIMIT - 0x2000, 0x10_0000)];
        let (list, _) = build_usable_from_slice::<16>(&map, &[]).unwrap();
        assert_eq!(
            list.as_slice(),
            &[r(PHYS_ADDR_LIMIT - 0x2000, PHYS_ADDR_LIMIT)]
        );
    }

    #[test]
    fn overflow_reported() {
        let map: Vec<_> = (0..10).map(|i| usable(i * 0x10_000, 0x1000)).collect();
        assert_eq!(
            build_usable_from_slice::<4>(&map, &[]).map(|_| ()),
            Err(RegionError::TooManyRegions { capacity: 4 })
        );
        // Splits by reserved ranges also count.
        let map = [usable(0, 0x100_000)];
        let res: Vec<_> = (1..10)
            .map(|i| r(i * 0x10_000, i * 0x10_000 + 0x1000))
            .collect();
        assert!(build_usable_from_slice::<4>(&map, &res).is_err());
        assert!(build_usable_from_slice::<16>(&map, &res).is_ok());
    }

    #[test]
    fn randomised_against_bitmap_model() {
        // Small address space (64 pages) so a per-byte model is cheap.
        let mut rng = crate::testutil::Rng(0x1234_5678_9abc_def0);
        let mut rnd = move || rng.next_u64();
        const SPACE: u64 = 64 * PAGE_SIZE;
        for _ in 0..300 {
            let mut map = Vec::new();
            let mut model_usable = vec![false; SPACE as usize];
            let mut model_bad = vec![false; SPACE as usize];
            for _ in 0..(rnd() % 8) {
                let base = rnd() % SPACE;
                let len = rnd() % (SPACE - base + 1);
                let kind = if rnd() % 2 == 0 {
                    MemoryKind::Usable
                } else {
                    MemoryKind::Reserved
                };
                let m = if kind.is_usable() {
                    &mut model_usable
                } else {
                    &mut model_bad
                };
                for b in base..base + len {
                    m[b as usize] = true;
                }
                map.push(MemoryMapEntry::new(base, len, kind));
            }
            let mut res = Vec::new();
            for _ in 0..(rnd() % 4) {
                let base = rnd() % SPACE;
                let len = rnd() % (SPACE - base + 1);
                for b in base..base + len {
                    model_bad[b as usize] = true;
                }
                res.push(r(base, base + len));
            }
            let (list, sum) = build_usable_from_slice::<64>(&map, &res).unwrap();
            check_invariants(list.as_slice());
            for page in 0..SPACE / PAGE_SIZE {
                let bytes = (page * PAGE_SIZE) as usize..((page + 1) * PAGE_SIZE) as usize;
                let expect = bytes.clone().all(|b| model_usable[b] && !model_bad[b]);
                assert_eq!(
                    list.contains(page * PAGE_SIZE),
                    expect,
                    "page {page} map {map:?} res {res:?}"
                );
            }
            assert_eq!(sum.usable_bytes, list.total_bytes());
        }
    }

    #[test]
    fn find_free_run_basic() {
        let usable = [r(MIB, 16 * MIB), r(4 * GIB, 8 * GIB)];
        let res = [r(MIB, 2 * MIB + 5), r(3 * MIB, 4 * MIB)];
        assert_eq!(
            find_free_run(&usable, &res, 0x1000, 0x1000, u64::MAX),
            Some(2 * MIB + 0x1000)
        );
        assert_eq!(
            find_free_run(&usable, &res, MIB, MIB, u64::MAX),
            Some(4 * MIB)
        );
        // Too big for low memory, goes above 4G if allowed.
        assert_eq!(
            find_free_run(&usable, &res, 64 * MIB, 0x1000, u64::MAX),
            Some(4 * GIB)
        );
        assert_eq!(
            find_free_run(&usable, &res, 64 * MIB, 0x1000, 4 * GIB),
            None
        );
        // `below` limit respected exactly.
        assert_eq!(
            find_free_run(&usable, &res, MIB, 0x1000, 5 * MIB),
            Some(4 * MIB)
        );
        assert_eq!(find_free_run(&usable, &res, MIB, 0x1000, 5 * MIB - 1), None);
        assert_eq!(find_free_run(&usable, &res, 0, 0x1000, u64::MAX), None);
        // Unsorted input still gives the lowest fit.
        let usable2 = [r(4 * GIB, 8 * GIB), r(MIB, 16 * MIB)];
        assert_eq!(
            find_free_run(&usable2, &res, 0x1000, 0, u64::MAX),
            Some(2 * MIB + 5)
        );
        // Near u64::MAX: no overflow panic.
        let top = [r(u64::MAX - 0x1fff, u64::MAX)];
        assert_eq!(
            find_free_run(&top, &[], 0x1000, 0x1000, u64::MAX),
            Some(u64::MAX - 0x1fff)
        );
        assert_eq!(find_free_run(&top, &[], 0x10000, 0x1000, u64::MAX), None);
        assert_eq!(
            find_free_run(&top, &[r(0, u64::MAX)], 0x1000, 0x1000, u64::MAX),
            None
        );
    }
}
