//! KVM dirty tracking into a [`DirtyBitmap`]: per-slot dirty logs and dirty-ring batches.
//!
//! # Protocol
//! KVM reports dirty guest pages per *memory slot*, a guest-physical range backed by a range
//! of the VMM's memory. [`KvmSlots`] maps each slot to the pages of a RAM block it covers
//! (a whole block or part of one). Then:
//!
//! * **dirty log** (`KVM_GET_DIRTY_LOG`; kvm-ioctls' `VmFd::get_dirty_log` returns a
//!   `Vec<u64>` per slot): [`KvmSlots::merge_dirty_log`] ORs it into the slot's pages with one
//!   `fetch_or` per non-zero word ([`DirtyBitmap::merge_dirty_log_at`]);
//! * **dirty ring** (`KVM_CAP_DIRTY_LOG_RING`: `kvm_dirty_gfn { flags, slot, offset }`
//!   entries, `offset` in pages inside the slot): [`KvmSlots::import_dirty_ring`] marks a
//!   harvested batch, one masked `fetch_or` per run of consecutive pages.
//!
//! Both run concurrently with senders claiming pages: they only set bits, each with a
//! release RMW, and set summary bits after page bits, so a page marked after its claim is
//! claimable again (I7) and a claimer sees the page contents the mark published.
//!
//! # Bad input (I8)
//! A malformed log is refused whole, before anything is merged. A ring batch is imported
//! entry by entry: a bad entry (unknown slot, offset past the slot) is skipped, counted and
//! reported, and every valid entry of the batch is still marked, since refusing a harvested
//! batch would lose dirty pages. Counters are in [`KvmSlots::stats`].

use std::fmt;
use std::sync::atomic::Ordering;

use crate::bitmap::{DirtyBitmap, DirtyLogError};
use crate::layout::{LocationError, RamLayout};
use crate::stats::bump;
use crate::sync::StatCounter;

/// Where one KVM memory slot lies in the layout: `pages` target pages of block `block` from
/// page `first_page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotMapping {
    /// The KVM slot id as KVM reports it (for the dirty ring: `(address space << 16) | id`).
    pub slot: u32,
    /// The RAM block the slot maps.
    pub block: u32,
    /// The block page that the slot's first page is.
    pub first_page: u64,
    /// Pages in the slot.
    pub pages: u64,
}

impl SlotMapping {
    /// Words of the slot's dirty log (one bit per page).
    pub fn log_words(&self) -> usize {
        usize::try_from(self.pages.div_ceil(64)).unwrap_or(usize::MAX)
    }
    /// The slot's size in bytes for 4 KiB pages, as kvm-ioctls' `VmFd::get_dirty_log` takes
    /// it (KVM logs 4 KiB pages; the layout's target page must be 4 KiB to merge its logs).
    pub fn log_bytes(&self) -> usize {
        usize::try_from(self.pages.saturating_mul(4096)).unwrap_or(usize::MAX)
    }
}

/// Why [`KvmSlots::sync_dirty_log`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncError<E> {
    /// Fetching a slot's log failed.
    Get {
        /// The slot.
        slot: u32,
        /// The fetch's error.
        error: E,
    },
    /// A log did not fit its slot.
    Slot(SlotError),
}

impl<E: fmt::Display> fmt::Display for SyncError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Get { slot, error } => write!(f, "dirty log of KVM slot {slot}: {error}"),
            Self::Slot(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for SyncError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Get { error, .. } => Some(error),
            Self::Slot(e) => Some(e),
        }
    }
}

/// One harvested dirty-ring entry: page `offset` of slot `slot` (`kvm_dirty_gfn` without its
/// flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirtyRingEntry {
    /// The slot id, as in `kvm_dirty_gfn.slot`.
    pub slot: u32,
    /// The page inside the slot, as in `kvm_dirty_gfn.offset`.
    pub offset: u64,
}

impl DirtyRingEntry {
    /// An entry from its slot and page offset.
    pub const fn new(slot: u32, offset: u64) -> Self {
        Self { slot, offset }
    }
}

