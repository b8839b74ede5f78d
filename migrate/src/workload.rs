//! The guest workloads. Each runs on the guest thread at the destination, from the moment
//! postcopy starts, and reads guest memory only through [`Guest::touch`] (which measures the
//! faults). What each reads is recorded and checked against the source after the run.
//!
//! * `seq`: checksums every page of its window (a thirty-second of RAM at the middle) in order.
//! * `random`: checksums uniformly random pages of all RAM until the migration completes.
//! * `stream`: plays its window (a sixteenth of RAM at three quarters) in 64 KiB frames at a
//!   fixed rate, like video playback; it sleeps when ahead and catches up when behind. A
//!   **pause** is a stretch of time during which the player is behind schedule by more than
//!   one frame; the longest one is reported.
//! * `kv`: looks random keys up in the open-addressing hash table the source built in guest
//!   RAM before the migration (real code over migrated memory: hash, probe, compare) and
//!   checks every value, until the migration completes.

use crate::clock::{now_ns, sleep_until};
use crate::config::Workload;
use crate::guest::Guest;
use crate::image::{kv_home, kv_key, kv_value, page_checksum, GuestPlan, SLOT_BYTES, TARGET_PAGE};

/// Target pages per stream frame (64 KiB).
pub const STREAM_FRAME_PAGES: u64 = 16;
/// At most this many page checksums are kept for checking.
const OBSERVED_KEPT: usize = 1 << 20;

/// What a workload did.
#[derive(Clone, Debug, Default)]
pub struct WorkloadReport {
    /// Pages read (seq, random, stream) or lookups (kv).
    pub ops: u64,
    /// `(target page, checksum)` of pages the guest read, to check against the source.
    pub observed: Vec<(u64, u64)>,
    /// Lookups that returned a wrong value or missed a stored key (kv).
    pub wrong: u64,
    /// The stream's longest pause (ns); for the others, the longest single fault.
    pub longest_pause_ns: u64,
    /// From start to end of the workload (ns).
    pub elapsed_ns: u64,
    /// False if the run was aborted under it.
    pub completed: bool,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Runs workload `w` to its end (or until the run is aborted).
pub fn run(
    w: Workload,
    g: &mut Guest<'_>,
    plan: &GuestPlan,
    seed: u64,
    stream_rate: u64,
) -> WorkloadReport {
    let t0 = now_ns();
    let mut r = WorkloadReport {
        completed: true,
        ..Default::default()
    };
    match w {
        Workload::Seq => seq(g, plan, &mut r),
        Workload::Random => random(g, plan, seed, &mut r),
        Workload::Stream => stream(g, plan, stream_rate, &mut r),
        Workload::Kv => kv(g, plan, seed, &mut r),
    }
    r.elapsed_ns = now_ns() - t0;
    if w != Workload::Stream {
        r.longest_pause_ns = g.log.latencies_ns.iter().copied().max().unwrap_or(0);
    }
    r
}

/// Touches and checksums one target page; false if aborted.
fn read_page(g: &mut Guest<'_>, page: u64, r: &mut WorkloadReport) -> bool {
    if !g.touch(page) {
        r.completed = false;
        return false;
    }
    // SAFETY: `touch` returned true: the page is placed (software) or faults to us (uffd).
    let sum = page_checksum(unsafe { g.mem.page(page) });
    if r.observed.len() < OBSERVED_KEPT {
        r.observed.push((page, sum));
    }
    r.ops += 1;
    true
}

fn seq(g: &mut Guest<'_>, plan: &GuestPlan, r: &mut WorkloadReport) {
    for page in plan.seq.clone() {
        if !read_page(g, page, r) {
            return;
        }
    }
}

fn random(g: &mut Guest<'_>, plan: &GuestPlan, seed: u64, r: &mut WorkloadReport) {
    let mut rng = Rng(seed ^ 0x7261_6e64_6f6d | 1);
    while !g.mem.all_received() {
        if !read_page(g, rng.below(plan.pages), r) {
            return;
        }
    }
}

fn stream(g: &mut Guest<'_>, plan: &GuestPlan, rate: u64, r: &mut WorkloadReport) {
    let frame_bytes = STREAM_FRAME_PAGES * TARGET_PAGE;
    let interval = (u128::from(frame_bytes) * 1_000_000_000 / u128::from(rate.max(1))) as u64;
    let start = now_ns();
    let mut pause_from: Option<u64> = None;
    let mut pause_to = 0;
    let frames = plan.stream.clone().step_by(STREAM_FRAME_PAGES as usize);
    for (i, first) in frames.enumerate() {
        let due = start + i as u64 * interval;
        if now_ns() < due {
            sleep_until(due);
        }
        for page in first..(first + STREAM_FRAME_PAGES).min(plan.stream.end) {
            if !read_page(g, page, r) {
                return;
            }
        }
        let done = now_ns();
        if done > due + interval {
            pause_from.get_or_insert(due);
            pause_to = done;
        } else if let Some(from) = pause_from.take() {
            r.longest_pause_ns = r.longest_pause_ns.max(pause_to - from);
        }
    }
    if let Some(from) = pause_from {
        r.longest_pause_ns = r.longest_pause_ns.max(pause_to - from);
    }
}

fn kv(g: &mut Guest<'_>, plan: &GuestPlan, seed: u64, r: &mut WorkloadReport) {
    let (base, slots, keys) = plan.kv_table();
    let mut rng = Rng(seed ^ 0x6b76_6b76 | 1);
    while !g.mem.all_received() {
        let key = kv_key(seed, rng.below(keys));
        let mut slot = kv_home(key, slots);
        let mut probes = 0;
        loop {
            let at = base + slot * SLOT_BYTES;
            if !g.touch(at / TARGET_PAGE) {
                r.completed = false;
                return;
            }
            // SAFETY: `touch` returned true for the page holding the slot.
            let (k, v) = unsafe { (g.mem.read_u64(at), g.mem.read_u64(at + 8)) };
            if k == key {
                if v != kv_value(key) {
                    r.wrong += 1;
                }
                break;
            }
            probes += 1;
            if k == 0 || probes == slots {
                r.wrong += 1; // a stored key must be found
                break;
            }
            slot = (slot + 1) % slots;
        }
        r.ops += 1;
    }
}
