//! What one migration run measured ([`RunResult`], one JSON object per run), assembled from
//! the run's evidence: the destination's fault record and placement times, the source's
//! summary and switch-over, and what the guest reported.
//!
//! Measured at the destination, as QEMU 10.1 reports it: per-request latency (fault read →
//! page placed), per-vCPU blocktime and total blocktime (every vCPU blocked at once),
//! downtime (source vCPUs stop → destination vCPUs run), precopy and postcopy bytes, the
//! request count; and what the guest felt: each fault's wait, the stream's longest pause, the
//! guest's progress rate before (source, precopy) and after (destination, postcopy) the
//! switch.

use serde::{Deserialize, Serialize};

use crate::blocktime::Blocktime;
use crate::dest::faults;
use crate::dest::memory::DestMemory;
use crate::dest::{Evidence, GuestOutcome};
use crate::guest::Pause;
use crate::options::{MigrationMode, RunConfig, Workload};
use crate::wire::Summary;

/// What one migration run measured (a failed run: its configuration, the error and how far
/// it got; nothing measured), in parts; the JSON is one flat object per run (each part is
/// flattened into it), with the keys `the_json_keys_stay_the_same` pins.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// How the run was set up (from the configuration; filled in for a failed run too).
    #[serde(flatten)]
    pub setup: Setup,
    /// Whether the run completed and verified.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// What the guest waited for: its faults, its requests, blocktime and pauses.
    #[serde(flatten)]
    pub waits: Waits,
    /// The migration's phases: times, bytes and pages, precopy's rounds, the clocks.
    #[serde(flatten)]
    pub transfer: Transfer,
    /// What the guest did at the source and at the destination.
    #[serde(flatten)]
    pub guest_run: GuestRun,
    /// How the source served: its scheduler's counters and what it sent.
    #[serde(flatten)]
    pub source: SourceCounters,
    /// How the destination placed what arrived: duplicates, on purpose or not.
    #[serde(flatten)]
    pub placement: Placement,
    /// Postcopy recovery: the breaks survived and what they cost.
    #[serde(flatten)]
    pub recovery: Recovery,
    /// Where the requests' time went: the stages of the median requests and of the slowest
    /// 1% (see [`crate::harness::tail`]).
    #[serde(default)]
    pub tail: crate::harness::tail::TailBreakdown,
    /// Sorted fault waits (ns), for the plot.
    #[serde(skip)]
    pub latencies_ns: Vec<u64>,
}

/// How the run was set up (from the configuration; filled in for a failed run too).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Setup {
    /// `vanilla`, `preempt` or `preempt-hint`.
    pub mode: String,
    /// `seq`, `random`, `stream` or `kv`.
    pub workload: String,
    /// `kvm` or `thread`.
    pub guest: String,
    /// vCPUs (1 for the thread guest).
    pub vcpus: u32,
    /// RAM blocks.
    pub blocks: u32,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Host page bytes.
    pub host_page: u64,
    /// Precopy rounds asked for.
    pub precopy_rounds: u32,
    /// `log`, `ring` or `none`.
    pub dirty_tracking: String,
    /// Link: bits per second (0 unlimited).
    pub bandwidth_bps: u64,
    /// Link: one-way delay, µs.
    pub delay_us: f64,
    /// Link: background send queue, bytes.
    pub queue_bytes: u64,
    /// Link: interface queue, bytes.
    pub nic_queue_bytes: u64,
    /// Link: most unsent background bytes in this run (emulated: the send queue in vanilla;
    /// real: the `TCP_NOTSENT_LOWAT` set, 0 for none).
    pub lowat_bytes: u64,
    /// Kernel pacing of the background channel on a real link, bits/s (0: none).
    #[serde(default)]
    pub pace_bps: u64,
    /// Background claim batch, target pages.
    pub claim_batch: u64,
    /// preempt-hints: target pages a vCPU's cursor may claim after its fault.
    #[serde(default)]
    pub stream_run: u64,
    /// preempt-hints: cursor claims between two linear scan steps.
    #[serde(default)]
    pub stream_share: u32,
    /// Stream playback rate, bytes/s.
    pub stream_rate: u64,
    /// How the destination's KVM guest waited when ahead of schedule: `sleep` or `spin`.
    #[serde(default)]
    pub guest_wait: String,
    /// Image and workload seed.
    pub seed: u64,
    /// Thread placement (`--pin`).
    #[serde(default)]
    pub pin: String,
    /// Preempt modes: an already-claimed page was sent again on the urgent channel
    /// (`--resend`); false: the old behaviour (and vanilla).
    #[serde(default)]
    pub resend: bool,
    /// Which repeat of the matrix this run belongs to (`--repeat`), from 0.
    #[serde(default)]
    pub repeat: u32,
}

