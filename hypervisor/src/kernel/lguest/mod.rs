//! The lguest core on the real machine, and the minimal built-in launcher.
//!
//! [`KernelCore`] implements the control channel's [`GuestCore`]: it owns a
//! guest's vCPU state machine ([`Vcpu`], pure and host-tested), its
//! linear-mode address space, its clock event, and runs the guest through the
//! world switch ([`switch`]) inside the caller's `read()`. The launcher
//! ([`launch_modules`]) talks to it only through [`Channel`]: it allocates
//! guest RAM, loads the ELF, writes `boot_params`, then
//! `write(INITIALIZE, base, pfnlimit, start)` and `read()` in a loop, printing
//! early-console notifies and the guest's end.

pub mod devices;
pub mod fpu;
pub mod probe;
pub mod space;
pub mod switch;

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use guest_abi::data::LguestData;
use guest_abi::hcall::{HcallArgs, LHCALL_RING_SIZE};
use guest_abi::lhreq::{Errno, LhReq};
use rustyvisor::lguest::chan::{
    Channel, DeathReason, EventHandle, GuestCore, InitLimits, RunExit, TaskId, check_initialize,
};
use rustyvisor::lguest::console::{ConsoleLine, Escaped, GuestConsole};
use rustyvisor::lguest::guestmem::GuestMemory;
use rustyvisor::lguest::loader;
use rustyvisor::lguest::pagewalk::Format;
use rustyvisor::lguest::shadow::{Flush, ShadowConfig, Stats};
use rustyvisor::lguest::spec::{self, GuestSpec};
use rustyvisor::lguest::vcpu::{Action, Env, Exit, Vcpu};
use rustyvisor::mm::PAGE_SIZE;
use rustyvisor::timerq::TimerId;
use rustyvisor::units::Bytes;

use self::space::{GuestRam, HostGuestMemory, LinearTables, ShadowFrames};
use super::arch::{cpu, gdt, idt};
use super::bootinfo::Module;
use super::mem::{self, phys_to_virt};
use super::time;
use crate::kprintln;

/// Guests that can exist at once (slots for interrupt-context state).
pub(crate) const MAX_GUESTS: usize = 8;
/// Pages of the per-CPU stack guest traps arrive on.
const TRAP_STACK_PAGES: u64 = 4;

/// Virtual interrupts raised from interrupt context (the clock event) per
/// guest slot, merged into the vCPU before each entry.
static PENDING: [AtomicU32; MAX_GUESTS] = [const { AtomicU32::new(0) }; MAX_GUESTS];

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

/// Per guest slot: a poke is armed (see [`ensure_poke`]).
static POKE: [AtomicBool; MAX_GUESTS] = [const { AtomicBool::new(false) }; MAX_GUESTS];

/// How long a deliverable-later irq may wait for an exit.
const POKE_NS: u64 = 1_000_000;

