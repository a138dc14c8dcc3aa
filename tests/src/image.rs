//! Bootable images: guest specifications, `grub.cfg`, and the hybrid BIOS + UEFI ISO.
//!
//! An image is a staging directory handed to `grub-mkrescue`:
//!
//! ```text
//! boot/rustyvisor.elf          the hypervisor (multiboot2)
//! boot/guests/<name>.elf       one file per distinct guest
//! boot/guests/<name>.data      one file per data module (`data:` specs, e.g. a block device's disk)
//! boot/grub/grub.cfg           timeout 0, one menu entry, GRUB's terminal left alone
//! ```
//!
//! `grub-mkrescue` puts in every GRUB platform installed under `/usr/lib/grub`; with
//! `i386-pc` and `x86_64-efi` present the ISO boots from SeaBIOS and from OVMF.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustyvisor::config::{self, MAX_CMDLINE};
use rustyvisor::lguest::spec;

use crate::err;
use crate::error::{Context, Result};
use crate::workspace::Workspace;

/// Where a guest comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSource {
    /// A guest package in `guests/`, by name.
    Package(String),
    /// A 32-bit ELF file.
    File(PathBuf),
    /// A data module, not a guest: a file put on the ISO as a GRUB module whose command line is
    /// just `name` (e.g. the disk a guest's `block=name` names).
    Data {
        /// The module's name.
        name: String,
        /// Its contents.
        content: DataContent,
    },
}

/// What a data module holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataContent {
    /// A file on the host (relative paths from where the command runs, or the workspace root
    /// for scenarios).
    File(PathBuf),
    /// Generated: `size` bytes of `fill`.
    Generated {
        /// Size in bytes.
        size: u64,
        /// What every byte is.
        fill: Fill,
    },
}

/// The contents of a generated data module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// `guest_abi::testdata::pattern_byte(offset)` at every offset (test guests verify it).
    Pattern,
    /// Zeros.
    Zero,
    /// An ext2 filesystem with the test files of [`crate::ext2`] (made by e2fsprogs' `mke2fs`).
    Ext2,
}

impl Fill {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pattern => "pattern",
            Self::Zero => "zero",
            Self::Ext2 => "ext2",
        }
    }
}

/// Largest generated data module.
pub const MAX_DATA_SIZE: u64 = 256 << 20;

/// Parses the part after `data:`: `NAME:SIZE[:pattern|zero|ext2]` or `NAME=PATH`.
fn parse_data(spec: &str, rest: &str) -> Result<GuestSource> {
    let bad = |why: &str| {
        err!(
            "data `{spec}`: {why} (expected data:NAME:SIZE[:pattern|zero|ext2] or \
             data:NAME=PATH, e.g. data:disk:1M:pattern)"
        )
    };
    let (name, content) = if let Some((name, path)) = rest.split_once('=') {
        if path.is_empty() {
            return Err(bad("no path"));
        }
        (name, DataContent::File(PathBuf::from(path)))
    } else {
        let mut parts = rest.split(':');
        let name = parts.next().unwrap_or_default();
        let size = parts.next().ok_or_else(|| bad("no size"))?;
        let size = rustyvisor::units::parse_size(size)
            .filter(|s| (1..=MAX_DATA_SIZE).contains(s))
            .ok_or_else(|| bad("the size must be from 1 byte to 256 MiB"))?;
        let fill = match parts.next() {
            None | Some("pattern") => Fill::Pattern,
            Some("zero") => Fill::Zero,
            Some("ext2") => Fill::Ext2,
            Some(_) => return Err(bad("the fill is `pattern`, `zero` or `ext2`")),
        };
        if fill == Fill::Ext2 && size < crate::ext2::MIN_SIZE {
            return Err(bad("an ext2 data module must be at least 1 MiB"));
        }
        if parts.next().is_some() {
            return Err(bad("too many `:`"));
        }
        (name, DataContent::Generated { size, fill })
    };
    if !spec::valid_name(name) {
        return Err(bad(
            "the name must be a guest-style name (letters, digits, `-`, `_`, `.`)",
        ));
    }
    Ok(GuestSource::Data {
        name: name.to_string(),
        content,
    })
}

