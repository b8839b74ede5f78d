//! Postcopy at the source: the `pagehint` scheduler over the bitmap precopy left.
//!
//! * the **background sender** iterates a [`BackgroundScanner`](pagehint::BackgroundScanner)
//!   from the scan start and writes each claim's host pages on the background channel; in
//!   vanilla mode it is the only sender, and the scanner jumps to queued requests;
//! * the **return-path thread** reads page requests, waits out the link's one-way delay, and
//!   calls [`PageScheduler::serve_from`] with the request's stream (which rejects malformed
//!   and out-of-range requests and unknown streams with a typed error: they are counted,
//!   the first few reported, and the migration goes on). In preempt modes it writes the
//!   claimed host page on the urgent channel, then calls `urgent_sent_from` with the same
//!   stream, which offers the hint into that stream's slot (preempt-hint: the one slot;
//!   preempt-hints: the faulting vCPU's). A request for a host page the background path has
//!   already claimed (`Served::AlreadyClaimed`) would wait for the background copy, which
//!   may still sit claimed-but-unsent, in the send queue, in the socket buffers or in the
//!   destination receiver's backlog: with `resend` (the default) the page is sent again on
//!   the urgent channel, marked as a deliberate duplicate, and the destination places
//!   whichever copy arrives first and drops the other (counted) — as long as the resent
//!   bytes stay within 1% of the postcopy bytes sent so far; past that, the request waits
//!   for the background copy.
//!
//! Both end when the destination says `DONE` (it has every page), or when the connections
//! break: then the session waits to be resumed (`Session::resume`), rebuilds the
//! scheduler from the destination's received bitmap, and starts both again on the new
//! connections.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pagehint::{
    Claim, HintPolicy, PageScheduler, RequestError, SchedulerStats, Served, UrgentRequest,
};

use super::door::DoorwayError;
use super::send::{PageRun, Phase, SendError};
use super::trace::{ReqPath, ReqTrace};
use super::{ServerEvent, Session, SourceError};
use crate::guest::layout::TARGET_PAGE;
use crate::handshake::HANDSHAKE_DEADLINE;
use crate::options::SourceFault;
use crate::sys::clock::{now_ns, sleep_until_unless, tight_timer_slack};
use crate::sys::pin::Role;
use crate::wire::summary::StreamCounts;
use crate::wire::{
    read_full, Channel, FrameHeader, Guard, RequestBody, RpHeader, RpKind, WireError, POLL_SLICE,
};

