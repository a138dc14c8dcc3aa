//! The native floors for the benchmarks, measured by the hypervisor itself in
//! the same boot: `int n` from a compatibility-mode probe to a 64-bit ring-0
//! stub that does nothing but `iretq`, from CPL 1 (`native_int_roundtrip`,
//! what a hypercall or a trap from the guest kernel pays) and from CPL 3
//! (`native_syscall`, what a system call from guest user mode pays); see
//! docs/benchmarks.md. Also the paging floors ([`report_paging_floors`]):
//! `native_page_fault` (a write to a not-present page, filled by a minimal
//! ring-0 #PF handler) and `native_cr3_write`, measured at ring 0 in host
//! context in an address space of the probe's own. Also the one place the
//! hypervisor prints `bench:` lines ([`report`], [`report_stage`]).
//!
//! The probe is a few 32-bit instructions run exactly like a guest (its own
//! linear-mode address space, entered through the world switch) with either
//! the kernel's selectors (CS 0x61 / SS 0x69, CPL 1) or flat user ones
//! (CS 0x73 / SS 0x7b in GDT slots 14/15, DPL 3, as a guest kernel sets them
//! up for its user mode), so the figure is the hardware cost of the same
//! privilege and mode change a guest's `int` pays, without any hypervisor
//! work. It times `N` round trips with `rdtsc`, then an empty loop of the
//! same shape, and leaves both counts in registers before exiting with
//! `int $0x80` (the syscall gate, DPL 3 since [`super::init_cpu`], so the
//! same exit works from both levels). The probe has no vCPU: a fast path that
//! serves `int $0x80` (or `int $0x81`) without returning from
//! `switch::run` must leave the probe's traps to the normal exit.

use core::arch::{global_asm, naked_asm};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use guest_abi::irq::SYSCALL_VECTOR;
use guest_abi::seg::SegmentDescriptor;
use guest_abi::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use rustyvisor::bench::BenchLine;
use rustyvisor::lguest::guestmem::GuestMemory;
use rustyvisor::lguest::segments::GuestGdt;
use rustyvisor::lguest::vcpu::{ENTRY_FAULT_TRAPNUM, Regs, StubGate};
use rustyvisor::mm::PAGE_SIZE;
use rustyvisor::mm::frame::PhysFrame;
use rustyvisor::mm::paging::PageFlags;

use super::space::{GuestRam, HostGuestMemory, Ledger, LinearTables};
use super::switch;
use crate::kernel::arch::{cpu, gdt, idt};
use crate::kernel::mem::{self, phys_to_virt};
use crate::kprintln;

/// Whether bench mode is on (`bench` on the command line): only then do
/// [`report`] and [`report_stage`] print.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns bench mode on: from now on [`report`] and [`report_stage`] print.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether bench mode is on; code that measures something only for the
/// benchmarks (e.g. the stages of a path) can skip the work otherwise.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Prints `bench: name=<metric> value=<value> unit=insn floor=<floor or ->`
/// if bench mode is on. `value` is in instructions (TSC ticks under
/// `-icount shift=0`), printed with at most two decimals.
pub fn report(metric: &str, value: f64, floor: Option<&str>) {
    if enabled() {
        kprintln!("{}", BenchLine::metric(metric, value, floor));
    }
}

/// Prints one stage of `metric`'s breakdown,
/// `bench: name=<metric>.<stage> value=<value> unit=insn floor=-`, if bench
/// mode is on. `cargo xtask bench` shows it under `metric` (which the guest
/// or the hypervisor reports on its own line) and keeps it in
/// `results.json`; every stage of a metric must be reported once, in the
/// unit of the metric (instructions). Call it from host context (it takes
/// the console lock), e.g. when a guest exits, not from the trap path.
pub fn report_stage(metric: &str, stage: &str, value: f64) {
    if enabled() {
        kprintln!("{}", BenchLine::stage(metric, stage, value));
    }
}

/// The privilege level a probe runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeLevel {
    /// CPL 1, the guest kernel's level (`native_int_roundtrip`).
    Kernel,
    /// CPL 3, guest user mode (`native_syscall`).
    User,
}

/// Vector the probe raises; its gate points at [`iretq_only`].
const PROBE_VECTOR: u8 = 0x81;
/// Guest-physical address the probe code is copied to.
const PROBE_GPA: u32 = 0x1000;

