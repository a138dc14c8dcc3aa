//! `netpeer=a|b|listen`: guests talking to each other over the host's
//! learning switch (the module line also needs `net`).
//!
//! A small protocol on EtherType `0x88b5` (local experimental). Every frame
//! carries a 16-byte header after the Ethernet header: kind (1 byte, 3
//! spare), sequence number (u32), data length (u16, 2 spare), FNV-1a of the
//! data (u32); then the data.
//!
//! * **b** broadcasts `HELLO` every 20 ms until `a` answers with a unicast
//!   `HELLO_ACK` (so it does not matter which guest starts first: a frame
//!   sent before the other's port exists is simply repeated).
//! * **a** learns b's MAC from the first `HELLO`, answers, then sends
//!   `count=N` (10,000) numbered `DATA` frames to b, each with a payload of
//!   `1 + seq * 97 % 1400` bytes of [`pattern_byte`], never more than
//!   `window=W` ([`WINDOW`], at most [`MAX_WINDOW`]) not yet acknowledged:
//!   flow control, so the switch's per-port queue (256 frames) cannot
//!   overflow, and a lost frame is an error, never a retransmission. b keeps
//!   `rxbufs=N` ([`MAX_RX_BUFS`]) receive buffers posted; with fewer than
//!   the window, frames wait on b's switch port until b posts buffers again.
//! * **b** checks every frame as it arrives: in sequence, the length the
//!   sequence number implies, the checksum and every data byte; after each
//!   batch it sends one cumulative `ACK` (the next sequence number it
//!   expects).
//! * **listen** broadcasts `JOIN` every 20 ms until it receives the
//!   broadcast.
//! * Once every frame is acknowledged and it has heard `listeners=N` (0)
//!   different listeners, **a** broadcasts `BCAST`; b and every listener
//!   must receive it (the switch floods it to every port but a's).
//!
//! Each side prints one `PASS`/`FAIL` per property (a few `FAIL` details
//! at most), and `a` the time the transfer took. A side that makes no
//! progress for [`STALL_NS`] reports `FAIL` with where it stopped instead
//! of hanging.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering, compiler_fence};

use lguest_rt::guest_abi::device::{VIRTIO_ID_NET, VIRTIO_NET_HDR_SIZE};
use lguest_rt::guest_abi::testdata::{FNV_OFFSET, fnv1a, pattern_byte};
use lguest_rt::hcall::{self, phys};
use lguest_rt::trap::set_irq_handler;
use lguest_rt::virtio::{self, Bus};
use lguest_rt::{BootInfo, TrapFrame, check, check_eq, irq, println};

/// Frames a may send ahead of b's acknowledgement.
pub const WINDOW: u32 = 32;
/// The largest window: transmit slots (each frame takes 2 of the 128
/// descriptors of the transmit ring).
pub const MAX_WINDOW: u32 = 64;
/// Receive buffers a guest keeps posted, at most (the default).
pub const MAX_RX_BUFS: usize = 64;
/// Bytes per buffer (virtio header + the largest frame).
const BUF: usize = 1536;
/// No progress for this long is a failure.
const STALL_NS: u64 = 20_000_000_000;
/// How often b repeats `HELLO` and a listener `JOIN`.
const REPEAT_NS: u32 = 20_000_000;

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const ETH: usize = 14;
const HDR: usize = 16;
const BROADCAST: [u8; 6] = [0xff; 6];

const HELLO: u8 = 1;
const HELLO_ACK: u8 = 2;
const DATA: u8 = 3;
const ACK: u8 = 4;
const JOIN: u8 = 5;
const BCAST: u8 = 6;

/// The data of the broadcast.
const BCAST_TEXT: &[u8] = b"netpeer: a broadcast for every guest";

/// Most `FAIL` details printed per guest.
const MAX_DETAILS: u32 = 5;

/// Page-aligned frame buffers the host reads and writes (only through raw
/// pointers, between a post and its used element).
#[repr(C, align(4096))]
struct Buffers<const N: usize>(UnsafeCell<[[u8; BUF]; N]>);

// SAFETY: one virtual CPU and no handler touches the buffers: every access
// is from the main flow, through raw pointers.
unsafe impl<const N: usize> Sync for Buffers<N> {}

impl<const N: usize> Buffers<N> {
    const fn new() -> Self {
        Self(UnsafeCell::new([[0; BUF]; N]))
    }

