//! Command-line parsing and the usage text. Hand-written: the grammar is small, and every
//! unknown option is an error.

use std::path::PathBuf;

use rustyvisor::units::{Bytes, MIB};
use rustyvisor_tests::err;
use rustyvisor_tests::image::{GuestSpec, check_cmdline};
use rustyvisor_tests::qemu::{Accel, Firmware, Machine, memory_arg, parse_memory};
use rustyvisor_tests::workspace::Profile;
use rustyvisor_tests::{Error, Result};

/// The commands, as `cargo xtask help` lists them.
pub const COMMANDS: [&str; 6] = ["build", "iso", "run", "test", "bench", "help"];

/// A usage error as the one line printed for it: what is wrong and where help is.
pub fn usage_error(e: &Error) -> String {
    format!("error: {e}; see `cargo xtask help`")
}

/// Scenario worker threads unless `-j` says otherwise.
pub const DEFAULT_JOBS: usize = 2;

/// What `cargo xtask run` boots when it is given neither `--guest` nor `--cmdline`: several
/// guests at once, each a `--guest` spec. Two `conc` tickers print a tick every 2 and 3 seconds
/// for about 20 minutes (so the console has guests to `list`, `focus`, `kill` and `restart`);
/// `vio` drives the virtio console, entropy, block (the 1 MiB pattern disk `disk`) and network
/// (a broadcast through the switch) devices and `hello` greets, then both power off. Only one
/// guest has a network device: `vio` checks that nothing comes back to it, so a second one
/// would fail that check. When `vio` has a mode in which two guests talk to each other over
/// the switch, a pair of those belongs here.
pub const DEMO_GUESTS: [&str; 8] = [
    // Console: two tickers print at their own pace, side by side.
    "conc,mem=8M,mode=ticker,count=600,period=2000",
    "conc,mem=8M,mode=ticker,count=400,period=3000",
    // Console input: the first guest has the focus; type a line, it echoes
    // it (`quit` ends it).
    "vio,mem=8M,echo",
    // Network: two guests exchange 10,000 frames over the switch.
    "vio,mem=8M,net,netpeer=a",
    "vio,mem=8M,net,netpeer=b",
    // Block and entropy devices.
    "vio,mem=8M,block=disk",
    "data:disk:1M:pattern",
    "hello,mem=8M",
];

/// How to use the hypervisor console, printed by `cargo xtask run` before it boots.
pub const CONSOLE_HINT: &str = "console: keys go to the guest in focus; Ctrl-A then `help` Enter \
                                lists the commands (list, focus, kill, restart, stats); Ctrl-A Tab \
                                focuses the next guest";

/// Machine RAM that holds guests of `mems` bytes all at once: their sum, plus 128 MiB for
/// the hypervisor, the modules and each guest's overhead, in 64 MiB steps. `cargo xtask run`
/// uses it when `--mem` is not given and the default is too small (a Linux guest with 128 MiB).
pub fn machine_memory_for(mems: &[u64]) -> u64 {
    let want = mems.iter().sum::<u64>() + 128 * MIB;
    want.next_multiple_of(64 * MIB)
}

/// The usage text.
pub const USAGE: &str = "\
cargo xtask: build, boot and test rustyvisor

USAGE:
    cargo xtask <COMMAND> [OPTIONS]

