//! Boot parameters and the guest-physical memory map (docs/abi.md,
//! sections 10 and 11).
//!
//! The launcher writes a Linux `struct boot_params` ("zero page") at
//! guest-physical [`BOOT_PARAMS_ADDR`] and the command line at
//! [`CMDLINE_ADDR`], and starts the guest with `esi` = [`BOOT_PARAMS_ADDR`].
//! Only the fields below are written; everything else is zero.
//!
//! | Offset | Field | Value written |
//! |---|---|---|
//! | 0x1e8 | `e820_entries` (u8) | 1 |
//! | 0x1f1 | `hdr` ([`SetupHeader`]) | |
//! | 0x206 | `hdr.version` (u16) | [`BOOT_PROTOCOL_VERSION`] = 0x207 |
//! | 0x210 | `hdr.type_of_loader` (u8) | [`LOADER_TYPE_UNDEFINED`] = 0xFF |
//! | 0x211 | `hdr.loadflags` (u8) | `|=` [`KEEP_SEGMENTS`] = 0x40 |
//! | 0x218 | `hdr.ramdisk_image` (u32) | initrd address (if any) |
//! | 0x21c | `hdr.ramdisk_size` (u32) | initrd size (if any) |
//! | 0x228 | `hdr.cmd_line_ptr` (u32) | [`CMDLINE_ADDR`] = 0x1000 |
//! | 0x23c | `hdr.hardware_subarch` (u32) | [`X86_SUBARCH_LGUEST`] = 1 |
//! | 0x2d0 | `e820_table[0]` ([`BootE820Entry`]) | {0, RAM size, [`E820_RAM`]} |
//!
//! The offsets are those of Linux's `arch/x86/include/uapi/asm/bootparam.h`
//! and are checked at compile time against a mirror of `struct setup_header`.

use core::mem::{offset_of, size_of};

/// Guest-physical address of `struct boot_params`.
pub const BOOT_PARAMS_ADDR: u32 = 0;
/// Size of `struct boot_params` (one page).
pub const BOOT_PARAMS_SIZE: u32 = 4096;
/// Guest-physical address of the NUL-terminated kernel command line.
pub const CMDLINE_ADDR: u32 = 0x1000;
/// Guest-physical load address of a bzImage protected-mode payload.
pub const BZIMAGE_LOAD_ADDR: u32 = 0x10_0000;

/// Offset of `boot_params.e820_entries` (u8).
pub const BP_E820_ENTRIES: u32 = 0x1e8;
/// Offset of `boot_params.hdr` ([`SetupHeader`]).
pub const BP_HDR: u32 = 0x1f1;
/// Offset of `boot_params.e820_table` (array of [`BootE820Entry`]).
pub const BP_E820_TABLE: u32 = 0x2d0;
/// Number of entries in `boot_params.e820_table` (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX_ENTRIES_ZEROPAGE: u32 = 128;

