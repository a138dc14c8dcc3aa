//! x86_64 4-level page-table logic, pure and host-testable.
//!
//! Physical memory is accessed only through the [`PhysMemory`] trait (the
//! kernel implements it over its direct map, tests over a `HashMap`), and
//! new table frames come from a [`FrameSource`]. Nothing here flushes the
//! TLB: after changing an existing mapping the caller must `invlpg` /
//! reload CR3 as appropriate.
//!
//! Conventions:
//! * Intermediate entries get `PRESENT | WRITABLE`, plus `USER` if the leaf
//!   is `USER` (an existing intermediate entry is upgraded to `USER` when a
//!   user leaf is mapped below it). They never get `NO_EXECUTE`: W^X / NX is
//!   decided by the leaf alone.
//! * Leaves always get `PRESENT`; `HUGE` is set for 2 MiB leaves and
//!   stripped from 4 KiB leaves (bit 7 of a PTE is PAT).
//! * Levels are numbered 4 (PML4) down to 1 (PT).

use core::fmt;

use bitflags::bitflags;

use super::{HUGE_PAGE_SIZE, LARGE_PAGE_SIZE, PAGE_SIZE, PHYS_ADDR_LIMIT, is_aligned};

bitflags! {
    /// Page-table entry flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PageFlags: u64 {
        /// Entry is valid.
        const PRESENT = 1 << 0;
        /// Writes allowed.
        const WRITABLE = 1 << 1;
        /// Ring-3 access allowed.
        const USER = 1 << 2;
        /// Write-through caching.
        const WRITE_THROUGH = 1 << 3;
        /// Caching disabled.
        const NO_CACHE = 1 << 4;
        /// Set by the CPU on access.
        const ACCESSED = 1 << 5;
        /// Set by the CPU on write (leaves only).
        const DIRTY = 1 << 6;
        /// Large/huge page (PD / PDPT level).
        const HUGE = 1 << 7;
        /// Not flushed on CR3 reload (leaves only).
        const GLOBAL = 1 << 8;
        /// Instruction fetches not allowed.
        const NO_EXECUTE = 1 << 63;
    }
}

/// Physical-address bits of a table entry pointing to a table or a 4 KiB
/// page.
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// Physical-address bits of a 2 MiB leaf.
const ADDR_MASK_2M: u64 = 0x000F_FFFF_FFE0_0000;
/// Physical-address bits of a 1 GiB leaf.
const ADDR_MASK_1G: u64 = 0x000F_FFFF_C000_0000;
/// Flag bits we interpret (everything that isn't address / ignored bits).
const FLAG_MASK: u64 = 0x8000_0000_0000_01FF;

/// Number of entries per table.
pub const ENTRIES: u64 = 512;

/// Physical memory access used by the walker.
///
/// Addresses are physical and 8-byte aligned (the walker never produces
/// anything else).
pub trait PhysMemory {
    /// Reads the 8-byte value at physical address `phys`.
    fn read_u64(&self, phys: u64) -> u64;
    /// Writes the 8-byte value at physical address `phys`.
    fn write_u64(&mut self, phys: u64, val: u64);
    /// Fills the 4 KiB frame at `phys` with zeros.
    fn zero_frame(&mut self, phys: u64);
}

/// Source of frames for new page tables.
pub trait FrameSource {
    /// Returns the physical address of a 4 KiB-aligned frame to use as a
    /// page table (the mapper zeroes it), or `None` when out of memory.
    fn alloc_table_frame(&mut self) -> Option<u64>;
}

impl<F: FrameSource + ?Sized> FrameSource for &mut F {
    fn alloc_table_frame(&mut self) -> Option<u64> {
        (**self).alloc_table_frame()
    }
}

/// A [`FrameSource`] that never has frames: for operations that must not
/// create tables.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFrames;

impl FrameSource for NoFrames {
    fn alloc_table_frame(&mut self) -> Option<u64> {
        None
    }
}

/// Page size of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB (PT leaf).
    Size4K,
    /// 2 MiB (PD leaf).
    Size2M,
    /// 1 GiB (PDPT leaf).
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => LARGE_PAGE_SIZE,
            PageSize::Size1G => HUGE_PAGE_SIZE,
        }
    }
}