// The probe, assembled as 32-bit code into read-only data and copied into the
// probe's memory. In: esi = iterations. Out: ebx = TSC ticks for the `int`
// loop, edx = ticks for the same loop without the `int`. Only the low 32 bits
// of the TSC are used: one run is far shorter than 2^32 ticks. The code uses
// no memory operand and no stack beyond the `int` frames, so it runs
// unchanged at CPL 1 or 3 (rdtsc is allowed at CPL 3: CR4.TSD is clear).
// It exits with `int 0x80`, whose gate has DPL 3, so that the exit is legal
// from both levels (`int 0x1f`, the hypercall gate, is DPL 1 and would #GP
// from CPL 3).
//
// Each probe: `$setup` once, `rdtsc`, `esi` iterations of `$op`, `rdtsc`;
// then the same without `$op`; results in ebx/edx; exit with `int 0x80`.
// Assembled into section `$section`, between the symbols `$start`/`$end`.
macro_rules! probe_code {
    ($section:literal, $start:literal, $end:literal, $setup:literal, $op:literal) => {
        global_asm!(
            concat!(".pushsection ", $section, ", \"a\""),
            ".code32",
            concat!(".globl ", $start),
            concat!($start, ":"),
            "rdtsc",
            "mov edi, eax",
            "mov ecx, esi",
            $setup,
            "2:",
            $op,
            "dec ecx",
            "jnz 2b",
            "rdtsc",
            "sub eax, edi",
            "mov ebx, eax",
            "rdtsc",
            "mov edi, eax",
            "mov ecx, esi",
            $setup,
            "3:",
            "dec ecx",
            "jnz 3b",
            "rdtsc",
            "sub eax, edi",
            "mov edx, eax",
            "int 0x80",
            "4:",
            "jmp 4b",
            concat!(".globl ", $end),
            concat!($end, ":"),
            ".code64",
            ".popsection",
        );
    };
}

probe_code!(
    ".rodata.rv_probe",
    "rv_probe_start",
    "rv_probe_end",
    "nop",
    "int 0x81"
);

// The same probe with the hypercall stub in the loop: `int 0x1f` with
// eax = LHCALL_FLUSH_ASYNC (0), which the stub preserves. Used for the
// breakdown of `hypercall_roundtrip`.
probe_code!(
    ".rodata.rv_probe_hcall",
    "rv_probe_hcall_start",
    "rv_probe_hcall_end",
    "xor eax, eax",
    "int 0x1f"
);

unsafe extern "C" {
    static rv_probe_start: u8;
    static rv_probe_end: u8;
    static rv_probe_hcall_start: u8;
    static rv_probe_hcall_end: u8;
}

/// Which probe code to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeCode {
    /// `int 0x81` to [`iretq_only`].
    Native,
    /// `int 0x1f` to the hypercall stub.
    Hcall,
}

/// An `lguest_data.hcall_status` byte that always says "empty", and a
/// pending-irq word that is always 0: what the stub reads when it is armed
/// for the probe.
static PROBE_RING_EMPTY: AtomicU8 = AtomicU8::new(guest_abi::hcall::HCALL_STATUS_EMPTY);
static PROBE_NO_IRQS: AtomicU32 = AtomicU32::new(0);

/// Where the reflection stub, armed by `selftest=entryfault`, pushes its
/// frame (standing in for guest memory), and the `irq_enabled` it reads.
static REFLECT_FRAME: [AtomicU32; 8] = [const { AtomicU32::new(0) }; 8];
const REFLECT_FRAME_BYTES: u32 = 8 * 4;
static REFLECT_IE: AtomicU32 = AtomicU32::new(guest_abi::irq::X86_EFLAGS_IF);

/// The stub armed for the probe (kernel level, selectors 0x61/0x69), with
/// SS `ss` as the one it accepts.
fn probe_stub_arm(ss: u32) -> switch::StubArm {
    switch::StubArm {
        trivial: 1 << guest_abi::hcall::LHCALL_FLUSH_ASYNC,
        ring_status: PROBE_RING_EMPTY.as_ptr() as u64,
        irqs: &raw const PROBE_NO_IRQS,
        vcpu_irqs: 0,
        cs: u32::from(KERNEL_CS),
        ss,
        drain: None,
        switch: false,
        reflect: None,
    }
}

/// The ring-0 side of the probe: nothing but the return.
#[unsafe(naked)]
unsafe extern "C" fn iretq_only() {
    naked_asm!("iretq")
}

