//! Several fault streams (design I1–I5): the hint slots alone, and the whole postcopy protocol
//! with one slot per stream and the multi-cursor scanner; their mutants.
//!
//! [`i4_slots_model`] races one offerer per stream against a taker over [`ModelSlots`] (the
//! real `HintSlots`, or a mutant), then drains, and checks I4 *per slot*: each stream's first
//! offer is accepted (no other stream's hint is in its way); a hint taken from stream `s`'s
//! slot was offered, and accepted, by stream `s`; each accepted hint is taken exactly once.
//!
//! [`streams_model`] marks every page dirty, then runs a return-path thread serving requests
//! of several streams (`serve_from`, send, `urgent_sent_from`) and, optionally, a thread
//! offering stray hints into the slots (I6), against one background scanner running a round
//! to completion over [`ModelStreams`] (the real `PageScheduler` in per-stream mode, or a
//! rewrite of its scanner with one flaw). The layout's block 0 is *cold*: no request lands
//! there and cursors never leave their block, so while the linear scan is in block 0 every
//! linear step claims. It checks, for every claim the scanner returns:
//! * I1, I2: every target page sent exactly once, as one whole host page;
//! * I3: when the scanner reports done, no host page is left to claim;
//! * I4: per stream, hints taken ≤ hints accepted;
//! * I5, the linear scan is not starved: while it stays in block 0, at most `share` cursor
//!   claims in a row;
//! * I5, a run is bounded: a stream's cursors claim at most `run` target pages (plus less than
//!   one host page) per hint taken;
//! * I5, streams take turns: a stream's cursor never makes two cursor claims in a row while
//!   another stream's cursor is live.
//!
//! The rewrite ([`Rewrite`]) is the real scanner's algorithm on the public API (slot takes,
//! host-page search and claims; one host page per claim, forward cursors only), and its
//! control passes the same model. Its MUTANTS: a cursor that never yields to the linear scan
//! ([`NeverYields`]), a cursor whose run is never bounded ([`NeverRetired`]), a cursor that
//! keeps the turn while it finds dirty pages ([`KeepsTurn`]), and a linear scan that continues
//! from a spent run's edge without restarting its clean count ([`JumpKeepsCount`]: it skips
//! pages and reports done).

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use pagehint::hint::{self, Offer};
use pagehint::streams::{HintSlots, StreamPolicy};
use pagehint::{
    ClaimBatch, ClaimSource, HintPolicy, HostPage, PageHint, PageLocation, PageScheduler,
    RamLayout, SchedulerConfig, Served, UrgentRequest,
};

use crate::record::{assert_no_dirty_host_page, SentPages};
use crate::sync::{thread, Arc, AtomicU64, Ordering};

// ------------------------------------------------------------------------------------------
// The slots alone.

/// One slot per stream: the real [`HintSlots`], or a mutant.
pub trait ModelSlots: Send + Sync + 'static {
    /// `streams` empty slots.
    fn new(streams: u32) -> Self;
    /// Stream `stream` offers `loc`; whether it was accepted.
    fn offer(&self, stream: u32, loc: PageLocation) -> bool;
    /// Takes from stream `stream`'s slot.
    fn take(&self, stream: u32) -> Option<PageLocation>;
}

impl ModelSlots for HintSlots {
    fn new(streams: u32) -> Self {
        HintSlots::new(streams).expect("a valid count")
    }
    fn offer(&self, stream: u32, loc: PageLocation) -> bool {
        self.slot(stream).unwrap().offer(loc).unwrap() == Offer::Accepted
    }
    fn take(&self, stream: u32) -> Option<PageLocation> {
        self.slot(stream).unwrap().take()
    }
}

/// MUTANT: every stream mapped to one slot (a real set-if-empty [`PageHint`]): a stream's
/// offer is refused while another stream's hint is pending, and a take from one stream's slot
/// can return another stream's hint.
pub struct SharedSlot(PageHint);

impl ModelSlots for SharedSlot {
    fn new(_: u32) -> Self {
        Self(PageHint::new())
    }
    fn offer(&self, _stream: u32, loc: PageLocation) -> bool {
        self.0.offer(loc).unwrap() == Offer::Accepted // BUG: one slot for every stream
    }
    fn take(&self, _stream: u32) -> Option<PageLocation> {
        self.0.take()
    }
}

/// MUTANT: every stream mapped to one cell that an offer overwrites ("the latest fault wins"):
/// two streams' offers overwrite each other and a hint is lost.
pub struct SharedOverwritingSlot(AtomicU64);

