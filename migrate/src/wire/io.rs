//! The I/O base of the wire: blocking reads and writes that never hang, and the typed error
//! every connection failure becomes.
//!
//! Every read and write runs with a short socket timeout ([`POLL_SLICE`]) and is retried
//! until a stop flag is raised or the peer has been silent for the idle limit ([`Guard`]),
//! so a dead peer or a dropped connection ends the run with a typed [`WireError`], never a
//! hang.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use crate::sys::clock::now_ns;

/// The socket timeout each blocking call waits before re-checking the stop flag.
pub const POLL_SLICE: Duration = Duration::from_millis(100);

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
    /// Both connections at once (the background and the urgent channel fell silent
    /// together: a partition, or a source that stopped).
    Both,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Background => "background channel",
            Self::Urgent => "urgent channel",
            Self::ReturnPath => "return path",
            Self::Handshake => "handshake",
            Self::Both => "background and urgent channels (both connections)",
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
    /// The source reported an error and aborted (its `ABORT` frame, read by the
    /// destination).
    PeerAbort(Channel, String),
    /// This side was asked to stop.
    Stopped,
    /// Test hook: this side (the source) dropped both connections on purpose after this many
    /// host pages, as a crashed source would.
    Dropped(u64),
    /// Test hook: this side (the source) cut both connections on purpose after this many
    /// host pages on them, as a broken network would; the session waits to be resumed.
    Cut(u64),
}

impl WireError {
    /// Whether the connections themselves failed (closed, silent, reset, or cut by the test
    /// hook), so that postcopy recovery may resume the session on new ones. A protocol
    /// error, the peer's `ABORT`, a stop or the crash hook's drop is final.
    pub fn connection_lost(&self) -> bool {
        matches!(
            self,
            Self::Closed(_) | Self::Timeout(..) | Self::Io(..) | Self::Cut(_)
        )
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed(c) => write!(f, "connection lost: the peer closed the {c}"),
            Self::Timeout(c, d) => write!(f, "connection lost: nothing on the {c} for {d:?}"),
            Self::Io(c, e) => write!(f, "connection lost on the {c}: {e}"),
            Self::Malformed(c, what) => write!(f, "protocol error on the {c}: {what}"),
            Self::PeerAbort(c, msg) => write!(f, "the source aborted ({c}): {msg}"),
            Self::Stopped => write!(f, "stopped"),
            Self::Dropped(n) => write!(
                f,
                "connections dropped on purpose after {n} host pages (test hook)"
            ),
            Self::Cut(n) => write!(
                f,
                "connections cut on purpose after {n} host pages on them (test hook)"
            ),
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
    match poll(&mut fds, Some(&crate::sys::clock::timespec(timeout_ns))) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whose_they_are() {
        // The source's own test-hook drop is not the peer aborting.
        let d = WireError::Dropped(1000).to_string();
        assert_eq!(
            d,
            "connections dropped on purpose after 1000 host pages (test hook)"
        );
        let a = WireError::PeerAbort(Channel::Background, "no memory".into()).to_string();
        assert_eq!(a, "the source aborted (background channel): no memory");
        let both = WireError::Timeout(Channel::Both, Duration::from_secs(20)).to_string();
        assert!(
            both.contains("nothing on the background and urgent channels"),
            "{both}"
        );
    }
}
