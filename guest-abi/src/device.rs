//! The lguest bus device page (E2–E4).
//!
//! One page just above the top of guest RAM (the guest finds it at
//! `max_pfn << 12`) holds packed, byte-aligned device records back to back;
//! a record with `type_ == 0` terminates the list. Each record is:
//!
//! ```text
//! LguestDeviceDesc (5 B)
//! num_vq × LguestVqconfig (8 B each)
//! feature_len bytes: features offered by the host (little-endian bit array)
//! feature_len bytes: features accepted by the guest
//! config_len bytes: device-specific config
//! ```
//!
//! The guest writes the virtio status byte in place and then issues
//! `LHCALL_NOTIFY(address of its descriptor)`; a virtqueue kick is
//! `LHCALL_NOTIFY(pfn << 12)`.

/// A device record header (`struct lguest_device_desc`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LguestDeviceDesc {
    /// Virtio device id ([`VIRTIO_ID_NET`] …); 0 terminates the list.
    pub type_: u8,
    /// Number of [`LguestVqconfig`] entries that follow.
    pub num_vq: u8,
    /// Bytes of feature bits, each for host-offered and guest-accepted.
    pub feature_len: u8,
    /// Bytes of device config.
    pub config_len: u8,
    /// Virtio status byte, written by the guest.
    pub status: u8,
}

impl LguestDeviceDesc {
    /// Total size of the record this header starts, in bytes:
    /// `5 + 8 * num_vq + 2 * feature_len + config_len`.
    pub const fn record_len(&self) -> u32 {
        DEVICE_DESC_SIZE
            + VQCONFIG_SIZE * self.num_vq as u32
            + 2 * self.feature_len as u32
            + self.config_len as u32
    }

    /// Byte offset, from the start of the record, of the first vq config.
    pub const fn vqconfig_offset(&self, vq: u32) -> u32 {
        DEVICE_DESC_SIZE + VQCONFIG_SIZE * vq
    }

    /// Byte offset of the host-offered feature bits.
    pub const fn features_offset(&self) -> u32 {
        self.vqconfig_offset(self.num_vq as u32)
    }

    /// Byte offset of the guest-accepted feature bits.
    pub const fn guest_features_offset(&self) -> u32 {
        self.features_offset() + self.feature_len as u32
    }

    /// Byte offset of the device config.
    pub const fn config_offset(&self) -> u32 {
        self.guest_features_offset() + self.feature_len as u32
    }

    /// Parse a header from the first 5 bytes of `bytes`.
    pub const fn from_bytes(bytes: &[u8; 5]) -> Self {
        Self {
            type_: bytes[0],
            num_vq: bytes[1],
            feature_len: bytes[2],
            config_len: bytes[3],
            status: bytes[4],
        }
    }

    /// The 5 wire bytes.
    pub const fn to_bytes(&self) -> [u8; 5] {
        [
            self.type_,
            self.num_vq,
            self.feature_len,
            self.config_len,
            self.status,
        ]
    }
}

/// One virtqueue's configuration (`struct lguest_vqconfig`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LguestVqconfig {
    /// Number of ring entries.
    pub num: u16,
    /// The virtual irq the launcher raises for this queue.
    pub irq: u16,
    /// Guest page frame number of the ring (aligned to [`LGUEST_VRING_ALIGN`]).
    pub pfn: u32,
}

