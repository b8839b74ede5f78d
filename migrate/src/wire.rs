//! The harness's wire formats and blocking I/O that never hangs.
//!
//! Two TCP connections per migration, as QEMU's postcopy-preempt has:
//! * **main**: source → destination page frames of the background channel (and, in vanilla,
//!   every page); destination → source the return path (page requests, `DONE`, pings).
//! * **urgent**: source → destination page frames sent by the return-path thread (preempt).
//!
//! Every read and write runs with a short socket timeout and is retried until a stop flag is
//! raised or the peer has been silent for the idle limit, so a dead peer or a dropped
//! connection ends the run with a typed [`WireError`], never a hang.
//!
//! Page frame (source → destination), 32-byte header, little endian:
//! `magic u16 | kind u8 | 0 u8 | block u32 | offset u64 | len u64 | arrival_ns u64`, then
//! `len` payload bytes for `PAGES`, `len` summary bytes for `SUMMARY`, `len` bytes of message
//! for `ABORT`, nothing for `ZERO` (a run of zero pages) and `PONG`.
//!
//! Return-path frame (destination → source), 16-byte header:
//! `magic u16 | kind u8 | 0 u8 | len u32 | sent_ns u64`, then `len` bytes (≤ 256): a page
//! request in [`pagehint::UrgentRequest`]'s wire format for `REQUEST` (checked by the
//! scheduler, which rejects malformed ones with a typed error), nothing for `DONE`, `PING` and `START`.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pagehint::SchedulerStats;
use rustix::event::{poll, PollFd, PollFlags};

use crate::clock::now_ns;

/// The socket timeout each blocking call waits before re-checking the stop flag.
pub const POLL_SLICE: Duration = Duration::from_millis(100);

const PAGE_MAGIC: u16 = 0x4750;
const RP_MAGIC: u16 = 0x5052;
/// Largest page frame payload accepted (a claim of 64 host pages of 2 MiB is 128 MiB).
pub const MAX_PAYLOAD: u64 = 256 << 20;
/// Largest return-path body accepted.
pub const MAX_RP_BODY: u32 = 256;

/// Which connection an error happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The main connection, source → destination (background pages).
    Background,
    /// The preempt connection (urgent pages).
    Urgent,
    /// The main connection, destination → source (requests).
    ReturnPath,
    /// Connection setup.
    Handshake,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Background => "background channel",
            Self::Urgent => "urgent channel",
            Self::ReturnPath => "return path",
            Self::Handshake => "handshake",
        })
    }
}

/// Why a connection failed.
#[derive(Debug)]
pub enum WireError {
    /// The peer closed the connection.
    Closed(Channel),
    /// Nothing moved for too long.
    Timeout(Channel, Duration),
    /// A socket error (reset, broken pipe, ...).
    Io(Channel, io::Error),
    /// The peer sent something that is not a frame of this protocol.
    Malformed(Channel, String),
    /// The peer reported an error and aborted.
    PeerAbort(Channel, String),
    /// This side was asked to stop.
    Stopped,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed(c) => write!(f, "connection lost: the peer closed the {c}"),
            Self::Timeout(c, d) => write!(f, "connection lost: nothing on the {c} for {d:?}"),
            Self::Io(c, e) => write!(f, "connection lost on the {c}: {e}"),
            Self::Malformed(c, what) => write!(f, "protocol error on the {c}: {what}"),
            Self::PeerAbort(c, msg) => write!(f, "the peer aborted ({c}): {msg}"),
            Self::Stopped => write!(f, "stopped"),
        }
    }
}

impl std::error::Error for WireError {}

/// Sets the socket options every harness connection uses.
pub fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL_SLICE))?;
    stream.set_write_timeout(Some(POLL_SLICE))?;
    Ok(())
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// When blocking I/O gives up: a stop flag, and an idle limit measured from the later of this
/// call's last progress and an optional keep-alive stamp that another thread refreshes (so a
/// channel that is legitimately silent, like the urgent one, stays up while the other moves).
#[derive(Clone, Copy, Debug)]
pub struct Guard<'a> {
    /// Raised to stop.
    pub stop: &'a AtomicBool,
    /// Longest silence tolerated.
    pub idle: Duration,
    /// Last progress of a related channel (ns), if any.
    pub keepalive: Option<&'a AtomicU64>,
}

