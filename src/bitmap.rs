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
use crate::sync::{AtomicBool, AtomicU64, Ordering};

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

/// A bitmap that was not built for the layout it is used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutMismatch {
    /// The bitmap and the layout have different numbers of blocks.
    BlockCount {
        /// Blocks in the bitmap.
        bitmap: usize,
        /// Blocks in the layout.
        layout: usize,
    },
    /// A block has a different number of target pages, or a different host page size, in the
    /// bitmap and in the layout.
    BlockShape {
        /// The block.
        block: u32,
    },
}

impl fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlockCount { bitmap, layout } => write!(
                f,
                "dirty bitmap has {bitmap} blocks but the layout has {layout}"
            ),
            Self::BlockShape { block } => write!(
                f,
                "block {block} has another size or host page size in the dirty bitmap than in the layout"
            ),
        }
    }
}

impl std::error::Error for LayoutMismatch {}

/// Dirty host pages that one claim made the caller the only sender of.
///
/// A claim covers an aligned run of whole host pages of one block, at most 64 of them; the
/// caller must send every host page [`host_pages`](Claim::host_pages) yields, whole.
///
/// # A claim is an obligation
/// The claimed bits have left the bitmap: nobody else will send these pages, and the scan
/// will not find them again. Dropping a claim unsent loses them (unless they are marked dirty
/// again). So `Claim`, the outcomes that carry one ([`HostPageClaim`], [`PageClaim`],
/// [`Served`](crate::Served)) and the methods that return them
/// ([`BackgroundScanner::next_claim`](crate::BackgroundScanner::next_claim),
/// [`PageHint::take`](crate::PageHint::take), ...) are `#[must_use]`: ignoring one is a
/// warning, also after `?`. A deliberate `let _ = ...` is not linted by rustc; clippy's
/// `let_underscore_must_use` (restriction group) catches that too.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?;
/// # let bitmap = pagehint::DirtyBitmap::new(&layout)?;
/// bitmap.claim_host_page(pagehint::PageLocation::new(0, 7))?; // error: unused `HostPageClaim`
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?;
/// # let bitmap = pagehint::DirtyBitmap::new(&layout)?;
/// bitmap.claim_page(pagehint::PageLocation::new(0, 7))?; // error: unused `PageClaim`
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
/// The same code with the outcome used compiles under the same lint:
/// ```
/// #![deny(unused_must_use)]
/// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?;
/// # let bitmap = pagehint::DirtyBitmap::new(&layout)?;
/// # bitmap.mark_all();
/// if let Some(claim) = bitmap.claim_host_page(pagehint::PageLocation::new(0, 7))?.into_claim() {
///     for hp in claim.host_pages() { /* send hp */ }
/// }
/// assert!(bitmap.claim_page(pagehint::PageLocation::new(0, 8))?.is_claimed());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a claim owns pages that have left the dirty bitmap: send them (or mark them dirty again), or they are lost"]
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

/// What [`DirtyBitmap::claim_host_page`] got.
#[must_use = "a won claim owns pages that have left the dirty bitmap: send them, or they are lost"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPageClaim {
    /// The caller is now the only sender of these host pages (see [`Claim`]).
    Claimed(Claim),
    /// None of the host page's target pages was dirty: clean, or claimed by someone else.
    NotDirty,
}

impl HostPageClaim {
    /// The claim, if one was won.
    #[must_use = "a won claim owns pages that have left the dirty bitmap: send them, or they are lost"]
    pub fn into_claim(self) -> Option<Claim> {
        match self {
            Self::Claimed(c) => Some(c),
            Self::NotDirty => None,
        }
    }
    /// Whether a claim was won.
    pub fn is_claimed(&self) -> bool {
        matches!(self, Self::Claimed(_))
    }
}

impl From<Option<Claim>> for HostPageClaim {
    fn from(c: Option<Claim>) -> Self {
        c.map_or(Self::NotDirty, Self::Claimed)
    }
}

/// What [`DirtyBitmap::claim_page`] got.
#[must_use = "a claimed page has left the dirty bitmap: send it (or mark it dirty again), or it is lost"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClaim {
    /// The page was dirty and its bit is now the caller's: send the page.
    Claimed,
    /// The page was not dirty: clean, or claimed by someone else.
    NotDirty,
}

