//! The lguest core on the real machine.
//!
//! [`KernelCore`] implements the control channel's [`GuestCore`]: it owns a
//! guest's vCPU state machine ([`Vcpu`], pure and host-tested), its RAM (a
//! capability handed over by the launcher), its linear-mode address space,
//! its clock event and FPU area, and runs the guest through the world switch
//! ([`switch`]) inside its launcher task's `read()`. The launcher
//! (`kernel::launcher`) talks to it only through the control channel.
//!
//! What interrupt context and other tasks may touch of a guest lives in its
//! [`GuestShared`] (pending irqs, the poke flag, kill/restart requests,
//! counters), one per guest and found by id in a registry: nothing is shared
//! between guests, and a timer that fires after its guest is gone finds
//! nothing.
//!
//! `read()` returns "interrupted" (`EINTR`) when the launcher task's time
//! slice is over ([`task::need_resched`]): every host interrupt makes the
//! guest exit, so even a guest that spins without ever exiting on its own
//! gives the CPU back at its slice end. A halted guest blocks its task until
//! an irq is raised for it; a guest halted with every irq blocked costs
//! nothing until it is killed.

pub mod devices;
pub mod fpu;
pub mod probe;
pub mod space;
pub mod switch;

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use guest_abi::data::LguestData;
use guest_abi::hcall::{HcallArgs, LHCALL_RING_SIZE};
use guest_abi::lhreq::Errno;
use rustyvisor::lguest::chan::{
    DeathReason, EventHandle, GuestCore, InitLimits, RunExit, TaskId, check_initialize,
};
use rustyvisor::lguest::guestmem::GuestMemory;
use rustyvisor::lguest::pagewalk::Format;
use rustyvisor::lguest::shadow::{Flush, ShadowConfig, Stats};
use rustyvisor::lguest::vcpu::{Action, Env, Exit, FlushSwitch, LaneDone, StubView, Vcpu};
use rustyvisor::mm::PAGE_SIZE;

use self::fpu::FxSlot;
use self::space::{GuestRam, HostGuestMemory, Ledger, LinearTables, ShadowFrames};
use super::arch::{cpu, gdt, idt};
use super::mem;
use super::sync::IrqMutex;
use super::task;
use super::time::{self, TimerId};

/// Pages of the per-CPU stack guest traps arrive on.
const TRAP_STACK_PAGES: u64 = 4;

/// A guest's life as the console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Life {
    /// Being loaded.
    Starting = 0,
    /// Running or runnable.
    Running = 1,
    /// Halted, waiting for an interrupt.
    Halted = 2,
    /// Ended.
    Dead = 3,
}

/// What another task asked of a running guest.
const REQ_NONE: u8 = 0;
const REQ_KILL: u8 = 1;
const REQ_RESTART: u8 = 2;

/// What interrupt context and other tasks may touch of one guest. One per
/// guest (a restart keeps it), owned by its launcher and the registry.
pub struct GuestShared {
    /// Registry key, never reused; the argument of its timers.
    pub id: u64,
    /// The guest's name.
    pub name: String,
    /// The launcher task that runs it.
    task: AtomicU64,
    /// Virtual interrupts raised from interrupt context or other tasks
    /// (the clock event, `IRQ` writes), merged into the vCPU before each
    /// entry.
    pending: AtomicU32,
    /// A poke is armed (see [`ensure_poke`]).
    poke: AtomicBool,
    /// `REQ_*`: a kill or restart asked for by the console.
    request: AtomicU8,
    /// Its devices have work the launcher must do (console input, frames
    /// from the switch): the run loop returns `EAGAIN` ("break").
    service: AtomicBool,
    /// Console input for the guest, not yet handed to its device.
    input: IrqMutex<alloc::collections::VecDeque<u8>>,
    /// Ring kicks absorbed by an `EVENTFD` binding, not yet served.
    kicks: IrqMutex<Vec<u32>>,
    /// Why the guest must die, when `request` is `REQ_KILL`.
    kill_reason: IrqMutex<Option<String>>,
    /// [`Life`] as a byte.
    life: AtomicU8,
    /// Ring kicks absorbed by an `EVENTFD` binding (served by the device
    /// service task without `read()` returning).
    pub kicks_absorbed: AtomicU64,
    /// Exits, and those handled where they landed.
    pub exits: AtomicU64,
    pub fast_exits: AtomicU64,
    /// Host frames charged to this guest.
    pub ledger: Ledger,
}

impl GuestShared {
    /// Registers a new guest named `name`.
    pub fn register(name: &str) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let g = Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: String::from(name),
            task: AtomicU64::new(0),
            pending: AtomicU32::new(0),
            poke: AtomicBool::new(false),
            request: AtomicU8::new(REQ_NONE),
            service: AtomicBool::new(false),
            input: IrqMutex::new(alloc::collections::VecDeque::new()),
            kicks: IrqMutex::new(Vec::new()),
            kill_reason: IrqMutex::new(None),
            life: AtomicU8::new(Life::Starting as u8),
            kicks_absorbed: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            fast_exits: AtomicU64::new(0),
            ledger: Ledger::default(),
        });
        GUESTS.lock().insert(g.id, g.clone());
        g
    }

    /// Removes the guest from the registry (its timers then find nothing).
    pub fn unregister(&self) {
        GUESTS.lock().remove(&self.id);
    }

    /// Records the launcher task.
    pub fn set_task(&self, t: task::TaskId) {
        self.task.store(t.0, Ordering::Relaxed);
    }

    /// The launcher task.
    pub fn task(&self) -> task::TaskId {
        task::TaskId(self.task.load(Ordering::Relaxed))
    }

    /// Raises virtual irq `irq` (< 32) and wakes the guest if it halted.
    /// Safe from interrupt context and from any task.
    pub fn raise(&self, irq: u32) {
        if irq < 32 {
            self.pending.fetch_or(1 << irq, Ordering::SeqCst);
            task::wake(self.task());
        }
    }

    /// Asks the running guest to die with `reason` at its next exit,
    /// waking it if it halted (the console's `kill`, a device service task
    /// that found the guest misusing a device).
    pub fn kill(&self, reason: &str) {
        *self.kill_reason.lock() = Some(String::from(reason));
        self.request.store(REQ_KILL, Ordering::SeqCst);
        task::wake(self.task());
    }

    /// Asks the running guest to restart from its image at its next exit.
    pub fn restart(&self) {
        self.request.store(REQ_RESTART, Ordering::SeqCst);
        task::wake(self.task());
    }

    /// Forgets a kill or restart asked for before this (re)start.
    pub fn clear_request(&self) {
        self.request.store(REQ_NONE, Ordering::SeqCst);
        self.kill_reason.lock().take();
    }

    /// Why the guest was asked to die, if it was (the request stays).
    pub fn kill_requested(&self) -> Option<String> {
        (self.request.load(Ordering::SeqCst) == REQ_KILL).then(|| {
            self.kill_reason
                .lock()
                .clone()
                .unwrap_or_else(|| String::from("killed"))
        })
    }

    /// Records a kick of the ring at `addr` for the device service task.
    fn record_kick(&self, addr: u32) {
        let mut k = self.kicks.lock();
        if !k.contains(&addr) {
            k.push(addr);
        }
    }

    /// Takes the kicks recorded since the last call.
    pub fn take_kicks(&self) -> Vec<u32> {
        core::mem::take(&mut *self.kicks.lock())
    }

    /// Asks the launcher to serve the guest's devices: the guest leaves its
    /// run loop at its next exit (or wakes from a halt) with `EAGAIN`.
    pub fn kick_launcher(&self) {
        self.service.store(true, Ordering::SeqCst);
        task::wake(self.task());
    }

    /// Queues console input for the guest (at most [`INPUT_MAX`] bytes
    /// wait; more is dropped) and kicks its launcher. Returns the bytes
    /// taken.
    pub fn push_input(&self, bytes: &[u8]) -> usize {
        let taken = {
            let mut q = self.input.lock();
            let room = INPUT_MAX.saturating_sub(q.len());
            let n = bytes.len().min(room);
            q.extend(bytes.iter().take(n));
            n
        };
        self.kick_launcher();
        taken
    }

    /// Takes the queued console input.
    pub fn take_input(&self) -> Vec<u8> {
        self.input.lock().drain(..).collect()
    }

    /// Where the guest is in its life.
    pub fn life(&self) -> Life {
        match self.life.load(Ordering::Relaxed) {
            0 => Life::Starting,
            1 => Life::Running,
            2 => Life::Halted,
            _ => Life::Dead,
        }
    }

    /// Sets where the guest is in its life.
    pub fn set_life(&self, l: Life) {
        self.life.store(l as u8, Ordering::Relaxed);
    }
}

