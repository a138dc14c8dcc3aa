//! PASS/FAIL reporting for test guests.
//!
//! Each check prints one console line, `PASS: <name>` or
//! `FAIL: <name> (<expression>) at <file>:<line>`; [`finish`] prints
//! `DONE: <p> passed, <f> failed` and powers off with the message
//! `power off`. Integration tests match these lines in the serial log.

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::println;

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Record and print the outcome of one check; returns `ok`.
pub fn report(ok: bool, name: fmt::Arguments<'_>, expr: &str, file: &str, line: u32) -> bool {
    if ok {
        PASSED.fetch_add(1, Ordering::Relaxed);
        println!("PASS: {name}");
    } else {
        FAILED.fetch_add(1, Ordering::Relaxed);
        println!("FAIL: {name} ({expr}) at {file}:{line}");
    }
    ok
}

/// Record and print an equality check; on failure both values are shown.
pub fn report_eq<T: fmt::Debug + PartialEq>(
    left: &T,
    right: &T,
    name: fmt::Arguments<'_>,
    file: &str,
    line: u32,
) -> bool {
    let ok = left == right;
    if ok {
        PASSED.fetch_add(1, Ordering::Relaxed);
        println!("PASS: {name}");
    } else {
        FAILED.fetch_add(1, Ordering::Relaxed);
        println!("FAIL: {name} (left {left:?} != right {right:?}) at {file}:{line}");
    }
    ok
}

/// Number of checks that passed so far.
pub fn passed() -> u32 {
    PASSED.load(Ordering::Relaxed)
}

/// Number of checks that failed so far.
pub fn failed() -> u32 {
    FAILED.load(Ordering::Relaxed)
}

/// Print `DONE: <p> passed, <f> failed` if any check ran (for a guest that
/// ends some other way than [`finish`], e.g. with a restart).
pub fn summary() {
    let (p, f) = (passed(), failed());
    if p + f > 0 {
        println!("DONE: {p} passed, {f} failed");
    }
}

/// Print the summary (if any check ran) and power off with `"power off"`.
/// Returning from the guest's `main` calls this.
pub fn finish() -> ! {
    summary();
    crate::hcall::power_off("power off")
}

/// `check!(condition, "name")` or `check!(cond, "name {}", args...)`:
/// print `PASS: name` or `FAIL: name (condition) at file:line`. Evaluates to
/// the condition.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($name:tt)+) => {
        $crate::test::report(
            $cond,
            ::core::format_args!($($name)+),
            ::core::stringify!($cond),
            ::core::file!(),
            ::core::line!(),
        )
    };
}

/// `check_eq!(left, right, "name")`: like [`check!`] but prints both values
/// on failure.
#[macro_export]
macro_rules! check_eq {
    ($left:expr, $right:expr, $($name:tt)+) => {
        $crate::test::report_eq(
            &$left,
            &$right,
            ::core::format_args!($($name)+),
            ::core::file!(),
            ::core::line!(),
        )
    };
}
