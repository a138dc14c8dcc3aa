//! The guest's own page tables, built and changed the way Linux's lguest
//! paravirt ops do it, in either 32-bit format.
//!
//! # Formats
//!
//! [`Format::TwoLevel`] (PGD 1024 × u32 → PTE 1024 × u32) or
//! [`Format::Pae`] (PDPT 4 × u64 → PMD 512 × u64 → PTE 512 × u64), chosen
//! once by the module command line (`paging=2level` or `paging=pae`, the word
//! the hypervisor reads too; [`Format::from_boot`]) and fixed for the guest's
//! life. Every table is a whole frame (a PDPT too, so it is 32-byte aligned).
//!
//! # Layout of every address space
//!
//! | virtual | maps | flags |
//! |---|---|---|
//! | `0x1000 .. image end` | the guest image 1:1 (code, statics, boot stack, `lguest_data`) and the command line | kernel, RW |
//! | [`USER_START`] `..` [`USER_END`] | the address space's own user mappings | as mapped |
//! | [`PAGE_OFFSET`] `+ x` | guest-physical `x`, for all RAM up to [`DIRECT_MAP_MAX`] (Linux's direct map) | kernel, RW, global |
//! | [`KWINDOW`] `..` | [`KWINDOW_PAGES`] pages mapped at run time ([`set_kernel_pte`]), like `vmalloc` | kernel |
//!
//! **Why the image stays mapped low.** Our guests are linked and loaded at
//! 0x400000 with absolute addresses (`relocation-model=static`), and start
//! in the host's linear mode (virtual = physical). Linux links its kernel at
//! `PAGE_OFFSET` and jumps high right after its first `cr3` write; we instead
//! keep the image's identity mapping in *every* address space, so EIP, ESP,
//! every static and `lguest_data` keep their addresses across the first
//! `LHCALL_NEW_PGTABLE` and nothing has to move in any particular order.
//! The identity mapping lies below `kernel_address`, so the host treats it as
//! per-address-space (it refills it on demand after a user flush); that is
//! correct, just not shared. Everything else the kernel touches goes through
//! the high alias: page tables and frames ([`kva`]), the `LHCALL_SET_STACK`
//! kernel stack of [`process`](crate::process), and the kernel window.
//! `lguest_data.kernel_address` is [`PAGE_OFFSET`] (set with
//! [`entry!`](crate::entry) before INIT, when the host reads it).
//!
//! # Telling the host (Linux's lguest paravirt ops)
//!
//! | guest action | hypercall |
//! |---|---|
//! | set a PTE of address space `top` (`set_pte_at`) | `LHCALL_SET_PTE(top, vaddr, low, high)` (2-level: high 0) |
//! | set a 2-level PGD entry (`set_pmd`) | `LHCALL_SET_PGD(pgd page, index)` |
//! | set a PAE PDPT entry (`set_pud`) | `LHCALL_SET_PGD(pdpt, index)` |
//! | set a PAE PMD entry (`set_pmd`) | `LHCALL_SET_PMD(pmd page, index)` |
//! | flush one page (`flush_tlb_single`) | `LHCALL_SET_PTE(current top, vaddr, 0)` |
//! | flush user / everything | `LHCALL_FLUSH_TLB(0)` / `LHCALL_FLUSH_TLB(1)` |
//! | load `cr3` | `LHCALL_NEW_PGTABLE(top)` |
//!
//! Inside [`lazy`] the updates go through the async ring and are flushed at
//! the end, as in Linux's lazy MMU mode.
//!
//! # Page faults
//!
//! [`init`] installs the #PF handler: it reads the address from
//! `lguest_data.cr2` and offers the fault to the guest's hook
//! ([`set_fault_hook`]: demand paging, copy-on-write, ...), then to a
//! running [`probe_read`]/[`probe_write`], then (from user mode) kills the
//! current process; anything else panics.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use guest_abi::hcall::{
    LHCALL_FLUSH_TLB, LHCALL_NEW_PGTABLE, LHCALL_SET_PGD, LHCALL_SET_PMD, LHCALL_SET_PTE,
};
pub use guest_abi::paging::*;

use crate::sync::IrqCell;
use crate::trap::TrapFrame;
use crate::{BootInfo, hcall, irq};

/// Guest page size.
pub const PAGE_SIZE: u32 = guest_abi::PAGE_SIZE;
/// Software bit 9: the mapping owns its frame (freed on unmap and destroy).
pub const PTE_OWNED: u64 = 1 << 9;
/// Software bit 10: copy-on-write (a read-only shared page; a write fault
/// copies).
pub const PTE_COW: u64 = 1 << 10;
const _: () = assert!((PTE_OWNED | PTE_COW) & !PAGE_SOFTWARE == 0);

