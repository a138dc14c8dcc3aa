//! Shadow page tables: the long-mode tables the CPU really walks while a
//! paging guest runs, derived from the guest's own 2-level or PAE tables
//! (lguest ABI sheet §5; [`super::pagewalk`] reads the guest's side).
//!
//! This is the pure core. It decides every entry; the kernel only supplies
//! table frames and entry access through a [`ShadowBackend`] (its direct map
//! and frame allocator), loads the `cr3` values it is handed and applies the
//! TLB invalidations it is told about.
//!
//! # Shape of a shadow
//!
//! A guest's 32-bit address space is the bottom 4 GiB of a 4-level
//! hierarchy. Every shadow is one PML4 frame whose entries 256–511 are copied
//! from the host's PML4 (the hypervisor stays mapped, out of reach of 32-bit
//! code) and whose entry 0 points at the shadow's PDPT; nothing else of the
//! PML4 is ever populated, and only PDPT entries 0–3 are:
//!
//! ```text
//! PML4[0] ─▶ PDPT[vaddr>>30] ─▶ PD[(vaddr>>21)&511] ─▶ PT[(vaddr>>12)&511] ─▶ host page
//! ```
//!
//! Both guest formats map onto that same hierarchy by virtual address:
//!
//! * **2-level**: guest PGD entry `i` (4 MiB) becomes the two PD entries
//!   `2i % 512`, `2i % 512 + 1` under PDPT entry `i / 256`, each pointing at a
//!   shadow PT for one half of the guest PTE page (guest PTE index `j` lands
//!   in PT `j / 512`, entry `j % 512`).
//! * **PAE**: guest PDPT `i` → PDPT `i`, PMD `j` → PD `j`, PTE `k` → PT `k`.
//!
//! # Entries
//!
//! * A **leaf** is the host-physical page `guest_base + pfn * 4096` with the
//!   guest's `PRESENT`, `USER`, `PWT`, `PCD`, `ACCESSED` and `DIRTY` bits;
//!   `GLOBAL` and the software bits are dropped, NX is never set (the guest
//!   has none). `RW` is set only if the guest PTE has both `RW` **and**
//!   `DIRTY`: a clean writable page is installed read-only, so the first
//!   write faults, [`ShadowPaging::demand_fault`] sets `DIRTY` in the guest
//!   PTE and installs the page writable (lguest's dirty tracking). Every
//!   frame is checked against `pfnlimit` before it is installed.
//! * A **PD entry** carries the `RW` and `USER` of the guest level above the
//!   leaf (the 2-level PGD entry, the PAE PMD entry), so the CPU's AND of
//!   the levels never grants more than the guest's AND of its levels.
//!   PDPT and PML4 entries are `PRESENT|RW|USER`.
//!
//! So the effective rights of any shadow mapping are at most the guest's:
//! `USER` only if every guest level says `USER`, `RW` only if every level
//! says `RW` and the page is dirty.
//!
//! # Operations
//!
//! | guest event | call | result |
//! |---|---|---|
//! | `#PF` (under paging) | [`ShadowPaging::demand_fault`] | [`Fault::Fixed`] resume, [`Fault::Reflect`] the guest's `#PF`, [`Fault::Kill`] |
//! | `LHCALL_NEW_PGTABLE` | [`ShadowPaging::new_pgtable`] | [`Switch`]: load its `root` into CR3 |
//! | `LHCALL_SET_PTE` | [`ShadowPaging::set_pte`] | `Result<(), Kill>` |
//! | `LHCALL_SET_PGD` | [`ShadowPaging::set_pgd`] | `Result<(), Kill>` |
//! | `LHCALL_SET_PMD` (PAE) | [`ShadowPaging::set_pmd`] | `Result<(), Kill>` |
//! | `LHCALL_FLUSH_TLB` | [`ShadowPaging::flush_tlb`] | `Result<(), Kill>` |
//! | `LHCALL_SET_STACK` | [`ShadowPaging::pin_stack`] | `Result<(), Kill>` |
//! | trap frame push | [`ShadowPaging::translate_for_host`] | guest-physical address |
//! | guest death | [`ShadowPaging::release_all`] | every frame back |
//!
//! **After every call** the kernel applies [`ShadowPaging::take_flush`] to
//! the current shadow (after loading a `cr3` that [`ShadowPaging::new_pgtable`]
//! returned), before the guest runs again: the core may have removed or
//! downgraded entries of the loaded tables and freed table frames the CPU's
//! paging-structure caches may still point at.
//!
//! Until the first `NEW_PGTABLE` the guest runs in the host's linear mode
//! (the kernel's own tables); the core holds nothing then, `demand_fault`
//! reflects and `translate_for_host` is the identity below the limit.
//!
//! # The cache
//!
//! Up to [`ShadowConfig::cache_size`] shadows (default
//! [`DEFAULT_CACHE_SIZE`]) are kept, keyed by the guest's `cr3` (its
//! `gpgdir`), so switching back to a recent process reuses its filled
//! tables. On a miss a free slot gets two fresh frames (PML4 and PDPT), or
//! the [`Policy`]'s victim slot is reused: its user half (below
//! `kernel_address`) is dropped and its kernel half kept. The policy is
//! deterministic: [`Policy::Lru`] by default (a process switched to
//! recently is likely switched to again; ties cannot happen), with
//! [`Policy::Fifo`] and a seeded [`Policy::Random`] (lguest's choice, which
//! degrades gracefully when a round robin is longer than the cache, where
//! LRU misses every time) to compare; [`ShadowPaging::stats`] counts hits
//! and misses for the benchmark.
//!
//! **The kernel half is kept identical across shadows** the way lguest does
//! it: a `SET_PTE` for an address at or above `kernel_address` is applied to
//! every cached shadow, a reused slot keeps its kernel half, and the guest
//! ABI promises (`lguest_data.kernel_address`) that mappings at or above it
//! are the same in all of its page tables. A guest that breaks the promise
//! only sees its own stale kernel mappings: every shadow entry still maps
//! its own memory, checked against `pfnlimit`, with rights some guest entry
//! granted. Sharing kernel PT frames between shadows with reference counts
//! would save memory but not time (every `SET_PTE` touches one entry per
//! shadow either way), and was left out.
//!
//! # PCID
//!
//! [`Switch::slot`] (also [`ShadowPaging::current_slot`]) is stable for as
//! long as a shadow stays cached, so the kernel can tag CR3 with a PCID per
//! slot (e.g. `slot + 1`) and switch between cached shadows without a TLB
//! flush. [`Switch::flush`] says when that is not allowed: the slot was just
//! created or reused for another `gpgdir`, or entries of it were removed or
//! downgraded while it was not loaded (a kernel-half `SET_PTE`, `FLUSH_TLB`,
//! an eviction). Then the kernel must invalidate the slot's PCID (load CR3
//! without the no-flush bit 63, or INVPCID single-context). Changes to the
//! loaded shadow are reported by [`ShadowPaging::take_flush`] instead. If a
//! guest can move to another CPU, the PCIDs it used there must be treated
//! as stale too (the core knows nothing of CPUs).
//!
//! # Memory accounting and caps
//!
//! Every table frame the core holds is counted ([`ShadowPaging::frames`]).
//! A guest may never make the core hold more than
//! [`ShadowConfig::max_frames`] (at least [`MIN_FRAMES`]): before a fill
//! would pass the cap — or when the backend has no frame — other cached
//! shadows are evicted (by the policy), and as a last resort the current
//! shadow is emptied and refilled on demand. Only a backend that cannot
//! give even the handful of frames one fill needs makes an operation fail,
//! with a kill ("out of memory for shadow page tables"), never a panic.
//! One operation allocates at most a few frames (a fill: a PD and a PT;
//! re-pinning the stack: twice that per stack page) and `SET_PTE`,
//! `SET_PGD`, `SET_PMD` and `FLUSH_TLB` allocate nothing.
//!
//! # Kernel stack pinning
//!
//! The pages below `esp1` named by `SET_STACK` ([`ShadowPaging::pin_stack`])
//! are kept present and writable in the current shadow (filled as if by a
//! supervisor write, which sets the guest's A/D bits), so a trap frame can be
//! pushed without faulting. The core re-pins by itself after anything that
//! drops them (a switch to another shadow, a flush, an eviction, a `SET_PTE`
//! on a stack page); a stack the guest's tables do not map writable kills it
//! ("bad stack page 0x…").

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;

use guest_abi::paging::{
    PAGE_ACCESSED, PAGE_ADDR_MASK, PAGE_DIRTY, PAGE_PCD, PAGE_PRESENT, PAGE_PWT, PAGE_RW, PAGE_USER,
};

use super::guestmem::GuestMemory;
use super::kill::Kill;
use super::pagewalk::{Access, Format, GuestPaging, Level, PAGE, Perms, WalkError};
use crate::mm::paging::{ADDR_MASK, FrameSource, PageFlags, PhysMemory};
use crate::mm::{LARGE_PAGE_SIZE, PAGE_SIZE, PHYS_ADDR_LIMIT};

/// Default number of cached shadows per guest (lguest's).
pub const DEFAULT_CACHE_SIZE: usize = 4;
/// Largest cache size accepted.
pub const MAX_CACHE_SIZE: usize = 64;
/// Default cap on the table frames one guest's shadows may hold (8 MiB).
pub const DEFAULT_MAX_FRAMES: usize = 2048;
/// Smallest cap accepted: a PML4 and a PDPT, one fill (a PD and a PT) and a
/// re-pinned stack of [`MAX_STACK_PAGES`] pages that may straddle a PD and
/// a PT boundary, with room to spare.
pub const MIN_FRAMES: usize = 16;
/// Most pages `SET_STACK` may pin (lguest's limit).
pub const MAX_STACK_PAGES: u32 = 2;

