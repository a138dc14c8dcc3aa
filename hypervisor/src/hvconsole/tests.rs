//! Tests of the console state machine: each key and command, the reports,
//! and random byte streams against the routing rules.

use super::*;
use crate::testutil::Rng;

fn console(names: &[&str]) -> Console {
    let mut c = Console::new();
    for n in names {
        c.add_guest(n).unwrap();
    }
    c
}

fn feed(c: &mut Console, bytes: &[u8]) -> Vec<Action> {
    let mut out = Vec::new();
    c.input(bytes, &mut out);
    out
}

fn to(guest: &str, bytes: &[u8]) -> Action {
    Action::ToGuest {
        guest: guest.to_string(),
        bytes: bytes.to_vec(),
    }
}

fn print(s: &str) -> Action {
    Action::Print(s.to_string())
}

fn echo(b: &[u8]) -> Action {
    Action::Echo(b.to_vec())
}

/// The actions of a command line, without the echo.
fn command(c: &mut Console, line: &str) -> Vec<Action> {
    let mut bytes = vec![PREFIX];
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\r');
    feed(c, &bytes)
        .into_iter()
        .filter(|a| !matches!(a, Action::Echo(_)))
        .collect()
}

#[test]
fn input_goes_to_the_focused_guest_in_one_action() {
    let mut c = console(&["a", "b"]);
    assert_eq!(c.focus(), Some("a"), "the first guest gets the focus");
    assert_eq!(feed(&mut c, b"ls -l\r"), [to("a", b"ls -l\r")]);
    assert_eq!(feed(&mut c, b""), []);
    assert_eq!(c.counters().to_guest, 6);
}

#[test]
fn prefix_opens_a_line_with_echo_backspace_and_enter() {
    let mut c = console(&["a"]);
    let out = feed(&mut c, b"x\x01lis\x7fst");
    assert_eq!(
        out,
        [
            to("a", b"x"),
            echo(format!("\r\n{PROMPT}").as_bytes()),
            echo(b"l"),
            echo(b"i"),
            echo(b"s"),
            echo(b"\x08 \x08"),
            echo(b"s"),
            echo(b"t"),
        ]
    );
    assert!(c.line_open());
    assert_eq!(c.redraw(), Some(format!("\r\n{PROMPT}list").into_bytes()));
    // Backspace on an empty line erases nothing.
    assert_eq!(
        feed(&mut c, b"\r\n"),
        [echo(b"\r\n"), Action::Run(Command::List)]
    );
    assert!(!c.line_open());
    assert_eq!(c.redraw(), None);
    // The LF after the CR was swallowed; the next one is the guest's.
    assert_eq!(feed(&mut c, b"\n"), [to("a", b"\n")]);
    let mut c = console(&["a"]);
    assert_eq!(
        feed(&mut c, b"\x01\x08\x7f"),
        [echo(format!("\r\n{PROMPT}").as_bytes())]
    );
}

#[test]
fn cancel_with_esc_or_ctrl_c() {
    for key in [0x1b, 0x03] {
        let mut c = console(&["a"]);
        let out = feed(&mut c, &[PREFIX, b'k', b'i', key, b'z']);
        assert_eq!(out.last(), Some(&to("a", b"z")));
        assert!(!out.iter().any(|a| matches!(a, Action::Run(_))));
        assert_eq!(out[out.len() - 2], echo(b"\r\n"));
        assert_eq!(c.counters().commands, 0);
    }
}

#[test]
fn literal_prefix_and_focus_cycling() {
    let mut c = console(&["a", "b", "c"]);
    assert_eq!(
        feed(&mut c, b"1\x01\x012"),
        [
            to("a", b"1"),
            echo(format!("\r\n{PROMPT}").as_bytes()),
            echo(b"\r\n"),
            to("a", b"\x01"),
            to("a", b"2"),
        ]
    );
    let out = feed(&mut c, b"\x01\tx");
    assert_eq!(out[2..], [print("console: focus b"), to("b", b"x")]);
    feed(&mut c, b"\x01\t\x01\t");
    assert_eq!(c.focus(), Some("a"), "wraps around");
    // Ctrl-A and Tab on a non-empty line only ring the bell.
    let out = feed(&mut c, b"\x01l\x01\t");
    assert_eq!(out[2..], [echo(b"\x07"), echo(b"\x07")]);
    assert!(c.line_open());
    assert_eq!(c.focus(), Some("a"));
}

