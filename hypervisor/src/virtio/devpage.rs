//! The lguest bus device page (E2–E4) and what a `NOTIFY` means.
//!
//! [`DevicePage`] lays out, for a list of devices, the page at
//! guest-physical `ram_pages << 12` (records `{type, num_vq, feature_len,
//! config_len, status}` + `lguest_vqconfig`s + host features + guest
//! features + config, a zero `type` ending the list) and the rings after it
//! (each `vring_pages(num)` pages, in order, one irq per queue from 1). The
//! device page plus all rings stay within `DEVICE_PAGES` pages and the irqs
//! below `LGUEST_IRQS`; `end_pfn()` is the `pfnlimit` to pass to
//! `INITIALIZE`.
//!
//! A guest `NOTIFY(addr)` is decoded by [`DevicePage::decode_notify`]:
//! the address of a device's record is a status change (read the byte once
//! with [`DevicePage::status_changed`]), `pfn << 12` of a ring is a kick,
//! anything else is [`Notify::Other`] (lguest: the early console string if
//! it lies inside guest memory).
//!
//! Status rules (lguest's `update_device_status`, made strict):
//!
//! | status byte | event |
//! |---|---|
//! | 0 | [`StatusEvent::Reset`]: zero rings and accepted features ([`DevicePage::reset`]), reset the model |
//! | FAILED set | [`StatusEvent::Failed`]: reset as well (lguest warns) |
//! | DRIVER_OK, device not running | [`StatusEvent::Start`]: activate the model |
//! | no DRIVER_OK, not running | [`StatusEvent::Progress`]: nothing to do |
//! | DRIVER_OK again while running | [`StatusEvent::Progress`] |
//! | unknown bits, DRIVER_OK without ACKNOWLEDGE and DRIVER, DRIVER_OK cleared while running (not via 0) | [`DeviceError::BadStatus`]: kill the guest |
//!
//! A kick of a device that is not running starts it (E4 did the same for
//! drivers that kick before `DRIVER_OK`): see [`DevicePage::kick_starts`].

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use guest_abi::device::{
    DEVICE_PAGES, LguestDeviceDesc, LguestVqconfig, VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, vring_pages,
};
use guest_abi::irq::LGUEST_IRQS;

use super::queue::VirtQueue;
use super::{DeviceError, VirtioDevice};
use crate::lguest::guestmem::{GuestMemory, MemFault};

/// Bytes of feature bits per direction in every record (the guest sees the
/// first 32 bits).
pub const FEATURE_LEN: u8 = 4;

const PAGE: u32 = 4096;

/// Why a device could not be added to the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// The records no longer fit in one page (one byte stays for the end).
    PageFull,
    /// The rings would exceed `DEVICE_PAGES` pages.
    TooManyPages,
    /// More queues on the bus than irqs (`1..LGUEST_IRQS`).
    OutOfIrqs,
    /// More than 255 queues or config bytes in one device.
    TooBig,
    /// A ring size is 0, not a power of two, or too large.
    BadQueueSize(u16),
    /// The page or rings would lie above 4 GiB.
    AddressOverflow,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PageFull => f.write_str("device page full"),
            Self::TooManyPages => write!(f, "more than {DEVICE_PAGES} device pages"),
            Self::OutOfIrqs => write!(f, "more than {} virtqueues", LGUEST_IRQS - 1),
            Self::TooBig => f.write_str("device record too big"),
            Self::BadQueueSize(n) => write!(f, "bad virtqueue size {n}"),
            Self::AddressOverflow => f.write_str("device pages above 4 GiB"),
        }
    }
}

/// What a `NOTIFY(addr)` refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// The address of device `k`'s record: its status byte changed.
    Status(usize),
    /// The address of a ring: a kick of `queue` of `device`.
    Kick {
        /// Device index on the bus.
        device: usize,
        /// Queue index within the device.
        queue: usize,
    },
    /// Anything else (lguest: an early console string if inside memory).
    Other(u32),
}

/// The meaning of a status change ([`DevicePage::status_changed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusEvent {
    /// Status 0: reset the device ([`DevicePage::reset`] and the model's
    /// `reset`).
    Reset,
    /// FAILED: the driver gave up; reset the device as well.
    Failed,
    /// DRIVER_OK on a stopped device: activate the model with
    /// [`DevicePage::queues`] and [`DevicePage::guest_features`].
    Start,
    /// Any other valid step (ACKNOWLEDGE, DRIVER, FEATURES_OK, a repeated
    /// DRIVER_OK); carries the status byte.
    Progress(u8),
}

#[derive(Debug, Clone)]
struct Entry {
    /// Offset of the record in the page.
    offset: u32,
    desc: LguestDeviceDesc,
    vqs: Vec<LguestVqconfig>,
    features: u32,
    config: Vec<u8>,
    running: bool,
}

