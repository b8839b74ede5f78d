//! The migration destination: one run of one workload in one mode.
//!
//! Threads (all scoped to the run):
//! * the **background receiver** reads the main channel: precopy pages (copied in), then the
//!   switch-over (discard, register userfaultfd, hand the vCPU state over), then postcopy
//!   pages; each frame is held until its arrival time on the emulated link;
//! * the **urgent receiver** places the urgent channel's pages;
//! * the **fault thread** ([`faults`]) turns userfaultfd events into page requests;
//! * the **guest**: the KVM vCPUs, loaded with the source's state, or the thread guest;
//! * this thread sends `START`, waits for the switch-over, starts the guest, watches progress
//!   and stalls, and when every page is in, sends `DONE` (the transfer is over: the source
//!   answers with its summary and closes), lets the guest finish (the KVM guest verifies its
//!   share of RAM) and returns its [`Evidence`] (the harness verifies and measures it).
//!
//! **Postcopy recovery** ([`recovery`]): when the connections break after the switch-over
//! (closed, reset, both silent for the idle limit) and recovery is on, the guest stays as it
//! is (a vCPU or the thread guest blocked in a fault keeps waiting; the fault thread keeps
//! recording requests), the receivers of the broken connections are joined, and this thread
//! reconnects with backoff, sends the received bitmap, asks again for every page still
//! requested, and starts new receivers: postcopy goes on, as many times as it breaks.
//!
//! Any other failure (protocol error, the source's `ABORT`, placement error, stall, guest
//! crash, recovery that gave up) is recorded, raises the stop flag, shuts the sockets down,
//! unregisters the userfaultfd range (a vCPU blocked in a fault wakes up) and kicks the
//! vCPUs: the run ends with a typed [`RunError`], never a hang.

pub mod control;
mod drive;
pub mod faults;
pub mod memory;
mod receiver;
pub mod recovery;
pub mod thread_guest;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pagehint::UrgentRequest;

use crate::guest::kvm::vm::Tracking;
use crate::guest::kvm::{GuestCounters, Machine};
use crate::handshake::{self, ConnectError};
use crate::link::{RequestRoute, Transport};
use crate::options::{DestFault, FaultPath, GuestKind, MigrationMode, RunConfig, Workload};
use crate::sys::clock::{now_ns, tight_timer_slack};
use crate::sys::pin::Role;
use crate::wire::{
    write_parts, Channel, Guard, Hello, RequestBody, RpHeader, RpKind, Summary, SwitchOver,
    WireError,
};
use memory::{DestMemory, MemoryError};
use recovery::{Broken, Conn, Cut};
use thread_guest::{FaultLog, WorkloadReport};

/// Why a run failed.
#[derive(Debug)]
pub enum RunError {
    /// Local setup failed (memory, KVM, userfaultfd).
    Setup(String),
    /// The source refused the parameters.
    Refused(String),
    /// A connection failed.
    Wire(WireError),
    /// A page frame could not be applied.
    Memory(MemoryError),
    /// No page arrived for the idle limit although some are missing.
    Stalled {
        /// Host pages placed in postcopy.
        received: u64,
        /// Host pages missing at the switch-over.
        total: u64,
        /// The limit.
        idle: Duration,
    },
    /// The guest crashed, or a vCPU failed.
    Guest(String),
    /// The connections broke in postcopy and the session could not be resumed.
    Recovery {
        /// What broke the connections.
        cut: String,
        /// Why resuming failed.
        why: String,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(s) => write!(f, "setup failed: {s}"),
            Self::Refused(s) => write!(f, "the source refused the migration: {s}"),
            Self::Wire(e) => write!(f, "{e}"),
            Self::Memory(e) => write!(f, "{e}"),
            Self::Stalled {
                received,
                total,
                idle,
            } => write!(
                f,
                "migration stalled: {received} of {total} host pages after {idle:?} without progress"
            ),
            Self::Guest(s) => write!(f, "guest failed: {s}"),
            Self::Recovery { cut, why } => {
                write!(f, "{cut}; postcopy recovery failed: {why}")
            }
        }
    }
}

impl std::error::Error for RunError {}

impl From<WireError> for RunError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

impl From<MemoryError> for RunError {
    fn from(e: MemoryError) -> Self {
        Self::Memory(e)
    }
}

