//! The whole postcopy protocol model (design I1, I2, I3, I5, I6) and its mutants.
//!
//! [`protocol_model`] marks every page of a layout dirty (the switch to postcopy), then runs
//! * a return-path thread serving page requests (claim the host page, send it, offer the hint
//!   right after it: [`PageScheduler::serve`] and [`PageScheduler::urgent_sent`]),
//! * optionally a thread offering stray hints (stale, repeated, anywhere: I6),
//! * one or more background scanners, each scanning one round to completion,
//!
//! and checks: every target page is sent exactly once (I1), always as one whole host page
//! (I2); a scanner reports "done" only when no host page is left to claim (I3); the round ends
//! (I5: loom and shuttle fail a model that runs away).

use pagehint::{
    HostPage, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served, UrgentRequest,
};

use crate::record::{assert_no_dirty_host_page, SentPages};
use crate::sync::{thread, Arc};

/// The scheduler under test: the real [`PageScheduler`], or one with a mutant scanner.
pub trait ModelProtocol: Send + Sync + 'static {
    /// A scheduler for `layout` with `config`.
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self;
    /// The scheduler (layout, bitmap, hint).
    fn scheduler(&self) -> &PageScheduler;

    /// Urgent path: serves a request for target page `loc` through the wire-format request;
    /// if it claims, sends the host pages and then calls `urgent_sent` (which offers the hint).
    fn serve(&self, loc: PageLocation, send: &mut dyn FnMut(HostPage)) {
        let s = self.scheduler();
        let tps = s.layout().target_page_size();
        let req = UrgentRequest::new(loc.block, loc.page * tps, tps);
        match s
            .serve(req)
            .expect("the model asks only for pages of the layout")
        {
            Served::Send(claim) => {
                claim.host_pages().for_each(&mut *send);
                s.urgent_sent(&claim);
            }
            Served::AlreadyClaimed(_) | Served::Queued(_) => {}
        }
    }

    /// Background path: one round, until the scanner reports it complete.
    fn background_round(&self, send: &mut dyn FnMut(HostPage));
}

impl ModelProtocol for PageScheduler {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        PageScheduler::new(layout, config).expect("small bitmap")
    }
    fn scheduler(&self) -> &PageScheduler {
        self
    }
    fn background_round(&self, send: &mut dyn FnMut(HostPage)) {
        let mut scanner = self.background();
        while let Some(claim) = scanner.next_claim() {
            claim.host_pages().for_each(&mut *send);
        }
    }
}

/// MUTANT: QEMU's weak spot. Each step starts at the scan position, jumps to the pending hint,
/// and then judges "all clean" against the position it had *before* the hint (QEMU's
/// `last_seen_block`/`last_page`): after wrapping it stops at the first dirty host page at or
/// after that old position, although the pages between it and the hint were never scanned.
/// Without hints it is a correct scanner.
pub struct TrustingScanner(PageScheduler);

impl ModelProtocol for TrustingScanner {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        Self(PageScheduler::new(layout, config).expect("small bitmap"))
    }
    fn scheduler(&self) -> &PageScheduler {
        &self.0
    }
    fn background_round(&self, send: &mut dyn FnMut(HostPage)) {
        let s = &self.0;
        let (layout, bm) = (s.layout(), s.bitmap());
        let blocks = layout.blocks().len() as u32;
        let mut pos = PageLocation::new(0, 0);
        loop {
            // One call of QEMU's ram_find_and_save_block.
            let start = pos;
            if let Some(h) = s.hint().take() {
                if layout.check(h).is_ok() {
                    pos = h; // BUG: `start` is not moved with the jump
                }
            }
            let mut wrapped = false;
            loop {
                let next = bm.find_next_dirty_host_page(pos.block, pos.page).unwrap();
                if wrapped && pos.block == start.block && next.is_none_or(|p| p >= start.page) {
                    return; // "all clean"
                }
                match next {
                    Some(p) => {
                        let loc = PageLocation::new(pos.block, p);
                        pos.page = p + layout.host_page_of(loc).unwrap().pages;
                        if let Some(c) = bm.claim_host_page(loc).unwrap().into_claim() {
                            c.host_pages().for_each(&mut *send);
                            break;
                        }
                    }
                    None => {
                        pos = PageLocation::new((pos.block + 1) % blocks, 0);
                        wrapped |= pos.block == 0;
                    }
                }
            }
        }
    }
}

