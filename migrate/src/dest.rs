//! The migration destination: one run of one workload in one mode.
//!
//! Threads (all scoped to the run):
//! * the **guest** runs the workload over guest memory ([`crate::workload`]);
//! * the **fault thread** (userfaultfd path) reads fault events, maps each address to its
//!   host page, skips pages already received or requested, and sends a page request on the
//!   return path;
//! * one **receiver** per channel reads page frames, holds each until its arrival time on the
//!   emulated link, and places it ([`GuestMemory::place`]: `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`);
//! * this thread sends `START`, updates the progress bar, watches for stalls, sends `DONE`
//!   when the guest has finished and every page is in, and then verifies every page against
//!   the source's checksums.
//!
//! Any failure (dropped connection, protocol error, placement error, stall) is recorded,
//! raises the stop flag, shuts the sockets down and unregisters the userfaultfd range so a
//! guest blocked in a fault wakes up: the run ends with a typed [`RunError`], never a hang.

use std::collections::VecDeque;
use std::fmt;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use pagehint::UrgentRequest;

use crate::clock::{boot_id, now_ns, tight_timer_slack};
use crate::config::{MigrationMode, RunConfig, Workload};
use crate::guest::{FaultLog, Guest, GuestMemory};
use crate::image::{page_checksum, GuestPlan, TARGET_PAGE};
use crate::pin::Role;
use crate::report::{percentile_ns, RunResult};
use crate::uffd::PlaceError;
use crate::wire::{
    configure, read_full, wait_readable, write_parts, Channel, FrameHeader, FrameKind, Guard,
    Hello, HelloReply, RpHeader, RpKind, Summary, WireError, POLL_SLICE,
};
use crate::workload::{self, WorkloadReport};

/// Frames due this soon are placed at once rather than slept for.
const EARLY_NS: u64 = 5_000;

/// Why a run failed.
#[derive(Debug)]
pub enum RunError {
    /// Local setup failed (memory, sizes).
    Setup(String),
    /// The source refused the parameters.
    Refused(String),
    /// A connection failed.
    Wire(WireError),
    /// A page could not be placed.
    Place(PlaceError),
    /// No page arrived for the idle limit although some are missing.
    Stalled {
        /// Pages received.
        received: u64,
        /// Pages in all.
        total: u64,
        /// The limit.
        idle: Duration,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(s) => write!(f, "setup failed: {s}"),
            Self::Refused(s) => write!(f, "the source refused the migration: {s}"),
            Self::Wire(e) => write!(f, "{e}"),
            Self::Place(e) => write!(f, "{e}"),
            Self::Stalled {
                received,
                total,
                idle,
            } => write!(
                f,
                "migration stalled: {received} of {total} host pages after {idle:?} without progress"
            ),
        }
    }
}

impl std::error::Error for RunError {}

impl From<WireError> for RunError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

