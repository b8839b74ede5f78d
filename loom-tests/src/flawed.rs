//! Mutant dirty bitmaps: the real algorithm of `pagehint::bitmap`, rewritten small on the same
//! shim atomics, with one deliberate flaw chosen by a type parameter.
//!
//! [`FlawedBitmap<NoFlaw>`] is the unbroken rewrite; the models pass on it, so each mutant's
//! failure comes from its one flaw, not from the rewrite.

use std::marker::PhantomData;

use pagehint::{HostPage, PageLocation, RamLayout};

use crate::bitmap::{ModelBitmap, Taken};
use crate::sync::{AtomicU64, Ordering};

/// Which line of the algorithm is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapFlaw {
    /// None: the unbroken algorithm.
    None,
    /// Claims load the word and then store it with the bits cleared (test-and-clear not
    /// atomic).
    LoadThenStoreClaim,
    /// A narrow host page is claimed one target page at a time (one `fetch_and` per page), so
    /// two claimers can split it.
    SplitHostPageClaim,
    /// A wide host page's page words are swapped without winning the summary election.
    NoSummaryElection,
    /// The marker sets a wide host page's summary bit *before* the page bit.
    SummaryBeforePageBit,
    /// Marks and claims are relaxed: a claimer may collect a mark without seeing the page
    /// contents written before it (only a weak-memory checker, loom, can see this).
    RelaxedOrderings,
    /// `get_and_clear` swaps a wide host page's words first and clears its summary bit after:
    /// a mark landing in between keeps its page bit but loses its summary bit, so host-page
    /// scans never find it.
    SummaryClearedLast,
}

/// Chooses a [`BitmapFlaw`] at the type level.
pub trait Flaw: Send + Sync + 'static {
    /// The flaw.
    const FLAW: BitmapFlaw;
}

