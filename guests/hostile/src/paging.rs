//! Hostile paging modes: page tables and page-table hypercalls a correct
//! shadow-paging host must refuse (with a kill) or must not be fooled by.
//!
//! Each mode first builds its own tables with [`lguest_rt::paging`] in the
//! format `paging=` names (the hostile guest announces `kernel_address` =
//! `PAGE_OFFSET` at INIT) and leaves linear mode. A kill may come at the
//! hypercall that installs the bad entry or at the first access through it
//! (lguest checks an entry when it fills the shadow from it); either is
//! right, so every mode makes the hypercall *and* touches the address, with
//! [`probe_read`] so that a host that reflects a fault instead of killing
//! shows up as `FAIL: <mode> survived` rather than a panic.
//!
//! | mode | does | the host |
//! |---|---|---|
//! | `pgpfn` | a PTE (A/D set) whose frame is 64 MiB beyond guest RAM | kills: "bad page table entry" |
//! | `pgdir` | a top-level entry (2-level PGD / PAE PDPT) pointing at 0xF0000000, beyond guest RAM | kills: "bad page directory entry" (lguest; any "bad page ... entry" wording) |
//! | `paereserved` | (PAE) a PTE with reserved bit 62 set | kills: "bad page table entry" |
//! | `paepdpt` | (PAE) a PDPT entry with RW set (only P is allowed there) | kills: "bad page directory entry" (likewise) |
//! | `pgdindex` | `LHCALL_SET_PGD` with index 1024 (2-level) or 4 (PAE), one past the end | kills (upstream: "Attempt to set pgd %u/%u", which it got wrong for 1024) |
//! | `setpmd` | (2-level) `LHCALL_SET_PMD` | kills with a reason that names `paging=pae` |
//! | `stackunmapped` | `LHCALL_SET_STACK` on an unmapped virtual address, then `int $0x80` from user mode | kills: "bad stack page" (at `SET_STACK`, or when the frame is pushed) |
//! | `pgedit` | maps a page-table page writable into its own address space and edits it behind the host's back, then makes the `SET_PTE`/`FLUSH_TLB` it owes | survives: every edit is seen after the call, no stale (writable) mapping stays |
//! | `smep` | the guest kernel (CPL 1) calls code on a page its tables map user-accessible | kills: a guest kernel may not execute user pages (the host runs with SMEP while a paging guest runs) |
//! | `pgss16` | loads a 16-bit stack segment at CPL 1 (the CPU accepts it; the host must not return to it) and touches a page its tables map but the shadow does not have yet | kills: "bad ss" (the fill itself is fine; the return is not) |
//! | `pgflood` | 512 fresh top-levels, each with 64 pages in 64 different page tables, all touched, then all revisited | survives (the host caps and evicts its shadows); prints what it did |

use lguest_rt::guest_abi::KERNEL_DS;
use lguest_rt::guest_abi::hcall::{LHCALL_SET_PGD, LHCALL_SET_PMD};
use lguest_rt::paging::{
    self, AddressSpace, Format, PAE_PDPT_ENTRIES, PAGE_ACCESSED, PAGE_DIRTY, PAGE_PRESENT, PAGE_RW,
    PAGE_SIZE, PAGE_TABLE, PAGE_USER, PF_PROT, TWO_LEVEL_ENTRIES, probe_read, probe_write,
};
use lguest_rt::{BootInfo, check, check_eq, hcall, println, process};

/// Paging on in the format `paging=` names; `None` (after a FAIL line) if
/// the mode needs the other format.
fn start(boot: &BootInfo, need: Option<Format>) -> Option<Format> {
    let format = match Format::from_boot(boot) {
        Ok((f, _)) => f,
        Err(e) => {
            println!("FAIL: {e}");
            return None;
        }
    };
    if need.is_some_and(|n| n != format) {
        println!(
            "FAIL: this mode needs paging={}",
            need.map_or("", Format::name)
        );
        return None;
    }
    println!("hostile: paging={}", format.name());
    paging::init(boot, format);
    Some(format)
}

/// A user-range address the modes play with.
const VA: u32 = 0x5300_0000;
const KERNEL_RW: u64 = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_DIRTY;

