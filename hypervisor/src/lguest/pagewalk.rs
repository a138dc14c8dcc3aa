//! Guest page tables: the two i386 formats and the walk of a guest virtual
//! address through them (lguest ABI sheet §5.3, §5.5).
//!
//! A guest chooses one [`Format`] for its life:
//!
//! | Format | Levels (entries × size) | `cr3` |
//! |---|---|---|
//! | [`Format::TwoLevel`] | PGD 1024 × u32 → PTE 1024 × u32 (4 MiB per PGD entry) | page-aligned |
//! | [`Format::Pae`] | PDPT 4 × u64 → PMD 512 × u64 → PTE 512 × u64 | 32-byte aligned |
//!
//! Everything read from guest memory is an allegation. The walk
//! ([`GuestPaging::walk`]) reads entries only through the bounds-checked
//! [`GuestMemory`] accessor and sorts each failure into one of three kinds:
//!
//! * [`WalkError::NotPresent`] and [`WalkError::Protection`]: the guest's
//!   own page fault, to be reflected to it with its error code and `cr2`;
//! * [`WalkError::Bad`]: an entry no lguest guest may write (a frame at or
//!   beyond `pfnlimit`, a large page, reserved bits, flags lguest refuses in
//!   a table entry). The guest is killed with [`BadEntry`]'s text, which
//!   names the entry, where it is and what is wrong with it.
//!
//! The rules (lguest's, made strict):
//!
//! * A 2-level PGD entry or a PAE PMD entry may only carry the flags of
//!   `_PAGE_TABLE` ([`PAGE_TABLE`] = `PRESENT|RW|USER|ACCESSED|DIRTY`); PSE
//!   (a 4 MiB or 2 MiB page) is refused as a large page.
//! * A PAE PDPT entry may only carry `PRESENT`.
//! * A leaf PTE may not set bit 7 (PSE/PAT).
//! * In every PAE entry bits 52–63 are reserved: NX is hidden from the
//!   guest, so bit 63 is reserved too.
//! * Every frame a present entry names (a table or a page) must be below
//!   `pfnlimit`.
//! * Permissions are x86's: the effective `RW` and `USER` rights are the AND
//!   of the levels that carry them (PGD and PTE; PAE: PMD and PTE; a PAE
//!   PDPT entry has neither). A write needs `RW` in supervisor mode too
//!   (CR0.WP is on). There is no NX, so an instruction fetch is a read.
//! * Validation happens when an entry is used, top level first, before the
//!   permission check: a guest whose walk meets a bad entry is killed even if
//!   the access would also have been a protection fault.
//!
//! Not-present entries are never validated (a guest may keep anything in
//! them, e.g. swap entries).
//!
//! [`PAGE_TABLE`]: guest_abi::paging::PAGE_TABLE

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use core::fmt;

use guest_abi::paging::{
    PAE_RESERVED_HIGH, PAGE_ACCESSED, PAGE_ADDR_MASK, PAGE_DIRTY, PAGE_PRESENT, PAGE_PSE, PAGE_RW,
    PAGE_TABLE, PAGE_USER,
};

use super::guestmem::GuestMemory;
use super::kill::Kill;

/// Guest page size.
pub const PAGE: u32 = 4096;
/// The low 12 bits of an entry (flags and software bits).
const LOW_FLAGS: u64 = 0xFFF;

/// The guest's page-table format, fixed for its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Non-PAE i386 paging: PGD 1024 × u32 → PTE 1024 × u32.
    TwoLevel,
    /// PAE: PDPT 4 × u64 → PMD 512 × u64 → PTE 512 × u64.
    Pae,
}

impl Format {
    /// The name of the per-guest module option value (`paging=2level`,
    /// `paging=pae`).
    pub const fn option_name(self) -> &'static str {
        match self {
            Format::TwoLevel => "2level",
            Format::Pae => "pae",
        }
    }

    /// Number of top-level entries (`SET_PGD` indices are below this).
    pub const fn top_entries(self) -> u32 {
        match self {
            Format::TwoLevel => 1024,
            Format::Pae => 4,
        }
    }

    /// Required alignment of the top-level table (`cr3`).
    pub const fn top_align(self) -> u32 {
        match self {
            Format::TwoLevel => PAGE,
            Format::Pae => 32,
        }
    }

    /// Size of the top-level table in bytes.
    pub const fn top_bytes(self) -> u32 {
        match self {
            Format::TwoLevel => PAGE,
            Format::Pae => 32,
        }
    }

    /// Index of the top-level entry covering `vaddr`.
    pub const fn top_index(self, vaddr: u32) -> u32 {
        match self {
            Format::TwoLevel => vaddr >> 22,
            Format::Pae => vaddr >> 30,
        }
    }
}

