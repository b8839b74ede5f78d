//! shuttle: `pagehint-uffd`'s `UFFD_EVENT_REMOVE` handling (R1, R2, R3) at a bigger size, on
//! the real remove gate and the real scheduler. See `pagehint_models::remove`.
//!
//! Case: 32 host pages, two prefetchers (with and without the hint); the balloon removes a
//! range of three pages, then one page, then a range overlapping the first (a page removed
//! twice: two generations), touching each removed page after its `madvise`; a vCPU touches
//! five pages no remove covers, concurrently (its faults race the prefetchers' claims). The
//! ranges and touches are drawn from shuttle's own generator, so a failing schedule replays.
//!
//! Checkers: `check_random` and `check_pct` (depth 3), 10,000 schedules each; each mutant
//! (marking after releasing the write side; copying without the read side) must be caught by
//! the same checker.
#![cfg(pagehint_shuttle)]

use pagehint_models::remove::{
    remove_model, ControlGate, CopyWithoutReadSide, MarkAfterUnlock, ModelGate, RemoveCase,
};
use pagehint_uffd_gate::RemoveGate;
use shuttle::rand::{thread_rng, RngCore};

const ITERATIONS: usize = 10_000;
const PCT_DEPTH: usize = 3;
const PAGES: u64 = 32;

/// A random case: removes in the upper half, touches in the lower half (never removed).
fn case(hint: bool) -> RemoveCase {
    let mut rng = thread_rng();
    let half = PAGES / 2;
    let lo = half + rng.next_u64() % (half - 4);
    let one = half + rng.next_u64() % half;
    let touches = (0..5).map(|_| rng.next_u64() % half).collect();
    RemoveCase {
        host_pages: PAGES,
        prefetchers: 2,
        hint,
        removes: vec![(lo, lo + 3), (one, one + 1), (lo + 1, lo + 4)],
        touches,
    }
}

fn model<G: ModelGate>() {
    let hint = thread_rng().next_u64() % 2 == 0;
    remove_model::<G>(&case(hint));
}

#[test]
fn r1_r2_r3_remove_random() {
    shuttle::check_random(model::<RemoveGate>, ITERATIONS);
}

#[test]
fn r1_r2_r3_remove_pct() {
    shuttle::check_pct(model::<RemoveGate>, ITERATIONS, PCT_DEPTH);
}

#[test]
fn r1_r2_r3_remove_control_rewrite_pct() {
    shuttle::check_pct(model::<ControlGate>, ITERATIONS, PCT_DEPTH);
}

#[test]
#[should_panic(expected = "R1: ")]
fn mutant_marking_after_releasing_the_write_side_is_caught() {
    shuttle::check_pct(model::<MarkAfterUnlock>, ITERATIONS, PCT_DEPTH);
}

#[test]
#[should_panic(expected = "R1: ")]
fn mutant_copying_without_the_read_side_is_caught() {
    shuttle::check_pct(model::<CopyWithoutReadSide>, ITERATIONS, PCT_DEPTH);
}