/// Entries in a hardware table.
const ENTRIES: usize = 512;
/// Top of the guest's 32-bit address space.
const FOUR_GIB: u64 = 1 << 32;
/// Bytes per PDPT entry.
const GIB: u64 = 1 << 30;
/// Hardware flags of PML4 entry 0 and of PDPT entries.
const TABLE_FLAGS: u64 = PageFlags::PRESENT.bits()
    | PageFlags::WRITABLE.bits()
    | PageFlags::USER.bits()
    | PageFlags::ACCESSED.bits();
/// Guest leaf bits copied into a shadow leaf as they are (`RW` is decided
/// separately; guest and hardware use the same bit positions).
const LEAF_COPY: u64 = PAGE_PRESENT | PAGE_USER | PAGE_PWT | PAGE_PCD | PAGE_ACCESSED | PAGE_DIRTY;
/// How often one fill retries after having to empty the current shadow.
const FILL_ATTEMPTS: usize = 3;

/// Where a shadow PD entry records which 64-entry chunks of its page table
/// the core ever wrote a nonzero entry to: bits 59:52, which the CPU ignores
/// in an entry that points to a page table (bit `52 + i` for entries
/// `64 i .. 64 i + 64`). A table given back is zero outside them
/// ([`ShadowBackend::free_table_chunks`]), so only those are zeroed for its
/// reuse: a table that held a few pages costs a few stores, not a page.
const PDE_CHUNK_SHIFT: u32 = 52;
const PDE_CHUNKS: u64 = 0xFF << PDE_CHUNK_SHIFT;

/// The chunk bit of PT entry `idx` (below 512) in its PD entry.
#[inline]
const fn chunk_bit(idx: usize) -> u64 {
    (1 << PDE_CHUNK_SHIFT) << ((idx >> 6) & 7)
}

/// The chunks a PD entry records as written (see [`PDE_CHUNKS`]).
#[inline]
const fn pde_chunks(pde: u64) -> u8 {
    ((pde & PDE_CHUNKS) >> PDE_CHUNK_SHIFT) as u8
}

const _: () = {
    assert!(PAGE_PRESENT == PageFlags::PRESENT.bits());
    assert!(PAGE_RW == PageFlags::WRITABLE.bits());
    assert!(PAGE_USER == PageFlags::USER.bits());
    assert!(PAGE_PWT == PageFlags::WRITE_THROUGH.bits());
    assert!(PAGE_PCD == PageFlags::NO_CACHE.bits());
    assert!(PAGE_ACCESSED == PageFlags::ACCESSED.bits());
    assert!(PAGE_DIRTY == PageFlags::DIRTY.bits());
    assert!(PAGE_SIZE == PAGE as u64);
};

/// What the kernel provides: table frames and access to their entries.
///
/// Frames are host-physical, 4 KiB-aligned addresses; `index` is always
/// below 512. The core only ever reads and writes frames it allocated
/// itself (and reads the host PML4 given in [`ShadowConfig::host_pml4`]).
pub trait ShadowBackend {
    /// A zeroed 4 KiB frame for a table, or `None` when out of memory.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Gives back a frame from [`Self::alloc_table`] (its contents are
    /// garbage from now on).
    fn free_table(&mut self, frame: u64);
    /// Gives back a frame from [`Self::alloc_table`] whose entries are all
    /// zero outside the 64-entry chunks set in `chunks` (bit `i`: entries
    /// `64 i .. 64 i + 64`): a backend that reuses it need zero only those.
    fn free_table_chunks(&mut self, frame: u64, chunks: u8) {
        let _ = chunks;
        self.free_table(frame);
    }
    /// Reads entry `index` of the table at `frame`.
    fn read(&self, frame: u64, index: usize) -> u64;
    /// Writes entry `index` of the table at `frame`.
    fn write(&mut self, frame: u64, index: usize, value: u64);
}

/// A [`ShadowBackend`] made of the pieces `mm::paging` uses: a
/// [`PhysMemory`] for entry access and zeroing, a [`FrameSource`] for new
/// frames and a `release` hook that returns a frame to the allocator.
pub struct PhysBackend<M, F, R> {
    /// Entry access (the kernel's direct map).
    pub mem: M,
    /// Where frames come from.
    pub frames: F,
    /// Returns a frame to where it came from.
    pub release: R,
}

impl<M: PhysMemory, F: FrameSource, R: FnMut(u64)> ShadowBackend for PhysBackend<M, F, R> {
    fn alloc_table(&mut self) -> Option<u64> {
        let f = self.frames.alloc_table_frame()?;
        if f % PAGE_SIZE != 0 || f >= PHYS_ADDR_LIMIT {
            return None;
        }
        self.mem.zero_frame(f);
        Some(f)
    }

    fn free_table(&mut self, frame: u64) {
        (self.release)(frame);
    }

    fn read(&self, frame: u64, index: usize) -> u64 {
        // index < 512: the sum stays inside the frame.
        self.mem
            .read_u64(frame.wrapping_add((index as u64).wrapping_mul(8)))
    }

    fn write(&mut self, frame: u64, index: usize, value: u64) {
        // index < 512: the sum stays inside the frame.
        self.mem
            .write_u64(frame.wrapping_add((index as u64).wrapping_mul(8)), value);
    }
}

/// Which cached shadow a miss replaces when the cache is full (and which is
/// evicted first when the frame cap is reached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Least recently made current.
    Lru,
    /// Oldest created (round robin over the slots).
    Fifo,
    /// Uniformly among the others, from a xorshift generator with this
    /// seed (deterministic; 0 is replaced by a fixed non-zero seed).
    Random {
        /// Generator seed.
        seed: u64,
    },
}

/// Everything fixed about a guest's shadows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowConfig {
    /// The guest's page-table format.
    pub format: Format,
    /// Host-physical address of guest-physical 0 (4 KiB aligned; the
    /// kernel's guest RAM is 2 MiB aligned).
    pub guest_base: u64,
    /// Guest frames `[0, pfnlimit)` live at `guest_base`; every entry is
    /// checked against it. At most 2^20 (4 GiB).
    pub pfnlimit: u32,
    /// The guest's `PAGE_OFFSET`: addresses at or above it are the kernel
    /// half (see [`check_kernel_address`]).
    pub kernel_address: u32,
    /// Host-physical address of the PML4 whose entries 256–511 every shadow
    /// copies (the kernel's).
    pub host_pml4: u64,
    /// Number of cached shadows, 1 to [`MAX_CACHE_SIZE`].
    pub cache_size: usize,
    /// Cap on table frames held at once, at least [`MIN_FRAMES`].
    pub max_frames: usize,
    /// Replacement policy.
    pub policy: Policy,
}

impl ShadowConfig {
    /// A configuration with the default cache size, cap and policy.
    pub const fn new(
        format: Format,
        guest_base: u64,
        pfnlimit: u32,
        kernel_address: u32,
        host_pml4: u64,
    ) -> Self {
        Self {
            format,
            guest_base,
            pfnlimit,
            kernel_address,
            host_pml4,
            cache_size: DEFAULT_CACHE_SIZE,
            max_frames: DEFAULT_MAX_FRAMES,
            policy: Policy::Lru,
        }
    }
}

/// A [`ShadowConfig`] the core refuses (a host-side mistake, except for
/// `kernel_address`, which [`check_kernel_address`] checks first with a kill
/// reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `guest_base` is not page-aligned, or guest memory would end beyond
    /// the physical address limit.
    GuestBase,
    /// `pfnlimit` is 0 or above 2^20.
    PfnLimit,
    /// `kernel_address` is not 4 MiB aligned.
    KernelAddress,
    /// `cache_size` is 0 or above [`MAX_CACHE_SIZE`].
    CacheSize,
    /// `max_frames` is below [`MIN_FRAMES`].
    MaxFrames,
    /// `host_pml4` is not page-aligned.
    HostPml4,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::GuestBase => "guest base not page-aligned or beyond physical memory",
            ConfigError::PfnLimit => "pfnlimit 0 or beyond 4 GiB",
            ConfigError::KernelAddress => "kernel address not 4 MiB aligned",
            ConfigError::CacheSize => "shadow cache size out of range",
            ConfigError::MaxFrames => "shadow frame cap too small",
            ConfigError::HostPml4 => "host PML4 not page-aligned",
        })
    }
}

/// Checks the guest's `kernel_address` (`lguest_data.kernel_address`): it
/// must be 4 MiB aligned (a 2-level PGD boundary; every Linux split is), so
/// the kernel half is whole PGD entries. 0 means "no user half".
pub fn check_kernel_address(kernel_address: u32) -> Result<(), Kill> {
    if !kernel_address.is_multiple_of(4 << 20) {
        return Err(Kill::new(format_args!(
            "bad kernel address {kernel_address:#x}"
        )));
    }
    Ok(())
}

/// A TLB invalidation the kernel owes the loaded shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Flush {
    /// Nothing.
    #[default]
    None,
    /// `invlpg` this guest virtual address.
    Page(u32),
    /// Everything non-global of the current address space (reload CR3
    /// without the no-flush bit, or INVPCID single-context).
    All,
}

impl Flush {
    /// Both invalidations.
    pub const fn merge(self, other: Flush) -> Flush {
        match (self, other) {
            (Flush::None, f) | (f, Flush::None) => f,
            (Flush::Page(a), Flush::Page(b)) if a == b => Flush::Page(a),
            _ => Flush::All,
        }
    }
}

/// The answer to a guest page fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The shadow now maps the page: resume the guest.
    Fixed,
    /// The guest's own fault: deliver `#PF` with this error code and `cr2`.
    /// Bit 0 says what the guest's tables say (set for a protection
    /// violation, clear for a missing entry); bits above 2 are cleared (the
    /// guest has neither NX nor SMEP).
    Reflect {
        /// The error code to push.
        errcode: u32,
    },
    /// Kill the guest.
    Kill(Kill),
}

