//! Selectors, GDT slots, segment descriptors and IDT gates.
//!
//! The guest GDT follows Linux's i386 layout with 32 slots. The guest kernel
//! runs at CPL 1, so its selectors carry RPL 1:
//!
//! | Slot | Selector | Use |
//! |---|---|---|
//! | 6..=8 | 0x30, 0x38, 0x40 (\| RPL) | TLS (`LHCALL_LOAD_TLS`) |
//! | 10 | 0x50 | host-reserved (`LGUEST_CS`) |
//! | 11 | 0x58 | host-reserved (`LGUEST_DS`) |
//! | 12 | [`KERNEL_CS`] = 0x61 | guest kernel code, flat, DPL 1 |
//! | 13 | [`KERNEL_DS`] = 0x69 | guest kernel data/stack, flat, DPL 1 |
//! | 14 | [`USER_CS`] = 0x73 | guest user code, DPL 3 |
//! | 15 | [`USER_DS`] = 0x7b | guest user data, DPL 3 |
//! | 16 | 0x80 | host-reserved (TSS, low half) |
//! | 17 | 0x88 | host-reserved (TSS, high half; Linux's LDT slot) |
//! | 31 | 0xf8 | host-reserved (double-fault TSS) |
//!
//! The slots in [`GUEST_RESERVED_GDT`] can never be set by the guest
//! (upstream accepted such writes and silently never copied them; rustyvisor
//! kills a guest that tries). This list is the only definition of the
//! reserved set: the hypervisor enforces exactly it and never copies these
//! slots from a guest.

/// Number of GDT slots the guest sees.
pub const GDT_ENTRIES: u32 = 32;
/// First TLS slot.
pub const GDT_ENTRY_TLS_MIN: u32 = 6;
/// Number of TLS slots (6, 7, 8).
pub const GDT_ENTRY_TLS_ENTRIES: u32 = 3;
/// Host-reserved slot for the hypervisor's code segment (upstream `GDT_ENTRY_LGUEST_CS`).
pub const GDT_ENTRY_LGUEST_CS: u32 = 10;
/// Host-reserved slot for the hypervisor's data segment (upstream `GDT_ENTRY_LGUEST_DS`).
pub const GDT_ENTRY_LGUEST_DS: u32 = 11;
/// Guest kernel code slot.
pub const GDT_ENTRY_KERNEL_CS: u32 = 12;
/// Guest kernel data slot.
pub const GDT_ENTRY_KERNEL_DS: u32 = 13;
/// Guest user code slot.
pub const GDT_ENTRY_DEFAULT_USER_CS: u32 = 14;
/// Guest user data slot.
pub const GDT_ENTRY_DEFAULT_USER_DS: u32 = 15;
/// Host-reserved TSS slot.
pub const GDT_ENTRY_TSS: u32 = 16;
/// Host-reserved: the high half of the host's 16-byte 64-bit TSS descriptor,
/// which starts at [`GDT_ENTRY_TSS`]. (Linux i386 puts its LDT descriptor
/// here, a system descriptor no guest may load anyway.)
pub const GDT_ENTRY_TSS_HIGH: u32 = GDT_ENTRY_TSS + 1;
/// Host-reserved double-fault TSS slot.
pub const GDT_ENTRY_DOUBLEFAULT_TSS: u32 = 31;

/// GDT slots the guest can never set with `LHCALL_LOAD_GDT_ENTRY`: a guest
/// that tries is killed ("reserved gdt entry %u").
pub const GUEST_RESERVED_GDT: [u32; 5] = [
    GDT_ENTRY_LGUEST_CS,
    GDT_ENTRY_LGUEST_DS,
    GDT_ENTRY_TSS,
    GDT_ENTRY_TSS_HIGH,
    GDT_ENTRY_DOUBLEFAULT_TSS,
];

/// The guest kernel's privilege level.
pub const GUEST_PL: u16 = 1;
/// Guest kernel code selector: slot 12, RPL 1.
pub const KERNEL_CS: u16 = (GDT_ENTRY_KERNEL_CS as u16) << 3 | GUEST_PL;
/// Guest kernel data/stack selector: slot 13, RPL 1.
pub const KERNEL_DS: u16 = (GDT_ENTRY_KERNEL_DS as u16) << 3 | GUEST_PL;
/// Guest user code selector: slot 14, RPL 3.
pub const USER_CS: u16 = (GDT_ENTRY_DEFAULT_USER_CS as u16) << 3 | 3;
/// Guest user data selector: slot 15, RPL 3.
pub const USER_DS: u16 = (GDT_ENTRY_DEFAULT_USER_DS as u16) << 3 | 3;