/// A page-table level, as the guest calls it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// 2-level top level (page directory).
    Pgd,
    /// PAE top level (4 entries).
    Pdpt,
    /// PAE middle level.
    Pmd,
    /// Leaf level (both formats).
    Pte,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pgd => "PGD",
            Level::Pdpt => "PDPT",
            Level::Pmd => "PMD",
            Level::Pte => "PTE",
        })
    }
}

/// An access: what the CPU (or the host on the guest's behalf) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Access {
    /// A write (else a read or an instruction fetch: there is no NX).
    pub write: bool,
    /// From CPL 3 (else the guest kernel at CPL 1, which paging treats as
    /// supervisor).
    pub user: bool,
}

impl Access {
    /// A supervisor read.
    pub const KERNEL_READ: Access = Access {
        write: false,
        user: false,
    };
    /// A supervisor write: what the host does when it pushes a trap frame
    /// onto the guest kernel stack.
    pub const KERNEL_WRITE: Access = Access {
        write: true,
        user: false,
    };

    /// The access a page fault's error code describes (bit 1 = write,
    /// bit 2 = user).
    pub const fn from_errcode(errcode: u32) -> Self {
        Access {
            write: errcode & 2 != 0,
            user: errcode & 4 != 0,
        }
    }
}

/// Effective rights of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// Writable.
    pub write: bool,
    /// Reachable from CPL 3.
    pub user: bool,
}

impl Perms {
    /// Both rights.
    pub const ALL: Perms = Perms {
        write: true,
        user: true,
    };

    /// The rights an entry carries (`RW`, `USER`).
    pub const fn of_entry(entry: u64) -> Self {
        Perms {
            write: entry & PAGE_RW != 0,
            user: entry & PAGE_USER != 0,
        }
    }

    /// Both sets of rights (x86 combines levels this way).
    pub const fn and(self, other: Perms) -> Perms {
        Perms {
            write: self.write && other.write,
            user: self.user && other.user,
        }
    }

    /// Whether `access` is allowed.
    pub const fn allows(self, access: Access) -> bool {
        (self.write || !access.write) && (self.user || !access.user)
    }
}

/// What is wrong with a [`BadEntry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadReason {
    /// The entry names frame `pfn`, at or beyond the guest's `pfnlimit`.
    PfnBeyondLimit {
        /// The frame number in the entry.
        pfn: u64,
        /// The guest's limit.
        pfnlimit: u32,
    },
    /// PSE: a large page (or, in a PTE, the PAT bit), which lguest does not
    /// support.
    LargePage,
    /// Bits 52–63 of a PAE entry (including NX, hidden from the guest), or
    /// bits 32–63 of a 2-level entry handed to `SET_PTE`.
    ReservedBits,
    /// Flags a table entry may not carry (outside `_PAGE_TABLE` for a PGD or
    /// PMD entry, anything but `PRESENT` for a PDPT entry).
    Flags(u64),
    /// The entry itself lies outside guest memory (a bad `cr3`).
    OutsideMemory,
}

/// A guest page-table entry that kills the guest. Its `Display` is the kill
/// reason, e.g. `bad page table entry 0x12345067 (PTE at 0x3004 for
/// 0x401000): pfn 0x12345 beyond limit 0x1000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadEntry {
    /// Level of the entry.
    pub level: Level,
    /// The entry's value.
    pub entry: u64,
    /// Guest-physical address of the entry (0 for an entry that was handed
    /// to a hypercall rather than read from a table).
    pub at: u32,
    /// The guest virtual address being translated.
    pub vaddr: u32,
    /// What is wrong.
    pub reason: BadReason,
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad page table entry {:#x} ({} at {:#x} for {:#x}): ",
            self.entry, self.level, self.at, self.vaddr
        )?;
        match self.reason {
            BadReason::PfnBeyondLimit { pfn, pfnlimit } => {
                write!(f, "pfn {pfn:#x} beyond limit {pfnlimit:#x}")
            }
            BadReason::LargePage => f.write_str("large page (PSE) not supported"),
            BadReason::ReservedBits => f.write_str("reserved bits set"),
            BadReason::Flags(flags) => write!(f, "flags {flags:#x} not allowed"),
            BadReason::OutsideMemory => f.write_str("entry outside guest memory"),
        }
    }
}

