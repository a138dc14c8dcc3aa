//! Locks that are safe to take from interrupt handlers.
//!
//! The hypervisor runs with interrupts enabled in its tasks, and interrupt
//! handlers touch shared state (serial input, timers, the logger). An
//! [`IrqMutex`] disables interrupts on the current CPU while it is held, so a
//! handler can never spin on a lock that the code it interrupted holds.

use core::ops::{Deref, DerefMut};

use x86_64::instructions::interrupts;

/// A spin lock that keeps interrupts off while held.
pub struct IrqMutex<T> {
    inner: spin::Mutex<T>,
}

/// Guard of an [`IrqMutex`]; restores the interrupt flag on drop.
pub struct IrqGuard<'a, T> {
    guard: Option<spin::MutexGuard<'a, T>>,
    were_enabled: bool,
}

impl<T> IrqMutex<T> {
    /// A new unlocked mutex.
    pub const fn new(value: T) -> Self {
        Self {
            inner: spin::Mutex::new(value),
        }
    }

    /// Disables interrupts, then takes the lock.
    pub fn lock(&self) -> IrqGuard<'_, T> {
        let were_enabled = interrupts::are_enabled();
        interrupts::disable();
        IrqGuard {
            guard: Some(self.inner.lock()),
            were_enabled,
        }
    }

    /// Breaks the lock. Only for the fatal-error path (panic, unexpected
    /// exception), when the holder can never run again.
    ///
    /// # Safety
    /// The caller must guarantee that the current holder (if any) will never
    /// touch the protected data again.
    pub unsafe fn force_unlock(&self) {
        // SAFETY: forwarded to the caller's guarantee.
        unsafe { self.inner.force_unlock() }
    }
}

impl<T> Deref for IrqGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.guard {
            Some(g) => g,
            None => unreachable!("guard is only taken in drop"),
        }
    }
}

impl<T> DerefMut for IrqGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.guard {
            Some(g) => g,
            None => unreachable!("guard is only taken in drop"),
        }
    }
}

impl<T> Drop for IrqGuard<'_, T> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if self.were_enabled {
            interrupts::enable();
        }
    }
}
