//! Scenarios: one boot of the hypervisor in QEMU and what its serial log and exit status must
//! look like, read from `tests/scenarios/*.toml`.
//!
//! A file holds any number of `[[scenario]]` tables, an optional `[defaults]` table (the same
//! keys, applied to every scenario of that file) and an optional `[patterns]` table of named
//! pattern lists. An entry of `expect`, of a list in `expect_each`, of `forbid` or of a pattern
//! list written as `"@name"` stands for the list called `name`; pattern lists may be defined in
//! any file of the directory. `input` is the scripted serial input ([`crate::input`]). See
//! `docs/testing.md`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::err;
use crate::error::{Context, Error, Result};
use crate::image::GuestSpec;
use crate::input::{Step, decode_escapes};
use crate::qemu::{Accel, Boot, DirectKernel, EXIT_SUCCESS, Firmware, Machine, Qemu, Serial};
use crate::verdict::Expectations;

/// `forbid` of a scenario that sets none: any panic or CPU exception fails the run.
pub const DEFAULT_FORBID: [&str; 2] = ["PANIC", "EXCEPTION"];
/// Whether a `DONE:` pattern names literal counts (`DONE: 43 passed, 0 failed`).
fn pinned_count(pattern: &str) -> bool {
    pattern.split_once("DONE: ").is_some_and(|(_, rest)| {
        let mut words = rest.split(' ');
        let literal = |w: Option<&str>| {
            w.is_some_and(|w| {
                let w = w.trim_end_matches(',');
                !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit())
            })
        };
        literal(words.next())
            && words.next() == Some("passed,")
            && literal(words.next())
            && words.next().is_some_and(|w| w.starts_with("failed"))
    })
}

/// `timeout_secs` of a scenario that sets none.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// One scenario, validated.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Unique name: log files are `<target>/qemu/<name>.log`.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// What it checks, for people.
    pub description: Option<String>,
    /// Hypervisor command line.
    pub cmdline: String,
    /// Guest modules, in order (`--guest` syntax; paths are relative to the workspace root).
    pub guests: Vec<GuestSpec>,
    /// The virtual machine.
    pub machine: Machine,
    /// What the run must show.
    pub expectations: Expectations,
    /// Scripted serial input, in order (empty: the serial port only logs, as `-serial file:`).
    pub input: Vec<Step>,
    /// Hard limit on the run; QEMU is killed after it.
    pub timeout: Duration,
    /// Files outside the repository the scenario needs (paths relative to the workspace
    /// root, e.g. the Linux guest kit in `../shared/linux-guest`): without one of them the
    /// scenario is skipped, and says so, rather than failed.
    pub requires: Vec<PathBuf>,
    /// `kernel` (with `initrd`, `append`): QEMU boots this Linux kernel itself instead of our
    /// ISO (paths relative to the workspace root); `cmdline` and `guests` are then empty.
    pub direct: Option<DirectKernel>,
    /// Wall-clock spans the runner times while QEMU runs (benches), in the order written.
    pub wall_clock: Vec<WallClock>,
}

/// A wall-clock span of a run: from QEMU's start (or the first line matching `from`) to the
/// first line matching `to` (at or after it). The runner notes when each line appears in the
/// serial log (it polls the log, [`crate::runner::WALL_CLOCK_POLL`] apart); the bench reports
/// the span as metric `name`, in seconds.
#[derive(Debug, Clone)]
pub struct WallClock {
    /// The metric (`<metric>` or `<metric>.<stage>`, as in `bench:` lines).
    pub name: String,
    /// Where the span starts; `None`: when QEMU is spawned.
    pub from: Option<Regex>,
    /// Where it ends.
    pub to: Regex,
}

impl Scenario {
    /// The first of [`Self::requires`] that does not exist below `root`.
    pub fn missing_requirement(&self, root: &Path) -> Option<PathBuf> {
        self.requires
            .iter()
            .find(|p| !root.join(p).exists())
            .cloned()
    }
}

