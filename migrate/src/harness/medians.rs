//! `--repeat`: the medians of repeated runs, and the range of each target's ratio over the
//! repeats.
//!
//! Runs are grouped by workload, mode and resend (the table's rows); a group's median row
//! is its runs' medians, measure by measure (per-vCPU measures vCPU by vCPU), so it is not
//! one run's figures; the fault waits it plots are those of the run with the median request
//! p50. A failed run counts in no median (its row is marked by its error, and the group's
//! row says how many failed); a group whose runs all failed is a failed row.

use crate::harness::export::{targets, TargetCheck};
use crate::harness::result::RunResult;
use crate::spread::Spread;

/// The median of the finite values of `v` (the mean of the two middle values for an even
/// count; 0 if there is none).
pub fn median(v: Vec<f64>) -> f64 {
    Spread::of(v).map_or(0.0, |s| s.median)
}

/// The median of the counts `v`, rounded to the nearest.
fn median_u64(v: impl Iterator<Item = u64>) -> u64 {
    median(v.map(|x| x as f64).collect()).round() as u64
}

/// Element by element: the median of each position over `vs` (positions some lack count
/// only where present).
fn median_each(vs: &[&Vec<f64>]) -> Vec<f64> {
    let n = vs.iter().map(|v| v.len()).max().unwrap_or(0);
    (0..n)
        .map(|i| median(vs.iter().filter_map(|v| v.get(i).copied()).collect()))
        .collect()
}

