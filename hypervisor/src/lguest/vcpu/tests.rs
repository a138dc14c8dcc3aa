use super::*;
use crate::lguest::guestmem::VecMemory;
use crate::lguest::shadow::tests::{Fake, GUEST_BASE, HOST_PML4};
use guest_abi::hcall::*;
use guest_abi::seg::{USER_CS, USER_DS, idt_gate};
use std::vec::Vec;

const MEM: u32 = 0x10_0000;
const LD: u32 = 0x8000;
const START: u32 = 0x1_0000;
const KSTACK: u32 = 0x9_0000;
const UCODE: u64 = 0x00CF_FA00_0000_FFFF;
const UDATA: u64 = 0x00CF_F200_0000_FFFF;

#[derive(Default)]
struct FakeEnv {
    clock: Vec<Option<u64>>,
    ts: Vec<bool>,
    tables: Option<Fake>,
    format: Option<Format>,
}

impl Clone for FakeEnv {
    fn clone(&self) -> Self {
        Self {
            clock: self.clock.clone(),
            ts: self.ts.clone(),
            tables: self.tables.clone(),
            format: self.format,
        }
    }
}

impl Env for FakeEnv {
    fn wallclock(&self) -> (i32, i32) {
        (1_700_000_000, 123_456_789)
    }
    fn tsc_khz(&self) -> u32 {
        2_000_000
    }
    fn set_clockevent(&mut self, delta_ns: Option<u64>) {
        self.clock.push(delta_ns);
    }
    fn set_ts(&mut self, on: bool) {
        self.ts.push(on);
    }
    type Tables = Fake;
    fn tables(&mut self) -> &mut Fake {
        self.tables.get_or_insert_with(Fake::new)
    }
    fn shadow_config(&self, kernel_address: u32) -> ShadowConfig {
        ShadowConfig::new(
            self.format.unwrap_or(Format::TwoLevel),
            GUEST_BASE,
            MEM / 4096,
            kernel_address,
            HOST_PML4,
        )
    }
}

struct T {
    v: Vcpu,
    m: VecMemory,
    e: FakeEnv,
}

/// Write the guest's static lguest_data image (as Linux initialises it).
fn write_lguest_data(m: &mut VecMemory, at: u32) {
    m.write_u32(at + LguestData::OFF_BLOCKED_INTERRUPTS, 0)
        .unwrap();
    m.write(at + LguestData::OFF_HCALL_STATUS, &[0xFF; 64])
        .unwrap();
    m.write_u32(at + LguestData::OFF_SYSCALL_VEC, 0x80).unwrap();
    m.write_u32(at + LguestData::OFF_KERNEL_ADDRESS, 0xC000_0000)
        .unwrap();
    m.write_u32(at + LguestData::OFF_RESERVE_MEM, 0x1234)
        .unwrap();
}

impl T {
    fn fresh() -> Self {
        let mut m = VecMemory::new(MEM);
        write_lguest_data(&mut m, LD);
        let mut v = Vcpu::new(START);
        v.regs.esp = KSTACK - 0x100;
        Self {
            v,
            m,
            e: FakeEnv::default(),
        }
    }

    fn init() -> Self {
        let mut t = Self::fresh();
        assert_eq!(t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0), Action::Resume);
        assert_eq!(t.v.lguest_data(), Some(LD));
        t
    }

    fn exit(&mut self, exit: Exit) -> Action {
        self.v.handle_exit(exit, &mut self.m, &mut self.e)
    }

    fn trap(&mut self, vector: u32, errcode: u32) -> Action {
        self.exit(Exit::Trap {
            vector,
            errcode,
            cr2: 0,
        })
    }

    fn hcall(&mut self, nr: u32, a1: u32, a2: u32, a3: u32) -> Action {
        self.v.regs.eax = nr;
        self.v.regs.ebx = a1;
        self.v.regs.ecx = a2;
        self.v.regs.edx = a3;
        self.v.regs.esi = 0;
        self.trap(0x1f, 0)
    }

    fn prepare(&mut self) -> Action {
        self.v.prepare_entry(&mut self.m, &mut self.e)
    }

    fn deliver(&mut self) {
        self.v.deliver_pending(&mut self.m, &mut self.e);
    }

    fn ld(&self, off: u32) -> u32 {
        self.m.read_u32(LD + off).unwrap()
    }

    fn set_ld(&mut self, off: u32, v: u32) {
        self.m.write_u32(LD + off, v).unwrap();
    }

    fn gate(&mut self, vector: u32, handler: u32, ty: u32, dpl: u8) {
        let (lo, hi) = idt_gate(handler, 0x10, ty, dpl);
        assert_eq!(
            self.hcall(LHCALL_LOAD_IDT_ENTRY, vector, lo, hi),
            Action::Resume
        );
    }

    fn user_segments(&mut self) {
        for (i, d) in [(14, UCODE), (15, UDATA)] {
            let r = self.hcall(LHCALL_LOAD_GDT_ENTRY, i, d as u32, (d >> 32) as u32);
            assert_eq!(r, Action::Resume);
        }
    }

    /// Puts the guest in user mode: `cs` and `ss` the user selectors.
    fn user_mode(&mut self) {
        self.v.regs.cs = u32::from(USER_CS);
        self.v.regs.ss = u32::from(USER_DS);
    }

    fn queue(&mut self, slot: u32, args: [u32; 5]) {
        for (k, a) in args.iter().enumerate() {
            self.m
                .write_u32(LD + LguestData::off_hcall(slot) + 4 * k as u32, *a)
                .unwrap();
        }
        self.m
            .write_u8(LD + LguestData::off_hcall_status(slot), 0)
            .unwrap();
    }

    fn status(&self, slot: u32) -> u8 {
        self.m
            .read_u8(LD + LguestData::off_hcall_status(slot))
            .unwrap()
    }

    fn stack(&self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|i| self.m.read_u32(self.v.regs.esp + 4 * i as u32).unwrap())
            .collect()
    }

    fn dead(&self) -> &str {
        self.v.dead_reason().expect("guest should be dead").as_str()
    }
}

// ---------------------------------------------------------------------------
// Initial state and INIT.

#[test]
fn initial_registers() {
    let v = Vcpu::new(0x40_0000);
    let r = v.regs;
    assert_eq!(r.eip, 0x40_0000);
    assert_eq!(
        (r.cs, r.ds, r.es, r.ss, r.fs, r.gs),
        (0x61, 0x69, 0x69, 0x69, 0, 0)
    );
    assert_eq!(r.eflags, 0x202);
    assert_eq!(
        (r.eax, r.ebx, r.ecx, r.edx, r.esi, r.edi, r.ebp, r.esp),
        (0, 0, 0, 0, 0, 0, 0, 0)
    );
    assert!(!v.is_dead() && !v.is_halted() && v.lguest_data().is_none());
    assert_eq!(core::mem::offset_of!(Regs, trapnum), 44);
    assert_eq!(core::mem::offset_of!(Regs, ss), 68);
}

#[test]
fn init_writes_host_fields() {
    let mut t = T::fresh();
    t.set_ld(LguestData::OFF_NOIRQ_START, 0x1000);
    t.set_ld(LguestData::OFF_NOIRQ_END, 0x1010);
    assert_eq!(t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0), Action::Resume);
    assert_eq!(t.ld(LguestData::OFF_TSC_KHZ), 2_000_000);
    assert_eq!(t.ld(LguestData::OFF_RESERVE_MEM), 0);
    assert_eq!(t.ld(LguestData::OFF_TIME), 1_700_000_000);
    assert_eq!(t.ld(LguestData::OFF_TIME + 4), 123_456_789);
    assert_eq!(t.v.noirq_window(), (0x1000, 0x1010));
    assert_eq!(t.v.kernel_address(), 0xC000_0000);
}

#[test]
fn hypercall_before_init() {
    let mut t = T::fresh();
    assert_eq!(t.hcall(LHCALL_LOAD_IDT_ENTRY, 3, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "hypercall 6 before INIT");
    // Dead stays dead.
    assert_eq!(t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0), Action::Dead);
    assert_eq!(t.trap(14, 0), Action::Dead);
    assert_eq!(t.prepare(), Action::Dead);
    assert_eq!(t.dead(), "hypercall 6 before INIT");
}

#[test]
fn init_bad_address() {
    for (addr, want) in [
        (MEM - 100, "bad guest page 0xfff9c"),
        (MEM, "bad guest page 0x100000"),
        (u32::MAX - 10, "bad guest page 0xfffffff5"),
    ] {
        let mut t = T::fresh();
        assert_eq!(t.hcall(LHCALL_LGUEST_INIT, addr, 0, 0), Action::Dead);
        assert_eq!(t.dead(), want);
    }
    // Exactly at the end is fine.
    let mut t = T::fresh();
    write_lguest_data(&mut t.m, MEM - LguestData::SIZE);
    assert_eq!(
        t.hcall(LHCALL_LGUEST_INIT, MEM - LguestData::SIZE, 0, 0),
        Action::Resume
    );
}

#[test]
fn init_bad_syscall_vector() {
    let mut t = T::fresh();
    t.set_ld(LguestData::OFF_SYSCALL_VEC, 0x81);
    assert_eq!(t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "bad syscall vector");
}

#[test]
fn init_twice() {
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "already have lguest_data");
}

#[test]
fn bad_hypercall_numbers() {
    for nr in [3, 11, 12, 20, 0x1f, 1000, u32::MAX] {
        let mut t = T::init();
        assert_eq!(t.hcall(nr, 0, 0, 0), Action::Dead);
        assert_eq!(t.dead(), format!("Bad hypercall {nr}"));
    }
}

#[test]
fn noop_hypercalls() {
    let mut t = T::init();
    for nr in [LHCALL_FLUSH_ASYNC, LHCALL_SEND_INTERRUPTS, LHCALL_FLUSH_TLB] {
        let before = t.v.regs;
        assert_eq!(t.hcall(nr, 1, 2, 3), Action::Resume);
        assert_eq!(t.v.regs.eip, before.eip);
    }
    assert!(!t.v.is_dead());
}

/// 2-level guest tables at `PGD`: guest-physical `[0, MEM)` mapped at 0
/// (supervisor) and at `0xC000_0000` (the kernel half), read-write,
/// accessed and dirty.
const PGD: u32 = 0x2_0000;
const PTES: u32 = 0x2_1000;
const KBASE: u32 = 0xC000_0000;

fn build_2level(t: &mut T) {
    let kernel_pte = 0x063; // P, RW, A, D
    t.m.write_u32(PGD, PTES | kernel_pte).unwrap();
    t.m.write_u32(PGD + (KBASE >> 22) * 4, PTES | kernel_pte)
        .unwrap();
    for i in 0..MEM / 4096 {
        t.m.write_u32(PTES + i * 4, (i << 12) | kernel_pte).unwrap();
    }
}

fn paging_guest() -> T {
    let mut t = T::init();
    build_2level(&mut t);
    assert!(!t.v.paging());
    assert_eq!(t.hcall(LHCALL_NEW_PGTABLE, PGD, 0, 0), Action::Resume);
    assert!(t.v.paging());
    t
}

#[test]
fn new_pgtable_leaves_linear_mode_and_asks_for_the_shadow() {
    let mut t = T::init();
    assert_eq!(t.v.take_mmu_work(), MmuWork::default(), "linear mode");
    build_2level(&mut t);
    assert_eq!(t.hcall(LHCALL_NEW_PGTABLE, PGD, 0, 0), Action::Resume);
    let w = t.v.take_mmu_work();
    let sw = w.load.expect("a shadow to load");
    assert_eq!(t.v.shadow_root(), Some(sw.root));
    assert_eq!(t.v.take_mmu_work().load, None, "taken once");
    // FLUSH_TLB is no longer a no-op the stubs may answer.
    t.prepare();
    let view = t.v.stub_view(MEM).unwrap();
    assert_eq!(view.trivial & (1 << LHCALL_FLUSH_TLB), 0);
    assert_ne!(view.trivial & (1 << LHCALL_FLUSH_ASYNC), 0);
    // ... nor may they reflect: frames go through guest-virtual addresses.
    assert_eq!((view.kss, view.ss1), (0, 0));
    // Every frame comes back.
    assert!(t.e.tables().live() > 0);
    t.v.release_shadows(t.e.tables());
    assert_eq!(t.e.tables().live(), 0);
    assert!(!t.v.paging());
}

#[test]
fn page_faults_under_paging_are_filled_or_reflected() {
    let mut t = paging_guest();
    t.gate(14, 0x7000, IDT_TYPE_INTERRUPT, 0);
    t.v.regs.eip = 0x1234;
    t.v.regs.esp = KBASE + 0x9000;
    // A mapped page: the shadow is filled, the guest never sees the fault.
    let fill = Exit::Trap {
        vector: 14,
        errcode: 2,
        cr2: KBASE + 0x5000,
    };
    assert_eq!(t.exit(fill), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x1234);
    // An unmapped one is the guest's #PF: cr2 in lguest_data, the frame
    // pushed through the guest's own tables (ESP is a kernel-half address).
    let miss = Exit::Trap {
        vector: 14,
        errcode: 2,
        cr2: 0x8000_0000,
    };
    assert_eq!(t.exit(miss), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x7000);
    assert_eq!(t.ld(LguestData::OFF_CR2), 0x8000_0000);
    assert_eq!(t.v.regs.esp, KBASE + 0x9000 - 16);
    assert_eq!(t.m.read_u32(0x9000 - 16).unwrap(), 2, "error code");
    assert_eq!(t.m.read_u32(0x9000 - 12).unwrap(), 0x1234, "eip");
}

#[test]
fn paging_hypercalls_are_checked() {
    let mut t = paging_guest();
    assert_eq!(t.hcall(LHCALL_SET_PGD, PGD, 1024, 0), Action::Dead);
    assert!(t.dead().contains("1024"), "{}", t.dead());
    let mut t = paging_guest();
    assert_eq!(t.hcall(LHCALL_SET_PMD, PGD, 0, 0), Action::Dead);
    assert!(t.dead().contains("paging=pae"), "{}", t.dead());
    // An entry beyond guest memory.
    let mut t = paging_guest();
    let bad = (MEM + 0x1000) | 0x63;
    assert_eq!(
        t.hcall(LHCALL_SET_PTE, PGD, KBASE + 0x3000, bad),
        Action::Dead
    );
    assert!(t.dead().contains("bad page table entry"), "{}", t.dead());
    // A kernel stack the guest does not map.
    let mut t = paging_guest();
    assert_eq!(
        t.hcall(LHCALL_SET_STACK, 0x69, 0x8000_0000, 1),
        Action::Dead
    );
    assert!(t.dead().contains("bad stack page"), "{}", t.dead());
    // Before NEW_PGTABLE the page-table calls change nothing.
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_PTE, PGD, 0x3000, 0), Action::Resume);
    assert_eq!(t.hcall(LHCALL_FLUSH_TLB, 1, 0, 0), Action::Resume);
    assert!(!t.v.paging());
}

#[test]
fn hypercall_from_user_mode_is_a_trap() {
    let mut t = T::init();
    t.user_segments();
    t.user_mode();
    t.v.regs.eip = 0x2000;
    t.v.regs.eax = LHCALL_SHUTDOWN;
    // int $0x1f can't come from CPL 3 (it #GPs); if it did, it's a trap.
    assert_eq!(t.trap(0x1f, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 31 at 0x2000 (0x0)");
}

// ---------------------------------------------------------------------------
// Individual hypercalls.

#[test]
fn load_idt_entry() {
    let mut t = T::init();
    // Ignored vectors.
    for v in [2, 8, 15, 0x1f] {
        let (lo, hi) = idt_gate(0x1234_5678, 0x61, 0xE, 0);
        assert_eq!(t.hcall(LHCALL_LOAD_IDT_ENTRY, v, lo, hi), Action::Resume);
        assert!(!t.v.idt()[v as usize].present());
    }
    // Stored with selector forced and reserved bits masked.
    let (lo, hi) = idt_gate(0xC010_2030, 0x10, 0xF, 3);
    assert_eq!(
        t.hcall(LHCALL_LOAD_IDT_ENTRY, 0x80, lo, hi | 0x10ff),
        Action::Resume
    );
    let g = t.v.idt()[0x80];
    assert_eq!(g.lo, 0x0061_2030);
    assert_eq!(g.hi, 0xC010_EF00);
    assert_eq!((g.offset(), g.gate_type(), g.dpl()), (0xC010_2030, 0xF, 3));
    // Not present clears.
    assert_eq!(
        t.hcall(LHCALL_LOAD_IDT_ENTRY, 0x80, lo, hi & !0x8000),
        Action::Resume
    );
    assert_eq!(t.v.idt()[0x80], IdtEntry::default());
    let gen1 = t.v.idt_generation();
    t.gate(3, 0x5000, 0xE, 3);
    assert_ne!(t.v.idt_generation(), gen1);
    // Bad type.
    let (lo, hi) = idt_gate(0x1000, 0x61, 0xC, 0);
    assert_eq!(t.hcall(LHCALL_LOAD_IDT_ENTRY, 5, lo, hi), Action::Dead);
    assert_eq!(t.dead(), "bad IDT type 12");
    assert!(!t.v.idt()[5].present());
}

#[test]
fn load_idt_entry_out_of_range() {
    for v in [256, 0x1_0000, u32::MAX] {
        let mut t = T::init();
        let (lo, hi) = idt_gate(0x1000, 0x61, 0xE, 0);
        assert_eq!(t.hcall(LHCALL_LOAD_IDT_ENTRY, v, lo, hi), Action::Dead);
        assert_eq!(t.dead(), format!("Setting idt entry {v}"));
    }
}

#[test]
fn set_stack() {
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 2), Action::Resume);
    assert_eq!(t.v.kernel_stack(), Some((0x69, KSTACK, 2)));
    // Top of memory is fine (esp - 1 is the last byte).
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, MEM, 1), Action::Resume);

    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x68, KSTACK, 2), Action::Dead);
    assert_eq!(t.dead(), "bad stack segment 104");
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x6b, KSTACK, 2), Action::Dead);
    assert_eq!(t.dead(), "bad stack segment 107");
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 3), Action::Dead);
    assert_eq!(t.dead(), "bad stack pages 3");
    let mut t = T::init();
    assert_eq!(
        t.hcall(LHCALL_SET_STACK, 0x69, MEM + 0x1000, 1),
        Action::Dead
    );
    assert_eq!(t.dead(), "bad stack page 0x100fff");
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, 0x1000, 2), Action::Dead);
    assert_eq!(t.dead(), "bad stack page 0xffffffff");
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "bad stack pages 0");
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 1), Action::Resume);
}

