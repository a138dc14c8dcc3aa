//! `selftest=channel`: every error case of the control channel's errno
//! table (`rustyvisor::lguest::chan`, module docs) driven against the real
//! core ([`KernelCore`]) with real guest images, the way the launcher talks
//! to it: a [`Channel`] owned by a host task, the guest's RAM handed to the
//! core as a capability, `INITIALIZE`, then `read()` until the guest ends.
//!
//! It needs two guest modules: one that powers off (e.g. `hello`) and one
//! that asks for a restart on every boot (`lgtest,mode=restart`). Each
//! checked errno (or result) is one case; the summary line
//! `selftest: channel ok (N cases)` counts them. Any mismatch is a
//! `selftest failed: channel: ...` panic that names the case.
//!
//! Runs in a host task of its own (a halted guest blocks its task, and the
//! core's run loop asks `task::need_resched`), before the launcher starts
//! the modules as usual.

extern crate alloc;

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::fmt::Debug;
use core::sync::atomic::{AtomicU32, Ordering};

use guest_abi::lhreq::{Errno, INITIALIZE_RESULT, LhReq};
use rustyvisor::config::{Config, SelfTest};
use rustyvisor::lguest::chan::{Channel, TaskId};
use rustyvisor::lguest::console::{ConsoleLine, GuestConsole};
use rustyvisor::lguest::guestmem::GuestMemory;
use rustyvisor::lguest::{loader, spec};
use rustyvisor::mm::PAGE_SIZE;

use super::super::bootinfo::{BootInfo, Module};
use super::super::lguest::space::{GuestRam, HostGuestMemory, Ledger};
use super::super::lguest::{GuestShared, KernelCore};
use super::super::mem::{self, phys_to_virt};
use super::super::{task, time};
use super::fail;
use crate::kprintln;

const INIT: u64 = LhReq::Initialize as u64;
const GETDMA: u64 = LhReq::GetDma as u64;
const IRQ: u64 = LhReq::Irq as u64;
const BREAK: u64 = LhReq::Break as u64;
const EVENTFD: u64 = LhReq::Eventfd as u64;

/// Cases checked so far.
static CASES: AtomicU32 = AtomicU32::new(0);

/// A task id that is not the owner's (no task has it: ids count up from 1).
const OTHER: TaskId = TaskId(u64::MAX);

/// What the test task is given.
struct Job {
    /// A guest that powers off.
    poweroff: Module,
    /// A guest that asks for a restart on every boot.
    restart: Module,
    fastpath: bool,
}

/// `selftest=channel` (after the lguest CPU setup, before the launcher).
pub fn channel(cfg: &Config, boot: &BootInfo) {
    if !cfg.selftests.contains(SelfTest::Channel) {
        return;
    }
    let restarts = |m: &Module| {
        spec::parse(m.cmdline.as_str(), m.cmdline_len)
            .ok()
            .map(|s| s.args.split(' ').any(|w| w == "mode=restart"))
    };
    let poweroff = boot.modules().find(|m| restarts(m) == Some(false));
    let restart = boot.modules().find(|m| restarts(m) == Some(true));
    let (Some(poweroff), Some(restart)) = (poweroff, restart) else {
        fail(format_args!(
            "channel: needs a guest module that powers off (e.g. hello) and one that restarts \
             (lgtest,mode=restart)"
        ));
    };
    let (free_before, _, _) = mem::frame_counts();
    let job = Box::new(Job {
        poweroff,
        restart,
        fastpath: cfg.fastpath,
    });
    let arg = Box::into_raw(job) as u64;
    if task::spawn("selftest", channel_task, arg).is_err() {
        // SAFETY: `arg` came from `Box::into_raw` just above and no task
        // got it.
        drop(unsafe { Box::from_raw(arg as *mut Job) });
        fail(format_args!("channel: no stack for the test task"));
    }
    let ended = task::run();
    let (free_after, _, _) = mem::frame_counts();
    if ended != 1 || free_after != free_before {
        fail(format_args!(
            "channel: {ended} of 1 task ended, {} frames not returned",
            free_before.abs_diff(free_after)
        ));
    }
    kprintln!(
        "selftest: channel ok ({} cases)",
        CASES.load(Ordering::SeqCst)
    );
}

