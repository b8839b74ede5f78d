//! KVM's dirty pages through `KvmSlots`, on synthetic logs and rings: dirty logs merged at a
//! slot's page offset mark exactly their pages (I7) and a malformed log is refused whole
//! (I8); dirty-ring batches racing claims lose nothing (I7). A real KVM guest's log and ring
//! are in `tests/kvm.rs`.

use std::sync::atomic::{AtomicBool, Ordering};

use pagehint::vmm::{DirtyRingEntry, KvmSlots, SlotMapping};
use pagehint::{DirtyBitmap, DirtyLogError, PageLocation, RamLayout};
use proptest::prelude::*;

mod common;
use common::{mixed_layout, Rng};

/// 4 KiB, 16 KiB and 2 MiB host pages.
fn layout() -> RamLayout {
    mixed_layout(4 << 20, 1 << 20, 8 << 20)
}

proptest! {
    /// `merge_dirty_log_at` marks exactly the log's pages, at any offset, and keeps host-page
    /// scans (summary bits) in step with the page bits.
    #[test]
    fn i7_merge_at_offset_matches_per_page_marks(
        block in 0u32..3,
        first_frac in 0.0f64..1.0,
        len_frac in 0.0f64..1.0,
        seed in any::<u64>(),
        density in 0u32..4,
    ) {
        let l = layout();
        let pages = l.blocks()[block as usize].pages();
        let first = ((pages - 1) as f64 * first_frac) as u64;
        let count = 1 + ((pages - first - 1) as f64 * len_frac) as u64;
        let mut rng = Rng(seed | 1);
        let mut log = vec![0u64; count.div_ceil(64) as usize];
        let mut expect = Vec::new();
        for i in 0..count {
            if rng.next() % 8 < u64::from(density) {
                log[(i / 64) as usize] |= 1 << (i % 64);
                expect.push(first + i);
            }
        }
        let bm = DirtyBitmap::new(&l).unwrap();
        prop_assert_eq!(bm.merge_dirty_log_at(block, first, count, &log).unwrap(), expect.len() as u64);
        let mut got = Vec::new();
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty(block, from).unwrap() {
            got.push(p);
            from = p + 1;
        }
        prop_assert_eq!(&got, &expect);
        // every host page with a dirty page is found by a host-page scan and claimed whole
        let mut claimed = 0;
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty_host_page(block, from).unwrap() {
            if let Some(c) = bm.claim_host_page(PageLocation::new(block, p)).unwrap().into_claim() {
                claimed += c.dirty_pages();
            }
            from = p + l.blocks()[block as usize].host_page_pages();
        }
        prop_assert_eq!(claimed, expect.len() as u64);
        prop_assert_eq!(bm.dirty_pages(), 0);
    }
}

#[test]
fn i8_merge_at_offset_refuses_bad_logs_whole() {
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    assert!(matches!(
        bm.merge_dirty_log_at(0, 1000, 100, &[1, 1]),
        Err(DirtyLogError::Location(_))
    ));
    assert!(matches!(
        bm.merge_dirty_log_at(0, 10, 100, &[1]),
        Err(DirtyLogError::WrongLength {
            expected: 2,
            got: 1,
            ..
        })
    ));
    assert!(matches!(
        bm.merge_dirty_log_at(0, 10, 100, &[1, 1 << 36]),
        Err(DirtyLogError::BitsPastEnd { .. })
    ));
    assert!(matches!(
        bm.merge_dirty_log_at(0, 10, 0, &[]),
        Err(DirtyLogError::Location(_))
    ));
    assert_eq!(bm.dirty_pages(), 0);
}

#[test]
fn i7_dirty_ring_import_races_claims_without_loss() {
    // I1 + I7: a harvester imports ring batches (each page once) while a claimer keeps
    // claiming; a final sweep collects the rest. Bits are only set by marks, so collecting
    // exactly as many dirty pages as were marked means each page was collected once.
    let l = layout();
    let bm = DirtyBitmap::new(&l).unwrap();
    let mut slots = KvmSlots::new();
    // Slot 5 maps the huge block from page 100 (not word aligned), slot 6 the start of it.
    slots
        .insert(
            &l,
            SlotMapping {
                slot: 5,
                block: 2,
                first_page: 100,
                pages: 1948,
            },
        )
        .unwrap();
    slots
        .insert(
            &l,
            SlotMapping {
                slot: 6,
                block: 2,
                first_page: 0,
                pages: 100,
            },
        )
        .unwrap();
    let done = AtomicBool::new(false);
    let sweep = || {
        let mut n = 0;
        let mut from = 0;
        while let Some(p) = bm.find_next_dirty_host_page(2, from).unwrap() {
            if let Some(c) = bm
                .claim_host_page(PageLocation::new(2, p))
                .unwrap()
                .into_claim()
            {
                assert_eq!(c.host_page_count(), 1, "I2");
                n += c.dirty_pages();
            }
            from = p + 512;
        }
        n
    };
    let collected = std::thread::scope(|s| {
        s.spawn(|| {
            let entries: Vec<_> = (0..1948u64)
                .map(|o| DirtyRingEntry::new(5, (o * 7) % 1948))
                .chain((0..100).map(|o| DirtyRingEntry::new(6, o)))
                .collect();
            for batch in entries.chunks(37) {
                let r = slots.import_dirty_ring(&bm, batch.iter().copied());
                assert_eq!((r.marked, r.rejected), (batch.len() as u64, 0));
            }
            done.store(true, Ordering::Release);
        });
        s.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::Acquire) {
                n += sweep();
            }
            n
        })
        .join()
        .unwrap()
    });
    assert_eq!(
        collected + sweep(),
        2048,
        "I1/I7: pages lost or collected twice"
    );
    assert_eq!(bm.dirty_pages(), 0);
    assert_eq!(slots.stats().ring_entries, 2048);
}
