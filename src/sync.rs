//! The one place that chooses which atomics the crate uses.
//!
//! * default: `core::sync::atomic`;
//! * `--cfg pagehint_loom` (set by `cargo loom`): loom's atomics, so every interleaving and
//!   every weak-memory outcome allowed by C11 is explored;
//! * `--cfg pagehint_shuttle` (set by `cargo shuttle`): shuttle's atomics, so shuttle's
//!   scheduler controls every atomic step.
//!
//! We use our own cfg names (as crossbeam does with `crossbeam_loom`) so that a global
//! `--cfg loom` for another crate does not flip ours. Shuttle is a cfg, not a cargo feature:
//! shuttle's atomics panic outside a shuttle test, and a feature would be switched on by
//! `cargo test --all-features`, breaking every ordinary test. No other module names loom or
//! shuttle: everything concurrent in `pagehint` goes through the types re-exported here —
//! the atomics, `Arc`, the vanilla-mode request [`Queue`], and the dirty count's per-thread
//! slot ([`thread_slot`]) and slot registry ([`slot_registry`]).

#[cfg(pagehint_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(all(pagehint_shuttle, not(pagehint_loom)))]
pub(crate) use shuttle::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(not(any(pagehint_loom, pagehint_shuttle)))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

// `Arc`: the checkers' own under their cfgs (loom checks the reference counts' orderings and
// reports leaks); the public API names `std::sync::Arc` in every ordinary build.
#[cfg(pagehint_loom)]
pub(crate) use loom::sync::Arc;
#[cfg(all(pagehint_shuttle, not(pagehint_loom)))]
pub(crate) use shuttle::sync::Arc;
#[cfg(not(any(pagehint_loom, pagehint_shuttle)))]
pub(crate) use std::sync::Arc;

/// The vanilla-mode request queue (multi-producer, multi-consumer, FIFO, linearizable):
/// crossbeam's lock-free `SegQueue` in ordinary builds.
#[cfg(not(any(pagehint_loom, pagehint_shuttle)))]
pub(crate) use crossbeam_queue::SegQueue as Queue;

/// The vanilla-mode request queue under a model checker: a `VecDeque` behind the checker's
/// own mutex, so that every push and pop is a step the checker schedules (crossbeam's
/// `SegQueue` is built on std atomics, which the checkers cannot see). The models thereby
/// check pagehint's protocol over *a* linearizable FIFO queue; that `SegQueue` is one is
/// crossbeam's claim, checked by crossbeam's own loom tests.
#[cfg(any(pagehint_loom, pagehint_shuttle))]
pub(crate) struct Queue<T>(CheckedMutex<std::collections::VecDeque<T>>);

#[cfg(pagehint_loom)]
use loom::sync::Mutex as CheckedMutex;
#[cfg(all(pagehint_shuttle, not(pagehint_loom)))]
use shuttle::sync::Mutex as CheckedMutex;

