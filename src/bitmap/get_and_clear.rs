//! The precopy drain: hand the caller the dirty words of a range and clear them.
//!
//! # Protocol
//! A clean-looking word (relaxed load) is skipped; a dirty one is swapped to zero with
//! acquire, so each bit goes to one collector (I1) and the collector sees the page contents
//! the mark published (I7). On wide blocks a host page lying wholly inside the range is
//! first won through its summary bit (`elect_wide`), exactly as a host-page claim wins it,
//! so a drain and a claim never split a host page (I2) and no stale summary bit is left.

use std::ops::Range;

use super::{low_mask, DirtyBitmap, WORD_BITS, WORD_SHIFT};
use crate::layout::LocationError;
use crate::sync::{AtomicU64, Ordering};

impl DirtyBitmap {
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
            self.count_cleared(collected);
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
                        let won = elect_wide(&summary[sw], sw, full_first..full_end);
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
        self.count_cleared(collected);
        Ok(collected)
    }
}

/// The wide-page election of a drain: clears, in summary word `sw` (`summary`), the bits of
/// the host pages `full` (those lying wholly inside the drained range) and returns the ones
/// this drain won. Each host page is won by one collector (this drain, or the host-page claim
/// or other drain that cleared its summary bit first); only the winner swaps its page words.
fn elect_wide(summary: &AtomicU64, sw: usize, full: Range<usize>) -> u64 {
    let first = sw << WORD_SHIFT;
    // The range's whole host pages in this summary word.
    let lo = (full.start.max(first) - first) as u64;
    let hi = (full.end.min(first + (1 << WORD_SHIFT)) - first) as u64;
    let mask = low_mask(hi - lo) << lo;
    // Relaxed: a clean-looking summary elects nothing; its page bits belong to a marker about
    // to set the summary bit, or to the claimer that cleared it.
    if summary.load(Ordering::Relaxed) & mask == 0 {
        0
    } else {
        // Acquire pairs with the markers' release, as in a host-page claim; the RMW elects
        // one collector per host page.
        summary.fetch_and(!mask, Ordering::Acquire) & mask
    }
}
