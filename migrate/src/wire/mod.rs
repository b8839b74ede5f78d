//! The harness's wire formats and blocking I/O that never hangs.
//!
//! Two TCP connections per migration, as QEMU's postcopy-preempt has:
//! * **main**: source → destination the precopy pages, the switch-over, then the page frames
//!   of the background channel (and, in vanilla, every page); destination → source the return
//!   path (page requests, `DONE`, pings).
//! * **urgent**: source → destination page frames sent by the return-path thread (preempt);
//!   destination → source the page requests in preempt modes with `resend` (the default),
//!   so that a request never waits behind the main connection's socket, which the
//!   background stream keeps busy in both directions (its lock, its backlog).
//!
//! Every read and write runs with a short socket timeout and is retried until a stop flag is
//! raised or the peer has been silent for the idle limit, so a dead peer or a dropped
//! connection ends the run with a typed [`WireError`], never a hang.
//!
//! * [`frame`]: page frames and return-path frames;
//! * [`hello`]: what the destination asks for, and the source's answer;
//! * [`switch`]: the switch-over from precopy to postcopy (vCPU state, pages to discard);
//! * [`summary`]: what the source reports at the end.

pub mod frame;
pub mod hello;
pub mod summary;
pub mod switch;

pub use frame::{FrameHeader, FrameKind, RpHeader, RpKind};
pub use hello::{Hello, HelloReply, Role};
pub use summary::Summary;
pub use switch::SwitchOver;

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use crate::link::LinkParams;
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

/// On a real link (emulation off), the background channel's socket options: the pacing rate
/// as `SO_MAX_PACING_RATE` (the bandwidth cap, applied by TCP evenly instead of in bursts, so
/// an urgent page on the other socket finds the interface queue nearly empty) and, in preempt
/// modes, the low-water mark as `TCP_NOTSENT_LOWAT` (the sender blocks with at most that many
/// unsent bytes, so claimed pages wait in the bitmap, where a request can still take them,
/// not in the socket, where it cannot). Vanilla keeps the whole send buffer, as QEMU's single
/// channel does: it is the baseline. Nothing on an emulated link, whose model does both.
pub fn configure_background(
    stream: &TcpStream,
    link: &LinkParams,
    preempt: bool,
) -> io::Result<()> {
    if link.emulated() {
        return Ok(());
    }
    let lowat = link.socket_lowat(preempt);
    if lowat > 0 {
        let v = u32::try_from(lowat).unwrap_or(u32::MAX);
        setsockopt_u32(stream, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, v)?;
    }
    if link.pace_bps > 0 {
        let v = u32::try_from(link.pace_bps / 8).unwrap_or(u32::MAX);
        setsockopt_u32(stream, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, v)?;
    }
    Ok(())
}

fn setsockopt_u32(stream: &TcpStream, level: i32, name: i32, v: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor (borrowed from `stream` for the call) and a pointer
    // to a live u32 with its exact length; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&v as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    fn getsockopt_u32(s: &TcpStream, level: i32, name: i32) -> u32 {
        let mut v = 0u32;
        let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: a valid socket and a live u32 with its length; the kernel writes at most it.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&mut v as *mut u32).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

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

    #[test]
    fn a_real_link_gets_the_low_water_mark_in_preempt_modes_and_pacing_always() {
        let real = LinkParams {
            bandwidth_bps: 0,
            lowat_bytes: 1 << 20,
            pace_bps: 8_000_000_000,
            ..LinkParams::DEFAULT
        };
        let lowat = |s: &TcpStream| getsockopt_u32(s, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT);
        let pace = |s: &TcpStream| getsockopt_u32(s, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE);
        let (preempt, _p) = pair();
        configure_background(&preempt, &real, true).unwrap();
        assert_eq!(lowat(&preempt), 1 << 20);
        assert_eq!(pace(&preempt), 1_000_000_000, "bytes per second");
        let (vanilla, _v) = pair();
        let before = lowat(&vanilla);
        configure_background(&vanilla, &real, false).unwrap();
        assert_eq!(
            lowat(&vanilla),
            before,
            "vanilla keeps the whole send buffer"
        );
        assert_eq!(pace(&vanilla), 1_000_000_000);
        // An emulated link models both; the socket is left alone.
        let (emulated, _e) = pair();
        let (p0, l0) = (pace(&emulated), lowat(&emulated));
        configure_background(
            &emulated,
            &LinkParams {
                bandwidth_bps: 10_000_000_000,
                ..real
            },
            true,
        )
        .unwrap();
        assert_eq!((pace(&emulated), lowat(&emulated)), (p0, l0));
    }
}
