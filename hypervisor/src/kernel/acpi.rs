//! ACPI discovery with the `acpi` crate: CPUs, the local APIC and IO-APIC
//! addresses and ISA interrupt overrides (MADT), and the power-off registers
//! (FADT + the DSDT's \_S5 package).
//!
//! The crate's `PlatformInfo` needs its nightly `allocator_api` feature, so we
//! walk the MADT entries ourselves (a few lines) on stable.

use core::ptr::NonNull;

use acpi::fadt::Fadt;
use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use super::ioapic::Override;
use super::mem::phys_to_virt;

/// Maps ACPI tables through the direct map (they sit in RAM or firmware
/// reserved memory below the direct map's end).
#[derive(Clone, Copy)]
struct DirectMapHandler;

impl AcpiHandler for DirectMapHandler {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let virt = phys_to_virt(phys as u64) as *mut T;
        let ptr = NonNull::new(virt).unwrap_or(NonNull::dangling());
        // SAFETY: the direct map covers all physical memory up to the highest
        // RAM address and at least 4 GiB, where firmware places ACPI tables;
        // the mapping is permanent, so nothing needs unmapping.
        unsafe { PhysicalMapping::new(phys, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What the hypervisor learns from ACPI.
pub struct Platform {
    /// Enabled (or online-capable) processors.
    pub cpus: u32,
    /// Local APIC physical address.
    pub lapic: Option<u64>,
    /// First IO-APIC: (physical address, GSI base).
    pub ioapic: Option<(u64, u32)>,
    /// IO-APICs found.
    pub ioapics: u32,
    /// ISA interrupt source overrides.
    pub overrides: [Option<Override>; 16],
    /// Whether legacy 8259 PICs are present.
    pub has_8259: bool,
    /// ACPI revision of the RSDP.
    pub revision: u8,
}

/// Why ACPI could not be used.
#[derive(Debug)]
pub struct AcpiError(pub &'static str);

/// Reads the tables starting at the RSDP (from the boot information, or a
/// BIOS-area search when the loader gave none).
pub fn discover(rsdp: Option<u64>) -> Result<Platform, AcpiError> {
    // SAFETY: the RSDP address comes from the boot information (or the crate's
    // BIOS-area search) and every table is read through the direct map.
    let tables = unsafe {
        match rsdp {
            Some(addr) => AcpiTables::from_rsdp(DirectMapHandler, addr as usize),
            None => AcpiTables::search_for_rsdp_bios(DirectMapHandler),
        }
    }
    .map_err(|_| AcpiError("no valid RSDP/RSDT found"))?;

    let mut p = Platform {
        cpus: 0,
        lapic: None,
        ioapic: None,
        ioapics: 0,
        overrides: [None; 16],
        has_8259: false,
        revision: tables.revision(),
    };

    if let Ok(madt) = tables.find_table::<Madt>() {
        let madt = madt.get();
        p.lapic = Some(u64::from(madt.local_apic_address));
        p.has_8259 = madt.supports_8259();
        let mut n_over = 0;
        for entry in madt.entries() {
            match entry {
                MadtEntry::LocalApic(e) => {
                    let flags = e.flags;
                    if flags & 0b11 != 0 {
                        p.cpus += 1;
                    }
                }
                MadtEntry::LocalX2Apic(e) => {
                    let flags = e.flags;
                    if flags & 0b11 != 0 {
                        p.cpus += 1;
                    }
                }
                MadtEntry::IoApic(e) => {
                    p.ioapics += 1;
                    if p.ioapic.is_none() {
                        p.ioapic =
                            Some((u64::from(e.io_apic_address), e.global_system_interrupt_base));
                    }
                }
                MadtEntry::InterruptSourceOverride(e) => {
                    if let Some(slot) = p.overrides.get_mut(n_over) {
                        *slot = Some(Override {
                            isa_irq: e.irq,
                            gsi: e.global_system_interrupt,
                            flags: e.flags,
                        });
                        n_over += 1;
                    }
                }
                MadtEntry::LocalApicAddressOverride(e) => {
                    p.lapic = Some(e.local_apic_address);
                }
                _ => {}
            }
        }
    }

    find_poweroff(&tables);
    Ok(p)
}

fn find_poweroff(tables: &AcpiTables<DirectMapHandler>) {
    let Ok(fadt) = tables.find_table::<Fadt>() else {
        return;
    };
    let pm1a = fadt.pm1a_control_block().map(|g| g.address).unwrap_or(0);
    let pm1b = fadt
        .pm1b_control_block()
        .ok()
        .flatten()
        .map_or(0, |g| g.address);
    let Ok(dsdt) = tables.dsdt() else {
        return;
    };
    let aml_ptr = phys_to_virt(dsdt.address as u64) as *const u8;
    // SAFETY: the crate validated the DSDT header; address/length describe its
    // AML body, inside the direct map.
    let aml = unsafe { core::slice::from_raw_parts(aml_ptr, dsdt.length as usize) };
    if let Some((a, b)) = rustyvisor::acpi_s5::find_s5_sleep_types(aml)
        && let (Ok(pm1a), Ok(pm1b)) = (u16::try_from(pm1a), u16::try_from(pm1b))
    {
        super::power::set_acpi_poweroff(pm1a, pm1b, a, b);
    }
}
