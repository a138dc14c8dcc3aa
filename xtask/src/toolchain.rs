//! The Rust toolchain pinned in `rust-toolchain.toml`, checked before anything is built.
//!
//! rustup installs a pinned toolchain with its targets on first use, but a machine that already
//! has the channel *without* the targets (installed by hand, or by an older rustup) fails the
//! hypervisor build with rustc's E0463 "can't find crate for `core`". So before building we read
//! `rust-toolchain.toml`, look at the toolchain's sysroot, and add what is missing with rustup;
//! without rustup, or when rustup fails, we print the exact command and stop.
//!
//! [`decide`] is the pure part (what is missing → which commands); the rest runs processes.

use std::path::Path;
use std::process::Command;

use rustyvisor_tests::err;
use rustyvisor_tests::{Result, shell_quote};
use serde::Deserialize;

use crate::prereq::on_path;

/// The toolchain file, relative to the workspace root.
pub const FILE: &str = "rust-toolchain.toml";

/// What `rust-toolchain.toml` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Toolchain {
    /// The channel, e.g. `1.95.0`.
    pub channel: String,
    /// Extra targets (the host's own is always there).
    #[serde(default)]
    pub targets: Vec<String>,
    /// Components such as `clippy`, `rustfmt`.
    #[serde(default)]
    pub components: Vec<String>,
    /// rustup profile (`minimal`, `default`, `complete`).
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Deserialize)]
struct File {
    toolchain: Toolchain,
}

/// Parses the text of `rust-toolchain.toml`.
pub fn parse(text: &str) -> Result<Toolchain> {
    toml::from_str::<File>(text)
        .map(|f| f.toolchain)
        .map_err(|e| err!("{FILE}: {}", e.to_string().trim_end()))
}

/// What an installed toolchain has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Targets with a standard library in the sysroot (`lib/rustlib/<target>/lib`).
    pub targets: Vec<String>,
    /// Component names as in `rust-toolchain.toml` (`clippy`, not `clippy-preview-<host>`);
    /// `None` when the sysroot has no rustup component list (a toolchain not from rustup).
    pub components: Option<Vec<String>>,
}

/// What to do about the toolchain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Everything is there.
    Ready,
    /// Run these rustup commands (in the workspace root), then check again.
    Install {
        /// What is missing, for the log line.
        missing: String,
        /// The commands, one argument vector each.
        commands: Vec<Vec<String>>,
    },
    /// Builds would fail: stop with this message.
    Stop(String),
    /// Builds work (only components used by fmt/clippy are missing): say so and go on.
    Warn(String),
}

/// The rustup commands that install what is missing. `installed` is `None` when the channel
/// itself is not installed.
fn commands(want: &Toolchain, installed: Option<&Installed>) -> (String, Vec<Vec<String>>) {
    let owned = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<String>>();
    let channel = want.channel.as_str();
    let Some(have) = installed else {
        let mut cmd = owned(&["rustup", "toolchain", "install", channel]);
        if let Some(profile) = &want.profile {
            cmd.extend(owned(&["--profile", profile]));
        }
        if !want.components.is_empty() {
            cmd.extend(["--component".into(), want.components.join(",")]);
        }
        if !want.targets.is_empty() {
            cmd.extend(["--target".into(), want.targets.join(",")]);
        }
        return (format!("the toolchain {channel}"), vec![cmd]);
    };
    let targets: Vec<&String> = want
        .targets
        .iter()
        .filter(|t| !have.targets.contains(t))
        .collect();
    let components: Vec<&String> = match &have.components {
        Some(list) => want
            .components
            .iter()
            .filter(|c| !list.contains(c))
            .collect(),
        None => Vec::new(),
    };
    let mut missing = Vec::new();
    let mut cmds = Vec::new();
    if !targets.is_empty() {
        let names: Vec<&str> = targets.iter().map(|t| t.as_str()).collect();
        missing.push(format!("targets {}", names.join(", ")));
        let mut cmd = owned(&["rustup", "target", "add", "--toolchain", channel]);
        cmd.extend(names.iter().map(|t| t.to_string()));
        cmds.push(cmd);
    }
    if !components.is_empty() {
        let names: Vec<&str> = components.iter().map(|c| c.as_str()).collect();
        missing.push(format!("components {}", names.join(", ")));
        let mut cmd = owned(&["rustup", "component", "add", "--toolchain", channel]);
        cmd.extend(names.iter().map(|c| c.to_string()));
        cmds.push(cmd);
    }
    (missing.join(" and "), cmds)
}

