//! Bitmap workloads: marking (one page, a 256-page range, random pages from many threads),
//! merging a KVM-style dirty log, finding the next dirty page, and claiming.
//!
//! Baselines: rust-vmm `vm-memory`'s `AtomicBitmap` for marking, one `std::sync::Mutex`
//! around a plain bitmap for marking from many threads, a plain read of the same bytes (sum of
//! words) as the bandwidth ceiling for scans and merges, `bitvec` for scanning, and the QEMU
//! port ([`super::qemu`]) for merging and claiming.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitvec::prelude::*;
use pagehint::{
    ClaimBatch, DirtyBitmap, HostPageClaim, PageClaim, PageLocation, PageScheduler, RamLayout,
    SchedulerConfig,
};
use vm_memory::bitmap::AtomicBitmap;

use super::crew::{Crew, Role, Stopwatch};
use super::qemu::{QemuPort, YIELD_EVERY};
use super::{XorShift, PAGE};

/// A clean bitmap for one 4 KiB-page block of `bytes` whose words have all been written once
/// (as after a first migration round), so scans read private memory, not the zero page.
pub fn touched_bitmap(bytes: u64, host_page: u64) -> PageScheduler {
    let layout = RamLayout::single("pc.ram", bytes, host_page).expect("valid layout");
    let sched = PageScheduler::new(
        layout,
        SchedulerConfig::preempt().with_batch(ClaimBatch::WORD),
    )
    .expect("bitmap storage");
    sched.bitmap().mark_all();
    for c in sched.background() {
        let _ = black_box(c);
    }
    assert_eq!(sched.bitmap().dirty_pages(), 0);
    sched
}

/// A plain `Vec<u64>` of `words` zero words, every word written once.
pub fn touched_words(words: usize) -> Vec<u64> {
    let mut v = vec![0u64; words];
    for w in v.iter_mut() {
        *w = black_box(0);
    }
    v
}

/// The bandwidth ceiling: a plain read (sum) of every word.
#[inline(never)]
pub fn plain_read(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
}

/// Random single-page and 256-page-range marking, one thread, 1 GiB guest.
pub struct Marking {
    ours: DirtyBitmap,
    vmm: AtomicBitmap,
    pages: Vec<u64>,
    starts: Vec<u64>,
}

/// Pages in one range mark.
pub const RANGE_PAGES: u64 = 256;

impl Marking {
    /// Both bitmaps over `bytes` of guest RAM and 4096 random pages and range starts.
    pub fn new(bytes: u64) -> Self {
        let layout = RamLayout::single("pc.ram", bytes, PAGE).expect("valid layout");
        let n = bytes / PAGE;
        let mut rng = XorShift::new(11);
        Self {
            ours: DirtyBitmap::new(&layout).expect("bitmap storage"),
            vmm: AtomicBitmap::new(bytes as usize, NonZeroUsize::new(PAGE as usize).unwrap()),
            pages: (0..4096).map(|_| rng.below(n)).collect(),
            starts: (0..4096).map(|_| rng.below(n - RANGE_PAGES)).collect(),
        }
    }
    /// `iters` single-page marks, ours.
    pub fn page_ours(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for i in 0..iters as usize {
            let p = self.pages[i % self.pages.len()];
            // The input goes through black_box, not the result: storing the `Result` for
            // black_box before the next locked instruction costs ~12 ns here, and a caller
            // would use `?` on it in registers.
            let _ = self.ours.mark_dirty(PageLocation::new(0, black_box(p)));
        }
        t.elapsed()
    }
    /// `iters` single-page marks, vm-memory (`Bitmap::mark_dirty` → `set_addr_range`).
    pub fn page_vmm(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for i in 0..iters as usize {
            let p = self.pages[i % self.pages.len()];
            self.vmm
                .set_addr_range(black_box(p as usize * PAGE as usize), PAGE as usize);
        }
        t.elapsed()
    }
    /// `iters` 256-page range marks at random (unaligned) starts, ours.
    pub fn range_ours(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for i in 0..iters as usize {
            let p = self.starts[i % self.starts.len()];
            let _ = self.ours.mark_range(0, black_box(p), RANGE_PAGES);
        }
        t.elapsed()
    }
    /// The same with vm-memory's `set_addr_range` (one atomic per page).
    pub fn range_vmm(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for i in 0..iters as usize {
            let p = self.starts[i % self.starts.len()];
            self.vmm.set_addr_range(
                black_box(p as usize * PAGE as usize),
                (RANGE_PAGES * PAGE) as usize,
            );
        }
        t.elapsed()
    }
}

/// One mutex around a plain bitmap: the multi-thread marking baseline.
pub struct MutexBitmap {
    words: Mutex<Vec<u64>>,
}

impl MutexBitmap {
    /// A clean bitmap of `pages` bits.
    pub fn new(pages: u64) -> Self {
        Self {
            words: Mutex::new(touched_words(pages.div_ceil(64) as usize)),
        }
    }
    /// Lock, set the page's bit, unlock.
    #[inline]
    pub fn mark(&self, page: u64) {
        self.words.lock().unwrap()[(page / 64) as usize] |= 1 << (page % 64);
    }
}

