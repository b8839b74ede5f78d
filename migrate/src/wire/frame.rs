//! Page frames (source → destination) and return-path frames (destination → source).
//!
//! Page frame, 32-byte header, little endian:
//! `magic u16 | kind u8 | flags u8 | block u32 | offset u64 | len u64 | arrival_ns u64`, then
//! `len` payload bytes for `PAGES`, `SUMMARY`, `SWITCH` and `ABORT`, nothing for `ZERO` (a run
//! of zero pages) and `PONG`. `offset` is a byte offset in RAM block `block`. `flags` is 0,
//! or [`RESEND`] on a `PAGES` or `ZERO` frame the urgent path sent again on purpose: a host
//! page the background path had claimed (the destination places whichever copy comes first
//! and drops the other as a counted, identical duplicate).
//!
//! Return-path frame, 16-byte header: `magic u16 | kind u8 | 0 u8 | len u32 | sent_ns u64`,
//! then `len` bytes (≤ 256): for `REQUEST`, the fault stream (`u32`: the faulting vCPU
//! where the mode's transport names streams, else 0; see [`RequestBody`]) and a page request
//! in [`pagehint::UrgentRequest`]'s wire format (both checked by the scheduler, which
//! rejects a malformed request or an unknown stream with a typed error); nothing for `DONE`,
//! `PING` and `START`.

use pagehint::UrgentRequest;

use super::{Channel, WireError, PAGE_MAGIC, RP_MAGIC};
use crate::names::code_enum;

/// Page frame flag: a deliberate duplicate (see the module docs).
pub const RESEND: u8 = 1;
/// Largest page frame payload accepted (a claim of 64 host pages of 2 MiB is 128 MiB).
pub const MAX_PAYLOAD: u64 = 256 << 20;
/// Largest return-path body accepted.
pub const MAX_RP_BODY: u32 = 256;

code_enum!(
    /// Kinds of page frames.
    pub enum FrameKind: u8 {
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
        /// The switch to postcopy: vCPU state and the pages to discard ([`super::SwitchOver`]).
        Switch = 6,
    }
);

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
    /// A deliberate duplicate of a host page the background path claimed (`PAGES`, `ZERO`).
    pub resend: bool,
}

impl FrameHeader {
    /// Encoded size.
    pub const LEN: usize = 32;

    /// A header of `kind` for `len` bytes at `offset` in block `block`, not yet stamped
    /// with its arrival time (the sender does that when the link gives it a slot).
    fn at(kind: FrameKind, block: u32, offset: u64, len: u64) -> Self {
        Self {
            kind,
            block,
            offset,
            len,
            arrival_ns: 0,
            resend: false,
        }
    }

    /// `PAGES`: `len` bytes of host pages at `offset` in block `block`.
    pub fn pages(block: u32, offset: u64, len: u64) -> Self {
        Self::at(FrameKind::Pages, block, offset, len)
    }

    /// `ZERO`: `len` bytes of all-zero host pages at `offset` in block `block`.
    pub fn zero(block: u32, offset: u64, len: u64) -> Self {
        Self::at(FrameKind::Zero, block, offset, len)
    }

    /// `SWITCH` with a body of `len` bytes.
    pub fn switch(len: usize) -> Self {
        Self::at(FrameKind::Switch, 0, 0, len as u64)
    }

    /// `SUMMARY` with a body of `len` bytes.
    pub fn summary(len: usize) -> Self {
        Self::at(FrameKind::Summary, 0, 0, len as u64)
    }

    /// `ABORT` whose reason is `len` bytes, stamped now.
    pub fn abort(len: usize) -> Self {
        Self::at(FrameKind::Abort, 0, 0, len as u64).stamped(crate::sys::clock::now_ns())
    }

    /// `PONG`, carrying the source's clock now.
    pub fn pong() -> Self {
        Self::at(FrameKind::Pong, 0, 0, 0).stamped(crate::sys::clock::now_ns())
    }

    /// The same pages, marked as a deliberate duplicate ([`RESEND`]).
    pub fn resent(self) -> Self {
        Self {
            resend: true,
            ..self
        }
    }

