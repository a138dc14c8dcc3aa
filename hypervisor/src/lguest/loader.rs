//! Loading a 32-bit ELF guest kernel and writing its `boot_params`
//! (docs/abi.md, sections 10 and 11), as the lguest launcher did for a vmlinux.
//!
//! - [`load_elf`]: an `ET_EXEC`, `ELFCLASS32`, little-endian `EM_386` image;
//!   each `PT_LOAD` is copied to its `p_paddr` (`p_filesz` bytes from the
//!   file, the rest up to `p_memsz` zeroed). Every segment is validated
//!   before anything is written: inside guest memory without overflow, not
//!   touching the `boot_params` / command-line pages `[0, 0x2000)`,
//!   `p_filesz <= p_memsz`, file range inside the image. The entry point
//!   must lie inside an executable `PT_LOAD` (by physical address, like
//!   Linux's `vmlinux`, whose `e_entry` is physical).
//! - [`write_boot_params`]: the zero page at guest-physical 0 and the
//!   command line at 0x1000.
//!
//! Parsing uses the `elf` crate (no_std, zero-alloc, fuzzed).

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use core::fmt;

use elf::ElfBytes;
use elf::abi::{EM_386, ET_EXEC, PF_X, PT_LOAD};
use elf::endian::LittleEndian;
use guest_abi::boot::{
    BOOT_PARAMS_ADDR, BOOT_PARAMS_SIZE, BOOT_PROTOCOL_VERSION, BP_E820_ENTRIES,
    BP_HDR_CMD_LINE_PTR, BP_HDR_HARDWARE_SUBARCH, BP_HDR_LOADFLAGS, BP_HDR_TYPE_OF_LOADER,
    BP_HDR_VERSION, BootE820Entry, CMDLINE_ADDR, E820_RAM, KEEP_SEGMENTS, LOADER_TYPE_UNDEFINED,
    X86_SUBARCH_LGUEST,
};

use super::guestmem::{GuestMemory, MemFault};

/// Guest-physical end of the pages the launcher owns (`boot_params` and the
/// command line); no segment may touch `[0, RESERVED_LOW_END)`.
pub const RESERVED_LOW_END: u32 = 0x2000;
/// Longest command line copied (the NUL makes it a full page).
pub const CMDLINE_MAX: usize = 4095;

/// Why an image can't be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// Not parseable as ELF (bad magic, truncated header/tables, …).
    Malformed,
    /// Not `ELFCLASS32`.
    NotElf32,
    /// Not little-endian.
    NotLittleEndian,
    /// `e_machine` isn't `EM_386`.
    NotI386(u16),
    /// `e_type` isn't `ET_EXEC`.
    NotExecutable(u16),
    /// No `PT_LOAD` segment with a non-zero size.
    NoLoadableSegments,
    /// Segment `index`'s file data lies outside the image, or
    /// `p_filesz > p_memsz`.
    BadSegment {
        /// Program-header index.
        index: usize,
    },
    /// Segment `index` doesn't fit in guest memory.
    SegmentOutOfRange {
        /// Program-header index.
        index: usize,
        /// Its `p_paddr`.
        paddr: u64,
        /// Its `p_memsz`.
        memsz: u64,
    },
    /// Segment `index` overlaps the boot_params/command-line pages.
    OverlapsBootPages {
        /// Program-header index.
        index: usize,
        /// Its `p_paddr`.
        paddr: u64,
    },
    /// `e_entry` is not inside an executable loaded segment.
    BadEntry(u64),
    /// A guest-memory write failed (can't happen after validation).
    Memory(MemFault),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => write!(f, "not a valid ELF image"),
            Self::NotElf32 => write!(f, "not a 32-bit ELF"),
            Self::NotLittleEndian => write!(f, "not a little-endian ELF"),
            Self::NotI386(m) => write!(f, "not an i386 ELF (e_machine {m})"),
            Self::NotExecutable(t) => write!(f, "not an executable ELF (e_type {t})"),
            Self::NoLoadableSegments => write!(f, "no loadable segments"),
            Self::BadSegment { index } => write!(f, "segment {index}: bad file range or sizes"),
            Self::SegmentOutOfRange {
                index,
                paddr,
                memsz,
            } => write!(
                f,
                "segment {index} at {paddr:#x} size {memsz:#x} does not fit in guest memory"
            ),
            Self::OverlapsBootPages { index, paddr } => write!(
                f,
                "segment {index} at {paddr:#x} overlaps the boot pages below {RESERVED_LOW_END:#x}"
            ),
            Self::BadEntry(e) => write!(f, "entry point {e:#x} is not in an executable segment"),
            Self::Memory(m) => write!(f, "{m}"),
        }
    }
}

