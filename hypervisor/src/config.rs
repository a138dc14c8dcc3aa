//! The hypervisor command line, parsed once into a typed [`Config`].
//!
//! Syntax: whitespace-separated tokens, each either `key=value` or a bare
//! flag. Recognised options:
//!
//! | option | values | default |
//! |---|---|---|
//! | `log=` | `error`, `warn`, `info`, `debug`, `trace` | `info` |
//! | `exit=` | `halt`, `qemu`, `poweroff` | `halt` |
//! | `poweroff` | bare flag, same as `exit=poweroff` | |
//! | `selftest=` | comma list of `memory`, `pagefault`, `divide`, `panic`, `timer`, `entryfault`, `tasks`, `channel`, or `all` | none |
//! | `serial=` | baud rate dividing 115200 | `115200` |
//! | `timestamps=` | `on`/`off` (also `yes`/`no`, `true`/`false`, `1`/`0`); bare `timestamps` = on | `on` |
//! | `bench`, `bench=MODE` | measure and print benchmark figures (`bench: name=...` lines): `paths` (the bare flag: the native floors and `guest_create`), `io` (the floor `native_memcpy`, for the virtio benches), `guests` (no floors; the launcher does not wait for memory and reports `guest_overhead` and `density`) | off |
//! | `fastpath=` | `on`/`off`: handle guest exits on the trap stack and return straight to the guest when they need no launcher (`off`: every exit goes back to the run loop, as a reference for tests) | `on` |
//!
//! Nothing is ignored silently: unknown options, bad values and duplicates
//! are returned as [`CmdlineError`]s (the config keeps the default, or the
//! first value for duplicates). `selftest=` may be repeated; the sets are
//! merged. Parsing never allocates.

use core::fmt;

/// Log verbosity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Informational (default).
    #[default]
    Info,
    /// Debugging output.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// All levels, least verbose first.
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ];

    /// Command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// Parses a command-line name (case-insensitive).
    #[must_use]
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s))
    }

    /// The corresponding `log` crate filter.
    #[must_use]
    pub const fn to_level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> Self {
        l.to_level_filter()
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do when the hypervisor is finished (or dies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ExitMode {
    /// Halt the CPU forever (default).
    #[default]
    Halt,
    /// Exit QEMU via the isa-debug-exit device.
    Qemu,
    /// ACPI soft-off (S5).
    Poweroff,
}

impl ExitMode {
    /// All modes.
    pub const ALL: [ExitMode; 3] = [ExitMode::Halt, ExitMode::Qemu, ExitMode::Poweroff];

    /// Command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            ExitMode::Halt => "halt",
            ExitMode::Qemu => "qemu",
            ExitMode::Poweroff => "poweroff",
        }
    }

    /// Parses a command-line name (case-insensitive).
    #[must_use]
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for ExitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A built-in self test, selected with `selftest=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelfTest {
    /// Frame allocator / heap exercise.
    Memory,
    /// Deliberate page fault (exception path).
    PageFault,
    /// Deliberate divide error (exception path).
    Divide,
    /// Deliberate panic (panic path).
    Panic,
    /// Timer interrupt / timer queue check.
    Timer,
    /// A refused return into a guest is the guest's fault (trap 256) on
    /// every return path.
    EntryFault,
    /// Host tasks: spawned, switched in turn, their stacks freed.
    Tasks,
    /// The control channel's errno table against the real core and real
    /// guest modules.
    Channel,
}

impl SelfTest {
    /// All self tests, in the order they are listed / run.
    pub const ALL: [SelfTest; 8] = [
        SelfTest::Memory,
        SelfTest::PageFault,
        SelfTest::Divide,
        SelfTest::Panic,
        SelfTest::Timer,
        SelfTest::EntryFault,
        SelfTest::Tasks,
        SelfTest::Channel,
    ];

    /// Command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            SelfTest::Memory => "memory",
            SelfTest::PageFault => "pagefault",
            SelfTest::Divide => "divide",
            SelfTest::Panic => "panic",
            SelfTest::Timer => "timer",
            SelfTest::EntryFault => "entryfault",
            SelfTest::Tasks => "tasks",
            SelfTest::Channel => "channel",
        }
    }

    /// Parses a command-line name (case-insensitive; `page-fault` and
    /// `page_fault` are accepted too).
    #[must_use]
    pub fn from_name(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("page-fault") || s.eq_ignore_ascii_case("page_fault") {
            return Some(SelfTest::PageFault);
        }
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for SelfTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`SelfTest`]s (bitset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SelfTestSet(u8);

impl SelfTestSet {
    /// The empty set.
    pub const EMPTY: SelfTestSet = SelfTestSet(0);

    /// Every self test.
    #[must_use]
    pub const fn all() -> Self {
        let mut bits = 0;
        let mut i = 0;
        while i < SelfTest::ALL.len() {
            bits |= SelfTest::ALL[i].bit();
            i += 1;
        }
        SelfTestSet(bits)
    }

    /// Adds a test.
    pub fn insert(&mut self, t: SelfTest) {
        self.0 |= t.bit();
    }

    /// Whether `t` is selected.
    #[must_use]
    pub const fn contains(self, t: SelfTest) -> bool {
        self.0 & t.bit() != 0
    }

    /// Whether no test is selected.
    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of selected tests.
    #[must_use]
    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Union of two sets.
    #[must_use]
    pub const fn union(self, other: SelfTestSet) -> SelfTestSet {
        SelfTestSet(self.0 | other.0)
    }

    /// The selected tests in [`SelfTest::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = SelfTest> {
        SelfTest::ALL.into_iter().filter(move |t| self.contains(*t))
    }
}

