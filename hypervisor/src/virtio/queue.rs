//! Legacy split virtqueues as the lguest bus lays them out.
//!
//! A queue is described by `lguest_vqconfig {num, irq, pfn}`: the ring
//! starts at guest-physical `pfn << 12` and is a standard vring with
//! 4096-byte alignment of the used ring (Linux `vring_init(vr, num, p, 4096)`):
//!
//! ```text
//! desc  = pfn << 12                       num × {u64 addr, u32 len, u16 flags, u16 next}
//! avail = desc + 16·num                   u16 flags, u16 idx, u16 ring[num] (u16 used_event)
//! used  = align_up(avail + 2·(3+num), 4096)  u16 flags, u16 idx, {u32 id, u32 len}[num]
//! ```
//!
//! Everything in the ring is guest-controlled and may change while the host
//! reads it (the guest runs concurrently). The rules here:
//!
//! * **One fetch per value.** `avail.idx`, each avail entry and each
//!   16-byte descriptor are read exactly once into a host copy; every check
//!   and every later use work on that copy ([`Descriptor::parse`]).
//! * **Bounded walks.** A chain is refused when it revisits a descriptor
//!   (loop), is longer than the queue's segment limit, or its lengths sum
//!   past the queue's byte limit ([`QueueLimits`]).
//! * **Checked addresses.** Every segment `[addr, addr + len)` must lie in
//!   guest memory (`guestmem::check_range` against [`GuestMemory::limit`]);
//!   the accessor checks again on each copy.
//! * **Readable before writable.** A device-readable segment after a
//!   device-writable one is refused.
//! * **Indirect descriptors are refused** (`VRING_DESC_F_INDIRECT`): no
//!   device here offers `VIRTIO_RING_F_INDIRECT_DESC`, so a guest using them
//!   is broken or hostile. Unknown flag bits are refused too.
//! * **Index jumps.** `avail.idx` moving more than `num` past the host's
//!   position (lguest's "Guest moved used index from %u to %u") is refused.
//!
//! Every refusal is a [`QueueError`] value naming what was wrong; the
//! integrator kills the guest with its `Display` text (lguest's launcher
//! dies on the same conditions with `bad_driver_vq`). Nothing here panics.
//!
//! Interrupts: [`VirtQueue::push_used`] marks the queue as having pending
//! used buffers, and [`VirtQueue::take_interrupt`] decides whether to raise
//! the queue's irq — once per batch, and never when the guest set
//! `VRING_AVAIL_F_NO_INTERRUPT` (lguest's `trigger_irq`). Kicks:
//! [`VirtQueue::enable_notify`] / [`VirtQueue::disable_notify`] drive
//! `VRING_USED_F_NO_NOTIFY` for a service loop that sleeps when the ring is
//! empty (lguest's `wait_for_vq_desc`).

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
    LGUEST_VRING_ALIGN, LguestVqconfig, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_SIZE, VRING_USED_F_NO_NOTIFY, vring_size,
};

use crate::lguest::guestmem::{GuestMemory, MemFault, check_range};

/// Largest ring size a legacy split ring may have.
pub const MAX_QUEUE_NUM: u16 = 32768;

/// Default byte limit of one chain: 16 MiB (a block request of
/// `seg_max` page-sized segments is far below it; a chain claiming more is
/// refused before any of it is copied).
pub const DEFAULT_MAX_CHAIN_BYTES: u32 = 16 << 20;

