//! Runs scenarios: one ISO and one QEMU process each, with a hard timeout, in parallel.
//!
//! Every run leaves its files in `<target>/qemu/`:
//!
//! | file | contents |
//! |---|---|
//! | `<name>.log` | the serial log, as the hypervisor wrote it |
//! | `<name>.qemu.log` | QEMU's `-d cpu_reset,guest_errors` log (`cpu_reset` only under UEFI) |
//! | `<name>.out` | QEMU's own stdout and stderr (only stderr with scripted input) |
//! | `<name>.cmd` | the QEMU command line |
//! | `<name>.OVMF_VARS.fd` | the UEFI variable store (UEFI scenarios) |
//!
//! and, if it failed, its image in `<target>/iso/<name>.iso` (staged in `<target>/iso-stage/<name>/`).
//!
//! # Serial port
//!
//! A scenario without `input` gets `-serial file:<name>.log`: QEMU writes the log itself.
//!
//! A scenario with `input` gets `-serial stdio` with both ends piped to the harness, and three
//! threads run while QEMU does:
//!
//! * the **reader** reads QEMU's stdout (the serial output and nothing else: QEMU's warnings go
//!   to stderr, `-d` to its own file) until end of file, appends every chunk to `<name>.log`
//!   at once, and feeds it to a [`StepMatcher`]; the steps that become due go to the writer
//!   over a channel. It never blocks on anything but the pipe, so QEMU's UART is never held
//!   up for long (QEMU's own `logfile=` option was not used: when a chardev write fails with
//!   `EAGAIN` it logs the bytes and the UART then sends them again).
//! * the **writer** takes due steps in order, waits their `delay_ms`, and writes their bytes to
//!   QEMU's stdin one at a time, [`INPUT_BYTE_PAUSE`] apart. A write error (QEMU is gone) ends
//!   it; the steps written in full are counted.
//! * the calling thread waits for QEMU with the hard timeout ([`wait_with_timeout`]: kill and
//!   reap). Once QEMU is gone its stdout reaches end of file, so the reader ends; that closes
//!   the channel and, with the stop flag, ends the writer. QEMU's stdin stays open until then,
//!   so an early end of input never looks like a hang-up to QEMU.
//!
//! The verdict then reads `<name>.log` like any other, and the first step not written in full
//! is a failure ([`crate::input::unsent`]).

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use crate::err;
use crate::error::{Context, Result};
use crate::image::{Image, ResolvedGuest};
use crate::input::{INPUT_BYTE_PAUSE, Step, StepMatcher, unsent};
use crate::qemu::{Accel, Boot, DirectKernel, Firmware, Ovmf, Qemu, Serial, check_kvm};
use crate::scenario::{Scenario, WallClock};
use crate::verdict::{Failure, Outcome, judge, serial_lines, visible};
use crate::workspace::Workspace;

/// SIGKILL, which [`wait_with_timeout`] sends.
const SIGKILL: i32 = 9;

/// How often the serial log is read while a scenario's `wall_clock` spans are timed: their
/// resolution.
pub const WALL_CLOCK_POLL: Duration = Duration::from_millis(20);

/// What one scenario run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Wall time, image included.
    pub duration: Duration,
    /// Why it failed; empty when it passed.
    pub failures: Vec<Failure>,
    /// The serial log's lines (see [`serial_lines`]).
    pub lines: Vec<String>,
    /// Serial log file.
    pub log: PathBuf,
    /// QEMU's `-d` log file.
    pub qemu_log: PathBuf,
    /// QEMU's stdout and stderr.
    pub qemu_output: String,
    /// A command that boots the same image interactively.
    pub reproduce: String,
    /// The scenario's `wall_clock` spans, in order: name and duration (`None`: the span's
    /// lines did not both appear).
    pub wall_clock: Vec<(String, Option<Duration>)>,
}

