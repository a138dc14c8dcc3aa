//! The early console: `LHCALL_NOTIFY(address of a NUL-terminated string)`,
//! as Linux's lguest early console did. The launcher prints any notify
//! address that is neither a device descriptor nor a virtqueue as a string.
//!
//! Output is collected in a fixed 256-byte buffer and sent one line at a
//! time (on `'\n'`, when the buffer is full, or on [`flush`]), so each
//! [`println!`](crate::println) normally arrives as exactly one notify. NUL bytes in the
//! output are dropped (they would end the string early).

use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use guest_abi::LGUEST_SHUTDOWN_POWEROFF;

use crate::hcall::{SHUTDOWN_MSG_LEN, const_msg, notify, phys, shutdown_raw};
use crate::irq;
use crate::sync::IrqCell;

/// Size of the console line buffer, including the terminating NUL.
pub const CONSOLE_BUF: usize = 256;

struct Console {
    buf: [u8; CONSOLE_BUF],
    len: usize,
}

impl Console {
    const fn new() -> Self {
        Self {
            buf: [0; CONSOLE_BUF],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        if b == 0 {
            return;
        }
        self.buf[self.len] = b;
        self.len += 1;
        if b == b'\n' || self.len == CONSOLE_BUF - 1 {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        self.buf[self.len] = 0;
        notify(phys(self.buf.as_ptr()));
        self.len = 0;
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.push(b));
        Ok(())
    }
}

static CONSOLE: IrqCell<Console> = IrqCell::new(Console::new());

/// Write formatted text (used by [`print!`](crate::print)).
///
/// # Panics
///
/// If called re-entrantly, e.g. from a `Display` impl that prints, or from
/// a trap handler that interrupted a print.
pub fn _print(args: fmt::Arguments<'_>) {
    CONSOLE.with(|c| {
        let _ = c.write_fmt(args);
    });
}

/// Write formatted text and a newline as one unit (used by
/// [`println!`](crate::println)).
///
/// # Panics
///
/// As for [`_print`].
pub fn _print_line(args: fmt::Arguments<'_>) {
    CONSOLE.with(|c| {
        let _ = c.write_fmt(args);
        c.push(b'\n');
    });
}

/// Write a string.
pub fn write_str(s: &str) {
    CONSOLE.with(|c| {
        let _ = c.write_str(s);
    });
}

/// Send any buffered partial line now (skipped if the console is busy).
pub fn flush() {
    let _ = CONSOLE.try_with(|c| c.flush());
}

/// Print to the early console (buffered until `'\n'` or [`flush`]).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!($($arg)*))
    };
}

/// Print a line to the early console (one `LHCALL_NOTIFY` per line).
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::write_str("\n")
    };
    ($($arg:tt)*) => {
        $crate::console::_print_line(::core::format_args!($($arg)*))
    };
}

/// A `fmt::Write` into a byte slice that silently truncates and drops NULs.
struct Truncating<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes().filter(|&b| b != 0) {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// Buffer for the panic message: text, `'\n'`, NUL.
const PANIC_BUF: usize = 512;

#[repr(C, align(4))]
struct PanicBuf(UnsafeCell<[u8; PANIC_BUF]>);

// SAFETY: only the first panic (the one that wins `PANICKING`) touches it.
unsafe impl Sync for PanicBuf {}

static PANIC_TEXT: PanicBuf = PanicBuf(UnsafeCell::new([0; PANIC_BUF]));
static PANICKING: AtomicBool = AtomicBool::new(false);

/// Used if the panic path itself panics or faults.
static NESTED_PANIC_MSG: [u8; SHUTDOWN_MSG_LEN] = const_msg(b"panic while panicking");

/// The panic path: print `panic: <message> (<file>:<line>)` as one console
/// line, then shut down (power off) with the same text (cut to 127 bytes).
/// Uses its own buffer, so it works even if the panic happened inside the
/// console.
pub(crate) fn panic_report(info: &core::panic::PanicInfo<'_>) -> ! {
    irq::disable();
    if PANICKING.swap(true, Ordering::AcqRel) {
        shutdown_raw(phys(&raw const NESTED_PANIC_MSG), LGUEST_SHUTDOWN_POWEROFF);
    }
    // Best effort: get an earlier partial line out first.
    flush();
    // SAFETY: we won `PANICKING`, so this is the only reference, ever.
    let buf = unsafe { &mut *PANIC_TEXT.0.get() };
    let mut w = Truncating {
        buf: &mut buf[..PANIC_BUF - 2],
        len: 0,
    };
    let _ = write!(w, "panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(w, " ({}:{})", loc.file(), loc.line());
    }
    let n = w.len;
    buf[n] = b'\n';
    buf[n + 1] = 0;
    notify(phys(buf.as_ptr()));
    buf[n.min(SHUTDOWN_MSG_LEN - 1)] = 0;
    shutdown_raw(phys(buf.as_ptr()), LGUEST_SHUTDOWN_POWEROFF)
}
