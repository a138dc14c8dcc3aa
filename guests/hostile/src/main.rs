//! A hostile lguest guest: each boot does ONE thing the hypervisor must
//! refuse, chosen with `mode=<name>` on the module command line (e.g.
//! `hostile,mode=gdt64` in a scenario).
//!
//! The guest prints `hostile: trying <mode>` first. In every mode except
//! the survivors (`io`, `crash`, `forgeshutdown`, `umip`, `pgedit`, `pgflood`) the hypervisor must kill the guest with a reason (see the
//! table in [`MODES`]); if the guest is still alive afterwards it prints
//! `FAIL: <mode> survived` and powers off, so a scenario expecting the kill
//! line fails.
//!
//! Modes that make the CPU fault first remove every gate from the guest IDT
//! (`LHCALL_LOAD_IDT_ENTRY` with a not-present gate), so the hypervisor
//! has nowhere to reflect the trap and must kill with
//! `unhandled trap <n> at <eip> (<err or cr2>)` instead of the runtime's
//! handler turning it into a panic.
//!
//! `mode=beforeinit` needs a hypercall before `LHCALL_LGUEST_INIT`, which
//! the runtime's `_start` always makes first. So this guest's ELF entry is
//! `hostile_start` (set in `build.rs`): it looks for `mode=beforeinit` on
//! the command line, issues `LHCALL_NOTIFY` if it is there, and otherwise
//! (or if that survived) jumps to the runtime's `_start`.
#![no_std]
#![no_main]

mod paging;

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::boot::BP_HDR_CMD_LINE_PTR;
use lguest_rt::guest_abi::hcall::{
    LHCALL_LGUEST_INIT, LHCALL_LOAD_TLS, LHCALL_NOTIFY, LHCALL_SHUTDOWN,
};
use lguest_rt::guest_abi::seg::{IDT_TYPE_INTERRUPT, SegmentDescriptor, idt_gate};
use lguest_rt::guest_abi::{KERNEL_CS, KERNEL_DS, LGUEST_SHUTDOWN_POWEROFF};
use lguest_rt::hcall::phys;
use lguest_rt::{BootInfo, hcall, println, trap};

// kernel_address = PAGE_OFFSET: the paging modes (`paging.rs`) split kernel
// and user like Linux; the other modes do not care.
lguest_rt::entry!(main, kernel_address = lguest_rt::paging::PAGE_OFFSET);

/// What must happen to the guest in a mode.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The hypervisor kills the guest (reason in the comment of the mode).
    Kill,
    /// The guest survives and reports `PASS:`/`FAIL:` itself.
    Survive,
}

