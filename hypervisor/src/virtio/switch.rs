//! A learning Ethernet (L2) switch between any number of ports, each port
//! normally a guest's [`Net`] device. No host OS is involved: frames are
//! copied from one guest's transmit buffers into the switch and from there
//! into other guests' receive buffers.
//!
//! Forwarding ([`Switch::input`]):
//!
//! * the source MAC of every frame is learned for its input port (unicast
//!   sources only; at most `max_macs` addresses — when the table is full,
//!   new addresses are not learned and frames to them are flooded);
//! * a frame to a learned unicast MAC goes to that port only;
//! * broadcast, multicast and unknown unicast frames go to every other
//!   port;
//! * a frame is **never** sent back to the port it came from (a frame to a
//!   MAC learned on its own input port is dropped).
//!
//! Each port has a bounded queue of frames waiting for receive buffers
//! (`max_pending`); a frame arriving at a full queue is dropped and
//! counted, as a real switch does. Frame buffers are recycled through a
//! small pool, so steady-state forwarding does not allocate.
//!
//! Glue: [`Switch::pump_tx`] moves a port's transmitted frames in,
//! [`Switch::pump_rx`] delivers its waiting frames. The kernel calls
//! `pump_tx` on the sender's kick and `pump_rx` for every port that
//! [`Switch::input`] reported (and on each receiver's rx kick, when the
//! guest posted new buffers).

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use super::DeviceError;
use super::net::{Delivery, MIN_FRAME, Mac, Net};
use crate::lguest::guestmem::GuestMemory;

/// A port number.
pub type PortId = usize;

/// Default bound of frames waiting per port.
pub const DEFAULT_MAX_PENDING: usize = 256;
/// Default bound of learned MAC addresses.
pub const DEFAULT_MAX_MACS: usize = 1024;
/// Most spare frame buffers kept for reuse.
const POOL_MAX: usize = 512;

/// Where [`Switch::input`] sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    /// Nowhere (too short, no such port, only its own port, or every
    /// target queue full).
    None,
    /// To one learned port.
    One(PortId),
    /// To every other port (broadcast, multicast or unknown); `queued` of
    /// them had room.
    Flood {
        /// Ports the frame was queued on.
        queued: usize,
    },
}

/// Per-port counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received from this port.
    pub input: u64,
    /// Frames delivered to this port's device.
    pub output: u64,
    /// Frames for this port dropped because its queue was full (or the
    /// device dropped them).
    pub dropped: u64,
    /// Frames from this port dropped because they were addressed back to
    /// it or too short.
    pub filtered: u64,
}

#[derive(Debug, Clone, Default)]
struct Port {
    pending: VecDeque<Vec<u8>>,
    stats: PortStats,
}

/// The switch.
#[derive(Debug, Clone)]
pub struct Switch {
    ports: Vec<Option<Port>>,
    table: BTreeMap<Mac, PortId>,
    max_pending: usize,
    max_macs: usize,
    pool: Vec<Vec<u8>>,
}

impl Default for Switch {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PENDING, DEFAULT_MAX_MACS)
    }
}

fn is_unicast(mac: &Mac) -> bool {
    mac.first().is_some_and(|b| b & 1 == 0)
}

fn mac_at(frame: &[u8], at: usize) -> Option<Mac> {
    let s = frame.get(at..at.checked_add(6)?)?;
    let mut m = [0u8; 6];
    m.copy_from_slice(s);
    Some(m)
}

impl Switch {
    /// A switch keeping at most `max_pending` frames per port and learning
    /// at most `max_macs` addresses.
    pub fn new(max_pending: usize, max_macs: usize) -> Self {
        Self {
            ports: Vec::new(),
            table: BTreeMap::new(),
            max_pending,
            max_macs,
            pool: Vec::new(),
        }
    }

    /// Add a port (a free slot is reused).
    pub fn add_port(&mut self) -> PortId {
        if let Some(i) = self.ports.iter().position(Option::is_none) {
            if let Some(slot) = self.ports.get_mut(i) {
                *slot = Some(Port::default());
            }
            return i;
        }
        self.ports.push(Some(Port::default()));
        self.ports.len().saturating_sub(1)
    }

