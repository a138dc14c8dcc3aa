//! Tiny processes: user code at CPL 3, each in its own
//! [`AddressSpace`], making system calls with `int $0x80` and switched on a
//! system call or a timer interrupt.
//!
//! [`init`] (after [`paging::init`]) puts the flat user segments into GDT
//! slots 14/15, gives the host the kernel stack with
//! `LHCALL_SET_STACK(0x69, esp0, 2)` — `esp0` is the stack's address in the
//! direct map at `PAGE_OFFSET`, so every trap from user mode pushes its frame
//! through the high kernel mapping — and loads a DPL-3 interrupt gate for
//! vector 0x80.
//!
//! [`spawn`] registers a process; [`run`] enters the first one with an
//! `iret` to CPL 3 and returns when every process has exited. All switching
//! happens in trap handlers by rewriting the trap frame in place: the running
//! process's registers (the frame, plus the user `esp` the host pushed above
//! it) are saved, the next one's are loaded, and if it lives in another
//! address space the handler issues `LHCALL_NEW_PGTABLE` before the paravirt
//! `iret` takes it to user mode. When the last process exits, the frame is
//! pointed at the kernel's resume path instead, which returns from [`run`].
//!
//! System calls: `eax` = number, `ebx`, `ecx`, `edx`, `esi` = arguments,
//! result in `eax`. [`SYS_EXIT`] (`ebx` = exit code) and [`SYS_YIELD`] are
//! handled here; every other number goes to the guest's hook
//! ([`set_syscall_hook`]). With [`set_preempt`] on, timer irq 0 ticks every
//! millisecond while processes run and a tick from user mode switches to the
//! next process.

use core::sync::atomic::AtomicU32;

use guest_abi::seg::{IDT_TYPE_INTERRUPT, SegmentDescriptor};
use guest_abi::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, trap};

use crate::paging::{self, AddressSpace, PAGE_OFFSET};
use crate::stack::Stack;
use crate::sync::IrqCell;
use crate::trap::{TrapFrame, set_handler, set_irq_handler, set_syscall_handler};
use crate::{hcall, irq};

/// Most processes at a time.
pub const MAX_PROCS: usize = 8;
/// `int $0x80` with `eax` = 1: exit with code `ebx`.
pub const SYS_EXIT: u32 = 1;
/// `int $0x80` with `eax` = 2: let the next process run (returns 0).
pub const SYS_YIELD: u32 = 2;
/// Exit code of a process killed by a page fault nobody resolved.
pub const EXIT_SEGV: u32 = 0xDEAD_000E;
/// Exit code of a process killed by another exception (`0xDEAD_0000 | vector`).
pub const EXIT_TRAP: u32 = 0xDEAD_0000;
/// Clock-event period while preemption is on.
pub const TICK_NS: u32 = 1_000_000;
/// Size of the kernel stack traps from user mode arrive on.
pub const KSTACK_SIZE: usize = 16 * 1024;

static KSTACK: Stack<KSTACK_SIZE> = Stack::new();
/// Kernel `esp` saved by `lguest_rt_enter_user`.
static SAVED_ESP: AtomicU32 = AtomicU32::new(0);

/// A process's user registers while it does not run.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserRegs {
    /// `eax`.
    pub eax: u32,
    /// `ebx`.
    pub ebx: u32,
    /// `ecx`.
    pub ecx: u32,
    /// `edx`.
    pub edx: u32,
    /// `esi`.
    pub esi: u32,
    /// `edi`.
    pub edi: u32,
    /// `ebp`.
    pub ebp: u32,
    /// `eip`.
    pub eip: u32,
    /// `esp`.
    pub esp: u32,
    /// `eflags`.
    pub eflags: u32,
}

const _: () = {
    assert!(core::mem::offset_of!(UserRegs, eip) == 28);
    assert!(core::mem::offset_of!(UserRegs, esp) == 32);
    assert!(core::mem::offset_of!(UserRegs, eflags) == 36);
};

/// What a process left behind ([`reap`]).
#[derive(Debug)]
pub struct Exit {
    /// Its exit code.
    pub code: u32,
    /// System calls it made.
    pub syscalls: u32,
    /// Times a timer tick took the CPU from it.
    pub preemptions: u32,
    /// Its address space, for the caller to destroy.
    pub space: AddressSpace,
}

struct Proc {
    space: AddressSpace,
    regs: UserRegs,
    exit: Option<u32>,
    syscalls: u32,
    preemptions: u32,
}