impl Report {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The failure reasons on one line.
    pub fn reasons(&self) -> String {
        self.failures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// A failure report for people: reasons, the last `tail` log lines, QEMU's complaints and
    /// how to look closer.
    pub fn details(&self, tail: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "---- {}: FAILED after {:.1}s ----",
            self.name,
            self.duration.as_secs_f64()
        );
        for failure in &self.failures {
            let _ = writeln!(out, "  {failure}");
        }
        let skip = self.lines.len().saturating_sub(tail);
        let _ = writeln!(
            out,
            "  serial log {} ({} lines{}):",
            self.log.display(),
            self.lines.len(),
            if skip > 0 {
                format!(", last {tail} shown")
            } else {
                String::new()
            }
        );
        for (i, line) in self.lines.iter().enumerate().skip(skip) {
            let _ = writeln!(out, "  {:>5} | {}", i + 1, visible(line));
        }
        if !self.qemu_output.trim().is_empty() {
            let _ = writeln!(out, "  QEMU said:");
            for line in self.qemu_output.trim_end().lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
        let _ = writeln!(out, "  QEMU log: {}", self.qemu_log.display());
        let _ = writeln!(out, "  reproduce: {}", self.reproduce);
        out
    }
}

/// Runs scenarios against one hypervisor ELF.
#[derive(Debug, Clone)]
pub struct Runner<'a> {
    /// The workspace (guests, target directory).
    pub ws: &'a Workspace,
    /// The hypervisor ELF to boot.
    pub hypervisor: PathBuf,
    /// OVMF, required when a UEFI scenario runs.
    pub ovmf: Option<Ovmf>,
}

