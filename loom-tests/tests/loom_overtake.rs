//! loom: deliberate duplicates, exhaustively: one host page's background copy and its urgent
//! resend arrive on two receiver threads while the guest reads and writes the page. See
//! `pagehint_models::overtake` for what is checked.
//!
//! Mutants, caught by the same model: the first copy of each kind placed (a duplicate placed
//! twice, I1); a dropped duplicate still copied into the page (a stale copy overwriting the
//! guest's write); both copies dropped (a request that waits forever).
#![cfg(pagehint_loom)]

use pagehint::CopyLedger;
use pagehint_models::overtake::{
    duplicate_pair_model, ControlGate, DropStillCopies, ExpectResend, PlaceEachKind,
};

#[test]
fn overtaking_copies_place_each_page_once_on_the_real_ledger() {
    loom::model(duplicate_pair_model::<CopyLedger>);
}

#[test]
fn overtaking_copies_place_each_page_once_on_the_control() {
    loom::model(duplicate_pair_model::<ControlGate>);
}

#[test]
#[should_panic(expected = "I1: ")]
fn mutant_duplicate_placed_twice_is_caught() {
    loom::model(duplicate_pair_model::<PlaceEachKind>);
}

#[test]
#[should_panic(expected = "overtake-stale: ")]
fn mutant_stale_copy_overwriting_the_guest_is_caught() {
    loom::model(duplicate_pair_model::<DropStillCopies>);
}

#[test]
#[should_panic(expected = "overtake-lost: requested host page")]
fn mutant_request_waiting_forever_is_caught() {
    loom::model(duplicate_pair_model::<ExpectResend>);
}
