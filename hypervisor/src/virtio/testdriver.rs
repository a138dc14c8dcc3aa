//! A guest-side virtio driver for the unit tests: lays rings out in
//! [`VecMemory`] exactly as a Linux guest's `vring_init(…, 4096)` would and
//! drives them (descriptors, avail ring, used ring), plus raw writers for
//! hostile rings.

use guest_abi::device::{LguestVqconfig, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::VirtioDevice;
use super::devpage::{DevicePage, Notify, StatusEvent};
use super::queue::{Descriptor, RingLayout, VirtQueue};
use crate::lguest::guestmem::{GuestMemory, VecMemory};

/// The guest's view of one ring.
pub(crate) struct Driver {
    pub num: u16,
    pub pfn: u32,
    pub layout: RingLayout,
    /// Free descriptor indices.
    free: Vec<u16>,
    /// Next avail index to publish.
    pub avail_idx: u16,
    /// Next used index to consume.
    pub last_used: u16,
}

impl Driver {
    pub fn new(num: u16, pfn: u32) -> Self {
        Self {
            num,
            pfn,
            layout: RingLayout::new(num, pfn).unwrap(),
            free: (0..num).rev().collect(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn config(&self, irq: u16) -> LguestVqconfig {
        LguestVqconfig {
            num: self.num,
            irq,
            pfn: self.pfn,
        }
    }

    /// The host side of this ring.
    pub fn host_queue(&self, mem: &VecMemory) -> VirtQueue {
        VirtQueue::new(self.config(1), mem.limit()).unwrap()
    }

    pub fn write_desc(&self, mem: &mut VecMemory, i: u16, d: Descriptor) {
        mem.write(self.layout.desc + u32::from(i) * 16, &d.to_bytes())
            .unwrap();
    }

    /// Publish `head` in the avail ring and bump the index.
    pub fn publish(&mut self, mem: &mut VecMemory, head: u16) {
        let slot = u32::from(self.avail_idx % self.num);
        mem.write_u16(self.layout.avail + 4 + slot * 2, head)
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_u16(self.layout.avail + 2, self.avail_idx)
            .unwrap();
    }

    /// Set `avail.idx` to anything (hostile).
    pub fn set_avail_idx(&mut self, mem: &mut VecMemory, idx: u16) {
        self.avail_idx = idx;
        mem.write_u16(self.layout.avail + 2, idx).unwrap();
    }

    pub fn set_avail_flags(&self, mem: &mut VecMemory, flags: u16) {
        mem.write_u16(self.layout.avail, flags).unwrap();
    }

    pub fn used_flags(&self, mem: &VecMemory) -> u16 {
        mem.read_u16(self.layout.used).unwrap()
    }

    /// Add a chain of `(addr, len, writable)` buffers; returns the head or
    /// `None` if not enough descriptors are free.
    pub fn add(&mut self, mem: &mut VecMemory, bufs: &[(u32, u32, bool)]) -> Option<u16> {
        if bufs.is_empty() || self.free.len() < bufs.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(
                mem,
                ids[k],
                Descriptor {
                    addr: u64::from(addr),
                    len,
                    flags,
                    next: if last { 0 } else { ids[k + 1] },
                },
            );
        }
        self.publish(mem, ids[0]);
        Some(ids[0])
    }

    /// Take the next used element `(id, len)` and free its chain.
    pub fn take_used(&mut self, mem: &VecMemory) -> Option<(u16, u32)> {
        let idx = mem.read_u16(self.layout.used + 2).unwrap();
        if idx == self.last_used {
            return None;
        }
        let slot = u32::from(self.last_used % self.num);
        let id = mem.read_u32(self.layout.used + 4 + slot * 8).unwrap();
        let len = mem.read_u32(self.layout.used + 8 + slot * 8).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        // Free the chain.
        let mut i = id as u16;
        loop {
            let mut raw = [0u8; 16];
            mem.read(self.layout.desc + u32::from(i) * 16, &mut raw)
                .unwrap();
            let d = Descriptor::parse(&raw);
            self.free.push(i);
            if d.flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            i = d.next;
        }
        Some((id as u16, len))
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }
}

/// RAM pages of the test guests (1 MiB); the device page and rings follow.
pub const RAM_PAGES: u32 = 256;

/// Put `dev` alone on a bus, write the page, and drive it to DRIVER_OK the
/// way the guest and the launcher would. Returns the guest memory, the bus
/// and one guest-side driver per queue.
pub(crate) fn bring_up(dev: &mut dyn VirtioDevice) -> (VecMemory, DevicePage, Vec<Driver>) {
    let mut page = DevicePage::new(RAM_PAGES).unwrap();
    let k = page.add(dev).unwrap();
    let mut mem = VecMemory::new(page.end_pfn() * 4096);
    page.write(&mut mem).unwrap();
    let status_at = page.device_addr(k).unwrap() + 4;
    mem.write_u8(status_at, 1 | 2 | 4).unwrap();
    assert_eq!(page.decode_notify(status_at - 4), Notify::Status(k));
    assert_eq!(page.status_changed(&mem, k).unwrap(), StatusEvent::Start);
    let feats = page.guest_features(&mem, k).unwrap();
    dev.activate(page.queues(k, mem.limit()).unwrap(), feats)
        .unwrap();
    let drivers = (0..dev.queue_sizes().len())
        .map(|q| {
            let c = page.queue_config(k, q).unwrap();
            Driver::new(c.num, c.pfn)
        })
        .collect();
    (mem, page, drivers)
}
