//! KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14): a VM's or a vCPU's counters by
//! name — here the page faults KVM handled (`pf_taken`, `pf_fixed`, `pf_fast`: a write to a
//! page write-protected for dirty logging is one of them) and the VM's remote TLB flushes, to
//! compare dirty-log re-protection schemes.
//!
//! The file holds a header, a descriptor per statistic (flags, exponent, size in `u64`s, the
//! offset of its data, a bucket size, then its name) and a data block; the descriptors are
//! read once, the values with one `pread` of the data block each time.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use super::vm::KvmError;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
/// `struct kvm_stats_header`: six `u32`s.
const HEADER: usize = 24;
/// `struct kvm_stats_desc` before its name.
const DESC: usize = 16;

/// Chosen counters of one VM or vCPU, read by name.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    /// Where the data block starts, and its length.
    data: (u64, usize),
    /// Byte offset in the data block of each chosen counter, in the order asked.
    offsets: Vec<usize>,
}

fn err(what: impl Into<String>, e: std::io::Error) -> KvmError {
    KvmError {
        what: what.into(),
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl KvmStats {
    /// Opens the statistics of the VM or vCPU behind `fd` and finds `names` (each a counter
    /// of one `u64`); an unknown name is an error.
    pub fn open(fd: &impl AsRawFd, names: &[&str]) -> Result<Self, KvmError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor we own.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if raw < 0 {
            return Err(err("KVM_GET_STATS_FD", std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor KVM just gave us, owned by the file from now on.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| err("reading the KVM stats header", e))?;
        let (name_size, count) = (u32_at(&header, 4) as usize, u32_at(&header, 8) as usize);
        let (desc_offset, data_offset) = (u32_at(&header, 16), u32_at(&header, 20));
        let mut descs = vec![0u8; count * (DESC + name_size)];
        file.read_exact_at(&mut descs, u64::from(desc_offset))
            .map_err(|e| err("reading the KVM stats descriptors", e))?;
        let found: Vec<(String, usize, usize)> = descs
            .chunks_exact(DESC + name_size)
            .map(|d| {
                let size = usize::from(u16::from_le_bytes([d[6], d[7]]));
                let offset = u32_at(d, 8) as usize;
                let name = &d[DESC..];
                let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                (
                    String::from_utf8_lossy(&name[..end]).into_owned(),
                    offset,
                    size,
                )
            })
            .collect();
        let data_len = found.iter().map(|&(_, o, s)| o + s * 8).max().unwrap_or(0);
        let offsets = names
            .iter()
            .map(|&want| {
                found
                    .iter()
                    .find(|(name, _, size)| name == want && *size == 1)
                    .map(|&(_, offset, _)| offset)
                    .ok_or_else(|| KvmError {
                        what: format!("KVM statistic {want}"),
                        errno: libc::ENOENT,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            file,
            data: (u64::from(data_offset), data_len),
            offsets,
        })
    }

    /// The chosen counters now, in the order they were asked for.
    pub fn read(&self) -> Result<Vec<u64>, KvmError> {
        let mut data = vec![0u8; self.data.1];
        self.file
            .read_exact_at(&mut data, self.data.0)
            .map_err(|e| err("reading the KVM stats", e))?;
        Ok(self
            .offsets
            .iter()
            .map(|&o| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes")))
            .collect())
    }
}