#[derive(Clone, Copy)]
struct MarkJob {
    ours: bool,
    marks: u64,
}

/// `threads` pinned threads marking random pages of a `bytes` guest at full rate.
pub struct ManyMarkers {
    crew: Crew<MarkJob>,
    watch: Arc<Stopwatch>,
    /// Marking threads.
    pub threads: usize,
}

impl ManyMarkers {
    /// Spawns the markers (thread `i` on CPU `i`).
    pub fn new(threads: usize, bytes: u64) -> Self {
        let layout = RamLayout::single("pc.ram", bytes, PAGE).expect("valid layout");
        let pages = layout.total_pages();
        let ours = Arc::new(touched_bitmap(bytes, PAGE));
        let base = Arc::new(MutexBitmap::new(pages));
        let watch = Arc::new(Stopwatch::default());
        let roles = (0..threads)
            .map(|i| {
                let (ours, base, watch) =
                    (Arc::clone(&ours), Arc::clone(&base), Arc::clone(&watch));
                let mut rng = XorShift::new(1000 + i as u64);
                let role: Role<MarkJob> = Box::new(move |job: MarkJob| {
                    let bm = ours.bitmap();
                    let t = Instant::now();
                    if job.ours {
                        for _ in 0..job.marks {
                            let _ = bm.mark_dirty(PageLocation::new(0, rng.below(pages)));
                        }
                    } else {
                        for _ in 0..job.marks {
                            base.mark(rng.below(pages));
                        }
                    }
                    watch.finish(t.elapsed());
                });
                (Some(i), role)
            })
            .collect();
        Self {
            crew: Crew::new(roles, Arc::clone(&watch)),
            watch,
            threads,
        }
    }
    /// Whether every marker is pinned.
    pub fn pinned(&self) -> bool {
        self.crew.pinned
    }
    /// Each thread marks `marks` pages; returns the mean time one thread took.
    pub fn run(&self, ours: bool, marks: u64) -> Duration {
        self.watch.reset();
        self.crew.run(MarkJob { ours, marks });
        self.watch.elapsed() / self.threads as u32
    }
}

/// A dirty log's density.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Density {
    /// Sparse: one dirty page per `n` pages.
    OnePer(u64),
    /// Dense: every word has random bits set (about half the pages).
    Random,
}

/// A KVM-style dirty log (one bit per page, whole words) for `pages` pages.
pub fn dirty_log(pages: u64, density: Density, seed: u64) -> Vec<u64> {
    let mut rng = XorShift::new(seed);
    let mut log = touched_words(pages.div_ceil(64) as usize);
    match density {
        Density::Random => log.iter_mut().for_each(|w| *w = rng.next() | 1),
        Density::OnePer(n) => {
            let mut p = rng.below(n);
            while p < pages {
                log[(p / 64) as usize] |= 1 << (p % 64);
                p += n;
            }
        }
    }
    log
}

/// Merging a dirty log into a block's bitmap.
pub struct Merging {
    ours: PageScheduler,
    qemu: QemuPort,
    /// The log (whole block).
    pub log: Vec<u64>,
}

impl Merging {
    /// A block of `bytes` and a log of the given density.
    pub fn new(bytes: u64, density: Density) -> Self {
        let ours = touched_bitmap(bytes, PAGE);
        let pages = ours.layout().total_pages();
        Self {
            ours,
            qemu: QemuPort::new(bytes, PAGE),
            log: dirty_log(pages, density, 5),
        }
    }
    /// Bytes of log read per merge.
    pub fn log_bytes(&self) -> u64 {
        self.log.len() as u64 * 8
    }
    /// `iters` merges, ours (`DirtyBitmap::merge_dirty_log`).
    pub fn ours(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(self.ours.bitmap().merge_dirty_log(0, black_box(&self.log))).ok();
        }
        t.elapsed()
    }
    /// `iters` merges, QEMU port (plain OR under the lock).
    pub fn qemu(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(self.qemu.merge_log(black_box(&self.log)));
        }
        t.elapsed()
    }
    /// `iters` plain reads of the log.
    pub fn read(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(plain_read(black_box(&self.log)));
        }
        t.elapsed()
    }
}

/// Finding every dirty page, in order, in a bitmap of a `bytes` guest.
pub struct NextDirty {
    ours: PageScheduler,
    plain: Vec<u64>,
    pages: u64,
    /// Dirty pages in the bitmap.
    pub dirty: u64,
}

