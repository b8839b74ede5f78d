//! The migration source: the `pagehint` scheduler behind two TCP channels.
//!
//! Per session (one migration), after the destination's hello and the `START` frame:
//! * the **background sender** iterates a [`BackgroundScanner`](pagehint::BackgroundScanner)
//!   from the scan start and writes each claim's host pages on the background channel; in
//!   vanilla mode it is the only sender, and the scanner jumps to queued requests;
//! * the **return-path thread** reads page requests, waits out the link's one-way delay, and
//!   calls [`PageScheduler::serve_frame`](pagehint::PageScheduler::serve_frame) (which rejects
//!   malformed and out-of-range requests with a typed error: they are counted, the first few
//!   reported, and the migration goes on). In preempt modes it writes the claimed host page
//!   on the urgent channel, then calls `urgent_sent`, which offers the hint (preempt-hint).
//!
//! When the destination says `DONE` (it has every page), the source sends its counters and
//! the checksum of every target page, and closes. Any failure stops both threads, shuts the
//! sockets down (which unblocks the peer) and ends the session with a typed error.

use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagehint::{Claim, ClaimBatch, PageLocation, PageScheduler, Served};

use crate::clock::{boot_id, now_ns, sleep_until, tight_timer_slack};
use crate::config::{MigrationMode, SourceFault};
use crate::image::{SourceImage, TARGET_PAGE};
use crate::link::{Link, LinkParams};
use crate::pin::{PinPlan, Role};
use crate::wire::{
    configure, read_full, write_parts, Channel, FrameHeader, FrameKind, Guard, Hello, HelloReply,
    RpHeader, RpKind, Summary, WireError,
};

/// The largest guest RAM served (its checksums must fit one summary frame).
pub const MAX_MEM: u64 = 64 << 30;

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