impl ModelSlots for SharedOverwritingSlot {
    fn new(_: u32) -> Self {
        Self(AtomicU64::new(0))
    }
    fn offer(&self, _stream: u32, loc: PageLocation) -> bool {
        // Release, as the real offer; the flaw is the overwrite of a shared cell.
        self.0.store(hint::pack(loc).unwrap(), Ordering::Release); // BUG: overwrites
        true
    }
    fn take(&self, _stream: u32) -> Option<PageLocation> {
        // Acquire pairs with the offer's release, as in the real cell.
        hint::unpack(self.0.swap(0, Ordering::Acquire))
    }
}

/// Stream `s` offers `SLOT_OFFERS[s]` in order.
pub const SLOT_OFFERS: [&[PageLocation]; 2] = [
    &[PageLocation::new(0, 10), PageLocation::new(0, 11)],
    &[PageLocation::new(1, 20)],
];

/// I4 per slot: one offerer thread per stream of [`SLOT_OFFERS`], the main thread taking once
/// from each slot; then every slot is drained. See the [module docs](self).
pub fn i4_slots_model<S: ModelSlots>() {
    let streams = SLOT_OFFERS.len() as u32;
    let slots = Arc::new(S::new(streams));
    let offerers: Vec<_> = (0..streams)
        .map(|s| {
            let slots = slots.clone();
            thread::spawn(move || {
                let offers = SLOT_OFFERS[s as usize];
                let accepted: Vec<bool> = offers.iter().map(|&l| slots.offer(s, l)).collect();
                assert!(
                    accepted[0],
                    "I4: stream {s}'s first offer was refused: another stream's hint was in its slot"
                );
                accepted
            })
        })
        .collect();
    let mut taken: Vec<Vec<PageLocation>> = (0..streams)
        .map(|s| slots.take(s).into_iter().collect())
        .collect();
    let accepted: Vec<Vec<PageLocation>> = offerers
        .into_iter()
        .enumerate()
        .map(|(s, t)| {
            let ok = t.join().unwrap();
            SLOT_OFFERS[s]
                .iter()
                .zip(ok)
                .filter_map(|(&l, ok)| ok.then_some(l))
                .collect()
        })
        .collect();
    for (s, t) in taken.iter_mut().enumerate() {
        t.extend(slots.take(s as u32));
    }
    for s in 0..streams as usize {
        for (n, loc) in taken[s].iter().enumerate() {
            assert!(
                accepted[s].contains(loc),
                "I4: stream {s}'s slot gave {loc}, which stream {s} did not offer (or was refused)"
            );
            assert!(
                !taken[s][..n].contains(loc),
                "I4: stream {s}'s hint {loc} was taken twice"
            );
        }
        for loc in &accepted[s] {
            assert!(
                taken[s].contains(loc),
                "I4: stream {s}'s accepted hint {loc} was lost"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// The protocol with several streams.

/// What the model sees of each claim the scanner returns.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    /// Where the claim came from.
    pub source: ClaimSource,
    /// Live cursors after the claim.
    pub live: usize,
    /// The linear scan's position after the claim.
    pub position: PageLocation,
}

/// A per-stream scheduler: the real [`PageScheduler`], or one with a rewritten scanner.
pub trait ModelStreams: Send + Sync + 'static {
    /// A scheduler for `layout` with `config` (per-stream hints, one host page per claim).
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self;
    /// The scheduler (bitmap, slots, urgent path).
    fn scheduler(&self) -> &PageScheduler;
    /// Background path: one round until the scanner reports it complete, reporting each
    /// claim's host pages and what was observed after it.
    fn background_round(&self, on_claim: &mut dyn FnMut(&[HostPage], Observed));
    /// Per stream: hints taken and target pages claimed by cursors (after the round).
    fn stream_counts(&self, stream: u32) -> (u64, u64);
}

impl ModelStreams for PageScheduler {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        PageScheduler::new(layout, config).expect("small bitmap")
    }
    fn scheduler(&self) -> &PageScheduler {
        self
    }
    fn background_round(&self, on_claim: &mut dyn FnMut(&[HostPage], Observed)) {
        let mut scanner = self.background();
        while let Some(claim) = scanner.next_claim() {
            let hps: Vec<HostPage> = claim.host_pages().collect();
            let seen = Observed {
                source: scanner.last_source(),
                live: scanner.live_cursors(),
                position: scanner.position(),
            };
            on_claim(&hps, seen);
        }
    }
    fn stream_counts(&self, stream: u32) -> (u64, u64) {
        let s = self.stream_stats(stream).unwrap();
        (s.hints_taken, s.cursor_pages)
    }
}

/// The flaws of [`Rewrite`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamsFlaw {
    /// None: the control, which must pass.
    None,
    /// MUTANT: cursors never yield a step to the linear scan while one is live.
    NeverYields,
    /// MUTANT: a cursor's run is never bounded: it claims until it meets a clean page.
    NeverRetired,
    /// MUTANT: a cursor keeps the turn while it finds dirty pages (no round robin).
    KeepsTurn,
    /// MUTANT: at a spent run's edge the linear scan continues without restarting its count of
    /// pages verified clean.
    JumpKeepsCount,
}

