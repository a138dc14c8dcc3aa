//! Loading a Linux bzImage as an lguest guest (Linux boot protocol ≥ 2.07,
//! `Documentation/x86/boot.txt`), the way lguest's launcher did
//! (`load_bzimage`, `load_initrd` and `main` in
//! `Documentation/virtual/lguest/lguest.c`, later `tools/lguest/lguest.c`).
//!
//! - [`ImageKind::detect`]: ELF or bzImage, by content.
//! - [`parse`]: the setup header of a bzImage, validated (boot sector
//!   signature, `"HdrS"`, protocol ≥ 2.07, sizes inside the file).
//! - [`load`]: the protected-mode code at guest-physical 0x100000, the zero
//!   page (`boot_params`) at 0, the command line at 0x1000 and the initrd
//!   at the top of guest RAM; returns the entry point (`code32_start`) and
//!   where everything went ([`Entry`]).
//!
//! Guest-physical layout, as lguest's launcher laid it out:
//!
//! | Range | Contents |
//! |---|---|
//! | `[0, 0x1000)` | `boot_params`: the image's setup header, then the launcher's fields |
//! | `[0x1000, 0x2000)` | the command line, NUL-terminated |
//! | `[0x100000, +syssize·16)` | the protected-mode code (file from `(setup_sects + 1) · 512`) |
//! | `[pref_address, +init_size)` | where the kernel decompresses itself (protocol ≥ 2.10; 16–24 MiB for the kit's 3.10 kernel) |
//! | `[top − round_up(len, 4 KiB), top)` | the initrd, `top` = guest RAM rounded down to a page |
//!
//! Where this differs from lguest's launcher (which zeroed `boot_params` and
//! set a handful of fields): the image's setup header is copied into the
//! zero page first, as the boot protocol asks of every 32-bit loader, so
//! `hdr.version` is the kernel's own (≥ 2.07; lguest wrote 0x207) and
//! `kernel_alignment`, `init_size`, `cmdline_size`… are the kernel's (lguest
//! wrote 16 MiB to `kernel_alignment`, which for a kernel whose
//! `pref_address` is 16 MiB decompresses it to the same place);
//! `ramdisk_size` is the initrd's exact length (lguest gave it rounded up to
//! a page; the tail was zeroes, as it is here). Nothing is written to guest
//! memory unless the whole layout validates.
//!
//! Every value read from the image is untrusted: out-of-range sizes and
//! offsets are errors, never panics or overflows.

// Image-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use core::fmt;

use guest_abi::boot::{
    BOOT_FLAG, BOOT_PARAMS_ADDR, BOOT_PARAMS_SIZE, BP_HDR, BP_HDR_BOOT_FLAG, BP_HDR_CMD_LINE_PTR,
    BP_HDR_CMDLINE_SIZE, BP_HDR_CODE32_START, BP_HDR_EXT_LOADER_TYPE, BP_HDR_EXT_LOADER_VER,
    BP_HDR_HARDWARE_SUBARCH, BP_HDR_HARDWARE_SUBARCH_DATA, BP_HDR_HEADER, BP_HDR_HEAP_END_PTR,
    BP_HDR_INIT_SIZE, BP_HDR_INITRD_ADDR_MAX, BP_HDR_JUMP, BP_HDR_KERNEL_ALIGNMENT,
    BP_HDR_LOADFLAGS, BP_HDR_PAYLOAD_LENGTH, BP_HDR_PAYLOAD_OFFSET, BP_HDR_PREF_ADDRESS,
    BP_HDR_RAMDISK_IMAGE, BP_HDR_RAMDISK_SIZE, BP_HDR_RELOCATABLE_KERNEL, BP_HDR_ROOM_END,
    BP_HDR_SETUP_DATA, BP_HDR_SETUP_SECTS, BP_HDR_SYSSIZE, BP_HDR_TYPE_OF_LOADER, BP_HDR_VERSION,
    BZIMAGE_LOAD_ADDR, CAN_USE_HEAP, CMDLINE_ADDR, HDRS_MAGIC, KEEP_SEGMENTS, LOADED_HIGH,
    LOADER_TYPE_UNDEFINED, X86_SUBARCH_LGUEST,
};

use super::guestmem::{GuestMemory, MemFault};
use super::loader::{CMDLINE_MAX, RESERVED_LOW_END};

/// Oldest boot protocol accepted: 2.07, the first with `hardware_subarch`
/// (how the kernel learns it is an lguest guest).
pub const MIN_PROTOCOL: u16 = 0x0207;
/// Guest page size (the initrd is placed on a page boundary).
const PAGE: u32 = 4096;
/// The opcode of a short `jmp` (the first byte of `hdr.jump`).
const JMP_SHORT: u8 = 0xEB;

/// What a kernel module is, judged by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Starts with the ELF magic `\x7fELF` (a vmlinux or a Rust test guest;
    /// [`super::loader::load_elf`]).
    Elf,
    /// Has the Linux setup-header magic `"HdrS"` at offset 0x202 ([`parse`]
    /// checks the rest).
    BzImage,
    /// Neither.
    Unknown,
}

impl ImageKind {
    /// Decide by content. A bzImage with an EFI stub starts with `"MZ"`, so
    /// the ELF magic is checked first and the setup header second.
    pub fn detect(bytes: &[u8]) -> Self {
        if bytes.get(..4) == Some(b"\x7fELF".as_slice()) {
            Self::Elf
        } else if read_arr::<4>(bytes, BP_HDR_HEADER) == Some(HDRS_MAGIC) {
            Self::BzImage
        } else {
            Self::Unknown
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Elf => "ELF",
            Self::BzImage => "bzImage",
            Self::Unknown => "neither ELF nor bzImage",
        })
    }
}

/// A boot protocol version (`hdr.version`), shown as Linux writes it:
/// 0x020c is "2.12".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Protocol(pub u16);

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 >> 8, self.0 & 0xff)
    }
}

/// A guest-physical range `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u32,
    /// Length in bytes.
    pub len: u32,
}

impl Region {
    /// One past the last byte (a `u64`: never wraps).
    pub fn end(&self) -> u64 {
        u64::from(self.start).saturating_add(u64::from(self.len))
    }

    /// Whether the two ranges share a byte (empty ranges share none).
    pub fn overlaps(&self, other: &Region) -> bool {
        self.len != 0
            && other.len != 0
            && u64::from(self.start) < other.end()
            && u64::from(other.start) < self.end()
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end())
    }
}

/// What the initrd would have collided with ([`BzError::InitrdDoesNotFit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitrdClash {
    /// Bigger than guest RAM (or its page-rounded length overflows).
    Ram,
    /// Its last byte would be above the kernel's `initrd_addr_max`.
    AddrMax(u32),
    /// It would overlap the `boot_params` / command-line pages.
    BootPages,
    /// It would overlap the protected-mode code at 1 MiB.
    Payload(Region),
    /// It would overlap where the kernel decompresses itself.
    Kernel(Region),
}

