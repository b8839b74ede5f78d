//! Several fault streams: one hint slot per stream.
//!
//! # Protocol
//! A *stream* is a source of faults with its own locality: a vCPU (a destination knows it from
//! the faulting thread's id), or any id below the configured count that the caller chooses
//! (`vcpu % streams` when there are more vCPUs than streams). [`HintSlots`] composes the
//! single-slot [`PageHint`], unchanged: one slot per stream. After sending a faulted host page
//! of stream `s`, the urgent path offers the location right after it into slot `s`
//! ([`PageScheduler::urgent_sent_from`](crate::PageScheduler::urgent_sent_from)); a background
//! scanner takes from every slot and follows each stream with its own cursor
//! ([`cursors`](crate::cursors)).
//!
//! # Invariants
//! * **I4, per slot**: every slot is a [`PageHint`] and keeps its guarantees (at most one hint
//!   pending, set-if-empty offer, each accepted hint taken at most once, never torn). Slots are
//!   separate cells on separate cache lines: an offer into slot `s` never reads or writes
//!   another slot, so one stream's pending hint never refuses or overwrites another stream's
//!   (the loom and shuttle models' `SharedSlot` and `OverwritingSlots` mutants break exactly
//!   this).
//! * **I8**: a stream id at or above the count is refused with [`StreamError`] before any slot
//!   is touched; a policy of no streams, or of more than [`MAX_STREAMS`], with
//!   [`StreamPolicyError`].
//! * **Stream 0 is the one-stream API**: `HintSlots` dereferences to slot 0, so
//!   [`PageScheduler::hint`](crate::PageScheduler::hint),
//!   [`PageScheduler::serve`](crate::PageScheduler::serve) and
//!   [`PageScheduler::urgent_sent`](crate::PageScheduler::urgent_sent) are stream 0's, and a
//!   one-slot configuration is exactly the single cell it always was.
//!
//! Hints stay advisory (I6): a slot only tells a scanner where to look first.

use std::fmt;
use std::ops::Deref;

use crossbeam_utils::CachePadded;

use std::sync::atomic::Ordering;

use crate::hint::PageHint;
use crate::sync::StatCounter;

/// The most streams a [`StreamPolicy`] may have.
///
/// A scanner in per-stream mode polls every slot before each step (one relaxed load per slot,
/// from its own cache while no offer lands), so the count bounds that cost; a VMM with more
/// vCPUs maps them onto streams (`vcpu % streams`).
pub const MAX_STREAMS: u32 = 256;

/// How a scheduler follows several fault streams ([`HintPolicy::PerStream`]): how many
/// streams, how far each cursor runs after a fault, and how many cursor claims the linear
/// scan yields between two of its own steps.
///
/// ```
/// use pagehint::streams::StreamPolicy;
/// let p = StreamPolicy::new(4)?.with_run(512)?.with_share(8)?;
/// assert_eq!((p.streams(), p.run(), p.share()), (4, 512, 8));
/// assert!(StreamPolicy::new(0).is_err());
/// # Ok::<(), pagehint::streams::StreamPolicyError>(())
/// ```
///
/// [`HintPolicy::PerStream`]: crate::HintPolicy::PerStream
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPolicy {
    streams: u32,
    run: u64,
    share: u32,
}

/// A [`StreamPolicy`] that cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamPolicyError {
    /// No streams: at least one is needed.
    NoStreams,
    /// More streams than [`MAX_STREAMS`].
    TooManyStreams {
        /// The count asked for.
        streams: u32,
    },
    /// A run of zero pages: a cursor would never claim anything.
    EmptyRun,
    /// A share of zero cursor claims per linear step: cursors would never be served.
    EmptyShare,
}

impl fmt::Display for StreamPolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoStreams => f.write_str("a stream policy needs at least one stream"),
            Self::TooManyStreams { streams } => {
                write!(f, "{streams} streams: at most {MAX_STREAMS}")
            }
            Self::EmptyRun => f.write_str("a cursor's run must be at least one page"),
            Self::EmptyShare => {
                f.write_str("cursors must get at least one claim per linear scan step")
            }
        }
    }
}