/// `(slot, offset)`, as a harvester that reads `kvm_dirty_gfn` itself yields them (the item
/// type of the dirty-ring iterator proposed for kvm-ioctls).
///
/// ```
/// use pagehint::vmm::DirtyRingEntry;
/// assert_eq!(DirtyRingEntry::from((1u32, 7u64)), DirtyRingEntry::new(1, 7));
/// ```
impl From<(u32, u64)> for DirtyRingEntry {
    fn from((slot, offset): (u32, u64)) -> Self {
        Self::new(slot, offset)
    }
}

/// A harvested `kvm_dirty_gfn` (feature `kvm`): its slot and offset; the flags are the
/// harvester's business (it must have seen `KVM_DIRTY_GFN_F_DIRTY` with acquire before
/// reading the entry, and hands it back with `KVM_DIRTY_GFN_F_RESET`).
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
impl From<&kvm_bindings::kvm_dirty_gfn> for DirtyRingEntry {
    fn from(gfn: &kvm_bindings::kvm_dirty_gfn) -> Self {
        Self::new(gfn.slot, gfn.offset)
    }
}

/// A harvested `kvm_dirty_gfn` by value (feature `kvm`); see the reference conversion.
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
impl From<kvm_bindings::kvm_dirty_gfn> for DirtyRingEntry {
    fn from(gfn: kvm_bindings::kvm_dirty_gfn) -> Self {
        Self::from(&gfn)
    }
}

/// Why a slot mapping, a dirty log or a ring entry was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotError {
    /// No mapping for this slot.
    UnknownSlot {
        /// The slot.
        slot: u32,
    },
    /// The slot is already mapped.
    Duplicate {
        /// The slot.
        slot: u32,
    },
    /// The mapping does not fit its block.
    Mapping(LocationError),
    /// A ring entry's page is past the slot's end.
    OffsetOutOfRange {
        /// The slot.
        slot: u32,
        /// The page offset given.
        offset: u64,
        /// Pages in the slot.
        pages: u64,
    },
    /// A dirty log does not fit the slot.
    Log {
        /// The slot.
        slot: u32,
        /// What was wrong with it.
        error: DirtyLogError,
    },
    /// Words to clear in KVM's log lie outside their block (feature `kvm`).
    ClearRange {
        /// The block.
        block: u32,
        /// The first word.
        from_word: usize,
        /// Words given.
        words: usize,
    },
    /// KVM refused a `KVM_CLEAR_DIRTY_LOG` of the slot (feature `kvm`): the OS error number.
    /// Nothing is lost: KVM keeps the pages' bits, and the next sync reports them again.
    Clear {
        /// The slot.
        slot: u32,
        /// The OS error (`errno`).
        errno: i32,
    },
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownSlot { slot } => write!(f, "KVM slot {slot} is not mapped to a RAM block"),
            Self::Duplicate { slot } => write!(f, "KVM slot {slot} is already mapped"),
            Self::Mapping(e) => write!(f, "KVM slot mapping refused: {e}"),
            Self::OffsetOutOfRange {
                slot,
                offset,
                pages,
            } => write!(
                f,
                "dirty-ring entry for page {offset} of KVM slot {slot}, which has {pages} pages"
            ),
            Self::Log { slot, error } => write!(f, "dirty log of KVM slot {slot} refused: {error}"),
            Self::ClearRange {
                block,
                from_word,
                words,
            } => write!(
                f,
                "words {from_word}..{} to clear are outside block {block}",
                from_word.saturating_add(*words)
            ),
            Self::Clear { slot, errno } => write!(
                f,
                "KVM_CLEAR_DIRTY_LOG of KVM slot {slot} failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for SlotError {}

/// What one [`KvmSlots::import_dirty_ring`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RingImport {
    /// Entries marked in the bitmap.
    pub marked: u64,
    /// Entries refused (skipped and counted).
    pub rejected: u64,
    /// The first refused entry's error, if any.
    pub first_error: Option<SlotError>,
}