/// Console input that may wait for one guest's launcher.
pub const INPUT_MAX: usize = 4096;

/// Every live guest, by id.
static GUESTS: IrqMutex<BTreeMap<u64, Arc<GuestShared>>> = IrqMutex::new(BTreeMap::new());

/// The guest registered under `id`, if it still is.
fn lookup(id: u64) -> Option<Arc<GuestShared>> {
    GUESTS.lock().get(&id).cloned()
}

/// Every live guest, in the order they were registered.
pub fn guests() -> Vec<Arc<GuestShared>> {
    GUESTS.lock().values().cloned().collect()
}

/// Prepares the CPU for running guests: the hypercall gate (0x1f) is callable
/// from the guest kernel (DPL 1); `int3`, `into` and the syscall vector 0x80
/// from guest user mode (DPL 3); SYSENTER is disabled (SYSENTER_CS = 0);
/// FXSAVE/SSE are enabled for guests (the hypervisor itself never uses them).
/// Traps from a guest arrive on a dedicated, guarded per-CPU stack (TSS RSP0),
/// never on the stack of the task that runs the guest.
pub fn init_cpu() {
    match mem::KernelStack::new(TRAP_STACK_PAGES) {
        Some(stack) => {
            gdt::set_rsp0(stack.top());
            core::mem::forget(stack); // lives as long as the CPU
        }
        None => panic!("out of memory for the guest trap stack"),
    }
    // The hypercall gate enters through the stub that answers trivial calls
    // itself (when the run loop arms it) and otherwise falls into the
    // generic trap path.
    idt::set_gate_handler(
        guest_abi::hcall::LGUEST_TRAP_ENTRY,
        switch::hcall_stub as *const () as u64,
        1,
    );
    // `int3` and the system call enter through stubs that reflect them to
    // the guest's gate themselves when they can.
    idt::set_gate_handler(3, switch::int3_stub as *const () as u64, 3);
    // A page fault of a guest under shadow paging is usually filled by
    // its stub without the generic path.
    idt::set_gate_handler(14, switch::pf_stub as *const () as u64, 0);
    idt::set_gate_handler(
        guest_abi::irq::SYSCALL_VECTOR as u8,
        switch::syscall_stub as *const () as u64,
        3,
    );
    idt::set_gate_dpl(4, 3);
    // CR4.UMIP (if CPUID.(7,0):ECX[2]): sgdt/sidt/smsw/str/sldt outside
    // ring 0 raise #GP(0), and the vCPU answers with guest-view values.
    let umip = u64::from(cpuid(0).eax >= 7 && cpuid(7).ecx & (1 << 2) != 0);
    SMEP_CPU.store(
        cpuid(0).eax >= 7 && cpuid(7).ebx & (1 << 7) != 0,
        Ordering::Relaxed,
    );
    // SAFETY: IA32_SYSENTER_CS (0x174) exists on all x86_64 CPUs; 0 makes
    // SYSENTER fault. OSFXSR|OSXMMEXCPT let guests use SSE; CR0.MP with EM
    // clear gives the usual x87 behaviour with lazy TS; CR0.NE makes x87
    // errors raise #MF (which is reflected) instead of the legacy FERR# IRQ.
    // UMIP is set only where CPUID says the CPU has it.
    unsafe {
        cpu::wrmsr(0x174, 0);
        cpu::write_cr4(cpu::cr4() | (1 << 9) | (1 << 10) | (umip << 11));
        let cr0 = (cpu::cr0() | (1 << 1) | (1 << 5)) & !(1 << 2);
        core::arch::asm!("mov cr0, {}", in(reg) cr0, options(nostack, preserves_flags));
    }
}

/// CPUID leaf `leaf`, subleaf 0.
fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::__cpuid_count(leaf, 0)
    }
}

/// Whether CR0.TS is set. Only `set_cr0_ts` changes TS, so this mirror saves
/// reading CR0 (a slow, sometimes trapping instruction) twice per guest entry.
static CR0_TS: AtomicBool = AtomicBool::new(false);

/// Whether the CPU has SMEP (CPUID.(7,0):EBX bit 7), and whether CR4.SMEP is
/// set now (a mirror, like `CR0_TS`).
static SMEP_CPU: AtomicBool = AtomicBool::new(false);
static SMEP_ON: AtomicBool = AtomicBool::new(false);

/// CR4.SMEP on while a guest under shadow paging runs (and until another
/// guest or the host needs it off): with a guest's tables loaded, a stray
/// jump of host code to a low address would otherwise run guest code at
/// CPL 0. Linear-mode guests run their kernel on user pages (the linear map
/// is user-accessible so that their user mode works), so it is off for
/// them. SMAP stays off: a guest kernel at CPL 1 reads and writes its user
/// pages (copy_to/from_user), which SMAP would forbid.
fn set_smep(on: bool) {
    let on = on && SMEP_CPU.load(Ordering::Relaxed);
    if SMEP_ON.swap(on, Ordering::Relaxed) == on {
        return;
    }
    let cr4 = cpu::cr4();
    let new = if on {
        cr4 | (1 << 20)
    } else {
        cr4 & !(1 << 20)
    };
    // SAFETY: only SMEP changes; the host never executes user pages (its
    // code is all in the upper half, mapped supervisor).
    unsafe { cpu::write_cr4(new) };
}

fn set_cr0_ts(on: bool) {
    if CR0_TS.swap(on, Ordering::Relaxed) == on {
        return;
    }
    let cr0 = cpu::cr0();
    let new = if on { cr0 | (1 << 3) } else { cr0 & !(1 << 3) };
    // SAFETY: only the TS bit changes; the hypervisor never uses the FPU.
    unsafe { core::arch::asm!("mov cr0, {}", in(reg) new, options(nostack, preserves_flags)) };
}

/// How long a deliverable-later irq may wait for an exit.
const POKE_NS: u64 = 1_000_000;

