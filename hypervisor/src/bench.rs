//! The `bench:` lines the hypervisor prints in bench mode (`bench` on its
//! command line), formatted here so that the format is unit-tested on the
//! host. `cargo xtask bench` parses them (`tests/src/bench.rs`;
//! `docs/benchmarks.md` describes the format):
//!
//! ```text
//! bench: name=native_syscall value=2 unit=insn floor=-
//! bench: name=hypercall_roundtrip.stub value=12 unit=insn floor=-
//! ```
//!
//! A name `metric.stage` is one stage of `metric`'s breakdown: the harness
//! prints it under the metric, whoever (guest or hypervisor) reports the
//! metric itself.

use core::fmt;

/// One `bench:` line, ready to be printed with `{}` (no newline).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchLine<'a> {
    /// The metric, or for a stage the metric it belongs to.
    pub metric: &'a str,
    /// The stage of `metric`, if this line is one part of a breakdown.
    pub stage: Option<&'a str>,
    /// Instructions (TSC ticks under `-icount shift=0`).
    pub value: f64,
    /// The metric this one is compared with (`None` prints `-`).
    pub floor: Option<&'a str>,
    /// The unit: `insn` unless [`Self::in_unit`] says otherwise.
    pub unit: &'a str,
}

impl<'a> BenchLine<'a> {
    /// A metric's line.
    pub const fn metric(metric: &'a str, value: f64, floor: Option<&'a str>) -> Self {
        Self {
            metric,
            stage: None,
            value,
            floor,
            unit: "insn",
        }
    }

    /// The same line in another unit (`bytes`, `guests`, `insn/KiB`).
    pub const fn in_unit(self, unit: &'a str) -> Self {
        Self { unit, ..self }
    }

    /// A stage line: `metric.stage`, no floor.
    pub const fn stage(metric: &'a str, stage: &'a str, value: f64) -> Self {
        Self {
            metric,
            stage: Some(stage),
            value,
            floor: None,
            unit: "insn",
        }
    }
}

/// `value` with at most two decimals and no trailing zeros (`2`, `0.03`,
/// `159.5`); negative or non-finite values (a broken measurement) print
/// as `0`, which the harness accepts, rather than a token it would reject.
pub struct Insn(pub f64);

impl fmt::Display for Insn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.0.is_finite() && self.0 > 0.0 {
            self.0
        } else {
            0.0
        };
        // Hundredths, rounded half up; far below 2^53 for any real count.
        let hundredths = (v * 100.0 + 0.5) as u64;
        let (int, frac) = (hundredths / 100, hundredths % 100);
        match frac {
            0 => write!(f, "{int}"),
            _ if frac % 10 == 0 => write!(f, "{int}.{}", frac / 10),
            _ => write!(f, "{int}.{frac:02}"),
        }
    }
}

impl fmt::Display for BenchLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bench: name={}", self.metric)?;
        if let Some(stage) = self.stage {
            write!(f, ".{stage}")?;
        }
        write!(
            f,
            " value={} unit={} floor={}",
            Insn(self.value),
            self.unit,
            self.floor.unwrap_or("-")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_short() {
        let s = |v: f64| Insn(v).to_string();
        assert_eq!(s(2.0), "2");
        assert_eq!(s(2.0 / 64.0), "0.03");
        assert_eq!(s(159.5), "159.5");
        assert_eq!(s(1.006), "1.01");
        assert_eq!(s(0.004), "0");
        assert_eq!(s(-1.0), "0");
        assert_eq!(s(f64::NAN), "0");
        assert_eq!(s(636.0), "636");
    }

    #[test]
    fn lines() {
        assert_eq!(
            BenchLine::metric("native_syscall", 2.0, None).to_string(),
            "bench: name=native_syscall value=2 unit=insn floor=-"
        );
        assert_eq!(
            BenchLine::metric("x", 3.25, Some("native_syscall")).to_string(),
            "bench: name=x value=3.25 unit=insn floor=native_syscall"
        );
        assert_eq!(
            BenchLine::stage("hypercall_roundtrip", "stub", 12.0).to_string(),
            "bench: name=hypercall_roundtrip.stub value=12 unit=insn floor=-"
        );
        assert_eq!(
            BenchLine::metric("guest_overhead", 40960.0, None)
                .in_unit("bytes")
                .to_string(),
            "bench: name=guest_overhead value=40960 unit=bytes floor=-"
        );
    }
}