/// Why a bzImage can't be parsed or loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BzError {
    /// Too short to hold a Linux setup header at all.
    TooShort {
        /// Length of the file.
        len: usize,
    },
    /// No boot-sector signature 0xAA55 at offset 0x1fe.
    NoBootFlag {
        /// What is there instead.
        found: u16,
    },
    /// No `"HdrS"` at offset 0x202.
    NoHeaderMagic {
        /// What is there instead.
        found: [u8; 4],
    },
    /// Boot protocol older than [`MIN_PROTOCOL`].
    ProtocolTooOld {
        /// The image's `hdr.version`.
        found: u16,
    },
    /// `hdr.jump` isn't a short `jmp`, so the header's end is unknown.
    NoHeaderJump {
        /// The byte at 0x200.
        found: u8,
    },
    /// The header's end (`0x202` + the byte at 0x201) is too short for the
    /// fields its protocol version promises, or runs past its room in the
    /// zero page (0x290).
    BadHeaderEnd {
        /// `0x202 + disp8`.
        end: u32,
        /// The image's `hdr.version`.
        version: u16,
    },
    /// A zImage (`loadflags` bit 0, `LOADED_HIGH`, clear): its code would
    /// go at 64 KiB; only bzImages are supported.
    NotLoadedHigh {
        /// The image's `hdr.loadflags`.
        loadflags: u8,
    },
    /// The file ends before `what` does.
    Truncated {
        /// The part that is cut short.
        what: &'static str,
        /// Bytes the file needs.
        need: u64,
        /// Bytes it has.
        have: usize,
    },
    /// The protected-mode code is longer than any guest memory (4 GiB).
    TooLarge {
        /// Its length in bytes.
        len: u64,
    },
    /// `payload_offset`/`payload_length` (protocol 2.08+) point outside the
    /// protected-mode code.
    CompressedPayloadOutside {
        /// `hdr.payload_offset`.
        offset: u32,
        /// `hdr.payload_length`.
        length: u32,
        /// Length of the protected-mode code.
        pm_len: u32,
    },
    /// `code32_start` is not inside the protected-mode code as loaded at
    /// 1 MiB.
    BadEntry {
        /// `hdr.code32_start`.
        code32_start: u32,
        /// Where the code would be.
        payload: Region,
    },
    /// `ram_bytes` is larger than the guest memory written through.
    RamBeyondMemory {
        /// RAM size asked for.
        ram: u32,
        /// `GuestMemory::limit()`.
        limit: u32,
    },
    /// The protected-mode code doesn't fit in guest RAM at 1 MiB.
    PayloadDoesNotFit {
        /// Where it would go (its length may be the image's claim).
        payload: Region,
        /// Guest RAM size.
        ram: u32,
    },
    /// Where the kernel decompresses itself (`pref_address`, `init_size`)
    /// is not inside guest RAM above the boot pages.
    KernelDoesNotFit {
        /// `[start, start + init_size)` (`start` saturated at `u32::MAX`).
        kernel: Region,
        /// Guest RAM size.
        ram: u32,
    },
    /// The command line is longer than the kernel accepts (`cmdline_size`)
    /// or than its page holds.
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The most accepted.
        max: u32,
    },
    /// The command line contains a NUL byte (the kernel would stop there).
    CmdlineHasNul,
    /// The initrd can't be placed at the top of guest RAM.
    InitrdDoesNotFit {
        /// Its length in bytes.
        len: usize,
        /// Guest RAM size.
        ram: u32,
        /// Where it would have gone (`None` if it can't go anywhere).
        at: Option<Region>,
        /// What it runs into.
        clash: InitrdClash,
    },
    /// A guest-memory write failed (can't happen after validation).
    Memory(MemFault),
}

impl fmt::Display for BzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { len } => write!(
                f,
                "not a bzImage: {len} bytes, too short for a Linux setup header \
                 (boot signature 0xAA55 at 0x1fe, \"HdrS\" at 0x202, version at 0x206)"
            ),
            Self::NoBootFlag { found } => write!(
                f,
                "not a bzImage: expected the boot sector signature 0xaa55 at offset 0x1fe, \
                 found {found:#06x}"
            ),
            Self::NoHeaderMagic {
                found: [a, b, c, d],
            } => write!(
                f,
                "not a bzImage: expected the setup header magic \"HdrS\" at offset 0x202, \
                 found {a:02x} {b:02x} {c:02x} {d:02x}"
            ),
            Self::ProtocolTooOld { found } => write!(
                f,
                "Linux boot protocol {} is too old: at least {} is needed \
                 (hardware_subarch, to boot as an lguest guest; Linux 2.6.24 or later)",
                Protocol(*found),
                Protocol(MIN_PROTOCOL)
            ),
            Self::NoHeaderJump { found } => write!(
                f,
                "bad bzImage: expected a short jmp (0xeb) at offset 0x200, found {found:#04x}"
            ),
            Self::BadHeaderEnd { end, version } => write!(
                f,
                "bad bzImage: the setup header ends at {end:#x}, which does not fit \
                 boot protocol {} (or runs past {BP_HDR_ROOM_END:#x})",
                Protocol(*version)
            ),
            Self::NotLoadedHigh { loadflags } => write!(
                f,
                "a zImage, not a bzImage (loadflags {loadflags:#04x}, LOADED_HIGH clear): \
                 only kernels loaded at 1 MiB are supported"
            ),
            Self::Truncated { what, need, have } => write!(
                f,
                "truncated bzImage: the {what} needs {need} bytes of file, it has {have}"
            ),
            Self::TooLarge { len } => write!(
                f,
                "bzImage too large: {len} bytes of protected-mode code, more than any guest memory"
            ),
            Self::CompressedPayloadOutside {
                offset,
                length,
                pm_len,
            } => write!(
                f,
                "bad bzImage: the compressed kernel (payload_offset {offset:#x}, \
                 payload_length {length:#x}) lies outside the {pm_len}-byte protected-mode code"
            ),
            Self::BadEntry {
                code32_start,
                payload,
            } => write!(
                f,
                "bad bzImage: code32_start {code32_start:#x} is outside the \
                 protected-mode code at {payload}"
            ),
            Self::RamBeyondMemory { ram, limit } => write!(
                f,
                "guest RAM of {ram:#x} bytes is larger than guest memory ({limit:#x})"
            ),
            Self::PayloadDoesNotFit { payload, ram } => write!(
                f,
                "the kernel's protected-mode code {payload} does not fit in guest RAM \
                 of {ram:#x} bytes"
            ),
            Self::KernelDoesNotFit { kernel, ram } => write!(
                f,
                "the kernel decompresses itself to {kernel} (pref_address, init_size), \
                 outside guest RAM [{RESERVED_LOW_END:#x}, {ram:#x}): give it more memory"
            ),
            Self::CmdlineTooLong { len, max } => write!(
                f,
                "the kernel command line is {len} bytes, the kernel accepts at most {max}"
            ),
            Self::CmdlineHasNul => write!(f, "the kernel command line contains a NUL byte"),
            Self::InitrdDoesNotFit {
                len,
                ram,
                at,
                clash,
            } => {
                write!(
                    f,
                    "the initrd ({len} bytes) does not fit at the top of guest RAM ({ram:#x} bytes)"
                )?;
                if let Some(at) = at {
                    write!(f, ": at {at}")?;
                }
                match clash {
                    InitrdClash::Ram => write!(f, ": larger than guest RAM"),
                    InitrdClash::AddrMax(max) => {
                        write!(
                            f,
                            " it would end above the kernel's initrd_addr_max {max:#x}"
                        )
                    }
                    InitrdClash::BootPages => write!(
                        f,
                        " it would overlap the boot pages [0, {RESERVED_LOW_END:#x})"
                    ),
                    InitrdClash::Payload(r) => {
                        write!(
                            f,
                            " it would overlap the kernel's protected-mode code at {r}"
                        )
                    }
                    InitrdClash::Kernel(r) => write!(
                        f,
                        " it would overlap {r}, where the kernel decompresses itself"
                    ),
                }
            }
            Self::Memory(m) => write!(f, "{m}"),
        }
    }
}

impl From<MemFault> for BzError {
    fn from(m: MemFault) -> Self {
        Self::Memory(m)
    }
}

/// The compressed kernel inside the protected-mode code (protocol 2.08+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedPayload {
    /// Offset from the start of the protected-mode code.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
}

/// A parsed, validated bzImage setup header. It records offsets into the
/// image, not the bytes: [`load`] takes the image again (and checks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImage {
    /// `hdr.version` (≥ [`MIN_PROTOCOL`]).
    pub version: Protocol,
    /// Setup sectors after the boot sector (`hdr.setup_sects`, 0 meaning 4).
    pub setup_sects: u8,
    /// File offset of the protected-mode code: `(setup_sects + 1) * 512`.
    pub pm_offset: u32,
    /// Length of the protected-mode code: `syssize * 16` (the rest of the
    /// file if `syssize` is 0).
    pub pm_len: u32,
    /// End of the setup header in the file (`0x202` + the byte at 0x201):
    /// `[0x1f1, header_end)` is copied into `boot_params`.
    pub header_end: u32,
    /// `hdr.code32_start`: the entry point (protected mode, guest-physical).
    pub code32_start: u32,
    /// `hdr.loadflags` as in the file.
    pub loadflags: u8,
    /// `hdr.kernel_alignment`.
    pub kernel_alignment: u32,
    /// `hdr.relocatable_kernel` is non-zero.
    pub relocatable: bool,
    /// `hdr.cmdline_size`: longest command line, without the NUL.
    pub cmdline_size: u32,
    /// `hdr.initrd_addr_max`: highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    /// `payload_offset` / `payload_length` (protocol 2.08+).
    pub payload: Option<CompressedPayload>,
    /// `hdr.pref_address` (protocol 2.10+).
    pub pref_address: Option<u64>,
    /// `hdr.init_size` (protocol 2.10+): memory the kernel needs from where
    /// it runs while it starts.
    pub init_size: Option<u32>,
}

impl BzImage {
    /// Whether the kernel reads `hardware_subarch` (protocol 2.07+: always,
    /// for a parsed image).
    pub fn supports_subarch(&self) -> bool {
        self.version.0 >= MIN_PROTOCOL
    }

