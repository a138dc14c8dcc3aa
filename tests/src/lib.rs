//! rustyvisor's integration harness, shared with `cargo xtask`.
//!
//! An integration test is a [`scenario::Scenario`]: a hypervisor command line, guest modules and
//! a virtual machine, booted from a GRUB ISO ([`image`]) in QEMU ([`qemu`]) by the [`runner`], and
//! judged from its serial log and exit status by the pure functions in [`verdict`]. Scenarios
//! live in `tests/scenarios/*.toml`; `docs/testing.md` explains the format. Benchmarks reuse the
//! same machinery and parse `bench:` lines ([`mod@bench`]).
//!
//! Everything here runs on the host; `cargo test -p rustyvisor-tests` tests it without QEMU.

pub mod bench;
pub mod error;
pub mod ext2;
pub mod image;
pub mod input;
pub mod qemu;
pub mod runner;
pub mod scenario;
pub mod verdict;
pub mod workspace;

pub use error::{Error, Result};

/// Quotes `word` for a POSIX shell (and GRUB's script syntax) when it needs quoting.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-=,./:+@%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("exit=qemu"), "exit=qemu");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$x"), "'$x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
