//! The virtio benches (`tests/benches/io.toml`): instructions per KiB moved
//! through the virtio console, the block device and the network (between
//! two guests over the hypervisor's switch), and the instructions of one
//! network ping-pong. Under `-icount shift=0` the TSC counts every
//! instruction, the guest's and the hypervisor's alike (the launcher task
//! that serves the device, the switch, the other guest's launcher and the
//! other guest), so a span read in one guest is the whole path.
//!
//! | metric | mode | one batch | floor |
//! |---|---|---|---|
//! | `console_bytes` | `console` | [`IO_BYTES`] written in 4 KiB chunks (`Console::write`: a chain, a kick, the host takes it) | `native_memcpy` |
//! | `block_bytes` | `block` (with `block=`) | [`IO_BYTES`] read in 4 KiB requests from sector 0 on | `native_memcpy` |
//! | `net_bytes` | `netsend` (+ a `netecho` guest) | [`NET_WINDOWS`] windows of [`WINDOW`] frames of [`FRAME`] bytes to the echo guest, each window acknowledged by one 60-byte frame | `native_memcpy` |
//! | `net_roundtrip` | `netsend` (+ `netecho`) | [`PINGS`] ping-pongs of 60-byte frames | — |
//!
//! Each metric is the minimum of [`BATCHES`] batches minus a bare `rdtsc`
//! pair; the byte metrics are instructions × 1024 / bytes (unit
//! `insn/KiB`), so that they compare with the hypervisor's `native_memcpy`
//! (itself per KiB of a [`IO_BYTES`] copy).
//!
//! The console bytes are `x`s without a line end until the last batch is
//! done. The host's console cuts them into lines of 256 bytes, shows at
//! most 160 bytes of each, and caps each guest at a 16 KiB burst then
//! 4 KiB/s: the first 16 KiB are printed, the rest is counted and dropped.
//! The first batch therefore pays for the serial port and the minimum does
//! not: the figure is the virtio path and the host's line handling and
//! rate cap, not the UART (11 bytes per millisecond, which would dominate
//! any figure). The guest waits a second before printing its result, so
//! that the cap lets the line through.
//!
//! `net_bytes` has two stages: `.send` (the sender's own `send`s: each a
//! kick, the host copying the frame out of the guest into the switch) and
//! `.deliver_ack` (the rest: the echo guest's launcher delivering the
//! frames into its receive buffers, the echo guest counting them and
//! posting the buffers again, its acknowledgement coming back).
//!
//! The two network guests find each other first: the sender broadcasts a
//! ping every 20 ms until the echo guest answers (the echo guest may start
//! after it), then addresses it by the MAC the answer came from. At the end
//! the sender sends `DONE` and both power off.

use core::sync::atomic::{AtomicU32, Ordering};

use lguest_rt::guest_abi::device::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};
use lguest_rt::trap::{TrapFrame, set_irq_handler};
use lguest_rt::virtio::{self, Bus, Net};
use lguest_rt::{BootInfo, hcall, irq, println};

use super::{BATCHES, min_of, rdtsc, rdtsc_pair, report, report_in};

/// Bytes per batch of the console and block benches (the hypervisor's
/// `native_memcpy` copies as many: `probe::MEMCPY_BYTES`).
pub const IO_BYTES: usize = 64 * 1024;
/// Bytes per console write and per block request.
const CHUNK: usize = 4096;
/// Bytes of one data frame (an Ethernet frame of the largest size, without
/// the FCS).
const FRAME: usize = 1514;
/// Data frames per acknowledged window.
const WINDOW: u32 = 16;
/// Windows per `net_bytes` batch.
const NET_WINDOWS: u32 = 3;
/// Ping-pongs per `net_roundtrip` batch.
const PINGS: u32 = 100;
/// Receive buffers each network guest keeps posted.
const RX_BUFS: usize = 8;
/// Bytes of a receive buffer: the 10-byte virtio header and a frame.
const RX_LEN: usize = 1536;
/// Our EtherType (IEEE 802 local experimental).
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// Frame kinds (byte 14).
const PING: u8 = 1;
const PONG: u8 = 2;
const DATA: u8 = 3;
const ACK: u8 = 4;
const DONE: u8 = 5;

/// `console_bytes`.
pub fn console(boot: &BootInfo) {
    let bus = Bus::scan(boot.mem_bytes);
    let Some(mut con) = bus
        .find(VIRTIO_ID_CONSOLE)
        .and_then(|d| virtio::Console::new(&d))
    else {
        panic!("bench: mode=console needs the virtio console");
    };
    let chunk = [b'x'; CHUNK];
    let pair = min_of(BATCHES * 10, rdtsc_pair);
    let mut best = u32::MAX;
    for _ in 0..BATCHES {
        let t0 = rdtsc();
        for _ in 0..IO_BYTES / CHUNK {
            assert!(con.write(&chunk), "console write not taken");
        }
        best = best.min(rdtsc().wrapping_sub(t0));
    }
    assert!(con.write(b"\n"), "console line end not taken");
    // The host's rate cap on this guest's console (4 KiB/s after a 16 KiB
    // burst) is exhausted now and would drop the result line: wait for it.
    sleep_ms(1000);
    report_in(
        "console_bytes",
        u64::from(best.saturating_sub(pair)) * 1024,
        IO_BYTES as u64,
        "insn/KiB",
        "native_memcpy",
    );
}

