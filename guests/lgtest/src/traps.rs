//! `mode=traps`: every exception the guest kernel (CPL 1, compatibility
//! mode) can raise, reflected by the host through the guest IDT with the
//! vector, frame and error code the architecture defines:
//!
//! - faults (#DE, #BR, #UD, #NM, #GP, #PF, #MF) report the
//!   faulting instruction as `eip`; traps (#DB from single-stepping, #BP,
//!   #OF) the next one;
//! - #GP and #PF push an error code (a selector for a bad segment load,
//!   0 for a limit violation, the page-fault bits), the others none;
//! - the frame's `cs` is the kernel's 0x61 and its `EFLAGS.IF` mirrors the
//!   virtual interrupt flag; an interrupt gate turns virtual interrupts off
//!   in the handler, a trap gate leaves them on.
//!
//! #DB comes from single-stepping (TF set with `popfd`): `icebp` (INT1)
//! would be the other way, but QEMU 7.2's TCG decodes it as #UD.
//!
//! #SS cannot be produced under QEMU's TCG: it does not check segment
//! limits on memory accesses (an ss-relative load beyond a small limit
//! reaches paging and is a #PF), and the other source, loading ss with a
//! not-present descriptor, meets the null-descriptor policy below (#GP).
//!
//! #XM cannot be produced under QEMU's TCG either: it only records SSE
//! exceptions in MXCSR and never raises #XM, even with CR4.OSXMMEXCPT set
//! and the exception unmasked. #MF has its own mode (`mode=mf`).
//!
//! Not produced here: #NMI/#DF/#MC/#TS (no way for a guest to cause them
//! without breaking the host's own state) and #AC (needs CR0.AM, the host's
//! choice, and CPL 3). #NP: the host keeps a not-present code/data GDT
//! descriptor (`hypervisor/src/lguest/segments.rs`), so loading it raises
//! #NP(selector) as on hardware — checked below.

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::seg::{IDT_TYPE_INTERRUPT, IDT_TYPE_TRAP, SegmentDescriptor};
use lguest_rt::guest_abi::{KERNEL_CS, USER_DS, X86_EFLAGS_IF, trap};
use lguest_rt::trap::{TrapHandler, install_gate, set_handler};
use lguest_rt::{BootInfo, TrapFrame, check, check_eq, hcall, irq, println};

/// What the last handler saw.
static VECTOR: AtomicU32 = AtomicU32::new(u32::MAX);
static ERR: AtomicU32 = AtomicU32::new(u32::MAX);
static EIP: AtomicU32 = AtomicU32::new(0);
static CS: AtomicU32 = AtomicU32::new(0);
static EFLAGS: AtomicU32 = AtomicU32::new(0);
static IRQS_ON: AtomicU32 = AtomicU32::new(u32::MAX);
static COUNT: AtomicU32 = AtomicU32::new(0);
/// Where a fault handler resumes (0: return to the frame's `eip`).
static RESUME: AtomicU32 = AtomicU32::new(0);

fn reset(resume: u32) {
    VECTOR.store(u32::MAX, Ordering::Relaxed);
    ERR.store(u32::MAX, Ordering::Relaxed);
    EIP.store(0, Ordering::Relaxed);
    CS.store(0, Ordering::Relaxed);
    EFLAGS.store(0, Ordering::Relaxed);
    IRQS_ON.store(u32::MAX, Ordering::Relaxed);
    COUNT.store(0, Ordering::Relaxed);
    RESUME.store(resume, Ordering::Relaxed);
}

fn record(f: &TrapFrame) {
    // First, before anything could change the virtual interrupt flag.
    IRQS_ON.store(u32::from(irq::enabled()), Ordering::Relaxed);
    VECTOR.store(f.vector, Ordering::Relaxed);
    ERR.store(f.error_code, Ordering::Relaxed);
    EIP.store(f.eip, Ordering::Relaxed);
    CS.store(f.cs, Ordering::Relaxed);
    EFLAGS.store(f.eflags, Ordering::Relaxed);
    COUNT.fetch_add(1, Ordering::Relaxed);
}

