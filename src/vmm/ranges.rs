//! What a VMM sends, as guest-physical ranges: a precopy drain of the bitmap ([`Drain`]), a
//! claim ([`ClaimRanges`]), and the urgent path for a faulting address ([`UrgentRanges`]).
//!
//! # Protocol
//! * **drain**: one pass over every block in address order, in chunks of whole host pages
//!   (at least 64 words): each chunk is taken with
//!   [`DirtyBitmap::get_and_clear`](crate::DirtyBitmap::get_and_clear) (each dirty page to this
//!   drain alone: I1; host pages whole: I2), handed to the chunk hook if there is one (KVM's
//!   manual clearing: `KvmSlots::clear_dirty_log`, feature `kvm`,
//!   which must come before the pages are read), then yielded as coalesced ranges. A page
//!   marked after its chunk was taken stays dirty for the next pass (I7).
//! * **claim**: a claim's host pages, consecutive ones coalesced.
//! * **urgent**: [`PageScheduler::serve_range`] for the request, each won claim's hint offered
//!   ([`PageScheduler::urgent_sent`]) as soon as it is won — before its pages are sent, which
//!   only makes the background path move sooner (hints are advisory: I6) — and its ranges
//!   yielded.
//!
//! # Invariants
//! A range lies inside one block; every page a drain or a claim took is yielded exactly once,
//! or, if the iterator is dropped first, marked dirty again (never lost: a drain's chunk is
//! taken whole before any of it is yielded; a claim's ranges are computed from the claim).

use std::collections::VecDeque;
use std::fmt;

use crate::bitmap::{Claim, DirtyBitmap};
use crate::request::{RequestError, UrgentRequest};
use crate::scheduler::{PageScheduler, ServeRange, Served};
use crate::vmm::gpa::{GpaError, GpaMap, GpaRange};

/// Words a drain takes at a time (more for host pages wider than this).
const CHUNK_WORDS: usize = 64;

/// The chunk hook's type: `(block, from_word, words)` of each chunk taken.
type ChunkHook<'a> = Box<dyn FnMut(u32, usize, &[u64]) + 'a>;

/// A precopy drain as GPA ranges ([`GpaMap::drain`]): one pass over the bitmap.
#[must_use = "a drain takes pages out of the bitmap as it is advanced: send every range it yields"]
pub struct Drain<'a> {
    map: &'a GpaMap,
    bitmap: &'a DirtyBitmap,
    block: u32,
    /// The next word of `block` to take.
    word: usize,
    buf: Vec<u64>,
    /// Ranges taken and not yet yielded.
    pending: VecDeque<GpaRange>,
    hook: Option<ChunkHook<'a>>,
    /// Pages taken so far.
    pages: u64,
}

impl<'a> Drain<'a> {
    fn new(map: &'a GpaMap, bitmap: &'a DirtyBitmap) -> Self {
        Self {
            map,
            bitmap,
            block: 0,
            word: 0,
            buf: Vec::new(),
            pending: VecDeque::new(),
            hook: None,
            pages: 0,
        }
    }

    /// Calls `hook(block, from_word, words)` with each chunk of dirty words the drain takes,
    /// before yielding its ranges: for KVM's manual dirty-log clearing,
    /// `|b, w, words| { let _ = slots.clear_dirty_log(&vm, b, w, words); }` (a failed clear
    /// loses nothing: see `KvmSlots::clear_dirty_log`, feature `kvm`).
    pub fn on_chunk(mut self, hook: impl FnMut(u32, usize, &[u64]) + 'a) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// KVM's manual dirty-log clearing (feature `kvm`): each chunk the drain takes is cleared
    /// in KVM's log with [`KvmSlots::clear_dirty_log`](crate::vmm::KvmSlots::clear_dirty_log)
    /// before its ranges are yielded (so before the pages are read). Clears KVM refuses are
    /// counted in the slots' [`stats`](crate::vmm::KvmSlots::stats) (`clears_failed`) and lose
    /// nothing (the pages stay in KVM's log and come back at the next sync).
    #[cfg(feature = "kvm")]
    #[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
    pub fn clear_kvm_log(
        self,
        slots: &'a crate::vmm::KvmSlots,
        vm: &'a impl std::os::fd::AsRawFd,
    ) -> Self {
        self.on_chunk(move |block, from_word, words| {
            // Counted in the slots' statistics; nothing to do here (see above).
            let _ = slots.clear_dirty_log(vm, block, from_word, words);
        })
    }

    /// Target pages taken from the bitmap so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Takes the next chunk with dirty pages; false at the end of the pass.
    fn take_chunk(&mut self) -> bool {
        loop {
            if self.block as usize >= self.map.blocks() {
                return false;
            }
            // Cannot fail: the map and the bitmap were built for one layout (checked by
            // `GpaMap::drain`), so the block exists.
            let words = self.bitmap.block_words(self.block).unwrap_or(0);
            if self.word >= words {
                self.block += 1;
                self.word = 0;
                continue;
            }
            // Whole host pages: a multiple of the words per host page.
            let per_host = self.map.host_page_words(self.block);
            let chunk = CHUNK_WORDS.div_ceil(per_host) * per_host;
            let n = chunk.min(words - self.word);
            self.buf.clear();
            self.buf.resize(n, 0);
            let from = self.word;
            self.word += n;
            // Cannot fail: `from + n <= words`.
            let got = self
                .bitmap
                .get_and_clear(self.block, from, &mut self.buf)
                .unwrap_or(0);
            if got == 0 {
                continue;
            }
            self.pages += got;
            if let Some(hook) = &mut self.hook {
                hook(self.block, from, &self.buf);
            }
            // Cannot fail: words taken from the block by the bitmap, which never sets bits
            // past a block's end.
            if let Ok(ranges) = self.map.dirty_ranges(self.block, from, &self.buf) {
                self.pending.extend(ranges);
            }
            return true;
        }
    }
}

impl Iterator for Drain<'_> {
    type Item = GpaRange;

