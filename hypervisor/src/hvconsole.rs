//! The hypervisor console: what the bytes typed on the serial port mean.
//!
//! Pure input state machine. The kernel feeds it every byte the serial port
//! receives ([`Console::input`]) and carries out the [`Action`]s it appends:
//! bytes for a guest's console, raw echo for the serial port, whole lines to
//! print, commands to run. It does no I/O and knows nothing of guests but
//! their names (kept in sync with [`Console::add_guest`] and
//! [`Console::remove_guest`]); what `list` and `stats` show comes from the
//! caller ([`Console::list`], [`Console::stats`] only format it).
//!
//! # Keys
//!
//! * Everything goes to the guest **in focus** ([`Action::ToGuest`],
//!   consecutive bytes in one action). The first guest added gets the focus;
//!   with no guest in focus, bytes are dropped and counted, with a hint
//!   printed once.
//! * **Ctrl-A** ([`PREFIX`], as in QEMU and Xen) opens a command line after
//!   the prompt [`PROMPT`]: printable ASCII is echoed and kept (at most
//!   [`MAX_LINE`] bytes; more rings the bell), Backspace or DEL erases,
//!   **Enter** runs it, **Esc** or **Ctrl-C** cancels. While it is open no
//!   byte reaches a guest.
//! * On the empty command line, **Ctrl-A** sends one literal Ctrl-A to the
//!   guest in focus and **Tab** moves the focus to the next guest (Xen's
//!   console switch); both close the command line.
//! * A line feed right after the Enter that ran a command is swallowed
//!   (terminals that send CR LF), so it does not reach the guest.
//!
//! Left out: an Esc that cancels the line is a whole key, so the rest of an
//! escape sequence (an arrow key's `[A`) goes on to the guest; there is no
//! history or completion.
//!
//! # Commands
//!
//! | Command | Result |
//! |---|---|
//! | `help` | the key and command summary ([`Action::Print`]) |
//! | `list` | [`Command::List`]: the caller prints [`Console::list`] |
//! | `stats` | [`Command::Stats`]: the caller prints [`Console::stats`] |
//! | `focus NAME` | the focus moves to `NAME` (handled here) |
//! | `kill NAME` | [`Command::Kill`] |
//! | `restart NAME` | [`Command::Restart`] |
//!
//! A name must be a valid guest name
//! ([`valid_name`]) of a guest the console
//! knows. Unknown commands, missing or extra arguments and unknown names get
//! one line beginning `console: `, as does everything the console prints.

// Bytes from the serial port are outside input: every index is a `get()`,
// every sum a checked or saturating operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::lguest::spec::valid_name;
use crate::sched;
use crate::units::Bytes;

/// The prefix key: Ctrl-A.
pub const PREFIX: u8 = 0x01;
/// Longest command line, in bytes.
pub const MAX_LINE: usize = 64;
/// The command-line prompt.
pub const PROMPT: &str = "rustyvisor> ";

const CTRL_C: u8 = 0x03;
const BS: u8 = 0x08;
const TAB: u8 = 0x09;
const LF: u8 = 0x0a;
const CR: u8 = 0x0d;
const ESC: u8 = 0x1b;
const DEL: u8 = 0x7f;
const BELL: u8 = 0x07;

/// What the caller must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deliver `bytes` to the console input of guest `guest`.
    ToGuest {
        /// The guest's name.
        guest: String,
        /// The bytes, in order.
        bytes: Vec<u8>,
    },
    /// Send these bytes to the serial port as they are (prompt, echo,
    /// erase, bell).
    Echo(Vec<u8>),
    /// Print this line on the serial port (printable ASCII, no line end:
    /// the caller adds it).
    Print(String),
    /// Carry out a command.
    Run(Command),
}

/// A command for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print [`Console::list`] for the current guests.
    List,
    /// Print [`Console::stats`].
    Stats,
    /// End this guest.
    Kill(String),
    /// Restart this guest from its original image.
    Restart(String),
}

/// A guest's state, for `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestState {
    /// Running or waiting for the CPU.
    Running,
    /// Halted until an interrupt.
    Halted,
    /// Being started again.
    Restarting,
    /// Ended; its line stays until the caller removes it.
    Dead,
}

