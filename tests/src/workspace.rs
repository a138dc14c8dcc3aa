//! Where things are: the workspace root, cargo's target directory, the guest packages and the
//! build artifacts.
//!
//! The target directory comes from `cargo metadata`, so it follows `CARGO_TARGET_DIR` and
//! `build.target-dir` exactly like cargo does.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::err;
use crate::error::{Context, Result};

/// The hypervisor's package and binary name.
pub const HYPERVISOR_PACKAGE: &str = "hypervisor";
/// Target triple of the hypervisor.
pub const HYPERVISOR_TARGET: &str = "x86_64-unknown-none";
/// Target triple of the 32-bit guests.
pub const GUEST_TARGET: &str = "i586-unknown-linux-gnu";

/// Cargo profile of a hypervisor build. Guests are always built with `--release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `--release` (the default everywhere).
    Release,
    /// The dev profile (`--debug`).
    Debug,
}

impl Profile {
    /// The directory cargo puts this profile's artifacts in.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// A guest: a package under `guests/` that has a binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPackage {
    /// The name used in `--guest` and scenario files: the directory name, or the binary name
    /// when one package has several binaries.
    pub name: String,
    /// Cargo package name (`cargo build -p`).
    pub package: String,
    /// Binary target name: the file cargo writes.
    pub bin: String,
}

/// The workspace as the tooling sees it.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// Directory holding the root `Cargo.toml`.
    pub root: PathBuf,
    /// Cargo's target directory.
    pub target_dir: PathBuf,
    /// Guest packages, sorted by name.
    pub guests: Vec<GuestPackage>,
}

impl Workspace {
    /// The workspace root, known at compile time (this crate lives in `<root>/tests`).
    pub fn root_dir() -> PathBuf {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        here.parent().unwrap_or(here).to_path_buf()
    }

    /// Asks cargo about the workspace.
    pub fn load() -> Result<Self> {
        let root = Self::root_dir();
        let output = cargo()
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .arg("--manifest-path")
            .arg(root.join("Cargo.toml"))
            .output()
            .context(|| "running `cargo metadata`".to_string())?;
        if !output.status.success() {
            return Err(err!(
                "`cargo metadata` failed:\n{}",
                String::from_utf8_lossy(&output.stderr).trim_end()
            ));
        }
        let json = String::from_utf8_lossy(&output.stdout);
        Self::from_metadata(&json)
    }

