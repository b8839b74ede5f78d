//! The side-by-side rows, their medians over the repeats, the split of every ratio into what
//! the scheduler/implementation did and what the transport did, and the targets.
//!
//! Where each figure comes from:
//!
//! | figure | QEMU | pagehint |
//! |---|---|---|
//! | request latency p50/p99 | ≥ 10.1: the destination's `query-migrate` histogram (untraced run); < 10.1: its request trace, one write per request ([`super::trace`]) | destination: fault read → page placed |
//! | blocktime | destination `postcopy-blocktime` (every vCPU blocked at once) | the same definition, measured at the destination |
//! | vCPUs blocked | destination `postcopy-vcpu-blocktime`, one entry per vCPU, summed | each vCPU's blocked time (its faults' waits), summed |
//! | total time (one span for both) | source `STOP` event (vCPUs stopped) → destination `MIGRATION` `completed` event | source stopped → last page placed |
//! | requests | source `ram.postcopy-requests` | requests sent by the destination |
//! | CPU per GiB | run time of the `mig/...` threads (migration, return path; fault, preempt, listen), per GiB sent | run time of the `ph/...` threads (background sender, return path; fault, urgent and background receivers), per GiB sent |
//! | guest alive | running, no failed checks, operations growing at the destination | the harness's verification (memory equals the source's, every page placed once, the guest's checks) |
//!
//! # Ratios
//! Every ratio is **QEMU / pagehint** (above 1: pagehint lower, i.e. better, on that figure)
//! except the vanilla-vs-vanilla checks (pagehint / QEMU, within 1.25× either way). A ratio
//! is taken per repeat from the two runs of that repeat, then its median and min–max over
//! the repeats. Against the anchor (QEMU with the hint, preempt) and pagehint preempt-hint:
//!
//! * **as shipped**: QEMU on its transport / pagehint on its own;
//! * **scheduler/implementation** at each transport: both peers on QEMU's transport, and both
//!   on pagehint's;
//! * **transport**, per peer: the same peer on QEMU's transport / on pagehint's.
//!
//! So as shipped = scheduler (QEMU's transport) × transport (pagehint) = transport (QEMU) ×
//! scheduler (pagehint's transport), per repeat.
//!
//! A latency or blocktime ratio of a repeat where either side made fewer than
//! [`MIN_REQUESTS`] requests is not taken; a ratio with fewer than half its repeats left is
//! reported as not comparable, with the request counts.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::cpu::CpuByThread;
use super::latency::{Latency, LatencySource};
use super::ours::{OursOutcome, Transport};
use super::peer::QemuOutcome;

/// One migration, QEMU's or pagehint's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SideRow {
    /// Which repetition (from 0).
    pub repeat: u32,
    /// Link class, e.g. `10G`.
    pub link: String,
    /// `tbf` rate, bits/s.
    pub link_rate_bps: u64,
    /// `QEMU 10.0.2`, `QEMU 11.1.3` or `pagehint`.
    pub peer: String,
    /// `vanilla`, `preempt` or `preempt-hint`.
    pub mode: String,
    /// How its background stream met the link.
    pub transport: Transport,
    /// `seq`, `random`, `stream` or `kv`.
    pub workload: String,
    /// QEMU's destination ran with the request trace.
    pub traced: bool,
    /// The migration completed.
    pub completed: bool,
    /// The guest runs on at the destination with no failed check.
    pub guest_alive: bool,
    /// Failed guest checks.
    pub guest_errors: u64,
    /// Page requests.
    pub requests: u64,
    /// Request latency, where measured.
    pub latency: Option<Latency>,
    /// For a traced QEMU ≥ 10.1 run, the trace's latency too (its own figures are in
    /// `latency`): the cross-check of the two.
    pub trace_latency: Option<Latency>,
    /// Total vCPU blocktime (every vCPU blocked at once), ms.
    pub blocktime_ms: f64,
    /// Each vCPU's blocked time, ms (empty in a failed run, and in documents written before
    /// `--vcpus`).
    #[serde(default)]
    pub vcpu_blocktime_ms: Vec<f64>,
    /// The span compared: switch-over → last page placed, ms (see the module docs).
    pub span_ms: Option<f64>,
    /// The peer's own total time, ms (QEMU: `total-time`, migrate → completed at the source;
    /// pagehint: start → last page placed).
    pub own_total_ms: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Bytes before the switch to postcopy.
    pub precopy_bytes: u64,
    /// Bytes after it.
    pub postcopy_bytes: u64,
    /// CPU time of the migration threads, ms.
    pub cpu_ms: f64,
    /// ... per GiB sent.
    pub cpu_ms_per_gib: f64,
    /// ... by thread.
    pub cpu_threads: CpuByThread,
    /// CPU time of the processes' other threads (vCPUs among them), for the record.
    pub cpu_other: CpuByThread,
    /// QEMU with pagehint's transport: sockets the preload library configured (source,
    /// destination).
    pub preloaded_sockets: Option<(u64, u64)>,
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
#[derive(Clone, Debug)]
pub struct RunKey<'a> {
    /// Repetition.
    pub repeat: u32,
    /// Link class.
    pub link: &'a str,
    /// Its rate, bits/s.
    pub rate_bps: u64,
    /// `QEMU 10.0.2`, `QEMU 11.1.3` or `pagehint`.
    pub peer: &'a str,
    /// Mode.
    pub mode: &'a str,
    /// Transport.
    pub transport: Transport,
    /// Workload.
    pub workload: &'a str,
    /// QEMU traced.
    pub traced: bool,
}