/// A parsed `--guest` / scenario `guests` entry: `name-or-path[,arg]...`, or a data module
/// `data:NAME:SIZE[:pattern|zero|ext2]` / `data:NAME=PATH` (no arguments).
///
/// A path must contain a `/` or end in `.elf`; anything else names a package in `guests/`.
/// The arguments go to the guest's module command line after its name. Parsing checks only
/// this shape, so that a scenario may give a guest a deliberately bad module line;
/// [`GuestSpec::check`] applies the hypervisor's own rules (`cargo xtask run` and `iso` do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// The guest.
    pub source: GuestSource,
    /// Module command line words after the guest name.
    pub args: Vec<String>,
}

impl GuestSpec {
    /// Parses `name-or-path[,item]...`; items may also be separated by spaces.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut items = spec.split(',');
        let first = items.next().unwrap_or_default().trim();
        if first.is_empty() {
            return Err(err!(
                "guest `{spec}`: expected a guest name or an ELF path before the first comma"
            ));
        }
        let source = if let Some(rest) = first.strip_prefix("data:") {
            if items.next().is_some() {
                return Err(err!("data `{spec}`: a data module takes no arguments"));
            }
            parse_data(spec, rest)?
        } else if first.contains('/') || first.ends_with(".elf") {
            GuestSource::File(PathBuf::from(first))
        } else if first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            GuestSource::Package(first.to_string())
        } else {
            return Err(err!(
                "guest `{spec}`: `{first}` is neither a guest name (letters, digits, `-`, `_`) \
                 nor a path (contains `/` or ends in `.elf`)"
            ));
        };
        let args = items
            .flat_map(str::split_whitespace)
            .map(String::from)
            .collect();
        Ok(Self { source, args })
    }

    /// The guest's name: the first word of its module command line (the package, or the ELF
    /// file's name without `.elf`).
    pub fn name(&self) -> String {
        match &self.source {
            GuestSource::Package(name) => name.clone(),
            GuestSource::File(path) => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            GuestSource::Data { name, .. } => name.clone(),
        }
    }

    /// The spec as `--guest` takes it back (for `reproduce:` commands).
    pub fn spec_string(&self) -> String {
        let mut spec = match &self.source {
            GuestSource::Package(name) => name.clone(),
            GuestSource::File(path) => path.display().to_string(),
            GuestSource::Data {
                name,
                content: DataContent::File(path),
            } => format!("data:{name}={}", path.display()),
            GuestSource::Data {
                name,
                content: DataContent::Generated { size, fill },
            } => format!("data:{name}:{size}:{}", fill.as_str()),
        };
        for arg in &self.args {
            spec.push(',');
            spec.push_str(arg);
        }
        spec
    }

    /// Whether this is a data module rather than a guest.
    pub fn is_data(&self) -> bool {
        matches!(self.source, GuestSource::Data { .. })
    }

    /// Whether this is a generated ext2 data module (making it needs e2fsprogs).
    pub fn is_ext2(&self) -> bool {
        matches!(
            self.source,
            GuestSource::Data {
                content: DataContent::Generated {
                    fill: Fill::Ext2,
                    ..
                },
                ..
            }
        )
    }

    /// The module command line GRUB passes to the hypervisor: `name args...`.
    pub fn module_cmdline(&self) -> String {
        let mut line = self.name();
        for arg in &self.args {
            line.push(' ');
            match path_option(arg) {
                Some((opt, path)) => {
                    line.push_str(opt);
                    line.push_str(&module_name_for(path));
                }
                None => line.push_str(arg),
            }
        }
        line
    }

    /// The guest and the data modules its path-valued options name
    /// (`initrd=PATH`, `block=PATH`: each file travels as a module of its own, named after
    /// the file, and the option names that module).
    pub fn resolve_all(&self, ws: &Workspace, base: &Path) -> Result<Vec<ResolvedGuest>> {
        let mut guest = self.resolve(ws, base)?;
        let mut out = Vec::new();
        for arg in &mut guest.args {
            let Some((opt, path)) = path_option(arg) else {
                continue;
            };
            let name = module_name_for(path);
            let file = base.join(path);
            fs::metadata(&file).context(|| format!("guest `{}`: {arg}", guest.name))?;
            out.push(ResolvedGuest {
                file_name: format!("{name}.data"),
                name: name.clone(),
                elf: file,
                args: Vec::new(),
            });
            *arg = format!("{opt}{name}");
        }
        out.push(guest);
        Ok(out)
    }

    /// Checks the module command line with the hypervisor's own parser
    /// ([`rustyvisor::lguest::spec::parse`]: `mem=` range, one `mem=`, the length limit) and
    /// returns the guest's RAM in bytes. The message is the one the hypervisor would print.
    pub fn check(&self) -> Result<u64> {
        if self.is_data() {
            return Ok(0);
        }
        let line = self.module_cmdline();
        spec::parse(&line, line.len())
            .map(|s| s.mem)
            .map_err(|e| err!("guest `{}`: {e}", self.name()))
    }

    /// Finds the guest's ELF. Relative paths are taken from `base`.
    pub fn resolve(&self, ws: &Workspace, base: &Path) -> Result<ResolvedGuest> {
        let (name, elf) = match &self.source {
            GuestSource::Package(name) => {
                let guest = ws.guest(name)?;
                (guest.name.clone(), ws.guest_elf(guest))
            }
            GuestSource::File(path) => {
                let path = base.join(path);
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| err!("guest `{}`: no file name", path.display()))?;
                check_elf32(&path)?;
                (name, path)
            }
            GuestSource::Data { name, content } => {
                let path = match content {
                    DataContent::File(path) => {
                        let path = base.join(path);
                        fs::metadata(&path).context(|| format!("data `{name}`"))?;
                        path
                    }
                    DataContent::Generated { size, fill } => {
                        generate_data(&ws.iso_dir().join("data"), *size, *fill)?
                    }
                };
                return Ok(ResolvedGuest {
                    file_name: format!("{name}.data"),
                    name: name.clone(),
                    elf: path,
                    args: Vec::new(),
                });
            }
        };
        Ok(ResolvedGuest {
            file_name: format!("{name}.elf"),
            name,
            elf,
            args: self.args.clone(),
        })
    }

    /// The package this spec names, if any.
    pub fn package(&self) -> Option<&str> {
        match &self.source {
            GuestSource::Package(name) => Some(name),
            GuestSource::File(_) | GuestSource::Data { .. } => None,
        }
    }
}

