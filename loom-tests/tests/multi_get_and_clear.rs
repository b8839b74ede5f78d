//! loom: a precopy consumer's `get_and_clear` against host-page claims and marks (I1, I2,
//! I7), exhaustively (no preemption bound).
//!
//! The block has 128 target pages (two words): either one wide host page with a summary bit
//! (a scaled-down 2 MiB page) or 4 KiB host pages. On the wide page, `get_and_clear` over both
//! words takes the host page through its summary bit, exactly like a host-page claim, so:
//! * **I1/I2**: with every page dirty, a consumer's `get_and_clear` and a sender's
//!   `claim_host_page` race; exactly one gets the host page, whole;
//! * **I7** (wide and narrow): a KVM dirty log merged at a page offset
//!   (`KvmSlots::merge_dirty_log`, the shifted merge), or a dirty-ring entry
//!   (`KvmSlots::import_dirty_ring`), races `get_and_clear`; the mark is
//!   collected exactly once, by the consumer or by a later host-page scan, and whoever collects
//!   it sees the page contents written before it.
//!
//! `get_and_clear` is rewritten here on the shim atomics (`Mini<F>`); the control rewrite
//! passes both models. MUTANTS: one collects the page words without winning the summary
//! election (splits the host page with a claim: I2), one clears the summary bit *after*
//! swapping the page words (a mark landing in between keeps its page bit but loses its
//! summary bit, so host-page scans never find it: I7), one swaps the words with relaxed
//! ordering (on 4 KiB host pages the consumer then gets the bit but may read the page
//! contents from before the write: the destination misses the write, I7; on the wide page the
//! summary election's acquire hides this flaw).
#![cfg(pagehint_loom)]

use pagehint::vmm::{DirtyRingEntry, KvmSlots, SlotMapping};
use pagehint::{BlockSpec, DirtyBitmap, HostPage, PageLocation, RamLayout};
use pagehint_models::record::GuestPages;
use pagehint_models::sync::{thread, Arc, AtomicU64, Ordering};

/// The operations under test, on block 0.
trait Collect: Send + Sync + 'static {
    fn new(layout: &RamLayout) -> Self;
    /// Marks every page dirty.
    fn mark_all(&self);
    /// KVM reports page `page` dirty.
    fn mark(&self, page: u64);
    /// Claims the host page holding `page`: the number of dirty pages it won, if any.
    fn claim_host_page(&self, page: u64) -> Option<u64>;
    /// `get_and_clear(0, 0, out)`.
    fn get_and_clear(&self, out: &mut [u64; 2]);
    /// A host-page sender's sweep: claims every host page it finds dirty and hands it over
    /// with its number of dirty pages.
    fn sweep(&self, send: &mut dyn FnMut(HostPage, u64));
}

fn pages_of(words: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        let mut bits = w;
        while bits != 0 {
            out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
        }
    }
    out
}

/// The real bitmap, marked through a KVM slot that maps pages 6..128 of the block: by a
/// dirty log (`RING = false`: the shifted merge, slot page 64 is block page 70) or by a
/// dirty-ring entry (`RING = true`).
struct Real<const RING: bool> {
    bitmap: DirtyBitmap,
    slots: KvmSlots,
    host_pages: u64,
}

const SLOT_FIRST: u64 = 6;

impl<const RING: bool> Collect for Real<RING> {
    fn new(layout: &RamLayout) -> Self {
        let mut slots = KvmSlots::new();
        slots
            .insert(
                layout,
                SlotMapping {
                    slot: 3,
                    block: 0,
                    first_page: SLOT_FIRST,
                    pages: 128 - SLOT_FIRST,
                },
            )
            .unwrap();
        Self {
            bitmap: DirtyBitmap::new(layout).unwrap(),
            slots,
            host_pages: layout.blocks()[0].host_page_pages(),
        }
    }
    fn mark_all(&self) {
        self.bitmap.mark_all();
    }
    fn mark(&self, page: u64) {
        let p = page - SLOT_FIRST;
        if RING {
            let r = self
                .slots
                .import_dirty_ring(&self.bitmap, [DirtyRingEntry::new(3, p)]);
            assert_eq!((r.marked, r.rejected), (1, 0));
            return;
        }
        let mut log = [0u64; 2];
        log[(p / 64) as usize] |= 1 << (p % 64);
        assert_eq!(self.slots.merge_dirty_log(&self.bitmap, 3, &log), Ok(1));
    }
    fn claim_host_page(&self, page: u64) -> Option<u64> {
        let c = self
            .bitmap
            .claim_host_page(PageLocation::new(0, page))
            .unwrap()
            .into_claim()?;
        Some(c.dirty_pages())
    }
    fn get_and_clear(&self, out: &mut [u64; 2]) {
        self.bitmap.get_and_clear(0, 0, out).unwrap();
    }
    fn sweep(&self, send: &mut dyn FnMut(HostPage, u64)) {
        let mut from = 0;
        while let Some(p) = self.bitmap.find_next_dirty_host_page(0, from).unwrap() {
            if let Some(c) = self
                .bitmap
                .claim_host_page(PageLocation::new(0, p))
                .unwrap()
                .into_claim()
            {
                c.host_pages().for_each(|hp| send(hp, c.dirty_pages()));
            }
            from = p + self.host_pages;
        }
    }
}

