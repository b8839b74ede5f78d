//! The destination's guest RAM: one anonymous (or hugetlb) mapping holding both RAM blocks
//! back to back, what is present in it, and how pages get there.
//!
//! # Phases
//! * **precopy**: nothing runs on this memory; received pages are copied in (a page sent
//!   again overwrites the older copy), and each target page seen is recorded.
//! * **switch-over** ([`DestMemory::switch`]): the source's list of host pages still to send
//!   is applied: those that hold precopy data are discarded (`MADV_DONTNEED`), every other
//!   host page must be whole from precopy (checked), and the mapping is registered with
//!   userfaultfd before any vCPU runs.
//! * **postcopy**: each missing host page is placed exactly once, atomically, with
//!   `UFFDIO_COPY` (zero pages: `UFFDIO_ZEROPAGE`, or a copy of zeros on hugetlbfs), which
//!   wakes the threads faulting on it. A second placement fails with `EEXIST`: it is counted
//!   and fails verification (with the `overwrite-duplicate` test hook it is copied over the
//!   first, as a destination without atomic placement would).
//! * **deliberate duplicates**: a host page the background path claimed may also come as a
//!   resent copy on the urgent channel (its frame says so). A [`CopyLedger`] records which
//!   copies of each host page came (the scheduler's one copy, the urgent path's resend): the
//!   first of the two is placed, the other is dropped without touching memory — it can
//!   neither be placed twice nor overwrite what the guest wrote since — and counted
//!   ([`duplicates`](DestMemory::duplicates)), its checksums kept for verification (it must
//!   equal the source's page). A second copy of the *same* kind is a real double placement
//!   and goes to `UFFDIO_COPY` as before (`EEXIST`, counted, fails verification).
//!
//! # Invariants
//! * A host page's present bit is set only after its contents are in place (`Release`); the
//!   software fault path reads it with `Acquire` before reading the page. With userfaultfd
//!   the kernel maps the page atomically.
//! * Placement time and first request time are recorded per host page: request latency is
//!   their difference, and blocktime is measured against the placement time.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::thread::Thread;

use memmap2::{MmapMut, MmapOptions};
use pagehint::{Arrival, CopyKind, CopyLedger};

use crate::guest::layout::{GuestLayout, HostPageSize, TARGET_PAGE};
use crate::options::FaultPath;
use crate::sys::clock::now_ns;
use crate::sys::uffd::{PlaceError, Userfault};
use crate::wire::{Segment, SwitchOver};

const NOBODY: u64 = u64::MAX;

/// A bitmap of atomic words.
#[derive(Debug)]
pub struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new(n: u64) -> Self {
        Self((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn get(&self, i: u64, o: Ordering) -> bool {
        self.0[(i / 64) as usize].load(o) & (1 << (i % 64)) != 0
    }
    /// Sets bit `i`; true if it was clear.
    fn set(&self, i: u64, o: Ordering) -> bool {
        self.0[(i / 64) as usize].fetch_or(1 << (i % 64), o) & (1 << (i % 64)) == 0
    }
    /// Bits `first .. first + 64` as one word, bit 0 being bit `first` (bits past the end
    /// read 0).
    fn load64(&self, first: u64, o: Ordering) -> u64 {
        let (w, s) = ((first / 64) as usize, first % 64);
        let lo = self.0.get(w).map_or(0, |x| x.load(o)) >> s;
        if s == 0 {
            return lo;
        }
        lo | self.0.get(w + 1).map_or(0, |x| x.load(o)) << (64 - s)
    }
    /// Sets the bits of `bits` at `first ..`, bit 0 being bit `first` (bits past the end are
    /// not set).
    fn or64(&self, first: u64, bits: u64, o: Ordering) {
        let (w, s) = ((first / 64) as usize, first % 64);
        if let Some(x) = self.0.get(w).filter(|_| bits << s != 0) {
            x.fetch_or(bits << s, o);
        }
        if s != 0 && bits >> (64 - s) != 0 {
            if let Some(x) = self.0.get(w + 1) {
                x.fetch_or(bits >> (64 - s), o);
            }
        }
    }
}

/// Of the 64 host pages of `per` target pages each from host page `first` (those in
/// `valid`), given the target pages `seen`: a bit set in the first word when any of its
/// target pages is seen, in the second when every one is. A word (or, for host pages wider
/// than a word, a word per 64 target pages) at a time.
fn coverage(seen: &Bits, per: u64, first: u64, valid: u64) -> (u64, u64) {
    // Relaxed (all): precopy is over; its one thread is the caller.
    if per == 1 {
        let s = seen.load64(first, Ordering::Relaxed) & valid;
        return (s, s);
    }
    let (mut any, mut all) = (0u64, 0u64);
    for i in 0..64 - u64::from(valid.leading_zeros()) {
        let (mut some, mut every) = (false, true);
        let end = (first + i + 1) * per;
        let mut p = (first + i) * per;
        while p < end {
            let n = per.min(64);
            let bits = seen.load64(p, Ordering::Relaxed) & low_bits(n);
            some |= bits != 0;
            every &= bits == low_bits(n);
            p += n;
        }
        any |= u64::from(some) << i;
        all |= u64::from(every) << i;
    }
    (any & valid, all & valid)
}

/// A mask of the low `n` bits (all 64 for `n` ≥ 64).
fn low_bits(n: u64) -> u64 {
    if n >= 64 {
        !0
    } else {
        (1 << n) - 1
    }
}

/// The runs of set bits of `w` as `(first bit, bits)`, in order.
fn bit_runs(mut w: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut base = 0u64;
    std::iter::from_fn(move || {
        if w == 0 {
            return None;
        }
        let skip = w.trailing_zeros();
        w >>= skip;
        let len = w.trailing_ones();
        let run = (base + u64::from(skip), u64::from(len));
        w = w.checked_shr(len).unwrap_or(0);
        base += u64::from(skip + len);
        Some(run)
    })
}

/// How a postcopy frame reached the destination (for the per-fault timing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Via {
    /// The channel: 1 background, 2 urgent (0: unknown).
    pub chan: u8,
    /// When its receiver read it from the socket (destination clock).
    pub recv_ns: u64,
    /// A deliberate duplicate: the urgent path's resend of a background claim.
    pub resend: bool,
}

impl Via {
    /// The background channel's code.
    pub const BACKGROUND: u8 = 1;
    /// The urgent channel's code.
    pub const URGENT: u8 = 2;
}

fn stamps(n: u64) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Why a frame could not be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryError {
    /// The frame's range is not whole units inside its block.
    BadRange(String),
    /// Placement failed.
    Place(PlaceError),
    /// The switch-over does not fit this memory, or leaves a page nowhere.
    Switch(String),
}

impl std::fmt::Display for MemoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadRange(s) => write!(f, "bad page frame: {s}"),
            Self::Place(e) => write!(f, "{e}"),
            Self::Switch(s) => write!(f, "switch-over: {s}"),
        }
    }
}

