//! The commands. Each returns the process exit status or an error for people.

use std::fs;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Instant;

use rustyvisor_tests::bench;
use rustyvisor_tests::image::{GuestSpec, Image, ResolvedGuest};
use rustyvisor_tests::qemu::{
    Accel, Boot, EXIT_SUCCESS, Firmware, Ovmf, Qemu, Serial, check_kvm, exit_meaning,
};
use rustyvisor_tests::runner::{Report, Runner};
use rustyvisor_tests::scenario::{Scenario, load_dir};
use rustyvisor_tests::workspace::{Profile, Workspace};
use rustyvisor_tests::{Result, err};

use crate::build::{Guests, build, host_tests};
use crate::cli::{self, ImageArgs, RunArgs, TestArgs};
use crate::prereq::{Need, ensure};

/// Serial log lines shown for each failing scenario.
const TAIL_LINES: usize = 40;

/// `cargo xtask build`.
pub fn build_all(profile: Profile) -> Result<i32> {
    let ws = Workspace::load()?;
    build(&ws, profile, &Guests::All)?;
    eprintln!("==> hypervisor: {}", ws.hypervisor_elf(profile).display());
    for guest in &ws.guests {
        eprintln!(
            "==> guest {}: {}",
            guest.name,
            ws.guest_elf(guest).display()
        );
    }
    Ok(0)
}

/// Resolves image guests given on the command line (paths relative to the current directory).
fn resolve(ws: &Workspace, image: &ImageArgs) -> Result<Vec<ResolvedGuest>> {
    let cwd = std::env::current_dir().map_err(|e| err!("current directory: {e}"))?;
    Ok(image
        .guests
        .iter()
        .map(|g| g.resolve_all(ws, &cwd))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// What making the modules of `guests` needs besides the image tools: e2fsprogs for an ext2
/// data module.
fn module_needs<'a>(guests: impl IntoIterator<Item = &'a GuestSpec>) -> Vec<Need> {
    let mut guests = guests.into_iter();
    if guests.any(GuestSpec::is_ext2) {
        vec![Need::Ext2]
    } else {
        Vec::new()
    }
}

/// `cargo xtask iso`.
pub fn iso(output: &Path, image: &ImageArgs, profile: Profile, no_build: bool) -> Result<i32> {
    let ws = Workspace::load()?;
    let mut needs = vec![Need::Iso];
    needs.extend(module_needs(&image.guests));
    // Before the guests are resolved: that makes the generated data modules.
    ensure(&needs)?;
    let guests = resolve(&ws, image)?;
    if !no_build {
        build(&ws, profile, &Guests::Used(image.guests.clone()))?;
    }
    let name = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "iso".into());
    Image {
        name: &name,
        hypervisor: &ws.hypervisor_elf(profile),
        cmdline: &image.cmdline,
        guests: &guests,
    }
    .write_iso(&ws, output)?;
    eprintln!("==> wrote {} (boots from BIOS and UEFI)", output.display());
    Ok(0)
}

/// `cargo xtask run`.
pub fn run(args: &RunArgs) -> Result<i32> {
    let ws = Workspace::load()?;
    if args.demo {
        eprintln!(
            "==> no --guest or --cmdline: booting the demo, {} guests at once: {}",
            args.image.guests.iter().filter(|g| !g.is_data()).count(),
            cli::DEMO_GUESTS.join(" ")
        );
    }
    let uefi = args.machine.firmware == Firmware::Uefi;
    let mut needs = vec![Need::Iso, Need::Qemu];
    if uefi {
        needs.push(Need::Uefi);
    }
    needs.extend(module_needs(&args.image.guests));
    // Before the guests are resolved: that makes the generated data modules.
    ensure(&needs)?;
    let guests = resolve(&ws, &args.image)?;
    if args.machine.accel == Accel::Kvm {
        check_kvm()?;
    }
    if !args.no_build {
        build(&ws, args.profile, &Guests::Used(args.image.guests.clone()))?;
    }
    let hypervisor = ws.hypervisor_elf(args.profile);
    let iso = ws.iso_dir().join("run.iso");
    Image {
        name: "run",
        hypervisor: &hypervisor,
        cmdline: &args.image.cmdline,
        guests: &guests,
    }
    .write_iso(&ws, &iso)?;
    let uefi = if uefi {
        Some(Ovmf::locate()?.flash(&ws.qemu_dir().join("run.OVMF_VARS.fd"))?)
    } else {
        None
    };
    let qemu = Qemu {
        machine: args.machine.clone(),
        uefi,
        boot: Boot::Iso(iso),
        serial: Serial::Stdio,
        debug_log: None,
        gdb: args.gdb,
    };
    eprintln!("==> {}", qemu.command_line());
    if args.gdb {
        eprintln!(
            "==> QEMU waits for GDB; attach with:\n    gdb -ex 'target remote :1234' {}",
            hypervisor.display()
        );
    }
    eprintln!("==> {}", cli::CONSOLE_HINT);
    eprintln!("==> serial console follows; Ctrl-C quits");
    let status = qemu
        .command()
        .status()
        .map_err(|e| err!("starting {}: {e}", rustyvisor_tests::qemu::QEMU))?;
    Ok(report_exit(status))
}

