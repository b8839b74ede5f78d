//! Property test: `DirtyBitmap` against a plain set model, over random sequences of operations
//! (I1, I2, I7 sequentially; I8: bad input gets a typed error and changes nothing).
//!
//! The model is a `BTreeSet` of dirty pages plus, for blocks whose host pages span more than
//! one word ("wide": 128 and 512 target pages here), the set of host pages whose summary bit
//! is set. After every operation the whole bitmap is compared with the model. Layouts mix
//! 4 KiB, 16 KiB, 512 KiB and 2 MiB host pages, and blocks whose last word is partial.
//! Inputs reach past blocks, pages and log lengths on purpose: those must be refused with an
//! error and leave the bitmap exactly as it was.

use std::collections::BTreeSet;

use pagehint::{
    BlockSpec, DirtyBitmap, DirtyLogError, LocationError, PageClaim, PageLocation, RamLayout,
};
use proptest::prelude::*;

/// The layouts: a narrow-only one and a mixed one with wide host pages.
fn layouts() -> Vec<RamLayout> {
    vec![
        RamLayout::new(
            4096,
            [
                BlockSpec::new("a", 100 * 4096, 4096),
                BlockSpec::new("b", 96 * 4096, 16 << 10),
            ],
        )
        .unwrap(),
        RamLayout::new(
            4096,
            [
                BlockSpec::new("small", 70 * 4096, 4096),
                BlockSpec::new("mid", 96 * 4096, 16 << 10),
                BlockSpec::new("wide", 384 * 4096, 512 << 10),
                BlockSpec::new("huge", 1024 * 4096, 2 << 20),
            ],
        )
        .unwrap(),
    ]
}

/// One operation, with raw numbers that `Model::resolve` maps mostly into range (and
/// sometimes past it).
#[derive(Clone, Debug)]
enum Op {
    Mark(u32, u64),
    MarkRange(u32, u64, u64),
    MergeLog {
        block: u32,
        len_delta: i8,
        words: Vec<(u16, u64)>,
        mask_tail: bool,
    },
    MergeLogAt {
        block: u32,
        first: u64,
        pages: u64,
        len_delta: i8,
        words: Vec<(u16, u64)>,
        mask_tail: bool,
    },
    ClaimPage(u32, u64),
    ClaimHostPage(u32, u64),
    GetAndClear(u32, u64, u8),
    IsDirty(u32, u64),
    FindNextDirty(u32, u64),
    FindNextDirtyHostPage(u32, u64),
    BlockDirtyPages(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let block = 0u32..5;
    let raw = any::<u64>();
    let words = prop::collection::vec((any::<u16>(), any::<u64>()), 0..4);
    let len_delta = prop_oneof![8 => Just(0i8), 1 => -2i8..=2];
    prop_oneof![
        4 => (block.clone(), raw).prop_map(|(b, p)| Op::Mark(b, p)),
        3 => (block.clone(), raw, 0u64..140).prop_map(|(b, p, n)| Op::MarkRange(b, p, n)),
        2 => (block.clone(), len_delta.clone(), words.clone(), prop::bool::weighted(0.8)).prop_map(
            |(block, len_delta, words, mask_tail)| Op::MergeLog { block, len_delta, words, mask_tail }
        ),
        2 => (block.clone(), raw, 0u64..200, len_delta, words, prop::bool::weighted(0.8))
            .prop_map(|(block, first, pages, len_delta, words, mask_tail)| Op::MergeLogAt {
                block, first, pages, len_delta, words, mask_tail
            }),
        3 => (block.clone(), raw).prop_map(|(b, p)| Op::ClaimPage(b, p)),
        4 => (block.clone(), raw).prop_map(|(b, p)| Op::ClaimHostPage(b, p)),
        2 => (block.clone(), raw, 0u8..12).prop_map(|(b, w, n)| Op::GetAndClear(b, w, n)),
        1 => (block.clone(), raw).prop_map(|(b, p)| Op::IsDirty(b, p)),
        2 => (block.clone(), raw).prop_map(|(b, p)| Op::FindNextDirty(b, p)),
        2 => (block.clone(), raw).prop_map(|(b, p)| Op::FindNextDirtyHostPage(b, p)),
        1 => block.prop_map(Op::BlockDirtyPages),
    ]
}

/// The reference: dirty pages, and the wide host pages whose summary bit is set.
struct Model {
    layout: RamLayout,
    dirty: BTreeSet<(u32, u64)>,
    summary: BTreeSet<(u32, u64)>,
    /// Pages turned from clean to dirty so far (`DirtyBitmap::pages_dirtied`).
    dirtied: u64,
}

impl Model {
    fn blocks(&self) -> u32 {
        self.layout.blocks().len() as u32
    }
    fn pages(&self, block: u32) -> Option<u64> {
        self.layout.blocks().get(block as usize).map(|b| b.pages())
    }
    fn host_pages(&self, block: u32) -> u64 {
        self.layout.blocks()[block as usize].host_page_pages()
    }
    fn wide(&self, block: u32) -> bool {
        self.host_pages(block) > 64
    }
    fn words(&self, block: u32) -> u64 {
        self.pages(block).unwrap().div_ceil(64)
    }
    /// A raw page number: mostly inside the block, sometimes up to 70 pages past its end.
    fn page(&self, block: u32, raw: u64) -> u64 {
        raw % (self.pages(block).unwrap_or(100) + 70)
    }
    fn no_block(&self, block: u32) -> LocationError {
        LocationError::NoSuchBlock {
            block,
            blocks: self.layout.blocks().len(),
        }
    }

