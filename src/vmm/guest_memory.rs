//! vm-memory dirty tracking through a pagehint [`DirtyBitmap`] (feature `vm-memory`).
//!
//! # Model
//! vm-memory gives each guest memory region its own bitmap object `B: Bitmap`; every write
//! through its API (`write_obj`, `write_slice`, `store`, volatile slices ...) calls
//! `B::mark_dirty(offset, len)` with the byte range written, relative to the region.
//! [`RegionBitmap`] is that object for one RAM block of a shared `Arc<DirtyBitmap>`: region
//! *i* of the guest memory tracks into block *i* of the layout. The same `Arc` is handed to
//! [`PageScheduler::with_bitmap`](crate::PageScheduler::with_bitmap), so the pages the guest
//! (or the device model) dirties through vm-memory are exactly the pages the scheduler sends.
//!
//! # Semantics (those of vm-memory's `AtomicBitmap`)
//! * `mark_dirty(offset, len)` marks every target page that holds a byte of
//!   `offset .. offset + len`; `len == 0` marks nothing. It is one masked `fetch_or` per
//!   64-page word (release), where `AtomicBitmap` does one `fetch_or` per page.
//! * The part of a range past the region's end is ignored, as vm-memory does: the trait
//!   returns nothing, so there is no error to return. Unlike vm-memory, each mark that was cut
//!   or ignored is *counted* ([`RegionBitmap::ignored_marks`]), so a VMM can see it.
//! * `dirty_at(offset)` is an acquire load, as vm-memory's: a reader that sees the bit sees
//!   the write published before the mark. Offsets past the end are clean.
//! * Slices (`slice_at`) add their base offset with wrapping arithmetic, as vm-memory's
//!   `BaseSlice` does: an overflowing offset marks a wrong page (a false positive, which
//!   sends a page twice but loses none), never panics.
//!
//! # Construction
//! * shared (what a migrating VMM wants): [`RegionBitmap::for_block`] for each region, passed
//!   to `MmapRegionBuilder::new_with_bitmap`; see the crate's `examples/vmm.rs`.
//! * standalone ([`NewBitmap::with_len`], used by `GuestMemoryMmap::from_ranges`): each
//!   region gets a private one-block bitmap whose pages are the host's page size
//!   (`sysconf(_SC_PAGESIZE)`: 4 KiB on x86, 16 or 64 KiB on some arm64 and POWER hosts), as
//!   vm-memory's `AtomicBitmap` does, so a caller that checks one offset per host page (as
//!   Firecracker's `dump_dirty` does) sees every write. It tracks like `AtomicBitmap` and offers
//!   [`DirtyBitmap::get_and_clear`] through [`RegionBitmap::dirty_bitmap`], but the regions
//!   do not share one bitmap, so a single scheduler cannot send them: build shared ones for
//!   migration. `with_len` cannot fail; if no bitmap can be built (more than 4 PiB, or no
//!   memory for the bitmap), the region is *untracked*: it reports every page dirty (so no
//!   consumer skips a page) and counts every mark as ignored.
//!
//! # What Cloud Hypervisor and Firecracker call on `AtomicBitmap`, here
//! | `AtomicBitmap`        | [`RegionBitmap`]                                            |
//! |-----------------------|-------------------------------------------------------------|
//! | `len()`               | [`len`](RegionBitmap::len): pages (bits), the same          |
//! | `get_and_reset()`     | [`get_and_reset`](RegionBitmap::get_and_reset): the same words, `#[must_use]` |
//! | `reset()`             | [`reset`](RegionBitmap::reset): refuses while a scheduler drives the bitmap (the pages would never be sent); returns the pages discarded |
//! | `clone()`             | `Clone` **shares** the block instead of copying the bits: a copy would track writes nobody sends |
//! | `dirty_at` (Acquire)  | `dirty_at`: Acquire, the same                               |
//! | `with_len` (host page size) | the same page size                                    |
//! | `mark_dirty` past the end: ignored | ignored and counted ([`ignored_marks`](RegionBitmap::ignored_marks)) |

use crate::sync::Arc;
use std::fmt;
use std::sync::atomic::Ordering;

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};

