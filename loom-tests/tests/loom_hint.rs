//! loom: the hint slot (I4), exhaustively: every interleaving and every weak-memory outcome,
//! no preemption bound. Three races (see `pagehint_models::hint`): two offerers against a
//! taker, the same with one offerer offering twice, and an offerer offering twice against two
//! takers; then the slot is drained.
//!
//! Mutants, each caught by the same model: an offer that stores instead of compare-exchanging
//! (overwrites a pending hint), a take that loads then stores (takes a hint twice), a hint
//! split over two words (torn), and relaxed orderings (the taker misses the offerer's work;
//! only a weak-memory checker sees this one).
#![cfg(pagehint_loom)]

use pagehint::PageHint;
use pagehint_models::hint::{
    i4_offer_take_model, LoadThenStoreTake, OverwritingOffer, RelaxedHint, SplitWordHint, REOFFER,
    TWO_OFFERERS, TWO_TAKERS,
};

#[test]
fn i4_offer_never_overwrites_never_torn_two_offerers() {
    loom::model(|| i4_offer_take_model::<PageHint>(TWO_OFFERERS));
}

#[test]
fn i4_offers_after_a_take_are_accepted_and_never_overwrite() {
    loom::model(|| i4_offer_take_model::<PageHint>(REOFFER));
}

#[test]
fn i4_each_hint_taken_at_most_once_two_takers() {
    loom::model(|| i4_offer_take_model::<PageHint>(TWO_TAKERS));
}

#[test]
#[should_panic(expected = "I4: the accepted hint")]
fn mutant_overwriting_offer_is_caught() {
    loom::model(|| i4_offer_take_model::<OverwritingOffer>(TWO_OFFERERS));
}

#[test]
#[should_panic(expected = "I4: the accepted hint")]
fn mutant_overwriting_offer_is_caught_with_reoffers() {
    loom::model(|| i4_offer_take_model::<OverwritingOffer>(REOFFER));
}

#[test]
#[should_panic(expected = "I4: the hint")]
fn mutant_load_then_store_take_is_caught() {
    loom::model(|| i4_offer_take_model::<LoadThenStoreTake>(TWO_TAKERS));
}

#[test]
#[should_panic(expected = "I4: took a torn hint")]
fn mutant_split_word_hint_is_caught() {
    loom::model(|| i4_offer_take_model::<SplitWordHint>(TWO_OFFERERS));
}

#[test]
#[should_panic(expected = "ordering: took")]
fn mutant_relaxed_hint_is_caught() {
    loom::model(|| i4_offer_take_model::<RelaxedHint>(TWO_OFFERERS));
}