impl fmt::Display for SelfTestSet {
    /// Comma list (`memory,timer`) or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (i, t) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(t.name())?;
        }
        Ok(())
    }
}

/// Default serial baud rate.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Longest hypervisor command line kept, in bytes: a longer one is cut
/// (and the cut reported at boot); `cargo xtask` refuses it up front.
pub const MAX_CMDLINE: usize = 1024;

/// What `bench` measures (`bench` alone is `bench=paths`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// No benchmark output.
    Off,
    /// The native floors of the lguest paths and `guest_create`.
    Paths,
    /// The floor of the virtio benches, `native_memcpy`.
    Io,
    /// No floor: `guest_overhead` and `density` (guests do not wait for
    /// memory another guest holds; a guest that does not fit is not
    /// started).
    Guests,
}

impl BenchMode {
    /// Whether any benchmark output is on.
    pub fn is_on(self) -> bool {
        self != Self::Off
    }
}

/// The effective hypervisor configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Log verbosity (`log=`).
    pub log: LogLevel,
    /// Exit behaviour (`exit=`, `poweroff`).
    pub exit: ExitMode,
    /// Self tests to run (`selftest=`).
    pub selftests: SelfTestSet,
    /// COM1 baud rate (`serial=`); always divides 115200.
    pub serial_baud: u32,
    /// Prefix log lines with timestamps (`timestamps=`).
    pub timestamps: bool,
    /// Benchmark mode (`bench`, `bench=MODE`).
    pub bench: BenchMode,
    /// Handle guest exits where they land (`fastpath=`).
    pub fastpath: bool,
    // Future options (guests: `guest=`, `guestmem=`, ...) go here, with a
    // matching arm in `Parser::apply` and a field in `Display`.
}

impl Default for Config {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Config {
    /// The defaults (`log=info exit=halt selftest=none serial=115200
    /// timestamps=on`).
    pub const DEFAULT: Config = Config {
        log: LogLevel::Info,
        exit: ExitMode::Halt,
        selftests: SelfTestSet::EMPTY,
        serial_baud: DEFAULT_BAUD,
        timestamps: true,
        bench: BenchMode::Off,
        fastpath: true,
    };

