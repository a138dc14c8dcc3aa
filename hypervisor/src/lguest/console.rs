//! What a guest says, made safe to show: the early console (`LHCALL_NOTIFY`
//! of a string) and the guest's shutdown message are *data*, never terminal
//! control and never a line of the hypervisor's own.
//!
//! The rules (one place, used by the launcher for every byte a guest hands
//! over):
//!
//! * **Escaped.** Printable ASCII other than `\` passes through; `\` becomes
//!   `\\`, tab `\t`, carriage return `\r`, and every other byte (control
//!   characters, ESC, DEL, bytes of multi-byte UTF-8) becomes `\xNN`. A guest
//!   can therefore neither move the cursor, nor clear the screen, nor rewrite
//!   a line with `\r`, and what it printed can always be read back exactly.
//! * **Prefixed.** Each guest line becomes one console line that the
//!   launcher prints after `guest NAME: `; a `\n` inside the guest's text
//!   starts a new *prefixed* line, so guest text never starts a line of its
//!   own. The hypervisor's status lines about a guest have no colon after the
//!   name (`guest NAME powered off`, `guest NAME killed: ...`), so nothing a
//!   guest prints can look like one.
//! * **Capped per line.** At most [`LINE_MAX`] bytes of a line are shown;
//!   the rest is replaced by ` [N more bytes]`.
//! * **Rate-capped per guest.** A token bucket of [`BURST_BYTES`] refilled
//!   at [`RATE_BYTES_PER_SEC`]: a line that does not fit is dropped and
//!   counted, and the count is reported (as a status line) before the next
//!   line that fits. At 115200 baud 1 KiB takes about 90 ms on the wire, and
//!   each console line is written with interrupts off, so a guest that
//!   floods its console gets a small, bounded share of the serial port and
//!   never holds interrupts off for longer than one capped line.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use core::fmt;

/// Guest bytes shown per line (before escaping); longer lines are cut.
pub const LINE_MAX: usize = 160;
/// Bytes a guest may print at once before the rate cap applies (about
/// 1.4 s of serial output at 115200 baud: a kernel's boot messages).
pub const BURST_BYTES: u64 = 16 * 1024;
/// Sustained console rate per guest, in bytes per second (about 35 % of a
/// 115200-baud line).
pub const RATE_BYTES_PER_SEC: u64 = 4 * 1024;

/// Guest bytes shown escaped: `Display` writes the escaped form of at most
/// `max` bytes, then ` [N more bytes]` if any were cut.
#[derive(Clone, Copy)]
pub struct Escaped<'a> {
    bytes: &'a [u8],
    max: usize,
}

impl<'a> Escaped<'a> {
    /// All of `bytes`, escaped.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            max: usize::MAX,
        }
    }

    /// At most `max` bytes of `bytes`, escaped.
    pub fn capped(bytes: &'a [u8], max: usize) -> Self {
        Self { bytes, max }
    }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (shown, cut) = self.bytes.split_at(self.bytes.len().min(self.max));
        // Runs of plain bytes are written in one go.
        let mut plain_from = 0;
        for (i, &b) in shown.iter().enumerate() {
            let escape = match b {
                b'\\' => Some("\\\\"),
                b'\t' => Some("\\t"),
                b'\r' => Some("\\r"),
                b'\n' => Some("\\n"),
                0x20..=0x7e => continue,
                _ => None,
            };
            if let Some(run) = shown.get(plain_from..i) {
                // Every byte of the run is printable ASCII, so this is UTF-8.
                f.write_str(core::str::from_utf8(run).unwrap_or(""))?;
            }
            // `i` indexes a slice, so `i + 1 <= len` cannot overflow.
            plain_from = i.saturating_add(1);
            match escape {
                Some(e) => f.write_str(e)?,
                None => write!(f, "\\x{b:02x}")?,
            }
        }
        if let Some(run) = shown.get(plain_from..) {
            f.write_str(core::str::from_utf8(run).unwrap_or(""))?;
        }
        if !cut.is_empty() {
            write!(f, " [{} more bytes]", cut.len())?;
        }
        Ok(())
    }
}