    fn ptr(&self, i: usize) -> *mut u8 {
        // `i % N` keeps the pointer inside the array.
        self.0.get().cast::<u8>().wrapping_add((i % N) * BUF)
    }
}

static RX: Buffers<MAX_RX_BUFS> = Buffers::new();
static TX: Buffers<{ MAX_WINDOW as usize }> = Buffers::new();
/// The zeroed virtio header every transmitted frame starts with.
static TX_HDR: [u8; VIRTIO_NET_HDR_SIZE as usize] = [0; VIRTIO_NET_HDR_SIZE as usize];

static TICKS: AtomicU32 = AtomicU32::new(0);

fn on_tick(_: &mut TrapFrame) {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

fn on_queue_irq(_: &mut TrapFrame) {}

/// The data length of frame `seq`.
fn data_len(seq: u32) -> usize {
    1 + (seq as usize * 97) % 1400
}

/// Data byte `i` of frame `seq`.
fn data_byte(seq: u32, i: usize) -> u8 {
    pattern_byte(u64::from(seq) * 4096 + i as u64)
}

/// A frame received: its kind, source, sequence number and data (checked
/// for its stated length and checksum).
struct Frame<'a> {
    kind: u8,
    src: [u8; 6],
    seq: u32,
    data: &'a [u8],
    /// The stated length and checksum match the data.
    intact: bool,
}

fn parse(frame: &[u8]) -> Option<Frame<'_>> {
    if frame.len() < ETH + HDR || frame[12..14] != ETHERTYPE {
        return None;
    }
    let h = &frame[ETH..ETH + HDR];
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    let seq = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let len = usize::from(u16::from_le_bytes([h[8], h[9]]));
    let sum = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let data = &frame[ETH + HDR..];
    Some(Frame {
        kind: h[0],
        src,
        seq,
        data,
        intact: data.len() == len && fnv1a(FNV_OFFSET, data) == sum,
    })
}

/// Write a frame into `buf`; returns its length.
fn build(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], kind: u8, seq: u32, data: &[u8]) -> usize {
    let len = ETH + HDR + data.len();
    buf[..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&ETHERTYPE);
    let h = &mut buf[ETH..ETH + HDR];
    h.fill(0);
    h[0] = kind;
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..10].copy_from_slice(&(data.len() as u16).to_le_bytes());
    h[12..16].copy_from_slice(&fnv1a(FNV_OFFSET, data).to_le_bytes());
    buf[ETH + HDR..len].copy_from_slice(data);
    len
}

/// The network device with its receive buffers posted.
struct Nic {
    net: virtio::Net,
    mac: [u8; 6],
    /// Which receive buffer each descriptor head holds.
    rx_slot: [u8; 256],
    /// Receive buffers taken back and not yet posted again.
    repost: [u8; MAX_RX_BUFS],
    reposts: usize,
    /// Frames a transmit batch holds, not yet kicked.
    tx_queued: u32,
    /// Frames whose transmit the host did not complete.
    tx_lost: u32,
}

impl Nic {
    fn new(bus: &Bus, rx_bufs: usize) -> Option<Self> {
        let dev = bus.find(VIRTIO_ID_NET)?;
        let net = virtio::Net::new(&dev)?;
        // A no-op handler for every queue irq: a halt returns once one is
        // delivered, and the rings say what happened.
        for q in &net.queues {
            set_irq_handler(u32::from(q.cfg.irq), Some(on_queue_irq));
        }
        let mut nic = Self {
            mac: net.mac,
            net,
            rx_slot: [0; 256],
            repost: [0; MAX_RX_BUFS],
            reposts: 0,
            tx_queued: 0,
            tx_lost: 0,
        };
        for i in 0..rx_bufs.clamp(1, MAX_RX_BUFS) {
            nic.post(i);
        }
        nic.net.queues[0].kick();
        Some(nic)
    }

    /// Offer receive buffer `i` (kicked later).
    fn post(&mut self, i: usize) {
        let q = &mut self.net.queues[0];
        if let Some(head) = q.add(&[(phys(RX.ptr(i)), BUF as u32, true)]) {
            self.rx_slot[usize::from(head) % 256] = i as u8;
        }
    }

