//! Memory management glue: the global frame allocator, the kernel page tables
//! (W^X image, direct map of all RAM, MMIO window), the heap and guarded
//! stacks. The algorithms live in the host-tested `rustyvisor::mm`; this file
//! wires them to the real machine.
//!
//! Virtual layout (upper half; every PML4 slot 256–511 is created once at boot
//! so later address spaces can share them by reference):
//!
//! | range | what |
//! |---|---|
//! | `0xFFFF_8000_0000_0000` + phys | direct map of physical memory (RW, NX, 2 MiB pages) |
//! | `0xFFFF_C000_0000_0000` … | kernel heap, grows on demand (RW, NX) |
//! | `0xFFFF_D000_0000_0000` … | kernel stacks, each below an unmapped guard page |
//! | `0xFFFF_E000_0000_0000` … | MMIO (uncached) |
//! | `0xFFFF_FFFF_8000_0000` + phys | the hypervisor image: text RX, rodata R, data/bss RW |

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use linked_list_allocator::Heap;
use rustyvisor::mm::frame::{FrameAllocator, PhysFrame};
use rustyvisor::mm::paging::{FrameSource, PageFlags, PageTable, PhysMemory};
use rustyvisor::mm::region::{self, MemorySummary, PhysRange, RegionList};
use rustyvisor::mm::{LARGE_PAGE_SIZE, PAGE_SIZE};

use super::arch::cpu;
use super::bootinfo::BootInfo;
use super::sync::IrqMutex;

/// Base of the direct map.
pub const DIRECT_MAP_BASE: u64 = 0xFFFF_8000_0000_0000;
/// Base of the heap region.
pub const HEAP_BASE: u64 = 0xFFFF_C000_0000_0000;
/// Base of the stack region.
pub const STACK_BASE: u64 = 0xFFFF_D000_0000_0000;
/// Base of the MMIO window.
pub const MMIO_BASE: u64 = 0xFFFF_E000_0000_0000;
/// Where the image is linked.
pub const KERNEL_VMA: u64 = 0xFFFF_FFFF_8000_0000;

const FOUR_GIB: u64 = 4 << 30;
const INITIAL_HEAP: u64 = 1 << 20;
const HEAP_GROW_MIN: u64 = 256 << 10;

unsafe extern "C" {
    static __image_phys_start: u8;
    static __image_phys_end: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
}

fn sym(s: *const u8) -> u64 {
    s as u64
}

/// Virtual address of physical `phys` in the direct map.
pub const fn phys_to_virt(phys: u64) -> u64 {
    DIRECT_MAP_BASE + phys
}

/// Physical memory seen through the direct map.
struct DirectMap;

impl PhysMemory for DirectMap {
    fn read_u64(&self, phys: u64) -> u64 {
        // SAFETY: page-table frames come from the frame allocator and lie in
        // the direct map; reads of 8-byte aligned entries are always valid.
        unsafe { (phys_to_virt(phys) as *const u64).read_volatile() }
    }

    fn write_u64(&mut self, phys: u64, val: u64) {
        // SAFETY: as above; the caller (paging logic) owns the table frame.
        unsafe { (phys_to_virt(phys) as *mut u64).write_volatile(val) }
    }

    fn zero_frame(&mut self, phys: u64) {
        // SAFETY: `phys` is a whole frame handed out by the frame allocator.
        unsafe { core::ptr::write_bytes(phys_to_virt(phys) as *mut u8, 0, PAGE_SIZE as usize) }
    }
}

/// The frame allocator, once memory is initialised.
static FRAMES: IrqMutex<Option<FrameAllocator<'static>>> = IrqMutex::new(None);
/// Physical address of the kernel PML4 (0 until built).
static KERNEL_PML4: AtomicU64 = AtomicU64::new(0);
static MMIO_NEXT: AtomicU64 = AtomicU64::new(MMIO_BASE);
static STACK_NEXT: AtomicU64 = AtomicU64::new(STACK_BASE);
static DIRECT_MAP_END: AtomicU64 = AtomicU64::new(FOUR_GIB);

/// Frame source that takes frames below a limit (or anywhere).
struct Frames<'g, 'a> {
    alloc: &'g mut FrameAllocator<'a>,
    below: Option<u64>,
}

