//! Fixed-capacity byte ring buffer, e.g. for serial input: filled from the
//! IRQ handler, drained by tasks. Not lock-free; the kernel wraps it in an
//! IRQ-safe lock. Never allocates.

/// A FIFO of at most `N` bytes that counts bytes dropped because it was
/// full.
#[derive(Clone, Debug)]
pub struct RingBuffer<const N: usize> {
    buf: [u8; N],
    /// Index of the oldest byte.
    head: usize,
    len: usize,
    dropped: u64,
}

impl<const N: usize> Default for RingBuffer<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RingBuffer<N> {
    /// An empty buffer (usable in a `static`).
    #[must_use]
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            head: 0,
            len: 0,
            dropped: 0,
        }
    }

    /// Appends `b`; returns `false` (and counts the byte as dropped) if the
    /// buffer is full.
    pub fn push(&mut self, b: u8) -> bool {
        if self.len >= N {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        let tail = (self.head + self.len) % N;
        match self.buf.get_mut(tail) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
                true
            }
            None => {
                self.dropped = self.dropped.saturating_add(1);
                false
            }
        }
    }

    /// Removes and returns the oldest byte.
    pub fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let b = *self.buf.get(self.head)?;
        self.head = (self.head + 1) % N;
        self.len -= 1;
        Some(b)
    }

    /// The oldest byte, without removing it.
    #[must_use]
    pub fn peek(&self) -> Option<u8> {
        if self.len == 0 {
            None
        } else {
            self.buf.get(self.head).copied()
        }
    }

    /// Pops up to `out.len()` bytes into `out`, returning how many.
    pub fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        for slot in out.iter_mut() {
            match self.pop() {
                Some(b) => *slot = b,
                None => break,
            }
            n += 1;
        }
        n
    }

    /// Number of buffered bytes.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are buffered.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the next `push` would fail.
    #[must_use]
    pub const fn is_full(&self) -> bool {
        self.len >= N
    }

    /// Capacity in bytes.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Total bytes dropped because the buffer was full.
    #[must_use]
    pub const fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Discards all buffered bytes (the dropped counter is kept).
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn fifo_wraparound_overflow() {
        let mut r = RingBuffer::<4>::new();
        assert!(r.is_empty());
        assert_eq!(r.pop(), None);
        for b in 1..=4 {
            assert!(r.push(b));
        }
        assert!(r.is_full());
        assert!(!r.push(5));
        assert!(!r.push(6));
        assert_eq!(r.dropped(), 2);
        assert_eq!(r.len(), 4);
        assert_eq!(r.pop(), Some(1));
        assert_eq!(r.pop(), Some(2));
        assert!(r.push(7));
        assert!(r.push(8)); // wraps
        assert_eq!(r.peek(), Some(3));
        let mut out = [0; 8];
        assert_eq!(r.pop_into(&mut out), 4);
        assert_eq!(&out[..4], &[3, 4, 7, 8]);
        assert!(r.is_empty());
        assert_eq!(r.dropped(), 2);
        r.push(9);
        r.clear();
        assert_eq!(r.pop(), None);
        assert_eq!(r.capacity(), 4);
    }

    #[test]
    fn zero_capacity() {
        let mut r = RingBuffer::<0>::new();
        assert!(!r.push(1));
        assert_eq!(r.pop(), None);
        assert_eq!(r.peek(), None);
        assert_eq!(r.dropped(), 1);
    }

    #[test]
    fn random_against_vecdeque() {
        let mut r = RingBuffer::<7>::new();
        let mut m = VecDeque::new();
        let mut dropped = 0;
        let mut rng = crate::testutil::Rng(0xACE1);
        for i in 0..50_000u64 {
            let x = rng.next_u64();
            if !x.is_multiple_of(3) {
                let b = i as u8;
                let ok = r.push(b);
                assert_eq!(ok, m.len() < 7);
                if ok {
                    m.push_back(b);
                } else {
                    dropped += 1;
                }
            } else {
                assert_eq!(r.pop(), m.pop_front());
            }
            assert_eq!(r.len(), m.len());
            assert_eq!(r.dropped(), dropped);
        }
    }
}
