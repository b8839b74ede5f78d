//! `GpaMap` against a model in `u128` arithmetic, where nothing can wrap: blocks anywhere in
//! the 64-bit address space, also ending exactly at its top. Every conversion either agrees
//! with the model or is a typed error exactly where the model says the input is bad (I8):
//! dirty words past a block's last word or last page, empty requests, ranges that leave a
//! block. No panic, no wrapped address, no page reported in the wrong block.

use pagehint::vmm::{GpaError, GpaMap, GpaRange};
use pagehint::{BlockSpec, PageLocation, RamLayout};
use proptest::prelude::*;

const PAGE: u128 = 4096;
const TOP: u128 = 1 << 64;

/// A layout of 4 KiB pages and its blocks' bases: `(pages, gap before)` per block, the last
/// block ending exactly at 2^64 when `at_top`, else the first starting at `low`.
#[derive(Clone, Debug)]
struct Placed {
    layout: RamLayout,
    bases: Vec<u64>,
    pages: Vec<u64>,
}

fn placed() -> impl Strategy<Value = Placed> {
    (
        prop::collection::vec((1u64..200, 0u64..4), 1..4),
        any::<bool>(),
        0u64..(1 << 40),
    )
        .prop_map(|(blocks, at_top, low)| {
            let total: u128 = blocks
                .iter()
                .map(|&(p, gap)| u128::from(p + gap) * PAGE)
                .sum();
            let mut at = if at_top {
                TOP - total
            } else {
                u128::from(low) * PAGE
            };
            let mut bases = vec![];
            for &(p, gap) in &blocks {
                at += u128::from(gap) * PAGE;
                bases.push(u64::try_from(at).unwrap());
                at += u128::from(p) * PAGE;
            }
            let layout = RamLayout::new(
                4096,
                blocks
                    .iter()
                    .enumerate()
                    .map(|(i, &(p, _))| BlockSpec::new(format!("b{i}"), p * 4096, 4096)),
            )
            .unwrap();
            Placed {
                layout,
                bases,
                pages: blocks.iter().map(|&(p, _)| p).collect(),
            }
        })
}

