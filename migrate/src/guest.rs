//! The destination's guest memory: an anonymous mapping that pages are placed into, the
//! atomic received bitmap, and the guest's access gate that measures what a fault costs.
//!
//! # Fault paths
//! * **userfaultfd** (root, or unprivileged user-mode-only faults): the mapping is registered
//!   in missing mode; a guest access to a missing page blocks in the kernel until a receiver
//!   places it with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`. The fault thread turns the kernel's
//!   fault events into page requests.
//! * **software** (no userfaultfd, or `--no-uffd`): the guest checks the received bitmap
//!   before each access and, if the page is missing, sends the request itself and waits for
//!   the bit; receivers copy pages in and set the bit.
//!
//! # Invariants
//! * A host page's received bit is set only after its contents are in place (`Release`), and
//!   the guest reads the bit with `Acquire` before reading the page (software path); with
//!   userfaultfd the kernel maps the page atomically.
//! * A host page placed twice is counted (`EEXIST` from the kernel, or a bit already set) and
//!   makes the run fail verification; it is never silently overwritten.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::Thread;

use memmap2::MmapMut;

use crate::clock::now_ns;
use crate::config::FaultPath;
use crate::image::TARGET_PAGE;
use crate::uffd::{PlaceError, Userfault};

const NOBODY: u64 = u64::MAX;

/// Guest RAM at the destination.
#[derive(Debug)]
pub struct GuestMemory {
    // Declared before `map`: the descriptor is closed before the memory is unmapped.
    uffd: Option<Userfault>,
    map: MmapMut,
    base: usize,
    len: u64,
    host_shift: u32,
    host_pages: u64,
    received: Box<[AtomicU64]>,
    requested: Box<[AtomicU64]>,
    received_count: AtomicU64,
    placed_twice: AtomicU64,
    first_twice: Mutex<Option<String>>,
    last_placed_ns: AtomicU64,
    waiting_on: AtomicU64,
    waiter: Mutex<Option<Thread>>,
    path_note: String,
}

