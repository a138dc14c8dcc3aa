//! The per-guest lguest state machine: hypercalls and the async ring
//! (docs/abi.md, sections 2-5), trap reflection and virtual interrupt
//! delivery (section 6), GDT/IDT loading (section 7), lazy-FPU bookkeeping
//! (`LHCALL_TS`). Pure logic: the world switch
//! hands it an [`Exit`] and the saved [`Regs`], it edits the registers and
//! guest memory and answers with an [`Action`].
//!
//! # Run loop (what the switcher does)
//!
//! ```text
//! loop {
//!     match vcpu.prepare_entry(mem, env) {       // finish an interrupted hypercall,
//!         Action::Resume => {}                   // deliver irqs, check segments
//!         Action::Halt => { sleep until vcpu.has_deliverable_irq(mem) or a
//!                           new irq is set (LHREQ_IRQ / timer → set_irq(0)); continue }
//!         Action::Notify(a) => return notify a (or signal its eventfd and continue),
//!         Action::Dead => return the dead_reason(), Action::Restart => return ERESTART,
//!     }
//!     let exit = enter_guest(&mut vcpu.regs, &vcpu.gdt, vcpu.idt());  // iretq … trap
//!     match vcpu.handle_exit(exit, mem, env) {
//!         Action::Resume | Action::Halt => continue,  // prepare_entry decides on sleeping
//!         other => handle like above,
//!     }
//! }
//! ```
//!
//! Every value from the guest (registers, guest memory) is validated; a bad
//! one kills the guest with lguest's reason string ([`Vcpu::dead_reason`]),
//! the first reason wins, and from then on every call answers
//! [`Action::Dead`] (or [`Action::Restart`]).
//!
//! # Paging
//!
//! Only lguest's *linear* boot mode exists so far: guest virtual ==
//! guest physical. Every guest-virtual access (stack pushes, instruction
//! fetch) still goes through [`Vcpu::guest_pa`] so shadow paging can plug in.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_abi::data::LguestData;
use guest_abi::hcall::{
    HCALL_STATUS_EMPTY, HcallArgs, Hypercall, LGUEST_TRAP_ENTRY, LHCALL_LGUEST_INIT,
    LHCALL_RING_SIZE,
};
use guest_abi::irq::{
    FIRST_EXTERNAL_VECTOR, IDT_ENTRIES, LGUEST_IRQS, LGUEST_SHUTDOWN_POWEROFF,
    LGUEST_SHUTDOWN_RESTART, SYSCALL_VECTOR, X86_EFLAGS_IF, has_error_code, trap,
};
use guest_abi::seg::{IDT_HIGH_KEEP_MASK, IDT_TYPE_INTERRUPT, IDT_TYPE_TRAP, KERNEL_CS, KERNEL_DS};

use super::chan::DeathReason;
use super::gdtcache::GdtKey;
use super::guestmem::{GuestMemory, MemFault};
use super::insn::{self, Op, Operand, Seg, Width};
use super::kill::{Kill, kill};
use super::pagewalk::{Access, Format};
use super::segments::{GuestGdt, TLS_ENTRIES, TLS_FIRST};
use super::shadow::{
    Fault, Flush, ShadowBackend, ShadowConfig, ShadowPaging, Switch, check_kernel_address,
};

/// The guest's registers in the order of Linux lguest's `struct lguest_regs`:
/// what the switcher saves on every exit and loads on every entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Regs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub esi: u32,
    pub edi: u32,
    pub ebp: u32,
    pub gs: u32,
    pub fs: u32,
    pub ds: u32,
    pub es: u32,
    /// Vector of the last exit ([`ENTRY_FAULT_TRAPNUM`] = "faulted while
    /// entering").
    pub trapnum: u32,
    pub errcode: u32,
    pub eip: u32,
    pub cs: u32,
    pub eflags: u32,
    pub esp: u32,
    pub ss: u32,
}

const _: () = assert!(core::mem::size_of::<Regs>() == 72);
// `stub_deliver` stores time and irq_pending with one write.
const _: () = assert!(LguestData::OFF_IRQ_PENDING == LguestData::OFF_TIME + 8);

/// Why the guest stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The guest raised exception / software interrupt `vector`
    /// (0..=31, including `int $0x1f` hypercalls, or `int $0x80`; never a
    /// host vector: see [`TrapOwner`] / [`Exit::from_trapnum`]).
    /// `errcode` is the hardware error code (0 if the vector has none), `cr2`
    /// the faulting address for #PF (captured with interrupts off).
    Trap {
        /// Vector.
        vector: u32,
        /// Hardware error code or 0.
        errcode: u32,
        /// CR2 for vector 14, else ignored.
        cr2: u32,
    },
    /// A host interrupt arrived while the guest ran (already serviced).
    HostInterrupt,
    /// The switcher faulted while loading guest state (lguest's trapnum 256).
    EntryFault {
        /// Vector of the CPU's fault at CPL 0 (13 for a #GP on a selector
        /// or on the `iretq`, ...).
        fault: u32,
        /// Its error code.
        errcode: u32,
    },
}

/// The trap number the switcher reports when entering the guest faulted
/// (lguest's "faulted inside the Switcher").
pub const ENTRY_FAULT_TRAPNUM: u32 = 256;

/// Whose event a trap number taken while a guest ran is: the one rule the
/// switcher (which services host interrupts) and the run loop (which builds
/// the [`Exit`]) share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapOwner {
    /// An exception or software interrupt of the guest's (0..=31, including
    /// the hypercall vector 0x1f, and the syscall vector 0x80): reflect it.
    Guest,
    /// A device interrupt (32..=255 except 0x80): the host services it.
    HostIrq,
    /// An NMI (vector 2): the host's, never reflected.
    HostNmi,
    /// [`ENTRY_FAULT_TRAPNUM`]: the guest's state could not be loaded.
    EntryFault,
}

impl TrapOwner {
    /// Classify `trapnum` (0..=255 or [`ENTRY_FAULT_TRAPNUM`]). Any other
    /// number cannot come from the switcher; it is treated as a host
    /// interrupt, so it is never reflected into the guest.
    ///
    /// Software `int n` from the guest with n ≥ 32 reaches the host only
    /// for 0x80 (the host gates for the others have DPL 0, so the guest
    /// takes #GP instead); every other vector ≥ 32 is hardware.
    pub fn of(trapnum: u32) -> Self {
        match trapnum {
            ENTRY_FAULT_TRAPNUM => Self::EntryFault,
            trap::NMI => Self::HostNmi,
            SYSCALL_VECTOR => Self::Guest,
            0..FIRST_EXTERNAL_VECTOR => Self::Guest,
            _ => Self::HostIrq,
        }
    }
}

impl Exit {
    /// The exit for trap number `trapnum` as the switcher reports it, with
    /// the hardware error code and CR2 it saved. For an entry fault the
    /// switcher passes the vector of its CPL-0 fault in the CR2 slot
    /// (`switch::entry_fault`).
    pub fn from_trapnum(trapnum: u32, errcode: u32, cr2: u32) -> Self {
        match TrapOwner::of(trapnum) {
            TrapOwner::EntryFault => Exit::EntryFault {
                fault: cr2,
                errcode,
            },
            TrapOwner::HostIrq | TrapOwner::HostNmi => Exit::HostInterrupt,
            TrapOwner::Guest => Exit::Trap {
                vector: trapnum,
                errcode,
                cr2,
            },
        }
    }
}

/// What the host must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again (after [`Vcpu::prepare_entry`]).
    Resume,
    /// `LHCALL_NOTIFY(addr)`: report `addr` to the launcher (or signal the
    /// eventfd bound to it and continue).
    Notify(u32),
    /// The guest halted: sleep until [`Vcpu::has_deliverable_irq`] (after a
    /// new [`Vcpu::set_irq`]), then call [`Vcpu::prepare_entry`] again.
    Halt,
    /// The guest is dead; [`Vcpu::dead_reason`] says why.
    Dead,
    /// The guest asked to be restarted (`LHCALL_SHUTDOWN` reason 2).
    Restart,
}

/// Host services the state machine needs (faked in tests).
pub trait Env {
    /// Wall-clock time (`CLOCK_REALTIME`) as (seconds, nanoseconds).
    fn wallclock(&self) -> (i32, i32);
    /// TSC frequency in kHz if the TSC is constant and usable, else 0.
    fn tsc_khz(&self) -> u32;
    /// `LHCALL_SET_CLOCKEVENT`: fire virtual irq 0 (via [`Vcpu::set_irq`])
    /// `delta_ns` from now; `None` cancels.
    fn set_clockevent(&mut self, delta_ns: Option<u64>);
    /// `LHCALL_TS`: the guest's virtual CR0.TS changed. While it is set, the
    /// host must make guest FPU use trap (#NM), as lguest did (CR0.TS set
    /// while this guest runs).
    fn set_ts(&mut self, on: bool);
    /// The host side of shadow paging: where this guest's shadow table
    /// frames come from and how their entries are reached.
    type Tables: ShadowBackend;
    /// See [`Env::Tables`].
    fn tables(&mut self) -> &mut Self::Tables;
    /// What is fixed about this guest's shadow paging (its page-table
    /// format, where its memory is, the host half, the caps), for the
    /// `kernel_address` it declared (already checked), asked once, at INIT.
    fn shadow_config(&self, kernel_address: u32) -> ShadowConfig;
}

/// What the host must do to the MMU before the guest runs again (see
/// [`Vcpu::take_mmu_work`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MmuWork {
    /// Load this shadow (its root into CR3; `flush` says whether TLB
    /// entries tagged with its slot may be stale).
    pub load: Option<Switch>,
    /// Then invalidate this in the loaded shadow.
    pub flush: Flush,
}

/// One stored guest IDT gate: selector forced to 0x61, high dword masked
/// with `0xFFFF_EF00` (offset 31:16, P, DPL, type). `repr(C)`: the
/// hypercall stub's lane reads the gates of irqs in place.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdtEntry {
    /// Low dword: selector << 16 | offset 15:0.
    pub lo: u32,
    /// High dword: offset 31:16 | P | DPL | type.
    pub hi: u32,
}

impl IdtEntry {
    /// Present bit.
    pub fn present(&self) -> bool {
        self.hi & 0x8000 != 0
    }
    /// Handler address.
    pub fn offset(&self) -> u32 {
        (self.lo & 0xFFFF) | (self.hi & 0xFFFF_0000)
    }
    /// Gate type ([`IDT_TYPE_INTERRUPT`] or [`IDT_TYPE_TRAP`] when present).
    pub fn gate_type(&self) -> u32 {
        (self.hi >> 8) & 0xF
    }
    /// Gate DPL (the guest's choice; 3 lets user code `int` to it).
    pub fn dpl(&self) -> u8 {
        ((self.hi >> 13) & 3) as u8
    }
}

/// EFLAGS.TF (single-step).
pub const EFLAGS_TF: u32 = 0x100;
/// EFLAGS.NT (nested task).
pub const EFLAGS_NT: u32 = 0x4000;
/// EFLAGS.RF (resume).
pub const EFLAGS_RF: u32 = 0x1_0000;
/// EFLAGS.VM (virtual-8086 mode).
pub const EFLAGS_VM: u32 = 0x2_0000;
/// EFLAGS bits the guest may have: CF PF AF ZF SF TF DF OF AC ID.
/// (IF is forced on, IOPL/NT/RF/VM/VIF/VIP forced off.)
pub const EFLAGS_GUEST_MASK: u32 = 0x0024_0DD5;

/// The EFLAGS value the switcher may load for the guest: only the
/// [`EFLAGS_GUEST_MASK`] bits of `eflags`, plus IF (the real IF is always on
/// while a guest runs) and the always-one bit 1. IOPL is always 0.
pub fn sanitize_eflags(eflags: u32) -> u32 {
    (eflags & EFLAGS_GUEST_MASK) | X86_EFLAGS_IF | 0x2
}

/// The guest-view GDT limit `sgdt` shows: 32 descriptors (its base is 0).
pub const GUEST_GDT_LIMIT: u16 = 32 * 8 - 1;
/// The guest-view IDT limit `sidt` shows: 256 gates (its base is 0).
pub const GUEST_IDT_LIMIT: u16 = 256 * 8 - 1;
/// CR0.TS.
const CR0_TS: u32 = 1 << 3;
/// The guest-view CR0 without TS: PE, MP, ET, NE, PG.
pub const GUEST_CR0: u32 = 1 | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 31;

/// The #PF error code bits (present, user, instruction fetch) and their
/// values when the guest kernel fetched an instruction from a present user
/// page: what SMEP refuses.
const PF_SMEP_MASK: u32 = 0x1 | 0x4 | 0x10;
const PF_SMEP_VIOLATION: u32 = 0x1 | 0x10;

/// Guest page size for splitting guest-virtual accesses.
const PAGE: u32 = 4096;

/// The per-guest (single-vCPU) lguest state.
#[derive(Clone)]
pub struct Vcpu {
    /// Unique per vCPU ever made (never reused): tells one guest's cached
    /// state (GDT, FPU) from another's.
    instance: u64,
    /// The guest's registers; the switcher loads them on entry and saves
    /// them on exit.
    pub regs: Regs,
    /// The guest's GDT (validated entries; host slots always zero).
    pub gdt: GuestGdt,
    lguest_data: Option<u32>,
    noirq_start: u32,
    noirq_end: u32,
    kernel_address: u32,
    idt: [IdtEntry; IDT_ENTRIES as usize],
    idt_generation: u64,
    /// The gates of [`STUB_VECTORS`] as the stubs read them, decoded when
    /// they are loaded: the handler's EIP with [`StubGate::INTERRUPT`], and
    /// the DPL (`None`: not present). `stub_view` adds the CPL bits.
    stub_gates: [Option<(u64, u8)>; 2],
    ss1: u32,
    /// The GDT generation under which `SET_STACK` found `ss1` a valid CPL-1
    /// stack (it is then still one while the GDT is unchanged).
    ss1_checked: Option<u64>,
    /// The base of `ss1`'s segment under the generation `ss1_checked`
    /// names (set wherever that is).
    ss1_base: u32,
    esp1: u32,
    stack_pages: u32,
    stack_set: bool,
    ts: bool,
    pending: u32,
    halted: bool,
    dead: Option<DeathReason>,
    restart: bool,
    ring_cursor: usize,
    /// A synchronous hypercall (eax, ebx, ecx, edx, esi) not yet finished.
    pending_hcall: Option<HcallArgs>,
    /// The GDT generations and (cs, ss, ds, es, fs, gs) sets last found
    /// valid by `check_entry_state`: validity depends only on these, so an
    /// entry with the same values skips the six descriptor checks. Several,
    /// because a guest moves between a few sets all the time (Linux's user
    /// mode, its kernel entered from user mode with the user's data
    /// segments, its kernel with the per-CPU `fs`, each with a process's own
    /// `gs`): with one, every trap from user mode would miss, and the
    /// shortcuts that need a validated set after the trap would decline. A
    /// set lives in the slot its selectors hash to ([`SelKey::slot`]), so a
    /// lookup is one comparison; a collision only costs a re-check.
    validated: [Option<SelKey>; VALIDATED_SETS],
    /// Shadow paging (from INIT; in linear mode until the first
    /// `NEW_PGTABLE`).
    shadow: Option<ShadowPaging>,
    /// While the async ring's `NEW_PGTABLE` runs: a `SET_STACK` comes next
    /// in the ring, so the switch need not pin the old stack.
    pin_later: bool,
    /// Tests: the drain's context-switch start ([`Vcpu::drain_switch`]) is
    /// off, leaving the loop alone (the oracle it is held to).
    #[cfg(test)]
    drain_switch_off: bool,
    /// Tests: entries the drain's context-switch start did.
    #[cfg(test)]
    drain_switched: u32,
    /// A `NEW_PGTABLE` switch the host has not loaded yet.
    mmu_load: Option<Switch>,
    /// A page fault [`Vcpu::fast_paging`] found to be the guest's own
    /// (`cr2`, error code to reflect), for the full path to deliver without
    /// asking the shadow core again.
    decided_pf: Option<(u32, u32)>,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("regs", &self.regs)
            .field("lguest_data", &self.lguest_data)
            .field("pending", &self.pending)
            .field("halted", &self.halted)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// What the hypercall stub (the world switch's answer to `int $0x1f` that
/// never leaves the trap stack) and the reflection stubs (its answer to
/// `int3` and `int $0x80`) may do for this guest until its next exit that
/// reaches the run loop.
///
/// The hypercall stub answers the calls in [`trivial`](Self::trivial) by
/// returning at once, as long as the async ring has no entry at
/// [`ring_status`](Self::ring_status) and no virtual irq is pending. Those
/// are exactly the conditions under which the full path
/// ([`Vcpu::handle_exit`] then [`Vcpu::prepare_entry`]) changes nothing but
/// the register block's `trapnum`/`errcode` bookkeeping (and EFLAGS
/// sanitising, which the stub does too): the call is a no-op, the ring drain
/// finds nothing, there is nothing to deliver, and the selectors are the
/// ones the guest is running with.
///
/// The reflection stubs push the i386 frame of a [`STUB_VECTORS`] trap onto
/// the guest's stack and enter its gate, following [`StubView::reflect`]
/// (the model they implement instruction by instruction, tested against the
/// full path here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StubView {
    /// Bit `n` set: hypercall `n` is a no-op right now.
    pub trivial: u32,
    /// Guest-physical address of `lguest_data.hcall_status[cursor]`: the
    /// stub answers only while it is `HCALL_STATUS_EMPTY`.
    pub ring_status: u32,
    /// Pending virtual irqs: the stubs act only while this is 0 (and no
    /// new irq was raised from interrupt context).
    pub pending: u32,
    /// Guest-physical address of `lguest_data.irq_enabled`.
    pub irq_enabled: u32,
    /// The stack segment a kernel-mode (CPL 1) trap must come from to be
    /// reflected by a stub — the one the guest was last entered with, when
    /// that was at CPL 1 (validated then) — or 0 (never matches: the full
    /// path decides).
    pub kss: u32,
    /// Base of [`kss`](Self::kss).
    pub kss_base: u32,
    /// The `SET_STACK` stack segment (validated as a CPL-1 stack now) that
    /// a user-mode trap switches to, or 0 when there is none or its 5-word
    /// frame would not lie inside `[0, limit)`.
    pub ss1: u32,
    /// Guest-physical address of the 5-word frame a user-mode trap pushes
    /// (`ss1`'s base + `esp1` − 20), when `ss1 != 0`.
    pub user_frame: u32,
    /// The handler's ESP after a user-mode trap (`esp1` − 20).
    pub user_esp: u32,
    /// The frame's linear address (`ss1`'s base + `esp1` − 20), when
    /// `ss1 != 0`: what `user_frame` translates.
    pub user_linear: u32,
    /// The guest-physical bytes a stub may push a frame into: `[0, limit)`
    /// (linear mode: guest-virtual == guest-physical).
    pub limit: u32,
    /// The guest gates of [`STUB_VECTORS`], in that order.
    pub gates: [StubGate; 2],
}

