//! shuttle: vanilla mode (I1, I2, I3, I5) at a bigger size than loom searches: one block of
//! 256 target pages in 4 KiB host pages, and a return path queueing 12 random requests while
//! the scanner runs. Random and PCT schedules, 10,000 each; requests are drawn from
//! shuttle's generator, so a failing schedule replays exactly. See
//! `pagehint_models::vanilla` for what is checked, and `loom_vanilla.rs` for the mutants,
//! caught here too.
#![cfg(pagehint_shuttle)]

use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout};
use pagehint_models::vanilla::{
    vanilla_model, ControlRewrite, ModelVanilla, OverwritingSlotRewrite,
    SendRequestedUnclaimedRewrite, VanillaCase,
};
use shuttle::rand::{thread_rng, RngCore};

const ITERATIONS: usize = 10_000;
const PCT_DEPTH: usize = 3;

fn model<V: ModelVanilla>() {
    let mut rng = thread_rng();
    let requests = (0..12)
        .map(|_| PageLocation::new(0, rng.next_u64() % 256))
        .collect();
    let case = VanillaCase {
        layout: RamLayout::new(4096, [BlockSpec::new("ram", 256 * 4096, 4096)]).unwrap(),
        requests,
    };
    vanilla_model::<V>(&case);
}

#[test]
fn i1_i3_i5_vanilla_random() {
    shuttle::check_random(model::<PageScheduler>, ITERATIONS);
}

#[test]
fn i1_i3_i5_vanilla_pct() {
    shuttle::check_pct(model::<PageScheduler>, ITERATIONS, PCT_DEPTH);
}

#[test]
fn i1_i3_i5_vanilla_control_rewrite_pct() {
    shuttle::check_pct(model::<ControlRewrite>, ITERATIONS, PCT_DEPTH);
}

#[test]
#[should_panic(expected = "I5: a queued request was lost")]
fn mutant_overwriting_request_slot_is_caught() {
    shuttle::check_pct(model::<OverwritingSlotRewrite>, ITERATIONS, PCT_DEPTH);
}

#[test]
#[should_panic(expected = "I1: ")]
fn mutant_sending_a_requested_page_unclaimed_is_caught() {
    shuttle::check_pct(
        model::<SendRequestedUnclaimedRewrite>,
        ITERATIONS,
        PCT_DEPTH,
    );
}
