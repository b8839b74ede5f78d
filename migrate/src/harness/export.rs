//! Results out: the comparison table, the target checks, the JSON list and the SVG plot
//! (fault-wait distributions and per-vCPU blocktime; hand-written SVG: no system libraries,
//! no fonts).

use std::fmt::Write as _;

use crate::harness::result::RunResult;
use crate::options::{MigrationMode, Workload};
use crate::svg::{text_width, Anchor, Box2, Canvas, Style};

pub(crate) fn fmt_us(us: f64) -> String {
    if us <= 0.0 {
        "-".into()
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

pub(crate) fn fmt_ms(ms: f64) -> String {
    fmt_us(ms * 1e3)
}

fn fmt_rate(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.0}"))
}

/// The comparison table, one row per run.
pub fn table(rows: &[RunResult]) -> String {
    let mut out = String::new();
    // Postcopy recovery's column, when a run survived a break.
    let recovery = rows.iter().any(|r| r.recovery.cuts > 0);
    // Several vCPUs: their blocked time added up, beside the time all were blocked at once.
    let vcpus = rows.iter().any(|r| r.setup.vcpus > 1);
    let mut head = vec![
        "workload",
        "mode",
        "faults",
        "req p50",
        "req p99",
        "blocktime",
        "longest pause",
        "downtime",
        "postcopy",
        "MiB/s",
        "precopy MiB",
        "urgent/bg pages",
        "hints off/taken",
        "guest ops/s before→after",
        "verified",
    ];
    if recovery {
        head.insert(head.len() - 1, "cuts/recovery");
    }
    if vcpus {
        head.insert(6, "vCPUs blocked");
    }
    let mut cells: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        if r.outcome.error.is_some() {
            let mut row = vec![r.setup.workload.clone(), r.label()];
            row.resize(head.len() - 1, "-".into());
            row.push("FAILED".into());
            cells.push(row);
            continue;
        }
        let mut row = vec![
            r.setup.workload.clone(),
            r.label(),
            r.waits.faults.to_string(),
            fmt_us(r.waits.request_p50_us),
            fmt_us(r.waits.request_p99_us),
            fmt_ms(r.waits.blocktime_ms),
            fmt_ms(r.waits.longest_pause_ms),
            fmt_ms(r.transfer.downtime_ms),
            fmt_ms(r.transfer.duration_ms),
            format!("{:.0}", r.transfer.throughput_mib_s),
            format!("{:.0}", r.transfer.precopy_bytes as f64 / (1 << 20) as f64),
            format!("{}/{}", r.source.pages_urgent, r.source.pages_background),
            format!("{}/{}", r.source.hints_offered, r.source.hints_taken),
            format!(
                "{}→{}",
                fmt_rate(r.guest_run.progress_before_per_s),
                fmt_rate(r.guest_run.progress_after_per_s)
            ),
            if r.outcome.verified {
                "yes".into()
            } else {
                "NO".into()
            },
        ];
        if vcpus {
            row.insert(6, fmt_ms(r.waits.stall_ms));
        }
        if recovery {
            row.insert(
                row.len() - 1,
                format!(
                    "{}/{}",
                    r.recovery.cuts,
                    fmt_ms(r.recovery.recovery_total_ms)
                ),
            );
        }
        cells.push(row);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| {
            cells
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in cells.iter().enumerate() {
        if i == 1 || (i > 1 && rows[i - 1].setup.workload != rows[i - 2].setup.workload) {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (s, w))| {
                let pad = w - s.chars().count();
                if c < 2 {
                    format!("{s}{}", " ".repeat(pad))
                } else {
                    format!("{}{s}", " ".repeat(pad))
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if vcpus {
        out.push_str(&per_vcpu_table(rows));
    }
    out
}

/// Each vCPU's blocked time and longest pause, one row per run (several vCPUs).
fn per_vcpu_table(rows: &[RunResult]) -> String {
    let n = rows
        .iter()
        .map(|r| r.waits.vcpu_blocktime_ms.len())
        .max()
        .unwrap_or(0);
    let mut cells: Vec<Vec<String>> = vec![["workload", "mode"]
        .iter()
        .map(|s| s.to_string())
        .chain((0..n).map(|v| format!("vCPU {v} blocked / pause")))
        .collect()];
    for r in rows.iter().filter(|r| r.outcome.error.is_none()) {
        let w = &r.waits;
        cells.push(
            [r.setup.workload.clone(), r.label()]
                .into_iter()
                .chain((0..n).map(
                    |v| match (w.vcpu_blocktime_ms.get(v), w.vcpu_pause_ms.get(v)) {
                        (Some(&b), Some(&p)) => format!("{} / {}", fmt_ms(b), fmt_ms(p)),
                        (Some(&b), None) => fmt_ms(b),
                        _ => String::new(),
                    },
                ))
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..n + 2)
        .map(|c| {
            cells
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::from("\nper vCPU (blocked time / longest pause: a stream's time behind schedule, else the longest fault)\n");
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (s, w))| {
                let pad = " ".repeat(w - s.chars().count());
                if c < 2 {
                    format!("{s}{pad}")
                } else {
                    format!("{pad}{s}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// One target of the issue, checked on this run's results.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TargetCheck {
    /// What is compared.
    pub what: String,
    /// The measured ratio (None if a run is missing).
    pub ratio: Option<f64>,
    /// Whether it meets the target.
    pub pass: bool,
    /// The target, in words.
    pub target: String,
    /// What bounds the ratio in this run, when something outside the compared path does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The run of `w` in `m`: with the resend where both behaviours ran (`--resend both`).
fn find(rows: &[RunResult], w: Workload, m: MigrationMode) -> Option<&RunResult> {
    let mut it = rows
        .iter()
        .filter(|r| is(r, w, m) && r.outcome.error.is_none());
    let first = it.next()?;
    Some(if first.setup.resend {
        first
    } else {
        it.find(|r| r.setup.resend).unwrap_or(first)
    })
}

/// The run of `w` in preempt mode `m` with the old behaviour (no resend), if it ran.
fn find_old(rows: &[RunResult], w: Workload, m: MigrationMode) -> Option<&RunResult> {
    rows.iter()
        .find(|r| is(r, w, m) && !r.setup.resend && r.outcome.error.is_none())
}

/// Whether `r` is a run of `w` in `m`.
fn is(r: &RunResult, w: Workload, m: MigrationMode) -> bool {
    r.setup.workload == w.name() && r.setup.mode == m.name()
}

/// A target on one measure of one workload, the ratio of its value in one mode to its
/// value in another.
struct ModeRatio {
    workload: Workload,
    num: MigrationMode,
    den: MigrationMode,
    /// The measure's name and how to read it.
    measure: (&'static str, fn(&RunResult) -> f64),
    /// The target in words, and whether a ratio meets it.
    target: (&'static str, fn(f64) -> bool),
}

impl ModeRatio {
    /// The ratio in `rows`, if both runs are there (a zero denominator: 1 when the
    /// numerator is zero too, else infinite).
    fn ratio(&self, rows: &[RunResult]) -> Option<f64> {
        let f = self.measure.1;
        let x = f(find(rows, self.workload, self.num)?);
        let y = f(find(rows, self.workload, self.den)?);
        Some(if y > 0.0 {
            x / y
        } else if x > 0.0 {
            f64::INFINITY
        } else {
            1.0
        })
    }

    /// Checked on `rows`, named `what`.
    fn check(&self, rows: &[RunResult], what: String) -> TargetCheck {
        let ratio = self.ratio(rows);
        TargetCheck {
            what,
            ratio,
            pass: ratio.is_some_and(self.target.1),
            target: self.target.0.into(),
            note: None,
        }
    }
}

const REQUEST_P50: (&str, fn(&RunResult) -> f64) = ("request p50", |r| r.waits.request_p50_us);
const BLOCKTIME: (&str, fn(&RunResult) -> f64) = ("blocktime", |r| r.waits.blocktime_ms);
const PAUSE: (&str, fn(&RunResult) -> f64) = ("longest pause", |r| r.waits.longest_pause_ms);
const FIVE_X: (&str, fn(f64) -> bool) = (">= 5x", |x| x >= 5.0);
const NO_WORSE: (&str, fn(f64) -> bool) = ("<= 1x (no worse)", |x| x <= 1.0);

/// The targets between modes: the urgent channel against vanilla, the hint against
/// preempt, and the hint costing nothing where it does not help.
const MODE_TARGETS: [ModeRatio; 4] = [
    ModeRatio {
        workload: Workload::Random,
        num: MigrationMode::Vanilla,
        den: MigrationMode::Preempt,
        measure: REQUEST_P50,
        target: FIVE_X,
    },
    ModeRatio {
        workload: Workload::Seq,
        num: MigrationMode::Preempt,
        den: MigrationMode::PreemptHint,
        measure: BLOCKTIME,
        target: FIVE_X,
    },
    ModeRatio {
        workload: Workload::Stream,
        num: MigrationMode::Preempt,
        den: MigrationMode::PreemptHint,
        measure: PAUSE,
        target: FIVE_X,
    },
    ModeRatio {
        workload: Workload::Random,
        num: MigrationMode::PreemptHint,
        den: MigrationMode::Preempt,
        measure: REQUEST_P50,
        target: ("<= 1.1x", |x| x <= 1.1),
    },
];

/// With 2 MiB host pages the hint must also make nothing worse.
const HUGE_PAGE_TARGETS: [ModeRatio; 2] = [
    ModeRatio {
        workload: Workload::Seq,
        num: MigrationMode::PreemptHint,
        den: MigrationMode::Preempt,
        measure: BLOCKTIME,
        target: NO_WORSE,
    },
    ModeRatio {
        workload: Workload::Stream,
        num: MigrationMode::PreemptHint,
        den: MigrationMode::Preempt,
        measure: ("pause", |r| r.waits.longest_pause_ms),
        target: NO_WORSE,
    },
];

/// The vCPUs' blocked time added up (each vCPU's blocktime, summed).
const SUMMED: (&str, fn(&RunResult) -> f64) = ("vCPU blocktime summed", |r| r.waits.stall_ms);
const THREE_X: (&str, fn(f64) -> bool) = (">= 3x", |x| x >= 3.0);
const WITHIN_1_1: (&str, fn(f64) -> bool) = ("<= 1.1x", |x| x <= 1.1);

/// The targets of one hint slot per vCPU against one slot, with several vCPUs (at least
/// [`MANY_VCPUS`]): each vCPU's locality followed, and random faults no slower.
const STREAMS_TARGETS: [ModeRatio; 3] = [
    ModeRatio {
        workload: Workload::Seq,
        num: MigrationMode::PreemptHint,
        den: MigrationMode::PreemptHints,
        measure: SUMMED,
        target: THREE_X,
    },
    ModeRatio {
        workload: Workload::Stream,
        num: MigrationMode::PreemptHint,
        den: MigrationMode::PreemptHints,
        measure: SUMMED,
        target: THREE_X,
    },
    ModeRatio {
        workload: Workload::Random,
        num: MigrationMode::PreemptHints,
        den: MigrationMode::PreemptHint,
        measure: REQUEST_P50,
        target: WITHIN_1_1,
    },
];

/// The vCPU count from which [`STREAMS_TARGETS`] apply.
const MANY_VCPUS: u32 = 4;

/// The measure a workload is judged by: random faults by their request latency, streams by
/// their longest pause, the others by the vCPUs' blocked time.
fn headline(w: Workload) -> (&'static str, fn(&RunResult) -> f64) {
    match w {
        Workload::Random => REQUEST_P50,
        Workload::Stream | Workload::Mixed => PAUSE,
        Workload::Seq | Workload::Kv => SUMMED,
    }
}

/// With one vCPU, one slot per vCPU is one slot: `preempt-hints` must do as well as
/// `preempt-hint` on every workload, by the workload's own measure.
fn one_vcpu_targets() -> Vec<ModeRatio> {
    Workload::ALL
        .iter()
        .map(|&workload| ModeRatio {
            workload,
            num: MigrationMode::PreemptHints,
            den: MigrationMode::PreemptHint,
            measure: headline(workload),
            target: WITHIN_1_1,
        })
        .collect()
}

/// The targets of `preempt-hints`, where it ran: with [`MANY_VCPUS`] vCPUs or more, or with
/// one (`2M: ` prefixed with 2 MiB host pages).
fn streams_targets(rows: &[RunResult]) -> Vec<TargetCheck> {
    if !rows
        .iter()
        .any(|r| r.setup.mode == MigrationMode::PreemptHints.name())
    {
        return Vec::new();
    }
    let vcpus = rows.iter().map(|r| r.setup.vcpus).max().unwrap_or(1);
    let huge = if rows.iter().any(|r| r.setup.host_page > 4096) {
        "2M: "
    } else {
        ""
    };
    let check = |t: &ModeRatio| {
        let what = format!(
            "{huge}{vcpus} vCPU{}: {} {}: {} / {}",
            if vcpus == 1 { "" } else { "s" },
            t.workload,
            t.measure.0,
            t.num,
            t.den
        );
        t.check(rows, what)
    };
    match vcpus {
        1 => one_vcpu_targets().iter().map(check).collect(),
        n if n >= MANY_VCPUS => STREAMS_TARGETS.iter().map(check).collect(),
        _ => Vec::new(),
    }
}

/// Checks the targets that the runs present allow: between modes, the tail of the urgent
/// path, the resend's share of the bytes, 2 MiB pages, one hint slot per vCPU, and every run
/// verified.
pub fn targets(rows: &[RunResult]) -> Vec<TargetCheck> {
    let mut out: Vec<TargetCheck> = MODE_TARGETS
        .iter()
        .map(|t| {
            let what = format!("{} {}: {} / {}", t.workload, t.measure.0, t.num, t.den);
            t.check(rows, what)
        })
        .collect();
    out.extend(streams_targets(rows));
    out.extend(tail_targets(rows));
    if rows.iter().any(|r| r.setup.resend) {
        out.push(resend_share(rows));
    }
    if rows.iter().any(|r| r.setup.host_page > 4096) {
        out.extend(HUGE_PAGE_TARGETS.iter().map(|t| {
            let what = format!("2M: {} {} {} / {}", t.workload, t.measure.0, t.num, t.den);
            t.check(rows, what)
        }));
    }
    if !rows.is_empty() {
        let n = rows.iter().filter(|r| r.outcome.verified).count();
        out.push(TargetCheck {
            what: format!("runs verified: {n} of {}", rows.len()),
            ratio: None,
            pass: n == rows.len(),
            target: "all".into(),
            note: None,
        });
    }
    out
}

/// The urgent path's tail in preempt-hint under `random`: p99 over p50, and the resend
/// against the old path (with a note where the old path's p99 over the new path's p50,
/// which no new p99 can beat, is what missed).
fn tail_targets(rows: &[RunResult]) -> [TargetCheck; 2] {
    let (w, m) = (Workload::Random, MigrationMode::PreemptHint);
    let hint = find(rows, w, m).filter(|r| r.setup.resend);
    let check = |what: String, ratio: Option<f64>, target: &str, ok: fn(f64) -> bool| TargetCheck {
        what,
        ratio,
        pass: ratio.is_some_and(ok),
        target: target.into(),
        note: None,
    };
    let spread = check(
        format!("{w} request p99 / p50 in {m}"),
        hint.map(|r| r.waits.request_p99_us / r.waits.request_p50_us.max(1e-9)),
        "<= 4x",
        |x| x <= 4.0,
    );
    let pair = hint.zip(find_old(rows, w, m));
    let mut tail = check(
        format!("{w} request p99 in {m}: no resend / resend"),
        pair.map(|(new, old)| old.waits.request_p99_us / new.waits.request_p99_us.max(1e-9)),
        FIVE_X.0,
        FIVE_X.1,
    );
    // A p99 is never below its p50, so no change to the new path can take the tail ratio
    // past the old path's p99 over the new path's p50; say so where that bound is what misses.
    if let Some((new, old)) = pair {
        let bound = old.waits.request_p99_us / new.waits.request_p50_us.max(1e-9);
        if !tail.pass && bound < 5.0 {
            tail.note = Some(format!(
                "at most {bound:.2}x was possible in this run: the old path's p99 over the new \
                 path's p50 (a p99 is never below its p50)"
            ));
        }
    }
    [spread, tail]
}

/// The bytes the resend sent again, as a share of every postcopy byte of every run.
fn resend_share(rows: &[RunResult]) -> TargetCheck {
    let (resent, sent): (u64, u64) = rows
        .iter()
        .filter(|r| r.outcome.error.is_none())
        .fold((0, 0), |(a, b), r| {
            (a + r.source.resent_bytes, b + r.transfer.postcopy_bytes)
        });
    let ratio = (sent > 0).then(|| 100.0 * resent as f64 / sent as f64);
    TargetCheck {
        what: "resent bytes / postcopy bytes, all runs, %".into(),
        ratio,
        pass: ratio.is_some_and(|x| x <= 1.0),
        target: "<= 1".into(),
        note: None,
    }
}

/// A check's mark: `PASS`, `MISS`, or `n/a ` when a run it compares is missing.
fn mark(c: &TargetCheck) -> &'static str {
    if c.pass {
        "PASS"
    } else if c.ratio.is_none() && c.target != "all" {
        "n/a "
    } else {
        "MISS"
    }
}

/// Whether any check missed its target (one that could not be checked, `n/a`, does not).
pub fn any_missed(checks: &[TargetCheck]) -> bool {
    checks.iter().any(|c| mark(c) == "MISS")
}

/// The target checks as text lines: `[MARK] what = ratio; target: goal`.
pub fn targets_text(checks: &[TargetCheck]) -> String {
    targets_text_with(checks, &[])
}

/// [`targets_text`] with each ratio's range over repeats (`ranges[i]` for `checks[i]`,
/// where known: see [`crate::harness::medians::ranges`]).
pub fn targets_text_with(checks: &[TargetCheck], ranges: &[Option<(f64, f64)>]) -> String {
    let mut out = String::new();
    for (i, c) in checks.iter().enumerate() {
        let mut val = match c.ratio {
            Some(r) if r.is_finite() && c.what.ends_with('%') => format!(" = {r:.3}"),
            Some(r) if r.is_finite() => format!(" = {r:.2}x"),
            Some(_) => " = inf".into(),
            None if c.target == "all" || c.what.contains("not comparable") => String::new(),
            None => " (not run)".into(),
        };
        if let Some(&Some((lo, hi))) = ranges.get(i) {
            let _ = write!(val, " (repeats {lo:.2}–{hi:.2})");
        }
        let _ = writeln!(out, "  [{}] {}{val}; target: {}", mark(c), c.what, c.target);
        if let Some(note) = &c.note {
            let _ = writeln!(out, "         {note}");
        }
    }
    out
}

/// How an invocation ended: its exit status and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Exit {
    /// The process's exit status (see `--help`).
    pub status: u8,
    /// Why, in words.
    pub reason: String,
}

impl Exit {
    /// The exit of an invocation whose runs are `rows`, of which `failures` failed, with
    /// the `targets` checked (enforced with `check`).
    pub fn of(
        rows: &[RunResult],
        failures: &[String],
        targets: &[TargetCheck],
        check: bool,
    ) -> Self {
        let (status, reason) = if !failures.is_empty() {
            (
                2,
                format!("{} of {} runs failed", failures.len(), rows.len()),
            )
        } else if rows.iter().any(|r| !r.outcome.verified) {
            (1, "some runs failed verification".to_string())
        } else if check && any_missed(targets) {
            (1, "a target missed (--check)".to_string())
        } else {
            (
                0,
                format!("every run ({}) completed and verified", rows.len()),
            )
        };
        Self { status, reason }
    }
}

/// What the JSON says about the invocation besides its runs.
#[derive(Clone, Debug)]
pub struct Invocation<'a> {
    /// The command line, program name first.
    pub command_line: Vec<String>,
    /// Which guest ran, and why.
    pub guest_note: &'a str,
    /// The setup in one line (guest, vCPUs, RAM, precopy, link).
    pub setup: &'a str,
    /// Wall time of the runs, s.
    pub seconds: f64,
    /// Each failed run, in words.
    pub failures: &'a [String],
    /// How it ended.
    pub exit: Exit,
}

/// The keys of the JSON's top-level object, in order (a test pins them).
pub const JSON_KEYS: &[&str] = &[
    "program",
    "version",
    "protocol_version",
    "command_line",
    "guest_note",
    "setup",
    "seconds",
    "exit_status",
    "exit_reason",
    "failures",
    "targets",
    "rows",
];

/// The keys of a run that a failed run still has (its settings and how it failed); every
/// other key of a failed run is null: nothing was measured.
fn configured_keys() -> Vec<String> {
    let v = serde_json::json!({
        "setup": crate::harness::result::Setup::default(),
        "outcome": crate::harness::result::Outcome::default(),
    });
    ["setup", "outcome"]
        .iter()
        .flat_map(|k| v[k].as_object().into_iter().flat_map(|o| o.keys().cloned()))
        .collect()
}

/// A run as the JSON has it: a failed run's measurements are null, not zero.
fn row_json(r: &RunResult, configured: &[String]) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
    if r.outcome.error.is_some() {
        if let Some(o) = v.as_object_mut() {
            for (k, x) in o.iter_mut() {
                if !configured.contains(k) {
                    *x = serde_json::Value::Null;
                }
            }
        }
    }
    v
}

/// The whole result of an invocation as one JSON object: the program, its version and the
/// protocol's, the command line, the guest note and the setup, the time, the exit status
/// and why, each failure, each target with its ratio and mark (`PASS`, `MISS`, `n/a`), and
/// the runs (one object each, the keys [`RunResult`] pins; a failed run's measurements are
/// null).
pub fn json(inv: &Invocation<'_>, rows: &[RunResult], targets: &[TargetCheck]) -> String {
    let configured = configured_keys();
    let targets: Vec<serde_json::Value> = targets
        .iter()
        .map(|t| {
            let mut v = serde_json::to_value(t).unwrap_or(serde_json::Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("mark".into(), mark(t).trim().into());
            }
            v
        })
        .collect();
    let mut o = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        o.insert(k.to_string(), v);
    };
    put("program", "pagehint-migrate".into());
    put("version", env!("CARGO_PKG_VERSION").into());
    put(
        "protocol_version",
        char::from(crate::wire::VERSION).to_string().into(),
    );
    put("command_line", inv.command_line.clone().into());
    put("guest_note", inv.guest_note.into());
    put("setup", inv.setup.into());
    put("seconds", inv.seconds.into());
    put("exit_status", inv.exit.status.into());
    put("exit_reason", inv.exit.reason.clone().into());
    put("failures", inv.failures.to_vec().into());
    put("targets", targets.into());
    put(
        "rows",
        rows.iter().map(|r| row_json(r, &configured)).collect(),
    );
    debug_assert_eq!(o.keys().count(), JSON_KEYS.len());
    serde_json::to_string_pretty(&serde_json::Value::Object(o))
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The runs of a JSON that [`json`] wrote (a failed run's nulls read back as nothing
/// measured).
pub fn rows_from_json(text: &str) -> Result<Vec<RunResult>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let rows = v
        .get("rows")
        .and_then(|r| r.as_array())
        .ok_or("no \"rows\" list: not the harness's JSON")?;
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() {
                o.retain(|_, x| !x.is_null());
            }
            serde_json::from_value(r).map_err(|e| e.to_string())
        })
        .collect()
}

/// Writes `text` to `path` whole or not at all: to a temporary file beside it, then renamed
/// over it (a run killed meanwhile leaves the previous file, or none).
pub fn write_whole(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let r = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// A mode's colour in the picture (every mode has one: the `match` is exhaustive).
fn mode_color(mode: &str) -> &'static str {
    match mode.parse::<MigrationMode>() {
        Ok(MigrationMode::Vanilla) => "#d62728",
        Ok(MigrationMode::Preempt) => "#1f77b4",
        Ok(MigrationMode::PreemptHint) => "#2ca02c",
        Ok(MigrationMode::PreemptHints) => "#9467bd",
        Err(_) => "#7f7f7f",
    }
}

pub(crate) use crate::svg::esc;

/// Panel width of the picture (two panels a row).
const PANEL_W: f64 = 460.0;
/// Height of a fault-wait plot.
const PLOT_H: f64 = 235.0;
/// Font size of panel titles.
const TITLE: f64 = 13.0;
/// Font size of text.
const TEXT: f64 = 11.0;
/// Font size of small labels.
const SMALL: f64 = 9.0;

/// An SVG with one panel per workload: the fault-wait distribution of each mode (CDF, log
/// time axis) and, beside it, each mode's per-vCPU blocktime as bars; each panel's legend
/// below it, wrapped to the panel's width.
pub fn svg(rows: &[RunResult], subtitle: &str) -> String {
    picture(rows, subtitle).finish()
}

/// The picture [`svg`] writes, for tests to measure.
pub fn picture(rows: &[RunResult], subtitle: &str) -> Canvas {
    let mut c = Canvas::new();
    let mut y = header(&mut c, subtitle);
    let mut workloads: Vec<&str> = Vec::new();
    for r in rows {
        if !workloads.contains(&r.setup.workload.as_str()) {
            workloads.push(&r.setup.workload);
        }
    }
    let scale = TimeScale::of(rows);
    for row in workloads.chunks(2) {
        let mut bottom = y;
        for (i, wl) in row.iter().enumerate() {
            let runs: Vec<&RunResult> = rows.iter().filter(|r| r.setup.workload == *wl).collect();
            let ox = 10.0 + PANEL_W * i as f64;
            bottom = bottom.max(panel(&mut c, ox, y, wl, &runs, &scale));
        }
        y = bottom + 16.0;
    }
    c
}

/// The title and the subtitle (split before the link's description); returns where the
/// panels start.
fn header(c: &mut Canvas, subtitle: &str) -> f64 {
    let width = 2.0 * PANEL_W;
    let title = "pagehint-migrate: fault waits (fraction at or below) and per-vCPU blocktime";
    let mut y = c.text_wrapped(10.0, 20.0, width, Style::new(15.0).bold(), title);
    let (first, link) = subtitle
        .split_once(", link ")
        .map_or((subtitle, ""), |(a, b)| (a, b));
    let grey = Style::new(TEXT).color("#555");
    y = c.text_wrapped(10.0, y, width, grey, first);
    if !link.is_empty() {
        let link = format!("link: {link}");
        y = c.text_wrapped(10.0, y, width, Style::new(10.0).color("#555"), &link);
    }
    y + 8.0
}

/// The fault waits' log time axis, shared by every panel: whole decades of µs.
struct TimeScale {
    d0: f64,
    d1: f64,
}

impl TimeScale {
    fn of(rows: &[RunResult]) -> Self {
        let all = rows.iter().flat_map(|r| r.latencies_ns.iter().copied());
        let lo = all
            .clone()
            .filter(|&v| v > 0)
            .min()
            .unwrap_or(1_000)
            .max(100) as f64;
        let hi = all.max().unwrap_or(1_000_000).max(10_000) as f64;
        let d0 = (lo / 1e3).log10().floor();
        Self {
            d0,
            d1: (hi / 1e3).log10().ceil().max(d0 + 1.0),
        }
    }

    /// The x of `ns` in a plot from `l` to `r`.
    fn x(&self, ns: f64, l: f64, r: f64) -> f64 {
        l + ((ns / 1e3).max(1e-3).log10() - self.d0) / (self.d1 - self.d0) * (r - l)
    }
}

/// One workload's panel from (`ox`, `oy`): its name, the fault-wait plot, the blocktime
/// bars and the legend. Returns the panel's bottom.
fn panel(
    c: &mut Canvas,
    ox: f64,
    oy: f64,
    wl: &str,
    runs: &[&RunResult],
    scale: &TimeScale,
) -> f64 {
    let l = ox + 48.0;
    c.text(l, oy + 15.0, Style::new(TITLE).bold(), wl);
    // The plot on the left 62%, the blocktime bars on the right.
    let plot = Box2 {
        x0: l,
        y0: oy + 25.0,
        x1: ox + PANEL_W * 0.62,
        y1: oy + 25.0 + PLOT_H,
    };
    fault_waits(c, plot, runs, scale);
    let bars = Box2 {
        x0: plot.x1 + 40.0,
        x1: ox + PANEL_W - 15.0,
        ..plot
    };
    blocktime_bars(c, bars, runs);
    let entries: Vec<(&'static str, String)> = runs
        .iter()
        .map(|r| {
            let mut label = format!(
                "{} — {} faults, request p50 {}, pause {}, stall {}, postcopy {}",
                r.label(),
                r.latencies_ns.len(),
                fmt_us(r.waits.request_p50_us),
                fmt_ms(r.waits.longest_pause_ms),
                fmt_ms(r.waits.stall_ms),
                fmt_ms(r.transfer.duration_ms)
            );
            // Several vCPUs: all blocked at once, and each one's longest pause.
            if r.waits.vcpu_pause_ms.len() > 1 {
                let pauses: Vec<String> =
                    r.waits.vcpu_pause_ms.iter().map(|&p| fmt_ms(p)).collect();
                let _ = write!(
                    label,
                    ", all blocked {}, vCPU pauses {}",
                    fmt_ms(r.waits.blocktime_ms),
                    pauses.join(" / ")
                );
            }
            (mode_color(&r.setup.mode), label)
        })
        .collect();
    let width = ox + PANEL_W - 10.0 - (l + 8.0);
    c.legend(l + 8.0, plot.y1 + 52.0, width, TEXT, &entries)
}

/// The fault-wait distributions (CDF, log time axis) in `f`, with both axes labelled.
fn fault_waits(c: &mut Canvas, f: Box2, runs: &[&RunResult], scale: &TimeScale) {
    let y_of = |frac: f64| f.y1 - frac * (f.y1 - f.y0);
    let ticks: Vec<(f64, String)> = [0.0, 0.25, 0.5, 0.75, 1.0]
        .iter()
        .map(|&v| (v, format!("{v}")))
        .collect();
    c.y_axis(f, &ticks, &y_of, TEXT);
    // One label a decade, or every other one where they would crowd.
    let decades = (scale.d1 - scale.d0).round() as usize;
    let room = (f.x1 - f.x0) / decades.max(1) as f64;
    let every = if room < text_width("100 ms", TEXT) + 6.0 {
        2
    } else {
        1
    };
    for k in 0..=decades {
        let d = scale.d0 + k as f64;
        let x = f.x0 + k as f64 / decades.max(1) as f64 * (f.x1 - f.x0);
        c.line((x, f.y0), (x, f.y1), "#eee");
        if k % every == 0 {
            let label = match 10f64.powf(d) {
                v if v < 1000.0 => format!("{v:.0} µs"),
                v if v < 1e6 => format!("{:.0} ms", v / 1e3),
                v => format!("{:.0} s", v / 1e6),
            };
            c.text(
                x,
                f.y1 + 14.0,
                Style::new(TEXT).anchor(Anchor::Middle),
                &label,
            );
        }
    }
    let grey = Style::new(TEXT).color("#555").anchor(Anchor::Middle);
    c.text((f.x0 + f.x1) / 2.0, f.y1 + 34.0, grey, "fault wait");
    let label = "fraction of faults waiting at most this";
    c.text(f.x0 - 36.0, (f.y0 + f.y1) / 2.0, grey.vertical(), label);
    for r in runs {
        let n = r.latencies_ns.len();
        if n == 0 {
            continue;
        }
        let step = (n / 400).max(1);
        let mut pts = Vec::new();
        let mut prev_y = y_of(0.0);
        for k in (0..n).step_by(step).chain(std::iter::once(n - 1)) {
            let x = scale.x(r.latencies_ns[k].max(1) as f64, f.x0, f.x1);
            let y = y_of((k + 1) as f64 / n as f64);
            pts.push((x, prev_y));
            pts.push((x, y));
            prev_y = y;
        }
        c.polyline(&pts, mode_color(&r.setup.mode), 1.8);
    }
}

/// Per-vCPU blocktime in `f`: one group of bars per run, one bar per vCPU, each group's
/// total below it.
fn blocktime_bars(c: &mut Canvas, f: Box2, runs: &[&RunResult]) {
    let max = runs
        .iter()
        .flat_map(|r| r.waits.vcpu_blocktime_ms.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-3);
    c.rect(f, "none", "#999", None);
    let grey = Style::new(TEXT).color("#555");
    let small = Style::new(SMALL).color("#555");
    let mid = (f.x0 + f.x1) / 2.0;
    c.text(
        mid,
        f.y1 + 34.0,
        grey.anchor(Anchor::Middle),
        "vCPU blocktime, ms",
    );
    let scale = format!("full scale {}", fmt_ms(max));
    c.text(f.x1, f.y0 - 4.0, small.anchor(Anchor::End), &scale);
    c.text(f.x0 - 3.0, f.y1, small.anchor(Anchor::End), "0");
    let label = "blocked time per vCPU";
    c.text(
        f.x0 - 8.0,
        (f.y0 + f.y1) / 2.0,
        grey.anchor(Anchor::Middle).vertical(),
        label,
    );
    let gw = (f.x1 - f.x0) / runs.len().max(1) as f64;
    for (g, r) in runs.iter().enumerate() {
        let v = &r.waits.vcpu_blocktime_ms;
        let bw = (gw * 0.8 / v.len().max(1) as f64).max(1.0);
        for (i, &b) in v.iter().enumerate() {
            let h = (b / max) * (f.y1 - f.y0);
            let x = f.x0 + g as f64 * gw + gw * 0.1 + i as f64 * bw;
            let bar = Box2 {
                x0: x,
                y0: f.y1 - h,
                x1: x + bw * 0.9,
                y1: f.y1,
            };
            let title = match r.waits.vcpu_pause_ms.get(i) {
                Some(&p) => format!(
                    "{} vCPU {i}: blocked {}, longest pause {}",
                    r.label(),
                    fmt_ms(b),
                    fmt_ms(p)
                ),
                None => format!("{} vCPU {i}: {}", r.label(), fmt_ms(b)),
            };
            c.rect(bar, mode_color(&r.setup.mode), "none", Some(&title));
        }
        let total: f64 = v.iter().sum();
        let total = if total >= 100.0 {
            format!("{total:.0}")
        } else {
            format!("{total:.1}")
        };
        // Where the totals would crowd, every other one goes a line lower.
        let lower = text_width(&total, SMALL) + 4.0 > gw && g % 2 == 1;
        let y = f.y1 + if lower { 23.0 } else { 12.0 };
        let x = f.x0 + g as f64 * gw + gw / 2.0;
        c.text(x, y, Style::new(SMALL).anchor(Anchor::Middle), &total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::HostPageSize;
    use crate::options::{GuestKind, GuestSpec, MigrationMode, RunConfig, Workload};

    #[test]
    fn the_json_is_the_whole_result_and_a_failed_run_measured_nothing() {
        let cfg = RunConfig::new(
            GuestSpec::new(GuestKind::Thread, 16 << 20, HostPageSize::Small, 1).unwrap(),
        );
        let mut ok = RunResult::configured(&cfg, MigrationMode::Preempt, Workload::Seq);
        ok.outcome.verified = true;
        ok.waits.faults = 7;
        let failed = RunResult::failed(
            &cfg,
            MigrationMode::Vanilla,
            Workload::Seq,
            "connection lost".into(),
            "postcopy: 3 of 9 host pages placed".into(),
        );
        let rows = vec![ok, failed];
        let failures = vec!["seq / vanilla: connection lost".to_string()];
        let targets = targets(&rows);
        let exit = Exit::of(&rows, &failures, &targets, false);
        assert_eq!(
            (exit.status, exit.reason.as_str()),
            (2, "1 of 2 runs failed")
        );
        let inv = Invocation {
            command_line: vec!["pagehint-migrate".into(), "--json".into(), "r.json".into()],
            guest_note: "thread guest (--guest thread)",
            setup: "thread guest, 16 MiB",
            seconds: 1.5,
            failures: &failures,
            exit,
        };
        let v: serde_json::Value = serde_json::from_str(&json(&inv, &rows, &targets)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = JSON_KEYS.to_vec();
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["exit_status"], 2);
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["command_line"][1], "--json");
        let marks: Vec<&str> = v["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["mark"].as_str().unwrap())
            .collect();
        assert!(
            marks.contains(&"n/a") && marks.contains(&"MISS"),
            "{marks:?}"
        );
        let (r0, r1) = (&v["rows"][0], &v["rows"][1]);
        assert_eq!(r0["faults"], 7);
        assert!(r1["faults"].is_null() && r1["tail"].is_null(), "{r1}");
        assert_eq!(r1["mode"], "vanilla");
        assert_eq!(r1["error"], "connection lost");
        assert_eq!(r1["verified"], false);
        // Both rows read back, the nulls as nothing measured.
        let back = rows_from_json(&v.to_string()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].waits.faults, 0);
        assert_eq!(back[1].outcome.error.as_deref(), Some("connection lost"));
        assert!(
            rows_from_json("[]").is_err(),
            "a bare list is not this JSON"
        );
    }

    #[test]
    fn an_output_is_written_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("whole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.json");
        write_whole(&p, "first").unwrap();
        write_whole(&p, "second").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "second");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        assert!(write_whole(&dir.join("no/such/dir/r.json"), "x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn cfg() -> RunConfig {
        RunConfig::new(GuestSpec::new(GuestKind::Thread, 16 << 20, HostPageSize::Small, 1).unwrap())
    }

    fn done(w: Workload, m: MigrationMode, p50: f64) -> RunResult {
        let mut r = RunResult::configured(&cfg(), m, w);
        r.waits.request_p50_us = p50;
        r.transfer.throughput_mib_s = 812.4;
        r.outcome.verified = true;
        r
    }

    #[test]
    fn a_failed_run_is_a_row_with_its_configuration_and_the_targets_skip_it() {
        let rows = vec![
            done(Workload::Random, MigrationMode::Vanilla, 4000.0),
            RunResult::failed(
                &cfg(),
                MigrationMode::Preempt,
                Workload::Random,
                "connection lost".into(),
                "postcopy: 10 of 4096 host pages placed".into(),
            ),
        ];
        let t = table(&rows);
        assert!(t.contains("MiB/s") && t.contains("812"), "{t}");
        let failed = t
            .lines()
            .find(|l| l.starts_with("random    preempt"))
            .unwrap();
        assert!(failed.ends_with("FAILED"), "{t}");
        let checks = targets(&rows);
        let p50 = &checks[0];
        assert_eq!(
            p50.ratio, None,
            "a failed run has no measurements to compare"
        );
        assert!(!any_missed(&checks[..1]), "n/a is not a miss");
        let verified = checks.last().unwrap();
        assert_eq!(verified.what, "runs verified: 1 of 2");
        assert!(any_missed(&checks));
        let inv = Invocation {
            command_line: Vec::new(),
            guest_note: "",
            setup: "",
            seconds: 0.0,
            failures: &[],
            exit: Exit::of(&rows, &[], &checks, false),
        };
        let j: serde_json::Value = serde_json::from_str(&json(&inv, &rows, &checks)).unwrap();
        let j = &j["rows"];
        assert_eq!(j[1]["error"], "connection lost");
        assert_eq!(j[1]["reached"], "postcopy: 10 of 4096 host pages placed");
        assert_eq!(j[1]["bandwidth_bps"], 10_000_000_000u64);
        assert!(j[0]["pin"].as_str().is_some_and(|p| !p.is_empty()));
        assert_eq!(j[0]["error"], serde_json::Value::Null);
    }

    #[test]
    fn the_plot_labels_both_y_axes_and_shows_stall_and_postcopy_time() {
        let mut r = done(Workload::Seq, MigrationMode::Preempt, 200.0);
        r.latencies_ns = vec![50_000, 200_000];
        r.waits.vcpu_blocktime_ms = vec![12.0];
        r.waits.stall_ms = 3.5;
        r.transfer.duration_ms = 640.0;
        let p = svg(&[r], "test, link 10G");
        assert!(
            p.contains(">fraction of faults waiting at most this</text>"),
            "{p}"
        );
        assert!(p.contains(">blocked time per vCPU</text>"), "{p}");
        assert!(p.contains("stall 3.5 ms, postcopy 640.0 ms"), "{p}");
    }

    /// Every mode, both ways of `--resend`, every workload, two vCPUs, waits from 1 µs to
    /// 3 s and wide figures: the picture at its most crowded.
    fn crowded() -> Vec<RunResult> {
        let mut rows = Vec::new();
        for &w in Workload::ALL {
            for &m in MigrationMode::ALL {
                for resend in [false, true] {
                    if !resend && m == MigrationMode::Vanilla {
                        continue;
                    }
                    let mut r = done(w, m, 123_456.0);
                    r.setup.resend = resend;
                    r.latencies_ns = (0..5000u64).map(|i| 1_000 + i * i * 120).collect();
                    r.waits.vcpu_blocktime_ms = vec![12_345.6, 0.1];
                    r.waits.longest_pause_ms = 2_345.6;
                    r.waits.stall_ms = 98_765.4;
                    r.transfer.duration_ms = 12_345.6;
                    rows.push(r);
                }
            }
        }
        rows
    }

    #[test]
    fn the_picture_fits_its_text() {
        let subtitle = format!(
            "kvm guest, 2 vCPU(s), 1024 MiB in 2M host pages, precopy 3 round(s), link {}",
            crate::link::LinkParams::DEFAULT.describe()
        );
        let c = picture(&crowded(), &subtitle);
        if let Some(p) = std::env::var_os("PAGEHINT_SVG_OUT") {
            std::fs::write(p, c.finish()).unwrap();
        }
        assert!(c.problems().is_empty(), "{:#?}", c.problems());
        let (w, h) = c.size();
        assert!(w <= 2.0 * PANEL_W + 30.0 && h > 4.0 * PLOT_H, "{w}×{h}");
        // A single short run fits too.
        let c = picture(&crowded()[..1], "thread guest");
        assert!(c.problems().is_empty(), "{:#?}", c.problems());
    }

    #[test]
    fn a_missed_tail_ratio_says_what_bounded_it_in_that_run() {
        let run = |resend: bool, p50: f64, p99: f64| {
            let mut r = done(Workload::Random, MigrationMode::PreemptHint, p50);
            r.setup.resend = resend;
            r.waits.request_p99_us = p99;
            r
        };
        // The old path's p99 (900 µs) is 4.5x the new path's p50 (200 µs): 5x was out of
        // reach whatever the new path's p99.
        let checks = targets(&[run(true, 200.0, 250.0), run(false, 220.0, 900.0)]);
        let text = targets_text(&checks);
        assert!(
            text.contains("[MISS] random request p99 in preempt-hint: no resend / resend = 3.60x; target: >= 5x\n         at most 4.50x was possible in this run"),
            "{text}"
        );
        // Out of reach of the new path's p99 only: no note.
        let checks = targets(&[run(true, 200.0, 250.0), run(false, 220.0, 1100.0)]);
        let tail = checks
            .iter()
            .find(|c| c.what.ends_with("no resend / resend"))
            .unwrap();
        assert!(!tail.pass && tail.note.is_none(), "{tail:?}");
        // Met: no note.
        let checks = targets(&[run(true, 200.0, 210.0), run(false, 220.0, 3000.0)]);
        let tail = checks
            .iter()
            .find(|c| c.what.ends_with("no resend / resend"))
            .unwrap();
        assert!(tail.pass && tail.note.is_none(), "{tail:?}");
    }

    #[test]
    fn target_lines_say_the_ratio_and_the_target_apart() {
        let rows = vec![
            done(Workload::Random, MigrationMode::Vanilla, 400.0),
            done(Workload::Random, MigrationMode::Preempt, 200.0),
        ];
        let checks = targets(&rows);
        let text = targets_text(&checks);
        assert!(
            text.contains(
                "  [MISS] random request p50: vanilla / preempt = 2.00x; target: >= 5x\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  [n/a ] seq blocktime: preempt / preempt-hint (not run); target: >= 5x\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  [PASS] runs verified: 2 of 2; target: all\n"),
            "{text}"
        );
        assert!(any_missed(&checks));
    }
}
