//! The dirty-page count in O(1), and a dirty rate over a window: what a VMM polls to decide
//! when precopy has converged enough to switch to postcopy (or to stop the guest).
//!
//! # Protocol
//! Two monotonic counts, **dirtied** and **cleared**, each kept as a sum over a small fixed
//! set of cache-padded *slots* (one `(dirtied, cleared)` pair per slot), so that threads that
//! mark and claim at once never share a counter's cache line:
//! * **dirtied** — every operation that sets page bits (mark, range mark, log merge, ring
//!   import, recovery rebuild) adds the number of bits it *newly* set, learnt from the value its
//!   own RMW returned (`fetch_or`, or `swap` for a whole word), after setting them: one add
//!   per call, none when every bit was already set (a page written again while still dirty
//!   costs nothing);
//! * **cleared** — every operation that clears page bits (claims, drains, recovery) adds the
//!   number of bits its own `fetch_and` / `swap` returned set, after clearing them: one add per
//!   call, none when it took nothing. The background scanner, the bulk claim path, adds its
//!   claims' pages in batches, when it publishes its statistics (every 64 claims, at the end of
//!   each round, when dropped).
//!
//! **Slots.** A thread adds to its own slot. The first [`OWNED`] slots are *owned*: a thread
//! takes one from a process-wide registry (a bitmask, [`sync::slot_registry`]) the first time it
//! counts, keeps it while it lives, and is then its **only writer** in every bitmap, so it adds
//! with a plain relaxed load and store — no RMW, no `lock` prefix on x86. At thread exit the slot
//! goes back to the registry (release), and the next thread to take it (acquire) continues from
//! the last value written. Threads that find no owned slot free share the [`SHARED`] last slots
//! (round robin), where they add with a relaxed `fetch_add`. (Under a model checker, two owned
//! slots and one shared, and a slot is kept until the execution ends: the hand-over at exit has
//! its own model.)
//!
//! The dirty count is `Σ dirtied − Σ cleared` over the slots (every `cleared` loaded first,
//! then every `dirtied`, so that an operation landing between the two sums only raises the
//! reading), clamped to `0 ..= pages`: `2 × (OWNED + SHARED)` relaxed loads whatever the RAM
//! size.
//!
//! # Invariants and orderings
//! * **exact when quiet**: each set bit was newly set by exactly one operation (the one whose
//!   RMW turned it from 0 to 1) and cleared by at most one (the one whose RMW turned it back),
//!   because RMWs on one word are totally ordered; each operation adds exactly what its own
//!   RMW changed, to one slot. No add is lost: an owned slot has one writer at a time (the
//!   registry's CAS hands each slot to one thread; the release at exit and the next owner's
//!   acquire order the old owner's last store before the new owner's first load), and shared
//!   slots take RMWs. So once every operation has returned (and every scanner has published),
//!   the difference is the number of set bits. Relaxed is enough for the counts themselves:
//!   they publish no memory and decide nothing; the joins or locks that make a moment quiet
//!   order every count update before the reading.
//! * **never negative, never above the pages**: while operations run, the raw difference lags
//!   the bits by what the running operations have changed but not yet added (a mark that has
//!   set its bits but not counted them, a claim that has taken bits but not counted them, the
//!   scanners' unpublished claims), so it may briefly read below or above the true count; the
//!   reading is clamped to `0 ..= pages`, and converges as soon as those operations return.
//! * **dirtied never decreases**: every slot's `dirtied` only grows (an owned slot's single
//!   writer stores larger values; a new owner starts from the old owner's last value), and a
//!   thread's successive loads of one atomic never go back, so neither does a thread's sum:
//!   the rate over a window is never negative.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use super::DirtyBitmap;
use crate::sync::{self, AtomicU64, CountAtomic, Ordering, StatCounter};

/// Owned slots: threads that count at once without sharing a line (more under a model
/// checker would only add states; two are enough for its few threads to use both paths).
const OWNED: usize = if sync::MODEL_CHECKED { 2 } else { 16 };
/// Shared slots, for threads beyond the owned ones.
const SHARED: usize = if sync::MODEL_CHECKED { 1 } else { 4 };
/// Every slot.
const SLOTS: usize = OWNED + SHARED;
const _: () = assert!(OWNED <= 64 && SLOTS < u8::MAX as usize);
/// A thread's slot before it has counted.
const NO_SLOT: u8 = u8::MAX;

/// One slot's counts.
#[derive(Debug, Default)]
struct Counts {
    dirtied: CountAtomic,
    cleared: CountAtomic,
}

/// A bitmap's dirty and cleared counts, in slots (module docs).
#[derive(Debug)]
pub(super) struct DirtyCounts {
    slots: [CachePadded<Counts>; SLOTS],
}