fn bits(n: u64) -> Box<[AtomicU64]> {
    (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

impl GuestMemory {
    /// Maps `mem` bytes of guest RAM in host pages of `host_page` bytes, registering it with
    /// userfaultfd when `path` allows and the kernel lets us.
    pub fn new(mem: u64, host_page: u64, path: FaultPath) -> io::Result<Self> {
        let len = usize::try_from(mem).map_err(|_| io::Error::other("--mem does not fit"))?;
        let mut map = MmapMut::map_anon(len)?;
        let base = map.as_mut_ptr() as usize;
        let host_pages = mem / host_page;
        let (uffd, path_note) = match path {
            FaultPath::Software => (None, "software (forced by --no-uffd)".to_string()),
            FaultPath::Auto => match Userfault::open() {
                Ok(u) => {
                    // SAFETY: `map` is a private anonymous mapping owned by `self`, and the
                    // descriptor is closed before it is unmapped (field order).
                    match unsafe { u.register(base as u64, mem) } {
                        Ok(()) => {
                            let note = format!("userfaultfd ({})", u.how());
                            (Some(u), note)
                        }
                        Err(e) => (None, format!("software (UFFDIO_REGISTER failed: {e})")),
                    }
                }
                Err(e) => (None, format!("software (no userfaultfd: {e})")),
            },
        };
        Ok(Self {
            uffd,
            map,
            base,
            len: mem,
            host_shift: host_page.trailing_zeros(),
            host_pages,
            received: bits(host_pages),
            requested: bits(host_pages),
            received_count: AtomicU64::new(0),
            placed_twice: AtomicU64::new(0),
            first_twice: Mutex::new(None),
            last_placed_ns: AtomicU64::new(0),
            waiting_on: AtomicU64::new(NOBODY),
            waiter: Mutex::new(None),
            path_note,
        })
    }

    /// The userfaultfd, if this memory uses it.
    pub fn userfault(&self) -> Option<&Userfault> {
        self.uffd.as_ref()
    }

    /// How faults are caught, in words.
    pub fn fault_path(&self) -> &str {
        &self.path_note
    }

    /// Host pages of guest RAM.
    pub fn host_pages(&self) -> u64 {
        self.host_pages
    }

    /// Bytes per host page.
    pub fn host_page_size(&self) -> u64 {
        1 << self.host_shift
    }

    /// Host page containing target page `page`.
    pub fn host_page_of(&self, page: u64) -> u64 {
        (page * TARGET_PAGE) >> self.host_shift
    }

    /// Host page containing guest address `addr`, if it is in guest RAM.
    pub fn host_page_at(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.base as u64)?;
        (off < self.len).then_some(off >> self.host_shift)
    }

    /// Whether host page `hp` has been placed.
    pub fn is_received(&self, hp: u64) -> bool {
        // Acquire: pairs with the Release in `mark`, so the page's contents are visible.
        self.received[(hp / 64) as usize].load(Ordering::Acquire) & (1 << (hp % 64)) != 0
    }

    fn is_received_seqcst(&self, hp: u64) -> bool {
        // SeqCst: the software waiter's store-then-check against `mark`'s set-then-check
        // (Dekker): one of the two sides sees the other, so no wake-up is lost.
        self.received[(hp / 64) as usize].load(Ordering::SeqCst) & (1 << (hp % 64)) != 0
    }

    /// Marks host page `hp` requested; true the first time (one request per page).
    pub fn claim_request(&self, hp: u64) -> bool {
        // Relaxed: only deduplicates requests; nothing else is ordered by it.
        self.requested[(hp / 64) as usize].fetch_or(1 << (hp % 64), Ordering::Relaxed)
            & (1 << (hp % 64))
            == 0
    }

    /// Host pages placed so far.
    pub fn received_count(&self) -> u64 {
        // Relaxed: a progress figure.
        self.received_count.load(Ordering::Relaxed)
    }

    /// Whether every host page has been placed.
    pub fn all_received(&self) -> bool {
        self.received_count() >= self.host_pages
    }

    /// When the last page was placed (ns), 0 if none.
    pub fn last_placed_ns(&self) -> u64 {
        // Relaxed: read after the receivers are joined, or as a progress figure.
        self.last_placed_ns.load(Ordering::Relaxed)
    }

    /// Host pages placed more than once, and the first such event.
    pub fn placed_twice(&self) -> (u64, Option<String>) {
        // Relaxed: read after the receivers are joined.
        let n = self.placed_twice.load(Ordering::Relaxed);
        (
            n,
            self.first_twice
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn twice(&self, what: String, n: u64) {
        // Relaxed: a counter read after the threads are joined.
        self.placed_twice.fetch_add(n, Ordering::Relaxed);
        let mut f = self.first_twice.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(what);
    }

    /// Places `len` bytes at byte `offset`: `data` (exactly `len` bytes) or zero pages.
    /// `offset` and `len` must be whole host pages inside guest RAM (checked).
    pub fn place(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), PlaceError> {
        let hmask = (1u64 << self.host_shift) - 1;
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        if offset & hmask != 0 || len & hmask != 0 || len == 0 || end.is_none() {
            return Err(PlaceError::Os(rustix::io::Errno::INVAL));
        }
        if data.is_some_and(|d| d.len() as u64 != len) {
            return Err(PlaceError::Os(rustix::io::Errno::INVAL));
        }
        let first = offset >> self.host_shift;
        let count = len >> self.host_shift;
        let addr = self.base as u64 + offset;
        match &self.uffd {
            Some(u) => {
                // SAFETY: the range was checked to lie inside the registered mapping.
                let r = unsafe {
                    match data {
                        Some(d) => u.copy(addr, d),
                        None => u.zero(addr, len),
                    }
                };
                if let Err(e) = r {
                    if let PlaceError::AlreadyPlaced { addr: at } = e {
                        self.twice(e.to_string(), 1);
                        // Place the rest page by page so one duplicate loses nothing else.
                        let page = 1u64 << self.host_shift;
                        let mut o = (at - self.base as u64) & !hmask;
                        while o < offset + len {
                            if !self.is_received(o >> self.host_shift) {
                                let d = data.map(|d| &d[(o - offset) as usize..][..page as usize]);
                                // SAFETY: as above, one host page inside the range.
                                let _ = unsafe {
                                    match d {
                                        Some(d) => u.copy(self.base as u64 + o, d),
                                        None => u.zero(self.base as u64 + o, page),
                                    }
                                };
                            }
                            o += page;
                        }
                    } else {
                        return Err(e);
                    }
                }
            }
            None => {
                for hp in first..first + count {
                    if self.is_received(hp) {
                        self.twice(format!("host page {hp} placed twice"), 1);
                        continue;
                    }
                    if let Some(d) = data {
                        let o = ((hp - first) << self.host_shift) as usize;
                        let n = 1usize << self.host_shift;
                        // SAFETY: in bounds (checked above); the page is not received, so
                        // the guest does not read it (it waits for the bit), and only this
                        // receiver writes it (each page arrives once, else counted above).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                d[o..o + n].as_ptr(),
                                (self.base + ((hp << self.host_shift) as usize)) as *mut u8,
                                n,
                            );
                        }
                    } // zero pages: fresh anonymous memory is already zero
                }
            }
        }
        self.mark(first, count);
        Ok(())
    }

    fn mark(&self, first: u64, count: u64) {
        let mut new = 0;
        for hp in first..first + count {
            let bit = 1u64 << (hp % 64);
            // SeqCst (implies Release): publishes the page contents to `is_received`, and
            // orders against the software waiter's `waiting_on` store (see
            // `is_received_seqcst`).
            let prev = self.received[(hp / 64) as usize].fetch_or(bit, Ordering::SeqCst);
            // A bit already set is a duplicate `place` already counted.
            if prev & bit == 0 {
                new += 1;
            }
        }
        // Relaxed: progress counters.
        self.received_count.fetch_add(new, Ordering::Relaxed);
        self.last_placed_ns.store(now_ns(), Ordering::Relaxed);
        // SeqCst: see above.
        let w = self.waiting_on.load(Ordering::SeqCst);
        if (first..first + count).contains(&w) {
            if let Some(t) = self
                .waiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                t.unpark();
            }
        }
    }

    /// Unregisters the range so a guest blocked in a fault wakes up (abort).
    pub fn release_blocked_guest(&self) {
        if let Some(u) = &self.uffd {
            let _ = u.unregister(self.base as u64, self.len);
        }
    }

    /// Target page `page` as bytes.
    ///
    /// # Safety
    /// The page's host page must have passed [`Guest::touch`] (software path), or the
    /// memory must be registered with userfaultfd (the access blocks until placed).
    pub unsafe fn page(&self, page: u64) -> &[u8] {
        let off = (page * TARGET_PAGE) as usize;
        assert!(
            (off as u64) + TARGET_PAGE <= self.len,
            "page {page} outside guest RAM"
        );
        // SAFETY: in bounds; the caller guarantees the page is placed or faults to us.
        unsafe { std::slice::from_raw_parts((self.base + off) as *const u8, TARGET_PAGE as usize) }
    }

    /// Reads the little-endian `u64` at byte `offset` (8-byte aligned).
    ///
    /// # Safety
    /// As for [`page`](Self::page), for the page containing `offset`.
    pub unsafe fn read_u64(&self, offset: u64) -> u64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len,
            "bad guest read at {offset}"
        );
        // SAFETY: in bounds and aligned; see above.
        u64::from_le(unsafe { std::ptr::read((self.base + offset as usize) as *const u64) })
    }

    fn touch_first_byte(&self, hp: u64) {
        // SAFETY: in bounds; with userfaultfd a missing page blocks here until placed.
        unsafe {
            std::ptr::read_volatile((self.base + ((hp << self.host_shift) as usize)) as *const u8);
        }
    }

    /// The whole mapping as bytes (after the migration, for verification).
    pub fn all_bytes(&self) -> &[u8] {
        &self.map[..]
    }
}