    /// Where the protected-mode code is loaded: `[0x100000, +pm_len)`.
    pub fn payload_region(&self) -> Region {
        Region {
            start: BZIMAGE_LOAD_ADDR,
            len: self.pm_len,
        }
    }

    /// Where the kernel will decompress and run itself, `[start, start +
    /// init_size)`, if the header says (protocol 2.10+). A relocatable
    /// kernel's decompressor runs at the load address rounded up to
    /// `kernel_alignment`, but never below `LOAD_PHYSICAL_ADDR`
    /// (`pref_address`); a fixed one at `pref_address`. `start` saturates at
    /// `u32::MAX` (beyond any guest memory).
    pub fn kernel_region(&self) -> Option<Region> {
        let (pref, size) = (self.pref_address?, self.init_size?);
        let pref = u32::try_from(pref).unwrap_or(u32::MAX);
        let a = self.kernel_alignment;
        let start = if self.relocatable && a.is_power_of_two() {
            // a is a power of two: a - 1 doesn't wrap.
            let mask = a.wrapping_sub(1);
            let up = BZIMAGE_LOAD_ADDR.checked_add(mask).map(|v| v & !mask);
            up.unwrap_or(u32::MAX).max(pref)
        } else {
            pref
        };
        Some(Region { start, len: size })
    }
}

/// `N` bytes of `image` at `off`, if all there.
fn read_arr<const N: usize>(image: &[u8], off: u32) -> Option<[u8; N]> {
    let start = usize::try_from(off).ok()?;
    let bytes = image.get(start..start.checked_add(N)?)?;
    bytes.try_into().ok()
}

/// The setup header of one image, read field by field: a field must lie
/// inside both the file and the header (`[.., end)`).
struct Hdr<'a> {
    image: &'a [u8],
    end: u32,
}

impl Hdr<'_> {
    fn arr<const N: usize>(&self, off: u32) -> Result<[u8; N], BzError> {
        // N ≤ 8 and off < 0x290: no overflow.
        let need = off.wrapping_add(N as u32);
        if need > self.end {
            // `parse` checks `end` against the version first; a field past
            // it is a header that lies about its size.
            return Err(BzError::Truncated {
                what: "setup header",
                need: u64::from(need),
                have: usize::try_from(self.end).unwrap_or(usize::MAX),
            });
        }
        read_arr::<N>(self.image, off).ok_or(BzError::Truncated {
            what: "setup header",
            need: u64::from(need),
            have: self.image.len(),
        })
    }
    fn u8(&self, off: u32) -> Result<u8, BzError> {
        self.arr::<1>(off).map(|[b]| b)
    }
    fn u32(&self, off: u32) -> Result<u32, BzError> {
        self.arr(off).map(u32::from_le_bytes)
    }
    fn u64(&self, off: u32) -> Result<u64, BzError> {
        self.arr(off).map(u64::from_le_bytes)
    }
}

/// Where the setup header must end at least, for a protocol version: the
/// last field each version added (boot.txt's field table).
fn min_header_end(version: u16) -> u32 {
    match version {
        ..=0x0207 => BP_HDR_HARDWARE_SUBARCH_DATA + 8,
        0x0208 => BP_HDR_PAYLOAD_LENGTH + 4,
        0x0209 => BP_HDR_SETUP_DATA + 8,
        0x020a => BP_HDR_INIT_SIZE + 4,
        // 2.11 added handover_offset (0x264); later versions use the room
        // that was already there or go beyond it.
        _ => BP_HDR_INIT_SIZE + 8,
    }
}

/// Recognise and validate a bzImage.
pub fn parse(image: &[u8]) -> Result<BzImage, BzError> {
    let too_short = BzError::TooShort { len: image.len() };
    let flag = read_arr::<2>(image, BP_HDR_BOOT_FLAG).ok_or(too_short.clone())?;
    let magic = read_arr::<4>(image, BP_HDR_HEADER).ok_or(too_short.clone())?;
    let version = read_arr::<2>(image, BP_HDR_VERSION).ok_or(too_short)?;
    let flag = u16::from_le_bytes(flag);
    if flag != BOOT_FLAG {
        return Err(BzError::NoBootFlag { found: flag });
    }
    if magic != HDRS_MAGIC {
        return Err(BzError::NoHeaderMagic { found: magic });
    }
    let version = u16::from_le_bytes(version);
    if version < MIN_PROTOCOL {
        return Err(BzError::ProtocolTooOld { found: version });
    }
    // The header's end, from the short jump over it.
    let [op, disp] = read_arr::<2>(image, BP_HDR_JUMP).unwrap_or_default();
    if op != JMP_SHORT {
        return Err(BzError::NoHeaderJump { found: op });
    }
    // 0x202 + a byte: no overflow.
    let end = (BP_HDR_JUMP + 2).wrapping_add(u32::from(disp));
    if end < min_header_end(version) || end > BP_HDR_ROOM_END {
        return Err(BzError::BadHeaderEnd { end, version });
    }
    if image.len() < end as usize {
        return Err(BzError::Truncated {
            what: "setup header",
            need: u64::from(end),
            have: image.len(),
        });
    }
    let hdr = Hdr { image, end };

    let loadflags = hdr.u8(BP_HDR_LOADFLAGS)?;
    if loadflags & LOADED_HIGH == 0 {
        return Err(BzError::NotLoadedHigh { loadflags });
    }
    let setup_sects = match hdr.u8(BP_HDR_SETUP_SECTS)? {
        0 => 4,
        n => n,
    };
    // (≤ 255 + 1) · 512: no overflow.
    let pm_offset = u32::from(setup_sects).wrapping_add(1).wrapping_mul(512);
    let pm_start = pm_offset as usize;
    let avail = image
        .len()
        .checked_sub(pm_start)
        .filter(|&n| n > 0)
        .ok_or(BzError::Truncated {
            what: "setup code and protected-mode code",
            need: u64::from(pm_offset).saturating_add(1),
            have: image.len(),
        })?;
    let syssize = hdr.u32(BP_HDR_SYSSIZE)?;
    let pm_len = if syssize == 0 {
        // No size recorded: the rest of the file, as lguest loaded it.
        u64::try_from(avail).unwrap_or(u64::MAX)
    } else {
        let need = u64::from(syssize).saturating_mul(16);
        if u64::try_from(avail).unwrap_or(u64::MAX) < need {
            return Err(BzError::Truncated {
                what: "protected-mode code (syssize)",
                need: u64::from(pm_offset).saturating_add(need),
                have: image.len(),
            });
        }
        need
    };
    let pm_len = u32::try_from(pm_len).map_err(|_| BzError::TooLarge { len: pm_len })?;

    let payload = if version >= 0x0208 {
        let offset = hdr.u32(BP_HDR_PAYLOAD_OFFSET)?;
        let length = hdr.u32(BP_HDR_PAYLOAD_LENGTH)?;
        if u64::from(offset).saturating_add(u64::from(length)) > u64::from(pm_len) {
            return Err(BzError::CompressedPayloadOutside {
                offset,
                length,
                pm_len,
            });
        }
        Some(CompressedPayload { offset, length })
    } else {
        None
    };
    let (pref_address, init_size) = if version >= 0x020a {
        (
            Some(hdr.u64(BP_HDR_PREF_ADDRESS)?),
            Some(hdr.u32(BP_HDR_INIT_SIZE)?),
        )
    } else {
        (None, None)
    };

    let bz = BzImage {
        version: Protocol(version),
        setup_sects,
        pm_offset,
        pm_len,
        header_end: end,
        code32_start: hdr.u32(BP_HDR_CODE32_START)?,
        loadflags,
        kernel_alignment: hdr.u32(BP_HDR_KERNEL_ALIGNMENT)?,
        relocatable: hdr.u8(BP_HDR_RELOCATABLE_KERNEL)? != 0,
        cmdline_size: hdr.u32(BP_HDR_CMDLINE_SIZE)?,
        initrd_addr_max: hdr.u32(BP_HDR_INITRD_ADDR_MAX)?,
        payload,
        pref_address,
        init_size,
    };
    let code = bz.payload_region();
    if !(u64::from(code.start)..code.end()).contains(&u64::from(bz.code32_start)) {
        return Err(BzError::BadEntry {
            code32_start: bz.code32_start,
            payload: code,
        });
    }
    Ok(bz)
}

