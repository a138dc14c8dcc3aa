//! The built-in launcher: one host task per guest, and the hypervisor
//! console task.
//!
//! [`start`] registers every guest module and spawns its launcher task;
//! [`task::run`] then runs them all concurrently under the scheduler. A
//! launcher task talks to its guest's core only through the control
//! channel ([`Channel`], the `/dev/lguest` protocol): it allocates the
//! guest's RAM, loads the image, writes `boot_params`, hands the RAM to the
//! core and `write(INITIALIZE, base, pfnlimit, start)`s, then `read()`s in a
//! loop the way lguest's launcher did — a notify address is served (today:
//! the early console string), `EINTR` (its time slice ended) yields the CPU
//! and reads again, `ENOENT` is the guest's end (the reason is printed),
//! `ERESTART` starts it again from its original image.
//!
//! The console task turns serial input into console actions
//! ([`rustyvisor::hvconsole`]): bytes for the guest in focus, and the
//! Ctrl-A command line (`list`, `focus`, `kill`, `restart`, `stats`,
//! `help`).

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use guest_abi::lhreq::{Errno, LhReq};
use rustyvisor::config::BenchMode;
use rustyvisor::hvconsole::{self, Action, Command, GuestInfo, GuestState, HostStats};
use rustyvisor::lguest::chan::{Channel, TaskId};
use rustyvisor::lguest::console::{ConsoleLine, Escaped, GuestConsole, LineAssembler};
use rustyvisor::lguest::guestmem::GuestMemory;
use rustyvisor::lguest::spec;
use rustyvisor::lguest::{bzimage, loader};
use rustyvisor::mm::PAGE_SIZE;
use rustyvisor::sched::{EventHandle, WaitOn};
use rustyvisor::units::Bytes;

use super::arch::cpu;
use super::bootinfo::Module;
use super::lguest::space::{GuestRam, HostGuestMemory, SpaceError};
use super::lguest::{GuestShared, KernelCore, Life, devices, probe};
use super::mem::{self, phys_to_virt};
use super::sync::IrqMutex;
use super::{console, task, time};
use crate::kprintln;

/// Most bytes of one early-console string read from the guest.
const NOTIFY_TEXT_MAX: usize = 1024;

/// Guests started (a restart counts again) and guests that powered off.
static RAN: AtomicU32 = AtomicU32::new(0);
static CLEAN: AtomicU32 = AtomicU32::new(0);
/// Launcher tasks still running.
static LIVE: AtomicU32 = AtomicU32::new(0);
/// Signalled when serial input arrives or a guest ends (the console task
/// waits on it).
static CONSOLE_EVENT: IrqMutex<Option<EventHandle>> = IrqMutex::new(None);

/// Signalled whenever a guest gives its memory back (guests waiting for
/// memory retry then).
static MEM_FREED: IrqMutex<Option<EventHandle>> = IrqMutex::new(None);

/// `bench=guests`: a guest that does not fit is not started rather than
/// waiting for memory another guest holds.
static NO_WAIT: AtomicBool = AtomicBool::new(false);
/// `bench` (`paths`): `guest_create` is still to be reported (for the first
/// guest that runs).
static CREATE_PENDING: AtomicBool = AtomicBool::new(false);
/// Launcher tasks spawned by [`start`].
static SPAWNED: AtomicU32 = AtomicU32::new(0);
/// Guests up now (they printed their first line and have not ended), the
/// most that were up at once, and the guests not started for lack of
/// memory (`bench=guests`).
static UP: AtomicU32 = AtomicU32::new(0);
static PEAK_UP: AtomicU32 = AtomicU32::new(0);
static NOT_FITTED: AtomicU32 = AtomicU32::new(0);
/// RAM (bytes) of the guests up now.
static UP_RAM: AtomicU64 = AtomicU64::new(0);

/// Host memory in use at one moment: free frames and the heap.
#[derive(Clone, Copy)]
struct MemSnap {
    free: u64,
    heap_used: u64,
    /// Frames the heap has taken (its pages and their tables).
    heap_frames: u64,
}

impl MemSnap {
    fn now() -> Self {
        let (free, _, _) = mem::frame_counts();
        let (used, _) = mem::heap_usage();
        Self {
            free,
            heap_used: used as u64,
            heap_frames: mem::heap_frames(),
        }
    }

    /// Host bytes taken since `before`: frames taken, with the heap counted
    /// by what is allocated in it rather than by the frames it grew by.
    fn taken_since(&self, before: &Self) -> i64 {
        let frames = before.free as i64
            - self.free as i64
            - (self.heap_frames as i64 - before.heap_frames as i64);
        frames * PAGE_SIZE as i64 + (self.heap_used as i64 - before.heap_used as i64)
    }
}

