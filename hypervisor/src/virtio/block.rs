//! The virtio block device (id 2) over a byte store owned by the
//! integrator (for the built-in launcher: the guest's RAM copy of a GRUB
//! module, so writes never reach the module itself).
//!
//! One queue of requests. A request is a chain of
//!
//! ```text
//! readable:  struct virtio_blk_outhdr { u32 type; u32 ioprio; u64 sector; }   (16 bytes)
//!            [data, for VIRTIO_BLK_T_OUT]
//! writable:  [data, for VIRTIO_BLK_T_IN / GET_ID]  u8 status
//! ```
//!
//! | type | action | status |
//! |---|---|---|
//! | `T_IN` (0) | copy `sector·512 ..` of the store into the writable data | `OK`, or `IOERR` past the end / length not a multiple of 512 |
//! | `T_OUT` (1) | copy the readable data into the store (counted) | same |
//! | `T_FLUSH` (4) | nothing to do (the store is RAM); counted | `OK` |
//! | `T_GET_ID` (8) | the 20-byte id string, cut to the buffer | `OK` |
//! | other | nothing | `UNSUPP` |
//!
//! A chain with a header shorter than 16 bytes or without a writable
//! status byte is malformed: a fatal [`DeviceError::BadRequest`] (lguest's
//! launcher dies on it too). Config: `capacity` (u64, in 512-byte sectors;
//! a trailing partial sector of the store is not visible), `size_max` (0,
//! not offered) and `seg_max` ([`SEG_MAX`], offered with
//! `VIRTIO_BLK_F_SEG_MAX`); `VIRTIO_BLK_F_FLUSH` is offered as well.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::vec::Vec;
use core::ops::Range;

use guest_abi::device::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_OUTHDR_SIZE,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_ID_BLOCK,
    VIRTQUEUE_NUM,
};

use super::queue::{Chain, VirtQueue};
use super::{DeviceError, VirtioDevice, expect_queues};
use crate::lguest::guestmem::GuestMemory;

/// Most data segments per request (`VIRTQUEUE_NUM - 2`: header and status
/// take the other two descriptors), as lguest's `seg_max`.
pub const SEG_MAX: u32 = VIRTQUEUE_NUM as u32 - 2;

/// Bytes of config: `capacity` u64, `size_max` u32, `seg_max` u32.
pub const CONFIG_LEN: usize = 16;

const SIZES: [u16; 1] = [VIRTQUEUE_NUM];

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// `T_IN` requests completed OK.
    pub reads: u64,
    /// Bytes read by them.
    pub bytes_read: u64,
    /// `T_OUT` requests completed OK (writes into the store).
    pub writes: u64,
    /// Bytes written by them.
    pub bytes_written: u64,
    /// `T_FLUSH` requests.
    pub flushes: u64,
    /// Requests answered `IOERR`.
    pub errors: u64,
    /// Requests answered `UNSUPP`.
    pub unsupported: u64,
}

/// The block device model over store `S` (e.g. `&'static mut [u8]` or a
/// `Vec<u8>`).
#[derive(Debug, Clone)]
pub struct Block<S> {
    store: S,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    queues: Vec<VirtQueue>,
    chain: Chain,
    stats: BlockStats,
}

