//! Postcopy recovery ("dirty = not received"): exactly what the destination lacks is sent
//! again (I1), wide host pages are found again (I3), and malformed received bitmaps or a
//! scheduler still shared with senders are refused (I8).

use std::sync::Arc;

use pagehint::{
    DirtyLogError, PageLocation, PageScheduler, RamLayout, RecoveryError, SchedulerConfig, Served,
    UrgentRequest,
};

mod common;
use common::{mixed_layout, Collected};

/// 4 KiB, 16 KiB and 2 MiB host pages.
fn layout() -> RamLayout {
    mixed_layout(4 << 20, 1 << 20, 8 << 20)
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
fn i1_recovery_resends_exactly_what_the_destination_lacks() {
    // A postcopy migration breaks part way; the destination reports what it received (the
    // pages sent before the break, except the ones in flight); recovery and a resumed round
    // complete it: every page received, none sent twice after the break.
    let l = layout();
    let mut sched = PageScheduler::new(l.clone(), SchedulerConfig::preempt_hint()).unwrap();
    sched.bitmap().mark_all();
    // what the destination received, by whom (1: before the break, 2: the urgent page,
    // 3 and 4: the resumed senders); a page received twice panics (I1)
    let dest = Collected::new(&l);
    {
        let mut scanner = sched.background_from(PageLocation::new(1, 0));
        for _ in 0..20 {
            dest.claim(&scanner.next_claim().unwrap(), 1);
        }
        // in flight when the connection broke: claimed, never received
        let _lost = scanner.next_claim().unwrap();
        // block 1 (16 claims) and block 2 (4 claims) are sent; block 0's first chunk is lost
        match sched.serve(UrgentRequest::new(0, 2 << 20, 4096)).unwrap() {
            Served::Send(c) => {
                dest.claim(&c, 2);
                sched.urgent_sent(&c); // leaves a hint, which recovery must drop
            }
            other => panic!("page 512 of block 0 is still dirty: {other:?}"),
        }
    }
    assert!(sched.hint().peek().is_some());
    let mut left = 0;
    for b in 0..3u32 {
        let rx = received(&l, b, |p| dest.has(b, p));
        left += sched.recover_block(b, &rx).unwrap();
    }
    assert_eq!(
        sched.hint().peek(),
        None,
        "the broken connection's hint is dropped"
    );
    let before = dest.count();
    assert_eq!(left, l.total_pages() - before);
    // resume with two senders
    std::thread::scope(|s| {
        for (i, scanner) in sched.background_scanners(2).into_iter().enumerate() {
            let dest = &dest;
            s.spawn(move || scanner.for_each(|c| dest.claim(&c, 3 + i as u8)));
        }
    });
    assert!(dest.all_once(), "I1: a page never arrived");
}

#[test]
fn i8_recovery_refuses_malformed_received_bitmaps_and_shared_handles() {
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
fn i3_recovery_rebuilds_wide_host_page_summaries() {
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

/// I5's bookkeeping across a recovery (vanilla mode): the broken connection's queued requests
/// are dropped by `recover_block`, and counted, so every queued request is still accounted
/// for: followed, found already sent, or dropped. (Before `queued_dropped`, the dropped ones
/// vanished from the counts and the equality failed after a recovery.)
#[test]
fn i5_vanilla_requests_dropped_by_recovery_are_counted() {
    let l = layout();
    let mut sched = PageScheduler::new(l.clone(), SchedulerConfig::vanilla()).unwrap();
    sched.bitmap().mark_all();
    let mut scanner = sched.background();
    let first = scanner.next_claim().expect("dirty pages");
    drop(scanner);
    for page in [3u64, 100, 200] {
        let req = UrgentRequest::new(0, page * 4096, 4096);
        assert!(matches!(sched.serve(req), Ok(Served::Queued(_))));
    }
    // The connection breaks: nothing was received but what the first claim sent.
    assert_eq!(first.block(), 0, "the scan starts at block 0");
    let rx = received(&l, 0, |p| {
        first.host_pages().any(|hp| hp.page_range().contains(&p))
    });
    sched.recover_block(0, &rx).unwrap();
    let st = sched.stats();
    assert_eq!(st.requests_queued, 3);
    assert_eq!(
        st.queued_dropped, 3,
        "the three queued requests were dropped"
    );
    assert_eq!(st.queued_followed + st.queued_stale + st.queued_dropped, 3);

    // After the recovery the destination asks again; the queue drains as before.
    let req = UrgentRequest::new(0, 300 * 4096, 4096);
    assert!(matches!(sched.serve(req), Ok(Served::Queued(_))));
    let mut sent = 0;
    for c in sched.background() {
        sent += c.pages_to_send();
    }
    assert!(sent > 0);
    let st = sched.stats();
    assert_eq!(st.requests_queued, 4);
    assert_eq!(
        st.queued_followed + st.queued_stale + st.queued_dropped,
        st.requests_queued,
        "every queued request accounted for across the recovery: {st:?}"
    );
}