    /// The same header, arriving at `arrival_ns` (source clock).
    pub fn stamped(self, arrival_ns: u64) -> Self {
        Self { arrival_ns, ..self }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..2].copy_from_slice(&PAGE_MAGIC.to_le_bytes());
        b[2] = self.kind.code();
        b[3] = if self.resend { RESEND } else { 0 };
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
        if magic != PAGE_MAGIC || b[3] & !RESEND != 0 {
            return Err(bad(format!("bad page frame magic {magic:#06x}")));
        }
        let kind = FrameKind::from_code(b[2])
            .ok_or_else(|| bad(format!("unknown page frame kind {}", b[2])))?;
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let h = Self {
            kind,
            block: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            offset: u64_at(8),
            len: u64_at(16),
            arrival_ns: u64_at(24),
            resend: b[3] & RESEND != 0,
        };
        if h.resend && !matches!(h.kind, FrameKind::Pages | FrameKind::Zero) {
            return Err(bad(format!("a {:?} frame marked as a resent page", h.kind)));
        }
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

code_enum!(
    /// Kinds of return-path frames.
    pub enum RpKind: u8 {
        /// A page request (body: an `UrgentRequest` frame, possibly malformed).
        Request = 1,
        /// The destination has every page and the guest has finished.
        Done = 2,
        /// Clock probe (before `Start`).
        Ping = 3,
        /// The destination is ready: postcopy starts now.
        Start = 4,
    }
);

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
        b[2] = self.kind.code();
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
        let kind = RpKind::from_code(b[2])
            .ok_or_else(|| bad(format!("unknown return-path frame kind {}", b[2])))?;
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

/// A `REQUEST` body: `stream u32 | request [24]`, little endian. The stream is a hint slot of
/// the source's scheduler (`PageScheduler::serve_from`), the faulting vCPU in modes that
/// follow each vCPU; the request is [`UrgentRequest`]'s own frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestBody<'a> {
    /// The fault stream.
    pub stream: u32,
    /// The request frame, as received (the scheduler decodes and checks it).
    pub frame: &'a [u8],
}

impl<'a> RequestBody<'a> {
    /// Encoded size.
    pub const LEN: usize = 4 + UrgentRequest::WIRE_LEN;

    /// The body of a request for `req` from `stream`.
    pub fn encode(stream: u32, req: &UrgentRequest) -> [u8; 4 + UrgentRequest::WIRE_LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&stream.to_le_bytes());
        b[4..].copy_from_slice(&req.encode());
        b
    }

    /// Splits a body into its stream and the request frame (of any length: the scheduler
    /// refuses a malformed one); `None` if it is too short to name a stream.
    pub fn split(body: &'a [u8]) -> Option<Self> {
        let (stream, frame) = body.split_first_chunk::<4>()?;
        Some(Self {
            stream: u32::from_le_bytes(*stream),
            frame,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_body_names_its_stream() {
        let req = UrgentRequest::new(1, 0x20_0000, 4096);
        let b = RequestBody::encode(3, &req);
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex, "03000000504800000100000000002000000000000010000000000000",
            "the layout is the protocol (a change must bump wire::VERSION)"
        );
        let split = RequestBody::split(&b).unwrap();
        assert_eq!(split.stream, 3);
        assert_eq!(UrgentRequest::decode(split.frame), Ok(req));
        assert_eq!(RequestBody::split(&b[..3]), None);
        assert_eq!(RequestBody::split(&b[..4]).unwrap().frame, &[] as &[u8]);
    }

    #[test]
    fn frames_round_trip_and_garbage_is_a_typed_error() {
        let h = FrameHeader {
            kind: FrameKind::Zero,
            block: 1,
            offset: 4096,
            len: 8192,
            arrival_ns: 77,
            resend: false,
        };
        assert_eq!(
            FrameHeader::decode(&h.encode(), Channel::Urgent).unwrap(),
            h
        );
        let again = FrameHeader { resend: true, ..h };
        assert_eq!(
            FrameHeader::decode(&again.encode(), Channel::Urgent).unwrap(),
            again
        );
        let mut flags = h.encode();
        flags[3] = 2;
        assert!(FrameHeader::decode(&flags, Channel::Urgent).is_err());
        let abort = FrameHeader {
            kind: FrameKind::Abort,
            ..again
        };
        assert!(FrameHeader::decode(&abort.encode(), Channel::Urgent).is_err());
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
}