/// Offset of `hdr.setup_sects` (u8).
pub const BP_HDR_SETUP_SECTS: u32 = BP_HDR + offset_of!(SetupHeader, setup_sects) as u32;
/// Offset of `hdr.boot_flag` (u16, 0xAA55).
pub const BP_HDR_BOOT_FLAG: u32 = BP_HDR + offset_of!(SetupHeader, boot_flag) as u32;
/// Offset of `hdr.header` (u32, "HdrS").
pub const BP_HDR_HEADER: u32 = BP_HDR + offset_of!(SetupHeader, header) as u32;
/// Offset of `hdr.version` (u16).
pub const BP_HDR_VERSION: u32 = BP_HDR + offset_of!(SetupHeader, version) as u32;
/// Offset of `hdr.type_of_loader` (u8).
pub const BP_HDR_TYPE_OF_LOADER: u32 = BP_HDR + offset_of!(SetupHeader, type_of_loader) as u32;
/// Offset of `hdr.loadflags` (u8).
pub const BP_HDR_LOADFLAGS: u32 = BP_HDR + offset_of!(SetupHeader, loadflags) as u32;
/// Offset of `hdr.code32_start` (u32).
pub const BP_HDR_CODE32_START: u32 = BP_HDR + offset_of!(SetupHeader, code32_start) as u32;
/// Offset of `hdr.ramdisk_image` (u32).
pub const BP_HDR_RAMDISK_IMAGE: u32 = BP_HDR + offset_of!(SetupHeader, ramdisk_image) as u32;
/// Offset of `hdr.ramdisk_size` (u32).
pub const BP_HDR_RAMDISK_SIZE: u32 = BP_HDR + offset_of!(SetupHeader, ramdisk_size) as u32;
/// Offset of `hdr.cmd_line_ptr` (u32).
pub const BP_HDR_CMD_LINE_PTR: u32 = BP_HDR + offset_of!(SetupHeader, cmd_line_ptr) as u32;
/// Offset of `hdr.kernel_alignment` (u32).
pub const BP_HDR_KERNEL_ALIGNMENT: u32 = BP_HDR + offset_of!(SetupHeader, kernel_alignment) as u32;
/// Offset of `hdr.cmdline_size` (u32).
pub const BP_HDR_CMDLINE_SIZE: u32 = BP_HDR + offset_of!(SetupHeader, cmdline_size) as u32;
/// Offset of `hdr.hardware_subarch` (u32).
pub const BP_HDR_HARDWARE_SUBARCH: u32 = BP_HDR + offset_of!(SetupHeader, hardware_subarch) as u32;
/// Offset of `hdr.syssize` (u32, protected-mode code size in 16-byte units).
pub const BP_HDR_SYSSIZE: u32 = BP_HDR + offset_of!(SetupHeader, syssize) as u32;
/// Offset of `hdr.jump` (u16: a short `jmp`, `0xEB disp8`; the setup header
/// ends at `0x202 + disp8`).
pub const BP_HDR_JUMP: u32 = BP_HDR + offset_of!(SetupHeader, jump) as u32;
/// Offset of `hdr.heap_end_ptr` (u16).
pub const BP_HDR_HEAP_END_PTR: u32 = BP_HDR + offset_of!(SetupHeader, heap_end_ptr) as u32;
/// Offset of `hdr.ext_loader_ver` (u8).
pub const BP_HDR_EXT_LOADER_VER: u32 = BP_HDR + offset_of!(SetupHeader, ext_loader_ver) as u32;
/// Offset of `hdr.ext_loader_type` (u8).
pub const BP_HDR_EXT_LOADER_TYPE: u32 = BP_HDR + offset_of!(SetupHeader, ext_loader_type) as u32;
/// Offset of `hdr.initrd_addr_max` (u32, protocol 2.03+).
pub const BP_HDR_INITRD_ADDR_MAX: u32 = BP_HDR + offset_of!(SetupHeader, initrd_addr_max) as u32;
/// Offset of `hdr.relocatable_kernel` (u8, protocol 2.05+).
pub const BP_HDR_RELOCATABLE_KERNEL: u32 =
    BP_HDR + offset_of!(SetupHeader, relocatable_kernel) as u32;
/// Offset of `hdr.hardware_subarch_data` (u64, protocol 2.07+).
pub const BP_HDR_HARDWARE_SUBARCH_DATA: u32 =
    BP_HDR + offset_of!(SetupHeader, hardware_subarch_data) as u32;
/// Offset of `hdr.payload_offset` (u32, protocol 2.08+).
pub const BP_HDR_PAYLOAD_OFFSET: u32 = BP_HDR + offset_of!(SetupHeader, payload_offset) as u32;
/// Offset of `hdr.payload_length` (u32, protocol 2.08+).
pub const BP_HDR_PAYLOAD_LENGTH: u32 = BP_HDR + offset_of!(SetupHeader, payload_length) as u32;
/// Offset of `hdr.setup_data` (u64, protocol 2.09+).
pub const BP_HDR_SETUP_DATA: u32 = BP_HDR + offset_of!(SetupHeader, setup_data) as u32;
/// Offset of `hdr.pref_address` (u64, protocol 2.10+).
pub const BP_HDR_PREF_ADDRESS: u32 = BP_HDR + offset_of!(SetupHeader, pref_address) as u32;
/// Offset of `hdr.init_size` (u32, protocol 2.10+).
pub const BP_HDR_INIT_SIZE: u32 = BP_HDR + offset_of!(SetupHeader, init_size) as u32;
/// End of `boot_params.hdr`'s room in the zero page (`_pad7` runs to
/// `edd_mbr_sig_buffer` at 0x290): a setup header copied from an image
/// may not extend past it.
pub const BP_HDR_ROOM_END: u32 = 0x290;