/// Address bits below a 2-level PGD index.
const PGDIR_SHIFT_2LEVEL: u32 = TWO_LEVEL_PGD_SPAN.trailing_zeros();
/// Address bits below a PAE PDPT index.
const PGDIR_SHIFT_PAE: u32 = PAE_PDPT_SPAN.trailing_zeros();
/// Address bits below a PAE PMD index.
const PMD_SHIFT_PAE: u32 = PAE_PMD_SPAN.trailing_zeros();
/// First user virtual address (PDPT slot 1 in PAE, PGD slot 256 in 2-level).
pub const USER_START: u32 = 0x4000_0000;
/// End of the user part (= `kernel_address`).
pub const USER_END: u32 = PAGE_OFFSET;
/// The kernel window: kernel virtual pages mapped at run time, with page
/// tables shared by every address space.
pub const KWINDOW: u32 = 0xF000_0000;
/// Pages in the kernel window (one PAE page table).
pub const KWINDOW_PAGES: u32 = 512;
/// Most guest RAM the direct map at [`PAGE_OFFSET`] covers (it ends at
/// [`KWINDOW`]); the frame allocator hands out nothing above it.
pub const DIRECT_MAP_MAX: u32 = KWINDOW - PAGE_OFFSET;

/// The page-table format, fixed for the guest's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Non-PAE: PGD 1024 × u32 → PTE 1024 × u32.
    TwoLevel,
    /// PAE: PDPT 4 × u64 → PMD 512 × u64 → PTE 512 × u64.
    Pae,
}

impl Format {
    /// The format the module command line asks for: `paging=2level` or
    /// `paging=pae`; without the word, 2-level (`Ok((format, false))` says
    /// it was a default).
    ///
    /// # Errors
    ///
    /// Any other value of `paging=`.
    pub fn from_boot(boot: &BootInfo) -> Result<(Format, bool), &'static str> {
        match boot.arg(PAGING_ARG) {
            None => Ok((Format::TwoLevel, false)),
            Some(PAGING_2LEVEL) => Ok((Format::TwoLevel, true)),
            Some(PAGING_PAE) => Ok((Format::Pae, true)),
            Some(_) => Err("paging= must be 2level or pae"),
        }
    }

    /// The command-line value: `"2level"` or `"pae"`.
    pub const fn name(self) -> &'static str {
        match self {
            Format::TwoLevel => PAGING_2LEVEL,
            Format::Pae => PAGING_PAE,
        }
    }

    /// Bytes per entry.
    const fn entry_size(self) -> u32 {
        match self {
            Format::TwoLevel => 4,
            Format::Pae => 8,
        }
    }

    /// Mask of the frame address in an entry.
    pub const fn frame_mask(self) -> u64 {
        match self {
            Format::TwoLevel => PAGE_ADDR_MASK_2LEVEL,
            Format::Pae => PAGE_ADDR_MASK,
        }
    }

    /// Index of `va` in the top-level table.
    pub const fn top_index(self, va: u32) -> u32 {
        match self {
            Format::TwoLevel => va >> PGDIR_SHIFT_2LEVEL,
            Format::Pae => va >> PGDIR_SHIFT_PAE,
        }
    }

    /// Index of `va` in its page table.
    pub const fn pte_index(self, va: u32) -> u32 {
        match self {
            Format::TwoLevel => (va >> 12) & (TWO_LEVEL_ENTRIES - 1),
            Format::Pae => (va >> 12) & (PAE_ENTRIES - 1),
        }
    }

    /// Top-level indices of the user part `[USER_START, USER_END)`.
    const fn user_top_range(self) -> core::ops::Range<u32> {
        self.top_index(USER_START)..self.top_index(USER_END)
    }
}

const FMT_NONE: u8 = 0;
const FMT_2LEVEL: u8 = 1;
const FMT_PAE: u8 = 2;

static FORMAT: AtomicU8 = AtomicU8::new(FMT_NONE);
static PAGING_ON: AtomicBool = AtomicBool::new(false);
static KERNEL_TOP: AtomicU32 = AtomicU32::new(0);
static CURRENT_TOP: AtomicU32 = AtomicU32::new(0);
static LAZY: AtomicBool = AtomicBool::new(false);

/// The format chosen at [`init`].
///
/// # Panics
///
/// Before [`init`].
pub fn format() -> Format {
    match FORMAT.load(Ordering::Relaxed) {
        FMT_2LEVEL => Format::TwoLevel,
        FMT_PAE => Format::Pae,
        _ => panic!("paging::init has not run"),
    }
}

/// Whether the guest runs on its own page tables (after [`init`]).
pub fn enabled() -> bool {
    PAGING_ON.load(Ordering::Relaxed)
}

/// The kernel virtual address of guest-physical `pa`: `PAGE_OFFSET + pa`
/// once paging is on, `pa` itself in the host's linear mode before.
pub fn kva(pa: u32) -> u32 {
    if enabled() { PAGE_OFFSET + pa } else { pa }
}

