//! Page-aligned memory used only by the CPU as a stack (a kernel stack for
//! traps from user mode, a user-mode stack), never through Rust references.

use core::cell::UnsafeCell;

/// `N` bytes of page-aligned stack.
#[repr(C, align(4096))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: used only as raw memory by the CPU (as a stack), never through
// Rust references.
unsafe impl<const N: usize> Sync for Stack<N> {}

impl<const N: usize> Stack<N> {
    /// A zeroed stack.
    pub const fn new() -> Self {
        Self(UnsafeCell::new([0; N]))
    }

    /// Guest-physical address of its top (one past the last byte): the
    /// initial stack pointer.
    pub fn top(&self) -> u32 {
        crate::hcall::phys(self.0.get()) + N as u32
    }
}

impl<const N: usize> Default for Stack<N> {
    fn default() -> Self {
        Self::new()
    }
}
