//! The native floor for the benchmarks, measured by the hypervisor itself in
//! the same boot: `int n` from a compatibility-mode CPL-1 probe to a 64-bit
//! ring-0 stub that does nothing but `iretq` (`native_int_roundtrip` in
//! docs/benchmarks.md).
//!
//! The probe is a few 32-bit instructions run exactly like a guest (its own
//! linear-mode address space, CS 0x61 / SS 0x69, entered through the world
//! switch), so the figure is the hardware cost of the same privilege and mode
//! change every hypercall pays, without any hypervisor work. It times `N`
//! round trips with `rdtsc`, then an empty loop of the same shape, and leaves
//! both counts in registers before exiting with `int $0x1f`.

use core::arch::{global_asm, naked_asm};

use rustyvisor::lguest::guestmem::GuestMemory;
use rustyvisor::lguest::segments::GuestGdt;
use rustyvisor::lguest::vcpu::Regs;

use super::space::{GuestRam, HostGuestMemory, LinearTables};
use super::switch;
use crate::kernel::arch::{cpu, gdt, idt};

/// Vector the probe raises; its gate points at [`iretq_only`].
const PROBE_VECTOR: u8 = 0x81;
/// Guest-physical address the probe code is copied to.
const PROBE_GPA: u32 = 0x1000;

// The probe, assembled as 32-bit code into read-only data and copied into the
// probe's memory. In: esi = iterations. Out: ebx = TSC ticks for the `int`
// loop, edx = ticks for the same loop without the `int`. Only the low 32 bits
// of the TSC are used: one run is far shorter than 2^32 ticks.
global_asm!(
    ".pushsection .rodata.rv_probe, \"a\"",
    ".code32",
    ".globl rv_probe_start",
    "rv_probe_start:",
    "rdtsc",
    "mov edi, eax",
    "mov ecx, esi",
    "2:",
    "int 0x81",
    "dec ecx",
    "jnz 2b",
    "rdtsc",
    "sub eax, edi",
    "mov ebx, eax",
    "rdtsc",
    "mov edi, eax",
    "mov ecx, esi",
    "3:",
    "dec ecx",
    "jnz 3b",
    "rdtsc",
    "sub eax, edi",
    "mov edx, eax",
    "int 0x1f",
    "4:",
    "jmp 4b",
    ".globl rv_probe_end",
    "rv_probe_end:",
    ".code64",
    ".popsection",
);

unsafe extern "C" {
    static rv_probe_start: u8;
    static rv_probe_end: u8;
}

/// The ring-0 side of the probe: nothing but the return.
#[unsafe(naked)]
unsafe extern "C" fn iretq_only() {
    naked_asm!("iretq")
}

/// Measures the native `int`/`iretq` round trip from compatibility-mode CPL 1.
/// Returns TSC ticks per round trip (instructions under `-icount shift=0`),
/// or why it could not run.
pub fn native_int_roundtrip(iterations: u32) -> Result<f64, &'static str> {
    let iterations = iterations.max(1);
    let ram = GuestRam::new(2 << 20).map_err(|_| "no memory for the probe")?;
    let tables =
        LinearTables::new(ram.base(), ram.bytes()).map_err(|_| "no memory for the probe tables")?;
    // SAFETY: `ram` is mapped and lives until the end of this function.
    let mut mem = unsafe { HostGuestMemory::new(ram.base(), 2 << 20) };
    let start = &raw const rv_probe_start as u64;
    let end = &raw const rv_probe_end as u64;
    // SAFETY: the two symbols delimit the probe's bytes in .rodata.
    let code = unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    mem.write(PROBE_GPA, code)
        .map_err(|_| "probe code does not fit")?;

    let mut regs = Regs {
        eip: PROBE_GPA,
        cs: 0x61,
        ss: 0x69,
        ds: 0x69,
        es: 0x69,
        esp: (2 << 20) - 16,
        esi: iterations,
        eflags: 0x202,
        ..Regs::default()
    };
    gdt::load_guest_entries(GuestGdt::new().entries());
    idt::set_gate_handler(PROBE_VECTOR, iretq_only as *const () as u64, 1);
    let old_cr3 = cpu::cr3();
    // SAFETY: the probe tables share the kernel's upper half.
    unsafe { cpu::write_cr3(tables.cr3()) };
    // Host interrupts (the timer) may interrupt the probe; retry the run then.
    let mut result = Err("probe interrupted too often");
    for _ in 0..8 {
        regs.eip = PROBE_GPA;
        // SAFETY: `regs` lives on this stack until `run` returns; no fast
        // handler: every exit comes back here.
        let exit = unsafe { switch::run(&raw mut regs, None) };
        match exit.trapnum {
            0x1f => {
                let ticks = f64::from(regs.ebx.saturating_sub(regs.edx));
                result = Ok(ticks / f64::from(iterations));
                break;
            }
            t if t >= 32 => continue,
            _ => {
                result = Err("probe faulted");
                break;
            }
        }
    }
    // SAFETY: back to the address space we came from (upper half identical).
    unsafe { cpu::write_cr3(old_cr3) };
    idt::set_gate_dpl(PROBE_VECTOR, 0);
    drop(tables);
    drop(ram);
    result
}