use crate::bitmap::{low_mask, DirtyBitmap, LayoutMismatch};
use crate::layout::{BlockSpec, LocationError, RamLayout};
use crate::stats::bump;
use crate::sync::StatCounter;

/// Why a [`RegionBitmap`] could not be made for a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegionBitmapError {
    /// The bitmap was not built for the layout.
    Layout(LayoutMismatch),
    /// The block does not exist.
    Location(LocationError),
    /// [`RegionBitmap::reset`] would discard dirty pages that a scheduler is driving: they
    /// would never be sent.
    Driven {
        /// The block.
        block: u32,
    },
}

impl fmt::Display for RegionBitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layout(e) => e.fmt(f),
            Self::Location(e) => e.fmt(f),
            Self::Driven { block } => write!(
                f,
                "block {block}'s dirty pages belong to a running scheduler; resetting them would lose them"
            ),
        }
    }
}

impl std::error::Error for RegionBitmapError {}

/// vm-memory's dirty bitmap for one guest memory region: one RAM block of a pagehint
/// [`DirtyBitmap`]. See the [module docs](self).
///
/// ```
/// use std::sync::Arc;
/// use pagehint::{vmm::RegionBitmap, DirtyBitmap, PageLocation, RamLayout};
/// use vm_memory::bitmap::Bitmap;
/// let layout: RamLayout = "low:1M,high:1M".parse()?;
/// let shared = Arc::new(DirtyBitmap::new(&layout)?);
/// let high = RegionBitmap::for_block(Arc::clone(&shared), &layout, 1)?;
/// high.mark_dirty(0x1ff0, 0x20); // straddles pages 1 and 2
/// assert!(high.dirty_at(0x1000) && high.dirty_at(0x2fff) && !high.dirty_at(0x3000));
/// assert!(shared.is_dirty(PageLocation::new(1, 2))?); // the shared bitmap sees it
/// high.mark_dirty(0xff000, 0x2000); // half past the end: cut and counted
/// assert_eq!(high.ignored_marks(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RegionBitmap {
    /// `None`: empty (no pages) or untracked (pages > 0).
    bitmap: Option<Arc<DirtyBitmap>>,
    block: u32,
    page_shift: u32,
    pages: u64,
    ignored: StatCounter,
}

impl RegionBitmap {
    /// Tracks into block `block` of `bitmap`, which must have been built for `layout`. The
    /// region this is given to must be the block's length (`pages * target page size`).
    pub fn for_block(
        bitmap: Arc<DirtyBitmap>,
        layout: &RamLayout,
        block: u32,
    ) -> Result<Self, RegionBitmapError> {
        bitmap
            .check_layout(layout)
            .map_err(RegionBitmapError::Layout)?;
        let pages = layout
            .block(block)
            .map_err(RegionBitmapError::Location)?
            .pages();
        Ok(Self {
            bitmap: Some(bitmap),
            block,
            page_shift: layout.target_page_shift(),
            pages,
            ignored: StatCounter::new(0),
        })
    }