#[test]
fn ts_and_nm() {
    let mut t = T::init();
    t.gate(7, 0x7000, 0xF, 0);
    // TS clear: #NM is transparent.
    let eip = t.v.regs.eip;
    assert_eq!(t.trap(7, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, eip);
    assert_eq!(t.hcall(LHCALL_TS, 8, 0, 0), Action::Resume);
    assert!(t.v.ts());
    assert_eq!(t.trap(7, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x7000);
    assert_eq!(t.hcall(LHCALL_TS, 0, 0, 0), Action::Resume);
    assert!(!t.v.ts());
    assert_eq!(t.e.ts, [true, false]);
}

#[test]
fn nm_with_ts_and_no_gate_kills() {
    let mut t = T::init();
    t.hcall(LHCALL_TS, 8, 0, 0);
    t.v.regs.eip = 0x4242;
    assert_eq!(t.trap(7, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 7 at 0x4242 (0x0)");
}

#[test]
fn clockevent() {
    let mut t = T::init();
    assert_eq!(
        t.hcall(LHCALL_SET_CLOCKEVENT, 1_000_000, 0, 0),
        Action::Resume
    );
    assert_eq!(t.hcall(LHCALL_SET_CLOCKEVENT, 0, 0, 0), Action::Resume);
    assert_eq!(
        t.hcall(LHCALL_SET_CLOCKEVENT, u32::MAX, 0, 0),
        Action::Resume
    );
    assert_eq!(
        t.e.clock,
        [Some(1_000_000), None, Some(u64::from(u32::MAX))]
    );
}

#[test]
fn notify() {
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_NOTIFY, 0xabc0, 0, 0), Action::Notify(0xabc0));
    assert!(!t.v.is_dead());
    assert_eq!(t.prepare(), Action::Resume);
}

#[test]
fn load_gdt_entry_and_tls() {
    let mut t = T::init();
    assert_eq!(
        t.hcall(
            LHCALL_LOAD_GDT_ENTRY,
            14,
            UCODE as u32,
            (UCODE >> 32) as u32
        ),
        Action::Resume
    );
    assert_eq!(t.v.gdt.entry(14), Some(UCODE | 1 << 40));
    // TLS from guest memory.
    let tls = [UDATA, 0, UDATA];
    for (i, d) in tls.iter().enumerate() {
        t.m.write_u64(0x3000 + 8 * i as u32, *d).unwrap();
    }
    assert_eq!(t.hcall(LHCALL_LOAD_TLS, 0x3000, 0, 0), Action::Resume);
    assert_eq!(t.v.gdt.entry(6), Some(UDATA | 1 << 40));
    assert_eq!(t.v.gdt.entry(8), Some(UDATA | 1 << 40));

    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_LOAD_TLS, MEM - 16, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "bad read address 0xffff0 len 24");

    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_LOAD_GDT_ENTRY, 32, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "too many gdt entries 32");
    // A host-reserved slot (Linux loads its TSS into 16): accepted,
    // ignored.
    let mut t = T::init();
    assert_eq!(
        t.hcall(LHCALL_LOAD_GDT_ENTRY, 16, 0x0000_FFFF, 0x00CF_8900),
        Action::Resume
    );
    assert_eq!(t.v.gdt.entry(16), Some(0));
    let mut t = T::init();
    // 64-bit code segment, DPL 3.
    assert_eq!(
        t.hcall(LHCALL_LOAD_GDT_ENTRY, 20, 0xFFFF, 0x00AF_FA00),
        Action::Dead
    );
    assert_eq!(t.dead(), "gdt entry 20: 64-bit code segment");
    let mut t = T::init();
    // Call gate.
    assert_eq!(
        t.hcall(LHCALL_LOAD_GDT_ENTRY, 20, 0x0050_1000, 0x0000_EC00),
        Action::Dead
    );
    assert_eq!(t.dead(), "gdt entry 20: system descriptor");
}

#[test]
fn shutdown_poweroff() {
    let mut t = T::init();
    t.m.write(0x3000, b"bye now\0junk").unwrap();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x3000, 1, 0), Action::Dead);
    assert_eq!(t.dead(), "power off: bye now");
    assert!(!t.v.is_restart());
    assert_eq!(t.trap(0x1f, 0), Action::Dead);
    t.v.kill("something else");
    assert_eq!(t.dead(), "power off: bye now");

    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x3000, 1, 0), Action::Dead);
    assert_eq!(t.dead(), "power off");
}

#[test]
fn shutdown_message_truncated() {
    let mut t = T::init();
    t.m.write(0x3000, &[b'a'; 300]).unwrap();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x3000, 1, 0), Action::Dead);
    assert_eq!(t.dead().len(), "power off: ".len() + 127);
}

#[test]
fn shutdown_restart_and_bad() {
    let mut t = T::init();
    t.m.write(0x3000, b"reboot\0").unwrap();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x3000, 2, 0), Action::Restart);
    assert!(t.v.is_restart());
    assert_eq!(t.dead(), "restart: reboot");
    assert_eq!(t.trap(3, 0), Action::Restart);
    assert_eq!(t.prepare(), Action::Restart);

    // Linux's `machine_restart(NULL)` passes `__pa(NULL)`, outside guest
    // memory: the restart still happens (a power off would be killed).
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x4000_0000, 2, 0), Action::Restart);
    assert!(t.v.is_restart());
    assert_eq!(t.dead(), "restart (message at 0x40000000 unreadable)");
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x4000_0000, 1, 0), Action::Dead);
    assert!(!t.v.is_restart());
    assert!(t.dead().starts_with("bad read address 0x40000000"));

    let mut t = T::init();
    t.m.write(0x3000, b"again\0").unwrap();
    t.queue(0, [LHCALL_SHUTDOWN, 0x3000, 2, 0, 0]);
    assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Restart);
    // A restart is never reported as a death, whatever comes later (the
    // kernel's run loop relies on this: `Action::Dead` is never a restart).
    assert_eq!(
        t.exit(Exit::EntryFault {
            fault: 13,
            errcode: 0
        }),
        Action::Restart
    );
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x3000, 1, 0), Action::Restart);
    assert_eq!(t.prepare(), Action::Restart);
    assert_eq!(t.dead(), "restart: again");

    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, 0x3000, 7, 0), Action::Dead);
    assert_eq!(t.dead(), "bad shutdown reason 7");
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SHUTDOWN, MEM, 1, 0), Action::Dead);
    assert_eq!(t.dead(), "bad read address 0x100000 len 1");
}

// ---------------------------------------------------------------------------
// The async ring.

#[test]
fn ring_drains_64_in_order_exactly_once() {
    let mut t = T::init();
    for i in 0..64 {
        t.queue(i, [LHCALL_SET_CLOCKEVENT, i + 1, 0, 0, 0]);
    }
    assert_eq!(t.hcall(LHCALL_SET_CLOCKEVENT, 999, 0, 0), Action::Resume);
    let want: Vec<_> = (1..=64).map(Some).chain([Some(999)]).collect();
    assert_eq!(t.e.clock, want);
    assert!((0..64).all(|i| t.status(i) == 0xFF));
    // Nothing runs twice.
    assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Resume);
    assert_eq!(t.e.clock.len(), 65);
    // The cursor wrapped: slot 0 is next.
    t.queue(0, [LHCALL_SET_CLOCKEVENT, 5000, 0, 0, 0]);
    t.queue(1, [LHCALL_SET_CLOCKEVENT, 5001, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Resume);
    assert_eq!(&t.e.clock[65..], &[Some(5000), Some(5001)]);
}

#[test]
fn ring_partial_and_cursor() {
    let mut t = T::init();
    for i in 0..5 {
        t.queue(i, [LHCALL_SET_CLOCKEVENT, 10 + i, 0, 0, 0]);
    }
    t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0);
    assert_eq!(t.e.clock.len(), 5);
    // A stale "ready" slot before the cursor is not looked at.
    t.queue(0, [LHCALL_SET_CLOCKEVENT, 77, 0, 0, 0]);
    t.queue(5, [LHCALL_SET_CLOCKEVENT, 15, 0, 0, 0]);
    t.queue(6, [LHCALL_SET_CLOCKEVENT, 16, 0, 0, 0]);
    t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0);
    assert_eq!(&t.e.clock[5..], &[Some(15), Some(16)]);
    assert_eq!(t.status(0), 0);
}

#[test]
fn ring_runs_before_first_call_after_init_not_before_init() {
    let mut t = T::fresh();
    // Ring entries present at INIT time are not run by INIT itself.
    t.queue(0, [LHCALL_SET_CLOCKEVENT, 1, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0), Action::Resume);
    assert!(t.e.clock.is_empty());
    assert_eq!(t.hcall(LHCALL_SET_CLOCKEVENT, 2, 0, 0), Action::Resume);
    assert_eq!(t.e.clock, [Some(1), Some(2)]);
}

#[test]
fn ring_notify_stops_drain_and_sync_call_waits() {
    let mut t = T::init();
    t.queue(0, [LHCALL_SET_CLOCKEVENT, 1, 0, 0, 0]);
    t.queue(1, [LHCALL_NOTIFY, 0x1234, 0, 0, 0]);
    t.queue(2, [LHCALL_SET_CLOCKEVENT, 2, 0, 0, 0]);
    assert_eq!(
        t.hcall(LHCALL_SET_CLOCKEVENT, 99, 0, 0),
        Action::Notify(0x1234)
    );
    assert_eq!(t.e.clock, [Some(1)]);
    assert_eq!((t.status(0), t.status(1), t.status(2)), (0xFF, 0xFF, 0));
    // The launcher comes back: the rest of the ring, then the sync call.
    assert_eq!(t.prepare(), Action::Resume);
    assert_eq!(t.e.clock, [Some(1), Some(2), Some(99)]);
    assert_eq!(t.status(2), 0xFF);
    // And nothing again.
    assert_eq!(t.prepare(), Action::Resume);
    assert_eq!(t.e.clock.len(), 3);
}

#[test]
fn ring_two_notifies() {
    let mut t = T::init();
    t.queue(0, [LHCALL_NOTIFY, 0x10, 0, 0, 0]);
    t.queue(1, [LHCALL_NOTIFY, 0x20, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_NOTIFY, 0x30, 0, 0), Action::Notify(0x10));
    assert_eq!(t.prepare(), Action::Notify(0x20));
    assert_eq!(t.prepare(), Action::Notify(0x30));
    assert_eq!(t.prepare(), Action::Resume);
}

#[test]
fn ring_bad_entry_kills() {
    let mut t = T::init();
    t.queue(0, [LHCALL_SET_CLOCKEVENT, 1, 0, 0, 0]);
    t.queue(1, [42, 0, 0, 0, 0]);
    t.queue(2, [LHCALL_SET_CLOCKEVENT, 2, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_SET_CLOCKEVENT, 3, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "Bad hypercall 42");
    assert_eq!(t.e.clock, [Some(1)]);
    assert_eq!(t.status(1), 0xFF);

    let mut t = T::init();
    t.queue(0, [LHCALL_LGUEST_INIT, LD, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "already have lguest_data");
}

#[test]
fn ring_shutdown_and_halt() {
    let mut t = T::init();
    t.m.write(0x3000, b"x\0").unwrap();
    t.queue(0, [LHCALL_SHUTDOWN, 0x3000, 1, 0, 0]);
    t.queue(1, [LHCALL_SET_CLOCKEVENT, 2, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_SET_CLOCKEVENT, 3, 0, 0), Action::Dead);
    assert_eq!(t.dead(), "power off: x");
    assert!(t.e.clock.is_empty());

    let mut t = T::init();
    t.queue(0, [LHCALL_HALT, 0, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Halt);
    assert!(t.v.is_halted());
}

#[test]
fn ring_in_tls_and_ts() {
    let mut t = T::init();
    t.m.write_u64(0x3000, UDATA).unwrap();
    t.queue(0, [LHCALL_TS, 8, 0, 0, 0]);
    t.queue(1, [LHCALL_LOAD_TLS, 0x3000, 0, 0, 0]);
    t.queue(2, [LHCALL_SET_STACK, 0x69, KSTACK, 2, 0]);
    assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Resume);
    assert!(t.v.ts());
    assert_eq!(t.v.gdt.entry(6), Some(UDATA | 1 << 40));
    assert_eq!(t.v.kernel_stack(), Some((0x69, KSTACK, 2)));
}

// ---------------------------------------------------------------------------
// Trap reflection.

#[test]
fn reflect_kernel_mode_with_error_code() {
    let mut t = T::init();
    t.gate(13, 0xC000_1300, 0xF, 0);
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0x200);
    t.v.regs.eip = 0x2345;
    t.v.regs.eflags = 0x202 | EFLAGS_TF | EFLAGS_NT | 0x3000;
    let esp = t.v.regs.esp;
    assert_eq!(t.trap(13, 0x50), Action::Resume);
    let r = t.v.regs;
    assert_eq!(r.esp, esp - 16);
    assert_eq!(r.ss, 0x69);
    assert_eq!((r.cs, r.eip), (0x61, 0xC000_1300));
    assert_eq!(r.eflags, 0x202);
    assert_eq!(
        t.stack(4),
        [0x50, 0x2345, 0x61, 0x202 | EFLAGS_TF | EFLAGS_NT | 0x3000]
    );
    // Trap gate: irq_enabled untouched.
    assert_eq!(t.ld(LguestData::OFF_IRQ_ENABLED), 0x200);
    assert_eq!(r.trapnum, 13);
}

#[test]
fn reflect_kernel_mode_without_error_code_irqs_off() {
    let mut t = T::init();
    t.gate(0, 0xC000_0000, 0xE, 0);
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0);
    t.v.regs.eip = 0x1111;
    let esp = t.v.regs.esp;
    assert_eq!(t.trap(0, 0), Action::Resume);
    assert_eq!(t.v.regs.esp, esp - 12);
    // Pushed IF mirrors irq_enabled (off).
    assert_eq!(t.stack(3), [0x1111, 0x61, 0x002]);
    assert_eq!(t.v.regs.eflags, 0x202);
}

#[test]
fn reflect_all_error_code_vectors() {
    for v in 0..32u32 {
        if matches!(v, 2 | 7 | 8 | 15 | 0x1f) {
            continue;
        }
        let mut t = T::init();
        // DPL 3 so int3/into (vectors 3, 4) aren't turned into #GP.
        t.gate(v, 0x5000, 0xF, 3);
        let esp = t.v.regs.esp;
        t.exit(Exit::Trap {
            vector: v,
            errcode: 0x18,
            cr2: 0x7777,
        });
        let want = if matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17) {
            16
        } else {
            12
        };
        assert_eq!(esp - t.v.regs.esp, want, "vector {v}");
        assert_eq!(t.v.regs.eip, 0x5000, "vector {v}");
    }
}

