//! shuttle: precopy dirty tracking (I7) at realistic sizes. A guest thread writes pages and
//! merges their dirty marks (KVM-style dirty logs of whole blocks and of memory slots, ranges
//! across words, single pages) while two senders run rounds of claims (at least two each, and
//! more while the guest writes); then the bitmap is drained. Every mark must be collected by a
//! claim after it happened: the destination ends with the newest version of every page, and no
//! dirty bit is left that no claim collects. See `pagehint_models::precopy`.
//!
//! Layout: three blocks, 4,416 target pages (256 in 4 KiB host pages, 4,096 in eight real
//! 2 MiB host pages, 64 in 16 KiB host pages). The marks are drawn from shuttle's own
//! generator, so a failing schedule replays exactly. Senders: the real background scanner
//! (`PageScheduler`, batched claims) and a plain find-and-claim loop over `DirtyBitmap`.
//!
//! Checkers: `check_random` (10,000 schedules) and `check_pct` (depth 3, 50,000 schedules).
//! Mutants each must catch: a marker that sets a 2 MiB host page's summary bit before the page
//! bit (the mark is stranded), and a load-then-store claim (it erases a racing mark in its
//! word).
#![cfg(pagehint_shuttle)]

use pagehint::{BlockSpec, DirtyBitmap, PageScheduler, RamLayout};
use pagehint_models::bitmap::{Mark, ModelBitmap};
use pagehint_models::flawed::{FlawedBitmap, LoadThenStoreClaim, NoFlaw, SummaryBeforePageBit};
use pagehint_models::precopy::{precopy_model, PrecopyCase};
use shuttle::rand::{thread_rng, RngCore};

const ITERATIONS: usize = 10_000;
/// PCT needs more schedules here: the load-then-store mutant is caught after about 1,600 of
/// them on average (a preemption must fall between its load and its store, and the senders
/// take hundreds of steps); 50,000 leave it no realistic chance to slip through.
const PCT_ITERATIONS: usize = 50_000;
const PCT_DEPTH: usize = 3;

fn layout() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("pc.ram", 256 * 4096, 4096),
            BlockSpec::new("hugepages", 4096 * 4096, 2 << 20),
            BlockSpec::new("mid", 64 * 4096, 16 << 10),
        ],
    )
    .unwrap()
}

/// A random mark at a uniformly drawn page (so mostly in the 2 MiB block): that page, a range
/// of up to 70 pages from it (crossing words), a block's dirty log with it and up to three
/// more pages set, or a memory slot's dirty log starting at it (up to 130 pages, not word
/// aligned) with up to three more pages set.
fn random_mark(layout: &RamLayout) -> Mark {
    let mut rng = thread_rng();
    let mut below = |n: u64| rng.next_u64() % n;
    let at = layout.location_of(below(layout.total_pages())).unwrap();
    let block = at.block;
    let pages = layout.blocks()[block as usize].pages();
    match below(4) {
        0 => Mark::Page(at),
        1 => {
            let first = at.page;
            let count = 1 + below((pages - first).min(70));
            Mark::Range {
                block,
                first,
                count,
            }
        }
        2 => {
            let n = below(4);
            Mark::Log {
                block,
                pages: (0..n).map(|_| below(pages)).chain([at.page]).collect(),
            }
        }
        _ => {
            // A memory slot's log: up to 130 pages from `at`, not word aligned.
            let len = 1 + below((pages - at.page).min(130));
            let n = below(4);
            Mark::LogAt {
                block,
                first: at.page,
                len,
                pages: (0..n)
                    .map(|_| at.page + below(len))
                    .chain([at.page])
                    .collect(),
            }
        }
    }
}

fn random_case() -> PrecopyCase {
    let layout = layout();
    let initial = (0..4).map(|_| random_mark(&layout)).collect();
    let batches = (0..3)
        .map(|_| (0..3).map(|_| random_mark(&layout)).collect())
        .collect();
    PrecopyCase {
        layout,
        initial,
        batches,
        senders: 2,
        rounds: 2,
    }
}

fn random<B: ModelBitmap>() {
    shuttle::check_random(|| precopy_model::<B>(&random_case()), ITERATIONS);
}

fn pct<B: ModelBitmap>() {
    shuttle::check_pct(
        || precopy_model::<B>(&random_case()),
        PCT_ITERATIONS,
        PCT_DEPTH,
    );
}

#[test]
fn i7_merges_race_the_real_scanner_random_schedules() {
    random::<PageScheduler>();
}

#[test]
fn i7_merges_race_claim_loops_random_schedules() {
    random::<DirtyBitmap>();
    random::<FlawedBitmap<NoFlaw>>();
}

#[test]
fn i7_merges_race_the_real_scanner_pct_schedules() {
    pct::<PageScheduler>();
}

#[test]
fn i7_merges_race_claim_loops_pct_schedules() {
    pct::<DirtyBitmap>();
}

#[test]
#[should_panic(expected = "I7: ")]
fn mutant_summary_before_page_bit_caught_by_random() {
    random::<FlawedBitmap<SummaryBeforePageBit>>();
}

#[test]
#[should_panic(expected = "I7: ")]
fn mutant_load_then_store_claim_caught_by_random() {
    random::<FlawedBitmap<LoadThenStoreClaim>>();
}

#[test]
#[should_panic(expected = "I7: ")]
fn mutant_summary_before_page_bit_caught_by_pct() {
    pct::<FlawedBitmap<SummaryBeforePageBit>>();
}

#[test]
#[should_panic(expected = "I7: ")]
fn mutant_load_then_store_claim_caught_by_pct() {
    pct::<FlawedBitmap<LoadThenStoreClaim>>();
}
