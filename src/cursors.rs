//! Following several fault streams: one cursor per stream, served in turn beside the linear
//! scan (a background scanner in [`HintPolicy::PerStream`] mode).
//!
//! # Protocol
//! A background scanner in per-stream mode keeps its linear scan position and, beside it, one
//! *cursor* per stream ([`HintSlots`]: one hint slot per stream).
//! * **Poll**: before each step the scanner takes every pending hint (one relaxed load per
//!   slot, a swap only for a pending one). A hint taken from slot `s` (re)starts stream `s`'s
//!   cursor there with a fresh *run*: a budget of [`StreamPolicy::run`] target pages.
//!   A hint inside what the live run has already claimed forward (from where the run started
//!   up to its forward edge) *continues* the run instead: the stream faulted on a page its own
//!   cursor has on the way; the cursor keeps its edges and takes a fresh budget from there,
//!   where a restart at the hint would spend the new run passing over what is already on its
//!   way.
//! * **Direction**: a hint in the same block below the stream's previous one, by at most one
//!   run, means the stream runs backward; its cursor then *bubbles* both ways from the fault
//!   (Hines, Deshpande and Gopalan, 2009), alternating a claim above with a claim below.
//!   Otherwise it runs forward: a stream that jumps back further than a run reaches (a
//!   reader starting its window again, a new file) starts a new forward pass; bubbling there
//!   would spend half its claims below a reader that never goes there.
//! * **Turns**: a turn is one claim. While cursors are live, turns go to them in round robin
//!   (in stream order, starting after the stream served last), and after
//!   [`StreamPolicy::share`] cursor claims the linear scan takes one step; when no cursor is
//!   live, the linear scan takes every step.
//! * **A cursor step** claims the chunk at the cursor's edge (the chunk the linear scan would
//!   claim there: [`ClaimBatch`] pages, whole host pages), without searching further. A
//!   forward edge whose chunk has nothing to claim (taken already: by the linear scan, the
//!   urgent path, another cursor, or this stream's own earlier run, all on their way) passes
//!   over it, counting its pages against the run: the stream reads on behind them, as one
//!   slot's scan searches on from its hint past claimed pages. A bubbling run's edges retire
//!   there instead (that side of a backward stream is on its way; the rest of the run goes to
//!   the other side). A cursor *retires* when its run is spent, when both edges have retired,
//!   or at its block's edge; the linear scan goes on meanwhile.
//! * **Hand-off**: when a run is spent by a claim with its forward edge still inside the block, the stream
//!   had more to read there: the linear scan *jumps* to that edge (as a one-slot scanner jumps
//!   to a hint), so that a lone stream is followed as far as one slot would follow it.
//!
//! # Invariants
//! * **I1/I2**: cursors claim only through the bitmap, with the linear scan's own chunk claim
//!   (whole host pages, each bit to one claimer).
//! * **I3, whatever the cursors do**: a cursor never adds to the linear scan's count of pages
//!   verified clean, and moves the linear scan only by a hand-off, which is a jump: the count
//!   restarts, exactly as after a one-slot hint. "Done" is still decided by the linear scan
//!   alone, when its contiguous sweep since its last jump covers the layout, and in postcopy a
//!   page it verified stays clean whatever a cursor claims later (claims only clear bits). So
//!   no sequence of cursor starts, switches, retirements and hand-offs can make a false "done".
//!   A hand-off that kept the count would skip the pages between the old position and the
//!   edge: the models' `JumpKeepsCount` mutant, caught by their I3 check (and a cursor whose
//!   claims counted as verified, Spin's `MUT_CURSOR_COUNTS`).
//! * **I5, progress**: between two linear steps there are at most `share` cursor claims, and
//!   each linear step advances the sweep; every hand-off follows a run spent by a claim, at
//!   most one per hint taken, so in postcopy there are finitely many jumps and the round ends
//!   (after the last one, within `share + 1` times the steps of a plain linear round). A
//!   cursor claims, or passes over, at most `run` target pages (plus less than one chunk) per
//!   hint taken (a continued run included: each continuation is a hint taken), so cursors
//!   stop when faults stop and a turn's steps without a claim are bounded. In round robin a
//!   live cursor waits at most for every other live cursor's claim and one linear step: no
//!   stream starves another. Each of the three bounds has a mutant in the models (`NeverYields`,
//!   `NeverRetired`, `KeepsTurn`).
//! * **I6**: a hint only starts a cursor; a location outside the layout is taken, counted and
//!   ignored.
//!
//! [`HintPolicy::PerStream`]: crate::HintPolicy::PerStream
//! [`ClaimBatch`]: crate::ClaimBatch