    /// One [`RegionBitmap`] per block of `layout`, in block order (region *i* = block *i*).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use pagehint::{vmm::RegionBitmap, DirtyBitmap, RamLayout};
    /// let layout: RamLayout = "low:1M,high:1M".parse()?;
    /// let shared = Arc::new(DirtyBitmap::new(&layout)?);
    /// let bitmaps = RegionBitmap::for_layout(&shared, &layout)?;
    /// assert_eq!(bitmaps.iter().map(|b| b.block()).collect::<Vec<_>>(), [0, 1]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn for_layout(
        bitmap: &Arc<DirtyBitmap>,
        layout: &RamLayout,
    ) -> Result<Vec<Self>, RegionBitmapError> {
        (0..layout.blocks().len() as u32)
            .map(|b| Self::for_block(Arc::clone(bitmap), layout, b))
            .collect()
    }

    /// A private one-block bitmap of `len` bytes in pages of the host's page size (rounded
    /// up), as vm-memory's `AtomicBitmap::with_len`.
    fn standalone(len: usize) -> Self {
        let page = host_page_size();
        let shift = page.trailing_zeros();
        let pages = (len as u64).div_ceil(page);
        let bitmap = (pages > 0)
            .then(|| RamLayout::new(page, [BlockSpec::new("region", pages << shift, page)]).ok())
            .flatten()
            .and_then(|layout| DirtyBitmap::new(&layout).ok())
            .map(Arc::new);
        Self {
            bitmap,
            block: 0,
            page_shift: shift,
            pages,
            ignored: StatCounter::new(0),
        }
    }

    /// The shared bitmap (`None` for an empty or untracked region).
    pub fn dirty_bitmap(&self) -> Option<&Arc<DirtyBitmap>> {
        self.bitmap.as_ref()
    }
    /// The block of [`dirty_bitmap`](Self::dirty_bitmap) this region tracks into.
    pub fn block(&self) -> u32 {
        self.block
    }
    /// Target pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// Pages tracked, as vm-memory's `AtomicBitmap::len` (bits, one per page).
    pub fn len(&self) -> usize {
        self.pages as usize
    }
    /// Whether the region has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
    /// The region's page size in bytes (the layout's target page size; for a standalone
    /// bitmap the host's page size).
    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Takes the region's dirty pages and clears them, as vm-memory's
    /// `AtomicBitmap::get_and_reset`: one bit per page, 64 pages per word, word *i* bit *j* =
    /// page `64 * i + j` of the region. The caller now owns these pages (it must send them,
    /// or lose them), exactly as with [`DirtyBitmap::get_and_clear`], which this is over the
    /// whole block (so it may run while a scheduler drives the bitmap: each page goes to one
    /// of them). An untracked region reports every page dirty.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use pagehint::{vmm::RegionBitmap, DirtyBitmap, RamLayout};
    /// use vm_memory::bitmap::Bitmap;
    /// let layout: RamLayout = "low:1M,high:1M".parse()?;
    /// let region = RegionBitmap::for_block(Arc::new(DirtyBitmap::new(&layout)?), &layout, 1)?;
    /// region.mark_dirty(0x3000, 0x2000); // pages 3 and 4
    /// assert_eq!(region.get_and_reset(), [0b11000, 0, 0, 0]);
    /// assert_eq!(region.get_and_reset(), [0; 4]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "the dirty pages have left the bitmap: send them, or they are lost"]
    pub fn get_and_reset(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.pages.div_ceil(64) as usize];
        match &self.bitmap {
            // Cannot fail: the whole block of a bitmap checked to have it.
            Some(bitmap) => {
                let _ = bitmap.get_and_clear(self.block, 0, &mut words);
            }
            None => {
                for (i, w) in words.iter_mut().enumerate() {
                    *w = low_mask(self.pages - i as u64 * 64);
                }
            }
        }
        words
    }

    /// Clears the region's dirty pages, as vm-memory's `AtomicBitmap::reset`, but refuses
    /// while a [`PageScheduler`](crate::PageScheduler) drives the shared bitmap: those pages
    /// would never be sent. (vm-memory's `reset` returns nothing; this returns the refusal,
    /// and the pages discarded.)
    pub fn reset(&self) -> Result<u64, RegionBitmapError> {
        match &self.bitmap {
            Some(bitmap) if bitmap.is_driven() => {
                Err(RegionBitmapError::Driven { block: self.block })
            }
            Some(bitmap) => {
                let mut words = vec![0u64; self.pages.div_ceil(64) as usize];
                // Cannot fail: the whole block of a bitmap checked to have it.
                Ok(bitmap.get_and_clear(self.block, 0, &mut words).unwrap_or(0))
            }
            None => Ok(0),
        }
    }
    /// Whether marks are recorded (false only for a standalone bitmap that could not be
    /// built; such a region reports every page dirty).
    pub fn is_tracked(&self) -> bool {
        self.bitmap.is_some() || self.pages == 0
    }
    /// Marks that were cut at, or lay wholly past, the region's end (relaxed count).
    pub fn ignored_marks(&self) -> u64 {
        // Relaxed: statistics.
        self.ignored.load(Ordering::Relaxed)
    }

    fn ignore(&self) {
        bump(&self.ignored, 1);
    }
}

