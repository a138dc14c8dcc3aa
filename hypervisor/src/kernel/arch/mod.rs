//! x86_64 specifics: CPU tables, trap entry, port I/O and control registers.

pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod trap;
