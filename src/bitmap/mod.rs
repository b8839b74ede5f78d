//! The atomic dirty bitmap: one bit per target page, claims without a lock.
//!
//! # Representation
//! Each RAM block's bits start at a word boundary of one `AtomicU64` array, so bit `p` of a
//! block is bit `p % 64` of the block's word `p / 64`, exactly as in a KVM dirty log for that
//! block. Bits past a block's last page are never set.
//!
//! Blocks whose host page spans more than one word (more than 64 target pages: 2 MiB and
//! 1 GiB host pages) also have a *summary* bit per host page, in a second array.
//!
//! # Protocol
//! * **mark** (page, range, log): set page bits with a release `fetch_or` (a `swap` to all
//!   ones for a whole word, the same RMW), learning from its result how many were newly set
//!   (the dirty count, `count.rs`); for wide host pages, then set the host page's summary
//!   bit with a release `fetch_or`. A mark is complete (linearised) when it returns.
//! * **claim, narrow host pages** (≤ 64 target pages): one acquire `fetch_and` that clears an
//!   aligned chunk of whole host pages inside one word. The bits it returns belong to the caller
//!   alone: RMWs on one word are totally ordered, so no two claims return the same bit, and a
//!   host page's bits are all in the chunk, so no host page is split.
//! * **claim, wide host pages**: an acquire `fetch_and` that clears the summary bit elects the
//!   one claimer of the host page; only that claimer then swaps the host page's page words to
//!   zero and owns the bits it finds. No other thread clears those page words.
//!
//! # Invariants
//! * **I1/I2**: every set bit is returned by at most one claim, and a claim returns whole host
//!   pages (wide: the summary winner is the only clearer of the page words).
//! * **I7**: a page marked after the claim that took it is set again and claimable again. For
//!   wide host pages this needs the order "page bit, then summary bit" in the marker, and the
//!   release/acquire pair on the summary word: a claimer that sees the summary bit sees the
//!   page bits set before it, and a page bit set after the claimer's swap is followed by a
//!   summary bit set after the claimer cleared it.
//! * Marking is a release and claiming an acquire: guest memory written before a page is
//!   marked is visible to the thread whose claim collects that mark.
//!
//! # Files
//! `bitmap/mod.rs` holds the type, marking and claims; `merge.rs` the KVM dirty-log merges
//! and the recovery rebuild; `get_and_clear.rs` the precopy drain (with the wide-page
//! election); `scan.rs` the searches and the background scan step; `claim.rs` the claim
//! types; `error.rs` the errors.

use std::fmt;
use std::io;

use crate::layout::{LocationError, PageLocation, RamLayout};
use crate::storage::Words;
use crate::sync::{AtomicBool, AtomicU64, Ordering};

mod claim;
mod count;
mod error;
mod get_and_clear;
mod merge;
mod scan;
#[cfg(test)]
mod tests;

pub use claim::{Claim, HostPageClaim, PageClaim};
pub use count::DirtyRate;
pub use error::{DirtyLogError, LayoutMismatch};
pub(crate) use scan::Found;

const WORD_BITS: u64 = 64;
/// log2 of the target pages in one word.
const WORD_SHIFT: u32 = 6;

/// A mask of the low `bits` bits (all 64 for `bits` ≥ 64).
#[inline]
pub(crate) fn low_mask(bits: u64) -> u64 {
    if bits >= WORD_BITS {
        !0
    } else {
        (1u64 << bits) - 1
    }
}

/// Where one block lives in the word arrays.
#[derive(Clone, Copy, Debug)]
struct BlockWords {
    word_base: usize,
    words: usize,
    pages: u64,
    host_shift: u32,
    /// First summary word, for wide host pages (`host_shift > WORD_SHIFT`).
    summary_base: usize,
    summary_words: usize,
}

impl BlockWords {
    fn wide(&self) -> bool {
        self.host_shift > WORD_SHIFT
    }
    /// Words per wide host page.
    fn words_per_host(&self) -> usize {
        1 << (self.host_shift - WORD_SHIFT)
    }
}

