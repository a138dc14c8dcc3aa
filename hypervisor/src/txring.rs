//! The serial console's transmit ring: whole records in, bytes out.
//!
//! Writers append complete *records* (in practice one line each, as printed
//! by one `kprintln!` or one log record) with [`TxRing::push_with`]; the
//! transmitter takes bytes from the other end with [`TxRing::pop_into`], a
//! UART FIFO load at a time. A record goes in whole or not at all, so one
//! writer's line is never split by another's: the writer formats straight
//! into the free space past the tail and the record becomes visible to the
//! transmitter only when it is complete and fits. Line feeds are stored as
//! CR LF, as a serial terminal wants them.
//!
//! **Overflow policy.** Pushing never blocks and never evicts queued output:
//! a record that does not fit is dropped whole and counted (records, lines
//! and bytes of text). From that moment the ring is *dropping*: it refuses
//! every new record until at least a quarter of it is free again
//! ([`TxRing::resume_free`]), so a sustained flood loses long runs of lines
//! rather than every other one. When room returns — on the next push or as
//! the transmitter frees space, whichever comes first — the ring queues one
//! notice, `console: N lines (B bytes) dropped: output buffer full`, at the
//! place of the gap, before any later line. The fact of the loss is never
//! lost: the notice is queued before anything else is accepted, and the
//! totals stay available from [`TxRing::dropped`].
//!
//! Nothing here touches hardware or allocates; the kernel keeps the ring in
//! an interrupt-safe lock (`kernel::console`). The capacity `N` must leave
//! room for the notice (about 100 bytes); the console uses [`CAPACITY`].

use core::fmt::{self, Write};

/// Capacity of the hypervisor console's ring: 64 KiB, about 5.7 s of output
/// at 115200 baud (11.5 KB/s).
pub const CAPACITY: usize = 64 * 1024;

/// A byte FIFO of capacity `N` filled with whole records.
#[derive(Clone, Debug)]
pub struct TxRing<const N: usize> {
    buf: [u8; N],
    /// Index of the oldest queued byte.
    head: usize,
    /// Queued bytes.
    len: usize,
    /// Dropping records until room returns (a notice is owed).
    dropping: bool,
    /// Lost since the last notice: lines and bytes of text.
    pending: Dropped,
    /// Lost since the ring was made.
    total: Dropped,
}

/// Output lost because the ring was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Lines (line feeds in the dropped records; a record without one counts
    /// as one line).
    pub lines: u64,
    /// Bytes of text in the dropped records (as written, before the CR that
    /// precedes each line feed).
    pub bytes: u64,
}

impl Dropped {
    fn add(&mut self, lines: u64, bytes: u64) {
        self.lines = self.lines.saturating_add(lines);
        self.bytes = self.bytes.saturating_add(bytes);
    }
}

/// One record being written into the free space of a [`TxRing`]; implements
/// [`fmt::Write`]. Nothing written is visible until the ring commits it.
pub struct Record<'a> {
    buf: &'a mut [u8],
    /// Where the record starts (the ring's tail).
    start: usize,
    /// Bytes it may occupy (free space, or 0 while dropping).
    limit: usize,
    /// Bytes stored so far.
    stored: usize,
    /// Bytes of text offered, counted even past the point it stopped fitting.
    text: u64,
    /// Line feeds offered.
    newlines: u64,
    overflow: bool,
}

impl Record<'_> {
    fn put(&mut self, b: u8) {
        if self.overflow {
            return;
        }
        if self.stored >= self.limit {
            self.overflow = true;
            return;
        }
        let n = self.buf.len();
        // start < n and stored < limit <= n, so one subtraction wraps it.
        let mut i = self.start + self.stored;
        if i >= n {
            i -= n;
        }
        match self.buf.get_mut(i) {
            Some(slot) => {
                *slot = b;
                self.stored += 1;
            }
            None => self.overflow = true,
        }
    }

    /// Whether the record has outgrown the room it was given.
    #[must_use]
    pub const fn overflowed(&self) -> bool {
        self.overflow
    }
}

