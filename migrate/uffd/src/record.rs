//! A restore's recorded working set: the memory-file offsets of the host pages its vCPUs
//! faulted on, in the order of each page's first fault (what policy `record` writes and
//! policies `recorded` and `recorded+pagehint` follow).
//!
//! Offsets, not addresses: a VMM maps guest memory at new addresses on every restore, but
//! the memory file stays. The file is small and binary: the 8 bytes `PHUFREC1`, then the
//! number of entries (`u64`, little-endian), then each offset (`u64`, little-endian). It is
//! read whole and checked: the header, the length, every offset page-aligned and inside a
//! region of the restore that follows it, and no page twice. Anything else is a typed
//! [`RecordError`], never a guess.

use std::fmt;
use std::io;
use std::path::Path;

/// The file's first eight bytes.
pub const MAGIC: &[u8; 8] = b"PHUFREC1";

/// The most entries a record may hold (2^28 host pages: 1 TiB of 4 KiB pages), so that a
/// corrupt count never sizes an allocation.
pub const MAX_ENTRIES: u64 = 1 << 28;

/// Why a record could not be read or used.
#[derive(Debug)]
pub enum RecordError {
    /// Reading or writing the file.
    Io(io::Error),
    /// Not a record (the first eight bytes).
    Magic,
    /// The length disagrees with the count, or the count is over [`MAX_ENTRIES`].
    Length {
        /// Entries announced.
        count: u64,
        /// Bytes found.
        bytes: u64,
    },
    /// An entry that is not a host page of this restore's regions.
    Outside {
        /// Its index.
        index: usize,
        /// The offset.
        offset: u64,
    },
    /// A page recorded twice.
    Duplicate {
        /// The second entry's index.
        index: usize,
        /// The offset.
        offset: u64,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "record: {e}"),
            Self::Magic => write!(f, "record: not a pagehint-uffd record (no PHUFREC1 header)"),
            Self::Length { count, bytes } => write!(
                f,
                "record: {count} entries announced, {bytes} bytes of entries (8 each; at most \
                 {MAX_ENTRIES})"
            ),
            Self::Outside { index, offset } => write!(
                f,
                "record entry {index}: file offset {offset:#x} is not a host page of this \
                 restore's regions (a record of another snapshot?)"
            ),
            Self::Duplicate { index, offset } => {
                write!(
                    f,
                    "record entry {index}: file offset {offset:#x} recorded twice"
                )
            }
        }
    }
}

impl std::error::Error for RecordError {}

impl From<io::Error> for RecordError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// The encoded file.
pub fn encode(offsets: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + offsets.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    for o in offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    out
}

/// The offsets in an encoded file (the header and the length checked; the offsets are
/// checked against the regions by whoever uses them).
pub fn decode(bytes: &[u8]) -> Result<Vec<u64>, RecordError> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(RecordError::Magic);
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let count = word(8);
    let body = (bytes.len() - 16) as u64;
    if count > MAX_ENTRIES || body != count * 8 {
        return Err(RecordError::Length { count, bytes: body });
    }
    Ok((0..count as usize).map(|i| word(16 + i * 8)).collect())
}

/// Reads the record at `path`.
pub fn read(path: &Path) -> Result<Vec<u64>, RecordError> {
    decode(&std::fs::read(path)?)
}

/// Writes the record to `path` (through a temporary file renamed over it, so that a reader
/// never sees half a record).
pub fn write(path: &Path, offsets: &[u64]) -> Result<(), RecordError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, encode(offsets))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_damaged_one_is_refused() {
        let offs = [0x3000, 0, 0x7000_0000];
        let b = encode(&offs);
        assert_eq!(&b[..8], MAGIC);
        assert_eq!(b.len(), 16 + 24);
        assert_eq!(decode(&b).unwrap(), offs);
        assert_eq!(decode(&encode(&[])).unwrap(), Vec::<u64>::new());
        assert!(matches!(
            decode(&b[..20]),
            Err(RecordError::Length { count: 3, bytes: 4 })
        ));
        assert!(matches!(
            decode(b"PHUFREC2\0\0\0\0\0\0\0\0"),
            Err(RecordError::Magic)
        ));
        assert!(matches!(decode(b"short"), Err(RecordError::Magic)));
        let mut huge = b.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(RecordError::Length { .. })));
        let d = std::env::temp_dir().join(format!("pagehint-record-{}", std::process::id()));
        write(&d, &offs).unwrap();
        assert_eq!(read(&d).unwrap(), offs);
        let _ = std::fs::remove_file(&d);
    }
}