fn per_gib(ms: f64, bytes: u64) -> f64 {
    if bytes == 0 {
        0.0
    } else {
        ms / (bytes as f64 / (1u64 << 30) as f64)
    }
}

impl SideRow {
    /// A row of `key` with nothing measured (not completed).
    fn empty(key: &RunKey<'_>) -> Self {
        Self {
            repeat: key.repeat,
            link: key.link.into(),
            link_rate_bps: key.rate_bps,
            peer: key.peer.into(),
            mode: key.mode.into(),
            transport: key.transport,
            workload: key.workload.into(),
            traced: key.traced,
            completed: false,
            guest_alive: false,
            guest_errors: 0,
            requests: 0,
            latency: None,
            trace_latency: None,
            blocktime_ms: 0.0,
            vcpu_blocktime_ms: Vec::new(),
            span_ms: None,
            own_total_ms: 0.0,
            downtime_ms: 0.0,
            precopy_bytes: 0,
            postcopy_bytes: 0,
            cpu_ms: 0.0,
            cpu_ms_per_gib: 0.0,
            cpu_threads: CpuByThread::default(),
            cpu_other: CpuByThread::default(),
            preloaded_sockets: None,
            ops_before_per_s: None,
            ops_postcopy_per_s: None,
            qemu_threads_pinned: Vec::new(),
            error: None,
        }
    }

    /// A run that failed.
    pub fn failed(key: &RunKey<'_>, error: String) -> Self {
        Self {
            error: Some(error),
            ..Self::empty(key)
        }
    }

    /// A QEMU run: latency from QEMU's own figures where it has them, else from its trace;
    /// a run that made requests and has neither fails.
    pub fn qemu(key: &RunKey<'_>, q: &QemuOutcome) -> Self {
        let (latency, trace_latency) = match (&q.qmp_latency, &q.trace_latency) {
            (Some(m), t) => (Some(m.clone()), t.clone()),
            (None, Some(t)) => (Some(t.clone()), None),
            (None, None) => (None, None),
        };
        let error = (latency.is_none() && q.requests > 0).then(|| {
            format!(
                "{} made {} requests but has no latency figures and was not traced",
                key.peer, q.requests
            )
        });
        let bytes = q.precopy_bytes + q.postcopy_bytes;
        let cpu_ms = q.cpu.total_ms();
        Self {
            completed: error.is_none(),
            guest_alive: q.guest_alive,
            guest_errors: q.guest_errors,
            requests: q.requests,
            latency,
            trace_latency,
            blocktime_ms: q.blocktime_ms,
            vcpu_blocktime_ms: q.vcpu_blocktime_ms.clone(),
            span_ms: q.span_ms,
            own_total_ms: q.total_ms,
            downtime_ms: q.downtime_ms,
            precopy_bytes: q.precopy_bytes,
            postcopy_bytes: q.postcopy_bytes,
            cpu_ms,
            cpu_ms_per_gib: per_gib(cpu_ms, bytes),
            cpu_threads: q.cpu.clone(),
            cpu_other: q.cpu_other.clone(),
            preloaded_sockets: (key.transport == Transport::Pagehint)
                .then_some(q.preloaded_sockets),
            ops_before_per_s: Some(q.ops_before_per_s),
            ops_postcopy_per_s: Some(q.ops_postcopy_per_s),
            qemu_threads_pinned: q.pinned_threads.clone(),
            error,
            ..Self::empty(key)
        }
    }

    /// A pagehint run.
    pub fn pagehint(key: &RunKey<'_>, o: &OursOutcome) -> Self {
        let r = &o.result;
        let (t, w) = (&r.transfer, &r.waits);
        let bytes = t.precopy_bytes + t.postcopy_bytes;
        let cpu_ms = o.cpu.total_ms();
        Self {
            completed: true,
            guest_alive: r.outcome.verified && r.guest_run.guest_check_errors == 0,
            guest_errors: r.guest_run.guest_check_errors,
            requests: w.requests_sent,
            latency: Some(Latency {
                source: LatencySource::Harness,
                samples: w.requests_sent,
                p50_us: w.request_p50_us,
                p99_us: w.request_p99_us,
                mean_us: None,
            }),
            blocktime_ms: w.blocktime_ms,
            vcpu_blocktime_ms: w.vcpu_blocktime_ms.clone(),
            span_ms: Some(t.total_ms - t.precopy_ms),
            own_total_ms: t.total_ms,
            downtime_ms: t.downtime_ms,
            precopy_bytes: t.precopy_bytes,
            postcopy_bytes: t.postcopy_bytes,
            cpu_ms,
            cpu_ms_per_gib: per_gib(cpu_ms, bytes),
            cpu_threads: o.cpu.clone(),
            cpu_other: o.cpu_other.clone(),
            ops_before_per_s: r.guest_run.progress_before_per_s,
            ops_postcopy_per_s: r.guest_run.progress_after_per_s,
            error: (!r.outcome.verified).then(|| r.outcome.problems.join("; ")),
            ..Self::empty(key)
        }
    }

