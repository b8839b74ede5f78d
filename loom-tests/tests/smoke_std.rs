//! The models on plain std threads, once each: not a check of interleavings (that is what
//! `cargo loom` and `cargo shuttle` do), but it keeps the shared model code running under
//! `cargo test --workspace`, so a model that no longer passes on the real types is noticed
//! there too.
#![cfg(not(any(pagehint_loom, pagehint_shuttle)))]

use pagehint::{BlockSpec, ClaimBatch, DirtyBitmap, PageHint, PageLocation, PageScheduler};
use pagehint::{RamLayout, SchedulerConfig};
use pagehint_models::bitmap::{
    self as model, drain_narrow_layout, drain_wide_layout, narrow_layout, wide_layout, Mark,
};
use pagehint_models::flawed::{FlawedBitmap, NoFlaw};
use pagehint_models::hint::{i4_offer_take_model, TWO_OFFERERS, TWO_TAKERS};
use pagehint_models::multi::{senders_and_urgent, Rewrite};
use pagehint_models::overtake::{
    duplicate_pair_model, overtake_model, ControlGate as OvertakeControl, OvertakeCase,
};
use pagehint_models::precopy::{precopy_model, PrecopyCase};
use pagehint_models::protocol::{protocol_model, ProtocolCase};
use pagehint_models::remove::{remove_model, ControlGate, RemoveCase};
use pagehint_models::streams::{
    i4_slots_model, streams_model, ControlRewrite as StreamsControl, StreamsCase,
};
use pagehint_models::vanilla::{vanilla_model, ControlRewrite, VanillaCase};

fn loc(page: u64) -> PageLocation {
    PageLocation::new(0, page)
}

#[test]
fn hint_models_pass_on_the_real_slot() {
    i4_offer_take_model::<PageHint>(TWO_OFFERERS);
    i4_offer_take_model::<PageHint>(TWO_TAKERS);
}

#[test]
fn streams_models_pass_on_the_real_types_and_the_control() {
    i4_slots_model::<pagehint::HintSlots>();
    let case = StreamsCase {
        layout: RamLayout::new(
            4096,
            [
                BlockSpec::new("cold", 8 * 4096, 2 * 4096),
                BlockSpec::new("hot", 64 * 4096, 2 * 4096),
            ],
        )
        .unwrap(),
        policy: pagehint::StreamPolicy::new(4)
            .unwrap()
            .with_run(6)
            .unwrap()
            .with_share(2)
            .unwrap(),
        requests: (0..12)
            .map(|i| (i % 4, PageLocation::new(1, 5 * u64::from(i) + 3)))
            .collect(),
        return_paths: 2,
        stray_hints: vec![(1, PageLocation::new(0, 3)), (2, PageLocation::new(7, 0))],
    };
    streams_model::<PageScheduler>(&case);
    streams_model::<StreamsControl>(&case);
}

#[test]
fn bitmap_models_pass_on_the_real_bitmap_and_the_control() {
    fn all<B: model::ModelBitmap>() {
        model::i1_two_claimers_one_page::<B>(5);
        let (n, w) = (narrow_layout(), wide_layout());
        model::i1_i2_two_claimers_one_host_page::<B>(
            &n,
            &[loc(5), loc(7)],
            [loc(4), loc(7)],
            loc(9),
        );
        model::i1_i2_two_claimers_one_host_page::<B>(
            &w,
            &[loc(3), loc(100)],
            [loc(3), loc(100)],
            loc(200),
        );
        model::i7_mark_races_claim::<B>(&n, loc(1), &Mark::Page(loc(5)));
        model::i7_mark_races_claim::<B>(&w, loc(3), &Mark::Page(loc(100)));
        model::i1_i2_drain_and_claim_one_owner::<B>();
        for layout in [drain_wide_layout(), drain_narrow_layout()] {
            model::i7_mark_races_drain::<B>(&layout, &Mark::Page(loc(70)));
        }
    }
    all::<DirtyBitmap>();
    all::<FlawedBitmap<NoFlaw>>();
}

