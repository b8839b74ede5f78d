//! Several fault streams on real threads: I1–I3 with four return-path threads (one per vCPU,
//! each its own stream) against two per-stream background scanners, many times over; and I8
//! for unknown streams.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::{mixed_layout, Collected, Rng};
use pagehint::{PageScheduler, RequestError, SchedulerConfig, Served, StreamPolicy, UrgentRequest};

#[test]
fn i1_i2_i3_four_streams_two_scanners_real_threads() {
    let layout = mixed_layout(2 << 20, 1 << 20, 8 << 20);
    for round in 0..20u64 {
        let policy = StreamPolicy::new(4)
            .unwrap()
            .with_run(1 + round * 7)
            .unwrap()
            .with_share(1 + (round % 5) as u32)
            .unwrap();
        let config = SchedulerConfig {
            hint: pagehint::HintPolicy::PerStream(policy),
            ..SchedulerConfig::preempt()
        };
        let sched = PageScheduler::new(layout.clone(), config).unwrap();
        sched.bitmap().mark_all();
        let got = Collected::new(&layout);
        let served = AtomicU64::new(0);
        std::thread::scope(|s| {
            for vcpu in 0..4u32 {
                let (sched, got, served, layout) = (&sched, &got, &served, &layout);
                s.spawn(move || {
                    let mut rng = Rng(round * 10 + u64::from(vcpu) + 1);
                    // Each vCPU reads forward (even) or backward (odd) from its own place.
                    let block = vcpu % 3;
                    let pages = layout.blocks()[block as usize].pages();
                    let mut page = rng.next() % pages;
                    for _ in 0..200 {
                        let req = UrgentRequest::new(block, page * 4096, 4096);
                        if let Served::Send(claim) = sched.serve_from(vcpu, req).unwrap() {
                            got.claim(&claim, 1 + vcpu as u8);
                            sched.urgent_sent_from(vcpu, &claim).unwrap();
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        page = if vcpu % 2 == 0 {
                            (page + 3) % pages
                        } else {
                            (page + pages - 3) % pages
                        };
                    }
                });
            }
            for scanner in sched.background_scanners(2) {
                let got = &got;
                s.spawn(move || {
                    for claim in scanner {
                        got.claim(&claim, 9);
                    }
                });
            }
        });
        assert!(got.all_once(), "I1: a page was never sent");
        assert_eq!(sched.bitmap().dirty_pages(), 0, "I3: every page claimed");
        let st = sched.stats();
        let taken: u64 = (0..4)
            .map(|v| sched.stream_stats(v).unwrap().hints_taken)
            .sum();
        assert_eq!(
            st.hints_taken, taken,
            "the global count is the streams' sum"
        );
        assert!(st.hints_taken <= st.hints_accepted, "I4: {st:?}");
    }
}

#[test]
fn i8_an_unknown_stream_is_refused_counted_and_changes_nothing() {
    let sched = PageScheduler::new(
        "a:1M".parse().unwrap(),
        SchedulerConfig::preempt_hints(2).unwrap(),
    )
    .unwrap();
    sched.bitmap().mark_all();
    let req = UrgentRequest::new(0, 0, 4096);
    for stream in [2, 3, u32::MAX] {
        let e = sched.serve_from(stream, req).unwrap_err();
        assert!(matches!(e, RequestError::Stream(s) if s.stream == stream && s.streams == 2));
        assert!(e.to_string().contains("stream"), "{e}");
    }
    assert_eq!(sched.stats().bad_requests, 3);
    assert_eq!(sched.bitmap().dirty_pages(), 256, "nothing claimed");
    let Served::Send(claim) = sched.serve_from(1, req).unwrap() else {
        panic!("the page was dirty");
    };
    assert!(sched.urgent_sent_from(2, &claim).is_err());
    assert_eq!(sched.stats().bad_requests, 4);
    assert!((0..2).all(|s| sched.hint_slots().slot(s).unwrap().peek().is_none()));
    assert!(sched.stream_stats(2).is_err());
    // One-slot configurations have exactly one stream: stream 0 is `serve`.
    let one = PageScheduler::new("a:1M".parse().unwrap(), SchedulerConfig::preempt_hint()).unwrap();
    assert_eq!(one.streams(), 1);
    assert!(one.serve_from(1, req).is_err());
}
