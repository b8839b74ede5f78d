//! Both sides of connection setup, in one place.
//!
//! 1. The destination connects the **main** connection and sends a [`Hello`] with
//!    [`Role::Main`]: every parameter of the run. The source checks it and prepares the
//!    session (guest memory, the VM) *before* answering, so a refusal carries the reason
//!    ([`HelloReply::error`]); otherwise the reply carries a session token.
//! 2. The destination connects the **urgent** connection with [`Role::Urgent`] and the
//!    token; the source accepts only that token (other connections meanwhile are refused
//!    and closed, without ending the session).
//! 3. Clock probes: the destination sends `PING`s on the return path and the source answers
//!    `PONG` with its clock, until the destination sends `START`. The offset is used only
//!    across machines (one machine's processes share `CLOCK_MONOTONIC`, known from the boot
//!    id).
//!
//! 4. **Resume** (postcopy recovery, any number of times): after its connections broke in
//!    postcopy, the destination connects a new main connection with [`Role::Resume`] and
//!    the session token, followed by its received bitmap; the source, which has been waiting
//!    for it with the session paused ([`accept_resume`]), answers, then takes a new urgent
//!    connection with the same token, as in step 2. No clock probes: the clocks are the ones
//!    measured at the start.
//!
//! A new connection has [`HELLO_DEADLINE`] to send its hello, so a client that connects
//! and says nothing cannot hold the source for the whole idle limit.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::sys::clock::{boot_id, now_ns};
use crate::wire::{
    configure, read_full, write_parts, Channel, FrameHeader, FrameKind, Guard, Hello, HelloReply,
    Role, RpHeader, RpKind, WireError,
};

/// Why the destination could not set up the session.
#[derive(Debug)]
pub enum ConnectError {
    /// A connection failed.
    Wire(WireError),
    /// The source refused the parameters, saying why.
    Refused(String),
}

impl From<WireError> for ConnectError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

/// The destination's side of a set-up session.
#[derive(Debug)]
pub struct Connected {
    /// Main connection.
    pub main: TcpStream,
    /// Urgent connection.
    pub urgent: TcpStream,
    /// Both sides share `CLOCK_MONOTONIC`.
    pub same_clock: bool,
    /// Source clock minus destination clock, as the pings measured it.
    pub measured_offset_ns: i64,
    /// The session token (to resume the session after a broken connection).
    pub token: u64,
}

impl Connected {
    /// The offset to apply to source timestamps (0 on one machine).
    pub fn offset_ns(&self) -> i64 {
        if self.same_clock {
            0
        } else {
            self.measured_offset_ns
        }
    }
}

fn dial(addr: SocketAddr, idle: Duration) -> Result<TcpStream, WireError> {
    let s = TcpStream::connect_timeout(&addr, idle)
        .map_err(|e| WireError::Io(Channel::Handshake, e))?;
    configure(&s).map_err(|e| WireError::Io(Channel::Handshake, e))?;
    Ok(s)
}

/// Opens one connection to `addr` (giving up after `dial_limit`), sends `h` and `extra`
/// after it, and reads the source's reply; a refusal is [`ConnectError::Refused`].
fn greet(
    addr: SocketAddr,
    dial_limit: Duration,
    h: &Hello,
    extra: &[u8],
    g: &Guard<'_>,
) -> Result<(TcpStream, HelloReply), ConnectError> {
    let s = dial(addr, dial_limit)?;
    write_parts(&s, &[&h.encode(), extra], g, Channel::Handshake)?;
    let reply = HelloReply::read(&s, g)?;
    if !reply.error.is_empty() {
        return Err(ConnectError::Refused(reply.error));
    }
    Ok((s, reply))
}

/// Destination: connects both channels with `hello` and measures the clock offset.
pub fn connect(addr: SocketAddr, hello: &Hello, idle: Duration) -> Result<Connected, ConnectError> {
    let stop = AtomicBool::new(false);
    let g = Guard {
        stop: &stop,
        idle,
        keepalive: None,
    };
    let mut h = hello.clone();
    h.role = Role::Main;
    let (main, reply) = greet(addr, idle, &h, &[], &g)?;
    h.role = Role::Urgent { token: reply.token };
    let (urgent, _) = greet(addr, idle, &h, &[], &g)?;
    // Always probed (so the path is exercised); used only across machines.
    let measured_offset_ns = clock_offset(&main, &g)?;
    Ok(Connected {
        main,
        urgent,
        same_clock: reply.boot_id == boot_id(),
        measured_offset_ns,
        token: reply.token,
    })
}

