//! Several fault streams: what one slot per stream costs the urgent path, and what cursors cost
//! the background scan, each against the one-slot scheduler in the same run.
//!
//! * [`StreamServe`]: the urgent path (`serve_from` + send + `urgent_sent_from`, CPU 1,
//!   timed per request) for random faults of K streams in turn, one every
//!   [`URGENT_GAP`](super::scheduler_cases::URGENT_GAP), while a per-stream background scanner
//!   (CPU 0) claims without pause and takes the K slots' hints; against the one-slot scheduler
//!   (`serve` + `urgent_sent`, `preempt_hint`) under the same load.
//! * [`CursorScan`]: one background round over a fully dirty 1 GiB block on one thread, with K
//!   streams' hints offered at evenly spaced places before the round (untimed) and runs long
//!   enough to reach each other: the cursors claim most of the block, in turn, with the
//!   linear scan taking its share; against the plain linear round of the one-slot scheduler.
//!   Also the per-stream scheduler with no hint at all: the cost of polling K slots.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagehint::{
    ClaimBatch, HintPolicy, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served,
    StreamPolicy, UrgentRequest,
};

use super::crew::{Crew, Role, Stopwatch};
use super::scheduler_cases::URGENT_GAP;
use super::{spin_for, XorShift, PAGE};

/// Stream counts measured.
pub const STREAM_COUNTS: [u32; 4] = [1, 2, 4, 8];

/// A per-stream configuration: `streams` streams, a run of `run` pages, the default share,
/// the default claim batch.
pub fn per_stream(streams: u32, run: u64) -> SchedulerConfig {
    let policy = StreamPolicy::new(streams)
        .expect("a valid count")
        .with_run(run)
        .expect("a valid run");
    SchedulerConfig {
        hint: HintPolicy::PerStream(policy),
        ..SchedulerConfig::preempt()
    }
    .with_batch(ClaimBatch::DEFAULT)
}

/// Which scheduler a job drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slots {
    /// `preempt_hint`: one slot, `serve` + `urgent_sent`.
    One,
    /// Per stream, the `i`-th count of [`STREAM_COUNTS`]: `serve_from` + `urgent_sent_from`,
    /// streams in turn.
    PerStream(usize),
}

#[derive(Clone, Copy)]
struct Job {
    slots: Slots,
    n: u64,
}

/// The schedulers compared, over the same layout.
struct Pair {
    one: PageScheduler,
    per: Vec<PageScheduler>,
    pages: u64,
}

impl Pair {
    /// `run(pages, k)`: the cursors' run with `k` streams over `pages` target pages.
    fn new(bytes: u64, run: impl Fn(u64, u32) -> u64) -> Self {
        let layout = RamLayout::single("pc.ram", bytes, PAGE).expect("valid layout");
        let pages = layout.total_pages();
        let one = PageScheduler::new(layout.clone(), SchedulerConfig::preempt_hint())
            .expect("bitmap storage");
        let per = STREAM_COUNTS
            .iter()
            .map(|&k| {
                PageScheduler::new(layout.clone(), per_stream(k, run(pages, k))).expect("storage")
            })
            .collect();
        Self { one, per, pages }
    }
    fn get(&self, slots: Slots) -> &PageScheduler {
        match slots {
            Slots::One => &self.one,
            Slots::PerStream(i) => &self.per[i],
        }
    }
}

/// Urgent-request latency with K streams against one slot, under a busy background sender.
pub struct StreamServe {
    crew: Crew<Job>,
    watch: Arc<Stopwatch>,
}

