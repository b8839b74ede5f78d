//! The migration source: guest RAM and (KVM guest) the running VM, precopy, the switch-over,
//! and the `pagehint` scheduler behind two TCP channels in postcopy.
//!
//! The listening source ([`SourceServer`]) serves every connection's handshake at once at
//! its [`door`] (each its own deadline, a bounded number pending, refusals with the reason)
//! and runs each session on its own thread, up to `--max-sessions` at once; a session's
//! urgent and resume connections reach it through its [`door::Doorway`]. With a RAM
//! directory ([`saved`]) a session's RAM lives in a file and a paused session can be taken
//! over by a later source.
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
//! source waits (up to the hello's recovery window, within `--max-recover`) for the
//! destination to come back with a resume hello, its received bitmap and a new urgent
//! connection ([`door::Doorway::paused`]). The scheduler then rebuilds every block from that bitmap
//! ([`PageScheduler::recover_block`](pagehint::PageScheduler::recover_block): dirty = not
//! received; the broken connection's hint and queued requests are dropped), and postcopy
//! goes on in the same mode on the new connections, as many times as it takes.
//!
//! Any failure stops every thread and ends the session with a typed error; the reason goes
//! to the destination in an `ABORT` frame before the connections close (except the test
//! hook's drop, which cuts them as a crash would).

pub mod door;
pub mod memory;
pub mod postcopy;
pub mod precopy;
pub mod rate_limit;
pub mod saved;
pub mod send;
pub mod trace;

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
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
use crate::guest::{GuestWait, STREAM_FRAME_PAGES};
use crate::handshake::{self, HANDSHAKE_DEADLINE};
use crate::link::Link;
use crate::options::{DirtyTracking, GuestKind, MigrationMode, SourceFault};
use crate::sys::clock::{now_ns, tight_timer_slack};
use crate::sys::pin::{PinPlan, Role};
use crate::wire::{
    switch::PrecopyKvm, write_parts, Channel, FrameHeader, Guard, Hello, PendingBuilder,
    PendingSet, Summary, SwitchOver, WireError,
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
    /// It took over a session an earlier source saved.
    pub takeover: bool,
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

/// The longest a listening source holds a paused session by default (`--max-recover`),
/// whatever its destination asks for.
pub const DEFAULT_MAX_RECOVER: Duration = Duration::from_secs(30);

/// Live sessions a listening source serves at once by default (`--max-sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = 4;

/// How a listening source serves: its own limits (each destination's hello asks for the
/// rest, within them).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Thread placement.
    pub pin: PinPlan,
    /// Longest silence of a peer (`--timeout`).
    pub idle: Duration,
    /// Longest a session stays paused for its destination after a break, whatever the
    /// hello asks for (`--max-recover`).
    pub max_recover: Duration,
    /// Live sessions at once (`--max-sessions`); one more is refused, saying so.
    pub max_sessions: usize,
    /// Connections waiting to say hello at once; one more is refused, saying so.
    pub max_pending: usize,
    /// Keep each session's guest RAM in a file here, and save paused sessions for a later
    /// source to take over (`--ram-dir`, see [`saved`]).
    pub ram_dir: Option<std::path::PathBuf>,
    /// Send the background stream under QEMU's 100 ms-window rate limiter at this many
    /// bits/s instead of pagehint's transport (0: not; `--qemu-rate-limit`, see
    /// [`rate_limit`]).
    pub qemu_rate_limit_bps: u64,
}

impl ServeOptions {
    /// The defaults, with `pin` and `idle`.
    pub fn new(pin: PinPlan, idle: Duration) -> Self {
        Self {
            pin,
            idle,
            max_recover: DEFAULT_MAX_RECOVER,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_pending: door::MAX_PENDING,
            ram_dir: None,
            qemu_rate_limit_bps: 0,
        }
    }
}

