//! Virtio on the lguest bus, guest side: bus discovery, legacy split
//! virtqueues and small synchronous drivers (console, entropy, block, net).
//!
//! The device page is at the top of RAM (`max_pfn << 12`, i.e.
//! [`BootInfo::mem_bytes`](crate::BootInfo)); [`Bus::scan`] walks its packed
//! records (`guest_abi::device`). A device is started the legacy way:
//! status 0, ACKNOWLEDGE, DRIVER, the accepted feature bits, then
//! DRIVER_OK, each status write followed by `NOTIFY(record address)`. Rings
//! are where the host put them (`lguest_vqconfig.pfn`, 4096-byte used-ring
//! alignment); a kick is `NOTIFY(pfn << 12)`.
//!
//! The host serves a kick before the `NOTIFY` hypercall returns, so the
//! drivers here are synchronous: add a chain, kick, take the used element.
//! The ring helpers that write raw descriptors and indices
//! ([`Virtqueue::write_desc`], [`Virtqueue::publish`]) exist so hostile test
//! guests can misuse a device on purpose.
//!
//! Guests run in linear mode here (virtual == physical), so buffer addresses
//! are plain pointers ([`phys`]).
//!
//! The `virtio-drivers` crate was not used: it allocates the rings itself
//! (through its `Hal`) and tells the transport where they are, while on the
//! lguest bus the host fixes them; and it needs `alloc`, which these guests
//! do not have.

use core::sync::atomic::{Ordering, compiler_fence};

use guest_abi::device::{
    DEVICE_DESC_SIZE, LGUEST_VRING_ALIGN, LguestDeviceDesc, LguestVqconfig, VIRTIO_BLK_OUTHDR_SIZE,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_NET_HDR_SIZE, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use crate::hcall::{notify, phys};

/// Most devices [`Bus::scan`] records.
pub const MAX_DEVICES: usize = 16;
/// Most descriptors in one chain the drivers build.
pub const MAX_CHAIN: usize = 8;

fn rd8(a: u32) -> u8 {
    // SAFETY: linear mode: guest-physical `a` is mapped; callers pass
    // addresses inside the device page or a ring the host laid out.
    unsafe { (a as *const u8).read_volatile() }
}
fn rd16(a: u32) -> u16 {
    // SAFETY: as in `rd8`.
    unsafe { (a as *const u16).read_volatile() }
}
fn rd32(a: u32) -> u32 {
    // SAFETY: as in `rd8` (unaligned: the device page is packed).
    unsafe { (a as *const u32).read_unaligned() }
}
fn wr8(a: u32, v: u8) {
    // SAFETY: as in `rd8`.
    unsafe { (a as *mut u8).write_volatile(v) }
}
fn wr16(a: u32, v: u16) {
    // SAFETY: as in `rd8`.
    unsafe { (a as *mut u16).write_volatile(v) }
}
fn wr32(a: u32, v: u32) {
    // SAFETY: as in `rd32`.
    unsafe { (a as *mut u32).write_unaligned(v) }
}

/// One device record on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Guest-physical address of the record (its status `NOTIFY` address).
    pub addr: u32,
    /// The record header as found at scan time.
    pub desc: LguestDeviceDesc,
}

impl Device {
    /// The virtio device id.
    pub fn kind(&self) -> u8 {
        self.desc.type_
    }

    /// The status byte now.
    pub fn status(&self) -> u8 {
        rd8(self.addr + 4)
    }

    /// Write the status byte and tell the host (`NOTIFY(record)`).
    pub fn set_status(&self, s: u8) {
        wr8(self.addr + 4, s);
        compiler_fence(Ordering::SeqCst);
        notify(self.addr);
    }

    /// Write the status byte without telling the host.
    pub fn write_status(&self, s: u8) {
        wr8(self.addr + 4, s);
    }

    /// The first 32 feature bits the host offers.
    pub fn host_features(&self) -> u32 {
        self.feature_word(self.desc.features_offset())
    }

