//! Deliberate duplicates at the destination: which copy of a host page is placed when an
//! urgent request overtakes the background copy.
//!
//! In postcopy the source is stopped, so a host page has one content. A request for a host
//! page the background path has already claimed ([`Served::AlreadyClaimed`]) may be answered
//! by sending the page again on the urgent channel: its background copy may still sit in a
//! send queue, a socket buffer or the receiver's backlog. The destination then receives up
//! to two copies — the one the scheduler's claim sent ([`CopyKind::Sent`]) and the urgent
//! path's resend ([`CopyKind::Resent`]) — on two channels, in either order, from two
//! receiver threads. A [`CopyLedger`] decides, per copy, with one atomic read-modify-write:
//!
//! * the **first** copy of a host page (of either kind) is placed ([`Arrival::Place`]);
//! * the other kind's copy after it is a **deliberate duplicate** ([`Arrival::Duplicate`]):
//!   dropped without touching memory, so it is never placed twice and never overwrites what
//!   the guest wrote after the first copy was placed;
//! * a second copy of the **same** kind is not part of the protocol (a scheduler that sent a
//!   page twice): [`Arrival::Again`] — the caller hands it to its placement anyway, whose
//!   atomic placement (`UFFDIO_COPY`'s `EEXIST`) refuses and reports it as a real double
//!   placement, distinct from a deliberate duplicate.
//!
//! Exactly one copy of each page that came at all is placed, whatever the order: the
//! read-modify-writes on a page's bits are totally ordered, and only the first sees none
//! set. Nothing else is ordered through the ledger (the placement publishes the contents),
//! so `Relaxed` suffices; the loom and shuttle models (`loom-tests`, `overtake`) check it
//! with the guest reading and writing the page, against mutants that place the duplicate,
//! let it overwrite the guest's writes, or drop both copies.
//!
//! [`Served::AlreadyClaimed`]: crate::Served::AlreadyClaimed

use crate::sync::{AtomicU64, Ordering};

/// Which copy of a host page this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    /// The copy the scheduler's claim sent (background or urgent channel).
    Sent,
    /// The urgent path's resend of a host page the background path had claimed.
    Resent,
}

impl CopyKind {
    fn bit(self) -> u64 {
        match self {
            Self::Sent => 1,
            Self::Resent => 2,
        }
    }
}

/// What to do with a copy ([`CopyLedger::arrive`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The first copy of this host page: place it.
    Place,
    /// The other copy of a deliberate pair came first: drop this one (it is identical).
    Duplicate,
    /// A second copy of the same kind: not a deliberate duplicate; hand it to the placement,
    /// which refuses it and reports a double placement.
    Again,
}

/// Per host page, which copies have come (two bits per page, 32 pages per word).
#[derive(Debug)]
pub struct CopyLedger {
    words: Box<[AtomicU64]>,
    host_pages: u64,
}

impl CopyLedger {
    /// A ledger for `host_pages` host pages, none come.
    pub fn new(host_pages: u64) -> Self {
        Self {
            words: (0..host_pages.div_ceil(32))
                .map(|_| AtomicU64::new(0))
                .collect(),
            host_pages,
        }
    }

    /// Host pages covered.
    pub fn host_pages(&self) -> u64 {
        self.host_pages
    }

    /// Records that a copy of `kind` of host page `hp` came, and says what to do with it.
    ///
    /// # Panics
    /// If `hp` is not below [`host_pages`](Self::host_pages).
    pub fn arrive(&self, hp: u64, kind: CopyKind) -> Arrival {
        assert!(hp < self.host_pages, "host page {hp} outside the ledger");
        let shift = 2 * (hp % 32);
        // Relaxed: the read-modify-writes on this word are totally ordered, and only the
        // first copy of a page finds neither of its bits set; nothing else is published
        // through the ledger (the winner's placement publishes the contents).
        let prev = (self.words[(hp / 32) as usize]
            .fetch_or(kind.bit() << shift, Ordering::Relaxed)
            >> shift)
            & 3;
        if prev == 0 {
            Arrival::Place
        } else if prev & kind.bit() == 0 {
            Arrival::Duplicate
        } else {
            Arrival::Again
        }
    }

    /// Which copies of host page `hp` have come: `(sent, resent)`.
    pub fn copies(&self, hp: u64) -> (bool, bool) {
        let shift = 2 * (hp % 32);
        // Relaxed: a report, read after the receivers have been joined.
        let b = (self.words[(hp / 32) as usize].load(Ordering::Relaxed) >> shift) & 3;
        (b & 1 != 0, b & 2 != 0)
    }
}

#[cfg(all(test, not(any(pagehint_loom, pagehint_shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn the_first_copy_is_placed_the_other_kind_dropped_the_same_kind_again_reported() {
        let l = CopyLedger::new(40);
        assert_eq!(l.arrive(33, CopyKind::Resent), Arrival::Place);
        assert_eq!(l.arrive(33, CopyKind::Sent), Arrival::Duplicate);
        assert_eq!(l.arrive(33, CopyKind::Sent), Arrival::Again);
        assert_eq!(l.copies(33), (true, true));
        assert_eq!(l.arrive(0, CopyKind::Sent), Arrival::Place);
        assert_eq!(l.arrive(0, CopyKind::Sent), Arrival::Again);
        assert_eq!(l.arrive(1, CopyKind::Sent), Arrival::Place, "pages apart");
        assert_eq!(l.copies(2), (false, false));
    }
}