impl PageClaim {
    /// Whether the page was claimed.
    pub fn is_claimed(self) -> bool {
        self == Self::Claimed
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
        let pages = self.block(block)?.pages;
        self.merge_dirty_log_at(block, 0, pages, log)
    }

    /// ORs a dirty log covering `pages` target pages of `block` from page `first_page` into
    /// the bitmap: bit `i % 64` of word `i / 64` is page `first_page + i`. This is what
    /// `KVM_GET_DIRTY_LOG` returns for a memory slot that maps part of a block. Zero words
    /// cost no atomic; when `first_page` is not a multiple of 64, each log word is shifted
    /// into (at most) two bitmap words. Returns the number of pages the log marks dirty.
    ///
    /// The range must lie inside the block, and the log must have exactly one bit per page,
    /// rounded up to whole words, with no bit past `pages`; a malformed log is refused whole,
    /// before anything is merged (I8). Concurrent claims lose nothing (I7): each merged word
    /// is one `fetch_or`, and for wide host pages the summary bits are set after the page
    /// bits they cover.
    ///
    /// ```
    /// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?; // 256 pages
    /// let bitmap = pagehint::DirtyBitmap::new(&layout)?;
    /// // a slot of 70 pages starting at page 100: pages 100, 101 and 169
    /// assert_eq!(bitmap.merge_dirty_log_at(0, 100, 70, &[0b11, 1 << 5])?, 3);
    /// assert_eq!(bitmap.find_next_dirty(0, 102)?, Some(169));
    /// assert!(bitmap.merge_dirty_log_at(0, 200, 70, &[0, 0]).is_err()); // past the block
    /// assert!(bitmap.merge_dirty_log_at(0, 100, 70, &[0, 1 << 6]).is_err()); // past the slot
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn merge_dirty_log_at(
        &self,
        block: u32,
        first_page: u64,
        pages: u64,
        log: &[u64],
    ) -> Result<u64, DirtyLogError> {
        let b = *self.ranged(block, first_page, pages)?;
        // Cannot saturate: a block has at most 2^40 pages.
        let expected = usize::try_from(pages.div_ceil(WORD_BITS)).unwrap_or(usize::MAX);
        if log.len() != expected {
            return Err(DirtyLogError::WrongLength {
                block,
                expected,
                got: log.len(),
            });
        }
        let tail = pages % WORD_BITS;
        if tail != 0 && log.last().is_some_and(|w| w & !low_mask(tail) != 0) {
            return Err(DirtyLogError::BitsPastEnd { block });
        }
        let words = &self.words.get()[b.word_base..b.word_base + b.words];
        let summary = &self.summary.get()[b.summary_base..b.summary_base + b.summary_words];
        let base = (first_page >> WORD_SHIFT) as usize;
        let off = (first_page % WORD_BITS) as u32;
        let mut marked = 0;
        // Wide blocks: summary bits to set, gathered per summary word, set only after the page
        // words they cover have been merged.
        let mut pending: Option<(usize, u64)> = None;
        // Bits of the previous log word that spill into the current bitmap word.
        let mut carry = 0u64;
        let mut i = 0;
        while i < log.len() {
            // Sparse logs: skip clean words eight at a time with plain reads of the caller's
            // log (no carry pending means the skipped bitmap words get nothing).
            if carry == 0
                && log
                    .get(i..i + 8)
                    .is_some_and(|g| g.iter().fold(0, |a, w| a | w) == 0)
            {
                i += 8;
                continue;
            }
            let bits = log[i];
            i += 1;
            if bits == 0 && carry == 0 {
                continue;
            }
            let i = i - 1;
            marked += u64::from(bits.count_ones());
            let word = (bits << off) | carry;
            carry = if off == 0 {
                0
            } else {
                bits >> (WORD_BITS as u32 - off)
            };
            if word != 0 {
                // Release: page contents written before the log was taken are visible to the
                // claimer that collects these bits.
                words[base + i].fetch_or(word, Ordering::Release);
                gather_summary(&b, summary, base + i, &mut pending);
            }
        }
        if carry != 0 {
            // In range: the tail check above keeps every bit inside `first_page + pages`.
            // Release: as above.
            words[base + log.len()].fetch_or(carry, Ordering::Release);
            gather_summary(&b, summary, base + log.len(), &mut pending);
        }
        if let Some((w, mask)) = pending {
            // Release: orders the merged page bits before the summary bit.
            summary[w].fetch_or(mask, Ordering::Release);
        }
        Ok(marked)
    }