/// Explains QEMU's exit status and turns it into ours.
fn report_exit(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(EXIT_SUCCESS), _) => {
            eprintln!(
                "==> QEMU exited with {EXIT_SUCCESS}: {}",
                exit_meaning(EXIT_SUCCESS)
            );
            0
        }
        (Some(code), _) => {
            eprintln!("==> QEMU exited with {code}: {}", exit_meaning(code));
            1
        }
        (None, signal) => {
            eprintln!("==> QEMU killed by signal {}", signal.unwrap_or_default());
            1
        }
    }
}

/// Checks the tools some scenarios need and every guest they name (which makes their
/// generated data modules).
fn prepare(ws: &Workspace, scenarios: &[Scenario]) -> Result<()> {
    let mut needs = vec![Need::Iso, Need::Qemu];
    if scenarios
        .iter()
        .any(|s| s.machine.firmware == Firmware::Uefi)
    {
        needs.push(Need::Uefi);
    }
    needs.extend(module_needs(scenarios.iter().flat_map(|s| &s.guests)));
    ensure(&needs)?;
    for s in scenarios {
        for guest in &s.guests {
            guest
                .resolve_all(ws, &ws.root)
                .map_err(|e| err!("{}: scenario `{}`: {e}", s.file.display(), s.name))?;
        }
    }
    Ok(())
}

/// Every guest spec of some scenarios (for the build).
fn used_guests(scenarios: &[Scenario]) -> Guests {
    Guests::Used(
        scenarios
            .iter()
            .flat_map(|s| s.guests.iter().cloned())
            .collect::<Vec<GuestSpec>>(),
    )
}

/// A runner for the release hypervisor, with OVMF located once if needed.
fn runner<'a>(ws: &'a Workspace, scenarios: &[Scenario]) -> Result<Runner<'a>> {
    let ovmf = if scenarios
        .iter()
        .any(|s| s.machine.firmware == Firmware::Uefi)
    {
        Some(Ovmf::locate()?)
    } else {
        None
    };
    Ok(Runner {
        ws,
        hypervisor: ws.hypervisor_elf(Profile::Release),
        ovmf,
    })
}

/// Prints a scenario result as soon as it is known.
fn print_result(report: &Report) {
    let secs = report.duration.as_secs_f64();
    if report.passed() {
        println!("PASS {} ({secs:.1}s)", report.name);
    } else {
        println!("FAIL {} ({secs:.1}s): {}", report.name, report.reasons());
    }
}

