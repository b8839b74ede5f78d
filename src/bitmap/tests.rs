//! Unit tests of the bitmap (the property tests are in `tests/proptest_bitmap.rs`).

use super::scan::ScanStep;
use super::*;
use crate::layout::{BlockSpec, HostPage};

fn layout() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("small", 100 * 4096, 4096),
            BlockSpec::new("mid", 256 * 4096, 4 * 4096),
            BlockSpec::new("huge", 4 << 20, 2 << 20),
        ],
    )
    .unwrap()
}

#[test]
fn marks_claims_and_counts() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    bm.mark_all();
    assert_eq!(bm.dirty_pages(), l.total_pages());
    assert_eq!(bm.block_dirty_pages(0).unwrap(), 100);
    assert!(bm
        .claim_page(PageLocation::new(0, 99))
        .unwrap()
        .is_claimed());
    assert!(!bm
        .claim_page(PageLocation::new(0, 99))
        .unwrap()
        .is_claimed());
    let c = bm
        .claim_host_page(PageLocation::new(1, 7))
        .unwrap()
        .into_claim()
        .unwrap();
    assert_eq!(
        c.host_pages().collect::<Vec<_>>(),
        vec![HostPage {
            block: 1,
            first_page: 4,
            pages: 4
        }]
    );
    assert_eq!(c.end(), PageLocation::new(1, 8));
    let c = bm
        .claim_host_page(PageLocation::new(2, 600))
        .unwrap()
        .into_claim()
        .unwrap();
    assert_eq!((c.dirty_pages(), c.pages_to_send()), (512, 512));
    assert!(bm
        .claim_host_page(PageLocation::new(2, 513))
        .unwrap()
        .into_claim()
        .is_none());
    assert_eq!(bm.find_next_dirty_host_page(2, 512).unwrap(), None);
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(0));
    assert_eq!(bm.dirty_pages(), l.total_pages() - 1 - 4 - 512);
}

fn won(step: ScanStep) -> (u64, bool, Claim) {
    match step.found {
        Found::Won(c) => (step.end, step.block_end, c),
        Found::Lost => panic!("lost"),
        Found::Clean => panic!("clean"),
    }
}

#[test]
fn scan_steps_claim_whole_host_pages_and_stop_at_block_ends() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    bm.mark_dirty(PageLocation::new(1, 5)).unwrap();
    bm.mark_dirty(PageLocation::new(1, 30)).unwrap();
    let (end, block_end, c) = won(bm.scan_step(1, 0, 6));
    assert_eq!((end, block_end), (64, false));
    let hps: Vec<_> = c.host_pages().map(|h| h.first_page).collect();
    assert_eq!(hps, vec![4, 28]);
    assert_eq!(c.dirty_pages(), 2);
    assert_eq!(c.pages_to_send(), 8);
    assert_eq!(c.end(), PageLocation::new(1, 32));
    // a batch smaller than the host page still takes whole host pages
    bm.mark_dirty(PageLocation::new(1, 101)).unwrap();
    let (end, _, c) = won(bm.scan_step(1, 64, 0));
    assert_eq!((end, c.host_pages().next().unwrap().first_page), (104, 100));
    // wide host pages: exactly one host page per step
    bm.mark_dirty(PageLocation::new(2, 600)).unwrap();
    let (end, block_end, c) = won(bm.scan_step(2, 0, 3));
    assert_eq!((end, block_end, c.pages_to_send()), (1024, true, 512));
    // a chunk running past a 100-page block ends at the block's end (I3)
    bm.mark_dirty(PageLocation::new(0, 99)).unwrap();
    let (end, block_end, _) = won(bm.scan_step(0, 70, 6));
    assert_eq!((end, block_end), (100, true));
    let step = bm.scan_step(0, 0, 6);
    assert!(matches!(step.found, Found::Clean) && step.end == 100 && step.block_end);
    // a candidate whose bits someone else took first: lost, but scanned past
    bm.mark_dirty(PageLocation::new(2, 10)).unwrap();
    assert!(bm
        .claim_page(PageLocation::new(2, 10))
        .unwrap()
        .is_claimed());
    let step = bm.scan_step(2, 0, 6);
    assert!(matches!(step.found, Found::Lost) && step.end == 512 && !step.block_end);
}

#[test]
fn dirtying_after_a_claim_is_claimable_again() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    let loc = PageLocation::new(2, 1000);
    bm.mark_dirty(loc).unwrap();
    assert!(bm.claim_host_page(loc).unwrap().into_claim().is_some());
    bm.mark_dirty(loc).unwrap();
    assert_eq!(
        bm.claim_host_page(loc)
            .unwrap()
            .into_claim()
            .unwrap()
            .dirty_pages(),
        1
    );
}

#[test]
fn dirty_log_merge_checks_shape_and_sets_summaries() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    assert_eq!(bm.merge_dirty_log(0, &[0, 0]), Ok(0));
    assert_eq!(
        bm.merge_dirty_log(0, &[0, 1 << 36]),
        Err(DirtyLogError::BitsPastEnd { block: 0 })
    );
    assert_eq!(
        bm.merge_dirty_log(0, &[0]),
        Err(DirtyLogError::WrongLength {
            block: 0,
            expected: 2,
            got: 1
        })
    );
    assert!(matches!(
        bm.merge_dirty_log(9, &[]),
        Err(DirtyLogError::Location(_))
    ));
    assert_eq!(bm.dirty_pages(), 0, "refused logs change nothing");
    let mut log = vec![0u64; 16];
    log[9] = 0b11; // host page 1 of the huge block
    log[15] = 1 << 63;
    assert_eq!(bm.merge_dirty_log(2, &log).unwrap(), 3);
    assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(512));
    let c = bm
        .claim_host_page(PageLocation::new(2, 512))
        .unwrap()
        .into_claim()
        .unwrap();
    assert_eq!(c.dirty_pages(), 3);
}

