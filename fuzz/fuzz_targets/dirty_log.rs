//! Dirty-log slices (I7/I8): `DirtyBitmap::merge_dirty_log`, `merge_dirty_log_at` and the
//! postcopy-recovery bitmap (`PageScheduler::recover_block`) on arbitrary block numbers,
//! ranges and words. A malformed slice must be a typed error that changes nothing; an
//! accepted one must mark exactly its bits, every one of them claimable (summary bits set
//! for wide host pages), and each claimed exactly once.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout, SchedulerConfig};

/// 4 KiB host pages over a length that is not a whole number of words, 16 KiB host pages,
/// and 2 MiB host pages (a host page spans 8 words: the summary protocol).
fn layout() -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("small", 100 * 4096, 4096),
            BlockSpec::new("mid", 256 << 10, 16 << 10),
            BlockSpec::new("huge", 4 << 20, 2 << 20),
        ],
    )
    .expect("a valid layout")
}

/// Reads little-endian integers off the front of the input, zero-padded.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    /// A small value most of the time (valid ranges are small), any u64 otherwise.
    fn count(&mut self) -> u64 {
        let raw = self.take::<2>();
        if raw[1] & 0x80 != 0 {
            self.u64()
        } else {
            u64::from(u16::from_le_bytes(raw) & 0x7fff)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    static LAYOUT: OnceLock<RamLayout> = OnceLock::new();
    let layout = LAYOUT.get_or_init(layout);
    let mut input = Input(data);
    let op = input.u8() % 3;
    let block = match input.u8() {
        b @ 0..=3 => u32::from(b),
        b if b & 1 == 0 => u32::MAX - u32::from(b),
        b => u32::from(b),
    };
    let first = input.count();
    let pages = input.count();
    let words: Vec<u64> = input
        .0
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();

    let mut sched = PageScheduler::new(layout.clone(), SchedulerConfig::preempt_hint())
        .expect("scheduler");
    // a known state to compare against: one page of each block dirty
    for (i, b) in layout.blocks().iter().enumerate() {
        sched.bitmap().mark_dirty(PageLocation::new(i as u32, b.pages() / 2)).unwrap();
    }
    let before = sched.bitmap().dirty_pages();
    let (result, expect_marked) = match op {
        0 => (
            sched.bitmap().merge_dirty_log(block, &words).map_err(|e| e.to_string()),
            None,
        ),
        1 => (
            sched
                .bitmap()
                .merge_dirty_log_at(block, first, pages, &words)
                .map_err(|e| e.to_string()),
            None,
        ),
        _ => (
            sched.recover_block(block, &words).map_err(|e| e.to_string()),
            Some(()),
        ),
    };
    let Ok(n) = result else {
        assert_eq!(sched.bitmap().dirty_pages(), before, "a refused slice changed the bitmap");
        return;
    };
    let blk = layout.block(block).expect("accepted, so the block exists");
    let set: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    let block_dirty = sched.bitmap().block_dirty_pages(block).unwrap();
    if expect_marked.is_none() {
        assert_eq!(n, set, "merge reports the pages its log marks");
        // every marked page is dirty now
        let base = if op == 1 { first } else { 0 };
        for (i, w) in words.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let page = base + i as u64 * 64 + u64::from(w.trailing_zeros());
                assert!(sched.bitmap().is_dirty(PageLocation::new(block, page)).unwrap());
                w &= w - 1;
            }
        }
    } else {
        assert_eq!(n, block_dirty, "recovery reports the block's dirty pages");
        assert_eq!(n, blk.pages() - set, "recovery dirties exactly the unreceived pages");
    }
    // every dirty page of the block is claimable, once: claim host page by host page
    let mut claimed = 0;
    for hp in 0..blk.host_pages() {
        let loc = PageLocation::new(block, hp * blk.host_page_pages());
        if let Some(c) = sched.bitmap().claim_host_page(loc).unwrap().into_claim() {
            claimed += c.dirty_pages();
        }
        assert!(sched.bitmap().claim_host_page(loc).unwrap().into_claim().is_none(), "claimed twice");
    }
    assert_eq!(claimed, block_dirty, "a dirty page the claims could not reach (I7)");
    assert_eq!(sched.bitmap().block_dirty_pages(block).unwrap(), 0);
});
