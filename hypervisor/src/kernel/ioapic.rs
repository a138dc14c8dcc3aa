//! The IO-APIC: routes legacy (ISA) interrupts found through the ACPI MADT to
//! the boot CPU. Every pin starts masked; drivers unmask what they use.

use super::mem;
use super::sync::IrqMutex;

/// First vector used for IO-APIC interrupts: ISA IRQ n arrives at 0x30 + n.
pub const IRQ_VECTOR_BASE: u8 = 0x30;

/// An ISA interrupt source override from the MADT.
#[derive(Clone, Copy, Debug)]
pub struct Override {
    /// ISA IRQ number.
    pub isa_irq: u8,
    /// Global system interrupt it is wired to.
    pub gsi: u32,
    /// MPS INTI flags (polarity bits 0–1, trigger mode bits 2–3).
    pub flags: u16,
}

struct IoApic {
    virt: u64,
    gsi_base: u32,
    pins: u32,
    overrides: [Option<Override>; 16],
}

static IOAPIC: IrqMutex<Option<IoApic>> = IrqMutex::new(None);

impl IoApic {
    fn read(&self, reg: u32) -> u32 {
        // SAFETY: `virt` is the uncached mapping of the IO-APIC's register
        // window (IOREGSEL at +0, IOWIN at +0x10); the lock serialises the
        // select-then-access pair.
        unsafe {
            (self.virt as *mut u32).write_volatile(reg);
            ((self.virt + 0x10) as *const u32).read_volatile()
        }
    }

    fn write(&self, reg: u32, val: u32) {
        // SAFETY: as in `read`.
        unsafe {
            (self.virt as *mut u32).write_volatile(reg);
            ((self.virt + 0x10) as *mut u32).write_volatile(val);
        }
    }
}

/// Maps the IO-APIC at `phys` serving GSIs from `gsi_base`, masks all pins.
/// Returns the number of pins.
pub fn init(phys: u64, gsi_base: u32, overrides: &[Option<Override>]) -> u32 {
    let virt = mem::map_mmio(phys, 4096);
    let mut table = [None; 16];
    for o in overrides.iter().flatten() {
        if let Some(slot) = table.get_mut(usize::from(o.isa_irq)) {
            *slot = Some(*o);
        }
    }
    let mut io = IoApic {
        virt,
        gsi_base,
        pins: 0,
        overrides: table,
    };
    io.pins = ((io.read(1) >> 16) & 0xFF) + 1;
    for pin in 0..io.pins {
        io.write(0x10 + 2 * pin, 1 << 16);
        io.write(0x11 + 2 * pin, 0);
    }
    let pins = io.pins;
    *IOAPIC.lock() = Some(io);
    pins
}

/// Routes ISA IRQ `irq` to vector `IRQ_VECTOR_BASE + irq` on APIC `dest` and
/// unmasks it, honouring the MADT's polarity/trigger overrides.
pub fn route_isa_irq(irq: u8, dest: u32) -> bool {
    let guard = IOAPIC.lock();
    let Some(io) = guard.as_ref() else {
        return false;
    };
    let ov = io.overrides.get(usize::from(irq)).copied().flatten();
    let gsi = ov.map_or(u32::from(irq), |o| o.gsi);
    let flags = ov.map_or(0, |o| o.flags);
    let Some(pin) = gsi.checked_sub(io.gsi_base).filter(|p| *p < io.pins) else {
        return false;
    };
    let mut low = u32::from(IRQ_VECTOR_BASE + irq);
    if flags & 0x3 == 0x3 {
        low |= 1 << 13; // active low
    }
    if (flags >> 2) & 0x3 == 0x3 {
        low |= 1 << 15; // level triggered
    }
    io.write(0x11 + 2 * pin, dest << 24);
    io.write(0x10 + 2 * pin, low);
    true
}