#[test]
fn protocol_and_precopy_models_pass_on_the_real_scheduler() {
    let layout = RamLayout::new(
        4096,
        [
            BlockSpec::new("low", 256 * 4096, 4096),
            BlockSpec::new("huge", 1024 * 4096, 2 << 20),
        ],
    )
    .unwrap();
    protocol_model::<PageScheduler>(&ProtocolCase {
        layout: layout.clone(),
        config: SchedulerConfig::preempt_hint().with_batch(ClaimBatch::DEFAULT),
        requests: vec![PageLocation::new(1, 700), PageLocation::new(0, 3)],
        stray_hints: vec![PageLocation::new(1, 1023), PageLocation::new(5, 0)],
        scanners: 2,
    });
    let range = |block, first, count| Mark::Range {
        block,
        first,
        count,
    };
    precopy_model::<PageScheduler>(&PrecopyCase {
        layout,
        initial: vec![range(0, 10, 70), range(1, 500, 30)],
        batches: vec![vec![range(1, 510, 4), Mark::Page(PageLocation::new(0, 3))]],
        senders: 2,
        rounds: 2,
    });
}

#[test]
fn vanilla_model_passes_on_the_real_scheduler_and_the_control() {
    let case = VanillaCase {
        layout: RamLayout::new(4096, [BlockSpec::new("ram", 256 * 4096, 2 * 4096)]).unwrap(),
        requests: (0..16)
            .map(|i| PageLocation::new(0, i * 37 % 256))
            .collect(),
    };
    vanilla_model::<PageScheduler>(&case);
    vanilla_model::<ControlRewrite>(&case);
}

#[test]
fn multi_sender_model_passes_on_the_real_scheduler_and_the_control() {
    let layout = RamLayout::new(
        4096,
        [
            BlockSpec::new("low", 64 * 4096, 2 * 4096),
            BlockSpec::new("huge", 512 * 4096, 128 * 4096),
        ],
    )
    .unwrap();
    let faults = [PageLocation::new(0, 5), PageLocation::new(1, 300)];
    senders_and_urgent::<PageScheduler>(&layout, 3, &faults);
    senders_and_urgent::<Rewrite<false>>(&layout, 3, &faults);
}

#[test]
fn recovery_handoff_model_passes_with_the_harness_order() {
    for before_cut in 0..4 {
        pagehint_models::recovery::handoff_model::<false>(
            &pagehint_models::recovery::HandoffCase {
                pages: 64,
                batch: 4,
                before_cut,
            },
        );
    }
}

#[test]
fn remove_model_passes_on_the_real_gate_and_the_control() {
    for hint in [false, true] {
        let case = RemoveCase {
            host_pages: 16,
            prefetchers: 2,
            hint,
            removes: vec![(9, 12), (14, 15), (10, 13)],
            touches: vec![1, 5, 3],
        };
        remove_model::<pagehint_uffd_gate::RemoveGate>(&case);
        remove_model::<ControlGate>(&case);
    }
}

#[test]
fn overtake_models_pass_on_the_real_ledger_and_the_control() {
    duplicate_pair_model::<pagehint::CopyLedger>();
    duplicate_pair_model::<OvertakeControl>();
    let case = OvertakeCase {
        pages: 8,
        batch: 2,
        requests: vec![1, 2, 5, 3],
    };
    overtake_model::<pagehint::CopyLedger>(&case);
    overtake_model::<OvertakeControl>(&case);
}

#[test]
fn range_model_passes_on_the_real_scheduler() {
    use pagehint_models::range::{range_model, RangeCase};
    let layout = RamLayout::new(
        4096,
        [
            BlockSpec::new("low", 256 * 4096, 2 * 4096),
            BlockSpec::new("huge", 512 * 4096, 128 * 4096),
        ],
    )
    .unwrap();
    for config in [SchedulerConfig::preempt_hint(), SchedulerConfig::vanilla()] {
        range_model::<PageScheduler>(&RangeCase {
            layout: layout.clone(),
            config: config.with_batch(ClaimBatch::HOST_PAGE),
            requests: vec![(0, 60, 10), (1, 100, 300), (0, 0, 256)],
        });
    }
}

#[test]
#[should_panic(expected = "I5: host page at")]
fn range_mutant_is_caught_even_on_std_threads() {
    use pagehint_models::range::{range_model, FirstPageOnly, RangeCase};
    range_model::<FirstPageOnly>(&RangeCase {
        layout: RamLayout::new(4096, [BlockSpec::new("low", 64 * 4096, 2 * 4096)]).unwrap(),
        config: SchedulerConfig::preempt_hint(),
        requests: vec![(0, 10, 8)],
    });
}

#[test]
fn count_model_passes_on_the_real_bitmap_and_the_control() {
    use pagehint_models::count::{count_model, count_range_model, handover_model, ControlCount};
    for drainer in [false, true] {
        count_model::<DirtyBitmap>(drainer);
        count_model::<ControlCount>(drainer);
        count_range_model::<DirtyBitmap>(drainer);
        count_range_model::<ControlCount>(drainer);
    }
    handover_model::<false>();
}