/// One case: `got` must be `want`.
fn check<T: PartialEq + Debug>(what: &str, got: Result<T, Errno>, want: Result<T, Errno>) {
    if got != want {
        fail(format_args!(
            "channel: {what}: got {got:?}, expected {want:?}"
        ));
    }
    CASES.fetch_add(1, Ordering::SeqCst);
}

/// One case that is a plain fact.
fn check_that(what: &str, ok: bool) {
    if !ok {
        fail(format_args!("channel: {what}"));
    }
    CASES.fetch_add(1, Ordering::SeqCst);
}

/// A guest loaded and ready for `INITIALIZE`, as the launcher prepares it.
struct Guest {
    name: &'static str,
    shared: Arc<GuestShared>,
    chan: Channel<KernelCore>,
    /// A view of the guest's RAM (owned by the core in `chan`).
    gm: HostGuestMemory,
    base: u64,
    pfnlimit: u64,
    bytes: u64,
    entry: u32,
    owner: TaskId,
}

impl Guest {
    fn load(m: &Module, name: &'static str, fastpath: bool) -> Self {
        let Some(owner) = task::current() else {
            fail(format_args!("channel: not in a task"));
        };
        let spec = match spec::parse(m.cmdline.as_str(), m.cmdline_len) {
            Ok(s) => s,
            Err(e) => fail(format_args!("channel: {name}: {e}")),
        };
        let shared = GuestShared::register(name);
        shared.set_task(owner);
        let ram = match GuestRam::new(spec.mem, &shared.ledger) {
            Ok(r) => r,
            Err(e) => fail(format_args!("channel: {name}: no RAM: {e:?}")),
        };
        let (base, bytes, total) = (ram.base(), ram.bytes(), ram.total_bytes());
        let (Ok(limit), Ok(total32)) = (u32::try_from(bytes), u32::try_from(total)) else {
            fail(format_args!("channel: {name}: RAM too large"));
        };
        // SAFETY: `ram` is this guest's memory, mapped in the direct map; it
        // moves into the core below, which keeps it until the channel is
        // closed by `finish`, which consumes this `Guest` (and `gm` with it).
        let mut gm = unsafe { HostGuestMemory::new(base, total32) };
        // SAFETY: the module range was reserved at boot and is never reused;
        // the direct map covers it.
        let image = unsafe {
            core::slice::from_raw_parts(
                phys_to_virt(m.range.start) as *const u8,
                m.range.len() as usize,
            )
        };
        let entry = match loader::load_elf(image, &mut gm) {
            Ok(e) => e,
            Err(e) => fail(format_args!("channel: {name}: bad image: {e}")),
        };
        if let Err(e) = loader::write_boot_params(&mut gm, limit, &spec.args) {
            fail(format_args!("channel: {name}: {e}"));
        }
        let core = KernelCore::new(shared.clone(), ram, fastpath, spec.paging);
        Self {
            name,
            shared,
            chan: Channel::new(core, owner),
            gm,
            base,
            pfnlimit: total / PAGE_SIZE,
            bytes: total,
            entry,
            owner,
        }
    }

    fn write(&mut self, words: &[u64]) -> Result<usize, Errno> {
        self.chan.write(self.owner, words)
    }

    fn read(&mut self, len: usize) -> Result<usize, Errno> {
        let mut buf = [0u8; 8];
        let buf = buf.get_mut(..len).unwrap_or(&mut []);
        self.chan.read(self.owner, buf)
    }

    /// `INITIALIZE` with the right arguments.
    fn initialize(&mut self) -> Result<usize, Errno> {
        let words = [INIT, self.base, self.pfnlimit, u64::from(self.entry)];
        self.write(&words)
    }