impl std::error::Error for MemoryError {}

/// Guest RAM at the destination.
#[derive(Debug)]
pub struct DestMemory {
    // Declared before `map`: the descriptor is closed before the memory is unmapped.
    uffd: Option<Userfault>,
    map: MmapMut,
    base: usize,
    len: u64,
    layout: GuestLayout,
    host_shift: u32,
    host_pages: u64,
    huge: bool,
    /// Host pages whose contents are in place.
    present: Bits,
    /// Host pages requested from the source.
    requested: Bits,
    /// Target pages received in precopy.
    precopy_seen: Bits,
    /// Target pages copied in precopy (each copy counts).
    precopy_pages: AtomicU64,
    /// Per host page: when it was first requested (0: never).
    request_ns: Box<[AtomicU64]>,
    /// Per host page: when it was placed in postcopy (0: not in postcopy).
    placed_ns: Box<[AtomicU64]>,
    /// Per host page: which connection placed it in postcopy, counting from 1 (0: none).
    placed_conn: Box<[AtomicU16]>,
    /// Which copies of each host page came in postcopy.
    copies: CopyLedger,
    /// Deliberate duplicates dropped: host pages, and their bytes.
    dup_pages: AtomicU64,
    dup_bytes: AtomicU64,
    /// `(global target page, checksum)` of every dropped duplicate's target pages.
    dup_sums: Mutex<Vec<(u64, u64)>>,
    /// Per host page: when its request was written to the return path (0: never).
    req_sent_ns: Box<[AtomicU64]>,
    /// Per host page: how the placed copy came ([`Via`]: channel, read).
    placed_chan: Box<[AtomicU8]>,
    placed_recv_ns: Box<[AtomicU64]>,
    /// The connection now receiving (0 first; each resume after a break adds one).
    conn: AtomicU16,
    /// Host pages missing at the switch-over.
    pending: AtomicU64,
    /// Host pages placed in postcopy.
    placed: AtomicU64,
    placed_twice: AtomicU64,
    first_twice: Mutex<Option<String>>,
    overwrite_duplicates: bool,
    last_placed_ns: AtomicU64,
    postcopy: AtomicBool,
    waiting_on: AtomicU64,
    waiter: Mutex<Option<Thread>>,
    path_note: Mutex<String>,
    zeros: Vec<u8>,
}