    /// Remove a port (its guest died): its waiting frames are dropped and
    /// its learned addresses forgotten.
    pub fn remove_port(&mut self, p: PortId) {
        if let Some(port) = self.ports.get_mut(p).and_then(Option::take) {
            self.pool.extend(port.pending);
            self.pool.truncate(POOL_MAX);
        }
        self.table.retain(|_, q| *q != p);
    }

    /// Counters of port `p`.
    pub fn stats(&self, p: PortId) -> Option<PortStats> {
        Some(self.ports.get(p)?.as_ref()?.stats)
    }

    /// Frames waiting for port `p`.
    pub fn pending(&self, p: PortId) -> usize {
        self.ports
            .get(p)
            .and_then(Option::as_ref)
            .map_or(0, |port| port.pending.len())
    }

    /// The port `mac` was learned on.
    pub fn lookup(&self, mac: &Mac) -> Option<PortId> {
        self.table.get(mac).copied()
    }

    /// Queue a copy of `frame` for port `p`; `false` if its queue is full.
    fn enqueue(&mut self, p: PortId, frame: &[u8]) -> bool {
        let max = self.max_pending;
        let mut buf = self.pool.pop().unwrap_or_default();
        let Some(port) = self.ports.get_mut(p).and_then(Option::as_mut) else {
            self.pool.push(buf);
            return false;
        };
        if port.pending.len() >= max {
            port.stats.dropped = port.stats.dropped.saturating_add(1);
            self.pool.push(buf);
            return false;
        }
        buf.clear();
        buf.extend_from_slice(frame);
        port.pending.push_back(buf);
        true
    }

    /// A frame arrived from port `src`: learn, then queue it for its
    /// destination(s) (module docs). Returns where it went.
    pub fn input(&mut self, src: PortId, frame: &[u8]) -> Targets {
        let Some(port) = self.ports.get_mut(src).and_then(Option::as_mut) else {
            return Targets::None;
        };
        port.stats.input = port.stats.input.saturating_add(1);
        let (Some(dst), Some(from)) = (mac_at(frame, 0), mac_at(frame, 6)) else {
            port.stats.filtered = port.stats.filtered.saturating_add(1);
            return Targets::None;
        };
        if frame.len() < MIN_FRAME {
            port.stats.filtered = port.stats.filtered.saturating_add(1);
            return Targets::None;
        }
        if is_unicast(&from) && (self.table.len() < self.max_macs || self.table.contains_key(&from))
        {
            self.table.insert(from, src);
        }
        if let Some(&to) = self.table.get(&dst).filter(|_| is_unicast(&dst)) {
            if to == src {
                if let Some(port) = self.ports.get_mut(src).and_then(Option::as_mut) {
                    port.stats.filtered = port.stats.filtered.saturating_add(1);
                }
                return Targets::None;
            }
            return if self.enqueue(to, frame) {
                Targets::One(to)
            } else {
                Targets::None
            };
        }
        let mut queued = 0usize;
        for p in 0..self.ports.len() {
            if p != src && self.ports.get(p).is_some_and(Option::is_some) && self.enqueue(p, frame)
            {
                queued = queued.saturating_add(1);
            }
        }
        if queued == 0 {
            Targets::None
        } else {
            Targets::Flood { queued }
        }
    }

    /// Take the next frame waiting for port `p` (give the buffer back with
    /// [`Self::recycle`] when done).
    pub fn take(&mut self, p: PortId) -> Option<Vec<u8>> {
        let port = self.ports.get_mut(p)?.as_mut()?;
        let f = port.pending.pop_front()?;
        port.stats.output = port.stats.output.saturating_add(1);
        Some(f)
    }

