//! Cargo builds of the hypervisor and the guests, in the workspace's own target directory.

use std::process::Command;

use rustyvisor_tests::err;
use rustyvisor_tests::image::GuestSpec;
use rustyvisor_tests::workspace::{
    GUEST_TARGET, HYPERVISOR_PACKAGE, HYPERVISOR_TARGET, Profile, Workspace, cargo,
};
use rustyvisor_tests::{Result, shell_quote};

/// Which guests to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guests {
    /// Every guest package.
    All,
    /// The packages these specs name (paths to ELF files need no build).
    Used(Vec<GuestSpec>),
}

/// Prints and runs a cargo command in the workspace root.
fn run_cargo(ws: &Workspace, what: &str, args: &[String]) -> Result<()> {
    let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    eprintln!("==> {what}: cargo {}", line.join(" "));
    let status = cargo()
        .args(args)
        .current_dir(&ws.root)
        .status()
        .map_err(|e| err!("running cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(err!("building {what} failed (cargo {})", line.join(" ")))
    }
}

/// The `cargo build` arguments for the hypervisor.
pub fn hypervisor_args(profile: Profile) -> Vec<String> {
    let mut args: Vec<String> = [
        "build",
        "-p",
        HYPERVISOR_PACKAGE,
        "--target",
        HYPERVISOR_TARGET,
    ]
    .map(String::from)
    .to_vec();
    if profile == Profile::Release {
        args.push("--release".into());
    }
    args
}

/// The `cargo build` arguments for a set of guest packages.
pub fn guest_args(packages: &[&str]) -> Vec<String> {
    let mut args = vec!["build".to_string()];
    for package in packages {
        args.extend(["-p".into(), package.to_string()]);
    }
    args.extend(["--target".into(), GUEST_TARGET.into(), "--release".into()]);
    args
}

/// Builds the hypervisor and the chosen guests, after checking the pinned toolchain's targets.
pub fn build(ws: &Workspace, profile: Profile, guests: &Guests) -> Result<()> {
    crate::toolchain::ensure(&ws.root)?;
    run_cargo(
        ws,
        &format!("hypervisor ({})", profile.dir()),
        &hypervisor_args(profile),
    )?;
    let mut packages: Vec<&str> = match guests {
        Guests::All => ws.guests.iter().map(|g| g.package.as_str()).collect(),
        Guests::Used(specs) => specs
            .iter()
            .filter_map(GuestSpec::package)
            .map(|name| ws.guest(name).map(|g| g.package.as_str()))
            .collect::<Result<_>>()?,
    };
    packages.sort_unstable();
    packages.dedup();
    if packages.is_empty() {
        return Ok(());
    }
    run_cargo(
        ws,
        &format!("guests {}", packages.join(", ")),
        &guest_args(&packages),
    )
}

/// A command to run the host unit tests of the default workspace members.
pub fn host_tests(ws: &Workspace) -> Command {
    let mut cmd = cargo();
    cmd.args(["test", "--quiet"]).current_dir(&ws.root);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_arguments() {
        assert_eq!(
            hypervisor_args(Profile::Release).join(" "),
            "build -p hypervisor --target x86_64-unknown-none --release"
        );
        assert_eq!(
            hypervisor_args(Profile::Debug).join(" "),
            "build -p hypervisor --target x86_64-unknown-none"
        );
        assert_eq!(
            guest_args(&["hello", "echo"]).join(" "),
            "build -p hello -p echo --target i586-unknown-linux-gnu --release"
        );
    }
}
