//! The world switch: entering a 32-bit guest and coming back on its next trap.
//!
//! A guest kernel runs at CPL 1 (user code at CPL 3) in compatibility mode,
//! with the hypervisor still mapped above 4 GiB in the same address space, so
//! no CR3 switch happens on a hypercall or trap.
//!
//! Entry ([`enter_guest`], a naked function): save the host's callee-saved
//! registers on the current (launcher task) stack and remember that stack
//! pointer; build an `iretq` frame from the guest's saved registers; load the
//! guest's data segment selectors and general registers; zero r8–r15 (the guest
//! cannot see them in compatibility mode, but host pointers should not linger);
//! `iretq` to the guest.
//!
//! Exit: every trap or interrupt taken while the guest runs arrives on the TSS
//! RSP0 stack (a per-CPU "guest trap stack"), goes through the entry stubs and
//! the one dispatcher (`arch::trap`), which services a host interrupt itself
//! and hands the exit to [`guest_exit`]. That copies the guest state into the
//! guest's register block (the one copy of the guest's registers: [`Regs`]),
//! then either
//!
//! * **handles it where it landed** (the run loop's [`FastHandler`], when
//!   `fastpath=on`): the exit needs nothing of the launcher, so the handler
//!   finishes it and prepares the next entry on the trap stack, and the
//!   registers go back into the hardware frame, which the dispatcher returns
//!   through `iretq` into the guest; or
//! * **goes back to the run loop** ([`exit_to_host`]): restore the saved host
//!   stack pointer and callee-saved registers and return from `enter_guest`
//!   with the trap number. The trap stack is simply abandoned; the next entry
//!   starts at its top again.
//!
//! Loading a bad selector or `iretq`-ing to a bad frame faults at CPL 0 inside
//! the entry sequence (`rv_entry_fault_begin`..`rv_entry_fault_end`, and the
//! dispatcher's return-to-guest sequence `rv_guest_return_begin`..`_end`); such a fault is the guest's
//! fault, reported as trap 256 (lguest's "faulted inside the Switcher")
//! instead of a host crash.

use core::arch::naked_asm;
use core::cell::UnsafeCell;
use core::mem::offset_of;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_abi::data::LguestData;
use guest_abi::hcall::{HCALL_STATUS_EMPTY, LHCALL_RING_SIZE};
use guest_abi::irq::X86_EFLAGS_IF;
use guest_abi::seg::{IDT_TYPE_INTERRUPT, KERNEL_CS};
use rustyvisor::lguest::vcpu::{
    EFLAGS_GUEST_MASK, EFLAGS_NT, EFLAGS_RF, EFLAGS_TF, EFLAGS_VM, ENTRY_FAULT_TRAPNUM, IdtEntry,
    Regs, StubGate, sanitize_eflags,
};

use crate::kernel::arch::cpu;
use crate::kernel::arch::trap::TrapFrame;

/// Handles a guest exit on the trap stack (interrupts off), in two calls at
/// most. First with `full == false`: only the trap number, error code, frame
/// registers (EIP, CS, EFLAGS, ESP, SS), EAX and data segment selectors are
/// in the guest's [`Regs`], and the handler may finish the exit only by
/// changing frame registers. If it declines, every register is saved and it
/// is called again with `full == true`, when it may change any of them.
/// Returns `true` if the guest may be entered again right away with those
/// registers (same GDT, same data segment selectors), `false` to go back to
/// the run loop (after the `full` call).
pub type FastHandler = fn(ctx: *mut (), exit: &ExitInfo, full: bool) -> bool;

/// The hypercall stub's fast shadow-paging call `nr` with arguments
/// `a1`..`a4` (interrupts off, on the trap stack, from the state the stub was
/// armed with): done in the vCPU, with any TLB invalidation it owes; the
/// result is the root to load (a `NEW_PGTABLE`), 1 (nothing to load), or 0
/// (nothing changed: the full path runs).
/// C ABI: the stub calls it directly (`switch` and `ctx` read from the
/// switch state).
pub type SwitchHandler =
    extern "C" fn(ctx: *mut (), nr: u32, a1: u32, a2: u32, a3: u32, a4: u32) -> u64;

/// What the run loop lets the trap path do on its behalf, and its context.
#[derive(Clone, Copy)]
pub struct Handlers {
    /// Every exit first goes here (see [`FastHandler`]).
    pub exit: FastHandler,
    /// The hypercall stub's fast switch of shadows, if any.
    pub switch: Option<SwitchHandler>,
    /// The hypercall stub's `FLUSH_ASYNC` lane, if any: called like
    /// `switch`, with the guest's data selectors (ds, es, fs, gs) as
    /// `a1`..`a4`.
    pub flush: Option<SwitchHandler>,
    /// Passed back to all three (and the page-fault stub's fill, which the run
    /// loop's module provides directly: `pf_fill_lane`).
    pub ctx: *mut (),
}

/// Per-CPU switch state (only the boot CPU runs guests for now).
#[repr(C)]
struct SwitchState {
    /// Host RSP right after saving callee-saved registers in `enter_guest`.
    host_rsp: u64,
    /// The register block of the guest being run.
    regs: *mut Regs,
    /// Error code and CR2 of the last exit.
    errcode: u64,
    cr2: u64,
    /// The run loop's exit handler for this entry, its fast switch, and
    /// their context.
    fast: Option<FastHandler>,
    switch: Option<SwitchHandler>,
    flush: Option<SwitchHandler>,
    ctx: *mut (),
}

/// `repr(transparent)`: the hypercall stub reads `SwitchState`'s fields at
/// their offsets from the static's address.
#[repr(transparent)]
struct SwitchCell(UnsafeCell<SwitchState>);

// SAFETY: only the boot CPU touches it, with interrupts off (in the trap path)
// or before entering the guest (in `run`), never concurrently.
unsafe impl Sync for SwitchCell {}

static STATE: SwitchCell = SwitchCell(UnsafeCell::new(SwitchState {
    host_rsp: 0,
    regs: core::ptr::null_mut(),
    errcode: 0,
    cr2: 0,
    fast: None,
    switch: None,
    flush: None,
    ctx: core::ptr::null_mut(),
}));

static EXITS: AtomicU64 = AtomicU64::new(0);

static FAST_EXITS: AtomicU64 = AtomicU64::new(0);

/// What the hypercall and reflection stubs read, in one block the asm
/// addresses by field offset: written only by [`arm_stubs`] before the guest
/// runs (interrupts off), read (and the counters written) only by the stubs
/// while it runs, on this one CPU.
#[repr(C)]
struct Armed {
    /// Bit n: the hypercall stub may answer call n now (0: it answers
    /// nothing).
    trivial: u32,
    /// The vCPU's own pending irqs.
    vcpu_irqs: u32,
    /// The CS and SS the guest was last entered with (validated then): the
    /// hypercall stub answers only from exactly those.
    cs: u32,
    ss: u32,
    /// Host address of `lguest_data.hcall_status[cursor]`.
    ring: u64,
    /// Host address of the guest's interrupt-raised pending irqs (a zero
    /// word while disarmed).
    irqs: u64,
    /// Host address of guest-physical 0.
    mem_base: u64,
    /// Host address of `lguest_data.irq_enabled`.
    irq_enabled: u64,
    /// The frame bound `[0, limit)`, the kernel-mode stack segment and its
    /// base (see `StubView`).
    limit: u32,
    kss: u32,
    kss_base: u32,
    _pad: u32,
    /// Host address of the user-mode trap frame; the handler's ESP and SS
    /// after a user-mode trap (zero-extended: stored as they are).
    user_frame: u64,
    user_esp: u64,
    ss1: u64,
    /// Per `STUB_VECTORS`: the handler's EIP (zero-extended) and the
    /// `StubGate` bits 32.. (`FROM_KERNEL` = 1, `FROM_USER` = 2,
    /// `INTERRUPT` = 4); 0 = the full path decides.
    gate_eip: [u64; 2],
    gate_bits: [u32; 2],
    /// The lane (irq delivery after a trivial hypercall): non-zero when it
    /// may run; host addresses of `lguest_data`, of the vCPU's pending irq
    /// word and of its irq gates (`IdtEntry` pairs from vector 32); the
    /// no-irq window.
    lane_ok: u32,
    noirq_start: u32,
    noirq_end: u32,
    _pad2: u32,
    ld: u64,
    pending: u64,
    irq_gates: u64,
    /// The drain (no-op calls taken off the async ring): non-zero when it
    /// may run; host addresses of `hcall_status[0]`, of `hcalls[0]` and of
    /// the vCPU's ring cursor.
    drain_ok: u64,
    /// Non-zero: `NEW_PGTABLE` may take the fast switch, and a #PF the
    /// page-fault stub's fill (a paging guest).
    switch_ok: u64,
    status_base: u64,
    hcalls_base: u64,
    cursor: u64,
    /// Calls the hypercall stub answered; traps the reflection stubs
    /// reflected.
    answered: u64,
    reflected: u64,
    /// Calls the hypercall stub's lane finished.
    lane_answered: u64,
}

