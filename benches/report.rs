//! `cargo bench-report`: runs the contention benchmarks once, ours and each baseline side by
//! side, prints a table and writes `bench-report.json` and `bench-report.md` to the cargo
//! target directory.
//!
//! The workloads are those of the criterion benches (`benches/common/`), timed here with a
//! short, fixed protocol so the whole report takes about a minute on 2 cores. Each ratio is
//! the median of [`Protocol::repetitions`] independent repetitions (default 5), reported with
//! its min–max; a case whose spread (max / min) exceeds 2× is flagged unstable. One
//! repetition calibrates both sides afresh to about [`Protocol::sample`] per sample, runs one
//! discarded warm-up sample of each (caches, frequency ramp), then samples ours and the
//! baseline alternately [`Protocol::samples`] times and compares the medians. Latency cases
//! record every request's latency; each repetition is one alternating chunk of requests, and
//! its percentiles are that chunk's.
//!
//! Options (after `cargo bench-report`):
//! * `--only A,B`: only cases whose name contains one of the substrings;
//! * `--threads 1,2,4,8,16`: the scaling table instead (multi-thread marking, and urgent
//!   latency with a busy sender, an urgent thread and N-2 dirty-log mergers), written to
//!   `bench-report-scaling.{json,md}`;
//! * `--repetitions N`: independent repetitions per case (default 5, at least 1);
//! * `--long`: longer repetitions (9 samples of ~25 ms instead of 3 of ~10 ms), about three
//!   times the run time, for a report to quote;
//! * `--update-benchmarks-md`: also replace the generated table in `BENCHMARKS.md`;
//! * `--out DIR`: write the files to DIR instead of the target directory;
//! * a bare word: like `--only` (so `cargo bench -- FILTER` filters this binary's cases too).
//!
//! Run without `--bench` (as `cargo test --benches` does) it is a smoke test: every case once,
//! on small guests, plus self-checks of the QEMU port; nothing is written.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bitmap_cases::{Claiming, Density, ManyMarkers, Marking, Merging, NextDirty};
use common::hint_cases::{uncontended, Cells, HintCell, TwoThreads};
use common::kvm_log::KvmLogSync;
use common::scheduler_cases::{ScanClaim, ScanClaimWithUrgent, Side, UrgentLatency};
use common::streams_cases::{CursorScan, Slots, StreamServe, STREAM_COUNTS};
use common::{percentile, size_name, GIB};
use pagehint::ClaimBatch;

/// Urgent requests per contender in a latency case (split into one chunk per repetition).
const LATENCY_REQUESTS: u64 = 200_000;
/// A case whose max / min ratio over its repetitions exceeds this is flagged unstable.
const UNSTABLE_SPREAD: f64 = 2.0;

/// How each case is timed.
#[derive(Clone, Copy, Debug)]
struct Protocol {
    /// Independent repetitions per case.
    repetitions: usize,
    /// Alternating samples per side in one repetition.
    samples: usize,
    /// Target duration of one timed sample.
    sample: Duration,
}

impl Protocol {
    const DEFAULT: Self = Self {
        repetitions: 5,
        samples: 3,
        sample: Duration::from_millis(10),
    };
    const SMOKE: Self = Self {
        repetitions: 1,
        samples: 1,
        sample: Duration::ZERO,
    };

    /// Longer repetitions (`--long`): 9 samples of ~25 ms; the repetition count is kept.
    fn long(self) -> Self {
        Self {
            samples: 9,
            sample: Duration::from_millis(25),
            ..self
        }
    }
}

/// One repetition's figures: ours and the baseline, in the row's unit.
type Rep = (f64, f64);

/// The ratio baseline / ours of each repetition.
fn ratios(reps: &[Rep]) -> Vec<f64> {
    reps.iter().map(|&(o, b)| b / o).collect()
}

/// One line of the report.
struct Row {
    case: String,
    /// One (ours, baseline) per repetition.
    reps: Vec<Rep>,
    baseline: String,
    /// What one "ns" figure is (per take, per page, per pass, p99 of requests...).
    unit: &'static str,
    /// The target ratio, if this case has one on this machine.
    target: Option<f64>,
    note: String,
}

impl Row {
    fn ratios(&self) -> Vec<f64> {
        ratios(&self.reps)
    }
    /// The median ratio (baseline / ours) over the repetitions.
    fn ratio(&self) -> f64 {
        median(self.ratios())
    }
    fn ratio_min(&self) -> f64 {
        self.ratios().into_iter().fold(f64::INFINITY, f64::min)
    }
    fn ratio_max(&self) -> f64 {
        self.ratios().into_iter().fold(f64::NEG_INFINITY, f64::max)
    }
    /// Median of our figures over the repetitions.
    fn ours_ns(&self) -> f64 {
        median(self.reps.iter().map(|r| r.0).collect())
    }
    /// Median of the baseline's figures over the repetitions.
    fn baseline_ns(&self) -> f64 {
        median(self.reps.iter().map(|r| r.1).collect())
    }
    /// Whether the repetitions disagree by more than [`UNSTABLE_SPREAD`].
    fn unstable(&self) -> bool {
        self.reps.len() > 1 && self.ratio_max() > UNSTABLE_SPREAD * self.ratio_min()
    }
}