    /// A compact, displayable description of the effective configuration
    /// (same as the `Display` impl).
    #[must_use]
    pub fn describe(&self) -> &Self {
        self
    }
}

impl fmt::Display for Config {
    /// E.g. `log=info exit=qemu selftest=memory serial=115200 timestamps=on`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "log={} exit={} selftest={} serial={} timestamps={}",
            self.log,
            self.exit,
            self.selftests,
            self.serial_baud,
            if self.timestamps { "on" } else { "off" }
        )?;
        match self.bench {
            BenchMode::Off => {}
            BenchMode::Paths => f.write_str(" bench")?,
            BenchMode::Io => f.write_str(" bench=io")?,
            BenchMode::Guests => f.write_str(" bench=guests")?,
        }
        if !self.fastpath {
            f.write_str(" fastpath=off")?;
        }
        Ok(())
    }
}

/// A problem with one command-line token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// The whole token, e.g. `bogus=1`.
    UnknownOption(&'a str),
    /// A known option with a value that doesn't parse.
    BadValue {
        /// Option name.
        key: &'a str,
        /// The offending value (empty if missing).
        value: &'a str,
        /// Human description of what was expected.
        expected: &'static str,
    },
    /// The option (key) was given more than once; the first value is kept.
    Duplicate(&'a str),
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::UnknownOption(tok) => write!(f, "unknown option \"{tok}\""),
            CmdlineError::BadValue {
                key,
                value,
                expected,
            } => write!(f, "bad value \"{value}\" for {key} (expected {expected})"),
            CmdlineError::Duplicate(key) => {
                write!(f, "duplicate option \"{key}\" (first value kept)")
            }
        }
    }
}

/// Errors from [`parse`]: up to [`CmdlineErrors::CAPACITY`] are kept, the
/// rest are only counted. Never allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdlineErrors<'a> {
    errors: [Option<CmdlineError<'a>>; CmdlineErrors::CAPACITY],
    len: usize,
    overflow: usize,
}

impl Default for CmdlineErrors<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> CmdlineErrors<'a> {
    /// Number of errors kept.
    pub const CAPACITY: usize = 8;

    /// No errors.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            errors: [None; Self::CAPACITY],
            len: 0,
            overflow: 0,
        }
    }

    fn push(&mut self, e: CmdlineError<'a>) {
        match self.errors.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(e);
                self.len += 1;
            }
            None => self.overflow += 1,
        }
    }

    /// The kept errors, in command-line order.
    pub fn iter(&self) -> impl Iterator<Item = &CmdlineError<'a>> + '_ {
        self.errors.iter().flatten()
    }

    /// Number of errors kept (see also [`Self::overflow`]).
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the command line was fully valid.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0 && self.overflow == 0
    }

    /// Number of further errors that were dropped.
    #[must_use]
    pub const fn overflow(&self) -> usize {
        self.overflow
    }

    /// Total number of errors (kept + dropped).
    #[must_use]
    pub const fn total(&self) -> usize {
        self.len + self.overflow
    }
}

const EXPECT_LOG: &str = "one of error, warn, info, debug, trace";
const EXPECT_EXIT: &str = "one of halt, qemu, poweroff";
const EXPECT_SELFTEST: &str =
    "comma-separated list of memory, pagefault, divide, panic, timer, entryfault, all";
const EXPECT_BAUD: &str = "a baud rate dividing 115200, e.g. 115200, 57600, 38400, 9600";
const EXPECT_BOOL: &str = "on or off";
const EXPECT_BENCH: &str = "paths, io or guests";
const EXPECT_FLAG: &str = "no value";

fn parse_bool(v: &str) -> Option<bool> {
    const ON: [&str; 4] = ["on", "yes", "true", "1"];
    const OFF: [&str; 4] = ["off", "no", "false", "0"];
    if ON.iter().any(|s| s.eq_ignore_ascii_case(v)) {
        Some(true)
    } else if OFF.iter().any(|s| s.eq_ignore_ascii_case(v)) {
        Some(false)
    } else {
        None
    }
}

fn parse_baud(v: &str) -> Option<u32> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let baud: u32 = v.parse().ok()?;
    (baud != 0 && DEFAULT_BAUD.is_multiple_of(baud)).then_some(baud)
}

