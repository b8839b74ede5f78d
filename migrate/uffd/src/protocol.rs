//! Firecracker's page-fault-handler handshake, both sides.
//!
//! Format followed: Firecracker v1.9 and later 1.x releases (`src/vmm/src/persist.rs`,
//! `send_uffd_handshake`; `docs/snapshotting/handling-page-faults-on-snapshot-resume.md`).
//! The handler listens on a Unix stream socket; the VMM connects and sends **one** message:
//! the UTF-8 JSON array of [`GuestRegionUffdMapping`]s as the data, and the userfaultfd as a
//! single `SCM_RIGHTS` descriptor. Nothing else is sent on the socket afterwards (it stays
//! open while the VMM lives; its end is the handler's signal to stop). Each mapping is
//! `{"base_host_virt_addr": u64, "size": usize, "offset": u64, "page_size": usize,
//! "page_size_kib": usize}`, where `page_size` is in **bytes** and `page_size_kib`, despite
//! its name, is the same value in bytes (deprecated, to be removed in Firecracker 2.0).
//! [`parse_mappings`] accepts either field (preferring `page_size`, and refusing the two if
//! they disagree); [`send_handshake`] writes both, as those releases do.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The most JSON the handler accepts (a VMM with many regions stays far below).
pub const MAX_MESSAGE: usize = 1 << 20;

/// Where one region of guest memory is, in the VMM and in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address (in the VMM) of the region's first byte.
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of the region's contents in the memory file.
    pub offset: u64,
    /// The region's page size in bytes (4096, or 2 MiB for hugetlbfs).
    pub page_size: u64,
    /// The deprecated duplicate of `page_size` (bytes, despite the name).
    pub page_size_kib: u64,
}

#[derive(Deserialize)]
struct RawMapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: Option<u64>,
    page_size_kib: Option<u64>,
}

impl GuestRegionUffdMapping {
    /// A mapping of `size` bytes at `base`, backed by the file at `offset`.
    pub fn new(base: u64, size: u64, offset: u64, page_size: u64) -> Self {
        Self {
            base_host_virt_addr: base,
            size,
            offset,
            page_size,
            page_size_kib: page_size,
        }
    }

    /// Whether `addr` is in the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr - self.base_host_virt_addr < self.size
    }
}

/// Why the handshake failed.
#[derive(Debug)]
pub enum ProtocolError {
    /// The VMM closed the socket before sending anything.
    Closed,
    /// Nothing (or not the whole message) arrived in time.
    Timeout(Duration),
    /// The message came without a descriptor.
    MissingDescriptor,
    /// More than one descriptor came with the message.
    ExtraDescriptors(usize),
    /// The data is not UTF-8 JSON of the expected shape.
    Json(serde_json::Error),
    /// Over [`MAX_MESSAGE`] bytes.
    TooLong,
    /// The JSON parsed, but describes impossible regions.
    Invalid(String),
    /// A socket error.
    Io(io::Error),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => write!(f, "the VMM closed the socket before sending the handshake"),
            Self::Timeout(d) => write!(f, "no complete handshake within {d:?}"),
            Self::MissingDescriptor => write!(
                f,
                "the handshake carried no userfaultfd (SCM_RIGHTS descriptor missing)"
            ),
            Self::ExtraDescriptors(n) => {
                write!(f, "the handshake carried {n} descriptors; expected one")
            }
            Self::Json(e) => write!(f, "the region JSON is malformed: {e}"),
            Self::TooLong => write!(f, "the region JSON exceeds {MAX_MESSAGE} bytes"),
            Self::Invalid(why) => write!(f, "the regions are invalid: {why}"),
            Self::Io(e) => write!(f, "socket error during the handshake: {e}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout(Duration::ZERO),
            _ => Self::Io(e),
        }
    }
}