/// The real scanner's per-stream algorithm rewritten on the public API, with one flaw chosen
/// by `FLAW` (0: none).
pub struct Rewrite<const FLAW: u8> {
    sched: PageScheduler,
    /// Per stream: hints taken, cursor pages (bookkeeping, outside the checked protocol).
    counts: Vec<[StdAtomicU64; 2]>,
}

/// The control rewrite.
pub type ControlRewrite = Rewrite<0>;
/// MUTANT: a cursor never yields to the linear scan.
pub type NeverYields = Rewrite<1>;
/// MUTANT: a cursor's run is never bounded.
pub type NeverRetired = Rewrite<2>;
/// MUTANT: a cursor keeps the turn.
pub type KeepsTurn = Rewrite<3>;
/// MUTANT: a jump to a spent run's edge keeps the clean count.
pub type JumpKeepsCount = Rewrite<4>;

#[derive(Clone, Copy, Default)]
struct RewriteCursor {
    at: Option<PageLocation>,
    budget: u64,
}

impl<const FLAW: u8> Rewrite<FLAW> {
    const FLAW: StreamsFlaw = match FLAW {
        0 => StreamsFlaw::None,
        1 => StreamsFlaw::NeverYields,
        2 => StreamsFlaw::NeverRetired,
        3 => StreamsFlaw::KeepsTurn,
        _ => StreamsFlaw::JumpKeepsCount,
    };

    fn policy(&self) -> StreamPolicy {
        match self.sched.config().hint {
            HintPolicy::PerStream(p) => p,
            _ => panic!("model error: the rewrite runs per-stream configurations"),
        }
    }
}

