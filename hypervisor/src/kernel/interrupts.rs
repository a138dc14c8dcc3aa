//! Where every trap lands after the entry stubs: exceptions, device
//! interrupts and spurious vectors.

use core::sync::atomic::{AtomicU64, Ordering};

use super::arch::trap::TrapFrame;
use super::{apic, console, fault, ioapic, time};

/// ISA IRQ of COM1.
pub const COM1_IRQ: u8 = 4;

static SPURIOUS: AtomicU64 = AtomicU64::new(0);
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);

/// Counters for the end-of-run summary: (spurious, unexpected vectors).
pub fn counters() -> (u64, u64) {
    (
        SPURIOUS.load(Ordering::Relaxed),
        UNEXPECTED.load(Ordering::Relaxed),
    )
}

/// Handles one trap taken in the hypervisor (the dispatcher sends traps from
/// guests elsewhere): exceptions are fatal, except a fault while loading guest
/// state, which is the guest's; device interrupts are serviced and
/// acknowledged.
pub fn handle_host(frame: &mut TrapFrame) {
    let vector = frame.vector;
    // A fault raised by the instruction that loads guest state is the
    // guest's. NMI (2) and machine check (18) are not caused by that
    // instruction: they may merely arrive while it is about to run, and are
    // the host's whatever the instruction pointer says.
    if vector < 32
        && vector != 2
        && vector != 18
        && super::lguest::switch::is_entry_fault(frame.rip)
    {
        super::lguest::switch::entry_fault(frame);
    }
    match vector {
        0..=31 => fault::unexpected_exception(frame),
        _ => service_irq(vector),
    }
}

/// Services a device interrupt or spurious vector (the dispatcher also calls
/// it for host interrupts that arrived while a guest was running).
pub fn service_irq(vector: u64) {
    match vector {
        // Remapped 8259 vectors: all lines are masked, so only spurious IRQ
        // 7/15 can arrive; they need no EOI.
        0x20..=0x2F => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        v if v == u64::from(ioapic::IRQ_VECTOR_BASE + COM1_IRQ) => {
            if console::on_serial_irq() {
                super::launcher::on_serial_input();
            }
            apic::eoi();
        }
        v if v == u64::from(apic::TIMER_VECTOR) => {
            apic::eoi();
            time::on_timer_irq();
        }
        v if v == u64::from(apic::ERROR_VECTOR) => {
            log::warn!("local APIC error interrupt");
            apic::eoi();
        }
        v if v == u64::from(apic::SPURIOUS_VECTOR) => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            if UNEXPECTED.fetch_add(1, Ordering::Relaxed) < 8 {
                log::warn!("unexpected interrupt vector {vector:#x}; ignored");
            }
            apic::eoi();
        }
    }
}