/// Another handle to the same block of the same shared bitmap: marks through either reach
/// the one bitmap the scheduler sends from. (vm-memory's `AtomicBitmap::clone` copies the
/// bits into an independent bitmap; a copy of one block of a migrating bitmap would track
/// writes nobody sends, so this shares instead. A standalone bitmap is shared likewise.)
/// The clone's [`ignored_marks`](RegionBitmap::ignored_marks) count starts from the
/// original's.
impl Clone for RegionBitmap {
    fn clone(&self) -> Self {
        Self {
            bitmap: self.bitmap.clone(),
            block: self.block,
            page_shift: self.page_shift,
            pages: self.pages,
            ignored: StatCounter::new(self.ignored_marks()),
        }
    }
}

/// The host's page size (`sysconf(_SC_PAGESIZE)`), as vm-memory's `AtomicBitmap::with_len`
/// uses it.
fn host_page_size() -> u64 {
    rustix::param::page_size() as u64
}

impl Default for RegionBitmap {
    /// An empty bitmap (a region of length 0), as vm-memory's default bitmaps are.
    fn default() -> Self {
        Self::standalone(0)
    }
}

impl fmt::Debug for RegionBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionBitmap")
            .field("block", &self.block)
            .field("pages", &self.pages)
            .field("tracked", &self.is_tracked())
            .field("ignored_marks", &self.ignored_marks())
            .finish()
    }
}

impl<'a> WithBitmapSlice<'a> for RegionBitmap {
    type S = RegionBitmapSlice<'a>;
}

impl Bitmap for RegionBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let Some(bitmap) = &self.bitmap else {
            self.ignore();
            return;
        };
        let first = (offset as u64) >> self.page_shift;
        let last = (offset as u64).saturating_add(len as u64 - 1) >> self.page_shift;
        if first >= self.pages {
            self.ignore();
            return;
        }
        if last >= self.pages {
            self.ignore();
        }
        let end = (last + 1).min(self.pages);
        // Cannot fail: `first < end <= pages` of a block the bitmap was checked to have.
        let _ = bitmap.mark_range(self.block, first, end - first);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = (offset as u64) >> self.page_shift;
        if page >= self.pages {
            return false;
        }
        match &self.bitmap {
            // In range, so the location is valid; an error cannot occur and reads as clean.
            Some(bitmap) => bitmap
                .is_dirty(crate::PageLocation::new(self.block, page))
                .unwrap_or(false),
            // Untracked: every page may be dirty.
            None => true,
        }
    }

    fn slice_at(&self, offset: usize) -> RegionBitmapSlice<'_> {
        RegionBitmapSlice {
            region: self,
            base: offset,
        }
    }
}

impl NewBitmap for RegionBitmap {
    /// A standalone bitmap for a region of `len` bytes (see the [module docs](self)).
    fn with_len(len: usize) -> Self {
        Self::standalone(len)
    }
}

/// A [`RegionBitmap`] seen from byte `base` of its region (vm-memory's `BitmapSlice`).
#[derive(Clone, Copy)]
pub struct RegionBitmapSlice<'a> {
    region: &'a RegionBitmap,
    base: usize,
}

impl RegionBitmapSlice<'_> {
    /// The region bitmap this is a slice of.
    pub fn region(&self) -> &RegionBitmap {
        self.region
    }
    /// The slice's first byte in the region.
    pub fn base(&self) -> usize {
        self.base
    }
}

impl fmt::Debug for RegionBitmapSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionBitmapSlice")
            .field("base", &self.base)
            .field("region", self.region)
            .finish()
    }
}

impl<'b> WithBitmapSlice<'b> for RegionBitmapSlice<'_> {
    type S = Self;
}

impl BitmapSlice for RegionBitmapSlice<'_> {}

