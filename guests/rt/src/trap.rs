//! Trap and interrupt entry, handler dispatch and the paravirt `iret`.
//!
//! The runtime installs an interrupt gate (type 0xE, selector 0x61) for
//! every vector below [`RT_VECTORS`] except those the host ignores (2, 8, 15,
//! 0x1f). Each gate points at a small assembly stub that normalises the
//! frame and calls `trap_dispatch`, which runs the registered Rust
//! handler:
//!
//! - exceptions (vectors 0..32) without a handler panic with
//!   `unhandled trap <n> at <eip> (err <e>, cr2 <a>)`, which shuts the guest
//!   down;
//! - virtual irqs (vectors 0x20..0x40) without a handler are counted
//!   ([`spurious_irqs`]) and otherwise ignored.
//!
//! The system-call vector 0x80 has a stub too, but no gate until a guest
//! asks for one with [`install_syscall_gate`] (and a handler with
//! [`set_syscall_handler`]), e.g. to run code at CPL 3.
//!
//! Because delivery goes through interrupt gates, the host clears
//! `irq_enabled` before the handler runs; the paravirt `iret` restores it
//! from the saved `EFLAGS.IF`.

use core::sync::atomic::{AtomicU32, Ordering};

use guest_abi::irq::{
    IGNORED_IDT_VECTORS, SYSCALL_VECTOR, TRAPS_WITH_ERROR_CODE, trap, vector_irq,
};
use guest_abi::seg::{IDT_TYPE_INTERRUPT, idt_gate};
use guest_abi::{KERNEL_CS, LGUEST_IRQS, irq::FIRST_EXTERNAL_VECTOR};

use crate::sync::IrqCell;

/// Number of vectors the runtime has entry stubs for: the 32 exceptions and
/// the 32 virtual irqs.
pub const RT_VECTORS: u32 = FIRST_EXTERNAL_VECTOR + LGUEST_IRQS;

/// The stack at the time the Rust handler runs, lowest address first: the
/// registers saved by `pushad`, then vector and error code pushed by the
/// stub, then the frame the host pushed.
///
/// If the trap came from CPL 3 (`cs & 3 == 3`) the host also pushed the old
/// `esp` and `ss` above `eflags` ([`TrapFrame::user_stack`]); the runtime
/// itself never runs user code.
/// A handler may modify the frame (e.g. advance `eip` past a faulting
/// instruction); the stub restores the registers from it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapFrame {
    /// Saved `edi`.
    pub edi: u32,
    /// Saved `esi`.
    pub esi: u32,
    /// Saved `ebp`.
    pub ebp: u32,
    /// `esp` as `pushad` recorded it (points at `vector`); ignored on return.
    pub esp_dummy: u32,
    /// Saved `ebx`.
    pub ebx: u32,
    /// Saved `edx`.
    pub edx: u32,
    /// Saved `ecx`.
    pub ecx: u32,
    /// Saved `eax`.
    pub eax: u32,
    /// Vector number (0..64, or 0x80 for the system-call stub).
    pub vector: u32,
    /// Error code, or 0 for vectors that have none.
    pub error_code: u32,
    /// Interrupted instruction (or the one after, for traps like `int3`).
    pub eip: u32,
    /// Interrupted code segment (0x61 for the guest kernel).
    pub cs: u32,
    /// Interrupted `EFLAGS`; `IF` mirrors the virtual interrupt flag.
    pub eflags: u32,
}

const _: () = {
    assert!(core::mem::size_of::<TrapFrame>() == 13 * 4);
    assert!(core::mem::offset_of!(TrapFrame, vector) == 32);
    assert!(core::mem::offset_of!(TrapFrame, eip) == 40);
    assert!(core::mem::offset_of!(TrapFrame, eflags) == 48);
    // The stubs below hard-code which vectors carry an error code.
    assert!(matches!(TRAPS_WITH_ERROR_CODE, [8, 10, 11, 12, 13, 14, 17]));
};

impl TrapFrame {
    /// The virtual irq this frame is for, if it is an interrupt.
    pub fn irq(&self) -> Option<u32> {
        vector_irq(self.vector)
    }

