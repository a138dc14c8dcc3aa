//! A guest's memory, its "linear mode" address space, and where its shadow
//! page tables come from.
//!
//! Guest-physical memory is one physically contiguous run of frames, reached
//! by the host through the direct map: 2 MiB-aligned, except for a small
//! guest (at most [`SMALL_GUEST_BYTES`] of RAM), whose run is only 4 KiB
//! aligned so that guests pack tightly (a 2 MiB-aligned 4 MiB guest with
//! its device pages above would waste almost 2 MiB after it). Until the guest turns
//! on its own paging (its first `LHCALL_NEW_PGTABLE`; from then on it runs
//! on shadow page tables, `rustyvisor::lguest::shadow`, whose frames come
//! from [`ShadowFrames`]), its 32-bit linear addresses map 1:1 onto
//! guest-physical memory: `PML4[0]` of the guest's own
//! PML4 covers exactly `[0, mem)` with 2 MiB user pages, and nothing else of
//! the low 4 GiB is mapped. PML4 entries 256–511 are copied from the kernel's
//! PML4 (they never change after boot), so the hypervisor stays mapped — and
//! unreachable for 32-bit code — while the guest runs.
//!
//! Above RAM come the guest's device pages (the lguest bus device page and
//! its rings, `rustyvisor::virtio::bus`): [`GuestRam::with_device_pages`]
//! allocates them in the same run, right after RAM, without rounding them
//! up to 2 MiB, and [`LinearTables`] maps the 2 MiB-aligned bulk with 2 MiB
//! pages and the tail (under 2 MiB) with 4 KiB pages of one page table (a
//! small guest's run that is not 2 MiB-aligned: every 2 MiB with 4 KiB
//! pages, one page table each).
//!
//! Dropping a [`LinearTables`] switches the CPU back to the kernel tables if
//! needed and returns every frame (memory and tables).
//!
//! Every frame taken for a guest (its RAM, its linear tables, its shadow
//! tables) is charged to the guest's [`Ledger`] where it is allocated and
//! credited where it is freed, so "this guest gave back all its memory" is
//! a per-guest fact that holds however many guests run at once.

extern crate alloc;

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use rustyvisor::lguest::guestmem::{GuestMemory, MemFault, check_range};
use rustyvisor::lguest::shadow::ShadowBackend;
use rustyvisor::mm::frame::PhysFrame;
use rustyvisor::mm::paging::PageFlags;
use rustyvisor::mm::{LARGE_PAGE_SIZE, PAGE_SIZE};

use crate::kernel::arch::cpu;
use crate::kernel::mem::{self, phys_to_virt};

/// Largest guest memory we hand out: the `mem=` limit (the linear map uses
/// one PDPT: 4 GiB, minus room for device pages above RAM).
pub const MAX_GUEST_BYTES: u64 = rustyvisor::lguest::spec::MAX_GUEST_MEM;

// The x86 entry bits, from the one tested implementation (`mm::paging`).
const P: u64 = PageFlags::PRESENT.bits();
const RW: u64 = PageFlags::WRITABLE.bits();
const US: u64 = PageFlags::USER.bits();
const PS: u64 = PageFlags::HUGE.bits();

/// Largest RAM of a "small" guest, whose memory is only 4 KiB-aligned (and
/// mapped with 4 KiB pages in linear mode).
pub const SMALL_GUEST_BYTES: u64 = 8 << 20;

/// Page tables a [`LinearTables`] may hold: a small guest's RAM and at most
/// 2 MiB of device pages, one per 2 MiB.
const MAX_PAGE_TABLES: usize = (SMALL_GUEST_BYTES / LARGE_PAGE_SIZE) as usize + 1;

/// Host frames held on behalf of one guest: charged where they are
/// allocated, credited where they are freed. Clones share the count.
#[derive(Clone, Default)]
pub struct Ledger(Arc<AtomicU64>);