/// `bench=guests`: memory before the first launcher task, and what the
/// console task took (not a guest's cost).
static MEM_BASE: IrqMutex<Option<(MemSnap, i64)>> = IrqMutex::new(None);

/// `guest_overhead` as measured when every guest was up: (guests, bytes
/// per guest, its stages), printed at the end of the run ([`report_bench`]).
static OVERHEAD: IrqMutex<Option<(u32, [i64; 4])>> = IrqMutex::new(None);

/// A guest printed its first line: count it up, and in `bench=guests`,
/// when every guest started is up and none was refused, measure what each
/// costs beyond its RAM.
fn guest_up(ram: u64) {
    let up = UP.fetch_add(1, Ordering::SeqCst) + 1;
    UP_RAM.fetch_add(ram, Ordering::SeqCst);
    PEAK_UP.fetch_max(up, Ordering::SeqCst);
    if !NO_WAIT.load(Ordering::SeqCst)
        || up != SPAWNED.load(Ordering::SeqCst)
        || NOT_FITTED.load(Ordering::SeqCst) > 0
    {
        return;
    }
    let Some((base, console_task)) = *MEM_BASE.lock() else {
        return;
    };
    let now = MemSnap::now();
    let n = i64::from(up);
    let ram = UP_RAM.load(Ordering::SeqCst) as i64;
    let total = now.taken_since(&base) - console_task - ram;
    // What the guests' ledgers hold beyond RAM: device pages and linear
    // tables (and shadow tables, none for these guests).
    let held: i64 = super::lguest::guests()
        .iter()
        .map(|g| g.ledger.held() as i64 * PAGE_SIZE as i64)
        .sum::<i64>()
        - ram;
    let heap = now.heap_used as i64 - base.heap_used as i64;
    let rest = total - held - heap;
    *OVERHEAD.lock() = Some((up, [total / n, held / n, heap / n, rest / n]));
}

/// The guest that was up has ended.
fn guest_down(ram: u64) {
    UP.fetch_sub(1, Ordering::SeqCst);
    UP_RAM.fetch_sub(ram, Ordering::SeqCst);
}

/// At the end of the run (every launcher task has ended), in bench mode:
/// `guest_overhead` (if every guest was up at once) and `density` (if some
/// guest did not fit: the most guests up at once).
pub fn report_bench() {
    if !NO_WAIT.load(Ordering::SeqCst) {
        return;
    }
    // Hundreds of guests' lines may still be queued: the figures must not
    // be dropped with them.
    console::flush();
    if let Some((n, [per, held, heap, rest])) = *OVERHEAD.lock() {
        kprintln!("guests: {n} up at once; host memory beyond their RAM measured");
        probe::report_in("guest_overhead", per.max(0) as f64, "bytes", None);
        for (stage, v) in [
            ("tables_and_device_pages", held),
            ("heap", heap),
            ("task_stack_and_other", rest),
        ] {
            kprintln!(
                "{}",
                rustyvisor::bench::BenchLine::stage("guest_overhead", stage, v.max(0) as f64)
                    .in_unit("bytes")
            );
        }
    }
    let refused = NOT_FITTED.load(Ordering::SeqCst);
    let peak = PEAK_UP.load(Ordering::SeqCst);
    if refused > 0 {
        kprintln!("guests: at most {peak} up at once; {refused} did not fit");
        probe::report_in("density", f64::from(peak), "guests", None);
    } else {
        kprintln!("guests: all {peak} fit (density not measured: add guests until some do not)");
    }
}

/// The guest behind each switch port, so a frame queued for a port wakes
/// its guest's launcher.
static NET_PORTS: IrqMutex<BTreeMap<usize, Arc<GuestShared>>> = IrqMutex::new(BTreeMap::new());

/// Kicks the launcher of every other guest that has frames waiting.
fn wake_receivers(me: u64) {
    let ports: Vec<(usize, Arc<GuestShared>)> = NET_PORTS
        .lock()
        .iter()
        .map(|(p, g)| (*p, g.clone()))
        .collect();
    for (port, g) in ports {
        if g.id != me && devices::port_pending(port) {
            g.kick_launcher();
        }
    }
}

/// What a guest's launcher and the device service task share: its devices,
/// its memory and its console line assembler.
struct DevCell {
    devs: devices::GuestDevices,
    gm: HostGuestMemory,
    console: GuestConsole,
    /// The guest ended: its memory is about to go; serve nothing more.
    dead: bool,
}

/// A guest whose ring kicks the service task serves.
struct Served {
    shared: Arc<GuestShared>,
    cell: Arc<spin::Mutex<DevCell>>,
}

/// Every guest with devices, by guest id.
static SERVED: IrqMutex<BTreeMap<u64, Served>> = IrqMutex::new(BTreeMap::new());

