//! Firecracker's page-fault-handler handshake, both sides, for every Firecracker 1.x
//! release that sends a page size.
//!
//! The handler listens on a Unix stream socket; on `PUT /snapshot/load` with a `Uffd` memory
//! backend the VMM connects and sends **one** message (`send_uffd_handshake` in
//! `src/vmm/src/persist.rs`): the compact JSON array of `GuestRegionUffdMapping`s
//! (`serde_json::to_string`) as the data, and its userfaultfd (opened non-blocking, with
//! `UFFD_FEATURE_EVENT_REMOVE`) as a single `SCM_RIGHTS` descriptor. Nothing else is ever
//! sent on the socket. Checked against the sources of every release tag v1.7.0–v1.16.1:
//!
//! | releases | fields, in order | the socket after the message |
//! |---|---|---|
//! | v1.7.0–v1.11.0 ([`HandshakeFormat::PageSizeKib`]) | `base_host_virt_addr`, `size`, `offset`, `page_size_kib` | closed at once (the stream is dropped when `send_uffd_handshake` returns) |
//! | v1.12.0–v1.16.1 ([`HandshakeFormat::PageSizeBoth`]) | `base_host_virt_addr`, `size`, `offset`, `page_size`, `page_size_kib` | kept open until the VMM exits (`forget(socket)`) |
//!
//! Both page-size fields hold **bytes** (4096, or 2097152 for hugetlbfs), whatever the name
//! (`page_size_kib` is deprecated, to be removed in Firecracker 2.0). Releases before v1.7
//! send no page size and are not served. The format of a message tells the releases apart,
//! and so what the socket's end means: with [`HandshakeFormat::PageSizeBoth`] the VMM has
//! exited; with [`HandshakeFormat::PageSizeKib`] nothing (the handler keeps serving and ends
//! when the VMM's process does, see [`crate::handler`]). [`parse_handshake`] accepts either
//! format (refusing a page size the two fields disagree on, or a mix of formats);
//! [`HandshakeFormat::encode`] writes exactly the bytes each release sends.
//!
//! The VMM's process id comes from the socket (`SO_PEERCRED`, the credentials at `connect`),
//! as Firecracker's example handler takes it: the handler kills that process when it fails,
//! so that its vCPUs do not wait forever for pages that will not come.

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

/// Which Firecracker releases' handshake a message follows (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HandshakeFormat {
    /// v1.7.0–v1.11.0: `page_size_kib` only; the socket is closed right after the message.
    #[serde(rename = "v1.7-v1.11")]
    PageSizeKib,
    /// v1.12.0 and later: `page_size` and `page_size_kib`; the socket stays open while the
    /// VMM runs.
    #[serde(rename = "v1.12+")]
    PageSizeBoth,
}

/// One region as v1.7.0–v1.11.0 serialize it (field order matters for the exact bytes).
#[derive(Serialize)]
struct MappingKib {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size_kib: u64,
}

impl HandshakeFormat {
    /// The format a Firecracker release sends (`1.9`, `v1.9.1`, `1.12.0`, ...).
    pub fn of_release(version: &str) -> Result<Self, String> {
        let v = version.trim_start_matches('v');
        let mut parts = v.split('.');
        let (major, minor) = (parts.next(), parts.next());
        let num = |p: Option<&str>| p.and_then(|s| s.parse::<u32>().ok());
        match (num(major), num(minor)) {
            (Some(1), Some(m)) if m >= 12 => Ok(Self::PageSizeBoth),
            (Some(1), Some(m)) if m >= 7 => Ok(Self::PageSizeKib),
            (Some(1), Some(_)) => Err(format!(
                "Firecracker {version} sends no page size in its handshake (v1.7 and later do)"
            )),
            _ => Err(format!(
                "{version}: a Firecracker 1.x release, e.g. 1.9 or 1.12"
            )),
        }
    }