impl Runner<'_> {
    /// Runs one scenario. Problems before QEMU starts become [`Failure::Setup`].
    pub fn run(&self, scenario: &Scenario) -> Report {
        let start = Instant::now();
        let file = |ext: &str| self.file(scenario, ext);
        let mut report = Report {
            name: scenario.name.clone(),
            duration: Duration::ZERO,
            failures: Vec::new(),
            lines: Vec::new(),
            log: file("log"),
            qemu_log: file("qemu.log"),
            qemu_output: String::new(),
            reproduce: format!(
                "{}   (add `-- -d int,cpu_reset` to see faults)",
                scenario.run_command()
            ),
            wall_clock: Vec::new(),
        };
        match self.boot(scenario, &report) {
            Ok((outcome, output, input, spans)) => {
                report.qemu_output = output;
                report.wall_clock = scenario
                    .wall_clock
                    .iter()
                    .map(|w| w.name.clone())
                    .zip(spans)
                    .collect();
                report.lines = fs::read(&report.log)
                    .map(|raw| serial_lines(&raw))
                    .unwrap_or_default();
                report.failures = judge(&scenario.expectations, &report.lines, outcome);
                // Reported even when the run failed otherwise: a guest that hangs waiting for
                // input it never got times out, and this says why.
                report
                    .failures
                    .extend(unsent(&scenario.input, &input.matched, input.sent));
                if report.passed() {
                    // Images are big (two GRUB platforms); keep only those of failures.
                    let _ = fs::remove_file(self.iso(scenario));
                }
            }
            Err(e) => report.failures.push(Failure::Setup(e.to_string())),
        }
        report.duration = start.elapsed();
        report
    }

    /// The scenario's file `<target>/qemu/<name>.<ext>`.
    fn file(&self, scenario: &Scenario, ext: &str) -> PathBuf {
        self.ws.qemu_dir().join(format!("{}.{ext}", scenario.name))
    }

    /// The scenario's ISO.
    fn iso(&self, scenario: &Scenario) -> PathBuf {
        self.ws.iso_dir().join(format!("{}.iso", scenario.name))
    }

    /// Builds the image (unless QEMU boots a kernel itself) and runs QEMU; returns how it
    /// ended, what it printed, how far the scripted input got and the `wall_clock` spans.
    #[allow(clippy::type_complexity)]
    fn boot(
        &self,
        scenario: &Scenario,
        report: &Report,
    ) -> Result<(Outcome, String, InputRun, Vec<Option<Duration>>)> {
        let dir = self.ws.qemu_dir();
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        let file = |ext: &str| self.file(scenario, ext);
        for stale in [&report.log, &report.qemu_log, &file("out"), &file("cmd")] {
            match fs::remove_file(stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(err!("removing {}: {e}", stale.display()));
                }
                _ => {}
            }
        }
        let boot = match &scenario.direct {
            Some(direct) => {
                let root = |p: &PathBuf| self.ws.root.join(p);
                Boot::Kernel(DirectKernel {
                    kernel: root(&direct.kernel),
                    initrd: direct.initrd.as_ref().map(root),
                    append: direct.append.clone(),
                })
            }
            None => {
                let guests = scenario
                    .guests
                    .iter()
                    .map(|g| g.resolve_all(self.ws, &self.ws.root))
                    .collect::<Result<Vec<Vec<ResolvedGuest>>>>()?
                    .into_iter()
                    .flatten()
                    .collect::<Vec<ResolvedGuest>>();
                let iso = self.iso(scenario);
                Image {
                    name: &scenario.name,
                    hypervisor: &self.hypervisor,
                    cmdline: &scenario.cmdline,
                    guests: &guests,
                }
                .write_iso(self.ws, &iso)?;
                Boot::Iso(iso)
            }
        };
        let uefi = match scenario.machine.firmware {
            Firmware::Bios => None,
            Firmware::Uefi => {
                let ovmf = match &self.ovmf {
                    Some(ovmf) => ovmf.clone(),
                    None => Ovmf::locate()?,
                };
                Some(ovmf.flash(&file("OVMF_VARS.fd"))?)
            }
        };
        if scenario.machine.accel == Accel::Kvm {
            check_kvm()?;
        }
        let qemu = Qemu {
            machine: scenario.machine.clone(),
            uefi,
            boot,
            serial: if scenario.input.is_empty() {
                Serial::File(report.log.clone())
            } else {
                Serial::Stdio
            },
            debug_log: Some(report.qemu_log.clone()),
            gdb: false,
        };
        fs::write(file("cmd"), qemu.command_line() + "\n")
            .context(|| format!("writing {}", file("cmd").display()))?;
        let out_path = file("out");
        let out =
            fs::File::create(&out_path).context(|| format!("creating {}", out_path.display()))?;
        let err_out = out
            .try_clone()
            .context(|| format!("opening {}", out_path.display()))?;
        let mut command = qemu.command();
        let ((outcome, input), spans) = if scenario.input.is_empty() {
            let start = Instant::now();
            let mut child = command
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err_out)
                .spawn()
                .context(|| format!("starting {}", crate::qemu::QEMU))?;
            let (outcome, spans) = timed(&report.log, &scenario.wall_clock, start, || {
                wait_with_timeout(&mut child, scenario.timeout)
            });
            let outcome = outcome.context(|| format!("waiting for {}", crate::qemu::QEMU))?;
            ((outcome, InputRun::default()), spans)
        } else {
            drop(out);
            let log = fs::File::create(&report.log)
                .context(|| format!("creating {}", report.log.display()))?;
            let start = Instant::now();
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(err_out)
                .spawn()
                .context(|| format!("starting {}", crate::qemu::QEMU))?;
            let (run, spans) = timed(&report.log, &scenario.wall_clock, start, || {
                run_scripted(&mut child, log, &scenario.input, scenario.timeout)
            });
            let run =
                run.context(|| format!("running {} with scripted input", crate::qemu::QEMU))?;
            (run, spans)
        };
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        Ok((outcome, output, input, spans))
    }

    /// Runs scenarios on `jobs` worker threads. `on_done` sees each report as it finishes;
    /// the result is in scenario order.
    pub fn run_all(
        &self,
        scenarios: &[Scenario],
        jobs: usize,
        on_done: &(dyn Fn(&Report) + Sync),
    ) -> Vec<Report> {
        let next = AtomicUsize::new(0);
        let slots: Mutex<Vec<Option<Report>>> = Mutex::new(vec![None; scenarios.len()]);
        thread::scope(|scope| {
            for _ in 0..jobs.clamp(1, scenarios.len().max(1)) {
                scope.spawn(|| {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(scenario) = scenarios.get(index) else {
                            break;
                        };
                        let report = self.run(scenario);
                        on_done(&report);
                        slots.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(report);
                    }
                });
            }
        });
        slots
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Times `spans` while `run` runs (QEMU, spawned at `start`): a thread reads the serial log
/// `log` every [`WALL_CLOCK_POLL`] and notes when each span's lines appear; once `run` is done
/// the rest of the log is read (lines only seen then are timed at that moment). Returns `run`'s
/// result and each span's duration.
fn timed<T>(
    log: &Path,
    spans: &[WallClock],
    start: Instant,
    run: impl FnOnce() -> T,
) -> (T, Vec<Option<Duration>>) {
    if spans.is_empty() {
        return (run(), Vec::new());
    }
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let stop = &stop;
        let watcher = scope.spawn(move || {
            let mut clock = SpanClock::new(spans);
            let mut offset = 0;
            loop {
                // Read the stop flag before the log: the last read then sees everything.
                let last = stop.load(Ordering::Acquire);
                if let Ok(mut f) = fs::File::open(log) {
                    use std::io::Seek;
                    let mut chunk = Vec::new();
                    if f.seek(io::SeekFrom::Start(offset)).is_ok()
                        && f.read_to_end(&mut chunk).is_ok()
                    {
                        offset += chunk.len() as u64;
                        clock.feed(&chunk, start.elapsed());
                    }
                }
                if last {
                    break;
                }
                thread::sleep(WALL_CLOCK_POLL);
            }
            clock.spans()
        });
        let result = run();
        stop.store(true, Ordering::Release);
        let spans = watcher.join().unwrap_or_else(|_| vec![None; spans.len()]);
        (result, spans)
    })
}

