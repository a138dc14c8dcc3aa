//! Hypercall numbers, the trap vector and the asynchronous hypercall ring.
//!
//! # Register convention (E4)
//!
//! A guest issues a synchronous hypercall with `int $0x1f` ([`LGUEST_TRAP_ENTRY`])
//! from CPL 1:
//!
//! | Register | Meaning |
//! |---|---|
//! | `eax` | call number ([`Hypercall`]) — `arg0` |
//! | `ebx` | argument 1 — `arg1` |
//! | `ecx` | argument 2 — `arg2` |
//! | `edx` | argument 3 — `arg3` |
//! | `esi` | argument 4 — `arg4` |
//!
//! No value is returned; the guest must treat `eax`–`edx` as clobbered and expect
//! every other register (including `esi`) to be preserved. An unknown call number
//! or an invalid argument kills the guest; there are no error returns.
//!
//! The first hypercall must be [`Hypercall::LguestInit`]; anything else before it
//! kills the guest ("hypercall %u before INIT").

/// Interrupt vector of the hypercall trap (`int $0x1f`), the highest
/// Intel-reserved exception vector.
pub const LGUEST_TRAP_ENTRY: u8 = 0x1f;

/// `LHCALL_FLUSH_ASYNC`: no-op; its side effect is that the async ring is drained.
pub const LHCALL_FLUSH_ASYNC: u32 = 0;
/// `LHCALL_LGUEST_INIT`: a1 = guest-physical address of `struct lguest_data`.
pub const LHCALL_LGUEST_INIT: u32 = 1;
/// `LHCALL_SHUTDOWN`: a1 = guest-physical address of a NUL-terminated message, a2 = reason.
pub const LHCALL_SHUTDOWN: u32 = 2;
/// `LHCALL_NEW_PGTABLE`: a1 = guest-physical address of the new top-level page table.
pub const LHCALL_NEW_PGTABLE: u32 = 4;
/// `LHCALL_FLUSH_TLB`: a1 != 0 drops all shadows, a1 == 0 drops the user half of the current one.
pub const LHCALL_FLUSH_TLB: u32 = 5;
/// `LHCALL_LOAD_IDT_ENTRY`: a1 = vector, a2 = low gate dword, a3 = high gate dword.
pub const LHCALL_LOAD_IDT_ENTRY: u32 = 6;
/// `LHCALL_SET_STACK`: a1 = ss, a2 = esp0 (top of kernel stack), a3 = number of pages (≤ 2).
pub const LHCALL_SET_STACK: u32 = 7;
/// `LHCALL_TS`: a1 = new CR0.TS value (0 or 8).
pub const LHCALL_TS: u32 = 8;
/// `LHCALL_SET_CLOCKEVENT`: a1 = nanoseconds until the next timer interrupt (irq 0); 0 cancels.
pub const LHCALL_SET_CLOCKEVENT: u32 = 9;
/// `LHCALL_HALT`: sleep until an interrupt is deliverable (implicitly enables interrupts).
pub const LHCALL_HALT: u32 = 10;
/// `LHCALL_SET_PMD` (PAE only): a1 = guest-physical page of a PMD, a2 = index.
pub const LHCALL_SET_PMD: u32 = 13;
/// `LHCALL_SET_PTE`: a1 = top-level table, a2 = vaddr, a3 = pte low, a4 = pte high (PAE).
pub const LHCALL_SET_PTE: u32 = 14;
/// `LHCALL_SET_PGD`: a1 = top-level table, a2 = index.
pub const LHCALL_SET_PGD: u32 = 15;
/// `LHCALL_LOAD_TLS`: a1 = guest-physical address of 3 descriptors (GDT slots 6..=8), a2 = cpu.
pub const LHCALL_LOAD_TLS: u32 = 16;
/// `LHCALL_NOTIFY` (E1–E4): a1 = guest-physical address reported to the launcher.
pub const LHCALL_NOTIFY: u32 = 17;
/// `LHCALL_LOAD_GDT_ENTRY`: a1 = GDT index, a2 = low dword, a3 = high dword.
pub const LHCALL_LOAD_GDT_ENTRY: u32 = 18;
/// `LHCALL_SEND_INTERRUPTS`: no-op; the exit lets the host deliver pending interrupts.
pub const LHCALL_SEND_INTERRUPTS: u32 = 19;