/// What a listening source reports as it serves, one line each ([`std::fmt::Display`]).
#[derive(Debug)]
pub enum ServerEvent {
    /// Connections refused before they were sessions: the first of a kind each second
    /// (with its peer), then how many `more` were refused the same way meanwhile.
    Refused {
        /// Who (None: a count of several).
        peer: Option<SocketAddr>,
        /// Why.
        why: String,
        /// How many more, not logged one by one.
        more: u64,
    },
    /// A session's handshake is done: the migration starts.
    Started {
        /// The session's number.
        number: u64,
        /// What it migrates, in words.
        what: String,
    },
    /// A session's connections broke in postcopy: it is held paused.
    Paused {
        /// The session's number.
        number: u64,
        /// What broke them.
        why: String,
        /// How long the source holds it.
        hold: Duration,
        /// How long its destination asked for.
        asked: Duration,
    },
    /// A paused session resumed on new connections.
    Resumed {
        /// The session's number.
        number: u64,
        /// How long it was paused.
        after: Duration,
        /// Target pages left to send.
        left: u64,
    },
    /// A session ended.
    Ended {
        /// The session's number.
        number: u64,
        /// What it did, or why it failed.
        result: Result<Box<SessionReport>, SourceError>,
    },
    /// Anything else worth a line.
    Note(String),
}

impl std::fmt::Display for ServerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused {
                peer: Some(p), why, ..
            } => write!(f, "refused a connection from {p}: {why}"),
            Self::Refused {
                peer: None,
                why,
                more: 0,
            } => write!(f, "could not take a connection: {why}"),
            Self::Refused {
                peer: None,
                why,
                more,
            } => write!(
                f,
                "refused {more} more connection{} meanwhile (the last: {why})",
                if *more == 1 { "" } else { "s" }
            ),
            Self::Started { number, what } => write!(f, "session {number}: started: {what}"),
            Self::Paused {
                number,
                why,
                hold,
                asked,
            } => {
                write!(
                    f,
                    "session {number}: paused ({why}); holding it up to {hold:?} for its destination to resume it"
                )?;
                if asked > hold && asked.as_secs() > 1 << 40 {
                    write!(f, " (it asked for no limit; --max-recover caps it)")?;
                } else if asked > hold {
                    write!(f, " (it asked for {asked:?}; --max-recover caps it)")?;
                }
                Ok(())
            }
            Self::Resumed {
                number,
                after,
                left,
            } => write!(
                f,
                "session {number}: resumed after {:.1} ms paused, {left} target pages left to send",
                after.as_secs_f64() * 1e3
            ),
            Self::Ended {
                number,
                result: Ok(rep),
            } => {
                let s = &rep.summary.stats;
                write!(
                    f,
                    "session {number}: {}{} of {} MiB done: {} pages urgent, {} background, {} hints taken, {} bad requests rejected",
                    rep.mode,
                    if rep.takeover { " (taken over)" } else { "" },
                    rep.mem >> 20,
                    s.urgent_pages,
                    s.background_pages,
                    s.hints_taken,
                    s.bad_requests,
                )?;
                if let Some(m) = rep.summary.rejected.first() {
                    write!(f, " (first: {m})")?;
                }
                match rep.recoveries() {
                    0 => Ok(()),
                    k => write!(f, "; resumed after {k} broken connection(s)"),
                }
            }
            Self::Ended {
                number,
                result: Err(e),
            } => write!(f, "session {number} failed: {e}"),
            Self::Note(n) => f.write_str(n),
        }
    }
}

/// The listening source: every connection's handshake at once ([`door`]), up to
/// `max_sessions` sessions at once, each on its own thread.
#[derive(Debug)]
pub struct SourceServer {
    listener: TcpListener,
    opts: ServeOptions,
    /// Serialises preparations, so that each memory check sees the sessions before it.
    preparing: Mutex<()>,
}

impl SourceServer {
    /// Listens on `addr`, with the default limits.
    pub fn bind(addr: impl ToSocketAddrs, pin: PinPlan, idle: Duration) -> std::io::Result<Self> {
        Self::bind_with(addr, ServeOptions::new(pin, idle))
    }