/// The poke's timer: its interrupt alone makes a running guest exit, where
/// the pending irq is delivered if the guest can take it by then.
fn poke_fired(id: u64) {
    if let Some(g) = lookup(id) {
        g.poke.store(false, Ordering::SeqCst);
    }
}

/// A guest may re-enable or unblock virtual irqs without an exit (its
/// paravirt `iret` stores `irq_enabled`; unmasking clears a bit of
/// `blocked_interrupts`), and lguest relied on the host's periodic tick to
/// deliver what was pending then. This host has no periodic tick, so while
/// the vCPU has irqs pending at an entry, a one-shot poke is armed
/// ([`POKE_NS`]): a guest spinning in user mode still gets its timer irq.
/// Called with interrupts off, right before every return into the guest
/// from Rust (the stubs never leave an irq pending that was not pending at
/// such a return: see `Vcpu::stub_deliver`).
fn ensure_poke(r: &mut Running) {
    merge_pending(r);
    if r.vcpu.pending_irqs() == 0 {
        return;
    }
    if r.shared.poke.swap(true, Ordering::SeqCst) {
        return;
    }
    time::arm_after(POKE_NS, poke_fired, r.shared.id);
}

/// The guest's clock event: irq 0, which also wakes it from a halt.
fn clock_fired(id: u64) {
    if let Some(g) = lookup(id) {
        g.raise(0);
    }
}

/// Shadows cached per guest, replaced least recently used first. Chosen by
/// measurement (docs/benchmarks.md, "Shadow cache"): with K address spaces
/// in a round robin every switch hits while K ≤ the cache size (about 140
/// to 190 instructions per switch, growing slowly with the slots searched)
/// and misses once K is larger (about 8,500: a fresh shadow refilled);
/// 8 slots cover the process counts of the guests we run at half the
/// memory of 16 (every cached shadow holds its own copy of the kernel
/// half), and a kernel-half `SET_PTE` updates every cached shadow.
const SHADOW_CACHE: usize = 8;

/// Host services for the vCPU state machine.
struct KernelEnv {
    /// The guest's registry id (its timers' argument).
    id: u64,
    clock: Option<TimerId>,
    ts: bool,
    /// Where the guest's shadow page tables come from.
    tables: ShadowFrames,
    /// The guest's page-table format (`paging=`).
    paging: Format,
    /// Host-physical address of guest-physical 0, and guest frames.
    guest_base: u64,
    pfnlimit: u32,
}

/// The guest's wall clock, as `(seconds, nanoseconds)`: with no RTC
/// driver yet, the time since boot.
fn wallclock() -> (i32, i32) {
    let ns = time::now_ns();
    (
        i32::try_from(ns / 1_000_000_000).unwrap_or(i32::MAX),
        (ns % 1_000_000_000) as i32,
    )
}

impl Env for KernelEnv {
    #[inline]
    fn wallclock(&self) -> (i32, i32) {
        wallclock()
    }

    fn tsc_khz(&self) -> u32 {
        u32::try_from(time::tsc_hz() / 1000).unwrap_or(0)
    }

    fn set_clockevent(&mut self, delta_ns: Option<u64>) {
        if let Some(id) = self.clock.take() {
            time::cancel(id);
        }
        if let Some(ns) = delta_ns {
            self.clock = Some(time::arm_after(ns, clock_fired, self.id));
        }
    }

    fn set_ts(&mut self, on: bool) {
        self.ts = on;
    }

    type Tables = ShadowFrames;

    fn tables(&mut self) -> &mut ShadowFrames {
        &mut self.tables
    }

    fn shadow_config(&self, kernel_address: u32) -> ShadowConfig {
        let mut c = ShadowConfig::new(
            self.paging,
            self.guest_base,
            self.pfnlimit,
            kernel_address,
            mem::kernel_pml4(),
        );
        c.cache_size = SHADOW_CACHE;
        c
    }
}

/// How far the exit handler on the trap stack got with the last exit.
#[derive(Clone, Copy)]
enum Handled {
    /// Not at all: the run loop calls `handle_exit`.
    No,
    /// `handle_exit` returned this (not `Resume`).
    Exit(Action),
    /// `handle_exit` resumed and `prepare_entry` returned this (not a plain
    /// re-entry with unchanged segments).
    Entry(Action),
}

struct Running {
    /// What the trap-stack exit handler did with the last exit.
    handled: Handled,
    /// The (GDT generation, SS, CPL) the page-fault stub last found to be a
    /// valid stack, for faults from the guest kernel and from user mode.
    ss_ok: [Option<(u64, u32, u32)>; 2],
    vcpu: Vcpu,
    mem: HostGuestMemory,
    tables: LinearTables,
    env: KernelEnv,
    eventfds: [(u32, u64); 16],
    shared: Arc<GuestShared>,
    fx: alloc::boxed::Box<FxSlot>,
    /// TSC at the first entry into the guest (0 until then), for the
    /// `guest_create` bench.
    first_entry: u64,
    /// The user-mode frame the reflection stubs were last armed with: its
    /// linear address and guest-physical address (`None`: they reflect no
    /// user-mode trap).
    armed_user_frame: Option<(u32, u32)>,
    /// `Vcpu::pin_key` when `armed_user_frame` was found (`None`: look
    /// again next time).
    frame_pin: Option<u64>,
    /// The GDT as the guest left it at this exit (taken by the exit's first
    /// call, before anything may drain the async ring): a drain that
    /// stops after a TLS load changed the GDT leaves the rest to the full
    /// path, whose entry must then see the change and go back to the run
    /// loop to load the GDT.
    exit_gdt: Option<rustyvisor::lguest::gdtcache::GdtKey>,
    /// The GDT as the guest left it, when the hypercall stub's
    /// `FLUSH_ASYNC` lane (`flush_lane`) drained part of the ring and then
    /// left the rest to the full path of the same exit: its first call
    /// takes this as `exit_gdt`.
    lane_gdt: Option<rustyvisor::lguest::gdtcache::GdtKey>,
    /// What the stubs were last armed from (the view, CS, SS, paging),
    /// while the armed block still holds exactly that: `None` once the world
    /// switch disarmed it or a trap-stack paging call retargeted it.
    armed_from: Option<(StubView, u32, u32, bool)>,
}

/// The lguest core for one guest (the object behind one control channel).
pub struct KernelCore {
    shared: Arc<GuestShared>,
    /// The guest's RAM: the only memory `INITIALIZE` may map (the
    /// launcher's `base` must name it).
    ram: GuestRam,
    /// Handle exits on the trap stack when they need no launcher.
    fastpath: bool,
    /// The guest's page-table format.
    paging: Format,
    /// Boxed: the vCPU is large, and it lives on the heap rather than on
    /// the launcher task's small stack.
    running: Option<alloc::boxed::Box<Running>>,
}

impl KernelCore {
    /// A core for the guest `shared`, owning its RAM `ram`, whose page
    /// tables are in format `paging`.
    pub fn new(shared: Arc<GuestShared>, ram: GuestRam, fastpath: bool, paging: Format) -> Self {
        Self {
            shared,
            ram,
            fastpath,
            paging,
            running: None,
        }
    }