struct ArmedCell(UnsafeCell<Armed>);

// SAFETY: only the boot CPU touches it: `arm_stubs` with interrupts off and
// no guest running, the stubs while a guest runs (interrupts off), so
// accesses never overlap.
unsafe impl Sync for ArmedCell {}

/// The zero word `Armed::irqs` points at while disarmed.
static NO_IRQS: AtomicU32 = AtomicU32::new(0);

static ARMED: ArmedCell = ArmedCell(UnsafeCell::new(Armed {
    trivial: 0,
    vcpu_irqs: 0,
    cs: 0,
    ss: 0,
    ring: 0,
    irqs: 0,
    mem_base: 0,
    irq_enabled: 0,
    limit: 0,
    kss: 0,
    kss_base: 0,
    _pad: 0,
    user_frame: 0,
    user_esp: 0,
    ss1: 0,
    gate_eip: [0; 2],
    gate_bits: [0; 2],
    lane_ok: 0,
    noirq_start: 0,
    noirq_end: 0,
    _pad2: 0,
    ld: 0,
    pending: 0,
    irq_gates: 0,
    drain_ok: 0,
    switch_ok: 0,
    status_base: 0,
    hcalls_base: 0,
    cursor: 0,
    answered: 0,
    reflected: 0,
    lane_answered: 0,
}));

/// What the last exit was, besides its trap number.
#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    /// Trap number (0–255), or [`ENTRY_FAULT_TRAPNUM`].
    pub trapnum: u32,
    /// Error code (0 when the vector has none).
    pub errcode: u32,
    /// CR2 at a page fault.
    pub cr2: u32,
}

/// Runs the guest whose registers are `*regs` until an exit that `fast`
/// (if any) does not finish on the trap stack.
///
/// The caller has loaded the guest's address space (CR3), its GDT entries and
/// the TSS RSP0 trap stack, and keeps interrupts enabled: a host interrupt
/// while the guest runs is serviced and either handled by `fast` or ends this
/// call.
///
/// # Safety
///
/// `regs` must be valid for reads and writes until this returns, and the
/// caller must not touch `*regs` (or `fast`'s context) otherwise meanwhile:
/// the trap path writes it, and `fast` gets `ctx` back, on this CPU.
pub unsafe fn run(regs: *mut Regs, fast: Option<Handlers>) -> ExitInfo {
    let state = STATE.0.get();
    // SAFETY: single CPU; interrupts are disabled from here until the `iretq`
    // inside `enter_guest` (which turns them on with the guest's IF), so the
    // trap path cannot observe a half-written state. `regs` is valid per the
    // caller's contract.
    let trapnum = unsafe {
        // The guest never runs with IOPL > 0, NT, VM or RF, and always with
        // IF (its own interrupt flag is virtual, in lguest_data.irq_enabled).
        (*regs).eflags = sanitize_eflags((*regs).eflags);
        x86_64::instructions::interrupts::disable();
        (*state).regs = regs;
        (*state).fast = fast.map(|h| h.exit);
        (*state).switch = fast.and_then(|h| h.switch);
        (*state).flush = fast.and_then(|h| h.flush);
        (*state).ctx = fast.map_or(core::ptr::null_mut(), |h| h.ctx);
        enter_guest(state.cast::<u64>())
    };
    arm_stubs(None);
    // SAFETY: the trap path wrote these before returning here; we are back in
    // host context on the only CPU.
    let (errcode, cr2) = unsafe {
        (*state).fast = None;
        (*state).switch = None;
        (*state).flush = None;
        ((*state).errcode, (*state).cr2)
    };
    x86_64::instructions::interrupts::enable();
    ExitInfo {
        trapnum: trapnum as u32,
        errcode: errcode as u32,
        cr2: cr2 as u32,
    }
}

/// Number of guest exits so far, and how many of them were handled where
/// they landed (by the hypercall stub or on the trap stack) and went straight
/// back into the guest.
pub fn exits() -> (u64, u64) {
    let a = ARMED.0.get();
    // SAFETY: plain reads of two counters from host context; the stubs
    // that write them run only while a guest runs on this CPU, not now.
    let stub = unsafe {
        (*a).answered
            .wrapping_add((*a).reflected)
            .wrapping_add((*a).lane_answered)
    };
    (
        EXITS.load(Ordering::Relaxed) + stub,
        FAST_EXITS.load(Ordering::Relaxed) + stub,
    )
}

/// What the stubs may do for the guest about to run (see
/// [`rustyvisor::lguest::vcpu::StubView`]), with host addresses for its
/// guest-physical ones.
#[derive(Debug, Clone, Copy)]
pub struct StubArm {
    /// Bit n: call n is a no-op now.
    pub trivial: u32,
    /// Host address of `lguest_data.hcall_status[cursor]` (inside guest RAM).
    pub ring_status: u64,
    /// The guest's interrupt-raised pending irqs: owned by the guest's
    /// shared state, which outlives every entry into it (the stubs read it
    /// only while that guest runs).
    pub irqs: *const AtomicU32,
    /// The vCPU's pending irqs.
    pub vcpu_irqs: u32,
    /// The validated CS and SS the guest is about to be entered with.
    pub cs: u32,
    /// See `cs`.
    pub ss: u32,
    /// Whether and where the hypercall stub may drain no-op calls from the
    /// async ring (`None`: never).
    pub drain: Option<DrainArm>,
    /// Whether `NEW_PGTABLE` may go to the run loop's fast switch (the
    /// guest runs on shadow page tables).
    pub switch: bool,
    /// What the reflection stubs may do (`None`: nothing).
    pub reflect: Option<ReflectArm>,
}

/// What the hypercall stub's drain needs (see `Vcpu::stub_drain`, whose
/// steps it follows).
#[derive(Debug, Clone, Copy)]
pub struct DrainArm {
    /// Host address of `lguest_data.hcall_status[0]` (the 64 bytes inside
    /// guest RAM).
    pub status_base: u64,
    /// Host address of `lguest_data.hcalls[0]` (the 64 entries inside
    /// guest RAM).
    pub hcalls_base: u64,
    /// The vCPU's ring cursor (`StubPtrs::ring_cursor`).
    pub cursor: *mut usize,
}