impl FrameSource for Frames<'_, '_> {
    fn alloc_table_frame(&mut self) -> Option<u64> {
        let f = match self.below {
            Some(limit) => self.alloc.alloc_below(limit),
            None => self.alloc.alloc(),
        }?;
        Some(f.start_address())
    }
}

/// What memory initialisation found.
pub struct MemoryReport {
    /// Totals from the memory map.
    pub summary: MemorySummary,
    /// Frames managed by the allocator.
    pub managed_frames: u64,
    /// Frames free right after init.
    pub free_frames: u64,
    /// Frames holding the bitmap.
    pub bitmap_bytes: u64,
}

/// Why memory could not be initialised.
#[derive(Debug)]
pub enum MemError {
    /// Too many disjoint regions in the memory map.
    MapTooComplex,
    /// No usable RAM below 4 GiB large enough for the frame bitmap.
    NoRoomForBitmap,
    /// The allocator refused its storage.
    Allocator,
    /// Out of frames while building page tables.
    OutOfFrames,
}

/// Sets up the frame allocator over all usable RAM, switches to the kernel
/// page tables and starts the heap.
pub fn init(boot: &BootInfo) -> Result<MemoryReport, MemError> {
    // Everything that must never be handed out: the first MiB (BIOS data,
    // real-mode structures), the image, the boot information, the modules.
    let mut reserved: RegionList<32> = RegionList::new();
    let image = PhysRange::new(
        sym(&raw const __image_phys_start),
        sym(&raw const __image_phys_end),
    );
    let _ = reserved.insert(PhysRange::new(0, 1 << 20));
    let _ = reserved.insert(image.align_outward(PAGE_SIZE));
    let _ = reserved.insert(boot.mbi.align_outward(PAGE_SIZE));
    // Every module, however many: one range each (GRUB packs them, so they
    // usually merge); should the list fill up, the span of all of them.
    let mut all = PhysRange::new(u64::MAX, 0);
    let mut full = false;
    for m in boot.modules() {
        let r = m.range.align_outward(PAGE_SIZE);
        all = PhysRange::new(all.start.min(r.start), all.end.max(r.end));
        full |= reserved.insert(r).is_err();
    }
    if full && reserved.insert(all).is_err() {
        return Err(MemError::MapTooComplex);
    }
    let (usable, summary) =
        region::build_usable_from_slice::<128>(boot.memory_map(), reserved.as_slice())
            .map_err(|_| MemError::MapTooComplex)?;

    let total_frames = summary.highest_usable_end.div_ceil(PAGE_SIZE);
    let bitmap_bytes = FrameAllocator::bitmap_bytes(total_frames);
    let bitmap_phys = region::find_free_run(
        usable.as_slice(),
        reserved.as_slice(),
        bitmap_bytes.max(8),
        PAGE_SIZE,
        FOUR_GIB,
    )
    .ok_or(MemError::NoRoomForBitmap)?;
    let words = FrameAllocator::bitmap_words(total_frames);
    // SAFETY: `find_free_run` returned usable RAM below 4 GiB (covered by the
    // boot direct map) that no reserved range overlaps; it becomes the
    // bitmap's exclusive storage for the rest of the run (marked used below).
    let storage: &'static mut [u64] =
        unsafe { core::slice::from_raw_parts_mut(phys_to_virt(bitmap_phys) as *mut u64, words) };
    let mut frames = FrameAllocator::new(storage, total_frames).map_err(|_| MemError::Allocator)?;
    for r in usable.iter() {
        frames.add_free_range(*r);
    }
    frames.mark_used(
        PhysRange::new(bitmap_phys, bitmap_phys + bitmap_bytes).align_outward(PAGE_SIZE),
    );

    // The map's highest address of any kind bounds the direct map (ACPI
    // tables and other firmware data must be reachable), at least 4 GiB.
    let map_end = boot
        .memory_map()
        .iter()
        .filter_map(|e| e.base.checked_add(e.len))
        .filter(|end| *end <= rustyvisor::mm::PHYS_ADDR_LIMIT)
        .max()
        .unwrap_or(0)
        .max(FOUR_GIB)
        .next_multiple_of(LARGE_PAGE_SIZE);
    build_kernel_tables(&mut frames, map_end)?;
    DIRECT_MAP_END.store(map_end, Ordering::Relaxed);

    let report = MemoryReport {
        summary,
        managed_frames: frames.managed_count(),
        free_frames: frames.free_count(),
        bitmap_bytes,
    };
    *FRAMES.lock() = Some(frames);
    init_heap()?;
    Ok(report)
}