/// Measures the native `int`/`iretq` round trip from compatibility-mode CPL 1
/// (`native_int_roundtrip`).
/// Returns TSC ticks per round trip (instructions under `-icount shift=0`),
/// or why it could not run.
pub fn native_int_roundtrip(iterations: u32) -> Result<f64, &'static str> {
    native_roundtrip(ProbeLevel::Kernel, iterations)
}

/// Measures the native `int`/`iretq` round trip from compatibility-mode CPL 3
/// through a DPL-3 gate (`native_syscall`: the floor of a guest system call).
pub fn native_syscall(iterations: u32) -> Result<f64, &'static str> {
    native_roundtrip(ProbeLevel::User, iterations)
}

/// The probe's machine: its memory, tables and registers, entered like a
/// guest. Dropping it restores the address space and the probe gate.
struct Probe {
    regs: Regs,
    old_cr3: u64,
    tables: LinearTables,
    ram: GuestRam,
}

impl Probe {
    /// Loads the probe code, its GDT and gate, and switches to its tables.
    fn new(level: ProbeLevel, iterations: u32, which: ProbeCode) -> Result<Self, &'static str> {
        let ledger = Ledger::default();
        let ram = GuestRam::new(2 << 20, &ledger).map_err(|_| "no memory for the probe")?;
        let tables = LinearTables::new(ram.base(), ram.bytes(), &ledger)
            .map_err(|_| "no memory for the probe tables")?;
        // SAFETY: `ram` is mapped and lives as long as the probe.
        let mut mem = unsafe { HostGuestMemory::new(ram.base(), 2 << 20) };
        let (start, end) = match which {
            ProbeCode::Native => (&raw const rv_probe_start, &raw const rv_probe_end),
            ProbeCode::Hcall => (
                &raw const rv_probe_hcall_start,
                &raw const rv_probe_hcall_end,
            ),
        };
        let (start, end) = (start as u64, end as u64);
        // SAFETY: the two symbols delimit the probe's bytes in .rodata.
        let code =
            unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
        mem.write(PROBE_GPA, code)
            .map_err(|_| "probe code does not fit")?;

        let mut guest_gdt = GuestGdt::new();
        let (cs, ds, cpl) = match level {
            ProbeLevel::Kernel => (KERNEL_CS, KERNEL_DS, 1),
            ProbeLevel::User => {
                // Flat user code/data in slots 14/15, DPL 3, as a guest kernel
                // loads them for its user mode; the whole probe memory is
                // mapped user-accessible (the linear tables use U/S pages
                // throughout).
                for (slot, desc) in [
                    (14, SegmentDescriptor::flat_code(3)),
                    (15, SegmentDescriptor::flat_data(3)),
                ] {
                    guest_gdt
                        .load_entry(slot, desc.low(), desc.high())
                        .map_err(|_| "probe user segments rejected")?;
                }
                (USER_CS, USER_DS, 3)
            }
        };
        let regs = Regs {
            eip: PROBE_GPA,
            cs: u32::from(cs),
            ss: u32::from(ds),
            ds: u32::from(ds),
            es: u32::from(ds),
            esp: (2 << 20) - 16,
            esi: iterations.max(1),
            eflags: 0x202,
            ..Regs::default()
        };
        gdt::load_guest_entries(guest_gdt.entries());
        // The gate's DPL must allow `int` from the probe's CPL (CPL <= DPL).
        idt::set_gate_handler(PROBE_VECTOR, iretq_only as *const () as u64, cpl);
        let old_cr3 = cpu::cr3();
        // SAFETY: the probe tables share the kernel's upper half.
        unsafe { cpu::write_cr3(tables.cr3()) };
        Ok(Self {
            regs,
            old_cr3,
            tables,
            ram,
        })
    }

    /// Enters the probe at its start until an exit `fast` does not finish.
    fn run(&mut self, fast: Option<switch::Handlers>) -> switch::ExitInfo {
        self.regs.eip = PROBE_GPA;
        // SAFETY: `regs` lives in `self` until `run` returns, and nothing
        // else touches it meanwhile.
        unsafe { switch::run(&raw mut self.regs, fast) }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: back to the address space we came from (upper half
        // identical); the probe's tables and memory are freed after this.
        unsafe { cpu::write_cr3(self.old_cr3) };
        idt::set_gate_dpl(PROBE_VECTOR, 0);
        // The tables and the memory are dropped after this, in that order.
        let _ = (&self.tables, &self.ram);
    }
}

