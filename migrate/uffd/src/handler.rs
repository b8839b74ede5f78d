//! The page server: one event thread serving vCPU faults, and N prefetchers, over one
//! [`PageScheduler`] whose bitmap means "not yet loaded".
//!
//! # Roles
//! * **Urgent path** (the event thread): polls the userfaultfd and the VMM's socket, reads
//!   events, and for each fault claims the faulted host page through
//!   [`PageScheduler::serve`]; a won claim is read from the source and placed with
//!   `UFFDIO_COPY`, then [`PageScheduler::urgent_sent`] leaves the hint "continue after the
//!   fault" (policy `pagehint`). A lost claim means a prefetcher owns the page: its copy wakes
//!   the vCPU.
//! * **Background path** (the prefetchers): each runs a [`BackgroundScanner`](pagehint::scheduler::BackgroundScanner)
//!   and places every host page it claims. Every page goes to exactly one claim (the bitmap's
//!   I1/I2), so each page is placed once; an `EEXIST` would mean otherwise and is counted.
//!
//! # Removed ranges (`UFFD_EVENT_REMOVE`)
//! The balloon's `madvise(MADV_DONTNEED)` queues a REMOVE event and waits until the handler
//! reads it; the kernel then zaps the range, which stays registered. A removed page must
//! never be filled from the file again: it faults again later and gets zeros (as Firecracker's
//! valid handler does). The race to close is a copy of stale file data issued after the event
//! was read but before the page was marked removed; the [`RemoveGate`] closes it (events read
//! and removed pages marked, and if not yet loaded claimed away from the prefetchers, under its
//! write side; a prefetcher's removed check and copy under its read side). A copy issued while
//! the event is queued fails with `EAGAIN` ([`PlaceError::Retry`]): the prefetcher leaves the
//! gate and retries, the event thread re-queues its own copy until after the next read. The
//! gate is model-checked (loom and shuttle, `loom-tests/src/remove.rs`), with the mutants that
//! mark after releasing the write side and copy without the read side.

use std::fmt;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pagehint::{BlockSpec, PageLocation, PageScheduler, RamLayout, Served, UrgentRequest};
use pagehint_uffd_gate::{EventRead, RemoveGate};
use rustix::event::{poll, PollFd, PollFlags};

pub use super::policy::Policy;
use super::policy::Scan;
use super::protocol::{recv_handshake, GuestRegionUffdMapping, ProtocolError};
use super::source::PageSource;
use pagehint_migrate::blocktime::{blocktime_of, Blocktime};
use pagehint_migrate::sys::clock::{now_ns, thread_cpu_ns, thread_run_delay_ns};
use pagehint_migrate::sys::uffd::{Fault, PlaceError, UffdEvent, Userfault};

