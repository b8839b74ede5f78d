//! The vanilla-mode model (design I1, I3, I5) and its mutants.
//!
//! In vanilla mode (QEMU without postcopy-preempt) the urgent path sends nothing: it queues
//! each request, and the background scanner, before each step, takes queued requests off the
//! queue and jumps to the first whose host page is still dirty; a request whose page was
//! already sent is dropped. [`vanilla_model`] marks every page dirty, then runs
//! * a return-path thread queueing requests ([`PageScheduler::serve`] → `Served::Queued`),
//! * a background scanner running one round to completion, concurrently;
//!
//! then, after the return path is done, one more round (the requests queued after the first
//! round ended are taken then: the queue is drained), and checks: every target page is sent
//! exactly once, as a whole host page (I1, I2); each round ends only when no host page is
//! left to claim (I3); every request was taken off the queue — followed or found already
//! sent — so none was lost (I5).
//!
//! The scanner is also rewritten here ([`Rewrite`]) on the public API (host-page search and
//! claim) with its own queue on the shim's mutex, and the control rewrite passes the same
//! model. Its MUTANTS: one keeps requests in a one-slot cell that a new request overwrites
//! (the hint's semantics applied to requests: a request is lost, I5), and one sends a
//! requested host page without checking that it is still dirty and winning its claim ("the
//! destination asked for it, so send it": a page already sent is sent twice, I1).

use std::collections::VecDeque;

use pagehint::{
    HostPage, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served, UrgentRequest,
};

use crate::record::{assert_no_dirty_host_page, SentPages};
use crate::sync::{thread, Arc, Mutex};

/// A vanilla-mode scheduler: the real [`PageScheduler`], or a rewrite.
pub trait ModelVanilla: Send + Sync + 'static {
    /// A vanilla scheduler for `layout`.
    fn new(layout: RamLayout) -> Self;
    /// The scheduler (layout, bitmap).
    fn scheduler(&self) -> &PageScheduler;
    /// Return path: queues a request for target page `loc`.
    fn request(&self, loc: PageLocation);
    /// Background path: one round, until the scanner reports it complete.
    fn background_round(&self, send: &mut dyn FnMut(HostPage));
    /// Requests taken off the queue so far: followed, or dropped as already sent.
    fn requests_taken(&self) -> u64;
}

impl ModelVanilla for PageScheduler {
    fn new(layout: RamLayout) -> Self {
        PageScheduler::new(layout, SchedulerConfig::vanilla()).expect("small bitmap")
    }
    fn scheduler(&self) -> &PageScheduler {
        self
    }
    fn request(&self, loc: PageLocation) {
        let tps = self.layout().target_page_size();
        let served = self
            .serve(UrgentRequest::new(loc.block, loc.page * tps, tps))
            .expect("the model asks only for pages of the layout");
        assert!(
            matches!(served, Served::Queued(_)),
            "vanilla queues: {served:?}"
        );
    }
    fn background_round(&self, send: &mut dyn FnMut(HostPage)) {
        let mut scanner = self.background();
        while let Some(claim) = scanner.next_claim() {
            claim.host_pages().for_each(&mut *send);
        }
    }
    fn requests_taken(&self) -> u64 {
        let s = self.stats();
        s.queued_followed + s.queued_stale
    }
}

/// The flaws of [`Rewrite`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VanillaFlaw {
    /// None: the control, which must pass.
    None,
    /// MUTANT: the queue is one slot that a new request overwrites (I5).
    OverwritingSlot,
    /// MUTANT: a followed request's host page is sent without a claim (I1).
    SendRequestedUnclaimed,
}

/// The background scanner of vanilla mode rewritten on the public API, over block 0 of the
/// layout (the models use one block), with its own request queue.
pub struct Rewrite<const FLAW: u8> {
    sched: PageScheduler,
    queue: Mutex<VecDeque<PageLocation>>,
    taken: Mutex<u64>,
}

impl<const FLAW: u8> Rewrite<FLAW> {
    const FLAW: VanillaFlaw = match FLAW {
        0 => VanillaFlaw::None,
        1 => VanillaFlaw::OverwritingSlot,
        _ => VanillaFlaw::SendRequestedUnclaimed,
    };

    fn pop(&self) -> Option<PageLocation> {
        let loc = self.queue.lock().unwrap().pop_front()?;
        *self.taken.lock().unwrap() += 1;
        Some(loc)
    }
}

