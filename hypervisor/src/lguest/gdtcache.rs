//! Which guest's descriptors the hardware GDT holds, so a guest entry can
//! skip copying them when nothing changed.
//!
//! The key is the pair (guest instance, GDT generation): instances are
//! unique per started guest and never reused, generations count one guest's
//! GDT changes. Two different guests at the same generation, or any two
//! pairs that some packing into one word would confuse, are different keys.

/// The descriptors of guest `instance` as of its GDT `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GdtKey {
    /// Unique per started guest.
    pub instance: u64,
    /// That guest's GDT generation.
    pub generation: u64,
}

/// What the hardware GDT holds: a key, or unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadedGdt(Option<GdtKey>);

impl LoadedGdt {
    /// Unknown contents.
    pub const fn new() -> Self {
        Self(None)
    }

    /// Whether the descriptors of `key` must be copied in; records them as
    /// loaded (the caller copies them when this returns `true`).
    pub fn must_load(&mut self, key: GdtKey) -> bool {
        if self.0 == Some(key) {
            return false;
        }
        self.0 = Some(key);
        true
    }

    /// The hardware GDT was changed behind the cache's back.
    pub fn forget(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(instance: u64, generation: u64) -> GdtKey {
        GdtKey {
            instance,
            generation,
        }
    }

    #[test]
    fn unchanged_descriptors_are_not_copied_again() {
        let mut l = LoadedGdt::new();
        assert!(l.must_load(key(1, 0)));
        assert!(!l.must_load(key(1, 0)));
        assert!(l.must_load(key(1, 1)));
        assert!(!l.must_load(key(1, 1)));
    }

    #[test]
    fn another_guest_at_the_same_generation_is_copied() {
        let mut l = LoadedGdt::new();
        assert!(l.must_load(key(1, 5)));
        assert!(l.must_load(key(2, 5)));
        assert!(l.must_load(key(1, 5)));
    }

    #[test]
    fn keys_that_a_packed_word_would_confuse_are_different() {
        // (instance << 32) ^ generation maps both of these to 1 << 32.
        let mut l = LoadedGdt::new();
        assert!(l.must_load(key(1, 0)));
        assert!(l.must_load(key(0, 1 << 32)));
        assert!(l.must_load(key(3, 1 << 32)));
        assert!(l.must_load(key(2, 0)));
    }

    #[test]
    fn forgetting_forces_a_copy() {
        let mut l = LoadedGdt::new();
        assert!(l.must_load(key(1, 0)));
        l.forget();
        assert!(l.must_load(key(1, 0)));
    }
}
