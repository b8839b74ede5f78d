//! Dirty bitmap models (design I1, I2, I7): the trait they are generic over, its real
//! implementations, and the models.
//!
//! * [`i1_two_claimers_one_page`]: two threads claim one dirty target page: exactly one wins,
//!   and a neighbouring dirty page in the same word is left alone.
//! * [`i1_i2_two_claimers_one_host_page`]: two threads claim one host page through different
//!   target pages of it (narrow: inside one word; wide: across words, through the summary
//!   election): exactly one wins, it collects every dirty page of the host page (no split), and
//!   other host pages are left alone.
//! * [`i7_mark_races_claim`]: a guest writes a page and marks it dirty (page, range or dirty
//!   log) while a sender claims a host page; then the bitmap is drained. Nothing is lost: the
//!   destination ends with the newest contents of every page (so whoever collected a mark saw
//!   the contents written before it: the release/acquire contract), and no set bit is left
//!   unclaimable.
//! * [`i1_i2_drain_and_claim_one_owner`]: a precopy consumer's `get_and_clear` over a wide
//!   host page races a host-page claim of it: exactly one gets it, whole (the drain takes a
//!   wholly covered wide host page through its summary bit, like a claim).
//! * [`i7_mark_races_drain`]: a guest writes a page and KVM reports it (a dirty log merged at
//!   a slot's page offset, or a dirty-ring entry, i.e. a range mark) while a consumer drains
//!   the block; a host-page sweep then collects what is left. The mark is collected exactly
//!   once, and its collector sees the contents written before it.

use pagehint::{DirtyBitmap, HostPage, PageLocation, PageScheduler, RamLayout, SchedulerConfig};

use crate::record::GuestPages;
use crate::sync::{thread, Arc};

/// What one host-page claim took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The host page, to be sent whole.
    pub host_page: HostPage,
    /// Dirty target pages the claim cleared.
    pub dirty: u64,
}

/// The bitmap under test: the real [`DirtyBitmap`] (or a [`PageScheduler`], whose sender
/// round is the real background scanner), or a mutant.
pub trait ModelBitmap: Send + Sync + 'static {
    /// A clean bitmap for `layout`.
    fn new(layout: &RamLayout) -> Self;
    /// Marks one target page dirty.
    fn mark_dirty(&self, loc: PageLocation);
    /// Marks a range of target pages dirty.
    fn mark_range(&self, block: u32, first: u64, count: u64);
    /// Merges a KVM-style dirty log for `block`.
    fn merge_dirty_log(&self, block: u32, log: &[u64]);
    /// Merges a dirty log covering `pages` pages of `block` from `first`.
    fn merge_dirty_log_at(&self, block: u32, first: u64, pages: u64, log: &[u64]);
    /// Claims one target page; whether it was dirty.
    fn claim_page(&self, loc: PageLocation) -> bool;
    /// Claims the host page containing `loc`.
    fn claim_host_page(&self, loc: PageLocation) -> Option<Taken>;
    /// Hands over and clears the dirty words `from_word .. from_word + out.len()` of `block`
    /// (`DirtyBitmap::get_and_clear`, the precopy drain).
    fn get_and_clear(&self, block: u32, from_word: usize, out: &mut [u64]);
    /// The first host page at or after `from`'s that may be dirty.
    fn find_next_dirty_host_page(&self, block: u32, from: u64) -> Option<u64>;
    /// Dirty target pages (exact when quiescent).
    fn dirty_pages(&self) -> u64;

    /// One precopy sender round: claims host pages in address order until a sweep of the
    /// layout is done, handing each claimed host page to `send`.
    fn send_round(&self, layout: &RamLayout, send: &mut dyn FnMut(HostPage)) {
        for (block, b) in layout.blocks().iter().enumerate() {
            let block = block as u32;
            let mut from = 0;
            while let Some(p) = self.find_next_dirty_host_page(block, from) {
                if let Some(t) = self.claim_host_page(PageLocation::new(block, p)) {
                    send(t.host_page);
                }
                from = p + b.host_page_pages();
            }
        }
    }
}

