//! Hint workloads: `pagehint::PageHint` against a `std::sync::Mutex<Option<PageLocation>>` and
//! a `parking_lot::Mutex<Option<PageLocation>>` with the same set-if-empty offer and take.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use pagehint::{PageHint, PageLocation};

use super::crew::{Crew, Stopwatch};

/// The three hint cells compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintCell {
    /// `pagehint::PageHint` (one atomic word).
    Ours,
    /// `std::sync::Mutex<Option<PageLocation>>`.
    StdMutex,
    /// `parking_lot::Mutex<Option<PageLocation>>`.
    ParkingLot,
    /// A bare `AtomicU64` written inline here (load-check + CAS offer, load-check + swap
    /// take): the floor the crate's cell is held to.
    Bare,
}

impl HintCell {
    /// How the report names the baseline.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ours => "pagehint::PageHint",
            Self::StdMutex => "std::sync::Mutex<Option<PageLocation>>",
            Self::ParkingLot => "parking_lot::Mutex<Option<PageLocation>>",
            Self::Bare => "bare AtomicU64 (CAS offer, swap take)",
        }
    }
}

/// The cells, side by side, each on its own cache lines (as the scheduler pads its hint).
#[derive(Default)]
pub struct Cells {
    ours: CachePadded<PageHint>,
    std: CachePadded<std::sync::Mutex<Option<PageLocation>>>,
    pl: CachePadded<parking_lot::Mutex<Option<PageLocation>>>,
    bare: CachePadded<AtomicU64>,
}

impl Cells {
    /// Set-if-empty offer; true if accepted.
    #[inline]
    pub fn offer(&self, cell: HintCell, loc: PageLocation) -> bool {
        match cell {
            HintCell::Ours => matches!(self.ours.offer(loc), Ok(pagehint::hint::Offer::Accepted)),
            HintCell::StdMutex => {
                let mut g = self.std.lock().unwrap();
                g.is_none() && g.replace(loc).is_none()
            }
            HintCell::ParkingLot => {
                let mut g = self.pl.lock();
                g.is_none() && g.replace(loc).is_none()
            }
            HintCell::Bare => {
                let word = (1 << 63) | loc.page;
                // Relaxed pre-check, then Release CAS: the same orderings as PageHint.
                self.bare.load(Ordering::Relaxed) == 0
                    && self
                        .bare
                        .compare_exchange(0, word, Ordering::Release, Ordering::Relaxed)
                        .is_ok()
            }
        }
    }
    /// Take the pending hint.
    #[inline]
    pub fn take(&self, cell: HintCell) -> Option<PageLocation> {
        match cell {
            HintCell::Ours => self.ours.take(),
            HintCell::StdMutex => self.std.lock().unwrap().take(),
            HintCell::ParkingLot => self.pl.lock().take(),
            HintCell::Bare => {
                // Relaxed pre-check, then Acquire swap: the same orderings as PageHint.
                if self.bare.load(Ordering::Relaxed) == 0 {
                    return None;
                }
                let w = self.bare.swap(0, Ordering::Acquire);
                (w != 0).then(|| PageLocation::new(0, w & !(1 << 63)))
            }
        }
    }
}

/// One thread: offer then take, `iters` times.
pub fn uncontended(cells: &Cells, cell: HintCell, iters: u64) -> Duration {
    let (t, mut acc) = (Instant::now(), 0u64);
    for i in 0..iters {
        acc += u64::from(cells.offer(cell, PageLocation::new(0, black_box(i & 0xffff))));
        acc = acc.wrapping_add(cells.take(cell).map_or(0, |l| l.page));
    }
    let d = t.elapsed();
    black_box(acc);
    d
}

#[derive(Clone, Copy)]
struct Job {
    cell: HintCell,
    takes: u64,
}

/// Two pinned threads: one offering at full rate, one taking; the taker's time is measured.
pub struct TwoThreads {
    crew: Crew<Job>,
    watch: Arc<Stopwatch>,
    hits: Arc<AtomicU64>,
}

impl TwoThreads {
    /// Spawns the offerer (CPU 0) and the taker (CPU 1).
    pub fn new() -> Self {
        let cells = Arc::new(Cells::default());
        let watch = Arc::new(Stopwatch::default());
        let offerer = {
            let (cells, watch) = (Arc::clone(&cells), Arc::clone(&watch));
            Box::new(move |job: Job| {
                watch.announce();
                let (mut i, mut acc) = (0u64, 0u64);
                while !watch.stopped() {
                    acc += u64::from(cells.offer(job.cell, PageLocation::new(0, i & 0xffff)));
                    i += 1;
                }
                black_box(acc);
            }) as super::crew::Role<Job>
        };
        let hits = Arc::new(AtomicU64::new(0));
        let taker = {
            let (cells, watch, hits) = (Arc::clone(&cells), Arc::clone(&watch), Arc::clone(&hits));
            Box::new(move |job: Job| {
                watch.wait_started(1);
                let (t, mut acc, mut got) = (Instant::now(), 0u64, 0u64);
                for _ in 0..job.takes {
                    if let Some(l) = cells.take(job.cell) {
                        acc = acc.wrapping_add(l.page);
                        got += 1;
                    }
                }
                watch.finish(t.elapsed());
                black_box(acc);
                // Relaxed: read by the main thread after the crew's done barrier.
                hits.store(got, Ordering::Relaxed);
            }) as super::crew::Role<Job>
        };
        Self {
            crew: Crew::new(
                vec![(Some(0), offerer), (Some(1), taker)],
                Arc::clone(&watch),
            ),
            watch,
            hits,
        }
    }

    /// How many takes of the last run found a hint.
    pub fn last_hits(&self) -> u64 {
        // Relaxed: written before the crew's done barrier.
        self.hits.load(Ordering::Relaxed)
    }

    /// Whether both threads are pinned.
    pub fn pinned(&self) -> bool {
        self.crew.pinned
    }

    /// `takes` takes while the other thread offers; the taker's elapsed time.
    pub fn run(&self, cell: HintCell, takes: u64) -> Duration {
        self.watch.reset();
        self.crew.run(Job { cell, takes });
        self.watch.elapsed()
    }
}

impl Default for TwoThreads {
    fn default() -> Self {
        Self::new()
    }
}
