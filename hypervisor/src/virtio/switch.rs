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