impl DestMemory {
    /// Maps RAM for `layout` (hugetlb for 2 MiB host pages) and opens a userfaultfd if
    /// `path` allows (it is registered at the switch-over).
    pub fn new(
        layout: &GuestLayout,
        path: FaultPath,
        overwrite_duplicates: bool,
    ) -> io::Result<Self> {
        let len =
            usize::try_from(layout.mem()).map_err(|_| io::Error::other("RAM does not fit"))?;
        let huge = layout.host_page() == HostPageSize::Huge2M;
        let mut opts = MmapOptions::new();
        opts.len(len);
        if huge {
            opts.huge(Some(21));
        }
        let mut map = opts.map_anon().map_err(|e| {
            if huge {
                io::Error::new(
                    e.kind(),
                    format!(
                        "mapping {} MiB of hugetlb pages: {e} (are enough huge pages reserved?)",
                        len >> 20
                    ),
                )
            } else {
                e
            }
        })?;
        let base = map.as_mut_ptr() as usize;
        let hp = layout.host_page().bytes();
        let host_pages = layout.mem() / hp;
        let (uffd, note) = match path {
            FaultPath::Software => (None, "software (forced by --no-uffd)".to_string()),
            FaultPath::Auto => match Userfault::open() {
                Ok(u) => {
                    let n = format!("userfaultfd ({})", u.origin().describe());
                    (Some(u), n)
                }
                Err(e) => (None, format!("software (no userfaultfd: {e})")),
            },
        };
        Ok(Self {
            uffd,
            map,
            base,
            len: layout.mem(),
            layout: layout.clone(),
            host_shift: hp.trailing_zeros(),
            host_pages,
            huge,
            present: Bits::new(host_pages),
            requested: Bits::new(host_pages),
            precopy_seen: Bits::new(layout.pages()),
            precopy_pages: AtomicU64::new(0),
            request_ns: stamps(host_pages),
            placed_ns: stamps(host_pages),
            placed_conn: (0..host_pages).map(|_| AtomicU16::new(0)).collect(),
            copies: CopyLedger::new(host_pages),
            dup_pages: AtomicU64::new(0),
            dup_bytes: AtomicU64::new(0),
            dup_sums: Mutex::new(Vec::new()),
            req_sent_ns: stamps(host_pages),
            placed_chan: (0..host_pages).map(|_| AtomicU8::new(0)).collect(),
            placed_recv_ns: stamps(host_pages),
            conn: AtomicU16::new(0),
            pending: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            placed_twice: AtomicU64::new(0),
            first_twice: Mutex::new(None),
            overwrite_duplicates,
            last_placed_ns: AtomicU64::new(0),
            postcopy: AtomicBool::new(false),
            waiting_on: AtomicU64::new(NOBODY),
            waiter: Mutex::new(None),
            path_note: Mutex::new(note),
            zeros: vec![0u8; if huge { hp as usize } else { 0 }],
        })
    }

    /// The userfaultfd, if this memory uses one.
    pub fn userfault(&self) -> Option<&Userfault> {
        self.uffd.as_ref()
    }

