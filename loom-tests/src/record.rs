//! What the models check against: the pages each sender sent, and guest page contents.
//!
//! [`SentPages`] is bookkeeping, not part of the protocol under test, so it uses plain std
//! atomics that the checkers do not see (as `pagehint`'s statistics counters do): the explored
//! interleavings stay those of the protocol's own atomics. Under loom and shuttle the model
//! threads are coroutines run one at a time, so these counters are exact; on std threads their
//! read-modify-writes are atomic anyway.
//!
//! [`GuestPages`] is guest memory: a version number per watched target page, in
//! [`ContentWord`]s (loom's atomics under loom), so that loom checks
//! the bitmap's release/acquire contract: whoever collects a mark must see the page contents
//! written before it.

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use pagehint::{HostPage, PageLocation, PageScheduler, RamLayout};

use crate::sync::{ContentWord, Ordering};

/// How many times each target page of a layout was sent, and by which path last.
pub struct SentPages {
    layout: RamLayout,
    /// Per global page: sends so far (low 32 bits) and the last sender's id (high 32 bits).
    pages: Vec<StdAtomicU64>,
}

impl SentPages {
    /// No page sent yet.
    pub fn new(layout: &RamLayout) -> Self {
        Self {
            layout: layout.clone(),
            pages: (0..layout.total_pages())
                .map(|_| StdAtomicU64::new(0))
                .collect(),
        }
    }

    /// Records that sender `by` sent host page `hp`.
    ///
    /// Panics with "I2" if `hp` is not one whole, aligned host page of the layout, and with
    /// "I1" if any of its target pages was sent before.
    pub fn record(&self, hp: HostPage, by: u32) {
        let whole = self
            .layout
            .host_page_of(PageLocation::new(hp.block, hp.first_page))
            .is_ok_and(|h| h == hp);
        assert!(whole, "I2: sent {hp:?}, which is not one whole host page");
        for page in hp.page_range() {
            let loc = PageLocation::new(hp.block, page);
            let g = self.layout.global_index(loc).expect("checked above") as usize;
            // Relaxed: bookkeeping outside the checked protocol (see the module docs).
            let prev = self.pages[g].swap((u64::from(by) << 32) | 1, StdOrdering::Relaxed);
            assert_eq!(
                prev & 0xffff_ffff,
                0,
                "I1: {loc} sent twice (by sender {} and then by sender {by})",
                prev >> 32
            );
        }
    }

    /// Panics with "I1" unless every target page was sent exactly once.
    pub fn assert_each_sent_once(&self) {
        for (g, p) in self.pages.iter().enumerate() {
            // Relaxed: bookkeeping; read after every sender has been joined.
            let n = p.load(StdOrdering::Relaxed) & 0xffff_ffff;
            let loc = self.layout.location_of(g as u64).expect("in range");
            assert_eq!(n, 1, "I1: {loc} was sent {n} times, not once");
        }
    }
}

/// Panics with "I3" if a host page of `s` may still be claimed after `who` (say "scanner 1"
/// or "round 2") reported done.
pub(crate) fn assert_no_dirty_host_page(s: &PageScheduler, who: &str) {
    for block in 0..s.layout().blocks().len() as u32 {
        if let Some(page) = s.bitmap().find_next_dirty_host_page(block, 0).unwrap() {
            panic!(
                "I3: {who} reported done while the host page at {} is dirty",
                PageLocation::new(block, page)
            );
        }
    }
}

/// Guest memory: a version number for each *watched* target page (the pages a model writes;
/// the others never change), and the newest version the destination received for it.
pub struct GuestPages {
    watched: Vec<PageLocation>,
    source: Vec<ContentWord>,
    received: Vec<StdAtomicU64>,
}

impl GuestPages {
    /// The `watched` pages at version 0, already received at version 0.
    pub fn new(watched: impl IntoIterator<Item = PageLocation>) -> Self {
        let mut watched: Vec<PageLocation> = watched.into_iter().collect();
        watched.sort_unstable();
        watched.dedup();
        Self {
            source: watched.iter().map(|_| ContentWord::new(0)).collect(),
            received: watched.iter().map(|_| StdAtomicU64::new(0)).collect(),
            watched,
        }
    }

    fn index(&self, loc: PageLocation) -> usize {
        self.watched
            .binary_search(&loc)
            .unwrap_or_else(|_| panic!("model error: {loc} is not a watched page"))
    }

    /// The guest writes version `v` into page `loc` (do this *before* marking it dirty).
    pub fn write(&self, loc: PageLocation, v: u64) {
        // Relaxed: the bitmap's mark (release) and claim (acquire) must order this write
        // before the sender's read; that contract is what the models check.
        self.source[self.index(loc)].store(v, Ordering::Relaxed);
    }

    /// A sender sends host page `hp`: the destination keeps the newest version it receives.
    pub fn send(&self, hp: HostPage) {
        let first = self
            .watched
            .partition_point(|w| *w < PageLocation::new(hp.block, hp.first_page));
        for (i, loc) in self.watched.iter().enumerate().skip(first) {
            if !hp.contains(*loc) {
                break;
            }
            // Relaxed: ordered after the claim's acquire, as above.
            let v = self.source[i].load(Ordering::Relaxed);
            // Relaxed: bookkeeping outside the checked protocol.
            self.received[i].fetch_max(v, StdOrdering::Relaxed);
        }
    }

    /// Panics with "I7" unless the destination holds the newest version of every page.
    /// Call it once every writer and sender has been joined and the bitmap drained.
    pub fn assert_in_sync(&self) {
        for (i, loc) in self.watched.iter().enumerate() {
            // Relaxed: every thread has been joined; the join orders their writes before us.
            let s = self.source[i].load(Ordering::Relaxed);
            // Relaxed: bookkeeping, read after the joins.
            let r = self.received[i].load(StdOrdering::Relaxed);
            assert_eq!(
                s, r,
                "I7: the mark of {loc} was lost: the guest wrote version {s}, the destination has {r}"
            );
        }
    }
}