/// The hypercalls of the E4 ABI.
///
/// Numbers 3, 11 and 12 belonged to calls removed before E4 and are invalid.
/// [`TryFrom<u32>`] returns the rejected number as the error, ready for the
/// kill reason "Bad hypercall %u".
#[repr(u32)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hypercall {
    /// Drain the async ring; otherwise a no-op.
    FlushAsync = LHCALL_FLUSH_ASYNC,
    /// Register `struct lguest_data`; must be the first hypercall.
    LguestInit = LHCALL_LGUEST_INIT,
    /// Stop the guest (power off or restart) with a message.
    Shutdown = LHCALL_SHUTDOWN,
    /// Switch to a new top-level page table (cr3 write).
    NewPgtable = LHCALL_NEW_PGTABLE,
    /// Drop shadow page-table entries.
    FlushTlb = LHCALL_FLUSH_TLB,
    /// Set one guest IDT gate.
    LoadIdtEntry = LHCALL_LOAD_IDT_ENTRY,
    /// Tell the host the kernel stack for traps from user mode.
    SetStack = LHCALL_SET_STACK,
    /// Set the virtual CR0.TS bit.
    Ts = LHCALL_TS,
    /// Arm (or cancel) the one-shot timer.
    SetClockevent = LHCALL_SET_CLOCKEVENT,
    /// Wait for an interrupt.
    Halt = LHCALL_HALT,
    /// A PAE page-middle-directory entry changed.
    SetPmd = LHCALL_SET_PMD,
    /// A page-table entry changed.
    SetPte = LHCALL_SET_PTE,
    /// A top-level page-table entry changed.
    SetPgd = LHCALL_SET_PGD,
    /// Load the three TLS descriptors.
    LoadTls = LHCALL_LOAD_TLS,
    /// Report a guest-physical address to the launcher (virtqueue kick, status
    /// change, early console string).
    Notify = LHCALL_NOTIFY,
    /// Set one GDT entry.
    LoadGdtEntry = LHCALL_LOAD_GDT_ENTRY,
    /// Give the host a chance to deliver pending interrupts.
    SendInterrupts = LHCALL_SEND_INTERRUPTS,
}

impl Hypercall {
    /// Every hypercall, in numeric order.
    pub const ALL: [Hypercall; 17] = [
        Hypercall::FlushAsync,
        Hypercall::LguestInit,
        Hypercall::Shutdown,
        Hypercall::NewPgtable,
        Hypercall::FlushTlb,
        Hypercall::LoadIdtEntry,
        Hypercall::SetStack,
        Hypercall::Ts,
        Hypercall::SetClockevent,
        Hypercall::Halt,
        Hypercall::SetPmd,
        Hypercall::SetPte,
        Hypercall::SetPgd,
        Hypercall::LoadTls,
        Hypercall::Notify,
        Hypercall::LoadGdtEntry,
        Hypercall::SendInterrupts,
    ];

    /// The call number placed in `eax`.
    pub const fn nr(self) -> u32 {
        self as u32
    }

    /// The Linux name of the call, e.g. `"LHCALL_SET_PTE"`.
    pub const fn name(self) -> &'static str {
        match self {
            Hypercall::FlushAsync => "LHCALL_FLUSH_ASYNC",
            Hypercall::LguestInit => "LHCALL_LGUEST_INIT",
            Hypercall::Shutdown => "LHCALL_SHUTDOWN",
            Hypercall::NewPgtable => "LHCALL_NEW_PGTABLE",
            Hypercall::FlushTlb => "LHCALL_FLUSH_TLB",
            Hypercall::LoadIdtEntry => "LHCALL_LOAD_IDT_ENTRY",
            Hypercall::SetStack => "LHCALL_SET_STACK",
            Hypercall::Ts => "LHCALL_TS",
            Hypercall::SetClockevent => "LHCALL_SET_CLOCKEVENT",
            Hypercall::Halt => "LHCALL_HALT",
            Hypercall::SetPmd => "LHCALL_SET_PMD",
            Hypercall::SetPte => "LHCALL_SET_PTE",
            Hypercall::SetPgd => "LHCALL_SET_PGD",
            Hypercall::LoadTls => "LHCALL_LOAD_TLS",
            Hypercall::Notify => "LHCALL_NOTIFY",
            Hypercall::LoadGdtEntry => "LHCALL_LOAD_GDT_ENTRY",
            Hypercall::SendInterrupts => "LHCALL_SEND_INTERRUPTS",
        }
    }
}

impl TryFrom<u32> for Hypercall {
    /// The number that is not a hypercall.
    type Error = u32;