/// Whether `index` is a TLS slot.
pub const fn is_tls_slot(index: u32) -> bool {
    index >= GDT_ENTRY_TLS_MIN && index < GDT_ENTRY_TLS_MIN + GDT_ENTRY_TLS_ENTRIES
}

/// Whether the guest may never set slot `index` (see [`GUEST_RESERVED_GDT`]).
pub const fn is_guest_reserved_slot(index: u32) -> bool {
    let mut i = 0;
    while i < GUEST_RESERVED_GDT.len() {
        if GUEST_RESERVED_GDT[i] == index {
            return true;
        }
        i += 1;
    }
    false
}

/// A legacy 8-byte segment descriptor as passed in `LHCALL_LOAD_GDT_ENTRY`
/// (`low` = bits 0..32, `high` = bits 32..64) or `LHCALL_LOAD_TLS`.
/// `repr(transparent)`, so `[SegmentDescriptor; 3]` is the 24-byte block
/// `LHCALL_LOAD_TLS` reads.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentDescriptor(pub u64);

impl SegmentDescriptor {
    /// Access-byte bit: present.
    pub const P: u8 = 0x80;
    /// Access-byte bit: code/data (S = 1) rather than system descriptor.
    pub const S: u8 = 0x10;
    /// Access-byte type bit: code segment.
    pub const TYPE_CODE: u8 = 0x08;
    /// Access-byte type bit: readable (code) / writable (data).
    pub const TYPE_RW: u8 = 0x02;
    /// Access-byte type bit: accessed.
    pub const TYPE_ACCESSED: u8 = 0x01;
    /// Flags nibble: 4 KiB granularity.
    pub const FLAG_G: u8 = 0x8;
    /// Flags nibble: 32-bit default operand size.
    pub const FLAG_DB: u8 = 0x4;
    /// Flags nibble: 64-bit code segment (must never reach a guest GDT).
    pub const FLAG_L: u8 = 0x2;

    /// Build a descriptor from base, 20-bit limit, access byte
    /// (P | DPL | S | type) and flags nibble (G | D/B | L | AVL).
    pub const fn new(base: u32, limit: u32, access: u8, flags: u8) -> Self {
        let limit = limit & 0xF_FFFF;
        let low = (limit & 0xFFFF) | ((base & 0xFFFF) << 16);
        let high = ((base >> 16) & 0xFF)
            | ((access as u32) << 8)
            | (limit & 0xF_0000)
            | (((flags & 0xF) as u32) << 20)
            | (base & 0xFF00_0000);
        Self::from_parts(low, high)
    }

    /// A flat 4 GiB, 32-bit code segment (execute/read) with the given DPL.
    pub const fn flat_code(dpl: u8) -> Self {
        Self::new(
            0,
            0xF_FFFF,
            Self::P | ((dpl & 3) << 5) | Self::S | Self::TYPE_CODE | Self::TYPE_RW,
            Self::FLAG_G | Self::FLAG_DB,
        )
    }

    /// A flat 4 GiB, 32-bit data segment (read/write) with the given DPL.
    pub const fn flat_data(dpl: u8) -> Self {
        Self::new(
            0,
            0xF_FFFF,
            Self::P | ((dpl & 3) << 5) | Self::S | Self::TYPE_RW,
            Self::FLAG_G | Self::FLAG_DB,
        )
    }

    /// Assemble from the two dwords of the hypercall.
    pub const fn from_parts(low: u32, high: u32) -> Self {
        Self(((high as u64) << 32) | low as u64)
    }

    /// The low dword (limit 15:0, base 15:0).
    pub const fn low(self) -> u32 {
        self.0 as u32
    }

