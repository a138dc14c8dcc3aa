//! The serial console (COM1) and the `log` backend.
//!
//! **Output** is queued and sent by interrupt once the IO-APIC routes COM1
//! (see [`enable_irq_output`]): a writer appends its whole line to a
//! [`TxRing`] under an [`IrqMutex`] (a short critical section: formatting
//! into memory), then *kicks* the transmitter — one FIFO load (16 bytes) if
//! the line status register says the transmit holding register is empty,
//! and the THRE interrupt enabled while bytes remain. The COM1 interrupt
//! refills the FIFO on THRE and disables THRE interrupts once the ring is
//! empty. So no writer, in a task or in an interrupt handler, waits for the
//! UART; a full ring drops whole lines and says so later (see
//! [`rustyvisor::txring`]). Nothing blocks a writer: not even with interrupts
//! off, where the ring cannot drain until the writer returns, does a writer
//! wait for room (that would stall interrupt context for up to a ring's worth
//! of serial time); it drops the line, counted.
//!
//! Output is **synchronous** (written straight to the UART, polling the line
//! status) before that switch (early boot), on machines without an IO-APIC
//! route for COM1, on the fatal path ([`print_fatal`], which first drains
//! what is queued so the order is kept, and from then on for good), and
//! [`flush`] drains the ring synchronously before the machine powers off or
//! QEMU exits, so the last lines are never lost.
//!
//! **Input** arrives by interrupt (COM1 = ISA IRQ 4) into a ring buffer that
//! tasks drain with [`read_byte`]. Boot reports and diagnostics are printed
//! plainly with `kprintln!`; log records carry a timestamp and a level.
//!
//! The `uart_16550` driver brings the UART up and reads input; the transmit
//! path and the interrupt identification use the registers directly (the
//! driver has no IER or IIR access), and only ever with DLAB clear.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use rustyvisor::ringbuf::RingBuffer;
use rustyvisor::txring::{self, TxRing};
use uart_16550::backend::PioBackend;
use uart_16550::{BaudRate, Config, Uart16550};

use super::arch::cpu;
use super::sync::IrqMutex;

const COM1: u16 = 0x3F8;
/// Transmit holding register (write, DLAB = 0).
const REG_THR: u16 = COM1;
/// Interrupt enable register (DLAB = 0).
const REG_IER: u16 = COM1 + 1;
/// Interrupt identification register (read).
const REG_IIR: u16 = COM1 + 2;
/// Line status register.
const REG_LSR: u16 = COM1 + 5;
/// IER: transmit holding register empty.
const IER_THRI: u8 = 1 << 1;
/// IIR bit 0: no interrupt pending.
const IIR_NO_INT: u8 = 1 << 0;
/// LSR: transmit holding register (FIFO, when enabled) empty.
const LSR_THRE: u8 = 1 << 5;
/// LSR: transmitter empty (FIFO and shift register).
const LSR_TEMT: u8 = 1 << 6;
/// Bytes the transmit FIFO takes when THRE says it is empty (a UART
/// without a working FIFO, an 8250 or 16450, takes one).
const FIFO_SIZE: usize = 16;
/// IIR bits 6–7: FIFOs enabled.
const IIR_FIFOS: u8 = 0xC0;
/// Polls of the line status before a synchronous write gives up on a UART
/// that never reports THRE (each poll is an I/O read, about a microsecond:
/// a second or so), so a broken or absent UART cannot hang the exit path.
const SPIN_LIMIT: u32 = 1 << 20;
/// Interrupt causes handled in one COM1 interrupt at most (the handler loops
/// until IIR reports none, so that the edge-triggered line drops).
const IRQ_MAX_CAUSES: usize = 64;