impl Write for Record<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' {
                self.put(b'\r');
                self.newlines = self.newlines.saturating_add(1);
            }
            self.put(b);
        }
        self.text = self.text.saturating_add(s.len() as u64);
        Ok(())
    }
}

impl<const N: usize> Default for TxRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> TxRing<N> {
    /// An empty ring (usable in a `static`).
    #[must_use]
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            head: 0,
            len: 0,
            dropping: false,
            pending: Dropped { lines: 0, bytes: 0 },
            total: Dropped { lines: 0, bytes: 0 },
        }
    }

    /// Capacity in bytes.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Queued bytes.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Free bytes.
    #[must_use]
    pub const fn free(&self) -> usize {
        N - self.len
    }

    /// Free space at which a dropping ring accepts records again: a quarter
    /// of the capacity.
    #[must_use]
    pub const fn resume_free(&self) -> usize {
        N / 4
    }

    /// Whether the ring is dropping records (a notice is owed).
    #[must_use]
    pub const fn is_dropping(&self) -> bool {
        self.dropping
    }

    /// Everything lost since the ring was made.
    #[must_use]
    pub const fn dropped(&self) -> Dropped {
        self.total
    }

    /// Appends one record, written by `write` into a [`Record`], whole or
    /// not at all. Returns whether it was queued; a dropped record is
    /// counted. Never blocks. An error from `write` (a failing `Display`
    /// impl) keeps what was written, as printing would.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Record<'_>) -> fmt::Result) -> bool {
        self.notice();
        let limit = if self.dropping { 0 } else { self.free() };
        let mut rec = self.record(limit);
        let _ = write(&mut rec);
        let (stored, text, newlines, overflow) = (rec.stored, rec.text, rec.newlines, rec.overflow);
        if !overflow {
            self.len += stored;
            return true;
        }
        let lines = newlines.max(1);
        self.pending.add(lines, text);
        self.total.add(lines, text);
        self.dropping = true;
        // A record too big for an otherwise roomy ring: say so at once.
        self.notice();
        false
    }

    /// Appends `s` as one record; see [`Self::push_with`].
    pub fn push_str(&mut self, s: &str) -> bool {
        self.push_with(|rec| rec.write_str(s))
    }

    /// Appends formatted text as one record; see [`Self::push_with`].
    pub fn push_fmt(&mut self, args: fmt::Arguments<'_>) -> bool {
        self.push_with(|rec| rec.write_fmt(args))
    }

    /// Moves up to `out.len()` of the oldest bytes into `out` and returns
    /// how many. Queues the drop notice if this made room for it.
    pub fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        let first = n.min(N - self.head);
        if let (Some(dst), Some(src)) = (
            out.get_mut(..first),
            self.buf.get(self.head..self.head + first),
        ) {
            dst.copy_from_slice(src);
        }
        if let (Some(dst), Some(src)) = (out.get_mut(first..n), self.buf.get(..n - first)) {
            dst.copy_from_slice(src);
        }
        self.head += n;
        if self.head >= N {
            self.head -= N;
        }
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
        }
        self.notice();
        n
    }

    /// A record over the free space past the tail, allowed `limit` bytes.
    fn record(&mut self, limit: usize) -> Record<'_> {
        let mut start = self.head + self.len;
        if start >= N {
            start -= N;
        }
        Record {
            buf: &mut self.buf,
            start,
            limit,
            stored: 0,
            text: 0,
            newlines: 0,
            overflow: false,
        }
    }

    /// If dropping and room has returned, queues the notice and accepts
    /// records again.
    fn notice(&mut self) {
        if !self.dropping || self.free() < self.resume_free() {
            return;
        }
        let Dropped { lines, bytes } = self.pending;
        let mut rec = self.record(N - self.len);
        let _ = writeln!(
            rec,
            "console: {lines} lines ({bytes} bytes) dropped: output buffer full"
        );
        if rec.overflow {
            return; // a ring too small for the notice keeps owing it
        }
        let stored = rec.stored;
        self.len += stored;
        self.dropping = false;
        self.pending = Dropped::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn drain<const N: usize>(r: &mut TxRing<N>, chunk: usize) -> String {
        let mut all = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = r.pop_into(&mut buf);
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(all).unwrap()
    }

    #[test]
    fn lines_get_crlf_and_come_out_in_order() {
        let mut r = TxRing::<256>::new();
        assert!(r.is_empty());
        assert!(r.push_str("one\n"));
        assert!(r.push_fmt(format_args!("{} {}\n", "two", 2)));
        assert!(r.push_str("no newline"));
        assert_eq!(r.len(), 5 + 7 + 10);
        assert_eq!(drain(&mut r, 16), "one\r\ntwo 2\r\nno newline");
        assert!(r.is_empty());
        assert_eq!(r.dropped(), Dropped::default());
        assert_eq!(r.capacity(), 256);
    }

    #[test]
    fn wraparound_keeps_bytes_in_order() {
        let mut r = TxRing::<256>::new();
        let mut out = String::new();
        let mut want = String::new();
        // Records of awkward sizes, drained in odd chunks, so the head and
        // the tail both cross the end many times.
        for i in 0..2000 {
            let line = format!("line {i} {}\n", "x".repeat(i % 37));
            assert!(r.push_str(&line), "record {i} must fit");
            want.push_str(&line.replace('\n', "\r\n"));
            let mut buf = [0u8; 13];
            while r.len() > 150 {
                let n = r.pop_into(&mut buf);
                out.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            }
        }
        out.push_str(&drain(&mut r, 7));
        assert_eq!(out, want);
        assert_eq!(r.dropped(), Dropped::default());
    }

    #[test]
    fn record_that_does_not_fit_is_dropped_whole() {
        let mut r = TxRing::<256>::new();
        assert!(r.push_str(&"a".repeat(200)));
        // 60 bytes free: a 70-byte record goes entirely or not at all, even
        // when written in pieces.
        let ok = r.push_with(|rec| {
            for _ in 0..7 {
                rec.write_str("bbbbbbbbbb")?;
            }
            Ok(())
        });
        assert!(!ok);
        assert_eq!(r.len(), 200);
        assert!(r.is_dropping());
        assert_eq!(
            r.dropped(),
            Dropped {
                lines: 1,
                bytes: 70
            }
        );
        // While dropping, even a small record is refused (hysteresis).
        assert!(!r.push_str("c\n"));
        assert_eq!(r.len(), 200);
        // No byte of a dropped record leaked out; the gap is reported.
        assert_eq!(
            drain(&mut r, 16),
            format!(
                "{}console: 2 lines (72 bytes) dropped: output buffer full\r\n",
                "a".repeat(200)
            )
        );
    }

    #[test]
    fn notice_follows_the_gap_and_counts_it() {
        let mut r = TxRing::<256>::new();
        assert!(r.push_str(&format!("{}\n", "a".repeat(229)))); // 231 bytes, 25 free
        let one = "dropped record one, rather long\n";
        let two = "dropped two\nand three\n";
        assert!(!r.push_str(one));
        // Dropping now: refused although it would fit (hysteresis).
        assert!(!r.push_str(two));
        let bytes = (one.len() + two.len()) as u64;
        assert_eq!(r.dropped(), Dropped { lines: 3, bytes });
        // 33 free < 64 (a quarter): still dropping after a small pop.
        let mut buf = [0u8; 8];
        assert_eq!(r.pop_into(&mut buf), 8);
        assert!(r.is_dropping());
        assert!(!r.push_str("x\n"));
        let bytes = bytes + 2;
        // Draining makes room: the transmitter side queues the notice, with
        // no writer needed.
        let out = drain(&mut r, 16);
        assert!(!r.is_dropping());
        let notice = format!("console: 4 lines ({bytes} bytes) dropped: output buffer full\r\n");
        assert!(out.ends_with(&notice), "{out:?}");
        assert_eq!(out.len(), 231 - 8 + notice.len());
        // Accepting again; the totals stay.
        assert!(r.push_str("after\n"));
        assert_eq!(drain(&mut r, 16), "after\r\n");
        assert_eq!(r.dropped(), Dropped { lines: 4, bytes });
    }

    #[test]
    fn notice_comes_before_the_next_accepted_line() {
        let mut r = TxRing::<256>::new();
        assert!(r.push_str(&"a".repeat(250)));
        assert!(!r.push_str("lost line\n"));
        let mut buf = [0u8; 250];
        assert_eq!(r.pop_into(&mut buf), 250);
        assert!(r.push_str("next\n"));
        assert_eq!(
            drain(&mut r, 64),
            "console: 1 lines (10 bytes) dropped: output buffer full\r\nnext\r\n"
        );
    }

    #[test]
    fn oversized_record_in_an_empty_ring_is_reported_at_once() {
        let mut r = TxRing::<128>::new();
        assert!(!r.push_str(&"z".repeat(300)));
        assert!(!r.is_dropping());
        assert_eq!(
            drain(&mut r, 16),
            "console: 1 lines (300 bytes) dropped: output buffer full\r\n"
        );
    }

    #[test]
    fn exact_fit_and_empty_records() {
        let mut r = TxRing::<128>::new();
        assert!(r.push_str(&"q".repeat(128)));
        assert_eq!(r.free(), 0);
        assert!(r.push_str("")); // nothing to store: always fits
        assert!(!r.is_dropping());
        assert_eq!(drain(&mut r, 128), "q".repeat(128));
    }

    #[test]
    fn zero_capacity_drops_everything() {
        let mut r = TxRing::<0>::new();
        assert!(!r.push_str("a\n"));
        assert_eq!(r.pop_into(&mut [0u8; 4]), 0);
        assert_eq!(r.dropped(), Dropped { lines: 1, bytes: 2 });
    }

    /// A model: records in, bytes out, checked against a VecDeque of whole
    /// records with the same policy.
    #[test]
    fn random_against_model() {
        const N: usize = 512;
        let mut r = TxRing::<N>::new();
        let mut model: VecDeque<u8> = VecDeque::new();
        let mut dropping = false;
        let mut pending = Dropped::default();
        let mut total = Dropped::default();
        let mut rng = crate::testutil::Rng(0x5EED);
        let notice = |model: &mut VecDeque<u8>, dropping: &mut bool, pending: &mut Dropped| {
            let text = format!(
                "console: {} lines ({} bytes) dropped: output buffer full\r\n",
                pending.lines, pending.bytes
            );
            if *dropping && N - model.len() >= N / 4 && N - model.len() >= text.len() {
                model.extend(text.bytes());
                *dropping = false;
                *pending = Dropped::default();
            }
        };
        for i in 0..100_000u64 {
            let x = rng.next_u64();
            if x % 5 < 3 {
                let len = (x >> 8) as usize % 90;
                let nl = !(x >> 16).is_multiple_of(4);
                let body: String = (0..len)
                    .map(|k| char::from(b'a' + ((i as usize + k) % 26) as u8))
                    .collect();
                let text = if nl { format!("{body}\n") } else { body };
                let stored = text.replace('\n', "\r\n");
                notice(&mut model, &mut dropping, &mut pending);
                // An empty record loses nothing, so it "fits" even while dropping.
                let fits = stored.is_empty() || (!dropping && stored.len() <= N - model.len());
                assert_eq!(r.push_str(&text), fits, "step {i}");
                if fits {
                    model.extend(stored.bytes());
                } else {
                    let lines = text.matches('\n').count().max(1) as u64;
                    pending.add(lines, text.len() as u64);
                    total.add(lines, text.len() as u64);
                    dropping = true;
                    notice(&mut model, &mut dropping, &mut pending);
                }
            } else {
                let want = (x >> 8) as usize % 40;
                let mut buf = vec![0u8; want];
                let n = r.pop_into(&mut buf);
                let expect: Vec<u8> = (0..want.min(model.len()))
                    .filter_map(|_| model.pop_front())
                    .collect();
                assert_eq!(&buf[..n], &expect[..], "step {i}");
                notice(&mut model, &mut dropping, &mut pending);
            }
            assert_eq!(r.len(), model.len(), "step {i}");
            assert_eq!(r.is_dropping(), dropping, "step {i}");
            assert_eq!(r.dropped(), total);
        }
        assert!(total.lines > 0, "the test must overflow the ring");
    }
}
