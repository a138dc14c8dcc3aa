//! The guest's GDT (docs/abi.md, section 7): 32 slots in Linux's i386 layout, filled
//! by `LHCALL_LOAD_GDT_ENTRY` / `LHCALL_LOAD_TLS`, plus the selector checks
//! the switcher applies before loading a guest selector.
//!
//! # Policy (harder than lguest)
//!
//! | Guest does | lguest | rustyvisor |
//! |---|---|---|
//! | index ≥ 32 | kill "too many gdt entries %u" | same |
//! | index in [`GUEST_RESERVED_GDT`](guest_abi::seg::GUEST_RESERVED_GDT) (10, 11, 16, 17, 31) | accepted, never copied | same: accepted and ignored, the descriptor not even looked at (a real Linux guest loads its whole GDT, these slots included, its TSS in 16) |
//! | present system descriptor (S = 0: TSS, LDT, call/task/interrupt gate) | accepted | **kill** "gdt entry %u: system descriptor" |
//! | present 64-bit code segment (L = 1) | n/a (32-bit host) | **kill** "gdt entry %u: 64-bit code segment" |
//! | present code/data with DPL 2 | accepted (the guest could run at CPL 2) | **kill** "gdt entry %u: DPL 2" |
//! | DPL 0 | raised to 1 | same |
//! | accessed bit clear | set | same |
//! | not-present code/data entry | stored (with the fixups) | same: loading it raises #NP(selector) |
//! | not-present system, 64-bit or DPL-2 entry (e.g. Linux's all-zero clear) | stored | stored as all-zero |
//!
//! Slot 17 is reserved because the host's 64-bit TSS descriptor is 16 bytes
//! (slots 16 and 17). The reserved set and the descriptor rules are
//! `guest_abi`'s ([`GUEST_RESERVED_GDT`](guest_abi::seg::GUEST_RESERVED_GDT), [`fixup_guest_descriptor`]): the
//! guest's ABI crate and the host cannot disagree. The reserved slots of our
//! copy are always zero, so a guest selector naming them never validates.
//!
//! Together with the selector checks this guarantees the guest can never hold
//! a CPL-0, CPL-2 or 64-bit code selector, nor reach a gate or TSS through its
//! GDT: with no DPL-2 segment in the GDT, no far jump, call or `iret` can
//! reach CPL 2 (a non-conforming target needs DPL = CPL, an `iret` to ring 2
//! needs a DPL-2 stack segment).
//!
//! A stack segment must also be 32-bit (B = 1): returning to a 16-bit SS,
//! `iretq` loads only SP and leaves bits 31:16 of the hypervisor's own RSP in
//! the guest's ESP (the "espfix" leak). Data segments with B = 0 are fine in
//! DS/ES/FS/GS, so the rule is in [`GuestGdt::valid_stack_selector`], not in
//! the descriptor fixups.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use guest_abi::seg::{
    DescriptorError, GDT_ENTRIES, SegmentDescriptor, fixup_guest_descriptor, is_guest_reserved_slot,
};

use super::kill::{Kill, kill};

/// First TLS slot (`LHCALL_LOAD_TLS` fills 6, 7, 8).
pub const TLS_FIRST: usize = 6;
/// Number of TLS slots.
pub const TLS_ENTRIES: usize = 3;

/// Slot of the guest kernel code segment (selector 0x61).
pub const KERNEL_CS_SLOT: usize = 12;
/// Slot of the guest kernel data segment (selector 0x69).
pub const KERNEL_DS_SLOT: usize = 13;

/// Initial slot 12: flat 4 GiB 32-bit code, DPL 1, accessed.
pub const INITIAL_KERNEL_CS: u64 = 0x00CF_BB00_0000_FFFF;
/// Initial slot 13: flat 4 GiB 32-bit data, DPL 1, accessed.
pub const INITIAL_KERNEL_DS: u64 = 0x00CF_B300_0000_FFFF;

/// Type bit: conforming (code) / expand-down (data).
const TYPE_CONFORMING: u8 = 0x4;

