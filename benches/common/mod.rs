//! Code shared by the criterion benches (`hint`, `bitmap`, `scheduler`) and by the report
//! binary (`report`, run as `cargo bench-report`): the baselines and the measured workloads
//! live here once, so the criterion figures and the report's table come from the same code.
//!
//! Every workload is a *fixture* with one method per contender (ours and each baseline), each
//! taking an iteration count and returning the time those iterations took, in the shape of
//! criterion's `iter_custom`. Multi-thread fixtures keep their threads alive across calls
//! ([`crew::Crew`]) and start and stop them with barriers outside the timed region.

// Each bench target compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod bitmap_cases;
pub mod crew;
pub mod hint_cases;
pub mod kvm_log;
pub mod qemu;
pub mod scheduler_cases;
pub mod streams_cases;

use std::time::{Duration, Instant};

/// Whether the binary runs as a smoke test (`cargo test --benches`, or `cargo bench -- --test`)
/// rather than a measurement: cargo passes `--bench` only when benchmarking.
pub fn smoke_test() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

/// A 64-bit xorshift generator: cheap, deterministic, the same stream for every contender.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed (zero is replaced).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }
    /// The next value.
    #[inline]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A value below `n` (`n` > 0; slight modulo bias is irrelevant here).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Busy-waits for `d` (a gap between requests, without giving up the pinned CPU).
#[inline]
pub fn spin_for(d: Duration) {
    if d.is_zero() {
        return;
    }
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Guest sizes used throughout.
pub const GIB: u64 = 1 << 30;
/// 4 KiB target pages.
pub const PAGE: u64 = 4096;

/// "1gib", "64gib", "1tib" for case names.
pub fn size_name(bytes: u64) -> String {
    if bytes >= 1 << 40 {
        format!("{}tib", bytes >> 40)
    } else {
        format!("{}gib", bytes >> 30)
    }
}

/// Percentile `q` (0..=1) of sorted samples (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