    /// Whether the interrupted code ran in user mode (CPL 3).
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }

    /// The interrupted user stack `(esp, ss)` the host pushed above
    /// `eflags` when the trap came from CPL 3, or `None` for a trap from the
    /// guest kernel.
    ///
    /// # Safety
    ///
    /// `self` must be the frame the runtime handed to a [`TrapHandler`]
    /// (on the stack the host built it on), not a copy: the two words are
    /// read from just above it.
    pub unsafe fn user_stack(&self) -> Option<(u32, u32)> {
        if !self.from_user() {
            return None;
        }
        let above = (&raw const *self).addr() + core::mem::size_of::<Self>();
        let p = core::ptr::with_exposed_provenance::<[u32; 2]>(above);
        // SAFETY: per the caller's contract this frame lies on the kernel
        // stack where the host pushed ss and esp right above eflags; the
        // dispatcher exposed the provenance of the whole frame region.
        let [esp, ss] = unsafe { p.read_volatile() };
        Some((esp, ss))
    }
}

/// A Rust trap/interrupt handler.
pub type TrapHandler = fn(&mut TrapFrame);

static HANDLERS: IrqCell<[Option<TrapHandler>; RT_VECTORS as usize]> =
    IrqCell::new([None; RT_VECTORS as usize]);

static SPURIOUS: AtomicU32 = AtomicU32::new(0);

static SYSCALL_HANDLER: IrqCell<Option<TrapHandler>> = IrqCell::new(None);

/// Install (or with `None` remove) the handler for the system-call vector
/// [`SYSCALL_VECTOR`] (0x80); returns the previous one. The gate itself is
/// loaded with [`install_syscall_gate`].
pub fn set_syscall_handler(handler: Option<TrapHandler>) -> Option<TrapHandler> {
    SYSCALL_HANDLER.with(|h| core::mem::replace(h, handler))
}

/// Point IDT vector [`SYSCALL_VECTOR`] (0x80) at the runtime's system-call
/// stub with the given gate type and DPL (3 lets user code `int $0x80`).
/// Without a [`set_syscall_handler`] handler, `int $0x80` panics like an
/// unhandled exception.
pub fn install_syscall_gate(gate_type: u32, dpl: u8) {
    let (low, high) = idt_gate(syscall_stub_address(), KERNEL_CS, gate_type, dpl);
    // SAFETY: the stub handles the host's frame and returns via the
    // paravirt iret.
    unsafe { crate::hcall::load_idt_entry(SYSCALL_VECTOR, low, high) }
}

/// Install (or with `None` remove) the handler for `vector`; returns the
/// previous one.
///
/// # Panics
///
/// If `vector >= RT_VECTORS`.
pub fn set_handler(vector: u32, handler: Option<TrapHandler>) -> Option<TrapHandler> {
    assert!(vector < RT_VECTORS, "vector {vector} has no runtime stub");
    HANDLERS.with(|h| core::mem::replace(&mut h[vector as usize], handler))
}

/// Install (or remove) the handler for virtual irq `irq` (vector 0x20 + irq).
/// Unblock the irq with [`irq::unmask`](crate::irq::unmask) to receive it.
///
/// # Panics
///
/// If `irq >= 32`.
pub fn set_irq_handler(irq: u32, handler: Option<TrapHandler>) -> Option<TrapHandler> {
    assert!(irq < LGUEST_IRQS, "irq {irq} out of range");
    set_handler(FIRST_EXTERNAL_VECTOR + irq, handler)
}

/// How many virtual irqs arrived without a handler.
pub fn spurious_irqs() -> u32 {
    SPURIOUS.load(Ordering::Relaxed)
}

/// Called by the common stub with the frame on the stack.
///
/// # Safety
///
/// `frame` points at the `TrapFrame` the stub built; nothing else refers to
/// it while the handler runs.
#[cfg_attr(not(target_arch = "x86"), allow(dead_code))]
unsafe extern "C" fn trap_dispatch(frame: *mut TrapFrame) {
    // The host-pushed words above the frame (user esp/ss) are reached by
    // address in `TrapFrame::user_stack`.
    let _ = frame.expose_provenance();
    // SAFETY: the caller's contract.
    let frame = unsafe { &mut *frame };
    let handler = if frame.vector == SYSCALL_VECTOR {
        SYSCALL_HANDLER.try_with(|h| *h)
    } else {
        HANDLERS.try_with(|h| h.get(frame.vector as usize).copied().flatten())
    };
    match handler.flatten() {
        Some(h) => h(frame),
        None if frame.irq().is_some() => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        None => panic!(
            "unhandled trap {} at {:#x} (err {:#x}, cr2 {:#x})",
            frame.vector,
            frame.eip,
            frame.error_code,
            crate::irq::cr2()
        ),
    }
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    /// Addresses of the 64 entry stubs, indexed by vector.
    static lguest_rt_stub_table: [u32; RT_VECTORS as usize];
    /// First byte of the no-interrupt window around the paravirt `iret`.
    static lguest_rt_noirq_start: u8;
    /// First byte after the window.
    static lguest_rt_noirq_end: u8;
    /// The paravirt `iret`.
    static lguest_rt_iret: u8;
    /// Entry stub of the system-call vector 0x80.
    static lguest_rt_stub_syscall: u8;
}

