//! From a serial log and an exit status to PASS or FAIL: pure functions, unit-tested here.
//!
//! * The log is split into lines exactly as received (only the `\r` of each CRLF goes): no
//!   escape sequence or carriage return is interpreted, so guest text that would *look* like a
//!   status line on a terminal never matches one.
//! * `expect` patterns must match lines in order: each one on the line where the previous one
//!   matched or on a later line (one line may satisfy several consecutive patterns, so write
//!   patterns that tell repeated lines apart).
//! * `forbid` patterns must match no line.
//! * The exit status must be the expected one; a timeout always fails.

use std::fmt;
use std::time::Duration;

use regex::Regex;

use crate::qemu::exit_meaning;

/// What a scenario requires of a run.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// Patterns that must match, in order.
    pub expect: Vec<Regex>,
    /// Patterns that must not match any line.
    pub forbid: Vec<Regex>,
    /// Required QEMU exit status.
    pub exit_code: i32,
}

/// How the QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exited with a status.
    Exited(i32),
    /// Killed by a signal nobody in the harness sent.
    Signaled(i32),
    /// Still running after the timeout; killed by the harness.
    TimedOut(Duration),
}

/// One reason a run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The run never got going (image, firmware, spawning QEMU).
    Setup(String),
    /// QEMU was killed at the timeout.
    Timeout(Duration),
    /// QEMU died from a signal.
    Signal(i32),
    /// QEMU exited with a status other than the expected one.
    WrongExit {
        /// Actual status.
        got: i32,
        /// Expected status.
        expected: i32,
    },
    /// A forbidden pattern matched.
    Forbidden {
        /// The pattern.
        pattern: String,
        /// 1-based line number of the first matching line.
        line_no: usize,
        /// That line.
        line: String,
    },
    /// Expected pattern number `index` (1-based) matched no line at or after the previous one.
    Missing {
        /// 1-based position in `expect`.
        index: usize,
        /// The pattern.
        pattern: String,
        /// 1-based line of the previous pattern's match, if there was a previous pattern.
        after_line: Option<usize>,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(msg) => write!(f, "setup failed: {msg}"),
            Self::Timeout(t) => write!(f, "timeout: still running after {}s", t.as_secs()),
            Self::Signal(sig) => write!(f, "QEMU killed by signal {sig}"),
            Self::WrongExit { got, expected } => write!(
                f,
                "wrong exit code {got} ({}), expected {expected}",
                exit_meaning(*got)
            ),
            Self::Forbidden {
                pattern,
                line_no,
                line,
            } => write!(
                f,
                "forbidden regex `{pattern}` matched at line {line_no}: {}",
                visible(line)
            ),
            Self::Missing {
                index,
                pattern,
                after_line,
            } => {
                write!(f, "missing expected regex #{index} `{pattern}`")?;
                match after_line {
                    Some(line) => {
                        write!(f, " at or after line {line}, where #{} matched", index - 1)
                    }
                    None => Ok(()),
                }
            }
        }
    }
}

/// Splits a raw serial log into lines exactly as received: the only change
/// is that one `\r` before each `\n` (the console's CRLF) is removed.
///
/// Nothing else is cleaned up, on purpose: a `\r` or an escape sequence
/// inside a line stays in it, so a line that *displays* like a hypervisor
/// status line on a terminal (`"guest x: \rguest x powered off"`) does not
/// match `^guest x powered off`. Firmware noise (OVMF and GRUB draw with
/// escape sequences) stays on its own lines before the hypervisor's
/// banner, which starts on a fresh line. Invalid UTF-8 becomes U+FFFD.
pub fn serial_lines(raw: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    let mut lines: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    if lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    lines
}