fn parse_selftests(v: &str) -> Option<SelfTestSet> {
    let mut set = SelfTestSet::EMPTY;
    for name in v.split(',') {
        if name.eq_ignore_ascii_case("all") {
            set = set.union(SelfTestSet::all());
        } else {
            set.insert(SelfTest::from_name(name)?);
        }
    }
    Some(set)
}

/// Options that may appear only once (index = bit in `Parser::seen`).
#[derive(Clone, Copy)]
enum Key {
    Log,
    Exit,
    Serial,
    Timestamps,
    Bench,
    Fastpath,
}

struct Parser<'a> {
    config: Config,
    errors: CmdlineErrors<'a>,
    seen: u32,
}

impl<'a> Parser<'a> {
    /// Returns whether `key` may be applied (first occurrence).
    fn first_time(&mut self, key: Key, name: &'a str) -> bool {
        let bit = 1 << (key as u32);
        if self.seen & bit != 0 {
            self.errors.push(CmdlineError::Duplicate(name));
            false
        } else {
            self.seen |= bit;
            true
        }
    }

    fn bad(&mut self, key: &'a str, value: &'a str, expected: &'static str) {
        self.errors.push(CmdlineError::BadValue {
            key,
            value,
            expected,
        });
    }

    /// The value of a single-valued option: `parsed` if it is `Some` and this
    /// is the option's first occurrence; a `BadValue` error (`value`,
    /// `expected`) if it is `None`; a `Duplicate` error otherwise.
    fn once<T>(
        &mut self,
        key: Key,
        name: &'a str,
        value: &'a str,
        parsed: Option<T>,
        expected: &'static str,
    ) -> Option<T> {
        match parsed {
            Some(x) => self.first_time(key, name).then_some(x),
            None => {
                self.bad(name, value, expected);
                None
            }
        }
    }

    fn apply(&mut self, token: &'a str) {
        let (key, value) = match token.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (token, None),
        };
        match key {
            "log" => {
                let v = value.unwrap_or("");
                if let Some(l) = self.once(Key::Log, key, v, LogLevel::from_name(v), EXPECT_LOG) {
                    self.config.log = l;
                }
            }
            "exit" => {
                let v = value.unwrap_or("");
                if let Some(m) = self.once(Key::Exit, key, v, ExitMode::from_name(v), EXPECT_EXIT) {
                    self.config.exit = m;
                }
            }
            "poweroff" => match value {
                None => {
                    if self.first_time(Key::Exit, key) {
                        self.config.exit = ExitMode::Poweroff;
                    }
                }
                Some(v) => self.bad(key, v, EXPECT_FLAG),
            },
            "selftest" => {
                let v = value.unwrap_or("");
                match parse_selftests(v) {
                    Some(set) => self.config.selftests = self.config.selftests.union(set),
                    None => self.bad(key, v, EXPECT_SELFTEST),
                }
            }
            "serial" => {
                let v = value.unwrap_or("");
                if let Some(b) = self.once(Key::Serial, key, v, parse_baud(v), EXPECT_BAUD) {
                    self.config.serial_baud = b;
                }
            }
            "timestamps" => {
                let on = value.map_or(Some(true), parse_bool);
                let v = value.unwrap_or("");
                if let Some(on) = self.once(Key::Timestamps, key, v, on, EXPECT_BOOL) {
                    self.config.timestamps = on;
                }
            }
            "fastpath" => {
                let v = value.unwrap_or("");
                if let Some(on) = self.once(Key::Fastpath, key, v, parse_bool(v), EXPECT_BOOL) {
                    self.config.fastpath = on;
                }
            }
            "bench" => {
                let mode = match value {
                    None | Some("paths") => Some(BenchMode::Paths),
                    Some("io") => Some(BenchMode::Io),
                    Some("guests") => Some(BenchMode::Guests),
                    Some(_) => None,
                };
                let v = value.unwrap_or("");
                if let Some(m) = self.once(Key::Bench, key, v, mode, EXPECT_BENCH) {
                    self.config.bench = m;
                }
            }
            // Future options (guests come next) are added here; give each
            // single-valued option a `Key` variant so duplicates are caught.
            _ => self.errors.push(CmdlineError::UnknownOption(token)),
        }
    }
}

