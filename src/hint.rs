//! The page hint: a single-slot cell from the urgent path to the background path.
//!
//! # Protocol
//! The urgent (return-path) thread, after sending a faulted host page, *offers* the location
//! right after it. The background scanner, before each step, *takes* the pending hint, if any,
//! and continues its scan there. This is the spatial-locality hint of QEMU commit
//! 20d82622812d, without `bitmap_mutex`.
//!
//! # Representation
//! One `AtomicU64`: bit 63 is the valid bit, bits 40..63 the block index ([`BLOCK_BITS`] = 23
//! bits, 8,388,608 blocks), bits 0..40 the target page inside the block ([`PAGE_BITS`] = 40
//! bits, 2^40 pages = 4 PiB of 4 KiB pages). The empty cell is `0`. Because the whole hint is
//! one word, a reader sees either a whole old or a whole new hint: never a torn one.
//!
//! # Invariants (design I4)
//! * at most one hint is pending;
//! * [`offer`](PageHint::offer) is *set-if-empty* (a compare-exchange from empty): a pending
//!   hint is never overwritten, as in QEMU's page-hint patch;
//! * [`take`](PageHint::take) swaps the cell to empty, so each accepted hint is taken at most
//!   once, and what it returns is exactly a value some offer stored;
//! * taking from an empty cell returns `None` and does not write the cell (a plain load
//!   first keeps the background thread's poll off the cache line's exclusive state).
//!
//! Hints are advisory (I6): whatever value is taken, the scheduler only changes the order of
//! sending, never which pages are sent.

use std::fmt;

use crate::layout::{PageLocation, BLOCK_BITS, MAX_BLOCKS, MAX_BLOCK_PAGES, PAGE_BITS};
use crate::sync::{AtomicU64, Ordering};

const VALID: u64 = 1 << 63;
const PAGE_MASK: u64 = (1 << PAGE_BITS) - 1;
const BLOCK_MASK: u64 = (1 << BLOCK_BITS) - 1;
const EMPTY: u64 = 0;

// The packing must fit one word with the valid bit on top, and meet the documented minimum of
// 4,096 blocks and 2^32 target pages per block.
const _: () = assert!(1 + BLOCK_BITS + PAGE_BITS <= 64);
const _: () = assert!(MAX_BLOCKS >= 4096 && MAX_BLOCK_PAGES >= 1 << 32);

/// A location that does not fit the hint's packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackError {
    /// The location that was refused.
    pub location: PageLocation,
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} does not fit a page hint (at most {MAX_BLOCKS} blocks of {MAX_BLOCK_PAGES} pages)",
            self.location
        )
    }
}

impl std::error::Error for PackError {}

/// Packs `loc` with the valid bit set, or refuses it if it does not fit.
///
/// Not API (hidden from the docs, not covered by semver): public only so that the model
/// crate's mutants of the cell use the real packing. Use [`PageHint`].
///
/// ```
/// use pagehint::{hint, PageLocation};
/// let word = hint::pack(PageLocation::new(7, 1 << 35))?;
/// assert_eq!(hint::unpack(word), Some(PageLocation::new(7, 1 << 35)));
/// assert!(hint::pack(PageLocation::new(1 << 23, 0)).is_err());
/// assert!(hint::pack(PageLocation::new(0, 1 << 40)).is_err());
/// # Ok::<(), pagehint::hint::PackError>(())
/// ```
#[doc(hidden)]
pub fn pack(loc: PageLocation) -> Result<u64, PackError> {
    if u64::from(loc.block) > BLOCK_MASK || loc.page > PAGE_MASK {
        return Err(PackError { location: loc });
    }
    Ok(VALID | (u64::from(loc.block) << PAGE_BITS) | loc.page)
}

/// Unpacks a cell word: `None` for the empty word (valid bit clear).
///
/// Not API, like [`pack`].
#[doc(hidden)]
pub fn unpack(word: u64) -> Option<PageLocation> {
    (word & VALID != 0)
        .then(|| PageLocation::new(((word >> PAGE_BITS) & BLOCK_MASK) as u32, word & PAGE_MASK))
}

/// What became of an [`offer`](PageHint::offer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// The cell was empty; the hint is now pending.
    Accepted,
    /// A hint was already pending; it was left untouched and this one dropped.
    Pending,
}

