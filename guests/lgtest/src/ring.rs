//! `mode=ring`: the async hypercall ring (docs/abi.md, section 4), observed
//! through `LHCALL_LOAD_GDT_ENTRY`: each queued call writes a data
//! descriptor whose byte-granular limit encodes the call's position, and
//! `lsl` (unprivileged) reads the limit back.
//!
//! 1. 64 calls over 8 slots (call `i` → slot `i % 8`, limit `i`): nothing
//!    happens until a synchronous call; then all 64 ran, in order (each
//!    slot holds its last call's limit), and every status byte is EMPTY.
//! 2. After resetting the 8 slots synchronously, 5 more calls (the ring
//!    has wrapped) for slot 0 only: the other slots keep the reset value,
//!    so no call of the first batch ran again.
//! 3. Overflow: 65 calls, the 65th (slot 0, limit 64) finds the ring full
//!    and is made synchronously, which drains the 64 queued ones first:
//!    slot 0 ends with 64 (not 56), the others with 57..63, ring empty.
//! 4. `LHCALL_NOTIFY` inside the ring: two console strings around a GDT
//!    write; the host returns to the launcher at each notify and then
//!    finishes the drain. The scenario checks the two lines.
//! 5. No-op calls, a synchronous call, then a GDT write in the ring: the
//!    write runs (the host's ring cursor followed the no-op calls).

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::hcall::{HCALL_STATUS_EMPTY, HCALL_STATUS_READY};
use lguest_rt::guest_abi::seg::SegmentDescriptor;
use lguest_rt::guest_abi::{LHCALL_LOAD_GDT_ENTRY, LHCALL_NOTIFY, LHCALL_SEND_INTERRUPTS};
use lguest_rt::{BootInfo, check, check_eq, hcall, irq};

/// Free GDT slots used by the test.
const SLOTS: [u32; 8] = [18, 19, 20, 21, 22, 23, 24, 25];

/// A byte-granular DPL-1 data segment with limit `limit`.
fn desc(limit: u32) -> SegmentDescriptor {
    SegmentDescriptor::new(
        0,
        limit,
        SegmentDescriptor::P | (1 << 5) | SegmentDescriptor::S | SegmentDescriptor::TYPE_RW,
        SegmentDescriptor::FLAG_DB,
    )
}

fn queue_gdt(slot: u32, limit: u32) {
    let d = desc(limit);
    // SAFETY: the slots in SLOTS are never loaded into a segment register.
    unsafe { hcall::async_hcall(LHCALL_LOAD_GDT_ENTRY, slot, d.low(), d.high(), 0) };
}

fn set_gdt(slot: u32, limit: u32) {
    // SAFETY: as in `queue_gdt`.
    unsafe { hcall::load_gdt_entry(slot, desc(limit)) };
}

/// The limit of GDT slot `slot` (`lsl`), or `None` if it is not a valid
/// segment for CPL 1.
fn limit(slot: u32) -> Option<u32> {
    let lim: u32;
    let ok: u8;
    // SAFETY: lsl only reads the descriptor; it sets ZF when the selector
    // is valid and visible at CPL 1.
    unsafe {
        core::arch::asm!(
            "lsl {lim:e}, {sel:e}",
            "setz {ok}",
            sel = in(reg) slot << 3 | 1,
            lim = out(reg) lim,
            ok = out(reg_byte) ok,
        )
    };
    (ok != 0).then_some(lim)
}

fn limits() -> [Option<u32>; 8] {
    SLOTS.map(limit)
}

fn statuses() -> [u8; 64] {
    irq::snapshot().hcall_status
}

pub fn run(_boot: &BootInfo) {
    in_order();
    no_replay();
    overflow();
    notify_in_ring();
    noops_then_a_call();
}

