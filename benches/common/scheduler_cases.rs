//! Scheduler workloads: background scan-and-claim throughput (alone, and with a concurrent
//! urgent thread) and urgent-claim latency while the background thread is busy (alone, and
//! with threads merging dirty logs), `pagehint::PageScheduler` against the QEMU port.
//!
//! "Sending" a page is handing it to `black_box`: these benchmarks measure the scheduling
//! (finding, claiming, hinting, locking), not a network. Every background round starts from a
//! fully dirty 1 GiB block of 4 KiB pages; when a busy background thread finishes a round, it
//! marks everything dirty again and carries on.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagehint::{ClaimBatch, PageScheduler, RamLayout, SchedulerConfig, Served, UrgentRequest};

use super::bitmap_cases::{dirty_log, Density};
use super::crew::{Crew, Role, Stopwatch};
use super::qemu::{PlainBitops, QemuPort};
use super::{spin_for, XorShift, PAGE};

/// Guest RAM of the scheduler cases.
pub const GUEST: u64 = 1 << 30;
/// Pause between two urgent requests (faults arrive one by one, not in a flood).
pub const URGENT_GAP: Duration = Duration::from_micros(2);
/// Pause between two dirty-log merges of one merger thread.
pub const MERGE_PERIOD: Duration = Duration::from_micros(100);

/// Which scheduler a job drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// `pagehint` with the `i`-th claim batch of the fixture.
    Ours(usize),
    /// The QEMU port.
    Qemu,
    /// Plain bit operations under QEMU's lock cadence, no QEMU bookkeeping.
    Plain,
}

/// The schedulers compared, over the same layout.
pub struct Schedulers {
    /// `pagehint` schedulers (preempt mode with hints), one per claim batch.
    pub ours: Vec<(ClaimBatch, PageScheduler)>,
    /// The QEMU port.
    pub qemu: QemuPort,
    /// The plain-bit-operations floor.
    pub plain: PlainBitops,
    /// Target pages in the layout.
    pub pages: u64,
}

impl Schedulers {
    /// One scheduler per batch over a `bytes` block of 4 KiB pages, and the QEMU port.
    pub fn new(bytes: u64, batches: &[ClaimBatch]) -> Self {
        let layout = RamLayout::single("pc.ram", bytes, PAGE).expect("valid layout");
        let pages = layout.total_pages();
        Self {
            ours: batches
                .iter()
                .map(|&b| {
                    let cfg = SchedulerConfig::preempt_hint().with_batch(b);
                    (
                        b,
                        PageScheduler::new(layout.clone(), cfg).expect("bitmap storage"),
                    )
                })
                .collect(),
            qemu: QemuPort::new(bytes, PAGE),
            plain: PlainBitops::new(bytes),
            pages,
        }
    }

    /// Marks everything dirty for a new round.
    pub fn mark_all(&self, side: Side) {
        match side {
            Side::Ours(i) => {
                let s = &self.ours[i].1;
                s.reset();
                s.bitmap().mark_all();
            }
            Side::Qemu => self.qemu.mark_all(),
            Side::Plain => self.plain.mark_all(),
        }
    }

    /// One background round from page 0 of a fully dirty block; returns target pages sent.
    ///
    /// "Sending" adds each page number to an accumulator that goes to `black_box` once per
    /// round: every page is produced, and no per-page store is added to either side.
    #[inline(never)]
    pub fn round(&self, side: Side) -> u64 {
        let (mut sent, mut acc) = (0, 0u64);
        match side {
            Side::Ours(i) => {
                for claim in self.ours[i].1.background() {
                    for hp in claim.host_pages() {
                        acc = acc.wrapping_add(hp.first_page);
                    }
                    sent += claim.pages_to_send();
                }
            }
            Side::Qemu => loop {
                let n = self.qemu.background_batch(|p| acc = acc.wrapping_add(p));
                if n == 0 {
                    break;
                }
                sent += n;
            },
            Side::Plain => loop {
                let n = self.plain.background_batch(|p| acc = acc.wrapping_add(p));
                if n == 0 {
                    break;
                }
                sent += n;
            },
        }
        black_box(acc);
        sent
    }