/// [`kva`] as a pointer.
fn kptr<T>(pa: u32) -> *mut T {
    core::ptr::with_exposed_provenance_mut(kva(pa) as usize)
}

/// Guest-physical address of the page table the guest last loaded
/// (`LHCALL_NEW_PGTABLE`).
pub fn current_top() -> u32 {
    CURRENT_TOP.load(Ordering::Relaxed)
}

/// Guest-physical address of the kernel's own top-level table (Linux's
/// `swapper_pg_dir`), loaded by [`init`].
pub fn kernel_top() -> u32 {
    KERNEL_TOP.load(Ordering::Relaxed)
}

// ---- Frame allocator ----------------------------------------------------------

const MAX_FRAMES: usize = (DIRECT_MAP_MAX / PAGE_SIZE) as usize;

/// A bitmap of the free frames in `[first, end)` (bit set = free).
struct Frames {
    bits: [u32; MAX_FRAMES / 32],
    first: u32,
    end: u32,
    next: u32,
    free: u32,
}

static FRAMES: IrqCell<Frames> = IrqCell::new(Frames {
    bits: [0; MAX_FRAMES / 32],
    first: 0,
    end: 0,
    next: 0,
    free: 0,
});

impl Frames {
    fn is_free(&self, pfn: u32) -> bool {
        self.bits[(pfn / 32) as usize] & (1 << (pfn % 32)) != 0
    }

    fn set(&mut self, pfn: u32, free: bool) {
        let w = &mut self.bits[(pfn / 32) as usize];
        if free {
            *w |= 1 << (pfn % 32);
        } else {
            *w &= !(1 << (pfn % 32));
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if self.free == 0 {
            return None;
        }
        let n = self.end - self.first;
        for i in 0..n {
            let pfn = self.first + (self.next - self.first + i) % n;
            if self.is_free(pfn) {
                self.set(pfn, false);
                self.free -= 1;
                self.next = if pfn + 1 == self.end {
                    self.first
                } else {
                    pfn + 1
                };
                return Some(pfn);
            }
        }
        None
    }
}

/// Allocate a zeroed frame; its guest-physical address, or `None` when
/// guest memory is exhausted.
pub fn alloc_frame() -> Option<u32> {
    let pfn = FRAMES.with(|f| f.alloc())?;
    let pa = pfn * PAGE_SIZE;
    // SAFETY: the frame was free, so nothing else uses it; it lies in RAM,
    // which kva maps (identity before paging, the direct map after).
    unsafe { kptr::<u8>(pa).write_bytes(0, PAGE_SIZE as usize) };
    Some(pa)
}

/// Give a frame from [`alloc_frame`] back.
///
/// # Panics
///
/// If `pa` is not an allocated frame of the pool (a double free).
pub fn free_frame(pa: u32) {
    let pfn = pa / PAGE_SIZE;
    FRAMES.with(|f| {
        assert!(
            pa.is_multiple_of(PAGE_SIZE) && (f.first..f.end).contains(&pfn) && !f.is_free(pfn),
            "free_frame({pa:#x}): not an allocated frame"
        );
        f.set(pfn, true);
        f.free += 1;
    });
}

/// Number of free frames in the pool.
pub fn free_frames() -> u32 {
    FRAMES.with(|f| f.free)
}

/// The pool `[first, end)` of guest-physical addresses the allocator manages.
pub fn frame_pool() -> (u32, u32) {
    FRAMES.with(|f| (f.first * PAGE_SIZE, f.end * PAGE_SIZE))
}

// ---- Entries --------------------------------------------------------------------

/// Read entry `idx` of the table at guest-physical `table`.
///
/// # Panics
///
/// If `idx` is out of the table.
pub fn read_entry(table: u32, idx: u32) -> u64 {
    let size = format().entry_size();
    assert!(idx < PAGE_SIZE / size, "entry index {idx} out of the table");
    let p = kptr::<u32>(table + idx * size);
    // SAFETY: `table` is a table frame in RAM (mapped by kva) and the entry
    // lies inside it; volatile because the host writes A/D bits.
    let low = unsafe { p.read_volatile() };
    if size == 4 {
        return u64::from(low);
    }
    // SAFETY: as above, the high word of the same 8-byte entry.
    let high = unsafe { p.add(1).read_volatile() };
    u64::from(high) << 32 | u64::from(low)
}

/// Write entry `idx` of the table at guest-physical `table` (no hypercall).
/// PAE entries are written as Linux does: a present entry high word first,
/// a non-present one low word (with the present bit) first, so the host and
/// the CPU never see a present half-written entry.
///
/// # Safety
///
/// `table` must be a page table of this guest's (the caller answers for what
/// the new entry maps: the tables of the running code must keep mapping it).
pub unsafe fn write_entry(table: u32, idx: u32, value: u64) {
    let size = format().entry_size();
    assert!(idx < PAGE_SIZE / size, "entry index {idx} out of the table");
    let p = kptr::<u32>(table + idx * size);
    let (low, high) = (value as u32, (value >> 32) as u32);
    // SAFETY: the entry lies inside the table frame (checked), which kva
    // maps; the caller vouches for the table.
    unsafe {
        if size == 4 {
            p.write_volatile(low);
        } else if value & PAGE_PRESENT != 0 {
            p.add(1).write_volatile(high);
            p.write_volatile(low);
        } else {
            p.write_volatile(low);
            p.add(1).write_volatile(high);
        }
    }
}

/// A page-table hypercall, queued in the async ring inside [`lazy`].
fn pt_hcall(nr: u32, a1: u32, a2: u32, a3: u32, a4: u32) {
    // SAFETY: page-table updates the guest's tables already reflect; they
    // keep the kernel (image, direct map) mapped, which every table does.
    unsafe {
        if LAZY.load(Ordering::Relaxed) {
            hcall::async_hcall(nr, a1, a2, a3, a4);
        } else {
            hcall::hcall(nr, a1, a2, a3, a4);
        }
    }
}

/// `LHCALL_SET_PTE(top, va, low, high)`: tell the host that the PTE of `va`
/// in the address space `top` is now `entry`.
pub fn notify_pte(top: u32, va: u32, entry: u64) {
    let high = match format() {
        Format::TwoLevel => 0,
        Format::Pae => (entry >> 32) as u32,
    };
    pt_hcall(LHCALL_SET_PTE, top, va, entry as u32, high);
}

/// Run `f` in lazy MMU mode: page-table hypercalls go through the async
/// ring and are flushed (`LHCALL_FLUSH_ASYNC`) when `f` returns.
pub fn lazy<R>(f: impl FnOnce() -> R) -> R {
    let was = LAZY.swap(true, Ordering::Relaxed);
    let r = f();
    LAZY.store(was, Ordering::Relaxed);
    if !was {
        hcall::flush_async();
    }
    r
}

/// `LHCALL_FLUSH_TLB(0)`: the host forgets the user part of the current
/// address space (below `kernel_address`) and re-reads it from the tables.
pub fn flush_tlb_user() {
    pt_hcall(LHCALL_FLUSH_TLB, 0, 0, 0, 0);
}

/// `LHCALL_FLUSH_TLB(1)`: the host forgets every mapping of every address
/// space, kernel ones included.
pub fn flush_tlb_all() {
    pt_hcall(LHCALL_FLUSH_TLB, 1, 0, 0, 0);
}

/// Linux's `flush_tlb_single(va)`: `LHCALL_SET_PTE(current top, va, 0)`.
pub fn flush_tlb_one(va: u32) {
    pt_hcall(LHCALL_SET_PTE, current_top(), va, 0, 0);
}

// ---- Walking ----------------------------------------------------------------------

/// Why a mapping could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No free frame for a page table.
    NoMemory,
    /// The address is outside the range this call may map.
    BadAddress,
}