    /// Post the buffers taken back since the last call and kick once.
    fn repost_all(&mut self) {
        if self.reposts == 0 {
            return;
        }
        for k in 0..self.reposts {
            let i = usize::from(self.repost[k]);
            self.post(i);
        }
        self.reposts = 0;
        self.net.queues[0].kick();
    }

    /// The next received frame, handed to `f`; `false` if none is there.
    fn recv(&mut self, f: impl FnOnce(&[u8])) -> bool {
        let Some((head, len)) = self.net.queues[0].pop_used() else {
            return false;
        };
        compiler_fence(Ordering::SeqCst);
        let i = usize::from(self.rx_slot[usize::from(head) % 256]);
        let len = (len as usize).clamp(VIRTIO_NET_HDR_SIZE as usize, BUF);
        // SAFETY: buffer `i` is ours again (the host gave it back with
        // `len` bytes written, clamped to the buffer) until it is posted.
        let bytes = unsafe { core::slice::from_raw_parts(RX.ptr(i), len) };
        f(&bytes[VIRTIO_NET_HDR_SIZE as usize..]);
        self.repost[self.reposts % MAX_RX_BUFS] = i as u8;
        self.reposts += 1;
        true
    }

    /// Queue a frame built in transmit slot `slot` (sent by [`Self::flush`]).
    fn queue(&mut self, slot: u32, dst: [u8; 6], kind: u8, seq: u32, data: &[u8]) {
        let p = TX.ptr(slot as usize);
        // SAFETY: transmit slot `slot` is not in the ring (every batch is
        // completed by `flush` before the next one is built).
        let buf = unsafe { core::slice::from_raw_parts_mut(p, BUF) };
        let len = build(buf, dst, self.mac, kind, seq, data);
        let q = &mut self.net.queues[1];
        if q.add(&[
            (phys(TX_HDR.as_ptr()), VIRTIO_NET_HDR_SIZE, false),
            (phys(p), len as u32, false),
        ])
        .is_some()
        {
            self.tx_queued += 1;
        } else {
            self.tx_lost += 1;
        }
    }

    /// Kick the transmit queue and take back what the host sent.
    fn flush(&mut self) {
        if self.tx_queued == 0 {
            return;
        }
        let q = &mut self.net.queues[1];
        q.kick();
        // The host serves the kick in its device task while this guest runs
        // on; the transmit buffers are reused, so wait until it has taken
        // every frame (the queue's irq wakes the halt).
        while self.tx_queued > 0 && q.wait_used().is_some() {
            self.tx_queued -= 1;
        }
        self.tx_lost += self.tx_queued;
        self.tx_queued = 0;
    }

    /// One frame (from slot 0), sent at once.
    fn send(&mut self, dst: [u8; 6], kind: u8, seq: u32, data: &[u8]) {
        self.queue(0, dst, kind, seq, data);
        self.flush();
    }

    /// Sleep until a frame may have arrived (or a clock event after
    /// `timeout_ns`, if not 0).
    fn wait(&mut self, timeout_ns: u32) {
        self.repost_all();
        if timeout_ns != 0 {
            hcall::set_clockevent(timeout_ns);
        }
        irq::disable();
        compiler_fence(Ordering::SeqCst);
        if self.net.queues[0].has_used() {
            irq::enable();
        } else {
            // Returns with irqs enabled, after the handler ran.
            hcall::halt();
        }
    }
}