/// Record, then continue at `RESUME` if set (skipping a faulting
/// instruction), else at the frame's `eip`.
fn record_resume(f: &mut TrapFrame) {
    record(f);
    let r = RESUME.load(Ordering::Relaxed);
    if r != 0 {
        f.eip = r;
    }
}

/// Run `body` with `handler` on `vector`, then check vector, count, eip
/// (`body` returns the address the frame must report), error code, cs, and
/// that virtual interrupts were off in the handler (interrupt gate) and are
/// back on afterwards. A `body` that faults stores where to resume into
/// [`RESUME`] itself, from the same `asm!` block (labels are per block).
fn expect(
    name: &str,
    vector: u32,
    err: Option<u32>,
    handler: TrapHandler,
    body: impl FnOnce() -> u32,
) {
    reset(0);
    let old = set_handler(vector, Some(handler));
    let want_eip = body();
    set_handler(vector, old);
    check_eq!(
        VECTOR.load(Ordering::Relaxed),
        vector,
        "{name}: vector {vector}"
    );
    check_eq!(COUNT.load(Ordering::Relaxed), 1, "{name}: delivered once");
    check_eq!(EIP.load(Ordering::Relaxed), want_eip, "{name}: frame eip");
    if let Some(e) = err {
        check_eq!(ERR.load(Ordering::Relaxed), e, "{name}: error code {e:#x}");
    }
    check_eq!(
        CS.load(Ordering::Relaxed),
        u32::from(KERNEL_CS),
        "{name}: frame cs"
    );
    check!(
        EFLAGS.load(Ordering::Relaxed) & X86_EFLAGS_IF != 0,
        "{name}: frame EFLAGS.IF set (irqs were on)"
    );
    check_eq!(
        IRQS_ON.load(Ordering::Relaxed),
        0,
        "{name}: irqs off in handler"
    );
    check!(irq::enabled(), "{name}: irqs on after iret");
}

pub fn run(_boot: &BootInfo) {
    divide_error();
    debug_single_step();
    breakpoint();
    breakpoint_trap_gate();
    breakpoint_irqs_off();
    overflow();
    bound_range();
    invalid_opcode();
    device_not_available();
    segment_faults();
    page_fault();
}

/// `mode=mf`: an unmasked x87 exception must raise #MF at the next waiting
/// instruction. Needs CR0.NE on the host (with NE clear the CPU signals
/// FERR# instead and the guest sees nothing).
pub fn run_mf(_boot: &BootInfo) {
    x87_error();
}

fn divide_error() {
    expect("#DE div by zero", trap::DE, None, record_resume, || {
        let at: u32;
        // SAFETY: `div` by ecx = 0 faults (eip = the div); the handler
        // resumes at label 3, stored in RESUME first.
        unsafe {
            core::arch::asm!(
                "lea {t}, [3f]",
                "mov dword ptr [{resume}], {t}",
                "lea {t}, [2f]",
                "xor edx, edx",
                "xor ecx, ecx",
                "2:",
                "div ecx",
                "3:",
                t = out(reg) at,
                resume = sym RESUME,
                inout("eax") 7u32 => _,
                out("edx") _,
                out("ecx") _,
            )
        };
        at
    });
}

/// Single-step trap: clear TF in the frame so only one #DB arrives.
fn single_step(f: &mut TrapFrame) {
    record(f);
    f.eflags &= !0x100;
}

fn debug_single_step() {
    expect(
        "#DB single-step (TF via popfd)",
        trap::DB,
        None,
        single_step,
        || {
            let next: u32;
            // SAFETY: popfd sets TF; the instruction after it (nop) completes
            // and then traps (#DB, eip = the instruction after the nop); the
            // handler clears TF in the frame, so nothing else traps.
            unsafe {
                core::arch::asm!(
                    "pushfd",
                    "or dword ptr [esp], 0x100",
                    "popfd",
                    "nop",
                    "2:",
                    "lea {n}, [2b]",
                    n = out(reg) next,
                )
            };
            next
        },
    );
    check_eq!(
        read_eflags() & 0x100,
        0,
        "TF clear after the single-step handler"
    );
}