/// A fresh address space, loaded.
fn fresh_space() -> AddressSpace {
    let s = AddressSpace::new().expect("a frame for a top-level table");
    s.switch_to();
    s
}

fn touch(va: u32) {
    let r = probe_read(va);
    println!("hostile: read of {va:#x} gave {r:x?}");
}

pub fn pgpfn(boot: &BootInfo) {
    if start(boot, None).is_none() {
        return;
    }
    let s = fresh_space();
    let beyond = u32::try_from(boot.mem_bytes).unwrap_or(u32::MAX) + (64 << 20);
    let _ = s.set_pte(VA, u64::from(beyond) | KERNEL_RW);
    touch(VA);
}

pub fn pgdir(boot: &BootInfo) {
    let Some(format) = start(boot, None) else {
        return;
    };
    let s = fresh_space();
    let idx = format.top_index(VA);
    let flags = match format {
        Format::TwoLevel => PAGE_TABLE,
        Format::Pae => PAGE_PRESENT,
    };
    // SAFETY: a user slot of our own, unused top-level: nothing the kernel
    // runs on changes.
    unsafe { paging::write_entry(s.top(), idx, 0xF000_0000 | flags) };
    // SAFETY: tells the host about that slot, which it must refuse.
    unsafe { hcall::hcall(LHCALL_SET_PGD, s.top(), idx, 0, 0) };
    touch(VA);
}

pub fn paereserved(boot: &BootInfo) {
    if start(boot, Some(Format::Pae)).is_none() {
        return;
    }
    let s = fresh_space();
    let frame = paging::alloc_frame().expect("a frame");
    let _ = s.set_pte(VA, u64::from(frame) | KERNEL_RW | 1 << 62);
    touch(VA);
}

pub fn paepdpt(boot: &BootInfo) {
    if start(boot, Some(Format::Pae)).is_none() {
        return;
    }
    let s = fresh_space();
    let pmd = paging::alloc_frame().expect("a frame");
    let idx = Format::Pae.top_index(VA);
    // SAFETY: a user slot of our own top-level.
    unsafe { paging::write_entry(s.top(), idx, u64::from(pmd) | PAGE_PRESENT | PAGE_RW) };
    // SAFETY: tells the host about that slot, which it must refuse.
    unsafe { hcall::hcall(LHCALL_SET_PGD, s.top(), idx, 0, 0) };
    touch(VA);
}

pub fn pgdindex(boot: &BootInfo) {
    let Some(format) = start(boot, None) else {
        return;
    };
    let idx = match format {
        Format::TwoLevel => TWO_LEVEL_ENTRIES,
        Format::Pae => PAE_PDPT_ENTRIES,
    };
    println!("hostile: LHCALL_SET_PGD index {idx}");
    // SAFETY: an index one past the table; the host must refuse it.
    unsafe { hcall::hcall(LHCALL_SET_PGD, paging::kernel_top(), idx, 0, 0) };
}

pub fn setpmd(boot: &BootInfo) {
    if start(boot, Some(Format::TwoLevel)).is_none() {
        return;
    }
    // SAFETY: a PAE-only call from a 2-level guest; the host must refuse it.
    unsafe { hcall::hcall(LHCALL_SET_PMD, paging::kernel_top(), 0, 0, 0) };
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    static hostile_user_begin: u8;
    static hostile_user_end: u8;
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    // A user program: `int $0x80` (SYS_EXIT 0), then ud2.
    ".pushsection .text.hostile_user,\"ax\",@progbits",
    ".globl hostile_user_begin",
    "hostile_user_begin:",
    "mov eax, {sys_exit}",
    "xor ebx, ebx",
    "int 0x80",
    "ud2",
    ".globl hostile_user_end",
    "hostile_user_end:",
    ".popsection",
    sys_exit = const process::SYS_EXIT,
);

const USER_CODE: u32 = 0x4000_0000;

