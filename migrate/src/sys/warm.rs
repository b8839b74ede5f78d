//! Memory: what is available, and the warm-up before measuring.

use std::time::Instant;

/// Touches, once, as much memory as the runs will map, so that no run pays for first touches.
///
/// On a nested VM whose own memory is backed lazily by its host (these machines), the first
/// touch of a page the VM has never used costs several times a later one (measured here:
/// 0.35 GB/s against 2.3 GB/s), which made the first run of an invocation up to 3× slower
/// than the next. Returns the seconds spent.
pub fn warm_up(normal_bytes: u64, huge_pages: u64) -> Result<f64, String> {
    let t = Instant::now();
    if normal_bytes > 0 {
        let m = memmap2::MmapOptions::new()
            .len(normal_bytes as usize)
            .populate()
            .map_anon()
            .map_err(|e| format!("warming {} MiB of memory: {e}", normal_bytes >> 20))?;
        drop(m);
    }
    if huge_pages > 0 {
        let m = memmap2::MmapOptions::new()
            .len((huge_pages << 21) as usize)
            .huge(Some(21))
            .populate()
            .map_anon()
            .map_err(|e| format!("warming {huge_pages} huge pages: {e}"))?;
        drop(m);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `MemAvailable` from /proc/meminfo, in bytes (None where it cannot be read).
pub fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether `bytes` more of normal memory fit in `available` (None: unknown, assumed to fit);
/// else the refusal, naming `what` needs it.
pub fn check_fits(what: &str, bytes: u64, available: Option<u64>) -> Result<(), String> {
    match available {
        Some(avail) if bytes > avail => Err(format!(
            "{what} needs {} MiB of memory, only {} MiB are available",
            bytes >> 20,
            avail >> 20
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_that_does_not_fit_is_refused_with_the_figures() {
        assert!(mem_available().is_some_and(|m| m > 0));
        assert!(check_fits("x", 1 << 30, Some(2 << 30)).is_ok());
        assert!(check_fits("x", 1 << 30, None).is_ok());
        let e = check_fits("a 4 GiB guest (2 copies)", 8 << 30, Some(3 << 30)).unwrap_err();
        assert_eq!(
            e,
            "a 4 GiB guest (2 copies) needs 8192 MiB of memory, only 3072 MiB are available"
        );
    }
}
