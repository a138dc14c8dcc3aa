//! The multiboot2 boot information, parsed with the `multiboot2` crate and
//! copied into hypervisor-owned storage before any memory is allocated.
//!
//! GRUB may place the boot information and the modules anywhere, including
//! the gaps inside the hypervisor image's footprint; everything needed later is
//! copied here, and the ranges are reported as reserved so the frame allocator
//! never hands them out.

use multiboot2::{BootInformation, BootInformationHeader};
use rustyvisor::config::MAX_CMDLINE;
use rustyvisor::fixedstr::FixedStr;
use rustyvisor::lguest::spec::MAX_MODULE_CMDLINE;
use rustyvisor::mm::region::{MemoryKind, MemoryMapEntry, PhysRange};

use super::mem::phys_to_virt;

/// Memory map entries kept (more are counted and reported, not used).
pub const MAX_MMAP: usize = 128;

/// Which firmware started GRUB.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS (e.g. SeaBIOS).
    Bios,
    /// UEFI (e.g. OVMF).
    Uefi,
}

/// One GRUB module (a guest image, for instance).
#[derive(Clone, Copy)]
pub struct Module {
    /// Physical range of the module's bytes.
    pub range: PhysRange,
    /// The module's command line (first word: its name), cut to
    /// [`MAX_MODULE_CMDLINE`] bytes if longer (see `cmdline_len`).
    pub cmdline: FixedStr<MAX_MODULE_CMDLINE>,
    /// The full length of the command line the loader passed: more than
    /// `cmdline` holds when it was cut. The launcher refuses such a guest.
    pub cmdline_len: usize,
}

/// Everything the hypervisor keeps from the boot information.
pub struct BootInfo {
    /// The boot loader's name.
    pub loader: FixedStr<64>,
    /// The hypervisor command line.
    pub cmdline: FixedStr<MAX_CMDLINE>,
    /// Whether the command line had to be truncated.
    pub cmdline_truncated: bool,
    /// BIOS or UEFI.
    pub firmware: Firmware,
    /// Raw memory map.
    pub mmap: [MemoryMapEntry; MAX_MMAP],
    /// Valid entries in `mmap`.
    pub mmap_len: usize,
    /// Entries that did not fit.
    pub mmap_dropped: usize,
    /// Direct-map address of the boot information, which stays reserved
    /// (and mapped) forever: the modules are read from it when asked for,
    /// so there is no cap on their number.
    mbi_virt: u64,
    /// Physical address of the RSDP copy inside the boot information.
    pub rsdp: Option<u64>,
    /// Framebuffer (address, width, height, bpp), if the loader set one up.
    pub framebuffer: Option<(u64, u32, u32, u8)>,
    /// Physical range of the boot information itself.
    pub mbi: PhysRange,
}

impl BootInfo {
    /// The memory map.
    pub fn memory_map(&self) -> &[MemoryMapEntry] {
        self.mmap.get(..self.mmap_len).unwrap_or(&[])
    }

    /// The modules, as many as the loader passed, read from the boot
    /// information (no copy, no allocation: usable before the heap exists).
    pub fn modules(&self) -> Modules<'_> {
        // SAFETY: `parse` loaded the structure from this address and it is
        // reserved for good (never handed to the frame allocator, never
        // written), so it is still valid and unchanged.
        let info = unsafe { BootInformation::load(self.mbi_virt as *const BootInformationHeader) };
        Modules {
            info: info.ok(),
            next: 0,
            _boot: core::marker::PhantomData,
        }
    }
}

/// The modules of the boot information, in the loader's order (see
/// [`BootInfo::modules`]).
pub struct Modules<'a> {
    info: Option<BootInformation<'a>>,
    next: usize,
    _boot: core::marker::PhantomData<&'a BootInfo>,
}