use crate::bitmap::{Claim, DirtyBitmap};
use crate::layout::{PageLocation, RamLayout};
use crate::streams::{ClaimSource, HintSlots, LocalStreamCounts, StreamPolicy};

/// One stream's cursor.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    block: u32,
    /// The forward edge: the next forward claim takes the chunk holding this page.
    fwd: u64,
    /// The backward edge: the next backward claim takes the chunk holding `back - 1`.
    back: u64,
    fwd_live: bool,
    back_live: bool,
    /// Bubbling: the next claim goes below.
    next_back: bool,
    /// The run bubbles (the stream runs backward): an edge with nothing to claim retires.
    bubbling: bool,
    /// Target pages the run may still claim.
    budget: u64,
    /// Where the run started (its hint): the run has claimed `first..fwd` forward.
    first: u64,
    /// A hint far from the live run, its chunk claimed at the cursor's next step (a detour:
    /// the run goes on after it).
    detour: Option<PageLocation>,
    /// The stream's last hint was a detour: a second far hint in a row moves the run there.
    detoured: bool,
    /// The stream's previous hint, for its direction.
    prev: Option<PageLocation>,
}

/// What a hint did to its stream's cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Started {
    /// A new forward run.
    Forward,
    /// A new run bubbling both ways (the stream runs backward).
    Backward,
    /// Inside what the live run claimed: the run goes on with a fresh budget.
    Continued,
    /// Far from the live run: one chunk there, then the run goes on.
    Detour,
}

/// What one cursor step did.
struct Step {
    claim: Option<Claim>,
    /// The step spent the run's budget by a claim with the forward edge still inside the
    /// block: where the linear scan takes over.
    spent_at: Option<PageLocation>,
    /// The step spent the run's budget.
    spent: bool,
}

impl Step {
    /// A step that left the run's budget as it was.
    fn unspent(claim: Option<Claim>) -> Self {
        Self {
            claim,
            spent_at: None,
            spent: false,
        }
    }
}

impl Cursor {
    fn live(&self) -> bool {
        self.fwd_live || self.back_live || self.detour.is_some()
    }

    /// Whether `h` lies within a run's reach of the live run (same block, from a run below
    /// its backward edge, which is never above where it started, to a run above its forward
    /// edge).
    fn near(&self, h: PageLocation, run: u64) -> bool {
        let low = self.back.saturating_sub(run);
        h.block == self.block && (low..=self.fwd.saturating_add(run)).contains(&h.page)
    }

    /// A new run from hint `h` (a page of the layout; the page right after the faulted host
    /// page of `host_shift`), claiming chunks of `chunk_shift`. Returns whether the stream
    /// runs backward (the run bubbles both ways): the hint lies below the previous one, in
    /// its block, within one run (a backward reader's next fault comes right under what the
    /// last run bubbled down to; a jump back further is a new forward pass).
    fn start(&mut self, h: PageLocation, run: u64, host_shift: u32, chunk_shift: u32) -> Started {
        // Inside what the live run has claimed forward: the run goes on from its edges.
        if self.fwd_live && h.block == self.block && (self.first..self.fwd).contains(&h.page) {
            self.prev = Some(h);
            self.budget = run;
            self.detoured = false;
            return Started::Continued;
        }
        // Far from a live run, once: a detour (one chunk there), the run goes on. A second
        // far hint in a row means the stream has moved: a new run there.
        if (self.fwd_live || self.back_live) && !self.detoured && !self.near(h, run) {
            self.detour = Some(h);
            self.detoured = true;
            return Started::Detour;
        }
        self.detoured = false;
        self.detour = None;
        let backward = self
            .prev
            .is_some_and(|p| p.block == h.block && h.page < p.page && p.page - h.page <= run);
        self.prev = Some(h);
        self.block = h.block;
        self.fwd = h.page;
        self.first = h.page;
        self.fwd_live = true;
        // The backward edge starts where the forward edge's first chunk does not reach:
        // below that chunk if the hint is inside one; below the faulted host page if chunks
        // are host pages (the chunk below the hint is the faulted page itself); else below
        // the chunk ending at the hint (it holds the faulted page and the pages under it).
        let chunk = 1u64 << chunk_shift;
        self.back = if h.page % chunk != 0 {
            h.page - h.page % chunk
        } else if chunk_shift > host_shift {
            h.page
        } else {
            h.page.saturating_sub(chunk)
        };
        self.back_live = backward && self.back > 0;
        self.bubbling = backward;
        self.next_back = false;
        self.budget = run;
        if backward {
            Started::Backward
        } else {
            Started::Forward
        }
    }

