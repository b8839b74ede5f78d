//! loom: the whole postcopy protocol (I1, I2, I3, I5, I6) on a small layout, exhaustively.
//!
//! Layout: block 0 has 6 target pages in host pages of 2 (three narrow host pages in one
//! word); block 1 has one wide host page of 128 target pages (two words and a summary bit, a
//! scaled-down 2 MiB huge page). Every page starts dirty. The return-path thread requests
//! page 4 of block 0 and page 100 of block 1, sending each host page it wins and offering the
//! hint after it (`PageScheduler::serve` + `urgent_sent`); the main thread runs a background
//! scanner to completion. See `pagehint_models::protocol` for what is checked.
//!
//! The two-thread models run without a preemption bound: every interleaving and weak-memory
//! outcome. The three-thread variants (stray hints, two scanners) need a bound; it is stated
//! and explained at [`run_bounded`].
//!
//! Vanilla mode (the request queue) has its own model: `loom_vanilla.rs`.
//!
//! Mutants, each caught by the same model: QEMU's weak spot (a scanner that follows the hint
//! but judges "all clean" against its position before the hint: I3), and a scanner that sends
//! what it saw dirty without checking that its claim won (I1).
#![cfg(pagehint_loom)]

use pagehint::{BlockSpec, ClaimBatch, PageLocation, PageScheduler, RamLayout, SchedulerConfig};
use pagehint_models::protocol::{
    protocol_model, CheckThenSendScanner, ModelProtocol, ProtocolCase, TrustingScanner,
};

fn case(batch: ClaimBatch) -> ProtocolCase {
    ProtocolCase {
        layout: RamLayout::new(
            4096,
            [
                BlockSpec::new("low", 6 * 4096, 2 * 4096),
                BlockSpec::new("huge", 128 * 4096, 128 * 4096),
            ],
        )
        .unwrap(),
        config: SchedulerConfig::preempt_hint().with_batch(batch),
        requests: vec![PageLocation::new(0, 4), PageLocation::new(1, 100)],
        stray_hints: vec![],
        scanners: 1,
    }
}

fn check<P: ModelProtocol>(batch: ClaimBatch) {
    run::<P>(case(batch));
}

fn run<P: ModelProtocol>(case: ProtocolCase) {
    loom::model(move || protocol_model::<P>(&case));
}

#[test]
fn i1_i2_i3_urgent_path_and_scanner_one_host_page_per_claim() {
    check::<PageScheduler>(ClaimBatch::HOST_PAGE);
}

#[test]
fn i1_i2_i3_urgent_path_and_scanner_word_batches() {
    check::<PageScheduler>(ClaimBatch::WORD);
}

#[test]
#[should_panic(
    expected = "I3: scanner 1 reported done while the host page at block 0 page 2 is dirty"
)]
fn mutant_scanner_trusting_the_hint_is_caught() {
    check::<TrustingScanner>(ClaimBatch::HOST_PAGE);
}

#[test]
#[should_panic(expected = "I1: block")]
fn mutant_check_then_send_scanner_is_caught() {
    check::<CheckThenSendScanner>(ClaimBatch::HOST_PAGE);
}

/// Three threads: loom's exhaustive search does not finish in CI time (over 15 minutes on two
/// cores even with a single stray hint), so these explore every interleaving with at most
/// `bound` preemptions (plus every weak-memory outcome). Most concurrency bugs need no more
/// than two or three preemptions; both mutants above need one.
fn run_bounded<P: ModelProtocol>(case: ProtocolCase, bound: usize) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(bound);
    builder.check(move || protocol_model::<P>(&case));
}

fn stray_hints() -> ProtocolCase {
    ProtocolCase {
        // One into the wide host page the urgent path claims, one behind the scan position.
        stray_hints: vec![PageLocation::new(1, 64), PageLocation::new(0, 1)],
        ..case(ClaimBatch::HOST_PAGE)
    }
}

fn two_scanners() -> ProtocolCase {
    ProtocolCase {
        scanners: 2,
        ..case(ClaimBatch::HOST_PAGE)
    }
}

/// Preemption bound 3 (see [`run_bounded`]).
#[test]
fn i6_stray_hints_change_only_the_order() {
    run_bounded::<PageScheduler>(stray_hints(), 3);
}

/// Preemption bound 3 (see [`run_bounded`]).
#[test]
#[should_panic(expected = "I3: scanner 1 reported done")]
fn mutant_scanner_trusting_stray_hints_is_caught() {
    run_bounded::<TrustingScanner>(stray_hints(), 3);
}

/// Preemption bound 2 (see [`run_bounded`]).
#[test]
fn i1_i3_two_scanners_and_the_urgent_path() {
    run_bounded::<PageScheduler>(two_scanners(), 2);
}

/// Preemption bound 2 (see [`run_bounded`]).
#[test]
#[should_panic(expected = "I1: block")]
fn mutant_check_then_send_with_two_scanners_is_caught() {
    run_bounded::<CheckThenSendScanner>(two_scanners(), 2);
}

#[test]
fn i1_i2_i3_three_requests_one_behind_the_scan() {
    run::<PageScheduler>(ProtocolCase {
        requests: vec![
            PageLocation::new(0, 4),
            PageLocation::new(1, 100),
            PageLocation::new(0, 0),
        ],
        ..case(ClaimBatch::HOST_PAGE)
    });
}

#[test]
fn i1_i2_i3_two_wide_host_pages_contended() {
    run::<PageScheduler>(ProtocolCase {
        layout: RamLayout::new(
            4096,
            [
                BlockSpec::new("low", 6 * 4096, 2 * 4096),
                BlockSpec::new("huge", 256 * 4096, 128 * 4096),
            ],
        )
        .unwrap(),
        requests: vec![PageLocation::new(0, 4), PageLocation::new(1, 200)],
        ..case(ClaimBatch::HOST_PAGE)
    });
}