/// What the launcher prints for a piece of guest console output.
#[derive(Clone, Copy)]
pub enum ConsoleLine<'a> {
    /// One line of guest text: print as `guest NAME: {line}`.
    Text(Escaped<'a>),
    /// Lines were dropped by the rate cap since the last shown line: print
    /// as a status line (`guest NAME console: N lines (B bytes) dropped`).
    Dropped {
        /// Lines dropped.
        lines: u64,
        /// Their bytes.
        bytes: u64,
    },
}

/// Joins a guest's output that arrives in pieces into whole lines: Linux's
/// early console notifies 16-byte chunks, and a virtio console hands over
/// whatever its buffers hold. A `\n` ends a line (a `\r` right before it is
/// part of the line end, so `\r\n` output shows no stray `\r`); a line
/// longer than [`ASSEMBLE_MAX`] bytes is handed over in pieces of that
/// size, so a guest that never sends `\n` cannot grow the buffer. A piece
/// only ever joins pieces of the same guest (one assembler per guest and
/// source), and every line still goes through [`GuestConsole`] (escaped,
/// prefixed, capped, rate-limited).
#[derive(Debug, Clone, Default)]
pub struct LineAssembler {
    buf: alloc::vec::Vec<u8>,
}

/// The longest line a [`LineAssembler`] holds before handing it over.
pub const ASSEMBLE_MAX: usize = 256;

extern crate alloc;

impl LineAssembler {
    /// An empty assembler.
    pub const fn new() -> Self {
        Self {
            buf: alloc::vec::Vec::new(),
        }
    }

    /// Adds `text`; `line` receives every line it completes (without the
    /// line end).
    pub fn push(&mut self, text: &[u8], mut line: impl FnMut(&[u8])) {
        for &b in text {
            if b == b'\n' {
                if self.buf.last() == Some(&b'\r') {
                    self.buf.pop();
                }
                line(&self.buf);
                self.buf.clear();
            } else {
                self.buf.push(b);
                if self.buf.len() >= ASSEMBLE_MAX {
                    line(&self.buf);
                    self.buf.clear();
                }
            }
        }
    }

    /// Hands over a partial line still held (at the guest's end).
    pub fn finish(&mut self, mut line: impl FnMut(&[u8])) {
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if !self.buf.is_empty() {
            line(&self.buf);
            self.buf.clear();
        }
    }

    /// Bytes held (a partial line).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// One guest's console: splits its output into lines and applies the rate
/// cap. Time is passed in (nanoseconds, any monotonic origin).
#[derive(Debug, Clone)]
pub struct GuestConsole {
    /// Bytes that may be printed now, scaled by 10^9 (byte-nanoseconds) so
    /// that refills need no division.
    tokens: u64,
    last_ns: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
}

const NS_PER_SEC: u64 = 1_000_000_000;

impl Default for GuestConsole {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestConsole {
    /// A console with a full bucket.
    pub const fn new() -> Self {
        Self {
            tokens: BURST_BYTES * NS_PER_SEC,
            last_ns: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    /// Lines dropped so far and not yet reported.
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_lines, self.dropped_bytes)
    }

    fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let add = elapsed.saturating_mul(RATE_BYTES_PER_SEC);
        self.tokens = self
            .tokens
            .saturating_add(add)
            .min(BURST_BYTES * NS_PER_SEC);
    }