/// The event every guest's ring kick addresses are bound to
/// (`LHREQ_EVENTFD`): the device service task waits on it.
static SERVICE_EVENT: IrqMutex<Option<EventHandle>> = IrqMutex::new(None);

/// The device service task: serves the ring kicks the guests' cores
/// absorbed through their `EVENTFD` bindings, so that a kick never makes a
/// guest's `read()` return (lguest's per-virtqueue threads; here one task
/// serves every guest, so a guest costs no extra stack). Ends when the
/// last launcher has.
fn service_main(_: u64) {
    let Some(ev) = *SERVICE_EVENT.lock() else {
        return;
    };
    while task::wait_event(ev) != 0 {
        let served: Vec<(Arc<GuestShared>, Arc<spin::Mutex<DevCell>>)> = SERVED
            .lock()
            .values()
            .map(|s| (s.shared.clone(), s.cell.clone()))
            .collect();
        for (g, cell) in served {
            let kicks = g.take_kicks();
            if kicks.is_empty() {
                continue;
            }
            let net = {
                let mut c = cell.lock();
                let DevCell {
                    devs,
                    gm,
                    console,
                    dead,
                } = &mut *c;
                if *dead {
                    continue;
                }
                for addr in kicks {
                    let irq = |n: u16| g.raise(u32::from(n));
                    if let devices::Notified::Kill(why) =
                        devs.notify(gm, addr, &g.name, console, irq)
                    {
                        g.kill(&why);
                        break;
                    }
                }
                devs.net_port().is_some()
            };
            if net {
                wake_receivers(g.id);
            }
        }
    }
}

/// What a launcher task is given.
struct Job {
    module: Module,
    /// Every module of the boot (a guest's `block=` names one).
    modules: Arc<Vec<Module>>,
    shared: Arc<GuestShared>,
    fastpath: bool,
}

/// Registers every guest module and spawns its launcher task, plus the
/// console task when there is at least one guest. Returns the number of
/// launcher tasks spawned; run them with [`task::run`].
pub fn start(modules: &[Module], fastpath: bool, bench: BenchMode) -> usize {
    let mut spawned = 0;
    NO_WAIT.store(bench == BenchMode::Guests, Ordering::SeqCst);
    CREATE_PENDING.store(bench == BenchMode::Paths, Ordering::SeqCst);
    let base = MemSnap::now();
    *MEM_FREED.lock() = Some(task::new_event());
    let mut names: Vec<String> = Vec::new();
    let all = Arc::new(modules.to_vec());
    // Modules a guest's `block=` names are data, not guests.
    let data = devices::data_modules(modules);
    for (i, m) in modules.iter().enumerate() {
        if data.get(i).copied().unwrap_or(false) {
            continue;
        }
        // A line longer than the copy in `Module` is refused here rather
        // than run cut short: the lost words could be `mem=` or the guest's
        // own options (the other guests still run).
        let spec = match spec::parse(m.cmdline.as_str(), m.cmdline_len) {
            Ok(s) => s,
            Err(e) => {
                kprintln!(
                    "guest {} not started: {e}",
                    Escaped::new(spec::name_of(m.cmdline.as_str()).as_bytes())
                );
                continue;
            }
        };
        // Every guest has its own name on the log and the console.
        let name = unique_name(&names, spec.name);
        names.push(name.clone());
        let shared = GuestShared::register(&name);
        let job = Box::new(Job {
            module: *m,
            modules: all.clone(),
            shared: shared.clone(),
            fastpath,
        });
        let arg = Box::into_raw(job) as u64;
        match task::spawn(&name, launcher_main, arg) {
            Ok(t) => {
                shared.set_task(t);
                LIVE.fetch_add(1, Ordering::SeqCst);
                spawned += 1u32;
            }
            Err(_) => {
                // SAFETY: `arg` came from `Box::into_raw` just above and no
                // task got it.
                drop(unsafe { Box::from_raw(arg as *mut Job) });
                shared.unregister();
                kprintln!("guest {name} not started: no memory for its task");
            }
        }
    }
    SPAWNED.store(spawned, Ordering::SeqCst);
    if spawned > 0 {
        *SERVICE_EVENT.lock() = Some(task::new_event());
        if task::spawn("devices", service_main, 0).is_err() {
            // Without it, kicks come back to each launcher as notifies.
            SERVICE_EVENT.lock().take();
            kprintln!("devices: no service task (no memory); launchers serve kicks");
        }
        let before = MemSnap::now();
        *CONSOLE_EVENT.lock() = Some(task::new_event());
        if task::spawn("console", console_main, 0).is_err() {
            kprintln!("console: not started (no memory for its task); serial input is ignored");
        }
        let console_task = MemSnap::now().taken_since(&before);
        *MEM_BASE.lock() = Some((base, console_task));
    }
    spawned as usize
}

