//! Shadow core tests: guest tables built in a `VecMemory`, hardware tables
//! in a fake backend that refuses any access to a frame it did not hand out
//! (so a use after free or a double free fails loudly), and a reference
//! walker of both (written independently of `pagewalk`).

use std::collections::{HashMap, HashSet};

use super::*;
use crate::lguest::guestmem::VecMemory;
use crate::testutil::Rng;

pub(crate) const GUEST_BASE: u64 = 0x4000_0000;
pub(crate) const HOST_PML4: u64 = 0x10_0000;
const MEM: u32 = 8 << 20;
const PFNLIMIT: u32 = MEM / 4096;
const KA: u32 = 0xC000_0000;

/// Fake table frames: live frames only, recycled LIFO so a stale pointer
/// meets someone else's table.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct Fake {
    tables: HashMap<u64, Vec<u64>>,
    free: Vec<u64>,
    next: u64,
    /// Allocations left before `alloc_table` fails (None: unlimited);
    /// frees give it back.
    budget: Option<usize>,
    /// Frees give nothing back.
    dead: bool,
}

impl Fake {
    pub(crate) fn new() -> Self {
        let mut tables = HashMap::new();
        let mut host = vec![0u64; 512];
        for (i, e) in host.iter_mut().enumerate().skip(256) {
            *e = 0xABC0_0000 | (i as u64) << 12 | 3;
        }
        tables.insert(HOST_PML4, host);
        Self {
            tables,
            free: Vec::new(),
            next: 0x100_0000,
            budget: None,
            dead: false,
        }
    }

    /// Frames handed out and not yet returned.
    pub(crate) fn live(&self) -> usize {
        self.tables.len() - 1
    }

    fn entry(&self, frame: u64, index: usize) -> u64 {
        self.tables
            .get(&frame)
            .expect("read of a frame not allocated")[index]
    }
}

impl ShadowBackend for Fake {
    fn alloc_table(&mut self) -> Option<u64> {
        if let Some(b) = &mut self.budget {
            if *b == 0 {
                return None;
            }
            *b -= 1;
        }
        let f = self.free.pop().unwrap_or_else(|| {
            self.next += 4096;
            self.next
        });
        assert!(self.tables.insert(f, vec![0; 512]).is_none());
        Some(f)
    }
    fn free_table(&mut self, frame: u64) {
        assert_ne!(frame, HOST_PML4, "freed the host PML4");
        assert!(
            self.tables.remove(&frame).is_some(),
            "double free {frame:#x}"
        );
        self.free.push(frame);
        if let Some(b) = &mut self.budget
            && !self.dead
        {
            *b += 1;
        }
    }
    fn free_table_chunks(&mut self, frame: u64, chunks: u8) {
        // The promise: every entry outside the named chunks is zero.
        let t = self
            .tables
            .get(&frame)
            .expect("free of a frame not allocated");
        for (i, &e) in t.iter().enumerate() {
            assert!(
                e == 0 || chunks & (1 << (i / 64)) != 0,
                "table {frame:#x} given back with entry {i} = {e:#x} outside chunks {chunks:#010b}"
            );
        }
        self.free_table(frame);
    }
    fn read(&self, frame: u64, index: usize) -> u64 {
        assert!(index < 512);
        self.entry(frame, index)
    }
    fn write(&mut self, frame: u64, index: usize, value: u64) {
        assert_ne!(frame, HOST_PML4, "wrote the host PML4");
        self.tables
            .get_mut(&frame)
            .expect("write to a frame not allocated")[index] = value;
    }
}

/// What the CPU would see: (host physical page, writable, user) for `va`.
fn hw(b: &Fake, root: u64, va: u32) -> Option<(u64, bool, bool)> {
    let mut table = root;
    let mut w = true;
    let mut u = true;
    for shift in [39u32, 30, 21, 12] {
        let e = b.entry(table, ((u64::from(va) >> shift) & 511) as usize);
        if e & 1 == 0 {
            return None;
        }
        assert_eq!(e & PageFlags::HUGE.bits(), 0, "no large pages in a shadow");
        w &= e & 2 != 0;
        u &= e & 4 != 0;
        table = e & ADDR_MASK;
    }
    Some((table, w, u))
}

/// How many PD entries of a shadow are present (page tables it holds).
fn pd_entries(b: &Fake, root: u64) -> usize {
    let pdpt = b.entry(root, 0) & ADDR_MASK;
    (0..4)
        .map(|gi| b.entry(pdpt, gi))
        .filter(|e| e & 1 != 0)
        .map(|e| {
            (0..512)
                .filter(|&di| b.entry(e & ADDR_MASK, di) & 1 != 0)
                .count()
        })
        .sum()
}

/// Every present leaf of a shadow: (va, host page, writable, user); also
/// checks the shape (host half copied, only PML4[0] and PDPT[0..4]).
fn hw_leaves(b: &Fake, root: u64) -> Vec<(u32, u64, bool, bool)> {
    for i in 1..512 {
        let e = b.entry(root, i);
        if i < 256 {
            assert_eq!(e, 0, "PML4[{i}] populated");
        } else {
            assert_eq!(e, b.entry(HOST_PML4, i), "host half differs at {i}");
        }
    }
    let pdpt = b.entry(root, 0) & ADDR_MASK;
    let mut out = Vec::new();
    for gi in 0..512usize {
        let e = b.entry(pdpt, gi);
        if gi >= 4 {
            assert_eq!(e, 0, "PDPT[{gi}] populated");
            continue;
        }
        if e & 1 == 0 {
            continue;
        }
        let pd = e & ADDR_MASK;
        for di in 0..512usize {
            let pde = b.entry(pd, di);
            if pde & 1 == 0 {
                continue;
            }
            let pt = pde & ADDR_MASK;
            for ti in 0..512usize {
                let pte = b.entry(pt, ti);
                if pte & 1 == 0 {
                    continue;
                }
                assert_eq!(pte & PageFlags::GLOBAL.bits(), 0);
                assert_eq!(pte & PageFlags::NO_EXECUTE.bits(), 0);
                let va = (gi << 30 | di << 21 | ti << 12) as u32;
                out.push((va, pte & ADDR_MASK, pde & pte & 2 != 0, pde & pte & 4 != 0));
            }
        }
    }
    out
}

/// Reference guest walk (valid tables only): (gpa page, writable, user,
/// dirty).
fn guest(mem: &VecMemory, fmt: Format, cr3: u32, va: u32) -> Option<(u32, bool, bool, bool)> {
    let (up, pte) = match fmt {
        Format::TwoLevel => {
            let pgd = mem.read_u32(cr3 + (va >> 22) * 4).unwrap();
            if pgd & 1 == 0 {
                return None;
            }
            let pte = mem
                .read_u32((pgd & !0xFFF) + ((va >> 12) & 1023) * 4)
                .unwrap();
            (u64::from(pgd), u64::from(pte))
        }
        Format::Pae => {
            let pdpte = mem.read_u64(cr3 + (va >> 30) * 8).unwrap();
            if pdpte & 1 == 0 {
                return None;
            }
            let pmd = mem
                .read_u64((pdpte & !0xFFF) as u32 + ((va >> 21) & 511) * 8)
                .unwrap();
            if pmd & 1 == 0 {
                return None;
            }
            let pte = mem
                .read_u64((pmd & !0xFFF) as u32 + ((va >> 12) & 511) * 8)
                .unwrap();
            (pmd, pte)
        }
    };
    if pte & 1 == 0 {
        return None;
    }
    Some((
        (pte & 0xFFFF_F000) as u32,
        up & pte & 2 != 0,
        up & pte & 4 != 0,
        pte & 0x40 != 0,
    ))
}

/// The shadow in `slot` never gives more than the guest tables at `cr3`.
fn check_faithful(sp: &ShadowPaging, b: &Fake, mem: &VecMemory, slot: usize, cr3: u32) {
    let fmt = sp.config().format;
    for (va, host, w, u) in hw_leaves(b, sp.slot_root(slot).unwrap()) {
        assert!(
            host >= GUEST_BASE && host < GUEST_BASE + u64::from(MEM),
            "{va:#x} maps host {host:#x} outside the guest"
        );
        let g = guest(mem, fmt, cr3, va)
            .unwrap_or_else(|| panic!("{va:#x} mapped in the shadow, not in the guest"));
        assert_eq!(host - GUEST_BASE, u64::from(g.0), "{va:#x}: wrong page");
        assert!(
            !w || (g.1 && g.3),
            "{va:#x} writable: guest w={} d={}",
            g.1,
            g.3
        );
        assert!(!u || g.2, "{va:#x} user but not in the guest");
    }
}

fn config(fmt: Format) -> ShadowConfig {
    ShadowConfig::new(fmt, GUEST_BASE, PFNLIMIT, KA, HOST_PML4)
}

/// A guest with a page allocator for its tables (from 4 MiB up).
struct Guest {
    mem: VecMemory,
    fmt: Format,
    next: u32,
}

impl Guest {
    fn new(fmt: Format) -> Self {
        Self {
            mem: VecMemory::new(MEM),
            fmt,
            next: 4 << 20,
        }
    }

    fn page(&mut self) -> u32 {
        let p = self.next;
        self.next += 4096;
        assert!(self.next <= MEM);
        self.mem.zero(p, 4096).unwrap();
        p
    }

    /// A top-level table; PAE: a PDPT with four PMD pages.
    fn pgdir(&mut self) -> u32 {
        let top = self.page();
        if self.fmt == Format::Pae {
            for i in 0..4 {
                let pmd = self.page();
                self.mem.write_u64(top + i * 8, u64::from(pmd) | 1).unwrap();
            }
        }
        top
    }

