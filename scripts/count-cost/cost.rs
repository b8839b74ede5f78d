//! The dirty count's cost on the claim, drain, mark and merge paths: pagehint at a base commit
//! ("before") and the working tree ("after"), the same workloads in one criterion run
//! (`scripts/count-cost/run.sh`; the claim cases are those of `benches/bitmap.rs`).
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;

macro_rules! cases {
    ($m:ident, $p:ident) => {
        mod $m {
            use super::*;
            use $p::{ClaimBatch, DirtyBitmap, PageLocation, PageScheduler, RamLayout, SchedulerConfig};

            pub struct Cases {
                pages: DirtyBitmap,
                npages: u64,
                huge: DirtyBitmap,
                nhuge: u64,
                sched: PageScheduler,
                random: Vec<u64>,
            }

            impl Cases {
                pub fn new() -> Self {
                    let l = RamLayout::single("m", GIB, PAGE).unwrap();
                    let h = RamLayout::single("m", GIB, 2 << 20).unwrap();
                    let mut x = 0x9e37_79b9_7f4a_7c15u64;
                    let random = (0..4096)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x % (GIB / PAGE)
                        })
                        .collect();
                    Self {
                        pages: DirtyBitmap::new(&l).unwrap(),
                        npages: l.total_pages(),
                        huge: DirtyBitmap::new(&h).unwrap(),
                        nhuge: h.blocks()[0].host_pages(),
                        sched: PageScheduler::new(
                            l,
                            SchedulerConfig::preempt().with_batch(ClaimBatch::DEFAULT),
                        )
                        .unwrap(),
                        random,
                    }
                }
                /// `claim_page` over every page of a dirty 1 GiB block.
                pub fn claim_page(&self, iters: u64) -> Duration {
                    let (mut total, mut done) = (Duration::ZERO, 0);
                    while done < iters {
                        self.pages.mark_all();
                        let n = (iters - done).min(self.npages);
                        let (t, mut acc) = (Instant::now(), 0u64);
                        for p in 0..n {
                            if self.pages.claim_page(PageLocation::new(0, p)).unwrap().is_claimed() {
                                acc = acc.wrapping_add(p);
                            }
                        }
                        total += t.elapsed();
                        black_box(acc);
                        done += n;
                    }
                    total
                }
                /// `claim_host_page` over every 2 MiB host page.
                pub fn claim_host_page(&self, iters: u64) -> Duration {
                    let (mut total, mut done) = (Duration::ZERO, 0);
                    while done < iters {
                        self.huge.mark_all();
                        let n = (iters - done).min(self.nhuge);
                        let (t, mut acc) = (Instant::now(), 0u64);
                        for h in 0..n {
                            if let Some(c) = self.huge.claim_host_page(PageLocation::new(0, h * 512)).unwrap().into_claim() {
                                acc = acc.wrapping_add(c.dirty_pages());
                            }
                        }
                        total += t.elapsed();
                        black_box(acc);
                        done += n;
                    }
                    total
                }
                /// One background round over a dirty 1 GiB block (batch 16), per page.
                pub fn scan(&self, iters: u64) -> Duration {
                    let (mut total, mut done) = (Duration::ZERO, 0);
                    while done < iters {
                        self.sched.bitmap().mark_all();
                        let t = Instant::now();
                        let mut acc = 0u64;
                        for c in self.sched.background() {
                            acc = acc.wrapping_add(c.pages_to_send());
                        }
                        total += t.elapsed();
                        black_box(acc);
                        done += self.npages;
                    }
                    total.mul_f64(iters as f64 / done as f64)
                }
                /// `mark_dirty` of 4096 random clean pages (each mark sets a new bit).
                pub fn mark_clean(&self, iters: u64) -> Duration {
                    let (mut total, mut done) = (Duration::ZERO, 0);
                    let mut words = vec![0u64; self.pages.block_words(0).unwrap()];
                    while done < iters {
                        let _ = self.pages.get_and_clear(0, 0, &mut words).unwrap();
                        let n = (iters - done).min(self.random.len() as u64);
                        let t = Instant::now();
                        for &p in &self.random[..n as usize] {
                            self.pages.mark_dirty(PageLocation::new(0, p)).unwrap();
                        }
                        total += t.elapsed();
                        done += n;
                    }
                    total
                }
                /// `mark_range` of 256 pages at 4096 random starts, clean before each pass.
                pub fn mark_range_clean(&self, iters: u64) -> Duration {
                    let (mut total, mut done) = (Duration::ZERO, 0);
                    let mut words = vec![0u64; self.pages.block_words(0).unwrap()];
                    while done < iters {
                        let _ = self.pages.get_and_clear(0, 0, &mut words).unwrap();
                        let n = (iters - done).min(self.random.len() as u64);
                        let t = Instant::now();
                        for &p in &self.random[..n as usize] {
                            self.pages.mark_range(0, p.min(self.npages - 256), 256).unwrap();
                        }
                        total += t.elapsed();
                        done += n;
                    }
                    total
                }
                /// A KVM-style dirty log of the 1 GiB block with one dirty page in 64 words
                /// (`sparse`) or random words (dense), merged into a clean bitmap; per word.
                pub fn merge(&self, iters: u64, log: &[u64]) -> Duration {
                    let (mut total, mut done) = (Duration::ZERO, 0);
                    let mut words = vec![0u64; log.len()];
                    while done < iters {
                        let _ = self.pages.get_and_clear(0, 0, &mut words).unwrap();
                        let t = Instant::now();
                        black_box(self.pages.merge_dirty_log(0, log).unwrap());
                        total += t.elapsed();
                        done += log.len() as u64;
                    }
                    total.mul_f64(iters as f64 / done as f64)
                }
                /// `get_and_clear` of 64-word chunks of a fully dirty block; per word.
                pub fn drain(&self, iters: u64) -> Duration {
                    let (mut total, mut done) = (Duration::ZERO, 0);
                    let mut buf = [0u64; 64];
                    let words = self.pages.block_words(0).unwrap();
                    while done < iters {
                        self.pages.mark_all();
                        let t = Instant::now();
                        for from in (0..words).step_by(64) {
                            black_box(self.pages.get_and_clear(0, from, &mut buf).unwrap());
                        }
                        total += t.elapsed();
                        done += words as u64;
                    }
                    total.mul_f64(iters as f64 / done as f64)
                }
                /// `mark_dirty` of 4096 random pages, already dirty (the common re-write).
                pub fn mark_dirty_again(&self, iters: u64) -> Duration {
                    self.pages.mark_all();
                    let mut done = 0;
                    let t = Instant::now();
                    while done < iters {
                        let n = (iters - done).min(self.random.len() as u64);
                        for &p in &self.random[..n as usize] {
                            self.pages.mark_dirty(PageLocation::new(0, p)).unwrap();
                        }
                        done += n;
                    }
                    t.elapsed()
                }
            }
        }
    };
}