/// The guest's 32 GDT entries after validation and fixup.
#[derive(Debug, Clone)]
pub struct GuestGdt {
    entries: [u64; GDT_ENTRIES as usize],
    generation: u64,
    /// The TLS entries of the last `load_tls` as the guest gave them, and
    /// the generation that load left: the same ones again, with nothing
    /// changed since, change nothing (Linux loads them at every context
    /// switch). A cache: not part of the GDT's value.
    last_tls: Option<([u64; TLS_ENTRIES], u64)>,
}

impl PartialEq for GuestGdt {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries && self.generation == other.generation
    }
}

impl Eq for GuestGdt {}

impl Default for GuestGdt {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestGdt {
    /// The boot GDT: slots 12/13 flat code/data at DPL 1, everything else zero.
    pub fn new() -> Self {
        let mut entries = [0u64; GDT_ENTRIES as usize];
        entries[KERNEL_CS_SLOT] = INITIAL_KERNEL_CS;
        entries[KERNEL_DS_SLOT] = INITIAL_KERNEL_DS;
        Self {
            entries,
            generation: 0,
            last_tls: None,
        }
    }

    /// All 32 entries, as the switcher copies them into the hardware GDT
    /// (the [`GUEST_RESERVED_GDT`](guest_abi::seg::GUEST_RESERVED_GDT) slots are always 0 here; the switcher puts the
    /// host's own descriptors there).
    pub fn entries(&self) -> &[u64; GDT_ENTRIES as usize] {
        &self.entries
    }

    /// Entry `index`, if `index < 32`.
    pub fn entry(&self, index: usize) -> Option<u64> {
        self.entries.get(index).copied()
    }

    /// Incremented on every change, so the switcher can skip copying an
    /// unchanged GDT.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Validate and fix up one descriptor destined for slot `index`
    /// (the ABI crate's rule, with lguest-style kill reasons).
    fn fixup(index: usize, raw: u64) -> Result<u64, Kill> {
        match fixup_guest_descriptor(SegmentDescriptor(raw)) {
            Ok(d) => Ok(d.0),
            Err(
                e @ (DescriptorError::SystemDescriptor
                | DescriptorError::LongModeCode
                | DescriptorError::Dpl2),
            ) => {
                kill!("gdt entry {index}: {}", e.reason())
            }
        }
    }

    fn check_index(index: u32) -> Result<usize, Kill> {
        if index >= GDT_ENTRIES {
            return kill!("too many gdt entries {index}");
        }
        Ok(index as usize)
    }

    /// `LHCALL_LOAD_GDT_ENTRY(index, lo, hi)`. A write to a host-reserved
    /// slot is accepted and ignored, as lguest did: the slot keeps the
    /// host's descriptor.
    pub fn load_entry(&mut self, index: u32, lo: u32, hi: u32) -> Result<(), Kill> {
        let i = Self::check_index(index)?;
        if is_guest_reserved_slot(index) {
            return Ok(());
        }
        let v = Self::fixup(i, SegmentDescriptor::from_parts(lo, hi).0)?;
        if let Some(slot) = self.entries.get_mut(i)
            && *slot != v
        {
            *slot = v;
            self.generation = self.generation.wrapping_add(1);
        }
        Ok(())
    }

    /// Whether `LHCALL_LOAD_TLS` of `tls` would change nothing: they are
    /// the descriptors loaded last, and the GDT has not changed since.
    #[inline]
    pub fn tls_unchanged(&self, tls: &[u64; TLS_ENTRIES]) -> bool {
        // (Word by word: a compare of the arrays would be a `memcmp` call.)
        let [x, y, z] = *tls;
        matches!(self.last_tls, Some(([a, b, c], g))
            if g == self.generation && a == x && b == y && c == z)
    }

    /// `LHCALL_LOAD_TLS`: the three descriptors for slots 6..=8. All three are
    /// validated before any is stored.
    pub fn load_tls(&mut self, tls: &[u64; TLS_ENTRIES]) -> Result<(), Kill> {
        if self.tls_unchanged(tls) {
            return Ok(());
        }
        let mut fixed = [0u64; TLS_ENTRIES];
        for ((out, &raw), index) in fixed.iter_mut().zip(tls.iter()).zip(TLS_FIRST..) {
            *out = Self::fixup(index, raw)?;
        }
        // Linux loads its TLS entries at every context switch, mostly the
        // same ones: only a change is a new generation (which makes the
        // next entry copy the GDT and re-check the selectors).
        if let Some(dst) = self.entries.get_mut(TLS_FIRST..TLS_FIRST + TLS_ENTRIES)
            && dst.iter().zip(fixed.iter()).any(|(a, b)| a != b)
        {
            dst.copy_from_slice(&fixed);
            self.generation = self.generation.wrapping_add(1);
        }
        self.last_tls = Some((*tls, self.generation));
        Ok(())
    }