type Mode = (&'static str, fn(&BootInfo), Expect);

/// Every mode, with the kill reason the hypervisor is expected to give.
const MODES: &[Mode] = &[
    // "gdt entry 14: 64-bit code segment"
    ("gdt64", gdt64, Expect::Kill),
    // "gdt entry 14: system descriptor"
    ("gdtsys", gdtsys, Expect::Kill),
    // survives: writes to host-reserved slots are ignored (as lguest did;
    // Linux loads its whole GDT), and the slot keeps the host's descriptor
    ("gdtreserved", gdtreserved, Expect::Survive),
    // "too many gdt entries 40"
    ("gdtindex", gdtindex, Expect::Kill),
    // "gdt entry 8: 64-bit code segment" (third TLS slot)
    ("tls64", tls64, Expect::Kill),
    // "bad IDT type 5"
    ("idttype", idttype, Expect::Kill),
    // "Setting idt entry 300"
    ("idtindex", idtindex, Expect::Kill),
    // "Bad hypercall 99"
    ("badhcall", badhcall, Expect::Kill),
    // "Bad hypercall 99" (from the async ring)
    ("asyncbad", asyncbad, Expect::Kill),
    // "hypercall 17 before INIT" (done by `hostile_start`)
    ("beforeinit", beforeinit, Expect::Kill),
    // "already have lguest_data"
    ("init2", init2, Expect::Kill),
    // "bad read address 0xf0000000 len 24"
    ("badptr", badptr, Expect::Kill),
    // LOAD_TLS straddling the end of guest memory: "bad read address ..."
    ("badedge", badedge, Expect::Kill),
    // SHUTDOWN with its message outside guest memory: "bad read address ..."
    ("badmsg", badmsg, Expect::Kill),
    // "bad shutdown reason 7"
    ("shutreason", shutreason, Expect::Kill),
    // "bad stack segment 104"
    ("stackseg", stackseg, Expect::Kill),
    // "bad stack pages 3"
    ("stackpages", stackpages, Expect::Kill),
    // "bad stack page 0xf0000fff"
    ("stackaddr", stackaddr, Expect::Kill),
    // "bad stack page …": the empty page directory maps nothing, so the
    // first fault cannot be pushed onto the (now unmapped) kernel stack
    ("nopgtable", nopgtable, Expect::Kill),
    // Faults, all "unhandled trap <n> at <eip> (<info>)":
    ("farjump", farjump, Expect::Kill), // ljmp to the host's code selector 0x50
    ("tssjump", tssjump, Expect::Kill), // ljmp to the host's TSS selector 0x80
    ("iret0", iret0, Expect::Kill),     // iret to cs 0x60 (RPL 0)
    ("dshost", dshost, Expect::Kill),   // mov the host's data selector 0x58 to ds
    ("inthost", inthost, Expect::Kill), // int $0xf0 (the host timer vector)
    ("priv", privileged, Expect::Kill), // mov %eax, %cr3
    ("hlt", hlt, Expect::Kill),         // hlt at CPL 1
    ("wrmsr", wrmsr, Expect::Kill),     // wrmsr (LSTAR) at CPL 1
    ("lgdt", lgdt, Expect::Kill),       // lgdt at CPL 1
    ("syscall", syscall, Expect::Kill), // the syscall instruction
    ("sysenter", sysenter, Expect::Kill), // the sysenter instruction
    ("wild", wild, Expect::Kill),       // jump to 0xf0000000 (outside guest memory)
    // "gdt entry 20: DPL 2" (a DPL-2 code segment, to iret to CPL 2)
    ("cpl2", cpl2, Expect::Kill),
    // "bad ss 0xa1 at <eip>" (a 16-bit stack segment, then a hypercall)
    ("ss16", ss16, Expect::Kill),
    // "bad stack segment 161" (SET_STACK with a 16-bit stack segment)
    ("stack16", stack16, Expect::Kill),
    // "unhandled trap 256 at <eip> (fault 13, error <e>)": slot 12 shrunk
    // under the running code, so the host's iretq faults. Needs a CPU that
    // checks the CS limit on iretq to compatibility mode (hardware does,
    // QEMU's TCG does not: there the guest survives).
    ("entryfault", entryfault, Expect::Kill),
    // #GP(0) (CS limit) at an eip outside guest memory: reflected like any
    // #GP, "unhandled trap 13 at 0xf0000000 (0x0)". Needs a CPU that checks
    // CS limits in compatibility mode (TCG does not: there it is a #PF,
    // "unhandled trap 14 at 0xf0000000 (0xf0000000)").
    ("gpwild", gpwild, Expect::Kill),
    // `in` reads all-ones, `out` (even to QEMU's exit port) is ignored,
    // popf cannot raise IOPL: "PASS: io emulated", then power off.
    ("io", io, Expect::Survive),
    // A Rust panic: the runtime prints "panic: deliberate crash (...)" and
    // powers off with the message.
    ("crash", crash, Expect::Survive),
    // Console forgeries (carriage returns, escape sequences, several lines
    // in one notify, an overlong line, a flood), then "Bad hypercall 99".
    ("forge", forge, Expect::Kill),
    // SHUTDOWN(POWEROFF) whose message holds newlines and escapes: a clean
    // power off whose message is shown escaped on one line.
    ("forgeshutdown", forgeshutdown, Expect::Survive),
    // sgdt/sidt/smsw/str/sldt at CPL 1 see the guest view (UMIP emulation),
    // never the host's tables: "PASS: umip guest view".
    ("umip", umip, Expect::Survive),
    // Paging (`paging.rs`, with `paging=2level|pae`): "bad page table entry"
    ("pgpfn", paging::pgpfn, Expect::Kill),
    // "bad page directory entry"
    ("pgdir", paging::pgdir, Expect::Kill),
    // PAE only: "bad page table entry"
    ("paereserved", paging::paereserved, Expect::Kill),
    // PAE only: "bad page directory entry"
    ("paepdpt", paging::paepdpt, Expect::Kill),
    // SET_PGD one past the top-level table: a reason naming the index
    ("pgdindex", paging::pgdindex, Expect::Kill),
    // 2-level only: a reason naming `paging=pae`
    ("setpmd", paging::setpmd, Expect::Kill),
    // "bad stack page ..."
    ("stackunmapped", paging::stackunmapped, Expect::Kill),
    // A page table edited behind the host's back: "PASS: pgedit: ..."
    ("pgedit", paging::pgedit, Expect::Survive),
    // Address spaces in a loop: "PASS: pgflood: ..."
    ("pgflood", paging::pgflood, Expect::Survive),
    // "guest kernel executed a user page at 0x53000000 (… SMEP)"
    ("smep", paging::smep, Expect::Kill),
    // "bad ss 0xa1 at …": a 16-bit stack segment, found at a shadow fill
    ("pgss16", paging::pgss16, Expect::Kill),
];

fn main(boot: &BootInfo) {
    let Some(mode) = boot.arg("mode") else {
        println!("FAIL: no mode= on the command line {:?}", boot.cmdline);
        return;
    };
    let Some(&(name, run, expect)) = MODES.iter().find(|m| m.0 == mode) else {
        println!("FAIL: unknown mode {mode:?}");
        return;
    };
    println!("hostile: trying {name}");
    run(boot);
    if expect == Expect::Kill {
        println!("FAIL: {name} survived");
    }
}

/// Raw synchronous hypercall.
fn raw_hcall(nr: u32, a1: u32, a2: u32, a3: u32) {
    // SAFETY: every call made here is one the hypervisor must refuse (and
    // kill the guest for); none of them, if wrongly accepted, invalidates
    // memory or code this guest still relies on in a way that matters:
    // the guest only prints "survived" and powers off afterwards.
    unsafe { hcall::hcall(nr, a1, a2, a3, 0) }
}

/// A 4 GiB 64-bit code segment (L = 1, D = 0), DPL 1.
const CODE64: SegmentDescriptor = SegmentDescriptor::new(
    0,
    0xF_FFFF,
    SegmentDescriptor::P
        | (1 << 5)
        | SegmentDescriptor::S
        | SegmentDescriptor::TYPE_CODE
        | SegmentDescriptor::TYPE_RW,
    SegmentDescriptor::FLAG_G | SegmentDescriptor::FLAG_L,
);

/// Guest GDT slot used for the descriptor tests (the user code slot; the
/// guest never runs user code).
const TEST_SLOT: u32 = 14;

/// An address far outside the guest's memory.
const OUTSIDE: u32 = 0xF000_0000;

fn gdt64(_: &BootInfo) {
    // SAFETY: slot 14 (user code) is not in use by this guest.
    unsafe { hcall::load_gdt_entry(TEST_SLOT, CODE64) }
}

fn gdtsys(_: &BootInfo) {
    // A 32-bit call gate (S = 0, type 0xC, DPL 3) to the host's 64-bit code
    // selector 0x50.
    let gate = SegmentDescriptor::from_parts(0x0050_1000, 0x0000_EC00);
    // SAFETY: slot 14 is not in use by this guest.
    unsafe { hcall::load_gdt_entry(TEST_SLOT, gate) }
}

fn gdtreserved(_: &BootInfo) {
    // Flat DPL-1 data into the host's slots: accepted, never installed.
    for slot in [10u32, 11, 16, 17, 31] {
        // SAFETY: host-reserved slots; the hypervisor ignores the write.
        unsafe { hcall::load_gdt_entry(slot, SegmentDescriptor::flat_data(1)) }
    }
    for slot in [10u32, 11, 16, 17, 31] {
        // `verr` sets ZF if the selector names a segment readable at this
        // CPL: the flat data segment would be; the host's own descriptor
        // (DPL 0 code/data, the TSS, nothing) is not.
        let sel = (slot << 3) | 1;
        let readable: u32;
        // SAFETY: `verr` only inspects the descriptor; it never faults on
        // a bad selector (it clears ZF instead).
        unsafe {
            core::arch::asm!(
                "xor {r:e}, {r:e}",
                "verr {s:x}",
                "setz {r:l}",
                s = in(reg) sel,
                r = out(reg_abcd) readable,
                options(nomem, nostack),
            );
        }
        if readable == 0 {
            println!("PASS: reserved gdt entry {slot} ignored");
        } else {
            println!("FAIL: reserved gdt entry {slot} became the guest's segment");
        }
    }
}

fn gdtindex(_: &BootInfo) {
    // SAFETY: there is no slot 40; the hypervisor must refuse it.
    unsafe { hcall::load_gdt_entry(40, SegmentDescriptor::flat_data(1)) }
}

fn tls64(_: &BootInfo) {
    let tls = [
        SegmentDescriptor::flat_data(3),
        SegmentDescriptor::flat_data(3),
        CODE64,
    ];
    // SAFETY: the TLS slots 6..=8 are not in use (fs/gs are never loaded).
    unsafe { hcall::load_tls(&tls) }
}

fn idttype(_: &BootInfo) {
    // A present task gate (type 5).
    let low = u32::from(KERNEL_CS) << 16;
    let high = 0x8000 | (5 << 8);
    // SAFETY: vector 0x30 (irq 16) never fires in this guest.
    unsafe { hcall::load_idt_entry(0x30, low, high) }
}

fn idtindex(_: &BootInfo) {
    let (low, high) = idt_gate(0x40_0000, KERNEL_CS, IDT_TYPE_INTERRUPT, 0);
    // SAFETY: there is no vector 300; the hypervisor must refuse it.
    unsafe { hcall::load_idt_entry(300, low, high) }
}

fn badhcall(_: &BootInfo) {
    raw_hcall(99, 0, 0, 0);
}

fn asyncbad(_: &BootInfo) {
    // SAFETY: not a hypercall; the hypervisor must kill when it drains the
    // ring.
    unsafe { hcall::async_hcall(99, 0, 0, 0, 0) };
    hcall::flush_async();
}

/// What `hostile_start` did (in `.data`, so `_start`'s `.bss` clearing
/// keeps it).
static PRE_STATE: AtomicU32 = AtomicU32::new(PRE_NOT_RUN);
const PRE_NOT_RUN: u32 = 0x5EED;
const PRE_NO_MODE: u32 = 1;
const PRE_HCALL_SURVIVED: u32 = 2;

fn beforeinit(_: &BootInfo) {
    match PRE_STATE.load(Ordering::Relaxed) {
        PRE_HCALL_SURVIVED => {}
        PRE_NOT_RUN => println!("FAIL: beforeinit: hostile_start was not the entry point"),
        s => println!("FAIL: beforeinit: hostile_start did not see the mode (state {s})"),
    }
}

fn init2(_: &BootInfo) {
    raw_hcall(LHCALL_LGUEST_INIT, lguest_rt::lguest_data_addr(), 0, 0);
}

fn badptr(_: &BootInfo) {
    raw_hcall(LHCALL_LOAD_TLS, OUTSIDE, 0, 0);
}

fn badedge(boot: &BootInfo) {
    // 24 bytes starting 8 bytes before the end of guest memory: RAM, then
    // the device page and the rings the bus puts above it.
    let ram = u32::try_from(boot.mem_bytes).unwrap_or(u32::MAX);
    let mut end = ram.saturating_add(4096);
    let bus = lguest_rt::virtio::Bus::scan(boot.mem_bytes);
    for d in bus.devices() {
        for q in 0..=u8::MAX {
            let Some(c) = d.vq(q) else {
                break;
            };
            let pages = lguest_rt::guest_abi::device::vring_pages(u32::from(c.num));
            end = end.max(c.pfn.saturating_add(pages).saturating_mul(4096));
        }
    }
    raw_hcall(LHCALL_LOAD_TLS, end - 8, 0, 0);
}

fn badmsg(_: &BootInfo) {
    raw_hcall(LHCALL_SHUTDOWN, OUTSIDE, LGUEST_SHUTDOWN_POWEROFF, 0);
}

static SHUTDOWN_TEXT: [u8; 128] = [b'x'; 128];

fn shutreason(_: &BootInfo) {
    raw_hcall(LHCALL_SHUTDOWN, phys(&raw const SHUTDOWN_TEXT), 7, 0);
}

fn stack_top() -> u32 {
    lguest_rt::boot_stack().1
}

fn stackseg(_: &BootInfo) {
    // SAFETY: the stack is only used for traps from CPL 3; none happen.
    unsafe { hcall::set_stack(u32::from(KERNEL_DS & !3), stack_top(), 1) }
}

fn stackpages(_: &BootInfo) {
    // SAFETY: as above.
    unsafe { hcall::set_stack(u32::from(KERNEL_DS), stack_top(), 3) }
}

fn stackaddr(_: &BootInfo) {
    // SAFETY: as above; the stack is not guest memory, so it must be refused.
    unsafe { hcall::set_stack(u32::from(KERNEL_DS), OUTSIDE + 0x1000, 1) }
}

#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; 4096]>);

// SAFETY: only its address is used (as a page directory for the host).
unsafe impl Sync for Page {}

static EMPTY_PGDIR: Page = Page(UnsafeCell::new([0; 4096]));

fn nopgtable(_: &BootInfo) {
    // SAFETY: none: an empty page directory maps nothing, so the guest
    // faults at once, and the host cannot push that fault anywhere: it
    // must kill the guest, not itself.
    unsafe { hcall::new_pgtable(phys(EMPTY_PGDIR.0.get())) }
}

// ---- Faults --------------------------------------------------------------

/// Remove every gate from the guest IDT, so that any fault kills the guest
/// with "unhandled trap" instead of reaching the runtime's handlers.
fn strip_idt() {
    for v in 0..trap::RT_VECTORS {
        // SAFETY: a not-present gate; nothing in this guest relies on traps
        // or interrupts from here on (printing is a hypercall).
        unsafe { hcall::load_idt_entry(v, 0, 0) }
    }
}

fn farjump(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP): 0x50 is the host's 64-bit code segment.
    unsafe { core::arch::asm!("ljmp $0x50, $0", options(att_syntax)) }
}