/// The poke's timer: its interrupt alone makes a running guest exit, where
/// the pending irq is delivered if the guest can take it by then.
fn poke_fired(slot: u64) {
    if let Some(p) = POKE.get(slot as usize) {
        p.store(false, Ordering::SeqCst);
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
    let Some(flag) = POKE.get(r.env.slot) else {
        return;
    };
    if flag.swap(true, Ordering::SeqCst) {
        return;
    }
    if time::arm_after(POKE_NS, poke_fired, r.env.slot as u64).is_err() {
        flag.store(false, Ordering::SeqCst);
    }
}

fn clock_fired(slot: u64) {
    if let Some(p) = PENDING.get(slot as usize) {
        p.fetch_or(1, Ordering::SeqCst);
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
    slot: usize,
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
            match time::arm_after(ns, clock_fired, self.slot as u64) {
                Ok(id) => self.clock = Some(id),
                Err(_) => log::warn!("guest clock event dropped: no free host timer"),
            }
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
    /// valid stack.
    ss_ok: Option<(u64, u32, u32)>,
    vcpu: Vcpu,
    mem: HostGuestMemory,
    tables: LinearTables,
    env: KernelEnv,
    eventfds: [(u32, u64); 16],
}

/// The lguest core for one guest (the object behind one control channel).
pub struct KernelCore {
    slot: usize,
    /// Handle exits on the trap stack when they need no launcher.
    fastpath: bool,
    /// The guest's page-table format.
    paging: Format,
    running: Option<Running>,
}

impl KernelCore {
    /// A core using interrupt slot `slot`, for a guest whose page tables
    /// are in format `paging`.
    pub fn new(slot: usize, fastpath: bool, paging: Format) -> Self {
        Self {
            slot: slot % MAX_GUESTS,
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
        // 2 MiB-aligned (`EFAULT` otherwise, as `check_initialize` would).
        let limits = InitLimits {
            max_bytes: (space::MAX_GUEST_BYTES
                + u64::from(guest_abi::device::DEVICE_PAGES) * PAGE_SIZE)
                as u32,
            align: PAGE_SIZE,
        };
        let args = check_initialize(base, pfnlimit, start, limits)?;
        let tables = LinearTables::new(args.base, u64::from(args.bytes)).map_err(|e| match e {
            space::SpaceError::OutOfMemory => Errno::ENOMEM,
            _ => Errno::EFAULT,
        })?;
        // SAFETY: `LinearTables::new` checked that `base` is 2 MiB-aligned
        // direct-map memory; the launcher owns those `bytes` of guest RAM and
        // keeps them until after `release`.
        let mem = unsafe { HostGuestMemory::new(args.base, args.bytes) };
        PENDING[self.slot].store(0, Ordering::SeqCst);
        self.running = Some(Running {
            handled: Handled::No,
            ss_ok: None,
            vcpu: Vcpu::new(args.start),
            mem,
            tables,
            env: KernelEnv {
                slot: self.slot,
                clock: None,
                ts: false,
                tables: ShadowFrames,
                paging: self.paging,
                guest_base: args.base - mem::DIRECT_MAP_BASE,
                pfnlimit: args.bytes / PAGE_SIZE as u32,
            },
            eventfds: [(0, 0); 16],
        });
        Ok(())
    }

    fn run(&mut self, _owner: TaskId) -> RunExit {
        let slot = self.slot;
        let fast = self.fastpath;
        let Some(r) = self.running.as_mut() else {
            return RunExit::Dead(DeathReason::new("not initialised"));
        };
        // SAFETY: the linear tables and every shadow map the hypervisor's
        // upper half exactly like the kernel PML4, plus (only) this guest's
        // memory below 4 GiB.
        unsafe { cpu::write_cr3(r.vcpu.shadow_root().unwrap_or(r.tables.cr3())) };
        // Whatever the vCPU owed the MMU is done by that load.
        let _ = r.vcpu.take_mmu_work();
        set_smep(r.vcpu.paging());
        set_cr0_ts(false);
        fpu::switch_to(slot, r.vcpu.instance());
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
                    // Check and sleep with interrupts off, then `sti; hlt`
                    // atomically: a clock event firing between the check and
                    // the halt would otherwise be a lost wake-up.
                    x86_64::instructions::interrupts::disable();
                    if !r.vcpu.has_deliverable_irq(&r.mem)
                        && PENDING[slot].load(Ordering::SeqCst) == 0
                    {
                        super::wait_for_interrupt();
                    }
                    x86_64::instructions::interrupts::enable();
                    continue;
                }
                Action::Notify(addr) => {
                    if !signal_eventfd(r, addr) {
                        return RunExit::Notify(addr);
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
            let ptr: *mut Running = r;
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
                        ctx: ptr.cast(),
                    }),
                )
            };
            set_cr0_ts(false);
            let after_exit = match core::mem::replace(&mut r.handled, Handled::No) {
                Handled::No => {
                    let exit = Exit::from_trapnum(info.trapnum, info.errcode, info.cr2);
                    r.vcpu.handle_exit(exit, &mut r.mem, &mut r.env)
                }
                Handled::Exit(a) => a,
                Handled::Entry(a) => {
                    prepared = Some(a);
                    continue;
                }
            };
            match after_exit {
                Action::Resume | Action::Halt => {}
                Action::Notify(addr) => {
                    if !signal_eventfd(r, addr) {
                        return RunExit::Notify(addr);
                    }
                }
                Action::Dead => return dead(&r.vcpu),
                Action::Restart => return RunExit::Restart,
            }
        }
    }

    fn set_irq(&mut self, irq: u32) {
        if let Some(r) = self.running.as_mut() {
            r.vcpu.set_irq(irq);
        }
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
            fpu::release(self.slot, r.vcpu.instance());
            // Off the guest's tables before any of them is freed.
            // SAFETY: the kernel PML4 maps everything the host uses.
            unsafe { cpu::write_cr3(mem::kernel_pml4()) };
            set_smep(false);
            r.vcpu.release_shadows(&mut r.env.tables);
            // Dropping `r` frees the linear tables.
        }
        PENDING[self.slot].store(0, Ordering::SeqCst);
    }
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
    match work.flush {
        Flush::None => {}
        Flush::Page(va) => x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(u64::from(va))),
        // SAFETY: reloading the CR3 already in use.
        Flush::All => unsafe { cpu::write_cr3(cpu::cr3() & !0xFFF) },
    }
}

