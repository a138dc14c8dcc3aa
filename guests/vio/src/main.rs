//! The virtio test guest: finds the lguest bus at the top of RAM, drives
//! every device it was given and prints `PASS:`/`FAIL:` lines and a
//! `DONE:` summary, then powers off.
//!
//! Its command line is the module line's words (the hypervisor's device
//! options stay visible to the guest), so the checks follow the devices:
//!
//! | word | checks |
//! |---|---|
//! | (always) | the bus holds an entropy device; 2 × 64 random bytes differ and are not constant |
//! | (default) / `noconsole` | a console is there and takes output (`vio: hello through the virtio console` arrives as a console line) / there is none |
//! | `block=NAME` | capacity > 0; every sector reads back as the `pattern` disk (`guest_abi::testdata`) and its checksum is printed; a write then read back; flush; a write and a read past the end answer IOERR; GET_ID is `NAME` |
//! | `net` | the MAC is a locally administered unicast `52:54:00:…`; a broadcast frame is sent; a receive buffer is posted |
//! | `netpeer=a\|b\|listen` (with `net`) | guests exchange frames through the switch instead: a sends `count=N` (10,000) numbered, checksummed frames to b under a window, b checks each and acknowledges; then a broadcasts to b and `listeners=N` listeners (module [`netpeer`]) |
//! | `echo` | read the virtio console's input and print each line as `vio: got line "..."` until `quit` (module [`echo`]) |
//! | `hostile=MODE` | misuse a device instead (table in [`HOSTILE`]); the hypervisor must kill the guest, else it prints `FAIL: MODE survived` |
#![no_std]
#![no_main]

use lguest_rt::guest_abi::device::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET,
    VIRTIO_ID_RNG, VRING_DESC_F_NEXT,
};
use lguest_rt::guest_abi::testdata::{FNV_OFFSET, fnv1a, pattern_byte};
use lguest_rt::hcall::{notify, phys};
use lguest_rt::virtio::{self, Bus, Virtqueue};
use lguest_rt::{BootInfo, check, check_eq, println};

mod echo;
mod netpeer;

lguest_rt::entry!(main);

fn main(boot: &BootInfo) {
    let bus = Bus::scan(boot.mem_bytes);
    println!(
        "vio: bus at {:#x}: {} devices",
        bus.base,
        bus.devices().count()
    );
    for d in bus.devices() {
        println!(
            "vio: device type {} at {:#x}, {} queues, features {:#x}",
            d.kind(),
            d.addr,
            d.desc.num_vq,
            d.host_features()
        );
    }
    if let Some(mode) = boot.arg("hostile") {
        hostile(&bus, mode);
        return;
    }
    if let Some(role) = boot.arg("netpeer") {
        netpeer::run(&bus, role, boot);
        return;
    }
    if boot.has_flag("echo") {
        echo::run(&bus);
        return;
    }
    console(&bus, !boot.has_flag("noconsole"));
    rng(&bus);
    match boot.arg("block") {
        Some(name) => block(&bus, name),
        None => {
            check!(bus.find(VIRTIO_ID_BLOCK).is_none(), "no block device");
        }
    }
    if boot.has_flag("net") {
        net(&bus);
    } else {
        check!(bus.find(VIRTIO_ID_NET).is_none(), "no net device");
    }
}

fn console(bus: &Bus, want: bool) {
    let Some(dev) = bus.find(VIRTIO_ID_CONSOLE) else {
        check!(!want, "console present");
        return;
    };
    check!(want, "console present");
    let Some(mut con) = virtio::Console::new(&dev) else {
        check!(false, "console started");
        return;
    };
    check!(
        con.write(b"vio: hello through the virtio console\n"),
        "console output taken"
    );
    // Two writes, one line: the host assembles lines.
    let ok = con.write(b"vio: one line ") && con.write(b"in two writes\n");
    check!(ok, "console output in pieces taken");
    // An input buffer stays posted: nothing is typed in a test.
    let mut buf = [0u8; 64];
    check!(con.post_input(&mut buf), "console input buffer posted");
    check!(con.input_done().is_none(), "no console input yet");
}

fn rng(bus: &Bus) {
    let Some(dev) = bus.find(VIRTIO_ID_RNG) else {
        check!(false, "entropy device present");
        return;
    };
    let Some(mut rng) = virtio::Rng::new(&dev) else {
        check!(false, "entropy device started");
        return;
    };
    let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
    check_eq!(rng.fill(&mut a), Some(64), "rng gave 64 bytes");
    check_eq!(rng.fill(&mut b), Some(64), "rng gave 64 more bytes");
    check!(a != b, "rng bytes differ between requests");
    check!(a.iter().any(|&x| x != a[0]), "rng bytes are not constant");
}

