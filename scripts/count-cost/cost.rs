//! The dirty count's cost on the claim, drain, mark and merge paths, on one thread and on two
//! threads at once: pagehint at a commit without the count ("nocount"), at a commit with it
//! ("before") and the working tree ("after"), the same workloads in one criterion run
//! (`scripts/count-cost/run.sh`; the claim cases are those of `benches/bitmap.rs`).
use std::hint::black_box;
use std::sync::Barrier;
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
                /// The two-thread cases' bitmap: 4 GiB (a 128 KiB bitmap).
                big: DirtyBitmap,
                /// Per thread: 65536 random pages of `big`.
                big_random: [Vec<u64>; 2],
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
                    let big = RamLayout::single("m", BIG, PAGE).unwrap();
                    let big_random = [0x1234_5678_9abc_def1u64, 0x0fed_cba9_8765_4321].map(|mut x| {
                        (0..TWO_OPS)
                            .map(|_| {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                x % (BIG / PAGE)
                            })
                            .collect()
                    });
                    Self {
                        big: DirtyBitmap::new(&big).unwrap(),
                        big_random,
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
                /// A KVM-style dirty log of the 1 GiB block (sparse, dense or full), merged into
                /// a clean bitmap; per word.
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
                /// Clears `big` (outside the timings).
                fn clear_big(&self) {
                    let mut words = vec![0u64; self.big.block_words(0).unwrap()];
                    let _ = self.big.get_and_clear(0, 0, &mut words).unwrap();
                }
                /// Two threads each `mark_dirty` their 65536 random pages of a clean 4 GiB
                /// bitmap; per page of one thread.
                pub fn mark_clean_2t(&self, iters: u64) -> Duration {
                    two_threads(iters, TWO_OPS, || self.clear_big(), |t| {
                        for &p in &self.big_random[t] {
                            self.big.mark_dirty(PageLocation::new(0, p)).unwrap();
                        }
                    })
                }
                /// Two threads each merge a dense dirty log of their own half of a clean
                /// 4 GiB bitmap (two KVM slots); per word of one thread.
                pub fn merge_dense_2t(&self, iters: u64, log: &[u64]) -> Duration {
                    let half = BIG / PAGE / 2;
                    two_threads(iters, log.len() as u64, || self.clear_big(), |t| {
                        black_box(self.big.merge_dirty_log_at(0, t as u64 * half, half, log).unwrap());
                    })
                }
                /// One thread marks its 65536 random pages while the other claims its own
                /// (all dirty at the start); per operation of one thread.
                pub fn mark_vs_claim_2t(&self, iters: u64) -> Duration {
                    let setup = || {
                        self.clear_big();
                        for &p in &self.big_random[1] {
                            self.big.mark_dirty(PageLocation::new(0, p)).unwrap();
                        }
                    };
                    two_threads(iters, TWO_OPS, setup, |t| {
                        let mut acc = 0u64;
                        for &p in &self.big_random[t] {
                            let loc = PageLocation::new(0, p);
                            if t == 0 {
                                self.big.mark_dirty(loc).unwrap();
                            } else if self.big.claim_page(loc).unwrap().is_claimed() {
                                acc += 1;
                            }
                        }
                        black_box(acc);
                    })
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

cases!(zero, nocount);
cases!(old, before);
cases!(new, after);

/// Guest RAM of the two-thread cases.
const BIG: u64 = 4 * GIB;
/// Operations per thread per round of a two-thread case.
const TWO_OPS: u64 = 65536;

/// Runs `work(0)` here and `work(1)` on a second thread, at once, in rounds (`work` does
/// `per_round` operations on each thread; `setup` runs before each round, not timed) until
/// `iters` operations per thread are done; the time from both starting to both finishing,
/// summed over the rounds, scaled to `iters`.
fn two_threads(iters: u64, per_round: u64, setup: impl Fn(), work: impl Fn(usize) + Sync) -> Duration {
    let rounds = iters.div_ceil(per_round);
    let (start, end) = (Barrier::new(2), Barrier::new(2));
    let mut total = Duration::ZERO;
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..rounds {
                start.wait();
                work(1);
                end.wait();
            }
        });
        for _ in 0..rounds {
            setup();
            start.wait();
            let t = Instant::now();
            work(0);
            end.wait();
            total += t.elapsed();
        }
    });
    total.mul_f64(iters as f64 / (rounds * per_round) as f64)
}

#[derive(Clone, Copy)]
enum Log {
    /// One dirty page in 64 words.
    Sparse,
    /// Random words.
    Dense,
    /// Every page dirty (a guest that wrote all of it).
    Full,
}

/// A KVM-style dirty log of `bytes` of RAM.
fn log(kind: Log, bytes: u64) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..bytes / PAGE / 64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match kind {
                Log::Dense => x,
                Log::Full => !0,
                Log::Sparse if i % 64 == 0 => 1 << (x % 64),
                Log::Sparse => 0,
            }
        })
        .collect()
}

fn cost(c: &mut Criterion) {
    let (z, o, n) = (zero::Cases::new(), old::Cases::new(), new::Cases::new());
    macro_rules! group {
        ($name:expr, |$x:ident, $i:ident| $e:expr) => {{
            let mut g = c.benchmark_group($name);
            g.throughput(Throughput::Elements(1));
            g.bench_function("nocount", |b| b.iter_custom(|$i| { let $x = &z; $e }));
            g.bench_function("before", |b| b.iter_custom(|$i| { let $x = &o; $e }));
            g.bench_function("after", |b| b.iter_custom(|$i| { let $x = &n; $e }));
            g.finish();
        }};
    }
    for (kind, name) in [(Log::Sparse, "merge_sparse"), (Log::Dense, "merge_dense"), (Log::Full, "merge_full")] {
        let l = log(kind, GIB);
        group!(name, |x, i| x.merge(i, &l));
    }
    group!("drain_64words", |x, i| x.drain(i));
    group!("claim_page", |x, i| x.claim_page(i));
    group!("claim_host_page_2mib", |x, i| x.claim_host_page(i));
    group!("scan_claim_batch16", |x, i| x.scan(i));
    group!("mark_page_clean", |x, i| x.mark_clean(i));
    group!("mark_range256_clean", |x, i| x.mark_range_clean(i));
    group!("mark_page_dirty_again", |x, i| x.mark_dirty_again(i));
    group!("2t_mark_page_clean", |x, i| x.mark_clean_2t(i));
    let half = log(Log::Dense, BIG / 2);
    group!("2t_merge_dense_disjoint", |x, i| x.merge_dense_2t(i, &half));
    group!("2t_mark_vs_claim_page", |x, i| x.mark_vs_claim_2t(i));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = cost
}
criterion_main!(benches);