fn build_kernel_tables(frames: &mut FrameAllocator<'static>, map_end: u64) -> Result<(), MemError> {
    let mut mem = DirectMap;
    // Page tables are built while only the boot tables (0..4 GiB direct map)
    // are active, so every table frame must come from below 4 GiB.
    let mut src = Frames {
        alloc: frames,
        below: Some(FOUR_GIB),
    };
    let root = src.alloc_table_frame().ok_or(MemError::OutOfFrames)?;
    mem.zero_frame(root);
    let pt = PageTable { root };

    // Create every upper-half PML4 entry now, so they never change later.
    for slot in 256..512u64 {
        let pdpt = src.alloc_table_frame().ok_or(MemError::OutOfFrames)?;
        mem.zero_frame(pdpt);
        mem.write_u64(root + slot * 8, pdpt | 0x3);
    }

    let global = PageFlags::PRESENT | PageFlags::GLOBAL;
    let image_phys = |v: u64| v - KERNEL_VMA;
    let text = (sym(&raw const __text_start), sym(&raw const __text_end));
    let rodata = (sym(&raw const __rodata_start), sym(&raw const __rodata_end));
    let data = (sym(&raw const __data_start), sym(&raw const __data_end));
    let sections = [
        (text, global),
        (rodata, global | PageFlags::NO_EXECUTE),
        (data, global | PageFlags::WRITABLE | PageFlags::NO_EXECUTE),
    ];
    for ((start, end), flags) in sections {
        let mut v = start;
        while v < end {
            pt.map_4k(&mut mem, &mut src, v, image_phys(v), flags)
                .map_err(|_| MemError::OutOfFrames)?;
            v += PAGE_SIZE;
        }
    }

    pt.map_range(
        &mut mem,
        &mut src,
        DIRECT_MAP_BASE,
        0,
        map_end,
        global | PageFlags::WRITABLE | PageFlags::NO_EXECUTE,
    )
    .map_err(|_| MemError::OutOfFrames)?;

    // SAFETY: the new tables map the running image (text/rodata/data/bss, the
    // current stack is in .bss) and the direct map, exactly as the boot
    // tables did for everything still in use. PGE makes the image and direct
    // map global (never flushed by CR3 writes into guest address spaces).
    unsafe {
        cpu::write_cr3(root);
        cpu::write_cr4(cpu::cr4() | (1 << 7));
    }
    KERNEL_PML4.store(root, Ordering::Relaxed);
    Ok(())
}

/// Maps `len` bytes of device memory at `phys` uncached; returns the virtual
/// address of `phys`.
pub fn map_mmio(phys: u64, len: u64) -> u64 {
    let base = phys & !(PAGE_SIZE - 1);
    let pages = (phys - base + len).div_ceil(PAGE_SIZE).max(1);
    let virt = MMIO_NEXT.fetch_add(pages * PAGE_SIZE, Ordering::Relaxed);
    let flags = PageFlags::PRESENT
        | PageFlags::WRITABLE
        | PageFlags::NO_CACHE
        | PageFlags::WRITE_THROUGH
        | PageFlags::NO_EXECUTE
        | PageFlags::GLOBAL;
    with_tables(|pt, mem, src| {
        for i in 0..pages {
            if pt
                .map_4k(mem, src, virt + i * PAGE_SIZE, base + i * PAGE_SIZE, flags)
                .is_err()
            {
                panic!("out of memory mapping MMIO at {:#x}", base + i * PAGE_SIZE);
            }
        }
    });
    virt + (phys - base)
}

fn with_tables<R>(f: impl FnOnce(&PageTable, &mut DirectMap, &mut Frames<'_, 'static>) -> R) -> R {
    let root = KERNEL_PML4.load(Ordering::Relaxed);
    let mut guard = FRAMES.lock();
    let Some(alloc) = guard.as_mut() else {
        panic!("page tables used before memory initialisation");
    };
    let mut src = Frames { alloc, below: None };
    f(&PageTable { root }, &mut DirectMap, &mut src)
}