pub fn stackunmapped(boot: &BootInfo) {
    if start(boot, None).is_none() {
        return;
    }
    process::init();
    let s = AddressSpace::new().expect("a frame for a top-level table");
    let code = paging::alloc_frame().expect("a frame");
    #[cfg(target_arch = "x86")]
    {
        let begin = hcall::phys(&raw const hostile_user_begin);
        let len = hcall::phys(&raw const hostile_user_end) - begin;
        // SAFETY: the program's bytes from the image (1:1) into the fresh
        // frame (direct map).
        unsafe {
            core::ptr::copy_nonoverlapping(
                core::ptr::with_exposed_provenance::<u8>(begin as usize),
                core::ptr::with_exposed_provenance_mut::<u8>(paging::kva(code) as usize),
                len as usize,
            );
        }
    }
    s.map(USER_CODE, code, PAGE_PRESENT | PAGE_USER)
        .expect("code mapped");
    // 0x70000000 is in the user range and mapped in no address space.
    println!("hostile: LHCALL_SET_STACK(0x69, 0x70002000, 2), unmapped");
    // SAFETY: a kernel stack that is not mapped: the host must refuse it,
    // now or when it pushes the frame of the user's `int $0x80`.
    unsafe { hcall::set_stack(u32::from(KERNEL_DS), 0x7000_2000, 2) };
    let _ = process::spawn(s, USER_CODE, 0x4010_0000);
    process::run();
}

// ---- pgedit ----------------------------------------------------------------------

/// The window through which the page table of [`VA`] is mapped: in the
/// same page table, so the table maps itself.
const WIN: u32 = VA + PAGE_SIZE;

pub fn pgedit(boot: &BootInfo) {
    let Some(format) = start(boot, None) else {
        return;
    };
    let s = fresh_space();
    let mask = format.frame_mask();
    let frames = [0x0E0E_0001u32, 0x0E0E_0002].map(|m| {
        let pa = paging::alloc_frame().expect("a frame");
        let _ = probe_write(paging::kva(pa), m);
        pa
    });
    let rw = PAGE_PRESENT | PAGE_RW;
    let _ = s.map(VA, frames[0], rw);
    check_eq!(probe_read(VA), Ok(0x0E0E_0001), "pgedit: first mapping");
    let Some((pt, idx)) = s.pte_location(VA) else {
        println!("FAIL: pgedit: no page table");
        return;
    };
    let _ = s.map(WIN, pt, rw);
    let size = match format {
        Format::TwoLevel => 4,
        Format::Pae => 8,
    };
    let slot = |va: u32| WIN + format.pte_index(va) * size;
    check_eq!(
        slot(VA),
        WIN + idx * size,
        "pgedit: the window shows VA's slot"
    );
    check_eq!(
        probe_read(slot(VA)).map(|e| u64::from(e) & mask),
        Ok(u64::from(frames[0])),
        "pgedit: VA's PTE read through the window"
    );
    check_eq!(
        probe_read(slot(WIN)).map(|e| u64::from(e) & mask),
        Ok(u64::from(pt)),
        "pgedit: the page table maps itself"
    );
    // Behind the host's back, then SET_PTE.
    let edit = |va: u32, entry: u64| {
        let _ = probe_write(slot(va), entry as u32);
        if format == Format::Pae {
            let _ = probe_write(slot(va) + 4, (entry >> 32) as u32);
        }
    };
    edit(VA, u64::from(frames[1]) | rw);
    paging::notify_pte(s.top(), VA, u64::from(frames[1]) | rw);
    check_eq!(
        probe_read(VA),
        Ok(0x0E0E_0002),
        "pgedit: edit + SET_PTE seen"
    );
    check_eq!(
        probe_write(VA + 4, 7),
        Ok(()),
        "pgedit: write through the new mapping"
    );
    check_eq!(
        probe_read(paging::kva(frames[0]) + 4),
        Ok(0),
        "pgedit: ... did not reach the old frame"
    );
    // Read-only behind the host's back, then FLUSH_TLB(0).
    edit(VA, u64::from(frames[0]) | PAGE_PRESENT);
    paging::flush_tlb_user();
    check_eq!(
        probe_read(VA),
        Ok(0x0E0E_0001),
        "pgedit: edit + FLUSH_TLB(0) seen"
    );
    let r = probe_write(VA, 9);
    check!(
        r.is_err_and(|f| f.error & PF_PROT != 0),
        "pgedit: no stale writable mapping after FLUSH_TLB(0): {r:?}"
    );
    // Unmapped behind the host's back, then a single-page flush.
    edit(VA, 0);
    paging::flush_tlb_one(VA);
    check!(
        probe_read(VA).is_err(),
        "pgedit: edit to not-present + single-page flush: the mapping is gone"
    );
    // Remapped behind the host's back, then FLUSH_TLB(1).
    edit(VA, u64::from(frames[1]) | rw);
    paging::flush_tlb_all();
    check_eq!(
        probe_read(VA),
        Ok(0x0E0E_0002),
        "pgedit: edit + FLUSH_TLB(1) seen"
    );
    // The table's own entry: point the window elsewhere, then SET_PTE.
    edit(WIN, u64::from(frames[0]) | rw);
    paging::notify_pte(s.top(), WIN, u64::from(frames[0]) | rw);
    check_eq!(
        probe_read(WIN),
        Ok(0x0E0E_0001),
        "pgedit: the self-mapping is gone after its SET_PTE"
    );
    check_eq!(
        paging::read_entry(pt, format.pte_index(WIN)) & mask,
        u64::from(frames[0]),
        "pgedit: the edit landed in the page table"
    );
    paging::switch_to_kernel();
    println!("hostile: pgedit done");
}