/// Handler settings.
#[derive(Clone, Copy, Debug)]
pub struct HandlerOptions {
    /// The loading policy.
    pub policy: Policy,
    /// Prefetcher threads (policies pagehint and pagehint-nohint; linear uses one).
    pub prefetchers: usize,
    /// How long to wait for the VMM's handshake after it connects.
    pub handshake_timeout: Duration,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            policy: Policy::Pagehint,
            prefetchers: 1,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a session failed.
#[derive(Debug)]
pub enum HandlerError {
    /// The handshake failed.
    Protocol(ProtocolError),
    /// The regions do not make a layout (too many, too big).
    Layout(String),
    /// A fault outside every region: the VMM and the JSON disagree.
    FaultOutside(u64),
    /// The source could not give a page.
    Source {
        /// File offset.
        offset: u64,
        /// The error.
        error: io::Error,
    },
    /// Placing a page failed other than with `EEXIST` / `EAGAIN`.
    Place(PlaceError),
    /// An event other than a fault or a remove (fork, remap, unmap): not enabled by a
    /// Firecracker-style VMM, so not handled.
    UnexpectedEvent(u8),
    /// Polling or reading the descriptor or the socket failed.
    Io(io::Error),
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Protocol(e) => write!(f, "handshake: {e}"),
            Self::Layout(e) => write!(f, "regions: {e}"),
            Self::FaultOutside(a) => write!(f, "fault at {a:#x}, outside every region"),
            Self::Source { offset, error } => {
                write!(f, "reading the page at file offset {offset:#x}: {error}")
            }
            Self::Place(e) => write!(f, "{e}"),
            Self::UnexpectedEvent(e) => write!(f, "unexpected userfaultfd event {e:#x}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for HandlerError {}

impl From<ProtocolError> for HandlerError {
    fn from(e: ProtocolError) -> Self {
        Self::Protocol(e)
    }
}

/// Between the handler and whoever runs it: a stop request, and word that every page is in.
#[derive(Debug, Default)]
pub struct Control {
    /// Set to end the session (as if the VMM had closed the socket).
    pub stop: AtomicBool,
    /// Set by the handler once every page has been loaded (or removed).
    pub all_loaded: AtomicBool,
}

impl Control {
    /// Whether every page is in.
    pub fn all_loaded(&self) -> bool {
        // Acquire: pairs with the handler's Release store, so the caller may rely on the
        // placements that preceded it (it only reads the flag today).
        self.all_loaded.load(Ordering::Acquire)
    }
}

/// One fault as the handler saw it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct FaultRecord {
    /// The faulting thread (0 unless the VMM asked for `UFFD_FEATURE_THREAD_ID`).
    pub tid: u32,
    /// Its host page (global index over the regions).
    pub hp: u64,
    /// When the handler read it (`CLOCK_MONOTONIC` ns).
    pub read_ns: u64,
    /// When its host page was placed (ns): by the event thread for this fault, or else by
    /// whoever owned the page (a prefetcher, or the event thread for an earlier fault), but
    /// never before `read_ns` (a fault read after its page landed did not wait). `read_ns` if
    /// the page was never placed.
    pub placed_ns: u64,
}

impl FaultRecord {
    /// Time blocked as the handler measures it: from reading the fault to its page being
    /// placed (0 if the page was placed first).
    pub fn blocked_ns(&self) -> u64 {
        self.placed_ns.saturating_sub(self.read_ns)
    }
}

/// What a session did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HandlerReport {
    /// The policy.
    pub policy: Option<Policy>,
    /// Prefetcher threads run.
    pub prefetchers: usize,
    /// Host pages in all regions.
    pub host_pages: u64,
    /// Bytes in all regions.
    pub bytes: u64,
    /// When serving started (ns).
    pub start_ns: u64,
    /// Fault events read.
    pub faults: u64,
    /// Host pages placed by the event thread for a fault.
    pub fault_placed: u64,
    /// Faults whose page a prefetcher owned (or had placed) already.
    pub fault_already_claimed: u64,
    /// Host pages placed by the prefetchers.
    pub prefetched: u64,
    /// CPU time the prefetchers used (ns, all together): against their wall time it tells
    /// work from waiting for a CPU.
    pub prefetch_cpu_ns: u64,
    /// Time the prefetchers were runnable but waiting for a CPU (ns, all together; 0 where
    /// the kernel keeps no schedstat).
    pub prefetch_wait_ns: u64,
    /// Removed pages faulted again and filled with zeros.
    pub zero_filled: u64,
    /// Host pages removed before they were ever loaded (never filled from the file), claimed
    /// away by the event thread (or held by it for a fault when the remove came).
    pub removed_unloaded: u64,
    /// Host pages a prefetcher had claimed and then found removed (never filled from the
    /// file). Every host page is counted once in `fault_placed`, `prefetched`,
    /// `removed_unloaded` or `removed_skipped`.
    pub removed_skipped: u64,
    /// REMOVE events.
    pub remove_events: u64,
    /// `EEXIST` answers (a page placed twice: 0 unless something is wrong).
    pub eexist: u64,
    /// `EAGAIN` retries (an event was pending).
    pub retries: u64,
    /// When every page had been loaded or removed (ns), if it happened.
    pub all_loaded_ns: Option<u64>,
    /// When serving ended (ns).
    pub end_ns: u64,
    /// Bytes that arrived on the socket after the handshake (ignored).
    pub unexpected_bytes: u64,
    /// A prefetcher's failure, if any (prefetching then stopped; faults were still served).
    pub prefetch_error: Option<String>,
    /// Every fault.
    #[serde(skip)]
    pub fault_records: Vec<FaultRecord>,
}

impl HandlerReport {
    /// Time each vCPU (by thread id, `tids[i]` = vCPU `i`) was blocked: the union of its
    /// faults' waits, read → placed, merged as the destination merges them.
    pub fn blocktime(&self, tids: &[u32]) -> Blocktime {
        blocktime_of(
            self.fault_records
                .iter()
                .map(|r| (r.tid, r.read_ns, r.placed_ns)),
            tids,
        )
    }
}

/// Gives each fault not placed for itself (its page was owned by a prefetcher or by an
/// earlier fault) the time its page was placed, `placed(hp)` (0 if never), and no earlier
/// than when the fault was read.
fn settle(records: &mut [FaultRecord], placed: impl Fn(u64) -> u64) {
    for f in records.iter_mut().filter(|f| f.placed_ns == 0) {
        f.placed_ns = placed(f.hp).max(f.read_ns);
    }
}

/// Guest memory as the scheduler sees it: one block per region.
struct Regions {
    maps: Vec<GuestRegionUffdMapping>,
    layout: RamLayout,
    /// First global host page of each region.
    first_hp: Vec<u64>,
    host_pages: u64,
}

impl Regions {
    fn new(maps: Vec<GuestRegionUffdMapping>) -> Result<Self, HandlerError> {
        let specs = maps
            .iter()
            .enumerate()
            .map(|(i, m)| BlockSpec::new(format!("region{i}"), m.size, m.page_size));
        let layout =
            RamLayout::new(4096, specs).map_err(|e| HandlerError::Layout(e.to_string()))?;
        let mut first_hp = Vec::with_capacity(maps.len());
        let mut n = 0;
        for m in &maps {
            first_hp.push(n);
            n += m.size / m.page_size;
        }
        Ok(Self {
            maps,
            layout,
            first_hp,
            host_pages: n,
        })
    }