/// The reflection stubs' part of a [`StubArm`]: the view's fields, with
/// host addresses.
#[derive(Debug, Clone, Copy)]
pub struct ReflectArm {
    /// Host address of guest-physical 0; guest-physical `[0, limit)` is
    /// host `[mem_base, mem_base + limit)`.
    pub mem_base: u64,
    /// See `mem_base`.
    pub limit: u32,
    /// Host address of `lguest_data.irq_enabled` (inside guest RAM).
    pub irq_enabled: u64,
    /// `StubView::kss`, `kss_base`.
    pub kss: u32,
    /// See `kss`.
    pub kss_base: u32,
    /// Host address of the user-mode frame (20 bytes inside guest RAM when
    /// `ss1 != 0`).
    pub user_frame: u64,
    /// `StubView::user_esp`, `ss1`.
    pub user_esp: u32,
    /// See `user_esp`.
    pub ss1: u32,
    /// `StubView::gates`.
    pub gates: [StubGate; 2],
    /// The lane's part, if it may run: the guest is running on the guest
    /// kernel's CS with the validated stack segment `kss`.
    pub lane: Option<LaneArm>,
}

/// What the hypercall stub's lane needs (see `Vcpu::stub_deliver`, whose
/// steps it follows).
#[derive(Debug, Clone, Copy)]
pub struct LaneArm {
    /// Host address of `lguest_data` (all of it inside guest RAM).
    pub ld: u64,
    /// The vCPU's pending irq word and irq gates (`Vcpu::stub_ptrs`).
    pub pending: *mut u32,
    /// See `pending`.
    pub irq_gates: *const IdtEntry,
    /// `Vcpu::noirq_window`.
    pub noirq: (u32, u32),
}

/// Lets the stubs answer for the guest about to run (`Some`), or sends
/// every exit the full way (`None`). The world switch disarms them whenever
/// it returns to the run loop, so they never act for a guest that is not
/// running. Call with no guest running on this CPU.
pub fn arm_stubs(arm: Option<StubArm>) {
    let a = ARMED.0.get();
    // SAFETY: see `ArmedCell`: no stub runs while this writes (no guest is
    // running on this CPU).
    unsafe {
        // First off, then the addresses, then on: a half-written block is
        // never acted upon.
        (*a).trivial = 0;
        (*a).gate_bits = [0; 2];
        (*a).lane_ok = 0;
        (*a).drain_ok = 0;
        (*a).switch_ok = 0;
        let Some(arm) = arm else {
            (*a).irqs = NO_IRQS.as_ptr() as u64;
            return;
        };
        (*a).vcpu_irqs = arm.vcpu_irqs;
        (*a).cs = arm.cs;
        (*a).ss = arm.ss;
        (*a).ring = arm.ring_status;
        (*a).irqs = arm.irqs as u64;
        (*a).trivial = arm.trivial;
        (*a).switch_ok = u64::from(arm.switch);
        if let Some(d) = arm.drain.filter(|d| !d.cursor.is_null()) {
            (*a).status_base = d.status_base;
            (*a).hcalls_base = d.hcalls_base;
            (*a).cursor = d.cursor as u64;
            (*a).drain_ok = 1;
        }
        let Some(r) = arm.reflect else {
            return;
        };
        (*a).mem_base = r.mem_base;
        (*a).irq_enabled = r.irq_enabled;
        (*a).limit = r.limit;
        (*a).kss = r.kss;
        (*a).kss_base = r.kss_base;
        (*a).user_frame = r.user_frame;
        (*a).user_esp = u64::from(r.user_esp);
        (*a).ss1 = u64::from(r.ss1);
        if let Some(l) = r
            .lane
            .filter(|l| !l.pending.is_null() && !l.irq_gates.is_null())
        {
            (*a).ld = l.ld;
            (*a).pending = l.pending as u64;
            (*a).irq_gates = l.irq_gates as u64;
            (*a).noirq_start = l.noirq.0;
            (*a).noirq_end = l.noirq.1;
            (*a).lane_ok = 1;
        }
        (*a).gate_eip = r.gates.map(|g| u64::from(g.eip()));
        // With an irq pending, a reflection would be followed by its
        // delivery: the full path does both.
        if arm.vcpu_irqs == 0 {
            (*a).gate_bits = r.gates.map(|g| (g.0 >> 32) as u32);
        }
    }
}

/// Moves the armed block's ring slot and user-mode frame (host addresses
/// the caller checked) and the handler's ESP after a user-mode trap, for a
/// view that differs from the one it was armed with in nothing else (see
/// `arm_stub`). Host context or the trap path of the running guest,
/// interrupts off.
pub fn rearm_moved(ring_status: u64, user_frame: u64, user_esp: u32) {
    let a = ARMED.0.get();
    // SAFETY: see `ArmedCell` (no stub runs while Rust writes the block:
    // either no guest runs, or Rust runs on the running guest's trap path).
    unsafe {
        (*a).ring = ring_status;
        (*a).user_frame = user_frame;
        (*a).user_esp = u64::from(user_esp);
    }
}

/// Points the hypercall stub at the async ring's next status byte (`host`,
/// checked by the caller) after Rust drained the ring on the trap path.
/// Trap path of the running guest, interrupts off.
pub fn rearm_ring(host: u64) {
    let a = ARMED.0.get();
    // SAFETY: see `ArmedCell` (trap path, interrupts off: no stub is using
    // the block while Rust runs on its behalf).
    unsafe { (*a).ring = host };
}

/// Points the reflection stubs' user-mode frame at `host` (the host
/// address of the 20-byte frame below the `SET_STACK` stack, checked by the
/// caller), or with `None` leaves every user-mode trap to the full path
/// until the next arming. Trap path of the running guest, interrupts off.
pub fn retarget_user_frame(host: Option<u64>) {
    let a = ARMED.0.get();
    // SAFETY: see `ArmedCell` (trap path, interrupts off; no stub is using
    // the block while Rust runs on its behalf, and the hypercall stub reads
    // nothing of it after its switch lane returns).
    unsafe {
        match host {
            Some(h) => (*a).user_frame = h,
            None => {
                for bits in (*a).gate_bits.iter_mut() {
                    *bits &= !((StubGate::FROM_USER >> 32) as u32);
                }
            }
        }
    }
}

/// The hypercall numbers the stub's paging lane takes (a bit mask).
const PAGING_CALLS: u32 = {
    use guest_abi::hcall::*;
    (1 << LHCALL_NEW_PGTABLE)
        | (1 << LHCALL_SET_PTE)
        | (1 << LHCALL_SET_PGD)
        | (1 << LHCALL_SET_PMD)
        | (1 << LHCALL_FLUSH_TLB)
};

/// The run loop's context for the exit being handled (the page-fault
/// stub's fill, `pf_fill_lane`, reaches its `Running` through it). Only
/// meaningful on the trap path of a running guest.
pub fn current_ctx() -> *mut () {
    // SAFETY: a plain read of the pointer `run` stored; the caller is the
    // trap path of the guest `run` is running.
    unsafe { (*STATE.0.get()).ctx }
}

/// Counts an exit a stub's Rust lane finished.
pub fn count_lane() {
    let a = ARMED.0.get();
    // SAFETY: see `ArmedCell` (trap path, interrupts off).
    unsafe { (*a).lane_answered = (*a).lane_answered.wrapping_add(1) };
}