/// (guests run, guests that powered off cleanly).
pub fn results() -> (u32, u32) {
    (RAN.load(Ordering::SeqCst), CLEAN.load(Ordering::SeqCst))
}

/// Serial input arrived (interrupt context): wake the console task.
pub fn on_serial_input() {
    if let Some(e) = *CONSOLE_EVENT.lock() {
        task::signal(e, 1);
    }
}

fn poke_console() {
    on_serial_input();
}

fn launcher_main(arg: u64) {
    // SAFETY: `arg` is the `Box<Job>` `start` leaked for this task alone.
    let job = unsafe { Box::from_raw(arg as *mut Job) };
    let Job {
        module,
        modules,
        shared,
        fastpath,
    } = *job;
    run_module(&module, &modules, &shared, fastpath);
    shared.set_life(Life::Dead);
    shared.unregister();
    if LIVE.fetch_sub(1, Ordering::SeqCst) == 1
        && let Some(e) = SERVICE_EVENT.lock().take()
    {
        // The last guest: the service task ends.
        task::close_event(e);
    }
    poke_console();
}

/// Runs one guest module to its end, restarting it as asked.
fn run_module(m: &Module, modules: &[Module], shared: &Arc<GuestShared>, fastpath: bool) {
    let Ok(spec) = spec::parse(m.cmdline.as_str(), m.cmdline_len) else {
        return;
    };
    let name = shared.name.as_str();
    let mut restarts = 0;
    loop {
        RAN.fetch_add(1, Ordering::SeqCst);
        match run_guest(m, modules, &spec, shared, fastpath) {
            Outcome::PowerOff => {
                CLEAN.fetch_add(1, Ordering::SeqCst);
                break;
            }
            Outcome::Restart if restarts < spec.restarts => {
                restarts += 1;
                kprintln!("guest {name} restarting ({restarts} of {})", spec.restarts);
            }
            Outcome::Restart => {
                kprintln!("guest {name} not restarted: too many restarts");
                break;
            }
            Outcome::Failed => break,
        }
    }
    let held = shared.ledger.held();
    if held == 0 {
        kprintln!("guest {name} returned all its memory");
    } else {
        kprintln!("guest {name} LEAK: {held} frames not returned");
    }
}

enum Outcome {
    PowerOff,
    Restart,
    Failed,
}