    /// Sets the PTE for `va` under `cr3`, creating the PTE page (with the
    /// table entry flags `tflags`) if needed. Returns the PTE's address.
    fn map(&mut self, cr3: u32, va: u32, pte: u64, tflags: u64) -> u32 {
        let (tab_at, size) = match self.fmt {
            Format::TwoLevel => (cr3 + (va >> 22) * 4, 4),
            Format::Pae => {
                let pdpte = self.mem.read_u64(cr3 + (va >> 30) * 8).unwrap();
                ((pdpte & !0xFFF) as u32 + ((va >> 21) & 511) * 8, 8)
            }
        };
        let mut t = if size == 4 {
            u64::from(self.mem.read_u32(tab_at).unwrap())
        } else {
            self.mem.read_u64(tab_at).unwrap()
        };
        if t & 1 == 0 {
            t = u64::from(self.page()) | tflags;
            self.write(tab_at, t);
        }
        let at = match self.fmt {
            Format::TwoLevel => (t & !0xFFF) as u32 + ((va >> 12) & 1023) * 4,
            Format::Pae => (t & !0xFFF) as u32 + ((va >> 12) & 511) * 8,
        };
        self.write(at, pte);
        at
    }

    fn write(&mut self, at: u32, v: u64) {
        match self.fmt {
            Format::TwoLevel => self.mem.write_u32(at, v as u32).unwrap(),
            Format::Pae => self.mem.write_u64(at, v).unwrap(),
        }
    }

    fn read(&self, at: u32) -> u64 {
        match self.fmt {
            Format::TwoLevel => u64::from(self.mem.read_u32(at).unwrap()),
            Format::Pae => self.mem.read_u64(at).unwrap(),
        }
    }
}

const FORMATS: [Format; 2] = [Format::TwoLevel, Format::Pae];

fn setup(fmt: Format) -> (ShadowPaging, Fake, Guest, u32) {
    let sp = ShadowPaging::new(config(fmt)).unwrap();
    let mut g = Guest::new(fmt);
    let cr3 = g.pgdir();
    (sp, Fake::new(), g, cr3)
}

fn kill_text(f: Fault) -> String {
    match f {
        Fault::Kill(k) => k.as_str().to_string(),
        other => panic!("expected a kill, got {other:?}"),
    }
}

#[test]
fn demand_fault_fills_and_writes_back_accessed_dirty() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, cr3) = setup(fmt);
        let at = g.map(cr3, 0x40_1000, 0x12_3000 | 0x7, 0x67);
        let sw = sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
        assert!(!sw.hit && sw.flush && sw.slot == 0);
        assert_eq!(sw.root, sp.current_root().unwrap());
        assert_eq!(sp.frames(), 2);
        // Read fault: ACCESSED only, installed read-only (clean).
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0x40_1234, 4),
            Fault::Fixed
        );
        assert_eq!(g.read(at), 0x12_3000 | 0x27);
        assert_eq!(
            hw(&b, sw.root, 0x40_1000),
            Some((GUEST_BASE + 0x12_3000, false, true))
        );
        assert_eq!(sp.frames(), 4);
        // Write fault: DIRTY, now writable.
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0x40_1234, 6),
            Fault::Fixed
        );
        assert_eq!(g.read(at), 0x12_3000 | 0x67);
        assert_eq!(
            hw(&b, sw.root, 0x40_1000),
            Some((GUEST_BASE + 0x12_3000, true, true))
        );
        check_faithful(&sp, &b, &g.mem, 0, cr3);
        assert_eq!(sp.stats().fills, 2);
        sp.release_all(&mut b);
        assert_eq!((sp.frames(), b.live()), (0, 0));
    }
}

#[test]
fn guest_faults_are_reflected_with_the_guests_error_code() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, cr3) = setup(fmt);
        // Read-only user page, supervisor-only page, missing page.
        g.map(cr3, 0x40_0000, 0x5000 | 0x25, 0x67);
        g.map(cr3, 0x40_1000, 0x6000 | 0x63, 0x67);
        // A PGD/PMD without RW and USER above a RW|USER PTE.
        g.map(cr3, 0x80_0000, 0x7000 | 0x67, 0x61);
        sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
        let r = |sp: &mut ShadowPaging, b: &mut Fake, g: &mut Guest, va, err| {
            sp.demand_fault(&mut g.mem, b, va, err)
        };
        // Hardware said "not present" (bit 0 clear); the guest's page is
        // present, so its fault is a protection fault (bit 0 set).
        assert_eq!(
            r(&mut sp, &mut b, &mut g, 0x40_0000, 6),
            Fault::Reflect { errcode: 7 }
        );
        assert_eq!(
            r(&mut sp, &mut b, &mut g, 0x40_1000, 4),
            Fault::Reflect { errcode: 5 }
        );
        assert_eq!(
            r(&mut sp, &mut b, &mut g, 0x40_2000, 0x15),
            Fault::Reflect { errcode: 4 }
        );
        assert_eq!(
            r(&mut sp, &mut b, &mut g, 0x1000_0000, 0),
            Fault::Reflect { errcode: 0 }
        );
        assert_eq!(
            r(&mut sp, &mut b, &mut g, 0x80_0000, 2),
            Fault::Reflect { errcode: 3 }
        );
        assert_eq!(
            r(&mut sp, &mut b, &mut g, 0x80_0000, 4),
            Fault::Reflect { errcode: 5 }
        );
        // The kernel reads the page: installed, but neither RW nor USER
        // reaches the hardware (the PD entry carries the PGD/PMD's rights).
        assert_eq!(r(&mut sp, &mut b, &mut g, 0x80_0000, 0), Fault::Fixed);
        let root = sp.current_root().unwrap();
        assert_eq!(
            hw(&b, root, 0x80_0000),
            Some((GUEST_BASE + 0x7000, false, false))
        );
        // Nothing installed for the reflected faults, no A bit written.
        assert_eq!(hw(&b, root, 0x40_0000), None);
        assert_eq!(sp.stats().reflected, 6);
        check_faithful(&sp, &b, &g.mem, 0, cr3);
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

#[test]
fn bad_entries_kill_with_the_entry_named() {
    // pfn at pfnlimit.
    let (mut sp, mut b, mut g, cr3) = setup(Format::TwoLevel);
    g.map(cr3, 0x40_0000, u64::from(MEM) | 0x67, 0x67);
    sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
    let t = kill_text(sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 0));
    assert!(
        t.starts_with("bad page table entry 0x800067 (PTE at "),
        "{t}"
    );
    assert!(
        t.ends_with("for 0x400000): pfn 0x800 beyond limit 0x800"),
        "{t}"
    );
    // PSE in a PGD entry and in a PTE.
    g.map(cr3, 0x80_0000, 0x1000 | 0x67, 0xE7);
    let t = kill_text(sp.demand_fault(&mut g.mem, &mut b, 0x80_0000, 0));
    assert!(t.contains("PGD at ") && t.contains("large page"), "{t}");
    g.map(cr3, 0xC0_0000, 0x1000 | 0xE7, 0x67);
    let t = kill_text(sp.demand_fault(&mut g.mem, &mut b, 0xC0_0000, 0));
    assert!(t.contains("PTE at ") && t.contains("large page"), "{t}");
    // SET_PTE of an entry beyond the limit (with A set, so it is used).
    let e = sp
        .set_pte(&mut g.mem, &mut b, cr3, 0x40_0000, 0x900_0000 | 0x21)
        .unwrap_err();
    assert!(e.as_str().contains("pfn 0x9000 beyond limit"), "{e}");
    // SET_PGD bounds: 1023 fine, 1024 (lguest's off-by-one) kills.
    assert!(sp.set_pgd(&mut g.mem, &mut b, cr3, 1023).is_ok());
    assert_eq!(
        sp.set_pgd(&mut g.mem, &mut b, cr3, 1024)
            .unwrap_err()
            .as_str(),
        "attempt to set pgd 1024/1024"
    );
    // SET_PMD in a 2-level guest names the option.
    let e = sp.set_pmd(&mut g.mem, &mut b, 0x1000, 0).unwrap_err();
    assert!(e.as_str().contains("paging=pae"), "{e}");
    // A bad cr3.
    assert!(sp.new_pgtable(&mut g.mem, &mut b, cr3 + 4).is_err());
    assert!(sp.new_pgtable(&mut g.mem, &mut b, MEM).is_err());
    sp.release_all(&mut b);
    assert_eq!(b.live(), 0);

    // PAE: NX (hidden, so reserved) in a PTE, other reserved bits in a PMD,
    // flags in a PDPT entry, SET_PGD index 4.
    let (mut sp, mut b, mut g, cr3) = setup(Format::Pae);
    g.map(cr3, 0x40_0000, 1 << 63 | 0x1000 | 0x67, 0x67);
    sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
    let t = kill_text(sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 0));
    assert!(
        t.starts_with("bad page table entry 0x8000000000001067 (PTE"),
        "{t}"
    );
    assert!(t.ends_with("reserved bits set"), "{t}");
    g.map(cr3, 0x60_0000, 0x1000 | 0x67, 0x67);
    let pmd_at = (g.mem.read_u64(cr3).unwrap() & !0xFFF) as u32 + 3 * 8;
    let pmd = g.mem.read_u64(pmd_at).unwrap();
    g.mem.write_u64(pmd_at, pmd | 1 << 55).unwrap();
    let t = kill_text(sp.demand_fault(&mut g.mem, &mut b, 0x60_0000, 0));
    assert!(
        t.contains("(PMD at ") && t.ends_with("reserved bits set"),
        "{t}"
    );
    let pdpte = g.mem.read_u64(cr3 + 8).unwrap();
    g.mem.write_u64(cr3 + 8, pdpte | 0x6).unwrap();
    let t = kill_text(sp.demand_fault(&mut g.mem, &mut b, 0x4000_0000, 0));
    assert!(
        t.contains("(PDPT at ") && t.ends_with("flags 0x6 not allowed"),
        "{t}"
    );
    assert!(
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_0000, 1 << 63 | 0x1021)
            .is_err()
    );
    assert!(sp.set_pgd(&mut g.mem, &mut b, cr3, 3).is_ok());
    assert_eq!(
        sp.set_pgd(&mut g.mem, &mut b, cr3, 4).unwrap_err().as_str(),
        "attempt to set pgd 4/4"
    );
    assert!(sp.set_pmd(&mut g.mem, &mut b, 0x1000, 512).is_err());
    sp.release_all(&mut b);
    assert_eq!(b.live(), 0);
}

