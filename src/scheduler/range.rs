//! The urgent path for a request covering several host pages: [`ServeRange`].
//!
//! # Protocol
//! The range is checked whole before anything is claimed (I8). Then, one step per
//! [`Iterator::next`] call that needs one, from the first host page of the range to the end
//! of its last:
//! * **preempt**: a step claims the range's host pages in one bitmap word with one masked
//!   acquire `fetch_and` (narrow host pages) or one wide host page through its summary
//!   election (the bitmap's `claim_span`) — the same claims the
//!   background path and [`PageScheduler::serve`] make, so each dirty host page goes to exactly
//!   one of them (I1) and whole (I2). The won host pages come as one [`Served::Send`], each
//!   other host page of the step as [`Served::AlreadyClaimed`] (it was clean: claimed by
//!   another path, or sent).
//! * **vanilla**: each host page is queued for the background path, as `serve` queues one.
//!
//! # Invariants
//! * every host page of the range is reported exactly once, in address order of the steps;
//! * nothing outside the range is claimed or queued (a claim mask never leaves the range's
//!   host pages);
//! * counters: each outcome is counted as `serve` counts it, and in `range_host_pages`, so
//!   that `requests` counts the range once.

use std::fmt;

use super::{CheckedRequest, Mode, PageScheduler, Served};
use crate::layout::HostPage;
use crate::stats::bump;

/// The outcomes of [`PageScheduler::serve_range`]: every host page of the request, claimed
/// (or queued) as the iterator is advanced. See the method for the return-path loop.
#[must_use = "the range is served as the iterator is advanced: iterate it, send each Served::Send claim and call urgent_sent"]
pub struct ServeRange<'a> {
    sched: &'a PageScheduler,
    block: u32,
    host_shift: u32,
    /// The first page of the next host page to serve.
    next: u64,
    /// The end of the range's last host page.
    end: u64,
    /// Host pages of the last step that were not won, relative to `lost_base`, still to report.
    lost: u64,
    lost_base: u64,
}

impl<'a> ServeRange<'a> {
    pub(super) fn new(sched: &'a PageScheduler, req: CheckedRequest) -> Self {
        bump(&sched.urgent.range_requests, 1);
        let shift = req.host_shift;
        Self {
            sched,
            block: req.first.block,
            host_shift: shift,
            next: (req.first.page >> shift) << shift,
            end: ((req.last_page >> shift) + 1) << shift,
            lost: 0,
            lost_base: 0,
        }
    }

    /// Host pages of the range not reported yet.
    pub fn remaining_host_pages(&self) -> u64 {
        u64::from(self.lost.count_ones()) + ((self.end - self.next) >> self.host_shift)
    }

    fn host_page(&self, first_page: u64) -> HostPage {
        HostPage {
            block: self.block,
            first_page,
            pages: 1 << self.host_shift,
        }
    }

    /// The next host page of the last step that was already claimed.
    fn take_lost(&mut self) -> Option<Served> {
        if self.lost == 0 {
            return None;
        }
        let i = u64::from(self.lost.trailing_zeros());
        self.lost &= self.lost - 1;
        let hp = self.host_page(self.lost_base + (i << self.host_shift));
        let urgent = &self.sched.urgent;
        bump(&urgent.urgent_already_claimed, 1);
        bump(&urgent.range_host_pages, 1);
        Some(Served::AlreadyClaimed(hp))
    }

    /// One preempt step: claims what is dirty of the next word (or wide host page).
    fn claim_step(&mut self) -> Option<Served> {
        let from = self.next;
        let (claim, step_end) = self.sched.bitmap.claim_span(self.block, from, self.end);
        self.next = step_end;
        // Host pages of the step, as a mask relative to `from` (at most 64 of them).
        let steps = (step_end - from) >> self.host_shift;
        let all = if steps >= 64 { !0 } else { (1 << steps) - 1 };
        let won = claim.as_ref().map_or(0, |c| c.host_mask());
        self.lost = all & !won;
        self.lost_base = from;
        match claim {
            Some(claim) => {
                let urgent = &self.sched.urgent;
                let host_pages = u64::from(claim.host_page_count());
                bump(&urgent.urgent_host_pages, host_pages);
                bump(&urgent.urgent_pages, claim.pages_to_send());
                bump(&urgent.range_host_pages, host_pages);
                Some(Served::Send(claim))
            }
            None => self.take_lost(),
        }
    }

    /// One vanilla step: queues the next host page.
    fn queue_step(&mut self) -> Served {
        let hp = self.host_page(self.next);
        self.next += hp.pages;
        self.sched
            .queue
            .push(crate::PageLocation::new(hp.block, hp.first_page));
        let urgent = &self.sched.urgent;
        bump(&urgent.requests_queued, 1);
        bump(&urgent.range_host_pages, 1);
        Served::Queued(hp)
    }
}

impl Iterator for ServeRange<'_> {
    type Item = Served;

    fn next(&mut self) -> Option<Served> {
        if let Some(lost) = self.take_lost() {
            return Some(lost);
        }
        if self.next >= self.end {
            return None;
        }
        match self.sched.config.mode {
            Mode::Preempt => self.claim_step(),
            Mode::Vanilla => Some(self.queue_step()),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // At least one outcome per step left, at most one per host page left.
        let left = usize::try_from(self.remaining_host_pages()).unwrap_or(usize::MAX);
        (left.min(1), Some(left))
    }
}

impl std::iter::FusedIterator for ServeRange<'_> {}

impl fmt::Debug for ServeRange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeRange")
            .field("block", &self.block)
            .field("next_page", &self.next)
            .field("end_page", &self.end)
            .field("remaining_host_pages", &self.remaining_host_pages())
            .finish()
    }
}