fn tssjump(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP): 0x80 is the host's TSS.
    unsafe { core::arch::asm!("ljmp $0x80, $0", options(att_syntax)) }
}

fn iret0(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP): returning to RPL 0 from CPL 1. If it did
    // not, execution would continue at label 2 with cs = 0x60 (and the
    // frame popped), i.e. in ring 0.
    unsafe {
        core::arch::asm!(
            "pushfl",
            "pushl $0x60",
            "pushl $2f",
            "iretl",
            "2:",
            options(att_syntax)
        );
    }
}

fn dshost(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP): 0x58 is the host's DPL-0 data segment. If it
    // did not, ds is put back at once.
    unsafe {
        core::arch::asm!(
            "mov $0x58, %eax",
            "mov %eax, %ds",
            "mov $0x69, %eax",
            "mov %eax, %ds",
            out("eax") _,
            options(att_syntax)
        );
    }
}

fn inthost(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP): vector 0xf0 is the host's timer and its
    // gate is not reachable from CPL 1.
    unsafe { core::arch::asm!("int $0xf0", options(att_syntax)) }
}

fn privileged(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP(0)) at CPL 1.
    unsafe { core::arch::asm!("mov %eax, %cr3", in("eax") 0u32, options(att_syntax)) }
}

fn hlt(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP(0)) at CPL 1.
    unsafe { core::arch::asm!("hlt") }
}