/// An atomic dirty bitmap over a [`RamLayout`]: one bit per target page.
///
/// Ordering contract: marking is a *release*, claiming an *acquire*: a thread that writes a
/// page and then marks it dirty makes the write visible to whichever thread's claim collects
/// that mark. Lookups (`is_dirty`, `find_next_*`, counts) are relaxed snapshots.
///
/// ```
/// use pagehint::{DirtyBitmap, PageLocation, RamLayout};
/// let layout = RamLayout::single("pc.ram", 1 << 30, 2 << 20)?; // 2 MiB host pages
/// let bitmap = DirtyBitmap::new(&layout)?;
/// bitmap.mark_range(0, 1000, 20)?;
/// let claim = bitmap.claim_host_page(PageLocation::new(0, 1019))?.into_claim().expect("dirty");
/// assert_eq!(claim.dirty_pages(), 20);
/// assert_eq!(claim.host_pages().next().unwrap().first_page, 512);
/// assert!(bitmap.claim_host_page(PageLocation::new(0, 1000))?.into_claim().is_none()); // exactly once
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DirtyBitmap {
    blocks: Vec<BlockWords>,
    words: Words,
    summary: Words,
    /// Set while a [`PageScheduler`](crate::PageScheduler) drives this bitmap (one at a time).
    driven: AtomicBool,
    /// Pages newly set and pages cleared, ever, per thread (see `count.rs`).
    counts: count::DirtyCounts,
    /// Pages of all blocks: the bound of `dirty_count`.
    total_pages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for `layout`. Large bitmaps are lazily zeroed anonymous memory.
    pub fn new(layout: &RamLayout) -> io::Result<Self> {
        let mut blocks = Vec::with_capacity(layout.blocks().len());
        let (mut words, mut summary) = (0usize, 0usize);
        let too_big = || io::Error::new(io::ErrorKind::OutOfMemory, "dirty bitmap too large");
        for b in layout.blocks() {
            let block_words =
                usize::try_from(b.pages().div_ceil(WORD_BITS)).map_err(|_| too_big())?;
            let summary_words = if b.host_page_shift() > WORD_SHIFT {
                usize::try_from(b.host_pages().div_ceil(WORD_BITS)).map_err(|_| too_big())?
            } else {
                0
            };
            blocks.push(BlockWords {
                word_base: words,
                words: block_words,
                pages: b.pages(),
                host_shift: b.host_page_shift(),
                summary_base: summary,
                summary_words,
            });
            words = words.checked_add(block_words).ok_or_else(too_big)?;
            summary = summary.checked_add(summary_words).ok_or_else(too_big)?;
        }
        Ok(Self {
            blocks,
            words: Words::zeroed(words)?,
            summary: Words::zeroed(summary)?,
            driven: AtomicBool::new(false),
            counts: count::DirtyCounts::new(),
            total_pages: layout.total_pages(),
        })
    }

    fn block(&self, block: u32) -> Result<&BlockWords, LocationError> {
        self.blocks
            .get(block as usize)
            .ok_or(LocationError::NoSuchBlock {
                block,
                blocks: self.blocks.len(),
            })
    }

    fn located(&self, loc: PageLocation) -> Result<&BlockWords, LocationError> {
        let b = self.block(loc.block)?;
        LocationError::check_page(loc, b.pages)?;
        Ok(b)
    }

    fn ranged(&self, block: u32, first: u64, count: u64) -> Result<&BlockWords, LocationError> {
        let b = self.block(block)?;
        LocationError::check_range(block, first, count, b.pages)?;
        Ok(b)
    }

    #[inline]
    fn word(&self, b: &BlockWords, page: u64) -> &AtomicU64 {
        &self.words.get()[b.word_base + (page >> WORD_SHIFT) as usize]
    }

    /// Sets summary bits for host pages `first_hp..=last_hp` of a wide block.
    fn mark_summary(&self, b: &BlockWords, first_hp: u64, last_hp: u64) {
        let summary = &self.summary.get()[b.summary_base..b.summary_base + b.summary_words];
        for_each_word_span(first_hp, last_hp + 1, |w, mask| {
            // Release: publishes the page bits (and page contents) set before it to the
            // acquiring claimer that clears this summary bit.
            summary[w].fetch_or(mask, Ordering::Release);
        });
    }

    /// Marks target page `loc` dirty.
    pub fn mark_dirty(&self, loc: PageLocation) -> Result<(), LocationError> {
        let b = self.located(loc)?;
        let bit = 1 << (loc.page % WORD_BITS);
        // Release: page contents written before the mark are visible to the claimer.
        let prev = self.word(b, loc.page).fetch_or(bit, Ordering::Release);
        self.count_dirtied(u64::from(prev & bit == 0));
        if b.wide() {
            let hp = loc.page >> b.host_shift;
            self.mark_summary(b, hp, hp);
        }
        Ok(())
    }

    /// Marks `count` target pages from `first` in `block` dirty: one masked atomic per word.
    ///
    /// ```
    /// # let layout = pagehint::RamLayout::single("m", 4 << 20, 4096)?;
    /// let bitmap = pagehint::DirtyBitmap::new(&layout)?;
    /// bitmap.mark_range(0, 60, 256)?;
    /// assert_eq!(bitmap.dirty_pages(), 256);
    /// assert!(bitmap.mark_range(0, 200, 1 << 20).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn mark_range(&self, block: u32, first: u64, count: u64) -> Result<(), LocationError> {
        let b = self.ranged(block, first, count)?;
        if count == 1 {
            // One page (a small device write): `mark_dirty`'s one-bit RMW (`lock bts` on x86,
            // where a masked `fetch_or` whose result is used is a `cmpxchg` loop).
            return self.mark_dirty(PageLocation::new(block, first));
        }
        let words = &self.words.get()[b.word_base..b.word_base + b.words];
        let mut newly = 0;
        for_each_word_span(first, first + count, |w, mask| {
            // A release RMW: page contents written before the mark are visible to the claimer.
            newly += count::or_newly(&words[w], mask);
        });
        self.count_dirtied(newly);
        if b.wide() {
            self.mark_summary(
                b,
                first >> b.host_shift,
                (first + count - 1) >> b.host_shift,
            );
        }
        Ok(())
    }

    /// Marks every page of every block dirty (the start of a migration).
    pub fn mark_all(&self) {
        for (i, b) in self.blocks.iter().enumerate() {
            // Cannot fail: the whole block is a valid range.
            let _ = self.mark_range(i as u32, 0, b.pages);
        }
    }

    /// Target pages and log2 of target pages per host page of `block`.
    pub(crate) fn block_shape(&self, block: u32) -> Option<(u64, u32)> {
        self.blocks
            .get(block as usize)
            .map(|b| (b.pages, b.host_shift))
    }

    /// Words of `block`'s bitmap: the length of its dirty log, and the bound of
    /// [`get_and_clear`](Self::get_and_clear).
    pub fn block_words(&self, block: u32) -> Result<usize, LocationError> {
        Ok(self.block(block)?.words)
    }

    /// Checks that this bitmap was built for `layout`: the same blocks, pages and host page
    /// sizes.
    ///
    /// ```
    /// use pagehint::{bitmap::LayoutMismatch, DirtyBitmap, RamLayout};
    /// let bitmap = DirtyBitmap::new(&"a:1M,b:2M".parse()?)?;
    /// assert!(bitmap.check_layout(&"x:1M,y:2M".parse()?).is_ok()); // names are not kept
    /// assert_eq!(
    ///     bitmap.check_layout(&"a:1M,b:4M".parse()?),
    ///     Err(LayoutMismatch::BlockShape { block: 1 })
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check_layout(&self, layout: &RamLayout) -> Result<(), LayoutMismatch> {
        if self.blocks.len() != layout.blocks().len() {
            return Err(LayoutMismatch::BlockCount {
                bitmap: self.blocks.len(),
                layout: layout.blocks().len(),
            });
        }
        for (i, (b, l)) in self.blocks.iter().zip(layout.blocks()).enumerate() {
            if b.pages != l.pages() || b.host_shift != l.host_page_shift() {
                return Err(LayoutMismatch::BlockShape { block: i as u32 });
            }
        }
        Ok(())
    }

    /// Records that a scheduler drives this bitmap; `false` if another one already does.
    pub(crate) fn attach(&self) -> bool {
        // AcqRel on success: a scheduler attached after another one detached sees all that
        // the old one did before detaching. Relaxed on failure: nothing is learnt but "taken".
        self.driven
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Whether a scheduler drives this bitmap now.
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))] // used by RegionBitmap::reset
    pub(crate) fn is_driven(&self) -> bool {
        // Acquire: pairs with `attach`'s AcqRel; a caller that sees `false` and then clears
        // pages could still race with a later attach, which is the caller's documented
        // contract (clear only what no scheduler is about to send).
        self.driven.load(Ordering::Acquire)
    }

    /// Records that the scheduler driving this bitmap is gone.
    pub(crate) fn detach(&self) {
        // Release: pairs with the next `attach`.
        self.driven.store(false, Ordering::Release);
    }

    /// Whether target page `loc` is dirty (a snapshot; it may change right after).
    pub fn is_dirty(&self, loc: PageLocation) -> Result<bool, LocationError> {
        let b = self.located(loc)?;
        // Acquire, as vm-memory's `AtomicBitmap::dirty_at`: pairs with the marker's release,
        // so a caller that sees the bit also sees the write published before the mark.
        Ok(self.word(b, loc.page).load(Ordering::Acquire) & (1 << (loc.page % WORD_BITS)) != 0)
    }

    /// Claims one target page: clears its bit and says whether it was dirty. Exactly one
    /// of several concurrent claimers of a dirty page gets [`PageClaim::Claimed`].
    ///
    /// This is target-page granular: on a block with larger host pages, senders that must
    /// keep host pages whole use [`claim_host_page`](Self::claim_host_page) instead.
    #[must_use = "a claimed page has left the dirty bitmap: send it (or mark it dirty again), or it is lost"]
    pub fn claim_page(&self, loc: PageLocation) -> Result<PageClaim, LocationError> {
        let b = self.located(loc)?;
        let bit = 1 << (loc.page % WORD_BITS);
        // Acquire: sees the page contents published by the mark it collects; the RMW's
        // atomicity gives the bit to one claimer only.
        let was = self.word(b, loc.page).fetch_and(!bit, Ordering::Acquire) & bit != 0;
        self.count_cleared(u64::from(was));
        Ok(if was {
            PageClaim::Claimed
        } else {
            PageClaim::NotDirty
        })
    }

    /// Claims the whole host page containing `loc`: [`HostPageClaim::NotDirty`] if none of
    /// its target pages was dirty (already claimed by someone else, or clean).
    #[must_use = "a won claim owns pages that have left the dirty bitmap: send them, or they are lost"]
    pub fn claim_host_page(&self, loc: PageLocation) -> Result<HostPageClaim, LocationError> {
        let b = *self.located(loc)?;
        let claim = self.claim_chunk(&b, loc.block, loc.page, b.host_shift);
        self.count_cleared(claim.map_or(0, |c| c.dirty_pages));
        Ok(claim.into())
    }

    /// Claims the aligned chunk of `1 << chunk_shift` target pages (at least one host page)
    /// that contains `page`. `loc` must be valid. The caller counts the pages cleared
    /// (`count_cleared`): at once, or in batches (the background scanner).
    fn claim_chunk(
        &self,
        b: &BlockWords,
        block: u32,
        page: u64,
        chunk_shift: u32,
    ) -> Option<Claim> {
        if b.wide() {
            return self.claim_wide(b, block, page);
        }
        let shift = chunk_shift;
        let first = page & !low_mask(u64::from(shift));
        let off = first % WORD_BITS;
        let mask = low_mask(1 << shift) << off;
        // Acquire: sees the page contents published by the marks it collects; the RMW's
        // atomicity gives each bit to one claimer only.
        let got = (self.word(b, first).fetch_and(!mask, Ordering::Acquire) & mask) >> off;
        if got == 0 {
            return None;
        }
        Some(Claim {
            block,
            first_page: first,
            host_shift: b.host_shift,
            host_mask: host_mask(got, b.host_shift),
            dirty_pages: u64::from(got.count_ones()),
        })
    }

    fn claim_wide(&self, b: &BlockWords, block: u32, page: u64) -> Option<Claim> {
        let hp = page >> b.host_shift;
        let bit = 1u64 << (hp % WORD_BITS);
        let sword = &self.summary.get()[b.summary_base + (hp >> WORD_SHIFT) as usize];
        // Acquire pairs with the markers' release: the page bits set before the summary bits
        // we clear are visible to the swaps below. The RMW elects one claimer per summary bit.
        if sword.fetch_and(!bit, Ordering::Acquire) & bit == 0 {
            return None;
        }
        let per = b.words_per_host();
        let base = b.word_base + hp as usize * per;
        let dirty: u64 = self.words.get()[base..base + per]
            .iter()
            // Acquire: sees page contents published by the marks collected; we are the only
            // clearer of these words while we hold the summary bit's election.
            .map(|w| u64::from(w.swap(0, Ordering::Acquire).count_ones()))
            .sum();
        (dirty != 0).then_some(Claim {
            block,
            first_page: hp << b.host_shift,
            host_shift: b.host_shift,
            host_mask: 1,
            dirty_pages: dirty,
        })
    }

    /// One step of a range claim (the urgent path serving a request for several host pages):
    /// claims the dirty host pages among those from `from` (the first page of a host page)
    /// to `end` (the end of a host page, or of the block) that share `from`'s bitmap word
    /// (narrow host pages: one masked acquire `fetch_and`) or `from`'s host page (wide: its
    /// summary election, as [`claim_host_page`](Self::claim_host_page)). Returns the claim,
    /// if any host page was dirty, and where the step ended; every host page of
    /// `from..step end` not in the claim was clean or already claimed by someone else.
    /// `block` must exist and `from < end <= pages` be host-page aligned.
    pub(crate) fn claim_span(&self, block: u32, from: u64, end: u64) -> (Option<Claim>, u64) {
        let b = self.blocks[block as usize];
        if b.wide() {
            let step_end = from + (1 << b.host_shift);
            let claim = self.claim_wide(&b, block, from);
            self.count_cleared(claim.map_or(0, |c| c.dirty_pages));
            return (claim, step_end);
        }
        let off = from % WORD_BITS;
        let step_end = end.min(from - off + WORD_BITS);
        let mask = low_mask(step_end - from) << off;
        // Acquire: sees the page contents published by the marks it collects; the RMW's
        // atomicity gives each bit to one claimer only (I1), and the mask holds whole host
        // pages (I2).
        let got = (self.word(&b, from).fetch_and(!mask, Ordering::Acquire) & mask) >> off;
        let claim = (got != 0).then(|| Claim {
            block,
            first_page: from,
            host_shift: b.host_shift,
            host_mask: host_mask(got, b.host_shift),
            dirty_pages: u64::from(got.count_ones()),
        });
        self.count_cleared(u64::from(got.count_ones()));
        (claim, step_end)
    }

    /// Number of dirty target pages, counted from the bits (O(words); exact when no thread
    /// is marking or claiming). [`dirty_count`](Self::dirty_count) is the O(1) count.
    pub fn dirty_pages(&self) -> u64 {
        // Relaxed: a count, exact only when quiescent, as documented.
        self.words
            .get()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Number of dirty target pages in `block` (exact when quiescent).
    pub fn block_dirty_pages(&self, block: u32) -> Result<u64, LocationError> {
        let b = self.block(block)?;
        Ok(self.words.get()[b.word_base..b.word_base + b.words]
            .iter()
            // Relaxed: a count, exact only when quiescent, as documented.
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum())
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("blocks", &self.blocks.len())
            .field("dirty_pages", &self.dirty_pages())
            .finish()
    }
}

/// Host-page mask of the target-page bits `got` (chunk-relative) for host pages of
/// `1 << host_shift` target pages, narrow (≤ 64).
#[inline]
fn host_mask(got: u64, host_shift: u32) -> u64 {
    if host_shift == 0 {
        return got;
    }
    let per = 1u64 << host_shift;
    let hmask = low_mask(per);
    let mut out = 0;
    let mut i = 0;
    while i * per < WORD_BITS {
        if (got >> (i * per)) & hmask != 0 {
            out |= 1 << i;
        }
        i += 1;
    }
    out
}

/// Calls `f(word_index, mask)` for each word touched by bits `start..end`.
#[inline]
fn for_each_word_span(start: u64, end: u64, mut f: impl FnMut(usize, u64)) {
    let mut bit = start;
    while bit < end {
        let off = bit % WORD_BITS;
        let n = (WORD_BITS - off).min(end - bit);
        f((bit >> WORD_SHIFT) as usize, low_mask(n) << off);
        bit += n;
    }
}
