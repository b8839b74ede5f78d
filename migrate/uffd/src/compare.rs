//! The policy comparison: one snapshot per workload, restored `repeat` times per policy
//! through an in-process handler (a real Unix socket, the real handshake), with the measures
//! the issue asks for; each configuration summarized as its median and min–max, the ratios
//! and the targets judged on the medians.
//!
//! Repetitions are interleaved (repetition 1 of every policy, then repetition 2, ...) and the
//! policies' order rotates each repetition, so a slow phase of a shared machine falls on
//! every policy alike rather than on one.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::handler::{handle_connection, Control, HandlerOptions, HandlerReport, Policy};
use super::source::FileSource;
use super::vmm::{restore, take_snapshot, RestoreOptions, RestoreOutcome, Snapshot};
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::options::Workload;

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Where snapshots and sockets go.
    pub dir: PathBuf,
    /// Guest RAM bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Host page size (2 MiB: hugetlb-backed restore).
    pub host_page: HostPageSize,
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Policies.
    pub policies: Vec<Policy>,
    /// Prefetchers for the pagehint policies.
    pub prefetchers: usize,
    /// Workload time after resume.
    pub run_for: Duration,
    /// Workload time before the snapshot.
    pub warm: Duration,
    /// How long the VMM waits after the guest is done for the handler to load everything.
    pub linger: Duration,
    /// Restores per workload and policy (at least 1).
    pub repeat: usize,
}

/// One restore.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Workload.
    pub workload: String,
    /// Policy.
    pub policy: Policy,
    /// Repetition (0-based).
    pub repetition: usize,
    /// Faults the handler read.
    pub faults: u64,
    /// Per-vCPU blocktime (ms), in vCPU order.
    pub blocktime_ms: Vec<f64>,
    /// Their sum (ms).
    pub blocktime_total_ms: f64,
    /// Workload operations in the run window.
    pub ops: u64,
    /// Resume → every vCPU done, after verifying its whole share (ms).
    pub completion_ms: f64,
    /// Resume → every page loaded (ms), if it happened.
    pub all_loaded_ms: Option<f64>,
    /// The guest's page-check errors.
    pub guest_errors: u64,
    /// Pages placed twice (EEXIST).
    pub eexist: u64,
    /// Pages the handler placed for faults / prefetched.
    pub fault_placed: u64,
    /// Pages prefetched.
    pub prefetched: u64,
    /// CPU time of the prefetchers (ms).
    pub prefetch_cpu_ms: f64,
    /// Time the prefetchers were runnable but waiting for a CPU (ms).
    pub prefetch_wait_ms: f64,
    /// Their CPU time per prefetched page (µs): the prefetcher's own cost, apart from how
    /// much CPU it was given.
    pub prefetch_cpu_us_per_page: Option<f64>,
}

/// The median and the range of one measure over the repetitions.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Spread {
    /// Median (of an even count: the mean of the middle two).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `v` (`None` if empty).
    pub fn of(v: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = v.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// One workload and policy over its repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Workload.
    pub workload: String,
    /// Policy.
    pub policy: Policy,
    /// Repetitions.
    pub runs: usize,
    /// Faults.
    pub faults: Spread,
    /// Total vCPU blocktime (ms).
    pub blocktime_total_ms: Spread,
    /// Resume → every vCPU done (ms).
    pub completion_ms: Spread,
    /// Resume → every page loaded (ms), over the runs where it happened.
    pub all_loaded_ms: Option<Spread>,
    /// Runs where not every page was loaded.
    pub never_loaded: usize,
    /// Pages placed for faults.
    pub fault_placed: Spread,
    /// Pages prefetched.
    pub prefetched: Spread,
    /// Prefetchers' CPU time per prefetched page (µs), over runs that prefetched.
    pub prefetch_cpu_us_per_page: Option<Spread>,
    /// Prefetchers' time waiting for a CPU (ms).
    pub prefetch_wait_ms: Spread,
    /// Guest check errors, all runs.
    pub guest_errors: u64,
    /// EEXIST, all runs.
    pub eexist: u64,
}