impl From<BadEntry> for Kill {
    fn from(b: BadEntry) -> Self {
        Kill::new(b)
    }
}

/// Why a walk did not produce a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` is not present: the guest's page fault.
    NotPresent {
        /// The level whose entry is missing.
        level: Level,
    },
    /// Mapped, but the access is not allowed (a write to a read-only page,
    /// a user access to a supervisor page): the guest's page fault.
    Protection,
    /// A bad entry: kill the guest.
    Bad(BadEntry),
}

impl WalkError {
    /// Whether this is the guest's own page fault (reflect it) rather than a
    /// reason to kill it.
    pub const fn is_guest_fault(&self) -> bool {
        !matches!(self, WalkError::Bad(_))
    }
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NotPresent { level } => write!(f, "{level} not present"),
            WalkError::Protection => f.write_str("protection violation"),
            WalkError::Bad(b) => b.fmt(f),
        }
    }
}

/// A successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest virtual address translated.
    pub vaddr: u32,
    /// Its guest-physical address (frame of the leaf plus the page offset).
    pub gpa: u32,
    /// Guest-physical address of the leaf PTE (for writing back A/D bits).
    pub pte_gpa: u32,
    /// The leaf PTE (zero-extended in the 2-level format).
    pub pte: u64,
    /// Rights granted by the levels above the leaf (the PGD entry; PAE: the
    /// PMD entry).
    pub upper: Perms,
}

impl Translation {
    /// Effective rights: the leaf's AND the levels above.
    pub const fn perms(&self) -> Perms {
        self.upper.and(Perms::of_entry(self.pte))
    }

    /// The guest frame number of the page.
    pub const fn pfn(&self) -> u32 {
        self.gpa >> 12
    }
}

/// A guest's paging parameters: its format and the frame limit every entry
/// is checked against. Cheap to copy; holds no state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPaging {
    /// The format.
    pub format: Format,
    /// Frames `[0, pfnlimit)` are guest memory.
    pub pfnlimit: u32,
}

impl GuestPaging {
    /// Paging parameters for `format` with `pfnlimit` frames.
    pub const fn new(format: Format, pfnlimit: u32) -> Self {
        Self { format, pfnlimit }
    }

    /// Whether `cr3` is a usable top-level table: aligned for the format
    /// and inside guest memory. The reason is the kill text.
    pub fn check_cr3(&self, cr3: u32) -> Result<(), Kill> {
        let end = u64::from(cr3).saturating_add(u64::from(self.format.top_bytes()));
        let limit = u64::from(self.pfnlimit).saturating_mul(u64::from(PAGE));
        if !cr3.is_multiple_of(self.format.top_align()) || end > limit {
            return Err(Kill::new(format_args!(
                "bad page directory {cr3:#x} ({} paging)",
                self.format.option_name()
            )));
        }
        Ok(())
    }

    /// Frame check shared by every level.
    #[inline]
    fn check_pfn(&self, level: Level, entry: u64, at: u32, vaddr: u32) -> Result<u32, BadEntry> {
        let pfn = (entry & PAGE_ADDR_MASK) >> 12;
        match u32::try_from(pfn) {
            Ok(p) if p < self.pfnlimit => Ok(p),
            _ => Err(BadEntry {
                level,
                entry,
                at,
                vaddr,
                reason: BadReason::PfnBeyondLimit {
                    pfn,
                    pfnlimit: self.pfnlimit,
                },
            }),
        }
    }