/// The bytes of a generated data module of `size` bytes of `fill`; `None` for
/// [`Fill::Ext2`], whose image `mke2fs` makes ([`crate::ext2::write_image`]).
pub fn data_bytes(size: u64, fill: Fill) -> Option<Vec<u8>> {
    match fill {
        Fill::Pattern => Some((0..size).map(guest_abi::testdata::pattern_byte).collect()),
        Fill::Zero => Some(vec![0; size as usize]),
        Fill::Ext2 => None,
    }
}

/// Writes (once) the generated data module of `size` bytes of `fill` under `dir`.
fn generate_data(dir: &Path, size: u64, fill: Fill) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SERIAL: AtomicU32 = AtomicU32::new(0);
    // An ext2 image's name holds a checksum of what decides its contents, so that an image
    // made by an older definition is never reused.
    let name = match fill {
        Fill::Ext2 => format!("ext2-{size}-{:08x}", crate::ext2::content_hash()),
        Fill::Pattern | Fill::Zero => format!("{}-{size}", fill.as_str()),
    };
    let path = dir.join(format!("{name}.img"));
    if fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok(path);
    }
    fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    // Written under a temporary name first: two scenarios running at once may both write it.
    let tmp = dir.join(format!(
        "{name}.{}-{}.tmp",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    match data_bytes(size, fill) {
        Some(bytes) => fs::write(&tmp, bytes).context(|| format!("writing {}", tmp.display()))?,
        None => crate::ext2::write_image(&tmp, size, &tmp.with_extension("work"))?,
    }
    fs::rename(&tmp, &path).context(|| format!("renaming {}", tmp.display()))?;
    Ok(path)
}

/// Checks a hypervisor command line with the hypervisor's own parser
/// ([`rustyvisor::config::parse`]) and length limit; the message lists what the hypervisor would
/// report at boot (`unknown option "bogus=1"`, `bad value "qmeu" for exit (...)`).
pub fn check_cmdline(cmdline: &str) -> Result<()> {
    let mut problems: Vec<String> = Vec::new();
    // GRUB passes the words separated by single spaces (see `grub_cfg`).
    let len = cmdline
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .len();
    if len > MAX_CMDLINE {
        problems.push(format!(
            "it is {len} bytes, the limit is {MAX_CMDLINE} (the rest would be cut)"
        ));
    }
    let (_, errors) = config::parse(cmdline);
    problems.extend(errors.iter().map(ToString::to_string));
    if errors.overflow() > 0 {
        problems.push(format!("and {} more problems", errors.overflow()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(err!("--cmdline \"{cmdline}\": {}", problems.join("; ")))
    }
}

/// A guest ready to go into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedGuest {
    /// Guest name: the first word of its module command line.
    pub name: String,
    /// File name under `boot/guests/`.
    pub file_name: String,
    /// The ELF on the host.
    pub elf: PathBuf,
    /// Module command line words after the name.
    pub args: Vec<String>,
}

/// An option whose value is a file to send as a module of its own (`initrd=` or `block=`
/// with a value holding a `/`): the option with its `=`, and the path.
fn path_option(arg: &str) -> Option<(&'static str, &str)> {
    ["initrd=", "block="].into_iter().find_map(|opt| {
        let v = arg.strip_prefix(opt)?;
        v.contains('/').then_some((opt, v))
    })
}

/// The module name a path-valued option's file gets: its file name, made a valid guest
/// module name (letters, digits, `_`, `-`, `.`; at most 32 bytes).
fn module_name_for(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let name: String = file
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(rustyvisor::lguest::spec::MAX_NAME)
        .collect();
    if name.is_empty() { "data".into() } else { name }
}

/// Fails unless `path` is a readable 32-bit ELF file.
fn check_elf32(path: &Path) -> Result<()> {
    let mut header = [0u8; 0x210];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut header))
        .context(|| format!("guest `{}`", path.display()))?;
    let header = &header[..n];
    // A Linux bzImage is a guest too (the hypervisor checks its boot
    // protocol when it loads it).
    if rustyvisor::lguest::bzimage::ImageKind::detect(header)
        == rustyvisor::lguest::bzimage::ImageKind::BzImage
    {
        return Ok(());
    }
    if header.len() < 5 || &header[..4] != b"\x7fELF" {
        return Err(err!(
            "guest `{}` is neither an ELF file nor a Linux bzImage",
            path.display()
        ));
    }
    if header[4] != 1 {
        return Err(err!(
            "guest `{}` is a 64-bit ELF; guests are 32-bit (built for i586-unknown-linux-gnu)",
            path.display()
        ));
    }
    Ok(())
}

