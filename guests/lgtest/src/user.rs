//! `mode=user`: run code at CPL 3 and check what the host does with its
//! traps and interrupts.
//!
//! The kernel puts flat user code/data segments (DPL 3) into GDT slots 14
//! and 15, gives the host a kernel stack with `LHCALL_SET_STACK(0x69, top,
//! 2)`, loads a DPL-3 trap gate for `int $0x80`, and enters the user
//! program (`lgtest_user_start`, in assembly below) with an `iret` to
//! `cs 0x73`, `ss 0x7b`. The user program:
//!
//! 1. `int $0x80` "report" twice (the second reports the first's return
//!    value, so registers set by the handler reach user mode);
//! 2. `ud2` (#UD), `cli` and `in` (#GP(0): the host emulates those only for
//!    the kernel), `int $0x1f` (#GP: the hypercall gate is DPL 1), `int3`
//!    (#BP, DPL-3 gate), a store outside guest RAM (#PF, error code 6 = user
//!    write, not present) — the kernel's handler records each and resumes
//!    user mode after the instruction;
//! 3. asks for a timer irq with `int $0x80` "arm" and spins until the irq
//!    handler sees it arrive from user mode and sets a flag (should the irq
//!    hit the kernel on a slow host, the handler re-arms the clock event);
//! 4. `int $0x80` "exit": the handler rewrites its frame to return to the
//!    kernel (`lgtest_kernel_resume`), which restores the kernel stack.
//!
//! Every trap from CPL 3 must arrive on the `SET_STACK` stack with the
//! 5-word frame (eip, cs, eflags, esp, ss): the frame ends exactly at the
//! stack's top.

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::seg::{IDT_TYPE_TRAP, SegmentDescriptor};
use lguest_rt::guest_abi::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, trap};
use lguest_rt::stack::Stack;
use lguest_rt::sync::IrqCell;
use lguest_rt::trap::{set_handler, set_irq_handler, set_syscall_handler};
use lguest_rt::{BootInfo, TrapFrame, check, check_eq, hcall, irq};

const KSTACK_SIZE: usize = 8192;
const USTACK_SIZE: usize = 4096;

static KSTACK: Stack<KSTACK_SIZE> = Stack::new();
static USTACK: Stack<USTACK_SIZE> = Stack::new();

/// Kernel esp saved by `lgtest_enter_user`, restored by
/// `lgtest_kernel_resume`.
static SAVED_ESP: AtomicU32 = AtomicU32::new(0);
/// Set by the timer handler; the user program spins on it.
static TIMER_FLAG: AtomicU32 = AtomicU32::new(0);

const SYS_REPORT: u32 = 1;
const SYS_EXIT: u32 = 2;
const SYS_ARM: u32 = 3;

/// One trap taken from user mode, as the kernel handler saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    vector: u32,
    err: u32,
    eip: u32,
    cs: u32,
    eflags: u32,
    esp: u32,
    ss: u32,
    /// Address just above the frame (must be the `SET_STACK` top).
    frame_end: u32,
    /// `ebx` (the report argument) for `int $0x80`.
    ebx: u32,
    irqs_on: bool,
}

const MAX_SEEN: usize = 16;

struct Log {
    seen: [Seen; MAX_SEEN],
    n: usize,
}

static LOG: IrqCell<Log> = IrqCell::new(Log {
    seen: [Seen {
        vector: 0,
        err: 0,
        eip: 0,
        cs: 0,
        eflags: 0,
        esp: 0,
        ss: 0,
        frame_end: 0,
        ebx: 0,
        irqs_on: false,
    }; MAX_SEEN],
    n: 0,
});