fn run_guest(
    m: &Module,
    modules: &[Module],
    spec: &spec::GuestSpec<'_>,
    shared: &Arc<GuestShared>,
    fastpath: bool,
) -> Outcome {
    let name = shared.name.as_str();
    shared.set_life(Life::Starting);
    // A kill or restart asked for the previous run is done with.
    shared.clear_request();
    // `guest_create` (bench mode): from here to the guest's first
    // instruction, the log line excluded.
    let t_start = cpu::rdtsc();
    // The guest's virtio devices; their pages follow RAM.
    let devs = match devices::GuestDevices::new(spec, modules) {
        Ok(d) => d,
        Err(e) => {
            kprintln!("guest {name} not started: {}", Escaped::new(e.as_bytes()));
            return Outcome::Failed;
        }
    };
    let mut said = false;
    let ram = loop {
        match GuestRam::with_device_pages(spec.mem, devs.device_pages(), &shared.ledger) {
            Ok(r) => break r,
            // Other guests hold the memory: wait for one of them to give
            // it back, as long as any is still running.
            // `bench=guests`: the count of guests that fit is the figure;
            // one that does not fit is refused at once.
            Err(SpaceError::OutOfMemory) if NO_WAIT.load(Ordering::SeqCst) => {
                NOT_FITTED.fetch_add(1, Ordering::SeqCst);
                kprintln!(
                    "guest {name} not started: out of memory for {} RAM ({} guests up)",
                    Bytes(spec.mem),
                    UP.load(Ordering::SeqCst)
                );
                return Outcome::Failed;
            }
            Err(SpaceError::OutOfMemory) if others_hold_memory(shared) => {
                // `kill` works on a guest that is still waiting.
                if let Some(why) = shared.kill_requested() {
                    kprintln!("guest {name} killed: {}", Escaped::new(why.as_bytes()));
                    return Outcome::Failed;
                }
                if !said {
                    kprintln!(
                        "guest {name} waiting for {} of memory (other guests hold it)",
                        Bytes(spec.mem)
                    );
                    said = true;
                }
                let ev = *MEM_FREED.lock();
                match ev {
                    Some(e) => {
                        task::take_event(e);
                        if others_hold_memory(shared) {
                            task::block(WaitOn::Event(e), None);
                        }
                    }
                    None => task::yield_now(),
                }
            }
            Err(e) => {
                kprintln!(
                    "guest {name} not started: cannot allocate {}: {e:?}",
                    Bytes(spec.mem)
                );
                return Outcome::Failed;
            }
        }
    };
    let (Ok(limit), Ok(total)) = (u32::try_from(ram.bytes()), u32::try_from(ram.total_bytes()))
    else {
        return Outcome::Failed;
    };
    let (base, bytes) = (ram.base(), ram.bytes());
    let t_alloc = cpu::rdtsc();
    // SAFETY: `ram` is this guest's memory (RAM and device pages), mapped
    // in the direct map; it moves into the core below, which keeps it until
    // `chan` is closed at the end of this function, after the last use of
    // `gm`.
    let mut gm = unsafe { HostGuestMemory::new(base, total) };
    // The module's bytes, through the direct map (modules are reserved).
    let image_len = m.range.len() as usize;
    // SAFETY: the module range was reserved at boot and is never reused.
    let image =
        unsafe { core::slice::from_raw_parts(phys_to_virt(m.range.start) as *const u8, image_len) };
    let entry = match load_image(image, modules, spec, &mut gm, limit) {
        Ok(e) => e,
        Err(e) => {
            kprintln!("guest {name} not started: {}", Escaped::new(e.as_bytes()));
            return Outcome::Failed;
        }
    };
    // The device page and zeroed rings, above RAM.
    if let Err(e) = devs.write(&mut gm) {
        kprintln!("guest {name} not started: {}", Escaped::new(e.as_bytes()));
        return Outcome::Failed;
    }
    let t_load = cpu::rdtsc();
    kprintln!(
        "guest {name} starting: {} RAM, entry {entry:#x}, args \"{}\"",
        Bytes(bytes),
        Escaped::new(spec.args.as_bytes())
    );

    let exits_before = (
        shared.exits.load(Ordering::Relaxed),
        shared.fast_exits.load(Ordering::Relaxed),
    );
    let t_init = cpu::rdtsc();
    let owner = task::current().unwrap_or(TaskId(0));
    let core = KernelCore::new(shared.clone(), ram, fastpath, spec.paging);
    let mut chan = Channel::new(core, owner);
    let init = [
        LhReq::Initialize as u64,
        base,
        u64::from(devs.end_pfn()), // RAM plus device pages
        u64::from(entry),
    ];
    if let Err(e) = chan.write(owner, &init) {
        kprintln!("guest {name} not started: INITIALIZE failed: errno {}", e.0);
        chan.close();
        return Outcome::Failed;
    }
    let t_initialized = cpu::rdtsc();
    let port = devs.net_port();
    if let Some(p) = port {
        NET_PORTS.lock().insert(p, shared.clone());
    }
    // Every ring's kick goes to the service task: bound with EVENTFD, a
    // kick is absorbed by the core and never makes `read()` return.
    let service = *SERVICE_EVENT.lock();
    if let Some(ev) = service {
        for addr in devs.kick_addrs() {
            if let Err(e) = chan.write(owner, &[LhReq::Eventfd as u64, u64::from(addr), ev.0]) {
                kprintln!(
                    "guest {name}: kicks of {addr:#x} come back as notifies (EVENTFD errno {})",
                    e.0
                );
            }
        }
    }
    let device_pages = devs.device_pages();
    let kick_addrs = devs.kick_addrs();
    let absorbed_before = shared.kicks_absorbed.load(Ordering::Relaxed);
    // Kicks that came back to this loop as notifies.
    let mut kicks_here = 0u64;
    let cell = Arc::new(spin::Mutex::new(DevCell {
        devs,
        gm,
        console: GuestConsole::new(),
        dead: false,
    }));
    SERVED.lock().insert(
        shared.id,
        Served {
            shared: shared.clone(),
            cell: cell.clone(),
        },
    );
    let mut create_pending = CREATE_PENDING.swap(false, Ordering::SeqCst);
    // RAM of this guest while it counts as up (it printed a line).
    let mut up: Option<u64> = None;
    let mut buf = [0u8; 4];
    let mut text = [0u8; NOTIFY_TEXT_MAX];
    // The early console's partial line.
    let mut early = LineAssembler::new();
    let outcome = loop {
        let read = chan.read(owner, &mut buf);
        if create_pending && let Some(first) = chan.core().first_entry_tsc() {
            create_pending = false;
            report_create(t_start, [t_alloc, t_load], [t_init, t_initialized], first);
        }
        let irq = |n: u16| {
            let _ = chan.write(owner, &[LhReq::Irq as u64, u64::from(n)]);
        };
        match read {
            Ok(_) => {
                let addr = u32::from_le_bytes(buf);
                if kick_addrs.contains(&addr) {
                    kicks_here += 1;
                }
                let mut c = cell.lock();
                let DevCell {
                    devs, gm, console, ..
                } = &mut *c;
                // Status changes (and kicks, without a service task); misuse
                // kills the guest.
                match devs.notify(gm, addr, name, console, irq) {
                    devices::Notified::Device => {
                        drop(c);
                        if port.is_some() {
                            wake_receivers(shared.id);
                        }
                        continue;
                    }
                    devices::Notified::Kill(why) => {
                        kprintln!("guest {name} killed: {}", Escaped::new(why.as_bytes()));
                        break Outcome::Failed;
                    }
                    devices::Notified::Other => {}
                }
                match gm.read_cstr_bytes(addr, &mut text) {
                    Ok(s) => {
                        // Its first line: the guest is up (booted and
                        // printing), for `density` and `guest_overhead`.
                        if up.is_none() && !s.is_empty() {
                            up = Some(bytes);
                            guest_up(bytes);
                        }
                        // Pieces join into lines (Linux's early console
                        // sends 16-byte chunks).
                        early.push(s, |l| print_line(console, name, l));
                    }
                    Err(_) => kprintln!("guest {name} notified {addr:#x}: no device there"),
                }
            }
            // The slice is over: give the CPU back, then run on.
            Err(e) if e == Errno::EINTR => task::yield_now(),
            // The devices have work: console input, frames from the switch.
            Err(e) if e == Errno::EAGAIN => {
                let input = shared.take_input();
                let mut c = cell.lock();
                let DevCell {
                    devs, gm, console, ..
                } = &mut *c;
                if !input.is_empty() {
                    devs.push_input(&input);
                }
                if let Err(why) = devs.poll(gm, name, console, irq) {
                    kprintln!("guest {name} killed: {}", Escaped::new(why.as_bytes()));
                    break Outcome::Failed;
                }
                drop(c);
                if port.is_some() {
                    wake_receivers(shared.id);
                }
            }
            Err(e) if e == Errno::ERESTART => break Outcome::Restart,
            Err(e) if e == Errno::ENOENT => {
                let reason = chan.death_reason().unwrap_or("killed");
                if reason.starts_with("power off") {
                    kprintln!("guest {name} powered off");
                    if let Some(msg) = reason.strip_prefix("power off: ") {
                        log::info!(
                            "guest {name} shutdown message: {}",
                            Escaped::new(msg.as_bytes())
                        );
                    }
                    break Outcome::PowerOff;
                }
                kprintln!("guest {name} killed: {}", Escaped::new(reason.as_bytes()));
                break Outcome::Failed;
            }
            Err(e) => {
                kprintln!("guest {name} failed: read returned errno {}", e.0);
                break Outcome::Failed;
            }
        }
    };
    if let Some(ram) = up {
        guest_down(ram);
    }
    if let Some(p) = port {
        NET_PORTS.lock().remove(&p);
    }
    // The service task serves nothing more for this guest; it holds no
    // reference to the cell while it waits, so dropping ours below frees
    // the devices (block copy, switch port) before the memory check.
    SERVED.lock().remove(&shared.id);
    {
        let mut c = cell.lock();
        c.dead = true;
        let DevCell { devs, console, .. } = &mut *c;
        early.finish(|l| print_line(console, name, l));
        devs.finish(name, console); // last partial line, counters
        let (lines, dropped) = console.dropped();
        if lines > 0 {
            kprintln!(
                "guest {name} console: {lines} lines ({dropped} bytes) dropped: over the rate limit"
            );
        }
    }
    drop(cell);
    let absorbed = shared.kicks_absorbed.load(Ordering::Relaxed) - absorbed_before;
    if absorbed + kicks_here > 0 {
        kprintln!(
            "guest {name} kicks: {absorbed} to the device task, {kicks_here} to the launcher"
        );
    }
    kprintln!(
        "guest {name} used {} exits ({} handled where they landed), {} of host memory beyond its RAM",
        shared.exits.load(Ordering::Relaxed) - exits_before.0,
        shared.fast_exits.load(Ordering::Relaxed) - exits_before.1,
        // The device pages are host memory beyond RAM too.
        Bytes(chan.core().overhead_bytes() + u64::from(device_pages) * PAGE_SIZE)
    );
    if let Some(st) = chan.core().shadow_stats() {
        kprintln!(
            "guest {name} shadow paging: {} switches ({} to a cached shadow), {} fills, {} faults \
             reflected, {} evictions, at most {} table pages",
            st.hits + st.misses,
            st.hits,
            st.fills,
            st.reflected,
            st.evictions,
            st.peak_frames
        );
    }
    chan.close();
    if let Some(e) = *MEM_FREED.lock() {
        task::signal(e, 1);
    }
    outcome
}

