//! loom: the dirty bitmap (I1, I2, I7), exhaustively: every interleaving and weak-memory
//! outcome, no preemption bound. See `pagehint_models::bitmap` for the models:
//! * two claimers of one target page (I1);
//! * two claimers of one host page, narrow (4 pages inside one word) and wide (128 pages, a
//!   scaled-down 2 MiB host page: two words and a summary bit), through different target pages
//!   of it (I1, I2);
//! * a guest writing and marking pages (single page, range across words, dirty log) while a
//!   sender claims, narrow and wide; then a drain: nothing lost, nothing stranded, and the
//!   collector of each mark sees the contents written before it (I7, release/acquire);
//! * the precopy drain (`get_and_clear`): against a host-page claim of a wide host page (one
//!   owner, whole: I1, I2), and against a KVM mark of page 70 — a dirty log merged at a slot's
//!   page offset (`KvmSlots::merge_dirty_log`), or a dirty-ring entry (a range mark,
//!   `KvmSlots::import_dirty_ring`) — narrow and wide, followed by a host-page sweep: the mark
//!   is collected exactly once, with its contents (I7).
//!
//! Each model also runs on `FlawedBitmap<NoFlaw>` (the mutants' unbroken base: it must pass)
//! and on the mutants it must catch: a load-then-store claim (I1, and I7: it erases a racing
//! mark), a host page claimed one target page at a time (I2), a wide claim without the summary
//! election (I2), a marker that sets the summary bit before the page bit (I7: the mark is
//! stranded), and relaxed marks and claims (I7: the collector misses the page contents; only
//! a weak-memory checker sees this one); for the drain, one that collects a wide host page
//! without the summary election (I2), one that clears the summary bit after the words (I7:
//! a mark landing in between is stranded), and relaxed orderings (I7: contents missed).
#![cfg(pagehint_loom)]

use pagehint::{DirtyBitmap, PageLocation};
use pagehint_models::bitmap::{
    self as model, drain_narrow_layout, drain_wide_layout, narrow_layout, wide_layout, Mark,
    ModelBitmap,
};
use pagehint_models::flawed::{
    FlawedBitmap, LoadThenStoreClaim, NoFlaw, NoSummaryElection, RelaxedOrderings,
    SplitHostPageClaim, SummaryBeforePageBit, SummaryClearedLast,
};

fn loc(page: u64) -> PageLocation {
    PageLocation::new(0, page)
}

fn one_page<B: ModelBitmap>() {
    loom::model(|| model::i1_two_claimers_one_page::<B>(5));
}

/// Narrow host page 1 (pages 4..8): pages 5 and 7 dirty, claimed through pages 4 and 7;
/// page 9 (host page 2, same word) is the bystander.
fn narrow_host_page<B: ModelBitmap>() {
    loom::model(|| {
        model::i1_i2_two_claimers_one_host_page::<B>(
            &narrow_layout(),
            &[loc(5), loc(7)],
            [loc(4), loc(7)],
            loc(9),
        )
    });
}

/// Wide host page 0 (pages 0..128, words 0 and 1): pages 3 and 100 dirty, claimed through
/// pages 3 and 100; page 200 (host page 1) is the bystander.
fn wide_host_page<B: ModelBitmap>() {
    loom::model(|| {
        model::i1_i2_two_claimers_one_host_page::<B>(
            &wide_layout(),
            &[loc(3), loc(100)],
            [loc(3), loc(100)],
            loc(200),
        )
    });
}

/// Narrow: page 1 (host page 0) dirty and claimed while page 5 (host page 1, same word) is
/// written and marked.
fn narrow_mark_races_claim<B: ModelBitmap>() {
    loom::model(|| model::i7_mark_races_claim::<B>(&narrow_layout(), loc(1), &Mark::Page(loc(5))));
}

/// Wide: page 3 (word 0) dirty and its host page claimed while page 100 (word 1, same host
/// page) is written and marked.
fn wide_mark_races_claim<B: ModelBitmap>() {
    loom::model(|| model::i7_mark_races_claim::<B>(&wide_layout(), loc(3), &Mark::Page(loc(100))));
}