    /// The high dword (base 23:16, access, limit 19:16, flags, base 31:24).
    pub const fn high(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The access byte (P, DPL, S, type).
    pub const fn access(self) -> u8 {
        (self.high() >> 8) as u8
    }

    /// The 4-bit type field.
    pub const fn typ(self) -> u8 {
        self.access() & 0xF
    }

    /// Present bit.
    pub const fn present(self) -> bool {
        self.access() & Self::P != 0
    }

    /// Descriptor privilege level.
    pub const fn dpl(self) -> u8 {
        (self.access() >> 5) & 3
    }

    /// S bit: true for code/data, false for system descriptors (gates, TSS, LDT).
    pub const fn is_code_or_data(self) -> bool {
        self.access() & Self::S != 0
    }

    /// Code segment (S = 1 and type bit 3).
    pub const fn is_code(self) -> bool {
        self.is_code_or_data() && self.typ() & Self::TYPE_CODE != 0
    }

    /// The flags nibble (G, D/B, L, AVL).
    pub const fn flags(self) -> u8 {
        ((self.high() >> 20) & 0xF) as u8
    }

    /// L bit: 64-bit code segment.
    pub const fn long_mode(self) -> bool {
        self.flags() & Self::FLAG_L != 0
    }

    /// Segment base.
    pub const fn base(self) -> u32 {
        (self.low() >> 16) | ((self.high() & 0xFF) << 16) | (self.high() & 0xFF00_0000)
    }

    /// Raw 20-bit limit (in bytes or 4 KiB units depending on G).
    pub const fn raw_limit(self) -> u32 {
        (self.low() & 0xFFFF) | (self.high() & 0xF_0000)
    }

    /// This descriptor with its DPL replaced.
    pub const fn with_dpl(self, dpl: u8) -> Self {
        Self(self.0 & !(3u64 << 45) | (((dpl & 3) as u64) << 45))
    }

    /// This descriptor with the "accessed" type bit set (the guest's GDT is
    /// read-only to the CPU, so the host pre-sets it).
    pub const fn with_accessed(self) -> Self {
        Self(self.0 | ((Self::TYPE_ACCESSED as u64) << 40))
    }
}

const _: () = assert!(core::mem::size_of::<[SegmentDescriptor; 3]>() == 24);

/// Why a descriptor from `LHCALL_LOAD_GDT_ENTRY`/`LHCALL_LOAD_TLS` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescriptorError {
    /// Present with S = 0: TSS, LDT, call/task/interrupt gate.
    SystemDescriptor,
    /// Present code/data segment with DPL 2: guest code runs at CPL 1
    /// (kernel) or 3 (user), never 2, and no segment may be made for ring 2.
    Dpl2,
    /// Present code segment with L = 1 (would run the guest in 64-bit mode).
    LongModeCode,
}

impl DescriptorError {
    /// Text for the kill reason `"gdt entry %u: <reason>"`.
    pub const fn reason(self) -> &'static str {
        match self {
            DescriptorError::SystemDescriptor => "system descriptor",
            DescriptorError::LongModeCode => "64-bit code segment",
            DescriptorError::Dpl2 => "DPL 2",
        }
    }
}

/// Validate and fix up one guest descriptor exactly as rustyvisor's host
/// does for `LHCALL_LOAD_GDT_ENTRY` and each of the three `LHCALL_LOAD_TLS`
/// entries (the host calls this function; the slot-number checks are
/// separate: see [`is_guest_reserved_slot`]).
///
/// - present system descriptor (S = 0): [`DescriptorError::SystemDescriptor`];
/// - present code segment with L = 1: [`DescriptorError::LongModeCode`];
/// - present code/data segment with DPL 2: [`DescriptorError::Dpl2`] (guest
///   code runs at CPL 1 or 3, never 2; Linux never makes DPL-2 segments, so
///   refusing them costs no guest anything, while raising them to 3 as
///   upstream raises 0 to 1 would silently open them to guest user mode);
/// - not present (P = 0) system, 64-bit code or DPL-2 descriptor: stored as
///   null (Linux clears TLS slots with all-zero; such an entry can never be
///   used);
/// - any other code/data descriptor, present or not: upstream's fixup: DPL 0
///   becomes 1 (the guest kernel runs at ring 1), and the "accessed" type bit
///   is set (the CPU cannot write the read-only GDT to set it). A
///   not-present one then raises #NP(selector) on use, as on hardware.
pub const fn fixup_guest_descriptor(
    desc: SegmentDescriptor,
) -> Result<SegmentDescriptor, DescriptorError> {
    let dangerous =
        !desc.is_code_or_data() || (desc.is_code() && desc.long_mode()) || desc.dpl() == 2;
    if dangerous {
        if !desc.present() {
            return Ok(SegmentDescriptor(0));
        }
        if !desc.is_code_or_data() {
            return Err(DescriptorError::SystemDescriptor);
        }
        if desc.is_code() && desc.long_mode() {
            return Err(DescriptorError::LongModeCode);
        }
        return Err(DescriptorError::Dpl2);
    }
    let desc = if desc.dpl() == 0 {
        desc.with_dpl(GUEST_PL as u8)
    } else {
        desc
    };
    Ok(desc.with_accessed())
}