/// A log line made safe to print in a report: control characters shown as
/// `\r`, `\t`, `\x1b`, ... so a failure report cannot be rewritten by the
/// line it quotes.
pub fn visible(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Judges one run. An empty result means PASS.
///
/// Failures come in this order: how QEMU ended (timeout, signal, wrong exit code), forbidden
/// patterns, then the first missing expected pattern.
pub fn judge(exp: &Expectations, lines: &[String], outcome: Outcome) -> Vec<Failure> {
    let mut failures = Vec::new();
    match outcome {
        Outcome::TimedOut(t) => failures.push(Failure::Timeout(t)),
        Outcome::Signaled(sig) => failures.push(Failure::Signal(sig)),
        Outcome::Exited(code) if code != exp.exit_code => failures.push(Failure::WrongExit {
            got: code,
            expected: exp.exit_code,
        }),
        Outcome::Exited(_) => {}
    }
    for re in &exp.forbid {
        if let Some((i, line)) = lines.iter().enumerate().find(|(_, l)| re.is_match(l)) {
            failures.push(Failure::Forbidden {
                pattern: re.as_str().to_string(),
                line_no: i + 1,
                line: line.clone(),
            });
        }
    }
    if let Some(missing) = first_missing(&exp.expect, lines) {
        failures.push(missing);
    }
    failures
}

/// Matches `expect` in order; returns the first pattern that has no match at or after the line
/// where its predecessor matched.
fn first_missing(expect: &[Regex], lines: &[String]) -> Option<Failure> {
    let mut from = 0;
    let mut previous_line = None;
    for (k, re) in expect.iter().enumerate() {
        match lines.iter().skip(from).position(|l| re.is_match(l)) {
            Some(i) => {
                from += i;
                previous_line = Some(from + 1);
            }
            None => {
                return Some(Failure::Missing {
                    index: k + 1,
                    pattern: re.as_str().to_string(),
                    after_line: previous_line,
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(patterns: &[&str]) -> Vec<Regex> {
        patterns.iter().map(|p| Regex::new(p).unwrap()).collect()
    }

    fn exp(expect: &[&str], forbid: &[&str], exit_code: i32) -> Expectations {
        Expectations {
            expect: res(expect),
            forbid: res(forbid),
            exit_code,
        }
    }

    fn lines(text: &str) -> Vec<String> {
        serial_lines(text.as_bytes())
    }

    const BOOT: &str = "rustyvisor 0.1.0\r\nboot: loader \"GRUB 2.06\"\r\ncmdline: exit=qemu\r\n\
                        cpus: 1 found\r\nidle: nothing to run\r\nsummary: 0 guests\r\n";

    #[test]
    fn passes_when_everything_matches_in_order() {
        let e = exp(
            &[
                r"^rustyvisor \d+\.\d+\.\d+",
                "^boot: loader \"GRUB",
                "^cpus: 1 found",
                "^summary: ",
            ],
            &["PANIC", "EXCEPTION"],
            33,
        );
        assert_eq!(judge(&e, &lines(BOOT), Outcome::Exited(33)), []);
    }

    #[test]
    fn out_of_order_expectation_is_missing() {
        let e = exp(&["^cpus: ", "^boot: "], &[], 33);
        assert_eq!(
            judge(&e, &lines(BOOT), Outcome::Exited(33)),
            [Failure::Missing {
                index: 2,
                pattern: "^boot: ".into(),
                after_line: Some(4),
            }]
        );
    }

    #[test]
    fn first_pattern_missing_has_no_previous_line() {
        let e = exp(&["^nothing like this"], &[], 33);
        let failures = judge(&e, &lines(BOOT), Outcome::Exited(33));
        assert_eq!(
            failures,
            [Failure::Missing {
                index: 1,
                pattern: "^nothing like this".into(),
                after_line: None,
            }]
        );
        assert_eq!(
            failures[0].to_string(),
            "missing expected regex #1 `^nothing like this`"
        );
    }

    #[test]
    fn consecutive_patterns_may_match_the_same_line_but_never_an_earlier_one() {
        let log = lines(
            "boot: loader \"GRUB 2.06\" firmware uefi\n\
             EXCEPTION: page fault (#PF, vector 14)\n\
             error code 0x2 (write) CR2=0x00000000dead0000\n\
             RIP=0xffffffff80001234\n",
        );
        let ok = exp(
            &[
                "^boot: loader \"GRUB",
                "^boot: .*firmware uefi",
                r"^EXCEPTION: page fault \(#PF, vector 14\)",
                "error code 0x[0-9a-f]+ .*write",
                "CR2=0x0*dead0000",
                "^RIP=",
            ],
            &[],
            33,
        );
        assert_eq!(judge(&ok, &log, Outcome::Exited(33)), []);
        let backwards = exp(&["^RIP=", "CR2="], &[], 33);
        assert_eq!(
            judge(&backwards, &log, Outcome::Exited(33)),
            [Failure::Missing {
                index: 2,
                pattern: "CR2=".into(),
                after_line: Some(4),
            }]
        );
    }

    #[test]
    fn forbidden_pattern_reports_its_first_line() {
        let log = lines("rustyvisor 0.1.0\nEXCEPTION: page fault\nEXCEPTION: again\n");
        let e = exp(&["^rustyvisor"], &["PANIC", "EXCEPTION"], 33);
        let failures = judge(&e, &log, Outcome::Exited(33));
        assert_eq!(
            failures,
            [Failure::Forbidden {
                pattern: "EXCEPTION".into(),
                line_no: 2,
                line: "EXCEPTION: page fault".into(),
            }]
        );
        assert!(failures[0].to_string().contains("matched at line 2"));
        // An empty forbid list allows it.
        assert_eq!(
            judge(
                &exp(&["^EXCEPTION: page"], &[], 33),
                &log,
                Outcome::Exited(33)
            ),
            []
        );
    }

    #[test]
    fn exit_status_must_match() {
        let e = exp(&[], &[], 33);
        let failures = judge(&e, &[], Outcome::Exited(0));
        assert_eq!(
            failures,
            [Failure::WrongExit {
                got: 0,
                expected: 33
            }]
        );
        assert!(failures[0].to_string().contains("triple fault"));
        assert!(
            judge(&exp(&[], &[], 35), &[], Outcome::Exited(33))[0]
                .to_string()
                .starts_with("wrong exit code 33 (success")
        );
        assert_eq!(judge(&exp(&[], &[], 35), &[], Outcome::Exited(35)), []);
    }

    #[test]
    fn timeout_and_signal_always_fail() {
        let e = exp(&["^rustyvisor"], &[], 33);
        let t = Duration::from_secs(60);
        assert_eq!(
            judge(&e, &lines(BOOT), Outcome::TimedOut(t)),
            [Failure::Timeout(t)]
        );
        assert_eq!(
            judge(&e, &lines(BOOT), Outcome::Signaled(9)),
            [Failure::Signal(9)]
        );
    }

    #[test]
    fn all_reasons_are_reported_together() {
        let log = lines("PANIC: oops\n");
        let e = exp(&["^summary: "], &["PANIC"], 33);
        let failures = judge(&e, &log, Outcome::Exited(35));
        assert!(matches!(
            failures[..],
            [
                Failure::WrongExit { got: 35, .. },
                Failure::Forbidden { line_no: 1, .. },
                Failure::Missing { index: 1, .. }
            ]
        ));
    }

    #[test]
    fn lines_are_kept_as_received() {
        let raw = "\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: loading Boot0001\r\n\
                   \r\r\n\
                   rustyvisor 0.1.0\r\n\
                   tab\there\x07\r\n\
                   partial\rrewritten\n\
                   no newline at end";
        assert_eq!(
            serial_lines(raw.as_bytes()),
            [
                "\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: loading Boot0001",
                "\r",
                "rustyvisor 0.1.0",
                "tab\there\x07",
                "partial\rrewritten",
                "no newline at end",
            ]
        );
        assert_eq!(serial_lines(b""), Vec::<String>::new());
        assert_eq!(serial_lines(b"\xffbad utf8\n"), ["\u{fffd}bad utf8"]);
        assert_eq!(visible("a\rb\x1b[2J\tc\u{7f}"), "a\\rb\\x1b[2J\\tc\\x7f");
    }

    /// What a vulnerable hypervisor would put on the wire for a guest that prints status lines
    /// of its own behind a carriage return and is then killed: the `guest-hello` expectations
    /// must not be satisfied by it.
    #[test]
    fn a_guest_cannot_forge_status_lines_with_carriage_returns() {
        let hello = exp(
            &[
                "^guest hello: hello from an lguest guest",
                "^guest hello powered off$",
                "^guest hello returned all its memory$",
            ],
            &["^guest hello killed: "],
            33,
        );
        let raw = "guest hello: hello from an lguest guest\r\n\
                   guest hello: \rguest hello powered off\r\n\
                   guest hello: \x1b[2K\rguest hello returned all its memory\r\n\
                   guest hello killed: Bad hypercall 99\r\n\
                   guest hello returned all its memory\r\n";
        let failures = judge(&hello, &lines(raw), Outcome::Exited(33));
        assert!(
            matches!(
                failures[..],
                [
                    Failure::Forbidden { line_no: 4, .. },
                    Failure::Missing { index: 2, .. }
                ]
            ),
            "{failures:?}"
        );
        // A report quoting a forged line shows its control characters.
        let forbid_forged = exp(&[], &["powered off"], 33);
        let report = judge(&forbid_forged, &lines(raw), Outcome::Exited(33))[0].to_string();
        assert!(
            report.ends_with("guest hello: \\rguest hello powered off"),
            "{report}"
        );
    }
}