/// Which line of the rewrite is broken.
trait Flaw: Send + Sync + 'static {
    /// Collect the page words without winning the summary election.
    const NO_ELECTION: bool = false;
    /// Clear the summary bit after swapping the page words.
    const SUMMARY_LAST: bool = false;
    /// Swap the page words with relaxed ordering.
    const RELAXED_SWAP: bool = false;
}
struct NoFlaw;
impl Flaw for NoFlaw {}
/// MUTANT: get-and-clear ignores the summary election.
struct NoElection;
impl Flaw for NoElection {
    const NO_ELECTION: bool = true;
}
/// MUTANT: get-and-clear clears the summary bit after the page words.
struct SummaryLast;
impl Flaw for SummaryLast {
    const SUMMARY_LAST: bool = true;
}
/// MUTANT: get-and-clear swaps the page words with relaxed ordering.
struct RelaxedSwap;
impl Flaw for RelaxedSwap {
    const RELAXED_SWAP: bool = true;
}

/// Block 0 rewritten on the shim atomics: two words and, if `WIDE`, one wide host page with
/// its summary bit; otherwise one target page per host page.
struct Mini<F: Flaw, const WIDE: bool> {
    words: [AtomicU64; 2],
    summary: AtomicU64,
    _flaw: std::marker::PhantomData<F>,
}

impl<F: Flaw, const WIDE: bool> Mini<F, WIDE> {
    /// The wide host page's election.
    fn elect(&self) -> bool {
        // Relaxed pre-check, then the acquire RMW that elects one owner, as the real code.
        self.summary.load(Ordering::Relaxed) & 1 != 0
            && self.summary.fetch_and(!1, Ordering::Acquire) & 1 != 0
    }
}

impl<F: Flaw, const WIDE: bool> Collect for Mini<F, WIDE> {
    fn new(_: &RamLayout) -> Self {
        Self {
            words: [AtomicU64::new(0), AtomicU64::new(0)],
            summary: AtomicU64::new(0),
            _flaw: std::marker::PhantomData,
        }
    }
    fn mark_all(&self) {
        for w in &self.words {
            // Release: as the real mark.
            w.fetch_or(!0, Ordering::Release);
        }
        if WIDE {
            // Release: summary after the page bits, as the real mark.
            self.summary.fetch_or(1, Ordering::Release);
        }
    }
    fn mark(&self, page: u64) {
        // Release: page bit, then summary bit, as the real mark.
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        if WIDE {
            // Release: as above.
            self.summary.fetch_or(1, Ordering::Release);
        }
    }
    fn claim_host_page(&self, page: u64) -> Option<u64> {
        if !WIDE {
            let bit = 1 << (page % 64);
            // Acquire: as the real claim.
            let won = self.words[(page / 64) as usize].fetch_and(!bit, Ordering::Acquire) & bit;
            return (won != 0).then_some(1);
        }
        // Acquire: the real election.
        if self.summary.fetch_and(!1, Ordering::Acquire) & 1 == 0 {
            return None;
        }
        // Acquire: as the real claim; the election makes us the only clearer.
        let n: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.swap(0, Ordering::Acquire).count_ones()))
            .sum();
        (n != 0).then_some(n)
    }
    fn get_and_clear(&self, out: &mut [u64; 2]) {
        let won = if !WIDE || F::NO_ELECTION || F::SUMMARY_LAST {
            true // BUG (NoElection, SummaryLast): collects without the election first
        } else {
            self.elect()
        };
        // BUG (RelaxedSwap): a relaxed swap does not see the contents the mark published.
        let swap = if F::RELAXED_SWAP {
            Ordering::Relaxed
        } else {
            Ordering::Acquire
        };
        for (o, w) in out.iter_mut().zip(&self.words) {
            // Relaxed pre-check and acquire swap, as the real code.
            *o = if won && w.load(Ordering::Relaxed) != 0 {
                w.swap(0, swap)
            } else {
                0
            };
        }
        if WIDE && F::SUMMARY_LAST {
            // BUG (SummaryLast): the summary bit is cleared after the words were swapped.
            self.summary.fetch_and(!1, Ordering::Acquire);
        }
    }
    fn sweep(&self, send: &mut dyn FnMut(HostPage, u64)) {
        if WIDE {
            // Relaxed: a search hint; the claim decides.
            if self.summary.load(Ordering::Relaxed) & 1 != 0 {
                if let Some(n) = self.claim_host_page(0) {
                    send(
                        HostPage {
                            block: 0,
                            first_page: 0,
                            pages: 128,
                        },
                        n,
                    );
                }
            }
            return;
        }
        for i in 0..2u64 {
            // Relaxed: a search hint; the claim decides.
            let seen = self.words[i as usize].load(Ordering::Relaxed);
            for p in pages_of(&[seen]) {
                if self.claim_host_page(i * 64 + p).is_some() {
                    send(
                        HostPage {
                            block: 0,
                            first_page: i * 64 + p,
                            pages: 1,
                        },
                        1,
                    );
                }
            }
        }
    }
}

