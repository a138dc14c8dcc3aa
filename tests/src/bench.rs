//! Benchmark figures from serial logs.
//!
//! A bench guest (or the hypervisor) prints one line per metric:
//!
//! ```text
//! bench: name=hypercall_roundtrip value=412 unit=insn floor=native_int_roundtrip
//! bench: name=native_int_roundtrip value=315 unit=insn floor=-
//! ```
//!
//! `floor` names another metric of the same run (same unit) or is `-` for a floor itself; the
//! ratio is `value / floor's value`. Results are printed as a table and written as JSON
//! (`docs/benchmarks.md` describes the figures).

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};

use crate::err;
use crate::error::Result;
use crate::qemu::{CPU_MODEL, MACHINE};

/// The prefix of a bench line.
pub const PREFIX: &str = "bench:";

/// One `bench:` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Measured value.
    pub value: f64,
    /// Unit (`insn`, `cycles`, `bytes`...).
    pub unit: String,
    /// The metric this one is compared with.
    pub floor: Option<String>,
    /// 1-based line in the serial log.
    pub line_no: usize,
}

/// A metric with its ratio to its floor.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// Metric name.
    pub name: String,
    /// Measured value.
    pub value: f64,
    /// Unit.
    pub unit: String,
    /// Floor metric, if any.
    pub floor: Option<String>,
    /// `value / floor value`, rounded to 3 decimals.
    pub ratio: Option<f64>,
}

/// The part after `bench:` of a bench line printed by the hypervisor itself
/// (`bench: ...`) or by a guest, whose console lines the hypervisor prefixes
/// with `guest NAME: `.
fn bench_payload(line: &str) -> Option<&str> {
    line.strip_prefix(PREFIX).or_else(|| {
        line.strip_prefix("guest ")
            .and_then(|r| r.split_once(": "))
            .and_then(|(_, r)| r.strip_prefix(PREFIX))
    })
}

/// Reads every `bench:` line of a (cleaned) serial log, including those a
/// guest printed.
pub fn parse_samples(lines: &[String]) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = bench_payload(line) else {
            continue;
        };
        let line_no = i + 1;
        let bad = |what: String| err!("serial log line {line_no}: {what}: `{line}`");
        let (mut name, mut value, mut unit, mut floor) = (None, None, None, None);
        for item in rest.split_whitespace() {
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("`{item}` is not key=value")))?;
            let slot = match key {
                "name" => &mut name,
                "value" => &mut value,
                "unit" => &mut unit,
                "floor" => &mut floor,
                _ => return Err(bad(format!("unknown key `{key}`"))),
            };
            if slot.replace(val).is_some() {
                return Err(bad(format!("`{key}` given twice")));
            }
        }
        let need = |v: Option<&str>, key: &str| {
            v.filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| bad(format!("missing {key}=")))
        };
        let name = need(name, "name")?;
        let unit = need(unit, "unit")?;
        let raw_value = need(value, "value")?;
        let value: f64 = raw_value
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| bad(format!("value `{raw_value}` is not a number")))?;
        let floor = floor
            .filter(|f| !matches!(*f, "" | "-" | "none"))
            .map(str::to_string);
        samples.push(Sample {
            name,
            value,
            unit,
            floor,
            line_no,
        });
    }
    Ok(samples)
}

/// Computes each metric's ratio to its floor. Every floor must be measured in the same run, in
/// the same unit, with a non-zero value; each metric may appear once.
pub fn compute(samples: &[Sample]) -> Result<Vec<BenchResult>> {
    for (i, s) in samples.iter().enumerate() {
        if let Some(first) = samples[..i].iter().find(|o| o.name == s.name) {
            return Err(err!(
                "metric `{}` reported twice (serial log lines {} and {})",
                s.name,
                first.line_no,
                s.line_no
            ));
        }
    }
    samples
        .iter()
        .map(|s| {
            let ratio = match &s.floor {
                None => None,
                Some(floor) => {
                    let f = samples.iter().find(|o| &o.name == floor).ok_or_else(|| {
                        err!(
                            "metric `{}` (line {}): its floor `{floor}` was not measured",
                            s.name,
                            s.line_no
                        )
                    })?;
                    if f.unit != s.unit {
                        return Err(err!(
                            "metric `{}` is in {} but its floor `{floor}` is in {}",
                            s.name,
                            s.unit,
                            f.unit
                        ));
                    }
                    if f.value == 0.0 {
                        return Err(err!("floor `{floor}` of `{}` measured 0", s.name));
                    }
                    Some((s.value / f.value * 1000.0).round() / 1000.0)
                }
            };
            Ok(BenchResult {
                name: s.name.clone(),
                value: s.value,
                unit: s.unit.clone(),
                floor: s.floor.clone(),
                ratio,
            })
        })
        .collect()
}

/// The `machine` field of the JSON: what produced the figures.
pub fn machine_description() -> String {
    format!("qemu {MACHINE}, -cpu {CPU_MODEL}")
}

/// A number as JSON: integral values without a fraction.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        // Exact: integral and far below 2^53.
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// The results file: `{"mode": ..., "machine": ..., "results": [...]}`, one line.
pub fn to_json(mode: &str, machine: &str, results: &[BenchResult]) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        mode: &'a str,
        machine: &'a str,
        results: Vec<Entry<'a>>,
    }
    #[derive(Serialize)]
    struct Entry<'a> {
        name: &'a str,
        value: Value,
        unit: &'a str,
        floor: Option<&'a str>,
        ratio: Option<f64>,
    }
    let doc = Doc {
        mode,
        machine,
        results: results
            .iter()
            .map(|r| Entry {
                name: &r.name,
                value: number(r.value),
                unit: &r.unit,
                floor: r.floor.as_deref(),
                ratio: r.ratio,
            })
            .collect(),
    };
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_string(&doc).unwrap_or_default() + "\n"
}

