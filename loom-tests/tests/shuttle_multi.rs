//! shuttle: several background senders and the urgent path on bigger cases than loom can
//! search exhaustively (I1, I2, I3, I4): three senders from `background_scanners(3)`, a
//! return-path thread serving several faults, two blocks (narrow host pages and 2 MiB-style
//! wide ones), random and PCT schedules. Shuttle treats every ordering as sequentially
//! consistent: these find interleaving bugs; the loom models (`loom_multi`, and
//! `loom_bitmap` for the drain) cover weak memory.
//!
//! The MUTANT (scanners pooling their verified-clean counts, see `pagehint_models::multi`) is caught by
//! the same checker.
#![cfg(pagehint_shuttle)]

use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout};
use pagehint_models::multi::{senders_and_urgent, Rewrite};

/// 8 narrow host pages of 2 target pages, then 4 wide host pages of 128 target pages.
fn layout() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("low", 16 * 4096, 2 * 4096),
            BlockSpec::new("huge", 512 * 4096, 128 * 4096),
        ],
    )
    .unwrap()
}

fn faults() -> Vec<PageLocation> {
    [(0, 3), (1, 300), (0, 12), (1, 40), (0, 7)]
        .map(|(b, p)| PageLocation::new(b, p))
        .to_vec()
}

#[test]
fn i1_i2_i3_i4_three_senders_and_the_urgent_path_random() {
    shuttle::check_random(
        || senders_and_urgent::<PageScheduler>(&layout(), 3, &faults()),
        10_000,
    );
}

#[test]
fn i1_i2_i3_i4_three_senders_and_the_urgent_path_pct() {
    shuttle::check_pct(
        || senders_and_urgent::<PageScheduler>(&layout(), 3, &faults()),
        10_000,
        3,
    );
}

#[test]
fn control_rewrite_passes() {
    shuttle::check_pct(
        || senders_and_urgent::<Rewrite<false>>(&layout(), 3, &faults()),
        5_000,
        3,
    );
}

#[test]
#[should_panic(expected = "I3: scanner")]
fn mutant_pooled_sweep_counts_are_caught() {
    shuttle::check_pct(
        || senders_and_urgent::<Rewrite<true>>(&layout(), 3, &faults()),
        5_000,
        3,
    );
}
