//! Byte-size constants, parsing (`"16M"`) and human-readable printing
//! (`"128 MiB"`).

use core::fmt;

/// 1 KiB.
pub const KIB: u64 = 1 << 10;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// 1 TiB.
pub const TIB: u64 = 1 << 40;

/// Parses a size such as `"4096"`, `"64K"`, `"16M"`, `"16MiB"`, `"5G"`.
///
/// This is the one size grammar of rustyvisor: the hypervisor's guest
/// `mem=`, and `cargo xtask`'s `--mem` and `--guest NAME,mem=` all use it.
///
/// - decimal digits, then an optional unit, nothing else (no sign, no
///   fraction, no space inside; surrounding whitespace is ignored);
/// - units are binary and case-insensitive: `K` = 1024, `M` = 1024², `G` =
///   1024³, `T` = 1024⁴, each optionally followed by `B` or `iB`
///   (`16M` = `16MB` = `16MiB` = `16mib`);
/// - no unit, or a bare `B`, means bytes (`4096` is 4 KiB, not QEMU's
///   4096 MiB).
///
/// Returns `None` for empty input, junk, or a value overflowing `u64`.
#[must_use]
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    if num.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for b in num.bytes() {
        value = value
            .checked_mul(10)?
            .checked_add(u64::from(b.wrapping_sub(b'0')))?;
    }
    let mut chars = suffix.chars();
    let multiplier = match chars.next().map(|c| c.to_ascii_lowercase()) {
        None => return Some(value),
        Some('b') => return chars.next().is_none().then_some(value),
        Some('k') => KIB,
        Some('m') => MIB,
        Some('g') => GIB,
        Some('t') => TIB,
        Some(_) => return None,
    };
    let rest = chars.as_str();
    if !(rest.is_empty() || rest.eq_ignore_ascii_case("b") || rest.eq_ignore_ascii_case("ib")) {
        return None;
    }
    value.checked_mul(multiplier)
}

/// A byte count that displays in human form using the largest binary unit
/// not exceeding the value: exact when divisible (`"128 MiB"`, `"5 GiB"`),
/// otherwise with one truncated decimal (`"1.5 GiB"`, `"1.2 KiB"` for
/// 1234); values below 1 KiB print as bytes (`"1000 B"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        let v = self.0;
        for &(unit, name) in &UNITS {
            if v >= unit {
                if v.is_multiple_of(unit) {
                    return write!(f, "{} {name}", v / unit);
                }
                let tenths = u128::from(v) * 10 / u128::from(unit);
                return write!(f, "{}.{} {name}", tenths / 10, tenths % 10);
            }
        }
        write!(f, "{v} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 * KIB));
        assert_eq!(parse_size("64k"), Some(64 * KIB));
        assert_eq!(parse_size("16M"), Some(16 * MIB));
        assert_eq!(parse_size("16MiB"), Some(16 * MIB));
        assert_eq!(parse_size("16mb"), Some(16 * MIB));
        assert_eq!(parse_size("5G"), Some(5 * GIB));
        assert_eq!(parse_size("2t"), Some(2 * TIB));
        assert_eq!(parse_size("12B"), Some(12));
        assert_eq!(parse_size(" 7 "), Some(7));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "K",
            "-1",
            "1.5G",
            "16X",
            "16MM",
            "16Mx",
            "12BB",
            "18446744073709551616",
            "17179869184G",
            "1 G",
            "+5",
            "0x10",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn display() {
        let s = |v: u64| Bytes(v).to_string();
        assert_eq!(s(128 * MIB), "128 MiB");
        assert_eq!(s(5 * GIB), "5 GiB");
        assert_eq!(s(512 * KIB), "512 KiB");
        assert_eq!(s(1000), "1000 B");
        assert_eq!(s(0), "0 B");
        assert_eq!(s(1234), "1.2 KiB");
        assert_eq!(s(GIB + GIB / 2), "1.5 GiB");
        assert_eq!(s(GIB + 4 * KIB), "1.0 GiB");
        assert_eq!(s(1536 * MIB), "1.5 GiB");
        assert_eq!(s(2 * TIB), "2 TiB");
        assert_eq!(s(1025 * GIB), "1.0 TiB");
        assert_eq!(s(u64::MAX), "16777215.9 TiB");
        assert_eq!(s(MIB + KIB), "1.0 MiB");
        assert_eq!(s(MIB - KIB), "1023 KiB");
    }
}
