//! The `/dev/lguest` control-channel requests and their errno values.
//!
//! A `write` carries a sequence of 64-bit words: the request number
//! ([`LhReq`]) followed by its payload. A `read` runs the guest until
//! something happens. The semantics are implemented by the hypervisor's
//! `lguest::chan::Channel`; see `docs/abi.md` for the full table.
//!
//! | Request | Payload words | Success |
//! |---|---|---|
//! | `INITIALIZE` (0) | base, pfnlimit, start | [`INITIALIZE_RESULT`] (= 24, bytes of payload consumed) |
//! | `GETDMA` (1) | – | never: always `EINVAL` (E0-only request) |
//! | `IRQ` (2) | irq (< 32) | 0 |
//! | `BREAK` (3) | 1 = break, 0 = clear | 0 |
//! | `EVENTFD` (4) | guest-physical address (≠ 0), event handle | 0 |

/// Control-channel request numbers (`enum lguest_req`, order fixed).
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LhReq {
    /// Set up the guest: payload {base, pfnlimit, start}.
    Initialize = 0,
    /// E0 DMA request; rejected with `EINVAL`.
    GetDma = 1,
    /// Raise a virtual interrupt: payload {irq}.
    Irq = 2,
    /// Break the owner out of `read`: payload {1 | 0}.
    Break = 3,
    /// Bind an event handle to a notify address: payload {addr, handle}.
    Eventfd = 4,
}

impl LhReq {
    /// Number of payload words the request needs after the request word.
    pub const fn payload_words(self) -> usize {
        match self {
            LhReq::Initialize => 3,
            LhReq::GetDma => 0,
            LhReq::Irq | LhReq::Break => 1,
            LhReq::Eventfd => 2,
        }
    }
}

impl TryFrom<u64> for LhReq {
    /// The unknown request number.
    type Error = u64;

    fn try_from(v: u64) -> Result<Self, u64> {
        Ok(match v {
            0 => LhReq::Initialize,
            1 => LhReq::GetDma,
            2 => LhReq::Irq,
            3 => LhReq::Break,
            4 => LhReq::Eventfd,
            other => return Err(other),
        })
    }
}

/// What a successful `INITIALIZE` write returns: the size in bytes of the
/// payload it consumed (3 words of 8 bytes), as Linux returned
/// `sizeof(args)` for its own word size.
pub const INITIALIZE_RESULT: usize = 3 * 8;

/// Maximum length of a death reason in bytes, excluding the terminating NUL
/// (the launcher reads it into a 1024-byte buffer).
pub const DEATH_REASON_MAX: usize = 1023;

/// Size of a `read` result for a notify: the 4-byte little-endian
/// guest-physical address.
pub const NOTIFY_READ_LEN: usize = 4;

/// A Linux errno value (positive), as returned by the control channel.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    /// Operation not permitted: `read` from a task other than the owner.
    pub const EPERM: Errno = Errno(1);
    /// No such entry: the guest is dead (only its reason can be read).
    pub const ENOENT: Errno = Errno(2);
    /// Interrupted: the owner task was asked to stop while running the guest.
    pub const EINTR: Errno = Errno(4);
    /// Bad file descriptor: unknown event handle.
    pub const EBADF: Errno = Errno(9);
    /// Try again: a `BREAK` interrupted `read`.
    pub const EAGAIN: Errno = Errno(11);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Bad address: guest memory region unusable.
    pub const EFAULT: Errno = Errno(14);
    /// Busy: `INITIALIZE` on an initialised channel.
    pub const EBUSY: Errno = Errno(16);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(22);
    /// No space: too many event handles bound.
    pub const ENOSPC: Errno = Errno(28);
    /// The guest asked to be restarted (`LHCALL_SHUTDOWN`, reason 2).
    pub const ERESTART: Errno = Errno(85);

    /// The symbolic name, e.g. `"EINVAL"`, or `"E?"` for other values.
    pub const fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            4 => "EINTR",
            9 => "EBADF",
            11 => "EAGAIN",
            12 => "ENOMEM",
            14 => "EFAULT",
            16 => "EBUSY",
            22 => "EINVAL",
            28 => "ENOSPC",
            85 => "ERESTART",
            _ => "E?",
        }
    }

    /// The value as Linux returns it from a system call (`-errno`).
    pub const fn to_neg(self) -> i64 {
        -(self.0 as i64)
    }
}

impl core::fmt::Debug for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.name())
    }
}

const _: () = assert!(core::mem::size_of::<LhReq>() == 8);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    #[test]
    fn request_numbers() {
        assert_eq!(LhReq::Initialize as u64, 0);
        assert_eq!(LhReq::GetDma as u64, 1);
        assert_eq!(LhReq::Irq as u64, 2);
        assert_eq!(LhReq::Break as u64, 3);
        assert_eq!(LhReq::Eventfd as u64, 4);
        for n in 0..5u64 {
            assert_eq!(LhReq::try_from(n).map(|r| r as u64), Ok(n));
        }
        assert_eq!(LhReq::try_from(5), Err(5));
        assert_eq!(LhReq::try_from(u64::MAX), Err(u64::MAX));
    }

    #[test]
    fn payload_sizes() {
        assert_eq!(LhReq::Initialize.payload_words() * 8, INITIALIZE_RESULT);
        assert_eq!(LhReq::Irq.payload_words(), 1);
        assert_eq!(LhReq::Eventfd.payload_words(), 2);
    }

    #[test]
    fn errno_values() {
        let table = [
            (Errno::EPERM, 1, "EPERM"),
            (Errno::ENOENT, 2, "ENOENT"),
            (Errno::EINTR, 4, "EINTR"),
            (Errno::EBADF, 9, "EBADF"),
            (Errno::EAGAIN, 11, "EAGAIN"),
            (Errno::ENOMEM, 12, "ENOMEM"),
            (Errno::EFAULT, 14, "EFAULT"),
            (Errno::EBUSY, 16, "EBUSY"),
            (Errno::EINVAL, 22, "EINVAL"),
            (Errno::ENOSPC, 28, "ENOSPC"),
            (Errno::ERESTART, 85, "ERESTART"),
        ];
        for (e, n, name) in table {
            assert_eq!(e.0, n);
            assert_eq!(e.name(), name);
            assert_eq!(e.to_neg(), -i64::from(n));
        }
        assert_eq!(Errno(99).name(), "E?");
        assert_eq!(format!("{:?}", Errno::EINVAL), "EINVAL(22)");
        assert_eq!(format!("{}", Errno::ENOENT), "ENOENT");
    }
}
