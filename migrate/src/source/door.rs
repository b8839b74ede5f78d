//! The listening source's door: every connection's handshake at once, in one poll loop, so
//! that no connection waits behind another's.
//!
//! # Protocol
//! The door thread owns the listener. It accepts every connection as it arrives and reads
//! its hello (and a resume's received bitmap, [`crate::handshake`] step 4) without blocking,
//! each connection against its own deadline: [`HANDSHAKE_DEADLINE`] without a byte, then it
//! is refused. A whole hello is routed at once:
//! * **main** ([`Role::Main`]): a new session is registered (a fresh random token, its
//!   [`Doorway`]) and handed to the server ([`NewSession::Main`]), which prepares it on its
//!   own thread; refused with the reason when `max_sessions` are live, or when the server
//!   takes no more;
//! * **urgent** ([`Role::Urgent`]): handed to the live session with that token if it waits
//!   for one ([`Doorway::urgent`]), else refused;
//! * **resume** ([`Role::Resume`]): its bitmap is read (exactly the session's word count),
//!   then it is handed to the live session with that token, which takes it when it pauses
//!   ([`Doorway::paused`]); or, for a session an earlier source saved (`--ram-dir`), to the
//!   server as a takeover ([`NewSession::Takeover`]); else refused.
//!
//! # Invariants
//! * A connection costs its own slot only: at most `max_pending` connections are pending
//!   (one more is refused at once with the reason), each for at most its deadline.
//! * A refusal is a [`HelloReply`] with the reason; the connection then lingers, its write
//!   side shut, for at most [`LINGER`] (so that the reply is read before the close, not
//!   lost to a reset), in a set of bounded size too.
//! * The registry (one mutex, held for map operations only) is the one place that says which
//!   sessions are live, which waits for its urgent connection, which is paused, and which
//!   saved sessions may be taken over; a [`Doorway`] unregisters its session when dropped.
//! * Refusals are logged once per kind per second, with a count of the others
//!   ([`ServerEvent::Refused`]), so that a flood is a few lines.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use super::saved::Saved;
use super::{ServerEvent, SourceError};
use crate::handshake::{self, HANDSHAKE_DEADLINE};
use crate::sys::clock::{now_ns, timespec};
use crate::wire::{configure, Hello, HelloReply, Role, WireError, POLL_SLICE};

/// How long a refused connection stays open (write side shut) for its reply to be read.
pub const LINGER: Duration = Duration::from_secs(1);

/// The most connections pending their hello at once.
pub const MAX_PENDING: usize = 1024;

/// Most ended sessions remembered, to say why a late resume finds none.
const ENDED_KEPT: usize = 64;

/// How often each kind of refusal is logged, at most.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// What the door lets in.
#[derive(Clone, Copy, Debug)]
pub struct DoorLimits {
    /// Live sessions at once.
    pub max_sessions: usize,
    /// Connections pending their hello at once.
    pub max_pending: usize,
    /// A pending connection's deadline: this long without a byte.
    pub deadline: Duration,
}

/// What a session's connection brought, for that session.
enum ForSession {
    /// Its urgent connection.
    Urgent(TcpStream),
    /// A new main connection and the destination's received bitmap.
    Resume(TcpStream, Vec<u64>),
}

/// A new session, for the server to run.
pub enum NewSession<'d> {
    /// A destination's main connection and its hello (to be prepared, then answered).
    Main {
        /// The main connection (blocking, configured).
        conn: TcpStream,
        /// What it asks for.
        hello: Hello,
        /// The session's registration.
        doorway: Doorway<'d>,
    },
    /// A resume for a session an earlier source saved (`--ram-dir`): its main connection,
    /// the received bitmap, and the saved session.
    Takeover {
        /// The new main connection.
        conn: TcpStream,
        /// The received bitmap.
        received: Vec<u64>,
        /// The saved session.
        saved: Saved,
        /// The new session's registration.
        doorway: Doorway<'d>,
    },
}

/// Where a live session stands, for the refusals' wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Prepared, answered, or migrating.
    Running,
    /// Waiting for its urgent connection.
    Urgent,
    /// Paused after a break, waiting to be resumed.
    Paused,
}

struct Live {
    inbox: Sender<ForSession>,
    /// Words of the received bitmap a resume carries.
    words: usize,
    stage: Stage,
}

struct Registry {
    live: HashMap<u64, Live>,
    saved: HashMap<u64, Saved>,
    ended: VecDeque<(u64, String)>,
    /// False once the server has started its last session.
    accepting: bool,
}