/// The device page and ring layout of one guest, plus each device's
/// running state.
#[derive(Debug, Clone)]
pub struct DevicePage {
    /// Guest-physical address of the page (`ram_pages << 12`).
    base: u32,
    entries: Vec<Entry>,
    /// Bytes of records so far.
    used: u32,
    /// Next free page frame for a ring.
    next_pfn: u32,
    /// Next irq to hand out.
    next_irq: u16,
}

impl DevicePage {
    /// An empty bus for a guest with `ram_pages` pages of RAM: the page sits
    /// at `ram_pages << 12`, rings follow it.
    pub fn new(ram_pages: u32) -> Result<Self, LayoutError> {
        let base = ram_pages
            .checked_mul(PAGE)
            .filter(|b| b.checked_add(PAGE).is_some())
            .ok_or(LayoutError::AddressOverflow)?;
        Ok(Self {
            base,
            entries: Vec::new(),
            used: 0,
            next_pfn: ram_pages
                .checked_add(1)
                .ok_or(LayoutError::AddressOverflow)?,
            next_irq: 1,
        })
    }

    /// Add a device: a record for it and a ring (and irq) per queue.
    /// Returns its index on the bus (the `k` of [`Notify`]).
    pub fn add(&mut self, dev: &dyn VirtioDevice) -> Result<usize, LayoutError> {
        let sizes = dev.queue_sizes();
        let config = dev.config();
        let num_vq = u8::try_from(sizes.len()).map_err(|_| LayoutError::TooBig)?;
        let config_len = u8::try_from(config.len()).map_err(|_| LayoutError::TooBig)?;
        let desc = LguestDeviceDesc {
            type_: dev.device_type(),
            num_vq,
            feature_len: FEATURE_LEN,
            config_len,
            status: 0,
        };
        let end = self
            .used
            .checked_add(desc.record_len())
            .ok_or(LayoutError::PageFull)?;
        // One byte stays free for the terminating zero type.
        if end >= PAGE {
            return Err(LayoutError::PageFull);
        }
        let first_page = self.base / PAGE;
        let mut pfn = self.next_pfn;
        let mut irq = self.next_irq;
        let mut vqs = Vec::with_capacity(sizes.len());
        for &num in sizes {
            if num == 0 || !num.is_power_of_two() || num > super::queue::MAX_QUEUE_NUM {
                return Err(LayoutError::BadQueueSize(num));
            }
            if u32::from(irq) >= LGUEST_IRQS {
                return Err(LayoutError::OutOfIrqs);
            }
            let next = pfn
                .checked_add(vring_pages(u32::from(num)))
                .ok_or(LayoutError::AddressOverflow)?;
            if next.checked_mul(PAGE).is_none() {
                return Err(LayoutError::AddressOverflow);
            }
            if next.saturating_sub(first_page) > DEVICE_PAGES {
                return Err(LayoutError::TooManyPages);
            }
            vqs.push(LguestVqconfig { num, irq, pfn });
            pfn = next;
            // `irq < LGUEST_IRQS` was checked just above.
            irq = irq.saturating_add(1);
        }
        self.entries.push(Entry {
            offset: self.used,
            desc,
            vqs,
            features: dev.host_features(),
            config,
            running: false,
        });
        self.used = end;
        self.next_pfn = pfn;
        self.next_irq = irq;
        Ok(self.entries.len().saturating_sub(1))
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no devices.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Guest-physical address of the device page.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// One past the last page used by the bus: `pfnlimit` for `INITIALIZE`
    /// (RAM plus device page plus rings).
    pub fn end_pfn(&self) -> u32 {
        self.next_pfn
    }

    /// Guest-physical address of device `k`'s record (its status `NOTIFY`
    /// address).
    pub fn device_addr(&self, k: usize) -> Option<u32> {
        // `offset < PAGE` and `base + PAGE` fits (checked in `new`).
        self.entries
            .get(k)
            .map(|e| self.base.wrapping_add(e.offset))
    }

    /// The `lguest_vqconfig` of queue `q` of device `k`.
    pub fn queue_config(&self, k: usize, q: usize) -> Option<LguestVqconfig> {
        self.entries.get(k)?.vqs.get(q).copied()
    }

    /// The bytes of the device page as the host writes it.
    pub fn page_bytes(&self) -> Vec<u8> {
        let mut page = vec![0u8; PAGE as usize];
        for e in &self.entries {
            let mut rec: Vec<u8> = Vec::with_capacity(e.desc.record_len() as usize);
            rec.extend_from_slice(&e.desc.to_bytes());
            for v in &e.vqs {
                rec.extend_from_slice(&v.to_bytes());
            }
            rec.extend_from_slice(&e.features.to_le_bytes());
            rec.extend_from_slice(&[0u8; FEATURE_LEN as usize]);
            rec.extend_from_slice(&e.config);
            let start = e.offset as usize;
            if let Some(dst) = page.get_mut(start..start.saturating_add(rec.len())) {
                dst.copy_from_slice(&rec);
            }
        }
        page
    }

    /// Write the device page and zero every ring (before the guest starts).
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &mut M) -> Result<(), MemFault> {
        mem.write(self.base, &self.page_bytes())?;
        for e in &self.entries {
            for v in &e.vqs {
                zero_ring(mem, v)?;
            }
        }
        Ok(())
    }

