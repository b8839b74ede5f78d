//! shuttle: several fault streams on bigger cases than loom can search (I1–I6): six streams,
//! two return-path threads serving their faults (`serve_from`, send, `urgent_sent_from`), a
//! thread offering stray hints into the slots, and the per-stream background scanner; a cold
//! block, a block of narrow host pages and a block of wide ones (128 target pages, a
//! scaled-down 2 MiB page). Streams 0 to 3 fault forward, stream 4 backward (its cursor
//! bubbles both ways), stream 5 in the wide block. Runs of 16 pages reach past a stream's
//! next fault, so schedules include a forward edge passing over a host page the urgent path
//! took and a hint landing inside what the stream's live run claimed (the run continues). Random and PCT schedules; shuttle treats
//! every ordering as sequentially consistent (loom, `loom_streams`, covers weak memory).
//!
//! The MUTANTS of `pagehint_models::streams` (a cursor that never yields to the linear scan,
//! a run never bounded, a cursor keeping the turn, a jump that keeps the clean count) are
//! caught by the same checker; the slots' mutants are loom's (`loom_streams`).
#![cfg(pagehint_shuttle)]

use pagehint::streams::StreamPolicy;
use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout};
use pagehint_models::streams::{
    streams_model, ControlRewrite, JumpKeepsCount, KeepsTurn, ModelStreams, NeverRetired,
    NeverYields, StreamsCase,
};

fn case() -> StreamsCase {
    let at = |b, p| PageLocation::new(b, p);
    let mut requests = Vec::new();
    for k in 0..3 {
        for s in 0..4u32 {
            // Streams 0-3: forward, 16 host pages apart, faulting every 5th host page.
            requests.push((s, at(1, 32 * u64::from(s) + 10 * k + 1)));
        }
        // Stream 4: backward, from the top of block 1, each fault within a run (16 pages)
        // of the one before, as a backward reader's are (further back is a new forward pass).
        requests.push((4, at(1, 126 - 6 * k)));
        // Stream 5: wide host pages of block 2.
        requests.push((5, at(2, 128 * k + 7)));
    }
    StreamsCase {
        layout: RamLayout::new(
            4096,
            [
                BlockSpec::new("cold", 16 * 4096, 2 * 4096),
                BlockSpec::new("hot", 128 * 4096, 2 * 4096),
                BlockSpec::new("huge", 512 * 4096, 128 * 4096),
            ],
        )
        .unwrap(),
        policy: StreamPolicy::new(6)
            .unwrap()
            .with_run(16)
            .unwrap()
            .with_share(2)
            .unwrap(),
        requests,
        return_paths: 2,
        stray_hints: vec![
            (2, PageLocation::new(0, 5)),
            (3, PageLocation::new(9, 0)),
            (4, PageLocation::new(1, 64)),
        ],
    }
}

fn random<M: ModelStreams>(iterations: usize) {
    let c = case();
    shuttle::check_random(move || streams_model::<M>(&c), iterations);
}

fn pct<M: ModelStreams>(iterations: usize) {
    let c = case();
    shuttle::check_pct(move || streams_model::<M>(&c), iterations, 3);
}

#[test]
fn i1_to_i6_six_streams_random() {
    random::<PageScheduler>(10_000);
}

#[test]
fn i1_to_i6_six_streams_pct() {
    pct::<PageScheduler>(10_000);
}

#[test]
fn control_rewrite_passes() {
    pct::<ControlRewrite>(2_000);
}

#[test]
#[should_panic(expected = "I5: the linear scan starved")]
fn mutant_cursor_never_yielding_is_caught() {
    pct::<NeverYields>(2_000);
}

#[test]
#[should_panic(expected = "run was not bounded")]
fn mutant_cursor_never_retired_is_caught() {
    pct::<NeverRetired>(2_000);
}

#[test]
#[should_panic(expected = "kept the turn")]
fn mutant_cursor_keeping_the_turn_is_caught() {
    pct::<KeepsTurn>(2_000);
}

#[test]
#[should_panic(expected = "I3: the scanner reported done")]
fn mutant_jump_keeping_the_count_is_caught() {
    pct::<JumpKeepsCount>(2_000);
}