/// MUTANT: a scanner that checks a host page is dirty and then sends it, claiming it but
/// ignoring whether the claim won (check-then-act): the urgent path can claim and send the
/// same host page between the check and the claim.
pub struct CheckThenSendScanner(PageScheduler);

impl ModelProtocol for CheckThenSendScanner {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        Self(PageScheduler::new(layout, config).expect("small bitmap"))
    }
    fn scheduler(&self) -> &PageScheduler {
        &self.0
    }
    fn background_round(&self, send: &mut dyn FnMut(HostPage)) {
        let s = &self.0;
        let (layout, bm) = (s.layout(), s.bitmap());
        for (block, b) in layout.blocks().iter().enumerate() {
            let block = block as u32;
            let mut from = 0;
            while let Some(p) = bm.find_next_dirty_host_page(block, from).unwrap() {
                let loc = PageLocation::new(block, p);
                let _ = bm.claim_host_page(loc).unwrap().into_claim(); // BUG: the claim's result is ignored
                send(layout.host_page_of(loc).unwrap());
                from = p + b.host_page_pages();
            }
        }
    }
}

/// One configuration of the protocol model.
#[derive(Clone, Debug)]
pub struct ProtocolCase {
    /// The layout; every page starts dirty.
    pub layout: RamLayout,
    /// Mode, hint policy and claim batch.
    pub config: SchedulerConfig,
    /// Pages the return-path thread requests, in order.
    pub requests: Vec<PageLocation>,
    /// Hints a separate thread offers straight into the hint cell (none: no such thread).
    pub stray_hints: Vec<PageLocation>,
    /// Background scanners (at least one; the first runs on the model's main thread).
    pub scanners: u32,
}

/// Sender ids in [`SentPages`].
const URGENT: u32 = 0;

/// The protocol model: see the [module docs](self).
pub fn protocol_model<P: ModelProtocol>(case: &ProtocolCase) {
    assert!(case.scanners >= 1);
    let p = Arc::new(P::new(case.layout.clone(), case.config));
    p.scheduler().bitmap().mark_all();
    let sent = Arc::new(SentPages::new(&case.layout));

    let return_path = {
        let (p, sent, requests) = (p.clone(), sent.clone(), case.requests.clone());
        thread::spawn(move || {
            for loc in requests {
                p.serve(loc, &mut |hp| sent.record(hp, URGENT));
            }
        })
    };
    let stray = (!case.stray_hints.is_empty()).then(|| {
        let (p, hints) = (p.clone(), case.stray_hints.clone());
        thread::spawn(move || {
            for loc in hints {
                let _ = p.scheduler().hint().offer(loc);
            }
        })
    });
    let scan = |p: &P, sent: &SentPages, id: u32| {
        p.background_round(&mut |hp| sent.record(hp, id));
        assert_no_dirty_host_page(p.scheduler(), &format!("scanner {id}"));
    };
    let others: Vec<_> = (2..=case.scanners)
        .map(|id| {
            let (p, sent) = (p.clone(), sent.clone());
            thread::spawn(move || scan(&p, &sent, id))
        })
        .collect();
    scan(&p, &sent, 1);

    return_path.join().unwrap();
    if let Some(t) = stray {
        t.join().unwrap();
    }
    for t in others {
        t.join().unwrap();
    }
    sent.assert_each_sent_once();
    assert_eq!(
        p.scheduler().bitmap().dirty_pages(),
        0,
        "I1: pages left dirty after every path finished"
    );
}