struct Serial {
    uart: Option<Uart16550<PioBackend>>,
    /// The console's open command line (prompt and text typed so far), to
    /// show again below every line printed while it is open.
    prompt: Option<alloc::vec::Vec<u8>>,
    /// The prompt is on the screen: the cursor is at its end, not at the
    /// start of a line.
    prompt_shown: bool,
    /// Queued output (interrupt-driven mode only).
    tx: TxRing<{ txring::CAPACITY }>,
    /// Output goes through `tx` and THRE interrupts.
    irq_output: bool,
    /// Our copy of IER.
    ier: u8,
    /// Bytes per transmitter load: [`FIFO_SIZE`], or 1 without a FIFO.
    load: usize,
    /// A synchronous write timed out waiting for THRE: later synchronous
    /// output is dropped instead of waiting again.
    stuck: bool,
}

impl Serial {
    fn lsr(&self) -> u8 {
        // SAFETY: COM1's registers belong to the console alone (see `init`);
        // reading LSR only clears latched line-error bits.
        unsafe { cpu::inb(REG_LSR) }
    }

    fn write_ier(&mut self, ier: u8) {
        self.ier = ier;
        // SAFETY: COM1's registers belong to the console; DLAB is clear
        // (the driver clears it at the end of `init`), so this is IER.
        unsafe { cpu::outb(REG_IER, ier) };
    }

    /// Puts up to a FIFO load of `bytes` into the transmitter; the caller
    /// checked THRE.
    fn load_fifo(&self, bytes: &[u8]) {
        for &b in bytes.iter().take(self.load) {
            // SAFETY: COM1's registers belong to the console; DLAB is clear.
            unsafe { cpu::outb(REG_THR, b) };
        }
    }

    /// Waits (bounded) until the transmit FIFO is empty.
    fn wait_thre(&mut self) -> bool {
        if self.stuck {
            return false;
        }
        for _ in 0..SPIN_LIMIT {
            if self.lsr() & LSR_THRE != 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        self.stuck = true;
        false
    }

    /// Writes `bytes` synchronously, a FIFO load at a time.
    fn put_sync(&mut self, bytes: &[u8]) {
        if self.uart.is_none() {
            return;
        }
        for chunk in bytes.chunks(self.load.max(1)) {
            if !self.wait_thre() {
                return;
            }
            self.load_fifo(chunk);
        }
    }

    /// Sends everything queued, synchronously, and waits (bounded) until the
    /// last byte has left the shift register.
    fn drain_sync(&mut self) {
        let mut chunk = [0u8; FIFO_SIZE];
        loop {
            let n = self.tx.pop_into(&mut chunk);
            if n == 0 {
                break;
            }
            if let Some(bytes) = chunk.get(..n) {
                self.put_sync(bytes);
            }
        }
        if self.irq_output {
            self.update_thri();
        }
        if self.uart.is_some() && !self.stuck {
            for _ in 0..SPIN_LIMIT {
                if self.lsr() & LSR_TEMT != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
        }
    }

    /// Loads the FIFO from the ring if THRE says it is empty.
    fn fill_fifo(&mut self) {
        if self.lsr() & LSR_THRE == 0 {
            return;
        }
        let mut chunk = [0u8; FIFO_SIZE];
        let n = self
            .tx
            .pop_into(chunk.get_mut(..self.load).unwrap_or(&mut []));
        if let Some(bytes) = chunk.get(..n) {
            self.load_fifo(bytes);
        }
    }

    /// THRE interrupts on exactly while bytes are queued.
    fn update_thri(&mut self) {
        let want = if self.tx.is_empty() {
            self.ier & !IER_THRI
        } else {
            self.ier | IER_THRI
        };
        if want != self.ier {
            self.write_ier(want);
        }
    }

    /// Starts (or keeps) the interrupt-driven transmitter going.
    fn kick(&mut self) {
        self.fill_fifo();
        self.update_thri();
    }

    /// Writes one record: queued in interrupt-driven mode, else directly.
    fn emit(&mut self, write: impl FnOnce(&mut dyn Write) -> fmt::Result) {
        if self.uart.is_none() {
            return;
        }
        if self.irq_output {
            self.tx.push_with(|rec| write(rec));
            self.kick();
        } else {
            let _ = write(&mut Direct(self));
        }
    }
}

/// Synchronous output with LF sent as CR LF.
struct Direct<'a>(&'a mut Serial);

impl Write for Direct<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.split_inclusive('\n') {
            match chunk.strip_suffix('\n') {
                Some(line) => {
                    self.0.put_sync(line.as_bytes());
                    self.0.put_sync(b"\r\n");
                }
                None => self.0.put_sync(chunk.as_bytes()),
            }
        }
        Ok(())
    }
}