// ---- pgflood ---------------------------------------------------------------------

/// Top-level tables created.
const FLOOD_SPACES: u32 = 512;
/// Pages touched in each, one per page table.
const FLOOD_PAGES: u32 = 64;

pub fn pgflood(boot: &BootInfo) {
    let Some(format) = start(boot, None) else {
        return;
    };
    let user = PAGE_PRESENT | PAGE_RW | PAGE_USER | PAGE_ACCESSED | PAGE_DIRTY;
    let data = paging::alloc_frame().expect("a frame");
    let _ = probe_write(paging::kva(data), 0xF100_D000);
    // Shared user tables: FLOOD_PAGES page tables, each mapping `data` once,
    // one per 4 MiB (2-level) or 2 MiB (PAE) slot from 0x40000000.
    let span = match format {
        Format::TwoLevel => 1 << 22,
        Format::Pae => 1 << 21,
    };
    let va = |k: u32| 0x4000_0000 + k * span;
    let pmd = (format == Format::Pae).then(|| paging::alloc_frame().expect("a frame"));
    let mut tables = [0u32; FLOOD_PAGES as usize];
    for (k, t) in (0..FLOOD_PAGES).zip(tables.iter_mut()) {
        *t = paging::alloc_frame().expect("a frame");
        // SAFETY: fresh tables no address space uses yet.
        unsafe {
            paging::write_entry(*t, format.pte_index(va(k)), u64::from(data) | user);
            if let Some(pmd) = pmd {
                paging::write_entry(pmd, (va(k) >> 21) & 511, u64::from(*t) | PAGE_TABLE);
            }
        }
    }
    let mut tops = [0u32; FLOOD_SPACES as usize];
    let mut bad = 0;
    let mut made = 0;
    for top in tops.iter_mut() {
        // A new top-level: the kernel's entries plus the shared user tables
        // (Linux's pgd_alloc; the host hears of it at NEW_PGTABLE).
        let Some(s) = AddressSpace::new() else { break };
        // Its frames are given back below, not by `destroy`.
        *top = s.top();
        // SAFETY: a fresh top-level nobody has loaded.
        unsafe {
            match pmd {
                Some(pmd) => paging::write_entry(*top, 1, u64::from(pmd) | PAGE_PRESENT),
                None => {
                    for (k, t) in tables.iter().enumerate() {
                        let idx = format.top_index(va(k as u32));
                        paging::write_entry(*top, idx, u64::from(*t) | PAGE_TABLE);
                    }
                }
            }
        }
        // SAFETY: the table maps the kernel like every other.
        unsafe { hcall::new_pgtable(*top) };
        for k in 0..FLOOD_PAGES {
            if probe_read(va(k)) != Ok(0xF100_D000) {
                bad += 1;
            }
        }
        made += 1;
    }
    // Revisit every one (the host must rebuild what it evicted).
    for &top in &tops[..made] {
        // SAFETY: as above.
        unsafe { hcall::new_pgtable(top) };
        if probe_read(va(top / PAGE_SIZE % FLOOD_PAGES)) != Ok(0xF100_D000) {
            bad += 1;
        }
    }
    paging::switch_to_kernel();
    // Forget every shadow, then give the frames back.
    paging::flush_tlb_all();
    for &top in &tops[..made] {
        paging::free_frame(top);
    }
    for t in tables {
        paging::free_frame(t);
    }
    if let Some(pmd) = pmd {
        paging::free_frame(pmd);
    }
    paging::free_frame(data);
    println!(
        "hostile: pgflood: {made} address spaces x {FLOOD_PAGES} page tables, {} pages touched",
        made as u32 * FLOOD_PAGES + made as u32
    );
    check_eq!(
        made as u32,
        FLOOD_SPACES,
        "pgflood: every address space made"
    );
    check_eq!(
        bad,
        0,
        "pgflood: every page read back through every address space"
    );
}