    /// The urgent path for a fault on target page `page`: claim, send, hint. Returns the
    /// sum of the page numbers sent (the caller consumes it).
    #[inline(never)]
    pub fn urgent(&self, side: Side, page: u64) -> u64 {
        let mut acc = 0u64;
        match side {
            Side::Ours(i) => {
                let s = &self.ours[i].1;
                if let Ok(Served::Send(claim)) = s.serve(UrgentRequest::new(0, page * PAGE, PAGE)) {
                    for hp in claim.host_pages() {
                        acc = acc.wrapping_add(hp.first_page);
                    }
                    s.urgent_sent(&claim);
                }
            }
            Side::Qemu => {
                self.qemu.urgent(page, |p| acc = acc.wrapping_add(p));
            }
            Side::Plain => {
                self.plain.urgent(page, |p| acc = acc.wrapping_add(p));
            }
        }
        acc
    }

    /// A background sender that never rests: rounds back to back, everything marked dirty
    /// again at the end of each, until `watch` says stop.
    pub fn busy_background(&self, side: Side, watch: &Stopwatch) {
        let mut acc = 0u64;
        match side {
            Side::Ours(i) => {
                let s = &self.ours[i].1;
                let mut scanner = s.background();
                while !watch.stopped() {
                    match scanner.next_claim() {
                        Some(claim) => {
                            for hp in claim.host_pages() {
                                acc = acc.wrapping_add(hp.first_page);
                            }
                        }
                        None => s.bitmap().mark_all(),
                    }
                }
            }
            Side::Qemu => {
                while !watch.stopped() {
                    if self.qemu.background_batch(|p| acc = acc.wrapping_add(p)) == 0 {
                        self.qemu.mark_all();
                    }
                }
            }
            Side::Plain => {
                while !watch.stopped() {
                    if self.plain.background_batch(|p| acc = acc.wrapping_add(p)) == 0 {
                        self.plain.mark_all();
                    }
                }
            }
        }
        black_box(acc);
    }

    /// Merges a dirty log into the block (precopy's dirty-log sync).
    pub fn merge(&self, side: Side, log: &[u64]) {
        match side {
            Side::Ours(i) => {
                black_box(self.ours[i].1.bitmap().merge_dirty_log(0, log)).ok();
            }
            Side::Qemu => {
                black_box(self.qemu.merge_log(log));
            }
            Side::Plain => self.plain.merge_log(log),
        }
    }
}

/// Background scan-and-claim on one thread.
pub struct ScanClaim {
    /// The schedulers.
    pub s: Schedulers,
}

impl ScanClaim {
    /// The fixture over [`GUEST`] with the given batches.
    pub fn new(bytes: u64, batches: &[ClaimBatch]) -> Self {
        Self {
            s: Schedulers::new(bytes, batches),
        }
    }
    /// `rounds` background rounds; re-dirtying is not timed.
    pub fn run(&self, side: Side, rounds: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..rounds {
            self.s.mark_all(side);
            let t = Instant::now();
            let sent = self.s.round(side);
            total += t.elapsed();
            assert_eq!(sent, self.s.pages, "one thread sends every page once");
        }
        total
    }
}

#[derive(Clone, Copy)]
struct Job {
    side: Side,
    n: u64,
}

/// Background scan-and-claim (CPU 0, measured) while an urgent thread (CPU 1) serves random
/// faults, one every [`URGENT_GAP`].
pub struct ScanClaimWithUrgent {
    crew: Crew<Job>,
    watch: Arc<Stopwatch>,
    /// Target pages per round.
    pub pages: u64,
}