    /// Listens on `addr`, serving as `opts` says.
    pub fn bind_with(addr: impl ToSocketAddrs, opts: ServeOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        crate::sys::fds::set_backlog(&listener, crate::sys::fds::BACKLOG)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            opts,
            preparing: Mutex::new(()),
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

    /// The checks of a hello that only this source can make: its link drains within this
    /// source's idle limit.
    fn check_hello(&self, h: &Hello) -> Result<(), String> {
        h.link
            .for_transport(&h.transport())
            .check(
                self.opts.idle,
                crate::link::frame_max(h.guest.layout.host_page().bytes()),
            )
            .map_err(|e| format!("{e} (the source's --timeout)"))
    }

    /// The RAM file of session `token` (`--ram-dir`), created at the guest's size.
    fn ram_file(&self, token: u64, h: &Hello) -> Result<Option<std::fs::File>, String> {
        let Some(dir) = &self.opts.ram_dir else {
            return Ok(None);
        };
        let (path, _) = saved::paths(dir, token);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|f| f.set_len(h.guest.layout.mem()).map(|_| f))
            .map_err(|e| format!("the RAM file {}: {e}", path.display()))?;
        Ok(Some(f))
    }

    fn prepare(&self, h: &Hello, token: u64) -> Result<Prepared, String> {
        let _one = self.preparing.lock().unwrap_or_else(|e| e.into_inner());
        self.check_hello(h)?;
        let layout = &h.guest.layout;
        Self::check_memory(layout)?;
        let pieces = boot::system_pieces(layout)?;
        let params = Params::new(layout, h.workload, h.guest.seed, STREAM_FRAME_PAGES);
        let file = self.ram_file(token, h)?;
        let mem = SourceMemory::new(layout, h.guest.seed, &pieces, &params, file.as_ref())?;
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
                    DirtyTracking::LogManual => Tracking::LogManual,
                    DirtyTracking::Ring => Tracking::Ring(RING_BYTES),
                };
                // SAFETY: `mem` outlives the machine (`Prepared`'s field order drops the
                // machine first).
                let (m, rings) = unsafe { Machine::new(layout, mem.hosts(), tracking) }
                    .map_err(|e| format!("source VM: {e}"))?;
                m.boot(h.guest.seed)
                    .map_err(|e| format!("source VM: {e}"))?;
                m.set_stream_rate(
                    h.workload
                        .stream_rate_each(h.guest.stream_rate, layout.vcpus()),
                    STREAM_FRAME_PAGES,
                );
                (Some(m), rings)
            }
        };
        Ok(Prepared {
            machine,
            rings,
            mem,
        })
    }

    /// Serves sessions until `stop` is raised, or until `sessions` migrations have been
    /// served (a session counts once its handshake is done, whether it then succeeds or
    /// fails; a connection that never completes one does not count), reporting with `log`.
    /// Every connection's handshake is served at once by the door; each session runs on its
    /// own thread.
    pub fn serve(
        &self,
        stop: &AtomicBool,
        sessions: Option<u64>,
        log: &(dyn Fn(ServerEvent) + Sync),
    ) {
        let saved = match &self.opts.ram_dir {
            None => Vec::new(),
            Some(dir) => match saved::Saved::scan(dir) {
                Ok((found, bad)) => {
                    for b in bad {
                        log(ServerEvent::Note(format!(
                            "--ram-dir: not a saved session: {b}"
                        )));
                    }
                    for s in &found {
                        log(ServerEvent::Note(format!(
                            "found paused session {:016x} ({} MiB, {}) saved by an earlier source in {}: waiting for its destination to resume it",
                            s.token,
                            s.hello.guest.layout.mem() >> 20,
                            s.hello.mode,
                            dir.display()
                        )));
                    }
                    found
                }
                Err(e) => {
                    log(ServerEvent::Note(e));
                    Vec::new()
                }
            },
        };
        // Each pending connection holds a descriptor, and so does each lingering refusal:
        // what waits is bounded by what this process may hold, beside its sessions'.
        let max_pending = match crate::sys::fds::raise_limit() {
            Ok(n) => self
                .opts
                .max_pending
                .min((n.saturating_sub(256) / 2) as usize),
            Err(e) => {
                log(ServerEvent::Note(format!("the descriptor limit: {e}")));
                self.opts.max_pending.min(256)
            }
        };
        let door = door::Door::new(
            &self.listener,
            door::DoorLimits {
                max_sessions: self.opts.max_sessions.max(1),
                max_pending: max_pending.max(1),
                deadline: HANDSHAKE_DEADLINE.min(self.opts.idle),
            },
            saved,
        );
        let admitted = Admitted {
            n: AtomicU64::new(0),
            limit: sessions,
        };
        let done = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let door = &door;
            let (done, admitted) = (&done, &admitted);
            s.spawn(move || door.run(stop, done, &tx, log));
            let mut running: Vec<std::thread::ScopedJoinHandle<'_, ()>> = Vec::new();
            loop {
                running.retain(|h| !h.is_finished());
                // Relaxed: a polled flag.
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if admitted.full() {
                    door.stop_accepting();
                    if running.is_empty() && door.live() == 0 {
                        break;
                    }
                }
                match rx.recv_timeout(crate::wire::POLL_SLICE) {
                    Ok(new) => {
                        running.push(s.spawn(move || {
                            self.session(door, new, stop, admitted, log);
                        }));
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            // Relaxed: a polled flag; the scope joins the door and the sessions.
            done.store(true, Ordering::Relaxed);
        });
    }

    /// One session, from its main connection (or a takeover) to its end, logged.
    fn session<'d>(
        &self,
        door: &'d door::Door<'d>,
        new: door::NewSession<'d>,
        stop: &AtomicBool,
        admitted: &Admitted,
        log: &(dyn Fn(ServerEvent) + Sync),
    ) {
        let ctx = Ctx {
            door,
            stop,
            admitted,
            log,
        };
        let (number, result) = match new {
            door::NewSession::Main {
                conn,
                hello,
                doorway,
            } => {
                let r = self.new_session(&ctx, conn, hello, &doorway);
                (doorway.number(), r)
            }
            door::NewSession::Takeover {
                conn,
                received,
                saved,
                doorway,
            } => {
                let r = self.takeover(&ctx, conn, received, saved, &doorway);
                (doorway.number(), r)
            }
        };
        if let Some(r) = result {
            log(ServerEvent::Ended {
                number,
                result: r.map(Box::new),
            });
        }
    }

    /// A new session: prepared, answered, its urgent connection taken, then run. None when
    /// it never became one (refused, or its destination went away during the handshake).
    fn new_session(
        &self,
        ctx: &Ctx<'_, '_>,
        conn: TcpStream,
        hello: Hello,
        doorway: &door::Doorway<'_>,
    ) -> Option<Result<SessionReport, SourceError>> {
        let token = doorway.token();
        let prepared = match self.prepare(&hello, token) {
            Ok(p) => p,
            Err(why) => {
                self.drop_ram(token);
                ctx.log(ServerEvent::Refused {
                    peer: conn.peer_addr().ok(),
                    why: why.clone(),
                    more: 0,
                });
                doorway.refuse(&conn, why);
                return None;
            }
        };
        doorway.expect_urgent();
        let urgent = doorway
            .accept(&conn)
            .and_then(|()| doorway.urgent(ctx.stop, HANDSHAKE_DEADLINE.min(self.opts.idle)));
        let urgent = match urgent {
            Ok(u) => u,
            Err(e) => {
                self.drop_ram(token);
                if !matches!(e, SourceError::Wire(WireError::Stopped)) {
                    ctx.log(ServerEvent::Refused {
                        peer: conn.peer_addr().ok(),
                        why: e.to_string(),
                        more: 0,
                    });
                }
                return None;
            }
        };
        let Some(number) = ctx.admitted.admit() else {
            self.drop_ram(token);
            doorway.refuse(
                &urgent,
                "the source takes no more sessions (it has started the last of its --sessions)"
                    .into(),
            );
            return None;
        };
        doorway.set_number(number);
        if let Err(e) = doorway.accept(&urgent) {
            self.drop_ram(token);
            return Some(Err(e));
        }
        ctx.log(ServerEvent::Started {
            number: doorway.number(),
            what: describe(&hello, conn.peer_addr().ok()),
        });
        Some(self.run_session(ctx, doorway, hello, conn, urgent, prepared, None))
    }

    /// A session an earlier source saved, taken over: its RAM file mapped, the resume
    /// answered with a new token (the files renamed to it), its urgent connection taken,
    /// then postcopy from the received bitmap.
    fn takeover(
        &self,
        ctx: &Ctx<'_, '_>,
        conn: TcpStream,
        received: Vec<u64>,
        old: saved::Saved,
        doorway: &door::Doorway<'_>,
    ) -> Option<Result<SessionReport, SourceError>> {
        let dir = self.opts.ram_dir.clone().unwrap_or_else(|| ".".into());
        let token = doorway.token();
        let (ram, _) = saved::paths(&dir, token);
        let opened = std::fs::rename(&old.ram, &ram)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&ram)
            })
            .map_err(|e| format!("the saved RAM {}: {e}", old.ram.display()))
            .and_then(|f| {
                let mem = SourceMemory::open(old.hello.guest.layout.clone(), &f)?;
                let now = saved::Saved::write(&dir, token, &old.hello)?;
                let _ = std::fs::remove_file(&old.state);
                Ok((mem, now))
            });
        let (mem, now) = match opened {
            Ok(m) => m,
            Err(why) => {
                ctx.log(ServerEvent::Note(format!(
                    "saved session {:016x} could not be taken over: {why}",
                    old.token
                )));
                doorway.refuse(
                    &conn,
                    format!("the saved session could not be taken over: {why}"),
                );
                return None;
            }
        };
        doorway.expect_urgent();
        let urgent = doorway
            .accept(&conn)
            .and_then(|()| doorway.urgent(ctx.stop, HANDSHAKE_DEADLINE.min(self.opts.idle)))
            .and_then(|u| {
                if let Some(n) = ctx.admitted.admit() {
                    doorway.set_number(n);
                    doorway.accept(&u).map(|()| u)
                } else {
                    doorway.refuse(&u, "the source takes no more sessions".into());
                    Err(SourceError::Handshake(
                        "the source takes no more sessions".into(),
                    ))
                }
            });
        let urgent = match urgent {
            Ok(u) => u,
            Err(_) => {
                // Still saved: a later attempt may take it over.
                ctx.door.keep_saved(now);
                return None;
            }
        };
        ctx.log(ServerEvent::Started {
            number: doorway.number(),
            what: format!(
                "took over session {:016x} ({}) saved by an earlier source",
                old.token,
                describe(&old.hello, conn.peer_addr().ok())
            ),
        });
        let prepared = Prepared {
            machine: None,
            rings: Vec::new(),
            mem,
        };
        Some(self.run_session(
            ctx,
            doorway,
            old.hello,
            conn,
            urgent,
            prepared,
            Some((received, now)),
        ))
    }

    /// Removes session `token`'s RAM file, if there is one.
    fn drop_ram(&self, token: u64) {
        if let Some(dir) = &self.opts.ram_dir {
            let _ = std::fs::remove_file(saved::paths(dir, token).0);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_session(
        &self,
        ctx: &Ctx<'_, '_>,
        doorway: &door::Doorway<'_>,
        hello: Hello,
        main: TcpStream,
        urgent: TcpStream,
        prepared: Prepared,
        takeover: Option<(Vec<u64>, saved::Saved)>,
    ) -> Result<SessionReport, SourceError> {
        let Prepared {
            machine,
            rings,
            mem,
        } = prepared;
        let same_clock = hello.boot_id == crate::sys::clock::boot_id();
        crate::link::configure_background(&main, &hello.link, &hello.transport())
            .map_err(|e| SourceError::Wire(WireError::Io(Channel::Background, e)))?;
        let asked = Duration::from_millis(hello.recover_ms);
        let (received, saved) = match takeover {
            Some((r, s)) => (Some(r), Some(s)),
            None => (None, None),
        };
        let hooks = if received.is_some() {
            // The test hooks were the earlier session's to run.
            crate::options::SourceHooks::NONE
        } else {
            hello.hooks
        };
        let mut session = Session {
            doorway,
            ram_dir: self.opts.ram_dir.as_deref(),
            saved,
            held_out: false,
            hold: asked.min(self.opts.max_recover),
            log: ctx.log,
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
                    corrupt_pending: AtomicBool::new(hooks.fault == SourceFault::CorruptPage),
                    drop_after: hooks.drop_after,
                    cut_after: hooks.cut_after,
                    cuts_left: hooks.cuts,
                    cut_base: 0,
                    cut_fired: AtomicBool::new(false),
                },
                torn_main: AtomicBool::new(false),
            },
            same_clock,
            pin: self.opts.pin,
            idle: self.opts.idle,
            outer_stop: ctx.stop,
            stop: AtomicBool::new(false),
            bg_progress: AtomicU64::new(now_ns()),
            qemu_rate_limit_bps: self.opts.qemu_rate_limit_bps,
            rejected: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            trace: trace::Trace::new(
                hello.guest.layout.mem() / hello.guest.layout.host_page().bytes(),
            ),
        };
        let takeover = received.is_some();
        let summary = match received {
            None => session.run(rings),
            Some(r) => session.run_takeover(r),
        };
        // The RAM files: kept where the destination may still come back (it did not within
        // the hold, or this process is stopping), else removed.
        let keep = session.held_out
            || (summary.is_err() && session.saved.is_some() && ctx.stop.load(Ordering::Relaxed));
        match (session.saved.take(), keep) {
            (Some(s), true) => {
                doorway.ended(format!(
                    "was saved in {} for a later resume",
                    s.state
                        .parent()
                        .unwrap_or(std::path::Path::new("."))
                        .display()
                ));
                ctx.door.keep_saved(s);
            }
            (Some(s), false) => s.remove(),
            (None, _) => self.drop_ram(doorway.token()),
        }
        if session.held_out && session.ram_dir.is_none() {
            doorway.ended(format!(
                "was given up: its destination did not resume it within {:?}",
                session.hold
            ));
        }
        let summary = summary?;
        drop(machine);
        Ok(SessionReport {
            mode: hello.mode,
            mem: hello.guest.layout.mem(),
            summary,
            takeover,
        })
    }
}