fn taken(claim: pagehint::Claim) -> Taken {
    let mut hps = claim.host_pages();
    let host_page = hps.next().expect("a claim holds a host page");
    assert!(
        hps.next().is_none(),
        "claim_host_page claimed more than one host page"
    );
    Taken {
        host_page,
        dirty: claim.dirty_pages(),
    }
}

impl ModelBitmap for DirtyBitmap {
    fn new(layout: &RamLayout) -> Self {
        DirtyBitmap::new(layout).expect("small bitmap")
    }
    fn mark_dirty(&self, loc: PageLocation) {
        DirtyBitmap::mark_dirty(self, loc).expect("model pages are in range");
    }
    fn mark_range(&self, block: u32, first: u64, count: u64) {
        DirtyBitmap::mark_range(self, block, first, count).expect("model ranges are in range");
    }
    fn merge_dirty_log(&self, block: u32, log: &[u64]) {
        DirtyBitmap::merge_dirty_log(self, block, log).expect("model logs are well formed");
    }
    fn merge_dirty_log_at(&self, block: u32, first: u64, pages: u64, log: &[u64]) {
        DirtyBitmap::merge_dirty_log_at(self, block, first, pages, log)
            .expect("model logs are well formed");
    }
    fn claim_page(&self, loc: PageLocation) -> bool {
        DirtyBitmap::claim_page(self, loc)
            .expect("model pages are in range")
            .is_claimed()
    }
    fn claim_host_page(&self, loc: PageLocation) -> Option<Taken> {
        DirtyBitmap::claim_host_page(self, loc)
            .expect("model pages are in range")
            .into_claim()
            .map(taken)
    }
    fn get_and_clear(&self, block: u32, from_word: usize, out: &mut [u64]) {
        DirtyBitmap::get_and_clear(self, block, from_word, out).expect("model ranges are in range");
    }
    fn find_next_dirty_host_page(&self, block: u32, from: u64) -> Option<u64> {
        DirtyBitmap::find_next_dirty_host_page(self, block, from).expect("model blocks exist")
    }
    fn dirty_pages(&self) -> u64 {
        DirtyBitmap::dirty_pages(self)
    }
}

/// The scheduler's bitmap, with the real background scanner (batched claims) as the sender.
impl ModelBitmap for PageScheduler {
    fn new(layout: &RamLayout) -> Self {
        PageScheduler::new(layout.clone(), SchedulerConfig::preempt()).expect("small bitmap")
    }
    fn mark_dirty(&self, loc: PageLocation) {
        ModelBitmap::mark_dirty(self.bitmap(), loc)
    }
    fn mark_range(&self, block: u32, first: u64, count: u64) {
        ModelBitmap::mark_range(self.bitmap(), block, first, count)
    }
    fn merge_dirty_log(&self, block: u32, log: &[u64]) {
        ModelBitmap::merge_dirty_log(self.bitmap(), block, log)
    }
    fn merge_dirty_log_at(&self, block: u32, first: u64, pages: u64, log: &[u64]) {
        ModelBitmap::merge_dirty_log_at(self.bitmap(), block, first, pages, log)
    }
    fn claim_page(&self, loc: PageLocation) -> bool {
        ModelBitmap::claim_page(self.bitmap(), loc)
    }
    fn claim_host_page(&self, loc: PageLocation) -> Option<Taken> {
        ModelBitmap::claim_host_page(self.bitmap(), loc)
    }
    fn get_and_clear(&self, block: u32, from_word: usize, out: &mut [u64]) {
        ModelBitmap::get_and_clear(self.bitmap(), block, from_word, out)
    }
    fn find_next_dirty_host_page(&self, block: u32, from: u64) -> Option<u64> {
        ModelBitmap::find_next_dirty_host_page(self.bitmap(), block, from)
    }
    fn dirty_pages(&self) -> u64 {
        self.bitmap().dirty_pages()
    }
    fn send_round(&self, _layout: &RamLayout, send: &mut dyn FnMut(HostPage)) {
        for claim in self.background() {
            claim.host_pages().for_each(&mut *send);
        }
    }
}