impl Scenario {
    /// The `cargo xtask run` command that boots the same image interactively. A scenario that
    /// boots a deliberately bad command line or guest spec gets `--no-check`, which `run` needs
    /// to let it through.
    pub fn run_command(&self) -> String {
        if let Some(direct) = &self.direct {
            // Not our image: the QEMU command itself, run from the workspace root.
            return Qemu {
                machine: self.machine.clone(),
                uefi: None,
                boot: Boot::Kernel(direct.clone()),
                serial: Serial::Stdio,
                debug_log: None,
                gdb: false,
            }
            .command_line();
        }
        let mut words = vec!["cargo".to_string(), "xtask".into(), "run".into()];
        if crate::image::check_cmdline(&self.cmdline).is_err()
            || self.guests.iter().any(|g| g.check().is_err())
        {
            words.push("--no-check".into());
        }
        if !self.cmdline.is_empty() {
            words.extend(["--cmdline".into(), self.cmdline.clone()]);
        }
        for guest in &self.guests {
            words.extend(["--guest".into(), guest.spec_string()]);
        }
        let m = &self.machine;
        if m.firmware == Firmware::Uefi {
            words.push("--uefi".into());
        }
        if m.accel == Accel::Kvm {
            words.push("--kvm".into());
        }
        if m.smp != 1 {
            words.extend(["--smp".into(), m.smp.to_string()]);
        }
        if m.memory != crate::qemu::DEFAULT_MEMORY {
            words.extend(["--mem".into(), crate::qemu::memory_arg(m.memory)]);
        }
        if m.icount || m.cpu.is_some() || !m.extra_args.is_empty() {
            words.push("--".into());
            if m.icount {
                words.extend(["-icount".into(), "shift=0".into()]);
            }
            if let Some(cpu) = &m.cpu {
                // QEMU takes the last `-cpu`.
                words.extend(["-cpu".into(), cpu.clone()]);
            }
            words.extend(m.extra_args.iter().cloned());
        }
        words
            .iter()
            .map(|w| crate::shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A scenario table as written; every key is optional so `[defaults]` can share the type.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    description: Option<String>,
    cmdline: Option<String>,
    guests: Option<Vec<String>>,
    firmware: Option<String>,
    memory: Option<String>,
    smp: Option<u32>,
    accel: Option<String>,
    icount: Option<bool>,
    cpu: Option<String>,
    qemu_args: Option<Vec<String>>,
    expect: Option<Vec<String>>,
    expect_each: Option<Vec<Vec<String>>>,
    forbid: Option<Vec<String>>,
    exit_code: Option<i32>,
    timeout_secs: Option<u64>,
    also_with: Option<Vec<String>>,
    input: Option<Vec<RawStep>>,
    requires: Option<Vec<String>>,
    kernel: Option<String>,
    initrd: Option<String>,
    append: Option<String>,
    wall_clock: Option<Vec<RawWallClock>>,
}

/// One `wall_clock` span as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWallClock {
    name: String,
    from: Option<String>,
    to: String,
}

/// One `input` step as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    after: String,
    send: String,
    delay_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    patterns: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    defaults: RawScenario,
    #[serde(default)]
    scenario: Vec<RawScenario>,
}

/// Loads every `*.toml` in `dir`, in file-name order. A missing directory holds no scenarios.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .context(|| format!("reading {}", dir.display()))?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    paths.sort();
    let files = paths
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).context(|| format!("reading {}", p.display()))?;
            Ok((p, text))
        })
        .collect::<Result<Vec<_>>>()?;
    parse_files(&files)
}

/// Parses and validates scenario files given as (path, contents).
pub fn parse_files(files: &[(PathBuf, String)]) -> Result<Vec<Scenario>> {
    let mut parsed = Vec::new();
    let mut patterns: BTreeMap<String, (Vec<String>, &Path)> = BTreeMap::new();
    for (path, text) in files {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            err!(
                "{}: {}",
                path.display(),
                e.to_string().trim_end().replace('\n', "\n    ")
            )
        })?;
        for (name, list) in &raw.patterns {
            if let Some((_, other)) = patterns.get(name) {
                return Err(err!(
                    "{}: pattern list `{name}` is already defined in {}",
                    path.display(),
                    other.display()
                ));
            }
            patterns.insert(name.clone(), (list.clone(), path));
        }
        if raw.defaults.name.is_some() {
            return Err(err!(
                "{}: [defaults] cannot set `name`: every scenario has its own",
                path.display()
            ));
        }
        parsed.push((path, raw));
    }
    let patterns: BTreeMap<&str, &[String]> = patterns
        .iter()
        .map(|(k, (v, _))| (k.as_str(), v.as_slice()))
        .collect();
    let mut scenarios: Vec<Scenario> = Vec::new();
    for (path, raw) in parsed {
        for table in &raw.scenario {
            let scenario = build(path, table, &raw.defaults, &patterns)?;
            let also = table
                .also_with
                .clone()
                .or_else(|| raw.defaults.also_with.clone())
                .unwrap_or_default();
            if scenario.direct.is_some() && !also.is_empty() {
                return Err(err!(
                    "{}: scenario `{}`: also_with appends to the hypervisor's command line; \
                     a `kernel` boot has none",
                    path.display(),
                    scenario.name
                ));
            }
            let variants = also
                .iter()
                .map(|extra| variant(&scenario, extra).map_err(|e| err!("{}: {e}", path.display())))
                .collect::<Result<Vec<_>>>()?;
            for scenario in std::iter::once(scenario).chain(variants) {
                if let Some(other) = scenarios.iter().find(|s| s.name == scenario.name) {
                    return Err(err!(
                        "{}: scenario `{}` is already defined in {}",
                        path.display(),
                        scenario.name,
                        other.file.display()
                    ));
                }
                scenarios.push(scenario);
            }
        }
    }
    Ok(scenarios)
}