#[test]
fn set_pte_installs_accessed_entries_and_write_protects_clean_ones() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, cr3) = setup(fmt);
        g.map(cr3, 0x40_0000, 0x5000 | 0x67, 0x67);
        let root = sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap().root;
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 6),
            Fault::Fixed
        );
        // Same PT: A set, clean, RW → installed at once, read-only.
        let at = g.map(cr3, 0x40_1000, 0x6000 | 0x27, 0x67);
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_1000, 0x6000 | 0x27)
            .unwrap();
        assert_eq!(
            hw(&b, root, 0x40_1000),
            Some((GUEST_BASE + 0x6000, false, true))
        );
        // Dirty: writable.
        g.write(at, 0x6000 | 0x67);
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_1000, 0x6000 | 0x67)
            .unwrap();
        assert_eq!(
            hw(&b, root, 0x40_1000),
            Some((GUEST_BASE + 0x6000, true, true))
        );
        assert_eq!(sp.take_flush(), Flush::Page(0x40_1000));
        // Neither A nor D: removed, filled on demand.
        g.write(at, 0x7000 | 0x07);
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_1000, 0x7000 | 0x07)
            .unwrap();
        assert_eq!(hw(&b, root, 0x40_1000), None);
        assert_eq!(sp.take_flush(), Flush::Page(0x40_1000));
        // Not present, or no PT yet: nothing to do, nothing allocated.
        let frames = sp.frames();
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x1000_0000, 0x5000 | 0x67)
            .unwrap();
        assert_eq!(sp.frames(), frames);
        assert_eq!(hw(&b, root, 0x1000_0000), None);
        // A SET_PTE for another, uncached gpgdir is ignored.
        sp.set_pte(&mut g.mem, &mut b, 0x2000, 0x40_0000, 0)
            .unwrap();
        assert!(hw(&b, root, 0x40_0000).is_some());
        // The GLOBAL bit is dropped.
        g.write(at, 0x7000 | 0x167);
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_1000, 0x7000 | 0x167)
            .unwrap();
        check_faithful(&sp, &b, &g.mem, 0, cr3);
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

/// Two address spaces sharing the kernel half, as Linux builds them (the
/// kernel page table for 0xC000_0000.. exists, mapping 0xC000_0000 to
/// 0x3000).
fn two_spaces(g: &mut Guest) -> (u32, u32) {
    let a = g.pgdir();
    g.map(a, 0xC000_0000, 0x3000 | 0x63, 0x63);
    let bb = g.pgdir();
    match g.fmt {
        Format::TwoLevel => {
            for i in 768..1024 {
                let e = g.mem.read_u32(a + i * 4).unwrap();
                g.mem.write_u32(bb + i * 4, e).unwrap();
            }
        }
        Format::Pae => {
            let e = g.mem.read_u64(a + 24).unwrap();
            g.mem.write_u64(bb + 24, e).unwrap();
        }
    }
    (a, bb)
}

#[test]
fn kernel_set_pte_reaches_every_cached_shadow() {
    for fmt in FORMATS {
        let mut sp = ShadowPaging::new(config(fmt)).unwrap();
        let mut b = Fake::new();
        let mut g = Guest::new(fmt);
        // The kernel PTE page first, then both spaces share it.
        let a = g.pgdir();
        let at = g.map(a, 0xC000_0000, 0x3000 | 0x63, 0x63);
        let (a2, c) = {
            let c = g.pgdir();
            match fmt {
                Format::TwoLevel => {
                    let e = g.mem.read_u32(a + 768 * 4).unwrap();
                    g.mem.write_u32(c + 768 * 4, e).unwrap();
                }
                Format::Pae => {
                    let e = g.mem.read_u64(a + 24).unwrap();
                    g.mem.write_u64(c + 24, e).unwrap();
                }
            }
            (a, c)
        };
        let ra = sp.new_pgtable(&mut g.mem, &mut b, a2).unwrap().root;
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0xC000_0000, 2),
            Fault::Fixed
        );
        let rc = sp.new_pgtable(&mut g.mem, &mut b, c).unwrap().root;
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0xC000_0000, 0),
            Fault::Fixed
        );
        assert_eq!(
            hw(&b, ra, 0xC000_0000),
            Some((GUEST_BASE + 0x3000, true, false))
        );
        assert_eq!(
            hw(&b, rc, 0xC000_0000),
            Some((GUEST_BASE + 0x3000, true, false))
        );
        // The kernel remaps the page while `c` is current.
        g.write(at, 0x9000 | 0x63);
        sp.set_pte(&mut g.mem, &mut b, c, 0xC000_0000, 0x9000 | 0x63)
            .unwrap();
        assert_eq!(
            hw(&b, ra, 0xC000_0000),
            Some((GUEST_BASE + 0x9000, true, false))
        );
        assert_eq!(
            hw(&b, rc, 0xC000_0000),
            Some((GUEST_BASE + 0x9000, true, false))
        );
        assert_eq!(sp.take_flush(), Flush::Page(0xC000_0000));
        // `a` changed while not loaded: its PCID must be flushed on the way
        // back; a second switch without changes keeps the TLB.
        let sw = sp.new_pgtable(&mut g.mem, &mut b, a2).unwrap();
        assert!(sw.hit && sw.flush);
        let sw = sp.new_pgtable(&mut g.mem, &mut b, c).unwrap();
        assert!(sw.hit && !sw.flush);
        let sw = sp.new_pgtable(&mut g.mem, &mut b, a2).unwrap();
        assert!(sw.hit && !sw.flush);
        check_faithful(&sp, &b, &g.mem, sp.current_slot().unwrap(), a2);
        assert_eq!(sp.stats().hits, 3);
        assert_eq!(sp.stats().misses, 2);
        // An invalidation owed to the loaded shadow and not taken before a
        // switch is not lost: that slot needs a flush when it comes back.
        g.write(at, 0x3000 | 0x63);
        sp.set_pte(&mut g.mem, &mut b, a2, 0xC000_0000, 0x3000 | 0x63)
            .unwrap();
        assert!(sp.new_pgtable(&mut g.mem, &mut b, c).unwrap().flush);
        assert!(sp.new_pgtable(&mut g.mem, &mut b, a2).unwrap().flush);
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

#[test]
fn flush_tlb_user_half_and_all() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, _) = setup(fmt);
        let (a, c) = two_spaces(&mut g);
        g.map(a, 0xC000_0000, 0x3000 | 0x63, 0x63);
        g.map(a, 0x40_0000, 0x4000 | 0x67, 0x67);
        g.map(c, 0x40_0000, 0x5000 | 0x67, 0x67);
        let ra = sp.new_pgtable(&mut g.mem, &mut b, a).unwrap().root;
        for va in [0xC000_0000, 0x40_0000] {
            assert_eq!(sp.demand_fault(&mut g.mem, &mut b, va, 0), Fault::Fixed);
        }
        sp.flush_tlb(&mut g.mem, &mut b, false).unwrap();
        assert_eq!(sp.take_flush(), Flush::All);
        assert!(hw(&b, ra, 0x40_0000).is_none());
        assert!(hw(&b, ra, 0xC000_0000).is_some());
        let rc = sp.new_pgtable(&mut g.mem, &mut b, c).unwrap().root;
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 0),
            Fault::Fixed
        );
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0xC000_0000, 0),
            Fault::Fixed
        );
        sp.flush_tlb(&mut g.mem, &mut b, true).unwrap();
        for (r, va) in [(ra, 0xC000_0000), (rc, 0x40_0000), (rc, 0xC000_0000)] {
            assert!(hw(&b, r, va).is_none());
        }
        // Both shadows stay cached with their PML4, PDPT and their two PDs,
        // emptied (kept for the next fill): no page table is left.
        assert_eq!(sp.frames(), 4 + 4);
        for r in [ra, rc] {
            assert_eq!(pd_entries(&b, r), 0);
        }
        assert!(sp.new_pgtable(&mut g.mem, &mut b, a).unwrap().flush);
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

