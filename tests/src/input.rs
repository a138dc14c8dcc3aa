//! Scripted serial input: a scenario's `input` steps, and when each one is due. Pure: the
//! [`runner`](crate::runner) feeds the serial output to a [`StepMatcher`] as it arrives and
//! writes each due step's bytes to QEMU's serial port; everything here is unit-tested on the host.
//!
//! A step is `{ after = "REGEX", send = "TEXT", delay_ms = N }`. Steps run in order: step k is
//! due once a serial line at or after the line where step k−1 matched (the first step: any
//! line) matches its regex. The same line may make several consecutive steps due, exactly like
//! consecutive `expect` patterns. Lines are the verdict's lines ([`serial_lines`]): split at
//! `\n`, one `\r` before it removed, nothing else cleaned up; only complete lines count, so a
//! prompt that is not followed by a newline cannot be waited for.
//!
//! [`serial_lines`]: crate::verdict::serial_lines

use std::ops::Range;
use std::time::Duration;

use regex::Regex;

use crate::verdict::Failure;

/// The pause between two bytes of a step's text.
///
/// QEMU's 16550 takes a byte from its character device only when its receive FIFO (16 bytes)
/// has room, so nothing is lost at the UART even without a pause; the pause paces input like a
/// fast typist, which gives the hypervisor's receive interrupt and whatever drains its input
/// buffer time to run between bytes (under TCG, on a loaded machine) and keeps the FIFO from
/// ever filling up. A 64-byte command takes about 64 ms.
pub const INPUT_BYTE_PAUSE: Duration = Duration::from_millis(1);

/// One step of a scenario's `input`.
#[derive(Debug, Clone)]
pub struct Step {
    /// The step is due once a line matches this (see the module documentation).
    pub after: Regex,
    /// What to write to the serial port, escapes decoded ([`decode_escapes`]).
    pub send: Vec<u8>,
    /// How long to wait, once the step is due, before writing.
    pub delay: Duration,
}

/// Decodes the escapes of a step's `send` text: `\n`, `\r`, `\t`, `\\` and `\xHH` (exactly two
/// hex digits, any byte: `\x01` is Ctrl-A, the hypervisor console's prefix key; `\x1b` is Esc).
/// Every other character stands for its UTF-8 bytes. Any other backslash sequence is an error,
/// so that a mistyped escape never reaches the guest as literal text.
pub fn decode_escapes(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let byte = (hex.len() == 2 && hex.chars().all(|h| h.is_ascii_hexdigit()))
                    .then(|| u8::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .ok_or_else(|| {
                        format!("`\\x{hex}` in `{text}` is not `\\x` and two hex digits")
                    })?;
                out.push(byte);
            }
            Some(other) => {
                return Err(format!(
                    "unknown escape `\\{other}` in `{text}` (known: \\n \\r \\t \\\\ \\xHH)"
                ));
            }
            None => return Err(format!("`{text}` ends with a lone `\\` (write `\\\\`)")),
        }
    }
    Ok(out)
}

/// Decides, from the serial output as it arrives, which input steps are due.
///
/// Feed it every byte of the serial output in order ([`StepMatcher::feed`]); it returns the
/// steps that became due, in step order. It keeps only the current unfinished line.
#[derive(Debug, Clone)]
pub struct StepMatcher {
    patterns: Vec<Regex>,
    /// Bytes of the line not yet ended by `\n`.
    partial: Vec<u8>,
    /// Complete lines seen so far.
    lines: usize,
    /// 1-based line where each step matched, in step order; its length is the next step.
    matched: Vec<usize>,
}

impl StepMatcher {
    /// A matcher for steps with these `after` regexes, in order.
    pub fn new(patterns: Vec<Regex>) -> Self {
        Self {
            patterns,
            partial: Vec::new(),
            lines: 0,
            matched: Vec::new(),
        }
    }

    /// Takes the next bytes of the serial output; returns the (0-based) steps now due.
    pub fn feed(&mut self, bytes: &[u8]) -> Range<usize> {
        let first = self.matched.len();
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            match chunk.strip_suffix(b"\n") {
                Some(end) => {
                    self.partial.extend_from_slice(end);
                    self.end_line();
                }
                None => self.partial.extend_from_slice(chunk),
            }
        }
        first..self.matched.len()
    }

    /// One complete line (in `partial`): every pending step it matches, in order, is due.
    fn end_line(&mut self) {
        self.lines += 1;
        // Nothing left to wait for: only count lines.
        if self.matched.len() < self.patterns.len() {
            let raw = self.partial.strip_suffix(b"\r").unwrap_or(&self.partial);
            let line = String::from_utf8_lossy(raw);
            while let Some(re) = self.patterns.get(self.matched.len()) {
                if !re.is_match(&line) {
                    break;
                }
                self.matched.push(self.lines);
            }
        }
        self.partial.clear();
    }

    /// The 1-based line where each step matched so far, in step order.
    pub fn matched(&self) -> &[usize] {
        &self.matched
    }

    /// Whether every step is due.
    pub fn done(&self) -> bool {
        self.matched.len() == self.patterns.len()
    }
}