impl fmt::Display for GuestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so `list` can align it.
        f.pad(match self {
            Self::Running => "running",
            Self::Halted => "halted",
            Self::Restarting => "restarting",
            Self::Dead => "dead",
        })
    }
}

/// One guest's line in `list`, as the caller knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestInfo<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its state.
    pub state: GuestState,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// Exits so far.
    pub exits: u64,
    /// Share of the CPU over the caller's last interval, in tenths of a
    /// percent (0..=1000).
    pub cpu_permille: u32,
}

/// The hypervisor's figures for `stats`, as the caller knows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStats {
    /// Time since boot.
    pub uptime_ns: u64,
    /// Usable RAM in bytes.
    pub mem_total: u64,
    /// Free RAM in bytes.
    pub mem_free: u64,
    /// Live host tasks.
    pub tasks: usize,
    /// Tasks waiting for the CPU.
    pub runnable: usize,
    /// The scheduler's counters.
    pub sched: sched::Stats,
}

/// The console's own counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsoleStats {
    /// Bytes sent to guests.
    pub to_guest: u64,
    /// Bytes dropped (no guest in focus).
    pub dropped: u64,
    /// Command lines run (including refused ones).
    pub commands: u64,
}

/// Why a guest cannot be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddError {
    /// Not a valid guest name.
    BadName,
    /// A guest of that name is already known.
    Duplicate,
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadName => "not a valid guest name",
            Self::Duplicate => "a guest of that name exists",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Bytes go to the guest in focus.
    Guest,
    /// The command line is open.
    Line,
}