#[test]
fn pae_set_pmd_drops_exactly_that_pmd_entry_everywhere() {
    let (mut sp, mut b, mut g, _) = setup(Format::Pae);
    let (a, c) = two_spaces(&mut g);
    // Two kernel 2 MiB regions in the shared kernel PMD, one user region.
    let at = g.map(a, 0xC000_0000, 0x3000 | 0x63, 0x63);
    g.map(a, 0xC020_0000, 0x4000 | 0x63, 0x63);
    g.map(a, 0x40_0000, 0x5000 | 0x67, 0x67);
    let ra = sp.new_pgtable(&mut g.mem, &mut b, a).unwrap().root;
    for va in [0xC000_0000, 0xC020_0000, 0x40_0000] {
        assert_eq!(sp.demand_fault(&mut g.mem, &mut b, va, 0), Fault::Fixed);
    }
    let rc = sp.new_pgtable(&mut g.mem, &mut b, c).unwrap().root;
    assert_eq!(
        sp.demand_fault(&mut g.mem, &mut b, 0xC000_0000, 0),
        Fault::Fixed
    );
    // The guest points kernel PMD entry 0 at a new PTE page.
    let kpmd = (g.mem.read_u64(a + 24).unwrap() & !0xFFF) as u32;
    let newpt = g.page();
    g.mem.write_u64(newpt, 0x7000 | 0x63).unwrap();
    g.mem.write_u64(kpmd, u64::from(newpt) | 0x63).unwrap();
    let _ = at;
    sp.set_pmd(&mut g.mem, &mut b, kpmd, 0).unwrap();
    assert!(hw(&b, ra, 0xC000_0000).is_none());
    assert!(hw(&b, rc, 0xC000_0000).is_none());
    assert!(hw(&b, ra, 0xC020_0000).is_some());
    assert!(hw(&b, ra, 0x40_0000).is_some());
    assert_eq!(
        sp.demand_fault(&mut g.mem, &mut b, 0xC000_0000, 0),
        Fault::Fixed
    );
    assert_eq!(hw(&b, rc, 0xC000_0000).unwrap().0, GUEST_BASE + 0x7000);
    check_faithful(&sp, &b, &g.mem, 0, a);
    check_faithful(&sp, &b, &g.mem, 1, c);
    sp.release_all(&mut b);
    assert_eq!(b.live(), 0);
}

#[test]
fn set_pgd_frees_the_slot_of_the_matching_shadow_only() {
    let (mut sp, mut b, mut g, _) = setup(Format::TwoLevel);
    let (a, c) = two_spaces(&mut g);
    // 2-level PGD entry 1 = PD entries 2 and 3: fill both halves.
    g.map(a, 0x40_0000, 0x4000 | 0x67, 0x67);
    g.map(a, 0x60_0000, 0x5000 | 0x67, 0x67);
    g.map(c, 0x40_0000, 0x6000 | 0x67, 0x67);
    let ra = sp.new_pgtable(&mut g.mem, &mut b, a).unwrap().root;
    for va in [0x40_0000, 0x60_0000] {
        assert_eq!(sp.demand_fault(&mut g.mem, &mut b, va, 0), Fault::Fixed);
    }
    let rc = sp.new_pgtable(&mut g.mem, &mut b, c).unwrap().root;
    assert_eq!(
        sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 0),
        Fault::Fixed
    );
    // 2 × (PML4 + PDPT) + a: PD + 2 PTs, c: PD + PT.
    assert_eq!(sp.frames(), 4 + 3 + 2);
    sp.set_pgd(&mut g.mem, &mut b, a, 1).unwrap();
    assert_eq!(sp.frames(), 4 + 1 + 2);
    assert!(hw(&b, ra, 0x40_0000).is_none() && hw(&b, ra, 0x60_0000).is_none());
    assert!(hw(&b, rc, 0x40_0000).is_some());
    // Uncached gpgdir: nothing.
    sp.set_pgd(&mut g.mem, &mut b, 0x7000, 1).unwrap();
    assert!(hw(&b, rc, 0x40_0000).is_some());
    sp.release_all(&mut b);
    assert_eq!(b.live(), 0);
}

#[test]
fn stack_is_pinned_and_repinned() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, _) = setup(fmt);
        let (a, c) = two_spaces(&mut g);
        let s0 = g.map(a, 0xC000_0000, 0x3000 | 0x23, 0x63);
        g.map(a, 0xC000_1000, 0x4000 | 0x03, 0x63);
        // Recorded in linear mode, pinned at the first NEW_PGTABLE.
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_2000, 2).unwrap();
        let sw = sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        assert!(sw.repinned);
        for va in [0xC000_0000, 0xC000_1000] {
            assert!(hw(&b, sw.root, va).unwrap().1, "{va:#x} not writable");
        }
        // Pinning is a write: the guest's PTEs are now accessed and dirty.
        assert_eq!(g.read(s0) & 0x60, 0x60);
        // The pinned pages as the shadow maps them: where the guest's tables
        // say, read without a walk; a page the shadow does not map: none.
        for (va, gpa) in [(0xC000_0FF0_u32, 0x3FF0_u32), (0xC000_1004, 0x4004)] {
            assert_eq!(sp.shadow_writable_gpa(&b, va), Some(gpa), "{va:#x}");
            assert_eq!(
                sp.translate_quiet(&g.mem, va, Access::KERNEL_WRITE),
                Some(gpa)
            );
        }
        assert_eq!(sp.shadow_writable_gpa(&b, 0xC000_3000), None);
        // A fresh shadow, a flush of everything: pinned again.
        let sw = sp.new_pgtable(&mut g.mem, &mut b, c).unwrap();
        assert!(sw.repinned && hw(&b, sw.root, 0xC000_1000).unwrap().1);
        sp.flush_tlb(&mut g.mem, &mut b, true).unwrap();
        assert!(hw(&b, sw.root, 0xC000_1000).unwrap().1);
        // A SET_PTE that write-protects a stack page is undone by the pin.
        g.write(s0, 0x3000 | 0x23);
        sp.set_pte(&mut g.mem, &mut b, c, 0xC000_0000, 0x3000 | 0x23)
            .unwrap();
        assert!(hw(&b, sw.root, 0xC000_0000).unwrap().1);
        // Back to `a`: cached, but the flush emptied it, so re-pinned.
        let sw = sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        assert!(sw.hit && sw.repinned);
        // Bad stacks.
        let e = sp
            .pin_stack(&mut g.mem, &mut b, 0xC000_4000, 1)
            .unwrap_err();
        assert_eq!(e.as_str(), "bad stack page 0xc0003000");
        g.map(a, 0xC000_5000, 0x6000 | 0x21, 0x63);
        let e = sp
            .pin_stack(&mut g.mem, &mut b, 0xC000_6000, 1)
            .unwrap_err();
        assert_eq!(e.as_str(), "bad stack page 0xc0005000");
        assert_eq!(
            sp.pin_stack(&mut g.mem, &mut b, 0xC000_6000, 0)
                .unwrap_err()
                .as_str(),
            "bad stack pages 0"
        );
        assert!(sp.pin_stack(&mut g.mem, &mut b, 0xC000_6000, 3).is_err());
        assert!(sp.pin_stack(&mut g.mem, &mut b, 0x1000, 2).is_err());
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

#[test]
fn translate_for_host_follows_the_current_tables() {
    let (mut sp, mut b, mut g, cr3) = setup(Format::TwoLevel);
    // Linear mode first.
    assert_eq!(
        sp.translate_for_host(&mut g.mem, 0x1234, Access::KERNEL_WRITE),
        Ok(0x1234)
    );
    assert!(
        sp.translate_for_host(&mut g.mem, MEM, Access::KERNEL_READ)
            .is_err()
    );
    let at = g.map(cr3, 0xC000_0000, 0x3000 | 0x63, 0x63);
    g.map(cr3, 0xC000_1000, 0x4000 | 0x61, 0x63);
    sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
    assert_eq!(
        sp.translate_for_host(&mut g.mem, 0xC000_0FFC, Access::KERNEL_WRITE),
        Ok(0x3ffc)
    );
    assert_eq!(g.read(at) & 0x60, 0x60);
    assert_eq!(
        sp.translate_for_host(&mut g.mem, 0xC000_1000, Access::KERNEL_WRITE),
        Err(WalkError::Protection)
    );
    assert!(
        sp.translate_for_host(&mut g.mem, 0xC000_2000, Access::KERNEL_READ)
            .is_err()
    );
    sp.release_all(&mut b);
}

#[test]
fn self_mapping_page_table_edited_behind_the_hosts_back() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, cr3) = setup(fmt);
        // The PTE page for 0x40_0000.. maps itself at 0x40_0000, writable.
        let at = g.map(cr3, 0x40_0000, 0, 0x67);
        let pt = at & !0xFFF;
        g.write(at, u64::from(pt) | 0x67);
        let w_at = g.map(cr3, 0x40_1000, 0x5000 | 0x67, 0x67);
        let root = sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap().root;
        for va in [0x40_0000, 0x40_1000] {
            assert_eq!(sp.demand_fault(&mut g.mem, &mut b, va, 6), Fault::Fixed);
        }
        assert_eq!(
            hw(&b, root, 0x40_0000),
            Some((GUEST_BASE + u64::from(pt), true, true))
        );
        // Through its own writable mapping the guest points 0x40_1000 at
        // another page and makes its self-mapping read-only.
        g.write(w_at, 0x6000 | 0x67);
        g.write(at, u64::from(pt) | 0x65);
        // Stale until the guest makes the calls it must make.
        assert_eq!(hw(&b, root, 0x40_1000).unwrap().0, GUEST_BASE + 0x5000);
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_1000, 0x6000 | 0x67)
            .unwrap();
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_0000, u64::from(pt) | 0x65)
            .unwrap();
        assert_eq!(hw(&b, root, 0x40_1000).unwrap().0, GUEST_BASE + 0x6000);
        assert_eq!(
            hw(&b, root, 0x40_0000),
            Some((GUEST_BASE + u64::from(pt), false, true))
        );
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 7),
            Fault::Reflect { errcode: 7 }
        );
        check_faithful(&sp, &b, &g.mem, 0, cr3);
        // Same with FLUSH_TLB instead of SET_PTE.
        g.write(at, u64::from(pt) | 0x67);
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_0000, u64::from(pt) | 0x67)
            .unwrap();
        g.write(w_at, 0x7000 | 0x27);
        g.write(at, u64::from(pt) | 0x25);
        sp.flush_tlb(&mut g.mem, &mut b, false).unwrap();
        assert!(hw(&b, root, 0x40_0000).is_none() && hw(&b, root, 0x40_1000).is_none());
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0x40_1000, 4),
            Fault::Fixed
        );
        assert_eq!(
            hw(&b, root, 0x40_1000),
            Some((GUEST_BASE + 0x7000, false, true))
        );
        check_faithful(&sp, &b, &g.mem, 0, cr3);
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