/// The hypercall stub answering a trivial call from a CPL-1 probe: TSC ticks
/// per `int 0x1f` round trip (the hardware's `int` and `iretq` plus every
/// instruction of the stub), for the breakdown of `hypercall_roundtrip`.
pub fn hcall_stub_roundtrip(iterations: u32) -> Result<f64, &'static str> {
    native_roundtrip_of(ProbeLevel::Kernel, iterations, ProbeCode::Hcall)
}

/// Runs the probe at `level`: TSC ticks per `int`/`iretq` round trip.
fn native_roundtrip(level: ProbeLevel, iterations: u32) -> Result<f64, &'static str> {
    native_roundtrip_of(level, iterations, ProbeCode::Native)
}

/// Runs probe code `which` at `level`: TSC ticks per loop iteration beyond
/// the empty loop.
fn native_roundtrip_of(
    level: ProbeLevel,
    iterations: u32,
    which: ProbeCode,
) -> Result<f64, &'static str> {
    let iterations = iterations.max(1);
    let mut probe = Probe::new(level, iterations, which)?;
    // Host interrupts (the timer) may interrupt the probe; retry the run then.
    for _ in 0..8 {
        if which == ProbeCode::Hcall {
            switch::arm_stubs(Some(probe_stub_arm(u32::from(KERNEL_DS))));
        }
        // No fast handler: every exit comes back here.
        let exit = probe.run(None);
        match exit.trapnum {
            t if t == SYSCALL_VECTOR => {
                let r = &probe.regs;
                return Ok(f64::from(r.ebx.saturating_sub(r.edx)) / f64::from(iterations));
            }
            t if t >= 32 => continue,
            _ => return Err("probe faulted"),
        }
    }
    Err("probe interrupted too often")
}

