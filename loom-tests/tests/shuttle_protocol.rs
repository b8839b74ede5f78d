//! shuttle: the whole postcopy protocol (I1, I2, I3, I5, I6) at realistic sizes.
//!
//! Layout: five blocks, 1,368 target pages: 256 pages in 4 KiB host pages, 1,024 pages in
//! real 2 MiB host pages (512 target pages: 8 words and a summary bit each), 64 pages in
//! 16 KiB host pages, and two blocks shorter than a claim chunk (4 pages in 4 KiB host pages,
//! 20 pages in 8 KiB host pages). Every page starts dirty. Four threads: a return-path thread serving
//! random page requests (and the last host page of the layout: a guest touching the end of
//! RAM) and offering hints, a thread offering stray hints (random pages, the last page, and a
//! location outside the layout: I6), and two background scanners, each scanning one round to
//! completion. Requests, stray hints and the claim batch (1, 16 or 64 pages) are drawn from
//! shuttle's own generator, so a failing schedule replays exactly. See
//! `pagehint_models::protocol` for what is checked.
//!
//! Checkers: `check_random` and `check_pct` (depth 3), 10,000 schedules each; `check_dfs`
//! exhaustively on the small layout of the loom model. Each has a mutant it must catch: QEMU's
//! weak spot (a scanner that judges "all clean" against its position before a hint: I3), and
//! a scanner that sends what it saw dirty without checking its claim won (I1).
#![cfg(pagehint_shuttle)]

use pagehint::{BlockSpec, ClaimBatch, PageLocation, PageScheduler, RamLayout, SchedulerConfig};
use pagehint_models::protocol::{
    protocol_model, CheckThenSendScanner, ModelProtocol, ProtocolCase, TrustingScanner,
};
use shuttle::rand::{thread_rng, RngCore};

const ITERATIONS: usize = 10_000;
const PCT_DEPTH: usize = 3;

fn big_layout() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("pc.ram", 256 * 4096, 4096),
            BlockSpec::new("hugepages", 1024 * 4096, 2 << 20),
            BlockSpec::new("mid", 64 * 4096, 16 << 10),
            // Blocks shorter than a claim chunk: chunks run past their ends, which must not
            // count as verified pages (I3; tests/protocol.rs has the deterministic case).
            BlockSpec::new("rom", 4 * 4096, 4096),
            BlockSpec::new("vga", 20 * 4096, 8 << 10),
        ],
    )
    .unwrap()
}

/// A random case over [`big_layout`], drawn from shuttle's generator.
fn big_case(config: SchedulerConfig) -> ProtocolCase {
    let layout = big_layout();
    let mut rng = thread_rng();
    let total = layout.total_pages();
    let last = layout.location_of(total - 1).unwrap();
    let mut pick = || layout.location_of(rng.next_u64() % total).unwrap();
    let mut requests: Vec<PageLocation> = (0..6).map(|_| pick()).collect();
    let at = (pick().page % 7) as usize;
    requests.insert(at, last);
    let stray_hints = vec![pick(), last, PageLocation::new(7, 0), pick()];
    let batch = [ClaimBatch::HOST_PAGE, ClaimBatch::DEFAULT, ClaimBatch::WORD]
        [(thread_rng().next_u64() % 3) as usize];
    ProtocolCase {
        layout,
        config: config.with_batch(batch),
        requests,
        stray_hints,
        scanners: 2,
    }
}

fn random<P: ModelProtocol>(config: SchedulerConfig) {
    shuttle::check_random(move || protocol_model::<P>(&big_case(config)), ITERATIONS);
}

fn pct<P: ModelProtocol>(config: SchedulerConfig) {
    shuttle::check_pct(
        move || protocol_model::<P>(&big_case(config)),
        ITERATIONS,
        PCT_DEPTH,
    );
}

/// The loom model's case: two blocks (three narrow host pages of 2 pages; one wide host page
/// of 128), two requests, one scanner.
fn small_case() -> ProtocolCase {
    ProtocolCase {
        layout: RamLayout::new(
            4096,
            [
                BlockSpec::new("low", 6 * 4096, 2 * 4096),
                BlockSpec::new("huge", 128 * 4096, 128 * 4096),
            ],
        )
        .unwrap(),
        config: SchedulerConfig::preempt_hint().with_batch(ClaimBatch::HOST_PAGE),
        requests: vec![PageLocation::new(0, 4), PageLocation::new(1, 100)],
        stray_hints: vec![],
        scanners: 1,
    }
}

fn dfs<P: ModelProtocol>() {
    shuttle::check_dfs(move || protocol_model::<P>(&small_case()), None);
}

#[test]
fn i1_i2_i3_i6_random_schedules() {
    random::<PageScheduler>(SchedulerConfig::preempt_hint());
}

#[test]
#[should_panic(expected = "I3: scanner")]
fn mutant_scanner_trusting_the_hint_caught_by_random() {
    random::<TrustingScanner>(SchedulerConfig::preempt_hint());
}

#[test]
#[should_panic(expected = "I1: block")]
fn mutant_check_then_send_caught_by_random() {
    random::<CheckThenSendScanner>(SchedulerConfig::preempt_hint());
}

#[test]
fn i1_i2_i3_i6_pct_schedules() {
    pct::<PageScheduler>(SchedulerConfig::preempt_hint());
}

#[test]
#[should_panic(expected = "I3: scanner")]
fn mutant_scanner_trusting_the_hint_caught_by_pct() {
    pct::<TrustingScanner>(SchedulerConfig::preempt_hint());
}

#[test]
#[should_panic(expected = "I1: block")]
fn mutant_check_then_send_caught_by_pct() {
    pct::<CheckThenSendScanner>(SchedulerConfig::preempt_hint());
}

#[test]
fn i1_i2_i3_vanilla_random_schedules() {
    random::<PageScheduler>(SchedulerConfig::vanilla());
}

#[test]
#[should_panic(expected = "I1: block")]
fn mutant_check_then_send_vanilla_caught_by_random() {
    random::<CheckThenSendScanner>(SchedulerConfig::vanilla());
}

#[test]
fn i1_i2_i3_small_layout_every_schedule() {
    dfs::<PageScheduler>();
}

#[test]
#[should_panic(
    expected = "I3: scanner 1 reported done while the host page at block 0 page 2 is dirty"
)]
fn mutant_scanner_trusting_the_hint_caught_by_dfs() {
    dfs::<TrustingScanner>();
}

#[test]
#[should_panic(expected = "I1: block")]
fn mutant_check_then_send_caught_by_dfs() {
    dfs::<CheckThenSendScanner>();
}
