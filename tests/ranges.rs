//! Requests as ranges: a request for several host pages is served whole by
//! `PageScheduler::serve_range` (each host page claimed once, by one path: I1, I2; each
//! reported once: I5) or refused whole by `serve`, never served for its first host page only
//! (the old behaviour: a 3-page request sent one page and silently dropped two). Zero-length
//! requests are refused where they are built (I8).

use std::collections::BTreeSet;

use pagehint::request::DecodeError;
use pagehint::{
    ClaimBatch, HostPage, PageLocation, PageScheduler, RamLayout, RequestError, SchedulerConfig,
    Served, UrgentRequest,
};

mod common;
use common::{mixed_layout, Collected, Rng};

/// 4 KiB, 16 KiB and 2 MiB host pages.
fn layout() -> RamLayout {
    mixed_layout(1 << 20, 1 << 20, 8 << 20)
}

/// Serves `req` through `serve_range`, recording what the urgent path sends in `sent` (by 1);
/// returns the host pages reported, in order, as (first page, outcome letter).
fn serve_all(sched: &PageScheduler, req: UrgentRequest, sent: &Collected) -> Vec<(u64, char)> {
    let mut out = vec![];
    for served in sched.serve_range(req).unwrap() {
        match served {
            Served::Send(claim) => {
                sent.claim(&claim, 1);
                sched.urgent_sent(&claim);
                out.extend(claim.host_pages().map(|hp| (hp.first_page, 's')));
            }
            Served::AlreadyClaimed(hp) => out.push((hp.first_page, 'a')),
            Served::Queued(hp) => out.push((hp.first_page, 'q')),
        }
    }
    out
}

/// The trap: a 3-page request sent one page. Now `serve` refuses it whole (a typed,
/// counted error; nothing claimed) and `serve_range` sends all three.
#[test]
fn i1_i5_a_three_page_request_is_served_whole_or_refused_whole() {
    let sched = PageScheduler::new(layout(), SchedulerConfig::preempt_hint()).unwrap();
    sched.bitmap().mark_all();
    let before = sched.bitmap().dirty_pages();
    let req = UrgentRequest::new(0, 0x5000, 3 * 4096);
    assert_eq!(
        sched.serve(req),
        Err(RequestError::SpansHostPages {
            block: 0,
            first_page: 5,
            host_pages: 3
        })
    );
    assert_eq!(sched.bitmap().dirty_pages(), before, "nothing claimed");
    assert_eq!(sched.stats().bad_requests, 1);

    let sent = Collected::new(sched.layout());
    let got = serve_all(&sched, req, &sent);
    assert_eq!(got, [(5, 's'), (6, 's'), (7, 's')]);
    assert_eq!(sent.count(), 3);
    assert_eq!(sched.bitmap().dirty_pages(), before - 3);
    let st = sched.stats();
    assert_eq!((st.urgent_host_pages, st.urgent_pages), (3, 3));
    assert_eq!(
        (st.requests, st.range_requests, st.range_host_pages),
        (1, 1, 3)
    );
    // One byte into the next page is a second host page too; the bytes of one host page are
    // one, however many target pages they cover.
    assert!(sched.serve(UrgentRequest::new(0, 0xfff, 2)).is_err());
    let mid = UrgentRequest::new(1, 0x4000 + 0x1000, 0x2000); // inside one 16 KiB host page
    assert!(matches!(sched.serve(mid), Ok(Served::Send(_))));
}

/// Preempt: a range across a word boundary, part of it already claimed by the background
/// path; every host page of the range is reported once, the dirty ones are claimed by the
/// urgent path, the rest reported as already claimed, and nothing outside the range moves.
#[test]
fn i1_i2_i5_range_outcomes_cover_each_host_page_once() {
    for (block, first, count) in [(0u32, 50u64, 30u64), (1, 60, 40), (2, 500, 1100)] {
        let sched = PageScheduler::new(
            layout(),
            SchedulerConfig::preempt_hint().with_batch(ClaimBatch::HOST_PAGE),
        )
        .unwrap();
        let l = sched.layout().clone();
        sched.bitmap().mark_all();
        let sent = Collected::new(&l);
        // Take every third host page of the block first (the background path "sent" them).
        let hpp = l.blocks()[block as usize].host_page_pages();
        let hps = l.blocks()[block as usize].host_pages();
        for h in (0..hps).step_by(3) {
            let c = sched
                .bitmap()
                .claim_host_page(PageLocation::new(block, h * hpp))
                .unwrap()
                .into_claim()
                .unwrap();
            sent.claim(&c, 2);
        }
        let before = sched.bitmap().dirty_pages();
        let req = UrgentRequest::new(block, first * 4096, count * 4096);
        let got = serve_all(&sched, req, &sent);
        let first_hp = first / hpp;
        let last_hp = (first + count - 1) / hpp;
        let reported: BTreeSet<u64> = got.iter().map(|&(p, _)| p / hpp).collect();
        assert_eq!(
            reported.len(),
            got.len(),
            "a host page reported twice: {got:?}"
        );
        assert_eq!(
            reported,
            (first_hp..=last_hp).collect(),
            "block {block}: every host page of the range reported"
        );
        for &(p, o) in &got {
            let expect = if (p / hpp) % 3 == 0 { 'a' } else { 's' };
            assert_eq!(o, expect, "block {block} host page at {p}");
        }
        let urgent = got.iter().filter(|&&(_, o)| o == 's').count() as u64;
        assert_eq!(sched.bitmap().dirty_pages(), before - urgent * hpp);
        // Outside the range: still dirty, unless taken above.
        for h in (0..hps).filter(|h| !(first_hp..=last_hp).contains(h) && h % 3 != 0) {
            assert!(sched
                .bitmap()
                .is_dirty(PageLocation::new(block, h * hpp))
                .unwrap());
        }
        let st = sched.stats();
        assert_eq!(st.urgent_already_claimed, got.len() as u64 - urgent);
        assert_eq!(st.requests, 1);
    }
}