    /// The releases, in words.
    pub fn releases(self) -> &'static str {
        match self {
            Self::PageSizeKib => "Firecracker v1.7-v1.11",
            Self::PageSizeBoth => "Firecracker v1.12 and later",
        }
    }

    /// Whether the VMM keeps the socket open while it runs (so that its end means the VMM
    /// has gone).
    pub fn keeps_socket(self) -> bool {
        match self {
            Self::PageSizeKib => false,
            Self::PageSizeBoth => true,
        }
    }

    /// The message's data, byte for byte as those releases write it (`serde_json::to_string`
    /// of their `Vec<GuestRegionUffdMapping>`).
    pub fn encode(self, mappings: &[GuestRegionUffdMapping]) -> Vec<u8> {
        let out = match self {
            Self::PageSizeBoth => serde_json::to_vec(mappings),
            Self::PageSizeKib => serde_json::to_vec(
                &mappings
                    .iter()
                    .map(|m| MappingKib {
                        base_host_virt_addr: m.base_host_virt_addr,
                        size: m.size,
                        offset: m.offset,
                        page_size_kib: m.page_size,
                    })
                    .collect::<Vec<_>>(),
            ),
        };
        // Integers only: serialization cannot fail.
        out.unwrap_or_default()
    }
}

/// A received handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The regions.
    pub mappings: Vec<GuestRegionUffdMapping>,
    /// Which releases' format it followed.
    pub format: HandshakeFormat,
    /// The userfaultfd (not yet checked: see `Userfault::from_received`).
    pub fd: OwnedFd,
    /// The VMM's process id (`SO_PEERCRED`), where the socket tells it.
    pub peer_pid: Option<i32>,
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

/// Parses and validates the region JSON (see [`parse_handshake`]).
pub fn parse_mappings(
    json: &[u8],
    file_len: Option<u64>,
) -> Result<Vec<GuestRegionUffdMapping>, ProtocolError> {
    parse_handshake(json, file_len).map(|(m, _)| m)
}

/// Parses and validates the region JSON, and says which releases' format it follows: at
/// least one region; every region in one format; page sizes 4 KiB or 2 MiB; bases, sizes
/// and offsets page-aligned; sizes non-zero; regions disjoint in memory and in the file;
/// `file_len`, when known, covers every region.
pub fn parse_handshake(
    json: &[u8],
    file_len: Option<u64>,
) -> Result<(Vec<GuestRegionUffdMapping>, HandshakeFormat), ProtocolError> {
    let raw: Vec<RawMapping> = serde_json::from_slice(json).map_err(ProtocolError::Json)?;
    let bad = |s: String| Err(ProtocolError::Invalid(s));
    if raw.is_empty() {
        return bad("no regions".into());
    }
    let format = if raw[0].page_size.is_some() {
        HandshakeFormat::PageSizeBoth
    } else {
        HandshakeFormat::PageSizeKib
    };
    if let Some(i) = raw
        .iter()
        .position(|r| r.page_size.is_some() != (format == HandshakeFormat::PageSizeBoth))
    {
        return bad(format!(
            "region {i} gives page_size and region 0 does not, or the other way round"
        ));
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
    Ok((out, format))
}

/// The process id of the socket's peer (`SO_PEERCRED`: the process that connected).
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let c = rustix::net::sockopt::socket_peercred(stream).ok()?;
    Some(c.pid.as_raw_nonzero().get())
}

/// Receives the handshake on an accepted connection: the data with the descriptor, then,
/// if the JSON is not complete yet, more data until it is, all within `timeout`.
pub fn recv_handshake(
    stream: &UnixStream,
    timeout: Duration,
    file_len: Option<u64>,
) -> Result<Handshake, ProtocolError> {
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
    let (mappings, format) = parse_handshake(&data, file_len)?;
    let fd = fds.pop().ok_or(ProtocolError::MissingDescriptor)?;
    Ok(Handshake {
        mappings,
        format,
        fd,
        peer_pid: peer_pid(stream),
    })
}

