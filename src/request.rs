//! Page requests from the destination: the typed request, and an optional wire frame.
//!
//! **The API is [`UrgentRequest`]**: a RAM block by index and a byte range inside it, the
//! information QEMU's `MIG_RP_MSG_REQ_PAGES` carries (QEMU names the block by its id string;
//! map it to an index once with [`RamLayout::block_index`](crate::RamLayout::block_index)).
//! A VMM decodes its own return-path message, builds an `UrgentRequest` and calls
//! [`PageScheduler::serve`](crate::PageScheduler::serve).
//!
//! **The frame below is pagehint's own, not QEMU's `MIG_RP_MSG_REQ_PAGES`** and not any other
//! VMM's: a fixed 24-byte message that `pagehint-migrate` puts on its return path and the
//! fuzz targets feed with arbitrary bytes. Use it ([`UrgentRequest::encode`],
//! [`UrgentRequest::decode`], [`PageScheduler::serve_frame`](crate::PageScheduler::serve_frame))
//! if you have no return-path format of your own; otherwise ignore it. It is
//! [`UrgentRequest::WIRE_LEN`] bytes, little endian:
//!
//! | bytes  | field                               |
//! |--------|-------------------------------------|
//! | 0..2   | magic `0x4850` (`"PH"`)             |
//! | 2..4   | flags, must be 0                    |
//! | 4..8   | block index (`u32`)                 |
//! | 8..16  | byte offset in the block (`u64`)    |
//! | 16..24 | length in bytes (`u64`)             |
//!
//! Decoding checks only the frame; whether the block and range exist is the scheduler's check
//! against its layout. Both kinds of failure are typed errors.

use std::fmt;

use crate::layout::LocationError;
use crate::streams::StreamError;

const MAGIC: u16 = 0x4850;

/// A page request from the destination: `len` bytes at byte `offset` of block `block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UrgentRequest {
    /// Block index in the layout.
    pub block: u32,
    /// Byte offset of the faulting address in the block.
    pub offset: u64,
    /// Bytes requested (normally one host page).
    pub len: u64,
}

/// A request frame that could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame is not [`UrgentRequest::WIRE_LEN`] bytes long.
    WrongLength {
        /// Bytes received.
        got: usize,
    },
    /// The frame does not start with the request magic.
    BadMagic(u16),
    /// Flags this version does not know were set.
    UnknownFlags(u16),
    /// The frame asks for zero bytes.
    ZeroLength,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongLength { got } => write!(
                f,
                "page request frame has {got} bytes, expected {}",
                UrgentRequest::WIRE_LEN
            ),
            Self::BadMagic(m) => write!(f, "page request frame has bad magic {m:#06x}"),
            Self::UnknownFlags(fl) => write!(f, "page request frame has unknown flags {fl:#06x}"),
            Self::ZeroLength => f.write_str("page request frame asks for zero bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a page request was refused (and counted as bad).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// The frame is malformed.
    Decode(DecodeError),
    /// The request names a stream the scheduler does not have
    /// ([`PageScheduler::serve_from`](crate::PageScheduler::serve_from)).
    Stream(StreamError),
    /// The block or range is outside the layout.
    Location(LocationError),
    /// The request asks for zero bytes.
    ZeroLength {
        /// The block named.
        block: u32,
        /// The byte offset named.
        offset: u64,
    },
    /// The request covers more than one host page, and was made through
    /// [`PageScheduler::serve`](crate::PageScheduler::serve), which serves one host page;
    /// [`PageScheduler::serve_range`](crate::PageScheduler::serve_range) serves every host page
    /// of a range. Nothing was claimed or queued.
    SpansHostPages {
        /// The block.
        block: u32,
        /// The first target page of the range.
        first_page: u64,
        /// Host pages the range covers (at least 2).
        host_pages: u64,
    },
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "malformed page request: {e}"),
            Self::Stream(e) => write!(f, "page request from an unknown stream: {e}"),
            Self::Location(e) => write!(f, "page request out of range: {e}"),
            Self::ZeroLength { block, offset } => {
                write!(f, "page request for zero bytes at offset {offset:#x} of block {block}")
            }
            Self::SpansHostPages {
                block,
                first_page,
                host_pages,
            } => write!(
                f,
                "page request from page {first_page} of block {block} covers {host_pages} host pages; serve_range serves ranges"
            ),
        }
    }
}

