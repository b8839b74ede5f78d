//! A remote source of pages over TCP: pull-mode postcopy in Cloud Hypervisor's shape (the
//! destination asks for each page it needs; the source answers), for `pagehint-uffd serve
//! --remote` and `pagehint-uffd mem-server`.
//!
//! # The format (ours; all integers little-endian)
//! * **Hello**, client → server: the 8 bytes `PHMEMRQ1`. Server → client: `PHMEMRS1`, then
//!   the memory's length in bytes (u64).
//! * **Request**: file offset (u64), length (u32, 1..=[`MAX_REQUEST`]).
//! * **Answer**: status (u8): `0` then exactly the requested bytes; `1` then a message length
//!   (u32, at most [`MAX_MESSAGE`]) and the message (UTF-8): the request was refused (out of
//!   range, too long, or the server could not read it); the connection stays usable.
//!
//! One request is outstanding per connection. [`RemoteSource`] keeps a pool of connections so
//! that the event thread's fault requests never queue behind a prefetcher's: each call takes a
//! free connection, and only waits when every one is busy.
//!
//! A broken or hostile server ends the call with a typed [`RemoteError`] (wrapped in the
//! `io::Error` that [`PageSource::read_at`] returns; `io::Error::get_ref` and `downcast_ref`
//! recover it): a wrong greeting, a length other than the one asked for, an unknown status, a
//! message too long, silence past the timeout, or a closed connection. Nothing the server
//! sends sizes an allocation. A connection that failed is dropped and reopened on next use.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use super::source::PageSource;

/// The client's greeting.
pub const CLIENT_MAGIC: [u8; 8] = *b"PHMEMRQ1";
/// The server's greeting.
pub const SERVER_MAGIC: [u8; 8] = *b"PHMEMRS1";
/// The longest request: one 2 MiB huge page.
pub const MAX_REQUEST: u32 = 2 << 20;
/// The longest refusal message.
pub const MAX_MESSAGE: u32 = 4096;

const STATUS_OK: u8 = 0;
const STATUS_REFUSED: u8 = 1;

/// Why the remote source failed.
#[derive(Debug)]
pub enum RemoteError {
    /// Connecting failed.
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: io::Error,
    },
    /// The address did not resolve.
    Resolve(String),
    /// The server's greeting was not `PHMEMRS1`.
    BadGreeting([u8; 8]),
    /// The server closed the connection (mid-answer, or before answering).
    Closed,
    /// The server was silent past the timeout.
    Timeout(Duration),
    /// An answer with a status other than 0 or 1.
    BadStatus(u8),
    /// A refusal message longer than [`MAX_MESSAGE`].
    MessageTooLong(u32),
    /// The server refused the request.
    Refused(String),
    /// A request the server could never answer (the handler's bug): too long, or past the
    /// memory's end.
    BadRequest {
        /// Offset asked.
        offset: u64,
        /// Bytes asked.
        len: usize,
        /// The memory's length.
        size: u64,
    },
    /// Another I/O error.
    Io(io::Error),
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { addr, error } => write!(f, "connecting to {addr}: {error}"),
            Self::Resolve(a) => write!(f, "{a}: no address"),
            Self::BadGreeting(m) => write!(f, "not a pagehint memory server (greeting {m:02x?})"),
            Self::Closed => f.write_str("the memory server closed the connection"),
            Self::Timeout(t) => write!(f, "the memory server was silent for {t:?}"),
            Self::BadStatus(s) => write!(f, "the memory server answered with status {s}"),
            Self::MessageTooLong(n) => write!(f, "the memory server sent a {n}-byte message"),
            Self::Refused(m) => write!(f, "the memory server refused: {m}"),
            Self::BadRequest { offset, len, size } => write!(
                f,
                "{len} bytes at {offset:#x} cannot be asked of {size} bytes of memory"
            ),
            Self::Io(e) => write!(f, "memory server: {e}"),
        }
    }
}