/// A command as one shell line.
fn line(cmd: &[String]) -> String {
    cmd.iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decides what to do, given what `rust-toolchain.toml` wants, what is installed (`None`: the
/// channel is not) and whether rustup is there to install things.
pub fn decide(want: &Toolchain, installed: Option<&Installed>, rustup: bool) -> Decision {
    let (missing, cmds) = commands(want, installed);
    if cmds.is_empty() {
        return Decision::Ready;
    }
    if rustup {
        return Decision::Install {
            missing,
            commands: cmds,
        };
    }
    let only_components =
        installed.is_some_and(|have| want.targets.iter().all(|t| have.targets.contains(t)));
    let lines: Vec<String> = cmds.iter().map(|c| format!("    {}", line(c))).collect();
    if only_components {
        // Builds and QEMU runs need no clippy or rustfmt.
        return Decision::Warn(format!(
            "the Rust toolchain lacks the {missing} that {FILE} lists (needed for `cargo fmt` \
             and `cargo clippy`, not for building); with rustup (https://rustup.rs) they are \
             installed by:\n{}",
            lines.join("\n")
        ));
    }
    Decision::Stop(stop_message(
        want,
        &missing,
        &lines,
        "rustup is not installed",
    ))
}

/// The one-paragraph message when we cannot install what is missing.
fn stop_message(want: &Toolchain, missing: &str, lines: &[String], why: &str) -> String {
    format!(
        "the Rust toolchain {} pinned in {FILE} lacks {missing}, so building the hypervisor \
         (x86_64-unknown-none) and the guests (i586-unknown-linux-gnu) would fail with rustc's \
         E0463 \"can't find crate for `core`\"; {why}. Install them with:\n{}\n\
         (or, with rustup, `rustup toolchain install` in the workspace root installs everything \
         {FILE} lists), then run the command again.",
        want.channel,
        lines.join("\n")
    )
}

/// Target and component names present in a sysroot, from its directory listing and rustup's
/// component list (`lib/rustlib/components`: `clippy-preview-<host>`, `rust-std-<target>`...).
pub fn installed_from(
    target_dirs: &[String],
    components_file: Option<&str>,
    host: &str,
) -> Installed {
    let components = components_file.map(|text| {
        text.lines()
            .filter_map(|l| {
                let l = l.trim();
                let name = l
                    .strip_suffix(host)
                    .and_then(|n| n.strip_suffix('-'))
                    .unwrap_or(l);
                (!name.is_empty() && !name.starts_with("rust-std"))
                    .then(|| name.strip_suffix("-preview").unwrap_or(name).to_string())
            })
            .collect()
    });
    Installed {
        targets: target_dirs.to_vec(),
        components,
    }
}

/// Runs `rustc ARGS` of the pinned toolchain (through rustup when present, so that the channel
/// of the toolchain file is the one asked; it never installs) and returns its stdout.
fn rustc(root: &Path, want: &Toolchain, rustup: bool, args: &[&str]) -> Option<String> {
    let mut cmd = if rustup {
        let mut c = Command::new("rustup");
        c.args(["run", &want.channel, "rustc"]);
        c
    } else {
        Command::new("rustc")
    };
    let out = cmd.args(args).current_dir(root).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What the pinned toolchain has, or `None` if it is not installed (or not runnable).
fn installed(root: &Path, want: &Toolchain, rustup: bool) -> Option<Installed> {
    let sysroot = rustc(root, want, rustup, &["--print", "sysroot"])?;
    let version = rustc(root, want, rustup, &["-vV"])?;
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap_or_default()
        .to_string();
    let rustlib = Path::new(&sysroot).join("lib").join("rustlib");
    let mut targets: Vec<String> = std::fs::read_dir(&rustlib)
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.path().join("lib").is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    targets.sort();
    let components = std::fs::read_to_string(rustlib.join("components")).ok();
    Some(installed_from(&targets, components.as_deref(), &host))
}

/// Makes sure the toolchain in `root/rust-toolchain.toml` has its targets and components,
/// installing them with rustup when it can.
pub fn ensure(root: &Path) -> Result<()> {
    let path = root.join(FILE);
    let text =
        std::fs::read_to_string(&path).map_err(|e| err!("reading {}: {e}", path.display()))?;
    let want = parse(&text)?;
    let rustup = on_path("rustup");
    let have = installed(root, &want, rustup);
    match decide(&want, have.as_ref(), rustup) {
        Decision::Ready => Ok(()),
        Decision::Warn(message) => {
            eprintln!("warning: {message}");
            Ok(())
        }
        Decision::Stop(message) => Err(err!("{message}")),
        Decision::Install { missing, commands } => {
            eprintln!("==> Rust toolchain {}: installing {missing}", want.channel);
            for cmd in &commands {
                eprintln!("==> {}", line(cmd));
                let ok = Command::new(&cmd[0])
                    .args(&cmd[1..])
                    .current_dir(root)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    let lines: Vec<String> = commands
                        .iter()
                        .map(|c| format!("    {}", line(c)))
                        .collect();
                    return Err(err!(
                        "{}",
                        stop_message(
                            &want,
                            &missing,
                            &lines,
                            "installing them with rustup failed"
                        )
                    ));
                }
            }
            let have = installed(root, &want, rustup);
            match decide(&want, have.as_ref(), rustup) {
                Decision::Ready | Decision::Warn(_) => Ok(()),
                Decision::Stop(message) => Err(err!("{message}")),
                Decision::Install { missing, commands } => {
                    let lines: Vec<String> = commands
                        .iter()
                        .map(|c| format!("    {}", line(c)))
                        .collect();
                    Err(err!(
                        "{}",
                        stop_message(
                            &want,
                            &missing,
                            &lines,
                            "rustup ran but they are still missing"
                        )
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED: &str = r#"
[toolchain]
channel = "1.95.0"
targets = ["x86_64-unknown-none", "i586-unknown-linux-gnu"]
components = ["clippy", "rustfmt"]
profile = "minimal"
"#;

    const HOST: &str = "x86_64-unknown-linux-gnu";

    fn want() -> Toolchain {
        parse(PINNED).unwrap()
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn have(targets: &[&str], components: &[&str]) -> Installed {
        Installed {
            targets: strings(targets),
            components: Some(strings(components)),
        }
    }

    #[test]
    fn parses_the_shipped_file() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(FILE))
                .unwrap();
        let t = parse(&text).unwrap();
        assert!(t.targets.contains(&"x86_64-unknown-none".to_string()));
        assert!(t.targets.contains(&"i586-unknown-linux-gnu".to_string()));
        assert_eq!(want().components, ["clippy", "rustfmt"]);
        assert_eq!(want().profile.as_deref(), Some("minimal"));
        assert!(
            parse("[toolchain]\n")
                .unwrap_err()
                .message()
                .contains("channel")
        );
        assert!(parse("channel = 1").is_err());
    }

    #[test]
    fn nothing_missing_is_ready() {
        let all = have(
            &[HOST, "i586-unknown-linux-gnu", "x86_64-unknown-none"],
            &["cargo", "clippy", "rustfmt"],
        );
        assert_eq!(decide(&want(), Some(&all), true), Decision::Ready);
        assert_eq!(decide(&want(), Some(&all), false), Decision::Ready);
    }

    #[test]
    fn missing_targets_are_added_with_rustup() {
        let bare = have(&[HOST], &["cargo", "clippy", "rustfmt"]);
        assert_eq!(
            decide(&want(), Some(&bare), true),
            Decision::Install {
                missing: "targets x86_64-unknown-none, i586-unknown-linux-gnu".into(),
                commands: vec![strings(&[
                    "rustup",
                    "target",
                    "add",
                    "--toolchain",
                    "1.95.0",
                    "x86_64-unknown-none",
                    "i586-unknown-linux-gnu",
                ])],
            }
        );
        let one = have(&[HOST, "x86_64-unknown-none"], &["clippy"]);
        assert_eq!(
            decide(&want(), Some(&one), true),
            Decision::Install {
                missing: "targets i586-unknown-linux-gnu and components rustfmt".into(),
                commands: vec![
                    strings(&[
                        "rustup",
                        "target",
                        "add",
                        "--toolchain",
                        "1.95.0",
                        "i586-unknown-linux-gnu"
                    ]),
                    strings(&[
                        "rustup",
                        "component",
                        "add",
                        "--toolchain",
                        "1.95.0",
                        "rustfmt"
                    ]),
                ],
            }
        );
    }

    #[test]
    fn a_missing_channel_is_installed_whole() {
        assert_eq!(
            decide(&want(), None, true),
            Decision::Install {
                missing: "the toolchain 1.95.0".into(),
                commands: vec![strings(&[
                    "rustup",
                    "toolchain",
                    "install",
                    "1.95.0",
                    "--profile",
                    "minimal",
                    "--component",
                    "clippy,rustfmt",
                    "--target",
                    "x86_64-unknown-none,i586-unknown-linux-gnu",
                ])],
            }
        );
    }

    #[test]
    fn without_rustup_missing_targets_stop_with_the_command() {
        let Decision::Stop(message) = decide(&want(), Some(&have(&[HOST], &[])), false) else {
            panic!("should stop");
        };
        assert!(
            message.contains("lacks targets x86_64-unknown-none, i586-unknown-linux-gnu"),
            "{message}"
        );
        assert!(message.contains("E0463"), "{message}");
        assert!(message.contains("rustup is not installed"), "{message}");
        assert!(
            message.contains(
                "\n    rustup target add --toolchain 1.95.0 x86_64-unknown-none i586-unknown-linux-gnu\n"
            ),
            "{message}"
        );
        assert!(
            message.contains("`rustup toolchain install` in the workspace root"),
            "{message}"
        );
        assert!(matches!(decide(&want(), None, false), Decision::Stop(_)));
    }

    #[test]
    fn without_rustup_missing_components_only_warn() {
        let no_tools = have(
            &[HOST, "x86_64-unknown-none", "i586-unknown-linux-gnu"],
            &["cargo"],
        );
        let Decision::Warn(message) = decide(&want(), Some(&no_tools), false) else {
            panic!("should warn");
        };
        assert!(message.contains("components clippy, rustfmt"), "{message}");
        // A toolchain without rustup's component list: components cannot be told; targets can.
        let distro = Installed {
            targets: strings(&[HOST, "x86_64-unknown-none", "i586-unknown-linux-gnu"]),
            components: None,
        };
        assert_eq!(decide(&want(), Some(&distro), false), Decision::Ready);
    }

    #[test]
    fn component_names_from_rustups_list() {
        let list = "clippy-preview-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-none\n\
                    rustfmt-preview-x86_64-unknown-linux-gnu\ncargo-x86_64-unknown-linux-gnu\n\
                    rust-src\nrustc-x86_64-unknown-linux-gnu\n";
        let got = installed_from(&strings(&[HOST]), Some(list), HOST);
        assert_eq!(
            got.components.unwrap(),
            strings(&["clippy", "rustfmt", "cargo", "rust-src", "rustc"])
        );
        assert_eq!(installed_from(&[], None, HOST).components, None);
    }
}
