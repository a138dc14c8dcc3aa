//! Hypercalls: synchronous (`int $0x1f`) and asynchronous (the 64-slot ring
//! in `lguest_data`), plus typed wrappers.
//!
//! All addresses passed to the host are guest-physical. The runtime runs in
//! the host's linear mode (virtual == physical), so a pointer's value is its
//! guest-physical address ([`phys`]).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering, compiler_fence};

use guest_abi::hcall::*;
use guest_abi::seg::SegmentDescriptor;
use guest_abi::{LGUEST_SHUTDOWN_POWEROFF, LGUEST_SHUTDOWN_RESTART, LguestData};

use crate::irq::{self, data};

/// Guest-physical address of `p` (identity: the runtime never leaves the
/// host's linear mode on its own).
pub fn phys<T: ?Sized>(p: *const T) -> u32 {
    p.cast::<u8>() as u32
}

/// Issue synchronous hypercall `nr` with arguments 1–4.
///
/// # Safety
///
/// Hypercalls change machine state behind the compiler's back (page tables,
/// IDT/GDT entries, the kernel stack, ...) or kill the guest. The caller
/// must make sure the call cannot invalidate memory or code the program
/// still relies on, and that any address argument is the guest-physical
/// address of memory that stays valid for as long as the host may use it.
#[inline]
pub unsafe fn hcall(nr: u32, a1: u32, a2: u32, a3: u32, a4: u32) {
    #[cfg(target_arch = "x86")]
    // SAFETY: the caller vouches for the call's effect; the asm itself only
    // touches the registers it declares.
    unsafe {
        // E4 register convention: eax = call, ebx/ecx/edx/esi = args 1-4.
        // rustc does not let inline asm name esi on 32-bit x86 (LLVM may use
        // it as its base pointer), so arg 4 travels in a free register of the
        // compiler's choice (edi here, since eax..edx are taken) and is
        // swapped into esi just around the trap; the second xchg puts the
        // compiler's esi back. ebx is usable in this static, non-PIC build.
        // The host returns nothing: eax..edx and the scratch register are
        // declared clobbered. No `nomem`/`nostack`: the host reads and writes
        // guest memory (this is a compiler barrier) and may push an interrupt
        // frame below esp when it resumes us.
        core::arch::asm!(
            "xchg esi, {a4}",
            "int 0x1f",
            "xchg esi, {a4}",
            a4 = inout(reg) a4 => _,
            inout("eax") nr => _,
            inout("ebx") a1 => _,
            inout("ecx") a2 => _,
            inout("edx") a3 => _,
        );
    }
    #[cfg(not(target_arch = "x86"))]
    {
        let _ = (nr, a1, a2, a3, a4);
        unimplemented!("lguest hypercalls exist only on 32-bit x86");
    }
}

/// [`hcall`] by [`Hypercall`] value.
///
/// # Safety
///
/// As for [`hcall`].
pub unsafe fn call(h: Hypercall, a1: u32, a2: u32, a3: u32, a4: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(h.nr(), a1, a2, a3, a4) }
}

/// A hypercall without arguments that cannot hurt the guest
/// (`SEND_INTERRUPTS`, `FLUSH_ASYNC`, `HALT`).
pub(crate) fn sync0(nr: u32) {
    debug_assert!(matches!(
        nr,
        LHCALL_SEND_INTERRUPTS | LHCALL_FLUSH_ASYNC | LHCALL_HALT
    ));
    // SAFETY: these calls have no arguments and change no guest state.
    unsafe { hcall(nr, 0, 0, 0, 0) }
}

/// The guest's private cursor into the async ring: a free-running count of
/// queued calls, whose low bits ([`RING_MASK`]) are the next slot. 2^32 is a
/// multiple of the ring size, so wrapping keeps it in step with the host's
/// cursor.
static NEXT_CALL: AtomicU32 = AtomicU32::new(0);

/// `index & RING_MASK` is `index % LHCALL_RING_SIZE`.
const RING_MASK: u32 = LHCALL_RING_SIZE as u32 - 1;
const _: () = assert!(LHCALL_RING_SIZE.is_power_of_two() && LHCALL_RING_SIZE <= 256);