#[test]
fn frame_cap_evicts_instead_of_growing() {
    for fmt in FORMATS {
        let mut cfg = config(fmt);
        cfg.max_frames = MIN_FRAMES;
        let mut sp = ShadowPaging::new(cfg).unwrap();
        let mut b = Fake::new();
        let mut g = Guest::new(fmt);
        let spaces: Vec<u32> = (0..6).map(|_| g.pgdir()).collect();
        for (n, &s) in spaces.iter().enumerate() {
            // Each space maps 8 pages 2 MiB apart (one PT each).
            for i in 0..8u32 {
                g.map(
                    s,
                    0x100_0000 + i * 0x20_0000,
                    u64::from(0x1000 * (n as u32 + 1)) | 0x67,
                    0x67,
                );
            }
        }
        for round in 0..3 {
            for &s in &spaces {
                sp.new_pgtable(&mut g.mem, &mut b, s).unwrap();
                for i in 0..8u32 {
                    let va = 0x100_0000 + i * 0x20_0000;
                    assert_eq!(sp.demand_fault(&mut g.mem, &mut b, va, 2), Fault::Fixed);
                    assert!(sp.frames() <= MIN_FRAMES, "round {round}: {}", sp.frames());
                    assert_eq!(sp.frames(), b.live());
                    let root = sp.current_root().unwrap();
                    assert!(hw(&b, root, va).is_some());
                }
                let slot = sp.current_slot().unwrap();
                check_faithful(&sp, &b, &g.mem, slot, s);
            }
        }
        assert!(sp.stats().evictions > 0);
        assert!(sp.stats().peak_frames <= MIN_FRAMES);
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

#[test]
fn host_out_of_memory_evicts_then_kills_without_panicking() {
    let (mut sp, mut b, mut g, _) = setup(Format::TwoLevel);
    let (a, c) = two_spaces(&mut g);
    g.map(a, 0x40_0000, 0x4000 | 0x67, 0x67);
    g.map(c, 0x40_0000, 0x4000 | 0x67, 0x67);
    g.map(c, 0x4000_0000, 0x4000 | 0x67, 0x67);
    sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
    assert_eq!(
        sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 0),
        Fault::Fixed
    );
    sp.new_pgtable(&mut g.mem, &mut b, c).unwrap();
    // No more frames from the host: `a` (4 frames) is evicted to fill `c`.
    b.budget = Some(0);
    assert_eq!(
        sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 0),
        Fault::Fixed
    );
    assert_eq!(sp.cached().count(), 1);
    // Then `c`'s own tables are recycled for the next fill…
    assert_eq!(
        sp.demand_fault(&mut g.mem, &mut b, 0x4000_0000, 0),
        Fault::Fixed
    );
    // A switch to `a` with a free slot but no frame: `c` is emptied.
    let ev = sp.stats().evictions;
    sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
    assert_eq!(sp.stats().evictions, ev + 1);
    assert_eq!(sp.frames(), 4);
    // A host with nothing at all, even after every eviction: kills, no
    // panic, and the books still balance.
    b.budget = Some(0);
    b.dead = true;
    assert_eq!(
        kill_text(sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 0)),
        "out of memory for shadow page tables"
    );
    assert_eq!(sp.frames(), 2);
    let other = g.pgdir();
    let e = sp.new_pgtable(&mut g.mem, &mut b, other).unwrap_err();
    assert_eq!(e.as_str(), "out of memory for shadow page tables");
    assert_eq!(sp.frames(), b.live());
    sp.release_all(&mut b);
    assert_eq!(b.live(), 0);
}

#[test]
fn fork_like_loop_returns_to_baseline() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, _) = setup(fmt);
        let parent = g.pgdir();
        g.map(parent, 0xC000_0000, 0x3000 | 0x63, 0x63);
        g.map(parent, 0x40_0000, 0x4000 | 0x67, 0x67);
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, parent).unwrap();
        assert_eq!(
            sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 2),
            Fault::Fixed
        );
        let baseline = sp.frames();
        let guest_next = g.next;
        let mut after = Vec::new();
        for _ in 0..100 {
            // "fork": a child space sharing the kernel half, 16 pages.
            g.next = guest_next;
            let child = g.pgdir();
            match fmt {
                Format::TwoLevel => {
                    let e = g.mem.read_u32(parent + 768 * 4).unwrap();
                    g.mem.write_u32(child + 768 * 4, e).unwrap();
                }
                Format::Pae => {
                    let e = g.mem.read_u64(parent + 24).unwrap();
                    g.mem.write_u64(child + 24, e).unwrap();
                }
            }
            for i in 0..16 {
                g.map(
                    child,
                    0x40_0000 + i * 0x1000,
                    (0x10_0000 + u64::from(i) * 0x1000) | 0x67,
                    0x67,
                );
            }
            sp.new_pgtable(&mut g.mem, &mut b, child).unwrap();
            for i in 0..16 {
                assert_eq!(
                    sp.demand_fault(&mut g.mem, &mut b, 0x40_0000 + i * 0x1000, 6),
                    Fault::Fixed
                );
            }
            // "exit + wait": the child's tables are torn down, the parent
            // runs, the child's user mappings are flushed.
            sp.set_pgd(&mut g.mem, &mut b, child, g.fmt.top_index(0x40_0000))
                .unwrap();
            sp.new_pgtable(&mut g.mem, &mut b, parent).unwrap();
            assert!(hw(&b, sp.current_root().unwrap(), 0xC000_0000).unwrap().1);
            after.push(sp.frames());
            assert_eq!(sp.frames(), b.live());
        }
        // Steady state: no growth with the number of forks, and only the
        // cached children's roots on top of the baseline.
        assert_eq!(after[9], after[99]);
        assert!(
            after[99] <= baseline + (DEFAULT_CACHE_SIZE - 1) * 4,
            "{after:?}"
        );
        // The children are gone for good after a full flush of the parent
        // (every child slot reused): releasing returns everything.
        sp.release_all(&mut b);
        assert_eq!((sp.frames(), b.live()), (0, 0));
    }
}

#[test]
fn policies_and_hit_counters() {
    for (policy, n, want_hits) in [
        (Policy::Lru, 4, 4 * 9),
        (Policy::Lru, 8, 0),
        (Policy::Fifo, 4, 4 * 9),
        (Policy::Lru, 2, 2 * 9),
    ] {
        let mut cfg = config(Format::TwoLevel);
        cfg.policy = policy;
        let mut sp = ShadowPaging::new(cfg).unwrap();
        let mut b = Fake::new();
        let mut g = Guest::new(Format::TwoLevel);
        let spaces: Vec<u32> = (0..n).map(|_| g.pgdir()).collect();
        for _ in 0..10 {
            for &s in &spaces {
                sp.new_pgtable(&mut g.mem, &mut b, s).unwrap();
            }
        }
        assert_eq!(sp.stats().hits, want_hits, "{policy:?} {n}");
        assert_eq!(sp.stats().hits + sp.stats().misses, 10 * n as u64);
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
    // Random: deterministic for a seed, and better than LRU on a round
    // robin longer than the cache.
    let run = |seed| {
        let mut cfg = config(Format::TwoLevel);
        cfg.policy = Policy::Random { seed };
        let mut sp = ShadowPaging::new(cfg).unwrap();
        let mut b = Fake::new();
        let mut g = Guest::new(Format::TwoLevel);
        let spaces: Vec<u32> = (0..6).map(|_| g.pgdir()).collect();
        for _ in 0..50 {
            for &s in &spaces {
                sp.new_pgtable(&mut g.mem, &mut b, s).unwrap();
            }
        }
        sp.release_all(&mut b);
        sp.stats().hits
    };
    assert_eq!(run(7), run(7));
    assert!(run(7) > 0);
}

#[test]
fn config_is_checked() {
    let ok = config(Format::Pae);
    assert!(ShadowPaging::new(ok).is_ok());
    let bad = |f: fn(&mut ShadowConfig)| {
        let mut c = ok;
        f(&mut c);
        ShadowPaging::new(c).unwrap_err()
    };
    assert_eq!(bad(|c| c.guest_base = 0x1234), ConfigError::GuestBase);
    assert_eq!(
        bad(|c| c.guest_base = PHYS_ADDR_LIMIT - 4096),
        ConfigError::GuestBase
    );
    assert_eq!(bad(|c| c.pfnlimit = 0), ConfigError::PfnLimit);
    assert_eq!(bad(|c| c.pfnlimit = (1 << 20) + 1), ConfigError::PfnLimit);
    assert_eq!(
        bad(|c| c.kernel_address = 0xC010_0000),
        ConfigError::KernelAddress
    );
    assert_eq!(bad(|c| c.cache_size = 0), ConfigError::CacheSize);
    assert_eq!(
        bad(|c| c.cache_size = MAX_CACHE_SIZE + 1),
        ConfigError::CacheSize
    );
    assert_eq!(
        bad(|c| c.max_frames = MIN_FRAMES - 1),
        ConfigError::MaxFrames
    );
    assert_eq!(bad(|c| c.host_pml4 = 8), ConfigError::HostPml4);
    assert!(check_kernel_address(0xB000_0000).is_ok());
    assert!(check_kernel_address(0).is_ok());
    assert_eq!(
        check_kernel_address(0xC000_1000).unwrap_err().as_str(),
        "bad kernel address 0xc0001000"
    );
    assert_eq!(Flush::None.merge(Flush::Page(1)), Flush::Page(1));
    assert_eq!(Flush::Page(1).merge(Flush::Page(1)), Flush::Page(1));
    assert_eq!(Flush::Page(1).merge(Flush::Page(2)), Flush::All);
    assert_eq!(Flush::All.merge(Flush::None), Flush::All);
}

#[test]
fn phys_backend_adapter() {
    use std::cell::RefCell;
    #[derive(Default)]
    struct Words(HashMap<u64, u64>);
    impl PhysMemory for Words {
        fn read_u64(&self, phys: u64) -> u64 {
            self.0.get(&phys).copied().unwrap_or(0)
        }
        fn write_u64(&mut self, phys: u64, val: u64) {
            self.0.insert(phys, val);
        }
        fn zero_frame(&mut self, phys: u64) {
            for i in 0..512 {
                self.0.insert(phys + i * 8, 0);
            }
        }
    }
    struct Bump(u64);
    impl FrameSource for Bump {
        fn alloc_table_frame(&mut self) -> Option<u64> {
            self.0 += 4096;
            Some(self.0)
        }
    }
    let freed = RefCell::new(HashSet::new());
    let mut b = PhysBackend {
        mem: Words::default(),
        frames: Bump(0x200_0000),
        release: |f| assert!(freed.borrow_mut().insert(f)),
    };
    b.mem.write_u64(HOST_PML4 + 511 * 8, 0xdead_0003);
    let mut g = Guest::new(Format::TwoLevel);
    let cr3 = g.pgdir();
    g.map(cr3, 0x40_0000, 0x4000 | 0x67, 0x67);
    let mut sp = ShadowPaging::new(config(Format::TwoLevel)).unwrap();
    let root = sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap().root;
    assert_eq!(b.read(root, 511), 0xdead_0003);
    assert_eq!(
        sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 2),
        Fault::Fixed
    );
    assert_eq!(sp.frames(), 4);
    sp.release_all(&mut b);
    assert_eq!(freed.borrow().len(), 4);
}