    /// The error a single-page operation on (`block`, `page`) must give, if any.
    fn page_error(&self, block: u32, page: u64) -> Option<LocationError> {
        match self.pages(block) {
            None => Some(self.no_block(block)),
            Some(pages) if page >= pages => {
                Some(LocationError::PageOutOfRange { block, page, pages })
            }
            Some(_) => None,
        }
    }

    fn mark(&mut self, block: u32, page: u64) {
        self.dirtied += u64::from(self.dirty.insert((block, page)));
        if self.wide(block) {
            self.summary.insert((block, page / self.host_pages(block)));
        }
    }

    /// Builds a log of `words + len_delta` words from `(index, word)` pairs; with
    /// `mask_tail`, bits past `pages` are cleared from the last word.
    fn log(
        words: u64,
        pages: u64,
        len_delta: i8,
        pairs: &[(u16, u64)],
        mask_tail: bool,
    ) -> Vec<u64> {
        let len = (words as i64 + i64::from(len_delta)).max(0) as usize;
        let mut log = vec![0u64; len];
        if len > 0 {
            for &(i, w) in pairs {
                log[i as usize % len] |= w;
            }
            if mask_tail && len as u64 == words && pages % 64 != 0 {
                log[len - 1] &= (1 << (pages % 64)) - 1;
            }
        }
        log
    }

