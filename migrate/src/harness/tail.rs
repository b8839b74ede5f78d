//! Where a request's time goes: every requested host page's latency (fault read → placed)
//! split into stages from the destination's and the source's timestamps, and the breakdown
//! of the slowest 1% of requests next to the median ones.
//!
//! Stages, in order (source times moved to the destination's clock by the measured
//! offset; each stage ends at the later of its own stamp and the previous stage's end, and
//! no later than the placement, so the stages add up to the request latency exactly):
//! 1. `request_write`: fault read → the request written to the return path;
//! 2. `return_path`: → the source's return-path thread read it;
//! 3. `source_serve`: → the scheduler answered it (the emulated link's one-way delay is
//!    waited out first, then the claim);
//! 4. `to_wire`: → the frame of the copy that was placed was written to its socket: for a
//!    page the background path had claimed, how long it still sat claimed-but-unsent (or
//!    waited for the background queue to drain) after the request;
//! 5. `link`: → its arrival on the emulated link (serialisation, queueing, one-way delay);
//! 6. `receive`: → its receiver read it from the socket (socket buffers, the receiver's
//!    backlog and CPU);
//! 7. `place`: → placed (`UFFDIO_COPY`).
//!
//! The thread guest adds what it felt around the request: `guest_fault` (its access began →
//! the fault read) and `resume` (placed → its access returned).

use serde::{Deserialize, Serialize};

use crate::dest::memory::{DestMemory, Via};
use crate::wire::summary::{ReqPath, ReqTrace};

/// Mean time of each stage over a group of requests, µs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stages {
    /// Thread guest: access began → fault read (null for the KVM guest).
    pub guest_fault: Option<f64>,
    /// Fault read → request written.
    pub request_write: f64,
    /// Request written → read by the source.
    pub return_path: f64,
    /// Read → answered (emulated one-way delay, then the claim).
    pub source_serve: f64,
    /// Answered → the placed copy's frame written (claimed-but-unsent, queue full).
    pub to_wire: f64,
    /// Written → arrival on the emulated link.
    pub link: f64,
    /// Arrival → read by the destination's receiver.
    pub receive: f64,
    /// Read → placed.
    pub place: f64,
    /// Thread guest: placed → access returned (null for the KVM guest).
    pub resume: Option<f64>,
}

/// How the requests of a group were answered, and which copy was placed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paths {
    /// Claimed and sent by the urgent path.
    pub urgent: u64,
    /// Already claimed by the background path (its copy on the background channel).
    pub background: u64,
    /// Vanilla: queued for the background path.
    pub queued: u64,
    /// Already claimed by the background path and sent again on the urgent channel.
    pub resent: u64,
    /// No source record (should be 0).
    pub unknown: u64,
    /// Placed from the urgent channel.
    pub placed_urgent: u64,
    /// Placed from the background channel.
    pub placed_background: u64,
}

/// One group of requests (the median ones, or the slowest 1%).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Requests in the group.
    pub requests: u64,
    /// Their mean latency (fault read → placed), µs.
    pub latency_us: f64,
    /// Mean of each stage, µs (they add up to `latency_us`).
    pub stages_us: Stages,
    /// How they were answered.
    pub paths: Paths,
    /// Of those answered as already claimed by the background path: how long, on average,
    /// its copy sat claimed before it was written to the socket, µs.
    pub bg_claimed_unsent_us: f64,
}

/// The breakdown of one run's requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TailBreakdown {
    /// Requests timed (requested host pages that were placed).
    pub requests: u64,
    /// The requests from the 45th to the 55th percentile of latency.
    pub median: Group,
    /// The slowest 1% (at least one).
    pub slowest_1pct: Group,
}

/// One request's stages, ns.
#[derive(Clone, Copy, Debug, Default)]
struct Timed {
    total: u64,
    stages: [u64; 7],
    guest: Option<(u64, u64)>,
    path: Option<ReqPath>,
    chan: u8,
    bg_unsent: Option<u64>,
}

