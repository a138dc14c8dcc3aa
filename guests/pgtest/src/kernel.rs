//! Kernel-mode areas: the high kernel mapping, demand paging, A/D bits,
//! `SET_PTE` and `FLUSH_TLB` semantics.

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::paging::{
    self, AddressSpace, KWINDOW, PAGE_ACCESSED, PAGE_DIRTY, PAGE_OFFSET, PAGE_PRESENT, PAGE_RW,
    PAGE_SIZE, PF_PROT, PF_USER, PF_WRITE, probe_read, probe_write,
};
use lguest_rt::{check, check_eq, hcall, test};

use crate::{KDEMAND, TEST_AS, kernel_faults, summary, test_as};

/// A static reached through both of its addresses.
static KCHECK: AtomicU32 = AtomicU32::new(0);

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    /// `u32 pgtest_high_fn(u32 x)` = `2x + 1`, position independent.
    static pgtest_high_fn: u8;
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    ".pushsection .text.pgtest_high_fn,\"ax\",@progbits",
    ".globl pgtest_high_fn",
    "pgtest_high_fn:",
    "mov eax, dword ptr [esp + 4]",
    "lea eax, [eax + eax + 1]",
    "ret",
    ".popsection",
);

/// `mode=kernel`: the direct map at `PAGE_OFFSET` reaches the image's data
/// (both ways) and runs its code.
pub fn high() {
    let failed = test::failed();
    let pa = hcall::phys(&raw const KCHECK);
    KCHECK.store(0x1234_5678, Ordering::SeqCst);
    check_eq!(
        probe_read(PAGE_OFFSET + pa),
        Ok(0x1234_5678),
        "kernel: a store through the image address is seen at PAGE_OFFSET + pa"
    );
    check_eq!(
        probe_write(PAGE_OFFSET + pa, 0x8765_4321),
        Ok(()),
        "kernel: a store through PAGE_OFFSET + pa"
    );
    check_eq!(
        KCHECK.load(Ordering::SeqCst),
        0x8765_4321,
        "kernel: ... is seen through the image address"
    );
    #[cfg(target_arch = "x86")]
    {
        let high = PAGE_OFFSET + hcall::phys(&raw const pgtest_high_fn);
        // SAFETY: `high` is the direct-map alias of `pgtest_high_fn`, an
        // `extern "C" fn(u32) -> u32` that uses no absolute address.
        let f: extern "C" fn(u32) -> u32 = unsafe { core::mem::transmute(high as usize) };
        check_eq!(f(20), 41, "kernel: code runs at PAGE_OFFSET + pa");
    }
    #[cfg(not(target_arch = "x86"))]
    check!(true, "kernel: code runs at PAGE_OFFSET + pa");
    let ktop = lguest_rt::process::kernel_stack_top();
    check!(
        ktop > PAGE_OFFSET,
        "kernel: the SET_STACK stack is a PAGE_OFFSET address ({ktop:#x})"
    );
    summary("kernel mapped at 0xc0000000", failed);
}