    /// The shadow core's counters, if the guest turned paging on.
    pub fn shadow_stats(&self) -> Option<Stats> {
        let r = self.running.as_ref()?;
        let s = r.vcpu.shadow()?;
        let st = s.stats();
        (st.hits + st.misses > 0).then_some(st)
    }

    /// TSC when the guest was first entered, if it has been.
    pub fn first_entry_tsc(&self) -> Option<u64> {
        self.running
            .as_ref()
            .map(|r| r.first_entry)
            .filter(|&t| t != 0)
    }

    /// Host bytes used for this guest beyond its RAM: its linear-mode
    /// tables and the most its shadow page tables held at once.
    pub fn overhead_bytes(&self) -> u64 {
        self.running.as_ref().map_or(0, |r| {
            let shadow = r.vcpu.shadow().map_or(0, |s| s.stats().peak_frames);
            r.tables.overhead_bytes() + shadow as u64 * PAGE_SIZE
        })
    }
}

impl GuestCore for KernelCore {
    type Init = ();

    fn initialize(&mut self, base: u64, pfnlimit: u64, start: u64) -> Result<(), Errno> {
        // devices: memory is RAM plus the device pages above it, so its size
        // is a 4 KiB multiple; `LinearTables::new` checks that `base` is
        // page-aligned (2 MiB-aligned beyond a small guest; `EFAULT` otherwise).
        let limits = InitLimits {
            max_bytes: (space::MAX_GUEST_BYTES
                + u64::from(guest_abi::device::DEVICE_PAGES) * PAGE_SIZE)
                as u32,
            align: PAGE_SIZE,
        };
        let args = check_initialize(base, pfnlimit, start, limits)?;
        // The launcher names memory by the RAM object it handed over: any
        // other address (another guest's RAM, the hypervisor's own image)
        // is refused, as is more than that object holds.
        if args.base != self.ram.base() || u64::from(args.bytes) > self.ram.total_bytes() {
            return Err(Errno::EFAULT);
        }
        let tables = LinearTables::new(args.base, u64::from(args.bytes), &self.shared.ledger)
            .map_err(|e| match e {
                space::SpaceError::OutOfMemory => Errno::ENOMEM,
                _ => Errno::EFAULT,
            })?;
        // SAFETY: `[base, base + bytes)` lies inside `self.ram`, this guest's
        // memory in the direct map, which the core owns and frees only when
        // it is dropped, after `release`.
        let mem = unsafe { HostGuestMemory::new(args.base, args.bytes) };
        self.shared.pending.store(0, Ordering::SeqCst);
        self.running = Some(alloc::boxed::Box::new(Running {
            handled: Handled::No,
            ss_ok: [None; 2],
            armed_user_frame: None,
            frame_pin: None,
            exit_gdt: None,
            lane_gdt: None,
            armed_from: None,
            vcpu: Vcpu::new(args.start),
            mem,
            tables,
            env: KernelEnv {
                id: self.shared.id,
                clock: None,
                ts: false,
                tables: ShadowFrames::new(&self.shared.ledger),
                paging: self.paging,
                guest_base: args.base - mem::DIRECT_MAP_BASE,
                pfnlimit: args.bytes / PAGE_SIZE as u32,
            },
            eventfds: [(0, 0); 16],
            shared: self.shared.clone(),
            fx: FxSlot::new(),
            first_entry: 0,
        }));
        Ok(())
    }

    fn run(&mut self, _owner: TaskId) -> RunExit {
        let fast = self.fastpath;
        let Some(r) = self.running.as_mut() else {
            return RunExit::Dead(DeathReason::new("not initialised"));
        };
        reload(r);
        r.shared.set_life(Life::Running);
        if let Some(exit) = preempted(r) {
            return exit;
        }
        // What `prepare_entry` returned on the trap stack, if the exit handler
        // there already called it.
        let mut prepared: Option<Action> = None;
        loop {
            let action = match prepared.take() {
                Some(a) => a,
                None => {
                    merge_pending(r);
                    r.vcpu.prepare_entry(&mut r.mem, &mut r.env)
                }
            };
            match action {
                Action::Resume => {}
                Action::Halt => {
                    // Check and block with interrupts off: an irq raised
                    // between the check and the block would otherwise be a
                    // lost wake-up (`raise` wakes the task after setting the
                    // bit). The slice is given up while halted.
                    x86_64::instructions::interrupts::disable();
                    if r.shared.request.load(Ordering::SeqCst) == REQ_NONE
                        && !r.shared.service.load(Ordering::SeqCst)
                        && !r.vcpu.has_deliverable_irq(&r.mem)
                        && r.shared.pending.load(Ordering::SeqCst) == 0
                    {
                        r.shared.set_life(Life::Halted);
                        if task::block(task::WaitOn::Halted, None).is_none() {
                            // Not run from a task (nothing to switch to):
                            // sleep until an interrupt instead (`sti; hlt`
                            // together, so a wake-up is not lost).
                            super::wait_for_interrupt();
                        }
                        r.shared.set_life(Life::Running);
                        // Another guest may have run meanwhile.
                        reload(r);
                    }
                    x86_64::instructions::interrupts::enable();
                    if let Some(exit) = preempted(r) {
                        return exit;
                    }
                    continue;
                }
                Action::Notify(addr) => {
                    if !signal_eventfd(r, addr) {
                        return RunExit::Notify(addr);
                    }
                    // The service task may have to run first.
                    if let Some(exit) = preempted(r) {
                        return exit;
                    }
                    continue;
                }
                Action::Dead => return dead(&r.vcpu),
                Action::Restart => return RunExit::Restart,
            }
            apply_mmu(r);
            gdt::load_guest_entries_cached(r.vcpu.gdt_key(), r.vcpu.gdt.entries());
            set_cr0_ts(r.env.ts);
            x86_64::instructions::interrupts::disable();
            ensure_poke(r);
            if fast {
                arm_stub(r);
            }
            r.handled = Handled::No;
            if r.first_entry == 0 {
                r.first_entry = cpu::rdtsc();
            }
            let before = switch::exits();
            let ptr: *mut Running = &raw mut **r;
            // SAFETY: `ptr` comes from the `&mut` this loop holds and is used
            // only by the trap path (through `regs` and the fast handler's
            // context) until `run` returns; this frame does not touch `*r`
            // meanwhile.
            let info = unsafe {
                let regs = &raw mut (*ptr).vcpu.regs;
                switch::run(
                    regs,
                    fast.then_some(switch::Handlers {
                        exit: exit_on_trap_stack,
                        switch: Some(switch_on_trap_stack),
                        flush: Some(flush_on_trap_stack),
                        ctx: ptr.cast(),
                    }),
                )
            };
            set_cr0_ts(false);
            // `switch::run` disarmed the stubs on its way out.
            r.armed_from = None;
            // Only this guest ran since `before`: the difference is its.
            let after = switch::exits();
            r.shared
                .exits
                .fetch_add(after.0.wrapping_sub(before.0), Ordering::Relaxed);
            r.shared
                .fast_exits
                .fetch_add(after.1.wrapping_sub(before.1), Ordering::Relaxed);
            let after_exit = match core::mem::replace(&mut r.handled, Handled::No) {
                Handled::No => {
                    let exit = Exit::from_trapnum(info.trapnum, info.errcode, info.cr2);
                    r.vcpu.handle_exit(exit, &mut r.mem, &mut r.env)
                }
                Handled::Exit(a) => a,
                Handled::Entry(a) => {
                    prepared = Some(a);
                    if let Some(exit) = preempted(r) {
                        return exit;
                    }
                    continue;
                }
            };
            match after_exit {
                Action::Resume | Action::Halt => {
                    if let Some(exit) = preempted(r) {
                        return exit;
                    }
                }
                Action::Notify(addr) => {
                    if !signal_eventfd(r, addr) {
                        return RunExit::Notify(addr);
                    }
                    if let Some(exit) = preempted(r) {
                        return exit;
                    }
                }
                Action::Dead => return dead(&r.vcpu),
                Action::Restart => return RunExit::Restart,
            }
        }
    }