/// The page table holding `va`'s PTE under `top` and the index in it. With
/// `create`, missing tables are allocated and hooked in with `dir_flags`
/// (PAE PDPT entries get `PAGE_PRESENT` only), and, with `notify`, the host
/// is told about each new directory entry.
fn walk(
    top: u32,
    va: u32,
    create: bool,
    dir_flags: u64,
    notify: bool,
) -> Result<Option<(u32, u32)>, MapError> {
    let fmt = format();
    let mask = fmt.frame_mask();
    // One directory level: the table the entry `idx` of `dir` points at.
    let level = |dir: u32, idx: u32, flags: u64, pdpt: bool| -> Result<Option<u32>, MapError> {
        let e = read_entry(dir, idx);
        if e & PAGE_PRESENT != 0 {
            return Ok(Some((e & mask) as u32));
        }
        if !create {
            return Ok(None);
        }
        let t = alloc_frame().ok_or(MapError::NoMemory)?;
        // SAFETY: `dir` is a directory of ours and the slot was empty, so
        // nothing the running code uses changes.
        unsafe { write_entry(dir, idx, u64::from(t) | flags) };
        if notify {
            match (fmt, pdpt) {
                (Format::TwoLevel, _) | (Format::Pae, true) => {
                    pt_hcall(LHCALL_SET_PGD, dir, idx, 0, 0)
                }
                (Format::Pae, false) => pt_hcall(LHCALL_SET_PMD, dir, idx, 0, 0),
            }
        }
        Ok(Some(t))
    };
    let pt = match fmt {
        Format::TwoLevel => level(top, fmt.top_index(va), dir_flags, false)?,
        Format::Pae => match level(top, fmt.top_index(va), PAGE_PRESENT, true)? {
            Some(pmd) => level(
                pmd,
                (va >> PMD_SHIFT_PAE) & (PAE_ENTRIES - 1),
                dir_flags,
                false,
            )?,
            None => None,
        },
    };
    Ok(pt.map(|pt| (pt, fmt.pte_index(va))))
}