fn read_eflags() -> u32 {
    let f: u32;
    // SAFETY: pushfd/pop only read EFLAGS.
    unsafe { core::arch::asm!("pushfd", "pop {f}", f = out(reg) f) };
    f
}

fn int3() -> u32 {
    let next: u32;
    // SAFETY: int3 traps (eip = next instruction); the handler returns.
    unsafe { core::arch::asm!("int3", "2:", "lea {n}, [2b]", n = out(reg) next) };
    next
}

fn breakpoint() {
    expect("#BP int3", trap::BP, None, record_resume, int3);
}

/// A trap gate (type 0xF) leaves virtual interrupts on in the handler.
fn breakpoint_trap_gate() {
    install_gate(trap::BP, IDT_TYPE_TRAP, 3);
    reset(0);
    let old = set_handler(trap::BP, Some(record_resume));
    let next = int3();
    set_handler(trap::BP, old);
    install_gate(trap::BP, IDT_TYPE_INTERRUPT, 3);
    check_eq!(
        VECTOR.load(Ordering::Relaxed),
        trap::BP,
        "#BP via trap gate: vector 3"
    );
    check_eq!(
        EIP.load(Ordering::Relaxed),
        next,
        "#BP via trap gate: frame eip"
    );
    check_eq!(
        IRQS_ON.load(Ordering::Relaxed),
        1,
        "trap gate keeps irqs on in handler"
    );
}

/// With virtual interrupts off, the frame's IF is clear and the paravirt
/// iret leaves them off.
fn breakpoint_irqs_off() {
    reset(0);
    let old = set_handler(trap::BP, Some(record_resume));
    irq::disable();
    int3();
    let still_off = !irq::enabled();
    irq::enable();
    set_handler(trap::BP, old);
    check_eq!(
        COUNT.load(Ordering::Relaxed),
        1,
        "#BP with irqs off delivered"
    );
    check_eq!(
        EFLAGS.load(Ordering::Relaxed) & X86_EFLAGS_IF,
        0,
        "frame EFLAGS.IF clear when irqs were off"
    );
    check!(
        still_off,
        "iret keeps irqs off when the frame's IF was clear"
    );
}

fn overflow() {
    expect("#OF into", trap::OF, None, record_resume, || {
        let next: u32;
        // SAFETY: 0x7f + 1 sets OF; `into` (valid in compatibility mode)
        // then traps (eip = next instruction) and execution continues.
        unsafe {
            core::arch::asm!(
                "mov al, 0x7f",
                "add al, 1",
                "into",
                "2:",
                "lea {n}, [2b]",
                n = out(reg) next,
                out("eax") _,
            )
        };
        next
    });
}

fn bound_range() {
    static BOUNDS: [i32; 2] = [0, 10];
    expect("#BR bound", trap::BR, None, record_resume, || {
        let at: u32;
        // SAFETY: `bound eax, [ecx]` (62 01) with eax = 20 outside [0, 10]
        // faults (eip = the bound); the handler resumes at label 3.
        unsafe {
            core::arch::asm!(
                "lea {t}, [3f]",
                "mov dword ptr [{resume}], {t}",
                "lea {t}, [2f]",
                "2:",
                ".byte 0x62, 0x01",
                "3:",
                t = out(reg) at,
                resume = sym RESUME,
                in("eax") 20u32,
                in("ecx") BOUNDS.as_ptr(),
            )
        };
        at
    });
}

fn invalid_opcode() {
    expect("#UD ud2", trap::UD, None, record_resume, || {
        let at: u32;
        // SAFETY: ud2 faults; the handler resumes at label 3.
        unsafe {
            core::arch::asm!(
                "lea {t}, [3f]",
                "mov dword ptr [{resume}], {t}",
                "lea {t}, [2f]",
                "2:",
                "ud2",
                "3:",
                t = out(reg) at,
                resume = sym RESUME,
            )
        };
        at
    });
}