    fn set_irq(&mut self, irq: u32) {
        self.shared.raise(irq);
    }

    fn set_eventfd(&mut self, addr: u64, fd: EventHandle) -> Result<(), Errno> {
        let r = self.running.as_mut().ok_or(Errno::EINVAL)?;
        let addr = u32::try_from(addr).map_err(|_| Errno::EINVAL)?;
        let slot = r
            .eventfds
            .iter_mut()
            .find(|(a, _)| *a == 0 || *a == addr)
            .ok_or(Errno::ENOSPC)?;
        *slot = (addr, fd.0);
        Ok(())
    }

    fn release(&mut self) {
        if let Some(mut r) = self.running.take() {
            r.env.set_clockevent(None);
            fpu::release(r.vcpu.instance());
            // Off the guest's tables before any of them is freed.
            // SAFETY: the kernel PML4 maps everything the host uses.
            unsafe { cpu::write_cr3(mem::kernel_pml4()) };
            set_smep(false);
            r.vcpu.release_shadows(&mut r.env.tables);
            // Dropping `r` frees the linear tables and the FPU area.
        }
        self.shared.pending.store(0, Ordering::SeqCst);
        self.shared.set_life(Life::Dead);
    }
}

/// Makes the CPU hold this guest's context again after other tasks (and
/// guests) ran: its page tables, SMEP setting and FPU registers.
fn reload(r: &mut Running) {
    // SAFETY: the linear tables and every shadow map the hypervisor's
    // upper half exactly like the kernel PML4, plus (only) this guest's
    // memory below 4 GiB.
    unsafe { cpu::write_cr3(r.vcpu.shadow_root().unwrap_or(r.tables.cr3())) };
    // Whatever the vCPU owed the MMU is done by that load.
    let _ = r.vcpu.take_mmu_work();
    set_smep(r.vcpu.paging());
    set_cr0_ts(false);
    fpu::switch_to(r.vcpu.instance(), &mut r.fx);
}

/// Whether the run loop must return to the launcher now rather than enter
/// the guest again: the console asked for a kill or restart, or the
/// launcher task's slice is over (`EINTR`; the guest stays runnable).
fn preempted(r: &mut Running) -> Option<RunExit> {
    match r.shared.request.swap(REQ_NONE, Ordering::SeqCst) {
        REQ_KILL => {
            let why = r.shared.kill_reason.lock().take();
            return Some(RunExit::Dead(DeathReason::new(
                why.as_deref().unwrap_or("killed"),
            )));
        }
        REQ_RESTART => return Some(RunExit::Restart),
        _ => {}
    }
    if r.shared.service.swap(false, Ordering::SeqCst) {
        return Some(RunExit::Break);
    }
    task::need_resched().then_some(RunExit::Interrupted)
}

/// Does what the vCPU owes the MMU before the guest runs again: loads the
/// shadow a `NEW_PGTABLE` switched to (a CR3 write, which also drops the old
/// address space's TLB entries: no PCIDs yet), or applies the shadow core's
/// invalidation of the loaded one. The trap stack and everything else the
/// host touches are in the upper half, which every shadow maps like the
/// kernel PML4, so this is safe on the trap stack too.
fn apply_mmu(r: &mut Running) {
    set_smep(r.vcpu.paging());
    let work = r.vcpu.take_mmu_work();
    if let Some(sw) = work.load {
        // SAFETY: a shadow root from the shadow core: its upper half is the
        // kernel PML4's; below 4 GiB only this guest's memory.
        unsafe { cpu::write_cr3(sw.root) };
        return;
    }
    apply_flush(work.flush);
}

/// Applies an invalidation the shadow core owes the loaded shadow.
#[inline]
fn apply_flush(flush: Flush) {
    match flush {
        Flush::None => {}
        Flush::Page(va) => x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(u64::from(va))),
        // SAFETY: reloading the CR3 already in use.
        Flush::All => unsafe { cpu::write_cr3(cpu::cr3() & !0xFFF) },
    }
}

/// Moves the virtual irqs raised from interrupt context (the clock event)
/// into the vCPU.
fn merge_pending(r: &mut Running) {
    let pending = &r.shared.pending;
    // Usually nothing: a plain load is much cheaper than the locked swap.
    if pending.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut bits = pending.swap(0, Ordering::SeqCst);
    while bits != 0 {
        r.vcpu.set_irq(bits.trailing_zeros());
        bits &= bits - 1;
    }
}

/// Tells the hypercall and reflection stubs what they may do for this guest
/// until its next exit that reaches Rust (nothing if the vCPU says so).
fn arm_stub(r: &mut Running) {
    let view = r.vcpu.stub_view_in(&r.mem, &mut r.env);
    let from = view.map(|v| (v, r.vcpu.regs.cs, r.vcpu.regs.ss, r.vcpu.paging()));
    // Armed from the same view but for the ring slot and the user-mode
    // frame (a context switch through the async ring, a `SET_STACK`): only
    // those fields of the armed block change.
    if let (Some((v, cs, ss, paging)), Some((old, ocs, oss, opaging))) = (from, r.armed_from)
        && (cs, ss, paging) == (ocs, oss, opaging)
        && (StubView {
            ring_status: old.ring_status,
            user_frame: old.user_frame,
            user_esp: old.user_esp,
            user_linear: old.user_linear,
            ..v
        }) == old
        && (v.ss1 != 0) == (old.ss1 != 0)
    {
        let user_len = if v.ss1 != 0 { 20 } else { 0 };
        if let (Some(ring), Some(frame)) = (
            r.mem.host_addr(v.ring_status, 1),
            r.mem.host_addr(v.user_frame, user_len),
        ) {
            switch::rearm_moved(ring, frame, v.user_esp);
            r.armed_from = from;
            r.armed_user_frame = (v.ss1 != 0).then_some((v.user_linear, v.user_frame));
            r.frame_pin = r.vcpu.pin_key();
            return;
        }
    }
    let at_kernel_cs = r.vcpu.regs.cs == u32::from(guest_abi::KERNEL_CS);
    let ld = r.vcpu.lguest_data();
    let noirq = r.vcpu.noirq_window();
    let ptrs = r.vcpu.stub_ptrs();
    let arm = view.and_then(|v| {
        // The view's addresses are inside guest memory by construction
        // (INIT checked lguest_data; the user frame was checked against the
        // limit); checked once more here, where they become host addresses.
        let user_len = if v.ss1 != 0 { 20 } else { 0 };
        let reflect = switch::ReflectArm {
            mem_base: r.mem.host_addr(0, 0)?,
            limit: v.limit.min(r.mem.limit()),
            irq_enabled: r.mem.host_addr(v.irq_enabled, 4)?,
            kss: v.kss,
            kss_base: v.kss_base,
            user_frame: r.mem.host_addr(v.user_frame, user_len)?,
            user_esp: v.user_esp,
            ss1: v.ss1,
            gates: v.gates,
            // The lane delivers onto the stack the guest was entered with,
            // at the guest kernel's CS.
            lane: match ld {
                Some(ld) if v.kss != 0 && at_kernel_cs => Some(switch::LaneArm {
                    ld: r.mem.host_addr(ld, LguestData::SIZE as usize)?,
                    pending: ptrs.pending,
                    irq_gates: ptrs.irq_gates,
                    noirq,
                }),
                _ => None,
            },
        };
        Some(switch::StubArm {
            trivial: v.trivial,
            ring_status: r.mem.host_addr(v.ring_status, 1)?,
            drain: match ld {
                Some(ld) => Some(switch::DrainArm {
                    status_base: r.mem.host_addr(
                        ld.wrapping_add(LguestData::OFF_HCALL_STATUS),
                        LHCALL_RING_SIZE,
                    )?,
                    hcalls_base: r.mem.host_addr(
                        ld.wrapping_add(LguestData::OFF_HCALLS),
                        LHCALL_RING_SIZE * core::mem::size_of::<HcallArgs>(),
                    )?,
                    cursor: ptrs.ring_cursor,
                }),
                None => None,
            },
            irqs: &raw const r.shared.pending,
            vcpu_irqs: v.pending,
            cs: r.vcpu.regs.cs,
            ss: r.vcpu.regs.ss,
            switch: r.vcpu.paging(),
            reflect: Some(reflect),
        })
    });
    r.armed_user_frame = view
        .filter(|v| v.ss1 != 0 && arm.is_some())
        .map(|v| (v.user_linear, v.user_frame));
    r.frame_pin = r.vcpu.pin_key();
    r.armed_from = from.filter(|_| arm.is_some());
    switch::arm_stubs(arm);
}