    /// How faults are caught, in words.
    pub fn fault_path(&self) -> String {
        self.path_note
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Host address of RAM block `b` (for KVM's memory slots).
    pub fn block_host(&self, b: u32) -> u64 {
        (self.base as u64) + self.layout.block_first_page(b) * TARGET_PAGE
    }

    /// Host pages of RAM.
    pub fn host_pages(&self) -> u64 {
        self.host_pages
    }

    /// Bytes per host page.
    pub fn host_page_size(&self) -> u64 {
        1 << self.host_shift
    }

    /// Host page containing global target page `page`.
    pub fn host_page_of(&self, page: u64) -> u64 {
        (page * TARGET_PAGE) >> self.host_shift
    }

    /// Host page containing host address `addr`, if it is guest RAM.
    pub fn host_page_at(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.base as u64)?;
        (off < self.len).then_some(off >> self.host_shift)
    }

    /// Block and byte offset in it of host page `hp`.
    pub fn host_page_location(&self, hp: u64) -> (u32, u64) {
        let loc = self.layout.location((hp << self.host_shift) / TARGET_PAGE);
        (loc.block, loc.page * TARGET_PAGE)
    }

    /// Whether host page `hp` is in place.
    pub fn is_present(&self, hp: u64) -> bool {
        // Acquire: pairs with the Release in `mark_present`: the contents are visible.
        self.present.get(hp, Ordering::Acquire)
    }

    /// Marks host page `hp` requested; true the first time (one request per page), and
    /// records when.
    pub fn claim_request(&self, hp: u64, at_ns: u64) -> bool {
        // Relaxed: only deduplicates requests; nothing else is ordered by it.
        let first = self.requested.set(hp, Ordering::Relaxed);
        if first {
            // Relaxed: read after the run.
            self.request_ns[hp as usize].store(at_ns, Ordering::Relaxed);
        }
        first
    }

    /// Records that the request for host page `hp` was written to the return path at `at_ns`.
    pub fn request_sent(&self, hp: u64, at_ns: u64) {
        if let Some(t) = self.req_sent_ns.get(hp as usize) {
            // Relaxed: read after the run.
            t.store(at_ns, Ordering::Relaxed);
        }
    }

    /// When the request for host page `hp` was written (0: never), and the channel
    /// ([`Via::chan`]) and receive time ([`Via::recv_ns`]) of its placed copy.
    pub fn delivery(&self, hp: u64) -> (u64, u8, u64) {
        let i = hp as usize;
        // Relaxed (all): read after the run.
        (
            self.req_sent_ns[i].load(Ordering::Relaxed),
            self.placed_chan[i].load(Ordering::Relaxed),
            self.placed_recv_ns[i].load(Ordering::Relaxed),
        )
    }

    /// When host page `hp` was first requested and placed in postcopy (0: not).
    pub fn times(&self, hp: u64) -> (u64, u64) {
        // Relaxed: read after the run.
        (
            self.request_ns[hp as usize].load(Ordering::Relaxed),
            self.placed_ns[hp as usize].load(Ordering::Relaxed),
        )
    }

    /// Host pages missing at the switch-over.
    pub fn pending(&self) -> u64 {
        // Relaxed: set once at the switch-over, before postcopy.
        self.pending.load(Ordering::Relaxed)
    }

    /// Host pages placed in postcopy so far.
    pub fn placed(&self) -> u64 {
        // Relaxed: a progress figure.
        self.placed.load(Ordering::Relaxed)
    }

    /// Whether postcopy has placed every missing host page.
    pub fn complete(&self) -> bool {
        self.postcopy.load(Ordering::Acquire) && self.placed() >= self.pending()
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

    fn twice(&self, what: String) {
        // Relaxed: a counter read after the threads are joined.
        self.placed_twice.fetch_add(1, Ordering::Relaxed);
        self.first_twice
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(what);
    }

    /// Global byte offset of `[offset, offset + len)` of `block`, checked to be whole
    /// `unit`-byte units inside the block.
    fn range(&self, block: u32, offset: u64, len: u64, unit: u64) -> Result<u64, MemoryError> {
        let blocks = self.layout.block_ranges();
        let size = blocks
            .get(block as usize)
            .ok_or_else(|| MemoryError::BadRange(format!("no block {block}")))?
            .1;
        let end = offset.checked_add(len).filter(|&e| e <= size);
        if !offset.is_multiple_of(unit) || !len.is_multiple_of(unit) || len == 0 || end.is_none() {
            return Err(MemoryError::BadRange(format!(
                "block {block} bytes {offset:#x}+{len:#x} are not whole {unit}-byte units inside it"
            )));
        }
        Ok(self.layout.block_first_page(block) * TARGET_PAGE + offset)
    }

    /// Precopy: copies `data` (or zeros) to `[offset, offset + len)` of `block`.
    pub fn precopy_place(
        &self,
        block: u32,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), MemoryError> {
        if self.postcopy.load(Ordering::Relaxed) {
            return Err(MemoryError::BadRange(
                "a precopy page after the switch-over".into(),
            ));
        }
        let at = self.range(block, offset, len, TARGET_PAGE)?;
        if data.is_some_and(|d| d.len() as u64 != len) {
            return Err(MemoryError::BadRange("payload length".into()));
        }
        let first = at / TARGET_PAGE;
        // Relaxed: read by the switch-over, applied by this same thread.
        self.precopy_pages
            .fetch_add(len / TARGET_PAGE, Ordering::Relaxed);
        for (i, p) in (first..first + len / TARGET_PAGE).enumerate() {
            let dst = (self.base as u64 + p * TARGET_PAGE) as *mut u8;
            // Relaxed: precopy is one thread (the main channel's receiver).
            self.precopy_seen.set(p, Ordering::Relaxed);
            match data {
                // SAFETY: in bounds (checked); nothing else touches guest RAM in precopy.
                Some(d) => unsafe {
                    std::ptr::copy_nonoverlapping(
                        d[i * TARGET_PAGE as usize..].as_ptr(),
                        dst,
                        TARGET_PAGE as usize,
                    )
                },
                // Written, not skipped: the page must be populated, or once the memory is
                // registered with userfaultfd an access would fault on a page marked present.
                // SAFETY: as above.
                None => unsafe { std::ptr::write_bytes(dst, 0, TARGET_PAGE as usize) },
            }
        }
        Ok(())
    }

    /// Applies the switch-over: discards the pending host pages that hold precopy data,
    /// checks that every other host page arrived whole in precopy, and registers the
    /// memory with userfaultfd. Returns the pending host pages.
    ///
    /// Word by word: 64 host pages at a time are compared with what precopy brought, marked
    /// present, and their discards gathered into runs (one `madvise` per run), so that the
    /// downtime grows by microseconds per GiB, not by a step per page.
    pub fn switch(&self, sw: &SwitchOver) -> Result<u64, MemoryError> {
        let blocks = self.layout.ram().blocks();
        if sw.pending.len() != blocks.len()
            || sw
                .pending
                .iter()
                .zip(blocks)
                .any(|(p, b)| p.host_pages() != b.host_pages())
        {
            return Err(MemoryError::Switch(
                "the pending-page bitmaps do not fit this layout".into(),
            ));
        }
        // Relaxed: precopy is over; its one thread was the one applying this.
        let nothing_seen = self.precopy_pages.load(Ordering::Relaxed) == 0;
        let mut pending = 0;
        let mut discard: Vec<(u64, u64)> = Vec::new(); // runs of host pages
        let mut hp0 = 0u64; // the block's first global host page
        for set in &sw.pending {
            let n = set.host_pages();
            let mut w = 0u64; // the block's word
            for seg in set.segments() {
                match seg {
                    // Nothing came in precopy: a run of pending words is all to receive and
                    // nothing to discard (a run of ones never covers a block's partial last
                    // word: bits past its end are refused), one step for the run.
                    Segment::Fill(word, count) if nothing_seen && word != 0 => {
                        pending += 64 * count;
                        w += count;
                    }
                    Segment::Fill(word, count) => {
                        for _ in 0..count {
                            self.switch_word(hp0, n, w, word, &mut pending, &mut discard)?;
                            w += 1;
                        }
                    }
                    Segment::Literal(words) => {
                        for &word in words {
                            self.switch_word(hp0, n, w, word, &mut pending, &mut discard)?;
                            w += 1;
                        }
                    }
                }
            }
            hp0 += n;
        }
        let ranges: Vec<(usize, usize)> = discard
            .iter()
            .map(|&(first, n)| {
                (
                    self.base + (first << self.host_shift) as usize,
                    (n << self.host_shift) as usize,
                )
            })
            .collect();
        // SAFETY: whole host pages inside our private mapping; nothing runs on it yet, and
        // nothing holds a reference into it.
        if let Err(e) = unsafe { crate::sys::discard::discard(&ranges) } {
            return Err(MemoryError::Switch(format!(
                "discarding {} runs of host pages: {e}",
                ranges.len()
            )));
        }
        // Relaxed: published to the other threads by the Release store of `postcopy`.
        self.pending.store(pending, Ordering::Relaxed);
        if let Some(u) = &self.uffd {
            // SAFETY: `map` is our private mapping; the descriptor is closed before it is
            // unmapped (field order).
            if let Err(e) = unsafe { u.register(self.base as u64, self.len) } {
                return Err(MemoryError::Switch(format!("UFFDIO_REGISTER: {e}")));
            }
        }
        // Release: the pending count and present bits before any postcopy placement.
        self.postcopy.store(true, Ordering::Release);
        Ok(pending)
    }

    /// Applies word `w` of the pending set of the block of `n` host pages from global host
    /// page `hp0`: `missing` has a bit per pending host page. Counts them in `pending`, adds
    /// those that hold precopy data to `discard` (runs of host pages), marks the others
    /// present, and refuses a host page neither pending nor whole from precopy.
    fn switch_word(
        &self,
        hp0: u64,
        n: u64,
        w: u64,
        missing: u64,
        pending: &mut u64,
        discard: &mut Vec<(u64, u64)>,
    ) -> Result<(), MemoryError> {
        let first = hp0 + w * 64;
        let valid = low_bits(n - w * 64);
        let missing = missing & valid;
        // Host pages of which precopy brought any / every target page.
        let (any, all) = self.precopy_coverage(first, valid);
        let lost = !missing & valid & !all;
        if lost != 0 {
            return Err(MemoryError::Switch(format!(
                "host page {} is neither pending nor whole from precopy: a page would be lost",
                first + u64::from(lost.trailing_zeros())
            )));
        }
        *pending += u64::from(missing.count_ones());
        for (f, len) in bit_runs(missing & any) {
            match discard.last_mut() {
                Some((start, run)) if *start + *run == first + f => *run += len,
                _ => discard.push((first + f, len)),
            }
        }
        // Relaxed: published to the other threads by the Release store of `postcopy`.
        self.present
            .or64(first, !missing & valid, Ordering::Relaxed);
        Ok(())
    }

    fn precopy_coverage(&self, first: u64, valid: u64) -> (u64, u64) {
        coverage(
            &self.precopy_seen,
            self.host_page_size() / TARGET_PAGE,
            first,
            valid,
        )
    }

    /// Postcopy: places `[offset, offset + len)` of `block`: `data` (exactly `len` bytes)
    /// or zero pages, which came `via` a channel. Whole host pages.
    pub fn place(
        &self,
        block: u32,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        via: Via,
    ) -> Result<(), MemoryError> {
        // Acquire: pairs with the switch-over's Release (registration, present bits).
        if !self.postcopy.load(Ordering::Acquire) {
            return Err(MemoryError::BadRange(
                "a postcopy page before the switch-over".into(),
            ));
        }
        let at = self.range(block, offset, len, self.host_page_size())?;
        if data.is_some_and(|d| d.len() as u64 != len) {
            return Err(MemoryError::BadRange("payload length".into()));
        }
        let page = self.host_page_size();
        let first = at >> self.host_shift;
        for (i, hp) in (first..first + (len >> self.host_shift)).enumerate() {
            let src = data.map(|d| &d[i * page as usize..(i + 1) * page as usize]);
            self.place_host_page(hp, src, via)?;
        }
        Ok(())
    }

    fn place_host_page(&self, hp: u64, data: Option<&[u8]>, via: Via) -> Result<(), MemoryError> {
        let addr = self.base as u64 + (hp << self.host_shift);
        let page = self.host_page_size();
        let kind = if via.resend {
            CopyKind::Resent
        } else {
            CopyKind::Sent
        };
        // The first copy is placed; a second of the same kind is placed too, so that the
        // placement refuses and reports it (a real double placement).
        if self.copies.arrive(hp, kind) == Arrival::Duplicate {
            self.drop_duplicate(hp, data);
            return Ok(());
        }
        match &self.uffd {
            Some(u) => {
                // SAFETY: one host page inside the registered mapping.
                let r = unsafe {
                    match data {
                        Some(d) => u.copy(addr, d),
                        None if self.huge => u.copy(addr, &self.zeros),
                        None => u.zero(addr, page),
                    }
                };
                match r {
                    Ok(()) => {}
                    Err(e @ PlaceError::AlreadyPlaced { .. }) => {
                        self.twice(e.to_string());
                        if self.overwrite_duplicates {
                            // Test hook: what a destination without atomic placement does.
                            // SAFETY: in bounds; the race with the guest is the point.
                            unsafe {
                                match data {
                                    Some(d) => std::ptr::copy_nonoverlapping(
                                        d.as_ptr(),
                                        addr as *mut u8,
                                        page as usize,
                                    ),
                                    None => {
                                        std::ptr::write_bytes(addr as *mut u8, 0, page as usize)
                                    }
                                }
                            }
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(MemoryError::Place(e)),
                }
            }
            None => {
                if self.is_present(hp) {
                    self.twice(format!("host page {hp} placed twice"));
                    return Ok(());
                }
                if let Some(d) = data {
                    // SAFETY: in bounds; the page is not present, so the guest does not read
                    // it (it waits for the bit), and only this receiver writes it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(d.as_ptr(), addr as *mut u8, page as usize)
                    };
                } // zero pages: the page was discarded or never written, so it reads zero
            }
        }
        let now = now_ns();
        // Relaxed (all three): read after the run.
        self.placed_ns[hp as usize].store(now, Ordering::Relaxed);
        self.placed_chan[hp as usize].store(via.chan, Ordering::Relaxed);
        self.placed_recv_ns[hp as usize].store(via.recv_ns, Ordering::Relaxed);
        // Relaxed (both): `conn` is set before this connection's receivers are spawned
        // (the spawn orders it); the stamp is read after the run.
        let conn = self.conn.load(Ordering::Relaxed).saturating_add(1);
        self.placed_conn[hp as usize].store(conn, Ordering::Relaxed);
        if self.mark_present(hp) {
            // Relaxed: progress counters.
            self.placed.fetch_add(1, Ordering::Relaxed);
        }
        self.last_placed_ns.store(now, Ordering::Relaxed);
        // SeqCst: the software waiter's store-then-check against this set-then-check (Dekker).
        let w = self.waiting_on.load(Ordering::SeqCst);
        if w == hp {
            if let Some(t) = self
                .waiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                t.unpark();
            }
        }
        Ok(())
    }

    /// Counts a dropped deliberate duplicate of host page `hp` and keeps its checksums.
    fn drop_duplicate(&self, hp: u64, data: Option<&[u8]>) {
        let page = self.host_page_size();
        // Relaxed (both): counters read after the receivers are joined.
        self.dup_pages.fetch_add(1, Ordering::Relaxed);
        self.dup_bytes.fetch_add(page, Ordering::Relaxed);
        let first = (hp << self.host_shift) / TARGET_PAGE;
        let zero = [0u8; TARGET_PAGE as usize];
        let mut sums = self.dup_sums.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..page / TARGET_PAGE {
            let bytes = match data {
                Some(d) => &d[(i * TARGET_PAGE) as usize..((i + 1) * TARGET_PAGE) as usize],
                None => &zero[..],
            };
            sums.push((first + i, crate::guest::image::page_checksum(bytes)));
        }
    }

    /// Deliberate duplicates dropped: host pages and bytes.
    pub fn duplicates(&self) -> (u64, u64) {
        // Relaxed (both): read after the receivers are joined.
        (
            self.dup_pages.load(Ordering::Relaxed),
            self.dup_bytes.load(Ordering::Relaxed),
        )
    }

    /// `(global target page, checksum)` of each dropped duplicate's target pages.
    pub fn duplicate_sums(&self) -> Vec<(u64, u64)> {
        self.dup_sums
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets the present bit; true if it was clear.
    fn mark_present(&self, hp: u64) -> bool {
        // SeqCst (implies Release): publishes the contents to `is_present`, and orders
        // against the software waiter's `waiting_on` store.
        self.present.set(hp, Ordering::SeqCst)
    }

    /// Postcopy recovery: the connection that receives from now on (0 first). Called with no
    /// receiver running.
    pub fn set_connection(&self, n: u16) {
        // Relaxed: the receivers that read it are spawned after this store.
        self.conn.store(n, Ordering::Relaxed);
    }

    /// Which connection placed host page `hp` in postcopy, counting from 1 (0: none).
    pub fn placed_by(&self, hp: u64) -> u16 {
        // Relaxed: read after the run.
        self.placed_conn[hp as usize].load(Ordering::Relaxed)
    }

    /// Postcopy recovery: the received bitmap the source rebuilds from ("dirty = not
    /// received"): for each RAM block in order, one bit per target page (bit `p % 64` of
    /// word `p / 64`), set when its host page is in place (whole from precopy, or placed).
    /// Called with no receiver running, so it is exact.
    pub fn received_bitmap(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (b, block) in self.layout.ram().blocks().iter().enumerate() {
            let first = self.layout.block_first_page(b as u32);
            let pages = block.pages();
            let base = out.len();
            out.resize(base + pages.div_ceil(64) as usize, 0u64);
            for p in 0..pages {
                if self.is_present(self.host_page_of(first + p)) {
                    out[base + (p / 64) as usize] |= 1 << (p % 64);
                }
            }
        }
        out
    }

    /// Host pages requested and not in place (to ask again on a new connection).
    pub fn requested_missing(&self) -> Vec<u64> {
        (0..self.host_pages)
            // Relaxed: a request whose bit this misses is sent by its own thread on the new
            // connection (the connection swap and its send are ordered by a mutex).
            .filter(|&hp| self.requested.get(hp, Ordering::Relaxed) && !self.is_present(hp))
            .collect()
    }

    /// Unregisters the memory so a guest blocked in a fault wakes up (abort).
    pub fn release_blocked_guest(&self) {
        if let Some(u) = &self.uffd {
            let _ = u.unregister(self.base as u64, self.len);
        }
    }

    /// Software path: waits until host page `hp` is present, asking for it first with
    /// `request`. Returns false if `stop` was raised.
    pub fn wait_present(&self, hp: u64, request: &dyn Fn(u64), stop: &AtomicBool) -> bool {
        if self.claim_request(hp, now_ns()) {
            request(hp);
        }
        *self.waiter.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
        // SeqCst: Dekker with `place_host_page`.
        self.waiting_on.store(hp, Ordering::SeqCst);
        let ok = loop {
            if self.present.get(hp, Ordering::SeqCst) {
                break true;
            }
            // Relaxed: a polled flag.
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(2));
        };
        self.waiting_on.store(NOBODY, Ordering::SeqCst);
        ok
    }

    /// Whether the software fault path is in use (no userfaultfd).
    pub fn software(&self) -> bool {
        self.uffd.is_none()
    }

    /// Host address of global target page `page`.
    pub fn page_addr(&self, page: u64) -> u64 {
        assert!(page < self.layout.pages(), "page {page} outside guest RAM");
        self.base as u64 + page * TARGET_PAGE
    }

    /// The whole mapping as bytes (after the run, for verification).
    pub fn all_bytes(&self) -> &[u8] {
        &self.map[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PendingSet;

    /// A generator of reproducible patterns.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// The switch-over of a layout whose second block starts off a word boundary, for
    /// patterns of pages brought by precopy and pages pending: what it marks present,
    /// discards and counts is what the page-by-page rule says.
    #[test]
    fn the_switch_word_by_word_does_what_the_page_by_page_rule_says() {
        let layout = GuestLayout::new((16 << 20) + 3 * 4096, HostPageSize::Small, 1).unwrap();
        assert_ne!(layout.low_pages() % 64, 0, "block 1 starts inside a word");
        let pages = layout.pages();
        for seed in 1..6 {
            let mut r = rng(seed);
            let mem = DestMemory::new(&layout, FaultPath::Software, false).unwrap();
            let page = vec![0xabu8; TARGET_PAGE as usize];
            let mut seen = vec![false; pages as usize];
            for p in 0..pages {
                // Runs and holes of every length, and whole words of either.
                if (r() % 8 < 5) ^ (p / 200 % 3 == 0) {
                    let loc = layout.location(p);
                    mem.precopy_place(loc.block, loc.page * TARGET_PAGE, TARGET_PAGE, Some(&page))
                        .unwrap();
                    seen[p as usize] = true;
                }
            }
            // Pending: every page precopy did not bring, and some that it did.
            let pending_of =
                |p: u64, r: &mut dyn FnMut() -> u64| !seen[p as usize] || r().is_multiple_of(4);
            let mut is_pending = vec![false; pages as usize];
            let mut sw_pending = Vec::new();
            for (b, block) in layout.ram().blocks().iter().enumerate() {
                let first = layout.block_first_page(b as u32);
                let mut words = vec![0u64; block.host_pages().div_ceil(64) as usize];
                for i in 0..block.host_pages() {
                    if pending_of(first + i, &mut r) {
                        words[(i / 64) as usize] |= 1 << (i % 64);
                        is_pending[(first + i) as usize] = true;
                    }
                }
                sw_pending.push(PendingSet::from_words(block.host_pages(), &words).unwrap());
            }
            let sw = switch_over(sw_pending);
            let n = mem.switch(&sw).unwrap();
            assert_eq!(n, is_pending.iter().filter(|&&x| x).count() as u64);
            assert_eq!(n, sw.pending_host_pages());
            let ram = mem.all_bytes();
            for p in 0..pages {
                let (pend, s) = (is_pending[p as usize], seen[p as usize]);
                assert_eq!(mem.is_present(p), !pend, "seed {seed} page {p}");
                let byte = ram[(p * TARGET_PAGE) as usize];
                // Discarded pages read zero; kept ones hold what precopy brought.
                let want = if s && !pend { 0xab } else { 0 };
                assert_eq!(
                    byte, want,
                    "seed {seed} page {p} (pending {pend}, seen {s})"
                );
            }
        }
    }

    /// Pure postcopy: nothing came in precopy, every page is pending (a run per block), and
    /// a set that leaves a page out is refused.
    #[test]
    fn the_switch_of_pure_postcopy_takes_a_step_per_run() {
        let layout = GuestLayout::new((16 << 20) + 3 * 4096, HostPageSize::Small, 1).unwrap();
        let whole = |skip: Option<u64>| -> Vec<PendingSet> {
            let mut hp0 = 0;
            layout
                .ram()
                .blocks()
                .iter()
                .map(|b| {
                    let n = b.host_pages();
                    let mut w = vec![!0u64; n.div_ceil(64) as usize];
                    if n % 64 != 0 {
                        *w.last_mut().unwrap() = low_bits(n % 64);
                    }
                    if let Some(p) = skip.filter(|p| (hp0..hp0 + n).contains(p)) {
                        w[((p - hp0) / 64) as usize] &= !(1 << ((p - hp0) % 64));
                    }
                    hp0 += n;
                    PendingSet::from_words(n, &w).unwrap()
                })
                .collect()
        };
        let mem = DestMemory::new(&layout, FaultPath::Software, false).unwrap();
        assert_eq!(
            mem.switch(&switch_over(whole(None))).unwrap(),
            layout.pages()
        );
        assert!((0..layout.pages()).all(|p| !mem.is_present(p)));
        let mem = DestMemory::new(&layout, FaultPath::Software, false).unwrap();
        let e = mem
            .switch(&switch_over(whole(Some(3000))))
            .unwrap_err()
            .to_string();
        assert!(e.contains("host page 3000 is neither"), "{e}");
    }

    #[test]
    fn a_page_neither_pending_nor_whole_from_precopy_is_refused_by_number() {
        let layout = GuestLayout::new(16 << 20, HostPageSize::Small, 1).unwrap();
        let mem = DestMemory::new(&layout, FaultPath::Software, false).unwrap();
        // Everything pending but host page 1234 of block 0, which precopy never brought.
        let mut words: Vec<Vec<u64>> = layout
            .ram()
            .blocks()
            .iter()
            .map(|b| {
                let mut w = vec![!0u64; b.host_pages().div_ceil(64) as usize];
                if b.host_pages() % 64 != 0 {
                    *w.last_mut().unwrap() = low_bits(b.host_pages() % 64);
                }
                w
            })
            .collect();
        words[0][1234 / 64] &= !(1 << (1234 % 64));
        let sets: Vec<PendingSet> = layout
            .ram()
            .blocks()
            .iter()
            .zip(&words)
            .map(|(b, w)| PendingSet::from_words(b.host_pages(), w).unwrap())
            .collect();
        let e = mem.switch(&switch_over(sets)).unwrap_err().to_string();
        assert!(
            e.contains("host page 1234 is neither pending nor whole"),
            "{e}"
        );
        // And sets of another layout are refused, not read past their end.
        let other = vec![PendingSet::from_words(64, &[!0]).unwrap(); 2];
        let e = mem.switch(&switch_over(other)).unwrap_err().to_string();
        assert!(e.contains("do not fit this layout"), "{e}");
    }

    #[test]
    fn coverage_of_wide_host_pages_needs_every_target_page_for_whole() {
        let seen = Bits::new(4 * 512);
        // Host page 0: every target page; 1: one; 2: all but the last; 3: none.
        for p in 0..512 {
            seen.set(p, Ordering::Relaxed);
        }
        seen.set(512 + 300, Ordering::Relaxed);
        for p in 1024..1535 {
            seen.set(p, Ordering::Relaxed);
        }
        assert_eq!(coverage(&seen, 512, 0, 0b1111), (0b0111, 0b0001));
        assert_eq!(coverage(&seen, 512, 1, 0b11), (0b11, 0b00));
    }

    #[test]
    fn bits_read_and_set_across_words_and_runs_split_at_holes() {
        let b = Bits::new(200);
        b.or64(60, 0b1011, Ordering::Relaxed);
        assert_eq!(b.load64(60, Ordering::Relaxed), 0b1011);
        assert!(b.get(60, Ordering::Relaxed) && b.get(63, Ordering::Relaxed));
        assert!(!b.get(62, Ordering::Relaxed));
        // 200 bits are 4 words: bits past the last word are dropped, not a panic.
        b.or64(250, !0, Ordering::Relaxed);
        assert_eq!(b.load64(250, Ordering::Relaxed), 0b11_1111);
        assert_eq!(b.load64(256, Ordering::Relaxed), 0);
        assert_eq!(
            bit_runs(0b1110_0110).collect::<Vec<_>>(),
            vec![(1, 2), (5, 3)]
        );
        assert_eq!(bit_runs(!0).collect::<Vec<_>>(), vec![(0, 64)]);
        assert_eq!(bit_runs(1 << 63).collect::<Vec<_>>(), vec![(63, 1)]);
        assert_eq!(bit_runs(0).count(), 0);
    }

    fn switch_over(pending: Vec<PendingSet>) -> SwitchOver {
        SwitchOver {
            stop_ns: 0,
            stopped_ns: 0,
            synced_ns: 0,
            built_ns: 0,
            rounds: 0,
            precopy_pages: 0,
            precopy_bytes: 0,
            source_run_ns: 0,
            vcpus: Vec::new(),
            pending,
            guest: [0; 10],
            dirty_per_round: Vec::new(),
            sync_ns: Vec::new(),
            drain_ns: Vec::new(),
            kvm: crate::wire::switch::PrecopyKvm::default(),
        }
    }
}
