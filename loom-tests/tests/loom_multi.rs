//! loom: two background senders and the urgent path (I1, I2, I3, I4), exhaustively.
//!
//! Like QEMU's multifd channels, but in postcopy: `PageScheduler::background_scanners(2)`
//! starts two scanners at evenly spaced positions over one bitmap and one hint cell; a
//! return-path thread serves a fault, sends the host page it wins and offers the hint after
//! it. Checked, in every interleaving and weak-memory outcome (no preemption bound):
//! * every target page is sent exactly once, as a whole host page (I1, I2);
//! * *each* scanner's "done" means no host page is left to claim (I3): a scanner's count of
//!   pages it verified clean is its own, restarted by its own jumps;
//! * a hint is taken by at most one scanner (I4: taken ≤ accepted).
//!
//! The scanner is also rewritten (in `pagehint_models::multi`) on the public API (hint take, host-page scan and
//! claim), and the control rewrite passes the same model. Its MUTANT pools the scanners'
//! verified-clean counts in one shared counter on the shim atomics ("together we swept the
//! whole RAM"): ground swept by both scanners (after a wrap, or after a hint moved one into
//! the other's) is counted twice, and a scanner reports done while a host page is still
//! dirty. Only a model with two senders can catch it; this one does (I3).
#![cfg(pagehint_loom)]

use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout};
use pagehint_models::multi::{senders_and_urgent, Rewrite};

/// One block of four host pages of two target pages (one word); scanners start at host pages
/// 0 and 2; the fault is in host page 0, so the hint points at host page 1.
fn one_block() -> RamLayout {
    RamLayout::new(4096, [BlockSpec::new("ram", 8 * 4096, 2 * 4096)]).unwrap()
}

/// Two blocks, so scans wrap across blocks: a narrow one and one wide host page (128 target
/// pages: two words and a summary bit, a scaled-down 2 MiB page).
fn two_blocks() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("low", 4 * 4096, 2 * 4096),
            BlockSpec::new("huge", 128 * 4096, 128 * 4096),
        ],
    )
    .unwrap()
}

/// Runs `f` under loom with a preemption bound of `LOOM_MAX_PREEMPTIONS` (default 3).
///
/// Three threads that each make a dozen atomic steps are beyond an exhaustive search on a
/// test budget; bounding preemptions (loom's documented practice) still explores every
/// interleaving with up to that many forced context switches, and every weak-memory outcome
/// of each. The mutant below is caught within the bound.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

#[test]
fn i1_i2_i3_i4_two_evenly_spaced_senders_and_the_urgent_path() {
    model(|| senders_and_urgent::<PageScheduler>(&one_block(), 2, &[PageLocation::new(0, 1)]));
}

#[test]
fn i1_i2_i3_two_senders_wrap_across_blocks_and_a_wide_host_page() {
    model(|| senders_and_urgent::<PageScheduler>(&two_blocks(), 2, &[PageLocation::new(1, 5)]));
}

#[test]
fn control_rewrite_with_per_scanner_counts_passes() {
    model(|| senders_and_urgent::<Rewrite<false>>(&one_block(), 2, &[PageLocation::new(0, 1)]));
}

#[test]
#[should_panic(expected = "I3: scanner")]
fn mutant_pooled_sweep_counts_are_caught() {
    model(|| senders_and_urgent::<Rewrite<true>>(&one_block(), 2, &[PageLocation::new(0, 1)]));
}