/// Quotes a word for GRUB's script syntax when it needs it. GRUB expands `$` and strips quotes
/// like a POSIX shell, so shell quoting is exactly right.
fn grub_word(word: &str) -> String {
    crate::shell_quote(word)
}

/// The `grub.cfg` for one hypervisor command line and a set of guests.
///
/// GRUB's terminal is not routed to serial, so the serial log holds only what the hypervisor
/// (and, under UEFI, the firmware) prints.
pub fn grub_cfg(cmdline: &str, guests: &[ResolvedGuest]) -> String {
    let line = |words: Vec<&str>| {
        words
            .into_iter()
            .map(grub_word)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut cfg = String::from(
        "# generated by `cargo xtask`: do not edit\n\
         set timeout=0\n\
         set timeout_style=hidden\n\
         menuentry \"rustyvisor\" {\n",
    );
    let mut words = vec!["multiboot2", "/boot/rustyvisor.elf"];
    words.extend(cmdline.split_whitespace());
    cfg += &format!("    {}\n", line(words));
    for guest in guests {
        let file = format!("/boot/guests/{}", guest.file_name);
        // `--nounzip`: the hypervisor gets the file's bytes as they are (GRUB would
        // otherwise decompress a gzip'd module: a Linux initrd, a block device's image).
        let mut words = vec!["module2", "--nounzip", file.as_str(), guest.name.as_str()];
        words.extend(guest.args.iter().map(String::as_str));
        cfg += &format!("    {}\n", line(words));
    }
    cfg += "    boot\n}\n";
    cfg
}

/// What goes into one image.
#[derive(Debug, Clone)]
pub struct Image<'a> {
    /// Image name: the staging directory is `<target>/iso-stage/<name>/`.
    pub name: &'a str,
    /// The hypervisor ELF.
    pub hypervisor: &'a Path,
    /// Hypervisor command line.
    pub cmdline: &'a str,
    /// Guest modules, in order.
    pub guests: &'a [ResolvedGuest],
}

