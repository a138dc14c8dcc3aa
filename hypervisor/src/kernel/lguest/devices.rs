//! A guest's virtio devices on the real machine: the kernel side of
//! `rustyvisor::virtio::bus` (which decides everything and is host-tested).
//!
//! What is here is what needs the machine:
//!
//! * the block device's store: a copy of the data module the guest's
//!   `block=MODULE` names, in frames owned by the guest ([`BlockCopy`]; the
//!   guest's writes stay in the copy and are counted; the frames are freed
//!   with the guest, so the launcher's memory check covers them);
//! * the entropy source: a ChaCha20 generator per guest, seeded from a
//!   global one that is seeded from RDRAND (where the CPU has it) and the
//!   TSC;
//! * the one global [`Switch`] every guest's network device is a port of
//!   (a port per guest, removed when its devices are dropped);
//! * the launcher's side of [`BusHost`]: console lines go through the
//!   guest's [`GuestConsole`] and print as `guest NAME: TEXT`, exactly like
//!   early-console lines; irqs are `LHREQ_IRQ` writes on the guest's
//!   channel (given as a closure).
//!
//! The launcher's hook (in `run_guest`, marked `// devices:`) builds a
//! [`GuestDevices`] before allocating guest memory (its pages follow RAM),
//! writes it into guest memory before `INITIALIZE`, and hands every
//! `NOTIFY` to [`GuestDevices::notify`] first: [`Notified::Other`] is the
//! early console as before, [`Notified::Kill`] ends the guest with
//! `guest NAME killed: REASON`. [`GuestDevices::poll`] and
//! [`GuestDevices::push_input`] are for the concurrent launcher (a guest's
//! launcher polls before it runs the guest again; the console focus pushes
//! input); with one guest at a time, `notify` polls after every device
//! notify.

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use rustyvisor::lguest::console::{ConsoleLine, Escaped, GuestConsole};
use rustyvisor::lguest::guestmem::GuestMemory;
use rustyvisor::lguest::spec::{self, GuestSpec};
use rustyvisor::mm::frame::PhysFrame;
use rustyvisor::mm::{LARGE_PAGE_SIZE, PAGE_SIZE};
use rustyvisor::units::Bytes;
use rustyvisor::virtio::bus::{Bus, BusConfig, BusHost, BusStats, Handled};
use rustyvisor::virtio::net::Mac;
use rustyvisor::virtio::rng::{ChaCha20Rng, EntropySource};
use rustyvisor::virtio::switch::Switch;

use super::super::arch::cpu;
use super::super::bootinfo::Module;
use super::super::mem::{self, phys_to_virt};
use super::super::time;
use crate::kprintln;

/// The switch every guest network device is a port of.
static SWITCH: spin::Mutex<Option<Switch>> = spin::Mutex::new(None);

/// The generator every guest's entropy seed comes from.
static SEEDS: spin::Mutex<Option<ChaCha20Rng>> = spin::Mutex::new(None);

/// MACs handed out so far (the low bytes of the next one).
static NEXT_MAC: AtomicU32 = AtomicU32::new(1);

/// Frames wait on switch port `port` for its guest.
pub fn port_pending(port: usize) -> bool {
    SWITCH
        .lock()
        .as_ref()
        .is_some_and(|sw| sw.pending(port) > 0)
}

/// Which modules are data rather than guests: those whose name (first word
/// of the command line) some guest's `block=MODULE` or `initrd=MODULE`
/// names. One flag per module.
pub fn data_modules(modules: &[Module]) -> Vec<bool> {
    let wanted: Vec<&str> = modules
        .iter()
        .filter_map(|m| spec::parse(m.cmdline.as_str(), m.cmdline_len).ok())
        .flat_map(|s| [s.devices.block, s.initrd])
        .flatten()
        .collect();
    modules
        .iter()
        .map(|m| wanted.contains(&spec::name_of(m.cmdline.as_str())))
        .collect()
}

