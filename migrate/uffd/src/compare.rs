//! The policy comparison, measured the way restore users measure: per workload, one snapshot,
//! one **record** restore (policy `record`: faults on demand, their order written down for
//! `recorded` and `recorded+pagehint`), then `repeat` restores per policy through an
//! in-process handler (a real Unix socket, the real handshake); optionally the same on a
//! snapshot of another seed, replayed with the first snapshot's record (the working set
//! changed between record and replay). Each configuration is summarized as its median and
//! min–max, and the ratios and targets are judged on the medians.
//!
//! # The measures (every one inside the window, `run_for` after the resume, unless named)
//! * **work**: operations the guest completed in the window, counted by the guest on its
//!   own clock (see [`super::vmm`]);
//! * **first op**: resume → the guest's first completed operation;
//! * **faults** read in the window (and after it: the guest's final check of all memory,
//!   an artefact of this harness, reported apart);
//! * **blocktime** in the window, summed over vCPUs: from the fault's read to its page
//!   placed (a lower bound), and from the latest moment the handler can show it was queued
//!   after (an upper bound; the resume where nothing is known; see
//!   [`super::handler`]); and the time **all** vCPUs were blocked at once (read → placed);
//! * whether **every page was placed once** (no `EEXIST`, and no page counted twice).
//!
//! Repetitions are interleaved (repetition 1 of every policy, then repetition 2, ...) and the
//! policies' order rotates each repetition, so a slow phase of a shared machine falls on
//! every policy alike rather than on one.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::handler::{handle_connection, Control, HandlerOptions, HandlerReport, Policy};
use super::protocol::HandshakeFormat;
use super::source::FileSource;
use super::vmm::{restore, take_snapshot, RestoreOptions, RestoreOutcome, Snapshot};
use pagehint_migrate::blocktime::blocktime_of;
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::options::Workload;

/// The seed of every workload's snapshot.
pub const SEED: u64 = 7;
/// The seed of the snapshot a changed working set is replayed on.
pub const CHANGED_SEED: u64 = 8;

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Where snapshots, records and sockets go.
    pub dir: PathBuf,
    /// Guest RAM bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Host page size (2 MiB: hugetlb-backed restore).
    pub host_page: HostPageSize,
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Workloads also replayed on a snapshot of another seed with the first one's record.
    pub changed: Vec<Workload>,
    /// Policies restored `repeat` times (the record run comes first, once, where one of
    /// them follows a record).
    pub policies: Vec<Policy>,
    /// Prefetchers for the pagehint policies.
    pub prefetchers: usize,
    /// The window: workload time after resume.
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
    /// The case: the workload, with `, new seed` where the replay's snapshot is not the
    /// recorded one.
    pub case: String,
    /// Workload.
    pub workload: String,
    /// Policy.
    pub policy: Policy,
    /// Repetition (0-based).
    pub repetition: usize,
    /// The window (ms).
    pub window_ms: f64,
    /// Operations the guest completed in the window.
    pub work: u64,
    /// Work scaled to a machine that never kept a vCPU from a CPU: `work × V·T / (V·T −
    /// vcpu_queue_ms)` for V vCPUs and a window of T (an estimate; the time blocked on faults
    /// stays in, so the policy's effect does too; the prefetchers' own competition for the
    /// CPU is taken out with the rest).
    pub work_adjusted: f64,
    /// CPU time the vCPU threads got in the window (ms, all together).
    pub vcpu_run_ms: f64,
    /// Time in the window the vCPU threads were runnable but had no CPU (ms, together).
    pub vcpu_queue_ms: f64,
    /// Resume → the guest's first completed operation (ms).
    pub first_op_ms: Option<f64>,
    /// Faults read in the window.
    pub faults_window: u64,
    /// Faults read after it (the guest's final check).
    pub faults_after: u64,
    /// Blocktime in the window, read → placed, summed over vCPUs (ms).
    pub blocktime_window_ms: f64,
    /// The same from the latest moment each fault is known to have been queued after (ms).
    pub blocktime_window_bound_ms: f64,
    /// Time in the window when every vCPU was blocked at once, read → placed (ms).
    pub all_blocked_window_ms: f64,
    /// Blocktime after the window, read → placed, summed over vCPUs (ms): the final check.
    pub blocktime_after_ms: f64,
    /// Faults whose queueing moment a sleep in `poll(2)` bounds (the rest: the previous
    /// read, or the resume).
    pub faults_bounded_by_sleep: u64,
    /// Resume → every vCPU done, after verifying its whole share (ms).
    pub completion_ms: f64,
    /// Resume → every page loaded (ms), if it happened.
    pub all_loaded_ms: Option<f64>,
    /// The guest's page-check errors.
    pub guest_errors: u64,
    /// Pages placed twice (EEXIST).
    pub eexist: u64,
    /// Every page placed at most once (no EEXIST, none counted twice), and every page
    /// placed where the policy loads everything.
    pub placed_once: bool,
    /// Pages the handler placed for faults.
    pub fault_placed: u64,
    /// Pages prefetched.
    pub prefetched: u64,
    /// Pages in the record written or followed.
    pub record_pages: u64,
    /// Pages placed from the record.
    pub record_placed: u64,
    /// CPU time of the prefetchers (ms).
    pub prefetch_cpu_ms: f64,
    /// Time the prefetchers were runnable but waiting for a CPU (ms).
    pub prefetch_wait_ms: f64,
}