/// Destination: resumes the paused session `token` on new connections (postcopy recovery),
/// sending `received` (the received bitmap, every block in order) after the resume hello.
/// Connection attempts give up after `connect`; each answer is awaited for `idle` (the rest
/// of the recovery window: a source that has not noticed the break yet answers once its own
/// idle limit has passed, and an attempt abandoned meanwhile would only be refused later).
pub fn resume(
    addr: SocketAddr,
    hello: &Hello,
    token: u64,
    received: &[u64],
    connect: Duration,
    idle: Duration,
) -> Result<(TcpStream, TcpStream), ConnectError> {
    let stop = AtomicBool::new(false);
    let g = Guard {
        stop: &stop,
        idle,
        keepalive: None,
    };
    let mut h = hello.clone();
    h.role = Role::Resume { token };
    let mut bits = Vec::with_capacity(8 + received.len() * 8);
    bits.extend_from_slice(&(received.len() as u64).to_le_bytes());
    for w in received {
        bits.extend_from_slice(&w.to_le_bytes());
    }
    let (main, _) = greet(addr, connect, &h, &bits, &g)?;
    h.role = Role::Urgent { token };
    let (urgent, _) = greet(addr, connect, &h, &[], &g)?;
    Ok((main, urgent))
}

/// Measures source clock minus destination clock with a few pings.
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
        if pong.kind == FrameKind::Abort && pong.len <= 4096 {
            let mut msg = vec![0u8; pong.len as usize];
            read_full(main, &mut msg, g, Channel::Background)?;
            return Err(WireError::PeerAbort(
                Channel::Background,
                String::from_utf8_lossy(&msg).into_owned(),
            ));
        }
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

/// The source's side of a set-up session.
#[derive(Debug)]
pub struct Accepted {
    /// What the destination asked for.
    pub hello: Hello,
    /// Main connection.
    pub main: TcpStream,
    /// Urgent connection.
    pub urgent: TcpStream,
    /// Both sides share `CLOCK_MONOTONIC`.
    pub same_clock: bool,
    /// The session token (a resume hello must carry it).
    pub token: u64,
}

