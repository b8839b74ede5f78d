//! The model's threads and shared atomics: the same checker as `pagehint`'s own shim.
//!
//! `pagehint` picks loom's atomics under `--cfg pagehint_loom` and shuttle's under
//! `--cfg pagehint_shuttle`; `cargo shuttle` sets that cfg together with this crate's `shuttle`
//! feature (the crate refuses to build with the cfg alone, or the feature alone). The models and the mutants use
//! the same choice here, so a mutant runs on exactly the atomics the real code runs on and the
//! same checker explores both. Without either, the models run on std threads
//! (one schedule per run: a smoke test, not a check).

#[cfg(pagehint_loom)]
pub use loom::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard, RwLock},
    thread,
};

#[cfg(all(pagehint_shuttle, not(pagehint_loom)))]
pub use shuttle::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard, RwLock},
    thread,
};

#[cfg(not(any(pagehint_loom, pagehint_shuttle)))]
pub use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard, RwLock},
    thread,
};

/// A word of guest memory in the models (see [`crate::record::GuestPages`]).
///
/// Under loom it is a loom atomic, so loom checks that whoever collects a dirty mark sees the
/// page contents written before it (the bitmap's release/acquire contract). Shuttle's
/// atomics are sequentially consistent, so there a plain std atomic checks the same thing
/// without adding a scheduling point per page copied (a 2 MiB-style host page has 512).
#[cfg(pagehint_loom)]
pub type ContentWord = loom::sync::atomic::AtomicU64;

/// A word of guest memory in the models (see [`crate::record::GuestPages`]).
#[cfg(not(pagehint_loom))]
pub type ContentWord = std::sync::atomic::AtomicU64;