/// Cumulative counters of a [`KvmSlots`] (relaxed; exact when quiescent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotStats {
    /// Dirty logs merged.
    pub logs_merged: u64,
    /// Pages those logs marked.
    pub log_pages: u64,
    /// Dirty logs refused.
    pub logs_rejected: u64,
    /// Dirty-ring entries marked.
    pub ring_entries: u64,
    /// Dirty-ring entries refused.
    pub ring_rejected: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls made (feature `kvm`).
    pub logs_cleared: u64,
    /// Pages those calls cleared and re-protected.
    pub cleared_pages: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls KVM refused.
    pub clears_failed: u64,
}

/// KVM memory slots mapped to RAM blocks, and the import of their dirty logs and rings.
///
/// Build it while setting up memory slots (`&mut self`), then share it by reference with the
/// dirty-log or ring-harvesting thread; importing takes `&self`.
///
/// ```
/// use pagehint::vmm::{DirtyRingEntry, KvmSlots, SlotMapping};
/// use pagehint::{DirtyBitmap, RamLayout};
/// let layout: RamLayout = "pc.ram:4M".parse()?; // 1024 pages
/// let bitmap = DirtyBitmap::new(&layout)?;
/// let mut slots = KvmSlots::new();
/// // below-4G and above-4G slots of one block (QEMU maps pc.ram this way)
/// slots.insert(&layout, SlotMapping { slot: 0, block: 0, first_page: 0, pages: 768 })?;
/// slots.insert(&layout, SlotMapping { slot: 1, block: 0, first_page: 768, pages: 256 })?;
///
/// // KVM_GET_DIRTY_LOG for slot 1: pages 0 and 65 of the slot
/// let mut log = vec![0u64; 4];
/// log[0] = 1;
/// log[1] = 0b10;
/// assert_eq!(slots.merge_dirty_log(&bitmap, 1, &log)?, 2);
/// assert!(bitmap.is_dirty(pagehint::PageLocation::new(0, 768 + 65))?);
///
/// // a dirty-ring batch: three consecutive pages of slot 0 and one bad entry
/// let batch = [(0, 10), (0, 11), (0, 12), (7, 0)].map(|(s, o)| DirtyRingEntry::new(s, o));
/// let report = slots.import_dirty_ring(&bitmap, batch);
/// assert_eq!((report.marked, report.rejected), (3, 1));
/// assert_eq!(bitmap.dirty_pages(), 5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Default)]
pub struct KvmSlots {
    /// Sorted by slot id.
    slots: Vec<SlotMapping>,
    logs_merged: StatCounter,
    log_pages: StatCounter,
    logs_rejected: StatCounter,
    ring_entries: StatCounter,
    ring_rejected: StatCounter,
    logs_cleared: StatCounter,
    cleared_pages: StatCounter,
    clears_failed: StatCounter,
}

impl KvmSlots {
    /// No slots.
    pub fn new() -> Self {
        Self::default()
    }