fn record(f: &TrapFrame) {
    let irqs_on = irq::enabled();
    // SAFETY: `f` is the frame the runtime passed to this handler.
    let (esp, ss) = unsafe { f.user_stack() }.unwrap_or((0, 0));
    let s = Seen {
        vector: f.vector,
        err: f.error_code,
        eip: f.eip,
        cs: f.cs,
        eflags: f.eflags,
        esp,
        ss,
        frame_end: hcall::phys(f) + core::mem::size_of::<TrapFrame>() as u32 + 8,
        ebx: f.ebx,
        irqs_on,
    };
    LOG.with(|l| {
        if let Some(slot) = l.seen.get_mut(l.n) {
            *slot = s;
            l.n += 1;
        }
    });
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    fn lgtest_enter_user(user_esp: u32);
    static lgtest_user_start: u8;
    static lgtest_user_report2: u8;
    static lgtest_user_ud2: u8;
    static lgtest_user_cli: u8;
    static lgtest_user_in: u8;
    static lgtest_user_int1f: u8;
    static lgtest_user_int3: u8;
    static lgtest_user_store: u8;
    static lgtest_user_exit: u8;
    static lgtest_kernel_resume: u8;
}

/// Address of a label in the assembly below.
macro_rules! label {
    ($l:ident) => {
        hcall::phys(&raw const $l)
    };
}

/// Length of the faulting user instruction at `eip` (0 if unknown).
fn fault_len(eip: u32) -> u32 {
    #[cfg(target_arch = "x86")]
    {
        [
            (label!(lgtest_user_ud2), 2),
            (label!(lgtest_user_cli), 1),
            (label!(lgtest_user_in), 1),
            (label!(lgtest_user_int1f), 2),
            (label!(lgtest_user_store), 5),
        ]
        .iter()
        .find(|(a, _)| *a == eip)
        .map_or(0, |(_, n)| *n)
    }
    #[cfg(not(target_arch = "x86"))]
    {
        let _ = eip;
        0
    }
}

/// #UD, #GP, #PF from user mode: record, skip the instruction. From the
/// kernel: a real bug, leave the frame alone (the handler is removed
/// before anything else could fault).
fn user_fault(f: &mut TrapFrame) {
    record(f);
    if f.from_user() {
        f.eip += fault_len(f.eip);
    }
}

/// `int3` from user mode: a trap, nothing to skip.
fn user_trap(f: &mut TrapFrame) {
    record(f);
}

fn syscall(f: &mut TrapFrame) {
    record(f);
    match f.eax {
        SYS_REPORT => f.eax = f.ebx.wrapping_add(1),
        SYS_ARM => hcall::set_clockevent(2_000_000),
        SYS_EXIT => {
            #[cfg(target_arch = "x86")]
            {
                f.eip = label!(lgtest_kernel_resume);
            }
            f.cs = u32::from(KERNEL_CS);
        }
        _ => f.eax = u32::MAX,
    }
}

/// Clock events re-armed because the irq hit the kernel instead of the
/// spinning user program (a slow host can let 2 ms pass on the way back).
static REARMS: AtomicU32 = AtomicU32::new(0);

fn timer(f: &mut TrapFrame) {
    if f.from_user() {
        record(f);
        TIMER_FLAG.store(1, Ordering::Relaxed);
    } else if REARMS.fetch_add(1, Ordering::Relaxed) < 20 {
        hcall::set_clockevent(2_000_000);
    }
}

pub fn run(_boot: &BootInfo) {
    let ktop = KSTACK.top();
    let utop = USTACK.top();
    // SAFETY: slots 14/15 are the Linux user segments, unused by the
    // kernel; the kernel stack is reserved for traps from user mode.
    unsafe {
        hcall::load_gdt_entry(14, SegmentDescriptor::flat_code(3));
        hcall::load_gdt_entry(15, SegmentDescriptor::flat_data(3));
        hcall::set_stack(u32::from(KERNEL_DS), ktop, 2);
    }
    lguest_rt::trap::install_syscall_gate(IDT_TYPE_TRAP, 3);
    set_syscall_handler(Some(syscall));
    let old = [trap::UD, trap::GP, trap::PF, trap::BP].map(|v| {
        let h = if v == trap::BP { user_trap } else { user_fault };
        (v, set_handler(v, Some(h)))
    });
    set_irq_handler(0, Some(timer));
    irq::unmask(0);

    #[cfg(target_arch = "x86")]
    // SAFETY: the user program only touches its own stack and TIMER_FLAG,
    // and leaves through SYS_EXIT, which resumes here with the kernel
    // stack, segments and callee-saved registers restored.
    unsafe {
        lgtest_enter_user(utop)
    };

    irq::mask(0);
    set_irq_handler(0, None);
    for (v, h) in old {
        set_handler(v, h);
    }
    set_syscall_handler(None);
    let cs: u32;
    // SAFETY: reads cs.
    unsafe { core::arch::asm!("mov {0:e}, cs", out(reg) cs) };
    check_eq!(
        cs,
        u32::from(KERNEL_CS),
        "back in the kernel (cs 0x61) after SYS_EXIT"
    );
    check!(irq::enabled(), "irqs on after returning from user mode");
    let log = LOG.with(|l| (l.seen, l.n));
    check_all(&log.0[..log.1], ktop, utop);
}

