//! Trap and interrupt entry.
//!
//! All 256 vectors enter through 16-byte stubs laid out back to back in one
//! naked function, [`trap_stubs`]: the stub pushes a zero error code when the
//! CPU does not push one, pushes its vector number, and jumps to
//! [`trap_common`]. That saves every general-purpose register so the stack
//! holds a complete [`TrapFrame`], calls [`dispatch`] with a pointer to it, then
//! restores the registers, drops vector and error code, and `iretq`s.
//!
//! [`dispatch`] is the one place every trap goes through, in one direction:
//! a trap from the hypervisor itself goes to the host's handlers
//! (`interrupts::handle_host`: device interrupts, fatal exceptions, a fault
//! while entering a guest); a trap from a guest (non-zero CPL in the saved CS)
//! first has its host interrupt serviced (if it is one), then goes to the
//! guest-exit handler (`lguest::switch::guest_exit`), which either returns to
//! the run loop for good or asks to go straight back into the guest. The
//! guest side never calls into the host's interrupt handling.
//!
//! Returning into a guest uses its own copy of the restore sequence
//! (`rv_guest_return_begin`..`rv_guest_return_end`): a fault there — the
//! `iretq` refusing the guest's frame — is the guest's fault, like a fault in
//! the world switch's entry sequence, never the host's.
//!
//! Why this shape: one fixed stride means the IDT can compute each stub's
//! address (`base + 16 * vector`) without 256 symbols, and a single common path
//! keeps the register save/restore in one place. The hypervisor is built
//! soft-float and never touches SSE/x87 state, so no FPU state is saved here.
//! In 64-bit mode the CPU aligns RSP to 16 before pushing the interrupt frame;
//! frame (5 words) + error code + vector + 15 registers = 22 words, so RSP is
//! still 16-byte aligned at the `call`, as the SysV ABI requires.

use core::arch::naked_asm;

use rustyvisor::lguest::vcpu::TrapOwner;

/// The register state saved on every trap, lowest address first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(size_of::<TrapFrame>() == 22 * 8);

/// Bytes per entry stub.
pub const STUB_SIZE: u64 = 16;

/// Address of the entry stub of `vector`.
pub fn stub_address(vector: u8) -> u64 {
    trap_stubs as *const () as u64 + STUB_SIZE * u64::from(vector)
}

/// 256 entry stubs of [`STUB_SIZE`] bytes each. Never called directly.
///
/// Vectors 8, 10–14, 17, 21, 29 and 30 get an error code from the CPU; all
/// others push a zero so the frame layout is the same for every vector.
#[unsafe(naked)]
unsafe extern "C" fn trap_stubs() {
    naked_asm!(
        ".set .Lrv_vec, 0",
        ".rept 256",
        "1:",
        ".if (.Lrv_vec == 8) || ((.Lrv_vec >= 10) && (.Lrv_vec <= 14)) || (.Lrv_vec == 17) || (.Lrv_vec == 21) || (.Lrv_vec == 29) || (.Lrv_vec == 30)",
        ".else",
        "pushq $0",
        ".endif",
        "pushq $.Lrv_vec",
        "jmp {common}",
        ".skip 16 - (. - 1b), 0xcc",
        ".set .Lrv_vec, .Lrv_vec + 1",
        ".endr",
        common = sym trap_common,
        options(att_syntax)
    )
}

/// The end of every trap: restore the 15 registers [`trap_common`] saved,
/// drop vector and error code, `iretq`. One text, used twice: for returns
/// into the hypervisor and, inside the entry-fault window, into a guest.
macro_rules! restore_and_iretq {
    () => {
        concat!(
            "pop r15\n",
            "pop r14\n",
            "pop r13\n",
            "pop r12\n",
            "pop r11\n",
            "pop r10\n",
            "pop r9\n",
            "pop r8\n",
            "pop rbp\n",
            "pop rdi\n",
            "pop rsi\n",
            "pop rdx\n",
            "pop rcx\n",
            "pop rbx\n",
            "pop rax\n",
            "add rsp, 16\n",
            "iretq",
        )
    };
}

/// Saves the registers, calls [`dispatch`], restores them and returns from
/// the interrupt.
#[unsafe(naked)]
pub(crate) unsafe extern "C" fn trap_common() {
    naked_asm!(
        "push rax",
        "push rbx",
        "push rcx",
        "push rdx",
        "push rsi",
        "push rdi",
        "push rbp",
        "push r8",
        "push r9",
        "push r10",
        "push r11",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        // The host's flags whatever the guest left: DF cleared here. AC may
        // still be the guest's; it has no effect at CPL 0 unless CR4.SMAP
        // is on, which the host never sets, so no `clac` (an #UD on CPUs
        // without SMAP). Whoever turns SMAP on must add it here.
        "cld",
        "mov rdi, rsp",
        "call {dispatch}",
        "test al, al",
        "jnz 2f",
        restore_and_iretq!(),
        // Back into the guest after an exit handled on the trap stack: the
        // same restore, inside the window that blames a fault on the guest.
        "2:",
        ".globl rv_guest_return_begin",
        "rv_guest_return_begin:",
        restore_and_iretq!(),
        ".globl rv_guest_return_end",
        "rv_guest_return_end:",
        "ud2",
        dispatch = sym dispatch,
    )
}

/// Rust side of every trap. `frame` points at the saved state on the stack.
/// Returns `true` to return into a guest (through the guest-return window),
/// `false` to return into the hypervisor.
extern "C" fn dispatch(frame: &mut TrapFrame) -> bool {
    if frame.cs & 3 == 0 {
        crate::kernel::interrupts::handle_host(frame);
        return false;
    }
    let vector = u32::try_from(frame.vector).unwrap_or(u32::MAX);
    if TrapOwner::of(vector) == TrapOwner::HostIrq {
        crate::kernel::interrupts::service_irq(frame.vector);
    }
    crate::kernel::lguest::switch::guest_exit(frame)
}
