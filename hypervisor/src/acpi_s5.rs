//! Finding the `\_S5_` sleep type values in the DSDT, for ACPI soft-off.
//!
//! The DSDT contains AML like `Name (_S5, Package () { 5, 5, 0, 0 })`,
//! encoded as `NameOp '_S5_' PackageOp PkgLength NumElements elements...`.
//! We scan for that byte pattern instead of running an AML interpreter.
//! The input is untrusted: every access is bounds-checked and garbage
//! yields `None`, never a panic.

/// AML `NameOp`.
const NAME_OP: u8 = 0x08;
/// AML root prefix `\`.
const ROOT_PREFIX: u8 = 0x5C;
/// AML `PackageOp`.
const PACKAGE_OP: u8 = 0x12;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const DWORD_PREFIX: u8 = 0x0C;
const QWORD_PREFIX: u8 = 0x0E;
const ONES_OP: u8 = 0xFF;

/// Decodes an AML PkgLength at `aml[pos..]`: returns `(length, bytes used
/// by the encoding)`. The length counts from the first PkgLength byte.
#[must_use]
pub fn decode_pkg_length(aml: &[u8], pos: usize) -> Option<(usize, usize)> {
    let lead = *aml.get(pos)?;
    let follow = usize::from(lead >> 6);
    if follow == 0 {
        return Some((usize::from(lead & 0x3F), 1));
    }
    let mut len = usize::from(lead & 0x0F);
    for i in 0..follow {
        let b = *aml.get(pos.checked_add(1 + i)?)?;
        len |= usize::from(b) << (4 + 8 * i);
    }
    Some((len, 1 + follow))
}

/// Decodes one integer package element at `aml[pos..end]`: returns its
/// low byte and the position after it.
fn decode_element(aml: &[u8], pos: usize, end: usize) -> Option<(u8, usize)> {
    let get = |i: usize| -> Option<u8> { if i < end { aml.get(i).copied() } else { None } };
    let op = get(pos)?;
    let data_len = match op {
        BYTE_PREFIX => 1,
        WORD_PREFIX => 2,
        DWORD_PREFIX => 4,
        QWORD_PREFIX => 8,
        ZERO_OP => return Some((0, pos + 1)),
        ONE_OP => return Some((1, pos + 1)),
        ONES_OP => return Some((0xFF, pos + 1)),
        // Non-standard, but seen in the wild: a bare byte value.
        other => return Some((other, pos + 1)),
    };
    let low = get(pos + 1)?;
    // The whole integer must be present.
    get(pos + data_len)?;
    Some((low, pos + 1 + data_len))
}

/// Tries to decode `PackageOp ...` starting at `pos`.
fn decode_package(aml: &[u8], pos: usize) -> Option<(u8, u8)> {
    if *aml.get(pos)? != PACKAGE_OP {
        return None;
    }
    let pkg_start = pos + 1;
    let (pkg_len, enc_len) = decode_pkg_length(aml, pkg_start)?;
    let end = pkg_start.checked_add(pkg_len)?.min(aml.len());
    let num_pos = pkg_start + enc_len;
    if num_pos >= end {
        return None;
    }
    let num_elements = *aml.get(num_pos)?;
    if num_elements < 2 {
        return None;
    }
    let (a, next) = decode_element(aml, num_pos + 1, end)?;
    let (b, _) = decode_element(aml, next, end)?;
    Some((a, b))
}

/// Scans DSDT AML (the table body; passing the whole table including the
/// 36-byte header works too) for `Name (_S5_, Package ...)` / `Name
/// (\_S5_, ...)` and returns `(SLP_TYPa, SLP_TYPb)`.
#[must_use]
pub fn find_s5_sleep_types(dsdt_aml: &[u8]) -> Option<(u8, u8)> {
    let aml = dsdt_aml;
    let mut i: usize = 0;
    while let Some(window) = aml.get(i..i.checked_add(4)?) {
        if window == b"_S5_" {
            let prev = i.checked_sub(1).and_then(|p| aml.get(p)).copied();
            let prev2 = i.checked_sub(2).and_then(|p| aml.get(p)).copied();
            let named =
                prev == Some(NAME_OP) || (prev == Some(ROOT_PREFIX) && prev2 == Some(NAME_OP));
            if named && let Some(v) = decode_package(aml, i + 4) {
                return Some(v);
            }
        }
        i += 1;
    }
    None
}

