//! loom: `pagehint-uffd`'s `UFFD_EVENT_REMOVE` handling (R1, R2, R3), on the real remove gate
//! and the real scheduler. See `pagehint_models::remove` for what runs and what is checked.
//!
//! Case: two host pages, one prefetcher scanning both; the balloon (the main thread) removes
//! host page 0 and then touches it. Three threads (the event thread, the prefetcher, the
//! balloon) over the kernel model's mutex and condition variable, the gate's lock, and the
//! bitmap's atomics: loom's exhaustive search needs a preemption bound here (as the
//! three-thread protocol models do); both mutants need one preemption, so bound 2 explores
//! every schedule they need and more.
//!
//! Mutants, each caught by the same checker (R1: stale file data after a remove): marking the
//! removed pages after releasing the write side, and a prefetcher copying without the read
//! side.
#![cfg(pagehint_loom)]

use pagehint_models::remove::{
    remove_model, ControlGate, CopyWithoutReadSide, MarkAfterUnlock, ModelGate, RemoveCase,
};
use pagehint_uffd_gate::RemoveGate;

const BOUND: usize = 2;

fn case() -> RemoveCase {
    RemoveCase {
        host_pages: 2,
        prefetchers: 1,
        hint: true,
        removes: vec![(0, 1)],
        touches: vec![],
    }
}

fn check<G: ModelGate>(case: RemoveCase) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(BOUND);
    builder.check(move || remove_model::<G>(&case));
}

#[test]
fn r1_r2_r3_remove_races_a_prefetcher() {
    check::<RemoveGate>(case());
}

#[test]
fn r1_r2_r3_remove_races_a_prefetcher_without_the_hint() {
    check::<RemoveGate>(RemoveCase {
        hint: false,
        ..case()
    });
}

#[test]
fn r1_r2_r3_the_control_rewrite_passes() {
    check::<ControlGate>(case());
}

#[test]
#[should_panic(expected = "R1: ")]
fn mutant_marking_after_releasing_the_write_side_is_caught() {
    check::<MarkAfterUnlock>(case());
}

#[test]
#[should_panic(expected = "R1: ")]
fn mutant_copying_without_the_read_side_is_caught() {
    check::<CopyWithoutReadSide>(case());
}