/// Where the stubs find the vCPU state they read and write in place (see
/// [`Vcpu::stub_ptrs`]).
#[derive(Debug, Clone, Copy)]
pub struct StubPtrs {
    /// The pending irq word.
    pub pending: *mut u32,
    /// `LGUEST_IRQS` IDT gates, from vector 32 (`IdtEntry` is `repr(C)`).
    pub irq_gates: *const IdtEntry,
    /// The async ring cursor (always below `LHCALL_RING_SIZE`).
    pub ring_cursor: *mut usize,
}

/// The vectors with a reflection stub: `int3` and the system call.
pub const STUB_VECTORS: [u32; 2] = [trap::BP, SYSCALL_VECTOR];

/// A guest gate as a reflection stub reads it: one word, `0` when the stub
/// must leave the trap to the full path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StubGate(pub u64);

impl StubGate {
    /// Bit: a trap from CPL 1 may take this gate (present, DPL ≥ 1, and the
    /// guest runs at CPL 1 with a validated stack).
    pub const FROM_KERNEL: u64 = 1 << 32;
    /// Bit: a trap from CPL 3 may take this gate (present, DPL 3, and the
    /// guest has a valid `SET_STACK` stack).
    pub const FROM_USER: u64 = 1 << 33;
    /// Bit: an interrupt gate (entering it clears the virtual IF).
    pub const INTERRUPT: u64 = 1 << 34;

    /// The handler's EIP.
    pub fn eip(self) -> u32 {
        self.0 as u32
    }

    /// Whether a trap from `cpl` may be reflected through this gate.
    pub fn allows(self, cpl: u32) -> bool {
        let bit = if cpl == 1 {
            Self::FROM_KERNEL
        } else {
            Self::FROM_USER
        };
        self.0 & bit != 0
    }
}

/// The frame registers of a trap from compatibility mode, laid out as the
/// CPU pushes them in 64-bit mode (so the trap path can hand over the
/// hardware frame itself): 32-bit values, zero-extended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HwFrame {
    /// EIP of the instruction after the `int`.
    pub eip: u64,
    /// CS (its RPL is the CPL the trap came from).
    pub cs: u64,
    /// EFLAGS.
    pub eflags: u64,
    /// ESP.
    pub esp: u64,
    /// SS.
    pub ss: u64,
}

impl HwFrame {
    /// The frame registers of `r`.
    pub fn of(r: &Regs) -> Self {
        Self {
            eip: u64::from(r.eip),
            cs: u64::from(r.cs),
            eflags: u64::from(r.eflags),
            esp: u64::from(r.esp),
            ss: u64::from(r.ss),
        }
    }

    /// The frame `(eip, cs, eflags, esp, ss)` from 32-bit values.
    fn new(eip: u32, cs: u32, eflags: u32, esp: u32, ss: u32) -> Self {
        Self {
            eip: u64::from(eip),
            cs: u64::from(cs),
            eflags: u64::from(eflags),
            esp: u64::from(esp),
            ss: u64::from(ss),
        }
    }

    /// EFLAGS sanitised as every entry does (see [`sanitize_eflags`]).
    pub fn sanitize(&mut self) {
        self.eflags = u64::from(sanitize_eflags(self.eflags as u32));
    }
}

impl StubView {
    /// What a reflection stub does with trap `vector` (no error code) that
    /// arrived with frame `f` while the irqs `raised` were raised from
    /// interrupt context: push the i386 frame and point `f` at the guest's
    /// gate (`true`), or change nothing (`false`: the full path runs).
    ///
    /// The data segment registers are not looked at: the guest may have
    /// changed them since its last entry, but only with the CPU's checks,
    /// which accept exactly what the full path's entry check accepts at the
    /// same CPL (the hardware GDT holds only validated guest descriptors),
    /// and whatever is valid at CPL 3 is valid at CPL 1.
    pub fn reflect<M: GuestMemory>(
        &self,
        vector: u32,
        f: &mut HwFrame,
        raised: u32,
        mem: &mut M,
    ) -> bool {
        let Some(i) = STUB_VECTORS.iter().position(|&v| v == vector) else {
            return false;
        };
        let Some(&gate) = self.gates.get(i) else {
            return false;
        };
        if self.pending | raised != 0 {
            return false;
        }
        let (eip, cs, fl, fesp, fss) = (
            f.eip as u32,
            f.cs as u32,
            f.eflags as u32,
            f.esp as u32,
            f.ss as u32,
        );
        let cpl = cs & 3;
        if !gate.allows(cpl) {
            return false;
        }
        let (low, esp, ss, bytes) = if cpl == 1 {
            if fss != self.kss || self.kss == 0 {
                return false;
            }
            let top = self.kss_base.wrapping_add(fesp);
            if top > self.limit {
                return false;
            }
            let Some(low) = top.checked_sub(12) else {
                return false;
            };
            (low, fesp.wrapping_sub(12), fss, 12u32)
        } else {
            // Decided when armed (`FROM_USER` is only set if it fits).
            (self.user_frame, self.user_esp, self.ss1, 20u32)
        };
        let Ok(ie) = mem.read_u32(self.irq_enabled) else {
            return false;
        };
        let eflags = if ie & X86_EFLAGS_IF == 0 {
            fl & !X86_EFLAGS_IF
        } else {
            fl
        };
        let words = [eip, cs, eflags, fesp, fss];
        let n = (bytes / 4) as usize;
        if mem.write_u32s(low, words.get(..n).unwrap_or(&[])).is_err() {
            return false;
        }
        if gate.0 & StubGate::INTERRUPT != 0 && mem.write_u32(self.irq_enabled, 0).is_err() {
            return false;
        }
        *f = HwFrame::new(
            gate.eip(),
            u32::from(KERNEL_CS),
            sanitize_eflags(fl & !(EFLAGS_TF | EFLAGS_VM | EFLAGS_RF | EFLAGS_NT)),
            esp,
            ss,
        );
        true
    }
}

/// Hypercalls that do nothing in linear mode: `FLUSH_ASYNC` (its work, the
/// ring drain, happens before every call anyway), `SEND_INTERRUPTS` (its
/// work, delivery, happens before every entry anyway) and `FLUSH_TLB`
/// (nothing is cached without shadow paging).
const TRIVIAL_HCALLS: u32 = (1 << guest_abi::hcall::LHCALL_FLUSH_ASYNC)
    | (1 << guest_abi::hcall::LHCALL_SEND_INTERRUPTS)
    | (1 << guest_abi::hcall::LHCALL_FLUSH_TLB);

/// The six selectors of a register block and the GDT generation they were
/// checked against: the key of the "already validated" cache that lets an
/// entry skip re-checking selectors that did not change. Four plain words,
/// compared without a `memcmp`.
/// How many validated selector sets the vCPU remembers.
const VALIDATED_SETS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SelKey {
    generation: u64,
    cs_ss: u64,
    ds_es: u64,
    fs_gs: u64,
}

impl SelKey {
    /// The slot of `Vcpu::validated` this set lives in: a fold of the
    /// selectors (their low bits tell Linux's sets apart: RPL, TI, index).
    #[inline]
    fn slot(&self) -> usize {
        let h = self.cs_ss ^ self.ds_es.rotate_left(5) ^ self.fs_gs.rotate_left(11);
        let h = h ^ (h >> 32) ^ (h >> 19) ^ (h >> 7);
        (h as usize) % VALIDATED_SETS
    }

    /// The six selectors: CS, SS, DS, ES, FS, GS.
    fn selectors(&self) -> [u32; 6] {
        let [a, b, c] = [self.cs_ss, self.ds_es, self.fs_gs];
        let (lo, hi) = (|p: u64| p as u32, |p: u64| (p >> 32) as u32);
        [lo(a), hi(a), lo(b), hi(b), lo(c), hi(c)]
    }

    #[inline]
    fn of(generation: u64, r: &Regs) -> Self {
        let pair = |a: u32, b: u32| u64::from(a) | (u64::from(b) << 32);
        Self {
            generation,
            cs_ss: pair(r.cs, r.ss),
            ds_es: pair(r.ds, r.es),
            fs_gs: pair(r.fs, r.gs),
        }
    }
}

/// Whether selector `sel` names one of the GDT's TLS entries.
fn selects_tls(sel: u32) -> bool {
    let index = (sel >> 3) as usize;
    sel & 4 == 0 && (TLS_FIRST..TLS_FIRST + TLS_ENTRIES).contains(&index)
}

/// A reflection frame decided by `Vcpu::fast_frame`: `words[first..end]`
/// go to guest-physical `low` upwards; the handler runs on `ss`:`esp`
/// (`esp` is `low` minus the segment base).
struct FastFrame {
    words: [u32; 6],
    first: usize,
    end: usize,
    low: u32,
    ss: u32,
    esp: u32,
}

/// How far a drain of the async ring got (`Vcpu::drain_ring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// The ring is empty.
    Empty,
    /// At an entry the caller leaves to someone else; the cursor is on it.
    Stopped,
    /// An entry produced something the launcher must see (the cursor is
    /// past it).
    Action(Action),
}

/// What the host owes the MMU after [`Vcpu::stub_paging`] took a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneDone {
    /// Load this shadow root (a switch to a cached, clean shadow, with no
    /// invalidation owed: the full path's `Switch` would say `flush:
    /// false`); nothing is left in `take_mmu_work`.
    Load(u64),
    /// Apply [`Vcpu::take_mmu_work`].
    Work,
}

/// What [`Vcpu::stub_flush_switch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushSwitch {
    /// Nothing but the guest's data selectors going into `regs`:
    /// [`Vcpu::stub_flush`] decides.
    Declined,
    /// A context switch's entries were done, and more follow in the ring:
    /// [`Vcpu::stub_flush`] goes on from there (as one drain would have).
    Partial,
    /// All of the exit, exactly as [`Vcpu::stub_flush`] would have finished
    /// it, but that the switch it owes the MMU is here (not in
    /// [`Vcpu::take_mmu_work`], which owes nothing); the GDT and the TS flag
    /// are as they were. `frame` is the reflection stubs' user-mode frame
    /// below the new stack, `(linear, guest-physical)` as
    /// [`Vcpu::user_frame_in`] finds it (`None`: not in the pinned top page,
    /// and the host arms the stubs in full).
    Done {
        /// The shadow to load (a cached one: `flush` false).
        switch: Switch,
        /// The new stack's user-mode frame.
        frame: Option<(u32, u32)>,
        /// The [`Vcpu::pin_key`] now.
        pin: u64,
    },
}

/// Source of [`Vcpu::instance`] numbers.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

impl Vcpu {
    /// This vCPU's instance number: unique among all vCPUs ever made.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// What the hypercall and reflection stubs may do for this guest now
    /// (frames pushed only into guest-physical `[0, limit)`), or `None` if
    /// every exit must take the full path (before INIT, dead, halted, or a
    /// call waiting to be finished).
    pub fn stub_view(&self, limit: u32) -> Option<StubView> {
        self.stub_view_with(limit, None)
    }

    /// [`Self::stub_view`] for the run loop, which has the guest's memory:
    /// under shadow paging too, a user-mode trap may then be reflected by
    /// the stubs, onto the `SET_STACK` stack, when its 20-byte frame lies
    /// in one page that the guest's tables map writable for the kernel with
    /// ACCESSED and DIRTY already set (so pushing it there changes nothing
    /// the CPU would have changed); the view then holds the frame's
    /// guest-physical address. Kernel-mode traps still take the full path
    /// under paging (their stack is wherever the guest's ESP points).
    ///
    /// The frame's page is found as [`stub_frame_gpa`](Self::stub_frame_gpa)
    /// finds it: where the current shadow maps it writable (the pinned
    /// stack: no walk; a writable leaf means an accessed and dirty guest
    /// entry), else through the guest's tables, quietly.
    pub fn stub_view_in<M: GuestMemory, E: Env>(&self, mem: &M, env: &mut E) -> Option<StubView> {
        let b = env.tables();
        let translate = |va: u32| self.shadow.as_ref()?.quiet_write_gpa(b, mem, va);
        self.stub_view_with(mem.limit(), Some(&translate))
    }

    /// The user-mode frame part of [`stub_view_in`](Self::stub_view_in)
    /// alone: `(user_linear, user_frame)` as that view would have them
    /// (`None` where its `ss1` would be 0). For a host that re-arms only
    /// the frame after a change of the `SET_STACK` stack that leaves the
    /// rest of the view as it was.
    #[inline]
    pub fn user_frame_in<M: GuestMemory, E: Env>(
        &self,
        mem: &M,
        env: &mut E,
    ) -> Option<(u32, u32)> {
        if let Some(f) = self.pinned_user_frame(mem.limit()) {
            return Some(f);
        }
        let b = env.tables();
        let translate = |va: u32| self.shadow.as_ref()?.quiet_write_gpa(b, mem, va);
        self.user_frame_with(mem.limit(), Some(&translate))
    }

