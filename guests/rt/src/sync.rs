//! Interrupt-safe interior mutability for statics (no `static mut`).
//!
//! The guest has one virtual CPU, so the only concurrency is a virtual
//! interrupt (or a trap) arriving in the middle of something. [`IrqCell`]
//! disables virtual interrupts for the duration of an access and refuses
//! re-entrant access (e.g. from a trap handler that fires while the cell is
//! borrowed), which makes handing out `&mut T` sound.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::irq;

/// A cell for a mutable static, accessed with virtual interrupts off.
pub struct IrqCell<T> {
    borrowed: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the guest runs on a single virtual CPU; every access to `value`
// goes through `with`/`try_with`, which holds the `borrowed` flag (so no
// second `&mut T` can exist, even from a trap handler) and keeps virtual
// interrupts off. `T: Send` because the value may be touched from interrupt
// context, which plays the role of another thread.
unsafe impl<T: Send> Sync for IrqCell<T> {}

impl<T> IrqCell<T> {
    /// A cell holding `value`.
    pub const fn new(value: T) -> Self {
        Self {
            borrowed: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Run `f` on the contents with virtual interrupts disabled.
    ///
    /// # Panics
    ///
    /// If the cell is already borrowed (re-entry from `f` itself or from a
    /// trap handler interrupting another access).
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        match self.try_with(f) {
            Some(r) => r,
            None => panic!("IrqCell re-entered"),
        }
    }

    /// Like [`with`](Self::with), but returns `None` instead of panicking if
    /// the cell is already borrowed.
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let flags = irq::save();
        if self.borrowed.swap(true, Ordering::Acquire) {
            irq::restore(flags);
            return None;
        }
        // SAFETY: `borrowed` was false and is now true, so this is the only
        // live reference to the contents until we clear it below; the guest
        // has one CPU and virtual interrupts are off.
        let r = f(unsafe { &mut *self.value.get() });
        self.borrowed.store(false, Ordering::Release);
        irq::restore(flags);
        Some(r)
    }

    /// Raw pointer to the contents, e.g. to pass a guest-physical address to
    /// the host. Dereferencing it is subject to the usual aliasing rules.
    pub const fn as_ptr(&self) -> *mut T {
        self.value.get()
    }
}