impl From<MemFault> for LoadError {
    fn from(m: MemFault) -> Self {
        Self::Memory(m)
    }
}

/// One validated `PT_LOAD`.
#[derive(Clone, Copy)]
struct Seg<'a> {
    paddr: u32,
    memsz: u32,
    data: &'a [u8],
    exec: bool,
}

/// Load `image` into guest memory and return its entry point
/// (guest-physical). Nothing is written unless the whole image validates.
pub fn load_elf(image: &[u8], mem: &mut impl GuestMemory) -> Result<u32, LoadError> {
    // Class and byte order from the ident, for precise errors.
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(LoadError::Malformed);
    }
    match image.get(4) {
        Some(1) => {}
        Some(_) => return Err(LoadError::NotElf32),
        None => return Err(LoadError::Malformed),
    }
    match image.get(5) {
        Some(1) => {}
        Some(_) => return Err(LoadError::NotLittleEndian),
        None => return Err(LoadError::Malformed),
    }
    let elf = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| LoadError::Malformed)?;
    let eh = &elf.ehdr;
    if eh.e_machine != EM_386 {
        return Err(LoadError::NotI386(eh.e_machine));
    }
    if eh.e_type != ET_EXEC {
        return Err(LoadError::NotExecutable(eh.e_type));
    }
    let segments = elf.segments().ok_or(LoadError::NoLoadableSegments)?;
    let limit = u64::from(mem.limit());

    // Pass 1: validate everything.
    let mut any = false;
    let mut entry_ok = false;
    for (index, ph) in segments.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let seg = validate(&elf, index, &ph, limit)?;
        any = true;
        let end = u64::from(seg.paddr).saturating_add(u64::from(seg.memsz));
        if seg.exec && (u64::from(seg.paddr)..end).contains(&eh.e_entry) {
            entry_ok = true;
        }
    }
    if !any {
        return Err(LoadError::NoLoadableSegments);
    }
    let entry = u32::try_from(eh.e_entry)
        .ok()
        .filter(|_| entry_ok)
        .ok_or(LoadError::BadEntry(eh.e_entry))?;

    // Pass 2: copy.
    for (index, ph) in segments.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let seg = validate(&elf, index, &ph, limit)?;
        mem.write(seg.paddr, seg.data)?;
        let filesz = seg.data.len() as u32; // ≤ memsz, checked
        mem.zero(
            seg.paddr.wrapping_add(filesz),
            seg.memsz.saturating_sub(filesz),
        )?;
    }
    Ok(entry)
}

fn validate<'a>(
    elf: &ElfBytes<'a, LittleEndian>,
    index: usize,
    ph: &elf::segment::ProgramHeader,
    limit: u64,
) -> Result<Seg<'a>, LoadError> {
    if ph.p_filesz > ph.p_memsz {
        return Err(LoadError::BadSegment { index });
    }
    let data = elf
        .segment_data(ph)
        .map_err(|_| LoadError::BadSegment { index })?;
    let out_of_range = LoadError::SegmentOutOfRange {
        index,
        paddr: ph.p_paddr,
        memsz: ph.p_memsz,
    };
    let end = ph
        .p_paddr
        .checked_add(ph.p_memsz)
        .ok_or(out_of_range.clone())?;
    if end > limit {
        return Err(out_of_range);
    }
    if ph.p_paddr < u64::from(RESERVED_LOW_END) {
        return Err(LoadError::OverlapsBootPages {
            index,
            paddr: ph.p_paddr,
        });
    }
    // end ≤ limit ≤ u32::MAX, so both fit.
    let paddr = u32::try_from(ph.p_paddr).map_err(|_| out_of_range.clone())?;
    let memsz = u32::try_from(ph.p_memsz).map_err(|_| out_of_range)?;
    Ok(Seg {
        paddr,
        memsz,
        data,
        exec: ph.p_flags & PF_X != 0,
    })
}

