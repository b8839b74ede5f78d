//! Several fault streams at the scheduler ([`HintPolicy::PerStream`]): requests that name
//! their stream, and the background scanner's cursors ([`crate::cursors`]) wired into its
//! steps. The slots are [`crate::streams`]; the scan policy and its invariants are
//! [`crate::cursors`]. The one-stream API is stream 0: [`PageScheduler::serve`] and
//! [`PageScheduler::urgent_sent`] behave as `serve_from(0, ..)` and `urgent_sent_from(0, ..)`
//! without the stream check.
//!
//! A stream id is checked before anything else happens: one at or above the count is a
//! [`StreamError`], counted as a bad request, and changes no other state (I8).

use super::{
    BackgroundScanner, Claim, Cursors, HintPolicy, HintSlots, Mode, Offer, PageScheduler,
    RequestError, SchedulerConfig, Served, UrgentRequest,
};
use crate::stats::bump;
use crate::streams::{ClaimSource, StreamError, StreamStats};

impl From<StreamError> for RequestError {
    fn from(e: StreamError) -> Self {
        Self::Stream(e)
    }
}

impl PageScheduler {
    /// The hint slots, one per stream; stream 0's is [`hint`](Self::hint).
    pub fn hint_slots(&self) -> &HintSlots {
        &self.hint
    }

    /// Fault streams (hint slots): 1 unless the hint policy is [`HintPolicy::PerStream`].
    pub fn streams(&self) -> u32 {
        self.hint.len()
    }

    /// [`serve`](Self::serve) for a request of stream `stream` (a vCPU, say). A stream id at
    /// or above [`streams`](Self::streams) is refused with [`RequestError::Stream`] and
    /// counted as a bad request, before anything else is looked at (I8).
    ///
    /// ```
    /// use pagehint::{PageScheduler, RamLayout, RequestError, SchedulerConfig, Served, UrgentRequest};
    /// let sched = PageScheduler::new(RamLayout::single("m", 1 << 20, 4096)?, SchedulerConfig::preempt_hints(2)?)?;
    /// sched.bitmap().mark_all();
    /// let req = UrgentRequest::new(0, 0x8000, 4096);
    /// assert!(matches!(sched.serve_from(2, req), Err(RequestError::Stream(_))));
    /// assert_eq!(sched.stats().bad_requests, 1);
    /// assert_eq!(sched.bitmap().dirty_pages(), 256); // nothing claimed
    /// if let Served::Send(claim) = sched.serve_from(1, req)? {
    ///     sched.urgent_sent_from(1, &claim)?; // stream 1's hint: page 9
    /// }
    /// assert_eq!(sched.hint_slots().slot(1)?.peek(), Some(pagehint::PageLocation::new(0, 9)));
    /// assert_eq!(sched.hint().peek(), None); // stream 0's slot is untouched
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "Served::Send owns pages that have left the dirty bitmap: send them and call urgent_sent_from, or they are lost"]
    pub fn serve_from(&self, stream: u32, req: UrgentRequest) -> Result<Served, RequestError> {
        if let Err(e) = self.hint.check(stream) {
            bump(&self.urgent.bad_requests, 1);
            return Err(e.into());
        }
        self.serve(req)
    }

    /// [`urgent_sent`](Self::urgent_sent) for a claim of stream `stream`: with hints on, offers
    /// the location right after it into the stream's slot (set-if-empty: another stream's
    /// pending hint is never in the way) and says what became of the offer. A stream id at
    /// or above [`streams`](Self::streams) is refused and counted as a bad request (I8).
    pub fn urgent_sent_from(
        &self,
        stream: u32,
        claim: &Claim,
    ) -> Result<Option<Offer>, StreamError> {
        match self.hint.slot(stream) {
            Ok(slot) => Ok(self.offer_after(slot, claim)),
            Err(e) => {
                bump(&self.urgent.bad_requests, 1);
                Err(e)
            }
        }
    }

    /// What the background path did for stream `stream` (exact when quiescent and every
    /// scanner has been dropped or has finished a round).
    pub fn stream_stats(&self, stream: u32) -> Result<StreamStats, StreamError> {
        self.hint.stats(stream)
    }

    /// The cursors of a new scanner: per-stream hints in preempt mode only.
    pub(super) fn new_cursors(&self) -> Option<Box<Cursors>> {
        match self.config {
            SchedulerConfig {
                mode: Mode::Preempt,
                hint: HintPolicy::PerStream(policy),
                ..
            } => Some(Box::new(Cursors::new(policy))),
            _ => None,
        }
    }
}

impl BackgroundScanner<'_> {
    /// Where the last claim came from: the linear scan, or the cursor following a stream.
    /// Always [`ClaimSource::Linear`] outside per-stream mode.
    pub fn last_source(&self) -> ClaimSource {
        self.cursors
            .as_deref()
            .map_or(ClaimSource::Linear, Cursors::source)
    }

    /// Streams whose cursor is live (following a recent fault) in this scanner.
    pub fn live_cursors(&self) -> usize {
        self.cursors.as_deref().map_or(0, Cursors::live)
    }

    /// Per-stream mode's follow: takes every pending hint into its stream's cursor, and moves
    /// the linear scan to where a forward run was spent (a jump: its clean count restarts,
    /// I3; see [`crate::cursors`]).
    #[inline]
    pub(super) fn follow_streams(&mut self) {
        let sched = self.sched;
        let Some(c) = self.cursors.as_deref_mut() else {
            return;
        };
        self.local.hints_taken += c.poll(
            &sched.hint,
            &sched.layout,
            &sched.bitmap,
            sched.config.batch.shift,
        );
        if let Some(to) = c.take_handoff() {
            self.jump(to);
        }
    }

    /// The cursors' turn (see [`crate::cursors`]): a cursor's claim, or `None` when the
    /// linear scan takes this step (always, outside per-stream mode).
    #[inline]
    pub(super) fn cursor_turn(&mut self) -> Option<Claim> {
        let sched = self.sched;
        self.cursors
            .as_deref_mut()?
            .turn(&sched.bitmap, sched.config.batch.shift)
    }
}