/// What every session thread of one `serve` shares.
struct Ctx<'a, 'd> {
    door: &'d door::Door<'d>,
    stop: &'a AtomicBool,
    admitted: &'a Admitted,
    log: &'a (dyn Fn(ServerEvent) + Sync),
}

impl Ctx<'_, '_> {
    fn log(&self, e: ServerEvent) {
        (self.log)(e)
    }
}

/// Sessions whose handshake is done, against `--sessions`.
struct Admitted {
    n: AtomicU64,
    limit: Option<u64>,
}

impl Admitted {
    /// Counts one more session, unless the limit is reached: its number (1, 2, ...).
    fn admit(&self) -> Option<u64> {
        // Relaxed: a counter; only its own value is read and written.
        self.n
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                self.limit.is_none_or(|l| n < l).then_some(n + 1)
            })
            .ok()
            .map(|n| n + 1)
    }

    /// Whether the limit is reached.
    fn full(&self) -> bool {
        // Relaxed: a counter compared with the limit.
        self.limit
            .is_some_and(|l| self.n.load(Ordering::Relaxed) >= l)
    }
}

/// A session's hello in words, for the log.
fn describe(h: &Hello, peer: Option<SocketAddr>) -> String {
    format!(
        "{} / {} of a {} MiB {} guest{}",
        h.workload,
        h.mode,
        h.guest.layout.mem() >> 20,
        h.guest.kind,
        peer.map(|p| format!(" for {p}")).unwrap_or_default()
    )
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
    /// The destination did not complete the handshake in time (the session is released).
    Handshake(String),
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
            Self::Handshake(s) => f.write_str(s),
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
    /// The session's registration: where its destination resumes it.
    doorway: &'a door::Doorway<'a>,
    /// Where its RAM file lives (`--ram-dir`), to save the session at the switch-over.
    ram_dir: Option<&'a std::path::Path>,
    /// The session as saved there (from the switch-over on).
    saved: Option<saved::Saved>,
    /// How long it is held paused after a break (the hello's ask, within `--max-recover`).
    hold: Duration,
    /// Its destination did not come back within `hold`.
    held_out: bool,
    /// The server's log.
    log: &'a (dyn Fn(ServerEvent) + Sync),
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
    /// QEMU's rate limiter at this many bits/s (0: none), see [`rate_limit`].
    qemu_rate_limit_bps: u64,
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
        // or a frame out of place, and the pongs are whole unless a write failed. A
        // destination sends them at once: the handshake's deadline, not the idle limit.
        let g = Guard {
            idle: self.idle.min(HANDSHAKE_DEADLINE),
            ..self.guard(false)
        };
        if let Err(e) = handshake::answer_pings_until_start(&self.out.main, &g) {
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

    /// Runs a session taken over from a saved one: postcopy from the destination's received
    /// bitmap; a failure is told to the destination before the connections close.
    fn run_takeover(&mut self, received: Vec<u64>) -> Result<Summary, SourceError> {
        self.out.sent.end_precopy();
        let r = self.finish(Some(received));
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
        // From here the guest's RAM at the source is final: with a RAM directory, the session
        // is saved beside it before the destination can be in postcopy.
        if let Some(dir) = self.ram_dir {
            let saved = saved::Saved::write(dir, self.doorway.token(), self.hello)
                .map_err(SourceError::Memory)?;
            self.saved = Some(saved);
        }
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
        self.finish(None)
    }

    /// Postcopy (from the received bitmap of a takeover, if any) to the summary, sent.
    fn finish(&mut self, received: Option<Vec<u64>>) -> Result<Summary, SourceError> {
        let (stats, streams) = self.postcopy(received)?;
        let (checksums, generations) = self.sums()?;
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
            streams,
        };
        let body = summary.encode();
        let h = FrameHeader::summary(body.len());
        self.out
            .frame(h, &body, Channel::Background, &self.guard(false))?;
        let _ = self.out.main.shutdown(Shutdown::Write);
        let _ = self.out.urgent.shutdown(Shutdown::Both);
        Ok(summary)
    }

    /// After `DONE`: the checksum of every page and (KVM guest) the generation table, while
    /// a `PONG` goes out on the main connection every slice, so that the destination's idle
    /// limit does not run out while a big guest is summed.
    fn sums(&self) -> Result<(Vec<u64>, Vec<u32>), SourceError> {
        let summed = AtomicBool::new(false);
        let sums = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let c = self.mem.checksums();
                let r = match self.hello.guest.kind {
                    GuestKind::Kvm => self.mem.generations(),
                    GuestKind::Thread => Ok(Vec::new()),
                }
                .map(|g| (c, g));
                // Relaxed: a polled flag; the join below waits for the result.
                summed.store(true, Ordering::Relaxed);
                r
            });
            let mut next = now_ns() + crate::wire::POLL_SLICE.as_nanos() as u64;
            // Relaxed: see above.
            while !summed.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2));
                if now_ns() >= next {
                    next += crate::wire::POLL_SLICE.as_nanos() as u64;
                    // Every sender has ended: no frame is half written on the connection.
                    // A failed keep-alive shows again when the summary is written.
                    let pong = FrameHeader::pong().encode();
                    let _ = write_parts(
                        &self.out.main,
                        &[&pong],
                        &self.guard(false),
                        Channel::Background,
                    );
                }
            }
            h.join()
                .unwrap_or_else(|_| Err("the page sums panicked".into()))
        });
        sums.map_err(SourceError::Memory)
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
                .map(|m| m.run(s, self.pin, GuestWait::Sleep, rings_on.then_some(ring_full)));
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
            let (report, kvm) = result?;
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
            self.switch_over([stop_ns, stopped_ns], t_run, states, report, kvm)
        })
    }

    /// Waits for the guest to boot (its first `out` says so), then runs the precopy rounds;
    /// returns what they did, and what KVM did meanwhile.
    fn precopy_rounds(
        &self,
        t_run: u64,
        tracker: Option<&DirtyTracker<'_>>,
    ) -> Result<(precopy::PrecopyReport, PrecopyKvm), SourceError> {
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
        let kvm_counters = || -> Result<_, SourceError> {
            self.machine.map_or(Ok(None), |m| {
                m.kvm_counters()
                    .map_err(|e| SourceError::Guest(e.to_string()))
            })
        };
        let before = kvm_counters()?;
        let report = precopy::run(
            &self.out,
            self.bitmap(),
            tracker,
            rounds,
            &self.guard(false),
        )?;
        let during = kvm_counters()?.zip(before).map(|(a, b)| a.since(b));
        let (log_clears, cleared_pages) = tracker.map_or((0, 0), |t| t.clears());
        let d = during.unwrap_or_default();
        let kvm = PrecopyKvm {
            counted: during.is_some(),
            faults: d.faults,
            fixed: d.fixed,
            fast: d.fast,
            tlb_flushes: d.tlb_flushes,
            log_clears,
            cleared_pages,
        };
        Ok((report, kvm))
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
        kvm: PrecopyKvm,
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
            sync_ns: report.sync_ns,
            drain_ns: report.drain_ns,
            kvm,
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