/// Where [`load`] put everything, and where to start the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Guest-physical entry point: `code32_start` (`esi` = `boot_params` = 0).
    pub entry: u32,
    /// The zero page.
    pub boot_params: Region,
    /// The command line, with its NUL.
    pub cmdline: Region,
    /// The protected-mode code.
    pub payload: Region,
    /// Where the kernel will decompress itself (protocol 2.10+), kept free.
    pub kernel: Option<Region>,
    /// The initrd (its exact length; the rest of its last page is zero).
    pub initrd: Option<Region>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "entry {:#x}, boot_params {}, cmdline {}, code {}",
            self.entry, self.boot_params, self.cmdline, self.payload
        )?;
        if let Some(k) = self.kernel {
            write!(f, ", kernel runs at {k}")?;
        }
        match self.initrd {
            Some(i) => write!(f, ", initrd {} ({} bytes)", i, i.len),
            None => write!(f, ", no initrd"),
        }
    }
}

/// Place the initrd of `len` bytes at the top of RAM, page-aligned down
/// (lguest: `mem - round_up(len, page)`), away from everything else.
fn place_initrd(
    bz: &BzImage,
    len: usize,
    ram: u32,
    kernel: Option<Region>,
) -> Result<Region, BzError> {
    let err = |at, clash| BzError::InitrdDoesNotFit {
        len,
        ram,
        at,
        clash,
    };
    let top = ram & !(PAGE - 1);
    let len32 = u32::try_from(len).map_err(|_| err(None, InitrdClash::Ram))?;
    let rounded = len32
        .checked_add(PAGE - 1)
        .map(|v| v & !(PAGE - 1))
        .ok_or(err(None, InitrdClash::Ram))?;
    let start = top
        .checked_sub(rounded)
        .ok_or(err(None, InitrdClash::Ram))?;
    let at = Region { start, len: len32 };
    // Non-empty: `start + len - 1` doesn't wrap (it is < top).
    let last = start.wrapping_add(len32.wrapping_sub(1));
    if last > bz.initrd_addr_max {
        return Err(err(Some(at), InitrdClash::AddrMax(bz.initrd_addr_max)));
    }
    let payload = bz.payload_region();
    if at.overlaps(&payload) {
        return Err(err(Some(at), InitrdClash::Payload(payload)));
    }
    if let Some(k) = kernel.filter(|k| at.overlaps(k)) {
        return Err(err(Some(at), InitrdClash::Kernel(k)));
    }
    let boot = Region {
        start: 0,
        len: RESERVED_LOW_END,
    };
    if at.overlaps(&boot) {
        return Err(err(Some(at), InitrdClash::BootPages));
    }
    Ok(at)
}