/// The property: random guest tables (kernel half shared, as the ABI
/// promises), random accesses and random update sequences, with the
/// guest always making the hypercalls it must. After every step each
/// cached shadow maps nothing the guest does not, with no more rights, the
/// stack stays pinned, and the frame count matches the backend and the cap.
fn property(fmt: Format, seed: u64, cache_size: usize, max_frames: usize, steps: usize) {
    let mut rng = Rng(seed);
    let mut cfg = config(fmt);
    cfg.cache_size = cache_size;
    cfg.max_frames = max_frames;
    let mut sp = ShadowPaging::new(cfg).unwrap();
    let mut b = Fake::new();
    let mut g = Guest::new(fmt);
    // The kernel half: one shared table level (2-level: PGD entries 768..;
    // PAE: the PMD page of PDPT entry 3), two kernel PTE pages.
    let first = g.pgdir();
    for kva in [0xC000_0000u32, 0xC040_0000] {
        g.map(first, kva, 0x3000 | 0x63, 0x63);
    }
    let stack_pte = g.map(first, 0xC000_1000, 0x4000 | 0x63, 0x63);
    let copy_kernel = |g: &mut Guest, to: u32| match fmt {
        Format::TwoLevel => {
            for i in 768..1024 {
                let e = g.mem.read_u32(first + i * 4).unwrap();
                g.mem.write_u32(to + i * 4, e).unwrap();
            }
        }
        Format::Pae => {
            let e = g.mem.read_u64(first + 24).unwrap();
            g.mem.write_u64(to + 24, e).unwrap();
        }
    };
    let mut spaces = vec![first];
    for _ in 0..5 {
        let s = g.pgdir();
        copy_kernel(&mut g, s);
        spaces.push(s);
    }
    sp.pin_stack(&mut g.mem, &mut b, 0xC000_2000, 1).unwrap();
    let user_regions = [0x0000_0000u32, 0x0040_0000, 0x4000_0000];
    let pick_va = |rng: &mut Rng| -> u32 {
        let r = rng.next_u64();
        let page = (r >> 8) as u32 % 64;
        match r % 4 {
            3 => [0xC000_0000u32, 0xC040_0000][(r >> 20) as usize % 2] + page * 0x1000,
            k => user_regions[k as usize] + page * 0x1000,
        }
    };
    let rand_pte = |rng: &mut Rng| -> u64 {
        let r = rng.next_u64();
        let pfn = (r >> 16) % u64::from(PFNLIMIT);
        let flags = r & 0x67 & if r & 0x100 == 0 { !0 } else { !1 };
        pfn << 12 | flags
    };
    for step in 0..steps {
        let cur = sp.current_gpgdir();
        let op = rng.next_u64() % 100;
        match op {
            0..=9 => {
                let s = spaces[rng.next_u64() as usize % spaces.len()];
                let sw = sp.new_pgtable(&mut g.mem, &mut b, s).unwrap();
                assert_eq!(sp.current_root(), Some(sw.root));
            }
            10..=59 => {
                let Some(cr3) = cur else { continue };
                let va = pick_va(&mut rng);
                let err = (rng.next_u64() & 6) as u32;
                let root = sp.current_root().unwrap();
                let access = Access::from_errcode(err);
                let allowed = |h: Option<(u64, bool, bool)>| {
                    h.is_some_and(|(_, w, u)| (w || !access.write) && (u || !access.user))
                };
                if allowed(hw(&b, root, va)) {
                    continue;
                }
                let want = guest(&g.mem, fmt, cr3, va);
                // The fast fill either does exactly what demand_fault does,
                // or nothing at all.
                let (mut fsp, mut fb, mut fmem) = (sp.clone(), b.clone(), g.mem.clone());
                let fast_outcome = fsp.fast_fill(&mut fmem, &mut fb, va, err);
                let fast = fast_outcome.is_some();
                if !fast {
                    assert!(
                        fb == b && fmem == g.mem,
                        "step {step}: declined but changed"
                    );
                    assert_eq!(fsp.stats(), sp.stats(), "step {step}");
                }
                let before = (sp.clone(), b.clone(), g.mem.clone());
                let outcome = sp.demand_fault(&mut g.mem, &mut b, va, err);
                if let Some(f) = fast_outcome {
                    assert_eq!(outcome, f, "step {step}: fast outcome differs");
                    assert!(fb == b && fmem == g.mem, "step {step}: fast fill differs");
                    assert_eq!(fsp.stats(), sp.stats(), "step {step}");
                    assert_eq!(fsp.take_flush(), sp.clone().take_flush(), "step {step}");
                    let counter = if f == Fault::Fixed {
                        &FAST_FILLS
                    } else {
                        &FAST_REFLECTS
                    };
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = before;
                match outcome {
                    Fault::Fixed => {
                        let (_, w, u, _) = want.unwrap();
                        assert!((w || !access.write) && (u || !access.user));
                        assert!(allowed(hw(&b, root, va)), "step {step}: still faults");
                    }
                    Fault::Reflect { errcode } => {
                        let ok = want.is_some_and(|(_, w, u, _)| {
                            (w || !access.write) && (u || !access.user)
                        });
                        assert!(!ok, "step {step}: reflected a good access at {va:#x}");
                        assert_eq!(errcode & 1 != 0, want.is_some());
                    }
                    Fault::Kill(k) => panic!("step {step}: {k}"),
                }
            }
            60..=79 => {
                // SET_PTE: kernel (any space) or a space's user page.
                let va = pick_va(&mut rng);
                if va & !0xFFF == 0xC000_1000 {
                    continue;
                }
                let s = spaces[rng.next_u64() as usize % spaces.len()];
                let pte = rand_pte(&mut rng);
                let tflags = if va >= KA {
                    0x63
                } else {
                    [0x67, 0x63, 0x65, 0x27][rng.next_u64() as usize % 4]
                };
                let before = g.next;
                g.map(s, va, pte, tflags);
                if g.next != before {
                    // A new PTE page: the guest's SET_PGD / SET_PMD.
                    if va >= KA {
                        for &o in &spaces {
                            copy_kernel(&mut g, o);
                        }
                    }
                    match fmt {
                        Format::TwoLevel => {
                            let targets = if va >= KA { spaces.clone() } else { vec![s] };
                            for t in targets {
                                sp.set_pgd(&mut g.mem, &mut b, t, va >> 22).unwrap();
                            }
                        }
                        Format::Pae => {
                            let pmd = (g.mem.read_u64(s + (va >> 30) * 8).unwrap() & !0xFFF) as u32;
                            sp.set_pmd(&mut g.mem, &mut b, pmd, (va >> 21) & 511)
                                .unwrap();
                        }
                    }
                }
                // The lane's fast SET_PTE either does exactly what
                // set_pte does, or nothing at all.
                let (mut fsp, mut fb) = (sp.clone(), b.clone());
                let fast = fsp.fast_set_pte(&mut fb, s, va, pte);
                if !fast {
                    assert!(fb == b, "step {step}: declined but changed");
                }
                let r = sp.set_pte(&mut g.mem, &mut b, s, va, pte);
                if fast {
                    assert!(r.is_ok(), "step {step}: fast SET_PTE of one set_pte kills");
                    assert!(fb == b, "step {step}: fast SET_PTE differs");
                    assert_eq!(fsp.stats(), sp.stats(), "step {step}");
                    assert_eq!(fsp.take_flush(), sp.clone().take_flush(), "step {step}");
                    assert_eq!(fsp.pin_key(), sp.pin_key(), "step {step}");
                    FAST_SET_PTES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                r.unwrap();
            }
            80..=89 => {
                // A user table entry changes (or goes): SET_PGD / SET_PMD.
                let s = spaces[rng.next_u64() as usize % spaces.len()];
                let va = user_regions[rng.next_u64() as usize % 3];
                match fmt {
                    Format::TwoLevel => {
                        let at = s + (va >> 22) * 4;
                        let e = g.mem.read_u32(at).unwrap();
                        let flags = [0x67u32, 0x63, 0x65, 0x66][rng.next_u64() as usize % 4];
                        g.mem.write_u32(at, (e & !0xFFF) | flags).unwrap();
                        sp.set_pgd(&mut g.mem, &mut b, s, va >> 22).unwrap();
                    }
                    Format::Pae => {
                        let pmd = (g.mem.read_u64(s + (va >> 30) * 8).unwrap() & !0xFFF) as u32;
                        let at = pmd + ((va >> 21) & 511) * 8;
                        let e = g.mem.read_u64(at).unwrap();
                        let flags = [0x67u64, 0x63, 0x65, 0x66][rng.next_u64() as usize % 4];
                        g.mem.write_u64(at, (e & !0xFFF) | flags).unwrap();
                        sp.set_pmd(&mut g.mem, &mut b, pmd, (va >> 21) & 511)
                            .unwrap();
                    }
                }
            }
            _ => sp
                .flush_tlb(&mut g.mem, &mut b, op.is_multiple_of(2))
                .unwrap(),
        }
        // The invariants.
        assert_eq!(sp.frames(), b.live(), "step {step}");
        assert!(sp.frames() <= max_frames, "step {step}");
        for (slot, cr3) in sp.cached().collect::<Vec<_>>() {
            check_faithful(&sp, &b, &g.mem, slot, cr3);
        }
        if let Some(root) = sp.current_root() {
            assert!(
                hw(&b, root, 0xC000_1000).is_some_and(|h| h.1),
                "step {step}: stack"
            );
        }
        let _ = sp.take_flush();
    }
    assert_eq!(g.read(stack_pte) & 0x60, 0x60);
    assert!(sp.stats().fills > 0 && sp.stats().reflected > 0);
    sp.release_all(&mut b);
    assert_eq!((sp.frames(), b.live()), (0, 0));
}

/// Fast fills seen by the property runs (they must happen).
static FAST_FILLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// `SET_PTE`s `fast_set_pte` took in the property runs (they must happen).
static FAST_SET_PTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Faults `fast_fill` decided were the guest's own.
static FAST_REFLECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[test]
fn property_two_level() {
    property(Format::TwoLevel, 0x5EED_0001, 4, DEFAULT_MAX_FRAMES, 3000);
    property(Format::TwoLevel, 0x5EED_0002, 2, MIN_FRAMES, 3000);
}

#[test]
fn property_pae() {
    property(Format::Pae, 0x5EED_0003, 4, DEFAULT_MAX_FRAMES, 3000);
    property(Format::Pae, 0x5EED_0004, 3, MIN_FRAMES, 3000);
}

#[test]
fn fast_fill_happens_in_the_property_runs() {
    property(
        Format::TwoLevel,
        77,
        DEFAULT_CACHE_SIZE,
        DEFAULT_MAX_FRAMES,
        3000,
    );
    let fills = FAST_FILLS.load(std::sync::atomic::Ordering::Relaxed);
    let reflects = FAST_REFLECTS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        fills > 5 && reflects > 5,
        "fast fills: {fills}, reflections: {reflects}"
    );
    let set_ptes = FAST_SET_PTES.load(std::sync::atomic::Ordering::Relaxed);
    assert!(set_ptes > 5, "fast SET_PTEs: {set_ptes}");
}

/// The fast switch (the hypercall stub's) goes only to a shadow that maps
/// the kernel stack's top page where the current one does: the stub pushes
/// user-mode trap frames at the page it was armed with.
#[test]
fn fast_switch_keeps_the_stack_where_it_was() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, _) = setup(fmt);
        let (a, c) = two_spaces(&mut g);
        // A stack in the user half, mapped to the same page in both.
        g.map(a, 0x0040_0000, 0x5000 | 0x67, 0x67);
        g.map(c, 0x0040_0000, 0x5000 | 0x67, 0x67);
        sp.pin_stack(&mut g.mem, &mut b, 0x0040_1000, 1).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, c).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        let _ = sp.take_flush();
        let to_c = sp.fast_switch(c).expect("same stack page");
        assert!(to_c.hit && !to_c.flush);
        assert!(sp.fast_switch(a).is_some());
        // `c` now maps the stack page elsewhere: only the full switch.
        let d = two_spaces(&mut g).1;
        g.map(d, 0x0040_0000, 0x6000 | 0x67, 0x67);
        sp.new_pgtable(&mut g.mem, &mut b, d).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        let _ = sp.take_flush();
        assert!(sp.fast_switch(d).is_none(), "{fmt:?}");
        let sw = sp.new_pgtable(&mut g.mem, &mut b, d).unwrap();
        assert!(sw.hit);
        assert_eq!(sp.shadow_writable_gpa(&b, 0x0040_0ff0), Some(0x6ff0));
    }
}