pub use pagehint_migrate::spread::Spread;

/// One case and policy over its repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The case.
    pub case: String,
    /// Policy.
    pub policy: Policy,
    /// Repetitions.
    pub runs: usize,
    /// Work in the window.
    pub work: Spread,
    /// Work, queue-adjusted.
    pub work_adjusted: Spread,
    /// vCPU run-queue wait in the window (ms, all vCPUs).
    pub vcpu_queue_ms: Spread,
    /// Resume → first operation (ms), over the runs that completed one.
    pub first_op_ms: Option<Spread>,
    /// Faults in the window.
    pub faults_window: Spread,
    /// Faults after it.
    pub faults_after: Spread,
    /// Blocktime in the window, read → placed (ms).
    pub blocktime_window_ms: Spread,
    /// Its upper bound (ms).
    pub blocktime_window_bound_ms: Spread,
    /// All vCPUs blocked at once in the window (ms).
    pub all_blocked_window_ms: Spread,
    /// Blocktime after the window (ms).
    pub blocktime_after_ms: Spread,
    /// Resume → every page loaded (ms), over the runs where it happened.
    pub all_loaded_ms: Option<Spread>,
    /// Runs where not every page was loaded.
    pub never_loaded: usize,
    /// Guest check errors, all runs.
    pub guest_errors: u64,
    /// EEXIST, all runs.
    pub eexist: u64,
    /// Whether every run placed every page at most once.
    pub placed_once: bool,
}

