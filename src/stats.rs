//! Counters a VMM exports: what each path sent, what the hint did, what was refused.
//!
//! Counters are relaxed and approximate while threads run; a snapshot taken when the
//! scheduler is quiescent is exact. The background scanner batches its counts locally and
//! publishes them every few claims, at the end of each round and when it is dropped, so the
//! hot loop does no shared read-modify-write for statistics.

use crate::sync::StatCounter;
use std::sync::atomic::Ordering;

/// A snapshot of a [`PageScheduler`](crate::PageScheduler)'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerStats {
    /// Page requests accepted (valid) by the urgent side, in any mode; a range request
    /// ([`PageScheduler::serve_range`](crate::PageScheduler::serve_range)) counts once.
    pub requests: u64,
    /// Requests refused as malformed, out of range, empty, or (through
    /// [`PageScheduler::serve`](crate::PageScheduler::serve)) covering several host pages.
    pub bad_requests: u64,
    /// Host pages queued for the background path (vanilla mode): one per request of
    /// `serve`, one per host page of a range request.
    pub requests_queued: u64,
    /// Queued requests the background path jumped to (their page was still dirty).
    pub queued_followed: u64,
    /// Queued requests the background path took off the queue and dropped because their host
    /// page was no longer dirty (already sent). Once the queue is drained,
    /// `queued_followed + queued_stale + queued_dropped == requests_queued`: no request is
    /// lost.
    pub queued_stale: u64,
    /// Queued requests dropped by [`PageScheduler::recover_block`](crate::PageScheduler::recover_block):
    /// they belonged to the broken connection (its destination asks again after the
    /// recovery if it still needs the page).
    pub queued_dropped: u64,
    /// Host pages claimed by the urgent path (through `serve` and `serve_range`).
    pub urgent_host_pages: u64,
    /// Target pages the urgent path sends (whole host pages).
    pub urgent_pages: u64,
    /// Requested host pages that were already claimed (by the background path, or sent).
    pub urgent_already_claimed: u64,
    /// Valid requests served through [`PageScheduler::serve_range`](crate::PageScheduler::serve_range).
    pub range_requests: u64,
    /// Host pages those range requests reported so far (each counted in `urgent_host_pages`,
    /// `urgent_already_claimed` or `requests_queued` as well).
    pub range_host_pages: u64,
    /// Claims made by background scanners.
    pub background_claims: u64,
    /// Host pages claimed by background scanners.
    pub background_host_pages: u64,
    /// Target pages background scanners send (whole host pages).
    pub background_pages: u64,
    /// Background claims that found their chunk already taken by the urgent path.
    pub background_claims_lost: u64,
    /// Hints offered by the urgent path.
    pub hints_offered: u64,
    /// Offers accepted (the cell was empty).
    pub hints_accepted: u64,
    /// Offers refused because a hint was pending.
    pub hints_refused_pending: u64,
    /// Hints taken by background scanners.
    pub hints_taken: u64,
    /// Completed background rounds (a full sweep found nothing left to claim).
    pub rounds: u64,
}

macro_rules! counters {
    ($name:ident { $($field:ident),* $(,)? }) => {
        /// Shared counters, one relaxed atomic each.
        #[derive(Default)]
        pub(crate) struct $name { $(pub(crate) $field: StatCounter,)* }

        impl $name {
            /// Copies the counters into `out`.
            pub(crate) fn read_into(&self, out: &mut SchedulerStats) {
                // Relaxed: statistics, exact only when quiescent.
                $(out.$field = self.$field.load(Ordering::Relaxed);)*
            }
            /// Zeroes the counters.
            pub(crate) fn reset(&self) {
                // Relaxed: statistics; reset happens between migrations.
                $(self.$field.store(0, Ordering::Relaxed);)*
            }
        }
    };
}

// `requests` and `hints_offered` are not counted: they are sums of other counters (see
// `PageScheduler::stats`), which saves two locked instructions per urgent request.
counters!(UrgentCounters {
    bad_requests,
    requests_queued,
    urgent_host_pages,
    urgent_pages,
    urgent_already_claimed,
    range_requests,
    range_host_pages,
    hints_accepted,
    hints_refused_pending,
});

counters!(BackgroundCounters {
    queued_followed,
    queued_stale,
    queued_dropped,
    background_claims,
    background_host_pages,
    background_pages,
    background_claims_lost,
    hints_taken,
    rounds,
});

/// A scanner's unpublished counts (plain integers, owned by one thread).
#[derive(Default, Debug)]
pub(crate) struct LocalCounts {
    pub(crate) queued_followed: u64,
    pub(crate) queued_stale: u64,
    pub(crate) claims: u64,
    pub(crate) host_pages: u64,
    pub(crate) pages: u64,
    pub(crate) lost: u64,
    pub(crate) hints_taken: u64,
    pub(crate) rounds: u64,
}

impl LocalCounts {
    /// Adds the local counts to the shared counters and zeroes them.
    pub(crate) fn publish(&mut self, to: &BackgroundCounters) {
        let c = std::mem::take(self);
        for (counter, n) in [
            (&to.queued_followed, c.queued_followed),
            (&to.queued_stale, c.queued_stale),
            (&to.background_claims, c.claims),
            (&to.background_host_pages, c.host_pages),
            (&to.background_pages, c.pages),
            (&to.background_claims_lost, c.lost),
            (&to.hints_taken, c.hints_taken),
            (&to.rounds, c.rounds),
        ] {
            if n != 0 {
                // Relaxed: statistics, exact only when quiescent.
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Adds one to a shared counter.
#[inline]
pub(crate) fn bump(c: &StatCounter, n: u64) {
    // Relaxed: statistics, exact only when quiescent.
    c.fetch_add(n, Ordering::Relaxed);
}