/// Entry point of the page-fault gate (vector 14): a fault of a guest under
/// shadow paging that the shadow core can fill is filled in Rust
/// (`pf_fill_lane`, `Vcpu::stub_fill`) with only the caller-saved registers
/// saved, and the guest resumes at the faulting instruction; a fault that is
/// the guest's own is reflected there too where the trap path's shortcut
/// would reflect it (the lane rewrites the hardware frame: the guest resumes
/// in its handler); anything else — a fault of the host itself (CPL 0), a
/// guest not armed for it (linear mode, `fastpath=off`), irqs pending, a
/// reflection the shortcut declines, a kill — falls into the generic path
/// exactly as the generic stub of vector 14 would. The hardware frame is:
/// error code, RIP, CS, RFLAGS, RSP, SS. The `iretq` is in the entry-fault
/// window.
#[unsafe(naked)]
pub unsafe extern "C" fn pf_stub() {
    naked_asm!(
        "test byte ptr [rsp + 16], 3",
        "jz 8f",
        "cmp qword ptr [rip + {armed} + {switch_ok}], 0",
        "je 8f",
        "push rax",
        "push rcx",
        "mov rcx, qword ptr [rip + {armed} + {irqs}]",
        "mov ecx, dword ptr [rcx]",
        "or ecx, dword ptr [rip + {armed} + {vcpu_irqs}]",
        "jnz 9f",
        // rax, rcx, rdx, rsi, rdi saved and the padding word: RSP is then
        // 16-byte aligned for the call (the CPU aligned it before its
        // 6-word frame). r8-r11 are the host's alone: zeroed after.
        "push rdx",
        "push rsi",
        "push rdi",
        "sub rsp, 8",
        "cld",
        "mov rdi, cr2",
        "lea rsi, [rsp + 48]",
        "call {fill_lane}",
        // 2: the guest's own fault, for the reflection lane (a call of its
        // own, so that the fill keeps nothing live for it); it rewrites the
        // frame and answers 1, or 0 for the full path. CR2 still holds the
        // address (the lanes run with interrupts off and do not fault).
        "cmp al, 2",
        "jne 7f",
        "mov rdi, cr2",
        "lea rsi, [rsp + 48]",
        "call {reflect_lane}",
        "7:",
        "xor r8d, r8d",
        "xor r9d, r9d",
        "xor r10d, r10d",
        "xor r11d, r11d",
        "test al, al",
        "lea rsp, [rsp + 8]",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        "pop rax",
        "jz 8f",
        "lea rsp, [rsp + 8]",
        ".globl rv_pf_iret",
        "rv_pf_iret:",
        "iretq",
        ".globl rv_pf_iret_end",
        "rv_pf_iret_end:",
        "9:",
        "pop rcx",
        "pop rax",
        // The full path: what the generic stub of vector 14 does (the CPU
        // pushed the error code).
        "8:",
        "push 14",
        "jmp {common}",
        armed = sym ARMED,
        switch_ok = const offset_of!(Armed, switch_ok),
        irqs = const offset_of!(Armed, irqs),
        vcpu_irqs = const offset_of!(Armed, vcpu_irqs),
        fill_lane = sym super::pf_fill_lane,
        reflect_lane = sym super::pf_reflect_lane,
        common = sym crate::kernel::arch::trap::trap_common,
    )
}

/// The lane's call into Rust for the guest's clock: `time` and `nsec` of
/// `lguest_data.time` as one little-endian word (C ABI, trap path).
extern "C" fn lane_wallclock() -> u64 {
    let (sec, nsec) = super::wallclock();
    u64::from(sec as u32) | (u64::from(nsec as u32) << 32)
}

