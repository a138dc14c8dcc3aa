//! The QEMU command line, shared by `cargo xtask run`, the test scenarios and the benches, and the
//! meaning of QEMU's exit status.
//!
//! The hypervisor ends a run through the `isa-debug-exit` device at port 0xf4: writing `v` makes
//! QEMU exit with `(v << 1) | 1`, so 0x10 gives [`EXIT_SUCCESS`] (33) and 0x11 gives
//! [`EXIT_FAILURE`] (35). With `-no-reboot` a triple fault or reset makes QEMU exit with 0.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use rustyvisor::units::{Bytes, GIB, MIB, parse_size};

use crate::err;
use crate::error::{Context, Error, Result};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// Machine type.
pub const MACHINE: &str = "q35";
/// CPU model under TCG. Pinned in one place so that every run, test and bench sees the same CPU.
pub const CPU_MODEL: &str = "max";
/// The machine's RAM (QEMU `-m`) unless told otherwise: 128 MiB.
pub const DEFAULT_MEMORY: u64 = 128 * MIB;
/// Exit status when the hypervisor writes 0x10 to port 0xf4.
pub const EXIT_SUCCESS: i32 = 33;
/// Exit status when the hypervisor writes 0x11 to port 0xf4.
pub const EXIT_FAILURE: i32 = 35;
/// What QEMU's `-d` logs for every scenario: cheap even under TCG (unlike `int`).
pub const DEBUG_LOG_ITEMS: &str = "cpu_reset,guest_errors";
/// The same under OVMF, which polls for a TPM at 0xfed40000 about 50,000 times at boot and would
/// fill the `guest_errors` log with "Invalid read" lines.
pub const DEBUG_LOG_ITEMS_UEFI: &str = "cpu_reset";

/// `FromStr` and `Display` for a fieldless enum from one table of its variants' names; `$what`
/// names the enum in the parse error ("unknown firmware `efi` (expected `bios` or `uefi`)").
macro_rules! by_name {
    ($ty:ident, $what:literal, $first:ident = $first_name:literal
     $(, $variant:ident = $name:literal)* $(,)?) => {
        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $first_name => Ok(Self::$first),
                    $($name => Ok(Self::$variant),)*
                    _ => Err(err!(
                        concat!(
                            "unknown ", $what, " `{}` (expected `", $first_name, "`",
                            $(" or `", $name, "`",)* ")"
                        ),
                        s
                    )),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    Self::$first => $first_name,
                    $(Self::$variant => $name,)*
                })
            }
        }
    };
}

/// Firmware QEMU boots the ISO with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default).
    #[default]
    Bios,
    /// OVMF (UEFI) from pflash.
    Uefi,
}

by_name!(Firmware, "firmware", Bios = "bios", Uefi = "uefi");

/// How QEMU runs the guest CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Emulation (the default; deterministic enough for tests).
    #[default]
    Tcg,
    /// KVM with `-cpu host` (needs `/dev/kvm`).
    Kvm,
}

by_name!(Accel, "accel", Tcg = "tcg", Kvm = "kvm");

/// The shape of the virtual machine: what a scenario or `cargo xtask run` chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Firmware.
    pub firmware: Firmware,
    /// The machine's RAM in bytes (QEMU `-m`), a whole number of MiB: what the hypervisor
    /// finds in the memory map, guests included.
    pub memory: u64,
    /// Number of CPUs.
    pub smp: u32,
    /// Accelerator.
    pub accel: Accel,
    /// `-icount shift=0`: one time-stamp-counter tick per instruction (benches).
    pub icount: bool,
    /// The CPU model, if not the default ([`CPU_MODEL`] under TCG, `host` under KVM): the
    /// native Linux bench boot runs QEMU's default `qemu64`, under which the kit's Linux lguest
    /// works (under `max` its lguest guest stalled once the host switched to the TSC clocksource).
    pub cpu: Option<String>,
    /// Extra arguments appended to the QEMU command line.
    pub extra_args: Vec<String>,
}

impl Default for Machine {
    fn default() -> Self {
        Self {
            firmware: Firmware::Bios,
            memory: DEFAULT_MEMORY,
            smp: 1,
            accel: Accel::Tcg,
            icount: false,
            cpu: None,
            extra_args: Vec::new(),
        }
    }
}