/// The control rewrite (no flaw).
pub type ControlRewrite = Rewrite<0>;
/// MUTANT: requests in an overwriting one-slot cell.
pub type OverwritingSlotRewrite = Rewrite<1>;
/// MUTANT: requested pages sent unclaimed.
pub type SendRequestedUnclaimedRewrite = Rewrite<2>;

impl<const FLAW: u8> ModelVanilla for Rewrite<FLAW> {
    fn new(layout: RamLayout) -> Self {
        assert_eq!(layout.blocks().len(), 1, "the rewrite scans block 0 only");
        Self {
            sched: PageScheduler::new(layout, SchedulerConfig::vanilla()).expect("small bitmap"),
            queue: Mutex::new(VecDeque::new()),
            taken: Mutex::new(0),
        }
    }
    fn scheduler(&self) -> &PageScheduler {
        &self.sched
    }
    fn request(&self, loc: PageLocation) {
        let mut q = self.queue.lock().unwrap();
        if Self::FLAW == VanillaFlaw::OverwritingSlot {
            q.clear(); // BUG: a pending request is overwritten
        }
        q.push_back(loc);
    }
    fn background_round(&self, send: &mut dyn FnMut(HostPage)) {
        let (layout, bm) = (self.sched.layout(), self.sched.bitmap());
        let pages = layout.blocks()[0].pages();
        let (mut pos, mut swept) = (0u64, 0u64);
        loop {
            // Follow: the first queued request whose host page is still dirty.
            while let Some(loc) = self.pop() {
                let hp = layout.host_page_of(loc).unwrap();
                if Self::FLAW == VanillaFlaw::SendRequestedUnclaimed {
                    send(hp); // BUG: neither checked dirty nor claimed
                    pos = (hp.first_page + hp.pages) % pages;
                    swept = 0;
                    break;
                }
                if bm.find_next_dirty_host_page(0, hp.first_page).unwrap() == Some(hp.first_page) {
                    pos = hp.first_page;
                    swept = 0;
                    break;
                }
            }
            if swept >= pages {
                return;
            }
            // One step: the next dirty host page at or after `pos`, or the block's end. Pages
            // seen clean or claimed stay clean in postcopy, so a contiguous sweep of the whole
            // block ends the round (I3); a jump restarts the count.
            match bm.find_next_dirty_host_page(0, pos).unwrap() {
                Some(p) => {
                    let loc = PageLocation::new(0, p);
                    let hp = layout.host_page_of(loc).unwrap();
                    swept += p + hp.pages - pos;
                    pos = (p + hp.pages) % pages;
                    if let Some(c) = bm.claim_host_page(loc).unwrap().into_claim() {
                        c.host_pages().for_each(&mut *send);
                    }
                }
                None => {
                    swept += pages - pos;
                    pos = 0;
                }
            }
        }
    }
    fn requests_taken(&self) -> u64 {
        *self.taken.lock().unwrap()
    }
}

/// One configuration of the vanilla model.
#[derive(Clone, Debug)]
pub struct VanillaCase {
    /// The layout (one block for the rewrites); every page starts dirty.
    pub layout: RamLayout,
    /// Pages the return path requests, in order.
    pub requests: Vec<PageLocation>,
}

/// The vanilla model: see the [module docs](self).
pub fn vanilla_model<V: ModelVanilla>(case: &VanillaCase) {
    let v = Arc::new(V::new(case.layout.clone()));
    v.scheduler().bitmap().mark_all();
    let sent = Arc::new(SentPages::new(&case.layout));
    let return_path = {
        let (v, requests) = (v.clone(), case.requests.clone());
        thread::spawn(move || {
            for loc in requests {
                v.request(loc);
            }
        })
    };
    v.background_round(&mut |hp| sent.record(hp, 1));
    assert_no_dirty_host_page(v.scheduler(), "round 1");
    return_path.join().unwrap();
    // The requests queued after the first round ended are taken by the next one.
    v.background_round(&mut |hp| sent.record(hp, 2));
    assert_no_dirty_host_page(v.scheduler(), "round 2");
    sent.assert_each_sent_once();
    assert_eq!(
        v.requests_taken(),
        case.requests.len() as u64,
        "I5: a queued request was lost (taken off the queue: {} of {})",
        v.requests_taken(),
        case.requests.len()
    );
}
