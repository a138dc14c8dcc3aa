//! One guest's lguest bus: its devices, their device page, and what a
//! `NOTIFY` does — the launcher glue of the module docs ([`super`]) as one
//! pure, host-tested object.
//!
//! A [`Bus`] holds the console (unless turned off), the entropy device
//! (always), a block device over a store `S` (optional) and a network
//! device on a port of a [`Switch`] (optional), in that order on the page.
//! The launcher:
//!
//! ```text
//! bus = Bus::new(ram_pages, config, entropy)?     before allocating guest memory
//! allocate RAM + bus.device_pages() pages; bus.write(mem)?
//! INITIALIZE(base, pfnlimit = bus.end_pfn(), start)
//! read() == NOTIFY(addr):  match bus.notify(mem, addr, host)
//!     Ok(Handled::Device)      => keep running
//!     Ok(Handled::Other(addr)) => the early console string at addr (or "no device there")
//!     Err(e)                   => kill the guest with e.to_string()
//! before each read():       bus.poll(mem, host)  (console input, frames waiting in the switch)
//! at the end:               bus.flush_console(host); bus.stats()
//! ```
//!
//! [`BusHost`] is what the launcher supplies per call: where console lines
//! go, how an irq is raised, and the switch (locked for the call). Console
//! output is assembled into lines here by the one
//! [`LineAssembler`] (at most
//! [`ASSEMBLE_MAX`](crate::lguest::console::ASSEMBLE_MAX) bytes, a longer
//! line cut into pieces; `\r\n` is one line end), so each piece the
//! launcher prints is one line of guest text.
//!
//! Frames a guest sends to other guests are queued on their ports by
//! [`Switch::input`]; each receiving guest takes them into its receive
//! buffers when its own launcher next calls [`Bus::poll`] or the guest kicks
//! its receive queue.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::vec::Vec;

use super::block::{Block, BlockStats};
use super::console::{Console, ConsoleStats};
use super::devpage::{DevicePage, LayoutError, Notify, StatusEvent};
use super::net::{Mac, Net, NetStats};
use super::rng::{EntropySource, Rng};
use super::switch::{PortId, Switch};
use super::{DeviceError, VirtioDevice, interrupts};
use crate::lguest::console::LineAssembler;
use crate::lguest::guestmem::GuestMemory;

/// What the launcher supplies to a bus call.
pub trait BusHost {
    /// One line of the guest's virtio console output (without the `\n`).
    fn console_line(&mut self, line: &[u8]);
    /// Raise virtual irq `irq` in the guest (`LHREQ_IRQ`).
    fn irq(&mut self, irq: u16);
    /// The switch the guest's network device is a port of (locked for the
    /// call); `None` drops transmitted frames.
    fn switch(&mut self) -> Option<&mut Switch>;
}

/// The devices to put on a guest's bus.
#[derive(Debug)]
pub struct BusConfig<S> {
    /// A virtio console.
    pub console: bool,
    /// A block device over this store, with this id string.
    pub block: Option<(S, Vec<u8>)>,
    /// A network device with this MAC on this switch port.
    pub net: Option<(Mac, PortId)>,
}

/// What a `NOTIFY` was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// A status change or a kick, served.
    Device,
    /// Not a device address: lguest's early console string (if inside
    /// guest memory), else nothing.
    Other(u32),
}

/// Counters of every device on a bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Console counters (zero without a console).
    pub console: ConsoleStats,
    /// Random bytes given.
    pub rng_bytes: u64,
    /// Block counters, if there is a block device.
    pub block: Option<BlockStats>,
    /// Network counters, if there is a network device.
    pub net: Option<NetStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Console,
    Rng,
    Block,
    Net,
}

/// One guest's bus (module docs).
pub struct Bus<S, E> {
    page: DevicePage,
    ram_pages: u32,
    kinds: Vec<Kind>,
    console: Option<Console>,
    rng: Rng,
    entropy: E,
    block: Option<Block<S>>,
    net: Option<(Net, PortId)>,
    line: LineAssembler,
    scratch: Vec<u8>,
}

