//! Std-thread stress of the protocol for ThreadSanitizer (scripts/sanitize.sh): return-path
//! threads serving requests and offering hints, several background scanners, and (precopy)
//! a dirty-log merger racing the claims, for many rounds.
//!
//! Cheap by default (a few rounds, a second or two in a debug build); `PAGEHINT_STRESS_ROUNDS`
//! sets the number of rounds per test. scripts/sanitize.sh runs it under
//! `-Zsanitizer=thread` with enough rounds for millions of atomic operations; TSan then
//! reports any data race (a plain access racing another access) in the crate, including
//! the memory-mapped bitmap storage.
//!
//! Checked on real threads, every round: I1 (each page sent exactly once), I2 (claims hold
//! whole host pages), I3 (when every thread is done, nothing is dirty), I5 (the rounds end),
//! and, for precopy, I7 (no lost dirtying: every mark is collected by a later claim or by
//! the final drain).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use pagehint::{
    Claim, ClaimBatch, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served,
    UrgentRequest,
};

/// Rounds per test: `PAGEHINT_STRESS_ROUNDS`, else a small default for `cargo test`.
fn rounds() -> u32 {
    std::env::var("PAGEHINT_STRESS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

mod common;
use common::{mixed_layout, Collected, Rng};

/// 4 KiB, 16 KiB and 2 MiB host pages (the last spans 8 words: the summary protocol).
fn layout() -> RamLayout {
    mixed_layout(1 << 20, 256 << 10, 4 << 20)
}

/// Prints the protocol operations a test did (requests served, claims made, logs merged);
/// `--nocapture` shows it.
fn report(test: &str, ops: u64) {
    eprintln!("{test}: {ops} protocol operations");
}

/// One postcopy round: `urgent` return-path threads against `scanners` background threads.
/// Returns the protocol operations done.
fn postcopy_round(
    sched: &PageScheduler,
    layout: &RamLayout,
    urgent: usize,
    scanners: usize,
    seed: u64,
) -> u64 {
    sched.reset();
    sched.bitmap().mark_all();
    let sent = Collected::new(layout);
    let running = AtomicU32::new(scanners as u32);
    let total = layout.total_pages();
    std::thread::scope(|s| {
        for u in 0..urgent {
            let (sent, running) = (&sent, &running);
            s.spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(u as u64) | 1);
                // Acquire: pairs with the scanners' release; only stops the loop.
                while running.load(Ordering::Acquire) > 0 {
                    let loc = layout.location_of(rng.next() % total).unwrap();
                    let req = UrgentRequest::new(loc.block, loc.page * 4096, 4096);
                    match sched.serve(req).unwrap() {
                        Served::Send(c) => {
                            assert!(c.host_pages().any(|hp| hp.contains(loc)));
                            sent.claim(&c, 1 + u as u8);
                            sched.urgent_sent(&c);
                        }
                        Served::AlreadyClaimed(_) | Served::Queued(_) => {}
                    }
                }
            });
        }
        for mut scanner in sched.background_scanners(scanners) {
            let (sent, running) = (&sent, &running);
            s.spawn(move || {
                while let Some(c) = scanner.next_claim() {
                    sent.claim(&c, 100);
                }
                drop(scanner);
                // Release: the last scanner out stops the urgent threads.
                running.fetch_sub(1, Ordering::Release);
            });
        }
    });
    // I3 and I1 once every thread is done: nothing dirty, nothing lost.
    assert_eq!(sched.bitmap().dirty_pages(), 0, "I3: pages left dirty");
    assert!(sent.all_once(), "I1: a page was never sent");
    let st = sched.stats();
    assert_eq!(st.urgent_pages + st.background_pages, total);
    st.requests + st.background_claims + st.background_claims_lost
}

#[test]
fn i1_i2_i3_postcopy_preempt_hint_many_rounds() {
    let layout = layout();
    let mut ops = 0;
    for batch in [ClaimBatch::HOST_PAGE, ClaimBatch::DEFAULT, ClaimBatch::WORD] {
        let sched = PageScheduler::new(
            layout.clone(),
            SchedulerConfig::preempt_hint().with_batch(batch),
        )
        .unwrap();
        for r in 0..rounds() {
            ops += postcopy_round(&sched, &layout, 2, 2, u64::from(r) + 1);
        }
    }
    report("postcopy_preempt_hint_many_rounds", ops);
}