impl LguestVqconfig {
    /// Parse from 8 little-endian bytes.
    pub const fn from_bytes(b: &[u8; 8]) -> Self {
        Self {
            num: u16::from_le_bytes([b[0], b[1]]),
            irq: u16::from_le_bytes([b[2], b[3]]),
            pfn: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// The 8 little-endian wire bytes.
    pub const fn to_bytes(&self) -> [u8; 8] {
        let n = self.num.to_le_bytes();
        let i = self.irq.to_le_bytes();
        let p = self.pfn.to_le_bytes();
        [n[0], n[1], i[0], i[1], p[0], p[1], p[2], p[3]]
    }
}

/// Size of [`LguestDeviceDesc`].
pub const DEVICE_DESC_SIZE: u32 = 5;
/// Size of [`LguestVqconfig`].
pub const VQCONFIG_SIZE: u32 = 8;

/// Virtio device id: network card.
pub const VIRTIO_ID_NET: u8 = 1;
/// Virtio device id: block device.
pub const VIRTIO_ID_BLOCK: u8 = 2;
/// Virtio device id: console.
pub const VIRTIO_ID_CONSOLE: u8 = 3;
/// Virtio device id: entropy source.
pub const VIRTIO_ID_RNG: u8 = 4;

/// Virtio status bit: guest noticed the device.
pub const VIRTIO_CONFIG_S_ACKNOWLEDGE: u8 = 1;
/// Virtio status bit: guest has a driver.
pub const VIRTIO_CONFIG_S_DRIVER: u8 = 2;
/// Virtio status bit: driver is ready.
pub const VIRTIO_CONFIG_S_DRIVER_OK: u8 = 4;
/// Virtio status bit: feature negotiation complete.
pub const VIRTIO_CONFIG_S_FEATURES_OK: u8 = 8;
/// Virtio status bit: the driver gave up on the device.
pub const VIRTIO_CONFIG_S_FAILED: u8 = 0x80;

/// Alignment of the used ring inside a vring (and of the vring itself).
pub const LGUEST_VRING_ALIGN: u32 = 4096;
/// Maximum number of pages the launcher uses above guest RAM (device page +
/// vrings).
pub const DEVICE_PAGES: u32 = 256;
/// Ring size the launcher uses for each virtqueue.
pub const VIRTQUEUE_NUM: u16 = 128;

/// Bytes of a standard split vring with `num` entries and used-ring
/// alignment `align` (a power of two): descriptor table (16 B each), avail
/// ring (`2 * (3 + num)`), padding to `align`, used ring (`6 + 8 * num`).
pub const fn vring_size(num: u32, align: u32) -> u32 {
    let head = 16 * num + 2 * (3 + num);
    let head = (head + align - 1) & !(align - 1);
    head + 2 * 3 + 8 * num
}

/// Pages a vring of `num` entries occupies with [`LGUEST_VRING_ALIGN`].
pub const fn vring_pages(num: u32) -> u32 {
    vring_size(num, LGUEST_VRING_ALIGN).div_ceil(4096)
}

/// Virtio status bit: the device needs a reset (virtio 1.0; never set by
/// the lguest bus host, listed so a status byte carrying it is understood).
pub const VIRTIO_CONFIG_S_NEEDS_RESET: u8 = 0x40;

/// Size of one split-ring descriptor (`struct vring_desc`: `u64 addr`,
/// `u32 len`, `u16 flags`, `u16 next`).
pub const VRING_DESC_SIZE: u32 = 16;
/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (otherwise device-readable).
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds a table of indirect descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// `avail.flags` bit: the driver asks not to be interrupted on used buffers.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags` bit: the device asks not to be notified (kicked) of new
/// available buffers.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Feature bit: indirect descriptors (`VIRTIO_RING_F_INDIRECT_DESC`).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;

/// Block feature bit: `seg_max` in the config is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Block feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Block feature bit: the device understands `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Block request: read sectors into the writable buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Block request: write sectors from the readable buffers.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Block request: flush the write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Block request: read the device id string (20 bytes).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Block request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Block request status: I/O error (also: out of range, bad length).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Block request status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Size of the block request header (`u32 type`, `u32 ioprio`, `u64 sector`).
pub const VIRTIO_BLK_OUTHDR_SIZE: u32 = 16;
/// Block sector size in bytes (capacity and `sector` are in these units).
pub const VIRTIO_BLK_SECTOR_SIZE: u32 = 512;
/// Length of the `VIRTIO_BLK_T_GET_ID` answer.
pub const VIRTIO_BLK_ID_BYTES: u32 = 20;

/// Net feature bit: the device has a MAC address in its config.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Size of the legacy `struct virtio_net_hdr` that precedes every frame
/// when `VIRTIO_NET_F_MRG_RXBUF` is not negotiated.
pub const VIRTIO_NET_HDR_SIZE: u32 = 10;

const _: () = {
    assert!(core::mem::size_of::<LguestDeviceDesc>() == DEVICE_DESC_SIZE as usize);
    assert!(core::mem::align_of::<LguestDeviceDesc>() == 1);
    assert!(core::mem::offset_of!(LguestDeviceDesc, type_) == 0);
    assert!(core::mem::offset_of!(LguestDeviceDesc, num_vq) == 1);
    assert!(core::mem::offset_of!(LguestDeviceDesc, feature_len) == 2);
    assert!(core::mem::offset_of!(LguestDeviceDesc, config_len) == 3);
    assert!(core::mem::offset_of!(LguestDeviceDesc, status) == 4);
    assert!(core::mem::size_of::<LguestVqconfig>() == VQCONFIG_SIZE as usize);
    assert!(core::mem::offset_of!(LguestVqconfig, num) == 0);
    assert!(core::mem::offset_of!(LguestVqconfig, irq) == 2);
    assert!(core::mem::offset_of!(LguestVqconfig, pfn) == 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout() {
        let d = LguestDeviceDesc {
            type_: VIRTIO_ID_CONSOLE,
            num_vq: 2,
            feature_len: 4,
            config_len: 12,
            status: 0,
        };
        assert_eq!(d.record_len(), 5 + 16 + 8 + 12);
        assert_eq!(d.vqconfig_offset(0), 5);
        assert_eq!(d.vqconfig_offset(1), 13);
        assert_eq!(d.features_offset(), 21);
        assert_eq!(d.guest_features_offset(), 25);
        assert_eq!(d.config_offset(), 29);
        assert_eq!(d.config_offset() + 12, d.record_len());
        assert_eq!(LguestDeviceDesc::from_bytes(&d.to_bytes()), d);
    }

    #[test]
    fn vqconfig_bytes() {
        let v = LguestVqconfig {
            num: 128,
            irq: 3,
            pfn: 0x1_2345,
        };
        let b = v.to_bytes();
        assert_eq!(b, [128, 0, 3, 0, 0x45, 0x23, 0x01, 0x00]);
        assert_eq!(LguestVqconfig::from_bytes(&b), v);
    }

    #[test]
    fn vring_sizes() {
        // 128 entries: 2048 + 262 -> 4096, + 6 + 1024 = 5126 bytes, 2 pages.
        assert_eq!(vring_size(128, 4096), 5126);
        assert_eq!(vring_pages(u32::from(VIRTQUEUE_NUM)), 2);
        // 256 entries (E5): 3 pages.
        assert_eq!(vring_pages(256), 3);
    }

    #[test]
    fn ids() {
        assert_eq!(
            [
                VIRTIO_ID_NET,
                VIRTIO_ID_BLOCK,
                VIRTIO_ID_CONSOLE,
                VIRTIO_ID_RNG
            ],
            [1, 2, 3, 4]
        );
        assert_eq!(DEVICE_PAGES, 256);
        assert_eq!(LGUEST_VRING_ALIGN, 4096);
    }
}
