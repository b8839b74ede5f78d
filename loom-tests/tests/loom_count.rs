//! loom: the O(1) dirty count under concurrent marks, claims and a drain, exhaustively. See
//! `pagehint_models::count` for what is checked: exact when quiet, within `0..=pages` and
//! `pages_dirtied` monotonic while running, each thread counting in its own slot (two owned
//! slots with plain adds, the third thread in the shared slot), and a slot handed over from
//! one thread to the next losing nothing.
//!
//! Mutants, each caught by the same model: counting a claim from a separate load (two
//! claimers of one bit both count it), counting a mark from a load (two markers of one bit
//! both count it), two threads adding to one owned slot with plain adds, and a relaxed
//! hand-over of a slot.
//!
//! Run with `cargo loom-count`: only with `--cfg pagehint_model_counts` does the checker see the
//! count's atomics (`CountAtomic` in src/sync.rs); without it this file is empty.
#![cfg(all(pagehint_loom, pagehint_model_counts))]

use pagehint::DirtyBitmap;
use pagehint_models::count::{
    count_model, count_range_model, handover_model, ControlCount, LoadThenCountClaim,
    LoadThenCountMark, SharedOwnedSlot,
};

/// Two threads: exhaustive. With the drain-and-read thread (three threads), every
/// interleaving with at most `LOOM_MAX_PREEMPTIONS` (default 3) forced switches, and every
/// weak-memory outcome of each: the unbounded search does not end within a test budget (over
/// 5 minutes on two cores); every mutant needs one preemption.
fn check(drainer: bool, model: impl Fn(bool) + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if drainer && b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(move || model(drainer));
}

#[test]
fn count_is_exact_when_quiet_two_claimers_two_markers() {
    check(false, count_model::<DirtyBitmap>);
}

#[test]
fn count_is_exact_when_quiet_with_a_drain_and_a_reader() {
    check(true, count_model::<DirtyBitmap>);
}

#[test]
fn count_is_exact_when_quiet_with_range_marks_and_merges() {
    check(true, count_range_model::<DirtyBitmap>);
}

#[test]
fn count_control_rewrite_passes() {
    check(true, count_model::<ControlCount>);
    check(true, count_range_model::<ControlCount>);
}

#[test]
fn count_slot_handover_loses_nothing() {
    loom::model(handover_model::<false>);
}

#[test]
#[should_panic(expected = "count: the O(1) count says")]
fn mutant_claim_counted_from_a_load_is_caught() {
    check(false, count_model::<LoadThenCountClaim>);
}

#[test]
#[should_panic(expected = "count: the O(1) count says")]
fn mutant_mark_counted_from_a_load_is_caught() {
    check(false, count_model::<LoadThenCountMark>);
}

#[test]
#[should_panic(expected = "count: ")]
fn mutant_claim_counted_from_a_load_is_caught_with_a_drain() {
    check(true, count_model::<LoadThenCountClaim>);
}

#[test]
#[should_panic(expected = "count: ")]
fn mutant_mark_counted_from_a_load_is_caught_with_range_marks() {
    check(true, count_range_model::<LoadThenCountMark>);
}

#[test]
#[should_panic(expected = "count: the O(1) count says")]
fn mutant_two_threads_in_one_owned_slot_is_caught() {
    check(false, count_model::<SharedOwnedSlot>);
}

#[test]
#[should_panic(expected = "count: 2 pages counted of 3")]
fn mutant_relaxed_slot_handover_is_caught() {
    loom::model(handover_model::<true>);
}