/// The answer to `NEW_PGTABLE`: what to load into CR3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    /// The cache slot (0 ≤ slot < cache size), stable while the shadow is
    /// cached: a PCID per slot is safe.
    pub slot: usize,
    /// Host-physical address of the shadow's PML4.
    pub root: u64,
    /// The slot's TLB entries may be stale (new or reused slot, or entries
    /// changed while it was not loaded): flush its PCID.
    pub flush: bool,
    /// The shadow was found in the cache.
    pub hit: bool,
    /// The kernel stack was (re-)pinned in it.
    pub repinned: bool,
}

/// Counters for the benchmark and the per-guest summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `NEW_PGTABLE`s that found their shadow cached.
    pub hits: u64,
    /// `NEW_PGTABLE`s that had to make one.
    pub misses: u64,
    /// Faults fixed by filling the shadow.
    pub fills: u64,
    /// Faults reflected to the guest.
    pub reflected: u64,
    /// Shadows evicted (or emptied) to stay under the cap or because the
    /// backend ran out of frames.
    pub evictions: u64,
    /// Most frames held at once.
    pub peak_frames: usize,
}

/// One cached shadow.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Guest `cr3` it shadows.
    gpgdir: u32,
    /// Its PML4 frame.
    pml4: u64,
    /// Its PDPT frame (PML4 entry 0).
    pdpt: u64,
    /// Tick of the last switch to it.
    last_used: u64,
    /// Tick it was created or reused.
    inserted: u64,
    /// `pin_stack`'s pages are known present and writable in it. Kept
    /// across `SET_STACK`s of other stacks, so that a context switch back
    /// to a process whose stack was pinned in its shadow pins nothing again:
    /// the slot is pinned for the current stack exactly when it is held
    /// and the current stack is `pin_stack`
    /// ([`ShadowPaging::pinned`], worked out where asked, so that a
    /// `SET_STACK` touches no slot but the current one).
    held: bool,
    /// The stack `held` is about.
    pin_stack: Option<Stack>,
    /// While held: the shadow leaf of the stack's top page (where a
    /// trap frame pushed below `esp1` lands). Every change of a stack
    /// page's leaf clears `held` first, so it stays true while pinned.
    pin_top: u64,
    /// TLB entries tagged with this slot may be stale.
    stale: bool,
}

/// The kernel stack from `SET_STACK`: the address of its top page (the one
/// below `esp1`) with the number of pages, 1 to [`MAX_STACK_PAGES`], in the
/// low bits (never zero), so that comparing two stacks is one word compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stack(core::num::NonZeroU32);

impl Stack {
    /// The `count` pages from the page holding `top` down.
    fn new(top: u32, count: u32) -> Option<Self> {
        core::num::NonZeroU32::new((top & !0xFFF) | (count & 0xFFF)).map(Self)
    }

    /// The top page's address.
    #[inline]
    fn top(self) -> u32 {
        self.0.get() & !0xFFF
    }

    /// The page addresses, from the top one down.
    fn pages(self) -> impl Iterator<Item = u32> {
        let top = self.top();
        (0..self.0.get() & 0xFFF).map(move |i| top.wrapping_sub(i.wrapping_mul(PAGE)))
    }

    /// Whether a stack page lies in `[lo, hi)`.
    #[inline]
    fn overlaps(self, lo: u64, hi: u64) -> bool {
        self.pages()
            .any(|p| lo <= u64::from(p) && u64::from(p) < hi)
    }
}

/// Regions of 2 MiB (one shadow PT each) in the guest's 4 GiB.
const REGIONS: usize = 2048;

/// Which 2 MiB regions of a shadow have a page table (bit `vaddr >> 21`),
/// kept in step with its PD entries: set where a PD entry is made present,
/// cleared where one is dropped. Dropping a range (a flush, a `SET_PGD`, a
/// reused slot) then visits only the tables that exist instead of every PD
/// entry the range spans (a user-half flush spans 1,536).
#[derive(Clone, Copy, Debug)]
struct TableMap([u64; REGIONS / 64]);

impl TableMap {
    const EMPTY: Self = Self([0; REGIONS / 64]);

    fn insert(&mut self, vaddr: u32) {
        let r = (vaddr >> 21) as usize;
        if let Some(w) = self.0.get_mut(r >> 6) {
            *w |= 1 << (r & 63);
        }
    }

    /// Removes every region in `[lo, hi)` from the map, calling `f` with
    /// each one that was in it (region `r` is PDPT entry `r >> 9`, PD entry
    /// `r & 511`), in ascending order.
    fn take_range(&mut self, lo: u64, hi: u64, mut f: impl FnMut(usize)) {
        let first = usize::try_from(lo >> 21).unwrap_or(REGIONS).min(REGIONS);
        let last = usize::try_from(hi.div_ceil(LARGE_PAGE_SIZE))
            .unwrap_or(REGIONS)
            .min(REGIONS);
        if first >= last {
            return;
        }
        // first < last <= REGIONS: the words first / 64 to (last - 1) / 64.
        let (w_first, w_end) = (first >> 6, last.wrapping_sub(1) >> 6);
        for w in w_first..=w_end {
            let Some(word) = self.0.get_mut(w) else {
                break;
            };
            // w < 32: no overflow.
            let base = w << 6;
            let from = first.saturating_sub(base);
            let to = last.saturating_sub(base).min(64);
            let mask = if to == 64 {
                !0u64
            } else {
                (1u64 << to).wrapping_sub(1)
            } & (!0u64 << from);
            let mut m = *word & mask;
            *word &= !mask;
            while m != 0 {
                let bit = m.trailing_zeros() as usize;
                m &= m.wrapping_sub(1);
                f(base | bit);
            }
        }
    }
}

/// Why a fill failed.
enum FillError {
    /// The guest's own fault; `present` = the guest's leaf is present
    /// (protection violation).
    Guest { present: bool },
    /// Kill the guest.
    Kill(Kill),
}

/// Out of frames even after evicting everything possible.
struct OutOfFrames;

impl From<OutOfFrames> for Kill {
    fn from(_: OutOfFrames) -> Self {
        Kill::new("out of memory for shadow page tables")
    }
}

/// What one eviction step did.
enum Evicted {
    /// Another shadow was removed.
    Other,
    /// The protected (current) shadow was emptied.
    Protected,
    /// Nothing left to evict.
    Nothing,
}

/// One guest's shadow page tables. See the module documentation. (Cloning
/// copies the bookkeeping, not the frames: for tests of the pure state
/// machine around it.)
#[derive(Clone)]
pub struct ShadowPaging {
    cfg: ShadowConfig,
    paging: GuestPaging,
    slots: Vec<Option<Slot>>,
    /// Per slot: which of its PD entries have a page table.
    tables: Vec<TableMap>,
    current: Option<usize>,
    /// The slot that was current before the last switch: where a switch
    /// most often goes (two address spaces taking turns). Only a hint,
    /// checked against the slot's `gpgdir` before use.
    prev: Option<usize>,
    frames: usize,
    tick: u64,
    rng: u64,
    stack: Option<Stack>,
    pending: Flush,
    stats: Stats,
}