/// The system-call hook: `(pid, number, [ebx, ecx, edx, esi]) -> eax`. It
/// runs in the trap handler with virtual interrupts off and may use
/// [`with_current`].
pub type SyscallHook = fn(usize, u32, [u32; 4]) -> u32;

/// Called on each preemption with the pid that lost the CPU.
pub type PreemptHook = fn(usize);

struct Sched {
    procs: [Option<Proc>; MAX_PROCS],
    current: Option<usize>,
    running: bool,
    preempt: bool,
    syscall_hook: Option<SyscallHook>,
    preempt_hook: Option<PreemptHook>,
    switches: u32,
    kernel_ticks: u32,
}

static SCHED: IrqCell<Sched> = IrqCell::new(Sched {
    procs: [const { None }; MAX_PROCS],
    current: None,
    running: false,
    preempt: false,
    syscall_hook: None,
    preempt_hook: None,
    switches: 0,
    kernel_ticks: 0,
});

/// Set up user mode: GDT slots 14/15, the kernel stack (`LHCALL_SET_STACK`
/// through the direct map), the `int $0x80` gate and the trap handlers.
///
/// # Panics
///
/// If paging is not on (the stack address is a `PAGE_OFFSET` one).
pub fn init() {
    assert!(paging::enabled(), "process::init needs paging::init first");
    let esp0 = PAGE_OFFSET + KSTACK.top();
    // SAFETY: slots 14/15 are the Linux user segments, unused by the
    // kernel; the kernel stack is reserved for traps from user mode, and its
    // direct-map alias is mapped in every address space.
    unsafe {
        hcall::load_gdt_entry(14, SegmentDescriptor::flat_code(3));
        hcall::load_gdt_entry(15, SegmentDescriptor::flat_data(3));
        hcall::set_stack(u32::from(KERNEL_DS), esp0, 2);
    }
    crate::trap::install_syscall_gate(IDT_TYPE_INTERRUPT, 3);
    set_syscall_handler(Some(syscall));
    for v in [trap::DE, trap::UD, trap::GP, trap::BP] {
        set_handler(v, Some(user_trap));
    }
    set_irq_handler(0, Some(tick));
}

/// The `esp0` given to `LHCALL_SET_STACK` (the kernel stack's top in the
/// direct map).
pub fn kernel_stack_top() -> u32 {
    PAGE_OFFSET + KSTACK.top()
}

/// Install (or remove) the system-call hook.
pub fn set_syscall_hook(hook: Option<SyscallHook>) {
    SCHED.with(|s| s.syscall_hook = hook);
}

/// Install (or remove) the preemption hook.
pub fn set_preempt_hook(hook: Option<PreemptHook>) {
    SCHED.with(|s| s.preempt_hook = hook);
}

/// Switch processes on timer ticks from user mode (off by default).
pub fn set_preempt(on: bool) {
    SCHED.with(|s| s.preempt = on);
}

/// Register a process that starts at `eip` with stack pointer `esp` in
/// `space`; its pid, or `None` when the table is full.
pub fn spawn(space: AddressSpace, eip: u32, esp: u32) -> Option<usize> {
    SCHED.with(|s| {
        let pid = s.procs.iter().position(Option::is_none)?;
        s.procs[pid] = Some(Proc {
            space,
            regs: UserRegs {
                eip,
                esp,
                eflags: guest_abi::INITIAL_EFLAGS,
                ..UserRegs::default()
            },
            exit: None,
            syscalls: 0,
            preemptions: 0,
        });
        Some(pid)
    })
}

/// Take an exited process out of the table.
pub fn reap(pid: usize) -> Option<Exit> {
    SCHED.with(|s| {
        let slot = s.procs.get_mut(pid)?;
        let code = slot.as_ref()?.exit?;
        let p = slot.take()?;
        Some(Exit {
            code,
            syscalls: p.syscalls,
            preemptions: p.preemptions,
            space: p.space,
        })
    })
}

/// Process switches made so far (each a frame rewrite; with a
/// `LHCALL_NEW_PGTABLE` when the address space changes).
pub fn switches() -> u32 {
    SCHED.with(|s| s.switches)
}

/// Run `f` with the current process's pid and address space (inside a trap
/// handler that interrupted it); `None` if no process is current.
pub fn with_current<R>(f: impl FnOnce(usize, &AddressSpace) -> R) -> Option<R> {
    SCHED.with(|s| {
        let pid = s.current?;
        let p = s.procs[pid].as_ref()?;
        Some(f(pid, &p.space))
    })
}