impl Session<'_> {
    /// Runs postcopy to the destination's `DONE`, resuming it on new connections after each
    /// break (see the module [`super`]); returns the scheduler's counters, and each fault
    /// stream's. A takeover starts from the destination's `received` bitmap.
    pub(super) fn postcopy(
        &mut self,
        received: Option<Vec<u64>>,
    ) -> Result<(SchedulerStats, Vec<StreamCounts>), SourceError> {
        let layout = self.mem.layout();
        let mut sched = PageScheduler::with_bitmap(
            layout.ram().clone(),
            Arc::clone(self.mem.bitmap()),
            self.hello
                .mode
                .scheduler(self.hello.claim_batch, layout.vcpus(), self.hello.cursors)
                .map_err(SourceError::Scheduler)?,
        )
        .map_err(|e| SourceError::Scheduler(e.to_string()))?;
        if let Some(r) = received {
            self.rebuild(&mut sched, &r)?;
        }
        loop {
            self.senders(&sched);
            let failure = self
                .failure
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match failure {
                None if self.stopped() => return Err(WireError::Stopped.into()),
                None => return Ok(Self::last_sweep(&sched)?),
                Some(e) if e.connection_lost() && self.hello.recover_ms > 0 => {
                    self.resume(&mut sched, e)?;
                }
                Some(e) => return Err(e),
            }
        }
    }

    /// After the destination's `DONE`: one more background sweep takes the requests still
    /// queued (vanilla: asked for pages already on their way), so that the counters'
    /// `queued_followed + queued_stale` is every queued request, and finds nothing left to
    /// claim: every page was sent (I3). Returns the counters.
    fn last_sweep(sched: &PageScheduler) -> Result<(SchedulerStats, Vec<StreamCounts>), WireError> {
        let mut scanner = sched.background();
        if let Some(claim) = scanner.next_claim() {
            return Err(WireError::Malformed(
                Channel::ReturnPath,
                format!(
                    "DONE while block {} still had {} dirty pages at the source",
                    claim.block(),
                    claim.dirty_pages()
                ),
            ));
        }
        // The scanner publishes its counts when dropped.
        drop(scanner);
        // Per-stream counters exist where the scheduler follows streams (one slot's scan
        // counts only in the totals).
        let streams = match sched.config().hint {
            HintPolicy::PerStream(_) => (0..sched.streams())
                .filter_map(|s| sched.stream_stats(s).ok())
                .map(StreamCounts::from)
                .collect(),
            HintPolicy::Off | HintPolicy::SetIfEmpty => Vec::new(),
        };
        Ok((sched.stats(), streams))
    }

    /// Runs the background sender and the return-path thread on the current connections
    /// until both end (`DONE`, or a failure recorded in `self.failure`).
    fn senders(&self, sched: &PageScheduler) {
        std::thread::scope(|s| {
            let bg = s.spawn(|| {
                self.pin.apply(Role::BackgroundSender);
                tight_timer_slack();
                if let Err(e) = self.background(sched) {
                    self.fail(e);
                }
            });
            let rp = s.spawn(|| {
                self.pin.apply(Role::ReturnPath);
                tight_timer_slack();
                if let Err(e) = self.return_path(sched) {
                    self.fail(e);
                }
            });
            // Watch for an outer stop (the server shutting down).
            while !bg.is_finished() || !rp.is_finished() {
                // Relaxed: a polled flag.
                if self.outer_stop.load(Ordering::Relaxed) {
                    self.fail(WireError::Stopped);
                }
                // Short: after a break, recovery starts once both senders have ended.
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    }

    /// Postcopy recovery after `cut` broke the connections (every sender has stopped):
    /// holds the session paused (up to the hello's window, within `--max-recover`) for its
    /// destination to resume it, rebuilds the scheduler from its received bitmap (dropping
    /// the broken connection's hint and queued requests), and installs the new connections.
    /// Fails with `cut` if the destination does not come back in time.
    fn resume(&mut self, sched: &mut PageScheduler, cut: SourceError) -> Result<(), SourceError> {
        let _ = self.out.main.shutdown(Shutdown::Both);
        let _ = self.out.urgent.shutdown(Shutdown::Both);
        let number = self.doorway.number();
        (self.log)(ServerEvent::Paused {
            number,
            why: cut.to_string(),
            hold: self.hold,
            asked: Duration::from_millis(self.hello.recover_ms),
        });
        let paused_at = now_ns();
        let (main, received) = match self.doorway.paused(self.outer_stop, self.hold) {
            Ok(r) => r,
            Err(DoorwayError::Stopped) => return Err(WireError::Stopped.into()),
            // The destination never came back: the session ends with the cut.
            Err(DoorwayError::Expired) => {
                self.held_out = true;
                return Err(cut);
            }
        };
        let urgent = self
            .doorway
            .urgent(self.outer_stop, HANDSHAKE_DEADLINE.min(self.idle))
            .and_then(|u| self.doorway.accept(&u).map(|()| u));
        let urgent = match urgent {
            Ok(u) => u,
            // A resume that never brought its urgent connection is a break like the first:
            // the destination tries again.
            Err(SourceError::Handshake(_)) => {
                let _ = main.shutdown(Shutdown::Both);
                return self.resume(sched, cut);
            }
            Err(e) => return Err(e),
        };
        crate::link::configure_background(&main, &self.hello.link, &self.hello.transport())
            .map_err(|e| SourceError::Wire(WireError::Io(Channel::Background, e)))?;
        let left = self.rebuild(sched, &received)?;
        (self.log)(ServerEvent::Resumed {
            number,
            after: Duration::from_nanos(now_ns() - paused_at),
            left,
        });
        self.out.main = main;
        self.out.urgent = urgent;
        // Exclusive access (every sender has been joined): plain writes through `get_mut`.
        *self.out.torn_main.get_mut() = false;
        *self.stop.get_mut() = false;
        *self.bg_progress.get_mut() = now_ns();
        let sent = self.out.sent_host_pages();
        let hooks = &mut self.out.hooks;
        if *hooks.cut_fired.get_mut() {
            *hooks.cut_fired.get_mut() = false;
            hooks.cuts_left = hooks.cuts_left.saturating_sub(1);
        }
        hooks.cut_base = sent;
        Ok(())
    }

    /// Rebuilds every block of `sched` from the destination's `received` bitmap (dirty =
    /// not received), records what is left to send, and returns it (target pages).
    fn rebuild(&mut self, sched: &mut PageScheduler, received: &[u64]) -> Result<u64, SourceError> {
        let mut left = 0;
        let mut at = 0;
        for (b, block) in self.mem.layout().ram().blocks().iter().enumerate() {
            let n = block.pages().div_ceil(64) as usize;
            let words = received.get(at..at + n).ok_or_else(|| {
                SourceError::Wire(WireError::Malformed(
                    Channel::Handshake,
                    format!("a received bitmap of {} words", received.len()),
                ))
            })?;
            left += sched.recover_block(b as u32, words).map_err(|e| {
                let what = format!("the received bitmap: {e}");
                SourceError::Wire(WireError::Malformed(Channel::Handshake, what))
            })?;
            at += n;
        }
        self.recoveries.push(left);
        Ok(left)
    }

    fn background(&self, sched: &PageScheduler) -> Result<(), SendError> {
        let layout = self.layout();
        let mut scanner = sched.background_from(layout.location(self.hello.scan_start));
        let g = self.guard(false);
        let mut buf = Vec::new();
        // Test hook: once three quarters of the background's host pages are out, send the seq
        // window's first host page again, as a buggy scheduler would. The seq guest rewrites
        // that page on every pass, so the copy is stale by then, and its next pass sees it.
        let per = layout.host_page().pages();
        let mut duplicate = (self.hello.hooks.fault == SourceFault::DuplicatePage)
            .then(|| sched.bitmap().dirty_pages() * 3 / 4 / per);
        let mut sent = 0u64;
        while let Some(claim) = scanner.next_claim() {
            let claim_ns = now_ns();
            self.send_claim(&claim, Channel::Background, &g, &mut buf, Some(claim_ns))?;
            sent += u64::from(claim.host_page_count());
            // Relaxed: a coarse timestamp.
            self.bg_progress.store(now_ns(), Ordering::Relaxed);
            if duplicate.is_some_and(|at| sent >= at) {
                duplicate = None;
                let loc = layout.location(layout.seq.start);
                self.out.send_pages(
                    PageRun {
                        block: loc.block,
                        first: loc.page,
                        count: per,
                        unit: per,
                    },
                    Channel::Background,
                    Phase::Postcopy,
                    &g,
                    &mut buf,
                )?;
            }
        }
        Ok(())
    }

    fn return_path(&self, sched: &PageScheduler) -> Result<(), SendError> {
        let g = self.guard(true);
        let delay = self.out.link.params().delay_ns;
        let mut buf = Vec::new();
        // Requests come on the main connection, or (preempt modes with `resend`) on the
        // urgent one; everything else on the main one. Both are watched; once the
        // destination has closed the urgent one, only the main one.
        let mut urgent_open = self.hello.transport().urgent_channel;
        let mut last = now_ns();
        loop {
            let from = if urgent_open {
                match wait_either(&self.out.urgent, &self.out.main, POLL_SLICE) {
                    Err(e) => return Err(WireError::Io(Channel::ReturnPath, e).into()),
                    Ok(None) => {
                        g.check(last, Channel::ReturnPath)?;
                        continue;
                    }
                    Ok(Some(true)) => &self.out.urgent,
                    Ok(Some(false)) => &self.out.main,
                }
            } else {
                &self.out.main
            };
            let (h, body) = match read_rp(from, &g) {
                Err(WireError::Closed(_)) if std::ptr::eq(from, &self.out.urgent) => {
                    urgent_open = false;
                    continue;
                }
                r => r?,
            };
            let read_ns = now_ns();
            last = read_ns;
            match h.kind {
                RpKind::Done => return Ok(()),
                RpKind::Ping | RpKind::Start => {}
                RpKind::Request => {
                    // The request has been on the emulated link since it was sent.
                    // (A request stamped in the future waits no longer than one delay.)
                    let now = now_ns();
                    let sent = if self.same_clock { h.sent_ns } else { now };
                    let due = sent.saturating_add(delay).min(now.saturating_add(delay));
                    if !sleep_until_unless(due, || self.stopped()) {
                        return Err(WireError::Stopped.into());
                    }
                    let (stream, served) = serve(sched, &body);
                    let served_ns = now_ns();
                    let mut t = ReqTrace {
                        read_ns,
                        served_ns,
                        ..ReqTrace::default()
                    };
                    match served {
                        Ok(Served::Send(claim)) => {
                            let arrival =
                                self.send_claim(&claim, Channel::Urgent, &g, &mut buf, None)?;
                            t.urgent_written_ns = now_ns();
                            t.urgent_arrival_ns = arrival;
                            // The stream was checked when it was served.
                            let _ = sched.urgent_sent_from(stream, &claim);
                            if let Some(hp) = claim.host_pages().next() {
                                t.host_page = self.global_host_page(hp.block, hp.first_page);
                                t.path = ReqPath::Urgent as u64;
                                self.trace.request(t);
                            }
                        }
                        Ok(Served::AlreadyClaimed(hp)) => {
                            t.host_page = self.global_host_page(hp.block, hp.first_page);
                            t.path = ReqPath::Background as u64;
                            if self.hello.transport().resend && self.resend_fits(hp.pages) {
                                // The background copy may still sit in the send queue, the
                                // socket buffers or the receiver's backlog: send the page
                                // again here. The source is stopped, so both copies are
                                // identical; the destination places the first to arrive.
                                let run = PageRun {
                                    block: hp.block,
                                    first: hp.first_page,
                                    count: hp.pages,
                                    unit: hp.pages,
                                };
                                t.urgent_arrival_ns = self.out.send_pages(
                                    run,
                                    Channel::Urgent,
                                    Phase::Resend,
                                    &g,
                                    &mut buf,
                                )?;
                                t.urgent_written_ns = now_ns();
                                t.path = ReqPath::Resent as u64;
                            }
                            self.trace.request(t);
                        }
                        Ok(Served::Queued(hp)) => {
                            t.host_page = self.global_host_page(hp.block, hp.first_page);
                            t.path = ReqPath::Queued as u64;
                            self.trace.request(t);
                        }
                        Err(e) => {
                            let mut r = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
                            if r.len() < super::REJECTED_KEPT {
                                r.push(e.to_string());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Whether a resend of a host page of `pages` target pages keeps the resent bytes within
    /// 1% of the postcopy bytes sent so far (duplicates stay ≤ 1% of what is sent; with
    /// 2 MiB host pages a few resends would exceed it otherwise).
    fn resend_fits(&self, pages: u64) -> bool {
        let frame = FrameHeader::LEN as u64 + pages * TARGET_PAGE;
        // Relaxed (both): counters; a stale read only undercounts what was sent, which
        // makes the check stricter.
        let sent = self.out.sent.postcopy_bytes.load(Ordering::Relaxed);
        let resent = self.out.sent.resent_bytes.load(Ordering::Relaxed);
        (resent + frame) * 100 <= sent
    }

    /// Global host page of target page `first_page` of `block`.
    pub(super) fn global_host_page(&self, block: u32, first_page: u64) -> u64 {
        let l = self.layout();
        (l.block_first_page(block) + first_page) / l.host_page().pages()
    }

    /// Sends every host page of `claim` on `chan`, contiguous host pages in one go; returns
    /// when the last frame arrives on the emulated link. A background claim (`claim_ns`:
    /// when it was claimed) is recorded in the trace.
    fn send_claim(
        &self,
        claim: &Claim,
        chan: Channel,
        g: &Guard<'_>,
        buf: &mut Vec<u8>,
        claim_ns: Option<u64>,
    ) -> Result<u64, SendError> {
        let unit = self.layout().host_page().pages();
        // Contiguous host pages go out as one run.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for hp in claim.host_pages() {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == hp.first_page => *n += hp.pages,
                _ => runs.push((hp.first_page, hp.pages)),
            }
        }
        let mut arrival = 0;
        for (first, count) in runs {
            let run = PageRun {
                block: claim.block(),
                first,
                count,
                unit,
            };
            arrival = self.out.send_pages(run, chan, Phase::Postcopy, g, buf)?;
            if let Some(c) = claim_ns {
                let hp = self.global_host_page(claim.block(), first);
                self.trace
                    .background(hp, count / unit, c, now_ns(), arrival);
            }
        }
        Ok(arrival)
    }
}

/// Waits up to `timeout` until `a` or `b` is readable (data or EOF): `Some(true)` for `a`
/// (preferred when both are), `Some(false)` for `b`, `None` when neither.
fn wait_either(
    a: &TcpStream,
    b: &TcpStream,
    timeout: Duration,
) -> Result<Option<bool>, std::io::Error> {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(a, PollFlags::IN), PollFd::new(b, PollFlags::IN)];
    let ts = crate::sys::clock::timespec(timeout.as_nanos() as u64);
    match poll(&mut fds, Some(&ts)) {
        Ok(0) | Err(rustix::io::Errno::INTR) => Ok(None),
        Ok(_) => Ok(Some(!fds[0].revents().is_empty())),
        Err(e) => Err(e.into()),
    }
}

/// Serves a `REQUEST` body: its request from its stream, or, malformed (too short to name a
/// stream, or a request frame that does not decode), refused and counted by the scheduler
/// as every bad request is. Returns the stream (0 where the body names none).
fn serve(sched: &PageScheduler, body: &[u8]) -> (u32, Result<Served, RequestError>) {
    match RequestBody::split(body) {
        Some(b) => (
            b.stream,
            match UrgentRequest::decode(b.frame) {
                Ok(req) => sched.serve_from(b.stream, req),
                Err(_) => sched.serve_frame(b.frame),
            },
        ),
        None => (0, sched.serve_frame(body)),
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