/// The PM1 control value to write for soft-off with sleep type `slp_typ`:
/// `SLP_TYP << 10 | SLP_EN` (bit 13). `slp_typ` is masked to its 3 bits.
#[must_use]
pub const fn slp_en_value(slp_typ: u8) -> u16 {
    (((slp_typ & 0x7) as u16) << 10) | (1 << 13)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNIPPET: [u8; 14] = [
        0x08, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x06, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00,
    ];

    #[test]
    fn synthetic_snippets() {
        assert_eq!(find_s5_sleep_types(&SNIPPET), Some((5, 5)));
        let mut rooted = vec![0x08, 0x5C];
        rooted.extend_from_slice(&SNIPPET[1..]);
        assert_eq!(find_s5_sleep_types(&rooted), Some((5, 5)));
        // QEMU: Package (0x04) { Zero, Zero, Zero, Zero }.
        let qemu = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(find_s5_sleep_types(&qemu), Some((0, 0)));
        // Mixed encodings, surrounded by other AML.
        let mut mixed = vec![0x10, 0x20, 0x5C, b'_', b'S', b'5', b'_', 0xAA]; // not a Name
        mixed.extend_from_slice(&[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x01, 0x0A, 0x07,
        ]);
        assert_eq!(find_s5_sleep_types(&mixed), Some((1, 7)));
        // Bare byte values and word prefix.
        let bare = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0B, 0x03, 0x00, 0x06,
        ];
        assert_eq!(find_s5_sleep_types(&bare), Some((3, 6)));
    }

    #[test]
    fn multi_byte_pkg_length() {
        // 2-byte PkgLength: lead 0x40 | low nibble, next byte << 4.
        let mut aml = vec![
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x47, 0x01, 0x04, 0x0A, 0x02, 0x0A, 0x03,
        ];
        aml.resize(8 + 0x17, 0);
        assert_eq!(decode_pkg_length(&aml, 6), Some((0x17, 2)));
        assert_eq!(find_s5_sleep_types(&aml), Some((2, 3)));
        assert_eq!(
            decode_pkg_length(&[0xC1, 0x23, 0x45, 0x67], 0),
            Some((0x0674_5231, 4))
        );
        assert_eq!(decode_pkg_length(&[0xC1, 0x23], 0), None);
        assert_eq!(decode_pkg_length(&[], 0), None);
    }

    #[test]
    fn garbage_and_truncation() {
        assert_eq!(find_s5_sleep_types(&[]), None);
        assert_eq!(find_s5_sleep_types(b"_S5_"), None);
        // Every truncation of the snippet before the second element is
        // complete fails cleanly.
        for n in 0..SNIPPET.len() {
            let r = find_s5_sleep_types(&SNIPPET[..n]);
            if n >= 12 {
                assert_eq!(r, Some((5, 5)));
            } else {
                assert_eq!(r, None, "len {n}");
            }
        }
        // Not followed by a package.
        assert_eq!(
            find_s5_sleep_types(&[0x08, b'_', b'S', b'5', b'_', 0x0A, 0x05]),
            None
        );
        // Package too short for its elements / too few elements.
        assert_eq!(
            find_s5_sleep_types(&[
                0x08, b'_', b'S', b'5', b'_', 0x12, 0x02, 0x02, 0x0A, 0x05, 0x0A, 0x05
            ]),
            None
        );
        assert_eq!(
            find_s5_sleep_types(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x01, 0x0A, 0x05]),
            None
        );
        // Huge PkgLength is clamped to the buffer.
        assert_eq!(
            find_s5_sleep_types(&[
                0x08, b'_', b'S', b'5', b'_', 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0x01, 0x01
            ]),
            Some((1, 1))
        );
        // Truncated multi-byte integer.
        assert_eq!(
            find_s5_sleep_types(&[
                0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x02, 0x0C, 0x01, 0x00
            ]),
            None
        );
        // A bad first match doesn't hide a later good one.
        let mut two = vec![0x08, b'_', b'S', b'5', b'_', 0x00];
        two.extend_from_slice(&SNIPPET);
        assert_eq!(find_s5_sleep_types(&two), Some((5, 5)));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = crate::testutil::Rng(0x2545_F491_4F6C_DD1D);
        let mut x = 0;
        for len in 0..2000usize {
            let mut buf = vec![0u8; len % 64];
            for b in buf.iter_mut() {
                x = rng.next_u64();
                *b = x as u8;
            }
            // Plant a name to exercise the decoder on garbage.
            if buf.len() > 6 {
                let at = (x as usize) % (buf.len() - 5);
                buf[at..at + 5].copy_from_slice(&[0x08, b'_', b'S', b'5', b'_']);
            }
            let _ = find_s5_sleep_types(&buf);
        }
    }

    /// The PM1 value written for soft-off, from realistic \_S5 objects in
    /// each encoding the scanner supports: SLP_EN (bit 13) is set, SLP_TYPa
    /// lands in bits 10..=12, and no other bit is touched.
    #[test]
    fn pm1_value_from_s5_encodings() {
        let cases: [(&str, &[u8], u8); 5] = [
            // Name (_S5, Package (4) { 5, 5, 0, 0 }) with ByteConst.
            ("ByteConst", &SNIPPET, 5),
            // QEMU/SeaBIOS: Package { Zero, Zero, Zero, Zero }.
            (
                "ZeroOp",
                &[
                    0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
                ],
                0,
            ),
            // Name (\_S5, Package (2) { One, One }).
            (
                "OneOp",
                &[
                    0x08, 0x5C, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x02, 0x01, 0x01,
                ],
                1,
            ),
            // Two-byte PkgLength (0x4N form), ByteConst 7.
            (
                "PkgLength 2",
                &[
                    0x08, b'_', b'S', b'5', b'_', 0x12, 0x47, 0x00, 0x02, 0x0A, 0x07, 0x0A, 0x07,
                ],
                7,
            ),
            // WordConst 6 (only the low 3 bits are SLP_TYP).
            (
                "WordConst",
                &[
                    0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x02, 0x0B, 0x06, 0x00, 0x0B, 0x06,
                    0x00,
                ],
                6,
            ),
        ];
        for (name, aml, typ) in cases {
            let (a, _) = find_s5_sleep_types(aml).unwrap_or_else(|| panic!("{name}: no _S5"));
            assert_eq!(a, typ, "{name}");
            let pm1 = slp_en_value(a);
            assert_ne!(pm1 & (1 << 13), 0, "{name}: SLP_EN");
            assert_eq!((pm1 >> 10) & 0x7, u16::from(typ), "{name}: SLP_TYP");
            assert_eq!(pm1 & !0x1C00, 1 << 13, "{name}: other bits");
        }
        // A firmware value wider than 3 bits cannot spill into SLP_EN or
        // the bits above.
        assert_eq!(slp_en_value(0xFF) & !0x3C00, 0);
        assert_eq!(slp_en_value(0xF8), 1 << 13);
    }
}
