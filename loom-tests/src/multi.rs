//! Several background senders and the urgent path (design I1, I2, I3, I4), run by
//! `tests/loom_multi.rs` (loom) and `tests/shuttle_multi.rs` (shuttle): the trait, the real
//! implementation, the rewrite and its pooled-count mutant, and the checker.

use crate::record::{assert_no_dirty_host_page, SentPages};
use crate::sync::{thread, Arc, AtomicU64, Ordering};
use pagehint::{
    ClaimBatch, HostPage, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served,
    UrgentRequest,
};

/// Several background senders over one scheduler: the real ones, or a rewrite.
pub trait MultiSenders: Send + Sync + 'static {
    /// Senders over a scheduler for `layout` (every page starts dirty).
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self;
    /// The scheduler (bitmap, hint, urgent path).
    fn scheduler(&self) -> &PageScheduler;
    /// Scanner `id` of `n` runs one round to completion, sending what it claims.
    fn round(&self, id: usize, n: usize, send: &mut dyn FnMut(HostPage));
}

impl MultiSenders for PageScheduler {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        PageScheduler::new(layout, config).expect("small bitmap")
    }
    fn scheduler(&self) -> &PageScheduler {
        self
    }
    fn round(&self, id: usize, n: usize, send: &mut dyn FnMut(HostPage)) {
        let mut scanner = self.background_scanners(n).swap_remove(id);
        while let Some(claim) = scanner.next_claim() {
            claim.host_pages().for_each(&mut *send);
        }
    }
}

/// The real scanner's algorithm rewritten on the public API, one host page per claim, with
/// the verified-clean count per scanner (`POOLED = false`, the control) or pooled in one
/// shared counter (`POOLED = true`, the mutant).
pub struct Rewrite<const POOLED: bool> {
    sched: PageScheduler,
    /// The pooled count: pages verified clean by any scanner.
    pooled: AtomicU64,
}

impl<const POOLED: bool> MultiSenders for Rewrite<POOLED> {
    fn new(layout: RamLayout, config: SchedulerConfig) -> Self {
        Self {
            sched: PageScheduler::new(layout, config).expect("small bitmap"),
            pooled: AtomicU64::new(0),
        }
    }
    fn scheduler(&self) -> &PageScheduler {
        &self.sched
    }
    fn round(&self, id: usize, n: usize, send: &mut dyn FnMut(HostPage)) {
        let (layout, bm) = (self.sched.layout(), self.sched.bitmap());
        let total = layout.total_pages();
        let blocks = layout.blocks().len() as u32;
        let start = layout.location_of(total * id as u64 / n as u64).unwrap();
        let mut pos =
            PageLocation::new(start.block, layout.host_page_of(start).unwrap().first_page);
        let mut swept = 0u64;
        // Adds `k` verified-clean pages; whether the round is complete.
        let mut verified = |k: u64, jumped: bool| -> bool {
            if POOLED {
                // BUG (mutant): pages verified by any scanner count for all, and a jump
                // cannot restart the other scanners' counts, so overlaps count twice.
                // Relaxed: a count; its atomicity is not the flaw under test.
                self.pooled.fetch_add(k, Ordering::Relaxed) + k >= total
            } else {
                if jumped {
                    swept = 0;
                }
                swept += k;
                swept >= total
            }
        };
        loop {
            let mut jumped = false;
            if let Some(h) = self.sched.hint().take() {
                if layout.check(h).is_ok() && h != pos {
                    pos = h;
                    jumped = true;
                }
            }
            let pages = layout.blocks()[pos.block as usize].pages();
            let step = match bm.find_next_dirty_host_page(pos.block, pos.page).unwrap() {
                Some(p) => {
                    let loc = PageLocation::new(pos.block, p);
                    let end = p + layout.host_page_of(loc).unwrap().pages;
                    if let Some(c) = bm.claim_host_page(loc).unwrap().into_claim() {
                        c.host_pages().for_each(&mut *send);
                    }
                    end - pos.page
                }
                None => pages - pos.page,
            };
            pos.page += step;
            if pos.page >= pages {
                pos = PageLocation::new((pos.block + 1) % blocks, 0);
            }
            if verified(step, jumped) {
                return;
            }
        }
    }
}

/// `n` background senders (scanner 0 on the model's main thread) and a return-path thread
/// requesting `requests`; every page starts dirty. Checks I1, I2, I3 (each scanner) and I4.
pub fn senders_and_urgent<M: MultiSenders>(
    layout: &RamLayout,
    n: usize,
    requests: &[PageLocation],
) {
    let config = SchedulerConfig::preempt_hint().with_batch(ClaimBatch::HOST_PAGE);
    let m = Arc::new(M::new(layout.clone(), config));
    m.scheduler().bitmap().mark_all();
    let sent = Arc::new(SentPages::new(layout));
    let return_path = {
        let (m, sent, requests) = (m.clone(), sent.clone(), requests.to_vec());
        thread::spawn(move || {
            let s = m.scheduler();
            for loc in requests {
                let req = UrgentRequest::new(loc.block, loc.page * 4096, 4096);
                if let Served::Send(claim) = s.serve(req).unwrap() {
                    claim.host_pages().for_each(|hp| sent.record(hp, 0));
                    s.urgent_sent(&claim);
                }
            }
        })
    };
    let scan = move |m: &M, sent: &SentPages, id: usize| {
        m.round(id, n, &mut |hp| sent.record(hp, 1 + id as u32));
        assert_no_dirty_host_page(m.scheduler(), &format!("scanner {id}"));
    };
    let others: Vec<_> = (1..n)
        .map(|id| {
            let (m, sent) = (m.clone(), sent.clone());
            thread::spawn(move || scan(&m, &sent, id))
        })
        .collect();
    scan(&m, &sent, 0);
    return_path.join().unwrap();
    for t in others {
        t.join().unwrap();
    }
    sent.assert_each_sent_once();
    let st = m.scheduler().stats();
    assert!(
        st.hints_taken <= st.hints_accepted,
        "I4: {} hints taken, {} accepted",
        st.hints_taken,
        st.hints_accepted
    );
}
