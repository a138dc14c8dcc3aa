//! The legacy 8254 PIT (used once, to calibrate the TSC and the local APIC
//! timer) and the 8259 PICs (remapped and fully masked: interrupts go through
//! the IO-APIC).

use super::arch::cpu::{inb, outb};

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Busy-waits `ms` milliseconds (≤ 50) on PIT channel 2, calling `start` just
/// before the countdown begins and returning `finish()`'s value the moment it
/// ends. Used to measure other clocks against the PIT.
pub fn measure<T>(ms: u64, start: impl FnOnce(), finish: impl FnOnce() -> T) -> T {
    let count = (PIT_HZ * ms.clamp(1, 50) / 1000) as u16;
    // SAFETY: ports 0x61 (system control port B), 0x42/0x43 (PIT channel 2 and
    // command) are owned by this calibration code, which runs once at boot on
    // the only CPU with interrupts off.
    unsafe {
        // Gate 2 off, speaker off.
        let port_b = inb(0x61) & !0x03;
        outb(0x61, port_b);
        // Channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count), binary.
        outb(0x43, 0xB0);
        outb(0x42, (count & 0xFF) as u8);
        outb(0x42, (count >> 8) as u8);
        start();
        // Raising gate 2 starts the countdown; OUT2 (bit 5) goes high at zero.
        outb(0x61, port_b | 0x01);
        while inb(0x61) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let r = finish();
        outb(0x61, port_b);
        r
    }
}

/// Remaps the two 8259 PICs to vectors 0x20–0x2F and masks every line, so a
/// stray legacy interrupt lands on a known spurious vector.
pub fn disable_pic() {
    // SAFETY: the PIC ports (0x20/0x21, 0xA0/0xA1) belong to this init code;
    // the ICW sequence is the documented 8259 initialisation.
    unsafe {
        outb(0x20, 0x11); // ICW1: init, expect ICW4
        outb(0xA0, 0x11);
        outb(0x21, 0x20); // ICW2: vector offsets
        outb(0xA1, 0x28);
        outb(0x21, 0x04); // ICW3: slave on IRQ2
        outb(0xA1, 0x02);
        outb(0x21, 0x01); // ICW4: 8086 mode
        outb(0xA1, 0x01);
        outb(0x21, 0xFF); // mask everything
        outb(0xA1, 0xFF);
    }
}