/// Parses the machine's RAM (`--mem`, a scenario's `memory`) in the size grammar of
/// [`parse_size`] (`128M`, `5G`, `512MiB`; no unit = bytes). QEMU takes whole MiB.
pub fn parse_memory(s: &str) -> Result<u64> {
    let bytes = parse_size(s).ok_or_else(|| {
        err!("\"{s}\" is not a size such as 128M, 512MiB or 5G (K, M, G, T are binary units)")
    })?;
    if bytes == 0 || !bytes.is_multiple_of(MIB) {
        let hint = if s.trim().bytes().all(|b| b.is_ascii_digit()) {
            " (a size without a unit is bytes: write M or G)"
        } else {
            ""
        };
        return Err(err!(
            "\"{s}\" is {}: the machine's RAM must be a whole, non-zero number of MiB{hint}",
            Bytes(bytes)
        ));
    }
    Ok(bytes)
}

/// `bytes` (a whole number of MiB) as a size both QEMU's `-m` and [`parse_size`] read the same
/// way: `5G` or `128M`.
pub fn memory_arg(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{}G", bytes / GIB)
    } else {
        format!("{}M", bytes / MIB)
    }
}

/// Where the serial port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// QEMU's stdin and stdout (`-serial stdio`): the terminal (`cargo xtask run`), or pipes to
    /// the runner (scenarios with scripted `input`).
    Stdio,
    /// A log file (tests, benches).
    File(PathBuf),
}

/// OVMF firmware files on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    /// Read-only code image.
    pub code: PathBuf,
    /// Variable-store template; every run gets its own writable copy.
    pub vars: PathBuf,
}

impl Ovmf {
    /// Known locations: `$OVMF_CODE` + `$OVMF_VARS` if both are set, else Debian/Ubuntu's and
    /// Fedora's packages.
    pub fn locate() -> Result<Self> {
        if let (Some(code), Some(vars)) =
            (std::env::var_os("OVMF_CODE"), std::env::var_os("OVMF_VARS"))
        {
            let found = Self {
                code: code.into(),
                vars: vars.into(),
            };
            return if found.code.is_file() && found.vars.is_file() {
                Ok(found)
            } else {
                Err(err!(
                    "OVMF_CODE={} / OVMF_VARS={}: file not found",
                    found.code.display(),
                    found.vars.display()
                ))
            };
        }
        const CANDIDATES: [(&str, &str); 4] = [
            (
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            ),
            (
                "/usr/share/OVMF/OVMF_CODE.fd",
                "/usr/share/OVMF/OVMF_VARS.fd",
            ),
            (
                "/usr/share/edk2/ovmf/OVMF_CODE.fd",
                "/usr/share/edk2/ovmf/OVMF_VARS.fd",
            ),
            (
                "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
                "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
            ),
        ];
        CANDIDATES
            .iter()
            .map(|(code, vars)| Self {
                code: code.into(),
                vars: vars.into(),
            })
            .find(|o| o.code.is_file() && o.vars.is_file())
            .ok_or_else(|| {
                err!(
                    "OVMF (UEFI firmware) not found in /usr/share/OVMF; install it with \
                     `sudo apt-get install -y ovmf` or set OVMF_CODE and OVMF_VARS"
                )
            })
    }

    /// Copies the variable store to `vars_copy` (fresh for every run) and returns the flash pair.
    pub fn flash(&self, vars_copy: &Path) -> Result<UefiFlash> {
        if let Some(dir) = vars_copy.parent() {
            fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        }
        fs::copy(&self.vars, vars_copy)
            .context(|| format!("copying {} to {}", self.vars.display(), vars_copy.display()))?;
        let mode = fs::metadata(vars_copy)
            .context(|| format!("reading {}", vars_copy.display()))?
            .permissions()
            .mode();
        fs::set_permissions(vars_copy, fs::Permissions::from_mode(mode | 0o600))
            .context(|| format!("making {} writable", vars_copy.display()))?;
        Ok(UefiFlash {
            code: self.code.clone(),
            vars: vars_copy.to_path_buf(),
        })
    }
}