    /// Validates a present table entry (2-level PGD, PAE PDPT or PMD) and
    /// returns the guest-physical address of the table it names.
    #[inline]
    fn check_table_entry(
        &self,
        level: Level,
        entry: u64,
        at: u32,
        vaddr: u32,
    ) -> Result<u32, BadEntry> {
        let bad = |reason| BadEntry {
            level,
            entry,
            at,
            vaddr,
            reason,
        };
        let (allowed, high_reserved) = match (self.format, level) {
            (Format::Pae, Level::Pdpt) => (PAGE_PRESENT, PAE_RESERVED_HIGH),
            (Format::Pae, _) => (PAGE_TABLE, PAE_RESERVED_HIGH),
            (Format::TwoLevel, _) => (PAGE_TABLE, !0xFFFF_FFFF),
        };
        if entry & high_reserved != 0 {
            return Err(bad(BadReason::ReservedBits));
        }
        let extra = entry & LOW_FLAGS & !allowed;
        if extra & PAGE_PSE != 0 && level != Level::Pdpt {
            return Err(bad(BadReason::LargePage));
        }
        if extra != 0 {
            return Err(bad(BadReason::Flags(extra)));
        }
        let pfn = self.check_pfn(level, entry, at, vaddr)?;
        // pfn < pfnlimit <= 2^20: the shift cannot overflow.
        Ok(pfn << 12)
    }

    /// Validates a present leaf PTE (from a table, or handed to `SET_PTE`)
    /// and returns its guest frame number. `at` is where it is (0 if it came
    /// from a hypercall).
    #[inline]
    pub fn check_pte(&self, pte: u64, at: u32, vaddr: u32) -> Result<u32, BadEntry> {
        let bad = |reason| BadEntry {
            level: Level::Pte,
            entry: pte,
            at,
            vaddr,
            reason,
        };
        let high_reserved = match self.format {
            Format::Pae => PAE_RESERVED_HIGH,
            Format::TwoLevel => !0xFFFF_FFFF,
        };
        if pte & high_reserved != 0 {
            return Err(bad(BadReason::ReservedBits));
        }
        if pte & PAGE_PSE != 0 {
            return Err(bad(BadReason::LargePage));
        }
        self.check_pfn(Level::Pte, pte, at, vaddr)
    }

    /// Reads the entry at guest-physical `at` (4 or 8 bytes per the format).
    #[inline(always)]
    fn read_entry(
        &self,
        mem: &impl GuestMemory,
        level: Level,
        at: u32,
        vaddr: u32,
    ) -> Result<u64, BadEntry> {
        let r = match (self.format, level) {
            (Format::TwoLevel, _) => mem.read_u32(at).map(u64::from),
            (Format::Pae, _) => mem.read_u64(at),
        };
        r.map_err(|_| BadEntry {
            level,
            entry: 0,
            at,
            vaddr,
            reason: BadReason::OutsideMemory,
        })
    }

    /// One upper-level step of a walk: the entry at `at`, present and
    /// valid, and the guest-physical base of the table it points at.
    #[inline(always)]
    fn table_entry(
        &self,
        mem: &impl GuestMemory,
        level: Level,
        at: u32,
        vaddr: u32,
    ) -> Result<(u64, u32), WalkError> {
        let e = self
            .read_entry(mem, level, at, vaddr)
            .map_err(WalkError::Bad)?;
        if e & PAGE_PRESENT == 0 {
            return Err(WalkError::NotPresent { level });
        }
        let next = self
            .check_table_entry(level, e, at, vaddr)
            .map_err(WalkError::Bad)?;
        Ok((e, next))
    }

    /// Walks `vaddr` through the tables at `cr3`, validating every entry on
    /// the way, without checking permissions (see [`Self::translate`]).
    #[inline(always)]
    pub fn walk(
        &self,
        mem: &impl GuestMemory,
        cr3: u32,
        vaddr: u32,
    ) -> Result<Translation, WalkError> {
        // Entry addresses: a PMD or PTE table found through a validated
        // entry is page-aligned and below the limit, and the index times the
        // entry size stays inside the page, so `base | offset` is the exact
        // sum. `cr3` is the caller's (checked by `check_cr3` when the guest
        // hands it over); an unchecked one near 4 GiB wraps and is then
        // caught by the bounds-checked read like any other bad address.
        let (upper, pt_base, pte_index_bytes) = match self.format {
            Format::TwoLevel => {
                let at = cr3.wrapping_add((vaddr >> 22) << 2);
                let (pgd, pt) = self.table_entry(mem, Level::Pgd, at, vaddr)?;
                (Perms::of_entry(pgd), pt, ((vaddr >> 12) & 0x3FF) << 2)
            }
            Format::Pae => {
                let at = cr3.wrapping_add((vaddr >> 30) << 3);
                let (_, pmd_base) = self.table_entry(mem, Level::Pdpt, at, vaddr)?;
                let at = pmd_base | (((vaddr >> 21) & 0x1FF) << 3);
                let (pmd, pt) = self.table_entry(mem, Level::Pmd, at, vaddr)?;
                (Perms::of_entry(pmd), pt, ((vaddr >> 12) & 0x1FF) << 3)
            }
        };
        let pte_gpa = pt_base | pte_index_bytes;
        let pte = self
            .read_entry(mem, Level::Pte, pte_gpa, vaddr)
            .map_err(WalkError::Bad)?;
        if pte & PAGE_PRESENT == 0 {
            return Err(WalkError::NotPresent { level: Level::Pte });
        }
        let pfn = self
            .check_pte(pte, pte_gpa, vaddr)
            .map_err(WalkError::Bad)?;
        Ok(Translation {
            vaddr,
            // pfn < pfnlimit <= 2^20: no overflow.
            gpa: (pfn << 12) | (vaddr & 0xFFF),
            pte_gpa,
            pte,
            upper,
        })
    }

