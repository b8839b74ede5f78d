//! Merging KVM dirty logs into the bitmap, and the recovery rebuild ("dirty = not received").
//!
//! A merge only sets bits: page words with a release `fetch_or` per non-zero word (a `swap` for
//! an all-ones word: the same RMW), then, on wide blocks, the summary bits of the host pages
//! touched (release), so a claimer that sees a summary bit sees the page bits set before it
//! (I7). The pages it newly set are summed over the words and counted once per call. The recovery rebuild runs with no
//! sender active (the scheduler checks), so it may store words outright.

use super::count::or_newly;
use super::{low_mask, BlockWords, DirtyBitmap, DirtyLogError, WORD_BITS, WORD_SHIFT};
use crate::sync::{AtomicU64, Ordering};

impl DirtyBitmap {
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
    /// is one release RMW, and for wide host pages the summary bits are set after the page
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
        // Bits this merge turned from clean to dirty (for the dirty count).
        let mut newly = 0;
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
                // A release RMW: page contents written before the log was taken are visible to
                // the claimer that collects these bits.
                newly += or_newly(&words[base + i], word);
                gather_summary(&b, summary, base + i, &mut pending);
            }
        }
        if carry != 0 {
            // In range: the tail check above keeps every bit inside `first_page + pages`.
            // A release RMW, as above.
            newly += or_newly(&words[base + log.len()], carry);
            gather_summary(&b, summary, base + log.len(), &mut pending);
        }
        if let Some((w, mask)) = pending {
            // Release: orders the merged page bits before the summary bit.
            summary[w].fetch_or(mask, Ordering::Release);
        }
        self.count_dirtied(newly);
        Ok(marked)
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
        let (mut dirty, mut dropped, mut added) = (0, 0, 0);
        let mut pending: Option<(usize, u64)> = None;
        for (i, &r) in received.iter().enumerate() {
            let bits = if i + 1 == b.words { !r & tail_mask } else { !r };
            dirty += u64::from(bits.count_ones());
            // Release: like a mark; the claimer that collects these bits sees what this
            // thread did before the rebuild. A swap rather than a store, so that the bits it
            // replaces are known to the dirty count (a concurrent mark's bit is either
            // replaced here, and counted as cleared, or set after, and counted by the mark).
            let old = words[i].swap(bits, Ordering::Release);
            dropped += u64::from((old & !bits).count_ones());
            added += u64::from((bits & !old).count_ones());
            if bits != 0 {
                gather_summary(&b, summary, i, &mut pending);
            }
        }
        if let Some((w, mask)) = pending {
            // Release: orders the rebuilt page bits before the summary bit.
            summary[w].fetch_or(mask, Ordering::Release);
        }
        self.count_cleared(dropped);
        self.count_dirtied(added);
        Ok(dirty)
    }
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