impl Image<'_> {
    /// Stages the image and writes the ISO to `iso` with `grub-mkrescue`.
    pub fn write_iso(&self, ws: &Workspace, iso: &Path) -> Result<()> {
        check_multiboot2(self.hypervisor)?;
        let stage = ws.stage_dir(self.name);
        if stage.exists() {
            fs::remove_dir_all(&stage).context(|| format!("removing {}", stage.display()))?;
        }
        let boot = stage.join("boot");
        for dir in [boot.join("grub"), boot.join("guests")] {
            fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        }
        copy(self.hypervisor, &boot.join("rustyvisor.elf"))?;
        let mut staged: BTreeMap<&str, &Path> = BTreeMap::new();
        for guest in self.guests {
            match staged.get(guest.file_name.as_str()) {
                Some(elf) if *elf == guest.elf.as_path() => continue,
                Some(elf) => {
                    return Err(err!(
                        "two different guests are both named `{}`: {} and {}",
                        guest.name,
                        elf.display(),
                        guest.elf.display()
                    ));
                }
                None => {}
            }
            if !guest.elf.is_file() {
                return Err(err!(
                    "guest `{}` is not built: {} is missing (run `cargo xtask build`)",
                    guest.name,
                    guest.elf.display()
                ));
            }
            copy(&guest.elf, &boot.join("guests").join(&guest.file_name))?;
            staged.insert(&guest.file_name, &guest.elf);
        }
        let cfg = boot.join("grub").join("grub.cfg");
        fs::write(&cfg, grub_cfg(self.cmdline, self.guests))
            .context(|| format!("writing {}", cfg.display()))?;
        if let Some(dir) = iso.parent() {
            fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        }
        let output = Command::new("grub-mkrescue")
            .arg("-o")
            .arg(iso)
            .arg(&stage)
            .output()
            .context(|| "running grub-mkrescue".to_string())?;
        if !output.status.success() {
            return Err(err!(
                "grub-mkrescue failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr).trim_end()
            ));
        }
        Ok(())
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Fails with an explanation unless GRUB would accept `elf` as a multiboot2 kernel.
pub fn check_multiboot2(elf: &Path) -> Result<()> {
    if !elf.is_file() {
        return Err(err!(
            "hypervisor ELF {} does not exist (run `cargo xtask build`)",
            elf.display()
        ));
    }
    let status = Command::new("grub-file")
        .arg("--is-x86-multiboot2")
        .arg(elf)
        .status()
        .context(|| "running grub-file".to_string())?;
    if !status.success() {
        return Err(err!(
            "{} is not a multiboot2 kernel (`grub-file --is-x86-multiboot2` says no): the \
             multiboot2 header must be 8-byte aligned in the first 32 KiB of the file with a \
             valid checksum (see boot/boot.S and linker.ld)",
            elf.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_modules() {
        let d = GuestSpec::parse("data:disk:1M:pattern").unwrap();
        assert_eq!(d.name(), "disk");
        assert!(d.is_data());
        assert_eq!(d.check().unwrap(), 0);
        assert_eq!(
            d.source,
            GuestSource::Data {
                name: "disk".into(),
                content: DataContent::Generated {
                    size: 1 << 20,
                    fill: Fill::Pattern
                }
            }
        );
        assert_eq!(d.spec_string(), "data:disk:1048576:pattern");
        assert_eq!(GuestSpec::parse(&d.spec_string()).unwrap(), d);
        let f = GuestSpec::parse("data:img=tests/x.img").unwrap();
        assert_eq!(f.spec_string(), "data:img=tests/x.img");
        assert_eq!(
            GuestSpec::parse("data:z:4K").unwrap().source,
            GuestSource::Data {
                name: "z".into(),
                content: DataContent::Generated {
                    size: 4096,
                    fill: Fill::Pattern
                }
            }
        );
        for bad in [
            "data:disk",
            "data:disk:0",
            "data:disk:1G",
            "data:disk:1M:ones",
            "data:a:b:1M",
            "data::1M",
            "data:disk=",
            "data:disk:1M,x",
        ] {
            assert!(GuestSpec::parse(bad).is_err(), "{bad}");
        }
        let bytes = data_bytes(1024, Fill::Pattern).unwrap();
        assert_eq!(bytes[700], guest_abi::testdata::pattern_byte(700));
        assert_eq!(data_bytes(3, Fill::Zero).unwrap(), [0, 0, 0]);
        assert_eq!(data_bytes(4 << 20, Fill::Ext2), None);
        assert!(!d.is_ext2());
    }

    #[test]
    fn ext2_data_modules() {
        let d = GuestSpec::parse("data:disk:4M:ext2").unwrap();
        assert!(d.is_data() && d.is_ext2());
        assert_eq!(d.name(), "disk");
        assert_eq!(
            d.source,
            GuestSource::Data {
                name: "disk".into(),
                content: DataContent::Generated {
                    size: 4 << 20,
                    fill: Fill::Ext2
                }
            }
        );
        assert_eq!(d.spec_string(), "data:disk:4194304:ext2");
        assert_eq!(GuestSpec::parse(&d.spec_string()).unwrap(), d);
        assert!(GuestSpec::parse("data:disk:1M:ext2").is_ok());
        let e = GuestSpec::parse("data:disk:512K:ext2").unwrap_err();
        assert!(e.message().contains("at least 1 MiB"), "{e}");
        let e = GuestSpec::parse("data:disk:4M:ext3").unwrap_err();
        assert!(
            e.message()
                .contains("the fill is `pattern`, `zero` or `ext2`"),
            "{e}"
        );
        assert!(GuestSpec::parse("data:disk:4M:ext2,x").is_err());
        assert!(!GuestSpec::parse("vio,block=disk").unwrap().is_ext2());
    }

    use super::*;

    #[test]
    fn spec_with_path_and_items() {
        let spec = GuestSpec::parse("path/to/kernel.elf,mem=16M,console=hvc0").unwrap();
        assert_eq!(
            spec.source,
            GuestSource::File(PathBuf::from("path/to/kernel.elf"))
        );
        assert_eq!(spec.args, ["mem=16M", "console=hvc0"]);
        assert_eq!(spec.package(), None);
    }

    #[test]
    fn spec_with_name() {
        let spec = GuestSpec::parse("hello").unwrap();
        assert_eq!(spec.package(), Some("hello"));
        assert!(spec.args.is_empty());
        assert_eq!(
            GuestSpec::parse("kernel.elf").unwrap().source,
            GuestSource::File(PathBuf::from("kernel.elf"))
        );
    }

    #[test]
    fn spec_errors() {
        assert!(GuestSpec::parse("").is_err());
        assert!(GuestSpec::parse(",mem=1M").is_err());
        // Only the shape is parsed; the hypervisor's rules are `check`'s.
        assert!(GuestSpec::parse("hello,mem=lots").is_ok());
        assert!(GuestSpec::parse("he llo").is_err());
    }

    fn check(spec: &str) -> Result<u64> {
        GuestSpec::parse(spec).unwrap().check()
    }

    #[test]
    fn guest_checks_use_the_hypervisor_rule() {
        use rustyvisor::units::{GIB, MIB};
        assert_eq!(check("hello").unwrap(), spec::DEFAULT_GUEST_MEM);
        assert_eq!(check("hello,mem=16MiB").unwrap(), 16 * MIB);
        assert_eq!(check("hello,mem=4M").unwrap(), 4 * MIB);
        assert_eq!(check("./k.elf,mem=3G,console=hvc0").unwrap(), 3 * GIB);
        for (bad, message) in [
            (
                "hello,mem=5000G",
                "guest `hello`: bad mem=\"5000G\": guest RAM must be from 4 MiB to 3 GiB",
            ),
            (
                "hello,mem=4194303",
                "guest `hello`: bad mem=\"4194303\": guest RAM must be from 4 MiB to 3 GiB",
            ),
            (
                "a/k.elf,mem=lots",
                "guest `k`: bad mem=\"lots\": not a size",
            ),
            (
                "hello,mem=16M,mem=32M",
                "guest `hello`: mem= given twice (mem=16M and mem=32M)",
            ),
        ] {
            let e = check(bad).unwrap_err();
            assert!(e.message().starts_with(message), "{bad}: {e}");
        }
    }

    #[test]
    fn module_line_length_is_the_hypervisor_limit() {
        // "hello " + "x=" + padding: exactly the limit, then one byte more.
        let pad = "y".repeat(spec::MAX_MODULE_CMDLINE - "hello x=".len());
        let spec = GuestSpec::parse(&format!("hello,x={pad}")).unwrap();
        assert_eq!(spec.module_cmdline().len(), spec::MAX_MODULE_CMDLINE);
        assert!(spec.check().is_ok());
        let e = check(&format!("hello,x={pad}y")).unwrap_err();
        assert_eq!(
            e.message(),
            "guest `hello`: module command line is 257 bytes, the limit is 256"
        );
    }

    #[test]
    fn cmdline_checks_use_the_hypervisor_parser() {
        assert!(check_cmdline("").is_ok());
        assert!(check_cmdline("exit=qemu log=debug selftest=memory,timer").is_ok());
        let e = check_cmdline("exit=qmeu").unwrap_err();
        assert!(
            e.message()
                .starts_with("--cmdline \"exit=qmeu\": bad value \"qmeu\" for exit (expected"),
            "{e}"
        );
        let e = check_cmdline("exit=qemu bogus=1 log=loud").unwrap_err();
        assert!(
            e.message()
                .contains("unknown option \"bogus=1\"; bad value \"loud\" for log"),
            "{e}"
        );
        let long = format!("exit=qemu {}", "log=info ".repeat(200));
        assert!(
            check_cmdline(&long)
                .unwrap_err()
                .message()
                .contains("the limit is 1024")
        );
        let at_limit = format!("exit=qemu x{}", "x".repeat(MAX_CMDLINE - 11));
        assert_eq!(at_limit.len(), MAX_CMDLINE);
        // Only the unknown option, not the length, is reported.
        assert!(
            !check_cmdline(&at_limit)
                .unwrap_err()
                .message()
                .contains("limit")
        );
    }

    #[test]
    fn grub_cfg_has_one_entry_with_modules() {
        let guests = [ResolvedGuest {
            name: "kernel".into(),
            file_name: "kernel.elf".into(),
            elf: PathBuf::from("/x/kernel.elf"),
            args: vec!["mem=16M".into(), "console=hvc0".into()],
        }];
        let cfg = grub_cfg("exit=qemu  log=debug", &guests);
        assert_eq!(
            cfg,
            "# generated by `cargo xtask`: do not edit\n\
             set timeout=0\n\
             set timeout_style=hidden\n\
             menuentry \"rustyvisor\" {\n    \
             multiboot2 /boot/rustyvisor.elf exit=qemu log=debug\n    \
             module2 --nounzip /boot/guests/kernel.elf kernel mem=16M console=hvc0\n    \
             boot\n}\n"
        );
        assert!(!cfg.contains("serial"));
    }

    #[test]
    fn grub_words_are_quoted_when_needed() {
        assert_eq!(grub_word("a=b,c"), "a=b,c");
        assert_eq!(grub_word("$x"), "'$x'");
        assert_eq!(grub_word("it's"), r"'it'\''s'");
        assert_eq!(grub_word("a;b"), "'a;b'");
    }

    #[test]
    fn only_32_bit_elf_or_bzimage_guests() {
        let dir = std::env::temp_dir().join(format!("rv-elf-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (e32, e64, txt) = (dir.join("a.elf"), dir.join("b.elf"), dir.join("c.elf"));
        fs::write(&e32, b"\x7fELF\x01\x01\x01").unwrap();
        fs::write(&e64, b"\x7fELF\x02\x01\x01").unwrap();
        fs::write(&txt, b"hello").unwrap();
        assert!(check_elf32(&e32).is_ok());
        assert!(check_elf32(&e64).unwrap_err().message().contains("64-bit"));
        assert!(
            check_elf32(&txt)
                .unwrap_err()
                .message()
                .contains("neither an ELF file nor a Linux bzImage")
        );
        // A bzImage's setup header: "HdrS" at 0x202.
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = dir.join("bzImage");
        fs::write(&bzp, &bz).unwrap();
        assert!(check_elf32(&bzp).is_ok());
        assert!(check_elf32(&dir.join("missing.elf")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
