//! [`FixedStr`]: a UTF-8 string of bounded length stored inline, for text
//! that must be kept without allocating (boot-loader strings copied out of
//! the boot information, a guest's death reason, kill reasons).
//!
//! Text that does not fit is cut at a character boundary, never in the
//! middle of a UTF-8 sequence, so the contents are always valid UTF-8.

use core::fmt;

/// At most `N` bytes of UTF-8 text, stored inline (`N` ≤ 65535).
#[derive(Clone, Copy)]
pub struct FixedStr<const N: usize> {
    len: u16,
    buf: [u8; N],
}

impl<const N: usize> FixedStr<N> {
    /// Compile-time check that the length fits the `u16` counter.
    const FITS: () = assert!(N <= u16::MAX as usize, "FixedStr capacity above 65535");

    /// The capacity in bytes.
    pub const CAPACITY: usize = N;

    /// An empty string.
    pub const fn empty() -> Self {
        let () = Self::FITS;
        Self {
            len: 0,
            buf: [0; N],
        }
    }

    /// A string holding (a prefix of) `s`.
    pub fn new(s: &str) -> Self {
        Self::copy_from(s).0
    }

    /// Copies `s`, truncating at a character boundary if it does not fit.
    /// The flag is true if something was cut off.
    pub fn copy_from(s: &str) -> (Self, bool) {
        let mut out = Self::empty();
        let complete = out.push_str(s);
        (out, !complete)
    }

    /// The formatted text (truncated if it does not fit).
    pub fn format(args: fmt::Arguments<'_>) -> Self {
        let mut out = Self::empty();
        // `write_str` never fails; truncation is silent.
        let _ = fmt::Write::write_fmt(&mut out, args);
        out
    }

    /// Appends as much of `s` as fits, cutting at a character boundary.
    /// Returns whether all of `s` fit.
    pub fn push_str(&mut self, s: &str) -> bool {
        let used = usize::from(self.len);
        let room = N.saturating_sub(used);
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take = take.saturating_sub(1);
        }
        let src = s.as_bytes().get(..take).unwrap_or(&[]);
        let end = used.saturating_add(src.len());
        if let Some(dst) = self.buf.get_mut(used..end) {
            dst.copy_from_slice(src);
            // `end <= N <= u16::MAX` (see `FITS`).
            self.len = u16::try_from(end).unwrap_or(self.len);
        }
        take == s.len()
    }

    /// Appends guest- or firmware-supplied bytes: stops at the first NUL and
    /// replaces invalid UTF-8 with U+FFFD.
    pub fn push_bytes_lossy(&mut self, bytes: &[u8]) {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        for chunk in bytes.get(..end).unwrap_or(&[]).utf8_chunks() {
            self.push_str(chunk.valid());
            if !chunk.invalid().is_empty() {
                self.push_str("\u{FFFD}");
            }
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only whole `&str` prefixes cut at char boundaries are ever copied in.
        let bytes = self.buf.get(..usize::from(self.len)).unwrap_or(&[]);
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> Default for FixedStr<N> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<const N: usize> fmt::Write for FixedStr<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

impl<const N: usize> fmt::Debug for FixedStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> fmt::Display for FixedStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> PartialEq for FixedStr<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl<const N: usize> Eq for FixedStr<N> {}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn fits_exactly_and_reports_truncation() {
        let (s, cut) = FixedStr::<5>::copy_from("hello");
        assert_eq!((s.as_str(), cut), ("hello", false));
        let (s, cut) = FixedStr::<5>::copy_from("hello!");
        assert_eq!((s.as_str(), cut), ("hello", true));
        let (s, cut) = FixedStr::<0>::copy_from("x");
        assert_eq!((s.as_str(), cut, s.is_empty()), ("", true, true));
        assert_eq!(FixedStr::<4>::copy_from("").0.len(), 0);
    }

    #[test]
    fn truncates_at_char_boundary() {
        // "aé€" = 1 + 2 + 3 bytes.
        for (cap, want) in [
            (1, "a"),
            (2, "a"),
            (3, "aé"),
            (4, "aé"),
            (5, "aé"),
            (6, "aé€"),
        ] {
            let got = match cap {
                1 => FixedStr::<1>::new("aé€").as_str().to_owned(),
                2 => FixedStr::<2>::new("aé€").as_str().to_owned(),
                3 => FixedStr::<3>::new("aé€").as_str().to_owned(),
                4 => FixedStr::<4>::new("aé€").as_str().to_owned(),
                5 => FixedStr::<5>::new("aé€").as_str().to_owned(),
                _ => FixedStr::<6>::new("aé€").as_str().to_owned(),
            };
            assert_eq!(got, want, "capacity {cap}");
        }
        // Appending respects the boundary too, and nothing appends after a cut.
        let mut s = FixedStr::<4>::new("ab");
        assert!(!s.push_str("€"));
        assert_eq!(s.as_str(), "ab");
        assert!(s.push_str("c"));
        assert!(!s.push_str("de"));
        assert_eq!(s.as_str(), "abcd");
        assert!(s.push_str(""));
    }

    #[test]
    fn format_and_write() {
        let s = FixedStr::<17>::format(format_args!("trap {} at {:#x}", 13, 0x1000));
        assert_eq!(s.as_str(), "trap 13 at 0x1000");
        let s = FixedStr::<8>::format(format_args!("trap {} at {:#x}", 13, 0x1000));
        assert_eq!(s.as_str(), "trap 13 ");
        let mut w = FixedStr::<8>::empty();
        write!(w, "{}-{}", 1, 2).unwrap();
        assert_eq!(w.to_string(), "1-2");
        assert_eq!(format!("{w:?}"), "\"1-2\"");
        assert_eq!(w, FixedStr::<8>::new("1-2"));
        assert_ne!(w, FixedStr::<8>::new("1-3"));
    }

    #[test]
    fn lossy_bytes() {
        let mut s = FixedStr::<16>::new(">");
        s.push_bytes_lossy(b"a\xffb\0ignored");
        assert_eq!(s.as_str(), ">a\u{FFFD}b");
        // The replacement character itself is cut at a boundary.
        let mut s = FixedStr::<3>::new("ab");
        s.push_bytes_lossy(b"\xff");
        assert_eq!(s.as_str(), "ab");
    }
}
