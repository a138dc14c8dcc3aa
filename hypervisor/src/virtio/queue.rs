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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lguest::guestmem::VecMemory;
    use crate::virtio::testdriver::Driver;
    use alloc::string::ToString;
    use core::cell::RefCell;

    const MEM: u32 = 0x10_0000;
    const PFN: u32 = 0x80;

    fn setup(num: u16) -> (VecMemory, Driver, VirtQueue) {
        let mem = VecMemory::new(MEM);
        let drv = Driver::new(num, PFN);
        let q = drv.host_queue(&mem);
        (mem, drv, q)
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
        Descriptor {
            addr,
            len,
            flags,
            next,
        }
    }

    #[test]
    fn layout_is_vring_init_4096() {
        let l = RingLayout::new(128, PFN).unwrap();
        assert_eq!(l.desc, 0x80000);
        assert_eq!(l.avail, 0x80000 + 128 * 16);
        // 2048 + 2·131 = 2310 rounds up to the next page.
        assert_eq!(l.used, 0x81000);
        assert_eq!(l.size, 5126);
        let l = RingLayout::new(256, 1).unwrap();
        assert_eq!(l.used, 0x1000 + 0x2000);
        assert!(RingLayout::new(128, 0x10_0000).is_none());
        assert!(RingLayout::new(128, 0xF_FFFF).is_none());
    }

    #[test]
    fn bad_sizes_and_placement() {
        let cfg = |num, pfn| LguestVqconfig { num, irq: 1, pfn };
        for n in [0u16, 3, 100, 65535] {
            assert_eq!(
                VirtQueue::new(cfg(n, PFN), MEM).unwrap_err(),
                QueueError::BadSize(n)
            );
        }
        // The ring must lie entirely inside guest memory.
        let last = MEM / 4096 - 1;
        assert_eq!(
            VirtQueue::new(cfg(128, last), MEM).unwrap_err(),
            QueueError::RingOutsideMemory { pfn: last }
        );
        assert!(VirtQueue::new(cfg(128, last - 1), MEM).is_ok());
        assert!(VirtQueue::new(cfg(128, u32::MAX), MEM).is_err());
    }

    #[test]
    fn descriptor_wire_format() {
        let d = desc(0x1122_3344_5566_7788, 0x99aa_bbcc, 0x0003, 0x0102);
        let b = d.to_bytes();
        assert_eq!(b[..8], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[8..12], 0x99aa_bbccu32.to_le_bytes());
        assert_eq!(b[12..14], [3, 0]);
        assert_eq!(b[14..16], [2, 1]);
        assert_eq!(Descriptor::parse(&b), d);
    }

    #[test]
    fn pop_and_push_used() {
        let (mut mem, mut drv, mut q) = setup(8);
        assert_eq!(q.pop(&mem).unwrap(), None);
        let head = drv
            .add(
                &mut mem,
                &[(0x1000, 16, false), (0x2000, 32, true), (0x3000, 8, true)],
            )
            .unwrap();
        let c = q.pop(&mem).unwrap().unwrap();
        assert_eq!(c.head(), head);
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 40);
        assert_eq!(
            c.segments(),
            &[
                Segment {
                    addr: 0x1000,
                    len: 16,
                    writable: false
                },
                Segment {
                    addr: 0x2000,
                    len: 32,
                    writable: true
                },
                Segment {
                    addr: 0x3000,
                    len: 8,
                    writable: true
                },
            ]
        );
        assert_eq!(q.pop(&mem).unwrap(), None);
        q.push_used(&mut mem, c.head(), 40).unwrap();
        assert_eq!(drv.take_used(&mem), Some((head, 40)));
        assert_eq!(drv.take_used(&mem), None);
        assert_eq!(q.used_idx(), 1);
        assert_eq!(drv.free_count(), 8);
        assert_eq!(q.push_used(&mut mem, 8, 0), Err(QueueError::BadUsedHead(8)));
    }

    #[test]
    fn chain_copies_across_segments() {
        let (mut mem, mut drv, mut q) = setup(8);
        mem.write(0x1000, b"hello ").unwrap();
        mem.write(0x1100, b"world").unwrap();
        drv.add(
            &mut mem,
            &[
                (0x1000, 6, false),
                (0x1100, 5, false),
                (0x2000, 3, true),
                (0x2100, 4, true),
            ],
        )
        .unwrap();
        let c = q.pop(&mem).unwrap().unwrap();
        let mut buf = [0u8; 32];
        assert_eq!(c.read_at(&mem, 0, &mut buf).unwrap(), 11);
        assert_eq!(&buf[..11], b"hello world");
        assert_eq!(c.read_at(&mem, 4, &mut buf[..4]).unwrap(), 4);
        assert_eq!(&buf[..4], b"o wo");
        assert_eq!(c.read_at(&mem, 11, &mut buf).unwrap(), 0);
        assert_eq!(c.write_at(&mut mem, 1, b"abcdefgh").unwrap(), 6);
        assert_eq!(&mem.as_slice()[0x2000..0x2003], b"\0ab");
        assert_eq!(&mem.as_slice()[0x2100..0x2105], b"cdef\0");
    }

    #[test]
    fn many_chains_wrap_the_indices() {
        // 70 000 chains through a 4-entry ring: the u16 indices wrap.
        let (mut mem, mut drv, mut q) = setup(4);
        let mut chain = Chain::new();
        for i in 0..70_000u32 {
            let h = drv.add(&mut mem, &[(0x1000, i % 64, true)]).unwrap();
            assert!(q.pop_into(&mem, &mut chain).unwrap());
            assert_eq!(chain.head(), h);
            assert_eq!(chain.writable_len(), i % 64);
            q.push_used(&mut mem, h, i % 7).unwrap();
            assert_eq!(drv.take_used(&mem), Some((h, i % 7)));
        }
        assert_eq!(q.last_avail(), (70_000u32 % 65536) as u16);
        assert!(!q.pop_into(&mem, &mut chain).unwrap());
    }

    #[test]
    fn loops_are_refused() {
        let (mut mem, mut drv, mut q) = setup(8);
        // 0 -> 1 -> 2 -> 1
        drv.write_desc(&mut mem, 0, desc(0x1000, 4, VRING_DESC_F_NEXT, 1));
        drv.write_desc(&mut mem, 1, desc(0x1000, 4, VRING_DESC_F_NEXT, 2));
        drv.write_desc(&mut mem, 2, desc(0x1000, 4, VRING_DESC_F_NEXT, 1));
        drv.publish(&mut mem, 0);
        assert_eq!(
            q.pop(&mem).unwrap_err(),
            QueueError::Loop { head: 0, index: 1 }
        );
        // The position did not move: the same error again.
        assert_eq!(q.last_avail(), 0);
        assert!(q.pop(&mem).is_err());

        // A descriptor pointing at itself.
        let (mut mem, mut drv, mut q) = setup(8);
        drv.write_desc(&mut mem, 5, desc(0x1000, 4, VRING_DESC_F_NEXT, 5));
        drv.publish(&mut mem, 5);
        assert_eq!(
            q.pop(&mem).unwrap_err(),
            QueueError::Loop { head: 5, index: 5 }
        );
        assert!(q.pop(&mem).unwrap_err().to_string().contains("loop"));
    }

    #[test]
    fn loops_are_refused_even_with_a_loose_segment_limit() {
        // A full-ring loop (every descriptor once, then back to the head) is
        // caught by the visited set, not only by the length bound.
        let (mut mem, mut drv, mut q) = setup(8);
        for i in 0..8u16 {
            drv.write_desc(&mut mem, i, desc(0x1000, 1, VRING_DESC_F_NEXT, (i + 1) % 8));
        }
        drv.publish(&mut mem, 0);
        assert_eq!(
            q.pop(&mem).unwrap_err(),
            QueueError::Loop { head: 0, index: 0 }
        );
    }

    #[test]
    fn out_of_range_indices() {
        let (mut mem, mut drv, mut q) = setup(8);
        drv.publish(&mut mem, 8);
        assert_eq!(
            q.pop(&mem).unwrap_err(),
            QueueError::DescriptorOutOfRange { index: 8 }
        );
        let (mut mem, mut drv, mut q) = setup(8);
        drv.write_desc(&mut mem, 0, desc(0x1000, 4, VRING_DESC_F_NEXT, 0xffff));
        drv.publish(&mut mem, 0);
        assert_eq!(
            q.pop(&mem).unwrap_err(),
            QueueError::DescriptorOutOfRange { index: 0xffff }
        );
    }

    #[test]
    fn addresses_outside_guest_memory() {
        let cases: [(u64, u32, bool); 6] = [
            (u64::from(MEM) - 4, 8, false),
            (u64::from(MEM), 1, true),
            (u64::from(MEM) + 0x1000, 0, false),
            (0x1_0000_0000, 4, false),
            (0xffff_fff0, 0x20, true),
            (0x1000, u32::MAX, false),
        ];
        for (addr, len, w) in cases {
            let (mut mem, mut drv, mut q) = setup(8);
            let flags = if w { VRING_DESC_F_WRITE } else { 0 };
            drv.write_desc(&mut mem, 0, desc(addr, len, flags, 0));
            drv.publish(&mut mem, 0);
            assert_eq!(
                q.pop(&mem).unwrap_err(),
                QueueError::BadAddress {
                    index: 0,
                    addr,
                    len
                },
                "{addr:#x} {len}"
            );
        }
        // Right up to the end is fine, and so is an empty buffer at the end.
        let (mut mem, mut drv, mut q) = setup(8);
        drv.add(&mut mem, &[(MEM - 8, 8, false), (MEM, 0, true)])
            .unwrap();
        assert!(q.pop(&mem).unwrap().is_some());
    }

    #[test]
    fn oversized_chains() {
        let (mut mem, mut drv, q) = setup(8);
        let mut q = q.with_limits(QueueLimits {
            max_segments: 4,
            max_bytes: 100,
        });
        drv.add(&mut mem, &[(0x1000, 1, false); 5]).unwrap();
        assert_eq!(
            q.pop(&mem).unwrap_err(),
            QueueError::TooManySegments { head: 0, max: 4 }
        );
        let (mut mem, mut drv, q) = setup(8);
        let mut q = q.with_limits(QueueLimits {
            max_segments: 4,
            max_bytes: 100,
        });
        drv.add(&mut mem, &[(0x1000, 1, false); 4]).unwrap();
        assert!(q.pop(&mem).unwrap().is_some());
        drv.add(&mut mem, &[(0x1000, 60, false), (0x2000, 41, true)])
            .unwrap();
        assert!(matches!(
            q.pop(&mem).unwrap_err(),
            QueueError::ChainTooLong { max: 100, .. }
        ));
        // The default limits: num segments, 16 MiB.
        let (_, mut drv, q) = setup(8);
        assert_eq!(
            q.limits(),
            QueueLimits {
                max_segments: 8,
                max_bytes: DEFAULT_MAX_CHAIN_BYTES
            }
        );
        let mut mem = VecMemory::new(17 << 20);
        let mut q = drv.host_queue(&mem);
        drv.add(&mut mem, &[(0, 9 << 20, true), (0, 9 << 20, true)])
            .unwrap();
        assert!(matches!(
            q.pop(&mem).unwrap_err(),
            QueueError::ChainTooLong { .. }
        ));
    }

    #[test]
    fn bad_flags_and_order() {
        for flags in [VRING_DESC_F_INDIRECT, 8, 0x8000, VRING_DESC_F_INDIRECT | 2] {
            let (mut mem, mut drv, mut q) = setup(8);
            drv.write_desc(&mut mem, 0, desc(0x1000, 16, flags, 0));
            drv.publish(&mut mem, 0);
            assert_eq!(
                q.pop(&mem).unwrap_err(),
                QueueError::BadFlags { index: 0, flags }
            );
        }
        let (mut mem, mut drv, mut q) = setup(8);
        let h = drv
            .add(&mut mem, &[(0x1000, 4, true), (0x2000, 4, false)])
            .unwrap();
        assert_eq!(
            q.pop(&mem).unwrap_err(),
            QueueError::ReadableAfterWritable { index: h + 1 }
        );
    }

    #[test]
    fn avail_index_jump_is_fatal() {
        let (mut mem, mut drv, mut q) = setup(8);
        drv.set_avail_idx(&mut mem, 0x8000);
        let e = q.pop(&mem).unwrap_err();
        assert_eq!(
            e,
            QueueError::AvailIndexJump {
                last: 0,
                idx: 0x8000
            }
        );
        assert_eq!(e.to_string(), "guest moved avail index from 0 to 32768");
        assert!(q.has_avail(&mem).is_err());
        // Exactly `num` ahead is legal (a full ring), one more is not.
        let (mut mem, mut drv, mut q) = setup(8);
        for _ in 0..8 {
            drv.add(&mut mem, &[(0x1000, 1, true)]).unwrap();
        }
        assert!(q.has_avail(&mem).unwrap());
        drv.set_avail_idx(&mut mem, 9);
        assert!(matches!(
            q.pop(&mem),
            Err(QueueError::AvailIndexJump { last: 0, idx: 9 })
        ));
        // Moving backwards is a jump too (by 2^16 - 1).
        let (mut mem, mut drv, mut q) = setup(8);
        drv.add(&mut mem, &[(0x1000, 1, true)]).unwrap();
        q.pop(&mem).unwrap().unwrap();
        drv.set_avail_idx(&mut mem, 0);
        assert!(q.pop(&mem).is_err());
    }

    #[test]
    fn interrupt_decision() {
        let (mut mem, mut drv, mut q) = setup(8);
        assert!(!q.take_interrupt(&mem).unwrap());
        let h = drv.add(&mut mem, &[(0x1000, 4, true)]).unwrap();
        q.pop(&mem).unwrap();
        q.push_used(&mut mem, h, 4).unwrap();
        assert!(q.pending_used());
        assert!(q.take_interrupt(&mem).unwrap());
        // Once per batch.
        assert!(!q.take_interrupt(&mem).unwrap());
        // Suppressed by the guest: consumed but no irq.
        drv.set_avail_flags(&mut mem, VRING_AVAIL_F_NO_INTERRUPT);
        let h = drv.add(&mut mem, &[(0x1000, 4, true)]).unwrap();
        q.pop(&mem).unwrap();
        q.push_used(&mut mem, h, 4).unwrap();
        assert!(!q.take_interrupt(&mem).unwrap());
        assert!(!q.pending_used());
    }

    #[test]
    fn notify_suppression() {
        let (mut mem, mut drv, mut q) = setup(8);
        q.disable_notify(&mut mem).unwrap();
        assert_eq!(drv.used_flags(&mem), VRING_USED_F_NO_NOTIFY);
        // Empty ring: enable and sleep.
        assert!(!q.enable_notify(&mut mem).unwrap());
        assert_eq!(drv.used_flags(&mem), 0);
        // Something slipped in: don't sleep.
        drv.add(&mut mem, &[(0x1000, 4, true)]).unwrap();
        assert!(q.enable_notify(&mut mem).unwrap());
    }

    #[test]
    fn reset_starts_over() {
        let (mut mem, mut drv, mut q) = setup(8);
        let h = drv.add(&mut mem, &[(0x1000, 4, true)]).unwrap();
        q.pop(&mem).unwrap();
        q.push_used(&mut mem, h, 0).unwrap();
        q.reset();
        mem.zero(PFN << 12, q.layout().size).unwrap();
        assert_eq!(
            (q.last_avail(), q.used_idx(), q.pending_used()),
            (0, 0, false)
        );
        let mut drv = Driver::new(8, PFN);
        let h = drv.add(&mut mem, &[(0x1000, 4, true)]).unwrap();
        assert_eq!(q.pop(&mem).unwrap().unwrap().head(), h);
    }

    /// Guest memory that records every read and, like a racing guest,
    /// rewrites each descriptor to point outside memory right after the
    /// host read it.
    struct Racing {
        inner: RefCell<VecMemory>,
        reads: RefCell<Vec<(u32, usize)>>,
        desc: Range<u32>,
    }

    use core::ops::Range;

    impl GuestMemory for Racing {
        fn limit(&self) -> u32 {
            self.inner.borrow().limit()
        }
        fn read(&self, gpa: u32, buf: &mut [u8]) -> Result<(), MemFault> {
            self.inner.borrow().read(gpa, buf)?;
            self.reads.borrow_mut().push((gpa, buf.len()));
            if self.desc.contains(&gpa) {
                let mut m = self.inner.borrow_mut();
                m.write_u64(gpa, 0xffff_0000).unwrap();
                m.write_u32(gpa + 8, 0x7fff_ffff).unwrap();
            }
            Ok(())
        }
        fn write(&mut self, gpa: u32, data: &[u8]) -> Result<(), MemFault> {
            self.inner.get_mut().write(gpa, data)
        }
    }

    #[test]
    fn each_descriptor_is_fetched_once() {
        let mut vm = VecMemory::new(MEM);
        let mut drv = Driver::new(8, PFN);
        let h = drv
            .add(
                &mut vm,
                &[(0x1000, 16, false), (0x2000, 16, false), (0x3000, 64, true)],
            )
            .unwrap();
        let l = drv.layout;
        let mut q = drv.host_queue(&vm);
        let mem = Racing {
            inner: RefCell::new(vm),
            reads: RefCell::new(Vec::new()),
            desc: l.desc..l.desc + 8 * 16,
        };
        let c = q.pop(&mem).unwrap().unwrap();
        // The chain holds what was read first, not the rewritten values.
        assert_eq!(c.head(), h);
        assert_eq!(c.readable_len(), 32);
        assert_eq!(c.writable_len(), 64);
        assert_eq!(c.segments()[2].addr, 0x3000);
        let reads = mem.reads.borrow();
        let desc_reads: Vec<_> = reads.iter().filter(|r| mem.desc.contains(&r.0)).collect();
        assert_eq!(desc_reads.len(), 3);
        for (i, r) in desc_reads.iter().enumerate() {
            assert_eq!(r.1, 16);
            assert_eq!(reads.iter().filter(|x| x.0 == r.0).count(), 1, "desc {i}");
        }
        // avail.idx and the avail entry: one read each.
        assert_eq!(reads.iter().filter(|x| x.0 == l.avail + 2).count(), 1);
        assert_eq!(reads.iter().filter(|x| x.0 == l.avail + 4).count(), 1);
    }

    #[test]
    fn drain_helper() {
        let (mut mem, mut drv, mut q) = setup(8);
        for i in 0..5u32 {
            drv.add(&mut mem, &[(0x1000 + i * 16, 16, true)]).unwrap();
        }
        let mut chain = Chain::new();
        let n = drain::<_, _, QueueError>(&mut q, &mut mem, &mut chain, |m, c| {
            let w = c.write_at(m, 0, &[0xAB; 16])?;
            Ok(w as u32)
        })
        .unwrap();
        assert_eq!(n, 5);
        for _ in 0..5 {
            assert_eq!(drv.take_used(&mem).unwrap().1, 16);
        }
        assert!(mem.as_slice()[0x1000..0x1050].iter().all(|&b| b == 0xAB));
    }
}
