//! The IDT: one gate per vector, each pointing at its entry stub in
//! [`super::trap`].

use core::cell::UnsafeCell;

use x86_64::VirtAddr;
use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;

use super::gdt;
use super::trap;

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

struct IdtCell(UnsafeCell<Idt>);

// SAFETY: gates are written by the boot CPU during init and through
// `set_gate_dpl` with interrupts off; afterwards only the CPU reads them.
unsafe impl Sync for IdtCell {}

static IDT: IdtCell = IdtCell(UnsafeCell::new(Idt([[0; 2]; 256])));

fn gate(handler: u64, ist: u8, dpl: u8) -> [u64; 2] {
    // type 0xE = 64-bit interrupt gate (IF cleared on entry), present.
    let attrs = 0x8E | (u64::from(dpl & 3) << 5);
    let low = (handler & 0xFFFF)
        | (u64::from(gdt::HOST_CS) << 16)
        | (u64::from(ist & 7) << 32)
        | (attrs << 40)
        | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

/// Fills all 256 gates (interrupt gates, DPL 0, host code segment) and loads
/// the IDT. Double fault, NMI and machine check run on their own IST stacks so
/// that a broken kernel stack still gets a diagnostic.
pub fn init() {
    // SAFETY: boot CPU, interrupts off, no other reference into IDT exists.
    unsafe {
        let idt = &mut *IDT.0.get();
        for (vector, entry) in idt.0.iter_mut().enumerate() {
            let ist = match vector {
                8 => gdt::IST_DOUBLE_FAULT,
                2 => gdt::IST_NMI,
                18 => gdt::IST_MACHINE_CHECK,
                _ => 0,
            };
            *entry = gate(trap::stub_address(vector as u8), ist, 0);
        }
        let ptr = DescriptorTablePointer {
            limit: (size_of::<Idt>() - 1) as u16,
            base: VirtAddr::new(idt.0.as_ptr() as u64),
        };
        lidt(&ptr);
    }
}

/// Points `vector` at `handler` (instead of its entry stub) with gate DPL
/// `dpl`; used by the native benchmark probe. [`set_gate_dpl`] restores the
/// normal stub.
pub fn set_gate_handler(vector: u8, handler: u64, dpl: u8) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off on the only running CPU; the entry is
        // rewritten whole before the next interrupt can read it.
        unsafe { (*IDT.0.get()).0[usize::from(vector)] = gate(handler, 0, dpl) };
    });
}

/// The raw gate of `vector`, to put back later with [`restore_gate`].
pub fn saved_gate(vector: u8) -> [u64; 2] {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off on the only running CPU; a plain read.
        unsafe { (*IDT.0.get()).0[usize::from(vector)] }
    })
}

/// Puts back a gate read with [`saved_gate`].
pub fn restore_gate(vector: u8, saved: [u64; 2]) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off on the only running CPU; the entry is
        // rewritten whole (with a value it held before) before the next
        // interrupt can read it.
        unsafe { (*IDT.0.get()).0[usize::from(vector)] = saved };
    });
}

/// Changes which privilege levels may raise `vector` with `int n` (the
/// lguest hypercall gate 0x1f is DPL 1, for instance).
pub fn set_gate_dpl(vector: u8, dpl: u8) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off on the only running CPU; the entry is
        // rewritten whole before the next interrupt can read it.
        unsafe {
            let idt = &mut *IDT.0.get();
            let ist = ((idt.0[usize::from(vector)][0] >> 32) & 7) as u8;
            idt.0[usize::from(vector)] = gate(trap::stub_address(vector), ist, dpl);
        }
    });
}
