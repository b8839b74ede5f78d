//! The destination's main thread through a run, phase by phase: wait for the switch-over,
//! resume the guest where the source stopped it, watch postcopy until every page is in
//! (recovering broken connections, failing a stall), say `DONE`, and collect the guest.

use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use super::recovery::Receivers;
use super::thread_guest::{self, FaultLog, ThreadGuest, WorkloadReport};
use super::{Applied, Dest, GuestOutcome, RunError, Times};
use crate::guest::kvm::vcpu::VcpuEnd;
use crate::guest::kvm::Machine;
use crate::guest::Workload;
use crate::sys::clock::{now_ns, tight_timer_slack};
use crate::sys::pin::Role;
use crate::sys::vmstat::Vmstat;
use crate::wire::{Channel, RpKind, SwitchOver, WireError};

/// The guest as it runs at the destination.
enum Running<'s> {
    /// The KVM guest's vCPU threads.
    Kvm(&'s Machine, Vec<ScopedJoinHandle<'s, VcpuEnd>>),
    /// The thread guest: its report, its faults and its thread id.
    Thread(ScopedJoinHandle<'s, (WorkloadReport, FaultLog, u32)>),
}

impl Running<'_> {
    /// Whether the whole guest has ended.
    fn finished(&self) -> bool {
        match self {
            Self::Kvm(_, vs) => vs.iter().all(|h| h.is_finished()),
            Self::Thread(t) => t.is_finished(),
        }
    }

    /// Whether a vCPU has ended (before it was asked to, it failed).
    fn a_vcpu_ended(&self) -> bool {
        matches!(self, Self::Kvm(_, vs) if vs.iter().any(|h| h.is_finished()))
    }
}

/// What the postcopy watch does after one look.
enum Look {
    /// Keep watching.
    Watch,
    /// Look again at once (the connections were replaced).
    Again,
    /// Stop watching: collect the guest.
    Stop,
}

impl<'s> Dest<'s> {
    /// Waits for the switch-over, runs the guest through postcopy, sends `DONE` when the last
    /// page is placed, and collects the guest when it has finished.
    pub(super) fn drive(
        &'s self,
        s: &'s Scope<'s, '_>,
        workload: Workload,
        times: &mut Times,
        progress: &dyn Fn(u64, u64),
        receivers: &mut Receivers<'s>,
    ) -> Result<GuestOutcome, RunError> {
        if let Some(c) = self.control {
            c.doing(format!("precopy ({workload})"));
        }
        let switch = self.await_switch(receivers)?;
        (times.switch_due, times.switch_applied) = (switch.start_ns, switch.end_ns);
        let switch = switch.switch;
        if let Some(c) = self.control {
            c.doing(format!("postcopy ({workload})"));
        }
        let guest = self.resume_guest(s, &switch, workload, times)?;
        times.vmstat[0] = Vmstat::read().ok();
        if let Err(e) = self.inject_bad(self.cfg.hooks.inject_bad) {
            self.fail(e.into());
        }
        let ops_at_complete = self.watch_postcopy(s, &guest, times, progress, receivers);
        self.collect(guest, ops_at_complete)
    }

    /// Precopy: waits for the switch-over to be applied, as long as frames keep coming. The
    /// receiver that applies it wakes this thread at once (the wait is part of the downtime).
    fn await_switch(&self, receivers: &Receivers<'_>) -> Result<Applied, RunError> {
        let idle = self.cfg.idle_timeout;
        let mut last = (0, now_ns());
        loop {
            // The switch first: once applied, a failure is one of postcopy, and says so.
            {
                let sw = self.switch.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(sw) = sw.as_ref() {
                    return Ok(sw.clone());
                }
                let (sw, _) = self
                    .switch_ready
                    .wait_timeout(sw, Duration::from_micros(500))
                    .unwrap_or_else(|p| p.into_inner());
                if let Some(sw) = sw.as_ref() {
                    return Ok(sw.clone());
                }
            }
            if self.stopped() {
                return Err(RunError::Wire(WireError::Stopped));
            }
            if let Some(e) = self.broken_before_switch(receivers) {
                self.fail(e);
                return Err(RunError::Wire(WireError::Stopped));
            }
            // Relaxed: a progress figure.
            let n = self.frames.load(std::sync::atomic::Ordering::Relaxed);
            if n != last.0 {
                last = (n, now_ns());
            } else if now_ns() - last.1 > idle.as_nanos() as u64 {
                return Err(RunError::Wire(WireError::Timeout(
                    Channel::Background,
                    idle,
                )));
            }
        }
    }