/// The scenario `base` once more with `extra` appended to its hypervisor command line and
/// everything else the same (`also_with = ["fastpath=off"]`: the same expectations must hold
/// either way). Its name is the base name, `-`, and `extra` with every character that may not
/// stand in a name turned into `-` (`guest-hello-fastpath-off`).
fn variant(base: &Scenario, extra: &str) -> std::result::Result<Scenario, String> {
    let extra = extra.trim();
    if extra.is_empty() {
        return Err(format!(
            "scenario `{}`: also_with has an empty entry",
            base.name
        ));
    }
    let slug: String = extra
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut v = base.clone();
    v.name = format!("{}-{slug}", base.name);
    v.cmdline = if base.cmdline.trim().is_empty() {
        extra.to_string()
    } else {
        format!("{} {extra}", base.cmdline.trim_end())
    };
    v.description = Some(format!(
        "{} (with `{extra}`)",
        base.description.as_deref().unwrap_or(&base.name)
    ));
    Ok(v)
}

/// Appends the patterns `entry` stands for: itself, or the contents of the list `@name`
/// (which may refer to other lists in turn).
fn expand<'a>(
    entry: &'a str,
    patterns: &BTreeMap<&str, &'a [String]>,
    depth: usize,
    out: &mut Vec<&'a str>,
) -> std::result::Result<(), String> {
    let Some(name) = entry.strip_prefix('@') else {
        out.push(entry);
        return Ok(());
    };
    if depth >= 16 {
        return Err(format!("pattern list `{entry}` refers to itself"));
    }
    let list = patterns.get(name).ok_or_else(|| {
        let known: Vec<&str> = patterns.keys().copied().collect();
        format!(
            "unknown pattern list `{entry}` (defined: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )
    })?;
    list.iter()
        .try_for_each(|e| expand(e, patterns, depth + 1, out))
}

/// Merges a scenario table with its file's defaults and validates it.
fn build(
    path: &Path,
    s: &RawScenario,
    d: &RawScenario,
    patterns: &BTreeMap<&str, &[String]>,
) -> Result<Scenario> {
    let name = s
        .name
        .clone()
        .ok_or_else(|| err!("{}: a [[scenario]] has no `name`", path.display()))?;
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid_name {
        return Err(err!(
            "{}: scenario name `{name}` must be lowercase letters, digits, `-` and `_`",
            path.display()
        ));
    }
    let fail = |what: String| err!("{}: scenario `{name}`: {what}", path.display());
    // The scenario's own value, else the file's default.
    macro_rules! pick {
        ($key:ident) => {
            s.$key.clone().or_else(|| d.$key.clone())
        };
    }

    let firmware: Firmware = pick!(firmware)
        .map(|f: String| f.parse())
        .transpose()
        .map_err(|e: Error| fail(e.to_string()))?
        .unwrap_or_default();
    let accel: Accel = pick!(accel)
        .map(|a: String| a.parse())
        .transpose()
        .map_err(|e: Error| fail(e.to_string()))?
        .unwrap_or_default();
    let memory = match pick!(memory) {
        Some(m) => {
            let m: String = m;
            crate::qemu::parse_memory(&m).map_err(|e| fail(format!("memory = {e}")))?
        }
        None => crate::qemu::DEFAULT_MEMORY,
    };
    let smp: u32 = pick!(smp).unwrap_or(1);
    if !(1..=255).contains(&smp) {
        return Err(fail(format!("smp = {smp} is not between 1 and 255")));
    }
    let exit_code: i32 = pick!(exit_code).unwrap_or(EXIT_SUCCESS);
    if !(0..=255).contains(&exit_code) {
        return Err(fail(format!(
            "exit_code = {exit_code} is not between 0 and 255"
        )));
    }
    let timeout_secs: u64 = pick!(timeout_secs).unwrap_or(DEFAULT_TIMEOUT_SECS);
    if timeout_secs == 0 {
        return Err(fail("timeout_secs must be at least 1".into()));
    }
    let guests = pick!(guests)
        .unwrap_or_default()
        .iter()
        .map(|g: &String| GuestSpec::parse(g))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| fail(e.to_string()))?;
    let expect = pick!(expect).unwrap_or_default();
    let expect_each = pick!(expect_each).unwrap_or_default();
    // A test guest's summary must name its exact count: `DONE: \d+ passed` would pass a guest
    // that stopped after its first check.
    for (key, list) in std::iter::once(("expect".to_string(), &expect)).chain(
        expect_each
            .iter()
            .enumerate()
            .map(|(k, list)| (format!("expect_each #{}", k + 1), list)),
    ) {
        if let Some(loose) = list
            .iter()
            .find(|p| p.contains("DONE:") && !pinned_count(p))
        {
            return Err(fail(format!(
                "{key}: `{loose}` must pin the exact count, e.g. `DONE: 43 passed, 0 failed$`"
            )));
        }
    }
    let forbid =
        pick!(forbid).unwrap_or_else(|| DEFAULT_FORBID.iter().map(|p| p.to_string()).collect());
    let regexes = |key: &str, list: &[String]| -> Result<Vec<Regex>> {
        let mut expanded = Vec::new();
        for entry in list {
            expand(entry, patterns, 0, &mut expanded).map_err(|e| fail(format!("{key}: {e}")))?;
        }
        expanded
            .into_iter()
            .map(|pattern| {
                Regex::new(pattern).map_err(|e| {
                    fail(format!(
                        "{key}: bad regex `{pattern}`: {}",
                        e.to_string().replace('\n', "\n    ")
                    ))
                })
            })
            .collect()
    };
    let expect_each = expect_each
        .iter()
        .enumerate()
        .map(|(k, list)| {
            let key = format!("expect_each #{}", k + 1);
            let stream = regexes(&key, list)?;
            if stream.is_empty() {
                return Err(fail(format!("{key}: the list has no patterns")));
            }
            Ok(stream)
        })
        .collect::<Result<Vec<_>>>()?;
    let input = pick!(input)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(k, step): (usize, &RawStep)| {
            let key = format!("input step {}", k + 1);
            let after = Regex::new(&step.after).map_err(|e| {
                fail(format!(
                    "{key}: bad regex `{}`: {}",
                    step.after,
                    e.to_string().replace('\n', "\n    ")
                ))
            })?;
            let send = decode_escapes(&step.send).map_err(|e| fail(format!("{key}: {e}")))?;
            if send.is_empty() {
                return Err(fail(format!("{key}: `send` is empty")));
            }
            Ok(Step {
                after,
                send,
                delay: Duration::from_millis(step.delay_ms.unwrap_or(0)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let requires: Vec<PathBuf> = pick!(requires)
        .unwrap_or_default()
        .iter()
        .map(|p: &String| PathBuf::from(p))
        .collect();
    let cpu: Option<String> = pick!(cpu);
    if let Some(model) = &cpu
        && (model.is_empty()
            || !model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        return Err(fail(format!(
            "cpu = \"{model}\" is not a QEMU CPU model name (e.g. \"qemu64\")"
        )));
    }
    let cmdline = pick!(cmdline).unwrap_or_default();
    let direct = match pick!(kernel) {
        None => {
            for (key, set) in [
                ("initrd", pick!(initrd).is_some()),
                ("append", pick!(append).is_some()),
            ] {
                if set {
                    return Err(fail(format!(
                        "`{key}` is for a `kernel` QEMU boots itself; guests take \
                         `initrd=PATH` in their spec"
                    )));
                }
            }
            None
        }
        Some(kernel) => {
            let kernel: String = kernel;
            if kernel.trim().is_empty() {
                return Err(fail("`kernel` is empty".into()));
            }
            if !guests.is_empty() || !cmdline.trim().is_empty() {
                return Err(fail(
                    "`kernel` boots a kernel without the hypervisor: it takes no `guests` \
                     and no `cmdline` (use `append` for the kernel's command line)"
                        .into(),
                ));
            }
            if firmware == Firmware::Uefi {
                return Err(fail(
                    "`kernel` boots are BIOS boots (QEMU's own loader)".into(),
                ));
            }
            Some(DirectKernel {
                kernel: PathBuf::from(kernel),
                initrd: pick!(initrd).map(|i: String| PathBuf::from(i)),
                append: pick!(append).unwrap_or_default(),
            })
        }
    };
    let mut wall_clock: Vec<WallClock> = Vec::new();
    for (k, span) in pick!(wall_clock).unwrap_or_default().iter().enumerate() {
        let span: &RawWallClock = span;
        let key = format!("wall_clock #{}", k + 1);
        let (metric, stage) = match span.name.split_once('.') {
            Some((m, s)) => (m, Some(s)),
            None => (span.name.as_str(), None),
        };
        let word = |w: &str| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !word(metric) || !stage.is_none_or(word) {
            return Err(fail(format!(
                "{key}: name `{}` must be <metric> or <metric>.<stage> (lowercase letters, \
                 digits, `_`)",
                span.name
            )));
        }
        if wall_clock.iter().any(|w| w.name == span.name) {
            return Err(fail(format!("{key}: `{}` is timed twice", span.name)));
        }
        let regex = |pattern: &str| {
            Regex::new(pattern).map_err(|e| {
                fail(format!(
                    "{key}: bad regex `{pattern}`: {}",
                    e.to_string().replace('\n', "\n    ")
                ))
            })
        };
        wall_clock.push(WallClock {
            name: span.name.clone(),
            from: span.from.as_deref().map(regex).transpose()?,
            to: regex(&span.to)?,
        });
    }
    Ok(Scenario {
        requires,
        direct,
        wall_clock,
        description: pick!(description),
        cmdline,
        guests,
        machine: Machine {
            firmware,
            memory,
            smp,
            accel,
            icount: pick!(icount).unwrap_or(false),
            cpu,
            extra_args: pick!(qemu_args).unwrap_or_default(),
        },
        expectations: Expectations {
            expect: regexes("expect", &expect)?,
            expect_each,
            forbid: regexes("forbid", &forbid)?,
            exit_code,
        },
        input,
        timeout: Duration::from_secs(timeout_secs),
        file: path.to_path_buf(),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(files: &[(&str, &str)]) -> Result<Vec<Scenario>> {
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        parse_files(&files)
    }

    fn patterns(res: &[Regex]) -> Vec<&str> {
        res.iter().map(Regex::as_str).collect()
    }

    #[test]
    fn run_command_reproduces_the_scenario() {
        let s = parse(&[(
            "a.toml",
            "[[scenario]]\nname = \"a\"\ncmdline = \"exit=qemu\"\nguests = [\"hello,mem=32MiB\"]\n\
             memory = \"1536MiB\"\nsmp = 2\n\
             [[scenario]]\nname = \"b\"\ncmdline = \"exit=qemu bogus=1\"\n\
             [[scenario]]\nname = \"c\"\nguests = [\"hello,mem=5000G\"]\nmemory = \"5G\"\n",
        )])
        .unwrap();
        assert_eq!(
            s[0].run_command(),
            "cargo xtask run --cmdline exit=qemu --guest hello,mem=32MiB --smp 2 --mem 1536M"
        );
        // Deliberately bad images need `--no-check` to boot by hand.
        assert_eq!(
            s[1].run_command(),
            "cargo xtask run --no-check --cmdline 'exit=qemu bogus=1'"
        );
        assert_eq!(
            s[2].run_command(),
            "cargo xtask run --no-check --guest hello,mem=5000G --mem 5G"
        );
    }

    #[test]
    fn requires_skips_only_when_a_file_is_missing() {
        let s = parse(&[(
            "a.toml",
            "[defaults]\nrequires = [\"Cargo.toml\"]\n\
             [[scenario]]\nname = \"here\"\n\
             [[scenario]]\nname = \"gone\"\nrequires = [\"Cargo.toml\", \"no/such/file\"]\n\
             [[scenario]]\nname = \"none\"\nrequires = []\n",
        )])
        .unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(s[0].requires, [PathBuf::from("Cargo.toml")]);
        assert_eq!(s[0].missing_requirement(root), None);
        assert_eq!(
            s[1].missing_requirement(root),
            Some(PathBuf::from("no/such/file"))
        );
        assert_eq!(s[2].missing_requirement(root), None);
        let plain = parse(&[("b.toml", "[[scenario]]\nname = \"b\"\n")]).unwrap();
        assert!(plain[0].requires.is_empty());
    }

    #[test]
    fn kernel_boots_and_wall_clock_spans() {
        let s = parse(&[(
            "b.toml",
            "[defaults]\nkernel = \"../kit/bzImage\"\nmemory = \"512M\"\n\
             [[scenario]]\nname = \"native\"\ncpu = \"qemu64\"\ninitrd = \"../kit/host.cpio.gz\"\n\
             append = \"console=ttyS0 panic=-1\"\nexit_code = 0\n\
             wall_clock = [{ name = \"up\", to = '^UP$' },\n\
               { name = \"up.late\", from = '^HALF', to = '^UP$' }]\n\
             [[scenario]]\nname = \"bare\"\n",
        )])
        .unwrap();
        assert_eq!(
            s[0].direct,
            Some(DirectKernel {
                kernel: "../kit/bzImage".into(),
                initrd: Some("../kit/host.cpio.gz".into()),
                append: "console=ttyS0 panic=-1".into(),
            })
        );
        assert_eq!(s[0].machine.memory, 512 << 20);
        assert_eq!(s[0].machine.cpu.as_deref(), Some("qemu64"));
        assert_eq!(s[1].machine.cpu, None);
        let spans: Vec<(&str, Option<&str>, &str)> = s[0]
            .wall_clock
            .iter()
            .map(|w| {
                (
                    w.name.as_str(),
                    w.from.as_ref().map(Regex::as_str),
                    w.to.as_str(),
                )
            })
            .collect();
        assert_eq!(
            spans,
            [("up", None, "^UP$"), ("up.late", Some("^HALF"), "^UP$")]
        );
        // Reproduced with QEMU itself, not `cargo xtask run`.
        let cmd = s[0].run_command();
        assert!(cmd.starts_with("qemu-system-x86_64 "), "{cmd}");
        assert!(
            cmd.contains(
                " -kernel ../kit/bzImage -initrd ../kit/host.cpio.gz -append \
                          'console=ttyS0 panic=-1'"
            ),
            "{cmd}"
        );
        assert!(!cmd.contains("-cdrom"), "{cmd}");
        assert!(cmd.contains(" -cpu qemu64 "), "{cmd}");
        assert_eq!(
            s[1].direct
                .as_ref()
                .map(|d| (d.initrd.clone(), d.append.as_str())),
            Some((None, ""))
        );
        assert!(s[1].wall_clock.is_empty());
        // Not a kernel boot: no `direct`.
        let plain = parse(&[("c.toml", "[[scenario]]\nname = \"c\"\n")]).unwrap();
        assert!(plain[0].direct.is_none() && plain[0].wall_clock.is_empty());
    }

    #[test]
    fn bad_kernel_boots_and_spans_are_errors() {
        for (text, needle) in [
            ("kernel = \"k\"\nguests = [\"hello\"]", "takes no `guests`"),
            (
                "kernel = \"k\"\ncmdline = \"exit=qemu\"",
                "and no `cmdline`",
            ),
            ("kernel = \"\"", "`kernel` is empty"),
            ("cpu = \"max,+x\"", "not a QEMU CPU model name"),
            ("cpu = \"\"", "not a QEMU CPU model name"),
            ("kernel = \"k\"\nfirmware = \"uefi\"", "BIOS boots"),
            ("initrd = \"i\"", "`initrd` is for a `kernel`"),
            ("append = \"x\"", "`append` is for a `kernel`"),
            (
                "kernel = \"k\"\nalso_with = [\"x\"]",
                "a `kernel` boot has none",
            ),
            (
                "wall_clock = [{ name = \"A\", to = 'x' }]",
                "must be <metric>",
            ),
            (
                "wall_clock = [{ name = \"a.\", to = 'x' }]",
                "must be <metric>",
            ),
            (
                "wall_clock = [{ name = \"a.b.c\", to = 'x' }]",
                "must be <metric>",
            ),
            (
                "wall_clock = [{ name = \"a\", to = 'x' }, { name = \"a\", to = 'y' }]",
                "wall_clock #2: `a` is timed twice",
            ),
            (
                "wall_clock = [{ name = \"a\", to = '(' }]",
                "wall_clock #1: bad regex",
            ),
            (
                "wall_clock = [{ name = \"a\", from = '(', to = 'x' }]",
                "bad regex `(`",
            ),
            ("wall_clock = [{ name = \"a\" }]", "missing field `to`"),
        ] {
            let e = error_of(&format!("[[scenario]]\nname = \"a\"\n{text}\n"));
            assert!(e.contains(needle), "{text:?}: {needle:?} not in {e}");
        }
    }

    #[test]
    fn minimal_scenario_gets_the_defaults() {
        let s = parse(&[("a.toml", "[[scenario]]\nname = \"a\"\nexpect = [\"^x\"]\n")]).unwrap();
        let s = &s[0];
        assert_eq!(s.name, "a");
        assert_eq!(s.cmdline, "");
        assert_eq!(s.machine, Machine::default());
        assert_eq!(patterns(&s.expectations.expect), ["^x"]);
        assert_eq!(patterns(&s.expectations.forbid), ["PANIC", "EXCEPTION"]);
        assert_eq!(s.expectations.exit_code, 33);
        assert_eq!(s.timeout, Duration::from_secs(120));
    }

    #[test]
    fn defaults_patterns_and_overrides() {
        let common = r#"
            [patterns]
            boot = ["^a", "^b"]
        "#;
        let file = r#"
            [defaults]
            cmdline = "exit=qemu"
            memory = "256M"
            expect = ["@boot", "^end"]

            [[scenario]]
            name = "plain"

            [[scenario]]
            name = "fault"
            description = "a deliberate fault"
            cmdline = "exit=qemu selftest=pagefault"
            firmware = "uefi"
            smp = 4
            guests = ["hello,mem=16M", "./k.elf"]
            qemu_args = ["-d", "int"]
            expect = ["@boot", "^EXCEPTION"]
            forbid = []
            exit_code = 35
            timeout_secs = 5
        "#;
        let s = parse(&[("common.toml", common), ("f.toml", file)]).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].cmdline, "exit=qemu");
        assert_eq!(s[0].machine.memory, 256 << 20);
        assert_eq!(patterns(&s[0].expectations.expect), ["^a", "^b", "^end"]);
        let f = &s[1];
        assert_eq!(f.description.as_deref(), Some("a deliberate fault"));
        assert_eq!(f.cmdline, "exit=qemu selftest=pagefault");
        assert_eq!(f.machine.firmware, Firmware::Uefi);
        assert_eq!(f.machine.smp, 4);
        assert_eq!(f.machine.memory, 256 << 20);
        assert_eq!(f.machine.extra_args, ["-d", "int"]);
        assert_eq!(f.guests.len(), 2);
        assert_eq!(patterns(&f.expectations.expect), ["^a", "^b", "^EXCEPTION"]);
        assert!(f.expectations.forbid.is_empty());
        assert_eq!(f.expectations.exit_code, 35);
        assert_eq!(f.timeout, Duration::from_secs(5));
        assert_eq!(
            f.run_command(),
            "cargo xtask run --cmdline 'exit=qemu selftest=pagefault' --guest hello,mem=16M \
             --guest ./k.elf --uefi --smp 4 --mem 256M -- -d int"
        );
    }

    fn error_of(text: &str) -> String {
        parse(&[("tests/scenarios/x.toml", text)])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let e = error_of("[[scenario]]\nname = \"a\"\nexpct = [\"x\"]\n");
        assert!(e.starts_with("tests/scenarios/x.toml: "), "{e}");
        assert!(e.contains("expct"), "{e}");

        let e = error_of("[[scenario]]\nname = \"a\"\nexpect = [\"(unclosed\"]\n");
        assert!(
            e.starts_with("tests/scenarios/x.toml: scenario `a`: expect: bad regex `(unclosed`"),
            "{e}"
        );

        let e = error_of("[[scenario]]\nname = \"a\"\nexpect = [\"@nope\"]\n");
        assert!(e.contains("unknown pattern list `@nope`"), "{e}");

        for (text, needle) in [
            ("[[scenario]]\ndescription = \"x\"\n", "has no `name`"),
            ("[[scenario]]\nname = \"A b\"\n", "must be lowercase"),
            (
                "[[scenario]]\nname = \"a\"\nfirmware = \"efi\"\n",
                "unknown firmware",
            ),
            (
                "[[scenario]]\nname = \"a\"\naccel = \"hvf\"\n",
                "unknown accel",
            ),
            (
                "[[scenario]]\nname = \"a\"\nmemory = \"lots\"\n",
                "not a size",
            ),
            ("[[scenario]]\nname = \"a\"\nsmp = 0\n", "smp = 0"),
            (
                "[[scenario]]\nname = \"a\"\nexit_code = 300\n",
                "exit_code = 300",
            ),
            (
                "[[scenario]]\nname = \"a\"\ntimeout_secs = 0\n",
                "timeout_secs",
            ),
            (
                "[[scenario]]\nname = \"a\"\nguests = [\"a b\"]\n",
                "guest `a b`",
            ),
            ("[defaults]\nname = \"a\"\n", "cannot set `name`"),
            (
                "[[scenario]]\nname = \"a\"\n[[scenario]]\nname = \"a\"\n",
                "already defined",
            ),
            ("[[scenarios]]\nname = \"a\"\n", "scenarios"),
            ("[[scenario]]\nname = \"a\"\nsmp = \"4\"\n", "x.toml"),
        ] {
            let e = error_of(text);
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
            assert!(e.starts_with("tests/scenarios/x.toml: "), "{e}");
        }
    }

    #[test]
    fn pattern_lists_nest_but_not_in_circles() {
        let s = parse(&[(
            "a.toml",
            "[patterns]\nx = ['^x']\nxy = ['@x', '^y']\n\
             [[scenario]]\nname = \"a\"\nexpect = ['@xy', '^z']\nforbid = ['@x']\n",
        )])
        .unwrap();
        assert_eq!(patterns(&s[0].expectations.expect), ["^x", "^y", "^z"]);
        assert_eq!(patterns(&s[0].expectations.forbid), ["^x"]);
        let e = parse(&[(
            "a.toml",
            "[patterns]\nx = ['@y']\ny = ['@x']\n[[scenario]]\nname = \"a\"\nexpect = ['@x']\n",
        )])
        .unwrap_err();
        assert!(e.message().contains("refers to itself"), "{e}");
    }

    #[test]
    fn pattern_lists_must_be_unique_across_files() {
        let e = parse(&[
            ("a.toml", "[patterns]\nx = []\n"),
            ("b.toml", "[patterns]\nx = []\n"),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "b.toml: pattern list `x` is already defined in a.toml"
        );
    }

    #[test]
    fn also_with_adds_a_variant_with_the_same_expectations() {
        let text = "[defaults]\ncmdline = \"exit=qemu\"\nalso_with = [\"fastpath=off\"]\n\
                    [[scenario]]\nname = \"a\"\nexpect = ['^x']\n\
                    [[scenario]]\nname = \"b\"\nexpect = ['^y']\nalso_with = []\n";
        let s = parse(&[("a.toml", text)]).unwrap();
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "a-fastpath-off", "b"]);
        assert_eq!(s[1].cmdline, "exit=qemu fastpath=off");
        assert_eq!(patterns(&s[1].expectations.expect), ["^x"]);
        assert_eq!(s[1].expectations.exit_code, s[0].expectations.exit_code);
        // A variant whose name collides is an error like any duplicate.
        let text = "[[scenario]]\nname = \"a\"\nexpect = ['^x']\nalso_with = [\"x\"]\n\
                    [[scenario]]\nname = \"a-x\"\nexpect = ['^x']\n";
        let e = error_of(text);
        assert!(e.contains("`a-x` is already defined"), "{e}");
        assert!(
            error_of("[[scenario]]\nname = \"a\"\nexpect = ['^x']\nalso_with = [\" \"]\n")
                .contains("empty entry")
        );
    }

    #[test]
    fn expect_each_lists_expand_and_come_from_defaults() {
        let text = r#"
            [patterns]
            a-done = ['^guest a powered off', '^guest a returned all its memory']

            [defaults]
            expect_each = [['^x']]

            [[scenario]]
            name = "two"
            expect = ['^summary']
            expect_each = [
                ['^guest a: hello', '@a-done'],
                ['^guest b: hello', '^guest b powered off'],
            ]

            [[scenario]]
            name = "inherits"

            [[scenario]]
            name = "none"
            expect = ['^y']
            expect_each = []
        "#;
        let s = parse(&[("a.toml", text)]).unwrap();
        let streams = |s: &Scenario| -> Vec<Vec<String>> {
            s.expectations
                .expect_each
                .iter()
                .map(|l| l.iter().map(|r| r.as_str().to_string()).collect())
                .collect()
        };
        assert_eq!(patterns(&s[0].expectations.expect), ["^summary"]);
        assert_eq!(
            streams(&s[0]),
            [
                vec![
                    "^guest a: hello",
                    "^guest a powered off",
                    "^guest a returned all its memory"
                ],
                vec!["^guest b: hello", "^guest b powered off"],
            ]
        );
        assert_eq!(streams(&s[1]), [["^x"]]);
        assert!(s[1].expectations.expect.is_empty());
        assert!(streams(&s[2]).is_empty());

        for (text, needle) in [
            (
                "[[scenario]]\nname = \"a\"\nexpect_each = [['^a'], ['(']]\n",
                "scenario `a`: expect_each #2: bad regex `(`",
            ),
            (
                "[[scenario]]\nname = \"a\"\nexpect_each = [['@nope']]\n",
                "expect_each #1: unknown pattern list `@nope`",
            ),
            (
                "[[scenario]]\nname = \"a\"\nexpect_each = [['^a'], []]\n",
                "expect_each #2: the list has no patterns",
            ),
            (
                "[[scenario]]\nname = \"a\"\nexpect_each = ['^a']\n",
                "expect_each",
            ),
            (
                "[[scenario]]\nname = \"a\"\nexpect_each = [['DONE: \\d+ passed, 0 failed']]\n",
                "expect_each #1: `DONE: \\d+ passed, 0 failed` must pin the exact count",
            ),
        ] {
            let e = error_of(text);
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
            assert!(e.starts_with("tests/scenarios/x.toml: "), "{e}");
        }
    }

    #[test]
    fn input_steps_parse_with_escapes_and_delays() {
        let text = r#"
            [[scenario]]
            name = "console"
            cmdline = "exit=qemu"
            expect = ['^guest a: got list']
            input = [
                { after = '^guest a: ready', send = '\x01list\r' },
                { after = '^rustyvisor> ', send = 'a\\b\n', delay_ms = 250 },
                { after = 'x', send = "basic \t string\r" },
                { after = 'x', send = "\x01 is TOML 1.1" },
            ]

            [[scenario]]
            name = "plain"
            expect = ['^x']
        "#;
        let s = parse(&[("a.toml", text)]).unwrap();
        let input = &s[0].input;
        assert_eq!(input.len(), 4);
        assert_eq!(input[0].after.as_str(), "^guest a: ready");
        assert_eq!(input[0].send, b"\x01list\r");
        assert_eq!(input[0].delay, Duration::ZERO);
        assert_eq!(input[1].after.as_str(), "^rustyvisor> ");
        assert_eq!(input[1].send, b"a\\b\n");
        assert_eq!(input[1].delay, Duration::from_millis(250));
        // A TOML basic string's own escapes are decoded by TOML first; the result passes through.
        assert_eq!(input[2].send, b"basic \t string\r");
        assert_eq!(input[3].send, b"\x01 is TOML 1.1");
        assert!(s[1].input.is_empty());
        // Variants keep the input.
        let text = "[[scenario]]\nname = \"a\"\nexpect = ['^x']\nalso_with = ['y']\n\
                    input = [{ after = '^x', send = 'z' }]\n";
        let s = parse(&[("a.toml", text)]).unwrap();
        assert_eq!(s[1].input.len(), 1);

        for (text, needle) in [
            (
                "input = [{ after = '(', send = 'x' }]",
                "scenario `a`: input step 1: bad regex `(`",
            ),
            (
                "input = [{ after = 'a', send = 'x' }, { after = 'b', send = '\\q' }]",
                "input step 2: unknown escape `\\q`",
            ),
            (
                "input = [{ after = 'a', send = '\\x0' }]",
                "input step 1: `\\x0` in `\\x0` is not `\\x` and two hex digits",
            ),
            (
                "input = [{ after = 'a', send = '' }]",
                "input step 1: `send` is empty",
            ),
            ("input = [{ after = 'a' }]", "send"),
            ("input = [{ send = 'a' }]", "after"),
            ("input = [{ after = 'a', send = 'b', wait = 1 }]", "wait"),
            (
                "input = [{ after = 'a', send = 'b', delay_ms = -1 }]",
                "x.toml",
            ),
        ] {
            let e = error_of(&format!("[[scenario]]\nname = \"a\"\n{text}\n"));
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
            assert!(e.starts_with("tests/scenarios/x.toml: "), "{e}");
        }
    }

    #[test]
    fn test_guest_summaries_must_pin_their_counts() {
        for loose in [
            r"^guest g: DONE: \d+ passed, 0 failed",
            r"DONE: [0-9]+ passed, 0 failed$",
            r"DONE: 43 passed, \d+ failed",
            "DONE:",
        ] {
            let text = format!("[[scenario]]\nname = \"a\"\nexpect = ['{loose}']\n");
            let e = error_of(&text);
            assert!(e.contains("must pin the exact count"), "{loose}: {e}");
        }
        let ok = "[[scenario]]\nname = \"a\"\nexpect = ['^guest g: DONE: 43 passed, 0 failed$']\n";
        parse(&[("a.toml", ok)]).unwrap();
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let scenarios = load_dir(&dir).unwrap();
        assert!(!scenarios.is_empty(), "no scenarios in {}", dir.display());
        for s in &scenarios {
            assert!(
                !s.expectations.expect.is_empty() || !s.expectations.expect_each.is_empty(),
                "scenario `{}` expects nothing",
                s.name
            );
        }
        let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");
        load_dir(&bench).unwrap();
    }
}