    /// (region, byte offset in the region) of `addr`.
    fn find(&self, addr: u64) -> Option<(usize, u64)> {
        self.maps
            .iter()
            .position(|m| m.contains(addr))
            .map(|r| (r, addr - self.maps[r].base_host_virt_addr))
    }

    /// Global host page of target page `page` of region `r`.
    fn hp(&self, r: usize, page: u64) -> u64 {
        self.first_hp[r] + (page << 12) / self.maps[r].page_size
    }
}

/// State shared by the event thread and the prefetchers.
struct Shared<'a> {
    regions: Regions,
    sched: PageScheduler,
    uffd: &'a Userfault,
    source: &'a dyn PageSource,
    /// Removed host pages, and the gate between reading REMOVE events and copying.
    gate: RemoveGate,
    /// Per host page: when it was placed from the source (ns; 0 = not yet).
    placed_ns: Box<[AtomicU64]>,
    stop: AtomicBool,
    /// Host pages loaded from the source or removed before loading, both paths.
    loaded: AtomicU64,
    prefetched: AtomicU64,
    /// Host pages a prefetcher had claimed and then found removed.
    removed_skipped: AtomicU64,
    /// CPU time the prefetchers used (ns), all together.
    prefetch_cpu_ns: AtomicU64,
    /// Time the prefetchers were runnable but had no CPU (ns), all together.
    prefetch_wait_ns: AtomicU64,
    eexist: AtomicU64,
    retries: AtomicU64,
    prefetch_error: Mutex<Option<String>>,
}