#[cfg(any(pagehint_loom, pagehint_shuttle))]
impl<T> Queue<T> {
    /// An empty queue.
    pub(crate) fn new() -> Self {
        Self(CheckedMutex::new(std::collections::VecDeque::new()))
    }
    /// Appends `value`.
    pub(crate) fn push(&self, value: T) {
        self.lock().push_back(value);
    }
    /// Takes the oldest value.
    pub(crate) fn pop(&self) -> Option<T> {
        self.lock().pop_front()
    }
    fn lock(&self) -> impl std::ops::DerefMut<Target = std::collections::VecDeque<T>> + '_ {
        // A poisoned lock only means a model thread panicked; the panic is the model's result.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a model checker (loom or shuttle) runs the crate: the dirty count then uses fewer
/// per-thread slots (so that the models' few threads cover both of its paths), and keeps a
/// thread's slot until the execution ends (the checkers' per-execution statics are gone
/// before the model's main thread exits).
pub(crate) const MODEL_CHECKED: bool = cfg!(any(pagehint_loom, pagehint_shuttle));

/// The dirty count's atomics (see the other build's): out of the checker's view.
#[cfg(all(any(pagehint_loom, pagehint_shuttle), not(pagehint_model_counts)))]
pub(crate) use core::sync::atomic::AtomicU64 as CountAtomic;
/// The dirty count's atomics (its per-thread slots and their registry, `bitmap/count.rs`).
///
/// The checkers see them only in the count's own models (`--cfg pagehint_model_counts`, which
/// `cargo loom-count` and `cargo shuttle-count` add): the count decides nothing in the protocol
/// (no guarantee I1–I8 reads it), and a load and a store per count, each a scheduling point,
/// multiply the schedules every other model explores (shuttle's exhaustive protocol model:
/// 67 s without them, not done after 25 minutes with them). Elsewhere under a checker they are
/// plain `core` atomics, like [`StatCounter`]; in ordinary builds they are `core`'s anyway.
#[cfg(not(all(any(pagehint_loom, pagehint_shuttle), not(pagehint_model_counts))))]
pub(crate) use AtomicU64 as CountAtomic;

/// The dirty count's slot registry (`bitmap/count.rs`): bit `i` set while a thread owns slot
/// `i`. One per process in ordinary builds; one per execution under a checker (its lazy
/// static), so that every execution starts with every slot free.
#[cfg(not(any(pagehint_loom, pagehint_shuttle)))]
pub(crate) fn slot_registry() -> &'static CountAtomic {
    static REGISTRY: CountAtomic = CountAtomic::new(0);
    &REGISTRY
}

/// The dirty count's slot registry (see the ordinary build's), per loom execution.
#[cfg(pagehint_loom)]
pub(crate) fn slot_registry() -> &'static CountAtomic {
    loom::lazy_static! {
        static ref REGISTRY: CountAtomic = CountAtomic::new(0);
    }
    &REGISTRY
}

/// The dirty count's slot registry (see the ordinary build's), per shuttle execution.
#[cfg(all(pagehint_shuttle, not(pagehint_loom)))]
pub(crate) fn slot_registry() -> &'static CountAtomic {
    shuttle::lazy_static! {
        static ref REGISTRY: CountAtomic = CountAtomic::new(0);
    }
    &REGISTRY
}

// The calling thread's dirty-count slot (`bitmap/count.rs`), `u8::MAX` until it has one: a
// `Cell` with no destructor, so it can be read from any other thread-local's destructor. Under
// a checker, the checker's thread-local (one per model thread).
#[cfg(not(any(pagehint_loom, pagehint_shuttle)))]
std::thread_local!(static THREAD_SLOT: std::cell::Cell<u8> = const { std::cell::Cell::new(u8::MAX) });
#[cfg(pagehint_loom)]
loom::thread_local!(static THREAD_SLOT: std::cell::Cell<u8> = std::cell::Cell::new(u8::MAX));
#[cfg(all(pagehint_shuttle, not(pagehint_loom)))]
shuttle::thread_local!(static THREAD_SLOT: std::cell::Cell<u8> = std::cell::Cell::new(u8::MAX));

/// The calling thread's dirty-count slot (`u8::MAX`: none yet).
#[inline]
pub(crate) fn thread_slot() -> u8 {
    THREAD_SLOT.with(std::cell::Cell::get)
}

/// Sets the calling thread's dirty-count slot.
pub(crate) fn set_thread_slot(slot: u8) {
    THREAD_SLOT.with(|s| s.set(slot));
}

/// Whether the atomics are plain `core` ones running on real hardware: only then may the
/// crate use raw-memory techniques around them (bitmap words in a lazily zeroed anonymous
/// mapping, cache prefetches).
///
/// Only plain `core` atomics have the layout of a `u64`; loom's and shuttle's carry
/// bookkeeping and must be constructed one by one. Miri cannot map memory either.
pub(crate) const PLAIN_ATOMICS: bool = cfg!(not(any(pagehint_loom, pagehint_shuttle, miri)));

/// Statistics counters: plain `core` atomics in every build.
///
/// Counters take part in no protocol (nothing is decided on their values), so the model
/// checkers need not see them; keeping them out of loom's and shuttle's view avoids
/// multiplying the interleavings they explore by every counter update.
pub(crate) use core::sync::atomic::AtomicU64 as StatCounter;
