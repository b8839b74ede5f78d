//! shuttle: range requests racing the background scanner (I1, I2, I3, I5) at a bigger size
//! than loom searches: a narrow block of 256 target pages in host pages of 2 (four words,
//! ranges crossing word boundaries) and a wide block of 512 target pages in host pages of 128,
//! with four random range requests per run, in preempt-hint and vanilla modes. Random and PCT
//! schedules; requests are drawn from shuttle's generator, so a failing schedule replays
//! exactly. See `pagehint_models::range` for what is checked, and `loom_range.rs` for the
//! mutant, caught here too.
#![cfg(pagehint_shuttle)]

use pagehint::{BlockSpec, ClaimBatch, PageScheduler, RamLayout, SchedulerConfig};
use pagehint_models::range::{range_model, FirstPageOnly, ModelRange, RangeCase};
use shuttle::rand::{thread_rng, RngCore};

const ITERATIONS: usize = 10_000;
const PCT_DEPTH: usize = 3;

fn model<M: ModelRange>(config: SchedulerConfig) {
    let layout = RamLayout::new(
        4096,
        [
            BlockSpec::new("low", 256 * 4096, 2 * 4096),
            BlockSpec::new("huge", 512 * 4096, 128 * 4096),
        ],
    )
    .unwrap();
    let mut rng = thread_rng();
    let requests = (0..4)
        .map(|_| {
            let block = (rng.next_u64() % 2) as u32;
            let pages = layout.blocks()[block as usize].pages();
            let first = rng.next_u64() % pages;
            let count = 2 + rng.next_u64() % 150;
            (
                block,
                first.min(pages - 2),
                count.min(pages - first.min(pages - 2)),
            )
        })
        .collect();
    let case = RangeCase {
        layout,
        config: config.with_batch(ClaimBatch::HOST_PAGE),
        requests,
    };
    range_model::<M>(&case);
}

#[test]
fn i1_i2_i3_i5_range_requests_random() {
    shuttle::check_random(
        || model::<PageScheduler>(SchedulerConfig::preempt_hint()),
        ITERATIONS,
    );
}

#[test]
fn i1_i2_i3_i5_range_requests_pct() {
    shuttle::check_pct(
        || model::<PageScheduler>(SchedulerConfig::preempt_hint()),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
fn i1_i3_i5_vanilla_range_requests_pct() {
    shuttle::check_pct(
        || model::<PageScheduler>(SchedulerConfig::vanilla()),
        ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
#[should_panic(expected = "I5: host page at")]
fn mutant_first_page_only_is_caught() {
    shuttle::check_pct(
        || model::<FirstPageOnly>(SchedulerConfig::preempt_hint()),
        ITERATIONS,
        PCT_DEPTH,
    );
}
