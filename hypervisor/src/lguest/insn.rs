//! Decoding the few guest instructions the host emulates after a #GP(0)
//! (docs/abi.md, section 7, "Traps the host handles itself"):
//!
//! | bytes | instruction | emulated at |
//! |---|---|---|
//! | `FA` | `cli` | CPL 1 |
//! | `E4 ib`, `E5 ib`, `EC`, `ED` | `in` | CPL 1 |
//! | `E6 ib`, `E7 ib`, `EE`, `EF` | `out` | CPL 1 |
//! | `0F 01 /0` (memory) | `sgdt m` | CPL 1 and 3 |
//! | `0F 01 /1` (memory) | `sidt m` | CPL 1 and 3 |
//! | `0F 01 /4` | `smsw r/m` | CPL 1 and 3 |
//! | `0F 00 /0` | `sldt r/m` | CPL 1 and 3 |
//! | `0F 00 /1` | `str r/m` | CPL 1 and 3 |
//!
//! The last five raise #GP(0) outside ring 0 once CR4.UMIP is on.
//!
//! Prefixes: operand size (`66`), address size (`67`) and the six segment
//! overrides, in any order and number, within the 15-byte instruction
//! limit. The default operand and address size come from the code segment
//! (a 16-bit code segment flips the meaning of `66` and `67`). Memory
//! operands use 32-bit ModRM/SIB addressing (every form: disp32 alone,
//! base, base + disp8/disp32, SIB with scale, index and the no-base and
//! no-index encodings); 16-bit addressing is not decoded. `lock`, `rep`
//! and `repne` (`F0`, `F3`, `F2`) are not decoded either. An instruction
//! that is not in the table, is cut short by an unreadable byte, or is
//! longer than 15 bytes is "not emulated": the host reflects the #GP.
//!
//! Pure: the caller supplies the instruction bytes (a fetch function that
//! may fail) and the general registers.

// Guest-controlled values: every index is a `get()`, every sum a wrapping
// operation (address arithmetic wraps at 4 GiB, as on the CPU).
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

/// The longest x86 instruction.
pub const MAX_LEN: u32 = 15;

/// A segment register, as a prefix or an addressing default names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// `26`.
    Es,
    /// `2E`.
    Cs,
    /// `36`; the default with base register ESP or EBP.
    Ss,
    /// `3E`; the default otherwise.
    Ds,
    /// `64`.
    Fs,
    /// `65`.
    Gs,
}

/// Where a result goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// General register by ModRM number: 0 eax, 1 ecx, 2 edx, 3 ebx, 4 esp,
    /// 5 ebp, 6 esi, 7 edi.
    Reg(u8),
    /// Memory at `offset` in segment `seg` (the caller adds the base).
    Mem {
        /// Segment (override or default).
        seg: Seg,
        /// Effective address, wrapped to 32 bits.
        offset: u32,
    },
}

/// Size of an `in`/`out` access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// `al`.
    Byte,
    /// `ax`.
    Word,
    /// `eax`.
    Dword,
}

/// A decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `cli`.
    Cli,
    /// `in` to al/ax/eax.
    In(Width),
    /// `out` from al/ax/eax.
    Out(Width),
    /// `sgdt m` (always memory).
    Sgdt(Operand),
    /// `sidt m` (always memory).
    Sidt(Operand),
    /// `smsw r/m`.
    Smsw(Operand),
    /// `sldt r/m`.
    Sldt(Operand),
    /// `str r/m`.
    Str(Operand),
}

/// A decoded instruction with its length and operand size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// What it is.
    pub op: Op,
    /// Its length in bytes (prefixes included).
    pub len: u32,
    /// Operand size 16 (a 32-bit segment with `66`, or a 16-bit one without).
    pub op16: bool,
}

/// Instruction bytes read one at a time, counting the length.
struct Bytes<F> {
    fetch: F,
    len: u32,
}

impl<F: Fn(u32) -> Option<u8>> Bytes<F> {
    fn next(&mut self) -> Option<u8> {
        if self.len >= MAX_LEN {
            return None;
        }
        let b = (self.fetch)(self.len)?;
        // len < MAX_LEN: no overflow.
        self.len = self.len.wrapping_add(1);
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        let mut v = [0u8; 4];
        for b in &mut v {
            *b = self.next()?;
        }
        Some(u32::from_le_bytes(v))
    }
}

