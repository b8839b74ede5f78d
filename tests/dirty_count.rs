//! The O(1) dirty count and the dirty rate on std threads: markers (page, range, dirty-log
//! merge) race claimers (page, host page, drain, background scanners); a reader polls the
//! count, which must stay within `0..=pages` with `pages_dirtied` never going down; when the
//! threads are joined the count equals the bits, and `pages_dirtied` equals what was taken
//! plus what is left.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagehint::{
    ClaimBatch, DirtyBitmap, DirtyRate, PageLocation, PageScheduler, RamLayout, SchedulerConfig,
};

mod common;
use common::{mixed_layout, Rng};

#[test]
fn count_stays_in_bounds_while_running_and_is_exact_when_quiet() {
    let layout = mixed_layout(1 << 20, 1 << 20, 4 << 20);
    let total = layout.total_pages();
    for round in 0..if cfg!(miri) { 1 } else { 8 } {
        let bitmap = DirtyBitmap::new(&layout).unwrap();
        let taken = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let ops = if cfg!(miri) { 200 } else { 20_000 };
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (bitmap, done) = (&bitmap, &done);
                s.spawn(move || {
                    let mut rng = Rng(0x1234_5678 + t + 7 * round);
                    for _ in 0..ops {
                        let block = (rng.next() % 3) as u32;
                        let pages = bitmap.block_words(block).unwrap() as u64 * 64;
                        let page = rng.next() % pages;
                        match rng.next() % 3 {
                            0 => bitmap.mark_dirty(PageLocation::new(block, page)).unwrap(),
                            1 => {
                                let n = 1 + rng.next() % 100;
                                let _ = bitmap.mark_range(block, page, n.min(pages - page));
                            }
                            _ => {
                                let words = bitmap.block_words(block).unwrap();
                                let log: Vec<u64> = (0..words)
                                    .map(|_| rng.next() & rng.next() & rng.next())
                                    .collect();
                                bitmap.merge_dirty_log(block, &log).unwrap();
                            }
                        }
                    }
                    // Relaxed: a progress count for the reader; the scope's join orders the rest.
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
            for t in 0..2u64 {
                let (bitmap, taken, done) = (&bitmap, &taken, &done);
                s.spawn(move || {
                    let mut rng = Rng(0x9abc_def1 + t + 7 * round);
                    let mut buf = [0u64; 8];
                    for _ in 0..ops {
                        let block = (rng.next() % 3) as u32;
                        let words = bitmap.block_words(block).unwrap();
                        let page = rng.next() % (words as u64 * 64);
                        let n = match rng.next() % 3 {
                            0 => u64::from(
                                bitmap
                                    .claim_page(PageLocation::new(block, page))
                                    .unwrap()
                                    .is_claimed(),
                            ),
                            1 => bitmap
                                .claim_host_page(PageLocation::new(block, page))
                                .unwrap()
                                .into_claim()
                                .map_or(0, |c| c.dirty_pages()),
                            _ => {
                                let from = (page / 64) as usize;
                                let n = buf.len().min(words - from);
                                bitmap.get_and_clear(block, from, &mut buf[..n]).unwrap()
                            }
                        };
                        // Relaxed: bookkeeping, read after the joins.
                        taken.fetch_add(n, Ordering::Relaxed);
                    }
                    // Relaxed: as above.
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
            s.spawn(|| {
                let mut last = 0;
                // Relaxed: progress only; the scope's join orders the rest.
                while done.load(Ordering::Relaxed) < 4 {
                    let c = bitmap.dirty_count();
                    assert!(c <= total, "{c} dirty pages of {total}");
                    let d = bitmap.pages_dirtied();
                    assert!(d >= last, "pages_dirtied went down: {last} -> {d}");
                    last = d;
                    std::hint::spin_loop();
                }
            });
        });
        let bits = bitmap.dirty_pages();
        assert_eq!(bitmap.dirty_count(), bits, "exact when quiet");
        // Relaxed: read after the joins.
        let taken = taken.load(Ordering::Relaxed);
        assert_eq!(bitmap.pages_dirtied(), bits + taken);
    }
}

/// More threads than the count has owned slots (16): the rest share four slots with RMWs,
/// threads come and go (their slots are taken over by the next ones), and the count is still
/// exact when quiet.
#[test]
fn count_is_exact_with_more_threads_than_slots_and_thread_churn() {
    let layout = RamLayout::single("m", 64 << 20, 4096).unwrap(); // 16384 pages
    let bitmap = DirtyBitmap::new(&layout).unwrap();
    let (waves, threads) = if cfg!(miri) { (2, 20) } else { (6, 40) };
    let taken = AtomicU64::new(0);
    for wave in 0..waves {
        std::thread::scope(|s| {
            for t in 0..threads {
                let (bitmap, taken) = (&bitmap, &taken);
                s.spawn(move || {
                    let mut rng = Rng(0x5eed + t + 1000 * wave);
                    for _ in 0..if cfg!(miri) { 20 } else { 2000 } {
                        let page = rng.next() % 16384;
                        if t % 2 == 0 {
                            bitmap.mark_dirty(PageLocation::new(0, page)).unwrap();
                        } else if bitmap
                            .claim_page(PageLocation::new(0, page))
                            .unwrap()
                            .is_claimed()
                        {
                            // Relaxed: bookkeeping, read after the joins.
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let bits = bitmap.dirty_pages();
        assert_eq!(bitmap.dirty_count(), bits, "wave {wave}: exact when quiet");
        // Relaxed: read after the joins.
        let taken = taken.load(Ordering::Relaxed);
        assert_eq!(bitmap.pages_dirtied(), bits + taken, "wave {wave}");
    }
}

/// Background scanners count their claims in batches: while a scanner lives mid-round the
/// count may lag, and once the round ends (or the scanner is dropped) it is exact.
#[test]
fn scanners_count_their_claims_when_they_publish() {
    let layout: RamLayout = "a:4M,b:4M:2M".parse().unwrap();
    let sched = PageScheduler::new(
        layout,
        SchedulerConfig::preempt().with_batch(ClaimBatch::HOST_PAGE),
    )
    .unwrap();
    sched.bitmap().mark_all();
    let total = sched.layout().total_pages();
    assert_eq!(sched.bitmap().dirty_count(), total);
    let mut scanner = sched.background();
    let first = scanner.next_claim().unwrap();
    assert_eq!(sched.bitmap().dirty_pages(), total - first.dirty_pages());
    assert_eq!(sched.bitmap().dirty_count(), total, "not published yet");
    drop(scanner);
    assert_eq!(sched.bitmap().dirty_count(), total - first.dirty_pages());
    std::thread::scope(|s| {
        for scanner in sched.background_scanners(3) {
            s.spawn(move || for _claim in scanner {});
        }
    });
    assert_eq!(sched.bitmap().dirty_count(), 0);
    assert_eq!(sched.bitmap().pages_dirtied(), total);
}

/// The rate over a window, from the bitmap's monotonic count of pages newly dirtied.
#[test]
fn dirty_rate_over_a_sliding_window() {
    let bitmap = DirtyBitmap::new(&RamLayout::single("m", 64 << 20, 4096).unwrap()).unwrap();
    let mut rate = DirtyRate::new(Duration::from_secs(2));
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    assert_eq!(rate.sample_at(&bitmap, at(0)), None);
    bitmap.mark_range(0, 0, 1000).unwrap();
    assert_eq!(rate.sample_at(&bitmap, at(1000)), Some(1000.0));
    // Re-marking dirty pages adds nothing; draining does not lower the rate.
    bitmap.mark_range(0, 0, 1000).unwrap();
    let mut words = vec![0u64; bitmap.block_words(0).unwrap()];
    bitmap.get_and_clear(0, 0, &mut words).unwrap();
    assert_eq!(rate.sample_at(&bitmap, at(2000)), Some(500.0));
    // 3000 pages in the last second; the window (2 s) now starts at the 1 s sample.
    bitmap.mark_range(0, 5000, 3000).unwrap();
    assert_eq!(rate.sample_at(&bitmap, at(3000)), Some(1500.0));
    // An out-of-order sample is ignored.
    assert_eq!(rate.sample_at(&bitmap, at(2500)), Some(1500.0));
    assert_eq!(rate.window(), Duration::from_secs(2));
}
