//! shuttle: the O(1) dirty count models with the drain and reader thread, random and PCT
//! schedules, 10,000 each; the mutants of `loom_count.rs` are caught here too (but the relaxed
//! hand-over: shuttle's atomics are sequentially consistent, so orderings are loom's to
//! check). See `pagehint_models::count`.
//!
//! Run with `cargo shuttle-count`: only with `--cfg pagehint_model_counts` does the checker see the
//! count's atomics (`CountAtomic` in src/sync.rs); without it this file is empty.
#![cfg(all(pagehint_shuttle, pagehint_model_counts))]

use pagehint::DirtyBitmap;
use pagehint_models::count::{
    count_model, count_range_model, handover_model, LoadThenCountClaim, LoadThenCountMark,
    SharedOwnedSlot,
};

const ITERATIONS: usize = 10_000;
const PCT_DEPTH: usize = 3;

#[test]
fn count_is_exact_when_quiet_random() {
    shuttle::check_random(|| count_model::<DirtyBitmap>(true), ITERATIONS);
}

#[test]
fn count_is_exact_when_quiet_pct() {
    shuttle::check_pct(|| count_model::<DirtyBitmap>(true), ITERATIONS, PCT_DEPTH);
}

#[test]
fn count_is_exact_when_quiet_with_range_marks_pct() {
    shuttle::check_pct(
        || count_range_model::<DirtyBitmap>(true),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
fn count_slot_handover_loses_nothing_pct() {
    shuttle::check_pct(handover_model::<false>, ITERATIONS, PCT_DEPTH);
}

#[test]
#[should_panic(expected = "count: ")]
fn mutant_claim_counted_from_a_load_is_caught() {
    shuttle::check_pct(
        || count_model::<LoadThenCountClaim>(true),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
#[should_panic(expected = "count: ")]
fn mutant_mark_counted_from_a_load_is_caught() {
    shuttle::check_pct(
        || count_model::<LoadThenCountMark>(true),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
#[should_panic(expected = "count: ")]
fn mutant_two_threads_in_one_owned_slot_is_caught() {
    shuttle::check_pct(
        || count_model::<SharedOwnedSlot>(true),
        ITERATIONS,
        PCT_DEPTH,
    );
}
