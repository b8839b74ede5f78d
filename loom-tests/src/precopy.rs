//! The precopy model (design I7): a guest thread writes pages and merges their dirty marks
//! (KVM-style dirty logs, ranges, single pages) while senders run rounds of claims.
//!
//! Every write carries a version, higher for later batches. After the race the bitmap is
//! drained once; then the destination must hold the newest version of every page (every mark
//! was collected by a claim after it happened, and that claim saw the write before the mark),
//! and no dirty bit may be left that no claim collects.

use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};

use pagehint::RamLayout;

use crate::bitmap::{assert_nothing_stranded, drain, Mark, ModelBitmap};
use crate::record::GuestPages;
use crate::sync::{thread, Arc};

/// One configuration of the precopy model.
#[derive(Clone, Debug)]
pub struct PrecopyCase {
    /// The layout.
    pub layout: RamLayout,
    /// Pages written (version 1) and marked before the senders start.
    pub initial: Vec<Mark>,
    /// The guest thread's batches: batch `k` writes version `k + 2` to its pages, then marks.
    pub batches: Vec<Vec<Mark>>,
    /// Sender threads (at least one; the first runs on the model's main thread).
    pub senders: u32,
    /// Rounds each sender runs at least; senders keep running rounds while the guest thread
    /// writes (yielding between rounds, so schedulers that favour one thread move on).
    pub rounds: u32,
}

fn write_and_mark<B: ModelBitmap>(
    bm: &B,
    guest: &GuestPages,
    layout: &RamLayout,
    m: &Mark,
    v: u64,
) {
    for loc in m.pages() {
        guest.write(loc, v);
    }
    m.apply(bm, layout);
}

/// A sender: at least `case.rounds` rounds, and more while the guest thread writes.
fn sender<B: ModelBitmap>(bm: &B, guest: &GuestPages, case: &PrecopyCase, writing: &AtomicBool) {
    let mut round = 0;
    // Relaxed: bookkeeping (see `precopy_model`).
    while round < case.rounds || writing.load(StdOrdering::Relaxed) {
        bm.send_round(&case.layout, &mut |hp| guest.send(hp));
        round += 1;
        thread::yield_now();
    }
}

/// The precopy model: see the [module docs](self).
pub fn precopy_model<B: ModelBitmap>(case: &PrecopyCase) {
    assert!(case.senders >= 1);
    let layout = &case.layout;
    let bm = Arc::new(B::new(layout));
    let marks = case.initial.iter().chain(case.batches.iter().flatten());
    let guest = Arc::new(GuestPages::new(marks.flat_map(Mark::pages)));
    for m in &case.initial {
        write_and_mark(&*bm, &guest, layout, m, 1);
    }
    // Bookkeeping, not under test (see `record`): whether the guest thread is done.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (bm, guest, case, writing) = (bm.clone(), guest.clone(), case.clone(), writing.clone());
        thread::spawn(move || {
            for (k, batch) in case.batches.iter().enumerate() {
                for m in batch {
                    write_and_mark(&*bm, &guest, &case.layout, m, k as u64 + 2);
                }
            }
            // Relaxed: bookkeeping; the senders' last round runs after they see it.
            writing.store(false, StdOrdering::Relaxed);
        })
    };
    let others: Vec<_> = (1..case.senders)
        .map(|_| {
            let (bm, guest, writing, case) =
                (bm.clone(), guest.clone(), writing.clone(), case.clone());
            thread::spawn(move || sender(&*bm, &guest, &case, &writing))
        })
        .collect();
    sender(&*bm, &guest, case, &writing);
    writer.join().unwrap();
    for t in others {
        t.join().unwrap();
    }
    drain(&*bm, layout, &guest);
    guest.assert_in_sync();
    assert_nothing_stranded(&*bm);
}
