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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use crate::virtio::block::Block;
    use crate::virtio::console::Console;
    use crate::virtio::net::Net;
    use crate::virtio::rng::Rng;
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use guest_abi::device::{
        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE,
        VIRTIO_ID_NET, VIRTIO_ID_RNG, VIRTIO_NET_F_MAC,
    };

    const RAM: u32 = 256;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn all_devices() -> Vec<Box<dyn VirtioDevice>> {
        vec![
            Box::new(Console::default()),
            Box::new(Rng::new()),
            Box::new(Block::new(vec![0u8; 8 * 512 + 100], b"disk0")),
            Box::new(Net::new(MAC)),
        ]
    }

    fn bus() -> (DevicePage, VecMemory) {
        let mut page = DevicePage::new(RAM).unwrap();
        for (i, d) in all_devices().iter().enumerate() {
            assert_eq!(page.add(d.as_ref()).unwrap(), i);
        }
        let mut mem = VecMemory::new(page.end_pfn() * 4096);
        mem.as_mut_slice().fill(0xEE);
        page.write(&mut mem).unwrap();
        (page, mem)
    }

    /// Parse the page as the guest's `lguest_device.c` scan does.
    fn guest_scan(mem: &VecMemory) -> Vec<(LguestDeviceDesc, Vec<LguestVqconfig>, u32, Vec<u8>)> {
        let base = (RAM * 4096) as usize;
        let page = &mem.as_slice()[base..base + 4096];
        let mut out = Vec::new();
        let mut i = 0usize;
        while i < 4096 && page[i] != 0 {
            let d = LguestDeviceDesc::from_bytes(page[i..i + 5].try_into().unwrap());
            let vqs = (0..d.num_vq as u32)
                .map(|q| {
                    let o = i + d.vqconfig_offset(q) as usize;
                    LguestVqconfig::from_bytes(page[o..o + 8].try_into().unwrap())
                })
                .collect();
            let fo = i + d.features_offset() as usize;
            let feats = u32::from_le_bytes(page[fo..fo + 4].try_into().unwrap());
            let co = i + d.config_offset() as usize;
            let config = page[co..co + d.config_len as usize].to_vec();
            out.push((d, vqs, feats, config));
            i += d.record_len() as usize;
        }
        out
    }

    #[test]
    fn page_layout_as_the_guest_reads_it() {
        let (page, mem) = bus();
        let devs = guest_scan(&mem);
        let types: Vec<u8> = devs.iter().map(|d| d.0.type_).collect();
        assert_eq!(
            types,
            [
                VIRTIO_ID_CONSOLE,
                VIRTIO_ID_RNG,
                VIRTIO_ID_BLOCK,
                VIRTIO_ID_NET
            ]
        );
        // Rings follow the page, 2 pages each (128 entries), irqs from 1.
        let mut pfn = RAM + 1;
        let mut irq = 1;
        for (_, vqs, _, _) in &devs {
            for v in vqs {
                assert_eq!(*v, LguestVqconfig { num: 128, irq, pfn });
                pfn += 2;
                irq += 1;
            }
        }
        assert_eq!(page.end_pfn(), pfn);
        assert_eq!(page.end_pfn(), RAM + 1 + 6 * 2);
        // Features and config.
        assert_eq!(devs[0].2, 0);
        assert_eq!(
            devs[2].2,
            (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH)
        );
        assert_eq!(&devs[2].3[..8], &8u64.to_le_bytes());
        assert_eq!(&devs[2].3[12..16], &126u32.to_le_bytes());
        assert_eq!(devs[3].2, 1 << VIRTIO_NET_F_MAC);
        assert_eq!(devs[3].3, MAC);
        // Status bytes and guest features start at zero; rings are zeroed.
        assert!(devs.iter().all(|d| d.0.status == 0));
        for k in 0..4 {
            assert_eq!(page.guest_features(&mem, k).unwrap(), 0);
        }
        let ring0 = (RAM as usize + 1) * 4096;
        assert!(mem.as_slice()[ring0..ring0 + 5126].iter().all(|&b| b == 0));
        // The rest of the page is zero: the list is terminated.
        let end = page.base() as usize
            + devs
                .iter()
                .map(|d| d.0.record_len() as usize)
                .sum::<usize>();
        assert!(
            mem.as_slice()[end..RAM as usize * 4096 + 4096]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn notify_decoding() {
        let (page, _) = bus();
        let base = RAM * 4096;
        assert_eq!(page.decode_notify(base), Notify::Status(0));
        let rec0 = 5 + 2 * 8 + 8;
        assert_eq!(page.decode_notify(base + rec0), Notify::Status(1));
        assert_eq!(page.device_addr(1), Some(base + rec0));
        assert_eq!(
            page.decode_notify((RAM + 1) * 4096),
            Notify::Kick {
                device: 0,
                queue: 0
            }
        );
        assert_eq!(
            page.decode_notify((RAM + 3) * 4096),
            Notify::Kick {
                device: 0,
                queue: 1
            }
        );
        let net_tx = page.queue_config(3, 1).unwrap().pfn * 4096;
        assert_eq!(
            page.decode_notify(net_tx),
            Notify::Kick {
                device: 3,
                queue: 1
            }
        );
        // Inside a ring, inside a record, in RAM, far away: something else.
        for a in [
            (RAM + 1) * 4096 + 16,
            (RAM + 2) * 4096,
            base + 1,
            base + 4,
            0x1000,
            0,
            u32::MAX,
        ] {
            assert_eq!(page.decode_notify(a), Notify::Other(a), "{a:#x}");
        }
    }

    #[test]
    fn status_changes() {
        let (mut page, mut mem) = bus();
        let st = |mem: &mut VecMemory, page: &DevicePage, k: usize, v: u8| {
            mem.write_u8(page.device_addr(k).unwrap() + 4, v).unwrap();
        };
        st(&mut mem, &page, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(page.status_changed(&mem, 1), Ok(StatusEvent::Progress(1)));
        st(&mut mem, &page, 1, 3);
        assert_eq!(page.status_changed(&mem, 1), Ok(StatusEvent::Progress(3)));
        assert!(!page.is_running(1));
        st(&mut mem, &page, 1, 7);
        assert_eq!(page.status_changed(&mem, 1), Ok(StatusEvent::Start));
        assert!(page.is_running(1));
        // DRIVER_OK again: nothing new.
        assert_eq!(page.status_changed(&mem, 1), Ok(StatusEvent::Progress(7)));
        st(&mut mem, &page, 1, 0);
        assert_eq!(page.status_changed(&mem, 1), Ok(StatusEvent::Reset));
        assert!(!page.is_running(1));
        st(&mut mem, &page, 1, 3 | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(page.status_changed(&mem, 1), Ok(StatusEvent::Failed));
        assert_eq!(
            page.status_changed(&mem, 9),
            Err(DeviceError::NoSuchDevice(9))
        );
    }

    #[test]
    fn bad_status_writes() {
        let (mut page, mut mem) = bus();
        let at = page.device_addr(0).unwrap() + 4;
        for v in [0x10u8, 0x20, 0x27] {
            mem.write_u8(at, v).unwrap();
            let e = page.status_changed(&mem, 0).unwrap_err();
            assert!(matches!(e, DeviceError::BadStatus { status, .. } if status == v));
        }
        // DRIVER_OK without ACKNOWLEDGE/DRIVER.
        mem.write_u8(at, VIRTIO_CONFIG_S_DRIVER_OK).unwrap();
        assert!(page.status_changed(&mem, 0).is_err());
        // Running, then DRIVER_OK cleared without a reset.
        mem.write_u8(at, 7).unwrap();
        assert_eq!(page.status_changed(&mem, 0), Ok(StatusEvent::Start));
        mem.write_u8(at, 3).unwrap();
        let e = page.status_changed(&mem, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device 0: bad status 0x3: DRIVER_OK cleared without a reset"
        );
    }

    #[test]
    fn kick_before_driver_ok_starts_once() {
        let (mut page, _) = bus();
        assert!(page.kick_starts(2));
        assert!(page.is_running(2));
        assert!(!page.kick_starts(2));
        assert!(!page.kick_starts(42));
    }

    #[test]
    fn reset_zeroes_rings_and_guest_features() {
        let (mut page, mut mem) = bus();
        let k = 3;
        let addr = page.device_addr(k).unwrap();
        let gf = addr + 5 + 16 + 4;
        mem.write_u32(gf, 0xffff_ffff).unwrap();
        // The guest can accept only what was offered.
        assert_eq!(page.guest_features(&mem, k).unwrap(), 1 << VIRTIO_NET_F_MAC);
        let ring = page.queue_config(k, 1).unwrap().pfn * 4096;
        mem.write(ring, &[0xAA; 64]).unwrap();
        mem.write_u8(addr + 4, 7).unwrap();
        page.status_changed(&mem, k).unwrap();
        page.reset(&mut mem, k).unwrap();
        assert!(!page.is_running(k));
        assert_eq!(mem.read_u32(gf).unwrap(), 0);
        assert!(
            mem.as_slice()[ring as usize..ring as usize + 64]
                .iter()
                .all(|&b| b == 0)
        );
        // Host features and config untouched.
        assert_eq!(mem.read_u32(gf - 4).unwrap(), 1 << VIRTIO_NET_F_MAC);
        assert!(page.reset(&mut mem, 7).is_err());
    }

    #[test]
    fn queues_for_activation() {
        let (page, mem) = bus();
        let qs = page.queues(3, mem.limit()).unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[1].irq(), 6);
        assert_eq!(qs[1].pfn(), page.queue_config(3, 1).unwrap().pfn);
        // Guest memory too small for the rings (pfnlimit not covering them).
        assert!(page.queues(3, RAM * 4096).is_err());
    }

    struct Fake {
        sizes: Vec<u16>,
        config: usize,
    }
    impl VirtioDevice for Fake {
        fn device_type(&self) -> u8 {
            9
        }
        fn queue_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn host_features(&self) -> u32 {
            0
        }
        fn config(&self) -> Vec<u8> {
            vec![1; self.config]
        }
        fn activate(&mut self, _: Vec<VirtQueue>, _: u32) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn queues_mut(&mut self) -> &mut [VirtQueue] {
            &mut []
        }
    }

    #[test]
    fn layout_limits() {
        let fake = |sizes: &[u16], config| Fake {
            sizes: sizes.to_vec(),
            config,
        };
        // 31 queues fit (irqs 1..=31), the 32nd does not.
        let mut page = DevicePage::new(RAM).unwrap();
        page.add(&fake(&[4; 31], 0)).unwrap();
        assert_eq!(page.add(&fake(&[4], 0)), Err(LayoutError::OutOfIrqs));
        // A failed add changes nothing.
        assert_eq!(page.len(), 1);
        // A 4-entry ring still takes 2 pages (used ring on its own page).
        assert_eq!(page.end_pfn(), RAM + 1 + 31 * 2);
        // Pages: 256 in all, device page included.
        let mut page = DevicePage::new(RAM).unwrap();
        assert_eq!(
            page.add(&fake(&[32768, 32768], 0)),
            Err(LayoutError::TooManyPages)
        );
        page.add(&fake(&[4; 31], 0)).unwrap();
        // Page full: 16 devices of 255 config bytes take 16·264 > 4095.
        let mut page = DevicePage::new(RAM).unwrap();
        let mut n = 0;
        while page.add(&fake(&[], 255)).is_ok() {
            n += 1;
        }
        assert_eq!(n, 4095 / (5 + 8 + 255));
        assert_eq!(page.add(&fake(&[], 255)), Err(LayoutError::PageFull));
        assert_eq!(page.add(&fake(&[], 256)), Err(LayoutError::TooBig));
        assert_eq!(
            DevicePage::new(RAM).unwrap().add(&fake(&[3], 0)),
            Err(LayoutError::BadQueueSize(3))
        );
        assert_eq!(
            DevicePage::new(0xF_FFFF).unwrap_err(),
            LayoutError::AddressOverflow
        );
        assert!(DevicePage::new(0xF_FFFE).is_ok());
        assert!(
            DevicePage::new(0xF_FFFE)
                .unwrap()
                .add(&fake(&[4], 0))
                .is_err()
        );
    }
}