/// Whether the run completed and verified.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Outcome {
    /// Why the run failed (null when it completed; its measurements are then all zero).
    #[serde(default)]
    pub error: Option<String>,
    /// How far a failed run got (null when it completed).
    #[serde(default)]
    pub reached: Option<String>,
    /// Everything in [`crate::harness::verify`] holds.
    pub verified: bool,
    /// What failed verification.
    pub problems: Vec<String>,
}

/// What the guest waited for: its faults, its requests, blocktime and pauses.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Waits {
    /// How faults were caught.
    pub fault_path: String,
    /// Guest faults that waited (vCPU faults read from userfaultfd; the thread guest's own).
    pub faults: u64,
    /// Median fault wait, µs.
    pub fault_p50_us: f64,
    /// 99th-percentile fault wait, µs.
    pub fault_p99_us: f64,
    /// Longest fault wait, µs.
    pub fault_max_us: f64,
    /// Total time the guest waited on faults (sum over vCPUs), ms.
    pub stall_ms: f64,
    /// Time every vCPU was blocked at once (QEMU's `postcopy-blocktime`), ms.
    pub blocktime_ms: f64,
    /// Each vCPU's blocked time, ms (their sum is `stall_ms`).
    pub vcpu_blocktime_ms: Vec<f64>,
    /// stream: the longest time the player was behind schedule; others: the longest fault, ms.
    pub longest_pause_ms: f64,
    /// Each vCPU's longest pause, ms: a vCPU that plays a stream its longest time behind
    /// schedule, any other its longest fault.
    #[serde(default)]
    pub vcpu_pause_ms: Vec<f64>,
    /// Page requests sent.
    pub requests_sent: u64,
    /// Median request latency (fault read → page placed), µs.
    pub request_p50_us: f64,
    /// 99th-percentile request latency, µs.
    pub request_p99_us: f64,
    /// Longest request latency, µs.
    pub request_max_us: f64,
    /// Fault events read from userfaultfd (every thread).
    pub uffd_faults: u64,
    /// Guest faults that raced with a placement: the page was placed by the time the fault
    /// was read, so the wait is not measured (counted as 0 in `faults`, no blocktime).
    #[serde(default)]
    pub raced_faults: u64,
}

/// The migration's phases: times, bytes and pages, precopy's rounds, the clocks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Transfer {
    /// Precopy rounds done (fewer when the dirty set stopped shrinking).
    pub precopy_rounds_done: u64,
    /// Dirty pages at the start of each precopy round.
    pub dirty_per_round: Vec<u64>,
    /// Each precopy round's time at the source (its sync, then its drain: taking, clearing in
    /// KVM's log with `log-manual`, reading and sending), ms.
    #[serde(default)]
    pub precopy_round_ms: Vec<f64>,
    /// Each sync's time (reading KVM's logs or rings into the bitmap; one per entry of
    /// `dirty_per_round`), ms.
    #[serde(default)]
    pub precopy_sync_ms: Vec<f64>,
    /// Page faults KVM handled for the source's vCPUs during the precopy rounds (its
    /// `pf_taken`; writes to pages write-protected for dirty logging among them); null where
    /// KVM has no stats files (and for the thread guest).
    #[serde(default)]
    pub precopy_kvm_faults: Option<u64>,
    /// Of those, fixed on KVM's fast path (`pf_fast`: most write-protection faults).
    #[serde(default)]
    pub precopy_kvm_fast_faults: Option<u64>,
    /// Remote TLB flushes KVM made for the source VM during the precopy rounds.
    #[serde(default)]
    pub precopy_kvm_tlb_flushes: Option<u64>,
    /// `KVM_CLEAR_DIRTY_LOG` calls in precopy (`log-manual`), and the pages they cleared.
    #[serde(default)]
    pub kvm_log_clears: u64,
    /// Pages those calls cleared (re-protected).
    #[serde(default)]
    pub kvm_log_cleared_pages: u64,
    /// Source vCPUs stop → destination vCPUs run, ms.
    pub downtime_ms: f64,
    /// The downtime stage by stage, ms (they add up to it).
    #[serde(default)]
    pub downtime_stages_ms: DowntimeStages,
    /// START → the last page placed, ms.
    pub total_ms: f64,
    /// START → the source stopped the guest, ms.
    pub precopy_ms: f64,
    /// Destination guest resumed → the last page placed, ms.
    pub duration_ms: f64,
    /// Postcopy: RAM still to send over its duration, MiB/s.
    pub throughput_mib_s: f64,
    /// Postcopy throughput over each eighth of the pages it placed, in the order they were
    /// placed (from the resume), MiB/s: whether placing slows down as memory fills.
    #[serde(default)]
    pub throughput_eighths_mib_s: Vec<f64>,
    /// The kernel's memory counters over postcopy (resume → every page in; machine-wide, so
    /// on a shared machine they count others' work too); null where unreadable.
    #[serde(default)]
    pub vmstat_postcopy: Option<crate::sys::vmstat::Vmstat>,
    /// Link bytes in precopy.
    pub precopy_bytes: u64,
    /// Link bytes in postcopy.
    pub postcopy_bytes: u64,
    /// Target pages sent in precopy.
    pub precopy_pages: u64,
    /// Host pages missing at the switch-over (sent in postcopy).
    pub pending_host_pages: u64,
    /// Source clock minus destination clock as measured by pings, µs.
    pub clock_offset_us: f64,
    /// Source and destination share `CLOCK_MONOTONIC` (same boot), so no offset is applied.
    pub same_clock: bool,
}