/// Whether `[addr, addr+len)` is mapped readable kernel memory (used by the
/// backtrace printer on the fatal path, so it must not take locks).
pub fn is_kernel_readable(addr: u64, len: u64) -> bool {
    let root = KERNEL_PML4.load(Ordering::Relaxed);
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    if root == 0 {
        // Boot tables: the image and the first 4 GiB of the direct map.
        return (addr >= KERNEL_VMA && end <= KERNEL_VMA + (1 << 30))
            || (addr >= DIRECT_MAP_BASE && end <= DIRECT_MAP_BASE + FOUR_GIB);
    }
    let pt = PageTable { root };
    let mut page = addr & !(PAGE_SIZE - 1);
    while page < end {
        if pt.translate(&DirectMap, page).is_none() {
            return false;
        }
        page += PAGE_SIZE;
    }
    true
}

/// Physical address of the kernel PML4.
pub fn kernel_pml4() -> u64 {
    KERNEL_PML4.load(Ordering::Relaxed)
}

/// Takes one frame (zeroed by the caller if needed).
pub fn alloc_frame() -> Option<PhysFrame> {
    FRAMES.lock().as_mut()?.alloc()
}

/// Returns a frame; a double free is reported and ignored.
pub fn free_frame(f: PhysFrame) {
    if let Some(a) = FRAMES.lock().as_mut()
        && a.free(f).is_err()
    {
        log::error!(
            "frame {:#x} freed twice or never allocated",
            f.start_address()
        );
    }
}

/// (free, used, managed) frame counts.
pub fn frame_counts() -> (u64, u64, u64) {
    FRAMES.lock().as_ref().map_or((0, 0, 0), |a| {
        (a.free_count(), a.used_count(), a.managed_count())
    })
}

// ---------------------------------------------------------------- heap ----

struct KernelHeap {
    heap: IrqMutex<Heap>,
}

static HEAP_END: AtomicU64 = AtomicU64::new(HEAP_BASE);

/// Frames the heap took since boot: its pages and the page tables mapping
/// them (the heap never gives frames back).
static HEAP_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Frames the heap has taken since boot (pages and their page tables).
pub fn heap_frames() -> u64 {
    HEAP_FRAMES.load(Ordering::Relaxed)
}

/// Page-table frames taken to map task stacks. Stack slots are never
/// reused (see [`KernelStack::new`]), so these tables stay: about one per
/// hundred stacks ever made.
static STACK_TABLE_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Page-table frames the stack region has taken since boot (never given
/// back).
pub fn stack_table_frames() -> u64 {
    STACK_TABLE_FRAMES.load(Ordering::Relaxed)
}

/// Maps `bytes` (page multiple) more at the heap's end.
fn grow_heap(bytes: u64) -> bool {
    let start = HEAP_END.load(Ordering::Relaxed);
    let (free_before, _, _) = frame_counts();
    let flags =
        PageFlags::PRESENT | PageFlags::WRITABLE | PageFlags::NO_EXECUTE | PageFlags::GLOBAL;
    let ok = with_tables(|pt, mem, src| {
        let mut v = start;
        while v < start + bytes {
            let Some(frame) = src.alloc.alloc() else {
                return false;
            };
            if pt
                .map_4k(mem, src, v, frame.start_address(), flags)
                .is_err()
            {
                let _ = src.alloc.free(frame);
                return false;
            }
            v += PAGE_SIZE;
        }
        true
    });
    if ok {
        HEAP_END.store(start + bytes, Ordering::Relaxed);
        let (free_after, _, _) = frame_counts();
        HEAP_FRAMES.fetch_add(free_before.saturating_sub(free_after), Ordering::Relaxed);
    }
    ok
}

fn init_heap() -> Result<(), MemError> {
    if !grow_heap(INITIAL_HEAP) {
        return Err(MemError::OutOfFrames);
    }
    let mut heap = ALLOCATOR.heap.lock();
    // SAFETY: [HEAP_BASE, HEAP_BASE + INITIAL_HEAP) was just mapped RW and is
    // used by nothing else.
    unsafe { heap.init(HEAP_BASE as *mut u8, INITIAL_HEAP as usize) };
    Ok(())
}

/// Heap bytes (used, size).
pub fn heap_usage() -> (usize, usize) {
    let heap = ALLOCATOR.heap.lock();
    (heap.used(), heap.size())
}

// SAFETY: `alloc` hands out blocks from linked_list_allocator's heap (which
// upholds GlobalAlloc's contract), growing the mapped region at its top;
// `dealloc` returns blocks to the same heap.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut heap = self.heap.lock();
        if let Ok(p) = heap.allocate_first_fit(layout) {
            return p.as_ptr();
        }
        let want = (layout.size() as u64)
            .saturating_add(layout.align() as u64)
            .saturating_add(64)
            .max(HEAP_GROW_MIN)
            .next_multiple_of(PAGE_SIZE);
        if !grow_heap(want) {
            return core::ptr::null_mut();
        }
        // SAFETY: the pages right after the heap's top were just mapped.
        unsafe { heap.extend(want as usize) };
        heap.allocate_first_fit(layout)
            .map_or(core::ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: GlobalAlloc's contract: `ptr` came from `alloc` with
            // this layout.
            unsafe { self.heap.lock().deallocate(p, layout) };
        }
    }
}