/// After a drain on the trap stack changed the `SET_STACK` stack (a context
/// switch): re-arms only what that changes — the user-mode frame, the
/// handler's ESP after it, and the ring slot — when that is all that
/// changed in the stubs' view: they were armed (`armed_from`) for the same
/// CS, SS and paging mode, and the stack segment is the same as before and
/// the new frame lies in one page of guest memory (so `ss1`, and with it
/// the gates' user-mode bits, stay as armed). `false`: nothing was done,
/// the caller arms the stubs in full (`arm_stub`).
#[inline]
fn rearm_new_stack(r: &mut Running, before: Option<(u32, u32, u32)>) -> bool {
    let frame = r.vcpu.user_frame_in(&r.mem, &mut r.env);
    let pin = r.vcpu.pin_key();
    rearm_with_frame(r, before, frame, pin)
}

/// [`rearm_new_stack`] with the new stack's user-mode frame found already
/// (`Vcpu::user_frame_in`'s answer, `frame`) and the vCPU's `pin_key`.
#[inline(always)]
fn rearm_with_frame(
    r: &mut Running,
    before: Option<(u32, u32, u32)>,
    frame: Option<(u32, u32)>,
    pin: Option<u64>,
) -> bool {
    let (Some((ss_before, _, _)), Some((ss1, esp1, _))) = (before, r.vcpu.stack_key()) else {
        return false;
    };
    let same_state = r.armed_from.is_some_and(|(_, cs, ss, paging)| {
        (cs, ss, paging) == (r.vcpu.regs.cs, r.vcpu.regs.ss, r.vcpu.paging())
    });
    if ss1 != ss_before || !same_state || r.armed_user_frame.is_none() {
        return false;
    }
    let Some((linear, pa)) = frame else {
        return false;
    };
    let (Some(ring), Some(frame)) = (
        r.vcpu.ring_slot().and_then(|gpa| r.mem.host_addr(gpa, 1)),
        r.mem.host_addr(pa, 20),
    ) else {
        return false;
    };
    switch::rearm_moved(ring, frame, esp1.wrapping_sub(20));
    r.armed_user_frame = Some((linear, pa));
    r.frame_pin = pin;
    true
}

/// After a shadow-paging call finished on the trap stack without re-arming
/// the stubs: the call may have moved the page of the `SET_STACK` frame
/// (another shadow, a `SET_PTE` of the stack page, a flush and re-pin), so
/// the reflection stubs are pointed at where the frame is now — or told to
/// leave user-mode traps to the full path, which re-arms them. About one
/// quiet walk of the guest's tables.
fn refresh_user_frame(r: &mut Running) {
    let Some((low, armed)) = r.armed_user_frame else {
        return;
    };
    // The frame's page is where the pinned stack's top page is mapped: the
    // same pin, the same place (the frame lies in that page when armed).
    let key = r.vcpu.pin_key();
    if key.is_some() && key == r.frame_pin {
        return;
    }
    r.frame_pin = key;
    let now = r.vcpu.stub_frame_gpa(low, &r.mem, &mut r.env);
    if now == Some(armed) {
        return;
    }
    let host = now.and_then(|pa| r.mem.host_addr(pa, 20));
    switch::retarget_user_frame(host);
    r.armed_from = None;
    r.armed_user_frame = now.filter(|_| host.is_some()).map(|pa| (low, pa));
}

/// The hypercall stub's shadow-paging lane (`fastpath=on`; interrupts off,
/// on the trap stack): `Vcpu::stub_paging`; then the TLB invalidation owed
/// (or the root the stub loads), and the reflection stubs' user-mode frame
/// brought up to date. 0: nothing changed, the full path runs.
extern "C" fn switch_on_trap_stack(
    ctx: *mut (),
    nr: u32,
    a1: u32,
    a2: u32,
    a3: u32,
    a4: u32,
) -> u64 {
    // SAFETY: as in `exit_on_trap_stack`: `ctx` is the running guest's
    // `Running`, not touched by the suspended run loop meanwhile.
    let r = unsafe { &mut *ctx.cast::<Running>() };
    // The common paging call first, on its own short path (which needs
    // nothing but `gpgdir` afterwards). A cached shadow is switched to here only if it
    // maps the stack's top page where the current one does: the reflection
    // stubs' user frame stays right.
    if nr == guest_abi::hcall::LHCALL_NEW_PGTABLE
        && let Some(root) = r.vcpu.stub_switch(a1)
    {
        return root;
    }
    if nr == guest_abi::hcall::LHCALL_SET_PTE {
        return set_pte_lane(r, a1, a2, a3, a4);
    }
    paging_lane_call(r, nr, a1, a2, a3, a4)
}

/// The paging lane's `SET_PTE` (a tail call: the switch above pays none of
/// its frame): first a user entry of the running address space, where the
/// stack's page stays where it was (no user frame to look up again); else
/// the rest of the lane.
#[inline(never)]
fn set_pte_lane(r: &mut Running, a1: u32, a2: u32, a3: u32, a4: u32) -> u64 {
    if r.vcpu.stub_set_pte([a1, a2, a3, a4], &mut r.env) {
        apply_flush(r.vcpu.take_shadow_flush());
        return 1;
    }
    paging_lane_call(r, guest_abi::hcall::LHCALL_SET_PTE, a1, a2, a3, a4)
}