fn wrmsr(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#GP(0)) at CPL 1; would point LSTAR at 0.
    unsafe { core::arch::asm!("wrmsr", in("ecx") 0xC000_0082u32, in("eax") 0u32, in("edx") 0u32) }
}

fn lgdt(_: &BootInfo) {
    strip_idt();
    let pseudo = [0u16; 3];
    // SAFETY: must fault (#GP(0)) at CPL 1; would load an empty GDT.
    unsafe { core::arch::asm!("lgdt [{p}]", p = in(reg) &raw const pseudo) }
}

fn syscall(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#UD or #GP) from a compatibility-mode guest; it
    // must never reach the host's syscall entry.
    unsafe { core::arch::asm!("syscall", out("ecx") _, out("edx") _) }
}

fn sysenter(_: &BootInfo) {
    strip_idt();
    // SAFETY: as for `syscall`.
    unsafe { core::arch::asm!("sysenter", out("ecx") _, out("edx") _) }
}

fn wild(_: &BootInfo) {
    strip_idt();
    // SAFETY: must fault (#PF): nothing is mapped at 0xf0000000.
    unsafe { core::arch::asm!("jmp {t}", t = in(reg) OUTSIDE) }
}

/// Free GDT slots used by the segment modes (selectors 0xa0 and 0xa8).
pub(crate) const SLOT_A: u32 = 20;
const SLOT_B: u32 = 21;

