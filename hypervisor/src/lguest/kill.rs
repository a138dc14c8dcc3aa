//! [`Kill`]: why a guest must die.
//!
//! Validation code returns `Err(Kill)` with lguest's reason string; the
//! [`Vcpu`](super::vcpu::Vcpu) records the first one and the guest is dead
//! from then on.

extern crate alloc;

use alloc::string::{String, ToString};
use core::fmt;

use super::guestmem::MemFault;

/// The reason a guest is killed, formatted like lguest's `kill_guest()`
/// messages (`"bad stack pages 3"`, `"unhandled trap 13 at 0x1000 (0x0)"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill(pub String);

impl Kill {
    /// A kill with the formatted reason.
    pub fn new(reason: impl fmt::Display) -> Self {
        Self(reason.to_string())
    }

    /// The reason.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<MemFault> for Kill {
    fn from(f: MemFault) -> Self {
        Self::new(f)
    }
}

/// `Err(Kill)` with a `format!`-style reason.
macro_rules! kill {
    ($($arg:tt)*) => {
        ::core::result::Result::Err($crate::lguest::kill::Kill::new(::core::format_args!($($arg)*)))
    };
}
pub(crate) use kill;