/// `hdr.boot_flag`: the boot-sector signature at offset 0x1fe.
pub const BOOT_FLAG: u16 = 0xAA55;
/// `hdr.header`: the setup-header magic `"HdrS"` at offset 0x202.
pub const HDRS_MAGIC: [u8; 4] = *b"HdrS";
/// `hdr.loadflags` bit: the protected-mode code loads at 0x100000 (a
/// bzImage, not a zImage).
pub const LOADED_HIGH: u8 = 0x01;
/// `hdr.loadflags` bit: `heap_end_ptr` is valid (real-mode setup only).
pub const CAN_USE_HEAP: u8 = 0x80;

/// `hdr.version` the launcher writes (boot protocol 2.07, first with
/// `hardware_subarch`).
pub const BOOT_PROTOCOL_VERSION: u16 = 0x0207;
/// `hdr.loadflags` bit: don't reload segment registers in `startup_32`.
pub const KEEP_SEGMENTS: u8 = 0x40;
/// `hdr.type_of_loader`: undefined boot loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// `hdr.hardware_subarch`: a PC.
pub const X86_SUBARCH_PC: u32 = 0;
/// `hdr.hardware_subarch`: an lguest guest.
pub const X86_SUBARCH_LGUEST: u32 = 1;
/// `hdr.hardware_subarch`: a Xen PV guest.
pub const X86_SUBARCH_XEN: u32 = 2;
/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Mirror of Linux's `struct setup_header` as of 3.10–4.0 (boot protocol
/// 2.12), packed; it sits at [`BP_HDR`] in `boot_params`. Exists to pin the
/// offsets above; a launcher may also read/write it wholesale.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)] // Field names are Linux's; see Documentation/x86/boot.txt.
pub struct SetupHeader {
    pub setup_sects: u8,
    pub root_flags: u16,
    pub syssize: u32,
    pub ram_size: u16,
    pub vid_mode: u16,
    pub root_dev: u16,
    pub boot_flag: u16,
    pub jump: u16,
    pub header: u32,
    pub version: u16,
    pub realmode_swtch: u32,
    pub start_sys_seg: u16,
    pub kernel_version: u16,
    pub type_of_loader: u8,
    pub loadflags: u8,
    pub setup_move_size: u16,
    pub code32_start: u32,
    pub ramdisk_image: u32,
    pub ramdisk_size: u32,
    pub bootsect_kludge: u32,
    pub heap_end_ptr: u16,
    pub ext_loader_ver: u8,
    pub ext_loader_type: u8,
    pub cmd_line_ptr: u32,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable_kernel: u8,
    pub min_alignment: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub hardware_subarch: u32,
    pub hardware_subarch_data: u64,
    pub payload_offset: u32,
    pub payload_length: u32,
    pub setup_data: u64,
    pub pref_address: u64,
    pub init_size: u32,
    pub handover_offset: u32,
}

/// One e820 memory-map entry in `boot_params` (`struct boot_e820_entry`), 20
/// bytes, packed.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootE820Entry {
    /// Start of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// [`E820_RAM`], [`E820_RESERVED`], …
    pub type_: u32,
}

impl BootE820Entry {
    /// Size of one entry.
    pub const SIZE: u32 = 20;

    /// Offset inside `boot_params` of entry `i`.
    pub const fn offset(i: u32) -> u32 {
        BP_E820_TABLE + i * Self::SIZE
    }