    /// One slot per region of `map`, numbered as the regions (slot *i* maps all of block *i*):
    /// the usual VMM setup, where each guest memory region is registered as KVM memory slot
    /// *i* at its GPA ([`GpaMap::block_range`](crate::vmm::GpaMap::block_range)).
    ///
    /// ```
    /// use pagehint::vmm::{GpaMap, KvmSlots, RegionSpec};
    /// let (_, map) = GpaMap::from_regions(4096, [RegionSpec::new(0, 1 << 20), RegionSpec::new(1 << 32, 2 << 20)])?;
    /// let slots = KvmSlots::from_gpa_map(&map);
    /// assert_eq!(slots.get(1)?.pages, 512);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_gpa_map(map: &crate::vmm::GpaMap) -> Self {
        let page = map.target_page_size();
        Self {
            slots: (0..map.blocks() as u32)
                .filter_map(|block| {
                    let r = map.block_range(block).ok()?;
                    Some(SlotMapping {
                        slot: block,
                        block,
                        first_page: 0,
                        pages: r.len / page,
                    })
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Maps a slot to pages of a block of `layout` (the layout the bitmap was built for).
    /// Several slots may map the same pages (memory aliases); a slot id is mapped once.
    pub fn insert(&mut self, layout: &RamLayout, mapping: SlotMapping) -> Result<(), SlotError> {
        layout
            .check_range(mapping.block, mapping.first_page, mapping.pages)
            .map_err(SlotError::Mapping)?;
        match self.slots.binary_search_by_key(&mapping.slot, |m| m.slot) {
            Ok(_) => Err(SlotError::Duplicate { slot: mapping.slot }),
            Err(at) => {
                self.slots.insert(at, mapping);
                Ok(())
            }
        }
    }

    /// Unmaps a slot (KVM slot deleted), returning its mapping.
    pub fn remove(&mut self, slot: u32) -> Option<SlotMapping> {
        let at = self.slots.binary_search_by_key(&slot, |m| m.slot).ok()?;
        Some(self.slots.remove(at))
    }

    /// The mapping of `slot`.
    pub fn get(&self, slot: u32) -> Result<&SlotMapping, SlotError> {
        self.slots
            .binary_search_by_key(&slot, |m| m.slot)
            .map(|at| &self.slots[at])
            .map_err(|_| SlotError::UnknownSlot { slot })
    }

    /// The mapped slots, by slot id.
    pub fn iter(&self) -> impl Iterator<Item = &SlotMapping> {
        self.slots.iter()
    }

    /// ORs the dirty log of `slot` (what `KVM_GET_DIRTY_LOG` returned: one bit per page of
    /// the slot, in whole `u64` words) into `bitmap`; returns the pages it marks. A log that
    /// does not fit the slot is refused whole and counted.
    pub fn merge_dirty_log(
        &self,
        bitmap: &DirtyBitmap,
        slot: u32,
        log: &[u64],
    ) -> Result<u64, SlotError> {
        let result = self.get(slot).and_then(|m| {
            bitmap
                .merge_dirty_log_at(m.block, m.first_page, m.pages, log)
                .map_err(|error| SlotError::Log { slot, error })
        });
        match result {
            Ok(pages) => {
                bump(&self.logs_merged, 1);
                bump(&self.log_pages, pages);
            }
            Err(_) => {
                bump(&self.logs_rejected, 1);
            }
        }
        result
    }

    /// One dirty-log sync: `get(mapping)` fetches each slot's log (kvm-ioctls:
    /// `|m| vm.get_dirty_log(m.slot, m.log_bytes())`), which is merged into `bitmap` as
    /// [`merge_dirty_log`](Self::merge_dirty_log) does. Returns the pages the logs mark.
    /// Stops at the first error: a failed fetch, or a log that does not fit its slot.
    ///
    /// ```
    /// use pagehint::vmm::{GpaMap, KvmSlots, RegionSpec};
    /// let (layout, map) = GpaMap::from_regions(4096, [RegionSpec::new(0, 1 << 20)])?;
    /// let bitmap = pagehint::DirtyBitmap::new(&layout)?;
    /// let slots = KvmSlots::from_gpa_map(&map);
    /// // stands in for KVM_GET_DIRTY_LOG: pages 0 and 2 of slot 0
    /// let n = slots.sync_dirty_log(&bitmap, |m| Ok::<_, std::io::Error>(vec![0b101; m.log_words()]))?;
    /// assert_eq!(n, 8);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn sync_dirty_log<E>(
        &self,
        bitmap: &DirtyBitmap,
        mut get: impl FnMut(&SlotMapping) -> Result<Vec<u64>, E>,
    ) -> Result<u64, SyncError<E>> {
        let mut pages = 0;
        for m in &self.slots {
            let log = get(m).map_err(|error| SyncError::Get {
                slot: m.slot,
                error,
            })?;
            pages += self
                .merge_dirty_log(bitmap, m.slot, &log)
                .map_err(SyncError::Slot)?;
        }
        Ok(pages)
    }

    /// Marks a harvested dirty-ring batch in `bitmap`. Runs of consecutive pages of one slot
    /// become one range mark (one masked `fetch_or` per bitmap word). Bad entries are skipped,
    /// counted and reported; every valid entry is marked.
    pub fn import_dirty_ring(
        &self,
        bitmap: &DirtyBitmap,
        entries: impl IntoIterator<Item = DirtyRingEntry>,
    ) -> RingImport {
        let mut report = RingImport::default();
        // The slot of the previous entry (entries come in runs of one slot).
        let mut cached: Option<SlotMapping> = None;
        // The pending run: block, first block page, pages.
        let mut run: Option<(u32, u64, u64)> = None;
        let flush = |run: &mut Option<(u32, u64, u64)>, report: &mut RingImport| {
            if let Some((block, first, count)) = run.take() {
                match bitmap.mark_range(block, first, count) {
                    Ok(()) => report.marked += count,
                    // Only if the bitmap was not built for the slots' layout.
                    Err(e) => {
                        report.rejected += count;
                        report.first_error.get_or_insert(SlotError::Mapping(e));
                    }
                }
            }
        };
        for e in entries {
            let m = match cached {
                Some(m) if m.slot == e.slot => m,
                _ => match self.get(e.slot) {
                    Ok(m) => *cached.insert(*m),
                    Err(err) => {
                        report.rejected += 1;
                        report.first_error.get_or_insert(err);
                        continue;
                    }
                },
            };
            if e.offset >= m.pages {
                report.rejected += 1;
                report
                    .first_error
                    .get_or_insert(SlotError::OffsetOutOfRange {
                        slot: e.slot,
                        offset: e.offset,
                        pages: m.pages,
                    });
                continue;
            }
            let page = m.first_page + e.offset;
            match &mut run {
                Some((block, first, count)) if *block == m.block && *first + *count == page => {
                    *count += 1;
                }
                _ => {
                    flush(&mut run, &mut report);
                    run = Some((m.block, page, 1));
                }
            }
        }
        flush(&mut run, &mut report);
        bump(&self.ring_entries, report.marked);
        bump(&self.ring_rejected, report.rejected);
        report
    }

    /// Manual dirty-log clearing (feature `kvm`, after
    /// [`enable_manual_protect`](crate::vmm::kvm_log::enable_manual_protect)): clears in KVM's
    /// log, and write-protects again, exactly the pages set in `words` — dirty words of block
    /// `block` from word `from_word`, as a drain just took them from the bitmap
    /// ([`DirtyBitmap::get_and_clear`], [`Drain::on_chunk`](crate::vmm::Drain::on_chunk)) —
    /// in every slot that maps them, with one `KVM_CLEAR_DIRTY_LOG` per slot touched (KVM's
    /// alignment rules are met: the range is widened to whole words of the slot, with no extra
    /// bit set). Call it *before* reading the pages to send them: a guest write after the
    /// clear is logged again (I7). Returns the pages cleared.
    ///
    /// A refused clear is counted and returned as [`SlotError::Clear`] after the other slots
    /// were cleared; it loses nothing (the pages stay dirty in KVM's log and are sent again
    /// after the next sync).
    #[cfg(feature = "kvm")]
    #[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
    pub fn clear_dirty_log(
        &self,
        vm: &impl std::os::fd::AsRawFd,
        block: u32,
        from_word: usize,
        words: &[u64],
    ) -> Result<u64, SlotError> {
        let range = SlotError::ClearRange {
            block,
            from_word,
            words: words.len(),
        };
        // The block pages the words cover.
        let lo = (from_word as u64).checked_mul(64).ok_or(range)?;
        let hi = (words.len() as u64)
            .checked_mul(64)
            .and_then(|n| lo.checked_add(n))
            .ok_or(range)?;
        let mut cleared = 0;
        let mut first_error = None;
        let mut mask = Vec::new();
        for m in self.slots.iter().filter(|m| m.block == block) {
            // The slot's pages inside the words, slot-relative, widened to whole slot words
            // (KVM wants `first_page` a multiple of 64, and whole words unless at the end).
            let (start, end) = (lo.max(m.first_page), hi.min(m.first_page + m.pages));
            if start >= end {
                continue;
            }
            let first = (start - m.first_page) & !63;
            let last = (end - m.first_page).div_ceil(64) * 64;
            let pages = last.min(m.pages) - first;
            mask.clear();
            mask.resize(pages.div_ceil(64) as usize, 0u64);
            let mut n = 0;
            // The set bits of the words that fall in the slot.
            let (w0, w1) = (
                ((start - lo) / 64) as usize,
                ((end - lo).div_ceil(64)) as usize,
            );
            for (wi, &w) in words.iter().enumerate().take(w1).skip(w0) {
                let mut bits = w;
                while bits != 0 {
                    let page = lo + wi as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if (start..end).contains(&page) {
                        let i = page - m.first_page - first;
                        mask[(i / 64) as usize] |= 1 << (i % 64);
                        n += 1;
                    }
                }
            }
            if n == 0 {
                continue;
            }
            // At most 63 pages more than the words given: past u32 only for a clear of over
            // 2^26 words at once, which `clear_dirty_log` then refuses (EINVAL), like KVM.
            let pages = u32::try_from(pages).unwrap_or(u32::MAX);
            match crate::vmm::kvm_log::clear_dirty_log(vm, m.slot, first, pages, &mask) {
                Ok(()) => {
                    cleared += n;
                    bump(&self.logs_cleared, 1);
                    bump(&self.cleared_pages, n);
                }
                Err(e) => {
                    bump(&self.clears_failed, 1);
                    first_error.get_or_insert(SlotError::Clear {
                        slot: m.slot,
                        errno: e.raw_os_error().unwrap_or(0),
                    });
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(cleared),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SlotStats {
        // Relaxed: statistics, exact only when quiescent.
        let get = |c: &StatCounter| c.load(Ordering::Relaxed);
        SlotStats {
            logs_merged: get(&self.logs_merged),
            log_pages: get(&self.log_pages),
            logs_rejected: get(&self.logs_rejected),
            ring_entries: get(&self.ring_entries),
            ring_rejected: get(&self.ring_rejected),
            logs_cleared: get(&self.logs_cleared),
            cleared_pages: get(&self.cleared_pages),
            clears_failed: get(&self.clears_failed),
        }
    }
}

impl fmt::Debug for KvmSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmSlots")
            .field("slots", &self.slots)
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{BlockSpec, PageLocation};

    fn layout() -> RamLayout {
        RamLayout::new(
            4096,
            [
                BlockSpec::new("small", 300 * 4096, 4096),
                BlockSpec::new("huge", 8 << 20, 2 << 20),
            ],
        )
        .unwrap()
    }

    fn slots(l: &RamLayout) -> KvmSlots {
        let mut s = KvmSlots::new();
        for (slot, block, first_page, pages) in
            [(3, 0, 0, 100), (1, 0, 100, 200), (9, 1, 700, 1000)]
        {
            s.insert(
                l,
                SlotMapping {
                    slot,
                    block,
                    first_page,
                    pages,
                },
            )
            .unwrap();
        }
        s
    }

    #[test]
    fn mappings_are_checked() {
        let l = layout();
        let mut s = slots(&l);
        let m = |slot, block, first_page, pages| SlotMapping {
            slot,
            block,
            first_page,
            pages,
        };
        assert_eq!(
            s.insert(&l, m(3, 0, 0, 1)),
            Err(SlotError::Duplicate { slot: 3 })
        );
        assert!(matches!(
            s.insert(&l, m(4, 0, 250, 51)),
            Err(SlotError::Mapping(_))
        ));
        assert!(matches!(
            s.insert(&l, m(4, 2, 0, 1)),
            Err(SlotError::Mapping(_))
        ));
        assert!(matches!(
            s.insert(&l, m(4, 0, 0, 0)),
            Err(SlotError::Mapping(_))
        ));
        assert_eq!(s.get(1).unwrap().first_page, 100);
        assert_eq!(s.iter().map(|m| m.slot).collect::<Vec<_>>(), vec![1, 3, 9]);
        assert_eq!(s.remove(3).map(|m| m.pages), Some(100));
        assert_eq!(s.get(3), Err(SlotError::UnknownSlot { slot: 3 }));
    }

    #[test]
    fn unaligned_slot_logs_land_on_the_right_pages() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        let s = slots(&l);
        // slot 1: pages 100..300 of block 0 (not word aligned), 200 pages = 4 words
        let mut log = vec![0u64; 4];
        log[0] = 1 | 1 << 63; // slot pages 0 and 63
        log[3] = 1 << 7; // slot page 199, the last
        assert_eq!(s.merge_dirty_log(&bm, 1, &log).unwrap(), 3);
        let dirty: Vec<u64> = (0..300)
            .filter(|&p| bm.is_dirty(PageLocation::new(0, p)).unwrap())
            .collect();
        assert_eq!(dirty, vec![100, 163, 299]);
        // slot 9: pages 700..1700 of the 2 MiB block; page 1000 is in host page 1
        let mut log = vec![0u64; 16];
        log[300 / 64] = 1 << (300 % 64);
        assert_eq!(s.merge_dirty_log(&bm, 9, &log).unwrap(), 1);
        assert_eq!(bm.find_next_dirty_host_page(1, 0).unwrap(), Some(512));
        let c = bm
            .claim_host_page(PageLocation::new(1, 512))
            .unwrap()
            .into_claim()
            .unwrap();
        assert_eq!(c.dirty_pages(), 1);
        let st = s.stats();
        assert_eq!((st.logs_merged, st.log_pages, st.logs_rejected), (2, 4, 0));
    }

    #[test]
    fn bad_logs_are_refused_whole_and_counted() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        let s = slots(&l);
        assert_eq!(
            s.merge_dirty_log(&bm, 5, &[0]),
            Err(SlotError::UnknownSlot { slot: 5 })
        );
        assert!(matches!(
            s.merge_dirty_log(&bm, 1, &[1, 0, 0]),
            Err(SlotError::Log {
                slot: 1,
                error: DirtyLogError::WrongLength { .. }
            })
        ));
        // 200 pages: bits 8.. of the last word are past the slot
        assert!(matches!(
            s.merge_dirty_log(&bm, 1, &[1, 0, 0, 1 << 8]),
            Err(SlotError::Log {
                slot: 1,
                error: DirtyLogError::BitsPastEnd { .. }
            })
        ));
        assert_eq!(bm.dirty_pages(), 0, "refused logs change nothing");
        assert_eq!(s.stats().logs_rejected, 3);
    }

    #[test]
    fn ring_batches_mark_valid_entries_and_count_bad_ones() {
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        let s = slots(&l);
        let batch = [
            (3, 5),
            (3, 6),
            (3, 7),
            (1, 0),
            (42, 1),
            (3, 100),
            (9, 999),
            (3, 8),
        ]
        .map(|(slot, offset)| DirtyRingEntry::new(slot, offset));
        let r = s.import_dirty_ring(&bm, batch);
        assert_eq!(r.marked, 6);
        assert_eq!(r.rejected, 2);
        assert_eq!(r.first_error, Some(SlotError::UnknownSlot { slot: 42 }));
        let dirty: Vec<u64> = (0..300)
            .filter(|&p| bm.is_dirty(PageLocation::new(0, p)).unwrap())
            .collect();
        assert_eq!(dirty, vec![5, 6, 7, 8, 100]);
        assert!(bm.is_dirty(PageLocation::new(1, 1699)).unwrap());
        assert_eq!(bm.find_next_dirty_host_page(1, 0).unwrap(), Some(1536));
        let st = s.stats();
        assert_eq!((st.ring_entries, st.ring_rejected), (6, 2));
        assert_eq!(s.import_dirty_ring(&bm, []), RingImport::default());
    }

    #[test]
    fn ring_import_is_not_lost_under_concurrent_claims() {
        // I7: a page re-dirtied through the ring after a claim is claimable again.
        let l = layout();
        let bm = DirtyBitmap::new(&l).unwrap();
        let s = slots(&l);
        let loc = PageLocation::new(1, 700);
        for _ in 0..3 {
            s.import_dirty_ring(&bm, [DirtyRingEntry::new(9, 0)]);
            assert_eq!(
                bm.claim_host_page(loc)
                    .unwrap()
                    .into_claim()
                    .unwrap()
                    .dirty_pages(),
                1
            );
        }
        assert!(bm.claim_host_page(loc).unwrap().into_claim().is_none());
    }
}
