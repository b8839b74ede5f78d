//! The destination's fault thread, and what its record yields: per-request latency and
//! per-vCPU blocktime, measured as QEMU 10.1 reports them.
//!
//! The fault thread reads userfaultfd events (address, write flag, faulting thread id), maps
//! each address to its host page, records the event, and sends a page request unless the page
//! is present or already requested. Receivers stamp each host page when they place it
//! ([`DestMemory::times`]). After the run:
//! * **request latency** of a requested host page = placed − first fault read for it;
//! * **vCPU blocktime**: a vCPU is blocked from the moment its fault is read until that page
//!   is placed; the union of those intervals, per vCPU (the fault thread id tells which vCPU);
//! * **total blocktime** (QEMU's `postcopy-blocktime`): the time during which *every* vCPU was
//!   blocked at once.

use std::sync::atomic::{AtomicBool, Ordering};

use super::memory::DestMemory;
use crate::clock::now_ns;
use crate::uffd::Fault;

/// One fault read from userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// Faulting thread.
    pub tid: u32,
    /// Host page.
    pub hp: u64,
    /// When it was read.
    pub at_ns: u64,
    /// A write fault.
    pub write: bool,
}

/// Reads faults until `stop`, requesting missing pages with `request`; returns every fault
/// event. Fails only if the descriptor does.
pub fn fault_loop(
    mem: &DestMemory,
    stop: &AtomicBool,
    request: &dyn Fn(u64) -> Result<(), String>,
) -> Result<Vec<FaultEvent>, String> {
    let Some(uffd) = mem.userfault() else {
        return Ok(Vec::new());
    };
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let mut events = Vec::new();
    loop {
        // Relaxed: a polled flag.
        if stop.load(Ordering::Relaxed) {
            return Ok(events);
        }
        if !uffd
            .wait(20_000_000)
            .map_err(|e| format!("waiting for userfaultfd events: {e}"))?
        {
            continue;
        }
        faults.clear();
        uffd.read_faults(&mut faults)
            .map_err(|e| format!("reading userfaultfd events: {e}"))?;
        let now = now_ns();
        for f in &faults {
            let Some(hp) = mem.host_page_at(f.addr) else {
                continue;
            };
            events.push(FaultEvent {
                tid: f.tid,
                hp,
                at_ns: now,
                write: f.write,
            });
            if !mem.is_present(hp) && mem.claim_request(hp, now) {
                request(hp)?;
            }
        }
    }
}

/// Time each vCPU (by thread id, `tids[i]` = vCPU `i`) spent blocked, and the time all of
/// them were blocked at once, in ns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blocktime {
    /// Per vCPU.
    pub per_vcpu_ns: Vec<u64>,
    /// Every vCPU blocked at once (QEMU's `postcopy-blocktime`).
    pub all_ns: u64,
    /// Faults of vCPU threads.
    pub vcpu_faults: u64,
}

/// Computes [`Blocktime`] from the fault events and the placement times in `mem`.
pub fn blocktime(events: &[FaultEvent], mem: &DestMemory, tids: &[u32]) -> Blocktime {
    blocktime_of(
        events.iter().map(|e| (e.tid, e.at_ns, mem.times(e.hp).1)),
        tids,
    )
}

/// Computes [`Blocktime`] from each fault's wait: (faulting thread, read, its page placed),
/// in ns. A wait that ends no later than it starts adds nothing; a vCPU's overlapping waits
/// (the same page faulted again before it was placed) count once.
pub fn blocktime_of(waits: impl IntoIterator<Item = (u32, u64, u64)>, tids: &[u32]) -> Blocktime {
    let mut per: Vec<Vec<(u64, u64)>> = vec![Vec::new(); tids.len()];
    let mut vcpu_faults = 0;
    for (tid, read, placed) in waits {
        let Some(v) = tids.iter().position(|&t| t == tid && t != 0) else {
            continue;
        };
        vcpu_faults += 1;
        if placed > read {
            per[v].push((read, placed));
        }
    }
    let merged: Vec<Vec<(u64, u64)>> = per.into_iter().map(merge).collect();
    let per_vcpu_ns = merged
        .iter()
        .map(|iv| iv.iter().map(|(a, b)| b - a).sum())
        .collect();
    let all_ns = merged
        .iter()
        .skip(1)
        .fold(merged.first().cloned().unwrap_or_default(), |acc, iv| {
            intersect(&acc, iv)
        })
        .iter()
        .map(|(a, b)| b - a)
        .sum();
    Blocktime {
        per_vcpu_ns,
        all_ns,
        vcpu_faults,
    }
}