    fn feature_word(&self, off: u32) -> u32 {
        let mut v = 0u32;
        for i in 0..u32::from(self.desc.feature_len).min(4) {
            v |= u32::from(rd8(self.addr + off + i)) << (8 * i);
        }
        v
    }

    /// Write the accepted feature bits (the first 32).
    pub fn set_guest_features(&self, f: u32) {
        for i in 0..u32::from(self.desc.feature_len).min(4) {
            wr8(
                self.addr + self.desc.guest_features_offset() + i,
                (f >> (8 * i)) as u8,
            );
        }
    }

    /// Config byte `off` (0 past the config).
    pub fn config_u8(&self, off: u32) -> u8 {
        if off < u32::from(self.desc.config_len) {
            rd8(self.addr + self.desc.config_offset() + off)
        } else {
            0
        }
    }

    /// Config bytes `off..off + buf.len()`.
    pub fn read_config(&self, off: u32, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.config_u8(off + i as u32);
        }
    }

    /// Queue `q`'s configuration.
    pub fn vq(&self, q: u8) -> Option<LguestVqconfig> {
        if q >= self.desc.num_vq {
            return None;
        }
        let a = self.addr + self.desc.vqconfig_offset(u32::from(q));
        Some(LguestVqconfig {
            num: rd16(a),
            irq: rd16(a + 2),
            pfn: rd32(a + 4),
        })
    }

    /// Reset, ACKNOWLEDGE, DRIVER and accept `wanted & offered` features;
    /// returns the accepted bits. Finish with [`Self::driver_ok`].
    pub fn begin(&self, wanted: u32) -> u32 {
        self.set_status(0);
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        let f = self.host_features() & wanted;
        self.set_guest_features(f);
        f
    }

    /// DRIVER_OK: the host starts the device.
    pub fn driver_ok(&self) {
        self.set_status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        );
    }
}

/// The devices found on the bus.
#[derive(Debug, Clone, Copy)]
pub struct Bus {
    /// Guest-physical address of the device page.
    pub base: u32,
    devices: [Option<Device>; MAX_DEVICES],
    count: usize,
}

impl Bus {
    /// Walk the device page at `mem_bytes` (the top of RAM).
    pub fn scan(mem_bytes: u64) -> Self {
        let base = mem_bytes as u32;
        let mut bus = Self {
            base,
            devices: [None; MAX_DEVICES],
            count: 0,
        };
        let mut off = 0u32;
        while off + DEVICE_DESC_SIZE <= 4096 && bus.count < MAX_DEVICES {
            let a = base + off;
            let desc = LguestDeviceDesc {
                type_: rd8(a),
                num_vq: rd8(a + 1),
                feature_len: rd8(a + 2),
                config_len: rd8(a + 3),
                status: rd8(a + 4),
            };
            if desc.type_ == 0 || off + desc.record_len() > 4096 {
                break;
            }
            bus.devices[bus.count] = Some(Device { addr: a, desc });
            bus.count += 1;
            off += desc.record_len();
        }
        bus
    }

    /// Every device found, in order.
    pub fn devices(&self) -> impl Iterator<Item = Device> + '_ {
        self.devices.iter().flatten().copied()
    }

    /// The first device of virtio id `kind`.
    pub fn find(&self, kind: u8) -> Option<Device> {
        self.devices().find(|d| d.kind() == kind)
    }
}

/// One buffer of a chain: guest-physical address, length, device-writable.
pub type Buf = (u32, u32, bool);

/// Wake-ups (any irq: the clock too) [`Virtqueue::wait_used`] waits for
/// a used element before it gives up.
pub const WAIT_HALTS: u32 = 100_000;

fn vq_irq(_: &mut crate::TrapFrame) {}