    /// Feeds guest output at time `now_ns` (whole lines, from a
    /// [`LineAssembler`]); `emit` receives the lines to print, in order.
    /// Every `\n` ends a line; text after the last `\n` is a line of its
    /// own. A line
    /// costs its length plus one (the newline), however much of it is shown.
    pub fn write(&mut self, now_ns: u64, text: &[u8], mut emit: impl FnMut(ConsoleLine<'_>)) {
        self.refill(now_ns);
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        for line in text.split(|&b| b == b'\n') {
            let cost = (line.len() as u64).saturating_add(1);
            let cost_scaled = cost.saturating_mul(NS_PER_SEC);
            if cost_scaled > self.tokens {
                self.dropped_lines = self.dropped_lines.saturating_add(1);
                self.dropped_bytes = self.dropped_bytes.saturating_add(cost);
                continue;
            }
            self.tokens = self.tokens.saturating_sub(cost_scaled);
            if self.dropped_lines > 0 {
                emit(ConsoleLine::Dropped {
                    lines: self.dropped_lines,
                    bytes: self.dropped_bytes,
                });
                self.dropped_lines = 0;
                self.dropped_bytes = 0;
            }
            emit(ConsoleLine::Text(Escaped::capped(line, LINE_MAX)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(pieces: &[&[u8]]) -> (Vec<Vec<u8>>, usize) {
        let mut a = LineAssembler::new();
        let mut out = Vec::new();
        for p in pieces {
            a.push(p, |l| out.push(l.to_vec()));
        }
        let held = a.pending();
        a.finish(|l| out.push(l.to_vec()));
        (out, held)
    }

    #[test]
    fn pieces_join_into_lines_and_crlf_is_one_line_end() {
        let (lines, held) = assemble(&[b"Linux vers", b"ion 3.10\r", b"\nsecond\r\nthi", b"rd"]);
        assert_eq!(
            lines,
            [
                b"Linux version 3.10".to_vec(),
                b"second".to_vec(),
                b"third".to_vec()
            ]
        );
        assert_eq!(held, 5, "\"third\" waited for its line end");
        // A lone \r inside a line is the guest's: kept (and escaped later).
        let (lines, _) = assemble(&[b"a\rb\n\n"]);
        assert_eq!(lines, [b"a\rb".to_vec(), b"".to_vec()]);
    }

    #[test]
    fn a_line_without_end_is_handed_over_in_bounded_pieces() {
        let long = [b'x'; ASSEMBLE_MAX * 2 + 3];
        let (lines, held) = assemble(&[&long]);
        assert_eq!(held, 3);
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() <= ASSEMBLE_MAX));
        assert_eq!(lines.iter().map(Vec::len).sum::<usize>(), long.len());
    }

    fn esc(b: &[u8]) -> String {
        Escaped::new(b).to_string()
    }

    /// Runs `write` and renders what the launcher would print.
    fn feed(c: &mut GuestConsole, now_ns: u64, text: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        c.write(now_ns, text, |l| {
            out.push(match l {
                ConsoleLine::Text(t) => format!("guest g: {t}"),
                ConsoleLine::Dropped { lines, bytes } => {
                    format!("guest g console: {lines} lines ({bytes} bytes) dropped")
                }
            });
        });
        out
    }

    #[test]
    fn printable_ascii_passes_and_everything_else_is_escaped() {
        assert_eq!(esc(b"hello, world ~!"), "hello, world ~!");
        assert_eq!(esc(b"a\\b"), "a\\\\b");
        assert_eq!(esc(b"\rguest x: power off"), "\\rguest x: power off");
        assert_eq!(esc(b"\x1b[2J\x1b[H"), "\\x1b[2J\\x1b[H");
        assert_eq!(esc(b"t\tn\nz\0d\x7f"), "t\\tn\\nz\\x00d\\x7f");
        assert_eq!(esc("é".as_bytes()), "\\xc3\\xa9");
        assert_eq!(esc(b""), "");
        // Every byte value: the output is printable ASCII only.
        let all: Vec<u8> = (0..=255).collect();
        let out = esc(&all);
        assert!(out.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{out}");
    }

    #[test]
    fn escaping_is_reversible() {
        // A guest that prints a literal backslash-x sequence is told apart
        // from one that printed the byte itself.
        assert_ne!(esc(b"\\x1b"), esc(b"\x1b"));
        let all: Vec<u8> = (0..=255).chain(b"\\\\x41\\".iter().copied()).collect();
        let out = esc(&all);
        let mut back = Vec::new();
        let mut it = out.bytes();
        while let Some(b) = it.next() {
            if b != b'\\' {
                back.push(b);
                continue;
            }
            match it.next() {
                Some(b'\\') => back.push(b'\\'),
                Some(b't') => back.push(b'\t'),
                Some(b'r') => back.push(b'\r'),
                Some(b'n') => back.push(b'\n'),
                Some(b'x') => {
                    let hi = it.next().unwrap();
                    let lo = it.next().unwrap();
                    let hex = [hi, lo];
                    let s = core::str::from_utf8(&hex).unwrap();
                    back.push(u8::from_str_radix(s, 16).unwrap());
                }
                other => panic!("bad escape {other:?}"),
            }
        }
        assert_eq!(back, all);
    }

    #[test]
    fn long_lines_are_cut_with_a_count() {
        let line = [b'a'; LINE_MAX + 40];
        let out = Escaped::capped(&line, LINE_MAX).to_string();
        assert_eq!(out, format!("{} [40 more bytes]", "a".repeat(LINE_MAX)));
        // Exactly LINE_MAX bytes: nothing cut.
        let out = Escaped::capped(&line[..LINE_MAX], LINE_MAX).to_string();
        assert_eq!(out, "a".repeat(LINE_MAX));
        // The cap counts guest bytes, the escapes may make the line longer.
        let ctl = [0x1bu8; 3];
        assert_eq!(
            Escaped::capped(&ctl, 2).to_string(),
            "\\x1b\\x1b [1 more bytes]"
        );
    }

    #[test]
    fn every_line_is_prefixed_and_no_guest_text_starts_a_line() {
        let mut c = GuestConsole::new();
        let out = feed(
            &mut c,
            0,
            b"one\n\rguest g powered off\nguest g killed: x\n\nlast",
        );
        assert_eq!(
            out,
            [
                "guest g: one",
                "guest g: \\rguest g powered off",
                "guest g: guest g killed: x",
                "guest g: ",
                "guest g: last",
            ]
        );
        // A single trailing newline ends the last line; it adds no empty one.
        assert_eq!(feed(&mut c, 0, b"x\n"), ["guest g: x"]);
        assert_eq!(feed(&mut c, 0, b"\n"), ["guest g: "]);
    }

    #[test]
    fn a_flood_is_cut_to_the_burst_then_to_the_rate_and_reported() {
        let mut c = GuestConsole::new();
        let line = [b'x'; 127]; // 128 bytes with its newline: the bucket sizes are multiples
        let mut shown = 0u64;
        for _ in 0..1000 {
            shown += feed(&mut c, 0, &line).len() as u64;
        }
        // At time 0 only the burst gets through.
        assert_eq!(shown, BURST_BYTES / 128);
        assert_eq!(c.dropped(), (1000 - shown, (1000 - shown) * 128));
        // One second later the rate allows RATE/100 more lines; the first
        // one shown is preceded by the report of what was dropped.
        let out = feed(&mut c, NS_PER_SEC, &line);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            format!(
                "guest g console: {} lines ({} bytes) dropped",
                1000 - shown,
                (1000 - shown) * 128
            )
        );
        assert_eq!(c.dropped(), (0, 0));
        // The rest of that second's refill: RATE/100 lines in all.
        let mut more = 1;
        for _ in 0..1000 {
            more += feed(&mut c, NS_PER_SEC, &line).len() as u64;
        }
        assert_eq!(more, RATE_BYTES_PER_SEC / 128);
        // The bucket never holds more than the burst, however long the
        // guest was quiet.
        let mut quiet = 0u64;
        for _ in 0..1000 {
            quiet += feed(&mut c, 3600 * NS_PER_SEC, &line).len() as u64;
        }
        // One extra line: the report of the earlier drops.
        assert_eq!(quiet, BURST_BYTES / 128 + 1);
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let mut c = GuestConsole::new();
        let big = [b'y'; 1023];
        for _ in 0..(BURST_BYTES / 1024) {
            assert_eq!(feed(&mut c, 5 * NS_PER_SEC, &big).len(), 1);
        }
        assert!(feed(&mut c, 5 * NS_PER_SEC, &big).is_empty());
        assert!(feed(&mut c, NS_PER_SEC, &big).is_empty());
        assert!(feed(&mut c, 5 * NS_PER_SEC, &big).is_empty());
        // Half a second after the latest time seen: 1 KiB more.
        assert_eq!(feed(&mut c, 5 * NS_PER_SEC + NS_PER_SEC / 2, &big).len(), 2);
    }
}
