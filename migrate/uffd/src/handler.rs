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
//! * **Background path** (the prefetchers): each runs a [`BackgroundScanner`]
//!   and places every host page it claims. Every page goes to exactly one claim (the bitmap's
//!   I1/I2), so each page is placed once; an `EEXIST` would mean otherwise and is counted.
//!
//! # Recorded working sets
//! Policy `record` serves faults on demand and, when the session ends, writes each host
//! page's first fault (within `record_for` of the start) to a [`record`]
//! file, as memory-file offsets. Policies `recorded` and `recorded+pagehint` read one at the
//! start (checked against the regions) and give it to one prefetcher, which claims and
//! places the recorded pages in order through the same bitmap (so a page the fault path or
//! another prefetcher took first is skipped, and each page is still placed once); with
//! `recorded+pagehint`, whenever a fault's hint is pending it first takes one hinted step
//! (the pages after the fault: what the record did not predict), and after the record it
//! scans on with the hint.
//!
//! # When a session ends
//! Firecracker v1.12+ keeps the socket open while it runs, so its end means the VMM has
//! gone; v1.7–v1.11 close it right after the handshake, and then it means nothing (the
//! handler stops watching it and serves on). Whatever the release, a session also ends when
//! the VMM's process exits (a pidfd of the `SO_PEERCRED` pid, where the VMM is another
//! process), when a copy finds the address space gone (`ESRCH`), or on [`Control::stop`].
//! It fails, at once, on a descriptor that is not a non-blocking userfaultfd, on the
//! userfaultfd reporting an error, and on any failure of a prefetcher (a page that cannot be
//! read or placed would leave a vCPU waiting forever); the caller then kills the VMM or tells
//! it (see `pagehint-uffd serve --on-fatal`).
//!
//! # What a fault's wait is measured from
//! The kernel gives a fault no timestamp, so its wait is bounded on both sides: from when it
//! was **read** (a lower bound), and from the latest moment it can be shown to have been
//! **queued after** (an upper bound): the start of the previous read, which left the queue
//! empty, or, when the handler slept in `poll(2)` before reading it, the wake-up minus the
//! time the event thread spent runnable or running since it went to sleep (from the thread's
//! CPU clock and `/proc/thread-self/schedstat`): the fault cannot have arrived while the
//! thread slept, or the thread would have woken. Waiting for the gate's write side (the
//! handler's only lock on this path) falls inside both.
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
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pagehint::scheduler::BackgroundScanner;
use pagehint::{BlockSpec, Claim, PageLocation, PageScheduler, RamLayout, Served, UrgentRequest};
use pagehint_uffd_gate::{EventRead, RemoveGate};
use rustix::event::{poll, PollFd, PollFlags};

pub use super::policy::Policy;
use super::policy::Scan;
use super::protocol::{recv_handshake, GuestRegionUffdMapping, HandshakeFormat, ProtocolError};
use super::record::{self, RecordError};
use super::source::PageSource;
use pagehint_migrate::blocktime::{blocktime_of, Blocktime};
use pagehint_migrate::sys::clock::{now_ns, thread_cpu_ns, thread_run_delay_ns};
use pagehint_migrate::sys::uffd::{Fault, PlaceError, ReceivedError, UffdEvent, Userfault};