impl Shared<'_> {
    /// Reads target page `page` of region `r` (one host page, `buf.len()` bytes) from the
    /// source. Done outside the gate: a slow source (a remote one) never holds up the event
    /// thread's reads.
    fn fetch(&self, r: usize, page: u64, buf: &mut [u8]) -> Result<(), HandlerError> {
        let offset = self.regions.maps[r].offset + (page << 12);
        self.source
            .read_at(offset, buf)
            .map_err(|error| HandlerError::Source { offset, error })
    }

    /// Places `buf` at target page `page` of region `r` (`EAGAIN`: [`PlaceError::Retry`]).
    fn copy_page(&self, r: usize, page: u64, buf: &[u8]) -> Result<(), HandlerError> {
        let dst = self.regions.maps[r].base_host_virt_addr + (page << 12);
        // SAFETY: one host page inside a region the VMM registered with this descriptor.
        let r = unsafe { self.uffd.try_copy(dst, buf) };
        self.placed(r)
    }

    fn placed(&self, r: Result<(), PlaceError>) -> Result<(), HandlerError> {
        match r {
            Ok(()) => Ok(()),
            Err(PlaceError::AlreadyPlaced { .. }) => {
                // Relaxed: a counter read after the threads are joined.
                self.eexist.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(HandlerError::Place(e)),
        }
    }

    /// Records a prefetcher's failure (the first one is reported; prefetching then stops).
    fn fail(&self, e: HandlerError) {
        let mut slot = self
            .prefetch_error
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e.to_string());
    }

    fn stamp(&self, hp: u64) {
        // Relaxed: read after every thread is joined (the join orders it).
        self.placed_ns[hp as usize].store(now_ns(), Ordering::Relaxed);
        // Relaxed: a count; the event thread only compares it with the total.
        self.loaded.fetch_add(1, Ordering::Relaxed);
    }

    fn prefetch(&self, scanner: pagehint::scheduler::BackgroundScanner<'_>) {
        let (cpu, delay) = (thread_cpu_ns(), thread_run_delay_ns());
        self.prefetch_pages(scanner);
        // Relaxed: a sum read after the join.
        self.prefetch_cpu_ns
            .fetch_add(thread_cpu_ns() - cpu, Ordering::Relaxed);
        if let (Some(a), Some(b)) = (delay, thread_run_delay_ns()) {
            // Relaxed: a sum read after the join.
            self.prefetch_wait_ns
                .fetch_add(b.saturating_sub(a), Ordering::Relaxed);
        }
    }

    fn prefetch_pages(&self, scanner: pagehint::scheduler::BackgroundScanner<'_>) {
        let mut buf = Vec::new();
        for claim in scanner {
            for hp in claim.host_pages() {
                let r = claim.block() as usize;
                let g = self.regions.hp(r, hp.first_page);
                buf.resize(self.regions.maps[r].page_size as usize, 0);
                // A snapshot that spares fetching a page already removed (marks are never
                // cleared, so the gate below then finds it removed too); the gate decides.
                if !self.gate.is_removed(g as usize) {
                    if let Err(e) = self.fetch(r, hp.first_page, &mut buf) {
                        self.fail(e);
                        return;
                    }
                }
                loop {
                    // Relaxed: a polled flag; stopping late only loads more.
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let copied = self
                        .gate
                        .copy_unless_removed(g as usize, || self.copy_page(r, hp.first_page, &buf));
                    match copied {
                        None => {
                            // Removed: never loaded from the file again. A vCPU whose fault
                            // was read while this prefetcher owned the page waits for a copy
                            // that will not come: wake it, so that it faults again and the
                            // event thread places zeros.
                            let m = &self.regions.maps[r];
                            let dst = m.base_host_virt_addr + (hp.first_page << 12);
                            let _ = self.uffd.wake(dst, m.page_size);
                            // Relaxed: a counter read after the join.
                            self.removed_skipped.fetch_add(1, Ordering::Relaxed);
                            // Relaxed: a count (see `stamp`).
                            self.loaded.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Some(Ok(())) => {
                            self.stamp(g);
                            // Relaxed: a counter read after the join.
                            self.prefetched.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Some(Err(HandlerError::Place(PlaceError::Retry))) => {
                            // Relaxed: a counter read after the join.
                            self.retries.fetch_add(1, Ordering::Relaxed);
                            std::thread::yield_now();
                        }
                        Some(Err(e)) => {
                            self.fail(e);
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Accepts the handshake on `stream` (a connection from the VMM) and serves it until the VMM
/// closes the socket or `stop` is set.
pub fn handle_connection(
    stream: &UnixStream,
    source: &dyn PageSource,
    opts: &HandlerOptions,
    control: &Control,
) -> Result<HandlerReport, HandlerError> {
    let (maps, fd) = recv_handshake(stream, opts.handshake_timeout, source.size())?;
    let uffd = Userfault::from_received(fd);
    serve(stream, maps, &uffd, source, opts, control)
}

/// Serves faults on `uffd` for `maps` from `source` until the VMM closes `stream` or
/// `control.stop` is set.
pub fn serve(
    stream: &UnixStream,
    maps: Vec<GuestRegionUffdMapping>,
    uffd: &Userfault,
    source: &dyn PageSource,
    opts: &HandlerOptions,
    control: &Control,
) -> Result<HandlerReport, HandlerError> {
    let regions = Regions::new(maps)?;
    let sched = PageScheduler::new(regions.layout.clone(), opts.policy.scheduler())
        .map_err(HandlerError::Io)?;
    sched.bitmap().mark_all(); // nothing is loaded yet
    let n = regions.host_pages as usize;
    let shared = Shared {
        sched,
        uffd,
        source,
        gate: RemoveGate::new(n),
        placed_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
        loaded: AtomicU64::new(0),
        prefetched: AtomicU64::new(0),
        removed_skipped: AtomicU64::new(0),
        prefetch_cpu_ns: AtomicU64::new(0),
        prefetch_wait_ns: AtomicU64::new(0),
        eexist: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        prefetch_error: Mutex::new(None),
        regions,
    };
    let prefetchers = opts.policy.prefetchers(opts.prefetchers);
    let mut report = HandlerReport {
        policy: Some(opts.policy),
        prefetchers,
        host_pages: shared.regions.host_pages,
        bytes: shared.regions.maps.iter().map(|m| m.size).sum(),
        start_ns: now_ns(),
        ..Default::default()
    };
    let result = std::thread::scope(|s| {
        let scanners = match opts.policy.scan() {
            Scan::None => Vec::new(),
            Scan::FromStart => vec![shared.sched.background_from(PageLocation::new(0, 0))],
            Scan::Spaced => shared.sched.background_scanners(prefetchers),
        };
        let shared = &shared;
        for (i, sc) in scanners.into_iter().enumerate().take(prefetchers) {
            std::thread::Builder::new()
                .name(format!("prefetch{i}"))
                .spawn_scoped(s, move || shared.prefetch(sc))
                .map_err(HandlerError::Io)?;
        }
        let r = event_loop(shared, stream, control, &mut report);
        // Relaxed: a polled flag; the scope's join orders everything after it.
        shared.stop.store(true, Ordering::Relaxed);
        r
    });
    report.end_ns = now_ns();
    // Relaxed loads: every thread has been joined.
    report.prefetched = shared.prefetched.load(Ordering::Relaxed);
    report.removed_skipped = shared.removed_skipped.load(Ordering::Relaxed);
    report.prefetch_cpu_ns = shared.prefetch_cpu_ns.load(Ordering::Relaxed);
    report.prefetch_wait_ns = shared.prefetch_wait_ns.load(Ordering::Relaxed);
    report.eexist = shared.eexist.load(Ordering::Relaxed);
    report.retries += shared.retries.load(Ordering::Relaxed);
    report.prefetch_error = shared
        .prefetch_error
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let mut last = 0;
    let mut all = true;
    for (hp, p) in shared.placed_ns.iter().enumerate() {
        // Relaxed: joined.
        let (p, r) = (p.load(Ordering::Relaxed), shared.gate.is_removed(hp));
        if p == 0 && !r {
            all = false;
        }
        last = last.max(p);
    }
    report.all_loaded_ns = all.then_some(last);
    settle(&mut report.fault_records, |hp| {
        // Relaxed: every thread has been joined.
        shared.placed_ns[hp as usize].load(Ordering::Relaxed)
    });
    result.map(|()| report)
}

/// A fault (or its copy) that must wait for the next read of events.
struct Pending {
    record: usize,
    r: usize,
    page: u64,
    hp: u64,
    claim: Option<pagehint::Claim>,
    /// The page's bytes, kept once a copy of them had to be retried (empty until then): a
    /// page is fetched once.
    data: Vec<u8>,
}

/// The event thread: polls the userfaultfd and the VMM's socket until the VMM goes (or
/// `control.stop`), reading events, marking removed ranges, and placing what each fault
/// needs; a copy the kernel asks to retry waits for the next round.
fn event_loop(
    sh: &Shared<'_>,
    stream: &UnixStream,
    control: &Control,
    report: &mut HandlerReport,
) -> Result<(), HandlerError> {
    let mut events = Vec::new();
    let mut retry: Vec<Pending> = Vec::new();
    let mut still: Vec<Pending> = Vec::new();
    let mut placer = Placer::new(sh);
    // The socket is only watched for its end (or stray bytes).
    stream.set_nonblocking(true).map_err(HandlerError::Io)?;
    loop {
        // Relaxed: a polled flag.
        if control.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Relaxed: a count compared with the total; the flag below carries the news.
        if sh.loaded.load(Ordering::Relaxed) == sh.regions.host_pages {
            // Release: see `Control::all_loaded`.
            control.all_loaded.store(true, Ordering::Release);
        }
        let (uffd_ready, sock_ready) = wait(sh, stream, !retry.is_empty())?;
        if sock_ready && vmm_gone(stream, report)? {
            return Ok(());
        }
        if uffd_ready || !retry.is_empty() {
            read_events(sh, &mut events, report)?;
        }
        let now = now_ns();
        for e in events.drain(..) {
            match e {
                UffdEvent::Remove { .. } => {}
                UffdEvent::Other(k) => return Err(HandlerError::UnexpectedEvent(k)),
                UffdEvent::Fault(f) => retry.extend(accept_fault(sh, f, now, report)?),
            }
        }
        // Place what the faults need (new ones, and those that had to wait).
        for p in retry.drain(..) {
            still.extend(placer.place(p, report)?);
        }
        std::mem::swap(&mut retry, &mut still);
    }
}

/// Waits (briefly when copies are to be retried) for the userfaultfd or the socket.
fn wait(
    sh: &Shared<'_>,
    stream: &UnixStream,
    retrying: bool,
) -> Result<(bool, bool), HandlerError> {
    let mut fds = [
        PollFd::new(sh.uffd, PollFlags::IN),
        PollFd::new(stream, PollFlags::IN),
    ];
    let wait = if retrying { 100_000 } else { 50_000_000 };
    match poll(
        &mut fds,
        Some(&pagehint_migrate::sys::clock::timespec(wait)),
    ) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(HandlerError::Io(e.into())),
    }
    Ok((!fds[0].revents().is_empty(), !fds[1].revents().is_empty()))
}

/// Whether the VMM has gone (its socket closed or reset); stray bytes are counted.
fn vmm_gone(stream: &UnixStream, report: &mut HandlerReport) -> Result<bool, HandlerError> {
    let mut b = [0u8; 4096];
    match io::Read::read(&mut &*stream, &mut b) {
        Ok(0) => Ok(true),
        Ok(n) => {
            report.unexpected_bytes += n as u64;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
        Err(e) => Err(HandlerError::Io(e)),
    }
}

/// Reads the queued events under the gate's write side, marking removed ranges before any
/// prefetcher can copy again (module docs).
fn read_events(
    sh: &Shared<'_>,
    events: &mut Vec<UffdEvent>,
    report: &mut HandlerReport,
) -> Result<(), HandlerError> {
    sh.gate.read_events(|ev| {
        sh.uffd.read_events(events).map_err(HandlerError::Io)?;
        for e in events.iter() {
            if let UffdEvent::Remove { start, end } = *e {
                report.remove_events += 1;
                mark_removed(sh, ev, start, end, report);
            }
        }
        Ok::<(), HandlerError>(())
    })
}

/// Records fault `f` (read at `now`) and claims its host page: what to place for it, or
/// nothing when a prefetcher owns the page (its copy wakes the vCPU).
fn accept_fault(
    sh: &Shared<'_>,
    f: Fault,
    now: u64,
    report: &mut HandlerReport,
) -> Result<Option<Pending>, HandlerError> {
    report.faults += 1;
    let (r, off) = sh
        .regions
        .find(f.addr)
        .ok_or(HandlerError::FaultOutside(f.addr))?;
    let ps = sh.regions.maps[r].page_size;
    let page = (off & !(ps - 1)) >> 12;
    let hp = sh.regions.hp(r, page);
    report.fault_records.push(FaultRecord {
        tid: f.tid,
        hp,
        read_ns: now,
        placed_ns: 0,
    });
    let record = report.fault_records.len() - 1;
    let claim = if sh.gate.is_removed(hp as usize) {
        None
    } else {
        let req = UrgentRequest::new(r as u32, off & !4095, 4096);
        match sh.sched.serve(req) {
            Ok(Served::Send(c)) => Some(c),
            Ok(_) => {
                report.fault_already_claimed += 1;
                return Ok(None);
            }
            Err(e) => return Err(HandlerError::Layout(e.to_string())),
        }
    };
    Ok(Some(Pending {
        record,
        r,
        page,
        hp,
        claim,
        data: Vec::new(),
    }))
}

/// Places pages for faults: a removed page as zeros, any other from the source.
struct Placer<'a, 's> {
    sh: &'a Shared<'s>,
    zeros: Vec<u8>,
    /// One host page fetched for a fault, reused: only a copy that must wait is kept apart.
    buf: Vec<u8>,
}

impl<'a, 's> Placer<'a, 's> {
    fn new(sh: &'a Shared<'s>) -> Self {
        let max_page = sh.regions.maps.iter().map(|m| m.page_size).max();
        Self {
            sh,
            zeros: vec![0u8; 2 << 20],
            buf: vec![0u8; max_page.unwrap_or(0) as usize],
        }
    }

    /// Places `p`'s page; returns it if the copy must be retried after the next read.
    fn place(
        &mut self,
        mut p: Pending,
        report: &mut HandlerReport,
    ) -> Result<Option<Pending>, HandlerError> {
        let sh = self.sh;
        let ps = sh.regions.maps[p.r].page_size as usize;
        let removed = sh.gate.is_removed(p.hp as usize);
        let r = if removed {
            let dst = sh.regions.maps[p.r].base_host_virt_addr + (p.page << 12);
            // SAFETY: one host page inside a registered region.
            let r = unsafe {
                if ps > 4096 {
                    sh.uffd.try_copy(dst, &self.zeros[..ps])
                } else {
                    sh.uffd.try_zero(dst, 4096)
                }
            };
            sh.placed(r)
        } else if p.data.is_empty() {
            let buf = &mut self.buf[..ps];
            sh.fetch(p.r, p.page, buf)?;
            let r = sh.copy_page(p.r, p.page, buf);
            if matches!(r, Err(HandlerError::Place(PlaceError::Retry))) {
                p.data.extend_from_slice(buf);
            }
            r
        } else {
            sh.copy_page(p.r, p.page, &p.data)
        };
        match r {
            Ok(()) => {
                let t = now_ns();
                if removed {
                    report.zero_filled += 1;
                    if p.claim.is_some() {
                        // Claimed for this fault, removed before it was loaded.
                        report.removed_unloaded += 1;
                        // Relaxed: a count (see `stamp`).
                        sh.loaded.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    sh.stamp(p.hp);
                    report.fault_placed += 1;
                }
                report.fault_records[p.record].placed_ns = t;
                if let Some(c) = &p.claim {
                    let _ = sh.sched.urgent_sent(c);
                }
                Ok(None)
            }
            Err(HandlerError::Place(PlaceError::Retry)) => {
                report.retries += 1;
                Ok(Some(p))
            }
            Err(e) => Err(e),
        }
    }
}

/// Marks the host pages overlapping `[start, end)` removed, and claims those not yet loaded
/// so that no prefetcher loads them.
fn mark_removed(
    sh: &Shared<'_>,
    ev: &EventRead<'_>,
    start: u64,
    end: u64,
    report: &mut HandlerReport,
) {
    for (r, m) in sh.regions.maps.iter().enumerate() {
        let lo = start.max(m.base_host_virt_addr);
        let hi = end.min(m.base_host_virt_addr + m.size);
        if lo >= hi {
            continue;
        }
        let ps = m.page_size;
        let mut at = (lo - m.base_host_virt_addr) & !(ps - 1);
        while m.base_host_virt_addr + at < hi {
            let page = at >> 12;
            let hp = sh.regions.hp(r, page);
            ev.mark_removed(hp as usize);
            if let Ok(c) = sh
                .sched
                .bitmap()
                .claim_host_page(PageLocation::new(r as u32, page))
            {
                if c.into_claim().is_some() {
                    report.removed_unloaded += 1;
                    // Relaxed: a count (see `stamp`).
                    sh.loaded.fetch_add(1, Ordering::Relaxed);
                }
            }
            at += ps;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{settle, FaultRecord};

    #[test]
    fn a_fault_on_a_page_placed_by_another_thread_waits_until_that_copy() {
        let rec = |hp, read_ns, placed_ns| FaultRecord {
            tid: 7,
            hp,
            read_ns,
            placed_ns,
        };
        // Page 1 placed (by a prefetcher) at 500, page 2 at 100, page 3 never.
        let placed = |hp: u64| [0, 500, 100, 0][hp as usize];
        let mut r = [
            rec(1, 200, 0),   // read while a prefetcher owned it: waits until 500
            rec(2, 200, 0),   // read after the copy: did not wait
            rec(3, 200, 0),   // never placed (removed): no wait measured
            rec(1, 100, 150), // placed for itself (zeros, say): kept
        ];
        settle(&mut r, placed);
        assert_eq!(r.map(|f| f.placed_ns), [500, 200, 200, 150]);
        assert_eq!(r[0].blocked_ns(), 300);
    }
}