impl std::error::Error for RemoteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect { error, .. } | Self::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<RemoteError> for io::Error {
    fn from(e: RemoteError) -> Self {
        io::Error::other(e)
    }
}

/// Maps a read or write failure on the connection.
fn wire(e: io::Error, timeout: Duration) -> RemoteError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => RemoteError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RemoteError::Timeout(timeout),
        _ => RemoteError::Io(e),
    }
}

/// Pages fetched from a [`serve_memory`] server over TCP.
#[derive(Debug)]
pub struct RemoteSource {
    addr: SocketAddr,
    timeout: Duration,
    size: u64,
    /// Connections (`None`: not open, or dropped after a failure).
    pool: Box<[Mutex<Option<TcpStream>>]>,
}

impl RemoteSource {
    /// Connects to `addr` (one connection, to learn the memory's length), with room for
    /// `connections` requests in flight (at least one); every read and write waits at most
    /// `timeout`.
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Display,
        connections: usize,
        timeout: Duration,
    ) -> Result<Self, RemoteError> {
        let name = addr.to_string();
        let addr = addr
            .to_socket_addrs()
            .map_err(|_| RemoteError::Resolve(name.clone()))?
            .next()
            .ok_or(RemoteError::Resolve(name))?;
        let (stream, size) = open(addr, timeout)?;
        let pool: Box<[_]> = (0..connections.max(1)).map(|_| Mutex::new(None)).collect();
        *pool[0].lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
        Ok(Self {
            addr,
            timeout,
            size,
            pool,
        })
    }

    /// A free connection, or (all busy) the first one once it is free.
    fn connection(&self) -> MutexGuard<'_, Option<TcpStream>> {
        for slot in self.pool.iter() {
            match slot.try_lock() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.pool[0].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches `buf.len()` bytes at `offset`.
    pub fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let len = buf.len();
        if len == 0
            || len > MAX_REQUEST as usize
            || offset
                .checked_add(len as u64)
                .is_none_or(|end| end > self.size)
        {
            return Err(RemoteError::BadRequest {
                offset,
                len,
                size: self.size,
            });
        }
        let mut slot = self.connection();
        if slot.is_none() {
            let (s, size) = open(self.addr, self.timeout)?;
            if size != self.size {
                return Err(RemoteError::Refused(format!(
                    "the memory changed length ({} then {size} bytes)",
                    self.size
                )));
            }
            *slot = Some(s);
        }
        let stream = slot.as_mut().expect("opened above");
        let r = request(stream, offset, buf, self.timeout);
        if matches!(r, Err(ref e) if !matches!(e, RemoteError::Refused(_))) {
            // The stream's position in the exchange is unknown: never reuse it.
            *slot = None;
        }
        r
    }
}

impl PageSource for RemoteSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.fetch(offset, buf).map_err(io::Error::from)
    }
    fn size(&self) -> Option<u64> {
        Some(self.size)
    }
}

fn open(addr: SocketAddr, timeout: Duration) -> Result<(TcpStream, u64), RemoteError> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|error| RemoteError::Connect { addr, error })?;
    let w = |e| wire(e, timeout);
    s.set_nodelay(true).map_err(RemoteError::Io)?;
    s.set_read_timeout(Some(timeout)).map_err(RemoteError::Io)?;
    s.set_write_timeout(Some(timeout))
        .map_err(RemoteError::Io)?;
    s.write_all(&CLIENT_MAGIC).map_err(w)?;
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello).map_err(w)?;
    let magic: [u8; 8] = hello[..8].try_into().expect("8 bytes");
    if magic != SERVER_MAGIC {
        return Err(RemoteError::BadGreeting(magic));
    }
    let size = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes"));
    Ok((s, size))
}

