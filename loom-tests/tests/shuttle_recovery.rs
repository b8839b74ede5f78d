//! shuttle: the postcopy-recovery handoff at a cut (I1) at a bigger size than loom searches:
//! 64 target pages, claims of 4, the first connection cut after 5 claims. Random and PCT
//! schedules, 10,000 each. See `pagehint_models::recovery` for what is checked, and
//! `loom_recovery.rs` for the mutant, caught here too.
#![cfg(pagehint_shuttle)]

use pagehint_models::recovery::{handoff_model, HandoffCase};

const ITERATIONS: usize = 10_000;
const PCT_DEPTH: usize = 3;

fn case() -> HandoffCase {
    HandoffCase {
        pages: 64,
        batch: 4,
        before_cut: 5,
    }
}

#[test]
fn i1_recovery_handoff_random() {
    shuttle::check_random(|| handoff_model::<false>(&case()), ITERATIONS);
}

#[test]
fn i1_recovery_handoff_pct() {
    shuttle::check_pct(|| handoff_model::<false>(&case()), ITERATIONS, PCT_DEPTH);
}

#[test]
#[should_panic(expected = "sent twice (by sender 1 and then by sender 2)")]
fn mutant_bitmap_read_before_the_receiver_is_joined_is_caught() {
    shuttle::check_pct(|| handoff_model::<true>(&case()), ITERATIONS, PCT_DEPTH);
}