/// Entry point of the hypercall gate (vector 0x1f, DPL 1) when exits are
/// handled where they land: answers a trivial hypercall without saving more
/// than two registers and without any Rust, or falls into the normal trap
/// path exactly as the generic stub of vector 0x1f would.
///
/// Why this is safe in a couple of dozen instructions: the call number (eax;
/// 32-bit, because the upper half of rax is undefined after compatibility
/// mode) is checked against the armed bit mask; the ring status byte and the
/// pending words are plain loads from addresses the run loop checked when it
/// armed the stub (the status byte lies inside guest RAM, which stays mapped
/// while the guest exists); nothing is written but the saved RFLAGS
/// (sanitised as the full path would: only the guest-settable bits, IF and
/// bit 1) and a counter. The `iretq` goes back to the EIP and ESP the CPU
/// itself pushed, and only if CS and SS are exactly the ones validated when
/// the guest was last entered: the guest may have loaded another SS since
/// (one the CPU accepts but the hypervisor refuses, like a 16-bit stack
/// segment, whose `iretq` would leave host RSP bits in ESP), and then the
/// full path checks it. Data segment registers are not reloaded, and for
/// them the CPU's rules and the hypervisor's agree (the hardware GDT holds
/// only validated guest descriptors and the host's DPL-0 ones). Should the
/// `iretq` fault anyway, the fault lies in the entry-fault window and is the
/// guest's (trap 256), as on every other path into the guest.
#[unsafe(naked)]
pub unsafe extern "C" fn hcall_stub() {
    naked_asm!(
        "push rax",
        "push rcx",
        "cmp eax, 31",
        "ja 3f",
        "mov ecx, dword ptr [rip + {armed} + {trivial}]",
        "bt ecx, eax",
        "jnc 31f",
        "mov rcx, qword ptr [rip + {armed} + {ring}]",
        "cmp byte ptr [rcx], {empty}",
        "jne 5f",
        "20:",
        // The saved CS is at [rsp + 24], SS at [rsp + 48] (above rax, rcx).
        "mov ecx, dword ptr [rsp + 24]",
        "cmp ecx, dword ptr [rip + {armed} + {cs}]",
        "jne 3f",
        "mov ecx, dword ptr [rsp + 48]",
        "cmp ecx, dword ptr [rip + {armed} + {ss}]",
        "jne 3f",
        "mov rcx, qword ptr [rip + {armed} + {irqs}]",
        "mov ecx, dword ptr [rcx]",
        "or ecx, dword ptr [rip + {armed} + {vcpu_irqs}]",
        "jnz 4f",
        // The saved RFLAGS is at [rsp + 32] (above rax, rcx, RIP and CS).
        "and dword ptr [rsp + 32], {mask}",
        "or dword ptr [rsp + 32], 0x202",
        "inc qword ptr [rip + {armed} + {answered}]",
        "pop rcx",
        "pop rax",
        ".globl rv_hcall_iret",
        "rv_hcall_iret:",
        "iretq",
        ".globl rv_hcall_iret_end",
        "rv_hcall_iret_end:",
        // Irqs pending: the lane, `Vcpu::stub_deliver` step by step. With
        // rdx, rsi and rdi saved too, the hardware frame is at rsp + 40:
        // RIP +40, CS +48, RFLAGS +56, RSP +64, SS +72. When armed, the
        // lane knows CS is the guest kernel's and SS the validated `kss`
        // (the checks above compared them with the armed CS and SS).
        "4:",
        "cmp dword ptr [rip + {armed} + {lane_ok}], 0",
        "je 3f",
        "push rdx",
        "push rsi",
        "push rdi",
        // Irqs raised from interrupt context into the vCPU's word (as the
        // run loop's merge does); the reflection stubs then stand aside.
        "mov rsi, qword ptr [rip + {armed} + {irqs}]",
        "xor ecx, ecx",
        "xchg dword ptr [rsi], ecx",
        "mov rdi, qword ptr [rip + {armed} + {pending}]",
        "or ecx, dword ptr [rdi]",
        "mov dword ptr [rdi], ecx",
        "mov dword ptr [rip + {armed} + {vcpu_irqs}], ecx",
        "mov qword ptr [rip + {armed} + {gate_bits}], 0",
        // avail = pending & !blocked: exactly one irq, deliverable now
        // (virtual irqs on, outside the no-irq window); anything else —
        // nothing deliverable, or more left pending after this one — is
        // the full path's (which arms the poke for what stays pending).
        "mov rsi, qword ptr [rip + {armed} + {ld}]",
        "mov edx, dword ptr [rsi + {off_blocked}]",
        "not edx",
        "and edx, ecx",
        "jz 9f",
        "lea edi, [rdx - 1]",
        "test edi, edx",
        "jnz 9f",
        "test dword ptr [rsi + {off_ie}], {if_}",
        "jz 9f",
        "mov eax, dword ptr [rsp + 40]",
        "cmp eax, dword ptr [rip + {armed} + {noirq_start}]",
        "jb 1f",
        "cmp eax, dword ptr [rip + {armed} + {noirq_end}]",
        "jb 9f",
        "1:",
        // The lowest irq's gate must be present, and the 3-word frame
        // below ESP inside guest memory; else the full path decides.
        "bsf ecx, edx",
        "mov rdi, qword ptr [rip + {armed} + {irq_gates}]",
        "mov eax, dword ptr [rdi + rcx * 8 + 4]",
        "test eax, 0x8000",
        "jz 9f",
        "mov esi, dword ptr [rsp + 64]",
        "add esi, dword ptr [rip + {armed} + {kss_base}]",
        "cmp esi, dword ptr [rip + {armed} + {limit}]",
        "ja 9f",
        "sub esi, 12",
        "jb 9f",
        // Decided. The irq is no longer pending (and none other is).
        "mov rdi, qword ptr [rip + {armed} + {pending}]",
        "btr dword ptr [rdi], ecx",
        "btr dword ptr [rip + {armed} + {vcpu_irqs}], ecx",
        // The frame: EIP, CS, EFLAGS (the virtual IF is on).
        "add rsi, qword ptr [rip + {armed} + {mem_base}]",
        "mov edi, dword ptr [rsp + 40]",
        "mov dword ptr [rsi], edi",
        "mov edi, dword ptr [rsp + 48]",
        "mov dword ptr [rsi + 4], edi",
        "mov edi, dword ptr [rsp + 56]",
        "mov dword ptr [rsi + 8], edi",
        // An interrupt gate turns the virtual IF off.
        "mov edi, eax",
        "and edi, 0xF00",
        "cmp edi, {intr_type}",
        "jne 2f",
        "mov rdi, qword ptr [rip + {armed} + {ld}]",
        "mov dword ptr [rdi + {off_ie}], 0",
        "2:",
        // Into the gate: EIP = offset 31:16 | 15:0, the kernel CS, ESP - 12
        // (same SS), EFLAGS without TF/VM/RF/NT (sanitised at 7).
        "and eax, 0xFFFF0000",
        "mov rdi, qword ptr [rip + {armed} + {irq_gates}]",
        "movzx edi, word ptr [rdi + rcx * 8]",
        "or eax, edi",
        "mov qword ptr [rsp + 40], rax",
        "mov qword ptr [rsp + 48], {kernel_cs}",
        "sub dword ptr [rsp + 64], 12",
        "and dword ptr [rsp + 56], {mask_no_tf}",
        // The guest's clock (time at +12, +16; from Rust, C ABI: RSP is
        // 16-byte aligned here) and irq_pending (+20): none left.
        "call {wallclock}",
        "xor r8d, r8d",
        "xor r9d, r9d",
        "xor r10d, r10d",
        "xor r11d, r11d",
        "mov rsi, qword ptr [rip + {armed} + {ld}]",
        "mov qword ptr [rsi + {off_time}], rax",
        "mov dword ptr [rsi + {off_pending}], 0",
        // Done: EFLAGS sanitised, counted, back into the guest.
        "and dword ptr [rsp + 56], {mask}",
        "or dword ptr [rsp + 56], 0x202",
        "inc qword ptr [rip + {armed} + {lane_answered}]",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        "pop rax",
        "jmp rv_hcall_iret",
        // Not for the lane: nothing was written but the merge of raised
        // irqs, which the full path would do first anyway.
        "9:",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "jmp 3f",
        // Calls queued in the async ring: the drain, `Vcpu::stub_drain`
        // step by step. No-op calls are taken off (status byte emptied,
        // cursor advanced) until an empty slot, then the call is answered as
        // above; anything else leaves the rest to the full path. rax (the
        // call number is no longer needed: popped at the end) = the status
        // bytes, rsi = the entries, rdx = cursor, edi = the no-op mask, r8 =
        // slots left to look at (one pass plus the first slot again); the
        // cursor and the armed status pointer are written back either way.
        "5:",
        "cmp qword ptr [rip + {armed} + {drain_ok}], 0",
        "je 3f",
        "push rdx",
        "push rsi",
        "push rdi",
        "mov rsi, qword ptr [rip + {armed} + {cursor}]",
        "mov rdx, qword ptr [rsi]",
        "and edx, {ring_mask}",
        "mov rax, qword ptr [rip + {armed} + {status_base}]",
        "mov rsi, qword ptr [rip + {armed} + {hcalls_base}]",
        "mov edi, dword ptr [rip + {armed} + {trivial}]",
        "mov r8d, {ring_size} + 1",
        "10:",
        "cmp byte ptr [rax + rdx], {empty}",
        "je 11f",
        "dec r8d",
        "jz 12f",
        "imul ecx, edx, {entry_size}",
        "mov ecx, dword ptr [rsi + rcx]",
        "cmp ecx, 31",
        "ja 12f",
        "bt edi, ecx",
        "jnc 12f",
        "mov byte ptr [rax + rdx], {empty}",
        "inc edx",
        "and edx, {ring_mask}",
        "jmp 10b",
        // Something else at the cursor: the full path decides.
        "12:",
        "call 13f",
        // `FLUSH_ASYNC` (the guest's eax, pushed first) with calls queued
        // that are not no-ops (Linux's context switch, its lazy MMU
        // batches), from the armed state (the validated CS and SS, no irq
        // pending): the run loop's flush handler drains them, with the
        // data selectors the guest runs with (ds, es, fs, gs) as its four
        // arguments; on from the paging lane's return below. The guest's
        // rdx, rsi and rdi stay pushed.
        "cmp dword ptr [rsp + 32], {flush_async}",
        "jne 37f",
        "cmp qword ptr [rip + {armed} + {switch_ok}], 0",
        "je 37f",
        "mov rax, qword ptr [rip + {state} + {flush}]",
        "jmp 34f",
        // Empty now: on with the answer.
        "11:",
        "call 13f",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "jmp 20b",
        // Write back the cursor and the armed status pointer; r8 is the
        // host's alone, zeroed.
        "13:",
        "mov rcx, qword ptr [rip + {armed} + {cursor}]",
        "mov qword ptr [rcx], rdx",
        "add rax, rdx",
        "mov qword ptr [rip + {armed} + {ring}], rax",
        "xor r8d, r8d",
        "ret",
        // The shadow-paging calls (`NEW_PGTABLE`, `SET_PTE`, `SET_PGD`,
        // `SET_PMD`, `FLUSH_TLB`; eax <= 31 here), from the armed state only
        // (an empty ring, the validated CS and SS, no irq pending): Rust
        // does the call (the vCPU's and the shadow core's bookkeeping, any
        // TLB invalidation it owes) and says whether a root is to be loaded:
        // the stub loads it into CR3 (no PCIDs: the load flushes the TLB)
        // and returns. 0: the full path; 1: done, nothing to load.
        "31:",
        "mov ecx, {paging_calls}",
        "bt ecx, eax",
        "jnc 3f",
        "cmp qword ptr [rip + {armed} + {switch_ok}], 0",
        "je 3f",
        "mov rcx, qword ptr [rip + {armed} + {ring}]",
        "cmp byte ptr [rcx], {empty}",
        "jne 3f",
        "mov rax, qword ptr [rip + {state} + {handler}]",
        "push rdx",
        "push rsi",
        "push rdi",
        // Both lanes (rax: the run loop's handler for this one; none: the
        // full path; the guest's rdx, rsi, rdi pushed), from the armed
        // state only: the validated CS and SS, no irq pending.
        "34:",
        "mov ecx, dword ptr [rsp + 48]",
        "cmp ecx, dword ptr [rip + {armed} + {cs}]",
        "jne 37f",
        "mov ecx, dword ptr [rsp + 72]",
        "cmp ecx, dword ptr [rip + {armed} + {ss}]",
        "jne 37f",
        "mov rcx, qword ptr [rip + {armed} + {irqs}]",
        "mov ecx, dword ptr [rcx]",
        "or ecx, dword ptr [rip + {armed} + {vcpu_irqs}]",
        "jnz 37f",
        "test rax, rax",
        "jz 37f",
        // The handler, called straight from here with its context and the
        // call's number as its first C arguments (rdi, rsi), then four more
        // (rdx, rcx, r8, r9): for a paging call its arguments (ebx, ecx,
        // edx, esi), for `FLUSH_ASYNC` the data selectors (ds, es, fs,
        // gs). The guest's ecx and eax are where the stub pushed them,
        // above rdx/rsi/rdi.
        "cld",
        "cmp dword ptr [rsp + 32], {flush_async}",
        "je 35f",
        "mov r9d, esi",
        "mov r8d, edx",
        "mov ecx, dword ptr [rsp + 24]",
        "mov edx, ebx",
        "jmp 36f",
        "35:",
        "mov dx, ds",
        "movzx edx, dx",
        "mov cx, es",
        "movzx ecx, cx",
        "mov r8w, fs",
        "movzx r8d, r8w",
        "mov r9w, gs",
        "movzx r9d, r9w",
        "36:",
        "mov esi, dword ptr [rsp + 32]",
        "mov rdi, qword ptr [rip + {state} + {ctx}]",
        "call rax",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "xor r8d, r8d",
        "xor r9d, r9d",
        "xor r10d, r10d",
        "xor r11d, r11d",
        "test rax, rax",
        "jz 3f",
        "inc qword ptr [rip + {armed} + {lane_answered}]",
        "cmp rax, 1",
        "je 32f",
        "mov cr3, rax",
        "32:",
        "and dword ptr [rsp + 32], {mask}",
        "or dword ptr [rsp + 32], 0x202",
        "pop rcx",
        "pop rax",
        "jmp rv_hcall_iret",
        // Not for a lane after all: the guest's registers back, then the
        // full path.
        "37:",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        // The full path: what the generic stub of vector 0x1f does.
        "3:",
        "pop rcx",
        "pop rax",
        "push 0",
        "push 0x1f",
        "jmp {common}",
        drain_ok = const offset_of!(Armed, drain_ok),
        switch_ok = const offset_of!(Armed, switch_ok),
        state = sym STATE,
        flush_async = const guest_abi::hcall::LHCALL_FLUSH_ASYNC,
        handler = const offset_of!(SwitchState, switch),
        flush = const offset_of!(SwitchState, flush),
        ctx = const offset_of!(SwitchState, ctx),
        paging_calls = const PAGING_CALLS,
        cursor = const offset_of!(Armed, cursor),
        status_base = const offset_of!(Armed, status_base),
        hcalls_base = const offset_of!(Armed, hcalls_base),
        ring_mask = const LHCALL_RING_SIZE - 1,
        ring_size = const LHCALL_RING_SIZE,
        entry_size = const core::mem::size_of::<guest_abi::hcall::HcallArgs>(),
        wallclock = sym lane_wallclock,
        armed = sym ARMED,
        lane_ok = const offset_of!(Armed, lane_ok),
        pending = const offset_of!(Armed, pending),
        gate_bits = const offset_of!(Armed, gate_bits),
        ld = const offset_of!(Armed, ld),
        noirq_start = const offset_of!(Armed, noirq_start),
        noirq_end = const offset_of!(Armed, noirq_end),
        irq_gates = const offset_of!(Armed, irq_gates),
        kss_base = const offset_of!(Armed, kss_base),
        limit = const offset_of!(Armed, limit),
        mem_base = const offset_of!(Armed, mem_base),
        lane_answered = const offset_of!(Armed, lane_answered),
        off_blocked = const LguestData::OFF_BLOCKED_INTERRUPTS,
        off_ie = const LguestData::OFF_IRQ_ENABLED,
        off_time = const LguestData::OFF_TIME,
        off_pending = const LguestData::OFF_IRQ_PENDING,
        if_ = const X86_EFLAGS_IF,
        intr_type = const IDT_TYPE_INTERRUPT << 8,
        kernel_cs = const KERNEL_CS,
        mask_no_tf = const EFLAGS_GUEST_MASK & !(EFLAGS_TF | EFLAGS_VM | EFLAGS_RF | EFLAGS_NT),
        trivial = const offset_of!(Armed, trivial),
        ring = const offset_of!(Armed, ring),
        irqs = const offset_of!(Armed, irqs),
        vcpu_irqs = const offset_of!(Armed, vcpu_irqs),
        cs = const offset_of!(Armed, cs),
        ss = const offset_of!(Armed, ss),
        answered = const offset_of!(Armed, answered),
        empty = const HCALL_STATUS_EMPTY,
        mask = const EFLAGS_GUEST_MASK,
        common = sym crate::kernel::arch::trap::trap_common,
    )
}

