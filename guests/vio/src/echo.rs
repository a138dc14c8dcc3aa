//! `echo`: read the virtio console's input and echo it line by line.
//!
//! Keeps one input buffer posted, halts until the host fills it (the
//! console's receive irq), and collects bytes into a line; a CR or LF ends
//! it (an empty line, e.g. the LF of a CR LF, is skipped). Each line is
//! printed as `vio: got line "TEXT"`: ASCII as it came (the host shows
//! control characters escaped, e.g. Ctrl-A as `\x01`), every other byte
//! written `\xHH`. The line `quit` ends the mode.

use core::fmt::Write;
use core::sync::atomic::{Ordering, compiler_fence};

use lguest_rt::guest_abi::device::VIRTIO_ID_CONSOLE;
use lguest_rt::trap::set_irq_handler;
use lguest_rt::virtio::{self, Bus};
use lguest_rt::{TrapFrame, check, hcall, irq, println};

/// Longest line kept; the rest of a longer line is counted, not kept.
const LINE_MAX: usize = 128;

fn on_queue_irq(_: &mut TrapFrame) {}

/// A line written with its unprintable bytes escaped.
struct Escaped<'a>(&'a [u8]);

impl core::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.0 {
            if b.is_ascii() {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Run the echo mode until `quit`.
pub fn run(bus: &Bus) {
    let Some(dev) = bus.find(VIRTIO_ID_CONSOLE) else {
        check!(false, "echo: console present");
        return;
    };
    let Some(mut con) = virtio::Console::new(&dev) else {
        check!(false, "echo: console started");
        return;
    };
    for q in &con.queues {
        set_irq_handler(u32::from(q.cfg.irq), Some(on_queue_irq));
    }
    irq::enable();
    let mut buf = [0u8; 64];
    let mut line = [0u8; LINE_MAX];
    let mut len = 0usize;
    let mut cut = 0usize;
    let mut lines = 0u32;
    let mut posted = false;
    println!("vio: echo: ready, type lines (quit ends)");
    loop {
        if !posted {
            posted = con.post_input(&mut buf);
            if !posted {
                check!(false, "echo: input buffer posted");
                return;
            }
        }
        irq::disable();
        compiler_fence(Ordering::SeqCst);
        let Some(n) = con.input_done() else {
            // Returns with irqs enabled, after the handler ran.
            hcall::halt();
            continue;
        };
        irq::enable();
        posted = false;
        let n = (n as usize).min(buf.len());
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if len == 0 && cut == 0 {
                    continue;
                }
                lines += 1;
                let text = &line[..len];
                if cut > 0 {
                    println!("vio: got line \"{}\" ({cut} more bytes cut)", Escaped(text));
                } else {
                    println!("vio: got line \"{}\"", Escaped(text));
                }
                if text == b"quit" && cut == 0 {
                    check!(lines > 1, "echo: a line before quit");
                    return;
                }
                len = 0;
                cut = 0;
            } else if len < LINE_MAX {
                line[len] = b;
                len += 1;
            } else {
                cut += 1;
            }
        }
    }
}
