//! loom: vanilla mode (I1, I2, I3, I5), exhaustively: a return-path thread queues requests
//! while the background scanner runs; a request may name a page the scanner already sent;
//! the queue is drained by the round after the last request. See
//! `pagehint_models::vanilla` for what is checked.
//!
//! Layout: one block of 8 target pages in host pages of 2 (four host pages in one word), all
//! dirty. The return path requests page 5 (host page 2), then page 1 (host page 0, the
//! scanner's first: often already sent when the request is taken). The request queue is the
//! shim's (a `VecDeque` behind loom's mutex under `cargo loom`), so every push and pop is a
//! step loom schedules.
//!
//! Mutants, each caught by the same model: requests kept in a one-slot cell that a new request
//! overwrites (a lost request: I5), and a scanner that sends a requested host page without
//! checking it is still dirty and winning its claim (a page sent twice: I1).
#![cfg(pagehint_loom)]

use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout};
use pagehint_models::vanilla::{
    vanilla_model, ControlRewrite, ModelVanilla, OverwritingSlotRewrite,
    SendRequestedUnclaimedRewrite, VanillaCase,
};

fn case() -> VanillaCase {
    VanillaCase {
        layout: RamLayout::new(4096, [BlockSpec::new("ram", 8 * 4096, 2 * 4096)]).unwrap(),
        requests: vec![PageLocation::new(0, 5), PageLocation::new(0, 1)],
    }
}

fn check<V: ModelVanilla>() {
    let case = case();
    loom::model(move || vanilla_model::<V>(&case));
}

#[test]
fn i1_i3_i5_vanilla_requests_race_the_scanner() {
    check::<PageScheduler>();
}

#[test]
fn i1_i3_i5_the_control_rewrite_passes() {
    check::<ControlRewrite>();
}

#[test]
#[should_panic(expected = "I5: a queued request was lost")]
fn mutant_overwriting_request_slot_is_caught() {
    check::<OverwritingSlotRewrite>();
}

#[test]
#[should_panic(expected = "I1: ")]
fn mutant_sending_a_requested_page_unclaimed_is_caught() {
    check::<SendRequestedUnclaimedRewrite>();
}