    fn next(&mut self) -> Option<GpaRange> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some(r);
            }
            if !self.take_chunk() {
                return None;
            }
        }
    }
}

impl std::iter::FusedIterator for Drain<'_> {}

impl Drop for Drain<'_> {
    /// Marks the pages taken but not yielded dirty again: they are sent by a later pass.
    fn drop(&mut self) {
        for r in self.pending.drain(..) {
            if let Ok(loc) = self.map.location(r.gpa) {
                let pages = r.len / self.map.target_page_size();
                // Cannot fail: a range of the block, from the bitmap's own words.
                let _ = self.bitmap.mark_range(loc.block, loc.page, pages);
            }
        }
    }
}

impl fmt::Debug for Drain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("block", &self.block)
            .field("word", &self.word)
            .field("pending", &self.pending.len())
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

/// A claim's host pages as GPA ranges, consecutive host pages coalesced
/// ([`GpaMap::claim_ranges`]).
#[derive(Clone, Debug)]
pub struct ClaimRanges {
    /// GPA of the claim's first page slot (`first_page` of the claim).
    base: u64,
    /// Bytes per host page.
    host_bytes: u64,
    /// Host pages not yet yielded.
    mask: u64,
}

impl Iterator for ClaimRanges {
    type Item = GpaRange;

    fn next(&mut self) -> Option<GpaRange> {
        if self.mask == 0 {
            return None;
        }
        let first = u64::from(self.mask.trailing_zeros());
        let run = u64::from((self.mask >> first).trailing_ones());
        self.mask &= !(crate::bitmap::low_mask(run) << first);
        Some(GpaRange {
            gpa: self.base + first * self.host_bytes,
            len: run * self.host_bytes,
        })
    }
}

impl std::iter::FusedIterator for ClaimRanges {}

/// The urgent path for a request, as GPA ranges to send ([`GpaMap::serve_urgent`]).
#[must_use = "the request is served as the iterator is advanced: send every range it yields"]
pub struct UrgentRanges<'a> {
    map: &'a GpaMap,
    sched: &'a PageScheduler,
    served: ServeRange<'a>,
    current: Option<ClaimRanges>,
    already_claimed: u64,
    queued: u64,
}

impl UrgentRanges<'_> {
    /// Host pages of the request found already claimed (on their way, or sent) so far.
    pub fn already_claimed(&self) -> u64 {
        self.already_claimed
    }
    /// Host pages queued for the background path so far (vanilla mode).
    pub fn queued(&self) -> u64 {
        self.queued
    }
}

impl Iterator for UrgentRanges<'_> {
    type Item = GpaRange;

    fn next(&mut self) -> Option<GpaRange> {
        loop {
            if let Some(r) = self.current.as_mut().and_then(Iterator::next) {
                return Some(r);
            }
            match self.served.next()? {
                Served::Send(claim) => {
                    self.sched.urgent_sent(&claim);
                    self.current = Some(self.map.claim_ranges(claim));
                }
                Served::AlreadyClaimed(_) => self.already_claimed += 1,
                Served::Queued(_) => self.queued += 1,
            }
        }
    }
}

impl Drop for UrgentRanges<'_> {
    /// Marks the pages of a claim not yet yielded dirty again (the background path sends
    /// them). Host pages of the request not reached are still dirty and not claimed.
    fn drop(&mut self) {
        if let Some(rest) = self.current.take() {
            for r in rest {
                if let Ok(loc) = self.map.location(r.gpa) {
                    let pages = r.len / self.map.target_page_size();
                    // Cannot fail: whole host pages of a claim.
                    let _ = self.sched.bitmap().mark_range(loc.block, loc.page, pages);
                }
            }
        }
    }
}