#[test]
fn reflect_page_fault_sets_cr2_and_interrupt_gate_disables() {
    let mut t = T::init();
    t.gate(14, 0xC000_1400, 0xE, 0);
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0x200);
    t.v.regs.eip = 0x4000;
    let a = t.exit(Exit::Trap {
        vector: 14,
        errcode: 6,
        cr2: 0xdead_b000,
    });
    assert_eq!(a, Action::Resume);
    assert_eq!(t.ld(LguestData::OFF_CR2), 0xdead_b000);
    assert_eq!(t.ld(LguestData::OFF_IRQ_ENABLED), 0);
    assert_eq!(t.stack(4), [6, 0x4000, 0x61, 0x202]);
}

#[test]
fn reflect_from_user_mode_switches_stack() {
    let mut t = T::init();
    t.user_segments();
    t.gate(14, 0xC000_1400, 0xE, 0);
    t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 2);
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0x200);
    t.user_mode();
    t.v.regs.ds = u32::from(USER_DS);
    t.v.regs.esp = 0x5_0000;
    t.v.regs.eip = 0x0804_8000 & (MEM - 1);
    let ueip = t.v.regs.eip;
    let a = t.exit(Exit::Trap {
        vector: 14,
        errcode: 4,
        cr2: 0x123,
    });
    assert_eq!(a, Action::Resume);
    let r = t.v.regs;
    assert_eq!((r.ss, r.esp), (0x69, KSTACK - 24));
    assert_eq!((r.cs, r.eip), (0x61, 0xC000_1400));
    assert_eq!(t.stack(6), [4, ueip, 0x73, 0x202, 0x5_0000, 0x7b]);
    assert_eq!(t.ld(LguestData::OFF_CR2), 0x123);
    assert_eq!(t.ld(LguestData::OFF_IRQ_ENABLED), 0);
    // DS stays the user's (valid at CPL 1 too): entry is fine.
    assert_eq!(t.prepare(), Action::Resume);
}

#[test]
fn user_trap_without_kernel_stack() {
    let mut t = T::init();
    t.user_segments();
    t.gate(6, 0x6000, 0xF, 0);
    t.user_mode();
    assert_eq!(t.trap(6, 0), Action::Dead);
    assert_eq!(t.dead(), "no kernel stack");
}

#[test]
fn user_trap_with_bad_ss1() {
    let mut t = T::init();
    t.user_segments();
    t.gate(6, 0x6000, 0xF, 0);
    // RPL 1 but slot 15 is a DPL-3 segment.
    t.hcall(LHCALL_SET_STACK, 0x79, KSTACK, 1);
    t.user_mode();
    assert_eq!(t.trap(6, 0), Action::Dead);
    assert_eq!(t.dead(), "bad stack segment 121");
}