/// `mode=demand`: kernel reads and writes of not-present pages in
/// [`KDEMAND`] fault; the hook reads `cr2`, maps a fresh page (`SET_PTE`)
/// and the access is retried.
pub fn demand() {
    let failed = test::failed();
    TEST_AS.with(|s| *s = AddressSpace::new());
    test_as(|s| s.switch_to());
    let (n0, _) = kernel_faults();
    check_eq!(
        probe_read(KDEMAND),
        Ok(0),
        "demand: a read of a not-present page returns 0 from a fresh page"
    );
    let (n1, last) = kernel_faults();
    check_eq!(n1 - n0, 1, "demand: the read faulted once");
    check_eq!(last.addr, KDEMAND, "demand: lguest_data.cr2 is the address");
    check_eq!(
        last.error & (PF_PROT | PF_WRITE | PF_USER),
        0,
        "demand: error code: kernel read, not present"
    );
    let va = KDEMAND + PAGE_SIZE + 8;
    check_eq!(
        probe_write(va, 0xD0D0_0001),
        Ok(()),
        "demand: a write to a not-present page"
    );
    let (n2, last) = kernel_faults();
    check_eq!(n2 - n1, 1, "demand: the write faulted once");
    check_eq!(last.addr, va, "demand: cr2 of the write");
    check_eq!(
        last.error & (PF_PROT | PF_WRITE | PF_USER),
        PF_WRITE,
        "demand: error code: kernel write, not present"
    );
    check_eq!(probe_read(va), Ok(0xD0D0_0001), "demand: the write landed");
    check_eq!(
        probe_read(KDEMAND + 4),
        Ok(0),
        "demand: the first page again"
    );
    check_eq!(
        kernel_faults().0,
        n2,
        "demand: mapped pages do not fault again"
    );
    let pa = test_as(|s| s.translate(va));
    check!(
        pa.is_some_and(|pa| probe_read(PAGE_OFFSET + pa) == Ok(0xD0D0_0001)),
        "demand: the new page is reached through the direct map too"
    );
    finish_test_as();
    summary("demand paging", failed);
}

/// Switch back to the kernel's tables and destroy [`TEST_AS`].
fn finish_test_as() {
    paging::switch_to_kernel();
    if let Some(s) = TEST_AS.with(Option::take) {
        s.destroy();
    }
}

/// A test page: a frame with a marker at offset 0.
struct Frame(u32);

impl Frame {
    fn new(marker: u32) -> Frame {
        let pa = paging::alloc_frame().expect("a free frame");
        let _ = probe_write(paging::kva(pa), marker);
        Frame(pa)
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        paging::free_frame(self.0);
    }
}

const AD_VA: u32 = 0x5100_0000;

/// `mode=ad`: the host sets ACCESSED on a read and DIRTY on a write in the
/// guest's PTE, also after the guest cleaned them with `SET_PTE`.
pub fn accessed_dirty() {
    let failed = test::failed();
    TEST_AS.with(|s| *s = AddressSpace::new());
    test_as(|s| s.switch_to());
    let page = Frame::new(0xAD00_0001);
    let flags = PAGE_PRESENT | PAGE_RW;
    let ad = PAGE_ACCESSED | PAGE_DIRTY;
    for round in 0..2 {
        let _ = test_as(|s| s.map(AD_VA, page.0, flags));
        check_eq!(
            test_as(|s| s.entry(AD_VA)) & ad,
            0,
            "a/d round {round}: a clean entry after SET_PTE"
        );
        check_eq!(
            probe_read(AD_VA),
            Ok(0xAD00_0001),
            "a/d round {round}: read"
        );
        check_eq!(
            test_as(|s| s.entry(AD_VA)) & ad,
            PAGE_ACCESSED,
            "a/d round {round}: ACCESSED (not DIRTY) after a read"
        );
        check_eq!(
            probe_write(AD_VA + 4, round),
            Ok(()),
            "a/d round {round}: write"
        );
        check_eq!(
            test_as(|s| s.entry(AD_VA)) & ad,
            ad,
            "a/d round {round}: ACCESSED and DIRTY after a write"
        );
    }
    // An entry given with A and D set is used at once and left alone.
    let _ = test_as(|s| s.map(AD_VA, page.0, flags | ad));
    check_eq!(
        probe_write(AD_VA + 8, 3),
        Ok(()),
        "a/d: write through a dirty entry"
    );
    check_eq!(
        test_as(|s| s.entry(AD_VA)),
        u64::from(page.0) | flags | ad,
        "a/d: a dirty entry is unchanged"
    );
    let _ = test_as(|s| s.unmap(AD_VA));
    finish_test_as();
    drop(page);
    summary("accessed/dirty bits", failed);
}

const X: u32 = 0x5200_0000;
/// A kernel-window page.
const W: u32 = KWINDOW + 5 * PAGE_SIZE;

