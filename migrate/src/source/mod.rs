//! The migration source: guest RAM and (KVM guest) the running VM, precopy, the switch-over,
//! and the `pagehint` scheduler behind two TCP channels in postcopy.
//!
//! A session (one migration), after the handshake ([`crate::handshake`]) and `START`:
//! 1. **precopy** ([`precopy`]): the vCPUs run the workload, the device model writes through
//!    vm-memory, and the precopy sender sends rounds of dirty pages on the main channel,
//!    taking KVM's dirty log (or harvesting its dirty rings) into the shared bitmap;
//! 2. **switch-over**: the vCPUs are kicked and their state saved, the device stops, the last
//!    dirty pages are synced, and the `SWITCH` frame carries the vCPU state and the host pages
//!    still to send (the destination discards those);
//! 3. **postcopy** ([`postcopy`]): a [`PageScheduler`](pagehint::PageScheduler) takes over the same bitmap; the
//!    background sender scans, the return-path thread serves requests (urgent channel in
//!    preempt modes, with the hint in preempt-hint);
//! 4. when the destination says `DONE`, the source sends its counters and the checksum of
//!    every page as it was at the switch-over.
//!
//! **Postcopy recovery**: if the connections break in postcopy (closed, reset, silent for
//! the idle limit, or cut by the test hook) and the destination asked for recovery, the
//! session is paused instead of ended: the senders stop, the scheduler stays, and the
//! source waits (up to the hello's recovery window) for the destination to come back with a
//! resume hello, its received bitmap and a new urgent connection
//! ([`handshake::accept_resume`]). The scheduler then rebuilds every block from that bitmap
//! ([`PageScheduler::recover_block`](pagehint::PageScheduler::recover_block): dirty = not
//! received; the broken connection's hint and queued requests are dropped), and postcopy
//! goes on in the same mode on the new connections, as many times as it takes.
//!
//! Any failure stops every thread and ends the session with a typed error; the reason goes
//! to the destination in an `ABORT` frame before the connections close (except the test
//! hook's drop, which cuts them as a crash would).

pub mod memory;
pub mod postcopy;
pub mod precopy;
pub mod send;
pub mod trace;