/// One run's shared state.
pub(crate) struct Dest<'a> {
    cfg: &'a RunConfig,
    mem: &'a DestMemory,
    machine: Option<&'a Machine>,
    /// The current connections (replaced on a resume); its lock also serialises return-path
    /// writes.
    conn: Mutex<Conn>,
    /// Stops the current connections' receivers (raised with `stop`, or on a break).
    conn_stop: AtomicBool,
    /// The current connections broke (recoverably): what broke them, and when.
    broken: Mutex<Option<Broken>>,
    /// Where to reconnect (the operator may point it elsewhere), and the hello to resume
    /// with.
    resume_to: Mutex<SocketAddr>,
    hello: Hello,
    /// Each break survived.
    cuts: Mutex<Vec<Cut>>,
    stop: AtomicBool,
    /// `DONE` was sent: the source may now close the channels.
    finished: AtomicBool,
    /// Source clock minus destination clock.
    offset_ns: i64,
    bg_progress: AtomicU64,
    /// When the urgent channel last brought a frame.
    urgent_progress: AtomicU64,
    /// Which channels carry pages and requests.
    transport: Transport,
    failure: Mutex<Option<RunError>>,
    requests_sent: AtomicU64,
    summary: Mutex<Option<Summary>>,
    /// The switch-over, once applied (the receiver signals `switch_ready`).
    switch: Mutex<Option<Applied>>,
    switch_ready: Condvar,
    /// Frames received (precopy + postcopy), for the idle check before the switch.
    frames: AtomicU64,
    /// The operator's control socket, if any.
    control: Option<&'a control::Control>,
}