#[global_allocator]
static ALLOCATOR: KernelHeap = KernelHeap {
    heap: IrqMutex::new(Heap::empty()),
};

// --------------------------------------------------------------- stacks ----

/// A kernel stack with an unmapped guard page below it. Dropping it unmaps
/// the stack and returns its frames.
pub struct KernelStack {
    bottom: u64,
    pages: u64,
}

impl KernelStack {
    /// Allocates a stack of `pages` pages.
    pub fn new(pages: u64) -> Option<Self> {
        let pages = pages.max(1);
        // Slot = guard page + stack; slots are never reused (the region is
        // 16 TiB of address space), frames are.
        let slot = STACK_NEXT.fetch_add((pages + 1) * PAGE_SIZE, Ordering::Relaxed);
        let bottom = slot + PAGE_SIZE;
        let flags =
            PageFlags::PRESENT | PageFlags::WRITABLE | PageFlags::NO_EXECUTE | PageFlags::GLOBAL;
        let (free_before, _, _) = frame_counts();
        let ok = with_tables(|pt, mem, src| {
            for i in 0..pages {
                let Some(frame) = src.alloc.alloc() else {
                    return false;
                };
                if pt
                    .map_4k(
                        mem,
                        src,
                        bottom + i * PAGE_SIZE,
                        frame.start_address(),
                        flags,
                    )
                    .is_err()
                {
                    let _ = src.alloc.free(frame);
                    return false;
                }
            }
            true
        });
        if ok {
            let (free_after, _, _) = frame_counts();
            let tables = free_before.saturating_sub(free_after).saturating_sub(pages);
            STACK_TABLE_FRAMES.fetch_add(tables, Ordering::Relaxed);
        }
        let stack = Self { bottom, pages };
        if ok { Some(stack) } else { None }
    }

    /// The initial stack pointer (one past the top).
    pub fn top(&self) -> u64 {
        self.bottom + self.pages * PAGE_SIZE
    }

    /// The lowest address of the stack (the guard page is just below).
    pub fn bottom(&self) -> u64 {
        self.bottom
    }
}

impl Drop for KernelStack {
    fn drop(&mut self) {
        with_tables(|pt, mem, src| {
            for i in 0..self.pages {
                let v = self.bottom + i * PAGE_SIZE;
                if let Ok(phys) = pt.unmap_4k(mem, v) {
                    cpu::invlpg(v);
                    if let Some(f) = PhysFrame::from_address(phys) {
                        let _ = src.alloc.free(f);
                    }
                }
            }
        });
    }
}

/// End of the highest frame the allocator manages.
pub fn highest_frame_end() -> u64 {
    FRAMES
        .lock()
        .as_ref()
        .map_or(0, |a| a.total_frames().saturating_mul(PAGE_SIZE))
}

/// Takes `count` physically contiguous frames aligned to `align` frames.
pub fn alloc_contiguous(count: u64, align: u64) -> Option<PhysFrame> {
    FRAMES.lock().as_mut()?.alloc_contiguous(count, align)
}

/// Returns `count` contiguous frames starting at `first`.
pub fn free_contiguous(first: PhysFrame, count: u64) {
    if let Some(a) = FRAMES.lock().as_mut()
        && a.free_contiguous(first, count).is_err()
    {
        log::error!(
            "frames {:#x}+{count} freed twice or never allocated",
            first.start_address()
        );
    }
}