/// Prints `guest_create` and its stages: from `start` (the launcher begins
/// the guest) through `alloc` (its RAM and device pages allocated and
/// zeroed) and `load` (ELF image, `boot_params`, device page and rings),
/// then from `init[0]` to `init[1]` (the core made and `INITIALIZE`: the
/// linear tables, the vCPU and its FPU area), to `first` (the first entry
/// into the guest: the launcher's `read()` and the run loop's preparation).
/// The log line between `load` and `init[0]` is not counted.
fn report_create(start: u64, [alloc, load]: [u64; 2], [init, initialized]: [u64; 2], first: u64) {
    let d = |a: u64, b: u64| b.saturating_sub(a) as f64;
    let total = d(start, load) + d(init, first);
    probe::report("guest_create", total, None);
    probe::report_stage("guest_create", "alloc", d(start, alloc));
    probe::report_stage("guest_create", "load", d(alloc, load));
    probe::report_stage("guest_create", "initialize", d(init, initialized));
    probe::report_stage("guest_create", "first_entry", d(initialized, first));
}

/// Prints one line of a guest's early console through its console's
/// escaping and rate cap.
fn print_line(console: &mut GuestConsole, name: &str, line: &[u8]) {
    console.write(time::now_ns(), line, |l| match l {
        ConsoleLine::Text(t) => kprintln!("guest {name}: {t}"),
        ConsoleLine::Dropped { lines, bytes } => kprintln!(
            "guest {name} console: {lines} lines ({bytes} bytes) dropped: over the rate limit"
        ),
    });
}