/// Address of the entry stub for the system-call vector 0x80.
pub fn syscall_stub_address() -> u32 {
    #[cfg(target_arch = "x86")]
    {
        crate::hcall::phys(&raw const lguest_rt_stub_syscall)
    }
    #[cfg(not(target_arch = "x86"))]
    0
}

/// Address of the entry stub for `vector`.
pub fn stub_address(vector: u32) -> Option<u32> {
    if vector >= RT_VECTORS {
        return None;
    }
    #[cfg(target_arch = "x86")]
    {
        // SAFETY: the table is immutable data emitted by the asm below.
        Some(unsafe { lguest_rt_stub_table[vector as usize] })
    }
    #[cfg(not(target_arch = "x86"))]
    None
}

/// `[noirq_start, noirq_end)`: where the host must not deliver interrupts.
pub fn noirq_window() -> (u32, u32) {
    #[cfg(target_arch = "x86")]
    {
        (
            crate::hcall::phys(&raw const lguest_rt_noirq_start),
            crate::hcall::phys(&raw const lguest_rt_noirq_end),
        )
    }
    #[cfg(not(target_arch = "x86"))]
    (0, 0)
}

/// Makes hypercall `nr` (no arguments) from inside the no-interrupt window
/// (`[noirq_start, noirq_end)`), where the host must not deliver an
/// interrupt even if one is pending and interrupts are on: for tests of that
/// rule.
pub fn noirq_hypercall(nr: u32) {
    #[cfg(target_arch = "x86")]
    // SAFETY: `lguest_rt_noirq_hcall` is `int 0x1f; ret`: a hypercall with
    // eax = nr and whatever the other registers hold (the calls used with it
    // take no arguments), which the host answers like any other; eax..edx are
    // declared clobbered as for every hypercall. Not `nomem`: the host may
    // write guest memory.
    unsafe {
        core::arch::asm!(
            "call lguest_rt_noirq_hcall",
            inout("eax") nr => _,
            out("ecx") _,
            out("edx") _,
        );
    }
    #[cfg(not(target_arch = "x86"))]
    {
        let _ = nr;
        unimplemented!("lguest hypercalls exist only on 32-bit x86");
    }
}

/// Address of the paravirt `iret` (for hand-written entry code: jump there
/// with `EIP, CS, EFLAGS` on top of the stack).
pub fn iret_address() -> u32 {
    #[cfg(target_arch = "x86")]
    {
        crate::hcall::phys(&raw const lguest_rt_iret)
    }
    #[cfg(not(target_arch = "x86"))]
    0
}

/// Point IDT vector `vector` at the runtime's stub with the given gate type
/// (`IDT_TYPE_INTERRUPT` or `IDT_TYPE_TRAP`) and DPL.
///
/// # Panics
///
/// If `vector >= RT_VECTORS`.
pub fn install_gate(vector: u32, gate_type: u32, dpl: u8) {
    let Some(addr) = stub_address(vector) else {
        panic!("vector {vector} has no runtime stub");
    };
    let (low, high) = idt_gate(addr, KERNEL_CS, gate_type, dpl);
    // SAFETY: the stub handles the host's frame and returns via the
    // paravirt iret.
    unsafe { crate::hcall::load_idt_entry(vector, low, high) }
}

