//! Self-test of lguest-rt against the host: trap reflection (with and
//! without error code), virtual irq delivery (HALT wake-up and the
//! `irq_pending` + `LHCALL_SEND_INTERRUPTS` path), the paravirt iret, the
//! async hypercall ring (including the ring-full fallback), and
//! `LHCALL_LOAD_GDT_ENTRY` / `LHCALL_LOAD_TLS`.
//!
//! Prints `PASS:`/`FAIL:` lines and `DONE: <p> passed, <f> failed`, then
//! powers off. Command-line switches select a different ending instead:
//! `panic` (expect "power off: panic: deliberate panic (...)") or `restart`
//! (expect the control channel to return `ERESTART`).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::seg::SegmentDescriptor;
use lguest_rt::guest_abi::{self, LHCALL_TS, LguestData, trap};
use lguest_rt::{BootInfo, TrapFrame, check, check_eq, hcall, irq, println};

lguest_rt::entry!(main);

fn main(boot: &BootInfo) {
    println!("selftest: cmdline {:?}", boot.cmdline);
    if boot.has_flag("panic") {
        panic!("deliberate panic");
    }
    if boot.has_flag("restart") {
        lguest_rt::restart("restart requested");
    }
    initial_state(boot);
    breakpoint();
    invalid_opcode();
    general_protection();
    async_ring();
    timer_halt();
    irq_pending_path();
    gdt_entry();
    tls();
    page_fault();
    fpu_survives_interrupts();
}

fn initial_state(boot: &BootInfo) {
    check!(boot.is_lguest(), "boot_params hardware_subarch is lguest");
    check_eq!(boot.version, 0x207, "boot_params version");
    check!(boot.mem_bytes >= 8 << 20, "e820 reports RAM");
    check!(irq::enabled(), "virtual interrupts enabled after init");
    check_eq!(irq::blocked(), 1, "only irq 0 blocked at start");
    check_eq!(irq::pending(), 0, "no irq pending at start");
    let d = irq::snapshot();
    check_eq!(d.syscall_vec, 0x80, "lguest_data syscall_vec");
    let (start, end) = lguest_rt::trap::noirq_window();
    check!(
        d.noirq_start == start && d.noirq_end == end && start < end,
        "noirq window registered"
    );
    println!("selftest: time {}.{:09}", d.time.tv_sec, d.time.tv_nsec);
}

/// Last frame a test handler saw, and whether interrupts were on inside it.
static SEEN_VECTOR: AtomicU32 = AtomicU32::new(u32::MAX);
static SEEN_ERR: AtomicU32 = AtomicU32::new(u32::MAX);
static SEEN_EIP: AtomicU32 = AtomicU32::new(0);
static SEEN_IRQS_ON: AtomicU32 = AtomicU32::new(u32::MAX);
static SEEN_COUNT: AtomicU32 = AtomicU32::new(0);

fn record(f: &TrapFrame) {
    SEEN_VECTOR.store(f.vector, Ordering::Relaxed);
    SEEN_ERR.store(f.error_code, Ordering::Relaxed);
    SEEN_EIP.store(f.eip, Ordering::Relaxed);
    SEEN_IRQS_ON.store(u32::from(irq::enabled()), Ordering::Relaxed);
    SEEN_COUNT.fetch_add(1, Ordering::Relaxed);
}

fn record_only(f: &mut TrapFrame) {
    record(f);
}

fn reset_seen() {
    SEEN_VECTOR.store(u32::MAX, Ordering::Relaxed);
    SEEN_ERR.store(u32::MAX, Ordering::Relaxed);
    SEEN_IRQS_ON.store(u32::MAX, Ordering::Relaxed);
    SEEN_COUNT.store(0, Ordering::Relaxed);
}

