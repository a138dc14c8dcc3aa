//! Guest page-table entry bits (i386, both the 2-level and the PAE format).
//!
//! A guest builds its page tables with these bits and the host's shadow
//! paging interprets them (`rustyvisor::lguest::pagewalk`). The host never
//! exposes NX to a guest (CPUID hides it), so bit 63 of a PAE entry is a
//! reserved bit, and the host kills a guest that sets it.
//!
//! | Format | Levels (entries × size) | Top level |
//! |---|---|---|
//! | 2-level | PGD 1024 × 4 B → PTE 1024 × 4 B (4 MiB per PGD entry) | `cr3` page-aligned |
//! | PAE | PDPT 4 × 8 B → PMD 512 × 8 B → PTE 512 × 8 B | `cr3` 32-byte aligned |

/// Entry is present.
pub const PAGE_PRESENT: u64 = 1 << 0;
/// Writable (at every level: the effective right is the AND of all levels).
pub const PAGE_RW: u64 = 1 << 1;
/// User (CPL 3) access allowed (AND of all levels, like `PAGE_RW`).
pub const PAGE_USER: u64 = 1 << 2;
/// Write-through caching.
pub const PAGE_PWT: u64 = 1 << 3;
/// Caching disabled.
pub const PAGE_PCD: u64 = 1 << 4;
/// Accessed: set by the host's shadow paging on the first access.
pub const PAGE_ACCESSED: u64 = 1 << 5;
/// Dirty (leaf entries): set by the host's shadow paging on the first write.
pub const PAGE_DIRTY: u64 = 1 << 6;
/// Large page (PGD/PMD level); in a PTE this bit is PAT. lguest guests use
/// neither: the host kills a guest that sets it anywhere.
pub const PAGE_PSE: u64 = 1 << 7;
/// Global: ignored (stripped) by the host.
pub const PAGE_GLOBAL: u64 = 1 << 8;
/// The three bits the CPU ignores and software may use (leaf entries only;
/// the host refuses them in PGD and PMD entries).
pub const PAGE_SOFTWARE: u64 = 0x7 << 9;
/// `_PAGE_TABLE`: the only flags a 2-level PGD entry or a PAE PMD entry may
/// carry (`PRESENT | RW | USER | ACCESSED | DIRTY`).
pub const PAGE_TABLE: u64 = 0x067;
/// Address bits of an entry pointing at a 4 KiB page or table (the PAE
/// format's 40-bit frame number; a 2-level entry only has bits 12–31).
pub const PAGE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
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

const _: () =
    assert!(PAGE_TABLE == PAGE_PRESENT | PAGE_RW | PAGE_USER | PAGE_ACCESSED | PAGE_DIRTY);