/// `selftest=entryfault`: a return into a guest that the CPU refuses faults
/// at CPL 0, and that fault must be the guest's ("unhandled trap 256"), not
/// the hypervisor's, on every path that returns into a guest. The probe is
/// run twice with an exit handler that makes the return impossible (an SS
/// whose RPL is not the CS's, which `iretq` refuses with #GP):
///
/// 1. the handler asks for a return through the dispatcher's guest-return
///    sequence (an exit handled where it landed);
/// 2. the handler goes into the hypercall stub as a trapped `int 0x1f`
///    would, with the stub armed to answer it and the frame's SS null, so the
///    stub's own `iretq` is refused;
/// 3. the handler goes into the `int3` reflection stub as a trapped `int3`
///    from CPL 1 would, with the stub armed to reflect it onto a stack whose
///    (armed, "validated") SS is the bad one, so the reflection's `iretq`
///    into the guest's handler is refused.
///
/// Each must come back from the world switch as trap 256 with the fault's
/// vector (13); a hypervisor without the window dies with an exception.
pub fn entry_fault_selftest() -> Result<[u32; 3], &'static str> {
    /// The probe's data selector with RPL 3 while CS has RPL 1.
    const BAD_SS: u16 = KERNEL_DS | 3;
    fn bad_ss(ctx: *mut (), _exit: &switch::ExitInfo, _full: bool) -> bool {
        // SAFETY: `ctx` is the probe's register block (see below), not
        // otherwise touched while the probe runs.
        unsafe { (*ctx.cast::<Regs>()).ss = u32::from(BAD_SS) };
        true
    }
    fn into_stub(_ctx: *mut (), _exit: &switch::ExitInfo, _full: bool) -> bool {
        switch::arm_stubs(Some(probe_stub_arm(u32::from(BAD_SS))));
        // Build the frame `int 0x1f` from the probe would have pushed (SS,
        // ESP, RFLAGS, CS, EIP), with the bad SS, and enter the stub with
        // eax = FLUSH_ASYNC, as the CPU would. The stub's `iretq` faults; the
        // fault path leaves for the world switch's caller, abandoning this
        // stack (the trap stack), so this never returns.
        // SAFETY: interrupts are off (trap path); the pushes stay on the
        // trap stack; the stub only reads the armed values and the frame.
        unsafe {
            core::arch::asm!(
                "push {ss}",
                "push {esp}",
                "push 0x202",
                "push {cs}",
                "push {eip}",
                "xor eax, eax",
                "jmp {stub}",
                ss = const BAD_SS,
                esp = const (2u32 << 20) - 16,
                cs = const KERNEL_CS,
                eip = const PROBE_GPA,
                stub = sym switch::hcall_stub,
                options(noreturn),
            )
        }
    }
    fn into_reflect(_ctx: *mut (), _exit: &switch::ExitInfo, _full: bool) -> bool {
        let mut arm = probe_stub_arm(u32::from(KERNEL_DS));
        arm.reflect = Some(switch::ReflectArm {
            mem_base: REFLECT_FRAME.as_ptr() as u64,
            limit: REFLECT_FRAME_BYTES,
            irq_enabled: REFLECT_IE.as_ptr() as u64,
            kss: u32::from(BAD_SS),
            kss_base: 0,
            user_frame: 0,
            user_esp: 0,
            ss1: 0,
            gates: [
                StubGate(u64::from(PROBE_GPA) | StubGate::FROM_KERNEL),
                StubGate(0),
            ],
            lane: None,
        });
        switch::arm_stubs(Some(arm));
        // The frame `int3` at CPL 1 would have pushed, on the bad SS with
        // ESP at the top of the armed frame area; then the stub, as the CPU
        // would enter it. It pushes the i386 frame there and `iretq`s into
        // the gate with the bad SS, which faults (see `into_stub`).
        // SAFETY: as in `into_stub`; the stub writes only the armed frame
        // area and reads the armed `irq_enabled` word.
        unsafe {
            core::arch::asm!(
                "push {ss}",
                "push {esp}",
                "push 0x202",
                "push {cs}",
                "push {eip}",
                "jmp {stub}",
                ss = const BAD_SS,
                esp = const REFLECT_FRAME_BYTES,
                cs = const KERNEL_CS,
                eip = const PROBE_GPA,
                stub = sym switch::int3_stub,
                options(noreturn),
            )
        }
    }
    let mut faults = [0u32; 3];
    for (fault, handler) in
        faults
            .iter_mut()
            .zip([bad_ss as switch::FastHandler, into_stub, into_reflect])
    {
        let mut probe = Probe::new(ProbeLevel::Kernel, 1, ProbeCode::Native)?;
        let regs: *mut Regs = &raw mut probe.regs;
        let exit = probe.run(Some(switch::Handlers {
            exit: handler,
            switch: None,
            flush: None,
            ctx: regs.cast(),
        }));
        if exit.trapnum != ENTRY_FAULT_TRAPNUM {
            return Err("a refused return into the guest did not come back as trap 256");
        }
        // The switch reports the fault's vector in the CR2 slot of an
        // entry fault.
        *fault = exit.cr2;
    }
    Ok(faults)
}

// ---- Paging floors -------------------------------------------------------------

/// Vector of the page fault (#PF).
const PF_VECTOR: u8 = 14;
/// Linear address of the first page the native page-fault probe touches:
/// PD entry 1 under PDPT entry 0 of the probe's own PML4 entry 0, so one
/// 4 KiB page table of the probe's covers `[PF_BASE, PF_BASE + 2 MiB)`.
const PF_BASE: u64 = 2 << 20;
/// Most pages one batch may touch (one page table).
const PF_MAX_PAGES: u32 = 512;

/// Direct-map address of the probe's page table, and the leaf
/// [`pf_fill`] writes into it: what the minimal #PF handler needs, read by it
/// without calling into Rust.
static PF_PT: AtomicU64 = AtomicU64::new(0);
static PF_LEAF: AtomicU64 = AtomicU64::new(0);

/// The native page-fault handler measured by [`native_page_fault`]: maps
/// the faulting page (one PTE of the probe's page table, indexed by CR2, to
/// the probe's data frame, present and writable) and returns to the faulting
/// instruction, which then completes. Installed as the #PF gate only while
/// the probe runs, with interrupts off; nothing else can fault meanwhile.
#[unsafe(naked)]
unsafe extern "C" fn pf_fill() {
    naked_asm!(
        "push rax",
        "push rcx",
        "mov rax, cr2",
        "shr rax, 12",
        "and eax, 511",
        "mov rcx, qword ptr [rip + {pt}]",
        "lea rcx, [rcx + rax * 8]",
        "mov rax, qword ptr [rip + {leaf}]",
        "mov qword ptr [rcx], rax",
        "pop rcx",
        "pop rax",
        // The error code.
        "add rsp, 8",
        "iretq",
        pt = sym PF_PT,
        leaf = sym PF_LEAF,
    )
}

