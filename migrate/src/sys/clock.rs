//! Time: one monotonic nanosecond clock shared by every thread and, on one machine, by both
//! processes (`CLOCK_MONOTONIC`), plus precise sleeps.
//!
//! Arrival times of emulated link frames are stamped in the source's clock and translated by
//! the destination with the offset measured at connection time (zero on the same machine).

use std::num::NonZeroU64;
use std::time::Duration;

use rustix::thread::{clock_nanosleep_absolute, set_current_timer_slack};
use rustix::time::{clock_gettime, ClockId, Timespec};

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// CPU time the calling thread has used (ns): `CLOCK_THREAD_CPUTIME_ID`.
pub fn thread_cpu_ns() -> u64 {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Time the calling thread has spent runnable but waiting for a CPU (ns): the second field
/// of `/proc/thread-self/schedstat`; `None` where the kernel does not keep it.
pub fn thread_run_delay_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

/// Sleeps until `deadline_ns` on `CLOCK_MONOTONIC` (returns at once if it has passed).
pub fn sleep_until(deadline_ns: u64) {
    let ts = Timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as _,
        tv_nsec: (deadline_ns % 1_000_000_000) as _,
    };
    // EINTR: return early; every caller re-checks the clock.
    let _ = clock_nanosleep_absolute(ClockId::Monotonic, &ts);
}

/// Longest a stoppable sleep goes without looking at its stop condition.
pub const STOP_SLICE_NS: u64 = 10_000_000;

/// Sleeps until `deadline_ns` like [`sleep_until`], but in slices of at most
/// [`STOP_SLICE_NS`], returning early (false) as soon as `stop()` is true; true when the
/// deadline was reached.
pub fn sleep_until_unless(deadline_ns: u64, stop: impl Fn() -> bool) -> bool {
    loop {
        if stop() {
            return false;
        }
        let now = now_ns();
        if now >= deadline_ns {
            return true;
        }
        sleep_until(deadline_ns.min(now + STOP_SLICE_NS));
    }
}

/// A `Timespec` for a relative timeout of `ns` nanoseconds.
pub fn timespec(ns: u64) -> Timespec {
    Timespec {
        tv_sec: (ns / 1_000_000_000) as _,
        tv_nsec: (ns % 1_000_000_000) as _,
    }
}

/// Makes this thread's timed sleeps wake within a microsecond of their deadline instead of
/// the kernel's default 50 µs slack (the emulated link's delays are tens of microseconds).
pub fn tight_timer_slack() {
    // Best effort: without it, sleeps only overshoot more.
    let _ = set_current_timer_slack(NonZeroU64::new(1_000));
}

/// This boot's id: two processes with the same id share `CLOCK_MONOTONIC`.
pub fn boot_id() -> [u8; 36] {
    let mut id = [b'?'; 36];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let s = s.trim().as_bytes();
        let n = s.len().min(36);
        id[..n].copy_from_slice(&s[..n]);
    }
    id
}

/// Formats nanoseconds as a short human duration (`850 µs`, `12.3 ms`, `1.25 s`).
pub fn human_ns(ns: u64) -> String {
    let d = Duration::from_nanos(ns);
    if ns < 10_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000 {
        format!("{} µs", ns / 1000)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else if ns < 3_600_000_000_000 {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} h", d.as_secs_f64() / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_stoppable_sleep_ends_soon_after_the_stop_not_at_its_deadline() {
        let stop = AtomicBool::new(false);
        let t0 = now_ns();
        let reached = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                // Relaxed: a polled flag.
                stop.store(true, Ordering::Relaxed);
            });
            // An hour away: only the stop can end it. Relaxed: a polled flag.
            sleep_until_unless(t0 + 3_600_000_000_000, || stop.load(Ordering::Relaxed))
        });
        assert!(!reached);
        assert!(now_ns() - t0 < 2_000_000_000, "it ignored the stop");
        assert!(sleep_until_unless(now_ns() + 1_000_000, || false));
    }
}