impl ScanClaimWithUrgent {
    /// The fixture.
    pub fn new(bytes: u64, batches: &[ClaimBatch]) -> Self {
        let s = Arc::new(Schedulers::new(bytes, batches));
        let pages = s.pages;
        let watch = Arc::new(Stopwatch::default());
        let background: Role<Job> = {
            let (s, watch) = (Arc::clone(&s), Arc::clone(&watch));
            Box::new(move |job: Job| {
                watch.wait_started(1);
                let mut total = Duration::ZERO;
                for _ in 0..job.n {
                    s.mark_all(job.side);
                    let t = Instant::now();
                    black_box(s.round(job.side));
                    total += t.elapsed();
                }
                watch.finish(total);
            })
        };
        let urgent: Role<Job> = {
            let (s, watch) = (Arc::clone(&s), Arc::clone(&watch));
            let mut rng = XorShift::new(99);
            Box::new(move |job: Job| {
                watch.announce();
                let mut acc = 0u64;
                while !watch.stopped() {
                    acc = acc.wrapping_add(s.urgent(job.side, rng.below(pages)));
                    spin_for(URGENT_GAP);
                }
                black_box(acc);
            })
        };
        Self {
            crew: Crew::new(
                vec![(Some(0), background), (Some(1), urgent)],
                Arc::clone(&watch),
            ),
            watch,
            pages,
        }
    }
    /// Whether both threads are pinned.
    pub fn pinned(&self) -> bool {
        self.crew.pinned
    }
    /// `rounds` background rounds under urgent traffic; the background's time.
    pub fn run(&self, side: Side, rounds: u64) -> Duration {
        self.watch.reset();
        self.crew.run(Job { side, n: rounds });
        self.watch.elapsed()
    }
}

/// Urgent-claim latency (CPU 1, measured per request) while a background thread (CPU 0)
/// scans and claims without pause and `mergers` threads (CPUs 2.., modulo the machine's)
/// merge a dirty log every [`MERGE_PERIOD`].
pub struct UrgentLatency {
    crew: Crew<Job>,
    watch: Arc<Stopwatch>,
    /// Merger threads.
    pub mergers: usize,
}

impl UrgentLatency {
    /// The fixture.
    pub fn new(bytes: u64, batches: &[ClaimBatch], mergers: usize) -> Self {
        let s = Arc::new(Schedulers::new(bytes, batches));
        let pages = s.pages;
        let watch = Arc::new(Stopwatch::default());
        let background: Role<Job> = {
            let (s, watch) = (Arc::clone(&s), Arc::clone(&watch));
            Box::new(move |job: Job| {
                s.mark_all(job.side);
                watch.announce();
                s.busy_background(job.side, &watch);
            })
        };
        let urgent: Role<Job> = {
            let (s, watch) = (Arc::clone(&s), Arc::clone(&watch));
            let mut rng = XorShift::new(77);
            let mut lat = Vec::new();
            Box::new(move |job: Job| {
                lat.clear();
                lat.reserve(job.n as usize);
                watch.wait_started(1 + mergers);
                let (mut total, mut acc) = (Duration::ZERO, 0u64);
                for _ in 0..job.n {
                    let page = rng.below(pages);
                    let t = Instant::now();
                    acc = acc.wrapping_add(s.urgent(job.side, page));
                    let d = t.elapsed();
                    total += d;
                    lat.push(d.as_nanos() as u64);
                    spin_for(URGENT_GAP);
                }
                black_box(acc);
                watch.samples.lock().unwrap().extend_from_slice(&lat);
                watch.finish(total);
            })
        };
        let mut roles = vec![(Some(0), background), (Some(1), urgent)];
        for m in 0..mergers {
            let (s, watch) = (Arc::clone(&s), Arc::clone(&watch));
            let log = dirty_log(pages, Density::OnePer(512), 40 + m as u64);
            roles.push((
                Some(2 + m),
                Box::new(move |job: Job| {
                    watch.announce();
                    while !watch.stopped() {
                        s.merge(job.side, &log);
                        std::thread::sleep(MERGE_PERIOD);
                    }
                }),
            ));
        }
        Self {
            crew: Crew::new(roles, Arc::clone(&watch)),
            watch,
            mergers,
        }
    }
    /// Whether every thread is pinned.
    pub fn pinned(&self) -> bool {
        self.crew.pinned
    }
    /// `requests` urgent requests; their summed latency, and each latency appended to
    /// `samples` (ns) when given.
    pub fn run(&self, side: Side, requests: u64, samples: Option<&mut Vec<u64>>) -> Duration {
        self.watch.reset();
        self.watch.samples.lock().unwrap().clear();
        self.crew.run(Job { side, n: requests });
        if let Some(out) = samples {
            out.append(&mut self.watch.samples.lock().unwrap());
        }
        self.watch.elapsed()
    }
}
