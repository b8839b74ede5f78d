//! Postcopy recovery at the destination: the guest keeps its memory and waits while the
//! connections are replaced.
//!
//! A receiver or a page request that finds its connection lost after the switch-over
//! ([`WireError::connection_lost`]) records the break, stops that connection's receivers and
//! shuts its sockets down (`Dest::conn_failed`); the guest is neither released nor kicked.
//! The main thread then (`Dest::recover`):
//! 1. joins the broken connection's receivers, so nothing is placed any more: the received
//!    bitmap it takes next is exact (frames that arrived but were not yet due on the emulated
//!    link are dropped with the connection, and counted as not received);
//! 2. reconnects to the source (or the `--reconnect` address) with backoff, until the
//!    recovery window closes, and resumes the session with that bitmap
//!    ([`handshake::resume`]);
//! 3. installs the new connections under the lock that serialises return-path writes, and
//!    starts their receivers;
//! 4. asks again for every page requested and not in place (the source dropped the broken
//!    connection's requests). A request sent meanwhile either went out on the old connection
//!    before the swap (then its bit is seen here, as the mutex orders them) or goes out on
//!    the new one.
//!
//! Errors from an old connection arriving late are told apart by the connection's number
//! and ignored.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use super::control::Command;
use super::{Dest, RunError};
use crate::handshake::{self, ConnectError};
use crate::sys::clock::{now_ns, sleep_until_unless, tight_timer_slack};
use crate::sys::pin::Role;
use crate::wire::{Channel, WireError};

/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First wait between reconnection attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// Longest wait for one connection attempt.
const CONNECT_LIMIT: Duration = Duration::from_secs(2);
/// Paused without a limit: how long one resume attempt waits for its answer (a source that
/// has not noticed the break yet answers once its own idle limit has passed; an operator's
/// command interrupts the wait).
const PAUSED_ANSWER: Duration = Duration::from_secs(30);

/// The current connections.
#[derive(Debug)]
pub(crate) struct Conn {
    /// Main connection (background channel, return path).
    pub main: Arc<TcpStream>,
    /// Urgent connection.
    pub urgent: Arc<TcpStream>,
    /// 0 for the first connections, one more for each resume.
    pub number: u16,
    /// The session token.
    pub token: u64,
}

impl Conn {
    /// Shuts both connections down (their receivers wake up).
    pub fn shutdown(&self) {
        let _ = self.main.shutdown(Shutdown::Both);
        let _ = self.urgent.shutdown(Shutdown::Both);
    }
}

/// One break of the connections that postcopy recovery survived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// What broke the connections.
    pub reason: String,
    /// When the break was noticed (destination clock, ns).
    pub detected_ns: u64,
    /// When postcopy resumed on new connections.
    pub resumed_ns: u64,
    /// Host pages still missing at the break (what the source was told it must send).
    pub missing_host_pages: u64,
    /// Pages asked for again on the new connections (still requested, not in place).
    pub rerequested: u64,
    /// Connection attempts it took.
    pub attempts: u32,
    /// A new source session took the paused session over (it answered with a new token):
    /// the source's counters start here.
    pub new_source: bool,
}

impl Cut {
    /// Time from the break to postcopy resumed, ns.
    pub fn recovery_ns(&self) -> u64 {
        self.resumed_ns.saturating_sub(self.detected_ns)
    }
}

/// A break of the current connections.
#[derive(Debug)]
pub(crate) struct Broken {
    /// What broke them, in words.
    pub reason: String,
    /// When (destination clock, ns).
    pub at_ns: u64,
    /// The error itself (taken when the break ends the run).
    pub error: Option<RunError>,
}

/// The receivers of the current connections.
pub(crate) struct Receivers<'s> {
    bg: Option<ScopedJoinHandle<'s, ()>>,
    urgent: Option<ScopedJoinHandle<'s, ()>>,
}

impl<'s> Receivers<'s> {
    /// The background receiver (it ends with the summary).
    pub fn take_background(&mut self) -> Option<ScopedJoinHandle<'s, ()>> {
        self.bg.take()
    }

    fn join(&mut self) {
        for h in [self.bg.take(), self.urgent.take()].into_iter().flatten() {
            let _ = h.join();
        }
    }
}