/// Decode the instruction whose byte `i` is `fetch(i)` (`None`: unreadable),
/// executed in a code segment that is 16-bit (`code16`) or 32-bit, with the
/// general registers `gpr` (ModRM order: eax, ecx, edx, ebx, esp, ebp, esi,
/// edi) for address computation. `None`: not an instruction the host
/// emulates (reflect the #GP).
pub fn decode(fetch: impl Fn(u32) -> Option<u8>, code16: bool, gpr: &[u32; 8]) -> Option<Decoded> {
    let mut bytes = Bytes { fetch, len: 0 };
    let mut opsize = false;
    let mut addrsize = false;
    let mut seg = None;
    let opcode = loop {
        match bytes.next()? {
            0x66 => opsize = true,
            0x67 => addrsize = true,
            0x26 => seg = Some(Seg::Es),
            0x2E => seg = Some(Seg::Cs),
            0x36 => seg = Some(Seg::Ss),
            0x3E => seg = Some(Seg::Ds),
            0x64 => seg = Some(Seg::Fs),
            0x65 => seg = Some(Seg::Gs),
            0xF0 | 0xF2 | 0xF3 => return None,
            b => break b,
        }
    };
    let op16 = code16 != opsize;
    let addr16 = code16 != addrsize;
    let width = |b: u8| match (b & 1 == 0, op16) {
        (true, _) => Width::Byte,
        (false, true) => Width::Word,
        (false, false) => Width::Dword,
    };
    let op = match opcode {
        0xFA => Op::Cli,
        0xE4 | 0xE5 => {
            bytes.next()?;
            Op::In(width(opcode))
        }
        0xEC | 0xED => Op::In(width(opcode)),
        0xE6 | 0xE7 => {
            bytes.next()?;
            Op::Out(width(opcode))
        }
        0xEE | 0xEF => Op::Out(width(opcode)),
        0x0F => {
            let group = bytes.next()?;
            let modrm = bytes.next()?;
            let reg = (modrm >> 3) & 7;
            let memory_only = group == 0x01 && reg <= 1;
            if !matches!((group, reg), (0x01, 0 | 1 | 4) | (0x00, 0 | 1)) {
                return None;
            }
            // With mod = 3, 0F 01 /0 and /1 are other instructions (vmcall,
            // monitor, ...).
            if memory_only && modrm >> 6 == 3 {
                return None;
            }
            let operand = modrm_operand(&mut bytes, modrm, addr16, seg, gpr)?;
            match (group, reg) {
                (0x01, 0) => Op::Sgdt(operand),
                (0x01, 1) => Op::Sidt(operand),
                (0x01, _) => Op::Smsw(operand),
                (_, 0) => Op::Sldt(operand),
                _ => Op::Str(operand),
            }
        }
        _ => return None,
    };
    Some(Decoded {
        op,
        len: bytes.len,
        op16,
    })
}