#[test]
fn commands_and_their_errors() {
    let mut c = console(&["web", "db-1"]);
    assert_eq!(command(&mut c, "list"), [Action::Run(Command::List)]);
    assert_eq!(command(&mut c, "  stats  "), [Action::Run(Command::Stats)]);
    assert_eq!(
        command(&mut c, "kill db-1"),
        [Action::Run(Command::Kill("db-1".into()))]
    );
    assert_eq!(
        command(&mut c, "restart web"),
        [Action::Run(Command::Restart("web".into()))]
    );
    assert_eq!(
        command(&mut c, "focus db-1"),
        [print("console: focus db-1")]
    );
    assert_eq!(c.focus(), Some("db-1"));
    assert_eq!(command(&mut c, "help").len(), HELP.len());
    assert_eq!(command(&mut c, ""), [], "an empty line does nothing");
    let errors = [
        (
            "frobnicate x",
            "console: unknown command \"frobnicate\" (help lists the commands)",
        ),
        ("kill", "console: usage: kill NAME"),
        ("kill web db-1", "console: usage: kill NAME"),
        ("restart nosuch", "console: restart: no guest named nosuch"),
        ("focus a/b", "console: focus: \"a/b\" is not a guest name"),
        ("list -l", "console: usage: list (no arguments)"),
        ("stats now", "console: usage: stats (no arguments)"),
        ("help me", "console: usage: help (no arguments)"),
        (
            "LIST",
            "console: unknown command \"LIST\" (help lists the commands)",
        ),
    ];
    for (line, msg) in errors {
        assert_eq!(command(&mut c, line), [print(msg)], "{line}");
    }
    assert_eq!(c.focus(), Some("db-1"), "no error moved the focus");
    assert_eq!(c.counters().commands, 6 + errors.len() as u64);
}

#[test]
fn line_length_is_bounded() {
    let mut c = console(&["a"]);
    let mut bytes = vec![PREFIX];
    bytes.extend(core::iter::repeat_n(b'x', MAX_LINE + 10));
    let out = feed(&mut c, &bytes);
    let bells = out.iter().filter(|a| **a == echo(b"\x07")).count();
    assert_eq!(bells, 10);
    assert_eq!(c.line.len(), MAX_LINE);
    // Non-ASCII and other control bytes ring the bell too.
    assert_eq!(feed(&mut c, &[0xc3, 0x02]), [echo(b"\x07"), echo(b"\x07")]);
    let out = feed(&mut c, b"\r");
    let want = format!(
        "console: unknown command \"{}\" (help lists the commands)",
        "x".repeat(MAX_LINE)
    );
    assert_eq!(out.last(), Some(&print(&want)));
}

#[test]
fn no_focus_drops_with_one_hint_and_removal_moves_focus() {
    let mut c = Console::new();
    let out = feed(&mut c, b"abc");
    assert_eq!(
        out,
        [print(
            "console: no guest in focus; input dropped (Ctrl-A, then help)"
        )]
    );
    assert_eq!(feed(&mut c, b"d"), []);
    assert_eq!(c.counters().dropped, 4);
    assert_eq!(
        command(&mut c, "focus x"),
        [print("console: focus: no guest named x")]
    );
    assert_eq!(
        feed(&mut c, b"\x01\t"),
        [
            echo(format!("\r\n{PROMPT}").as_bytes()),
            echo(b"\r\n"),
            print("console: no guests")
        ]
    );
    assert_eq!(c.add_guest("a"), Ok(()));
    assert_eq!(c.add_guest("a"), Err(AddError::Duplicate));
    assert_eq!(c.add_guest("bad name"), Err(AddError::BadName));
    assert_eq!(c.add_guest(""), Err(AddError::BadName));
    c.add_guest("b").unwrap();
    c.add_guest("c").unwrap();
    command(&mut c, "focus b");
    let mut out = Vec::new();
    assert!(c.remove_guest("b", &mut out));
    assert_eq!(out, [print("console: focus c")]);
    assert!(!c.remove_guest("b", &mut out));
    out.clear();
    assert!(c.remove_guest("a", &mut out));
    assert_eq!(out, [], "not the focus: nothing to say");
    assert!(c.remove_guest("c", &mut out));
    assert_eq!(out, [print("console: no guest in focus")]);
    assert_eq!(c.focus(), None);
    // Removing the last guest in order wraps to the first.
    let mut c = console(&["a", "b", "c"]);
    command(&mut c, "focus c");
    let mut out = Vec::new();
    c.remove_guest("c", &mut out);
    assert_eq!(c.focus(), Some("a"));
    // A new guest takes the free focus.
    let mut c = Console::new();
    feed(&mut c, b"lost");
    c.add_guest("late").unwrap();
    assert_eq!(feed(&mut c, b"kept"), [to("late", b"kept")]);
    assert_eq!(c.guests().collect::<Vec<_>>(), ["late"]);
}