static SERIAL: IrqMutex<Serial> = IrqMutex::new(Serial {
    uart: None,
    prompt: None,
    prompt_shown: false,
    tx: TxRing::new(),
    irq_output: false,
    ier: 0,
    load: 1,
    stuck: false,
});
static INPUT: IrqMutex<RingBuffer<1024>> = IrqMutex::new(RingBuffer::new());
static TIMESTAMPS: AtomicBool = AtomicBool::new(true);
static LEVEL: AtomicU8 = AtomicU8::new(3);
/// The fatal path has taken the console over (synchronous for good).
static FATAL: AtomicBool = AtomicBool::new(false);

/// Brings up COM1 (8-N-1, FIFO on, receive interrupt enabled).
///
/// If the UART does not answer (no COM1 on this machine) output is dropped;
/// the hypervisor keeps running. Called again for another baud rate before
/// output turns interrupt-driven.
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
    let ier = config.interrupts.bits();
    // SAFETY: COM1's eight registers at 0x3F8..0x3FF belong to the console
    // alone; no other code in the hypervisor touches those ports.
    let uart = unsafe { Uart16550::new_port(COM1) };
    let mut serial = SERIAL.lock();
    serial.uart = uart.ok().and_then(|mut u| u.init(config).ok().map(|()| u));
    serial.ier = ier;
    serial.stuck = false;
    serial.load = 1;
    if serial.uart.is_some() {
        // SAFETY: COM1's registers belong to the console; no THRE interrupt
        // is enabled yet, so reading IIR acknowledges nothing we need.
        let iir = unsafe { cpu::inb(REG_IIR) };
        if iir & IIR_FIFOS == IIR_FIFOS {
            serial.load = FIFO_SIZE;
        }
    }
}

/// Turns interrupt-driven output on. Call once COM1's interrupt is routed
/// and interrupts are enabled; without a UART it does nothing.
pub fn enable_irq_output() {
    let mut serial = SERIAL.lock();
    if serial.uart.is_some() && !FATAL.load(Ordering::Relaxed) {
        serial.irq_output = true;
    }
}

/// Writes formatted text to the console as one record (a line is never
/// split by another writer's). While the console's command line is open, a
/// printed line starts below the prompt and the prompt is shown again after
/// it, so no line (a guest's above all) is glued to what the user is
/// typing.
pub fn print(args: fmt::Arguments<'_>) {
    let mut serial = SERIAL.lock();
    let below = core::mem::take(&mut serial.prompt_shown);
    let mut ended = false;
    serial.emit(|w| {
        let mut t = LineEnd {
            out: w,
            ended: &mut ended,
        };
        if below {
            t.write_str("\n")?;
        }
        t.write_fmt(args)
    });
    if ended && let Some(p) = serial.prompt.take() {
        let text = core::str::from_utf8(&p).unwrap_or("");
        serial.emit(|w| w.write_str(text));
        serial.prompt = Some(p);
        serial.prompt_shown = true;
    }
}

/// A writer that remembers whether the last text written ended a line.
struct LineEnd<'a, 'b> {
    out: &'a mut dyn Write,
    ended: &'b mut bool,
}

impl Write for LineEnd<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(last) = s.as_bytes().last() {
            *self.ended = *last == b'\n';
        }
        self.out.write_str(s)
    }
}

/// Sends the console's prompt, echo and erase bytes (ASCII) as they are,
/// and records the command line now on the screen (`None`: closed) for
/// [`print`].
pub fn write_raw(bytes: &[u8], line: Option<alloc::vec::Vec<u8>>) {
    let mut serial = SERIAL.lock();
    if let Ok(text) = core::str::from_utf8(bytes) {
        serial.emit(|w| w.write_str(text));
    }
    serial.prompt_shown = line.is_some();
    serial.prompt = line;
}

