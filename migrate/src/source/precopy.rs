//! Precopy: rounds that send every dirty page while the guest runs.
//!
//! A round first moves what KVM recorded into the bitmap ([`DirtyTracker::sync`]), then
//! drains the bitmap with [`DirtyBitmap::get_and_clear`] in chunks aligned to host pages
//! (so a 2 MiB host page is collected whole) and sends each run of dirty target pages; with
//! manual dirty-log re-protection, each chunk is cleared in KVM's log
//! ([`DirtyTracker::taken`]) after it is taken and before its pages are read. The
//! vCPUs, the device model and (with dirty rings) the harvesting thread keep marking pages
//! meanwhile: a page marked after its word was collected stays dirty for the next round or
//! for postcopy (I7). Round 0 sends everything (the bitmap starts full, as QEMU's does).
//! Rounds stop after the requested number, or as soon as the dirty set stops shrinking.

use pagehint::DirtyBitmap;

use super::send::{Outbound, PageRun, Phase, SendError};
use crate::guest::kvm::dirty::DirtyTracker;
use crate::sys::clock::now_ns;
use crate::wire::{Channel, Guard};

/// Words collected per `get_and_clear` (4096 target pages; a multiple of a 2 MiB host
/// page's 8 words).
const CHUNK_WORDS: usize = 64;
/// Most target pages per send (1 MiB).
const RUN_MAX: u64 = 256;

/// What precopy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrecopyReport {
    /// Rounds sent.
    pub rounds: u64,
    /// Dirty pages at the start of each round (after the sync).
    pub dirty_per_round: Vec<u64>,
    /// Per entry of `dirty_per_round`: how long its sync took (reading KVM's logs or rings
    /// into the bitmap), ns.
    pub sync_ns: Vec<u64>,
    /// Per entry of `dirty_per_round`: how long its drain took (taking, clearing in KVM's
    /// log where manual, reading and sending), ns; 0 for the last sync when it ended precopy.
    pub drain_ns: Vec<u64>,
}

/// Sends every page dirty in `bitmap` once, each chunk cleared in KVM's log first when
/// `tracker` re-protects manually; returns the target pages sent.
pub fn drain_round(
    out: &Outbound<'_>,
    bitmap: &DirtyBitmap,
    tracker: Option<&DirtyTracker<'_>>,
    guard: &Guard<'_>,
) -> Result<u64, SendError> {
    let mut words = [0u64; CHUNK_WORDS];
    let mut buf = Vec::new();
    let mut sent = 0;
    for block in 0..bitmap.blocks() as u32 {
        let nwords = bitmap
            .block_words(block)
            .map_err(|e| SendError::Memory(e.to_string()))?;
        let mut w = 0;
        while w < nwords {
            let n = CHUNK_WORDS.min(nwords - w);
            bitmap
                .get_and_clear(block, w, &mut words[..n])
                .map_err(|e| SendError::Memory(e.to_string()))?;
            if let Some(t) = tracker {
                // Before the pages are read: a write after the clear is logged again.
                t.taken(block, w, &words[..n]).map_err(SendError::Memory)?;
            }
            for (run_first, run_len) in runs(&words[..n], (w as u64) * 64) {
                let mut first = run_first;
                let end = run_first + run_len;
                while first < end {
                    let count = RUN_MAX.min(end - first);
                    out.send_pages(
                        PageRun {
                            block,
                            first,
                            count,
                            unit: 1,
                        },
                        Channel::Background,
                        Phase::Precopy,
                        guard,
                        &mut buf,
                    )?;
                    first += count;
                }
                sent += run_len;
            }
            w += n;
        }
    }
    Ok(sent)
}

/// Runs the precopy rounds: at most `max_rounds`, stopping when the dirty set stops
/// shrinking. `tracker` is `None` when nothing runs at the source.
pub fn run(
    out: &Outbound<'_>,
    bitmap: &DirtyBitmap,
    tracker: Option<&DirtyTracker<'_>>,
    max_rounds: u32,
    guard: &Guard<'_>,
) -> Result<PrecopyReport, SendError> {
    let mut report = PrecopyReport::default();
    for r in 0..max_rounds {
        let t0 = now_ns();
        if let Some(t) = tracker {
            t.sync().map_err(SendError::Memory)?;
        }
        report.sync_ns.push(now_ns() - t0);
        report.drain_ns.push(0);
        let dirty = bitmap.dirty_pages();
        let shrinking = report
            .dirty_per_round
            .last()
            .is_none_or(|&prev| dirty < prev);
        report.dirty_per_round.push(dirty);
        if r > 0 && (!shrinking || dirty == 0) {
            break;
        }
        let t1 = now_ns();
        drain_round(out, bitmap, tracker, guard)?;
        *report.drain_ns.last_mut().expect("pushed above") = now_ns() - t1;
        report.rounds += 1;
    }
    Ok(report)
}

/// The runs of set bits of `words` as `(first page, pages)`, bit 0 of word 0 being page
/// `base`.
fn runs(words: &[u64], base: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let bit = w.trailing_zeros() as u64;
            let len = (w >> bit).trailing_ones() as u64;
            let first = base + i as u64 * 64 + bit;
            match out.last_mut() {
                Some((f, l)) if *f + *l == first => *l += len,
                _ => out.push((first, len)),
            }
            w = if bit + len >= 64 {
                0
            } else {
                w & !(((1u64 << len) - 1) << bit)
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_join_across_words() {
        assert_eq!(runs(&[0b0110, 0], 0), vec![(1, 2)]);
        assert_eq!(runs(&[1 << 63, 0b11], 64), vec![(127, 3)]);
        assert_eq!(runs(&[u64::MAX, u64::MAX], 0), vec![(0, 128)]);
        assert_eq!(runs(&[0b101], 0), vec![(0, 1), (2, 1)]);
        assert!(runs(&[0, 0], 0).is_empty());
    }
}