impl Guard<'_> {
    /// Err if stopped or idle since `last` (and since the keep-alive stamp).
    pub fn check(&self, last: u64, chan: Channel) -> Result<(), WireError> {
        // Relaxed: a flag polled every slice; nothing is published through it.
        if self.stop.load(Ordering::Relaxed) {
            return Err(WireError::Stopped);
        }
        // Relaxed: a timestamp compared against a coarse limit.
        let kept = self.keepalive.map_or(0, |k| k.load(Ordering::Relaxed));
        if now_ns().saturating_sub(last.max(kept)) > self.idle.as_nanos() as u64 {
            return Err(WireError::Timeout(chan, self.idle));
        }
        Ok(())
    }
}

/// Waits until `stream` is readable (data or EOF) or `timeout_ns` passes.
pub fn wait_readable(stream: &TcpStream, timeout_ns: u64) -> Result<bool, io::Error> {
    let mut fds = [PollFd::new(stream, PollFlags::IN)];
    match poll(&mut fds, Some(&crate::clock::timespec(timeout_ns))) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Fills `buf` from `stream`, giving up as `guard` says.
pub fn read_full(
    mut stream: &TcpStream,
    buf: &mut [u8],
    guard: &Guard<'_>,
    chan: Channel,
) -> Result<(), WireError> {
    let mut got = 0;
    let mut last = now_ns();
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(WireError::Closed(chan)),
            Ok(n) => {
                got += n;
                last = now_ns();
            }
            Err(e) if timed_out(&e) => guard.check(last, chan)?,
            Err(e) => return Err(WireError::Io(chan, e)),
        }
    }
    Ok(())
}

/// Writes `parts` in order, giving up as `guard` says.
pub fn write_parts(
    mut stream: &TcpStream,
    parts: &[&[u8]],
    guard: &Guard<'_>,
    chan: Channel,
) -> Result<(), WireError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    let mut last = now_ns();
    while done < total {
        let mut skip = done;
        let mut slices = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        match stream.write_vectored(&slices) {
            Ok(0) => return Err(WireError::Closed(chan)),
            Ok(n) => {
                done += n;
                last = now_ns();
            }
            Err(e) if timed_out(&e) => guard.check(last, chan)?,
            Err(e) => return Err(WireError::Io(chan, e)),
        }
    }
    Ok(())
}

/// Kinds of page frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Host pages with their contents.
    Pages = 1,
    /// A run of all-zero host pages (no payload).
    Zero = 2,
    /// End of migration: the source's counters and checksums.
    Summary = 3,
    /// The source failed; the payload is its message.
    Abort = 4,
    /// Clock probe answer; `arrival_ns` is the source's clock.
    Pong = 5,
}

/// A page frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What follows.
    pub kind: FrameKind,
    /// RAM block.
    pub block: u32,
    /// Byte offset in the block.
    pub offset: u64,
    /// Payload bytes (`Pages`, `Summary`, `Abort`) or bytes of zero pages (`Zero`).
    pub len: u64,
    /// Arrival time on the emulated link (source clock).
    pub arrival_ns: u64,
}

