//! The side-by-side rows: one per (link, peer, mode, workload), the same figures for QEMU and
//! for pagehint, and the targets checked on them.
//!
//! Where each figure comes from:
//!
//! | figure | QEMU 10.0 | pagehint |
//! |---|---|---|
//! | request latency p50/p99 | destination trace: `postcopy_ram_fault_thread_request` → `postcopy_place_page(_zero)` | destination: fault read → page placed |
//! | blocktime | destination `query-migrate` `postcopy-blocktime` (every vCPU blocked at once) | the same definition, measured at the destination |
//! | total time | source `total-time` (migrate → completed) | start → last page placed |
//! | requests | source `ram.postcopy-requests` | requests sent by the destination |
//! | precopy / postcopy bytes | source `ram.precopy-bytes` / `ram.postcopy-bytes` | link bytes of page frames before / after the switch |
//! | guest alive | running, no failed checks, operations growing at the destination | the harness's verification (memory equals the source's, every page placed once, the guest's checks) |

use serde::Serialize;

use super::peer::QemuOutcome;
use crate::harness::export::TargetCheck;
use crate::harness::result::{percentile_ns, RunResult};

/// One migration, QEMU's or pagehint's.
#[derive(Clone, Debug, Serialize)]
pub struct SideRow {
    /// Link class, e.g. `10G`.
    pub link: String,
    /// `tbf` rate, bits/s.
    pub link_rate_bps: u64,
    /// `QEMU 10.0.2` or `pagehint`.
    pub peer: String,
    /// `vanilla`, `preempt` or `preempt-hint`.
    pub mode: String,
    /// `seq`, `random`, `stream` or `kv`.
    pub workload: String,
    /// The migration completed.
    pub completed: bool,
    /// The guest runs on at the destination with no failed check.
    pub guest_alive: bool,
    /// Failed guest checks.
    pub guest_errors: u64,
    /// Page requests.
    pub requests: u64,
    /// Requests with a measured latency.
    pub latency_samples: u64,
    /// Median request latency, µs.
    pub request_p50_us: f64,
    /// 99th-percentile request latency, µs.
    pub request_p99_us: f64,
    /// Total vCPU blocktime, ms.
    pub blocktime_ms: f64,
    /// Total migration time, ms.
    pub total_ms: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Bytes before the switch to postcopy.
    pub precopy_bytes: u64,
    /// Bytes after it.
    pub postcopy_bytes: u64,
    /// Guest operations per second at the source before migrating.
    pub ops_before_per_s: Option<f64>,
    /// Guest operations per second during postcopy.
    pub ops_postcopy_per_s: Option<f64>,
    /// QEMU's threads that were pinned, by name (empty for pagehint, which pins its own).
    pub qemu_threads_pinned: Vec<String>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

/// Which run a row is.
#[derive(Clone, Copy, Debug)]
pub struct RunKey<'a> {
    /// Link class.
    pub link: &'a str,
    /// Its rate, bits/s.
    pub rate_bps: u64,
    /// `QEMU 10.0.2` or `pagehint`.
    pub peer: &'a str,
    /// Mode.
    pub mode: &'a str,
    /// Workload.
    pub workload: &'a str,
}

impl SideRow {
    /// A row of `key` with nothing measured (not completed).
    fn empty(key: RunKey<'_>) -> Self {
        Self {
            link: key.link.into(),
            link_rate_bps: key.rate_bps,
            peer: key.peer.into(),
            mode: key.mode.into(),
            workload: key.workload.into(),
            completed: false,
            guest_alive: false,
            guest_errors: 0,
            requests: 0,
            latency_samples: 0,
            request_p50_us: 0.0,
            request_p99_us: 0.0,
            blocktime_ms: 0.0,
            total_ms: 0.0,
            downtime_ms: 0.0,
            precopy_bytes: 0,
            postcopy_bytes: 0,
            ops_before_per_s: None,
            ops_postcopy_per_s: None,
            qemu_threads_pinned: Vec::new(),
            error: None,
        }
    }

    /// A run that failed.
    pub fn failed(key: RunKey<'_>, error: String) -> Self {
        Self {
            error: Some(error),
            ..Self::empty(key)
        }
    }