struct Dest<'a> {
    cfg: &'a RunConfig,
    mem: GuestMemory,
    main: TcpStream,
    urgent: TcpStream,
    rp_lock: Mutex<()>,
    stop: AtomicBool,
    /// `DONE` was sent: the source may now close the channels.
    finished: AtomicBool,
    /// Source clock minus destination clock.
    offset_ns: i64,
    bg_progress: AtomicU64,
    failure: Mutex<Option<RunError>>,
    uffd_faults: AtomicU64,
    requests_sent: AtomicU64,
    summary: Mutex<Option<Summary>>,
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
        // Relaxed: a polled flag; the shutdowns and the unregister unblock the threads.
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.main.shutdown(Shutdown::Both);
        let _ = self.urgent.shutdown(Shutdown::Both);
        self.mem.release_blocked_guest();
    }

    fn send_rp(&self, kind: RpKind, body: &[u8]) -> Result<(), WireError> {
        let h = RpHeader {
            kind,
            len: body.len() as u32,
            sent_ns: now_ns(),
        };
        let _l = self.rp_lock.lock().unwrap_or_else(|p| p.into_inner());
        write_parts(
            &self.main,
            &[&h.encode(), body],
            &self.guard(false),
            Channel::ReturnPath,
        )
    }

    fn request(&self, hp: u64) -> Result<(), WireError> {
        let size = self.mem.host_page_size();
        let req = UrgentRequest::new(0, hp * size, size);
        // Relaxed: a counter read after the run.
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        self.send_rp(RpKind::Request, &req.encode())
    }

    fn to_local(&self, source_ns: u64) -> u64 {
        (source_ns as i64).wrapping_sub(self.offset_ns) as u64
    }

    fn receiver(&self, stream: &TcpStream, chan: Channel) -> Result<(), RunError> {
        let g = self.guard(true);
        let mut queue: VecDeque<(FrameHeader, Vec<u8>, u64)> = VecDeque::new();
        let mut pool: Vec<Vec<u8>> = Vec::new();
        let mut last = now_ns();
        loop {
            let now = now_ns();
            while queue.front().is_some_and(|f| f.2 <= now + EARLY_NS) {
                let (h, buf, _) = queue.pop_front().expect("front exists");
                self.deliver(&h, &buf)?;
                pool.push(buf);
            }
            if self.stopped() {
                return Err(WireError::Stopped.into());
            }
            let timeout = queue
                .front()
                .map_or(POLL_SLICE.as_nanos() as u64, |f| f.2.saturating_sub(now));
            let ready = wait_readable(stream, timeout).map_err(|e| WireError::Io(chan, e))?;
            if !ready {
                if queue.is_empty() {
                    g.check(last, chan)?;
                }
                continue;
            }
            let mut hb = [0u8; FrameHeader::LEN];
            read_full(stream, &mut hb, &g, chan)?;
            let h = FrameHeader::decode(&hb, chan)?;
            let mut buf = pool.pop().unwrap_or_default();
            buf.resize(h.payload_len() as usize, 0);
            read_full(stream, &mut buf, &g, chan)?;
            last = now_ns();
            if chan == Channel::Background {
                // Relaxed: a coarse timestamp.
                self.bg_progress.store(last, Ordering::Relaxed);
            }
            match h.kind {
                FrameKind::Pages | FrameKind::Zero => {
                    let due = self.to_local(h.arrival_ns);
                    queue.push_back((h, buf, due));
                }
                FrameKind::Summary => {
                    for (h, buf, _) in queue.drain(..) {
                        self.deliver(&h, &buf)?;
                    }
                    let s = Summary::decode(&buf)?;
                    *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                    return Ok(());
                }
                FrameKind::Abort => {
                    let msg = String::from_utf8_lossy(&buf).into_owned();
                    return Err(WireError::PeerAbort(chan, msg).into());
                }
                FrameKind::Pong => {}
            }
        }
    }

    fn deliver(&self, h: &FrameHeader, buf: &[u8]) -> Result<(), RunError> {
        if h.block != 0 {
            return Err(WireError::Malformed(
                Channel::Background,
                format!("page frame for unknown block {}", h.block),
            )
            .into());
        }
        let data = (h.kind == FrameKind::Pages).then_some(buf);
        self.mem
            .place(h.offset, h.len, data)
            .map_err(RunError::Place)
    }

    fn fault_thread(&self) -> Result<(), RunError> {
        let Some(uffd) = self.mem.userfault() else {
            return Ok(());
        };
        let mut addrs = Vec::with_capacity(64);
        let io = |e: std::io::Error| RunError::Setup(format!("reading userfaultfd events: {e}"));
        loop {
            if self.stopped() {
                return Ok(());
            }
            if !uffd.wait(20_000_000).map_err(io)? {
                continue;
            }
            addrs.clear();
            uffd.read_faults(&mut addrs).map_err(io)?;
            for &a in &addrs {
                // Relaxed: a counter read after the run.
                self.uffd_faults.fetch_add(1, Ordering::Relaxed);
                if let Some(hp) = self.mem.host_page_at(a) {
                    if !self.mem.is_received(hp) && self.mem.claim_request(hp) {
                        self.request(hp)?;
                    }
                }
            }
        }
    }

    /// Sends `n` malformed or out-of-range requests of every kind (test hook).
    fn inject_bad(&self, n: u64) -> Result<(), WireError> {
        let mem = self.cfg.mem;
        for i in 0..n {
            let good = UrgentRequest::new(0, 0, 4096).encode();
            let body: Vec<u8> = match i % 7 {
                0 => {
                    let mut b = good;
                    b[0] ^= 0xff; // bad magic
                    b.to_vec()
                }
                1 => good[..23].to_vec(), // short frame
                2 => {
                    let mut b = good;
                    b[2] = 1; // unknown flags
                    b.to_vec()
                }
                3 => UrgentRequest::new(7, 0, 4096).encode().to_vec(), // no such block
                4 => UrgentRequest::new(0, mem, 4096).encode().to_vec(), // past the end
                5 => UrgentRequest::new(0, 4096, 0).encode().to_vec(), // empty
                _ => UrgentRequest::new(0, u64::MAX - 100, 4096)
                    .encode()
                    .to_vec(), // overflow
            };
            self.send_rp(RpKind::Request, &body)?;
        }
        Ok(())
    }
}