    /// Whether this is a QEMU row.
    pub fn is_qemu(&self) -> bool {
        self.peer.starts_with("QEMU")
    }

    /// The vCPUs' blocked time added up, ms (None where no per-vCPU figure was recorded).
    pub fn vcpus_blocked_ms(&self) -> Option<f64> {
        (!self.vcpu_blocktime_ms.is_empty()).then(|| self.vcpu_blocktime_ms.iter().sum())
    }
}

/// Fewer requests than this on either side make a latency or blocktime ratio meaningless
/// (one or two events: the hinted sequential workloads fault that rarely).
pub const MIN_REQUESTS: u64 = 20;

/// A figure of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Figure {
    /// Request latency, median.
    P50,
    /// Request latency, 99th percentile.
    P99,
    /// vCPU blocktime: every vCPU blocked at once.
    Blocktime,
    /// Each vCPU's blocked time, added up.
    VcpusBlocked,
    /// Switch-over → last page placed.
    Total,
    /// Migration threads' CPU per GiB.
    CpuPerGib,
}

impl Figure {
    /// All of them, in table order.
    pub const ALL: [Self; 6] = [
        Self::P50,
        Self::P99,
        Self::Blocktime,
        Self::VcpusBlocked,
        Self::Total,
        Self::CpuPerGib,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::P50 => "request p50",
            Self::P99 => "request p99",
            Self::Blocktime => "blocktime",
            Self::VcpusBlocked => "vCPUs blocked",
            Self::Total => "total",
            Self::CpuPerGib => "CPU/GiB",
        }
    }

    /// Whether its ratio needs [`MIN_REQUESTS`] on both sides.
    pub fn needs_requests(self) -> bool {
        matches!(
            self,
            Self::P50 | Self::P99 | Self::Blocktime | Self::VcpusBlocked
        )
    }

    /// Its value in `r`, if measured (latency: µs; times: ms).
    pub fn of(self, r: &SideRow) -> Option<f64> {
        if !r.completed {
            return None;
        }
        // A run without a latency sample (no request) has no percentile, not 0 µs.
        let lat = r.latency.as_ref().filter(|l| l.samples > 0);
        match self {
            Self::P50 => lat.map(|l| l.p50_us),
            Self::P99 => lat.map(|l| l.p99_us),
            Self::Blocktime => Some(r.blocktime_ms),
            Self::VcpusBlocked => r.vcpus_blocked_ms(),
            Self::Total => r.span_ms,
            Self::CpuPerGib => (r.cpu_ms > 0.0).then_some(r.cpu_ms_per_gib),
        }
    }

    /// `v` for a table.
    pub fn fmt(self, v: f64) -> String {
        match self {
            Self::P50 | Self::P99 => crate::harness::export::fmt_us(v),
            Self::Blocktime | Self::VcpusBlocked | Self::Total => crate::harness::export::fmt_ms(v),
            Self::CpuPerGib => format!("{v:.0} ms"),
        }
    }
}

/// Which runs a series is: one configuration over the repeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Link.
    pub link: String,
    /// Workload.
    pub workload: String,
    /// Peer.
    pub peer: String,
    /// Mode.
    pub mode: String,
    /// Transport.
    pub transport: Transport,
}

impl Config {
    fn of(r: &SideRow) -> Self {
        Self {
            link: r.link.clone(),
            workload: r.workload.clone(),
            peer: r.peer.clone(),
            mode: r.mode.clone(),
            transport: r.transport,
        }
    }

    fn matches(&self, r: &SideRow) -> bool {
        r.link == self.link
            && r.workload == self.workload
            && r.peer == self.peer
            && r.mode == self.mode
            && r.transport == self.transport
    }
}

pub use crate::spread::Spread;

impl Spread {
    /// `1.23x (1.10-1.40)`.
    pub fn ratio_text(&self) -> String {
        if self.n > 1 {
            format!("{:.2}x ({:.2}-{:.2})", self.median, self.min, self.max)
        } else {
            format!("{:.2}x", self.median)
        }
    }
}

/// A configuration's figures over the repeats.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    /// Which.
    pub config: Config,
    /// Runs, and how many completed with the guest alive.
    pub runs: usize,
    /// ... completed.
    pub ok: usize,
    /// Requests.
    pub requests: Option<Spread>,
    /// MiB sent (before and after the switch-over).
    pub mib_sent: Option<Spread>,
    /// Per [`Figure::ALL`].
    pub figures: Vec<Option<Spread>>,
}