    /// Starts the guest where the source stopped it: the vCPUs loaded with the source's
    /// state, or the thread guest.
    fn resume_guest(
        &'s self,
        s: &'s Scope<'s, '_>,
        switch: &SwitchOver,
        workload: Workload,
        times: &mut Times,
    ) -> Result<Running<'s>, RunError> {
        let cfg = self.cfg;
        if let Some(m) = self.machine {
            m.load(&switch.vcpus)
                .map_err(|e| RunError::Setup(format!("loading the vCPU state: {e}")))?;
            let rate = workload.stream_rate_each(cfg.guest.stream_rate, cfg.layout().vcpus());
            m.set_stream_rate(rate, crate::guest::STREAM_FRAME_PAGES);
            times.resume = now_ns();
            return Ok(Running::Kvm(m, m.run(s, cfg.pin, cfg.guest.wait, None)));
        }
        times.resume = now_ns();
        Ok(Running::Thread(s.spawn(move || {
            let complete = || self.mem.complete();
            let request = |hp: u64| {
                // The thread guest is one thread: stream 0.
                if let Err(e) = self.request(hp, 0) {
                    self.fail(e.into());
                }
            };
            let (complete, request): (&(dyn Fn() -> bool + Sync), &(dyn Fn(u64) + Sync)) =
                (&complete, &request);
            cfg.pin.apply(Role::Guest);
            tight_timer_slack();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            let mut g = ThreadGuest {
                mem: self.mem,
                request,
                stop: &self.stop,
                complete,
                log: FaultLog::default(),
            };
            let r = thread_guest::run(
                workload,
                &mut g,
                cfg.layout(),
                cfg.guest.seed,
                cfg.guest.stream_rate,
            );
            (r, g.log, tid)
        })))
    }

    /// Postcopy: watches progress until every page is in and the guest has finished (or
    /// the run fails); returns the guest's operations when postcopy completed (KVM).
    fn watch_postcopy(
        &'s self,
        s: &'s Scope<'s, '_>,
        guest: &Running<'_>,
        times: &mut Times,
        progress: &dyn Fn(u64, u64),
        receivers: &mut Receivers<'s>,
    ) -> Option<u64> {
        let pending = self.mem.pending();
        let mut last = (0, now_ns());
        let mut ops_at_complete = None;
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let placed = self.mem.placed();
            progress(placed, pending);
            if let Some(c) = self.control {
                c.progress(placed, pending);
            }
            if self.stopped() {
                break;
            }
            if self.broken_now() {
                if let Err(e) = self.recover(s, receivers) {
                    self.fail(e);
                    break;
                }
                // The time spent reconnecting is not a stall.
                last = (self.mem.placed(), now_ns());
                continue;
            }
            match self.stall_check(placed, pending, &mut last) {
                Look::Watch => {}
                Look::Again => continue,
                Look::Stop => break,
            }
            // A vCPU that ends before it is asked to has failed: go and collect it.
            if ops_at_complete.is_none() && guest.a_vcpu_ended() {
                break;
            }
            if self.mem.complete() {
                if times.complete == 0 && !self.completed(times, &mut ops_at_complete) {
                    break;
                }
                if guest.finished() {
                    break;
                }
            }
        }
        // Where postcopy got to (a failed run reports it).
        progress(self.mem.placed(), pending);
        ops_at_complete
    }

    /// Nothing placed for the idle limit although pages are missing: a lost connection if
    /// nothing arrives on the background channel either (a partition, a stopped source;
    /// urgent frames would have been placed), recovered like any other break; else a stall.
    fn stall_check(&self, placed: u64, pending: u64, last: &mut (u64, u64)) -> Look {
        let idle = self.cfg.idle_timeout;
        if placed != last.0 {
            *last = (placed, now_ns());
            return Look::Watch;
        }
        if placed >= pending || now_ns() - last.1 <= idle.as_nanos() as u64 {
            return Look::Watch;
        }
        let silent = WireError::Timeout(Channel::Both, idle);
        let lost = self.channel_quiet(&self.bg_progress, idle);
        if lost && self.recoverable() {
            let n = self.conn.lock().unwrap_or_else(|p| p.into_inner()).number;
            self.conn_failed(silent.into(), n);
            return Look::Again;
        }
        self.fail(if lost {
            RunError::Wire(silent)
        } else {
            RunError::Stalled {
                received: placed,
                total: pending,
                idle,
            }
        });
        Look::Stop
    }

    /// Every page is in: notes when, asks the vCPUs to finish (counting their operations
    /// so far), and says `DONE` at once, whatever the guest still does (its final check,
    /// the rest of a slow stream), so that the source's idle limit never depends on how
    /// long the guest runs afterwards. False if `DONE` could not be sent.
    fn completed(&self, times: &mut Times, ops_at_complete: &mut Option<u64>) -> bool {
        times.complete = self.mem.last_placed_ns().max(times.resume);
        times.vmstat[1] = Vmstat::read().ok();
        if let Some(m) = self.machine {
            *ops_at_complete = Some(m.counters().iter().map(|c| c.ops).sum::<u64>());
            m.finish_all();
        }
        // Relaxed: see `fail`.
        self.finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.send_rp(RpKind::Done, &[]) {
            self.fail(e.into());
            return false;
        }
        // The source now sums every page for its summary: the idle limit counts from here,
        // not from the last page (a big guest's sums take a while).
        // Relaxed: a coarse timestamp.
        self.bg_progress
            .store(now_ns(), std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Joins the guest: the vCPUs' ends (a vCPU that stopped early or failed fails the
    /// run), or the thread guest's report.
    fn collect(
        &self,
        guest: Running<'_>,
        ops_at_complete: Option<u64>,
    ) -> Result<GuestOutcome, RunError> {
        let (m, vs) = match guest {
            Running::Kvm(m, vs) => (m, vs),
            Running::Thread(t) => {
                let (report, log, tid) = t
                    .join()
                    .unwrap_or_else(|_| (WorkloadReport::default(), FaultLog::default(), 0));
                return Ok(GuestOutcome::Thread { report, log, tid });
            }
        };
        if ops_at_complete.is_none() || self.stopped() {
            m.kick_all();
        }
        let mut failed = None;
        for (i, h) in vs.into_iter().enumerate() {
            match h.join() {
                Ok(VcpuEnd::Done) => {}
                Ok(VcpuEnd::Stopped(_)) if self.stopped() => {}
                Ok(VcpuEnd::Stopped(_)) => {
                    failed = Some(format!("vCPU {i} stopped before it finished"))
                }
                Ok(VcpuEnd::Failed(e)) => failed = Some(e),
                Err(_) => failed = Some(format!("vCPU {i} thread panicked")),
            }
        }
        if let Some(f) = failed {
            if !self.stopped() {
                self.fail(RunError::Guest(f.clone()));
            }
            return Err(RunError::Guest(f));
        }
        Ok(GuestOutcome::Kvm {
            counters: m.counters(),
            ops_at_complete: ops_at_complete.unwrap_or(0),
            tids: m.controls().iter().map(|c| c.tid()).collect(),
            tsc_khz: m.tsc_khz(),
        })
    }
}