/// The downtime, stage by stage (ms; source stages on the source clock, the others on the
/// destination's, joined through the clock offset): they add up to `downtime_ms`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DowntimeStages {
    /// Source: the vCPUs kicked out and their state saved, the device model and the dirty
    /// harvest stopped.
    pub stop: f64,
    /// Source: the last dirty pages synced into the bitmap (KVM's dirty log or rings).
    pub sync: f64,
    /// Source: the set of host pages still to send built, and the switch-over frame.
    pub build: f64,
    /// The frame written, across the link, read and held until its arrival time.
    pub link: f64,
    /// Destination: the frame decoded and applied: pending pages discarded, the rest
    /// checked whole and marked present, the memory registered with userfaultfd.
    pub apply: f64,
    /// Destination: the vCPUs loaded with the source's state and started.
    pub resume: f64,
}

/// What the guest did at the source and at the destination.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestRun {
    /// Pages checked (or lookups) by the guest at the source, during precopy.
    pub guest_ops_precopy: u64,
    /// The same at the destination, until postcopy completed.
    pub guest_ops_postcopy: u64,
    /// Guest progress before the switch (source, precopy), operations per second (null when
    /// the guest ran there for less than 10 ms: pure postcopy).
    pub progress_before_per_s: Option<f64>,
    /// Guest progress after it (destination, until postcopy completed), per second (null
    /// when postcopy took less than 10 ms).
    pub progress_after_per_s: Option<f64>,
    /// Pages the guest wrote (source and destination).
    pub guest_writes: u64,
    /// Failed checks of the guest's own (source and destination): must be 0.
    pub guest_check_errors: u64,
    /// The guest's first failed check, in words.
    pub guest_first_error: Option<String>,
    /// Data pages the guest verified after postcopy.
    pub guest_verified_pages: u64,
}

/// How the source served: its scheduler's counters and what it sent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceCounters {
    /// Target pages sent by the urgent path.
    pub pages_urgent: u64,
    /// Target pages sent by the background path in postcopy.
    pub pages_background: u64,
    /// Requests for pages the background path had already claimed (preempt).
    pub already_claimed: u64,
    /// Valid requests the source served.
    pub requests: u64,
    /// Hints offered by the urgent path.
    pub hints_offered: u64,
    /// Hints accepted into the empty slot.
    pub hints_accepted: u64,
    /// Hints the background scan took.
    pub hints_taken: u64,
    /// Queued requests the background scan jumped to (vanilla).
    pub queued_followed: u64,
    /// Queued requests the background scan took and dropped because their page had been
    /// sent (vanilla); with no cut, `queued_followed + queued_stale` is every queued request.
    pub queued_stale: u64,
    /// Malformed or out-of-range requests the source rejected.
    pub bad_requests: u64,
    /// The source's messages for the first rejected requests.
    pub rejected: Vec<String>,
    /// All-zero host pages sent without payload in postcopy.
    pub zero_host_pages: u64,
    /// Host pages the source sent again on the urgent channel (deliberate duplicates).
    #[serde(default)]
    pub resent_host_pages: u64,
    /// Link bytes of those (headers included; part of `postcopy_bytes`).
    #[serde(default)]
    pub resent_bytes: u64,
    /// Hints the background scan took from each vCPU's slot (modes with a hint slot per
    /// vCPU; empty otherwise).
    #[serde(default)]
    pub stream_hints_taken: Vec<u64>,
    /// Target pages each stream's cursor claimed after its faults (a slot per vCPU).
    #[serde(default)]
    pub stream_cursor_pages: Vec<u64>,
    /// Hints each stream's cursor took as running backward (bubbling both ways).
    #[serde(default)]
    pub stream_backward_hints: Vec<u64>,
    /// Runs each stream's cursor spent to the end of its budget.
    #[serde(default)]
    pub stream_runs_spent: Vec<u64>,
}