#[test]
fn list_and_stats_reports() {
    let c = console(&["web", "db"]);
    let lines = c.list(&[
        GuestInfo {
            name: "web",
            state: GuestState::Running,
            mem: 16 << 20,
            exits: 123_456,
            cpu_permille: 333,
        },
        GuestInfo {
            name: "db",
            state: GuestState::Halted,
            mem: 4 << 20,
            exits: 7,
            cpu_permille: 5000,
        },
    ]);
    assert_eq!(
        lines,
        [
            "console:   guest            state          memory        exits    cpu",
            "console: * web              running        16 MiB       123456  33.3%",
            "console:   db               halted          4 MiB            7 100.0%",
        ]
    );
    assert_eq!(c.list(&[])[1], "console:   (no guests)");
    let lines = c.stats(&HostStats {
        uptime_ns: 12_345_678_901,
        mem_total: 1 << 30,
        mem_free: 900 << 20,
        tasks: 7,
        runnable: 2,
        sched: sched::Stats {
            switches: 10,
            halts: 3,
            spawned: 8,
            exited: 1,
            timers_fired: 4,
        },
    });
    assert_eq!(
        lines,
        [
            "console: uptime 12.345 s, memory 900 MiB free of 1 GiB",
            "console: tasks 7 (2 runnable), 8 spawned, 1 exited, 10 switches, 3 halts, 4 timers fired",
            "console: input 0 bytes to guests, 0 dropped, 0 commands",
        ]
    );
    for s in [GuestState::Restarting, GuestState::Dead] {
        assert!(!s.to_string().is_empty());
    }
}

/// Random byte streams, fed one byte at a time and in chunks: bytes reach
/// only the guest in focus when they were typed, never while the line is
/// open; the line never outgrows its bound; every printed line is one
/// printable line starting `console: `; kill and restart name known guests;
/// and the same stream in chunks gives the same bytes to the same guests.
#[test]
fn random_streams_follow_the_routing_rules() {
    let alphabet: &[u8] =
        b"\x01\x01\x01\t\r\n\x1b\x03\x7f\x08 abcdeflistfocuskillrestarthelpstats\xff\x00";
    let words: &[&[u8]] = &[
        b"focus a",
        b"focus b",
        b"focus c",
        b"kill b",
        b"restart c",
        b"list",
        b"bogus",
    ];
    let mut rng = Rng(0x5eed_1234);
    for _ in 0..200 {
        let mut c = console(&["a", "b", "c"]);
        let mut chunked = console(&["a", "b", "c"]);
        let mut stream = Vec::new();
        for _ in 0..300 {
            let r = rng.next_u64();
            if r.is_multiple_of(8) {
                stream.extend_from_slice(words[(r >> 8) as usize % words.len()]);
            } else {
                stream.push(alphabet[(r >> 8) as usize % alphabet.len()]);
            }
        }
        let mut delivered: Vec<(String, u8)> = Vec::new();
        for &b in &stream {
            let focus = c.focus().map(str::to_string);
            let was_open = c.line_open();
            let out = feed(&mut c, &[b]);
            for a in &out {
                match a {
                    Action::ToGuest { guest, bytes } => {
                        assert_eq!(Some(guest), focus.as_ref(), "sent to a guest not in focus");
                        if was_open {
                            assert_eq!(
                                bytes,
                                &[PREFIX],
                                "only the literal Ctrl-A leaves an open line"
                            );
                        } else {
                            assert_eq!(bytes, &[b]);
                        }
                        delivered.extend(bytes.iter().map(|&x| (guest.clone(), x)));
                    }
                    Action::Print(l) => {
                        assert!(l.starts_with("console: "), "{l:?}");
                        assert!(l.bytes().all(|x| (0x20..0x7f).contains(&x)), "{l:?}");
                    }
                    Action::Run(Command::Kill(n) | Command::Restart(n)) => {
                        assert!(c.guests().any(|g| g == n));
                    }
                    Action::Run(_) | Action::Echo(_) => {}
                }
            }
            assert!(c.line.len() <= MAX_LINE);
        }
        let mut chunked_delivered = Vec::new();
        let mut i = 0;
        while i < stream.len() {
            let n = 1 + rng.next_u64() as usize % 40;
            let end = (i + n).min(stream.len());
            for a in feed(&mut chunked, &stream[i..end]) {
                if let Action::ToGuest { guest, bytes } = a {
                    chunked_delivered.extend(bytes.into_iter().map(|x| (guest.clone(), x)));
                }
            }
            i = end;
        }
        assert_eq!(delivered, chunked_delivered);
        assert_eq!(c.counters(), chunked.counters());
    }
}
