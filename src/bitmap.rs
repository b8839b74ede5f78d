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
//! * **mark** (page, range, log): set page bits with `fetch_or`; for wide host pages, then set
//!   the host page's summary bit with a release `fetch_or`. A mark is complete (linearised)
//!   when it returns.
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

use std::fmt;
use std::io;

use crate::layout::{HostPage, LocationError, PageLocation, RamLayout};
use crate::storage::Words;
use crate::sync::{AtomicU64, Ordering};

const WORD_BITS: u64 = 64;
/// log2 of the target pages in one word.
const WORD_SHIFT: u32 = 6;

/// A mask of the low `bits` bits (`bits` ≤ 64).
#[inline]
fn low_mask(bits: u64) -> u64 {
    if bits >= WORD_BITS {
        !0
    } else {
        (1u64 << bits) - 1
    }
}

/// Why a dirty log could not be merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogError {
    /// The block does not exist.
    Location(LocationError),
    /// The log does not have one bit per page of the block, in whole words.
    WrongLength {
        /// The block.
        block: u32,
        /// Words the block's log must have.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// The log's last word has bits set past the block's last page.
    BitsPastEnd {
        /// The block.
        block: u32,
    },
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Location(e) => e.fmt(f),
            Self::WrongLength {
                block,
                expected,
                got,
            } => {
                write!(
                    f,
                    "dirty log for block {block} has {got} words, expected {expected}"
                )
            }
            Self::BitsPastEnd { block } => {
                write!(
                    f,
                    "dirty log for block {block} marks pages past the block's end"
                )
            }
        }
    }
}

impl std::error::Error for DirtyLogError {}

impl From<LocationError> for DirtyLogError {
    fn from(e: LocationError) -> Self {
        Self::Location(e)
    }
}

/// Dirty host pages that one claim made the caller the only sender of.
///
/// A claim covers an aligned run of whole host pages of one block, at most 64 of them; the
/// caller must send every host page [`host_pages`](Claim::host_pages) yields, whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    block: u32,
    first_page: u64,
    host_shift: u32,
    host_mask: u64,
    dirty_pages: u64,
}