/// The two pflash drives of an OVMF boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiFlash {
    /// Read-only code.
    pub code: PathBuf,
    /// This run's writable variable store.
    pub vars: PathBuf,
}

/// A Linux kernel QEMU loads itself (`-kernel`, `-initrd`, `-append`), without our ISO: the
/// bench's native Linux boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectKernel {
    /// The bzImage (`-kernel`).
    pub kernel: PathBuf,
    /// Its initrd (`-initrd`), if any.
    pub initrd: Option<PathBuf>,
    /// Its command line (`-append`).
    pub append: String,
}

/// What QEMU boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Our ISO (`-cdrom`): GRUB, the hypervisor and its guest modules.
    Iso(PathBuf),
    /// A kernel loaded by QEMU itself.
    Kernel(DirectKernel),
}

/// One QEMU invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// The virtual machine.
    pub machine: Machine,
    /// OVMF flash; must be `Some` exactly when `machine.firmware` is UEFI.
    pub uefi: Option<UefiFlash>,
    /// What to boot.
    pub boot: Boot,
    /// Serial port destination.
    pub serial: Serial,
    /// QEMU's own log (`-d` [`DEBUG_LOG_ITEMS`] or [`DEBUG_LOG_ITEMS_UEFI`], `-D file`), if wanted.
    pub debug_log: Option<PathBuf>,
    /// `-s -S`: wait for GDB on port 1234.
    pub gdb: bool,
}

/// Escapes a path for a QEMU option value (commas are doubled).
fn option_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

impl Qemu {
    /// The arguments after `qemu-system-x86_64`.
    pub fn args(&self) -> Vec<OsString> {
        let m = &self.machine;
        let mut args: Vec<String> = vec![
            "-machine".into(),
            MACHINE.into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-m".into(),
            memory_arg(m.memory),
            "-smp".into(),
            m.smp.to_string(),
        ];
        let (accel, cpu) = match m.accel {
            Accel::Tcg => ("tcg", CPU_MODEL),
            Accel::Kvm => ("kvm", "host"),
        };
        args.extend([
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            m.cpu.clone().unwrap_or_else(|| cpu.into()),
        ]);
        if m.icount {
            args.extend(["-icount".into(), "shift=0".into()]);
        }
        if let Some(flash) = &self.uefi {
            args.extend([
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    option_path(&flash.code)
                ),
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    option_path(&flash.vars)
                ),
            ]);
        }
        args.extend([
            "-device".into(),
            "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
            "-serial".into(),
            match &self.serial {
                Serial::Stdio => "stdio".into(),
                Serial::File(path) => format!("file:{}", option_path(path)),
            },
        ]);
        if let Some(log) = &self.debug_log {
            let items = match self.uefi {
                None => DEBUG_LOG_ITEMS,
                Some(_) => DEBUG_LOG_ITEMS_UEFI,
            };
            args.extend([
                "-d".into(),
                items.into(),
                "-D".into(),
                log.to_string_lossy().into_owned(),
            ]);
        }
        if self.gdb {
            args.extend(["-s".into(), "-S".into()]);
        }
        match &self.boot {
            Boot::Iso(iso) => args.extend(["-cdrom".into(), option_path(iso)]),
            Boot::Kernel(k) => {
                // `-kernel` and `-initrd` take plain file names (no option syntax, no commas
                // to escape).
                args.extend(["-kernel".into(), k.kernel.to_string_lossy().into_owned()]);
                if let Some(initrd) = &k.initrd {
                    args.extend(["-initrd".into(), initrd.to_string_lossy().into_owned()]);
                }
                args.extend(["-append".into(), k.append.clone()]);
            }
        }
        args.extend(m.extra_args.iter().cloned());
        args.into_iter().map(OsString::from).collect()
    }

    /// The command, ready to spawn.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(QEMU);
        cmd.args(self.args());
        cmd
    }

    /// The command line as one string, for people (logs, reproduction hints).
    pub fn command_line(&self) -> String {
        std::iter::once(QEMU.to_string())
            .chain(
                self.args()
                    .iter()
                    .map(|a| crate::shell_quote(&a.to_string_lossy())),
            )
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Fails with an explanation unless KVM can be used.
pub fn check_kvm() -> Result<()> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| {
            err!(
                "--kvm / accel = \"kvm\" needs a usable /dev/kvm ({e}); \
                 check that virtualization is enabled and you are in the `kvm` group"
            )
        })
}