/// The series of `rows`, in the order they first appear.
pub fn series(rows: &[SideRow]) -> Vec<Series> {
    let mut configs: Vec<Config> = Vec::new();
    for r in rows {
        let c = Config::of(r);
        if !configs.contains(&c) {
            configs.push(c);
        }
    }
    configs
        .into_iter()
        .map(|c| {
            let of: Vec<&SideRow> = rows.iter().filter(|r| c.matches(r)).collect();
            let done: Vec<&&SideRow> = of.iter().filter(|r| r.completed).collect();
            Series {
                runs: of.len(),
                ok: of.iter().filter(|r| r.completed && r.guest_alive).count(),
                requests: Spread::of(done.iter().map(|r| r.requests as f64)),
                mib_sent: Spread::of(
                    done.iter()
                        .map(|r| (r.precopy_bytes + r.postcopy_bytes) as f64 / (1u64 << 20) as f64),
                ),
                figures: Figure::ALL
                    .iter()
                    .map(|f| Spread::of(done.iter().filter_map(|r| f.of(r))))
                    .collect(),
                config: c,
            }
        })
        .collect()
}

/// A ratio over the repeats.
#[derive(Clone, Debug, Serialize)]
pub enum Ratio {
    /// Measured.
    Measured(Spread),
    /// Too few requests on a side in most repeats: the median counts.
    NotComparable {
        /// Median requests of the numerator's runs.
        a: f64,
        /// ... of the denominator's.
        b: f64,
    },
    /// A side did not run (or failed every time).
    Missing,
}

impl Ratio {
    /// The median, if measured.
    pub fn median(&self) -> Option<f64> {
        match self {
            Self::Measured(s) => Some(s.median),
            _ => None,
        }
    }

    /// For a table cell.
    pub fn text(&self) -> String {
        match self {
            Self::Measured(s) => s.ratio_text(),
            Self::NotComparable { a, b } => format!("n/c ({a:.0}/{b:.0} req)"),
            Self::Missing => "-".into(),
        }
    }
}

/// One side of a ratio: the runs of (peer, mode, transport) of a link and workload.
#[derive(Clone, Copy, Debug)]
pub struct Side<'a> {
    /// Peer label.
    pub peer: &'a str,
    /// Mode.
    pub mode: &'a str,
    /// Transport.
    pub transport: Transport,
}

/// `a / b` of figure `f` per repeat on `link` and `w`, with the request floor.
pub fn ratio(rows: &[SideRow], link: &str, w: &str, f: Figure, a: Side<'_>, b: Side<'_>) -> Ratio {
    let pick = |s: Side<'_>, rep: u32| {
        rows.iter().find(|r| {
            r.repeat == rep
                && r.link == link
                && r.workload == w
                && r.peer == s.peer
                && r.mode == s.mode
                && r.transport == s.transport
                && r.completed
        })
    };
    let mut repeats: Vec<u32> = rows.iter().map(|r| r.repeat).collect();
    repeats.sort_unstable();
    repeats.dedup();
    let mut pairs = 0;
    let mut vals = Vec::new();
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for rep in repeats {
        let (Some(x), Some(y)) = (pick(a, rep), pick(b, rep)) else {
            continue;
        };
        pairs += 1;
        ra.push(x.requests as f64);
        rb.push(y.requests as f64);
        if f.needs_requests() && x.requests.min(y.requests) < MIN_REQUESTS {
            continue;
        }
        if let (Some(p), Some(q)) = (f.of(x), f.of(y)) {
            if q > 0.0 {
                vals.push(p / q);
            }
        }
    }
    if pairs == 0 {
        return Ratio::Missing;
    }
    if vals.len() * 2 < pairs {
        return Ratio::NotComparable {
            a: Spread::of(ra).map_or(0.0, |s| s.median),
            b: Spread::of(rb).map_or(0.0, |s| s.median),
        };
    }
    Spread::of(vals).map_or(Ratio::Missing, Ratio::Measured)
}

/// The peers and modes the attribution compares.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Anchor {
    /// QEMU with the hint (e.g. `QEMU 11.1.3`).
    pub qemu: String,
    /// QEMU before the hint (e.g. `QEMU 10.0.2`), if it ran.
    pub before: Option<String>,
}

/// One line of the attribution table: a figure of a workload on a link, split.
#[derive(Clone, Debug, Serialize)]
pub struct Split {
    /// pagehint's mode compared: `preempt-hint` (one slot, the seed's), or `preempt-hints`
    /// (a slot per vCPU) where it ran.
    pub mode: String,
    /// Link.
    pub link: String,
    /// Workload.
    pub workload: String,
    /// Figure.
    pub figure: Figure,
    /// QEMU (own transport) / pagehint (own transport).
    pub shipped: Ratio,
    /// Both on QEMU's transport.
    pub sched_qemu_transport: Ratio,
    /// Both on pagehint's transport.
    pub sched_pagehint_transport: Ratio,
    /// pagehint on QEMU's transport / on its own.
    pub transport_pagehint: Ratio,
    /// QEMU on its own transport / on pagehint's.
    pub transport_qemu: Ratio,
    /// QEMU before the hint (own transport) / pagehint (own transport).
    pub shipped_before: Ratio,
}

const HINT: &str = "preempt-hint";
const HINTS: &str = "preempt-hints";
const QPRE: &str = "preempt";

