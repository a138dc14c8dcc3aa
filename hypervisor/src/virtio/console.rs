//! The virtio console (id 3): queue 0 receives (host → guest input bytes),
//! queue 1 transmits (guest output → host). No features, no config.
//!
//! Output: [`Console::service_tx`] copies every readable byte of every
//! transmit chain to a sink, in chunks of at most [`CHUNK`] bytes, and
//! gives the chain back with length 0 (lguest's `console_output`). The
//! kernel's sink is the guest's `GuestConsole` (lines, caps, rate limit).
//!
//! Input: [`Console::push_input`] buffers bytes (bounded; what does not fit
//! is dropped and counted), [`Console::service_rx`] moves them into the
//! guest's receive buffers as they become available.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use guest_abi::device::{VIRTIO_ID_CONSOLE, VIRTQUEUE_NUM};

use super::queue::{Chain, VirtQueue};
use super::{DeviceError, VirtioDevice, expect_queues};
use crate::lguest::guestmem::GuestMemory;

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Largest piece of output handed to the sink at once.
pub const CHUNK: usize = 256;
/// Default bound of buffered input bytes.
pub const DEFAULT_INPUT_CAP: usize = 4096;

const SIZES: [u16; 2] = [VIRTQUEUE_NUM, VIRTQUEUE_NUM];

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Output bytes handed to the sink.
    pub out_bytes: u64,
    /// Input bytes delivered to the guest.
    pub in_bytes: u64,
    /// Input bytes dropped because the buffer was full.
    pub in_dropped: u64,
}

/// The console device model.
#[derive(Debug, Clone)]
pub struct Console {
    queues: Vec<VirtQueue>,
    input: VecDeque<u8>,
    input_cap: usize,
    chain: Chain,
    stats: ConsoleStats,
}

impl Default for Console {
    fn default() -> Self {
        Self::new(DEFAULT_INPUT_CAP)
    }
}

