//! What the launcher told the guest in `boot_params` (guest-physical page 0).

use guest_abi::boot::*;

/// Longest command line the runtime accepts (Linux i386's
/// `COMMAND_LINE_SIZE` is 2048).
pub const CMDLINE_MAX: u32 = 2048;

/// Boot information, read once from `boot_params` before `main`.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Guest-physical address of `boot_params` (`esi` at entry).
    pub boot_params: u32,
    /// `hdr.version` (0x207 from an lguest launcher).
    pub version: u16,
    /// `hdr.hardware_subarch` (1 = lguest).
    pub hardware_subarch: u32,
    /// Number of e820 entries.
    pub e820_entries: u8,
    /// Size of RAM: `e820_table[0].size` (0 if there is no entry).
    pub mem_bytes: u64,
    /// `hdr.cmd_line_ptr` (0x1000 from an lguest launcher).
    pub cmdline_addr: u32,
    /// The command line (empty if absent, implausible or not UTF-8).
    pub cmdline: &'static str,
}

impl BootInfo {
    /// Whether `boot_params` looks like an lguest launcher wrote it.
    pub fn is_lguest(&self) -> bool {
        self.hardware_subarch == X86_SUBARCH_LGUEST
    }

    /// The whitespace-separated command-line arguments.
    pub fn args(&self) -> impl Iterator<Item = &'static str> {
        self.cmdline.split_ascii_whitespace()
    }

    /// The value of the first `key=value` argument with this key.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.args()
            .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
    }

    /// Whether a bare `flag` (or `flag=...`) argument is present.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.args()
            .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
    }

    /// Read `boot_params` at guest-physical `bp`.
    ///
    /// # Safety
    ///
    /// Guest memory `[bp, bp + 4096)` must be readable (linear mode), and so
    /// must the command line if `hdr.cmd_line_ptr` lies below the RAM size
    /// in `e820_table[0]`. The command line must never change afterwards.
    pub(crate) unsafe fn read(bp: u32) -> BootInfo {
        // SAFETY: inside the boot_params page, per the caller's contract
        // (likewise for the reads below).
        let version = unsafe { peek_u16(bp + BP_HDR_VERSION) };
        // SAFETY: as above.
        let hardware_subarch = unsafe { peek_u32(bp + BP_HDR_HARDWARE_SUBARCH) };
        // SAFETY: as above.
        let e820_entries = unsafe { peek_u8(bp + BP_E820_ENTRIES) };
        // SAFETY: as above.
        let cmdline_addr = unsafe { peek_u32(bp + BP_HDR_CMD_LINE_PTR) };
        let mem_bytes = if e820_entries > 0 {
            let size = bp + BootE820Entry::offset(0) + 8;
            // SAFETY: as above.
            let lo = unsafe { peek_u32(size) };
            // SAFETY: as above.
            let hi = unsafe { peek_u32(size + 4) };
            u64::from(hi) << 32 | u64::from(lo)
        } else {
            0
        };
        let cmdline_ok = cmdline_addr != 0
            && hardware_subarch == X86_SUBARCH_LGUEST
            && u64::from(cmdline_addr) + u64::from(CMDLINE_MAX) <= mem_bytes;
        let cmdline = if cmdline_ok {
            // SAFETY: below the RAM size, per the caller's contract.
            unsafe { cmdline_at(cmdline_addr) }
        } else {
            ""
        };
        BootInfo {
            boot_params: bp,
            version,
            hardware_subarch,
            e820_entries,
            mem_bytes,
            cmdline_addr,
            cmdline,
        }
    }
}

/// Volatile byte read at a guest-physical address.
///
/// # Safety
///
/// `addr` must be readable guest memory.
unsafe fn peek_u8(addr: u32) -> u8 {
    // SAFETY: caller's contract; the pointer is never null here (no field
    // of interest sits at offset 0 of page 0).
    unsafe { core::ptr::with_exposed_provenance::<u8>(addr as usize).read_volatile() }
}

/// Little-endian `u16` at a guest-physical address (any alignment).
///
/// # Safety
///
/// `[addr, addr + 2)` must be readable guest memory.
unsafe fn peek_u16(addr: u32) -> u16 {
    // SAFETY: caller's contract.
    let lo = unsafe { peek_u8(addr) };
    // SAFETY: caller's contract.
    let hi = unsafe { peek_u8(addr + 1) };
    u16::from_le_bytes([lo, hi])
}

/// Little-endian `u32` at a guest-physical address (any alignment).
///
/// # Safety
///
/// `[addr, addr + 4)` must be readable guest memory.
unsafe fn peek_u32(addr: u32) -> u32 {
    // SAFETY: caller's contract.
    let lo = unsafe { peek_u16(addr) };
    // SAFETY: caller's contract.
    let hi = unsafe { peek_u16(addr + 2) };
    u32::from(hi) << 16 | u32::from(lo)
}

/// The NUL-terminated string at `addr` (at most [`CMDLINE_MAX`] bytes).
///
/// # Safety
///
/// `[addr, addr + CMDLINE_MAX)` must be readable and never change.
unsafe fn cmdline_at(addr: u32) -> &'static str {
    let mut len = 0;
    // SAFETY: inside the range the caller vouches for.
    while len < CMDLINE_MAX && unsafe { peek_u8(addr + len) } != 0 {
        len += 1;
    }
    let p = core::ptr::with_exposed_provenance::<u8>(addr as usize);
    // SAFETY: `len` bytes from `addr` are readable and immutable for the rest
    // of the guest's life (caller's contract); `addr != 0`.
    let bytes = unsafe { core::slice::from_raw_parts(p, len as usize) };
    core::str::from_utf8(bytes).unwrap_or("")
}
