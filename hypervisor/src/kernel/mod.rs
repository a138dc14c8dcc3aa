//! The bare-metal hypervisor: boot flow and the subsystems it brings up.
//!
//! Boot order (see docs/design.md): console → GDT/IDT (so every fault gets a
//! diagnostic) → boot information → command line → memory (frame allocator,
//! W^X kernel tables, heap) → a guarded kernel stack → ACPI → interrupt
//! controllers → timer calibration → interrupts on → self-tests → idle.

pub mod acpi;
pub mod apic;
pub mod arch;
pub mod bootinfo;
pub mod console;
pub mod fault;
pub mod interrupts;
pub mod ioapic;
pub mod launcher;
pub mod lguest;
pub mod mem;
pub mod pit;
pub mod power;
pub mod selftest;
pub mod sync;
pub mod task;
pub mod time;

extern crate alloc;

use alloc::vec::Vec;
use rustyvisor::config::{self, BenchMode, Config};
use rustyvisor::units::Bytes;

use crate::kprintln;
use arch::{cpu, gdt, idt};
use bootinfo::{BootInfo, Firmware};

core::arch::global_asm!(include_str!("../../../boot/boot.S"), options(att_syntax));

/// The hypervisor's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Pages of the main kernel stack.
const MAIN_STACK_PAGES: u64 = 16;
/// Pages of each IST stack.
const IST_STACK_PAGES: u64 = 4;

static BOOT: spin::Once<BootInfo> = spin::Once::new();
static CONFIG: spin::Once<Config> = spin::Once::new();

/// The parsed command line.
pub fn config() -> &'static Config {
    CONFIG.call_once(Config::default)
}

/// Entered from the boot trampoline on the boot stack, interrupts off.
#[unsafe(no_mangle)]
extern "C" fn kernel_entry(magic: u32, mbi: u32) -> ! {
    console::init(115_200);
    gdt::init();
    idt::init();
    kprintln!();
    kprintln!("rustyvisor {VERSION}");

    let boot = match bootinfo::parse(magic, u64::from(mbi)) {
        Ok(b) => BOOT.call_once(|| b),
        Err(e) => {
            kprintln!(
                "boot: cannot use the boot information ({e}); rustyvisor must be started \
                 by GRUB's `multiboot2` command"
            );
            power::fatal_stop();
        }
    };

    let (cfg, errors) = config::parse(boot.cmdline.as_str());
    let cfg = CONFIG.call_once(|| cfg);
    power::set_mode(cfg.exit);
    if cfg.serial_baud != 115_200 {
        console::init(cfg.serial_baud);
    }
    console::init_logger(cfg.log.to_level_filter(), cfg.timestamps);
    kprintln!(
        "boot: loader \"{}\", firmware {}",
        boot.loader.as_str(),
        match boot.firmware {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    );
    match boot.framebuffer {
        Some((addr, w, h, bpp)) => kprintln!("boot: framebuffer {w}x{h}x{bpp} at {addr:#x}"),
        None => kprintln!("boot: no framebuffer"),
    }
    kprintln!(
        "cmdline: \"{}\" -> {}",
        boot.cmdline.as_str(),
        cfg.describe()
    );
    if boot.cmdline_truncated {
        kprintln!(
            "cmdline: truncated to {} bytes",
            boot.cmdline.as_str().len()
        );
    }
    for e in errors.iter() {
        kprintln!("cmdline: {e}");
    }
    if errors.overflow() > 0 {
        kprintln!("cmdline: ... and {} more problems", errors.overflow());
    }

    let report = match mem::init(boot) {
        Ok(r) => r,
        Err(e) => {
            kprintln!("memory: initialisation failed: {e:?}");
            power::fatal_stop();
        }
    };
    let s = report.summary;
    // Firmware reservations that matter: those below the top of RAM (or
    // 4 GiB), not e.g. QEMU's reserved window far above RAM.
    let top = s.highest_usable_end.max(4 << 30);
    let reserved: u64 = boot
        .memory_map()
        .iter()
        .filter(|e| !e.kind.is_usable())
        .map(|e| {
            e.base
                .saturating_add(e.len)
                .min(top)
                .saturating_sub(e.base.min(top))
        })
        .sum();
    kprintln!(
        "memory: usable {} MiB, reserved {} MiB, above 4G: {} MiB, highest {:#x}",
        s.usable_bytes >> 20,
        reserved >> 20,
        s.above_4g_usable_bytes >> 20,
        s.highest_usable_end
    );
    kprintln!(
        "memory: {} frames managed, {} free, bitmap {}; image W^X, direct map, heap up",
        report.managed_frames,
        report.free_frames,
        Bytes(report.bitmap_bytes)
    );
    if boot.mmap_dropped > 0 {
        kprintln!(
            "memory: {} map entries ignored (too many)",
            boot.mmap_dropped
        );
    }

    // Move off the unguarded boot stack onto a stack with a guard page, and
    // give the IST vectors guarded stacks too.
    let Some(main_stack) = mem::KernelStack::new(MAIN_STACK_PAGES) else {
        kprintln!("memory: cannot allocate the kernel stack");
        power::fatal_stop();
    };
    for ist in [gdt::IST_DOUBLE_FAULT, gdt::IST_NMI, gdt::IST_MACHINE_CHECK] {
        match mem::KernelStack::new(IST_STACK_PAGES) {
            Some(s) => {
                gdt::set_ist(ist, s.top());
                core::mem::forget(s); // lives as long as the CPU
            }
            None => kprintln!("memory: no guarded IST stack {ist}; keeping the boot one"),
        }
    }
    let top = main_stack.top();
    core::mem::forget(main_stack); // the boot CPU's stack, for good
    // SAFETY: `top` is the top of a freshly mapped, 16-byte aligned stack that
    // nothing else uses; `kernel_main` never returns, so abandoning the boot
    // stack (and everything on it) is fine.
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {main}",
            top = in(reg) top,
            main = sym kernel_main,
            options(noreturn)
        )
    }
}