use std::net::{Shutdown, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pagehint::DirtyBitmap;

use crate::guest::image::Params;
use crate::guest::kvm::dirty::{DirtyRing, DirtyTracker};
use crate::guest::kvm::vcpu::VcpuEnd;
use crate::guest::kvm::vm::{Tracking, VcpuState};
use crate::guest::kvm::{boot, GuestCounters, Machine, RING_BYTES};
use crate::guest::layout::GuestLayout;
use crate::guest::STREAM_FRAME_PAGES;
use crate::handshake::{self, Accepted};
use crate::link::Link;
use crate::options::{DirtyTracking, GuestKind, MigrationMode, SourceFault};
use crate::sys::clock::{now_ns, tight_timer_slack};
use crate::sys::pin::{PinPlan, Role};
use crate::wire::{
    write_parts, Channel, FrameHeader, Guard, Hello, PendingBuilder, PendingSet, Summary,
    SwitchOver, WireError,
};
use memory::SourceMemory;
use send::{Hooks, Outbound, SendError, Sent};

/// How long a failing source waits, after its `ABORT` frame, for the destination to hang up.
const ABORT_LINGER: Duration = Duration::from_secs(1);

/// How many rejected requests are reported by message (all are counted).
const REJECTED_KEPT: usize = 8;

/// What one served session did.
#[derive(Debug)]
pub struct SessionReport {
    /// The mode the destination asked for.
    pub mode: MigrationMode,
    /// Guest RAM bytes.
    pub mem: u64,
    /// What the source sent.
    pub summary: Summary,
}

impl SessionReport {
    /// Times the session was resumed after its connections broke.
    pub fn recoveries(&self) -> usize {
        self.summary.recoveries.len()
    }
}

/// Everything a session needs before it answers the hello: guest RAM with the image, and
/// (KVM guest) the VM with its vCPUs booted. Field order: the VM goes before the memory.
struct Prepared {
    machine: Option<Machine>,
    rings: Vec<DirtyRing>,
    mem: SourceMemory,
}

/// The listening source; serves one destination session at a time.
#[derive(Debug)]
pub struct SourceServer {
    listener: TcpListener,
    pin: PinPlan,
    idle: Duration,
}

impl SourceServer {
    /// Listens on `addr`.
    pub fn bind(addr: impl ToSocketAddrs, pin: PinPlan, idle: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            pin,
            idle,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Refuses a guest whose memory does not fit in what this machine has available: its
    /// RAM, with the image built straight into it (normal memory for 4 KiB host pages;
    /// hugetlb pages, checked when mapped, for 2 MiB).
    fn check_memory(layout: &GuestLayout) -> Result<(), String> {
        if layout.host_page() != crate::guest::layout::HostPageSize::Small {
            return Ok(());
        }
        crate::sys::warm::check_fits(
            &format!(
                "a {} MiB guest (one copy of its RAM at the source)",
                layout.mem() >> 20
            ),
            layout.mem(),
            crate::sys::warm::mem_available(),
        )
    }

    fn prepare(&self, h: &Hello) -> Result<Prepared, String> {
        let layout = &h.guest.layout;
        Self::check_memory(layout)?;
        let pieces = boot::system_pieces(layout)?;
        let params = Params::new(layout, h.workload, h.guest.seed, STREAM_FRAME_PAGES);
        let mem = SourceMemory::new(layout, h.guest.seed, &pieces, &params)?;
        let (machine, rings) = match h.guest.kind {
            GuestKind::Thread => {
                if h.precopy.tracking != DirtyTracking::None {
                    return Err("the thread guest has no dirty tracking (use --guest kvm)".into());
                }
                (None, Vec::new())
            }
            GuestKind::Kvm => {
                let tracking = match h.precopy.tracking {
                    DirtyTracking::None => return Err("a KVM guest needs dirty tracking".into()),
                    DirtyTracking::Log => Tracking::Log,
                    DirtyTracking::Ring => Tracking::Ring(RING_BYTES),
                };
                // SAFETY: `mem` outlives the machine (`Prepared`'s field order drops the
                // machine first).
                let (m, rings) = unsafe { Machine::new(layout, mem.hosts(), tracking) }
                    .map_err(|e| format!("source VM: {e}"))?;
                m.boot(h.guest.seed)
                    .map_err(|e| format!("source VM: {e}"))?;
                m.set_stream_rate(h.guest.stream_rate, STREAM_FRAME_PAGES);
                (Some(m), rings)
            }
        };
        Ok(Prepared {
            machine,
            rings,
            mem,
        })
    }

    /// Serves sessions until `stop` is raised or `sessions` migrations have been served (a
    /// session counts once its handshake is done, whether it then succeeds or fails; a
    /// connection that never completes one does not count), reporting each with `log`.
    pub fn serve(
        &self,
        stop: &AtomicBool,
        sessions: Option<u64>,
        mut log: impl FnMut(Result<SessionReport, SourceError>),
    ) {
        let mut served = 0;
        while sessions.is_none_or(|n| served < n) {
            match self.session(stop) {
                Err((_, SourceError::Wire(WireError::Stopped))) => return,
                Err((accepted, e)) => {
                    served += u64::from(accepted);
                    log(Err(e));
                }
                Ok(r) => {
                    served += 1;
                    log(Ok(r));
                }
            }
        }
    }

    /// Accepts and serves one session; an error says whether the handshake had completed.
    fn session(&self, stop: &AtomicBool) -> Result<SessionReport, (bool, SourceError)> {
        let (acc, prepared) =
            handshake::accept(&self.listener, stop, self.idle, |h| self.prepare(h))
                .map_err(|e| (false, e.into()))?;
        self.run_session(stop, acc, prepared).map_err(|e| (true, e))
    }

    fn run_session(
        &self,
        stop: &AtomicBool,
        acc: Accepted,
        prepared: Prepared,
    ) -> Result<SessionReport, SourceError> {
        let Accepted {
            hello,
            main,
            urgent,
            same_clock,
            token,
        } = acc;
        let Prepared {
            machine,
            rings,
            mem,
        } = prepared;
        crate::link::configure_background(&main, &hello.link, &hello.transport())
            .map_err(|e| SourceError::Wire(WireError::Io(Channel::Background, e)))?;
        let mut session = Session {
            listener: &self.listener,
            token,
            recoveries: Vec::new(),
            hello: &hello,
            mem: &mem,
            machine: machine.as_ref(),
            out: Outbound {
                mem: &mem,
                link: Link::new(hello.link.for_transport(&hello.transport())),
                main,
                urgent,
                sent: Sent::default(),
                hooks: Hooks {
                    corrupt_pending: AtomicBool::new(hello.hooks.fault == SourceFault::CorruptPage),
                    drop_after: hello.hooks.drop_after,
                    cut_after: hello.hooks.cut_after,
                    cuts_left: hello.hooks.cuts,
                    cut_base: 0,
                    cut_fired: AtomicBool::new(false),
                },
                torn_main: AtomicBool::new(false),
            },
            same_clock,
            pin: self.pin,
            idle: self.idle,
            outer_stop: stop,
            stop: AtomicBool::new(false),
            bg_progress: AtomicU64::new(now_ns()),
            rejected: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            trace: trace::Trace::new(
                hello.guest.layout.mem() / hello.guest.layout.host_page().bytes(),
            ),
        };
        let summary = session.run(rings)?;
        drop(machine);
        Ok(SessionReport {
            mode: hello.mode,
            mem: hello.guest.layout.mem(),
            summary,
        })
    }
}

/// Why a source session failed.
#[derive(Debug)]
pub enum SourceError {
    /// A connection failed, the peer broke the protocol, the session was stopped, or (test
    /// hooks) the source dropped or cut its connections on purpose.
    Wire(WireError),
    /// The guest failed at the source: its VM, a vCPU, dirty tracking.
    Guest(String),
    /// Guest memory could not be read or written at the source.
    Memory(String),
    /// The scheduler could not be built for the guest's RAM.
    Scheduler(String),
}

impl SourceError {
    /// Whether the connections themselves failed, so that postcopy recovery may resume the
    /// session ([`WireError::connection_lost`]).
    pub fn connection_lost(&self) -> bool {
        matches!(self, Self::Wire(w) if w.connection_lost())
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Wire(e) => write!(f, "{e}"),
            Self::Guest(s) => write!(f, "the guest failed at the source: {s}"),
            Self::Memory(s) => write!(f, "guest memory at the source: {s}"),
            Self::Scheduler(s) => write!(f, "the scheduler: {s}"),
        }
    }
}

impl std::error::Error for SourceError {}

impl From<WireError> for SourceError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

impl From<SendError> for SourceError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Wire(w) => Self::Wire(w),
            SendError::Memory(m) => Self::Memory(m),
            // Test hook: drop both connections as a crashed source would.
            SendError::Dropped(n) => Self::Wire(WireError::Dropped(n)),
            // Test hook: cut both connections as a broken network would.
            SendError::Cut(n) => Self::Wire(WireError::Cut(n)),
        }
    }
}