impl NextDirty {
    /// Sparse: one dirty page per `2^20` pages; dense: one per word (every word non-zero).
    pub fn new(bytes: u64, sparse: bool) -> Self {
        let ours = touched_bitmap(bytes, PAGE);
        let pages = bytes / PAGE;
        let mut plain = touched_words(pages.div_ceil(64) as usize);
        let step = if sparse { 1 << 20 } else { 64 };
        let mut rng = XorShift::new(3);
        let mut dirty = 0;
        let mut base = 0;
        while base < pages {
            let p = base + rng.below(step.min(pages - base));
            ours.bitmap()
                .mark_dirty(PageLocation::new(0, p))
                .expect("in range");
            plain[(p / 64) as usize] |= 1 << (p % 64);
            dirty += 1;
            base += step;
        }
        Self {
            ours,
            plain,
            pages,
            dirty,
        }
    }
    /// Bytes of bitmap per pass.
    pub fn bytes(&self) -> u64 {
        self.plain.len() as u64 * 8
    }
    /// `iters` passes of `find_next_dirty` from page 0 to the end.
    pub fn ours(&self, iters: u64) -> Duration {
        let bm = self.ours.bitmap();
        let t = Instant::now();
        for _ in 0..iters {
            let (mut from, mut n, mut acc) = (0, 0u64, 0u64);
            while let Ok(Some(p)) = bm.find_next_dirty(0, from) {
                acc = acc.wrapping_add(p);
                n += 1;
                from = p + 1;
            }
            black_box(acc);
            assert_eq!(n, self.dirty);
        }
        t.elapsed()
    }
    /// `iters` plain reads of the same bytes.
    pub fn read(&self, iters: u64) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(plain_read(black_box(&self.plain)));
        }
        t.elapsed()
    }
    /// `iters` passes of bitvec's `iter_ones` over the same bits.
    pub fn bitvec(&self, iters: u64) -> Duration {
        let bits = &self.plain.view_bits::<Lsb0>()[..self.pages as usize];
        let t = Instant::now();
        for _ in 0..iters {
            let (mut n, mut acc) = (0u64, 0usize);
            for i in black_box(bits).iter_ones() {
                acc = acc.wrapping_add(i);
                n += 1;
            }
            black_box(acc);
            assert_eq!(n, self.dirty);
        }
        t.elapsed()
    }
}

/// Claiming pages and host pages of a fully dirty 1 GiB block, one at a time.
pub struct Claiming {
    ours: DirtyBitmap,
    qemu: QemuPort,
    pages: u64,
    host_pages: u64,
    host_page_pages: u64,
}

impl Claiming {
    /// A block of `bytes` with host pages of `host_page` bytes.
    pub fn new(bytes: u64, host_page: u64) -> Self {
        let layout = RamLayout::single("pc.ram", bytes, host_page).expect("valid layout");
        Self {
            ours: DirtyBitmap::new(&layout).expect("bitmap storage"),
            qemu: QemuPort::new(bytes, host_page),
            pages: layout.total_pages(),
            host_pages: layout.blocks()[0].host_pages(),
            host_page_pages: host_page / PAGE,
        }
    }
    /// `iters` claims of single target pages (`claim_page`), re-dirtying untimed.
    pub fn page_ours(&self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            self.ours.mark_all();
            let n = (iters - done).min(self.pages);
            let (t, mut acc) = (Instant::now(), 0u64);
            for p in 0..n {
                // "Send" a claimed page as the QEMU port does: add it to an accumulator.
                if let Ok(PageClaim::Claimed) = self.ours.claim_page(PageLocation::new(0, p)) {
                    acc = acc.wrapping_add(p);
                }
            }
            total += t.elapsed();
            black_box(acc);
            done += n;
        }
        total
    }
    /// The same, QEMU port: plain test-and-clear, the lock taken once per 64 pages.
    pub fn page_qemu(&self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            self.qemu.mark_all();
            let n = (iters - done).min(self.pages);
            let (t, mut acc) = (Instant::now(), 0u64);
            let mut p = 0;
            while p < n {
                let k = YIELD_EVERY.min(n - p);
                self.qemu.claim_pages(p, k, |x| acc = acc.wrapping_add(x));
                p += k;
            }
            total += t.elapsed();
            black_box(acc);
            done += n;
        }
        total
    }
    /// `iters` claims of whole host pages (`claim_host_page`), re-dirtying untimed.
    pub fn host_page_ours(&self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            self.ours.mark_all();
            let n = (iters - done).min(self.host_pages);
            let (t, mut acc) = (Instant::now(), 0u64);
            for h in 0..n {
                let c = self
                    .ours
                    .claim_host_page(PageLocation::new(0, h * self.host_page_pages));
                for hp in c
                    .ok()
                    .and_then(HostPageClaim::into_claim)
                    .iter()
                    .flat_map(|c| c.host_pages())
                {
                    acc = acc.wrapping_add(hp.first_page);
                }
            }
            total += t.elapsed();
            black_box(acc);
            done += n;
        }
        total
    }
    /// The same, QEMU port (`ram_save_host_page` under one lock hold per host page).
    pub fn host_page_qemu(&self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            self.qemu.mark_all();
            let n = (iters - done).min(self.host_pages);
            let (t, mut acc) = (Instant::now(), 0u64);
            for h in 0..n {
                self.qemu
                    .claim_host_page(h * self.host_page_pages, |x| acc = acc.wrapping_add(x));
            }
            total += t.elapsed();
            black_box(acc);
            done += n;
        }
        total
    }
}
