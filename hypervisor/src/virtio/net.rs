//! The virtio network device (id 1): queue 0 receives (frames to the
//! guest), queue 1 transmits (frames from the guest). Offers only
//! `VIRTIO_NET_F_MAC` (the 6-byte MAC is the config), so every frame is
//! preceded by the 10-byte legacy `struct virtio_net_hdr` and no offloads
//! are negotiated: frames are plain Ethernet, 14 to [`MAX_FRAME`] bytes.
//!
//! The device does not forward anything itself: [`Net::pop_tx`] takes the
//! guest's next frame out, [`Net::deliver`] puts a frame into the guest's
//! next receive buffer, and [`super::switch::Switch`] connects devices of
//! different guests. A transmitted frame of a bad size is dropped (counted)
//! and its buffer returned; a received frame too big for the guest's buffer
//! is dropped and the buffer returned with length 0 (the Linux driver counts
//! a length error and reposts it).

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::vec::Vec;

use guest_abi::device::{VIRTIO_ID_NET, VIRTIO_NET_F_MAC, VIRTIO_NET_HDR_SIZE, VIRTQUEUE_NUM};

use super::queue::{Chain, VirtQueue};
use super::{DeviceError, VirtioDevice, expect_queues};
use crate::lguest::guestmem::GuestMemory;

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Largest frame: 1500-byte MTU + Ethernet header + one VLAN tag.
pub const MAX_FRAME: usize = 1518;

const SIZES: [u16; 2] = [VIRTQUEUE_NUM, VIRTQUEUE_NUM];

/// A MAC address.
pub type Mac = [u8; 6];

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames taken from the guest.
    pub tx_frames: u64,
    /// Their bytes (without the virtio header).
    pub tx_bytes: u64,
    /// Transmitted frames dropped for their size.
    pub tx_dropped: u64,
    /// Frames put into the guest's buffers.
    pub rx_frames: u64,
    /// Their bytes (without the virtio header).
    pub rx_bytes: u64,
    /// Frames dropped because the guest's buffer was too small.
    pub rx_dropped: u64,
}

/// What [`Net::deliver`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's receive buffer.
    Delivered,
    /// The guest has no receive buffer (or the device is not active): keep
    /// the frame and retry after its next kick.
    NoBuffer,
    /// Dropped: too big for the buffer (the buffer was returned empty).
    Dropped,
}

/// The network device model.
#[derive(Debug, Clone)]
pub struct Net {
    mac: Mac,
    queues: Vec<VirtQueue>,
    tx_chain: Chain,
    rx_chain: Chain,
    stats: NetStats,
}

impl Net {
    /// A device with `mac` (a unicast, locally administered address such as
    /// `52:54:00:…` is the usual choice).
    pub fn new(mac: Mac) -> Self {
        Self {
            mac,
            queues: Vec::new(),
            tx_chain: Chain::new(),
            rx_chain: Chain::new(),
            stats: NetStats::default(),
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Take the guest's next transmitted frame into `frame` (its allocation
    /// is reused); `Ok(false)` when there is none. Frames of a bad size are
    /// dropped on the way (counted).
    pub fn pop_tx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        frame: &mut Vec<u8>,
    ) -> Result<bool, DeviceError> {
        let Some(q) = self.queues.get_mut(TX) else {
            return Ok(false);
        };
        while q.pop_into(mem, &mut self.tx_chain)? {
            let len = self
                .tx_chain
                .readable_len()
                .saturating_sub(VIRTIO_NET_HDR_SIZE) as usize;
            let ok = self.tx_chain.readable_len() >= VIRTIO_NET_HDR_SIZE
                && (MIN_FRAME..=MAX_FRAME).contains(&len);
            if ok {
                frame.clear();
                frame.resize(len, 0);
                self.tx_chain.read_at(mem, VIRTIO_NET_HDR_SIZE, frame)?;
            }
            q.push_used(mem, self.tx_chain.head(), 0)?;
            if ok {
                self.stats.tx_frames = self.stats.tx_frames.saturating_add(1);
                self.stats.tx_bytes = self.stats.tx_bytes.saturating_add(len as u64);
                return Ok(true);
            }
            self.stats.tx_dropped = self.stats.tx_dropped.saturating_add(1);
        }
        Ok(false)
    }

    /// Whether the guest has a receive buffer waiting.
    pub fn rx_ready<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<bool, DeviceError> {
        match self.queues.get(RX) {
            Some(q) => Ok(q.has_avail(mem)?),
            None => Ok(false),
        }
    }

    /// Put `frame` (an Ethernet frame, no virtio header) into the guest's
    /// next receive buffer, preceded by a zero virtio header.
    pub fn deliver<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        frame: &[u8],
    ) -> Result<Delivery, DeviceError> {
        let Some(q) = self.queues.get_mut(RX) else {
            return Ok(Delivery::NoBuffer);
        };
        if !q.pop_into(mem, &mut self.rx_chain)? {
            return Ok(Delivery::NoBuffer);
        }
        let need = (VIRTIO_NET_HDR_SIZE as usize).saturating_add(frame.len());
        if (self.rx_chain.writable_len() as usize) < need {
            q.push_used(mem, self.rx_chain.head(), 0)?;
            self.stats.rx_dropped = self.stats.rx_dropped.saturating_add(1);
            return Ok(Delivery::Dropped);
        }
        self.rx_chain
            .write_at(mem, 0, &[0u8; VIRTIO_NET_HDR_SIZE as usize])?;
        self.rx_chain.write_at(mem, VIRTIO_NET_HDR_SIZE, frame)?;
        // `need <= writable_len: u32`.
        q.push_used(mem, self.rx_chain.head(), need as u32)?;
        self.stats.rx_frames = self.stats.rx_frames.saturating_add(1);
        self.stats.rx_bytes = self.stats.rx_bytes.saturating_add(frame.len() as u64);
        Ok(Delivery::Delivered)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u8 {
        VIRTIO_ID_NET
    }
    fn queue_sizes(&self) -> &[u16] {
        &SIZES
    }
    fn host_features(&self) -> u32 {
        1 << VIRTIO_NET_F_MAC
    }
    fn config(&self) -> Vec<u8> {
        self.mac.to_vec()
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