/// Continues the boot on the guarded stack.
extern "C" fn kernel_main() -> ! {
    let Some(boot) = BOOT.get() else {
        power::fatal_stop();
    };
    let cfg = config();

    let platform = match acpi::discover(boot.rsdp) {
        Ok(p) => Some(p),
        Err(e) => {
            kprintln!(
                "acpi: {}; continuing with defaults (1 CPU, no IO-APIC)",
                e.0
            );
            None
        }
    };
    pit::disable_pic();
    apic::init(platform.as_ref().and_then(|p| p.lapic));
    let cpus = platform.as_ref().map_or(1, |p| p.cpus.max(1));
    kprintln!(
        "cpus: {cpus} found ({} running, {} parked), boot CPU APIC id {}",
        1,
        cpus - 1,
        apic::id()
    );
    let mut com1_routed = false;
    if let Some(p) = platform.as_ref() {
        match p.ioapic {
            Some((addr, gsi_base)) => {
                let pins = ioapic::init(addr, gsi_base, &p.overrides);
                let routed = ioapic::route_isa_irq(interrupts::COM1_IRQ, apic::id());
                com1_routed = routed;
                kprintln!(
                    "acpi: revision {}, {} IO-APIC(s), first at {addr:#x} with {pins} pins; \
                     COM1 irq {}",
                    p.revision,
                    p.ioapics,
                    if routed { "routed" } else { "not routed" }
                );
            }
            None => kprintln!("acpi: no IO-APIC; serial input disabled, output synchronous"),
        }
        if !power::acpi_poweroff_available() {
            log::info!("acpi: no \\_S5 sleep state; `exit=poweroff` will halt instead");
        }
    }

    let (tsc_hz, apic_hz) = time::init();
    kprintln!("timer: lapic {apic_hz} Hz, tsc {tsc_hz} Hz (calibrated against the PIT)");
    x86_64::instructions::interrupts::enable();
    if com1_routed {
        // From here on console output is queued and sent by interrupt.
        console::enable_irq_output();
    }

    for m in boot.modules() {
        kprintln!(
            "module: \"{}\" at {}, {}",
            m.cmdline.as_str(),
            m.range,
            Bytes(m.range.len())
        );
    }

    selftest::run(cfg, boot);

    lguest::init_cpu();
    selftest::entry_fault(cfg);
    selftest::channel(cfg, boot);
    if cfg.bench == BenchMode::Paths {
        // Under `-icount shift=0` (cargo xtask bench) TSC ticks are
        // instructions, hence the unit.
        lguest::probe::enable();
        match lguest::probe::native_int_roundtrip(10_000) {
            Ok(v) => {
                lguest::probe::report("native_int_roundtrip", v, None);
                lguest::probe::report("native_int_roundtrip_per64", v / 64.0, None);
                // Where the hypercall round trip goes: the hardware's `int`
                // and `iretq`, and the stub's own instructions (the same
                // stub the guest's trivial calls meet, measured from a CPL-1
                // probe); the rest of the guest's figure is its own loop.
                match lguest::probe::hcall_stub_roundtrip(10_000) {
                    Ok(stub) => {
                        lguest::probe::report_stage("hypercall_roundtrip", "hardware", v);
                        lguest::probe::report_stage("hypercall_roundtrip", "stub", stub - v);
                    }
                    Err(e) => kprintln!("bench: hypercall stub probe failed: {e}"),
                }
            }
            Err(e) => kprintln!("bench: native probe failed: {e}"),
        }
        match lguest::probe::native_syscall(10_000) {
            Ok(v) => lguest::probe::report("native_syscall", v, None),
            Err(e) => kprintln!("bench: native syscall probe failed: {e}"),
        }
        lguest::probe::report_paging_floors();
    }
    if cfg.bench.is_on() {
        lguest::probe::enable();
    }
    if cfg.bench == BenchMode::Io {
        // The floor of the virtio byte benches: the hypervisor copying what
        // one of their batches moves.
        match lguest::probe::native_memcpy(lguest::probe::MEMCPY_BYTES, 5) {
            Ok(v) => lguest::probe::report_in("native_memcpy", v, "insn/KiB", None),
            Err(e) => kprintln!("bench: native memcpy probe failed: {e}"),
        }
    }
    let modules: Vec<_> = boot.modules().collect();
    let (free_before, _, _) = mem::frame_counts();
    let kept_before = mem::heap_frames() + mem::stack_table_frames();
    if launcher::start(&modules, cfg.fastpath, cfg.bench) > 0 {
        task::run();
        let (ran, clean) = launcher::results();
        kprintln!("guests: {ran} run, {clean} powered off cleanly");
        launcher::report_bench();
        // Every guest, task stack and console buffer is gone now: the
        // free count is where it was before the first guest, but for the
        // frames the kernel keeps for good: the heap's growth (it never
        // shrinks) and the page tables of new stack slots (never reused);
        // hundreds of guests at once make both grow.
        let (free_after, _, _) = mem::frame_counts();
        let grown = mem::heap_frames() + mem::stack_table_frames() - kept_before;
        if free_after + grown == free_before {
            kprintln!("guests: every frame came back ({free_after} free)");
        } else {
            kprintln!(
                "guests: LEAK: {} frames not returned",
                free_before.abs_diff(free_after + grown)
            );
        }
    }

    kprintln!("idle: nothing to run");
    if power::qemu_exit_requested() {
        summary();
    }
    power::finish()
}

/// The end-of-run summary line.
fn summary() {
    let (free, used, managed) = mem::frame_counts();
    let (heap_used, heap_size) = mem::heap_usage();
    let (spurious, unexpected) = interrupts::counters();
    let (out_lines, out_bytes) = console::output_dropped();
    let (stack_peak, stack_size) = task::stack_peak();
    kprintln!(
        "summary: uptime {} ms, frames {free} free / {used} used / {managed} managed, \
         heap {} of {}, timer irqs {}, spurious {spurious}, unexpected {unexpected}, \
         console input dropped {}, output dropped {} lines ({} bytes), \
         task stacks at most {} of {}",
        time::now_ns() / 1_000_000,
        Bytes(heap_used as u64),
        Bytes(heap_size as u64),
        time::timer_irqs(),
        console::input_dropped(),
        out_lines,
        out_bytes,
        Bytes(stack_peak),
        Bytes(stack_size)
    );
}

/// Halts until an interrupt (used by waits in self-tests).
pub fn wait_for_interrupt() {
    cpu::enable_and_hlt();
}