/// The door: the listener, the registry, and the channel of new sessions.
pub struct Door<'l> {
    listener: &'l TcpListener,
    limits: DoorLimits,
    registry: Mutex<Registry>,
}

/// One connection that has not said who it is yet.
struct Pending {
    conn: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    /// Bytes still expected.
    need: usize,
    /// A resume's bitmap words, once its hello is read (the bitmap follows it).
    words: Option<usize>,
    /// Refused when nothing arrives by then (ns).
    deadline: u64,
}

/// A refused connection, its write side shut, waiting for the peer to close.
struct Lingering {
    conn: TcpStream,
    until: u64,
}

/// The kinds of refusal, logged apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Accept,
    Full,
    Silent,
    Bad,
    Busy,
    Token,
}

/// Refusals logged once per kind per [`LOG_EVERY`].
#[derive(Default)]
struct Quiet {
    last: HashMap<Kind, u64>,
    more: HashMap<Kind, (u64, String)>,
}

impl Quiet {
    fn note(&mut self, kind: Kind, peer: Option<SocketAddr>, why: &str, log: &dyn Fn(ServerEvent)) {
        let now = now_ns();
        match self.last.get(&kind) {
            Some(&t) if now - t < LOG_EVERY.as_nanos() as u64 => {
                let m = self.more.entry(kind).or_insert((0, String::new()));
                m.0 += 1;
                m.1 = why.to_string();
            }
            _ => {
                self.last.insert(kind, now);
                log(ServerEvent::Refused {
                    peer,
                    why: why.to_string(),
                    more: 0,
                });
            }
        }
    }

    /// Logs the counts of what was not logged (all of them with `all`, else those whose
    /// second has passed).
    fn flush(&mut self, all: bool, log: &dyn Fn(ServerEvent)) {
        let now = now_ns();
        let due: Vec<Kind> = self
            .more
            .keys()
            .filter(|k| {
                all || self
                    .last
                    .get(k)
                    .is_none_or(|&t| now - t >= LOG_EVERY.as_nanos() as u64)
            })
            .copied()
            .collect();
        for k in due {
            if let Some((n, why)) = self.more.remove(&k) {
                self.last.insert(k, now);
                log(ServerEvent::Refused {
                    peer: None,
                    why,
                    more: n,
                });
            }
        }
    }
}

/// A fresh session token: random (the process's hash keys come from the OS), never 0.
fn fresh_token() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ns());
    h.finish().max(1)
}

/// Words of the received bitmap of a guest with `hello`'s layout.
pub fn bitmap_words(hello: &Hello) -> usize {
    hello
        .guest
        .layout
        .ram()
        .blocks()
        .iter()
        .map(|b| b.pages().div_ceil(64) as usize)
        .sum()
}

/// Writes `reply` at once if the socket takes it (a fresh socket's buffer holds it), shuts
/// the write side: the reply goes before the close.
fn answer(conn: &TcpStream, reply: &HelloReply) {
    let _ = (&*conn).write(&reply.encode());
    let _ = conn.shutdown(Shutdown::Write);
}

fn refusal(error: String) -> HelloReply {
    HelloReply {
        error,
        token: 0,
        boot_id: crate::sys::clock::boot_id(),
    }
}

/// Keeps the lingering connections whose time is not up and whose peer has not closed,
/// draining what the readable ones (`ready`) sent.
fn drain_lingering(lingering: &mut Vec<Lingering>, ready: &[bool]) {
    let now = now_ns();
    let mut keep = Vec::with_capacity(lingering.len());
    for (i, mut l) in lingering.drain(..).enumerate() {
        let mut gone = now >= l.until;
        if ready[i] {
            let mut sink = [0u8; 4096];
            gone |= !matches!(l.conn.read(&mut sink), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock);
        }
        if !gone {
            keep.push(l);
        }
    }
    *lingering = keep;
}