/// Moves the virtual irqs raised from interrupt context (the clock event)
/// into the vCPU.
fn merge_pending(r: &mut Running) {
    let Some(pending) = PENDING.get(r.env.slot) else {
        return;
    };
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
    let view = r.vcpu.stub_view(r.mem.limit());
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
            irqs: PENDING.get(r.env.slot)?,
            vcpu_irqs: v.pending,
            cs: r.vcpu.regs.cs,
            ss: r.vcpu.regs.ss,
            switch: r.vcpu.paging(),
            reflect: Some(reflect),
        })
    });
    switch::arm_stubs(arm);
}

/// The hypercall stub's fast `NEW_PGTABLE` (`fastpath=on`; interrupts off,
/// on the trap stack): `Vcpu::stub_switch`, whose root the stub loads.
fn switch_on_trap_stack(ctx: *mut (), gpgdir: u32) -> u64 {
    // SAFETY: as in `exit_on_trap_stack`: `ctx` is the running guest's
    // `Running`, not touched by the suspended run loop meanwhile.
    let r = unsafe { &mut *ctx.cast::<Running>() };
    r.vcpu.stub_switch(gpgdir).unwrap_or(0)
}

/// The page-fault stub's fill (`fastpath=on`, a guest under shadow
/// paging; interrupts off, on the trap stack; C ABI): `frame` is the
/// hardware frame (error code, RIP, CS, RFLAGS, RSP, SS). The frame's SS
/// must be a stack segment the entry check accepts at its CPL (the guest may
/// have loaded one the CPU accepts but the host refuses, a 16-bit one: the
/// full path kills it then); then `Vcpu::stub_fill`, and the invalidation it
/// owes the loaded shadow. `true`: the guest resumes at the faulting
/// instruction; `false`: nothing changed, the full path decides.
extern "C" fn pf_fill_lane(cr2: u64, frame: &[u64; 6]) -> bool {
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
    if r.ss_ok != Some(key) {
        let cpl = (cs & 3) as u8;
        let ok = (cpl == 1 || cpl == 3)
            && u16::try_from(ss).is_ok_and(|s| r.vcpu.gdt.valid_stack_selector(s, cpl));
        if !ok {
            return false;
        }
        r.ss_ok = Some(key);
    }
    if !r
        .vcpu
        .stub_fill(cr2 as u32, errcode as u32, &mut r.mem, &mut r.env)
    {
        return false;
    }
    match r.vcpu.take_shadow_flush() {
        Flush::None => {}
        Flush::Page(va) => x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(u64::from(va))),
        // SAFETY: reloading the CR3 already in use.
        Flush::All => unsafe { cpu::write_cr3(cpu::cr3() & !0xFFF) },
    }
    switch::count_lane();
    true
}