/// One block of 64 target pages, host page = target page (4 KiB): one word.
pub fn page_layout() -> RamLayout {
    RamLayout::single("pages", 64 * 4096, 4096).expect("valid layout")
}

/// One block of 16 target pages in host pages of 4 (16 KiB): narrow host pages, one word.
pub fn narrow_layout() -> RamLayout {
    RamLayout::single("narrow", 16 * 4096, 4 * 4096).expect("valid layout")
}

/// One block of 256 target pages in host pages of 128 (512 KiB, a scaled-down 2 MiB huge
/// page): two wide host pages of two words each, with summary bits.
pub fn wide_layout() -> RamLayout {
    RamLayout::single("wide", 256 * 4096, 128 * 4096).expect("valid layout")
}

/// I1: two threads claim dirty target page `page` of [`page_layout`]; page `page + 1` (same
/// word) is dirty too and must survive both claims.
pub fn i1_two_claimers_one_page<B: ModelBitmap>(page: u64) {
    let layout = page_layout();
    let bm = Arc::new(B::new(&layout));
    let (loc, other) = (PageLocation::new(0, page), PageLocation::new(0, page + 1));
    bm.mark_dirty(loc);
    bm.mark_dirty(other);
    let t = {
        let bm = bm.clone();
        thread::spawn(move || bm.claim_page(loc))
    };
    let mine = bm.claim_page(loc);
    let theirs = t.join().unwrap();
    assert!(!(mine && theirs), "I1: both claimers won {loc}");
    assert!(mine || theirs, "I1: no claimer won the dirty {loc}");
    assert!(
        bm.claim_page(other),
        "I7: claiming {loc} lost the mark of {other}"
    );
    assert_eq!(
        bm.dirty_pages(),
        0,
        "I1: pages left dirty after claiming all"
    );
}

/// I1/I2: `dirty` pages are marked; two threads claim the host page through `at[0]` and
/// `at[1]` (both in one host page). `bystander` (another host page) is dirty too and must be
/// left alone.
pub fn i1_i2_two_claimers_one_host_page<B: ModelBitmap>(
    layout: &RamLayout,
    dirty: &[PageLocation],
    at: [PageLocation; 2],
    bystander: PageLocation,
) {
    let bm = Arc::new(B::new(layout));
    for &loc in dirty {
        bm.mark_dirty(loc);
    }
    bm.mark_dirty(bystander);
    let t = {
        let bm = bm.clone();
        thread::spawn(move || bm.claim_host_page(at[0]))
    };
    let mine = bm.claim_host_page(at[1]);
    let theirs = t.join().unwrap();
    let n = dirty.len() as u64;
    match (theirs, mine) {
        (Some(a), Some(b)) if a.dirty + b.dirty > n => {
            panic!("I1: dirty pages claimed twice: {a:?} and {b:?} from {n} dirty pages")
        }
        (Some(a), Some(b)) => panic!("I2: host page split between two claimers: {a:?} and {b:?}"),
        (None, None) => panic!("I1: no claimer won the dirty host page of {}", at[0]),
        (Some(w), None) | (None, Some(w)) => {
            let hp = layout.host_page_of(at[0]).unwrap();
            assert_eq!(
                w.host_page, hp,
                "I2: the claim is not the requested host page"
            );
            assert_eq!(
                w.dirty, n,
                "I1: the winner collected {} of the {n} dirty pages",
                w.dirty
            );
        }
    }
    assert_eq!(
        bm.dirty_pages(),
        1,
        "I1: the claim disturbed another host page"
    );
    let t = bm.claim_host_page(bystander);
    assert_eq!(
        t.map(|t| t.dirty),
        Some(1),
        "I7: the bystander's mark was lost"
    );
}

