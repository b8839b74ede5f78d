//! The VMM-facing additions, through the public API: precopy `get_and_clear`, dirty logs at a
//! page offset, KVM dirty rings, several background senders, postcopy recovery, and a bitmap
//! shared between guest memory and the scheduler. Invariants are the design's I1–I8.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pagehint::vmm::{DirtyRingEntry, KvmSlots, SlotMapping};
use pagehint::{
    AttachError, BlockSpec, ClaimBatch, DirtyBitmap, DirtyLogError, LayoutMismatch, PageLocation,
    PageScheduler, RamLayout, RecoveryError, SchedulerConfig, Served, UrgentRequest,
};
use proptest::prelude::*;

/// 4 KiB, 16 KiB and 2 MiB host pages.
fn layout() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("pc.ram", 4 << 20, 4096),
            BlockSpec::new("mid", 1 << 20, 16 << 10),
            BlockSpec::new("huge", 8 << 20, 2 << 20),
        ],
    )
    .unwrap()
}

/// Counts, per global page, how many times it was collected; panics on a second collection.
struct Collected {
    layout: RamLayout,
    pages: Vec<AtomicU8>,
}

impl Collected {
    fn new(layout: &RamLayout) -> Self {
        Self {
            layout: layout.clone(),
            pages: (0..layout.total_pages())
                .map(|_| AtomicU8::new(0))
                .collect(),
        }
    }
    fn page(&self, block: u32, page: u64, by: u8) {
        let g = self
            .layout
            .global_index(PageLocation::new(block, page))
            .unwrap();
        let prev = self.pages[g as usize].swap(by, Ordering::Relaxed);
        assert_eq!(
            prev, 0,
            "I1: block {block} page {page} collected twice ({prev}, {by})"
        );
    }
    fn words(&self, block: u32, from_word: usize, words: &[u64], by: u8) {
        for (i, &w) in words.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let page = ((from_word + i) as u64) * 64 + u64::from(bits.trailing_zeros());
                self.page(block, page, by);
                bits &= bits - 1;
            }
        }
    }
    fn claim(&self, c: &pagehint::Claim, by: u8) {
        for hp in c.host_pages() {
            for p in hp.page_range() {
                self.page(hp.block, p, by);
            }
        }
    }
    fn all_once(&self) -> bool {
        self.pages.iter().all(|p| p.load(Ordering::Relaxed) != 0)
    }
}

/// Drains every block through `get_and_clear`, `chunk` words at a time.
fn drain(bm: &DirtyBitmap, chunk: usize, mut f: impl FnMut(u32, usize, &[u64])) -> u64 {
    let mut buf = vec![0u64; chunk];
    let mut total = 0;
    for block in 0..bm.blocks() as u32 {
        let words = bm.block_words(block).unwrap();
        let mut from = 0;
        while from < words {
            let n = chunk.min(words - from);
            total += bm.get_and_clear(block, from, &mut buf[..n]).unwrap();
            f(block, from, &buf[..n]);
            from += n;
        }
    }
    total
}

#[test]
fn get_and_clear_hands_over_every_dirty_word_once() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    bm.mark_all();
    let got = Collected::new(&l);
    // 3 words per call: cuts 2 MiB host pages (8 words) at uneven places.
    assert_eq!(
        drain(&bm, 3, |b, from, w| got.words(b, from, w, 1)),
        l.total_pages()
    );
    assert!(got.all_once());
    assert_eq!(bm.dirty_pages(), 0);
    // Host pages cut by a call's range keep their (now stale) summary bit: a host-page claim
    // finds nothing there and clears it.
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(0));
    for p in (0..2048).step_by(512) {
        assert!(bm
            .claim_host_page(PageLocation::new(2, p))
            .unwrap()
            .into_claim()
            .is_none());
    }
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), None);
    assert_eq!(
        drain(&bm, 5, |_, _, w| assert!(w.iter().all(|&x| x == 0))),
        0
    );
    // Host-page-aligned calls leave no stale summary.
    bm.mark_all();
    assert_eq!(drain(&bm, 8, |_, _, _| {}), l.total_pages());
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), None);
}

