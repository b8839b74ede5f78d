//! The O(1) dirty count (`DirtyBitmap::dirty_count`) under concurrent marks and claims, and
//! its mutants.
//!
//! [`count_model`] starts with pages 0 and 1 dirty, then runs two threads that each claim
//! page 0, mark page 2 and mark a page of their own (so both claims race for one bit, both
//! marks of page 2 race to set one, and both threads add to the dirtied count at once), with
//! a third thread (when asked) draining the word and reading the count; each read must lie
//! in `0 ..= pages`, and `pages_dirtied` must never decrease. After the joins — a quiet moment
//! — the count must equal the number of dirty bits exactly ("count:" in the panic message).
//! [`count_range_model`] does the same with the multi-bit marks: a whole-word range (the
//! `swap` path), a partial range and a two-page dirty log (the `fetch_or` path).
//!
//! The count is kept per thread (`pagehint`'s `bitmap/count.rs`): under a model checker the
//! bitmap has two owned slots, which their threads add to with a plain load and store, and one
//! shared slot (RMW) for the rest, so the models' three threads use both paths on the real
//! [`DirtyBitmap`]. Threads keep their slot until the execution ends there; the hand-over of
//! a slot from an exiting thread to the next one is [`handover_model`]'s subject.
//!
//! A rewrite of the counting on one word of the shim's atomics, [`CountingWord`], passes the
//! same models. MUTANTS of the rewrite: a claim that counts what a separate load saw instead of
//! what its own `fetch_and` took ([`LoadThenCountClaim`]: two claimers of one bit both count
//! it), a mark that counts what a load saw clean before its `fetch_or` ([`LoadThenCountMark`]:
//! two markers of one bit both count it), and every thread adding to one owned slot with a
//! plain load and store, as if the registry had handed a slot to two threads
//! ([`SharedOwnedSlot`]: an add is lost). None is visible without a race: a sequential test
//! passes them all.
//!
//! [`handover_model`]: two threads race for one owned slot (the loser adds to the shared
//! slot); the winner adds with a load and a store and gives the slot back, and the other may
//! take it over and add in turn: nothing may be lost. The control ([`AcquireRelease`]) uses the
//! orderings of `pagehint`'s registry (acquire CAS, release give-back); MUTANT
//! [`RelaxedHandover`] (both relaxed): the next owner's load may miss the last owner's store.

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use pagehint::{DirtyBitmap, PageLocation, RamLayout};

use crate::sync::{thread, Arc, AtomicU64, Ordering};

