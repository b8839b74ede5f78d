//! Discarding many ranges of private anonymous memory at once (`MADV_DONTNEED`): the
//! destination's switch-over drops every host page that precopy filled and the source
//! dirtied since, which after a random writer is one range per page.
//!
//! One `process_madvise(2)` call on this process takes up to 1,024 ranges (Linux 6.13 allows
//! every advice on the caller itself; since 6.16 the TLB flushes of one call's
//! `MADV_DONTNEED` ranges are batched), where `madvise(2)` would take one call and one flush
//! each. Where the kernel refuses it (older kernels: `EINVAL`, `ENOSYS`, `EPERM`), each range
//! falls back to `madvise(2)`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Ranges per `process_madvise` call (the kernel's `UIO_MAXIOV`).
const BATCH: usize = 1024;

/// A pidfd of this process (None where `pidfd_open` is missing: the fallback then runs).
fn self_pidfd() -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    // SAFETY: a non-negative result is a descriptor we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How the ranges were discarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    /// `process_madvise` calls.
    pub batched_calls: u64,
    /// `madvise` calls (the fallback).
    pub single_calls: u64,
}

/// Discards `ranges` (`(address, bytes)`) with `MADV_DONTNEED`: their pages read zero (or
/// fault, if registered with userfaultfd) afterwards.
///
/// # Safety
/// Every range must lie in a private anonymous (or hugetlb) mapping of this process, aligned
/// to its page size, that nothing else reads or writes meanwhile, and no reference may point
/// into it (its contents change).
pub unsafe fn discard(ranges: &[(usize, usize)]) -> io::Result<Discarded> {
    let mut done = Discarded::default();
    let pidfd = self_pidfd();
    let mut rest = ranges;
    if let Some(fd) = &pidfd {
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(BATCH)];
            let iov: Vec<libc::iovec> = batch
                .iter()
                .map(|&(addr, len)| libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len,
                })
                .collect();
            let want: usize = batch.iter().map(|r| r.1).sum();
            // SAFETY: `iov` describes `batch.len()` ranges of this process, which the caller
            // vouches for; the descriptor is this process's pidfd.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    fd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // Not on this kernel, or not this advice: one range at a time.
                    Some(libc::EINVAL | libc::ENOSYS | libc::EPERM) if done.batched_calls == 0 => {
                        break
                    }
                    _ => return Err(e),
                }
            }
            done.batched_calls += 1;
            if r as usize != want {
                // A short advice: the ranges from the first one not wholly done go one by one.
                let mut left = r as usize;
                let whole = batch.iter().take_while(|r| {
                    let ok = left >= r.1;
                    left = left.saturating_sub(r.1);
                    ok
                });
                rest = &rest[whole.count()..];
                break;
            }
            rest = &rest[batch.len()..];
        }
    }
    for &(addr, len) in rest {
        // SAFETY: as the caller vouches.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
            return Err(io::Error::last_os_error());
        }
        done.single_calls += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discarded_pages_read_zero_and_the_others_keep_their_data() {
        const PAGE: usize = 4096;
        let pages = 3000; // more ranges than one batch
        let mut m = memmap2::MmapMut::map_anon(pages * PAGE).unwrap();
        m.iter_mut().step_by(PAGE).for_each(|b| *b = 7);
        let base = m.as_mut_ptr() as usize;
        // Every other page, and one run of three.
        let mut ranges: Vec<(usize, usize)> = (0..2400)
            .step_by(2)
            .map(|p| (base + p * PAGE, PAGE))
            .collect();
        ranges.push((base + 2500 * PAGE, 3 * PAGE));
        // SAFETY: our own mapping; no reference into it is alive across the call.
        let d = unsafe { discard(&ranges) }.unwrap();
        // Two batches where the kernel takes them, else one call per range.
        assert!(
            d == Discarded {
                batched_calls: 2,
                single_calls: 0
            } || d.single_calls == 1201,
            "{d:?}"
        );
        for p in 0..pages {
            let gone = (p < 2400 && p % 2 == 0) || (2500..2503).contains(&p);
            assert_eq!(m[p * PAGE], if gone { 0 } else { 7 }, "page {p}");
        }
        // SAFETY: as above; an unmapped range is an error, not a crash.
        let bad = unsafe { discard(&[(base + 1, PAGE)]) };
        assert!(bad.is_err());
    }
}