// ---- The kernel's tables ------------------------------------------------------------

unsafe extern "C" {
    /// End of the guest image (page-aligned), from `guests/guest.ld`.
    static __guest_end: u8;
}

/// Map one kernel page in the kernel tables (before paging is on).
fn map_kernel_early(top: u32, va: u32, pa: u32, flags: u64) {
    let Ok(Some((pt, idx))) = walk(top, va, true, KERNPG_TABLE, false) else {
        panic!("paging::init: out of frames for the kernel's tables");
    };
    // SAFETY: the kernel's tables are not loaded yet.
    unsafe { write_entry(pt, idx, u64::from(pa) | flags) };
}

/// What [`init`] set up.
#[derive(Debug, Clone, Copy)]
pub struct KernelMap {
    /// The format.
    pub format: Format,
    /// End of the identity-mapped guest image.
    pub image_end: u32,
    /// RAM the direct map covers (`[0, mem)` at `PAGE_OFFSET`).
    pub mem: u32,
    /// Frames used by the kernel's own tables.
    pub table_frames: u32,
}

/// Build the kernel's page tables in `format`, load them with the first
/// `LHCALL_NEW_PGTABLE` (which ends the host's linear mode) and install the
/// page-fault handler.
///
/// The guest must have been started with `kernel_address` = [`PAGE_OFFSET`]
/// ([`entry!`](crate::entry)).
///
/// # Panics
///
/// If called twice, or if RAM is too small for the tables.
pub fn init(boot: &BootInfo, format: Format) -> KernelMap {
    let code = match format {
        Format::TwoLevel => FMT_2LEVEL,
        Format::Pae => FMT_PAE,
    };
    assert!(
        FORMAT.swap(code, Ordering::Relaxed) == FMT_NONE,
        "paging::init called twice"
    );
    let mem = boot.mem_bytes.min(u64::from(DIRECT_MAP_MAX)) as u32 & !(PAGE_SIZE - 1);
    let image_end = hcall::phys(&raw const __guest_end).next_multiple_of(PAGE_SIZE);
    assert!(image_end < mem, "no RAM above the guest image");
    FRAMES.with(|f| {
        f.first = image_end / PAGE_SIZE;
        f.end = mem / PAGE_SIZE;
        f.next = f.first;
        f.free = f.end - f.first;
        for pfn in f.first..f.end {
            f.set(pfn, true);
        }
    });
    let before = free_frames();
    let top = alloc_frame().expect("a frame for the kernel's top-level table");
    if format == Format::Pae {
        // PDPT slot 0 (identity) and 3 (direct map, window): kernel PMDs
        // shared by every address space.
        for slot in [0, 3] {
            let pmd = alloc_frame().expect("a frame for a kernel PMD");
            // SAFETY: not loaded yet.
            unsafe { write_entry(top, slot, u64::from(pmd) | PAGE_PRESENT) };
        }
    }
    let kflags = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_DIRTY;
    for pa in (PAGE_SIZE..image_end).step_by(PAGE_SIZE as usize) {
        map_kernel_early(top, pa, pa, kflags);
    }
    for pa in (0..mem).step_by(PAGE_SIZE as usize) {
        map_kernel_early(top, PAGE_OFFSET + pa, pa, kflags | PAGE_GLOBAL);
    }
    // The window's page table(s), empty: shared by every address space.
    for va in (KWINDOW..KWINDOW + KWINDOW_PAGES * PAGE_SIZE).step_by(PAGE_SIZE as usize) {
        let _ = walk(top, va, true, KERNPG_TABLE, false);
    }
    let table_frames = before - free_frames();
    KERNEL_TOP.store(top, Ordering::Relaxed);
    // SAFETY: the new tables map the whole image 1:1 (code, statics, stacks,
    // lguest_data, the console buffer), exactly where linear mode had them.
    unsafe { hcall::new_pgtable(top) };
    CURRENT_TOP.store(top, Ordering::Relaxed);
    PAGING_ON.store(true, Ordering::Relaxed);
    crate::trap::set_handler(guest_abi::trap::PF, Some(page_fault));
    KernelMap {
        format,
        image_end,
        mem,
        table_frames,
    }
}

/// Load the kernel's own tables (`LHCALL_NEW_PGTABLE(kernel_top())`).
pub fn switch_to_kernel() {
    pt_hcall(LHCALL_NEW_PGTABLE, kernel_top(), 0, 0, 0);
    CURRENT_TOP.store(kernel_top(), Ordering::Relaxed);
}

