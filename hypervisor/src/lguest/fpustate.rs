//! Which guest's x87/SSE state the CPU registers hold, and what a switch to
//! another guest must do: the pure policy behind the kernel's lazy FPU
//! switching (`kernel/lguest/fpu.rs` only executes `fxsave`/`fxrstor`).
//!
//! Every guest owns its FXSAVE area (allocated with the guest, freed with
//! it: no shared slots, so no guest can ever be handed another's area). The
//! registers are saved into the owner's area only when a *different* guest
//! is about to run. A guest is named by its *instance* (unique per started
//! guest, never reused), and an area that was never saved into is loaded as
//! the reset image, so a new or restarted guest never sees registers from
//! before it existed. There is no separate "reset" step that a caller could
//! forget.

/// What [`FpuState::switch_to`] asks the kernel to do, in order: save the
/// live registers into the current owner's area, then load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// Save the live registers into the area of this (previous) owner.
    pub save_owner: Option<u64>,
    /// What the registers must hold afterwards.
    pub load: Load,
}

/// The registers' contents after a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// They already hold the guest's state: do nothing.
    Keep,
    /// Load the reset image (FCW 0x37F, MXCSR 0x1F80, all else zero).
    Reset,
    /// Load the guest's own saved area.
    Saved,
}

/// Whose state the registers hold.
#[derive(Debug, Clone, Default)]
pub struct FpuState {
    live: Option<u64>,
}

impl FpuState {
    /// Nobody's state is live.
    pub const fn new() -> Self {
        Self { live: None }
    }

    /// The guest instance whose state the registers hold.
    pub fn live(&self) -> Option<u64> {
        self.live
    }

    /// Guest `instance` is about to run; `has_saved` says whether its own
    /// area holds state saved by an earlier switch away from it.
    pub fn switch_to(&mut self, instance: u64, has_saved: bool) -> Switch {
        if self.live == Some(instance) {
            return Switch {
                save_owner: None,
                load: Load::Keep,
            };
        }
        let save_owner = self.live.replace(instance);
        Switch {
            save_owner,
            load: if has_saved { Load::Saved } else { Load::Reset },
        }
    }

    /// Guest `instance` is gone: its registers need not be saved (its area
    /// is about to be freed). Another guest's live state is untouched.
    pub fn release(&mut self, instance: u64) {
        if self.live == Some(instance) {
            self.live = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sw(save_owner: Option<u64>, load: Load) -> Switch {
        Switch { save_owner, load }
    }

    #[test]
    fn a_guest_starts_from_the_reset_image_and_keeps_its_registers() {
        let mut f = FpuState::new();
        assert_eq!(f.switch_to(1, false), sw(None, Load::Reset));
        assert_eq!(f.switch_to(1, false), sw(None, Load::Keep));
        assert_eq!(f.live(), Some(1));
    }

    #[test]
    fn switching_guests_saves_the_owner_and_restores_the_other() {
        let mut f = FpuState::new();
        f.switch_to(1, false);
        assert_eq!(f.switch_to(2, false), sw(Some(1), Load::Reset));
        assert_eq!(f.switch_to(1, true), sw(Some(2), Load::Saved));
        assert_eq!(f.switch_to(2, true), sw(Some(1), Load::Saved));
    }

    #[test]
    fn a_new_guest_never_inherits_the_live_registers() {
        let mut f = FpuState::new();
        f.switch_to(1, false);
        f.release(1);
        // Guest 1's registers are still in the CPU, but 3 gets the reset
        // image and nobody saves the dead guest's state.
        assert_eq!(f.switch_to(3, false), sw(None, Load::Reset));
    }

    #[test]
    fn release_of_a_guest_does_not_touch_another_guests_state() {
        let mut f = FpuState::new();
        f.switch_to(1, false);
        f.release(2);
        assert_eq!(f.live(), Some(1));
        assert_eq!(f.switch_to(2, false), sw(Some(1), Load::Reset));
    }
}