struct Opts {
    smoke: bool,
    protocol: Protocol,
    only: Vec<String>,
    threads: Option<Vec<usize>>,
    update_md: bool,
    out: Option<PathBuf>,
}

fn opts() -> Opts {
    let smoke = common::smoke_test();
    let mut o = Opts {
        smoke,
        protocol: if smoke {
            Protocol::SMOKE
        } else {
            Protocol::DEFAULT
        },
        only: Vec::new(),
        threads: None,
        update_md: false,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--only" => {
                o.only = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "--threads" => {
                let list = args.next().unwrap_or_default();
                let parsed: Result<Vec<usize>, _> =
                    list.split(',').map(|t| t.trim().parse::<usize>()).collect();
                match parsed {
                    Ok(v) if !v.is_empty() && v.iter().all(|&t| t > 0) => o.threads = Some(v),
                    _ => {
                        eprintln!("--threads wants a list of positive counts, like 1,2,4,8,16");
                        std::process::exit(2);
                    }
                }
            }
            "--repetitions" => match args.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n > 0 => {
                    if !o.smoke {
                        o.protocol.repetitions = n
                    }
                }
                _ => {
                    eprintln!("--repetitions wants a positive count, like 5");
                    std::process::exit(2);
                }
            },
            "--long" => {
                if !o.smoke {
                    o.protocol = o.protocol.long()
                }
            }
            "--update-benchmarks-md" => o.update_md = true,
            "--out" => o.out = args.next().map(PathBuf::from),
            // Passed by cargo.
            "--bench" | "--test" | "--nocapture" => {}
            // `cargo bench -- FILTER` runs this binary too: a bare word filters cases, as it
            // filters criterion's benchmarks; criterion's own options are not ours.
            other if !other.starts_with('-') => o.only.push(other.to_owned()),
            other => eprintln!("report: ignoring option {other} (see benches/report.rs)"),
        }
    }
    o
}

/// Sizes: the real ones, or small ones for the smoke test.
struct Sizes {
    sched_guest: u64,
    mark_guest: u64,
    merge_guest: u64,
    next_dirty: Vec<u64>,
    claim_guest: u64,
    latency_requests: u64,
}

impl Sizes {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                sched_guest: 64 << 20,
                mark_guest: 64 << 20,
                merge_guest: GIB,
                next_dirty: vec![GIB, 4 * GIB],
                claim_guest: 64 << 20,
                latency_requests: 2_000,
            }
        } else {
            Self {
                sched_guest: GIB,
                mark_guest: GIB,
                merge_guest: 64 * GIB,
                next_dirty: vec![GIB, 64 * GIB, 1 << 40],
                claim_guest: GIB,
                latency_requests: LATENCY_REQUESTS,
            }
        }
    }
}

