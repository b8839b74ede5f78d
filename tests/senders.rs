//! Several background senders over one bitmap (I1, I3), where they start, and a bitmap
//! shared with one scheduler at a time.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use pagehint::{
    AttachError, ClaimBatch, DirtyBitmap, LayoutMismatch, PageLocation, PageScheduler, RamLayout,
    SchedulerConfig, Served, UrgentRequest,
};

mod common;
use common::{mixed_layout, Collected, Rng};

/// 4 KiB, 16 KiB and 2 MiB host pages.
fn layout() -> RamLayout {
    mixed_layout(4 << 20, 1 << 20, 8 << 20)
}

#[test]
fn i1_i3_several_background_senders_send_each_page_once_and_done_means_clean() {
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
                let mut rng = Rng(seed);
                for _ in 0..5_000 {
                    if finished.load(Ordering::Relaxed) == scanners {
                        break;
                    }
                    let loc = l.location_of(rng.next() % l.total_pages()).unwrap();
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