impl std::error::Error for StreamPolicyError {}

impl StreamPolicy {
    /// Target pages a cursor may claim after each fault, by default: 2048 (8 MiB of 4 KiB
    /// pages). Chosen with the sweep of `tests/streams_demo.rs` (see the README): runs of 8 MiB
    /// did best there once a forward edge passes over chunks already on their way (4 MiB
    /// before), and a shorter run wastes less on a stream that stopped.
    pub const DEFAULT_RUN: u64 = 2048;
    /// Cursor claims between two linear scan steps, by default: 128 (the linear scan gets one
    /// step in 129 while cursors are live). That is a default run's claims in default chunks
    /// (2048 pages in [`ClaimBatch::DEFAULT`] chunks of 16), so a lone stream's run goes out
    /// without a linear step in between and is then handed to the linear scan: one stream is
    /// followed as one slot follows it. A smaller share costs link-bound streams most (the
    /// sweep of `tests/streams_demo.rs`).
    ///
    /// [`ClaimBatch::DEFAULT`]: crate::ClaimBatch::DEFAULT
    pub const DEFAULT_SHARE: u32 = 128;

    /// `streams` streams (1 to [`MAX_STREAMS`]) with the default run and share.
    pub fn new(streams: u32) -> Result<Self, StreamPolicyError> {
        if streams == 0 {
            return Err(StreamPolicyError::NoStreams);
        }
        if streams > MAX_STREAMS {
            return Err(StreamPolicyError::TooManyStreams { streams });
        }
        Ok(Self {
            streams,
            run: Self::DEFAULT_RUN,
            share: Self::DEFAULT_SHARE,
        })
    }

    /// The same policy with cursors claiming up to `pages` target pages after each fault (the
    /// last claim of a run may take it past `pages` by less than one claim).
    pub fn with_run(self, pages: u64) -> Result<Self, StreamPolicyError> {
        if pages == 0 {
            return Err(StreamPolicyError::EmptyRun);
        }
        Ok(Self { run: pages, ..self })
    }

    /// The same policy with at most `claims` cursor claims between two linear scan steps.
    pub fn with_share(self, claims: u32) -> Result<Self, StreamPolicyError> {
        if claims == 0 {
            return Err(StreamPolicyError::EmptyShare);
        }
        Ok(Self {
            share: claims,
            ..self
        })
    }

    /// Number of streams (and of hint slots).
    pub fn streams(self) -> u32 {
        self.streams
    }
    /// Target pages a cursor may claim after each fault.
    pub fn run(self) -> u64 {
        self.run
    }
    /// Cursor claims between two linear scan steps.
    pub fn share(self) -> u32 {
        self.share
    }
}

/// Where a background claim came from
/// ([`BackgroundScanner::last_source`](crate::BackgroundScanner::last_source)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimSource {
    /// The linear scan (in one-slot mode, also the scan continuing after a hint).
    Linear,
    /// The cursor following this stream.
    Stream(u32),
}

/// A stream id at or above the configured count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamError {
    /// The stream asked for.
    pub stream: u32,
    /// How many streams there are.
    pub streams: u32,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no stream {} (the scheduler has {})",
            self.stream, self.streams
        )
    }
}

impl std::error::Error for StreamError {}

/// What the background path did for one stream (a snapshot; exact when quiescent, as
/// [`SchedulerStats`](crate::SchedulerStats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStats {
    /// Hints taken from the stream's slot.
    pub hints_taken: u64,
    /// Taken hints below the stream's previous one, followed by bubbling both ways.
    pub backward_hints: u64,
    /// Claims made by the stream's cursors.
    pub cursor_claims: u64,
    /// Target pages the stream's cursors claimed (whole host pages).
    pub cursor_pages: u64,
    /// Runs that ended because their budget was spent (the others hit clean or taken pages,
    /// or a block's edge, or were renewed by a newer hint).
    pub runs_spent: u64,
}

