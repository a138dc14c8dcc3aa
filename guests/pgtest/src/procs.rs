//! User-mode areas: three processes in separate address spaces, and a
//! fork-like loop of 100 address spaces.
//!
//! Every process runs the same user program ([`USER_CODE`], the assembly at
//! the end of this file, copied into one read-only frame shared by all
//! address spaces). Its own data page at [`USER_DATA`] holds its tag (word
//! 0), a counter (word 1), the "preempted" flag the kernel sets (word 2),
//! the quick-exit flag (word 3) and the system-call results it got (words
//! 4–5). The program:
//!
//! 1. `SYS_ADD(tag, 0x1000, 0x20000, 0x300000)` (four arguments in ebx, ecx,
//!    edx, esi) must return their sum in eax; `SYS_KSTACK` returns where the
//!    kernel's handler ran (kept in word 4);
//! 2. pushes onto its stack at [`USER_STACK_TOP`], which is not mapped: a
//!    user write fault the kernel resolves by mapping a page (demand paging);
//! 3. five times: increments its counter, checks its tag, `SYS_YIELD` (a
//!    switch to another process and address space each time);
//! 4. reads the shared copy-on-write page at [`USER_COW`], writes its tag
//!    into it (a protection fault: the kernel copies the page and maps the
//!    copy writable), yields, and checks that it still sees its own tag and
//!    the rest of the page;
//! 5. reads a supervisor page twice (the image at 0x400000 and its
//!    `PAGE_OFFSET` alias): each a #PF with P and U set, which the kernel
//!    answers with eax = -1 and the next instruction;
//! 6. spins until the kernel's timer tick has preempted it at least once;
//! 7. exits with its counter (5). Any failed check exits with `0xFA11_000n`.

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::paging::{
    self, AddressSpace, Fault, PAGE_OFFSET, PAGE_PRESENT, PAGE_RW, PAGE_SIZE, PAGE_USER, PF_PROT,
    PF_USER, PF_WRITE, PTE_COW, PTE_OWNED, probe_read, probe_write,
};
use lguest_rt::process::{self, MAX_PROCS, SYS_EXIT, SYS_YIELD};
use lguest_rt::sync::IrqCell;
use lguest_rt::{TrapFrame, check, check_eq, hcall, println, test};

use crate::summary;

/// The user program's code page.
pub const USER_CODE: u32 = 0x4000_0000;
/// The process's own data page.
pub const USER_DATA: u32 = 0x4000_1000;
/// The copy-on-write page.
pub const USER_COW: u32 = 0x4000_2000;
/// Top of the user stack (its pages are mapped on demand).
pub const USER_STACK_TOP: u32 = 0x4010_0000;
/// Lowest address of the demand-paged stack region.
pub const USER_STACK_BOTTOM: u32 = USER_STACK_TOP - 16 * PAGE_SIZE;
/// A supervisor page the program reads: the image, 1:1.
pub const PROBE_LOW: u32 = 0x0040_0000;
/// Its direct-map alias.
pub const PROBE_HIGH: u32 = PAGE_OFFSET + PROBE_LOW;

const COW_MAGIC: u32 = 0xC0C0_C0C0;
const COW_MAGIC2: u32 = 0x5EED_0002;
const SYS_ADD: u32 = 10;
const SYS_KSTACK: u32 = 11;
/// Yields in step 3.
const ROUNDS: u32 = 5;
/// System calls of one full run: add, kstack, 5 + 1 yields, exit.
const FULL_SYSCALLS: u32 = 2 + ROUNDS + 1 + 1;

/// Words of the data page.
const D_TAG: u32 = 0;
const D_COUNTER: u32 = 4;
const D_PREEMPTED: u32 = 8;
const D_QUICK: u32 = 12;
const D_KSTACK: u32 = 16;

/// What the user-fault hook saw.
struct UserFaults {
    demand: u32,
    cow: u32,
    /// Supervisor-page faults: (cr2, error code).
    supervisor: [(u32, u32); 8],
    n_supervisor: usize,
    other: u32,
}