impl FrameHeader {
    /// Encoded size.
    pub const LEN: usize = 32;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..2].copy_from_slice(&PAGE_MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[4..8].copy_from_slice(&self.block.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.arrival_ns.to_le_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; Self::LEN], chan: Channel) -> Result<Self, WireError> {
        let bad = |what: String| WireError::Malformed(chan, what);
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != PAGE_MAGIC || b[3] != 0 {
            return Err(bad(format!("bad page frame magic {magic:#06x}")));
        }
        let kind = match b[2] {
            1 => FrameKind::Pages,
            2 => FrameKind::Zero,
            3 => FrameKind::Summary,
            4 => FrameKind::Abort,
            5 => FrameKind::Pong,
            k => return Err(bad(format!("unknown page frame kind {k}"))),
        };
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let h = Self {
            kind,
            block: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            offset: u64_at(8),
            len: u64_at(16),
            arrival_ns: u64_at(24),
        };
        if h.kind != FrameKind::Zero && h.len > MAX_PAYLOAD {
            return Err(bad(format!("page frame payload of {} bytes", h.len)));
        }
        Ok(h)
    }

    /// Payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u64 {
        match self.kind {
            FrameKind::Zero | FrameKind::Pong => 0,
            _ => self.len,
        }
    }
}

/// Kinds of return-path frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RpKind {
    /// A page request (body: an `UrgentRequest` frame, possibly malformed).
    Request = 1,
    /// The destination has every page and the guest has finished.
    Done = 2,
    /// Clock probe (before `Start`).
    Ping = 3,
    /// The destination is ready: postcopy starts now.
    Start = 4,
}

/// A return-path frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RpHeader {
    /// What follows.
    pub kind: RpKind,
    /// Body bytes.
    pub len: u32,
    /// When the destination sent it (destination clock).
    pub sent_ns: u64,
}

impl RpHeader {
    /// Encoded size.
    pub const LEN: usize = 16;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..2].copy_from_slice(&RP_MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.sent_ns.to_le_bytes());
        b
    }

    /// Decodes and checks a header (the body is checked by the scheduler).
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let bad = |what: String| WireError::Malformed(Channel::ReturnPath, what);
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != RP_MAGIC || b[3] != 0 {
            return Err(bad(format!("bad return-path frame magic {magic:#06x}")));
        }
        let kind = match b[2] {
            1 => RpKind::Request,
            2 => RpKind::Done,
            3 => RpKind::Ping,
            4 => RpKind::Start,
            k => return Err(bad(format!("unknown return-path frame kind {k}"))),
        };
        let len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if len > MAX_RP_BODY {
            return Err(bad(format!("return-path body of {len} bytes")));
        }
        Ok(Self {
            kind,
            len,
            sent_ns: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        })
    }
}

/// Migration parameters the destination sends to the source when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// 1: main connection, 2: urgent connection of session `token`.
    pub role: u8,
    /// Session token (urgent connection) or 0.
    pub token: u64,
    /// 0 vanilla, 1 preempt, 2 preempt-hint.
    pub mode: u8,
    /// Guest RAM bytes.
    pub mem: u64,
    /// Host page bytes.
    pub host_page: u64,
    /// Image seed.
    pub seed: u64,
    /// Link: bits per second (0 unlimited).
    pub bandwidth_bps: u64,
    /// Link: one-way delay.
    pub delay_ns: u64,
    /// Link: background send queue bytes.
    pub queue_bytes: u64,
    /// Link: interface queue bytes.
    pub nic_queue_bytes: u64,
    /// Background claim batch in target pages.
    pub claim_batch: u64,
    /// Target page where the background scan starts.
    pub scan_start: u64,
    /// Test hook: the source drops both connections after this many host pages (0: never).
    pub drop_after: u64,
    /// Test hook: 0 none, 1 the source corrupts one page, 2 it sends one page twice.
    pub source_fault: u64,
    /// Destination's boot id.
    pub boot_id: [u8; 36],
}

const HELLO_MAGIC: &[u8; 8] = b"PHMIGRT1";
const HELLO_LEN: usize = 8 + 4 + 12 * 8 + 36;