/// Notes when the lines of some [`WallClock`] spans appear in a serial log fed to it in
/// chunks, each chunk stamped with the time it was read.
struct SpanClock<'a> {
    spans: &'a [WallClock],
    /// Per span: when its `from` line appeared (zero without `from`: QEMU's start), and when
    /// its `to` line did.
    from: Vec<Option<Duration>>,
    to: Vec<Option<Duration>>,
    /// The last, unfinished line.
    partial: Vec<u8>,
}

impl<'a> SpanClock<'a> {
    fn new(spans: &'a [WallClock]) -> Self {
        Self {
            spans,
            from: spans
                .iter()
                .map(|s| s.from.is_none().then_some(Duration::ZERO))
                .collect(),
            to: vec![None; spans.len()],
            partial: Vec::new(),
        }
    }

    /// Feeds the log's next bytes, read at `now` (since QEMU's start).
    fn feed(&mut self, chunk: &[u8], now: Duration) {
        self.partial.extend_from_slice(chunk);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in serial_lines(&complete) {
            for (k, span) in self.spans.iter().enumerate() {
                if self.from[k].is_none() && span.from.as_ref().is_some_and(|r| r.is_match(&line)) {
                    self.from[k] = Some(now);
                }
                if self.from[k].is_some() && self.to[k].is_none() && span.to.is_match(&line) {
                    self.to[k] = Some(now);
                }
            }
        }
    }

    /// Each span's duration, if both its lines appeared.
    fn spans(&self) -> Vec<Option<Duration>> {
        self.from
            .iter()
            .zip(&self.to)
            .map(|(from, to)| Some(to.as_ref()?.saturating_sub(*from.as_ref()?)))
            .collect()
    }
}

/// How far a run's scripted input got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct InputRun {
    /// The 1-based serial line where each step matched, in step order.
    matched: Vec<usize>,
    /// How many steps were written in full (the first `sent`).
    sent: usize,
}