    /// One step: a pending detour's chunk, else one claim at an edge (forward first, then
    /// alternating while both are live). A forward edge with nothing to claim passes over
    /// the chunk; a bubbling run's edge retires there; either way the step claims nothing.
    fn step(&mut self, bitmap: &DirtyBitmap, batch_shift: u32) -> Step {
        if let Some(d) = self.detour.take() {
            // The detour's chunk (nothing if it is already on its way), outside the run's
            // budget: one chunk per hint taken.
            return Step::unspent(bitmap.claim_chunk_at(d.block, d.page, batch_shift).claim);
        }
        let below = self.back_live && (self.next_back || !self.fwd_live);
        let at = if below { self.back - 1 } else { self.fwd };
        let st = bitmap.claim_chunk_at(self.block, at, batch_shift);
        let Some(claim) = st.claim else {
            // Clean, or taken by another claimer: this part of the stream is on its way.
            if self.bubbling {
                // Bubbling around a backward stream: that side of it is on its way; this edge
                // retires (the rest of the run goes to the other side).
                if below {
                    self.back_live = false;
                } else {
                    self.fwd_live = false;
                }
                return Step::unspent(None);
            }
            // Forward: the stream reads on past them; pass over the chunk within the run.
            self.fwd = st.end;
            self.fwd_live = !st.block_end;
            return self.spend(st.end - st.first, None);
        };
        if below {
            self.back = st.first;
            self.back_live = st.first > 0;
        } else {
            self.fwd = st.end;
            self.fwd_live = !st.block_end;
        }
        self.next_back = !below;
        self.spend(st.end - st.first, Some(claim))
    }

    /// Counts `pages` (claimed, or passed over) against the run; a spent run retires both
    /// edges and, if it was spent by a claim with its forward edge inside the block, says
    /// where the linear scan takes over. A run spent passing over taken chunks hands nothing
    /// off: what it passed is on its way, and the linear scan, which may have taken it,
    /// goes on where it is.
    fn spend(&mut self, pages: u64, claim: Option<Claim>) -> Step {
        self.budget = self.budget.saturating_sub(pages);
        let spent = self.budget == 0;
        let spent_at = (spent && self.fwd_live && claim.is_some())
            .then(|| PageLocation::new(self.block, self.fwd));
        if spent {
            self.fwd_live = false;
            self.back_live = false;
        }
        Step {
            claim,
            spent_at,
            spent,
        }
    }
}

/// A scanner's cursors, one per stream, and its turn bookkeeping (owned by one scanner).
pub(crate) struct Cursors {
    run: u64,
    share: u32,
    cursors: Box<[Cursor]>,
    local: Box<[LocalStreamCounts]>,
    /// Live cursors.
    live: usize,
    /// The stream served last (round robin starts after it).
    last: usize,
    /// Cursor claims since the linear scan's last step.
    since_linear: u32,
    source: ClaimSource,
    /// Where the last forward run was spent: the linear scan continues there.
    handoff: Option<PageLocation>,
}

impl Cursors {
    pub(crate) fn new(policy: StreamPolicy) -> Self {
        let n = policy.streams() as usize;
        Self {
            run: policy.run(),
            share: policy.share(),
            cursors: vec![Cursor::default(); n].into_boxed_slice(),
            local: vec![LocalStreamCounts::default(); n].into_boxed_slice(),
            live: 0,
            last: n - 1,
            since_linear: 0,
            source: ClaimSource::Linear,
            handoff: None,
        }
    }

    /// Takes every pending hint and (re)starts its stream's cursor; returns the hints taken.
    #[inline]
    pub(crate) fn poll(
        &mut self,
        slots: &HintSlots,
        layout: &RamLayout,
        bitmap: &DirtyBitmap,
        batch_shift: u32,
    ) -> u64 {
        let mut taken = 0;
        for s in 0..self.cursors.len() {
            let Some(h) = slots.at(s).take() else {
                continue;
            };
            taken += 1;
            self.local[s].hints_taken += 1;
            // Any value is harmless (I6); one outside the layout is not followed.
            let Ok(b) = layout.check(h) else {
                continue;
            };
            let c = &mut self.cursors[s];
            let was_live = c.live();
            let chunk_shift = bitmap.chunk_shift(h.block, batch_shift);
            if c.start(h, self.run, b.host_page_shift(), chunk_shift) == Started::Backward {
                self.local[s].backward_hints += 1;
            }
            if !was_live {
                self.live += 1;
            }
        }
        taken
    }