/// Access byte of a code/data descriptor with `dpl`.
const fn access(dpl: u8, code: bool) -> u8 {
    let ty = if code {
        SegmentDescriptor::TYPE_CODE | SegmentDescriptor::TYPE_RW
    } else {
        SegmentDescriptor::TYPE_RW
    };
    SegmentDescriptor::P | (dpl << 5) | SegmentDescriptor::S | ty
}

const FLAT32: u8 = SegmentDescriptor::FLAG_G | SegmentDescriptor::FLAG_DB;

fn cpl2(_: &BootInfo) {
    strip_idt();
    // SAFETY: slots 20/21 are not in use. The host must refuse a DPL-2
    // segment; if it did not, the iret below runs `ud2` at CPL 2, whose
    // #UD (no gate left) kills the guest with "unhandled trap 6".
    unsafe {
        hcall::load_gdt_entry(
            SLOT_A,
            SegmentDescriptor::new(0, 0xF_FFFF, access(2, true), FLAT32),
        );
        hcall::load_gdt_entry(
            SLOT_B,
            SegmentDescriptor::new(0, 0xF_FFFF, access(2, false), FLAT32),
        );
        core::arch::asm!(
            "mov %esp, %eax",
            "pushl $0xaa",
            "pushl %eax",
            "pushfl",
            "pushl $0xa2",
            "pushl $2f",
            "iretl",
            "2:",
            "ud2",
            out("eax") _,
            options(att_syntax)
        );
    }
}

