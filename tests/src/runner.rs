//! Runs scenarios: one ISO and one QEMU process each, with a hard timeout, in parallel.
//!
//! Every run leaves its files in `<target>/qemu/`:
//!
//! | file | contents |
//! |---|---|
//! | `<name>.log` | the serial log, as the hypervisor wrote it |
//! | `<name>.qemu.log` | QEMU's `-d cpu_reset,guest_errors` log (`cpu_reset` only under UEFI) |
//! | `<name>.out` | QEMU's own stdout and stderr |
//! | `<name>.cmd` | the QEMU command line |
//! | `<name>.OVMF_VARS.fd` | the UEFI variable store (UEFI scenarios) |
//!
//! and, if it failed, its image in `<target>/iso/<name>.iso` (staged in `<target>/iso-stage/<name>/`).

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::err;
use crate::error::{Context, Result};
use crate::image::{Image, ResolvedGuest};
use crate::qemu::{Accel, Firmware, Ovmf, Qemu, Serial, check_kvm};
use crate::scenario::Scenario;
use crate::verdict::{Failure, Outcome, judge, serial_lines, visible};
use crate::workspace::Workspace;

/// SIGKILL, which [`wait_with_timeout`] sends.
const SIGKILL: i32 = 9;

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
        };
        match self.boot(scenario, &report) {
            Ok((outcome, output)) => {
                report.qemu_output = output;
                report.lines = fs::read(&report.log)
                    .map(|raw| serial_lines(&raw))
                    .unwrap_or_default();
                report.failures = judge(&scenario.expectations, &report.lines, outcome);
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

    /// Builds the image and runs QEMU; returns how it ended and what it printed.
    fn boot(&self, scenario: &Scenario, report: &Report) -> Result<(Outcome, String)> {
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
        let guests = scenario
            .guests
            .iter()
            .map(|g| g.resolve(self.ws, &self.ws.root))
            .collect::<Result<Vec<ResolvedGuest>>>()?;
        let iso = self.iso(scenario);
        Image {
            name: &scenario.name,
            hypervisor: &self.hypervisor,
            cmdline: &scenario.cmdline,
            guests: &guests,
        }
        .write_iso(self.ws, &iso)?;
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
            iso,
            serial: Serial::File(report.log.clone()),
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
        let mut child = qemu
            .command()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err_out)
            .spawn()
            .context(|| format!("starting {}", crate::qemu::QEMU))?;
        let outcome = wait_with_timeout(&mut child, scenario.timeout)
            .context(|| format!("waiting for {}", crate::qemu::QEMU))?;
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        Ok((outcome, output))
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