/// The r/m operand of `modrm` (32-bit addressing only), reading SIB and
/// displacement bytes as needed.
fn modrm_operand<F: Fn(u32) -> Option<u8>>(
    bytes: &mut Bytes<F>,
    modrm: u8,
    addr16: bool,
    seg: Option<Seg>,
    gpr: &[u32; 8],
) -> Option<Operand> {
    let md = modrm >> 6;
    let rm = modrm & 7;
    if md == 3 {
        return Some(Operand::Reg(rm));
    }
    if addr16 {
        return None;
    }
    let reg = |n: u8| gpr.get(usize::from(n)).copied();
    let (base, index, default_ss) = if rm == 4 {
        let sib = bytes.next()?;
        let scale = sib >> 6;
        let idx = (sib >> 3) & 7;
        let b = sib & 7;
        // Index 4 (esp) means "no index".
        let index = if idx == 4 {
            0
        } else {
            reg(idx)?.wrapping_shl(u32::from(scale))
        };
        if b == 5 && md == 0 {
            (bytes.u32()?, index, false)
        } else {
            (reg(b)?, index, b == 4 || b == 5)
        }
    } else if rm == 5 && md == 0 {
        (bytes.u32()?, 0, false)
    } else {
        (reg(rm)?, 0, rm == 5)
    };
    let disp = match md {
        1 => i32::from(bytes.next()? as i8) as u32,
        2 => bytes.u32()?,
        _ => 0,
    };
    let default = if default_ss { Seg::Ss } else { Seg::Ds };
    Some(Operand::Mem {
        seg: seg.unwrap_or(default),
        offset: base.wrapping_add(index).wrapping_add(disp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPR: [u32; 8] = [
        0x1000, // eax
        0x2000, // ecx
        0x3000, // edx
        0x4000, // ebx
        0x5000, // esp
        0x6000, // ebp
        0x7000, // esi
        0x8000, // edi
    ];

    fn dec(code: &[u8], code16: bool) -> Option<Decoded> {
        decode(|i| code.get(i as usize).copied(), code16, &GPR)
    }

    fn d32(code: &[u8]) -> Option<Decoded> {
        dec(code, false)
    }

    fn mem(seg: Seg, offset: u32) -> Operand {
        Operand::Mem { seg, offset }
    }

    #[test]
    fn io_and_cli() {
        use Width::*;
        for (code, op, len) in [
            (&[0xFA][..], Op::Cli, 1),
            (&[0xE4, 0x60], Op::In(Byte), 2),
            (&[0xE5, 0x60], Op::In(Dword), 2),
            (&[0x66, 0xE5, 0x60], Op::In(Word), 3),
            (&[0xEC], Op::In(Byte), 1),
            (&[0xED], Op::In(Dword), 1),
            (&[0x66, 0xED], Op::In(Word), 2),
            (&[0xE6, 0x80], Op::Out(Byte), 2),
            (&[0xE7, 0x80], Op::Out(Dword), 2),
            (&[0xEE], Op::Out(Byte), 1),
            (&[0x66, 0xEF], Op::Out(Word), 2),
        ] {
            let d = d32(code).unwrap();
            assert_eq!((d.op, d.len), (op, len), "{code:x?}");
        }
    }

    /// A 16-bit code segment flips the meaning of 0x66.
    #[test]
    fn code16_operand_size() {
        assert_eq!(dec(&[0xED], true).unwrap().op, Op::In(Width::Word));
        assert_eq!(dec(&[0x66, 0xED], true).unwrap().op, Op::In(Width::Dword));
        assert_eq!(dec(&[0xEC], true).unwrap().op, Op::In(Width::Byte));
        assert_eq!(dec(&[0x66, 0xEC], true).unwrap().op, Op::In(Width::Byte));
        assert_eq!(dec(&[0xE5, 1], true).unwrap().op, Op::In(Width::Word));
        assert!(dec(&[0x0F, 0x01, 0xE0], true).unwrap().op16);
        assert!(!dec(&[0x66, 0x0F, 0x01, 0xE0], true).unwrap().op16);
        // 16-bit addressing (the default there) is not decoded; with 0x67
        // it is 32-bit again.
        assert_eq!(dec(&[0x0F, 0x01, 0x00], true), None);
        assert_eq!(
            dec(&[0x67, 0x0F, 0x01, 0x00], true).unwrap().op,
            Op::Sgdt(mem(Seg::Ds, 0x1000))
        );
        assert_eq!(d32(&[0x67, 0x0F, 0x01, 0x00]), None);
    }

    #[test]
    fn umip_register_forms() {
        assert_eq!(
            d32(&[0x0F, 0x01, 0xE0]).unwrap().op,
            Op::Smsw(Operand::Reg(0))
        );
        let d = d32(&[0x66, 0x0F, 0x01, 0xE7]).unwrap();
        assert_eq!((d.op, d.len, d.op16), (Op::Smsw(Operand::Reg(7)), 4, true));
        assert_eq!(
            d32(&[0x0F, 0x00, 0xC1]).unwrap().op,
            Op::Sldt(Operand::Reg(1))
        );
        assert_eq!(
            d32(&[0x0F, 0x00, 0xCC]).unwrap().op,
            Op::Str(Operand::Reg(4))
        );
        // sgdt/sidt with mod = 3 are other instructions (vmcall 0F 01 C1,
        // monitor 0F 01 C8).
        assert_eq!(d32(&[0x0F, 0x01, 0xC1]), None);
        assert_eq!(d32(&[0x0F, 0x01, 0xC8]), None);
    }

    /// Every 32-bit addressing form, with the segment it defaults to.
    #[test]
    fn umip_memory_forms() {
        for (code, offset, seg, len) in [
            // [eax]
            (&[0x0F, 0x01, 0x00][..], 0x1000, Seg::Ds, 3),
            // [disp32]
            (
                &[0x0F, 0x01, 0x05, 0x78, 0x56, 0x34, 0x12],
                0x1234_5678,
                Seg::Ds,
                7,
            ),
            // [ebp + disp8] (mod 1, rm 5): SS
            (&[0x0F, 0x01, 0x45, 0xF0], 0x5FF0, Seg::Ss, 4),
            // [esi + disp32]
            (
                &[0x0F, 0x01, 0x86, 0x00, 0x01, 0x00, 0x00],
                0x7100,
                Seg::Ds,
                7,
            ),
            // [esp] via SIB (base 4, no index): SS
            (&[0x0F, 0x01, 0x04, 0x24], 0x5000, Seg::Ss, 4),
            // [ebx + ecx*4 + 8]
            (
                &[0x0F, 0x01, 0x4C, 0x8B, 0x08],
                0x4000 + 0x8000 + 8,
                Seg::Ds,
                5,
            ),
            // [edx*8 + disp32] (SIB base 5 with mod 0: no base)
            (
                &[0x0F, 0x01, 0x0C, 0xD5, 0x10, 0, 0, 0],
                0x18010,
                Seg::Ds,
                8,
            ),
            // [ebp + eax*2 + disp32] (SIB base 5 with mod 2): SS
            (
                &[0x0F, 0x01, 0x8C, 0x45, 0, 1, 0, 0],
                0x6000 + 0x2000 + 0x100,
                Seg::Ss,
                8,
            ),
            // str [edi - 1]
            (&[0x0F, 0x00, 0x4F, 0xFF], 0x7FFF, Seg::Ds, 4),
        ] {
            let d = d32(code).unwrap();
            let got = match d.op {
                Op::Sgdt(o) | Op::Sidt(o) | Op::Str(o) => o,
                other => panic!("{code:x?}: {other:?}"),
            };
            assert_eq!((got, d.len), (mem(seg, offset), len), "{code:x?}");
        }
        // Address arithmetic wraps at 4 GiB.
        let d = d32(&[0x0F, 0x01, 0x80, 0x00, 0xF0, 0xFF, 0xFF]).unwrap();
        assert_eq!(d.op, Op::Sgdt(mem(Seg::Ds, 0x1000u32.wrapping_sub(0x1000))));
    }

    #[test]
    fn prefixes() {
        // Segment overrides: the last one wins; they override the SS default.
        assert_eq!(
            d32(&[0x64, 0x0F, 0x01, 0x00]).unwrap().op,
            Op::Sgdt(mem(Seg::Fs, 0x1000))
        );
        assert_eq!(
            d32(&[0x26, 0x65, 0x0F, 0x01, 0x04, 0x24]).unwrap().op,
            Op::Sgdt(mem(Seg::Gs, 0x5000))
        );
        for (p, seg) in [
            (0x26, Seg::Es),
            (0x2E, Seg::Cs),
            (0x36, Seg::Ss),
            (0x3E, Seg::Ds),
            (0x64, Seg::Fs),
            (0x65, Seg::Gs),
        ] {
            assert_eq!(
                d32(&[p, 0x0F, 0x01, 0x08]).unwrap().op,
                Op::Sidt(mem(seg, 0x1000))
            );
        }
        // lock, rep, repne: not emulated.
        for p in [0xF0, 0xF2, 0xF3] {
            assert_eq!(d32(&[p, 0x0F, 0x01, 0x00]), None);
            assert_eq!(d32(&[p, 0xEC]), None);
        }
        // 15 bytes is the limit: 12 prefixes + sgdt [eax] fits, 13 does not.
        let mut code = [0x3Eu8; 16];
        code[12..15].copy_from_slice(&[0x0F, 0x01, 0x00]);
        assert_eq!(d32(&code).unwrap().len, 15);
        let mut code = [0x3Eu8; 16];
        code[13..16].copy_from_slice(&[0x0F, 0x01, 0x00]);
        assert_eq!(d32(&code), None);
    }

    #[test]
    fn truncated_and_unknown() {
        for code in [
            &[][..],
            &[0x66],
            &[0xE4],
            &[0xE6],
            &[0x0F],
            &[0x0F, 0x01],
            &[0x0F, 0x01, 0x04],
            &[0x0F, 0x01, 0x05, 0, 0, 0],
            &[0x0F, 0x01, 0x40],
            &[0x0F, 0x01, 0x80, 0, 0],
            &[0x0F, 0x01, 0x0C, 0xD5, 0, 0],
        ] {
            assert_eq!(d32(code), None, "{code:x?}");
        }
        for code in [
            &[0xF4][..],         // hlt
            &[0x90],             // nop
            &[0x66, 0x90],       // data16 nop
            &[0x0F, 0x01, 0x10], // lgdt
            &[0x0F, 0x01, 0x18], // lidt
            &[0x0F, 0x01, 0x30], // lmsw
            &[0x0F, 0x01, 0x38], // invlpg
            &[0x0F, 0x00, 0x10], // lldt
            &[0x0F, 0x00, 0x18], // ltr
            &[0x0F, 0x00, 0x20], // verr
            &[0x0F, 0x22, 0xD8], // mov cr3, eax
            &[0x0F, 0x30],       // wrmsr
        ] {
            assert_eq!(d32(code), None, "{code:x?}");
        }
    }
}
