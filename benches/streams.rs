//! Criterion: several fault streams against the one-slot scheduler. The urgent path
//! (`serve_from` + send + `urgent_sent_from`) with K = 1, 2, 4, 8 live streams against
//! `serve` + `urgent_sent` with one slot, under a busy background sender; and one background
//! round with K cursors against the plain linear round. (Percentiles and ratios over
//! repetitions come from `cargo bench-report --only streams`.)

mod common;

use std::time::Duration;

use common::streams_cases::{CursorScan, Slots, StreamServe, STREAM_COUNTS};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn guest() -> u64 {
    if common::smoke_test() {
        64 << 20
    } else {
        common::scheduler_cases::GUEST
    }
}

fn urgent(c: &mut Criterion) {
    let f = StreamServe::new(guest());
    let mut g = c.benchmark_group("urgent_streams_busy");
    // Each iteration also spends the 2 µs gap between requests, which criterion does not see.
    g.sample_size(20);
    g.bench_function("one_slot", |b| {
        b.iter_custom(|n| f.run(Slots::One, n, None))
    });
    for (i, k) in STREAM_COUNTS.iter().enumerate() {
        g.bench_function(format!("streams_{k}"), |b| {
            b.iter_custom(|n| f.run(Slots::PerStream(i), n, None))
        });
    }
    g.finish();
}

fn scan(c: &mut Criterion) {
    let f = CursorScan::new(guest());
    let mut g = c.benchmark_group("scan_claim_cursors");
    g.throughput(Throughput::Elements(f.pages));
    g.bench_function("linear_one_slot", |b| {
        b.iter_custom(|n| f.run(Slots::One, false, n))
    });
    g.bench_function("streams_8_polling_no_hints", |b| {
        b.iter_custom(|n| f.run(Slots::PerStream(3), false, n))
    });
    for (i, k) in STREAM_COUNTS.iter().enumerate() {
        g.bench_function(format!("streams_{k}_cursors"), |b| {
            b.iter_custom(|n| f.run(Slots::PerStream(i), true, n))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = urgent, scan
}
criterion_main!(benches);