impl Dest<'_> {
    /// Starts the receivers of the current connections.
    pub(super) fn spawn_receivers<'s>(&'s self, s: &'s Scope<'s, '_>) -> Receivers<'s> {
        let (main, urgent, n) = {
            let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            (Arc::clone(&c.main), Arc::clone(&c.urgent), c.number)
        };
        let pin = self.cfg.pin;
        let bg = s.spawn(move || {
            pin.apply_named(Role::BackgroundReceiver);
            tight_timer_slack();
            if let Err(e) = self.receiver(&main, Channel::Background) {
                self.conn_failed(e, n);
            }
        });
        let urgent = s.spawn(move || {
            pin.apply_named(Role::UrgentReceiver);
            tight_timer_slack();
            if let Err(e) = self.receiver(&urgent, Channel::Urgent) {
                self.conn_failed(e, n);
            }
        });
        Receivers {
            bg: Some(bg),
            urgent: Some(urgent),
        }
    }

    /// Whether a lost connection may be recovered rather than end the run: recovery is on,
    /// the run goes on, and `DONE` has not been sent.
    pub(super) fn recoverable(&self) -> bool {
        // Relaxed: `finished` only decides whether a closed channel is an error.
        !self.cfg.recover_timeout.is_zero()
            && !self.stopped()
            && !self.finished.load(Ordering::Relaxed)
    }

    /// Whether the switch-over has been applied (the guest runs here, in postcopy).
    pub(super) fn switched(&self) -> bool {
        self.switch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// A thread working on connection `number` failed with `e`. A lost connection is marked
    /// broken, for the main thread to recover: in postcopy both connections are stopped at
    /// once; before the switch-over has been applied the background receiver reads on (the
    /// switch-over may be among what arrived before the break, and recovery needs it), and
    /// the main thread decides once it has ended. Anything else fails the run.
    pub(super) fn conn_failed(&self, e: RunError, number: u16) {
        let lost = matches!(&e, RunError::Wire(w) if w.connection_lost());
        if !lost || !self.recoverable() {
            return self.fail(e);
        }
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if c.number != number {
            return; // a late error of a connection already replaced
        }
        let mut b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_none() {
            *b = Some(Broken {
                reason: e.to_string(),
                at_ns: now_ns(),
                error: Some(e),
            });
        }
        drop(b);
        if self.switched() {
            // Relaxed: a polled flag; the shutdowns wake the receivers.
            self.conn_stop.store(true, Ordering::Relaxed);
            c.shutdown();
        }
    }

    /// Whether the current connections broke.
    pub(super) fn broken_now(&self) -> bool {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Before the switch-over: the connections broke and the background receiver has ended
    /// without bringing the switch-over, so there is no postcopy state to resume (the
    /// source still has the whole guest): the break's error, to end the run with.
    pub(super) fn broken_before_switch(&self, receivers: &Receivers<'_>) -> Option<RunError> {
        if receivers.bg.as_ref().is_some_and(|h| !h.is_finished()) || self.switched() {
            return None;
        }
        let mut b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        b.as_mut().and_then(|b| b.error.take())
    }

    /// In postcopy, once the connections broke: stops them (a break found before the
    /// switch-over was applied left them running).
    pub(super) fn stop_broken(&self) {
        // Relaxed: a polled flag; the shutdowns wake the receivers.
        self.conn_stop.store(true, Ordering::Relaxed);
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }

    /// Paused without a limit: tells the operator (stderr) what happened and how to resume
    /// the guest from another source, or give it up.
    fn say_paused(&self, cut: &str, to: SocketAddr, missing: u64) {
        let ctl = match self.control {
            Some(c) => format!(
                "; to resume from another source: pagehint-migrate recover --dest {p} --connect ADDR; to give up: pagehint-migrate recover --dest {p} --abort",
                p = c.path().display()
            ),
            None => " (no --control socket: it can only come back there)".to_string(),
        };
        eprintln!(
            "postcopy paused: {cut}; the guest waits with {missing} host pages still at the source; retrying {to}{ctl}"
        );
    }

    /// Replaces the broken connections and resumes postcopy (see the module).
    pub(super) fn recover<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        receivers: &mut Receivers<'s>,
    ) -> Result<(), RunError> {
        let Some((cut, detected)) = self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|b| (b.reason.clone(), b.at_ns))
        else {
            return Ok(());
        };
        self.stop_broken();
        receivers.join();
        let received = self.mem.received_bitmap();
        let missing = self.mem.pending().saturating_sub(self.mem.placed());
        let token = self.conn.lock().unwrap_or_else(|p| p.into_inner()).token;
        let resumed = self.reconnect(&cut, detected, token, &received, missing)?;
        let (to, attempts) = (resumed.to, resumed.attempts);
        *self.resume_to.lock().unwrap_or_else(|p| p.into_inner()) = to;
        if let Some(c) = self.control {
            c.doing(format!("postcopy (resumed from {to})"));
        }
        if self.cfg.recover_paused {
            eprintln!("postcopy resumed from {to} after {attempts} attempt(s)");
        }
        let new_token = resumed.token;
        self.install(resumed);
        *receivers = self.spawn_receivers(s);
        let again = self.mem.requested_missing();
        for &hp in &again {
            // Which stream first asked is not kept: a hint is only advisory, and the new
            // scheduler's slots start empty.
            self.request(hp, 0)?;
        }
        self.cuts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Cut {
                reason: cut,
                detected_ns: detected,
                resumed_ns: now_ns(),
                missing_host_pages: missing,
                rerequested: again.len() as u64,
                attempts,
                new_source: new_token != token,
            });
        Ok(())
    }

    /// Step 2: reconnects (with backoff) and resumes the session `token` with the `received`
    /// bitmap, until the recovery window after `detected` closes (paused: until the operator
    /// gives up): the new connections.
    fn reconnect(
        &self,
        cut: &str,
        detected: u64,
        token: u64,
        received: &[u64],
        missing: u64,
    ) -> Result<Resumed, RunError> {
        let window = self.cfg.recover_timeout.as_nanos() as u64;
        let idle = self.cfg.idle_timeout;
        let paused = self.cfg.recover_paused;
        let mut to = *self.resume_to.lock().unwrap_or_else(|p| p.into_inner());
        let never = AtomicBool::new(false);
        // A command from the operator interrupts an attempt or a wait.
        let interrupt = self.control.map_or(&never, |c| c.interrupt());
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        let mut last_error = String::from("no attempt yet");
        let tell = |to: SocketAddr, attempts: u32, last: &str| {
            if let Some(c) = self.control {
                c.paused(format!(
                    "{cut}; retrying {to} ({attempts} attempts; the last: {last})"
                ));
            }
        };
        tell(to, 0, &last_error);
        if paused {
            self.say_paused(cut, to, missing);
        }
        let (main, urgent, new_token) = loop {
            if self.stopped() {
                return Err(RunError::Wire(WireError::Stopped));
            }
            self.take_command(cut, &mut to, &mut backoff, attempts, &last_error)?;
            let left = if paused {
                u64::MAX
            } else {
                window.saturating_sub(now_ns() - detected)
            };
            if left == 0 {
                return Err(RunError::Recovery {
                    cut: cut.to_string(),
                    why: format!(
                        "the source did not take the session back within {:?} ({attempts} attempts; the last: {last_error})",
                        self.cfg.recover_timeout
                    ),
                });
            }
            attempts += 1;
            let connect = Duration::from_nanos(left).min(CONNECT_LIMIT);
            let answer = if paused {
                idle.max(PAUSED_ANSWER)
            } else {
                Duration::from_nanos(left).max(idle)
            };
            match handshake::resume(to, &self.hello, token, received, connect, answer, interrupt) {
                Ok(c) => break c,
                Err(e) => match failed_attempt(e, to, paused, cut)? {
                    Some(error) => last_error = error,
                    // A command came meanwhile: act on it.
                    None => continue,
                },
            }
            tell(to, attempts, &last_error);
            let until = now_ns() + backoff.min(Duration::from_nanos(left)).as_nanos() as u64;
            // Relaxed: a polled flag.
            sleep_until_unless(until, || {
                interrupt.load(Ordering::Relaxed) || self.stopped()
            });
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        Ok(Resumed {
            main,
            urgent,
            token: new_token,
            to,
            attempts,
        })
    }

    /// Acts on the operator's command, if one came: gives up on an abort; a new address
    /// (`to`) starts the backoff again.
    fn take_command(
        &self,
        cut: &str,
        to: &mut SocketAddr,
        backoff: &mut Duration,
        attempts: u32,
        last_error: &str,
    ) -> Result<(), RunError> {
        match self.control.and_then(|c| c.take()) {
            Some(Command::Abort) => {
                return Err(RunError::Recovery {
                    cut: cut.to_string(),
                    why: format!(
                        "given up by the operator ({attempts} attempts; the last: {last_error})"
                    ),
                })
            }
            Some(Command::Recover(a)) => {
                *to = a;
                *backoff = FIRST_BACKOFF;
            }
            None => {}
        }
        Ok(())
    }

    /// Step 3: installs the resumed connections (their receivers not started yet).
    fn install(&self, resumed: Resumed) {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        c.main = Arc::new(resumed.main);
        c.urgent = Arc::new(resumed.urgent);
        c.number = c.number.saturating_add(1);
        c.token = resumed.token;
        self.mem.set_connection(c.number);
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Relaxed (all three): no receiver runs; the spawns that follow order these stores
        // before the new receivers' loads.
        self.conn_stop.store(false, Ordering::Relaxed);
        self.bg_progress.store(now_ns(), Ordering::Relaxed);
        self.urgent_progress.store(now_ns(), Ordering::Relaxed);
    }
}

/// A session resumed after a break.
struct Resumed {
    /// The new main connection.
    main: TcpStream,
    /// The new urgent connection.
    urgent: TcpStream,
    /// The session token from now on.
    token: u64,
    /// The source that took the session back.
    to: SocketAddr,
    /// Resume attempts made.
    attempts: u32,
}

/// What a failed resume attempt to `to` means: `Ok(Some(why))` to try again after the backoff,
/// `Ok(None)` to act on an operator's command at once, `Err` to give up.
fn failed_attempt(
    e: ConnectError,
    to: SocketAddr,
    paused: bool,
    cut: &str,
) -> Result<Option<String>, RunError> {
    match e {
        ConnectError::Wire(WireError::Stopped) => Ok(None),
        ConnectError::Refused(r) if paused => Ok(Some(format!("{to} refused: {r}"))),
        ConnectError::Refused(r) => Err(RunError::Recovery {
            cut: cut.to_string(),
            why: format!("the source refused to resume: {r}"),
        }),
        ConnectError::Wire(w) if w.connection_lost() || paused => Ok(Some(format!("{to}: {w}"))),
        ConnectError::Wire(w) => Err(RunError::Recovery {
            cut: cut.to_string(),
            why: w.to_string(),
        }),
    }
}