/// Bytes per block request in the full-disk read.
const CHUNK: usize = 4096;

fn block(bus: &Bus, name: &str) {
    let Some(dev) = bus.find(VIRTIO_ID_BLOCK) else {
        check!(false, "block device present");
        return;
    };
    let Some(mut blk) = virtio::Block::new(&dev) else {
        check!(false, "block device started");
        return;
    };
    let cap = blk.capacity;
    println!("vio: block capacity {cap} sectors");
    check!(cap > 0, "block capacity");
    // Every sector is the pattern; the checksum covers the whole disk.
    let mut buf = [0u8; CHUNK];
    let mut hash = FNV_OFFSET;
    let mut bad = None;
    let mut sector = 0u64;
    while sector < cap {
        let n = ((cap - sector) as usize * 512).min(CHUNK);
        let st = blk.read(sector, &mut buf[..n]);
        if st != Some(VIRTIO_BLK_S_OK) {
            bad = Some((sector, st));
            break;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            if b != pattern_byte(sector * 512 + i as u64) && bad.is_none() {
                bad = Some((sector + i as u64 / 512, Some(b)));
            }
        }
        hash = fnv1a(hash, &buf[..n]);
        sector += (n / 512) as u64;
    }
    check_eq!(bad, None, "block content is the pattern");
    println!("vio: block checksum {hash:#010x} over {cap} sectors");
    // Write, read back.
    let mut data = [0u8; 1024];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u8) ^ 0xA5;
    }
    check_eq!(blk.write(1, &data), Some(VIRTIO_BLK_S_OK), "block write");
    let mut back = [0u8; 1024];
    check_eq!(
        blk.read(1, &mut back),
        Some(VIRTIO_BLK_S_OK),
        "block read back"
    );
    check!(back == data, "block data read back as written");
    let mut s0 = [0u8; 512];
    blk.read(0, &mut s0);
    check!(
        s0.iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(i as u64)),
        "block sector 0 untouched"
    );
    check_eq!(blk.flush(), Some(VIRTIO_BLK_S_OK), "block flush");
    check_eq!(
        blk.write(cap, &data[..512]),
        Some(VIRTIO_BLK_S_IOERR),
        "block write past the end refused"
    );
    check_eq!(
        blk.read(cap - 1, &mut back),
        Some(VIRTIO_BLK_S_IOERR),
        "block read across the end refused"
    );
    let mut id = [0u8; 20];
    check_eq!(blk.get_id(&mut id), Some(VIRTIO_BLK_S_OK), "block get-id");
    let len = id.iter().position(|&b| b == 0).unwrap_or(20);
    check!(&id[..len] == name.as_bytes(), "block id is the module name");
}

fn net(bus: &Bus) {
    let Some(dev) = bus.find(VIRTIO_ID_NET) else {
        check!(false, "net device present");
        return;
    };
    let Some(mut net) = virtio::Net::new(&dev) else {
        check!(false, "net device started");
        return;
    };
    let m = net.mac;
    println!(
        "vio: net mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );
    check!(m[..3] == [0x52, 0x54, 0x00], "net mac 52:54:00:...");
    let mut rx = [0u8; 1536];
    check!(net.post_rx(&mut rx), "net receive buffer posted");
    // A broadcast (an ARP-typed frame of 60 bytes).
    let mut frame = [0u8; 60];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&m);
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut hdr = [0u8; 10];
    check!(net.send(&mut hdr, &frame), "net broadcast sent");
    // Alone on the switch: nothing comes back (a frame is never sent back
    // to its own port).
    check!(net.rx_done().is_none(), "net: no frame back to the sender");
}

