//! The smallest lguest guest: greets, shows its command line and memory
//! size from `boot_params`, then returns, which powers the guest off
//! (`LHCALL_SHUTDOWN(POWEROFF, "power off")`).
#![no_std]
#![no_main]

use lguest_rt::{BootInfo, println};

lguest_rt::entry!(main);

fn main(boot: &BootInfo) {
    println!("hello from an lguest guest");
    println!("command line: {}", boot.cmdline);
    println!(
        "memory: {} MiB, boot_params at {:#x} (subarch {}), lguest_data at {:#x}",
        boot.mem_bytes >> 20,
        boot.boot_params,
        boot.hardware_subarch,
        lguest_rt::lguest_data_addr()
    );
}