    /// Return a frame buffer to the pool.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(buf);
        }
    }

    /// Move every frame port `p`'s guest transmitted into the switch.
    /// `scratch` is a reusable buffer. Returns the number of frames.
    pub fn pump_tx<M: GuestMemory + ?Sized>(
        &mut self,
        p: PortId,
        net: &mut Net,
        mem: &mut M,
        scratch: &mut Vec<u8>,
    ) -> Result<u32, DeviceError> {
        let mut n = 0u32;
        while net.pop_tx(mem, scratch)? {
            self.input(p, scratch);
            n = n.saturating_add(1);
        }
        Ok(n)
    }

    /// Deliver frames waiting for port `p` into its guest's receive buffers
    /// while there are buffers. Returns the number delivered.
    pub fn pump_rx<M: GuestMemory + ?Sized>(
        &mut self,
        p: PortId,
        net: &mut Net,
        mem: &mut M,
    ) -> Result<u32, DeviceError> {
        let mut n = 0u32;
        loop {
            let Some(port) = self.ports.get_mut(p).and_then(Option::as_mut) else {
                return Ok(n);
            };
            let Some(front) = port.pending.front() else {
                return Ok(n);
            };
            match net.deliver(mem, front)? {
                Delivery::NoBuffer => return Ok(n),
                Delivery::Delivered => {
                    port.stats.output = port.stats.output.saturating_add(1);
                    n = n.saturating_add(1);
                }
                Delivery::Dropped => {
                    port.stats.dropped = port.stats.dropped.saturating_add(1);
                }
            }
            if let Some(buf) = port.pending.pop_front() {
                self.recycle(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use crate::testutil::Rng;
    use crate::virtio::net::{MAX_FRAME, RX, TX};
    use crate::virtio::testdriver::{Driver, bring_up};
    use crate::virtio::{VirtioDevice, interrupts};
    use guest_abi::device::VIRTIO_NET_HDR_SIZE;
    use std::collections::HashMap;

    const BCAST: Mac = [0xff; 6];

    fn mac(n: u8) -> Mac {
        [0x52, 0x54, 0, 0, 0, n]
    }

    fn frame(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn learning_unicast_and_flooding() {
        let mut sw = Switch::default();
        let (a, b, c) = (sw.add_port(), sw.add_port(), sw.add_port());
        // Unknown destination: flooded to every other port.
        assert_eq!(
            sw.input(a, &frame(mac(2), mac(1), b"x")),
            Targets::Flood { queued: 2 }
        );
        assert_eq!((sw.pending(a), sw.pending(b), sw.pending(c)), (0, 1, 1));
        assert_eq!(sw.lookup(&mac(1)), Some(a));
        // The answer goes to `a` only.
        assert_eq!(sw.input(b, &frame(mac(1), mac(2), b"y")), Targets::One(a));
        assert_eq!(sw.pending(a), 1);
        assert_eq!(sw.pending(c), 1);
        // Now both are known: b -> a and a -> b are unicast.
        assert_eq!(sw.input(a, &frame(mac(2), mac(1), b"z")), Targets::One(b));
        assert_eq!(sw.take(b).unwrap(), frame(mac(2), mac(1), b"x"));
        assert_eq!(sw.take(b).unwrap(), frame(mac(2), mac(1), b"z"));
        assert_eq!(sw.take(b), None);
        // Broadcast: every other port, never the source.
        assert_eq!(
            sw.input(c, &frame(BCAST, mac(3), b"all")),
            Targets::Flood { queued: 2 }
        );
        assert_eq!(sw.pending(c), 1); // only the first flood
        assert_eq!(sw.take(a).unwrap(), frame(mac(1), mac(2), b"y"));
        assert_eq!(sw.take(a).unwrap(), frame(BCAST, mac(3), b"all"));
        assert_eq!(sw.take(b).unwrap(), frame(BCAST, mac(3), b"all"));
        // Multicast sources are not learned.
        sw.input(c, &frame(BCAST, [0x01, 0, 0x5e, 0, 0, 1], b""));
        assert_eq!(sw.lookup(&[0x01, 0, 0x5e, 0, 0, 1]), None);
    }

    #[test]
    fn never_back_to_the_source() {
        let mut sw = Switch::default();
        let (a, b) = (sw.add_port(), sw.add_port());
        sw.input(a, &frame(BCAST, mac(1), b""));
        sw.input(a, &frame(BCAST, mac(11), b""));
        sw.take(b);
        sw.take(b);
        // mac(11) lives on port a; a frame from a to it is not reflected.
        assert_eq!(sw.input(a, &frame(mac(11), mac(1), b"")), Targets::None);
        assert_eq!((sw.pending(a), sw.pending(b)), (0, 0));
        assert_eq!(sw.stats(a).unwrap().filtered, 1);
        // A port alone on the switch floods to nobody.
        let mut sw = Switch::default();
        let a = sw.add_port();
        assert_eq!(sw.input(a, &frame(BCAST, mac(1), b"")), Targets::None);
        assert_eq!(sw.pending(a), 0);
    }

    #[test]
    fn moves_removal_bounds_and_junk() {
        let mut sw = Switch::new(2, 2);
        let (a, b, c) = (sw.add_port(), sw.add_port(), sw.add_port());
        sw.input(a, &frame(BCAST, mac(1), b""));
        // mac(1) moves to c.
        sw.input(c, &frame(BCAST, mac(1), b""));
        assert_eq!(sw.lookup(&mac(1)), Some(c));
        // Table full (2 entries): mac(3) is not learned, frames to it flood.
        sw.input(b, &frame(BCAST, mac(2), b""));
        sw.input(b, &frame(BCAST, mac(3), b""));
        assert_eq!(sw.lookup(&mac(3)), None);
        // Pending bound: a has 2 frames queued already; the rest drop.
        assert_eq!(sw.pending(a), 2);
        assert_eq!(sw.stats(a).unwrap().dropped, 1);
        // Removal forgets the port's addresses and frames.
        sw.remove_port(c);
        assert_eq!(sw.lookup(&mac(1)), None);
        assert_eq!(sw.pending(c), 0);
        assert_eq!(sw.input(c, &frame(BCAST, mac(9), b"")), Targets::None);
        // Its slot is reused.
        assert_eq!(sw.add_port(), c);
        // Too short to be Ethernet.
        assert_eq!(sw.input(a, &[0xff; 13]), Targets::None);
        assert_eq!(sw.input(9, &frame(BCAST, mac(1), b"")), Targets::None);
    }

    /// A guest with a net device and a simple driver for it.
    struct Guest {
        net: Net,
        mem: VecMemory,
        rx: Driver,
        tx: Driver,
        rx_buf: HashMap<u16, u32>,
        tx_buf: HashMap<u16, u32>,
        free_tx: Vec<u32>,
        port: PortId,
    }

    const RX_BASE: u32 = 0x2_0000;
    const TX_BASE: u32 = 0x6_0000;
    const BUF: u32 = 2048;

    impl Guest {
        fn new(n: u8, sw: &mut Switch) -> Self {
            let mut net = Net::new(mac(n));
            let (mem, _, mut drv) = bring_up(&mut net);
            let tx = drv.pop().unwrap();
            let rx = drv.pop().unwrap();
            let mut g = Self {
                net,
                mem,
                rx,
                tx,
                rx_buf: HashMap::new(),
                tx_buf: HashMap::new(),
                free_tx: (0..64).map(|i| TX_BASE + i * BUF).collect(),
                port: sw.add_port(),
            };
            for i in 0..64 {
                g.post_rx(RX_BASE + i * BUF);
            }
            g
        }
        fn post_rx(&mut self, addr: u32) {
            let hdr = VIRTIO_NET_HDR_SIZE;
            let h = self
                .rx
                .add(
                    &mut self.mem,
                    &[(addr, hdr, true), (addr + hdr, MAX_FRAME as u32, true)],
                )
                .unwrap();
            self.rx_buf.insert(h, addr);
        }
        /// Queue a frame for transmission; false if no buffer is free.
        fn send(&mut self, f: &[u8]) -> bool {
            while let Some((h, _)) = self.tx.take_used(&self.mem) {
                self.free_tx.push(self.tx_buf.remove(&h).unwrap());
            }
            let Some(addr) = self.free_tx.pop() else {
                return false;
            };
            self.mem.write(addr, &[0; 10]).unwrap();
            self.mem.write(addr + 10, f).unwrap();
            let h = self
                .tx
                .add(
                    &mut self.mem,
                    &[(addr, 10, false), (addr + 10, f.len() as u32, false)],
                )
                .unwrap();
            self.tx_buf.insert(h, addr);
            true
        }
        /// Take received frames (and repost their buffers).
        fn recv(&mut self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            while let Some((h, len)) = self.rx.take_used(&self.mem) {
                let addr = self.rx_buf.remove(&h).unwrap();
                assert!(len >= VIRTIO_NET_HDR_SIZE);
                assert_eq!(self.mem.read_u16(addr).unwrap(), 0);
                let start = (addr + VIRTIO_NET_HDR_SIZE) as usize;
                out.push(self.mem.as_slice()[start..addr as usize + len as usize].to_vec());
                self.post_rx(addr);
            }
            out
        }
        /// The kernel's work on a tx kick.
        fn kick_tx(&mut self, sw: &mut Switch, scratch: &mut Vec<u8>) -> u32 {
            sw.pump_tx(self.port, &mut self.net, &mut self.mem, scratch)
                .unwrap()
        }
        /// The kernel's work for pending frames / an rx kick.
        fn kick_rx(&mut self, sw: &mut Switch) -> u32 {
            sw.pump_rx(self.port, &mut self.net, &mut self.mem).unwrap()
        }
    }

    fn fnv(b: &[u8]) -> u32 {
        b.iter().fold(0x811c_9dc5u32, |h, &x| {
            (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
        })
    }

    /// Frame number `seq` from `src` to `dst`: random length and payload,
    /// sequence number, FNV checksum at the end.
    fn test_frame(dst: Mac, src: Mac, seq: u32) -> Vec<u8> {
        let mut rng = Rng(u64::from(seq) * 0x9E37_79B9 + 1);
        let len = 46 + (rng.next_u64() % (MAX_FRAME as u64 - 14 - 46 - 8 + 1)) as usize;
        let mut payload = seq.to_le_bytes().to_vec();
        payload.extend((0..len).map(|_| rng.next_u64() as u8));
        let mut f = frame(dst, src, &payload);
        let sum = fnv(&f);
        f.extend_from_slice(&sum.to_le_bytes());
        assert!(f.len() <= MAX_FRAME);
        f
    }

    fn check_frame(f: &[u8], dst: Mac, src: Mac, want_seq: u32) {
        let (body, sum) = f.split_at(f.len() - 4);
        assert_eq!(fnv(body).to_le_bytes(), sum, "checksum of frame {want_seq}");
        assert_eq!(&f[6..12], &src);
        let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
        assert_eq!(seq, want_seq, "frames lost or reordered");
        assert_eq!(f, test_frame(dst, src, seq), "frame {seq} corrupted");
    }

    #[test]
    fn ten_thousand_frames_each_way_none_lost() {
        const N: u32 = 10_000;
        let mut sw = Switch::default();
        let mut g = [Guest::new(1, &mut sw), Guest::new(2, &mut sw)];
        let mut scratch = Vec::new();
        let mut sent = [0u32; 2];
        let mut got = [0u32; 2];
        let mut rounds = 0;
        while got != [N, N] {
            rounds += 1;
            assert!(rounds < 10 * N, "no progress");
            for i in 0..2 {
                let (me, peer) = (mac(i as u8 + 1), mac(2 - i as u8));
                // The guest sends what it has buffers for, then kicks.
                while sent[i] < N && g[i].send(&test_frame(peer, me, sent[i])) {
                    sent[i] += 1;
                }
                g[i].kick_tx(&mut sw, &mut scratch);
            }
            for i in 0..2 {
                // The kernel delivers; the guest takes and reposts.
                g[i].kick_rx(&mut sw);
                let (me, peer) = (mac(i as u8 + 1), mac(2 - i as u8));
                for f in g[i].recv() {
                    check_frame(&f, me, peer, got[i]);
                    got[i] += 1;
                }
                // Reposted buffers: deliver what waited for them.
                g[i].kick_rx(&mut sw);
            }
        }
        for guest in &g {
            let s = guest.net.stats();
            assert_eq!((s.tx_frames, s.rx_frames), (u64::from(N), u64::from(N)));
            assert_eq!((s.tx_dropped, s.rx_dropped), (0, 0));
            let p = sw.stats(guest.port).unwrap();
            assert_eq!((p.dropped, p.filtered), (0, 0));
            assert_eq!(sw.pending(guest.port), 0);
        }
        // Both learned.
        assert_eq!(sw.lookup(&mac(1)), Some(g[0].port));
        assert_eq!(sw.lookup(&mac(2)), Some(g[1].port));
    }

    #[test]
    fn broadcast_reaches_every_other_guest() {
        let mut sw = Switch::default();
        let mut g: Vec<Guest> = (1..=4).map(|n| Guest::new(n, &mut sw)).collect();
        let mut scratch = Vec::new();
        let f = frame(BCAST, mac(3), b"hello everyone, this is guest three....");
        assert!(g[2].send(&f));
        assert_eq!(g[2].kick_tx(&mut sw, &mut scratch), 1);
        for (i, guest) in g.iter_mut().enumerate() {
            guest.kick_rx(&mut sw);
            let got = guest.recv();
            if i == 2 {
                assert!(got.is_empty(), "broadcast sent back to its source");
            } else {
                assert_eq!(got, core::slice::from_ref(&f));
                // The rx queue (irq 1) wants an interrupt.
                assert_eq!(interrupts(&mut guest.net, &guest.mem).unwrap(), [1]);
            }
        }
        // The sender gets its tx interrupt (irq 2).
        let s = &mut g[2];
        assert_eq!(interrupts(&mut s.net, &s.mem).unwrap(), [2]);
    }

    #[test]
    fn frames_wait_for_receive_buffers() {
        let mut sw = Switch::default();
        let mut a = Guest::new(1, &mut sw);
        let mut b = Guest::new(2, &mut sw);
        let mut scratch = Vec::new();
        // b has 64 buffers; send 70 frames.
        for seq in 0..70 {
            if !a.send(&test_frame(mac(2), mac(1), seq)) {
                a.kick_tx(&mut sw, &mut scratch);
                assert!(a.send(&test_frame(mac(2), mac(1), seq)));
            }
        }
        a.kick_tx(&mut sw, &mut scratch);
        assert_eq!(b.kick_rx(&mut sw), 64);
        assert_eq!(sw.pending(b.port), 6);
        assert_eq!(b.kick_rx(&mut sw), 0);
        let got = b.recv();
        assert_eq!(got.len(), 64);
        assert_eq!(b.kick_rx(&mut sw), 6);
        let got2 = b.recv();
        for (i, f) in got.iter().chain(&got2).enumerate() {
            check_frame(f, mac(2), mac(1), i as u32);
        }
    }

    #[test]
    fn net_device_edges() {
        let mut g = Guest::new(1, &mut Switch::default());
        assert_eq!(g.net.config(), mac(1));
        let mut scratch = Vec::new();
        // Too short and too long frames are dropped on transmit.
        assert!(g.send(&[0u8; 13]));
        assert!(g.send(&vec![0u8; MAX_FRAME + 1]));
        assert!(!g.net.pop_tx(&mut g.mem, &mut scratch).unwrap());
        assert_eq!(g.net.stats().tx_dropped, 2);
        // A too-small receive buffer: the frame is dropped, buffer returned.
        let mut net = Net::new(mac(5));
        let (mut mem, _, mut drv) = bring_up(&mut net);
        let f = frame(BCAST, mac(1), &[0; 100]);
        assert_eq!(net.deliver(&mut mem, &f).unwrap(), Delivery::NoBuffer);
        let h = drv[RX].add(&mut mem, &[(0x1000, 64, true)]).unwrap();
        assert_eq!(net.deliver(&mut mem, &f).unwrap(), Delivery::Dropped);
        assert_eq!(drv[RX].take_used(&mem), Some((h, 0)));
        assert_eq!(net.stats().rx_dropped, 1);
        // Before activation nothing moves.
        let mut idle = Net::new(mac(6));
        assert_eq!(idle.deliver(&mut mem, &f).unwrap(), Delivery::NoBuffer);
        assert!(!idle.pop_tx(&mut mem, &mut scratch).unwrap());
        assert!(!idle.rx_ready(&mem).unwrap());
        let _ = TX;
    }
}