/// A `SET_PTE` entry that is dirty but not yet accessed is installed
/// read-only: a writable leaf always means the guest's entry is accessed and
/// dirty (the host then writes there without a walk).
#[test]
fn set_pte_makes_a_writable_leaf_only_when_accessed_and_dirty() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, cr3) = setup(fmt);
        let at = g.map(cr3, 0xC000_0000, 0x3000 | 0x63, 0x63);
        let sw = sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
        assert!(
            sp.fill(
                &mut g.mem,
                &mut b,
                sp.current.unwrap(),
                0xC000_0000,
                Access::KERNEL_WRITE
            )
            .is_ok()
        );
        assert_eq!(sp.shadow_writable_gpa(&b, 0xC000_0010), Some(0x3010));
        for (bits, writable) in [(0x43u64, false), (0x23, false), (0x63, true), (0x61, false)] {
            g.write(at, 0x3000 | bits);
            sp.set_pte(&mut g.mem, &mut b, cr3, 0xC000_0000, 0x3000 | bits)
                .unwrap();
            let leaf = hw(&b, sw.root, 0xC000_0000);
            assert_eq!(leaf.map(|l| l.1), Some(writable), "{fmt:?} {bits:#x}");
            assert_eq!(
                sp.shadow_writable_gpa(&b, 0xC000_0010).is_some(),
                writable,
                "{fmt:?} {bits:#x}"
            );
        }
    }
}

/// `TableMap::take_range` against a set: random regions in, random ranges
/// (2 MiB multiples, word boundaries and the ends of the 4 GiB included)
/// out; exactly the regions inside the range come out, in order, and the
/// others stay.
#[test]
fn table_map_takes_exactly_the_range() {
    let mut rng = Rng(0x7AB1E);
    let edges = [
        0u64, 63, 64, 65, 127, 128, 511, 512, 1023, 1024, 1535, 1536, 2047, 2048,
    ];
    for round in 0..400 {
        let mut map = TableMap::EMPTY;
        let mut model = std::collections::BTreeSet::new();
        let n = 1 + rng.below(300);
        for _ in 0..n {
            let r = if rng.below(3) == 0 {
                edges[rng.below(edges.len() as u64 - 1) as usize]
            } else {
                rng.below(REGIONS as u64)
            };
            map.insert((r << 21) as u32);
            model.insert(r as usize);
        }
        let pick = |rng: &mut Rng| {
            if rng.below(2) == 0 {
                edges[rng.below(edges.len() as u64) as usize]
            } else {
                rng.below(REGIONS as u64 + 1)
            }
        };
        let (x, y) = (pick(&mut rng), pick(&mut rng));
        let (lo, hi) = (x.min(y) << 21, x.max(y) << 21);
        let mut got = Vec::new();
        map.take_range(lo, hi, |r| got.push(r));
        let want: Vec<usize> = model
            .iter()
            .copied()
            .filter(|&r| (lo >> 21..hi >> 21).contains(&(r as u64)))
            .collect();
        assert_eq!(got, want, "round {round}: [{lo:#x}, {hi:#x})");
        // What is left: everything else, taken by the whole range.
        let mut rest = Vec::new();
        map.take_range(0, FOUR_GIB, |r| rest.push(r));
        let left: Vec<usize> = model
            .iter()
            .copied()
            .filter(|r| !want.contains(r))
            .collect();
        assert_eq!(rest, left, "round {round}");
    }
}

