//! The destination's fault thread, and what its record yields: per-request latency and
//! per-vCPU blocktime, measured as QEMU 10.1 reports them.
//!
//! The fault thread reads userfaultfd events (address, write flag, faulting thread id), maps
//! each address to its host page, records the event, and sends a page request unless the page
//! is present or already requested. Receivers stamp each host page when they place it
//! ([`DestMemory::times`]). After the run:
//! * **request latency** of a requested host page = placed − first fault read for it;
//! * **blocktime** per vCPU and in total, from each fault's wait ([`crate::blocktime`]).

use std::sync::atomic::{AtomicBool, Ordering};

use super::memory::DestMemory;
use crate::blocktime::{blocktime_of, Blocktime};
use crate::sys::clock::now_ns;
use crate::sys::uffd::Fault;

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

/// Reads faults until `stop`, requesting missing pages with `request(host page, faulting
/// thread)`; returns every fault event. Fails only if the descriptor does.
pub fn fault_loop(
    mem: &DestMemory,
    stop: &AtomicBool,
    request: &dyn Fn(u64, u32) -> Result<(), String>,
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
                request(hp, f.tid)?;
            }
        }
    }
}

/// Computes [`Blocktime`] from the fault events and the placement times in `mem`.
pub fn blocktime(events: &[FaultEvent], mem: &DestMemory, tids: &[u32]) -> Blocktime {
    blocktime_of(
        events.iter().map(|e| (e.tid, e.at_ns, mem.times(e.hp).1)),
        tids,
    )
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

#[cfg(test)]
mod tests {
    use super::{raced, FaultEvent};

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
}