/// The failure for the first step that was not written, if any: `matched` is
/// [`StepMatcher::matched`] at the end of the run, `sent` how many steps were written in full
/// (steps are written in order, so they are the first `sent`).
pub fn unsent(steps: &[Step], matched: &[usize], sent: usize) -> Option<Failure> {
    let step = steps.get(sent)?;
    Some(Failure::InputNotSent {
        step: sent + 1,
        pattern: step.after.as_str().to_string(),
        after_line: sent.checked_sub(1).and_then(|k| matched.get(k).copied()),
        matched_line: matched.get(sent).copied(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(patterns: &[&str]) -> StepMatcher {
        StepMatcher::new(patterns.iter().map(|p| Regex::new(p).unwrap()).collect())
    }

    fn steps(patterns: &[&str]) -> Vec<Step> {
        patterns
            .iter()
            .map(|p| Step {
                after: Regex::new(p).unwrap(),
                send: b"x".to_vec(),
                delay: Duration::ZERO,
            })
            .collect()
    }

    #[test]
    fn escapes() {
        assert_eq!(decode_escapes("list\\r").unwrap(), b"list\r");
        assert_eq!(
            decode_escapes("\\x01kill a\\r\\n").unwrap(),
            b"\x01kill a\r\n"
        );
        assert_eq!(decode_escapes("a\\\\b\\tc").unwrap(), b"a\\b\tc");
        assert_eq!(decode_escapes("\\x1B\\xff\\x00").unwrap(), [0x1b, 0xff, 0]);
        assert_eq!(decode_escapes("é").unwrap(), "é".as_bytes());
        // A real newline (from a TOML basic string's `\n`) is just a character.
        assert_eq!(decode_escapes("a\nb").unwrap(), b"a\nb");
        assert_eq!(decode_escapes("").unwrap(), b"");
        for (bad, needle) in [
            ("\\d", "unknown escape `\\d`"),
            ("\\x1", "`\\x1` in `\\x1` is not `\\x` and two hex digits"),
            ("\\xg0", "`\\xg0`"),
            ("\\x+1", "`\\x+1`"),
            ("\\x", "`\\x`"),
            ("end\\", "lone `\\`"),
        ] {
            let e = decode_escapes(bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn steps_become_due_in_order_as_lines_complete() {
        let mut m = matcher(&["^power: halted", "^echo: a$", "^echo: b$"]);
        assert_eq!(m.feed(b"rustyvisor 0.1.0\r\n"), 0..0);
        // An unfinished line does not count, however it ends.
        assert_eq!(m.feed(b"power: hal"), 0..0);
        assert_eq!(m.feed(b"ted (press reset)"), 0..0);
        assert_eq!(m.feed(b"\r\n"), 0..1);
        assert_eq!(m.matched(), [2]);
        // Step 3's line before step 2's does not count for step 3.
        assert_eq!(m.feed(b"echo: b\r\necho: a\r\n"), 1..2);
        assert_eq!(m.feed(b"echo: b\r"), 2..2);
        assert!(!m.done());
        assert_eq!(m.feed(b"\n"), 2..3);
        assert_eq!(m.matched(), [2, 4, 5]);
        assert!(m.done());
        assert_eq!(m.feed(b"more\r\n"), 3..3);
    }

    #[test]
    fn one_line_may_make_several_steps_due_and_chunks_do_not_matter() {
        let log: &[u8] = b"boot\r\nready: 1 2\r\nx\r\nready again\r\n";
        let patterns = ["^ready", "2$", "^ready again"];
        let mut whole = matcher(&patterns);
        assert_eq!(whole.feed(log), 0..3);
        assert_eq!(whole.matched(), [2, 2, 4]);
        // Byte by byte gives the same result.
        let mut bytes = matcher(&patterns);
        let due: Vec<usize> = log.iter().flat_map(|b| bytes.feed(&[*b])).collect();
        assert_eq!(due, [0, 1, 2]);
        assert_eq!(bytes.matched(), [2, 2, 4]);
    }

    #[test]
    fn lines_are_the_verdicts_lines() {
        // Carriage returns inside a line stay: a forged status line does not trigger a step.
        let mut m = matcher(&["^guest a powered off$"]);
        assert_eq!(m.feed(b"guest a: \rguest a powered off\r\n"), 0..0);
        assert_eq!(m.feed(b"guest a powered off\r\r\n"), 0..0);
        assert_eq!(m.feed(b"\xffguest a powered off\n"), 0..0);
        assert_eq!(m.feed(b"guest a powered off\n"), 0..1);
        assert_eq!(m.matched(), [4]);
        // Invalid UTF-8 is U+FFFD, as in the verdict.
        let mut m = matcher(&["^\u{fffd}x$"]);
        assert_eq!(m.feed(b"\xffx\r\n"), 0..1);
    }

    #[test]
    fn no_steps_is_always_done() {
        let mut m = matcher(&[]);
        assert!(m.done());
        assert_eq!(m.feed(b"anything\n"), 0..0);
        assert_eq!(unsent(&[], m.matched(), 0), None);
    }

    #[test]
    fn the_first_unsent_step_is_reported() {
        let s = steps(&["^a", "^b", "^c"]);
        assert_eq!(unsent(&s, &[1, 2, 3], 3), None);
        assert_eq!(
            unsent(&s, &[], 0),
            Some(Failure::InputNotSent {
                step: 1,
                pattern: "^a".into(),
                after_line: None,
                matched_line: None,
            })
        );
        assert_eq!(
            unsent(&s, &[4, 7], 1),
            Some(Failure::InputNotSent {
                step: 2,
                pattern: "^b".into(),
                after_line: Some(4),
                matched_line: Some(7),
            })
        );
        assert_eq!(
            unsent(&s, &[4, 7], 2),
            Some(Failure::InputNotSent {
                step: 3,
                pattern: "^c".into(),
                after_line: Some(7),
                matched_line: None,
            })
        );
    }
}