macro_rules! flaws {
    ($($(#[$doc:meta])* $name:ident => $flaw:ident;)*) => {$(
        $(#[$doc])*
        pub struct $name;
        impl Flaw for $name {
            const FLAW: BitmapFlaw = BitmapFlaw::$flaw;
        }
    )*};
}

flaws! {
    /// The unbroken algorithm (control).
    NoFlaw => None;
    /// MUTANT: see [`BitmapFlaw::LoadThenStoreClaim`].
    LoadThenStoreClaim => LoadThenStoreClaim;
    /// MUTANT: see [`BitmapFlaw::SplitHostPageClaim`].
    SplitHostPageClaim => SplitHostPageClaim;
    /// MUTANT: see [`BitmapFlaw::NoSummaryElection`].
    NoSummaryElection => NoSummaryElection;
    /// MUTANT: see [`BitmapFlaw::SummaryBeforePageBit`].
    SummaryBeforePageBit => SummaryBeforePageBit;
    /// MUTANT: see [`BitmapFlaw::RelaxedOrderings`].
    RelaxedOrderings => RelaxedOrderings;
    /// MUTANT: see [`BitmapFlaw::SummaryClearedLast`].
    SummaryClearedLast => SummaryClearedLast;
}

/// The ordering of a mark: release, unless the flaw is [`BitmapFlaw::RelaxedOrderings`].
fn mark_order<F: Flaw>() -> Ordering {
    match F::FLAW {
        BitmapFlaw::RelaxedOrderings => Ordering::Relaxed, // BUG (RelaxedOrderings)
        _ => Ordering::Release,
    }
}

/// The ordering of a claim: acquire, unless the flaw is [`BitmapFlaw::RelaxedOrderings`].
fn claim_order<F: Flaw>() -> Ordering {
    match F::FLAW {
        BitmapFlaw::RelaxedOrderings => Ordering::Relaxed, // BUG (RelaxedOrderings)
        _ => Ordering::Acquire,
    }
}

#[derive(Clone, Copy, Debug)]
struct Geom {
    word_base: usize,
    pages: u64,
    host_shift: u32,
    summary_base: usize,
}

impl Geom {
    fn wide(&self) -> bool {
        self.host_shift > 6
    }
    fn host_pages(&self) -> u64 {
        1 << self.host_shift
    }
}

fn low_mask(bits: u64) -> u64 {
    if bits >= 64 {
        !0
    } else {
        (1 << bits) - 1
    }
}

/// A small dirty bitmap with the flaw `F`.
pub struct FlawedBitmap<F: Flaw> {
    blocks: Vec<Geom>,
    words: Vec<AtomicU64>,
    summary: Vec<AtomicU64>,
    _flaw: PhantomData<F>,
}

impl<F: Flaw> FlawedBitmap<F> {
    fn word(&self, g: &Geom, page: u64) -> &AtomicU64 {
        &self.words[g.word_base + (page / 64) as usize]
    }

    fn summary_of(&self, g: &Geom, hp: u64) -> (&AtomicU64, u64) {
        (
            &self.summary[g.summary_base + (hp / 64) as usize],
            1 << (hp % 64),
        )
    }

    /// Sets page bits `bits` of word `w` of block `g`, and the summary bits of the host pages
    /// they are in, in the order the flaw dictates.
    fn mark_word(&self, g: &Geom, w: u64, bits: u64) {
        let summary_first = F::FLAW == BitmapFlaw::SummaryBeforePageBit;
        let set_summary = || {
            if g.wide() {
                let hp = (w * 64) >> g.host_shift;
                let (s, bit) = self.summary_of(g, hp);
                // Release: publishes the page bits (and contents) set before it.
                s.fetch_or(bit, mark_order::<F>());
            }
        };
        if summary_first {
            set_summary(); // BUG (SummaryBeforePageBit): summary before the page bit
        }
        // Release: page contents written before the mark are visible to the claimer.
        self.words[g.word_base + w as usize].fetch_or(bits, mark_order::<F>());
        if !summary_first {
            set_summary();
        }
    }
}

impl<F: Flaw> ModelBitmap for FlawedBitmap<F> {
    fn new(layout: &RamLayout) -> Self {
        let (mut words, mut summary) = (0, 0);
        let blocks = layout
            .blocks()
            .iter()
            .map(|b| {
                let g = Geom {
                    word_base: words,
                    pages: b.pages(),
                    host_shift: b.host_page_shift(),
                    summary_base: summary,
                };
                words += b.pages().div_ceil(64) as usize;
                if g.wide() {
                    summary += b.host_pages().div_ceil(64) as usize;
                }
                g
            })
            .collect();
        Self {
            blocks,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..summary).map(|_| AtomicU64::new(0)).collect(),
            _flaw: PhantomData,
        }
    }

    fn mark_dirty(&self, loc: PageLocation) {
        let g = self.blocks[loc.block as usize];
        self.mark_word(&g, loc.page / 64, 1 << (loc.page % 64));
    }

    fn mark_range(&self, block: u32, first: u64, count: u64) {
        let g = self.blocks[block as usize];
        let mut p = first;
        while p < first + count {
            let n = (64 - p % 64).min(first + count - p);
            self.mark_word(&g, p / 64, low_mask(n) << (p % 64));
            p += n;
        }
    }

    fn merge_dirty_log(&self, block: u32, log: &[u64]) {
        let g = self.blocks[block as usize];
        for (w, &bits) in log.iter().enumerate().filter(|(_, b)| **b != 0) {
            self.mark_word(&g, w as u64, bits);
        }
    }

    fn merge_dirty_log_at(&self, block: u32, first: u64, pages: u64, log: &[u64]) {
        let g = self.blocks[block as usize];
        // Gather the log's bits per bitmap word, then mark word by word.
        let mut words = std::collections::BTreeMap::<u64, u64>::new();
        for i in (0..pages).filter(|i| log[(i / 64) as usize] & (1 << (i % 64)) != 0) {
            *words.entry((first + i) / 64).or_default() |= 1 << ((first + i) % 64);
        }
        for (w, bits) in words {
            self.mark_word(&g, w, bits);
        }
    }

    fn claim_page(&self, loc: PageLocation) -> bool {
        let g = self.blocks[loc.block as usize];
        let bit = 1 << (loc.page % 64);
        let word = self.word(&g, loc.page);
        if F::FLAW == BitmapFlaw::LoadThenStoreClaim {
            // Acquire: as strong as the real claim; the flaw is the lost atomicity.
            let w = word.load(claim_order::<F>());
            if w & bit == 0 {
                return false;
            }
            word.store(w & !bit, Ordering::Relaxed); // BUG: load, then store
            return true;
        }
        // Acquire: sees the contents published by the mark; the RMW elects one claimer.
        word.fetch_and(!bit, claim_order::<F>()) & bit != 0
    }

    fn claim_host_page(&self, loc: PageLocation) -> Option<Taken> {
        let g = self.blocks[loc.block as usize];
        let first = loc.page & !(g.host_pages() - 1);
        let host_page = HostPage {
            block: loc.block,
            first_page: first,
            pages: g.host_pages(),
        };
        let dirty = if g.wide() {
            let (s, bit) = self.summary_of(&g, first >> g.host_shift);
            // Acquire pairs with the markers' release on the summary word.
            let elected = s.fetch_and(!bit, claim_order::<F>()) & bit != 0;
            if !elected && F::FLAW != BitmapFlaw::NoSummaryElection {
                return None;
            } // BUG (NoSummaryElection): the loser swaps the page words too
            let per = (g.host_pages() / 64) as usize;
            let base = g.word_base + (first / 64) as usize;
            self.words[base..base + per]
                .iter()
                // Acquire: sees contents published by the marks collected.
                .map(|w| u64::from(w.swap(0, claim_order::<F>()).count_ones()))
                .sum()
        } else {
            let word = self.word(&g, first);
            let mask = low_mask(g.host_pages()) << (first % 64);
            let got = match F::FLAW {
                BitmapFlaw::LoadThenStoreClaim => {
                    // Acquire: as strong as the real claim; the flaw is the lost atomicity.
                    let w = word.load(claim_order::<F>());
                    if w & mask != 0 {
                        word.store(w & !mask, Ordering::Relaxed); // BUG: load, then store
                    }
                    w & mask
                }
                BitmapFlaw::SplitHostPageClaim => (0..g.host_pages())
                    .map(|i| 1 << ((first + i) % 64))
                    // Acquire: as the real claim. BUG: one RMW per target page, not per host page
                    .map(|bit| word.fetch_and(!bit, claim_order::<F>()) & bit)
                    .fold(0, |a, b| a | b),
                // Acquire: sees the contents published by the marks; one RMW per host page.
                _ => word.fetch_and(!mask, claim_order::<F>()) & mask,
            };
            u64::from(got.count_ones())
        };
        (dirty != 0).then_some(Taken { host_page, dirty })
    }

    fn get_and_clear(&self, block: u32, from_word: usize, out: &mut [u64]) {
        let g = self.blocks[block as usize];
        let take = |w: usize| {
            let word = &self.words[g.word_base + w];
            // Relaxed pre-check, then the acquire swap that gives each bit to one collector.
            if word.load(Ordering::Relaxed) == 0 {
                0
            } else {
                word.swap(0, claim_order::<F>())
            }
        };
        let end = from_word + out.len();
        let per = if g.wide() {
            (g.host_pages() / 64) as usize
        } else {
            1
        };
        let mut w = from_word;
        while w < end {
            let hp_first = w / per * per;
            let whole = g.wide() && hp_first >= from_word && hp_first + per <= end;
            if !whole {
                // A narrow word, or part of a wide host page cut by the range: word by word.
                out[w - from_word] = take(w);
                w += 1;
                continue;
            }
            let (s, bit) = self.summary_of(&g, (hp_first / per) as u64);
            let won = match F::FLAW {
                // BUG (NoSummaryElection, SummaryClearedLast): collect without the election
                // first.
                BitmapFlaw::NoSummaryElection | BitmapFlaw::SummaryClearedLast => true,
                // Relaxed pre-check, then the acquire RMW that elects one collector.
                _ => {
                    s.load(Ordering::Relaxed) & bit != 0
                        && s.fetch_and(!bit, claim_order::<F>()) & bit != 0
                }
            };
            for i in hp_first..hp_first + per {
                out[i - from_word] = if won { take(i) } else { 0 };
            }
            if F::FLAW == BitmapFlaw::SummaryClearedLast {
                // BUG (SummaryClearedLast): the summary bit is cleared after the words.
                s.fetch_and(!bit, claim_order::<F>());
            }
            w = hp_first + per;
        }
    }

    fn find_next_dirty_host_page(&self, block: u32, from: u64) -> Option<u64> {
        let g = self.blocks[block as usize];
        if from >= g.pages {
            return None;
        }
        let start = from & !(g.host_pages() - 1);
        // Word at a time, as the real bitmap: summary words for wide host pages, page words
        // otherwise.
        let (words, first_bit, end_bit, shift) = if g.wide() {
            let n = (g.pages >> g.host_shift).div_ceil(64) as usize;
            let words = &self.summary[g.summary_base..g.summary_base + n];
            (
                words,
                start >> g.host_shift,
                g.pages >> g.host_shift,
                g.host_shift,
            )
        } else {
            let words = &self.words[g.word_base..g.word_base + g.pages.div_ceil(64) as usize];
            (words, start, g.pages, 0)
        };
        let mut bit = first_bit;
        while bit < end_bit {
            // Relaxed: a search hint; the claim decides.
            let w = words[(bit / 64) as usize].load(Ordering::Relaxed) & !low_mask(bit % 64);
            if w != 0 {
                let found = (bit & !63) + u64::from(w.trailing_zeros());
                return Some((found << shift) & !(g.host_pages() - 1));
            }
            bit = (bit & !63) + 64;
        }
        None
    }

    fn dirty_pages(&self) -> u64 {
        self.words
            .iter()
            // Relaxed: a count, exact when quiescent.
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}