fn request(
    s: &mut TcpStream,
    offset: u64,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<(), RemoteError> {
    let w = |e| wire(e, timeout);
    let mut req = [0u8; 12];
    req[..8].copy_from_slice(&offset.to_le_bytes());
    // At most MAX_REQUEST (checked by the caller).
    req[8..].copy_from_slice(&(buf.len() as u32).to_le_bytes());
    s.write_all(&req).map_err(w)?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(w)?;
    match status[0] {
        STATUS_OK => s.read_exact(buf).map_err(w),
        STATUS_REFUSED => {
            let mut n = [0u8; 4];
            s.read_exact(&mut n).map_err(w)?;
            let n = u32::from_le_bytes(n);
            if n > MAX_MESSAGE {
                return Err(RemoteError::MessageTooLong(n));
            }
            let mut m = vec![0u8; n as usize];
            s.read_exact(&mut m).map_err(w)?;
            Err(RemoteError::Refused(
                String::from_utf8_lossy(&m).into_owned(),
            ))
        }
        other => Err(RemoteError::BadStatus(other)),
    }
}

/// What a [`serve_memory`] session did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServeStats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests answered with data.
    pub answered: u64,
    /// Requests refused.
    pub refused: u64,
    /// Connections dropped for a bad greeting or a broken exchange.
    pub dropped: u64,
}