/// `block_bytes`.
pub fn block(boot: &BootInfo) {
    let bus = Bus::scan(boot.mem_bytes);
    let Some(mut blk) = bus
        .find(VIRTIO_ID_BLOCK)
        .and_then(|d| virtio::Block::new(&d))
    else {
        panic!("bench: mode=block needs a block device (block=NAME)");
    };
    assert!(
        blk.capacity * 512 >= IO_BYTES as u64,
        "bench: the block device is smaller than {IO_BYTES} bytes"
    );
    let mut buf = [0u8; CHUNK];
    let pair = min_of(BATCHES * 10, rdtsc_pair);
    let mut best = u32::MAX;
    for _ in 0..BATCHES {
        let t0 = rdtsc();
        for i in 0..IO_BYTES / CHUNK {
            let st = blk.read((i * CHUNK / 512) as u64, &mut buf);
            assert_eq!(st, Some(0), "block read failed");
        }
        best = best.min(rdtsc().wrapping_sub(t0));
    }
    report_in(
        "block_bytes",
        u64::from(best.saturating_sub(pair)) * 1024,
        IO_BYTES as u64,
        "insn/KiB",
        "native_memcpy",
    );
}

/// Clock interrupts taken (the sender's timeouts).
static TICKS: AtomicU32 = AtomicU32::new(0);

fn tick(_f: &mut TrapFrame) {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// Halt until a clock event `ms` ahead has fired.
fn sleep_ms(ms: u32) {
    set_irq_handler(0, Some(tick));
    irq::unmask(0);
    let before = TICKS.load(Ordering::Relaxed);
    irq::disable();
    hcall::set_clockevent(ms * 1_000_000);
    while TICKS.load(Ordering::Relaxed) == before {
        hcall::halt();
        irq::disable();
    }
    irq::enable();
    irq::mask(0);
}

/// A network device with [`RX_BUFS`] receive buffers posted.
struct Port<'a> {
    net: Net,
    bufs: &'a mut [[u8; RX_LEN]; RX_BUFS],
    /// The descriptor head each buffer was posted under.
    heads: [u16; RX_BUFS],
    hdr: [u8; 10],
}

impl<'a> Port<'a> {
    fn new(boot: &BootInfo, bufs: &'a mut [[u8; RX_LEN]; RX_BUFS]) -> Self {
        let bus = Bus::scan(boot.mem_bytes);
        let Some(net) = bus.find(VIRTIO_ID_NET).and_then(|d| Net::new(&d)) else {
            panic!("bench: the network modes need a net device (net)");
        };
        let mut p = Self {
            net,
            bufs,
            heads: [u16::MAX; RX_BUFS],
            hdr: [0; 10],
        };
        for i in 0..RX_BUFS {
            p.post(i);
        }
        irq::unmask(u32::from(p.net.queues[0].cfg.irq));
        p
    }

    fn post(&mut self, i: usize) {
        let q = &mut self.net.queues[0];
        let buf = &self.bufs[i];
        let head = q.add(&[(hcall::phys(buf.as_ptr()), RX_LEN as u32, true)]);
        self.heads[i] = head.expect("a receive descriptor is free");
        q.kick();
    }

    /// The next received frame's buffer index and frame length, waiting for
    /// it (halted); with `timeout`, `None` once a 20 ms clock event fired.
    fn recv(&mut self, timeout: bool) -> Option<(usize, usize)> {
        let ticks = TICKS.load(Ordering::Relaxed);
        if timeout {
            hcall::set_clockevent(20_000_000);
        }
        loop {
            irq::disable();
            if let Some((head, len)) = self.net.queues[0].pop_used() {
                irq::enable();
                let i = self.heads.iter().position(|&h| h == head)?;
                return Some((i, (len as usize).saturating_sub(10)));
            }
            if timeout && TICKS.load(Ordering::Relaxed) != ticks {
                irq::enable();
                return None;
            }
            // Returns with interrupts on, after the irq's handler ran.
            hcall::halt();
        }
    }

    /// The frame in buffer `i` (after the virtio header).
    fn frame(&self, i: usize, len: usize) -> &[u8] {
        &self.bufs[i][10..10 + len.min(RX_LEN - 10)]
    }

    fn send(&mut self, frame: &[u8]) {
        assert!(self.net.send(&mut self.hdr, frame), "net send not taken");
    }
}

/// A frame of `len` bytes of `kind` from `src` to `dst`.
fn make_frame(buf: &mut [u8], dst: &[u8; 6], src: &[u8; 6], kind: u8) {
    buf[..6].copy_from_slice(dst);
    buf[6..12].copy_from_slice(src);
    buf[12..14].copy_from_slice(&ETHERTYPE);
    buf[14] = kind;
}

