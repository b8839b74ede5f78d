//! Property test: the page hint's encoding and its single-threaded behaviour (I4, I8).
//!
//! * `pack`/`unpack` round-trip every location that fits (block < 2^23, page < 2^40), the
//!   packing is one-to-one and never yields the empty word, and a location that does not fit
//!   is refused with an error naming it: never a silent truncation.
//! * Random sequences of offer/take/peek/clear against an `Option` model: set-if-empty, take
//!   at most once, an empty take gives nothing, a refused location leaves the cell untouched.

use pagehint::hint::{self, Offer, PackError};
use pagehint::layout::{BLOCK_BITS, PAGE_BITS};
use pagehint::{PageHint, PageLocation};
use proptest::prelude::*;

const MAX_BLOCK: u32 = (1 << BLOCK_BITS) - 1;
const MAX_PAGE: u64 = (1 << PAGE_BITS) - 1;

/// Locations that fit the packing, with the edges weighted in.
fn fitting() -> impl Strategy<Value = PageLocation> {
    let block = prop_oneof![Just(0), Just(MAX_BLOCK), 0..=MAX_BLOCK];
    let page = prop_oneof![Just(0), Just(MAX_PAGE), 0..=MAX_PAGE];
    (block, page).prop_map(|(b, p)| PageLocation::new(b, p))
}

/// Locations that do not fit: the block, the page, or both too large.
fn too_large() -> impl Strategy<Value = PageLocation> {
    prop_oneof![
        (MAX_BLOCK + 1..=u32::MAX, any::<u64>()),
        (any::<u32>(), MAX_PAGE + 1..=u64::MAX),
        (Just(MAX_BLOCK + 1), Just(MAX_PAGE + 1)),
    ]
    .prop_map(|(b, p)| PageLocation::new(b, p))
}

fn any_location() -> impl Strategy<Value = PageLocation> {
    prop_oneof![4 => fitting(), 1 => too_large()]
}

#[derive(Clone, Debug)]
enum Op {
    Offer(PageLocation),
    Take,
    Peek,
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any_location().prop_map(Op::Offer),
        3 => Just(Op::Take),
        1 => Just(Op::Peek),
        1 => Just(Op::Clear),
    ]
}

fn fits(loc: PageLocation) -> bool {
    loc.block <= MAX_BLOCK && loc.page <= MAX_PAGE
}

proptest! {
    #[test]
    fn i4_pack_round_trips_every_fitting_location(loc in fitting()) {
        let word = hint::pack(loc).unwrap();
        prop_assert_ne!(word, 0, "a packed hint must not look like the empty cell");
        prop_assert_eq!(hint::unpack(word), Some(loc));
    }

    #[test]
    fn i4_pack_is_one_to_one(a in fitting(), b in fitting()) {
        prop_assert_eq!(hint::pack(a).unwrap() == hint::pack(b).unwrap(), a == b);
    }

    #[test]
    fn i8_locations_that_do_not_fit_are_refused(loc in too_large()) {
        prop_assert_eq!(hint::pack(loc), Err(PackError { location: loc }));
        let cell = PageHint::new();
        prop_assert_eq!(cell.offer(loc), Err(PackError { location: loc }));
        prop_assert_eq!(cell.peek(), None, "a refused location leaves the cell untouched");
    }

    #[test]
    fn i4_unpack_reads_only_words_with_the_valid_bit(word in any::<u64>()) {
        match hint::unpack(word) {
            None => prop_assert_eq!(word >> 63, 0),
            // Every valid word names a fitting location, and packs back to itself.
            Some(loc) => {
                prop_assert!(fits(loc));
                prop_assert_eq!(hint::pack(loc), Ok(word));
            }
        }
    }

    #[test]
    fn i4_offer_take_match_a_single_slot_model(ops in prop::collection::vec(op(), 1..80)) {
        let cell = PageHint::new();
        let mut model: Option<PageLocation> = None;
        for op in ops {
            match op {
                Op::Offer(loc) => {
                    let got = cell.offer(loc);
                    if !fits(loc) {
                        prop_assert_eq!(got, Err(PackError { location: loc }));
                    } else if model.is_some() {
                        // Set-if-empty: a pending hint is never overwritten.
                        prop_assert_eq!(got, Ok(Offer::Pending));
                    } else {
                        prop_assert_eq!(got, Ok(Offer::Accepted));
                        model = Some(loc);
                    }
                }
                // At most once; an empty take gives nothing.
                Op::Take => prop_assert_eq!(cell.take(), model.take()),
                Op::Peek => prop_assert_eq!(cell.peek(), model),
                Op::Clear => {
                    cell.clear();
                    model = None;
                }
            }
            prop_assert_eq!(cell.peek(), model);
        }
    }
}