/// The paging probes' own address space, in host context: a PML4 whose
/// entries 256–511 are the kernel's (the hypervisor stays mapped: the probes
/// run at ring 0 on the host stack) and whose entry 0 leads through a PDPT
/// and a PD to one 4 KiB page table covering `[PF_BASE, PF_BASE + 2 MiB)`,
/// empty until the #PF handler fills it, plus the one data frame every
/// filled entry maps. Dropping it frees the frames (the host's own tables
/// are only read, never written).
struct PagingProbe {
    pml4: PhysFrame,
    pdpt: PhysFrame,
    pd: PhysFrame,
    pt: PhysFrame,
    data: PhysFrame,
}

impl PagingProbe {
    fn new() -> Result<Self, &'static str> {
        fn zeroed() -> Result<PhysFrame, &'static str> {
            let f = mem::alloc_frame().ok_or("no memory for the paging probe")?;
            // SAFETY: a fresh frame, reached through the direct map.
            unsafe {
                core::ptr::write_bytes(
                    phys_to_virt(f.start_address()) as *mut u8,
                    0,
                    PAGE_SIZE as usize,
                )
            };
            Ok(f)
        }
        // Frames taken so far go back on an error.
        let mut got: [Option<PhysFrame>; 5] = [None; 5];
        for slot in &mut got {
            match zeroed() {
                Ok(f) => *slot = Some(f),
                Err(e) => {
                    got.iter().flatten().for_each(|f| mem::free_frame(*f));
                    return Err(e);
                }
            }
        }
        let [Some(pml4), Some(pdpt), Some(pd), Some(pt), Some(data)] = got else {
            unreachable!("every frame was allocated");
        };
        let kernel = mem::kernel_pml4();
        for slot in 256..512u64 {
            // SAFETY: the kernel PML4 is a live table frame in the direct map.
            let e = unsafe { (phys_to_virt(kernel + slot * 8) as *const u64).read_volatile() };
            pte_write(pml4, slot, e);
        }
        let table = PageFlags::PRESENT | PageFlags::WRITABLE;
        pte_write(pml4, 0, pdpt.start_address() | table.bits());
        pte_write(pdpt, 0, pd.start_address() | table.bits());
        pte_write(pd, PF_BASE >> 21, pt.start_address() | table.bits());
        Ok(Self {
            pml4,
            pdpt,
            pd,
            pt,
            data,
        })
    }

    /// Empties the page table (the fills of the last batch).
    fn clear(&self) {
        for i in 0..u64::from(PF_MAX_PAGES) {
            pte_write(self.pt, i, 0);
        }
    }
}

impl Drop for PagingProbe {
    fn drop(&mut self) {
        for f in [self.pt, self.pd, self.pdpt, self.pml4, self.data] {
            mem::free_frame(f);
        }
    }
}

/// Writes entry `index` (< 512) of the table frame `table`.
fn pte_write(table: PhysFrame, index: u64, value: u64) {
    // SAFETY: a table frame of the paging probe, direct-mapped; index < 512.
    unsafe {
        (phys_to_virt(table.start_address() + (index % 512) * 8) as *mut u64).write_volatile(value)
    }
}

/// Runs `f` in the probe's address space with host interrupts off and
/// [`pf_fill`] as the #PF gate; afterwards the CR3 value and the gate are
/// exactly what they were (saved and put back as they were).
fn in_probe_space<R>(probe: &PagingProbe, f: impl FnOnce(u64) -> R) -> R {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let old_cr3 = cpu::cr3();
        PF_PT.store(phys_to_virt(probe.pt.start_address()), Ordering::Relaxed);
        PF_LEAF.store(
            probe.data.start_address() | (PageFlags::PRESENT | PageFlags::WRITABLE).bits(),
            Ordering::Relaxed,
        );
        let saved = idt::saved_gate(PF_VECTOR);
        idt::set_gate_handler(PF_VECTOR, pf_fill as *const () as u64, 0);
        // SAFETY: the probe's PML4 shares the kernel's upper half, which maps
        // all the code, stack and data the host runs from here on.
        unsafe { cpu::write_cr3(probe.pml4.start_address()) };
        let r = f(old_cr3);
        // SAFETY: back to the address space we came from.
        unsafe { cpu::write_cr3(old_cr3) };
        idt::restore_gate(PF_VECTOR, saved);
        r
    })
}