#[test]
fn out_of_range_is_an_error_not_a_panic() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    assert!(bm.mark_dirty(PageLocation::new(0, 100)).is_err());
    assert!(bm.mark_dirty(PageLocation::new(3, 0)).is_err());
    assert!(bm.mark_range(1, 250, 7).is_err());
    assert!(bm.mark_range(1, 0, 0).is_err());
    assert!(bm.claim_host_page(PageLocation::new(2, 1024)).is_err());
    assert!(bm.is_dirty(PageLocation::new(u32::MAX, 0)).is_err());
    assert_eq!(bm.find_next_dirty(0, 1000).unwrap(), None);
    assert_eq!(bm.dirty_pages(), 0);
}

#[test]
fn dirty_words_copy_every_block_as_is_dirty_sees_it_and_clear_nothing() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    for (b, p) in [
        (0, 0),
        (0, 63),
        (0, 64),
        (0, 99),
        (1, 5),
        (1, 255),
        (2, 513),
        (2, 1023),
    ] {
        bm.mark_dirty(PageLocation::new(b, p)).unwrap();
    }
    for b in 0..3u32 {
        let mut out = vec![0u64; bm.block_words(b).unwrap()];
        let n = bm.dirty_words(b, 0, &mut out).unwrap();
        assert_eq!(n, bm.block_dirty_pages(b).unwrap());
        for p in 0..l.blocks()[b as usize].pages() {
            let bit = out[(p / 64) as usize] >> (p % 64) & 1 == 1;
            assert_eq!(
                bit,
                bm.is_dirty(PageLocation::new(b, p)).unwrap(),
                "{b}/{p}"
            );
        }
    }
    assert_eq!(bm.dirty_pages(), 8);
    let words = bm.block_words(1).unwrap();
    let mut tail = [0u64; 1];
    assert_eq!(bm.dirty_words(1, words - 1, &mut tail).unwrap(), 1);
    assert_eq!(tail, [1 << 63]);
    assert!(bm.dirty_words(1, words, &mut tail).is_err());
    assert!(bm.dirty_words(3, 0, &mut tail).is_err());
    assert!(bm.dirty_words(0, usize::MAX, &mut tail).is_err());
}

#[test]
fn find_next_crosses_groups() {
    let l = RamLayout::single("m", 64 * 4096 * 40, 4096).unwrap();
    let bm = DirtyBitmap::new(&l).unwrap();
    bm.mark_dirty(PageLocation::new(0, 64 * 37 + 5)).unwrap();
    assert_eq!(bm.find_next_dirty(0, 1).unwrap(), Some(64 * 37 + 5));
    assert_eq!(bm.find_next_dirty(0, 64 * 37 + 6).unwrap(), None);
}

#[test]
fn host_page_may_be_dirty_answers_for_the_whole_host_page_only() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    // A dirty page in the middle of a 4-page host page (block 1) and of a 512-page one
    // (block 2, wide: the summary bit).
    bm.mark_dirty(PageLocation::new(1, 9)).unwrap();
    bm.mark_dirty(PageLocation::new(2, 700)).unwrap();
    for (block, page, dirty) in [
        (0, 0, false),
        (1, 8, true),
        (1, 11, true),
        (1, 7, false),
        (1, 12, false),
        (2, 512, true),
        (2, 1023, true),
        (2, 511, false),
        (2, 1024, false),
        // Outside the bitmap: never dirty.
        (1, 256, false),
        (3, 0, false),
    ] {
        assert_eq!(
            bm.host_page_may_be_dirty(block, page),
            dirty,
            "block {block} page {page}"
        );
    }
    // Once the host page is claimed, it is clean.
    let _sent = bm
        .claim_host_page(PageLocation::new(2, 700))
        .unwrap()
        .into_claim()
        .unwrap();
    assert!(!bm.host_page_may_be_dirty(2, 512));
}

/// The dirty count's per-thread slots: a thread takes an owned slot on its first count and
/// gives it back when it exits, so a stream of short-lived threads never runs out of owned
/// slots (without the give-back, the 17th thread would be on a shared one), and the counts
/// each left in a slot are continued, not lost, by the slot's next owner.
#[test]
fn count_slots_are_given_back_at_thread_exit_and_continued() {
    let bm = DirtyBitmap::new(&RamLayout::single("m", 64 << 20, 4096).unwrap()).unwrap();
    let threads = if cfg!(miri) { 20 } else { 200 };
    for t in 0..threads {
        let owned = std::thread::scope(|s| {
            s.spawn(|| {
                bm.mark_range(0, t * 64, 64).unwrap();
                crate::sync::thread_slot()
            })
            .join()
            .unwrap()
        });
        // Other tests' threads may hold some owned slots meanwhile, never all 16.
        assert!(
            usize::from(owned) < 16,
            "thread {t} got shared slot {owned}"
        );
    }
    assert_eq!(bm.dirty_count(), threads * 64);
    assert_eq!(bm.pages_dirtied(), threads * 64);
    assert_eq!(bm.dirty_pages(), threads * 64);
}
