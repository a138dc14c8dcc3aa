//! Diagnostics for the fatal paths: unexpected exceptions and panics.
//!
//! Both print everything a person needs to find the bug — what happened, the
//! decoded error code, where (RIP, RSP, CR2, CR3) and all registers — on the
//! console, then stop the machine through [`super::power::fatal_stop`]
//! (QEMU failure exit under `exit=qemu`, halt otherwise).

use core::sync::atomic::{AtomicBool, Ordering};

use super::arch::cpu;
use super::arch::trap::TrapFrame;
use super::console::print_fatal;

static IN_FATAL: AtomicBool = AtomicBool::new(false);

/// Name and mnemonic of an exception vector.
pub fn exception_name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("divide error", "#DE"),
        1 => ("debug", "#DB"),
        2 => ("non-maskable interrupt", "NMI"),
        3 => ("breakpoint", "#BP"),
        4 => ("overflow", "#OF"),
        5 => ("bound range exceeded", "#BR"),
        6 => ("invalid opcode", "#UD"),
        7 => ("device not available", "#NM"),
        8 => ("double fault", "#DF"),
        9 => ("coprocessor segment overrun", "#MF9"),
        10 => ("invalid TSS", "#TS"),
        11 => ("segment not present", "#NP"),
        12 => ("stack-segment fault", "#SS"),
        13 => ("general protection fault", "#GP"),
        14 => ("page fault", "#PF"),
        16 => ("x87 floating-point error", "#MF"),
        17 => ("alignment check", "#AC"),
        18 => ("machine check", "#MC"),
        19 => ("SIMD floating-point error", "#XM"),
        20 => ("virtualization exception", "#VE"),
        21 => ("control protection", "#CP"),
        28 => ("hypervisor injection", "#HV"),
        29 => ("VMM communication", "#VC"),
        30 => ("security exception", "#SX"),
        _ => ("reserved exception", "#??"),
    }
}

struct ErrorCode(u64, u64);

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (vector, code) = (self.0, self.1);
        write!(f, "{code:#x}")?;
        match vector {
            14 => {
                let bit = |b: u64| code & (1 << b) != 0;
                write!(
                    f,
                    " ({}, {}, {}{}{}{})",
                    if bit(0) {
                        "protection violation"
                    } else {
                        "not-present"
                    },
                    if bit(1) { "write" } else { "read" },
                    if bit(2) { "user" } else { "supervisor" },
                    if bit(3) { ", reserved bit set" } else { "" },
                    if bit(4) { ", instruction fetch" } else { "" },
                    if bit(5) { ", protection key" } else { "" },
                )
            }
            10..=13 | 17 if code != 0 => {
                let table = match (code >> 1) & 3 {
                    0 => "GDT",
                    1 | 3 => "IDT",
                    _ => "LDT",
                };
                write!(
                    f,
                    " ({} index {}{})",
                    table,
                    (code >> 3) & 0x1FFF,
                    if code & 1 != 0 { ", external" } else { "" }
                )
            }
            _ => Ok(()),
        }
    }
}

/// Prints the full diagnostic of an unexpected exception and stops.
pub fn unexpected_exception(frame: &TrapFrame) -> ! {
    let first = !IN_FATAL.swap(true, Ordering::SeqCst);
    let (name, mnemonic) = exception_name(frame.vector);
    print_fatal(format_args!(
        "\nEXCEPTION: {name} ({mnemonic}, vector {})\n",
        frame.vector
    ));
    if !first {
        print_fatal(format_args!(
            "(while already handling a fatal error; stopping)\n"
        ));
        super::power::fatal_stop();
    }
    print_fatal(format_args!(
        "error code {}\n",
        ErrorCode(frame.vector, frame.error_code)
    ));
    if frame.vector == 14 {
        print_fatal(format_args!("CR2={:#018x}\n", cpu::cr2()));
    }
    if frame.vector == 8 {
        print_fatal(format_args!(
            "a double fault usually means a kernel stack overflow into a guard page \
             or a fault while delivering another exception\n"
        ));
    }
    print_fatal(format_args!(
        "RIP={:#018x} CS={:#06x} RFLAGS={:#010x} (ring {})\n",
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.cs & 3
    ));
    print_fatal(format_args!(
        "RSP={:#018x} SS={:#06x} CR3={:#018x} CR0={:#x} CR4={:#x}\n",
        frame.rsp,
        frame.ss,
        cpu::cr3(),
        cpu::cr0(),
        cpu::cr4()
    ));
    print_registers(frame);
    print_backtrace(frame.rbp);
    super::power::fatal_stop()
}

fn print_registers(f: &TrapFrame) {
    print_fatal(format_args!(
        "RAX={:#018x} RBX={:#018x} RCX={:#018x} RDX={:#018x}\n\
         RSI={:#018x} RDI={:#018x} RBP={:#018x} R8 ={:#018x}\n\
         R9 ={:#018x} R10={:#018x} R11={:#018x} R12={:#018x}\n\
         R13={:#018x} R14={:#018x} R15={:#018x}\n",
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15
    ));
}

/// Walks saved frame pointers (the hypervisor is built with frame pointers)
/// as long as they stay inside mapped kernel memory.
pub fn print_backtrace(mut rbp: u64) {
    print_fatal(format_args!("backtrace:"));
    for _ in 0..16 {
        if rbp == 0 || !rbp.is_multiple_of(8) || !super::mem::is_kernel_readable(rbp, 16) {
            break;
        }
        // SAFETY: `is_kernel_readable` checked that both words at rbp are
        // mapped kernel memory; frame records are [saved rbp, return address].
        let (next, ret) = unsafe {
            let p = rbp as *const u64;
            (p.read_volatile(), p.add(1).read_volatile())
        };
        if ret == 0 {
            break;
        }
        print_fatal(format_args!(" {ret:#x}"));
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    print_fatal(format_args!("\n"));
}

/// Panic handler: message, location, backtrace, then stop.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    let first = !IN_FATAL.swap(true, Ordering::SeqCst);
    print_fatal(format_args!("\nPANIC: {}\n", info.message()));
    if let Some(loc) = info.location() {
        print_fatal(format_args!(
            "at {}:{}:{}\n",
            loc.file(),
            loc.line(),
            loc.column()
        ));
    }
    if first {
        let rbp: u64;
        // SAFETY: reads the frame pointer register only.
        unsafe { core::arch::asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack)) };
        print_backtrace(rbp);
    }
    super::power::fatal_stop()
}