/// A block device's store: a copy of a data module in frames the guest
/// owns, freed when dropped.
pub struct BlockCopy {
    first: PhysFrame,
    frames: u64,
    len: usize,
}

impl BlockCopy {
    /// Copies `data` into newly allocated frames.
    fn new(data: &[u8]) -> Option<Self> {
        let frames = (data.len() as u64).div_ceil(PAGE_SIZE).max(1);
        let first = mem::alloc_contiguous(frames, 1)?;
        let copy = Self {
            first,
            frames,
            len: data.len(),
        };
        // SAFETY: the run of `frames` frames was just allocated to this copy
        // (direct-mapped), and `data.len() <= frames * PAGE_SIZE`; the tail
        // of the last frame is zeroed so nothing stale stays in it.
        unsafe {
            let dst = phys_to_virt(first.start_address()) as *mut u8;
            core::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
            core::ptr::write_bytes(
                dst.add(data.len()),
                0,
                (frames * PAGE_SIZE) as usize - data.len(),
            );
        }
        Some(copy)
    }

    /// Host memory held (whole frames).
    pub fn bytes(&self) -> u64 {
        self.frames * PAGE_SIZE
    }
}

impl AsRef<[u8]> for BlockCopy {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes of frames owned by `self` (see `new`),
        // borrowed as long as `self`.
        unsafe {
            core::slice::from_raw_parts(
                phys_to_virt(self.first.start_address()) as *const u8,
                self.len,
            )
        }
    }
}