#[cfg(target_arch = "x86")]
fn check_all(seen: &[Seen], ktop: u32, utop: u32) {
    let ucs = u32::from(USER_CS);
    let uss = u32::from(USER_DS);
    // Expected: (name, vector, error codes allowed, eip)
    let want: [(&str, u32, &[u32], u32); 10] = [
        (
            "int $0x80 report",
            0x80,
            &[0],
            label!(lgtest_user_start) + 12,
        ),
        (
            "int $0x80 report of the return value",
            0x80,
            &[0],
            label!(lgtest_user_report2) + 2,
        ),
        ("#UD ud2", trap::UD, &[0], label!(lgtest_user_ud2)),
        ("#GP cli", trap::GP, &[0], label!(lgtest_user_cli)),
        ("#GP in", trap::GP, &[0], label!(lgtest_user_in)),
        // Hardware: vector * 8 + 2; QEMU's TCG uses the 16-byte IDT stride.
        (
            "#GP int $0x1f",
            trap::GP,
            &[0x1f * 8 + 2, 0x1f * 16 + 2],
            label!(lgtest_user_int1f),
        ),
        ("#BP int3", trap::BP, &[0], label!(lgtest_user_int3) + 1),
        ("#PF user store", trap::PF, &[6], label!(lgtest_user_store)),
        ("int $0x80 arm", 0x80, &[0], 0),
        ("timer irq", 0x20, &[0], 0),
    ];
    check_eq!(
        seen.len(),
        want.len() + 1,
        "user mode: number of traps taken"
    );
    for (i, (name, vector, errs, eip)) in want.iter().enumerate() {
        let Some(s) = seen.get(i) else { break };
        check_eq!(s.vector, *vector, "user {name}: vector");
        check!(
            errs.contains(&s.err),
            "user {name}: error code {:#x}",
            s.err
        );
        if *eip != 0 {
            check_eq!(s.eip, *eip, "user {name}: frame eip");
        }
        check_eq!(
            (s.cs, s.ss),
            (ucs, uss),
            "user {name}: frame cs/ss are the user's"
        );
        check_eq!(s.esp, utop, "user {name}: frame esp is the user stack");
        check!(s.eflags & 0x200 != 0, "user {name}: frame EFLAGS.IF set");
        check_eq!(
            s.frame_end,
            ktop,
            "user {name}: 5-word frame on the SET_STACK stack"
        );
    }
    if let [first, second, ..] = seen {
        check_eq!(
            first.ebx,
            0x600D_C0DE,
            "int $0x80 argument reaches the handler"
        );
        check_eq!(second.ebx, 0x600D_C0DF, "handler's eax reaches user mode");
        check!(first.irqs_on, "int $0x80 through a trap gate keeps irqs on");
    }
    if let Some(s) = seen.get(8) {
        check!(
            s.eip > label!(lgtest_user_store),
            "user timer arm: eip after the store"
        );
    }
    if let Some(s) = seen.get(9) {
        check!(
            s.eip > label!(lgtest_user_store) && s.eip < label!(lgtest_user_exit),
            "user timer irq: eip inside the spin loop"
        );
        check!(!s.irqs_on, "user timer irq: interrupt gate turns irqs off");
    }
    if let Some(s) = seen.get(10) {
        check_eq!(s.vector, 0x80, "user exit: vector 0x80");
        check_eq!(s.eip, label!(lgtest_user_exit) + 9, "user exit: frame eip");
        check_eq!(s.frame_end, ktop, "user exit: frame on the SET_STACK stack");
    }
    check!(
        label!(lgtest_user_start) < label!(lgtest_user_report2),
        "user program laid out as assembled"
    );
}

