//! [`Kill`]: why a guest must die.
//!
//! Validation code returns `Err(Kill)` with lguest's reason string; the
//! [`Vcpu`](super::vcpu::Vcpu) records the first one as the guest's
//! [`DeathReason`](super::chan::DeathReason) and the guest is dead from then
//! on. Both are [`FixedStr`]s: a kill reason is formatted inline, without
//! allocating, and copied into the death reason as text.

use core::fmt;

use super::guestmem::MemFault;
use crate::fixedstr::FixedStr;

/// Capacity of a [`Kill`] reason in bytes. lguest's kill strings are short
/// (the longest, a bad-address report, is under 50 bytes); the small
/// capacity keeps `Result<_, Kill>` small on the hypercall path.
pub const KILL_REASON_MAX: usize = 120;

/// The reason a guest is killed, formatted like lguest's `kill_guest()`
/// messages (`"bad stack pages 3"`, `"unhandled trap 13 at 0x1000 (0x0)"`).
/// Longer text is cut at a character boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill(FixedStr<KILL_REASON_MAX>);

impl Kill {
    /// A kill with the formatted reason.
    pub fn new(reason: impl fmt::Display) -> Self {
        Self(FixedStr::format(format_args!("{reason}")))
    }

    /// The reason.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Kill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_truncates() {
        let k: Result<(), Kill> = kill!("bad stack pages {}", 3);
        assert_eq!(k.unwrap_err().as_str(), "bad stack pages 3");
        let k = Kill::from(MemFault {
            gpa: 0xffff_fff0,
            len: 24,
            write: true,
        });
        assert_eq!(k.to_string(), "bad write address 0xfffffff0 len 24");
        let long = "é".repeat(100);
        let k = Kill::new(&long);
        assert_eq!(k.as_str().len(), KILL_REASON_MAX);
        assert!(long.starts_with(k.as_str()));
        assert!(core::mem::size_of::<Kill>() < 128);
    }
}