fn summarize(rows: &[&Row]) -> Option<Summary> {
    let first = rows.first()?;
    let sp = |f: &dyn Fn(&Row) -> f64| Spread::of(rows.iter().map(|r| f(r))).expect("rows");
    Some(Summary {
        workload: first.workload.clone(),
        policy: first.policy,
        runs: rows.len(),
        faults: sp(&|r| r.faults as f64),
        blocktime_total_ms: sp(&|r| r.blocktime_total_ms),
        completion_ms: sp(&|r| r.completion_ms),
        all_loaded_ms: Spread::of(rows.iter().filter_map(|r| r.all_loaded_ms)),
        never_loaded: rows.iter().filter(|r| r.all_loaded_ms.is_none()).count(),
        fault_placed: sp(&|r| r.fault_placed as f64),
        prefetched: sp(&|r| r.prefetched as f64),
        prefetch_wait_ms: sp(&|r| r.prefetch_wait_ms),
        prefetch_cpu_us_per_page: Spread::of(
            rows.iter().filter_map(|r| r.prefetch_cpu_us_per_page),
        ),
        guest_errors: rows.iter().map(|r| r.guest_errors).sum(),
        eexist: rows.iter().map(|r| r.eexist).sum(),
    })
}

/// A ratio of medians, with the range of the same ratio taken repetition by repetition.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Ratio {
    /// The ratio of the two medians (what the target is judged on).
    pub of_medians: f64,
    /// The smallest and largest per-repetition ratio (repetition i against repetition i).
    pub per_run_min: f64,
    /// See `per_run_min`.
    pub per_run_max: f64,
}

/// Ratios and targets of one workload (judged on medians).
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    /// Workload.
    pub workload: String,
    /// On-demand blocktime / pagehint blocktime (target ≥ 3 on seq, stream, kv).
    pub blocktime_on_demand_over_pagehint: Option<Ratio>,
    /// Pagehint blocktime / on-demand blocktime (target ≤ 1.1 on random).
    pub blocktime_pagehint_over_on_demand: Option<Ratio>,
    /// Pagehint all-loaded time / linear's (target ≤ 1).
    pub all_loaded_pagehint_over_linear: Option<Ratio>,
    /// The targets for this workload and whether the medians meet them.
    pub targets: Vec<Target>,
}

/// One target.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What it says.
    pub what: String,
    /// Met (on medians); `None`: not measurable (a policy missing, or never fully loaded).
    pub met: Option<bool>,
}

fn ratio(a: &[f64], b: &[f64]) -> Option<Ratio> {
    let (ma, mb) = (
        Spread::of(a.iter().copied())?,
        Spread::of(b.iter().copied())?,
    );
    if mb.median <= 0.0 {
        return None;
    }
    let per = Spread::of(
        a.iter()
            .zip(b)
            .filter(|(_, &b)| b > 0.0)
            .map(|(a, b)| a / b),
    )?;
    Some(Ratio {
        of_medians: ma.median / mb.median,
        per_run_min: per.min,
        per_run_max: per.max,
    })
}

fn ratios(w: Workload, mine: &[Row]) -> Ratios {
    let of = |p: Policy, f: &dyn Fn(&Row) -> Option<f64>| -> Option<Vec<f64>> {
        let mut v: Vec<(usize, f64)> = Vec::new();
        for r in mine.iter().filter(|r| r.policy == p) {
            v.push((r.repetition, f(r)?));
        }
        v.sort_by_key(|e| e.0);
        (!v.is_empty()).then(|| v.into_iter().map(|e| e.1).collect())
    };
    let bt = |p| of(p, &|r| Some(r.blocktime_total_ms));
    let loaded = |p| of(p, &|r| r.all_loaded_ms);
    let both = |a: Option<Vec<f64>>, b: Option<Vec<f64>>| ratio(&a?, &b?);
    let od_ph = both(bt(Policy::OnDemand), bt(Policy::Pagehint));
    let ph_od = both(bt(Policy::Pagehint), bt(Policy::OnDemand));
    let loaded_r = both(loaded(Policy::Pagehint), loaded(Policy::Linear));
    let mut targets = Vec::new();
    match w {
        Workload::Random => targets.push(Target {
            what: "blocktime pagehint/on-demand <= 1.1".into(),
            met: ph_od.map(|r| r.of_medians <= 1.1),
        }),
        _ => targets.push(Target {
            what: "blocktime on-demand/pagehint >= 3".into(),
            met: od_ph.map(|r| r.of_medians >= 3.0),
        }),
    }
    targets.push(Target {
        what: "all loaded pagehint/linear <= 1".into(),
        met: loaded_r.map(|r| r.of_medians <= 1.0),
    });
    targets.push(Target {
        what: "zero guest check errors".into(),
        met: Some(mine.iter().all(|r| r.guest_errors == 0)),
    });
    Ratios {
        workload: w.to_string(),
        blocktime_on_demand_over_pagehint: od_ph,
        blocktime_pagehint_over_on_demand: ph_od,
        all_loaded_pagehint_over_linear: loaded_r,
        targets,
    }
}