/// One reflection stub: the entry point of the guest-callable gate of
/// `STUB_VECTORS[$i]` (vector `$vector`, no error code), implementing
/// `StubView::reflect` (the host-tested model; read the two side by side).
///
/// With only rcx and rdx saved (the hardware frame is then at `rsp + 16`:
/// RIP +16, CS +24, RFLAGS +32, RSP +40, SS +48), it checks, in order: the
/// trap came from the guest kernel (CS RPL 1) or user mode (RPL 3; RPL 0 is
/// the host itself: full path); the gate allows that CPL (its bits were
/// cleared when armed with an irq pending); no irq was raised from interrupt
/// context since; for a kernel-mode trap, SS is the validated one and the
/// 3-word frame lies inside guest memory (for a user-mode one, the 5-word
/// frame on the `SET_STACK` stack was checked when armed). Only then does it
/// write: the frame words (EFLAGS with the virtual IF), `irq_enabled` = 0
/// for an interrupt gate, and the hardware frame (the gate's EIP, the guest
/// kernel CS, sanitised EFLAGS without TF/VM/RF/NT, the new ESP and SS),
/// and `iretq`s — inside the entry-fault window, like every return into a
/// guest. Otherwise it falls into the generic path exactly as the generic
/// stub of the vector would.
macro_rules! reflect_stub {
    ($name:ident, $vector:expr, $i:expr, $iret:literal, $iret_end:literal) => {
        #[unsafe(naked)]
        pub unsafe extern "C" fn $name() {
            naked_asm!(
                "push rcx",
                "push rdx",
                "mov ecx, dword ptr [rsp + 24]",
                "test cl, 2",
                "jnz 5f",
                "test cl, 1",
                "jz 8f",
                // From the guest kernel: on the validated stack segment,
                // the frame below ESP inside guest memory.
                "test byte ptr [rip + {armed} + {bits}], 1",
                "jz 8f",
                "mov edx, dword ptr [rsp + 48]",
                "cmp edx, dword ptr [rip + {armed} + {kss}]",
                "jne 8f",
                "mov rdx, qword ptr [rip + {armed} + {irqs}]",
                "cmp dword ptr [rdx], 0",
                "jne 8f",
                "mov edx, dword ptr [rsp + 40]",
                "add edx, dword ptr [rip + {armed} + {kss_base}]",
                "cmp edx, dword ptr [rip + {armed} + {limit}]",
                "ja 8f",
                "sub edx, 12",
                "jb 8f",
                // Decided. EFLAGS with the virtual IF into ecx.
                "mov ecx, dword ptr [rsp + 32]",
                "add rdx, qword ptr [rip + {armed} + {mem_base}]",
                "push rdx",
                "mov rdx, qword ptr [rip + {armed} + {ie}]",
                "test dword ptr [rdx], {if_}",
                "pop rdx",
                "jnz 1f",
                "and ecx, {not_if}",
                "1:",
                "mov dword ptr [rdx + 8], ecx",
                "mov ecx, dword ptr [rsp + 16]",
                "mov dword ptr [rdx], ecx",
                "mov ecx, dword ptr [rsp + 24]",
                "mov dword ptr [rdx + 4], ecx",
                "sub dword ptr [rsp + 40], 12",
                "jmp 6f",
                // From user mode: onto the SET_STACK stack (checked when
                // armed).
                "5:",
                "test byte ptr [rip + {armed} + {bits}], 2",
                "jz 8f",
                "mov rdx, qword ptr [rip + {armed} + {irqs}]",
                "cmp dword ptr [rdx], 0",
                "jne 8f",
                // Decided. EFLAGS with the virtual IF into ecx.
                "mov ecx, dword ptr [rsp + 32]",
                "mov rdx, qword ptr [rip + {armed} + {ie}]",
                "test dword ptr [rdx], {if_}",
                "jnz 1f",
                "and ecx, {not_if}",
                "1:",
                "mov rdx, qword ptr [rip + {armed} + {uframe}]",
                "mov dword ptr [rdx + 8], ecx",
                "mov ecx, dword ptr [rsp + 16]",
                "mov dword ptr [rdx], ecx",
                "mov ecx, dword ptr [rsp + 24]",
                "mov dword ptr [rdx + 4], ecx",
                "mov ecx, dword ptr [rsp + 40]",
                "mov dword ptr [rdx + 12], ecx",
                "mov ecx, dword ptr [rsp + 48]",
                "mov dword ptr [rdx + 16], ecx",
                "mov rcx, qword ptr [rip + {armed} + {uesp}]",
                "mov qword ptr [rsp + 40], rcx",
                "mov rcx, qword ptr [rip + {armed} + {ss1}]",
                "mov qword ptr [rsp + 48], rcx",
                // Both: the gate.
                "6:",
                "test byte ptr [rip + {armed} + {bits}], 4",
                "jz 2f",
                "mov rdx, qword ptr [rip + {armed} + {ie}]",
                "mov dword ptr [rdx], 0",
                "2:",
                "mov rcx, qword ptr [rip + {armed} + {eip}]",
                "mov qword ptr [rsp + 16], rcx",
                "mov qword ptr [rsp + 24], {kernel_cs}",
                "and dword ptr [rsp + 32], {mask}",
                "or dword ptr [rsp + 32], 0x202",
                "inc qword ptr [rip + {armed} + {reflected}]",
                "pop rdx",
                "pop rcx",
                concat!(".globl ", $iret),
                concat!($iret, ":"),
                "iretq",
                concat!(".globl ", $iret_end),
                concat!($iret_end, ":"),
                // The full path: what the generic stub of the vector does.
                "8:",
                "pop rdx",
                "pop rcx",
                "push 0",
                "push {vector}",
                "jmp {common}",
                armed = sym ARMED,
                bits = const offset_of!(Armed, gate_bits) + 4 * $i,
                eip = const offset_of!(Armed, gate_eip) + 8 * $i,
                kss = const offset_of!(Armed, kss),
                kss_base = const offset_of!(Armed, kss_base),
                limit = const offset_of!(Armed, limit),
                irqs = const offset_of!(Armed, irqs),
                mem_base = const offset_of!(Armed, mem_base),
                ie = const offset_of!(Armed, irq_enabled),
                uframe = const offset_of!(Armed, user_frame),
                uesp = const offset_of!(Armed, user_esp),
                ss1 = const offset_of!(Armed, ss1),
                reflected = const offset_of!(Armed, reflected),
                if_ = const X86_EFLAGS_IF,
                not_if = const !X86_EFLAGS_IF,
                kernel_cs = const KERNEL_CS,
                mask = const EFLAGS_GUEST_MASK & !(EFLAGS_TF | EFLAGS_VM | EFLAGS_RF | EFLAGS_NT),
                vector = const $vector,
                common = sym crate::kernel::arch::trap::trap_common,
            )
        }
    };
}

