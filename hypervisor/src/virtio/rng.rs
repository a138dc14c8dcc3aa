//! The virtio entropy device (id 4): one queue of device-writable buffers
//! that the host fills with random bytes. No features, no config.
//!
//! The bytes come from an [`EntropySource`] the integrator supplies: RDSEED
//! or RDRAND when the CPU has them, else [`ChaCha20Rng`] seeded from
//! whatever the boot offers (TSC jitter, RDRAND once, …).
//!
//! [`ChaCha20Rng`] is the fallback: the ChaCha20 block function (RFC 8439,
//! an add-rotate-xor design, checked against the RFC's test vector) run as
//! a keystream generator with *fast key erasure* — after every `fill` the
//! next 32 keystream bytes replace the key, so a later compromise of the
//! state does not reveal earlier output. It is deterministic: its output is
//! exactly as unpredictable as its 32-byte seed, and it never reseeds by
//! itself (call [`ChaCha20Rng::reseed`] to mix in fresh entropy).

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::vec::Vec;

use guest_abi::device::{VIRTIO_ID_RNG, VIRTQUEUE_NUM};

use super::queue::{Chain, VirtQueue};
use super::{DeviceError, VirtioDevice, expect_queues};
use crate::lguest::guestmem::GuestMemory;

/// Most bytes given for one request (a larger buffer gets this many).
pub const MAX_REQUEST: u32 = 64 * 1024;

const SIZES: [u16; 1] = [VIRTQUEUE_NUM];
const CHUNK: usize = 256;

/// A source of random bytes.
pub trait EntropySource {
    /// Fill all of `buf`; `false` if the source failed (e.g. RDRAND
    /// exhausted its retries), in which case `buf` is not to be used.
    fn fill(&mut self, buf: &mut [u8]) -> bool;
}

/// The entropy device model.
#[derive(Debug, Clone, Default)]
pub struct Rng {
    queues: Vec<VirtQueue>,
    chain: Chain,
    /// Bytes given to the guest.
    bytes: u64,
    /// Requests answered short because the source failed.
    failures: u64,
}

impl Rng {
    /// A new device (inactive until [`VirtioDevice::activate`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes given to the guest so far.
    pub fn bytes_given(&self) -> u64 {
        self.bytes
    }

