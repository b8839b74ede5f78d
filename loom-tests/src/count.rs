//! The O(1) dirty count (`DirtyBitmap::dirty_count`) under concurrent marks and claims, and
//! its mutants.
//!
//! [`count_model`] starts with pages 0 and 1 dirty, then runs two threads that each claim
//! page 0 and mark page 2 (so both claims race for one bit, and both marks race to set one),
//! with a third thread (when asked) draining the word and reading the count; each read must lie
//! in `0 ..= pages`, and `pages_dirtied` must never decrease. After the joins — a quiet moment
//! — the count must equal the number of dirty bits exactly ("count:" in the panic message).
//!
//! The real [`DirtyBitmap`] is checked, and a rewrite of its counting on one word of the
//! shim's atomics, [`CountingWord`], whose control passes the same model. MUTANTS of the
//! rewrite: a claim that counts what a separate load saw instead of what its own `fetch_and`
//! took ([`LoadThenCountClaim`]: two claimers of one bit both count it), and a mark that
//! counts what a load saw clean before its `fetch_or` ([`LoadThenCountMark`]: two markers of
//! one bit both count it). Neither is visible without a race: a sequential test passes both.

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use pagehint::{DirtyBitmap, PageLocation, RamLayout};

use crate::sync::{thread, Arc, AtomicU64, Ordering};

/// A bitmap that keeps a dirty count: the real one, or the rewrite.
pub trait CountingBitmap: Send + Sync + 'static {
    /// A clean bitmap of 64 target pages.
    fn new() -> Self;
    /// Marks page `p` dirty.
    fn mark(&self, p: u64);
    /// Claims page `p`; whether it was dirty.
    fn claim(&self, p: u64) -> bool;
    /// Takes every dirty page (a drain); how many there were.
    fn drain(&self) -> u64;
    /// The O(1) count.
    fn dirty_count(&self) -> u64;
    /// Pages newly dirtied so far.
    fn pages_dirtied(&self) -> u64;
    /// The dirty bits, counted (for the check when quiet).
    fn dirty_bits(&self) -> u64;
}

impl CountingBitmap for DirtyBitmap {
    fn new() -> Self {
        DirtyBitmap::new(&RamLayout::single("w", 64 * 4096, 4096).unwrap()).expect("small")
    }
    fn mark(&self, p: u64) {
        self.mark_dirty(PageLocation::new(0, p)).unwrap();
    }
    fn claim(&self, p: u64) -> bool {
        self.claim_page(PageLocation::new(0, p))
            .unwrap()
            .is_claimed()
    }
    fn drain(&self) -> u64 {
        let mut w = [0u64];
        self.get_and_clear(0, 0, &mut w).unwrap()
    }
    fn dirty_count(&self) -> u64 {
        DirtyBitmap::dirty_count(self)
    }
    fn pages_dirtied(&self) -> u64 {
        DirtyBitmap::pages_dirtied(self)
    }
    fn dirty_bits(&self) -> u64 {
        self.dirty_pages()
    }
}

/// The counting protocol of `DirtyBitmap` rewritten on one word; `FLAW` picks a mutant
/// (0: none, the control).
pub struct CountingWord<const FLAW: u8> {
    word: AtomicU64,
    dirtied: AtomicU64,
    cleared: AtomicU64,
}

/// The control rewrite: counts what its own RMWs changed.
pub type ControlCount = CountingWord<0>;
/// MUTANT: a claim counts what a load before its `fetch_and` saw.
pub type LoadThenCountClaim = CountingWord<1>;
/// MUTANT: a mark counts what a load before its `fetch_or` saw clean.
pub type LoadThenCountMark = CountingWord<2>;