/// Loads the guest's image into its memory and writes its `boot_params`:
/// an ELF guest (the Rust test guests) or a Linux bzImage (boot protocol
/// 2.07+, with `initrd=MODULE` at the top of RAM). Returns the entry point.
fn load_image(
    image: &[u8],
    modules: &[Module],
    spec: &spec::GuestSpec<'_>,
    gm: &mut HostGuestMemory,
    ram: u32,
) -> Result<u32, String> {
    match bzimage::ImageKind::detect(image) {
        bzimage::ImageKind::Elf => {
            if spec.initrd.is_some() {
                return Err(String::from("initrd= is for Linux (bzImage) guests"));
            }
            let entry = loader::load_elf(image, gm).map_err(|e| format!("bad image: {e}"))?;
            loader::write_boot_params(gm, ram, &spec.args).map_err(|e| format!("{e}"))?;
            Ok(entry)
        }
        bzimage::ImageKind::BzImage => {
            let bz = bzimage::parse(image).map_err(|e| format!("bad bzImage: {e}"))?;
            let initrd = match spec.initrd {
                Some(want) => {
                    let m = modules
                        .iter()
                        .find(|m| spec::name_of(m.cmdline.as_str()) == want)
                        .ok_or_else(|| format!("initrd={want}: no module named {want}"))?;
                    // SAFETY: module ranges were reserved at boot and are
                    // never reused.
                    Some(unsafe {
                        core::slice::from_raw_parts(
                            phys_to_virt(m.range.start) as *const u8,
                            m.range.len() as usize,
                        )
                    })
                }
                None => None,
            };
            let entry = bzimage::load(&bz, image, gm, ram, &spec.args, initrd)
                .map_err(|e| format!("bad bzImage: {e}"))?;
            log::info!("linux: {entry}");
            Ok(entry.entry)
        }
        bzimage::ImageKind::Unknown => Err(String::from(
            "bad image: neither an ELF guest nor a Linux bzImage",
        )),
    }
}

/// Whether a guest other than `me` holds memory now (so waiting for it
/// can succeed).
fn others_hold_memory(me: &GuestShared) -> bool {
    super::lguest::guests()
        .iter()
        .any(|g| g.id != me.id && g.ledger.held() > 0)
}