/// How the racing guest marks its writes dirty.
#[derive(Clone, Debug)]
pub enum Mark {
    /// `mark_dirty` of one page.
    Page(PageLocation),
    /// `mark_range`.
    Range {
        /// Block.
        block: u32,
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
    },
    /// `merge_dirty_log` of a log with these pages of `block` set.
    Log {
        /// Block.
        block: u32,
        /// Pages the log marks.
        pages: Vec<u64>,
    },
    /// `merge_dirty_log_at` of a log covering `len` pages from `first` (a memory slot that
    /// maps part of the block), with these pages set.
    LogAt {
        /// Block.
        block: u32,
        /// First page the log covers.
        first: u64,
        /// Pages the log covers.
        len: u64,
        /// Pages the log marks (inside `first..first + len`).
        pages: Vec<u64>,
    },
}

impl Mark {
    /// The pages this mark covers.
    pub fn pages(&self) -> Vec<PageLocation> {
        match self {
            Mark::Page(loc) => vec![*loc],
            Mark::Range {
                block,
                first,
                count,
            } => (*first..first + count)
                .map(|p| PageLocation::new(*block, p))
                .collect(),
            Mark::Log { block, pages } | Mark::LogAt { block, pages, .. } => pages
                .iter()
                .map(|&p| PageLocation::new(*block, p))
                .collect(),
        }
    }

    /// Applies the mark to `bm`.
    pub fn apply<B: ModelBitmap>(&self, bm: &B, layout: &RamLayout) {
        match self {
            Mark::Page(loc) => bm.mark_dirty(*loc),
            Mark::Range {
                block,
                first,
                count,
            } => bm.mark_range(*block, *first, *count),
            Mark::Log { block, pages } => {
                let n = layout.blocks()[*block as usize].pages();
                let mut log = vec![0u64; n.div_ceil(64) as usize];
                for &p in pages {
                    log[(p / 64) as usize] |= 1 << (p % 64);
                }
                bm.merge_dirty_log(*block, &log);
            }
            Mark::LogAt {
                block,
                first,
                len,
                pages,
            } => {
                let mut log = vec![0u64; len.div_ceil(64) as usize];
                for &p in pages {
                    let i = p - first;
                    log[(i / 64) as usize] |= 1 << (i % 64);
                }
                bm.merge_dirty_log_at(*block, *first, *len, &log);
            }
        }
    }
}

/// Claims and sends every host page of `layout` (single-threaded, after the race).
pub fn drain<B: ModelBitmap>(bm: &B, layout: &RamLayout, guest: &GuestPages) {
    for (block, b) in layout.blocks().iter().enumerate() {
        for hp in 0..b.host_pages() {
            let loc = PageLocation::new(block as u32, hp * b.host_page_pages());
            if let Some(t) = bm.claim_host_page(loc) {
                guest.send(t.host_page);
            }
        }
    }
}

/// Panics with "I7" if set bits are left that no claim can collect.
pub fn assert_nothing_stranded<B: ModelBitmap>(bm: &B) {
    let left = bm.dirty_pages();
    assert_eq!(
        left, 0,
        "I7: {left} dirty bit(s) stranded: set, but no claim collects them"
    );
}

/// I7: `dirty` was written (version 1) and marked before the race. Then a guest thread writes
/// the pages of `mark` (version 2) and marks them, while a sender claims and sends the host
/// page of `dirty`. After a drain, the destination must hold version 2 of every marked page
/// and no bit may be stranded.
pub fn i7_mark_races_claim<B: ModelBitmap>(layout: &RamLayout, dirty: PageLocation, mark: &Mark) {
    let bm = Arc::new(B::new(layout));
    let guest = Arc::new(GuestPages::new(mark.pages().into_iter().chain([dirty])));
    guest.write(dirty, 1);
    bm.mark_dirty(dirty);
    let writer = {
        let (bm, guest, mark, layout) = (bm.clone(), guest.clone(), mark.clone(), layout.clone());
        thread::spawn(move || {
            for loc in mark.pages() {
                guest.write(loc, 2);
            }
            mark.apply(&*bm, &layout);
        })
    };
    if let Some(t) = bm.claim_host_page(dirty) {
        guest.send(t.host_page);
    }
    writer.join().unwrap();
    drain(&*bm, layout, &guest);
    guest.assert_in_sync();
    assert_nothing_stranded(&*bm);
}