/// What was wrong with a queue or a chain. All of these are the guest's
/// fault and fatal for it: the integrator kills the guest with the
/// `Display` text (which names the queue-relative detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The configured ring size is 0, not a power of two, or above
    /// [`MAX_QUEUE_NUM`].
    BadSize(u16),
    /// The ring (`pfn << 12`, [`vring_size`] bytes) does not fit in guest
    /// memory.
    RingOutsideMemory {
        /// The ring's page frame number.
        pfn: u32,
    },
    /// `avail.idx` moved more than `num` past the last entry the host took.
    AvailIndexJump {
        /// The host's position (next avail entry to take).
        last: u16,
        /// The index the guest published.
        idx: u16,
    },
    /// An avail entry or a `next` field names a descriptor `>= num`.
    DescriptorOutOfRange {
        /// The bad descriptor index.
        index: u16,
    },
    /// A chain visits the same descriptor twice.
    Loop {
        /// The chain's head.
        head: u16,
        /// The descriptor visited twice.
        index: u16,
    },
    /// A chain has more segments than the queue allows.
    TooManySegments {
        /// The chain's head.
        head: u16,
        /// The queue's limit.
        max: u16,
    },
    /// A chain's lengths sum past the queue's byte limit.
    ChainTooLong {
        /// The chain's head.
        head: u16,
        /// The queue's limit in bytes.
        max: u32,
    },
    /// A descriptor's buffer lies (partly) outside guest memory.
    BadAddress {
        /// The descriptor index.
        index: u16,
        /// The buffer address as the guest wrote it.
        addr: u64,
        /// The buffer length.
        len: u32,
    },
    /// A descriptor carries `VRING_DESC_F_INDIRECT` (not offered) or an
    /// unknown flag bit.
    BadFlags {
        /// The descriptor index.
        index: u16,
        /// The flags as the guest wrote them.
        flags: u16,
    },
    /// A device-readable segment follows a device-writable one.
    ReadableAfterWritable {
        /// The descriptor index.
        index: u16,
    },
    /// A used element names a head that is not a descriptor of this queue
    /// (a device bug, not the guest's; reported all the same).
    BadUsedHead(u16),
    /// A ring access failed the guest-memory bounds check.
    Mem(MemFault),
}

impl From<MemFault> for QueueError {
    fn from(f: MemFault) -> Self {
        Self::Mem(f)
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadSize(n) => write!(f, "bad virtqueue size {n}"),
            Self::RingOutsideMemory { pfn } => {
                write!(f, "virtqueue ring at pfn {pfn:#x} outside guest memory")
            }
            Self::AvailIndexJump { last, idx } => {
                write!(f, "guest moved avail index from {last} to {idx}")
            }
            Self::DescriptorOutOfRange { index } => {
                write!(f, "descriptor index {index} out of range")
            }
            Self::Loop { head, index } => {
                write!(f, "descriptor loop in chain {head} at {index}")
            }
            Self::TooManySegments { head, max } => {
                write!(f, "chain {head} has more than {max} descriptors")
            }
            Self::ChainTooLong { head, max } => {
                write!(f, "chain {head} longer than {max} bytes")
            }
            Self::BadAddress { index, addr, len } => {
                write!(
                    f,
                    "descriptor {index} address {addr:#x} len {len} outside guest memory"
                )
            }
            Self::BadFlags { index, flags } => {
                write!(f, "descriptor {index} has bad flags {flags:#x}")
            }
            Self::ReadableAfterWritable { index } => {
                write!(f, "descriptor {index}: readable after writable")
            }
            Self::BadUsedHead(h) => write!(f, "used element for bad head {h}"),
            Self::Mem(m) => write!(f, "virtqueue: {m}"),
        }
    }
}

/// One descriptor as the host copied it out of the ring (`struct vring_desc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor if `flags & VRING_DESC_F_NEXT`.
    pub next: u16,
}

impl Descriptor {
    /// Parse the 16 little-endian wire bytes (the one copy all checks use).
    pub fn parse(b: &[u8; 16]) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            l2,
            l3,
            f0,
            f1,
            n0,
            n1,
        ] = *b;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// The 16 wire bytes (what a guest driver writes).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (dst, src) in b.iter_mut().zip(
            self.addr
                .to_le_bytes()
                .into_iter()
                .chain(self.len.to_le_bytes())
                .chain(self.flags.to_le_bytes())
                .chain(self.next.to_le_bytes()),
        ) {
            *dst = src;
        }
        b
    }
}