static UFAULTS: IrqCell<UserFaults> = IrqCell::new(UserFaults {
    demand: 0,
    cow: 0,
    supervisor: [(0, 0); 8],
    n_supervisor: 0,
    other: 0,
});

/// Guest-physical data frame of each pid (for the preemption hook).
static DATA_FRAMES: IrqCell<[u32; MAX_PROCS]> = IrqCell::new([0; MAX_PROCS]);

/// Page faults from user mode: demand-paged stack, copy-on-write,
/// supervisor probes. Anything else kills the process (returns `false`).
pub fn user_fault(fault: &Fault, f: &mut TrapFrame) -> bool {
    let page = fault.addr & !(PAGE_SIZE - 1);
    let user_rw = PAGE_PRESENT | PAGE_RW | PAGE_USER;
    if !fault.protection() && (USER_STACK_BOTTOM..USER_STACK_TOP).contains(&fault.addr) {
        let ok = process::with_current(|_, s| s.map_new(page, user_rw).is_ok()).unwrap_or(false);
        UFAULTS.with(|u| u.demand += u32::from(ok));
        return ok;
    }
    if fault.protection() && fault.write() && page == USER_COW {
        let ok = process::with_current(|_, s| {
            let old = s.entry(page);
            if old & PTE_COW == 0 {
                return false;
            }
            let Ok(new) = paging::alloc_frame().ok_or(()) else {
                return false;
            };
            let src = (old & paging::format().frame_mask()) as u32;
            // SAFETY: both frames are in RAM, reached through the direct
            // map; `new` is fresh and `src` is only read.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    core::ptr::with_exposed_provenance::<u8>(paging::kva(src) as usize),
                    core::ptr::with_exposed_provenance_mut::<u8>(paging::kva(new) as usize),
                    PAGE_SIZE as usize,
                );
            }
            s.map(page, new, user_rw | PTE_OWNED).is_ok()
        })
        .unwrap_or(false);
        UFAULTS.with(|u| u.cow += u32::from(ok));
        return ok;
    }
    if fault.protection() && !fault.write() && [PROBE_LOW, PROBE_HIGH].contains(&fault.addr) {
        UFAULTS.with(|u| {
            if let Some(slot) = u.supervisor.get_mut(u.n_supervisor) {
                *slot = (fault.addr, fault.error);
                u.n_supervisor += 1;
            }
        });
        // The probe is `mov eax, [abs32]` (5 bytes).
        f.eax = u32::MAX;
        f.eip += 5;
        return true;
    }
    UFAULTS.with(|u| u.other += 1);
    false
}

/// Where the handler of the last `SYS_KSTACK` ran.
static KSTACK_SEEN: AtomicU32 = AtomicU32::new(0);

fn syscall_hook(_pid: usize, nr: u32, args: [u32; 4]) -> u32 {
    match nr {
        SYS_ADD => args.iter().fold(0u32, |a, b| a.wrapping_add(*b)),
        SYS_KSTACK => {
            let here = 0u32;
            let at = hcall::phys(&raw const here);
            KSTACK_SEEN.store(at, Ordering::Relaxed);
            at
        }
        _ => u32::MAX,
    }
}

fn preempt_hook(pid: usize) {
    let pa = DATA_FRAMES.with(|d| d[pid]);
    if pa != 0 {
        let _ = probe_write(paging::kva(pa) + D_PREEMPTED, 1);
    }
}

#[cfg(target_arch = "x86")]
unsafe extern "C" {
    static pgtest_user_begin: u8;
    static pgtest_user_end: u8;
}

/// The user program's bytes (in the image).
fn user_program() -> (u32, u32) {
    #[cfg(target_arch = "x86")]
    {
        let begin = hcall::phys(&raw const pgtest_user_begin);
        (begin, hcall::phys(&raw const pgtest_user_end) - begin)
    }
    #[cfg(not(target_arch = "x86"))]
    (0, 0)
}

/// Frames shared by every process: the code page and the copy-on-write
/// page (with its two markers).
struct Shared {
    code: u32,
    cow: u32,
}