/// Vanilla: each host page of the range is queued (not just the first), and the background
/// path takes each off the queue: followed or found already sent.
#[test]
fn i5_vanilla_queues_every_host_page_of_a_range() {
    let sched = PageScheduler::new(layout(), SchedulerConfig::vanilla()).unwrap();
    sched.bitmap().mark_all();
    let sent = Collected::new(sched.layout());
    let got = serve_all(&sched, UrgentRequest::new(2, 0x10_0000, 0x50_0000), &sent);
    assert_eq!(got, [(0, 'q'), (512, 'q'), (1024, 'q')]);
    let got = serve_all(&sched, UrgentRequest::new(0, 0, 0x3000), &sent);
    assert_eq!(got, [(0, 'q'), (1, 'q'), (2, 'q')]);
    assert_eq!(sched.stats().requests_queued, 6);
    for c in sched.background() {
        sent.claim(&c, 3);
    }
    assert!(sent.all_once());
    let st = sched.stats();
    assert_eq!(st.queued_followed + st.queued_stale, 6);
    assert_eq!((st.requests, st.range_requests), (2, 2));
}

/// Zero-length requests: refused where built (`try_new`, the wire decoder, `GpaMap::request`)
/// and, built with `new` anyway, by both serving methods; counted, nothing changed.
#[test]
fn i8_zero_length_requests_are_refused_where_built() {
    assert_eq!(
        UrgentRequest::try_new(0, 4096, 0),
        Err(RequestError::ZeroLength {
            block: 0,
            offset: 4096
        })
    );
    let frame = UrgentRequest::new(0, 4096, 0).encode();
    assert_eq!(UrgentRequest::decode(&frame), Err(DecodeError::ZeroLength));
    let sched = PageScheduler::new(layout(), SchedulerConfig::preempt()).unwrap();
    sched.bitmap().mark_all();
    let before = sched.bitmap().dirty_pages();
    let empty = UrgentRequest::new(0, 4096, 0);
    assert!(matches!(
        sched.serve(empty),
        Err(RequestError::ZeroLength { .. })
    ));
    assert!(matches!(
        sched.serve_range(empty),
        Err(RequestError::ZeroLength { .. })
    ));
    assert!(matches!(
        sched.serve_frame(&frame),
        Err(RequestError::Decode(DecodeError::ZeroLength))
    ));
    assert!(sched
        .serve_range(UrgentRequest::new(0, 4096, u64::MAX))
        .is_err());
    assert_eq!(sched.stats().bad_requests, 4);
    assert_eq!(sched.bitmap().dirty_pages(), before);
}

/// std threads: range requests race two background scanners; every page is sent exactly once
/// and every host page of every range is reported exactly once.
#[test]
fn i1_i2_i5_range_requests_race_the_scanners() {
    for round in 0..20u64 {
        let sched = PageScheduler::new(
            layout(),
            SchedulerConfig::preempt_hint().with_batch(ClaimBatch::HOST_PAGE),
        )
        .unwrap();
        sched.bitmap().mark_all();
        let l = sched.layout().clone();
        let sent = Collected::new(&l);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut rng = Rng(0x9e37_79b9 + round);
                for _ in 0..40 {
                    let block = (rng.next() % 3) as u32;
                    let pages = l.blocks()[block as usize].pages();
                    let first = rng.next() % pages;
                    let count = 1 + rng.next() % (pages - first).min(300);
                    let req = UrgentRequest::new(block, first * 4096, count * 4096);
                    let mut seen: Vec<HostPage> = vec![];
                    for served in sched.serve_range(req).unwrap() {
                        match served {
                            Served::Send(c) => {
                                sent.claim(&c, 1);
                                sched.urgent_sent(&c);
                                seen.extend(c.host_pages());
                            }
                            Served::AlreadyClaimed(hp) => {
                                // Claimed by another path: not claimable any more (for a wide
                                // host page its summary bit is gone; its page bits may still
                                // be on their way out of the winner's swaps).
                                let next = sched
                                    .bitmap()
                                    .find_next_dirty_host_page(block, hp.first_page)
                                    .unwrap();
                                assert_ne!(next, Some(hp.first_page));
                                seen.push(hp);
                            }
                            Served::Queued(_) => unreachable!("preempt"),
                        }
                    }
                    let hpp = l.blocks()[block as usize].host_page_pages();
                    let mut firsts: Vec<u64> = seen.iter().map(|hp| hp.first_page).collect();
                    firsts.sort_unstable();
                    let want: Vec<u64> = (first / hpp..=(first + count - 1) / hpp)
                        .map(|h| h * hpp)
                        .collect();
                    assert_eq!(firsts, want, "each host page of the range once");
                }
            });
            for scanner in sched.background_scanners(2) {
                let sent = &sent;
                s.spawn(move || {
                    for c in scanner {
                        sent.claim(&c, 2);
                    }
                });
            }
        });
        assert!(sent.all_once());
        assert_eq!(sched.bitmap().dirty_pages(), 0);
    }
}