impl Iterator for Modules<'_> {
    type Item = Module;

    fn next(&mut self) -> Option<Module> {
        let m = self.info.as_ref()?.module_tags().nth(self.next)?;
        self.next = self.next.saturating_add(1);
        let start = u64::from(m.start_address());
        let end = u64::from(m.end_address()).max(start);
        let full = m.cmdline().unwrap_or("");
        let (cmdline, _) = FixedStr::copy_from(full);
        Some(Module {
            range: PhysRange::new(start, end),
            cmdline,
            cmdline_len: full.len(),
        })
    }
}

/// Why the boot information could not be used.
pub enum BootInfoError {
    /// eax did not hold the multiboot2 magic.
    BadMagic(u32),
    /// The structure did not parse.
    Invalid,
    /// No memory map tag.
    NoMemoryMap,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "bad multiboot2 magic {m:#x}"),
            Self::Invalid => f.write_str("malformed boot information structure"),
            Self::NoMemoryMap => f.write_str("the loader passed no memory map"),
        }
    }
}

/// The multiboot2 magic GRUB leaves in eax.
pub const MULTIBOOT2_MAGIC: u32 = 0x36D7_6289;

/// Parses and copies the boot information at physical address `mbi`.
pub fn parse(magic: u32, mbi: u64) -> Result<BootInfo, BootInfoError> {
    if magic != MULTIBOOT2_MAGIC {
        return Err(BootInfoError::BadMagic(magic));
    }
    let ptr = phys_to_virt(mbi) as *const BootInformationHeader;
    // SAFETY: the boot trampoline's direct map covers the first 4 GiB, where
    // GRUB placed the boot information (a 32-bit address); the crate checks
    // the header's size and alignment, and nothing has touched that memory yet.
    let info = unsafe { BootInformation::load(ptr) }.map_err(|_| BootInfoError::Invalid)?;

    let (loader, _) = FixedStr::copy_from(
        info.boot_loader_name_tag()
            .and_then(|t| t.name().ok())
            .unwrap_or("unknown"),
    );
    let (cmdline, cmdline_truncated) = FixedStr::copy_from(
        info.command_line_tag()
            .and_then(|t| t.cmdline().ok())
            .unwrap_or(""),
    );
    let firmware = if info.efi_sdt64_tag().is_some() || info.efi_sdt32_tag().is_some() {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };

    let mut mmap = [MemoryMapEntry::new(0, 0, MemoryKind::Reserved); MAX_MMAP];
    let mut mmap_len = 0;
    let mut mmap_dropped = 0;
    let tag = info.memory_map_tag().ok_or(BootInfoError::NoMemoryMap)?;
    for area in tag.memory_areas() {
        let kind = match u32::from(area.typ()) {
            1 => MemoryKind::Usable,
            2 => MemoryKind::Reserved,
            3 => MemoryKind::AcpiReclaimable,
            4 => MemoryKind::AcpiNvs,
            5 => MemoryKind::BadMemory,
            other => MemoryKind::Other(other),
        };
        match mmap.get_mut(mmap_len) {
            Some(slot) => {
                *slot = MemoryMapEntry::new(area.start_address(), area.size(), kind);
                mmap_len += 1;
            }
            None => mmap_dropped += 1,
        }
    }

    // The RSDP is copied into the tag right after its 8-byte header; the ACPI
    // code reads it there (the boot information stays reserved forever).
    let rsdp = info
        .rsdp_v2_tag()
        .map(|t| core::ptr::from_ref(t).cast::<u8>() as u64)
        .or_else(|| {
            info.rsdp_v1_tag()
                .map(|t| core::ptr::from_ref(t).cast::<u8>() as u64)
        })
        .map(|virt| virt - phys_to_virt(0) + 8);

    let framebuffer = info
        .framebuffer_tag()
        .and_then(|r| r.ok())
        .map(|fb| (fb.address(), fb.width(), fb.height(), fb.bpp()));

    let start = mbi;
    let end = mbi.saturating_add(info.total_size() as u64);
    Ok(BootInfo {
        loader,
        cmdline,
        cmdline_truncated,
        firmware,
        mmap,
        mmap_len,
        mmap_dropped,
        mbi_virt: ptr as u64,
        rsdp,
        framebuffer,
        mbi: PhysRange::new(start, end),
    })
}