/// One validated segment of a chain: `[addr, addr + len)` lies inside guest
/// memory (checked when the chain was taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u32,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (otherwise device-readable).
    pub writable: bool,
}

/// A validated descriptor chain taken from the avail ring.
///
/// Readable segments come first, then writable ones. Give the chain back
/// with [`VirtQueue::push_used`]`(mem, chain.head(), written)`. A `Chain`
/// can be reused across [`VirtQueue::pop_into`] calls so the hot path does
/// not allocate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    head: u16,
    segs: Vec<Segment>,
    readable_len: u32,
    writable_len: u32,
}

impl Chain {
    /// An empty chain (to pass to [`VirtQueue::pop_into`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The head descriptor index (the id of the used element).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// All segments, readable ones first.
    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }

    /// Total bytes of the device-readable segments.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes of the device-writable segments.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Copy device-readable bytes starting `offset` bytes into the readable
    /// part into `buf`; returns how many were copied (less than `buf.len()`
    /// only at the end of the readable part).
    pub fn read_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<usize, MemFault> {
        let mut skip = offset;
        let mut done = 0usize;
        for s in self.segs.iter().filter(|s| !s.writable) {
            if done >= buf.len() {
                break;
            }
            if skip >= s.len {
                skip = skip.saturating_sub(s.len);
                continue;
            }
            // `skip < s.len` and the segment is inside memory, so no wrap.
            let avail = s.len.saturating_sub(skip) as usize;
            let dst = buf.get_mut(done..).unwrap_or_default();
            let n = avail.min(dst.len());
            mem.read(
                s.addr.wrapping_add(skip),
                dst.get_mut(..n).unwrap_or_default(),
            )?;
            done = done.saturating_add(n);
            skip = 0;
        }
        Ok(done)
    }

    /// Copy `data` into the device-writable segments starting `offset` bytes
    /// into the writable part; returns how many bytes fitted.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &mut M,
        offset: u32,
        data: &[u8],
    ) -> Result<usize, MemFault> {
        let mut skip = offset;
        let mut done = 0usize;
        for s in self.segs.iter().filter(|s| s.writable) {
            if done >= data.len() {
                break;
            }
            if skip >= s.len {
                skip = skip.saturating_sub(s.len);
                continue;
            }
            let avail = s.len.saturating_sub(skip) as usize;
            let src = data.get(done..).unwrap_or_default();
            let n = avail.min(src.len());
            // `skip < s.len` and the segment is inside memory, so no wrap.
            mem.write(s.addr.wrapping_add(skip), src.get(..n).unwrap_or_default())?;
            done = done.saturating_add(n);
            skip = 0;
        }
        Ok(done)
    }

    fn clear(&mut self) {
        self.head = 0;
        self.segs.clear();
        self.readable_len = 0;
        self.writable_len = 0;
    }
}

/// Per-queue bounds on a chain walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most descriptors in one chain (at most `num`; a longer chain must
    /// loop anyway).
    pub max_segments: u16,
    /// Most bytes in one chain (readable plus writable).
    pub max_bytes: u32,
}

/// Guest-physical addresses of a ring's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table.
    pub desc: u32,
    /// Avail ring (`flags` at +0, `idx` at +2, entries from +4).
    pub avail: u32,
    /// Used ring (`flags` at +0, `idx` at +2, elements from +4).
    pub used: u32,
    /// Bytes of the whole ring ([`vring_size`] with 4096 alignment).
    pub size: u32,
}