impl StreamServe {
    /// The fixture over a `bytes` block of 4 KiB pages.
    pub fn new(bytes: u64) -> Self {
        let s = Arc::new(Pair::new(bytes, |_, _| StreamPolicy::DEFAULT_RUN));
        let pages = s.pages;
        let watch = Arc::new(Stopwatch::default());
        let background: Role<Job> = {
            let (s, watch) = (Arc::clone(&s), Arc::clone(&watch));
            Box::new(move |job: Job| {
                let sched = s.get(job.slots);
                sched.reset();
                sched.bitmap().mark_all();
                watch.announce();
                let mut scanner = sched.background();
                let mut acc = 0u64;
                while !watch.stopped() {
                    match scanner.next_claim() {
                        Some(claim) => {
                            for hp in claim.host_pages() {
                                acc = acc.wrapping_add(hp.first_page);
                            }
                        }
                        None => sched.bitmap().mark_all(),
                    }
                }
                black_box(acc);
            })
        };
        let urgent: Role<Job> = {
            let (s, watch) = (Arc::clone(&s), Arc::clone(&watch));
            let mut rng = XorShift::new(123);
            let mut lat = Vec::new();
            Box::new(move |job: Job| {
                lat.clear();
                lat.reserve(job.n as usize);
                watch.wait_started(1);
                let sched = s.get(job.slots);
                let streams = sched.streams();
                let (mut total, mut acc) = (Duration::ZERO, 0u64);
                for i in 0..job.n {
                    let req = UrgentRequest::new(0, rng.below(pages) * PAGE, PAGE);
                    let stream = (i % u64::from(streams)) as u32;
                    let t = Instant::now();
                    acc = acc.wrapping_add(serve(sched, job.slots, stream, req));
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
        Self {
            crew: Crew::new(
                vec![(Some(0), background), (Some(1), urgent)],
                Arc::clone(&watch),
            ),
            watch,
        }
    }
    /// Whether both threads are pinned.
    pub fn pinned(&self) -> bool {
        self.crew.pinned
    }
    /// `requests` urgent requests; their summed latency, and each latency appended to
    /// `samples` (ns) when given.
    pub fn run(&self, slots: Slots, requests: u64, samples: Option<&mut Vec<u64>>) -> Duration {
        self.watch.reset();
        self.watch.samples.lock().unwrap().clear();
        self.crew.run(Job { slots, n: requests });
        if let Some(out) = samples {
            out.append(&mut self.watch.samples.lock().unwrap());
        }
        self.watch.elapsed()
    }
}

/// The urgent path for one request: claim, send, hint. Returns the sum of the page numbers
/// sent (the caller consumes it).
#[inline(never)]
fn serve(sched: &PageScheduler, slots: Slots, stream: u32, req: UrgentRequest) -> u64 {
    let mut acc = 0u64;
    let served = match slots {
        Slots::One => sched.serve(req),
        Slots::PerStream(_) => sched.serve_from(stream, req),
    };
    if let Ok(Served::Send(claim)) = served {
        for hp in claim.host_pages() {
            acc = acc.wrapping_add(hp.first_page);
        }
        match slots {
            Slots::One => {
                sched.urgent_sent(&claim);
            }
            Slots::PerStream(_) => {
                let _ = sched.urgent_sent_from(stream, &claim);
            }
        }
    }
    acc
}

/// One background round with K cursors against the linear round, on one thread.
pub struct CursorScan {
    pair: Pair,
    /// Target pages per round.
    pub pages: u64,
}

impl CursorScan {
    /// The fixture over a `bytes` block of 4 KiB pages; with K streams each cursor's run is a
    /// K-th of the block, from its hint to the next stream's (it spends its run as it meets
    /// the next cursor's claims: a longer run would pass over them to the block's end).
    pub fn new(bytes: u64) -> Self {
        let pair = Pair::new(bytes, |pages, k| pages / u64::from(k));
        let pages = pair.pages;
        Self { pair, pages }
    }

    /// `rounds` rounds; with `hints`, each per-stream round starts with one hint per stream at
    /// evenly spaced places (offered untimed). Returns the time of the rounds.
    pub fn run(&self, slots: Slots, hints: bool, rounds: u64) -> Duration {
        let sched = self.pair.get(slots);
        let mut total = Duration::ZERO;
        for _ in 0..rounds {
            sched.reset();
            sched.bitmap().mark_all();
            let k = sched.streams();
            if hints {
                for s in 0..k {
                    let at = self.pages * u64::from(2 * s + 1) / u64::from(2 * k);
                    let slot = sched.hint_slots().slot(s).expect("stream in range");
                    let _ = slot.offer(PageLocation::new(0, at));
                }
            }
            let t = Instant::now();
            let (mut sent, mut acc) = (0u64, 0u64);
            let mut scanner = sched.background();
            while let Some(claim) = scanner.next_claim() {
                for hp in claim.host_pages() {
                    acc = acc.wrapping_add(hp.first_page);
                }
                sent += claim.pages_to_send();
            }
            total += t.elapsed();
            black_box(acc);
            assert_eq!(sent, self.pages, "one thread sends every page once");
        }
        total
    }
}