/// The attribution table of preempt (QEMU with the hint) against preempt-hint (pagehint),
/// and against preempt-hints where pagehint ran it.
pub fn splits(rows: &[SideRow], anchor: &Anchor) -> Vec<Split> {
    let mut out = Vec::new();
    let hints_ran = rows.iter().any(|r| r.peer == "pagehint" && r.mode == HINTS);
    let modes: &[&str] = if hints_ran { &[HINT, HINTS] } else { &[HINT] };
    for &mode in modes {
        out.extend(splits_of(rows, anchor, mode));
    }
    out
}

/// [`splits`] against pagehint's `mode`.
fn splits_of(rows: &[SideRow], anchor: &Anchor, mode: &str) -> Vec<Split> {
    let mut out = Vec::new();
    for (link, w) in links_and_workloads(rows) {
        for f in Figure::ALL {
            let q = |t| Side {
                peer: &anchor.qemu,
                mode: QPRE,
                transport: t,
            };
            let p = |t| Side {
                peer: "pagehint",
                mode,
                transport: t,
            };
            let r = |a, b| ratio(rows, &link, &w, f, a, b);
            out.push(Split {
                shipped: r(q(Transport::Qemu), p(Transport::Pagehint)),
                sched_qemu_transport: r(q(Transport::Qemu), p(Transport::Qemu)),
                sched_pagehint_transport: r(q(Transport::Pagehint), p(Transport::Pagehint)),
                transport_pagehint: r(p(Transport::Qemu), p(Transport::Pagehint)),
                transport_qemu: r(q(Transport::Qemu), q(Transport::Pagehint)),
                shipped_before: match &anchor.before {
                    Some(b) => r(
                        Side {
                            peer: b,
                            mode: QPRE,
                            transport: Transport::Qemu,
                        },
                        p(Transport::Pagehint),
                    ),
                    None => Ratio::Missing,
                },
                mode: mode.into(),
                link: link.clone(),
                workload: w.clone(),
                figure: f,
            });
        }
    }
    out
}

fn links_and_workloads(rows: &[SideRow]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    for r in rows {
        let k = (r.link.clone(), r.workload.clone());
        if !v.contains(&k) {
            v.push(k);
        }
    }
    v
}

/// How a target came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Met.
    Pass,
    /// Missed.
    Miss,
    /// Too few requests to say.
    NotComparable,
    /// A side did not run.
    NotRun,
}

/// A target, checked on the medians.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What is compared.
    pub what: String,
    /// The ratio.
    pub ratio: Ratio,
    /// The goal, in words.
    pub goal: String,
    /// The verdict.
    pub verdict: Verdict,
}

/// What a target's ratio must be.
#[derive(Clone, Copy)]
enum Goal {
    /// At least this.
    AtLeast(f64),
    /// Between 1/this and this.
    Within(f64),
}

/// The verdict on `ratio` against `goal`.
fn check(what: String, ratio: Ratio, goal: Goal) -> Target {
    let verdict = match (&ratio, goal) {
        (Ratio::Measured(s), Goal::AtLeast(g)) if s.median >= g => Verdict::Pass,
        (Ratio::Measured(s), Goal::Within(g)) if (1.0 / g..=g).contains(&s.median) => Verdict::Pass,
        (Ratio::Measured(_), _) => Verdict::Miss,
        (Ratio::NotComparable { .. }, _) => Verdict::NotComparable,
        (Ratio::Missing, _) => Verdict::NotRun,
    };
    Target {
        what,
        ratio,
        goal: match goal {
            Goal::AtLeast(g) => format!(">= {g:.2}x"),
            Goal::Within(g) => format!("within {g}x"),
        },
        verdict,
    }
}

/// The split of the hint mode on `link`, workload `w`, figure `f`.
fn hint_split<'s>(splits: &'s [Split], link: &str, w: &str, f: Figure) -> Option<&'s Split> {
    splits
        .iter()
        .find(|s| s.mode == HINT && s.link == link && s.workload == w && s.figure == f)
}

/// The targets of pagehint's preempt-hint against QEMU `q`'s preempt on `link`, both on
/// the same transport (each transport in turn), scheduling alone.
fn same_transport_targets(out: &mut Vec<Target>, splits: &[Split], link: &str, q: &str) {
    // CPU: pagehint <= 0.7x QEMU's, i.e. QEMU / pagehint >= 1/0.7.
    let cpu_goal = 1.0 / 0.7;
    for (t, name) in [
        (Transport::Qemu, "QEMU's transport"),
        (Transport::Pagehint, "pagehint's transport"),
    ] {
        let pick = |s: &Split| match t {
            Transport::Qemu => s.sched_qemu_transport.clone(),
            Transport::Pagehint => s.sched_pagehint_transport.clone(),
        };
        let mut wanted = vec![
            ("random", Figure::P99, Goal::AtLeast(4.0)),
            ("random", Figure::P50, Goal::AtLeast(0.9)),
            ("seq", Figure::Blocktime, Goal::AtLeast(0.9)),
            ("stream", Figure::Blocktime, Goal::AtLeast(0.9)),
            ("kv", Figure::Blocktime, Goal::AtLeast(0.9)),
        ];
        for w in ["seq", "random", "stream", "kv"] {
            wanted.push((w, Figure::CpuPerGib, Goal::AtLeast(cpu_goal)));
        }
        for (w, f, goal) in wanted {
            let r = hint_split(splits, link, w, f).map_or(Ratio::Missing, pick);
            let what = if f == Figure::CpuPerGib {
                format!(
                    "{link} {w} {}: {q} preempt / pagehint preempt-hint, both on {name} (pagehint <= 0.7x)",
                    f.name()
                )
            } else {
                format!(
                    "{link} {w} {}: {q} preempt / pagehint preempt-hint, both on {name}",
                    f.name()
                )
            };
            out.push(check(what, r, goal));
        }
    }
}