/// Mapping errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Something is already mapped there.
    AlreadyMapped,
    /// Nothing is mapped there.
    NotMapped,
    /// The [`FrameSource`] ran dry (tables created so far stay in place).
    OutOfFrames,
    /// The virtual address (range) isn't canonical.
    NonCanonical,
    /// An address or length isn't aligned to the page size, or a physical
    /// address is beyond 2^52.
    Misaligned,
    /// A larger page covers the address where a smaller one (or a table)
    /// is needed.
    HugePageInTheWay,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapError::AlreadyMapped => "already mapped",
            MapError::NotMapped => "not mapped",
            MapError::OutOfFrames => "out of frames for page tables",
            MapError::NonCanonical => "non-canonical virtual address",
            MapError::Misaligned => "misaligned address or length",
            MapError::HugePageInTheWay => "a huge page is in the way",
        })
    }
}

/// Whether `virt` is canonical (bits 63..47 all equal), for 4-level paging.
#[must_use]
pub const fn canonical(virt: u64) -> bool {
    let top = virt >> 47;
    top == 0 || top == 0x1_FFFF
}

/// Sign-extends a 48-bit address to its canonical form.
#[must_use]
pub const fn make_canonical(virt: u64) -> u64 {
    (((virt << 16) as i64) >> 16) as u64
}

/// Index into the table at `level` (4 = PML4 .. 1 = PT) for `virt`.
#[must_use]
pub const fn table_index(virt: u64, level: u8) -> u64 {
    (virt >> (12 + 9 * (level as u32 - 1))) & 0x1FF
}

/// Flags of a raw entry.
#[must_use]
pub const fn entry_flags(entry: u64) -> PageFlags {
    PageFlags::from_bits_truncate(entry & FLAG_MASK)
}

/// Whether every byte of `[virt, virt + len)` is canonical and the range
/// doesn't wrap or straddle the canonical hole.
#[must_use]
pub const fn canonical_range(virt: u64, len: u64) -> bool {
    if len == 0 {
        return canonical(virt);
    }
    let Some(last) = virt.checked_add(len - 1) else {
        return false;
    };
    canonical(virt) && canonical(last) && (virt >> 47 == last >> 47)
}

/// One level of a [`Walk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkStep {
    /// Table level (4 = PML4 .. 1 = PT).
    pub level: u8,
    /// Physical address of the entry.
    pub entry_addr: u64,
    /// Raw entry value.
    pub entry: u64,
}

/// How a [`Walk`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// A leaf was found at the last step.
    Mapped {
        /// Physical address `virt` translates to.
        phys: u64,
        /// Leaf size.
        size: PageSize,
    },
    /// The entry at the last step isn't present.
    NotPresent,
    /// `virt` isn't canonical; no steps were taken.
    NonCanonical,
}

/// The entries visited translating one address, top level first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    steps: [WalkStep; 4],
    depth: usize,
    /// Outcome.
    pub end: WalkEnd,
}

impl Walk {
    /// The visited entries (PML4 first); the last one is the leaf or the
    /// non-present entry.
    #[must_use]
    pub fn steps(&self) -> &[WalkStep] {
        self.steps.get(..self.depth).unwrap_or(&[])
    }

    /// The last visited entry.
    #[must_use]
    pub fn last(&self) -> Option<&WalkStep> {
        self.steps().last()
    }

    /// Effective permissions: the leaf's flags, with `WRITABLE` and `USER`
    /// only if set at every level and `NO_EXECUTE` if set at any level.
    /// `None` unless mapped.
    #[must_use]
    pub fn effective_flags(&self) -> Option<PageFlags> {
        if !matches!(self.end, WalkEnd::Mapped { .. }) {
            return None;
        }
        let leaf = entry_flags(self.last()?.entry);
        let mut and = PageFlags::WRITABLE | PageFlags::USER;
        let mut nx = PageFlags::empty();
        for s in self.steps() {
            let f = entry_flags(s.entry);
            and &= f;
            nx |= f & PageFlags::NO_EXECUTE;
        }
        let perms = PageFlags::WRITABLE | PageFlags::USER | PageFlags::NO_EXECUTE;
        Some((leaf - perms) | and | nx)
    }
}

/// A 4-level page-table hierarchy identified by its PML4's physical
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTable {
    /// Physical address of the PML4.
    pub root: u64,
}

impl PageTable {
    /// Wraps an existing PML4.
    #[must_use]
    pub const fn from_root(root: u64) -> Self {
        Self { root }
    }

    /// Allocates and zeroes a new, empty PML4.
    pub fn new(mem: &mut impl PhysMemory, frames: &mut impl FrameSource) -> Result<Self, MapError> {
        Ok(Self {
            root: new_table(mem, frames)?,
        })
    }

