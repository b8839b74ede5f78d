//! loom: the O(1) dirty count under concurrent marks, claims and a drain, exhaustively. See
//! `pagehint_models::count` for what is checked: exact when quiet, within `0..=pages` and
//! `pages_dirtied` monotonic while running.
//!
//! Mutants, each caught by the same model: counting a claim from a separate load (two
//! claimers of one bit both count it), and counting a mark from a load (two markers of one
//! bit both count it).
#![cfg(pagehint_loom)]

use pagehint::DirtyBitmap;
use pagehint_models::count::{
    count_model, ControlCount, CountingBitmap, LoadThenCountClaim, LoadThenCountMark,
};

/// Two threads: exhaustive. With the drain-and-read thread (three threads), every
/// interleaving with at most `LOOM_MAX_PREEMPTIONS` (default 3) forced switches, and every
/// weak-memory outcome of each: the unbounded search does not end within a test budget (over
/// 5 minutes on two cores); both mutants need one preemption.
fn check<B: CountingBitmap>(drainer: bool) {
    let mut b = loom::model::Builder::new();
    if drainer && b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(move || count_model::<B>(drainer));
}

#[test]
fn count_is_exact_when_quiet_two_claimers_two_markers() {
    check::<DirtyBitmap>(false);
}

#[test]
fn count_is_exact_when_quiet_with_a_drain_and_a_reader() {
    check::<DirtyBitmap>(true);
}

#[test]
fn count_control_rewrite_passes() {
    check::<ControlCount>(true);
}

#[test]
#[should_panic(expected = "count: the O(1) count says")]
fn mutant_claim_counted_from_a_load_is_caught() {
    check::<LoadThenCountClaim>(false);
}

#[test]
#[should_panic(expected = "count: the O(1) count says")]
fn mutant_mark_counted_from_a_load_is_caught() {
    check::<LoadThenCountMark>(false);
}

#[test]
#[should_panic(expected = "count: ")]
fn mutant_claim_counted_from_a_load_is_caught_with_a_drain() {
    check::<LoadThenCountClaim>(true);
}
