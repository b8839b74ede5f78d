//! Criterion: the page hint against `std::sync::Mutex` and `parking_lot::Mutex` cells, on one
//! thread (offer + take) and on two pinned threads (one offering at full rate, one taking).

mod common;

use std::time::Duration;

use common::hint_cases::{uncontended, Cells, HintCell, TwoThreads};
use criterion::{criterion_group, criterion_main, Criterion};

const CELLS: [(HintCell, &str); 4] = [
    (HintCell::Ours, "pagehint"),
    (HintCell::StdMutex, "std_mutex"),
    (HintCell::ParkingLot, "parking_lot"),
    (HintCell::Bare, "bare_atomic"),
];

fn hint(c: &mut Criterion) {
    let cells = Cells::default();
    let mut g = c.benchmark_group("hint_uncontended");
    for (cell, name) in CELLS {
        g.bench_function(name, |b| b.iter_custom(|n| uncontended(&cells, cell, n)));
    }
    g.finish();

    let two = TwoThreads::new();
    let mut g = c.benchmark_group("hint_2thread");
    for (cell, name) in CELLS {
        g.bench_function(name, |b| b.iter_custom(|n| two.run(cell, n)));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = hint
}
criterion_main!(benches);