    /// The cursors' turn: the next live cursor's claim, in round robin; `None` when no cursor
    /// is live, when every live one retired without claiming, or when the linear scan is due
    /// (after `share` cursor claims). The caller's linear scan takes the next step after a
    /// `None`.
    #[inline]
    pub(crate) fn turn(&mut self, bitmap: &DirtyBitmap, batch_shift: u32) -> Option<Claim> {
        if self.live == 0 || self.since_linear >= self.share {
            self.since_linear = 0;
            self.source = ClaimSource::Linear;
            return None;
        }
        let n = self.cursors.len();
        let mut s = self.last;
        for _ in 0..n {
            // The next stream in round robin (no division on this path).
            s = if s + 1 == n { 0 } else { s + 1 };
            while self.cursors[s].live() {
                let step = self.cursors[s].step(bitmap, batch_shift);
                if !self.cursors[s].live() {
                    self.live -= 1;
                }
                self.local[s].runs_spent += u64::from(step.spent);
                if step.spent_at.is_some() {
                    self.handoff = step.spent_at;
                }
                if let Some(claim) = step.claim {
                    let local = &mut self.local[s];
                    local.cursor_claims += 1;
                    local.cursor_pages += claim.pages_to_send();
                    self.last = s;
                    self.since_linear += 1;
                    self.source = ClaimSource::Stream(s as u32);
                    return Some(claim);
                }
            }
        }
        self.since_linear = 0;
        self.source = ClaimSource::Linear;
        None
    }

    /// Where the linear scan should continue: the forward edge of the last run spent since
    /// the previous call, if any (the scanner jumps there, restarting its clean count: I3).
    pub(crate) fn take_handoff(&mut self) -> Option<PageLocation> {
        self.handoff.take()
    }

    /// Where the last claim came from.
    pub(crate) fn source(&self) -> ClaimSource {
        self.source
    }

