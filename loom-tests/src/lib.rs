//! Model checks of `pagehint`'s protocols, run by `cargo loom` (loom: every interleaving and
//! weak-memory outcome of small cases) and `cargo shuttle` (shuttle: random, PCT and DFS
//! schedules of bigger cases). The invariant IDs (I1–I7) are those of the shared design doc.
//!
//! Each model is a generic function over a small trait that the real type implements, and so
//! does at least one deliberately broken *mutant*, built here on the same shim atomics
//! ([`sync`]). The test files run every model on the real type (it must pass) and on its
//! mutants (`#[should_panic(expected = "<invariant>")]`: the same checker must catch them).
//!
//! | model | real type | mutants |
//! |---|---|---|
//! | [`hint::i4_offer_take_model`] | `PageHint` | [`hint::OverwritingOffer`], [`hint::LoadThenStoreTake`], [`hint::SplitWordHint`], [`hint::RelaxedHint`] |
//! | [`bitmap::i1_two_claimers_one_page`] | `DirtyBitmap` | [`flawed::LoadThenStoreClaim`] |
//! | [`bitmap::i1_i2_two_claimers_one_host_page`] | `DirtyBitmap` | [`flawed::SplitHostPageClaim`], [`flawed::NoSummaryElection`] |
//! | [`bitmap::i7_mark_races_claim`] | `DirtyBitmap` | [`flawed::LoadThenStoreClaim`], [`flawed::SummaryBeforePageBit`], [`flawed::RelaxedOrderings`] |
//! | [`protocol::protocol_model`] | `PageScheduler` | [`protocol::TrustingScanner`], [`protocol::CheckThenSendScanner`] |
//! | [`precopy::precopy_model`] | `DirtyBitmap`, `PageScheduler` | [`flawed::SummaryBeforePageBit`], [`flawed::LoadThenStoreClaim`] |
//!
//! The bitmap models also run on [`flawed::FlawedBitmap<NoFlaw>`](flawed::NoFlaw), the
//! mutants' unbroken base, which must pass: each mutant fails for its one flaw. Loom checks
//! the small cases (`tests/loom_*.rs`), shuttle the big ones (`tests/shuttle_*.rs`); without
//! either, `tests/smoke_std.rs` runs the models once on std threads so that
//! `cargo test --workspace` exercises them too, with `--all-features` as well (both features
//! and no cfg: the std build; the cfgs, not the features, choose the checker).

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
pub mod flawed;
pub mod hint;
pub mod precopy;
pub mod protocol;
pub mod record;
pub mod sync;