#[test]
fn unhandled_traps() {
    let mut t = T::init();
    t.v.regs.eip = 0xC012_3456;
    assert_eq!(t.trap(6, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 6 at 0xc0123456 (0x0)");

    let mut t = T::init();
    t.v.regs.eip = 0x1000;
    let a = t.exit(Exit::Trap {
        vector: 14,
        errcode: 2,
        cr2: 0xbeef,
    });
    assert_eq!(a, Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 14 at 0x1000 (0xbeef)");

    // Before INIT too (no lguest_data to write cr2 into).
    let mut t = T::fresh();
    t.v.regs.eip = 0x10;
    assert_eq!(t.trap(13, 0x28), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 13 at 0x10 (0x28)");

    let mut t = T::init();
    t.v.regs.eip = 0x10;
    assert_eq!(t.trap(300, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 300 at 0x10 (0x0)");
}

#[test]
fn entry_fault_and_host_interrupt() {
    let mut t = T::init();
    let before = t.v.regs;
    assert_eq!(t.exit(Exit::HostInterrupt), Action::Resume);
    assert_eq!(t.v.regs, before);
    t.v.regs.eip = 0x777;
    // The previous exit's error code is not the entry fault's.
    t.v.regs.errcode = 0x6b;
    let fault = Exit::EntryFault {
        fault: 13,
        errcode: 0x60,
    };
    assert_eq!(t.exit(fault), Action::Dead);
    assert_eq!(
        t.dead(),
        "unhandled trap 256 at 0x777 (fault 13, error 0x60)"
    );
}

#[test]
fn bad_stack_kills() {
    let mut t = T::init();
    t.gate(6, 0x6000, 0xF, 0);
    t.v.regs.esp = MEM + 8;
    assert_eq!(t.trap(6, 0), Action::Dead);
    assert_eq!(t.dead(), "bad stack page 0x100004");

    let mut t = T::init();
    t.gate(6, 0x6000, 0xF, 0);
    t.v.regs.esp = 0;
    assert_eq!(t.trap(6, 0), Action::Dead);
    assert_eq!(t.dead(), "bad stack page 0xfffffffc");

    // Straddling the end of memory.
    let mut t = T::init();
    t.gate(6, 0x6000, 0xF, 0);
    t.v.regs.esp = MEM + 2;
    assert_eq!(t.trap(6, 0), Action::Dead);
    assert_eq!(t.dead(), "bad stack page 0x100000");
}

#[test]
fn stack_push_across_page_boundary() {
    let mut t = T::init();
    t.gate(6, 0x6000, 0xF, 0);
    t.v.regs.esp = 0x5002;
    t.v.regs.eip = 0xAABB_CCDD;
    assert_eq!(t.trap(6, 0), Action::Resume);
    assert_eq!(t.v.regs.esp, 0x5002 - 12);
    // irq_enabled is 0 in the guest's initial lguest_data: IF clear in the frame.
    assert_eq!(t.stack(3), [0xAABB_CCDD, 0x61, 0x002]);
}

#[test]
fn software_interrupt_dpl() {
    let mut t = T::init();
    t.user_segments();
    t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 2);
    t.gate(0x80, 0x8000, 0xF, 3);
    t.gate(0x81, 0x8100, 0xE, 0);
    t.gate(13, 0x1300, 0xF, 0);
    t.user_mode();
    t.v.regs.esp = 0x5_0000;
    // int $0x80 from user: delivered, no error code.
    assert_eq!(t.trap(0x80, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x8000);
    assert_eq!(t.v.regs.esp, KSTACK - 20);
    // int $0x81 from user to a DPL-0 gate: #GP((0x81 << 3) | 2).
    t.user_mode();
    t.v.regs.esp = 0x5_0000;
    assert_eq!(t.trap(0x81, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x1300);
    assert_eq!(t.stack(1), [(0x81 << 3) | 2]);
    // From the kernel (CPL 1) a DPL-0 gate #GPs too, a DPL-1 one works.
    t.v.regs.esp = KSTACK - 0x200;
    assert_eq!(t.trap(0x81, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x1300);
    t.gate(0x82, 0x8200, 0xF, 1);
    assert_eq!(t.trap(0x82, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x8200);
    // int3 from user with a DPL-3 gate.
    t.gate(3, 0x0300, 0xF, 3);
    t.user_mode();
    assert_eq!(t.trap(3, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x0300);
}

// ---------------------------------------------------------------------------
// I/O emulation.

fn io(code: &[u8], eax: u32) -> T {
    let mut t = T::init();
    t.m.write(0x2000, code).unwrap();
    t.v.regs.eip = 0x2000;
    t.v.regs.eax = eax;
    t
}

#[test]
fn emulate_in_out_cli() {
    for (code, eax, want_eax, len) in [
        (&[0xE4, 0x60][..], 0x1234_5600, 0x1234_56FF, 2),
        (&[0xE5, 0x60][..], 0x1234_5600, 0xFFFF_FFFF, 2),
        (&[0x66, 0xE5, 0x60][..], 0x1234_0000, 0x1234_FFFF, 3),
        (&[0xEC][..], 0, 0xFF, 1),
        (&[0xED][..], 0, 0xFFFF_FFFF, 1),
        (&[0x66, 0xED][..], 0xAAAA_0000, 0xAAAA_FFFF, 2),
        (&[0xE6, 0x80][..], 7, 7, 2),
        (&[0xE7, 0x80][..], 7, 7, 2),
        (&[0xEE][..], 7, 7, 1),
        (&[0x66, 0xEF][..], 7, 7, 2),
        (&[0xFA][..], 7, 7, 1),
    ] {
        let mut t = io(code, eax);
        assert_eq!(t.trap(13, 0), Action::Resume, "{code:x?}");
        assert_eq!(t.v.regs.eax, want_eax, "{code:x?}");
        assert_eq!(t.v.regs.eip, 0x2000 + len, "{code:x?}");
    }
}

#[test]
fn gp_not_emulated() {
    // hlt: reflected as #GP.
    let mut t = io(&[0xF4], 0);
    t.gate(13, 0x1300, 0xF, 0);
    assert_eq!(t.trap(13, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x1300);
    assert_eq!(t.stack(2), [0, 0x2000]);
    // Non-zero error code: never emulated.
    let mut t = io(&[0xEC], 0);
    assert_eq!(t.trap(13, 0x50), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 13 at 0x2000 (0x50)");
    // From user mode: never emulated.
    let mut t = io(&[0xEC], 0);
    t.user_segments();
    t.v.regs.cs = u32::from(USER_CS);
    assert_eq!(t.trap(13, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 13 at 0x2000 (0x0)");
    // 0x66 then something else.
    let mut t = io(&[0x66, 0x90], 0);
    assert_eq!(t.trap(13, 0), Action::Dead);
}

/// A #GP whose instruction the host cannot read (eip outside guest memory,
/// or an instruction cut off there) is reflected like any other #GP, not a
/// kill for a bad address.
#[test]
fn emulate_bad_eip() {
    let mut t = io(&[], 0);
    t.v.regs.eip = MEM;
    assert_eq!(t.trap(13, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 13 at 0x100000 (0x0)");
    let mut t = io(&[], 0);
    t.v.regs.eip = 0xF000_0000;
    t.gate(13, 0x1300, 0xF, 0);
    assert_eq!(t.trap(13, 0), Action::Resume);
    assert_eq!(t.v.regs.eip, 0x1300);
    assert_eq!(t.stack(2), [0, 0xF000_0000]);
    // Prefix at the last byte, opcode beyond memory.
    let mut t = io(&[], 0);
    t.m.write_u8(MEM - 1, 0x66).unwrap();
    t.v.regs.eip = MEM - 1;
    assert_eq!(t.trap(13, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 13 at 0xfffff (0x0)");
}

// ---------------------------------------------------------------------------
// Interrupt delivery.

fn irq_guest() -> T {
    let mut t = T::init();
    t.gate(0x20, 0xC000_2000, 0xE, 0);
    t.gate(0x21, 0xC000_2100, 0xE, 0);
    t.gate(0x23, 0xC000_2300, 0xE, 0);
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0x200);
    t.v.regs.eip = 0x3000;
    t
}

#[test]
fn no_delivery_before_init() {
    let mut t = T::fresh();
    t.v.set_irq(0);
    assert!(!t.v.has_deliverable_irq(&t.m));
    t.deliver();
    assert_eq!(t.v.pending_irqs(), 1);
    assert_eq!(t.v.regs.eip, START);
}

#[test]
fn deliver_lowest_unblocked() {
    let mut t = irq_guest();
    t.v.set_irq(3);
    t.v.set_irq(1);
    t.v.set_irq(40); // ignored
    assert_eq!(t.v.pending_irqs(), 0b1010);
    let esp = t.v.regs.esp;
    t.deliver();
    assert_eq!(t.v.regs.eip, 0xC000_2100);
    assert_eq!(t.v.regs.esp, esp - 12);
    assert_eq!(t.stack(3), [0x3000, 0x61, 0x202]);
    assert_eq!(t.v.pending_irqs(), 0b1000);
    assert_eq!(t.ld(LguestData::OFF_IRQ_ENABLED), 0);
    // Another one is pending: irq_pending tells the guest.
    assert_eq!(t.ld(LguestData::OFF_IRQ_PENDING), 0x200);
    assert_eq!(t.ld(LguestData::OFF_TIME), 1_700_000_000);
    // irqs now off: irq 3 waits.
    t.set_ld(LguestData::OFF_IRQ_PENDING, 0);
    t.deliver();
    assert_eq!(t.v.pending_irqs(), 0b1000);
    assert_eq!(t.ld(LguestData::OFF_IRQ_PENDING), 0x200);
    // Guest re-enables and SEND_INTERRUPTS.
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0x200);
    assert_eq!(t.hcall(LHCALL_SEND_INTERRUPTS, 0, 0, 0), Action::Resume);
    assert_eq!(t.prepare(), Action::Resume);
    assert_eq!(t.v.regs.eip, 0xC000_2300);
    assert_eq!(t.v.pending_irqs(), 0);
    assert_eq!(t.ld(LguestData::OFF_IRQ_PENDING), 0);
}

#[test]
fn blocked_irq_stays_pending() {
    let mut t = irq_guest();
    t.set_ld(LguestData::OFF_BLOCKED_INTERRUPTS, 1);
    t.v.set_irq(0);
    assert!(!t.v.has_deliverable_irq(&t.m));
    t.deliver();
    assert_eq!(t.v.regs.eip, 0x3000);
    assert_eq!(t.v.pending_irqs(), 1);
    t.set_ld(LguestData::OFF_BLOCKED_INTERRUPTS, 0);
    assert!(t.v.has_deliverable_irq(&t.m));
    t.deliver();
    assert_eq!(t.v.regs.eip, 0xC000_2000);
    assert_eq!(t.v.pending_irqs(), 0);
}

#[test]
fn noirq_window() {
    let mut t = T::fresh();
    t.set_ld(LguestData::OFF_NOIRQ_START, 0x3000);
    t.set_ld(LguestData::OFF_NOIRQ_END, 0x3008);
    t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0);
    t.gate(0x20, 0xC000_2000, 0xE, 0);
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0x200);
    t.v.set_irq(0);
    for eip in [0x3000, 0x3004, 0x3007] {
        t.v.regs.eip = eip;
        t.deliver();
        assert_eq!(t.v.regs.eip, eip);
        assert_eq!(t.v.pending_irqs(), 1);
    }
    t.v.regs.eip = 0x3008;
    t.deliver();
    assert_eq!(t.v.regs.eip, 0xC000_2000);
}

#[test]
fn irq_without_gate_stays_pending() {
    let mut t = irq_guest();
    t.v.set_irq(5);
    t.deliver();
    assert_eq!(t.v.regs.eip, 0x3000);
    assert_eq!(t.v.pending_irqs(), 1 << 5);
    assert_eq!(t.ld(LguestData::OFF_IRQ_PENDING), 0);
}

#[test]
fn irq_delivered_to_user_mode_uses_kernel_stack() {
    let mut t = irq_guest();
    t.user_segments();
    t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 2);
    t.user_mode();
    t.v.regs.esp = 0x5_0000;
    t.v.set_irq(0);
    t.deliver();
    assert_eq!(t.v.regs.eip, 0xC000_2000);
    assert_eq!(t.v.regs.esp, KSTACK - 20);
    assert_eq!(t.stack(5), [0x3000, 0x73, 0x202, 0x5_0000, 0x7b]);
}

#[test]
fn halt_and_wake() {
    let mut t = irq_guest();
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0);
    t.set_ld(LguestData::OFF_BLOCKED_INTERRUPTS, 0b10);
    t.v.regs.eip = 0x3100;
    assert_eq!(t.hcall(LHCALL_HALT, 0, 0, 0), Action::Halt);
    assert!(t.v.is_halted());
    assert_eq!(t.prepare(), Action::Halt);
    // A blocked irq doesn't wake it.
    t.v.set_irq(1);
    assert!(!t.v.has_deliverable_irq(&t.m));
    assert_eq!(t.prepare(), Action::Halt);
    // The timer does, and interrupts get enabled implicitly.
    t.v.set_irq(0);
    assert!(t.v.has_deliverable_irq(&t.m));
    assert_eq!(t.prepare(), Action::Resume);
    assert!(!t.v.is_halted());
    assert_eq!(t.v.regs.eip, 0xC000_2000);
    assert_eq!(t.stack(3), [0x3100, 0x61, 0x202]);
    // Interrupt gate: disabled again for the handler.
    assert_eq!(t.ld(LguestData::OFF_IRQ_ENABLED), 0);
    assert_eq!(t.v.pending_irqs(), 0b10);
}

#[test]
fn halt_with_irq_already_pending() {
    let mut t = irq_guest();
    t.v.set_irq(0);
    t.set_ld(LguestData::OFF_IRQ_ENABLED, 0);
    assert_eq!(t.hcall(LHCALL_HALT, 0, 0, 0), Action::Halt);
    assert_eq!(t.prepare(), Action::Resume);
    assert_eq!(t.v.regs.eip, 0xC000_2000);
}

// ---------------------------------------------------------------------------
// Entry checks.

#[test]
fn entry_sanitises_eflags() {
    let mut t = T::init();
    t.v.regs.eflags = 0xFFFF_FFFF;
    assert_eq!(t.prepare(), Action::Resume);
    assert_eq!(t.v.regs.eflags, EFLAGS_GUEST_MASK | 0x202);
    assert_eq!(t.v.regs.eflags & 0x3000, 0); // IOPL 0
    assert_eq!(t.v.regs.eflags & (EFLAGS_VM | EFLAGS_NT | EFLAGS_RF), 0);
    assert_eq!(sanitize_eflags(0), 0x202);
}

#[test]
fn entry_rejects_bad_selectors() {
    type Case = (fn(&mut Regs), &'static str);
    let cases: [Case; 8] = [
        (|r| r.cs = 0x60, "bad cs 0x60 at 0x10000"),
        (|r| r.cs = 0x50, "bad cs 0x50 at 0x10000"),
        (|r| r.cs = 0x69, "bad cs 0x69 at 0x10000"),
        (|r| r.cs = 0x1_0061, "bad cs 0x10061 at 0x10000"),
        (|r| r.ss = 0x6b, "bad ss 0x6b at 0x10000"),
        (|r| r.ss = 0, "bad ss 0x0 at 0x10000"),
        (|r| r.ds = 0x83, "bad ds 0x83 at 0x10000"),
        (|r| r.gs = 0x33, "bad gs 0x33 at 0x10000"),
    ];
    for (f, want) in cases {
        let mut t = T::init();
        t.v.regs.eip = START;
        f(&mut t.v.regs);
        assert_eq!(t.prepare(), Action::Dead);
        assert_eq!(t.dead(), want);
    }
    // Null data selectors and user state are fine.
    let mut t = T::init();
    t.user_segments();
    t.user_mode();
    t.v.regs.ds = u32::from(USER_DS);
    t.v.regs.es = 3;
    assert_eq!(t.prepare(), Action::Resume);
    // Kernel data selector with user CS isn't.
    t.v.regs.fs = 0x69;
    assert_eq!(t.prepare(), Action::Dead);
    assert_eq!(t.dead(), "bad fs 0x69 at 0x10000");
}

#[test]
fn reflect_targets_a_replaced_kernel_cs_is_caught_at_entry() {
    let mut t = T::init();
    t.gate(6, 0x6000, 0xF, 0);
    // Guest turns slot 12 into a data segment; the forced 0x61 is then bad.
    t.hcall(
        LHCALL_LOAD_GDT_ENTRY,
        12,
        UDATA as u32,
        (UDATA >> 32) as u32,
    );
    assert_eq!(t.trap(6, 0), Action::Resume);
    assert_eq!(t.prepare(), Action::Dead);
    assert_eq!(t.dead(), "bad cs 0x61 at 0x6000");
}

#[test]
fn kill_first_reason_wins() {
    let mut t = T::init();
    t.v.kill("first");
    t.v.kill("second");
    assert_eq!(t.dead(), "first");
    assert_eq!(t.prepare(), Action::Dead);
    t.v.set_irq(0);
    t.deliver();
    assert_eq!(t.v.regs.eip, START);
}

#[test]
fn entry_check_cache_is_invalidated_by_gdt_changes() {
    let mut t = T::init();
    // Validated once with the boot selectors...
    assert_eq!(t.prepare(), Action::Resume);
    assert_eq!(t.prepare(), Action::Resume);
    // ... then the guest turns its current CS slot into a data segment: the
    // next entry must check again and refuse.
    t.hcall(
        LHCALL_LOAD_GDT_ENTRY,
        12,
        UDATA as u32,
        (UDATA >> 32) as u32,
    );
    assert_eq!(t.prepare(), Action::Dead);
    assert!(t.dead().starts_with("bad cs 0x61"), "{}", t.dead());
}

#[test]
fn trap_owner_classification() {
    use TrapOwner::*;
    // Exceptions and the guest's software interrupts below 32 are the guest's.
    for v in 0..32 {
        let want = if v == trap::NMI { HostNmi } else { Guest };
        assert_eq!(TrapOwner::of(v), want, "vector {v}");
    }
    assert_eq!(TrapOwner::of(u32::from(LGUEST_TRAP_ENTRY)), Guest);
    // The syscall vector is the guest's; every other vector >= 32 is a
    // host device interrupt.
    assert_eq!(TrapOwner::of(0x80), Guest);
    for v in (32..256).filter(|&v| v != 0x80) {
        assert_eq!(TrapOwner::of(v), HostIrq, "vector {v}");
    }
    assert_eq!(TrapOwner::of(ENTRY_FAULT_TRAPNUM), EntryFault);
    // Nothing else comes from the switcher; never reflect it.
    assert_eq!(TrapOwner::of(257), HostIrq);
    assert_eq!(TrapOwner::of(u32::MAX), HostIrq);
}

#[test]
fn exits_from_trapnums() {
    assert_eq!(Exit::from_trapnum(2, 0, 0), Exit::HostInterrupt);
    assert_eq!(Exit::from_trapnum(0x20, 0, 0), Exit::HostInterrupt);
    assert_eq!(Exit::from_trapnum(0xff, 0, 0), Exit::HostInterrupt);
    assert_eq!(
        Exit::from_trapnum(256, 5, 6),
        Exit::EntryFault {
            fault: 6,
            errcode: 5
        }
    );
    assert_eq!(
        Exit::from_trapnum(14, 2, 0x1234),
        Exit::Trap {
            vector: 14,
            errcode: 2,
            cr2: 0x1234
        }
    );
    assert_eq!(
        Exit::from_trapnum(0x80, 0, 0),
        Exit::Trap {
            vector: 0x80,
            errcode: 0,
            cr2: 0
        }
    );
}

/// An NMI while the guest runs is the host's: the guest keeps running and
/// sees nothing (no frame, no kill), even with a gate for vector 2.
#[test]
fn nmi_exit_is_not_reflected() {
    let mut t = T::init();
    t.gate(2, 0x2000, IDT_TYPE_INTERRUPT, 0);
    let before = t.v.regs;
    assert_eq!(t.exit(Exit::from_trapnum(trap::NMI, 0, 0)), Action::Resume);
    assert_eq!(t.v.regs, before);
    assert!(!t.v.is_dead());
}

#[test]
fn every_vcpu_has_its_own_instance_and_gdt_key() {
    let a = Vcpu::new(0x1000);
    let b = Vcpu::new(0x1000);
    assert_ne!(a.instance(), b.instance());
    // Same generation (both fresh), different guests: different keys, so
    // the hardware GDT is never reused from one guest for the other.
    assert_eq!(a.gdt.generation(), b.gdt.generation());
    assert_ne!(a.gdt_key(), b.gdt_key());
    assert_eq!(a.gdt_key().instance, a.instance());
    assert_eq!(a.gdt_key().generation, a.gdt.generation());
}

// ---------------------------------------------------------------------------
// The hypercall stub's view.

#[test]
fn stub_view_only_for_a_running_initialised_guest() {
    let t = T::fresh();
    assert_eq!(t.v.stub_view(MEM), None, "before INIT");
    let mut t = T::init();
    let view = t.v.stub_view(MEM).expect("after INIT");
    assert_eq!(view.ring_status, LD + LguestData::OFF_HCALL_STATUS);
    assert_eq!(view.pending, 0);
    for nr in [LHCALL_FLUSH_ASYNC, LHCALL_SEND_INTERRUPTS, LHCALL_FLUSH_TLB] {
        assert_ne!(view.trivial & (1 << nr), 0, "{nr} is trivial");
    }
    for nr in [
        LHCALL_LGUEST_INIT,
        LHCALL_SHUTDOWN,
        LHCALL_HALT,
        LHCALL_NOTIFY,
        LHCALL_SET_CLOCKEVENT,
        LHCALL_TS,
        LHCALL_LOAD_GDT_ENTRY,
        LHCALL_LOAD_TLS,
        LHCALL_LOAD_IDT_ENTRY,
        LHCALL_SET_STACK,
        LHCALL_NEW_PGTABLE,
    ] {
        assert_eq!(view.trivial & (1 << nr), 0, "{nr} is not trivial");
    }
    t.v.set_irq(3);
    assert_eq!(t.v.stub_view(MEM).map(|v| v.pending), Some(1 << 3));
    // Halted, dead: every call takes the full path.
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_HALT, 0, 0, 0), Action::Halt);
    assert_eq!(t.v.stub_view(MEM), None);
    let mut t = T::init();
    t.hcall(99, 0, 0, 0);
    assert_eq!(t.v.stub_view(MEM), None);
}

#[test]
fn stub_view_follows_the_ring_cursor() {
    let mut t = T::init();
    t.queue(0, [LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0]);
    t.queue(1, [LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0]);
    assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Resume);
    let view = t.v.stub_view(MEM).unwrap();
    assert_eq!(view.ring_status, LD + LguestData::off_hcall_status(2));
}

/// What the stub does for a trivial call (return at once, EFLAGS
/// sanitised) is what the full path does, whenever the stub may answer.
#[test]
fn the_full_path_changes_nothing_for_a_call_the_stub_answers() {
    for nr in 0..32 {
        let mut t = T::init();
        // As the stub is armed: after an entry check.
        assert_eq!(t.prepare(), Action::Resume);
        let view = t.v.stub_view(MEM).unwrap();
        if view.trivial & (1 << nr) == 0 {
            continue;
        }
        assert_eq!(t.m.read_u8(view.ring_status).unwrap(), HCALL_STATUS_EMPTY);
        t.v.regs.eax = nr;
        t.v.regs.ebx = 0x1111;
        t.v.regs.ecx = 0x2222;
        t.v.regs.edx = 0x3333;
        t.v.regs.esi = 0x4444;
        t.v.regs.eflags = 0x4000_0246 | 0x4000; // NT and reserved bits: sanitised
        let regs = t.v.regs;
        let mem = t.m.clone();
        assert_eq!(t.trap(0x1f, 0), Action::Resume, "call {nr}");
        assert_eq!(t.prepare(), Action::Resume, "call {nr}");
        let expected = Regs {
            eflags: sanitize_eflags(regs.eflags),
            trapnum: 0x1f,
            errcode: 0,
            ..regs
        };
        assert_eq!(t.v.regs, expected, "call {nr}");
        assert!(t.m == mem, "call {nr} wrote guest memory");
        assert!(t.e.clock.is_empty() && t.e.ts.is_empty(), "call {nr}");
        assert_eq!(t.v.stub_view(MEM), Some(view), "call {nr}");
    }
}

// ---------------------------------------------------------------------------
// Exits finished where they land: the same as the full path.

/// After a shortcut took an exit: the full path on `t` (the same guest
/// before the exit) must resume and leave the same registers, guest memory,
/// pending irqs and stub view.
fn assert_same_as_full_path(case: u32, exit: Exit, v: &Vcpu, m: &VecMemory, t: &mut T) {
    let a = t.exit(exit);
    let b = t.prepare();
    assert_eq!((a, b), (Action::Resume, Action::Resume), "case {case}");
    assert_eq!(v.regs, t.v.regs, "case {case}: registers");
    assert!(*m == t.m, "case {case}: guest memory");
    assert_eq!(v.pending, t.v.pending, "case {case}: pending");
    assert_eq!(v.stub_view(MEM), t.v.stub_view(MEM), "case {case}");
    assert!(!v.is_dead(), "case {case}");
}

/// After a shortcut declined: nothing of `before` changed.
fn assert_unchanged(case: u32, v: &Vcpu, m: &VecMemory, before: &(Regs, VecMemory, u32)) {
    assert_eq!(
        v.regs, before.0,
        "case {case}: declined but changed registers"
    );
    assert!(*m == before.1, "case {case}: declined but wrote memory");
    assert_eq!(
        v.pending, before.2,
        "case {case}: declined but changed irqs"
    );
}

/// Random guests, random traps: whenever `fast_exit` takes an exit, the
/// registers, guest memory and vCPU state are exactly what `handle_exit`
/// then `prepare_entry` produce; whenever it declines, it changed nothing.
#[test]
fn fast_exit_is_the_full_path_or_nothing() {
    let mut rng = crate::testutil::Rng(0x9e37_79b9_7f4a_7c15);
    let mut taken = 0u32;
    let mut declined = 0u32;
    for case in 0..3000 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = T::init();
        // Gates: a few vectors, present or not, interrupt or trap, any DPL.
        let vectors = [0u32, 3, 4, 6, 7, 13, 14, 0x1f, 0x20, 0x80];
        for &v in &vectors {
            if r(4) != 0 {
                let ty = if r(2) == 0 {
                    IDT_TYPE_INTERRUPT
                } else {
                    IDT_TYPE_TRAP
                };
                t.gate(v, 0x2000 + v, ty, r(4) as u8);
            }
        }
        if r(3) != 0 {
            t.user_segments();
        }
        if r(2) == 0 {
            let esp = [KSTACK, 8, MEM, MEM - 8, 0][r(5) as usize];
            t.hcall(LHCALL_SET_STACK, u32::from(KERNEL_DS), esp, 1);
        }
        if r(4) == 0 {
            t.hcall(LHCALL_TS, 8, 0, 0);
        }
        t.set_ld(
            LguestData::OFF_IRQ_ENABLED,
            if r(2) == 0 { X86_EFLAGS_IF } else { 0 },
        );
        if r(3) == 0 {
            t.user_mode();
        }
        t.v.regs.esp = [KSTACK, 12, 0, MEM, MEM - 4, 0xFFFF_FFF0][r(6) as usize];
        // Now and then a selector the entry check refuses (an empty slot).
        match r(8) {
            0 => t.v.regs.ds = 0xa9,
            1 => t.v.regs.ss = 0xa9,
            _ => {}
        }
        t.v.regs.eip = 0x1_2345;
        t.v.regs.eflags = 0x202 | (r(0x1_0000) as u32 & 0x4DD5);
        t.v.regs.eax = r(1 << 32) as u32;
        if r(8) == 0 {
            t.v.set_irq(r(3) as u32);
        }
        let vector = vectors[r(vectors.len() as u64) as usize];
        let errcode = [0u32, 0x18, 0x2][r(3) as usize];
        let cr2 = 0xdead_0000;
        let exit = Exit::Trap {
            vector,
            errcode,
            cr2,
        };
        // Warm the validated-selector cache the way a previous identical
        // exit would have, on a copy whose state is then put back.
        if r(4) != 0 && !t.v.is_dead() {
            let (regs, mem) = (t.v.regs, t.m.clone());
            t.exit(exit);
            t.prepare();
            if t.v.is_dead() {
                continue;
            }
            t.v.regs = regs;
            t.m = mem;
        }
        let (mut fast_v, mut fast_m) = (t.v.clone(), t.m.clone());
        let before = (t.v.regs, t.m.clone(), t.v.pending);
        if fast_v.fast_exit(vector, errcode, cr2, &mut fast_m, &mut t.e.clone()) {
            taken += 1;
            assert_same_as_full_path(case, exit, &fast_v, &fast_m, &mut t);
        } else {
            declined += 1;
            assert_unchanged(case, &fast_v, &fast_m, &before);
        }
    }
    // Both outcomes are exercised, many times.
    assert!(
        taken > 300 && declined > 300,
        "taken {taken}, declined {declined}"
    );
}

/// Random guests with random pending irqs after a host interrupt or a
/// trivial hypercall: whenever `fast_resume` finishes the exit, the result
/// is exactly `handle_exit` then `prepare_entry`; whenever it declines, it
/// changed nothing.
#[test]
fn fast_resume_is_the_full_path_or_nothing() {
    let mut rng = crate::testutil::Rng(0x2545_f491_4f6c_dd1d);
    let (mut taken, mut declined, mut delivered) = (0u32, 0u32, 0u32);
    for case in 0..3000 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = T::init();
        for irq in 0..4u32 {
            if r(4) != 0 {
                let ty = if r(2) == 0 {
                    IDT_TYPE_INTERRUPT
                } else {
                    IDT_TYPE_TRAP
                };
                t.gate(0x20 + irq, 0x3000 + irq, ty, 0);
            }
        }
        if r(3) != 0 {
            t.user_segments();
        }
        if r(2) == 0 {
            let esp = [KSTACK, 8, MEM][r(3) as usize];
            t.hcall(LHCALL_SET_STACK, u32::from(KERNEL_DS), esp, 1);
        }
        if r(3) == 0 {
            t.user_mode();
        }
        t.v.regs.esp = [KSTACK, 8, MEM][r(3) as usize];
        t.v.regs.eip = [0x1_2345, 0x500, 0x1000][r(3) as usize];
        // Now and then a selector the entry check refuses (an empty slot).
        match r(8) {
            0 => t.v.regs.es = 0xa9,
            1 => t.v.regs.ss = 0xa9,
            _ => {}
        }
        t.v.noirq_start = 0x500;
        t.v.noirq_end = 0x600;
        t.v.regs.eflags = 0x202 | (r(0x1_0000) as u32 & 0x4DD5);
        t.set_ld(
            LguestData::OFF_IRQ_ENABLED,
            if r(3) != 0 { X86_EFLAGS_IF } else { 0 },
        );
        t.set_ld(LguestData::OFF_BLOCKED_INTERRUPTS, r(16) as u32);
        for irq in 0..4 {
            if r(3) == 0 {
                t.v.set_irq(irq);
            }
        }
        if r(5) == 0 {
            t.queue(0, [LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0]);
        }
        let hcall = r(2) == 0;
        let vector = if hcall { 0x1f } else { 0x20 + r(0xd0) as u32 };
        if hcall {
            t.v.regs.eax = [LHCALL_SEND_INTERRUPTS, LHCALL_FLUSH_ASYNC, LHCALL_HALT][r(3) as usize];
        }
        let exit = if TrapOwner::of(vector) == TrapOwner::Guest {
            Exit::Trap {
                vector,
                errcode: 0,
                cr2: 0,
            }
        } else {
            Exit::HostInterrupt
        };
        // Warm the selector cache for the current state or the handler's.
        if r(4) != 0 {
            let (regs, mem, pending) = (t.v.regs, t.m.clone(), t.v.pending);
            t.exit(exit);
            t.prepare();
            if t.v.is_dead() {
                continue;
            }
            t.v.regs = regs;
            t.m = mem;
            t.v.pending = pending;
            t.v.halted = false;
            t.v.ring_cursor = 0;
        }
        let (mut fv, mut fm, mut fe) = (t.v.clone(), t.m.clone(), FakeEnv::default());
        let before = (t.v.regs, t.m.clone(), t.v.pending);
        if fv.fast_resume(vector, &mut fm, &mut fe) {
            taken += 1;
            if fv.pending != before.2 {
                delivered += 1;
            }
            assert_same_as_full_path(case, exit, &fv, &fm, &mut t);
        } else {
            declined += 1;
            assert_unchanged(case, &fv, &fm, &before);
        }
    }
    assert!(
        taken > 300 && declined > 300 && delivered > 100,
        "taken {taken}, declined {declined}, delivered {delivered}"
    );
}

// ---------------------------------------------------------------------------
// Hardening: 16-bit stacks, CPL 2.

const DATA16_DPL1: u64 = 0x008F_B200_0000_FFFF; // G, B = 0, writable, DPL 1

#[test]
fn set_stack_refuses_16bit_ss() {
    let mut t = T::init();
    assert_eq!(
        t.hcall(
            LHCALL_LOAD_GDT_ENTRY,
            20,
            DATA16_DPL1 as u32,
            (DATA16_DPL1 >> 32) as u32
        ),
        Action::Resume
    );
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0xa1, KSTACK, 1), Action::Dead);
    assert_eq!(t.dead(), "bad stack segment 161");
    // The 32-bit kernel data segment is accepted.
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 1), Action::Resume);
    // An empty slot with RPL 1 too is refused (upstream checked only the RPL).
    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0xa1, KSTACK, 1), Action::Dead);
    assert_eq!(t.dead(), "bad stack segment 161");
}

#[test]
fn entry_refuses_16bit_ss() {
    let mut t = T::init();
    assert_eq!(
        t.hcall(
            LHCALL_LOAD_GDT_ENTRY,
            20,
            DATA16_DPL1 as u32,
            (DATA16_DPL1 >> 32) as u32
        ),
        Action::Resume
    );
    t.v.regs.ss = 0xa1;
    t.v.regs.eip = 0x4321;
    assert_eq!(t.prepare(), Action::Dead);
    assert_eq!(t.dead(), "bad ss 0xa1 at 0x4321");
}

#[test]
fn entry_refuses_cpl2() {
    let mut t = T::init();
    t.v.regs.cs = 0x62;
    assert_eq!(t.prepare(), Action::Dead);
    assert_eq!(t.dead(), "bad cs 0x62 at 0x10000");
}

// ---------------------------------------------------------------------------
// UMIP emulation: sgdt/sidt/smsw/str/sldt see the guest view.

/// Run `code` at 0x2000 as a #GP(0) exit; the guest must resume after it.
fn umip(t: &mut T, code: &[u8]) {
    t.m.write(0x2000, code).unwrap();
    t.v.regs.eip = 0x2000;
    assert_eq!(t.trap(13, 0), Action::Resume, "{code:x?}");
    assert_eq!(t.v.regs.eip, 0x2000 + code.len() as u32, "{code:x?}");
}

#[test]
fn umip_sgdt_sidt() {
    let mut t = T::init();
    t.v.regs.eax = 0x3000;
    t.m.write(0x3000, &[0xAA; 8]).unwrap();
    umip(&mut t, &[0x0F, 0x01, 0x00]); // sgdt [eax]
    let mut b = [0u8; 8];
    t.m.read(0x3000, &mut b).unwrap();
    assert_eq!(b, [0xFF, 0x00, 0, 0, 0, 0, 0xAA, 0xAA]);
    // sidt [esp + 8] (SS), with a 16-bit operand size: the same 6 bytes.
    t.v.regs.esp = 0x4000;
    umip(&mut t, &[0x66, 0x0F, 0x01, 0x4C, 0x24, 0x08]);
    t.m.read(0x4008, &mut b).unwrap();
    assert_eq!(b, [0xFF, 0x07, 0, 0, 0, 0, 0, 0]);
    assert_eq!(GUEST_GDT_LIMIT, 255);
    assert_eq!(GUEST_IDT_LIMIT, 2047);
}

#[test]
fn umip_segment_base_and_override() {
    let mut t = T::init();
    // Slot 6 as a DPL-1 data segment based at 0x5000, in fs.
    let d = guest_abi::seg::SegmentDescriptor::new(0x5000, 0xFFFF, 0xB2, 0x4);
    assert_eq!(
        t.hcall(LHCALL_LOAD_GDT_ENTRY, 6, d.low(), d.high()),
        Action::Resume
    );
    t.v.regs.fs = 0x31;
    t.v.regs.ebx = 0x10;
    umip(&mut t, &[0x64, 0x0F, 0x01, 0x03]); // sgdt fs:[ebx]
    assert_eq!(t.m.read_u32(0x5010).unwrap(), 0xFF);
}

#[test]
fn umip_smsw_str_sldt() {
    let mut t = T::init();
    t.v.regs.eax = 0x1234_5678;
    umip(&mut t, &[0x0F, 0x01, 0xE0]); // smsw eax
    assert_eq!(t.v.regs.eax, 0x8000_0033);
    t.v.regs.ecx = 0x5555_0000;
    umip(&mut t, &[0x66, 0x0F, 0x01, 0xE1]); // smsw cx
    assert_eq!(t.v.regs.ecx, 0x5555_0033);
    // Virtual TS shows.
    assert_eq!(t.hcall(LHCALL_TS, 8, 0, 0), Action::Resume);
    assert_eq!(t.v.guest_cr0(), 0x8000_003B);
    t.v.regs.edi = 0x3000;
    t.m.write_u32(0x3000, 0xAAAA_AAAA).unwrap();
    umip(&mut t, &[0x0F, 0x01, 0x27]); // smsw [edi]: 2 bytes
    assert_eq!(t.m.read_u32(0x3000).unwrap(), 0xAAAA_003B);
    t.v.regs.edx = 0xFFFF_FFFF;
    umip(&mut t, &[0x0F, 0x00, 0xCA]); // str edx
    assert_eq!(t.v.regs.edx, 0);
    t.v.regs.edx = 0xFFFF_FFFF;
    umip(&mut t, &[0x66, 0x0F, 0x00, 0xC2]); // sldt dx
    assert_eq!(t.v.regs.edx, 0xFFFF_0000);
    umip(&mut t, &[0x0F, 0x00, 0x0F]); // str [edi]
    assert_eq!(t.m.read_u32(0x3000).unwrap(), 0xAAAA_0000);
}

/// From user mode the UMIP instructions are emulated too; in/out/cli are
/// still reflected.
#[test]
fn umip_from_user_mode() {
    let mut t = T::init();
    t.user_segments();
    t.user_mode();
    t.v.regs.esp = 0x6000;
    umip(&mut t, &[0x0F, 0x01, 0x0C, 0x24]); // sidt [esp]
    assert_eq!(t.m.read_u16(0x6000).unwrap(), 0x7FF);
    umip(&mut t, &[0x0F, 0x01, 0xE3]); // smsw ebx
    assert_eq!(t.v.regs.ebx, 0x8000_0033);
    t.m.write(0x2000, &[0xFA]).unwrap();
    t.v.regs.eip = 0x2000;
    assert_eq!(t.trap(13, 0), Action::Dead);
    assert_eq!(t.dead(), "unhandled trap 13 at 0x2000 (0x0)");
}

/// A store outside guest memory kills with the address.
#[test]
fn umip_bad_address() {
    let mut t = T::init();
    t.v.regs.eax = MEM - 4;
    t.m.write(0x2000, &[0x0F, 0x01, 0x00]).unwrap();
    t.v.regs.eip = 0x2000;
    assert_eq!(t.trap(13, 0), Action::Dead);
    assert_eq!(t.dead(), "bad address 0x100000");
}

/// `in` in a 16-bit code segment: no prefix is 16-bit, 0x66 is 32-bit.
#[test]
fn in_from_16bit_code() {
    let code16 = guest_abi::seg::SegmentDescriptor::new(0, 0xFFFF, 0xBA, 0);
    for (code, want) in [
        (&[0xED][..], 0xAAAA_FFFF),
        (&[0x66, 0xED], 0xFFFF_FFFF),
        (&[0xEC], 0xAAAA_AAFF),
        (&[0xE5, 0x60], 0xAAAA_FFFF),
    ] {
        let mut t = T::init();
        assert_eq!(
            t.hcall(LHCALL_LOAD_GDT_ENTRY, 20, code16.low(), code16.high()),
            Action::Resume
        );
        t.v.regs.cs = 0xa1;
        t.v.regs.eax = 0xAAAA_AAAA;
        umip(&mut t, code);
        assert_eq!(t.v.regs.eax, want, "{code:x?}");
    }
}

/// Random guests, random `int3`/`int $0x80` traps: whenever the reflection
/// stubs' model ([`StubView::reflect`], armed as the run loop arms it: after
/// an entry) takes a trap, the frame registers and guest memory are exactly
/// what `handle_exit` then `prepare_entry` produce; whenever it declines,
/// it changed nothing.
#[test]
fn stub_reflect_is_the_full_path_or_nothing() {
    let mut rng = crate::testutil::Rng(0x51ab_c0de_2024_0007);
    let mut taken = [0u32; 2];
    let mut declined = 0u32;
    // A CPL-1 data segment with base 0x4000 in GDT slot 20 (selector 0xa1).
    let based: u64 = 0x00CF_B200_4000_FFFF;
    for case in 0..4000 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = T::init();
        for &v in &[3u32, 0x80, 0x20] {
            if r(5) != 0 {
                let ty = if r(2) == 0 {
                    IDT_TYPE_INTERRUPT
                } else {
                    IDT_TYPE_TRAP
                };
                t.gate(v, 0x2000 + v, ty, [1u8, 3, 3, 0][r(4) as usize]);
            }
        }
        t.user_segments();
        assert_eq!(
            t.hcall(
                LHCALL_LOAD_GDT_ENTRY,
                20,
                based as u32,
                (based >> 32) as u32
            ),
            Action::Resume
        );
        if r(4) != 0 {
            let ss = [u32::from(KERNEL_DS), 0xa1, u32::from(USER_DS)][r(3) as usize];
            let esp = [KSTACK, 8, 20, MEM, MEM - 0x4000, 0][r(6) as usize];
            t.hcall(LHCALL_SET_STACK, ss, esp, 1);
        }
        if r(3) == 0 {
            t.v.regs.ss = 0xa1;
        }
        if r(6) == 0 {
            t.v.set_irq(r(3) as u32);
        }
        // Entered (and the stubs armed) like the run loop does it.
        if t.prepare() != Action::Resume {
            continue;
        }
        let Some(view) = t.v.stub_view(MEM) else {
            continue;
        };
        // Then the guest runs on without exits: maybe `iret`s to user
        // mode, moves its stack, loads another stack segment.
        t.set_ld(
            LguestData::OFF_IRQ_ENABLED,
            if r(2) == 0 { X86_EFLAGS_IF } else { 0 },
        );
        if r(3) == 0 {
            t.user_mode();
        } else if r(6) == 0 {
            t.v.regs.ss = [u32::from(KERNEL_DS), 0xa1][r(2) as usize];
        }
        t.v.regs.esp = [KSTACK, 12, 0, MEM, MEM - 4, 0xFFFF_FFF0, 0xFFFF_C010][r(7) as usize];
        t.v.regs.eip = 0x1_2345;
        t.v.regs.eflags = 0x202 | (r(0x1_0000) as u32 & 0x4DD5);
        let raised = if r(8) == 0 { 1 << r(3) } else { 0 };
        let vector = [3u32, 0x80][r(2) as usize];
        let r0 = t.v.regs;
        let hw0 = HwFrame::of(&r0);
        let mut hw = hw0;
        let mut m = t.m.clone();
        if view.reflect(vector, &mut hw, raised, &mut m) {
            taken[usize::from(r0.cs & 3 == 3)] += 1;
            let a = t.trap(vector, 0);
            let b = t.prepare();
            assert_eq!((a, b), (Action::Resume, Action::Resume), "case {case}");
            let v = t.v.regs;
            let full = HwFrame::of(&v);
            assert_eq!(hw, full, "case {case}: frame registers");
            assert!(m == t.m, "case {case}: guest memory");
            assert_eq!(t.v.pending_irqs(), 0, "case {case}");
        } else {
            declined += 1;
            assert_eq!(hw, hw0, "case {case}: declined but changed the frame");
            assert!(m == t.m, "case {case}: declined but wrote memory");
        }
    }
    assert!(
        taken[0] > 200 && taken[1] > 60 && declined > 200,
        "taken {taken:?}, declined {declined}"
    );
}

/// Random guests with irqs pending, a trivial hypercall from the entry
/// state: whenever the hypercall stub's lane ([`Vcpu::stub_deliver`]) takes
/// it, the frame registers, guest memory and pending irqs are exactly what
/// `handle_exit` then `prepare_entry` produce; whenever it declines, it
/// changed nothing.
#[test]
fn stub_deliver_is_the_full_path_or_nothing() {
    const NOIRQ_START: u32 = 0x5000;
    let mut rng = crate::testutil::Rng(0x0dd_ba11_cafe_f00d);
    let mut taken = [0u32; 2];
    let mut declined = 0u32;
    let based: u64 = 0x00CF_B200_4000_FFFF;
    for case in 0..4000 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = T::fresh();
        t.set_ld(LguestData::OFF_NOIRQ_START, NOIRQ_START);
        t.set_ld(LguestData::OFF_NOIRQ_END, NOIRQ_START + 4);
        assert_eq!(t.hcall(LHCALL_LGUEST_INIT, LD, 0, 0), Action::Resume);
        for irq in 0..3u32 {
            if r(4) != 0 {
                let ty = if r(2) == 0 {
                    IDT_TYPE_INTERRUPT
                } else {
                    IDT_TYPE_TRAP
                };
                t.gate(0x20 + irq, 0x3000 + irq, ty, r(4) as u8);
            }
        }
        assert_eq!(
            t.hcall(
                LHCALL_LOAD_GDT_ENTRY,
                20,
                based as u32,
                (based >> 32) as u32
            ),
            Action::Resume
        );
        if r(4) == 0 {
            t.v.regs.ss = 0xa1;
        }
        t.v.regs.esp = [KSTACK, 12, 0, MEM, MEM - 4, 0xFFFF_FFF0, 0xFFFF_C010][r(7) as usize];
        // Armed after an entry, with irqs off so nothing is delivered yet.
        t.set_ld(LguestData::OFF_IRQ_ENABLED, 0);
        if t.prepare() != Action::Resume {
            continue;
        }
        let Some(view) = t.v.stub_view(MEM) else {
            continue;
        };
        for _ in 0..=r(2) {
            t.v.set_irq(r(4) as u32);
        }
        t.set_ld(LguestData::OFF_BLOCKED_INTERRUPTS, r(8) as u32);
        t.set_ld(
            LguestData::OFF_IRQ_ENABLED,
            if r(4) != 0 { X86_EFLAGS_IF } else { 0 },
        );
        t.v.regs.eip = [0x1_2345, NOIRQ_START, NOIRQ_START + 1][r(3) as usize];
        t.v.regs.eflags = 0x202 | (r(0x1_0000) as u32 & 0x4DD5);
        t.v.regs.eax = [LHCALL_SEND_INTERRUPTS, LHCALL_FLUSH_ASYNC][r(2) as usize];
        if r(6) == 0 {
            t.v.regs.cs = 0x69 ^ 0x08; // another CPL-1 selector: refused or not CS
        }
        let r0 = t.v.regs;
        let hw0 = HwFrame::of(&r0);
        let mut hw = hw0;
        let (mut v, mut m, mut e) = (t.v.clone(), t.m.clone(), t.e.clone());
        if v.stub_deliver(&view, &mut hw, &mut m, &mut e) {
            taken[usize::from(
                hw != HwFrame {
                    eflags: hw.eflags,
                    ..hw0
                },
            )] += 1;
            let a = t.trap(0x1f, 0);
            let b = t.prepare();
            assert_eq!((a, b), (Action::Resume, Action::Resume), "case {case}");
            let x = t.v.regs;
            let full = HwFrame::of(&x);
            assert_eq!(hw, full, "case {case}: frame registers");
            assert!(m == t.m, "case {case}: guest memory");
            assert_eq!(v.pending_irqs(), t.v.pending_irqs(), "case {case}: pending");
            assert!(!v.is_dead(), "case {case}");
        } else {
            declined += 1;
            assert_eq!(hw, hw0, "case {case}: declined but changed the frame");
            assert!(m == t.m, "case {case}: declined but wrote memory");
            assert_eq!(v.pending_irqs(), t.v.pending_irqs(), "case {case}");
        }
    }
    assert_eq!(taken[0], 0, "the lane only ever delivers");
    assert!(
        taken[1] > 100 && declined > 300,
        "taken {taken:?}, declined {declined}"
    );
}