impl Shared {
    fn new() -> Shared {
        let (begin, len) = user_program();
        assert!(len <= PAGE_SIZE, "the user program fits a page");
        let code = paging::alloc_frame().expect("a frame for the user program");
        // SAFETY: copies the program from the image (identity-mapped) into
        // the fresh frame (direct map).
        unsafe {
            core::ptr::copy_nonoverlapping(
                core::ptr::with_exposed_provenance::<u8>(begin as usize),
                core::ptr::with_exposed_provenance_mut::<u8>(paging::kva(code) as usize),
                len as usize,
            );
        }
        let cow = paging::alloc_frame().expect("a frame for the COW page");
        let _ = probe_write(paging::kva(cow), COW_MAGIC);
        let _ = probe_write(paging::kva(cow) + 4, COW_MAGIC2);
        Shared { code, cow }
    }

    /// A new address space with the code and COW pages and a data page
    /// tagged `tag`; returns it and the data frame.
    fn space(&self, tag: u32, quick: bool) -> (AddressSpace, u32) {
        let s = AddressSpace::new().expect("a frame for a top-level table");
        let user = PAGE_PRESENT | PAGE_USER;
        s.map(USER_CODE, self.code, user).expect("code mapped");
        s.map(USER_COW, self.cow, user | PTE_COW)
            .expect("COW page mapped");
        let data = s
            .map_new(USER_DATA, user | PAGE_RW)
            .expect("data page mapped");
        let _ = probe_write(paging::kva(data) + D_TAG, tag);
        let _ = probe_write(paging::kva(data) + D_QUICK, u32::from(quick));
        (s, data)
    }

    fn free(self) {
        paging::free_frame(self.code);
        paging::free_frame(self.cow);
    }
}

/// `mode=procs`: three processes, separate address spaces, one program.
pub fn three() {
    let failed = test::failed();
    let shared = Shared::new();
    process::set_syscall_hook(Some(syscall_hook));
    process::set_preempt_hook(Some(preempt_hook));
    process::set_preempt(true);
    let tags = [0x7A60_0001, 0x7A60_0002, 0x7A60_0003];
    let mut pids = [0usize; 3];
    let mut data = [0u32; 3];
    for (i, &tag) in tags.iter().enumerate() {
        let (space, d) = shared.space(tag, false);
        let pid = process::spawn(space, USER_CODE, USER_STACK_TOP).expect("a process slot");
        DATA_FRAMES.with(|f| f[pid] = d);
        pids[i] = pid;
        data[i] = d;
    }
    let switches0 = process::switches();
    process::run();
    let switches = process::switches() - switches0;
    process::set_preempt(false);
    check!(
        paging::current_top() == paging::kernel_top(),
        "procs: back in the kernel's address space"
    );
    let mut spaces = [const { None }; 3];
    for i in 0..3 {
        let exit = process::reap(pids[i]);
        check!(exit.is_some(), "procs: process {i} exited");
        let Some(exit) = exit else { continue };
        let d = paging::kva(data[i]);
        check_eq!(
            exit.code,
            ROUNDS,
            "procs: process {i} exit code (its counter)"
        );
        check_eq!(
            probe_read(d + D_TAG),
            Ok(tags[i]),
            "procs: process {i}: its data page kept its tag"
        );
        check_eq!(
            probe_read(d + D_COUNTER),
            Ok(ROUNDS),
            "procs: process {i}: its own counter"
        );
        check_eq!(
            exit.syscalls,
            FULL_SYSCALLS,
            "procs: process {i}: system calls made"
        );
        check!(
            exit.preemptions >= 1,
            "procs: process {i}: preempted by the timer ({} times)",
            exit.preemptions
        );
        let kstack = probe_read(d + D_KSTACK).unwrap_or(0);
        let top = process::kernel_stack_top();
        check!(
            (top - process::KSTACK_SIZE as u32..top).contains(&kstack),
            "procs: process {i}: its system calls ran on the SET_STACK stack at PAGE_OFFSET ({kstack:#x})"
        );
        let cow = exit.space.translate(USER_COW);
        check!(
            cow.is_some_and(|pa| pa & !(PAGE_SIZE - 1) != shared.cow
                && probe_read(paging::kva(pa)) == Ok(tags[i])
                && probe_read(paging::kva(pa) + 4) == Ok(COW_MAGIC2)),
            "procs: process {i}: a private copy of the COW page with its tag"
        );
        spaces[i] = Some(exit.space);
    }
    check!(
        switches >= 3 * (ROUNDS + 1),
        "procs: {switches} process switches"
    );
    let (demand, cow, sup, n_sup, other) =
        UFAULTS.with(|u| (u.demand, u.cow, u.supervisor, u.n_supervisor, u.other));
    check_eq!(demand, 3, "procs: user demand faults (one stack page each)");
    check_eq!(cow, 3, "procs: copy-on-write faults (one each)");
    check_eq!(other, 0, "procs: no unexpected user faults");
    check_eq!(n_sup, 6, "procs: supervisor-page faults (two each)");
    check!(
        sup[..n_sup]
            .iter()
            .all(|&(addr, err)| [PROBE_LOW, PROBE_HIGH].contains(&addr)
                && err & (PF_PROT | PF_WRITE | PF_USER) == PF_PROT | PF_USER),
        "procs: supervisor-page faults: cr2 and error code P|U (read) {:x?}",
        &sup[..n_sup]
    );
    check_eq!(
        probe_read(paging::kva(shared.cow)),
        Ok(COW_MAGIC),
        "procs: the shared COW page is untouched"
    );
    for s in spaces.into_iter().flatten() {
        s.destroy();
    }
    shared.free();
    process::set_syscall_hook(None);
    process::set_preempt_hook(None);
    println!(
        "pgtest: 3 processes, {switches} switches, {demand} demand faults, {cow} copies on write, {n_sup} supervisor faults"
    );
    let ok = test::failed() == failed;
    summary("three processes", failed);
    for what in [
        "syscalls",
        "user demand paging",
        "copy-on-write",
        "user access to supervisor page",
        "timer preemption",
    ] {
        if ok {
            println!("pgtest: {what} ok");
        } else {
            println!("FAIL: pgtest: {what} (see above)");
        }
    }
}