    /// The present code/data descriptor `sel` names in this GDT (TI = 0),
    /// or `None`.
    fn lookup(&self, sel: u16) -> Option<SegmentDescriptor> {
        if sel & 4 != 0 {
            return None; // LDT: we have none.
        }
        let d = SegmentDescriptor(self.entry(usize::from(sel >> 3))?);
        (d.present() && d.is_code_or_data() && !(d.is_code() && d.long_mode())).then_some(d)
    }

    /// Whether `sel` may be in DS/ES/FS/GS while the guest runs at `cpl`
    /// (1 or 3): the null selector (any RPL), or a present data segment /
    /// readable code segment with DPL ≥ max(CPL, RPL) (conforming readable
    /// code: any DPL).
    pub fn valid_data_selector(&self, sel: u16, cpl: u8) -> bool {
        if sel & !3 == 0 {
            return true;
        }
        let Some(d) = self.lookup(sel) else {
            return false;
        };
        let rpl = (sel & 3) as u8;
        if d.is_code() {
            if d.typ() & SegmentDescriptor::TYPE_RW == 0 {
                return false;
            }
            if d.typ() & TYPE_CONFORMING != 0 {
                return true;
            }
        }
        d.dpl() >= cpl.max(rpl)
    }

    /// Whether `sel` may be loaded into CS; the guest then runs at CPL =
    /// RPL, which must be 1 (kernel) or 3 (user). Non-conforming code needs
    /// DPL == RPL, conforming code DPL ≤ RPL. Never a 64-bit segment.
    pub fn valid_code_selector(&self, sel: u16) -> bool {
        let rpl = (sel & 3) as u8;
        if rpl != 1 && rpl != 3 {
            return false;
        }
        let Some(d) = self.lookup(sel) else {
            return false;
        };
        if !d.is_code() || d.long_mode() {
            return false;
        }
        if d.typ() & TYPE_CONFORMING != 0 {
            d.dpl() <= rpl
        } else {
            d.dpl() == rpl
        }
    }

    /// Whether `sel` may be loaded into SS at `cpl` (1 or 3): RPL == DPL ==
    /// CPL and a present, writable, 32-bit (B = 1) data segment. A 16-bit
    /// stack segment is refused: `iretq` to it would leave bits 31:16 of the
    /// host's RSP in the guest's ESP.
    pub fn valid_stack_selector(&self, sel: u16, cpl: u8) -> bool {
        let rpl = (sel & 3) as u8;
        if rpl != cpl || (cpl != 1 && cpl != 3) {
            return false;
        }
        let Some(d) = self.lookup(sel) else {
            return false;
        };
        !d.is_code()
            && d.typ() & SegmentDescriptor::TYPE_RW != 0
            && d.dpl() == cpl
            && d.flags() & SegmentDescriptor::FLAG_DB != 0
    }

    /// Whether `sel` names a 16-bit code segment (D = 0), whose default
    /// operand and address size is 16 bits. `false` for anything that is
    /// not a present code segment of this GDT.
    pub fn is_16bit_code(&self, sel: u16) -> bool {
        self.lookup(sel)
            .is_some_and(|d| d.is_code() && d.flags() & SegmentDescriptor::FLAG_DB == 0)
    }