/// Random rings (no-op calls, other calls, empty slots) and cursors: the
/// hypercall stub's drain ([`Vcpu::stub_drain`]) followed by the full path
/// of a trivial hypercall ends exactly where the full path alone does, and
/// when the drain says the ring is empty, it is.
#[test]
fn stub_drain_then_the_full_path_is_the_full_path() {
    let mut rng = crate::testutil::Rng(0x005e_ed0f_a5c1_1234);
    let mut emptied = 0u32;
    let mut stopped = 0u32;
    for case in 0..3000 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = T::init();
        // Advance the cursor to a random slot with no-op calls.
        let start = r(64) as u32;
        for s in 0..start {
            t.queue(s, [LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0]);
        }
        if start > 0 {
            assert_eq!(t.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Resume);
        }
        let n = r(66) as u32;
        for k in 0..n.min(64) {
            let slot = (start + k) % 64;
            let nr = match r(120) {
                0 => LHCALL_TS,
                1 => 77, // not a call: kills on the full path
                2 => LHCALL_FLUSH_TLB,
                3 => LHCALL_FLUSH_ASYNC,
                _ => LHCALL_SEND_INTERRUPTS,
            };
            t.queue(slot, [nr, 0, 0, 0, 0]);
        }
        t.v.regs.eax = LHCALL_SEND_INTERRUPTS;
        let (mut v, mut m) = (t.v.clone(), t.m.clone());
        let empty = v.stub_drain(&mut m);
        let view = v.stub_view(MEM);
        if empty {
            emptied += 1;
            let view = view.expect("still running");
            assert_eq!(
                m.read_u8(view.ring_status),
                Ok(HCALL_STATUS_EMPTY),
                "case {case}"
            );
        } else {
            stopped += 1;
        }
        // Then the full path on both.
        let mut d = T {
            v,
            m,
            e: t.e.clone(),
        };
        let a = (d.trap(0x1f, 0), d.prepare());
        let b = (t.trap(0x1f, 0), t.prepare());
        assert_eq!(a, b, "case {case}");
        assert_eq!(d.v.regs, t.v.regs, "case {case}: registers");
        assert!(d.m == t.m, "case {case}: guest memory");
        assert_eq!(
            d.v.stub_view(MEM),
            t.v.stub_view(MEM),
            "case {case}: cursor"
        );
        assert_eq!(d.v.dead_reason(), t.v.dead_reason(), "case {case}");
    }
    assert!(
        emptied > 300 && stopped > 300,
        "emptied {emptied}, stopped {stopped}"
    );
}