/// Handler settings.
#[derive(Clone, Debug)]
pub struct HandlerOptions {
    /// The loading policy.
    pub policy: Policy,
    /// Prefetcher threads (policies pagehint and pagehint-nohint; linear uses one).
    pub prefetchers: usize,
    /// How long to wait for the VMM's handshake after it connects.
    pub handshake_timeout: Duration,
    /// The record file: written by policy `record`, read by `recorded` and
    /// `recorded+pagehint` (required by those three, ignored by the others).
    pub record: Option<PathBuf>,
    /// Policy `record`: record the faults read within this long of the session's start
    /// (`None`: every fault of the session).
    pub record_for: Option<Duration>,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            policy: Policy::Pagehint,
            prefetchers: 1,
            handshake_timeout: Duration::from_secs(5),
            record: None,
            record_for: None,
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
    /// The descriptor received is not a non-blocking userfaultfd.
    Descriptor(ReceivedError),
    /// `poll(2)` reports an error on the userfaultfd (its revents).
    UffdPoll(String),
    /// The record could not be written, read, or does not fit the regions.
    Record(RecordError),
    /// The policy needs a record file and none was given.
    NoRecord(Policy),
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
            Self::Descriptor(e) => write!(f, "{e}"),
            Self::UffdPoll(ev) => write!(f, "poll(2) reports {ev} on the userfaultfd"),
            Self::Record(e) => write!(f, "{e}"),
            Self::NoRecord(p) => write!(f, "policy {p} needs a record file (--record)"),
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

impl From<RecordError> for HandlerError {
    fn from(e: RecordError) -> Self {
        Self::Record(e)
    }
}

/// Why a session ended without failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// [`Control::stop`] was set.
    Stopped,
    /// The VMM closed the socket it keeps while it runs (Firecracker v1.12+).
    SocketClosed,
    /// The VMM's process exited.
    VmmExited,
    /// A copy found the registering address space gone (`ESRCH`).
    AddressSpaceGone,
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
    /// The latest moment it is known to have been queued after (`CLOCK_MONOTONIC` ns; the
    /// module docs say how); 0 where nothing is known (read in the first round).
    pub queued_after_ns: u64,
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
    /// Which Firecracker releases' handshake the VMM sent.
    pub handshake: Option<HandshakeFormat>,
    /// The VMM's process id (`SO_PEERCRED`).
    pub peer_pid: Option<i32>,
    /// Whether the VMM's process was watched for its exit (a pidfd; not where the VMM is
    /// this process, or the kernel has no `pidfd_open`).
    pub watched_vmm_process: bool,
    /// Why the session ended (when it did not fail).
    pub ended_by: Option<EndReason>,
    /// When the VMM closed the socket, where that did not end the session (v1.7–v1.11).
    pub socket_closed_ns: Option<u64>,
    /// Times the event thread waited in `poll(2)` (an idle session adds about 20 a second:
    /// no busy wait).
    pub polls: u64,
    /// CPU time the event thread used (ns).
    pub event_cpu_ns: u64,
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
    /// Pages in the record written (policy `record`) or followed (`recorded`,
    /// `recorded+pagehint`).
    pub record_pages: u64,
    /// Host pages placed by the prefetcher following the record, from the record.
    pub record_placed: u64,
    /// Hinted claims the record's prefetcher took between recorded pages
    /// (`recorded+pagehint`).
    pub record_hint_steps: u64,
    /// Faults whose queueing moment is bounded by a sleep in `poll(2)` (the rest by the
    /// previous read, or, in the first round, not at all).
    pub bounded_by_sleep: u64,
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

/// One sample of the event thread's clocks, to tell whether it slept in `poll(2)`.
#[derive(Clone, Copy)]
struct Clocks {
    /// `CLOCK_MONOTONIC`.
    t: u64,
    /// The thread's CPU time.
    cpu: u64,
    /// Its time runnable but not running (`None`: no schedstat here).
    run_delay: Option<u64>,
}

/// The event thread's own `/proc/thread-self/schedstat`, kept open (read again with
/// `pread` at 0: one system call).
struct SchedStat {
    file: Option<File>,
    buf: [u8; 96],
}

impl SchedStat {
    /// Opened by the thread it describes.
    fn open() -> Self {
        Self {
            file: File::open("/proc/thread-self/schedstat").ok(),
            buf: [0; 96],
        }
    }