impl DirtyCounts {
    pub(super) fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| CachePadded::new(Counts::default())),
        }
    }

    /// Adds `n` to the calling thread's slot of the count `which` picks.
    #[inline]
    fn add(&self, n: u64, which: impl Fn(&Counts) -> &CountAtomic) {
        let slot = thread_slot();
        let c = which(&self.slots[slot]);
        if slot < OWNED {
            // Relaxed (both): this thread is the owned slot's only writer, so a plain load
            // and store lose nothing (module docs); a count publishes nothing.
            c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        } else {
            // Relaxed: a shared slot takes RMWs; a count publishes nothing.
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The sum of the count `which` picks over the slots.
    #[inline]
    fn sum(&self, which: impl Fn(&Counts) -> &CountAtomic) -> u64 {
        self.slots
            .iter()
            // Relaxed: counts (module docs).
            .map(|s| which(s).load(Ordering::Relaxed))
            .sum()
    }
}

/// The calling thread's slot, taken on its first count.
#[inline]
fn thread_slot() -> usize {
    match sync::thread_slot() {
        NO_SLOT => take_slot(),
        s => usize::from(s),
    }
}

/// Takes a free owned slot from the registry for the calling thread, or else a shared one.
#[cold]
fn take_slot() -> usize {
    let slot = if sync::MODEL_CHECKED || EXIT.try_with(|_| ()).is_ok() {
        take_owned().unwrap_or_else(next_shared)
    } else {
        // The thread is exiting (a count from a thread-local's destructor): an owned slot
        // could not be given back.
        next_shared()
    };
    sync::set_thread_slot(slot as u8);
    slot
}

/// Sets a free bit of the registry; its number, or `None` if all [`OWNED`] are taken.
fn take_owned() -> Option<usize> {
    let registry = sync::slot_registry();
    // Relaxed: a first guess; the CAS decides.
    let mut taken = registry.load(Ordering::Relaxed);
    loop {
        let free = !taken & super::low_mask(OWNED as u64);
        if free == 0 {
            return None;
        }
        let bit = free & free.wrapping_neg();
        // Acquire on success: pairs with the release of the slot's last owner at its exit, so
        // that owner's stores to this slot (in every bitmap) happen before our loads of it.
        // Relaxed on failure: we only retry with the value seen.
        match registry.compare_exchange_weak(
            taken,
            taken | bit,
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Some(bit.trailing_zeros() as usize),
            Err(now) => taken = now,
        }
    }
}

/// A shared slot, round robin.
fn next_shared() -> usize {
    static NEXT: StatCounter = StatCounter::new(0);
    // Relaxed: spreads threads over the shared slots; any slot is correct.
    OWNED + (NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed) as usize % SHARED)
}

/// Gives the thread's owned slot back to the registry when the thread exits.
struct GiveBack;

impl Drop for GiveBack {
    fn drop(&mut self) {
        let slot = sync::thread_slot();
        // Later counts of this thread (other thread-locals' destructors) share.
        sync::set_thread_slot(OWNED as u8);
        if usize::from(slot) < OWNED {
            // Release: our stores to this slot happen before the next owner's loads (its
            // acquire CAS reads this RMW, or a later one of the release sequence it heads).
            sync::slot_registry().fetch_and(!(1 << slot), Ordering::Release);
        }
    }
}

std::thread_local!(static EXIT: GiveBack = const { GiveBack });

impl DirtyBitmap {
    /// Counts `n` pages newly set (after setting them).
    #[inline]
    pub(crate) fn count_dirtied(&self, n: u64) {
        if n != 0 {
            self.counts.add(n, |c| &c.dirtied);
        }
    }

    /// Counts `n` pages cleared (after clearing them).
    #[inline]
    pub(crate) fn count_cleared(&self, n: u64) {
        if n != 0 {
            self.counts.add(n, |c| &c.cleared);
        }
    }

    /// Number of dirty target pages, in O(1) (a fixed number of loads, whatever the RAM
    /// size): exact when no thread is marking or claiming and every background scanner has
    /// finished a round or been dropped; while they run, off by at most what the running
    /// operations are changing, and always within `0 ..= pages`.
    /// [`dirty_pages`](Self::dirty_pages) counts the bits themselves instead, in O(words).
    ///
    /// How: every operation that sets page bits adds, after setting them, the number its own
    /// atomic turned from clean to dirty to one count; every operation that clears them adds
    /// what its own atomic took to another (one add per call, none when nothing changed; the
    /// background scanner adds its claims in batches). Each count is kept per thread (a
    /// thread's own cache line, which it adds to without an atomic read-modify-write; threads
    /// beyond the first 16 share four lines), so counting puts no shared cache line on the
    /// marking and claiming threads' path. Each bit is set by one operation and taken by at
    /// most one (RMWs on one word are totally ordered), so the difference is exact once they
    /// have all returned; a reading in between is clamped.
    ///
    /// ```
    /// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?;
    /// let bitmap = pagehint::DirtyBitmap::new(&layout)?;
    /// bitmap.mark_range(0, 10, 20)?;
    /// bitmap.mark_range(0, 20, 20)?; // 10 of these were dirty already
    /// assert_eq!(bitmap.dirty_count(), 30);
    /// let mut words = [0u64; 4];
    /// bitmap.get_and_clear(0, 0, &mut words)?;
    /// assert_eq!((bitmap.dirty_count(), bitmap.pages_dirtied()), (0, 30));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dirty_count(&self) -> u64 {
        // `cleared` first: a page marked and claimed between the two sums then raises the
        // reading, never lowers it below zero.
        let cleared = self.counts.sum(|c| &c.cleared);
        let dirtied = self.counts.sum(|c| &c.dirtied);
        dirtied.saturating_sub(cleared).min(self.total_pages)
    }

    /// Target pages newly made dirty since the bitmap was built: monotonic; a page counts
    /// each time it goes from clean to dirty (a write to a page still dirty adds nothing).
    /// Its growth per second is the dirty rate ([`DirtyRate`]).
    pub fn pages_dirtied(&self) -> u64 {
        self.counts.sum(|c| &c.dirtied)
    }
}