    /// Where the reflection stubs' user-mode frame at linear `low` (one
    /// page, as armed) lies now under shadow paging: the page as the current
    /// shadow maps it present and writable (a pinned stack page, read from
    /// the shadow's own tables: no walk of the guest's), else as the guest's
    /// tables map it quietly (as [`stub_view_in`](Self::stub_view_in) finds
    /// it); `None` if neither, or if the frame would not fit in guest
    /// memory. The run loop compares it with what the stubs were armed with
    /// after a shadow-paging call finished on the trap stack (which may have
    /// moved the page). The shadow's leaf is the guest's entry as the guest
    /// last told the hypervisor of it (lguest's rule: every change of a
    /// present entry is announced); a guest that rewrites the stack's entry
    /// behind the hypervisor's back may get the frame where the old entry
    /// pointed until the next arming, in its own memory either way.
    pub fn stub_frame_gpa<M: GuestMemory, E: Env>(
        &self,
        low: u32,
        mem: &M,
        env: &mut E,
    ) -> Option<u32> {
        let sh = self.shadow.as_ref().filter(|s| s.is_paging())?;
        let pa = sh.quiet_write_gpa(env.tables(), mem, low)?;
        pa.checked_add(20)
            .is_some_and(|end| end <= mem.limit())
            .then_some(pa)
    }

    /// [`user_frame_in`](Self::user_frame_in) in its common case, without
    /// the general path's translation: under paging, a `SET_STACK` segment
    /// checked under this GDT with base 0, and the frame in the stack's top
    /// page, which the loaded shadow holds pinned (its leaf at hand:
    /// [`ShadowPaging::pinned_top_gpa`]). The same answer as the general
    /// path there; `None` otherwise (the general path decides).
    #[inline]
    fn pinned_user_frame(&self, limit: u32) -> Option<(u32, u32)> {
        if !self.paging() || !self.stack_set || self.ss1_checked != Some(self.gdt.generation()) {
            return None;
        }
        self.frame_in_top(self.shadow.as_ref()?.pin_key()?, limit)
    }

    /// [`pinned_user_frame`](Self::pinned_user_frame) once the stack is
    /// known checked under this GDT and pinned in the loaded shadow, with
    /// `pin_top` its top page's leaf there (the [`pin_key`](Self::pin_key)):
    /// the frame when it lies in that page and the stack segment is based
    /// at 0.
    #[inline(always)]
    fn frame_in_top(&self, pin_top: u64, limit: u32) -> Option<(u32, u32)> {
        let low = self.esp1.checked_sub(20)?;
        if self.ss1_base != 0 || (low ^ self.esp1.wrapping_sub(1)) & !0xFFF != 0 {
            return None;
        }
        let pa = self.shadow.as_ref()?.leaf_gpa(pin_top)? | (low & 0xFFF);
        pa.checked_add(20)
            .is_some_and(|end| end <= limit)
            .then_some((low, pa))
    }

    /// The user-mode frame part of [`stub_view_with`](Self::stub_view_with):
    /// the frame's guest-physical address, if the `SET_STACK` stack is valid
    /// and the frame lies inside guest memory (under paging: in one page,
    /// translated by `translate` without side effects).
    fn user_frame_with(
        &self,
        limit: u32,
        translate: Option<&dyn Fn(u32) -> Option<u32>>,
    ) -> Option<(u32, u32)> {
        let linear = !self.paging();
        let ss1_ok = (linear || translate.is_some())
            && self.stack_set
            && (self.ss1_checked == Some(self.gdt.generation())
                || u16::try_from(self.ss1).is_ok_and(|s| self.gdt.valid_stack_selector(s, 1)));
        if !ss1_ok {
            return None;
        }
        let user_top = u16::try_from(self.ss1)
            .map_or(0, |s| self.gdt.segment_base(s))
            .wrapping_add(self.esp1);
        let user_low = user_top.checked_sub(20);
        if linear {
            return user_low.filter(|_| user_top <= limit).map(|l| (l, l));
        }
        // The frame's linear address through the guest's own tables,
        // without side effects, and all of it in one page.
        match (user_low, translate) {
            (Some(low), Some(tr)) if low >> 12 == user_top.wrapping_sub(1) >> 12 => tr(low)
                .filter(|pa| pa.checked_add(20).is_some_and(|end| end <= limit))
                .map(|pa| (low, pa)),
            _ => None,
        }
    }

    /// `translate`: how a user frame's linear address becomes guest-physical
    /// under paging (`None`: no reflection under paging).
    fn stub_view_with(
        &self,
        limit: u32,
        translate: Option<&dyn Fn(u32) -> Option<u32>>,
    ) -> Option<StubView> {
        let ld = self.lguest_data?;
        if self.dead.is_some() || self.restart || self.halted || self.pending_hcall.is_some() {
            return None;
        }
        // `ring_cursor < LHCALL_RING_SIZE` (64) and `ld + SIZE <= limit`
        // (checked at INIT), so this stays inside lguest_data.
        let slot = (self.ring_cursor % LHCALL_RING_SIZE) as u32;
        // A kernel-mode trap may be reflected on the stack the guest was
        // entered with, if it was entered at CPL 1 with selectors that
        // passed the entry check; a user-mode one on a valid SET_STACK stack.
        // Under shadow paging a kernel-mode frame goes wherever the guest's
        // ESP points, which only the full path translates; a user-mode one
        // goes to the SET_STACK stack, translated here (`translate`).
        let linear = !self.paging();
        let validated = self.is_validated(&SelKey::of(self.gdt.generation(), &self.regs));
        let kss = if linear && validated && self.cpl() == 1 {
            self.regs.ss
        } else {
            0
        };
        let base = |ss: u32| u16::try_from(ss).map_or(0, |s| self.gdt.segment_base(s));
        let (ss1, user_linear, user_frame) = match self.user_frame_with(limit, translate) {
            Some((linear, pa)) => (self.ss1, linear, pa),
            None => (0, 0, 0),
        };
        let gate = |g: Option<(u64, u8)>| {
            let Some((base, dpl)) = g else {
                return StubGate(0);
            };
            let mut bits = base;
            if kss != 0 && dpl >= 1 {
                bits |= StubGate::FROM_KERNEL;
            }
            if ss1 != 0 && dpl >= 3 {
                bits |= StubGate::FROM_USER;
            }
            StubGate(bits)
        };
        Some(StubView {
            trivial: self.trivial_hcalls(),
            ring_status: ld
                .wrapping_add(LguestData::OFF_HCALL_STATUS)
                .wrapping_add(slot),
            pending: self.pending,
            irq_enabled: ld.wrapping_add(LguestData::OFF_IRQ_ENABLED),
            kss,
            kss_base: base(kss),
            ss1,
            user_frame,
            user_esp: self.esp1.wrapping_sub(20),
            user_linear,
            limit,
            gates: self.stub_gates.map(gate),
        })
    }

    /// Where the hypercall stub finds, in place, what it reads and writes
    /// of this vCPU while the guest runs (the run loop is suspended then):
    /// the pending irq word, which its lane may clear bits of (after moving
    /// interrupt-raised irqs in), the IDT gates of the irqs (vectors 32
    /// onwards, `LGUEST_IRQS` of them), which it only reads, and the async
    /// ring cursor, which its drain advances. Used as
    /// [`stub_deliver`](Self::stub_deliver) and
    /// [`stub_drain`](Self::stub_drain) describe.
    pub fn stub_ptrs(&mut self) -> StubPtrs {
        StubPtrs {
            pending: &raw mut self.pending,
            irq_gates: self
                .idt
                .get(FIRST_EXTERNAL_VECTOR as usize..)
                .map_or(core::ptr::null(), <[IdtEntry]>::as_ptr),
            ring_cursor: &raw mut self.ring_cursor,
        }
    }

