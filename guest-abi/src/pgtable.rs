//! Guest page-table formats: the x86 entry bits and table geometry of the
//! two 32-bit formats an lguest guest may use, fixed for the guest's life.
//!
//! | | 2-level (non-PAE) | PAE |
//! |---|---|---|
//! | levels | PGD 1024 × u32 → PTE 1024 × u32 | PDPT 4 × u64 (32-byte aligned) → PMD 512 × u64 → PTE 512 × u64 |
//! | one top-level slot maps | 4 MiB | 1 GiB (a PMD slot: 2 MiB) |
//! | `LHCALL_SET_PTE` | a3 = entry | a3 = low word, a4 = high word |
//! | top-level entry changed | `LHCALL_SET_PGD(pgd page, index)` | `LHCALL_SET_PGD(pdpt & !0x1f, index 0..4)` |
//! | middle entry changed | – | `LHCALL_SET_PMD(pmd page, index)` |
//! | top-level flags the host accepts | ⊆ [`PAGE_TABLE`] | [`PAGE_PRESENT`] only |
//!
//! The flag bits below are the same in both formats (bits 0–11 of an entry);
//! PAE entries carry the frame in bits 12–51 and [`PAE_NX`] in bit 63, and
//! bits 52–62 are reserved ([`PAE_RESERVED_HIGH`]).

/// `_PAGE_PRESENT`.
pub const PAGE_PRESENT: u64 = 0x001;
/// `_PAGE_RW`: writable.
pub const PAGE_RW: u64 = 0x002;
/// `_PAGE_USER`: reachable from CPL 3.
pub const PAGE_USER: u64 = 0x004;
/// `_PAGE_PWT`: write-through.
pub const PAGE_PWT: u64 = 0x008;
/// `_PAGE_PCD`: cache disabled.
pub const PAGE_PCD: u64 = 0x010;
/// `_PAGE_ACCESSED`: set by the MMU (under lguest: by the host) on any access.
pub const PAGE_ACCESSED: u64 = 0x020;
/// `_PAGE_DIRTY`: set by the MMU (under lguest: by the host) on a write.
pub const PAGE_DIRTY: u64 = 0x040;
/// `_PAGE_PSE`: a large page in a directory entry (refused by lguest).
pub const PAGE_PSE: u64 = 0x080;
/// `_PAGE_GLOBAL` (the host strips it).
pub const PAGE_GLOBAL: u64 = 0x100;
/// First of the three bits (9–11) the MMU ignores and software may use.
pub const PAGE_SOFTW1: u64 = 0x200;
/// Second software bit.
pub const PAGE_SOFTW2: u64 = 0x400;
/// Third software bit.
pub const PAGE_SOFTW3: u64 = 0x800;

/// `_PAGE_TABLE`: the flags of a directory entry pointing at a user page
/// table (present, writable, user, accessed, dirty). The host accepts no
/// other flags in a 2-level PGD entry or a PAE PMD entry.
pub const PAGE_TABLE: u64 = PAGE_PRESENT | PAGE_RW | PAGE_USER | PAGE_ACCESSED | PAGE_DIRTY;
/// `_KERNPG_TABLE`: a directory entry for a kernel-only page table.
pub const KERNPG_TABLE: u64 = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_DIRTY;

/// Mask of the frame address in a 2-level entry.
pub const PAGE_MASK_2LEVEL: u64 = 0xFFFF_F000;
/// Mask of the frame address in a PAE entry (bits 12–51).
pub const PAGE_MASK_PAE: u64 = 0x000F_FFFF_FFFF_F000;
/// PAE execute-disable (bit 63; reserved unless the host enables NX, which
/// lguest hides from the guest).
pub const PAE_NX: u64 = 1 << 63;
/// PAE bits 52–62: reserved, must be 0.
pub const PAE_RESERVED_HIGH: u64 = 0x7FF0_0000_0000_0000;

/// Entries in a 2-level PGD.
pub const PTRS_PER_PGD_2LEVEL: u32 = 1024;
/// Entries in a 2-level page table.
pub const PTRS_PER_PTE_2LEVEL: u32 = 1024;
/// Address bits below a 2-level PGD index.
pub const PGDIR_SHIFT_2LEVEL: u32 = 22;
/// Entries in a PAE PDPT.
pub const PTRS_PER_PGD_PAE: u32 = 4;
/// Entries in a PAE PMD.
pub const PTRS_PER_PMD_PAE: u32 = 512;
/// Entries in a PAE page table.
pub const PTRS_PER_PTE_PAE: u32 = 512;
/// Address bits below a PAE PDPT index.
pub const PGDIR_SHIFT_PAE: u32 = 30;
/// Address bits below a PAE PMD index.
pub const PMD_SHIFT_PAE: u32 = 21;
/// Required alignment of a PAE PDPT (the low 5 bits of its address, and of
/// `LHCALL_SET_PGD`'s first argument, are zero).
pub const PAE_PDPT_ALIGN: u32 = 32;

/// Linux i386's default `PAGE_OFFSET` (3G/1G split): the guest kernel's
/// direct map of guest-physical memory starts here, and a guest that uses it
/// puts it into `lguest_data.kernel_address`.
pub const PAGE_OFFSET: u32 = 0xC000_0000;

/// The module command-line word that selects the format: `paging=2level` or
/// `paging=pae` (read by the guest and by the hypervisor).
pub const PAGING_ARG: &str = "paging";
/// Value of [`PAGING_ARG`] for the 2-level format.
pub const PAGING_2LEVEL: &str = "2level";
/// Value of [`PAGING_ARG`] for PAE.
pub const PAGING_PAE: &str = "pae";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_covers_4gib() {
        assert_eq!(
            u64::from(PTRS_PER_PGD_2LEVEL) << PGDIR_SHIFT_2LEVEL,
            1 << 32
        );
        assert_eq!(u64::from(PTRS_PER_PGD_PAE) << PGDIR_SHIFT_PAE, 1 << 32);
        assert_eq!(
            u64::from(PTRS_PER_PMD_PAE) << PMD_SHIFT_PAE,
            1 << PGDIR_SHIFT_PAE
        );
        assert_eq!(PAGE_TABLE, 0x067);
        assert_eq!(KERNPG_TABLE, 0x063);
        assert_eq!(PAE_RESERVED_HIGH & PAGE_MASK_PAE, 0);
        assert_eq!(PAE_RESERVED_HIGH & PAE_NX, 0);
    }
}
