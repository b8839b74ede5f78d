//! Page-request frames from the destination (I8): `UrgentRequest::decode` and
//! `PageScheduler::serve_frame` on arbitrary bytes. Malformed or out-of-range frames must give
//! a typed error, be counted, and change no state; valid ones round-trip through `encode`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pagehint::request::DecodeError;
use pagehint::{
    BlockSpec, PageScheduler, RamLayout, RequestError, SchedulerConfig, Served, UrgentRequest,
};

/// 4 KiB, 16 KiB and 2 MiB host pages; every page dirty at the start of each input.
fn layout() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("pc.ram", 1 << 20, 4096),
            BlockSpec::new("mid", 256 << 10, 16 << 10),
            BlockSpec::new("huge", 4 << 20, 2 << 20),
        ],
    )
    .expect("a valid layout")
}

fuzz_target!(|data: &[u8]| {
    static LAYOUT: OnceLock<RamLayout> = OnceLock::new();
    let layout = LAYOUT.get_or_init(layout);

    let decoded = UrgentRequest::decode(data);
    match decoded {
        Ok(req) => assert_eq!(UrgentRequest::decode(&req.encode()), Ok(req)),
        Err(DecodeError::WrongLength { got }) => assert_eq!(got, data.len()),
        Err(DecodeError::BadMagic(_) | DecodeError::UnknownFlags(_) | DecodeError::ZeroLength) => {
            assert_eq!(data.len(), UrgentRequest::WIRE_LEN)
        }
        Err(e) => panic!("a decode error this target does not know: {e}"),
    }

    for config in [SchedulerConfig::preempt_hint(), SchedulerConfig::vanilla()] {
        let sched = PageScheduler::new(layout.clone(), config).expect("scheduler");
        sched.bitmap().mark_all();
        let before = sched.bitmap().dirty_pages();
        match sched.serve_frame(data) {
            Err(e) => {
                assert!(matches!(
                    (&decoded, e),
                    (Err(_), RequestError::Decode(_))
                        | (Ok(_), RequestError::Location(_) | RequestError::SpansHostPages { .. })
                ));
                assert_eq!(sched.stats().bad_requests, 1);
                assert_eq!(sched.bitmap().dirty_pages(), before, "a refused frame changed state");
                assert_eq!(sched.hint().peek(), None);
            }
            Ok(Served::Send(claim)) => {
                let req = decoded.expect("served, so decoded");
                let hp = claim.host_pages().next().expect("a claim holds a host page");
                assert_eq!(hp.block, req.block);
                assert!(hp.page_range().contains(&(req.offset / 4096)));
                assert_eq!(sched.bitmap().dirty_pages(), before - claim.dirty_pages());
                sched.urgent_sent(&claim);
                // the same frame again: already claimed, nothing sent twice
                assert!(matches!(sched.serve_frame(data), Ok(Served::AlreadyClaimed(_))));
            }
            Ok(Served::Queued(hp)) => {
                let req = decoded.expect("queued, so decoded");
                assert_eq!(hp.block, req.block);
                assert_eq!(sched.bitmap().dirty_pages(), before);
            }
            Ok(Served::AlreadyClaimed(_)) => panic!("every page was dirty"),
        }
    }
});
