//! QEMU's migration rate limiter, for running pagehint's source with QEMU's transport
//! (`--listen ... --qemu-rate-limit BPS`; `compare-qemu` uses it to split a win into what the
//! scheduler did and what the transport did).
//!
//! # Protocol (QEMU's `migration_rate_exceeded` and `migration_rate_limit`)
//! * Time is cut into windows of [`WINDOW`] (QEMU's `BUFFER_DELAY`, 100 ms); a window's quota
//!   is the cap's bytes per second divided by 10 (`XFER_LIMIT_RATIO`).
//! * The bytes counted are every page byte the source has sent on either channel (QEMU's
//!   `migration_transferred_bytes` counts all its channels, the preempt channel included).
//! * Before each claim the background sender calls [`QemuRateLimit::wait`]: a window that has
//!   ended is replaced by one starting now, based at the bytes sent so far (QEMU's
//!   `migration_update_counters`); while the window's bytes exceed its quota (strictly, as
//!   QEMU's `>`), the sender sleeps until the window ends, at line rate before and after: no
//!   kernel pacing, no bound on unsent bytes (the destination's `--pace 0 --lowat off`).
//! * An urgent request for the background sender ([`QemuRateLimit::urgent`]: vanilla, where
//!   the return path queues requests for it) wakes it at once and lets one claim through
//!   regardless of the quota, as QEMU's `rate_limit_sem` does (one post per queued page, one
//!   wait per page taken; `ram_save_iterate` serves queued pages even when the rate is
//!   exceeded). In preempt modes the return path sends urgent pages itself and wakes nothing.
//!
//! # Invariants
//! Bytes sent in a window exceed its quota by at most one claim plus the urgent claims let
//! through; a pending urgent wake is never lost (counted under the lock, consumed one per
//! claim).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// QEMU's `BUFFER_DELAY`.
pub const WINDOW: Duration = Duration::from_millis(100);

/// The limiter of one postcopy session.
#[derive(Debug)]
pub struct QemuRateLimit {
    /// Bytes allowed per window.
    quota: u64,
    state: Mutex<Window>,
    wake: Condvar,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    base_bytes: u64,
    /// Urgent wakes posted and not yet consumed.
    urgent: u64,
}

impl QemuRateLimit {
    /// A limiter for `cap_bps` bits/s (`> 0`), its first window starting now at `sent` bytes.
    pub fn new(cap_bps: u64, sent: u64) -> Self {
        Self {
            quota: (cap_bps / 8 / (1000 / WINDOW.as_millis() as u64)).max(1),
            state: Mutex::new(Window {
                start: Instant::now(),
                base_bytes: sent,
                urgent: 0,
            }),
            wake: Condvar::new(),
        }
    }

    /// Bytes allowed per window.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Called by the background sender before each claim with the page bytes sent so far on
    /// both channels: returns at once while the window's quota lasts, otherwise at the
    /// window's end or at an urgent wake (which it consumes). Whether it slept.
    pub fn wait(&self, sent: u64) -> bool {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut slept = false;
        loop {
            let now = Instant::now();
            if now >= w.start + WINDOW {
                w.start = now;
                w.base_bytes = sent;
            }
            if w.urgent > 0 {
                w.urgent -= 1;
                return slept;
            }
            if sent.saturating_sub(w.base_bytes) <= self.quota {
                return slept;
            }
            let left = (w.start + WINDOW).saturating_duration_since(now);
            slept = true;
            w = self
                .wake
                .wait_timeout(w, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A request was queued for the background sender: wake it, and let one claim through.
    pub fn urgent(&self) {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        w.urgent += 1;
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_is_a_tenth_of_the_cap_per_window() {
        assert_eq!(QemuRateLimit::new(8_000_000_000, 0).quota(), 100_000_000);
        assert_eq!(QemuRateLimit::new(900_000_000, 0).quota(), 11_250_000);
    }

    // The waits below would not sleep if the window had ended before them (a machine
    // stalled for 100 ms): each check allows for that, and only for that.

    #[test]
    fn it_sleeps_to_the_window_end_only_past_the_quota() {
        let t = Instant::now();
        let l = QemuRateLimit::new(8_000_000, 0); // 100 kB per window
        assert!(!l.wait(50_000));
        assert!(!l.wait(100_000), "at the quota: not exceeded (QEMU's `>`)");
        let slept = l.wait(100_001);
        let e = t.elapsed();
        assert!(slept || e >= WINDOW, "past the quota it sleeps");
        assert!(
            e >= WINDOW - Duration::from_millis(1),
            "to the window's end: {e:?}"
        );
        // A new window, based at 100_001 bytes.
        assert!(!l.wait(150_000));
    }

    #[test]
    fn an_urgent_request_wakes_the_sender_and_passes_one_claim() {
        let l = std::sync::Arc::new(QemuRateLimit::new(8_000_000, 0));
        let l2 = std::sync::Arc::clone(&l);
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            l2.urgent();
        });
        let t = Instant::now();
        assert!(l.wait(1_000_000));
        let e = t.elapsed();
        waker.join().unwrap();
        assert!(e < WINDOW - Duration::from_millis(5), "woken early: {e:?}");

        let t = Instant::now();
        let l = QemuRateLimit::new(8_000_000, 0);
        l.urgent();
        l.urgent();
        assert!(
            !l.wait(2_000_000),
            "a posted wake passes a claim over the quota"
        );
        assert!(!l.wait(2_000_000), "one per wake");
        let slept = l.wait(2_000_000);
        assert!(slept || t.elapsed() >= WINDOW, "then the quota holds again");
    }
}