/// No-op calls (which the host may take off the ring without leaving its
/// trap path), then a synchronous call (a full exit), then a real call in
/// the ring: it must run — the host's idea of where the ring continues
/// must have followed the no-op calls it took off.
fn noops_then_a_call() {
    reset_slots();
    hcall::flush_async();
    for _ in 0..37 {
        // SAFETY: SEND_INTERRUPTS has no effect on guest state.
        unsafe { hcall::async_hcall(LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0) };
    }
    hcall::flush_async();
    set_gdt(SLOTS[1], 7);
    queue_gdt(SLOTS[0], 5);
    hcall::flush_async();
    check_eq!(
        (limit(SLOTS[0]), limit(SLOTS[1])),
        (Some(5), Some(7)),
        "a call queued after no-op calls ran"
    );
}

const RESET: u32 = 0xABC;

fn reset_slots() {
    for s in SLOTS {
        set_gdt(s, RESET);
    }
}

fn in_order() {
    reset_slots();
    hcall::flush_async();
    // No synchronous hypercall (no println) until the flush below.
    for i in 0..64 {
        queue_gdt(SLOTS[i % 8], i as u32);
    }
    let st = statuses();
    let before = limits();
    hcall::flush_async();
    let after = limits();
    let st_after = statuses();
    check!(
        st.iter().all(|&s| s == HCALL_STATUS_READY),
        "64 queued calls: all 64 slots READY"
    );
    check_eq!(
        before,
        [Some(RESET); 8],
        "queued calls wait for a synchronous call"
    );
    let want: [Option<u32>; 8] = core::array::from_fn(|j| Some(56 + j as u32));
    check_eq!(
        after,
        want,
        "64 calls drained in order (last write per slot wins)"
    );
    check!(
        st_after.iter().all(|&s| s == HCALL_STATUS_EMPTY),
        "ring EMPTY after the drain"
    );
}

fn no_replay() {
    reset_slots();
    for i in 0..5 {
        queue_gdt(SLOTS[0], 100 + i);
    }
    hcall::flush_async();
    let got = limits();
    let mut want = [Some(RESET); 8];
    want[0] = Some(104);
    check_eq!(
        got,
        want,
        "wrapped batch ran once; no earlier call ran again"
    );
}

fn overflow() {
    reset_slots();
    hcall::flush_async();
    for i in 0..64 {
        queue_gdt(SLOTS[i % 8], i as u32);
    }
    let full = statuses().iter().all(|&s| s == HCALL_STATUS_READY);
    // The 65th: the ring is full, so this is a synchronous call.
    queue_gdt(SLOTS[0], 64);
    let got = limits();
    let st = statuses();
    check!(full, "ring full after 64 calls");
    let mut want: [Option<u32>; 8] = core::array::from_fn(|j| Some(56 + j as u32));
    want[0] = Some(64);
    check_eq!(
        got,
        want,
        "65th call ran synchronously after draining the 64"
    );
    check!(
        st.iter().all(|&s| s == HCALL_STATUS_EMPTY),
        "overflow left the ring EMPTY"
    );
}

static NOTE1: &[u8] = b"lgtest: async notify 1\n\0";
static NOTE2: &[u8] = b"lgtest: async notify 2\n\0";
static DUMMY: AtomicU32 = AtomicU32::new(0);

fn notify_in_ring() {
    reset_slots();
    // SAFETY: NOTIFY only makes the launcher read the static strings.
    unsafe {
        hcall::async_hcall(LHCALL_NOTIFY, hcall::phys(NOTE1.as_ptr()), 0, 0, 0);
    }
    queue_gdt(SLOTS[1], 0x77);
    // SAFETY: as above.
    unsafe {
        hcall::async_hcall(LHCALL_NOTIFY, hcall::phys(NOTE2.as_ptr()), 0, 0, 0);
    }
    DUMMY.store(1, Ordering::Relaxed);
    hcall::flush_async();
    check_eq!(
        limit(SLOTS[1]),
        Some(0x77),
        "GDT write between two ring notifies ran"
    );
    check!(
        statuses().iter().all(|&s| s == HCALL_STATUS_EMPTY),
        "ring EMPTY after notifies"
    );
}