impl Hello {
    /// Encoded size.
    pub const LEN: usize = HELLO_LEN;

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(HELLO_MAGIC);
        b[8] = self.role;
        b[9] = self.mode;
        let vals = [
            self.token,
            self.mem,
            self.host_page,
            self.seed,
            self.bandwidth_bps,
            self.delay_ns,
            self.queue_bytes,
            self.nic_queue_bytes,
            self.claim_batch,
            self.scan_start,
            self.drop_after,
            self.source_fault,
        ];
        for (i, v) in vals.iter().enumerate() {
            b[12 + i * 8..20 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        b[HELLO_LEN - 36..].copy_from_slice(&self.boot_id);
        b
    }

    /// Decodes a hello.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, WireError> {
        if &b[0..8] != HELLO_MAGIC {
            return Err(WireError::Malformed(
                Channel::Handshake,
                "not a pagehint-migrate destination (bad hello)".into(),
            ));
        }
        let v = |i: usize| u64::from_le_bytes(b[12 + i * 8..20 + i * 8].try_into().expect("8"));
        let mut boot_id = [0u8; 36];
        boot_id.copy_from_slice(&b[HELLO_LEN - 36..]);
        Ok(Self {
            role: b[8],
            mode: b[9],
            token: v(0),
            mem: v(1),
            host_page: v(2),
            seed: v(3),
            bandwidth_bps: v(4),
            delay_ns: v(5),
            queue_bytes: v(6),
            nic_queue_bytes: v(7),
            claim_batch: v(8),
            scan_start: v(9),
            drop_after: v(10),
            source_fault: v(11),
            boot_id,
        })
    }
}

/// The source's answer to a hello: `ok | token | boot id | message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    /// Empty when accepted, else why not.
    pub error: String,
    /// Session token for the urgent connection.
    pub token: u64,
    /// Source's boot id.
    pub boot_id: [u8; 36],
}

impl HelloReply {
    /// Writes the reply.
    pub fn write(&self, s: &TcpStream, guard: &Guard<'_>) -> Result<(), WireError> {
        let msg = self.error.as_bytes();
        let mut head = Vec::with_capacity(48);
        head.extend_from_slice(&self.token.to_le_bytes());
        head.extend_from_slice(&self.boot_id);
        head.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        write_parts(s, &[&head, msg], guard, Channel::Handshake)
    }

    /// Reads a reply.
    pub fn read(s: &TcpStream, guard: &Guard<'_>) -> Result<Self, WireError> {
        let mut head = [0u8; 48];
        read_full(s, &mut head, guard, Channel::Handshake)?;
        let len = u32::from_le_bytes(head[44..48].try_into().expect("4 bytes"));
        if len > 4096 {
            return Err(WireError::Malformed(
                Channel::Handshake,
                format!("hello reply message of {len} bytes"),
            ));
        }
        let mut msg = vec![0u8; len as usize];
        read_full(s, &mut msg, guard, Channel::Handshake)?;
        let mut boot_id = [0u8; 36];
        boot_id.copy_from_slice(&head[8..44]);
        Ok(Self {
            error: String::from_utf8_lossy(&msg).into_owned(),
            token: u64::from_le_bytes(head[0..8].try_into().expect("8 bytes")),
            boot_id,
        })
    }
}

/// What the source reports at the end of a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The scheduler's counters.
    pub stats: SchedulerStats,
    /// Host pages written on the background channel.
    pub bg_host_pages: u64,
    /// Host pages written on the urgent channel.
    pub urgent_host_pages: u64,
    /// Of those, all-zero host pages sent as `ZERO` frames.
    pub zero_host_pages: u64,
    /// The first few rejected requests, as the scheduler's error messages.
    pub rejected: Vec<String>,
    /// Checksum of every target page of the source image.
    pub checksums: Vec<u64>,
}

fn stats_fields(s: &SchedulerStats) -> [u64; 16] {
    [
        s.requests,
        s.bad_requests,
        s.requests_queued,
        s.queued_followed,
        s.urgent_host_pages,
        s.urgent_pages,
        s.urgent_already_claimed,
        s.background_claims,
        s.background_host_pages,
        s.background_pages,
        s.background_claims_lost,
        s.hints_offered,
        s.hints_accepted,
        s.hints_refused_pending,
        s.hints_taken,
        s.rounds,
    ]
}