/// A legacy split virtqueue at the place the host chose.
#[derive(Debug)]
pub struct Virtqueue {
    /// The host's configuration of this queue.
    pub cfg: LguestVqconfig,
    desc: u32,
    avail: u32,
    used: u32,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Take over the (zeroed) ring of `cfg`: all descriptors free.
    pub fn new(cfg: LguestVqconfig) -> Self {
        let num = u32::from(cfg.num);
        let desc = cfg.pfn << 12;
        let avail = desc + 16 * num;
        let used = (avail + 2 * (3 + num)).next_multiple_of(LGUEST_VRING_ALIGN);
        let q = Self {
            cfg,
            desc,
            avail,
            used,
            free_head: 0,
            num_free: cfg.num,
            avail_idx: rd16(avail + 2),
            last_used: rd16(used + 2),
        };
        for i in 0..cfg.num {
            q.write_desc(i, 0, 0, 0, i.wrapping_add(1));
        }
        // The host completes requests asynchronously and raises this
        // queue's irq when it has: take it (the handler has nothing to do:
        // the waiter looks at the used ring) so that HALT wakes for it.
        let irq = u32::from(cfg.irq);
        if irq < guest_abi::LGUEST_IRQS {
            crate::trap::set_irq_handler(irq, Some(vq_irq));
            crate::irq::unmask(irq);
        }
        q
    }

    /// Write descriptor `i` as is (no checks: hostile guests use this too).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = self.desc + 16 * u32::from(i % self.cfg.num.max(1));
        wr32(a, addr as u32);
        wr32(a + 4, (addr >> 32) as u32);
        wr32(a + 8, len);
        wr16(a + 12, flags);
        wr16(a + 14, next);
    }

    /// Put `head` in the next avail slot and publish `avail.idx + 1`.
    pub fn publish(&mut self, head: u16) {
        let slot = u32::from(self.avail_idx % self.cfg.num);
        wr16(self.avail + 4 + 2 * slot, head);
        compiler_fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr16(self.avail + 2, self.avail_idx);
        compiler_fence(Ordering::SeqCst);
    }

    /// Set `avail.idx` to anything (hostile).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        wr16(self.avail + 2, idx);
    }

    /// Add a chain of buffers and publish it; `None` if too few descriptors
    /// are free or the chain is empty or longer than [`MAX_CHAIN`].
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > MAX_CHAIN || usize::from(self.num_free) < bufs.len() {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let next_free = rd16(self.desc + 16 * u32::from(i) + 14);
            let last = k + 1 == bufs.len();
            let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(
                i,
                u64::from(addr),
                len,
                flags,
                if last { 0 } else { next_free },
            );
            if last {
                self.free_head = next_free;
            } else {
                i = next_free;
            }
        }
        self.num_free -= bufs.len() as u16;
        self.publish(head);
        Some(head)
    }

    /// Kick the host: `NOTIFY(pfn << 12)`.
    pub fn kick(&self) {
        compiler_fence(Ordering::SeqCst);
        notify(self.cfg.pfn << 12);
        compiler_fence(Ordering::SeqCst);
    }

    /// Whether the host has used an element not yet taken with
    /// [`Self::pop_used`] (to test before halting).
    pub fn has_used(&self) -> bool {
        compiler_fence(Ordering::SeqCst);
        rd16(self.used + 2) != self.last_used
    }

    /// Take the next used element `(head, len)` and free its chain.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        compiler_fence(Ordering::SeqCst);
        if rd16(self.used + 2) == self.last_used {
            return None;
        }
        let slot = u32::from(self.last_used % self.cfg.num);
        let head = rd32(self.used + 4 + 8 * slot) as u16;
        let len = rd32(self.used + 8 + 8 * slot);
        self.last_used = self.last_used.wrapping_add(1);
        // Free the chain: find its tail and link it to the free list.
        let mut i = head;
        let mut n = 1u16;
        while rd16(self.desc + 16 * u32::from(i) + 12) & VRING_DESC_F_NEXT != 0 && n < self.cfg.num
        {
            i = rd16(self.desc + 16 * u32::from(i) + 14);
            n += 1;
        }
        wr16(self.desc + 16 * u32::from(i) + 12, 0);
        wr16(self.desc + 16 * u32::from(i) + 14, self.free_head);
        self.free_head = head;
        self.num_free += n;
        Some((head, len))
    }

    /// Waits for the next used element: the host serves a kick in its
    /// device service task, while the guest runs on, and raises the
    /// queue's irq when it has added to the used ring, so the guest halts
    /// until then (checking with virtual irqs off first: no lost wake-up).
    /// `None` after [`WAIT_HALTS`] wake-ups without one.
    pub fn wait_used(&mut self) -> Option<(u16, u32)> {
        for _ in 0..WAIT_HALTS {
            crate::irq::disable();
            if let Some(u) = self.pop_used() {
                crate::irq::enable();
                return Some(u);
            }
            crate::hcall::halt();
        }
        None
    }

    /// Add, kick and wait for the used element the host produces: the used
    /// length, or `None` if the chain could not be added or the host did
    /// not complete it.
    pub fn submit(&mut self, bufs: &[Buf]) -> Option<u32> {
        let head = self.add(bufs)?;
        self.kick();
        match self.wait_used() {
            Some((h, len)) if h == head => Some(len),
            _ => None,
        }
    }
}

