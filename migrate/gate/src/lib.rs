//! The remove gate: how `UFFD_EVENT_REMOVE` is kept from being undone by a prefetcher's copy.
//!
//! The balloon's `madvise(MADV_DONTNEED)` queues a REMOVE event and waits until the handler
//! reads it; the kernel then zaps the range, which stays registered. While the event is queued
//! every `UFFDIO_COPY` fails with `EAGAIN`; once it is read, copies succeed again, both before
//! the zap (harmless: the zap drops the page) and after it (harmful: the page is filled with
//! stale file data for good). So a copy must never *start* after the read unless its page was
//! checked "not removed" after the read's marks:
//!
//! * the event thread reads the events under the **write** side and marks every removed host
//!   page through the [`EventRead`] that only the write side hands out, before releasing it;
//! * a prefetcher holds the **read** side from its removed check to the end of its copy
//!   ([`RemoveGate::copy_unless_removed`]).
//!
//! A copy that overlaps the read is impossible; one that precedes it lands before the zap; one
//! that follows it sees the mark. The event thread itself (the only writer of the marks) reads
//! them without the gate ([`RemoveGate::is_removed`]) and places zeros on a removed page.
//!
//! This type is what `pagehint-uffd`'s `handler` uses and what the loom and
//! shuttle models in `loom-tests` (`remove.rs`) drive, on the checkers' own lock and atomics
//! (the `sync` module); their mutants mark after releasing the write side, and copy without
//! the read side.

mod sync;

use crate::sync::{AtomicBool, Ordering, RwLock, RwLockWriteGuard};

/// The gate and the per-host-page "removed" marks (module docs).
#[derive(Debug)]
pub struct RemoveGate {
    lock: RwLock<()>,
    removed: Box<[AtomicBool]>,
}

/// The write side of the gate, held while the events are read: the only way to mark a page
/// removed.
#[derive(Debug)]
pub struct EventRead<'a> {
    gate: &'a RemoveGate,
    _write: RwLockWriteGuard<'a, ()>,
}

impl EventRead<'_> {
    /// Marks host page `hp` removed; returns whether it was not marked before. Pages out of
    /// range are ignored (false).
    pub fn mark_removed(&self, hp: usize) -> bool {
        self.gate.removed.get(hp).is_some_and(|m| {
            // Relaxed: published to the prefetchers by the release of the write side, which
            // their read side acquires before they load it.
            !m.swap(true, Ordering::Relaxed)
        })
    }
}

impl RemoveGate {
    /// A gate over `host_pages` host pages, none removed.
    pub fn new(host_pages: usize) -> Self {
        Self {
            lock: RwLock::new(()),
            removed: (0..host_pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Host pages covered.
    pub fn host_pages(&self) -> usize {
        self.removed.len()
    }

    /// The event thread: runs `read` (which reads the userfaultfd's events and marks removed
    /// pages through the [`EventRead`]) under the write side; no copy can start until it
    /// returns.
    pub fn read_events<T>(&self, read: impl FnOnce(&EventRead<'_>) -> T) -> T {
        // A poisoned gate only means a prefetcher panicked; the marks are still sound.
        let write = self.lock.write().unwrap_or_else(|p| p.into_inner());
        let ev = EventRead {
            gate: self,
            _write: write,
        };
        read(&ev)
    }

    /// A prefetcher: runs `copy` unless host page `hp` is removed, holding the read side from
    /// the check to the end of the copy. `None`: removed (or out of range), nothing copied.
    pub fn copy_unless_removed<T>(&self, hp: usize, copy: impl FnOnce() -> T) -> Option<T> {
        let _read = self.lock.read().unwrap_or_else(|p| p.into_inner());
        // Relaxed: the marks are stored under the write side, which this read side excludes
        // and whose release it acquired.
        let removed = self.removed.get(hp)?.load(Ordering::Relaxed);
        (!removed).then(copy)
    }

    /// Whether host page `hp` is marked removed (out of range: false). Exact on the event
    /// thread, the only one that marks; elsewhere a snapshot.
    pub fn is_removed(&self, hp: usize) -> bool {
        // Relaxed: the event thread reads its own stores; other callers (the report, after
        // every thread is joined) are ordered by the join.
        self.removed
            .get(hp)
            .is_some_and(|m| m.load(Ordering::Relaxed))
    }
}

#[cfg(all(test, not(any(pagehint_loom, pagehint_shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn marks_block_copies_and_out_of_range_is_inert() {
        let g = RemoveGate::new(3);
        assert_eq!(g.copy_unless_removed(1, || 7), Some(7));
        assert!(g.read_events(|ev| ev.mark_removed(1)));
        assert!(!g.read_events(|ev| ev.mark_removed(1)));
        assert!(!g.read_events(|ev| ev.mark_removed(9)));
        assert!(g.is_removed(1) && !g.is_removed(0) && !g.is_removed(9));
        assert_eq!(g.copy_unless_removed(1, || 7), None);
        assert_eq!(g.copy_unless_removed(9, || 7), None);
        assert_eq!(g.copy_unless_removed(2, || 7), Some(7));
    }
}