fn summarize(rows: &[&Row]) -> Option<Summary> {
    let first = rows.first()?;
    let sp = |f: &dyn Fn(&Row) -> f64| Spread::of(rows.iter().map(|r| f(r))).expect("rows");
    Some(Summary {
        case: first.case.clone(),
        policy: first.policy,
        runs: rows.len(),
        work: sp(&|r| r.work as f64),
        work_adjusted: sp(&|r| r.work_adjusted),
        vcpu_queue_ms: sp(&|r| r.vcpu_queue_ms),
        first_op_ms: Spread::of(rows.iter().filter_map(|r| r.first_op_ms)),
        faults_window: sp(&|r| r.faults_window as f64),
        faults_after: sp(&|r| r.faults_after as f64),
        blocktime_window_ms: sp(&|r| r.blocktime_window_ms),
        blocktime_window_bound_ms: sp(&|r| r.blocktime_window_bound_ms),
        all_blocked_window_ms: sp(&|r| r.all_blocked_window_ms),
        blocktime_after_ms: sp(&|r| r.blocktime_after_ms),
        all_loaded_ms: Spread::of(rows.iter().filter_map(|r| r.all_loaded_ms)),
        never_loaded: rows.iter().filter(|r| r.all_loaded_ms.is_none()).count(),
        guest_errors: rows.iter().map(|r| r.guest_errors).sum(),
        eexist: rows.iter().map(|r| r.eexist).sum(),
        placed_once: rows.iter().all(|r| r.placed_once),
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

/// Ratios and targets of one case (judged on medians).
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    /// The case.
    pub case: String,
    /// Work in the window, recorded+pagehint / on-demand.
    pub work_recorded_pagehint_over_on_demand: Option<Ratio>,
    /// Work, recorded+pagehint / the better of linear and pagehint (per repetition: the
    /// better of the two in that repetition).
    pub work_recorded_pagehint_over_best_online: Option<Ratio>,
    /// Work, pagehint / on-demand.
    pub work_pagehint_over_on_demand: Option<Ratio>,
    /// Work, recorded / on-demand.
    pub work_recorded_over_on_demand: Option<Ratio>,
    /// Faults in the window, recorded+pagehint / on-demand.
    pub faults_recorded_pagehint_over_on_demand: Option<Ratio>,
    /// Queue-adjusted work, recorded+pagehint / on-demand.
    pub adjusted_recorded_pagehint_over_on_demand: Option<Ratio>,
    /// Queue-adjusted work, recorded+pagehint / the better of linear and pagehint.
    pub adjusted_recorded_pagehint_over_best_online: Option<Ratio>,
    /// The targets for this case and whether the medians meet them.
    pub targets: Vec<Target>,
}

/// One target.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What it says.
    pub what: String,
    /// Met (on medians); `None`: not measurable (a policy missing).
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

/// Whether targets that need a faithful record apply to `case` (the same snapshot as the
/// record's; kv and random, where the record matters, for the work targets).
fn work_targets_apply(case: &str) -> bool {
    case == Workload::Kv.name() || case == Workload::Random.name()
}

fn ratios(case: &str, mine: &[Row]) -> Ratios {
    let of = |p: Policy, f: &dyn Fn(&Row) -> f64| -> Option<Vec<f64>> {
        let mut v: Vec<(usize, f64)> = mine
            .iter()
            .filter(|r| r.policy == p)
            .map(|r| (r.repetition, f(r)))
            .collect();
        v.sort_by_key(|e| e.0);
        (!v.is_empty()).then(|| v.into_iter().map(|e| e.1).collect())
    };
    let work = |p| of(p, &|r| r.work as f64);
    let adjusted = |p| of(p, &|r| r.work_adjusted);
    let faults = |p| of(p, &|r| r.faults_window as f64);
    let both = |a: Option<Vec<f64>>, b: Option<Vec<f64>>| ratio(&a?, &b?);
    let better = |l: Option<Vec<f64>>, p: Option<Vec<f64>>| match (l, p) {
        (Some(l), Some(p)) if l.len() == p.len() => Some(
            l.iter()
                .zip(&p)
                .map(|(a, b)| a.max(*b))
                .collect::<Vec<f64>>(),
        ),
        _ => None,
    };
    let best_online = better(work(Policy::Linear), work(Policy::Pagehint));
    let best_adjusted = better(adjusted(Policy::Linear), adjusted(Policy::Pagehint));
    let rp_od = both(work(Policy::RecordedPagehint), work(Policy::OnDemand));
    let rp_best = both(work(Policy::RecordedPagehint), best_online);
    let faults_r = both(faults(Policy::RecordedPagehint), faults(Policy::OnDemand));
    let mut targets = Vec::new();
    if work_targets_apply(case) {
        targets.push(Target {
            what: "work recorded+pagehint/on-demand >= 3".into(),
            met: rp_od.map(|r| r.of_medians >= 3.0),
        });
        targets.push(Target {
            what: "work recorded+pagehint/best(linear,pagehint) >= 1.2".into(),
            met: rp_best.map(|r| r.of_medians >= 1.2),
        });
    }
    targets.push(Target {
        what: "work recorded+pagehint/on-demand >= 1.0".into(),
        met: rp_od.map(|r| r.of_medians >= 1.0),
    });
    targets.push(Target {
        what: "faults in window recorded+pagehint/on-demand <= 0.1".into(),
        met: faults_r.map(|r| r.of_medians <= 0.1),
    });
    targets.push(Target {
        what: "every page placed once, 0 EEXIST, every run".into(),
        met: Some(mine.iter().all(|r| r.placed_once && r.eexist == 0)),
    });
    targets.push(Target {
        what: "zero guest check errors".into(),
        met: Some(mine.iter().all(|r| r.guest_errors == 0)),
    });
    Ratios {
        case: case.to_string(),
        work_recorded_pagehint_over_on_demand: rp_od,
        work_recorded_pagehint_over_best_online: rp_best,
        work_pagehint_over_on_demand: both(work(Policy::Pagehint), work(Policy::OnDemand)),
        work_recorded_over_on_demand: both(work(Policy::Recorded), work(Policy::OnDemand)),
        faults_recorded_pagehint_over_on_demand: faults_r,
        adjusted_recorded_pagehint_over_on_demand: both(
            adjusted(Policy::RecordedPagehint),
            adjusted(Policy::OnDemand),
        ),
        adjusted_recorded_pagehint_over_best_online: both(
            adjusted(Policy::RecordedPagehint),
            best_adjusted,
        ),
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
    /// The window (ms).
    pub window_ms: f64,
    /// Every restore (the record runs too).
    pub rows: Vec<Row>,
    /// Per case and policy: medians and ranges.
    pub summaries: Vec<Summary>,
    /// Per case.
    pub ratios: Vec<Ratios>,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// One restore through an in-process handler.
#[derive(Clone, Debug)]
pub struct Trial<'a> {
    /// The snapshot.
    pub snap: &'a Snapshot,
    /// Where the socket goes.
    pub dir: &'a Path,
    /// The handler's settings (policy, prefetchers, record).
    pub handler: HandlerOptions,
    /// The window.
    pub run_for: Duration,
    /// How long the VMM may wait for everything to load (policies that load everything).
    pub linger: Duration,
    /// Which Firecracker releases' handshake the VMM sends.
    pub handshake: HandshakeFormat,
}

/// Restores `t.snap` once through an in-process handler; the handler is stopped (and
/// joined) before guest memory is unmapped.
pub fn restore_once(t: &Trial<'_>) -> Result<(RestoreOutcome, HandlerReport), String> {
    let policy = t.handler.policy;
    let socket = t
        .dir
        .join(format!("uffd-{}.sock", policy.name().replace('+', "-")));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let src = FileSource::open(&t.snap.mem_path()).map_err(|e| format!("memory file: {e}"))?;
    let control = Control::default();
    let hugetlb = t.snap.layout.host_page() == HostPageSize::Huge2M;
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (c, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            handle_connection(&c, &src, &t.handler, &control).map_err(|e| e.to_string())
        });
        let linger = if policy.lingers() {
            t.linger
        } else {
            Duration::ZERO
        };
        let out = restore(
            t.snap,
            &RestoreOptions {
                socket: socket.clone(),
                hugetlb,
                run_for: t.run_for,
                linger,
                handshake: t.handshake,
                connect_wait: Duration::from_secs(5),
            },
            &|| control.all_loaded(),
        );
        if out.is_err() {
            // Unblock a handler still waiting for the connection.
            let _ = std::os::unix::net::UnixStream::connect(&socket);
        }
        // Relaxed: a polled flag. The VMM is done: end the session (a v1.12+ handler has
        // seen the socket close already; a v1.7-v1.11 one serves until told), and only
        // then let guest memory go.
        control
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let rep = h.join().map_err(|_| "the handler panicked".to_string())?;
        let restored = out?;
        Ok::<_, String>((restored.outcome, rep?))
    });
    let _ = std::fs::remove_file(&socket);
    r
}