#[test]
fn get_and_clear_refuses_ranges_past_the_block_and_accepts_empty_buffers() {
    let bm = DirtyBitmap::new(&layout()).unwrap();
    bm.mark_all();
    let words = bm.block_words(0).unwrap();
    assert_eq!(words, 16);
    let mut out = [7u64; 4];
    assert!(bm.get_and_clear(0, 13, &mut out).is_err());
    assert!(bm.get_and_clear(0, usize::MAX, &mut out).is_err());
    assert!(bm.get_and_clear(9, 0, &mut out).is_err());
    assert_eq!(out, [7; 4], "a refused call writes nothing");
    assert_eq!(bm.get_and_clear(0, 16, &mut []), Ok(0));
    assert!(bm.get_and_clear(0, 17, &mut []).is_err());
    assert_eq!(
        bm.dirty_pages(),
        layout().total_pages(),
        "I8: nothing changed"
    );
}

#[test]
fn get_and_clear_clears_summaries_of_whole_host_pages_only() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    // huge block: host page 0 = words 0..8, host page 1 = words 8..16
    bm.mark_range(2, 0, 1024).unwrap();
    let mut out = [0u64; 10]; // words 3..13: host page 0 cut, host page 1 cut
    assert_eq!(bm.get_and_clear(2, 3, &mut out).unwrap(), 640);
    // Both host pages still hold dirty pages, and both are still found by a host-page scan.
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(0));
    assert_eq!(bm.find_next_dirty_host_page(2, 512).unwrap(), Some(512));
    assert_eq!(
        bm.claim_host_page(PageLocation::new(2, 0))
            .unwrap()
            .into_claim()
            .unwrap()
            .dirty_pages(),
        192
    );
    // words 8..16: host page 1 whole: its summary goes with it
    let mut out = [0u64; 8];
    assert_eq!(bm.get_and_clear(2, 8, &mut out).unwrap(), 192);
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), None);
}

#[test]
fn get_and_clear_and_host_page_claims_elect_one_owner_per_wide_host_page() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    bm.mark_range(2, 0, 2048).unwrap();
    // a claim wins host page 1: get_and_clear of its words reads zeros
    assert!(bm
        .claim_host_page(PageLocation::new(2, 600))
        .unwrap()
        .into_claim()
        .is_some());
    let mut out = [0u64; 32];
    assert_eq!(bm.get_and_clear(2, 0, &mut out).unwrap(), 512 * 3);
    assert!(out[8..16].iter().all(|&w| w == 0));
    assert!(out[..8].iter().chain(&out[16..]).all(|&w| w == !0));
    // get_and_clear won host pages 0, 2, 3: claims find nothing
    for p in [0, 1024, 1536] {
        assert!(bm
            .claim_host_page(PageLocation::new(2, p))
            .unwrap()
            .into_claim()
            .is_none());
    }
    // marks after the collection are claimable again (I7)
    bm.mark_dirty(PageLocation::new(2, 1100)).unwrap();
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(1024));
}

#[test]
fn get_and_clear_against_claims_keeps_host_pages_whole() {
    // I1 + I2 on real threads: every page dirty at the start; a precopy consumer drains
    // host-page-aligned ranges while a host-page claimer works from the other end.
    for round in 0..20 {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_all();
        let got = Collected::new(&l);
        std::thread::scope(|s| {
            s.spawn(|| {
                // 8 words = one 2 MiB host page; narrow blocks keep host pages in a word anyway
                drain(&bm, 8, |b, from, w| {
                    got.words(b, from, w, 1);
                    if b == 2 {
                        let ones: u32 = w.iter().map(|x| x.count_ones()).sum();
                        assert!(
                            ones == 0 || ones == 512,
                            "I2: host page split ({ones} pages)"
                        );
                    }
                });
            });
            s.spawn(|| {
                for block in (0..3u32).rev() {
                    let pages = l.blocks()[block as usize].pages();
                    let step = l.blocks()[block as usize].host_page_pages();
                    let mut p = pages;
                    while p > 0 {
                        p -= step;
                        if let Some(c) = bm
                            .claim_host_page(PageLocation::new(block, p))
                            .unwrap()
                            .into_claim()
                        {
                            assert_eq!(c.dirty_pages(), step, "I2: round {round}");
                            got.claim(&c, 2);
                        }
                    }
                }
            });
        });
        assert!(got.all_once(), "I1: a page was lost");
    }
}