    fn dirty_in(&self, block: u32, pages: std::ops::Range<u64>) -> Vec<u64> {
        if pages.is_empty() {
            return vec![];
        }
        self.dirty
            .range((block, pages.start)..(block, pages.end))
            .map(|&(_, p)| p)
            .collect()
    }
}

/// Every dirty page of `bm`, by enumeration (the same view `find_next_dirty` gives).
fn snapshot(bm: &DirtyBitmap, layout: &RamLayout) -> BTreeSet<(u32, u64)> {
    let mut out = BTreeSet::new();
    for block in 0..layout.blocks().len() as u32 {
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty(block, from).unwrap() {
            out.insert((block, p));
            from = p + 1;
        }
    }
    out
}

/// The wide host pages whose summary bit `bm` reports (through `find_next_dirty_host_page`).
fn summaries(bm: &DirtyBitmap, m: &Model) -> BTreeSet<(u32, u64)> {
    let mut out = BTreeSet::new();
    for block in (0..m.blocks()).filter(|&b| m.wide(b)) {
        let hp = m.host_pages(block);
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty_host_page(block, from).unwrap() {
            out.insert((block, p / hp));
            from = p + hp;
        }
    }
    out
}

/// Applies `op` to the bitmap and the model, comparing what they answer.
fn step(bm: &DirtyBitmap, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match *op {
        Op::Mark(block, raw) => {
            let page = m.page(block, raw);
            let got = bm.mark_dirty(PageLocation::new(block, page));
            match m.page_error(block, page) {
                Some(e) => prop_assert_eq!(got, Err(e)),
                None => {
                    prop_assert_eq!(got, Ok(()));
                    m.mark(block, page);
                }
            }
        }
        Op::MarkRange(block, raw, count) => {
            let first = m.page(block, raw);
            let got = bm.mark_range(block, first, count);
            match m.pages(block) {
                None => prop_assert_eq!(got, Err(m.no_block(block))),
                Some(pages) if count == 0 || first + count > pages => prop_assert_eq!(
                    got,
                    Err(LocationError::RangeOutOfBounds {
                        block,
                        first,
                        count
                    })
                ),
                Some(_) => {
                    prop_assert_eq!(got, Ok(()));
                    for p in first..first + count {
                        m.mark(block, p);
                    }
                }
            }
        }
        Op::MergeLog {
            block,
            len_delta,
            ref words,
            mask_tail,
        } => {
            let Some(pages) = m.pages(block) else {
                let got = bm.merge_dirty_log(block, &[0]);
                prop_assert_eq!(got, Err(DirtyLogError::Location(m.no_block(block))));
                return Ok(());
            };
            let expected = m.words(block) as usize;
            let log = Model::log(expected as u64, pages, len_delta, words, mask_tail);
            let got = bm.merge_dirty_log(block, &log);
            if log.len() != expected {
                prop_assert_eq!(
                    got,
                    Err(DirtyLogError::WrongLength {
                        block,
                        expected,
                        got: log.len()
                    })
                );
            } else if pages % 64 != 0 && log[expected - 1] >> (pages % 64) != 0 {
                prop_assert_eq!(got, Err(DirtyLogError::BitsPastEnd { block }));
            } else {
                let n: u64 = log.iter().map(|w| u64::from(w.count_ones())).sum();
                prop_assert_eq!(got, Ok(n));
                for (i, w) in log.iter().enumerate() {
                    for bit in (0..64).filter(|b| w & (1 << b) != 0) {
                        m.mark(block, i as u64 * 64 + bit);
                    }
                }
            }
        }
        Op::MergeLogAt {
            block,
            first,
            pages,
            len_delta,
            ref words,
            mask_tail,
        } => {
            let first = m.page(block, first);
            let expected = pages.div_ceil(64) as usize;
            let log = Model::log(expected as u64, pages, len_delta, words, mask_tail);
            let got = bm.merge_dirty_log_at(block, first, pages, &log);
            match m.pages(block) {
                None => prop_assert_eq!(got, Err(DirtyLogError::Location(m.no_block(block)))),
                Some(n) if pages == 0 || first + pages > n => prop_assert_eq!(
                    got,
                    Err(DirtyLogError::Location(LocationError::RangeOutOfBounds {
                        block,
                        first,
                        count: pages
                    }))
                ),
                Some(_) if log.len() != expected => prop_assert_eq!(
                    got,
                    Err(DirtyLogError::WrongLength {
                        block,
                        expected,
                        got: log.len()
                    })
                ),
                Some(_) if pages % 64 != 0 && log[expected - 1] >> (pages % 64) != 0 => {
                    prop_assert_eq!(got, Err(DirtyLogError::BitsPastEnd { block }))
                }
                Some(_) => {
                    let n: u64 = log.iter().map(|w| u64::from(w.count_ones())).sum();
                    prop_assert_eq!(got, Ok(n));
                    for (i, w) in log.iter().enumerate() {
                        for bit in (0..64).filter(|b| w & (1 << b) != 0) {
                            m.mark(block, first + i as u64 * 64 + bit);
                        }
                    }
                }
            }
        }
        Op::ClaimPage(block, raw) => {
            let page = m.page(block, raw);
            let got = bm.claim_page(PageLocation::new(block, page));
            match m.page_error(block, page) {
                Some(e) => prop_assert_eq!(got, Err(e)),
                // Target-page granular: a wide host page keeps its summary bit.
                None => prop_assert_eq!(
                    got.map(PageClaim::is_claimed),
                    Ok(m.dirty.remove(&(block, page)))
                ),
            }
        }
        Op::ClaimHostPage(block, raw) => {
            let page = m.page(block, raw);
            let got = bm.claim_host_page(PageLocation::new(block, page));
            match m.page_error(block, page) {
                Some(e) => prop_assert_eq!(got, Err(e)),
                None => {
                    let got = got.unwrap().into_claim();
                    let hp = m.host_pages(block);
                    let first = page / hp * hp;
                    let elected = !m.wide(block) || m.summary.remove(&(block, first / hp));
                    let taken = if elected {
                        m.dirty_in(block, first..first + hp)
                    } else {
                        vec![]
                    };
                    for p in &taken {
                        m.dirty.remove(&(block, *p));
                    }
                    match got {
                        None => prop_assert!(taken.is_empty(), "I1: dirty {taken:?} not claimed"),
                        Some(c) => {
                            // I2: exactly the requested host page, whole.
                            let hps: Vec<_> = c.host_pages().collect();
                            prop_assert_eq!(hps.len(), 1);
                            prop_assert_eq!(hps[0].block, block);
                            prop_assert_eq!(hps[0].first_page, first);
                            prop_assert_eq!(hps[0].pages, hp);
                            prop_assert_eq!(c.pages_to_send(), hp);
                            prop_assert_eq!(c.dirty_pages(), taken.len() as u64);
                            prop_assert!(!taken.is_empty());
                            prop_assert_eq!(c.end(), PageLocation::new(block, first + hp));
                        }
                    }
                }
            }
        }
        Op::GetAndClear(block, raw, len) => {
            let mut out = vec![!0u64; len as usize];
            let words = m.pages(block).map(|_| m.words(block));
            let from = raw % (words.unwrap_or(4) + 3);
            let got = bm.get_and_clear(block, from as usize, &mut out);
            match words {
                None => prop_assert_eq!(got, Err(m.no_block(block))),
                Some(words) if from + u64::from(len) > words => prop_assert!(
                    matches!(got, Err(LocationError::RangeOutOfBounds { block: b, .. }) if b == block),
                    "{got:?}"
                ),
                Some(_) => {
                    let end = from + u64::from(len);
                    let taken = m.dirty_in(block, from * 64..end * 64);
                    prop_assert_eq!(got, Ok(taken.len() as u64));
                    let mut expect = vec![0u64; len as usize];
                    for p in &taken {
                        expect[(p / 64 - from) as usize] |= 1 << (p % 64);
                        m.dirty.remove(&(block, *p));
                    }
                    prop_assert_eq!(out, expect);
                    if m.wide(block) {
                        // Host pages wholly inside the range lose their summary bit.
                        let per = m.host_pages(block) / 64;
                        for hp in from.div_ceil(per)..end / per {
                            m.summary.remove(&(block, hp));
                        }
                    }
                }
            }
        }
        Op::IsDirty(block, raw) => {
            let page = m.page(block, raw);
            let got = bm.is_dirty(PageLocation::new(block, page));
            match m.page_error(block, page) {
                Some(e) => prop_assert_eq!(got, Err(e)),
                None => prop_assert_eq!(got, Ok(m.dirty.contains(&(block, page)))),
            }
        }
        Op::FindNextDirty(block, raw) => {
            let from = m.page(block, raw);
            let got = bm.find_next_dirty(block, from);
            match m.pages(block) {
                None => prop_assert_eq!(got, Err(m.no_block(block))),
                Some(pages) => {
                    let next = m.dirty_in(block, from..pages).first().copied();
                    prop_assert_eq!(got, Ok(next));
                }
            }
        }
        Op::FindNextDirtyHostPage(block, raw) => {
            let from = m.page(block, raw);
            let got = bm.find_next_dirty_host_page(block, from);
            match m.pages(block) {
                None => prop_assert_eq!(got, Err(m.no_block(block))),
                Some(pages) if from >= pages => prop_assert_eq!(got, Ok(None)),
                Some(pages) => {
                    let hp = m.host_pages(block);
                    let start = from / hp * hp;
                    let next = if m.wide(block) {
                        m.summary
                            .range((block, start / hp)..(block, u64::MAX))
                            .next()
                            .map(|&(_, h)| h * hp)
                    } else {
                        m.dirty_in(block, start..pages).first().map(|p| p / hp * hp)
                    };
                    prop_assert_eq!(got, Ok(next));
                }
            }
        }
        Op::BlockDirtyPages(block) => {
            let got = bm.block_dirty_pages(block);
            match m.pages(block) {
                None => prop_assert_eq!(got, Err(m.no_block(block))),
                Some(pages) => prop_assert_eq!(got, Ok(m.dirty_in(block, 0..pages).len() as u64)),
            }
        }
    }
    // Refused operations change nothing; accepted ones change exactly what the model says.
    prop_assert_eq!(bm.dirty_pages(), m.dirty.len() as u64);
    // The O(1) count agrees with the bits whenever the bitmap is quiet (here: always).
    prop_assert_eq!(bm.dirty_count(), m.dirty.len() as u64);
    prop_assert_eq!(bm.pages_dirtied(), m.dirtied);
    prop_assert_eq!(&snapshot(bm, &m.layout), &m.dirty);
    prop_assert_eq!(&summaries(bm, m), &m.summary);
    Ok(())
}

proptest! {
    #[test]
    fn bitmap_matches_set_model(layout in 0usize..2, ops in prop::collection::vec(op(), 1..60)) {
        let layout = layouts().swap_remove(layout);
        let bm = DirtyBitmap::new(&layout).unwrap();
        let mut m = Model { layout, dirty: BTreeSet::new(), summary: BTreeSet::new(), dirtied: 0 };
        for op in &ops {
            step(&bm, &mut m, op)?;
        }
        // Draining with host-page claims collects everything, whole (I1, I2).
        for block in 0..m.blocks() {
            let hp = m.host_pages(block);
            for first in (0..m.pages(block).unwrap()).step_by(hp as usize) {
                step(&bm, &mut m, &Op::ClaimHostPage(block, first))?;
            }
        }
        prop_assert_eq!(bm.dirty_pages(), 0);
    }

    /// A page marked after its host page was claimed is claimable again (I7), narrow or wide.
    #[test]
    fn i7_marked_after_claim_is_claimable_again(block in 0u32..4, raw in any::<u64>()) {
        let layout = layouts().swap_remove(1);
        let bm = DirtyBitmap::new(&layout).unwrap();
        let pages = layout.blocks()[block as usize].pages();
        let loc = PageLocation::new(block, raw % pages);
        bm.mark_dirty(loc).unwrap();
        prop_assert_eq!(bm.claim_host_page(loc).unwrap().into_claim().map(|c| c.dirty_pages()), Some(1));
        prop_assert!(bm.claim_host_page(loc).unwrap().into_claim().is_none());
        bm.mark_dirty(loc).unwrap();
        prop_assert_eq!(bm.claim_host_page(loc).unwrap().into_claim().map(|c| c.dirty_pages()), Some(1));
    }
}