/// Faults of the threads `tids` that raced with a placement: the access found its page
/// missing, but the page had been placed (`placed_ns(hp)`, 0 if never) by the time the fault
/// was read, so its wait is not measured (it counts as 0, and adds no blocktime).
pub fn raced(events: &[FaultEvent], placed_ns: impl Fn(u64) -> u64, tids: &[u32]) -> u64 {
    events
        .iter()
        .filter(|e| {
            tids.contains(&e.tid) && {
                let placed = placed_ns(e.hp);
                placed > 0 && placed <= e.at_ns
            }
        })
        .count() as u64
}

/// Latencies (ns, sorted) of the host pages requested: placed − first request.
pub fn request_latencies(mem: &DestMemory) -> Vec<u64> {
    let mut v: Vec<u64> = (0..mem.host_pages())
        .filter_map(|hp| {
            let (req, placed) = mem.times(hp);
            (req > 0 && placed > 0).then(|| placed.saturating_sub(req))
        })
        .collect();
    v.sort_unstable();
    v
}

/// Sorted, disjoint union of intervals.
fn merge(mut iv: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    iv.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(iv.len());
    for (a, b) in iv {
        match out.last_mut() {
            Some((_, e)) if a <= *e => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Intersection of two sorted, disjoint interval lists.
fn intersect(x: &[(u64, u64)], y: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < x.len() && j < y.len() {
        let a = x[i].0.max(y[j].0);
        let b = x[i].1.min(y[j].1);
        if a < b {
            out.push((a, b));
        }
        if x[i].1 < y[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{blocktime_of, intersect, merge, raced, FaultEvent};

    #[test]
    fn a_fault_read_after_its_page_was_placed_counts_as_raced() {
        let ev = |tid, hp, at_ns| FaultEvent {
            tid,
            hp,
            at_ns,
            write: false,
        };
        // Page 1 placed at 100, page 2 at 300, page 3 never.
        let placed = |hp: u64| [0, 100, 300, 0][hp as usize];
        let events = [
            ev(7, 1, 150), // read after the placement: raced
            ev(7, 1, 100), // read at the placement: raced
            ev(7, 2, 200), // read before: waited
            ev(7, 3, 50),  // never placed: not raced
            ev(9, 1, 500), // another thread
        ];
        assert_eq!(raced(&events, placed, &[7]), 2);
        assert_eq!(raced(&events, placed, &[7, 9]), 3);
    }

    #[test]
    fn a_vcpus_overlapping_waits_count_once() {
        // vCPU 0 (thread 7) waits 100..300, then 200..400 (the same page faulted again), and
        // not at all on a page placed before its fault was read; vCPU 1 (thread 9) waits
        // 250..350; thread 5 is no vCPU.
        let waits = [
            (7, 100, 300),
            (7, 200, 400),
            (7, 500, 450),
            (9, 250, 350),
            (5, 0, 1000),
        ];
        let b = blocktime_of(waits, &[7, 9]);
        assert_eq!(b.per_vcpu_ns, vec![300, 100]);
        assert_eq!(b.all_ns, 100);
        assert_eq!(b.vcpu_faults, 4);
    }

    #[test]
    fn intervals_merge_and_intersect() {
        assert_eq!(
            merge(vec![(5, 7), (1, 3), (2, 4), (7, 8)]),
            vec![(1, 4), (5, 8)]
        );
        assert_eq!(
            intersect(&[(1, 4), (5, 8)], &[(3, 6)]),
            vec![(3, 4), (5, 6)]
        );
        assert!(intersect(&[(1, 2)], &[(2, 3)]).is_empty());
    }
}
