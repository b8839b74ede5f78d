//! Range requests racing the background path (design I1, I2, I3, I5) and the mutant that
//! serves only a range's first host page.
//!
//! [`range_model`] marks every page dirty (the switch to postcopy), then runs
//! * a return-path thread serving range requests ([`PageScheduler::serve_range`]): sending
//!   each [`Served::Send`] claim and offering the hint after it, noting each host page
//!   reported already claimed (preempt) or queued (vanilla);
//! * a background scanner running one round, concurrently;
//!
//! then (vanilla) one more round after the return path is done, so the queue is drained, and
//! checks: every target page sent exactly once, as whole host pages (I1, I2); the scanner
//! reports done only when no host page is left (I3); and, for each request, **every host page
//! of its range was reported exactly once** — sent by the urgent path, found already claimed
//! (and then not claimable any more: another path owns it), or queued — with, in vanilla
//! mode, every queued host page taken off the queue (I5). A request served for its first host
//! page only leaves the rest of its range unreported: [`FirstPageOnly`], the old `serve`,
//! whose other host pages the background path still sends, so I1 alone would not catch it.

use std::collections::BTreeMap;

use pagehint::{
    HostPage, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served, UrgentRequest,
};

use crate::record::{assert_no_dirty_host_page, SentPages};
use crate::sync::{thread, Arc};

/// How the urgent path serves a range request: the real [`PageScheduler::serve_range`], or a
/// mutant.
pub trait ModelRange: Send + Sync + 'static {
    /// A scheduler for `layout` with `config`.
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self;
    /// The scheduler (layout, bitmap, hint, queue).
    fn scheduler(&self) -> &PageScheduler;
    /// Serves `req`, handing each outcome to `out`.
    fn serve_range(&self, req: UrgentRequest, out: &mut dyn FnMut(Served));
}

impl ModelRange for PageScheduler {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        PageScheduler::new(layout, config).expect("small bitmap")
    }
    fn scheduler(&self) -> &PageScheduler {
        self
    }
    fn serve_range(&self, req: UrgentRequest, out: &mut dyn FnMut(Served)) {
        self.serve_range(req)
            .expect("the model asks only for ranges of the layout")
            .for_each(out);
    }
}

/// MUTANT: the old `serve` — checks the range, then serves only the host page of its first
/// byte; the rest of the range is neither sent nor queued, and nothing says so.
pub struct FirstPageOnly(PageScheduler);

impl ModelRange for FirstPageOnly {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        Self(PageScheduler::new(layout, config).expect("small bitmap"))
    }
    fn scheduler(&self) -> &PageScheduler {
        &self.0
    }
    fn serve_range(&self, req: UrgentRequest, out: &mut dyn FnMut(Served)) {
        let tps = self.0.layout().target_page_size();
        let first = UrgentRequest::new(req.block, req.offset, tps - req.offset % tps);
        out(self.0.serve(first).expect("a page of the layout")); // BUG: the rest is dropped
    }
}

/// One configuration of the range model.
#[derive(Clone, Debug)]
pub struct RangeCase {
    /// The layout; every page starts dirty.
    pub layout: RamLayout,
    /// Mode, hint policy and claim batch.
    pub config: SchedulerConfig,
    /// Range requests, in order: (block, first target page, target pages).
    pub requests: Vec<(u32, u64, u64)>,
}

/// Sender ids in [`SentPages`].
const URGENT: u32 = 0;
const BACKGROUND: u32 = 1;

/// The range model: see the [module docs](self).
pub fn range_model<M: ModelRange>(case: &RangeCase) {
    let m = Arc::new(M::new(case.layout.clone(), case.config));
    m.scheduler().bitmap().mark_all();
    let sent = Arc::new(SentPages::new(&case.layout));
    let return_path = {
        let (m, sent, requests) = (m.clone(), sent.clone(), case.requests.clone());
        thread::spawn(move || {
            let s = m.scheduler();
            let tps = s.layout().target_page_size();
            for (block, first, count) in requests {
                let req = UrgentRequest::new(block, first * tps, count * tps);
                // Host page (first page) → how often it was reported.
                let mut reported: BTreeMap<u64, u32> = BTreeMap::new();
                let mut note = |hp: HostPage| *reported.entry(hp.first_page).or_default() += 1;
                m.serve_range(req, &mut |served| match served {
                    Served::Send(claim) => {
                        for hp in claim.host_pages() {
                            sent.record(hp, URGENT);
                            note(hp);
                        }
                        s.urgent_sent(&claim);
                    }
                    Served::AlreadyClaimed(hp) => {
                        // Postcopy: nothing re-dirties, so a host page another path claimed
                        // stays unclaimable.
                        let next = s
                            .bitmap()
                            .find_next_dirty_host_page(hp.block, hp.first_page)
                            .unwrap();
                        assert_ne!(
                            next,
                            Some(hp.first_page),
                            "I1: {hp:?} reported already claimed while it is still dirty"
                        );
                        note(hp);
                    }
                    Served::Queued(hp) => note(hp),
                });
                let hpp = s.layout().blocks()[block as usize].host_page_pages();
                for h in first / hpp..=(first + count - 1) / hpp {
                    let loc = PageLocation::new(block, h * hpp);
                    match reported.remove(&(h * hpp)) {
                        Some(1) => {}
                        None => panic!(
                            "I5: host page at {loc} of the range request was neither sent, \
                             found already claimed, nor queued"
                        ),
                        Some(n) => panic!("I1: host page at {loc} was reported {n} times"),
                    }
                }
                assert!(
                    reported.is_empty(),
                    "I1: host pages outside the range were served: {reported:?}"
                );
            }
        })
    };
    let round = |m: &M, who: &str| {
        let mut scanner = m.scheduler().background();
        while let Some(claim) = scanner.next_claim() {
            claim
                .host_pages()
                .for_each(|hp| sent.record(hp, BACKGROUND));
        }
        assert_no_dirty_host_page(m.scheduler(), who);
    };
    round(&m, "round 1");
    // A failed check on the return path fails the model with its own message.
    if let Err(panic) = return_path.join() {
        std::panic::resume_unwind(panic);
    }
    let s = m.scheduler();
    if s.config().mode == pagehint::Mode::Vanilla {
        round(&m, "round 2");
        let st = s.stats();
        assert_eq!(
            st.queued_followed + st.queued_stale,
            st.requests_queued,
            "I5: a queued host page was lost"
        );
    }
    sent.assert_each_sent_once();
    assert_eq!(
        s.bitmap().dirty_pages(),
        0,
        "I1: pages left dirty after every path finished"
    );
}