/// Two vCPUs (and their memory and host tables) ended in the same state:
/// everything the host or the guest can see — registers, guest memory,
/// shadow tables, MMU work owed, the shadow core's counters, death, GDT,
/// TS (the vCPU's and the host's), ring slot, stack, pin key and the
/// stubs' view.
fn assert_same_state(x: &mut T, y: &mut T, what: &str) {
    assert_eq!(x.v.regs, y.v.regs, "{what}: registers");
    assert!(x.m == y.m, "{what}: guest memory");
    assert_eq!(x.e.tables, y.e.tables, "{what}: shadow tables");
    assert_eq!(x.v.take_mmu_work(), y.v.take_mmu_work(), "{what}: MMU work");
    assert_eq!(
        x.v.shadow().map(ShadowPaging::stats),
        y.v.shadow().map(ShadowPaging::stats),
        "{what}: counters"
    );
    assert_eq!(x.v.dead_reason(), y.v.dead_reason(), "{what}: death");
    assert_eq!(x.v.gdt_key(), y.v.gdt_key(), "{what}: GDT");
    assert_eq!(x.v.ts(), y.v.ts(), "{what}: TS");
    assert_eq!(x.e.ts, y.e.ts, "{what}: host TS");
    assert_eq!(x.v.ring_slot(), y.v.ring_slot(), "{what}: ring");
    assert_eq!(x.v.stack_key(), y.v.stack_key(), "{what}: stack");
    assert_eq!(x.v.pin_key(), y.v.pin_key(), "{what}: pin");
    assert_eq!(x.v.stub_view(MEM), y.v.stub_view(MEM), "{what}: stub view");
}

/// Random paging guests, random page faults and `NEW_PGTABLE`s: whenever
/// [`Vcpu::fast_paging`] finishes one, the registers, guest memory, shadow
/// tables, MMU work and counters are exactly what `handle_exit` then
/// `prepare_entry` produce; whenever it declines, the full path after it
/// ends exactly where the full path alone does.
#[test]
fn fast_paging_is_the_full_path() {
    let mut rng = crate::testutil::Rng(0x00fa_57fa_u64 << 20 | 0x1234);
    let mut taken = 0u32;
    let mut declined = 0u32;
    let mut reflections = 0u32;
    let mut drained = 0u32;
    let mut tls_changed = 0u32;
    // A second directory: the kernel half only.
    const PGD2: u32 = 0x2_2000;
    for case in 0..1500 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = paging_guest();
        t.m.write_u32(PGD2 + (KBASE >> 22) * 4, PTES | 0x63)
            .unwrap();
        t.gate(14, 0x7000, IDT_TYPE_INTERRUPT, 0);
        // The kernel stack: in one page, or the frame straddling two.
        t.v.regs.esp = KBASE + [0x9000, 0x9008][r(2) as usize];
        // Some pages clean, read-only, user, missing.
        for _ in 0..r(6) {
            let page = r(u64::from(MEM / 4096)) as u32;
            let flags = [0x63, 0x61, 0x21, 0x67, 0x00, 0x03][r(6) as usize];
            t.m.write_u32(PTES + page * 4, (page << 12) | flags)
                .unwrap();
        }
        // Now and then the stack page itself not yet accessed or dirty,
        // read-only, or missing (a trap frame there is the full path's).
        if r(3) == 0 {
            let flags = [0x23, 0x43, 0x03, 0x61, 0x00][r(5) as usize];
            t.m.write_u32(PTES + 8 * 4, (8 << 12) | flags).unwrap();
        }
        // The page above the stack's elsewhere in guest memory.
        if r(2) == 0 {
            t.m.write_u32(PTES + 9 * 4, (0x31 << 12) | 0x63).unwrap();
        }
        if r(3) == 0 {
            assert_eq!(t.hcall(LHCALL_NEW_PGTABLE, PGD2, 0, 0), Action::Resume);
        }
        t.gate(0x20, 0x7100, IDT_TYPE_INTERRUPT, 0);
        // Now and then the stack page pinned (its leaf in the shadow, where
        // a reflection finds it without a walk), maybe with the page below.
        if r(3) == 0 {
            let pages = 1 + r(2) as u32;
            let _ = t.hcall(LHCALL_SET_STACK, 0x69, KBASE + 0x9000, pages);
        }
        // Three TLS entries at 0x7900 (a flat user data segment first),
        // now and then loaded already and in GS (Linux's user TLS).
        t.m.write(0x7900, &0x00CF_F200_0000_FFFF_u64.to_le_bytes())
            .unwrap();
        if r(4) == 0 {
            let _ = t.hcall(LHCALL_LOAD_TLS, 0x7900, 0, 0);
            if r(2) == 0 {
                t.v.regs.gs = 0x33;
            }
        }
        if t.prepare() != Action::Resume {
            continue;
        }
        let _ = t.v.take_mmu_work();
        // An irq raised meanwhile, maybe deliverable at the next entry.
        if r(6) == 0 {
            t.v.set_irq(0);
        }
        if r(2) == 0 {
            t.set_ld(LguestData::OFF_IRQ_ENABLED, X86_EFLAGS_IF);
        }
        let hcall = Exit::Trap {
            vector: 0x1f,
            errcode: 0,
            cr2: 0,
        };
        // Now and then calls queued in the async ring (Linux's lazy MMU
        // batches): shadow-paging ones, no-op ones, and now and then one
        // the drain must leave to the full path (a `NEW_PGTABLE`, a clock
        // event, a bad call), in any position.
        let mut queued = 0u32;
        if r(3) == 0 {
            let first = t.v.ring_slot().unwrap() - LD - LguestData::OFF_HCALL_STATUS;
            for k in 0..1 + r(4) as u32 {
                let page = r(u64::from(MEM / 4096) + 8) as u32;
                let flags = [0x63, 0x61, 0x21, 0x67, 0x00][r(5) as usize];
                let va = [KBASE, 0][r(2) as usize] + r(u64::from(MEM / 4096)) as u32 * 4096;
                let entry = match r(17) {
                    0..=4 => [
                        LHCALL_SET_PTE,
                        [PGD, PGD2][r(2) as usize],
                        va,
                        (page << 12) | flags,
                        0,
                    ],
                    5 => [
                        LHCALL_SET_PGD,
                        PGD,
                        [0, 1, KBASE >> 22, 1024][r(4) as usize],
                        0,
                        0,
                    ],
                    6 => [LHCALL_FLUSH_TLB, r(2) as u32, 0, 0, 0],
                    7 => [LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0],
                    8 => [LHCALL_FLUSH_ASYNC, 0, 0, 0, 0],
                    9 => [LHCALL_NEW_PGTABLE, [PGD, PGD2][r(2) as usize], 0, 0, 0],
                    10 => [LHCALL_SET_CLOCKEVENT, 1000, 0, 0, 0],
                    11 | 12 => [
                        LHCALL_SET_STACK,
                        0x69,
                        KBASE + [0x9000, 0xB000][r(2) as usize],
                        1 + r(2) as u32,
                        0,
                    ],
                    // TLS entries: the same as now (nothing changes) or
                    // others (a new GDT generation: the drain stops after
                    // it); the lazy FPU flag.
                    13 | 14 => [LHCALL_LOAD_TLS, [0x7800, 0x7900][r(2) as usize], 0, 0, 0],
                    15 => [LHCALL_TS, [0, 8][r(2) as usize], 0, 0, 0],
                    _ => [99, 0, 0, 0, 0],
                };
                t.queue((first + queued) % 64, entry);
                queued += 1;
                // Linux's context switch: `NEW_PGTABLE`, then the next
                // task's `SET_STACK` (which does the pinning).
                if k == 0 && r(4) == 0 {
                    let stack = [LHCALL_SET_STACK, 0x69, KBASE + 0xB000, 1, 0];
                    t.queue((first + queued) % 64, [LHCALL_NEW_PGTABLE, PGD2, 0, 0, 0]);
                    t.queue((first + queued + 1) % 64, stack);
                    queued += 2;
                }
            }
        }
        let which = r(10);
        let exit = if queued > 0 && r(2) == 0 {
            t.v.regs.eax = LHCALL_FLUSH_ASYNC;
            hcall
        } else if which < 2 {
            t.v.regs.eax = LHCALL_NEW_PGTABLE;
            t.v.regs.ebx = [PGD, PGD2, PGD + 1, 0x3000][r(4) as usize];
            hcall
        } else if which < 5 {
            // The other shadow-paging calls, with good and bad arguments.
            let page = r(u64::from(MEM / 4096) + 8) as u32;
            let flags = [0x63, 0x61, 0x21, 0x67, 0x00, 0x03, 0x80][r(7) as usize];
            t.v.regs.eax = [
                LHCALL_SET_PTE,
                LHCALL_SET_PTE,
                LHCALL_SET_PGD,
                LHCALL_FLUSH_TLB,
                LHCALL_SET_PMD,
            ][r(5) as usize];
            t.v.regs.ebx = [PGD, PGD2, 0x3000][r(3) as usize];
            t.v.regs.ecx = match t.v.regs.eax {
                LHCALL_SET_PTE => {
                    [KBASE, 0][r(2) as usize] + r(u64::from(MEM / 4096) + 8) as u32 * 4096
                }
                LHCALL_FLUSH_TLB => r(2) as u32,
                _ => [KBASE >> 22, 0, 1, 1023, 1024][r(5) as usize],
            };
            t.v.regs.edx = (page << 12) | flags;
            hcall
        } else {
            let page = r(u64::from(MEM / 4096) + 8) as u32;
            Exit::Trap {
                vector: 14,
                errcode: [0, 2, 4, 6, 1, 3][r(6) as usize],
                cr2: [KBASE, 0][r(2) as usize] + page * 4096 + r(4096) as u32,
            }
        };
        let Exit::Trap {
            vector,
            errcode,
            cr2,
        } = exit
        else {
            unreachable!()
        };
        let mut f = T {
            v: t.v.clone(),
            m: t.m.clone(),
            e: t.e.clone(),
        };
        // The page-fault stub's fill does the same as fast_paging for a
        // fault from the state it was armed with.
        let mut g = T {
            v: t.v.clone(),
            m: t.m.clone(),
            e: t.e.clone(),
        };
        let stub = vector == 14 && g.v.stub_fill(cr2, errcode, &mut g.m, &mut g.e);
        let gdt_before = f.v.gdt_key();
        let fast = f.v.fast_paging(vector, errcode, cr2, &mut f.m, &mut f.e);
        // What the host relies on to re-enter at once: the GDT it loaded
        // is still the guest's but for TLS entries no segment register
        // uses (the host loads them then).
        if fast && f.v.gdt_key() != gdt_before {
            assert!(
                !f.v.uses_tls(),
                "case {case}: TLS changed under a live selector"
            );
            tls_changed += 1;
        }
        if vector == 14 {
            assert_eq!(stub, fast, "case {case}");
            assert!(g.m == f.m, "case {case}: stub fill memory");
            assert_eq!(g.e.tables, f.e.tables, "case {case}: stub fill tables");
            assert_eq!(g.v.dead_reason(), f.v.dead_reason(), "case {case}");
        }
        // A fault the shadow core found to be the guest's own is then
        // reflected by `fast_exit` where it can be (as on the trap stack).
        let reflected =
            !fast && vector == 14 && f.v.fast_exit(vector, errcode, cr2, &mut f.m, &mut f.e);
        if fast {
            taken += 1;
            drained += u32::from(queued > 0);
        } else if reflected {
            reflections += 1;
        } else {
            declined += 1;
            f.exit(exit);
            f.prepare();
        }
        let a = (t.exit(exit), t.prepare());
        if fast || reflected {
            assert_eq!(a, (Action::Resume, Action::Resume), "case {case}");
        }
        assert_same_state(&mut f, &mut t, &format!("case {case}"));
    }
    assert!(
        taken > 300 && declined > 300 && reflections > 70 && drained > 50 && tls_changed > 10,
        "taken {taken}, declined {declined}, reflected {reflections}, drained {drained}, \
         TLS changed {tls_changed}"
    );
}

/// Under shadow paging the host runs with SMEP: the guest kernel fetching
/// from a user page is killed with a reason, never filled (the fill would
/// not stop the fault: a livelock) on either path.
#[test]
fn kernel_fetch_from_a_user_page_kills_under_paging() {
    let mut t = paging_guest();
    t.prepare();
    let cr2 = KBASE + 0x5000;
    let (mut m, mut e) = (t.m.clone(), t.e.clone());
    assert!(!t.v.fast_paging(14, 0x11, cr2, &mut m, &mut e));
    let exit = Exit::Trap {
        vector: 14,
        errcode: 0x11,
        cr2,
    };
    assert_eq!(t.exit(exit), Action::Dead);
    assert!(
        t.dead().contains("executed a user page at 0xc0005000"),
        "{}",
        t.dead()
    );
    // A user-mode fetch (U/S set) is an ordinary fault.
    let mut t = paging_guest();
    t.prepare();
    let (mut m, mut e) = (t.m.clone(), t.e.clone());
    assert!(t.v.fast_paging(14, 0x15, cr2, &mut m, &mut e) || !t.v.is_dead());
}

