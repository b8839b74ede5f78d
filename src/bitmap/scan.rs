//! Searching the bitmap, its snapshot by words, and the background scanner's step.
//!
//! Searches and snapshots are relaxed (a stale answer costs one failed claim, never a lost
//! page); the scan step claims what it finds with the claims of the parent module.

use super::{low_mask, BlockWords, Claim, DirtyBitmap, WORD_BITS, WORD_SHIFT};
use crate::layout::LocationError;
use crate::sync::{AtomicU64, Ordering};

impl DirtyBitmap {
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

    /// Copies the dirty words `from_word .. from_word + out.len()` of `block` into `out`
    /// without clearing them (a relaxed snapshot, in the format of
    /// [`get_and_clear`](Self::get_and_clear): bit `j` of `out[i]` is target page
    /// `64 * (from_word + i) + j`), and returns the dirty pages among them. For a caller that
    /// reads the whole dirty set word by word where nothing marks or claims (a stopped
    /// guest's pending set at the switch-over) instead of page by page. The range must lie
    /// inside the block's [`block_words`](Self::block_words); otherwise nothing is copied and
    /// a typed error is returned.
    ///
    /// ```
    /// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?; // 256 pages, 4 words
    /// let bitmap = pagehint::DirtyBitmap::new(&layout)?;
    /// bitmap.mark_range(0, 62, 4)?; // pages 62..66: words 0 and 1
    /// let mut out = [0u64; 2];
    /// assert_eq!(bitmap.dirty_words(0, 0, &mut out)?, 4);
    /// assert_eq!(out, [0b11 << 62, 0b11]);
    /// assert_eq!(bitmap.dirty_pages(), 4); // nothing cleared
    /// assert!(bitmap.dirty_words(0, 3, &mut out).is_err()); // words 3..5 of 4
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dirty_words(
        &self,
        block: u32,
        from_word: usize,
        out: &mut [u64],
    ) -> Result<u64, LocationError> {
        let b = self.block(block)?;
        let words = match from_word.checked_add(out.len()) {
            Some(end) if end <= b.words => {
                &self.words.get()[b.word_base + from_word..b.word_base + end]
            }
            _ => {
                return Err(LocationError::RangeOutOfBounds {
                    block,
                    first: (from_word as u64).saturating_mul(WORD_BITS),
                    count: (out.len() as u64).saturating_mul(WORD_BITS),
                })
            }
        };
        let mut dirty = 0;
        for (o, w) in out.iter_mut().zip(words) {
            // Relaxed: a snapshot, like the searches above; exact when nothing marks or claims.
            *o = w.load(Ordering::Relaxed);
            dirty += u64::from(o.count_ones());
        }
        Ok(dirty)
    }

    /// Whether the host page holding `page` of `block` may hold a dirty page: one relaxed
    /// load (a snapshot; a claim decides). False for a location outside the bitmap.
    #[inline]
    pub(crate) fn host_page_may_be_dirty(&self, block: u32, page: u64) -> bool {
        let Ok(b) = self.block(block) else {
            return false;
        };
        if page >= b.pages {
            return false;
        }
        let hp = page >> b.host_shift;
        let (word, mask) = if b.wide() {
            let summary = &self.summary.get()[b.summary_base + (hp >> WORD_SHIFT) as usize];
            (summary, 1u64 << (hp % WORD_BITS))
        } else {
            let first = hp << b.host_shift;
            let mask = low_mask(1 << b.host_shift) << (first % WORD_BITS);
            (self.word(b, first), mask)
        };
        // Relaxed: a search hint, like `find_set`'s loads; the claim that follows decides.
        word.load(Ordering::Relaxed) & mask != 0
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
        let shift = b.chunk_shift(batch_shift);
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

impl DirtyBitmap {
    /// log2 of the target pages in one scan-step chunk of `block` (see [`scan_step`]): the
    /// host page for wide host pages, else the batch clamped to whole host pages in one word.
    ///
    /// [`scan_step`]: DirtyBitmap::scan_step
    #[inline]
    pub(crate) fn chunk_shift(&self, block: u32, batch_shift: u32) -> u32 {
        self.blocks[block as usize].chunk_shift(batch_shift)
    }

    /// One step of a stream's cursor: claims the chunk of [`scan_step`]'s size that contains
    /// `page` of `block`, without searching further (one read-modify-write; a forward cursor
    /// passes over chunks with nothing left to claim, at most a run's worth per hint: a
    /// pre-check load measured no faster, `scan_claim_*streams_cursors_vs_linear`). The chunk
    /// is clamped to the block's end. `block` and `page` must be valid.
    ///
    /// [`scan_step`]: DirtyBitmap::scan_step
    #[inline]
    pub(crate) fn claim_chunk_at(&self, block: u32, page: u64, batch_shift: u32) -> ChunkStep {
        let b = &self.blocks[block as usize];
        let shift = b.chunk_shift(batch_shift);
        let first = page & !low_mask(u64::from(shift));
        let end = (first + (1 << shift)).min(b.pages);
        ChunkStep {
            first,
            end,
            block_end: end == b.pages,
            claim: self.claim_chunk(b, block, page, shift),
        }
    }
}

impl BlockWords {
    /// See [`DirtyBitmap::chunk_shift`].
    #[inline]
    fn chunk_shift(&self, batch_shift: u32) -> u32 {
        if self.wide() {
            self.host_shift
        } else {
            batch_shift.clamp(self.host_shift, WORD_SHIFT)
        }
    }
}

/// What one [`DirtyBitmap::claim_chunk_at`] did.
pub(crate) struct ChunkStep {
    /// The chunk's first page.
    pub(crate) first: u64,
    /// The page after the chunk (the block's end at most).
    pub(crate) end: u64,
    /// `end` is the block's end.
    pub(crate) block_end: bool,
    /// The caller's claim; `None` if nothing in the chunk was dirty (clean, or claimed by
    /// someone else).
    pub(crate) claim: Option<Claim>,
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
