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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use crate::virtio::testdriver::{Driver, bring_up};

    const SECTORS: usize = 64;

    fn disk() -> Vec<u8> {
        (0..SECTORS * 512)
            .map(|i| (i * 7 + i / 512) as u8)
            .collect()
    }

    fn hdr(mem: &mut VecMemory, at: u32, kind: u32, sector: u64) {
        mem.write_u32(at, kind).unwrap();
        mem.write_u32(at + 4, 0).unwrap();
        mem.write_u64(at + 8, sector).unwrap();
    }

    /// Submit one request and serve it; returns (used len, status byte).
    fn run(
        dev: &mut Block<Vec<u8>>,
        mem: &mut VecMemory,
        drv: &mut Driver,
        bufs: &[(u32, u32, bool)],
        status_at: u32,
    ) -> (u32, u8) {
        mem.write_u8(status_at, 0xFF).unwrap();
        let h = drv.add(mem, bufs).unwrap();
        assert_eq!(dev.service(mem).unwrap(), 1);
        let (id, len) = drv.take_used(mem).unwrap();
        assert_eq!(id, h);
        (len, mem.read_u8(status_at).unwrap())
    }

    #[test]
    fn config_and_features() {
        let dev = Block::new(vec![0u8; 10 * 512 + 3], b"id");
        assert_eq!(dev.capacity(), 10);
        let c = dev.config();
        assert_eq!(c.len(), CONFIG_LEN);
        assert_eq!(c[..8], 10u64.to_le_bytes());
        assert_eq!(c[12..], SEG_MAX.to_le_bytes());
        assert_eq!(
            dev.host_features(),
            (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH)
        );
    }

    #[test]
    fn read_write_read_back() {
        let mut dev = Block::new(disk(), b"disk");
        let (mut mem, _, mut drv) = bring_up(&mut dev);
        let d = &mut drv[0];
        // Read sectors 3..5 into two segments.
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_IN, 3);
        let (len, st) = run(
            &mut dev,
            &mut mem,
            d,
            &[
                (0x1000, 16, false),
                (0x2000, 512, true),
                (0x3000, 512, true),
                (0x4000, 1, true),
            ],
            0x4000,
        );
        assert_eq!((len, st), (1025, VIRTIO_BLK_S_OK));
        assert_eq!(mem.as_slice()[0x2000..0x2200], disk()[3 * 512..4 * 512]);
        assert_eq!(mem.as_slice()[0x3000..0x3200], disk()[4 * 512..5 * 512]);
        // Write sector 10 from a header+data segment pair.
        mem.as_mut_slice()[0x5000..0x5200].fill(0x5A);
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_OUT, 10);
        let (len, st) = run(
            &mut dev,
            &mut mem,
            d,
            &[(0x1000, 16, false), (0x5000, 512, false), (0x4000, 1, true)],
            0x4000,
        );
        assert_eq!((len, st), (1, VIRTIO_BLK_S_OK));
        assert!(dev.store()[10 * 512..11 * 512].iter().all(|&b| b == 0x5A));
        assert_eq!(dev.store()[..10 * 512], disk()[..10 * 512]);
        assert_eq!(dev.store()[11 * 512..], disk()[11 * 512..]);
        // Read it back.
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_IN, 10);
        let (_, st) = run(
            &mut dev,
            &mut mem,
            d,
            &[(0x1000, 16, false), (0x6000, 513, true)],
            0x6200,
        );
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(mem.as_slice()[0x6000..0x6200].iter().all(|&b| b == 0x5A));
        let s = dev.stats();
        assert_eq!(
            (s.reads, s.bytes_read, s.writes, s.bytes_written),
            (2, 1536, 1, 512)
        );
    }

    #[test]
    fn beyond_the_end_is_an_io_error() {
        let mut dev = Block::new(disk(), b"disk");
        let (mut mem, _, mut drv) = bring_up(&mut dev);
        let d = &mut drv[0];
        let last = SECTORS as u64 - 1;
        for (kind, sector, writable) in [
            (VIRTIO_BLK_T_OUT, last, false), // 2 sectors from the last one
            (VIRTIO_BLK_T_IN, last, true),
            (VIRTIO_BLK_T_OUT, SECTORS as u64, false),
            (VIRTIO_BLK_T_IN, u64::MAX, true),
            (VIRTIO_BLK_T_OUT, u64::MAX / 512, false),
        ] {
            hdr(&mut mem, 0x1000, kind, sector);
            let (len, st) = run(
                &mut dev,
                &mut mem,
                d,
                &[
                    (0x1000, 16, false),
                    (0x2000, 1024, writable),
                    (0x4000, 1, true),
                ],
                0x4000,
            );
            assert_eq!((len, st), (1, VIRTIO_BLK_S_IOERR), "{kind} {sector}");
        }
        assert_eq!(dev.store(), &disk());
        assert_eq!(dev.stats().errors, 5);
        assert_eq!(dev.stats().writes, 0);
        // The very last sector is fine.
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_OUT, last);
        let (_, st) = run(
            &mut dev,
            &mut mem,
            d,
            &[(0x1000, 16, false), (0x2000, 512, false), (0x4000, 1, true)],
            0x4000,
        );
        assert_eq!(st, VIRTIO_BLK_S_OK);
        // Not a whole number of sectors.
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (_, st) = run(
            &mut dev,
            &mut mem,
            d,
            &[(0x1000, 16, false), (0x2000, 100, true), (0x4000, 1, true)],
            0x4000,
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        let mut dev = Block::new(disk(), b"rustyvisor-disk-0123456789");
        let (mut mem, _, mut drv) = bring_up(&mut dev);
        let d = &mut drv[0];
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let r = run(
            &mut dev,
            &mut mem,
            d,
            &[(0x1000, 16, false), (0x4000, 1, true)],
            0x4000,
        );
        assert_eq!(r, (1, VIRTIO_BLK_S_OK));
        assert_eq!(dev.stats().flushes, 1);
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let r = run(
            &mut dev,
            &mut mem,
            d,
            &[(0x1000, 16, false), (0x2000, 20, true), (0x4000, 1, true)],
            0x4000,
        );
        assert_eq!(r, (21, VIRTIO_BLK_S_OK));
        assert_eq!(&mem.as_slice()[0x2000..0x2014], b"rustyvisor-disk-0123");
        for kind in [2, 3, 11, u32::MAX] {
            hdr(&mut mem, 0x1000, kind, 0);
            let r = run(
                &mut dev,
                &mut mem,
                d,
                &[(0x1000, 16, false), (0x4000, 1, true)],
                0x4000,
            );
            assert_eq!(r, (1, VIRTIO_BLK_S_UNSUPP));
        }
        assert_eq!(dev.stats().unsupported, 4);
    }

    #[test]
    fn malformed_requests_are_fatal() {
        let mut dev = Block::new(disk(), b"disk");
        let (mut mem, _, mut drv) = bring_up(&mut dev);
        drv[0]
            .add(&mut mem, &[(0x1000, 12, false), (0x4000, 1, true)])
            .unwrap();
        assert!(matches!(
            dev.service(&mut mem),
            Err(DeviceError::BadRequest(_))
        ));
        drv[0].add(&mut mem, &[(0x1000, 16, false)]).unwrap();
        let e = dev.service(&mut mem).unwrap_err();
        assert_eq!(
            alloc::string::ToString::to_string(&e),
            "bad device request: block request without a status byte"
        );
    }

    #[test]
    fn seg_max_data_segments_fit() {
        // Header + SEG_MAX data segments + status = 128 descriptors = num.
        let big: Vec<u8> = (0..128 * 512).map(|i| (i % 251) as u8).collect();
        let mut dev = Block::new(big.clone(), b"disk");
        let (mut mem, _, mut drv) = bring_up(&mut dev);
        hdr(&mut mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let mut bufs = vec![(0x1000, 16, false)];
        for i in 0..SEG_MAX {
            bufs.push((0x10000 + i * 512, 512, true));
        }
        bufs.push((0x4000, 1, true));
        let (len, st) = run(&mut dev, &mut mem, &mut drv[0], &bufs, 0x4000);
        assert_eq!((len, st), (SEG_MAX * 512 + 1, VIRTIO_BLK_S_OK));
        assert_eq!(
            mem.as_slice()[0x10000..0x10000 + SEG_MAX as usize * 512],
            big[..SEG_MAX as usize * 512]
        );
    }
}
