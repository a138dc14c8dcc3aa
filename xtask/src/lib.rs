//! `cargo xtask`: rustyvisor's build, image, run, test and bench tooling.
//!
//! The heavy lifting (images, QEMU command lines, scenarios, verdicts) lives in the
//! `rustyvisor-tests` crate so that the integration harness and `cargo xtask run` share it; this
//! crate parses the command line, checks host tools, drives cargo and reports to people.
//! `cargo xtask help` lists the commands; `docs/testing.md` describes the tests.

pub mod build;
pub mod cli;
pub mod commands;
pub mod prereq;
pub mod toolchain;

use cli::Command;

/// Runs `cargo xtask` with the arguments after the program name; returns the exit status.
pub fn main(argv: &[String]) -> i32 {
    let command = match cli::parse(argv) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("{}", cli::usage_error(&e));
            return 2;
        }
    };
    let result = match &command {
        Command::Help => {
            print!("{}", cli::USAGE);
            Ok(0)
        }
        Command::Build { profile } => commands::build_all(*profile),
        Command::Iso {
            output,
            image,
            profile,
            no_build,
        } => commands::iso(output, image, *profile, *no_build),
        Command::Run(args) => commands::run(args),
        Command::Test(args) => commands::test(args),
        Command::Bench { no_build } => commands::bench(*no_build),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        1
    })
}