/// A guest's name on the log and the console: the module's name, or
/// `NAME-N` (the smallest N from 2 not taken) when an earlier module has
/// that name already (several modules may share one; `focus` and `kill`
/// need one guest per name, and so does reading the log).
fn unique_name(taken: &[String], name: &str) -> String {
    if !taken.iter().any(|t| t == name) {
        return String::from(name);
    }
    let mut n = 2u32;
    loop {
        let candidate = format!("{name}-{n}");
        if !taken.contains(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

/// The console task: serial input → [`hvconsole::Console`] → actions.
/// Ends when the last launcher task has.
fn console_main(_: u64) {
    let Some(event) = *CONSOLE_EVENT.lock() else {
        return;
    };
    let mut con = hvconsole::Console::default();
    // (console name, guest id) of the guests the console knows.
    let mut known: Vec<(String, u64)> = Vec::new();
    let mut actions = Vec::new();
    // CPU time of each guest's task at the last `list`, for its CPU share.
    let mut last_cpu: Vec<(u64, u64)> = Vec::new();
    let mut last_list = time::now_ns();
    loop {
        // Take the wake-ups now: input arriving from here on signals again.
        task::take_event(event);
        // Keep the console's guest list in step with the registry.
        let live = super::lguest::guests();
        known.retain(|(n, id)| {
            let alive = live.iter().any(|g| g.id == *id);
            if !alive {
                con.remove_guest(n, &mut actions);
            }
            alive
        });
        for g in &live {
            if !known.iter().any(|(_, id)| *id == g.id) && con.add_guest(&g.name).is_ok() {
                known.push((g.name.clone(), g.id));
            }
        }
        let mut input = [0u8; 64];
        let mut n = 0;
        while n < input.len() {
            match console::read_byte() {
                Some(b) => {
                    if let Some(slot) = input.get_mut(n) {
                        *slot = b;
                    }
                    n += 1;
                }
                None => break,
            }
        }
        if let Some(bytes) = input.get(..n) {
            con.input(bytes, &mut actions);
        }
        for a in actions.drain(..) {
            match a {
                Action::ToGuest { guest, bytes } => {
                    let id = known.iter().find(|(n, _)| *n == guest).map(|(_, id)| *id);
                    if let Some(g) = live.iter().find(|g| Some(g.id) == id) {
                        g.push_input(&bytes);
                    }
                }
                Action::Echo(bytes) => console::write_raw(&bytes, prompt_line(&con)),
                Action::Print(line) => kprintln!("{line}"),
                Action::Run(cmd) => {
                    run_command(&con, cmd, &known, &live, &mut last_cpu, &mut last_list)
                }
            }
        }
        if LIVE.load(Ordering::SeqCst) == 0 {
            break;
        }
        // Input that arrived since the take above left the count non-zero:
        // then this does not block.
        task::block(WaitOn::Event(event), None);
    }
    if let Some(e) = CONSOLE_EVENT.lock().take() {
        task::close_event(e);
    }
}

/// The open command line as it is shown (prompt and text), without the
/// line end `redraw` starts with.
fn prompt_line(con: &hvconsole::Console) -> Option<Vec<u8>> {
    let mut bytes = con.redraw()?;
    let start = bytes
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    bytes.drain(..start);
    Some(bytes)
}

fn run_command(
    con: &hvconsole::Console,
    cmd: Command,
    known: &[(String, u64)],
    live: &[Arc<GuestShared>],
    last_cpu: &mut Vec<(u64, u64)>,
    last_list: &mut u64,
) {
    let find = |name: &str| {
        let id = known.iter().find(|(n, _)| n == name).map(|(_, id)| *id)?;
        live.iter().find(|g| g.id == id)
    };
    match cmd {
        Command::List => {
            let now = time::now_ns();
            let interval = now.saturating_sub(*last_list).max(1);
            let mut infos = Vec::new();
            let mut cpu_now = Vec::new();
            for (n, id) in known {
                let Some(g) = live.iter().find(|g| g.id == *id) else {
                    continue;
                };
                let cpu = task::cpu_ns(g.task());
                let before = last_cpu
                    .iter()
                    .find(|(i, _)| i == id)
                    .map_or(0, |(_, c)| *c);
                cpu_now.push((*id, cpu));
                let permille = (u128::from(cpu.saturating_sub(before)) * 1000
                    / u128::from(interval))
                .min(1000) as u32;
                infos.push((
                    n.as_str(),
                    match g.life() {
                        Life::Halted => GuestState::Halted,
                        Life::Dead => GuestState::Dead,
                        Life::Starting if g.exits.load(Ordering::Relaxed) > 0 => {
                            GuestState::Restarting
                        }
                        _ => GuestState::Running,
                    },
                    g.ledger.held() * PAGE_SIZE,
                    g.exits.load(Ordering::Relaxed),
                    permille,
                ));
            }
            let infos: Vec<GuestInfo<'_>> = infos
                .iter()
                .map(|&(name, state, mem, exits, cpu_permille)| GuestInfo {
                    name,
                    state,
                    mem,
                    exits,
                    cpu_permille,
                })
                .collect();
            for line in con.list(&infos) {
                kprintln!("{line}");
            }
            *last_cpu = cpu_now;
            *last_list = now;
        }
        Command::Stats => {
            let (free, _, managed) = mem::frame_counts();
            let (sched, tasks, runnable) = task::stats();
            let host = HostStats {
                uptime_ns: time::now_ns(),
                mem_total: managed * PAGE_SIZE,
                mem_free: free * PAGE_SIZE,
                tasks,
                runnable,
                sched,
            };
            for line in con.stats(&host) {
                kprintln!("{line}");
            }
        }
        Command::Kill(name) => match find(&name) {
            Some(g) => {
                kprintln!("console: killing guest {name}");
                g.kill("killed from the console");
            }
            None => kprintln!("console: no guest {name}"),
        },
        Command::Restart(name) => match find(&name) {
            Some(g) => {
                kprintln!("console: restarting guest {name}");
                g.restart();
            }
            None => kprintln!("console: no guest {name}"),
        },
    }
}