/// Run every runnable process until all have exited, then return (in the
/// kernel's own address space again).
///
/// # Panics
///
/// If called re-entrantly or before [`init`].
pub fn run() {
    let first = SCHED.with(|s| {
        assert!(!s.running, "process::run re-entered");
        let first = s
            .procs
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.exit.is_none()))?;
        s.running = true;
        s.current = Some(first);
        let p = s.procs[first].as_ref()?;
        Some((p.regs, p.space.top()))
    });
    let Some((regs, _)) = first else {
        return;
    };
    SCHED.with(|s| {
        if let Some(p) = s.current.and_then(|c| s.procs[c].as_ref()) {
            p.space.switch_to();
        }
    });
    let preempt = SCHED.with(|s| s.preempt);
    if preempt {
        irq::unmask(0);
        hcall::set_clockevent(TICK_NS);
    }
    #[cfg(target_arch = "x86")]
    // SAFETY: the process runs in its own address space, which maps the
    // kernel image and stack like every other; it comes back only through
    // the trap handlers, which resume the kernel at lguest_rt_user_resume
    // with the callee-saved registers and esp of this call restored.
    unsafe {
        lguest_rt_enter_user(&raw const regs)
    };
    #[cfg(not(target_arch = "x86"))]
    let _ = regs;
    if preempt {
        hcall::set_clockevent(0);
        irq::mask(0);
    }
    SCHED.with(|s| {
        s.running = false;
        s.current = None;
    });
    paging::switch_to_kernel();
}

/// The two words the host pushed above a frame from user mode: `esp`, `ss`.
fn user_words(f: &mut TrapFrame) -> *mut [u32; 2] {
    let above = (&raw mut *f).addr() + core::mem::size_of::<TrapFrame>();
    core::ptr::with_exposed_provenance_mut(above)
}

fn save(f: &mut TrapFrame, r: &mut UserRegs) {
    // SAFETY: `f` came from user mode (checked by every caller), so the
    // host pushed esp and ss right above it on the kernel stack; the
    // dispatcher exposed the frame's provenance.
    let [esp, _ss] = unsafe { user_words(f).read_volatile() };
    *r = UserRegs {
        eax: f.eax,
        ebx: f.ebx,
        ecx: f.ecx,
        edx: f.edx,
        esi: f.esi,
        edi: f.edi,
        ebp: f.ebp,
        eip: f.eip,
        esp,
        eflags: f.eflags,
    };
}

fn load(f: &mut TrapFrame, r: &UserRegs) {
    f.eax = r.eax;
    f.ebx = r.ebx;
    f.ecx = r.ecx;
    f.edx = r.edx;
    f.esi = r.esi;
    f.edi = r.edi;
    f.ebp = r.ebp;
    f.eip = r.eip;
    f.eflags = r.eflags | guest_abi::X86_EFLAGS_IF;
    f.cs = u32::from(USER_CS);
    // SAFETY: as in `save`: the frame came from user mode and goes back
    // there, so its iret pops these two words.
    unsafe { user_words(f).write_volatile([r.esp, u32::from(USER_DS)]) };
}

/// Switch from the current process (already saved or exited) to the next
/// runnable one after it, or back to the kernel if there is none.
fn schedule(s: &mut Sched, f: &mut TrapFrame) {
    let cur = s.current.unwrap_or(0);
    let next = (1..=MAX_PROCS)
        .map(|i| (cur + i) % MAX_PROCS)
        .find(|&i| s.procs[i].as_ref().is_some_and(|p| p.exit.is_none()));
    match next {
        Some(n) => {
            let Some(p) = s.procs[n].as_ref() else {
                unreachable!("found above");
            };
            load(f, &p.regs);
            if !p.space.is_current() {
                p.space.switch_to();
            }
            if Some(n) != s.current {
                s.switches += 1;
            }
            s.current = Some(n);
        }
        None => {
            #[cfg(target_arch = "x86")]
            {
                f.eip = hcall::phys(&raw const lguest_rt_user_resume);
            }
            f.cs = u32::from(KERNEL_CS);
            f.eflags = guest_abi::INITIAL_EFLAGS;
            s.current = None;
        }
    }
}

/// End the current process with `code` from a trap handler whose frame
/// came from user mode, and switch to the next one. Returns `false` (and
/// does nothing) if no process is current or the frame is the kernel's.
pub fn exit_current(f: &mut TrapFrame, code: u32) -> bool {
    if !f.from_user() {
        return false;
    }
    SCHED
        .try_with(|s| {
            let Some(p) = s.current.and_then(|c| s.procs[c].as_mut()) else {
                return false;
            };
            p.exit = Some(code);
            schedule(s, f);
            true
        })
        .unwrap_or(false)
}