    /// Walks `vaddr` and checks that `access` is allowed: the CPU's view of
    /// the guest's tables.
    #[inline(always)]
    pub fn translate(
        &self,
        mem: &impl GuestMemory,
        cr3: u32,
        vaddr: u32,
        access: Access,
    ) -> Result<Translation, WalkError> {
        let t = self.walk(mem, cr3, vaddr)?;
        if !t.perms().allows(access) {
            return Err(WalkError::Protection);
        }
        Ok(t)
    }

    /// Sets the leaf's ACCESSED bit, and DIRTY for a write, in guest memory
    /// (what the CPU does on a successful access). Writes only if a bit is
    /// missing.
    #[inline]
    pub fn mark_accessed(
        &self,
        mem: &mut impl GuestMemory,
        t: &mut Translation,
        write: bool,
    ) -> Result<(), Kill> {
        let mut want = t.pte | PAGE_ACCESSED;
        if write {
            want |= PAGE_DIRTY;
        }
        if want != t.pte {
            match self.format {
                // A 2-level PTE was read as a u32: `want` still fits.
                Format::TwoLevel => {
                    mem.write_u32(t.pte_gpa, u32::try_from(want).unwrap_or(u32::MAX))?
                }
                Format::Pae => mem.write_u64(t.pte_gpa, want)?,
            }
            t.pte = want;
        }
        Ok(())
    }