impl Claim {
    /// The block the claimed host pages are in.
    pub fn block(&self) -> u32 {
        self.block
    }
    /// Number of host pages claimed.
    pub fn host_page_count(&self) -> u32 {
        self.host_mask.count_ones()
    }
    /// Number of dirty target pages the claim cleared (the rest of each host page was clean
    /// but is sent with it).
    pub fn dirty_pages(&self) -> u64 {
        self.dirty_pages
    }
    /// Target pages that sending the claimed host pages whole transfers.
    pub fn pages_to_send(&self) -> u64 {
        u64::from(self.host_page_count()) << self.host_shift
    }
    /// The claimed host pages, in address order.
    pub fn host_pages(&self) -> impl Iterator<Item = HostPage> + '_ {
        let mut mask = self.host_mask;
        std::iter::from_fn(move || {
            if mask == 0 {
                return None;
            }
            let i = u64::from(mask.trailing_zeros());
            mask &= mask - 1;
            Some(HostPage {
                block: self.block,
                first_page: self.first_page + (i << self.host_shift),
                pages: 1 << self.host_shift,
            })
        })
    }
    /// The target page right after the last claimed host page (where a hint points).
    pub fn end(&self) -> PageLocation {
        let last = u64::from(63 - self.host_mask.leading_zeros());
        PageLocation::new(
            self.block,
            self.first_page + ((last + 1) << self.host_shift),
        )
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
/// let claim = bitmap.claim_host_page(PageLocation::new(0, 1019))?.expect("dirty");
/// assert_eq!(claim.dirty_pages(), 20);
/// assert_eq!(claim.host_pages().next().unwrap().first_page, 512);
/// assert!(bitmap.claim_host_page(PageLocation::new(0, 1000))?.is_none()); // exactly once
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DirtyBitmap {
    blocks: Vec<BlockWords>,
    words: Words,
    summary: Words,
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
        if loc.page >= b.pages {
            return Err(LocationError::PageOutOfRange {
                block: loc.block,
                page: loc.page,
                pages: b.pages,
            });
        }
        Ok(b)
    }

    fn ranged(&self, block: u32, first: u64, count: u64) -> Result<&BlockWords, LocationError> {
        let b = self.block(block)?;
        match first.checked_add(count) {
            Some(end) if count > 0 && end <= b.pages => Ok(b),
            _ => Err(LocationError::RangeOutOfBounds {
                block,
                first,
                count,
            }),
        }
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
        // Release: page contents written before the mark are visible to the claimer.
        self.word(b, loc.page)
            .fetch_or(1 << (loc.page % WORD_BITS), Ordering::Release);
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
        let words = &self.words.get()[b.word_base..b.word_base + b.words];
        for_each_word_span(first, first + count, |w, mask| {
            // Release: page contents written before the mark are visible to the claimer.
            words[w].fetch_or(mask, Ordering::Release);
        });
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

    /// ORs a KVM-style dirty log for `block` into the bitmap (bit `p` of word `p / 64` is page
    /// `p`), skipping zero words. Returns the number of pages the log marks dirty.
    ///
    /// The log must have exactly one bit per page of the block, rounded up to whole words, and
    /// no bits past the block's end; a malformed log is refused whole, before anything is
    /// merged.
    ///
    /// ```
    /// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?; // 256 pages
    /// let bitmap = pagehint::DirtyBitmap::new(&layout)?;
    /// assert_eq!(bitmap.merge_dirty_log(0, &[0b1011, 0, 0, 1 << 63])?, 4);
    /// assert!(bitmap.merge_dirty_log(0, &[0; 3]).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn merge_dirty_log(&self, block: u32, log: &[u64]) -> Result<u64, DirtyLogError> {
        let b = *self.block(block)?;
        if log.len() != b.words {
            return Err(DirtyLogError::WrongLength {
                block,
                expected: b.words,
                got: log.len(),
            });
        }
        let tail = b.pages % WORD_BITS;
        if tail != 0 && log.last().is_some_and(|w| w & !low_mask(tail) != 0) {
            return Err(DirtyLogError::BitsPastEnd { block });
        }
        let words = &self.words.get()[b.word_base..b.word_base + b.words];
        let mut marked = 0;
        // Wide blocks: summary bits to set, gathered per summary word, set only after the page
        // words they cover have been merged.
        let mut pending: Option<(usize, u64)> = None;
        let summary = &self.summary.get()[b.summary_base..b.summary_base + b.summary_words];
        for (i, &bits) in log.iter().enumerate().filter(|(_, w)| **w != 0) {
            marked += u64::from(bits.count_ones());
            // Release: page contents written before the log was taken are visible to the claimer.
            words[i].fetch_or(bits, Ordering::Release);
            if b.wide() {
                let hp = i as u64 >> (b.host_shift - WORD_SHIFT);
                let (sw, bit) = ((hp >> WORD_SHIFT) as usize, 1u64 << (hp % WORD_BITS));
                match &mut pending {
                    Some((w, mask)) if *w == sw => *mask |= bit,
                    _ => {
                        if let Some((w, mask)) = pending.replace((sw, bit)) {
                            // Release: orders the merged page bits before the summary bit.
                            summary[w].fetch_or(mask, Ordering::Release);
                        }
                    }
                }
            }
        }
        if let Some((w, mask)) = pending {
            // Release: orders the merged page bits before the summary bit.
            summary[w].fetch_or(mask, Ordering::Release);
        }
        Ok(marked)
    }

    /// Whether target page `loc` is dirty (a relaxed snapshot).
    pub fn is_dirty(&self, loc: PageLocation) -> Result<bool, LocationError> {
        let b = self.located(loc)?;
        // Relaxed: a snapshot for callers that decide nothing irrevocable on it.
        Ok(self.word(b, loc.page).load(Ordering::Relaxed) & (1 << (loc.page % WORD_BITS)) != 0)
    }

    /// Claims one target page: clears its bit and returns whether it was dirty. Exactly one
    /// of several concurrent claimers of a dirty page gets `true`.
    ///
    /// This is target-page granular: on a block with larger host pages, senders that must
    /// keep host pages whole use [`claim_host_page`](Self::claim_host_page) instead.
    pub fn claim_page(&self, loc: PageLocation) -> Result<bool, LocationError> {
        let b = self.located(loc)?;
        let bit = 1 << (loc.page % WORD_BITS);
        // Acquire: sees the page contents published by the mark it collects; the RMW's
        // atomicity gives the bit to one claimer only.
        Ok(self.word(b, loc.page).fetch_and(!bit, Ordering::Acquire) & bit != 0)
    }

    /// Claims the whole host page containing `loc`: `None` if none of its target pages was
    /// dirty (already claimed by someone else, or clean).
    pub fn claim_host_page(&self, loc: PageLocation) -> Result<Option<Claim>, LocationError> {
        let b = *self.located(loc)?;
        Ok(self.claim_chunk(&b, loc.block, loc.page, b.host_shift))
    }

    /// Claims the aligned chunk of `1 << chunk_shift` target pages (at least one host page)
    /// that contains `page`. `loc` must be valid.
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
        let shift = chunk_shift.clamp(b.host_shift, WORD_SHIFT);
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

    /// The first dirty target page at or after `from` in `block` (relaxed snapshot).
    pub fn find_next_dirty(&self, block: u32, from: u64) -> Result<Option<u64>, LocationError> {
        let b = self.block(block)?;
        if from >= b.pages {
            return Ok(None);
        }
        let words = &self.words.get()[b.word_base..b.word_base + b.words];
        Ok(find_set(words, from))
    }

    /// The first target page of the first host page at or after the host page of `from` that
    /// may hold a dirty page, in `block` (relaxed snapshot; a claim decides).
    pub fn find_next_dirty_host_page(
        &self,
        block: u32,
        from: u64,
    ) -> Result<Option<u64>, LocationError> {
        let b = self.block(block)?;
        Ok(self.next_host_candidate(b, from))
    }

    #[inline]
    fn next_host_candidate(&self, b: &BlockWords, from: u64) -> Option<u64> {
        if from >= b.pages {
            return None;
        }
        let start = from & !low_mask(u64::from(b.host_shift));
        if b.wide() {
            let summary = &self.summary.get()[b.summary_base..b.summary_base + b.summary_words];
            find_set(summary, start >> b.host_shift).map(|hp| hp << b.host_shift)
        } else {
            let words = &self.words.get()[b.word_base..b.word_base + b.words];
            find_set(words, start).map(|p| p & !low_mask(u64::from(b.host_shift)))
        }
    }

    /// Number of dirty target pages (exact when no thread is marking or claiming).
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

    /// Claims the aligned chunk containing `page` (crate-internal scanner entry).
    #[inline]
    pub(crate) fn claim_at(&self, block: u32, page: u64, chunk_shift: u32) -> Option<Claim> {
        let b = &self.blocks[block as usize];
        self.claim_chunk(b, block, page, chunk_shift)
    }

    /// The next host page that may be dirty, at or after `from` (crate-internal scanner entry).
    #[inline]
    pub(crate) fn next_candidate(&self, block: u32, from: u64) -> Option<u64> {
        self.next_host_candidate(&self.blocks[block as usize], from)
    }

    /// Pages of `block` (crate-internal; `block` valid).
    #[inline]
    pub(crate) fn block_pages(&self, block: u32) -> u64 {
        self.blocks[block as usize].pages
    }

    /// The chunk, in target pages (log2), that a claim of `batch_shift` takes on `block`.
    #[inline]
    pub(crate) fn chunk_shift(&self, block: u32, batch_shift: u32) -> u32 {
        let b = &self.blocks[block as usize];
        if b.wide() {
            b.host_shift
        } else {
            batch_shift.clamp(b.host_shift, WORD_SHIFT)
        }
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

/// The first set bit at or after bit `from` of `words` (relaxed loads, 8 words per test).
#[inline]
fn find_set(words: &[AtomicU64], from: u64) -> Option<u64> {
    let mut i = (from >> WORD_SHIFT) as usize;
    if i >= words.len() {
        return None;
    }
    // Relaxed: a search hint; the caller's claim is what decides.
    let first = words[i].load(Ordering::Relaxed) & !low_mask(from % WORD_BITS);
    if first != 0 {
        return Some(((i as u64) << WORD_SHIFT) + u64::from(first.trailing_zeros()));
    }
    i += 1;
    while i + 8 <= words.len() {
        let group = &words[i..i + 8];
        // Relaxed: a search hint, as above; eight loads and one branch per 512 pages.
        let any = group
            .iter()
            .fold(0, |acc, w| acc | w.load(Ordering::Relaxed));
        if any != 0 {
            break;
        }
        i += 8;
    }
    while i < words.len() {
        // Relaxed: a search hint, as above.
        let w = words[i].load(Ordering::Relaxed);
        if w != 0 {
            return Some(((i as u64) << WORD_SHIFT) + u64::from(w.trailing_zeros()));
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::BlockSpec;

    fn layout() -> RamLayout {
        RamLayout::new(
            4096,
            [
                BlockSpec::new("small", 100 * 4096, 4096),
                BlockSpec::new("mid", 256 * 4096, 4 * 4096),
                BlockSpec::new("huge", 4 << 20, 2 << 20),
            ],
        )
        .unwrap()
    }

    #[test]
    fn marks_claims_and_counts() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_all();
        assert_eq!(bm.dirty_pages(), l.total_pages());
        assert_eq!(bm.block_dirty_pages(0).unwrap(), 100);
        assert!(bm.claim_page(PageLocation::new(0, 99)).unwrap());
        assert!(!bm.claim_page(PageLocation::new(0, 99)).unwrap());
        let c = bm
            .claim_host_page(PageLocation::new(1, 7))
            .unwrap()
            .unwrap();
        assert_eq!(
            c.host_pages().collect::<Vec<_>>(),
            vec![HostPage {
                block: 1,
                first_page: 4,
                pages: 4
            }]
        );
        assert_eq!(c.end(), PageLocation::new(1, 8));
        let c = bm
            .claim_host_page(PageLocation::new(2, 600))
            .unwrap()
            .unwrap();
        assert_eq!((c.dirty_pages(), c.pages_to_send()), (512, 512));
        assert!(bm
            .claim_host_page(PageLocation::new(2, 513))
            .unwrap()
            .is_none());
        assert_eq!(bm.find_next_dirty_host_page(2, 512).unwrap(), None);
        assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(0));
        assert_eq!(bm.dirty_pages(), l.total_pages() - 1 - 4 - 512);
    }

    #[test]
    fn chunk_claims_whole_host_pages() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_dirty(PageLocation::new(1, 5)).unwrap();
        bm.mark_dirty(PageLocation::new(1, 30)).unwrap();
        let c = bm.claim_at(1, 31, 6).unwrap();
        let hps: Vec<_> = c.host_pages().map(|h| h.first_page).collect();
        assert_eq!(hps, vec![4, 28]);
        assert_eq!(c.dirty_pages(), 2);
        assert_eq!(c.pages_to_send(), 8);
        assert_eq!(c.end(), PageLocation::new(1, 32));
        // a batch smaller than the host page still takes whole host pages
        assert_eq!(bm.chunk_shift(1, 0), 2);
        assert_eq!(bm.chunk_shift(2, 3), 9);
    }

    #[test]
    fn dirtying_after_a_claim_is_claimable_again() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        let loc = PageLocation::new(2, 1000);
        bm.mark_dirty(loc).unwrap();
        assert!(bm.claim_host_page(loc).unwrap().is_some());
        bm.mark_dirty(loc).unwrap();
        assert_eq!(bm.claim_host_page(loc).unwrap().unwrap().dirty_pages(), 1);
    }

    #[test]
    fn dirty_log_merge_checks_shape_and_sets_summaries() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        assert_eq!(bm.merge_dirty_log(0, &[0, 0]), Ok(0));
        assert_eq!(
            bm.merge_dirty_log(0, &[0, 1 << 36]),
            Err(DirtyLogError::BitsPastEnd { block: 0 })
        );
        assert_eq!(
            bm.merge_dirty_log(0, &[0]),
            Err(DirtyLogError::WrongLength {
                block: 0,
                expected: 2,
                got: 1
            })
        );
        assert!(matches!(
            bm.merge_dirty_log(9, &[]),
            Err(DirtyLogError::Location(_))
        ));
        assert_eq!(bm.dirty_pages(), 0, "refused logs change nothing");
        let mut log = vec![0u64; 16];
        log[9] = 0b11; // host page 1 of the huge block
        log[15] = 1 << 63;
        assert_eq!(bm.merge_dirty_log(2, &log).unwrap(), 3);
        assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(512));
        let c = bm
            .claim_host_page(PageLocation::new(2, 512))
            .unwrap()
            .unwrap();
        assert_eq!(c.dirty_pages(), 3);
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        assert!(bm.mark_dirty(PageLocation::new(0, 100)).is_err());
        assert!(bm.mark_dirty(PageLocation::new(3, 0)).is_err());
        assert!(bm.mark_range(1, 250, 7).is_err());
        assert!(bm.mark_range(1, 0, 0).is_err());
        assert!(bm.claim_host_page(PageLocation::new(2, 1024)).is_err());
        assert!(bm.is_dirty(PageLocation::new(u32::MAX, 0)).is_err());
        assert_eq!(bm.find_next_dirty(0, 1000).unwrap(), None);
        assert_eq!(bm.dirty_pages(), 0);
    }

    #[test]
    fn find_next_crosses_groups() {
        let l = RamLayout::single("m", 64 * 4096 * 40, 4096).unwrap();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_dirty(PageLocation::new(0, 64 * 37 + 5)).unwrap();
        assert_eq!(bm.find_next_dirty(0, 1).unwrap(), Some(64 * 37 + 5));
        assert_eq!(bm.find_next_dirty(0, 64 * 37 + 6).unwrap(), None);
    }
}
