//! The source's per-request timing record (postcopy), sent to the destination in the
//! summary so that it can time every stage of every fault ([`crate::tail`]).
//!
//! * the **return-path thread** records, per valid request: when it read the request, when
//!   the scheduler answered it (after the emulated link's delay), how (urgent send, already
//!   claimed by the background path, queued for it in vanilla, or already claimed and sent
//!   again on the urgent channel), and, when it sent the page, when the frame was written
//!   and when it arrives on the emulated link;
//! * the **background sender** records, per host page it sends in postcopy, when it claimed
//!   it, when its frame was written to the socket and when it arrives on the emulated link;
//!   at the end, a request the background path served gets those times.
//!
//! The per-page stamps are plain relaxed atomics: each is written by the one background
//! sender and read after it has been joined.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How the source answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReqPath {
    /// Claimed by the urgent path and sent on the urgent channel.
    Urgent = 0,
    /// Already claimed by the background path: the page comes on the background channel.
    Background = 1,
    /// Vanilla: queued for the background path.
    Queued = 2,
    /// Already claimed by the background path but not yet (or only just) written: sent again
    /// on the urgent channel; the destination places whichever copy arrives first.
    Resent = 3,
}

impl ReqPath {
    /// From its wire code.
    pub fn from_code(c: u64) -> Option<Self> {
        Some(match c {
            0 => Self::Urgent,
            1 => Self::Background,
            2 => Self::Queued,
            3 => Self::Resent,
            _ => return None,
        })
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Urgent => "urgent",
            Self::Background => "background",
            Self::Queued => "queued",
            Self::Resent => "resent",
        }
    }
}

/// One request as the source handled it (source clock, ns; 0: did not happen).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqTrace {
    /// Global host page requested.
    pub host_page: u64,
    /// The return-path thread read the request.
    pub read_ns: u64,
    /// The scheduler answered (after the emulated link's delay).
    pub served_ns: u64,
    /// How ([`ReqPath`] code).
    pub path: u64,
    /// Urgent copy: its frame written to the socket.
    pub urgent_written_ns: u64,
    /// Urgent copy: its arrival on the emulated link.
    pub urgent_arrival_ns: u64,
    /// Background copy: claimed by the background scan.
    pub bg_claim_ns: u64,
    /// Background copy: its frame written to the socket.
    pub bg_written_ns: u64,
    /// Background copy: its arrival on the emulated link.
    pub bg_arrival_ns: u64,
}

impl ReqTrace {
    /// Fields on the wire.
    pub const FIELDS: usize = 9;

    /// The fields in wire order.
    pub fn fields(&self) -> [u64; Self::FIELDS] {
        [
            self.host_page,
            self.read_ns,
            self.served_ns,
            self.path,
            self.urgent_written_ns,
            self.urgent_arrival_ns,
            self.bg_claim_ns,
            self.bg_written_ns,
            self.bg_arrival_ns,
        ]
    }

    /// From the fields in wire order.
    pub fn from_fields(f: [u64; Self::FIELDS]) -> Self {
        Self {
            host_page: f[0],
            read_ns: f[1],
            served_ns: f[2],
            path: f[3],
            urgent_written_ns: f[4],
            urgent_arrival_ns: f[5],
            bg_claim_ns: f[6],
            bg_written_ns: f[7],
            bg_arrival_ns: f[8],
        }
    }
}

/// Most request records kept (one run has a few thousand requests).
const KEPT: usize = 1 << 20;

/// The record of one session's postcopy.
#[derive(Debug)]
pub struct Trace {
    requests: Mutex<Vec<ReqTrace>>,
    bg_claim: Box<[AtomicU64]>,
    bg_written: Box<[AtomicU64]>,
    bg_arrival: Box<[AtomicU64]>,
}

fn stamps(n: u64) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Trace {
    /// A record for `host_pages` host pages.
    pub fn new(host_pages: u64) -> Self {
        Self {
            requests: Mutex::new(Vec::new()),
            bg_claim: stamps(host_pages),
            bg_written: stamps(host_pages),
            bg_arrival: stamps(host_pages),
        }
    }

    /// The background sender sent host pages `first .. first + n` (global), claimed at
    /// `claim_ns`, written by `written_ns`, arriving at `arrival_ns`.
    pub fn background(&self, first: u64, n: u64, claim_ns: u64, written_ns: u64, arrival_ns: u64) {
        for hp in first..first + n {
            let Some(c) = self.bg_claim.get(hp as usize) else {
                return;
            };
            // Relaxed (all three): written by the one background sender, read after it is
            // joined.
            c.store(claim_ns, Ordering::Relaxed);
            self.bg_written[hp as usize].store(written_ns, Ordering::Relaxed);
            self.bg_arrival[hp as usize].store(arrival_ns, Ordering::Relaxed);
        }
    }

    /// Records one request (the return-path thread).
    pub fn request(&self, r: ReqTrace) {
        let mut v = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < KEPT {
            v.push(r);
        }
    }

    /// Every request, with the background copy's times filled in (the senders have been
    /// joined).
    pub fn finish(&self) -> Vec<ReqTrace> {
        let mut v = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for r in &mut v {
            let i = r.host_page as usize;
            if i < self.bg_claim.len() {
                // Relaxed: the background sender has been joined.
                r.bg_claim_ns = self.bg_claim[i].load(Ordering::Relaxed);
                r.bg_written_ns = self.bg_written[i].load(Ordering::Relaxed);
                r.bg_arrival_ns = self.bg_arrival[i].load(Ordering::Relaxed);
            }
        }
        v
    }
}