/// The rest of the paging lane ([`switch_on_trap_stack`]), out of line (a
/// tail call: the switch above saves nothing for it).
#[cold]
#[inline(never)]
fn paging_lane_call(r: &mut Running, nr: u32, a1: u32, a2: u32, a3: u32, a4: u32) -> u64 {
    let args = [a1, a2, a3, a4];
    let result = match r.vcpu.stub_paging(nr, args, &mut r.mem, &mut r.env) {
        None => return 0,
        Some(LaneDone::Load(root)) => root,
        Some(LaneDone::Work) => {
            let work = r.vcpu.take_mmu_work();
            if let Some(sw) = work.load {
                sw.root
            } else {
                apply_flush(work.flush);
                1
            }
        }
    };
    refresh_user_frame(r);
    result
}

/// The page-fault stub's fill (`fastpath=on`, a guest under shadow
/// paging; interrupts off, on the trap stack; C ABI): `frame` is the
/// hardware frame (error code, RIP, CS, RFLAGS, RSP, SS). The frame's SS
/// must be a stack segment the entry check accepts at its CPL (the guest may
/// have loaded one the CPU accepts but the host refuses, a 16-bit one: the
/// full path kills it then); then `Vcpu::stub_fill`, and the invalidation it
/// owes the loaded shadow. 1: the guest resumes at the faulting instruction;
/// 2: the fault is the guest's own (decided and remembered), for
/// [`pf_reflect_lane`]; 0: the full path decides.
extern "C" fn pf_fill_lane(cr2: u64, frame: &[u64; 6]) -> u8 {
    // SAFETY: the stub calls this only when armed for a running guest under
    // shadow paging by the run loop, whose context is then its `Running`,
    // not touched by the suspended run loop meanwhile (as in
    // `exit_on_trap_stack`).
    let r = unsafe { &mut *switch::current_ctx().cast::<Running>() };
    let [errcode, _, cs, _, _, ss] = *frame;
    let (cs, ss) = (cs as u32, ss as u32);
    // The last (GDT generation, SS, CPL) found valid, checked again only
    // when one of them changes.
    let key = (r.vcpu.gdt.generation(), ss, cs & 3);
    let which = usize::from(cs & 3 == 3);
    if r.ss_ok.get(which).copied().flatten() != Some(key) {
        let cpl = (cs & 3) as u8;
        let ok = (cpl == 1 || cpl == 3)
            && u16::try_from(ss).is_ok_and(|s| r.vcpu.gdt.valid_stack_selector(s, cpl));
        if !ok {
            return 0;
        }
        if let Some(slot) = r.ss_ok.get_mut(which) {
            *slot = Some(key);
        }
    }
    if !r
        .vcpu
        .stub_fill(cr2 as u32, errcode as u32, &mut r.mem, &mut r.env)
    {
        return if r.vcpu.pf_decided(cr2 as u32) { 2 } else { 0 };
    }
    apply_flush(r.vcpu.take_shadow_flush());
    switch::count_lane();
    1
}

/// The page-fault stub's reflection, called when [`pf_fill_lane`] found the
/// fault to be the guest's own (C ABI, same context; a call of its own so
/// that a fill pays none of its frame): reflected when the trap path's
/// shortcut would reflect it (`Vcpu::fast_exit`), on the fault's frame
/// registers, which then go back into the hardware `frame`. 1: the guest
/// resumes in its page-fault handler; 0: nothing changed, the full path
/// (which reflects the remembered decision).
extern "C" fn pf_reflect_lane(cr2: u64, frame: &mut [u64; 6]) -> u8 {
    // SAFETY: as in `pf_fill_lane`, which the stub called just before.
    let r = unsafe { &mut *switch::current_ctx().cast::<Running>() };
    switch::save_pf_frame(&mut r.vcpu.regs, frame);
    let errcode = r.vcpu.regs.errcode;
    let pf = guest_abi::irq::trap::PF;
    if !r
        .vcpu
        .fast_exit(pf, errcode, cr2 as u32, &mut r.mem, &mut r.env)
    {
        return 0;
    }
    switch::load_pf_frame(frame, &r.vcpu.regs);
    switch::count_lane();
    1
}

/// The run loop's exit handler on the trap stack (`fastpath=on`; interrupts
/// off). First (`full == false`) the shortcuts that need only the frame
/// registers (`Vcpu::fast_exit`, `Vcpu::fast_resume`); then (`full`) exactly
/// the run loop's own steps — `handle_exit`, merge the pending irqs,
/// `prepare_entry` — so an exit handled here leaves the vCPU as the run loop
/// would. It returns `true` (enter the guest again at once) only when
/// both resumed and the GDT is unchanged (the hardware GDT and the data
/// segment caches then still hold what the guest runs with) — or, for a
/// drain on the trap stack, changed only in TLS entries no segment register
/// uses, which it loads into the hardware GDT itself; otherwise it records
/// how far it got in `handled` for the run loop to go on from there.
fn exit_on_trap_stack(ctx: *mut (), exit: &switch::ExitInfo, full: bool) -> bool {
    // SAFETY: `ctx` is the `Running` of the guest being run, passed by the
    // run loop to `switch::run`, which is suspended in `enter_guest` and does
    // not touch it until the trap path returns to it.
    let r = unsafe { &mut *ctx.cast::<Running>() };
    if !full {
        r.exit_gdt = Some(r.lane_gdt.take().unwrap_or_else(|| r.vcpu.gdt_key()));
    }
    // The slice is over or the console wants the guest: every exit goes
    // back to the run loop, which returns to the launcher.
    if task::need_resched()
        || r.shared.request.load(Ordering::Relaxed) != REQ_NONE
        || r.shared.service.load(Ordering::Relaxed)
    {
        return false;
    }
    if !full {
        // Irqs raised from interrupt context first (the vCPU's state machine
        // does not look at them before `prepare_entry`, so merging them here
        // rather than after `handle_exit` changes nothing).
        merge_pending(r);
        if exit.trapnum == u32::from(guest_abi::hcall::LGUEST_TRAP_ENTRY) {
            // `FLUSH_ASYNC` (Linux's context switch, its lazy MMU batches)
            // reads no register but eax: the drain below needs nothing
            // the second call would save, and changes only frame registers.
            if r.vcpu.regs.eax == guest_abi::hcall::LHCALL_FLUSH_ASYNC
                && paging_on_trap_stack(r, exit)
            {
                return true;
            }
            // A hypercall with no irq to deliver: neither shortcut below
            // takes it (a reflection never is one; `fast_resume` needs an
            // irq).
            if r.vcpu.pending_irqs() == 0 {
                return false;
            }
        }
        // A shadow fill: nothing the stubs were armed with changes, and
        // nothing is pending (so no poke). (A page fault needs only the
        // frame registers; `NEW_PGTABLE` reads ebx, saved only for the
        // second call.)
        if exit.trapnum == guest_abi::irq::trap::PF
            && !r.vcpu.pf_decided(exit.cr2)
            && r.vcpu
                .fast_paging(exit.trapnum, exit.errcode, exit.cr2, &mut r.mem, &mut r.env)
        {
            apply_mmu(r);
            return true;
        }
        // A plain reflection: it changes nothing the hypercall stub was
        // armed with, so the stub stays armed as it is.
        if r.vcpu
            .fast_exit(exit.trapnum, exit.errcode, exit.cr2, &mut r.mem, &mut r.env)
        {
            return true;
        }
        if r.vcpu.fast_resume(exit.trapnum, &mut r.mem, &mut r.env) {
            ensure_poke(r);
            arm_stub(r);
            return true;
        }
        return false;
    }
    // A shadow-paging call (a switch of shadows, a `SET_PTE`/`SET_PGD`/
    // `SET_PMD`, a flush), as for a fill above (all registers saved now).
    if exit.trapnum == u32::from(guest_abi::hcall::LGUEST_TRAP_ENTRY)
        && Vcpu::fast_paging_call(r.vcpu.regs.eax).is_some()
        && paging_on_trap_stack(r, exit)
    {
        return true;
    }
    // (The GDT as the guest left it: see `exit_gdt`.)
    let key = r.exit_gdt.take().unwrap_or_else(|| r.vcpu.gdt_key());
    let exit = Exit::from_trapnum(exit.trapnum, exit.errcode, exit.cr2);
    match r.vcpu.handle_exit(exit, &mut r.mem, &mut r.env) {
        Action::Resume => {}
        other => {
            r.handled = Handled::Exit(other);
            return false;
        }
    }
    merge_pending(r);
    match r.vcpu.prepare_entry(&mut r.mem, &mut r.env) {
        Action::Resume if r.vcpu.gdt_key() == key => {
            apply_mmu(r);
            set_cr0_ts(r.env.ts);
            ensure_poke(r);
            arm_stub(r);
            true
        }
        other => {
            r.handled = Handled::Entry(other);
            false
        }
    }
}