    /// A QEMU run.
    pub fn qemu(key: RunKey<'_>, q: &QemuOutcome) -> Self {
        let lat = &q.latency.latencies_ns;
        Self {
            completed: true,
            guest_alive: q.guest_alive,
            guest_errors: q.guest_errors,
            requests: q.requests,
            latency_samples: lat.len() as u64,
            request_p50_us: percentile_ns(lat, 50.0) as f64 / 1e3,
            request_p99_us: percentile_ns(lat, 99.0) as f64 / 1e3,
            blocktime_ms: q.blocktime_ms,
            total_ms: q.total_ms,
            downtime_ms: q.downtime_ms,
            precopy_bytes: q.precopy_bytes,
            postcopy_bytes: q.postcopy_bytes,
            ops_before_per_s: Some(q.ops_before_per_s),
            ops_postcopy_per_s: Some(q.ops_postcopy_per_s),
            qemu_threads_pinned: q.pinned_threads.clone(),
            ..Self::empty(key)
        }
    }

    /// A pagehint run on `link`.
    pub fn pagehint(link: &str, rate_bps: u64, r: &RunResult) -> Self {
        let key = RunKey {
            link,
            rate_bps,
            peer: "pagehint",
            mode: &r.setup.mode,
            workload: &r.setup.workload,
        };
        Self {
            completed: true,
            guest_alive: r.outcome.verified && r.guest_run.guest_check_errors == 0,
            guest_errors: r.guest_run.guest_check_errors,
            requests: r.waits.requests_sent,
            latency_samples: r.waits.requests_sent,
            request_p50_us: r.waits.request_p50_us,
            request_p99_us: r.waits.request_p99_us,
            blocktime_ms: r.waits.blocktime_ms,
            total_ms: r.transfer.total_ms,
            downtime_ms: r.transfer.downtime_ms,
            precopy_bytes: r.transfer.precopy_bytes,
            postcopy_bytes: r.transfer.postcopy_bytes,
            ops_before_per_s: r.guest_run.progress_before_per_s,
            ops_postcopy_per_s: r.guest_run.progress_after_per_s,
            error: (!r.outcome.verified).then(|| r.outcome.problems.join("; ")),
            ..Self::empty(key)
        }
    }

    /// Whether this is QEMU's row.
    pub fn is_qemu(&self) -> bool {
        self.peer.starts_with("QEMU")
    }
}

fn find<'a>(
    rows: &'a [SideRow],
    link: &str,
    qemu: bool,
    mode: &str,
    w: &str,
) -> Option<&'a SideRow> {
    rows.iter().find(|r| {
        r.link == link && r.is_qemu() == qemu && r.mode == mode && r.workload == w && r.completed
    })
}

/// Fewer requests than this on either side make a latency or blocktime ratio meaningless
/// (one or two events; the sequential workloads in vanilla fault that rarely): such a check
/// is reported as not comparable, with the counts.
pub const MIN_REQUESTS: u64 = 20;