/// The native page fault (`native_page_fault`), at ring 0 in host context:
/// a loop writing one word to each of `pages` consecutive pages that are not
/// present in the probe's page table; each write faults to [`pf_fill`],
/// which maps the page and `iretq`s, and the write completes. TSC ticks per
/// fault (instructions under `-icount shift=0`: the faulting write, the
/// handler's 13 instructions), the same loop without the write subtracted;
/// the minimum of `batches` batches, each starting from an empty table.
pub fn native_page_fault(pages: u32, batches: u32) -> Result<f64, &'static str> {
    let pages = pages.clamp(1, PF_MAX_PAGES);
    let probe = PagingProbe::new()?;
    let best = in_probe_space(&probe, |_| {
        let (mut faults, mut empty) = (u64::MAX, u64::MAX);
        for _ in 0..batches.max(1) {
            probe.clear();
            // SAFETY: reloading the probe's own PML4 drops the previous
            // batch's translations.
            unsafe { cpu::write_cr3(probe.pml4.start_address()) };
            faults = faults.min(touch_loop::<true>(pages));
            empty = empty.min(touch_loop::<false>(pages));
        }
        faults.saturating_sub(empty)
    });
    Ok(best as f64 / f64::from(pages))
}

/// `pages` iterations writing one word to page `PF_BASE + i * 4096` (with
/// `TOUCH`) or of the same loop without the write; TSC ticks.
fn touch_loop<const TOUCH: bool>(pages: u32) -> u64 {
    let ticks: u64;
    // SAFETY: the probe's address space is loaded and the #PF gate is
    // `pf_fill` (in_probe_space): each write faults once, gets its page
    // mapped to the probe's data frame and completes. The fault pushes its
    // frame on this stack (no red zone in the kernel), hence no `nostack`.
    unsafe {
        if TOUCH {
            core::arch::asm!(
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "mov r8, rax",
                "2:",
                "mov dword ptr [rsi], ecx",
                "add rsi, 4096",
                "dec ecx",
                "jnz 2b",
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "sub rax, r8",
                inout("ecx") pages => _,
                inout("rsi") PF_BASE => _,
                out("rax") ticks,
                out("rdx") _,
                out("r8") _,
            );
        } else {
            core::arch::asm!(
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "mov r8, rax",
                "2:",
                "add rsi, 4096",
                "dec ecx",
                "jnz 2b",
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "sub rax, r8",
                inout("ecx") pages => _,
                inout("rsi") PF_BASE => _,
                out("rax") ticks,
                out("rdx") _,
                out("r8") _,
            );
        }
    }
    ticks
}

/// The native address-space switch (`native_cr3_write`), at ring 0 in host
/// context: `iterations` rounds of two `mov cr3` (to the probe's PML4 and
/// back to the kernel's, which map the hypervisor identically), minus the
/// same loop without them; TSC ticks per write, the minimum of `batches`
/// batches.
pub fn native_cr3_write(iterations: u32, batches: u32) -> Result<f64, &'static str> {
    let iterations = iterations.max(1);
    let probe = PagingProbe::new()?;
    let best = in_probe_space(&probe, |host_cr3| {
        let (mut writes, mut empty) = (u64::MAX, u64::MAX);
        for _ in 0..batches.max(1) {
            writes = writes.min(cr3_loop::<true>(
                iterations,
                probe.pml4.start_address(),
                host_cr3,
            ));
            empty = empty.min(cr3_loop::<false>(
                iterations,
                probe.pml4.start_address(),
                host_cr3,
            ));
        }
        writes.saturating_sub(empty)
    });
    Ok(best as f64 / (2.0 * f64::from(iterations)))
}

