//! Which guest's x87/SSE state the CPU registers hold, and what a switch to
//! another guest must do: the pure policy behind the kernel's lazy FPU
//! switching (`kernel/lguest/fpu.rs` only executes `fxsave`/`fxrstor`).
//!
//! Every guest has an FXSAVE area in its slot. The registers are saved into
//! the owner's area only when a *different* guest is about to run. Each
//! area remembers the guest *instance* (unique per started guest, never
//! reused) whose state it holds, so a new guest — a restart, or another
//! guest that reuses the slot — can never be handed an older guest's
//! registers: it gets the reset image, whatever happened before. There is
//! no separate "reset" step that a caller could forget.

/// What [`FpuState::switch_to`] asks the kernel to do, in order: save the
/// registers into `save_to`'s area, then load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// Slot whose area receives the live registers (`fxsave`), if any.
    pub save_to: Option<usize>,
    /// What the registers must hold afterwards.
    pub load: Load,
}

/// What the registers must be loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// They already hold this guest's state.
    Keep,
    /// The architectural reset image (FCW 0x037f, MXCSR 0x1f80, all
    /// registers zero): a guest that has never run on this CPU.
    Reset,
    /// The guest's own saved area.
    Saved,
}

/// Ownership of the FPU registers and of `N` per-slot save areas.
#[derive(Debug, Clone)]
pub struct FpuState<const N: usize> {
    /// `(slot, instance)` whose state is in the registers.
    live: Option<(usize, u64)>,
    /// The instance whose state each slot's area holds.
    saved: [Option<u64>; N],
}

impl<const N: usize> Default for FpuState<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FpuState<N> {
    /// Nobody's state anywhere.
    pub const fn new() -> Self {
        Self {
            live: None,
            saved: [None; N],
        }
    }

    /// Guest `instance` in `slot` is about to run. A slot outside `0..N`
    /// always gets [`Load::Reset`] and its state is never saved.
    pub fn switch_to(&mut self, slot: usize, instance: u64) -> Switch {
        if self.live == Some((slot, instance)) {
            return Switch {
                save_to: None,
                load: Load::Keep,
            };
        }
        let mut save_to = None;
        if let Some((owner, owner_instance)) = self.live
            && owner != slot
            && let Some(area) = self.saved.get_mut(owner)
        {
            *area = Some(owner_instance);
            save_to = Some(owner);
        }
        let load = if self.saved.get(slot).copied().flatten() == Some(instance) {
            Load::Saved
        } else {
            Load::Reset
        };
        self.live = Some((slot, instance));
        Switch { save_to, load }
    }

    /// Guest `instance` in `slot` is gone: its state is neither kept in the
    /// registers nor saved any more.
    pub fn release(&mut self, slot: usize, instance: u64) {
        if self.live == Some((slot, instance)) {
            self.live = None;
        }
        if let Some(area) = self.saved.get_mut(slot)
            && *area == Some(instance)
        {
            *area = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sw(save_to: Option<usize>, load: Load) -> Switch {
        Switch { save_to, load }
    }

    #[test]
    fn a_guest_starts_from_the_reset_image_and_keeps_its_registers() {
        let mut f = FpuState::<4>::new();
        assert_eq!(f.switch_to(0, 1), sw(None, Load::Reset));
        assert_eq!(f.switch_to(0, 1), sw(None, Load::Keep));
    }

    #[test]
    fn switching_guests_saves_the_owner_and_restores_the_other() {
        let mut f = FpuState::<4>::new();
        f.switch_to(0, 1);
        assert_eq!(f.switch_to(1, 2), sw(Some(0), Load::Reset));
        assert_eq!(f.switch_to(0, 1), sw(Some(1), Load::Saved));
        assert_eq!(f.switch_to(1, 2), sw(Some(0), Load::Saved));
    }

    #[test]
    fn a_new_guest_in_a_slot_never_gets_the_old_guests_saved_state() {
        let mut f = FpuState::<4>::new();
        f.switch_to(0, 1);
        f.switch_to(1, 2); // guest 1's registers are saved in area 0
        f.release(0, 1);
        assert_eq!(f.switch_to(0, 3), sw(Some(1), Load::Reset));
        // Even if the old guest was never released.
        let mut f = FpuState::<4>::new();
        f.switch_to(0, 1);
        f.switch_to(1, 2);
        assert_eq!(f.switch_to(0, 3), sw(Some(1), Load::Reset));
    }

    #[test]
    fn a_new_guest_never_inherits_the_live_registers() {
        // Restart in the same slot, with and without a release in between.
        let mut f = FpuState::<4>::new();
        f.switch_to(0, 1);
        f.release(0, 1);
        assert_eq!(f.switch_to(0, 2), sw(None, Load::Reset));
        let mut f = FpuState::<4>::new();
        f.switch_to(0, 1);
        assert_eq!(f.switch_to(0, 2), sw(None, Load::Reset));
        // The old guest's state is not saved over the new one's area.
        assert_eq!(f.switch_to(1, 3), sw(Some(0), Load::Reset));
        assert_eq!(f.switch_to(0, 2), sw(Some(1), Load::Saved));
    }

    #[test]
    fn release_of_a_guest_does_not_touch_another_guests_state() {
        let mut f = FpuState::<4>::new();
        f.switch_to(0, 1);
        f.switch_to(1, 2);
        f.release(0, 7); // not the instance in slot 0
        assert_eq!(f.switch_to(0, 1), sw(Some(1), Load::Saved));
        f.release(1, 2);
        assert_eq!(f.switch_to(0, 1), sw(None, Load::Keep));
    }

    #[test]
    fn slots_out_of_range_are_never_saved() {
        let mut f = FpuState::<2>::new();
        assert_eq!(f.switch_to(5, 1), sw(None, Load::Reset));
        assert_eq!(f.switch_to(0, 2), sw(None, Load::Reset));
        assert_eq!(f.switch_to(5, 1), sw(Some(0), Load::Reset));
    }
}
