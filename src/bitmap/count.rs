//! The dirty-page count in O(1), and a dirty rate over a window: what a VMM polls to decide
//! when precopy has converged enough to switch to postcopy (or to stop the guest).
//!
//! # Protocol
//! Two monotonic counters, each on its own cache line:
//! * **dirtied** — every operation that sets page bits (mark, range mark, log merge, ring
//!   import, recovery rebuild) adds the number of bits it *newly* set, learnt from the value its
//!   own `fetch_or` (or `swap`) returned, after setting them: one relaxed `fetch_add` per call,
//!   none when every bit was already set (a page written again while still dirty costs
//!   nothing);
//! * **cleared** — every operation that clears page bits (claims, drains, recovery) adds the
//!   number of bits its own `fetch_and` / `swap` returned set, after clearing them: one relaxed
//!   `fetch_add` per call, none when it took nothing. The background scanner, the bulk claim
//!   path, adds its claims' pages in batches, when it publishes its statistics (every 64
//!   claims, at the end of each round, when dropped).
//!
//! The dirty count is `dirtied − cleared` (cleared loaded first, then dirtied, so that an
//! operation landing between the two loads only raises the reading), clamped to
//! `0 ..= pages`.
//!
//! # Invariants and orderings
//! * **exact when quiet**: each set bit was newly set by exactly one operation (the one whose
//!   RMW turned it from 0 to 1) and cleared by at most one (the one whose RMW turned it back),
//!   because RMWs on one word are totally ordered; each operation adds exactly what its own
//!   RMW changed. So once every operation has returned (and every scanner has published), the
//!   difference is the number of set bits. Relaxed is enough for the counters: they publish no
//!   memory and decide nothing; the joins or locks that make a moment quiet order every
//!   counter update before the reading.
//! * **never negative, never above the pages**: while operations run, the raw difference lags
//!   the bits by what the running operations have changed but not yet added (a mark that has
//!   set its bits but not counted them, a claim that has taken bits but not counted them, the
//!   scanners' unpublished claims), so it may briefly read below or above the true count; the
//!   reading is clamped to `0 ..= pages`, and converges as soon as those operations return.
//! * **dirtied never decreases**, so the rate over a window is never negative.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::DirtyBitmap;
use crate::sync::Ordering;

impl DirtyBitmap {
    /// Counts `n` pages newly set (after setting them).
    #[inline]
    pub(crate) fn count_dirtied(&self, n: u64) {
        if n != 0 {
            // Relaxed: a count that publishes nothing (see the module docs).
            self.dirtied.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts `n` pages cleared (after clearing them).
    #[inline]
    pub(crate) fn count_cleared(&self, n: u64) {
        if n != 0 {
            // Relaxed: a count that publishes nothing (see the module docs).
            self.cleared.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Number of dirty target pages, in O(1) (two loads): exact when no thread is marking or
    /// claiming and every background scanner has finished a round or been dropped; while they
    /// run, off by at most what the running operations are changing, and always within
    /// `0 ..= pages`. [`dirty_pages`](Self::dirty_pages) counts the bits themselves instead,
    /// in O(words).
    ///
    /// How: every operation that sets page bits adds, after setting them, the number its own
    /// atomic turned from clean to dirty to one counter; every operation that clears them adds
    /// what its own atomic took to another (one relaxed add per call, none when nothing
    /// changed; the background scanner adds its claims in batches). Each bit is set by one
    /// operation and taken by at most one (RMWs on one word are totally ordered), so the
    /// difference is exact once they have all returned; a reading in between is clamped.
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
        // Relaxed (both): counts (module docs). `cleared` first: a page marked and claimed
        // between the two loads then raises the reading, never lowers it below zero.
        let cleared = self.cleared.load(Ordering::Relaxed);
        let dirtied = self.dirtied.load(Ordering::Relaxed);
        dirtied.saturating_sub(cleared).min(self.total_pages)
    }

    /// Target pages newly made dirty since the bitmap was built: monotonic; a page counts
    /// each time it goes from clean to dirty (a write to a page still dirty adds nothing).
    /// Its growth per second is the dirty rate ([`DirtyRate`]).
    pub fn pages_dirtied(&self) -> u64 {
        // Relaxed: a count (module docs).
        self.dirtied.load(Ordering::Relaxed)
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