    fn sample(&mut self) -> Clocks {
        let run_delay = self.file.as_ref().and_then(|f| {
            let n = f.read_at(&mut self.buf, 0).ok()?;
            let text = std::str::from_utf8(&self.buf[..n]).ok()?;
            text.split_whitespace().nth(1)?.parse().ok()
        });
        Clocks {
            t: now_ns(),
            cpu: thread_cpu_ns(),
            run_delay,
        }
    }
}

/// Time unaccounted for by CPU and run-queue time that shows a sleep (the clocks are read
/// one after the other, a few hundred ns apart).
const SLEEP_SLACK_NS: u64 = 20_000;

/// The latest moment a fault read after `after` (and after the wait that began at `before`)
/// must have been queued after: where the thread slept, the wake-up minus the time it was
/// runnable or running since (it did not sleep after the fault arrived); else nothing
/// beyond `empty_since` (when the previous read left the queue empty).
fn queued_after(empty_since: u64, before: Clocks, after: Clocks) -> (u64, bool) {
    let (Some(r0), Some(r1)) = (before.run_delay, after.run_delay) else {
        return (empty_since, false);
    };
    let awake = after.cpu.saturating_sub(before.cpu) + r1.saturating_sub(r0);
    let elapsed = after.t.saturating_sub(before.t);
    if elapsed > awake + SLEEP_SLACK_NS {
        (empty_since.max(after.t - awake), true)
    } else {
        (empty_since, false)
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

    /// The memory-file offset of global host page `hp`.
    fn file_offset(&self, hp: u64) -> u64 {
        let r = self.first_hp.partition_point(|&f| f <= hp) - 1;
        let m = &self.maps[r];
        m.offset + (hp - self.first_hp[r]) * m.page_size
    }

    /// (region, first target page) of the host page at memory-file offset `off`, if one
    /// starts there.
    fn at_file_offset(&self, off: u64) -> Option<(usize, u64)> {
        self.maps.iter().enumerate().find_map(|(r, m)| {
            let rel = off.checked_sub(m.offset)?;
            (rel < m.size && rel.is_multiple_of(m.page_size)).then_some((r, rel >> 12))
        })
    }

    /// The record's offsets as (region, first target page), checked: each a host page of
    /// these regions, none twice.
    fn recorded_pages(&self, offsets: &[u64]) -> Result<Vec<(usize, u64)>, RecordError> {
        let mut seen = vec![false; self.host_pages as usize];
        offsets
            .iter()
            .enumerate()
            .map(|(index, &offset)| {
                let (r, page) = self
                    .at_file_offset(offset)
                    .ok_or(RecordError::Outside { index, offset })?;
                let hp = self.hp(r, page) as usize;
                if std::mem::replace(&mut seen[hp], true) {
                    return Err(RecordError::Duplicate { index, offset });
                }
                Ok((r, page))
            })
            .collect()
    }
}

/// What a prefetcher runs.
enum Job<'a> {
    /// A scan to its end.
    Scan(BackgroundScanner<'a>),
    /// The record, in order; with a scanner, hinted steps between its pages and the scan
    /// after it.
    Record(Vec<(usize, u64)>, Option<BackgroundScanner<'a>>),
}

/// A prefetcher stops: asked to, the VMM gone, or a failure recorded.
struct Halt;

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
    /// Host pages the record's prefetcher placed from the record, and its hinted steps.
    record_placed: AtomicU64,
    record_hint_steps: AtomicU64,
    /// A prefetcher found the address space gone (`ESRCH`).
    gone: AtomicBool,
    /// A prefetcher's failure (the first one): it fails the session.
    failure: Mutex<Option<HandlerError>>,
    /// Set with `failure`, for the event thread to poll cheaply.
    failed: AtomicBool,
}

impl<'a> Shared<'a> {
    /// The shared state of a session over `regions`, nothing placed yet.
    fn new(
        regions: Regions,
        sched: PageScheduler,
        uffd: &'a Userfault,
        source: &'a dyn PageSource,
    ) -> Self {
        let n = regions.host_pages as usize;
        Shared {
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
            record_placed: AtomicU64::new(0),
            record_hint_steps: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            regions,
        }
    }

    /// Adds the counters, when every page was in place, and the faults' placement times
    /// to `report`; once every thread has been joined.
    fn tally(&self, report: &mut HandlerReport) {
        // Relaxed loads: every thread has been joined.
        report.prefetched = self.prefetched.load(Ordering::Relaxed);
        report.removed_skipped = self.removed_skipped.load(Ordering::Relaxed);
        report.prefetch_cpu_ns = self.prefetch_cpu_ns.load(Ordering::Relaxed);
        report.prefetch_wait_ns = self.prefetch_wait_ns.load(Ordering::Relaxed);
        report.eexist = self.eexist.load(Ordering::Relaxed);
        report.retries += self.retries.load(Ordering::Relaxed);
        report.record_placed = self.record_placed.load(Ordering::Relaxed);
        report.record_hint_steps = self.record_hint_steps.load(Ordering::Relaxed);
        let mut last = 0;
        let mut all = true;
        for (hp, p) in self.placed_ns.iter().enumerate() {
            // Relaxed: joined.
            let (p, r) = (p.load(Ordering::Relaxed), self.gate.is_removed(hp));
            if p == 0 && !r {
                all = false;
            }
            last = last.max(p);
        }
        report.all_loaded_ns = all.then_some(last);
        settle(&mut report.fault_records, |hp| {
            // Relaxed: every thread has been joined.
            self.placed_ns[hp as usize].load(Ordering::Relaxed)
        });
    }
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

    /// Records a prefetcher's failure (the first one fails the session); the address space
    /// gone is no failure but the session's end.
    fn fail(&self, e: HandlerError) {
        if matches!(e, HandlerError::Place(PlaceError::Gone)) {
            // Relaxed: a polled flag; the event thread then ends the session.
            self.gone.store(true, Ordering::Relaxed);
            return;
        }
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
        // Release: the event thread's Acquire load then finds the error in the slot (the
        // mutex orders it anyway; the flag spares it the lock).
        self.failed.store(true, Ordering::Release);
    }

    /// Whether prefetching should stop.
    fn halted(&self) -> bool {
        // Relaxed: polled flags; stopping late only loads more.
        self.stop.load(Ordering::Relaxed)
            || self.gone.load(Ordering::Relaxed)
            || self.failed.load(Ordering::Relaxed)
    }

    fn stamp(&self, hp: u64) {
        // Relaxed: read after every thread is joined (the join orders it).
        self.placed_ns[hp as usize].store(now_ns(), Ordering::Relaxed);
        // Relaxed: a count; the event thread only compares it with the total.
        self.loaded.fetch_add(1, Ordering::Relaxed);
    }

    fn prefetch(&self, job: Job<'_>) {
        let (cpu, delay) = (thread_cpu_ns(), thread_run_delay_ns());
        let mut buf = Vec::new();
        let _ = match job {
            Job::Scan(scanner) => self.scan(scanner, &mut buf),
            Job::Record(pages, scanner) => self.follow_record(&pages, scanner, &mut buf),
        };
        // Relaxed: a sum read after the join.
        self.prefetch_cpu_ns
            .fetch_add(thread_cpu_ns() - cpu, Ordering::Relaxed);
        if let (Some(a), Some(b)) = (delay, thread_run_delay_ns()) {
            // Relaxed: a sum read after the join.
            self.prefetch_wait_ns
                .fetch_add(b.saturating_sub(a), Ordering::Relaxed);
        }
    }

    fn scan(&self, scanner: BackgroundScanner<'_>, buf: &mut Vec<u8>) -> Result<(), Halt> {
        for claim in scanner {
            self.place_claim(&claim, buf)?;
        }
        Ok(())
    }

    /// Places the recorded pages in order (each one this prefetcher still wins), taking one
    /// hinted step first whenever a hint is pending; then scans on (module docs).
    fn follow_record(
        &self,
        pages: &[(usize, u64)],
        mut scanner: Option<BackgroundScanner<'_>>,
        buf: &mut Vec<u8>,
    ) -> Result<(), Halt> {
        for &(r, page) in pages {
            if let Some(sc) = scanner.as_mut() {
                if self.sched.hint().peek().is_some() {
                    if let Some(c) = sc.next_claim() {
                        // Relaxed: a counter read after the join.
                        self.record_hint_steps.fetch_add(1, Ordering::Relaxed);
                        self.place_claim(&c, buf)?;
                    }
                }
            }
            let loc = PageLocation::new(r as u32, page);
            // The pages were checked against the regions: the location is valid.
            if let Some(c) = self
                .sched
                .bitmap()
                .claim_host_page(loc)
                .ok()
                .and_then(|c| c.into_claim())
            {
                // Relaxed: a counter read after the join.
                self.record_placed.fetch_add(1, Ordering::Relaxed);
                self.place_claim(&c, buf)?;
            } else if self.halted() {
                return Err(Halt);
            }
        }
        match scanner {
            Some(sc) => self.scan(sc, buf),
            None => Ok(()),
        }
    }

    /// Places every host page of a prefetcher's claim (a removed one is skipped).
    fn place_claim(&self, claim: &Claim, buf: &mut Vec<u8>) -> Result<(), Halt> {
        for hp in claim.host_pages() {
            let r = claim.block() as usize;
            let g = self.regions.hp(r, hp.first_page);
            buf.resize(self.regions.maps[r].page_size as usize, 0);
            // A snapshot that spares fetching a page already removed (marks are never
            // cleared, so the gate below then finds it removed too); the gate decides.
            if !self.gate.is_removed(g as usize) {
                if let Err(e) = self.fetch(r, hp.first_page, buf) {
                    self.fail(e);
                    return Err(Halt);
                }
            }
            loop {
                if self.halted() {
                    return Err(Halt);
                }
                let copied = self
                    .gate
                    .copy_unless_removed(g as usize, || self.copy_page(r, hp.first_page, buf));
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
                        return Err(Halt);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The VMM's side of a session: its socket, and its process where it can be watched.
pub struct Vmm<'a> {
    /// The connection the handshake came on.
    pub stream: &'a UnixStream,
    /// Which releases' handshake it sent (what the socket's end means).
    pub format: HandshakeFormat,
    /// A pidfd of the VMM's process (readable once it exits), where it is another process.
    pub process: Option<OwnedFd>,
}

/// Opens a pidfd of `pid` unless it is this process (whose exit ends everything anyway):
/// `Ok(None)` where there is nothing to watch or the kernel has no `pidfd_open`;
/// `Err(())` if the process has already exited.
fn watch(pid: Option<i32>) -> Result<Option<OwnedFd>, ()> {
    let Some(pid) = pid.filter(|&p| p as u32 != std::process::id()) else {
        return Ok(None);
    };
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return Ok(None);
    };
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::SRCH) => Err(()),
        Err(_) => Ok(None),
    }
}

/// Accepts the handshake on `stream` (a connection from the VMM), checks the descriptor,
/// and serves it until the session ends (module docs).
pub fn handle_connection(
    stream: &UnixStream,
    source: &dyn PageSource,
    opts: &HandlerOptions,
    control: &Control,
) -> Result<HandlerReport, HandlerError> {
    let hs = recv_handshake(stream, opts.handshake_timeout, source.size())?;
    let uffd = Userfault::from_received(hs.fd).map_err(HandlerError::Descriptor)?;
    let (process, gone) = match watch(hs.peer_pid) {
        Ok(p) => (p, false),
        Err(()) => (None, true),
    };
    let vmm = Vmm {
        stream,
        format: hs.format,
        process,
    };
    if gone {
        // The VMM exited between sending the handshake and now: nothing to serve.
        control.stop.store(true, Ordering::Relaxed); // Relaxed: read by this thread below
    }
    let mut r = serve(&vmm, hs.mappings, &uffd, source, opts, control);
    if let Ok(rep) = r.as_mut() {
        rep.peer_pid = hs.peer_pid;
        if gone {
            rep.ended_by = Some(EndReason::VmmExited);
        }
    }
    r
}

/// Serves faults on `uffd` for `maps` from `source` until the session ends (module docs).
pub fn serve(
    vmm: &Vmm<'_>,
    maps: Vec<GuestRegionUffdMapping>,
    uffd: &Userfault,
    source: &dyn PageSource,
    opts: &HandlerOptions,
    control: &Control,
) -> Result<HandlerReport, HandlerError> {
    let regions = Regions::new(maps)?;
    let recorded = recorded(&regions, opts)?;
    let sched = PageScheduler::new(regions.layout.clone(), opts.policy.scheduler())
        .map_err(HandlerError::Io)?;
    sched.bitmap().mark_all(); // nothing is loaded yet
    let shared = Shared::new(regions, sched, uffd, source);
    let prefetchers = opts.policy.prefetchers(opts.prefetchers);
    let mut report = HandlerReport {
        policy: Some(opts.policy),
        handshake: Some(vmm.format),
        watched_vmm_process: vmm.process.is_some(),
        prefetchers,
        host_pages: shared.regions.host_pages,
        bytes: shared.regions.maps.iter().map(|m| m.size).sum(),
        start_ns: now_ns(),
        record_pages: recorded.len() as u64,
        ..Default::default()
    };
    let result = std::thread::scope(|s| {
        let mut jobs = jobs(&shared.sched, opts.policy.scan(), prefetchers, recorded);
        let shared = &shared;
        for (i, job) in jobs.drain(..).enumerate().take(prefetchers) {
            std::thread::Builder::new()
                .name(format!("prefetch{i}"))
                .spawn_scoped(s, move || shared.prefetch(job))
                .map_err(HandlerError::Io)?;
        }
        let cpu = thread_cpu_ns();
        let r = event_loop(shared, vmm, control, &mut report);
        report.event_cpu_ns = thread_cpu_ns() - cpu;
        // Relaxed: a polled flag; the scope's join orders everything after it.
        shared.stop.store(true, Ordering::Relaxed);
        r
    });
    report.end_ns = now_ns();
    shared.tally(&mut report);
    // A prefetcher's failure fails the session, even where the event thread ended it.
    let failure = shared
        .failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let end = match (result, failure) {
        (Err(e), _) | (Ok(_), Some(e)) => return Err(e),
        (Ok(end), None) => end,
    };
    report.ended_by = Some(end);
    if opts.policy.writes_record() {
        write_record(&shared.regions, opts, &mut report)?;
    }
    Ok(report)
}

/// The record a policy reads or writes (`--record`), which it must name.
fn record_path(opts: &HandlerOptions) -> Result<&Path, HandlerError> {
    opts.record
        .as_deref()
        .ok_or(HandlerError::NoRecord(opts.policy))
}

/// The record's pages for a policy that follows one (none for the others); checks that a
/// policy that writes one names it.
fn recorded(regions: &Regions, opts: &HandlerOptions) -> Result<Vec<(usize, u64)>, HandlerError> {
    if opts.policy.follows_record() {
        let offsets = record::read(record_path(opts)?)?;
        Ok(regions.recorded_pages(&offsets)?)
    } else {
        if opts.policy.writes_record() {
            record_path(opts)?;
        }
        Ok(Vec::new())
    }
}

/// The prefetchers' jobs under `scan` (`prefetchers` of them at most are run).
fn jobs(
    sched: &PageScheduler,
    scan: Scan,
    prefetchers: usize,
    recorded: Vec<(usize, u64)>,
) -> Vec<Job<'_>> {
    match scan {
        Scan::None => Vec::new(),
        Scan::FromStart => vec![Job::Scan(sched.background_from(PageLocation::new(0, 0)))],
        Scan::Spaced => sched
            .background_scanners(prefetchers)
            .into_iter()
            .map(Job::Scan)
            .collect(),
        Scan::Record => vec![Job::Record(recorded, None)],
        Scan::RecordThenHint => {
            let mut scans = sched.background_scanners(prefetchers).into_iter();
            let first = Job::Record(recorded, scans.next());
            std::iter::once(first).chain(scans.map(Job::Scan)).collect()
        }
    }
}

/// Writes the record: each host page's first fault within `record_for` of the start, in
/// order, as file offsets.
fn write_record(
    regions: &Regions,
    opts: &HandlerOptions,
    report: &mut HandlerReport,
) -> Result<(), HandlerError> {
    let until = opts
        .record_for
        .map_or(u64::MAX, |d| report.start_ns + d.as_nanos() as u64);
    let mut seen = vec![false; regions.host_pages as usize];
    let offsets: Vec<u64> = report
        .fault_records
        .iter()
        .filter(|f| f.read_ns <= until && !std::mem::replace(&mut seen[f.hp as usize], true))
        .map(|f| regions.file_offset(f.hp))
        .collect();
    report.record_pages = offsets.len() as u64;
    record::write(record_path(opts)?, &offsets)?;
    Ok(())
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

/// The event thread: polls the userfaultfd, the VMM's socket and process until the session
/// ends (module docs), reading events, marking removed ranges, and placing what each fault
/// needs; a copy the kernel asks to retry waits for the next round.
fn event_loop(
    sh: &Shared<'_>,
    vmm: &Vmm<'_>,
    control: &Control,
    report: &mut HandlerReport,
) -> Result<EndReason, HandlerError> {
    let mut events = Vec::new();
    let mut retry: Vec<Pending> = Vec::new();
    let mut still: Vec<Pending> = Vec::new();
    let mut placer = Placer::new(sh);
    let mut clocks = SchedStat::open();
    // Nothing is known of when the faults of the first round were queued.
    let mut empty_since = 0;
    let mut socket_open = true;
    // The socket is only watched for its end (or stray bytes).
    vmm.stream.set_nonblocking(true).map_err(HandlerError::Io)?;
    loop {
        // Relaxed: polled flags.
        if control.stop.load(Ordering::Relaxed) {
            return Ok(EndReason::Stopped);
        }
        // Relaxed: a polled flag (nothing is read through it).
        if sh.gone.load(Ordering::Relaxed) {
            return Ok(EndReason::AddressSpaceGone);
        }
        // Acquire: pairs with `fail`'s Release (the error is in its slot).
        if sh.failed.load(Ordering::Acquire) {
            // The session's result takes the error from the slot.
            return Ok(EndReason::Stopped);
        }
        // Relaxed: a count compared with the total; the flag below carries the news.
        if sh.loaded.load(Ordering::Relaxed) == sh.regions.host_pages {
            // Release: see `Control::all_loaded`.
            control.all_loaded.store(true, Ordering::Release);
        }
        let before = clocks.sample();
        let ready = wait(sh, vmm, socket_open, !retry.is_empty())?;
        let after = clocks.sample();
        report.polls += 1;
        let (bound, slept) = queued_after(empty_since, before, after);
        if ready.vmm_exited {
            return Ok(EndReason::VmmExited);
        }
        if ready.socket && socket_closed(vmm.stream, report)? {
            if vmm.format.keeps_socket() {
                return Ok(EndReason::SocketClosed);
            }
            // v1.7–v1.11 close it after the handshake: stop watching it, serve on.
            socket_open = false;
            report.socket_closed_ns = Some(now_ns());
        }
        if ready.uffd || !retry.is_empty() {
            let t = now_ns();
            read_events(sh, &mut events, report)?;
            empty_since = t;
        }
        let now = now_ns();
        for e in events.drain(..) {
            match e {
                UffdEvent::Remove { .. } => {}
                UffdEvent::Other(k) => return Err(HandlerError::UnexpectedEvent(k)),
                UffdEvent::Fault(f) => {
                    report.bounded_by_sleep += u64::from(slept);
                    retry.extend(accept_fault(sh, f, bound, now, report)?);
                }
            }
        }
        // Place what the faults need (new ones, and those that had to wait).
        for p in retry.drain(..) {
            match placer.place(p, report) {
                Ok(again) => still.extend(again),
                Err(HandlerError::Place(PlaceError::Gone)) => {
                    return Ok(EndReason::AddressSpaceGone)
                }
                Err(e) => return Err(e),
            }
        }
        std::mem::swap(&mut retry, &mut still);
    }
}

/// What `poll(2)` found ready.
struct Ready {
    uffd: bool,
    socket: bool,
    vmm_exited: bool,
}

/// Waits (briefly when copies are to be retried) for the userfaultfd, the socket (while
/// open) or the VMM's exit. An error on the userfaultfd fails the session rather than wake
/// the loop again and again.
fn wait(
    sh: &Shared<'_>,
    vmm: &Vmm<'_>,
    socket_open: bool,
    retrying: bool,
) -> Result<Ready, HandlerError> {
    let mut fds = vec![PollFd::new(sh.uffd, PollFlags::IN)];
    if socket_open {
        fds.push(PollFd::new(vmm.stream, PollFlags::IN));
    }
    if let Some(p) = &vmm.process {
        fds.push(PollFd::new(p, PollFlags::IN));
    }
    let wait = if retrying { 100_000 } else { 50_000_000 };
    match poll(
        &mut fds,
        Some(&pagehint_migrate::sys::clock::timespec(wait)),
    ) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(HandlerError::Io(e.into())),
    }
    let bad = PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL;
    let u = fds[0].revents();
    if u.intersects(bad) {
        return Err(HandlerError::UffdPoll(format!("{u:?}")));
    }
    let socket = socket_open && !fds[1].revents().is_empty();
    let vmm_exited = vmm.process.is_some() && !fds[fds.len() - 1].revents().is_empty();
    Ok(Ready {
        uffd: !u.is_empty(),
        socket,
        vmm_exited,
    })
}

/// Whether the VMM closed the socket (or reset it); stray bytes are counted.
fn socket_closed(stream: &UnixStream, report: &mut HandlerReport) -> Result<bool, HandlerError> {
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

/// Records fault `f` (queued after `queued_after`, read at `now`) and claims its host page:
/// what to place for it, or nothing when a prefetcher owns the page (its copy wakes the
/// vCPU).
fn accept_fault(
    sh: &Shared<'_>,
    f: Fault,
    queued_after: u64,
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
        queued_after_ns: queued_after,
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
    use super::{queued_after, settle, Clocks, FaultRecord};

    /// A fault read after a sleep in `poll(2)` was queued no earlier than the wake-up minus
    /// the time the thread was awake since it went to sleep; after no sleep (or without
    /// schedstat), no earlier than the previous read.
    #[test]
    fn the_queueing_moment_is_bounded_by_a_sleep_or_the_previous_read() {
        let c = |t, cpu, run_delay| Clocks { t, cpu, run_delay };
        // 10 ms in poll, 30 µs of it running and 200 µs waiting for a CPU: slept.
        let before = c(1_000_000, 5_000, Some(100));
        let after = c(11_000_000, 35_000, Some(200_100));
        assert_eq!(
            queued_after(900_000, before, after),
            (11_000_000 - 230_000, true)
        );
        // The previous read was later than that: it still bounds.
        assert_eq!(queued_after(10_900_000, before, after), (10_900_000, true));
        // All of it awake (running or runnable): no sleep, the previous read bounds.
        let busy = c(11_000_000, 5_000 + 4_000_000, Some(100 + 5_990_000));
        assert_eq!(queued_after(900_000, before, busy), (900_000, false));
        // No schedstat: nothing is known of the sleep.
        let blind = c(11_000_000, 35_000, None);
        assert_eq!(queued_after(900_000, before, blind), (900_000, false));
    }

    #[test]
    fn a_fault_on_a_page_placed_by_another_thread_waits_until_that_copy() {
        let rec = |hp, read_ns, placed_ns| FaultRecord {
            tid: 7,
            hp,
            queued_after_ns: 0,
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