    /// The 20 little-endian wire bytes.
    pub const fn to_bytes(&self) -> [u8; 20] {
        let a = self.addr.to_le_bytes();
        let s = self.size.to_le_bytes();
        let t = self.type_.to_le_bytes();
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], s[0], s[1], s[2], s[3], s[4], s[5],
            s[6], s[7], t[0], t[1], t[2], t[3],
        ]
    }

    /// Parse from 20 little-endian bytes.
    pub const fn from_bytes(b: &[u8; 20]) -> Self {
        Self {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            size: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            type_: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        }
    }
}

const _: () = {
    assert!(size_of::<BootE820Entry>() == 20);
    assert!(offset_of!(BootE820Entry, addr) == 0);
    assert!(offset_of!(BootE820Entry, size) == 8);
    assert!(offset_of!(BootE820Entry, type_) == 16);
    // Linux: hdr ends (protocol 2.12) at 0x268; edd_mbr_sig_buffer at 0x290.
    assert!(size_of::<SetupHeader>() == 0x268 - 0x1f1);
    assert!(BP_HDR as usize + size_of::<SetupHeader>() <= 0x290);
    assert!(BP_HDR_SETUP_SECTS == 0x1f1);
    assert!(BP_HDR_BOOT_FLAG == 0x1fe);
    assert!(BP_HDR_HEADER == 0x202);
    assert!(BP_HDR_VERSION == 0x206);
    assert!(BP_HDR_TYPE_OF_LOADER == 0x210);
    assert!(BP_HDR_LOADFLAGS == 0x211);
    assert!(BP_HDR_CODE32_START == 0x214);
    assert!(BP_HDR_RAMDISK_IMAGE == 0x218);
    assert!(BP_HDR_RAMDISK_SIZE == 0x21c);
    assert!(BP_HDR_CMD_LINE_PTR == 0x228);
    assert!(BP_HDR_KERNEL_ALIGNMENT == 0x230);
    assert!(BP_HDR_CMDLINE_SIZE == 0x238);
    assert!(BP_HDR_HARDWARE_SUBARCH == 0x23c);
    assert!(BP_HDR_SYSSIZE == 0x1f4);
    assert!(BP_HDR_JUMP == 0x200);
    assert!(BP_HDR_HEAP_END_PTR == 0x224);
    assert!(BP_HDR_EXT_LOADER_VER == 0x226);
    assert!(BP_HDR_EXT_LOADER_TYPE == 0x227);
    assert!(BP_HDR_INITRD_ADDR_MAX == 0x22c);
    assert!(BP_HDR_RELOCATABLE_KERNEL == 0x234);
    assert!(BP_HDR_HARDWARE_SUBARCH_DATA == 0x240);
    assert!(BP_HDR_PAYLOAD_OFFSET == 0x248);
    assert!(BP_HDR_PAYLOAD_LENGTH == 0x24c);
    assert!(BP_HDR_SETUP_DATA == 0x250);
    assert!(BP_HDR_PREF_ADDRESS == 0x258);
    assert!(BP_HDR_INIT_SIZE == 0x260);
    assert!(BP_HDR_ROOM_END < BP_E820_TABLE);
    assert!(BP_HDR + offset_of!(SetupHeader, hardware_subarch_data) as u32 == 0x240);
    assert!(BP_HDR + offset_of!(SetupHeader, setup_data) as u32 == 0x250);
    assert!(BP_HDR + offset_of!(SetupHeader, handover_offset) as u32 == 0x264);
    // The e820 table fills the zero page up to _pad8 at 0xcd0.
    assert!(BP_E820_TABLE + E820_MAX_ENTRIES_ZEROPAGE * BootE820Entry::SIZE == 0xcd0);
    assert!(BP_E820_ENTRIES < BP_HDR);
    assert!(CMDLINE_ADDR == BOOT_PARAMS_ADDR + BOOT_PARAMS_SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_bytes_round_trip() {
        let e = BootE820Entry {
            addr: 0,
            size: 64 << 20,
            type_: E820_RAM,
        };
        let b = e.to_bytes();
        assert_eq!(&b[8..16], &(64u64 << 20).to_le_bytes());
        assert_eq!(&b[16..], &[1, 0, 0, 0]);
        assert_eq!(BootE820Entry::from_bytes(&b), e);
    }
}
