//! Guest page-table entry bits (i386, both the 2-level and the PAE format),
//! the table geometry, `PAGE_OFFSET` and the `paging=` module word.
//!
//! A guest builds its page tables with these bits and the host's shadow
//! paging interprets them. The format is chosen once per guest by the module
//! command line (`paging=2level` or `paging=pae`, read by the guest and by
//! the hypervisor) and fixed for its life.
//!
//! | | 2-level (non-PAE) | PAE |
//! |---|---|---|
//! | levels | PGD 1024 × u32 → PTE 1024 × u32 | PDPT 4 × u64 (32-byte aligned) → PMD 512 × u64 → PTE 512 × u64 |
//! | one top-level slot maps | 4 MiB | 1 GiB (a PMD slot: 2 MiB) |
//! | `LHCALL_SET_PTE` | a3 = entry | a3 = low word, a4 = high word |
//! | top-level entry changed | `LHCALL_SET_PGD(pgd page, index)` | `LHCALL_SET_PGD(pdpt & !0x1f, index 0..4)` |
//! | middle entry changed | – | `LHCALL_SET_PMD(pmd page, index)` |
//! | directory flags the host accepts | ⊆ [`PAGE_TABLE`] | PDPT: [`PAGE_PRESENT`] only; PMD: ⊆ [`PAGE_TABLE`] |
//!
//! The flag bits are the same in both formats (bits 0–11); PAE entries carry
//! the frame in bits 12–51, and bits 52–63 are reserved for a guest (bit 63
//! is NX, which lguest hides).

/// Entry is present.
pub const PAGE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PAGE_RW: u64 = 1 << 1;
/// User (CPL 3) access allowed.
pub const PAGE_USER: u64 = 1 << 2;
/// Write-through caching.
pub const PAGE_PWT: u64 = 1 << 3;
/// Caching disabled.
pub const PAGE_PCD: u64 = 1 << 4;
/// Accessed: set by the MMU (under lguest: by the host) on any access.
pub const PAGE_ACCESSED: u64 = 1 << 5;
/// Dirty (leaf entries): set by the MMU (under lguest: by the host) on a write.
pub const PAGE_DIRTY: u64 = 1 << 6;
/// Large page (PGD/PMD level); in a PTE this bit is PAT. lguest guests use
/// neither.
pub const PAGE_PSE: u64 = 1 << 7;
/// Global: ignored (stripped) by the host.
pub const PAGE_GLOBAL: u64 = 1 << 8;
/// The three bits (9–11) the CPU ignores and software may use (leaf
/// entries only).
pub const PAGE_SOFTWARE: u64 = 0x7 << 9;
/// `_PAGE_TABLE`: a directory entry pointing at a user page table (present,
/// writable, user, accessed, dirty); the only flags a 2-level PGD entry or a
/// PAE PMD entry may carry.
pub const PAGE_TABLE: u64 = 0x067;
/// `_KERNPG_TABLE`: a directory entry for a kernel-only page table.
pub const KERNPG_TABLE: u64 = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_DIRTY;
/// Address bits of an entry pointing at a 4 KiB page or table (PAE; a
/// 2-level entry only has bits 12–31, [`PAGE_ADDR_MASK_2LEVEL`]).
pub const PAGE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// Address bits of a 2-level entry.
pub const PAGE_ADDR_MASK_2LEVEL: u64 = 0xFFFF_F000;
/// Bits 52–63 of a PAE entry: reserved for a guest (bit 63 is NX, which the
/// host does not expose).
pub const PAE_RESERVED_HIGH: u64 = 0xFFF0_0000_0000_0000;
/// Entries per 2-level table (PGD or PTE page).
pub const TWO_LEVEL_ENTRIES: u32 = 1024;
/// Entries per PAE PMD or PTE page.
pub const PAE_ENTRIES: u32 = 512;
/// Entries in a PAE PDPT.
pub const PAE_PDPT_ENTRIES: u32 = 4;
/// Bytes mapped by one 2-level PGD entry (4 MiB).
pub const TWO_LEVEL_PGD_SPAN: u32 = 4 << 20;
/// Bytes mapped by one PAE PMD entry (2 MiB).
pub const PAE_PMD_SPAN: u32 = 2 << 20;
/// Bytes mapped by one PAE PDPT entry (1 GiB).
pub const PAE_PDPT_SPAN: u32 = 1 << 30;
/// Required alignment of a PAE PDPT (the low 5 bits of `cr3` and of
/// `LHCALL_SET_PGD`'s first argument are zero).
pub const PAE_PDPT_ALIGN: u32 = 32;

/// Linux i386's default `PAGE_OFFSET` (3G/1G split): the guest kernel's
/// direct map of guest-physical memory starts here, and a guest that uses it
/// puts it into `lguest_data.kernel_address`.
pub const PAGE_OFFSET: u32 = 0xC000_0000;

/// The module command-line word that selects the format: `paging=2level` or
/// `paging=pae`.
pub const PAGING_ARG: &str = "paging";
/// Value of [`PAGING_ARG`] for the 2-level format.
pub const PAGING_2LEVEL: &str = "2level";
/// Value of [`PAGING_ARG`] for PAE.
pub const PAGING_PAE: &str = "pae";

const _: () = {
    assert!(PAGE_TABLE == PAGE_PRESENT | PAGE_RW | PAGE_USER | PAGE_ACCESSED | PAGE_DIRTY);
    assert!(KERNPG_TABLE == 0x063);
    assert!(TWO_LEVEL_ENTRIES as u64 * TWO_LEVEL_PGD_SPAN as u64 == 1 << 32);
    assert!(PAE_PDPT_ENTRIES as u64 * PAE_PDPT_SPAN as u64 == 1 << 32);
    assert!(PAE_ENTRIES * PAE_PMD_SPAN == PAE_PDPT_SPAN);
    assert!(PAE_RESERVED_HIGH & PAGE_ADDR_MASK == 0);
};
