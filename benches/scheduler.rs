//! Criterion: the scheduler against the QEMU port. Background scan-and-claim on one thread
//! (claim batches of 16, 64 and 1 pages), the same under a concurrent urgent thread, and the
//! mean urgent-claim latency while the background thread is busy, with 0, 1 and 2 threads
//! merging dirty logs. (Latency percentiles come from `cargo bench-report`.)

mod common;

use std::time::Duration;

use common::scheduler_cases::{ScanClaim, ScanClaimWithUrgent, Side, UrgentLatency, GUEST};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagehint::ClaimBatch;

const BATCHES: [ClaimBatch; 3] = [ClaimBatch::DEFAULT, ClaimBatch::WORD, ClaimBatch::HOST_PAGE];

fn guest() -> u64 {
    if common::smoke_test() {
        64 << 20
    } else {
        GUEST
    }
}

fn side_name(side: Side) -> String {
    match side {
        Side::Ours(i) => format!("pagehint_batch{}", BATCHES[i].get()),
        Side::Qemu => "qemu".into(),
        Side::Plain => "plain_bitops".into(),
    }
}

fn scan_claim(c: &mut Criterion) {
    let f = ScanClaim::new(guest(), &BATCHES);
    let mut g = c.benchmark_group("scan_claim_1thread");
    g.throughput(Throughput::Elements(f.s.pages));
    for side in [
        Side::Ours(0),
        Side::Ours(1),
        Side::Ours(2),
        Side::Qemu,
        Side::Plain,
    ] {
        g.bench_function(side_name(side), |b| b.iter_custom(|n| f.run(side, n)));
    }
    g.finish();

    let f = ScanClaimWithUrgent::new(guest(), &BATCHES[..2]);
    let mut g = c.benchmark_group("scan_claim_urgent");
    g.throughput(Throughput::Elements(f.pages));
    for side in [Side::Ours(0), Side::Ours(1), Side::Qemu] {
        g.bench_function(side_name(side), |b| b.iter_custom(|n| f.run(side, n)));
    }
    g.finish();
}

fn urgent(c: &mut Criterion) {
    for mergers in [0, 1, 2] {
        let f = UrgentLatency::new(guest(), &BATCHES[..2], mergers);
        let name = match mergers {
            0 => "urgent_busy".to_string(),
            m => format!("urgent_busy_{m}merger"),
        };
        let mut g = c.benchmark_group(name);
        // Each iteration also spends the 2 µs gap between requests, which criterion does not
        // see in the returned time: fewer samples keep the wall time reasonable.
        g.sample_size(20);
        for side in [Side::Ours(0), Side::Ours(1), Side::Qemu] {
            g.bench_function(side_name(side), |b| b.iter_custom(|n| f.run(side, n, None)));
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = scan_claim, urgent
}
criterion_main!(benches);