/// Run role `role`.
pub fn run(bus: &Bus, role: &str, boot: &BootInfo) {
    set_irq_handler(0, Some(on_tick));
    irq::unmask(0);
    irq::enable();
    let num = |key: &str, default: u32| {
        boot.arg(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let Some(mut nic) = Nic::new(bus, num("rxbufs", MAX_RX_BUFS as u32) as usize) else {
        check!(
            false,
            "netpeer: net device started (the module line needs `net`)"
        );
        return;
    };
    match role {
        "a" => sender(
            &mut nic,
            num("count", 10_000),
            num("window", WINDOW),
            num("listeners", 0),
        ),
        "b" => receiver(&mut nic),
        "listen" => listener(&mut nic),
        _ => {
            check!(false, "netpeer: known role {}", role);
        }
    }
    check_eq!(
        nic.tx_lost,
        0,
        "netpeer: every transmitted frame taken by the host"
    );
    hcall::set_clockevent(0);
}

/// Watches for progress; `true` once stalled (after reporting it).
struct Stall {
    since: u64,
    limit: u64,
    reported: bool,
}

impl Stall {
    fn new(limit: u64) -> Self {
        Self {
            since: irq::now_ns(),
            limit,
            reported: false,
        }
    }
    fn progress(&mut self) {
        self.since = irq::now_ns();
    }
    fn check(&mut self, what: core::fmt::Arguments<'_>) -> bool {
        if irq::now_ns().saturating_sub(self.since) < self.limit {
            return false;
        }
        if !self.reported {
            self.reported = true;
            let s = self.limit / 1_000_000_000;
            println!("FAIL: netpeer: no progress for {s} s: {what}");
        }
        true
    }
}

/// What a has learned from the frames it received.
struct SenderState {
    count: u32,
    peer: Option<[u8; 6]>,
    acked: u32,
    /// Acknowledgements out of order or out of range.
    bad: u32,
    /// Listeners heard (their MACs).
    heard: [[u8; 6]; 8],
    nheard: usize,
}

impl SenderState {
    /// Take every frame that arrived; `true` if there was one.
    fn take(&mut self, nic: &mut Nic) -> bool {
        let mut got = false;
        while nic.recv(|bytes| self.frame(bytes)) {
            got = true;
        }
        got
    }

    fn frame(&mut self, bytes: &[u8]) {
        let Some(f) = parse(bytes) else { return };
        match f.kind {
            HELLO if self.peer.is_none() && f.intact => self.peer = Some(f.src),
            ACK if Some(f.src) == self.peer => {
                if f.seq > self.acked && f.seq <= self.count {
                    self.acked = f.seq;
                } else if f.seq < self.acked || f.seq > self.count {
                    self.bad += 1;
                }
            }
            JOIN if !self.heard[..self.nheard].contains(&f.src)
                && self.nheard < self.heard.len() =>
            {
                self.heard[self.nheard] = f.src;
                self.nheard += 1;
            }
            _ => {}
        }
    }
}

fn sender(nic: &mut Nic, count: u32, window: u32, listeners: u32) {
    let window = window.clamp(1, MAX_WINDOW);
    let mut stall = Stall::new(STALL_NS);
    let mut st = SenderState {
        count,
        peer: None,
        acked: 0,
        bad: 0,
        heard: [[0; 6]; 8],
        nheard: 0,
    };
    // b's first HELLO gives its MAC; the answer teaches the switch ours.
    while st.peer.is_none() {
        if !st.take(nic) {
            if stall.check(format_args!("a: no HELLO from b")) {
                return;
            }
            nic.wait(100_000_000);
        }
    }
    let Some(b) = st.peer else { return };
    check!(true, "netpeer a: b's MAC learned from its HELLO");
    nic.send(b, HELLO_ACK, 0, &[]);
    stall.progress();
    let start = irq::now_ns();
    let mut next = 0u32;
    let mut data = [0u8; BUF];
    while st.acked < count {
        // Fill the window: one kick for the whole batch.
        while next < count && next - st.acked < window {
            let len = data_len(next);
            for (i, d) in data[..len].iter_mut().enumerate() {
                *d = data_byte(next, i);
            }
            nic.queue(next % window, b, DATA, next, &data[..len]);
            next += 1;
        }
        nic.flush();
        let before = st.acked;
        if !st.take(nic) {
            if stall.check(format_args!("a: sent {next}, acknowledged {}", st.acked)) {
                return;
            }
            nic.wait(100_000_000);
        }
        if st.acked != before {
            stall.progress();
        }
    }
    let ms = (irq::now_ns() - start) / 1_000_000;
    check_eq!(st.acked, count, "netpeer a: every frame acknowledged");
    check_eq!(st.bad, 0, "netpeer a: acknowledgements in order");
    println!("vio: netpeer a: {count} frames sent and acknowledged in {ms} ms (window {window})");
    // The broadcast, once every listener is there.
    stall.progress();
    while st.nheard < listeners as usize {
        if !st.take(nic) {
            let n = st.nheard;
            if stall.check(format_args!("a: heard {n} of {listeners} listeners")) {
                return;
            }
            nic.wait(100_000_000);
        }
    }
    check_eq!(
        st.nheard,
        listeners as usize,
        "netpeer a: every listener heard"
    );
    nic.send(BROADCAST, BCAST, count, BCAST_TEXT);
    check!(true, "netpeer a: broadcast sent");
}

/// Count a receive error; print the first few.
fn report(errors: &mut u32, what: core::fmt::Arguments<'_>) {
    *errors += 1;
    if *errors <= MAX_DETAILS {
        println!("vio: netpeer b: {what}");
    }
}

fn receiver(nic: &mut Nic) {
    let mut stall = Stall::new(STALL_NS);
    let mut a: Option<[u8; 6]> = None;
    // The next sequence number expected, and the last one acknowledged.
    let mut expect = 0u32;
    let mut acked = 0u32;
    let mut errors = 0u32;
    let mut bcast = false;
    let mut bcast_ok = false;
    let mut last_hello = 0u64;
    while !bcast {
        if a.is_none() && irq::now_ns().saturating_sub(last_hello) >= u64::from(REPEAT_NS) {
            nic.send(BROADCAST, HELLO, 0, &[]);
            last_hello = irq::now_ns();
        }
        let mut got = false;
        while nic.recv(|bytes| {
            let Some(f) = parse(bytes) else { return };
            match f.kind {
                HELLO_ACK if a.is_none() => a = Some(f.src),
                DATA => {
                    if a.is_none() {
                        a = Some(f.src);
                    }
                    if f.seq != expect {
                        report(
                            &mut errors,
                            format_args!("frame {} where {} was due", f.seq, expect),
                        );
                    } else if !f.intact || f.data.len() != data_len(f.seq) {
                        report(
                            &mut errors,
                            format_args!("frame {}: bad length or checksum", f.seq),
                        );
                    } else if let Some(i) =
                        (0..f.data.len()).find(|&i| f.data[i] != data_byte(f.seq, i))
                    {
                        report(
                            &mut errors,
                            format_args!("frame {}: data byte {i} wrong", f.seq),
                        );
                    }
                    expect = f.seq.wrapping_add(1);
                }
                BCAST => {
                    bcast = true;
                    bcast_ok = f.intact && f.data == BCAST_TEXT && f.seq == expect;
                }
                _ => {}
            }
        }) {
            got = true;
        }
        if got {
            stall.progress();
        }
        // One cumulative acknowledgement per batch.
        if expect != acked
            && let Some(peer) = a
        {
            nic.send(peer, ACK, expect, &[]);
            acked = expect;
        }
        if !got && !bcast {
            if stall.check(format_args!("b: {expect} frames received, no broadcast")) {
                break;
            }
            nic.wait(if a.is_none() { REPEAT_NS } else { 100_000_000 });
        }
    }
    println!("vio: netpeer b: {expect} frames received, {errors} errors");
    check!(a.is_some(), "netpeer b: a answered the HELLO");
    check_eq!(
        errors,
        0,
        "netpeer b: every frame in sequence, intact, with its data"
    );
    check!(bcast, "netpeer b: broadcast received");
    check!(
        bcast_ok,
        "netpeer b: broadcast intact, after the last frame"
    );
}

fn listener(nic: &mut Nic) {
    // The broadcast comes after the whole transfer.
    let mut stall = Stall::new(5 * STALL_NS);
    let mut bcast = false;
    let mut bcast_ok = false;
    let mut unicast = 0u32;
    let mut last_join = 0u64;
    while !bcast {
        if irq::now_ns().saturating_sub(last_join) >= u64::from(REPEAT_NS) {
            nic.send(BROADCAST, JOIN, 0, &[]);
            last_join = irq::now_ns();
        }
        let mut got = false;
        while nic.recv(|bytes| {
            match parse(bytes) {
                Some(f) if f.kind == BCAST => {
                    bcast = true;
                    bcast_ok = f.intact && f.data == BCAST_TEXT;
                }
                // Frames a sends to b's learned MAC go to b's port only.
                Some(f) if f.kind == DATA => unicast += 1,
                _ => {}
            }
        }) {
            got = true;
        }
        if !got && !bcast {
            if stall.check(format_args!("listen: no broadcast")) {
                break;
            }
            nic.wait(REPEAT_NS);
        }
    }
    check!(bcast, "netpeer listen: broadcast received");
    check!(bcast_ok, "netpeer listen: broadcast intact");
    check_eq!(unicast, 0, "netpeer listen: none of the frames for b seen");
}
