//! Helpers shared by the unit tests (compiled only for `cargo test`).

/// xorshift64: the deterministic pseudo-random numbers of the randomised
/// tests (the one copy; seed with any non-zero state).
pub(crate) struct Rng(pub u64);

impl Rng {
    /// The next number (the state must not be 0).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (`n` > 0; slightly biased, fine for tests).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