impl<const FLAW: u8> ModelStreams for Rewrite<FLAW> {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        let streams = config.streams() as usize;
        Self {
            sched: PageScheduler::new(layout, config).expect("small bitmap"),
            counts: (0..streams)
                .map(|_| [StdAtomicU64::new(0), StdAtomicU64::new(0)])
                .collect(),
        }
    }
    fn scheduler(&self) -> &PageScheduler {
        &self.sched
    }
    fn stream_counts(&self, stream: u32) -> (u64, u64) {
        let c = &self.counts[stream as usize];
        // Relaxed: bookkeeping, read after the round.
        (
            c[0].load(StdOrdering::Relaxed),
            c[1].load(StdOrdering::Relaxed),
        )
    }

    fn background_round(&self, on_claim: &mut dyn FnMut(&[HostPage], Observed)) {
        let (layout, bm, slots) = (
            self.sched.layout(),
            self.sched.bitmap(),
            self.sched.hint_slots(),
        );
        let policy = self.policy();
        let n = policy.streams() as usize;
        let total = layout.total_pages();
        let blocks = layout.blocks().len() as u32;
        let mut cursors = vec![RewriteCursor::default(); n];
        let (mut pos, mut swept) = (PageLocation::new(0, 0), 0u64);
        let (mut last, mut since_linear) = (n - 1, 0u32);
        let mut keep: Option<usize> = None; // KeepsTurn only: the stream holding the turn
        let live = |c: &[RewriteCursor]| c.iter().filter(|c| c.at.is_some()).count();
        loop {
            // Poll every slot.
            for (s, c) in cursors.iter_mut().enumerate() {
                if let Some(h) = slots.slot(s as u32).unwrap().take() {
                    // Relaxed: bookkeeping outside the checked protocol.
                    self.counts[s][0].fetch_add(1, StdOrdering::Relaxed);
                    if layout.check(h).is_ok() {
                        *c = RewriteCursor {
                            at: Some(h),
                            budget: policy.run(),
                        };
                    }
                }
            }
            // The cursors' turn: one claim, in round robin, unless the linear scan is due.
            let yields = Self::FLAW != StreamsFlaw::NeverYields;
            let mut served = false;
            if live(&cursors) > 0 && (!yields || since_linear < policy.share()) {
                let kept = keep.filter(|&k| cursors[k].at.is_some());
                // BUG (KeepsTurn): the stream holding the turn comes first, every time.
                let order = kept.into_iter().chain((1..=n).map(|i| (last + i) % n));
                for s in order {
                    let Some(at) = cursors[s].at else { continue };
                    let Some(claim) = bm.claim_host_page(at).unwrap().into_claim() else {
                        cursors[s].at = None; // clean or taken: the cursor retires
                        continue;
                    };
                    let (pages, end) = (claim.pages_to_send(), claim.end());
                    let c = &mut cursors[s];
                    c.budget = c.budget.saturating_sub(pages);
                    // BUG (NeverRetired): the budget never ends the run.
                    let spent = c.budget == 0 && Self::FLAW != StreamsFlaw::NeverRetired;
                    let in_block = end.page < layout.blocks()[end.block as usize].pages();
                    c.at = (in_block && !spent).then_some(end);
                    if spent && in_block {
                        // The linear scan takes over at the run's edge: a jump.
                        pos = end;
                        // BUG (JumpKeepsCount): the count of pages verified clean survives.
                        if Self::FLAW != StreamsFlaw::JumpKeepsCount {
                            swept = 0;
                        }
                    }
                    if Self::FLAW == StreamsFlaw::KeepsTurn {
                        keep = Some(s);
                    }
                    // Relaxed: bookkeeping outside the checked protocol.
                    self.counts[s][1].fetch_add(pages, StdOrdering::Relaxed);
                    last = s;
                    since_linear += 1;
                    let hps: Vec<HostPage> = claim.host_pages().collect();
                    let seen = Observed {
                        source: ClaimSource::Stream(s as u32),
                        live: live(&cursors),
                        position: pos,
                    };
                    on_claim(&hps, seen);
                    served = true;
                    break;
                }
            }
            if served {
                continue;
            }
            since_linear = 0;
            // One linear step.
            let pages = layout.blocks()[pos.block as usize].pages();
            let (step, claim) = match bm.find_next_dirty_host_page(pos.block, pos.page).unwrap() {
                Some(p) => {
                    let loc = PageLocation::new(pos.block, p);
                    let end = p + layout.host_page_of(loc).unwrap().pages;
                    (
                        end - pos.page,
                        bm.claim_host_page(loc).unwrap().into_claim(),
                    )
                }
                None => (pages - pos.page, None),
            };
            pos.page += step;
            swept += step;
            if pos.page >= pages {
                pos = PageLocation::new((pos.block + 1) % blocks, 0);
            }
            if let Some(claim) = claim {
                let hps: Vec<HostPage> = claim.host_pages().collect();
                let seen = Observed {
                    source: ClaimSource::Linear,
                    live: live(&cursors),
                    position: pos,
                };
                on_claim(&hps, seen);
            }
            if swept >= total {
                return;
            }
        }
    }
}

/// One configuration of [`streams_model`].
#[derive(Clone, Debug)]
pub struct StreamsCase {
    /// The layout; every page starts dirty. Block 0 is cold: no request may land there.
    pub layout: RamLayout,
    /// The per-stream policy (the claim batch is one host page).
    pub policy: StreamPolicy,
    /// Requests `(stream, page)`, served in order; each is split onto `return_paths` threads
    /// by stream (`stream % return_paths`).
    pub requests: Vec<(u32, PageLocation)>,
    /// Return-path threads (at least one).
    pub return_paths: u32,
    /// Hints a separate thread offers straight into the slots, `(stream, location)`: I6
    /// (none: no such thread). Stray hints may point into block 0.
    pub stray_hints: Vec<(u32, PageLocation)>,
}

impl StreamsCase {
    /// The scheduler configuration: preempt, per-stream hints, one host page per claim.
    pub fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            hint: HintPolicy::PerStream(self.policy),
            ..SchedulerConfig::preempt()
        }
        .with_batch(ClaimBatch::HOST_PAGE)
    }
}

/// Sender id of the urgent path in [`SentPages`] (the scanner is 1).
const URGENT: u32 = 0;