    /// One `read` that runs the guest: its early-console text is printed as
    /// `selftest: channel: NAME: TEXT`, `EINTR` yields and reads again. The
    /// first other result is returned.
    fn read_running(&mut self, console: &mut GuestConsole) -> Result<usize, Errno> {
        let mut buf = [0u8; 4];
        loop {
            match self.chan.read(self.owner, &mut buf) {
                Err(e) if e == Errno::EINTR => task::yield_now(),
                Ok(n) => {
                    let mut text = [0u8; 256];
                    let name = self.name;
                    match self.gm.read_cstr_bytes(u32::from_le_bytes(buf), &mut text) {
                        Ok(s) => console.write(time::now_ns(), s, |line| {
                            if let ConsoleLine::Text(t) = line {
                                kprintln!("selftest: channel: {name}: {t}");
                            }
                        }),
                        Err(_) => fail(format_args!("channel: {name}: notify outside memory")),
                    }
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until the guest ends; returns the errno that ended it.
    fn run_to_end(&mut self, console: &mut GuestConsole) -> Errno {
        loop {
            if let Err(e) = self.read_running(console) {
                return e;
            }
        }
    }

    /// Closes the channel; every frame of the guest must be back.
    fn finish(self) {
        let Self { shared, chan, .. } = self;
        chan.close();
        shared.unregister();
        check_that(
            "every frame of a closed guest is back",
            shared.ledger.held() == 0,
        );
    }
}

fn channel_task(arg: u64) {
    // SAFETY: `arg` is the `Box<Job>` `channel` leaked for this task alone.
    let job = unsafe { Box::from_raw(arg as *mut Job) };
    poweroff_guest(&job.poweroff, job.fastpath);
    restart_guest(&job.restart, job.fastpath);
    console_requests(&job.poweroff, job.fastpath);
}

/// Every error case before, during and after the life of a guest that
/// powers off.
fn poweroff_guest(m: &Module, fastpath: bool) {
    let mut g = Guest::load(m, "chantest", fastpath);
    let (base, pfn, start) = (g.base, g.pfnlimit, u64::from(g.entry));
    let ram_frames = g.shared.ledger.held();

    // Before INITIALIZE.
    check("empty write", g.write(&[]), Err(Errno::EINVAL));
    check(
        "IRQ before INITIALIZE",
        g.write(&[IRQ, 1]),
        Err(Errno::EINVAL),
    );
    check(
        "BREAK before INITIALIZE",
        g.write(&[BREAK, 1]),
        Err(Errno::EINVAL),
    );
    check("read before INITIALIZE", g.read(4), Err(Errno::EINVAL));
    check(
        "INITIALIZE by a non-owner",
        g.chan.write(OTHER, &[INIT, base, pfn, start]),
        Err(Errno::EPERM),
    );
    check(
        "INITIALIZE with 2 payload words",
        g.write(&[INIT, base, pfn]),
        Err(Errno::EINVAL),
    );
    check(
        "INITIALIZE with no payload",
        g.write(&[INIT]),
        Err(Errno::EINVAL),
    );
    // Memory that is not the guest's RAM object.
    check(
        "INITIALIZE at the direct map's start (physical 0)",
        g.write(&[INIT, mem::DIRECT_MAP_BASE, pfn, start]),
        Err(Errno::EFAULT),
    );
    let image = (&raw const CASES) as u64 & !(PAGE_SIZE - 1);
    check(
        "INITIALIZE at the hypervisor's own image",
        g.write(&[INIT, image, pfn, start]),
        Err(Errno::EFAULT),
    );
    {
        let other = match GuestRam::new(4 << 20, &Ledger::default()) {
            Ok(r) => r,
            Err(e) => fail(format_args!("channel: no RAM for another object: {e:?}")),
        };
        check(
            "INITIALIZE at another allocation",
            g.write(&[INIT, other.base(), other.total_bytes() / PAGE_SIZE, 0]),
            Err(Errno::EFAULT),
        );
    }
    check(
        "INITIALIZE one page into the RAM",
        g.write(&[INIT, base + PAGE_SIZE, pfn - 1, 0]),
        Err(Errno::EFAULT),
    );
    check(
        "INITIALIZE at a misaligned base",
        g.write(&[INIT, base + 1, pfn, start]),
        Err(Errno::EFAULT),
    );
    check(
        "INITIALIZE with a base that wraps",
        g.write(&[INIT, !(PAGE_SIZE - 1), pfn, start]),
        Err(Errno::EFAULT),
    );
    check(
        "INITIALIZE with pfnlimit one page past the RAM object",
        g.write(&[INIT, base, pfn + 1, start]),
        Err(Errno::EFAULT),
    );
    check(
        "INITIALIZE with pfnlimit 0",
        g.write(&[INIT, base, 0, 0]),
        Err(Errno::EINVAL),
    );
    check(
        "INITIALIZE with the entry past memory",
        g.write(&[INIT, base, pfn, g.bytes]),
        Err(Errno::EINVAL),
    );
    check_that(
        "a refused INITIALIZE takes no frame",
        g.shared.ledger.held() == ram_frames,
    );
    // The retry with the right arguments.
    check("INITIALIZE", g.initialize(), Ok(INITIALIZE_RESULT));
    check_that(
        "INITIALIZE charges its tables to the guest",
        g.shared.ledger.held() > ram_frames,
    );
    check("INITIALIZE twice", g.initialize(), Err(Errno::EBUSY));
    check(
        "INITIALIZE twice by a non-owner",
        g.chan.write(OTHER, &[INIT, base, pfn, start]),
        Err(Errno::EBUSY),
    );

    // Requests on a live guest.
    check("IRQ 32", g.write(&[IRQ, 32]), Err(Errno::EINVAL));
    check("IRQ 2^32", g.write(&[IRQ, 1 << 32]), Err(Errno::EINVAL));
    check("IRQ without a number", g.write(&[IRQ]), Err(Errno::EINVAL));
    check("BREAK 2", g.write(&[BREAK, 2]), Err(Errno::EINVAL));
    check(
        "BREAK without a value",
        g.write(&[BREAK]),
        Err(Errno::EINVAL),
    );
    check("GETDMA", g.write(&[GETDMA, 0]), Err(Errno::EINVAL));
    check(
        "an unknown request",
        g.write(&[99, 1, 2]),
        Err(Errno::EINVAL),
    );
    check(
        "EVENTFD at address 0",
        g.write(&[EVENTFD, 0, 1]),
        Err(Errno::EINVAL),
    );
    check(
        "EVENTFD at address 2^32",
        g.write(&[EVENTFD, 1 << 32, 1]),
        Err(Errno::EINVAL),
    );
    check(
        "EVENTFD without a handle",
        g.write(&[EVENTFD, 0x1000]),
        Err(Errno::EINVAL),
    );
    check("read into 3 bytes", g.read(3), Err(Errno::EINVAL));
    check(
        "read by a non-owner",
        g.chan.read(OTHER, &mut [0u8; 4]),
        Err(Errno::EPERM),
    );
    check_that("the guest has not run yet", !g.chan.is_dead());

    // BREAK: any task may ask; the owner's next read is EAGAIN, once.
    check(
        "BREAK 1 by another task",
        g.chan.write(OTHER, &[BREAK, 1]),
        Ok(0),
    );
    check("read after BREAK 1", g.read(4), Err(Errno::EAGAIN));
    let mut console = GuestConsole::new();
    let after = g.read_running(&mut console);
    check_that(
        "only one EAGAIN per BREAK (the next read runs the guest)",
        after == Ok(4),
    );
    check("BREAK 1", g.write(&[BREAK, 1]), Ok(0));
    check("BREAK 0", g.write(&[BREAK, 0]), Ok(0));
    let after = g.read_running(&mut console);
    check_that(
        "BREAK 0 withdraws a pending break",
        after != Err(Errno::EAGAIN),
    );

    // The guest's end.
    let end = match after {
        Err(e) => e,
        Ok(_) => g.run_to_end(&mut console),
    };
    check("the guest's end", Err::<(), _>(end), Err(Errno::ENOENT));
    let reason = g.chan.death_reason().unwrap_or("");
    check_that(
        "the reason of a guest that powered off is \"power off...\"",
        reason.starts_with("power off"),
    );
    let mut text = [0u8; 64];
    let n = g.chan.read_reason(&mut text);
    check_that(
        "read_reason gives the reason",
        n.is_ok_and(|n| text.get(..9) == Some(b"power off".as_slice()) && n > 9),
    );
    check("read after the end", g.read(4), Err(Errno::ENOENT));
    check("read again after the end", g.read(8), Err(Errno::ENOENT));
    check(
        "read by a non-owner after the end",
        g.chan.read(OTHER, &mut [0u8; 4]),
        Err(Errno::EPERM),
    );
    for (what, words) in [
        ("INITIALIZE after the end", &[INIT, base, pfn, start][..]),
        ("IRQ after the end", &[IRQ, 1]),
        ("IRQ 99 after the end", &[IRQ, 99]),
        ("BREAK after the end", &[BREAK, 1]),
        ("EVENTFD after the end", &[EVENTFD, 0x1000, 1]),
        ("GETDMA after the end", &[GETDMA]),
        ("an unknown request after the end", &[99]),
    ] {
        check(what, g.write(words), Err(Errno::ENOENT));
        check(what, g.chan.write(OTHER, words), Err(Errno::ENOENT));
    }
    g.finish();
}

/// A guest that asks for a restart: `ERESTART`, every time.
fn restart_guest(m: &Module, fastpath: bool) {
    let mut g = Guest::load(m, "chantest-restart", fastpath);
    check("INITIALIZE", g.initialize(), Ok(INITIALIZE_RESULT));
    let mut console = GuestConsole::new();
    let end = g.run_to_end(&mut console);
    check(
        "a guest asking for a restart",
        Err::<(), _>(end),
        Err(Errno::ERESTART),
    );
    check("read after a restart", g.read(4), Err(Errno::ERESTART));
    check(
        "read into 3 bytes after a restart",
        g.read(3),
        Err(Errno::ERESTART),
    );
    check(
        "read_reason after a restart",
        g.chan.read_reason(&mut [0u8; 16]),
        Err(Errno::ERESTART),
    );
    check(
        "IRQ after a restart",
        g.write(&[IRQ, 1]),
        Err(Errno::ENOENT),
    );
    check(
        "INITIALIZE after a restart",
        g.initialize(),
        Err(Errno::ENOENT),
    );
    g.finish();
}

/// The console's `restart` and `kill` reach the guest through the same
/// read: `ERESTART`, and `ENOENT` with the console's reason.
fn console_requests(m: &Module, fastpath: bool) {
    let mut g = Guest::load(m, "chantest-console", fastpath);
    check("INITIALIZE", g.initialize(), Ok(INITIALIZE_RESULT));
    g.shared.restart();
    let mut console = GuestConsole::new();
    check(
        "read after a console restart",
        Err::<(), _>(g.run_to_end(&mut console)),
        Err(Errno::ERESTART),
    );
    g.finish();

    let mut g = Guest::load(m, "chantest-console", fastpath);
    check("INITIALIZE", g.initialize(), Ok(INITIALIZE_RESULT));
    g.shared.kill("killed from the console");
    check(
        "read after a console kill",
        Err::<(), _>(g.run_to_end(&mut console)),
        Err(Errno::ENOENT),
    );
    check_that(
        "a console kill's reason",
        g.chan.death_reason() == Some("killed from the console"),
    );
    g.finish();
}