/// The sender: finds the echo guest, then `net_roundtrip` and `net_bytes`.
pub fn net_send(boot: &BootInfo) {
    let mut bufs = [[0u8; RX_LEN]; RX_BUFS];
    let mut port = Port::new(boot, &mut bufs);
    let me = port.net.mac;
    set_irq_handler(0, Some(tick));
    irq::unmask(0);
    // Find the echo guest: broadcast pings until it answers.
    let mut ping = [0u8; 60];
    let mut peer = None;
    for _ in 0..500 {
        make_frame(&mut ping, &[0xff; 6], &me, PING);
        port.send(&ping);
        if let Some((i, len)) = port.recv(true) {
            let f = port.frame(i, len);
            if len >= 15 && f[14] == PONG {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&f[6..12]);
                peer = Some(mac);
            }
            port.post(i);
            if peer.is_some() {
                break;
            }
        }
    }
    let Some(peer) = peer else {
        panic!("bench: no echo guest answered");
    };
    // Pongs to earlier broadcasts may still be on their way: take them
    // until 20 ms pass without a frame, so that none is counted below.
    while let Some((i, _)) = port.recv(true) {
        port.post(i);
    }
    hcall::set_clockevent(0);
    irq::mask(0);
    let pair = min_of(BATCHES * 10, rdtsc_pair);

    // net_roundtrip: one 60-byte ping, its pong back.
    make_frame(&mut ping, &peer, &me, PING);
    let mut best = u32::MAX;
    for _ in 0..BATCHES {
        let t0 = rdtsc();
        for _ in 0..PINGS {
            port.send(&ping);
            let (i, len) = port.recv(false).expect("a pong");
            let kind = port.frame(i, len).get(14).copied();
            port.post(i);
            assert_eq!(kind, Some(PONG), "not a pong");
        }
        best = best.min(rdtsc().wrapping_sub(t0));
    }
    report(
        "net_roundtrip",
        u64::from(best.saturating_sub(pair)),
        PINGS,
        "-",
    );

    // net_bytes: windows of full frames, each acknowledged.
    let mut data = [0u8; FRAME];
    make_frame(&mut data, &peer, &me, DATA);
    for (k, b) in data.iter_mut().enumerate().skip(15) {
        *b = k as u8;
    }
    let (mut best, mut best_send) = (u32::MAX, 0);
    for _ in 0..BATCHES {
        let mut send = 0u32;
        let t0 = rdtsc();
        for _ in 0..NET_WINDOWS {
            let s0 = rdtsc();
            for _ in 0..WINDOW {
                port.send(&data);
            }
            send = send.wrapping_add(rdtsc().wrapping_sub(s0));
            let (i, len) = port.recv(false).expect("an ack");
            let kind = port.frame(i, len).get(14).copied();
            port.post(i);
            assert_eq!(kind, Some(ACK), "not an ack");
        }
        let total = rdtsc().wrapping_sub(t0);
        if total < best {
            (best, best_send) = (total, send);
        }
    }
    let bytes = u64::from(NET_WINDOWS * WINDOW) * FRAME as u64;
    let total = u64::from(best.saturating_sub(pair));
    let send = u64::from(best_send);
    report_in(
        "net_bytes",
        total * 1024,
        bytes,
        "insn/KiB",
        "native_memcpy",
    );
    report_in("net_bytes.send", send * 1024, bytes, "insn/KiB", "-");
    report_in(
        "net_bytes.deliver_ack",
        total.saturating_sub(send) * 1024,
        bytes,
        "insn/KiB",
        "-",
    );
    make_frame(&mut ping, &peer, &me, DONE);
    port.send(&ping);
    println!("net: done");
}

/// The echo guest: answers pings, acknowledges every [`WINDOW`] data
/// frames, ends on `DONE`.
pub fn net_echo(boot: &BootInfo) {
    let mut bufs = [[0u8; RX_LEN]; RX_BUFS];
    let mut port = Port::new(boot, &mut bufs);
    let me = port.net.mac;
    let mut reply = [0u8; 60];
    let mut data = 0u32;
    let mut frames = 0u32;
    loop {
        let Some((i, len)) = port.recv(false) else {
            continue;
        };
        let f = port.frame(i, len);
        let kind = if len >= 15 { f[14] } else { 0 };
        let mut src = [0u8; 6];
        src.copy_from_slice(&f[6..12]);
        port.post(i);
        frames += 1;
        match kind {
            PING => {
                make_frame(&mut reply, &src, &me, PONG);
                port.send(&reply);
            }
            DATA => {
                data += 1;
                if data == WINDOW {
                    data = 0;
                    make_frame(&mut reply, &src, &me, ACK);
                    port.send(&reply);
                }
            }
            DONE => break,
            _ => {}
        }
    }
    println!("net: echo done after {frames} frames");
}