fn connect(addr: SocketAddr, idle: Duration) -> Result<TcpStream, RunError> {
    let s = TcpStream::connect_timeout(&addr, idle)
        .map_err(|e| RunError::Wire(WireError::Io(Channel::Handshake, e)))?;
    configure(&s).map_err(|e| RunError::Wire(WireError::Io(Channel::Handshake, e)))?;
    Ok(s)
}

/// Measures source clock minus destination clock with a few pings (different machines).
fn clock_offset(main: &TcpStream, g: &Guard<'_>) -> Result<i64, WireError> {
    let mut best = (u64::MAX, 0i64);
    for _ in 0..8 {
        let t0 = now_ns();
        let h = RpHeader {
            kind: RpKind::Ping,
            len: 0,
            sent_ns: t0,
        };
        write_parts(main, &[&h.encode()], g, Channel::ReturnPath)?;
        let mut hb = [0u8; FrameHeader::LEN];
        read_full(main, &mut hb, g, Channel::Background)?;
        let t1 = now_ns();
        let pong = FrameHeader::decode(&hb, Channel::Background)?;
        if pong.kind != FrameKind::Pong {
            return Err(WireError::Malformed(
                Channel::Background,
                "expected a pong".into(),
            ));
        }
        if t1 - t0 < best.0 {
            best = (t1 - t0, pong.arrival_ns as i64 - ((t0 + t1) / 2) as i64);
        }
    }
    Ok(best.1)
}

