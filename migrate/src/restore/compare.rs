//! The policy comparison: one snapshot per workload, restored once per policy through an
//! in-process handler (a real Unix socket, the real handshake), with the measures the issue
//! asks for and the ratios against on-demand.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::handler::{handle_connection, Control, HandlerOptions, HandlerReport, Policy};
use super::source::FileSource;
use super::vmm::{restore, take_snapshot, RestoreOptions, RestoreOutcome, Snapshot};
use crate::guest::layout::HostPageSize;
use crate::options::Workload;

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
}

/// One restore.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Workload.
    pub workload: String,
    /// Policy.
    pub policy: String,
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
}

/// Ratios of one workload.
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    /// Workload.
    pub workload: String,
    /// On-demand blocktime / pagehint blocktime (target ≥ 3 on seq, stream, kv).
    pub blocktime_on_demand_over_pagehint: Option<f64>,
    /// Pagehint blocktime / on-demand blocktime (target ≤ 1.1 on random).
    pub blocktime_pagehint_over_on_demand: Option<f64>,
    /// Pagehint all-loaded time / linear's (target ≤ 1).
    pub all_loaded_pagehint_over_linear: Option<f64>,
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
    /// Every restore.
    pub rows: Vec<Row>,
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
        let linger = if policy == Policy::OnDemand {
            Duration::ZERO
        } else {
            linger
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
pub fn row(w: Workload, policy: Policy, out: &RestoreOutcome, rep: &HandlerReport) -> Row {
    let by_tid = rep.blocktime_by_tid();
    let blocktime_ms: Vec<f64> = out
        .tids
        .iter()
        .map(|t| ms(by_tid.iter().find(|e| e.0 == *t).map_or(0, |e| e.2)))
        .collect();
    Row {
        workload: w.to_string(),
        policy: policy.to_string(),
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
    }
}

/// Runs the comparison; `progress` gets each row as it is measured.
pub fn compare(o: &CompareOptions, progress: &dyn Fn(&Row)) -> Result<Comparison, String> {
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for &w in &o.workloads {
        let dir = o.dir.join(format!("snapshot-{w}"));
        let snap = take_snapshot(&dir, o.mem, o.host_page, o.vcpus, w, 7, o.warm)?;
        let mut mine = Vec::new();
        for &p in &o.policies {
            let (out, rep) = restore_once(&snap, &o.dir, p, o.prefetchers, o.run_for, o.linger)
                .map_err(|e| format!("{w} / {p}: {e}"))?;
            let r = row(w, p, &out, &rep);
            progress(&r);
            mine.push(r);
        }
        let get = |p: Policy| mine.iter().find(|r| r.policy == p.name());
        let bt = |p| get(p).map(|r: &Row| r.blocktime_total_ms);
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        ratios.push(Ratios {
            workload: w.to_string(),
            blocktime_on_demand_over_pagehint: div(bt(Policy::OnDemand), bt(Policy::Pagehint)),
            blocktime_pagehint_over_on_demand: div(bt(Policy::Pagehint), bt(Policy::OnDemand)),
            all_loaded_pagehint_over_linear: div(
                get(Policy::Pagehint).and_then(|r| r.all_loaded_ms),
                get(Policy::Linear).and_then(|r| r.all_loaded_ms),
            ),
        });
        rows.extend(mine);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Comparison {
        mem: o.mem,
        vcpus: o.vcpus,
        host_page: o.host_page.bytes(),
        prefetchers: o.prefetchers,
        rows,
        ratios,
    })
}

/// The comparison as a text table.
pub fn table(c: &Comparison) -> String {
    let mut s = format!(
        "{:<8} {:<16} {:>7} {:>14} {:>10} {:>12} {:>12} {:>6} {:>6}\n",
        "workload",
        "policy",
        "faults",
        "blocktime ms",
        "ops",
        "complete ms",
        "loaded ms",
        "errors",
        "eexist"
    );
    for r in &c.rows {
        s += &format!(
            "{:<8} {:<16} {:>7} {:>14.2} {:>10} {:>12.1} {:>12} {:>6} {:>6}\n",
            r.workload,
            r.policy,
            r.faults,
            r.blocktime_total_ms,
            r.ops,
            r.completion_ms,
            r.all_loaded_ms
                .map_or("never".into(), |v| format!("{v:.1}")),
            r.guest_errors,
            r.eexist
        );
    }
    s += "\nratios (blocktime = sum over vCPUs):\n";
    let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}x"));
    for r in &c.ratios {
        s += &format!(
            "{:<8} on-demand/pagehint blocktime {:>8}  pagehint/on-demand {:>8}  loaded pagehint/linear {:>8}\n",
            r.workload,
            f(r.blocktime_on_demand_over_pagehint),
            f(r.blocktime_pagehint_over_on_demand),
            f(r.all_loaded_pagehint_over_linear)
        );
    }
    s
}