/// Faults the guest felt: one latency per access that found its page missing.
#[derive(Clone, Debug, Default)]
pub struct FaultLog {
    /// Latency of each fault, ns.
    pub latencies_ns: Vec<u64>,
    /// Sum of the latencies, ns.
    pub stall_ns: u64,
    /// Accesses that found the page missing in the bitmap but present in memory (placed
    /// just before the access; not faults).
    pub raced: u64,
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

/// The guest thread's view: memory, the way to ask for a page (software path) and a stop flag.
pub struct Guest<'a> {
    /// Guest RAM.
    pub mem: &'a GuestMemory,
    /// Sends a page request for a host page (used by the software path only).
    pub request: &'a (dyn Fn(u64) + Sync),
    /// Raised when the run is aborted.
    pub stop: &'a AtomicBool,
    /// Faults so far.
    pub log: FaultLog,
}

impl Guest<'_> {
    /// Registers the calling thread as the software path's waiter.
    pub fn register_thread(&self) {
        *self.mem.waiter.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
    }

    /// Whether the run was aborted.
    pub fn aborted(&self) -> bool {
        // Relaxed: a polled flag.
        self.stop.load(Ordering::Relaxed)
    }

    /// Makes target page `page` accessible, measuring the wait if it was missing. Returns
    /// false if the run was aborted (the page may then be unusable).
    pub fn touch(&mut self, page: u64) -> bool {
        let mem = self.mem;
        let hp = mem.host_page_of(page);
        if mem.is_received(hp) {
            return true;
        }
        let t0 = now_ns();
        if mem.uffd.is_some() {
            // A fault that blocked in userfaultfd is retried by the kernel after the wake-up
            // and then accounted to this thread; an access to a page placed between the
            // bitmap check and the access does not fault at all. The thread's fault count
            // tells the two apart.
            let before = thread_faults();
            mem.touch_first_byte(hp);
            if thread_faults() == before {
                self.log.raced += 1;
                return !self.aborted();
            }
        } else {
            if mem.claim_request(hp) {
                (self.request)(hp);
            }
            // SeqCst: Dekker with `mark` (see `is_received_seqcst`).
            mem.waiting_on.store(hp, Ordering::SeqCst);
            while !mem.is_received_seqcst(hp) {
                if self.aborted() {
                    mem.waiting_on.store(NOBODY, Ordering::SeqCst);
                    return false;
                }
                std::thread::park_timeout(std::time::Duration::from_millis(2));
            }
            // SeqCst: as above; no longer waiting.
            mem.waiting_on.store(NOBODY, Ordering::SeqCst);
        }
        let dt = now_ns() - t0;
        self.log.latencies_ns.push(dt);
        self.log.stall_ns += dt;
        !self.aborted()
    }
}