/// A flat, writable data segment with DPL 1 and B = 0 (16-bit stack).
pub(crate) const DATA16: SegmentDescriptor =
    SegmentDescriptor::new(0, 0xF_FFFF, access(1, false), SegmentDescriptor::FLAG_G);

/// Saved esp and ss of `ss16`.
pub(crate) static SS16_SAVE: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];

fn ss16(_: &BootInfo) {
    let esp: u32;
    // SAFETY: slot 20 is not in use. The asm switches to a 16-bit stack at
    // 0xf000 (free low guest RAM; nothing is pushed there), makes a
    // FLUSH_ASYNC hypercall (it clobbers eax..edx), records esp and goes
    // back to its own ss:esp from `SS16_SAVE`.
    unsafe {
        hcall::load_gdt_entry(SLOT_A, DATA16);
        core::arch::asm!(
            "mov %esp, (%edi)",
            "mov %ss, %ecx",
            "mov %ecx, 4(%edi)",
            "mov $0xf000, %esp",
            "mov $0xa1, %eax",
            "mov %eax, %ss",
            "xor %eax, %eax",
            "int $0x1f",
            "mov %esp, %edx",
            "mov 4(%edi), %ecx",
            "mov %ecx, %ss",
            "mov (%edi), %esp",
            in("edi") SS16_SAVE.as_ptr(),
            out("eax") _, out("ebx") _, out("ecx") _, out("edx") esp,
            options(att_syntax)
        );
    }
    if esp == 0xf000 {
        println!("FAIL: ss16: 16-bit stack accepted (esp {esp:#x})");
    } else {
        println!("FAIL: ss16: esp {esp:#x} after a trap: host rsp bits leaked");
    }
}

fn stack16(_: &BootInfo) {
    // SAFETY: slot 20 is not in use; the stack is only used for traps from
    // CPL 3, and none happen.
    unsafe {
        hcall::load_gdt_entry(SLOT_A, DATA16);
        hcall::set_stack(0xa1, stack_top(), 1);
    }
}

fn entryfault(_: &BootInfo) {
    strip_idt();
    // SAFETY: none: the kernel code segment shrinks to 4 KiB below the
    // running code; the host's return to the guest must fault and kill it.
    unsafe {
        hcall::load_gdt_entry(
            12,
            SegmentDescriptor::new(0, 0xFFF, access(1, true), SegmentDescriptor::FLAG_DB),
        );
    }
}

fn gpwild(_: &BootInfo) {
    strip_idt();
    // SAFETY: slot 20 is a 2 GiB code segment with DPL 1: the far jump
    // continues at the next instruction, then the jump to 0xf0000000 is
    // beyond its limit (#GP(0) at that eip).
    unsafe {
        hcall::load_gdt_entry(
            SLOT_A,
            SegmentDescriptor::new(0, 0x7_FFFF, access(1, true), FLAT32),
        );
        core::arch::asm!(
            "ljmp $0xa1, $2f",
            "2:",
            "jmp *%eax",
            in("eax") OUTSIDE,
            options(att_syntax)
        );
    }
}

// ---- Survivors -------------------------------------------------------------

fn io(_: &BootInfo) {
    let al: u8;
    // SAFETY: emulated by the host: reads all-ones.
    unsafe { core::arch::asm!("in al, 0x64", out("al") al) };
    let eax: u32;
    // SAFETY: as above.
    unsafe { core::arch::asm!("in eax, dx", in("dx") 0x64u16, out("eax") eax) };
    // isa-debug-exit: if this reached QEMU, it would exit with status 133.
    // SAFETY: ignored by the host.
    unsafe { core::arch::asm!("out 0xf4, al", in("al") 0x42u8) };
    // SAFETY: as above (status 35).
    unsafe { core::arch::asm!("out dx, eax", in("dx") 0xf4u16, in("eax") 0x11u32) };
    let eflags: u32;
    // SAFETY: popf at CPL 1 cannot change IOPL; the flags pushed and popped
    // are otherwise our own.
    unsafe {
        core::arch::asm!(
            "pushfd",
            "or dword ptr [esp], 0x3000",
            "popfd",
            "pushfd",
            "pop {f}",
            f = out(reg) eflags,
        );
    }
    let iopl = (eflags >> 12) & 3;
    if al == 0xFF && eax == 0xFFFF_FFFF && iopl == 0 {
        println!("PASS: io emulated");
    } else {
        println!("FAIL: io: inb {al:#x}, inl {eax:#x}, iopl {iopl}");
    }
}