/// Where the PTE of kernel-window address `va` lives: (table, index).
///
/// # Panics
///
/// If `va` is outside the window.
pub fn kernel_pte_location(va: u32) -> (u32, u32) {
    assert!(
        (KWINDOW..KWINDOW + KWINDOW_PAGES * PAGE_SIZE).contains(&va),
        "{va:#x} is not in the kernel window"
    );
    match walk(kernel_top(), va, false, 0, false) {
        Ok(Some(loc)) => loc,
        _ => unreachable!("the window's tables are made by init"),
    }
}

/// Set the PTE of kernel-window page `va` to `entry` and tell the host
/// (`LHCALL_SET_PTE` with the current top: `va` is above `kernel_address`,
/// so the host must update every address space's view).
pub fn set_kernel_pte(va: u32, entry: u64) {
    let (pt, idx) = kernel_pte_location(va);
    // SAFETY: the window holds no mapping the running code relies on.
    unsafe { write_entry(pt, idx, entry) };
    notify_pte(current_top(), va, entry);
}

/// The PTE of kernel-window page `va`.
pub fn kernel_pte(va: u32) -> u64 {
    let (pt, idx) = kernel_pte_location(va);
    read_entry(pt, idx)
}

// ---- Address spaces -------------------------------------------------------------------

/// A user address space: its own top-level table, sharing the kernel's
/// mappings, with user mappings in `[USER_START, USER_END)`. Its frames
/// come back with [`destroy`](Self::destroy); dropping it leaks them.
#[derive(Debug, PartialEq, Eq)]
pub struct AddressSpace {
    top: u32,
}

impl AddressSpace {
    /// A new address space with the kernel's mappings and no user ones
    /// (Linux's `pgd_alloc`), or `None` when out of frames.
    pub fn new() -> Option<Self> {
        let fmt = format();
        let top = alloc_frame()?;
        let k = kernel_top();
        let user = fmt.user_top_range();
        let slots = match fmt {
            Format::TwoLevel => TWO_LEVEL_ENTRIES,
            Format::Pae => PAE_PDPT_ENTRIES,
        };
        for i in (0..slots).filter(|i| !user.contains(i)) {
            let e = read_entry(k, i);
            if e != 0 {
                // SAFETY: a fresh table nobody has loaded yet.
                unsafe { write_entry(top, i, e) };
            }
        }
        Some(Self { top })
    }

    /// Guest-physical address of the top-level table (the `cr3` value).
    pub fn top(&self) -> u32 {
        self.top
    }

    /// Whether this is the address space the guest last loaded.
    pub fn is_current(&self) -> bool {
        current_top() == self.top
    }

    /// Load it (`LHCALL_NEW_PGTABLE`).
    pub fn switch_to(&self) {
        pt_hcall(LHCALL_NEW_PGTABLE, self.top, 0, 0, 0);
        CURRENT_TOP.store(self.top, Ordering::Relaxed);
    }

    fn check_user(va: u32) -> Result<(), MapError> {
        if (USER_START..USER_END).contains(&va) {
            Ok(())
        } else {
            Err(MapError::BadAddress)
        }
    }

    /// Where the PTE of user address `va` lives: (page table, index), or
    /// `None` if no page table covers it yet.
    pub fn pte_location(&self, va: u32) -> Option<(u32, u32)> {
        Self::check_user(va).ok()?;
        walk(self.top, va, false, 0, false).ok().flatten()
    }

    /// The PTE of user address `va` (0 if there is no page table).
    pub fn entry(&self, va: u32) -> u64 {
        self.pte_location(va)
            .map_or(0, |(pt, idx)| read_entry(pt, idx))
    }

    /// The guest-physical address `va` maps to, if it is present.
    pub fn translate(&self, va: u32) -> Option<u32> {
        let e = self.entry(va);
        (e & PAGE_PRESENT != 0).then(|| (e & format().frame_mask()) as u32 | (va & 0xFFF))
    }

    /// Set the PTE of user page `va` to `entry` (frame and flags) and tell
    /// the host (`LHCALL_SET_PTE`), creating page tables as needed
    /// (`LHCALL_SET_PGD`/`LHCALL_SET_PMD`). The old entry's frame is not
    /// freed.
    ///
    /// # Errors
    ///
    /// `va` outside the user part, or no frame for a page table.
    pub fn set_pte(&self, va: u32, entry: u64) -> Result<u64, MapError> {
        Self::check_user(va)?;
        let va = va & !(PAGE_SIZE - 1);
        let Some((pt, idx)) = walk(self.top, va, true, PAGE_TABLE, true)? else {
            unreachable!("walk with create returns a table");
        };
        let old = read_entry(pt, idx);
        // SAFETY: a user mapping of this address space; the kernel never
        // runs from or keeps Rust references into user pages.
        unsafe { write_entry(pt, idx, entry) };
        notify_pte(self.top, va, entry);
        Ok(old)
    }