/// Sets `mask` in `word` (a mark: release) and returns how many of its bits were clean, with
/// the cheapest RMW that returns them: `swap` for a whole word (one `xchg` on x86), else
/// `fetch_or`. On x86 a `fetch_or` whose old value is used is a `cmpxchg` loop (x86 has no
/// multi-bit OR that returns the old value; `lock bts` serves one bit, but only where the
/// compiler sees the result as a branch condition, as in `mark_dirty`: a summed one-bit
/// result compiles to the loop all the same, so there is no one-bit case here).
#[inline]
pub(super) fn or_newly(word: &AtomicU64, mask: u64) -> u64 {
    if mask == !0 {
        // Release: a mark (page contents written before it are visible to the claimer). A
        // swap to all ones is a `fetch_or(!0)`: same result, same ordering.
        u64::from((!word.swap(!0, Ordering::Release)).count_ones())
    } else {
        // Release: a mark, as above.
        u64::from((mask & !word.fetch_or(mask, Ordering::Release)).count_ones())
    }
}

/// The dirty rate over a sliding window: target pages newly made dirty per second, from
/// samples of [`DirtyBitmap::pages_dirtied`], for the switch-over decision (QEMU compares
/// the pages left and the rate at which they are re-dirtied with the bandwidth and the
/// downtime limit).
///
/// Poll it at a steady interval (e.g. after each dirty-log sync); samples older than the
/// window are dropped, except the newest of them, which anchors the window's start.
///
/// ```
/// use std::time::{Duration, Instant};
/// use pagehint::{DirtyBitmap, DirtyRate, RamLayout};
/// let bitmap = DirtyBitmap::new(&RamLayout::single("m", 64 << 20, 4096)?)?;
/// let mut rate = DirtyRate::new(Duration::from_secs(1));
/// let t0 = Instant::now();
/// assert_eq!(rate.sample_at(&bitmap, t0), None); // one sample: no rate yet
/// bitmap.mark_range(0, 0, 5000)?;
/// let r = rate.sample_at(&bitmap, t0 + Duration::from_millis(500));
/// assert_eq!(r, Some(10_000.0)); // 5000 pages in half a second
/// // the switch-over test a VMM makes: pages left, and how fast they come back
/// let (left, per_sec) = (bitmap.dirty_count(), r.unwrap());
/// assert!(left == 5000 && per_sec > 0.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct DirtyRate {
    window: Duration,
    /// (when, pages dirtied so far), oldest first.
    samples: VecDeque<(Instant, u64)>,
}

impl DirtyRate {
    /// A rate over the last `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Samples `bitmap` now; returns the rate ([`rate`](Self::rate)).
    pub fn sample(&mut self, bitmap: &DirtyBitmap) -> Option<f64> {
        self.sample_at(bitmap, Instant::now())
    }

    /// Samples `bitmap` as of `now` (not before the previous sample's time); returns the rate.
    pub fn sample_at(&mut self, bitmap: &DirtyBitmap, now: Instant) -> Option<f64> {
        self.record(now, bitmap.pages_dirtied())
    }

    /// Records that `dirtied` pages had been dirtied by `now` (a value of
    /// [`DirtyBitmap::pages_dirtied`], or a sum of several bitmaps'); returns the rate. A
    /// sample older than the newest one is ignored.
    pub fn record(&mut self, now: Instant, dirtied: u64) -> Option<f64> {
        if self.samples.back().is_some_and(|&(t, _)| now < t) {
            return self.rate();
        }
        self.samples.push_back((now, dirtied));
        // Keep one sample at or before the window's start, to anchor it.
        let start = now.checked_sub(self.window).unwrap_or(now);
        while self.samples.get(1).is_some_and(|&(t, _)| t <= start) {
            self.samples.pop_front();
        }
        self.rate()
    }

    /// Pages newly dirtied per second between the oldest and the newest sample kept, or `None`
    /// with fewer than two samples (or none apart in time).
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, d0), &(t1, d1)) = (self.samples.front()?, self.samples.back()?);
        let secs = t1.duration_since(t0).as_secs_f64();
        // `pages_dirtied` never decreases; saturating all the same for sums of other counts.
        (secs > 0.0).then(|| d1.saturating_sub(d0) as f64 / secs)
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }
}