/// The console state machine; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Console {
    guests: Vec<String>,
    focus: Option<String>,
    mode: Mode,
    line: String,
    /// A CR just ran a command line: an LF right after it is swallowed.
    after_cr: bool,
    /// The "no guest in focus" hint was printed since the focus was lost.
    hinted: bool,
    /// Bytes for the focused guest not yet in an action.
    pending: Vec<u8>,
    stats: ConsoleStats,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    /// A console with no guests.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            guests: Vec::new(),
            focus: None,
            mode: Mode::Guest,
            line: String::new(),
            after_cr: false,
            hinted: false,
            pending: Vec::new(),
            stats: ConsoleStats {
                to_guest: 0,
                dropped: 0,
                commands: 0,
            },
        }
    }

    /// The guest in focus.
    #[must_use]
    pub fn focus(&self) -> Option<&str> {
        self.focus.as_deref()
    }

    /// The known guests, in the order they were added.
    pub fn guests(&self) -> impl Iterator<Item = &str> {
        self.guests.iter().map(String::as_str)
    }

    /// Whether the command line is open.
    #[must_use]
    pub fn line_open(&self) -> bool {
        self.mode == Mode::Line
    }

    /// The counters.
    #[must_use]
    pub const fn counters(&self) -> ConsoleStats {
        self.stats
    }

    /// A new guest; the first one (or any, while nothing has the focus)
    /// gets the focus.
    pub fn add_guest(&mut self, name: &str) -> Result<(), AddError> {
        if !valid_name(name) {
            return Err(AddError::BadName);
        }
        if self.guests.iter().any(|g| g == name) {
            return Err(AddError::Duplicate);
        }
        self.guests.push(name.to_string());
        if self.focus.is_none() {
            self.focus = Some(name.to_string());
            self.hinted = false;
        }
        Ok(())
    }

    /// A guest is gone. If it had the focus, the focus moves to the next
    /// guest (a line says where); `false` if the name was unknown.
    pub fn remove_guest(&mut self, name: &str, out: &mut Vec<Action>) -> bool {
        let Some(i) = self.guests.iter().position(|g| g == name) else {
            return false;
        };
        self.flush(out);
        self.guests.remove(i);
        if self.focus.as_deref() == Some(name) {
            // The guest after it now sits at `i`; wrap to the first.
            let next = self.guests.get(i).or_else(|| self.guests.first()).cloned();
            self.set_focus(next, out);
        }
        true
    }

    /// If the command line is open, the bytes that draw it again on a fresh
    /// line (after guest output interrupted it).
    #[must_use]
    pub fn redraw(&self) -> Option<Vec<u8>> {
        (self.mode == Mode::Line).then(|| format!("\r\n{PROMPT}{}", self.line).into_bytes())
    }

    /// Feeds bytes received on the serial port; appends the actions.
    pub fn input(&mut self, bytes: &[u8], out: &mut Vec<Action>) {
        for &b in bytes {
            let after_cr = core::mem::take(&mut self.after_cr);
            match self.mode {
                Mode::Guest if b == LF && after_cr => {}
                Mode::Guest if b == PREFIX => {
                    self.flush(out);
                    self.mode = Mode::Line;
                    self.line.clear();
                    out.push(Action::Echo(format!("\r\n{PROMPT}").into_bytes()));
                }
                Mode::Guest => self.route(b, out),
                Mode::Line => self.line_byte(b, out),
            }
        }
        self.flush(out);
    }

    /// Queues `b` for the guest in focus, or drops it.
    fn route(&mut self, b: u8, out: &mut Vec<Action>) {
        if self.focus.is_some() {
            self.pending.push(b);
            return;
        }
        self.stats.dropped = self.stats.dropped.saturating_add(1);
        if !self.hinted {
            self.hinted = true;
            out.push(Action::Print(
                "console: no guest in focus; input dropped (Ctrl-A, then help)".to_string(),
            ));
        }
    }

    /// Turns the queued bytes into one [`Action::ToGuest`].
    fn flush(&mut self, out: &mut Vec<Action>) {
        if self.pending.is_empty() {
            return;
        }
        let bytes = core::mem::take(&mut self.pending);
        match &self.focus {
            Some(guest) => {
                let n = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                self.stats.to_guest = self.stats.to_guest.saturating_add(n);
                out.push(Action::ToGuest {
                    guest: guest.clone(),
                    bytes,
                });
            }
            None => {
                let n = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                self.stats.dropped = self.stats.dropped.saturating_add(n);
            }
        }
    }

    fn close_line(&mut self, out: &mut Vec<Action>) {
        self.mode = Mode::Guest;
        self.line.clear();
        out.push(Action::Echo(b"\r\n".to_vec()));
    }

    fn line_byte(&mut self, b: u8, out: &mut Vec<Action>) {
        match b {
            PREFIX if self.line.is_empty() => {
                self.close_line(out);
                self.route(PREFIX, out);
                self.flush(out);
            }
            TAB if self.line.is_empty() => {
                self.close_line(out);
                self.cycle_focus(out);
            }
            BS | DEL => {
                if self.line.pop().is_some() {
                    out.push(Action::Echo(b"\x08 \x08".to_vec()));
                }
            }
            CR | LF => {
                self.after_cr = b == CR;
                let line = core::mem::take(&mut self.line);
                self.close_line(out);
                self.run(&line, out);
            }
            ESC | CTRL_C => self.close_line(out),
            0x20..=0x7e if self.line.len() < MAX_LINE => {
                self.line.push(char::from(b));
                out.push(Action::Echo(vec![b]));
            }
            _ => out.push(Action::Echo(vec![BELL])),
        }
    }

    fn set_focus(&mut self, focus: Option<String>, out: &mut Vec<Action>) {
        self.flush(out);
        out.push(Action::Print(match &focus {
            Some(g) => format!("console: focus {g}"),
            None => "console: no guest in focus".to_string(),
        }));
        self.focus = focus;
        self.hinted = false;
    }

    /// Xen's console switch: the next guest in order, wrapping.
    fn cycle_focus(&mut self, out: &mut Vec<Action>) {
        let i = self
            .focus
            .as_ref()
            .and_then(|f| self.guests.iter().position(|g| g == f))
            .and_then(|i| i.checked_add(1));
        let next = i
            .and_then(|i| self.guests.get(i))
            .or_else(|| self.guests.first())
            .cloned();
        if next.is_none() {
            out.push(Action::Print("console: no guests".to_string()));
            return;
        }
        self.set_focus(next, out);
    }

    /// The one argument `NAME` of `cmd`, checked: a known guest.
    fn name_arg<'a>(&self, cmd: &str, args: &[&'a str]) -> Result<&'a str, String> {
        let [name] = args else {
            return Err(format!("console: usage: {cmd} NAME"));
        };
        if !valid_name(name) {
            return Err(format!("console: {cmd}: \"{name}\" is not a guest name"));
        }
        if !self.guests.iter().any(|g| g == name) {
            return Err(format!("console: {cmd}: no guest named {name}"));
        }
        Ok(name)
    }

    fn run(&mut self, line: &str, out: &mut Vec<Action>) {
        let mut words = line.split_ascii_whitespace();
        let Some(cmd) = words.next() else {
            return;
        };
        self.stats.commands = self.stats.commands.saturating_add(1);
        // At most MAX_LINE / 2 words: bounded.
        let args: Vec<&str> = words.collect();
        let no_args = |c: Command| {
            if args.is_empty() {
                Action::Run(c)
            } else {
                Action::Print(format!("console: usage: {cmd} (no arguments)"))
            }
        };
        match cmd {
            "help" if args.is_empty() => {
                out.extend(HELP.iter().map(|l| Action::Print((*l).to_string())));
            }
            "help" => out.push(Action::Print(
                "console: usage: help (no arguments)".to_string(),
            )),
            "list" => out.push(no_args(Command::List)),
            "stats" => out.push(no_args(Command::Stats)),
            "focus" | "kill" | "restart" => match self.name_arg(cmd, &args) {
                Err(e) => out.push(Action::Print(e)),
                Ok(name) => {
                    let name = name.to_string();
                    match cmd {
                        "focus" => self.set_focus(Some(name), out),
                        "kill" => out.push(Action::Run(Command::Kill(name))),
                        _ => out.push(Action::Run(Command::Restart(name))),
                    }
                }
            },
            _ => out.push(Action::Print(format!(
                "console: unknown command \"{cmd}\" (help lists the commands)"
            ))),
        }
    }

    /// The `list` report: a header and one line per guest (`*` marks the
    /// focus).
    #[must_use]
    pub fn list(&self, guests: &[GuestInfo<'_>]) -> Vec<String> {
        let mut lines = vec![format!(
            "console:   {:<16} {:<10} {:>10} {:>12} {:>6}",
            "guest", "state", "memory", "exits", "cpu"
        )];
        lines.extend(guests.iter().map(|g| {
            let mark = if self.focus.as_deref() == Some(g.name) {
                '*'
            } else {
                ' '
            };
            let pm = g.cpu_permille.min(1000);
            let cpu = format!("{}.{}%", pm / 10, pm % 10);
            format!(
                "console: {mark} {:<16} {:<10} {:>10} {:>12} {:>6}",
                g.name,
                g.state,
                Bytes(g.mem).to_string(),
                g.exits,
                cpu
            )
        }));
        if guests.is_empty() {
            lines.push("console:   (no guests)".to_string());
        }
        lines
    }

    /// The `stats` report.
    #[must_use]
    pub fn stats(&self, host: &HostStats) -> Vec<String> {
        let secs = host.uptime_ns / 1_000_000_000;
        let millis = host.uptime_ns % 1_000_000_000 / 1_000_000;
        let s = &host.sched;
        let c = &self.stats;
        vec![
            format!(
                "console: uptime {secs}.{millis:03} s, memory {} free of {}",
                Bytes(host.mem_free),
                Bytes(host.mem_total)
            ),
            format!(
                "console: tasks {} ({} runnable), {} spawned, {} exited, {} switches, {} halts, \
                 {} timers fired",
                host.tasks, host.runnable, s.spawned, s.exited, s.switches, s.halts, s.timers_fired
            ),
            format!(
                "console: input {} bytes to guests, {} dropped, {} commands",
                c.to_guest, c.dropped, c.commands
            ),
        ]
    }
}

const HELP: &[&str] = &[
    "console: Ctrl-A opens this command line: Enter runs it, Esc or Ctrl-C cancels",
    "console: Ctrl-A Ctrl-A sends Ctrl-A to the guest, Ctrl-A Tab focuses the next guest",
    "console: list            guests, state, memory, exits, CPU share",
    "console: focus NAME      send keyboard input to guest NAME",
    "console: kill NAME       end guest NAME",
    "console: restart NAME    start guest NAME again from its image",
    "console: stats           hypervisor counters",
    "console: help            this text",
];

#[cfg(test)]
mod tests;