/// The guest kernel calls a `ret` on a user page of its own address space:
/// under shadow paging the host runs with SMEP, so the fetch faults in a way
/// the shadow cannot fix; the host must kill the guest (not loop, not die).
pub fn smep(boot: &BootInfo) {
    if start(boot, None).is_none() {
        return;
    }
    let s = fresh_space();
    let frame = paging::alloc_frame().expect("a frame");
    // SAFETY: a fresh frame of ours, reached through the kernel mapping:
    // one `ret` instruction.
    unsafe {
        core::ptr::with_exposed_provenance_mut::<u8>(paging::kva(frame) as usize)
            .write_volatile(0xC3)
    };
    let _ = s.set_pte(VA, u64::from(frame) | KERNEL_RW | PAGE_USER);
    println!("hostile: calling user page {VA:#x} from the kernel");
    #[cfg(target_arch = "x86")]
    // SAFETY: none on purpose: the page holds `ret`, so on a host without
    // SMEP the call simply returns.
    unsafe {
        core::arch::asm!("call {}", in(reg) VA, clobber_abi("C"))
    };
    println!("FAIL: smep survived");
}

/// A 16-bit stack segment loaded at CPL 1 (which the CPU accepts and the
/// host refuses: returning to it would leave host RSP bits in ESP), then a
/// touch of a page the guest's tables map but the shadow does not have yet:
/// the host fills it, but must kill the guest rather than return to that
/// stack (the page-fault stub's fast path as much as the full one).
pub fn pgss16(boot: &BootInfo) {
    if start(boot, None).is_none() {
        return;
    }
    let s = fresh_space();
    let frame = paging::alloc_frame().expect("a frame");
    // A and D clear: recorded by SET_PTE, filled only on the touch.
    let _ = s.set_pte(VA, u64::from(frame) | PAGE_PRESENT | PAGE_RW);
    println!("hostile: touching {VA:#x} on a 16-bit stack");
    #[cfg(target_arch = "x86")]
    // SAFETY: slot 20 is free; the asm switches to the 16-bit stack at
    // 0xf000 (nothing is pushed there), reads VA (mapped above) and goes
    // back to its own ss:esp, saved in `SS16_SAVE`.
    unsafe {
        hcall::load_gdt_entry(crate::SLOT_A, crate::DATA16);
        core::arch::asm!(
            "mov dword ptr [edi], esp",
            "mov ecx, ss",
            "mov dword ptr [edi + 4], ecx",
            "mov esp, 0xf000",
            "mov eax, 0xa1",
            "mov ss, eax",
            "mov eax, dword ptr [{va}]",
            "mov ecx, dword ptr [edi + 4]",
            "mov ss, ecx",
            "mov esp, dword ptr [edi]",
            va = const VA,
            in("edi") crate::SS16_SAVE.as_ptr(),
            out("eax") _, out("ecx") _,
        );
    }
    println!("FAIL: pgss16 survived");
}