/// Start `dev` with `wanted` features and take over its first `N` queues.
pub fn start<const N: usize>(dev: &Device, wanted: u32) -> Option<([Virtqueue; N], u32)> {
    let f = dev.begin(wanted);
    let mut ok = true;
    let qs = core::array::from_fn(|q| {
        let cfg = dev.vq(q as u8).unwrap_or_else(|| {
            ok = false;
            LguestVqconfig::default()
        });
        if ok {
            Virtqueue::new(cfg)
        } else {
            Virtqueue {
                cfg,
                desc: 0,
                avail: 0,
                used: 0,
                free_head: 0,
                num_free: 0,
                avail_idx: 0,
                last_used: 0,
            }
        }
    });
    if !ok {
        return None;
    }
    dev.driver_ok();
    Some((qs, f))
}

/// The virtio console: queue 0 receives, queue 1 transmits.
#[derive(Debug)]
pub struct Console {
    /// The receive and transmit queues.
    pub queues: [Virtqueue; 2],
}

impl Console {
    /// Start the console device.
    pub fn new(dev: &Device) -> Option<Self> {
        let (queues, _) = start::<2>(dev, 0)?;
        Some(Self { queues })
    }

    /// Send `bytes`; `true` if the host took them.
    pub fn write(&mut self, bytes: &[u8]) -> bool {
        self.queues[1]
            .submit(&[(phys(bytes.as_ptr()), bytes.len() as u32, false)])
            .is_some()
    }

    /// Offer `buf` for input (one buffer at a time).
    pub fn post_input(&mut self, buf: &mut [u8]) -> bool {
        let q = &mut self.queues[0];
        let ok = q
            .add(&[(phys(buf.as_ptr()), buf.len() as u32, true)])
            .is_some();
        q.kick();
        ok
    }

    /// Bytes the host put into the posted input buffer, if it completed.
    pub fn input_done(&mut self) -> Option<u32> {
        self.queues[0].pop_used().map(|(_, len)| len)
    }
}

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    /// Its one queue.
    pub queue: Virtqueue,
}

impl Rng {
    /// Start the entropy device.
    pub fn new(dev: &Device) -> Option<Self> {
        let ([queue], _) = start::<1>(dev, 0)?;
        Some(Self { queue })
    }

    /// Fill `buf`; the bytes the host gave.
    pub fn fill(&mut self, buf: &mut [u8]) -> Option<u32> {
        self.queue
            .submit(&[(phys(buf.as_ptr()), buf.len() as u32, true)])
    }
}

/// The block device.
#[derive(Debug)]
pub struct Block {
    /// Its request queue.
    pub queue: Virtqueue,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Features accepted.
    pub features: u32,
}

/// A block request header (`struct virtio_blk_outhdr`).
#[repr(C)]
struct OutHdr {
    kind: u32,
    ioprio: u32,
    sector: u64,
}