    /// Walks the tables for `virt`, reporting every visited entry.
    #[must_use]
    pub fn walk(&self, mem: &impl PhysMemory, virt: u64) -> Walk {
        let empty = WalkStep {
            level: 0,
            entry_addr: 0,
            entry: 0,
        };
        let mut w = Walk {
            steps: [empty; 4],
            depth: 0,
            end: WalkEnd::NonCanonical,
        };
        if !canonical(virt) {
            return w;
        }
        let mut table = self.root & ADDR_MASK;
        for (i, level) in [4u8, 3, 2, 1].into_iter().enumerate() {
            let entry_addr = table + table_index(virt, level) * 8;
            let entry = mem.read_u64(entry_addr);
            if let Some(slot) = w.steps.get_mut(i) {
                *slot = WalkStep {
                    level,
                    entry_addr,
                    entry,
                };
            }
            w.depth = i + 1;
            if entry & PageFlags::PRESENT.bits() == 0 {
                w.end = WalkEnd::NotPresent;
                return w;
            }
            let huge = entry & PageFlags::HUGE.bits() != 0;
            let leaf = match level {
                1 => Some((PageSize::Size4K, ADDR_MASK)),
                2 if huge => Some((PageSize::Size2M, ADDR_MASK_2M)),
                3 if huge => Some((PageSize::Size1G, ADDR_MASK_1G)),
                _ => None,
            };
            if let Some((size, mask)) = leaf {
                let phys = (entry & mask) | (virt & (size.bytes() - 1));
                w.end = WalkEnd::Mapped { phys, size };
                return w;
            }
            table = entry & ADDR_MASK;
        }
        // Unreachable: level 1 always ends the walk.
        w.end = WalkEnd::NotPresent;
        w
    }

    /// Translates `virt` to `(phys, effective flags, page size)`; see
    /// [`Walk::effective_flags`] for how flags combine across levels.
    #[must_use]
    pub fn translate(
        &self,
        mem: &impl PhysMemory,
        virt: u64,
    ) -> Option<(u64, PageFlags, PageSize)> {
        let w = self.walk(mem, virt);
        match w.end {
            WalkEnd::Mapped { phys, size } => Some((phys, w.effective_flags()?, size)),
            _ => None,
        }
    }

    /// Descends from the PML4 to the table at `target_level` (3, 2 or 1)
    /// covering `virt`, creating tables as needed. Returns the table's
    /// physical address.
    fn descend(
        &self,
        mem: &mut impl PhysMemory,
        frames: &mut impl FrameSource,
        virt: u64,
        target_level: u8,
        user: bool,
    ) -> Result<u64, MapError> {
        let mut table = self.root & ADDR_MASK;
        let mut level = 4u8;
        while level > target_level {
            let entry_addr = table + table_index(virt, level) * 8;
            let entry = mem.read_u64(entry_addr);
            if entry & PageFlags::PRESENT.bits() == 0 {
                let new = new_table(mem, frames)?;
                let mut f = PageFlags::PRESENT | PageFlags::WRITABLE;
                if user {
                    f |= PageFlags::USER;
                }
                mem.write_u64(entry_addr, new | f.bits());
                table = new;
            } else if entry & PageFlags::HUGE.bits() != 0 && level <= 3 {
                return Err(MapError::HugePageInTheWay);
            } else {
                if user && entry & PageFlags::USER.bits() == 0 {
                    mem.write_u64(entry_addr, entry | PageFlags::USER.bits());
                }
                table = entry & ADDR_MASK;
            }
            level -= 1;
        }
        Ok(table)
    }