impl<S: AsRef<[u8]> + AsMut<[u8]>> Block<S> {
    /// A device over `store` with the id string `id` (at most 20 bytes are
    /// used; shorter ids are NUL-padded).
    pub fn new(store: S, id: &[u8]) -> Self {
        let mut idb = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (d, s) in idb.iter_mut().zip(id) {
            *d = *s;
        }
        Self {
            store,
            id: idb,
            queues: Vec::new(),
            chain: Chain::new(),
            stats: BlockStats::default(),
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        capacity_of(self.store.as_ref())
    }

    /// Counters so far.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// The backing store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Give the backing store back.
    pub fn into_store(self) -> S {
        self.store
    }

    /// Serve every pending request. Returns how many were completed.
    pub fn service<M: GuestMemory + ?Sized>(&mut self, mem: &mut M) -> Result<u32, DeviceError> {
        let Some(q) = self.queues.get_mut(0) else {
            return Ok(0);
        };
        let mut n = 0u32;
        while q.pop_into(mem, &mut self.chain)? {
            let used = request(&mut self.store, &self.id, &mut self.stats, &self.chain, mem)?;
            q.push_used(mem, self.chain.head(), used)?;
            n = n.saturating_add(1);
        }
        Ok(n)
    }
}

/// Whole sectors in `store`.
fn capacity_of(store: &[u8]) -> u64 {
    (store.len() as u64)
        .checked_div(u64::from(VIRTIO_BLK_SECTOR_SIZE))
        .unwrap_or(0)
}

/// The store byte range of `len` bytes at `sector`, if whole sectors and
/// inside a store of `store_len` bytes.
fn byte_range(sector: u64, len: u32, capacity: u64) -> Option<Range<usize>> {
    if !len.is_multiple_of(VIRTIO_BLK_SECTOR_SIZE) {
        return None;
    }
    let sectors = u64::from(len / VIRTIO_BLK_SECTOR_SIZE);
    if sector.checked_add(sectors)? > capacity {
        return None;
    }
    let start = usize::try_from(sector.checked_mul(u64::from(VIRTIO_BLK_SECTOR_SIZE))?).ok()?;
    Some(start..start.checked_add(len as usize)?)
}

/// Serve one request; returns the used length (bytes written into the
/// chain, status byte included).
fn request<S, M>(
    store: &mut S,
    id: &[u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: &mut BlockStats,
    chain: &Chain,
    mem: &mut M,
) -> Result<u32, DeviceError>
where
    S: AsRef<[u8]> + AsMut<[u8]>,
    M: GuestMemory + ?Sized,
{
    if chain.readable_len() < VIRTIO_BLK_OUTHDR_SIZE {
        return Err(DeviceError::BadRequest(
            "block request header shorter than 16 bytes",
        ));
    }
    let Some(status_at) = chain.writable_len().checked_sub(1) else {
        return Err(DeviceError::BadRequest(
            "block request without a status byte",
        ));
    };
    // The one read of the header.
    let mut hdr = [0u8; VIRTIO_BLK_OUTHDR_SIZE as usize];
    chain.read_at(mem, 0, &mut hdr)?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = hdr;
    let kind = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let capacity = capacity_of(store.as_ref());

    let (status, data_written) = match kind {
        VIRTIO_BLK_T_IN => {
            // Everything writable but the status byte is data.
            let len = status_at;
            match byte_range(sector, len, capacity).and_then(|r| store.as_ref().get(r)) {
                Some(src) => {
                    chain.write_at(mem, 0, src)?;
                    stats.reads = stats.reads.saturating_add(1);
                    stats.bytes_read = stats.bytes_read.saturating_add(u64::from(len));
                    (VIRTIO_BLK_S_OK, len)
                }
                None => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_OUT => {
            // Everything readable after the header is data.
            let len = chain.readable_len().saturating_sub(VIRTIO_BLK_OUTHDR_SIZE);
            match byte_range(sector, len, capacity).and_then(|r| store.as_mut().get_mut(r)) {
                Some(dst) => {
                    chain.read_at(mem, VIRTIO_BLK_OUTHDR_SIZE, dst)?;
                    stats.writes = stats.writes.saturating_add(1);
                    stats.bytes_written = stats.bytes_written.saturating_add(u64::from(len));
                    (VIRTIO_BLK_S_OK, 0)
                }
                None => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            stats.flushes = stats.flushes.saturating_add(1);
            (VIRTIO_BLK_S_OK, 0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = (status_at as usize).min(id.len());
            let put = chain.write_at(mem, 0, id.get(..n).unwrap_or_default())?;
            // `put <= 20`.
            (VIRTIO_BLK_S_OK, put as u32)
        }
        _ => {
            stats.unsupported = stats.unsupported.saturating_add(1);
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    };
    if status == VIRTIO_BLK_S_IOERR {
        stats.errors = stats.errors.saturating_add(1);
    }
    chain.write_at(mem, status_at, &[status])?;
    // `data_written <= status_at < u32::MAX`.
    Ok(data_written.saturating_add(1))
}

impl<S: AsRef<[u8]> + AsMut<[u8]>> VirtioDevice for Block<S> {
    fn device_type(&self) -> u8 {
        VIRTIO_ID_BLOCK
    }
    fn queue_sizes(&self) -> &[u16] {
        &SIZES
    }
    fn host_features(&self) -> u32 {
        (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH)
    }
    fn config(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(CONFIG_LEN);
        c.extend_from_slice(&self.capacity().to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&SEG_MAX.to_le_bytes());
        c
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