COMMANDS:
    build [--debug]                 build the hypervisor (x86_64-unknown-none) and every guest
                                    in guests/ (i586-unknown-linux-gnu, release)
    iso -o FILE [IMAGE] [--debug] [--no-build] [--no-check]
                                    write a bootable BIOS + UEFI ISO (GRUB, multiboot2)
    run [IMAGE] [MACHINE] [--release|--debug] [--no-build] [--no-check] [-- QEMU-ARGS...]
                                    build, make the ISO and boot it in QEMU with the serial
                                    port on this terminal (Ctrl-C quits); with neither
                                    --guest nor --cmdline, a demo: two conc tickers, a vio
                                    guest (console, block, net) and hello at once
    test [FILTER] [-j N] [--list] [--no-build]
                                    host unit tests (cargo test), then every scenario in
                                    tests/scenarios/*.toml whose name contains FILTER; ends
                                    with `N passed, N failed`
    bench [--no-build]              run tests/benches/*.toml under -icount and write
                                    <target>/bench/results.json
    help [COMMAND]                  this text

IMAGE OPTIONS (iso, run):
    --cmdline \"ARGS\"                the hypervisor command line, e.g. \"exit=qemu\"; checked
                                    with the hypervisor's own parser before anything is built
    --guest SPEC                    add a guest module (repeatable). SPEC is a guest name
                                    (a package in guests/) or a path to a 32-bit ELF (with a
                                    `/` or ending in .elf), then comma-separated arguments:
                                    --guest hello,mem=16M  --guest ./k.elf,mem=16M,console=hvc0
                                    mem=SIZE is the guest's RAM: 4M to 3G (default 16M)
                                    block=NAME, net, noconsole, restart=N: its devices
                                    and restarts; data:NAME:SIZE[:pattern|zero|ext2] or
                                    data:NAME=PATH adds a data module (not a guest), e.g.
                                    --guest vio,block=disk --guest data:disk:1M:pattern
                                    ext2 (SIZE at least 1M; needs e2fsprogs) is an ext2
                                    filesystem with fixed files, by md5:
                                      hello.txt       24a2ef6b13032bc217c4c937251d8111
                                        (one line: hello from the rustyvisor ext2 test disk)
                                      pattern.bin     63fc76b490fe16fb4c13fac80b764090
                                        (100 KiB, the first 100 KiB of a pattern disk)
                                      sub/nested.txt  6581ce5933270d44a08db6bc71eba942
                                        (one line: a file in a subdirectory)
    --no-check                      boot a command line or guest spec the hypervisor would
                                    refuse (to watch it do so)
MACHINE OPTIONS (run):
    --uefi                          boot with OVMF instead of SeaBIOS
    --kvm                           KVM (-accel kvm -cpu host) instead of TCG
    --smp N                         number of CPUs (default 1)
    --mem SIZE                      the machine's RAM (QEMU -m), shared by the hypervisor and
                                    every guest (default 128M)
    --gdb                           start halted, wait for GDB on :1234 (-s -S)
OTHER OPTIONS:
    --release, --debug              hypervisor profile (default --release)
    --no-build                      use the artifacts already in the target directory
    -j, --jobs N                    scenarios run in parallel (default 2)
    --list                          list the scenarios instead of running them

QEMU exit status: 33 = the hypervisor reported success (isa-debug-exit 0x10), 35 = it
reported failure (0x11), 0 = triple fault or reset (-no-reboot), 1 = QEMU error.

SIZES (--mem, mem=): digits and a binary unit K, M, G or T, optionally followed by B or iB,
any case: 16M = 16MB = 16MiB; no unit means bytes. See docs/testing.md.
";

/// Options that describe an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageArgs {
    /// Hypervisor command line.
    pub cmdline: String,
    /// Guest modules.
    pub guests: Vec<GuestSpec>,
    /// Skip the host-side checks of `cmdline` and `guests` (`--no-check`).
    pub no_check: bool,
}

impl ImageArgs {
    /// Checks the command line and every guest with the hypervisor's own parsers, unless
    /// `--no-check`; returns each guest's RAM.
    fn check(&self) -> Result<Vec<u64>> {
        if self.no_check {
            return Ok(Vec::new());
        }
        let hint = |e: Error| err!("{e} (--no-check boots it anyway)");
        check_cmdline(&self.cmdline).map_err(hint)?;
        self.guests
            .iter()
            .map(|g| g.check().map_err(hint))
            .collect()
    }
}

/// `cargo xtask run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    /// The image.
    pub image: ImageArgs,
    /// The virtual machine (extra QEMU arguments included).
    pub machine: Machine,
    /// Wait for GDB.
    pub gdb: bool,
    /// Hypervisor profile.
    pub profile: Profile,
    /// Skip the build.
    pub no_build: bool,
    /// The image is the demo ([`DEMO_GUESTS`]): no `--guest` or `--cmdline` was given.
    pub demo: bool,
}

/// `cargo xtask test`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestArgs {
    /// Only scenarios whose name contains this.
    pub filter: Option<String>,
    /// Worker threads.
    pub jobs: usize,
    /// List instead of run.
    pub list: bool,
    /// Skip the build.
    pub no_build: bool,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print the usage.
    Help,
    /// Build everything.
    Build {
        /// Hypervisor profile.
        profile: Profile,
    },
    /// Write an ISO.
    Iso {
        /// Output file.
        output: PathBuf,
        /// The image.
        image: ImageArgs,
        /// Hypervisor profile.
        profile: Profile,
        /// Skip the build.
        no_build: bool,
    },
    /// Boot in QEMU.
    Run(RunArgs),
    /// Unit tests and scenarios.
    Test(TestArgs),
    /// Benchmarks.
    Bench {
        /// Skip the build.
        no_build: bool,
    },
}

/// The arguments after the command name, with `--opt=value` split up.
struct Args {
    items: std::vec::IntoIter<String>,
    /// QEMU arguments after `--`.
    rest: Vec<String>,
    command: &'static str,
}

impl Args {
    fn new(command: &'static str, args: &[String]) -> Self {
        let (mine, rest) = match args.iter().position(|a| a == "--") {
            Some(i) => (&args[..i], args[i + 1..].to_vec()),
            None => (args, Vec::new()),
        };
        let mut items = Vec::new();
        for arg in mine {
            match arg.split_once('=') {
                Some((opt, value)) if opt.starts_with("--") => {
                    items.push(opt.to_string());
                    items.push(value.to_string());
                }
                _ => items.push(arg.clone()),
            }
        }
        Self {
            items: items.into_iter(),
            rest,
            command,
        }
    }

    fn value(&mut self, option: &str) -> Result<String> {
        self.items
            .next()
            .ok_or_else(|| err!("`{option}` needs a value"))
    }

    fn unknown(&self, arg: &str) -> Error {
        if arg.starts_with('-') {
            err!("`cargo xtask {}` has no option `{arg}`", self.command)
        } else {
            err!("`cargo xtask {}` takes no argument `{arg}`", self.command)
        }
    }

    fn no_rest(&self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(err!(
                "`cargo xtask {}` takes no arguments after `--`",
                self.command
            ))
        }
    }
}

/// Options several commands share.
fn common(arg: &str, profile: &mut Profile, no_build: &mut bool) -> bool {
    match arg {
        "--release" => *profile = Profile::Release,
        "--debug" => *profile = Profile::Debug,
        "--no-build" => *no_build = true,
        _ => return false,
    }
    true
}

/// Image options; returns whether `arg` was one.
fn image_option(args: &mut Args, arg: &str, image: &mut ImageArgs) -> Result<bool> {
    match arg {
        "--cmdline" => image.cmdline = args.value(arg)?,
        "--guest" => image.guests.push(GuestSpec::parse(&args.value(arg)?)?),
        "--no-check" => image.no_check = true,
        _ => return Ok(false),
    }
    Ok(true)
}

/// [`DEMO_GUESTS`], parsed.
pub fn demo_guests() -> Result<Vec<GuestSpec>> {
    DEMO_GUESTS.iter().map(|g| GuestSpec::parse(g)).collect()
}

fn number(option: &str, value: &str, max: usize) -> Result<usize> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| err!("`{option} {value}`: expected a number from 1 to {max}"))
}

/// Parses the arguments after `cargo xtask`.
pub fn parse(argv: &[String]) -> Result<Command> {
    let Some((command, rest)) = argv.split_first() else {
        return Ok(Command::Help);
    };
    let mut profile = Profile::Release;
    let mut no_build = false;
    match command.as_str() {
        "help" | "--help" | "-h" => match rest {
            [] => Ok(Command::Help),
            [c] if COMMANDS.contains(&c.as_str()) => Ok(Command::Help),
            [c] => Err(err!("`cargo xtask help {c}`: no such command")),
            [_, extra, ..] => Err(err!("`cargo xtask help` takes no argument `{extra}`")),
        },
        "build" => {
            let mut args = Args::new("build", rest);
            args.no_rest()?;
            while let Some(arg) = args.items.next() {
                match arg.as_str() {
                    "--release" => profile = Profile::Release,
                    "--debug" => profile = Profile::Debug,
                    _ => return Err(args.unknown(&arg)),
                }
            }
            Ok(Command::Build { profile })
        }
        "iso" => {
            let mut args = Args::new("iso", rest);
            args.no_rest()?;
            let mut image = ImageArgs::default();
            let mut output = None;
            while let Some(arg) = args.items.next() {
                if common(&arg, &mut profile, &mut no_build)
                    || image_option(&mut args, &arg, &mut image)?
                {
                    continue;
                }
                match arg.as_str() {
                    "-o" | "--output" => output = Some(PathBuf::from(args.value(&arg)?)),
                    _ => return Err(args.unknown(&arg)),
                }
            }
            let output = output
                .ok_or_else(|| err!("`cargo xtask iso` needs `-o FILE` (the ISO to write)"))?;
            image.check()?;
            Ok(Command::Iso {
                output,
                image,
                profile,
                no_build,
            })
        }
        "run" => {
            let mut args = Args::new("run", rest);
            let mut image = ImageArgs::default();
            let mut machine = Machine::default();
            let mut gdb = false;
            let mut mem_given = false;
            while let Some(arg) = args.items.next() {
                if common(&arg, &mut profile, &mut no_build)
                    || image_option(&mut args, &arg, &mut image)?
                {
                    continue;
                }
                match arg.as_str() {
                    "--uefi" => machine.firmware = Firmware::Uefi,
                    "--kvm" => machine.accel = Accel::Kvm,
                    "--gdb" => gdb = true,
                    "--smp" => machine.smp = number(&arg, &args.value(&arg)?, 255)? as u32,
                    "--mem" => {
                        machine.memory =
                            parse_memory(&args.value(&arg)?).map_err(|e| err!("`--mem`: {e}"))?;
                        mem_given = true;
                    }
                    _ => return Err(args.unknown(&arg)),
                }
            }
            machine.extra_args = std::mem::take(&mut args.rest);
            let demo = image.guests.is_empty() && image.cmdline.is_empty();
            if demo {
                image.guests = demo_guests()?;
            }
            let mems = image.check()?;
            // Without --mem, a machine too small for the guests grows to hold them.
            if !mem_given && mems.iter().sum::<u64>() + 64 * MIB > machine.memory {
                machine.memory = machine_memory_for(&mems);
            }
            for (guest, mem) in image.guests.iter().zip(mems) {
                if mem >= machine.memory {
                    return Err(err!(
                        "guest `{}` wants {} of RAM, but the machine has {} in all (--mem {}); \
                         raise --mem",
                        guest.name(),
                        Bytes(mem),
                        Bytes(machine.memory),
                        memory_arg(machine.memory)
                    ));
                }
            }
            Ok(Command::Run(RunArgs {
                image,
                machine,
                gdb,
                profile,
                no_build,
                demo,
            }))
        }
        "test" => {
            let mut args = Args::new("test", rest);
            args.no_rest()?;
            let mut test = TestArgs {
                filter: None,
                jobs: DEFAULT_JOBS,
                list: false,
                no_build: false,
            };
            while let Some(arg) = args.items.next() {
                match arg.as_str() {
                    "-j" | "--jobs" => test.jobs = number(&arg, &args.value(&arg)?, 64)?,
                    "--list" => test.list = true,
                    "--no-build" => test.no_build = true,
                    filter if !filter.starts_with('-') && test.filter.is_none() => {
                        test.filter = Some(filter.to_string());
                    }
                    _ => return Err(args.unknown(&arg)),
                }
            }
            Ok(Command::Test(test))
        }
        "bench" => {
            let mut args = Args::new("bench", rest);
            args.no_rest()?;
            while let Some(arg) = args.items.next() {
                match arg.as_str() {
                    "--no-build" => no_build = true,
                    _ => return Err(args.unknown(&arg)),
                }
            }
            Ok(Command::Bench { no_build })
        }
        other => Err(err!(
            "unknown command `{other}`; commands: {}",
            COMMANDS.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustyvisor_tests::image::GuestSource;

    fn parse_str(line: &str) -> Result<Command> {
        let argv: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&argv)
    }

    #[test]
    fn no_arguments_or_help_print_usage() {
        assert_eq!(parse(&[]).unwrap(), Command::Help);
        assert_eq!(parse_str("help").unwrap(), Command::Help);
        assert_eq!(parse_str("--help").unwrap(), Command::Help);
        for command in COMMANDS {
            assert_eq!(
                parse_str(&format!("help {command}")).unwrap(),
                Command::Help
            );
        }
    }

    #[test]
    fn usage_errors_are_one_line_with_the_way_to_help() {
        for line in [
            "frobnicate",
            "run --foo",
            "run --mem",
            "run --mem 1.5G",
            "run --guest hello,mem=5000G",
            "run --cmdline exit=qmeu",
            "run --mem 128M --guest hello,mem=1G",
            "iso",
            "test -j 0",
            "build -- x",
        ] {
            let text = usage_error(&parse_str(line).unwrap_err());
            assert!(!text.contains('\n'), "{line}: {text}");
            assert!(text.starts_with("error: "), "{line}: {text}");
            assert!(text.ends_with("; see `cargo xtask help`"), "{line}: {text}");
        }
        assert_eq!(
            usage_error(&parse_str("run --foo").unwrap_err()),
            "error: `cargo xtask run` has no option `--foo`; see `cargo xtask help`"
        );
    }

    #[test]
    fn no_check_lets_deliberately_bad_images_through() {
        let Command::Run(run) =
            parse_str("run --no-check --cmdline exit=qmeu --guest hello,mem=5000G").unwrap()
        else {
            panic!("not a run command");
        };
        assert!(run.image.no_check);
        assert_eq!(run.image.cmdline, "exit=qmeu");
        assert!(parse_str("iso -o a.iso --no-check --cmdline bogus=1").is_ok());
        // The shared size grammar: what the hypervisor accepts, the xtask accepts.
        assert!(parse_str("run --mem 512MiB --guest hello,mem=16MiB,x=y").is_ok());
        assert!(parse_str("run --mem 4G --guest hello,mem=3G").is_ok());
    }

    #[test]
    fn usage_mentions_every_command_and_option() {
        for word in [
            "build",
            "iso",
            "run",
            "test",
            "bench",
            "help",
            "--cmdline",
            "--guest",
            "--uefi",
            "--kvm",
            "--smp",
            "--mem",
            "--gdb",
            "--release",
            "--debug",
            "--no-build",
            "--jobs",
            "--list",
            "-o FILE",
        ] {
            assert!(USAGE.contains(word), "usage does not mention {word}");
        }
    }

    #[test]
    fn usage_lists_the_ext2_files_with_their_md5() {
        for (path, md5) in rustyvisor_tests::ext2::FILES {
            let line = USAGE
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{path} ")))
                .unwrap_or_else(|| panic!("usage does not list {path}"));
            assert!(line.trim_end().ends_with(md5), "{line}");
        }
        assert!(USAGE.contains(rustyvisor_tests::ext2::HELLO.trim_end()));
        assert!(USAGE.contains(rustyvisor_tests::ext2::NESTED.trim_end()));
    }

    #[test]
    fn build_profiles() {
        assert_eq!(
            parse_str("build").unwrap(),
            Command::Build {
                profile: Profile::Release
            }
        );
        assert_eq!(
            parse_str("build --debug").unwrap(),
            Command::Build {
                profile: Profile::Debug
            }
        );
    }

    #[test]
    fn run_with_everything() {
        let argv: Vec<String> = [
            "run",
            "--cmdline",
            "exit=qemu log=debug",
            "--guest",
            "hello,mem=16M",
            "--guest=./k.elf",
            "--uefi",
            "--kvm",
            "--smp=4",
            "--mem",
            "5G",
            "--gdb",
            "--debug",
            "--no-build",
            "--",
            "-d",
            "int",
        ]
        .map(String::from)
        .to_vec();
        let Command::Run(run) = parse(&argv).unwrap() else {
            panic!("not a run command");
        };
        assert_eq!(run.image.cmdline, "exit=qemu log=debug");
        assert_eq!(run.image.guests.len(), 2);
        assert_eq!(run.image.guests[0].args, ["mem=16M"]);
        assert_eq!(
            run.image.guests[1].source,
            GuestSource::File("./k.elf".into())
        );
        assert_eq!(
            run.machine,
            Machine {
                firmware: Firmware::Uefi,
                memory: 5 << 30,
                smp: 4,
                accel: Accel::Kvm,
                icount: false,
                cpu: None,
                extra_args: vec!["-d".into(), "int".into()],
            }
        );
        assert!(run.gdb && run.no_build);
        assert_eq!(run.profile, Profile::Debug);
    }

    #[test]
    fn run_grows_the_machine_for_big_guests_unless_mem_is_given() {
        let Command::Run(run) = parse_str("run --guest hello,mem=128M").unwrap() else {
            panic!("not a run command");
        };
        assert_eq!(run.machine.memory, 256 * MIB);
        let Command::Run(run) = parse_str("run --guest hello,mem=8M").unwrap() else {
            panic!("not a run command");
        };
        assert_eq!(
            run.machine.memory,
            Machine::default().memory,
            "fits: unchanged"
        );
        assert!(parse_str("run --mem 128M --guest hello,mem=128M").is_err());
    }

    #[test]
    fn run_defaults() {
        let Command::Run(run) = parse_str("run").unwrap() else {
            panic!("not a run command");
        };
        assert_eq!(run.machine, Machine::default());
        assert_eq!(run.profile, Profile::Release);
        assert!(!run.gdb && !run.no_build);
        // No --guest and no --cmdline: the demo.
        assert!(run.demo);
        assert_eq!(run.image.cmdline, "");
        assert_eq!(run.image.guests, demo_guests().unwrap());
    }

    #[test]
    fn demo_guests_pass_the_hypervisor_checks_and_fit_the_default_machine() {
        let image = ImageArgs {
            guests: demo_guests().unwrap(),
            ..ImageArgs::default()
        };
        let mems = image.check().unwrap();
        assert!(mems.iter().sum::<u64>() < Machine::default().memory / 2);
        let names: Vec<String> = image.guests.iter().map(GuestSpec::name).collect();
        assert_eq!(
            names,
            ["conc", "conc", "vio", "vio", "vio", "vio", "disk", "hello"]
        );
        // Machine options keep the demo; --guest or --cmdline replace it.
        let Command::Run(run) = parse_str("run --uefi --smp 2").unwrap() else {
            panic!("not a run command");
        };
        assert!(run.demo && run.image.guests.len() == DEMO_GUESTS.len());
        for line in ["run --guest hello", "run --cmdline log=debug"] {
            let Command::Run(run) = parse_str(line).unwrap() else {
                panic!("not a run command");
            };
            assert!(!run.demo, "{line}");
            assert!(run.image.guests.len() <= 1, "{line}");
        }
    }

    #[test]
    fn iso_needs_output() {
        let e = parse_str("iso --cmdline x").unwrap_err();
        assert!(e.message().contains("needs `-o FILE`"), "{e}");
        let Command::Iso { output, image, .. } = parse_str("iso -o a.iso --guest hello").unwrap()
        else {
            panic!("not an iso command");
        };
        assert_eq!(output, PathBuf::from("a.iso"));
        assert_eq!(image.guests[0].package(), Some("hello"));
    }

    #[test]
    fn test_filter_and_jobs() {
        assert_eq!(
            parse_str("test uefi -j 1 --no-build").unwrap(),
            Command::Test(TestArgs {
                filter: Some("uefi".into()),
                jobs: 1,
                list: false,
                no_build: true,
            })
        );
        assert_eq!(
            parse_str("test --list").unwrap(),
            Command::Test(TestArgs {
                filter: None,
                jobs: DEFAULT_JOBS,
                list: true,
                no_build: false,
            })
        );
        assert!(parse_str("test a b").is_err());
        assert!(parse_str("test -j 0").is_err());
    }

    #[test]
    fn bad_arguments_are_errors() {
        for (line, needle) in [
            ("frobnicate", "unknown command `frobnicate`"),
            ("build --fast", "has no option `--fast`"),
            ("build x", "takes no argument `x`"),
            ("run --smp", "`--smp` needs a value"),
            ("run --smp many", "expected a number"),
            ("run --mem lots", "`--mem`: \"lots\" is not a size"),
            ("run --mem 4096", "a size without a unit is bytes"),
            (
                "run --guest a,mem=x",
                "guest `a`: bad mem=\"x\": not a size",
            ),
            (
                "run --guest hello,mem=5000G",
                "guest `hello`: bad mem=\"5000G\": guest RAM must be from 4 MiB to 3 GiB \
                 (--no-check boots it anyway)",
            ),
            (
                "iso -o a.iso --guest hello,mem=5000G",
                "guest RAM must be from 4 MiB",
            ),
            ("run --guest hello,mem=16M,mem=32M", "mem= given twice"),
            ("run --cmdline=exit=qmeu", "bad value \"qmeu\" for exit"),
            (
                "iso -o a.iso --cmdline=exit=qmeu",
                "bad value \"qmeu\" for exit",
            ),
            (
                "run --mem 128M --guest hello,mem=128M",
                "guest `hello` wants 128 MiB of RAM, but the machine has 128 MiB in all \
                 (--mem 128M); raise --mem",
            ),
            (
                "run --mem 1G --guest a --guest b,mem=1GiB",
                "guest `b` wants 1 GiB",
            ),
            ("help frobnicate", "no such command"),
            ("help run x", "takes no argument `x`"),
            ("run --guest", "needs a value"),
            ("run --bogus", "has no option `--bogus`"),
            ("test --bogus", "has no option `--bogus`"),
            ("bench --debug", "has no option `--debug`"),
            ("iso -o a.iso -- -x", "no arguments after `--`"),
        ] {
            let e = parse_str(line).unwrap_err();
            assert!(
                e.message().contains(needle),
                "{line}: {needle:?} not in {e}"
            );
        }
    }
}