/// One block of 128 target pages in one wide host page (a scaled-down 2 MiB page): two
/// words and a summary bit.
pub fn drain_wide_layout() -> RamLayout {
    RamLayout::single("huge", 128 * 4096, 128 * 4096).expect("valid layout")
}

/// One block of 128 target pages in 4 KiB host pages: two words.
pub fn drain_narrow_layout() -> RamLayout {
    RamLayout::single("ram", 128 * 4096, 4096).expect("valid layout")
}

/// The target pages set in `words` (word `i`, bit `j` = page `64 i + j`).
pub fn pages_of(words: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        let mut bits = w;
        while bits != 0 {
            out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
        }
    }
    out
}

/// I1/I2 on [`drain_wide_layout`]: every page dirty; `get_and_clear` of both words and a
/// host-page claim race for the one host page.
pub fn i1_i2_drain_and_claim_one_owner<B: ModelBitmap>() {
    let layout = drain_wide_layout();
    let bm = Arc::new(B::new(&layout));
    bm.mark_range(0, 0, 128);
    let t = {
        let bm = bm.clone();
        thread::spawn(move || {
            let mut out = [0u64; 2];
            bm.get_and_clear(0, 0, &mut out);
            pages_of(&out).len() as u64
        })
    };
    let claimed = bm
        .claim_host_page(PageLocation::new(0, 0))
        .map_or(0, |t| t.dirty);
    let collected = t.join().unwrap();
    assert!(
        (collected == 0 || collected == 128) && (claimed == 0 || claimed == 128),
        "I2: host page split: get_and_clear took {collected} pages, the claim {claimed}"
    );
    assert_eq!(collected + claimed, 128, "I1: pages lost or taken twice");
}

/// I7 on `layout` (one block of two words): page 70 is written and then marked by `mark`
/// while a consumer drains both words; then a host-page sweep collects what is left. Page 70
/// is collected exactly once, and its collector sees the written contents.
pub fn i7_mark_races_drain<B: ModelBitmap>(layout: &RamLayout, mark: &Mark) {
    let page = PageLocation::new(0, 70);
    assert_eq!(mark.pages(), [page], "the model marks page 70");
    let bm = Arc::new(B::new(layout));
    let guest = Arc::new(GuestPages::new([page]));
    let marker = {
        let (bm, guest, mark, layout) = (bm.clone(), guest.clone(), mark.clone(), layout.clone());
        thread::spawn(move || {
            guest.write(page, 1);
            mark.apply(&*bm, &layout);
        })
    };
    let mut out = [0u64; 2];
    bm.get_and_clear(0, 0, &mut out);
    let drained = pages_of(&out);
    let mut collected = drained.len() as u64;
    for p in drained {
        guest.send(HostPage {
            block: 0,
            first_page: p,
            pages: 1,
        });
    }
    marker.join().unwrap();
    let hp = layout.blocks()[0].host_page_pages();
    let mut from = 0;
    while let Some(p) = bm.find_next_dirty_host_page(0, from) {
        if let Some(t) = bm.claim_host_page(PageLocation::new(0, p)) {
            guest.send(t.host_page);
            collected += t.dirty;
        }
        from = p + hp;
    }
    assert_eq!(
        collected, 1,
        "I7: the mark of {page} was collected {collected} times"
    );
    guest.assert_in_sync();
}