/// `mode=tlb`: `SET_PTE` takes effect at once (user and kernel addresses,
/// the latter in every address space); entries changed behind the host's
/// back take effect after `FLUSH_TLB(0)`, `FLUSH_TLB(1)` or a single-page
/// flush.
pub fn tlb() {
    let failed = test::failed();
    TEST_AS.with(|s| *s = AddressSpace::new());
    let other = AddressSpace::new().expect("a second address space");
    test_as(|s| s.switch_to());
    let (one, two) = (Frame::new(0x1111_1111), Frame::new(0x2222_2222));
    let rw = PAGE_PRESENT | PAGE_RW;

    // SET_PTE, user half.
    let _ = test_as(|s| s.map(X, one.0, rw));
    check_eq!(probe_read(X), Ok(0x1111_1111), "set_pte: first mapping");
    let _ = test_as(|s| s.map(X, two.0, rw));
    check_eq!(probe_read(X), Ok(0x2222_2222), "set_pte: remapped at once");
    let _ = test_as(|s| s.unmap(X));
    let r = probe_read(X);
    check!(
        r.is_err_and(|f| f.addr == X && f.error & PF_PROT == 0),
        "set_pte: unmapped at once (not-present fault): {r:?}"
    );
    let _ = test_as(|s| s.map(X, one.0, PAGE_PRESENT));
    check_eq!(
        probe_read(X),
        Ok(0x1111_1111),
        "set_pte: read-only mapping reads"
    );
    let r = probe_write(X, 5);
    check!(
        r.is_err_and(|f| f.addr == X && f.error & (PF_PROT | PF_WRITE) == PF_PROT | PF_WRITE),
        "set_pte: read-only mapping refuses a kernel write (protection fault): {r:?}"
    );
    check_eq!(
        probe_read(paging::kva(one.0)),
        Ok(0x1111_1111),
        "set_pte: the refused write changed nothing"
    );

    // SET_PTE, kernel half: one change, seen by every address space.
    paging::set_kernel_pte(W, u64::from(one.0) | rw);
    check_eq!(
        probe_read(W),
        Ok(0x1111_1111),
        "set_pte: kernel window mapped"
    );
    other.switch_to();
    check_eq!(
        probe_read(W),
        Ok(0x1111_1111),
        "set_pte: kernel window seen from another address space"
    );
    paging::set_kernel_pte(W, u64::from(two.0) | rw);
    check_eq!(
        probe_read(W),
        Ok(0x2222_2222),
        "set_pte: kernel window remapped"
    );
    test_as(|s| s.switch_to());
    check_eq!(
        probe_read(W),
        Ok(0x2222_2222),
        "set_pte: a kernel remap made in one address space holds in the other"
    );
    summary("set_pte", failed);

    let failed = test::failed();
    // Behind the host's back, then the flush the guest owes it.
    let edit = |va: u32, entry: u64| {
        let (pt, idx) = test_as(|s| s.pte_location(va)).expect("a page table");
        // SAFETY: the test's own mapping of X; nothing else uses it.
        unsafe { paging::write_entry(pt, idx, entry) };
    };
    edit(X, u64::from(two.0) | rw);
    paging::flush_tlb_user();
    check_eq!(
        probe_read(X),
        Ok(0x2222_2222),
        "flush_tlb(0): user edit seen"
    );
    check_eq!(probe_write(X + 4, 9), Ok(()), "flush_tlb(0): now writable");
    edit(X, u64::from(one.0) | PAGE_PRESENT);
    paging::flush_tlb_one(X);
    check_eq!(
        probe_read(X),
        Ok(0x1111_1111),
        "flush one page (SET_PTE with 0): user edit seen"
    );
    let r = probe_write(X, 6);
    check!(
        r.is_err_and(|f| f.error & PF_PROT != 0),
        "flush one page: no stale writable mapping: {r:?}"
    );
    let (pt, idx) = paging::kernel_pte_location(W);
    // SAFETY: the window page is the test's own.
    unsafe { paging::write_entry(pt, idx, u64::from(one.0) | rw) };
    paging::flush_tlb_all();
    check_eq!(
        probe_read(W),
        Ok(0x1111_1111),
        "flush_tlb(1): kernel edit seen"
    );
    other.switch_to();
    check_eq!(
        probe_read(W),
        Ok(0x1111_1111),
        "flush_tlb(1): kernel edit seen in another address space"
    );
    paging::set_kernel_pte(W, 0);
    let r = probe_read(W);
    check!(
        r.is_err_and(|f| f.addr == W && f.error & PF_PROT == 0),
        "set_pte: kernel window unmapped everywhere: {r:?}"
    );
    test_as(|s| s.switch_to());
    check!(
        probe_read(W).is_err(),
        "set_pte: kernel window unmapped in the first address space too"
    );
    let _ = test_as(|s| s.unmap(X));
    finish_test_as();
    other.destroy();
    drop((one, two));
    tls_in_a_stopped_drain();
    summary("flush_tlb", failed);
}