/// Parses the command line into a [`Config`] plus every problem found.
///
/// Invalid tokens leave the corresponding setting at its default. Never
/// allocates and never panics.
#[must_use]
pub fn parse(cmdline: &str) -> (Config, CmdlineErrors<'_>) {
    let mut p = Parser {
        config: Config::DEFAULT,
        errors: CmdlineErrors::new(),
        seen: 0,
    };
    for token in cmdline.split_ascii_whitespace() {
        p.apply(token);
    }
    (p.config, p.errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs<'a>(e: &CmdlineErrors<'a>) -> Vec<CmdlineError<'a>> {
        e.iter().copied().collect()
    }

    #[test]
    fn defaults() {
        for line in ["", "   ", "\t\n"] {
            let (c, e) = parse(line);
            assert_eq!(c, Config::DEFAULT);
            assert!(e.is_empty());
        }
        let c = Config::default();
        assert_eq!(c.log, LogLevel::Info);
        assert_eq!(c.exit, ExitMode::Halt);
        assert!(c.selftests.is_empty());
        assert_eq!(c.serial_baud, 115_200);
        assert!(c.timestamps);
        assert_eq!(
            c.to_string(),
            "log=info exit=halt selftest=none serial=115200 timestamps=on"
        );
    }

    #[test]
    fn full_line() {
        let (c, e) =
            parse("  log=debug exit=qemu selftest=memory,timer serial=38400\ttimestamps=off\n");
        assert!(e.is_empty(), "{:?}", errs(&e));
        assert_eq!(c.log, LogLevel::Debug);
        assert_eq!(c.exit, ExitMode::Qemu);
        assert!(c.selftests.contains(SelfTest::Memory));
        assert!(c.selftests.contains(SelfTest::Timer));
        assert!(!c.selftests.contains(SelfTest::Panic));
        assert_eq!(c.selftests.len(), 2);
        assert_eq!(c.serial_baud, 38400);
        assert!(!c.timestamps);
        assert!(!c.bench.is_on());
        assert_eq!(
            c.describe().to_string(),
            "log=debug exit=qemu selftest=memory,timer serial=38400 timestamps=off"
        );
        let (c, e) = parse("bench exit=qemu");
        assert!(c.bench == BenchMode::Paths && e.is_empty());
        assert!(c.fastpath);
        assert!(c.to_string().ends_with(" bench"));
        let (c, e) = parse("bench=guests");
        assert!(c.bench == BenchMode::Guests && e.is_empty());
        assert!(c.to_string().ends_with(" bench=guests"));
        let (c, e) = parse("bench=io");
        assert!(c.bench == BenchMode::Io && e.is_empty());
        let (c, e) = parse("bench=fast");
        assert!(c.bench == BenchMode::Off && e.len() == 1);
        let (c, e) = parse("fastpath=off");
        assert!(!c.fastpath && e.is_empty());
        assert!(c.to_string().ends_with(" fastpath=off"));
        let (c, e) = parse("fastpath=on fastpath=off");
        assert!(c.fastpath);
        assert_eq!(e.len(), 1);
        let (c, e) = parse("fastpath=sometimes");
        assert!(c.fastpath);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn flags_and_case() {
        let (c, e) = parse("poweroff LOG=info");
        assert_eq!(c.exit, ExitMode::Poweroff);
        assert_eq!(errs(&e), [CmdlineError::UnknownOption("LOG=info")]);
        let (c, e) = parse("log=TRACE exit=PowerOff timestamps");
        assert!(e.is_empty());
        assert_eq!(c.log, LogLevel::Trace);
        assert_eq!(c.exit, ExitMode::Poweroff);
        assert!(c.timestamps);
        let (c, _) = parse("timestamps=no");
        assert!(!c.timestamps);
    }

    #[test]
    fn selftests() {
        let (c, e) = parse("selftest=all");
        assert!(e.is_empty());
        assert_eq!(c.selftests, SelfTestSet::all());
        assert_eq!(c.selftests.len(), 8);
        assert_eq!(
            c.selftests.to_string(),
            "memory,pagefault,divide,panic,timer,entryfault,tasks,channel"
        );
        let (c, e) = parse("selftest=timer selftest=page-fault");
        assert!(e.is_empty());
        assert_eq!(
            c.selftests.iter().collect::<Vec<_>>(),
            [SelfTest::PageFault, SelfTest::Timer]
        );
        let (c, e) = parse("selftest=memory,bogus");
        assert!(c.selftests.is_empty());
        assert_eq!(
            errs(&e),
            [CmdlineError::BadValue {
                key: "selftest",
                value: "memory,bogus",
                expected: EXPECT_SELFTEST
            }]
        );
        let (_, e) = parse("selftest= selftest=memory,,timer");
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn errors_reported() {
        let (c, e) = parse(
            "bogus=1 log=x exit log=warn log=error poweroff=1 serial=1000 serial=abc serial=0 timestamps=maybe",
        );
        assert_eq!(c.log, LogLevel::Warn);
        assert_eq!(c.exit, ExitMode::Halt);
        assert_eq!(c.serial_baud, 115_200);
        assert!(c.timestamps);
        let v = errs(&e);
        assert_eq!(v[0], CmdlineError::UnknownOption("bogus=1"));
        assert_eq!(
            v[1],
            CmdlineError::BadValue {
                key: "log",
                value: "x",
                expected: EXPECT_LOG
            }
        );
        assert_eq!(
            v[2],
            CmdlineError::BadValue {
                key: "exit",
                value: "",
                expected: EXPECT_EXIT
            }
        );
        assert_eq!(v[3], CmdlineError::Duplicate("log"));
        assert!(matches!(
            v[4],
            CmdlineError::BadValue {
                key: "poweroff",
                value: "1",
                ..
            }
        ));
        assert!(matches!(
            v[5],
            CmdlineError::BadValue {
                key: "serial",
                value: "1000",
                ..
            }
        ));
        assert!(matches!(
            v[6],
            CmdlineError::BadValue {
                key: "serial",
                value: "abc",
                ..
            }
        ));
        assert!(matches!(
            v[7],
            CmdlineError::BadValue {
                key: "serial",
                value: "0",
                ..
            }
        ));
        // Ninth error is only counted.
        assert_eq!(e.len(), 8);
        assert_eq!(e.overflow(), 1);
        assert_eq!(e.total(), 9);
        assert!(!e.is_empty());
    }

    #[test]
    fn error_display() {
        assert_eq!(
            CmdlineError::UnknownOption("bogus=1").to_string(),
            "unknown option \"bogus=1\""
        );
        let (_, e) = parse("log=x");
        assert_eq!(
            errs(&e)[0].to_string(),
            "bad value \"x\" for log (expected one of error, warn, info, debug, trace)"
        );
        assert_eq!(
            CmdlineError::Duplicate("exit").to_string(),
            "duplicate option \"exit\" (first value kept)"
        );
    }

    #[test]
    fn exit_duplicates_across_spellings() {
        let (c, e) = parse("exit=qemu poweroff");
        assert_eq!(c.exit, ExitMode::Qemu);
        assert_eq!(errs(&e), [CmdlineError::Duplicate("poweroff")]);
    }

    #[test]
    fn level_filter() {
        assert_eq!(
            log::LevelFilter::from(LogLevel::Warn),
            log::LevelFilter::Warn
        );
        assert_eq!(LogLevel::Trace.to_level_filter(), log::LevelFilter::Trace);
        assert_eq!(LogLevel::from_name("Error"), Some(LogLevel::Error));
        assert_eq!(LogLevel::from_name("verbose"), None);
    }

    #[test]
    fn garbage_never_panics() {
        let inputs = [
            "=",
            "==",
            "=x",
            "log==",
            "log=info=debug",
            "selftest=,",
            "serial=99999999999999",
            "\u{0}",
            "ü=ö",
            "poweroff=",
            "exit=qemu\u{a0}log=warn",
        ];
        for i in inputs {
            let (_, e) = parse(i);
            assert!(!e.is_empty(), "{i:?} accepted");
        }
    }
}