#[cfg(not(target_arch = "x86"))]
fn check_all(_seen: &[Seen], _ktop: u32, _utop: u32) {}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    ".pushsection .text.lgtest_user,\"ax\",@progbits",
    // ---- lgtest_enter_user(user_esp) (C ABI) ---------------------------
    // Save the callee-saved registers and the kernel esp, then build the
    // 5-word iret frame for CPL 3 (ss, esp, eflags with IF, cs, eip), load
    // the user data selector into ds/es (an iret to CPL 3 would null the
    // kernel's DPL-1 selectors; the kernel handlers then run with ds/es =
    // 0x7b, which is flat and usable at CPL 1 too) and leave through the
    // runtime's paravirt iret, which also sets irq_enabled from the IF bit.
    ".globl lgtest_enter_user",
    "lgtest_enter_user:",
    "push ebp",
    "push ebx",
    "push esi",
    "push edi",
    "mov dword ptr [{saved}], esp",
    "mov eax, dword ptr [esp + 20]",
    "push {user_ds}",
    "push eax",
    "push 0x202",
    "push {user_cs}",
    "lea ecx, [lgtest_user_start]",
    "push ecx",
    "mov eax, {user_ds}",
    "mov ds, ax",
    "mov es, ax",
    "jmp lguest_rt_iret",
    // ---- lgtest_kernel_resume ------------------------------------------
    // SYS_EXIT "returns" here at CPL 1 on the SET_STACK stack: restore the
    // kernel data selectors and the stack of lgtest_enter_user's caller.
    ".globl lgtest_kernel_resume",
    "lgtest_kernel_resume:",
    "mov eax, {kernel_ds}",
    "mov ds, ax",
    "mov es, ax",
    "mov esp, dword ptr [{saved}]",
    "pop edi",
    "pop esi",
    "pop ebx",
    "pop ebp",
    "ret",
    // ---- The user program (CPL 3; never pushes, so esp stays the top) --
    ".globl lgtest_user_start",
    "lgtest_user_start:",
    "mov eax, {sys_report}",          // 5 bytes
    "mov ebx, 0x600dc0de",            // 5 bytes
    "int 0x80",                       // 2 bytes; returns eax = ebx + 1
    "mov ebx, eax",                   // 2 bytes
    "mov eax, {sys_report}",          // 5 bytes
    ".globl lgtest_user_report2",
    "lgtest_user_report2:",
    "int 0x80",
    ".globl lgtest_user_ud2",
    "lgtest_user_ud2:",
    "ud2",
    ".globl lgtest_user_cli",
    "lgtest_user_cli:",
    "cli",
    ".globl lgtest_user_in",
    "lgtest_user_in:",
    "in al, dx",
    ".globl lgtest_user_int1f",
    "lgtest_user_int1f:",
    "int 0x1f",
    ".globl lgtest_user_int3",
    "lgtest_user_int3:",
    "int3",
    ".globl lgtest_user_store",
    "lgtest_user_store:",
    ".byte 0xa3",                     // mov [0xf0000000], eax
    ".long 0xf0000000",
    "mov eax, {sys_arm}",
    "int 0x80",
    "mov ecx, 100000000",
    "1:",
    "cmp dword ptr [{flag}], 0",
    "jne 2f",
    "pause",
    "dec ecx",
    "jnz 1b",
    "2:",
    ".globl lgtest_user_exit",
    "lgtest_user_exit:",
    "nop",
    "nop",
    "mov eax, {sys_exit}",            // 5 bytes
    "int 0x80",
    "ud2",
    ".popsection",
    saved = sym SAVED_ESP,
    flag = sym TIMER_FLAG,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    kernel_ds = const KERNEL_DS,
    sys_report = const SYS_REPORT,
    sys_arm = const SYS_ARM,
    sys_exit = const SYS_EXIT,
);