/// Queue hypercall `nr` in the async ring; the host executes queued calls,
/// in order, before the next synchronous hypercall. If the ring is full the
/// call is made synchronously instead (which drains the ring first), as
/// Linux's `async_hcall` does.
///
/// This is the hot path of paravirtualised page-table and descriptor
/// updates, so it is inlined and kept to a handful of instructions (about
/// 20 with constant arguments: `docs/benchmarks.md`, `async_hypercall`):
///
/// - Virtual interrupts are off around the slot's claim, fill and publish,
///   exactly as in Linux: an interrupt handler that queues a call of its own
///   and then makes a synchronous hypercall relies on its call having run,
///   which needs every slot before its own to be READY, not half-written.
///   A scheme without masking (claiming the slot with one `xadd` on the
///   cursor) would let the handler publish slot k+1 while slot k is still
///   EMPTY; the host stops at the first EMPTY slot, so the handler's call
///   would silently wait past its synchronous hypercall. "Off" is a plain
///   store to `irq_enabled` (no exit); only when interrupts were on and the
///   host flagged one as pending meanwhile does the restore cost a
///   `LHCALL_SEND_INTERRUPTS` (as [`irq::restore`] does).
/// - The slot is `NEXT_CALL & RING_MASK` (no division), and the five words
///   are stored directly (no staging copy of [`HcallArgs`]).
/// - The ring-full fallback is out of line ([`async_hcall_full`]).
///
/// # Safety
///
/// As for [`hcall`]; additionally, the effect is delayed until the next
/// synchronous hypercall ([`flush_async`] forces one).
#[inline]
pub unsafe fn async_hcall(nr: u32, a1: u32, a2: u32, a3: u32, a4: u32) {
    let flags = irq::save();
    let next = NEXT_CALL.load(Ordering::Relaxed);
    let slot = (next & RING_MASK) as usize;
    let d: *mut LguestData = data();
    // SAFETY: `d` is the live static; `slot <= RING_MASK < 64` indexes
    // inside the status array; volatile because the host writes the status
    // bytes.
    let status = unsafe { (&raw const (*d).hcall_status[slot]).read_volatile() };
    if status != HCALL_STATUS_EMPTY {
        // SAFETY: forwarded contract.
        unsafe { async_hcall_full(flags, nr, a1, a2, a3, a4) };
        return;
    }
    // The five words of `HcallArgs` (repr(C), five u32: arg0 = nr, then
    // arguments 1-4).
    let w = d_slot(d, slot).cast::<u32>();
    // SAFETY: `w` points at the 20-byte, 4-aligned `hcalls[slot]` of the
    // live static; the slot is ours (status EMPTY, interrupts off) until we
    // mark it READY, and the host reads it only while we are stopped.
    unsafe {
        w.write_volatile(nr);
        w.add(1).write_volatile(a1);
        w.add(2).write_volatile(a2);
        w.add(3).write_volatile(a3);
        w.add(4).write_volatile(a4);
    }
    // Arguments must be in place before the host can see READY (the host
    // only looks while the guest is stopped, so program order suffices).
    compiler_fence(Ordering::Release);
    // SAFETY: as for the status read above.
    unsafe { (&raw mut (*d).hcall_status[slot]).write_volatile(HCALL_STATUS_READY) };
    NEXT_CALL.store(next.wrapping_add(1), Ordering::Relaxed);
    irq::restore(flags);
}

const _: () = assert!(core::mem::size_of::<HcallArgs>() == 5 * 4);

/// `&raw mut (*d).hcalls[slot]`, `slot < LHCALL_RING_SIZE`.
#[inline(always)]
fn d_slot(d: *mut LguestData, slot: usize) -> *mut HcallArgs {
    // SAFETY: place projection only (no read or reference): `d` points at
    // the live static and `slot < LHCALL_RING_SIZE` (the caller masks it).
    unsafe { &raw mut (*d).hcalls[slot] }
}

/// [`async_hcall`] with the ring full: make the call synchronously (the
/// host drains the ring first), still with interrupts off, then restore
/// `flags`.
///
/// # Safety
///
/// As for [`hcall`].
#[cold]
#[inline(never)]
unsafe fn async_hcall_full(flags: irq::IrqFlags, nr: u32, a1: u32, a2: u32, a3: u32, a4: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(nr, a1, a2, a3, a4) };
    irq::restore(flags);
}

/// `LHCALL_FLUSH_ASYNC`: make the host run everything queued in the ring.
pub fn flush_async() {
    sync0(LHCALL_FLUSH_ASYNC);
}

/// `LHCALL_SEND_INTERRUPTS`: give the host a chance to deliver pending irqs.
pub fn send_interrupts() {
    sync0(LHCALL_SEND_INTERRUPTS);
}