/// New TLS entries queued in the async ring (as a context switch queues
/// them, under paging), then a call the host's trap-stack drain leaves to
/// the full path and that changes nothing of the GDT (an IDT entry of a
/// vector nothing raises): after the flush the CPU sees the new TLS
/// entries (`lsl` reads the hardware GDT), whichever path ran which call.
/// Then the same with a GDT entry as the second call.
fn tls_in_a_stopped_drain() {
    use lguest_rt::guest_abi::seg::SegmentDescriptor;
    use lguest_rt::guest_abi::{LHCALL_LOAD_GDT_ENTRY, LHCALL_LOAD_IDT_ENTRY, LHCALL_LOAD_TLS};
    // Byte-granular DPL-3 data segments whose limit tells them apart.
    let d = |limit: u32| {
        SegmentDescriptor::new(
            0,
            limit,
            SegmentDescriptor::P | (3 << 5) | SegmentDescriptor::S | SegmentDescriptor::TYPE_RW,
            SegmentDescriptor::FLAG_DB,
        )
    };
    let lsl = |slot: u32| -> Option<u32> {
        let (lim, ok): (u32, u8);
        // SAFETY: lsl only reads the descriptor (ZF: valid and visible).
        unsafe {
            core::arch::asm!(
                "lsl {lim:e}, {sel:e}",
                "setz {ok}",
                sel = in(reg) slot << 3 | 3,
                lim = out(reg) lim,
                ok = out(reg_byte) ok,
            )
        };
        (ok != 0).then_some(lim)
    };
    let before = [d(0x10), d(0x20), d(0x30)];
    // SAFETY: no segment register of this kernel selects a TLS entry.
    unsafe { hcall::load_tls(&before) };
    let tls = [d(0x111), d(0x222), d(0x333)];
    // SAFETY: as above; vector 0x9f is not one this guest uses (a
    // not-present gate for it changes nothing).
    unsafe {
        hcall::async_hcall(LHCALL_LOAD_TLS, hcall::phys(&raw const tls), 0, 0, 0);
        hcall::async_hcall(LHCALL_LOAD_IDT_ENTRY, 0x9f, 0, 0, 0);
    }
    hcall::flush_async();
    check_eq!(
        [lsl(6), lsl(7), lsl(8)],
        [Some(0x111), Some(0x222), Some(0x333)],
        "tls: new TLS entries queued before an IDT write reach the CPU"
    );
    let tls = [d(0x555), d(0x666), d(0x777)];
    let spare = d(0x444);
    // SAFETY: as above; GDT slot 18 is never loaded into a register.
    unsafe {
        hcall::async_hcall(LHCALL_LOAD_TLS, hcall::phys(&raw const tls), 0, 0, 0);
        hcall::async_hcall(LHCALL_LOAD_GDT_ENTRY, 18, spare.low(), spare.high(), 0);
    }
    hcall::flush_async();
    check_eq!(
        [lsl(6), lsl(7), lsl(8), lsl(18)],
        [Some(0x555), Some(0x666), Some(0x777), Some(0x444)],
        "tls: new TLS entries queued before a GDT write reach the CPU"
    );
    // SAFETY: as above.
    unsafe { hcall::load_tls(&[SegmentDescriptor(0); 3]) };
}
