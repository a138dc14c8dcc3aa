//! A guest module's command line: `name [mem=SIZE] [args...]`.
//!
//! GRUB hands each guest module a command line (`module2 FILE name args...`).
//! The first word names the guest; `mem=SIZE` (at most once, a size in the
//! [`parse_size`] grammar) sets its RAM, between
//! [`MIN_GUEST_MEM`] and [`MAX_GUEST_MEM`] (default [`DEFAULT_GUEST_MEM`]);
//! `paging=2level` or `paging=pae` (at most once) declares the page-table
//! format the guest uses once it turns on paging (2-level by default); every
//! word but the name and `mem=` goes to the guest as its own command line.
//!
//! Device and lifecycle options (each at most once; a bad value refuses the
//! guest with a message naming the option):
//!
//! | word | meaning |
//! |---|---|
//! | `block=MODULE` | a virtio block device backed by a copy of the GRUB module whose name (first word of its command line) is `MODULE`; that module is data, not a guest |
//! | `net` | a virtio network device on the hypervisor's switch |
//! | `console` / `noconsole` | the virtio console (on by default; `console` is accepted and changes nothing) |
//! | `restart=N` | restarts honoured, 0 to [`MAX_RESTARTS`] (default [`DEFAULT_RESTARTS`]) |
//!
//! These words stay on the guest's command line too (like `paging=`), so a
//! guest can see which devices it was given; an entropy device is always
//! there.
//!
//! The hypervisor's launcher and `cargo xtask` (which refuses a bad
//! `--guest` before building anything) both use [`parse`], so a spec is
//! accepted or refused with the same message on both sides.

// Guest-controlled values: every index is a `get()`, every sum a checked,
// saturating or (where the operands are bounded, said in a comment)
// wrapping operation.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

extern crate alloc;

use guest_abi::paging::{PAGING_2LEVEL, PAGING_PAE};

use super::pagewalk::Format;
use alloc::string::String;
use core::fmt;

use crate::units::{Bytes, GIB, MIB, parse_size};

/// Smallest guest RAM accepted with `mem=`.
pub const MIN_GUEST_MEM: u64 = 4 * MIB;
/// Largest guest RAM accepted with `mem=` (the linear map uses one PDPT:
/// 4 GiB, minus room for device pages above RAM).
pub const MAX_GUEST_MEM: u64 = 3 * GIB;
/// Guest RAM when the module line has no `mem=`.
pub const DEFAULT_GUEST_MEM: u64 = 16 * MIB;
/// Restarts honoured per guest when the line has no `restart=`.
pub const DEFAULT_RESTARTS: u32 = 3;
/// Largest `restart=`.
pub const MAX_RESTARTS: u32 = 100;

/// Longest module command line the hypervisor keeps, in bytes (what it
/// copies out of the boot information). Longer lines are refused, never cut.
pub const MAX_MODULE_CMDLINE: usize = 256;

/// A parsed guest module command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec<'a> {
    /// The guest's name: the first word (`"guest"` if the line is empty).
    pub name: &'a str,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// The guest's own command line: every word but the name and `mem=`,
    /// separated by single spaces (`paging=` stays: the guest may read it
    /// too).
    pub args: String,
    /// The page-table format the guest uses once it turns paging on
    /// (`paging=2level` or `paging=pae`; 2-level by default, like the
    /// lguest kernels of the era), fixed for its life.
    pub paging: Format,
    /// The devices asked for on the line.
    pub devices: DeviceSpec<'a>,
    /// Restarts honoured (`restart=N`, default [`DEFAULT_RESTARTS`]).
    pub restarts: u32,
    /// `initrd=MODULE`: the data module a Linux guest gets as its initial
    /// ramdisk (placed at the top of its RAM).
    pub initrd: Option<&'a str>,
}

/// The virtio devices a guest asked for (the entropy device is always
/// given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpec<'a> {
    /// `block=MODULE`: the name of the data module backing a block device.
    pub block: Option<&'a str>,
    /// `net`: a network device.
    pub net: bool,
    /// The virtio console (off with `noconsole`).
    pub console: bool,
}