impl Dest<'_> {
    fn guard(&self, keepalive: bool) -> Guard<'_> {
        Guard {
            stop: &self.stop,
            idle: self.cfg.idle_timeout,
            keepalive: keepalive.then_some(&self.bg_progress),
        }
    }

    fn stopped(&self) -> bool {
        // Relaxed: a polled flag.
        self.stop.load(Ordering::Relaxed)
    }

    /// Whether the current connections' receivers are to stop.
    fn conn_stopped(&self) -> bool {
        // Relaxed: a polled flag.
        self.conn_stop.load(Ordering::Relaxed)
    }

    fn fail(&self, e: RunError) {
        if matches!(e, RunError::Wire(WireError::Stopped)) {
            return;
        }
        // Relaxed: `finished` only decides whether a closed channel is an error.
        if self.finished.load(Ordering::Relaxed)
            && matches!(e, RunError::Wire(WireError::Closed(Channel::Urgent)))
        {
            return;
        }
        {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(e);
            }
        }
        self.abort();
    }

    fn abort(&self) {
        // Relaxed (both): polled flags; the shutdowns, the unregister and the kicks unblock.
        self.stop.store(true, Ordering::Relaxed);
        self.conn_stop.store(true, Ordering::Relaxed);
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
        self.mem.release_blocked_guest();
        if let Some(m) = self.machine {
            m.kick_all();
        }
    }

    fn send_rp(&self, kind: RpKind, body: &[u8]) -> Result<(), WireError> {
        self.send_rp_on(kind, body).map_err(|(e, _)| e)
    }

    /// Sends a return-path frame on the current connection; an error says which connection
    /// (by its number) failed.
    fn send_rp_on(&self, kind: RpKind, body: &[u8]) -> Result<(), (WireError, u16)> {
        let h = RpHeader {
            kind,
            len: body.len() as u32,
            sent_ns: now_ns(),
        };
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let stream = if kind == RpKind::Request && self.transport.requests == RequestRoute::Urgent {
            &c.urgent
        } else {
            &c.main
        };
        write_parts(
            stream,
            &[&h.encode(), body],
            &self.guard(false),
            Channel::ReturnPath,
        )
        .map_err(|e| (e, c.number))
    }

    /// The fault stream of a fault by thread `tid`: the faulting vCPU's index where the
    /// transport names streams (userfaultfd reports the thread; each vCPU thread records its
    /// id before it runs the guest), else 0 — and 0 for a thread that is no vCPU.
    fn stream_of(&self, tid: u32) -> u32 {
        match self.machine {
            Some(m) if self.transport.streams && tid != 0 => m
                .controls()
                .iter()
                .position(|c| c.tid() == tid)
                .map_or(0, |v| v as u32),
            _ => 0,
        }
    }

    /// Requests host page `hp` for fault stream `stream`. A connection that breaks
    /// meanwhile is recovered (the page is asked for again on the next one), not an error.
    fn request(&self, hp: u64, stream: u32) -> Result<(), WireError> {
        let (block, offset) = self.mem.host_page_location(hp);
        let req = UrgentRequest::new(block, offset, self.mem.host_page_size());
        // Relaxed: a counter read after the run.
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        match self.send_rp_on(RpKind::Request, &RequestBody::encode(stream, &req)) {
            Ok(()) => {
                self.mem.request_sent(hp, now_ns());
                Ok(())
            }
            Err((e, n)) if e.connection_lost() && self.recoverable() => {
                self.conn_failed(e.into(), n);
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    fn to_local(&self, source_ns: u64) -> u64 {
        (source_ns as i64).wrapping_sub(self.offset_ns) as u64
    }

    /// Sends `n` malformed or out-of-range requests of every kind (test hook).
    fn inject_bad(&self, n: u64) -> Result<(), WireError> {
        let block1 = self.cfg.layout().block_ranges()[1].1;
        let body = |req: UrgentRequest| RequestBody::encode(0, &req).to_vec();
        for i in 0..n {
            let good = body(UrgentRequest::new(0, 0, 4096));
            let at = 4; // the request frame, after the stream
            let body: Vec<u8> = match i % 9 {
                0 => {
                    let mut b = good;
                    b[at] ^= 0xff; // bad magic
                    b
                }
                1 => good[..RequestBody::LEN - 1].to_vec(), // short frame
                2 => {
                    let mut b = good;
                    b[at + 2] = 1; // unknown flags
                    b
                }
                3 => body(UrgentRequest::new(7, 0, 4096)), // no such block
                4 => body(UrgentRequest::new(1, block1, 4096)), // past the end
                5 => body(UrgentRequest::new(0, 4096, 0)), // empty
                6 => body(UrgentRequest::new(0, u64::MAX - 100, 4096)), // overflow
                7 => {
                    let mut b = good;
                    b[..4].copy_from_slice(&u32::MAX.to_le_bytes()); // no such stream
                    b
                }
                _ => good[..3].to_vec(), // too short to name a stream
            };
            self.send_rp(RpKind::Request, &body)?;
        }
        Ok(())
    }
}

/// What the guest side of a run produced.
#[derive(Debug)]
pub enum GuestOutcome {
    /// The KVM guest.
    Kvm {
        /// Each vCPU's counters at the destination.
        counters: Vec<GuestCounters>,
        /// Their operations when postcopy completed.
        ops_at_complete: u64,
        /// The vCPU threads' ids (userfaultfd reports them).
        tids: Vec<u32>,
        /// The guest's TSC frequency.
        tsc_khz: u32,
    },
    /// The thread guest.
    Thread {
        /// Its report.
        report: WorkloadReport,
        /// Its faults.
        log: FaultLog,
        /// Its thread id.
        tid: u32,
    },
}

/// The switch-over as the background receiver applied it.
#[derive(Clone, Debug)]
struct Applied {
    switch: SwitchOver,
    /// When applying it began (its frame due) and ended (destination clock).
    start_ns: u64,
    end_ns: u64,
}

/// Timestamps of one run (destination clock, ns).
#[derive(Clone, Copy, Debug, Default)]
pub struct Times {
    /// `START` sent.
    pub start: u64,
    /// The switch-over frame due (its arrival time on the link): applying it began.
    pub switch_due: u64,
    /// The switch-over applied (decode, discard, registration).
    pub switch_applied: u64,
    /// The guest resumed.
    pub resume: u64,
    /// Every missing page placed.
    pub complete: u64,
    /// The kernel's memory counters when the guest resumed and when every page was in
    /// (machine-wide; none where `/proc/vmstat` cannot be read).
    pub vmstat: [Option<crate::sys::vmstat::Vmstat>; 2],
}

/// What a finished run left, for verification and measurement (the harness's `verify` and
/// `result`): the destination's memory and records, and what the source sent.
#[derive(Debug)]
pub struct Evidence {
    /// Guest RAM as the run left it, with its placement and request records.
    pub mem: DestMemory,
    /// The source's summary.
    pub summary: Summary,
    /// The switch-over.
    pub switch: SwitchOver,
    /// What the guest reported.
    pub outcome: GuestOutcome,
    /// Every fault read from userfaultfd.
    pub events: Vec<faults::FaultEvent>,
    /// When things happened (destination clock).
    pub times: Times,
    /// Source clock minus destination clock, as applied.
    pub offset_ns: i64,
    /// The same, as the pings measured it.
    pub measured_offset_ns: i64,
    /// Both sides share `CLOCK_MONOTONIC`.
    pub same_clock: bool,
    /// Page requests sent.
    pub requests_sent: u64,
    /// Each break of the connections that postcopy recovery survived, in order.
    pub cuts: Vec<Cut>,
}

/// Migrates guest RAM from the source at `addr` in `mode` while the guest runs `workload`,
/// and returns what the run left. `progress(placed, pending)` is called a few times per
/// second in postcopy.
pub fn run(
    addr: SocketAddr,
    cfg: &RunConfig,
    mode: MigrationMode,
    workload: Workload,
    progress: &dyn Fn(u64, u64),
) -> Result<Evidence, RunError> {
    run_with(addr, cfg, mode, workload, progress, None)
}

/// [`run`], with an operator's `control` socket (a paused postcopy takes its commands).
pub fn run_with(
    addr: SocketAddr,
    cfg: &RunConfig,
    mode: MigrationMode,
    workload: Workload,
    progress: &dyn Fn(u64, u64),
    control: Option<&control::Control>,
) -> Result<Evidence, RunError> {
    if let Some(c) = control {
        c.doing(format!("setting up {workload} / {mode}"));
        c.progress(0, 0);
    }
    let mem = guest_memory(cfg)?;
    let machine = vm(cfg, &mem)?;
    let hello = Hello::new(cfg, mode, workload);
    let conn = handshake::connect(addr, &hello, cfg.idle_timeout).map_err(|e| match e {
        ConnectError::Wire(w) => RunError::Wire(w),
        ConnectError::Refused(r) => RunError::Refused(r),
    })?;
    let (same_clock, measured_offset_ns, offset_ns) =
        (conn.same_clock, conn.measured_offset_ns, conn.offset_ns());
    let mut d = Dest::new(cfg, &mem, machine.as_ref(), conn, addr, hello);
    d.control = control;
    let (events, times, outcome) = d.migrate(workload, progress);
    let left = d.left(outcome)?;
    drop(machine);
    Ok(Evidence {
        mem,
        summary: left.summary,
        switch: left.switch,
        outcome: left.outcome,
        events,
        times,
        offset_ns,
        measured_offset_ns,
        same_clock,
        requests_sent: left.requests_sent,
        cuts: left.cuts,
    })
}

/// The destination's guest RAM, with the fault path the guest needs (the KVM guest's
/// vCPUs fault in the kernel: only a userfaultfd that sees kernel faults will do).
fn guest_memory(cfg: &RunConfig) -> Result<DestMemory, RunError> {
    let kvm = cfg.guest.kind == GuestKind::Kvm;
    let path = if kvm { FaultPath::Auto } else { cfg.fault_path };
    let overwrite = cfg.hooks.dest_fault == DestFault::OverwriteDuplicate;
    let mem = DestMemory::new(cfg.layout(), path, overwrite)
        .map_err(|e| RunError::Setup(format!("mapping guest RAM: {e}")))?;
    if kvm {
        match mem.userfault() {
            None => {
                return Err(RunError::Setup(format!(
                    "the KVM guest needs userfaultfd: {}",
                    mem.fault_path()
                )))
            }
            Some(u) if !u.origin().sees_kernel_faults() => {
                return Err(RunError::Setup(
                    "the KVM guest needs userfaultfd for kernel faults (run as root, or allow /dev/userfaultfd)".into(),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(mem)
}

/// The destination VM over `mem` (the KVM guest), loaded at the switch-over.
fn vm(cfg: &RunConfig, mem: &DestMemory) -> Result<Option<Machine>, RunError> {
    if cfg.guest.kind != GuestKind::Kvm {
        return Ok(None);
    }
    // SAFETY: the caller keeps `mem` alive until the machine is dropped (`run` drops the
    // machine first).
    let (m, _) = unsafe {
        Machine::new(
            cfg.layout(),
            [mem.block_host(0), mem.block_host(1)],
            Tracking::Off,
        )
    }
    .map_err(|e| RunError::Setup(format!("destination VM: {e}")))?;
    Ok(Some(m))
}

/// What the run's shared state holds at its end, for the evidence.
struct Left {
    summary: Summary,
    switch: SwitchOver,
    outcome: GuestOutcome,
    requests_sent: u64,
    cuts: Vec<Cut>,
}

impl<'a> Dest<'a> {
    /// The shared state of a run whose session `conn` set up with `hello`, from `addr`.
    fn new(
        cfg: &'a RunConfig,
        mem: &'a DestMemory,
        machine: Option<&'a Machine>,
        conn: handshake::Connected,
        addr: SocketAddr,
        hello: Hello,
    ) -> Self {
        Self {
            cfg,
            mem,
            machine,
            offset_ns: conn.offset_ns(),
            conn: Mutex::new(Conn {
                main: Arc::new(conn.main),
                urgent: Arc::new(conn.urgent),
                number: 0,
                token: conn.token,
            }),
            conn_stop: AtomicBool::new(false),
            broken: Mutex::new(None),
            resume_to: Mutex::new(cfg.reconnect.unwrap_or(addr)),
            transport: hello.transport(),
            hello,
            cuts: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            bg_progress: AtomicU64::new(now_ns()),
            urgent_progress: AtomicU64::new(now_ns()),
            failure: Mutex::new(None),
            requests_sent: AtomicU64::new(0),
            summary: Mutex::new(None),
            switch: Mutex::new(None),
            switch_ready: Condvar::new(),
            frames: AtomicU64::new(0),
            control: None,
        }
    }

    /// The migration itself, every thread scoped to it: the receivers, the fault thread,
    /// and this thread driving the guest ([`drive`](Self::drive)). Returns the fault
    /// thread's events, the run's timestamps, and the guest's outcome.
    fn migrate(
        &self,
        workload: Workload,
        progress: &dyn Fn(u64, u64),
    ) -> (
        Vec<faults::FaultEvent>,
        Times,
        Result<GuestOutcome, RunError>,
    ) {
        let mut times = Times::default();
        let cfg = self.cfg;
        let (events, outcome) = std::thread::scope(|s| {
            let mut receivers = self.spawn_receivers(s);
            let fault_thread = s.spawn(|| {
                cfg.pin.apply_named(Role::FaultThread);
                tight_timer_slack();
                let req = |hp: u64, tid: u32| {
                    self.request(hp, self.stream_of(tid))
                        .map_err(|e| e.to_string())
                };
                faults::fault_loop(self.mem, &self.stop, &req).unwrap_or_else(|e| {
                    self.fail(RunError::Setup(e));
                    Vec::new()
                })
            });
            times.start = now_ns();
            if let Err(e) = self.send_rp(RpKind::Start, &[]) {
                self.fail(e.into());
            }
            let outcome = self.drive(s, workload, &mut times, progress, &mut receivers);
            // The background receiver ends with the summary (or a failure).
            if let Some(bg) = receivers.take_background() {
                let _ = bg.join();
            }
            // Relaxed: a polled flag; ends the urgent receiver and the fault thread.
            self.stop.store(true, Ordering::Relaxed);
            if let Some(m) = self.machine {
                m.kick_all();
            }
            (fault_thread.join().unwrap_or_default(), outcome)
        });
        (events, times, outcome)
    }

    /// What the run left, once every thread has been joined: the first failure if there
    /// was one, else the summary, the switch-over and the counters.
    fn left(self, outcome: Result<GuestOutcome, RunError>) -> Result<Left, RunError> {
        if let Some(e) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        let outcome = outcome?;
        let lost = || RunError::Wire(WireError::Closed(Channel::Background));
        let summary = take(&self.summary).ok_or_else(lost)?;
        let switch = take(&self.switch).ok_or_else(lost)?.switch;
        Ok(Left {
            summary,
            switch,
            outcome,
            // Relaxed: the counting threads have been joined.
            requests_sent: self.requests_sent.load(Ordering::Relaxed),
            cuts: std::mem::take(&mut *self.cuts.lock().unwrap_or_else(|p| p.into_inner())),
        })
    }
}

/// What `m` holds, taken out (a poisoned lock still gives it).
fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(|p| p.into_inner()).take()
}