#[test]
fn marks_racing_get_and_clear_are_never_lost() {
    // I7: a marker marks every page once (writing a version first); a consumer keeps
    // draining; a final drain must hand over every page exactly once.
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    let got = Collected::new(&l);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let total = l.total_pages();
            // a permutation of the pages: multiply by an odd constant modulo a power of two
            let n = total.next_power_of_two();
            for i in 0..n {
                x = x.wrapping_add(1);
                let g = (i.wrapping_mul(0x5851_f42d_4c95_7f2d | 1)) % n;
                if g < total {
                    let loc = l.location_of(g).unwrap();
                    bm.mark_dirty(loc).unwrap();
                }
            }
            done.store(true, Ordering::Release);
        });
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                drain(&bm, 5, |b, from, w| got.words(b, from, w, 1));
            }
        });
    });
    drain(&bm, 64, |b, from, w| got.words(b, from, w, 2));
    assert!(got.all_once(), "I7: a mark was lost");
    assert_eq!(bm.dirty_pages(), 0);
    for block in 0..3 {
        assert_eq!(bm.find_next_dirty_host_page(block, 0).unwrap(), None);
    }
}

proptest! {
    /// `merge_dirty_log_at` marks exactly the log's pages, at any offset, and keeps host-page
    /// scans (summary bits) in step with the page bits.
    #[test]
    fn merge_at_offset_matches_per_page_marks(
        block in 0u32..3,
        first_frac in 0.0f64..1.0,
        len_frac in 0.0f64..1.0,
        seed in any::<u64>(),
        density in 0u32..4,
    ) {
        let l = layout();
        let pages = l.blocks()[block as usize].pages();
        let first = ((pages - 1) as f64 * first_frac) as u64;
        let count = 1 + ((pages - first - 1) as f64 * len_frac) as u64;
        let mut x = seed | 1;
        let mut log = vec![0u64; count.div_ceil(64) as usize];
        let mut expect = Vec::new();
        for i in 0..count {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            if x % 8 < u64::from(density) {
                log[(i / 64) as usize] |= 1 << (i % 64);
                expect.push(first + i);
            }
        }
        let bm = DirtyBitmap::new(&l).unwrap();
        prop_assert_eq!(bm.merge_dirty_log_at(block, first, count, &log).unwrap(), expect.len() as u64);
        let mut got = Vec::new();
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty(block, from).unwrap() {
            got.push(p);
            from = p + 1;
        }
        prop_assert_eq!(&got, &expect);
        // every host page with a dirty page is found by a host-page scan and claimed whole
        let mut claimed = 0;
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty_host_page(block, from).unwrap() {
            if let Some(c) = bm.claim_host_page(PageLocation::new(block, p)).unwrap().into_claim() {
                claimed += c.dirty_pages();
            }
            from = p + l.blocks()[block as usize].host_page_pages();
        }
        prop_assert_eq!(claimed, expect.len() as u64);
        prop_assert_eq!(bm.dirty_pages(), 0);
    }
}

#[test]
fn merge_at_offset_refuses_bad_logs_whole() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    assert!(matches!(
        bm.merge_dirty_log_at(0, 1000, 100, &[1, 1]),
        Err(DirtyLogError::Location(_))
    ));
    assert!(matches!(
        bm.merge_dirty_log_at(0, 10, 100, &[1]),
        Err(DirtyLogError::WrongLength {
            expected: 2,
            got: 1,
            ..
        })
    ));
    assert!(matches!(
        bm.merge_dirty_log_at(0, 10, 100, &[1, 1 << 36]),
        Err(DirtyLogError::BitsPastEnd { .. })
    ));
    assert!(matches!(
        bm.merge_dirty_log_at(0, 10, 0, &[]),
        Err(DirtyLogError::Location(_))
    ));
    assert_eq!(bm.dirty_pages(), 0);
}