/// The several-streams protocol model: see the [module docs](self).
pub fn streams_model<M: ModelStreams>(case: &StreamsCase) {
    assert!(case.return_paths >= 1);
    assert!(
        case.requests.iter().all(|(_, l)| l.block != 0),
        "model error: block 0 is cold"
    );
    let m = Arc::new(M::new(case.layout.clone(), case.config()));
    let s = m.scheduler();
    s.bitmap().mark_all();
    let sent = Arc::new(SentPages::new(&case.layout));
    let streams = case.policy.streams();
    // Per stream: offers accepted by the urgent path (bookkeeping, outside the protocol).
    let accepted: Arc<Vec<StdAtomicU64>> =
        Arc::new((0..streams).map(|_| StdAtomicU64::new(0)).collect());

    let return_paths: Vec<_> = (0..case.return_paths)
        .map(|t| {
            let (m, sent, accepted) = (m.clone(), sent.clone(), accepted.clone());
            let mine: Vec<_> = case
                .requests
                .iter()
                .copied()
                .filter(|(stream, _)| stream % case.return_paths == t)
                .collect();
            thread::spawn(move || {
                let s = m.scheduler();
                let tps = s.layout().target_page_size();
                for (stream, loc) in mine {
                    let req = UrgentRequest::new(loc.block, loc.page * tps, tps);
                    let served = s.serve_from(stream, req).expect("valid requests");
                    if let Served::Send(claim) = served {
                        claim.host_pages().for_each(|hp| sent.record(hp, URGENT));
                        if s.urgent_sent_from(stream, &claim).unwrap() == Some(Offer::Accepted) {
                            // Relaxed: bookkeeping outside the checked protocol.
                            accepted[stream as usize].fetch_add(1, StdOrdering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let stray = (!case.stray_hints.is_empty()).then(|| {
        let (m, hints, accepted) = (m.clone(), case.stray_hints.clone(), accepted.clone());
        thread::spawn(move || {
            for (stream, loc) in hints {
                let slot = m.scheduler().hint_slots().slot(stream).unwrap();
                if slot.offer(loc).unwrap() == Offer::Accepted {
                    // Relaxed: bookkeeping outside the checked protocol.
                    accepted[stream as usize].fetch_add(1, StdOrdering::Relaxed);
                }
            }
        })
    });

    // The scanner, on this thread, with the checker watching its claims.
    let share = u64::from(case.policy.share());
    let mut streak = 0u64; // cursor claims in a row with the linear scan still in block 0
    let mut prev_pos = PageLocation::new(0, 0);
    let mut prev_cursor: Option<u32> = None;
    m.background_round(&mut |hps, seen| {
        for &hp in hps {
            sent.record(hp, 1);
        }
        match seen.source {
            ClaimSource::Linear => streak = 0,
            ClaimSource::Stream(st) => {
                if seen.position == prev_pos && seen.position.block == 0 {
                    streak += 1;
                    assert!(
                        streak <= share,
                        "I5: the linear scan starved: {streak} cursor claims in a row (share {share}) while it had pages to claim in block 0"
                    );
                } else {
                    streak = 0;
                }
                assert!(
                    !(prev_cursor == Some(st) && seen.live >= 2),
                    "I5: stream {st} kept the turn: two cursor claims in a row while another stream's cursor was live"
                );
                prev_cursor = Some(st);
            }
        }
        prev_pos = seen.position;
    });
    assert_no_dirty_host_page(s, "the scanner");

    for t in return_paths {
        t.join().unwrap();
    }
    if let Some(t) = stray {
        t.join().unwrap();
    }
    sent.assert_each_sent_once();
    assert_eq!(
        s.bitmap().dirty_pages(),
        0,
        "I1: pages left dirty after every path finished"
    );
    let chunk = case
        .layout
        .blocks()
        .iter()
        .map(|b| b.host_page_pages())
        .max()
        .unwrap_or(1);
    for st in 0..streams {
        let (taken, pages) = m.stream_counts(st);
        // Relaxed: bookkeeping, read after the joins.
        let acc = accepted[st as usize].load(StdOrdering::Relaxed);
        let pending = u64::from(s.hint_slots().slot(st).unwrap().peek().is_some());
        assert_eq!(
            taken + pending,
            acc,
            "I4: stream {st}: {acc} hints accepted, {taken} taken, {pending} pending"
        );
        assert!(
            pages <= taken * (case.policy.run() + chunk - 1),
            "I5: stream {st}'s run was not bounded: its cursors claimed {pages} pages after {taken} hints (run {})",
            case.policy.run()
        );
    }
}