/// What a QEMU exit status means under our protocol.
pub fn exit_meaning(code: i32) -> String {
    match code {
        EXIT_SUCCESS => "success: the hypervisor wrote 0x10 to isa-debug-exit".into(),
        EXIT_FAILURE => "hypervisor reported failure: it wrote 0x11 to isa-debug-exit".into(),
        0 => "QEMU exited with 0: triple fault or reset (run with -d int,cpu_reset)".into(),
        1 => {
            "QEMU error: bad option, missing file or killed by a signal (see QEMU's stderr)".into()
        }
        c if c & 1 == 1 && (3..=255).contains(&c) => format!(
            "the hypervisor wrote {:#x} to isa-debug-exit (0x10 = success, 0x11 = failure)",
            c >> 1
        ),
        c => format!("unexpected QEMU exit status {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(q: &Qemu) -> Vec<String> {
        q.args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn has_pair(args: &[String], a: &str, b: &str) -> bool {
        args.windows(2).any(|w| w[0] == a && w[1] == b)
    }

    fn bios_run() -> Qemu {
        Qemu {
            machine: Machine::default(),
            uefi: None,
            boot: Boot::Iso("/t/iso/run.iso".into()),
            serial: Serial::Stdio,
            debug_log: None,
            gdb: false,
        }
    }

    #[test]
    fn bios_run_command_line() {
        let args = strings(&bios_run());
        for (a, b) in [
            ("-machine", "q35"),
            ("-m", "128M"),
            ("-smp", "1"),
            ("-accel", "tcg"),
            ("-cpu", CPU_MODEL),
            ("-display", "none"),
            ("-serial", "stdio"),
            ("-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"),
            ("-cdrom", "/t/iso/run.iso"),
        ] {
            assert!(has_pair(&args, a, b), "missing {a} {b} in {args:?}");
        }
        for flag in ["-nodefaults", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "missing {flag}");
        }
        for absent in ["-s", "-S", "-icount", "-d"] {
            assert!(!args.iter().any(|a| a == absent), "unexpected {absent}");
        }
        assert!(!args.iter().any(|a| a.contains("pflash")));
    }

    #[test]
    fn uefi_kvm_gdb_file_serial_and_extra_args() {
        let q = Qemu {
            machine: Machine {
                firmware: Firmware::Uefi,
                memory: 5 * GIB,
                smp: 4,
                accel: Accel::Kvm,
                icount: true,
                cpu: None,
                extra_args: vec!["-d".into(), "int".into()],
            },
            uefi: Some(UefiFlash {
                code: "/ovmf/CODE.fd".into(),
                vars: "/t/qemu/a,b.vars.fd".into(),
            }),
            boot: Boot::Iso("/t/a.iso".into()),
            serial: Serial::File("/t/qemu/a.log".into()),
            debug_log: Some("/t/qemu/a.qemu.log".into()),
            gdb: true,
        };
        let args = strings(&q);
        assert!(has_pair(&args, "-cpu", "host"));
        assert!(has_pair(&args, "-accel", "kvm"));
        assert!(has_pair(&args, "-m", "5G"));
        assert!(has_pair(&args, "-smp", "4"));
        assert!(has_pair(&args, "-icount", "shift=0"));
        assert!(has_pair(
            &args,
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/ovmf/CODE.fd"
        ));
        assert!(has_pair(
            &args,
            "-drive",
            "if=pflash,format=raw,unit=1,file=/t/qemu/a,,b.vars.fd"
        ));
        assert!(has_pair(&args, "-serial", "file:/t/qemu/a.log"));
        assert!(has_pair(&args, "-d", DEBUG_LOG_ITEMS_UEFI));
        assert!(has_pair(&args, "-D", "/t/qemu/a.qemu.log"));
        assert!(args.iter().any(|a| a == "-s") && args.iter().any(|a| a == "-S"));
        assert_eq!(&args[args.len() - 2..], ["-d", "int"], "extra args go last");
    }

    #[test]
    fn direct_kernel_boot_replaces_the_cdrom() {
        let q = Qemu {
            machine: Machine {
                memory: 512 * MIB,
                icount: true,
                cpu: Some("qemu64".into()),
                ..Machine::default()
            },
            boot: Boot::Kernel(DirectKernel {
                kernel: "../kit/bzImage".into(),
                initrd: Some("../kit/host-initrd.cpio.gz".into()),
                append: "console=ttyS0 panic=-1".into(),
            }),
            serial: Serial::File("/t/qemu/n.log".into()),
            ..bios_run()
        };
        let args = strings(&q);
        assert!(has_pair(&args, "-kernel", "../kit/bzImage"));
        assert!(has_pair(&args, "-initrd", "../kit/host-initrd.cpio.gz"));
        assert!(has_pair(&args, "-append", "console=ttyS0 panic=-1"));
        assert!(has_pair(&args, "-cpu", "qemu64"));
        assert!(!has_pair(&args, "-cpu", CPU_MODEL));
        assert!(has_pair(&args, "-m", "512M"));
        assert!(has_pair(&args, "-icount", "shift=0"));
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(!args.iter().any(|a| a == "-cdrom"));
        assert!(
            q.command_line()
                .ends_with("-append 'console=ttyS0 panic=-1'"),
            "{}",
            q.command_line()
        );
        let bare = Qemu {
            boot: Boot::Kernel(DirectKernel {
                kernel: "k".into(),
                initrd: None,
                append: String::new(),
            }),
            ..bios_run()
        };
        let args = strings(&bare);
        assert!(!args.iter().any(|a| a == "-initrd"));
        assert!(has_pair(&args, "-append", ""));
    }

    #[test]
    fn exit_codes() {
        assert!(exit_meaning(33).starts_with("success"));
        assert!(exit_meaning(35).starts_with("hypervisor reported failure"));
        assert!(exit_meaning(0).contains("triple fault"));
        assert!(exit_meaning(1).starts_with("QEMU error"));
        assert!(exit_meaning(5).contains("0x2"));
        assert!(exit_meaning(4).starts_with("unexpected"));
    }

    #[test]
    fn firmware_and_accel_parse() {
        assert_eq!("uefi".parse::<Firmware>().unwrap(), Firmware::Uefi);
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert!("efi".parse::<Firmware>().is_err());
        assert!("hvf".parse::<Accel>().is_err());
        assert_eq!(
            "efi".parse::<Firmware>().unwrap_err().message(),
            "unknown firmware `efi` (expected `bios` or `uefi`)"
        );
        assert_eq!(
            "hvf".parse::<Accel>().unwrap_err().message(),
            "unknown accel `hvf` (expected `tcg` or `kvm`)"
        );
        assert_eq!(Firmware::Uefi.to_string(), "uefi");
        assert_eq!(Accel::Tcg.to_string(), "tcg");
    }

    #[test]
    fn machine_memory_sizes() {
        assert_eq!(parse_memory("128M").unwrap(), 128 * MIB);
        assert_eq!(parse_memory("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_memory("5g").unwrap(), 5 * GIB);
        assert_eq!(parse_memory("1048576").unwrap(), MIB);
        for (bad, needle) in [
            ("lots", "not a size"),
            ("1.5G", "not a size"),
            ("", "not a size"),
            ("0", "non-zero"),
            ("4096", "without a unit is bytes"),
            ("1536K", "whole, non-zero number of MiB"),
        ] {
            let e = parse_memory(bad).unwrap_err();
            assert!(e.message().contains(needle), "{bad:?}: {e}");
        }
        assert_eq!(memory_arg(128 * MIB), "128M");
        assert_eq!(memory_arg(5 * GIB), "5G");
        assert_eq!(memory_arg(1536 * MIB), "1536M");
        for bytes in [MIB, 128 * MIB, 3 * GIB, 1536 * MIB] {
            assert_eq!(parse_memory(&memory_arg(bytes)).unwrap(), bytes);
        }
    }
}
