//! Layout descriptions (I8): `RamLayout::parse` on arbitrary text must return a typed error
//! or a layout that keeps every promise `RamLayout` documents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagehint::layout::{MAX_BLOCKS, MAX_BLOCK_PAGES};
use pagehint::{PageLocation, RamLayout};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(layout) = RamLayout::parse(text) else {
        return;
    };
    assert!(layout.target_page_size().is_power_of_two());
    assert!(!layout.blocks().is_empty() && layout.blocks().len() <= MAX_BLOCKS);
    let mut total = 0u64;
    for (i, b) in layout.blocks().iter().enumerate() {
        assert!(b.pages() > 0 && b.pages() <= MAX_BLOCK_PAGES);
        assert!(b.host_page_pages().is_power_of_two());
        assert_eq!(b.pages() % b.host_page_pages(), 0, "a host page cut by the block end");
        assert_eq!(b.first_global_page(), total);
        assert_eq!(layout.block_index(b.name()), Some(i as u32));
        // the last page of the block maps to its host page and back
        let last = PageLocation::new(i as u32, b.pages() - 1);
        let hp = layout.host_page_of(last).expect("in the layout");
        assert!(hp.contains(last));
        assert_eq!(layout.location_of(layout.global_index(last).unwrap()), Ok(last));
        total += b.pages();
    }
    assert_eq!(total, layout.total_pages());
    // the description of a valid layout parses to the same layout
    let again: String = layout
        .blocks()
        .iter()
        .map(|b| {
            format!(
                "{}:{}:{}",
                b.name(),
                b.pages() << layout.target_page_shift(),
                b.host_page_pages() << layout.target_page_shift()
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let again = format!("target={};{again}", layout.target_page_size());
    assert_eq!(RamLayout::parse(&again).as_ref(), Ok(&layout));
});