/// The targets, per link: pagehint preempt-hint against QEMU postcopy-preempt (random
/// request p50 and p99 at least 1.5× lower, seq and stream blocktime at least 3× lower), and
/// pagehint vanilla within 1.25× of QEMU vanilla on every figure (either way), plus every run
/// completed with the guest alive. Ratios are QEMU / pagehint for the first kind (higher is
/// better for pagehint) and pagehint / QEMU for the second.
pub fn targets(rows: &[SideRow]) -> Vec<TargetCheck> {
    let mut links: Vec<&str> = Vec::new();
    for r in rows {
        if !links.contains(&r.link.as_str()) {
            links.push(&r.link);
        }
    }
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            a / b
        } else if a > 0.0 {
            f64::INFINITY
        } else {
            1.0
        }
    };
    let mut out = Vec::new();
    for link in links {
        type Figure = (&'static str, fn(&SideRow) -> f64);
        let wins: [(&str, Figure, f64); 4] = [
            ("random", ("request p50", |r| r.request_p50_us), 1.5),
            ("random", ("request p99", |r| r.request_p99_us), 1.5),
            ("seq", ("blocktime", |r| r.blocktime_ms), 3.0),
            ("stream", ("blocktime", |r| r.blocktime_ms), 3.0),
        ];
        for (w, (name, f), goal) in wins {
            let pair = find(rows, link, true, "preempt", w).zip(find(
                rows,
                link,
                false,
                "preempt-hint",
                w,
            ));
            let r = pair.map(|(q, p)| ratio(f(q), f(p)));
            out.push(TargetCheck {
                what: format!("{link} {w} {name}: QEMU preempt / pagehint preempt-hint"),
                ratio: r,
                pass: r.is_some_and(|x| x >= goal),
                target: format!(">= {goal}x"),
                note: None,
            });
        }
        let figures: [Figure; 4] = [
            ("request p50", |r| r.request_p50_us),
            ("request p99", |r| r.request_p99_us),
            ("blocktime", |r| r.blocktime_ms),
            ("total time", |r| r.total_ms),
        ];
        let mut workloads: Vec<&str> = Vec::new();
        for r in rows.iter().filter(|r| r.link == link) {
            if !workloads.contains(&r.workload.as_str()) {
                workloads.push(&r.workload);
            }
        }
        for w in workloads {
            for (name, f) in figures {
                let pair =
                    find(rows, link, false, "vanilla", w).zip(find(rows, link, true, "vanilla", w));
                let few = pair.filter(|(p, q)| {
                    name != "total time" && p.requests.min(q.requests) < MIN_REQUESTS
                });
                let r = pair.map(|(p, q)| ratio(f(p), f(q)));
                out.push(match few {
                    Some((p, q)) => TargetCheck {
                        what: format!(
                            "{link} {w} {name}: pagehint vanilla / QEMU vanilla: not comparable, {} and {} requests",
                            p.requests, q.requests
                        ),
                        ratio: None,
                        pass: false,
                        target: format!("within 1.25x, >= {MIN_REQUESTS} requests each"),
                        note: None,
                    },
                    None => TargetCheck {
                        what: format!("{link} {w} {name}: pagehint vanilla / QEMU vanilla"),
                        ratio: r,
                        pass: r.is_some_and(|x| (1.0 / 1.25..=1.25).contains(&x)),
                        target: "within 1.25x".into(),
                        note: None,
                    },
                });
            }
        }
    }
    if !rows.is_empty() {
        let ok = rows.iter().filter(|r| r.completed && r.guest_alive).count();
        out.push(TargetCheck {
            what: format!(
                "runs completed with the guest alive: {ok} of {}",
                rows.len()
            ),
            ratio: None,
            pass: ok == rows.len(),
            target: "all".into(),
            note: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(qemu: bool, mode: &str, w: &str, p50: f64, p99: f64, bt: f64, total: f64) -> SideRow {
        let mut r = SideRow::empty(RunKey {
            link: "1G",
            rate_bps: 1_000_000_000,
            peer: if qemu { "QEMU 10.0.2" } else { "pagehint" },
            mode,
            workload: w,
        });
        r.completed = true;
        r.guest_alive = true;
        r.request_p50_us = p50;
        r.request_p99_us = p99;
        r.blocktime_ms = bt;
        r.total_ms = total;
        r.requests = 100;
        r
    }

    #[test]
    fn targets_compare_the_right_rows_and_can_fail() {
        let rows = vec![
            row(true, "preempt", "random", 300.0, 6000.0, 50.0, 1000.0),
            row(false, "preempt-hint", "random", 100.0, 5000.0, 10.0, 1000.0),
            row(true, "vanilla", "random", 7000.0, 9000.0, 900.0, 1000.0),
            row(false, "vanilla", "random", 7500.0, 12000.0, 850.0, 1100.0),
        ];
        let t = targets(&rows);
        let get = |s: &str| t.iter().find(|c| c.what.contains(s)).unwrap();
        let p50 = get("random request p50: QEMU");
        assert_eq!(p50.ratio, Some(3.0));
        assert!(p50.pass);
        let p99 = get("random request p99: QEMU");
        assert!(!p99.pass, "6000 / 5000 = 1.2 < 1.5");
        assert!(get("seq blocktime").ratio.is_none(), "seq was not run");
        assert!(get("random request p50: pagehint vanilla").pass);
        let v99 = get("random request p99: pagehint vanilla");
        assert!(!v99.pass, "12000 / 9000 = 1.33 > 1.25");
        assert!(t.last().unwrap().pass);
        let mut few = rows.clone();
        few[3].requests = 3;
        let t = targets(&few);
        let c = t
            .iter()
            .find(|c| c.what.contains("random request p50: pagehint vanilla"))
            .unwrap();
        assert!(
            c.ratio.is_none() && !c.pass && c.what.contains("not comparable"),
            "{c:?}"
        );
        let total = t
            .iter()
            .find(|c| c.what.contains("random total time: pagehint vanilla"))
            .unwrap();
        assert!(
            total.ratio.is_some(),
            "total time does not depend on the request count"
        );
    }
}