/// One median row per group of runs (workload, mode, resend), in the order the groups first
/// ran.
pub fn medians(rows: &[RunResult]) -> Vec<RunResult> {
    let key = |r: &RunResult| {
        (
            r.setup.workload.clone(),
            r.setup.mode.clone(),
            r.setup.resend,
        )
    };
    let mut keys = Vec::new();
    for r in rows {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    keys.iter()
        .map(|k| {
            let group: Vec<&RunResult> = rows.iter().filter(|r| key(r) == *k).collect();
            median_row(&group)
        })
        .collect()
}

/// The median row of one group (see the module docs).
fn median_row(group: &[&RunResult]) -> RunResult {
    let ok: Vec<&RunResult> = group
        .iter()
        .copied()
        .filter(|r| r.outcome.error.is_none())
        .collect();
    let failed = group.len() - ok.len();
    let Some(&base) = ok.iter().min_by(|a, b| {
        let m = median(ok.iter().map(|r| r.waits.request_p50_us).collect());
        (a.waits.request_p50_us - m)
            .abs()
            .total_cmp(&(b.waits.request_p50_us - m).abs())
    }) else {
        return group[0].clone();
    };
    let f = |m: fn(&RunResult) -> f64| median(ok.iter().map(|r| m(r)).collect());
    let u = |m: fn(&RunResult) -> u64| median_u64(ok.iter().map(|r| m(r)));
    let mut r = base.clone();
    let w = &mut r.waits;
    w.faults = u(|r| r.waits.faults);
    w.fault_p50_us = f(|r| r.waits.fault_p50_us);
    w.fault_p99_us = f(|r| r.waits.fault_p99_us);
    w.fault_max_us = f(|r| r.waits.fault_max_us);
    w.stall_ms = f(|r| r.waits.stall_ms);
    w.blocktime_ms = f(|r| r.waits.blocktime_ms);
    w.vcpu_blocktime_ms = median_each(
        &ok.iter()
            .map(|r| &r.waits.vcpu_blocktime_ms)
            .collect::<Vec<_>>(),
    );
    w.longest_pause_ms = f(|r| r.waits.longest_pause_ms);
    w.vcpu_pause_ms = median_each(
        &ok.iter()
            .map(|r| &r.waits.vcpu_pause_ms)
            .collect::<Vec<_>>(),
    );
    w.requests_sent = u(|r| r.waits.requests_sent);
    w.request_p50_us = f(|r| r.waits.request_p50_us);
    w.request_p99_us = f(|r| r.waits.request_p99_us);
    w.request_max_us = f(|r| r.waits.request_max_us);
    w.uffd_faults = u(|r| r.waits.uffd_faults);
    w.raced_faults = u(|r| r.waits.raced_faults);
    let t = &mut r.transfer;
    t.downtime_ms = f(|r| r.transfer.downtime_ms);
    t.total_ms = f(|r| r.transfer.total_ms);
    t.precopy_ms = f(|r| r.transfer.precopy_ms);
    t.duration_ms = f(|r| r.transfer.duration_ms);
    t.throughput_mib_s = f(|r| r.transfer.throughput_mib_s);
    t.precopy_bytes = u(|r| r.transfer.precopy_bytes);
    t.postcopy_bytes = u(|r| r.transfer.postcopy_bytes);
    let s = &mut r.source;
    s.pages_urgent = u(|r| r.source.pages_urgent);
    s.pages_background = u(|r| r.source.pages_background);
    s.hints_offered = u(|r| r.source.hints_offered);
    s.hints_taken = u(|r| r.source.hints_taken);
    s.resent_bytes = u(|r| r.source.resent_bytes);
    let g = &mut r.guest_run;
    let rate = |m: fn(&RunResult) -> Option<f64>| {
        let v: Vec<f64> = ok.iter().filter_map(|r| m(r)).collect();
        (!v.is_empty()).then(|| median(v))
    };
    g.progress_before_per_s = rate(|r| r.guest_run.progress_before_per_s);
    g.progress_after_per_s = rate(|r| r.guest_run.progress_after_per_s);
    r.outcome.verified = failed == 0 && ok.iter().all(|r| r.outcome.verified);
    r.outcome.problems = group
        .iter()
        .flat_map(|r| r.outcome.problems.iter().cloned())
        .collect();
    if failed > 0 {
        r.outcome
            .problems
            .push(format!("{failed} of {} runs failed", group.len()));
    }
    r
}

/// The targets of `rows`, repeated `--repeat` times: checked on their medians, except that
/// "every run verified" counts every run.
pub fn median_targets(rows: &[RunResult]) -> Vec<TargetCheck> {
    let mut checks = targets(&medians(rows));
    let all = targets(rows);
    if let (Some(c), Some(v)) = (checks.last_mut(), all.last()) {
        if c.what.starts_with("runs verified") && v.what.starts_with("runs verified") {
            *c = v.clone();
        }
    }
    checks
}

/// Each of `checks`' ratio range over the `repeat` repeats of `rows` (the lowest and the
/// highest, where every repeat has the ratio; `checks` are the median rows' targets, so the
/// ratio they report is that of the medians).
pub fn ranges(checks: &[TargetCheck], rows: &[RunResult], repeat: u32) -> Vec<Option<(f64, f64)>> {
    let per: Vec<Vec<TargetCheck>> = (0..repeat)
        .map(|k| {
            let of: Vec<RunResult> = rows
                .iter()
                .filter(|r| r.setup.repeat == k)
                .cloned()
                .collect();
            targets(&of)
        })
        .collect();
    checks
        .iter()
        .map(|c| {
            let v: Vec<f64> = per
                .iter()
                .map(|p| p.iter().find(|x| x.what == c.what).and_then(|x| x.ratio))
                .collect::<Option<_>>()?;
            (v.len() > 1).then(|| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (lo, hi)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::HostPageSize;
    use crate::options::{GuestKind, GuestSpec, MigrationMode, RunConfig, Workload};

    fn run(m: MigrationMode, repeat: u32, p50: f64, stall: f64, vcpus: Vec<f64>) -> RunResult {
        let cfg = RunConfig::new(
            GuestSpec::new(GuestKind::Thread, 16 << 20, HostPageSize::Small, 1).unwrap(),
        );
        let mut r = RunResult::configured(&cfg, m, Workload::Random);
        r.setup.repeat = repeat;
        r.waits.request_p50_us = p50;
        r.waits.stall_ms = stall;
        r.waits.vcpu_blocktime_ms = vcpus;
        r.outcome.verified = true;
        r
    }

    #[test]
    fn medians_are_taken_measure_by_measure_and_ranges_over_the_repeats() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
        let (p, h) = (MigrationMode::Preempt, MigrationMode::PreemptHint);
        let rows = vec![
            run(p, 0, 200.0, 10.0, vec![1.0, 9.0]),
            run(h, 0, 220.0, 5.0, vec![1.0]),
            run(h, 1, 180.0, 7.0, vec![3.0]),
            run(p, 1, 100.0, 30.0, vec![5.0, 1.0]),
            run(p, 2, 300.0, 20.0, vec![3.0, 5.0]),
            run(h, 2, 330.0, 6.0, vec![2.0]),
        ];
        let m = medians(&rows);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].setup.mode, "preempt");
        assert_eq!(m[0].waits.request_p50_us, 200.0);
        assert_eq!(m[0].waits.stall_ms, 20.0);
        assert_eq!(m[0].waits.vcpu_blocktime_ms, vec![3.0, 5.0]);
        assert_eq!(m[1].waits.request_p50_us, 220.0);
        assert!(m.iter().all(|r| r.outcome.verified));
        // The target random p50 preempt-hint / preempt: 1.1x of medians, ranging over the
        // repeats' own ratios (1.1, 1.8, 1.1).
        let checks = median_targets(&rows);
        assert_eq!(checks.last().unwrap().what, "runs verified: 6 of 6");
        let r = ranges(&checks, &rows, 3);
        let i = checks
            .iter()
            .position(|c| c.what == "random request p50: preempt-hint / preempt")
            .unwrap();
        assert_eq!(checks[i].ratio, Some(1.1));
        let (lo, hi) = r[i].unwrap();
        assert!(
            (lo - 1.1).abs() < 1e-9 && (hi - 1.8).abs() < 1e-9,
            "{lo} {hi}"
        );
        // A failed run counts in no median, and the group says so.
        let mut bad = run(p, 3, 9999.0, 9999.0, vec![]);
        bad.outcome.error = Some("lost".into());
        let mut all = rows.clone();
        all.push(bad);
        let m = medians(&all);
        assert_eq!(m[0].waits.request_p50_us, 200.0);
        assert!(!m[0].outcome.verified);
        assert!(m[0]
            .outcome
            .problems
            .iter()
            .any(|p| p == "1 of 4 runs failed"));
    }
}