    /// Requests answered short (or empty) because the source failed.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Fill every available buffer (up to [`MAX_REQUEST`] bytes each) from
    /// `src`. If the source fails, the chain is given back with what was
    /// filled so far and servicing stops. Returns the bytes given.
    pub fn service<M, S>(&mut self, mem: &mut M, src: &mut S) -> Result<u64, DeviceError>
    where
        M: GuestMemory + ?Sized,
        S: EntropySource + ?Sized,
    {
        let Some(q) = self.queues.get_mut(0) else {
            return Ok(0);
        };
        let mut total = 0u64;
        let mut buf = [0u8; CHUNK];
        while q.pop_into(mem, &mut self.chain)? {
            let want = self.chain.writable_len().min(MAX_REQUEST);
            let mut done = 0u32;
            let mut failed = false;
            while done < want {
                let n = (want.saturating_sub(done) as usize).min(CHUNK);
                let piece = buf.get_mut(..n).unwrap_or_default();
                if !src.fill(piece) {
                    failed = true;
                    break;
                }
                let put = self.chain.write_at(mem, done, piece)?;
                // `put <= n <= CHUNK`.
                done = done.saturating_add(put as u32);
            }
            buf.fill(0);
            q.push_used(mem, self.chain.head(), done)?;
            total = total.saturating_add(u64::from(done));
            if failed {
                self.failures = self.failures.saturating_add(1);
                break;
            }
        }
        self.bytes = self.bytes.saturating_add(total);
        Ok(total)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u8 {
        VIRTIO_ID_RNG
    }
    fn queue_sizes(&self) -> &[u16] {
        &SIZES
    }
    fn activate(&mut self, queues: Vec<VirtQueue>, _features: u32) -> Result<(), DeviceError> {
        expect_queues(&queues, SIZES.len())?;
        self.queues = queues;
        Ok(())
    }
    fn reset(&mut self) {
        self.queues.clear();
    }
    fn queues_mut(&mut self) -> &mut [VirtQueue] {
        &mut self.queues
    }
}

/// The ChaCha20 block function (RFC 8439 §2.3): 64 keystream bytes for
/// `key`, block `counter` and `nonce`.
pub fn chacha20_block(key: &[u32; 8], counter: u32, nonce: &[u32; 3]) -> [u8; 64] {
    let [k0, k1, k2, k3, k4, k5, k6, k7] = *key;
    let [n0, n1, n2] = *nonce;
    let init = [
        0x6170_7865,
        0x3320_646e,
        0x7962_2d32,
        0x6b20_6574,
        k0,
        k1,
        k2,
        k3,
        k4,
        k5,
        k6,
        k7,
        counter,
        n0,
        n1,
        n2,
    ];
    let [
        mut x0,
        mut x1,
        mut x2,
        mut x3,
        mut x4,
        mut x5,
        mut x6,
        mut x7,
        mut x8,
        mut x9,
        mut x10,
        mut x11,
        mut x12,
        mut x13,
        mut x14,
        mut x15,
    ] = init;
    macro_rules! qr {
        ($a:ident, $b:ident, $c:ident, $d:ident) => {
            $a = $a.wrapping_add($b);
            $d = ($d ^ $a).rotate_left(16);
            $c = $c.wrapping_add($d);
            $b = ($b ^ $c).rotate_left(12);
            $a = $a.wrapping_add($b);
            $d = ($d ^ $a).rotate_left(8);
            $c = $c.wrapping_add($d);
            $b = ($b ^ $c).rotate_left(7);
        };
    }
    for _ in 0..10 {
        qr!(x0, x4, x8, x12);
        qr!(x1, x5, x9, x13);
        qr!(x2, x6, x10, x14);
        qr!(x3, x7, x11, x15);
        qr!(x0, x5, x10, x15);
        qr!(x1, x6, x11, x12);
        qr!(x2, x7, x8, x13);
        qr!(x3, x4, x9, x14);
    }
    let fin = [
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
    ];
    let mut out = [0u8; 64];
    for (chunk, (w, i)) in out.chunks_exact_mut(4).zip(fin.iter().zip(init.iter())) {
        chunk.copy_from_slice(&w.wrapping_add(*i).to_le_bytes());
    }
    out
}

/// The deterministic fallback CSPRNG: ChaCha20 keystream with fast key
/// erasure (module docs). Not a source of entropy by itself: seed it well.
#[derive(Clone)]
pub struct ChaCha20Rng {
    key: [u32; 8],
    counter: u32,
    block: [u8; 64],
    /// Bytes of `block` already used (64 = none left).
    used: usize,
}

impl core::fmt::Debug for ChaCha20Rng {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print the key.
        f.write_str("ChaCha20Rng { .. }")
    }
}

impl ChaCha20Rng {
    /// A generator keyed with `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let mut key = [0u32; 8];
        for (k, c) in key.iter_mut().zip(seed.chunks_exact(4)) {
            let mut w = [0u8; 4];
            w.copy_from_slice(c);
            *k = u32::from_le_bytes(w);
        }
        Self {
            key,
            counter: 0,
            block: [0; 64],
            used: 64,
        }
    }

    /// Mix fresh entropy into the key (key ^= seed, then one erasure step).
    pub fn reseed(&mut self, seed: [u8; 32]) {
        for (k, c) in self.key.iter_mut().zip(seed.chunks_exact(4)) {
            let mut w = [0u8; 4];
            w.copy_from_slice(c);
            *k ^= u32::from_le_bytes(w);
        }
        self.rekey();
    }

    fn next_block(&mut self) -> [u8; 64] {
        let b = chacha20_block(&self.key, self.counter, &[0; 3]);
        self.counter = self.counter.wrapping_add(1);
        if self.counter == 0 {
            // 2^32 blocks under one key: take a fresh key first.
            self.rekey();
        }
        b
    }

    /// Replace the key with fresh keystream and discard buffered bytes.
    fn rekey(&mut self) {
        let b = chacha20_block(&self.key, self.counter, &[0; 3]);
        for (k, c) in self.key.iter_mut().zip(b.chunks_exact(4)) {
            let mut w = [0u8; 4];
            w.copy_from_slice(c);
            *k = u32::from_le_bytes(w);
        }
        self.counter = 0;
        self.block = [0; 64];
        self.used = 64;
    }

    /// Fill `buf` with keystream, then erase the key (fast key erasure).
    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            if self.used >= 64 {
                self.block = self.next_block();
                self.used = 0;
            }
            *b = self.block.get(self.used).copied().unwrap_or(0);
            self.used = self.used.saturating_add(1);
        }
        self.rekey();
    }
}