    /// Map user page `va` to frame `pa` with `flags` (which should include
    /// `PAGE_PRESENT`).
    ///
    /// # Errors
    ///
    /// As for [`set_pte`](Self::set_pte).
    pub fn map(&self, va: u32, pa: u32, flags: u64) -> Result<(), MapError> {
        self.set_pte(va, u64::from(pa & !(PAGE_SIZE - 1)) | flags)
            .map(|_| ())
    }

    /// Map a fresh zeroed frame, owned by the mapping, at `va`; returns it.
    ///
    /// # Errors
    ///
    /// As for [`set_pte`](Self::set_pte).
    pub fn map_new(&self, va: u32, flags: u64) -> Result<u32, MapError> {
        let pa = alloc_frame().ok_or(MapError::NoMemory)?;
        if let Err(e) = self.map(va, pa, flags | PTE_OWNED) {
            free_frame(pa);
            return Err(e);
        }
        Ok(pa)
    }

    /// Remove the mapping of `va` (`LHCALL_SET_PTE` with 0) and free its
    /// frame if the mapping owned it; returns the old entry.
    pub fn unmap(&self, va: u32) -> u64 {
        let va = va & !(PAGE_SIZE - 1);
        let Some((pt, idx)) = self.pte_location(va) else {
            return 0;
        };
        let old = read_entry(pt, idx);
        // SAFETY: a user mapping of this address space.
        unsafe { write_entry(pt, idx, 0) };
        notify_pte(self.top, va, 0);
        if old & (PAGE_PRESENT | PTE_OWNED) == PAGE_PRESENT | PTE_OWNED {
            free_frame((old & format().frame_mask()) as u32);
        }
        old
    }

    /// Free everything: owned frames, user page tables (each emptied
    /// top-level slot announced with `LHCALL_SET_PGD`, in lazy mode), the
    /// top-level table. Returns the number of frames freed.
    ///
    /// # Panics
    ///
    /// If it is the current address space (load another one first).
    pub fn destroy(self) -> u32 {
        assert!(!self.is_current(), "destroying the loaded address space");
        let fmt = format();
        let mask = fmt.frame_mask();
        let mut freed = 0;
        let mut free_pt = |pt: u32| {
            let n = PAGE_SIZE / fmt.entry_size();
            for i in 0..n {
                let e = read_entry(pt, i);
                if e & (PAGE_PRESENT | PTE_OWNED) == PAGE_PRESENT | PTE_OWNED {
                    free_frame((e & mask) as u32);
                    freed += 1;
                }
            }
            free_frame(pt);
            freed += 1;
        };
        lazy(|| {
            for i in fmt.user_top_range() {
                let e = read_entry(self.top, i);
                if e & PAGE_PRESENT == 0 {
                    continue;
                }
                let t = (e & mask) as u32;
                match fmt {
                    Format::TwoLevel => free_pt(t),
                    Format::Pae => {
                        for j in 0..PAE_ENTRIES {
                            let pe = read_entry(t, j);
                            if pe & PAGE_PRESENT != 0 {
                                free_pt((pe & mask) as u32);
                            }
                        }
                        free_pt(t);
                    }
                }
                // SAFETY: a user slot of a table that is not loaded.
                unsafe { write_entry(self.top, i, 0) };
                pt_hcall(LHCALL_SET_PGD, self.top, i, 0, 0);
            }
        });
        // For PAE, `free_pt` on a PMD counted its (non-owned) entries as
        // nothing and the PMD itself once, as for a page table.
        free_frame(self.top);
        freed + 1
    }
}

// ---- Page faults and probes ----------------------------------------------------------

/// A page fault as the guest's handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address (`lguest_data.cr2`).
    pub addr: u32,
    /// The error code: bit 0 present (protection fault), bit 1 write, bit 2
    /// user mode.
    pub error: u32,
    /// The faulting instruction.
    pub eip: u32,
}

/// Error-code bit: the page was present (a protection fault).
pub const PF_PROT: u32 = 1;
/// Error-code bit: a write.
pub const PF_WRITE: u32 = 2;
/// Error-code bit: from user mode.
pub const PF_USER: u32 = 4;

impl Fault {
    /// From user mode.
    pub fn user(&self) -> bool {
        self.error & PF_USER != 0
    }

    /// A write.
    pub fn write(&self) -> bool {
        self.error & PF_WRITE != 0
    }

    /// A protection fault (the page was present).
    pub fn protection(&self) -> bool {
        self.error & PF_PROT != 0
    }
}

/// The guest's page-fault hook: returns `true` if it resolved the fault
/// (the instruction is retried, or the hook changed the frame).
pub type FaultHook = fn(&Fault, &mut TrapFrame) -> bool;

static FAULT_HOOK: IrqCell<Option<FaultHook>> = IrqCell::new(None);

/// Install (or remove) the page-fault hook; returns the previous one.
pub fn set_fault_hook(hook: Option<FaultHook>) -> Option<FaultHook> {
    FAULT_HOOK.with(|h| core::mem::replace(h, hook))
}