/// A single-slot, lock-free page-location hint (set-if-empty offer, swap take).
///
/// Ordering contract: an accepted offer is a *release* and a successful take an *acquire*, so
/// whatever the offering thread did before offering (claiming and sending the hinted page) is
/// visible to the thread that takes the hint. Correctness of sending never depends on it:
/// the dirty bitmap's own claims decide who sends what.
///
/// ```
/// use pagehint::{hint::Offer, PageHint, PageLocation};
/// let hint = PageHint::new();
/// assert_eq!(hint.offer(PageLocation::new(0, 10))?, Offer::Accepted);
/// assert_eq!(hint.offer(PageLocation::new(0, 99))?, Offer::Pending); // never overwritten
/// assert_eq!(hint.take(), Some(PageLocation::new(0, 10)));
/// assert_eq!(hint.take(), None); // taken at most once
/// # Ok::<(), pagehint::hint::PackError>(())
/// ```
pub struct PageHint {
    cell: AtomicU64,
}

impl PageHint {
    /// An empty cell.
    pub fn new() -> Self {
        Self {
            cell: AtomicU64::new(EMPTY),
        }
    }

    /// Offers `loc` if no hint is pending (set-if-empty); never overwrites a pending hint.
    ///
    /// Fails only if `loc` does not fit the packing; locations of a [`RamLayout`] always fit.
    ///
    /// [`RamLayout`]: crate::RamLayout
    pub fn offer(&self, loc: PageLocation) -> Result<Offer, PackError> {
        let word = pack(loc)?;
        // Relaxed: a pre-check only; the compare-exchange below decides. Seeing a stale
        // "pending" merely drops an advisory hint, which set-if-empty allows anyway.
        if self.cell.load(Ordering::Relaxed) != EMPTY {
            return Ok(Offer::Pending);
        }
        // Release on success publishes the offerer's prior work to the acquiring taker;
        // Relaxed on failure: we learn only that a hint is pending, and publish nothing.
        match self
            .cell
            .compare_exchange(EMPTY, word, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => Ok(Offer::Accepted),
            Err(_) => Ok(Offer::Pending),
        }
    }

    /// Takes the pending hint, leaving the cell empty; `None` if none was pending.
    ///
    /// ```compile_fail
    /// #![deny(unused_must_use)]
    /// pagehint::PageHint::new().take(); // error: unused return value
    /// ```
    #[must_use = "a taken hint has left the cell: follow it, or the urgent path's locality is lost"]
    pub fn take(&self) -> Option<PageLocation> {
        // Relaxed: an empty-looking cell means "no hint yet", which is always a valid answer
        // for an advisory hint; the swap below is what takes a hint exactly once.
        if self.cell.load(Ordering::Relaxed) == EMPTY {
            return None;
        }
        // Acquire pairs with the offer's release; the swap's atomicity makes each accepted
        // word returned to exactly one taker.
        unpack(self.cell.swap(EMPTY, Ordering::Acquire))
    }

    /// Drops any pending hint (QEMU's `ram_page_hint_reset`, for a new migration).
    pub fn clear(&self) {
        // Relaxed: clearing publishes nothing; it is an RMW, so it cannot resurrect an
        // older value and orders after every offer it overwrites.
        self.cell.swap(EMPTY, Ordering::Relaxed);
    }

    /// The pending hint, without taking it (for statistics and debugging).
    pub fn peek(&self) -> Option<PageLocation> {
        // Relaxed: an instantaneous snapshot; no decision is made on it.
        unpack(self.cell.load(Ordering::Relaxed))
    }
}

impl Default for PageHint {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PageHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageHint")
            .field("pending", &self.peek())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_take_gives_nothing_and_clear_resets() {
        let h = PageHint::new();
        assert_eq!(h.take(), None);
        assert_eq!(h.offer(PageLocation::new(3, 4)), Ok(Offer::Accepted));
        assert_eq!(h.peek(), Some(PageLocation::new(3, 4)));
        h.clear();
        assert_eq!(h.peek(), None);
        assert_eq!(h.offer(PageLocation::new(0, 0)), Ok(Offer::Accepted));
        assert_eq!(h.take(), Some(PageLocation::new(0, 0)));
    }

    #[test]
    fn extreme_locations_round_trip() {
        let max = PageLocation::new(BLOCK_MASK as u32, PAGE_MASK);
        assert_eq!(unpack(pack(max).unwrap()), Some(max));
        let h = PageHint::new();
        assert_eq!(h.offer(max), Ok(Offer::Accepted));
        assert_eq!(h.take(), Some(max));
        assert!(h.offer(PageLocation::new(u32::MAX, 0)).is_err());
        assert_eq!(
            h.peek(),
            None,
            "a refused location leaves the cell untouched"
        );
    }
}