/// A bitmap that keeps a dirty count: the real one, or the rewrite. `who` is the calling
/// model thread (0, 1, 2), which the rewrite uses to pick its slot; the real bitmap finds its
/// slot itself.
pub trait CountingBitmap: Send + Sync + 'static {
    /// A clean bitmap of 64 target pages.
    fn new() -> Self;
    /// Marks page `p` dirty.
    fn mark(&self, who: usize, p: u64);
    /// Marks pages `first .. first + count` dirty.
    fn mark_range(&self, who: usize, first: u64, count: u64);
    /// Merges a one-word dirty log.
    fn merge(&self, who: usize, log: u64);
    /// Claims page `p`; whether it was dirty.
    fn claim(&self, who: usize, p: u64) -> bool;
    /// Takes every dirty page (a drain); how many there were.
    fn drain(&self, who: usize) -> u64;
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
    fn mark(&self, _: usize, p: u64) {
        self.mark_dirty(PageLocation::new(0, p)).unwrap();
    }
    fn mark_range(&self, _: usize, first: u64, count: u64) {
        DirtyBitmap::mark_range(self, 0, first, count).unwrap();
    }
    fn merge(&self, _: usize, log: u64) {
        self.merge_dirty_log(0, &[log]).unwrap();
    }
    fn claim(&self, _: usize, p: u64) -> bool {
        self.claim_page(PageLocation::new(0, p))
            .unwrap()
            .is_claimed()
    }
    fn drain(&self, _: usize) -> u64 {
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

/// Owned slots of the rewrite (as `pagehint` under a checker): threads 0 and 1 own one each,
/// thread 2 adds to the shared slot.
const OWNED: usize = 2;

/// One slot's counts.
#[derive(Default)]
struct Slot {
    dirtied: AtomicU64,
    cleared: AtomicU64,
}

/// The counting protocol of `DirtyBitmap` rewritten on one word, with its slots; `FLAW` picks
/// a mutant (0: none, the control).
pub struct CountingWord<const FLAW: u8> {
    word: AtomicU64,
    /// `OWNED` owned slots, then the shared one.
    slots: [Slot; OWNED + 1],
}

/// The control rewrite: counts what its own RMWs changed, each thread in its own slot.
pub type ControlCount = CountingWord<0>;
/// MUTANT: a claim counts what a load before its `fetch_and` saw.
pub type LoadThenCountClaim = CountingWord<1>;
/// MUTANT: a mark counts what a load before its `fetch_or` saw clean.
pub type LoadThenCountMark = CountingWord<2>;
/// MUTANT: every thread adds to owned slot 0 with a plain load and store.
pub type SharedOwnedSlot = CountingWord<3>;

impl<const FLAW: u8> CountingWord<FLAW> {
    /// Adds `n` to thread `who`'s slot of the count `which` picks.
    fn add(&self, who: usize, n: u64, which: impl Fn(&Slot) -> &AtomicU64) {
        if n == 0 {
            return;
        }
        let slot = if FLAW == 3 { 0 } else { who.min(OWNED) };
        let c = which(&self.slots[slot]);
        if slot < OWNED {
            // Relaxed (both): as the real count, a single writer's add.
            c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        } else {
            // Relaxed: as the real count's shared slot.
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Sets `mask`, counting the bits newly set (the mark-side flaw: from a load).
    fn or(&self, who: usize, mask: u64) {
        let newly = if FLAW == 2 {
            // BUG: decided on a load, not on the RMW's own result.
            // Relaxed: the mutant's flaw is the count, not the ordering.
            let seen = self.word.load(Ordering::Relaxed);
            // Release: as the real mark.
            self.word.fetch_or(mask, Ordering::Release);
            mask & !seen
        } else if mask == !0 {
            // Release: as the real mark (a whole word).
            !self.word.swap(!0, Ordering::Release)
        } else {
            // Release: as the real mark.
            mask & !self.word.fetch_or(mask, Ordering::Release)
        };
        self.add(who, u64::from(newly.count_ones()), |s| &s.dirtied);
    }
}

impl<const FLAW: u8> CountingBitmap for CountingWord<FLAW> {
    fn new() -> Self {
        Self {
            word: AtomicU64::new(0),
            slots: Default::default(),
        }
    }
    fn mark(&self, who: usize, p: u64) {
        self.or(who, 1 << p);
    }
    fn mark_range(&self, who: usize, first: u64, count: u64) {
        let mask = if count == 64 {
            !0
        } else {
            ((1u64 << count) - 1) << first
        };
        self.or(who, mask);
    }
    fn merge(&self, who: usize, log: u64) {
        self.or(who, log);
    }
    fn claim(&self, who: usize, p: u64) -> bool {
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
        self.add(who, u64::from(took), |s| &s.cleared);
        took
    }
    fn drain(&self, who: usize) -> u64 {
        // Acquire: as the real drain.
        let n = u64::from(self.word.swap(0, Ordering::Acquire).count_ones());
        self.add(who, n, |s| &s.cleared);
        n
    }
    fn dirty_count(&self) -> u64 {
        // Relaxed (all): as the real count; every cleared first.
        let cleared: u64 = self
            .slots
            .iter()
            .map(|s| s.cleared.load(Ordering::Relaxed))
            .sum();
        self.pages_dirtied().saturating_sub(cleared).min(64)
    }
    fn pages_dirtied(&self) -> u64 {
        // Relaxed: a count.
        self.slots
            .iter()
            .map(|s| s.dirtied.load(Ordering::Relaxed))
            .sum()
    }
    fn dirty_bits(&self) -> u64 {
        // Relaxed: read after the joins.
        u64::from(self.word.load(Ordering::Relaxed).count_ones())
    }
}

/// Checks the count while threads run: within the pages, `pages_dirtied` not going down.
fn check_running<B: CountingBitmap>(b: &B, dirtied_before: u64) {
    let c = b.dirty_count();
    assert!(c <= 64, "count: {c} dirty pages of 64");
    assert!(
        b.pages_dirtied() >= dirtied_before,
        "count: pages_dirtied went down"
    );
}

/// Checks the count when quiet: exact, and `pages_dirtied` = taken + left.
fn check_quiet<B: CountingBitmap>(b: &B, taken: u64) {
    let (count, bits) = (b.dirty_count(), b.dirty_bits());
    assert_eq!(
        count, bits,
        "count: the O(1) count says {count} dirty pages when quiet, the bits say {bits}"
    );
    assert_eq!(
        b.pages_dirtied(),
        bits + taken,
        "count: pages_dirtied is not what was taken plus what is left"
    );
}

/// Runs `work(b, who)` on threads 0 (this one) and 1, and with `drainer` a thread 2 that
/// drains the word and reads the count; checks the count when quiet.
fn run_model<B: CountingBitmap>(
    b: Arc<B>,
    drainer: bool,
    work: impl Fn(&B, usize) -> u64 + Send + Sync + Clone + 'static,
) {
    // Pages the threads took, to check the drain and the claims together (bookkeeping
    // outside the checked protocol: std atomics).
    let taken = Arc::new(StdAtomicU64::new(0));
    let worker = |b: Arc<B>, taken: Arc<StdAtomicU64>, who: usize| {
        let work = work.clone();
        move || {
            // Relaxed: bookkeeping, read after the joins.
            taken.fetch_add(work(&b, who), StdOrdering::Relaxed);
        }
    };
    let t1 = thread::spawn(worker(b.clone(), taken.clone(), 1));
    let t2 = drainer.then(|| {
        let (b, taken) = (b.clone(), taken.clone());
        thread::spawn(move || {
            let before = b.pages_dirtied();
            let n = b.drain(2);
            // Relaxed: bookkeeping, read after the joins.
            taken.fetch_add(n, StdOrdering::Relaxed);
            check_running(&*b, before);
        })
    });
    worker(b.clone(), taken.clone(), 0)();
    t1.join().unwrap();
    if let Some(t) = t2 {
        t.join().unwrap();
    }
    // Relaxed: read after the joins.
    check_quiet(&*b, taken.load(StdOrdering::Relaxed));
}

/// The count model: see the [module docs](self). With `drainer`, a third thread drains the
/// word and reads the count while the others run.
pub fn count_model<B: CountingBitmap>(drainer: bool) {
    let b = Arc::new(B::new());
    b.mark(0, 0);
    b.mark(0, 1);
    run_model(b, drainer, |b, who| {
        let took = u64::from(b.claim(who, 0));
        b.mark(who, 2);
        b.mark(who, 3 + who as u64);
        took
    });
}

/// The count model with multi-bit marks: thread 0 marks the whole word (`swap`), thread 1 a
/// partial range and a two-page log (`fetch_or`) and claims a page of the range, and the
/// drainer (if asked) takes the word and reads the count.
pub fn count_range_model<B: CountingBitmap>(drainer: bool) {
    let b = Arc::new(B::new());
    b.mark(0, 5);
    run_model(b, drainer, |b, who| {
        if who == 0 {
            b.mark_range(0, 0, 64);
            0
        } else {
            b.mark_range(1, 4, 4);
            b.merge(1, 1 | 1 << 63);
            u64::from(b.claim(1, 6))
        }
    });
}

/// A registry of one owned count slot, as `pagehint`'s registry hands slots to threads, with
/// the slot's count and the shared slot; `RELAXED` is the mutant.
pub struct HandoverSlots<const RELAXED: bool> {
    /// Bit 0 set while a thread owns the slot.
    registry: AtomicU64,
    owned: AtomicU64,
    shared: AtomicU64,
}

/// The control: acquire CAS, release give-back (the orderings of `pagehint`'s registry).
pub type AcquireRelease = HandoverSlots<false>;
/// MUTANT: the CAS and the give-back relaxed.
pub type RelaxedHandover = HandoverSlots<true>;

impl<const RELAXED: bool> HandoverSlots<RELAXED> {
    fn new() -> Self {
        Self {
            registry: AtomicU64::new(0),
            owned: AtomicU64::new(0),
            shared: AtomicU64::new(0),
        }
    }

    /// A thread's life: takes the slot if free, counts one page in it, gives it back (or
    /// counts in the shared slot).
    fn count_one(&self) {
        let (take, give) = if RELAXED {
            (Ordering::Relaxed, Ordering::Relaxed)
        } else {
            (Ordering::Acquire, Ordering::Release)
        };
        // Acquire on success (control): pairs with the last owner's release; Relaxed on
        // failure: nothing is learnt but "taken".
        if self
            .registry
            .compare_exchange(0, 1, take, Ordering::Relaxed)
            .is_ok()
        {
            // Relaxed (both): the single owner's add, as the real count.
            self.owned
                .store(self.owned.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            // Release (control): our store happens before the next owner's load.
            self.registry.fetch_and(!1, give);
        } else {
            // Relaxed: the shared slot's RMW.
            self.shared.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The hand-over model: see the [module docs](self). Two threads count three pages (this one
/// two, one after the other, so that the slot can change hands in either direction), after
/// which the total must be three.
pub fn handover_model<const RELAXED: bool>() {
    let s = Arc::new(HandoverSlots::<RELAXED>::new());
    let s1 = s.clone();
    let t = thread::spawn(move || s1.count_one());
    s.count_one();
    // The first owner may have given the slot back before the other started: then both
    // counted in it, one after the other.
    s.count_one();
    t.join().unwrap();
    // Relaxed (both): read after the join.
    let total = s.owned.load(Ordering::Relaxed) + s.shared.load(Ordering::Relaxed);
    assert_eq!(
        total, 3,
        "count: {total} pages counted of 3 (an add was lost)"
    );
}