/// The guest view of the descriptor-table and machine-status registers
/// (docs/abi.md, section 7): GDT limit 32*8-1, IDT limit 256*8-1, both at
/// base 0; CR0 with PE, MP, ET, NE, PG (TS clear); TR and LDTR 0.
fn umip(_: &BootInfo) {
    let mut gdt = [0u8; 6];
    let mut idt = [0xAAu8; 6];
    let (msw_reg, msw16, tr, ldt): (u32, u32, u32, u32);
    let mut msw_mem = 0xAAAAu16;
    let mut tr_mem = 0xAAAAu16;
    // SAFETY: the instructions only write the memory and registers named
    // (with UMIP the host emulates them).
    unsafe {
        core::arch::asm!("sgdt [{g}]", g = in(reg) gdt.as_mut_ptr());
        // SIB with a displacement: [idt + 4*1 - 4].
        core::arch::asm!("sidt [{i} + 4*{one} - 4]", i = in(reg) idt.as_mut_ptr(), one = in(reg) 1u32);
        core::arch::asm!("smsw {m:e}", m = out(reg) msw_reg);
        core::arch::asm!("mov {s:e}, 0x55550000", "smsw {s:x}", s = out(reg) msw16);
        core::arch::asm!("smsw word ptr [{mm}]", mm = in(reg) &raw mut msw_mem);
        core::arch::asm!("mov {t:e}, 0xffffffff", "str {t:e}", t = out(reg) tr);
        core::arch::asm!("mov {l:e}, 0xffffffff", "sldt {l:e}", l = out(reg) ldt);
        core::arch::asm!("str word ptr [{tm}]", tm = in(reg) &raw mut tr_mem);
    }
    let limit = |t: &[u8; 6]| u16::from_le_bytes([t[0], t[1]]);
    let base = |t: &[u8; 6]| u32::from_le_bytes([t[2], t[3], t[4], t[5]]);
    let mut ok = true;
    let mut check = |what: &str, good: bool, got: u32| {
        if good {
            println!("PASS: umip {what}");
        } else {
            println!("FAIL: umip {what}: got {got:#x}");
            ok = false;
        }
    };
    check("sgdt limit", limit(&gdt) == 32 * 8 - 1, limit(&gdt).into());
    check("sgdt base", base(&gdt) == 0, base(&gdt));
    check("sidt limit", limit(&idt) == 256 * 8 - 1, limit(&idt).into());
    check("sidt base", base(&idt) == 0, base(&idt));
    check("smsw r32", msw_reg == 0x8000_0033, msw_reg);
    check("smsw r16", msw16 == 0x5555_0033, msw16);
    check("smsw m16", msw_mem == 0x33, msw_mem.into());
    check("str r32", tr == 0, tr);
    check("sldt r32", ldt == 0, ldt);
    check("str m16", tr_mem == 0, tr_mem.into());
    if ok {
        println!("PASS: umip guest view");
    }
}

fn crash(_: &BootInfo) {
    panic!("deliberate crash");
}

// ---- Console forgeries ------------------------------------------------------

/// A NUL-terminated string handed to the host as is (the runtime's console
/// would cut it into lines of at most 255 bytes).
#[repr(C, align(4))]
struct RawText<const N: usize>([u8; N]);

static MULTI_LINE: RawText<55> =
    RawText(*b"line one\nguest hostile killed: nothing\nsummary: forged\0");
static LONG_LINE: RawText<1001> = {
    let mut t = [b'x'; 1001];
    t[1000] = 0;
    RawText(t)
};
static FLOOD_LINE: RawText<101> = {
    let mut t = [b'f'; 101];
    t[99] = b'\n';
    t[100] = 0;
    RawText(t)
};
/// Lines of [`FLOOD_LINE`] sent at once: 40 KB, far over the host's burst.
const FLOOD_LINES: u32 = 400;