impl Bitmap for RegionBitmapSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.region.mark_dirty(self.base.wrapping_add(offset), len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.region.dirty_at(self.base.wrapping_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        Self {
            region: self.region,
            base: self.base.wrapping_add(offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range_is_clean<B: Bitmap>(b: &B, start: usize, len: usize) -> bool {
        (start..start + len).all(|offset| !b.dirty_at(offset))
    }

    fn range_is_dirty<B: Bitmap>(b: &B, start: usize, len: usize) -> bool {
        (start..start + len).all(|offset| b.dirty_at(offset))
    }

    /// vm-memory's `test_bitmap`, for any `B: Bitmap` covering at least 0x800 bytes.
    fn check_bitmap<B: Bitmap>(b: &B) {
        let (len, dirty_offset, dirty_len) = (0x800, 0x400, 0x100);
        let s = b.slice_at(dirty_offset);
        assert!(range_is_clean(b, 0, len));
        assert!(range_is_clean(&s, 0, dirty_len));
        b.mark_dirty(dirty_offset, dirty_len);
        assert!(range_is_dirty(b, dirty_offset, dirty_len));
        assert!(range_is_dirty(&s, 0, dirty_len));
    }

    #[test]
    fn vm_memory_generic_bitmap_checks() {
        check_bitmap(&RegionBitmap::with_len(0x2000));
        check_bitmap(&RegionBitmap::with_len(0x2000).slice_at(0));
        let layout: RamLayout = "a:64K,b:64K".parse().unwrap();
        let shared = Arc::new(DirtyBitmap::new(&layout).unwrap());
        for b in RegionBitmap::for_layout(&shared, &layout).unwrap() {
            check_bitmap(&b);
        }
    }

    #[test]
    fn page_rounding_matches_atomic_bitmap() {
        // AtomicBitmap::new(1025, 128) has 9 pages; with 4 KiB pages: 0x1001 bytes, 2 pages.
        assert_eq!(RegionBitmap::with_len(0x1001).pages(), 2);
        assert_eq!(RegionBitmap::with_len(0x1000).pages(), 1);
        let b = RegionBitmap::with_len(0x8000);
        // set_addr_range(128, 129) in AtomicBitmap marks pages 1 and 2 (page size 128)
        b.mark_dirty(0x1000, 0x1001);
        assert!(!b.dirty_at(0) && b.dirty_at(0x1000) && b.dirty_at(0x2000));
        assert!(!b.dirty_at(0x3000));
        // len 0 marks nothing, and is not "ignored"
        b.mark_dirty(0x5000, 0);
        assert!(!b.dirty_at(0x5000));
        assert_eq!(b.ignored_marks(), 0);
    }

    #[test]
    fn out_of_range_is_cut_ignored_and_counted() {
        // AtomicBitmap's test_bitmap_out_of_range, in 4 KiB pages.
        let b = RegionBitmap::with_len(4 * 0x1000);
        b.mark_dirty(3 * 0x1000, 2 * 0x1000);
        assert!(b.dirty_at(3 * 0x1000));
        assert!(!b.dirty_at(4 * 0x1000));
        assert_eq!(b.ignored_marks(), 1);
        b.mark_dirty(9 * 0x1000, 1);
        b.mark_dirty(usize::MAX, 2); // saturates, lies past the end
        assert_eq!(b.ignored_marks(), 3);
        // slice offsets wrap as in vm-memory's BaseSlice: base usize::MAX + 2 is offset 1
        assert!(!b.dirty_at(0));
        b.slice_at(usize::MAX).mark_dirty(2, 1);
        assert!(b.dirty_at(0) && b.slice_at(usize::MAX).dirty_at(1));
        assert_eq!(b.ignored_marks(), 3);
    }

    #[test]
    fn empty_and_default_bitmaps_track_nothing() {
        let b = RegionBitmap::default();
        assert!(b.is_tracked());
        assert_eq!(b.pages(), 0);
        b.mark_dirty(0, 1);
        assert!(!b.dirty_at(0));
        assert_eq!(b.ignored_marks(), 1);
    }

    #[test]
    fn for_block_checks_layout_and_block() {
        let layout: RamLayout = "a:64K,b:64K".parse().unwrap();
        let shared = Arc::new(DirtyBitmap::new(&layout).unwrap());
        let other: RamLayout = "a:64K".parse().unwrap();
        assert!(matches!(
            RegionBitmap::for_block(Arc::clone(&shared), &other, 0),
            Err(RegionBitmapError::Layout(_))
        ));
        assert!(matches!(
            RegionBitmap::for_block(Arc::clone(&shared), &layout, 2),
            Err(RegionBitmapError::Location(_))
        ));
    }
}