/// The run loop's exit handler on the trap stack (`fastpath=on`; interrupts
/// off). First (`full == false`) the shortcuts that need only the frame
/// registers (`Vcpu::fast_exit`, `Vcpu::fast_resume`); then (`full`) exactly
/// the run loop's own steps — `handle_exit`, merge the pending irqs,
/// `prepare_entry` — so an exit handled here leaves the vCPU as the run loop
/// would. It returns `true` (enter the guest again at once) only when
/// both resumed and the GDT is unchanged (the hardware GDT and the data
/// segment caches then still hold what the guest runs with); otherwise it
/// records how far it got in `handled` for the run loop to go on from there.
fn exit_on_trap_stack(ctx: *mut (), exit: &switch::ExitInfo, full: bool) -> bool {
    // SAFETY: `ctx` is the `Running` of the guest being run, passed by the
    // run loop to `switch::run`, which is suspended in `enter_guest` and does
    // not touch it until the trap path returns to it.
    let r = unsafe { &mut *ctx.cast::<Running>() };
    if !full {
        // Irqs raised from interrupt context first (the vCPU's state machine
        // does not look at them before `prepare_entry`, so merging them here
        // rather than after `handle_exit` changes nothing).
        merge_pending(r);
        // A shadow fill: nothing the stubs were armed with changes, and
        // nothing is pending (so no poke). (A page fault needs only the
        // frame registers; `NEW_PGTABLE` reads ebx, saved only for the
        // second call.)
        if exit.trapnum == guest_abi::irq::trap::PF
            && r.vcpu
                .fast_paging(exit.trapnum, exit.errcode, exit.cr2, &mut r.mem, &mut r.env)
        {
            apply_mmu(r);
            return true;
        }
        // A plain reflection: it changes nothing the hypercall stub was
        // armed with, so the stub stays armed as it is.
        if r.vcpu
            .fast_exit(exit.trapnum, exit.errcode, exit.cr2, &mut r.mem)
        {
            return true;
        }
        // A trivial hypercall or a host interrupt, with an irq to deliver.
        if r.vcpu.fast_resume(exit.trapnum, &mut r.mem, &mut r.env) {
            ensure_poke(r);
            arm_stub(r);
            return true;
        }
        return false;
    }
    // A switch of shadows, as for a fill above (all registers saved now).
    if exit.trapnum == u32::from(guest_abi::hcall::LGUEST_TRAP_ENTRY)
        && r.vcpu
            .fast_paging(exit.trapnum, exit.errcode, exit.cr2, &mut r.mem, &mut r.env)
    {
        apply_mmu(r);
        return true;
    }
    let key = r.vcpu.gdt_key();
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

/// Whether a notify of `addr` is absorbed by an event handle bound to it (the
/// guest keeps running) rather than reported to the launcher. Device service
/// tasks that wait on these handles arrive with the launcher task (next
/// milestone); until then the signal has no receiver.
fn signal_eventfd(r: &Running, addr: u32) -> bool {
    addr != 0 && r.eventfds.iter().any(|(a, _)| *a == addr)
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

/// Most bytes of one early-console string read from the guest.
const NOTIFY_TEXT_MAX: usize = 1024;

/// Runs every guest module, one after the other. Returns (guests run,
/// guests that ended with a power off).
pub fn launch_modules(modules: &[Module], fastpath: bool) -> (u32, u32) {
    let mut ran = 0;
    let mut clean = 0;
    // devices: modules a guest's `block=` names are data, not guests.
    let data = devices::data_modules(modules);
    for (i, m) in modules.iter().enumerate() {
        if data.get(i).copied().unwrap_or(false) {
            continue;
        }
        let (free_before, _, _) = mem::frame_counts();
        // A line longer than the copy in `Module` is refused here rather than
        // run cut short: the lost words could be `mem=` or the guest's own
        // options, and a guest silently started with a different command line
        // than the one asked for is worse than one that says why it did not
        // start (the other guests still run, as after a bad `mem=`).
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
        let mut restarts = 0;
        loop {
            ran += 1;
            match run_guest(i, m, &spec, fastpath, modules) {
                Outcome::PowerOff => {
                    clean += 1;
                    break;
                }
                Outcome::Restart if restarts < spec.restarts => {
                    restarts += 1;
                    kprintln!(
                        "guest {} restarting ({restarts} of {})",
                        spec.name,
                        spec.restarts
                    );
                }
                Outcome::Restart => {
                    kprintln!("guest {} not restarted: too many restarts", spec.name);
                    break;
                }
                Outcome::Failed => break,
            }
        }
        let (free_after, _, _) = mem::frame_counts();
        if free_after == free_before {
            kprintln!("guest {} returned all its memory", spec.name);
        } else {
            kprintln!(
                "guest {} LEAK: {} frames not returned",
                spec.name,
                free_before.abs_diff(free_after)
            );
        }
    }
    (ran, clean)
}

enum Outcome {
    PowerOff,
    Restart,
    Failed,
}

fn run_guest(
    slot: usize,
    m: &Module,
    spec: &GuestSpec<'_>,
    fastpath: bool,
    modules: &[Module],
) -> Outcome {
    let name = spec.name;
    // devices: the guest's virtio devices; their pages follow RAM.
    let mut devs = match devices::GuestDevices::new(spec, modules) {
        Ok(d) => d,
        Err(e) => {
            kprintln!("guest {name} not started: {}", Escaped::new(e.as_bytes()));
            return Outcome::Failed;
        }
    };
    let ram = match GuestRam::with_device_pages(spec.mem, devs.device_pages()) {
        Ok(r) => r,
        Err(e) => {
            kprintln!(
                "guest {name} not started: cannot allocate {}: {e:?}",
                Bytes(spec.mem)
            );
            return Outcome::Failed;
        }
    };
    let (Ok(limit), Ok(total)) = (u32::try_from(ram.bytes()), u32::try_from(ram.total_bytes()))
    else {
        return Outcome::Failed;
    };
    // SAFETY: `ram` is this guest's memory (RAM and device pages), mapped
    // in the direct map, and outlives `gm` (both live until the end of this
    // function).
    let mut gm = unsafe { HostGuestMemory::new(ram.base(), total) };
    // The module's bytes, through the direct map (modules are reserved).
    let image_len = m.range.len() as usize;
    // SAFETY: the module range was reserved at boot and is never reused.
    let image =
        unsafe { core::slice::from_raw_parts(phys_to_virt(m.range.start) as *const u8, image_len) };
    let entry = match loader::load_elf(image, &mut gm) {
        Ok(e) => e,
        Err(e) => {
            kprintln!("guest {name} not started: bad image: {e}");
            return Outcome::Failed;
        }
    };
    if let Err(e) = loader::write_boot_params(&mut gm, limit, &spec.args) {
        kprintln!("guest {name} not started: {e}");
        return Outcome::Failed;
    }
    // devices: the device page and zeroed rings, above RAM.
    if let Err(e) = devs.write(&mut gm) {
        kprintln!("guest {name} not started: {}", Escaped::new(e.as_bytes()));
        return Outcome::Failed;
    }
    kprintln!(
        "guest {name} starting: {} RAM, entry {entry:#x}, args \"{}\"",
        Bytes(ram.bytes()),
        Escaped::new(spec.args.as_bytes())
    );

    let exits_before = switch::exits();
    let owner = TaskId(1);
    let mut chan = Channel::new(KernelCore::new(slot, fastpath, spec.paging), owner);
    let init = [
        LhReq::Initialize as u64,
        ram.base(),
        u64::from(devs.end_pfn()), // devices: RAM plus device pages
        u64::from(entry),
    ];
    if let Err(e) = chan.write(owner, &init) {
        kprintln!("guest {name} not started: INITIALIZE failed: errno {}", e.0);
        chan.close();
        return Outcome::Failed;
    }
    let mut buf = [0u8; 4];
    let mut console = GuestConsole::new();
    let mut text = [0u8; NOTIFY_TEXT_MAX];
    let outcome = loop {
        match chan.read(owner, &mut buf) {
            Ok(_) => {
                let addr = u32::from_le_bytes(buf);
                // devices: status changes and kicks; misuse kills the guest.
                let irq = |n: u16| {
                    let _ = chan.write(owner, &[LhReq::Irq as u64, u64::from(n)]);
                };
                match devs.notify(&mut gm, addr, name, &mut console, irq) {
                    devices::Notified::Device => continue,
                    devices::Notified::Kill(why) => {
                        kprintln!("guest {name} killed: {}", Escaped::new(why.as_bytes()));
                        break Outcome::Failed;
                    }
                    devices::Notified::Other => {}
                }
                match gm.read_cstr_bytes(addr, &mut text) {
                    Ok(s) => console.write(time::now_ns(), s, |line| match line {
                        ConsoleLine::Text(t) => kprintln!("guest {name}: {t}"),
                        ConsoleLine::Dropped { lines, bytes } => kprintln!(
                            "guest {name} console: {lines} lines ({bytes} bytes) dropped: \
                             over the rate limit"
                        ),
                    }),
                    Err(_) => kprintln!("guest {name} notified {addr:#x}: no device there"),
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
    devs.finish(name, &mut console); // devices: last partial line, counters
    let (lines, bytes) = console.dropped();
    if lines > 0 {
        kprintln!(
            "guest {name} console: {lines} lines ({bytes} bytes) dropped: over the rate limit"
        );
    }
    let (exits, fast) = switch::exits();
    kprintln!(
        "guest {name} used {} exits ({} handled where they landed), {} of host memory beyond its RAM",
        exits - exits_before.0,
        fast - exits_before.1,
        // devices: the device pages are host memory beyond RAM too.
        Bytes(chan.core().overhead_bytes() + u64::from(devs.device_pages()) * PAGE_SIZE)
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
    outcome
}