/// The targets of pagehint's preempt-hint against QEMU `q`'s preempt on `link`, each peer
/// on its own transport (as shipped).
fn shipped_targets(out: &mut Vec<Target>, splits: &[Split], link: &str, q: &str) {
    for (w, f, g) in [
        ("random", Figure::P50, 2.0),
        ("random", Figure::P99, 4.0),
        ("seq", Figure::Blocktime, 1.0),
        ("stream", Figure::Blocktime, 1.0),
        ("kv", Figure::Blocktime, 1.0),
    ] {
        let r = hint_split(splits, link, w, f).map_or(Ratio::Missing, |s| s.shipped.clone());
        out.push(check(
            format!(
                "{link} {w} {}: {q} preempt / pagehint preempt-hint, as shipped",
                f.name()
            ),
            r,
            Goal::AtLeast(g),
        ));
    }
}

/// Several vCPUs (issue 21): a slot per vCPU against QEMU `q`'s one hint and pagehint's own
/// one slot on `link`, on equal transport; none with one vCPU.
fn vcpu_targets(out: &mut Vec<Target>, rows: &[SideRow], link: &str, q: &str) {
    let vcpus = rows
        .iter()
        .filter(|r| r.link == link)
        .map(|r| r.vcpu_blocktime_ms.len())
        .max()
        .unwrap_or(0);
    if vcpus <= 1 {
        return;
    }
    for t in [Transport::Qemu, Transport::Pagehint] {
        let side = |peer, mode| Side {
            peer,
            mode,
            transport: t,
        };
        let hints = side("pagehint", HINTS);
        for (w, f, a, goal) in [
            (
                "seq",
                Figure::VcpusBlocked,
                side(q, QPRE),
                Goal::AtLeast(3.0),
            ),
            (
                "stream",
                Figure::VcpusBlocked,
                side(q, QPRE),
                Goal::AtLeast(3.0),
            ),
            (
                "seq",
                Figure::VcpusBlocked,
                side("pagehint", HINT),
                Goal::AtLeast(3.0),
            ),
            (
                "stream",
                Figure::VcpusBlocked,
                side("pagehint", HINT),
                Goal::AtLeast(3.0),
            ),
            (
                "random",
                Figure::P50,
                side("pagehint", HINT),
                Goal::AtLeast(1.0 / 1.1),
            ),
        ] {
            let r = ratio(rows, link, w, f, a, hints);
            out.push(check(
                format!(
                    "{link} {w} {}, {vcpus} vCPUs: {} {} / pagehint {HINTS}, both on {t}'s transport",
                    f.name(),
                    a.peer,
                    a.mode
                ),
                r,
                goal,
            ));
        }
    }
}

/// pagehint's vanilla within 1.25x of QEMU `q`'s vanilla on `link`, on equal transport.
fn vanilla_targets(out: &mut Vec<Target>, rows: &[SideRow], link: &str, q: &str) {
    for t in [Transport::Qemu, Transport::Pagehint] {
        for (l2, w) in links_and_workloads(rows) {
            if l2 != link {
                continue;
            }
            for f in [Figure::P50, Figure::P99, Figure::Blocktime, Figure::Total] {
                let r = ratio(
                    rows,
                    link,
                    &w,
                    f,
                    Side {
                        peer: "pagehint",
                        mode: "vanilla",
                        transport: t,
                    },
                    Side {
                        peer: q,
                        mode: "vanilla",
                        transport: t,
                    },
                );
                out.push(check(
                    format!(
                        "{link} {w} {}: pagehint vanilla / {q} vanilla, both on {t}'s transport",
                        f.name()
                    ),
                    r,
                    Goal::Within(1.25),
                ));
            }
        }
    }
}

/// The targets on `rows` (see the README): per link, against the anchor's preempt.
pub fn targets(rows: &[SideRow], anchor: &Anchor) -> Vec<Target> {
    let splits = splits(rows, anchor);
    let mut links: Vec<String> = Vec::new();
    for r in rows {
        if !links.contains(&r.link) {
            links.push(r.link.clone());
        }
    }
    let q = &anchor.qemu;
    let mut out = Vec::new();
    for link in &links {
        same_transport_targets(&mut out, &splits, link, q);
        shipped_targets(&mut out, &splits, link, q);
        vcpu_targets(&mut out, rows, link, q);
        vanilla_targets(&mut out, rows, link, q);
    }
    out
}