/// How the destination placed what arrived: duplicates, on purpose or not.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Placement {
    /// Host pages placed twice (must be 0).
    pub placed_twice: u64,
    /// Deliberate duplicates the destination dropped (the other copy came first): host pages.
    #[serde(default)]
    pub duplicate_pages: u64,
    /// ... and their bytes.
    #[serde(default)]
    pub duplicate_bytes: u64,
    /// Resent bytes as a share of all postcopy bytes, % (target: ≤ 1).
    #[serde(default)]
    pub duplicate_share_pct: f64,
}

/// Postcopy recovery: the breaks survived and what they cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Recovery {
    /// Postcopy recovery: breaks of the connections survived (each resumed on new ones).
    #[serde(default)]
    pub cuts: u64,
    /// Postcopy recovery: time from each break to postcopy resumed, ms, in order.
    #[serde(default)]
    pub recovery_ms: Vec<f64>,
    /// Postcopy recovery: all of that time, ms.
    #[serde(default)]
    pub recovery_total_ms: f64,
    /// Postcopy recovery: host pages placed by each connection, in order (one entry without
    /// breaks).
    #[serde(default)]
    pub placed_per_connection: Vec<u64>,
    /// Postcopy recovery: target pages the source claimed on a connection that broke before
    /// they arrived (sent again on the next one): the source's urgent and background pages
    /// less the pages that were missing.
    #[serde(default)]
    pub resent_pages: u64,
    /// Postcopy recovery: the breaks, in words.
    #[serde(default)]
    pub cut_reasons: Vec<String>,
    /// Postcopy recovery: resumes from a new source session that took the paused session
    /// over (`--ram-dir`); the source's counters are then that session's only.
    #[serde(default)]
    pub takeovers: u64,
}

/// A run's mode as the table shows it: preempt modes with the old behaviour (no resend of
/// already-claimed pages) are marked.
pub fn mode_label(mode: MigrationMode, resend: bool) -> String {
    let t = mode.transport(resend);
    if t.urgent_channel && !t.resend {
        format!("{mode} (no resend)")
    } else {
        mode.name().to_string()
    }
}

impl RunResult {
    /// This run's mode as the table shows it ([`mode_label`]).
    pub fn label(&self) -> String {
        match self.setup.mode.parse::<MigrationMode>() {
            Ok(m) => mode_label(m, self.setup.resend),
            Err(_) => self.setup.mode.clone(),
        }
    }
}

