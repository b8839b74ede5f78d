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
//!    for it with the session paused (`crate::source::door`), answers, then takes a new urgent
//!    connection with the same token, as in step 2. No clock probes: the clocks are the ones
//!    measured at the start.
//!
//! The source serves every connection's handshake at once (`crate::source::door`): each
//! step has [`HANDSHAKE_DEADLINE`], so a client that connects and says nothing, or says hello
//! and goes silent, holds only its own slot, for that long, never the source.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
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
/// Returns the connections and the token the source answered with: the same one, or a new
/// one when a new source session took the paused session over (its counters start there).
/// Raising `stop` ends an attempt (its waits for answers) with [`WireError::Stopped`].
pub fn resume(
    addr: SocketAddr,
    hello: &Hello,
    token: u64,
    received: &[u64],
    connect: Duration,
    idle: Duration,
    stop: &AtomicBool,
) -> Result<(TcpStream, TcpStream, u64), ConnectError> {
    let g = Guard {
        stop,
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
    let (main, reply) = greet(addr, connect, &h, &bits, &g)?;
    h.role = Role::Urgent { token: reply.token };
    let (urgent, _) = greet(addr, connect, &h, &[], &g)?;
    Ok((main, urgent, reply.token))
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

/// How long the source gives each step of a handshake that the destination takes at once
/// (at most the idle limit): a new connection's hello, a resume's bitmap, the urgent
/// connection after the answer to the main one, the clock probes up to `START`. A client
/// that connects and says nothing, or says hello and goes silent, holds only its own slot,
/// and only this long.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);

/// Most received-bitmap words a resume carries (64 GiB of 4 KiB pages).
const MAX_RECEIVED_WORDS: u64 = (64 << 30) / 4096 / 64;

/// Source: checks a resume's received-bitmap word count `n` against the session's `words`.
pub fn check_received_words(n: u64, words: usize) -> Result<(), WireError> {
    if n != words as u64 || n > MAX_RECEIVED_WORDS {
        return Err(WireError::Malformed(
            Channel::Handshake,
            format!("a received bitmap of {n} words for a guest of {words}"),
        ));
    }
    Ok(())
}

/// Source: a resume's received-bitmap words from their bytes (little-endian).
pub fn received_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect()
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