fn forge(_: &BootInfo) {
    // Status lines behind a carriage return / an erase-line sequence: on a
    // terminal that honoured them they would show as the host's own lines.
    println!("\rguest hostile powered off");
    println!("\x1b[2K\rguest hostile returned all its memory");
    hcall::notify(phys(MULTI_LINE.0.as_ptr()));
    hcall::notify(phys(LONG_LINE.0.as_ptr()));
    for _ in 0..FLOOD_LINES {
        hcall::notify(phys(FLOOD_LINE.0.as_ptr()));
    }
    raw_hcall(99, 0, 0, 0);
}

fn forgeshutdown(_: &BootInfo) {
    lguest_rt::power_off("bye\nguest hostile killed: forged\r\x1b[2K");
}

// ---- Before LHCALL_LGUEST_INIT ----------------------------------------------

const PRE_STACK_SIZE: usize = 4096;

#[repr(C, align(16))]
struct PreStack(UnsafeCell<[u8; PRE_STACK_SIZE]>);

// SAFETY: used only as raw stack memory by `hostile_start`.
unsafe impl Sync for PreStack {}

static PRE_STACK: PreStack = PreStack(UnsafeCell::new([0; PRE_STACK_SIZE]));

/// Message for the hypercall made before INIT (printed by the launcher if
/// the hypervisor wrongly executed it).
static PRE_MSG: &[u8] = b"FAIL: beforeinit: NOTIFY before INIT was executed\n\0";

core::arch::global_asm!(
    // The host enters here (ELF entry) with esi = boot_params. Call
    // `pre_init(esi)` on a small stack of our own (esi is callee-saved),
    // then continue at the runtime's `_start` as if it were the entry.
    ".pushsection .text.hostile_start,\"ax\",@progbits",
    ".globl hostile_start",
    ".type hostile_start,@function",
    "hostile_start:",
    "cld",
    "lea esp, [{stack} + {size}]",
    "push esi",
    "call {pre}",
    "add esp, 4",
    "jmp _start",
    ".size hostile_start, . - hostile_start",
    ".popsection",
    stack = sym PRE_STACK,
    size = const PRE_STACK_SIZE,
    pre = sym pre_init,
);

/// Runs before the runtime: if the command line says `mode=beforeinit`,
/// make a hypercall (NOTIFY) before `LHCALL_LGUEST_INIT`.
extern "C" fn pre_init(boot_params: u32) {
    // SAFETY: the launcher put boot_params at `boot_params` (esi) in guest
    // memory, mapped 1:1.
    let cmdline = unsafe { peek_u32(boot_params + BP_HDR_CMD_LINE_PTR) };
    // The launcher puts the command line at 0x1000; accept only a sane page.
    if !(0x1000..0x10_0000).contains(&cmdline) {
        PRE_STATE.store(PRE_NO_MODE, Ordering::Relaxed);
        return;
    }
    let mut len = 0;
    // SAFETY: the command line lies in low guest memory (checked above) and
    // is at most 2048 bytes; we stop at its NUL.
    while len < 2048 && unsafe { peek_u8(cmdline + len) } != 0 {
        len += 1;
    }
    let p = core::ptr::with_exposed_provenance::<u8>(cmdline as usize);
    // SAFETY: `len` readable bytes from `cmdline`, unchanged while in use.
    let bytes = unsafe { core::slice::from_raw_parts(p, len as usize) };
    let wanted = bytes
        .split(u8::is_ascii_whitespace)
        .any(|w| w == b"mode=beforeinit");
    if !wanted {
        PRE_STATE.store(PRE_NO_MODE, Ordering::Relaxed);
        return;
    }
    raw_hcall(LHCALL_NOTIFY, phys(PRE_MSG.as_ptr()), 0, 0);
    PRE_STATE.store(PRE_HCALL_SURVIVED, Ordering::Relaxed);
}

/// # Safety
///
/// `addr` must be readable guest memory.
unsafe fn peek_u8(addr: u32) -> u8 {
    // SAFETY: caller's contract; linear mode, so the address is the pointer.
    unsafe { core::ptr::with_exposed_provenance::<u8>(addr as usize).read_volatile() }
}

/// # Safety
///
/// `[addr, addr + 4)` must be readable guest memory.
unsafe fn peek_u32(addr: u32) -> u32 {
    let p = core::ptr::with_exposed_provenance::<u32>(addr as usize);
    // SAFETY: caller's contract; unaligned because boot_params fields may be.
    unsafe { p.read_unaligned() }
}