/// The `p`-th percentile (nearest rank) of sorted `v`; 0 if empty.
pub fn percentile_ns(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `ops` per second over `ns`, if `ns` is long enough to mean something (10 ms).
fn rate(ops: u64, ns: u64) -> Option<f64> {
    (ns >= 10_000_000).then(|| ops as f64 / (ns as f64 / 1e9))
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// What the guest side left: its sorted fault waits, stall and blocktime, its longest pause
/// (the stream's own measure, before [`Pause`] decides), and its counters.
struct GuestSide {
    /// Sorted fault waits, ns.
    lat: Vec<u64>,
    stall_ns: u64,
    blocktime: Blocktime,
    pause_ns: u64,
    /// Each vCPU's: its stream's longest pause (0 if it plays none), its longest fault.
    vcpu_playback_ns: Vec<u64>,
    vcpu_fault_ns: Vec<u64>,
    /// The threads whose faults count (the vCPUs, or the thread guest).
    tids: Vec<u32>,
    /// Operations until postcopy completed, pages written, failed checks, the first
    /// failure, pages verified (destination only).
    ops: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    verified: u64,
}

impl GuestSide {
    fn of(e: &Evidence) -> Self {
        let mem = &e.mem;
        let mut g = match &e.outcome {
            GuestOutcome::Kvm {
                counters,
                ops_at_complete,
                tids,
                tsc_khz,
            } => {
                let b = faults::blocktime(&e.events, mem, tids);
                let pause_tsc = counters
                    .iter()
                    .map(|c| c.longest_pause_tsc)
                    .max()
                    .unwrap_or(0);
                let tsc_ns =
                    |t: u64| (u128::from(t) * 1_000_000 / u128::from((*tsc_khz).max(1))) as u64;
                let mut vcpu_fault_ns = vec![0; tids.len()];
                for ev in &e.events {
                    if let Some(v) = tids.iter().position(|&t| t == ev.tid && t != 0) {
                        let wait = mem.times(ev.hp).1.saturating_sub(ev.at_ns);
                        vcpu_fault_ns[v] = vcpu_fault_ns[v].max(wait);
                    }
                }
                Self {
                    vcpu_playback_ns: counters
                        .iter()
                        .map(|c| tsc_ns(c.longest_pause_tsc))
                        .collect(),
                    vcpu_fault_ns,
                    lat: e
                        .events
                        .iter()
                        .filter(|ev| tids.contains(&ev.tid))
                        .map(|ev| mem.times(ev.hp).1.saturating_sub(ev.at_ns))
                        .collect(),
                    stall_ns: b.per_vcpu_ns.iter().sum(),
                    blocktime: b,
                    pause_ns: tsc_ns(pause_tsc),
                    tids: tids.clone(),
                    ops: *ops_at_complete,
                    writes: counters.iter().map(|c| c.writes).sum(),
                    errors: counters.iter().map(|c| c.errors).sum(),
                    first_error: counters.iter().find_map(|c| c.first_error_text()),
                    verified: counters.iter().map(|c| c.verified).sum(),
                }
            }
            GuestOutcome::Thread { report, log, tid } => Self {
                lat: log.latencies_ns(),
                stall_ns: log.stall_ns,
                // The software path sees every wait itself; userfaultfd's record is the
                // fault thread's.
                blocktime: if mem.software() {
                    Blocktime {
                        per_vcpu_ns: vec![log.stall_ns],
                        all_ns: log.stall_ns,
                        vcpu_faults: log.spans.len() as u64,
                    }
                } else {
                    faults::blocktime(&e.events, mem, &[*tid])
                },
                pause_ns: report.longest_pause_ns,
                vcpu_playback_ns: vec![report.longest_pause_ns],
                vcpu_fault_ns: vec![log.latencies_ns().into_iter().max().unwrap_or(0)],
                tids: vec![*tid],
                ops: report.ops,
                writes: 0,
                errors: report.wrong,
                first_error: None,
                verified: 0,
            },
        };
        g.lat.sort_unstable();
        g
    }
}

/// The destination's clock at source time `t`.
fn local(e: &Evidence, t: u64) -> u64 {
    (t as i64).wrapping_sub(e.offset_ns) as u64
}

/// When postcopy completed (the last page placed if the guest ended first).
fn complete_ns(e: &Evidence) -> u64 {
    match e.times.complete {
        0 => e.mem.last_placed_ns(),
        t => t,
    }
}

impl Waits {
    fn of(e: &Evidence, g: &GuestSide, workload: Workload) -> Self {
        let requests = faults::request_latencies(&e.mem);
        let lat = &g.lat;
        let longest_pause_ns = match workload.pause() {
            Pause::Playback => g.pause_ns,
            Pause::LongestFault => lat.last().copied().unwrap_or(0),
        };
        Self {
            fault_path: e.mem.fault_path(),
            faults: lat.len() as u64,
            fault_p50_us: us(percentile_ns(lat, 50.0)),
            fault_p99_us: us(percentile_ns(lat, 99.0)),
            fault_max_us: us(lat.last().copied().unwrap_or(0)),
            stall_ms: ms(g.stall_ns),
            blocktime_ms: ms(g.blocktime.all_ns),
            vcpu_blocktime_ms: g.blocktime.per_vcpu_ns.iter().map(|&n| ms(n)).collect(),
            longest_pause_ms: ms(longest_pause_ns),
            vcpu_pause_ms: (0..g.vcpu_fault_ns.len())
                .map(|v| {
                    ms(match workload.role(v as u32).pause() {
                        Pause::Playback => g.vcpu_playback_ns[v],
                        Pause::LongestFault => g.vcpu_fault_ns[v],
                    })
                })
                .collect(),
            requests_sent: e.requests_sent,
            request_p50_us: us(percentile_ns(&requests, 50.0)),
            request_p99_us: us(percentile_ns(&requests, 99.0)),
            request_max_us: us(requests.last().copied().unwrap_or(0)),
            uffd_faults: e.events.len() as u64,
            raced_faults: faults::raced(&e.events, |hp| e.mem.times(hp).1, &g.tids),
        }
    }
}

impl Transfer {
    fn of(e: &Evidence, cfg: &RunConfig) -> Self {
        let (t, sw, mem) = (e.times, &e.switch, &e.mem);
        let stop_local = local(e, sw.stop_ns);
        let duration = mem.last_placed_ns().max(t.resume).saturating_sub(t.resume);
        let pending_bytes = mem.pending() * cfg.layout().host_page().bytes();
        Self {
            precopy_rounds_done: sw.rounds,
            dirty_per_round: sw.dirty_per_round.clone(),
            precopy_round_ms: (0..sw.rounds as usize)
                .map(|i| {
                    ms(sw.sync_ns.get(i).copied().unwrap_or(0)
                        + sw.drain_ns.get(i).copied().unwrap_or(0))
                })
                .collect(),
            precopy_sync_ms: sw.sync_ns.iter().map(|&n| ms(n)).collect(),
            precopy_kvm_faults: sw.kvm.counted.then_some(sw.kvm.faults),
            precopy_kvm_fast_faults: sw.kvm.counted.then_some(sw.kvm.fast),
            precopy_kvm_tlb_flushes: sw.kvm.counted.then_some(sw.kvm.tlb_flushes),
            kvm_log_clears: sw.kvm.log_clears,
            kvm_log_cleared_pages: sw.kvm.cleared_pages,
            downtime_ms: ms(t.resume.saturating_sub(stop_local)),
            downtime_stages_ms: DowntimeStages {
                stop: ms(sw.stopped_ns.saturating_sub(sw.stop_ns)),
                sync: ms(sw.synced_ns.saturating_sub(sw.stopped_ns)),
                build: ms(sw.built_ns.saturating_sub(sw.synced_ns)),
                link: ms(t.switch_due.saturating_sub(local(e, sw.built_ns))),
                apply: ms(t.switch_applied.saturating_sub(t.switch_due)),
                resume: ms(t.resume.saturating_sub(t.switch_applied)),
            },
            total_ms: ms(complete_ns(e).saturating_sub(t.start)),
            precopy_ms: ms(stop_local.saturating_sub(t.start)),
            duration_ms: ms(duration),
            throughput_mib_s: if duration > 0 {
                pending_bytes as f64 / (1 << 20) as f64 / (duration as f64 / 1e9)
            } else {
                0.0
            },
            throughput_eighths_mib_s: eighths(mem, t.resume),
            vmstat_postcopy: match t.vmstat {
                [Some(a), Some(b)] => Some(b.since(&a)),
                _ => None,
            },
            precopy_bytes: sw.precopy_bytes,
            postcopy_bytes: e.summary.postcopy_bytes,
            precopy_pages: sw.precopy_pages,
            pending_host_pages: mem.pending(),
            clock_offset_us: e.measured_offset_ns as f64 / 1e3,
            same_clock: e.same_clock,
        }
    }
}

/// Throughput over each eighth of the host pages placed in postcopy, in placement order,
/// from `resume`, MiB/s (empty if none was placed).
fn eighths(mem: &DestMemory, resume: u64) -> Vec<f64> {
    let mut placed: Vec<u64> = (0..mem.host_pages())
        .map(|hp| mem.times(hp).1)
        .filter(|&t| t != 0)
        .collect();
    placed.sort_unstable();
    eighths_of(&placed, mem.host_page_size(), resume)
}

/// [`eighths`] of host pages of `host_page` bytes placed at the sorted times `placed`.
fn eighths_of(placed: &[u64], host_page: u64, resume: u64) -> Vec<f64> {
    let n = placed.len();
    let mut out = Vec::new();
    let (mut from, mut since) = (0usize, resume);
    for i in 1..=8 {
        let to = n * i / 8;
        if to == from {
            continue;
        }
        let end = placed[to - 1].max(since);
        let bytes = ((to - from) as u64 * host_page) as f64;
        out.push(bytes / (1 << 20) as f64 / ((end - since).max(1) as f64 / 1e9));
        (from, since) = (to, end);
    }
    out
}

impl GuestRun {
    fn of(e: &Evidence, g: &GuestSide) -> Self {
        let sw = &e.switch;
        Self {
            guest_ops_precopy: sw.guest[0],
            guest_ops_postcopy: g.ops,
            progress_before_per_s: rate(sw.guest[0], sw.source_run_ns),
            progress_after_per_s: rate(g.ops, complete_ns(e).saturating_sub(e.times.resume)),
            guest_writes: sw.guest[1] + g.writes,
            guest_check_errors: sw.guest[2] + g.errors,
            guest_first_error: g.first_error.clone(),
            guest_verified_pages: g.verified,
        }
    }
}

impl SourceCounters {
    fn of(summary: &Summary) -> Self {
        let st = &summary.stats;
        Self {
            pages_urgent: st.urgent_pages,
            pages_background: st.background_pages,
            already_claimed: st.urgent_already_claimed,
            requests: st.requests,
            hints_offered: st.hints_offered,
            hints_accepted: st.hints_accepted,
            hints_taken: st.hints_taken,
            queued_followed: st.queued_followed,
            queued_stale: st.queued_stale,
            bad_requests: st.bad_requests,
            rejected: summary.rejected.clone(),
            zero_host_pages: summary.zero_host_pages,
            resent_host_pages: summary.resent_host_pages,
            resent_bytes: summary.resent_bytes,
            stream_hints_taken: summary.streams.iter().map(|s| s.hints_taken).collect(),
            stream_cursor_pages: summary.streams.iter().map(|s| s.cursor_pages).collect(),
            stream_backward_hints: summary.streams.iter().map(|s| s.backward_hints).collect(),
            stream_runs_spent: summary.streams.iter().map(|s| s.runs_spent).collect(),
        }
    }
}

impl Placement {
    fn of(mem: &DestMemory, summary: &Summary) -> Self {
        let (duplicate_pages, duplicate_bytes) = mem.duplicates();
        Self {
            placed_twice: mem.placed_twice().0,
            duplicate_pages,
            duplicate_bytes,
            duplicate_share_pct: if summary.postcopy_bytes > 0 {
                100.0 * summary.resent_bytes as f64 / summary.postcopy_bytes as f64
            } else {
                0.0
            },
        }
    }
}

impl Recovery {
    fn of(e: &Evidence) -> Self {
        let (mem, st) = (&e.mem, &e.summary.stats);
        let mut placed_per_connection = vec![0u64; e.cuts.len() + 1];
        for hp in 0..mem.host_pages() {
            let conn = usize::from(mem.placed_by(hp)).wrapping_sub(1);
            if let Some(n) = placed_per_connection.get_mut(conn) {
                *n += 1;
            }
        }
        Self {
            cuts: e.cuts.len() as u64,
            recovery_ms: e.cuts.iter().map(|c| ms(c.recovery_ns())).collect(),
            recovery_total_ms: ms(e.cuts.iter().map(|c| c.recovery_ns()).sum()),
            placed_per_connection,
            resent_pages: (st.urgent_pages + st.background_pages)
                .saturating_sub(mem.pending() * mem.host_page_size() / 4096),
            cut_reasons: e.cuts.iter().map(|c| c.reason.clone()).collect(),
            takeovers: e.cuts.iter().filter(|c| c.new_source).count() as u64,
        }
    }
}

impl RunResult {
    /// The measurements of a run of `workload` in `mode` with `cfg`, from what it left, with
    /// the `problems` verification found: each part from its own evidence.
    pub fn assemble(
        cfg: &RunConfig,
        mode: MigrationMode,
        workload: Workload,
        e: &Evidence,
        problems: Vec<String>,
    ) -> Self {
        let g = GuestSide::of(e);
        let spans = match &e.outcome {
            GuestOutcome::Thread { log, .. } if !e.mem.software() => Some(&log.spans[..]),
            _ => None,
        };
        Self {
            setup: Setup::of(cfg, mode, workload),
            outcome: Outcome {
                error: None,
                reached: None,
                verified: problems.is_empty(),
                problems,
            },
            waits: Waits::of(e, &g, workload),
            transfer: Transfer::of(e, cfg),
            guest_run: GuestRun::of(e, &g),
            source: SourceCounters::of(&e.summary),
            placement: Placement::of(&e.mem, &e.summary),
            recovery: Recovery::of(e),
            tail: crate::harness::tail::breakdown(
                &e.mem,
                &e.summary.requests,
                |t| local(e, t),
                spans,
            ),
            latencies_ns: g.lat,
        }
    }

    /// A run of `workload` in `mode` with `cfg` as configured: the settings filled in, nothing
    /// measured, not verified.
    pub fn configured(cfg: &RunConfig, mode: MigrationMode, workload: Workload) -> Self {
        Self {
            setup: Setup::of(cfg, mode, workload),
            ..Self::default()
        }
    }

    /// A run that failed with `error` after getting as far as `reached`: its configuration,
    /// the error, and nothing measured.
    pub fn failed(
        cfg: &RunConfig,
        mode: MigrationMode,
        workload: Workload,
        error: String,
        reached: String,
    ) -> Self {
        Self {
            outcome: Outcome {
                problems: vec![format!("the run failed: {error}")],
                error: Some(error),
                reached: Some(reached),
                verified: false,
            },
            ..Self::configured(cfg, mode, workload)
        }
    }
}

impl Setup {
    /// The settings of a run of `workload` in `mode` with `cfg`.
    fn of(cfg: &RunConfig, mode: MigrationMode, workload: Workload) -> Self {
        let layout = cfg.layout();
        let transport = cfg.transport(mode);
        Self {
            mode: mode.name().into(),
            workload: workload.name().into(),
            guest: cfg.guest.kind.name().into(),
            vcpus: layout.vcpus(),
            blocks: layout.ram().blocks().len() as u32,
            mem_bytes: layout.mem(),
            host_page: layout.host_page().bytes(),
            precopy_rounds: cfg.precopy.rounds,
            dirty_tracking: cfg.precopy.tracking.name().into(),
            bandwidth_bps: cfg.link.bandwidth_bps,
            delay_us: us(cfg.link.delay_ns),
            queue_bytes: cfg.link.queue_bytes,
            nic_queue_bytes: cfg.link.nic_queue_bytes,
            lowat_bytes: if cfg.link.emulated() {
                cfg.link.for_transport(&transport).queue_bytes
            } else {
                cfg.link.socket_lowat(&transport)
            },
            pace_bps: cfg.link.pace_bps,
            claim_batch: cfg.claim_batch.get(),
            stream_run: cfg.cursors.run,
            stream_share: cfg.cursors.share,
            stream_rate: cfg.guest.stream_rate,
            guest_wait: cfg.guest.wait.name().to_string(),
            seed: cfg.guest.seed,
            pin: cfg.pin.describe(),
            resend: transport.resend,
            repeat: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON keys of a run, as every consumer of `--json` reads them (the run's own keys;
    /// `tail`'s are `tail::TailBreakdown`'s): a regrouping of [`RunResult`] must keep them.
    const KEYS: &[&str] = &[
        "already_claimed",
        "bad_requests",
        "bandwidth_bps",
        "blocks",
        "blocktime_ms",
        "claim_batch",
        "clock_offset_us",
        "cut_reasons",
        "cuts",
        "delay_us",
        "dirty_per_round",
        "dirty_tracking",
        "downtime_ms",
        "downtime_stages_ms",
        "duplicate_bytes",
        "duplicate_pages",
        "duplicate_share_pct",
        "duration_ms",
        "error",
        "fault_max_us",
        "fault_p50_us",
        "fault_p99_us",
        "fault_path",
        "faults",
        "guest",
        "guest_check_errors",
        "guest_first_error",
        "guest_ops_postcopy",
        "guest_ops_precopy",
        "guest_verified_pages",
        "guest_wait",
        "guest_writes",
        "hints_accepted",
        "hints_offered",
        "hints_taken",
        "host_page",
        "kvm_log_cleared_pages",
        "kvm_log_clears",
        "longest_pause_ms",
        "lowat_bytes",
        "mem_bytes",
        "mode",
        "nic_queue_bytes",
        "pace_bps",
        "pages_background",
        "pages_urgent",
        "pending_host_pages",
        "pin",
        "placed_per_connection",
        "placed_twice",
        "postcopy_bytes",
        "precopy_bytes",
        "precopy_kvm_fast_faults",
        "precopy_kvm_faults",
        "precopy_kvm_tlb_flushes",
        "precopy_ms",
        "precopy_pages",
        "precopy_round_ms",
        "precopy_rounds",
        "precopy_rounds_done",
        "precopy_sync_ms",
        "problems",
        "progress_after_per_s",
        "progress_before_per_s",
        "queue_bytes",
        "queued_followed",
        "queued_stale",
        "raced_faults",
        "reached",
        "recovery_ms",
        "recovery_total_ms",
        "rejected",
        "repeat",
        "request_max_us",
        "request_p50_us",
        "request_p99_us",
        "requests",
        "requests_sent",
        "resend",
        "resent_bytes",
        "resent_host_pages",
        "resent_pages",
        "same_clock",
        "seed",
        "stall_ms",
        "stream_backward_hints",
        "stream_cursor_pages",
        "stream_hints_taken",
        "stream_rate",
        "stream_run",
        "stream_runs_spent",
        "stream_share",
        "tail",
        "takeovers",
        "throughput_eighths_mib_s",
        "throughput_mib_s",
        "total_ms",
        "uffd_faults",
        "vcpu_blocktime_ms",
        "vcpu_pause_ms",
        "vcpus",
        "verified",
        "vmstat_postcopy",
        "workload",
        "zero_host_pages",
    ];

    #[test]
    fn eighths_time_each_eighth_of_the_placements_from_the_resume() {
        // 16 pages of 1 MiB: two per eighth; the first eighth takes 2 s from the resume at
        // 1 s, each later one 1 s, the last 4 s.
        let mut t: Vec<u64> = (0..16).map(|i| (3 + i / 2) * 1_000_000_000).collect();
        t[14] = 13_000_000_000;
        t[15] = 13_000_000_000;
        let e = eighths_of(&t, 1 << 20, 1_000_000_000);
        assert_eq!(e, vec![1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5]);
        assert!(eighths_of(&[], 4096, 0).is_empty());
        // Fewer pages than eighths: one figure per page.
        assert_eq!(
            eighths_of(&[2_000_000_000], 1 << 20, 1_000_000_000),
            vec![1.0]
        );
    }

    #[test]
    fn the_json_keys_stay_the_same() {
        let v = serde_json::to_value(RunResult::default()).unwrap();
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        k.sort_unstable();
        assert_eq!(k, KEYS);
        let tail = &v["tail"];
        for group in ["median", "slowest_1pct"] {
            assert!(tail[group]["stages_us"]["to_wire"].is_number(), "{tail}");
            assert!(tail[group]["paths"]["resent"].is_number(), "{tail}");
        }
        // A result reads back from its own JSON (`compare-qemu` and the tests read them).
        let back: RunResult = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(back).unwrap(), v);
    }
}