/// The hypercall stub's paging lane ([`Vcpu::stub_paging`]): random
/// `NEW_PGTABLE`s between cached and uncached address spaces, `SET_PTE`s,
/// `SET_PGD`s and flushes with good and bad arguments. When it takes the
/// call, the full path (`handle_exit` + `prepare_entry`) ends in the same
/// state: the same shadow tables, root, MMU work owed, counters, guest
/// memory and death; when it declines, nothing changed.
#[test]
fn stub_paging_is_the_full_path_or_nothing() {
    let mut rng = crate::testutil::Rng(0x0051_7c40_0000_0777);
    let (mut taken, mut declined, mut switched) = (0u32, 0u32, 0u32);
    let dirs = [PGD, 0x2_2000, 0x2_3000, 0x2_4000, 0x2_5000, 0x2_6000];
    for case in 0..2000 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = paging_guest();
        for &d in &dirs[1..] {
            t.m.write_u32(d + (KBASE >> 22) * 4, PTES | 0x63).unwrap();
        }
        if r(2) == 0 {
            assert_eq!(
                t.hcall(LHCALL_SET_STACK, 0x69, KBASE + 0x9000, 1),
                Action::Resume
            );
        }
        for _ in 0..r(8) {
            let d = dirs[r(dirs.len() as u64) as usize];
            assert_eq!(t.hcall(LHCALL_NEW_PGTABLE, d, 0, 0), Action::Resume);
            if r(4) == 0 {
                t.hcall(LHCALL_FLUSH_TLB, r(2) as u32, 0, 0);
            }
        }
        // User pages faulted in: the shadow's user page table exists, so
        // a user-half SET_PTE has a leaf to change.
        for _ in 0..r(3) {
            let cr2 = (r(u64::from(MEM / 4096)) as u32) * 4096;
            t.exit(Exit::Trap {
                vector: 14,
                errcode: 2,
                cr2,
            });
        }
        if t.v.is_dead() || t.prepare() != Action::Resume {
            continue;
        }
        let _ = t.v.take_mmu_work();
        let page = r(u64::from(MEM / 4096) + 8) as u32;
        let (nr, args) = match r(6) {
            0..=2 => (
                LHCALL_NEW_PGTABLE,
                [dirs[r(dirs.len() as u64) as usize], 0, 0, 0],
            ),
            3 => (
                LHCALL_SET_PTE,
                [
                    dirs[r(2) as usize],
                    [KBASE, 0][r(2) as usize] + (r(u64::from(MEM / 4096)) as u32) * 4096,
                    (page << 12) | [0x63, 0x61, 0x21, 0x00, 0x80][r(5) as usize],
                    0,
                ],
            ),
            4 => (
                LHCALL_SET_PGD,
                [
                    dirs[r(2) as usize],
                    [KBASE >> 22, 0, 1024][r(3) as usize],
                    0,
                    0,
                ],
            ),
            _ => (LHCALL_FLUSH_TLB, [r(2) as u32, 0, 0, 0]),
        };
        [
            t.v.regs.eax,
            t.v.regs.ebx,
            t.v.regs.ecx,
            t.v.regs.edx,
            t.v.regs.esi,
        ] = [nr, args[0], args[1], args[2], args[3]];
        let mut f = T {
            v: t.v.clone(),
            m: t.m.clone(),
            e: t.e.clone(),
        };
        if let Some(done) = f.v.stub_paging(nr, args, &mut f.m, &mut f.e) {
            taken += 1;
            assert_eq!(t.trap(0x1f, 0), Action::Resume, "case {case}");
            assert_eq!(t.prepare(), Action::Resume, "case {case}");
            let (fw, tw) = (f.v.take_mmu_work(), t.v.take_mmu_work());
            match done {
                // A switch the lane loads itself: the full path switches to
                // the same root with nothing else owed.
                LaneDone::Load(root) => {
                    switched += 1;
                    assert_eq!(fw.load, None, "case {case}");
                    assert_eq!(fw.flush, Flush::None, "case {case}");
                    let sw = tw.load.expect("the full path switches");
                    assert_eq!((sw.root, sw.flush), (root, false), "case {case}");
                    assert_eq!(tw.flush, Flush::None, "case {case}");
                }
                LaneDone::Work => assert_eq!(fw, tw, "case {case}: MMU work"),
            }
        } else if f.v.is_dead() {
            // Killed by the call: the full path kills it the same way.
            t.trap(0x1f, 0);
            t.prepare();
        } else {
            declined += 1;
        }
        assert_eq!(f.v.shadow_root(), t.v.shadow_root(), "case {case}");
        assert_eq!(
            f.v.shadow().map(ShadowPaging::stats),
            t.v.shadow().map(ShadowPaging::stats),
            "case {case}"
        );
        assert_eq!(f.e.tables, t.e.tables, "case {case}: shadow tables");
        assert!(f.m == t.m, "case {case}: guest memory");
        assert_eq!(f.v.dead_reason(), t.v.dead_reason(), "case {case}");
    }
    assert!(
        taken > 800 && switched > 200,
        "taken {taken}, switched {switched}, declined {declined}"
    );
}

/// Under shadow paging the stubs may reflect a user-mode trap onto the
/// `SET_STACK` stack only where pushing the frame changes nothing the CPU
/// would have changed: one page, mapped writable for the kernel, ACCESSED
/// and DIRTY already set — as the shadow's writable leaf of the pinned
/// stack says (entries as the guest announced them), or, without one, as a
/// quiet walk of the guest's tables finds. The view then holds the frame's
/// guest-physical address; anything else leaves user traps to the full
/// path.
#[test]
fn under_paging_user_traps_reflect_only_onto_a_quietly_mapped_stack() {
    let mut t = paging_guest();
    let top = KBASE + KSTACK;
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, top, 2), Action::Resume);
    t.prepare();
    let view = t.v.stub_view_in(&t.m, &mut t.e).unwrap();
    assert_eq!(view.ss1, 0x69);
    assert_eq!(
        view.user_frame,
        KSTACK - 20,
        "guest-physical, through the tables"
    );
    assert_eq!(view.user_esp, top - 20, "the guest's ESP stays virtual");
    assert_eq!(view.kss, 0, "kernel-mode traps still take the full path");
    // Without the guest's memory to walk, nothing is reflected under paging.
    assert_eq!(t.v.stub_view(MEM).unwrap().ss1, 0);

    let pte = PTES + ((KSTACK - 20) >> 12) * 4;
    let frame = (KSTACK - 20) & !0xFFF;
    // Pinning wrote the stack page as the CPU would: accessed and dirty.
    assert_eq!(t.m.read_u32(pte).unwrap() & 0x60, 0x60);
    // Announced, a clean entry is pinned again (dirtied: the view still
    // reflects there), and a read-only one kills ("bad stack page").
    for bits in [0x023, 0x043] {
        assert_eq!(
            t.hcall(LHCALL_SET_PTE, PGD, frame + KBASE, frame | bits),
            Action::Resume
        );
        assert_eq!(t.m.read_u32(pte).unwrap(), frame | 0x63, "{bits:#x}");
        assert_eq!(t.v.stub_view_in(&t.m, &mut t.e).unwrap().ss1, 0x69);
    }
    // Without a writable leaf in the shadow (a fresh guest whose stack
    // page the shadow has not mapped), the guest's tables decide, quietly:
    // not yet dirty (the push would set D), read-only, not accessed: no.
    for bits in [0x023, 0x061, 0x043] {
        let mut w = paging_guest();
        w.m.write_u32(pte, frame | bits).unwrap();
        assert_eq!(
            w.v.stub_frame_gpa(top - 20, &w.m, &mut w.e),
            None,
            "{bits:#x}"
        );
        assert_eq!(w.m.read_u32(pte).unwrap(), frame | bits, "nothing written");
    }
    let mut w = paging_guest();
    assert_eq!(
        w.v.stub_frame_gpa(top - 20, &w.m, &mut w.e),
        Some(KSTACK - 20)
    );
    // A read-only stack page cannot be pinned: the guest dies.
    let mut w = paging_guest();
    w.m.write_u32(pte, frame | 0x061).unwrap();
    assert_eq!(w.hcall(LHCALL_SET_STACK, 0x69, top, 1), Action::Dead);

    // Where the frame is after a paging call on the trap stack: the pinned
    // page as the shadow maps it, even once the guest's entry is changed
    // behind its back (as lguest's switcher wrote through the shadow); a
    // SET_PTE moving the page moves the frame.
    let low = t.v.stub_view_in(&t.m, &mut t.e).unwrap().user_linear;
    assert_eq!(low, top - 20);
    assert_eq!(t.v.stub_frame_gpa(low, &t.m, &mut t.e), Some(KSTACK - 20));
    t.m.write_u32(pte, 0x7000 | 0x063).unwrap();
    assert_eq!(t.v.stub_frame_gpa(low, &t.m, &mut t.e), Some(KSTACK - 20));
    assert_eq!(
        t.hcall(LHCALL_SET_PTE, PGD, low & !0xFFF, 0x7000 | 0x063),
        Action::Resume
    );
    assert_eq!(
        t.v.stub_frame_gpa(low, &t.m, &mut t.e),
        Some(0x7000 | (low & 0xFFF))
    );

    // A frame that would straddle two pages: no.
    let mut t = paging_guest();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, top + 8, 2), Action::Resume);
    t.prepare();
    assert_eq!(t.v.stub_view_in(&t.m, &mut t.e).unwrap().ss1, 0);
}

/// A trap reflected on the trap stack under shadow paging pushes its frame
/// through a writable shadow leaf or a quiet walk only: a kernel stack page
/// the shadow maps read-only (read so far, clean in the guest's tables) is
/// the full path's, which sets its DIRTY bit as the CPU would.
#[test]
fn reflection_onto_a_clean_stack_page_takes_the_full_path() {
    let mut t = paging_guest();
    t.gate(14, 0x7000, IDT_TYPE_INTERRUPT, 0);
    // The stack page accessed but not dirty; the page at 0x50_0000 (user
    // half) not mapped at all.
    let pte = PTES + 8 * 4;
    t.m.write_u32(pte, (8 << 12) | 0x23).unwrap();
    t.v.regs.esp = KBASE + 0x9000;
    assert_eq!(t.prepare(), Action::Resume);
    let _ = t.v.take_mmu_work();
    // A read of the stack page: a read-only leaf in the shadow.
    assert!(t.v.fast_paging(14, 0, KBASE + 0x8800, &mut t.m, &mut t.e));
    let _ = t.v.take_mmu_work();
    assert_eq!(t.m.read_u32(pte).unwrap(), (8 << 12) | 0x23);
    // A fault the guest must see: declined by the fill, then not reflected
    // on the trap stack (the push would dirty the page).
    let mut f = T {
        v: t.v.clone(),
        m: t.m.clone(),
        e: t.e.clone(),
    };
    let cr2 = 0x50_0000;
    assert!(!f.v.fast_paging(14, 4, cr2, &mut f.m, &mut f.e));
    assert!(!f.v.fast_exit(14, 4, cr2, &mut f.m, &mut f.e));
    // The full path reflects it and dirties the stack page.
    let exit = Exit::Trap {
        vector: 14,
        errcode: 4,
        cr2,
    };
    assert_eq!(
        (t.exit(exit), t.prepare()),
        (Action::Resume, Action::Resume)
    );
    assert_eq!(t.v.regs.eip, 0x7000);
    assert_eq!(t.m.read_u32(pte).unwrap(), (8 << 12) | 0x63);
}

/// Linux's context switch through the async ring: `NEW_PGTABLE`, then the
/// next task's `SET_STACK`. The switch leaves the pinning to the
/// `SET_STACK` (the old stack is not filled into the new shadow), and the
/// guest ends exactly as with the two calls made one by one: alive, on the
/// same shadow, the new stack pinned in it.
#[test]
fn ring_context_switch_pins_only_the_new_stack() {
    const PGD2: u32 = 0x2_2000;
    let old_stack = KBASE + 0x6000;
    let new_stack = KBASE + 0x9000;
    let setup = || {
        let mut t = paging_guest();
        t.m.write_u32(PGD2 + (KBASE >> 22) * 4, PTES | 0x63)
            .unwrap();
        assert_eq!(
            t.hcall(LHCALL_SET_STACK, 0x69, old_stack, 1),
            Action::Resume
        );
        assert_eq!(t.prepare(), Action::Resume);
        t
    };
    // Through the ring.
    let mut a = setup();
    a.queue(0, [LHCALL_NEW_PGTABLE, PGD2, 0, 0, 0]);
    a.queue(1, [LHCALL_SET_STACK, 0x69, new_stack, 1, 0]);
    assert_eq!(a.hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0), Action::Resume);
    // One by one.
    let mut b = setup();
    assert_eq!(b.hcall(LHCALL_NEW_PGTABLE, PGD2, 0, 0), Action::Resume);
    assert_eq!(
        b.hcall(LHCALL_SET_STACK, 0x69, new_stack, 1),
        Action::Resume
    );
    assert!(!a.v.is_dead() && !b.v.is_dead());
    assert_eq!(a.v.shadow_root(), b.v.shadow_root());
    let writable = |t: &T, va: u32| {
        t.v.shadow()
            .and_then(|s| s.shadow_writable_gpa(t.e.tables.as_ref()?, va))
    };
    for t in [&a, &b] {
        assert_eq!(
            writable(t, new_stack - 4),
            Some(0x9000 - 4),
            "new stack pinned"
        );
    }
    assert_eq!(
        writable(&a, old_stack - 4),
        None,
        "old stack not pinned again"
    );
    assert_eq!(writable(&b, old_stack - 4), Some(0x6000 - 4));
}

/// The `SET_STACK` stack segment found valid at `SET_STACK` stays valid for
/// the stubs only while the GDT is unchanged: a descriptor replaced since
/// then is checked again, and a stack segment that is no longer one leaves
/// user-mode traps to the full path.
#[test]
fn the_stubs_check_the_stack_segment_again_after_a_gdt_change() {
    let mut t = T::init();
    t.user_segments();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 1), Action::Resume);
    t.prepare();
    assert_eq!(t.v.stub_view(MEM).unwrap().ss1, 0x69);
    // Slot 13 (selector 0x69) emptied.
    assert_eq!(t.hcall(LHCALL_LOAD_GDT_ENTRY, 13, 0, 0), Action::Resume);
    assert_eq!(t.v.stub_view(MEM).unwrap().ss1, 0);
}

/// New TLS entries keep every selector set checked just before valid if
/// the TLS entries it names kept what a selector check reads (and `ss1`
/// with them): a set that names none, or the user's TLS in GS at another
/// base; a set whose TLS entry changed kind is checked again.
#[test]
fn new_tls_entries_keep_sets_that_name_none_checked() {
    let mut t = T::init();
    // A flat data segment at `base`, DPL `dpl`.
    let data = |base: u32, dpl: u64| {
        0x00CF_9200_0000_FFFF_u64
            | dpl << 45
            | u64::from(base & 0xFFFF) << 16
            | u64::from(base >> 16 & 0xFF) << 32
            | u64::from(base >> 24) << 56
    };
    let new_tls = |t: &mut T, entry: u64| {
        t.m.write(0x7900, &entry.to_le_bytes()).unwrap();
        let generation = t.v.gdt.generation();
        assert_eq!(t.hcall(LHCALL_LOAD_TLS, 0x7900, 0, 0), Action::Resume);
        assert_ne!(t.v.gdt.generation(), generation);
        t.v.gdt.generation()
    };
    new_tls(&mut t, data(0x1000, 3));
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, 0x9000, 1), Action::Resume);
    // A set without TLS, checked: still valid after new TLS entries (no
    // entry check in between), and so is the SET_STACK segment.
    assert_eq!(t.prepare(), Action::Resume);
    let plain = t.v.regs;
    let view = t.v.stub_view(MEM).unwrap();
    let generation = new_tls(&mut t, data(0x2000, 1));
    assert!(t.v.is_validated(&SelKey::of(generation, &plain)));
    assert_eq!(t.v.ss1_checked, Some(generation));
    assert_eq!(t.v.stub_view(MEM), Some(view));
    // The user's TLS in GS, checked: still valid with the entry at another
    // base, checked again once the entry is another kind of segment.
    new_tls(&mut t, data(0x2000, 3));
    t.v.regs.gs = 0x33;
    assert_eq!(t.prepare(), Action::Resume);
    let user_gs = t.v.regs;
    let generation = new_tls(&mut t, data(0x3000, 3));
    assert!(t.v.is_validated(&SelKey::of(generation, &user_gs)));
    let generation = new_tls(&mut t, data(0x3000, 1));
    assert!(!t.v.is_validated(&SelKey::of(generation, &user_gs)));
}