/// The model's dirty ranges: coalesced runs of set bits, as (gpa, len) in u128.
fn model_ranges(base: u128, from_word: u64, words: &[u64]) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = vec![];
    for (i, w) in words.iter().enumerate() {
        for bit in 0..64 {
            if w >> bit & 1 == 1 {
                let page = u128::from(from_word) * 64 + i as u128 * 64 + bit;
                let gpa = base + page * PAGE;
                match out.last_mut() {
                    Some((g, l)) if *g + *l == gpa => *l += PAGE,
                    _ => out.push((gpa, PAGE)),
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn i8_dirty_ranges_match_a_u128_model(
        p in placed(),
        pick in any::<prop::sample::Index>(),
        from in 0u64..6,
        len in 0usize..6,
        seed in prop::collection::vec(any::<u64>(), 6),
        sparse in any::<bool>(),
    ) {
        let map = GpaMap::new(&p.layout, &p.bases).unwrap();
        let b = pick.index(p.pages.len());
        let pages = p.pages[b];
        let block_words = pages.div_ceil(64);
        let words: Vec<u64> = seed[..len]
            .iter()
            .map(|&w| if sparse { w & w >> 7 & w >> 13 } else { w })
            .collect();
        let got = map.dirty_ranges(b as u32, from as usize, &words);
        let past_words = from + len as u64 > block_words;
        let tail = pages % 64;
        let past_end = !past_words
            && from + len as u64 == block_words
            && tail != 0
            && words.last().is_some_and(|w| w >> tail != 0);
        match got {
            Err(GpaError::Location(_)) => prop_assert!(past_words),
            Err(GpaError::BitsPastEnd { block }) => {
                prop_assert!(past_end);
                prop_assert_eq!(block, b as u32);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
            Ok(ranges) => {
                prop_assert!(!past_words && !past_end);
                let got: Vec<(u128, u128)> = ranges
                    .map(|r: GpaRange| (u128::from(r.gpa), u128::from(r.len)))
                    .collect();
                let base = u128::from(p.bases[b]);
                let want = model_ranges(base, from, &words);
                prop_assert_eq!(&got, &want);
                for (g, l) in got {
                    // Inside the block, which lies inside the address space.
                    prop_assert!(g >= base && g + l <= base + u128::from(pages) * PAGE);
                    prop_assert!(g + l <= TOP);
                }
            }
        }
    }

    #[test]
    fn i8_conversions_match_a_u128_model(
        p in placed(),
        pick in any::<prop::sample::Index>(),
        off in any::<u64>(),
        len in prop_oneof![Just(0u64), 1u64..10_000, Just(u64::MAX)],
        outside in any::<bool>(),
    ) {
        let map = GpaMap::new(&p.layout, &p.bases).unwrap();
        let b = pick.index(p.pages.len());
        let base = u128::from(p.bases[b]);
        let bytes = u128::from(p.pages[b]) * PAGE;
        // An address inside block b, or anywhere.
        let gpa = if outside {
            off
        } else {
            u64::try_from(base + u128::from(off) % bytes).unwrap()
        };
        let g = u128::from(gpa);
        let holder = (0..p.pages.len()).find(|&i| {
            let base = u128::from(p.bases[i]);
            g >= base && g < base + u128::from(p.pages[i]) * PAGE
        });
        match (map.location(gpa), holder) {
            (Ok(loc), Some(i)) => {
                let page = (g - u128::from(p.bases[i])) / PAGE;
                prop_assert_eq!(loc, PageLocation::new(i as u32, page as u64));
                let back = u128::from(map.gpa(loc).unwrap());
                prop_assert_eq!(back, g - g % PAGE);
            }
            (Err(GpaError::Unmapped { .. }), None) => {}
            (got, want) => prop_assert!(false, "location({gpa:#x}) = {got:?}, model {want:?}"),
        }
        let fits = holder.is_some_and(|i| {
            let end = u128::from(p.bases[i]) + u128::from(p.pages[i]) * PAGE;
            g + u128::from(len) <= end
        });
        match map.request(gpa, len) {
            Ok(req) => {
                prop_assert!(len > 0 && fits);
                let i = holder.unwrap();
                prop_assert_eq!(req.block, i as u32);
                prop_assert_eq!(u128::from(req.offset), g - u128::from(p.bases[i]));
                prop_assert_eq!(req.len, len);
            }
            Err(GpaError::ZeroLength { gpa: at }) => {
                prop_assert_eq!(len, 0);
                prop_assert_eq!(at, gpa);
            }
            Err(GpaError::Unmapped { .. }) => prop_assert!(len > 0 && !fits),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

/// The two reports, as regression tests: a bit past block a's end is not block b's
/// page, and a one-page block at the top of the address space neither panics nor reports
/// pages past 2^64.
#[test]
fn i8_words_past_a_block_are_refused_also_at_the_top() {
    let two: RamLayout = "a:4K,b:4K".parse().unwrap();
    let map = GpaMap::new(&two, &[0, 0x1000]).unwrap();
    assert_eq!(
        map.dirty_ranges(0, 0, &[0b10]).unwrap_err(),
        GpaError::BitsPastEnd { block: 0 }
    );
    let one = RamLayout::single("top", 4096, 4096).unwrap();
    let top = GpaMap::new(&one, &[u64::MAX - 4095]).unwrap();
    assert_eq!(
        top.dirty_ranges(0, 0, &[0b10]).unwrap_err(),
        GpaError::BitsPastEnd { block: 0 }
    );
    assert!(top.dirty_ranges(0, 0, &[!0]).is_err());
    let ranges: Vec<GpaRange> = top.dirty_ranges(0, 0, &[1]).unwrap().collect();
    assert_eq!(
        ranges,
        [GpaRange {
            gpa: u64::MAX - 4095,
            len: 4096
        }]
    );
    assert!(top.dirty_ranges(0, 1, &[]).unwrap().next().is_none());
    assert!(top.dirty_ranges(0, 1, &[0]).is_err());
    assert!(top.dirty_ranges(0, usize::MAX, &[0]).is_err());
}