impl RingLayout {
    /// The layout of a `num`-entry ring at `pfn << 12`, or `None` if it does
    /// not fit in 32 bits.
    pub fn new(num: u16, pfn: u32) -> Option<Self> {
        let num = u32::from(num);
        let desc = pfn.checked_mul(4096)?;
        let avail = desc.checked_add(num.checked_mul(VRING_DESC_SIZE)?)?;
        let avail_end = avail.checked_add(num.checked_add(3)?.checked_mul(2)?)?;
        let used = avail_end
            .checked_add(LGUEST_VRING_ALIGN - 1)
            .map(|v| v & !(LGUEST_VRING_ALIGN - 1))?;
        let size = vring_size(num, LGUEST_VRING_ALIGN);
        desc.checked_add(size)?;
        Some(Self {
            desc,
            avail,
            used,
            size,
        })
    }
}

/// A legacy split virtqueue on the lguest bus, seen from the host.
///
/// Holds only host state (ring addresses, the next avail entry to take, the
/// used index the host last published, pending-interrupt flag); the ring
/// itself is guest memory, passed to every call.
#[derive(Debug, Clone)]
pub struct VirtQueue {
    num: u16,
    irq: u16,
    pfn: u32,
    layout: RingLayout,
    limits: QueueLimits,
    /// Next avail entry to take (free-running, wraps at 2^16).
    last_avail: u16,
    /// The used index the host last wrote (never re-read from the guest).
    used_idx: u16,
    /// Used elements added since the last interrupt decision.
    pending_used: bool,
    /// Descriptors visited by the current walk (one bit each).
    visited: Vec<u64>,
}

impl VirtQueue {
    /// A queue for `cfg`, checked against guest memory `[0, mem_limit)`:
    /// `num` a power of two in `1..=32768`, the whole ring inside memory.
    /// Limits default to `num` segments and [`DEFAULT_MAX_CHAIN_BYTES`].
    pub fn new(cfg: LguestVqconfig, mem_limit: u32) -> Result<Self, QueueError> {
        let num = cfg.num;
        if num == 0 || !num.is_power_of_two() || num > MAX_QUEUE_NUM {
            return Err(QueueError::BadSize(num));
        }
        let outside = QueueError::RingOutsideMemory { pfn: cfg.pfn };
        let layout = RingLayout::new(num, cfg.pfn).ok_or(outside)?;
        check_range(mem_limit, layout.desc, layout.size as usize, true).map_err(|_| outside)?;
        Ok(Self {
            num,
            irq: cfg.irq,
            pfn: cfg.pfn,
            layout,
            limits: QueueLimits {
                max_segments: num,
                max_bytes: DEFAULT_MAX_CHAIN_BYTES,
            },
            last_avail: 0,
            used_idx: 0,
            pending_used: false,
            visited: vec![0; usize::from(num).div_ceil(64)],
        })
    }

    /// Tighten the chain limits (`max_segments` is clamped to `1..=num`).
    pub fn with_limits(mut self, limits: QueueLimits) -> Self {
        self.limits = QueueLimits {
            max_segments: limits.max_segments.clamp(1, self.num),
            max_bytes: limits.max_bytes,
        };
        self
    }

    /// The chain limits in force.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    /// Ring size.
    pub fn num(&self) -> u16 {
        self.num
    }

    /// The irq to raise for this queue (from its `lguest_vqconfig`).
    pub fn irq(&self) -> u16 {
        self.irq
    }

    /// The ring's page frame number (a kick is `NOTIFY(pfn << 12)`).
    pub fn pfn(&self) -> u32 {
        self.pfn
    }

    /// Where the ring's parts are.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The next avail entry the host will take (free-running).
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// The used index the host last published.
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    /// Forget all host state (device reset): the next chain is avail entry
    /// 0, the used index starts from 0. The integrator zeroes the ring
    /// memory ([`crate::virtio::devpage::DevicePage::reset`] does).
    pub fn reset(&mut self) {
        self.last_avail = 0;
        self.used_idx = 0;
        self.pending_used = false;
    }