/// A hostile mode: name, what it does, whether the guest survives it.
type Hostile = (&'static str, fn(&Bus), bool);

/// Hostile modes: each misuses one device; the hypervisor must kill the
/// guest (expected reason in the comment) unless marked as surviving.
const HOSTILE: &[Hostile] = &[
    // "descriptor loop in chain 0 at 0"
    ("descloop", desc_loop, false),
    // "descriptor 0 address 0xfff00000 len 16 outside guest memory"
    ("descaddr", desc_addr, false),
    // "chain 0 longer than 16777216 bytes"
    ("chainlong", chain_long, false),
    // "device 0: bad status 0x30: unknown status bits"
    ("badstatus", bad_status, false),
    // "device 0: bad status 0x4: DRIVER_OK without ACKNOWLEDGE and DRIVER"
    ("statusorder", status_order, false),
    // "guest moved avail index from 0 to 32768"
    ("availjump", avail_jump, false),
    // "descriptor index 200 out of range"
    ("descindex", desc_index, false),
    // "bad device request: block request header shorter than 16 bytes"
    ("blkshort", blk_short, false),
    // survives: "guest vio notified 0x...: no device there", then PASS
    ("notifyrandom", notify_random, true),
];

fn hostile(bus: &Bus, mode: &str) {
    let Some(&(name, run, survives)) = HOSTILE.iter().find(|h| h.0 == mode) else {
        check!(false, "known hostile mode {}", mode);
        return;
    };
    println!("vio: trying {name}");
    run(bus);
    if !survives {
        // The host serves a kick in its device service task while the
        // guest runs on: give it time to find the misuse (a few clock
        // events' worth of halts) before calling it survived.
        settle();
        println!("FAIL: {name} survived");
    }
}

/// The console's transmit queue, started, for the ring modes.
fn console_tx(bus: &Bus) -> Option<Virtqueue> {
    let dev = bus.find(VIRTIO_ID_CONSOLE)?;
    let con = virtio::Console::new(&dev)?;
    let [_, tx] = con.queues;
    Some(tx)
}

fn desc_loop(bus: &Bus) {
    let Some(mut q) = console_tx(bus) else { return };
    let b = [0u8; 16];
    q.write_desc(0, u64::from(phys(b.as_ptr())), 16, VRING_DESC_F_NEXT, 1);
    q.write_desc(1, u64::from(phys(b.as_ptr())), 16, VRING_DESC_F_NEXT, 0);
    q.publish(0);
    q.kick();
}

fn desc_addr(bus: &Bus) {
    let Some(mut q) = console_tx(bus) else { return };
    q.write_desc(0, 0xfff0_0000, 16, 0, 0);
    q.publish(0);
    q.kick();
}

fn chain_long(bus: &Bus) {
    let Some(mut q) = console_tx(bus) else { return };
    // Three 8 MiB buffers, each inside a 16 MiB guest: 24 MiB in all.
    for i in 0..3u16 {
        let flags = if i < 2 { VRING_DESC_F_NEXT } else { 0 };
        q.write_desc(i, 0, 8 << 20, flags, i + 1);
    }
    q.publish(0);
    q.kick();
}

fn bad_status(bus: &Bus) {
    if let Some(d) = bus.devices().next() {
        d.set_status(0x30);
    }
}

fn status_order(bus: &Bus) {
    if let Some(d) = bus.devices().next() {
        d.set_status(0);
        d.set_status(lguest_rt::guest_abi::device::VIRTIO_CONFIG_S_DRIVER_OK);
    }
}

fn avail_jump(bus: &Bus) {
    let Some(mut q) = console_tx(bus) else { return };
    q.set_avail_idx(0x8000);
    q.kick();
}

fn desc_index(bus: &Bus) {
    let Some(mut q) = console_tx(bus) else { return };
    q.publish(200);
    q.kick();
}

fn blk_short(bus: &Bus) {
    let Some(dev) = bus.find(VIRTIO_ID_BLOCK) else {
        println!("FAIL: blkshort needs block=");
        return;
    };
    let Some(mut blk) = virtio::Block::new(&dev) else {
        return;
    };
    let hdr = [0u8; 8];
    let mut status = 0u8;
    blk.queue.add(&[
        (phys(hdr.as_ptr()), 8, false),
        (phys(&raw mut status), 1, true),
    ]);
    blk.queue.kick();
}

fn notify_random(_bus: &Bus) {
    for a in [0xdead_0000u32, 0xffff_fff0, 0x8000_0000] {
        notify(a);
    }
    check!(true, "still running after notifying random addresses");
}

/// Halts through 50 clock events of 2 ms: the host's device service task
/// runs meanwhile (a guest that was misusing a device is killed then).
fn settle() {
    use lguest_rt::trap::set_irq_handler;
    fn tick(_: &mut lguest_rt::TrapFrame) {}
    set_irq_handler(0, Some(tick));
    lguest_rt::irq::unmask(0);
    for _ in 0..50 {
        lguest_rt::hcall::set_clockevent(2_000_000);
        lguest_rt::hcall::halt();
    }
}