impl Block {
    /// Start the block device (accepting `SEG_MAX` and `FLUSH`).
    pub fn new(dev: &Device) -> Option<Self> {
        let wanted = (1 << guest_abi::device::VIRTIO_BLK_F_SEG_MAX)
            | (1 << guest_abi::device::VIRTIO_BLK_F_FLUSH);
        let ([queue], features) = start::<1>(dev, wanted)?;
        let mut c = [0u8; 8];
        dev.read_config(0, &mut c);
        Some(Self {
            queue,
            capacity: u64::from_le_bytes(c),
            features,
        })
    }

    /// One request: the status byte the host wrote (`None` if it did not
    /// complete it).
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, u32, bool)>) -> Option<u8> {
        let hdr = OutHdr {
            kind,
            ioprio: 0,
            sector,
        };
        let mut status = 0xffu8;
        let h = (phys(&raw const hdr), VIRTIO_BLK_OUTHDR_SIZE, false);
        let s = (phys(&raw mut status), 1, true);
        let done = match data {
            Some(d) => self.queue.submit(&[h, d, s]),
            None => self.queue.submit(&[h, s]),
        };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the host wrote the byte (or not) before `submit` returned.
        let st = unsafe { (&raw const status).read_volatile() };
        done.map(|_| st)
    }

    /// Read sectors from `sector` into `buf` (a multiple of 512 bytes).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Option<u8> {
        let d = (phys(buf.as_ptr()), buf.len() as u32, true);
        self.request(VIRTIO_BLK_T_IN, sector, Some(d))
    }

    /// Write `data` (a multiple of 512 bytes) at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Option<u8> {
        let d = (phys(data.as_ptr()), data.len() as u32, false);
        self.request(VIRTIO_BLK_T_OUT, sector, Some(d))
    }

    /// Flush.
    pub fn flush(&mut self) -> Option<u8> {
        self.request(VIRTIO_BLK_T_FLUSH, 0, None)
    }

    /// The 20-byte id string.
    pub fn get_id(&mut self, buf: &mut [u8; 20]) -> Option<u8> {
        let d = (phys(buf.as_ptr()), 20, true);
        self.request(VIRTIO_BLK_T_GET_ID, 0, Some(d))
    }
}

/// The network device: queue 0 receives, queue 1 transmits.
#[derive(Debug)]
pub struct Net {
    /// The receive and transmit queues.
    pub queues: [Virtqueue; 2],
    /// The MAC from the config (zero if not offered).
    pub mac: [u8; 6],
}

impl Net {
    /// Start the network device (accepting `MAC`).
    pub fn new(dev: &Device) -> Option<Self> {
        let (queues, f) = start::<2>(dev, 1 << guest_abi::device::VIRTIO_NET_F_MAC)?;
        let mut mac = [0u8; 6];
        if f & (1 << guest_abi::device::VIRTIO_NET_F_MAC) != 0 {
            dev.read_config(0, &mut mac);
        }
        Some(Self { queues, mac })
    }

    /// Send an Ethernet frame: `hdr` (at least 10 bytes, zeroed here) is
    /// the virtio header buffer.
    pub fn send(&mut self, hdr: &mut [u8; 10], frame: &[u8]) -> bool {
        hdr.fill(0);
        self.queues[1]
            .submit(&[
                (phys(hdr.as_ptr()), VIRTIO_NET_HDR_SIZE, false),
                (phys(frame.as_ptr()), frame.len() as u32, false),
            ])
            .is_some()
    }

    /// Offer `buf` (virtio header + frame) for a received frame.
    pub fn post_rx(&mut self, buf: &mut [u8]) -> bool {
        let q = &mut self.queues[0];
        let ok = q
            .add(&[(phys(buf.as_ptr()), buf.len() as u32, true)])
            .is_some();
        q.kick();
        ok
    }

    /// A received frame's length (virtio header included), if one came.
    pub fn rx_done(&mut self) -> Option<u32> {
        self.queues[0].pop_used().map(|(_, len)| len)
    }
}