/// Calibrates `f` (iterations → elapsed) so one call takes about `p.sample`.
fn calibrate(f: &mut dyn FnMut(u64) -> Duration, p: Protocol) -> u64 {
    if p.sample.is_zero() {
        return 1;
    }
    let mut iters = 1u64;
    loop {
        let d = f(iters);
        if d >= p.sample / 8 || iters >= 1 << 40 {
            let scaled = (iters as f64 * p.sample.as_secs_f64() / d.as_secs_f64().max(1e-9)).ceil();
            return (scaled as u64).max(1);
        }
        iters *= 4;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Ours and the baseline: `p.repetitions` independent repetitions, each calibrated afresh,
/// warmed up (one discarded call per side) and sampled alternately `p.samples` times; per
/// repetition the medians of ns per iteration / `per_iter`.
fn pair(
    p: Protocol,
    per_iter: f64,
    ours: &mut dyn FnMut(u64) -> Duration,
    base: &mut dyn FnMut(u64) -> Duration,
) -> Vec<Rep> {
    (0..p.repetitions)
        .map(|_| {
            let (io, ib) = (calibrate(ours, p), calibrate(base, p));
            if !p.sample.is_zero() {
                ours(io);
                base(ib);
            }
            let (mut so, mut sb) = (Vec::new(), Vec::new());
            for _ in 0..p.samples {
                so.push(ours(io).as_nanos() as f64 / io as f64 / per_iter);
                sb.push(base(ib).as_nanos() as f64 / ib as f64 / per_iter);
            }
            (median(so), median(sb))
        })
        .collect()
}

struct Report {
    o: Opts,
    sz: Sizes,
    rows: Vec<Row>,
    unpinned: Vec<String>,
    started: Instant,
}

impl Report {
    fn wants(&self, case: &str) -> bool {
        self.o.only.is_empty() || self.o.only.iter().any(|s| case.contains(s.as_str()))
    }

    fn wants_any(&self, cases: &[&str]) -> bool {
        cases.iter().any(|c| self.wants(c))
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        case: String,
        reps: Vec<Rep>,
        baseline: &str,
        unit: &'static str,
        target: Option<f64>,
        note: String,
    ) {
        let row = Row {
            case,
            reps,
            baseline: baseline.to_owned(),
            unit,
            target,
            note,
        };
        eprintln!(
            "[{:>5.1}s] {:<44} {:>12.2} {:>12.2} {:>8.2}x  ({:.2}–{:.2}){}",
            self.started.elapsed().as_secs_f64(),
            row.case,
            row.ours_ns(),
            row.baseline_ns(),
            row.ratio(),
            row.ratio_min(),
            row.ratio_max(),
            if row.unstable() { "  UNSTABLE" } else { "" }
        );
        self.rows.push(row);
    }

    fn hint(&mut self) {
        let proto = self.o.protocol;
        if self.wants_any(&["hint_uncontended"]) {
            let cells = Cells::default();
            for (cell, name) in [
                (HintCell::StdMutex, "hint_uncontended_vs_std_mutex"),
                (HintCell::ParkingLot, "hint_uncontended_vs_parking_lot"),
            ] {
                if self.wants(name) {
                    let r = pair(
                        proto,
                        1.0,
                        &mut |n| uncontended(&cells, HintCell::Ours, n),
                        &mut |n| uncontended(&cells, cell, n),
                    );
                    self.push(
                        name.into(),
                        r,
                        cell.label(),
                        "ns per offer+take",
                        None,
                        String::new(),
                    );
                }
            }
        }
        if self.wants_any(&[
            "hint_2thread_vs_std_mutex",
            "hint_2thread_vs_parking_lot",
            "hint_2thread_vs_bare_atomic",
            "hint_2thread_per_hint_vs_std_mutex",
            "hint_2thread_per_hint_vs_parking_lot",
            "hint_2thread_per_hint_vs_bare_atomic",
        ]) {
            let two = TwoThreads::new();
            if !two.pinned() {
                self.unpinned.push("hint_2thread".into());
            }
            // The floor: the crate's cell must stay within 1.3x of a bare atomic's cost, per
            // take and per hint delivered (ratio >= 1 / 1.3).
            let floor = Some(0.77);
            for (cell, name, target, per_hint_target) in [
                (
                    HintCell::StdMutex,
                    "hint_2thread_vs_std_mutex",
                    Some(10.0),
                    None,
                ),
                (
                    HintCell::ParkingLot,
                    "hint_2thread_vs_parking_lot",
                    Some(5.0),
                    None,
                ),
                (HintCell::Bare, "hint_2thread_vs_bare_atomic", floor, floor),
            ] {
                if self.wants(name) {
                    // Also count the takes that found a hint: a mutex the taker holds most of
                    // the time makes its takes cheap and empty, so the rate explains the time.
                    let (mut ho, mut hb) = ((0u64, 0u64), (0u64, 0u64));
                    let r = pair(
                        proto,
                        1.0,
                        &mut |n| {
                            let d = two.run(HintCell::Ours, n);
                            ho = (ho.0 + two.last_hits(), ho.1 + n);
                            d
                        },
                        &mut |n| {
                            let d = two.run(cell, n);
                            hb = (hb.0 + two.last_hits(), hb.1 + n);
                            d
                        },
                    );
                    let pct = |(h, n): (u64, u64)| 100.0 * h as f64 / n.max(1) as f64;
                    let note = format!(
                        "takes that found a hint: ours {:.1}%, baseline {:.1}%",
                        pct(ho),
                        pct(hb)
                    );
                    self.push(
                        name.into(),
                        r,
                        cell.label(),
                        "ns per take, other thread offering",
                        target,
                        note,
                    );
                }
                // The same race, per hint *delivered*: the taker's time divided by the takes
                // that found a hint (a cell whose takes mostly come back empty is cheap per
                // take and dear per hint).
                let per_hint = name.replace("hint_2thread_", "hint_2thread_per_hint_");
                if self.wants(&per_hint) {
                    let per_delivered = |cell: HintCell, n: u64| {
                        let d = two.run(cell, n);
                        d.mul_f64(n as f64 / two.last_hits().max(1) as f64)
                    };
                    let r = pair(
                        proto,
                        1.0,
                        &mut |n| per_delivered(HintCell::Ours, n),
                        &mut |n| per_delivered(cell, n),
                    );
                    self.push(
                        per_hint,
                        r,
                        cell.label(),
                        "ns per hint delivered, other thread offering",
                        per_hint_target,
                        String::new(),
                    );
                }
            }
        }
    }

    fn bitmap(&mut self) {
        let (smoke, proto) = (self.o.smoke, self.o.protocol);
        let sz = Sizes::new(smoke);
        if self.wants_any(&["mark_page_vs_vm_memory", "mark_range_256_vs_vm_memory"]) {
            let m = Marking::new(sz.mark_guest);
            if self.wants("mark_page_vs_vm_memory") {
                let r = pair(proto, 1.0, &mut |n| m.page_ours(n), &mut |n| m.page_vmm(n));
                self.push(
                    "mark_page_vs_vm_memory".into(),
                    r,
                    "vm-memory AtomicBitmap::set_addr_range",
                    "ns per random page",
                    None,
                    String::new(),
                );
            }
            if self.wants("mark_range_256_vs_vm_memory") {
                let r = pair(proto, 1.0, &mut |n| m.range_ours(n), &mut |n| {
                    m.range_vmm(n)
                });
                self.push(
                    "mark_range_256_vs_vm_memory".into(),
                    r,
                    "vm-memory AtomicBitmap::set_addr_range",
                    "ns per 256-page range",
                    Some(10.0),
                    String::new(),
                );
            }
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut counts = vec![1];
        if cpus > 1 {
            counts.push(cpus.min(16));
        }
        for t in counts {
            self.many_markers(t, String::new());
        }
        for (density, dname) in [
            (Density::OnePer(4096), "sparse"),
            (Density::Random, "dense"),
        ] {
            let size = size_name(sz.merge_guest);
            let read_case = format!("merge_log_{dname}_{size}_vs_read_bandwidth");
            let qemu_case = format!("merge_log_{dname}_{size}_vs_qemu");
            let kvm_case = format!("merge_log_{dname}_{size}_vs_kvm_sync");
            if !self.wants_any(&[&read_case, &qemu_case, &kvm_case]) {
                continue;
            }
            let m = Merging::new(sz.merge_guest, density);
            let note = format!("log of {}", bytes_name(m.log_bytes()));
            if self.wants(&read_case) {
                let r = pair(proto, 1.0, &mut |n| m.ours(n), &mut |n| m.read(n));
                self.push(
                    read_case,
                    r,
                    "plain read of the log (sum of words)",
                    "ns per merge",
                    None,
                    note.clone(),
                );
            }
            if self.wants(&qemu_case) && density == Density::Random {
                let r = pair(proto, 1.0, &mut |n| m.ours(n), &mut |n| m.qemu(n));
                self.push(
                    qemu_case,
                    r,
                    "QEMU port: plain OR under bitmap_mutex",
                    "ns per merge",
                    None,
                    note.clone(),
                );
            }
            // What the merge sits next to: the kernel's side of the same sync.
            if self.wants(&kvm_case) && density == Density::Random {
                match KvmLogSync::new(sz.merge_guest, &m.log) {
                    Ok(mut k) => {
                        let r = pair(proto, 1.0, &mut |n| m.ours(n), &mut |n| k.sync(n));
                        let share = 1.0 / (1.0 + median(ratios(&r)));
                        let note = format!(
                            "{note}; a real KVM slot of {} GiB with the same log; the merge is {:.0}% of a whole sync (ioctls + merge)",
                            sz.merge_guest >> 30,
                            100.0 * share
                        );
                        self.push(
                            kvm_case,
                            r,
                            "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect), untouched slot: a floor",
                            "ns per sync",
                            None,
                            note,
                        );
                    }
                    Err(why) => eprintln!("{kvm_case}: skipped, {why}"),
                }
            }
        }
        for &bytes in &sz.next_dirty {
            for sparse in [true, false] {
                let dname = if sparse { "sparse" } else { "dense" };
                let size = size_name(bytes);
                let read_case = format!("next_dirty_{dname}_{size}_vs_read_bandwidth");
                let bitvec_case = format!("next_dirty_{dname}_{size}_vs_bitvec");
                if !self.wants_any(&[&read_case, &bitvec_case]) {
                    continue;
                }
                let f = NextDirty::new(bytes, sparse);
                let note = format!("{} bitmap, dirty pages: {}", bytes_name(f.bytes()), f.dirty);
                if sparse && self.wants(&read_case) {
                    let target = (bytes == 1 << 40).then_some(0.8);
                    let r = pair(proto, 1.0, &mut |n| f.ours(n), &mut |n| f.read(n));
                    self.push(
                        read_case,
                        r,
                        "plain read of the same bytes (sum of words)",
                        "ns per full pass",
                        target,
                        note.clone(),
                    );
                }
                if self.wants(&bitvec_case) && (!sparse || bytes == 1 << 40 || smoke) {
                    let r = pair(proto, 1.0, &mut |n| f.ours(n), &mut |n| f.bitvec(n));
                    self.push(
                        bitvec_case,
                        r,
                        "bitvec BitSlice::iter_ones",
                        "ns per full pass",
                        None,
                        note,
                    );
                }
            }
        }
        if self.wants("claim_page_vs_qemu") {
            let c = Claiming::new(sz.claim_guest, common::PAGE);
            let r = pair(proto, 1.0, &mut |n| c.page_ours(n), &mut |n| c.page_qemu(n));
            self.push(
                "claim_page_vs_qemu".into(),
                r,
                "QEMU port: test_and_clear_bit, lock per 64 pages",
                "ns per target page",
                None,
                String::new(),
            );
        }
        if self.wants("claim_host_page_2mib_vs_qemu") {
            let c = Claiming::new(sz.claim_guest, 2 << 20);
            let r = pair(proto, 1.0, &mut |n| c.host_page_ours(n), &mut |n| {
                c.host_page_qemu(n)
            });
            self.push(
                "claim_host_page_2mib_vs_qemu".into(),
                r,
                "QEMU port: ram_save_host_page under the lock",
                "ns per 2 MiB host page",
                None,
                String::new(),
            );
        }
    }

    fn many_markers(&mut self, threads: usize, prefix: String) {
        let case = format!("{prefix}mark_random_{threads}thread_vs_mutex");
        if !self.wants(&case) {
            return;
        }
        let bytes = if self.o.smoke { GIB } else { 64 * GIB };
        let m = ManyMarkers::new(threads, bytes);
        if !m.pinned() {
            self.unpinned.push(case.clone());
        }
        let r = pair(self.o.protocol, 1.0, &mut |n| m.run(true, n), &mut |n| {
            m.run(false, n)
        });
        let target = (threads >= 16).then_some(50.0);
        let note = format!(
            "{threads} thread{}, random pages of a {} GiB guest",
            if threads == 1 { "" } else { "s" },
            bytes >> 30
        );
        self.push(
            case,
            r,
            "std::sync::Mutex<Vec<u64>>, lock per page",
            "ns per mark per thread",
            target,
            note,
        );
    }

    fn scheduler(&mut self) {
        let (smoke, proto) = (self.o.smoke, self.o.protocol);
        let sz = Sizes::new(smoke);
        let batches = [ClaimBatch::DEFAULT, ClaimBatch::WORD, ClaimBatch::HOST_PAGE];
        let names = [
            "scan_claim_1thread_vs_qemu",
            "scan_claim_1thread_word_vs_qemu",
            "scan_claim_1thread_host_page_vs_qemu",
        ];
        if self.wants_any(&names)
            || self.wants("scan_claim_1thread_vs_plain_bitops")
            || self.wants("scan_claim_1thread_word_vs_plain_bitops")
        {
            let f = ScanClaim::new(sz.sched_guest, &batches);
            let pages = f.s.pages as f64;
            for (i, name) in names.iter().enumerate() {
                if self.wants(name) {
                    let r = pair(proto, pages, &mut |n| f.run(Side::Ours(i), n), &mut |n| {
                        f.run(Side::Qemu, n)
                    });
                    let target = (i == 0).then_some(0.8);
                    let note = format!("ClaimBatch: {} target pages", batches[i].get());
                    self.push(
                        name.to_string(),
                        r,
                        "QEMU port: bitmap_mutex per 64 pages",
                        "ns per page sent",
                        target,
                        note,
                    );
                }
            }
            // The stricter floor: plain bit operations with no QEMU bookkeeping at all.
            for (i, name) in [
                (0, "scan_claim_1thread_vs_plain_bitops"),
                (1, "scan_claim_1thread_word_vs_plain_bitops"),
            ] {
                if self.wants(name) {
                    let r = pair(proto, pages, &mut |n| f.run(Side::Ours(i), n), &mut |n| {
                        f.run(Side::Plain, n)
                    });
                    let note = format!("ClaimBatch: {} target pages", batches[i].get());
                    self.push(
                        name.to_string(),
                        r,
                        "plain bit ops (trailing_zeros, clear), lock per 64 pages",
                        "ns per page sent",
                        None,
                        note,
                    );
                }
            }
        }
        let name = "scan_claim_urgent_vs_qemu";
        if self.wants(name) {
            let f = ScanClaimWithUrgent::new(sz.sched_guest, &batches[..1]);
            if !f.pinned() {
                self.unpinned.push(name.into());
            }
            let pages = f.pages as f64;
            let r = pair(proto, pages, &mut |n| f.run(Side::Ours(0), n), &mut |n| {
                f.run(Side::Qemu, n)
            });
            let note = format!(
                "a fault every {} µs",
                common::scheduler_cases::URGENT_GAP.as_micros()
            );
            self.push(
                name.into(),
                r,
                "QEMU port: bitmap_mutex per 64 pages",
                "ns per page sent (background)",
                None,
                note,
            );
        }
        self.latency(0, "", &[0, 1], sz.latency_requests);
        for mergers in [1, 2] {
            self.latency(mergers, "", &[0], sz.latency_requests);
        }
    }

    /// Urgent latency cases with `mergers` merger threads, for the batches picked from
    /// [DEFAULT, WORD].
    fn latency(&mut self, mergers: usize, prefix: &str, picks: &[usize], requests: u64) {
        let suffix = |batch: usize| {
            let mut s = String::new();
            if batch == 1 {
                s.push_str("_word");
            }
            if mergers > 0 {
                let _ = write!(s, "_{mergers}merger");
            }
            s
        };
        let wanted: Vec<usize> = picks
            .iter()
            .copied()
            .filter(|&b| {
                self.wants(&format!("{prefix}urgent_p99_busy{}_vs_qemu", suffix(b)))
                    || self.wants(&format!("{prefix}urgent_p50_busy{}_vs_qemu", suffix(b)))
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let batches = [ClaimBatch::DEFAULT, ClaimBatch::WORD];
        let f = UrgentLatency::new(Sizes::new(self.o.smoke).sched_guest, &batches, mergers);
        for b in wanted {
            let tag = suffix(b);
            if !f.pinned() {
                self.unpinned.push(format!("{prefix}urgent_busy{tag}"));
            }
            // A short warm-up of each side, discarded.
            f.run(Side::Ours(b), requests / 20 + 1, None);
            f.run(Side::Qemu, requests / 20 + 1, None);
            // One repetition = one alternating chunk of requests per side.
            let reps = self.o.protocol.repetitions as u64;
            let chunk = (requests / reps).max(1);
            let mut chunks: Vec<(Vec<u64>, Vec<u64>)> = Vec::new();
            for _ in 0..reps {
                let (mut so, mut sb) = (Vec::new(), Vec::new());
                f.run(Side::Ours(b), chunk, Some(&mut so));
                f.run(Side::Qemu, chunk, Some(&mut sb));
                so.sort_unstable();
                sb.sort_unstable();
                chunks.push((so, sb));
            }
            let max_us = |last: &mut dyn Iterator<Item = Option<&u64>>| {
                last.flatten().max().copied().unwrap_or(0) as f64 / 1e3
            };
            let (max_ours, max_base) = (
                max_us(&mut chunks.iter().map(|c| c.0.last())),
                max_us(&mut chunks.iter().map(|c| c.1.last())),
            );
            let note = format!(
                "ClaimBatch: {}, mergers: {}, {} requests per side in {} chunks, max {:.1} / {:.1} µs",
                batches[b].get(),
                mergers,
                chunk * reps,
                reps,
                max_ours,
                max_base,
            );
            for (q, qn) in [(0.5, "p50"), (0.99, "p99")] {
                let case = format!("{prefix}urgent_{qn}_busy{tag}_vs_qemu");
                if !self.wants(&case) {
                    continue;
                }
                let r = chunks
                    .iter()
                    .map(|(so, sb)| (percentile(so, q) as f64, percentile(sb, q) as f64))
                    .collect();
                let target =
                    (qn == "p99" && b == 0 && mergers == 0 && prefix.is_empty()).then_some(5.0);
                let unit = if qn == "p50" {
                    "ns, p50 of urgent claims"
                } else {
                    "ns, p99 of urgent claims"
                };
                self.push(
                    case,
                    r,
                    "QEMU port: bitmap_mutex per request",
                    unit,
                    target,
                    note.clone(),
                );
            }
        }
    }

    /// Several fault streams: the urgent path with K streams against one slot (percentiles
    /// per repetition, as [`latency`](Self::latency)), and a background round with K cursors
    /// (or K slots polled and no hint) against the linear round.
    fn streams(&mut self) {
        let proto = self.o.protocol;
        let latency_cases: Vec<String> = STREAM_COUNTS
            .iter()
            .flat_map(|k| ["p50", "p99"].map(|q| format!("urgent_{q}_streams_{k}_vs_one_slot")))
            .collect();
        if latency_cases.iter().any(|c| self.wants(c)) {
            let f = StreamServe::new(self.sz.sched_guest);
            if !f.pinned() {
                self.unpinned.push("urgent_streams".into());
            }
            let requests = self.sz.latency_requests;
            f.run(Slots::One, requests / 20 + 1, None);
            for (i, k) in STREAM_COUNTS.iter().enumerate() {
                let side = Slots::PerStream(i);
                f.run(side, requests / 20 + 1, None);
                let reps = proto.repetitions as u64;
                let chunk = (requests / reps).max(1);
                let mut chunks = Vec::new();
                for _ in 0..reps {
                    let (mut so, mut sb) = (Vec::new(), Vec::new());
                    f.run(side, chunk, Some(&mut so));
                    f.run(Slots::One, chunk, Some(&mut sb));
                    so.sort_unstable();
                    sb.sort_unstable();
                    chunks.push((so, sb));
                }
                let note = format!(
                    "{k} stream{} in turn, serve_from + urgent_sent_from; baseline serve + urgent_sent; busy background sender; {} requests per side in {} chunks",
                    if *k == 1 { "" } else { "s" },
                    chunk * reps,
                    reps
                );
                for (q, qn) in [(0.5, "p50"), (0.99, "p99")] {
                    let case = format!("urgent_{qn}_streams_{k}_vs_one_slot");
                    if !self.wants(&case) {
                        continue;
                    }
                    let r = chunks
                        .iter()
                        .map(|(so, sb)| (percentile(so, q) as f64, percentile(sb, q) as f64))
                        .collect();
                    // The bound: K streams cost at most 1.5x the one-slot path.
                    let target = (qn == "p50").then_some(0.67);
                    let unit = if qn == "p50" {
                        "ns, p50 of urgent requests"
                    } else {
                        "ns, p99 of urgent requests"
                    };
                    self.push(
                        case,
                        r,
                        "one slot (preempt_hint)",
                        unit,
                        target,
                        note.clone(),
                    );
                }
            }
        }
        let polling = "scan_claim_8streams_polling_vs_linear";
        let scan_cases: Vec<String> = STREAM_COUNTS
            .iter()
            .map(|k| format!("scan_claim_{k}streams_cursors_vs_linear"))
            .collect();
        if self.wants(polling) || scan_cases.iter().any(|c| self.wants(c)) {
            let f = CursorScan::new(self.sz.sched_guest);
            let pages = f.pages as f64;
            for (i, case) in scan_cases.into_iter().enumerate() {
                if self.wants(&case) {
                    let r = pair(
                        proto,
                        pages,
                        &mut |n| f.run(Slots::PerStream(i), true, n),
                        &mut |n| f.run(Slots::One, false, n),
                    );
                    let note = format!(
                        "{} hints at evenly spaced places, runs of a K-th of the block, share {}; ClaimBatch: 16",
                        STREAM_COUNTS[i],
                        pagehint::streams::StreamPolicy::DEFAULT_SHARE
                    );
                    self.push(
                        case,
                        r,
                        "linear round (preempt_hint, no hint)",
                        "ns per page sent",
                        None,
                        note,
                    );
                }
            }
            if self.wants(polling) {
                let last = STREAM_COUNTS.len() - 1;
                let r = pair(
                    proto,
                    pages,
                    &mut |n| f.run(Slots::PerStream(last), false, n),
                    &mut |n| f.run(Slots::One, false, n),
                );
                self.push(
                    polling.into(),
                    r,
                    "linear round (preempt_hint, no hint)",
                    "ns per page sent",
                    None,
                    "8 slots polled before every step, no hint".into(),
                );
            }
        }
    }

    fn scaling(&mut self, threads: &[usize]) {
        for &t in threads {
            self.many_markers(t, "scale_".into());
            if t >= 2 {
                self.latency(
                    t - 2,
                    &format!("scale_{t}thread_"),
                    &[0],
                    self.sz.latency_requests,
                );
            }
        }
    }
}

fn main() {
    let o = opts();
    let smoke = o.smoke;
    if smoke {
        common::qemu::self_check();
    }
    let scaling = o.threads.clone();
    let mut r = Report {
        sz: Sizes::new(smoke),
        o,
        rows: Vec::new(),
        unpinned: Vec::new(),
        started: Instant::now(),
    };
    eprintln!(
        "{:<52} {:>12} {:>12} {:>9}",
        "case", "ours ns", "baseline ns", "ratio"
    );
    match &scaling {
        Some(t) => r.scaling(t),
        None => {
            r.hint();
            r.bitmap();
            r.scheduler();
            r.streams();
        }
    }
    let machine = machine();
    let md = markdown(&r, &machine);
    println!("\n{md}");
    if smoke {
        println!("(smoke test: small guests, one sample; nothing written)");
        return;
    }
    let stem = if scaling.is_some() {
        "bench-report-scaling"
    } else {
        "bench-report"
    };
    let dir = r.o.out.clone().unwrap_or_else(target_dir);
    if let Err(e) = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(dir.join(format!("{stem}.json")), json(&r.rows)))
        .and_then(|_| std::fs::write(dir.join(format!("{stem}.md")), &md))
    {
        eprintln!("cannot write the report to {}: {e}", dir.display());
        std::process::exit(1);
    }
    println!("wrote {0}/{stem}.json and {0}/{stem}.md", dir.display());
    if r.o.update_md {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
        let marker = if scaling.is_some() {
            "bench-report-scaling"
        } else {
            "bench-report"
        };
        match update_doc(&path, marker, &md) {
            Ok(()) => println!("updated {}", path.display()),
            Err(e) => {
                eprintln!("cannot update {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
}

/// The cargo target directory this binary was built in (`<target>/release/deps/report-*`),
/// or `$CARGO_TARGET_DIR`, or `./target`.
fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(t) = exe.ancestors().nth(3) {
            if exe
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|d| d == "deps")
            {
                return t.to_path_buf();
            }
        }
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// The rows as a JSON list of `{case, ours_ns, baseline, baseline_ns, ratio, ratio_min,
/// ratio_max, repetitions, unstable, target}` (figures are medians over the repetitions).
fn json(rows: &[Row]) -> String {
    fn s(x: &str) -> String {
        let mut o = String::from('"');
        for c in x.chars() {
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(o, "\\u{:04x}", c as u32);
                }
                c => o.push(c),
            }
        }
        o.push('"');
        o
    }
    fn f(x: f64) -> String {
        if x.is_finite() {
            format!("{x:.4}")
        } else {
            "null".into()
        }
    }
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "  {{\"case\": {}, \"ours_ns\": {}, \"baseline\": {}, \"baseline_ns\": {}, \"ratio\": {}, \"ratio_min\": {}, \"ratio_max\": {}, \"repetitions\": {}, \"unstable\": {}, \"target\": {}}}",
                s(&r.case),
                f(r.ours_ns()),
                s(&r.baseline),
                f(r.baseline_ns()),
                f(r.ratio()),
                f(r.ratio_min()),
                f(r.ratio_max()),
                r.reps.len(),
                r.unstable(),
                r.target.map_or("null".into(), f),
            )
        })
        .collect();
    format!("[\n{}\n]\n", items.join(",\n"))
}

fn bytes_name(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.2} ns")
    }
}