/// Clips `[a, b)` to `[lo, hi)` (empty: `(lo, lo)`).
fn clip(a: u64, b: u64, lo: u64, hi: u64) -> (u64, u64) {
    let (a, b) = (a.max(lo), b.min(hi));
    if a < b {
        (a, b)
    } else {
        (lo, lo)
    }
}

/// A row from one restore (`case` as in [`Row::case`]).
pub fn row(
    case: &str,
    w: Workload,
    policy: Policy,
    repetition: usize,
    out: &RestoreOutcome,
    rep: &HandlerReport,
) -> Row {
    let (t0, wend) = (out.resumed_ns, out.resumed_ns + out.window_ns);
    let f = &rep.fault_records;
    let window = |start: &dyn Fn(&super::handler::FaultRecord) -> u64| {
        blocktime_of(
            f.iter().map(|r| {
                let (a, b) = clip(start(r), r.placed_ns, t0, wend);
                (r.tid, a, b)
            }),
            &out.tids,
        )
    };
    let read = window(&|r| r.read_ns);
    // A vCPU's fault cannot have been queued before the vCPUs ran.
    let bound = window(&|r| r.queued_after_ns.max(t0));
    let after = blocktime_of(
        f.iter().map(|r| {
            let (a, b) = clip(r.read_ns, r.placed_ns, wend, u64::MAX);
            (r.tid, a, b)
        }),
        &out.tids,
    );
    let sum = |v: &[u64]| ms(v.iter().sum());
    let removed = rep.removed_unloaded + rep.removed_skipped;
    let placed = rep.fault_placed + rep.prefetched + removed;
    let loads_all = policy.lingers() && rep.all_loaded_ns.is_some();
    Row {
        case: case.to_string(),
        workload: w.to_string(),
        policy,
        repetition,
        window_ms: ms(out.window_ns),
        work: out.window_ops,
        work_adjusted: {
            let vt = out.tids.len() as f64 * ms(out.window_ns);
            out.window_ops as f64 * vt / (vt - out.vcpu_queue_ms).max(vt / 100.0)
        },
        vcpu_run_ms: out.vcpu_run_ms,
        vcpu_queue_ms: out.vcpu_queue_ms,
        first_op_ms: out.first_op_ns.map(|t| ms(t.saturating_sub(t0))),
        faults_window: f.iter().filter(|r| r.read_ns < wend).count() as u64,
        faults_after: f.iter().filter(|r| r.read_ns >= wend).count() as u64,
        blocktime_window_ms: sum(&read.per_vcpu_ns),
        blocktime_window_bound_ms: sum(&bound.per_vcpu_ns),
        all_blocked_window_ms: ms(read.all_ns),
        blocktime_after_ms: sum(&after.per_vcpu_ns),
        faults_bounded_by_sleep: rep.bounded_by_sleep,
        completion_ms: ms(out.done_ns - t0),
        all_loaded_ms: rep.all_loaded_ns.map(|t| ms(t.saturating_sub(t0))),
        guest_errors: out.errors,
        eexist: rep.eexist,
        placed_once: rep.eexist == 0
            && placed <= rep.host_pages
            && (!loads_all || placed == rep.host_pages),
        fault_placed: rep.fault_placed,
        prefetched: rep.prefetched,
        record_pages: rep.record_pages,
        record_placed: rep.record_placed,
        prefetch_cpu_ms: ms(rep.prefetch_cpu_ns),
        prefetch_wait_ms: ms(rep.prefetch_wait_ns),
    }
}