impl Summary {
    /// Encodes the summary.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.checksums.len() * 8);
        let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
        for v in stats_fields(&self.stats) {
            put(v);
        }
        put(self.bg_host_pages);
        put(self.urgent_host_pages);
        put(self.zero_host_pages);
        put(self.rejected.len() as u64);
        put(self.checksums.len() as u64);
        for r in &self.rejected {
            out.extend_from_slice(&(r.len() as u32).to_le_bytes());
            out.extend_from_slice(r.as_bytes());
        }
        for c in &self.checksums {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// Decodes a summary, checking every length.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let bad = || WireError::Malformed(Channel::Background, "truncated summary".into());
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], WireError> {
            let s = b.get(at..at + n).ok_or_else(bad)?;
            at += n;
            Ok(s)
        };
        let mut u = [0u64; 21];
        for v in u.iter_mut() {
            *v = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        }
        let mut stats = SchedulerStats::default();
        stats.requests = u[0];
        stats.bad_requests = u[1];
        stats.requests_queued = u[2];
        stats.queued_followed = u[3];
        stats.urgent_host_pages = u[4];
        stats.urgent_pages = u[5];
        stats.urgent_already_claimed = u[6];
        stats.background_claims = u[7];
        stats.background_host_pages = u[8];
        stats.background_pages = u[9];
        stats.background_claims_lost = u[10];
        stats.hints_offered = u[11];
        stats.hints_accepted = u[12];
        stats.hints_refused_pending = u[13];
        stats.hints_taken = u[14];
        stats.rounds = u[15];
        let (nrej, nsum) = (u[19], u[20]);
        if nrej > 64 || nsum > (b.len() / 8) as u64 {
            return Err(bad());
        }
        let mut rejected = Vec::new();
        for _ in 0..nrej {
            let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
            rejected.push(String::from_utf8_lossy(take(len)?).into_owned());
        }
        let mut checksums = Vec::with_capacity(nsum as usize);
        for _ in 0..nsum {
            checksums.push(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")));
        }
        Ok(Self {
            stats,
            bg_host_pages: u[16],
            urgent_host_pages: u[17],
            zero_host_pages: u[18],
            rejected,
            checksums,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_a_typed_error() {
        let h = FrameHeader {
            kind: FrameKind::Zero,
            block: 0,
            offset: 4096,
            len: 8192,
            arrival_ns: 77,
        };
        assert_eq!(
            FrameHeader::decode(&h.encode(), Channel::Urgent).unwrap(),
            h
        );
        let mut bad = h.encode();
        bad[2] = 9;
        assert!(matches!(
            FrameHeader::decode(&bad, Channel::Urgent),
            Err(WireError::Malformed(Channel::Urgent, _))
        ));
        let r = RpHeader {
            kind: RpKind::Request,
            len: 24,
            sent_ns: 5,
        };
        assert_eq!(RpHeader::decode(&r.encode()).unwrap(), r);
        let mut big = r.encode();
        big[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(RpHeader::decode(&big).is_err());
    }

    #[test]
    fn summary_round_trips_and_rejects_truncation() {
        let mut stats = SchedulerStats::default();
        stats.requests = 3;
        stats.rounds = 1;
        let s = Summary {
            stats,
            bg_host_pages: 10,
            urgent_host_pages: 2,
            zero_host_pages: 1,
            rejected: vec!["bad".into()],
            checksums: vec![1, 2, 3],
        };
        let b = s.encode();
        assert_eq!(Summary::decode(&b).unwrap(), s);
        assert!(Summary::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            role: 1,
            token: 9,
            mode: 2,
            mem: 1 << 30,
            host_page: 4096,
            seed: 1,
            bandwidth_bps: 10,
            delay_ns: 11,
            queue_bytes: 12,
            nic_queue_bytes: 13,
            claim_batch: 16,
            scan_start: 0,
            drop_after: 0,
            source_fault: 2,
            boot_id: [b'x'; 36],
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }
}