    /// Builds the view from `cargo metadata --format-version 1 --no-deps` output.
    pub fn from_metadata(json: &str) -> Result<Self> {
        let meta: Value =
            serde_json::from_str(json).context(|| "parsing `cargo metadata` output".to_string())?;
        let str_field = |v: &Value, key: &str| -> Result<String> {
            v.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| err!("`cargo metadata` output has no string field `{key}`"))
        };
        let root = PathBuf::from(str_field(&meta, "workspace_root")?);
        let target_dir = PathBuf::from(str_field(&meta, "target_directory")?);
        let guests_dir = root.join("guests");
        let mut guests = Vec::new();
        for package in meta
            .get("packages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let manifest = PathBuf::from(str_field(package, "manifest_path")?);
            let Some(dir) = manifest.parent() else {
                continue;
            };
            if dir.parent() != Some(guests_dir.as_path()) {
                continue;
            }
            let dir_name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let package_name = str_field(package, "name")?;
            let bins: Vec<String> = package
                .get("targets")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter(|t| {
                    t.get("kind")
                        .and_then(Value::as_array)
                        .is_some_and(|k| k.iter().any(|k| k == "bin"))
                })
                .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_string))
                .collect();
            let single = bins.len() == 1;
            for bin in bins {
                guests.push(GuestPackage {
                    name: if single {
                        dir_name.clone()
                    } else {
                        bin.clone()
                    },
                    package: package_name.clone(),
                    bin,
                });
            }
        }
        guests.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            root,
            target_dir,
            guests,
        })
    }

    /// Finds a guest by name (directory name, package name or binary name).
    pub fn guest(&self, name: &str) -> Result<&GuestPackage> {
        self.guests
            .iter()
            .find(|g| g.name == name)
            .or_else(|| {
                self.guests
                    .iter()
                    .find(|g| g.package == name || g.bin == name)
            })
            .ok_or_else(|| {
                let available = if self.guests.is_empty() {
                    "none: guests/ has no package with a binary".to_string()
                } else {
                    self.guests
                        .iter()
                        .map(|g| g.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                err!(
                    "unknown guest `{name}` (available guests: {available}); \
                     a path to an ELF file must contain a `/` or end in `.elf`"
                )
            })
    }

    /// The hypervisor ELF that `cargo build -p hypervisor` produces for `profile`.
    pub fn hypervisor_elf(&self, profile: Profile) -> PathBuf {
        self.target_dir
            .join(HYPERVISOR_TARGET)
            .join(profile.dir())
            .join(HYPERVISOR_PACKAGE)
    }

    /// The ELF that `cargo build -p <package> --target i586-unknown-linux-gnu --release` produces.
    pub fn guest_elf(&self, guest: &GuestPackage) -> PathBuf {
        self.target_dir
            .join(GUEST_TARGET)
            .join("release")
            .join(&guest.bin)
    }

    /// Integration scenarios: `tests/scenarios/*.toml`.
    pub fn scenario_dir(&self) -> PathBuf {
        self.root.join("tests").join("scenarios")
    }

    /// Bench scenarios: `tests/benches/*.toml` (same format, always run under `-icount`).
    pub fn bench_dir(&self) -> PathBuf {
        self.root.join("tests").join("benches")
    }

    /// Serial logs, QEMU logs and firmware variable stores of every run.
    pub fn qemu_dir(&self) -> PathBuf {
        self.target_dir.join("qemu")
    }

    /// Finished ISO images.
    pub fn iso_dir(&self) -> PathBuf {
        self.target_dir.join("iso")
    }

    /// ISO staging directory for the image called `name`.
    pub fn stage_dir(&self, name: &str) -> PathBuf {
        self.target_dir.join("iso-stage").join(name)
    }
}

/// A `cargo` command: the cargo that runs us (`$CARGO`), so the pinned toolchain is used.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const METADATA: &str = r#"{
        "workspace_root": "/w",
        "target_directory": "/w/target",
        "packages": [
            {"name": "hypervisor", "manifest_path": "/w/hypervisor/Cargo.toml",
             "targets": [{"name": "rustyvisor", "kind": ["lib"]}, {"name": "hypervisor", "kind": ["bin"]}]},
            {"name": "guest-runtime", "manifest_path": "/w/guests/runtime/Cargo.toml",
             "targets": [{"name": "guest_runtime", "kind": ["lib"]}]},
            {"name": "hello-guest", "manifest_path": "/w/guests/hello/Cargo.toml",
             "targets": [{"name": "hello-guest", "kind": ["bin"]}]},
            {"name": "multi", "manifest_path": "/w/guests/multi/Cargo.toml",
             "targets": [{"name": "one", "kind": ["bin"]}, {"name": "two", "kind": ["bin"]}]}
        ]
    }"#;

    #[test]
    fn guests_are_binary_packages_under_guests() {
        let ws = Workspace::from_metadata(METADATA).unwrap();
        assert_eq!(ws.target_dir, Path::new("/w/target"));
        let names: Vec<_> = ws.guests.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["hello", "one", "two"]);
        assert_eq!(ws.guests[0].package, "hello-guest");
        assert_eq!(
            ws.guest_elf(&ws.guests[0]),
            Path::new("/w/target/i586-unknown-linux-gnu/release/hello-guest")
        );
        assert_eq!(
            ws.hypervisor_elf(Profile::Debug),
            Path::new("/w/target/x86_64-unknown-none/debug/hypervisor")
        );
    }

    #[test]
    fn guest_lookup_accepts_package_name_and_lists_guests_when_unknown() {
        let ws = Workspace::from_metadata(METADATA).unwrap();
        assert_eq!(ws.guest("hello-guest").unwrap().name, "hello");
        let e = ws.guest("runtime").unwrap_err();
        assert!(
            e.message().contains("available guests: hello, one, two"),
            "{e}"
        );
    }
}