    /// Words of `block`'s bitmap: the length of its dirty log, and the bound of
    /// [`get_and_clear`](Self::get_and_clear).
    pub fn block_words(&self, block: u32) -> Result<usize, LocationError> {
        Ok(self.block(block)?.words)
    }

    /// Hands the caller the dirty words `from_word .. from_word + out.len()` of `block` and
    /// clears them, for precopy consumers: `out[i]` receives word `from_word + i`, whose bit
    /// `j` is target page `64 * (from_word + i) + j` (the format of a KVM dirty log).
    /// Returns the number of dirty pages handed over.
    ///
    /// No allocation; a clean word costs one relaxed load, a dirty word one swap. The range
    /// must lie inside the block's [`block_words`](Self::block_words) (an empty `out` is a
    /// no-op); otherwise nothing is touched and a typed error is returned.
    ///
    /// # Granularity and concurrency
    /// Like [`claim_page`](Self::claim_page), this is target-page granular, and it may run
    /// concurrently with marks, merges and claims of any kind: every bit it returns is the
    /// caller's alone (I1), and a page marked after its word was collected stays dirty (I7).
    /// On blocks whose host pages are at most 64 target pages, a word holds whole host pages,
    /// so host pages are never split (I2). On blocks with wider host pages, a host page lying
    /// wholly inside the range is taken through its summary bit, exactly like
    /// [`claim_host_page`](Self::claim_host_page): it goes whole either to this call or to a
    /// concurrent host-page claim (whose words then read as zero here), and leaves no stale
    /// summary bit behind. A wide host page cut by the range's ends is collected word by word
    /// and keeps its summary bit (a later host-page claim may find it empty, and clears it); a
    /// host-page claim running at the same moment may get the rest of it. Consumers that need
    /// whole host pages use ranges aligned to host pages (`host page pages / 64` words).
    ///
    /// ```
    /// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?; // 256 pages, 4 words
    /// let bitmap = pagehint::DirtyBitmap::new(&layout)?;
    /// bitmap.mark_range(0, 62, 4)?; // pages 62..66: words 0 and 1
    /// let mut out = [0u64; 2];
    /// assert_eq!(bitmap.get_and_clear(0, 0, &mut out)?, 4);
    /// assert_eq!(out, [0b11 << 62, 0b11]);
    /// assert_eq!(bitmap.get_and_clear(0, 0, &mut out)?, 0); // cleared
    /// assert!(bitmap.get_and_clear(0, 3, &mut out).is_err()); // words 3..5 of 4
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn get_and_clear(
        &self,
        block: u32,
        from_word: usize,
        out: &mut [u64],
    ) -> Result<u64, LocationError> {
        let b = *self.block(block)?;
        let end = match from_word.checked_add(out.len()) {
            Some(end) if end <= b.words => end,
            _ => {
                return Err(LocationError::RangeOutOfBounds {
                    block,
                    first: (from_word as u64).saturating_mul(WORD_BITS),
                    count: (out.len() as u64).saturating_mul(WORD_BITS),
                })
            }
        };
        let words = &self.words.get()[b.word_base..b.word_base + b.words];
        let take = |w: usize| {
            // Relaxed: a clean-looking word is left alone; a bit set after this load is a
            // mark after the collection, which stays dirty (I7).
            if words[w].load(Ordering::Relaxed) == 0 {
                0
            } else {
                // Acquire: sees the page contents published by the marks collected; the
                // swap's atomicity gives each bit to one collector only.
                words[w].swap(0, Ordering::Acquire)
            }
        };
        let mut collected = 0;
        if !b.wide() {
            for (o, w) in out.iter_mut().zip(from_word..end) {
                *o = take(w);
                collected += u64::from(o.count_ones());
            }
            return Ok(collected);
        }
        let per = b.words_per_host();
        let summary = &self.summary.get()[b.summary_base..b.summary_base + b.summary_words];
        // Host pages wholly inside the range.
        let (full_first, full_end) = (from_word.div_ceil(per), end / per);
        // The summary word last elected from, and the host pages of it we won.
        let mut elected: Option<(usize, u64)> = None;
        let mut w = from_word;
        while w < end {
            let hp = w / per;
            let seg_end = ((hp + 1) * per).min(end);
            let won = if hp >= full_first && hp < full_end {
                let sw = hp >> WORD_SHIFT;
                let won = match elected {
                    Some((s, won)) if s == sw => won,
                    _ => {
                        // The range's whole host pages in this summary word.
                        let lo = (full_first.max(sw << WORD_SHIFT) - (sw << WORD_SHIFT)) as u64;
                        let hi = (full_end.min((sw + 1) << WORD_SHIFT) - (sw << WORD_SHIFT)) as u64;
                        let mask = low_mask(hi - lo) << lo;
                        // Relaxed: a clean-looking summary elects nothing; its page bits
                        // belong to a marker about to set the summary bit, or to the claimer
                        // that cleared it.
                        let won = if summary[sw].load(Ordering::Relaxed) & mask == 0 {
                            0
                        } else {
                            // Acquire pairs with the markers' release, as in a host-page
                            // claim; the RMW elects one collector per host page.
                            summary[sw].fetch_and(!mask, Ordering::Acquire) & mask
                        };
                        elected = Some((sw, won));
                        won
                    }
                };
                won & (1 << (hp as u64 % WORD_BITS)) != 0
            } else {
                true
            };
            for (o, i) in out[w - from_word..seg_end - from_word]
                .iter_mut()
                .zip(w..seg_end)
            {
                *o = if won { take(i) } else { 0 };
                collected += u64::from(o.count_ones());
            }
            w = seg_end;
        }
        Ok(collected)
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

    /// Replaces the dirty state of `block` by the complement of `received`, the
    /// destination's bitmap of received pages (postcopy recovery): a page is dirty exactly
    /// when it was not received. Returns the number of pages now dirty in the block.
    ///
    /// Shape rules and errors as for [`merge_dirty_log`](Self::merge_dirty_log), checked
    /// before anything is changed. The caller guarantees that nothing claims from the block
    /// meanwhile (the scheduler's `&mut self` does). A mark concurrent with the rebuild is
    /// either superseded by the received state or kept, never half-kept: the summary words
    /// are cleared with acquire RMWs before the page words are written, so a page bit set
    /// after its word was rebuilt gets its summary bit after the clear.
    pub(crate) fn reset_from_received(
        &self,
        block: u32,
        received: &[u64],
    ) -> Result<u64, DirtyLogError> {
        let b = *self.block(block)?;
        if received.len() != b.words {
            return Err(DirtyLogError::WrongLength {
                block,
                expected: b.words,
                got: received.len(),
            });
        }
        let tail = b.pages % WORD_BITS;
        let tail_mask = if tail == 0 { !0 } else { low_mask(tail) };
        if received.last().is_some_and(|w| w & !tail_mask != 0) {
            return Err(DirtyLogError::BitsPastEnd { block });
        }
        let words = &self.words.get()[b.word_base..b.word_base + b.words];
        let summary = &self.summary.get()[b.summary_base..b.summary_base + b.summary_words];
        for s in summary {
            // Acquire: reads from any marker's summary release it clears, so that marker's
            // page bit is ordered before the rebuild of its word below (and superseded by
            // it); a later marker sets its summary bit after this clear.
            s.swap(0, Ordering::Acquire);
        }
        let mut dirty = 0;
        let mut pending: Option<(usize, u64)> = None;
        for (i, &r) in received.iter().enumerate() {
            let bits = if i + 1 == b.words { !r & tail_mask } else { !r };
            dirty += u64::from(bits.count_ones());
            // Release: like a mark; the claimer that collects these bits sees what this
            // thread did before the rebuild.
            words[i].store(bits, Ordering::Release);
            if bits != 0 {
                gather_summary(&b, summary, i, &mut pending);
            }
        }
        if let Some((w, mask)) = pending {
            // Release: orders the rebuilt page bits before the summary bit.
            summary[w].fetch_or(mask, Ordering::Release);
        }
        Ok(dirty)
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
        Ok(self
            .claim_chunk(&b, loc.block, loc.page, b.host_shift)
            .into())
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

    /// One background scan step over `block` from page `from` (the scanner's only entry):
    /// finds the next host page that may be dirty and claims the aligned chunk of
    /// `1 << batch_shift` target pages around it (whole host pages: at most one word for
    /// narrow host pages, exactly one host page for wide ones).
    ///
    /// The returned `end` is where the scan continues: every page of `from..end` is now
    /// claimed (by this caller or another) or was clean. A chunk is clamped to the block's
    /// end, since a block need not be a multiple of the chunk: pages past it do not exist and
    /// must not count as scanned (I3).
    #[inline]
    pub(crate) fn scan_step(&self, block: u32, from: u64, batch_shift: u32) -> ScanStep {
        let b = &self.blocks[block as usize];
        let Some(page) = self.next_host_candidate(b, from) else {
            return ScanStep {
                end: b.pages,
                block_end: true,
                found: Found::Clean,
            };
        };
        let shift = if b.wide() {
            b.host_shift
        } else {
            batch_shift.clamp(b.host_shift, WORD_SHIFT)
        };
        let end = (((page >> shift) + 1) << shift).min(b.pages);
        let found = match self.claim_chunk(b, block, page, shift) {
            Some(claim) => Found::Won(claim),
            None => Found::Lost,
        };
        ScanStep {
            end,
            block_end: end == b.pages,
            found,
        }
    }
}

/// What one [`DirtyBitmap::scan_step`] did.
pub(crate) struct ScanStep {
    /// Every page from the step's start to `end` is claimed or was clean.
    pub(crate) end: u64,
    /// `end` is the block's end.
    pub(crate) block_end: bool,
    /// What the step found.
    pub(crate) found: Found,
}

/// What a scan step found in its chunk.
pub(crate) enum Found {
    /// No page may be dirty from the step's start to the block's end.
    Clean,
    /// A dirty candidate, but another claimer emptied the chunk first.
    Lost,
    /// The caller's claim.
    Won(Claim),
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

/// For a wide block, gathers the summary bit of the host page that holds block word `w` in
/// `pending`, first setting the bits gathered for an earlier summary word. Words must come
/// in increasing order, each after its page bits were set: the caller sets what remains
/// pending at the end.
#[inline]
fn gather_summary(
    b: &BlockWords,
    summary: &[AtomicU64],
    w: usize,
    pending: &mut Option<(usize, u64)>,
) {
    if !b.wide() {
        return;
    }
    let hp = (w >> (b.host_shift - WORD_SHIFT)) as u64;
    let (sw, bit) = ((hp >> WORD_SHIFT) as usize, 1u64 << (hp % WORD_BITS));
    match pending {
        Some((pw, mask)) if *pw == sw => *mask |= bit,
        _ => {
            if let Some((pw, mask)) = pending.replace((sw, bit)) {
                // Release: orders the page bits set before it ahead of the summary bit.
                summary[pw].fetch_or(mask, Ordering::Release);
            }
        }
    }
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

/// How far ahead of itself a long scan prefetches: 512 words, one 4 KiB base page.
///
/// Hardware prefetchers stop at page boundaries, and eight scalar relaxed loads per cache
/// line keep fewer misses in flight than a vectorised plain read. Measured on the 2-vCPU
/// machine (benches `next_dirty_*`, BENCHMARKS.md): a sparse 32 MiB bitmap (1 TiB guest)
/// scanned at ~0.7–0.85× the plain read of the same bytes without it, above 1× with it;
/// 512 B and 1 KiB ahead helped less.
const PREFETCH_WORDS: usize = 512;

/// Asks the CPU to start loading the cache line `PREFETCH_WORDS` words past word `i`.
#[inline(always)]
fn prefetch_ahead(words: &[AtomicU64], i: usize) {
    // Only with plain atomics on real x86-64 hardware: a pure performance hint, left out of
    // the model checkers' and Miri's builds.
    #[cfg(target_arch = "x86_64")]
    if crate::sync::PLAIN_ATOMICS {
        // SAFETY: a prefetch never faults and has no architectural effect, whatever the
        // address; `wrapping_add` keeps the address computation defined past the slice's end.
        unsafe {
            use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(words.as_ptr().wrapping_add(i + PREFETCH_WORDS).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (words, i);
}

/// The first set bit at or after bit `from` of `words` (relaxed loads, 8 words per test,
/// prefetching [`PREFETCH_WORDS`] ahead).
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
        prefetch_ahead(words, i);
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
        assert!(bm
            .claim_page(PageLocation::new(0, 99))
            .unwrap()
            .is_claimed());
        assert!(!bm
            .claim_page(PageLocation::new(0, 99))
            .unwrap()
            .is_claimed());
        let c = bm
            .claim_host_page(PageLocation::new(1, 7))
            .unwrap()
            .into_claim()
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
            .into_claim()
            .unwrap();
        assert_eq!((c.dirty_pages(), c.pages_to_send()), (512, 512));
        assert!(bm
            .claim_host_page(PageLocation::new(2, 513))
            .unwrap()
            .into_claim()
            .is_none());
        assert_eq!(bm.find_next_dirty_host_page(2, 512).unwrap(), None);
        assert_eq!(bm.find_next_dirty_host_page(2, 0).unwrap(), Some(0));
        assert_eq!(bm.dirty_pages(), l.total_pages() - 1 - 4 - 512);
    }

    fn won(step: ScanStep) -> (u64, bool, Claim) {
        match step.found {
            Found::Won(c) => (step.end, step.block_end, c),
            Found::Lost => panic!("lost"),
            Found::Clean => panic!("clean"),
        }
    }

    #[test]
    fn scan_steps_claim_whole_host_pages_and_stop_at_block_ends() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        bm.mark_dirty(PageLocation::new(1, 5)).unwrap();
        bm.mark_dirty(PageLocation::new(1, 30)).unwrap();
        let (end, block_end, c) = won(bm.scan_step(1, 0, 6));
        assert_eq!((end, block_end), (64, false));
        let hps: Vec<_> = c.host_pages().map(|h| h.first_page).collect();
        assert_eq!(hps, vec![4, 28]);
        assert_eq!(c.dirty_pages(), 2);
        assert_eq!(c.pages_to_send(), 8);
        assert_eq!(c.end(), PageLocation::new(1, 32));
        // a batch smaller than the host page still takes whole host pages
        bm.mark_dirty(PageLocation::new(1, 101)).unwrap();
        let (end, _, c) = won(bm.scan_step(1, 64, 0));
        assert_eq!((end, c.host_pages().next().unwrap().first_page), (104, 100));
        // wide host pages: exactly one host page per step
        bm.mark_dirty(PageLocation::new(2, 600)).unwrap();
        let (end, block_end, c) = won(bm.scan_step(2, 0, 3));
        assert_eq!((end, block_end, c.pages_to_send()), (1024, true, 512));
        // a chunk running past a 100-page block ends at the block's end (I3)
        bm.mark_dirty(PageLocation::new(0, 99)).unwrap();
        let (end, block_end, _) = won(bm.scan_step(0, 70, 6));
        assert_eq!((end, block_end), (100, true));
        let step = bm.scan_step(0, 0, 6);
        assert!(matches!(step.found, Found::Clean) && step.end == 100 && step.block_end);
        // a candidate whose bits someone else took first: lost, but scanned past
        bm.mark_dirty(PageLocation::new(2, 10)).unwrap();
        assert!(bm
            .claim_page(PageLocation::new(2, 10))
            .unwrap()
            .is_claimed());
        let step = bm.scan_step(2, 0, 6);
        assert!(matches!(step.found, Found::Lost) && step.end == 512 && !step.block_end);
    }

    #[test]
    fn dirtying_after_a_claim_is_claimable_again() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        let loc = PageLocation::new(2, 1000);
        bm.mark_dirty(loc).unwrap();
        assert!(bm.claim_host_page(loc).unwrap().into_claim().is_some());
        bm.mark_dirty(loc).unwrap();
        assert_eq!(
            bm.claim_host_page(loc)
                .unwrap()
                .into_claim()
                .unwrap()
                .dirty_pages(),
            1
        );
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
            .into_claim()
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