    /// What `NOTIFY(addr)` refers to.
    pub fn decode_notify(&self, addr: u32) -> Notify {
        for (k, e) in self.entries.iter().enumerate() {
            if self.base.checked_add(e.offset) == Some(addr) {
                return Notify::Status(k);
            }
            for (q, v) in e.vqs.iter().enumerate() {
                if v.pfn.checked_mul(PAGE) == Some(addr) {
                    return Notify::Kick {
                        device: k,
                        queue: q,
                    };
                }
            }
        }
        Notify::Other(addr)
    }

    /// Read device `k`'s status byte (once) after a status `NOTIFY` and
    /// decide what it means (table in the module docs). Updates the
    /// device's running state.
    pub fn status_changed<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        k: usize,
    ) -> Result<StatusEvent, DeviceError> {
        let addr = self.device_addr(k).ok_or(DeviceError::NoSuchDevice(k))?;
        // `addr + 4` is inside the page (the record is at least 5 bytes).
        let status = mem.read_u8(addr.wrapping_add(4))?;
        let e = self
            .entries
            .get_mut(k)
            .ok_or(DeviceError::NoSuchDevice(k))?;
        let bad = |why| DeviceError::BadStatus {
            device: k,
            status,
            why,
        };
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_NEEDS_RESET
            | VIRTIO_CONFIG_S_FAILED;
        if status & !known != 0 {
            return Err(bad("unknown status bits"));
        }
        if status == 0 {
            e.running = false;
            return Ok(StatusEvent::Reset);
        }
        if status & VIRTIO_CONFIG_S_FAILED != 0 {
            e.running = false;
            return Ok(StatusEvent::Failed);
        }
        let driver_ok = status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        if driver_ok {
            let need = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
            if status & need != need {
                return Err(bad("DRIVER_OK without ACKNOWLEDGE and DRIVER"));
            }
            if !e.running {
                e.running = true;
                return Ok(StatusEvent::Start);
            }
        } else if e.running {
            return Err(bad("DRIVER_OK cleared without a reset"));
        }
        Ok(StatusEvent::Progress(status))
    }

    /// A kick of device `k`: `true` if the device was not running and the
    /// kick starts it (activate the model first, as for
    /// [`StatusEvent::Start`]); `false` if it already runs (or `k` does not
    /// exist).
    pub fn kick_starts(&mut self, k: usize) -> bool {
        match self.entries.get_mut(k) {
            Some(e) if !e.running => {
                e.running = true;
                true
            }
            _ => false,
        }
    }

    /// Whether device `k` has been started and not reset since.
    pub fn is_running(&self, k: usize) -> bool {
        self.entries.get(k).is_some_and(|e| e.running)
    }

    /// Reset device `k` on the bus: zero its rings and the accepted feature
    /// bits (lguest's `reset_device`); it is no longer running. The status
    /// byte is left as the guest wrote it.
    pub fn reset<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        k: usize,
    ) -> Result<(), DeviceError> {
        let addr = self.device_addr(k).ok_or(DeviceError::NoSuchDevice(k))?;
        let e = self
            .entries
            .get_mut(k)
            .ok_or(DeviceError::NoSuchDevice(k))?;
        e.running = false;
        for v in &e.vqs {
            zero_ring(mem, v)?;
        }
        // Inside the page: the record fits (checked in `add`).
        let gf = addr.wrapping_add(e.desc.guest_features_offset());
        mem.zero(gf, u32::from(e.desc.feature_len))?;
        Ok(())
    }

    /// The features the guest accepted for device `k`: the first 32 bits of
    /// its guest-feature bytes, masked with what the host offered.
    pub fn guest_features<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        k: usize,
    ) -> Result<u32, DeviceError> {
        let addr = self.device_addr(k).ok_or(DeviceError::NoSuchDevice(k))?;
        let e = self.entries.get(k).ok_or(DeviceError::NoSuchDevice(k))?;
        let v = mem.read_u32(addr.wrapping_add(e.desc.guest_features_offset()))?;
        Ok(v & e.features)
    }

    /// Host-side queues for device `k` (checked against guest memory
    /// `[0, mem_limit)`), ready for [`VirtioDevice::activate`].
    pub fn queues(&self, k: usize, mem_limit: u32) -> Result<Vec<VirtQueue>, DeviceError> {
        let e = self.entries.get(k).ok_or(DeviceError::NoSuchDevice(k))?;
        let mut qs = Vec::with_capacity(e.vqs.len());
        for v in &e.vqs {
            qs.push(VirtQueue::new(*v, mem_limit)?);
        }
        Ok(qs)
    }
}

fn zero_ring<M: GuestMemory + ?Sized>(mem: &mut M, v: &LguestVqconfig) -> Result<(), MemFault> {
    let len =
        guest_abi::device::vring_size(u32::from(v.num), guest_abi::device::LGUEST_VRING_ALIGN);
    mem.zero(v.pfn.saturating_mul(PAGE), len)
}