#[test]
fn i1_i2_i3_postcopy_vanilla_many_rounds() {
    let layout = layout();
    let mut ops = 0;
    let sched = PageScheduler::new(layout.clone(), SchedulerConfig::vanilla()).unwrap();
    for r in 0..rounds() {
        ops += postcopy_round(&sched, &layout, 1, 1, u64::from(r) + 7);
    }
    report("postcopy_vanilla_many_rounds", ops);
}

/// Dirty logs merged per precopy round (fewer under Miri, which runs about 1000x slower).
const MERGES: u32 = if cfg!(miri) { 20 } else { 200 };

/// Per page: the sequence number of its latest mark, and the highest one a claim collected.
struct Marks {
    marked: Vec<AtomicU32>,
    collected: Vec<AtomicU32>,
}

impl Marks {
    fn collect(&self, layout: &RamLayout, claim: &Claim) {
        for hp in claim.host_pages() {
            for page in hp.page_range() {
                let g = layout
                    .global_index(PageLocation::new(hp.block, page))
                    .unwrap() as usize;
                // Relaxed: the claim's acquire RMW already made the sequence numbers stored
                // before the marks it collected visible to this thread.
                let seq = self.marked[g].load(Ordering::Relaxed);
                self.collected[g].fetch_max(seq, Ordering::Relaxed);
            }
        }
    }
}

/// Precopy: a merger harvests random dirty logs while scanners and an urgent claimer claim.
/// I7: after a final drain, every page's latest mark has been collected.
#[test]
fn i7_precopy_merger_against_claims() {
    let layout = layout();
    let sched = PageScheduler::new(layout.clone(), SchedulerConfig::preempt()).unwrap();
    let total = layout.total_pages() as usize;
    let mut ops = 0;
    for r in 0..rounds() {
        sched.reset();
        let marks = Marks {
            marked: (0..total).map(|_| AtomicU32::new(0)).collect(),
            collected: (0..total).map(|_| AtomicU32::new(0)).collect(),
        };
        let merging = AtomicBool::new(true);
        std::thread::scope(|s| {
            let (marks, merging, layout, sched) = (&marks, &merging, &layout, &sched);
            s.spawn(move || {
                let mut rng = Rng(u64::from(r) * 977 + 3);
                for seq in 1..=MERGES {
                    let block = (rng.next() % 3) as u32;
                    let b = layout.block(block).unwrap();
                    let mut log = vec![0u64; b.pages().div_ceil(64) as usize];
                    for _ in 0..4 {
                        let p = rng.next() % b.pages();
                        log[(p / 64) as usize] |= 1 << (p % 64);
                    }
                    for (i, w) in log.iter().enumerate() {
                        let mut w = *w;
                        while w != 0 {
                            let page = i as u64 * 64 + u64::from(w.trailing_zeros());
                            let g = (b.first_global_page() + page) as usize;
                            // Relaxed: the merge's release fetch_or below publishes it to
                            // the claim that collects the bit.
                            marks.marked[g].store(seq, Ordering::Relaxed);
                            w &= w - 1;
                        }
                    }
                    sched.bitmap().merge_dirty_log(block, &log).unwrap();
                }
                // Release: the scanners stop after the last merge.
                merging.store(false, Ordering::Release);
            });
            for mut scanner in sched.background_scanners(2) {
                s.spawn(move || loop {
                    // Acquire: pairs with the merger's release; its last merge is visible.
                    let last = !merging.load(Ordering::Acquire);
                    while let Some(c) = scanner.next_claim() {
                        marks.collect(layout, &c);
                    }
                    if last {
                        break;
                    }
                });
            }
            s.spawn(move || {
                let mut rng = Rng(u64::from(r) * 131 + 5);
                while merging.load(Ordering::Acquire) {
                    let loc = layout.location_of(rng.next() % total as u64).unwrap();
                    if let Some(c) = sched.bitmap().claim_host_page(loc).unwrap().into_claim() {
                        marks.collect(layout, &c);
                    }
                }
            });
        });
        // the drain: whatever is still dirty must be claimable
        let mut scanner = sched.background();
        while let Some(c) = scanner.next_claim() {
            marks.collect(&layout, &c);
        }
        assert_eq!(
            sched.bitmap().dirty_pages(),
            0,
            "I7: a dirty page no claim can reach"
        );
        for g in 0..total {
            assert_eq!(
                marks.collected[g].load(Ordering::Relaxed),
                marks.marked[g].load(Ordering::Relaxed),
                "I7: page {g}'s latest dirtying was lost"
            );
        }
        let st = sched.stats();
        ops += u64::from(MERGES) + st.background_claims + st.background_claims_lost;
    }
    report("precopy_merger_against_claims", ops);
}