/// The VMM's side: connects to the handler's socket at `path` (waiting up to `wait` for a
/// handler to listen there) and sends the mappings and the descriptor in one message, in
/// `format`, as those Firecracker releases do on `PUT /snapshot/load` with a `Uffd` memory
/// backend. Returns the connection where the format keeps it open (v1.12+; the VMM holds it
/// while it runs), `None` where the releases close it at once (v1.7–v1.11).
pub fn send_handshake(
    path: &Path,
    mappings: &[GuestRegionUffdMapping],
    uffd: impl AsFd,
    format: HandshakeFormat,
    wait: Duration,
) -> io::Result<Option<UnixStream>> {
    let deadline = std::time::Instant::now() + wait;
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            // No handler listening yet (it may be starting): try again until `wait` is up.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    };
    send_raw(&stream, &format.encode(mappings), Some(uffd.as_fd()))?;
    Ok(format.keeps_socket().then_some(stream))
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

    /// Every release tag from v1.7.0 to v1.16.1, and the format its `persist.rs` sends
    /// (read from each tag's source: the `GuestRegionUffdMapping` fields, and whether
    /// `send_uffd_handshake` forgets the socket).
    const RELEASES: [(&str, HandshakeFormat); 21] = {
        use HandshakeFormat::{PageSizeBoth as B, PageSizeKib as K};
        [
            ("v1.7.0", K),
            ("v1.8.0", K),
            ("v1.9.0", K),
            ("v1.9.1", K),
            ("v1.10.0", K),
            ("v1.10.1", K),
            ("v1.11.0", K),
            ("v1.12.0", B),
            ("v1.12.1", B),
            ("v1.13.0", B),
            ("v1.13.1", B),
            ("v1.13.2", B),
            ("v1.14.0", B),
            ("v1.14.1", B),
            ("v1.14.2", B),
            ("v1.14.3", B),
            ("v1.14.4", B),
            ("v1.15.0", B),
            ("v1.15.1", B),
            ("v1.16.0", B),
            ("v1.16.1", B),
        ]
    };

    #[test]
    fn each_release_maps_to_its_format_and_older_ones_are_refused() {
        for (tag, want) in RELEASES {
            assert_eq!(HandshakeFormat::of_release(tag), Ok(want), "{tag}");
        }
        assert_eq!(
            HandshakeFormat::of_release("1.9"),
            Ok(HandshakeFormat::PageSizeKib)
        );
        assert!(HandshakeFormat::of_release("1.6.0")
            .unwrap_err()
            .contains("no page size"));
        assert!(HandshakeFormat::of_release("2.0").is_err());
        assert!(HandshakeFormat::of_release("latest").is_err());
        assert!(!HandshakeFormat::PageSizeKib.keeps_socket());
        assert!(HandshakeFormat::PageSizeBoth.keeps_socket());
    }

    /// The exact bytes of each format, written out as those releases' `serde_json::to_string`
    /// writes their struct (fields in declaration order, compact, integers), for two regions
    /// of a 4 KiB guest and one of a hugetlbfs guest; each parses back to its format.
    #[test]
    fn each_format_is_byte_for_byte_what_firecracker_sends() {
        let two = [
            GuestRegionUffdMapping::new(0x7f3a_5c00_0000, 0xc000_0000, 0, 4096),
            GuestRegionUffdMapping::new(0x7f3b_5c00_0000, 0x4000_0000, 0xc000_0000, 4096),
        ];
        let kib = br#"[{"base_host_virt_addr":139888628334592,"size":3221225472,"offset":0,"page_size_kib":4096},{"base_host_virt_addr":139892923301888,"size":1073741824,"offset":3221225472,"page_size_kib":4096}]"#;
        let both = br#"[{"base_host_virt_addr":139888628334592,"size":3221225472,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":139892923301888,"size":1073741824,"offset":3221225472,"page_size":4096,"page_size_kib":4096}]"#;
        let huge = [GuestRegionUffdMapping::new(
            0x7f00_0000_0000,
            256 << 20,
            0,
            2 << 20,
        )];
        let huge_kib = br#"[{"base_host_virt_addr":139637976727552,"size":268435456,"offset":0,"page_size_kib":2097152}]"#;
        let huge_both = br#"[{"base_host_virt_addr":139637976727552,"size":268435456,"offset":0,"page_size":2097152,"page_size_kib":2097152}]"#;
        for (maps, format, bytes) in [
            (&two[..], HandshakeFormat::PageSizeKib, &kib[..]),
            (&two[..], HandshakeFormat::PageSizeBoth, &both[..]),
            (&huge[..], HandshakeFormat::PageSizeKib, &huge_kib[..]),
            (&huge[..], HandshakeFormat::PageSizeBoth, &huge_both[..]),
        ] {
            assert_eq!(
                String::from_utf8_lossy(&format.encode(maps)),
                String::from_utf8_lossy(bytes),
                "{format:?}"
            );
            let (back, f) = parse_handshake(bytes, None).unwrap();
            assert_eq!((back.as_slice(), f), (maps, format));
        }
        // A message mixing the formats is refused.
        let mixed = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":8192,"size":4096,"offset":4096,"page_size_kib":4096}]"#;
        assert!(matches!(
            parse_handshake(mixed, None),
            Err(ProtocolError::Invalid(why)) if why.contains("region 1")
        ));
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
