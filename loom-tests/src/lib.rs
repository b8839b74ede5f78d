//! Model checks of `pagehint`'s protocols, run by `cargo loom` (loom: every interleaving and
//! weak-memory outcome of small cases) and `cargo shuttle` (shuttle: random, PCT and DFS
//! schedules of bigger cases). The invariant IDs (I1–I8) are those of `pagehint::design`.
//!
//! # Where models and mutants live (one rule)
//! * A model, the small trait it is generic over, its real implementations and its mutants
//!   live in `src/<subject>.rs`; the bitmap's mutants share one framework, [`flawed`]
//!   (`FlawedBitmap<F>`: the bitmap rewritten small on the shim, one [`flawed::BitmapFlaw`]
//!   chosen by a type parameter); a subject whose mutants are rewrites of a scanner keeps the
//!   rewrite beside its model, with the flaw as a const parameter and the control (no flaw)
//!   passing the same model.
//! * `tests/loom_<subject>.rs` runs the models under loom, `tests/shuttle_<subject>.rs` under
//!   shuttle: they only choose cases and checkers, and run every mutant with
//!   `#[should_panic(expected = "<invariant>")]`: the same checker must catch it.
//! * `tests/smoke_std.rs` runs every model once on std threads, on the real types and the
//!   controls, so that `cargo test --workspace` (with `--all-features` too: both features and
//!   no cfg is the std build; the cfgs, not the features, choose the checker) keeps them
//!   running.
//! * Shared helpers live here: [`record`] (what was sent, exactly once; no dirty host page left
//!   when a sender reports done; guest page contents),
//!   [`sync`] (the checker's threads and primitives), layouts and [`bitmap::pages_of`].
//!
//! # Catalogue
//! | model | subject | real type | mutants | loom | shuttle |
//! |---|---|---|---|---|---|
//! | [`hint::i4_offer_take_model`] | hint (I4) | `PageHint` | [`hint::OverwritingOffer`], [`hint::LoadThenStoreTake`], [`hint::SplitWordHint`], [`hint::RelaxedHint`] | `loom_hint` | — |
//! | [`bitmap::i1_two_claimers_one_page`] | bitmap (I1) | `DirtyBitmap` | [`flawed::LoadThenStoreClaim`] | `loom_bitmap` | — |
//! | [`bitmap::i1_i2_two_claimers_one_host_page`] | bitmap (I1, I2) | `DirtyBitmap` | [`flawed::SplitHostPageClaim`], [`flawed::NoSummaryElection`] | `loom_bitmap` | — |
//! | [`bitmap::i7_mark_races_claim`] | bitmap (I7) | `DirtyBitmap` | [`flawed::LoadThenStoreClaim`], [`flawed::SummaryBeforePageBit`], [`flawed::RelaxedOrderings`] | `loom_bitmap` | — |
//! | [`bitmap::i1_i2_drain_and_claim_one_owner`] | drain (I1, I2) | `DirtyBitmap` | [`flawed::NoSummaryElection`] | `loom_bitmap` | — |
//! | [`bitmap::i7_mark_races_drain`] | drain (I7) | `DirtyBitmap` | [`flawed::SummaryClearedLast`], [`flawed::RelaxedOrderings`] | `loom_bitmap` | — |
//! | [`count::count_model`], [`count::count_range_model`] | the O(1) dirty count in per-thread slots (exact when quiet, within `0..=pages` while running) | `DirtyBitmap`; the control [`count::ControlCount`] | [`count::LoadThenCountClaim`], [`count::LoadThenCountMark`], [`count::SharedOwnedSlot`] | `loom_count` | `shuttle_count` |
//! | [`count::handover_model`] | a count slot handed from an exiting thread to the next | the control [`count::AcquireRelease`] (the registry's orderings) | [`count::RelaxedHandover`] | `loom_count` | `shuttle_count` (control only) |
//! | [`protocol::protocol_model`] | postcopy (I1–I3, I5, I6) | `PageScheduler` | [`protocol::TrustingScanner`], [`protocol::CheckThenSendScanner`] | `loom_protocol` | `shuttle_protocol` |
//! | [`range::range_model`] | range requests racing the scanner (I1, I2, I3, I5) | `PageScheduler` (`serve_range`) | [`range::FirstPageOnly`] (the old `serve`: first host page only) | `loom_range` | `shuttle_range` |
//! | [`vanilla::vanilla_model`] | vanilla mode (I1–I3, I5) | `PageScheduler` | [`vanilla::OverwritingSlotRewrite`], [`vanilla::SendRequestedUnclaimedRewrite`] | `loom_vanilla` | `shuttle_vanilla` |
//! | [`multi::senders_and_urgent`] | several senders (I1–I4) | `PageScheduler` | [`multi::Rewrite`]`<true>` (pooled sweep counts) | `loom_multi` | `shuttle_multi` |
//! | [`recovery::handoff_model`] | recovery handoff at a cut (I1) | `PageScheduler` (`recover_shared`), the harness's handoff as [`recovery::JoinThenSnapshot`] | [`recovery::SnapshotThenJoin`] | `loom_recovery` | `shuttle_recovery` |
//! | [`remove::remove_model`] | `UFFD_EVENT_REMOVE` against prefetchers (R1–R3) | `RemoveGate` (`pagehint-uffd-gate`), `PageScheduler` | [`remove::MarkAfterUnlock`], [`remove::CopyWithoutReadSide`] | `loom_remove` | `shuttle_remove` |
//! | [`overtake::duplicate_pair_model`], [`overtake::overtake_model`] | deliberate duplicates: an urgent resend overtaking the background copy (I1, no stale overwrite, no lost request) | `CopyLedger`, `PageScheduler`; the control [`overtake::ControlGate`] | [`overtake::PlaceEachKind`], [`overtake::DropStillCopies`], [`overtake::ExpectResend`] | `loom_overtake` | `shuttle_overtake` |
//! | [`streams::i4_slots_model`] | one hint slot per stream (I4 per slot) | `HintSlots` | [`streams::SharedSlot`], [`streams::SharedOverwritingSlot`] | `loom_streams` | — |
//! | [`streams::streams_model`] | several fault streams: cursors beside the linear scan (I1–I6) | `PageScheduler` (`HintPolicy::PerStream`), the control [`streams::ControlRewrite`] | [`streams::NeverYields`], [`streams::NeverRetired`], [`streams::KeepsTurn`], [`streams::JumpKeepsCount`] | `loom_streams` | `shuttle_streams` |
//! | [`precopy::precopy_model`] | precopy (I7) | `DirtyBitmap`, `PageScheduler` | [`flawed::SummaryBeforePageBit`], [`flawed::LoadThenStoreClaim`] | — | `shuttle_precopy` |
//!
//! The bitmap models also run on [`flawed::FlawedBitmap<NoFlaw>`](flawed::NoFlaw), the
//! mutants' unbroken base, which must pass: each mutant fails for its one flaw. The
//! guarantees and the map of every check are in `pagehint::design`.