/// `LHCALL_HALT`: sleep until an interrupt is deliverable. The host enables
/// virtual interrupts to deliver it, so this returns (after the handler ran)
/// with interrupts enabled. To wait for a condition without a lost-wakeup
/// race: [`irq::disable`](crate::irq::disable()), test, then `halt()`.
pub fn halt() {
    sync0(LHCALL_HALT);
}

/// `LHCALL_NOTIFY(addr)`: report a guest-physical address to the launcher
/// (a virtqueue kick `pfn << 12`, a device-descriptor status change, or an
/// early-console string).
pub fn notify(addr: u32) {
    // SAFETY: NOTIFY changes no guest state; the launcher only reads.
    unsafe { hcall(LHCALL_NOTIFY, addr, 0, 0, 0) }
}

/// `LHCALL_SET_CLOCKEVENT`: raise irq 0 after `delta_ns` nanoseconds
/// (one-shot); 0 cancels. Irq 0 must be [unmasked](crate::irq::unmask).
pub fn set_clockevent(delta_ns: u32) {
    // SAFETY: only arms the host timer.
    unsafe { hcall(LHCALL_SET_CLOCKEVENT, delta_ns, 0, 0, 0) }
}

/// `LHCALL_TS`: set (`true`) or clear the virtual CR0.TS bit.
pub fn set_ts(ts: bool) {
    // SAFETY: only affects whether FPU use traps (#NM).
    unsafe { hcall(LHCALL_TS, if ts { 8 } else { 0 }, 0, 0, 0) }
}

/// `LHCALL_LGUEST_INIT(addr)`.
///
/// # Safety
///
/// `addr` must be the guest-physical address of a `'static` `lguest_data`
/// prepared as the ABI requires; must be the first hypercall, made once.
pub(crate) unsafe fn lguest_init(addr: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_LGUEST_INIT, addr, 0, 0, 0) }
}

/// `LHCALL_LOAD_IDT_ENTRY(vector, low, high)`; see
/// [`guest_abi::seg::idt_gate`] for the encoding.
///
/// # Safety
///
/// The gate must point at code that handles the host's trap frame and
/// returns with the paravirt iret (or never returns).
pub unsafe fn load_idt_entry(vector: u32, low: u32, high: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_LOAD_IDT_ENTRY, vector, low, high, 0) }
}

/// `LHCALL_LOAD_GDT_ENTRY(index, low, high)`.
///
/// # Safety
///
/// Replacing a descriptor that a live selector (cs 0x61, ds/ss 0x69, ...)
/// refers to changes the meaning of every memory access through it.
pub unsafe fn load_gdt_entry(index: u32, desc: SegmentDescriptor) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_LOAD_GDT_ENTRY, index, desc.low(), desc.high(), 0) }
}

/// `LHCALL_LOAD_TLS(&descs, 0)`: GDT slots 6, 7, 8. Linux clears `%gs`
/// before this call (the host cannot cope with a loaded selector's entry
/// vanishing); the runtime never loads `%fs`/`%gs` itself.
///
/// # Safety
///
/// As for [`load_gdt_entry`].
pub unsafe fn load_tls(descs: &[SegmentDescriptor; 3]) {
    // SAFETY: forwarded contract; the array is read during the call.
    unsafe { hcall(LHCALL_LOAD_TLS, phys(descs), 0, 0, 0) }
}

/// `LHCALL_SET_STACK(ss, esp0, pages)`: the stack the host switches to for
/// traps and interrupts taken from CPL 3 (`ss` = [`KERNEL_DS`](guest_abi::KERNEL_DS),
/// `esp0` = top of the stack, `pages` ≤ 2 the host keeps mapped).
///
/// # Safety
///
/// The stack must be valid, writable and unused by anything else whenever
/// user code runs.
pub unsafe fn set_stack(ss: u32, esp0: u32, pages: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_SET_STACK, ss, esp0, pages, 0) }
}

/// `LHCALL_NEW_PGTABLE(pgdir)`: switch to the page table at guest-physical
/// `pgdir` (leaves the host's linear mode for good).
///
/// # Safety
///
/// The table must map everything the guest touches afterwards, including
/// the code, stack, `lguest_data` and the console buffer at their current
/// (identity) addresses.
pub unsafe fn new_pgtable(pgdir: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_NEW_PGTABLE, pgdir, 0, 0, 0) }
}

/// `LHCALL_FLUSH_TLB(all)`: drop all shadows (`true`) or only the user half
/// of the current one.
///
/// # Safety
///
/// As for [`new_pgtable`]: afterwards the host re-reads the guest tables.
pub unsafe fn flush_tlb(all: bool) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_FLUSH_TLB, u32::from(all), 0, 0, 0) }
}