/// The whole comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// Guest RAM bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Host page bytes.
    pub host_page: u64,
    /// Prefetchers.
    pub prefetchers: usize,
    /// Repetitions per configuration.
    pub repeat: usize,
    /// Every restore.
    pub rows: Vec<Row>,
    /// Per workload and policy: medians and ranges.
    pub summaries: Vec<Summary>,
    /// Per workload.
    pub ratios: Vec<Ratios>,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Restores `snap` once through an in-process handler with `policy`.
pub fn restore_once(
    snap: &Snapshot,
    dir: &Path,
    policy: Policy,
    prefetchers: usize,
    run_for: Duration,
    linger: Duration,
) -> Result<(RestoreOutcome, HandlerReport), String> {
    let socket = dir.join(format!("uffd-{policy}.sock"));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let src = FileSource::open(&snap.mem_path()).map_err(|e| format!("memory file: {e}"))?;
    let opts = HandlerOptions {
        policy,
        prefetchers,
        ..Default::default()
    };
    let control = Control::default();
    let hugetlb = snap.layout.host_page() == HostPageSize::Huge2M;
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (c, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            handle_connection(&c, &src, &opts, &control).map_err(|e| e.to_string())
        });
        let linger = if policy.lingers() {
            linger
        } else {
            Duration::ZERO
        };
        let out = restore(
            snap,
            &RestoreOptions {
                socket: socket.clone(),
                hugetlb,
                run_for,
                linger,
            },
            &|| control.all_loaded(),
        );
        if out.is_err() {
            // Unblock a handler still waiting for the connection.
            let _ = std::os::unix::net::UnixStream::connect(&socket);
            control
                .stop
                .store(true, std::sync::atomic::Ordering::Relaxed); // Relaxed: a polled flag
        }
        let rep = h.join().map_err(|_| "the handler panicked".to_string())?;
        Ok::<_, String>((out?, rep?))
    });
    let _ = std::fs::remove_file(&socket);
    r
}

/// A row from one restore.
pub fn row(
    w: Workload,
    policy: Policy,
    repetition: usize,
    out: &RestoreOutcome,
    rep: &HandlerReport,
) -> Row {
    let blocktime_ms: Vec<f64> = rep
        .blocktime(&out.tids)
        .per_vcpu_ns
        .into_iter()
        .map(ms)
        .collect();
    Row {
        workload: w.to_string(),
        policy,
        repetition,
        faults: rep.faults,
        blocktime_total_ms: blocktime_ms.iter().sum(),
        blocktime_ms,
        ops: out.ops,
        completion_ms: ms(out.done_ns - out.resumed_ns),
        all_loaded_ms: rep
            .all_loaded_ns
            .map(|t| ms(t.saturating_sub(out.resumed_ns))),
        guest_errors: out.errors,
        eexist: rep.eexist,
        fault_placed: rep.fault_placed,
        prefetched: rep.prefetched,
        prefetch_cpu_ms: ms(rep.prefetch_cpu_ns),
        prefetch_wait_ms: ms(rep.prefetch_wait_ns),
        prefetch_cpu_us_per_page: (rep.prefetched > 0)
            .then(|| rep.prefetch_cpu_ns as f64 / 1e3 / rep.prefetched as f64),
    }
}