/// IDT gate type: interrupt gate (delivery clears the virtual IF).
pub const IDT_TYPE_INTERRUPT: u32 = 0xE;
/// IDT gate type: trap gate (virtual IF unchanged).
pub const IDT_TYPE_TRAP: u32 = 0xF;
/// Mask the host applies to the high dword of a stored guest gate: keeps
/// offset 31:16, P, DPL and type.
pub const IDT_HIGH_KEEP_MASK: u32 = 0xFFFF_EF00;

/// Build the two dwords of an i386 IDT gate for `LHCALL_LOAD_IDT_ENTRY`:
/// `low = (selector << 16) | offset[15:0]`,
/// `high = offset[31:16] << 16 | P | DPL << 13 | type << 8`.
pub const fn idt_gate(handler: u32, selector: u16, gate_type: u32, dpl: u8) -> (u32, u32) {
    let low = ((selector as u32) << 16) | (handler & 0xFFFF);
    let high =
        (handler & 0xFFFF_0000) | 0x8000 | (((dpl & 3) as u32) << 13) | ((gate_type & 0xF) << 8);
    (low, high)
}

/// Handler offset of a gate.
pub const fn gate_offset(low: u32, high: u32) -> u32 {
    (low & 0xFFFF) | (high & 0xFFFF_0000)
}

/// Selector of a gate.
pub const fn gate_selector(low: u32) -> u16 {
    (low >> 16) as u16
}

/// Type field (bits 8..12 of the high dword) of a gate.
pub const fn gate_type(high: u32) -> u32 {
    (high >> 8) & 0xF
}

/// Present bit (bit 15 of the high dword) of a gate.
pub const fn gate_present(high: u32) -> bool {
    high & 0x8000 != 0
}

