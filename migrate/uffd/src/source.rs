//! Where pages come from: the snapshot's memory file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A source of guest memory contents, read by file offset from several threads at once.
pub trait PageSource: Sync {
    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Its length in bytes, if known (the handshake's regions are checked against it).
    fn size(&self) -> Option<u64>;
}

/// Firecracker's snapshot memory file (`mem_file_path`), read with `pread`.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Opens the memory file.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }
}

impl PageSource for FileSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn size(&self) -> Option<u64> {
        Some(self.len)
    }
}
