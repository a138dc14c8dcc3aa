//! The serial console (COM1) and the `log` backend.
//!
//! Output goes to COM1 through the `uart_16550` driver under an [`IrqMutex`],
//! so printing is safe from interrupt handlers. Input arrives by interrupt
//! (COM1 = ISA IRQ 4) into a ring buffer that tasks drain with [`read_byte`].
//! Boot reports and diagnostics are printed plainly with `kprintln!`; log
//! records carry a timestamp and a level.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use rustyvisor::ringbuf::RingBuffer;
use uart_16550::backend::PioBackend;
use uart_16550::{BaudRate, Config, Uart16550};

use super::sync::IrqMutex;

const COM1: u16 = 0x3F8;

struct Serial {
    uart: Option<Uart16550<PioBackend>>,
    /// The console's open command line (prompt and text typed so far), to
    /// show again below every line printed while it is open.
    prompt: Option<alloc::vec::Vec<u8>>,
    /// The prompt is on the screen: the cursor is at its end, not at the
    /// start of a line.
    prompt_shown: bool,
    /// The last byte written was a line end.
    at_line_start: bool,
}

extern crate alloc;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(last) = s.as_bytes().last() {
            self.at_line_start = *last == b'\n';
        }
        if let Some(uart) = self.uart.as_mut() {
            for chunk in s.split_inclusive('\n') {
                match chunk.strip_suffix('\n') {
                    Some(line) => {
                        uart.send_bytes_exact(line.as_bytes());
                        uart.send_bytes_exact(b"\r\n");
                    }
                    None => uart.send_bytes_exact(chunk.as_bytes()),
                }
            }
        }
        Ok(())
    }
}

static SERIAL: IrqMutex<Serial> = IrqMutex::new(Serial {
    uart: None,
    prompt: None,
    prompt_shown: false,
    at_line_start: true,
});
static INPUT: IrqMutex<RingBuffer<1024>> = IrqMutex::new(RingBuffer::new());
static TIMESTAMPS: AtomicBool = AtomicBool::new(true);
static LEVEL: AtomicU8 = AtomicU8::new(3);

/// Brings up COM1 (8-N-1, FIFO on, receive interrupt enabled).
///
/// If the UART does not answer (no COM1 on this machine) output is dropped;
/// the hypervisor keeps running.
pub fn init(baud: u32) {
    let baud_rate = match baud {
        9600 => BaudRate::Baud9600,
        38400 => BaudRate::Baud38400,
        57600 => BaudRate::Baud57600,
        _ => BaudRate::Baud115200,
    };
    let config = Config {
        baud_rate,
        ..Config::default()
    };
    // SAFETY: COM1's eight registers at 0x3F8..0x3FF belong to the console
    // alone; no other code in the hypervisor touches those ports.
    let uart = unsafe { Uart16550::new_port(COM1) };
    let mut serial = SERIAL.lock();
    serial.uart = uart.ok().and_then(|mut u| u.init(config).ok().map(|()| u));
}

/// Writes formatted text to the console. While the console's command line
/// is open, a printed line starts below the prompt and the prompt is shown
/// again after it, so no line (a guest's above all) is glued to what the
/// user is typing.
pub fn print(args: fmt::Arguments<'_>) {
    let mut serial = SERIAL.lock();
    if core::mem::take(&mut serial.prompt_shown) {
        let _ = serial.write_str("\n");
    }
    let _ = serial.write_fmt(args);
    if serial.at_line_start
        && let Some(p) = serial.prompt.take()
    {
        if let Some(uart) = serial.uart.as_mut() {
            uart.send_bytes_exact(&p);
        }
        serial.prompt = Some(p);
        serial.prompt_shown = true;
    }
}

/// Sends bytes to the serial port as they are (the console's prompt, echo
/// and erase sequences), and records the command line now on the screen
/// (`None`: closed) for [`print`].
pub fn write_raw(bytes: &[u8], line: Option<alloc::vec::Vec<u8>>) {
    let mut serial = SERIAL.lock();
    if let Some(uart) = serial.uart.as_mut() {
        uart.send_bytes_exact(bytes);
    }
    serial.prompt_shown = line.is_some();
    serial.at_line_start = line.is_none();
    serial.prompt = line;
}

/// Prints on the fatal path: breaks the console lock first, because the CPU
/// that held it (this one) will never release it.
pub fn print_fatal(args: fmt::Arguments<'_>) {
    // SAFETY: only called once the hypervisor is going down on this CPU (no
    // other CPU runs), so a holder interrupted mid-line never resumes.
    unsafe { SERIAL.force_unlock() };
    print(args);
}

/// Prints a line on the console (no timestamp, no level).
#[macro_export]
macro_rules! kprintln {
    () => { $crate::kernel::console::print(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::kernel::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Serial interrupt: moves every received byte into the input buffer.
pub fn on_serial_irq() {
    let mut serial = SERIAL.lock();
    let Some(uart) = serial.uart.as_mut() else {
        return;
    };
    let mut input = INPUT.lock();
    while let Ok(byte) = uart.try_receive_byte() {
        input.push(byte);
    }
}

/// Takes one byte of console input, if any arrived.
pub fn read_byte() -> Option<u8> {
    INPUT.lock().pop()
}

/// Bytes of console input dropped because the buffer was full.
pub fn input_dropped() -> u64 {
    INPUT.lock().dropped()
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        level_index(metadata.level()) <= LEVEL.load(Ordering::Relaxed)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut serial = SERIAL.lock();
        if TIMESTAMPS.load(Ordering::Relaxed) {
            let ns = super::time::now_ns();
            let _ = write!(
                serial,
                "[{:5}.{:06}] ",
                ns / 1_000_000_000,
                (ns % 1_000_000_000) / 1000
            );
        }
        let _ = writeln!(
            serial,
            "{:<5} {}: {}",
            record.level(),
            record.target().trim_start_matches("hypervisor::kernel::"),
            record.args()
        );
    }

    fn flush(&self) {}
}

fn level_index(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 1,
        log::Level::Warn => 2,
        log::Level::Info => 3,
        log::Level::Debug => 4,
        log::Level::Trace => 5,
    }
}

static LOGGER: Logger = Logger;

/// Installs the logger with the level and timestamp setting from the command
/// line.
pub fn init_logger(level: log::LevelFilter, timestamps: bool) {
    TIMESTAMPS.store(timestamps, Ordering::Relaxed);
    let idx = level.to_level().map_or(0, level_index);
    LEVEL.store(idx, Ordering::Relaxed);
    // A second call (never made) would only fail to replace the logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
