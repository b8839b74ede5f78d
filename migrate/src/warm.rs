//! Memory warm-up before measuring.

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
