//! Precopy through the public API: a consumer drains the bitmap with `get_and_clear` while
//! host-page claims and marks race it (I1, I2, I7), and refuses bad ranges (I8). The loom
//! models of the same races are in `loom-tests/tests/loom_bitmap.rs`.

use std::sync::atomic::{AtomicBool, Ordering};

use pagehint::{DirtyBitmap, PageLocation, RamLayout};

mod common;
use common::{mixed_layout, Collected};

/// 4 KiB, 16 KiB and 2 MiB host pages.
fn layout() -> RamLayout {
    mixed_layout(4 << 20, 1 << 20, 8 << 20)
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
fn i1_get_and_clear_hands_over_every_dirty_word_once() {
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
fn i8_get_and_clear_refuses_ranges_past_the_block_and_accepts_empty_buffers() {
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
fn i2_get_and_clear_clears_summaries_of_whole_host_pages_only() {
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
fn i1_i2_get_and_clear_and_host_page_claims_elect_one_owner_per_wide_host_page() {
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
fn i2_get_and_clear_against_claims_keeps_host_pages_whole() {
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
fn i7_marks_racing_get_and_clear_are_never_lost() {
    // I7: a marker marks every page once; a consumer keeps draining; a final drain must
    // hand over every page exactly once.
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    let got = Collected::new(&l);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let total = l.total_pages();
            // a permutation of the pages: multiply by an odd constant modulo a power of two
            let n = total.next_power_of_two();
            for i in 0..n {
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