impl EntropySource for ChaCha20Rng {
    fn fill(&mut self, buf: &mut [u8]) -> bool {
        self.fill_bytes(buf);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testdriver::bring_up;

    #[test]
    fn chacha20_rfc8439_block() {
        // RFC 8439 §2.3.2.
        let mut key = [0u32; 8];
        for (i, k) in key.iter_mut().enumerate() {
            let b = (i * 4) as u8;
            *k = u32::from_le_bytes([b, b + 1, b + 2, b + 3]);
        }
        let out = chacha20_block(&key, 1, &[0x0900_0000, 0x4a00_0000, 0]);
        let want: [u8; 64] = [
            0x10, 0xf1, 0xe7, 0xe4, 0xd1, 0x3b, 0x59, 0x15, 0x50, 0x0f, 0xdd, 0x1f, 0xa3, 0x20,
            0x71, 0xc4, 0xc7, 0xd1, 0xf4, 0xc7, 0x33, 0xc0, 0x68, 0x03, 0x04, 0x22, 0xaa, 0x9a,
            0xc3, 0xd4, 0x6c, 0x4e, 0xd2, 0x82, 0x64, 0x46, 0x07, 0x9f, 0xaa, 0x09, 0x14, 0xc2,
            0xd7, 0x05, 0xd9, 0x8b, 0x02, 0xa2, 0xb5, 0x12, 0x9c, 0xd1, 0xde, 0x16, 0x4e, 0xb9,
            0xcb, 0xd0, 0x83, 0xe8, 0xa2, 0x50, 0x3c, 0x4e,
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn csprng_is_deterministic_per_seed_and_erases_its_key() {
        let mut a = ChaCha20Rng::from_seed([7; 32]);
        let mut b = ChaCha20Rng::from_seed([7; 32]);
        let mut c = ChaCha20Rng::from_seed([8; 32]);
        let (mut x, mut y, mut z) = ([0u8; 100], [0u8; 100], [0u8; 100]);
        a.fill_bytes(&mut x);
        b.fill_bytes(&mut y);
        c.fill_bytes(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
        // The next output differs from the first (the key moved on).
        let mut x2 = [0u8; 100];
        a.fill_bytes(&mut x2);
        assert_ne!(x, x2);
        // Reseeding changes the stream.
        b.reseed([1; 32]);
        b.fill_bytes(&mut y);
        assert_ne!(x2, y);
        assert_eq!(format!("{a:?}"), "ChaCha20Rng { .. }");
    }

    #[test]
    fn fills_guest_buffers() {
        let mut dev = Rng::new();
        let (mut mem, _, mut drv) = bring_up(&mut dev);
        let h = drv[0]
            .add(&mut mem, &[(0x1000, 300, true), (0x2000, 700, true)])
            .unwrap();
        let mut src = ChaCha20Rng::from_seed([3; 32]);
        assert_eq!(dev.service(&mut mem, &mut src).unwrap(), 1000);
        assert_eq!(drv[0].take_used(&mem), Some((h, 1000)));
        let a = &mem.as_slice()[0x1000..0x1000 + 300];
        let b = &mem.as_slice()[0x2000..0x2000 + 700];
        // Non-constant, and not the same bytes twice.
        assert!(a.iter().any(|&x| x != a[0]));
        assert_ne!(&a[..64], &b[..64]);
        assert_eq!(dev.bytes_given(), 1000);
    }

    #[test]
    fn large_requests_are_capped_and_failures_stop_early() {
        let mut dev = Rng::new();
        let (mut mem, _, mut drv) = bring_up(&mut dev);
        let h = drv[0].add(&mut mem, &[(0, 0x10_0000, true)]).unwrap();
        let mut src = ChaCha20Rng::from_seed([3; 32]);
        dev.service(&mut mem, &mut src).unwrap();
        assert_eq!(drv[0].take_used(&mem), Some((h, MAX_REQUEST)));

        struct Broken(usize);
        impl EntropySource for Broken {
            fn fill(&mut self, _: &mut [u8]) -> bool {
                self.0 += 1;
                self.0 < 3
            }
        }
        let h1 = drv[0].add(&mut mem, &[(0x1000, 4096, true)]).unwrap();
        drv[0].add(&mut mem, &[(0x3000, 16, true)]).unwrap();
        assert_eq!(dev.service(&mut mem, &mut Broken(0)).unwrap(), 512);
        assert_eq!(drv[0].take_used(&mem), Some((h1, 512)));
        // The second request waits for a working source.
        assert_eq!(drv[0].take_used(&mem), None);
        assert_eq!(dev.failures(), 1);
        assert_eq!(dev.service(&mut mem, &mut src).unwrap(), 16);
    }
}