/// `iterations` rounds of `mov cr3, host; mov cr3, probe` (with `WRITE`) or
/// of the same loop without them; TSC ticks. Starts and ends in the probe's
/// space.
fn cr3_loop<const WRITE: bool>(iterations: u32, probe: u64, host: u64) -> u64 {
    let ticks: u64;
    // SAFETY: both PML4s map the whole upper half (code, stack, data) the
    // same way; the loop ends on the probe's, which is current before it.
    unsafe {
        if WRITE {
            core::arch::asm!(
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "mov r8, rax",
                "2:",
                "mov cr3, rdi",
                "mov cr3, rsi",
                "dec ecx",
                "jnz 2b",
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "sub rax, r8",
                inout("ecx") iterations => _,
                in("rdi") host,
                in("rsi") probe,
                out("rax") ticks,
                out("rdx") _,
                out("r8") _,
                options(nostack),
            );
        } else {
            core::arch::asm!(
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "mov r8, rax",
                "2:",
                "dec ecx",
                "jnz 2b",
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "sub rax, r8",
                inout("ecx") iterations => _,
                in("rdi") host,
                in("rsi") probe,
                out("rax") ticks,
                out("rdx") _,
                out("r8") _,
                options(nomem, nostack),
            );
        }
    }
    ticks
}

/// Measures and reports (bench mode only) the paging floors:
/// `native_page_fault` and `native_cr3_write`.
pub fn report_paging_floors() {
    if !enabled() {
        return;
    }
    match native_page_fault(256, 5) {
        Ok(v) => report("native_page_fault", v, None),
        Err(e) => kprintln!("bench: native page-fault probe failed: {e}"),
    }
    match native_cr3_write(1000, 5) {
        Ok(v) => report("native_cr3_write", v, None),
        Err(e) => kprintln!("bench: native cr3 probe failed: {e}"),
    }
}

/// Prints `bench: name=<metric> value=<value> unit=<unit> floor=<floor or ->`
/// if bench mode is on: [`report`] for a metric in another unit than
/// instructions (`bytes`, `guests`, `insn/KiB`).
pub fn report_in(metric: &str, value: f64, unit: &str, floor: Option<&str>) {
    if enabled() {
        kprintln!("{}", BenchLine::metric(metric, value, floor).in_unit(unit));
    }
}

/// Bytes the `native_memcpy` floor copies per batch: what the virtio
/// benches move per batch (`guests/bench/src/io.rs`, `IO_BYTES`).
pub const MEMCPY_BYTES: u64 = 64 * 1024;

/// The floor of the virtio byte benches: instructions per KiB for the
/// hypervisor to copy `bytes` (a page multiple) from one run of host frames
/// to another with `core::ptr::copy_nonoverlapping` (the `memcpy` every
/// host-side virtio copy ends in), through the direct map. The minimum of
/// `batches` copies, minus a bare `rdtsc` pair, divided by `bytes / 1024`.
/// Under icount a `rep movs` counts one instruction per iteration, so this
/// is about 1024 / 8 = 128 per KiB plus the call.
pub fn native_memcpy(bytes: u64, batches: u32) -> Result<f64, &'static str> {
    let frames = bytes.div_ceil(PAGE_SIZE).max(1);
    let src = mem::alloc_contiguous(frames, 1).ok_or("no memory for the copy's source")?;
    let Some(dst) = mem::alloc_contiguous(frames, 1) else {
        mem::free_contiguous(src, frames);
        return Err("no memory for the copy's destination");
    };
    let (s, d) = (
        phys_to_virt(src.start_address()) as *mut u8,
        phys_to_virt(dst.start_address()) as *mut u8,
    );
    let len = (frames * PAGE_SIZE) as usize;
    // SAFETY: both runs were just allocated here (direct-mapped, `len`
    // bytes each, disjoint) and are freed below; nothing else uses them.
    unsafe { core::ptr::write_bytes(s, 0x5a, len) };
    let mut best = u64::MAX;
    let mut bare = u64::MAX;
    for _ in 0..batches.max(1) {
        let t0 = cpu::rdtsc();
        let t1 = cpu::rdtsc();
        bare = bare.min(t1.wrapping_sub(t0));
        let t0 = cpu::rdtsc();
        // SAFETY: as above: `len` bytes at `s` and `d`, disjoint runs
        // owned by this function.
        unsafe {
            core::ptr::copy_nonoverlapping(
                core::hint::black_box(s) as *const u8,
                core::hint::black_box(d),
                len,
            )
        };
        let t1 = cpu::rdtsc();
        best = best.min(t1.wrapping_sub(t0));
    }
    // SAFETY: as above; read back so the copy cannot be elided.
    let ok = unsafe { d.read_volatile() } == 0x5a;
    mem::free_contiguous(src, frames);
    mem::free_contiguous(dst, frames);
    if !ok {
        return Err("the copy did not arrive");
    }
    Ok(best.saturating_sub(bare) as f64 * 1024.0 / len as f64)
}