/// `LHCALL_SET_PTE(pgdir, vaddr, pte_low, pte_high)`.
///
/// # Safety
///
/// As for [`new_pgtable`].
pub unsafe fn set_pte(pgdir: u32, vaddr: u32, pte_low: u32, pte_high: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_SET_PTE, pgdir, vaddr, pte_low, pte_high) }
}

/// `LHCALL_SET_PGD(pgdir, index)`.
///
/// # Safety
///
/// As for [`new_pgtable`].
pub unsafe fn set_pgd(pgdir: u32, index: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_SET_PGD, pgdir, index, 0, 0) }
}

/// `LHCALL_SET_PMD(pmd_page, index)` (PAE guests).
///
/// # Safety
///
/// As for [`new_pgtable`].
pub unsafe fn set_pmd(pmd_page: u32, index: u32) {
    // SAFETY: forwarded contract.
    unsafe { hcall(LHCALL_SET_PMD, pmd_page, index, 0, 0) }
}

/// Bytes of the message the host reads for `LHCALL_SHUTDOWN` (it forces the
/// last one to NUL).
pub const SHUTDOWN_MSG_LEN: usize = 128;

/// A 128-byte message buffer the host can read in full.
#[repr(C, align(4))]
pub(crate) struct MsgBuf(pub(crate) UnsafeCell<[u8; SHUTDOWN_MSG_LEN]>);

// SAFETY: written only by the single `shutdown` call that wins `SHUTTING_DOWN`.
unsafe impl Sync for MsgBuf {}

static SHUTDOWN_MSG: MsgBuf = MsgBuf(UnsafeCell::new([0; SHUTDOWN_MSG_LEN]));
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Used if a shutdown is re-entered (e.g. a trap while shutting down).
static REENTERED_MSG: [u8; SHUTDOWN_MSG_LEN] = const_msg(b"shutdown re-entered");

/// A NUL-padded [`SHUTDOWN_MSG_LEN`]-byte message buffer built at compile
/// time, for the fixed messages of paths that must not format (re-entered
/// shutdown, nested panic). `text` must be shorter than the buffer (the last
/// byte stays NUL); a longer text fails the constant's evaluation.
pub(crate) const fn const_msg(text: &[u8]) -> [u8; SHUTDOWN_MSG_LEN] {
    assert!(text.len() < SHUTDOWN_MSG_LEN, "message too long");
    let mut buf = [0u8; SHUTDOWN_MSG_LEN];
    let mut i = 0;
    while i < text.len() {
        buf[i] = text[i];
        i += 1;
    }
    buf
}

/// `LHCALL_SHUTDOWN(msg, reason)` and never return. The message is cut to
/// 127 bytes; the host records `"power off: <msg>"` as the death reason (or
/// makes the control channel return `ERESTART` for
/// [`LGUEST_SHUTDOWN_RESTART`]). Pending console output is flushed first.
pub fn shutdown(reason: u32, msg: &str) -> ! {
    crate::console::flush();
    irq::disable();
    if SHUTTING_DOWN.swap(true, Ordering::AcqRel) {
        shutdown_raw(phys(&raw const REENTERED_MSG), reason);
    }
    let buf = SHUTDOWN_MSG.0.get();
    // SAFETY: we won `SHUTTING_DOWN`, so this is the only reference to the
    // buffer, ever.
    let buf = unsafe { &mut *buf };
    let n = msg.len().min(SHUTDOWN_MSG_LEN - 1);
    buf[..n].copy_from_slice(&msg.as_bytes()[..n]);
    buf[n] = 0;
    shutdown_raw(phys(buf), reason)
}

/// Issue `LHCALL_SHUTDOWN` with a message already in guest memory (at
/// least 128 readable bytes at `msg_addr`), then halt forever.
pub(crate) fn shutdown_raw(msg_addr: u32, reason: u32) -> ! {
    // SAFETY: the guest stops here; the message buffer is static.
    unsafe { hcall(LHCALL_SHUTDOWN, msg_addr, reason, 0, 0) };
    // The host never resumes a shut-down guest; if it does, stay put.
    loop {
        sync0(LHCALL_HALT);
    }
}

/// Shut down with [`LGUEST_SHUTDOWN_POWEROFF`].
pub fn power_off(msg: &str) -> ! {
    shutdown(LGUEST_SHUTDOWN_POWEROFF, msg)
}

/// Shut down with [`LGUEST_SHUTDOWN_RESTART`].
pub fn restart(msg: &str) -> ! {
    shutdown(LGUEST_SHUTDOWN_RESTART, msg)
}