    fn map_leaf(
        &self,
        mem: &mut impl PhysMemory,
        frames: &mut impl FrameSource,
        virt: u64,
        phys: u64,
        flags: PageFlags,
        size: PageSize,
    ) -> Result<(), MapError> {
        if !canonical(virt) {
            return Err(MapError::NonCanonical);
        }
        let bytes = size.bytes();
        if !is_aligned(virt, bytes) || !is_aligned(phys, bytes) || phys >= PHYS_ADDR_LIMIT {
            return Err(MapError::Misaligned);
        }
        let level = match size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        };
        let user = flags.contains(PageFlags::USER);
        let table = self.descend(mem, frames, virt, level, user)?;
        let entry_addr = table + table_index(virt, level) * 8;
        let old = mem.read_u64(entry_addr);
        if old & PageFlags::PRESENT.bits() != 0 {
            return Err(MapError::AlreadyMapped);
        }
        let mut f = flags | PageFlags::PRESENT;
        if size == PageSize::Size4K {
            f -= PageFlags::HUGE;
        } else {
            f |= PageFlags::HUGE;
        }
        mem.write_u64(entry_addr, phys | f.bits());
        Ok(())
    }

    /// Maps the 4 KiB page at `virt` to `phys`.
    pub fn map_4k(
        &self,
        mem: &mut impl PhysMemory,
        frames: &mut impl FrameSource,
        virt: u64,
        phys: u64,
        flags: PageFlags,
    ) -> Result<(), MapError> {
        self.map_leaf(mem, frames, virt, phys, flags, PageSize::Size4K)
    }

    /// Maps the 2 MiB page at `virt` to `phys` (a `HUGE` PD entry). Fails
    /// with `AlreadyMapped` if a page table already exists there (even an
    /// empty one).
    pub fn map_2m(
        &self,
        mem: &mut impl PhysMemory,
        frames: &mut impl FrameSource,
        virt: u64,
        phys: u64,
        flags: PageFlags,
    ) -> Result<(), MapError> {
        self.map_leaf(mem, frames, virt, phys, flags, PageSize::Size2M)
    }

    /// Maps the 1 GiB page at `virt` to `phys` (a `HUGE` PDPT entry; the CPU
    /// must support 1 GiB pages).
    pub fn map_1g(
        &self,
        mem: &mut impl PhysMemory,
        frames: &mut impl FrameSource,
        virt: u64,
        phys: u64,
        flags: PageFlags,
    ) -> Result<(), MapError> {
        self.map_leaf(mem, frames, virt, phys, flags, PageSize::Size1G)
    }

    /// Maps `[virt, virt + len)` to `[phys, phys + len)`, using 2 MiB pages
    /// wherever both addresses are 2 MiB aligned and at least 2 MiB remain,
    /// 4 KiB pages otherwise. All three must be 4 KiB aligned. On error the
    /// pages mapped so far stay mapped.
    pub fn map_range(
        &self,
        mem: &mut impl PhysMemory,
        frames: &mut impl FrameSource,
        virt: u64,
        phys: u64,
        len: u64,
        flags: PageFlags,
    ) -> Result<(), MapError> {
        if !is_aligned(virt, PAGE_SIZE)
            || !is_aligned(phys, PAGE_SIZE)
            || !is_aligned(len, PAGE_SIZE)
        {
            return Err(MapError::Misaligned);
        }
        if !canonical_range(virt, len) {
            return Err(MapError::NonCanonical);
        }
        match phys.checked_add(len) {
            Some(end) if end <= PHYS_ADDR_LIMIT => {}
            _ => return Err(MapError::Misaligned),
        }
        let mut off = 0;
        while off < len {
            let (v, p) = (virt + off, phys + off);
            let step = if is_aligned(v, LARGE_PAGE_SIZE)
                && is_aligned(p, LARGE_PAGE_SIZE)
                && len - off >= LARGE_PAGE_SIZE
            {
                self.map_2m(mem, frames, v, p, flags)?;
                LARGE_PAGE_SIZE
            } else {
                self.map_4k(mem, frames, v, p, flags)?;
                PAGE_SIZE
            };
            off += step;
        }
        Ok(())
    }

    /// Finds the leaf entry of the given size for `virt`.
    fn leaf_entry(
        &self,
        mem: &impl PhysMemory,
        virt: u64,
        size: PageSize,
    ) -> Result<WalkStep, MapError> {
        if !canonical(virt) {
            return Err(MapError::NonCanonical);
        }
        if !is_aligned(virt, size.bytes()) {
            return Err(MapError::Misaligned);
        }
        let w = self.walk(mem, virt);
        let last = *w.last().ok_or(MapError::NotMapped)?;
        match w.end {
            WalkEnd::Mapped { size: s, .. } if s == size => Ok(last),
            WalkEnd::Mapped { size: s, .. } if s.bytes() > size.bytes() => {
                Err(MapError::HugePageInTheWay)
            }
            // A smaller page (or table) lives inside the requested area.
            WalkEnd::Mapped { .. } => Err(MapError::NotMapped),
            WalkEnd::NotPresent | WalkEnd::NonCanonical => Err(MapError::NotMapped),
        }
    }

    /// Unmaps the 4 KiB page at `virt`, returning the physical address it
    /// mapped. Tables are not freed; the TLB is not flushed.
    pub fn unmap_4k(&self, mem: &mut impl PhysMemory, virt: u64) -> Result<u64, MapError> {
        let leaf = self.leaf_entry(mem, virt, PageSize::Size4K)?;
        mem.write_u64(leaf.entry_addr, 0);
        Ok(leaf.entry & ADDR_MASK)
    }

    /// Unmaps the 2 MiB page at `virt`, returning the physical address it
    /// mapped. The TLB is not flushed.
    pub fn unmap_2m(&self, mem: &mut impl PhysMemory, virt: u64) -> Result<u64, MapError> {
        let leaf = self.leaf_entry(mem, virt, PageSize::Size2M)?;
        mem.write_u64(leaf.entry_addr, 0);
        Ok(leaf.entry & ADDR_MASK_2M)
    }

    /// Replaces the flags of the 4 KiB page at `virt` (keeping its address;
    /// `PRESENT` is forced, `HUGE` stripped). Intermediate entries are
    /// upgraded to `USER` if needed. The TLB is not flushed.
    pub fn set_flags_4k(
        &self,
        mem: &mut impl PhysMemory,
        virt: u64,
        flags: PageFlags,
    ) -> Result<(), MapError> {
        let leaf = self.leaf_entry(mem, virt, PageSize::Size4K)?;
        if flags.contains(PageFlags::USER) {
            // Cannot fail: all levels are present and none is huge.
            self.descend(mem, &mut NoFrames, virt, 1, true)?;
        }
        let f = (flags | PageFlags::PRESENT) - PageFlags::HUGE;
        mem.write_u64(leaf.entry_addr, (leaf.entry & ADDR_MASK) | f.bits());
        Ok(())
    }
}

