//! loom: several fault streams (I1–I5), every interleaving and weak-memory outcome.
//!
//! * The slots alone (`i4_slots_model`): one offerer thread per stream (stream 0 offers
//!   twice) against the main thread taking from each slot, then a drain. Exhaustive.
//! * The protocol (`streams_model`): a return-path thread serving two streams' faults
//!   (`serve_from`, send, `urgent_sent_from`) against the per-stream background scanner running
//!   a round on the main thread. Layout: a cold block 0 of 4 host pages, then block 1 of 8
//!   host pages (2 target pages each); 2 streams, runs of 4 pages (2 host pages), a share of 1.
//!   Stream 0 faults in host page 4 of block 1, stream 1 in host page 1: two cursors live at
//!   once, each with dirty pages past its run. Checked as stated in
//!   `pagehint_models::streams`.
//!
//! The protocol on the real scheduler is explored exhaustively (no preemption bound: one to two
//! minutes here). The control rewrite and the mutants run with a preemption bound of 3
//! (`LOOM_MAX_PREEMPTIONS` overrides both): every interleaving with up to three forced
//! switches, with every weak-memory outcome of each; each mutant is caught within it.
//!
//! MUTANTS: slots — every stream on one set-if-empty slot (`SharedSlot`: a stream's first
//! offer refused, or a take from one stream's slot giving another stream's hint), every stream
//! on one overwriting cell (`SharedOverwritingSlot`: an accepted hint lost); scanner rewrites —
//! a cursor that never yields to the linear scan (`NeverYields`), a run never bounded
//! (`NeverRetired`), a cursor keeping the turn (`KeepsTurn`), a jump to a spent run's edge that
//! keeps the clean count (`JumpKeepsCount`: it skips pages and reports done). The control
//! rewrite passes.
#![cfg(pagehint_loom)]

use pagehint::streams::{HintSlots, StreamPolicy};
use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout};
use pagehint_models::streams::{
    i4_slots_model, streams_model, ControlRewrite, JumpKeepsCount, KeepsTurn, ModelStreams,
    NeverRetired, NeverYields, SharedOverwritingSlot, SharedSlot, StreamsCase,
};

#[test]
fn i4_per_slot_two_streams_and_a_taker() {
    loom::model(i4_slots_model::<HintSlots>);
}

#[test]
#[should_panic(expected = "I4: stream")]
fn mutant_streams_sharing_one_slot_are_caught() {
    loom::model(i4_slots_model::<SharedSlot>);
}

#[test]
#[should_panic(expected = "I4: stream 0's accepted hint")]
fn mutant_streams_overwriting_one_slot_are_caught() {
    loom::model(i4_slots_model::<SharedOverwritingSlot>);
}

fn case() -> StreamsCase {
    StreamsCase {
        layout: RamLayout::new(
            4096,
            [
                BlockSpec::new("cold", 8 * 4096, 2 * 4096),
                BlockSpec::new("hot", 24 * 4096, 2 * 4096),
            ],
        )
        .unwrap(),
        policy: StreamPolicy::new(2)
            .unwrap()
            .with_run(6)
            .unwrap()
            .with_share(1)
            .unwrap(),
        requests: vec![(0, PageLocation::new(1, 12)), (1, PageLocation::new(1, 2))],
        return_paths: 1,
        stray_hints: vec![],
    }
}

/// The real scheduler: exhaustive (no preemption bound unless `LOOM_MAX_PREEMPTIONS` sets
/// one): one to two minutes on two shared cores.
fn exhaustive<M: ModelStreams>() {
    let case = case();
    loom::model::Builder::new().check(move || streams_model::<M>(&case));
}

/// The rewrite and its mutants: preemption bound 3 (each mutant is caught within it).
fn bounded<M: ModelStreams>() {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    let case = case();
    b.check(move || streams_model::<M>(&case));
}

#[test]
fn i1_i2_i3_i4_i5_two_streams_and_the_scanner() {
    exhaustive::<PageScheduler>();
}

#[test]
fn control_rewrite_passes() {
    bounded::<ControlRewrite>();
}

#[test]
#[should_panic(expected = "I5: the linear scan starved")]
fn mutant_cursor_never_yielding_starves_the_linear_scan() {
    bounded::<NeverYields>();
}

#[test]
#[should_panic(expected = "run was not bounded")]
fn mutant_cursor_never_retired_is_caught() {
    bounded::<NeverRetired>();
}

#[test]
#[should_panic(expected = "kept the turn")]
fn mutant_run_keeping_the_turn_starves_the_other_stream() {
    bounded::<KeepsTurn>();
}

#[test]
#[should_panic(expected = "I3: the scanner reported done")]
fn mutant_jump_keeping_the_count_skips_a_page_and_reports_done() {
    bounded::<JumpKeepsCount>();
}