/// One wide host page of 128 target pages.
fn wide() -> RamLayout {
    RamLayout::new(4096, [BlockSpec::new("huge", 128 * 4096, 128 * 4096)]).unwrap()
}

/// 128 target pages in 4 KiB host pages.
fn narrow() -> RamLayout {
    RamLayout::new(4096, [BlockSpec::new("ram", 128 * 4096, 4096)]).unwrap()
}

/// I1/I2 (wide): every page dirty; get_and_clear and a host-page claim race for the host page.
fn one_owner_model<C: Collect>() {
    let c = Arc::new(C::new(&wide()));
    c.mark_all();
    let t = {
        let c = c.clone();
        thread::spawn(move || {
            let mut out = [0u64; 2];
            c.get_and_clear(&mut out);
            pages_of(&out).len() as u64
        })
    };
    let claimed = c.claim_host_page(0).unwrap_or(0);
    let collected = t.join().unwrap();
    assert!(
        (collected == 0 || collected == 128) && (claimed == 0 || claimed == 128),
        "I2: host page split: get_and_clear took {collected} pages, the claim {claimed}"
    );
    assert_eq!(collected + claimed, 128, "I1: pages lost or taken twice");
}

/// I7: page 70 is written and then reported by KVM while a consumer drains the block;
/// afterwards a host-page sender sweeps what is left. Page 70 is collected exactly once, and
/// its collector sees the written contents.
fn mark_races_get_and_clear_model<C: Collect>(layout: &RamLayout) {
    let page = 70;
    let c = Arc::new(C::new(layout));
    let guest = Arc::new(GuestPages::new([PageLocation::new(0, page)]));
    let marker = {
        let (c, guest) = (c.clone(), guest.clone());
        thread::spawn(move || {
            guest.write(PageLocation::new(0, page), 1);
            c.mark(page);
        })
    };
    let mut out = [0u64; 2];
    c.get_and_clear(&mut out);
    let mut collected = pages_of(&out).len() as u64;
    for p in pages_of(&out) {
        guest.send(HostPage {
            block: 0,
            first_page: p,
            pages: 1,
        });
    }
    marker.join().unwrap();
    c.sweep(&mut |hp, dirty| {
        guest.send(hp);
        collected += dirty;
    });
    assert_eq!(
        collected, 1,
        "I7: the mark of page {page} was collected {collected} times"
    );
    guest.assert_in_sync();
}

#[test]
fn i1_i2_get_and_clear_and_a_claim_elect_one_owner() {
    loom::model(one_owner_model::<Real<false>>);
}

#[test]
fn i7_kvm_log_merge_racing_get_and_clear_is_collected_once_wide() {
    loom::model(|| mark_races_get_and_clear_model::<Real<false>>(&wide()));
}

#[test]
fn i7_kvm_log_merge_racing_get_and_clear_is_collected_once_narrow() {
    loom::model(|| mark_races_get_and_clear_model::<Real<false>>(&narrow()));
}

#[test]
fn i7_kvm_dirty_ring_racing_get_and_clear_is_collected_once() {
    loom::model(|| mark_races_get_and_clear_model::<Real<true>>(&wide()));
    loom::model(|| mark_races_get_and_clear_model::<Real<true>>(&narrow()));
}

#[test]
fn control_rewrite_passes_every_model() {
    loom::model(one_owner_model::<Mini<NoFlaw, true>>);
    loom::model(|| mark_races_get_and_clear_model::<Mini<NoFlaw, true>>(&wide()));
    loom::model(|| mark_races_get_and_clear_model::<Mini<NoFlaw, false>>(&narrow()));
}

#[test]
#[should_panic(expected = "I2: host page split")]
fn mutant_get_and_clear_without_election_is_caught() {
    loom::model(one_owner_model::<Mini<NoElection, true>>);
}

#[test]
#[should_panic(expected = "I7: the mark of page 70 was collected 0 times")]
fn mutant_summary_cleared_after_the_words_is_caught() {
    loom::model(|| mark_races_get_and_clear_model::<Mini<SummaryLast, true>>(&wide()));
}

#[test]
#[should_panic(
    expected = "I7: the mark of block 0 page 70 was lost: the guest wrote version 1, the destination has 0"
)]
fn mutant_relaxed_get_and_clear_is_caught() {
    // Only a weak-memory checker sees this one: the bit arrives, the page contents do not.
    loom::model(|| mark_races_get_and_clear_model::<Mini<RelaxedSwap, false>>(&narrow()));
}
