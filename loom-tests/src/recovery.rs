//! The postcopy-recovery handoff at a cut (design I1) and its mutant.
//!
//! When the connections break in postcopy, the destination (`pagehint-migrate`'s
//! `dest::recovery`) stops the broken connection's receiver, **joins it**, and only then
//! reads its received bitmap, which the source rebuilds from
//! ([`PageScheduler::recover_shared`]: dirty = not received) before it sends again on a new
//! connection. [`handoff_model`] runs, on the real scheduler:
//! * a sender thread (the broken connection's background sender) claiming host pages and
//!   putting them on the connection (a queue), until the cut;
//! * a receiver thread placing what the connection brings (recording each placement, then
//!   setting its received bit), until it is told to stop; what is still queued then is lost
//!   with the connection (on the real link: frames not yet due, or still in the socket);
//! * the main thread cutting the connection at once, taking the received bitmap as
//!   [`Handoff`] says, joining the sender, recovering the scheduler from the bitmap, and
//!   sending everything left on a new connection;
//!
//! and checks that every target page was placed exactly once across both connections (I1):
//! none placed twice (a placement missing from the bitmap is sent again), none lost (a page
//! in the bitmap was placed).
//!
//! The handoff is the subject, rewritten here with its flaw as a const parameter:
//! [`JoinThenSnapshot`] is the harness's order (the control, which must pass), and the
//! MUTANT [`SnapshotThenJoin`] reads the bitmap while the receiver may still be placing a
//! page it had taken off the connection: that page is placed, missing from the bitmap, sent
//! again and placed twice (I1).

use std::collections::VecDeque;

use pagehint::{ClaimBatch, HostPage, PageScheduler, RamLayout, SchedulerConfig};

use crate::record::SentPages;
use crate::sync::{thread, Arc, AtomicU64, Mutex, Ordering};

/// The handoff of a broken connection's receiver to recovery: the received bitmap of a
/// one-word block, taken before (`SNAPSHOT_FIRST`, the mutant) or after (the harness) the
/// receiver has been joined.
pub struct Handoff<const SNAPSHOT_FIRST: bool>;

/// The harness's handoff: stop, join, then read the bitmap (the control).
pub type JoinThenSnapshot = Handoff<false>;
/// MUTANT: stop, read the bitmap, then join.
pub type SnapshotThenJoin = Handoff<true>;

impl<const SNAPSHOT_FIRST: bool> Handoff<SNAPSHOT_FIRST> {
    /// Stops the receiver, ends it and returns the received bitmap, in this handoff's order.
    fn take(stop: &AtomicU64, receiver: thread::JoinHandle<()>, received: &AtomicU64) -> u64 {
        // Relaxed: the receiver polls the flag; the join below is what orders its placements.
        stop.store(1, Ordering::Relaxed);
        if SNAPSHOT_FIRST {
            // Acquire: sees every placement whose bit was set so far, but not one to come.
            let bits = received.load(Ordering::Acquire);
            receiver.join().expect("receiver");
            bits
        } else {
            receiver.join().expect("receiver");
            // Relaxed: the join ordered every placement before this load.
            received.load(Ordering::Relaxed)
        }
    }
}

/// A case: one block of at most 64 target pages in 4 KiB host pages, all dirty; the first
/// connection's sender claims `batch` pages at a time and is cut after `before_cut` claims.
#[derive(Clone, Debug)]
pub struct HandoffCase {
    /// Target pages (at most 64: the received bitmap is one word).
    pub pages: u64,
    /// Pages per background claim.
    pub batch: u64,
    /// Claims the first connection's sender makes before the cut.
    pub before_cut: usize,
}

/// Runs the model (see the module) with handoff `Handoff<SNAPSHOT_FIRST>`.
pub fn handoff_model<const SNAPSHOT_FIRST: bool>(case: &HandoffCase) {
    assert!(case.pages <= 64, "model error: one word of received bits");
    let layout = RamLayout::single("ram", case.pages * 4096, 4096).expect("layout");
    let config =
        SchedulerConfig::preempt_hint().with_batch(ClaimBatch::pages(case.batch).expect("batch"));
    let mut sched = Arc::new(PageScheduler::new(layout.clone(), config).expect("bitmap"));
    sched.bitmap().mark_all();
    let placed = Arc::new(SentPages::new(&layout));
    let wire: Arc<Mutex<VecDeque<HostPage>>> = Arc::new(Mutex::new(VecDeque::new()));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let sender = {
        let (sched, wire) = (Arc::clone(&sched), Arc::clone(&wire));
        let before_cut = case.before_cut;
        thread::spawn(move || {
            let mut scanner = sched.background();
            for _ in 0..before_cut {
                let Some(claim) = scanner.next_claim() else {
                    return;
                };
                wire.lock().expect("wire").extend(claim.host_pages());
            }
        })
    };
    let receiver = {
        let (placed, wire) = (Arc::clone(&placed), Arc::clone(&wire));
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        thread::spawn(move || loop {
            // Relaxed: a polled flag (the handoff joins this thread).
            if stop.load(Ordering::Relaxed) != 0 {
                return;
            }
            let next = wire.lock().expect("wire").pop_front();
            match next {
                Some(hp) => {
                    placed.record(hp, 1);
                    // Release: the placement before its received bit.
                    received.fetch_or(1 << hp.first_page, Ordering::Release);
                }
                None => thread::yield_now(),
            }
        })
    };
    // The cut: whatever is on the connection, or still to be claimed, is the source's again.
    let bits = Handoff::<SNAPSHOT_FIRST>::take(&stop, receiver, &received);
    sender.join().expect("sender");
    let left = PageScheduler::recover_shared(&mut sched, 0, &[bits]).expect("recovery");
    let missing = case.pages - u64::from(bits.count_ones());
    assert_eq!(
        left, missing,
        "I1: the rebuild left {left} pages, {missing} were not received"
    );
    // A new connection: send what is left.
    let mut scanner = sched.background();
    while let Some(claim) = scanner.next_claim() {
        claim.host_pages().for_each(|hp| placed.record(hp, 2));
    }
    drop(scanner);
    placed.assert_each_sent_once();
}