/// Runs a spawned QEMU whose serial port is its stdio (both piped): copies the serial output to
/// `log`, writes the input `steps` as they become due, and waits for QEMU with the hard
/// `timeout`. Returns once QEMU is gone, reaped, and both helper threads have ended (see the
/// module documentation).
fn run_scripted(
    child: &mut Child,
    log: fs::File,
    steps: &[Step],
    timeout: Duration,
) -> io::Result<(Outcome, InputRun)> {
    let missing = |what| io::Error::other(format!("QEMU's {what} is not piped"));
    let stdout = child.stdout.take().ok_or_else(|| missing("stdout"))?;
    let stdin = child.stdin.take().ok_or_else(|| missing("stdin"))?;
    let matcher = StepMatcher::new(steps.iter().map(|s| s.after.clone()).collect());
    let sent = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let (due, due_rx) = mpsc::channel();
        let reader = scope.spawn(move || copy_serial(stdout, log, matcher, &due));
        let (sent, stop) = (&sent, &stop);
        let writer = scope.spawn(move || write_steps(stdin, steps, due_rx, sent, stop));
        let outcome = wait_with_timeout(child, timeout);
        if outcome.is_err() {
            // Never leave QEMU running: the reader would wait for its output forever.
            let _ = child.kill();
            let _ = child.wait();
        }
        stop.store(true, Ordering::Relaxed);
        let panicked = |_| io::Error::other("a serial thread panicked");
        let copied = reader.join().map_err(panicked);
        writer.join().map_err(panicked)?;
        let matched = copied??;
        Ok((
            outcome?,
            InputRun {
                matched,
                sent: sent.load(Ordering::Relaxed),
            },
        ))
    })
}

/// The reader: copies QEMU's serial output to `log` until end of file and sends the steps it
/// makes due to `due`. Returns where each step matched. A failed log write is returned at the
/// end; reading goes on until then so that QEMU is never blocked on a full pipe.
fn copy_serial(
    mut stdout: ChildStdout,
    mut log: fs::File,
    mut matcher: StepMatcher,
    due: &mpsc::Sender<usize>,
) -> io::Result<Vec<usize>> {
    let mut buf = [0; 4096];
    let mut log_error = None;
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        if log_error.is_none()
            && let Err(e) = log.write_all(chunk)
        {
            log_error = Some(e);
        }
        for step in matcher.feed(chunk) {
            // The writer is gone only if it failed to write: nothing more will be sent.
            let _ = due.send(step);
        }
    }
    match log_error {
        Some(e) => Err(io::Error::new(
            e.kind(),
            format!("writing the serial log: {e}"),
        )),
        None => Ok(matcher.matched().to_vec()),
    }
}

