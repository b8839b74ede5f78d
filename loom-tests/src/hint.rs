//! The hint slot model (design I4) and its mutants.
//!
//! [`i4_offer_take_model`] runs offerers and takers against one slot ([`TWO_OFFERERS`]: two
//! offerers and a taker; [`REOFFER`]: the same with one offerer offering twice;
//! [`TWO_TAKERS`]: an offerer offering twice and two takers), then drains it, and checks I4:
//! * at most one hint is pending and an offer never overwrites a pending one: every accepted
//!   offer is taken exactly once by the end (none lost);
//! * each accepted hint is taken at most once;
//! * a taken value is exactly one that was offered and accepted (never torn);
//! * taking from an empty slot yields nothing;
//! * the documented ordering contract: an accepted offer is a release and a take an acquire,
//!   so the taker sees what the offerer wrote before offering.

use pagehint::{hint, hint::Offer, PageHint, PageLocation};

use crate::sync::{thread, Arc, AtomicU64, Ordering};

/// The slot under test: the real [`PageHint`] or a mutant.
pub trait ModelHint: Send + Sync + 'static {
    /// An empty slot.
    fn new() -> Self;
    /// Offers `loc`; whether it was accepted.
    fn offer(&self, loc: PageLocation) -> bool;
    /// Takes the pending hint, if any.
    fn take(&self) -> Option<PageLocation>;
}

impl ModelHint for PageHint {
    fn new() -> Self {
        PageHint::new()
    }
    fn offer(&self, loc: PageLocation) -> bool {
        PageHint::offer(self, loc).expect("model locations fit the packing") == Offer::Accepted
    }
    fn take(&self) -> Option<PageLocation> {
        PageHint::take(self)
    }
}

const EMPTY: u64 = 0;
const VALID: u64 = 1 << 63;

fn pack(loc: PageLocation) -> u64 {
    hint::pack(loc).expect("model locations fit the packing")
}

/// MUTANT: the offer checks for "empty" with a load, then *stores* (no compare-exchange), so
/// two offerers that both saw an empty slot both "succeed" and the second overwrites the first.
pub struct OverwritingOffer {
    cell: AtomicU64,
}

impl ModelHint for OverwritingOffer {
    fn new() -> Self {
        Self {
            cell: AtomicU64::new(EMPTY),
        }
    }
    fn offer(&self, loc: PageLocation) -> bool {
        // Acquire/Release as strong as the real cell's; the flaw is the lost atomicity.
        if self.cell.load(Ordering::Acquire) != EMPTY {
            return false;
        }
        self.cell.store(pack(loc), Ordering::Release); // BUG: store instead of CAS
        true
    }
    fn take(&self) -> Option<PageLocation> {
        // Acquire pairs with the offer's release, as in the real cell.
        hint::unpack(self.cell.swap(EMPTY, Ordering::Acquire))
    }
}

/// MUTANT: the take loads the hint and then stores "empty" (no swap), so two takers can both
/// take one hint.
pub struct LoadThenStoreTake {
    cell: AtomicU64,
}