/// One stream's shared counters.
#[derive(Default)]
pub(crate) struct StreamCounters {
    hints_taken: StatCounter,
    backward_hints: StatCounter,
    cursor_claims: StatCounter,
    cursor_pages: StatCounter,
    runs_spent: StatCounter,
}

impl StreamCounters {
    fn fields(&self) -> [&StatCounter; 5] {
        [
            &self.hints_taken,
            &self.backward_hints,
            &self.cursor_claims,
            &self.cursor_pages,
            &self.runs_spent,
        ]
    }
}

/// A scanner's unpublished counts for one stream (plain integers, owned by one thread).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct LocalStreamCounts {
    pub(crate) hints_taken: u64,
    pub(crate) backward_hints: u64,
    pub(crate) cursor_claims: u64,
    pub(crate) cursor_pages: u64,
    pub(crate) runs_spent: u64,
}

impl LocalStreamCounts {
    /// Adds the counts to `to` and zeroes them.
    pub(crate) fn publish(&mut self, to: &StreamCounters) {
        let c = std::mem::take(self);
        let values = [
            c.hints_taken,
            c.backward_hints,
            c.cursor_claims,
            c.cursor_pages,
            c.runs_spent,
        ];
        for (counter, n) in to.fields().into_iter().zip(values) {
            if n != 0 {
                // Relaxed: statistics, exact only when quiescent.
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// One [`PageHint`] slot per stream, each on its own cache line, with the streams' counters.
///
/// Dereferences to stream 0's slot, the one-stream API's hint.
///
/// ```
/// use pagehint::{hint::Offer, streams::HintSlots, PageLocation};
/// let slots = HintSlots::new(2)?;
/// let (a, b) = (PageLocation::new(0, 10), PageLocation::new(0, 900));
/// assert_eq!(slots.slot(0)?.offer(a)?, Offer::Accepted);
/// assert_eq!(slots.slot(1)?.offer(b)?, Offer::Accepted); // stream 0's pending hint is not in the way
/// assert_eq!(slots.slot(1)?.offer(a)?, Offer::Pending); // set-if-empty, per slot
/// assert_eq!(slots.take(), Some(a)); // `HintSlots` derefs to stream 0's slot
/// assert_eq!(slots.slot(1)?.take(), Some(b));
/// assert!(slots.slot(2).is_err()); // a typed error, nothing touched
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct HintSlots {
    /// Stream 0's slot, inline: the one-slot scheduler's hint, exactly as before.
    first: CachePadded<PageHint>,
    /// Streams 1.. .
    rest: Box<[CachePadded<PageHint>]>,
    counters: Box<[StreamCounters]>,
}

impl HintSlots {
    /// `streams` empty slots (1 to [`MAX_STREAMS`]).
    pub fn new(streams: u32) -> Result<Self, StreamPolicyError> {
        Ok(Self::sized(StreamPolicy::new(streams)?.streams()))
    }

    /// `streams` empty slots; `streams` comes from a [`StreamPolicy`] (or is 1).
    pub(crate) fn sized(streams: u32) -> Self {
        Self {
            first: CachePadded::new(PageHint::new()),
            rest: (1..streams)
                .map(|_| CachePadded::new(PageHint::new()))
                .collect(),
            counters: (0..streams.max(1))
                .map(|_| StreamCounters::default())
                .collect(),
        }
    }

    /// Number of streams (slots).
    pub fn len(&self) -> u32 {
        self.rest.len() as u32 + 1
    }

    /// Always false: there is at least one slot. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `Ok` if `stream` names a slot.
    pub fn check(&self, stream: u32) -> Result<(), StreamError> {
        if stream < self.len() {
            Ok(())
        } else {
            Err(StreamError {
                stream,
                streams: self.len(),
            })
        }
    }

    /// Stream `stream`'s slot.
    #[inline]
    pub fn slot(&self, stream: u32) -> Result<&PageHint, StreamError> {
        self.check(stream)?;
        Ok(self.at(stream as usize))
    }

    /// Slot `i`, which must exist.
    #[inline]
    pub(crate) fn at(&self, i: usize) -> &PageHint {
        match i.checked_sub(1) {
            None => &self.first,
            Some(r) => &self.rest[r],
        }
    }

    /// Drops every pending hint (a new migration, or recovery after a cut).
    pub fn clear(&self) {
        self.first.clear();
        self.rest.iter().for_each(|s| s.clear());
    }

    /// Stream `stream`'s counters.
    pub fn stats(&self, stream: u32) -> Result<StreamStats, StreamError> {
        self.check(stream)?;
        // Relaxed: statistics, exact only when quiescent.
        let [t, b, c, p, r] = self.counters[stream as usize]
            .fields()
            .map(|f| f.load(Ordering::Relaxed));
        Ok(StreamStats {
            hints_taken: t,
            backward_hints: b,
            cursor_claims: c,
            cursor_pages: p,
            runs_spent: r,
        })
    }

    /// Zeroes every stream's counters.
    pub(crate) fn reset_counters(&self) {
        for c in self.counters.iter() {
            for f in c.fields() {
                // Relaxed: statistics; reset happens between migrations.
                f.store(0, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn counters(&self, i: usize) -> &StreamCounters {
        &self.counters[i]
    }
}

impl Deref for HintSlots {
    type Target = PageHint;
    /// Stream 0's slot.
    fn deref(&self) -> &PageHint {
        &self.first
    }
}

impl fmt::Debug for HintSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pending: Vec<_> = (0..self.len() as usize)
            .filter_map(|i| self.at(i).peek().map(|loc| (i, loc)))
            .collect();
        f.debug_struct("HintSlots")
            .field("streams", &self.len())
            .field("pending", &pending)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hint::Offer;
    use crate::PageLocation;

    #[test]
    fn i8_policy_and_stream_ids_are_checked() {
        assert_eq!(StreamPolicy::new(0), Err(StreamPolicyError::NoStreams));
        assert_eq!(
            StreamPolicy::new(MAX_STREAMS + 1),
            Err(StreamPolicyError::TooManyStreams {
                streams: MAX_STREAMS + 1
            })
        );
        assert!(StreamPolicy::new(MAX_STREAMS).is_ok());
        let p = StreamPolicy::new(3).unwrap();
        assert_eq!(p.with_run(0), Err(StreamPolicyError::EmptyRun));
        assert_eq!(p.with_share(0), Err(StreamPolicyError::EmptyShare));
        let slots = HintSlots::new(3).unwrap();
        assert_eq!(
            slots.slot(3).unwrap_err(),
            StreamError {
                stream: 3,
                streams: 3
            }
        );
        assert!(slots.stats(u32::MAX).is_err());
        assert!(HintSlots::new(0).is_err());
    }

    #[test]
    fn i4_slots_are_independent_and_clear_drops_all() {
        let slots = HintSlots::new(3).unwrap();
        for s in 0..3 {
            let loc = PageLocation::new(0, u64::from(s));
            assert_eq!(slots.slot(s).unwrap().offer(loc), Ok(Offer::Accepted));
        }
        for s in 0..3 {
            assert_eq!(
                slots.slot(s).unwrap().peek(),
                Some(PageLocation::new(0, u64::from(s)))
            );
        }
        slots.clear();
        assert!((0..3).all(|s| slots.slot(s).unwrap().peek().is_none()));
    }

    #[test]
    fn counters_publish_and_reset() {
        let slots = HintSlots::new(2).unwrap();
        let mut local = LocalStreamCounts {
            hints_taken: 2,
            cursor_claims: 3,
            cursor_pages: 48,
            ..LocalStreamCounts::default()
        };
        local.publish(slots.counters(1));
        assert_eq!(local.hints_taken, 0, "published counts are zeroed");
        let s = slots.stats(1).unwrap();
        assert_eq!((s.hints_taken, s.cursor_claims, s.cursor_pages), (2, 3, 48));
        assert_eq!(slots.stats(0).unwrap(), StreamStats::default());
        slots.reset_counters();
        assert_eq!(slots.stats(1).unwrap(), StreamStats::default());
    }
}