    /// Live cursors.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Adds the per-stream counts to the slots' shared counters.
    pub(crate) fn publish(&mut self, slots: &HintSlots) {
        for (i, local) in self.local.iter_mut().enumerate() {
            local.publish(slots.counters(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{BlockSpec, RamLayout};

    fn layout() -> RamLayout {
        RamLayout::new(
            4096,
            [
                BlockSpec::new("a", 256 * 4096, 4096),
                BlockSpec::new("huge", 8 * 512 * 4096, 512 * 4096),
            ],
        )
        .unwrap()
    }

    /// One stream over the test layout, every page dirty: the layout, bitmap, slot and
    /// cursors (runs of `run` pages; the linear scan's share out of the way).
    fn one_stream(run: u64) -> (RamLayout, DirtyBitmap, HintSlots, Cursors) {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_all();
        let slots = HintSlots::new(1).unwrap();
        let policy = StreamPolicy::new(1).unwrap().with_run(run).unwrap();
        (l, bm, slots, Cursors::new(policy.with_share(100).unwrap()))
    }

    fn pages(c: &Claim) -> Vec<u64> {
        c.host_pages().map(|hp| hp.first_page).collect()
    }

    #[test]
    fn forward_run_is_bounded_and_round_robin_alternates() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_all();
        let slots = HintSlots::new(2).unwrap();
        let policy = StreamPolicy::new(2)
            .unwrap()
            .with_run(32)
            .unwrap()
            .with_share(100)
            .unwrap();
        let mut c = Cursors::new(policy);
        slots
            .slot(0)
            .unwrap()
            .offer(PageLocation::new(0, 16))
            .unwrap();
        slots
            .slot(1)
            .unwrap()
            .offer(PageLocation::new(0, 128))
            .unwrap();
        assert_eq!(c.poll(&slots, &l, &bm, 4), 2);
        assert_eq!(c.live(), 2);
        let mut got = Vec::new();
        while let Some(claim) = c.turn(&bm, 4) {
            got.push((c.source(), pages(&claim)[0]));
        }
        assert_eq!(
            got,
            [
                (ClaimSource::Stream(0), 16),
                (ClaimSource::Stream(1), 128),
                (ClaimSource::Stream(0), 32),
                (ClaimSource::Stream(1), 144),
            ],
            "two chunks of 16 pages each (run 32), in turn"
        );
        assert_eq!(c.live(), 0);
        c.publish(&slots);
        let s = slots.stats(1).unwrap();
        assert_eq!(
            (s.hints_taken, s.cursor_claims, s.cursor_pages, s.runs_spent),
            (1, 2, 32, 1)
        );
    }

    #[test]
    fn linear_gets_a_step_after_share_claims() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_all();
        let slots = HintSlots::new(1).unwrap();
        let mut c = Cursors::new(StreamPolicy::new(1).unwrap().with_share(2).unwrap());
        slots.offer(PageLocation::new(0, 0)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        assert!(c.turn(&bm, 4).is_some());
        assert!(c.turn(&bm, 4).is_some());
        assert!(c.turn(&bm, 4).is_none(), "the linear scan's step");
        assert_eq!(c.source(), ClaimSource::Linear);
        assert!(c.turn(&bm, 4).is_some(), "then the cursor again");
    }

    #[test]
    fn a_forward_edge_passes_over_taken_chunks_within_its_run() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_range(0, 0, 40).unwrap();
        bm.mark_range(0, 240, 16).unwrap();
        let slots = HintSlots::new(1).unwrap();
        let mut c = Cursors::new(StreamPolicy::new(1).unwrap().with_share(100).unwrap());
        slots.offer(PageLocation::new(0, 20)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        assert_eq!(pages(&c.turn(&bm, 4).unwrap())[0], 16);
        assert_eq!(pages(&c.turn(&bm, 4).unwrap())[0], 32);
        // Pages 48..240 are clean (sent, or on their way): the edge passes over them (192
        // pages of its default run) and claims the block's last chunk, then retires there.
        assert_eq!(pages(&c.turn(&bm, 4).unwrap())[0], 240);
        assert_eq!(c.live(), 0, "the block's last chunk: retired at the edge");
        assert_eq!(
            c.take_handoff(),
            None,
            "nothing left in the block to hand off"
        );
    }

    #[test]
    fn a_run_spent_passing_over_taken_chunks_hands_nothing_off() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_range(0, 0, 40).unwrap();
        let slots = HintSlots::new(1).unwrap();
        let policy = StreamPolicy::new(1).unwrap().with_run(48).unwrap();
        let mut c = Cursors::new(policy.with_share(100).unwrap());
        slots.offer(PageLocation::new(0, 20)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        assert_eq!(pages(&c.turn(&bm, 4).unwrap())[0], 16);
        assert_eq!(pages(&c.turn(&bm, 4).unwrap())[0], 32);
        assert!(
            c.turn(&bm, 4).is_none(),
            "[48, 64) passed over: the run is spent"
        );
        assert_eq!(c.live(), 0);
        assert_eq!(c.take_handoff(), None, "the linear scan stays where it is");
        c.publish(&slots);
        assert_eq!(slots.stats(0).unwrap().runs_spent, 1);
    }

    #[test]
    fn backward_stream_bubbles_both_ways() {
        let (l, bm, slots, mut c) = one_stream(StreamPolicy::DEFAULT_RUN);
        // The stream faults on page 200, then on page 100 (its hints: the pages after).
        for h in [201, 101] {
            slots.offer(PageLocation::new(0, h)).unwrap();
            c.poll(&slots, &l, &bm, 4);
        }
        let firsts: Vec<u64> = (0..4).map(|_| pages(&c.turn(&bm, 4).unwrap())[0]).collect();
        // Forward chunk [96, 112) (holding the pages under the fault), then [80, 96) below,
        // [112, 128) above, [64, 80) below.
        assert_eq!(firsts, [96, 80, 112, 64]);
        c.publish(&slots);
        assert_eq!(slots.stats(0).unwrap().backward_hints, 1);
    }

    #[test]
    fn a_hint_inside_the_runs_claimed_pages_continues_the_run() {
        let (l, bm, slots, mut c) = one_stream(32);
        slots.offer(PageLocation::new(0, 20)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        assert_eq!(pages(&c.turn(&bm, 4).unwrap())[0], 16);
        // The stream faults on page 24, which its cursor claimed: a restart at 25 would spend
        // its run passing over [16, 32). The run goes on at its edge with a fresh budget.
        slots.offer(PageLocation::new(0, 25)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        assert_eq!(c.live(), 1);
        let firsts: Vec<u64> = (0..2).map(|_| pages(&c.turn(&bm, 4).unwrap())[0]).collect();
        assert_eq!(firsts, [32, 48], "32 more pages from the edge");
        assert!(c.turn(&bm, 4).is_none(), "then spent");
        assert_eq!(c.take_handoff(), Some(PageLocation::new(0, 64)));
        c.publish(&slots);
        let st = slots.stats(0).unwrap();
        assert_eq!(
            (
                st.hints_taken,
                st.cursor_pages,
                st.runs_spent,
                st.backward_hints
            ),
            (2, 48, 1, 0)
        );
    }

    #[test]
    fn a_far_hint_beside_a_live_run_is_a_detour_and_a_second_one_moves_the_run() {
        let (l, bm, slots, mut c) = one_stream(64);
        slots.offer(PageLocation::new(0, 0)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        assert_eq!(pages(&c.turn(&bm, 4).unwrap())[0], 0);
        // The stream reads a page of another block (its metadata, say): one chunk there,
        // then its run goes on where it was.
        slots.offer(PageLocation::new(1, 513)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        assert_eq!(c.live(), 1);
        let got: Vec<(u32, u64)> = (0..3)
            .map(|_| {
                let claim = c.turn(&bm, 4).unwrap();
                (claim.block(), pages(&claim)[0])
            })
            .collect();
        assert_eq!(
            got,
            [(1, 512), (0, 16), (0, 32)],
            "the detour's chunk, then the run"
        );
        // Back at the run (near it: no detour), then far twice in a row: the stream moved.
        slots.offer(PageLocation::new(0, 49)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        for far in [200, 220] {
            slots.offer(PageLocation::new(0, far)).unwrap();
            c.poll(&slots, &l, &bm, 4);
        }
        let got: Vec<u64> = (0..2).map(|_| pages(&c.turn(&bm, 4).unwrap())[0]).collect();
        assert_eq!(got, [208, 224], "moved: a new run at the second far hint");
        c.publish(&slots);
        assert_eq!(slots.stats(0).unwrap().hints_taken, 5);
    }

    #[test]
    fn a_jump_back_beyond_a_run_starts_a_new_forward_pass() {
        let (l, bm, slots, mut c) = one_stream(64);
        // A reader at page 200 (its run spent meanwhile) starts its window again at page 100:
        // 100 pages back, more than the run of 64 reaches. It reads forward from there.
        slots.offer(PageLocation::new(0, 201)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        while c.turn(&bm, 4).is_some() {}
        assert_eq!(c.live(), 0, "retired at the block's edge");
        slots.offer(PageLocation::new(0, 101)).unwrap();
        c.poll(&slots, &l, &bm, 4);
        let firsts: Vec<u64> = (0..3).map(|_| pages(&c.turn(&bm, 4).unwrap())[0]).collect();
        assert_eq!(
            firsts,
            [96, 112, 128],
            "forward only, nothing below the fault"
        );
        c.publish(&slots);
        assert_eq!(slots.stats(0).unwrap().backward_hints, 0);
    }

    #[test]
    fn wide_host_pages_bubble_from_the_page_below_the_fault() {
        let (l, bm, slots, mut c) = one_stream(4 * 512);
        // Faults on host pages 6 and then 4 of block 1 (hints after them: 7 and 5).
        for hp in [7, 5] {
            slots.offer(PageLocation::new(1, hp * 512)).unwrap();
            c.poll(&slots, &l, &bm, 4);
        }
        for hp in [6, 4] {
            // The urgent path's claims of the faulted host pages.
            let _ = bm.claim_host_page(PageLocation::new(1, hp * 512)).unwrap();
        }
        let firsts: Vec<u64> = (0..3)
            .map(|_| pages(&c.turn(&bm, 4).unwrap())[0] / 512)
            .collect();
        assert_eq!(
            firsts,
            [5, 3, 2],
            "above the fault, below it, below again (6 was sent)"
        );
    }

    #[test]
    fn i6_hints_outside_the_layout_are_taken_and_ignored() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        let slots = HintSlots::new(1).unwrap();
        let mut c = Cursors::new(StreamPolicy::new(1).unwrap());
        slots.offer(PageLocation::new(9, 0)).unwrap();
        assert_eq!(c.poll(&slots, &l, &bm, 4), 1);
        assert_eq!(c.live(), 0);
        assert!(c.turn(&bm, 4).is_none());
    }
}