    /// Base address of the segment `sel` names (0 for the null selector or
    /// anything that doesn't validate as a present code/data segment).
    #[inline]
    pub fn segment_base(&self, sel: u16) -> u32 {
        self.lookup(sel).map_or(0, |d| d.base())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::seg::GUEST_RESERVED_GDT;

    const USER_CODE: u64 = 0x00CF_FA00_0000_FFFF; // DPL 3, code, readable
    const USER_DATA: u64 = 0x00CF_F200_0000_FFFF; // DPL 3, data, writable
    const KCODE_DPL0: u64 = 0x00CF_9A00_0000_FFFF;
    const KDATA_DPL0: u64 = 0x00CF_9200_0000_FFFF;

    fn parts(v: u64) -> (u32, u32) {
        (v as u32, (v >> 32) as u32)
    }

    fn load(g: &mut GuestGdt, i: u32, v: u64) -> Result<(), Kill> {
        let (lo, hi) = parts(v);
        g.load_entry(i, lo, hi)
    }

    #[test]
    fn initial() {
        let g = GuestGdt::new();
        assert_eq!(g.entry(12), Some(0x00CF_BB00_0000_FFFF));
        assert_eq!(g.entry(13), Some(0x00CF_B300_0000_FFFF));
        assert_eq!(
            SegmentDescriptor::flat_code(1).with_accessed().0,
            INITIAL_KERNEL_CS
        );
        assert_eq!(
            SegmentDescriptor::flat_data(1).with_accessed().0,
            INITIAL_KERNEL_DS
        );
        for (i, &e) in g.entries().iter().enumerate() {
            if i != 12 && i != 13 {
                assert_eq!(e, 0, "slot {i}");
            }
        }
        assert!(g.valid_code_selector(0x61));
        assert!(g.valid_stack_selector(0x69, 1));
        assert!(g.valid_data_selector(0x69, 1));
        assert_eq!(g.entry(32), None);
    }

    #[test]
    fn dpl0_raised_accessed_set() {
        let mut g = GuestGdt::new();
        load(&mut g, 12, KCODE_DPL0).unwrap();
        load(&mut g, 13, KDATA_DPL0).unwrap();
        assert_eq!(g.entry(12), Some(INITIAL_KERNEL_CS));
        assert_eq!(g.entry(13), Some(INITIAL_KERNEL_DS));
        load(&mut g, 14, USER_CODE).unwrap();
        assert_eq!(g.entry(14), Some(USER_CODE | 1 << 40));
    }

    #[test]
    fn index_checks() {
        let mut g = GuestGdt::new();
        assert_eq!(
            load(&mut g, 32, USER_DATA).unwrap_err().as_str(),
            "too many gdt entries 32"
        );
        assert_eq!(
            load(&mut g, u32::MAX, USER_DATA).unwrap_err().as_str(),
            "too many gdt entries 4294967295"
        );
        for r in GUEST_RESERVED_GDT {
            let before = g.generation();
            assert_eq!(load(&mut g, r, USER_DATA), Ok(()));
            assert_eq!(g.entry(r as usize), Some(0), "ignored");
            assert_eq!(g.generation(), before, "nothing changed");
        }
    }

    /// A guest that follows `guest_abi::GUEST_RESERVED_GDT` is never killed
    /// for a slot number: every slot the crate lists kills, every other slot
    /// below `GDT_ENTRIES` accepts any valid descriptor (and a cleared one).
    #[test]
    fn reserved_set_is_exactly_the_abi_crates() {
        for slot in 0..GDT_ENTRIES {
            for desc in [USER_DATA, USER_CODE, KDATA_DPL0, 0] {
                let mut g = GuestGdt::new();
                let r = load(&mut g, slot, desc);
                if GUEST_RESERVED_GDT.contains(&slot) {
                    assert_eq!(r, Ok(()), "slot {slot}: accepted");
                    assert_eq!(g.entry(slot as usize), Some(0), "slot {slot}: ignored");
                } else {
                    assert_eq!(r, Ok(()), "slot {slot} desc {desc:#x}");
                    assert_ne!(g.entry(slot as usize), None);
                }
            }
        }
        // TLS slots go through the same rule (6..=8 are never reserved).
        let mut g = GuestGdt::new();
        g.load_tls(&[USER_DATA; 3]).unwrap();
    }

    #[test]
    fn system_and_long_descriptors_refused() {
        let mut g = GuestGdt::new();
        let tss = SegmentDescriptor::new(0x1000, 0x67, 0x89, 0).0;
        assert_eq!(
            load(&mut g, 20, tss).unwrap_err().as_str(),
            "gdt entry 20: system descriptor"
        );
        // 32-bit call gate (type 0xC) with DPL 3.
        let gate = 0x0000_EC00_0061_1000u64;
        assert!(load(&mut g, 21, gate).is_err());
        // LDT (type 2).
        let ldt = SegmentDescriptor::new(0, 0xFFFF, 0x82, 0).0;
        assert!(load(&mut g, 22, ldt).is_err());
        let long = SegmentDescriptor::new(
            0,
            0xF_FFFF,
            0xFA,
            SegmentDescriptor::FLAG_G | SegmentDescriptor::FLAG_L,
        )
        .0;
        assert_eq!(
            load(&mut g, 14, long).unwrap_err().as_str(),
            "gdt entry 14: 64-bit code segment"
        );
        assert_eq!(g.entry(14), Some(0));
        // L on a data segment is meaningless: accepted.
        let data_l = SegmentDescriptor::new(0, 0xF_FFFF, 0xF2, SegmentDescriptor::FLAG_L).0;
        load(&mut g, 15, data_l).unwrap();
        // Not present: system and 64-bit entries are stored as null...
        let np_long = long & !(0x80u64 << 40);
        load(&mut g, 14, np_long).unwrap();
        assert_eq!(g.entry(14), Some(0));
        load(&mut g, 20, tss & !(0x80u64 << 40)).unwrap();
        assert_eq!(g.entry(20), Some(0));
        // ... a not-present data segment is kept (DPL raised, accessed set,
        // still not present), so using it raises #NP.
        let np_data = SegmentDescriptor::new(0, 0xF_FFFF, 0x12, SegmentDescriptor::FLAG_G).0;
        load(&mut g, 21, np_data).unwrap();
        let stored = SegmentDescriptor(g.entry(21).unwrap());
        assert!(!stored.present());
        assert_eq!(stored.dpl(), 1);
        assert_eq!(
            stored.0,
            SegmentDescriptor(np_data).with_dpl(1).with_accessed().0
        );
    }

    /// The same TLS entries loaded again after something else rewrote a
    /// TLS slot are stored again (the last load's cache only answers while
    /// the GDT is as that load left it).
    #[test]
    fn tls_again_after_a_slot_was_rewritten() {
        let mut g = GuestGdt::new();
        let tls = [USER_DATA, 0, KDATA_DPL0];
        g.load_tls(&tls).unwrap();
        let stored = g.entry(6);
        g.load_entry(6, 0, 0).unwrap();
        assert_eq!(g.entry(6), Some(0));
        g.load_tls(&tls).unwrap();
        assert_eq!(g.entry(6), stored);
        // And a bad one after a good one is still refused.
        let bad = [USER_DATA, 0, SegmentDescriptor::new(0, 0, 0x89, 0).0];
        assert!(g.load_tls(&bad).is_err());
    }

    #[test]
    fn tls() {
        let mut g = GuestGdt::new();
        let gen0 = g.generation();
        let tls = [USER_DATA, 0, KDATA_DPL0];
        g.load_tls(&tls).unwrap();
        assert_eq!(g.entry(6), Some(USER_DATA | 1 << 40));
        assert_eq!(g.entry(7), Some(0));
        assert_eq!(g.entry(8), Some(INITIAL_KERNEL_DS));
        assert_ne!(g.generation(), gen0);
        // The same entries again (Linux at every context switch): no new
        // generation; one changed entry: a new one.
        let gen1 = g.generation();
        g.load_tls(&tls).unwrap();
        assert_eq!(g.generation(), gen1);
        g.load_tls(&[USER_DATA, USER_DATA, KDATA_DPL0]).unwrap();
        assert_ne!(g.generation(), gen1);
        let gen2 = g.generation();
        g.load_entry(12, USER_DATA as u32, (USER_DATA >> 32) as u32)
            .unwrap();
        assert_ne!(g.generation(), gen2);
        let gen3 = g.generation();
        g.load_entry(12, USER_DATA as u32, (USER_DATA >> 32) as u32)
            .unwrap();
        assert_eq!(g.generation(), gen3);
        // A bad one in the middle: nothing stored.
        let bad = [
            USER_DATA,
            SegmentDescriptor::new(0, 0x67, 0x89, 0).0,
            USER_DATA,
        ];
        g.load_tls(&[0, 0, 0]).unwrap();
        assert_eq!(
            g.load_tls(&bad).unwrap_err().as_str(),
            "gdt entry 7: system descriptor"
        );
        assert_eq!(&g.entries()[6..9], &[0, 0, 0]);
    }

    #[test]
    fn data_selectors() {
        let mut g = GuestGdt::new();
        load(&mut g, 15, USER_DATA).unwrap();
        load(&mut g, 14, USER_CODE).unwrap();
        // Null with any RPL.
        for s in 0..4 {
            assert!(g.valid_data_selector(s, 1));
            assert!(g.valid_data_selector(s, 3));
        }
        assert!(g.valid_data_selector(0x69, 1));
        assert!(!g.valid_data_selector(0x6b, 1)); // RPL 3 > DPL 1
        assert!(!g.valid_data_selector(0x69, 3)); // kernel data from user
        assert!(g.valid_data_selector(0x7b, 3));
        assert!(g.valid_data_selector(0x7b, 1));
        assert!(g.valid_data_selector(0x73, 3)); // readable code
        assert!(!g.valid_data_selector(0x6c, 1)); // TI = 1
        assert!(!g.valid_data_selector(0x50, 1)); // host slot
        assert!(!g.valid_data_selector(0x51, 1));
        assert!(!g.valid_data_selector(0x81, 1)); // TSS slot
        assert!(!g.valid_data_selector(0xff, 3)); // slot 31
        assert!(!g.valid_data_selector(0x103, 3)); // slot 32
        assert!(!g.valid_data_selector(0xffff, 3));
        assert!(!g.valid_data_selector(0x21, 1)); // empty slot 4
        // Execute-only code isn't loadable as data.
        load(&mut g, 20, 0x00CF_F800_0000_FFFF).unwrap();
        assert!(!g.valid_data_selector(0xa3, 3));
    }

    #[test]
    fn code_selectors() {
        let mut g = GuestGdt::new();
        load(&mut g, 14, USER_CODE).unwrap();
        load(&mut g, 15, USER_DATA).unwrap();
        assert!(g.valid_code_selector(0x61));
        assert!(g.valid_code_selector(0x73));
        assert!(!g.valid_code_selector(0x60)); // RPL 0
        assert!(!g.valid_code_selector(0x62)); // RPL 2
        assert!(!g.valid_code_selector(0x63)); // DPL 1 != RPL 3
        assert!(!g.valid_code_selector(0x71)); // DPL 3 != RPL 1
        assert!(!g.valid_code_selector(0x69)); // data
        assert!(!g.valid_code_selector(0x7b));
        assert!(!g.valid_code_selector(0x51)); // host CS slot
        assert!(!g.valid_code_selector(0x65)); // TI
        assert!(!g.valid_code_selector(0x01)); // null
        // Conforming DPL 1 code is usable from RPL 3.
        load(&mut g, 20, 0x00CF_BE00_0000_FFFF).unwrap();
        assert!(g.valid_code_selector(0xa3));
        assert!(g.valid_code_selector(0xa1));
    }

    #[test]
    fn stack_selectors() {
        let mut g = GuestGdt::new();
        load(&mut g, 15, USER_DATA).unwrap();
        load(&mut g, 14, USER_CODE).unwrap();
        assert!(g.valid_stack_selector(0x69, 1));
        assert!(g.valid_stack_selector(0x7b, 3));
        assert!(!g.valid_stack_selector(0x7b, 1)); // RPL != CPL
        assert!(!g.valid_stack_selector(0x79, 1)); // DPL 3 != CPL 1
        assert!(!g.valid_stack_selector(0x6b, 3));
        assert!(!g.valid_stack_selector(0x61, 1)); // code
        assert!(!g.valid_stack_selector(0x01, 1)); // null
        // Read-only data can't be a stack.
        load(&mut g, 20, 0x00CF_B000_0000_FFFF).unwrap();
        assert!(!g.valid_stack_selector(0xa1, 1));
    }

    /// DPL 2 is refused for code and data, present; a not-present one is
    /// stored as null; DPL 0, 1 and 3 around it are accepted.
    #[test]
    fn dpl2_refused() {
        for (access, what) in [(0xDAu8, "code"), (0xD2, "data"), (0xDE, "conforming code")] {
            let d = SegmentDescriptor::new(0, 0xF_FFFF, access, 0xC).0;
            let mut g = GuestGdt::new();
            assert_eq!(
                load(&mut g, 20, d).unwrap_err().as_str(),
                "gdt entry 20: DPL 2",
                "{what}"
            );
            assert_eq!(g.entry(20), Some(0), "{what}");
            let np = d & !(0x80u64 << 40);
            load(&mut g, 20, np).unwrap();
            assert_eq!(g.entry(20), Some(0), "{what} not present");
            for dpl in [0u8, 1, 3] {
                let ok = SegmentDescriptor(d).with_dpl(dpl).0;
                load(&mut g, 20, ok).unwrap();
                assert_eq!(
                    SegmentDescriptor(g.entry(20).unwrap()).dpl(),
                    dpl.max(1),
                    "{what} dpl {dpl}"
                );
            }
        }
        let mut g = GuestGdt::new();
        let d2 = SegmentDescriptor::new(0, 0xF_FFFF, 0xD2, 0xC).0;
        assert_eq!(
            g.load_tls(&[USER_DATA, USER_DATA, d2])
                .unwrap_err()
                .as_str(),
            "gdt entry 8: DPL 2"
        );
        assert_eq!(g.entry(6), Some(0));
    }

    /// No selector validates for CPL 2: code with RPL 2 (even conforming
    /// code of a lower DPL), a stack at CPL 2.
    #[test]
    fn no_cpl2_selectors() {
        let mut g = GuestGdt::new();
        load(&mut g, 20, 0x00CF_BE00_0000_FFFF).unwrap(); // conforming DPL 1
        assert!(!g.valid_code_selector(0xa2));
        assert!(!g.valid_code_selector(0x62));
        assert!(!g.valid_stack_selector(0x6a, 2));
        assert!(!g.valid_stack_selector(0x7a, 2));
        assert!(g.valid_stack_selector(0x69, 1));
    }

    /// A stack segment must be 32-bit (B = 1); a 16-bit data segment is
    /// still fine in DS/ES/FS/GS.
    #[test]
    fn stack16_refused() {
        let mut g = GuestGdt::new();
        let data16 = SegmentDescriptor::new(0, 0xF_FFFF, 0xB2, SegmentDescriptor::FLAG_G).0;
        load(&mut g, 20, data16).unwrap();
        assert!(!g.valid_stack_selector(0xa1, 1));
        assert!(g.valid_data_selector(0xa1, 1));
        let data32 = SegmentDescriptor(data16).0 | (u64::from(SegmentDescriptor::FLAG_DB) << 52);
        load(&mut g, 20, data32).unwrap();
        assert!(g.valid_stack_selector(0xa1, 1));
        // User stack too.
        let u16s = SegmentDescriptor::new(0, 0xF_FFFF, 0xF2, 0).0;
        load(&mut g, 21, u16s).unwrap();
        assert!(!g.valid_stack_selector(0xab, 3));
        assert!(g.valid_data_selector(0xab, 3));
    }

    #[test]
    fn code_size() {
        let mut g = GuestGdt::new();
        assert!(!g.is_16bit_code(0x61));
        let code16 = SegmentDescriptor::new(0, 0xFFFF, 0xBA, 0).0;
        load(&mut g, 20, code16).unwrap();
        assert!(g.is_16bit_code(0xa1));
        assert!(!g.is_16bit_code(0x69)); // data
        assert!(!g.is_16bit_code(0)); // null
        assert!(!g.is_16bit_code(0xa5)); // TI
    }

    #[test]
    fn bases() {
        let mut g = GuestGdt::new();
        let d = SegmentDescriptor::new(0x1234_5000, 0xFFFF, 0xF2, 0x4).0;
        load(&mut g, 6, d).unwrap();
        assert_eq!(g.segment_base(0x33), 0x1234_5000);
        assert_eq!(g.segment_base(0x61), 0);
        assert_eq!(g.segment_base(0), 0);
        assert_eq!(g.segment_base(0x3c), 0); // TI
        assert_eq!(g.segment_base(0xffff), 0);
    }
}