/// `cargo xtask test`.
pub fn test(args: &TestArgs) -> Result<i32> {
    let ws = Workspace::load()?;
    let all = load_dir(&ws.scenario_dir())?;
    let selected: Vec<Scenario> = all
        .iter()
        .filter(|s| {
            args.filter
                .as_ref()
                .is_none_or(|f| s.name.contains(f.as_str()))
        })
        .cloned()
        .collect();
    if args.list {
        for s in &selected {
            println!(
                "{:<24} {}",
                s.name,
                s.description.as_deref().unwrap_or_default()
            );
        }
        return Ok(0);
    }
    // Scenarios whose outside files (the Linux kit) are not here are skipped, loudly.
    let (selected, skipped): (Vec<Scenario>, Vec<Scenario>) = selected
        .into_iter()
        .partition(|s| s.missing_requirement(&ws.root).is_none());
    for s in &skipped {
        if let Some(p) = s.missing_requirement(&ws.root) {
            println!("SKIP {}: needs {} (not found)", s.name, p.display());
        }
    }
    if selected.is_empty() && !skipped.is_empty() {
        println!("0 passed, 0 failed, {} skipped", skipped.len());
        return Ok(0);
    }
    if selected.is_empty() {
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        println!("0 passed, 0 failed");
        return Err(err!(
            "no scenario name contains `{}`; scenarios: {}",
            args.filter.as_deref().unwrap_or_default(),
            names.join(", ")
        ));
    }
    prepare(&ws, &selected)?;

    eprintln!("==> host unit tests: cargo test");
    let status = host_tests(&ws)
        .status()
        .map_err(|e| err!("running cargo test: {e}"))?;
    if !status.success() {
        return Err(err!(
            "host unit tests failed ({status}); scenarios were not run"
        ));
    }
    if !args.no_build {
        build(&ws, Profile::Release, &used_guests(&selected))?;
    }
    let runner = runner(&ws, &selected)?;
    eprintln!(
        "==> {} scenario(s), {} at a time; logs in {}",
        selected.len(),
        args.jobs,
        ws.qemu_dir().display()
    );
    let start = Instant::now();
    let reports = runner.run_all(&selected, args.jobs, &print_result);
    let failed: Vec<&Report> = reports.iter().filter(|r| !r.passed()).collect();
    for report in &failed {
        println!();
        print!("{}", report.details(TAIL_LINES));
    }
    println!();
    eprintln!("==> scenarios took {:.1}s", start.elapsed().as_secs_f64());
    println!(
        "{} passed, {} failed{}",
        reports.len() - failed.len(),
        failed.len(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(", {} skipped (see the SKIP lines)", skipped.len())
        }
    );
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// `cargo xtask bench`.
pub fn bench(no_build: bool) -> Result<i32> {
    const MODE: &str = "icount";
    let ws = Workspace::load()?;
    let mut benches = load_dir(&ws.bench_dir())?;
    for b in &mut benches {
        b.machine.icount = true;
    }
    // Benches whose outside files (the Linux kit) are not here are skipped, loudly; the others
    // still run.
    let (benches, skipped): (Vec<Scenario>, Vec<Scenario>) = benches
        .into_iter()
        .partition(|s| s.missing_requirement(&ws.root).is_none());
    for s in &skipped {
        if let Some(p) = s.missing_requirement(&ws.root) {
            println!(
                "SKIP {}: needs {} (not found); its metrics are not measured",
                s.name,
                p.display()
            );
        }
    }
    if !benches.is_empty() {
        prepare(&ws, &benches)?;
    }
    if !no_build {
        build(&ws, Profile::Release, &used_guests(&benches))?;
    }
    let mut results = Vec::new();
    if benches.is_empty() {
        println!("no benchmarks to run");
    } else {
        let runner = runner(&ws, &benches)?;
        let reports = runner.run_all(&benches, crate::cli::DEFAULT_JOBS, &print_result);
        if let Some(failed) = reports.iter().find(|r| !r.passed()) {
            print!("{}", failed.details(TAIL_LINES));
            return Err(err!("bench `{}` failed; no results written", failed.name));
        }
        let runs = reports
            .iter()
            .map(|report| {
                let mut samples = bench::parse_samples(&report.lines)
                    .map_err(|e| err!("bench `{}`: {e}", report.name))?;
                samples.extend(
                    bench::wall_clock_samples(&report.wall_clock)
                        .map_err(|e| err!("bench `{}`: {e}", report.name))?,
                );
                Ok((report.name.clone(), samples))
            })
            .collect::<Result<Vec<_>>>()?;
        results = bench::compute_runs(&runs, bench::GOALS)?;
        print!("{}", bench::table(MODE, &results));
    }
    let dir = ws.target_dir.join("bench");
    fs::create_dir_all(&dir).map_err(|e| err!("creating {}: {e}", dir.display()))?;
    let path = dir.join("results.json");
    fs::write(
        &path,
        bench::to_json(MODE, &bench::machine_description(), &results),
    )
    .map_err(|e| err!("writing {}: {e}", path.display()))?;
    eprintln!("==> wrote {}", path.display());
    Ok(0)
}