impl Ledger {
    fn charge(&self, frames: u64) {
        self.0.fetch_add(frames, Ordering::Relaxed);
    }

    fn credit(&self, frames: u64) {
        self.0.fetch_sub(frames, Ordering::Relaxed);
    }

    /// Frames held now.
    pub fn held(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn zeroed_frame(ledger: &Ledger) -> Option<PhysFrame> {
    let f = mem::alloc_frame()?;
    ledger.charge(1);
    // SAFETY: a freshly allocated frame: nothing else refers to it.
    unsafe { zero_frame(f.start_address()) };
    Some(f)
}

/// Zeroes the 4 KiB frame at physical `frame` through the direct map.
///
/// # Safety
///
/// The caller owns the frame: nothing else reads or writes it meanwhile
/// (a fresh frame, or a table frame no shadow refers to any more).
unsafe fn zero_frame(frame: u64) {
    // SAFETY: the frame lies in the direct map and is the caller's alone
    // (this function's contract).
    unsafe { core::ptr::write_bytes(phys_to_virt(frame) as *mut u8, 0, PAGE_SIZE as usize) };
}

/// Zeroes the 64-entry (512-byte) chunks of the table frame at physical
/// `frame` that `chunks` names (bit `i`: bytes `512 i .. 512 i + 512`); all
/// of them in one go.
///
/// # Safety
///
/// As for [`zero_frame`].
unsafe fn zero_chunks(frame: u64, chunks: u8) {
    if chunks == 0xFF {
        // SAFETY: this function's contract.
        unsafe { zero_frame(frame) };
        return;
    }
    let mut left = chunks;
    while left != 0 {
        let i = u64::from(left.trailing_zeros());
        left &= left - 1;
        // SAFETY: chunk `i < 8` lies inside the frame, which is the
        // caller's alone (this function's contract).
        unsafe { core::ptr::write_bytes(phys_to_virt(frame + i * 512) as *mut u8, 0, 512) };
    }
}

fn write_entry(table: PhysFrame, index: u64, val: u64) {
    // SAFETY: `table` is a page-table frame owned by the caller; index < 512.
    unsafe { (phys_to_virt(table.start_address() + index * 8) as *mut u64).write_volatile(val) }
}

/// Guest RAM: one contiguous run of zeroed frames (2 MiB-aligned unless the
/// guest is small), owned by the launcher. Dropping it returns the frames.
pub struct GuestRam {
    first: PhysFrame,
    /// Frames of RAM (a 2 MiB multiple).
    frames: u64,
    ledger: Ledger,
    /// Frames above RAM (device page and rings).
    device_frames: u64,
}

/// Why guest memory or tables could not be made.
#[derive(Debug, Clone, Copy)]
pub enum SpaceError {
    /// Size 0 or above [`MAX_GUEST_BYTES`].
    BadSize,
    /// Not enough (contiguous) free memory.
    OutOfMemory,
    /// The base handed to the core is not page-aligned direct-map memory
    /// (2 MiB-aligned for more than a small guest's memory).
    BadBase,
}

impl GuestRam {
    /// Allocates `bytes` (rounded up to 2 MiB) of zeroed memory, charged
    /// to `ledger`.
    pub fn new(bytes: u64, ledger: &Ledger) -> Result<Self, SpaceError> {
        Self::with_device_pages(bytes, 0, ledger)
    }

    /// Allocates `bytes` of RAM (rounded up to 2 MiB) plus `device_pages`
    /// 4 KiB pages right above it, all zeroed, in one run, charged to
    /// `ledger`.
    pub fn with_device_pages(
        bytes: u64,
        device_pages: u32,
        ledger: &Ledger,
    ) -> Result<Self, SpaceError> {
        if bytes == 0 || bytes > MAX_GUEST_BYTES {
            return Err(SpaceError::BadSize);
        }
        let bytes = bytes.next_multiple_of(LARGE_PAGE_SIZE);
        let frames = bytes / PAGE_SIZE;
        let device_frames = u64::from(device_pages);
        let total = frames + device_frames;
        let align = if bytes <= SMALL_GUEST_BYTES {
            1
        } else {
            LARGE_PAGE_SIZE / PAGE_SIZE
        };
        let first = mem::alloc_contiguous(total, align).ok_or(SpaceError::OutOfMemory)?;
        // SAFETY: the run was just allocated to this guest; zero it so no
        // previous contents (host or another guest's) leak into it.
        unsafe {
            core::ptr::write_bytes(
                phys_to_virt(first.start_address()) as *mut u8,
                0,
                (total * PAGE_SIZE) as usize,
            )
        };
        ledger.charge(total);
        Ok(Self {
            first,
            frames,
            ledger: ledger.clone(),
            device_frames,
        })
    }

    /// Size of RAM in bytes (what `boot_params` reports).
    pub fn bytes(&self) -> u64 {
        self.frames * PAGE_SIZE
    }

    /// Size of RAM plus device pages in bytes (`pfnlimit << 12`).
    pub fn total_bytes(&self) -> u64 {
        (self.frames + self.device_frames) * PAGE_SIZE
    }

    /// Host (direct-map) address of guest-physical 0: `LHREQ_INITIALIZE.base`.
    pub fn base(&self) -> u64 {
        phys_to_virt(self.first.start_address())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        mem::free_contiguous(self.first, self.frames + self.device_frames);
        self.ledger.credit(self.frames + self.device_frames);
    }
}

/// The linear-mode address space of a guest: its own PML4 with guest memory
/// 1:1 at linear 0 and the hypervisor's upper half shared.
pub struct LinearTables {
    pml4: PhysFrame,
    pdpt: Option<PhysFrame>,
    pds: [Option<PhysFrame>; 4],
    ledger: Ledger,
    /// The 4 KiB page tables: of the tail below a 2 MiB multiple, or of
    /// every 2 MiB of a small guest whose memory is not 2 MiB-aligned.
    pts: [Option<PhysFrame>; MAX_PAGE_TABLES],
}

impl LinearTables {
    /// Builds tables presenting `bytes` of memory whose host (direct-map)
    /// address is `base`, `bytes` a 4 KiB multiple. If `base` is 2 MiB-aligned
    /// the 2 MiB multiple below `bytes` is mapped with 2 MiB pages and the
    /// rest with 4 KiB pages of one page table; else `base` must be 4 KiB
    /// aligned and `bytes` at most a small guest's memory plus 2 MiB, and
    /// every 2 MiB is mapped with 4 KiB pages. The table frames are charged
    /// to `ledger`.
    pub fn new(base: u64, bytes: u64, ledger: &Ledger) -> Result<Self, SpaceError> {
        let phys = base
            .checked_sub(mem::DIRECT_MAP_BASE)
            .filter(|p| p % PAGE_SIZE == 0)
            .ok_or(SpaceError::BadBase)?;
        let aligned = phys % LARGE_PAGE_SIZE == 0;
        if !aligned && bytes > SMALL_GUEST_BYTES + LARGE_PAGE_SIZE {
            return Err(SpaceError::BadBase);
        }
        // RAM up to the `mem=` limit, plus at most 2 MiB of device pages.
        if bytes == 0
            || bytes > MAX_GUEST_BYTES + LARGE_PAGE_SIZE
            || !bytes.is_multiple_of(PAGE_SIZE)
        {
            return Err(SpaceError::BadSize);
        }
        let pml4 = zeroed_frame(ledger).ok_or(SpaceError::OutOfMemory)?;
        // From here on, dropping `t` returns whatever was taken.
        let mut t = Self {
            pml4,
            pdpt: None,
            pds: [None; 4],
            ledger: ledger.clone(),
            pts: [None; MAX_PAGE_TABLES],
        };
        let kernel = mem::kernel_pml4();
        for slot in 256..512u64 {
            // SAFETY: the kernel PML4 is a live page-table frame in the direct map.
            let e = unsafe { (phys_to_virt(kernel + slot * 8) as *const u64).read_volatile() };
            write_entry(pml4, slot, e);
        }
        let pdpt = zeroed_frame(ledger).ok_or(SpaceError::OutOfMemory)?;
        t.pdpt = Some(pdpt);
        write_entry(pml4, 0, pdpt.start_address() | P | RW | US);
        // 2 MiB pages only where the host memory is 2 MiB-aligned too.
        let large = if aligned { bytes / LARGE_PAGE_SIZE } else { 0 };
        let chunks = bytes.div_ceil(LARGE_PAGE_SIZE);
        let mut next_pt = 0;
        for i in 0..chunks {
            let gib = (i / 512) as usize;
            let pd = match t.pds.get(gib).copied().flatten() {
                Some(pd) => pd,
                None => {
                    let pd = zeroed_frame(ledger).ok_or(SpaceError::OutOfMemory)?;
                    if let Some(slot) = t.pds.get_mut(gib) {
                        *slot = Some(pd);
                    }
                    write_entry(pdpt, gib as u64, pd.start_address() | P | RW | US);
                    pd
                }
            };
            let at = phys + i * LARGE_PAGE_SIZE;
            if i < large {
                write_entry(pd, i % 512, at | P | RW | US | PS);
            } else {
                let Some(slot) = t.pts.get_mut(next_pt) else {
                    return Err(SpaceError::BadSize);
                };
                let pt = zeroed_frame(ledger).ok_or(SpaceError::OutOfMemory)?;
                *slot = Some(pt);
                next_pt += 1;
                let pages = (bytes - i * LARGE_PAGE_SIZE).min(LARGE_PAGE_SIZE) / PAGE_SIZE;
                for k in 0..pages {
                    write_entry(pt, k, (at + k * PAGE_SIZE) | P | RW | US);
                }
                write_entry(pd, i % 512, pt.start_address() | P | RW | US);
            }
        }
        Ok(t)
    }

    /// The PML4 to load while this guest runs.
    pub fn cr3(&self) -> u64 {
        self.pml4.start_address()
    }

    /// Host memory used for the tables.
    pub fn overhead_bytes(&self) -> u64 {
        (1 + u64::from(self.pdpt.is_some())
            + self.pts.iter().flatten().count() as u64
            + self.pds.iter().flatten().count() as u64)
            * PAGE_SIZE
    }
}

impl Drop for LinearTables {
    fn drop(&mut self) {
        if cpu::cr3() & !0xFFF == self.pml4.start_address() {
            // SAFETY: the kernel PML4 maps everything the host uses.
            unsafe { cpu::write_cr3(mem::kernel_pml4()) };
        }
        for f in self
            .pds
            .iter()
            .flatten()
            .chain(self.pdpt.iter())
            .chain(self.pts.iter().flatten())
        {
            mem::free_frame(*f);
            self.ledger.credit(1);
        }
        mem::free_frame(self.pml4);
        self.ledger.credit(1);
    }
}

/// Where a guest's shadow page tables live: frames from the frame
/// allocator, zeroed, reached through the direct map. The shadow core
/// (`rustyvisor::lguest::shadow`) decides every entry and counts (and caps)
/// the frames it holds; it only ever touches frames it got from here and
/// reads the kernel PML4.
///
/// Up to [`TABLE_POOL`] freed table frames are kept for the next tables
/// instead of going back to the frame allocator: a Linux guest frees and
/// makes page tables at every fork and exit, and the pool spares each pair
/// the allocator's lock and bookkeeping. A frame from the pool is zeroed
/// before reuse, but only where it may hold something: the core says which
/// 64-entry chunks of a page table it ever wrote
/// (`ShadowBackend::free_table_chunks`); other frames are zeroed whole.
/// Pooled frames stay charged to the guest and go back to the allocator
/// when the guest's tables are dropped.
pub struct ShadowFrames {
    ledger: Ledger,
    pool: [u64; TABLE_POOL],
    /// Per pooled frame: the 64-entry chunks that may be nonzero.
    dirty: [u8; TABLE_POOL],
    pooled: usize,
}

/// Most freed table frames one guest keeps for reuse (128 KiB).
const TABLE_POOL: usize = 32;

impl ShadowFrames {
    /// Shadow frames charged to `ledger`.
    pub fn new(ledger: &Ledger) -> Self {
        Self {
            ledger: ledger.clone(),
            pool: [0; TABLE_POOL],
            dirty: [0; TABLE_POOL],
            pooled: 0,
        }
    }
}

impl Drop for ShadowFrames {
    fn drop(&mut self) {
        for &f in self.pool.get(..self.pooled).unwrap_or_default() {
            mem::free_frame(PhysFrame::containing_address(f));
            self.ledger.credit(1);
        }
        self.pooled = 0;
    }
}

impl ShadowBackend for ShadowFrames {
    #[inline]
    fn alloc_table(&mut self) -> Option<u64> {
        if let Some(last) = self.pooled.checked_sub(1)
            && let (Some(&f), Some(&dirty)) = (self.pool.get(last), self.dirty.get(last))
        {
            self.pooled = last;
            // SAFETY: a frame this guest's tables gave back: no shadow
            // refers to it any more.
            unsafe { zero_chunks(f, dirty) };
            return Some(f);
        }
        zeroed_frame(&self.ledger).map(|f| f.start_address())
    }

    fn free_table(&mut self, frame: u64) {
        self.free_table_chunks(frame, 0xFF);
    }

    fn free_table_chunks(&mut self, frame: u64, chunks: u8) {
        if let (Some(slot), Some(dirty)) = (
            self.pool.get_mut(self.pooled),
            self.dirty.get_mut(self.pooled),
        ) {
            *slot = frame;
            *dirty = chunks;
            self.pooled += 1;
            return;
        }
        mem::free_frame(PhysFrame::containing_address(frame));
        self.ledger.credit(1);
    }

    #[inline(always)]
    fn read(&self, frame: u64, index: usize) -> u64 {
        // SAFETY: `frame` is a table frame the core allocated here (or the
        // kernel PML4), direct-mapped; `index < 512` keeps the read inside.
        unsafe { (phys_to_virt(frame + (index as u64 % 512) * 8) as *const u64).read_volatile() }
    }

    #[inline(always)]
    fn write(&mut self, frame: u64, index: usize, value: u64) {
        // SAFETY: `frame` is a table frame the core allocated here (never
        // the kernel PML4: the core only reads that one), direct-mapped;
        // `index < 512` keeps the write inside.
        unsafe {
            (phys_to_virt(frame + (index as u64 % 512) * 8) as *mut u64).write_volatile(value)
        };
    }
}

/// Guest memory as seen by the lguest core: `[base, base + limit)` in the
/// direct map, every access bounds-checked.
pub struct HostGuestMemory {
    base: u64,
    limit: u32,
}

impl HostGuestMemory {
    /// Memory of `limit` bytes at host address `base`.
    ///
    /// # Safety
    /// `[base, base + limit)` must be mapped guest memory that stays allocated
    /// while this object is used.
    pub unsafe fn new(base: u64, limit: u32) -> Self {
        Self { base, limit }
    }

    /// The host address of guest-physical `[gpa, gpa + len)`, if all of it
    /// is guest memory (for the hypercall stub, which reads one byte of
    /// `lguest_data` there without calling back into Rust).
    #[inline]
    pub fn host_addr(&self, gpa: u32, len: usize) -> Option<u64> {
        let r = check_range(self.limit, gpa, len, false).ok()?;
        Some(self.base + r.start as u64)
    }

    /// The host pointer of a checked range (`r` from [`check_range`]).
    #[inline(always)]
    fn at(&self, r: &core::ops::Range<usize>) -> *mut u8 {
        // `base + limit` is a direct-map address (`new`'s contract) and
        // `r.start < limit`: no wrap, so no overflow check is needed.
        self.base.wrapping_add(r.start as u64) as *mut u8
    }
}

impl GuestMemory for HostGuestMemory {
    fn limit(&self) -> u32 {
        self.limit
    }

    // The small accessors below are the hot path of every exit (lguest_data
    // fields, stack frames): one range check, then one plain unaligned load
    // or store instead of a byte copy. The SAFETY argument is `read`'s.

    #[inline]
    fn read_u8(&self, gpa: u32) -> Result<u8, MemFault> {
        let r = check_range(self.limit, gpa, 1, false)?;
        // SAFETY: `r` is inside guest memory (see `read`).
        Ok(unsafe { self.at(&r).read() })
    }

    #[inline]
    fn read_u32(&self, gpa: u32) -> Result<u32, MemFault> {
        let r = check_range(self.limit, gpa, 4, false)?;
        // SAFETY: `r` is inside guest memory (see `read`); unaligned is fine.
        Ok(u32::from_le(unsafe {
            self.at(&r).cast::<u32>().read_unaligned()
        }))
    }

    #[inline]
    fn write_u8(&mut self, gpa: u32, v: u8) -> Result<(), MemFault> {
        let r = check_range(self.limit, gpa, 1, true)?;
        // SAFETY: `r` is inside guest memory (see `read`).
        unsafe { self.at(&r).write(v) };
        Ok(())
    }

    #[inline]
    fn write_u32s(&mut self, gpa: u32, words: &[u32]) -> Result<(), MemFault> {
        let r = check_range(self.limit, gpa, words.len().saturating_mul(4), true)?;
        let p = self.at(&r).cast::<u32>();
        // The common frame sizes are spelled out so they compile to plain
        // stores.
        // SAFETY: `r` covers `words.len()` words and is inside guest memory
        // (see `read`); every index below is less than `words.len()`;
        // unaligned stores are fine.
        unsafe {
            match *words {
                [a, b, c] => {
                    p.write_unaligned(a.to_le());
                    p.add(1).write_unaligned(b.to_le());
                    p.add(2).write_unaligned(c.to_le());
                }
                [a, b, c, d] => {
                    p.write_unaligned(a.to_le());
                    p.add(1).write_unaligned(b.to_le());
                    p.add(2).write_unaligned(c.to_le());
                    p.add(3).write_unaligned(d.to_le());
                }
                _ => {
                    for (i, &w) in words.iter().enumerate() {
                        p.add(i).write_unaligned(w.to_le());
                    }
                }
            }
        }
        Ok(())
    }

    #[inline]
    fn write_u32(&mut self, gpa: u32, v: u32) -> Result<(), MemFault> {
        let r = check_range(self.limit, gpa, 4, true)?;
        // SAFETY: `r` is inside guest memory (see `read`); unaligned is fine.
        unsafe { self.at(&r).cast::<u32>().write_unaligned(v.to_le()) };
        Ok(())
    }

    fn read(&self, gpa: u32, buf: &mut [u8]) -> Result<(), MemFault> {
        let r = check_range(self.limit, gpa, buf.len(), false)?;
        // SAFETY: `r` lies inside [0, limit), which `new`'s caller guaranteed
        // is mapped guest memory; the guest may change it concurrently only
        // while it runs, which it does not while the host runs on this CPU.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (self.base + r.start as u64) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn write(&mut self, gpa: u32, data: &[u8]) -> Result<(), MemFault> {
        let r = check_range(self.limit, gpa, data.len(), true)?;
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.base + r.start as u64) as *mut u8,
                data.len(),
            )
        };
        Ok(())
    }
}