impl Default for DeviceSpec<'_> {
    fn default() -> Self {
        Self {
            block: None,
            net: false,
            console: true,
        }
    }
}

/// Why a guest module command line is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecError<'a> {
    /// The line is longer than [`MAX_MODULE_CMDLINE`] (its full length).
    TooLong(usize),
    /// `mem=` is not a size.
    BadMem(&'a str),
    /// `mem=` is a size outside [`MIN_GUEST_MEM`]..=[`MAX_GUEST_MEM`].
    MemOutOfRange(&'a str),
    /// `mem=` appears twice (both values).
    DuplicateMem(&'a str, &'a str),
    /// The name is not one word of at most [`MAX_NAME`] letters, digits,
    /// `_`, `-` and `.`.
    BadName(&'a str),
    /// `paging=` is neither `2level` nor `pae`.
    BadPaging(&'a str),
    /// `paging=` appears twice (both values).
    DuplicatePaging(&'a str, &'a str),
    /// `block=` does not name a module (the value).
    BadBlock(&'a str),
    /// `initrd=` does not name a module (the value).
    BadInitrd(&'a str),
    /// `restart=` is not a number from 0 to [`MAX_RESTARTS`] (the value).
    BadRestart(&'a str),
    /// A device or lifecycle option appears twice (the option's name).
    Duplicate(&'static str),
    /// `console` and `noconsole` both given.
    ConsoleConflict,
}

/// Longest guest name.
pub const MAX_NAME: usize = 32;

/// Whether `name` may be a guest's name: one word of at most [`MAX_NAME`]
/// ASCII letters, digits, `_`, `-` and `.`. The console relies on it: guest
/// text is printed after `guest NAME: ` and the hypervisor's own lines about
/// a guest as `guest NAME <status>`, so a name must never hold a space, a
/// colon or anything a terminal would interpret.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl fmt::Display for SpecError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = (Bytes(MIN_GUEST_MEM), Bytes(MAX_GUEST_MEM));
        match self {
            Self::TooLong(len) => write!(
                f,
                "module command line is {len} bytes, the limit is {MAX_MODULE_CMDLINE}"
            ),
            Self::BadMem(v) => write!(
                f,
                "bad mem=\"{v}\": not a size (expected a size from {} to {}, e.g. mem=16M)",
                range.0, range.1
            ),
            Self::MemOutOfRange(v) => write!(
                f,
                "bad mem=\"{v}\": guest RAM must be from {} to {}",
                range.0, range.1
            ),
            Self::DuplicateMem(a, b) => {
                write!(f, "mem= given twice (mem={a} and mem={b}); give it once")
            }
            Self::BadPaging(v) => write!(
                f,
                "bad paging=\"{}\": the page-table format is paging=2level (the default) or \
                 paging=pae",
                super::console::Escaped::new(v.as_bytes())
            ),
            Self::DuplicatePaging(a, b) => write!(
                f,
                "paging= given twice (paging={} and paging={}); give it once",
                super::console::Escaped::new(a.as_bytes()),
                super::console::Escaped::new(b.as_bytes())
            ),
            Self::BadBlock(v) => write!(
                f,
                "bad block=\"{}\": give the name of a GRUB module (the first word of its \
                 command line), e.g. block=disk",
                super::console::Escaped::new(v.as_bytes())
            ),
            Self::BadInitrd(v) => write!(
                f,
                "bad initrd=\"{}\": give the name of a GRUB module (the first word of its \
                 command line), e.g. initrd=rootfs",
                super::console::Escaped::new(v.as_bytes())
            ),
            Self::BadRestart(v) => write!(
                f,
                "bad restart=\"{}\": the number of restarts is 0 to {MAX_RESTARTS} (default \
                 {DEFAULT_RESTARTS})",
                super::console::Escaped::new(v.as_bytes())
            ),
            Self::Duplicate(opt) => write!(f, "{opt} given twice; give it once"),
            Self::ConsoleConflict => f.write_str("console and noconsole both given; give one"),
            Self::BadName(name) => write!(
                f,
                "bad name \"{}\": a guest name is up to {MAX_NAME} letters, digits, '_', '-' \
                 and '.' (the first word of the module command line)",
                super::console::Escaped::new(name.as_bytes())
            ),
        }
    }
}

/// The guest name of a module command line (its first word), for messages
/// even when [`parse`] refuses the line.
#[must_use]
pub fn name_of(cmdline: &str) -> &str {
    cmdline.split_whitespace().next().unwrap_or("guest")
}

/// Parses a module command line whose full length, as the boot loader gave
/// it, is `full_len` bytes (`cmdline` may be a truncated copy of it).
///
/// # Errors
///
/// A line longer than [`MAX_MODULE_CMDLINE`], a `mem=` that is not a size
/// or is out of range, a second `mem=`, a `paging=` that is not a format,
/// a second `paging=`.
pub fn parse(cmdline: &str, full_len: usize) -> Result<GuestSpec<'_>, SpecError<'_>> {
    let full_len = full_len.max(cmdline.len());
    if full_len > MAX_MODULE_CMDLINE {
        return Err(SpecError::TooLong(full_len));
    }
    let mut words = cmdline.split_whitespace();
    let name = words.next().unwrap_or("guest");
    if !valid_name(name) {
        return Err(SpecError::BadName(name));
    }
    let mut mem: Option<(&str, u64)> = None;
    let mut paging: Option<(&str, Format)> = None;
    let mut args = String::new();
    let mut devices = DeviceSpec::default();
    let mut console_word: Option<bool> = None;
    let mut net = false;
    let mut restarts: Option<u32> = None;
    let mut initrd: Option<&str> = None;
    for w in words {
        if let Some(v) = w.strip_prefix("initrd=") {
            if initrd.is_some() {
                return Err(SpecError::Duplicate("initrd="));
            }
            if !valid_name(v) {
                return Err(SpecError::BadInitrd(v));
            }
            initrd = Some(v);
        } else if let Some(v) = w.strip_prefix("block=") {
            if devices.block.is_some() {
                return Err(SpecError::Duplicate("block="));
            }
            if !valid_name(v) {
                return Err(SpecError::BadBlock(v));
            }
            devices.block = Some(v);
        } else if let Some(v) = w.strip_prefix("restart=") {
            if restarts.is_some() {
                return Err(SpecError::Duplicate("restart="));
            }
            let n = v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_RESTARTS && !v.starts_with('+'))
                .ok_or(SpecError::BadRestart(v))?;
            restarts = Some(n);
        } else if w == "net" {
            if net {
                return Err(SpecError::Duplicate("net"));
            }
            net = true;
        } else if w == "console" || w == "noconsole" {
            let on = w == "console";
            match console_word {
                Some(prev) if prev == on => {
                    return Err(SpecError::Duplicate(if on {
                        "console"
                    } else {
                        "noconsole"
                    }));
                }
                Some(_) => return Err(SpecError::ConsoleConflict),
                None => console_word = Some(on),
            }
        }
        if let Some(v) = w.strip_prefix("paging=") {
            if let Some((first, _)) = paging {
                return Err(SpecError::DuplicatePaging(first, v));
            }
            let f = match v {
                PAGING_2LEVEL => Format::TwoLevel,
                PAGING_PAE => Format::Pae,
                _ => return Err(SpecError::BadPaging(v)),
            };
            paging = Some((v, f));
        }
        if let Some(v) = w.strip_prefix("mem=") {
            if let Some((first, _)) = mem {
                return Err(SpecError::DuplicateMem(first, v));
            }
            let bytes = parse_size(v).ok_or(SpecError::BadMem(v))?;
            if !(MIN_GUEST_MEM..=MAX_GUEST_MEM).contains(&bytes) {
                return Err(SpecError::MemOutOfRange(v));
            }
            mem = Some((v, bytes));
        } else {
            if !args.is_empty() {
                args.push(' ');
            }
            args.push_str(w);
        }
    }
    Ok(GuestSpec {
        name,
        mem: mem.map_or(DEFAULT_GUEST_MEM, |(_, bytes)| bytes),
        args,
        paging: paging.map_or(Format::TwoLevel, |(_, f)| f),
        devices: DeviceSpec {
            net,
            console: console_word.unwrap_or(true),
            ..devices
        },
        restarts: restarts.unwrap_or(DEFAULT_RESTARTS),
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn ok(line: &str) -> GuestSpec<'_> {
        parse(line, line.len()).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn err(line: &str) -> SpecError<'_> {
        parse(line, line.len()).expect_err(line)
    }

    #[test]
    fn paging_format() {
        assert_eq!(ok("g").paging, Format::TwoLevel);
        assert_eq!(ok("g paging=2level").paging, Format::TwoLevel);
        let s = ok("g paging=pae x");
        assert_eq!(s.paging, Format::Pae);
        assert_eq!(s.args, "paging=pae x", "the guest sees the word too");
        assert_eq!(err("g paging=4level"), SpecError::BadPaging("4level"));
        assert_eq!(
            err("g paging=pae paging=2level"),
            SpecError::DuplicatePaging("pae", "2level")
        );
        assert!(
            err("g paging=x").to_string().contains("paging=pae"),
            "the message names the values"
        );
    }

    #[test]
    fn name_mem_and_args() {
        let s = ok("hello mem=32M  mode=x   verbose");
        assert_eq!(s.name, "hello");
        assert_eq!(s.mem, 32 * MIB);
        assert_eq!(s.args, "mode=x verbose");
        let s = ok("hello");
        assert_eq!(
            (s.name, s.mem, s.args.as_str()),
            ("hello", DEFAULT_GUEST_MEM, "")
        );
        assert_eq!(ok("").name, "guest");
        assert_eq!(ok("lgtest mem=16MiB").mem, 16 * MIB);
        assert_eq!(ok("lgtest mem=1g").mem, GIB);
    }

    #[test]
    fn mem_bounds() {
        assert_eq!(ok("g mem=4M").mem, MIN_GUEST_MEM);
        assert_eq!(ok("g mem=4194304").mem, MIN_GUEST_MEM);
        assert_eq!(err("g mem=4194303"), SpecError::MemOutOfRange("4194303"));
        assert_eq!(ok("g mem=3G").mem, MAX_GUEST_MEM);
        assert_eq!(ok("g mem=3221225472").mem, MAX_GUEST_MEM);
        assert_eq!(
            err("g mem=3221225473"),
            SpecError::MemOutOfRange("3221225473")
        );
        assert_eq!(err("g mem=5000G"), SpecError::MemOutOfRange("5000G"));
        assert_eq!(err("g mem=0"), SpecError::MemOutOfRange("0"));
    }

    #[test]
    fn garbage_mem() {
        for bad in ["lots", "", "16X", "1.5G", "-4M", "99999999999999999999"] {
            let line = alloc::format!("g mem={bad}");
            assert_eq!(parse(&line, line.len()), Err(SpecError::BadMem(bad)));
        }
    }

    #[test]
    fn duplicate_mem() {
        let e = err("g mem=16M x mem=32M");
        assert_eq!(e, SpecError::DuplicateMem("16M", "32M"));
        assert_eq!(
            e.to_string(),
            "mem= given twice (mem=16M and mem=32M); give it once"
        );
        // Even when both are equal: a repeated option is a mistake.
        assert!(matches!(
            err("g mem=16M mem=16M"),
            SpecError::DuplicateMem(..)
        ));
    }

    #[test]
    fn messages() {
        assert_eq!(
            err("g mem=5000G").to_string(),
            "bad mem=\"5000G\": guest RAM must be from 4 MiB to 3 GiB"
        );
        assert_eq!(
            err("g mem=lots").to_string(),
            "bad mem=\"lots\": not a size (expected a size from 4 MiB to 3 GiB, e.g. mem=16M)"
        );
    }

    #[test]
    fn length_limit() {
        let mut line = "g ".to_string();
        while line.len() < MAX_MODULE_CMDLINE {
            line.push('x');
        }
        assert_eq!(line.len(), MAX_MODULE_CMDLINE);
        assert!(parse(&line, line.len()).is_ok());
        // A copy cut to the limit, of a line one byte longer.
        assert_eq!(
            parse(&line, MAX_MODULE_CMDLINE + 1),
            Err(SpecError::TooLong(MAX_MODULE_CMDLINE + 1))
        );
        line.push('x');
        assert_eq!(
            err(&line).to_string(),
            "module command line is 257 bytes, the limit is 256"
        );
    }

    #[test]
    fn names_are_one_safe_word() {
        for good in ["hello", "a", "web-1", "db_2.test", &"x".repeat(MAX_NAME)] {
            assert!(valid_name(good), "{good}");
            assert_eq!(ok(good).name, good);
        }
        for bad in [
            "",
            "a:b",
            "a\x1b",
            "caf\u{e9}",
            "a/b",
            &"x".repeat(MAX_NAME + 1),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        let e = parse("he:llo mem=16M", 14).unwrap_err();
        assert_eq!(e, SpecError::BadName("he:llo"));
        // Shown escaped: a name cannot drive the console.
        let e = parse("a\x1b[2J", 8).unwrap_err().to_string();
        assert!(e.starts_with("bad name \"a\\x1b[2J\""), "{e}");
    }

    #[test]
    fn device_options() {
        let s = ok("vio block=disk net restart=0 x");
        assert_eq!(
            s.devices,
            DeviceSpec {
                block: Some("disk"),
                net: true,
                console: true
            }
        );
        assert_eq!(s.restarts, 0);
        assert_eq!(s.args, "block=disk net restart=0 x", "the guest sees them");
        let s = ok("g");
        assert_eq!(s.devices, DeviceSpec::default());
        assert_eq!(s.restarts, DEFAULT_RESTARTS);
        assert!(ok("g console").devices.console);
        assert!(!ok("g noconsole").devices.console);
        assert_eq!(ok("g restart=100").restarts, MAX_RESTARTS);
        for bad in ["101", "-1", "+3", "x", "", "99999999999"] {
            let line = alloc::format!("g restart={bad}");
            assert_eq!(parse(&line, line.len()), Err(SpecError::BadRestart(bad)));
        }
        assert_eq!(ok("g initrd=rootfs").initrd, Some("rootfs"));
        assert_eq!(ok("g").initrd, None);
        assert_eq!(err("g initrd="), SpecError::BadInitrd(""));
        assert_eq!(err("g initrd=a/b"), SpecError::BadInitrd("a/b"));
        assert_eq!(err("g initrd=a initrd=b"), SpecError::Duplicate("initrd="));
        assert_eq!(err("g block="), SpecError::BadBlock(""));
        assert_eq!(err("g block=a:b"), SpecError::BadBlock("a:b"));
        assert_eq!(err("g block=a block=b"), SpecError::Duplicate("block="));
        assert_eq!(err("g net net"), SpecError::Duplicate("net"));
        assert_eq!(
            err("g restart=1 restart=1"),
            SpecError::Duplicate("restart=")
        );
        assert_eq!(err("g console noconsole"), SpecError::ConsoleConflict);
        assert_eq!(
            err("g noconsole noconsole"),
            SpecError::Duplicate("noconsole")
        );
        assert_eq!(
            err("g restart=x").to_string(),
            "bad restart=\"x\": the number of restarts is 0 to 100 (default 3)"
        );
        assert!(
            err("g block=\x1b")
                .to_string()
                .starts_with("bad block=\"\\x1b\"")
        );
        // Look-alikes are the guest's own words.
        assert_eq!(ok("g network blockx=1").devices, DeviceSpec::default());
    }

    #[test]
    fn name_of_refused_lines() {
        assert_eq!(name_of("  hello mem=lots"), "hello");
        assert_eq!(name_of(""), "guest");
    }
}