impl ModelHint for LoadThenStoreTake {
    fn new() -> Self {
        Self {
            cell: AtomicU64::new(EMPTY),
        }
    }
    fn offer(&self, loc: PageLocation) -> bool {
        // Release publishes the offerer's work, as in the real cell.
        self.cell
            .compare_exchange(EMPTY, pack(loc), Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }
    fn take(&self) -> Option<PageLocation> {
        // Acquire pairs with the offer's release; the flaw is the lost atomicity.
        let word = self.cell.load(Ordering::Acquire);
        if word == EMPTY {
            return None;
        }
        self.cell.store(EMPTY, Ordering::Relaxed); // BUG: load, then store
        hint::unpack(word)
    }
}

/// MUTANT: the hint kept in two words (block with the valid bit, and page), so a taker can see
/// the block of one hint with the page of another (or of none): a torn hint.
pub struct SplitWordHint {
    block: AtomicU64,
    page: AtomicU64,
}

impl ModelHint for SplitWordHint {
    fn new() -> Self {
        Self {
            block: AtomicU64::new(EMPTY),
            page: AtomicU64::new(0),
        }
    }
    fn offer(&self, loc: PageLocation) -> bool {
        // Release: publishes the offerer's work with the block word.
        let won = self
            .block
            .compare_exchange(
                EMPTY,
                VALID | u64::from(loc.block),
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_ok();
        if won {
            self.page.store(loc.page, Ordering::Release); // BUG: the second half, written later
        }
        won
    }
    fn take(&self) -> Option<PageLocation> {
        // Acquire pairs with the offer's release.
        let block = self.block.swap(EMPTY, Ordering::Acquire);
        // Acquire: the newest page word this thread may see.
        let page = self.page.load(Ordering::Acquire);
        (block != EMPTY).then(|| PageLocation::new((block & !VALID) as u32, page))
    }
}

/// MUTANT: the real algorithm with relaxed orderings: a taker may not see what the offerer
/// wrote before offering. Only a weak-memory checker (loom) can catch it.
pub struct RelaxedHint {
    cell: AtomicU64,
}

impl ModelHint for RelaxedHint {
    fn new() -> Self {
        Self {
            cell: AtomicU64::new(EMPTY),
        }
    }
    fn offer(&self, loc: PageLocation) -> bool {
        self.cell
            .compare_exchange(EMPTY, pack(loc), Ordering::Relaxed, Ordering::Relaxed) // BUG: not Release
            .is_ok()
    }
    fn take(&self) -> Option<PageLocation> {
        hint::unpack(self.cell.swap(EMPTY, Ordering::Relaxed)) // BUG: not Acquire
    }
}

/// The three locations the model offers: distinct in block and page, so a torn mix of two is
/// none of them.
pub const OFFERS: [PageLocation; 3] = [
    PageLocation::new(1, 10),
    PageLocation::new(2, 20),
    PageLocation::new(3, 30),
];

/// Who races in one run of [`i4_offer_take_model`].
#[derive(Clone, Copy, Debug)]
pub struct HintRace {
    /// One offerer thread per entry, offering these indices of [`OFFERS`] in order.
    pub offerers: &'static [&'static [usize]],
    /// Taker threads, each taking once (the last one is the model's main thread).
    pub takers: usize,
}

/// Two offerers against one taker: overwriting, tearing, the ordering contract.
pub const TWO_OFFERERS: HintRace = HintRace {
    offerers: &[&[0], &[1]],
    takers: 1,
};

/// An offerer offering twice and another offering once against a taker: offers after a
/// take are accepted again, and still never overwrite.
pub const REOFFER: HintRace = HintRace {
    offerers: &[&[0, 2], &[1]],
    takers: 1,
};

/// One offerer offering twice against two takers: taking at most once.
pub const TWO_TAKERS: HintRace = HintRace {
    offerers: &[&[0, 2]],
    takers: 2,
};

/// I4: the offerers and takers of `race` run concurrently, then the slot is drained.
/// Panics with a message naming the violated property ("I4: ..." or "ordering: ...").
pub fn i4_offer_take_model<H: ModelHint>(race: HintRace) {
    assert!(race.takers >= 1);
    let hint = Arc::new(H::new());
    // What each offerer "did" before offering OFFERS[i] (sent the page, in the scheduler).
    let work: Arc<[AtomicU64; 3]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));

    let offerers: Vec<_> = race
        .offerers
        .iter()
        .map(|&which| {
            let (hint, work) = (hint.clone(), work.clone());
            thread::spawn(move || {
                let mut accepted = Vec::new();
                for &i in which {
                    // Relaxed: the offer's release must publish it (the contract under test).
                    work[i].store(1, Ordering::Relaxed);
                    if hint.offer(OFFERS[i]) {
                        accepted.push(OFFERS[i]);
                    }
                }
                accepted
            })
        })
        .collect();
    let take = |hint: &H, work: &[AtomicU64; 3]| {
        let got = hint.take();
        if let Some(i) = got.and_then(|loc| OFFERS.iter().position(|o| *o == loc)) {
            // Relaxed: the take's acquire must make the offerer's write visible.
            assert_eq!(
                work[i].load(Ordering::Relaxed),
                1,
                "ordering: took {} without seeing the offerer's work before it",
                OFFERS[i]
            );
        }
        got
    };
    let takers: Vec<_> = (1..race.takers)
        .map(|_| {
            let (hint, work) = (hint.clone(), work.clone());
            thread::spawn(move || take(&hint, &work))
        })
        .collect();
    let mut taken: Vec<PageLocation> = take(&hint, &work).into_iter().collect();

    let mut accepted = Vec::new();
    for t in offerers {
        accepted.extend(t.join().unwrap());
    }
    for t in takers {
        taken.extend(t.join().unwrap());
    }
    taken.extend(hint.take());
    let again = hint.take();
    assert_eq!(
        again, None,
        "I4: a take from the drained slot gave {again:?} (two hints were pending, or an empty take gave something)"
    );

    for (n, loc) in taken.iter().enumerate() {
        assert!(
            OFFERS.contains(loc),
            "I4: took a torn hint {loc}, which no one offered"
        );
        assert!(
            accepted.contains(loc),
            "I4: took {loc}, whose offer was refused"
        );
        assert!(
            !taken[..n].contains(loc),
            "I4: the hint {loc} was taken twice"
        );
    }
    for loc in &accepted {
        assert!(
            taken.contains(loc),
            "I4: the accepted hint {loc} was lost (overwritten while pending)"
        );
    }
}