impl<const FLAW: u8> CountingBitmap for CountingWord<FLAW> {
    fn new() -> Self {
        Self {
            word: AtomicU64::new(0),
            dirtied: AtomicU64::new(0),
            cleared: AtomicU64::new(0),
        }
    }
    fn mark(&self, p: u64) {
        let bit = 1 << p;
        let newly = if FLAW == 2 {
            // BUG: decided on a load, not on the RMW's own result.
            // Relaxed: the mutant's flaw is the count, not the ordering.
            let seen = self.word.load(Ordering::Relaxed);
            // Release: as the real mark.
            self.word.fetch_or(bit, Ordering::Release);
            seen & bit == 0
        } else {
            // Release: as the real mark.
            self.word.fetch_or(bit, Ordering::Release) & bit == 0
        };
        if newly {
            // Relaxed: as the real count.
            self.dirtied.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn claim(&self, p: u64) -> bool {
        let bit = 1 << p;
        let took = if FLAW == 1 {
            // BUG: decided on a load, not on the RMW's own result.
            // Relaxed: the mutant's flaw is the count, not the ordering.
            let seen = self.word.load(Ordering::Relaxed);
            // Acquire: as the real claim.
            self.word.fetch_and(!bit, Ordering::Acquire);
            seen & bit != 0
        } else {
            // Acquire: as the real claim.
            self.word.fetch_and(!bit, Ordering::Acquire) & bit != 0
        };
        if took {
            // Relaxed: as the real count.
            self.cleared.fetch_add(1, Ordering::Relaxed);
        }
        took
    }
    fn drain(&self) -> u64 {
        // Acquire: as the real drain.
        let n = u64::from(self.word.swap(0, Ordering::Acquire).count_ones());
        // Relaxed: as the real count.
        self.cleared.fetch_add(n, Ordering::Relaxed);
        n
    }
    fn dirty_count(&self) -> u64 {
        // Relaxed (both): as the real count; cleared first.
        let cleared = self.cleared.load(Ordering::Relaxed);
        let dirtied = self.dirtied.load(Ordering::Relaxed);
        dirtied.saturating_sub(cleared).min(64)
    }
    fn pages_dirtied(&self) -> u64 {
        // Relaxed: a count.
        self.dirtied.load(Ordering::Relaxed)
    }
    fn dirty_bits(&self) -> u64 {
        // Relaxed: read after the joins.
        u64::from(self.word.load(Ordering::Relaxed).count_ones())
    }
}

/// The count model: see the [module docs](self). With `drainer`, a third thread drains the
/// word and reads the count while the others run.
pub fn count_model<B: CountingBitmap>(drainer: bool) {
    let b = Arc::new(B::new());
    b.mark(0);
    b.mark(1);
    // Pages the threads took, to check the drain and the claims together (bookkeeping
    // outside the checked protocol: std atomics).
    let taken = Arc::new(StdAtomicU64::new(0));
    let worker = |b: Arc<B>, taken: Arc<StdAtomicU64>| {
        move || {
            if b.claim(0) {
                // Relaxed: bookkeeping, read after the joins.
                taken.fetch_add(1, StdOrdering::Relaxed);
            }
            b.mark(2);
        }
    };
    let t1 = thread::spawn(worker(b.clone(), taken.clone()));
    let t2 = drainer.then(|| {
        let (b, taken) = (b.clone(), taken.clone());
        thread::spawn(move || {
            let before = b.pages_dirtied();
            let n = b.drain();
            // Relaxed: bookkeeping, read after the joins.
            taken.fetch_add(n, StdOrdering::Relaxed);
            let c = b.dirty_count();
            assert!(c <= 64, "count: {c} dirty pages of 64");
            assert!(
                b.pages_dirtied() >= before,
                "count: pages_dirtied went down"
            );
        })
    });
    worker(b.clone(), taken.clone())();
    t1.join().unwrap();
    if let Some(t) = t2 {
        t.join().unwrap();
    }
    let (count, bits) = (b.dirty_count(), b.dirty_bits());
    assert_eq!(
        count, bits,
        "count: the O(1) count says {count} dirty pages when quiet, the bits say {bits}"
    );
    // Relaxed: read after the joins.
    let taken = taken.load(StdOrdering::Relaxed);
    assert_eq!(
        b.pages_dirtied(),
        bits + taken,
        "count: pages_dirtied is not what was taken plus what is left"
    );
}