#[test]
fn i1_two_claimers_one_page() {
    one_page::<DirtyBitmap>();
    one_page::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I1: both claimers won")]
fn mutant_load_then_store_page_claim_is_caught() {
    one_page::<FlawedBitmap<LoadThenStoreClaim>>();
}

#[test]
fn i1_i2_two_claimers_one_narrow_host_page() {
    narrow_host_page::<DirtyBitmap>();
    narrow_host_page::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I2: host page split")]
fn mutant_split_narrow_host_page_claim_is_caught() {
    narrow_host_page::<FlawedBitmap<SplitHostPageClaim>>();
}

#[test]
fn i1_i2_two_claimers_one_wide_host_page() {
    wide_host_page::<DirtyBitmap>();
    wide_host_page::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I2: host page split")]
fn mutant_wide_claim_without_summary_election_is_caught() {
    wide_host_page::<FlawedBitmap<NoSummaryElection>>();
}

#[test]
fn i7_mark_races_claim_narrow() {
    narrow_mark_races_claim::<DirtyBitmap>();
    narrow_mark_races_claim::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I7: the mark of block 0 page 5 was lost")]
fn mutant_load_then_store_claim_loses_a_racing_mark() {
    narrow_mark_races_claim::<FlawedBitmap<LoadThenStoreClaim>>();
}

#[test]
fn i7_mark_races_claim_wide() {
    wide_mark_races_claim::<DirtyBitmap>();
    wide_mark_races_claim::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I7: 1 dirty bit(s) stranded")]
fn mutant_summary_before_page_bit_strands_a_mark() {
    wide_mark_races_claim::<FlawedBitmap<SummaryBeforePageBit>>();
}

#[test]
#[should_panic(expected = "I7: the mark of block 0 page 100 was lost")]
fn mutant_relaxed_mark_and_claim_miss_the_contents() {
    wide_mark_races_claim::<FlawedBitmap<RelaxedOrderings>>();
}

/// Pages 62..66 (across words 0 and 1 of host page 0) written and marked with `mark_range`.
fn wide_range_races_claim<B: ModelBitmap>() {
    let mark = Mark::Range {
        block: 0,
        first: 62,
        count: 4,
    };
    loom::model(move || model::i7_mark_races_claim::<B>(&wide_layout(), loc(3), &mark));
}

/// Pages 70, 100 (host page 0) and 130 (host page 1) merged from a whole-block dirty log.
fn wide_log_races_claim<B: ModelBitmap>() {
    let mark = Mark::Log {
        block: 0,
        pages: vec![70, 100, 130],
    };
    loom::model(move || model::i7_mark_races_claim::<B>(&wide_layout(), loc(3), &mark));
}

/// A memory slot's log covering pages 60..130 (not word aligned: each log word is shifted
/// into two bitmap words), marking pages of both wide host pages.
fn wide_slot_log_races_claim<B: ModelBitmap>() {
    let mark = Mark::LogAt {
        block: 0,
        first: 60,
        len: 70,
        pages: vec![63, 100, 129],
    };
    loom::model(move || model::i7_mark_races_claim::<B>(&wide_layout(), loc(3), &mark));
}

#[test]
fn i7_mark_range_across_words_races_claim_wide() {
    wide_range_races_claim::<DirtyBitmap>();
    wide_range_races_claim::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I7: ")]
fn mutant_summary_before_page_bit_loses_a_racing_range() {
    wide_range_races_claim::<FlawedBitmap<SummaryBeforePageBit>>();
}

#[test]
fn i7_dirty_log_merge_races_claim_wide() {
    wide_log_races_claim::<DirtyBitmap>();
    wide_log_races_claim::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I7: ")]
fn mutant_summary_before_page_bit_loses_a_racing_log() {
    wide_log_races_claim::<FlawedBitmap<SummaryBeforePageBit>>();
}

#[test]
fn i7_slot_dirty_log_merge_races_claim_wide() {
    wide_slot_log_races_claim::<DirtyBitmap>();
    wide_slot_log_races_claim::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I7: ")]
fn mutant_summary_before_page_bit_loses_a_racing_slot_log() {
    wide_slot_log_races_claim::<FlawedBitmap<SummaryBeforePageBit>>();
}

/// KVM reports page 70 through a slot mapping pages 6..128 of the block: a dirty log merged at
/// the slot's page offset (slot page 64 is block page 70).
fn slot_log() -> Mark {
    Mark::LogAt {
        block: 0,
        first: 6,
        len: 122,
        pages: vec![70],
    }
}

/// KVM reports page 70 through a dirty-ring entry (`import_dirty_ring` marks runs as ranges).
fn ring_entry() -> Mark {
    Mark::Range {
        block: 0,
        first: 70,
        count: 1,
    }
}

fn drain_models<B: ModelBitmap>() {
    loom::model(model::i1_i2_drain_and_claim_one_owner::<B>);
    for mark in [slot_log(), ring_entry()] {
        for layout in [drain_wide_layout(), drain_narrow_layout()] {
            let mark = mark.clone();
            loom::model(move || model::i7_mark_races_drain::<B>(&layout, &mark));
        }
    }
}

#[test]
fn i1_i2_i7_get_and_clear_races_claims_and_kvm_marks() {
    drain_models::<DirtyBitmap>();
}

#[test]
fn i1_i2_i7_get_and_clear_control_passes() {
    drain_models::<FlawedBitmap<NoFlaw>>();
}

#[test]
#[should_panic(expected = "I2: host page split")]
fn mutant_get_and_clear_without_election_is_caught() {
    loom::model(model::i1_i2_drain_and_claim_one_owner::<FlawedBitmap<NoSummaryElection>>);
}

#[test]
#[should_panic(expected = "I7: the mark of block 0 page 70 was collected 0 times")]
fn mutant_get_and_clear_clearing_the_summary_last_is_caught() {
    loom::model(|| {
        model::i7_mark_races_drain::<FlawedBitmap<SummaryClearedLast>>(
            &drain_wide_layout(),
            &slot_log(),
        )
    });
}

#[test]
#[should_panic(
    expected = "I7: the mark of block 0 page 70 was lost: the guest wrote version 1, the destination has 0"
)]
fn mutant_relaxed_get_and_clear_misses_the_contents() {
    // Only a weak-memory checker sees this one: the bit arrives, the page contents do not.
    loom::model(|| {
        model::i7_mark_races_drain::<FlawedBitmap<RelaxedOrderings>>(
            &drain_narrow_layout(),
            &ring_entry(),
        )
    });
}
