//! Layouts the constructor accepts have accessors that never wrap or panic; layouts whose
//! bytes do not fit 64 bits are refused with a typed error.

use pagehint::{BlockSpec, LayoutError, PageLocation, RamLayout};
use proptest::prelude::*;

#[test]
fn layouts_of_2_pow_64_bytes_or_more_are_refused() {
    let two = "target=8M;a:8388608T:8M,b:8388608T:8M".parse::<RamLayout>();
    assert!(
        matches!(two, Err(LayoutError::TotalTooLarge { .. })),
        "{two:?}"
    );
    let many = RamLayout::new(
        4096,
        (0..4096).map(|i| BlockSpec::new(format!("b{i}"), 1 << 52, 4096)),
    );
    assert!(
        matches!(many, Err(LayoutError::TotalTooLarge { .. })),
        "{many:?}"
    );
    // One page less than the limit is fine, and total_bytes is exact.
    let most = RamLayout::new(
        4096,
        (0..4095)
            .map(|i| BlockSpec::new(format!("b{i}"), 1 << 52, 4096))
            .chain([BlockSpec::new("last", (1 << 52) - 4096, 4096)]),
    )
    .unwrap();
    assert_eq!(most.total_bytes(), u64::MAX - 4095);
}

fn spec() -> impl Strategy<Value = (u32, Vec<(u64, u32)>)> {
    // target shift 12..=23; blocks: (host pages, host shift above target)
    (
        12u32..=23,
        prop::collection::vec((1u64..=(1 << 40), 0u32..=9), 1..6),
    )
}

proptest! {
    #[test]
    fn accepted_layouts_have_exact_accessors((target_shift, blocks) in spec()) {
        let target = 1u64 << target_shift;
        let specs: Vec<BlockSpec> = blocks
            .iter()
            .enumerate()
            .map(|(i, &(host_pages, hs))| {
                let host = target << hs;
                BlockSpec::new(format!("b{i}"), host_pages.saturating_mul(host), host)
            })
            .collect();
        let want_bytes: u128 = specs.iter().map(|s| s.len as u128).sum();
        match RamLayout::new(target, specs.clone()) {
            Ok(l) => {
                prop_assert!(want_bytes < 1u128 << 64);
                prop_assert_eq!(l.total_bytes() as u128, want_bytes);
                prop_assert_eq!(l.total_pages() as u128, want_bytes >> target_shift);
                let last = l.location_of(l.total_pages() - 1).unwrap();
                prop_assert_eq!(l.global_index(last).unwrap(), l.total_pages() - 1);
                prop_assert_eq!(l.next_location(last).unwrap(), PageLocation::new(0, 0));
                for (i, b) in l.blocks().iter().enumerate() {
                    let end = PageLocation::new(i as u32, b.pages() - 1);
                    let hp = l.host_page_of(end).unwrap();
                    prop_assert!(hp.contains(end));
                    prop_assert_eq!(hp.first_page + hp.pages, b.pages());
                    prop_assert!(l.location_of(b.first_global_page() + b.pages()).is_ok()
                        || i + 1 == l.blocks().len());
                }
            }
            Err(LayoutError::TotalTooLarge { .. }) => prop_assert!(want_bytes >= 1u128 << 64),
            Err(LayoutError::BlockTooLarge { .. } | LayoutError::BadBlockLength { .. }) => {
                // a block of more than 2^40 pages, or a length that saturated
                prop_assert!(specs.iter().any(|s| (s.len >> target_shift) > (1 << 40) || s.len == u64::MAX));
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}