/// A table for the terminal.
pub fn table(mode: &str, results: &[BenchResult]) -> String {
    let rows: Vec<[String; 5]> = results
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                number(r.value).to_string(),
                r.unit.clone(),
                r.floor.clone().unwrap_or_else(|| "-".into()),
                r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.3}")),
            ]
        })
        .collect();
    let header = ["metric", "value", "unit", "floor", "ratio"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = format!("mode: {mode} ({})\n", machine_description());
    for row in std::iter::once(&header).chain(&rows) {
        let _ = writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:<w2$}  {:<w3$}  {:>w4$}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    const LOG: &str = "rustyvisor 0.1.0\n\
        bench: name=native_int_roundtrip value=300 unit=insn floor=-\n\
        not a bench: name=x\n\
        guest bench: bench: name=hypercall_roundtrip value=412 unit=insn floor=native_int_roundtrip\n\
        guest bench: not a bench: name=y\n\
        bench: name=guest_overhead value=1.5 unit=MiB\n";

    #[test]
    fn parses_bench_lines_only() {
        let samples = parse_samples(&lines(LOG)).unwrap();
        assert_eq!(
            samples,
            [
                Sample {
                    name: "native_int_roundtrip".into(),
                    value: 300.0,
                    unit: "insn".into(),
                    floor: None,
                    line_no: 2,
                },
                Sample {
                    name: "hypercall_roundtrip".into(),
                    value: 412.0,
                    unit: "insn".into(),
                    floor: Some("native_int_roundtrip".into()),
                    line_no: 4,
                },
                Sample {
                    name: "guest_overhead".into(),
                    value: 1.5,
                    unit: "MiB".into(),
                    floor: None,
                    line_no: 6,
                },
            ]
        );
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        for (line, needle) in [
            ("bench: name=a unit=insn", "missing value="),
            (
                "bench: name=a value=x unit=insn",
                "value `x` is not a number",
            ),
            ("bench: name=a value=-1 unit=insn", "is not a number"),
            ("bench: value=1 unit=insn", "missing name="),
            ("bench: name=a value=1", "missing unit="),
            (
                "bench: name=a value=1 unit=insn colour=red",
                "unknown key `colour`",
            ),
            ("bench: name=a name=b value=1 unit=insn", "given twice"),
            (
                "bench: name=a value 1 unit=insn",
                "`value` is not key=value",
            ),
        ] {
            let e = parse_samples(&lines(&format!("x\n{line}"))).unwrap_err();
            assert!(e.message().starts_with("serial log line 2: "), "{e}");
            assert!(e.message().contains(needle), "{needle:?} not in {e}");
        }
    }

    #[test]
    fn ratios_divide_by_the_floor() {
        let results = compute(&parse_samples(&lines(LOG)).unwrap()).unwrap();
        let ratios: Vec<_> = results.iter().map(|r| r.ratio).collect();
        assert_eq!(ratios, [None, Some(1.373), None]);
    }

    #[test]
    fn floors_must_exist_match_units_and_be_unique() {
        let check = |log: &str, needle: &str| {
            let e = compute(&parse_samples(&lines(log)).unwrap()).unwrap_err();
            assert!(e.message().contains(needle), "{needle:?} not in {e}");
        };
        check(
            "bench: name=a value=1 unit=insn floor=b",
            "its floor `b` was not measured",
        );
        check(
            "bench: name=b value=1 unit=cycles\nbench: name=a value=1 unit=insn floor=b",
            "`a` is in insn but its floor `b` is in cycles",
        );
        check(
            "bench: name=b value=0 unit=insn\nbench: name=a value=1 unit=insn floor=b",
            "measured 0",
        );
        check(
            "bench: name=a value=1 unit=insn\nbench: name=a value=2 unit=insn",
            "reported twice (serial log lines 1 and 2)",
        );
    }

    #[test]
    fn json_document() {
        assert_eq!(
            to_json("icount", &machine_description(), &[]),
            format!(
                "{{\"mode\":\"icount\",\"machine\":\"qemu q35, -cpu {CPU_MODEL}\",\"results\":[]}}\n"
            )
        );
        let results = compute(&parse_samples(&lines(LOG)).unwrap()).unwrap();
        let doc: Value = serde_json::from_str(&to_json("icount", "m", &results)).unwrap();
        assert_eq!(
            doc["results"][1],
            json!({"name": "hypercall_roundtrip", "value": 412, "unit": "insn",
                   "floor": "native_int_roundtrip", "ratio": 1.373})
        );
        assert_eq!(doc["results"][0]["floor"], Value::Null);
        assert_eq!(doc["results"][2]["value"], json!(1.5));
    }

    #[test]
    fn table_lines_up() {
        let results = compute(&parse_samples(&lines(LOG)).unwrap()).unwrap();
        let text = table("icount", &results);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 5);
        assert!(rows[0].starts_with("mode: icount (qemu q35"));
        assert_eq!(
            rows[3],
            "hypercall_roundtrip     412  insn  native_int_roundtrip  1.373"
        );
        assert!(rows.iter().skip(1).all(|r| r.len() == rows[1].len()));
    }
}