/// The listening source; serves one destination session at a time.
#[derive(Debug)]
pub struct SourceServer {
    listener: TcpListener,
    pin: PinPlan,
    idle: Duration,
    cache: Mutex<Option<Arc<SourceImage>>>,
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
            cache: Mutex::new(None),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Builds (or reuses) the image for `(mem, host_page, seed)`.
    pub fn image(&self, mem: u64, host_page: u64, seed: u64) -> Result<Arc<SourceImage>, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(img) = cache.as_ref() {
            if img.layout().total_bytes() == mem
                && img.layout().blocks()[0].host_page_pages() * TARGET_PAGE == host_page
                && img.seed() == seed
            {
                return Ok(Arc::clone(img));
            }
        }
        *cache = None; // free the old image before building a new one
        let img = Arc::new(SourceImage::build(mem, host_page, seed)?);
        *cache = Some(Arc::clone(&img));
        Ok(img)
    }

    fn accept(&self, stop: &AtomicBool, limit: Option<Duration>) -> Result<TcpStream, WireError> {
        let start = now_ns();
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)
                        .and_then(|_| configure(&s))
                        .map_err(|e| WireError::Io(Channel::Handshake, e))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Relaxed: a polled flag.
                    if stop.load(Ordering::Relaxed) {
                        return Err(WireError::Stopped);
                    }
                    if let Some(l) = limit {
                        if now_ns() - start > l.as_nanos() as u64 {
                            return Err(WireError::Timeout(Channel::Handshake, l));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(WireError::Io(Channel::Handshake, e)),
            }
        }
    }

    /// Serves sessions until `stop` is raised, reporting each with `log`.
    pub fn serve(&self, stop: &AtomicBool, mut log: impl FnMut(Result<SessionReport, WireError>)) {
        loop {
            match self.serve_session(stop) {
                Err(WireError::Stopped) => return,
                r => log(r),
            }
        }
    }

    /// Accepts and serves one session.
    pub fn serve_session(&self, stop: &AtomicBool) -> Result<SessionReport, WireError> {
        let main = self.accept(stop, None)?;
        let guard = Guard {
            stop,
            idle: self.idle,
            keepalive: None,
        };
        let mut hb = [0u8; Hello::LEN];
        read_full(&main, &mut hb, &guard, Channel::Handshake)?;
        let hello = Hello::decode(&hb)?;
        let token = now_ns() ^ 0x005e_ed0f_5e55_1011;
        let checked = self.check_hello(&hello);
        let reply = HelloReply {
            error: checked.as_ref().err().cloned().unwrap_or_default(),
            token,
            boot_id: boot_id(),
        };
        reply.write(&main, &guard)?;
        let (mode, image) = checked.map_err(|e| WireError::Malformed(Channel::Handshake, e))?;
        let urgent = self.accept(stop, Some(self.idle))?;
        read_full(&urgent, &mut hb, &guard, Channel::Handshake)?;
        let uh = Hello::decode(&hb)?;
        let ok = uh.role == 2 && uh.token == token;
        HelloReply {
            error: if ok {
                String::new()
            } else {
                "bad urgent-channel token".into()
            },
            token,
            boot_id: boot_id(),
        }
        .write(&urgent, &guard)?;
        if !ok {
            return Err(WireError::Malformed(
                Channel::Handshake,
                "urgent connection with a wrong token".into(),
            ));
        }
        let link = LinkParams {
            bandwidth_bps: hello.bandwidth_bps,
            delay_ns: hello.delay_ns,
            queue_bytes: hello.queue_bytes,
            nic_queue_bytes: hello.nic_queue_bytes,
        };
        let batch = ClaimBatch::pages(hello.claim_batch)
            .map_err(|e| WireError::Malformed(Channel::Handshake, e.to_string()))?;
        let sched = PageScheduler::new(image.layout().clone(), mode.scheduler(batch))
            .map_err(|e| WireError::Io(Channel::Handshake, e))?;
        sched.bitmap().mark_all();
        let session = Session {
            image: &image,
            sched,
            link: Link::new(link),
            main,
            urgent,
            scan_start: hello.scan_start,
            drop_after: hello.drop_after,
            source_fault: SourceFault::from_code(hello.source_fault),
            corrupt_pending: AtomicBool::new(
                SourceFault::from_code(hello.source_fault) == SourceFault::CorruptPage,
            ),
            same_clock: hello.boot_id == boot_id(),
            pin: self.pin,
            idle: self.idle,
            outer_stop: stop,
            stop: AtomicBool::new(false),
            bg_progress: AtomicU64::new(now_ns()),
            bg_host_pages: AtomicU64::new(0),
            urgent_host_pages: AtomicU64::new(0),
            zero_host_pages: AtomicU64::new(0),
            rejected: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        };
        let summary = session.run()?;
        Ok(SessionReport {
            mode,
            mem: hello.mem,
            summary,
        })
    }

    fn check_hello(&self, h: &Hello) -> Result<(MigrationMode, Arc<SourceImage>), String> {
        if h.role != 1 {
            return Err("expected a main-channel hello".into());
        }
        let mode = MigrationMode::from_code(h.mode).ok_or("unknown mode")?;
        if !h.host_page.is_power_of_two() || !(TARGET_PAGE..=1 << 30).contains(&h.host_page) {
            return Err(format!(
                "host page {} is not a power of two from 4 KiB to 1 GiB",
                h.host_page
            ));
        }
        if h.mem > MAX_MEM {
            return Err(format!("--mem {} is more than the harness's 64 GiB", h.mem));
        }
        ClaimBatch::pages(h.claim_batch).map_err(|e| e.to_string())?;
        if h.scan_start >= h.mem / TARGET_PAGE {
            return Err(format!(
                "scan start page {} is outside guest RAM",
                h.scan_start
            ));
        }
        let image = self.image(h.mem, h.host_page, h.seed)?;
        Ok((mode, image))
    }
}

struct Session<'a> {
    image: &'a SourceImage,
    sched: PageScheduler,
    link: Link,
    main: TcpStream,
    urgent: TcpStream,
    scan_start: u64,
    drop_after: u64,
    source_fault: SourceFault,
    corrupt_pending: AtomicBool,
    same_clock: bool,
    pin: PinPlan,
    idle: Duration,
    outer_stop: &'a AtomicBool,
    stop: AtomicBool,
    /// When the background sender last wrote (keeps the return path's idle timer quiet).
    bg_progress: AtomicU64,
    bg_host_pages: AtomicU64,
    urgent_host_pages: AtomicU64,
    zero_host_pages: AtomicU64,
    rejected: Mutex<Vec<String>>,
    failure: Mutex<Option<WireError>>,
}