/// Parses and validates the region JSON: at least one region; page sizes 4 KiB or 2 MiB;
/// bases, sizes and offsets page-aligned; sizes non-zero; regions disjoint in memory and in
/// the file; `file_len`, when known, covers every region.
pub fn parse_mappings(
    json: &[u8],
    file_len: Option<u64>,
) -> Result<Vec<GuestRegionUffdMapping>, ProtocolError> {
    let raw: Vec<RawMapping> = serde_json::from_slice(json).map_err(ProtocolError::Json)?;
    let bad = |s: String| Err(ProtocolError::Invalid(s));
    if raw.is_empty() {
        return bad("no regions".into());
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let page_size = match (r.page_size, r.page_size_kib) {
            (Some(a), Some(b)) if a != b => {
                return bad(format!("region {i}: page_size {a} but page_size_kib {b}"))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return bad(format!("region {i}: no page_size")),
        };
        if page_size != 4096 && page_size != 2 << 20 {
            return bad(format!(
                "region {i}: page size {page_size} (4096 or 2097152)"
            ));
        }
        let m = GuestRegionUffdMapping::new(r.base_host_virt_addr, r.size, r.offset, page_size);
        if m.size == 0 || !(m.base_host_virt_addr | m.size | m.offset).is_multiple_of(page_size) {
            return bad(format!(
                "region {i}: base, size or offset not page-aligned, or empty"
            ));
        }
        let (Some(_), Some(file_end)) = (
            m.base_host_virt_addr.checked_add(m.size),
            m.offset.checked_add(m.size),
        ) else {
            return bad(format!("region {i}: overflows"));
        };
        if let Some(len) = file_len {
            if file_end > len {
                return bad(format!(
                    "region {i}: file bytes {}..{file_end} past the memory file's {len}",
                    m.offset
                ));
            }
        }
        for (j, o) in out.iter().enumerate() {
            let o: &GuestRegionUffdMapping = o;
            let overlap = |a: u64, b: u64| a < b + o.size && b < a + m.size;
            if overlap(m.base_host_virt_addr, o.base_host_virt_addr) {
                return bad(format!("regions {j} and {i} overlap in memory"));
            }
            if overlap(m.offset, o.offset) {
                return bad(format!("regions {j} and {i} overlap in the file"));
            }
        }
        out.push(m);
    }
    Ok(out)
}

/// Receives the handshake on an accepted connection: the data with the descriptor, then,
/// if the JSON is not complete yet, more data until it is, all within `timeout`.
pub fn recv_handshake(
    stream: &UnixStream,
    timeout: Duration,
    file_len: Option<u64>,
) -> Result<(Vec<GuestRegionUffdMapping>, OwnedFd), ProtocolError> {
    let to = |e: ProtocolError| match e {
        ProtocolError::Timeout(_) => ProtocolError::Timeout(timeout),
        e => e,
    };
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut data = vec![0u8; 64 << 10];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match recvmsg(
            stream.as_fd(),
            &mut [IoSliceMut::new(&mut data)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(to(io::Error::from(e).into())),
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Err(ProtocolError::Closed);
    }
    data.truncate(msg.bytes);
    if fds.is_empty() {
        return Err(ProtocolError::MissingDescriptor);
    }
    if fds.len() > 1 {
        return Err(ProtocolError::ExtraDescriptors(fds.len()));
    }
    // One sendmsg of Firecracker's arrives whole on a stream socket in practice; a longer
    // message (or a split one) is completed with plain reads until the JSON parses.
    loop {
        match serde_json::from_slice::<serde_json::Value>(&data) {
            Err(e) if e.is_eof() => {}
            _ => break,
        }
        if data.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLong);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(ProtocolError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        let mut more = [0u8; 64 << 10];
        match (&*stream).read(&mut more) {
            Ok(0) => break, // closed mid-message: parse what there is (a clear JSON error)
            Ok(n) => data.extend_from_slice(&more[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(to(e.into())),
        }
    }
    let mappings = parse_mappings(&data, file_len)?;
    let fd = fds.pop().ok_or(ProtocolError::MissingDescriptor)?;
    Ok((mappings, fd))
}

/// The VMM's side: connects to the handler's socket at `path` and sends the mappings and the
/// descriptor in one message (what Firecracker does on `PUT /snapshot/load` with a `Uffd`
/// memory backend). Returns the connection, which the VMM keeps open while it runs.
pub fn send_handshake(
    path: &Path,
    mappings: &[GuestRegionUffdMapping],
    uffd: impl AsFd,
) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    let body = serde_json::to_vec(mappings).map_err(io::Error::other)?;
    send_raw(&stream, &body, Some(uffd.as_fd()))?;
    Ok(stream)
}

/// Sends `body` with `fd` (if any) as one `SCM_RIGHTS` message (tests use it to send
/// malformed handshakes).
pub fn send_raw(
    stream: &UnixStream,
    body: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("control buffer too small"));
        }
    }
    let mut sent = 0;
    while sent < body.len() || (sent == 0 && body.is_empty()) {
        let n = sendmsg(
            stream.as_fd(),
            &[IoSlice::new(&body[sent..])],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        // The descriptor goes with the first part only.
        control.clear();
        sent += n;
        if body.is_empty() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_json_parses_with_either_page_size_field() {
        let both = br#"[{"base_host_virt_addr":140000000000000,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let m = parse_mappings(both, Some(8192)).unwrap();
        assert_eq!(
            m[0],
            GuestRegionUffdMapping::new(140000000000000, 8192, 0, 4096)
        );
        let new = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#;
        assert_eq!(parse_mappings(new, None).unwrap()[0].page_size, 4096);
        let old = br#"[{"base_host_virt_addr":2097152,"size":2097152,"offset":0,"page_size_kib":2097152}]"#;
        assert_eq!(parse_mappings(old, None).unwrap()[0].page_size, 2 << 20);
        // What we send is what Firecracker sends.
        let out = serde_json::to_string(&m).unwrap();
        assert_eq!(out.as_bytes(), &both[..]);
    }

    #[test]
    fn impossible_regions_are_refused_with_a_reason() {
        for (json, want) in [
            (&b"[]"[..], "no regions"),
            (br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#, "no page_size"),
            (br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#, "page_size_kib 4"),
            (br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":1000}]"#, "page size 1000"),
            (br#"[{"base_host_virt_addr":4097,"size":4096,"offset":0,"page_size":4096}]"#, "aligned"),
            (br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#, "overlap in memory"),
            (br#"[{"base_host_virt_addr":4096,"size":4096,"offset":4096,"page_size":4096}]"#, "past the memory file"),
        ] {
            let file = if want.starts_with("past") { 4096 } else { 1 << 20 };
            match parse_mappings(json, Some(file)) {
                Err(ProtocolError::Invalid(why)) => assert!(why.contains(want), "{why}"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(json)),
            }
        }
        assert!(matches!(
            parse_mappings(b"{not json", None),
            Err(ProtocolError::Json(_))
        ));
        assert!(matches!(
            parse_mappings(
                br#"[{"base_host_virt_addr":"x","size":1,"offset":0}]"#,
                None
            ),
            Err(ProtocolError::Json(_))
        ));
    }
}