/// A `SET_STACK` of the segment the last one checked is checked again when
/// the GDT changed since (here: the segment became 16-bit), and another
/// segment always is.
#[test]
fn set_stack_checks_again_after_a_gdt_change() {
    const DATA32_DPL1: u64 = 0x00CF_B200_0000_FFFF;
    let mut t = T::init();
    let load = |t: &mut T, d: u64| t.hcall(LHCALL_LOAD_GDT_ENTRY, 20, d as u32, (d >> 32) as u32);
    assert_eq!(load(&mut t, DATA32_DPL1), Action::Resume);
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0xa1, KSTACK, 1), Action::Resume);
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0xa1, KSTACK, 1), Action::Resume);
    assert_eq!(load(&mut t, DATA16_DPL1), Action::Resume);
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0xa1, KSTACK, 1), Action::Dead);
    assert_eq!(t.dead(), "bad stack segment 161");

    let mut t = T::init();
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x69, KSTACK, 1), Action::Resume);
    assert_eq!(t.hcall(LHCALL_SET_STACK, 0x68, KSTACK, 1), Action::Dead);
    assert_eq!(t.dead(), "bad stack segment 104");
}

/// The lane's fast `SET_PTE`, called on its own as the host's lane calls
/// it, declines while the vCPU has other business (an irq pending), and
/// takes the same call once it has none.
#[test]
fn stub_set_pte_declines_with_an_irq_pending() {
    let mut t = paging_guest();
    t.exit(Exit::Trap {
        vector: 14,
        errcode: 2,
        cr2: 0x5000,
    });
    assert_eq!(t.prepare(), Action::Resume);
    let _ = t.v.take_mmu_work();
    let args = [PGD, 0x5000, 0x6000 | 0x63, 0];
    t.v.set_irq(3);
    let before = t.e.tables.clone();
    assert!(!t.v.stub_set_pte(args, &mut t.e));
    assert_eq!(t.e.tables, before, "declined but changed");
    let mut t2 = paging_guest();
    t2.exit(Exit::Trap {
        vector: 14,
        errcode: 2,
        cr2: 0x5000,
    });
    assert_eq!(t2.prepare(), Action::Resume);
    let _ = t2.v.take_mmu_work();
    assert!(t2.v.stub_set_pte(args, &mut t2.e));
    assert_ne!(t2.e.tables, before, "the leaf changed");
}

/// Where the stubs' user-mode frame lies after a `SET_STACK`: the short
/// path from the pinned stack's top leaf gives what the general path's
/// translation gives, for stacks whose frame fits in the top page or not,
/// with a stack segment based at 0 or elsewhere.
#[test]
fn the_pinned_user_frame_is_the_translated_one() {
    const DATA32_BASED: u64 = 0x00CF_B200_1000_FFFF; // base 0x1000, DPL 1
    const DATA32_FLAT: u64 = 0x00CF_B200_0000_FFFF; // base 0, DPL 1
    let mut short = 0;
    // Flat, based, and a TLS entry that is flat when `SET_STACK` checks it
    // and moves afterwards (a `LOAD_TLS` of the same kind of segment at
    // another base: the check is carried over, the base is not).
    for kind in ["flat", "based", "moved"] {
        for off in [0x9000u32, 0x9010, 0x9014, 0x9ffc, 0x8800] {
            let mut t = paging_guest();
            let tls = |t: &mut T, d: u64| {
                t.m.write(0x7900, &d.to_le_bytes()).unwrap();
                assert_eq!(t.hcall(LHCALL_LOAD_TLS, 0x7900, 0, 0), Action::Resume);
            };
            let ss = match kind {
                "based" => {
                    let d = DATA32_BASED;
                    t.hcall(LHCALL_LOAD_GDT_ENTRY, 20, d as u32, (d >> 32) as u32);
                    0xa1
                }
                "moved" => {
                    tls(&mut t, DATA32_FLAT);
                    0x31
                }
                _ => 0x69,
            };
            assert_eq!(
                t.hcall(LHCALL_SET_STACK, ss, KBASE + off, 2),
                Action::Resume
            );
            if kind == "moved" {
                tls(&mut t, DATA32_BASED);
            }
            assert_eq!(t.prepare(), Action::Resume);
            let b = t.e.tables();
            let general = {
                let sh = t.v.shadow().unwrap();
                let tr = |va: u32| sh.quiet_write_gpa(b, &t.m, va);
                t.v.user_frame_with(MEM, Some(&tr))
            };
            if t.v.pinned_user_frame(MEM).is_some() {
                short += 1;
            }
            assert_eq!(
                t.v.user_frame_in(&t.m, &mut t.e),
                general,
                "stack {ss:#x}:{off:#x}"
            );
        }
    }
    assert!(short >= 3, "the short path answered {short} times");
}

/// The hypercall stub's `FLUSH_ASYNC` lane decides on the data selectors
/// the stub read from the CPU, not on what `regs` held from an earlier
/// exit: new TLS entries while GS selects one of them are the full path's
/// (which goes back to the run loop to load the GDT); with GS null the
/// lane takes them.
#[test]
fn stub_flush_decides_on_the_selectors_it_is_given() {
    for (gs, taken) in [(0x33u32, false), (0, true)] {
        let mut t = paging_guest();
        assert_eq!(
            t.hcall(LHCALL_SET_STACK, 0x69, KBASE + 0x9000, 1),
            Action::Resume
        );
        // A flat user data segment, loaded; then another base queued.
        t.m.write(0x7900, &0x00CF_F200_0000_FFFF_u64.to_le_bytes())
            .unwrap();
        assert_eq!(t.hcall(LHCALL_LOAD_TLS, 0x7900, 0, 0), Action::Resume);
        assert_eq!(t.prepare(), Action::Resume);
        let _ = t.v.take_mmu_work();
        t.m.write(0x7a00, &0x10CF_F200_0000_FFFF_u64.to_le_bytes())
            .unwrap();
        let slot = t.v.ring_cursor as u32;
        t.queue(slot, [LHCALL_LOAD_TLS, 0x7a00, 0, 0, 0]);
        // `regs` says the opposite of what the CPU holds.
        t.v.regs.gs = 0x33 - gs;
        let sels = [t.v.regs.ds, t.v.regs.es, t.v.regs.fs, gs];
        assert_eq!(
            t.v.stub_flush(sels, &mut t.m, &mut t.e),
            taken,
            "gs {gs:#x}"
        );
        assert_eq!(t.v.regs.gs, gs);
    }
}

/// Random context switches queued in the async ring (`NEW_PGTABLE`, then a
/// `SET_STACK`, then now and then a `LOAD_TLS` or something else), good
/// and bad, after random histories of which shadow holds which stack: a
/// `FLUSH_ASYNC` through the full path and through the trap stack's lane
/// ends exactly where the drain's loop alone ends (registers, guest memory,
/// shadow tables, MMU work, counters, GDT, stack, ring), whether or not the
/// drain's context-switch start took the entries.
#[test]
fn drain_switch_is_the_loop() {
    let mut rng = crate::testutil::Rng(0x0d5a_17c4_u64 << 16 | 0x5eed);
    let mut took = [0u32; 4];
    let (mut done, mut framed, mut partial) = (0u32, 0u32, 0u32);
    const PGD2: u32 = 0x2_2000;
    const STACKS: [u32; 2] = [KBASE + 0x9000, KBASE + 0xB000];
    for case in 0..3000 {
        let mut r = |n: u64| rng.next_u64() % n;
        let mut t = paging_guest();
        t.m.write_u32(PGD2 + (KBASE >> 22) * 4, PTES | 0x63)
            .unwrap();
        t.m.write(0x7900, &0x00CF_F200_0000_FFFF_u64.to_le_bytes())
            .unwrap();
        t.m.write(0x7800, &0x00CF_F300_0000_FFFF_u64.to_le_bytes())
            .unwrap();
        // A history: each address space run with some stack (pinned in
        // its shadow), TLS entries loaded.
        let mut ran = [(PGD, 0, 0), (PGD2, 0, 0)];
        for _ in 0..1 + r(4) {
            let i = r(2) as usize;
            let (esp, pages) = (STACKS[r(2) as usize], 1 + r(2) as u32);
            let _ = t.hcall(LHCALL_NEW_PGTABLE, ran[i].0, 0, 0);
            let _ = t.hcall(LHCALL_SET_STACK, 0x69, esp, pages);
            ran[i] = (ran[i].0, esp, pages);
        }
        if r(3) != 0 {
            let _ = t.hcall(LHCALL_LOAD_TLS, 0x7900, 0, 0);
        }
        // Now and then something that unpins or dirties: a stack page's
        // entry rewritten, a user page changed (an invalidation owed), a
        // GDT entry loaded (a new generation).
        match r(6) {
            0 => {
                // (Moved elsewhere, or mapped where it was.)
                let page = (STACKS[r(2) as usize] - KBASE) / 4096 - 1;
                let to = page + [0, 0x20][r(2) as usize];
                let _ = t.hcall(LHCALL_SET_PTE, PGD, KBASE + page * 4096, (to << 12) | 0x63);
            }
            1 => {
                let _ = t.hcall(LHCALL_SET_PTE, PGD, 0x5000, (5 << 12) | 0x67);
            }
            2 => {
                let d = 0x00CF_F200_0000_FFFF_u64;
                let _ = t.hcall(LHCALL_LOAD_GDT_ENTRY, 16, d as u32, (d >> 32) as u32);
            }
            _ => {}
        }
        if t.prepare() != Action::Resume {
            continue;
        }
        // Now and then the MMU work still owed (an invalidation the shadow
        // core keeps pending).
        if r(3) != 0 {
            let _ = t.v.take_mmu_work();
        }
        // The ring anywhere, across its end too.
        let first = [t.v.ring_cursor as u32, 62, 63, 0][r(4) as usize];
        t.v.ring_cursor = first as usize;
        // Mostly a switch back to an address space that ran with the
        // stack it gets again.
        let back = ran[r(2) as usize];
        let mut entries = vec![
            [
                LHCALL_NEW_PGTABLE,
                [PGD, PGD2, PGD2, PGD + 1, 0x3000][r(5) as usize],
                0,
                0,
                0,
            ],
            [
                [
                    LHCALL_SET_STACK,
                    LHCALL_SET_STACK,
                    LHCALL_SET_STACK,
                    LHCALL_TS,
                ][r(4) as usize],
                [0x69, 0x69, 0x69, 0x61, 0x6b][r(5) as usize],
                [STACKS[0], STACKS[1], STACKS[1], 0, 0x800, KBASE + 0x9004][r(6) as usize],
                [1, 1, 2, 0, 3, 0x1001][r(6) as usize],
                0,
            ],
        ];
        if r(3) != 0 && back.1 != 0 {
            entries[0][1] = back.0;
            entries[1] = [LHCALL_SET_STACK, 0x69, back.1, back.2, 0];
        }
        match r(5) {
            0..=2 => entries.push([
                LHCALL_LOAD_TLS,
                [0x7900, 0x7900, 0x7800, MEM - 8][r(4) as usize],
                0,
                0,
                0,
            ]),
            3 => entries.push([LHCALL_SET_PTE, PGD2, 0x5000, (6 << 12) | 0x67, 0]),
            _ => {}
        }
        if r(3) == 0 {
            entries.push([LHCALL_FLUSH_TLB, 0, 0, 0, 0]);
        }
        for (k, e) in entries.iter().enumerate() {
            t.queue((first + k as u32) % 64, *e);
        }
        t.v.regs.eax = LHCALL_FLUSH_ASYNC;
        // The flags as the guest left them (TF, NT, IOPL bits: sanitised
        // on the way back in); now and then an irq raised meanwhile, or a
        // data selector the GDT no longer allows.
        t.v.regs.eflags = [0x202, 0x246, 0x4302, 0x3302 | 0x100][r(4) as usize];
        if r(8) == 0 {
            t.v.set_irq(0);
        }
        // (The guest loaded DS since it was entered: the exit finds it in
        // the CPU, the flush lane gets it from the stub.)
        let cpu_ds = if r(8) == 0 {
            [0x80 | 1, 0xa1, 0x63][r(3) as usize]
        } else {
            t.v.regs.ds
        };
        let hcall = Exit::Trap {
            vector: 0x1f,
            errcode: 0,
            cr2: 0,
        };
        let fork = |t: &T, off: bool| {
            let mut f = T {
                v: t.v.clone(),
                m: t.m.clone(),
                e: t.e.clone(),
            };
            f.v.drain_switch_off = off;
            f.v.regs.ds = cpu_ds;
            f
        };
        // The full path and the lane, each with and without the start.
        let (mut a, mut b, mut c, mut d) = (
            fork(&t, false),
            fork(&t, true),
            fork(&t, false),
            fork(&t, true),
        );
        let full = (a.exit(hcall), a.prepare());
        assert_eq!(full, (b.exit(hcall), b.prepare()), "case {case}: actions");
        let lane = c.v.fast_paging(0x1f, 0, 0, &mut c.m, &mut c.e);
        assert_eq!(
            lane,
            d.v.fast_paging(0x1f, 0, 0, &mut d.m, &mut d.e),
            "case {case}: lane"
        );
        // The flush lane in one step, else `stub_flush` on from there.
        let mut e = fork(&t, false);
        e.v.regs.ds = t.v.regs.ds;
        let sels = [cpu_ds, t.v.regs.es, t.v.regs.fs, t.v.regs.gs];
        let flushed = match e.v.stub_flush_switch(sels, &mut e.m) {
            FlushSwitch::Done { switch, frame, pin } => {
                assert_eq!(Some(pin), e.v.pin_key(), "case {case}: pin");
                // (Handed over, not left in the MMU work.)
                assert_eq!(e.v.take_mmu_work().load, None, "case {case}");
                e.v.mmu_load = Some(switch);
                done += 1;
                let found = e.v.user_frame_in(&e.m, &mut e.e);
                assert!(frame.is_none() || frame == found, "case {case}: frame");
                framed += u32::from(frame.is_some());
                true
            }
            FlushSwitch::Partial => {
                partial += 1;
                e.v.stub_flush(sels, &mut e.m, &mut e.e)
            }
            FlushSwitch::Declined => e.v.stub_flush(sels, &mut e.m, &mut e.e),
        };
        assert_eq!(flushed, lane, "case {case}: one step");
        let mut d2 = T {
            v: d.v.clone(),
            m: d.m.clone(),
            e: d.e.clone(),
        };
        took[a.v.drain_switched as usize] += 1;
        if lane {
            assert_eq!(a.v.drain_switched, c.v.drain_switched, "case {case}");
        }
        for (x, y, what) in [
            (&mut a, &mut b, "full"),
            (&mut c, &mut d, "lane"),
            (&mut e, &mut d2, "one step"),
        ] {
            assert_eq!(y.v.drain_switched, 0);
            assert_same_state(x, y, &format!("case {case} {what}"));
        }
    }
    // Taken with and without the LOAD_TLS, and left to the loop.
    assert!(
        took[0] > 1000 && took[2] > 150 && took[3] > 150 && took[1] == 0,
        "left, two, three: {took:?}"
    );
    // The flush lane in one step: done (with the frame found), and partly.
    assert!(
        done > 150 && framed > 100 && partial > 50,
        "done {done}, with a frame {framed}, partly {partial}"
    );
}

/// A `NEW_PGTABLE` in the ring leaves the pinning of the stack to a
/// `SET_STACK` only when one is queued right after it: a slot emptied
/// earlier that still holds a `SET_STACK`'s words does not count, and the
/// new shadow gets the current stack pinned at once.
#[test]
fn a_stale_set_stack_does_not_defer_the_pinning() {
    const PGD2: u32 = 0x2_2000;
    for queued in [false, true] {
        let mut t = paging_guest();
        t.m.write_u32(PGD2 + (KBASE >> 22) * 4, PTES | 0x63)
            .unwrap();
        assert_eq!(
            t.hcall(LHCALL_SET_STACK, 0x69, KBASE + 0x9000, 1),
            Action::Resume
        );
        assert_eq!(t.prepare(), Action::Resume);
        let _ = t.v.take_mmu_work();
        let slot = t.v.ring_cursor as u32;
        t.queue(slot, [LHCALL_NEW_PGTABLE, PGD2, 0, 0, 0]);
        t.queue(
            (slot + 1) % 64,
            [LHCALL_SET_STACK, 0x69, KBASE + 0xB000, 1, 0],
        );
        if !queued {
            t.m.write_u8(LD + LguestData::off_hcall_status((slot + 1) % 64), 0xFF)
                .unwrap();
        }
        t.v.regs.eax = LHCALL_FLUSH_ASYNC;
        assert_eq!(t.trap(0x1f, 0), Action::Resume);
        assert_eq!(t.prepare(), Action::Resume);
        let top = if queued { 0xA000 } else { 0x8000 };
        assert_eq!(
            t.v.shadow().and_then(|s| s.pinned_top_gpa(KBASE + top)),
            Some(top),
            "queued {queued}: the stack below {:#x} pinned in the new shadow",
            KBASE + top + 0x1000
        );
    }
}