impl Session<'_> {
    fn guard(&self, keepalive: bool) -> Guard<'_> {
        Guard {
            stop: &self.stop,
            idle: self.idle,
            keepalive: keepalive.then_some(&self.bg_progress),
        }
    }

    /// Records the first failure and stops everything.
    fn fail(&self, e: WireError) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() && !matches!(e, WireError::Stopped) {
            *f = Some(e);
        }
        // Relaxed: the flag is polled; the sockets' shutdown is what unblocks threads.
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.main.shutdown(Shutdown::Both);
        let _ = self.urgent.shutdown(Shutdown::Both);
    }

    fn run(self) -> Result<Summary, WireError> {
        // Before the migration starts: answer clock probes until START.
        let g = self.guard(false);
        loop {
            let (h, _) = read_rp(&self.main, &g)?;
            match h.kind {
                RpKind::Ping => {
                    let pong = FrameHeader {
                        kind: FrameKind::Pong,
                        block: 0,
                        offset: 0,
                        len: 0,
                        arrival_ns: now_ns(),
                    };
                    write_parts(&self.main, &[&pong.encode()], &g, Channel::Background)?;
                }
                RpKind::Done => {
                    return Err(WireError::Malformed(
                        Channel::ReturnPath,
                        "DONE before START".into(),
                    ))
                }
                RpKind::Request => {
                    return Err(WireError::Malformed(
                        Channel::ReturnPath,
                        "request before START".into(),
                    ))
                }
                RpKind::Start => break,
            }
        }
        // Relaxed: a coarse timestamp for idle checks.
        self.bg_progress.store(now_ns(), Ordering::Relaxed);
        std::thread::scope(|s| {
            let bg = s.spawn(|| {
                self.pin.apply(Role::BackgroundSender);
                tight_timer_slack();
                if let Err(e) = self.background() {
                    self.fail(e);
                }
            });
            let rp = s.spawn(|| {
                self.pin.apply(Role::ReturnPath);
                tight_timer_slack();
                if let Err(e) = self.return_path() {
                    self.fail(e);
                }
            });
            // Watch for an outer stop (the server shutting down).
            while !bg.is_finished() || !rp.is_finished() {
                // Relaxed: polled flags.
                if self.outer_stop.load(Ordering::Relaxed) {
                    self.fail(WireError::Stopped);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        if let Some(e) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        // Relaxed: threads joined.
        if self.stop.load(Ordering::Relaxed) {
            return Err(WireError::Stopped);
        }
        // Relaxed loads below: the counting threads have been joined.
        let summary = Summary {
            stats: self.sched.stats(),
            bg_host_pages: self.bg_host_pages.load(Ordering::Relaxed),
            urgent_host_pages: self.urgent_host_pages.load(Ordering::Relaxed),
            zero_host_pages: self.zero_host_pages.load(Ordering::Relaxed),
            rejected: self
                .rejected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            checksums: self.image.checksums().to_vec(),
        };
        let body = summary.encode();
        let h = FrameHeader {
            kind: FrameKind::Summary,
            block: 0,
            offset: 0,
            len: body.len() as u64,
            arrival_ns: now_ns(),
        };
        let g = self.guard(false);
        write_parts(&self.main, &[&h.encode(), &body], &g, Channel::Background)?;
        let _ = self.main.shutdown(Shutdown::Write);
        let _ = self.urgent.shutdown(Shutdown::Both);
        Ok(summary)
    }

    fn background(&self) -> Result<(), WireError> {
        let mut scanner = self
            .sched
            .background_from(PageLocation::new(0, self.scan_start));
        while let Some(claim) = scanner.next_claim() {
            self.send_claim(&claim, Channel::Background)?;
            // Relaxed: a coarse timestamp.
            self.bg_progress.store(now_ns(), Ordering::Relaxed);
        }
        if self.source_fault == SourceFault::DuplicatePage {
            // Test hook: send the first host page again, as a buggy scheduler would.
            let per = self.image.plan().host_pages_per;
            self.send_run(0, (0, per, false), Channel::Background)?;
        }
        Ok(())
    }

    fn return_path(&self) -> Result<(), WireError> {
        let g = self.guard(true);
        let delay = self.link.params().delay_ns;
        loop {
            let (h, body) = read_rp(&self.main, &g)?;
            match h.kind {
                RpKind::Done => return Ok(()),
                RpKind::Ping | RpKind::Start => {}
                RpKind::Request => {
                    // The request has been on the emulated link since it was sent.
                    let due = if self.same_clock { h.sent_ns } else { now_ns() } + delay;
                    sleep_until(due);
                    match self.sched.serve_frame(&body) {
                        Ok(Served::Send(claim)) => {
                            self.send_claim(&claim, Channel::Urgent)?;
                            self.sched.urgent_sent(&claim);
                        }
                        Ok(Served::AlreadyClaimed(_)) | Ok(Served::Queued(_)) => {}
                        Err(e) => {
                            let mut r = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
                            if r.len() < REJECTED_KEPT {
                                r.push(e.to_string());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends every host page of `claim`, grouping contiguous pages of the same kind (data or
    /// all-zero) into one frame.
    fn send_claim(&self, claim: &Claim, chan: Channel) -> Result<(), WireError> {
        let per = self.image.plan().host_pages_per;
        let mut run: Option<(u64, u64, bool)> = None; // (first target page, target pages, zero)
        for hp in claim.host_pages() {
            let zero = self.image.host_page_is_zero(hp.first_page / per);
            match run {
                Some((first, n, z)) if z == zero && first + n == hp.first_page => {
                    run = Some((first, n + hp.pages, z));
                }
                _ => {
                    if let Some(r) = run {
                        self.send_run(claim.block(), r, chan)?;
                    }
                    run = Some((hp.first_page, hp.pages, zero));
                }
            }
        }
        if let Some(r) = run {
            self.send_run(claim.block(), r, chan)?;
        }
        Ok(())
    }

    fn send_run(
        &self,
        block: u32,
        (first, pages, zero): (u64, u64, bool),
        chan: Channel,
    ) -> Result<(), WireError> {
        let offset = first * TARGET_PAGE;
        let len = pages * TARGET_PAGE;
        let mut payload: &[u8] = if zero {
            &[]
        } else {
            self.image.bytes(offset, len)
        };
        let corrupted;
        // Relaxed: a one-shot test-hook flag.
        if !zero && self.corrupt_pending.swap(false, Ordering::Relaxed) {
            let mut c = payload.to_vec();
            c[0] ^= 0xff;
            corrupted = c;
            payload = &corrupted;
        }
        let wire = (FrameHeader::LEN + payload.len()) as u64;
        let (slot, stream, counter) = match chan {
            Channel::Urgent => (
                self.link.urgent(wire),
                &self.urgent,
                &self.urgent_host_pages,
            ),
            _ => (self.link.background(wire), &self.main, &self.bg_host_pages),
        };
        if slot.block_until_ns > 0 {
            sleep_until(slot.block_until_ns);
        }
        let h = FrameHeader {
            kind: if zero {
                FrameKind::Zero
            } else {
                FrameKind::Pages
            },
            block,
            offset,
            len,
            arrival_ns: slot.arrival_ns,
        };
        write_parts(stream, &[&h.encode(), payload], &self.guard(false), chan)?;
        let host_pages = pages / self.image.plan().host_pages_per;
        // Relaxed: counters read after the threads are joined.
        let before = counter.fetch_add(host_pages, Ordering::Relaxed);
        if zero {
            self.zero_host_pages
                .fetch_add(host_pages, Ordering::Relaxed);
        }
        if self.drop_after > 0 {
            // Relaxed: an approximate total is enough for a test hook.
            let total = before
                + host_pages
                + if chan == Channel::Urgent {
                    &self.bg_host_pages
                } else {
                    &self.urgent_host_pages
                }
                .load(Ordering::Relaxed);
            if total >= self.drop_after {
                // Test hook: drop both connections as a crashed source would (`fail` records
                // why before it shuts the sockets down).
                self.fail(WireError::PeerAbort(
                    chan,
                    format!("connections dropped on purpose after {total} host pages (test hook)"),
                ));
                return Err(WireError::Stopped);
            }
        }
        Ok(())
    }
}

/// Reads one return-path frame.
fn read_rp(s: &TcpStream, g: &Guard<'_>) -> Result<(RpHeader, Vec<u8>), WireError> {
    let mut hb = [0u8; RpHeader::LEN];
    read_full(s, &mut hb, g, Channel::ReturnPath)?;
    let h = RpHeader::decode(&hb)?;
    let mut body = vec![0u8; h.len as usize];
    read_full(s, &mut body, g, Channel::ReturnPath)?;
    Ok((h, body))
}
