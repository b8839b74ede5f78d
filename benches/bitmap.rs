//! Criterion: the dirty bitmap. Marking a page and a 256-page range (vs vm-memory's
//! `AtomicBitmap`), random marking from 1 and all CPUs (vs one mutex around a plain bitmap),
//! merging sparse and dense dirty logs (vs a plain read of the log and the QEMU port), finding
//! every dirty page of sparse and dense 1 GiB / 64 GiB / 1 TiB bitmaps (vs a plain read of the
//! same bytes and bitvec), claiming pages and 2 MiB host pages (vs the QEMU port).

mod common;

use std::time::Duration;

use common::bitmap_cases::{Claiming, Density, ManyMarkers, Marking, Merging, NextDirty};
use common::{size_name, GIB, PAGE};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn marking(c: &mut Criterion) {
    let m = Marking::new(GIB);
    let mut g = c.benchmark_group("mark_page");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pagehint", |b| b.iter_custom(|n| m.page_ours(n)));
    g.bench_function("vm_memory", |b| b.iter_custom(|n| m.page_vmm(n)));
    g.finish();
    let mut g = c.benchmark_group("mark_range_256");
    g.throughput(Throughput::Elements(256));
    g.bench_function("pagehint", |b| b.iter_custom(|n| m.range_ours(n)));
    g.bench_function("vm_memory", |b| b.iter_custom(|n| m.range_vmm(n)));
    g.finish();

    let cpus = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let guest = if common::smoke_test() { GIB } else { 64 * GIB };
    for threads in [1, cpus] {
        let mm = ManyMarkers::new(threads, guest);
        let mut g = c.benchmark_group(format!("mark_random_{threads}thread"));
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function("pagehint", |b| b.iter_custom(|n| mm.run(true, n)));
        g.bench_function("mutex", |b| b.iter_custom(|n| mm.run(false, n)));
        g.finish();
        if threads == cpus {
            break;
        }
    }
}

fn merging(c: &mut Criterion) {
    let guest = if common::smoke_test() { GIB } else { 64 * GIB };
    for (density, name) in [
        (Density::OnePer(4096), "sparse"),
        (Density::Random, "dense"),
    ] {
        let m = Merging::new(guest, density);
        let mut g = c.benchmark_group(format!("merge_log_{name}_{}", size_name(guest)));
        g.throughput(Throughput::Bytes(m.log_bytes()));
        g.bench_function("pagehint", |b| b.iter_custom(|n| m.ours(n)));
        g.bench_function("qemu", |b| b.iter_custom(|n| m.qemu(n)));
        g.bench_function("read", |b| b.iter_custom(|n| m.read(n)));
        g.finish();
    }
}

fn next_dirty(c: &mut Criterion) {
    let sizes: &[u64] = if common::smoke_test() {
        &[GIB]
    } else {
        &[GIB, 64 * GIB, 1 << 40]
    };
    for &bytes in sizes {
        for (sparse, name) in [(true, "sparse"), (false, "dense")] {
            let f = NextDirty::new(bytes, sparse);
            let mut g = c.benchmark_group(format!("next_dirty_{name}_{}", size_name(bytes)));
            g.throughput(Throughput::Bytes(f.bytes()));
            if bytes >= 64 * GIB {
                g.sample_size(10);
            }
            g.bench_function("pagehint", |b| b.iter_custom(|n| f.ours(n)));
            g.bench_function("read", |b| b.iter_custom(|n| f.read(n)));
            g.bench_function("bitvec", |b| b.iter_custom(|n| f.bitvec(n)));
            g.finish();
        }
    }
}

fn claiming(c: &mut Criterion) {
    let f = Claiming::new(GIB, PAGE);
    let mut g = c.benchmark_group("claim_page");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pagehint", |b| b.iter_custom(|n| f.page_ours(n)));
    g.bench_function("qemu", |b| b.iter_custom(|n| f.page_qemu(n)));
    g.finish();
    let f = Claiming::new(GIB, 2 << 20);
    let mut g = c.benchmark_group("claim_host_page_2mib");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pagehint", |b| b.iter_custom(|n| f.host_page_ours(n)));
    g.bench_function("qemu", |b| b.iter_custom(|n| f.host_page_qemu(n)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = marking, merging, next_dirty, claiming
}
criterion_main!(benches);