fn syscall(f: &mut TrapFrame) {
    assert!(f.from_user(), "int $0x80 from the kernel");
    let nr = f.eax;
    let args = [f.ebx, f.ecx, f.edx, f.esi];
    let hook = SCHED.with(|s| {
        let cur = s.current.expect("a system call without a current process");
        let Some(p) = s.procs[cur].as_mut() else {
            unreachable!("the current process exists");
        };
        p.syscalls += 1;
        match nr {
            SYS_EXIT => {
                p.exit = Some(args[0]);
                schedule(s, f);
                None
            }
            SYS_YIELD => {
                f.eax = 0;
                save(f, &mut p.regs);
                schedule(s, f);
                None
            }
            _ => Some((cur, s.syscall_hook)),
        }
    });
    if let Some((pid, hook)) = hook {
        f.eax = hook.map_or(u32::MAX, |h| h(pid, nr, args));
    }
}

fn tick(f: &mut TrapFrame) {
    let preempted = SCHED.with(|s| {
        if !s.preempt || !s.running {
            return None;
        }
        hcall::set_clockevent(TICK_NS);
        if !f.from_user() {
            s.kernel_ticks += 1;
            return None;
        }
        let cur = s.current?;
        let p = s.procs[cur].as_mut()?;
        p.preemptions += 1;
        save(f, &mut p.regs);
        schedule(s, f);
        Some((cur, s.preempt_hook))
    });
    if let Some((pid, Some(h))) = preempted {
        h(pid);
    }
}

fn user_trap(f: &mut TrapFrame) {
    if !exit_current(f, EXIT_TRAP | f.vector) {
        panic!(
            "unhandled trap {} at {:#x} (err {:#x})",
            f.vector, f.eip, f.error_code
        );
    }
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    fn lguest_rt_enter_user(regs: *const UserRegs);
    static lguest_rt_user_resume: u8;
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    ".pushsection .text.lguest_rt_process,\"ax\",@progbits",
    // ---- lguest_rt_enter_user(regs) (C ABI) -----------------------------
    // Save the callee-saved registers and esp, build the 5-word iret frame
    // for CPL 3 (ss, esp, eflags, cs, eip) from *regs, load the user data
    // selector into ds/es (an iret to CPL 3 would null the kernel's DPL-1
    // selectors; 0x7b is flat and usable at CPL 1 too, so the handlers run
    // with it), load the general registers (eax last: it holds regs) and
    // leave through the runtime's paravirt iret, which also sets
    // irq_enabled from the frame's IF.
    ".globl lguest_rt_enter_user",
    "lguest_rt_enter_user:",
    "push ebp",
    "push ebx",
    "push esi",
    "push edi",
    "mov dword ptr [{saved}], esp",
    "mov eax, dword ptr [esp + 20]",
    "push {user_ds}",
    "push dword ptr [eax + 32]",
    "mov ecx, dword ptr [eax + 36]",
    "or ecx, {eflags_if}",
    "push ecx",
    "push {user_cs}",
    "push dword ptr [eax + 28]",
    "mov ecx, {user_ds}",
    "mov ds, cx",
    "mov es, cx",
    "mov ebx, dword ptr [eax + 4]",
    "mov ecx, dword ptr [eax + 8]",
    "mov edx, dword ptr [eax + 12]",
    "mov esi, dword ptr [eax + 16]",
    "mov edi, dword ptr [eax + 20]",
    "mov ebp, dword ptr [eax + 24]",
    "mov eax, dword ptr [eax]",
    "jmp lguest_rt_iret",
    // ---- lguest_rt_user_resume -------------------------------------------
    // The last process exited: the handler "returned" here at CPL 1 on the
    // SET_STACK stack. Restore the kernel data selectors and the stack and
    // callee-saved registers of lguest_rt_enter_user's caller.
    ".globl lguest_rt_user_resume",
    "lguest_rt_user_resume:",
    "mov eax, {kernel_ds}",
    "mov ds, ax",
    "mov es, ax",
    "mov esp, dword ptr [{saved}]",
    "pop edi",
    "pop esi",
    "pop ebx",
    "pop ebp",
    "ret",
    ".popsection",
    saved = sym SAVED_ESP,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    kernel_ds = const KERNEL_DS,
    eflags_if = const guest_abi::X86_EFLAGS_IF,
);