impl fmt::Debug for UrgentRanges<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UrgentRanges")
            .field("served", &self.served)
            .field("already_claimed", &self.already_claimed)
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl GpaMap {
    /// A precopy drain of `bitmap` (built for this map's layout) as GPA ranges: one pass over
    /// every block; see the [module docs](self). Each range's pages have left the bitmap and
    /// must be sent (a drain dropped early marks what it had taken but not yielded dirty
    /// again).
    ///
    /// ```
    /// use pagehint::{vmm::{GpaMap, GpaRange, RegionSpec}, DirtyBitmap};
    /// let (layout, map) = GpaMap::from_regions(4096, [RegionSpec::new(0, 1 << 20), RegionSpec::new(1 << 32, 1 << 20)])?;
    /// let bitmap = DirtyBitmap::new(&layout)?;
    /// bitmap.mark_range(1, 10, 3)?;
    /// let sent: Vec<GpaRange> = map.drain(&bitmap)?.collect();
    /// assert_eq!(sent, [GpaRange { gpa: (1 << 32) + 10 * 4096, len: 3 * 4096 }]);
    /// assert_eq!(bitmap.dirty_count(), 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// A bitmap built for another layout is refused ([`GpaError::Bitmap`]) before anything is
    /// taken.
    pub fn drain<'a>(&'a self, bitmap: &'a DirtyBitmap) -> Result<Drain<'a>, GpaError> {
        if !self.fits(bitmap) {
            return Err(GpaError::Bitmap);
        }
        Ok(Drain::new(self, bitmap))
    }

    /// The host pages of `claim` as GPA ranges, consecutive ones coalesced. A claim of a
    /// block this map does not have yields nothing.
    pub fn claim_ranges(&self, claim: Claim) -> ClaimRanges {
        let shift = self.target_page_size().trailing_zeros();
        match self.block_range(claim.block()) {
            Ok(block) => ClaimRanges {
                base: block.gpa + (claim.first_page() << shift),
                host_bytes: claim.host_page_pages() << shift,
                mask: claim.host_mask(),
            },
            Err(_) => ClaimRanges {
                base: 0,
                host_bytes: 0,
                mask: 0,
            },
        }
    }

    /// The host pages of a sequence of claims as GPA ranges: a background sender's loop is
    /// `map.ranges(sched.background())` (or one of `sched.background_scanners(n)` per thread).
    ///
    /// ```
    /// use pagehint::{vmm::{GpaMap, RegionSpec}, PageScheduler, SchedulerConfig};
    /// let (layout, map) = GpaMap::from_regions(4096, [RegionSpec::new(0, 1 << 20), RegionSpec::new(1 << 32, 1 << 20)])?;
    /// let sched = PageScheduler::new(layout, SchedulerConfig::default())?;
    /// sched.bitmap().mark_all();
    /// let bytes: u64 = map.ranges(sched.background()).map(|r| r.len).sum();
    /// assert_eq!(bytes, 2 << 20); // every page, once
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn ranges<'a, I>(&'a self, claims: I) -> impl Iterator<Item = GpaRange> + 'a
    where
        I: IntoIterator<Item = Claim>,
        I::IntoIter: 'a,
    {
        claims.into_iter().flat_map(move |c| self.claim_ranges(c))
    }

    /// The urgent path, in GPA terms: serves every host page of `req`
    /// ([`PageScheduler::serve_range`]; build `req` with [`request`](Self::request) or
    /// `request_at`) and yields the GPA ranges to send on the urgent channel, offering each
    /// claim's hint as it is won. Host pages already claimed by the background path, or queued
    /// (vanilla), yield nothing and are counted. Refused like `serve_range`.
    ///
    /// ```
    /// use pagehint::{vmm::{GpaMap, GpaRange, RegionSpec}, DirtyBitmap, PageScheduler, SchedulerConfig};
    /// let (layout, map) = GpaMap::from_regions(4096, [RegionSpec::new(1 << 32, 1 << 20)])?;
    /// let sched = PageScheduler::new(layout, SchedulerConfig::preempt_hint())?;
    /// sched.bitmap().mark_all();
    /// let urgent: Vec<GpaRange> = map.serve_urgent(&sched, map.request((1 << 32) + 0x3000, 8192)?)?.collect();
    /// assert_eq!(urgent, [GpaRange { gpa: (1 << 32) + 0x3000, len: 8192 }]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn serve_urgent<'a>(
        &'a self,
        sched: &'a PageScheduler,
        req: UrgentRequest,
    ) -> Result<UrgentRanges<'a>, RequestError> {
        Ok(UrgentRanges {
            map: self,
            sched,
            served: sched.serve_range(req)?,
            current: None,
            already_claimed: 0,
            queued: 0,
        })
    }
}