/// Allocates and zeroes a table frame.
fn new_table(mem: &mut impl PhysMemory, frames: &mut impl FrameSource) -> Result<u64, MapError> {
    let f = frames.alloc_table_frame().ok_or(MapError::OutOfFrames)?;
    if !is_aligned(f, PAGE_SIZE) || f >= PHYS_ADDR_LIMIT {
        return Err(MapError::Misaligned);
    }
    mem.zero_frame(f);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Sparse fake physical memory.
    #[derive(Default)]
    struct FakeMem {
        words: HashMap<u64, u64>,
        zeroed: Vec<u64>,
    }

    impl PhysMemory for FakeMem {
        fn read_u64(&self, phys: u64) -> u64 {
            assert_eq!(phys % 8, 0);
            self.words
                .get(&phys)
                .copied()
                .unwrap_or(0xBAD0_BAD0_BAD0_BAD0)
        }
        fn write_u64(&mut self, phys: u64, val: u64) {
            assert_eq!(phys % 8, 0);
            self.words.insert(phys, val);
        }
        fn zero_frame(&mut self, phys: u64) {
            assert_eq!(phys % PAGE_SIZE, 0);
            for i in 0..512 {
                self.words.insert(phys + i * 8, 0);
            }
            self.zeroed.push(phys);
        }
    }

    /// Hands out frames from a bump pointer, optionally limited.
    struct Bump {
        next: u64,
        left: usize,
    }

    impl FrameSource for Bump {
        fn alloc_table_frame(&mut self) -> Option<u64> {
            if self.left == 0 {
                return None;
            }
            self.left -= 1;
            let f = self.next;
            self.next += PAGE_SIZE;
            Some(f)
        }
    }

    fn setup() -> (FakeMem, Bump, PageTable) {
        let mut mem = FakeMem::default();
        let mut frames = Bump {
            next: 0x10_0000,
            left: 1000,
        };
        let pt = PageTable::new(&mut mem, &mut frames).unwrap();
        (mem, frames, pt)
    }

    const RW: PageFlags = PageFlags::PRESENT.union(PageFlags::WRITABLE);

    #[test]
    fn canonical_checks() {
        assert!(canonical(0));
        assert!(canonical(0x0000_7FFF_FFFF_FFFF));
        assert!(!canonical(0x0000_8000_0000_0000));
        assert!(!canonical(0xFFFF_7FFF_FFFF_FFFF));
        assert!(canonical(0xFFFF_8000_0000_0000));
        assert!(canonical(0xFFFF_FFFF_8000_0000));
        assert!(canonical(u64::MAX));
        assert_eq!(make_canonical(0x0000_8000_0000_0000), 0xFFFF_8000_0000_0000);
        assert!(canonical_range(0x0000_7FFF_FFFF_F000, 0x1000));
        assert!(!canonical_range(0x0000_7FFF_FFFF_F000, 0x2000));
        assert!(!canonical_range(u64::MAX - 0xfff, 0x2000));
        assert!(canonical_range(0xFFFF_FFFF_FFFF_F000, 0x1000));
    }

    #[test]
    fn indices() {
        let v = 0xFFFF_8123_4567_8000u64;
        assert_eq!(table_index(v, 4), (v >> 39) & 0x1ff);
        assert_eq!(table_index(v, 1), (v >> 12) & 0x1ff);
        assert_eq!(table_index(0xFFFF_FFFF_8000_0000, 4), 511);
        assert_eq!(table_index(0xFFFF_FFFF_8000_0000, 3), 510);
    }

    #[test]
    fn map_translate_4k() {
        let (mut mem, mut fr, pt) = setup();
        let v = 0xFFFF_8000_0012_3000;
        pt.map_4k(&mut mem, &mut fr, v, 0x5000, RW | PageFlags::NO_EXECUTE)
            .unwrap();
        let (p, f, s) = pt.translate(&mem, v + 0x123).unwrap();
        assert_eq!(p, 0x5123);
        assert_eq!(s, PageSize::Size4K);
        assert!(f.contains(RW | PageFlags::NO_EXECUTE));
        assert!(!f.contains(PageFlags::USER));
        assert_eq!(pt.translate(&mem, v + 0x1000), None);
        assert_eq!(pt.translate(&mem, v - 1), None);
        // 1 PML4 + 3 new tables.
        assert_eq!(mem.zeroed.len(), 4);
        // Intermediates: PRESENT|WRITABLE, no NX, no USER.
        let w = pt.walk(&mem, v);
        assert_eq!(w.steps().len(), 4);
        for s in &w.steps()[..3] {
            assert_eq!(entry_flags(s.entry), RW);
        }
        assert_eq!(w.steps()[3].level, 1);
        // Second page in the same table allocates nothing.
        pt.map_4k(&mut mem, &mut fr, v + 0x1000, 0x6000, RW)
            .unwrap();
        assert_eq!(mem.zeroed.len(), 4);
        let (p, f, _) = pt.translate(&mem, v + 0x1fff).unwrap();
        assert_eq!(p, 0x6fff);
        assert!(!f.contains(PageFlags::NO_EXECUTE));
        // HUGE is stripped on 4K leaves.
        pt.map_4k(&mut mem, &mut fr, v + 0x2000, 0x7000, RW | PageFlags::HUGE)
            .unwrap();
        let (_, f, s) = pt.translate(&mem, v + 0x2000).unwrap();
        assert!(!f.contains(PageFlags::HUGE));
        assert_eq!(s, PageSize::Size4K);
    }

    #[test]
    fn map_translate_2m_and_kernel_half() {
        let (mut mem, mut fr, pt) = setup();
        let v = 0xFFFF_FFFF_8000_0000;
        pt.map_2m(&mut mem, &mut fr, v, 0x4000_0000, RW | PageFlags::GLOBAL)
            .unwrap();
        let (p, f, s) = pt.translate(&mem, v + 0x1F_FFFF).unwrap();
        assert_eq!(p, 0x4000_0000 + 0x1F_FFFF);
        assert_eq!(s, PageSize::Size2M);
        assert!(f.contains(PageFlags::HUGE | PageFlags::GLOBAL | RW));
        assert_eq!(pt.translate(&mem, v + LARGE_PAGE_SIZE), None);
        // Misaligned.
        assert_eq!(
            pt.map_2m(&mut mem, &mut fr, v + 0x1000, 0, RW),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            pt.map_2m(&mut mem, &mut fr, v, 0x1000, RW),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            pt.map_4k(&mut mem, &mut fr, 0x1001, 0, RW),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            pt.map_4k(&mut mem, &mut fr, 0x1000, PHYS_ADDR_LIMIT, RW),
            Err(MapError::Misaligned)
        );
        // A 4K map inside the 2M page hits the huge page.
        assert_eq!(
            pt.map_4k(&mut mem, &mut fr, v + 0x3000, 0, RW),
            Err(MapError::HugePageInTheWay)
        );
        assert_eq!(
            pt.unmap_4k(&mut mem, v + 0x3000),
            Err(MapError::HugePageInTheWay)
        );
        assert_eq!(
            pt.map_2m(&mut mem, &mut fr, v, 0, RW),
            Err(MapError::AlreadyMapped)
        );
        // 2M over an existing page table.
        pt.map_4k(&mut mem, &mut fr, 0x20_0000, 0x1000, RW).unwrap();
        assert_eq!(
            pt.map_2m(&mut mem, &mut fr, 0x20_0000, 0, RW),
            Err(MapError::AlreadyMapped)
        );
        assert_eq!(pt.unmap_2m(&mut mem, 0x20_0000), Err(MapError::NotMapped));
        assert_eq!(pt.unmap_2m(&mut mem, v), Ok(0x4000_0000));
        assert_eq!(pt.translate(&mem, v), None);
    }

    #[test]
    fn map_1g() {
        let (mut mem, mut fr, pt) = setup();
        pt.map_1g(&mut mem, &mut fr, 0x40_0000_0000, 0x8000_0000, RW)
            .unwrap();
        let (p, _, s) = pt.translate(&mem, 0x40_0000_0000 + 0x1234_5678).unwrap();
        assert_eq!(p, 0x8000_0000 + 0x1234_5678);
        assert_eq!(s, PageSize::Size1G);
        assert_eq!(
            pt.map_2m(&mut mem, &mut fr, 0x40_0020_0000, 0, RW),
            Err(MapError::HugePageInTheWay)
        );
    }

    #[test]
    fn non_canonical_rejected() {
        let (mut mem, mut fr, pt) = setup();
        for v in [
            0x0000_8000_0000_0000u64,
            0xFFFF_7FFF_FFFF_F000,
            0x1234_0000_0000_0000,
        ] {
            assert_eq!(
                pt.map_4k(&mut mem, &mut fr, v, 0, RW),
                Err(MapError::NonCanonical)
            );
            assert_eq!(pt.translate(&mem, v), None);
            assert_eq!(pt.walk(&mem, v).end, WalkEnd::NonCanonical);
            assert_eq!(pt.unmap_4k(&mut mem, v), Err(MapError::NonCanonical));
        }
        assert_eq!(
            pt.map_range(&mut mem, &mut fr, 0x0000_7FFF_FFFF_F000, 0, 0x2000, RW),
            Err(MapError::NonCanonical)
        );
        // Nothing was mapped by the failed range.
        assert_eq!(pt.translate(&mem, 0x0000_7FFF_FFFF_F000), None);
    }

    #[test]
    fn already_mapped_and_unmap() {
        let (mut mem, mut fr, pt) = setup();
        pt.map_4k(&mut mem, &mut fr, 0x40_0000, 0x9000, RW).unwrap();
        assert_eq!(
            pt.map_4k(&mut mem, &mut fr, 0x40_0000, 0xa000, RW),
            Err(MapError::AlreadyMapped)
        );
        assert_eq!(pt.translate(&mem, 0x40_0000).unwrap().0, 0x9000);
        assert_eq!(pt.unmap_4k(&mut mem, 0x40_0000), Ok(0x9000));
        assert_eq!(pt.unmap_4k(&mut mem, 0x40_0000), Err(MapError::NotMapped));
        assert_eq!(pt.unmap_4k(&mut mem, 0x7000_0000), Err(MapError::NotMapped));
        assert_eq!(pt.unmap_4k(&mut mem, 0x40_0001), Err(MapError::Misaligned));
        assert_eq!(pt.translate(&mem, 0x40_0000), None);
        pt.map_4k(&mut mem, &mut fr, 0x40_0000, 0xa000, RW).unwrap();
        assert_eq!(pt.translate(&mem, 0x40_0000).unwrap().0, 0xa000);
    }

    #[test]
    fn user_and_permissions() {
        let (mut mem, mut fr, pt) = setup();
        // Kernel page first: intermediates without USER.
        pt.map_4k(&mut mem, &mut fr, 0x1000, 0x1000, RW).unwrap();
        // User page in the same tables upgrades intermediates to USER.
        pt.map_4k(&mut mem, &mut fr, 0x2000, 0x2000, PageFlags::USER)
            .unwrap();
        let w = pt.walk(&mem, 0x2000);
        for s in w.steps() {
            assert!(entry_flags(s.entry).contains(PageFlags::USER | PageFlags::PRESENT));
        }
        let (_, f, _) = pt.translate(&mem, 0x2000).unwrap();
        assert!(f.contains(PageFlags::USER));
        assert!(!f.contains(PageFlags::WRITABLE));
        // The kernel page's leaf still isn't USER, so effective isn't.
        let (_, f, _) = pt.translate(&mem, 0x1000).unwrap();
        assert!(!f.contains(PageFlags::USER));
        assert!(f.contains(PageFlags::WRITABLE));
        // set_flags_4k.
        pt.set_flags_4k(&mut mem, 0x1000, PageFlags::NO_EXECUTE)
            .unwrap();
        let (p, f, _) = pt.translate(&mem, 0x1000).unwrap();
        assert_eq!(p, 0x1000);
        assert_eq!(f, PageFlags::PRESENT | PageFlags::NO_EXECUTE);
        assert_eq!(
            pt.set_flags_4k(&mut mem, 0x9000_0000, RW),
            Err(MapError::NotMapped)
        );
        // Effective flags: NX at an intermediate level makes the leaf NX,
        // a read-only intermediate makes it read-only.
        let pml4e = pt.walk(&mem, 0x1000).steps()[0];
        mem.write_u64(
            pml4e.entry_addr,
            (pml4e.entry | PageFlags::NO_EXECUTE.bits()) & !PageFlags::WRITABLE.bits(),
        );
        let (_, f, _) = pt.translate(&mem, 0x2000).unwrap();
        assert!(f.contains(PageFlags::NO_EXECUTE));
        assert!(!f.contains(PageFlags::WRITABLE));
    }

    #[test]
    fn map_range_mixed() {
        let (mut mem, mut fr, pt) = setup();
        // 4K head, two 2M pages, 4K tail.
        let v = 0xFFFF_8000_001F_E000u64;
        let p = 0x0000_0000_001F_E000u64;
        let len = 0x2000 + 2 * LARGE_PAGE_SIZE + 0x3000;
        pt.map_range(&mut mem, &mut fr, v, p, len, RW | PageFlags::NO_EXECUTE)
            .unwrap();
        let mut off = 0;
        let mut sizes = Vec::new();
        while off < len {
            let (pp, f, s) = pt.translate(&mem, v + off).unwrap();
            assert_eq!(pp, p + off);
            assert!(f.contains(PageFlags::NO_EXECUTE | RW));
            sizes.push(s);
            off += PAGE_SIZE;
        }
        assert_eq!(
            sizes.iter().filter(|s| **s == PageSize::Size2M).count(),
            1024
        );
        assert_eq!(sizes.iter().filter(|s| **s == PageSize::Size4K).count(), 5);
        assert_eq!(pt.translate(&mem, v + len), None);
        assert_eq!(pt.translate(&mem, v - 1), None);
        // Phys not 2M-congruent: everything 4K.
        let (mut mem, mut fr, pt) = setup();
        pt.map_range(&mut mem, &mut fr, 0x20_0000, 0x30_1000, LARGE_PAGE_SIZE, RW)
            .unwrap();
        assert_eq!(pt.translate(&mem, 0x20_0000).unwrap().2, PageSize::Size4K);
        assert_eq!(pt.translate(&mem, 0x3F_F000).unwrap().0, 0x50_0000);
        // Alignment / overflow errors.
        assert_eq!(
            pt.map_range(&mut mem, &mut fr, 0, 0, 0x1001, RW),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            pt.map_range(&mut mem, &mut fr, 0, PHYS_ADDR_LIMIT - 0x1000, 0x2000, RW),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            pt.map_range(&mut mem, &mut fr, 0x100_0000, 0, 0, RW),
            Ok(())
        );
        // Overlap detection in the middle of a range.
        assert_eq!(
            pt.map_range(&mut mem, &mut fr, 0x1F_0000, 0, 0x20_000, RW),
            Err(MapError::AlreadyMapped)
        );
    }

    #[test]
    fn out_of_frames() {
        let mut mem = FakeMem::default();
        let mut fr = Bump {
            next: 0x10_0000,
            left: 2,
        };
        let pt = PageTable::new(&mut mem, &mut fr).unwrap();
        assert_eq!(
            pt.map_4k(&mut mem, &mut fr, 0x1000, 0x1000, RW),
            Err(MapError::OutOfFrames)
        );
        assert_eq!(pt.translate(&mem, 0x1000), None);
        assert_eq!(
            PageTable::new(&mut mem, &mut NoFrames),
            Err(MapError::OutOfFrames)
        );
        struct Crooked;
        impl FrameSource for Crooked {
            fn alloc_table_frame(&mut self) -> Option<u64> {
                Some(0x1234)
            }
        }
        assert_eq!(
            PageTable::new(&mut mem, &mut Crooked),
            Err(MapError::Misaligned)
        );
    }

    #[test]
    fn random_round_trips() {
        let (mut mem, mut fr, pt) = setup();
        fr.left = usize::MAX;
        let mut rng = crate::testutil::Rng(0xDEAD_BEEF);
        let mut model = HashMap::new();
        for _ in 0..2000 {
            let seed = rng.next_u64();
            let v = make_canonical((seed & 0x0000_FFFF_FFFF_F000) % (1 << 48)) & !0xFFF;
            let p = (seed >> 20) & 0x0000_00FF_FFFF_F000;
            match pt.map_4k(&mut mem, &mut fr, v, p, RW) {
                Ok(()) => assert!(model.insert(v, p).is_none()),
                Err(MapError::AlreadyMapped) => assert!(model.contains_key(&v)),
                Err(e) => panic!("{e}"),
            }
        }
        for (v, p) in &model {
            assert_eq!(pt.translate(&mem, *v).map(|t| t.0), Some(*p));
        }
        for (v, p) in &model {
            assert_eq!(pt.unmap_4k(&mut mem, *v), Ok(*p));
            assert_eq!(pt.translate(&mem, *v), None);
        }
    }
}
