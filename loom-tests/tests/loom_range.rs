//! loom: a range request racing the background scanner (I1, I2, I3, I5), exhaustively (two
//! threads, no preemption bound). See `pagehint_models::range` for what is checked.
//!
//! Layouts: 8 target pages in host pages of 2 (four narrow host pages in one word; the request
//! covers host pages 1 to 3 and is claimed with one masked `fetch_and`), and 256 target pages
//! in host pages of 128 (two wide host pages, scaled-down 2 MiB pages: the request covers
//! both, each won through its summary bit). The scanner claims one host page per step, so it
//! races the request on every host page.
//!
//! Mutant, caught by the same model in both modes: the old `serve`, which served a range's
//! first host page and silently dropped the rest (I5).
#![cfg(pagehint_loom)]

use pagehint::{BlockSpec, ClaimBatch, PageScheduler, RamLayout, SchedulerConfig};
use pagehint_models::range::{range_model, FirstPageOnly, ModelRange, RangeCase};

fn narrow(config: SchedulerConfig) -> RangeCase {
    RangeCase {
        layout: RamLayout::new(4096, [BlockSpec::new("ram", 8 * 4096, 2 * 4096)]).unwrap(),
        config: config.with_batch(ClaimBatch::HOST_PAGE),
        requests: vec![(0, 2, 6)],
    }
}

fn wide() -> RangeCase {
    RangeCase {
        layout: RamLayout::new(4096, [BlockSpec::new("huge", 256 * 4096, 128 * 4096)]).unwrap(),
        config: SchedulerConfig::preempt_hint(),
        requests: vec![(0, 100, 60)],
    }
}

fn check<M: ModelRange>(case: RangeCase) {
    loom::model(move || range_model::<M>(&case));
}

#[test]
fn i1_i2_i3_i5_range_request_races_the_scanner_narrow() {
    check::<PageScheduler>(narrow(SchedulerConfig::preempt_hint()));
}

#[test]
fn i1_i2_i3_i5_range_request_races_the_scanner_wide() {
    check::<PageScheduler>(wide());
}

#[test]
fn i1_i3_i5_vanilla_range_request_races_the_scanner() {
    check::<PageScheduler>(narrow(SchedulerConfig::vanilla()));
}

#[test]
#[should_panic(expected = "I5: host page at block 0 page 4 of the range request")]
fn mutant_first_page_only_is_caught() {
    check::<FirstPageOnly>(narrow(SchedulerConfig::preempt_hint()));
}

#[test]
#[should_panic(expected = "I5: host page at block 0 page 4 of the range request")]
fn mutant_first_page_only_is_caught_in_vanilla_mode() {
    check::<FirstPageOnly>(narrow(SchedulerConfig::vanilla()));
}
