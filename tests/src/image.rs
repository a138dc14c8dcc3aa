//! Bootable images: guest specifications, `grub.cfg`, and the hybrid BIOS + UEFI ISO.
//!
//! An image is a staging directory handed to `grub-mkrescue`:
//!
//! ```text
//! boot/rustyvisor.elf          the hypervisor (multiboot2)
//! boot/guests/<name>.elf       one file per distinct guest
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
}

/// A parsed `--guest` / scenario `guests` entry: `name-or-path[,arg]...`.
///
/// A path must contain a `/` or end in `.elf`; anything else names a package in `guests/`.
/// The arguments go to the guest's module command line after its name; `mem=SIZE` is checked.
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
        let source = if first.contains('/') || first.ends_with(".elf") {
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
        let mut args = Vec::new();
        for word in items.flat_map(str::split_whitespace) {
            if let Some(size) = word.strip_prefix("mem=")
                && !is_size(size)
            {
                return Err(err!(
                    "guest `{spec}`: bad `{word}`: expected a size such as mem=16M"
                ));
            }
            args.push(word.to_string());
        }
        Ok(Self { source, args })
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
            GuestSource::File(_) => None,
        }
    }
}

/// Whether `s` is a memory size such as `16M`, `5G` or `4096` (QEMU's and the guests' syntax).
pub fn is_size(s: &str) -> bool {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    s.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
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

/// Fails unless `path` is a readable 32-bit ELF file.
fn check_elf32(path: &Path) -> Result<()> {
    let mut header = [0u8; 5];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .context(|| format!("guest `{}`", path.display()))?;
    if &header[..4] != b"\x7fELF" {
        return Err(err!("guest `{}` is not an ELF file", path.display()));
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
        let mut words = vec!["module2", file.as_str(), guest.name.as_str()];
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
        assert!(GuestSpec::parse("hello,mem=lots").is_err());
        assert!(GuestSpec::parse("he llo").is_err());
    }

    #[test]
    fn sizes() {
        for ok in ["16M", "5G", "4096", "512k"] {
            assert!(is_size(ok), "{ok}");
        }
        for bad in ["", "M", "0", "16MB", "1.5G", "-1M"] {
            assert!(!is_size(bad), "{bad}");
        }
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
             module2 /boot/guests/kernel.elf kernel mem=16M console=hvc0\n    \
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
    fn only_32_bit_elf_guests() {
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
                .contains("not an ELF")
        );
        assert!(check_elf32(&dir.join("missing.elf")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
