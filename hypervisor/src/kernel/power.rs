//! Ending a run: QEMU debug exit, ACPI soft-off, or halting.

use core::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, Ordering};

use rustyvisor::config::ExitMode;

use super::arch::cpu;
use super::console;

/// isa-debug-exit port (QEMU: `-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
const QEMU_EXIT_PORT: u16 = 0xF4;
/// Written to the debug-exit port on success: QEMU exits with (0x10 << 1) | 1 = 33.
pub const QEMU_SUCCESS: u32 = 0x10;
/// Written on failure: QEMU exits with 35.
pub const QEMU_FAILURE: u32 = 0x11;

const MODE_HALT: u8 = 0;
const MODE_QEMU: u8 = 1;
const MODE_POWEROFF: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(MODE_HALT);
/// PM1a/PM1b control ports and the S5 sleep types, filled from ACPI.
static PM1A_CNT: AtomicU16 = AtomicU16::new(0);
static PM1B_CNT: AtomicU16 = AtomicU16::new(0);
static SLP_TYP: AtomicU32 = AtomicU32::new(u32::MAX);

/// Records what the command line asked for at the end of a run.
pub fn set_mode(mode: ExitMode) {
    let m = match mode {
        ExitMode::Halt => MODE_HALT,
        ExitMode::Qemu => MODE_QEMU,
        ExitMode::Poweroff => MODE_POWEROFF,
    };
    MODE.store(m, Ordering::Relaxed);
}

/// Whether `exit=qemu` was given.
pub fn qemu_exit_requested() -> bool {
    MODE.load(Ordering::Relaxed) == MODE_QEMU
}

/// Remembers how to power off through ACPI (from the FADT and the DSDT's \_S5).
pub fn set_acpi_poweroff(pm1a: u16, pm1b: u16, slp_typ_a: u8, slp_typ_b: u8) {
    PM1A_CNT.store(pm1a, Ordering::Relaxed);
    PM1B_CNT.store(pm1b, Ordering::Relaxed);
    SLP_TYP.store(
        u32::from(slp_typ_a) | (u32::from(slp_typ_b) << 8),
        Ordering::Relaxed,
    );
}

/// Whether ACPI soft-off is available.
pub fn acpi_poweroff_available() -> bool {
    PM1A_CNT.load(Ordering::Relaxed) != 0 && SLP_TYP.load(Ordering::Relaxed) != u32::MAX
}

fn qemu_exit(code: u32) {
    // SAFETY: 0xF4 is QEMU's isa-debug-exit device; on machines without it the
    // port is unused and the write has no effect.
    unsafe { cpu::outl(QEMU_EXIT_PORT, code) };
}

fn acpi_poweroff() {
    if !acpi_poweroff_available() {
        return;
    }
    let typ = SLP_TYP.load(Ordering::Relaxed);
    let pm1a = PM1A_CNT.load(Ordering::Relaxed);
    let pm1b = PM1B_CNT.load(Ordering::Relaxed);
    // SAFETY: the ports come from the FADT's PM1 control blocks; writing
    // SLP_TYP|SLP_EN there is the ACPI-defined way to enter S5 (soft off).
    unsafe {
        cpu::outw(pm1a, rustyvisor::acpi_s5::slp_en_value(typ as u8));
        if pm1b != 0 {
            cpu::outw(pm1b, rustyvisor::acpi_s5::slp_en_value((typ >> 8) as u8));
        }
    }
}

/// The normal end of a run (nothing left to do): QEMU success exit, ACPI
/// power-off, or halt with interrupts still serviced, per the command line.
/// Queued console output is drained first, synchronously, whenever the
/// machine is about to go away.
pub fn finish() -> ! {
    match MODE.load(Ordering::Relaxed) {
        MODE_QEMU => {
            // Queued output would die with QEMU: send it all first.
            console::flush();
            qemu_exit(QEMU_SUCCESS);
            crate::kprintln!("power: QEMU debug-exit device not present; halting");
        }
        MODE_POWEROFF => {
            crate::kprintln!("power: ACPI soft-off");
            console::flush();
            acpi_poweroff();
            crate::kprintln!("power: ACPI soft-off failed or unavailable; halting");
        }
        _ => crate::kprintln!("power: halted (press the reset button or power off)"),
    }
    // Keep servicing interrupts while halted; echo console input so a
    // person at the serial line sees the machine is alive.
    loop {
        cpu::enable_and_hlt();
        while let Some(byte) = console::read_byte() {
            let c = if byte == b'\r' {
                '\n'
            } else {
                char::from(byte)
            };
            console::print(format_args!("{c}"));
        }
    }
}

/// The end of a fatal error: QEMU failure exit under `exit=qemu`, otherwise
/// halt with interrupts off so the diagnostic stays on screen. The console
/// is drained and made synchronous first.
pub fn fatal_stop() -> ! {
    x86_64::instructions::interrupts::disable();
    // Send what is queued (synchronously, for good) before QEMU exits.
    console::flush_fatal();
    if MODE.load(Ordering::Relaxed) == MODE_QEMU {
        qemu_exit(QEMU_FAILURE);
    }
    console::print_fatal(format_args!(
        "system halted after a fatal error; reset the machine\n"
    ));
    cpu::halt_forever()
}