/// Install the default gates (all runtime vectors except the ignored ones;
/// DPL 3 for `int3` and `into` as Linux does, else 0).
pub(crate) fn install_idt() {
    for v in 0..RT_VECTORS {
        if IGNORED_IDT_VECTORS.contains(&v) {
            continue;
        }
        let dpl = if v == trap::BP || v == trap::OF { 3 } else { 0 };
        install_gate(v, IDT_TYPE_INTERRUPT, dpl);
    }
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    // ---- Per-vector entry stubs -------------------------------------------
    // The host enters a gate the way the CPU would: on the current guest
    // stack (or, from CPL 3, on the SET_STACK stack after pushing the user
    // SS and ESP) it pushes EFLAGS, CS, EIP and, for the
    // vectors 8, 10-14 and 17 only, an error code. Each stub pushes a dummy
    // 0 where there is no error code, so all frames have the same shape,
    // then its vector number, and joins the common path. Stubs are 8-byte
    // aligned; their addresses are collected in `lguest_rt_stub_table`.
    ".pushsection .text.lguest_rt_traps,\"ax\",@progbits",
    ".macro LGUEST_RT_STUB vec, err",
    ".p2align 3",
    "lguest_rt_stub_\\vec:",
    ".if \\err == 0",
    "push 0",
    ".endif",
    "push \\vec",
    "jmp lguest_rt_trap_common",
    ".endm",
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63",
    "LGUEST_RT_STUB \\v, 0",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17",
    "LGUEST_RT_STUB \\v, 1",
    ".endr",
    // The system-call vector: same shape, no error code.
    ".p2align 3",
    ".globl lguest_rt_stub_syscall",
    "lguest_rt_stub_syscall:",
    "push 0",
    "push {syscall_vector}",
    "jmp lguest_rt_trap_common",
    // ---- Common path -------------------------------------------------------
    // Stack now (low to high): vector, error code, EIP, CS, EFLAGS. pushad
    // adds edi..eax below, completing a `TrapFrame`. Rust code requires
    // DF = 0. ebx is callee-saved in the C calling convention, so it keeps
    // the frame address across the call while esp is aligned down to 16
    // bytes (the trap may have hit at any alignment) and the frame pointer
    // is passed as the only, stack-passed argument. Afterwards popad
    // reloads the (possibly edited) registers, the vector and error code
    // are dropped, and we leave through the paravirt iret.
    ".p2align 4",
    "lguest_rt_trap_common:",
    "pushad",
    "cld",
    "mov ebx, esp",
    "and esp, -16",
    "sub esp, 12",
    "push ebx",
    "call {dispatch}",
    "mov esp, ebx",
    "popad",
    "add esp, 8",
    "jmp lguest_rt_iret",
    // ---- Paravirt iret -----------------------------------------------------
    // Stack: EIP, CS, EFLAGS. A real iret at CPL 1 cannot change the
    // interrupt flag, so first copy the IF bit of the EFLAGS we return to
    // into lguest_data.irq_enabled (offset 0). From that store on, the host
    // could deliver an irq and push a new frame while we are half-way out,
    // so the host must not deliver anything while noirq_start <= eip <
    // noirq_end (registered in lguest_data at INIT). eax is the scratch
    // register: saved first, restored inside the window. The ss: override
    // mirrors Linux (ss is always the kernel data segment; ds is too for us).
    ".globl lguest_rt_iret",
    "lguest_rt_iret:",
    "push eax",
    "mov eax, dword ptr [esp + 12]",
    "and eax, {eflags_if}",
    ".globl lguest_rt_noirq_start",
    "lguest_rt_noirq_start:",
    "mov dword ptr ss:[{lguest_data}], eax",
    "pop eax",
    "iretd",
    // `noirq_hypercall`: a hypercall made from inside the window, so that
    // tests can check the host delivers nothing there (its return EIP, the
    // `ret`, lies inside the window too). Never on the iret path.
    ".globl lguest_rt_noirq_hcall",
    "lguest_rt_noirq_hcall:",
    "int 0x1f",
    "ret",
    ".globl lguest_rt_noirq_end",
    "lguest_rt_noirq_end:",
    ".popsection",
    // ---- Stub address table --------------------------------------------------
    ".pushsection .rodata.lguest_rt_stub_table,\"a\",@progbits",
    ".p2align 2",
    ".globl lguest_rt_stub_table",
    "lguest_rt_stub_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63",
    ".long lguest_rt_stub_\\v",
    ".endr",
    ".popsection",
    dispatch = sym trap_dispatch,
    lguest_data = sym crate::irq::LGUEST_DATA,
    eflags_if = const guest_abi::X86_EFLAGS_IF,
    syscall_vector = const SYSCALL_VECTOR,
);
