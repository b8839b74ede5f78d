//! loom: the postcopy-recovery handoff at a cut (I1), exhaustively: a sender puts claimed
//! host pages on a connection, a receiver places them, the connection is cut at once, and
//! the source recovers from the received bitmap and sends the rest on a new connection. See
//! `pagehint_models::recovery` for what is checked.
//!
//! Layout: one block of 4 target pages in 4 KiB host pages, all dirty; claims of 2 pages,
//! the first connection cut after one claim.
//!
//! Mutant, caught by the same model: the received bitmap read before the receiver has been
//! joined (a page it places afterwards is sent again: placed twice, I1).
#![cfg(pagehint_loom)]

use pagehint_models::recovery::{handoff_model, HandoffCase};

fn case() -> HandoffCase {
    HandoffCase {
        pages: 4,
        batch: 2,
        before_cut: 1,
    }
}

#[test]
fn i1_recovery_handoff_places_each_page_once_across_connections() {
    let case = case();
    loom::model(move || handoff_model::<false>(&case));
}

#[test]
#[should_panic(expected = "sent twice (by sender 1 and then by sender 2)")]
fn mutant_bitmap_read_before_the_receiver_is_joined_is_caught() {
    let case = case();
    loom::model(move || handoff_model::<true>(&case));
}