/// Where the host may write on the kernel stack's top page follows the
/// current shadow's leaf, never a pin recorded earlier: after the guest
/// moved the page while another shadow was current (a kernel `SET_PTE`
/// reaches every shadow), and after a fault refilled the pinned page from
/// an entry the guest rewrote behind the host's back.
#[test]
fn the_stack_frame_follows_the_leaf_not_an_old_pin() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, _) = setup(fmt);
        let (a, c) = two_spaces(&mut g);
        // The stack's page, under a level that lets user mode through (so
        // that a user-mode access can fault it in below).
        let s0 = g.map(a, 0xC000_0000, 0x3000 | 0x63, 0x63);
        match fmt {
            Format::TwoLevel => {
                for dir in [a, c] {
                    let at = dir + (0xC000_0000 >> 22) * 4;
                    let e = g.mem.read_u32(at).unwrap();
                    g.mem.write_u32(at, e | 4).unwrap();
                }
            }
            Format::Pae => {
                let pmd = (g.mem.read_u64(a + 24).unwrap() & !0xFFF) as u32;
                let e = g.mem.read_u64(pmd).unwrap();
                g.mem.write_u64(pmd, e | 4).unwrap();
            }
        }
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, c).unwrap();
        let frame = 0xC000_0FEC;
        assert_eq!(sp.quiet_write_gpa(&b, &g.mem, frame), Some(0x3FEC));
        // Moved while `c` is current; back to `a` with its pinning left to
        // a `SET_STACK` still to come.
        g.write(s0, 0x5000 | 0x63);
        sp.set_pte(&mut g.mem, &mut b, c, 0xC000_0000, 0x5000 | 0x63)
            .unwrap();
        assert_eq!(sp.quiet_write_gpa(&b, &g.mem, frame), Some(0x5FEC));
        sp.new_pgtable_pin_later(&mut g.mem, &mut b, a).unwrap();
        assert_eq!(sp.quiet_write_gpa(&b, &g.mem, frame), Some(0x5FEC));
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        assert_eq!(sp.quiet_write_gpa(&b, &g.mem, frame), Some(0x5FEC));
        // Rewritten behind the host's back (user-accessible, elsewhere),
        // then a user-mode read faults on it: refilled, and the frame
        // follows (the fault re-pins from the new leaf).
        // (The page-fault stub tries `fast_fill` first: it must leave a
        // stack page to `demand_fault`.)
        g.write(s0, 0x7000 | 0x67);
        if sp.fast_fill(&mut g.mem, &mut b, 0xC000_0010, 4).is_none() {
            assert_eq!(
                sp.demand_fault(&mut g.mem, &mut b, 0xC000_0010, 4),
                Fault::Fixed
            );
        }
        assert_eq!(sp.quiet_write_gpa(&b, &g.mem, frame), Some(0x7FEC));
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

/// Each shadow remembers which stack it has pinned: a context switch back
/// to a process whose stack is pinned in its shadow fills nothing, and a
/// change of that stack's page while another shadow is current (a kernel
/// `SET_PTE` reaches every shadow) makes the next switch back pin it again.
#[test]
fn a_stack_pinned_in_a_shadow_stays_pinned_there() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, _) = setup(fmt);
        let (a, c) = two_spaces(&mut g);
        let pa = g.map(a, 0xC000_0000, 0x3000 | 0x63, 0x63);
        g.map(a, 0xC000_2000, 0x4000 | 0x63, 0x63);
        let top = |sp: &ShadowPaging| sp.pin_key().map(|e| e & ADDR_MASK);
        sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        sp.new_pgtable_pin_later(&mut g.mem, &mut b, c).unwrap();
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_3000, 1).unwrap();
        assert_eq!(top(&sp), Some(GUEST_BASE + 0x4000));
        // Back to `a` and its stack: already pinned there.
        let fills = sp.stats().fills;
        sp.new_pgtable_pin_later(&mut g.mem, &mut b, a).unwrap();
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        assert_eq!(sp.stats().fills, fills);
        assert_eq!(top(&sp), Some(GUEST_BASE + 0x3000));
        // `a`'s stack page moves while `c` runs.
        sp.new_pgtable_pin_later(&mut g.mem, &mut b, c).unwrap();
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_3000, 1).unwrap();
        g.write(pa, 0x5000 | 0x63);
        sp.set_pte(&mut g.mem, &mut b, c, 0xC000_0000, 0x5000 | 0x63)
            .unwrap();
        sp.new_pgtable_pin_later(&mut g.mem, &mut b, a).unwrap();
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        assert_eq!(top(&sp), Some(GUEST_BASE + 0x5000));
        // A flush of everything while `c` runs empties `a` too: pinned
        // again on the way back.
        sp.new_pgtable_pin_later(&mut g.mem, &mut b, c).unwrap();
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_3000, 1).unwrap();
        sp.flush_tlb(&mut g.mem, &mut b, true).unwrap();
        let ra = sp
            .new_pgtable_pin_later(&mut g.mem, &mut b, a)
            .unwrap()
            .root;
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        assert_eq!(
            hw(&b, ra, 0xC000_0000),
            Some((GUEST_BASE + 0x5000, true, false))
        );
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}

#[test]
fn chunk_bits_name_each_64_entry_chunk() {
    for idx in 0..512usize {
        let bit = chunk_bit(idx);
        assert_eq!(bit & !PDE_CHUNKS, 0, "entry {idx}: outside the chunk bits");
        assert_eq!(pde_chunks(bit), 1 << (idx / 64), "entry {idx}");
    }
}

/// Leaves written in every 64-entry chunk of a page table, by each of the
/// three writers (a fill, the fast fill, `SET_PTE`), and the tables then
/// dropped (a user-half flush, `SET_PGD`): the backend's check that a table
/// is given back zero outside the chunks its PD entry names sees each.
#[test]
fn tables_go_back_zero_outside_their_written_chunks() {
    for fmt in FORMATS {
        for writer in 0..3 {
            let (mut sp, mut b, mut g, cr3) = setup(fmt);
            // One page per chunk of the shadow PT for 0x0040_0000 (a 2 MiB
            // region: 512 pages), each mapped accessed and dirty.
            let pages: Vec<u32> = (0..8u32)
                .map(|c| 0x40_0000 + c * 64 * 0x1000 + 0x5000)
                .collect();
            for (i, &va) in pages.iter().enumerate() {
                g.map(
                    cr3,
                    va,
                    u64::from(0x20_0000 + i as u32 * 0x1000) | 0x67,
                    0x67,
                );
            }
            sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
            // The PT exists first (a fill of another page of the region).
            g.map(cr3, 0x40_0000, 0x30_0000 | 0x67, 0x67);
            assert_eq!(
                sp.demand_fault(&mut g.mem, &mut b, 0x40_0000, 4),
                Fault::Fixed
            );
            for (i, &va) in pages.iter().enumerate() {
                match writer {
                    0 => assert_eq!(sp.demand_fault(&mut g.mem, &mut b, va, 6), Fault::Fixed),
                    1 => assert_eq!(sp.fast_fill(&mut g.mem, &mut b, va, 6), Some(Fault::Fixed)),
                    _ => sp
                        .set_pte(
                            &mut g.mem,
                            &mut b,
                            cr3,
                            va,
                            u64::from(0x20_0000 + i as u32 * 0x1000) | 0x67,
                        )
                        .unwrap(),
                }
                let root = sp.current_root().unwrap();
                assert!(
                    hw(&b, root, va).is_some(),
                    "writer {writer}: {va:#x} not mapped"
                );
            }
            if writer == 2 {
                sp.set_pgd(
                    &mut g.mem,
                    &mut b,
                    cr3,
                    0x40_0000 >> if fmt == Format::Pae { 30 } else { 22 },
                )
                .unwrap();
            } else {
                sp.flush_tlb(&mut g.mem, &mut b, false).unwrap();
            }
            assert!(hw(&b, sp.current_root().unwrap(), pages[7]).is_none());
            sp.release_all(&mut b);
            assert_eq!(b.live(), 0);
        }
    }
}

/// The lane's fast `SET_PTE` leaves to `set_pte` what changes the pinned
/// stack: an entry of a stack page (here a user-half stack), and any entry
/// while the loaded shadow is not pinned yet (`set_pte` pins it).
#[test]
fn fast_set_pte_leaves_the_stack_to_set_pte() {
    for fmt in FORMATS {
        let (mut sp, mut b, mut g, cr3) = setup(fmt);
        g.map(cr3, 0x40_1000, 0x5000 | 0x67, 0x67);
        g.map(cr3, 0x40_3000, 0x7000 | 0x67, 0x67);
        sp.pin_stack(&mut g.mem, &mut b, 0x40_2000, 1).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, cr3).unwrap();
        let key = sp.pin_key();
        assert!(key.is_some());
        assert!(!sp.fast_set_pte(&mut b, cr3, 0x40_1000, 0x6000 | 0x67));
        assert_eq!(sp.pin_key(), key);
        // Another page of the same table: taken.
        assert!(sp.fast_set_pte(&mut b, cr3, 0x40_3000, 0x8000 | 0x67));
        assert_eq!(sp.pin_key(), key);
        g.map(cr3, 0x40_1000, 0x6000 | 0x67, 0x67);
        sp.set_pte(&mut g.mem, &mut b, cr3, 0x40_1000, 0x6000 | 0x67)
            .unwrap();
        assert_ne!(sp.pin_key(), key, "set_pte re-pins at the new leaf");

        let (mut sp, mut b, mut g, _) = setup(fmt);
        let (a, c) = two_spaces(&mut g);
        g.map(c, 0x40_3000, 0x7000 | 0x67, 0x67);
        sp.pin_stack(&mut g.mem, &mut b, 0xC000_1000, 1).unwrap();
        sp.new_pgtable(&mut g.mem, &mut b, a).unwrap();
        sp.new_pgtable_pin_later(&mut g.mem, &mut b, c).unwrap();
        assert_eq!(sp.pin_key(), None);
        assert!(!sp.fast_set_pte(&mut b, c, 0x40_3000, 0x8000 | 0x67));
        sp.set_pte(&mut g.mem, &mut b, c, 0x40_3000, 0x8000 | 0x67)
            .unwrap();
        assert!(sp.pin_key().is_some(), "set_pte pins the loaded shadow");
        sp.release_all(&mut b);
        assert_eq!(b.live(), 0);
    }
}