/// DPL of a gate.
pub const fn gate_dpl(high: u32) -> u8 {
    ((high >> 13) & 3) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(KERNEL_CS, 0x61);
        assert_eq!(KERNEL_DS, 0x69);
        assert_eq!(USER_CS, 0x73);
        assert_eq!(USER_DS, 0x7b);
        assert_eq!(KERNEL_CS >> 3, 12);
        assert_eq!(KERNEL_DS >> 3, 13);
    }

    #[test]
    fn reserved_slots() {
        // Pinned: changing the reserved set is an ABI change.
        assert_eq!(GUEST_RESERVED_GDT, [10, 11, 16, 17, 31]);
        for i in 0..GDT_ENTRIES + 4 {
            assert_eq!(is_guest_reserved_slot(i), GUEST_RESERVED_GDT.contains(&i));
        }
        // The slots guests need are never reserved.
        for i in [12, 13, 14, 15, 6, 7, 8] {
            assert!(!is_guest_reserved_slot(i), "slot {i}");
        }
        assert!(!is_guest_reserved_slot(GDT_ENTRY_KERNEL_CS));
        assert!(is_tls_slot(6) && is_tls_slot(8));
        assert!(!is_tls_slot(5) && !is_tls_slot(9));
    }

    #[test]
    fn flat_descriptors_match_linux() {
        // GDT_ENTRY(0xc09b, 0, 0xfffff) with DPL raised to 1 and accessed set
        // is what the host installs for slot 12.
        let cs = SegmentDescriptor::flat_code(1);
        assert_eq!(cs.0, 0x00CF_BA00_0000_FFFF);
        assert_eq!(cs.with_accessed().0, 0x00CF_BB00_0000_FFFF);
        let ds = SegmentDescriptor::flat_data(1);
        assert_eq!(ds.0, 0x00CF_B200_0000_FFFF);
        assert!(cs.present() && cs.is_code() && !cs.long_mode());
        assert_eq!(cs.dpl(), 1);
        assert!(ds.is_code_or_data() && !ds.is_code());
        assert_eq!(SegmentDescriptor::flat_code(0).with_dpl(1), cs);
    }

    #[test]
    fn descriptor_fields_round_trip() {
        let d = SegmentDescriptor::new(0x1234_5678, 0xA_BCDE, 0xF2, 0x4);
        assert_eq!(d.base(), 0x1234_5678);
        assert_eq!(d.raw_limit(), 0xA_BCDE);
        assert_eq!(d.access(), 0xF2);
        assert_eq!(d.dpl(), 3);
        assert_eq!(d.flags(), 0x4);
        assert_eq!(SegmentDescriptor::from_parts(d.low(), d.high()), d);
    }

    #[test]
    fn dangerous_descriptors_are_recognisable() {
        // 64-bit code segment: L = 1.
        let long = SegmentDescriptor::new(
            0,
            0xF_FFFF,
            0xBA,
            SegmentDescriptor::FLAG_G | SegmentDescriptor::FLAG_L,
        );
        assert!(long.long_mode() && long.is_code());
        // Call gate / TSS: S = 0.
        let tss = SegmentDescriptor::new(0x1000, 0x67, 0x89, 0);
        assert!(!tss.is_code_or_data());
        assert_eq!(tss.typ(), 9);
    }

    #[test]
    fn descriptor_fixup() {
        // DPL 0 flat code becomes DPL 1, accessed.
        let d = fixup_guest_descriptor(SegmentDescriptor::flat_code(0)).unwrap();
        assert_eq!(d.0, 0x00CF_BB00_0000_FFFF);
        // DPL 3 user data keeps its DPL.
        let d = fixup_guest_descriptor(SegmentDescriptor::flat_data(3)).unwrap();
        assert_eq!(d.dpl(), 3);
        assert_eq!(d.typ() & SegmentDescriptor::TYPE_ACCESSED, 1);
        // Not present system / 64-bit entries become null (zero stays zero).
        assert_eq!(
            fixup_guest_descriptor(SegmentDescriptor(0)),
            Ok(SegmentDescriptor(0))
        );
        let np = SegmentDescriptor::new(0, 0xFFFFF, 0x0B, 0x2); // S=0, L=1, but P=0
        assert_eq!(fixup_guest_descriptor(np), Ok(SegmentDescriptor(0)));
        let np_long = SegmentDescriptor::new(0, 0xFFFFF, 0x1A, SegmentDescriptor::FLAG_L);
        assert_eq!(fixup_guest_descriptor(np_long), Ok(SegmentDescriptor(0)));
        // A not-present data segment keeps its fields, with the fixups.
        let np_data = SegmentDescriptor::new(0x1000, 0xFFFFF, 0x12, SegmentDescriptor::FLAG_G);
        let fixed = fixup_guest_descriptor(np_data).unwrap();
        assert!(!fixed.present());
        assert_eq!(fixed, np_data.with_dpl(1).with_accessed());
        // 64-bit code.
        let long = SegmentDescriptor::new(0, 0, 0x9A, SegmentDescriptor::FLAG_L);
        assert_eq!(
            fixup_guest_descriptor(long),
            Err(DescriptorError::LongModeCode)
        );
        // L on a data segment is ignored by the CPU, so allowed.
        let data_l = SegmentDescriptor::new(0, 0, 0x92, SegmentDescriptor::FLAG_L);
        assert!(fixup_guest_descriptor(data_l).is_ok());
        // System descriptors: 32-bit TSS (type 9), LDT (2), call gate (0xC).
        for typ in [0x9u8, 0x2, 0xC] {
            let sys = SegmentDescriptor::new(0x1000, 0x67, 0x80 | 0x20 | typ, 0);
            assert_eq!(
                fixup_guest_descriptor(sys),
                Err(DescriptorError::SystemDescriptor)
            );
        }
        assert_eq!(
            DescriptorError::LongModeCode.reason(),
            "64-bit code segment"
        );
        assert_eq!(
            DescriptorError::SystemDescriptor.reason(),
            "system descriptor"
        );
    }

    #[test]
    fn idt_gates() {
        let (lo, hi) = idt_gate(0x0040_1234, KERNEL_CS, IDT_TYPE_INTERRUPT, 0);
        assert_eq!(lo, 0x0061_1234);
        assert_eq!(hi, 0x0040_8E00);
        let (lo, hi) = idt_gate(0xDEAD_BEEF, KERNEL_CS, IDT_TYPE_TRAP, 3);
        assert_eq!(hi, 0xDEAD_EF00);
        assert_eq!(gate_offset(lo, hi), 0xDEAD_BEEF);
        assert_eq!(gate_selector(lo), 0x61);
        assert_eq!(gate_type(hi), 0xF);
        assert!(gate_present(hi));
        assert_eq!(gate_dpl(hi), 3);
        assert_eq!(hi & IDT_HIGH_KEEP_MASK, hi);
        assert!(!gate_present(0));
    }
}
