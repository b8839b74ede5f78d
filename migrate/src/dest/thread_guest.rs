//! The thread guest: a host thread at the destination that runs the workloads by reading
//! guest memory (the fallback where KVM is missing, and `--guest thread`). It does not run
//! at the source and does not write; it reads the same image the KVM guest runs on.
//!
//! Every access goes through [`ThreadGuest::touch`], which measures what a fault costs:
//! * **userfaultfd**: an access to a missing page blocks in the kernel until it is placed;
//!   the thread's fault count tells a real wait from a page placed just before the access;
//! * **software** (no userfaultfd, or `--no-uffd`): the guest checks the present bit before
//!   each access and, if the page is missing, sends the request itself and waits.
//!
//! Workloads (windows from [`GuestLayout`]): `seq` checksums its window once, in order;
//! `random` checksums random pages of the data area until the migration completes; `stream`
//! plays its window once in 64 KiB frames at a fixed rate and reports its longest pause (a
//! stretch during which it was more than one frame behind); `kv` looks keys up in the hash
//! table and checks every value, until the migration completes. What each reads is recorded
//! and checked against the source's checksums after the run.

use std::sync::atomic::{AtomicBool, Ordering};

use super::memory::DestMemory;
use crate::guest::image::{kv_geometry, kv_home, kv_key, kv_slot, kv_value, page_checksum};
use crate::guest::layout::{GuestLayout, TARGET_PAGE};
use crate::guest::{Pause, Workload, STREAM_FRAME_PAGES};
use crate::sys::clock::{now_ns, sleep_until_unless};

/// At most this many page checksums are kept for checking.
const OBSERVED_KEPT: usize = 1 << 20;

/// Faults the thread felt: one latency per access that found its page missing.
#[derive(Clone, Debug, Default)]
pub struct FaultLog {
    /// Sum of the latencies, ns.
    pub stall_ns: u64,
    /// Accesses that found the page missing in the bitmap but present in memory.
    pub raced: u64,
    /// Each fault that waited: `(host page, access began, access returned)`, ns.
    pub spans: Vec<(u64, u64, u64)>,
}

impl FaultLog {
    /// Latency of each fault, ns (from its span).
    pub fn latencies_ns(&self) -> Vec<u64> {
        self.spans
            .iter()
            .map(|&(_, began, returned)| returned - began)
            .collect()
    }
}

/// What a workload did.
#[derive(Clone, Debug, Default)]
pub struct WorkloadReport {
    /// Pages read (seq, random, stream) or lookups (kv).
    pub ops: u64,
    /// `(global page, checksum)` of pages read, to check against the source.
    pub observed: Vec<(u64, u64)>,
    /// Lookups that returned a wrong value or missed a stored key (kv).
    pub wrong: u64,
    /// The stream's longest pause (ns); for the others, the longest single fault.
    pub longest_pause_ns: u64,
    /// From start to end of the workload (ns).
    pub elapsed_ns: u64,
    /// False if the run was aborted under it.
    pub completed: bool,
}

/// Page faults (minor and major) of the calling thread so far.
fn thread_faults() -> i64 {
    // SAFETY: `getrusage` writes one `struct rusage` into the zeroed value we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut u) != 0 {
            return -1;
        }
        u.ru_minflt + u.ru_majflt
    }
}

/// The guest thread: memory, the way to ask for a page (software path) and a stop flag.
pub struct ThreadGuest<'a> {
    /// Guest RAM.
    pub mem: &'a DestMemory,
    /// Sends a page request for a host page (software path).
    pub request: &'a (dyn Fn(u64) + Sync),
    /// Raised when the run is aborted.
    pub stop: &'a AtomicBool,
    /// Raised when every page has arrived (`random` and `kv` end then).
    pub complete: &'a (dyn Fn() -> bool + Sync),
    /// Faults so far.
    pub log: FaultLog,
}

