//! `cargo bench-report`: runs the contention benchmarks once, ours and each baseline side by
//! side, prints a table and writes `bench-report.json` and `bench-report.md` to the cargo
//! target directory.
//!
//! The workloads are those of the criterion benches (`benches/common/`), timed here with a
//! short, fixed protocol so the whole report takes about a minute on 2 cores: each case is
//! calibrated to about [`SAMPLE`] per sample, then ours and the baseline are sampled
//! alternately [`SAMPLES`] times and the medians compared. Latency cases record every
//! request's latency and report percentiles over all of them.
//!
//! Options (after `cargo bench-report`):
//! * `--only A,B`: only cases whose name contains one of the substrings;
//! * `--threads 1,2,4,8,16`: the scaling table instead (multi-thread marking, and urgent
//!   latency with a busy sender, an urgent thread and N-2 dirty-log mergers), written to
//!   `bench-report-scaling.{json,md}`;
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
use common::scheduler_cases::{ScanClaim, ScanClaimWithUrgent, Side, UrgentLatency};
use common::{percentile, size_name, GIB};
use pagehint::ClaimBatch;

/// Target duration of one timed sample.
const SAMPLE: Duration = Duration::from_millis(25);
/// Samples per contender and case.
const SAMPLES: usize = 9;
/// Urgent requests per contender in a latency case (in [`LATENCY_CHUNKS`] alternating chunks).
const LATENCY_REQUESTS: u64 = 200_000;
const LATENCY_CHUNKS: u64 = 4;

/// One line of the report.
struct Row {
    case: String,
    ours_ns: f64,
    baseline: String,
    baseline_ns: f64,
    /// What one "ns" figure is (per take, per page, per pass, p99 of requests...).
    unit: &'static str,
    /// The target ratio, if this case has one on this machine.
    target: Option<f64>,
    note: String,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.baseline_ns / self.ours_ns
    }
}

struct Opts {
    smoke: bool,
    only: Vec<String>,
    threads: Option<Vec<usize>>,
    update_md: bool,
    out: Option<PathBuf>,
}