    /// Read `avail.idx` once and check it has not jumped more than `num`
    /// past the host's position. Returns how many entries are waiting.
    fn avail_pending<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        // `avail + 2` is inside the ring, checked at construction.
        let idx = mem.read_u16(self.layout.avail.wrapping_add(2))?;
        let pending = idx.wrapping_sub(self.last_avail);
        if pending > self.num {
            return Err(QueueError::AvailIndexJump {
                last: self.last_avail,
                idx,
            });
        }
        Ok(pending)
    }

    /// Whether the guest has made buffers available that the host has not
    /// taken yet (checks the index jump too).
    pub fn has_avail<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<bool, QueueError> {
        Ok(self.avail_pending(mem)? != 0)
    }

    /// Take the next available chain, validated, into `chain` (its
    /// allocation is reused). Returns `Ok(false)` when the ring is empty.
    /// On an error the queue position does not advance, and the guest is to
    /// be killed.
    pub fn pop_into<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &mut Chain,
    ) -> Result<bool, QueueError> {
        chain.clear();
        if self.avail_pending(mem)? == 0 {
            return Ok(false);
        }
        // `num` is a power of two <= 2^15, so the mask is the ring slot, and
        // the slot's address is inside the ring (checked at construction).
        let slot = u32::from(self.last_avail & self.num.wrapping_sub(1));
        let head = mem.read_u16(
            self.layout
                .avail
                .wrapping_add(4)
                .wrapping_add(slot.wrapping_mul(2)),
        )?;
        self.walk(mem, head, chain)?;
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(true)
    }

    /// [`Self::pop_into`] with a fresh [`Chain`].
    pub fn pop<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<Option<Chain>, QueueError> {
        let mut chain = Chain::new();
        Ok(self.pop_into(mem, &mut chain)?.then_some(chain))
    }

    /// Walk the chain starting at `head` into `chain`.
    fn walk<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        chain: &mut Chain,
    ) -> Result<(), QueueError> {
        self.visited.fill(0);
        chain.head = head;
        let mut index = head;
        let mut total: u64 = 0;
        let mut seen_writable = false;
        loop {
            if index >= self.num {
                return Err(QueueError::DescriptorOutOfRange { index });
            }
            let word = usize::from(index / 64);
            let bit = 1u64 << (index % 64);
            let v = self
                .visited
                .get_mut(word)
                .ok_or(QueueError::DescriptorOutOfRange { index })?;
            if *v & bit != 0 {
                return Err(QueueError::Loop { head, index });
            }
            *v |= bit;
            if chain.segs.len() >= usize::from(self.limits.max_segments) {
                return Err(QueueError::TooManySegments {
                    head,
                    max: self.limits.max_segments,
                });
            }
            // The one fetch of this descriptor: `index < num`, so the 16
            // bytes are inside the descriptor table.
            let mut raw = [0u8; 16];
            mem.read(
                self.layout
                    .desc
                    .wrapping_add(u32::from(index).wrapping_mul(VRING_DESC_SIZE)),
                &mut raw,
            )?;
            let d = Descriptor::parse(&raw);
            let known = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
            if d.flags & !known != 0 || d.flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(QueueError::BadFlags {
                    index,
                    flags: d.flags,
                });
            }
            let writable = d.flags & VRING_DESC_F_WRITE != 0;
            if seen_writable && !writable {
                return Err(QueueError::ReadableAfterWritable { index });
            }
            seen_writable |= writable;
            let bad = QueueError::BadAddress {
                index,
                addr: d.addr,
                len: d.len,
            };
            let addr = u32::try_from(d.addr).map_err(|_| bad)?;
            check_range(mem.limit(), addr, d.len as usize, writable).map_err(|_| bad)?;
            total = total.saturating_add(u64::from(d.len));
            if total > u64::from(self.limits.max_bytes) {
                return Err(QueueError::ChainTooLong {
                    head,
                    max: self.limits.max_bytes,
                });
            }
            // Both sums are at most `total <= max_bytes: u32`.
            if writable {
                chain.writable_len = chain.writable_len.saturating_add(d.len);
            } else {
                chain.readable_len = chain.readable_len.saturating_add(d.len);
            }
            chain.segs.push(Segment {
                addr,
                len: d.len,
                writable,
            });
            if d.flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = d.next;
        }
    }

    /// Give chain `head` back to the guest with `len` bytes written: one
    /// used element, then the new `used.idx` (element first, so the guest
    /// never sees an index covering an unwritten element; x86 stores are
    /// not reordered with each other).
    pub fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if head >= self.num {
            return Err(QueueError::BadUsedHead(head));
        }
        let slot = u32::from(self.used_idx & self.num.wrapping_sub(1));
        // Inside the used ring (checked at construction): 4 + 8·slot < 6 + 8·num.
        let elem = self
            .layout
            .used
            .wrapping_add(4)
            .wrapping_add(slot.wrapping_mul(8));
        let mut b = [0u8; 8];
        for (dst, src) in b.iter_mut().zip(
            u32::from(head)
                .to_le_bytes()
                .into_iter()
                .chain(len.to_le_bytes()),
        ) {
            *dst = src;
        }
        mem.write(elem, &b)?;
        self.used_idx = self.used_idx.wrapping_add(1);
        mem.write_u16(self.layout.used.wrapping_add(2), self.used_idx)?;
        self.pending_used = true;
        Ok(())
    }

    /// Whether used buffers were added since the last call that returned
    /// `true` or consumed them (no guest memory read).
    pub fn pending_used(&self) -> bool {
        self.pending_used
    }

    /// The "need interrupt" decision: `true` if used buffers were added since
    /// the last decision and the guest has not set
    /// `VRING_AVAIL_F_NO_INTERRUPT`. Consumes the pending state either way
    /// (as lguest's `trigger_irq`), so call it once per batch — when the
    /// service loop is about to wait — and raise [`Self::irq`] on `true`.
    pub fn take_interrupt<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, QueueError> {
        if !self.pending_used {
            return Ok(false);
        }
        self.pending_used = false;
        let flags = mem.read_u16(self.layout.avail)?;
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }

    /// Ask the guest to kick again (clear `VRING_USED_F_NO_NOTIFY`), then
    /// re-check the avail ring: `Ok(true)` means buffers slipped in and the
    /// loop should not sleep (call [`Self::disable_notify`] and keep
    /// going); `Ok(false)` means sleep until the next kick.
    pub fn enable_notify<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
    ) -> Result<bool, QueueError> {
        self.write_used_flags(mem, 0)?;
        self.has_avail(mem)
    }

    /// Tell the guest not to kick (set `VRING_USED_F_NO_NOTIFY`) while the
    /// host is busy with the ring anyway.
    pub fn disable_notify<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
    ) -> Result<(), QueueError> {
        self.write_used_flags(mem, VRING_USED_F_NO_NOTIFY)
    }

    fn write_used_flags<M: GuestMemory + ?Sized>(
        &self,
        mem: &mut M,
        flags: u16,
    ) -> Result<(), QueueError> {
        mem.write_u16(self.layout.used, flags)?;
        Ok(())
    }
}

/// Drain `queue`: take every available chain into `chain` and hand it to
/// `f`, which returns the number of bytes it wrote into the chain's
/// writable part (the used length). Stops at the first error. Returns how
/// many chains were processed.
pub fn drain<M, F, E>(
    queue: &mut VirtQueue,
    mem: &mut M,
    chain: &mut Chain,
    mut f: F,
) -> Result<u32, E>
where
    M: GuestMemory + ?Sized,
    F: FnMut(&mut M, &Chain) -> Result<u32, E>,
    E: From<QueueError>,
{
    let mut n = 0u32;
    while queue.pop_into(mem, chain)? {
        let len = f(mem, chain)?;
        queue.push_used(mem, chain.head(), len)?;
        n = n.saturating_add(1);
    }
    Ok(n)
}