fn breakpoint() {
    reset_seen();
    lguest_rt::trap::set_handler(trap::BP, Some(record_only));
    let after: u32;
    // SAFETY: int3 traps to the handler above, which returns; `after` is the
    // address of the instruction following int3 (the trap's return eip).
    unsafe {
        core::arch::asm!("int3", "2:", "lea {after:e}, [2b]", after = out(reg) after);
    }
    lguest_rt::trap::set_handler(trap::BP, None);
    check_eq!(
        SEEN_VECTOR.load(Ordering::Relaxed),
        3,
        "int3 reflected as vector 3"
    );
    check_eq!(
        SEEN_ERR.load(Ordering::Relaxed),
        0,
        "int3 has no error code"
    );
    check_eq!(
        SEEN_EIP.load(Ordering::Relaxed),
        after,
        "int3 frame eip is the next instruction"
    );
    check_eq!(
        SEEN_IRQS_ON.load(Ordering::Relaxed),
        0,
        "interrupt gate disables irqs in handler"
    );
    check!(irq::enabled(), "paravirt iret restores irqs after int3");
}

fn skip_ud2(f: &mut TrapFrame) {
    record(f);
    f.eip += 2;
}

fn invalid_opcode() {
    reset_seen();
    lguest_rt::trap::set_handler(trap::UD, Some(skip_ud2));
    let at: u32;
    // SAFETY: ud2 faults; the handler skips it (2 bytes) and returns.
    unsafe {
        core::arch::asm!("lea {at:e}, [2f]", "2:", "ud2", at = out(reg) at);
    }
    lguest_rt::trap::set_handler(trap::UD, None);
    check_eq!(
        SEEN_VECTOR.load(Ordering::Relaxed),
        6,
        "ud2 reflected as #UD"
    );
    check_eq!(
        SEEN_EIP.load(Ordering::Relaxed),
        at,
        "#UD frame eip is the faulting instruction"
    );
    check!(irq::enabled(), "paravirt iret restores irqs after #UD");
}

fn skip_mov_cr0(f: &mut TrapFrame) {
    record(f);
    f.eip += 3; // 0f 20 c0 = mov eax, cr0
}

fn general_protection() {
    reset_seen();
    lguest_rt::trap::set_handler(trap::GP, Some(skip_mov_cr0));
    let marker: u32;
    // SAFETY: reading cr0 at CPL 1 raises #GP(0); the handler skips the
    // 3-byte instruction. eax is declared clobbered and then set.
    unsafe {
        core::arch::asm!(".byte 0x0f, 0x20, 0xc0", "mov eax, 0x600d", out("eax") marker);
    }
    lguest_rt::trap::set_handler(trap::GP, None);
    check_eq!(
        SEEN_VECTOR.load(Ordering::Relaxed),
        13,
        "privileged instruction raises #GP"
    );
    check_eq!(
        SEEN_ERR.load(Ordering::Relaxed),
        0,
        "#GP error code is pushed (0)"
    );
    check_eq!(
        marker,
        0x600d,
        "execution continues after skipped instruction"
    );
    check_eq!(
        SEEN_COUNT.load(Ordering::Relaxed),
        1,
        "#GP delivered exactly once"
    );
}

fn ring_status() -> [u8; 64] {
    irq::snapshot().hcall_status
}

fn async_ring() {
    // SAFETY: TS(0) only clears the virtual CR0.TS bit.
    unsafe {
        hcall::async_hcall(LHCALL_TS, 0, 0, 0, 0);
        hcall::async_hcall(LHCALL_TS, 0, 0, 0, 0);
    }
    let queued = ring_status().iter().filter(|&&s| s == 0).count();
    check_eq!(queued, 2, "two async calls queued as READY");
    hcall::flush_async();
    check!(
        ring_status().iter().all(|&s| s == 0xFF),
        "flush drains the ring"
    );
    // More calls than slots: the 65th finds its slot READY and goes
    // synchronous, which drains the ring first.
    for _ in 0..100 {
        // SAFETY: as above.
        unsafe { hcall::async_hcall(LHCALL_TS, 0, 0, 0, 0) };
    }
    let queued = ring_status().iter().filter(|&&s| s == 0).count();
    check!(
        queued > 0 && queued < 64,
        "ring-full fallback drained the ring ({queued} left)"
    );
    hcall::flush_async();
    check!(
        ring_status().iter().all(|&s| s == 0xFF),
        "ring empty after overflow + flush"
    );
    check_eq!(
        core::mem::size_of::<LguestData>(),
        1392,
        "lguest_data layout size"
    );
}