/// #NM handler: clear the virtual TS (as Linux's math_state_restore does)
/// and return to the FPU instruction, which then completes.
fn clear_ts(f: &mut TrapFrame) {
    record(f);
    hcall::set_ts(false);
}

fn device_not_available() {
    // SAFETY: a clean x87 state; nothing else in this guest uses the FPU.
    unsafe { core::arch::asm!("fninit") };
    let mut one = 0u32;
    expect("#NM x87 with TS set", trap::NM, None, clear_ts, || {
        hcall::set_ts(true);
        // An exit in between: TS must survive it.
        hcall::flush_async();
        let at: u32;
        // SAFETY: with TS set, fld1 raises #NM (eip = fld1); the handler
        // clears TS and returns, fld1 runs again and completes; fstp stores
        // 1.0f32 into `one`.
        unsafe {
            core::arch::asm!(
                "lea {t}, [2f]",
                "2:",
                "fld1",
                "fstp dword ptr [{p}]",
                t = out(reg) at,
                p = in(reg) &raw mut one,
            )
        };
        at
    });
    check_eq!(one, 0x3F80_0000, "#NM: fld1 completed after TS cleared");
    let mut x = 0u32;
    expect("#NM SSE with TS set", trap::NM, None, clear_ts, || {
        hcall::set_ts(true);
        let at: u32;
        // SAFETY: movd with TS set raises #NM; after the handler clears TS
        // it completes and the value round-trips through xmm0.
        unsafe {
            core::arch::asm!(
                "lea {t}, [2f]",
                "2:",
                "movd xmm0, {v:e}",
                "movd {v:e}, xmm0",
                t = out(reg) at,
                v = inout(reg) 0x1234_5678u32 => x,
            )
        };
        at
    });
    check_eq!(
        x,
        0x1234_5678,
        "#NM: SSE instruction completed after TS cleared"
    );
    reset(0);
    let old = set_handler(trap::NM, Some(clear_ts));
    // SAFETY: TS is clear: no trap.
    unsafe { core::arch::asm!("fld1", "fstp st(0)") };
    set_handler(trap::NM, old);
    check_eq!(COUNT.load(Ordering::Relaxed), 0, "no #NM with TS clear");
}

/// A fault with a selector error code, skipping the instruction.
fn segment_faults() {
    // User data (DPL 3) in slot 15 and a not-present descriptor in slot 23.
    const NOT_PRESENT: u32 = 23;
    let absent = SegmentDescriptor(
        SegmentDescriptor::flat_data(1).0 & !(u64::from(SegmentDescriptor::P) << 40),
    );
    // SAFETY: none of these slots is in use; only the asm below loads them,
    // and it restores the previous selectors.
    unsafe {
        hcall::load_gdt_entry(15, SegmentDescriptor::flat_data(3));
        hcall::load_gdt_entry(NOT_PRESENT, absent);
    }

    expect(
        "#GP(sel) ss with DPL 3 at CPL 1",
        trap::GP,
        Some(USER_DS as u32 & !3),
        record_resume,
        || {
            let at: u32;
            // SAFETY: loading ss with a selector whose RPL/DPL differ from CPL
            // faults before anything changes (#GP(selector)); resume at label 3.
            unsafe {
                core::arch::asm!(
                    "lea {t}, [3f]",
                    "mov dword ptr [{resume}], {t}",
                    "lea {t}, [2f]",
                    "2:",
                    "mov ss, {sel:e}",
                    "3:",
                    t = out(reg) at,
                    sel = in(reg) u32::from(USER_DS),
                    resume = sym RESUME,
                )
            };
            at
        },
    );

    expect(
        "#NP(sel) not-present GDT entry: mov fs",
        trap::NP,
        Some(NOT_PRESENT << 3),
        record_resume,
        || {
            let at: u32;
            // SAFETY: fs = the not-present slot faults (#NP) before fs
            // changes; resume at label 3.
            unsafe {
                core::arch::asm!(
                    "lea {t}, [3f]",
                    "mov dword ptr [{resume}], {t}",
                    "lea {t}, [2f]",
                    "2:",
                    "mov fs, {sel:e}",
                    "3:",
                    t = out(reg) at,
                    sel = in(reg) NOT_PRESENT << 3 | 1,
                    resume = sym RESUME,
                )
            };
            at
        },
    );
    // SAFETY: nothing refers to these slots any more.
    unsafe {
        hcall::load_gdt_entry(NOT_PRESENT, SegmentDescriptor(0));
        hcall::load_gdt_entry(15, SegmentDescriptor(0));
    }
}