impl<'l> Door<'l> {
    /// A door on `listener` (non-blocking) with `limits` and the sessions `saved` by an
    /// earlier source.
    pub fn new(listener: &'l TcpListener, limits: DoorLimits, saved: Vec<Saved>) -> Self {
        Self {
            listener,
            limits,
            registry: Mutex::new(Registry {
                live: HashMap::new(),
                saved: saved.into_iter().map(|s| (s.token, s)).collect(),
                ended: VecDeque::new(),
                accepting: true,
            }),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes no more new sessions (takeovers of saved ones neither).
    pub fn stop_accepting(&self) {
        self.registry().accepting = false;
    }

    /// Live sessions.
    pub fn live(&self) -> usize {
        self.registry().live.len()
    }

    /// Keeps `saved` for a later resume to take over.
    pub fn keep_saved(&self, saved: Saved) {
        self.registry().saved.insert(saved.token, saved);
    }

    /// Registers a new live session of `words` bitmap words: its doorway.
    fn register(&self, r: &mut Registry, words: usize) -> Doorway<'_> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut token = fresh_token();
        while r.live.contains_key(&token) || r.saved.contains_key(&token) {
            token = fresh_token();
        }
        r.live.insert(
            token,
            Live {
                inbox: tx,
                words,
                stage: Stage::Running,
            },
        );
        Doorway {
            door: self,
            token,
            number: AtomicU64::new(0),
            inbox: Mutex::new(rx),
            stash: Mutex::new(Vec::new()),
            ended: Mutex::new(None),
        }
    }

    /// Why a new session cannot start now, if it cannot.
    fn busy(&self, r: &Registry) -> Option<String> {
        if !r.accepting {
            return Some(
                "the source takes no more sessions (it has started the last of its --sessions)"
                    .into(),
            );
        }
        if r.live.len() < self.limits.max_sessions {
            return None;
        }
        let paused = r.live.values().filter(|l| l.stage == Stage::Paused).count();
        Some(if self.limits.max_sessions == 1 && paused == 1 {
            "the source is busy: a session is paused, waiting for its destination to resume it; try again".into()
        } else {
            format!(
                "the source is busy with {} session{} (--max-sessions {}; {paused} paused); try again",
                r.live.len(),
                if r.live.len() == 1 { "" } else { "s" },
                self.limits.max_sessions
            )
        })
    }

    /// Runs the door until `done` or `stop`: accepts, reads and routes every connection
    /// (see the module); new sessions go to `sessions`.
    pub fn run(
        &'l self,
        stop: &AtomicBool,
        done: &AtomicBool,
        sessions: &Sender<NewSession<'l>>,
        log: &dyn Fn(ServerEvent),
    ) {
        let mut pending: Vec<Pending> = Vec::new();
        let mut lingering: Vec<Lingering> = Vec::new();
        let mut quiet = Quiet::default();
        // Relaxed (both): polled flags.
        while !stop.load(Ordering::Relaxed) && !done.load(Ordering::Relaxed) {
            let ready = self.wait(&pending, &lingering, log);
            let (p_ready, l_ready) = ready[1..].split_at(pending.len());
            // Lingering connections: drain until the peer closes or the time is up.
            drain_lingering(&mut lingering, l_ready);
            // Pending connections: read what arrived, route what is whole, refuse the silent.
            pending =
                self.serve_pending(pending, p_ready, &mut lingering, sessions, &mut quiet, log);
            // New connections.
            self.accept_new(&mut pending, &mut lingering, &mut quiet, log);
            quiet.flush(false, log);
        }
        quiet.flush(true, log);
    }

    /// A pending connection's deadline in ns.
    fn deadline_ns(&self) -> u64 {
        self.limits.deadline.as_nanos() as u64
    }

    /// Polls the listener, the pending and the lingering connections until one is readable,
    /// the nearest deadline, or [`POLL_SLICE`]: which are ready, the listener first.
    fn wait(
        &self,
        pending: &[Pending],
        lingering: &[Lingering],
        log: &dyn Fn(ServerEvent),
    ) -> Vec<bool> {
        let now = now_ns();
        let next = pending
            .iter()
            .map(|p| p.deadline)
            .chain(lingering.iter().map(|l| l.until))
            .min()
            .map_or(POLL_SLICE.as_nanos() as u64, |d| {
                d.saturating_sub(now).max(1_000_000)
            })
            .min(POLL_SLICE.as_nanos() as u64);
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(1 + pending.len() + lingering.len());
        fds.push(PollFd::new(self.listener, PollFlags::IN));
        fds.extend(pending.iter().map(|p| PollFd::new(&p.conn, PollFlags::IN)));
        fds.extend(
            lingering
                .iter()
                .map(|l| PollFd::new(&l.conn, PollFlags::IN)),
        );
        match poll(&mut fds, Some(&timespec(next))) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                log(ServerEvent::Note(format!("the door's poll failed: {e}")));
                std::thread::sleep(POLL_SLICE);
            }
        }
        fds.iter()
            .map(|f| !f.revents().is_empty())
            .collect::<Vec<bool>>()
    }

    /// Reads what arrived on the pending connections (`ready` says which), routes those whose
    /// hello is whole and refuses those silent past their deadline: the ones still pending.
    fn serve_pending(
        &'l self,
        pending: Vec<Pending>,
        ready: &[bool],
        lingering: &mut Vec<Lingering>,
        sessions: &Sender<NewSession<'l>>,
        quiet: &mut Quiet,
        log: &dyn Fn(ServerEvent),
    ) -> Vec<Pending> {
        let deadline_ns = self.deadline_ns();
        let mut still = Vec::with_capacity(pending.len());
        for (mut p, ready) in pending.into_iter().zip(ready.iter().copied()) {
            if ready {
                match self.read_more(&mut p) {
                    Ok(true) => p.deadline = now_ns() + deadline_ns,
                    Ok(false) => {}
                    // Closed or reset before its hello was whole: nothing to answer.
                    Err(()) => continue,
                }
            }
            if p.need == 0 {
                match self.route(p, sessions, quiet, log) {
                    Routed::Handed => {}
                    Routed::Again(p) => still.push(p),
                    Routed::Refused(conn) => self.linger(lingering, conn),
                }
                continue;
            }
            if now_ns() >= p.deadline {
                let why = format!(
                    "no hello within {:?} of the connection (or of its last byte): closed",
                    self.limits.deadline
                );
                quiet.note(Kind::Silent, Some(p.peer), &why, log);
                answer(&p.conn, &refusal(why));
                self.linger(lingering, p.conn);
                continue;
            }
            still.push(p);
        }
        still
    }

    /// Accepts every connection waiting on the listener into `pending`, refusing those beyond
    /// `max_pending`.
    fn accept_new(
        &self,
        pending: &mut Vec<Pending>,
        lingering: &mut Vec<Lingering>,
        quiet: &mut Quiet,
        log: &dyn Fn(ServerEvent),
    ) {
        let deadline_ns = self.deadline_ns();
        loop {
            match self.listener.accept() {
                Ok((conn, peer)) => {
                    if conn.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if pending.len() >= self.limits.max_pending {
                        // Count again first: connections closed since the last poll
                        // still hold their slots.
                        self.reap_closed(pending, deadline_ns);
                    }
                    if pending.len() >= self.limits.max_pending {
                        let why = format!(
                            "too many connections waiting to say hello ({}); try again",
                            self.limits.max_pending
                        );
                        quiet.note(Kind::Full, Some(peer), &why, log);
                        answer(&conn, &refusal(why));
                        self.linger(lingering, conn);
                        continue;
                    }
                    pending.push(Pending {
                        conn,
                        peer,
                        buf: vec![0; Hello::LEN],
                        need: Hello::LEN,
                        words: None,
                        deadline: now_ns() + deadline_ns,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // Out of descriptors, or a connection reset before it was taken: try
                // again at the next wake (the pending ones free theirs by their deadline).
                Err(e) => {
                    quiet.note(Kind::Accept, None, &e.to_string(), log);
                    // The listener stays readable: do not spin on it.
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }

    /// A refused connection (its answer written, its write side shut) lingers for its answer
    /// to be read, unless as many linger already: then it is closed at once.
    fn linger(&self, lingering: &mut Vec<Lingering>, conn: TcpStream) {
        if lingering.len() < self.limits.max_pending {
            lingering.push(Lingering {
                conn,
                until: now_ns() + LINGER.as_nanos() as u64,
            });
        }
    }

    /// Reads what `p` has; `Ok(true)` if bytes came, `Err` if it closed or failed.
    /// Drops the pending connections whose peer closed (or reset) since the last poll, and
    /// takes what the others sent meanwhile (routed at the next wake).
    fn reap_closed(&self, pending: &mut Vec<Pending>, deadline_ns: u64) {
        pending.retain_mut(|p| {
            if p.need == 0 {
                return true;
            }
            match self.read_more(p) {
                Ok(true) => {
                    p.deadline = now_ns() + deadline_ns;
                    true
                }
                Ok(false) => true,
                Err(()) => false,
            }
        });
    }

    fn read_more(&self, p: &mut Pending) -> Result<bool, ()> {
        let at = p.buf.len() - p.need;
        match p.conn.read(&mut p.buf[at..]) {
            Ok(0) => Err(()),
            Ok(n) => {
                p.need -= n;
                if p.need == 0 && p.words.is_none() {
                    self.after_hello(p);
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(false),
            Err(_) => Err(()),
        }
    }

    /// A whole hello in `p`: a resume whose session is known reads its bitmap next (its
    /// word count first); anything else is routed as it is.
    fn after_hello(&self, p: &mut Pending) {
        let Ok(h) = Hello::decode(p.buf[..Hello::LEN].try_into().expect("a hello")) else {
            return;
        };
        let Role::Resume { token } = h.role else {
            return;
        };
        let words = {
            let r = self.registry();
            r.live
                .get(&token)
                .map(|l| l.words)
                .or_else(|| r.saved.get(&token).map(|s| bitmap_words(&s.hello)))
        };
        if let Some(words) = words {
            p.words = Some(words);
            p.buf.resize(Hello::LEN + 8, 0);
            p.need = 8;
        }
    }

    /// Routes a connection whose hello (and bitmap) is whole.
    fn route(
        &'l self,
        mut p: Pending,
        sessions: &Sender<NewSession<'l>>,
        quiet: &mut Quiet,
        log: &dyn Fn(ServerEvent),
    ) -> Routed {
        // A resume's bitmap: the word count, then the words.
        if let Some(words) = p.words {
            if p.buf.len() == Hello::LEN + 8 {
                let n = u64::from_le_bytes(p.buf[Hello::LEN..].try_into().expect("8 bytes"));
                if let Err(e) = handshake::check_received_words(n, words) {
                    return self.refuse(p, Kind::Bad, e.to_string(), quiet, log);
                }
                p.buf.resize(Hello::LEN + 8 + words * 8, 0);
                p.need = words * 8;
                if p.need > 0 {
                    // The words follow: back to the pending set.
                    return Routed::Again(p);
                }
            }
        }
        let hb: &[u8; Hello::LEN] = p.buf[..Hello::LEN].try_into().expect("a hello");
        let h = match Hello::decode(hb) {
            Ok(h) => h,
            Err(e) => return self.refuse(p, Kind::Bad, e.to_string(), quiet, log),
        };
        if p.conn
            .set_nonblocking(false)
            .and_then(|_| configure(&p.conn))
            .is_err()
        {
            return Routed::Handed;
        }
        let r = self.registry();
        match h.role {
            Role::Main => self.route_main(r, p, h, sessions, quiet, log),
            Role::Urgent { token } => self.route_urgent(r, p, token, quiet, log),
            Role::Resume { token } => self.route_resume(r, p, token, sessions, quiet, log),
        }
    }

    /// Routes a main connection (registry `r` held): a new session for the server, unless busy.
    fn route_main(
        &'l self,
        mut r: MutexGuard<'_, Registry>,
        p: Pending,
        h: Hello,
        sessions: &Sender<NewSession<'l>>,
        quiet: &mut Quiet,
        log: &dyn Fn(ServerEvent),
    ) -> Routed {
        if let Some(why) = self.busy(&r) {
            drop(r);
            return self.refuse(p, Kind::Busy, why, quiet, log);
        }
        let doorway = self.register(&mut r, bitmap_words(&h));
        drop(r);
        if let Err(std::sync::mpsc::SendError(NewSession::Main { conn, .. })) =
            sessions.send(NewSession::Main {
                conn: p.conn,
                hello: h,
                doorway,
            })
        {
            answer(&conn, &refusal("the source is shutting down".into()));
            return Routed::Refused(conn);
        }
        Routed::Handed
    }

    /// Routes an urgent connection (registry `r` held): to the live session with `token` if it
    /// waits for one.
    fn route_urgent(
        &self,
        mut r: MutexGuard<'_, Registry>,
        p: Pending,
        token: u64,
        quiet: &mut Quiet,
        log: &dyn Fn(ServerEvent),
    ) -> Routed {
        match r.live.get_mut(&token) {
            Some(l) if l.stage == Stage::Urgent => {
                l.stage = Stage::Running;
                let _ = l.inbox.send(ForSession::Urgent(p.conn));
                Routed::Handed
            }
            _ => {
                drop(r);
                let why = "no session here waits for an urgent connection with that token (a bad token, or the session gave up waiting); try again".to_string();
                self.refuse(p, Kind::Token, why, quiet, log)
            }
        }
    }

    /// Routes a resume (registry `r` held): to the live session with `token`, or to the server
    /// as a takeover of the saved one.
    fn route_resume(
        &'l self,
        mut r: MutexGuard<'_, Registry>,
        p: Pending,
        token: u64,
        sessions: &Sender<NewSession<'l>>,
        quiet: &mut Quiet,
        log: &dyn Fn(ServerEvent),
    ) -> Routed {
        // Its bitmap was read only if the token was known when the hello came.
        let received = p
            .buf
            .get(Hello::LEN + 8..)
            .filter(|_| p.words.is_some())
            .map(handshake::received_words);
        let live = r.live.get(&token).map(|l| l.inbox.clone());
        let saved = r.saved.contains_key(&token);
        let received = match (received, live.is_some() || saved) {
            (Some(b), true) => b,
            (_, known) => {
                let why = match r.ended.iter().find(|(t, _)| *t == token) {
                    Some((_, how)) => {
                        format!("no paused session with that token here: it {how}")
                    }
                    None if known => "the session appeared while its resume was being read; try again".to_string(),
                    None => "no paused session with that token here (the source was restarted, or gave up waiting)".to_string(),
                };
                drop(r);
                return self.refuse(p, Kind::Token, why, quiet, log);
            }
        };
        if let Some(inbox) = live {
            // Sent under the registry lock: a session unregisters under it too, then
            // answers what its inbox holds (see `Doorway`'s drop), so no connection
            // can reach an inbox nobody will read.
            let _ = inbox.send(ForSession::Resume(p.conn, received));
            drop(r);
            return Routed::Handed;
        }
        if let Some(why) = self.busy(&r) {
            drop(r);
            return self.refuse(p, Kind::Busy, why, quiet, log);
        }
        let saved = r.saved.remove(&token).expect("just seen");
        let doorway = self.register(&mut r, bitmap_words(&saved.hello));
        drop(r);
        let new = NewSession::Takeover {
            conn: p.conn,
            received,
            saved,
            doorway,
        };
        if let Err(std::sync::mpsc::SendError(NewSession::Takeover { conn, saved, .. })) =
            sessions.send(new)
        {
            self.keep_saved(saved);
            answer(&conn, &refusal("the source is shutting down".into()));
            return Routed::Refused(conn);
        }
        Routed::Handed
    }

    fn refuse(
        &self,
        p: Pending,
        kind: Kind,
        why: String,
        quiet: &mut Quiet,
        log: &dyn Fn(ServerEvent),
    ) -> Routed {
        quiet.note(kind, Some(p.peer), &why, log);
        let _ = p.conn.set_nonblocking(true);
        answer(&p.conn, &refusal(why));
        Routed::Refused(p.conn)
    }
}

/// What became of a connection whose hello (or part of its bitmap) was whole.
enum Routed {
    /// Handed to a session or to the server (or lost on the way).
    Handed,
    /// A resume whose bitmap words follow: back to the pending set.
    Again(Pending),
    /// Refused: it lingers.
    Refused(TcpStream),
}

/// A session's registration at the door: its token, its number, and what arrives for it.
/// Dropping it unregisters the session (a late urgent or resume connection is refused).
/// One session thread at a time waits on it (the locks are never contended).
pub struct Doorway<'d> {
    door: &'d Door<'d>,
    token: u64,
    /// The session's number, for the log: 1, 2, ... in the order their handshakes were
    /// done (0 until then: a connection that never became a session has none).
    number: AtomicU64,
    inbox: Mutex<Receiver<ForSession>>,
    /// Resumes that arrived before the session paused (the newest is taken).
    stash: Mutex<Vec<(TcpStream, Vec<u64>)>>,
    /// How the session ended, for a late resume's refusal.
    ended: Mutex<Option<String>>,
}

/// Why a doorway wait ended without what it waited for.
#[derive(Debug)]
pub enum DoorwayError {
    /// The server is stopping.
    Stopped,
    /// Nothing came in time.
    Expired,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Doorway<'_> {
    /// The session token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The session's number (0 until its handshake is done).
    pub fn number(&self) -> u64 {
        // Relaxed: set once by the session's own thread before it logs anything.
        self.number.load(Ordering::Relaxed)
    }

    /// Numbers the session, once its handshake is done.
    pub fn set_number(&self, n: u64) {
        // Relaxed: see `number`.
        self.number.store(n, Ordering::Relaxed);
    }

    fn set_stage(&self, stage: Stage) {
        if let Some(l) = self.door.registry().live.get_mut(&self.token) {
            l.stage = stage;
        }
    }

    /// Waits until `until` (ns) for what arrives for this session.
    fn receive(&self, stop: &AtomicBool, until: u64) -> Result<ForSession, DoorwayError> {
        let inbox = lock(&self.inbox);
        loop {
            // Relaxed: a polled flag.
            if stop.load(Ordering::Relaxed) {
                return Err(DoorwayError::Stopped);
            }
            let left = until.saturating_sub(now_ns());
            if left == 0 {
                return Err(DoorwayError::Expired);
            }
            match inbox.recv_timeout(Duration::from_nanos(left).min(POLL_SLICE)) {
                Ok(a) => return Ok(a),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(DoorwayError::Stopped),
            }
        }
    }

    /// From now on the door hands this session's urgent connection over: call it before
    /// answering the connection it follows, which the destination may follow at once.
    pub fn expect_urgent(&self) {
        self.set_stage(Stage::Urgent);
    }

    /// Waits up to `limit` for this session's urgent connection (resumes that come
    /// meanwhile are kept for the next pause), and returns it unanswered.
    pub fn urgent(&self, stop: &AtomicBool, limit: Duration) -> Result<TcpStream, SourceError> {
        self.set_stage(Stage::Urgent);
        let until = now_ns() + limit.as_nanos() as u64;
        let r = loop {
            match self.receive(stop, until) {
                Ok(ForSession::Urgent(c)) => break Ok(c),
                Ok(ForSession::Resume(c, b)) => lock(&self.stash).push((c, b)),
                Err(DoorwayError::Stopped) => break Err(SourceError::Wire(WireError::Stopped)),
                Err(DoorwayError::Expired) => {
                    break Err(SourceError::Handshake(format!(
                        "the destination did not open its urgent connection within {limit:?} of the answer to its hello; the session is released"
                    )))
                }
            }
        };
        self.set_stage(Stage::Running);
        r
    }

    /// Answers a connection of this session: accepted, with the token.
    pub fn accept(&self, c: &TcpStream) -> Result<(), SourceError> {
        let ok = HelloReply {
            error: String::new(),
            token: self.token,
            boot_id: crate::sys::clock::boot_id(),
        };
        let quiet = AtomicBool::new(false);
        let g = crate::wire::Guard {
            stop: &quiet,
            idle: HANDSHAKE_DEADLINE,
            keepalive: None,
        };
        ok.write(c, &g).map_err(SourceError::Wire)
    }

    /// Refuses a connection of this session with `why`.
    pub fn refuse(&self, c: &TcpStream, why: String) {
        answer(c, &refusal(why));
    }

    /// Paused: waits up to `hold` for the destination to resume the session (the newest
    /// attempt is taken, older ones are refused), answers it, and returns the new main
    /// connection and the received bitmap.
    pub fn paused(
        &self,
        stop: &AtomicBool,
        hold: Duration,
    ) -> Result<(TcpStream, Vec<u64>), DoorwayError> {
        self.set_stage(Stage::Paused);
        let until = now_ns().saturating_add(hold.as_nanos().min(u128::from(u64::MAX)) as u64);
        let r = loop {
            // Whatever arrived meanwhile, then the newest attempt first.
            let newest = {
                let mut stash = lock(&self.stash);
                while let Ok(a) = lock(&self.inbox).try_recv() {
                    if let ForSession::Resume(c, b) = a {
                        stash.push((c, b));
                    }
                }
                let newest = stash.pop();
                for (old, _) in stash.drain(..) {
                    self.refuse(&old, "a newer attempt to resume this session came".into());
                }
                newest
            };
            if let Some((c, b)) = newest {
                self.expect_urgent();
                if self.accept(&c).is_ok() {
                    break Ok((c, b));
                }
                // The attempt was abandoned: wait for the next one.
                continue;
            }
            match self.receive(stop, until) {
                Ok(ForSession::Resume(c, b)) => lock(&self.stash).push((c, b)),
                Ok(ForSession::Urgent(_)) => {}
                Err(e) => break Err(e),
            }
        };
        if r.is_err() {
            self.set_stage(Stage::Running);
        }
        r
    }

    /// Records how the session ended (for a late resume's refusal).
    pub fn ended(&self, how: String) {
        *lock(&self.ended) = Some(how);
    }
}

impl Drop for Doorway<'_> {
    fn drop(&mut self) {
        let how = lock(&self.ended).take();
        let why = match &how {
            Some(how) => format!("no paused session with that token here: it {how}"),
            None => "no paused session with that token here: it ended".to_string(),
        };
        {
            let mut r = self.door.registry();
            r.live.remove(&self.token);
            if let Some(how) = how {
                if r.ended.len() >= ENDED_KEPT {
                    r.ended.pop_front();
                }
                r.ended.push_back((self.token, how));
            }
        }
        // Unregistered: the door sends under the registry lock, so nothing arrives after
        // this. What arrived before (a resume racing the session's end) is answered, not
        // closed silently.
        let mut stash = lock(&self.stash);
        while let Ok(a) = lock(&self.inbox).try_recv() {
            match a {
                ForSession::Resume(c, b) => stash.push((c, b)),
                ForSession::Urgent(c) => answer(&c, &refusal(why.clone())),
            }
        }
        for (c, _) in stash.drain(..) {
            answer(&c, &refusal(why.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn refusals_are_logged_once_a_second_per_kind_with_a_count_of_the_rest() {
        let lines = RefCell::new(Vec::new());
        let log = |e: ServerEvent| lines.borrow_mut().push(e.to_string());
        let mut q = Quiet::default();
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        for _ in 0..5 {
            q.note(Kind::Silent, Some(peer), "no hello within 2s", &log);
        }
        q.note(
            Kind::Bad,
            Some(peer),
            "not a pagehint-migrate destination",
            &log,
        );
        q.note(Kind::Accept, None, "Too many open files", &log);
        q.flush(false, &log);
        assert_eq!(
            lines.borrow().len(),
            3,
            "the rest waits for its second: {lines:?}"
        );
        q.flush(true, &log);
        assert_eq!(
            *lines.borrow(),
            [
                "refused a connection from 10.0.0.1:5000: no hello within 2s",
                "refused a connection from 10.0.0.1:5000: not a pagehint-migrate destination",
                "could not take a connection: Too many open files",
                "refused 4 more connections meanwhile (the last: no hello within 2s)",
            ]
        );
    }

    #[test]
    fn a_resume_handed_to_a_session_that_ends_is_answered_with_why() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let door = Door::new(
            &listener,
            DoorLimits {
                max_sessions: 1,
                max_pending: 4,
                deadline: Duration::from_secs(1),
            },
            Vec::new(),
        );
        let doorway = {
            let mut r = door.registry();
            door.register(&mut r, 0)
        };
        // Two resumes reach the session the way the door hands them over (one read into the
        // stash, one still in the inbox) just before the session fails.
        let mut clients = Vec::new();
        for stashed in [true, false] {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (conn, _) = listener.accept().unwrap();
            let r = door.registry();
            r.live[&doorway.token()]
                .inbox
                .send(ForSession::Resume(conn, Vec::new()))
                .unwrap();
            drop(r);
            if stashed {
                let got = lock(&doorway.inbox).try_recv().unwrap();
                let ForSession::Resume(c, b) = got else {
                    unreachable!()
                };
                lock(&doorway.stash).push((c, b));
            }
            clients.push(client);
        }
        doorway.ended("failed: connections dropped".into());
        drop(doorway);
        assert_eq!(door.live(), 0);
        let quiet = AtomicBool::new(false);
        let g = crate::wire::Guard {
            stop: &quiet,
            idle: Duration::from_secs(5),
            keepalive: None,
        };
        for c in &clients {
            let reply = HelloReply::read(c, &g).expect("an answer, not a silent close");
            assert_eq!(
                reply.error,
                "no paused session with that token here: it failed: connections dropped"
            );
        }
    }

    #[test]
    fn a_paused_session_says_how_long_it_is_held_and_what_caps_it() {
        let paused = |asked: Duration| {
            ServerEvent::Paused {
                number: 3,
                why: "connection lost".into(),
                hold: Duration::from_secs(30),
                asked,
            }
            .to_string()
        };
        assert_eq!(
            paused(Duration::from_secs(10)),
            "session 3: paused (connection lost); holding it up to 30s for its destination to resume it"
        );
        assert!(paused(Duration::from_secs(300))
            .ends_with("(it asked for 300s; --max-recover caps it)"));
        assert!(paused(Duration::from_millis(u64::MAX))
            .ends_with("(it asked for no limit; --max-recover caps it)"));
    }
}