fn opts() -> Opts {
    let mut o = Opts {
        smoke: common::smoke_test(),
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

/// Calibrates `f` (iterations → elapsed) so one call takes about [`SAMPLE`].
fn calibrate(f: &mut dyn FnMut(u64) -> Duration, smoke: bool) -> u64 {
    if smoke {
        return 1;
    }
    let mut iters = 1u64;
    loop {
        let d = f(iters);
        if d >= SAMPLE / 8 || iters >= 1 << 40 {
            let scaled = (iters as f64 * SAMPLE.as_secs_f64() / d.as_secs_f64().max(1e-9)).ceil();
            return (scaled as u64).max(1);
        }
        iters *= 4;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Ours and the baseline, sampled alternately; medians of ns per iteration / `per_iter`.
fn pair(
    smoke: bool,
    per_iter: f64,
    ours: &mut dyn FnMut(u64) -> Duration,
    base: &mut dyn FnMut(u64) -> Duration,
) -> (f64, f64) {
    let (io, ib) = (calibrate(ours, smoke), calibrate(base, smoke));
    let samples = if smoke { 1 } else { SAMPLES };
    let (mut so, mut sb) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        so.push(ours(io).as_nanos() as f64 / io as f64 / per_iter);
        sb.push(base(ib).as_nanos() as f64 / ib as f64 / per_iter);
    }
    (median(so), median(sb))
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
        (ours_ns, baseline_ns): (f64, f64),
        baseline: &str,
        unit: &'static str,
        target: Option<f64>,
        note: String,
    ) {
        let row = Row {
            case,
            ours_ns,
            baseline: baseline.to_owned(),
            baseline_ns,
            unit,
            target,
            note,
        };
        eprintln!(
            "[{:>5.1}s] {:<44} {:>12.2} {:>12.2} {:>8.2}x",
            self.started.elapsed().as_secs_f64(),
            row.case,
            row.ours_ns,
            row.baseline_ns,
            row.ratio()
        );
        self.rows.push(row);
    }

    fn hint(&mut self) {
        let smoke = self.o.smoke;
        if self.wants_any(&["hint_uncontended"]) {
            let cells = Cells::default();
            for (cell, name) in [
                (HintCell::StdMutex, "hint_uncontended_vs_std_mutex"),
                (HintCell::ParkingLot, "hint_uncontended_vs_parking_lot"),
            ] {
                if self.wants(name) {
                    let r = pair(
                        smoke,
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
        ]) {
            let two = TwoThreads::new();
            if !two.pinned() {
                self.unpinned.push("hint_2thread".into());
            }
            for (cell, name, target) in [
                (HintCell::StdMutex, "hint_2thread_vs_std_mutex", Some(10.0)),
                (
                    HintCell::ParkingLot,
                    "hint_2thread_vs_parking_lot",
                    Some(5.0),
                ),
                // The floor: does the crate's cell keep a bare atomic's cost?
                (HintCell::Bare, "hint_2thread_vs_bare_atomic", None),
            ] {
                if self.wants(name) {
                    // Also count the takes that found a hint: a mutex the taker holds most of
                    // the time makes its takes cheap and empty, so the rate explains the time.
                    let (mut ho, mut hb) = ((0u64, 0u64), (0u64, 0u64));
                    let r = pair(
                        smoke,
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
            }
        }
    }

    fn bitmap(&mut self) {
        let smoke = self.o.smoke;
        let sz = Sizes::new(smoke);
        if self.wants_any(&["mark_page_vs_vm_memory", "mark_range_256_vs_vm_memory"]) {
            let m = Marking::new(sz.mark_guest);
            if self.wants("mark_page_vs_vm_memory") {
                let r = pair(smoke, 1.0, &mut |n| m.page_ours(n), &mut |n| m.page_vmm(n));
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
                let r = pair(smoke, 1.0, &mut |n| m.range_ours(n), &mut |n| {
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
            if !self.wants_any(&[&read_case, &qemu_case]) {
                continue;
            }
            let m = Merging::new(sz.merge_guest, density);
            let note = format!("log of {}", bytes_name(m.log_bytes()));
            if self.wants(&read_case) {
                let r = pair(smoke, 1.0, &mut |n| m.ours(n), &mut |n| m.read(n));
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
                let r = pair(smoke, 1.0, &mut |n| m.ours(n), &mut |n| m.qemu(n));
                self.push(
                    qemu_case,
                    r,
                    "QEMU port: plain OR under bitmap_mutex",
                    "ns per merge",
                    None,
                    note,
                );
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
                    let r = pair(smoke, 1.0, &mut |n| f.ours(n), &mut |n| f.read(n));
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
                    let r = pair(smoke, 1.0, &mut |n| f.ours(n), &mut |n| f.bitvec(n));
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
            let r = pair(smoke, 1.0, &mut |n| c.page_ours(n), &mut |n| c.page_qemu(n));
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
            let r = pair(smoke, 1.0, &mut |n| c.host_page_ours(n), &mut |n| {
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
        let r = pair(self.o.smoke, 1.0, &mut |n| m.run(true, n), &mut |n| {
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
        let smoke = self.o.smoke;
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
                    let r = pair(smoke, pages, &mut |n| f.run(Side::Ours(i), n), &mut |n| {
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
                    let r = pair(smoke, pages, &mut |n| f.run(Side::Ours(i), n), &mut |n| {
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
            let r = pair(smoke, pages, &mut |n| f.run(Side::Ours(0), n), &mut |n| {
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
            let (mut so, mut sb) = (Vec::new(), Vec::new());
            // A short warm-up of each side, discarded.
            f.run(Side::Ours(b), requests / 20 + 1, None);
            f.run(Side::Qemu, requests / 20 + 1, None);
            let chunks = if self.o.smoke { 1 } else { LATENCY_CHUNKS };
            for _ in 0..chunks {
                f.run(Side::Ours(b), requests / chunks, Some(&mut so));
                f.run(Side::Qemu, requests / chunks, Some(&mut sb));
            }
            so.sort_unstable();
            sb.sort_unstable();
            let note = format!(
                "ClaimBatch: {}, mergers: {}, {} requests each, max {:.1} / {:.1} µs",
                batches[b].get(),
                mergers,
                so.len(),
                *so.last().unwrap_or(&0) as f64 / 1e3,
                *sb.last().unwrap_or(&0) as f64 / 1e3,
            );
            for (q, qn) in [(0.5, "p50"), (0.99, "p99")] {
                let case = format!("{prefix}urgent_{qn}_busy{tag}_vs_qemu");
                if !self.wants(&case) {
                    continue;
                }
                let r = (percentile(&so, q) as f64, percentile(&sb, q) as f64);
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

/// The rows as a JSON list of `{case, ours_ns, baseline, baseline_ns, ratio}`.
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
                "  {{\"case\": {}, \"ours_ns\": {}, \"baseline\": {}, \"baseline_ns\": {}, \"ratio\": {}}}",
                s(&r.case),
                f(r.ours_ns),
                s(&r.baseline),
                f(r.baseline_ns),
                f(r.ratio())
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
    let _ = writeln!(
        md,
        "Protocol: {} alternating samples of ~{} ms per side (medians); latency: {} requests per side in {} alternating chunks.\n",
        SAMPLES,
        SAMPLE.as_millis(),
        r.sz.latency_requests,
        LATENCY_CHUNKS
    );
    let _ = writeln!(
        md,
        "| case | ours | baseline | baseline figure | ratio | target | unit, notes |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---|---|");
    for row in &r.rows {
        let target = match row.target {
            Some(t) if row.ratio() >= t => format!("≥ {t} ✔"),
            Some(t) => format!("≥ {t} ✘ MISSED"),
            None => String::new(),
        };
        let unit = if row.note.is_empty() {
            row.unit.to_string()
        } else {
            format!("{}; {}", row.unit, row.note)
        };
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {:.2}× | {} | {} |",
            row.case,
            fmt_ns(row.ours_ns),
            row.baseline,
            fmt_ns(row.baseline_ns),
            row.ratio(),
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
