//! shuttle: deliberate duplicates on the real scheduler at a bigger size than loom searches:
//! 8 host pages, background claims of 2, a guest faulting on 4 of them while the background
//! sender runs; requests for pages the background path already claimed are resent on the
//! urgent channel. Random and PCT schedules, 10,000 each. See `pagehint_models::overtake`
//! for what is checked, and `loom_overtake.rs` for the mutants, caught here too.
#![cfg(pagehint_shuttle)]

use pagehint::CopyLedger;
use pagehint_models::overtake::{
    overtake_model, DropStillCopies, ExpectResend, OvertakeCase, PlaceEachKind,
};

const ITERATIONS: usize = 10_000;
const PCT_DEPTH: usize = 3;

fn case() -> OvertakeCase {
    OvertakeCase {
        pages: 8,
        batch: 2,
        requests: vec![1, 2, 5, 3],
    }
}

#[test]
fn overtake_random() {
    shuttle::check_random(|| overtake_model::<CopyLedger>(&case()), ITERATIONS);
}

#[test]
fn overtake_pct() {
    shuttle::check_pct(
        || overtake_model::<CopyLedger>(&case()),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
#[should_panic(expected = "I1: ")]
fn mutant_duplicate_placed_twice_is_caught() {
    shuttle::check_pct(
        || overtake_model::<PlaceEachKind>(&case()),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
#[should_panic(expected = "overtake-stale: ")]
fn mutant_stale_copy_overwriting_the_guest_is_caught() {
    shuttle::check_pct(
        || overtake_model::<DropStillCopies>(&case()),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
#[should_panic(expected = "overtake-lost: requested host page")]
fn mutant_request_waiting_forever_is_caught() {
    shuttle::check_pct(
        || overtake_model::<ExpectResend>(&case()),
        ITERATIONS,
        PCT_DEPTH,
    );
}