reflect_stub!(int3_stub, 3, 0, "rv_int3_iret", "rv_int3_iret_end");
reflect_stub!(
    syscall_stub,
    0x80,
    1,
    "rv_syscall_iret",
    "rv_syscall_iret_end"
);

/// Enters the guest. `state` points at [`SwitchState`] (host_rsp at +0, regs
/// pointer at +8). Returns the trap number when the guest exits.
///
/// Register block offsets (lguest_regs order, u32 each): eax 0, ebx 4, ecx 8,
/// edx 12, esi 16, edi 20, ebp 24, gs 28, fs 32, ds 36, es 40, trapnum 44,
/// errcode 48, eip 52, cs 56, eflags 60, esp 64, ss 68.
#[unsafe(naked)]
unsafe extern "C" fn enter_guest(state: *mut u64) -> u64 {
    naked_asm!(
        // Host callee-saved registers; exit_to_host pops them.
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "mov [rdi], rsp",
        "mov rsi, [rdi + 8]",
        // iretq frame: SS, RSP, RFLAGS, CS, RIP (zero-extended 32-bit values).
        "mov eax, [rsi + 68]",
        "push rax",
        "mov eax, [rsi + 64]",
        "push rax",
        "mov eax, [rsi + 60]",
        "push rax",
        "mov eax, [rsi + 56]",
        "push rax",
        "mov eax, [rsi + 52]",
        "push rax",
        ".globl rv_entry_fault_begin",
        "rv_entry_fault_begin:",
        "mov ax, [rsi + 36]",
        "mov ds, ax",
        "mov ax, [rsi + 40]",
        "mov es, ax",
        "mov ax, [rsi + 32]",
        "mov fs, ax",
        "mov ax, [rsi + 28]",
        "mov gs, ax",
        "xor r8d, r8d",
        "xor r9d, r9d",
        "xor r10d, r10d",
        "xor r11d, r11d",
        "xor r12d, r12d",
        "xor r13d, r13d",
        "xor r14d, r14d",
        "xor r15d, r15d",
        "mov eax, [rsi + 0]",
        "mov ebx, [rsi + 4]",
        "mov ecx, [rsi + 8]",
        "mov edx, [rsi + 12]",
        "mov edi, [rsi + 20]",
        "mov ebp, [rsi + 24]",
        "mov esi, [rsi + 16]",
        "iretq",
        ".globl rv_entry_fault_end",
        "rv_entry_fault_end:",
        "ud2",
    )
}

/// Returns from `enter_guest` with `trapnum`: back to the saved host stack.
#[unsafe(naked)]
unsafe extern "C" fn exit_to_host(state: *mut u64, trapnum: u64) -> ! {
    naked_asm!(
        "mov rsp, [rdi]",
        "mov rax, rsi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
    )
}

unsafe extern "C" {
    static rv_entry_fault_begin: u8;
    static rv_entry_fault_end: u8;
    static rv_guest_return_begin: u8;
    static rv_guest_return_end: u8;
    static rv_hcall_iret: u8;
    static rv_hcall_iret_end: u8;
    static rv_int3_iret: u8;
    static rv_int3_iret_end: u8;
    static rv_syscall_iret: u8;
    static rv_syscall_iret_end: u8;
    static rv_pf_iret: u8;
    static rv_pf_iret_end: u8;
}

/// Whether `rip` is the `iretq` of the hypercall stub, a reflection stub or
/// the page-fault stub.
fn in_stub_iret(rip: u64) -> bool {
    let at = |begin: *const u8, end: *const u8| (begin as u64..end as u64).contains(&rip);
    at(&raw const rv_hcall_iret, &raw const rv_hcall_iret_end)
        || at(&raw const rv_int3_iret, &raw const rv_int3_iret_end)
        || at(&raw const rv_syscall_iret, &raw const rv_syscall_iret_end)
        || at(&raw const rv_pf_iret, &raw const rv_pf_iret_end)
}

/// Whether a CPL-0 fault at `rip` happened while loading guest state: in
/// `enter_guest`'s entry sequence, or in the dispatcher's return-to-guest
/// sequence after an exit handled on the trap stack.
pub fn is_entry_fault(rip: u64) -> bool {
    let within = |begin: *const u8, end: *const u8| (begin as u64..=end as u64).contains(&rip);
    // SAFETY: reading the switch state's regs pointer only to know whether a
    // guest entry is in progress on this CPU.
    let entering = unsafe { !(*STATE.0.get()).regs.is_null() };
    entering
        && (within(
            &raw const rv_entry_fault_begin,
            &raw const rv_entry_fault_end,
        ) || within(
            &raw const rv_guest_return_begin,
            &raw const rv_guest_return_end,
        ) || in_stub_iret(rip))
}