fn accept_one(
    listener: &TcpListener,
    stop: &AtomicBool,
    limit: Option<Duration>,
) -> Result<TcpStream, WireError> {
    let start = now_ns();
    loop {
        match listener.accept() {
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

/// How long the source waits for a hello on a new connection (at most the idle limit): a
/// destination sends its hello as soon as it connects, so a client that connects and says
/// nothing holds the source up this long, not the whole idle limit.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(2);

/// Source: accepts a session on `listener` (non-blocking), preparing it with `prepare`
/// before answering (its error is the refusal's reason).
pub fn accept<T>(
    listener: &TcpListener,
    stop: &AtomicBool,
    idle: Duration,
    prepare: impl FnOnce(&Hello) -> Result<T, String>,
) -> Result<(Accepted, T), WireError> {
    let main = accept_one(listener, stop, None)?;
    let g = Guard {
        stop,
        idle,
        keepalive: None,
    };
    let hello_guard = Guard {
        idle: idle.min(HELLO_DEADLINE),
        ..g
    };
    let mut hb = [0u8; Hello::LEN];
    read_full(&main, &mut hb, &hello_guard, Channel::Handshake)?;
    let token = now_ns() ^ 0x005e_ed0f_5e55_1011;
    let checked = Hello::decode(&hb)
        .map_err(|e| e.to_string())
        .and_then(|h| match h.role {
            Role::Main => Ok(h),
            Role::Urgent { .. } => Err("expected a main-connection hello".to_string()),
            Role::Resume { .. } => Err(
                "no paused session to resume here (the source was restarted, or gave up waiting)"
                    .to_string(),
            ),
        })
        .and_then(|h| prepare(&h).map(|t| (h, t)));
    HelloReply {
        error: checked.as_ref().err().cloned().unwrap_or_default(),
        token,
        boot_id: boot_id(),
    }
    .write(&main, &g)?;
    let (hello, prepared) = checked.map_err(|e| WireError::Malformed(Channel::Handshake, e))?;
    let urgent = accept_urgent(listener, &g, token)?;
    let same_clock = hello.boot_id == boot_id();
    Ok((
        Accepted {
            hello,
            main,
            urgent,
            same_clock,
            token,
        },
        prepared,
    ))
}

/// Source: the urgent connection of session `token`: the first one within the idle limit
/// that says this session's token. Any other connection (a stray client, another
/// destination's main connection) is answered with a refusal and closed; it does not end
/// this session.
fn accept_urgent(
    listener: &TcpListener,
    g: &Guard<'_>,
    token: u64,
) -> Result<TcpStream, WireError> {
    let idle = g.idle;
    let mut hb = [0u8; Hello::LEN];
    let start = now_ns();
    loop {
        let left = idle.saturating_sub(Duration::from_nanos(now_ns() - start));
        if left.is_zero() {
            return Err(WireError::Timeout(Channel::Handshake, idle));
        }
        let c = accept_one(listener, g.stop, Some(left))?;
        let cg = Guard {
            idle: left.min(HELLO_DEADLINE),
            ..*g
        };
        if read_full(&c, &mut hb, &cg, Channel::Handshake).is_err() {
            continue;
        }
        let ok = matches!(Hello::decode(&hb).map(|h| h.role), Ok(Role::Urgent { token: t }) if t == token);
        let reply = HelloReply {
            error: if ok {
                String::new()
            } else {
                "the source is busy with another session (or a bad urgent-connection token); try again".into()
            },
            token,
            boot_id: boot_id(),
        };
        if ok {
            reply.write(&c, g)?;
            return Ok(c);
        }
        let _ = reply.write(&c, &cg);
    }
}

/// Most received-bitmap words a resume carries (64 GiB of 4 KiB pages).
const MAX_RECEIVED_WORDS: u64 = (64 << 30) / 4096 / 64;

/// Source: waits up to `window` for the destination to resume the paused session `token`
/// (postcopy recovery): a main connection with [`Role::Resume`] and the token, then its
/// received bitmap (exactly `words` words), then the urgent connection. Any other
/// connection meanwhile is refused, with the reason, and closed. Returns the new main and
/// urgent connections and the received bitmap.
pub fn accept_resume(
    listener: &TcpListener,
    stop: &AtomicBool,
    idle: Duration,
    window: Duration,
    token: u64,
    words: usize,
) -> Result<(TcpStream, TcpStream, Vec<u64>), WireError> {
    let g = Guard {
        stop,
        idle,
        keepalive: None,
    };
    let mut hb = [0u8; Hello::LEN];
    let start = now_ns();
    let main = loop {
        let left = window.saturating_sub(Duration::from_nanos(now_ns() - start));
        if left.is_zero() {
            return Err(WireError::Timeout(Channel::Handshake, window));
        }
        let c = accept_one(listener, stop, Some(left))?;
        let cg = Guard {
            idle: idle.min(HELLO_DEADLINE),
            ..g
        };
        if read_full(&c, &mut hb, &cg, Channel::Handshake).is_err() {
            continue;
        }
        let refusal = match Hello::decode(&hb) {
            Ok(h) if h.role == (Role::Resume { token }) => {
                match read_received(&c, &g, words) {
                    Ok(received) => {
                        let ok = HelloReply {
                            error: String::new(),
                            token,
                            boot_id: boot_id(),
                        }
                        .write(&c, &g);
                        // An attempt the destination gave up on: wait for the next one.
                        if ok.is_ok() {
                            break (c, received);
                        }
                        continue;
                    }
                    // A connection that broke part way: wait for the next attempt.
                    Err(e) if e.connection_lost() => continue,
                    Err(e) => e.to_string(),
                }
            }
            Ok(h) if matches!(h.role, Role::Resume { .. }) => {
                "no paused session with that token here (the source was restarted?)".into()
            }
            Ok(_) => {
                "the source is busy: a session is paused, waiting for its destination to resume it; try again".into()
            }
            Err(e) => e.to_string(),
        };
        let _ = HelloReply {
            error: refusal,
            token: 0,
            boot_id: boot_id(),
        }
        .write(&c, &cg);
    };
    let (main, received) = main;
    let urgent = accept_urgent(listener, &g, token)?;
    Ok((main, urgent, received))
}

/// Reads a resume's received bitmap: a word count (exactly `words`), then the words.
fn read_received(c: &TcpStream, g: &Guard<'_>, words: usize) -> Result<Vec<u64>, WireError> {
    let mut n = [0u8; 8];
    read_full(c, &mut n, g, Channel::Handshake)?;
    let n = u64::from_le_bytes(n);
    if n != words as u64 || n > MAX_RECEIVED_WORDS {
        return Err(WireError::Malformed(
            Channel::Handshake,
            format!("a received bitmap of {n} words for a guest of {words}"),
        ));
    }
    let mut b = vec![0u8; words * 8];
    read_full(c, &mut b, g, Channel::Handshake)?;
    Ok(b.chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect())
}

/// Source: answers clock probes until the destination sends `START`.
pub fn answer_pings_until_start(main: &TcpStream, g: &Guard<'_>) -> Result<(), WireError> {
    loop {
        let mut hb = [0u8; RpHeader::LEN];
        read_full(main, &mut hb, g, Channel::ReturnPath)?;
        let h = RpHeader::decode(&hb)?;
        let mut body = vec![0u8; h.len as usize];
        read_full(main, &mut body, g, Channel::ReturnPath)?;
        match h.kind {
            RpKind::Ping => {
                write_parts(
                    main,
                    &[&FrameHeader::pong().encode()],
                    g,
                    Channel::Background,
                )?;
            }
            RpKind::Start => return Ok(()),
            RpKind::Done | RpKind::Request => {
                return Err(WireError::Malformed(
                    Channel::ReturnPath,
                    format!("{:?} before START", h.kind),
                ))
            }
        }
    }
}