impl std::error::Error for RequestError {}

impl From<DecodeError> for RequestError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

impl From<LocationError> for RequestError {
    fn from(e: LocationError) -> Self {
        Self::Location(e)
    }
}

impl UrgentRequest {
    /// Length of an encoded request.
    pub const WIRE_LEN: usize = 24;

    /// A request for `len` bytes at `offset` of block `block`, for a length known to be
    /// non-zero (a page size). A length that comes from outside goes through
    /// [`try_new`](Self::try_new) (or [`decode`](Self::decode)), which refuse zero;
    /// [`PageScheduler::serve`](crate::PageScheduler::serve) refuses a zero-length request
    /// built here too, counted as bad.
    pub const fn new(block: u32, offset: u64, len: u64) -> Self {
        Self { block, offset, len }
    }

    /// A request for `len` bytes at `offset` of block `block`, refused if `len` is zero.
    /// Whether the block and range exist is the scheduler's check against its layout.
    ///
    /// ```
    /// use pagehint::{RequestError, UrgentRequest};
    /// assert_eq!(UrgentRequest::try_new(1, 0x3000, 4096)?, UrgentRequest::new(1, 0x3000, 4096));
    /// assert_eq!(
    ///     UrgentRequest::try_new(1, 0x3000, 0),
    ///     Err(RequestError::ZeroLength { block: 1, offset: 0x3000 })
    /// );
    /// # Ok::<(), RequestError>(())
    /// ```
    pub const fn try_new(block: u32, offset: u64, len: u64) -> Result<Self, RequestError> {
        if len == 0 {
            return Err(RequestError::ZeroLength { block, offset });
        }
        Ok(Self { block, offset, len })
    }

    /// Encodes the request as one wire frame.
    ///
    /// ```
    /// use pagehint::UrgentRequest;
    /// let req = UrgentRequest::new(2, 0x20_0000, 4096);
    /// assert_eq!(UrgentRequest::decode(&req.encode())?, req);
    /// assert!(UrgentRequest::decode(&[0u8; 24]).is_err()); // bad magic
    /// assert!(UrgentRequest::decode(&req.encode()[..23]).is_err()); // short frame
    /// # Ok::<(), pagehint::request::DecodeError>(())
    /// ```
    pub fn encode(&self) -> [u8; Self::WIRE_LEN] {
        let mut out = [0u8; Self::WIRE_LEN];
        out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.block.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes one wire frame; a frame asking for zero bytes is refused
    /// ([`DecodeError::ZeroLength`]).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let frame: &[u8; Self::WIRE_LEN] = frame
            .try_into()
            .map_err(|_| DecodeError::WrongLength { got: frame.len() })?;
        let u16_at = |i: usize| u16::from_le_bytes([frame[i], frame[i + 1]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&frame[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u16_at(0);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let flags = u16_at(2);
        if flags != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        let block = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let len = u64_at(16);
        if len == 0 {
            return Err(DecodeError::ZeroLength);
        }
        Ok(Self {
            block,
            offset: u64_at(8),
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_malformed_frame_is_a_typed_error() {
        let good = UrgentRequest::new(u32::MAX, u64::MAX, 1).encode();
        assert_eq!(UrgentRequest::decode(&good).unwrap().offset, u64::MAX);
        let mut flags = good;
        flags[2] = 1;
        assert_eq!(
            UrgentRequest::decode(&flags),
            Err(DecodeError::UnknownFlags(1))
        );
        let mut magic = good;
        magic[0] ^= 0xff;
        assert!(matches!(
            UrgentRequest::decode(&magic),
            Err(DecodeError::BadMagic(_))
        ));
        assert_eq!(
            UrgentRequest::decode(&[]),
            Err(DecodeError::WrongLength { got: 0 })
        );
        assert_eq!(
            UrgentRequest::decode(&[0; 25]),
            Err(DecodeError::WrongLength { got: 25 })
        );
        let empty = UrgentRequest::new(3, 4096, 0).encode();
        assert_eq!(UrgentRequest::decode(&empty), Err(DecodeError::ZeroLength));
    }
}