/// A fault while entering the guest: the guest's state was bad.
pub fn entry_fault(frame: &TrapFrame) -> ! {
    let state = STATE.0.get();
    if in_stub_iret(frame.rip) {
        // The stub never copied the guest's registers into its block: they
        // are the fault frame's (the stub restored rax and rcx before its
        // `iretq`, the others it never touched) and the `iretq` frame the
        // fault left at `frame.rsp`.
        // SAFETY: `frame.rsp` points at the stub's 5-word `iretq` frame on
        // this CPU's trap stack; `regs` is the running guest's block (the
        // stub only runs while a guest does); interrupts are off.
        unsafe {
            let iret = frame.rsp as *const u64;
            let regs = &mut *(*state).regs;
            save_exit_regs(regs, frame);
            save_other_regs(regs, frame);
            regs.eip = *iret as u32;
            regs.cs = *iret.add(1) as u32;
            regs.eflags = *iret.add(2) as u32;
            regs.esp = *iret.add(3) as u32;
            regs.ss = *iret.add(4) as u32;
        }
    }
    // SAFETY: trap path, interrupts off, single CPU; `state` is valid.
    unsafe {
        (*state).errcode = frame.error_code;
        (*state).cr2 = frame.vector;
        exit_to_host(state.cast::<u64>(), u64::from(ENTRY_FAULT_TRAPNUM))
    }
}

/// Saves what every exit needs into the guest's register block: the trap
/// number and error code, the frame registers (EIP, CS, EFLAGS, ESP, SS),
/// EAX (a hypercall's number) and the data segment selectors.
fn save_exit_regs(regs: &mut Regs, frame: &TrapFrame) {
    regs.eax = frame.rax as u32;
    regs.trapnum = frame.vector as u32;
    regs.errcode = frame.error_code as u32;
    save_frame_regs(
        regs,
        [frame.rip, frame.cs, frame.rflags, frame.rsp, frame.ss],
    );
}

/// Saves the frame registers of a hardware frame (RIP, CS, RFLAGS, RSP,
/// SS) and the data segment selectors into the guest's register block.
fn save_frame_regs(regs: &mut Regs, [rip, cs, rflags, rsp, ss]: [u64; 5]) {
    let (ds, es, fs, gs): (u16, u16, u16, u16);
    // SAFETY: reads the data segment registers, which still hold the guest's
    // selectors (the host never loads them in 64-bit mode).
    unsafe {
        core::arch::asm!(
            "mov {0:x}, ds", "mov {1:x}, es", "mov {2:x}, fs", "mov {3:x}, gs",
            out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs,
            options(nomem, nostack, preserves_flags)
        );
    }
    regs.ds = u32::from(ds);
    regs.es = u32::from(es);
    regs.fs = u32::from(fs);
    regs.gs = u32::from(gs);
    regs.eip = rip as u32;
    regs.cs = cs as u32;
    regs.eflags = rflags as u32;
    regs.esp = rsp as u32;
    regs.ss = ss as u32;
}

/// Puts the guest's frame registers (EIP, CS, EFLAGS sanitised, ESP, SS)
/// into the hardware frame the dispatcher returns through.
fn load_frame_regs(frame: &mut TrapFrame, r: &Regs) {
    [frame.rip, frame.cs, frame.rflags, frame.rsp, frame.ss] = frame_words(r);
}

/// The hardware frame words (RIP, CS, RFLAGS sanitised, RSP, SS) the guest
/// resumes with.
fn frame_words(r: &Regs) -> [u64; 5] {
    [
        u64::from(r.eip),
        u64::from(r.cs),
        u64::from(sanitize_eflags(r.eflags)),
        u64::from(r.esp),
        u64::from(r.ss),
    ]
}

/// The page-fault stub's view of the guest's registers, for a reflection
/// finished in its lane: the frame registers and data segments of the
/// fault (`frame`: error code, RIP, CS, RFLAGS, RSP, SS), vector 14 and its
/// error code go into `regs` as the trap path's exit would save them (the
/// general registers are not saved: a reflection neither reads nor changes
/// them, and the next full exit saves them all). Trap path, interrupts off.
pub fn save_pf_frame(regs: &mut Regs, frame: &[u64; 6]) {
    let [errcode, rip, cs, rflags, rsp, ss] = *frame;
    regs.trapnum = guest_abi::irq::trap::PF;
    regs.errcode = errcode as u32;
    save_frame_regs(regs, [rip, cs, rflags, rsp, ss]);
}

/// After a reflection in the page-fault stub's lane: the frame the stub
/// `iretq`s through gets the guest's new frame registers (the handler's
/// EIP and CS, its EFLAGS, stack and SS); the data segments are unchanged.
pub fn load_pf_frame(frame: &mut [u64; 6], regs: &Regs) {
    let [_, rest @ ..] = frame;
    *rest = frame_words(regs);
}

/// Saves the rest of the guest's general registers (what the full exit
/// path may read or change).
fn save_other_regs(regs: &mut Regs, frame: &TrapFrame) {
    regs.ebx = frame.rbx as u32;
    regs.ecx = frame.rcx as u32;
    regs.edx = frame.rdx as u32;
    regs.esi = frame.rsi as u32;
    regs.edi = frame.rdi as u32;
    regs.ebp = frame.rbp as u32;
}

/// A trap from the running guest (host interrupts already serviced by the
/// dispatcher): save its state, let the run loop's handler finish it on the
/// trap stack if it can, and return to the guest (`true`: the dispatcher
/// `iretq`s with the updated `frame`) or to the run loop (never returns).
pub fn guest_exit(frame: &mut TrapFrame) -> bool {
    EXITS.fetch_add(1, Ordering::Relaxed);
    let state = STATE.0.get();
    let cr2 = if frame.vector == 14 { cpu::cr2() } else { 0 };
    // SAFETY: `regs` was set by `run` to the running guest's register block,
    // which outlives the guest's execution; interrupts are off, single CPU.
    let (regs, fast, ctx) = unsafe {
        let regs = &mut *(*state).regs;
        save_exit_regs(regs, frame);
        (*state).errcode = frame.error_code;
        (*state).cr2 = cr2;
        (regs as *mut Regs, (*state).fast, (*state).ctx)
    };
    let info = ExitInfo {
        trapnum: frame.vector as u32,
        errcode: frame.error_code as u32,
        cr2: cr2 as u32,
    };
    // First the shortcuts, which need only what `save_exit_regs` saved and
    // change only the frame registers (EIP, CS, EFLAGS, ESP, SS).
    if let Some(handler) = fast
        && handler(ctx, &info, false)
    {
        // SAFETY: as above; the handler is done with the block.
        load_frame_regs(frame, unsafe { &*regs });
        FAST_EXITS.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    // SAFETY: as above.
    let segs = unsafe {
        let regs = &mut *regs;
        save_other_regs(regs, frame);
        (regs.ds, regs.es, regs.fs, regs.gs)
    };
    if let Some(handler) = fast
        && handler(ctx, &info, true)
    {
        // SAFETY: as above; the handler is done with the block.
        let r = unsafe { &*regs };
        // Back into the guest with the same data segments it left with
        // (the handler only finishes exits that change none of them).
        if (r.ds, r.es, r.fs, r.gs) == segs {
            frame.rax = u64::from(r.eax);
            frame.rbx = u64::from(r.ebx);
            frame.rcx = u64::from(r.ecx);
            frame.rdx = u64::from(r.edx);
            frame.rsi = u64::from(r.esi);
            frame.rdi = u64::from(r.edi);
            frame.rbp = u64::from(r.ebp);
            load_frame_regs(frame, r);
            FAST_EXITS.fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
    // SAFETY: `state` is valid; `exit_to_host` abandons this trap stack and
    // resumes `enter_guest`'s caller on the saved host stack.
    unsafe { exit_to_host(state.cast::<u64>(), frame.vector) }
}