/// Runs the comparison; `progress` gets each row as it is measured.
pub fn compare(o: &CompareOptions, progress: &dyn Fn(&Row)) -> Result<Comparison, String> {
    let repeat = o.repeat.max(1);
    let mut rows = Vec::new();
    let needs_record = o.policies.iter().any(|p| p.follows_record());
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    for &w in &o.workloads {
        let snap_dir = o.dir.join(format!("snapshot-{w}"));
        let snap = take_snapshot(&snap_dir, o.mem, o.host_page, o.vcpus, w, SEED, o.warm)?;
        let changed_dir = o.dir.join(format!("snapshot-{w}-seed{CHANGED_SEED}"));
        let changed = if o.changed.contains(&w) {
            Some(take_snapshot(
                &changed_dir,
                o.mem,
                o.host_page,
                o.vcpus,
                w,
                CHANGED_SEED,
                o.warm,
            )?)
        } else {
            None
        };
        let record = o.dir.join(format!("record-{w}"));
        let trial = |snap, policy| Trial {
            snap,
            dir: &o.dir,
            handler: HandlerOptions {
                policy,
                prefetchers: o.prefetchers,
                record: Some(record.clone()),
                record_for: Some(o.run_for),
                ..Default::default()
            },
            run_for: o.run_for,
            linger: o.linger,
            handshake: HandshakeFormat::PageSizeBoth,
        };
        let case_same = w.name().to_string();
        let case_changed = format!("{w}, new seed");
        let mut mine = Vec::new();
        if needs_record {
            let (out, rep) = restore_once(&trial(&snap, Policy::Record))
                .map_err(|e| format!("{w} / record: {e}"))?;
            let r = row(&case_same, w, Policy::Record, 0, &out, &rep);
            progress(&r);
            mine.push(r);
        }
        for k in 0..repeat {
            let n = o.policies.len();
            for i in 0..n {
                let p = o.policies[(i + k) % n];
                let cases = std::iter::once((&snap, &case_same))
                    .chain(changed.as_ref().map(|c| (c, &case_changed)));
                for (s, case) in cases {
                    let (out, rep) = restore_once(&trial(s, p))
                        .map_err(|e| format!("{case} / {p} / run {}: {e}", k + 1))?;
                    let r = row(case, w, p, k, &out, &rep);
                    progress(&r);
                    mine.push(r);
                }
            }
        }
        rows.extend(mine);
        let _ = std::fs::remove_dir_all(&snap_dir);
        let _ = std::fs::remove_dir_all(&changed_dir);
        let _ = std::fs::remove_file(&record);
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
/// `prefetchers`, `repeat` times each): per case and policy, in the order they ran, the
/// summaries, and per case the ratios and targets.
pub fn comparison_of(
    rows: Vec<Row>,
    mem: u64,
    vcpus: u32,
    host_page: u64,
    prefetchers: usize,
    repeat: usize,
) -> Comparison {
    let mut cases: Vec<String> = Vec::new();
    let mut policies: Vec<Policy> = Vec::new();
    for r in &rows {
        if !cases.contains(&r.case) {
            cases.push(r.case.clone());
        }
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    // Same-snapshot cases first, each followed by its changed one.
    cases.sort_by_key(|c| {
        let base = c.split(',').next().unwrap_or(c);
        let w = Workload::ALL.iter().position(|w| w.name() == base);
        (w, c.contains(','))
    });
    let mut summaries = Vec::new();
    let mut ratios_v = Vec::new();
    for case in &cases {
        let mine: Vec<Row> = rows.iter().filter(|r| &r.case == case).cloned().collect();
        for &p in &policies {
            let of_p: Vec<&Row> = mine.iter().filter(|r| r.policy == p).collect();
            summaries.extend(summarize(&of_p));
        }
        ratios_v.push(ratios(case, &mine));
    }
    Comparison {
        mem,
        vcpus,
        host_page,
        prefetchers,
        repeat,
        window_ms: rows.first().map_or(0.0, |r| r.window_ms),
        rows,
        summaries,
        ratios: ratios_v,
    }
}

/// The comparison as a text table: medians with [min–max] over the repetitions.
pub fn table(c: &Comparison) -> String {
    let sp = |v: &Spread, d: usize| format!("{:.d$} [{:.d$}-{:.d$}]", v.median, v.min, v.max);
    let opt = |v: &Option<Spread>, d: usize| v.as_ref().map_or("-".into(), |v| sp(v, d));
    let mut s = format!(
        "{} restore(s) per row (the record run: 1); median [min-max]; window = the first {:.0} ms after resume\n\
         work = guest operations completed in the window; bt = blocktime in the window summed over vCPUs, \
         read -> placed (queued-after bound -> placed); all = every vCPU blocked at once; \
         after = blocktime after the window (the guest's final check); vCPU queue = time the vCPU \
         threads were runnable without a CPU (a busy machine)\n\
         {:<18} {:<17} {:>26} {:>10} {:>10} {:>22} {:>24} {:>32} {:>10} {:>10} {:>18} {:>7} {:>5}\n",
        c.repeat,
        c.window_ms,
        "case",
        "policy",
        "work",
        "adjusted",
        "vCPU queue",
        "first op ms",
        "faults in window",
        "bt ms (bound)",
        "all ms",
        "after ms",
        "loaded ms",
        "eexist",
        "once"
    );
    for r in &c.summaries {
        let loaded = match (&r.all_loaded_ms, r.never_loaded) {
            (Some(v), 0) => format!("{:.0}", v.median),
            (Some(v), n) => format!("{:.0} ({n} never)", v.median),
            (None, _) => "never".into(),
        };
        s += &format!(
            "{:<18} {:<17} {:>26} {:>10.0} {:>10.0} {:>22} {:>24} {:>32} {:>10.1} {:>10.1} {:>18} {:>7} {:>5}\n",
            r.case,
            r.policy,
            sp(&r.work, 0),
            r.work_adjusted.median,
            r.vcpu_queue_ms.median,
            opt(&r.first_op_ms, 1),
            sp(&r.faults_window, 0),
            format!(
                "{} ({:.1})",
                sp(&r.blocktime_window_ms, 1),
                r.blocktime_window_bound_ms.median
            ),
            r.all_blocked_window_ms.median,
            r.blocktime_after_ms.median,
            loaded,
            r.eexist,
            if r.placed_once { "yes" } else { "NO" }
        );
    }
    s += "\nratios of medians [per-run min-max]:\n";
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
            "{:<18} work rec+ph/on-demand {:>22}  rec+ph/best(linear,ph) {:>20}  ph/on-demand {:>22}  rec/on-demand {:>22}  faults rec+ph/on-demand {:>20}\n",
            r.case,
            f(&r.work_recorded_pagehint_over_on_demand),
            f(&r.work_recorded_pagehint_over_best_online),
            f(&r.work_pagehint_over_on_demand),
            f(&r.work_recorded_over_on_demand),
            f(&r.faults_recorded_pagehint_over_on_demand),
        );
    }
    s += "\nthe same on queue-adjusted work (work x V*T / (V*T - vCPU queue); not a target):\n";
    for r in &c.ratios {
        s += &format!(
            "{:<18} adjusted rec+ph/on-demand {:>22}  rec+ph/best(linear,ph) {:>20}\n",
            r.case,
            f(&r.adjusted_recorded_pagehint_over_on_demand),
            f(&r.adjusted_recorded_pagehint_over_best_online),
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
            s += &format!("{:<18} {:<55} {v}\n", r.case, t.what);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::FaultRecord;

    #[test]
    fn medians_and_ranges() {
        let r = ratio(&[6.0, 9.0, 3.0], &[1.0, 3.0, 3.0]).unwrap();
        assert_eq!(r.of_medians, 2.0);
        assert_eq!((r.per_run_min, r.per_run_max), (1.0, 6.0));
        assert!(ratio(&[1.0], &[0.0]).is_none());
    }

    fn outcome() -> RestoreOutcome {
        RestoreOutcome {
            resumed_ns: 1_000,
            stop_ns: 2_000,
            done_ns: 5_000,
            window_ns: 1_000,
            window_ops: 42,
            first_op_ns: Some(1_250),
            vcpu_run_ms: 0.0,
            vcpu_queue_ms: 0.0,
            ops: 50,
            verified: 10,
            errors: 0,
            first_error: None,
            tids: vec![7, 9],
            counters: Vec::new(),
        }
    }

    /// The window's measures take only what happened in it: faults by read time, waits
    /// clipped to it (read → placed, and from the queued-after bound, never before the
    /// resume), the rest counted after it.
    #[test]
    fn a_row_splits_the_window_from_the_final_check() {
        let f = |tid, queued_after_ns, read_ns, placed_ns| FaultRecord {
            tid,
            hp: 0,
            queued_after_ns,
            read_ns,
            placed_ns,
        };
        let rep = HandlerReport {
            host_pages: 4,
            fault_placed: 4,
            fault_records: vec![
                f(7, 0, 1_100, 1_300),     // vCPU 0: 200 read → placed, bound from 1000
                f(9, 1_150, 1_200, 1_400), // vCPU 1: 200, bound 250
                f(7, 1_800, 1_900, 2_300), // across the window's end: 100 in, 300 after
                f(9, 2_500, 2_600, 2_700), // after: 100
            ],
            ..Default::default()
        };
        let r = row("kv", Workload::Kv, Policy::OnDemand, 0, &outcome(), &rep);
        assert_eq!((r.faults_window, r.faults_after), (3, 1));
        assert_eq!(r.work, 42);
        assert_eq!(r.work_adjusted, 42.0);
        // Half of the vCPUs' time spent waiting for a CPU: twice the work on an idle machine.
        let busy = RestoreOutcome {
            vcpu_queue_ms: 0.001,
            ..outcome()
        };
        let b = row("kv", Workload::Kv, Policy::OnDemand, 0, &busy, &rep);
        assert!((b.work_adjusted - 84.0).abs() < 1e-9, "{}", b.work_adjusted);
        assert_eq!(r.first_op_ms, Some(250.0 / 1e6));
        let ms = |ns: f64| ns / 1e6;
        assert_eq!(r.blocktime_window_ms, ms(200.0 + 200.0 + 100.0));
        assert_eq!(r.blocktime_window_bound_ms, ms(300.0 + 250.0 + 200.0));
        assert_eq!(r.all_blocked_window_ms, ms(100.0)); // 1200..1300
        assert_eq!(r.blocktime_after_ms, ms(300.0 + 100.0));
        assert!(r.placed_once);
        let twice = HandlerReport {
            eexist: 1,
            ..rep.clone()
        };
        assert!(!row("kv", Workload::Kv, Policy::OnDemand, 0, &outcome(), &twice).placed_once);
        let over = HandlerReport {
            prefetched: 1,
            ..rep
        };
        assert!(!row("kv", Workload::Kv, Policy::OnDemand, 0, &outcome(), &over).placed_once);
    }

    /// The targets are judged on medians of the right policies: recorded+pagehint against
    /// on-demand and against the better of linear and pagehint in each repetition.
    #[test]
    fn the_targets_read_the_right_rows() {
        let rows: Vec<Row> = [
            (Policy::OnDemand, [100, 100, 100], [1000, 1000, 1000]),
            (Policy::Linear, [200, 250, 200], [50, 50, 50]),
            (Policy::Pagehint, [250, 200, 240], [40, 40, 40]),
            (Policy::Recorded, [150, 150, 150], [80, 80, 80]),
            (Policy::RecordedPagehint, [320, 310, 300], [90, 100, 110]),
        ]
        .iter()
        .flat_map(|&(p, work, faults)| {
            (0..3).map(move |k| {
                let mut r = row(
                    "kv",
                    Workload::Kv,
                    p,
                    k,
                    &outcome(),
                    &HandlerReport::default(),
                );
                r.work = work[k];
                r.work_adjusted = work[k] as f64;
                r.faults_window = faults[k];
                r
            })
        })
        .collect();
        let c = comparison_of(rows, 1 << 20, 2, 4096, 1, 3);
        let r = &c.ratios[0];
        assert_eq!(
            r.work_recorded_pagehint_over_on_demand.unwrap().of_medians,
            3.1
        );
        let best = r.work_recorded_pagehint_over_best_online.unwrap();
        // Best per repetition: 250, 250, 240 → median 250; 310 / 250.
        assert_eq!(best.of_medians, 310.0 / 250.0);
        assert_eq!(
            r.faults_recorded_pagehint_over_on_demand
                .unwrap()
                .of_medians,
            0.1
        );
        let met: Vec<_> = r.targets.iter().map(|t| t.met).collect();
        assert_eq!(met, [Some(true); 6]);
        assert!(table(&c).contains("recorded+pagehint"));
    }
}