extern crate alloc;

/// Sends everything queued and waits for the UART to finish, synchronously:
/// for the end of a run (power-off, QEMU exit), where queued lines would
/// otherwise be lost. Output stays interrupt-driven afterwards.
pub fn flush() {
    SERIAL.lock().drain_sync();
}

/// Takes the console over for the fatal path: breaks the lock (the CPU that
/// held it, this one, will never release it), drains what is queued so the
/// order is kept, and makes output synchronous for good.
pub fn flush_fatal() {
    // SAFETY: only called once the hypervisor is going down on this CPU (no
    // other CPU runs), so a holder interrupted mid-line never resumes.
    unsafe { SERIAL.force_unlock() };
    let mut serial = SERIAL.lock();
    if FATAL.swap(true, Ordering::SeqCst) {
        // Already taken over (perhaps a fault while draining): don't drain
        // again, just stay synchronous.
        serial.irq_output = false;
        return;
    }
    serial.drain_sync();
    serial.irq_output = false;
    let ier = serial.ier & !IER_THRI;
    serial.write_ier(ier);
}

/// Prints on the fatal path (panic, fatal exception): see [`flush_fatal`].
pub fn print_fatal(args: fmt::Arguments<'_>) {
    flush_fatal();
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

/// Serial interrupt: reads IIR until no cause is left (the IO-APIC line is
/// edge-triggered, so it must drop before we return): received bytes go
/// into the input buffer, THRE refills the FIFO from the output ring (or
/// turns THRE interrupts off when it is empty). Runs with the console lock;
/// it must not print. Returns whether input arrived.
pub fn on_serial_irq() -> bool {
    let mut received = false;
    let mut serial = SERIAL.lock();
    if serial.uart.is_none() {
        return false;
    }
    for _ in 0..IRQ_MAX_CAUSES {
        // SAFETY: COM1's registers belong to the console; reading IIR
        // acknowledges a THRE interrupt, which the code below handles.
        let iir = unsafe { cpu::inb(REG_IIR) };
        if iir & IIR_NO_INT != 0 {
            break;
        }
        match (iir >> 1) & 0x7 {
            // Receiver line status: reading LSR clears it.
            0b011 => {
                let _ = serial.lsr();
            }
            // Data available, or the FIFO timeout.
            0b010 | 0b110 => {
                let mut input = INPUT.lock();
                if let Some(uart) = serial.uart.as_mut() {
                    while let Ok(byte) = uart.try_receive_byte() {
                        input.push(byte);
                        received = true;
                    }
                }
            }
            // THR empty.
            0b001 => {
                serial.fill_fifo();
                serial.update_thri();
            }
            // Modem status (not enabled): reading MSR clears it.
            _ => {
                if let Some(uart) = serial.uart.as_mut() {
                    let _ = uart.msr();
                }
            }
        }
    }
    // A writer may have queued while THRE was already acknowledged.
    if serial.irq_output {
        serial.kick();
    }
    received
}

/// Takes one byte of console input, if any arrived.
pub fn read_byte() -> Option<u8> {
    INPUT.lock().pop()
}

/// Bytes of console input dropped because the buffer was full.
pub fn input_dropped() -> u64 {
    INPUT.lock().dropped()
}

/// Console output lost because the output ring was full: (lines, bytes).
pub fn output_dropped() -> (u64, u64) {
    let d = SERIAL.lock().tx.dropped();
    (d.lines, d.bytes)
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
        let timestamps = TIMESTAMPS.load(Ordering::Relaxed);
        // Read the clock before taking the console lock.
        let ns = if timestamps { super::time::now_ns() } else { 0 };
        SERIAL.lock().emit(|w| {
            if timestamps {
                write!(
                    w,
                    "[{:5}.{:06}] ",
                    ns / 1_000_000_000,
                    (ns % 1_000_000_000) / 1000
                )?;
            }
            writeln!(
                w,
                "{:<5} {}: {}",
                record.level(),
                record.target().trim_start_matches("hypervisor::kernel::"),
                record.args()
            )
        });
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