/// The e820 map every guest's `boot_params` carries: one RAM entry
/// `[0, ram_bytes)` (the device pages above RAM are not RAM).
pub(crate) fn write_ram_e820(
    mem: &mut (impl GuestMemory + ?Sized),
    ram_bytes: u32,
) -> Result<(), MemFault> {
    let bp = BOOT_PARAMS_ADDR;
    mem.write_u8(bp + BP_E820_ENTRIES, 1)?;
    let e820 = BootE820Entry {
        addr: 0,
        size: u64::from(ram_bytes),
        type_: E820_RAM,
    };
    mem.write(bp + BootE820Entry::offset(0), &e820.to_bytes())
}

/// Write the Linux `boot_params` page at guest-physical 0 (e820 with one RAM
/// entry `[0, ram_bytes)`, boot protocol 2.07, `KEEP_SEGMENTS`,
/// `hardware_subarch` = lguest, loader 0xFF, `cmd_line_ptr` = 0x1000) and the
/// NUL-terminated command line at 0x1000 (truncated to 4095 bytes).
pub fn write_boot_params(
    mem: &mut impl GuestMemory,
    ram_bytes: u32,
    cmdline: &str,
) -> Result<(), MemFault> {
    let bp = BOOT_PARAMS_ADDR;
    mem.zero(bp, BOOT_PARAMS_SIZE)?;
    write_ram_e820(mem, ram_bytes)?;
    mem.write_u16(bp + BP_HDR_VERSION, BOOT_PROTOCOL_VERSION)?;
    let flags = mem.read_u8(bp + BP_HDR_LOADFLAGS)?;
    mem.write_u8(bp + BP_HDR_LOADFLAGS, flags | KEEP_SEGMENTS)?;
    mem.write_u8(bp + BP_HDR_TYPE_OF_LOADER, LOADER_TYPE_UNDEFINED)?;
    mem.write_u32(bp + BP_HDR_CMD_LINE_PTR, CMDLINE_ADDR)?;
    mem.write_u32(bp + BP_HDR_HARDWARE_SUBARCH, X86_SUBARCH_LGUEST)?;
    let bytes = cmdline.as_bytes();
    let text = bytes.get(..CMDLINE_MAX).unwrap_or(bytes);
    mem.write(CMDLINE_ADDR, text)?;
    // `text.len() <= CMDLINE_MAX`, far below u32::MAX.
    mem.write_u8(CMDLINE_ADDR.wrapping_add(text.len() as u32), 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    extern crate alloc;

    struct Ph {
        ty: u32,
        off: u32,
        paddr: u32,
        filesz: u32,
        memsz: u32,
        flags: u32,
    }

    fn load(paddr: u32, off: u32, filesz: u32, memsz: u32, flags: u32) -> Ph {
        Ph {
            ty: PT_LOAD,
            off,
            paddr,
            filesz,
            memsz,
            flags,
        }
    }

    /// A minimal ELF32 i386 executable: header, program headers, then
    /// `payload` at offset 0x100.
    fn build(entry: u32, phs: &[Ph], payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"\x7fELF");
        v.extend_from_slice(&[1, 1, 1, 0]);
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&ET_EXEC.to_le_bytes());
        v.extend_from_slice(&EM_386.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes()); // e_version
        v.extend_from_slice(&entry.to_le_bytes());
        v.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        v.extend_from_slice(&52u16.to_le_bytes()); // e_ehsize
        v.extend_from_slice(&32u16.to_le_bytes()); // e_phentsize
        v.extend_from_slice(&(phs.len() as u16).to_le_bytes());
        v.extend_from_slice(&40u16.to_le_bytes()); // e_shentsize
        v.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        v.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        assert_eq!(v.len(), 52);
        for p in phs {
            for w in [
                p.ty, p.off, p.paddr, p.paddr, p.filesz, p.memsz, p.flags, 0x1000,
            ] {
                v.extend_from_slice(&w.to_le_bytes());
            }
        }
        v.resize(0x100, 0);
        v.extend_from_slice(payload);
        v
    }

    const PF_RX: u32 = 5;
    const PF_RW: u32 = 6;

    fn good() -> Vec<u8> {
        build(
            0x40_0010,
            &[
                load(0x40_0000, 0x100, 0x20, 0x20, PF_RX),
                load(0x40_1000, 0x120, 4, 0x100, PF_RW),
            ],
            &[0xAB; 0x24],
        )
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let mut m = VecMemory::new(0x50_0000);
        m.as_mut_slice().fill(0xEE);
        let entry = load_elf(&good(), &mut m).unwrap();
        assert_eq!(entry, 0x40_0010);
        let s = m.as_slice();
        assert!(s[0x40_0000..0x40_0020].iter().all(|&b| b == 0xAB));
        assert_eq!(s[0x40_0020], 0xEE);
        assert!(s[0x40_1000..0x40_1004].iter().all(|&b| b == 0xAB));
        assert!(s[0x40_1004..0x40_1100].iter().all(|&b| b == 0));
        assert_eq!(s[0x40_1100], 0xEE);
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        let mut m = VecMemory::new(0x50_0000);
        assert_eq!(load_elf(&[], &mut m), Err(LoadError::Malformed));
        assert_eq!(load_elf(b"\x7fEL", &mut m), Err(LoadError::Malformed));
        assert_eq!(load_elf(b"MZ\0\0\0\0", &mut m), Err(LoadError::Malformed));
        let img = good();
        for n in [4, 5, 6, 20, 51, 52, 60, 84] {
            assert_eq!(
                load_elf(&img[..n], &mut m),
                Err(LoadError::Malformed),
                "len {n}"
            );
        }
        // Program headers present but the segment data truncated.
        assert_eq!(
            load_elf(&img[..0x110], &mut m),
            Err(LoadError::BadSegment { index: 0 })
        );
        // Nothing was written by any of that.
        assert!(m.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_wrong_class_endian_machine_type() {
        let mut m = VecMemory::new(0x50_0000);
        let mut img = good();
        img[4] = 2;
        assert_eq!(load_elf(&img, &mut m), Err(LoadError::NotElf32));
        let mut img = good();
        img[5] = 2;
        assert_eq!(load_elf(&img, &mut m), Err(LoadError::NotLittleEndian));
        let mut img = good();
        img[18] = 62; // EM_X86_64
        assert_eq!(load_elf(&img, &mut m), Err(LoadError::NotI386(62)));
        let mut img = good();
        img[16] = 3; // ET_DYN
        assert_eq!(load_elf(&img, &mut m), Err(LoadError::NotExecutable(3)));
    }

    #[test]
    fn rejects_bad_segments() {
        let mut m = VecMemory::new(0x50_0000);
        let cases: [(Vec<u8>, LoadError); 6] = [
            (
                build(
                    0x4F_F000,
                    &[load(0x4F_F000, 0x100, 4, 0x2000, PF_RX)],
                    &[0; 4],
                ),
                LoadError::SegmentOutOfRange {
                    index: 0,
                    paddr: 0x4F_F000,
                    memsz: 0x2000,
                },
            ),
            (
                build(
                    0xFFFF_F000,
                    &[load(0xFFFF_F000, 0x100, 4, 0x2000, PF_RX)],
                    &[0; 4],
                ),
                LoadError::SegmentOutOfRange {
                    index: 0,
                    paddr: 0xFFFF_F000,
                    memsz: 0x2000,
                },
            ),
            (
                build(0x1000, &[load(0x1000, 0x100, 4, 0x10, PF_RX)], &[0; 4]),
                LoadError::OverlapsBootPages {
                    index: 0,
                    paddr: 0x1000,
                },
            ),
            (
                build(
                    0x40_0000,
                    &[load(0x40_0000, 0x100, 0x20, 0x10, PF_RX)],
                    &[0; 0x20],
                ),
                LoadError::BadSegment { index: 0 },
            ),
            (
                build(
                    0x40_0000,
                    &[load(0x40_0000, 0xFFFF_FFF0, 0x20, 0x20, PF_RX)],
                    &[],
                ),
                LoadError::BadSegment { index: 0 },
            ),
            (
                build(
                    0x40_0000,
                    &[Ph {
                        ty: 4,
                        ..load(0x40_0000, 0x100, 0, 0, 0)
                    }],
                    &[],
                ),
                LoadError::NoLoadableSegments,
            ),
        ];
        for (img, want) in cases {
            assert_eq!(load_elf(&img, &mut m), Err(want));
        }
        // Zero-sized PT_LOADs are skipped, even at 0.
        let img = build(
            0x40_0000,
            &[
                load(0, 0x100, 0, 0, PF_RX),
                load(0x40_0000, 0x100, 4, 4, PF_RX),
            ],
            &[1, 2, 3, 4],
        );
        assert_eq!(load_elf(&img, &mut m), Ok(0x40_0000));
    }

    #[test]
    fn second_bad_segment_writes_nothing() {
        let mut m = VecMemory::new(0x50_0000);
        let img = build(
            0x40_0000,
            &[
                load(0x40_0000, 0x100, 4, 4, PF_RX),
                load(0x1800, 0x100, 4, 0x1000, PF_RW),
            ],
            &[9; 4],
        );
        assert!(matches!(
            load_elf(&img, &mut m),
            Err(LoadError::OverlapsBootPages { index: 1, .. })
        ));
        assert!(m.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn entry_must_be_in_executable_segment() {
        let mut m = VecMemory::new(0x50_0000);
        let phs = || {
            [
                load(0x40_0000, 0x100, 0x10, 0x10, PF_RX),
                load(0x40_1000, 0x100, 0x10, 0x10, PF_RW),
            ]
        };
        for entry in [0x40_1000, 0x40_0010, 0x10_0000, 0] {
            let img = build(entry, &phs(), &[0; 0x10]);
            assert_eq!(
                load_elf(&img, &mut m),
                Err(LoadError::BadEntry(u64::from(entry)))
            );
        }
        let img = build(0x40_000F, &phs(), &[0; 0x10]);
        assert_eq!(load_elf(&img, &mut m), Ok(0x40_000F));
    }

    #[test]
    fn error_display() {
        assert_eq!(
            LoadError::OverlapsBootPages {
                index: 1,
                paddr: 0x1000
            }
            .to_string(),
            "segment 1 at 0x1000 overlaps the boot pages below 0x2000"
        );
        assert_eq!(
            LoadError::NotI386(62).to_string(),
            "not an i386 ELF (e_machine 62)"
        );
    }

    #[test]
    fn boot_params() {
        let mut m = VecMemory::new(0x20_0000);
        m.as_mut_slice()[..0x3000].fill(0x55);
        write_boot_params(&mut m, 0x20_0000 - 0x1000, "console=hvc0 quiet").unwrap();
        let s = m.as_slice();
        assert_eq!(s[0x1e8], 1);
        assert_eq!(m.read_u64(0x2d0).unwrap(), 0);
        assert_eq!(m.read_u64(0x2d8).unwrap(), 0x1F_F000);
        assert_eq!(m.read_u32(0x2e0).unwrap(), 1);
        assert_eq!(m.read_u16(0x206).unwrap(), 0x207);
        assert_eq!(s[0x211], 0x40);
        assert_eq!(s[0x210], 0xFF);
        assert_eq!(m.read_u32(0x228).unwrap(), 0x1000);
        assert_eq!(m.read_u32(0x23c).unwrap(), 1);
        // Everything else in the page is zero.
        let set = [
            0x1e8, 0x206, 0x207, 0x210, 0x211, 0x229, 0x23c, 0x2d9, 0x2da, 0x2e0,
        ];
        for (i, &b) in s[..0x1000].iter().enumerate() {
            if !set.contains(&i) {
                assert_eq!(b, 0, "offset {i:#x}");
            }
        }
        assert_eq!(m.read_cstr(0x1000, 4096).unwrap(), "console=hvc0 quiet");
        assert_eq!(s[0x1000 + 18], 0);
    }

    #[test]
    fn boot_params_long_cmdline_and_small_memory() {
        let mut m = VecMemory::new(0x3000);
        let long = "x".repeat(5000);
        write_boot_params(&mut m, 0x3000, &long).unwrap();
        assert_eq!(m.read_cstr(0x1000, 8192).unwrap().len(), 4095);
        assert_eq!(m.read_u8(0x1fff).unwrap(), 0);
        let mut tiny = VecMemory::new(0x1000);
        assert!(write_boot_params(&mut tiny, 0x1000, "a").is_err());
    }
}
