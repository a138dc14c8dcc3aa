//! `lgtest`: conformance tests of the lguest host, one area per boot chosen
//! with `mode=<name>` on the module command line (e.g. `lgtest,mode=traps`
//! in a scenario). Every check prints `PASS: ...` or `FAIL: ...`; the guest
//! then prints `DONE: <p> passed, <f> failed` and powers off.
//!
//! | mode | what |
//! |---|---|
//! | `traps` | every exception class the guest can raise at CPL 1, reflected with the right vector, frame and error code ([`traps`]) |
//! | `mf` | #MF from an unmasked x87 exception at `fwait` ([`traps::run_mf`]) |
//! | `user` | CPL 3: `int $0x80`, user faults on the `SET_STACK` stack, an irq from user mode, back to the kernel ([`user`]) |
//! | `timer` | clock-event rate, `irq_enabled` off, a blocked irq, HALT ([`timer`]) |
//! | `ring` | the async hypercall ring: order, exactly once, overflow, notify inside the ring ([`ring`]) |
//! | `nohandler` | removes its #DE gate and divides by zero: the host must kill it with `unhandled trap 0` |
//! | `restart` | `LHCALL_SHUTDOWN(RESTART)` on every boot: the launcher restarts it up to 3 times |
//! | `fresh` | restarts itself; every boot checks that RAM, FPU/SSE state and clock event of the boot before are gone ([`fresh`]) |
//! | `wake` | thousands of clock events expiring during HALT: none may be slept through ([`timer::run_wake`]) |
#![no_std]
#![no_main]

mod fresh;
mod ring;
mod timer;
mod traps;
mod user;

use lguest_rt::{BootInfo, println};

lguest_rt::entry!(main);

type Mode = (&'static str, fn(&BootInfo));

const MODES: &[Mode] = &[
    ("traps", traps::run),
    ("mf", traps::run_mf),
    ("user", user::run),
    ("timer", timer::run),
    ("ring", ring::run),
    ("nohandler", traps::no_handler),
    ("restart", restart),
    ("fresh", fresh::run),
    ("wake", timer::run_wake),
];

fn main(boot: &BootInfo) {
    let Some(mode) = boot.arg("mode") else {
        println!("FAIL: no mode= on the command line {:?}", boot.cmdline);
        return;
    };
    let Some(&(name, run)) = MODES.iter().find(|m| m.0 == mode) else {
        println!("FAIL: unknown mode {mode:?}");
        return;
    };
    println!("lgtest: mode {name}");
    run(boot);
}

/// Ask for a restart on every boot: the guest keeps nothing across one (its
/// memory is fresh), so the launcher's restart limit is what ends it.
fn restart(_boot: &BootInfo) {
    lguest_rt::restart("lgtest wants a restart");
}