/// Serves `source` on `listener` (the remote side of pull-mode postcopy) until `stop` is set,
/// one thread per connection. A client that misbehaves only loses its own connection.
pub fn serve_memory(
    listener: &TcpListener,
    source: &dyn PageSource,
    stop: &AtomicBool,
    idle: Duration,
) -> io::Result<ServeStats> {
    let size = source.size().unwrap_or(0);
    listener.set_nonblocking(true)?;
    let stats = Mutex::new(ServeStats::default());
    std::thread::scope(|s| {
        // Relaxed: a polled flag; stopping late only serves longer.
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    stats.lock().unwrap_or_else(|p| p.into_inner()).connections += 1;
                    let stats = &stats;
                    s.spawn(move || {
                        let r = serve_one(conn, source, size, stop, idle);
                        let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
                        st.answered += r.0;
                        st.refused += r.1;
                        st.dropped += u64::from(r.2);
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })?;
    Ok(stats.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// How a read of a whole buffer ended.
enum Got {
    All,
    /// The peer closed before the first byte.
    Closed,
    /// Closed mid-buffer, silent past the idle limit, or failed.
    Broken,
    /// `stop` was set.
    Stopped,
}

/// One connection: (answered, refused, dropped).
fn serve_one(
    mut c: TcpStream,
    source: &dyn PageSource,
    size: u64,
    stop: &AtomicBool,
    idle: Duration,
) -> (u64, u64, bool) {
    let (mut answered, mut refused) = (0, 0);
    let slice = Duration::from_millis(100);
    if c.set_nonblocking(false).is_err()
        || c.set_nodelay(true).is_err()
        || c.set_read_timeout(Some(slice)).is_err()
        || c.set_write_timeout(Some(idle)).is_err()
    {
        return (0, 0, true);
    }
    // Reads `buf` whole, waiting at most `idle` of silence and checking `stop` meanwhile.
    let read_all = |c: &mut TcpStream, buf: &mut [u8]| -> Got {
        let mut got = 0;
        let mut waited = Duration::ZERO;
        while got < buf.len() {
            // Relaxed: a polled flag.
            if stop.load(Ordering::Relaxed) {
                return Got::Stopped;
            }
            match c.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Got::Closed,
                Ok(0) => return Got::Broken,
                Ok(n) => {
                    got += n;
                    waited = Duration::ZERO;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    waited += slice;
                    if waited >= idle {
                        return Got::Broken;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Got::Broken,
            }
        }
        Got::All
    };
    let mut hello = [0u8; 8];
    match read_all(&mut c, &mut hello) {
        Got::All if hello == CLIENT_MAGIC => {}
        Got::Stopped => return (0, 0, false),
        _ => return (0, 0, true),
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&SERVER_MAGIC);
    reply[8..].copy_from_slice(&size.to_le_bytes());
    if c.write_all(&reply).is_err() {
        return (0, 0, true);
    }
    // An answer with data: the status in byte 0, then the bytes, sent in one write (under
    // TCP_NODELAY, two writes would send the status byte in a segment of its own).
    let mut data = Vec::new();
    loop {
        let mut req = [0u8; 12];
        match read_all(&mut c, &mut req) {
            Got::All => {}
            // Closed between requests, or the server stops: not the client's fault.
            Got::Closed | Got::Stopped => return (answered, refused, false),
            Got::Broken => return (answered, refused, true),
        }
        let offset = u64::from_le_bytes(req[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(req[8..].try_into().expect("4 bytes"));
        let in_range = len > 0
            && len <= MAX_REQUEST
            && offset
                .checked_add(u64::from(len))
                .is_some_and(|e| e <= size);
        let answer = if in_range {
            data.resize(1 + len as usize, 0);
            data[0] = STATUS_OK;
            source
                .read_at(offset, &mut data[1..])
                .map_err(|e| format!("reading {len} bytes at {offset:#x}: {e}"))
        } else {
            Err(format!(
                "{len} bytes at {offset:#x}: outside {size} bytes (or over {MAX_REQUEST})"
            ))
        };
        let sent = match answer {
            Ok(()) => {
                answered += 1;
                c.write_all(&data)
            }
            Err(m) => {
                refused += 1;
                let m = &m.as_bytes()[..m.len().min(MAX_MESSAGE as usize)];
                let mut head = vec![STATUS_REFUSED];
                // At most MAX_MESSAGE.
                head.extend_from_slice(&(m.len() as u32).to_le_bytes());
                head.extend_from_slice(m);
                c.write_all(&head)
            }
        };
        if sent.is_err() {
            return (answered, refused, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    struct Bytes(Vec<u8>);
    impl PageSource for Bytes {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn size(&self) -> Option<u64> {
            Some(self.0.len() as u64)
        }
    }

    fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[test]
    fn pages_come_back_from_a_real_server_and_bad_requests_are_refused() {
        let mem = Bytes(
            (0..64 * 4096u32)
                .map(|i| (i * 7 + i / 4096) as u8)
                .collect(),
        );
        let (l, addr) = listener();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let server = s.spawn(|| serve_memory(&l, &mem, &stop, Duration::from_secs(5)));
            let src = RemoteSource::connect(addr, 3, Duration::from_secs(5)).unwrap();
            assert_eq!(src.size(), Some(64 * 4096));
            std::thread::scope(|t| {
                for k in 0..3u64 {
                    let src = &src;
                    let mem = &mem;
                    t.spawn(move || {
                        let mut buf = vec![0u8; 4096];
                        for p in (k..64).step_by(3) {
                            src.read_at(p * 4096, &mut buf).unwrap();
                            assert_eq!(buf[..], mem.0[(p * 4096) as usize..][..4096]);
                        }
                    });
                }
            });
            let mut buf = vec![0u8; 4096];
            let e = src.fetch(64 * 4096, &mut buf).unwrap_err();
            assert!(matches!(e, RemoteError::BadRequest { .. }), "{e}");
            // Relaxed: a polled flag.
            stop.store(true, Ordering::Relaxed);
            let st = server.join().unwrap().unwrap();
            assert_eq!(st.answered, 64);
            assert_eq!(st.dropped, 0);
        });
    }

    /// A server that greets (or not) and then answers every request with `answer`.
    fn hostile(greeting: &'static [u8], answer: &'static [u8]) -> SocketAddr {
        let (l, addr) = listener();
        std::thread::spawn(move || {
            while let Ok((mut c, _)) = l.accept() {
                let mut hello = [0u8; 8];
                if c.read_exact(&mut hello).is_err() {
                    continue;
                }
                let _ = c.write_all(greeting);
                let mut req = [0u8; 12];
                while c.read_exact(&mut req).is_ok() {
                    if c.write_all(answer).is_err() {
                        break;
                    }
                    if answer.is_empty() {
                        std::thread::sleep(Duration::from_secs(2));
                        break;
                    }
                }
            }
        });
        addr
    }

    fn greeting() -> &'static [u8] {
        b"PHMEMRS1\x00\x00\x01\x00\x00\x00\x00\x00" // 65,536 bytes
    }

    #[test]
    fn broken_or_hostile_servers_give_typed_errors_not_hangs() {
        let t = Duration::from_millis(300);
        let e = RemoteSource::connect(hostile(b"HTTP/1.1 200 OK\r\n", b""), 1, t).unwrap_err();
        assert!(matches!(e, RemoteError::BadGreeting(_)), "{e}");

        // Short data, then the connection closes: Closed.
        let src = RemoteSource::connect(hostile(greeting(), b"\x00abc"), 1, t).unwrap();
        let mut buf = vec![0u8; 4096];
        // The hostile server keeps the socket open after the short answer until its next
        // read fails: the client times out or sees the close, both typed.
        let e = src.fetch(0, &mut buf).unwrap_err();
        assert!(
            matches!(e, RemoteError::Closed | RemoteError::Timeout(_)),
            "{e}"
        );

        let src = RemoteSource::connect(hostile(greeting(), b"\x07"), 1, t).unwrap();
        let e = src.fetch(0, &mut buf).unwrap_err();
        assert!(matches!(e, RemoteError::BadStatus(7)), "{e}");

        // A refusal claiming a 4 GiB message: refused without allocating it.
        let src =
            RemoteSource::connect(hostile(greeting(), b"\x01\xff\xff\xff\xff"), 1, t).unwrap();
        let e = src.fetch(0, &mut buf).unwrap_err();
        assert!(matches!(e, RemoteError::MessageTooLong(u32::MAX)), "{e}");

        // Silence: Timeout, within about the timeout.
        let src = RemoteSource::connect(hostile(greeting(), b""), 1, t).unwrap();
        let at = std::time::Instant::now();
        let e = src.fetch(0, &mut buf).unwrap_err();
        assert!(matches!(e, RemoteError::Timeout(_)), "{e}");
        assert!(at.elapsed() < Duration::from_secs(2));

        // Past the end the server announced: refused before asking.
        let e = src.fetch(65_536 - 100, &mut buf).unwrap_err();
        assert!(matches!(e, RemoteError::BadRequest { .. }), "{e}");

        // Nobody listening.
        let (l, addr) = listener();
        drop(l);
        let e = RemoteSource::connect(addr, 1, t).unwrap_err();
        assert!(matches!(e, RemoteError::Connect { .. }), "{e}");
        // The io::Error the handler sees carries the typed error.
        let io: io::Error = e.into();
        assert!(io
            .get_ref()
            .and_then(|e| e.downcast_ref::<RemoteError>())
            .is_some());
    }

    #[test]
    fn a_hostile_client_only_loses_its_connection() {
        let mem = Bytes(vec![5u8; 8192]);
        let (l, addr) = listener();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let server = s.spawn(|| serve_memory(&l, &mem, &stop, Duration::from_millis(500)));
            // Wrong greeting.
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET / HT").unwrap();
            // A huge request: refused, the connection stays usable.
            let src = RemoteSource::connect(addr, 1, Duration::from_secs(5)).unwrap();
            let mut c2 = TcpStream::connect(addr).unwrap();
            c2.write_all(&CLIENT_MAGIC).unwrap();
            let mut hello = [0u8; 16];
            c2.read_exact(&mut hello).unwrap();
            c2.write_all(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
                .unwrap();
            let mut st = [0u8; 1];
            c2.read_exact(&mut st).unwrap();
            assert_eq!(st[0], STATUS_REFUSED);
            drop(c2);
            let mut buf = vec![0u8; 4096];
            src.fetch(4096, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 5));
            // Relaxed: a polled flag.
            stop.store(true, Ordering::Relaxed);
            let st = server.join().unwrap().unwrap();
            assert_eq!(st.answered, 1);
            assert_eq!(st.refused, 1);
            assert!(st.dropped >= 1);
        });
    }
}