/// Migrates guest RAM from the source at `addr` in `mode` while the guest runs `workload`.
/// `progress(received, total)` is called a few times per second.
pub fn run_destination(
    addr: SocketAddr,
    cfg: &RunConfig,
    mode: MigrationMode,
    workload: Workload,
    progress: &dyn Fn(u64, u64),
) -> Result<RunResult, RunError> {
    let plan = GuestPlan::new(cfg.mem, cfg.host_page).map_err(RunError::Setup)?;
    let mem = GuestMemory::new(cfg.mem, cfg.host_page, cfg.fault_path)
        .map_err(|e| RunError::Setup(format!("mapping guest RAM: {e}")))?;
    let pre_stop = AtomicBool::new(false);
    let g = Guard {
        stop: &pre_stop,
        idle: cfg.idle_timeout,
        keepalive: None,
    };
    let main = connect(addr, cfg.idle_timeout)?;
    let mut hello = Hello {
        role: 1,
        token: 0,
        mode: mode.code(),
        mem: cfg.mem,
        host_page: cfg.host_page,
        seed: cfg.seed,
        bandwidth_bps: cfg.link.bandwidth_bps,
        delay_ns: cfg.link.delay_ns,
        queue_bytes: cfg.link.queue_bytes,
        nic_queue_bytes: cfg.link.nic_queue_bytes,
        claim_batch: cfg.claim_batch,
        scan_start: 0,
        drop_after: cfg.drop_after,
        source_fault: cfg.source_fault.code(),
        boot_id: boot_id(),
    };
    write_parts(&main, &[&hello.encode()], &g, Channel::Handshake)?;
    let reply = HelloReply::read(&main, &g)?;
    if !reply.error.is_empty() {
        return Err(RunError::Refused(reply.error));
    }
    let urgent = connect(addr, cfg.idle_timeout)?;
    hello.role = 2;
    hello.token = reply.token;
    write_parts(&urgent, &[&hello.encode()], &g, Channel::Handshake)?;
    let ureply = HelloReply::read(&urgent, &g)?;
    if !ureply.error.is_empty() {
        return Err(RunError::Refused(ureply.error));
    }
    // Always probed (so the path is exercised); used only across machines: one machine's
    // processes share CLOCK_MONOTONIC exactly.
    let measured_offset = clock_offset(&main, &g)?;
    let same_clock = reply.boot_id == boot_id();
    let offset_ns = if same_clock { 0 } else { measured_offset };
    let d = Dest {
        cfg,
        mem,
        main,
        urgent,
        rp_lock: Mutex::new(()),
        stop: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        offset_ns,
        bg_progress: AtomicU64::new(now_ns()),
        failure: Mutex::new(None),
        uffd_faults: AtomicU64::new(0),
        requests_sent: AtomicU64::new(0),
        summary: Mutex::new(None),
    };
    let total = d.mem.host_pages();
    let start = Barrier::new(2);
    let request = |hp: u64| {
        if let Err(e) = d.request(hp) {
            d.fail(e.into());
        }
    };
    let mut t0 = 0;
    let (report, log) = std::thread::scope(|s| {
        let bg = s.spawn(|| {
            cfg.pin.apply(Role::BackgroundReceiver);
            tight_timer_slack();
            if let Err(e) = d.receiver(&d.main, Channel::Background) {
                d.fail(e);
            }
        });
        s.spawn(|| {
            cfg.pin.apply(Role::UrgentReceiver);
            tight_timer_slack();
            if let Err(e) = d.receiver(&d.urgent, Channel::Urgent) {
                d.fail(e);
            }
        });
        s.spawn(|| {
            cfg.pin.apply(Role::FaultThread);
            tight_timer_slack();
            if let Err(e) = d.fault_thread() {
                d.fail(e);
            }
        });
        let guest = s.spawn(|| {
            cfg.pin.apply(Role::Guest);
            tight_timer_slack();
            let mut g = Guest {
                mem: &d.mem,
                request: &request,
                stop: &d.stop,
                log: FaultLog::default(),
            };
            g.register_thread();
            start.wait();
            let r = workload::run(workload, &mut g, &plan, cfg.seed, cfg.stream_rate);
            (r, g.log)
        });
        // Postcopy starts when the source reads START: stamp before sending, so that a
        // descheduled main thread cannot make the migration look shorter than it was.
        t0 = now_ns();
        if let Err(e) = d.send_rp(RpKind::Start, &[]) {
            d.fail(e.into());
        }
        start.wait();
        if let Err(e) = d.inject_bad(cfg.inject_bad) {
            d.fail(e.into());
        }
        let mut last_count = 0;
        let mut last_change = now_ns();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let n = d.mem.received_count();
            progress(n, total);
            if d.stopped() {
                break;
            }
            if n != last_count {
                last_count = n;
                last_change = now_ns();
            } else if n < total && now_ns() - last_change > cfg.idle_timeout.as_nanos() as u64 {
                d.fail(RunError::Stalled {
                    received: n,
                    total,
                    idle: cfg.idle_timeout,
                });
                break;
            }
            if n >= total && guest.is_finished() {
                // Relaxed: see `fail`.
                d.finished.store(true, Ordering::Relaxed);
                if let Err(e) = d.send_rp(RpKind::Done, &[]) {
                    d.fail(e.into());
                }
                break;
            }
        }
        let _ = bg.join();
        // Relaxed: polled flag; ends the urgent receiver and the fault thread.
        d.stop.store(true, Ordering::Relaxed);
        guest.join().unwrap_or_else(|_| {
            d.fail(RunError::Setup("the guest thread panicked".into()));
            (WorkloadReport::default(), FaultLog::default())
        })
    });
    if let Some(e) = d.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    let summary = d
        .summary
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or(RunError::Wire(WireError::Closed(Channel::Background)))?;
    let mut r = finish(&d, &plan, mode, workload, t0, report, log, summary);
    r.clock_offset_us = measured_offset as f64 / 1e3;
    r.same_clock = same_clock;
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    d: &Dest<'_>,
    plan: &GuestPlan,
    mode: MigrationMode,
    workload: Workload,
    t0: u64,
    report: WorkloadReport,
    log: FaultLog,
    summary: Summary,
) -> RunResult {
    let cfg = d.cfg;
    let mut problems = Vec::new();
    if summary.checksums.len() as u64 != plan.pages {
        problems.push(format!(
            "source sent {} checksums for {} pages",
            summary.checksums.len(),
            plan.pages
        ));
    } else {
        let mut bad = 0u64;
        let mut first = None;
        for (p, page) in d
            .mem
            .all_bytes()
            .chunks_exact(TARGET_PAGE as usize)
            .enumerate()
        {
            if page_checksum(page) != summary.checksums[p] {
                bad += 1;
                first.get_or_insert(p);
            }
        }
        if let Some(p) = first {
            problems.push(format!(
                "{bad} pages differ from the source (first: page {p})"
            ));
        }
        let seen_bad = report
            .observed
            .iter()
            .filter(|&&(p, sum)| summary.checksums.get(p as usize) != Some(&sum))
            .count();
        if seen_bad > 0 {
            problems.push(format!(
                "the guest read {seen_bad} pages with wrong contents"
            ));
        }
    }
    let (twice, first_twice) = d.mem.placed_twice();
    if twice > 0 {
        problems.push(format!(
            "{twice} host pages placed twice ({})",
            first_twice.unwrap_or_default()
        ));
    }
    if !d.mem.all_received() {
        problems.push("not every page was received".into());
    }
    if report.wrong > 0 {
        problems.push(format!("{} key lookups gave wrong answers", report.wrong));
    }
    if !report.completed {
        problems.push("the workload did not complete".into());
    }
    if summary.stats.bad_requests != cfg.inject_bad {
        problems.push(format!(
            "the source rejected {} requests, {} malformed ones were sent",
            summary.stats.bad_requests, cfg.inject_bad
        ));
    }
    let lat = &log.latencies_ns;
    let mut sorted = lat.clone();
    sorted.sort_unstable();
    let duration = d.mem.last_placed_ns().saturating_sub(t0);
    let st = &summary.stats;
    RunResult {
        mode: mode.name().into(),
        workload: workload.name().into(),
        fault_path: d.mem.fault_path().into(),
        faults: lat.len() as u64,
        // Relaxed: read after the threads are joined.
        uffd_faults: d.uffd_faults.load(Ordering::Relaxed),
        requests_sent: d.requests_sent.load(Ordering::Relaxed),
        fault_p50_us: percentile_ns(&sorted, 50.0) as f64 / 1e3,
        fault_p99_us: percentile_ns(&sorted, 99.0) as f64 / 1e3,
        fault_max_us: sorted.last().copied().unwrap_or(0) as f64 / 1e3,
        stall_ms: log.stall_ns as f64 / 1e6,
        longest_pause_ms: report.longest_pause_ns as f64 / 1e6,
        duration_ms: duration as f64 / 1e6,
        workload_ms: report.elapsed_ns as f64 / 1e6,
        throughput_mib_s: if duration > 0 {
            cfg.mem as f64 / (1 << 20) as f64 / (duration as f64 / 1e9)
        } else {
            0.0
        },
        ops: report.ops,
        pages_urgent: st.urgent_pages,
        pages_background: st.background_pages,
        already_claimed: st.urgent_already_claimed,
        requests: st.requests,
        hints_offered: st.hints_offered,
        hints_accepted: st.hints_accepted,
        hints_taken: st.hints_taken,
        queued_followed: st.queued_followed,
        bad_requests: st.bad_requests,
        rejected: summary.rejected.clone(),
        zero_host_pages: summary.zero_host_pages,
        placed_twice: twice,
        clock_offset_us: 0.0,
        same_clock: true,
        mem_bytes: cfg.mem,
        host_page: cfg.host_page,
        verified: problems.is_empty(),
        problems,
        latencies_ns: sorted,
    }
}