cases!(old, before);
cases!(new, after);

fn log(dense: bool) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..GIB / PAGE / 64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match dense {
                true => x,
                false if i % 64 == 0 => 1 << (x % 64),
                false => 0,
            }
        })
        .collect()
}

fn cost(c: &mut Criterion) {
    let (o, n) = (old::Cases::new(), new::Cases::new());
    for (dense, name) in [(false, "merge_sparse"), (true, "merge_dense")] {
        let l = log(dense);
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(1));
        g.bench_function("before", |b| b.iter_custom(|i| o.merge(i, &l)));
        g.bench_function("after", |b| b.iter_custom(|i| n.merge(i, &l)));
        g.finish();
    }
    let mut g = c.benchmark_group("drain_64words");
    g.throughput(Throughput::Elements(1));
    g.bench_function("before", |b| b.iter_custom(|i| o.drain(i)));
    g.bench_function("after", |b| b.iter_custom(|i| n.drain(i)));
    g.finish();
    let mut g = c.benchmark_group("claim_page");
    g.throughput(Throughput::Elements(1));
    g.bench_function("before", |b| b.iter_custom(|i| o.claim_page(i)));
    g.bench_function("after", |b| b.iter_custom(|i| n.claim_page(i)));
    g.finish();
    let mut g = c.benchmark_group("claim_host_page_2mib");
    g.throughput(Throughput::Elements(1));
    g.bench_function("before", |b| b.iter_custom(|i| o.claim_host_page(i)));
    g.bench_function("after", |b| b.iter_custom(|i| n.claim_host_page(i)));
    g.finish();
    let mut g = c.benchmark_group("scan_claim_batch16");
    g.throughput(Throughput::Elements(1));
    g.bench_function("before", |b| b.iter_custom(|i| o.scan(i)));
    g.bench_function("after", |b| b.iter_custom(|i| n.scan(i)));
    g.finish();
    let mut g = c.benchmark_group("mark_page_clean");
    g.throughput(Throughput::Elements(1));
    g.bench_function("before", |b| b.iter_custom(|i| o.mark_clean(i)));
    g.bench_function("after", |b| b.iter_custom(|i| n.mark_clean(i)));
    g.finish();
    let mut g = c.benchmark_group("mark_range256_clean");
    g.throughput(Throughput::Elements(1));
    g.bench_function("before", |b| b.iter_custom(|i| o.mark_range_clean(i)));
    g.bench_function("after", |b| b.iter_custom(|i| n.mark_range_clean(i)));
    g.finish();
    let mut g = c.benchmark_group("mark_page_dirty_again");
    g.throughput(Throughput::Elements(1));
    g.bench_function("before", |b| b.iter_custom(|i| o.mark_dirty_again(i)));
    g.bench_function("after", |b| b.iter_custom(|i| n.mark_dirty_again(i)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = cost
}
criterion_main!(benches);
