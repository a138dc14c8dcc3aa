//! The deterministic contents of generated test disks.
//!
//! `cargo xtask` writes a data module (a GRUB module backing a guest's
//! virtio block device) with [`pattern_byte`] at every offset; a test guest
//! recomputes it to verify what it reads, and [`fnv1a`] gives a checksum
//! both sides can print.

/// The byte at `offset` of a `pattern` disk: a mix of the offset, so every
/// sector differs from every other and from its neighbours' shifts.
pub const fn pattern_byte(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 56) as u8) ^ ((offset >> 9) as u8)
}

/// 32-bit FNV-1a of `bytes`, continuing from `hash` (start with
/// [`FNV_OFFSET`]).
pub const fn fnv1a(mut hash: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u32 = 0x811C_9DC5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_not_trivial_and_fnv_is_standard() {
        let s0: [u8; 16] = core::array::from_fn(|i| pattern_byte(i as u64));
        let s1: [u8; 16] = core::array::from_fn(|i| pattern_byte(512 + i as u64));
        assert_ne!(s0, s1);
        assert!(s0.iter().any(|&b| b != s0[0]));
        // FNV-1a("a") = 0xe40c292c.
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xe40c_292c);
    }
}