    /// The hypercall stub's drain (the model its assembly follows, tested
    /// here against the full path): takes the no-op calls (those of
    /// [`StubView::trivial`]) off the async ring from the cursor on, exactly
    /// as the full path's drain would (status byte set empty, cursor
    /// advanced), until an empty slot — `true`: the ring is empty now and
    /// the stub may go on answering — or anything else — `false`: the full
    /// path goes on from there. At most one pass over the ring (and a look
    /// at the slot it started from).
    pub fn stub_drain<M: GuestMemory>(&mut self, mem: &mut M) -> bool {
        let Some(ld) = self.lguest_data else {
            return false;
        };
        let mut n = self.ring_cursor % LHCALL_RING_SIZE;
        let mut emptied = false;
        // One pass, plus the look at the slot it started from (emptied by
        // then if the whole ring held no-op calls).
        for _ in 0..=LHCALL_RING_SIZE {
            // `n < 64` and lguest_data lies inside guest memory (checked at
            // INIT).
            let status = ld.wrapping_add(LguestData::off_hcall_status(n as u32));
            match mem.read_u8(status) {
                Ok(HCALL_STATUS_EMPTY) => {
                    emptied = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
            let arg0 = mem.read_u32(ld.wrapping_add(LguestData::off_hcall(n as u32)));
            match arg0 {
                Ok(nr) if nr < 32 && self.trivial_hcalls() & (1 << nr) != 0 => {}
                _ => break,
            }
            if mem.write_u8(status, HCALL_STATUS_EMPTY).is_err() {
                break;
            }
            n = n.wrapping_add(1) % LHCALL_RING_SIZE;
        }
        self.ring_cursor = n;
        emptied
    }

    /// What the hardware GDT must hold for this guest now: its descriptors
    /// as of the current generation, told apart from every other guest's.
    pub fn gdt_key(&self) -> GdtKey {
        GdtKey {
            instance: self.instance,
            generation: self.gdt.generation(),
        }
    }

    /// A fresh guest about to start at `start_eip` (docs/abi.md, section 1): CS
    /// 0x61, DS/ES/SS 0x69, FS/GS 0, EFLAGS 0x202, all GPRs and ESP 0
    /// (`esi` = 0 = guest-physical address of `boot_params`).
    pub fn new(start_eip: u32) -> Self {
        let regs = Regs {
            eip: start_eip,
            cs: u32::from(KERNEL_CS),
            ds: u32::from(KERNEL_DS),
            es: u32::from(KERNEL_DS),
            ss: u32::from(KERNEL_DS),
            eflags: guest_abi::INITIAL_EFLAGS,
            trapnum: ENTRY_FAULT_TRAPNUM,
            ..Regs::default()
        };
        Self {
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            regs,
            gdt: GuestGdt::new(),
            lguest_data: None,
            noirq_start: 0,
            noirq_end: 0,
            kernel_address: 0,
            idt: [IdtEntry::default(); IDT_ENTRIES as usize],
            idt_generation: 0,
            stub_gates: [None; 2],
            ss1: 0,
            ss1_checked: None,
            ss1_base: 0,
            esp1: 0,
            stack_pages: 0,
            stack_set: false,
            ts: false,
            pending: 0,
            halted: false,
            dead: None,
            restart: false,
            ring_cursor: 0,
            pending_hcall: None,
            validated: [None; VALIDATED_SETS],
            pin_later: false,
            #[cfg(test)]
            drain_switch_off: false,
            #[cfg(test)]
            drain_switched: 0,
            shadow: None,
            mmu_load: None,
            decided_pf: None,
        }
    }

    // ----------------------------------------------------------------------
    // Accessors.

    /// Guest-physical address of `lguest_data` once `LHCALL_LGUEST_INIT` ran.
    pub fn lguest_data(&self) -> Option<u32> {
        self.lguest_data
    }
    /// The guest IDT (for the switcher to mirror gate DPLs into host gates).
    pub fn idt(&self) -> &[IdtEntry; IDT_ENTRIES as usize] {
        &self.idt
    }
    /// Incremented whenever the guest IDT changes.
    pub fn idt_generation(&self) -> u64 {
        self.idt_generation
    }
    /// Kernel stack from `LHCALL_SET_STACK`: (ss1, esp1, pages), if set.
    pub fn kernel_stack(&self) -> Option<(u32, u32, u32)> {
        self.stack_set
            .then_some((self.ss1, self.esp1, self.stack_pages))
    }
    /// The guest's virtual CR0.TS.
    pub fn ts(&self) -> bool {
        self.ts
    }
    /// Bitmap of pending virtual irqs.
    pub fn pending_irqs(&self) -> u32 {
        self.pending
    }
    /// Whether the guest is halted (waiting for an interrupt).
    pub fn is_halted(&self) -> bool {
        self.halted
    }
    /// The guest's `noirq_start..noirq_end` window (from INIT).
    pub fn noirq_window(&self) -> (u32, u32) {
        (self.noirq_start, self.noirq_end)
    }
    /// The guest's `kernel_address` (PAGE_OFFSET) from INIT.
    pub fn kernel_address(&self) -> u32 {
        self.kernel_address
    }
    /// Whether the guest is dead (killed, powered off or restarting).
    pub fn is_dead(&self) -> bool {
        self.dead.is_some()
    }
    /// Whether the guest died asking to be restarted (the entry points
    /// report it as [`Action::Restart`]).
    #[cfg(test)]
    pub fn is_restart(&self) -> bool {
        self.restart
    }
    /// Why the guest died (`"power off: …"`, `"restart: …"` or a kill reason).
    pub fn dead_reason(&self) -> Option<&DeathReason> {
        self.dead.as_ref()
    }

    /// Kill the guest; only the first reason is kept.
    pub fn kill(&mut self, reason: impl fmt::Display) {
        if self.dead.is_none() {
            self.dead = Some(DeathReason::format(format_args!("{reason}")));
            self.halted = false;
            self.pending_hcall = None;
        }
    }

    /// Mark virtual irq `irq` pending (`LHREQ_IRQ`, timer expiry = irq 0).
    /// Numbers ≥ 32 are ignored (the channel rejects them with EINVAL).
    pub fn set_irq(&mut self, irq: u32) {
        if irq < LGUEST_IRQS {
            self.pending |= 1u32.checked_shl(irq).unwrap_or(0);
        }
    }

    /// Whether a pending irq is not blocked by the guest, i.e. a halted guest
    /// must wake up. A failing read of `lguest_data` counts as "yes" so the
    /// next [`prepare_entry`](Self::prepare_entry) kills the guest.
    pub fn has_deliverable_irq(&self, mem: &impl GuestMemory) -> bool {
        let Some(ld) = self.lguest_data else {
            return false;
        };
        if self.pending == 0 {
            return false;
        }
        match mem.read_u32(ld.wrapping_add(LguestData::OFF_BLOCKED_INTERRUPTS)) {
            Ok(blocked) => self.pending & !blocked != 0,
            Err(_) => true,
        }
    }

    /// Guest-virtual to guest-physical for an access the host makes on the
    /// guest's behalf (pushing a frame: a kernel write; an emulated
    /// instruction's fetch and store: with the privilege it ran at). Linear mode: identity for every address inside guest
    /// memory. Under shadow paging: through the guest's current tables,
    /// honouring their permissions (a supervisor write needs a writable
    /// page) and setting their ACCESSED/DIRTY bits as the CPU would.
    pub fn guest_pa(&self, mem: &mut impl GuestMemory, vaddr: u32, access: Access) -> Option<u32> {
        match self.shadow.as_ref().filter(|s| s.is_paging()) {
            Some(sh) => sh.translate_for_host(mem, vaddr, access).ok(),
            None => (vaddr < mem.limit()).then_some(vaddr),
        }
    }

    /// The access the host makes for the guest's current privilege level:
    /// what its own instruction could do (user pages only from CPL 3).
    fn access_at_cpl(&self, write: bool) -> Access {
        Access {
            write,
            user: self.cpl() == 3,
        }
    }

    /// Whether the guest runs on shadow page tables (after its first
    /// `NEW_PGTABLE`), rather than in linear mode.
    pub fn paging(&self) -> bool {
        self.shadow.as_ref().is_some_and(ShadowPaging::is_paging)
    }

    /// What the host must do to the MMU before the guest runs again: load
    /// the shadow a `NEW_PGTABLE` switched to, and apply the invalidations
    /// the shadow core owes the loaded shadow. Call after every
    /// [`handle_exit`](Self::handle_exit) and
    /// [`prepare_entry`](Self::prepare_entry) (it is empty in linear mode).
    pub fn take_mmu_work(&mut self) -> MmuWork {
        MmuWork {
            load: self.mmu_load.take(),
            flush: self
                .shadow
                .as_mut()
                .map_or(Flush::None, ShadowPaging::take_flush),
        }
    }

    /// The invalidation the shadow core owes the loaded shadow (the flush
    /// part of [`take_mmu_work`](Self::take_mmu_work), after a fill, which
    /// loads no other shadow).
    #[inline]
    pub fn take_shadow_flush(&mut self) -> Flush {
        self.shadow
            .as_mut()
            .map_or(Flush::None, ShadowPaging::take_flush)
    }

    /// The current shadow's root (host-physical PML4) under shadow paging.
    pub fn shadow_root(&self) -> Option<u64> {
        self.shadow.as_ref().and_then(ShadowPaging::current_root)
    }

    /// Guest-physical address of the async ring's next status byte (where
    /// the hypercall stub looks for queued calls); `None` before INIT.
    pub fn ring_slot(&self) -> Option<u32> {
        // `ring_cursor < LHCALL_RING_SIZE` and lguest_data lies inside guest
        // memory (checked at INIT).
        let slot = (self.ring_cursor % LHCALL_RING_SIZE) as u32;
        self.lguest_data.map(|ld| {
            ld.wrapping_add(LguestData::OFF_HCALL_STATUS)
                .wrapping_add(slot)
        })
    }

    /// The `SET_STACK` stack as last set (segment, top, pages), `None`
    /// before the first: what the reflection stubs' user-mode frame is
    /// armed from.
    pub fn stack_key(&self) -> Option<(u32, u32, u32)> {
        self.stack_set
            .then_some((self.ss1, self.esp1, self.stack_pages))
    }

    /// [`ShadowPaging::pin_key`] of the current shadow (`None` in linear
    /// mode).
    #[inline(always)]
    pub fn pin_key(&self) -> Option<u64> {
        self.shadow.as_ref().and_then(ShadowPaging::pin_key)
    }

    /// The shadow core (`None` before INIT), for its counters.
    pub fn shadow(&self) -> Option<&ShadowPaging> {
        self.shadow.as_ref()
    }

    /// Frees every shadow table frame (the guest died or restarts; no
    /// shadow may be loaded in CR3 any more) and forgets the shadows.
    pub fn release_shadows<B: ShadowBackend>(&mut self, b: &mut B) {
        if let Some(sh) = self.shadow.as_mut() {
            sh.release_all(b);
        }
        self.mmu_load = None;
    }

    /// The hypercalls that are no-ops right now (see [`StubView::trivial`]):
    /// `FLUSH_TLB` only in linear mode, where nothing is cached.
    fn trivial_hcalls(&self) -> u32 {
        if self.paging() {
            TRIVIAL_HCALLS & !(1 << guest_abi::hcall::LHCALL_FLUSH_TLB)
        } else {
            TRIVIAL_HCALLS
        }
    }

    // ----------------------------------------------------------------------
    // Entry points.

    fn death_action(&self) -> Option<Action> {
        if self.restart {
            Some(Action::Restart)
        } else if self.dead.is_some() {
            Some(Action::Dead)
        } else {
            None
        }
    }

    fn finish(&mut self, r: Result<Action, Kill>) -> Action {
        match r {
            Err(k) => self.kill(k),
            Ok(a) => {
                if self.dead.is_none() {
                    return if a == Action::Resume && self.halted {
                        Action::Halt
                    } else {
                        a
                    };
                }
            }
        }
        self.death_action().unwrap_or(Action::Dead)
    }

    /// Handle one exit from the guest. `self.regs` must hold the state the
    /// switcher saved.
    pub fn handle_exit<M: GuestMemory, E: Env>(
        &mut self,
        exit: Exit,
        mem: &mut M,
        env: &mut E,
    ) -> Action {
        if let Some(a) = self.death_action() {
            return a;
        }
        let r = match exit {
            Exit::HostInterrupt => Ok(Action::Resume),
            Exit::EntryFault { fault, errcode } => {
                self.regs.trapnum = ENTRY_FAULT_TRAPNUM;
                kill!(
                    "unhandled trap {ENTRY_FAULT_TRAPNUM} at {:#x} (fault {fault}, error {errcode:#x})",
                    self.regs.eip
                )
            }
            Exit::Trap {
                vector,
                errcode,
                cr2,
            } => {
                self.regs.trapnum = vector;
                self.regs.errcode = errcode;
                self.handle_trap(vector, errcode, cr2, mem, env)
            }
        };
        self.finish(r)
    }

    /// Call before every entry into the guest: finishes a hypercall whose
    /// async-ring drain was interrupted by a notify, delivers a pending
    /// virtual interrupt (lguest's `try_deliver_interrupt`), sanitises EFLAGS
    /// and checks every selector in `regs` against the guest GDT.
    ///
    /// [`Action::Resume`]: enter now. [`Action::Halt`]: don't enter; sleep
    /// until an irq is deliverable. Anything else: return to the launcher.
    pub fn prepare_entry<M: GuestMemory, E: Env>(&mut self, mem: &mut M, env: &mut E) -> Action {
        if let Some(a) = self.death_action() {
            return a;
        }
        if self.pending_hcall.is_some() {
            let r = self.run_pending_hcall(mem, env);
            match self.finish(r) {
                Action::Resume | Action::Halt => {}
                other => return other,
            }
        }
        self.deliver_pending(mem, env);
        if let Some(a) = self.death_action() {
            return a;
        }
        if self.halted {
            return Action::Halt;
        }
        let r = self.check_entry_state();
        self.finish(r.map(|()| Action::Resume))
    }

    /// Validate the segment registers the switcher is about to load and
    /// sanitise EFLAGS. A bad selector kills the guest (lguest would fault in
    /// the switcher: "unhandled trap 256").
    fn check_entry_state(&mut self) -> Result<(), Kill> {
        self.regs.eflags = sanitize_eflags(self.regs.eflags);
        let key = SelKey::of(self.gdt.generation(), &self.regs);
        if self.is_validated(&key) {
            return Ok(());
        }
        self.check_selectors(key, self.regs.eip)
    }

    /// The six descriptor checks of `check_entry_state`, for a set not
    /// validated before (out of line: the common case is a hit).
    #[inline(never)]
    fn check_selectors(&mut self, key: SelKey, eip: u32) -> Result<(), Kill> {
        let [r_cs, r_ss, ds, es, fs, gs] = key.selectors();
        let sel = |v: u32| u16::try_from(v).ok();
        let cs = sel(r_cs).filter(|&s| self.gdt.valid_code_selector(s));
        let Some(cs) = cs else {
            return kill!("bad cs {r_cs:#x} at {eip:#x}");
        };
        let cpl = (cs & 3) as u8;
        if !sel(r_ss).is_some_and(|s| self.gdt.valid_stack_selector(s, cpl)) {
            return kill!("bad ss {r_ss:#x} at {eip:#x}");
        }
        for (name, v) in [("ds", ds), ("es", es), ("fs", fs), ("gs", gs)] {
            if !sel(v).is_some_and(|s| self.gdt.valid_data_selector(s, cpl)) {
                return kill!("bad {name} {v:#x} at {eip:#x}");
            }
        }
        if let Some(slot) = self.validated.get_mut(key.slot()) {
            *slot = Some(key);
        }
        Ok(())
    }

    /// The GDT's TLS entries.
    fn tls_entries(&self) -> [u64; TLS_ENTRIES] {
        core::array::from_fn(|i| self.gdt.entry(TLS_FIRST.wrapping_add(i)).unwrap_or(0))
    }

    /// After new TLS entries (`old` before them) moved the GDT from
    /// generation `before`: the selector sets (and `ss1`) found valid under
    /// `before` are valid under the new generation too if every TLS entry
    /// they name kept what a selector check looks at (present, S, type,
    /// DPL, the L and D/B flags: the access byte and the flags nibble, not
    /// base or limit; nothing else of the GDT changed), and are remembered
    /// so. Linux loads new TLS entries at most context switches, mostly the
    /// same kind of segment at another base; without this every set would
    /// be checked again after each.
    fn tls_moved(&mut self, before: u64, old: [u64; TLS_ENTRIES]) {
        /// The bits of a descriptor a selector check reads.
        const CHECKED: u64 = 0x00F0_FF00_0000_0000;
        let now = self.gdt.generation();
        if now == before {
            return;
        }
        let new = self.tls_entries();
        let same = |sel: u32| {
            !selects_tls(sel)
                || ((sel >> 3) as usize)
                    .checked_sub(TLS_FIRST)
                    .and_then(|i| Some((old.get(i)? ^ new.get(i)?) & CHECKED == 0))
                    .unwrap_or(false)
        };
        for k in self.validated.iter_mut().flatten() {
            if k.generation == before && k.selectors().into_iter().all(same) {
                k.generation = now;
            }
        }
        if self.ss1_checked == Some(before) && same(self.ss1) {
            self.ss1_checked = Some(now);
            self.ss1_base = self.segment_base(self.ss1);
        }
    }

    /// [`is_validated`](Self::is_validated), or else checked now as the
    /// full path's entry would (`check_entry_state`, whose cache it fills
    /// the same way): whether `key` is a valid selector set. A set that
    /// fails is not the shortcut's to kill for: the full path does that
    /// (nothing is changed here then).
    #[inline]
    fn validate(&mut self, key: SelKey) -> bool {
        self.is_validated(&key) || self.check_selectors(key, self.regs.eip).is_ok()
    }

    /// Whether `key` is a selector set found valid before (under its GDT
    /// generation, which is part of the key).
    #[inline]
    fn is_validated(&self, key: &SelKey) -> bool {
        self.validated
            .get(key.slot())
            .is_some_and(|v| v.as_ref() == Some(key))
    }

    // ----------------------------------------------------------------------
    // Exits finished where they land.

    /// The common exit of a running guest finished in one short step, when
    /// nothing about it can go wrong: a trap or software interrupt that is
    /// simply reflected through a present guest gate (the i386 frame pushed
    /// onto a kernel stack that lies in guest memory), with no virtual irq
    /// pending, no hypercall waiting and selectors the vCPU has validated
    /// before. Returns `true` if it did exactly what
    /// [`handle_exit`](Self::handle_exit) followed by
    /// [`prepare_entry`](Self::prepare_entry)
    /// would have done (same registers, same frame, same `lguest_data`
    /// writes), `false` if it changed nothing and the full path must run.
    ///
    /// It decides everything before it writes anything; the guest memory it
    /// writes was range-checked first, so no write can fail halfway.
    #[inline]
    pub fn fast_exit<M: GuestMemory, E: Env>(
        &mut self,
        vector: u32,
        errcode: u32,
        cr2: u32,
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        let Some(ld) = self.lguest_data else {
            return false;
        };
        if self.dead.is_some()
            || self.restart
            || self.halted
            || self.pending != 0
            || self.pending_hcall.is_some()
        {
            return false;
        }
        let cpl = self.cpl();
        // Exits with more to do than a reflection: hypercalls, the #GP of an
        // instruction to emulate, #NM with TS clear (nothing to reflect).
        if vector == u32::from(LGUEST_TRAP_ENTRY)
            || (vector == trap::GP && errcode == 0 && cpl == 1)
            || (vector == trap::NM && !self.ts)
            || !(vector < FIRST_EXTERNAL_VECTOR || vector == SYSCALL_VECTOR)
        {
            return false;
        }
        let Some(gate) = self.idt.get(vector as usize).copied() else {
            return false;
        };
        let software = vector == trap::BP || vector == trap::OF || vector >= FIRST_EXTERNAL_VECTOR;
        if !gate.present() || (software && u32::from(gate.dpl()) < cpl) {
            return false;
        }
        let Ok(irq_enabled) = mem.read_u32(ld.wrapping_add(LguestData::OFF_IRQ_ENABLED)) else {
            return false;
        };
        // Under shadow paging a page fault reaches here only once the shadow
        // core has found it to be the guest's own (`fast_paging` declined
        // and remembered its error code for the full path, which reflects
        // it without asking again).
        let errcode = if vector == trap::PF && self.paging() {
            match self.decided_pf {
                Some((c, e)) if c == cr2 => e,
                _ => return false,
            }
        } else {
            errcode
        };
        let err = has_error_code(vector).then_some(errcode);
        let Some(frame) = self.fast_frame(err, irq_enabled, mem, env.tables()) else {
            return false;
        };
        if vector == trap::PF {
            self.decided_pf = None;
        }
        // Decided: from here on, the full path's writes, in its order.
        let cr2_ok = vector != trap::PF
            || mem
                .write_u32(ld.wrapping_add(LguestData::OFF_CR2), cr2)
                .is_ok();
        self.regs.trapnum = vector;
        self.regs.errcode = errcode;
        let pushed = self.fast_push(&frame, gate, ld, mem);
        if !(cr2_ok && pushed) {
            // Cannot happen (every range was checked first); if it did, the
            // guest dies as the full path would have killed it.
            self.kill("bad stack frame");
        }
        true
    }

    /// The shadow-paging exits finished on the trap stack: a page fault the
    /// shadow core fills (the guest never sees it), and a shadow-paging call
    /// or `FLUSH_ASYNC` after the async ring's calls the lane takes
    /// (`lane_takes`: Linux's lazy MMU batches and context switches). Only
    /// when nothing else is to be done before the guest runs again (no irq
    /// pending, the selectors it runs with valid): then it did exactly what
    /// `handle_exit` and `prepare_entry` would, and returns `true` — with
    /// the GDT unchanged, or changed only in TLS entries no segment register
    /// selects (the host then loads them). Otherwise `false`, with nothing
    /// changed — except that ring entries drained before a call the lane
    /// does not take are done (the full path drains on from there, as one
    /// drain would have), a page fault found to be the guest's own is
    /// remembered for the full path (which then reflects it without asking
    /// the shadow core again), and a fault or call that kills the guest has
    /// killed it. For a hypercall, `regs` must hold all the guest's
    /// registers (the call's arguments); for a page fault the frame
    /// registers suffice.
    pub fn fast_paging<M: GuestMemory, E: Env>(
        &mut self,
        vector: u32,
        errcode: u32,
        cr2: u32,
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        let Some(ld) = self.lguest_data else {
            return false;
        };
        let hcall = vector == u32::from(LGUEST_TRAP_ENTRY);
        if !self.paging()
            || self.dead.is_some()
            || self.restart
            || self.halted
            || self.pending_hcall.is_some()
            || self.pending != 0
            || !self.validate(SelKey::of(self.gdt.generation(), &self.regs))
        {
            return false;
        }
        let r = if vector == trap::PF {
            if !self.pf_fill(cr2, errcode, mem, env) {
                return false;
            }
            Ok(())
        } else if hcall
            && self.cpl() == 1
            && (Self::fast_paging_call(self.regs.eax).is_some()
                || self.regs.eax == guest_abi::hcall::LHCALL_FLUSH_ASYNC)
        {
            // The async ring first, as far as it holds calls the lane
            // takes (`lane_takes`); anything else in it: the full path runs
            // it (and the rest) from where this drain stopped.
            let generation = self.gdt.generation();
            match self.drain_ring(ld, mem, env, Self::lane_takes) {
                Ok(Drained::Empty) => {}
                Ok(_) => return false,
                Err(k) => {
                    self.kill(k);
                    return false;
                }
            }
            // New TLS entries (the only GDT change the lane makes): fine
            // when no segment register the guest runs with uses one (the
            // CPU's copies of the others stay right; the host loads the
            // new entries). The registers are then checked against the new
            // GDT as the full path's entry would: that cannot fail (none
            // uses a changed entry) and records the set as validated for
            // the new generation, which the shortcuts look for. Else the
            // full path, whose entry goes back to the run loop.
            if self.gdt.generation() != generation {
                if self.uses_tls() {
                    return false;
                }
                if let Err(k) = self.check_entry_state() {
                    self.kill(k);
                    return false;
                }
            }
            let a = [self.regs.ebx, self.regs.ecx, self.regs.edx, self.regs.esi];
            match Self::fast_paging_call(self.regs.eax) {
                Some(h) => self.paging_call(h, a, mem, env).map(|_| ()),
                // FLUSH_ASYNC: the drain was all of it.
                None => Ok(()),
            }
        } else {
            return false;
        };
        if let Err(k) = r {
            self.kill(k);
            return false;
        }
        self.regs.trapnum = vector;
        self.regs.errcode = if hcall { 0 } else { errcode };
        self.regs.eflags = sanitize_eflags(self.regs.eflags);
        true
    }

    /// Whether a segment register the guest runs with selects one of the
    /// GDT's TLS entries.
    fn uses_tls(&self) -> bool {
        let r = &self.regs;
        [r.cs, r.ss, r.ds, r.es, r.fs, r.gs]
            .iter()
            .any(|&sel| selects_tls(sel))
    }

    /// Whether the trap stack's drain ([`fast_paging`](Self::fast_paging))
    /// takes call `nr` from the async ring: the calls that only change the
    /// vCPU's own state and can only resume or kill — no-ops, the
    /// shadow-paging calls, `SET_STACK`, `LOAD_TLS`, `TS` (a context
    /// switch's batch) — not those the launcher must see or that change
    /// more (a notify, a halt, a shutdown, a GDT entry, the clock event).
    fn lane_takes(&self, nr: u32) -> bool {
        use guest_abi::hcall::{LHCALL_LOAD_TLS, LHCALL_SET_STACK, LHCALL_TS};
        (nr < 32 && self.trivial_hcalls() & (1 << nr) != 0)
            || Self::fast_paging_call(nr).is_some()
            || matches!(nr, LHCALL_SET_STACK | LHCALL_LOAD_TLS | LHCALL_TS)
    }

    /// Whether the page fault at `cr2` was already found to be the guest's
    /// own (by the page-fault stub's fill, [`stub_fill`](Self::stub_fill),
    /// on this very exit): [`fast_paging`](Self::fast_paging) would only
    /// find that again (nothing changed since), so the trap path goes
    /// straight on to reflecting it.
    #[inline]
    pub fn pf_decided(&self, cr2: u32) -> bool {
        self.decided_pf.is_some_and(|(c, _)| c == cr2)
    }

    /// The shadow-paging calls [`fast_paging`](Self::fast_paging) finishes
    /// (with an empty async ring, nothing to run before them): those that
    /// only change shadow tables and the MMU work owed.
    pub fn fast_paging_call(nr: u32) -> Option<Hypercall> {
        use guest_abi::hcall::{
            LHCALL_FLUSH_TLB, LHCALL_NEW_PGTABLE, LHCALL_SET_PGD, LHCALL_SET_PMD, LHCALL_SET_PTE,
        };
        Some(match nr {
            LHCALL_NEW_PGTABLE => Hypercall::NewPgtable,
            LHCALL_SET_PTE => Hypercall::SetPte,
            LHCALL_SET_PGD => Hypercall::SetPgd,
            LHCALL_SET_PMD => Hypercall::SetPmd,
            LHCALL_FLUSH_TLB => Hypercall::FlushTlb,
            _ => return None,
        })
    }

    /// A page fault the shadow core fills (`true`: done, the guest
    /// resumes where it faulted). `false`: not filled — the guest kernel
    /// fetching from a user page (the full path kills it: a fill would not
    /// stop the fault), a fault that is the guest's own (remembered in
    /// `decided_pf` for the full path), or a kill (done).
    #[inline]
    fn pf_fill<M: GuestMemory, E: Env>(
        &mut self,
        cr2: u32,
        errcode: u32,
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        if errcode & PF_SMEP_MASK == PF_SMEP_VIOLATION {
            return false;
        }
        let Some(sh) = self.shadow.as_mut() else {
            return false;
        };
        match sh.fast_fill(mem, env.tables(), cr2, errcode) {
            Some(Fault::Fixed) => return true,
            Some(Fault::Reflect { errcode: e }) => {
                self.decided_pf = Some((cr2, e));
                return false;
            }
            // (It decides no kills.)
            Some(Fault::Kill(_)) | None => {}
        }
        self.pf_fill_slow(cr2, errcode, mem, env)
    }

    /// [`pf_fill`](Self::pf_fill) when `fast_fill` declined: the shadow
    /// core's full fault handling, out of line (the fast fill pays none of
    /// its frame).
    #[cold]
    #[inline(never)]
    fn pf_fill_slow<M: GuestMemory, E: Env>(
        &mut self,
        cr2: u32,
        errcode: u32,
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        let Some(sh) = self.shadow.as_mut() else {
            return false;
        };
        match sh.demand_fault(mem, env.tables(), cr2, errcode) {
            Fault::Fixed => true,
            Fault::Reflect { errcode: e } => {
                self.decided_pf = Some((cr2, e));
                false
            }
            Fault::Kill(k) => {
                self.kill(k);
                false
            }
        }
    }

    /// The page-fault stub's fill: a #PF taken while the guest runs under
    /// shadow paging from the state the stubs were armed with (no irq
    /// pending, and the stub checked that the frame's SS is a valid stack
    /// segment for its CPL), filled by the shadow core. `true`: done as the
    /// full path would (the guest's registers are unchanged, so `regs` is
    /// neither read nor written); `false`: see `pf_fill` (nothing changed,
    /// a decided reflection, or a kill).
    #[inline]
    pub fn stub_fill<M: GuestMemory, E: Env>(
        &mut self,
        cr2: u32,
        errcode: u32,
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        // Armed only for a running, paging guest with nothing waiting
        // (`stub_view`): dead, restart, halted and a waiting hypercall
        // cannot become true without a trip through Rust, which re-arms or
        // disarms; pending irqs can (the stub checks the raised ones), and
        // paging is cheap to check.
        if self.pending != 0 || !self.paging() {
            return false;
        }
        self.pf_fill(cr2, errcode, mem, env)
    }

    /// The hypercall stub's paging lane: a shadow-paging call `nr`
    /// (`NEW_PGTABLE`, `SET_PTE`, `SET_PGD`, `SET_PMD`, `FLUSH_TLB`) with
    /// arguments `args`, from the state the stub was armed with (an empty
    /// async ring, no irq pending, the CS/SS validated at the last entry):
    /// does what the full path does for it and says what the host owes the
    /// MMU before the guest runs on: [`LaneDone::Load`] (a switch to a
    /// cached, clean shadow: load this root; nothing else is owed) or
    /// [`LaneDone::Work`] (the rest is in
    /// [`take_mmu_work`](Self::take_mmu_work)). `None` if it is not such a
    /// call or the vCPU has other business (nothing changed), or if the call
    /// killed the guest (as the full path would have).
    pub fn stub_paging<M: GuestMemory, E: Env>(
        &mut self,
        nr: u32,
        args: [u32; 4],
        mem: &mut M,
        env: &mut E,
    ) -> Option<LaneDone> {
        if !self.lane_ready() {
            return None;
        }
        let h = Self::fast_paging_call(nr)?;
        // The common switch first: to a cached, clean shadow.
        if h == Hypercall::NewPgtable
            && let Some(root) = self.stub_switch(args[0])
        {
            return Some(LaneDone::Load(root));
        }
        if h == Hypercall::SetPte && self.stub_set_pte(args, env) {
            return Some(LaneDone::Work);
        }
        self.stub_paging_call(h, args, mem, env)
    }

    /// The hypercall stub's `FLUSH_ASYNC` lane, from the state the stub was
    /// armed with (the validated CS and SS, no irq pending): the guest's
    /// data selectors as the CPU holds them now (`ds`, `es`, `fs`, `gs`: the
    /// stub saved nothing else) go into `regs`, and then it is
    /// [`fast_paging`](Self::fast_paging) for `FLUSH_ASYNC`, which reads no
    /// other register: `true` when it finished the exit (the guest resumes
    /// after the call), `false` when the full path goes on from where it
    /// stopped.
    pub fn stub_flush<M: GuestMemory, E: Env>(
        &mut self,
        [ds, es, fs, gs]: [u32; 4],
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        let r = &mut self.regs;
        (r.ds, r.es, r.fs, r.gs) = (ds, es, fs, gs);
        r.eax = guest_abi::hcall::LHCALL_FLUSH_ASYNC;
        self.fast_paging(u32::from(LGUEST_TRAP_ENTRY), 0, 0, mem, env)
    }

    /// The hypercall stub's `FLUSH_ASYNC` lane for Linux's context switch
    /// in one step, tried before [`stub_flush`](Self::stub_flush) (from the
    /// same armed state, with the same data selectors): when the vCPU may
    /// act at all (a running guest under shadow paging with nothing
    /// waiting, the call from the guest kernel, its selectors valid) and
    /// the ring holds at its cursor just what the drain's context-switch
    /// start takes (`drain_switch`: a `NEW_PGTABLE`
    /// of a cached shadow that holds the next stack pinned, its
    /// `SET_STACK`, maybe the same TLS entries again), and nothing after
    /// them: [`FlushSwitch::Done`], with the exit finished as `stub_flush`
    /// would have finished it and the new stack's user-mode frame found.
    /// Otherwise [`FlushSwitch::Partial`] (those entries done, more queued)
    /// or [`FlushSwitch::Declined`] (nothing done).
    #[inline]
    pub fn stub_flush_switch<M: GuestMemory>(
        &mut self,
        [ds, es, fs, gs]: [u32; 4],
        mem: &mut M,
    ) -> FlushSwitch {
        let r = &mut self.regs;
        // The selectors the guest was last entered with: valid under this
        // GDT (every entry checks them, every change of the GDT is followed
        // by an entry), so only others need a look.
        let entered = (r.ds, r.es, r.fs, r.gs) == (ds, es, fs, gs);
        (r.ds, r.es, r.fs, r.gs) = (ds, es, fs, gs);
        r.eax = guest_abi::hcall::LHCALL_FLUSH_ASYNC;
        // Most flushes are of something else (Linux's lazy MMU batches): a
        // look at the first call number only.
        match self
            .lguest_data
            .map(|ld| (ld, self.ring_head_switch(ld, mem)))
        {
            Some((ld, Ok(Some(gpgdir)))) => self.stub_flush_switch_at(ld, mem, gpgdir, entered),
            _ => FlushSwitch::Declined,
        }
    }

    /// [`stub_flush_switch`](Self::stub_flush_switch) once the ring's first
    /// entry is found to be `NEW_PGTABLE(gpgdir)`.
    #[inline(never)]
    fn stub_flush_switch_at<M: GuestMemory>(
        &mut self,
        ld: u32,
        mem: &mut M,
        gpgdir: u32,
        entered: bool,
    ) -> FlushSwitch {
        let key = || SelKey::of(self.gdt.generation(), &self.regs);
        debug_assert!(
            !entered || self.clone().validate(key()),
            "entered with selectors not valid under this GDT"
        );
        if !self.lane_ready() || self.cpl() != 1 || !(entered || self.validate(key())) {
            return FlushSwitch::Declined;
        }
        let pin = match self.drain_switch_at(ld, mem, &Self::lane_takes, gpgdir) {
            Ok(Some(pin)) => pin,
            Ok(None) => return FlushSwitch::Declined,
            Err(e) => {
                self.kill(Kill::from(e));
                return FlushSwitch::Partial;
            }
        };
        // (The drain's start changes no GDT entry.) The ring empty after
        // them: the call is done.
        let next = (self.ring_cursor % LHCALL_RING_SIZE) as u32;
        if mem.read_u8(ld.wrapping_add(LguestData::off_hcall_status(next)))
            != Ok(HCALL_STATUS_EMPTY)
        {
            return FlushSwitch::Partial;
        }
        let Some(switch) = self.mmu_load.take() else {
            return FlushSwitch::Partial;
        };
        self.regs.trapnum = u32::from(LGUEST_TRAP_ENTRY);
        self.regs.errcode = 0;
        self.regs.eflags = sanitize_eflags(self.regs.eflags);
        FlushSwitch::Done {
            switch,
            frame: self.frame_in_top(pin, mem.limit()),
            pin,
        }
    }

    /// The first step of [`stub_paging`](Self::stub_paging) for
    /// `SET_PTE(gpgdir, vaddr, pte[, pte_high])`, callable on its own: the
    /// shadow core's [`fast_set_pte`](ShadowPaging::fast_set_pte) (an entry
    /// of the running address space's user half, the stack untouched)
    /// and `true`: the host owes the loaded shadow only the invalidation in
    /// [`take_shadow_flush`](Self::take_shadow_flush) (no other shadow is
    /// loaded, and the stack stays pinned where it was). `false`: nothing
    /// changed.
    #[inline]
    pub fn stub_set_pte<E: Env>(&mut self, [a1, a2, a3, a4]: [u32; 4], env: &mut E) -> bool {
        if !self.lane_ready() {
            return false;
        }
        let Some(sh) = self.shadow.as_mut() else {
            return false;
        };
        let pte = set_pte_arg(sh.config().format, a3, a4);
        sh.fast_set_pte(env.tables(), a1, a2, pte)
    }

    /// The first step of [`stub_paging`](Self::stub_paging) for
    /// `NEW_PGTABLE(gpgdir)`, callable on its own (the lane's shortest
    /// path): a switch to a cached, clean shadow, whose root the host loads
    /// with nothing else owed; `None` (nothing changed) otherwise. Inlined
    /// into the host's lane, with the shadow core's `fast_switch` inside.
    #[inline]
    pub fn stub_switch(&mut self, gpgdir: u32) -> Option<u64> {
        if !self.lane_ready() {
            return None;
        }
        self.shadow
            .as_mut()
            .and_then(|s| s.fast_switch(gpgdir))
            .map(|sw| sw.root)
    }

    /// Whether the paging lane may act: a running guest under shadow paging
    /// with nothing waiting (no irq, no hypercall, no MMU work owed).
    #[inline]
    fn lane_ready(&self) -> bool {
        self.lguest_data.is_some()
            && self.dead.is_none()
            && !self.restart
            && !self.halted
            && self.pending_hcall.is_none()
            && self.pending == 0
            && self.mmu_load.is_none()
            && self.paging()
    }

    /// The rest of [`stub_paging`](Self::stub_paging): the call itself, out
    /// of line so that the switch to a cached shadow above pays none of its
    /// frame.
    #[inline(never)]
    fn stub_paging_call<M: GuestMemory, E: Env>(
        &mut self,
        h: Hypercall,
        args: [u32; 4],
        mem: &mut M,
        env: &mut E,
    ) -> Option<LaneDone> {
        match self.paging_call(h, args, mem, env) {
            Ok(_) => Some(LaneDone::Work),
            Err(k) => {
                self.kill(k);
                None
            }
        }
    }

    /// After an exit the full path would finish with nothing but
    /// `prepare_entry`: a trivial hypercall (see [`StubView`]; here the
    /// virtual irqs may be pending) or a host interrupt. Finishes it and the
    /// entry (delivering a pending irq the way `prepare_entry` does) and
    /// returns `true`, or changes nothing and returns `false`.
    #[inline]
    pub fn fast_resume<M: GuestMemory, E: Env>(
        &mut self,
        vector: u32,
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        let Some(ld) = self.lguest_data else {
            return false;
        };
        if self.dead.is_some() || self.restart || self.halted || self.pending_hcall.is_some() {
            return false;
        }
        let hcall = vector == u32::from(LGUEST_TRAP_ENTRY);
        if hcall {
            let nr = self.regs.eax;
            let trivial = nr < 32 && self.trivial_hcalls() & (1 << nr) != 0;
            let slot = (self.ring_cursor % LHCALL_RING_SIZE) as u32;
            let status = mem.read_u8(
                ld.wrapping_add(LguestData::OFF_HCALL_STATUS)
                    .wrapping_add(slot),
            );
            if self.cpl() != 1 || !trivial || status != Ok(HCALL_STATUS_EMPTY) {
                return false;
            }
        } else if TrapOwner::of(vector) != TrapOwner::HostIrq {
            return false;
        }
        if !self.fast_deliver(ld, mem, env) {
            return false;
        }
        if hcall {
            self.regs.trapnum = vector;
            self.regs.errcode = 0;
        }
        true
    }

    /// The hypercall stub's lane (the model the stub's assembly follows
    /// step by step, tested here against the full path): a trivial
    /// hypercall that the stub has checked (the number is in
    /// [`StubView::trivial`], the ring status byte is empty, and `f`'s CS
    /// and SS are the ones the guest was entered with under `view`) but
    /// could not answer alone because virtual irqs are pending. When
    /// exactly one irq is pending and unblocked, and the guest can take it
    /// now (virtual irqs on, outside the no-irq window), finishes it as
    /// `handle_exit` then `prepare_entry` would — delivering it to its gate
    /// on the current stack — with `f` as the guest's frame registers, and
    /// returns `true`; otherwise changes nothing and returns `false` (the
    /// full path runs, and arms the host's poke for an irq it leaves
    /// pending). `self.regs` is not used or updated (the next exit saves
    /// the frame there).
    ///
    /// Every lguest_data field and the frame go through the bounds-checked
    /// accessor, once each; the frame is checked before anything is
    /// written.
    #[inline]
    pub fn stub_deliver<M: GuestMemory, E: Env>(
        &mut self,
        view: &StubView,
        f: &mut HwFrame,
        mem: &mut M,
        env: &mut E,
    ) -> bool {
        let Some(ld) = self.lguest_data else {
            return false;
        };
        if self.dead.is_some() || self.restart || self.halted || self.pending_hcall.is_some() {
            return false;
        }
        let (eip, cs, fl, fesp, fss) = (
            f.eip as u32,
            f.cs as u32,
            f.eflags as u32,
            f.esp as u32,
            f.ss as u32,
        );
        // Entered at CPL 1 with validated selectors, and still on them.
        if cs & 3 != 1 || view.kss == 0 || fss != view.kss {
            return false;
        }
        let at = |off: u32| ld.wrapping_add(off);
        let Ok(blocked) = mem.read_u32(at(LguestData::OFF_BLOCKED_INTERRUPTS)) else {
            return false;
        };
        // Exactly one irq, deliverable now: the lane never leaves an irq
        // pending (the full path does, and arms the host's poke for it).
        let avail = self.pending & !blocked;
        if avail == 0 || avail & avail.wrapping_sub(1) != 0 {
            return false;
        }
        let Ok(ie) = mem.read_u32(at(LguestData::OFF_IRQ_ENABLED)) else {
            return false;
        };
        if ie & X86_EFLAGS_IF == 0 || (self.noirq_start <= eip && eip < self.noirq_end) {
            return false;
        }
        let irq = avail.trailing_zeros();
        let gate = self
            .idt
            .get(FIRST_EXTERNAL_VECTOR.saturating_add(irq) as usize)
            .copied()
            .filter(IdtEntry::present);
        // The state after the delivery (the guest kernel's CS on this stack)
        // is the validated one only if the guest already runs on that CS.
        let (Some(gate), true) = (gate, cs == u32::from(KERNEL_CS)) else {
            return false;
        };
        let top = view.kss_base.wrapping_add(fesp);
        if top > view.limit.min(mem.limit()) {
            return false;
        }
        let Some(low) = top.checked_sub(12) else {
            return false;
        };
        // Decided: the full path's writes, in its order.
        self.pending &= !1u32.checked_shl(irq).unwrap_or(0);
        let (sec, nsec) = env.wallclock();
        let ok = mem.write_u32s(low, &[eip, cs, fl]).is_ok()
            && (gate.gate_type() != IDT_TYPE_INTERRUPT
                || mem.write_u32(at(LguestData::OFF_IRQ_ENABLED), 0).is_ok())
            // time (sec, nsec) and irq_pending are adjacent: one store.
            && mem
                .write_u32s(at(LguestData::OFF_TIME), &[sec as u32, nsec as u32, 0])
                .is_ok();
        if !ok {
            // Cannot happen: lguest_data and the frame were checked.
            self.kill("bad stack frame");
            return false;
        }
        *f = HwFrame::new(
            gate.offset(),
            u32::from(KERNEL_CS),
            sanitize_eflags(fl & !(EFLAGS_TF | EFLAGS_VM | EFLAGS_RF | EFLAGS_NT)),
            fesp.wrapping_sub(12),
            fss,
        );
        true
    }

    /// `prepare_entry`'s delivery and selector check for a running guest,
    /// when they can be decided up front; `false` = nothing changed.
    #[inline]
    fn fast_deliver<M: GuestMemory, E: Env>(&mut self, ld: u32, mem: &mut M, env: &mut E) -> bool {
        let current = SelKey::of(self.gdt.generation(), &self.regs);
        let unchanged_ok = self.is_validated(&current);
        if self.pending == 0 {
            if unchanged_ok {
                self.regs.eflags = sanitize_eflags(self.regs.eflags);
            }
            return unchanged_ok;
        }
        let at = |off: u32| ld.wrapping_add(off);
        let Ok(blocked) = mem.read_u32(at(LguestData::OFF_BLOCKED_INTERRUPTS)) else {
            return false;
        };
        let avail = self.pending & !blocked;
        let Ok(ie) = mem.read_u32(at(LguestData::OFF_IRQ_ENABLED)) else {
            return false;
        };
        let in_noirq = self.noirq_start <= self.regs.eip && self.regs.eip < self.noirq_end;
        if avail == 0 || ie & X86_EFLAGS_IF == 0 || in_noirq {
            // Nothing is delivered; with irqs off the guest is told one is
            // pending.
            if !unchanged_ok {
                return false;
            }
            if avail != 0
                && ie & X86_EFLAGS_IF == 0
                && mem
                    .write_u32(at(LguestData::OFF_IRQ_PENDING), X86_EFLAGS_IF)
                    .is_err()
            {
                return false;
            }
            self.regs.eflags = sanitize_eflags(self.regs.eflags);
            return true;
        }
        let irq = avail.trailing_zeros();
        let more = avail & avail.wrapping_sub(1) != 0;
        let gate = self
            .idt
            .get(FIRST_EXTERNAL_VECTOR.saturating_add(irq) as usize)
            .copied()
            .filter(IdtEntry::present);
        let Some(gate) = gate else {
            return false;
        };
        let Some(frame) = self.fast_frame(None, ie, mem, env.tables()) else {
            return false;
        };
        // Decided: the full path's writes, in its order.
        self.pending &= !1u32.checked_shl(irq).unwrap_or(0);
        let (sec, nsec) = env.wallclock();
        let ok = self.fast_push(&frame, gate, ld, mem)
            && mem.write_u32(at(LguestData::OFF_TIME), sec as u32).is_ok()
            && mem
                .write_u32(at(LguestData::OFF_TIME.wrapping_add(4)), nsec as u32)
                .is_ok()
            && mem
                .write_u32(
                    at(LguestData::OFF_IRQ_PENDING),
                    if more { X86_EFLAGS_IF } else { 0 },
                )
                .is_ok();
        if !ok {
            // Cannot happen: lguest_data and the frame were checked.
            self.kill("bad stack frame");
        }
        true
    }

    /// Where and what a reflection through a guest gate pushes, decided
    /// without writing anything (`push_frame`'s rules): `None` if the full
    /// path must decide (no kernel stack, a frame outside guest memory, or
    /// a handler state whose selectors were not validated before).
    /// `irq_enabled` is `lguest_data.irq_enabled`, for the pushed EFLAGS.
    #[inline(always)]
    fn fast_frame<M: GuestMemory, B: ShadowBackend>(
        &mut self,
        err: Option<u32>,
        irq_enabled: u32,
        mem: &M,
        b: &B,
    ) -> Option<FastFrame> {
        let from_user = self.regs.cs & 3 != 1;
        if from_user && !self.stack_set {
            return None;
        }
        let (ss, esp) = if from_user {
            (self.ss1, self.esp1)
        } else {
            (self.regs.ss, self.regs.esp)
        };
        // The state after the reflection must be a valid one (the full
        // path would check it, and kill on a bad selector): found so
        // before, or checked now (a set not checked under this GDT
        // generation yet, after new TLS entries).
        let pair = |a: u32, b: u32| u64::from(a) | (u64::from(b) << 32);
        let after = SelKey {
            generation: self.gdt.generation(),
            cs_ss: pair(u32::from(KERNEL_CS), ss),
            ds_es: pair(self.regs.ds, self.regs.es),
            fs_gs: pair(self.regs.fs, self.regs.gs),
        };
        if !self.validate(after) {
            return None;
        }
        let r = &self.regs;
        let eflags = if irq_enabled & X86_EFLAGS_IF == 0 {
            r.eflags & !X86_EFLAGS_IF
        } else {
            r.eflags
        };
        // Lowest address first: [error code,] EIP, CS, EFLAGS [, ESP, SS].
        let words = [err.unwrap_or(0), r.eip, r.cs, eflags, r.esp, r.ss];
        let first = usize::from(err.is_none());
        let end: usize = if from_user { 6 } else { 4 };
        // At most 6 words: neither the count nor the bytes can overflow.
        let bytes = (end.saturating_sub(first) as u32).wrapping_mul(4);
        let top = self.gdt.segment_base(ss as u16).wrapping_add(esp);
        let low = top.checked_sub(bytes)?;
        // Where the frame goes in guest memory. Linear mode: guest-virtual
        // == guest-physical inside guest memory (the full path translates
        // each word with `guest_pa` the same way). Shadow paging: the
        // frame must lie in one page that the guest's tables map writable
        // for the kernel with ACCESSED and DIRTY already set, so that the
        // full path's word-by-word translation would find the same frame
        // and change no A/D bit; anything else is the full path's. A page
        // the current shadow maps writable (the pinned kernel stack, any
        // page the guest kernel wrote) is such a page, as the guest last
        // announced its entry: read from the shadow's leaf, without a walk.
        let pa = match self.shadow.as_ref().filter(|s| s.is_paging()) {
            Some(sh) => {
                // `bytes >= 12`, so `low < top` and `top - 1` cannot wrap.
                if low >> 12 != top.wrapping_sub(1) >> 12 {
                    return None;
                }
                sh.quiet_write_gpa(b, mem, low)?
            }
            None => low,
        };
        if pa >= mem.limit() || pa.checked_add(bytes)? > mem.limit() {
            return None;
        }
        Some(FastFrame {
            words,
            first,
            end,
            low: pa,
            ss,
            esp: esp.wrapping_sub(bytes),
        })
    }

    /// Writes a decided frame and points the guest at `gate` (the end of
    /// `push_frame`); `false` if a write failed (it cannot, once decided).
    #[inline(always)]
    fn fast_push<M: GuestMemory>(
        &mut self,
        f: &FastFrame,
        gate: IdtEntry,
        ld: u32,
        mem: &mut M,
    ) -> bool {
        let words = f.words.get(f.first..f.end).unwrap_or(&[]);
        let ok = mem.write_u32s(f.low, words).is_ok();
        let r = &mut self.regs;
        r.eflags = sanitize_eflags(r.eflags & !(EFLAGS_TF | EFLAGS_VM | EFLAGS_RF | EFLAGS_NT));
        r.ss = f.ss;
        r.esp = f.esp;
        r.cs = u32::from(KERNEL_CS);
        r.eip = gate.offset();
        ok && (gate.gate_type() != IDT_TYPE_INTERRUPT
            || mem
                .write_u32(ld.wrapping_add(LguestData::OFF_IRQ_ENABLED), 0)
                .is_ok())
    }

    // ----------------------------------------------------------------------
    // Traps.

    fn cpl(&self) -> u32 {
        self.regs.cs & 3
    }

    fn handle_trap<M: GuestMemory, E: Env>(
        &mut self,
        vector: u32,
        errcode: u32,
        cr2: u32,
        mem: &mut M,
        env: &mut E,
    ) -> Result<Action, Kill> {
        match vector {
            v if v == u32::from(LGUEST_TRAP_ENTRY) && self.cpl() == 1 => {
                let r = &self.regs;
                self.pending_hcall = Some(HcallArgs {
                    arg0: r.eax,
                    arg1: r.ebx,
                    arg2: r.ecx,
                    arg3: r.edx,
                    arg4: r.esi,
                });
                self.run_pending_hcall(mem, env)
            }
            // CPL 1 or 3 (never 2): emulate_insn knows which instructions
            // each may have emulated.
            trap::GP if errcode == 0 => {
                if self.emulate_insn(mem)? {
                    Ok(Action::Resume)
                } else {
                    self.reflect(vector, errcode, cr2, mem)
                }
            }
            trap::NM if !self.ts => Ok(Action::Resume),
            trap::PF => {
                // Under shadow paging most faults are the shadow's to fill
                // (lguest's demand_page); the rest are the guest's own.
                let mut errcode = errcode;
                // The guest kernel fetching an instruction from a user page:
                // under shadow paging the host runs with SMEP, and the
                // shadow would only fault again (P, I/D set, U/S clear).
                if self.paging() && errcode & PF_SMEP_MASK == PF_SMEP_VIOLATION {
                    return kill!(
                        "guest kernel executed a user page at {:#x} (not allowed under shadow paging: the host runs with SMEP)",
                        cr2
                    );
                }
                let decided = self.decided_pf.take().filter(|&(c, _)| c == cr2);
                if let Some((_, e)) = decided {
                    errcode = e;
                } else if let Some(sh) = self.shadow.as_mut().filter(|s| s.is_paging()) {
                    match sh.demand_fault(mem, env.tables(), cr2, errcode) {
                        Fault::Fixed => return Ok(Action::Resume),
                        Fault::Reflect { errcode: e } => errcode = e,
                        Fault::Kill(k) => return Err(k),
                    }
                }
                if let Some(ld) = self.lguest_data {
                    mem.write_u32(ld.wrapping_add(LguestData::OFF_CR2), cr2)?;
                }
                self.regs.errcode = errcode;
                self.reflect(vector, errcode, cr2, mem)
            }
            _ => self.reflect(vector, errcode, cr2, mem),
        }
    }

    /// lguest's E4 `emulate_insn`, extended: from the guest kernel, `in`
    /// returns all-ones, `out` is ignored, `cli` is skipped; from the guest
    /// kernel and guest user mode, `sgdt`/`sidt`/`smsw`/`str`/`sldt` (which
    /// raise #GP(0) under CR4.UMIP) get the guest view of the tables and
    /// registers ([`GUEST_GDT_LIMIT`], [`GUEST_IDT_LIMIT`], base 0,
    /// [`Vcpu::guest_cr0`], selector 0). Ok(false) = not one of those, or
    /// an instruction the host cannot read (reflect the #GP). The decoder is
    /// [`insn::decode`](super::insn::decode).
    fn emulate_insn<M: GuestMemory>(&mut self, mem: &mut M) -> Result<bool, Kill> {
        let cs = self.regs.cs as u16;
        let lin = self.gdt.segment_base(cs).wrapping_add(self.regs.eip);
        // The instruction's bytes (at most 15), as far as they translate:
        // read first, since translating may set ACCESSED bits in the
        // guest's tables.
        let access = self.access_at_cpl(false);
        let mut bytes = [None::<u8>; 15];
        for (i, slot) in (0u32..).zip(bytes.iter_mut()) {
            let Some(pa) = self.guest_pa(mem, lin.wrapping_add(i), access) else {
                break;
            };
            *slot = mem.read_u8(pa).ok();
            if slot.is_none() {
                break;
            }
        }
        let fetch = |i: u32| bytes.get(i as usize).copied().flatten();
        let r = &self.regs;
        let gpr = [r.eax, r.ecx, r.edx, r.ebx, r.esp, r.ebp, r.esi, r.edi];
        let Some(d) = insn::decode(fetch, self.gdt.is_16bit_code(cs), &gpr) else {
            return Ok(false);
        };
        let kernel = self.cpl() == 1;
        match d.op {
            Op::Cli | Op::Out(_) if kernel => {}
            Op::In(w) if kernel => {
                self.regs.eax = match w {
                    Width::Byte => self.regs.eax | 0xFF,
                    Width::Word => self.regs.eax | 0xFFFF,
                    Width::Dword => 0xFFFF_FFFF,
                };
            }
            Op::Cli | Op::In(_) | Op::Out(_) => return Ok(false),
            Op::Sgdt(o) | Op::Sidt(o) => {
                let limit = if matches!(d.op, Op::Sgdt(_)) {
                    GUEST_GDT_LIMIT
                } else {
                    GUEST_IDT_LIMIT
                };
                let [l0, l1] = limit.to_le_bytes();
                // Limit, then a 32-bit base of 0 (with a 16-bit operand size
                // the CPU stores 24 bits and a zero byte: the same bytes).
                // Always memory: the decoder refuses the register forms.
                self.store(mem, o, 0, &[l0, l1, 0, 0, 0, 0], d.op16)?;
            }
            Op::Smsw(o) => {
                let cr0 = self.guest_cr0();
                let [b0, b1, ..] = cr0.to_le_bytes();
                self.store(mem, o, cr0, &[b0, b1], d.op16)?;
            }
            Op::Str(o) | Op::Sldt(o) => self.store(mem, o, 0, &[0, 0], d.op16)?,
        }
        self.regs.eip = self.regs.eip.wrapping_add(d.len);
        Ok(true)
    }

    /// The guest's view of CR0 (what `smsw` shows): PE, MP, ET, NE and PG,
    /// plus TS while the guest's virtual TS (`LHCALL_TS`) is set. Nothing
    /// of the host's CR0 (its own TS, WP, AM, caching bits) shows.
    pub fn guest_cr0(&self) -> u32 {
        GUEST_CR0 | if self.ts { CR0_TS } else { 0 }
    }

    /// Store the result of an emulated instruction: `value` into a
    /// register (with a 16-bit operand size only its low half, the
    /// register's high half kept, as the CPU does), or `bytes` into memory
    /// (6 for sgdt/sidt; 2 for smsw/str/sldt, whatever the operand size).
    fn store<M: GuestMemory>(
        &mut self,
        mem: &mut M,
        to: Operand,
        value: u32,
        bytes: &[u8],
        op16: bool,
    ) -> Result<(), Kill> {
        match to {
            Operand::Reg(n) => {
                if let Some(reg) = self.gpr_mut(n) {
                    *reg = if op16 {
                        (*reg & !0xFFFF) | (value & 0xFFFF)
                    } else {
                        value
                    };
                }
                Ok(())
            }
            Operand::Mem { seg, offset } => {
                let sel = match seg {
                    Seg::Es => self.regs.es,
                    Seg::Cs => self.regs.cs,
                    Seg::Ss => self.regs.ss,
                    Seg::Ds => self.regs.ds,
                    Seg::Fs => self.regs.fs,
                    Seg::Gs => self.regs.gs,
                };
                let lin = self.gdt.segment_base(sel as u16).wrapping_add(offset);
                self.write_virt(mem, lin, bytes)
            }
        }
    }

    /// General register `n` in ModRM order (eax, ecx, edx, ebx, esp, ebp,
    /// esi, edi).
    fn gpr_mut(&mut self, n: u8) -> Option<&mut u32> {
        let r = &mut self.regs;
        Some(match n {
            0 => &mut r.eax,
            1 => &mut r.ecx,
            2 => &mut r.edx,
            3 => &mut r.ebx,
            4 => &mut r.esp,
            5 => &mut r.ebp,
            6 => &mut r.esi,
            7 => &mut r.edi,
            _ => return None,
        })
    }

    /// Write `data` at guest-virtual `vaddr`, translated page by page; an
    /// address that does not translate kills ("bad address %#x").
    fn write_virt<M: GuestMemory>(&self, mem: &mut M, vaddr: u32, data: &[u8]) -> Result<(), Kill> {
        let access = self.access_at_cpl(true);
        for (va, b) in (0u32..).map(|i| vaddr.wrapping_add(i)).zip(data) {
            let Some(pa) = self.guest_pa(mem, va, access) else {
                return kill!("bad address {va:#x}");
            };
            mem.write_u8(pa, *b)?;
        }
        Ok(())
    }

    /// Reflect trap `vector` through the guest IDT (lguest's `deliver_trap`),
    /// or kill "unhandled trap" if the guest has no gate for it.
    fn reflect<M: GuestMemory>(
        &mut self,
        vector: u32,
        errcode: u32,
        cr2: u32,
        mem: &mut M,
    ) -> Result<Action, Kill> {
        let gate = self
            .idt
            .get(vector as usize)
            .copied()
            .filter(IdtEntry::present);
        let Some(gate) = gate else {
            let info = if vector == trap::PF { cr2 } else { errcode };
            return kill!(
                "unhandled trap {vector} at {:#x} ({info:#x})",
                self.regs.eip
            );
        };
        // Software interrupts (int3, into, int n) honour the guest gate's
        // DPL like hardware would: too privileged a gate is a #GP with the
        // IDT error code.
        let software = vector == trap::BP || vector == trap::OF || vector >= FIRST_EXTERNAL_VECTOR;
        if software && u32::from(gate.dpl()) < self.cpl() {
            let err = (vector << 3) | 2;
            return self.reflect(trap::GP, err, 0, mem);
        }
        let err = has_error_code(vector).then_some(errcode);
        self.push_frame(gate, err, mem)?;
        Ok(Action::Resume)
    }

    /// Build the i386 trap frame on the guest's stack and point the guest at
    /// `gate` (lguest's `set_guest_interrupt`; the frame is described in
    /// docs/abi.md, section 6).
    fn push_frame<M: GuestMemory>(
        &mut self,
        gate: IdtEntry,
        err: Option<u32>,
        mem: &mut M,
    ) -> Result<(), Kill> {
        let old = self.regs;
        let (mut ss, mut esp) = (old.ss, old.esp);
        let mut frame = [0u32; 6];
        let mut n = 0usize;
        let mut push = |v: u32| {
            if let Some(slot) = frame.get_mut(n) {
                *slot = v;
                n = n.saturating_add(1);
            }
        };
        if old.cs & 3 != 1 {
            // From user mode: switch to the kernel stack.
            if !self.stack_set {
                return kill!("no kernel stack");
            }
            let ss1_ok = u16::try_from(self.ss1).is_ok_and(|s| self.gdt.valid_stack_selector(s, 1));
            if !ss1_ok {
                return kill!("bad stack segment {}", self.ss1);
            }
            ss = self.ss1;
            esp = self.esp1;
            push(old.ss);
            push(old.esp);
        }
        let mut eflags = old.eflags;
        if let Some(ld) = self.lguest_data {
            let ie = mem.read_u32(ld.wrapping_add(LguestData::OFF_IRQ_ENABLED))?;
            if ie & X86_EFLAGS_IF == 0 {
                eflags &= !X86_EFLAGS_IF;
            }
        }
        push(eflags);
        push(old.cs);
        push(old.eip);
        if let Some(e) = err {
            push(e);
        }
        let base = self.gdt.segment_base(ss as u16);
        for &v in frame.get(..n).unwrap_or(&[]) {
            esp = esp.wrapping_sub(4);
            self.write_stack(mem, base.wrapping_add(esp), v)?;
        }
        self.regs.ss = ss;
        self.regs.esp = esp;
        self.regs.cs = u32::from(KERNEL_CS);
        self.regs.eip = gate.offset();
        self.regs.eflags =
            sanitize_eflags(old.eflags & !(EFLAGS_TF | EFLAGS_VM | EFLAGS_RF | EFLAGS_NT));
        if gate.gate_type() == IDT_TYPE_INTERRUPT
            && let Some(ld) = self.lguest_data
        {
            mem.write_u32(ld.wrapping_add(LguestData::OFF_IRQ_ENABLED), 0)?;
        }
        Ok(())
    }

    /// One 4-byte stack store at guest-virtual `vaddr`, split at page
    /// boundaries and translated page by page.
    fn write_stack<M: GuestMemory>(&self, mem: &mut M, vaddr: u32, v: u32) -> Result<(), Kill> {
        let bytes = v.to_le_bytes();
        let mut off = 0u32;
        while off < 4 {
            let va = vaddr.wrapping_add(off);
            // `off < 4` and `va % PAGE < PAGE`: neither subtraction wraps.
            let n = PAGE.wrapping_sub(va % PAGE).min(4u32.wrapping_sub(off));
            let Some(pa) = self.guest_pa(mem, va, Access::KERNEL_WRITE) else {
                return kill!("bad stack page {va:#x}");
            };
            let end = off.saturating_add(n);
            let chunk = bytes.get(off as usize..end as usize).unwrap_or(&[]);
            mem.write(pa, chunk)?;
            off = end;
        }
        Ok(())
    }

    // ----------------------------------------------------------------------
    // Interrupts.

    /// Try to deliver the lowest pending, unblocked virtual irq (lguest's
    /// `try_deliver_interrupt`, E4 flavour). Part of
    /// [`prepare_entry`](Self::prepare_entry); callable on its own.
    pub fn deliver_pending<M: GuestMemory, E: Env>(&mut self, mem: &mut M, env: &mut E) {
        if self.dead.is_some() {
            return;
        }
        if let Err(k) = self.try_deliver(mem, env) {
            self.kill(k);
        }
    }

    fn try_deliver<M: GuestMemory, E: Env>(
        &mut self,
        mem: &mut M,
        env: &mut E,
    ) -> Result<(), Kill> {
        let Some(ld) = self.lguest_data else {
            return Ok(());
        };
        if self.pending == 0 {
            return Ok(());
        }
        let at = |off: u32| ld.wrapping_add(off);
        let blocked = mem.read_u32(at(LguestData::OFF_BLOCKED_INTERRUPTS))?;
        let avail = self.pending & !blocked;
        if avail == 0 {
            return Ok(());
        }
        let irq = avail.trailing_zeros();
        let more = avail & avail.wrapping_sub(1) != 0;
        if self.halted {
            // HALT implicitly enables interrupts.
            mem.write_u32(at(LguestData::OFF_IRQ_ENABLED), X86_EFLAGS_IF)?;
            self.halted = false;
        } else {
            let ie = mem.read_u32(at(LguestData::OFF_IRQ_ENABLED))?;
            if ie & X86_EFLAGS_IF == 0 {
                mem.write_u32(at(LguestData::OFF_IRQ_PENDING), X86_EFLAGS_IF)?;
                return Ok(());
            }
        }
        // Never interrupt the guest's iret sequence.
        if self.noirq_start <= self.regs.eip && self.regs.eip < self.noirq_end {
            return Ok(());
        }
        let gate = self
            .idt
            .get(FIRST_EXTERNAL_VECTOR.saturating_add(irq) as usize)
            .copied()
            .filter(IdtEntry::present);
        if let Some(gate) = gate {
            self.pending &= !(1u32 << irq);
            self.push_frame(gate, None, mem)?;
        }
        self.write_time(ld, mem, env)?;
        let irq_pending = if more { X86_EFLAGS_IF } else { 0 };
        mem.write_u32(at(LguestData::OFF_IRQ_PENDING), irq_pending)?;
        Ok(())
    }

    fn write_time<M: GuestMemory, E: Env>(
        &self,
        ld: u32,
        mem: &mut M,
        env: &E,
    ) -> Result<(), Kill> {
        let (sec, nsec) = env.wallclock();
        let mut t = [0u8; 8];
        t[..4].copy_from_slice(&sec.to_le_bytes());
        t[4..].copy_from_slice(&nsec.to_le_bytes());
        mem.write(ld.wrapping_add(LguestData::OFF_TIME), &t)?;
        Ok(())
    }

    // ----------------------------------------------------------------------
    // Hypercalls.

    /// Run the saved synchronous hypercall: INIT if it's the first, else
    /// drain the async ring, then the call itself. If a ring entry produced a
    /// notify, the call stays pending for [`prepare_entry`](Self::prepare_entry).
    fn run_pending_hcall<M: GuestMemory, E: Env>(
        &mut self,
        mem: &mut M,
        env: &mut E,
    ) -> Result<Action, Kill> {
        let Some(args) = self.pending_hcall else {
            return Ok(Action::Resume);
        };
        let Some(ld) = self.lguest_data else {
            self.pending_hcall = None;
            if args.arg0 != LHCALL_LGUEST_INIT {
                return kill!("hypercall {} before INIT", args.arg0);
            }
            self.do_init(args.arg1, mem, env)?;
            return Ok(Action::Resume);
        };
        if let Some(a) = self.run_async(ld, mem, env)? {
            return Ok(a);
        }
        self.pending_hcall = None;
        self.do_call(args, mem, env)
    }

    /// Drain the async ring (docs/abi.md, section 4). `Some(action)` if an entry
    /// produced something the launcher must see (notify, restart, death).
    fn run_async<M: GuestMemory, E: Env>(
        &mut self,
        ld: u32,
        mem: &mut M,
        env: &mut E,
    ) -> Result<Option<Action>, Kill> {
        match self.drain_ring(ld, mem, env, |_, _| true)? {
            Drained::Action(a) => Ok(Some(a)),
            Drained::Empty | Drained::Stopped => Ok(None),
        }
    }

    /// The async ring's drain, in order from the cursor, as long as `take`
    /// accepts the next entry's call number (the full path's drain takes
    /// them all). [`Drained::Stopped`]: at an entry `take` refused, with the
    /// entries before it done and the cursor on it, so that a later drain
    /// goes on from there exactly as one drain would have.
    fn drain_ring<M: GuestMemory, E: Env>(
        &mut self,
        ld: u32,
        mem: &mut M,
        env: &mut E,
        take: impl Fn(&Self, u32) -> bool,
    ) -> Result<Drained, Kill> {
        self.drain_switch(ld, mem, &take)?;
        for _ in 0..LHCALL_RING_SIZE {
            // `n < 64` and lguest_data lies inside guest memory (checked at
            // INIT): these reads cannot fail. An empty slot (the common
            // case at once) ends the drain.
            let n = (self.ring_cursor % LHCALL_RING_SIZE) as u32;
            let status = ld.wrapping_add(LguestData::off_hcall_status(n));
            if mem.read_u8(status)? == HCALL_STATUS_EMPTY {
                break;
            }
            // The whole entry in one read (one range check).
            let mut raw = [0u8; 20];
            mem.read(ld.wrapping_add(LguestData::off_hcall(n)), &mut raw)?;
            let mut w = [0u32; 5];
            for (d, c) in w.iter_mut().zip(raw.chunks_exact(4)) {
                *d = <[u8; 4]>::try_from(c).map_or(0, u32::from_le_bytes);
            }
            let [arg0, arg1, arg2, arg3, arg4] = w;
            if !take(self, arg0) {
                return Ok(Drained::Stopped);
            }
            let next = (n as usize).saturating_add(1) % LHCALL_RING_SIZE;
            self.ring_cursor = next;
            let next = next as u32;
            if arg0 < 32 && self.trivial_hcalls() & (1 << arg0) != 0 {
                // A no-op call: nothing to dispatch.
                mem.write_u8(status, HCALL_STATUS_EMPTY)?;
                continue;
            }
            let args = HcallArgs {
                arg0,
                arg1,
                arg2,
                arg3,
                arg4,
            };
            // A `NEW_PGTABLE` queued right before a `SET_STACK` (Linux's
            // context switch) leaves the pinning to the `SET_STACK`.
            self.pin_later = arg0 == guest_abi::hcall::LHCALL_NEW_PGTABLE
                && mem.read_u8(ld.wrapping_add(LguestData::off_hcall_status(next)))?
                    != HCALL_STATUS_EMPTY
                && mem.read_u32(ld.wrapping_add(LguestData::off_hcall(next)))?
                    == guest_abi::hcall::LHCALL_SET_STACK;
            let r = self.do_call(args, mem, env);
            self.pin_later = false;
            mem.write_u8(status, HCALL_STATUS_EMPTY)?;
            match r? {
                a @ (Action::Notify(_) | Action::Restart | Action::Dead) => {
                    return Ok(Drained::Action(a));
                }
                Action::Resume | Action::Halt => {}
            }
        }
        Ok(Drained::Empty)
    }

    /// `LHCALL_LGUEST_INIT` (docs/abi.md, section 5, "At INIT").
    fn do_init<M: GuestMemory, E: Env>(
        &mut self,
        ld: u32,
        mem: &mut M,
        env: &mut E,
    ) -> Result<(), Kill> {
        match ld.checked_add(LguestData::SIZE) {
            Some(end) if end <= mem.limit() => {}
            _ => return kill!("bad guest page {ld:#x}"),
        }
        let at = |off: u32| ld.wrapping_add(off);
        mem.write_u32(at(LguestData::OFF_TSC_KHZ), env.tsc_khz())?;
        if mem.read_u32(at(LguestData::OFF_SYSCALL_VEC))? != SYSCALL_VECTOR {
            return kill!("bad syscall vector");
        }
        self.noirq_start = mem.read_u32(at(LguestData::OFF_NOIRQ_START))?;
        self.noirq_end = mem.read_u32(at(LguestData::OFF_NOIRQ_END))?;
        self.write_time(ld, mem, env)?;
        let ka = mem.read_u32(at(LguestData::OFF_KERNEL_ADDRESS))?;
        check_kernel_address(ka)?;
        self.kernel_address = ka;
        // Nothing of the hypervisor lives below 4 GiB in a guest's view.
        mem.write_u32(at(LguestData::OFF_RESERVE_MEM), 0)?;
        let shadow = ShadowPaging::new(env.shadow_config(ka))
            .map_err(|e| Kill::new(format_args!("cannot set up shadow paging: {e}")))?;
        self.shadow = Some(shadow);
        self.lguest_data = Some(ld);
        Ok(())
    }

    /// Execute one hypercall (synchronous or from the ring); INIT is done.
    fn do_call<M: GuestMemory, E: Env>(
        &mut self,
        args: HcallArgs,
        mem: &mut M,
        env: &mut E,
    ) -> Result<Action, Kill> {
        let HcallArgs {
            arg0: nr,
            arg1: a1,
            arg2: a2,
            arg3: a3,
            arg4: a4,
        } = args;
        let Ok(h) = Hypercall::try_from(nr) else {
            return kill!("Bad hypercall {nr}");
        };
        match h {
            Hypercall::FlushAsync | Hypercall::SendInterrupts => Ok(Action::Resume),
            Hypercall::LguestInit => kill!("already have lguest_data"),
            Hypercall::Shutdown => self.shutdown(a1, a2, mem),
            Hypercall::NewPgtable
            | Hypercall::SetPte
            | Hypercall::SetPgd
            | Hypercall::SetPmd
            | Hypercall::FlushTlb => self.paging_call(h, [a1, a2, a3, a4], mem, env),
            Hypercall::LoadIdtEntry => self.load_idt_entry(a1, a2, a3).map(|()| Action::Resume),
            Hypercall::SetStack => self
                .set_stack(a1, a2, a3, mem, env)
                .map(|()| Action::Resume),
            Hypercall::Ts => {
                self.ts = a1 & 8 != 0;
                env.set_ts(self.ts);
                Ok(Action::Resume)
            }
            Hypercall::SetClockevent => {
                env.set_clockevent((a1 != 0).then_some(u64::from(a1)));
                Ok(Action::Resume)
            }
            Hypercall::Halt => {
                self.halted = true;
                Ok(Action::Halt)
            }
            Hypercall::LoadTls => {
                let tls = read_tls(mem, a1)?;
                let before = self.gdt.generation();
                let old = self.tls_entries();
                self.gdt.load_tls(&tls)?;
                self.tls_moved(before, old);
                Ok(Action::Resume)
            }
            Hypercall::LoadGdtEntry => self.gdt.load_entry(a1, a2, a3).map(|()| Action::Resume),
            Hypercall::Notify => Ok(Action::Notify(a1)),
            _ => kill!("Bad hypercall {nr}"),
        }
    }

    /// The page-table hypercalls (docs/abi.md; lguest ABI sheet §5.4),
    /// handed to the shadow core: `NEW_PGTABLE(gpgdir)` (the first one
    /// leaves linear mode), `SET_PTE(gpgdir, vaddr, pte[, pte_high])`,
    /// `SET_PGD(gpgdir, index)`, `SET_PMD(pmd, index)` (PAE),
    /// `FLUSH_TLB(all)`.
    fn paging_call<M: GuestMemory, E: Env>(
        &mut self,
        h: Hypercall,
        [a1, a2, a3, a4]: [u32; 4],
        mem: &mut M,
        env: &mut E,
    ) -> Result<Action, Kill> {
        let Some(sh) = self.shadow.as_mut() else {
            return kill!("{} before INIT", h.name());
        };
        let b = env.tables();
        match h {
            Hypercall::NewPgtable => {
                let sw = if self.pin_later {
                    sh.new_pgtable_pin_later(mem, b, a1)?
                } else {
                    sh.new_pgtable(mem, b, a1)?
                };
                self.mmu_load = Some(sw);
            }
            Hypercall::SetPte => {
                let pte = set_pte_arg(sh.config().format, a3, a4);
                sh.set_pte(mem, b, a1, a2, pte)?;
            }
            Hypercall::SetPgd => sh.set_pgd(mem, b, a1, a2)?,
            Hypercall::SetPmd => sh.set_pmd(mem, b, a1, a2)?,
            _ => sh.flush_tlb(mem, b, a1 != 0)?,
        }
        Ok(Action::Resume)
    }

    /// `LHCALL_SHUTDOWN(msg, reason)`.
    fn shutdown<M: GuestMemory>(&mut self, msg: u32, reason: u32, mem: &M) -> Result<Action, Kill> {
        if reason != LGUEST_SHUTDOWN_POWEROFF && reason != LGUEST_SHUTDOWN_RESTART {
            return kill!("bad shutdown reason {reason}");
        }
        // lguest reads 128 bytes and forces the last one to NUL.
        if reason == LGUEST_SHUTDOWN_RESTART {
            // A restart happens whatever the message: lguest recorded the
            // restart after (and over) a failed read of it, and Linux's
            // `machine_restart(NULL)` hands over `__pa(NULL)`.
            if self.dead.is_none() {
                match mem.read_cstr(msg, 127) {
                    Ok(text) => self.kill(format_args!("restart: {text}")),
                    Err(_) => self.kill(format_args!("restart (message at {msg:#x} unreadable)")),
                }
                self.restart = true;
            }
            return Ok(Action::Restart);
        }
        let text = mem.read_cstr(msg, 127)?;
        if text.is_empty() {
            self.kill("power off");
        } else {
            self.kill(format_args!("power off: {text}"));
        }
        Ok(Action::Dead)
    }

    /// `LHCALL_LOAD_IDT_ENTRY(vector, lo, hi)` (docs/abi.md, section 3, call 6).
    fn load_idt_entry(&mut self, num: u32, lo: u32, hi: u32) -> Result<(), Kill> {
        if matches!(num, trap::NMI | trap::DF | trap::SPURIOUS)
            || num == u32::from(LGUEST_TRAP_ENTRY)
        {
            return Ok(());
        }
        let Some(slot) = self.idt.get_mut(num as usize) else {
            return kill!("Setting idt entry {num}");
        };
        let entry = IdtEntry { lo, hi };
        *slot = if !entry.present() {
            IdtEntry::default()
        } else {
            let ty = entry.gate_type();
            if ty != IDT_TYPE_INTERRUPT && ty != IDT_TYPE_TRAP {
                return kill!("bad IDT type {ty}");
            }
            IdtEntry {
                lo: (u32::from(KERNEL_CS) << 16) | (lo & 0xFFFF),
                hi: hi & IDT_HIGH_KEEP_MASK,
            }
        };
        let stored = *slot;
        if let Some(i) = STUB_VECTORS.iter().position(|&v| v == num)
            && let Some(g) = self.stub_gates.get_mut(i)
        {
            *g = stored.present().then(|| {
                let interrupt = if stored.gate_type() == IDT_TYPE_INTERRUPT {
                    StubGate::INTERRUPT
                } else {
                    0
                };
                (u64::from(stored.offset()) | interrupt, stored.dpl())
            });
        }
        self.idt_generation = self.idt_generation.wrapping_add(1);
        Ok(())
    }

    /// `LHCALL_SET_STACK(ss, esp, pages)`.
    fn set_stack<M: GuestMemory, E: Env>(
        &mut self,
        ss: u32,
        esp: u32,
        pages: u32,
        mem: &mut M,
        env: &mut E,
    ) -> Result<(), Kill> {
        // A valid ring-1 stack now (RPL 1, writable 32-bit data with DPL 1;
        // upstream checked only the RPL); `push_frame` checks again at use,
        // since the GDT may change in between.
        // (The segment of the last SET_STACK, checked under this very GDT:
        // valid.)
        if !self.stack_segment_ok(ss) {
            return kill!("bad stack segment {ss}");
        }
        if pages > 2 {
            return kill!("bad stack pages {pages}");
        }
        if pages == 0 {
            return kill!("bad stack pages 0");
        }
        // Pin the stack: under shadow paging its pages are kept present and
        // writable in every shadow from now on (a page the guest's tables do
        // not map writable kills); in linear mode every page must be guest
        // memory, and the stack is recorded for when paging starts.
        if !self.paging() {
            for i in 0..pages {
                let va = esp.wrapping_sub(1).wrapping_sub(i.wrapping_mul(PAGE));
                if va >= mem.limit() {
                    return kill!("bad stack page {va:#x}");
                }
            }
        }
        if let Some(sh) = self.shadow.as_mut() {
            sh.pin_stack(mem, env.tables(), esp, pages)?;
        }
        self.record_stack(ss, esp, pages);
        Ok(())
    }

    /// Whether `ss` may be the `SET_STACK` stack segment: a valid ring-1
    /// stack (RPL 1, writable 32-bit data with DPL 1; upstream checked
    /// only the RPL). The segment of the last `SET_STACK`, checked under
    /// this very GDT, is valid. (`push_frame` checks again at use, since
    /// the GDT may change in between.)
    #[inline(always)]
    fn stack_segment_ok(&self, ss: u32) -> bool {
        (ss == self.ss1 && self.ss1_checked == Some(self.gdt.generation()))
            || u16::try_from(ss).is_ok_and(|s| self.gdt.valid_stack_selector(s, 1))
    }

    /// The base of the segment `sel` names in the GDT (0 for none).
    fn segment_base(&self, sel: u32) -> u32 {
        u16::try_from(sel).map_or(0, |s| self.gdt.segment_base(s))
    }

    /// The rest of a `SET_STACK` once its stack is pinned: the new stack.
    #[inline]
    fn record_stack(&mut self, ss: u32, esp: u32, pages: u32) {
        // (The segment checked last under this GDT: the same base.)
        if ss != self.ss1 || self.ss1_checked != Some(self.gdt.generation()) {
            self.ss1_base = self.segment_base(ss);
        }
        self.ss1 = ss;
        self.ss1_checked = Some(self.gdt.generation());
        self.esp1 = esp;
        self.stack_pages = pages;
        self.stack_set = true;
    }

    /// The start of a drain when the ring holds Linux's context switch at
    /// the cursor — `NEW_PGTABLE(gpgdir)`, then the next task's
    /// `SET_STACK(ss, esp1, pages)`, then mostly a `LOAD_TLS` — and the
    /// calls need nothing but the switch: `take` takes them, the stack
    /// segment is valid, the target shadow is cached and clean and holds
    /// that stack pinned already ([`ShadowPaging::switch_with_stack`]),
    /// and the TLS entries are those loaded last. Those entries are then
    /// done exactly as the drain's loop would do them one by one (the
    /// switch owed to the MMU, the stack recorded, each status emptied, the
    /// cursor past them); anything else is left to the loop with nothing
    /// changed (the `LOAD_TLS` alone, when only it differs).
    #[inline]
    fn drain_switch<M: GuestMemory>(
        &mut self,
        ld: u32,
        mem: &mut M,
        take: &impl Fn(&Self, u32) -> bool,
    ) -> Result<(), MemFault> {
        match self.ring_head_switch(ld, mem)? {
            Some(gpgdir) => self.drain_switch_at(ld, mem, take, gpgdir).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The `gpgdir` of the `NEW_PGTABLE` queued at the async ring's cursor,
    /// if that is what it holds (Linux's context switch starts so).
    #[inline]
    fn ring_head_switch<M: GuestMemory>(&self, ld: u32, mem: &M) -> Result<Option<u32>, MemFault> {
        let n = (self.ring_cursor % LHCALL_RING_SIZE) as u32;
        Ok(match ring_entry(mem, ld, n)? {
            Some([guest_abi::hcall::LHCALL_NEW_PGTABLE, gpgdir, ..]) => Some(gpgdir),
            _ => None,
        })
    }

    /// [`drain_switch`](Self::drain_switch) once the ring's first entry is
    /// found to be `NEW_PGTABLE(gpgdir)`; the new [`pin_key`](Self::pin_key)
    /// if it took the entries, `None` if it changed nothing.
    #[inline(always)]
    fn drain_switch_at<M: GuestMemory>(
        &mut self,
        ld: u32,
        mem: &mut M,
        take: &impl Fn(&Self, u32) -> bool,
        gpgdir: u32,
    ) -> Result<Option<u64>, MemFault> {
        use guest_abi::hcall::{LHCALL_LOAD_TLS, LHCALL_NEW_PGTABLE, LHCALL_SET_STACK};
        #[cfg(test)]
        if self.drain_switch_off {
            return Ok(None);
        }
        let [k0, k1, k2] =
            core::array::from_fn(|i| (self.ring_cursor.wrapping_add(i) % LHCALL_RING_SIZE) as u32);
        let Some([LHCALL_SET_STACK, ss, esp1, pages]) = ring_entry(mem, ld, k1)? else {
            return Ok(None);
        };
        if !self.paging()
            || !take(self, LHCALL_NEW_PGTABLE)
            || !take(self, LHCALL_SET_STACK)
            || !self.stack_segment_ok(ss)
        {
            return Ok(None);
        }
        let Some((sw, pin)) = self
            .shadow
            .as_mut()
            .and_then(|sh| sh.switch_with_stack(gpgdir, esp1, pages))
        else {
            return Ok(None);
        };
        self.mmu_load = Some(sw);
        mem.write_u8(
            ld.wrapping_add(LguestData::off_hcall_status(k0)),
            HCALL_STATUS_EMPTY,
        )?;
        self.record_stack(ss, esp1, pages);
        mem.write_u8(
            ld.wrapping_add(LguestData::off_hcall_status(k1)),
            HCALL_STATUS_EMPTY,
        )?;
        self.ring_cursor = k2 as usize;
        #[cfg(test)]
        {
            self.drain_switched = self.drain_switched.saturating_add(2);
        }
        // The same TLS entries again: a `LOAD_TLS` that changes nothing.
        if let Some([LHCALL_LOAD_TLS, addr, ..]) = ring_entry(mem, ld, k2)?
            && take(self, LHCALL_LOAD_TLS)
            && read_tls(mem, addr).is_ok_and(|tls| self.gdt.tls_unchanged(&tls))
        {
            mem.write_u8(
                ld.wrapping_add(LguestData::off_hcall_status(k2)),
                HCALL_STATUS_EMPTY,
            )?;
            self.ring_cursor = (k2 as usize).saturating_add(1) % LHCALL_RING_SIZE;
            #[cfg(test)]
            {
                self.drain_switched = self.drain_switched.saturating_add(1);
            }
        }
        Ok(Some(pin))
    }
}

/// The call number and first three arguments of async-ring entry `slot`
/// (below 64) of the `lguest_data` at `ld`, or `None` if its status says it
/// is empty.
#[inline(always)]
fn ring_entry<M: GuestMemory>(mem: &M, ld: u32, slot: u32) -> Result<Option<[u32; 4]>, MemFault> {
    if mem.read_u8(ld.wrapping_add(LguestData::off_hcall_status(slot)))? == HCALL_STATUS_EMPTY {
        return Ok(None);
    }
    let mut raw = [0u8; 16];
    mem.read(ld.wrapping_add(LguestData::off_hcall(slot)), &mut raw)?;
    let mut w = [0u32; 4];
    for (d, c) in w.iter_mut().zip(raw.chunks_exact(4)) {
        *d = <[u8; 4]>::try_from(c).map_or(0, u32::from_le_bytes);
    }
    Ok(Some(w))
}

/// The three TLS descriptors of `LHCALL_LOAD_TLS` at guest address `at`.
#[inline]
fn read_tls<M: GuestMemory>(mem: &M, at: u32) -> Result<[u64; TLS_ENTRIES], MemFault> {
    let mut raw = [0u8; 24];
    mem.read(at, &mut raw)?;
    let mut tls = [0u64; TLS_ENTRIES];
    for (t, c) in tls.iter_mut().zip(raw.chunks_exact(8)) {
        *t = <[u8; 8]>::try_from(c).map_or(0, u64::from_le_bytes);
    }
    Ok(tls)
}

/// `SET_PTE`'s entry from its arguments: `pte` (2-level), or `pte` and
/// `pte_high` (PAE).
fn set_pte_arg(format: Format, pte: u32, pte_high: u32) -> u64 {
    match format {
        Format::Pae => u64::from(pte) | (u64::from(pte_high) << 32),
        Format::TwoLevel => u64::from(pte),
    }
}

#[cfg(test)]
mod tests;