impl<S, E> core::fmt::Debug for Bus<S, E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Bus")
            .field("page", &self.page)
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl<S: AsRef<[u8]> + AsMut<[u8]>, E: EntropySource> Bus<S, E> {
    /// The bus of a guest with `ram_pages` pages of RAM: the device page at
    /// `ram_pages << 12`, rings after it.
    pub fn new(ram_pages: u32, config: BusConfig<S>, entropy: E) -> Result<Self, LayoutError> {
        let mut page = DevicePage::new(ram_pages)?;
        let mut kinds = Vec::new();
        let console = if config.console {
            let c = Console::default();
            page.add(&c)?;
            kinds.push(Kind::Console);
            Some(c)
        } else {
            None
        };
        let rng = Rng::new();
        page.add(&rng)?;
        kinds.push(Kind::Rng);
        let block = match config.block {
            Some((store, id)) => {
                let b = Block::new(store, &id);
                page.add(&b)?;
                kinds.push(Kind::Block);
                Some(b)
            }
            None => None,
        };
        let net = match config.net {
            Some((mac, port)) => {
                let n = Net::new(mac);
                page.add(&n)?;
                kinds.push(Kind::Net);
                Some((n, port))
            }
            None => None,
        };
        Ok(Self {
            page,
            ram_pages,
            kinds,
            console,
            rng,
            entropy,
            block,
            net,
            line: LineAssembler::new(),
            scratch: Vec::new(),
        })
    }

    /// Pages above RAM the bus uses (device page and rings).
    pub fn device_pages(&self) -> u32 {
        self.page.end_pfn().saturating_sub(self.ram_pages)
    }

    /// `pfnlimit` for `INITIALIZE`: RAM plus the device pages.
    pub fn end_pfn(&self) -> u32 {
        self.page.end_pfn()
    }

    /// The device page (addresses of records and rings).
    pub fn page(&self) -> &DevicePage {
        &self.page
    }

    /// Every ring's kick address (`pfn << 12`), device by device: what the
    /// launcher binds to a service event with `LHREQ_EVENTFD`, so that a
    /// kick is served without the guest's `read()` returning.
    pub fn kick_addrs(&self) -> Vec<u32> {
        (0..self.kinds.len())
            .flat_map(|k| (0..).map_while(move |q| self.page.queue_config(k, q)))
            .filter_map(|c| c.pfn.checked_mul(4096))
            .collect()
    }

    /// The switch port of the network device, if any.
    pub fn net_port(&self) -> Option<PortId> {
        self.net.as_ref().map(|(_, p)| *p)
    }

    /// Write the device page and zero the rings (before the guest starts).
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &mut M) -> Result<(), DeviceError> {
        Ok(self.page.write(mem)?)
    }

    /// Buffer console input for the guest (what does not fit is dropped
    /// and counted); it is delivered by the next [`Self::poll`] or console
    /// kick. Returns the bytes taken (0 without a console).
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        self.console.as_mut().map_or(0, |c| c.push_input(bytes))
    }

    /// Serve `NOTIFY(addr)`. An `Err` is fatal for the guest: kill it with
    /// the error's text.
    pub fn notify<M, H>(
        &mut self,
        mem: &mut M,
        addr: u32,
        host: &mut H,
    ) -> Result<Handled, DeviceError>
    where
        M: GuestMemory + ?Sized,
        H: BusHost,
    {
        match self.page.decode_notify(addr) {
            Notify::Other(a) => Ok(Handled::Other(a)),
            Notify::Status(k) => {
                match self.page.status_changed(mem, k)? {
                    StatusEvent::Reset | StatusEvent::Failed => {
                        self.page.reset(mem, k)?;
                        self.device(k)?.reset();
                    }
                    StatusEvent::Start => self.activate(mem, k)?,
                    StatusEvent::Progress(_) => {}
                }
                Ok(Handled::Device)
            }
            Notify::Kick { device, .. } => {
                if self.page.kick_starts(device) {
                    self.activate(mem, device)?;
                }
                self.service(mem, device, host)?;
                Ok(Handled::Device)
            }
        }
    }

    /// Deliver what waits for the guest (console input, frames in the
    /// switch) into its receive buffers and raise the irqs.
    pub fn poll<M, H>(&mut self, mem: &mut M, host: &mut H) -> Result<(), DeviceError>
    where
        M: GuestMemory + ?Sized,
        H: BusHost,
    {
        for k in 0..self.kinds.len() {
            if !self.page.is_running(k) {
                continue;
            }
            match self.kinds.get(k) {
                Some(Kind::Console) => {
                    if let Some(c) = self.console.as_mut()
                        && c.pending_input() > 0
                    {
                        c.service_rx(mem)?;
                        raise(c, mem, host)?;
                    }
                }
                Some(Kind::Net) => {
                    if let Some((n, port)) = self.net.as_mut()
                        && let Some(sw) = host.switch()
                        && sw.pending(*port) > 0
                    {
                        sw.pump_rx(*port, n, mem)?;
                        raise(n, mem, host)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Hand over a partial console line still buffered (at the guest's
    /// end).
    pub fn flush_console<H: BusHost>(&mut self, host: &mut H) {
        self.line.finish(|l| host.console_line(l));
    }

    /// Counters of every device.
    pub fn stats(&self) -> BusStats {
        BusStats {
            console: self
                .console
                .as_ref()
                .map(Console::stats)
                .unwrap_or_default(),
            rng_bytes: self.rng.bytes_given(),
            block: self.block.as_ref().map(Block::stats),
            net: self.net.as_ref().map(|(n, _)| n.stats()),
        }
    }

    /// Give the block store back (e.g. to free it).
    pub fn into_block_store(self) -> Option<S> {
        self.block.map(Block::into_store)
    }

    fn device(&mut self, k: usize) -> Result<&mut dyn VirtioDevice, DeviceError> {
        let dev: Option<&mut dyn VirtioDevice> = match self.kinds.get(k) {
            Some(Kind::Console) => self.console.as_mut().map(|c| c as &mut dyn VirtioDevice),
            Some(Kind::Rng) => Some(&mut self.rng),
            Some(Kind::Block) => self.block.as_mut().map(|b| b as &mut dyn VirtioDevice),
            Some(Kind::Net) => self.net.as_mut().map(|(n, _)| n as &mut dyn VirtioDevice),
            None => None,
        };
        dev.ok_or(DeviceError::NoSuchDevice(k))
    }

    fn activate<M: GuestMemory + ?Sized>(&mut self, mem: &M, k: usize) -> Result<(), DeviceError> {
        let queues = self.page.queues(k, mem.limit())?;
        let features = self.page.guest_features(mem, k)?;
        self.device(k)?.activate(queues, features)
    }

    fn service<M, H>(&mut self, mem: &mut M, k: usize, host: &mut H) -> Result<(), DeviceError>
    where
        M: GuestMemory + ?Sized,
        H: BusHost,
    {
        match self.kinds.get(k) {
            Some(Kind::Console) => {
                let Some(c) = self.console.as_mut() else {
                    return Err(DeviceError::NoSuchDevice(k));
                };
                let line = &mut self.line;
                c.service_tx(mem, |bytes| line.push(bytes, |l| host.console_line(l)))?;
                c.service_rx(mem)?;
                raise(c, mem, host)
            }
            Some(Kind::Rng) => {
                self.rng.service(mem, &mut self.entropy)?;
                raise(&mut self.rng, mem, host)
            }
            Some(Kind::Block) => {
                let Some(b) = self.block.as_mut() else {
                    return Err(DeviceError::NoSuchDevice(k));
                };
                b.service(mem)?;
                raise(b, mem, host)
            }
            Some(Kind::Net) => {
                let Some((n, port)) = self.net.as_mut() else {
                    return Err(DeviceError::NoSuchDevice(k));
                };
                match host.switch() {
                    Some(sw) => {
                        sw.pump_tx(*port, n, mem, &mut self.scratch)?;
                        sw.pump_rx(*port, n, mem)?;
                    }
                    None => while n.pop_tx(mem, &mut self.scratch)? {},
                }
                raise(n, mem, host)
            }
            None => Err(DeviceError::NoSuchDevice(k)),
        }
    }
}

/// Raise the irqs a device's queues ask for.
fn raise<M, H>(dev: &mut dyn VirtioDevice, mem: &M, host: &mut H) -> Result<(), DeviceError>
where
    M: GuestMemory + ?Sized,
    H: BusHost,
{
    for irq in interrupts(dev, mem)? {
        host.irq(irq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use crate::virtio::rng::ChaCha20Rng;
    use crate::virtio::testdriver::Driver;
    use alloc::string::ToString;
    use alloc::vec;
    use guest_abi::device::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};

    const RAM_PAGES: u32 = 256;

    #[derive(Default)]
    struct Host {
        lines: Vec<Vec<u8>>,
        irqs: Vec<u16>,
        switch: Option<Switch>,
    }

    impl BusHost for Host {
        fn console_line(&mut self, line: &[u8]) {
            self.lines.push(line.to_vec());
        }
        fn irq(&mut self, irq: u16) {
            self.irqs.push(irq);
        }
        fn switch(&mut self) -> Option<&mut Switch> {
            self.switch.as_mut()
        }
    }

    fn bytes(mem: &VecMemory, at: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read(at, &mut v).unwrap();
        v
    }

    type TestBus = Bus<Vec<u8>, ChaCha20Rng>;

    fn bus(config: BusConfig<Vec<u8>>) -> (TestBus, VecMemory) {
        let b = Bus::new(RAM_PAGES, config, ChaCha20Rng::from_seed([7; 32])).unwrap();
        let mut mem = VecMemory::new(b.end_pfn() * 4096);
        b.write(&mut mem).unwrap();
        (b, mem)
    }

    fn start(b: &mut TestBus, mem: &mut VecMemory, host: &mut Host, k: usize) -> Vec<Driver> {
        let at = b.page().device_addr(k).unwrap();
        for s in [1u8, 3, 7] {
            mem.write_u8(at + 4, s).unwrap();
            assert_eq!(b.notify(mem, at, host), Ok(Handled::Device));
        }
        (0..4)
            .map_while(|q| b.page().queue_config(k, q))
            .map(|c| Driver::new(c.num, c.pfn))
            .collect()
    }

    #[test]
    fn layout_and_pages() {
        let (b, _) = bus(BusConfig {
            console: true,
            block: Some((vec![0; 4096], b"disk".to_vec())),
            net: Some(([2, 0, 0, 0, 0, 1], 0)),
        });
        // Device page + console 2×2 + rng 2 + block 2 + net 2×2 pages.
        assert_eq!(b.device_pages(), 13);
        assert_eq!(b.end_pfn(), RAM_PAGES + 13);
        let (b, _) = bus(BusConfig {
            console: false,
            block: None,
            net: None,
        });
        assert_eq!(b.device_pages(), 3, "the entropy device is always there");
    }

    #[test]
    fn kick_addrs_are_every_ring_and_decode_as_kicks() {
        let (mut b, mut mem) = bus(BusConfig {
            console: true,
            block: Some((vec![0; 4096], b"disk".to_vec())),
            net: Some(([2, 0, 0, 0, 0, 1], 0)),
        });
        let addrs = b.kick_addrs();
        // console 2 + rng 1 + block 1 + net 2 queues.
        assert_eq!(addrs.len(), 6);
        let mut host = Host::default();
        for a in addrs {
            assert_eq!(a % 4096, 0);
            assert!(a >= RAM_PAGES * 4096 && a < b.end_pfn() * 4096);
            // A kick of a device not started yet is served (ignored), never
            // taken for an early-console string.
            assert_eq!(b.notify(&mut mem, a, &mut host), Ok(Handled::Device));
        }
    }

    #[test]
    fn console_lines_irqs_and_input() {
        let (mut b, mut mem) = bus(BusConfig {
            console: true,
            block: None,
            net: None,
        });
        let mut host = Host::default();
        let mut d = start(&mut b, &mut mem, &mut host, 0);
        mem.write(0x1000, b"one\ntw").unwrap();
        mem.write(0x2000, b"o\n").unwrap();
        d[1].add(&mut mem, &[(0x1000, 6, false), (0x2000, 2, false)]);
        let kick = d[1].pfn << 12;
        assert_eq!(b.notify(&mut mem, kick, &mut host), Ok(Handled::Device));
        assert_eq!(host.lines, [b"one".to_vec(), b"two".to_vec()]);
        let tx_irq = b.page().queue_config(0, 1).unwrap().irq;
        assert_eq!(host.irqs, [tx_irq]);
        // A long line is cut; a partial one waits for the end.
        mem.write(0x1000, &[b'x'; crate::lguest::console::ASSEMBLE_MAX + 5])
            .unwrap();
        d[1].add(
            &mut mem,
            &[(
                0x1000,
                crate::lguest::console::ASSEMBLE_MAX as u32 + 5,
                false,
            )],
        );
        b.notify(&mut mem, kick, &mut host).unwrap();
        assert_eq!(host.lines.len(), 3);
        assert_eq!(host.lines[2].len(), crate::lguest::console::ASSEMBLE_MAX);
        b.flush_console(&mut host);
        assert_eq!(host.lines[3], b"xxxxx");
        // Input reaches a posted receive buffer on the next poll.
        d[0].add(&mut mem, &[(0x3000, 16, true)]);
        assert_eq!(b.push_input(b"hi"), 2);
        host.irqs.clear();
        b.poll(&mut mem, &mut host).unwrap();
        assert_eq!(bytes(&mem, 0x3000, 2), b"hi");
        assert_eq!(d[0].take_used(&mem), Some((0, 2)));
        assert_eq!(host.irqs, [b.page().queue_config(0, 0).unwrap().irq]);
        assert_eq!(b.stats().console.in_bytes, 2);
        // Not a device: the early console's business.
        assert_eq!(
            b.notify(&mut mem, 0x1000, &mut host),
            Ok(Handled::Other(0x1000))
        );
    }

    #[test]
    fn rng_and_block() {
        let disk: Vec<u8> = (0..8 * 512).map(|i| (i % 251) as u8).collect();
        let (mut b, mut mem) = bus(BusConfig {
            console: true,
            block: Some((disk.clone(), b"vdisk".to_vec())),
            net: None,
        });
        let mut host = Host::default();
        let mut r = start(&mut b, &mut mem, &mut host, 1);
        r[0].add(&mut mem, &[(0x1000, 64, true)]);
        b.notify(&mut mem, r[0].pfn << 12, &mut host).unwrap();
        assert_eq!(r[0].take_used(&mem), Some((0, 64)));
        assert!(bytes(&mem, 0x1000, 64).iter().any(|&x| x != 0));
        assert_eq!(b.stats().rng_bytes, 64);

        let mut d = start(&mut b, &mut mem, &mut host, 2);
        let kick = d[0].pfn << 12;
        let read = |d: &mut Driver, mem: &mut VecMemory, sector: u64| {
            mem.write_u32(0x2000, VIRTIO_BLK_T_IN).unwrap();
            mem.write_u32(0x2004, 0).unwrap();
            mem.write(0x2008, &sector.to_le_bytes()).unwrap();
            d.add(
                mem,
                &[(0x2000, 16, false), (0x3000, 512, true), (0x4000, 1, true)],
            );
        };
        read(&mut d[0], &mut mem, 3);
        b.notify(&mut mem, kick, &mut host).unwrap();
        assert_eq!(mem.read_u8(0x4000).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(bytes(&mem, 0x3000, 512), &disk[3 * 512..4 * 512]);
        read(&mut d[0], &mut mem, 8);
        b.notify(&mut mem, kick, &mut host).unwrap();
        assert_eq!(mem.read_u8(0x4000).unwrap(), VIRTIO_BLK_S_IOERR);
        assert_eq!(b.stats().block.unwrap().errors, 1);
        assert_eq!(b.into_block_store().unwrap(), disk);
    }

    #[test]
    fn net_goes_through_the_switch() {
        let mut sw = Switch::default();
        let (p0, p1) = (sw.add_port(), sw.add_port());
        let (mut b, mut mem) = bus(BusConfig {
            console: false,
            block: None,
            net: Some(([2, 0, 0, 0, 0, 1], p0)),
        });
        let mut host = Host {
            switch: Some(sw),
            ..Host::default()
        };
        let d = start(&mut b, &mut mem, &mut host, 1);
        let (mut rx, mut tx) = (
            Driver::new(d[0].num, d[0].pfn),
            Driver::new(d[1].num, d[1].pfn),
        );
        // A broadcast goes to the other port.
        let mut frame = vec![0u8; 10 + 60];
        frame[10..16].copy_from_slice(&[0xff; 6]);
        frame[16..22].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        mem.write(0x1000, &frame).unwrap();
        tx.add(&mut mem, &[(0x1000, 70, false)]);
        b.notify(&mut mem, tx.pfn << 12, &mut host).unwrap();
        let sw = host.switch.as_mut().unwrap();
        assert_eq!(sw.pending(p1), 1);
        // A frame for this guest waits until it posts a buffer and polls.
        let mut back = frame[10..].to_vec();
        back[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        back[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        sw.input(p1, &back);
        assert_eq!(sw.pending(p0), 1);
        b.poll(&mut mem, &mut host).unwrap();
        rx.add(&mut mem, &[(0x4000, 2048, true)]);
        b.poll(&mut mem, &mut host).unwrap();
        assert_eq!(rx.take_used(&mem), Some((0, 70)));
        assert_eq!(bytes(&mem, 0x4000 + 10, 60), &back[..]);
        assert_eq!(b.stats().net.unwrap().rx_frames, 1);
    }

    #[test]
    fn misuse_is_fatal_with_a_reason() {
        let (mut b, mut mem) = bus(BusConfig {
            console: true,
            block: None,
            net: None,
        });
        let mut host = Host::default();
        let at = b.page().device_addr(0).unwrap();
        mem.write_u8(at + 4, 0x30).unwrap();
        let e = b.notify(&mut mem, at, &mut host).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device 0: bad status 0x30: unknown status bits"
        );
        let mut d = start(&mut b, &mut mem, &mut host, 0);
        d[1].set_avail_idx(&mut mem, 0x8000);
        let e = b.notify(&mut mem, d[1].pfn << 12, &mut host).unwrap_err();
        assert_eq!(e.to_string(), "guest moved avail index from 0 to 32768");
    }
}