/// Load a parsed bzImage into guest memory as lguest's launcher did, and
/// return its entry point and layout.
///
/// Guest RAM is `[0, ram_bytes)` (the e820 map's one entry; the memory may
/// extend beyond it, e.g. with the lguest device pages). Writes, after
/// validating all of it: the protected-mode code at 0x100000; the zero page
/// at 0 (zeroed, the image's setup header `[0x1f1, header_end)` copied in,
/// then `type_of_loader` 0xFF, `loadflags` `|= KEEP_SEGMENTS` with
/// `CAN_USE_HEAP` cleared (no real-mode code runs, so no heap),
/// `hardware_subarch` 1 (lguest), `cmd_line_ptr` 0x1000, the initrd's
/// `ramdisk_image`/`ramdisk_size` (0 without one), and the loader-owned
/// `heap_end_ptr`, `ext_loader_*`, `setup_data` and `hardware_subarch_data`
/// zeroed); the command line and its NUL at 0x1000 (the rest of that page
/// zeroed); the initrd at the top of RAM, page-aligned down (the rest of
/// its last page zeroed). An empty initrd is no initrd.
pub fn load(
    bz: &BzImage,
    image: &[u8],
    mem: &mut impl GuestMemory,
    ram_bytes: u32,
    cmdline: &str,
    initrd: Option<&[u8]>,
) -> Result<Entry, BzError> {
    // --- Validate everything. ---
    let limit = mem.limit();
    if ram_bytes > limit {
        return Err(BzError::RamBeyondMemory {
            ram: ram_bytes,
            limit,
        });
    }
    // `bz` is plain data: re-check what keeps the header inside its room.
    if !(min_header_end(bz.version.0)..=BP_HDR_ROOM_END).contains(&bz.header_end) {
        return Err(BzError::BadHeaderEnd {
            end: bz.header_end,
            version: bz.version.0,
        });
    }
    let header = image
        .get(BP_HDR as usize..bz.header_end as usize)
        .ok_or(BzError::Truncated {
            what: "setup header",
            need: u64::from(bz.header_end),
            have: image.len(),
        })?;
    let code_end = u64::from(bz.pm_offset).saturating_add(u64::from(bz.pm_len));
    let code = usize::try_from(code_end)
        .ok()
        .and_then(|end| image.get(bz.pm_offset as usize..end))
        .ok_or(BzError::Truncated {
            what: "protected-mode code",
            need: code_end,
            have: image.len(),
        })?;
    let payload = bz.payload_region();
    if payload.end() > u64::from(ram_bytes) {
        return Err(BzError::PayloadDoesNotFit {
            payload,
            ram: ram_bytes,
        });
    }
    let kernel = bz.kernel_region();
    if let Some(k) = kernel
        && (k.end() > u64::from(ram_bytes) || k.start < RESERVED_LOW_END)
    {
        return Err(BzError::KernelDoesNotFit {
            kernel: k,
            ram: ram_bytes,
        });
    }
    let text = cmdline.as_bytes();
    let max = bz.cmdline_size.min(CMDLINE_MAX as u32);
    if text.len() > max as usize {
        return Err(BzError::CmdlineTooLong {
            len: text.len(),
            max,
        });
    }
    if text.contains(&0) {
        return Err(BzError::CmdlineHasNul);
    }
    // ≤ CMDLINE_MAX + 1 = one page.
    let cmd = Region {
        start: CMDLINE_ADDR,
        len: (text.len() as u32).wrapping_add(1),
    };
    let initrd = initrd.filter(|d| !d.is_empty());
    let initrd_at = match initrd {
        Some(d) => Some(place_initrd(bz, d.len(), ram_bytes, kernel)?),
        None => None,
    };

    // --- Write. ---
    mem.write(payload.start, code)?;

    let bp = BOOT_PARAMS_ADDR;
    mem.zero(bp, BOOT_PARAMS_SIZE)?;
    mem.write(bp + BP_HDR, header)?;
    mem.write_u8(bp + BP_HDR_TYPE_OF_LOADER, LOADER_TYPE_UNDEFINED)?;
    let flags = (bz.loadflags | KEEP_SEGMENTS) & !CAN_USE_HEAP;
    mem.write_u8(bp + BP_HDR_LOADFLAGS, flags)?;
    mem.write_u16(bp + BP_HDR_HEAP_END_PTR, 0)?;
    mem.write_u8(bp + BP_HDR_EXT_LOADER_VER, 0)?;
    mem.write_u8(bp + BP_HDR_EXT_LOADER_TYPE, 0)?;
    mem.write_u32(bp + BP_HDR_CMD_LINE_PTR, CMDLINE_ADDR)?;
    mem.write_u32(bp + BP_HDR_HARDWARE_SUBARCH, X86_SUBARCH_LGUEST)?;
    mem.write_u64(bp + BP_HDR_HARDWARE_SUBARCH_DATA, 0)?;
    mem.write_u64(bp + BP_HDR_SETUP_DATA, 0)?;
    let (rd_start, rd_len) = initrd_at.map_or((0, 0), |r| (r.start, r.len));
    mem.write_u32(bp + BP_HDR_RAMDISK_IMAGE, rd_start)?;
    mem.write_u32(bp + BP_HDR_RAMDISK_SIZE, rd_len)?;
    super::loader::write_ram_e820(mem, ram_bytes)?;

    mem.zero(CMDLINE_ADDR, PAGE)?;
    mem.write(CMDLINE_ADDR, text)?;
    // Inside the page: text.len() ≤ CMDLINE_MAX.
    mem.write_u8(CMDLINE_ADDR.wrapping_add(text.len() as u32), 0)?;

    if let (Some(d), Some(at)) = (initrd, initrd_at) {
        mem.write(at.start, d)?;
        // at.end() ≤ top ≤ ram ≤ u32::MAX; the pad runs to the next page
        // boundary, which is ≤ top.
        let end = at.end() as u32;
        let pad = end.wrapping_neg() & (PAGE - 1);
        mem.zero(end, pad)?;
    }

    Ok(Entry {
        entry: bz.code32_start,
        boot_params: Region {
            start: bp,
            len: BOOT_PARAMS_SIZE,
        },
        cmdline: cmd,
        payload,
        kernel,
        initrd: initrd_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use crate::testutil::Rng;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;
    use guest_abi::boot::{BootE820Entry, E820_RAM};

    extern crate alloc;

    const MIB: u32 = 1 << 20;

    fn put(img: &mut [u8], off: u32, bytes: &[u8]) {
        img[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    }

    /// A synthetic protocol-2.12 bzImage: `setup_sects` as given (0 means
    /// 4), `pm_len` bytes of protected-mode code (a byte pattern), the
    /// kernel running at 4 MiB with `init_size` 1 MiB.
    fn synth(setup_sects: u8, pm_len: u32) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { setup_sects };
        let pm_off = (u32::from(sects) + 1) * 512;
        let mut img = vec![0u8; (pm_off + pm_len) as usize];
        img[0x1f1] = setup_sects;
        put(&mut img, 0x1f4, &pm_len.div_ceil(16).to_le_bytes());
        put(&mut img, 0x1fa, &0xffffu16.to_le_bytes()); // vid_mode
        put(&mut img, 0x1fe, &[0x55, 0xaa]);
        put(&mut img, 0x200, &[0xeb, 0x66]);
        put(&mut img, 0x202, b"HdrS");
        put(&mut img, 0x206, &0x020cu16.to_le_bytes());
        img[0x211] = LOADED_HIGH;
        put(&mut img, 0x214, &0x10_0000u32.to_le_bytes());
        put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes());
        put(&mut img, 0x230, &0x20_0000u32.to_le_bytes());
        img[0x234] = 1;
        put(&mut img, 0x238, &0x7ffu32.to_le_bytes());
        put(&mut img, 0x248, &0x10u32.to_le_bytes());
        put(&mut img, 0x24c, &(pm_len - 0x20).to_le_bytes());
        put(&mut img, 0x258, &0x40_0000u64.to_le_bytes());
        put(&mut img, 0x260, &MIB.to_le_bytes());
        // Setup code after the header, so copying stops at 0x268.
        img[0x268..pm_off as usize].fill(0xCC);
        for (i, b) in img[pm_off as usize..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        img
    }

    fn set_u32(img: &mut [u8], off: u32, v: u32) {
        put(img, off, &v.to_le_bytes());
    }

    const PM: u32 = 0x3000;

    fn good() -> Vec<u8> {
        synth(2, PM)
    }

    #[test]
    fn parses_synthetic_header() {
        let bz = parse(&good()).unwrap();
        assert_eq!(
            bz,
            BzImage {
                version: Protocol(0x20c),
                setup_sects: 2,
                pm_offset: 0x600,
                pm_len: PM,
                header_end: 0x268,
                code32_start: 0x10_0000,
                loadflags: LOADED_HIGH,
                kernel_alignment: 0x20_0000,
                relocatable: true,
                cmdline_size: 0x7ff,
                initrd_addr_max: 0x7fff_ffff,
                payload: Some(CompressedPayload {
                    offset: 0x10,
                    length: PM - 0x20
                }),
                pref_address: Some(0x40_0000),
                init_size: Some(MIB),
            }
        );
        assert!(bz.supports_subarch());
        assert_eq!(
            bz.kernel_region(),
            Some(Region {
                start: 0x40_0000,
                len: MIB
            })
        );
        assert_eq!(bz.payload_region().to_string(), "[0x100000, 0x103000)");
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let img = synth(0, PM);
        let bz = parse(&img).unwrap();
        assert_eq!(bz.setup_sects, 4);
        assert_eq!(bz.pm_offset, 5 * 512);
        assert_eq!(bz.pm_len, PM);
        let mut m = VecMemory::new(8 * MIB);
        load(&bz, &img, &mut m, 8 * MIB, "", None).unwrap();
        assert_eq!(&m.as_slice()[0x10_0000..0x10_3000], &img[0xa00..]);
    }

    #[test]
    fn older_protocols_have_fewer_fields() {
        // 2.07: no payload_offset, no pref_address / init_size.
        let mut img = good();
        put(&mut img, 0x206, &0x0207u16.to_le_bytes());
        let bz = parse(&img).unwrap();
        assert_eq!(bz.payload, None);
        assert_eq!((bz.pref_address, bz.init_size), (None, None));
        assert_eq!(bz.kernel_region(), None);
        // A 2.07 header may end right after hardware_subarch_data.
        img[0x201] = 0x46;
        assert_eq!(parse(&img).unwrap().header_end, 0x248);
        // 2.08 has the payload fields.
        put(&mut img, 0x206, &0x0208u16.to_le_bytes());
        assert!(matches!(
            parse(&img),
            Err(BzError::BadHeaderEnd { end: 0x248, .. })
        ));
        img[0x201] = 0x4e;
        assert!(parse(&img).unwrap().payload.is_some());
        // A non-relocatable kernel runs at pref_address, whatever the alignment.
        let mut img = good();
        img[0x234] = 0;
        set_u32(&mut img, 0x258, 0x30_0000);
        assert_eq!(
            parse(&img).unwrap().kernel_region().unwrap().start,
            0x30_0000
        );
        // A relocatable one at the load address rounded up, if that's higher.
        let mut img = good();
        set_u32(&mut img, 0x230, 0x80_0000);
        assert_eq!(
            parse(&img).unwrap().kernel_region().unwrap().start,
            0x80_0000
        );
    }

    #[test]
    fn rejects_bad_signature() {
        let mut img = good();
        img[0x1fe] = 0;
        let e = parse(&img).unwrap_err();
        assert_eq!(e, BzError::NoBootFlag { found: 0xaa00 });
        assert_eq!(
            e.to_string(),
            "not a bzImage: expected the boot sector signature 0xaa55 at offset 0x1fe, found 0xaa00"
        );
    }

    #[test]
    fn rejects_missing_hdrs() {
        let mut img = good();
        put(&mut img, 0x202, b"HdrX");
        let e = parse(&img).unwrap_err();
        assert_eq!(e, BzError::NoHeaderMagic { found: *b"HdrX" });
        assert!(
            e.to_string()
                .contains("\"HdrS\" at offset 0x202, found 48 64 72 58")
        );
    }

    #[test]
    fn rejects_protocol_206() {
        let mut img = good();
        put(&mut img, 0x206, &0x0206u16.to_le_bytes());
        let e = parse(&img).unwrap_err();
        assert_eq!(e, BzError::ProtocolTooOld { found: 0x206 });
        let s = e.to_string();
        assert!(
            s.starts_with("Linux boot protocol 2.06 is too old: at least 2.07"),
            "{s}"
        );
    }

    #[test]
    fn rejects_truncated() {
        let img = good();
        for n in [0, 1, 0x1ff, 0x205, 0x207] {
            assert_eq!(
                parse(&img[..n]),
                Err(BzError::TooShort { len: n }),
                "len {n}"
            );
        }
        // Inside the header: its fields are missing.
        for n in [0x208, 0x212, 0x267] {
            assert!(
                matches!(
                    parse(&img[..n]),
                    Err(BzError::Truncated {
                        what: "setup header",
                        ..
                    })
                ),
                "len {n}"
            );
        }
        // Inside the setup code, or right at its end.
        for n in [0x268, 0x5ff, 0x600] {
            assert!(
                matches!(
                    parse(&img[..n]),
                    Err(BzError::Truncated {
                        what: "setup code and protected-mode code",
                        ..
                    })
                ),
                "len {n}"
            );
        }
        // Inside the protected-mode code (syssize says how long it is).
        let e = parse(&img[..img.len() - 1]).unwrap_err();
        assert_eq!(
            e,
            BzError::Truncated {
                what: "protected-mode code (syssize)",
                need: 0x3600,
                have: 0x35ff
            }
        );
        assert_eq!(
            e.to_string(),
            "truncated bzImage: the protected-mode code (syssize) needs 13824 bytes of file, it has 13823"
        );
        // Trailing bytes past syssize are not loaded.
        let mut long = img.clone();
        long.extend_from_slice(&[0xAB; 100]);
        assert_eq!(parse(&long).unwrap().pm_len, PM);
        // syssize 0: the rest of the file (and the compressed kernel must
        // lie inside it).
        let mut img = img;
        set_u32(&mut img, 0x1f4, 0);
        assert!(matches!(
            parse(&img[..0x1000]),
            Err(BzError::CompressedPayloadOutside { .. })
        ));
        set_u32(&mut img, 0x24c, 0x100);
        assert_eq!(parse(&img[..0x1000]).unwrap().pm_len, 0xa00);
    }

    #[test]
    fn rejects_bad_header_layout() {
        let mut img = good();
        img[0x200] = 0xe9;
        assert_eq!(parse(&img), Err(BzError::NoHeaderJump { found: 0xe9 }));
        for disp in [0x40, 0x65, 0x8f] {
            let mut img = good();
            img[0x201] = disp;
            assert_eq!(
                parse(&img),
                Err(BzError::BadHeaderEnd {
                    end: 0x202 + u32::from(disp),
                    version: 0x20c
                }),
                "disp {disp:#x}"
            );
        }
        // Up to 0x290 is fine (later kernels' headers are longer).
        let mut img = good();
        img[0x201] = 0x8e;
        assert_eq!(parse(&img).unwrap().header_end, 0x290);
        // A zImage.
        let mut img = good();
        img[0x211] = 0x80;
        assert_eq!(parse(&img), Err(BzError::NotLoadedHigh { loadflags: 0x80 }));
        // The compressed kernel outside the code.
        let mut img = good();
        set_u32(&mut img, 0x24c, PM - 0xf);
        assert_eq!(
            parse(&img),
            Err(BzError::CompressedPayloadOutside {
                offset: 0x10,
                length: PM - 0xf,
                pm_len: PM
            })
        );
        set_u32(&mut img, 0x248, u32::MAX);
        assert!(matches!(
            parse(&img),
            Err(BzError::CompressedPayloadOutside { .. })
        ));
        // The entry outside the code.
        for entry in [0xF_FFFF, 0x10_0000 + PM, 0] {
            let mut img = good();
            set_u32(&mut img, 0x214, entry);
            assert_eq!(
                parse(&img),
                Err(BzError::BadEntry {
                    code32_start: entry,
                    payload: Region {
                        start: 0x10_0000,
                        len: PM
                    }
                })
            );
        }
    }

    /// `boot_params` offsets the loader sets itself (everything else in
    /// `[0x1f1, 0x268)` is the image's header).
    const SET_BY_LOADER: [u32; 10] = [
        0x210, 0x211, 0x218, 0x21c, 0x224, 0x226, 0x227, 0x228, 0x23c, 0x240,
    ];

    fn owned_by_loader(off: u32) -> bool {
        let width = |o: u32| match o {
            0x210 | 0x211 | 0x226 | 0x227 => 1,
            0x224 => 2,
            0x240 | 0x250 => 8,
            _ => 4,
        };
        SET_BY_LOADER
            .iter()
            .chain(&[0x250])
            .any(|&o| (o..o + width(o)).contains(&off))
    }

    #[test]
    fn loads_synthetic_image() {
        let mut img = good();
        // Fields a loader owns, set in the file: overwritten.
        img[0x211] |= CAN_USE_HEAP;
        put(&mut img, 0x224, &0x1234u16.to_le_bytes());
        put(&mut img, 0x250, &0xdead_beefu64.to_le_bytes());
        set_u32(&mut img, 0x23c, 7);
        let bz = parse(&img).unwrap();
        let ram = 8 * MIB;
        let mut m = VecMemory::new(ram + 0x1000);
        m.as_mut_slice().fill(0xEE);
        let initrd: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let e = load(
            &bz,
            &img,
            &mut m,
            ram,
            "console=hvc0 lgguest",
            Some(&initrd),
        )
        .unwrap();
        let s = m.as_slice();
        assert_eq!(e.entry, 0x10_0000);
        assert_eq!(
            e.payload,
            Region {
                start: 0x10_0000,
                len: PM
            }
        );
        assert_eq!(
            e.cmdline,
            Region {
                start: 0x1000,
                len: 21
            }
        );
        assert_eq!(
            e.kernel,
            Some(Region {
                start: 0x40_0000,
                len: MIB
            })
        );
        // Top of RAM minus two pages.
        let rd = Region {
            start: ram - 0x2000,
            len: 5000,
        };
        assert_eq!(e.initrd, Some(rd));
        assert_eq!(
            e.to_string(),
            "entry 0x100000, boot_params [0x0, 0x1000), cmdline [0x1000, 0x1015), \
             code [0x100000, 0x103000), kernel runs at [0x400000, 0x500000), \
             initrd [0x7fe000, 0x7ff388) (5000 bytes)"
        );

        // The code, byte for byte, and nothing after it.
        assert_eq!(&s[0x10_0000..0x10_3000], &img[0x600..]);
        assert_eq!(s[0x10_3000], 0xEE);
        // boot_params: the image's header, then the loader's fields.
        for off in 0x1f1..0x268u32 {
            if !owned_by_loader(off) {
                assert_eq!(s[off as usize], img[off as usize], "offset {off:#x}");
            }
        }
        assert_eq!(m.read_u16(0x206).unwrap(), 0x20c);
        assert_eq!(s[0x210], 0xFF);
        assert_eq!(s[0x211], LOADED_HIGH | KEEP_SEGMENTS);
        assert_eq!(m.read_u32(0x218).unwrap(), ram - 0x2000);
        assert_eq!(m.read_u32(0x21c).unwrap(), 5000);
        assert_eq!(m.read_u16(0x224).unwrap(), 0);
        assert_eq!(m.read_u32(0x228).unwrap(), 0x1000);
        assert_eq!(m.read_u32(0x23c).unwrap(), X86_SUBARCH_LGUEST);
        assert_eq!(m.read_u64(0x240).unwrap(), 0);
        assert_eq!(m.read_u64(0x250).unwrap(), 0);
        assert_eq!(m.read_u32(0x230).unwrap(), 0x20_0000);
        // e820: one RAM entry.
        assert_eq!(s[0x1e8], 1);
        assert_eq!(
            BootE820Entry::from_bytes(s[0x2d0..0x2e4].try_into().unwrap()),
            BootE820Entry {
                addr: 0,
                size: u64::from(ram),
                type_: E820_RAM
            }
        );
        // The rest of the zero page is zero.
        for off in (0..0x1f1).chain(0x268..0x1000) {
            if off != 0x1e8 && !(0x2d0..0x2e4).contains(&off) {
                assert_eq!(s[off], 0, "offset {off:#x}");
            }
        }
        // The command line page: the text, NUL, zeroes.
        assert_eq!(m.read_cstr(0x1000, 4096).unwrap(), "console=hvc0 lgguest");
        assert!(s[0x1014..0x2000].iter().all(|&b| b == 0));
        assert_eq!(s[0x2000], 0xEE);
        // The initrd, then zeroes to the top of RAM; the device page untouched.
        assert_eq!(&s[rd.start as usize..rd.end() as usize], &initrd[..]);
        assert!(s[rd.end() as usize..ram as usize].iter().all(|&b| b == 0));
        assert_eq!(s[rd.start as usize - 1], 0xEE);
        assert!(s[ram as usize..].iter().all(|&b| b == 0xEE));
    }

    #[test]
    fn no_initrd_and_empty_initrd() {
        let img = good();
        let bz = parse(&img).unwrap();
        for initrd in [None, Some(&[][..])] {
            let mut m = VecMemory::new(8 * MIB);
            m.as_mut_slice()[..0x1000].fill(0xEE);
            let e = load(&bz, &img, &mut m, 8 * MIB, "", initrd).unwrap();
            assert_eq!(e.initrd, None);
            assert!(e.to_string().ends_with(", no initrd"));
            assert_eq!(m.read_u32(0x218).unwrap(), 0);
            assert_eq!(m.read_u32(0x21c).unwrap(), 0);
            assert_eq!(m.read_u8(0x1000).unwrap(), 0);
        }
    }

    #[test]
    fn initrd_page_aligned_at_top_of_unaligned_ram() {
        let img = good();
        let bz = parse(&img).unwrap();
        let mut m = VecMemory::new(8 * MIB);
        // RAM not a page multiple: the top is rounded down first.
        let e = load(&bz, &img, &mut m, 8 * MIB - 100, "", Some(&[1; 4096])).unwrap();
        assert_eq!(
            e.initrd,
            Some(Region {
                start: 8 * MIB - 0x2000,
                len: 4096
            })
        );
        // An exact page multiple fills its pages up to the top.
        let e = load(&bz, &img, &mut m, 8 * MIB, "", Some(&[1; 8192])).unwrap();
        assert_eq!(e.initrd.unwrap().start, 8 * MIB - 0x2000);
        assert_eq!(e.initrd.unwrap().end(), u64::from(8 * MIB));
    }

    /// `load` fails with `want` and writes nothing.
    fn load_fails(img: &[u8], mem: u32, ram: u32, cmdline: &str, initrd: Option<&[u8]>) -> BzError {
        let bz = parse(img).unwrap();
        let mut m = VecMemory::new(mem);
        let e = load(&bz, img, &mut m, ram, cmdline, initrd).unwrap_err();
        assert!(m.as_slice().iter().all(|&b| b == 0), "{e}: wrote something");
        e
    }

    #[test]
    fn payload_too_big_for_ram() {
        let img = synth(2, 0x20_0000);
        let e = load_fails(&img, 4 * MIB, 0x28_0000, "", None);
        assert_eq!(
            e,
            BzError::PayloadDoesNotFit {
                payload: Region {
                    start: 0x10_0000,
                    len: 0x20_0000
                },
                ram: 0x28_0000
            }
        );
        assert_eq!(
            e.to_string(),
            "the kernel's protected-mode code [0x100000, 0x300000) does not fit in guest RAM of 0x280000 bytes"
        );
        // RAM smaller than 1 MiB.
        let e = load_fails(&good(), 0x8_0000, 0x8_0000, "", None);
        assert!(matches!(e, BzError::PayloadDoesNotFit { .. }));
    }

    #[test]
    fn kernel_must_fit_where_it_decompresses() {
        // Runs at [4 MiB, 5 MiB): 5 MiB of RAM is enough, less isn't.
        let e = load_fails(&good(), 5 * MIB - 1, 5 * MIB - 1, "", None);
        let want = Region {
            start: 0x40_0000,
            len: MIB,
        };
        assert_eq!(
            e,
            BzError::KernelDoesNotFit {
                kernel: want,
                ram: 5 * MIB - 1
            }
        );
        assert_eq!(
            e.to_string(),
            "the kernel decompresses itself to [0x400000, 0x500000) (pref_address, init_size), \
             outside guest RAM [0x2000, 0x4fffff): give it more memory"
        );
        let img = good();
        let mut m = VecMemory::new(5 * MIB);
        load(&parse(&img).unwrap(), &img, &mut m, 5 * MIB, "", None).unwrap();
        // A fixed kernel over the boot pages.
        let mut img = good();
        img[0x234] = 0;
        set_u32(&mut img, 0x258, 0x1000);
        let e = load_fails(&img, 8 * MIB, 8 * MIB, "", None);
        assert!(matches!(e, BzError::KernelDoesNotFit { .. }), "{e}");
        // pref_address beyond 4 GiB.
        let mut img = good();
        img[0x234] = 0;
        put(&mut img, 0x258, &(1u64 << 40).to_le_bytes());
        let e = load_fails(&img, 8 * MIB, 8 * MIB, "", None);
        assert!(matches!(e, BzError::KernelDoesNotFit { .. }), "{e}");
    }

    #[test]
    fn initrd_too_big() {
        let img = good();
        let ram = 8 * MIB;
        // Into the kernel's [4 MiB, 5 MiB).
        let big = vec![0u8; (3 * MIB + 1) as usize];
        let e = load_fails(&img, ram, ram, "", Some(&big));
        assert_eq!(
            e,
            BzError::InitrdDoesNotFit {
                len: big.len(),
                ram,
                at: Some(Region {
                    start: 5 * MIB - 0x1000,
                    len: 3 * MIB + 1
                }),
                clash: InitrdClash::Kernel(Region {
                    start: 4 * MIB,
                    len: MIB
                })
            }
        );
        assert_eq!(
            e.to_string(),
            "the initrd (3145729 bytes) does not fit at the top of guest RAM (0x800000 bytes): \
             at [0x4ff000, 0x7ff001) it would overlap [0x400000, 0x500000), where the kernel \
             decompresses itself"
        );
        // Exactly up to the kernel's end is fine.
        let mut m = VecMemory::new(ram);
        load(
            &parse(&img).unwrap(),
            &img,
            &mut m,
            ram,
            "",
            Some(&big[..3 * MIB as usize]),
        )
        .unwrap();
        // Without a kernel region (protocol 2.09), into the code at 1 MiB.
        let mut old = img.clone();
        put(&mut old, 0x206, &0x0209u16.to_le_bytes());
        let big = vec![0u8; (7 * MIB - 0x2000) as usize];
        let e = load_fails(&old, ram, ram, "", Some(&big));
        assert!(
            matches!(
                e,
                BzError::InitrdDoesNotFit {
                    clash: InitrdClash::Payload(_),
                    ..
                }
            ),
            "{e}"
        );
        // Larger than RAM, and an overflowing page round-up.
        let e = load_fails(&img, ram, ram, "", Some(&vec![0; (ram + 1) as usize]));
        assert!(matches!(
            e,
            BzError::InitrdDoesNotFit {
                at: None,
                clash: InitrdClash::Ram,
                ..
            }
        ));
        assert!(e.to_string().ends_with(": larger than guest RAM"));
        // Above initrd_addr_max.
        let mut capped = img.clone();
        set_u32(&mut capped, 0x22c, 6 * MIB - 1);
        let e = load_fails(&capped, ram, ram, "", Some(&[1; 10]));
        assert!(matches!(
            e,
            BzError::InitrdDoesNotFit {
                clash: InitrdClash::AddrMax(0x5f_ffff),
                ..
            }
        ));
        assert!(e.to_string().contains("initrd_addr_max 0x5fffff"));
    }

    #[test]
    fn initrd_never_overlaps_boot_pages() {
        // The one clash only a pathological layout reaches: no kernel
        // region, code at 1 MiB, and RAM so small the initrd fits below it.
        let bz = BzImage {
            pm_len: 0x1000,
            init_size: None,
            ..parse(&good()).unwrap()
        };
        assert_eq!(
            place_initrd(&bz, 0x1000, 0x2000, None),
            Err(BzError::InitrdDoesNotFit {
                len: 0x1000,
                ram: 0x2000,
                at: Some(Region {
                    start: 0x1000,
                    len: 0x1000
                }),
                clash: InitrdClash::BootPages
            })
        );
        assert!(place_initrd(&bz, 0x1000, 0x3000, None).is_ok());
    }

    #[test]
    fn cmdline_limits() {
        let mut img = good();
        set_u32(&mut img, 0x238, 16);
        let e = load_fails(&img, 8 * MIB, 8 * MIB, "0123456789abcdefg", None);
        assert_eq!(e, BzError::CmdlineTooLong { len: 17, max: 16 });
        assert_eq!(
            e.to_string(),
            "the kernel command line is 17 bytes, the kernel accepts at most 16"
        );
        let bz = parse(&img).unwrap();
        let mut m = VecMemory::new(8 * MIB);
        let e = load(&bz, &img, &mut m, 8 * MIB, "0123456789abcdef", None).unwrap();
        assert_eq!(e.cmdline.len, 17);
        assert_eq!(m.read_u8(0x1010).unwrap(), 0);
        // Never past the command-line page, whatever cmdline_size says.
        set_u32(&mut img, 0x238, u32::MAX);
        let long = "x".repeat(4096);
        let e = load_fails(&img, 8 * MIB, 8 * MIB, &long, None);
        assert_eq!(
            e,
            BzError::CmdlineTooLong {
                len: 4096,
                max: 4095
            }
        );
        let bz = parse(&img).unwrap();
        load(&bz, &img, &mut m, 8 * MIB, &long[1..], None).unwrap();
        assert_eq!(m.read_u8(0x1fff).unwrap(), 0);
        // A NUL inside.
        let e = load_fails(&good(), 8 * MIB, 8 * MIB, "a\0b", None);
        assert_eq!(e, BzError::CmdlineHasNul);
    }

    #[test]
    fn ram_and_image_must_match() {
        let img = good();
        let e = load_fails(&img, 8 * MIB, 8 * MIB + 1, "", None);
        assert_eq!(
            e,
            BzError::RamBeyondMemory {
                ram: 8 * MIB + 1,
                limit: 8 * MIB
            }
        );
        // A parse result used with a shorter image: refused, nothing written.
        let bz = parse(&img).unwrap();
        let mut m = VecMemory::new(8 * MIB);
        let e = load(&bz, &img[..img.len() - 1], &mut m, 8 * MIB, "", None).unwrap_err();
        assert!(matches!(e, BzError::Truncated { .. }), "{e}");
        let e = load(&bz, &img[..0x250], &mut m, 8 * MIB, "", None).unwrap_err();
        assert!(matches!(e, BzError::Truncated { .. }), "{e}");
        // A hand-made BzImage whose header would spill past its room.
        let bad = BzImage {
            header_end: 0x300,
            ..bz.clone()
        };
        assert!(matches!(
            load(&bad, &img, &mut m, 8 * MIB, "", None),
            Err(BzError::BadHeaderEnd { end: 0x300, .. })
        ));
        assert!(m.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn detects_image_kind() {
        assert_eq!(ImageKind::detect(b"\x7fELF\x01\x01\x01"), ImageKind::Elf);
        assert_eq!(ImageKind::detect(&good()), ImageKind::BzImage);
        // Only "HdrS" decides; parse checks the rest.
        let mut img = good();
        img[0x1fe] = 0;
        assert_eq!(ImageKind::detect(&img), ImageKind::BzImage);
        assert_eq!(ImageKind::detect(&img[..0x205]), ImageKind::Unknown);
        assert_eq!(ImageKind::detect(&[]), ImageKind::Unknown);
        assert_eq!(ImageKind::detect(&[0; 0x400]), ImageKind::Unknown);
        assert_eq!(ImageKind::detect(b"\x7fEL"), ImageKind::Unknown);
        assert_eq!(ImageKind::Unknown.to_string(), "neither ELF nor bzImage");
        assert_eq!(ImageKind::BzImage.to_string(), "bzImage");
    }

    #[test]
    fn small_helpers() {
        assert_eq!(Protocol(0x20c).to_string(), "2.12");
        assert_eq!(Protocol(0x207).to_string(), "2.07");
        assert_eq!(Protocol(0x30a).to_string(), "3.10");
        let r = |start, len| Region { start, len };
        assert!(r(0, 10).overlaps(&r(9, 1)));
        assert!(!r(0, 10).overlaps(&r(10, 1)));
        assert!(!r(5, 0).overlaps(&r(0, 10)));
        assert!(r(u32::MAX, 1).overlaps(&r(u32::MAX - 1, 2)));
        assert_eq!(r(u32::MAX, 2).end(), 0x1_0000_0001);
    }

    /// Random corruption of the header and random truncation: parse and
    /// load never panic (overflow checks are on in tests), and whatever
    /// loads stays inside its regions.
    #[test]
    fn mutated_images_never_panic() {
        let base = synth(1, 0x800);
        let mut rng = Rng(0x5eed_b21a_6e00_0001);
        let mut loaded = 0;
        for _ in 0..20_000 {
            let mut img = base.clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let off = 0x1f0 + (rng.next_u64() % 0x80) as usize;
                img[off] = rng.next_u64() as u8;
            }
            if rng.next_u64().is_multiple_of(4) {
                let n = (rng.next_u64() as usize) % (img.len() + 1);
                img.truncate(n);
            }
            let Ok(bz) = parse(&img) else { continue };
            let mut m = VecMemory::new(6 * MIB);
            let initrd = [0x77u8; 3000];
            if let Ok(e) = load(&bz, &img, &mut m, 6 * MIB, "x", Some(&initrd)) {
                loaded += 1;
                let rd = e.initrd.unwrap();
                assert!(!rd.overlaps(&e.payload));
                assert!(e.kernel.is_none_or(|k| !rd.overlaps(&k)));
                assert!(rd.end() <= u64::from(6 * MIB));
            }
        }
        assert!(loaded > 1000, "only {loaded} mutants loaded");
    }

    /// The kit's real Linux 3.10 lguest kernel, if it is there
    /// (`../shared/linux-guest/` beside the repository).
    fn kit_file(name: &str) -> Option<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/linux-guest");
        std::fs::read(dir.join(name)).ok()
    }

    #[test]
    fn real_kit_bzimage() {
        let Some(img) = kit_file("bzImage") else {
            std::println!("skipped: ../shared/linux-guest/bzImage not present");
            return;
        };
        assert_eq!(ImageKind::detect(&img), ImageKind::BzImage);
        if let Some(vmlinux) = kit_file("vmlinux") {
            assert_eq!(ImageKind::detect(&vmlinux), ImageKind::Elf);
        }
        let bz = parse(&img).unwrap();
        assert!(bz.version >= Protocol(MIN_PROTOCOL));
        assert_eq!(bz.version, Protocol(0x20c));
        assert_eq!(bz.setup_sects, 33);
        assert_eq!(bz.pm_offset, 0x4400);
        assert_eq!(bz.pm_len as usize, img.len() - 0x4400);
        assert_eq!(bz.header_end, 0x268);
        assert_eq!(bz.code32_start, 0x10_0000);
        assert_eq!(bz.loadflags, LOADED_HIGH);
        assert!(bz.relocatable);
        assert_eq!(bz.kernel_alignment, 0x20_0000);
        assert_eq!(bz.cmdline_size, 0x7ff);
        assert_eq!(bz.initrd_addr_max, 0x7fff_ffff);
        assert_eq!(
            bz.payload,
            Some(CompressedPayload {
                offset: 0x79,
                length: 0x17_4bb0
            })
        );
        assert_eq!(bz.pref_address, Some(0x100_0000));
        assert_eq!(bz.init_size, Some(0x80_0000));
        assert_eq!(
            bz.kernel_region(),
            Some(Region {
                start: 16 * MIB,
                len: 8 * MIB
            })
        );
        // The compressed kernel is gzip.
        let z = 0x4400 + 0x79;
        assert_eq!(&img[z..z + 2], &[0x1f, 0x8b]);

        // Booted as Linux's launcher boots it: 128 MiB, the device page above.
        let ram = 128 * MIB;
        let initrd = kit_file("guest-initrd.cpio.gz").unwrap_or_else(|| vec![0x42; 1_403_629]);
        let cmdline = "rdinit=/init console=hvc0 lgguest";
        let mut m = VecMemory::new(ram + 0x1000);
        let e = load(&bz, &img, &mut m, ram, cmdline, Some(&initrd)).unwrap();
        std::println!("kit bzImage: protocol {}, {e}", bz.version);
        let s = m.as_slice();
        assert_eq!(e.entry, 0x10_0000);
        assert_eq!(
            &s[0x10_0000..0x10_0000 + bz.pm_len as usize],
            &img[0x4400..]
        );
        let rounded = (initrd.len() as u32).div_ceil(4096) * 4096;
        let rd = Region {
            start: ram - rounded,
            len: initrd.len() as u32,
        };
        assert_eq!(e.initrd, Some(rd));
        assert_eq!(&s[rd.start as usize..rd.end() as usize], &initrd[..]);
        // The zero page, as the kernel will read it.
        assert_eq!(m.read_u16(0x206).unwrap(), 0x20c);
        assert_eq!(s[0x210], 0xFF);
        assert_eq!(s[0x211], LOADED_HIGH | KEEP_SEGMENTS);
        assert_eq!(m.read_u32(0x214).unwrap(), 0x10_0000);
        assert_eq!(m.read_u32(0x218).unwrap(), rd.start);
        assert_eq!(m.read_u32(0x21c).unwrap(), rd.len);
        assert_eq!(m.read_u32(0x228).unwrap(), 0x1000);
        assert_eq!(m.read_u32(0x23c).unwrap(), X86_SUBARCH_LGUEST);
        assert_eq!(m.read_u32(0x230).unwrap(), 0x20_0000);
        assert_eq!(m.read_u32(0x260).unwrap(), 0x80_0000);
        assert_eq!(s[0x1e8], 1);
        assert_eq!(m.read_u64(0x2d0).unwrap(), 0);
        assert_eq!(m.read_u64(0x2d8).unwrap(), u64::from(ram));
        assert_eq!(m.read_u32(0x2e0).unwrap(), E820_RAM);
        assert_eq!(m.read_cstr(0x1000, 4096).unwrap(), cmdline);
        for off in 0x1f1..0x268u32 {
            if !owned_by_loader(off) {
                assert_eq!(s[off as usize], img[off as usize], "offset {off:#x}");
            }
        }

        // Too little RAM for where it decompresses itself (16–24 MiB).
        let mut small = VecMemory::new(16 * MIB);
        assert!(matches!(
            load(&bz, &img, &mut small, 16 * MIB, "", None),
            Err(BzError::KernelDoesNotFit { .. })
        ));
        // 24 MiB runs it, but leaves no room for an initrd.
        let mut m = VecMemory::new(24 * MIB);
        assert!(matches!(
            load(&bz, &img, &mut m, 24 * MIB, "", Some(&initrd)),
            Err(BzError::InitrdDoesNotFit {
                clash: InitrdClash::Kernel(_),
                ..
            })
        ));
        load(&bz, &img, &mut m, 24 * MIB, "", None).unwrap();
        // Its command line limit is 2047 bytes.
        assert_eq!(
            load(&bz, &img, &mut m, 24 * MIB, &"y".repeat(2048), None),
            Err(BzError::CmdlineTooLong {
                len: 2048,
                max: 0x7ff
            })
        );
    }
}