    fn try_from(nr: u32) -> Result<Self, u32> {
        Ok(match nr {
            LHCALL_FLUSH_ASYNC => Hypercall::FlushAsync,
            LHCALL_LGUEST_INIT => Hypercall::LguestInit,
            LHCALL_SHUTDOWN => Hypercall::Shutdown,
            LHCALL_NEW_PGTABLE => Hypercall::NewPgtable,
            LHCALL_FLUSH_TLB => Hypercall::FlushTlb,
            LHCALL_LOAD_IDT_ENTRY => Hypercall::LoadIdtEntry,
            LHCALL_SET_STACK => Hypercall::SetStack,
            LHCALL_TS => Hypercall::Ts,
            LHCALL_SET_CLOCKEVENT => Hypercall::SetClockevent,
            LHCALL_HALT => Hypercall::Halt,
            LHCALL_SET_PMD => Hypercall::SetPmd,
            LHCALL_SET_PTE => Hypercall::SetPte,
            LHCALL_SET_PGD => Hypercall::SetPgd,
            LHCALL_LOAD_TLS => Hypercall::LoadTls,
            LHCALL_NOTIFY => Hypercall::Notify,
            LHCALL_LOAD_GDT_ENTRY => Hypercall::LoadGdtEntry,
            LHCALL_SEND_INTERRUPTS => Hypercall::SendInterrupts,
            other => return Err(other),
        })
    }
}

impl From<Hypercall> for u32 {
    fn from(h: Hypercall) -> u32 {
        h.nr()
    }
}

/// Number of slots in the asynchronous hypercall ring.
pub const LHCALL_RING_SIZE: usize = 64;

/// `hcall_status` value: slot empty / already executed (written by the host).
pub const HCALL_STATUS_EMPTY: u8 = 0xFF;
/// `hcall_status` value: slot filled and ready to execute (written by the guest).
pub const HCALL_STATUS_READY: u8 = 0;

/// One slot of the asynchronous hypercall ring (`struct hcall_args`, E4: five
/// words). `arg0` is the call number; `arg1..=arg4` map to `ebx`, `ecx`, `edx`,
/// `esi` of the synchronous form.
///
/// The host aliases the same five-word shape onto the saved `eax`..`esi` of a
/// synchronous call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HcallArgs {
    /// Call number (`eax`).
    pub arg0: u32,
    /// Argument 1 (`ebx`).
    pub arg1: u32,
    /// Argument 2 (`ecx`).
    pub arg2: u32,
    /// Argument 3 (`edx`).
    pub arg3: u32,
    /// Argument 4 (`esi`).
    pub arg4: u32,
}

const _: () = {
    assert!(core::mem::size_of::<HcallArgs>() == 20);
    assert!(core::mem::align_of::<HcallArgs>() == 4);
    assert!(core::mem::offset_of!(HcallArgs, arg0) == 0);
    assert!(core::mem::offset_of!(HcallArgs, arg1) == 4);
    assert!(core::mem::offset_of!(HcallArgs, arg2) == 8);
    assert!(core::mem::offset_of!(HcallArgs, arg3) == 12);
    assert!(core::mem::offset_of!(HcallArgs, arg4) == 16);
    assert!(core::mem::size_of::<Hypercall>() == 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_lguest() {
        let expect = [
            (Hypercall::FlushAsync, 0),
            (Hypercall::LguestInit, 1),
            (Hypercall::Shutdown, 2),
            (Hypercall::NewPgtable, 4),
            (Hypercall::FlushTlb, 5),
            (Hypercall::LoadIdtEntry, 6),
            (Hypercall::SetStack, 7),
            (Hypercall::Ts, 8),
            (Hypercall::SetClockevent, 9),
            (Hypercall::Halt, 10),
            (Hypercall::SetPmd, 13),
            (Hypercall::SetPte, 14),
            (Hypercall::SetPgd, 15),
            (Hypercall::LoadTls, 16),
            (Hypercall::Notify, 17),
            (Hypercall::LoadGdtEntry, 18),
            (Hypercall::SendInterrupts, 19),
        ];
        for (h, n) in expect {
            assert_eq!(h.nr(), n);
            assert_eq!(u32::from(h), n);
            assert_eq!(Hypercall::try_from(n), Ok(h));
        }
        assert_eq!(Hypercall::ALL.len(), expect.len());
    }

    #[test]
    fn all_is_sorted_and_round_trips() {
        for w in Hypercall::ALL.windows(2) {
            assert!(w[0].nr() < w[1].nr());
        }
        for h in Hypercall::ALL {
            assert_eq!(Hypercall::try_from(h.nr()), Ok(h));
            assert!(h.name().starts_with("LHCALL_"));
        }
    }

    #[test]
    fn removed_and_unknown_numbers_are_rejected() {
        for n in [3, 11, 12, 20, 31, 0x1f, 255, u32::MAX] {
            assert_eq!(Hypercall::try_from(n), Err(n));
        }
    }

    #[test]
    fn ring_constants() {
        assert_eq!(LHCALL_RING_SIZE, 64);
        assert_eq!(HCALL_STATUS_EMPTY, 0xFF);
        assert_eq!(HCALL_STATUS_READY, 0);
        assert_eq!(LGUEST_TRAP_ENTRY, 31);
    }
}