static TICKS: AtomicU32 = AtomicU32::new(0);

fn timer(f: &mut TrapFrame) {
    record(f);
    TICKS.fetch_add(1, Ordering::Relaxed);
}

fn timer_halt() {
    reset_seen();
    TICKS.store(0, Ordering::Relaxed);
    lguest_rt::trap::set_irq_handler(0, Some(timer));
    irq::unmask(0);
    check_eq!(irq::blocked() & 1, 0, "irq 0 unmasked");
    hcall::set_clockevent(1_000_000);
    let mut halts = 0;
    loop {
        irq::disable();
        if TICKS.load(Ordering::Relaxed) > 0 || halts == 1000 {
            irq::enable();
            break;
        }
        halts += 1;
        hcall::halt();
    }
    check_eq!(TICKS.load(Ordering::Relaxed), 1, "timer irq woke HALT");
    check_eq!(
        SEEN_VECTOR.load(Ordering::Relaxed),
        guest_abi::FIRST_EXTERNAL_VECTOR,
        "timer arrives on vector 0x20"
    );
    check_eq!(
        SEEN_IRQS_ON.load(Ordering::Relaxed),
        0,
        "irqs off inside irq handler"
    );
    check!(irq::enabled(), "irqs on after HALT wake-up");
}

fn irq_pending_path() {
    TICKS.store(0, Ordering::Relaxed);
    irq::disable();
    hcall::set_clockevent(100_000);
    // With interrupts off the host must hold the irq back and flag it.
    let mut exits = 0u32;
    while irq::pending() == 0 && exits < 10_000_000 {
        hcall::flush_async(); // any exit lets the host look at its timers
        exits += 1;
    }
    check_eq!(
        irq::pending(),
        0x200,
        "host sets irq_pending while irqs are off"
    );
    check_eq!(
        TICKS.load(Ordering::Relaxed),
        0,
        "no delivery while irqs are off"
    );
    irq::enable(); // sees irq_pending, issues SEND_INTERRUPTS
    check_eq!(
        TICKS.load(Ordering::Relaxed),
        1,
        "SEND_INTERRUPTS delivers the held irq"
    );
    check_eq!(irq::pending(), 0, "irq_pending cleared after delivery");
    irq::mask(0);
    lguest_rt::trap::set_irq_handler(0, None);
}

fn gdt_entry() {
    // A flat data segment with DPL 1 in free slot 20; read through it.
    const SLOT: u32 = 20;
    // SAFETY: slot 20 is unused by the runtime; only fs is loaded with it,
    // and fs is reset to 0 afterwards.
    unsafe { hcall::load_gdt_entry(SLOT, SegmentDescriptor::flat_data(1)) };
    static PROBE: AtomicU32 = AtomicU32::new(0x1234_5678);
    let addr = lguest_rt::hcall::phys(&raw const PROBE);
    let val: u32;
    // SAFETY: fs = slot 20 (flat, DPL 1, RPL 1) maps all memory; fs is
    // restored to the null selector.
    unsafe {
        core::arch::asm!(
            "mov fs, {sel:x}",
            "mov {val:e}, dword ptr fs:[{addr:e}]",
            "xor {sel:e}, {sel:e}",
            "mov fs, {sel:x}",
            sel = inout(reg) (SLOT << 3 | 1) => _,
            addr = in(reg) addr,
            val = out(reg) val,
        );
    }
    check_eq!(
        val,
        0x1234_5678,
        "LOAD_GDT_ENTRY segment usable from the guest"
    );
}