fn markdown(r: &Report, machine: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "Machine: {machine}  ");
    let _ = writeln!(
        md,
        "Threads pinned: {}  ",
        if r.unpinned.is_empty() {
            "yes, wherever a case pins them".to_string()
        } else {
            format!("NO for {}", r.unpinned.join(", "))
        }
    );
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    if r.o
        .threads
        .as_ref()
        .is_some_and(|t| t.iter().any(|&n| n > cpus))
    {
        let _ = writeln!(
            md,
            "**Cases with more threads than the {cpus} CPUs share CPUs (pinned modulo {cpus}).**  "
        );
    }
    let p = r.o.protocol;
    let _ = writeln!(
        md,
        "Protocol: {} independent repetitions per case (median ratio, min–max); each: fresh calibration, one warm-up, {} alternating samples of ~{} ms per side (medians); latency: {} requests per side, one alternating chunk per repetition. **unstable**: max / min ratio > {}×.\n",
        p.repetitions,
        p.samples,
        p.sample.as_millis(),
        r.sz.latency_requests,
        UNSTABLE_SPREAD
    );
    let _ = writeln!(
        md,
        "| case | ours | baseline | baseline figure | ratio | min–max | target | unit, notes |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---|---|");
    for row in &r.rows {
        let target = match row.target {
            Some(t) if row.ratio() >= t => format!("≥ {t} ✔"),
            Some(t) => format!("≥ {t} ✘ MISSED"),
            None => String::new(),
        };
        let mut unit = if row.note.is_empty() {
            row.unit.to_string()
        } else {
            format!("{}; {}", row.unit, row.note)
        };
        if row.unstable() {
            unit = format!("**unstable**; {unit}");
        }
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {:.2}× | {:.2}–{:.2} | {} | {} |",
            row.case,
            fmt_ns(row.ours_ns()),
            row.baseline,
            fmt_ns(row.baseline_ns()),
            row.ratio(),
            row.ratio_min(),
            row.ratio_max(),
            target,
            unit
        );
    }
    md
}

/// CPU model, CPU count, kernel, rustc, date.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".into());
    let rustc =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "rustc unknown".into());
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{cpu}, {n} CPUs, Linux {kernel}, {rustc}, {y:04}-{m:02}-{d:02}")
}

/// Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Replaces the text between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->`.
fn update_doc(path: &Path, marker: &str, body: &str) -> std::io::Result<()> {
    let doc = std::fs::read_to_string(path)?;
    let (begin, end) = (
        format!("<!-- {marker}:begin -->"),
        format!("<!-- {marker}:end -->"),
    );
    let (Some(b), Some(e)) = (doc.find(&begin), doc.find(&end)) else {
        return Err(std::io::Error::other(format!(
            "markers {begin} / {end} not found"
        )));
    };
    if e < b {
        return Err(std::io::Error::other("end marker before begin marker"));
    }
    let new = format!("{}{begin}\n{body}{}", &doc[..b], &doc[e..]);
    std::fs::write(path, new)
}
