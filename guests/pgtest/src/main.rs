//! `pgtest`: the guest's own page tables under the host's shadow paging, in
//! the format the module command line names (`paging=2level` or
//! `paging=pae`; the hypervisor reads the same word), one area or all of
//! them per boot with `mode=` (default `all`).
//!
//! The guest announces `kernel_address` = `PAGE_OFFSET` (0xC0000000) at
//! INIT, builds its kernel tables with [`lguest_rt::paging`] (the image 1:1,
//! all RAM at `PAGE_OFFSET`, a kernel window at 0xF0000000) and leaves linear
//! mode with its first `LHCALL_NEW_PGTABLE`; see that module for the layout
//! and which hypercall each change makes.
//!
//! | mode | area | summary line |
//! |---|---|---|
//! | `kernel` | data and code reached through the `PAGE_OFFSET` alias ([`kernel::high`]) | `pgtest: kernel mapped at 0xc0000000 ok` |
//! | `demand` | kernel-mode demand paging: #PF, `lguest_data.cr2`, allocate, `SET_PTE`, retry ([`kernel::demand`]) | `pgtest: demand paging ok` |
//! | `ad` | accessed/dirty bits set by the host in the guest's PTEs ([`kernel::accessed_dirty`]) | `pgtest: accessed/dirty bits ok` |
//! | `tlb` | `SET_PTE` visible at once, kernel mappings shared, `FLUSH_TLB(0/1)` and single-page flushes ([`kernel::tlb`]) | `pgtest: set_pte ok`, `pgtest: flush_tlb ok` |
//! | `procs` | three CPL-3 processes in separate address spaces: system calls, user demand paging, copy-on-write, supervisor pages, timer preemption ([`procs::three`]) | `pgtest: three processes ok`, ... |
//! | `fork` | 100 address spaces created, run, torn down ([`procs::fork_loop`]) | `pgtest: fork loop ok: 100 address spaces` |
//!
//! Every check prints `PASS:`/`FAIL:`; each area ends with its summary line
//! (`pgtest: <area> ok`, or `FAIL: pgtest: <area>`), and the guest ends with
//! `pgtest: all frames back` (the free-frame count is back at its value
//! before the first area), `DONE: <p> passed, <f> failed` and a power-off.
#![no_std]
#![no_main]

mod kernel;
mod procs;

use lguest_rt::paging::{self, AddressSpace, Fault, Format, PAGE_OFFSET, PAGE_SIZE};
use lguest_rt::sync::IrqCell;
use lguest_rt::{BootInfo, TrapFrame, check_eq, println, test};

lguest_rt::entry!(main, kernel_address = PAGE_OFFSET);

type Area = (&'static str, fn());

const AREAS: &[Area] = &[
    ("kernel", kernel::high),
    ("demand", kernel::demand),
    ("ad", kernel::accessed_dirty),
    ("tlb", kernel::tlb),
    ("procs", procs::three),
    ("fork", procs::fork_loop),
];

fn main(boot: &BootInfo) {
    let mode = boot.arg("mode").unwrap_or("all");
    let areas = AREAS.iter().filter(|a| mode == "all" || a.0 == mode);
    if mode != "all" && !AREAS.iter().any(|a| a.0 == mode) {
        println!("FAIL: pgtest: unknown mode {mode:?}");
        return;
    }
    let (format, explicit) = match Format::from_boot(boot) {
        Ok(f) => f,
        Err(e) => {
            println!("FAIL: pgtest: {e} (command line {:?})", boot.cmdline);
            return;
        }
    };
    println!(
        "pgtest: mode {mode}, paging={} ({})",
        format.name(),
        if explicit { "command line" } else { "default" }
    );
    let km = paging::init(boot, format);
    println!(
        "pgtest: own page tables loaded: {} frames of kernel tables, image 1:1 below {:#x}, {} MiB at {:#x}",
        km.table_frames,
        km.image_end,
        km.mem >> 20,
        PAGE_OFFSET
    );
    lguest_rt::process::init();
    paging::set_fault_hook(Some(fault_hook));
    let baseline = paging::free_frames();
    for &(_, run) in areas {
        run();
    }
    check_eq!(
        paging::free_frames(),
        baseline,
        "every frame the areas used is free again"
    );
    println!("pgtest: all frames back ({baseline} free)");
}

/// Print the summary line of an area: `pgtest: <what> ok` if no check
/// failed since `failed_before`, else `FAIL: pgtest: <what>`.
fn summary(what: &str, failed_before: u32) {
    if test::failed() == failed_before {
        println!("pgtest: {what} ok");
    } else {
        println!("FAIL: pgtest: {what}");
    }
}

// ---- The page-fault hook ------------------------------------------------------------

/// Kernel-mode demand region of the test address space ([`TEST_AS`]):
/// a not-present fault here gets a fresh zeroed page.
pub const KDEMAND: u32 = 0x5000_0000;
/// Pages in [`KDEMAND`].
pub const KDEMAND_PAGES: u32 = 16;

/// Faults the hook resolved in kernel mode.
struct KernelFaults {
    count: u32,
    last: Fault,
}

static KFAULTS: IrqCell<KernelFaults> = IrqCell::new(KernelFaults {
    count: 0,
    last: Fault {
        addr: 0,
        error: 0,
        eip: 0,
    },
});

/// The address space the kernel-mode areas work in (kept in a cell so the
/// fault hook can map into it).
static TEST_AS: IrqCell<Option<AddressSpace>> = IrqCell::new(None);

/// Run `f` on [`TEST_AS`] (never across a probe: the hook needs the cell).
fn test_as<R>(f: impl FnOnce(&AddressSpace) -> R) -> R {
    TEST_AS.with(|s| f(s.as_ref().expect("the test address space exists")))
}

/// Kernel-mode faults resolved so far and the last one.
fn kernel_faults() -> (u32, Fault) {
    KFAULTS.with(|k| (k.count, k.last))
}

fn fault_hook(fault: &Fault, f: &mut TrapFrame) -> bool {
    if f.from_user() {
        return procs::user_fault(fault, f);
    }
    let in_region = (KDEMAND..KDEMAND + KDEMAND_PAGES * PAGE_SIZE).contains(&fault.addr);
    if fault.protection() || !in_region {
        return false;
    }
    let mapped = TEST_AS
        .try_with(|s| {
            s.as_ref().filter(|s| s.is_current()).map(|s| {
                s.map_new(
                    fault.addr & !(PAGE_SIZE - 1),
                    paging::PAGE_PRESENT | paging::PAGE_RW,
                )
                .is_ok()
            })
        })
        .flatten()
        .unwrap_or(false);
    if mapped {
        KFAULTS.with(|k| {
            k.count += 1;
            k.last = *fault;
        });
    }
    mapped
}