fn tls() {
    static TLS_WORD: AtomicU32 = AtomicU32::new(0xCAFE_F00D);
    let base = lguest_rt::hcall::phys(&raw const TLS_WORD);
    // Linux-style TLS descriptor: data, DPL 3, base = &TLS_WORD, 4 KiB limit.
    let desc = SegmentDescriptor::new(
        base,
        0xFFF,
        SegmentDescriptor::P | (3 << 5) | SegmentDescriptor::S | SegmentDescriptor::TYPE_RW,
        SegmentDescriptor::FLAG_DB,
    );
    let descs = [desc, SegmentDescriptor(0), SegmentDescriptor(0)];
    // SAFETY: TLS slots are unused by the runtime; gs is reset afterwards.
    unsafe { hcall::load_tls(&descs) };
    let val: u32;
    // SAFETY: gs = slot 6 (RPL 3, DPL 3 data) based at TLS_WORD.
    unsafe {
        core::arch::asm!(
            "mov gs, {sel:x}",
            "mov {val:e}, dword ptr gs:[0]",
            "xor {sel:e}, {sel:e}",
            "mov gs, {sel:x}",
            sel = inout(reg) (guest_abi::GDT_ENTRY_TLS_MIN << 3 | 3) => _,
            val = out(reg) val,
        );
    }
    check_eq!(val, 0xCAFE_F00D, "LOAD_TLS slot 6 usable through gs");
    // SAFETY: clearing the TLS slots; gs is already 0.
    unsafe { hcall::load_tls(&[SegmentDescriptor(0); 3]) };
}

fn skip_store(f: &mut TrapFrame) {
    record(f);
    f.eip += 5; // a3 imm32 = mov [moffs32], eax
}

/// A write outside guest RAM: #PF reflected with the error code and the
/// faulting address in `lguest_data.cr2`.
fn page_fault() {
    reset_seen();
    lguest_rt::trap::set_handler(trap::PF, Some(skip_store));
    let at: u32;
    // SAFETY: the store to 0xF0000000 (no guest RAM there) faults; the handler
    // skips the 5-byte instruction and returns.
    unsafe {
        core::arch::asm!(
            "lea {at:e}, [2f]",
            "2:",
            ".byte 0xa3",
            ".long 0xf0000000",
            at = out(reg) at,
            out("eax") _,
        );
    }
    lguest_rt::trap::set_handler(trap::PF, None);
    check_eq!(
        SEEN_VECTOR.load(Ordering::Relaxed),
        14,
        "store outside RAM raises #PF"
    );
    check_eq!(
        SEEN_ERR.load(Ordering::Relaxed),
        2,
        "#PF error code: not-present write from the kernel"
    );
    check_eq!(irq::cr2(), 0xF000_0000, "#PF address in lguest_data.cr2");
    check_eq!(
        SEEN_EIP.load(Ordering::Relaxed),
        at,
        "#PF frame eip is the faulting store"
    );
}

/// x87 and SSE registers keep their values while timer interrupts come and
/// go (each one an exit to the host and a reflected irq).
fn fpu_survives_interrupts() {
    TICKS.store(0, Ordering::Relaxed);
    lguest_rt::trap::set_irq_handler(0, Some(timer));
    irq::unmask(0);
    // SAFETY: loads pi on the x87 stack and a pattern into xmm0; nothing else
    // in this guest uses the x87 or SSE registers (the target is i586).
    unsafe {
        core::arch::asm!(
            "fninit",
            "fldpi",
            "movd xmm0, {p:e}",
            p = in(reg) 0x5EE_D00Du32,
        );
    }
    for _ in 0..3 {
        let before = TICKS.load(Ordering::Relaxed);
        hcall::set_clockevent(200_000);
        let mut halts = 0;
        loop {
            irq::disable();
            if TICKS.load(Ordering::Relaxed) > before || halts == 1000 {
                irq::enable();
                break;
            }
            halts += 1;
            hcall::halt();
        }
    }
    let mut pi = [0u32; 2];
    let xmm: u32;
    // SAFETY: stores st(0) into `pi` (8 bytes) and reads back xmm0.
    unsafe {
        core::arch::asm!(
            "fstp qword ptr [{buf}]",
            "movd {x:e}, xmm0",
            buf = in(reg) pi.as_mut_ptr(),
            x = out(reg) xmm,
        );
    }
    irq::mask(0);
    check_eq!(
        TICKS.load(Ordering::Relaxed),
        3,
        "three timer interrupts taken"
    );
    check_eq!(
        (u64::from(pi[1]) << 32) | u64::from(pi[0]),
        0x4009_21FB_5444_2D18,
        "x87 register survives interrupts"
    );
    check_eq!(xmm, 0x5EE_D00D, "SSE register survives interrupts");
}
