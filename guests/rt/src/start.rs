//! `_start` and the runtime's initialisation before the guest's `main`.

use core::cell::UnsafeCell;

use crate::boot::BootInfo;
use crate::irq::{self, write_field};

/// Size of the boot stack (in `.bss`).
pub const STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
struct Stack(UnsafeCell<[u8; STACK_SIZE]>);

// SAFETY: the stack is only ever used as raw memory by `_start` (as esp);
// Rust code never creates references to it.
unsafe impl Sync for Stack {}

static BOOT_STACK: Stack = Stack(UnsafeCell::new([0; STACK_SIZE]));

/// `(bottom, top)` guest-physical addresses of the boot stack the runtime
/// runs on (e.g. for `LHCALL_SET_STACK`).
pub fn boot_stack() -> (u32, u32) {
    let bottom = crate::hcall::phys(BOOT_STACK.0.get());
    (bottom, bottom + STACK_SIZE as u32)
}

#[cfg(target_arch = "x86")]
core::arch::global_asm!(
    // The host starts us at the ELF entry with cs = 0x61, ds/es/ss = 0x69,
    // esi = guest-physical address of boot_params and nothing else defined.
    // 1. cld: Rust code assumes DF = 0.
    // 2. Zero .bss (between the linker-script symbols __bss_start and
    //    __bss_end) with rep stosb: uses only eax, ecx, edi, so esi survives;
    //    the loader should already have zeroed it, this makes sure. The boot
    //    stack is part of .bss, which is why this happens before any push.
    // 3. esp = top of BOOT_STACK (16-byte aligned), ebp = 0 (ends frame-
    //    pointer chains). After `sub 12; push esi` esp is again 16-byte
    //    aligned at the call, as the i386 System V ABI wants.
    // 4. rt_main(esi) in the C convention (argument on the stack); it never
    //    returns, ud2 is a tripwire.
    ".pushsection .text._start,\"ax\",@progbits",
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "cld",
    "mov edi, offset __bss_start",
    "mov ecx, offset __bss_end",
    "sub ecx, edi",
    "xor eax, eax",
    "rep stosb",
    "lea esp, [{stack} + {stack_size}]",
    "xor ebp, ebp",
    "sub esp, 12",
    "push esi",
    "call {rt_main}",
    "ud2",
    ".size _start, . - _start",
    ".popsection",
    stack = sym BOOT_STACK,
    stack_size = const STACK_SIZE,
    rt_main = sym rt_main,
);

unsafe extern "Rust" {
    /// The guest's entry point, defined by [`entry!`](crate::entry).
    fn __lguest_rt_guest_main(boot: &BootInfo);
    /// `lguest_data.kernel_address` to announce at INIT, defined by
    /// [`entry!`](crate::entry).
    static __LGUEST_RT_KERNEL_ADDRESS: u32;
}

/// Runtime initialisation, then the guest's `main`, then power off.
#[cfg_attr(not(target_arch = "x86"), allow(dead_code))]
extern "C" fn rt_main(boot_params: u32) -> ! {
    // The host reads the iret window at LGUEST_INIT.
    let (start, end) = crate::trap::noirq_window();
    write_field!(noirq_start, start);
    write_field!(noirq_end, end);
    // The host reads kernel_address at LGUEST_INIT too (E4).
    // SAFETY: `entry!` defines this immutable static.
    write_field!(kernel_address, unsafe { __LGUEST_RT_KERNEL_ADDRESS });
    // SAFETY: first hypercall, once; LGUEST_DATA is a static laid out per
    // the ABI with Linux's initial contents.
    unsafe { crate::hcall::lguest_init(irq::lguest_data_addr()) };
    crate::trap::install_idt();
    irq::enable();
    // SAFETY: the launcher wrote boot_params at `boot_params` (esi) and the
    // command line inside RAM; we are in linear mode, nothing writes them.
    let boot = unsafe { BootInfo::read(boot_params) };
    // SAFETY: `entry!` defines the symbol with exactly this signature.
    unsafe { __lguest_rt_guest_main(&boot) };
    crate::test::finish()
}