/// A hypercall `Vcpu::fast_paging` finishes on the trap stack: a
/// shadow-paging call, or `FLUSH_ASYNC`, each after the calls queued in the
/// async ring that the vCPU drains on its own (Linux's lazy MMU batches,
/// its context switch). Then the MMU work owed is done, new TLS entries go
/// into the hardware GDT, and the stubs are armed again for a new kernel
/// stack, or else pointed at the ring's next slot. `false`: nothing was
/// done but what the full path does from there (a drain that stopped after
/// a TLS load changed the GDT leaves the rest to the full path, whose entry
/// goes back to the run loop to load it: the GDT key is taken first).
fn paging_on_trap_stack(r: &mut Running, exit: &switch::ExitInfo) -> bool {
    let key = r.vcpu.gdt_key();
    let stack = r.vcpu.stack_key();
    if !r
        .vcpu
        .fast_paging(exit.trapnum, exit.errcode, exit.cr2, &mut r.mem, &mut r.env)
    {
        return false;
    }
    after_paging_on_trap_stack(r, key, stack);
    true
}

/// The hypercall stub's `FLUSH_ASYNC` lane (its flush handler; `nr` is
/// `FLUSH_ASYNC`, `ds`..`gs` the guest's data selectors): [`flush_lane`].
extern "C" fn flush_on_trap_stack(
    ctx: *mut (),
    _nr: u32,
    ds: u32,
    es: u32,
    fs: u32,
    gs: u32,
) -> u64 {
    // SAFETY: as in `exit_on_trap_stack`: `ctx` is the running guest's
    // `Running`, not touched by the suspended run loop meanwhile.
    let r = unsafe { &mut *ctx.cast::<Running>() };
    flush_lane(r, ds, es, fs, gs)
}

/// The hypercall stub's `FLUSH_ASYNC` lane: what [`paging_on_trap_stack`]
/// does for `FLUSH_ASYNC`, without the trap path, with the data selectors
/// the guest runs with (`ds`..`gs`, read from the CPU by the stub); Linux's
/// context switch first in one step (`Vcpu::stub_flush_switch`). 1: done;
/// 0: the full path runs (after the calls drained so far: the GDT as the
/// guest left it is kept for that exit's first call, `lane_gdt`).
#[inline(always)]
fn flush_lane(r: &mut Running, ds: u32, es: u32, fs: u32, gs: u32) -> u64 {
    let sels = [ds, es, fs, gs];
    let stack = r.vcpu.stack_key();
    // Linux's context switch in one step: then only the switch to load and
    // the stubs to re-arm for the new stack (no GDT or TS change).
    match r.vcpu.stub_flush_switch(sels, &mut r.mem) {
        FlushSwitch::Done { switch, frame, pin } => {
            // `apply_mmu` but for SMEP, on since paging started (the
            // switch was to a shadow cached before).
            // SAFETY: a shadow root from the shadow core: its upper half is
            // the kernel PML4's; below 4 GiB only this guest's memory.
            unsafe { cpu::write_cr3(switch.root) };
            if !rearm_with_frame(r, stack, frame, Some(pin)) {
                arm_stub(r);
            }
            return 1;
        }
        FlushSwitch::Partial | FlushSwitch::Declined => {}
    }
    // (The drain's switch start changes no GDT entry.)
    let key = r.vcpu.gdt_key();
    r.lane_gdt = Some(key);
    if !r.vcpu.stub_flush(sels, &mut r.mem, &mut r.env) {
        return 0;
    }
    r.lane_gdt = None;
    after_paging_on_trap_stack(r, key, stack);
    1
}

/// The rest of [`paging_on_trap_stack`] once the vCPU finished the call
/// (`key` and `stack`: the GDT and the `SET_STACK` stack before it).
#[inline(always)]
fn after_paging_on_trap_stack(
    r: &mut Running,
    key: rustyvisor::lguest::gdtcache::GdtKey,
    stack: Option<(u32, u32, u32)>,
) {
    apply_mmu(r);
    // New TLS entries no live selector uses (`Vcpu::fast_paging`): into
    // the hardware GDT, as the run loop would before the next entry.
    if r.vcpu.gdt_key() != key {
        gdt::load_guest_entries_cached(r.vcpu.gdt_key(), r.vcpu.gdt.entries());
    }
    set_cr0_ts(r.env.ts);
    if r.vcpu.stack_key() == stack {
        refresh_user_frame(r);
        if let Some(host) = r.vcpu.ring_slot().and_then(|gpa| r.mem.host_addr(gpa, 1)) {
            switch::rearm_ring(host);
        }
    } else if !rearm_new_stack(r, stack) {
        arm_stub(r);
    }
}

/// Whether a notify of `addr` is absorbed by an event handle bound to it
/// (`LHREQ_EVENTFD`): the kick is recorded for the service task, its event
/// is signalled, and the guest keeps running; otherwise the launcher's
/// `read()` returns the address.
fn signal_eventfd(r: &Running, addr: u32) -> bool {
    let Some(&(_, handle)) = r.eventfds.iter().find(|(a, _)| addr != 0 && *a == addr) else {
        return false;
    };
    r.shared.record_kick(addr);
    r.shared.kicks_absorbed.fetch_add(1, Ordering::Relaxed);
    task::signal(EventHandle(handle), 1);
    true
}

/// The exit for [`Action::Dead`]. (A restart is always [`Action::Restart`]:
/// the vCPU reports a death that asked for a restart as that, never as
/// `Dead`.)
fn dead(vcpu: &Vcpu) -> RunExit {
    RunExit::Dead(
        vcpu.dead_reason()
            .cloned()
            .unwrap_or_else(|| DeathReason::new("killed")),
    )
}
