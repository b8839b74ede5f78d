//! What several integration tests share: the mixed-host-page layout, an exactly-once
//! recorder of what was collected, and a deterministic generator.
#![allow(dead_code)] // each test file uses part of it

use std::sync::atomic::{AtomicU8, Ordering};

use pagehint::{BlockSpec, Claim, PageLocation, RamLayout};

/// Three blocks of `pc_ram`, `mid` and `huge` bytes in 4 KiB, 16 KiB and 2 MiB host pages
/// (the last spans 8 words: the summary protocol), 4 KiB target pages.
pub fn mixed_layout(pc_ram: u64, mid: u64, huge: u64) -> RamLayout {
    RamLayout::new(
        4096,
        [
            BlockSpec::new("pc.ram", pc_ram, 4096),
            BlockSpec::new("mid", mid, 16 << 10),
            BlockSpec::new("huge", huge, 2 << 20),
        ],
    )
    .unwrap()
}

/// Who collected each target page (0: nobody yet); panics on a second collection (I1) and
/// on a claim of a partial host page (I2).
pub struct Collected {
    layout: RamLayout,
    pages: Vec<AtomicU8>,
}

impl Collected {
    /// Nothing collected yet.
    pub fn new(layout: &RamLayout) -> Self {
        Self {
            layout: layout.clone(),
            pages: (0..layout.total_pages())
                .map(|_| AtomicU8::new(0))
                .collect(),
        }
    }

    /// Records that `by` collected target page `page` of `block`.
    pub fn page(&self, block: u32, page: u64, by: u8) {
        let g = self
            .layout
            .global_index(PageLocation::new(block, page))
            .unwrap();
        // Relaxed: the swap's atomicity alone detects a second collector.
        let prev = self.pages[g as usize].swap(by, Ordering::Relaxed);
        assert_eq!(
            prev, 0,
            "I1: block {block} page {page} collected twice (by {prev}, then by {by})"
        );
    }

    /// Records the dirty words `words` of `block` from word `from_word` (a `get_and_clear`).
    pub fn words(&self, block: u32, from_word: usize, words: &[u64], by: u8) {
        for (i, &w) in words.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let page = ((from_word + i) as u64) * 64 + u64::from(bits.trailing_zeros());
                self.page(block, page, by);
                bits &= bits - 1;
            }
        }
    }

    /// Records every target page of the host pages of `claim`.
    pub fn claim(&self, claim: &Claim, by: u8) {
        for hp in claim.host_pages() {
            assert_eq!(
                hp.first_page % hp.pages,
                0,
                "I2: a claim of a partial host page"
            );
            for p in hp.page_range() {
                self.page(hp.block, p, by);
            }
        }
    }

    /// Whether target page `page` of `block` was collected.
    pub fn has(&self, block: u32, page: u64) -> bool {
        let g = self
            .layout
            .global_index(PageLocation::new(block, page))
            .unwrap();
        // Relaxed: read after the collectors are joined.
        self.pages[g as usize].load(Ordering::Relaxed) != 0
    }

    /// How many target pages were collected.
    pub fn count(&self) -> u64 {
        // Relaxed: read after the collectors are joined.
        self.pages
            .iter()
            .filter(|p| p.load(Ordering::Relaxed) != 0)
            .count() as u64
    }

    /// Whether every page was collected.
    pub fn all_once(&self) -> bool {
        // Relaxed: read after the collectors are joined.
        self.pages.iter().all(|p| p.load(Ordering::Relaxed) != 0)
    }
}

/// A xorshift generator: deterministic per seed, no dependency.
pub struct Rng(pub u64);

impl Rng {
    /// The next value (the seed must not be 0).
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