impl AsMut<[u8]> for BlockCopy {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`; `&mut self` makes the borrow unique.
        unsafe {
            core::slice::from_raw_parts_mut(
                phys_to_virt(self.first.start_address()) as *mut u8,
                self.len,
            )
        }
    }
}

impl Drop for BlockCopy {
    fn drop(&mut self) {
        mem::free_contiguous(self.first, self.frames);
    }
}

/// A guest's entropy: a ChaCha20 generator with its own seed.
pub struct Entropy(ChaCha20Rng);

impl EntropySource for Entropy {
    fn fill(&mut self, buf: &mut [u8]) -> bool {
        self.0.fill_bytes(buf);
        true
    }
}

/// One RDRAND value, if the CPU has the instruction and it succeeds.
fn rdrand() -> Option<u64> {
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    #[allow(unused_unsafe)]
    let has = unsafe { core::arch::x86_64::__cpuid(1) }.ecx & (1 << 30) != 0;
    if !has {
        return None;
    }
    for _ in 0..10 {
        let v: u64;
        let ok: u8;
        // SAFETY: CPUID says RDRAND exists; it only writes the registers.
        unsafe {
            core::arch::asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
                options(nomem, nostack))
        };
        if ok != 0 {
            return Some(v);
        }
    }
    None
}

/// A fresh seed for a guest's generator.
fn new_entropy() -> Entropy {
    let mut seeds = SEEDS.lock();
    let pool = seeds.get_or_insert_with(|| {
        let mut seed = [0u8; 32];
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            let v = rdrand().unwrap_or(0)
                ^ cpu::rdtsc().rotate_left(17 * i as u32)
                ^ time::now_ns().wrapping_mul(0x9E37_79B9_7F4A_7C15);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        ChaCha20Rng::from_seed(seed)
    });
    let mut seed = [0u8; 32];
    pool.fill_bytes(&mut seed);
    // Mix in this moment too, so a guest's stream differs across boots
    // even without RDRAND.
    let t = cpu::rdtsc().to_le_bytes();
    for (s, x) in seed.iter_mut().zip(t) {
        *s ^= x;
    }
    Entropy(ChaCha20Rng::from_seed(seed))
}

/// What a `NOTIFY` turned out to be.
#[derive(Debug)]
pub enum Notified {
    /// A device's status change or kick, served; the guest runs on.
    Device,
    /// Not a device: the early console string at the notified address (or
    /// "no device there").
    Other,
    /// The guest misused a device: kill it with this reason.
    Kill(String),
}

/// The launcher's side of a bus call.
struct Host<'a, I: FnMut(u16)> {
    name: &'a str,
    console: &'a mut GuestConsole,
    irq: I,
    switch: Option<spin::MutexGuard<'a, Option<Switch>>>,
}

impl<I: FnMut(u16)> BusHost for Host<'_, I> {
    fn console_line(&mut self, line: &[u8]) {
        print_line(self.console, self.name, line);
    }
    fn irq(&mut self, irq: u16) {
        (self.irq)(irq);
    }
    fn switch(&mut self) -> Option<&mut Switch> {
        self.switch.as_mut().and_then(|g| g.as_mut())
    }
}

/// Print one piece of guest console text as the early console does.
fn print_line(console: &mut GuestConsole, name: &str, text: &[u8]) {
    console.write(time::now_ns(), text, |line| match line {
        ConsoleLine::Text(t) => kprintln!("guest {name}: {t}"),
        ConsoleLine::Dropped { lines, bytes } => kprintln!(
            "guest {name} console: {lines} lines ({bytes} bytes) dropped: over the rate limit"
        ),
    });
}

/// One guest's virtio devices (module docs).
pub struct GuestDevices {
    bus: Bus<BlockCopy, Entropy>,
    block_module: Option<String>,
    block_bytes: u64,
}

impl GuestDevices {
    /// The devices `spec` asks for, for a guest whose RAM is `spec.mem`
    /// rounded up to 2 MiB (as `GuestRam` allocates it). `block=` is looked
    /// up among `modules`. The error says why the guest cannot start.
    pub fn new(spec: &GuestSpec<'_>, modules: &[Module]) -> Result<Self, String> {
        let ram_pages = u32::try_from(spec.mem.next_multiple_of(LARGE_PAGE_SIZE) / PAGE_SIZE)
            .map_err(|_| "guest RAM too large for devices".to_string())?;
        let block = match spec.devices.block {
            Some(want) => {
                let m = modules
                    .iter()
                    .find(|m| spec::name_of(m.cmdline.as_str()) == want)
                    .ok_or_else(|| alloc::format!("block={want}: no module named {want}"))?;
                let len = m.range.len() as usize;
                // SAFETY: module ranges are reserved at boot and never reused;
                // the direct map covers them.
                let data = unsafe {
                    core::slice::from_raw_parts(phys_to_virt(m.range.start) as *const u8, len)
                };
                let copy = BlockCopy::new(data).ok_or_else(|| {
                    alloc::format!("block={want}: no memory for a {} copy", Bytes(len as u64))
                })?;
                Some((copy, want.as_bytes().to_vec()))
            }
            None => None,
        };
        let block_bytes = block.as_ref().map_or(0, |(c, _)| c.bytes());
        let net = spec.devices.net.then(|| {
            let n = NEXT_MAC.fetch_add(1, Ordering::Relaxed).to_be_bytes();
            let mac: Mac = [0x52, 0x54, 0x00, n[1], n[2], n[3]];
            let port = SWITCH.lock().get_or_insert_with(Switch::default).add_port();
            (mac, port)
        });
        let config = BusConfig {
            console: spec.devices.console,
            block,
            net,
        };
        let bus = Bus::new(ram_pages, config, new_entropy()).map_err(|e| {
            if let Some((_, port)) = net
                && let Some(sw) = SWITCH.lock().as_mut()
            {
                sw.remove_port(port);
            }
            alloc::format!("devices: {e}")
        })?;
        Ok(Self {
            bus,
            block_module: spec.devices.block.map(ToString::to_string),
            block_bytes,
        })
    }

    /// Pages above RAM for the device page and rings.
    pub fn device_pages(&self) -> u32 {
        self.bus.device_pages()
    }

    /// `pfnlimit` for `INITIALIZE`: RAM plus the device pages.
    pub fn end_pfn(&self) -> u32 {
        self.bus.end_pfn()
    }

    /// Write the device page and zero the rings (before `INITIALIZE`).
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &mut M) -> Result<(), String> {
        self.bus.write(mem).map_err(|e| e.to_string())
    }

    /// Serve `NOTIFY(addr)`: `irq` raises a virtual irq in the guest
    /// (`LHREQ_IRQ` on its channel); console lines are printed through
    /// `console` as `guest NAME: TEXT`. Then deliver what waits
    /// ([`Self::poll`]).
    pub fn notify<M, I>(
        &mut self,
        mem: &mut M,
        addr: u32,
        name: &str,
        console: &mut GuestConsole,
        irq: I,
    ) -> Notified
    where
        M: GuestMemory + ?Sized,
        I: FnMut(u16),
    {
        let mut host = self.host(name, console, irq);
        match self.bus.notify(mem, addr, &mut host) {
            Ok(Handled::Other(_)) => Notified::Other,
            Ok(Handled::Device) => match self.bus.poll(mem, &mut host) {
                Ok(()) => Notified::Device,
                Err(e) => Notified::Kill(e.to_string()),
            },
            Err(e) => Notified::Kill(e.to_string()),
        }
    }

    /// Deliver console input and frames waiting in the switch into the
    /// guest's receive buffers, raising irqs (for a launcher about to run
    /// the guest again). `Err` is a kill reason.
    pub fn poll<M, I>(
        &mut self,
        mem: &mut M,
        name: &str,
        console: &mut GuestConsole,
        irq: I,
    ) -> Result<(), String>
    where
        M: GuestMemory + ?Sized,
        I: FnMut(u16),
    {
        let mut host = self.host(name, console, irq);
        self.bus.poll(mem, &mut host).map_err(|e| e.to_string())
    }

    /// Every ring's kick address, to bind to the service event.
    pub fn kick_addrs(&self) -> Vec<u32> {
        self.bus.kick_addrs()
    }

    /// The guest's port on the switch, if it has a network device.
    pub fn net_port(&self) -> Option<usize> {
        self.bus.net_port()
    }

    /// Buffer console input for the guest (delivered by the next
    /// [`Self::poll`] or notify); returns the bytes taken, the rest is
    /// dropped and counted.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        self.bus.push_input(bytes)
    }

    /// Counters of every device.
    #[allow(
        dead_code,
        reason = "for the concurrent launcher and the console focus"
    )]
    pub fn stats(&self) -> BusStats {
        self.bus.stats()
    }

    /// At the guest's end: print a partial console line still buffered and
    /// one line of device counters.
    pub fn finish(&mut self, name: &str, console: &mut GuestConsole) {
        let mut host = self.host(name, console, |_| {});
        self.bus.flush_console(&mut host);
        drop(host);
        let s = self.bus.stats();
        let mut line = alloc::format!(
            "guest {name} devices: console {} bytes out, {} in; rng {} bytes",
            s.console.out_bytes,
            s.console.in_bytes,
            s.rng_bytes
        );
        if let (Some(b), Some(m)) = (s.block, self.block_module.as_deref()) {
            line += &alloc::format!(
                "; block {m} ({} copy): {} reads, {} writes ({} bytes, kept in the copy), {} \
                 flushes, {} errors",
                Bytes(self.block_bytes),
                b.reads,
                b.writes,
                b.bytes_written,
                b.flushes,
                b.errors
            );
        }
        if let Some(n) = s.net {
            line += &alloc::format!(
                "; net {} frames out, {} in, {} dropped",
                n.tx_frames,
                n.rx_frames,
                n.tx_dropped + n.rx_dropped
            );
        }
        kprintln!("{}", Escaped::new(line.as_bytes()));
    }

    fn host<'a, I: FnMut(u16)>(
        &self,
        name: &'a str,
        console: &'a mut GuestConsole,
        irq: I,
    ) -> Host<'a, I> {
        Host {
            name,
            console,
            irq,
            switch: self.bus.net_port().map(|_| SWITCH.lock()),
        }
    }
}

impl Drop for GuestDevices {
    fn drop(&mut self) {
        if let Some(port) = self.bus.net_port()
            && let Some(sw) = SWITCH.lock().as_mut()
        {
            sw.remove_port(port);
        }
    }
}
