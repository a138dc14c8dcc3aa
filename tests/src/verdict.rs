//! From a serial log and an exit status to PASS or FAIL: pure functions, unit-tested here.
//!
//! * The log is split into lines exactly as received (only the `\r` of each CRLF goes): no
//!   escape sequence or carriage return is interpreted, so guest text that would *look* like a
//!   status line on a terminal never matches one.
//! * `expect` patterns must match lines in order: each one on the line where the previous one
//!   matched or on a later line (one line may satisfy several consecutive patterns, so write
//!   patterns that tell repeated lines apart).
//! * Each list of `expect_each` is matched the same way, on its own: the lists are independent
//!   of each other and of `expect` (concurrent guests interleave their lines, but each guest's
//!   own lines come in order).
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
    /// Ordered streams: each list must match in order like `expect`, independently of the other
    /// lists and of `expect`.
    pub expect_each: Vec<Vec<Regex>>,
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
        /// `None` for `expect`, else the 1-based position of the list in `expect_each`.
        stream: Option<usize>,
        /// 1-based position in `expect` or in that `expect_each` list.
        index: usize,
        /// The pattern.
        pattern: String,
        /// 1-based line of the previous pattern's match, if there was a previous pattern.
        after_line: Option<usize>,
    },
    /// Scripted input step number `step` (1-based) was never written to the serial port.
    InputNotSent {
        /// 1-based position in `input`.
        step: usize,
        /// The step's `after` regex.
        pattern: String,
        /// 1-based line where the previous step matched, if there was a previous step.
        after_line: Option<usize>,
        /// 1-based line where this step's regex matched, if it did (QEMU then ended before the
        /// text could be written).
        matched_line: Option<usize>,
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
                stream,
                index,
                pattern,
                after_line,
            } => {
                if let Some(stream) = stream {
                    write!(f, "expect_each #{stream}: ")?;
                }
                write!(f, "missing expected regex #{index} `{pattern}`")?;
                match after_line {
                    Some(line) => {
                        write!(f, " at or after line {line}, where #{} matched", index - 1)
                    }
                    None => Ok(()),
                }
            }
            Self::InputNotSent {
                step,
                pattern,
                after_line,
                matched_line,
            } => {
                write!(f, "input step {step} never sent: ")?;
                match (matched_line, after_line) {
                    (Some(line), _) => write!(
                        f,
                        "line {line} matched `{pattern}` but QEMU ended before the text was written"
                    ),
                    (None, Some(line)) => write!(
                        f,
                        "no line matched `{pattern}` at or after line {line}, where step {} \
                         matched",
                        step - 1
                    ),
                    (None, None) => write!(f, "no line matched `{pattern}`"),
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
/// patterns, the first missing pattern of `expect`, then the first missing pattern of each
/// `expect_each` list that has one.
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
    failures.extend(first_missing(None, &exp.expect, lines));
    for (s, stream) in exp.expect_each.iter().enumerate() {
        failures.extend(first_missing(Some(s + 1), stream, lines));
    }
    failures
}

/// Matches one ordered list (`expect`, or the list numbered `stream` of `expect_each`) in
/// order; returns the first pattern that has no match at or after the line where its
/// predecessor matched.
fn first_missing(stream: Option<usize>, expect: &[Regex], lines: &[String]) -> Option<Failure> {
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
                    stream,
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
            expect_each: Vec::new(),
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
                stream: None,
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
                stream: None,
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
                stream: None,
                index: 2,
                pattern: "CR2=".into(),
                after_line: Some(4),
            }]
        );
    }

    /// Two guests running at once interleave their lines: each guest's lines are in order, the
    /// two sequences are not in any order relative to each other.
    const INTERLEAVED: &str = "rustyvisor 0.1.0\r\n\
                               guest b: step 1\r\n\
                               guest a: step 1\r\n\
                               guest a: step 2\r\n\
                               guest b: step 2\r\n\
                               guest b powered off\r\n\
                               guest a powered off\r\n\
                               summary: 2 guests\r\n";

    fn each(streams: &[&[&str]]) -> Expectations {
        Expectations {
            expect_each: streams.iter().map(|s| res(s)).collect(),
            ..exp(&["^rustyvisor", "^summary: "], &[], 33)
        }
    }

    #[test]
    fn each_stream_matches_in_order_on_its_own() {
        let e = each(&[
            &[
                "^guest a: step 1",
                "^guest a: step 2",
                "^guest a powered off",
            ],
            &[
                "^guest b: step 1",
                "^guest b: step 2",
                "^guest b powered off",
            ],
        ]);
        assert_eq!(judge(&e, &lines(INTERLEAVED), Outcome::Exited(33)), []);
        // The same patterns as one `expect` list would demand an order the log does not have.
        let global = exp(
            &["^guest a: step 1", "^guest b: step 1", "^guest a: step 2"],
            &[],
            33,
        );
        assert!(matches!(
            judge(&global, &lines(INTERLEAVED), Outcome::Exited(33))[..],
            [Failure::Missing {
                stream: None,
                index: 2,
                ..
            }]
        ));
        // A stream may match lines before those `expect` matched: they are independent.
        let early = Expectations {
            expect: res(&["^summary: "]),
            ..each(&[&["^rustyvisor", "^guest b: step 2"]])
        };
        assert_eq!(judge(&early, &lines(INTERLEAVED), Outcome::Exited(33)), []);
    }

    #[test]
    fn each_stream_reports_its_own_first_missing_pattern() {
        let e = each(&[
            &["^guest a: step 1", "^guest a: step 2"],
            &["^guest b powered off", "^guest b: step 2"],
            &["^guest c: "],
            &["^guest a powered off"],
        ]);
        let failures = judge(&e, &lines(INTERLEAVED), Outcome::Exited(33));
        assert_eq!(
            failures,
            [
                Failure::Missing {
                    stream: Some(2),
                    index: 2,
                    pattern: "^guest b: step 2".into(),
                    after_line: Some(6),
                },
                Failure::Missing {
                    stream: Some(3),
                    index: 1,
                    pattern: "^guest c: ".into(),
                    after_line: None,
                },
            ]
        );
        assert_eq!(
            failures[0].to_string(),
            "expect_each #2: missing expected regex #2 `^guest b: step 2` at or after line 6, \
             where #1 matched"
        );
        assert_eq!(
            failures[1].to_string(),
            "expect_each #3: missing expected regex #1 `^guest c: `"
        );
        // `expect` failures come first and keep their message.
        let both = Expectations {
            expect: res(&["^nope"]),
            ..each(&[&["^nope either"]])
        };
        let reasons: Vec<String> = judge(&both, &lines(INTERLEAVED), Outcome::Exited(33))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            reasons,
            [
                "missing expected regex #1 `^nope`",
                "expect_each #1: missing expected regex #1 `^nope either`"
            ]
        );
    }

    #[test]
    fn unsent_input_steps_explain_themselves() {
        let never = Failure::InputNotSent {
            step: 1,
            pattern: "^login:".into(),
            after_line: None,
            matched_line: None,
        };
        assert_eq!(
            never.to_string(),
            "input step 1 never sent: no line matched `^login:`"
        );
        let later = Failure::InputNotSent {
            step: 3,
            pattern: "^ready".into(),
            after_line: Some(12),
            matched_line: None,
        };
        assert_eq!(
            later.to_string(),
            "input step 3 never sent: no line matched `^ready` at or after line 12, where step 2 \
             matched"
        );
        let late = Failure::InputNotSent {
            step: 2,
            pattern: "^ready".into(),
            after_line: Some(12),
            matched_line: Some(14),
        };
        assert_eq!(
            late.to_string(),
            "input step 2 never sent: line 14 matched `^ready` but QEMU ended before the text \
             was written"
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