#[test]
fn dirty_ring_import_races_claims_without_loss() {
    // I1 + I7: a harvester imports ring batches (each page once) while a claimer keeps
    // claiming; a final sweep collects the rest. Bits are only set by marks, so collecting
    // exactly as many dirty pages as were marked means each page was collected once.
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    let mut slots = KvmSlots::new();
    // Slot 5 maps the huge block from page 100 (not word aligned), slot 6 the start of it.
    slots
        .insert(
            &l,
            SlotMapping {
                slot: 5,
                block: 2,
                first_page: 100,
                pages: 1948,
            },
        )
        .unwrap();
    slots
        .insert(
            &l,
            SlotMapping {
                slot: 6,
                block: 2,
                first_page: 0,
                pages: 100,
            },
        )
        .unwrap();
    let done = AtomicBool::new(false);
    let sweep = || {
        let mut n = 0;
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty_host_page(2, from).unwrap() {
            if let Some(c) = bm
                .claim_host_page(PageLocation::new(2, p))
                .unwrap()
                .into_claim()
            {
                assert_eq!(c.host_page_count(), 1, "I2");
                n += c.dirty_pages();
            }
            from = p + 512;
        }
        n
    };
    let collected = std::thread::scope(|s| {
        s.spawn(|| {
            let entries: Vec<_> = (0..1948u64)
                .map(|o| DirtyRingEntry::new(5, (o * 7) % 1948))
                .chain((0..100).map(|o| DirtyRingEntry::new(6, o)))
                .collect();
            for batch in entries.chunks(37) {
                let r = slots.import_dirty_ring(&bm, batch.iter().copied());
                assert_eq!((r.marked, r.rejected), (batch.len() as u64, 0));
            }
            done.store(true, Ordering::Release);
        });
        s.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::Acquire) {
                n += sweep();
            }
            n
        })
        .join()
        .unwrap()
    });
    assert_eq!(
        collected + sweep(),
        2048,
        "I1/I7: pages lost or collected twice"
    );
    assert_eq!(bm.dirty_pages(), 0);
    assert_eq!(slots.stats().ring_entries, 2048);
}