impl fmt::Debug for ShadowPaging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowPaging")
            .field("current", &self.current)
            .field("frames", &self.frames)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl ShadowPaging {
    /// An empty core for one guest: no shadows, no frames held.
    pub fn new(cfg: ShadowConfig) -> Result<Self, ConfigError> {
        if cfg.pfnlimit == 0 || cfg.pfnlimit > 1 << 20 {
            return Err(ConfigError::PfnLimit);
        }
        let end = u64::from(cfg.pfnlimit)
            .checked_mul(PAGE_SIZE)
            .and_then(|len| cfg.guest_base.checked_add(len));
        if !cfg.guest_base.is_multiple_of(PAGE_SIZE) || end.is_none_or(|e| e > PHYS_ADDR_LIMIT) {
            return Err(ConfigError::GuestBase);
        }
        if !cfg.kernel_address.is_multiple_of(4 << 20) {
            return Err(ConfigError::KernelAddress);
        }
        if cfg.cache_size == 0 || cfg.cache_size > MAX_CACHE_SIZE {
            return Err(ConfigError::CacheSize);
        }
        if cfg.max_frames < MIN_FRAMES {
            return Err(ConfigError::MaxFrames);
        }
        if !cfg.host_pml4.is_multiple_of(PAGE_SIZE) {
            return Err(ConfigError::HostPml4);
        }
        let mut slots = Vec::new();
        slots.resize(cfg.cache_size, None);
        let mut tables = Vec::new();
        tables.resize(cfg.cache_size, TableMap::EMPTY);
        let rng = match cfg.policy {
            Policy::Random { seed } if seed != 0 => seed,
            _ => 0x9E37_79B9_7F4A_7C15,
        };
        Ok(Self {
            cfg,
            paging: GuestPaging::new(cfg.format, cfg.pfnlimit),
            slots,
            tables,
            current: None,
            prev: None,
            frames: 0,
            tick: 0,
            rng,
            stack: None,
            pending: Flush::None,
            stats: Stats::default(),
        })
    }

    // ----------------------------------------------------------------------
    // Queries.

    /// The configuration.
    pub fn config(&self) -> &ShadowConfig {
        &self.cfg
    }

    /// Table frames held now (PML4s, PDPTs, PDs, PTs of every cached shadow).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether the guest has left linear mode (a shadow is current).
    pub fn is_paging(&self) -> bool {
        self.current.is_some()
    }

    /// The current shadow's cache slot (for a per-slot PCID).
    pub fn current_slot(&self) -> Option<usize> {
        self.current
    }

    /// Host-physical address of the current shadow's PML4 (CR3 while the
    /// guest runs).
    pub fn current_root(&self) -> Option<u64> {
        self.current_slot_ref().map(|s| s.pml4)
    }

    /// The guest `cr3` of the current shadow.
    pub fn current_gpgdir(&self) -> Option<u32> {
        self.current_slot_ref().map(|s| s.gpgdir)
    }

    /// The guest `cr3`s of the cached shadows, by slot.
    pub fn cached(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.gpgdir)))
    }

    /// Host-physical PML4 of the shadow in `slot` (tests, debugging).
    pub fn slot_root(&self, slot: usize) -> Option<u64> {
        self.slots.get(slot).copied().flatten().map(|s| s.pml4)
    }

    /// While the kernel stack is pinned in the current shadow: the leaf of
    /// the stack's top page there (`None` otherwise). Where the host writes
    /// a trap frame on that page follows from it alone, so a caller that
    /// found the frame's place under one key need not look again while the
    /// key is the same (in whichever shadow). Every change of a stack
    /// page's leaf the guest announces, and every refill that moves the
    /// page or takes rights from it (a guest that rewrote its stack's entry
    /// behind the host's back), unpins first.
    #[inline(always)]
    pub fn pin_key(&self) -> Option<u64> {
        let s = self.current_slot_ref()?;
        self.pinned(s).then_some(s.pin_top)
    }

    /// The guest-physical page a pinned stack page's shadow leaf (a
    /// [`pin_key`](Self::pin_key)) maps, present and writable (`None`
    /// otherwise).
    #[inline]
    pub fn leaf_gpa(&self, leaf: u64) -> Option<u32> {
        Self::writable_gpa(leaf, self.cfg.guest_base)
    }

    /// Whether the kernel stack of the last `SET_STACK` is pinned in `s`:
    /// `s` holds that very stack (its pages known present and writable
    /// there). Never without a stack.
    #[inline]
    fn pinned(&self, s: &Slot) -> bool {
        Self::holds_stack(s, self.stack)
    }

    /// Whether stack `st` is known present and writable in `s`.
    #[inline]
    fn holds_stack(s: &Slot, st: Option<Stack>) -> bool {
        s.held && s.pin_stack == st
    }

    /// Takes the TLB invalidation owed to the loaded shadow (see the module
    /// documentation): apply it before the guest runs again.
    pub fn take_flush(&mut self) -> Flush {
        core::mem::take(&mut self.pending)
    }

    fn current_slot_ref(&self) -> Option<&Slot> {
        self.slots.get(self.current?)?.as_ref()
    }

    fn slot(&self, i: usize) -> Option<&Slot> {
        self.slots.get(i)?.as_ref()
    }

    /// The slot caching the shadow of `gpgdir`: the current one first (most
    /// page-table calls name the address space that runs), then the others.
    #[inline]
    fn find(&self, gpgdir: u32) -> Option<usize> {
        match self.current {
            Some(ci) if self.slots.get(ci).is_some_and(|s| Self::holds(s, gpgdir)) => Some(ci),
            _ => self.position(gpgdir),
        }
    }

    /// The slot caching the shadow of `gpgdir` (for a switch, which is never
    /// to the current one but most often back to the one before it).
    #[inline]
    fn position(&self, gpgdir: u32) -> Option<usize> {
        // The slot switched away from last first: no two slots hold the
        // same `gpgdir`, so the answer is the same.
        match self.prev {
            Some(p) if self.slots.get(p).is_some_and(|s| Self::holds(s, gpgdir)) => Some(p),
            _ => self.slots.iter().position(|s| Self::holds(s, gpgdir)),
        }
    }

    #[inline]
    fn holds(s: &Option<Slot>, gpgdir: u32) -> bool {
        s.as_ref().is_some_and(|s| s.gpgdir == gpgdir)
    }

    fn slot_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.slots.get_mut(i)?.as_mut()
    }

    // ----------------------------------------------------------------------
    // Guest events.

    /// `#PF` at guest virtual `vaddr` with the hardware error code: lguest's
    /// `demand_page`. Walks the guest's tables from the current shadow's
    /// `gpgdir`; a valid mapping that allows the access gets its ACCESSED
    /// (and, for a write, DIRTY) bit set in guest memory and is installed,
    /// a missing or forbidding one is the guest's fault, a bad one kills.
    /// Before the first `NEW_PGTABLE` every fault is reflected.
    #[inline]
    pub fn demand_fault<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        vaddr: u32,
        errcode: u32,
    ) -> Fault {
        let Some(ci) = self.current else {
            self.stats.reflected = self.stats.reflected.saturating_add(1);
            return Fault::Reflect {
                errcode: errcode & 7,
            };
        };
        match self.fill(mem, b, ci, vaddr, Access::from_errcode(errcode)) {
            Ok(()) => {
                self.stats.fills = self.stats.fills.saturating_add(1);
                match self.ensure_pinned(mem, b) {
                    Ok(_) => Fault::Fixed,
                    Err(k) => Fault::Kill(k),
                }
            }
            Err(FillError::Guest { present }) => self.reflected(errcode, present),
            Err(FillError::Kill(k)) => Fault::Kill(k),
        }
    }

    /// A fault found to be the guest's own (`present`: its leaf is present,
    /// a protection fault): counted, and the error code it sees.
    fn reflected(&mut self, errcode: u32, present: bool) -> Fault {
        self.stats.reflected = self.stats.reflected.saturating_add(1);
        Fault::Reflect {
            errcode: (errcode & 6) | u32::from(present),
        }
    }

    /// [`demand_fault`](Self::demand_fault) in its common cases, without
    /// its general machinery, returning what it would: a fault the guest's
    /// tables make the guest's own (`Fault::Reflect`, counted), or a fill
    /// where the guest's tables allow the access and the current shadow
    /// already has the page table for the address (with the rights the
    /// guest's upper level gives) and the kernel stack pinned
    /// (`Fault::Fixed`: A/D set in the guest entry, the leaf installed, the
    /// fill counted, a lost right invalidated). `None`: it changed nothing,
    /// `demand_fault` decides (a kill, tables to allocate, a stack to pin).
    #[inline]
    pub fn fast_fill<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        vaddr: u32,
        errcode: u32,
    ) -> Option<Fault> {
        let ci = self.current?;
        let s = self.slots.get(ci)?.as_ref()?;
        let (gpgdir, pdpt, pinned) = (s.gpgdir, s.pdpt, self.pinned(s));
        let access = Access::from_errcode(errcode);
        let t = match self.paging.translate(mem, gpgdir, vaddr, access) {
            Ok(t) => t,
            // The guest's own fault, as `demand_fault`'s fill finds it.
            Err(WalkError::NotPresent { .. }) => return Some(self.reflected(errcode, false)),
            Err(WalkError::Protection) => return Some(self.reflected(errcode, true)),
            Err(WalkError::Bad(_)) => return None,
        };
        if !pinned && self.stack.is_some() {
            return None;
        }
        let pdpte = b.read(pdpt, gib_index(vaddr));
        if pdpte & PAGE_PRESENT == 0 {
            return None;
        }
        let (pd, di) = (pdpte & ADDR_MASK, pd_index(vaddr));
        let pde = b.read(pd, di);
        let pt = pde & ADDR_MASK;
        if pde & PAGE_PRESENT == 0 || pde & !PDE_CHUNKS != pt | pde_flags(t.upper) {
            return None;
        }
        // The leaf's chunk is marked written first (marked and then not
        // written, should the A/D write below fail, is only a few more
        // zero stores when the table is reused).
        let idx = pt_index(vaddr);
        if pde & chunk_bit(idx) == 0 {
            b.write(pd, di, pde | chunk_bit(idx));
        }
        // Decided: `fill`'s writes, in its order — the guest entry's A/D
        // (`mark_accessed`), then the leaf (`leaf`: the frame was checked
        // against pfnlimit, and guest_base + pfnlimit pages against the
        // physical limit in `new`, so the sum cannot overflow).
        let mut want = t.pte | PAGE_ACCESSED;
        if access.write {
            want |= PAGE_DIRTY;
        }
        if want != t.pte {
            let r = match self.cfg.format {
                Format::TwoLevel => mem.write_u32(t.pte_gpa, want as u32),
                Format::Pae => mem.write_u64(t.pte_gpa, want),
            };
            if r.is_err() {
                return None;
            }
        }
        let mut leaf =
            self.cfg.guest_base.wrapping_add(u64::from(t.pfn()) << 12) | (want & LEAF_COPY);
        if want & PAGE_RW != 0 && want & PAGE_DIRTY != 0 {
            leaf |= PageFlags::WRITABLE.bits();
        }
        let old = b.read(pt, idx);
        b.write(pt, idx, leaf);
        let lost = old & !leaf & (PAGE_RW | PAGE_USER) != 0 || (old ^ leaf) & ADDR_MASK != 0;
        if old & PAGE_PRESENT != 0 && lost {
            self.touched(ci, Flush::Page(vaddr));
            // A stack page moved or lost rights behind the host's back
            // (the guest rewrote its entry unannounced): no longer pinned.
            self.leaf_changed(ci, vaddr);
        }
        self.stats.fills = self.stats.fills.wrapping_add(1);
        Some(Fault::Fixed)
    }

    /// `LHCALL_NEW_PGTABLE(gpgdir)`: switch to the shadow of the guest
    /// tables at `gpgdir`, from the cache or made now (reusing the policy's
    /// victim when the cache is full), and re-pin the kernel stack in it if
    /// needed. The kernel loads [`Switch::root`] into CR3.
    pub fn new_pgtable<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        gpgdir: u32,
    ) -> Result<Switch, Kill> {
        self.switch_to(mem, b, gpgdir, true)
    }

    /// [`new_pgtable`](Self::new_pgtable) when a `SET_STACK` comes right
    /// after it (Linux's context switch queues `NEW_PGTABLE`, then the next
    /// task's `SET_STACK`): the switch without pinning the old stack in the
    /// new shadow, which the `SET_STACK` unpins at once and pins its own
    /// stack in. Until then the current shadow counts as not pinned.
    pub fn new_pgtable_pin_later<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        gpgdir: u32,
    ) -> Result<Switch, Kill> {
        self.switch_to(mem, b, gpgdir, false)
    }

    fn switch_to<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        gpgdir: u32,
        pin: bool,
    ) -> Result<Switch, Kill> {
        // A switch to a cached, clean (and unless `pin` is false: pinned)
        // shadow first: what the code below does for it, with less to look
        // at (its `gpgdir` passed `check_cr3` when it was made).
        if let Some(sw) = self.cached_switch(gpgdir, pin) {
            return Ok(sw);
        }
        self.paging.check_cr3(gpgdir)?;
        self.tick = self.tick.saturating_add(1);
        let tick = self.tick;
        let found = self.position(gpgdir);
        let (si, hit) = match found {
            Some(i) => {
                self.stats.hits = self.stats.hits.saturating_add(1);
                (i, true)
            }
            None => {
                self.stats.misses = self.stats.misses.saturating_add(1);
                (self.make_slot(b, gpgdir)?, false)
            }
        };
        // Changes still owed to the shadow we leave become its staleness.
        if let Some(old) = self.current
            && old != si
            && self.pending != Flush::None
        {
            if let Some(s) = self.slot_mut(old) {
                s.stale = true;
            }
            self.pending = Flush::None;
        }
        let mut flush = !hit;
        let mut root = 0;
        if let Some(s) = self.slot_mut(si) {
            s.last_used = tick;
            flush |= s.stale;
            s.stale = false;
            root = s.pml4;
        }
        if self.current != Some(si) {
            self.pending = Flush::None;
            self.prev = self.current;
        }
        self.current = Some(si);
        let repinned = if pin {
            self.ensure_pinned(mem, b)?
        } else {
            false
        };
        Ok(Switch {
            slot: si,
            root,
            flush,
            hit,
            repinned,
        })
    }

    /// [`new_pgtable`](Self::new_pgtable) when it needs nothing but the
    /// switch: the shadow of `gpgdir` is cached, its TLB entries are not
    /// stale, the kernel stack is pinned in it (or there is none), and no
    /// invalidation is owed to the current one. Then it does exactly what
    /// `new_pgtable` does (a cache hit that returns `flush: false`) and
    /// returns the same [`Switch`]; otherwise it changes nothing and returns
    /// `None`. For the hypercall stub's paging lane.
    #[inline]
    pub fn fast_switch(&mut self, gpgdir: u32) -> Option<Switch> {
        self.cached_switch(gpgdir, true)
    }

    /// [`new_pgtable_pin_later`](Self::new_pgtable_pin_later)`(gpgdir)`
    /// and then [`pin_stack`](Self::pin_stack)`(esp1, pages)` (Linux's
    /// context switch) when together they need nothing but the switch: the
    /// shadow of `gpgdir` is cached and clean, nothing is owed to the
    /// current one, and it holds that very stack pinned already (a switch
    /// back to a process that ran before). Then both are done exactly as
    /// those two calls would do them (the switch a cache hit with `flush:
    /// false`, the stack recorded, nothing to pin) and the [`Switch`] is
    /// returned with the new [`pin_key`](Self::pin_key); otherwise nothing
    /// changed and `None` (the two calls then decide, kills included).
    #[inline]
    pub fn switch_with_stack(
        &mut self,
        gpgdir: u32,
        esp1: u32,
        pages: u32,
    ) -> Option<(Switch, u64)> {
        // (A stack held pinned passed `pin_stack`'s checks, all but these
        // two implied by being equal to it: `esp1` 0 and more pages than
        // 2 could look like one in `Stack`, and 0 pages never does.)
        if esp1 == 0 || pages > MAX_STACK_PAGES {
            return None;
        }
        let st = Stack::new(esp1.wrapping_sub(1), pages);
        let si = self.position(gpgdir)?;
        let s = self.slot(si)?;
        if self.pending != Flush::None || !Self::holds_stack(s, st) {
            return None;
        }
        let pin_top = s.pin_top;
        let sw = self.hit_switch(si)?;
        self.stack = st;
        Some((sw, pin_top))
    }

    /// [`fast_switch`](Self::fast_switch), and with `pinned` false for a
    /// switch whose pinning comes later (`new_pgtable_pin_later`): then the
    /// target need not be pinned, nor map the stack where the current one
    /// does (the stubs are armed again before the guest runs).
    #[inline]
    fn cached_switch(&mut self, gpgdir: u32, pinned: bool) -> Option<Switch> {
        if self.pending != Flush::None {
            return None;
        }
        let si = self.position(gpgdir)?;
        // The stack's top page must be where it is in the current shadow:
        // the hypercall stub's reflection pushes a user-mode trap frame at
        // the page it was armed with, and a shadow that maps the page
        // elsewhere takes the full path, which re-arms it.
        if pinned && self.stack.is_some() {
            let cur_top = match self.current.and_then(|c| self.slots.get(c)) {
                Some(Some(c)) if self.pinned(c) => Some(c.pin_top),
                _ => None,
            };
            let s = self.slot(si)?;
            if !self.pinned(s) || cur_top != Some(s.pin_top) {
                return None;
            }
        }
        self.hit_switch(si)
    }

    /// The end of a switch to slot `si` that is a cache hit and owes the
    /// TLB nothing (`None`, with nothing changed, if its entries are stale):
    /// the bookkeeping `switch_to` does for it, and its [`Switch`].
    #[inline(always)]
    fn hit_switch(&mut self, si: usize) -> Option<Switch> {
        let tick = self.tick.saturating_add(1);
        let prev = self.current;
        let s = self.slot_mut(si)?;
        if s.stale {
            return None;
        }
        s.last_used = tick;
        let root = s.pml4;
        self.tick = tick;
        self.stats.hits = self.stats.hits.saturating_add(1);
        if prev != Some(si) {
            self.prev = prev;
        }
        self.current = Some(si);
        Some(Switch {
            slot: si,
            root,
            flush: false,
            hit: true,
            repinned: false,
        })
    }

    /// `LHCALL_SET_PTE(gpgdir, vaddr, pte)` (PAE: the 64-bit `pte`; 2-level:
    /// the 32-bit one, zero-extended). For `vaddr` at or above
    /// `kernel_address` every cached shadow is updated, else only the shadow
    /// of `gpgdir` (none cached: nothing to do). Where the shadow has a PT
    /// for `vaddr`, an entry with ACCESSED or DIRTY set is validated and
    /// installed at once (writable only if both are set and the guest's
    /// entry is writable), anything else is removed (to be filled on
    /// demand). Allocates nothing.
    pub fn set_pte<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        gpgdir: u32,
        vaddr: u32,
        pte: u64,
    ) -> Result<(), Kill> {
        let install = pte & PAGE_PRESENT != 0 && pte & (PAGE_ACCESSED | PAGE_DIRTY) != 0;
        let leaf = if install {
            let pfn = self.paging.check_pte(pte, 0, vaddr)?;
            self.leaf(pte, pfn)?
        } else {
            0
        };
        if vaddr >= self.cfg.kernel_address {
            // The kernel half is kept the same in every cached shadow.
            for si in 0..self.slots.len() {
                self.set_leaf(b, si, vaddr, leaf);
            }
        } else if let Some(si) = self.find(gpgdir) {
            self.set_leaf(b, si, vaddr, leaf);
        }
        self.ensure_pinned(mem, b).map(|_| ())
    }

    /// [`set_pte`](Self::set_pte) for its commonest case, for the
    /// hypercall stub's lane: an entry of the user half (below
    /// `kernel_address`) of the address space that runs (the loaded shadow
    /// holds `gpgdir`), of no kernel-stack page, with the stack pinned (or
    /// none) and a valid entry. Then it does
    /// exactly what `set_pte` does (the leaf, if the shadow has a PT for
    /// it) and returns `true`, with any invalidation owed in
    /// [`take_flush`](Self::take_flush); otherwise it changes nothing and
    /// returns `false` (`set_pte` decides, and kills where it kills).
    #[inline]
    pub fn fast_set_pte<B: ShadowBackend>(
        &mut self,
        b: &mut B,
        gpgdir: u32,
        vaddr: u32,
        pte: u64,
    ) -> bool {
        let Some(ci) = self.current else {
            return false;
        };
        let Some(Some(s)) = self.slots.get(ci) else {
            return false;
        };
        let page = u64::from(vaddr & !0xFFF);
        if vaddr >= self.cfg.kernel_address
            || s.gpgdir != gpgdir
            || (self.stack.is_some() && !self.pinned(s))
            || self
                .stack
                .is_some_and(|st| st.overlaps(page, page.wrapping_add(1)))
        {
            return false;
        }
        let leaf = if pte & PAGE_PRESENT != 0 && pte & (PAGE_ACCESSED | PAGE_DIRTY) != 0 {
            let Ok(pfn) = self.paging.check_pte(pte, 0, vaddr) else {
                return false;
            };
            let Ok(leaf) = self.leaf(pte, pfn) else {
                return false;
            };
            leaf
        } else {
            0
        };
        // `set_leaf` on the loaded shadow, which is pinned and stays so (no
        // stack page is touched): `set_pte`'s `ensure_pinned` does nothing.
        self.set_leaf(b, ci, vaddr, leaf);
        true
    }

    /// [`set_pte`](Self::set_pte) in slot `si` (if cached): the leaf for
    /// `vaddr`, where its PT exists, becomes `leaf`, with the invalidation
    /// owed and the stack unpinned if it was a stack page.
    fn set_leaf<B: ShadowBackend>(&mut self, b: &mut B, si: usize, vaddr: u32, leaf: u64) {
        let Some((pd, pde)) = self
            .slots
            .get(si)
            .and_then(Option::as_ref)
            .and_then(|s| self.pde_of(b, s, vaddr))
        else {
            return;
        };
        let pt = pde & ADDR_MASK;
        let idx = pt_index(vaddr);
        let old = b.read(pt, idx);
        if old == leaf {
            return;
        }
        if leaf != 0 && pde & chunk_bit(idx) == 0 {
            b.write(pd, pd_index(vaddr), pde | chunk_bit(idx));
        }
        b.write(pt, idx, leaf);
        if old & PAGE_PRESENT != 0 {
            self.touched(si, Flush::Page(vaddr));
        }
        self.leaf_changed(si, vaddr);
    }

    /// The leaf of `vaddr` in slot `si` was just changed: if it is a stack
    /// page, the slot is no longer known pinned (its `pin_top` may be
    /// stale), so the next pinning looks again.
    #[inline]
    fn leaf_changed(&mut self, si: usize, vaddr: u32) {
        let page = u64::from(vaddr & !0xFFF);
        if let Some(s) = self.slot_mut(si)
            && s.pin_stack
                .is_some_and(|st| st.overlaps(page, page.wrapping_add(1)))
        {
            s.held = false;
        }
    }

    /// `LHCALL_SET_PGD(gpgdir, index)`: the guest changed top-level entry
    /// `index` of the tables at `gpgdir`; drop that slot of its shadow (if
    /// cached), freeing the tables below. `index` must be below 1024
    /// (2-level; lguest let 1024 through) or 4 (PAE).
    pub fn set_pgd<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        gpgdir: u32,
        index: u32,
    ) -> Result<(), Kill> {
        let entries = self.cfg.format.top_entries();
        if index >= entries {
            return Err(Kill::new(format_args!(
                "attempt to set pgd {index}/{entries}"
            )));
        }
        let span = match self.cfg.format {
            Format::TwoLevel => 4 << 20,
            Format::Pae => GIB,
        };
        // index < 1024 (or 4): no overflow.
        let lo = u64::from(index).wrapping_mul(span);
        if let Some(si) = self.find(gpgdir) {
            self.clear_range(b, si, lo, lo.wrapping_add(span), false);
        }
        self.ensure_pinned(mem, b).map(|_| ())
    }

    /// `LHCALL_SET_PMD(pmd_page, index)` (PAE only): the guest changed entry
    /// `index` of the PMD page at guest-physical `pmd_page`. Every cached
    /// shadow whose guest PDPT points at that page drops the 2 MiB its PD
    /// entry `index` covers (lguest dropped every shadow instead). In a
    /// 2-level guest this kills: it was built for PAE.
    pub fn set_pmd<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        pmd_page: u32,
        index: u32,
    ) -> Result<(), Kill> {
        if self.cfg.format != Format::Pae {
            return Err(Kill::new(
                "SET_PMD from a 2-level guest (a PAE guest: run it with paging=pae)",
            ));
        }
        if index >= 512 {
            return Err(Kill::new(format_args!("attempt to set pmd {index}/512")));
        }
        let page = u64::from(pmd_page & !0xFFF);
        for si in 0..self.slots.len() {
            let Some(gpgdir) = self.slot(si).map(|s| s.gpgdir) else {
                continue;
            };
            for gi in 0..4u32 {
                // gpgdir was checked to be 32-byte aligned and inside guest
                // memory: the read cannot fail, and a failure drops the lot.
                let at = gpgdir.wrapping_add(gi << 3);
                let lo = u64::from(gi) << 30;
                match mem.read_u64(at) {
                    Ok(e) if e & PAGE_PRESENT != 0 && e & PAGE_ADDR_MASK == page => {
                        // index < 512: inside the GiB.
                        let start = lo | (u64::from(index) << 21);
                        self.clear_range(b, si, start, start.wrapping_add(LARGE_PAGE_SIZE), false);
                    }
                    Ok(_) => {}
                    Err(_) => self.clear_range(b, si, lo, lo.wrapping_add(GIB), false),
                }
            }
        }
        self.ensure_pinned(mem, b).map(|_| ())
    }

    /// `LHCALL_FLUSH_TLB(all)`: `all` drops every entry (both halves) of
    /// every cached shadow; otherwise the user half (below
    /// `kernel_address`) of the current shadow. The stack is re-pinned.
    pub fn flush_tlb<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        all: bool,
    ) -> Result<(), Kill> {
        if all {
            for si in 0..self.slots.len() {
                self.clear_range(b, si, 0, FOUR_GIB, false);
            }
        } else if let Some(ci) = self.current {
            self.clear_range(b, ci, 0, u64::from(self.cfg.kernel_address), false);
        }
        self.ensure_pinned(mem, b).map(|_| ())
    }

    /// `LHCALL_SET_STACK`'s paging part: the `pages` pages below `esp1`
    /// must be present and writable in the current shadow from now on (and
    /// in every shadow that becomes current). `pages` is 1 to
    /// [`MAX_STACK_PAGES`]. Before the first `NEW_PGTABLE` the stack is only
    /// recorded. A page the guest does not map writable kills ("bad stack
    /// page").
    pub fn pin_stack<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        esp1: u32,
        pages: u32,
    ) -> Result<(), Kill> {
        if pages == 0 || pages > MAX_STACK_PAGES {
            return Err(Kill::new(format_args!("bad stack pages {pages}")));
        }
        // Every page lies at or above 0.
        let top = esp1.wrapping_sub(1);
        for i in 0..pages {
            if esp1 == 0 || i.checked_mul(PAGE).is_none_or(|d| d > top) {
                return Err(Kill::new(format_args!(
                    "bad stack page below {esp1:#x} (page {i})"
                )));
            }
        }
        // A shadow that holds this stack already is pinned for it.
        self.stack = Stack::new(top, pages);
        self.ensure_pinned(mem, b).map(|_| ())
    }

    /// Guest virtual → guest physical for a host access on the guest's
    /// behalf (pushing a trap frame: [`Access::KERNEL_WRITE`]), through the
    /// current guest tables, honouring their permissions and setting A/D as
    /// the CPU would. Before the first `NEW_PGTABLE`: the identity below
    /// `pfnlimit`. A failure is a kill for the caller (e.g. "bad stack page"
    /// plus this error).
    pub fn translate_for_host(
        &self,
        mem: &mut impl GuestMemory,
        vaddr: u32,
        access: Access,
    ) -> Result<u32, WalkError> {
        match self.current_gpgdir() {
            Some(cr3) => self.paging.translate_for_host(mem, cr3, vaddr, access),
            None if u64::from(vaddr) < u64::from(self.cfg.pfnlimit) * PAGE_SIZE => Ok(vaddr),
            None => Err(WalkError::NotPresent { level: Level::Pte }),
        }
    }

    /// Guest virtual → guest physical for an access the host may make later
    /// on the guest's behalf without walking again (the reflection stubs
    /// push a user-mode trap frame there): only if the current tables allow
    /// `access` and the leaf already has ACCESSED (and DIRTY for a write)
    /// set, so that the later access changes nothing the CPU would have
    /// changed. Reads only; `None` otherwise (the full path then decides).
    pub fn translate_quiet(
        &self,
        mem: &impl GuestMemory,
        vaddr: u32,
        access: Access,
    ) -> Option<u32> {
        let cr3 = self.current_gpgdir()?;
        let t = self.paging.translate(mem, cr3, vaddr, access).ok()?;
        let need = PAGE_ACCESSED | if access.write { PAGE_DIRTY } else { 0 };
        (t.pte & need == need).then_some(t.gpa)
    }

    /// Guest virtual → guest physical as the current shadow itself maps
    /// `vaddr` present and writable (a pinned stack page), read from the
    /// shadow's tables without walking the guest's. A writable leaf is only
    /// ever made from a guest entry that allows the write and has ACCESSED
    /// and DIRTY set, and every change of that entry reaches the shadow
    /// (`SET_PTE`, a flush), so a host write there changes nothing the CPU
    /// would have changed. `None` if the current shadow has no such leaf.
    pub fn shadow_writable_gpa<B: ShadowBackend>(&self, b: &B, vaddr: u32) -> Option<u32> {
        // The pinned stack's top page (where trap frames go): its leaf is
        // at hand.
        if let Some(page) = self.pinned_top_gpa(vaddr) {
            return Some(page | (vaddr & 0xFFF));
        }
        let e = b.read(
            self.pt_of(b, self.current_slot_ref()?, vaddr)?,
            pt_index(vaddr),
        );
        Self::writable_gpa(e, self.cfg.guest_base).map(|page| page | (vaddr & 0xFFF))
    }

    /// The guest-physical page under `vaddr` when `vaddr` lies in the
    /// pinned kernel stack's top page, from that page's leaf in the loaded
    /// shadow (`pin_top`, present and writable while pinned): what
    /// [`shadow_writable_gpa`](Self::shadow_writable_gpa) finds there,
    /// without reading the tables. `None` otherwise.
    #[inline]
    pub fn pinned_top_gpa(&self, vaddr: u32) -> Option<u32> {
        let s = self.current_slot_ref()?;
        let top = self.stack?.top();
        if !self.pinned(s) || top != vaddr & !0xFFF {
            return None;
        }
        Self::writable_gpa(s.pin_top, self.cfg.guest_base)
    }

    /// The guest-physical page of shadow leaf `e`, if present and writable.
    #[inline]
    fn writable_gpa(e: u64, guest_base: u64) -> Option<u32> {
        if e & (PAGE_PRESENT | PAGE_RW) != PAGE_PRESENT | PAGE_RW {
            return None;
        }
        u32::try_from((e & ADDR_MASK).checked_sub(guest_base)?).ok()
    }

    /// Where the host may write for the guest kernel at `vaddr` without
    /// changing anything the CPU would have changed (a trap frame pushed on
    /// the trap stack): the page as the current shadow maps it writable
    /// ([`shadow_writable_gpa`](Self::shadow_writable_gpa), no walk), else
    /// as the guest's tables map it quietly
    /// ([`translate_quiet`](Self::translate_quiet)); `None` if neither.
    pub fn quiet_write_gpa<B: ShadowBackend>(
        &self,
        b: &B,
        mem: &impl GuestMemory,
        vaddr: u32,
    ) -> Option<u32> {
        self.shadow_writable_gpa(b, vaddr)
            .or_else(|| self.translate_quiet(mem, vaddr, Access::KERNEL_WRITE))
    }

    /// Frees every frame of every shadow: the guest died or is restarting.
    /// The kernel must have loaded another CR3 first (none of these tables
    /// may be in use). Afterwards [`Self::frames`] is 0 and the core is back
    /// in linear mode (the recorded stack is forgotten too).
    pub fn release_all<B: ShadowBackend>(&mut self, b: &mut B) {
        for si in 0..self.slots.len() {
            self.free_slot(b, si);
        }
        self.current = None;
        self.stack = None;
        self.pending = Flush::None;
    }

    // ----------------------------------------------------------------------
    // Filling.

    /// The shadow leaf for guest PTE `pte` naming frame `pfn` (validated).
    #[inline]
    fn leaf(&self, pte: u64, pfn: u32) -> Result<u64, Kill> {
        // pfn < pfnlimit <= 2^20 and guest_base + pfnlimit pages was checked
        // in `new`: cannot fail.
        let host = self
            .cfg
            .guest_base
            .checked_add(u64::from(pfn) << 12)
            .ok_or_else(|| Kill::new(format_args!("bad guest page {pfn:#x}")))?;
        let mut e = host | (pte & LEAF_COPY);
        // Writable only once the guest's entry is accessed and dirty (a
        // fill marks both first; a `SET_PTE` entry that is dirty but not
        // accessed stays read-only until its first write fills it): a
        // writable leaf then always means the host may write the page, as
        // the CPU would, without changing the guest's entry.
        let ad = PAGE_ACCESSED | PAGE_DIRTY;
        if pte & PAGE_RW != 0 && pte & ad == ad {
            e |= PageFlags::WRITABLE.bits();
        }
        Ok(e)
    }

    /// Makes `vaddr` mapped for `access` in slot `si` (the current one)
    /// from the guest's tables.
    #[inline]
    fn fill<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
        si: usize,
        vaddr: u32,
        access: Access,
    ) -> Result<(), FillError> {
        let Some(gpgdir) = self.slot(si).map(|s| s.gpgdir) else {
            return Err(FillError::Guest { present: false });
        };
        let mut t = match self.paging.translate(mem, gpgdir, vaddr, access) {
            Ok(t) => t,
            Err(WalkError::NotPresent { .. }) => return Err(FillError::Guest { present: false }),
            Err(WalkError::Protection) => return Err(FillError::Guest { present: true }),
            Err(WalkError::Bad(bad)) => return Err(FillError::Kill(bad.into())),
        };
        self.paging
            .mark_accessed(mem, &mut t, access.write)
            .map_err(FillError::Kill)?;
        let leaf = self.leaf(t.pte, t.pfn()).map_err(FillError::Kill)?;
        let pt = self
            .ensure_tables(b, si, vaddr, t.upper)
            .map_err(|e| FillError::Kill(e.into()))?;
        let idx = pt_index(vaddr);
        let old = b.read(pt, idx);
        if old == leaf {
            return Ok(());
        }
        b.write(pt, idx, leaf);
        // Only a change that takes something away needs an invalidation
        // (the faulting address itself was invalidated by the fault).
        let lost = old & !leaf & (PAGE_RW | PAGE_USER) != 0 || (old ^ leaf) & ADDR_MASK != 0;
        if old & PAGE_PRESENT != 0 && lost {
            self.touched(si, Flush::Page(vaddr));
        }
        if old & PAGE_PRESENT != 0 {
            self.leaf_changed(si, vaddr);
        }
        Ok(())
    }

    /// The PT for `vaddr` in slot `si`, created if missing, with the PD
    /// entry carrying `upper`'s rights and `vaddr`'s chunk marked written
    /// (the caller writes its leaf). Evicts (other shadows first, then
    /// the contents of this one) to stay under the cap or when the backend
    /// has no frames.
    #[inline]
    fn ensure_tables<B: ShadowBackend>(
        &mut self,
        b: &mut B,
        si: usize,
        vaddr: u32,
        upper: Perms,
    ) -> Result<u64, OutOfFrames> {
        let gi = gib_index(vaddr);
        let di = pd_index(vaddr);
        let pde_flags = pde_flags(upper) | chunk_bit(pt_index(vaddr));
        for _ in 0..FILL_ATTEMPTS {
            let Some(pdpt) = self.slot(si).map(|s| s.pdpt) else {
                return Err(OutOfFrames);
            };
            let pdpte = b.read(pdpt, gi);
            let pd = (pdpte & PAGE_PRESENT != 0).then_some(pdpte & ADDR_MASK);
            let pde = pd.map_or(0, |pd| b.read(pd, di));
            if let Some(pd) = pd
                && pde & PAGE_PRESENT != 0
            {
                let pt = pde & ADDR_MASK;
                let want = pt | pde_flags | (pde & PDE_CHUNKS);
                if pde != want {
                    b.write(pd, di, want);
                    if pde & !want & (PAGE_RW | PAGE_USER) != 0 {
                        self.touched(si, Flush::All);
                    }
                }
                return Ok(pt);
            }
            let need = if pd.is_some() { 1 } else { 2 };
            let mut got = [0u64; 2];
            match self.take_frames(b, si, got.get_mut(..need).unwrap_or_default()) {
                Ok(()) => {}
                Err(Evicted::Protected) => continue,
                Err(_) => return Err(OutOfFrames),
            }
            let [first, second] = got;
            let (pd, pt) = match pd {
                Some(pd) => (pd, first),
                None => {
                    b.write(pdpt, gi, first | TABLE_FLAGS);
                    (first, second)
                }
            };
            b.write(pd, di, pt | pde_flags);
            if let Some(map) = self.tables.get_mut(si) {
                map.insert(vaddr);
            }
            return Ok(pt);
        }
        Err(OutOfFrames)
    }

    /// Allocates `out.len()` frames, evicting until the cap allows it and the
    /// backend delivers. `Err(Evicted::Protected)`: slot `protect` was
    /// emptied on the way (the caller must look at its tables again);
    /// `Err(Evicted::Nothing)`: out of frames.
    fn take_frames<B: ShadowBackend>(
        &mut self,
        b: &mut B,
        protect: usize,
        out: &mut [u64],
    ) -> Result<(), Evicted> {
        // Each round either succeeds, returns, or removes one other shadow:
        // at most `cache_size + 1` rounds.
        loop {
            if self.frames.saturating_add(out.len()) <= self.cfg.max_frames {
                let mut n = 0usize;
                for slot in out.iter_mut() {
                    match b.alloc_table() {
                        Some(f) => {
                            *slot = f;
                            n = n.saturating_add(1);
                        }
                        None => break,
                    }
                }
                if n == out.len() {
                    self.frames = self.frames.saturating_add(n);
                    self.stats.peak_frames = self.stats.peak_frames.max(self.frames);
                    return Ok(());
                }
                for &f in out.get(..n).unwrap_or_default() {
                    b.free_table(f);
                }
            }
            match self.evict_one(b, protect) {
                Evicted::Other => {}
                other => return Err(other),
            }
        }
    }

    /// One eviction step: remove the policy's victim among the shadows other
    /// than `protect` and the current one, or else empty `protect`.
    fn evict_one<B: ShadowBackend>(&mut self, b: &mut B, protect: usize) -> Evicted {
        let cur = self.current;
        if let Some(v) = self.victim(|i| i != protect && Some(i) != cur) {
            self.free_slot(b, v);
            self.stats.evictions = self.stats.evictions.saturating_add(1);
            return Evicted::Other;
        }
        let before = self.frames;
        self.clear_range(b, protect, 0, FOUR_GIB, true);
        if self.frames < before {
            self.stats.evictions = self.stats.evictions.saturating_add(1);
            Evicted::Protected
        } else {
            Evicted::Nothing
        }
    }

    /// The policy's choice among the occupied slots `eligible` accepts.
    fn victim(&mut self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let candidates = || {
            self.slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
                .filter(|&(i, _)| eligible(i))
        };
        match self.cfg.policy {
            Policy::Lru => candidates()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i),
            Policy::Fifo => candidates().min_by_key(|(_, s)| s.inserted).map(|(i, _)| i),
            Policy::Random { .. } => {
                let n = candidates().count();
                if n == 0 {
                    return None;
                }
                let mut x = self.rng;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // n > 0: the remainder is in range.
                let k = usize::try_from(x.checked_rem(n as u64).unwrap_or(0)).unwrap_or(0);
                let pick = candidates().nth(k).map(|(i, _)| i);
                self.rng = x;
                pick
            }
        }
    }

    /// A slot for `gpgdir` (not cached): a free one with fresh frames, or
    /// the policy's victim reused (user half dropped, kernel half kept).
    fn make_slot<B: ShadowBackend>(&mut self, b: &mut B, gpgdir: u32) -> Result<usize, Kill> {
        let tick = self.tick;
        // The loaded shadow (`current`) is never freed: CR3 still holds it.
        loop {
            let free = self.slots.iter().position(Option::is_none);
            if let Some(fi) = free {
                let mut got = [0u64; 2];
                let fits = self.frames.saturating_add(2) <= self.cfg.max_frames;
                let ok = fits
                    && match (b.alloc_table(), b.alloc_table()) {
                        (Some(p), Some(q)) => {
                            got = [p, q];
                            true
                        }
                        (Some(p), None) | (None, Some(p)) => {
                            b.free_table(p);
                            false
                        }
                        (None, None) => false,
                    };
                if ok {
                    let [pml4, pdpt] = got;
                    self.frames = self.frames.saturating_add(2);
                    self.stats.peak_frames = self.stats.peak_frames.max(self.frames);
                    for i in 256..ENTRIES {
                        let e = b.read(self.cfg.host_pml4, i);
                        b.write(pml4, i, e);
                    }
                    b.write(pml4, 0, pdpt | TABLE_FLAGS);
                    if let Some(map) = self.tables.get_mut(fi) {
                        *map = TableMap::EMPTY;
                    }
                    if let Some(s) = self.slots.get_mut(fi) {
                        *s = Some(Slot {
                            gpgdir,
                            pml4,
                            pdpt,
                            last_used: tick,
                            inserted: tick,
                            held: false,
                            pin_stack: None,
                            pin_top: 0,
                            stale: true,
                        });
                    }
                    return Ok(fi);
                }
            }
            // No free slot, or no room for one: reuse a victim (any cached
            // shadow but the current one; the current one only if it is the
            // only one).
            let cur = self.current;
            let victim = self
                .victim(|i| Some(i) != cur)
                .or_else(|| cur.filter(|_| free.is_none()));
            if let Some(v) = victim {
                if free.is_some() {
                    // At the cap with a free slot: give the victim's frames
                    // back and try the free slot again.
                    self.free_slot(b, v);
                    self.stats.evictions = self.stats.evictions.saturating_add(1);
                    continue;
                }
                self.clear_range(b, v, 0, u64::from(self.cfg.kernel_address), false);
                if let Some(s) = self.slot_mut(v) {
                    s.gpgdir = gpgdir;
                    s.inserted = tick;
                    s.held = false;
                    s.stale = true;
                }
                return Ok(v);
            }
            // Only the current shadow is left and there is a free slot but
            // no frames: empty the current one and try once more.
            let before = self.frames;
            if let Some(ci) = cur {
                self.clear_range(b, ci, 0, FOUR_GIB, true);
            }
            if self.frames == before {
                return Err(OutOfFrames.into());
            }
            self.stats.evictions = self.stats.evictions.saturating_add(1);
        }
    }

    /// Makes sure the stack is present and writable in the current shadow.
    /// Returns whether it had to (re-)pin.
    #[inline]
    fn ensure_pinned<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
    ) -> Result<bool, Kill> {
        // The common case (after nearly every call): nothing to do.
        match self.current.and_then(|ci| self.slots.get(ci)) {
            Some(Some(s)) if !self.pinned(s) && self.stack.is_some() => self.pin_current(mem, b),
            _ => Ok(false),
        }
    }

    /// [`ensure_pinned`](Self::ensure_pinned) when the current shadow is
    /// not pinned: the pinning itself, out of line.
    #[inline(never)]
    fn pin_current<B: ShadowBackend>(
        &mut self,
        mem: &mut impl GuestMemory,
        b: &mut B,
    ) -> Result<bool, Kill> {
        let (Some(ci), Some(st)) = (self.current, self.stack) else {
            return Ok(false);
        };
        if self.slot(ci).is_none_or(|s| self.pinned(s)) {
            return Ok(false);
        }
        // A fill may have to empty the current shadow (dropping pages pinned
        // a moment ago), which clears `pinned`: then go round once more. The
        // cap leaves room for the whole stack in an emptied shadow.
        for _ in 0..2 {
            if let Some(s) = self.slot_mut(ci) {
                s.held = true;
                s.pin_stack = Some(st);
            }
            let mut filled = false;
            let mut top = 0;
            for (i, va) in st.pages().enumerate() {
                // Already present and writable in this shadow (a writable
                // shadow leaf is only ever made from a guest entry with
                // ACCESSED and DIRTY set, and every change of that entry
                // reaches the shadow through `SET_PTE` or a flush): a fill
                // would change nothing. Linux re-pins at every context
                // switch, mostly stacks pinned before.
                let present_rw = PAGE_PRESENT | PAGE_RW;
                let leaf = self.leaf_of(b, ci, va);
                if let Some(e) = leaf.filter(|e| e & present_rw == present_rw) {
                    if i == 0 {
                        top = e;
                    }
                    continue;
                }
                filled = true;
                match self.fill(mem, b, ci, va, Access::KERNEL_WRITE) {
                    Ok(()) => {}
                    Err(FillError::Guest { .. }) => {
                        return Err(Kill::new(format_args!("bad stack page {va:#x}")));
                    }
                    Err(FillError::Kill(k)) => return Err(k),
                }
            }
            if self.slot(ci).is_some_and(|s| self.pinned(s)) {
                if filled {
                    top = self.leaf_of(b, ci, st.top()).unwrap_or(0);
                }
                if let Some(s) = self.slot_mut(ci) {
                    s.pin_top = top;
                }
                return Ok(true);
            }
        }
        Err(OutOfFrames.into())
    }

    // ----------------------------------------------------------------------
    // Tables.

    /// The shadow leaf for `vaddr` in slot `si`, if its PT exists.
    #[inline]
    fn leaf_of<B: ShadowBackend>(&self, b: &B, si: usize, vaddr: u32) -> Option<u64> {
        let s = self.slots.get(si)?.as_ref()?;
        let pt = self.pt_of(b, s, vaddr)?;
        Some(b.read(pt, pt_index(vaddr)))
    }

    /// The shadow PT covering `vaddr` in `s`, if there is one.
    fn pt_of<B: ShadowBackend>(&self, b: &B, s: &Slot, vaddr: u32) -> Option<u64> {
        self.pde_of(b, s, vaddr).map(|(_, pde)| pde & ADDR_MASK)
    }

    /// The PD and the present PD entry covering `vaddr` in `s`, if its PT
    /// exists.
    #[inline]
    fn pde_of<B: ShadowBackend>(&self, b: &B, s: &Slot, vaddr: u32) -> Option<(u64, u64)> {
        let pdpte = b.read(s.pdpt, gib_index(vaddr));
        if pdpte & PAGE_PRESENT == 0 {
            return None;
        }
        let pd = pdpte & ADDR_MASK;
        let pde = b.read(pd, pd_index(vaddr));
        (pde & PAGE_PRESENT != 0).then_some((pd, pde))
    }

    /// Records that slot `si` lost entries: the loaded shadow owes `f`, any
    /// other one is stale for its next switch.
    fn touched(&mut self, si: usize, f: Flush) {
        if self.current == Some(si) {
            self.pending = self.pending.merge(f);
        } else if let Some(s) = self.slot_mut(si) {
            s.stale = true;
        }
    }

    /// Drops every shadow page table covering `[lo, hi)` (2 MiB multiples
    /// within 4 GiB) in slot `si`, freeing the frames; with `drop_pds` also
    /// the PDs of the GiBs the range covers whole. Only the tables the
    /// slot's [`TableMap`] names are visited, so a flush costs what the
    /// shadow holds, not what the range spans. Without `drop_pds` the PDs
    /// stay, emptied, for the next fill (a user-half flush does not free
    /// and zero them again each time).
    fn clear_range<B: ShadowBackend>(
        &mut self,
        b: &mut B,
        si: usize,
        lo: u64,
        hi: u64,
        drop_pds: bool,
    ) {
        let Some(pdpt) = self.slot(si).map(|s| s.pdpt) else {
            return;
        };
        let Some(map) = self.tables.get_mut(si) else {
            return;
        };
        // The PD of each GiB, read when first needed.
        let mut pds: [Option<Option<u64>>; 4] = [None; 4];
        let mut pd_of = |b: &B, gi: usize| {
            let slot = pds.get_mut(gi)?;
            *slot.get_or_insert_with(|| {
                let pdpte = b.read(pdpt, gi);
                (pdpte & PAGE_PRESENT != 0).then_some(pdpte & ADDR_MASK)
            })
        };
        let mut freed = 0usize;
        map.take_range(lo, hi, |region| {
            let (gi, di) = (region >> 9, region & 0x1FF);
            let Some(pd) = pd_of(b, gi) else {
                return;
            };
            let pde = b.read(pd, di);
            if pde & PAGE_PRESENT != 0 {
                b.write(pd, di, 0);
                b.free_table_chunks(pde & ADDR_MASK, pde_chunks(pde));
                freed = freed.saturating_add(1);
            }
        });
        if drop_pds {
            for gi in 0..4 {
                // gi < 4: no overflow.
                let g_lo = (gi as u64) << 30;
                if lo <= g_lo
                    && hi >= g_lo.wrapping_add(GIB)
                    && let Some(pd) = pd_of(b, gi)
                {
                    b.write(pdpt, gi, 0);
                    b.free_table(pd);
                    freed = freed.saturating_add(1);
                }
            }
        }
        if freed > 0 {
            self.frames = self.frames.saturating_sub(freed);
            self.touched(si, Flush::All);
            if let Some(s) = self.slot_mut(si)
                && s.pin_stack.is_some_and(|st| st.overlaps(lo, hi))
            {
                s.held = false;
            }
        }
    }

    /// Frees slot `si` entirely (never the loaded one: callers make sure).
    fn free_slot<B: ShadowBackend>(&mut self, b: &mut B, si: usize) {
        self.clear_range(b, si, 0, FOUR_GIB, true);
        if let Some(s) = self.slots.get_mut(si).and_then(Option::take) {
            b.free_table(s.pml4);
            b.free_table(s.pdpt);
            self.frames = self.frames.saturating_sub(2);
        }
        if self.current == Some(si) {
            self.current = None;
        }
    }
}

/// PDPT index of `vaddr` (0–3).
/// The flags of a shadow PD entry under guest rights `upper` (the guest
/// level above the leaf): present, accessed, and its RW and USER.
#[inline]
fn pde_flags(upper: Perms) -> u64 {
    let mut f = PageFlags::PRESENT.bits() | PageFlags::ACCESSED.bits();
    if upper.write {
        f |= PageFlags::WRITABLE.bits();
    }
    if upper.user {
        f |= PageFlags::USER.bits();
    }
    f
}

const fn gib_index(vaddr: u32) -> usize {
    (vaddr >> 30) as usize
}

/// PD index of `vaddr`.
const fn pd_index(vaddr: u32) -> usize {
    ((vaddr >> 21) & 0x1FF) as usize
}

/// PT index of `vaddr`.
const fn pt_index(vaddr: u32) -> usize {
    ((vaddr >> 12) & 0x1FF) as usize
}

#[cfg(test)]
pub(crate) mod tests;