// `--all-features` sets both features and no cfg: that builds the plain std models (the smoke
// tests), so only one feature without its cfg is the sign of a lost `build.rustflags`.
#[cfg(all(feature = "loom", not(feature = "shuttle"), not(pagehint_loom)))]
compile_error!(
    "the `loom` feature is set by `cargo loom`, which also passes `--cfg pagehint_loom` through \
     build.rustflags; that cfg is missing (a RUSTFLAGS or CARGO_ENCODED_RUSTFLAGS environment \
     variable overrides build.rustflags), so the loom models would be compiled out"
);

#[cfg(any(
    all(feature = "shuttle", not(feature = "loom"), not(pagehint_shuttle)),
    all(pagehint_shuttle, not(feature = "shuttle"))
))]
compile_error!(
    "`cargo shuttle` sets both the `shuttle` feature (the models on shuttle's threads) and \
     `--cfg pagehint_shuttle` (pagehint on shuttle's atomics) through build.rustflags; one of \
     them is missing (a RUSTFLAGS or CARGO_ENCODED_RUSTFLAGS environment variable overrides \
     build.rustflags), and shuttle's atomics panic outside shuttle's threads"
);

pub mod bitmap;
pub mod count;
pub mod flawed;
pub mod hint;
pub mod multi;
pub mod overtake;
pub mod precopy;
pub mod protocol;
pub mod range;
pub mod record;
pub mod recovery;
pub mod remove;
pub mod streams;
pub mod sync;
pub mod vanilla;