/// Every run completed with the guest alive: (good, all).
pub fn alive(rows: &[SideRow]) -> (usize, usize) {
    (
        rows.iter().filter(|r| r.completed && r.guest_alive).count(),
        rows.len(),
    )
}

/// The targets as text lines.
pub fn targets_text(targets: &[Target]) -> String {
    let mut s = String::new();
    for t in targets {
        let mark = match t.verdict {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::NotComparable => "n/c ",
            Verdict::NotRun => "n/a ",
        };
        let _ = writeln!(
            s,
            "  [{mark}] {} = {}; target: {}",
            t.what,
            t.ratio.text(),
            t.goal
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A completed row; `fig`: requests, p99 (µs), blocktime (ms), CPU (ms).
    fn row(rep: u32, peer: &str, mode: &str, t: Transport, w: &str, fig: [f64; 4]) -> SideRow {
        let [reqs, p99, bt, cpu] = fig;
        let reqs = reqs as u64;
        let key = RunKey {
            repeat: rep,
            link: "1G",
            rate_bps: 1_000_000_000,
            peer,
            mode,
            transport: t,
            workload: w,
            traced: false,
        };
        let mut r = SideRow::empty(&key);
        r.completed = true;
        r.guest_alive = true;
        r.requests = reqs;
        r.latency = Some(Latency {
            source: if peer == "pagehint" {
                LatencySource::Harness
            } else {
                LatencySource::QmpHistogram
            },
            samples: reqs,
            p50_us: p99 / 4.0,
            p99_us: p99,
            mean_us: None,
        });
        r.blocktime_ms = bt;
        r.span_ms = Some(1000.0);
        r.cpu_ms = cpu;
        r.cpu_ms_per_gib = cpu * 2.0;
        r
    }

    const Q: &str = "QEMU 11.1.3";

    fn anchor() -> Anchor {
        Anchor {
            qemu: Q.into(),
            before: None,
        }
    }

    /// Three repeats of random on both transports: QEMU's p99 4 ms on its transport, 2 ms
    /// paced; pagehint's 1 ms on QEMU's transport, 0.4 ms on its own.
    fn random_rows() -> Vec<SideRow> {
        let mut v = Vec::new();
        for rep in 0..3 {
            let j = 1.0 + rep as f64 * 0.1;
            v.push(row(
                rep,
                Q,
                "preempt",
                Transport::Qemu,
                "random",
                [900.0, 4000.0 * j, 900.0, 400.0],
            ));
            v.push(row(
                rep,
                Q,
                "preempt",
                Transport::Pagehint,
                "random",
                [900.0, 2000.0 * j, 700.0, 400.0],
            ));
            v.push(row(
                rep,
                "pagehint",
                HINT,
                Transport::Qemu,
                "random",
                [900.0, 1000.0, 800.0, 200.0],
            ));
            v.push(row(
                rep,
                "pagehint",
                HINT,
                Transport::Pagehint,
                "random",
                [900.0, 400.0, 600.0, 200.0],
            ));
        }
        v
    }

    #[test]
    fn every_ratio_splits_into_scheduler_and_transport() {
        let rows = random_rows();
        let s = splits(&rows, &anchor());
        let p99 = s.iter().find(|s| s.figure == Figure::P99).unwrap();
        let m = |r: &Ratio| r.median().unwrap();
        assert!((m(&p99.shipped) - 11.0).abs() < 1e-9, "4400 / 400");
        assert!((m(&p99.sched_qemu_transport) - 4.4).abs() < 1e-9);
        assert!((m(&p99.sched_pagehint_transport) - 5.5).abs() < 1e-9);
        assert!((m(&p99.transport_pagehint) - 2.5).abs() < 1e-9);
        assert!((m(&p99.transport_qemu) - 2.0).abs() < 1e-9);
        // shipped = scheduler (QEMU's transport) x transport (pagehint), per repeat.
        assert!(
            (m(&p99.shipped) - m(&p99.sched_qemu_transport) * m(&p99.transport_pagehint)).abs()
                < 1e-9
        );
        match &p99.shipped {
            Ratio::Measured(sp) => assert_eq!((sp.n, sp.min, sp.max), (3, 10.0, 12.0)),
            r => panic!("{r:?}"),
        }
        assert!(matches!(p99.shipped_before, Ratio::Missing));
    }

    #[test]
    fn targets_pass_and_miss_on_the_medians() {
        let rows = random_rows();
        let t = targets(&rows, &anchor());
        let get = |s: &str| {
            t.iter()
                .find(|c| c.what.contains(s))
                .unwrap_or_else(|| panic!("{s}"))
        };
        assert_eq!(
            get("random request p99: QEMU 11.1.3 preempt / pagehint preempt-hint, both on QEMU's")
                .verdict,
            Verdict::Pass
        );
        assert_eq!(
            get("random request p99: QEMU 11.1.3 preempt / pagehint preempt-hint, as shipped")
                .verdict,
            Verdict::Pass
        );
        // Blocktime 700 vs 600 on pagehint's transport: 1.17 >= 0.9.
        // CPU 400 vs 200: 2.0 >= 1.43.
        assert_eq!(
            get("random CPU/GiB: QEMU 11.1.3 preempt / pagehint preempt-hint, both on QEMU's")
                .verdict,
            Verdict::Pass
        );
        assert_eq!(
            get("seq blocktime: QEMU 11.1.3 preempt / pagehint preempt-hint, both on QEMU's")
                .verdict,
            Verdict::NotRun
        );
        // A worse pagehint p99 on QEMU's transport misses.
        let mut worse = rows.clone();
        for r in worse
            .iter_mut()
            .filter(|r| r.peer == "pagehint" && r.transport == Transport::Qemu)
        {
            r.latency.as_mut().unwrap().p99_us = 3000.0;
        }
        let t = targets(&worse, &anchor());
        let c = t.iter().find(|c| c.what.contains("random request p99: QEMU 11.1.3 preempt / pagehint preempt-hint, both on QEMU's")).unwrap();
        assert_eq!(c.verdict, Verdict::Miss, "{c:?}");
    }

    #[test]
    fn the_request_floor_applies_to_hint_targets_too() {
        let mut rows = random_rows();
        for r in rows.iter_mut().filter(|r| r.peer == Q && r.repeat < 2) {
            r.requests = 7;
        }
        let s = splits(&rows, &anchor());
        let p50 = s.iter().find(|s| s.figure == Figure::P50).unwrap();
        match &p50.shipped {
            Ratio::NotComparable { a, b } => assert_eq!((*a, *b), (7.0, 900.0)),
            r => panic!("two of three repeats have 7 requests: {r:?}"),
        }
        // Total time and CPU do not depend on requests.
        let cpu = s.iter().find(|s| s.figure == Figure::CpuPerGib).unwrap();
        assert!(cpu.shipped.median().is_some());
        let t = targets(&rows, &anchor());
        let c = t
            .iter()
            .find(|c| c.what.contains("random request p50") && c.what.contains("as shipped"))
            .unwrap();
        assert_eq!(c.verdict, Verdict::NotComparable);
        assert!(targets_text(&t).contains("n/c (7/900 req)"));
    }

    #[test]
    fn vcpus_blocked_is_the_per_vcpu_sum_and_multi_vcpu_runs_get_their_targets() {
        // Two vCPUs, seq, QEMU's transport: QEMU 300 + 300 ms, one slot 200 + 200 ms, a slot
        // per vCPU 50 + 40 ms.
        let mut rows = Vec::new();
        for (peer, mode, per) in [
            (Q, "preempt", [300.0, 300.0]),
            ("pagehint", HINT, [200.0, 200.0]),
            ("pagehint", HINTS, [50.0, 40.0]),
        ] {
            let mut r = row(
                0,
                peer,
                mode,
                Transport::Qemu,
                "seq",
                [100.0, 1e3, 10.0, 1.0],
            );
            r.vcpu_blocktime_ms = per.to_vec();
            rows.push(r);
        }
        assert_eq!(rows[2].vcpus_blocked_ms(), Some(90.0));
        let s = splits(&rows, &anchor());
        let of = |mode: &str| {
            s.iter()
                .find(|x| x.mode == mode && x.figure == Figure::VcpusBlocked)
                .unwrap()
                .sched_qemu_transport
                .median()
                .unwrap()
        };
        assert!((of(HINT) - 1.5).abs() < 1e-9);
        assert!((of(HINTS) - 600.0 / 90.0).abs() < 1e-9);
        let t = targets(&rows, &anchor());
        let get = |w: &str| {
            t.iter()
                .find(|c| c.what.contains(w))
                .unwrap_or_else(|| panic!("{w}: {t:?}"))
        };
        let vs_qemu = get("seq vCPUs blocked, 2 vCPUs: QEMU 11.1.3 preempt / pagehint preempt-hints, both on qemu's");
        assert_eq!(vs_qemu.verdict, Verdict::Pass, "{vs_qemu:?}");
        // 400 / 90 >= 3: pass; at 200 ms (400 / 200 = 2) it misses.
        let vs_one = get("seq vCPUs blocked, 2 vCPUs: pagehint preempt-hint / pagehint preempt-hints, both on qemu's");
        assert_eq!(vs_one.verdict, Verdict::Pass);
        rows[2].vcpu_blocktime_ms = vec![100.0, 100.0];
        let t = targets(&rows, &anchor());
        let c = t
            .iter()
            .find(|c| {
                c.what
                    .contains("seq vCPUs blocked, 2 vCPUs: pagehint preempt-hint /")
            })
            .unwrap();
        assert_eq!(c.verdict, Verdict::Miss, "{c:?}");
        // A failed row has no figure: not a 0.
        let mut failed = rows[0].clone();
        failed.vcpu_blocktime_ms.clear();
        assert_eq!(Figure::VcpusBlocked.of(&failed), None);
        // One vCPU: no multi-vCPU targets.
        for r in &mut rows {
            r.vcpu_blocktime_ms.truncate(1);
        }
        assert!(!targets(&rows, &anchor())
            .iter()
            .any(|c| c.what.contains("vCPUs:")));
    }
}
