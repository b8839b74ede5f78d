//! The one place that chooses the gate's lock and atomics, as the root crate's own shim does:
//! std by default, loom's under `--cfg pagehint_loom` (`cargo loom`), shuttle's under
//! `--cfg pagehint_shuttle` (`cargo shuttle`), so the models in `loom-tests` drive the
//! handler's real gate. No other module names loom or shuttle.
//!
//! The gate is a crate of its own because `pagehint-migrate` as a whole does not build under
//! those cfgs (its postcopy source hands std `Arc`s to `pagehint`, whose API takes the
//! checker's `Arc` there), and it needs nothing from the harness.

#[cfg(pagehint_loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, Ordering},
    RwLock, RwLockWriteGuard,
};

#[cfg(all(pagehint_shuttle, not(pagehint_loom)))]
pub(crate) use shuttle::sync::{
    atomic::{AtomicBool, Ordering},
    RwLock, RwLockWriteGuard,
};

#[cfg(not(any(pagehint_loom, pagehint_shuttle)))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, Ordering},
    RwLock, RwLockWriteGuard,
};