#[test]
fn several_background_senders_send_each_page_once_and_done_means_clean() {
    for (seed, scanners, config) in [
        (1u64, 2usize, SchedulerConfig::preempt_hint()),
        (
            2,
            3,
            SchedulerConfig::preempt_hint().with_batch(ClaimBatch::HOST_PAGE),
        ),
        (
            3,
            4,
            SchedulerConfig::preempt_hint().with_batch(ClaimBatch::WORD),
        ),
        (4, 3, SchedulerConfig::vanilla()),
        (5, 2, SchedulerConfig::preempt()),
    ] {
        let l = layout();
        let sched = PageScheduler::new(l.clone(), config).unwrap();
        sched.bitmap().mark_all();
        let got = Collected::new(&l);
        let finished = std::sync::atomic::AtomicUsize::new(0);
        let dirty_at_done = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut x = seed;
                for _ in 0..5_000 {
                    if finished.load(Ordering::Relaxed) == scanners {
                        break;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let loc = l.location_of(x % l.total_pages()).unwrap();
                    if let Served::Send(c) = sched
                        .serve(UrgentRequest::new(loc.block, loc.page * 4096, 4096))
                        .unwrap()
                    {
                        got.claim(&c, 1);
                        sched.urgent_sent(&c);
                    }
                }
            });
            for (i, scanner) in sched.background_scanners(scanners).into_iter().enumerate() {
                let (got, sched, finished, dirty_at_done) =
                    (&got, &sched, &finished, &dirty_at_done);
                s.spawn(move || {
                    for c in scanner {
                        got.claim(&c, 2 + i as u8);
                    }
                    // I3: this scanner's "done" means no host page left to claim.
                    let left: Vec<_> = (0..3)
                        .filter_map(|b| sched.bitmap().find_next_dirty_host_page(b, 0).unwrap())
                        .collect();
                    dirty_at_done.lock().unwrap().push(left);
                    finished.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        assert!(
            dirty_at_done
                .into_inner()
                .unwrap()
                .iter()
                .all(Vec::is_empty),
            "I3: a scanner reported done while pages were dirty"
        );
        assert!(got.all_once(), "I1: a page was lost");
        let st = sched.stats();
        assert_eq!(st.urgent_pages + st.background_pages, l.total_pages());
        assert_eq!(st.rounds, scanners as u64);
        assert!(
            st.hints_taken <= st.hints_accepted,
            "I4: a hint was taken twice"
        );
    }
}

#[test]
fn background_scanners_start_evenly_spaced_on_host_page_boundaries() {
    let sched = PageScheduler::new(layout(), SchedulerConfig::default()).unwrap();
    assert!(sched.background_scanners(0).is_empty());
    let starts: Vec<_> = sched
        .background_scanners(4)
        .iter()
        .map(|s| s.position())
        .collect();
    // 1024 + 256 + 2048 pages: global 0, 832, 1664, 2496
    assert_eq!(
        starts,
        vec![
            PageLocation::new(0, 0),
            PageLocation::new(0, 832),
            PageLocation::new(2, 0), // global 1664 = huge page 384, host page 0
            PageLocation::new(2, 1024)  // global 2496 = huge page 1216, host page 2
        ]
    );
    // more scanners than pages: still valid positions
    let tiny = PageScheduler::new("a:8K".parse().unwrap(), SchedulerConfig::default()).unwrap();
    assert_eq!(tiny.background_scanners(5).len(), 5);
}

#[test]
fn shared_bitmap_attaches_to_one_scheduler_at_a_time() {
    let l = layout();
    let bm = Arc::new(DirtyBitmap::new(&l).unwrap());
    let other: RamLayout = "pc.ram:4M,mid:1M:16K,huge:8M:4K".parse().unwrap();
    assert_eq!(
        PageScheduler::with_bitmap(other, Arc::clone(&bm), SchedulerConfig::default()).err(),
        Some(AttachError::Layout(LayoutMismatch::BlockShape { block: 2 }))
    );
    let fewer: RamLayout = "pc.ram:4M".parse().unwrap();
    assert_eq!(
        PageScheduler::with_bitmap(fewer, Arc::clone(&bm), SchedulerConfig::default()).err(),
        Some(AttachError::Layout(LayoutMismatch::BlockCount {
            bitmap: 3,
            layout: 1
        }))
    );
    bm.mark_range(1, 0, 8).unwrap();
    let sched =
        PageScheduler::with_bitmap(l.clone(), Arc::clone(&bm), SchedulerConfig::default()).unwrap();
    assert!(Arc::ptr_eq(&sched.shared_bitmap(), &bm));
    assert_eq!(
        PageScheduler::with_bitmap(l.clone(), Arc::clone(&bm), SchedulerConfig::default()).err(),
        Some(AttachError::InUse)
    );
    let sent: u64 = sched.background().map(|c| c.dirty_pages()).sum();
    assert_eq!(
        sent, 8,
        "the scheduler sends what was marked before it existed"
    );
    drop(sched);
    assert!(PageScheduler::with_bitmap(l, bm, SchedulerConfig::default()).is_ok());
}

/// Received bitmap of block `b` from a per-page predicate.
fn received(l: &RamLayout, b: u32, f: impl Fn(u64) -> bool) -> Vec<u64> {
    let pages = l.blocks()[b as usize].pages();
    let mut w = vec![0u64; pages.div_ceil(64) as usize];
    for p in (0..pages).filter(|&p| f(p)) {
        w[(p / 64) as usize] |= 1 << (p % 64);
    }
    w
}

#[test]
fn recovery_resends_exactly_what_the_destination_lacks() {
    // A postcopy migration breaks part way; the destination reports what it received (the
    // pages sent before the break, except the ones in flight); recovery and a resumed round
    // complete it: every page received, none sent twice after the break.
    let l = layout();
    let mut sched = PageScheduler::new(l.clone(), SchedulerConfig::preempt_hint()).unwrap();
    sched.bitmap().mark_all();
    let dest: Vec<AtomicU8> = (0..l.total_pages()).map(|_| AtomicU8::new(0)).collect();
    let receive = |c: &pagehint::Claim| {
        for hp in c.host_pages() {
            for p in hp.page_range() {
                let g = l.global_index(PageLocation::new(hp.block, p)).unwrap();
                assert_eq!(
                    dest[g as usize].swap(1, Ordering::Relaxed),
                    0,
                    "I1: received twice"
                );
            }
        }
    };
    {
        let mut scanner = sched.background_from(PageLocation::new(1, 0));
        for _ in 0..20 {
            receive(&scanner.next_claim().unwrap());
        }
        // in flight when the connection broke: claimed, never received
        let _lost = scanner.next_claim().unwrap();
        // block 1 (16 claims) and block 2 (4 claims) are sent; block 0's first chunk is lost
        match sched.serve(UrgentRequest::new(0, 2 << 20, 4096)).unwrap() {
            Served::Send(c) => {
                receive(&c);
                sched.urgent_sent(&c); // leaves a hint, which recovery must drop
            }
            other => panic!("page 512 of block 0 is still dirty: {other:?}"),
        }
    }
    assert!(sched.hint().peek().is_some());
    let mut left = 0;
    for b in 0..3u32 {
        let rx = received(&l, b, |p| {
            let g = l.global_index(PageLocation::new(b, p)).unwrap();
            dest[g as usize].load(Ordering::Relaxed) != 0
        });
        left += sched.recover_block(b, &rx).unwrap();
    }
    assert_eq!(
        sched.hint().peek(),
        None,
        "the broken connection's hint is dropped"
    );
    let before = dest
        .iter()
        .filter(|d| d.load(Ordering::Relaxed) != 0)
        .count() as u64;
    assert_eq!(left, l.total_pages() - before);
    // resume with two senders
    std::thread::scope(|s| {
        for scanner in sched.background_scanners(2) {
            let receive = &receive;
            s.spawn(move || scanner.for_each(|c| receive(&c)));
        }
    });
    assert!(
        dest.iter().all(|d| d.load(Ordering::Relaxed) == 1),
        "I1: a page never arrived"
    );
}

#[test]
fn recovery_refuses_malformed_received_bitmaps_and_shared_handles() {
    let l = layout();
    let mut sched = PageScheduler::new(l.clone(), SchedulerConfig::default()).unwrap();
    sched.bitmap().mark_all();
    let before = sched.bitmap().dirty_pages();
    assert!(matches!(
        sched.recover_block(0, &[0; 3]),
        Err(RecoveryError::Received(DirtyLogError::WrongLength { .. }))
    ));
    assert!(matches!(
        sched.recover_block(7, &[]),
        Err(RecoveryError::Received(DirtyLogError::Location(_)))
    ));
    // "mid" has 256 pages: 4 full words, no tail; "pc.ram" has 1024. Make a block with a tail:
    let odd = PageScheduler::new("a:72K".parse().unwrap(), SchedulerConfig::default());
    let mut odd = odd.unwrap();
    assert!(matches!(
        odd.recover_block(0, &[1 << 18]),
        Err(RecoveryError::Received(DirtyLogError::BitsPastEnd { .. }))
    ));
    assert_eq!(odd.recover_block(0, &[0b101]).unwrap(), 16);
    assert_eq!(
        sched.bitmap().dirty_pages(),
        before,
        "I8: refused input changes nothing"
    );

    let mut shared = Arc::new(sched);
    let handle = Arc::clone(&shared);
    let weak = Arc::downgrade(&shared);
    assert_eq!(
        PageScheduler::recover_shared(&mut shared, 1, &[0; 4]),
        Err(RecoveryError::SendersActive { handles: 1 })
    );
    drop(handle);
    assert_eq!(
        PageScheduler::recover_shared(&mut shared, 1, &[0; 4]),
        Err(RecoveryError::SendersActive { handles: 1 }),
        "a weak handle may be upgraded by a sender: refused too"
    );
    drop(weak);
    assert_eq!(
        PageScheduler::recover_shared(&mut shared, 1, &[!0; 4]),
        Ok(0)
    );
}

#[test]
fn recovery_rebuilds_wide_host_page_summaries() {
    let l = layout();
    let mut sched = PageScheduler::new(l.clone(), SchedulerConfig::default()).unwrap();
    sched.bitmap().mark_all();
    // destination received all of the huge block but one page of host page 2
    let rx = received(&l, 2, |p| p != 1030);
    assert_eq!(sched.recover_block(2, &rx).unwrap(), 1);
    assert_eq!(
        sched.bitmap().find_next_dirty_host_page(2, 0).unwrap(),
        Some(1024)
    );
    let c = sched
        .bitmap()
        .claim_host_page(PageLocation::new(2, 1024))
        .unwrap()
        .into_claim()
        .unwrap();
    assert_eq!((c.dirty_pages(), c.pages_to_send()), (1, 512));
    assert_eq!(
        sched.bitmap().find_next_dirty_host_page(2, 0).unwrap(),
        None
    );
}