/// One migration at the source.
pub(crate) struct Session<'a> {
    /// Where a destination resumes a paused session.
    listener: &'a TcpListener,
    /// The session token.
    token: u64,
    /// Target pages left to send after each recovery.
    recoveries: Vec<u64>,
    hello: &'a Hello,
    mem: &'a SourceMemory,
    machine: Option<&'a Machine>,
    out: Outbound<'a>,
    same_clock: bool,
    pin: PinPlan,
    idle: Duration,
    outer_stop: &'a AtomicBool,
    stop: AtomicBool,
    /// When the background sender last wrote (keeps the return path's idle timer quiet).
    bg_progress: AtomicU64,
    rejected: Mutex<Vec<String>>,
    failure: Mutex<Option<SourceError>>,
    /// Postcopy timings of every request and background page.
    trace: trace::Trace,
}

impl Session<'_> {
    fn guard(&self, keepalive: bool) -> Guard<'_> {
        Guard {
            stop: &self.stop,
            idle: self.idle,
            keepalive: keepalive.then_some(&self.bg_progress),
        }
    }

    fn stopped(&self) -> bool {
        // Relaxed: a polled flag.
        self.stop.load(Ordering::Relaxed)
    }

    /// Records the first failure and stops everything. Every thread polls the flag (its I/O
    /// waits at most [`crate::wire::POLL_SLICE`]); the connections stay up so that the
    /// session's end can tell the destination why ([`Self::tell_peer`]), except for the
    /// test hook's drop, which cuts them at once as a crash would.
    fn fail(&self, e: impl Into<SourceError>) {
        let e = e.into();
        let dropped = matches!(
            e,
            SourceError::Wire(WireError::Dropped(_) | WireError::Cut(_))
        );
        {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() && !matches!(e, SourceError::Wire(WireError::Stopped)) {
                *f = Some(e);
            }
        }
        // Relaxed: the flag is polled; the joins after it are what the session waits on.
        self.stop.store(true, Ordering::Relaxed);
        if dropped {
            let _ = self.out.main.shutdown(Shutdown::Both);
            let _ = self.out.urgent.shutdown(Shutdown::Both);
        }
        if let Some(m) = self.machine {
            m.kick_all();
        }
    }

    /// At the end of a failed session (every sending thread joined): sends the reason in an
    /// `ABORT` frame on the main connection, where the last frame went out whole and the
    /// destination may still be listening, waits briefly for the destination to hang up (so
    /// that it reads the reason before it sees the urgent connection close), and closes both
    /// connections.
    fn tell_peer(&self, e: &SourceError) {
        // Relaxed: written by the sending threads, which have been joined.
        let whole = !self.out.torn_main.load(Ordering::Relaxed);
        let worth = !matches!(
            e,
            SourceError::Wire(
                WireError::Dropped(_)
                    | WireError::Cut(_)
                    | WireError::PeerAbort(..)
                    | WireError::Closed(_)
                    | WireError::Io(..)
            )
        );
        if whole && worth {
            let msg = match e {
                SourceError::Wire(WireError::Stopped) => "the source is shutting down".to_string(),
                e => e.to_string(),
            };
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            let h = FrameHeader::abort(msg.len());
            let quiet = AtomicBool::new(false);
            let g = Guard {
                stop: &quiet,
                idle: self.idle.min(ABORT_LINGER),
                keepalive: None,
            };
            if write_parts(&self.out.main, &[&h.encode(), msg], &g, Channel::Background).is_ok() {
                let _ = self.out.main.shutdown(Shutdown::Write);
                // Discard whatever the destination still sends until it closes.
                let end = now_ns() + ABORT_LINGER.as_nanos() as u64;
                let mut sink = [0u8; 4096];
                while now_ns() < end {
                    match std::io::Read::read(&mut &self.out.main, &mut sink) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            }
        }
        let _ = self.out.main.shutdown(Shutdown::Both);
        let _ = self.out.urgent.shutdown(Shutdown::Both);
    }

    fn layout(&self) -> &GuestLayout {
        self.mem.layout()
    }

    fn bitmap(&self) -> &DirtyBitmap {
        self.mem.bitmap()
    }

    /// Runs the session; a failure is told to the destination before the connections close.
    fn run(&mut self, rings: Vec<DirtyRing>) -> Result<Summary, SourceError> {
        // Before `START` only pongs go out; a failure there is a silent or closed connection,
        // or a frame out of place, and the pongs are whole unless a write failed.
        if let Err(e) = handshake::answer_pings_until_start(&self.out.main, &self.guard(false)) {
            let e = SourceError::Wire(e);
            if matches!(e, SourceError::Wire(WireError::Malformed(..))) {
                self.tell_peer(&e);
            }
            return Err(e);
        }
        let r = self.transfer(rings);
        if let Err(e) = &r {
            self.tell_peer(e);
        }
        r
    }

    fn transfer(&mut self, rings: Vec<DirtyRing>) -> Result<Summary, SourceError> {
        // Relaxed: a coarse timestamp for idle checks.
        self.bg_progress.store(now_ns(), Ordering::Relaxed);
        // Migration starts: every page is still to send.
        self.bitmap().mark_all();
        let mut switch = match self.precopy(rings) {
            Ok(s) => s,
            Err(e) => {
                self.fail(e);
                return Err(self.take_failure());
            }
        };
        self.out.sent.end_precopy();
        switch.built_ns = now_ns();
        let body = switch.encode();
        let h = FrameHeader::switch(body.len());
        if let Err(e) = self
            .out
            .frame(h, &body, Channel::Background, &self.guard(false))
        {
            self.fail(e);
            return Err(self.take_failure());
        }
        let stats = self.postcopy()?;
        let checksums = self.mem.checksums();
        let generations = match self.machine {
            Some(_) => self.mem.generations().map_err(SourceError::Memory)?,
            None => Vec::new(),
        };
        // Relaxed loads: the counting threads have been joined.
        let s = &self.out.sent;
        let summary = Summary {
            stats,
            bg_host_pages: s.bg_host_pages.load(Ordering::Relaxed),
            urgent_host_pages: s.urgent_host_pages.load(Ordering::Relaxed),
            zero_host_pages: s.zero_host_pages.load(Ordering::Relaxed),
            resent_host_pages: s.resent_host_pages.load(Ordering::Relaxed),
            resent_bytes: s.resent_bytes.load(Ordering::Relaxed),
            postcopy_bytes: s.postcopy_bytes.load(Ordering::Relaxed),
            rejected: self
                .rejected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            checksums,
            generations,
            recoveries: self.recoveries.clone(),
            requests: self.trace.finish(),
        };
        let body = summary.encode();
        let h = FrameHeader::summary(body.len());
        self.out
            .frame(h, &body, Channel::Background, &self.guard(false))?;
        let _ = self.out.main.shutdown(Shutdown::Write);
        let _ = self.out.urgent.shutdown(Shutdown::Both);
        Ok(summary)
    }

    fn take_failure(&self) -> SourceError {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(SourceError::Wire(WireError::Stopped))
    }

    /// Runs the guest through precopy and stops it; returns the switch-over.
    fn precopy(&self, rings: Vec<DirtyRing>) -> Result<SwitchOver, SourceError> {
        let tracker = match self.machine {
            Some(m) => Some(
                DirtyTracker::new(m.vm(), self.layout(), self.bitmap(), rings)
                    .map_err(SourceError::Guest)?,
            ),
            None => None,
        };
        let ring_full = |i: u32| {
            tracker
                .as_ref()
                .map_or(Ok(0), |t| t.harvest_ring(i, true))
                .map(|_| ())
        };
        let ring_full: &(dyn Fn(u32) -> Result<(), String> + Sync) = &ring_full;
        let rings_on = self.hello.precopy.tracking == DirtyTracking::Ring;
        let housekeeping_stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let keeping =
                Housekeeping::start(self, s, &housekeeping_stop, tracker.as_ref(), rings_on);
            let vcpus = self
                .machine
                .map(|m| m.run(s, self.pin, rings_on.then_some(ring_full)));
            let t_run = now_ns();
            self.pin.apply(Role::BackgroundSender);
            tight_timer_slack();
            let result = self.precopy_rounds(t_run, tracker.as_ref());
            // Stop the guest wherever it is, then everything else that marks pages.
            let stop_ns = now_ns();
            let (states, vcpu_failed) = self.stop_guest(vcpus);
            // Relaxed: a polled flag; the wake-up and the joins below wait for the threads.
            housekeeping_stop.store(true, Ordering::Relaxed);
            let (device, harvest) = keeping.join();
            let stopped_ns = now_ns();
            let report = result?;
            if let Some(f) = vcpu_failed {
                return Err(SourceError::Guest(f));
            }
            device.map_err(SourceError::Memory)?;
            harvest.map_err(SourceError::Guest)?;
            if let Some(t) = &tracker {
                // Everything quiet now, the count is exact: when every page is still to send
                // (pure postcopy), nothing the log holds can add to it, and the sync, which
                // costs a walk of KVM's log per GiB, is skipped.
                if self.bitmap().dirty_count() < self.layout().pages() {
                    t.sync().map_err(SourceError::Guest)?;
                }
                if t.rejected() > 0 {
                    let refused = format!("{} dirty-ring entries were refused", t.rejected());
                    return Err(SourceError::Guest(refused));
                }
            }
            self.switch_over([stop_ns, stopped_ns], t_run, states, report)
        })
    }

    /// Waits for the guest to boot (its first `out` says so), then runs the precopy rounds.
    fn precopy_rounds(
        &self,
        t_run: u64,
        tracker: Option<&DirtyTracker<'_>>,
    ) -> Result<precopy::PrecopyReport, SourceError> {
        if let Some(m) = self.machine {
            while !m.all_started() {
                if now_ns() - t_run > self.idle.as_nanos() as u64 {
                    return Err(SourceError::Guest("it did not start".into()));
                }
                if self.stopped() {
                    return Err(WireError::Stopped.into());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let rounds = self.hello.precopy.rounds;
        Ok(precopy::run(
            &self.out,
            self.bitmap(),
            tracker,
            rounds,
            &self.guard(false),
        )?)
    }

    /// Kicks the vCPUs out of the guest and collects their state; the second value says
    /// why one could not be stopped (it finished, failed or panicked).
    fn stop_guest(
        &self,
        vcpus: Option<Vec<std::thread::ScopedJoinHandle<'_, VcpuEnd>>>,
    ) -> (Vec<VcpuState>, Option<String>) {
        let mut states: Vec<VcpuState> = Vec::new();
        let mut failed = None;
        if let (Some(m), Some(handles)) = (self.machine, vcpus) {
            m.kick_all();
            for (i, h) in handles.into_iter().enumerate() {
                match h.join() {
                    Ok(VcpuEnd::Stopped(st)) => states.push(*st),
                    Ok(VcpuEnd::Done) => failed = Some(format!("vCPU {i} finished at the source")),
                    Ok(VcpuEnd::Failed(e)) => failed = Some(e),
                    Err(_) => failed = Some(format!("vCPU {i} thread panicked")),
                }
            }
        }
        (states, failed)
    }

    /// The switch-over of a guest asked to stop at `stop_ns` and stopped (with everything
    /// else that marks pages) at `stopped_ns` (it ran from `t_run`) in `states`, after the
    /// precopy `report`.
    fn switch_over(
        &self,
        [stop_ns, stopped_ns]: [u64; 2],
        t_run: u64,
        states: Vec<VcpuState>,
        report: precopy::PrecopyReport,
    ) -> Result<SwitchOver, SourceError> {
        let synced_ns = now_ns();
        let guest = self.machine.map(|m| m.counters()).unwrap_or_default();
        Ok(SwitchOver {
            stop_ns,
            stopped_ns,
            synced_ns,
            // Stamped when the frame is encoded.
            built_ns: 0,
            rounds: report.rounds,
            // Relaxed (both): the precopy sender is this thread.
            precopy_pages: self.out.sent.precopy_pages.load(Ordering::Relaxed),
            precopy_bytes: self.out.sent.precopy_bytes.load(Ordering::Relaxed),
            source_run_ns: stop_ns - t_run,
            vcpus: states,
            pending: self.pending()?,
            guest: sum_counters(&guest),
            dirty_per_round: report.dirty_per_round,
        })
    }

    /// Per block, the host pages with a dirty target page (the vCPUs are stopped, so the
    /// bitmap is still): read a chunk of words at a time into the runs the frame carries,
    /// never page by page, and with no copy of the bitmap; one run per block where every
    /// page or none is dirty (the exact count says so).
    fn pending(&self) -> Result<Vec<PendingSet>, SourceError> {
        let bitmap = self.bitmap();
        let dirty = bitmap.dirty_count();
        let uniform = (dirty == 0 || dirty == self.layout().pages()).then_some(dirty != 0);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for (b, block) in self.layout().ram().blocks().iter().enumerate() {
            let bad = |e: String| SourceError::Memory(format!("the pending set: {e}"));
            if let Some(all) = uniform {
                let hp = block.host_pages();
                let mut set = PendingBuilder::new(hp);
                set.push_fill(all, hp / 64);
                if hp % 64 != 0 {
                    set.push(if all { (1 << (hp % 64)) - 1 } else { 0 });
                }
                out.push(
                    set.finish()
                        .ok_or_else(|| bad("does not fit the block".into()))?,
                );
                continue;
            }
            let shift = block.host_page_shift();
            // Target-page words per word of host-page bits.
            let per = 1usize << shift;
            buf.resize(per.max(PENDING_CHUNK), 0);
            let chunk = buf.len() / per * per;
            let nwords = bitmap
                .block_words(b as u32)
                .map_err(|e| bad(e.to_string()))?;
            let mut set = PendingBuilder::new(block.host_pages());
            let mut hp = 0;
            let mut w = 0;
            while w < nwords {
                let n = chunk.min(nwords - w);
                bitmap
                    .dirty_words(b as u32, w, &mut buf[..n])
                    .map_err(|e| bad(e.to_string()))?;
                for words in buf[..n].chunks(per) {
                    let pages = (block.host_pages() - hp).min(64);
                    set.push(host_page_word(words, shift, pages));
                    hp += pages;
                }
                w += n;
            }
            out.push(
                set.finish()
                    .ok_or_else(|| bad("does not fit the block".into()))?,
            );
        }
        Ok(out)
    }
}

/// Bitmap words read at a time for the pending set.
const PENDING_CHUNK: usize = 512;

/// The word of host-page bits of `pages` (≤ 64) host pages of `2^shift` target pages each,
/// from their target pages' bits `dirty`: bit `i` set when any target page of host page `i`
/// is dirty.
fn host_page_word(dirty: &[u64], shift: u32, pages: u64) -> u64 {
    if shift == 0 {
        return dirty.first().copied().unwrap_or(0);
    }
    let n = 1u64 << shift;
    let mut out = 0;
    for i in 0..pages {
        let first = i << shift;
        let any = if n >= 64 {
            dirty
                .get((first / 64) as usize..((first + n) / 64) as usize)
                .is_some_and(|ws| ws.iter().any(|&w| w != 0))
        } else {
            dirty
                .get((first / 64) as usize)
                .is_some_and(|&w| (w >> (first % 64)) & ((1 << n) - 1) != 0)
        };
        out |= u64::from(any) << i;
    }
    out
}

/// The source's guest counters summed over vCPUs, in the switch-over's order.
fn sum_counters(c: &[GuestCounters]) -> [u64; 10] {
    let mut out = [0u64; 10];
    for g in c {
        out[0] += g.ops;
        out[1] += g.writes;
        out[2] += g.errors;
        out[8] += g.frames;
        out[9] = out[9].max(g.longest_pause_tsc);
    }
    if let Some((k, page, w1, w2, gen)) = c.iter().find_map(|g| g.first_error) {
        out[3..8].copy_from_slice(&[k as u64, page, w1, w2, gen]);
    }
    out
}

/// The threads that run beside the guest in precopy: the device model writing guest memory
/// through vm-memory, and (with dirty rings) the harvester.
struct Housekeeping<'s> {
    device: std::thread::ScopedJoinHandle<'s, Result<(), String>>,
    harvester: Option<std::thread::ScopedJoinHandle<'s, Result<(), String>>>,
}

impl<'s> Housekeeping<'s> {
    /// Starts them; they run until `stop`.
    fn start<'e: 's>(
        session: &'s Session<'_>,
        s: &'s std::thread::Scope<'s, 'e>,
        stop: &'s AtomicBool,
        tracker: Option<&'s DirtyTracker<'_>>,
        rings_on: bool,
    ) -> Self {
        let device = s.spawn(move || {
            session.pin.apply(Role::Housekeeping);
            let mut n = 0u64;
            // Relaxed: a polled flag.
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                session.mem.device_write(n)?;
                // Parked, not slept: `join` wakes it at once (the wait is downtime).
                std::thread::park_timeout(Duration::from_millis(1));
            }
            Ok(())
        });
        let harvester = rings_on.then(|| {
            s.spawn(move || {
                session.pin.apply(Role::Housekeeping);
                // Relaxed: a polled flag.
                while !stop.load(Ordering::Relaxed) {
                    if let Some(t) = tracker {
                        t.sync()?;
                    }
                    std::thread::park_timeout(Duration::from_millis(2));
                }
                Ok::<(), String>(())
            })
        });
        Self { device, harvester }
    }

    /// Wakes them (their stop flag is raised) and joins them: the device thread's result,
    /// and the harvester's.
    fn join(self) -> (Result<(), String>, Result<(), String>) {
        self.device.thread().unpark();
        if let Some(h) = &self.harvester {
            h.thread().unpark();
        }
        let device = self
            .device
            .join()
            .unwrap_or_else(|_| Err("device thread panicked".into()));
        let harvest = self.harvester.map_or(Ok(()), |h| {
            h.join()
                .unwrap_or_else(|_| Err("harvester panicked".into()))
        });
        (device, harvest)
    }
}

#[cfg(test)]
mod tests {
    use super::host_page_word;

    #[test]
    fn a_host_page_is_pending_when_any_of_its_target_pages_is_dirty() {
        // 4 KiB host pages: the word itself.
        assert_eq!(host_page_word(&[0b1010], 0, 64), 0b1010);
        // 16 KiB host pages (4 target pages, 16 per word): pages 5 and 127 of the 4 words
        // → host pages 1 and 31.
        assert_eq!(
            host_page_word(&[1 << 5, 1 << 63, 0, 0], 2, 64),
            (1 << 1) | (1 << 31)
        );
        // 2 MiB host pages (8 words each): one bit in word 9 → host page 1 only.
        let mut dirty = vec![0u64; 24];
        dirty[9] = 1 << 40;
        assert_eq!(host_page_word(&dirty, 9, 3), 0b010);
        assert_eq!(host_page_word(&[0; 24], 9, 3), 0);
    }
}