/// Runs the comparison; `progress` gets each row as it is measured.
pub fn compare(o: &CompareOptions, progress: &dyn Fn(&Row)) -> Result<Comparison, String> {
    let repeat = o.repeat.max(1);
    let mut rows = Vec::new();
    for &w in &o.workloads {
        let dir = o.dir.join(format!("snapshot-{w}"));
        let snap = take_snapshot(&dir, o.mem, o.host_page, o.vcpus, w, 7, o.warm)?;
        let mut mine = Vec::new();
        for k in 0..repeat {
            let n = o.policies.len();
            for i in 0..n {
                let p = o.policies[(i + k) % n];
                let (out, rep) = restore_once(&snap, &o.dir, p, o.prefetchers, o.run_for, o.linger)
                    .map_err(|e| format!("{w} / {p} / run {}: {e}", k + 1))?;
                let r = row(w, p, k, &out, &rep);
                progress(&r);
                mine.push(r);
            }
        }
        rows.extend(mine);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(comparison_of(
        rows,
        o.mem,
        o.vcpus,
        o.host_page.bytes(),
        o.prefetchers,
        repeat,
    ))
}

/// The comparison of `rows` (restores of `mem` bytes, `vcpus` vCPUs, `host_page` pages,
/// `prefetchers`, `repeat` times each): per workload and policy, in the order they ran,
/// the summaries, and per workload the ratios and targets.
pub fn comparison_of(
    rows: Vec<Row>,
    mem: u64,
    vcpus: u32,
    host_page: u64,
    prefetchers: usize,
    repeat: usize,
) -> Comparison {
    let mut workloads: Vec<Workload> = Vec::new();
    let mut policies: Vec<Policy> = Vec::new();
    for r in &rows {
        if let Ok(w) = r.workload.parse::<Workload>() {
            if !workloads.contains(&w) {
                workloads.push(w);
            }
        }
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    let mut summaries = Vec::new();
    let mut ratios_v = Vec::new();
    for w in workloads {
        let mine: Vec<Row> = rows
            .iter()
            .filter(|r| r.workload == w.name())
            .cloned()
            .collect();
        for &p in &policies {
            let of_p: Vec<&Row> = mine.iter().filter(|r| r.policy == p).collect();
            summaries.extend(summarize(&of_p));
        }
        ratios_v.push(ratios(w, &mine));
    }
    Comparison {
        mem,
        vcpus,
        host_page,
        prefetchers,
        repeat,
        rows,
        summaries,
        ratios: ratios_v,
    }
}

/// The comparison as a text table: medians with [min–max] over the repetitions.
pub fn table(c: &Comparison) -> String {
    let sp = |v: &Spread, d: usize| format!("{:.d$} [{:.d$}-{:.d$}]", v.median, v.min, v.max);
    let mut s = format!(
        "{} restore(s) per row; median [min-max]\n{:<8} {:<16} {:>7} {:>26} {:>26} {:>26} {:>12} {:>10} {:>6} {:>6}\n",
        c.repeat,
        "workload",
        "policy",
        "faults",
        "blocktime ms",
        "complete ms",
        "loaded ms",
        "pf cpu us/pg",
        "pf wait ms",
        "errors",
        "eexist"
    );
    for r in &c.summaries {
        let loaded = match (&r.all_loaded_ms, r.never_loaded) {
            (Some(v), 0) => sp(v, 1),
            (Some(v), n) => format!("{} ({n} never)", sp(v, 1)),
            (None, _) => "never".into(),
        };
        s += &format!(
            "{:<8} {:<16} {:>7.0} {:>26} {:>26} {:>26} {:>12} {:>10.1} {:>6} {:>6}\n",
            r.workload,
            r.policy,
            r.faults.median,
            sp(&r.blocktime_total_ms, 2),
            sp(&r.completion_ms, 1),
            loaded,
            r.prefetch_cpu_us_per_page
                .map_or("-".into(), |v| format!("{:.2}", v.median)),
            r.prefetch_wait_ms.median,
            r.guest_errors,
            r.eexist
        );
    }
    s += "\nratios of medians [per-run min-max] (blocktime = sum over vCPUs):\n";
    let f = |v: &Option<Ratio>| {
        v.as_ref().map_or("n/a".into(), |v| {
            format!(
                "{:.2}x [{:.2}-{:.2}]",
                v.of_medians, v.per_run_min, v.per_run_max
            )
        })
    };
    for r in &c.ratios {
        s += &format!(
            "{:<8} on-demand/pagehint blocktime {:>20}  pagehint/on-demand {:>20}  loaded pagehint/linear {:>20}\n",
            r.workload,
            f(&r.blocktime_on_demand_over_pagehint),
            f(&r.blocktime_pagehint_over_on_demand),
            f(&r.all_loaded_pagehint_over_linear)
        );
    }
    s += "\ntargets (on medians):\n";
    for r in &c.ratios {
        for t in &r.targets {
            let v = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            s += &format!("{:<8} {:<40} {v}\n", r.workload, t.what);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Spread::of([]).is_none());
        let r = ratio(&[6.0, 9.0, 3.0], &[1.0, 3.0, 3.0]).unwrap();
        assert_eq!(r.of_medians, 2.0);
        assert_eq!((r.per_run_min, r.per_run_max), (1.0, 6.0));
        assert!(ratio(&[1.0], &[0.0]).is_none());
    }
}