impl ThreadGuest<'_> {
    fn aborted(&self) -> bool {
        // Relaxed: a polled flag.
        self.stop.load(Ordering::Relaxed)
    }

    /// Makes global page `page` accessible, measuring the wait if it was missing. Returns
    /// false if the run was aborted (the page may then be unusable).
    pub fn touch(&mut self, page: u64) -> bool {
        let mem = self.mem;
        let hp = mem.host_page_of(page);
        if mem.is_present(hp) {
            return true;
        }
        let t0 = now_ns();
        if mem.software() {
            if !mem.wait_present(hp, self.request, self.stop) {
                return false;
            }
        } else {
            // A fault that blocked in userfaultfd is retried by the kernel after the wake-up
            // and then accounted to this thread; an access to a page placed between the
            // bitmap check and the access does not fault at all.
            let before = thread_faults();
            // SAFETY: in bounds; with userfaultfd a missing page blocks here until placed.
            unsafe { std::ptr::read_volatile(mem.page_addr(page) as *const u8) };
            if thread_faults() == before {
                self.log.raced += 1;
                return !self.aborted();
            }
        }
        let t1 = now_ns();
        let dt = t1 - t0;
        self.log.spans.push((hp, t0, t1));
        self.log.stall_ns += dt;
        !self.aborted()
    }

    /// Target page `page` as bytes.
    ///
    /// # Safety
    /// The page must have passed [`touch`](Self::touch) (software path), or the memory must
    /// be registered with userfaultfd (the access blocks until placed).
    unsafe fn page(&self, page: u64) -> &[u8] {
        // SAFETY: in bounds (`page_addr` checks); placed or faulting, per the caller.
        unsafe {
            std::slice::from_raw_parts(self.mem.page_addr(page) as *const u8, TARGET_PAGE as usize)
        }
    }

    /// Reads the `u64` at byte `offset` of page `page`.
    ///
    /// # Safety
    /// As for [`page`](Self::page).
    unsafe fn read_u64(&self, page: u64, offset: u64) -> u64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= TARGET_PAGE);
        // SAFETY: in bounds and aligned; see above.
        u64::from_le(unsafe { std::ptr::read((self.mem.page_addr(page) + offset) as *const u64) })
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Runs workload `w` to its end (or until the run is aborted).
pub fn run(
    w: Workload,
    g: &mut ThreadGuest<'_>,
    layout: &GuestLayout,
    seed: u64,
    stream_rate: u64,
) -> WorkloadReport {
    let t0 = now_ns();
    let mut r = WorkloadReport {
        completed: true,
        ..Default::default()
    };
    match w {
        Workload::Seq => {
            for page in w.window(layout) {
                if !read_page(g, page, &mut r) {
                    break;
                }
            }
        }
        Workload::Random => {
            let mut rng = Rng(seed ^ 0x7261_6e64_6f6d | 1);
            let area = w.window(layout);
            let n = area.end - area.start;
            while !(g.complete)() {
                if !read_page(g, area.start + rng.below(n), &mut r) {
                    break;
                }
            }
        }
        // One thread is vCPU 0: in `mixed`, the stream.
        Workload::Stream | Workload::Mixed => stream(g, layout, stream_rate, &mut r),
        Workload::Kv => kv(g, layout, seed, &mut r),
    }
    r.elapsed_ns = now_ns() - t0;
    if w.pause() == Pause::LongestFault {
        r.longest_pause_ns = g.log.latencies_ns().into_iter().max().unwrap_or(0);
    }
    r
}

/// Touches and checksums one page; false if aborted.
fn read_page(g: &mut ThreadGuest<'_>, page: u64, r: &mut WorkloadReport) -> bool {
    if !g.touch(page) {
        r.completed = false;
        return false;
    }
    // SAFETY: `touch` returned true: the page is placed (software) or faults to us (uffd).
    let sum = page_checksum(unsafe { g.page(page) });
    if r.observed.len() < OBSERVED_KEPT {
        r.observed.push((page, sum));
    }
    r.ops += 1;
    true
}

fn stream(g: &mut ThreadGuest<'_>, layout: &GuestLayout, rate: u64, r: &mut WorkloadReport) {
    let frame_bytes = STREAM_FRAME_PAGES * TARGET_PAGE;
    let interval = (u128::from(frame_bytes) * 1_000_000_000 / u128::from(rate.max(1))) as u64;
    let start = now_ns();
    let mut pause_from: Option<u64> = None;
    let mut pause_to = 0;
    let frames = layout.stream.clone().step_by(STREAM_FRAME_PAGES as usize);
    for (i, first) in frames.enumerate() {
        let due = start.saturating_add((i as u64).saturating_mul(interval));
        if now_ns() < due && !sleep_until_unless(due, || g.aborted()) {
            r.completed = false;
            return;
        }
        for page in first..(first + STREAM_FRAME_PAGES).min(layout.stream.end) {
            if !read_page(g, page, r) {
                return;
            }
        }
        let done = now_ns();
        if done > due + interval {
            pause_from.get_or_insert(due);
            pause_to = done;
        } else if let Some(from) = pause_from.take() {
            r.longest_pause_ns = r.longest_pause_ns.max(pause_to - from);
        }
    }
    if let Some(from) = pause_from {
        r.longest_pause_ns = r.longest_pause_ns.max(pause_to - from);
    }
}

fn kv(g: &mut ThreadGuest<'_>, layout: &GuestLayout, seed: u64, r: &mut WorkloadReport) {
    let (slots, keys) = kv_geometry(&layout.kv);
    let mut rng = Rng(seed ^ 0x6b76_6b76 | 1);
    while !(g.complete)() {
        let key = kv_key(seed, rng.below(keys));
        let mut slot = kv_home(key, slots);
        let mut probes = 0;
        loop {
            let (page, off) = kv_slot(layout.kv.start, slot);
            if !g.touch(page) {
                r.completed = false;
                return;
            }
            // SAFETY: `touch` returned true for the page holding the slot.
            let (k, v) = unsafe { (g.read_u64(page, off), g.read_u64(page, off + 8)) };
            if k == key {
                if v != kv_value(key) {
                    r.wrong += 1;
                }
                break;
            }
            probes += 1;
            if k == 0 || probes == slots {
                r.wrong += 1; // a stored key must be found
                break;
            }
            slot = (slot + 1) % slots;
        }
        r.ops += 1;
    }
}