/// Splits each request's latency into stages. `to_local` moves a source timestamp to the
/// destination's clock; `spans` are the thread guest's faults `(host page, began, returned)`.
pub fn breakdown(
    mem: &DestMemory,
    requests: &[ReqTrace],
    to_local: impl Fn(u64) -> u64,
    spans: Option<&[(u64, u64, u64)]>,
) -> TailBreakdown {
    let n = mem.host_pages() as usize;
    // The first source record of each host page (a page is asked again after a break).
    let mut by_page: Vec<Option<usize>> = vec![None; n];
    for (i, r) in requests.iter().enumerate() {
        if let Some(slot) = by_page.get_mut(r.host_page as usize) {
            slot.get_or_insert(i);
        }
    }
    // The thread guest's first fault on each host page.
    let mut span_of: Vec<Option<(u64, u64)>> = Vec::new();
    if let Some(sp) = spans {
        span_of = vec![None; n];
        for &(hp, a, b) in sp {
            if let Some(s) = span_of.get_mut(hp as usize) {
                s.get_or_insert((a, b));
            }
        }
    }
    let local = |t: u64| if t == 0 { 0 } else { to_local(t) };
    let mut timed: Vec<Timed> = Vec::new();
    for hp in 0..mem.host_pages() {
        let (req, placed) = mem.times(hp);
        if req == 0 || placed == 0 {
            continue;
        }
        let (sent, chan, recv_ns) = mem.delivery(hp);
        let r = by_page[hp as usize].map(|i| requests[i]);
        let urgent = chan == Via::URGENT;
        let (written, arrival) = match r {
            Some(r) if urgent => (r.urgent_written_ns, r.urgent_arrival_ns),
            Some(r) => (r.bg_written_ns, r.bg_arrival_ns),
            None => (0, 0),
        };
        let stamps = [
            sent,
            r.map_or(0, |r| local(r.read_ns)),
            r.map_or(0, |r| local(r.served_ns)),
            local(written),
            local(arrival),
            recv_ns,
            placed,
        ];
        let mut t = Timed {
            total: placed.saturating_sub(req),
            path: r.and_then(|r| ReqPath::from_code(r.path)),
            chan,
            bg_unsent: r
                .filter(|r| r.bg_claim_ns > 0 && r.bg_written_ns >= r.bg_claim_ns)
                .map(|r| r.bg_written_ns - r.bg_claim_ns),
            ..Timed::default()
        };
        let mut at = req;
        for (i, &s) in stamps.iter().enumerate() {
            let end = s.max(at).min(placed);
            t.stages[i] = end.saturating_sub(at);
            at = at.max(end);
        }
        if let Some(&Some((a, b))) = span_of.get(hp as usize) {
            t.guest = Some((req.saturating_sub(a), b.saturating_sub(placed)));
        }
        timed.push(t);
    }
    timed.sort_by_key(|t| t.total);
    let len = timed.len();
    let (lo, hi) = (len * 45 / 100, (len * 55 / 100).max(len * 45 / 100 + 1));
    let slow = len.div_ceil(100);
    TailBreakdown {
        requests: len as u64,
        median: group(timed.get(lo..hi.min(len)).unwrap_or(&[])),
        slowest_1pct: group(&timed[len - slow..]),
    }
}

fn group(g: &[Timed]) -> Group {
    if g.is_empty() {
        return Group::default();
    }
    let n = g.len() as f64;
    let mean = |f: &dyn Fn(&Timed) -> u64| g.iter().map(f).sum::<u64>() as f64 / n / 1e3;
    let guest = g.iter().all(|t| t.guest.is_some());
    let mut paths = Paths::default();
    for t in g {
        match t.path {
            Some(ReqPath::Urgent) => paths.urgent += 1,
            Some(ReqPath::Background) => paths.background += 1,
            Some(ReqPath::Queued) => paths.queued += 1,
            Some(ReqPath::Resent) => paths.resent += 1,
            None => paths.unknown += 1,
        }
        match t.chan {
            Via::URGENT => paths.placed_urgent += 1,
            _ => paths.placed_background += 1,
        }
    }
    let claimed: Vec<u64> = g
        .iter()
        .filter(|t| matches!(t.path, Some(ReqPath::Background | ReqPath::Resent)))
        .filter_map(|t| t.bg_unsent)
        .collect();
    Group {
        requests: g.len() as u64,
        latency_us: mean(&|t| t.total),
        stages_us: Stages {
            guest_fault: guest.then(|| mean(&|t| t.guest.map_or(0, |x| x.0))),
            request_write: mean(&|t| t.stages[0]),
            return_path: mean(&|t| t.stages[1]),
            source_serve: mean(&|t| t.stages[2]),
            to_wire: mean(&|t| t.stages[3]),
            link: mean(&|t| t.stages[4]),
            receive: mean(&|t| t.stages[5]),
            place: mean(&|t| t.stages[6]),
            resume: guest.then(|| mean(&|t| t.guest.map_or(0, |x| x.1))),
        },
        paths,
        bg_claimed_unsent_us: if claimed.is_empty() {
            0.0
        } else {
            claimed.iter().sum::<u64>() as f64 / claimed.len() as f64 / 1e3
        },
    }
}

impl Group {
    /// One line: latency, the stages, the paths.
    pub fn describe(&self) -> String {
        let s = &self.stages_us;
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        format!(
            "{:>4} req, {:>7.0} µs = write {:.0} + rp {:.0} + serve {:.0} + to-wire {:.0} + link {:.0} + receive {:.0} + place {:.0} µs (guest fault {} / resume {}); paths u/bg/q/re {}/{}/{}/{}, placed u/bg {}/{}, bg claimed-unsent {:.0} µs",
            self.requests,
            self.latency_us,
            s.request_write,
            s.return_path,
            s.source_serve,
            s.to_wire,
            s.link,
            s.receive,
            s.place,
            opt(s.guest_fault),
            opt(s.resume),
            self.paths.urgent,
            self.paths.background,
            self.paths.queued,
            self.paths.resent,
            self.paths.placed_urgent,
            self.paths.placed_background,
            self.bg_claimed_unsent_us,
        )
    }
}
