//! Host tools the image and QEMU commands need, checked before any work starts.
//!
//! When something is missing and we run as root where `apt-get` exists (CI, containers), the
//! packages are installed; otherwise the exact install command is printed and we stop.

use std::path::Path;
use std::process::Command;

use rustyvisor_tests::err;
use rustyvisor_tests::qemu::Ovmf;
use rustyvisor_tests::{Error, Result};

/// Every Debian package the tooling uses, in the order of the install command.
pub const PACKAGES: [&str; 8] = [
    "qemu-system-x86",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "ovmf",
    "e2fsprogs",
];

/// What a command is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Write hybrid BIOS + UEFI ISOs.
    Iso,
    /// Run QEMU.
    Qemu,
    /// Boot with OVMF.
    Uefi,
    /// Make an ext2 data module (`data:NAME:SIZE:ext2`).
    Ext2,
}

/// One thing that must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// A program on `PATH`.
    Tool(&'static str),
    /// A program on `PATH` or in `/usr/sbin` or `/sbin` (e2fsprogs).
    SbinTool(&'static str),
    /// A directory.
    Dir(&'static str),
    /// OVMF firmware files.
    Ovmf,
}

/// The checks for `needs`, each with the package that provides it.
fn checks(needs: &[Need]) -> Vec<(Check, &'static str)> {
    let mut list = Vec::new();
    for need in needs {
        let more: &[(Check, &str)] = match need {
            Need::Iso => &[
                (Check::Tool("grub-mkrescue"), "grub-common"),
                (Check::Tool("grub-file"), "grub-common"),
                (Check::Tool("xorriso"), "xorriso"),
                (Check::Tool("mformat"), "mtools"),
                (Check::Dir("/usr/lib/grub/i386-pc"), "grub-pc-bin"),
                (Check::Dir("/usr/lib/grub/x86_64-efi"), "grub-efi-amd64-bin"),
            ],
            Need::Qemu => &[(Check::Tool("qemu-system-x86_64"), "qemu-system-x86")],
            Need::Uefi => &[(Check::Ovmf, "ovmf")],
            Need::Ext2 => &[
                (Check::SbinTool("mke2fs"), "e2fsprogs"),
                (Check::SbinTool("debugfs"), "e2fsprogs"),
            ],
        };
        for item in more {
            if !list.contains(item) {
                list.push(*item);
            }
        }
    }
    list
}

/// Whether `program` is an executable file in a `PATH` directory.
pub(crate) fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            dir.join(program)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn present(check: Check) -> bool {
    match check {
        Check::Tool(program) => on_path(program),
        Check::SbinTool(program) => rustyvisor_tests::ext2::find_tool(program).is_some(),
        Check::Dir(dir) => Path::new(dir).is_dir(),
        Check::Ovmf => Ovmf::locate().is_ok(),
    }
}

fn describe(check: Check) -> String {
    match check {
        Check::Tool(program) | Check::SbinTool(program) => format!("`{program}`"),
        Check::Dir(dir) => format!("GRUB modules in {dir}"),
        Check::Ovmf => "OVMF (UEFI firmware) in /usr/share/OVMF".to_string(),
    }
}

/// The shell command that installs everything.
pub fn install_command() -> String {
    format!(
        "sudo apt-get update && sudo apt-get install -y {}",
        PACKAGES.join(" ")
    )
}

/// The message for missing checks.
fn missing_message(missing: &[(Check, &str)]) -> Error {
    let list: Vec<String> = missing
        .iter()
        .map(|(check, package)| format!("  {} (Debian package {package})", describe(*check)))
        .collect();
    err!(
        "missing host tools:\n{}\ninstall them with:\n    {}\n\
         (elsewhere, install QEMU for x86_64, GRUB 2 with the i386-pc and x86_64-efi platforms, \
         xorriso, mtools, OVMF and e2fsprogs)",
        list.join("\n"),
        install_command()
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii() == b"0")
}

fn apt_get(args: &[&str]) -> Result<()> {
    eprintln!("==> apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| err!("running apt-get: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(err!("`apt-get {}` failed ({status})", args.join(" ")))
    }
}

/// Makes sure everything `needs` requires is installed, installing it when we may.
pub fn ensure(needs: &[Need]) -> Result<()> {
    let missing: Vec<_> = checks(needs)
        .into_iter()
        .filter(|(check, _)| !present(*check))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !(is_root() && on_path("apt-get")) {
        return Err(missing_message(&missing));
    }
    let names: Vec<String> = missing.iter().map(|(c, _)| describe(*c)).collect();
    eprintln!("==> missing {}: installing packages", names.join(", "));
    apt_get(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(PACKAGES);
    apt_get(&install)?;
    let still: Vec<_> = missing
        .into_iter()
        .filter(|(check, _)| !present(*check))
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(missing_message(&still))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_follow_needs_without_repeats() {
        let all = checks(&[Need::Iso, Need::Qemu, Need::Uefi, Need::Ext2, Need::Iso]);
        assert_eq!(all.len(), 10);
        assert!(all.contains(&(Check::SbinTool("mke2fs"), "e2fsprogs")));
        assert!(all.contains(&(Check::Tool("qemu-system-x86_64"), "qemu-system-x86")));
        assert!(all.contains(&(Check::Dir("/usr/lib/grub/x86_64-efi"), "grub-efi-amd64-bin")));
        assert_eq!(checks(&[Need::Uefi]), [(Check::Ovmf, "ovmf")]);
        // Every package named by a check is in the install command.
        for (_, package) in all {
            assert!(PACKAGES.contains(&package), "{package}");
        }
    }

    #[test]
    fn missing_tools_message_has_the_install_command() {
        let e = missing_message(&[(Check::Tool("xorriso"), "xorriso")]);
        assert!(
            e.message().contains("`xorriso` (Debian package xorriso)"),
            "{e}"
        );
        assert!(
            e.message().contains(
                "sudo apt-get update && sudo apt-get install -y qemu-system-x86 grub-pc-bin \
                 grub-efi-amd64-bin grub-common xorriso mtools ovmf e2fsprogs"
            ),
            "{e}"
        );
    }

    #[test]
    fn path_lookup() {
        assert!(on_path("sh"));
        assert!(!on_path("no-such-program-rustyvisor"));
    }
}