/// Address spaces of the fork-like loop.
const FORKS: u32 = 100;
/// Pages each child touches besides its code, data and COW pages.
const FORK_PAGES: u32 = 4;

/// `mode=fork`: 100 times: a new address space (a copy of the parent's
/// data page, the shared code and COW pages), a few pages mapped and
/// touched, the child run until it exits, everything torn down.
pub fn fork_loop() {
    let failed = test::failed();
    let before = paging::free_frames();
    let shared = Shared::new();
    let mut done = 0;
    let mut bad_exit = 0;
    let mut bad_touch = 0;
    for n in 0..FORKS {
        let tag = 0xF0_0000 + n;
        let (space, data) = shared.space(tag, true);
        for p in 0..FORK_PAGES {
            let va = USER_STACK_BOTTOM + p * PAGE_SIZE;
            let _ = space.map_new(va, PAGE_PRESENT | PAGE_RW | PAGE_USER);
        }
        space.switch_to();
        for p in 0..FORK_PAGES {
            let va = USER_STACK_BOTTOM + p * PAGE_SIZE;
            if probe_write(va, tag ^ p).is_err() || probe_read(va) != Ok(tag ^ p) {
                bad_touch += 1;
            }
        }
        let Some(pid) = process::spawn(space, USER_CODE, USER_STACK_TOP) else {
            break;
        };
        DATA_FRAMES.with(|f| f[pid] = data);
        process::run();
        let Some(exit) = process::reap(pid) else {
            break;
        };
        if exit.code != tag + 0x1000 {
            bad_exit += 1;
        }
        exit.space.destroy();
        done += 1;
    }
    shared.free();
    check_eq!(
        done,
        FORKS,
        "fork: address spaces created, run and destroyed"
    );
    check_eq!(bad_touch, 0, "fork: every touched page kept its value");
    check_eq!(
        bad_exit,
        0,
        "fork: every child exited with its tag + 0x1000"
    );
    let after = paging::free_frames();
    check_eq!(after, before, "fork: free frames back at the baseline");
    println!("pgtest: fork loop: {done} address spaces, free frames {after} (baseline {before})");
    summary("fork loop: 100 address spaces", failed);
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    // The user program (CPL 3). Copied to USER_CODE: only relative jumps and
    // absolute addresses of the user layout, nothing of the image.
    ".pushsection .text.pgtest_user,\"ax\",@progbits",
    ".globl pgtest_user_begin",
    "pgtest_user_begin:",
    "mov edi, dword ptr [{data} + {d_tag}]",
    "test dword ptr [{data} + {d_quick}], 1",
    "jnz 90f",
    // 1. system calls with arguments
    "mov eax, {sys_add}",
    "mov ebx, edi",
    "mov ecx, 0x1000",
    "mov edx, 0x20000",
    "mov esi, 0x300000",
    "int 0x80",
    "lea ebx, [edi + 0x321000]",
    "cmp eax, ebx",
    "jne 81f",
    "mov eax, {sys_kstack}",
    "int 0x80",
    "mov dword ptr [{data} + {d_kstack}], eax",
    // 2. the stack is demand-paged
    "push edi",
    "pop eax",
    "cmp eax, edi",
    "jne 82f",
    // 3. counter and yields; the data page must stay ours
    "mov esi, {rounds}",
    "1:",
    "inc dword ptr [{data} + {d_counter}]",
    "cmp dword ptr [{data} + {d_tag}], edi",
    "jne 83f",
    "mov eax, {sys_yield}",
    "int 0x80",
    "dec esi",
    "jnz 1b",
    // 4. copy on write
    "cmp dword ptr [{cow}], {cow_magic}",
    "jne 84f",
    "mov dword ptr [{cow}], edi",
    "mov eax, {sys_yield}",
    "int 0x80",
    "cmp dword ptr [{cow}], edi",
    "jne 84f",
    "cmp dword ptr [{cow} + 4], {cow_magic2}",
    "jne 84f",
    // 5. supervisor pages: the kernel answers eax = -1 and skips the load
    ".byte 0xa1",
    ".long {probe_low}",
    "cmp eax, -1",
    "jne 85f",
    ".byte 0xa1",
    ".long {probe_high}",
    "cmp eax, -1",
    "jne 85f",
    // 6. wait for a timer preemption
    "mov ecx, 400000000",
    "2:",
    "cmp dword ptr [{data} + {d_preempted}], 0",
    "jne 3f",
    "dec ecx",
    "jnz 2b",
    "jmp 86f",
    "3:",
    // 7. exit with the counter
    "mov ebx, dword ptr [{data} + {d_counter}]",
    "mov eax, {sys_exit}",
    "int 0x80",
    "ud2",
    // quick: exit with tag + 0x1000
    "90:",
    "lea ebx, [edi + 0x1000]",
    "mov eax, {sys_exit}",
    "int 0x80",
    "ud2",
    "81: mov ebx, 0xFA110001",
    "jmp 99f",
    "82: mov ebx, 0xFA110002",
    "jmp 99f",
    "83: mov ebx, 0xFA110003",
    "jmp 99f",
    "84: mov ebx, 0xFA110004",
    "jmp 99f",
    "85: mov ebx, 0xFA110005",
    "jmp 99f",
    "86: mov ebx, 0xFA110006",
    "99:",
    "mov eax, {sys_exit}",
    "int 0x80",
    "ud2",
    ".globl pgtest_user_end",
    "pgtest_user_end:",
    ".popsection",
    data = const USER_DATA,
    cow = const USER_COW,
    d_tag = const D_TAG,
    d_counter = const D_COUNTER,
    d_preempted = const D_PREEMPTED,
    d_quick = const D_QUICK,
    d_kstack = const D_KSTACK,
    sys_add = const SYS_ADD,
    sys_kstack = const SYS_KSTACK,
    sys_yield = const SYS_YIELD,
    sys_exit = const SYS_EXIT,
    rounds = const ROUNDS,
    cow_magic = const COW_MAGIC,
    cow_magic2 = const COW_MAGIC2,
    probe_low = const PROBE_LOW,
    probe_high = const PROBE_HIGH,
);
