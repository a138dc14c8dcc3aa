//! The GDT and the 64-bit TSS.
//!
//! The GDT has 32 slots laid out like a Linux i386 GDT so that 32-bit lguest
//! guests can later install their own descriptors (TLS 6–8, kernel CS/DS 12/13,
//! user CS/DS 14/15, …) through `LOAD_GDT_ENTRY`. The hypervisor keeps its own
//! descriptors in the slots `guest_abi::GUEST_RESERVED_GDT` reserves for the
//! host and that a guest can never set: 10 (64-bit code, selector 0x50), 11
//! (data, 0x58) and 16–17 (the 16-byte 64-bit TSS, selector 0x80). Every host
//! descriptor has DPL 0.

use core::cell::UnsafeCell;

use guest_abi::seg::{
    GDT_ENTRIES, GDT_ENTRY_LGUEST_CS, GDT_ENTRY_LGUEST_DS, GDT_ENTRY_TSS, GDT_ENTRY_TSS_HIGH,
    is_guest_reserved_slot,
};
use rustyvisor::lguest::gdtcache::{GdtKey, LoadedGdt};
use x86_64::PrivilegeLevel;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::{lgdt, load_tss};
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::tss::TaskStateSegment;

/// Number of GDT slots (the Linux i386 layout lguest guests expect).
const SLOTS: usize = GDT_ENTRIES as usize;
/// Slot of the hypervisor's 64-bit code segment.
pub const HOST_CS_INDEX: u16 = GDT_ENTRY_LGUEST_CS as u16;
/// Slot of the hypervisor's data segment.
pub const HOST_DS_INDEX: u16 = GDT_ENTRY_LGUEST_DS as u16;
/// First of the two slots of the 64-bit TSS descriptor.
pub const HOST_TSS_INDEX: u16 = GDT_ENTRY_TSS as u16;

// Every slot the hypervisor writes is one the ABI crate reserves, so no guest
// descriptor ever overwrites it (`load_guest_entries` skips exactly those).
const _: () = assert!(
    is_guest_reserved_slot(HOST_CS_INDEX as u32)
        && is_guest_reserved_slot(HOST_DS_INDEX as u32)
        && is_guest_reserved_slot(HOST_TSS_INDEX as u32)
        && is_guest_reserved_slot(HOST_TSS_INDEX as u32 + 1)
        && HOST_TSS_INDEX as u32 + 1 == GDT_ENTRY_TSS_HIGH
);

/// The hypervisor's code selector.
pub const HOST_CS: u16 = HOST_CS_INDEX << 3;

/// IST slot (1-based, as in the gate) used for double faults.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot used for NMIs.
pub const IST_NMI: u8 = 2;
/// IST slot used for machine checks.
pub const IST_MACHINE_CHECK: u8 = 3;

const EARLY_IST_SIZE: usize = 8192;

#[repr(C, align(16))]
struct EarlyStack([u8; EARLY_IST_SIZE]);

/// Per-CPU descriptor tables. Only the boot CPU runs for now.
#[repr(C, align(4096))]
struct CpuTables {
    gdt: [u64; SLOTS],
    tss: TaskStateSegment,
    early_ist: [EarlyStack; 3],
}

struct TablesCell(UnsafeCell<CpuTables>);

// SAFETY: the tables are written only by the boot CPU, during init (before
// interrupts are enabled) and through `set_ist`/`set_rsp0` with interrupts off;
// the CPU itself reads them. No other CPU runs hypervisor code yet.
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(UnsafeCell::new(CpuTables {
    gdt: [0; SLOTS],
    tss: TaskStateSegment::new(),
    early_ist: [
        EarlyStack([0; EARLY_IST_SIZE]),
        EarlyStack([0; EARLY_IST_SIZE]),
        EarlyStack([0; EARLY_IST_SIZE]),
    ],
}));

/// 64-bit code: L=1, P=1, DPL 0, readable, accessed.
const CODE64: u64 = 0x00AF_9B00_0000_FFFF;
/// Data: P=1, DPL 0, writable, accessed, 4 GiB flat (ignored in 64-bit mode).
const DATA: u64 = 0x00CF_9300_0000_FFFF;

fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // present, DPL 0, type 9 = available 64-bit TSS
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    (low, base >> 32)
}

/// Builds and loads the GDT and TSS on the boot CPU and reloads every segment
/// register. IST stacks start on small static stacks; [`set_ist`] replaces
/// them with guarded ones once memory management is up.
pub fn init() {
    let tables = TABLES.0.get();
    // SAFETY: single CPU, interrupts still off (boot), nobody else holds a
    // reference into TABLES; the raw pointers stay inside the static.
    unsafe {
        let t = &mut *tables;
        t.gdt[usize::from(HOST_CS_INDEX)] = CODE64;
        t.gdt[usize::from(HOST_DS_INDEX)] = DATA;
        for (i, stack) in t.early_ist.iter().enumerate() {
            let top = stack.0.as_ptr() as u64 + EARLY_IST_SIZE as u64;
            t.tss.interrupt_stack_table[i] = VirtAddr::new(top);
        }
        t.tss.iomap_base = size_of::<TaskStateSegment>() as u16;
        let tss_base = &raw const t.tss as u64;
        let (lo, hi) = tss_descriptor(tss_base, size_of::<TaskStateSegment>() as u64 - 1);
        t.gdt[usize::from(HOST_TSS_INDEX)] = lo;
        t.gdt[usize::from(HOST_TSS_INDEX) + 1] = hi;
        let ptr = DescriptorTablePointer {
            limit: (SLOTS * 8 - 1) as u16,
            base: VirtAddr::new(t.gdt.as_ptr() as u64),
        };
        lgdt(&ptr);
        CS::set_reg(SegmentSelector::new(HOST_CS_INDEX, PrivilegeLevel::Ring0));
        SS::set_reg(SegmentSelector::new(HOST_DS_INDEX, PrivilegeLevel::Ring0));
        DS::set_reg(SegmentSelector(0));
        ES::set_reg(SegmentSelector(0));
        load_tss(SegmentSelector::new(HOST_TSS_INDEX, PrivilegeLevel::Ring0));
    }
}

/// Points IST slot `ist` (1..=7) at a new stack top.
pub fn set_ist(ist: u8, top: u64) {
    let idx = usize::from(ist.clamp(1, 7) - 1);
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: boot CPU only, interrupts off: no concurrent reader other
        // than the CPU itself, which reads the TSS only on interrupt delivery.
        unsafe { (*TABLES.0.get()).tss.interrupt_stack_table[idx] = VirtAddr::new(top) };
    });
}

/// Sets the ring-0 stack used when an interrupt or trap arrives from a less
/// privileged ring (a guest).
pub fn set_rsp0(top: u64) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: as in `set_ist`.
        unsafe { (*TABLES.0.get()).tss.privilege_stack_table[0] = VirtAddr::new(top) };
    });
}

/// Which guest's descriptors the hardware GDT holds.
static LOADED: spin::Mutex<LoadedGdt> = spin::Mutex::new(LoadedGdt::new());

/// Like [`load_guest_entries`], but skips the copy when the descriptors
/// of `key` are already loaded (the common case on every guest entry).
pub fn load_guest_entries_cached(key: GdtKey, entries: &[u64; SLOTS]) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        if LOADED.lock().must_load(key) {
            copy_guest_entries(entries);
        }
    });
}

/// Copies a guest's 32 descriptors into the hardware GDT, except the
/// hypervisor's own slots, and forgets which guest's were there.
pub fn load_guest_entries(entries: &[u64; SLOTS]) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        LOADED.lock().forget();
        copy_guest_entries(entries);
    });
}

/// The copy itself; interrupts must be off. The guest's descriptors were
/// validated when it set them (no system descriptors, no 64-bit code,
/// DPL ≥ 1).
fn copy_guest_entries(entries: &[u64; SLOTS]) {
    // SAFETY: boot CPU, interrupts off (both callers); the host slots are
    // skipped, so the running CS/SS and the busy TSS descriptor stay intact.
    let gdt = unsafe { &mut (*TABLES.0.get()).gdt };
    for (i, (dst, src)) in (0u32..).zip(gdt.iter_mut().zip(entries.iter())) {
        if !is_guest_reserved_slot(i) {
            *dst = *src;
        }
    }
}