    /// Guest virtual → guest physical for a host access on the guest's
    /// behalf (pushing a trap frame, reading an instruction), honouring the
    /// guest's own permissions (a supervisor write needs a writable page:
    /// CR0.WP) and setting ACCESSED/DIRTY as the CPU would. The caller
    /// accesses at most up to the end of the page.
    pub fn translate_for_host(
        &self,
        mem: &mut impl GuestMemory,
        cr3: u32,
        vaddr: u32,
        access: Access,
    ) -> Result<u32, WalkError> {
        let mut t = self.translate(mem, cr3, vaddr, access)?;
        // The PTE was just read from guest memory: writing it back cannot
        // fail, but a failure would be a kill, not a panic.
        if let Err(_k) = self.mark_accessed(mem, &mut t, access.write) {
            return Err(WalkError::Bad(BadEntry {
                level: Level::Pte,
                entry: t.pte,
                at: t.pte_gpa,
                vaddr,
                reason: BadReason::OutsideMemory,
            }));
        }
        Ok(t.gpa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;

    const P: u64 = PAGE_PRESENT;
    const RW: u64 = PAGE_RW;
    const US: u64 = PAGE_USER;

    fn two(mem: &mut VecMemory, cr3: u32, vaddr: u32, pgd: u32, pte: u32) -> u32 {
        mem.write_u32(cr3 + (vaddr >> 22) * 4, pgd).unwrap();
        let pt = pgd & !0xFFF;
        let at = pt + ((vaddr >> 12) & 0x3FF) * 4;
        mem.write_u32(at, pte).unwrap();
        at
    }

    #[test]
    fn two_level_walk_and_perms() {
        let mut m = VecMemory::new(0x40_0000);
        let g = GuestPaging::new(Format::TwoLevel, 0x400);
        let at = two(&mut m, 0x1000, 0xC040_1000, 0x2000 | 0x67, 0x5000 | 0x7);
        let t = g.walk(&m, 0x1000, 0xC040_1234).unwrap();
        assert_eq!(t.gpa, 0x5234);
        assert_eq!(t.pte_gpa, at);
        assert_eq!(t.perms(), Perms::ALL);
        // PGD read-only: effective read-only, even for the kernel.
        two(&mut m, 0x1000, 0xC040_1000, 0x2000 | 0x65, 0x5000 | 0x7);
        assert_eq!(
            g.translate(&m, 0x1000, 0xC040_1000, Access::KERNEL_WRITE),
            Err(WalkError::Protection)
        );
        assert!(
            g.translate(&m, 0x1000, 0xC040_1000, Access::KERNEL_READ)
                .is_ok()
        );
        // PGD supervisor: no user access.
        two(&mut m, 0x1000, 0xC040_1000, 0x2000 | 0x63, 0x5000 | 0x7);
        assert_eq!(
            g.translate(&m, 0x1000, 0xC040_1000, Access::from_errcode(4)),
            Err(WalkError::Protection)
        );
        // Not present at each level.
        assert_eq!(
            g.walk(&m, 0x1000, 0x0040_0000),
            Err(WalkError::NotPresent { level: Level::Pgd })
        );
        assert_eq!(
            g.walk(&m, 0x1000, 0xC040_2000),
            Err(WalkError::NotPresent { level: Level::Pte })
        );
    }

    #[test]
    fn two_level_bad_entries() {
        let mut m = VecMemory::new(0x40_0000);
        let g = GuestPaging::new(Format::TwoLevel, 0x400);
        let bad = |m: &VecMemory, v| match g.walk(m, 0x1000, v) {
            Err(WalkError::Bad(b)) => b,
            other => panic!("{other:?}"),
        };
        two(&mut m, 0x1000, 0x40_0000, 0x2000 | 0x67, 0x40_0000 | 0x7);
        let b = bad(&m, 0x40_0000);
        assert_eq!(b.level, Level::Pte);
        assert_eq!(
            b.to_string(),
            "bad page table entry 0x400007 (PTE at 0x2000 for 0x400000): \
             pfn 0x400 beyond limit 0x400"
        );
        two(&mut m, 0x1000, 0x40_0000, 0x2000 | 0x67, 0x3000 | 0x87);
        assert_eq!(bad(&m, 0x40_0000).reason, BadReason::LargePage);
        two(&mut m, 0x1000, 0x40_0000, 0x2000 | 0xE7, 0x3000 | 0x7);
        assert_eq!(bad(&m, 0x40_0000).reason, BadReason::LargePage);
        assert_eq!(bad(&m, 0x40_0000).level, Level::Pgd);
        two(&mut m, 0x1000, 0x40_0000, 0x2000 | 0x167, 0x3000 | 0x7);
        assert_eq!(bad(&m, 0x40_0000).reason, BadReason::Flags(0x100));
        m.write_u32(0x1000 + 4, 0x80_0000 | 0x67).unwrap();
        assert!(matches!(
            bad(&m, 0x40_0000).reason,
            BadReason::PfnBeyondLimit { pfn: 0x800, .. }
        ));
        // A PTE from SET_PTE with bits above 31.
        assert_eq!(
            g.check_pte(1 << 40 | 0x1003, 0, 0).unwrap_err().reason,
            BadReason::ReservedBits
        );
        // Not-present entries are never validated.
        two(&mut m, 0x1000, 0x40_0000, 0x2000 | 0x67, 0xFFFF_FFFE);
        assert_eq!(
            g.walk(&m, 0x1000, 0x40_0000),
            Err(WalkError::NotPresent { level: Level::Pte })
        );
        // A cr3 outside memory.
        assert!(matches!(
            g.walk(&m, 0x40_0000, 0),
            Err(WalkError::Bad(BadEntry {
                reason: BadReason::OutsideMemory,
                ..
            }))
        ));
        assert!(g.check_cr3(0x3F_F000).is_ok());
        assert!(g.check_cr3(0x40_0000).is_err());
        assert!(g.check_cr3(0x1020).is_err());
        assert_eq!(
            g.check_cr3(!0xFFF).unwrap_err().as_str(),
            "bad page directory 0xfffff000 (2level paging)"
        );
    }

    fn pae(mem: &mut VecMemory, cr3: u32, vaddr: u32, pdpte: u64, pmd: u64, pte: u64) -> u32 {
        mem.write_u64(cr3 + (vaddr >> 30) * 8, pdpte).unwrap();
        let pmd_t = (pdpte & !0xFFF) as u32;
        mem.write_u64(pmd_t + ((vaddr >> 21) & 0x1FF) * 8, pmd)
            .unwrap();
        let pt = (pmd & !0xFFF) as u32;
        let at = pt + ((vaddr >> 12) & 0x1FF) * 8;
        mem.write_u64(at, pte).unwrap();
        at
    }

    #[test]
    fn pae_walk_and_bad_entries() {
        let mut m = VecMemory::new(0x40_0000);
        let g = GuestPaging::new(Format::Pae, 0x400);
        let at = pae(&mut m, 0x1020, 0xC020_3000, 0x2001, 0x3067, 0x9067);
        let t = g
            .translate(&m, 0x1020, 0xC020_3004, Access::from_errcode(6))
            .unwrap();
        assert_eq!((t.gpa, t.pte_gpa), (0x9004, at));
        // PMD without USER.
        pae(&mut m, 0x1020, 0xC020_3000, 0x2001, 0x3063, 0x9067);
        assert_eq!(
            g.translate(&m, 0x1020, 0xC020_3000, Access::from_errcode(4)),
            Err(WalkError::Protection)
        );
        let reason = |m: &VecMemory| match g.walk(m, 0x1020, 0xC020_3000) {
            Err(WalkError::Bad(b)) => (b.level, b.reason),
            other => panic!("{other:?}"),
        };
        // NX (reserved for the guest) in a PTE, a PMD, a PDPT entry.
        pae(
            &mut m,
            0x1020,
            0xC020_3000,
            0x2001,
            0x3067,
            1 << 63 | 0x9067,
        );
        assert_eq!(reason(&m), (Level::Pte, BadReason::ReservedBits));
        pae(
            &mut m,
            0x1020,
            0xC020_3000,
            0x2001,
            1 << 63 | 0x3067,
            0x9067,
        );
        assert_eq!(reason(&m), (Level::Pmd, BadReason::ReservedBits));
        pae(
            &mut m,
            0x1020,
            0xC020_3000,
            1 << 52 | 0x2001,
            0x3067,
            0x9067,
        );
        assert_eq!(reason(&m), (Level::Pdpt, BadReason::ReservedBits));
        // PDPT flags other than PRESENT.
        pae(&mut m, 0x1020, 0xC020_3000, 0x2003, 0x3067, 0x9067);
        assert_eq!(reason(&m), (Level::Pdpt, BadReason::Flags(2)));
        // 2 MiB page in the PMD.
        pae(&mut m, 0x1020, 0xC020_3000, 0x2001, 0x30E7, 0x9067);
        assert_eq!(reason(&m), (Level::Pmd, BadReason::LargePage));
        // Address bits above 4 GiB are a pfn beyond the limit.
        pae(
            &mut m,
            0x1020,
            0xC020_3000,
            0x2001,
            0x3067,
            1 << 40 | 0x9067,
        );
        assert!(matches!(
            reason(&m),
            (Level::Pte, BadReason::PfnBeyondLimit { .. })
        ));
        assert!(g.check_cr3(0x1020).is_ok());
        assert!(g.check_cr3(0x1010).is_err());
        assert!(g.check_cr3(0x3F_FFE0).is_ok());
    }

    #[test]
    fn host_translation_sets_accessed_and_dirty() {
        let mut m = VecMemory::new(0x40_0000);
        let g = GuestPaging::new(Format::TwoLevel, 0x400);
        let at = two(&mut m, 0x1000, 0xC000_0000, 0x2000 | 0x67, 0x5000 | 0x3);
        assert_eq!(
            g.translate_for_host(&mut m, 0x1000, 0xC000_0010, Access::KERNEL_READ),
            Ok(0x5010)
        );
        assert_eq!(m.read_u32(at).unwrap(), 0x5000 | 0x23);
        assert_eq!(
            g.translate_for_host(&mut m, 0x1000, 0xC000_0010, Access::KERNEL_WRITE),
            Ok(0x5010)
        );
        assert_eq!(m.read_u32(at).unwrap(), 0x5000 | 0x63);
        // Read-only page: a supervisor write is refused (CR0.WP), nothing
        // written.
        m.write_u32(at, 0x5001).unwrap();
        assert_eq!(
            g.translate_for_host(&mut m, 0x1000, 0xC000_0010, Access::KERNEL_WRITE),
            Err(WalkError::Protection)
        );
        assert_eq!(m.read_u32(at).unwrap(), 0x5001);
        let _ = P | RW | US;
    }
}