impl Console {
    /// A console buffering at most `input_cap` input bytes.
    pub fn new(input_cap: usize) -> Self {
        Self {
            queues: Vec::new(),
            input: VecDeque::new(),
            input_cap,
            chain: Chain::new(),
            stats: ConsoleStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ConsoleStats {
        self.stats
    }

    /// Buffer input for the guest; returns how many bytes were taken (the
    /// rest is dropped and counted). Call [`Self::service_rx`] afterwards.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.input_cap.saturating_sub(self.input.len());
        let n = room.min(bytes.len());
        self.input.extend(bytes.iter().take(n));
        let dropped = bytes.len().saturating_sub(n) as u64;
        self.stats.in_dropped = self.stats.in_dropped.saturating_add(dropped);
        n
    }

    /// Input bytes buffered and not yet delivered.
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    /// Move buffered input into the guest's receive buffers while both
    /// last. Returns the bytes delivered. Nothing happens before
    /// activation.
    pub fn service_rx<M: GuestMemory + ?Sized>(&mut self, mem: &mut M) -> Result<u32, DeviceError> {
        let Some(q) = self.queues.get_mut(RX) else {
            return Ok(0);
        };
        let mut total = 0u32;
        let mut buf = [0u8; CHUNK];
        while !self.input.is_empty() && q.pop_into(mem, &mut self.chain)? {
            let mut written = 0u32;
            // Fill the chain chunk by chunk.
            while written < self.chain.writable_len() && !self.input.is_empty() {
                let room = self.chain.writable_len().saturating_sub(written) as usize;
                let n = room.min(CHUNK).min(self.input.len());
                for (dst, src) in buf.iter_mut().zip(self.input.drain(..n)) {
                    *dst = src;
                }
                let put = self
                    .chain
                    .write_at(mem, written, buf.get(..n).unwrap_or_default())?;
                // `put <= n <= CHUNK`.
                written = written.saturating_add(put as u32);
                if put < n {
                    break;
                }
            }
            q.push_used(mem, self.chain.head(), written)?;
            total = total.saturating_add(written);
        }
        self.stats.in_bytes = self.stats.in_bytes.saturating_add(u64::from(total));
        Ok(total)
    }

    /// Hand every pending transmit chain's readable bytes to `sink` and give
    /// the chains back. Returns the bytes output.
    pub fn service_tx<M, F>(&mut self, mem: &mut M, mut sink: F) -> Result<u64, DeviceError>
    where
        M: GuestMemory + ?Sized,
        F: FnMut(&[u8]),
    {
        let Some(q) = self.queues.get_mut(TX) else {
            return Ok(0);
        };
        let mut total = 0u64;
        let mut buf = vec![0u8; CHUNK];
        while q.pop_into(mem, &mut self.chain)? {
            let mut off = 0u32;
            while off < self.chain.readable_len() {
                let n = self.chain.read_at(mem, off, &mut buf)?;
                if n == 0 {
                    break;
                }
                sink(buf.get(..n).unwrap_or_default());
                // `n <= CHUNK`.
                off = off.saturating_add(n as u32);
            }
            total = total.saturating_add(u64::from(off));
            q.push_used(mem, self.chain.head(), 0)?;
        }
        self.stats.out_bytes = self.stats.out_bytes.saturating_add(total);
        Ok(total)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u8 {
        VIRTIO_ID_CONSOLE
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testdriver::bring_up;
    use crate::virtio::{DeviceError, QueueError, interrupts};

    #[test]
    fn output_goes_to_the_sink() {
        let mut con = Console::default();
        let (mut mem, _, mut drv) = bring_up(&mut con);
        mem.write(0x1000, b"hello, ").unwrap();
        mem.write(0x2000, b"world\n").unwrap();
        let h = drv[TX]
            .add(&mut mem, &[(0x1000, 7, false), (0x2000, 6, false)])
            .unwrap();
        let mut out = Vec::new();
        assert_eq!(
            con.service_tx(&mut mem, |b| out.extend_from_slice(b))
                .unwrap(),
            13
        );
        assert_eq!(out, b"hello, world\n");
        assert_eq!(drv[TX].take_used(&mem), Some((h, 0)));
        // One irq for the transmit queue (irq 2), none for receive.
        assert_eq!(interrupts(&mut con, &mem).unwrap(), [2]);
        assert_eq!(con.stats().out_bytes, 13);
    }

    #[test]
    fn long_output_in_chunks() {
        let mut con = Console::default();
        let (mut mem, _, mut drv) = bring_up(&mut con);
        let text: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
        mem.write(0x1000, &text).unwrap();
        drv[TX].add(&mut mem, &[(0x1000, 3000, false)]).unwrap();
        let mut out = Vec::new();
        let mut calls = 0;
        con.service_tx(&mut mem, |b| {
            assert!(b.len() <= CHUNK);
            calls += 1;
            out.extend_from_slice(b);
        })
        .unwrap();
        assert_eq!(out, text);
        assert_eq!(calls, 3000usize.div_ceil(CHUNK));
    }

    #[test]
    fn input_is_buffered_until_the_guest_has_buffers() {
        let mut con = Console::new(8);
        let (mut mem, _, mut drv) = bring_up(&mut con);
        assert_eq!(con.push_input(b"abc"), 3);
        assert_eq!(con.service_rx(&mut mem).unwrap(), 0);
        assert_eq!(con.pending_input(), 3);
        // A 2-byte buffer takes "ab".
        let h = drv[RX].add(&mut mem, &[(0x3000, 2, true)]).unwrap();
        assert_eq!(con.service_rx(&mut mem).unwrap(), 2);
        assert_eq!(drv[RX].take_used(&mem), Some((h, 2)));
        assert_eq!(&mem.as_slice()[0x3000..0x3002], b"ab");
        // Two buffers queued, one byte left: only one buffer is used.
        let h = drv[RX]
            .add(&mut mem, &[(0x3100, 1, true), (0x3200, 16, true)])
            .unwrap();
        drv[RX].add(&mut mem, &[(0x3300, 16, true)]).unwrap();
        assert_eq!(con.service_rx(&mut mem).unwrap(), 1);
        assert_eq!(drv[RX].take_used(&mem), Some((h, 1)));
        assert_eq!(drv[RX].take_used(&mem), None);
        assert_eq!(mem.as_slice()[0x3100], b'c');
        // The input bound: the rest is dropped and counted.
        assert_eq!(con.push_input(b"0123456789"), 8);
        assert_eq!(con.stats().in_dropped, 2);
        assert_eq!(con.service_rx(&mut mem).unwrap(), 8);
        assert_eq!(&mem.as_slice()[0x3300..0x3308], b"01234567");
        assert_eq!(con.stats().in_bytes, 11);
    }

    #[test]
    fn inactive_and_reset() {
        let mut con = Console::default();
        con.push_input(b"x");
        let mut mem = crate::lguest::guestmem::VecMemory::new(0x1000);
        assert_eq!(con.service_rx(&mut mem).unwrap(), 0);
        assert_eq!(con.service_tx(&mut mem, |_| panic!()).unwrap(), 0);
        let (mut mem, _, mut drv) = bring_up(&mut con);
        con.reset();
        drv[TX].add(&mut mem, &[(0x1000, 1, false)]).unwrap();
        assert_eq!(con.service_tx(&mut mem, |_| panic!()).unwrap(), 0);
        assert!(con.queues_mut().is_empty());
    }

    #[test]
    fn hostile_chain_is_an_error_not_a_panic() {
        let mut con = Console::default();
        let (mut mem, _, mut drv) = bring_up(&mut con);
        let limit = mem.limit();
        drv[TX].add(&mut mem, &[(limit - 2, 4, false)]).unwrap();
        let e = con.service_tx(&mut mem, |_| ()).unwrap_err();
        assert!(matches!(
            e,
            DeviceError::Queue(QueueError::BadAddress { len: 4, .. })
        ));
    }
}
