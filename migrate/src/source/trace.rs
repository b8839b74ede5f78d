//! The source's per-request timing record (postcopy), sent to the destination in the
//! summary so that it can time every stage of every fault (the harness's `tail`).
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

pub use crate::wire::summary::{ReqPath, ReqTrace};

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