/// The writer: writes each due step (indices from `due`, in order) to QEMU's stdin after its
/// delay, [`INPUT_BYTE_PAUSE`] between bytes, and counts the steps written in full in `sent`.
/// Ends when `due` is closed, when `stop` is set, or at the first failed write.
fn write_steps(
    mut stdin: ChildStdin,
    steps: &[Step],
    due: mpsc::Receiver<usize>,
    sent: &AtomicUsize,
    stop: &AtomicBool,
) {
    // Sleeps `d` in short slices; false if told to stop meanwhile.
    let pause = |d: Duration| {
        let end = Instant::now() + d;
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            thread::sleep((end - now).min(Duration::from_millis(10)));
        }
    };
    while let Ok(index) = due.recv() {
        let Some(step) = steps.get(index) else {
            return;
        };
        if !pause(step.delay) {
            return;
        }
        for (i, byte) in step.send.iter().enumerate() {
            if (i > 0 && !pause(INPUT_BYTE_PAUSE)) || stdin.write_all(&[*byte]).is_err() {
                return;
            }
        }
        if stdin.flush().is_err() {
            return;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a finished process ended.
fn outcome(status: ExitStatus) -> Outcome {
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited(code),
        (None, Some(signal)) => Outcome::Signaled(signal),
        (None, None) => Outcome::Signaled(0),
    }
}

/// Waits for `child`; kills it with SIGKILL and reaps it once `timeout` has passed.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> io::Result<Outcome> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(outcome(status));
        }
        let now = Instant::now();
        if now >= deadline {
            // It may exit on its own between `try_wait` and `kill`; its status tells.
            let _ = child.kill();
            let status = child.wait()?;
            return Ok(match outcome(status) {
                Outcome::Signaled(SIGKILL) => Outcome::TimedOut(timeout),
                other => other,
            });
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn exit_status_is_reported() {
        let mut child = Command::new("sh").args(["-c", "exit 35"]).spawn().unwrap();
        let outcome = wait_with_timeout(&mut child, Duration::from_secs(3600)).unwrap();
        assert_eq!(outcome, Outcome::Exited(35));
    }

    #[test]
    fn death_by_signal_is_reported() {
        let mut child = Command::new("sh")
            .args(["-c", "kill -TERM $$"])
            .spawn()
            .unwrap();
        let outcome = wait_with_timeout(&mut child, Duration::from_secs(3600)).unwrap();
        assert_eq!(outcome, Outcome::Signaled(15));
    }

    #[test]
    fn a_process_that_never_ends_is_killed_and_reaped() {
        // `cat` waits for its stdin, which stays open until the child has been killed.
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let outcome = wait_with_timeout(&mut child, Duration::ZERO).unwrap();
        assert_eq!(outcome, Outcome::TimedOut(Duration::ZERO));
        // Reaped: nothing left to wait for.
        assert!(child.try_wait().unwrap().is_some());
    }

    /// Runs `script` under `sh` as a stand-in for QEMU with scripted input; returns how it
    /// ended, how far the input got and the log.
    fn scripted(
        script: &str,
        steps: &[(&str, &str)],
        timeout: Duration,
    ) -> (Outcome, InputRun, String) {
        let dir = std::env::temp_dir().join(format!(
            "rustyvisor-tests-scripted-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("serial.log");
        let log = fs::File::create(&log_path).unwrap();
        let steps: Vec<Step> = steps
            .iter()
            .map(|(after, send)| Step {
                after: regex::Regex::new(after).unwrap(),
                send: crate::input::decode_escapes(send).unwrap(),
                delay: Duration::ZERO,
            })
            .collect();
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (outcome, input) = run_scripted(&mut child, log, &steps, timeout).unwrap();
        assert!(child.try_wait().unwrap().is_some(), "not reaped");
        let text = fs::read_to_string(&log_path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        (outcome, input, text)
    }

    #[test]
    fn scripted_input_answers_the_output() {
        let script = "echo 'boot'; echo 'login:'; read a; echo \"got $a\"; \
                      echo 'next:'; read b; echo \"got $b\"; exit 33";
        let (outcome, input, log) = scripted(
            script,
            &[("^login:$", "\\x41\\x01\\n"), ("^next:", "two\\r\\n")],
            Duration::from_secs(60),
        );
        assert_eq!(outcome, Outcome::Exited(33));
        assert_eq!(
            input,
            InputRun {
                matched: vec![2, 4],
                sent: 2
            }
        );
        assert_eq!(log, "boot\nlogin:\ngot A\x01\nnext:\ngot two\r\n");
    }

    #[test]
    fn scripted_output_is_logged_completely() {
        // 4 MiB in one go, far more than a pipe holds, then a line a step waits for.
        let script = "head -c 4194304 /dev/zero | tr '\\0' 'x'; echo; echo done; read a; \
                      echo \"$a\"; exit 33";
        let (outcome, input, log) =
            scripted(script, &[("^done$", "bye\\n")], Duration::from_secs(60));
        assert_eq!(outcome, Outcome::Exited(33));
        assert_eq!(input.sent, 1);
        assert_eq!(log.len(), 4194304 + "\ndone\nbye\n".len());
        assert!(log.ends_with("x\ndone\nbye\n"));
    }

    #[test]
    fn scripted_input_that_is_never_due_ends_at_the_timeout_or_the_exit() {
        // Still running, its output open: killed and reaped at the timeout.
        let (outcome, input, log) = scripted(
            "echo waiting; read a; echo never",
            &[("^prompt", "x\\n")],
            Duration::from_millis(300),
        );
        assert_eq!(outcome, Outcome::TimedOut(Duration::from_millis(300)));
        assert_eq!(input, InputRun::default());
        assert_eq!(log, "waiting\n");
        // Gone before the line it waits for.
        let (outcome, input, _) = scripted(
            "echo early; exit 1",
            &[("^early", "a\\n"), ("^late", "b\\n")],
            Duration::from_secs(60),
        );
        assert_eq!(outcome, Outcome::Exited(1));
        assert_eq!(input.matched, [1]);
        assert!(input.sent <= 1);
    }

    fn span(name: &str, from: Option<&str>, to: &str) -> WallClock {
        WallClock {
            name: name.into(),
            from: from.map(|f| regex::Regex::new(f).unwrap()),
            to: regex::Regex::new(to).unwrap(),
        }
    }

    #[test]
    fn span_clock_times_lines_as_they_are_read() {
        let spans = [
            span("up", None, "^UP$"),
            span("guest", Some("^HOST$"), "^UP$"),
            span("never", Some("^UP$"), "^HOST$"),
            span("same", Some("^UP"), "UP$"),
        ];
        let mut clock = SpanClock::new(&spans);
        let s = Duration::from_secs;
        clock.feed(b"boot\r\nHO", s(1));
        // `HOST` is complete only in the next chunk: timed then.
        clock.feed(b"ST\r\nU", s(3));
        clock.feed(b"P\r\n", s(10));
        clock.feed(b"UP\r\nHOST\n", s(12));
        assert_eq!(
            clock.spans(),
            [Some(s(10)), Some(s(7)), Some(s(2)), Some(s(0))]
        );
        // A `to` line before its `from` does not count; an unfinished line is not a line.
        let spans = [span("a", Some("^B"), "^A"), span("b", None, "^C")];
        let mut clock = SpanClock::new(&spans);
        clock.feed(b"A\nB\nC", s(5));
        assert_eq!(clock.spans(), [None, None]);
    }

    #[test]
    fn timed_reads_the_log_while_the_run_goes_on() {
        let dir =
            std::env::temp_dir().join(format!("rustyvisor-tests-timed-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        fs::write(&log, "").unwrap();
        let spans = [
            span("first", None, "^one$"),
            span("gap", Some("^one$"), "^two$"),
        ];
        let start = Instant::now();
        let (value, got) = timed(&log, &spans, start, || {
            thread::sleep(Duration::from_millis(200));
            fs::write(&log, "one\n").unwrap();
            thread::sleep(Duration::from_millis(300));
            fs::write(&log, "one\ntwo\n").unwrap();
            7
        });
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(value, 7);
        let first = got[0].unwrap();
        let gap = got[1].unwrap();
        assert!(
            first >= Duration::from_millis(200) && first < Duration::from_millis(480),
            "{first:?}"
        );
        // `two` is only seen by the last read, after the run.
        assert!(gap >= Duration::from_millis(280), "{gap:?}");
        assert_eq!(timed(&log, &[], start, || 1), (1, vec![]));
    }

    #[test]
    fn failure_details_show_reasons_tail_and_reproduction() {
        let report = Report {
            name: "smp4".into(),
            duration: Duration::from_secs(2),
            failures: vec![Failure::WrongExit {
                got: 0,
                expected: 33,
            }],
            lines: (1..=49)
                .map(|i| format!("line {i}"))
                .chain(["forged\rline 50\x1b[2K".to_string()])
                .collect(),
            log: "/t/qemu/smp4.log".into(),
            qemu_log: "/t/qemu/smp4.qemu.log".into(),
            qemu_output: "qemu-system-x86_64: warning: x\n".into(),
            reproduce: "cargo xtask run --smp 4".into(),
            wall_clock: Vec::new(),
        };
        assert!(!report.passed());
        let text = report.details(40);
        assert!(text.contains("wrong exit code 0"), "{text}");
        assert!(text.contains("smp4: FAILED after 2.0s"), "{text}");
        assert!(text.contains("(50 lines, last 40 shown)"), "{text}");
        assert!(
            text.contains("   50 | forged\\rline 50\\x1b[2K\n"),
            "{text}"
        );
        assert!(text.contains("   11 | line 11\n"), "{text}");
        assert!(!text.contains("| line 10\n"), "{text}");
        assert!(
            text.contains("QEMU said:\n    qemu-system-x86_64: warning: x"),
            "{text}"
        );
        assert!(
            text.contains("reproduce: cargo xtask run --smp 4"),
            "{text}"
        );
    }
}