fn page_fault() {
    expect(
        "#PF write outside RAM",
        trap::PF,
        Some(2),
        record_resume,
        || {
            let at: u32;
            // SAFETY: the store to 0xF0000000 (no guest RAM) faults; resume at
            // label 3.
            unsafe {
                core::arch::asm!(
                    "lea {t}, [3f]",
                    "mov dword ptr [{resume}], {t}",
                    "lea {t}, [2f]",
                    "2:",
                    "mov dword ptr [0xf0000000], eax",
                    "3:",
                    t = out(reg) at,
                    resume = sym RESUME,
                )
            };
            at
        },
    );
    check_eq!(irq::cr2(), 0xF000_0000, "#PF: lguest_data.cr2");
}

/// #MF handler: clear the x87 exception flags so the `fwait` it returns
/// to completes.
fn clear_x87(f: &mut TrapFrame) {
    record(f);
    // SAFETY: only clears the x87 status word's exception bits.
    unsafe { core::arch::asm!("fnclex") };
}

fn x87_error() {
    static CW_ZM_UNMASKED: u16 = 0x037B;
    expect(
        "#MF x87 divide by zero at fwait",
        trap::MF,
        None,
        clear_x87,
        || {
            let at: u32;
            // SAFETY: with the zero-divide exception unmasked, 1/0 records a
            // pending x87 exception; the next waiting instruction (fwait)
            // raises #MF (eip = the fwait). The handler clears it with fnclex
            // and fwait completes; fninit restores the default control word.
            unsafe {
                core::arch::asm!(
                    "fninit",
                    "fldcw word ptr [{cw}]",
                    "fld1",
                    "fldz",
                    "fdivp st(1), st",
                    "lea {t}, [2f]",
                    "2:",
                    "fwait",
                    // Not right after fwait: the assembler would fold the two
                    // into one `finit` (9b db e3).
                    "nop",
                    "fninit",
                    cw = sym CW_ZM_UNMASKED,
                    t = out(reg) at,
                )
            };
            at
        },
    );
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    // `lgtest_div0()`: divide 1 by 0 (the `div` is at `lgtest_div0_insn`)
    // and return, should the host resume after the fault.
    ".pushsection .text.lgtest_div0,\"ax\",@progbits",
    ".globl lgtest_div0",
    "lgtest_div0:",
    "xor edx, edx",
    "xor ecx, ecx",
    "mov eax, 1",
    ".globl lgtest_div0_insn",
    "lgtest_div0_insn:",
    "div ecx",
    "ret",
    ".popsection",
);

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    fn lgtest_div0();
    static lgtest_div0_insn: u8;
}

/// `mode=nohandler`: remove the #DE gate, then divide by zero. The host has
/// nowhere to reflect the fault and must kill the guest with
/// `unhandled trap 0 at <eip> (0x0)`; the guest prints that eip first.
pub fn no_handler(_boot: &BootInfo) {
    // SAFETY: a not-present gate removes vector 0; nothing here relies on it.
    unsafe { hcall::load_idt_entry(trap::DE, 0, 0) };
    #[cfg(target_arch = "x86")]
    {
        let at = hcall::phys(&raw const lgtest_div0_insn);
        println!("lgtest: dividing by zero without a #DE gate at {at:#x}");
        // SAFETY: clobbers only eax, ecx, edx (caller-saved in the C ABI);
        // the guest is killed at the div.
        unsafe { lgtest_div0() };
    }
    println!("FAIL: survived a #DE without a gate");
}