static PROBE_FAULTED: AtomicBool = AtomicBool::new(false);
static PROBE_ADDR: AtomicU32 = AtomicU32::new(0);
static PROBE_ERR: AtomicU32 = AtomicU32::new(0);

fn page_fault(f: &mut TrapFrame) {
    let fault = Fault {
        addr: irq::cr2(),
        error: f.error_code,
        eip: f.eip,
    };
    let hook = FAULT_HOOK.try_with(|h| *h).flatten();
    if let Some(h) = hook
        && h(&fault, f)
    {
        return;
    }
    if !f.from_user()
        && let Some(fixup) = probe_fixup(f.eip)
    {
        PROBE_ADDR.store(fault.addr, Ordering::Relaxed);
        PROBE_ERR.store(fault.error, Ordering::Relaxed);
        PROBE_FAULTED.store(true, Ordering::Relaxed);
        f.eip = fixup;
        return;
    }
    if f.from_user() && crate::process::exit_current(f, crate::process::EXIT_SEGV) {
        return;
    }
    panic!(
        "unhandled page fault at {:#x} (error {:#x}, eip {:#x})",
        fault.addr, fault.error, fault.eip
    );
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    fn lguest_rt_probe_read(va: u32) -> u32;
    fn lguest_rt_probe_write(va: u32, value: u32);
    static lguest_rt_probe_read_insn: u8;
    static lguest_rt_probe_write_insn: u8;
    static lguest_rt_probe_fixup: u8;
}

/// Where to continue if `eip` is a probe's access.
fn probe_fixup(eip: u32) -> Option<u32> {
    #[cfg(target_arch = "x86")]
    {
        let insns = [
            hcall::phys(&raw const lguest_rt_probe_read_insn),
            hcall::phys(&raw const lguest_rt_probe_write_insn),
        ];
        insns
            .contains(&eip)
            .then(|| hcall::phys(&raw const lguest_rt_probe_fixup))
    }
    #[cfg(not(target_arch = "x86"))]
    {
        let _ = eip;
        None
    }
}

fn probe_result() -> Result<(), Fault> {
    if PROBE_FAULTED.swap(false, Ordering::Relaxed) {
        Err(Fault {
            addr: PROBE_ADDR.load(Ordering::Relaxed),
            error: PROBE_ERR.load(Ordering::Relaxed),
            eip: 0,
        })
    } else {
        Ok(())
    }
}

/// Read the `u32` at virtual `va` from the kernel; a page fault the hook
/// does not resolve becomes `Err` instead of a panic.
pub fn probe_read(va: u32) -> Result<u32, Fault> {
    PROBE_FAULTED.store(false, Ordering::Relaxed);
    #[cfg(target_arch = "x86")]
    // SAFETY: the probe touches only `va` (through the current page
    // tables, never a Rust object: the guest maps no Rust data at user or
    // window addresses it probes) and a fault resumes at the fixup.
    let v = unsafe { lguest_rt_probe_read(va) };
    #[cfg(not(target_arch = "x86"))]
    let v = va;
    probe_result().map(|()| v)
}

/// Write the `u32` at virtual `va` from the kernel, like [`probe_read`].
pub fn probe_write(va: u32, value: u32) -> Result<(), Fault> {
    PROBE_FAULTED.store(false, Ordering::Relaxed);
    #[cfg(target_arch = "x86")]
    // SAFETY: as for `probe_read`.
    unsafe {
        lguest_rt_probe_write(va, value)
    };
    #[cfg(not(target_arch = "x86"))]
    let _ = (va, value);
    probe_result()
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    // u32 lguest_rt_probe_read(u32 va) and void lguest_rt_probe_write(u32
    // va, u32 value), C ABI. The one access of each is labelled; if it
    // faults and the fault is not resolved, the #PF handler records it and
    // continues at lguest_rt_probe_fixup, a plain `ret` (eax is then
    // whatever it was: the caller looks at the recorded fault instead).
    ".pushsection .text.lguest_rt_probe,\"ax\",@progbits",
    ".globl lguest_rt_probe_read",
    "lguest_rt_probe_read:",
    "mov ecx, dword ptr [esp + 4]",
    "xor eax, eax",
    ".globl lguest_rt_probe_read_insn",
    "lguest_rt_probe_read_insn:",
    "mov eax, dword ptr [ecx]",
    "ret",
    ".globl lguest_rt_probe_write",
    "lguest_rt_probe_write:",
    "mov ecx, dword ptr [esp + 4]",
    "mov edx, dword ptr [esp + 8]",
    ".globl lguest_rt_probe_write_insn",
    "lguest_rt_probe_write_insn:",
    "mov dword ptr [ecx], edx",
    ".globl lguest_rt_probe_fixup",
    "lguest_rt_probe_fixup:",
    "ret",
    ".popsection",
);
