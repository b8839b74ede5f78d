//! Per-request latency of a QEMU destination, from its trace log.
//!
//! QEMU 10.0's `query-migrate` reports blocktime but not request latency, so the destination
//! runs with `-trace enable=postcopy_ram_fault_thread_request` (the fault thread has read a
//! fault and is about to request the page) and `postcopy_place_page` /
//! `postcopy_place_page_zero` (the page is placed and the faulting thread woken), and `-msg
//! timestamp=on`, which makes the log backend stamp each line `pid@seconds.micros:`. A
//! request's latency is the time from its line to the first placement of the same host page
//! at or after it: the same span the pagehint harness measures (fault read → page placed).
//! Tracing costs QEMU a formatted write per placed page, so it perturbs these figures a
//! little (the blocktime QEMU reports itself is measured with tracing on, too).
//!
//! A request whose page was placed before its line (the background stream won the race; QEMU
//! then only wakes the vCPU) has no latency and is counted apart. Lines that are not these
//! events are ignored; an event line that does not parse is an error (a changed format must
//! not silently empty the figures).

use std::collections::HashMap;

/// The events [`parse`] reads, as `-trace` arguments.
pub const EVENTS: [&str; 3] = [
    "postcopy_ram_fault_thread_request",
    "postcopy_place_page",
    "postcopy_place_page_zero",
];

/// Request latencies found in a trace log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestLatency {
    /// Request lines.
    pub requests: u64,
    /// Requests whose page was placed before the request line.
    pub served_before: u64,
    /// Requests never followed by a placement of their page.
    pub unplaced: u64,
    /// Pages placed (each page once).
    pub placed: u64,
    /// Latency of every other request, ns, sorted.
    pub latencies_ns: Vec<u64>,
}

fn stamp(head: &str) -> Option<u64> {
    // `pid@sec.usec`
    let (_, t) = head.split_once('@')?;
    let (s, us) = t.split_once('.')?;
    let s: u64 = s.parse().ok()?;
    let us: u64 = us.parse().ok()?;
    Some(s * 1_000_000_000 + us * 1000)
}

fn hex_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits: String = text[at..]
        .trim_start_matches("0x")
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    u64::from_str_radix(&digits, 16).ok()
}

/// Reads a trace log; `page` is the host page size (addresses are rounded down to it).
pub fn parse(log: &str, page: u64) -> Result<RequestLatency, String> {
    let mask = !(page - 1);
    let mut requests: Vec<(u64, u64)> = Vec::new();
    let mut placed: HashMap<u64, u64> = HashMap::new();
    for (n, line) in log.lines().enumerate() {
        let Some((head, rest)) = line.split_once(':') else {
            continue;
        };
        let (event, args) = rest.split_once(' ').unwrap_or((rest, ""));
        if !EVENTS.contains(&event) {
            continue;
        }
        let bad = || format!("trace line {}: cannot read {line:?}", n + 1);
        let t = stamp(head).ok_or_else(bad)?;
        if event == EVENTS[0] {
            let addr = hex_after(args, "HVA=").ok_or_else(bad)?;
            requests.push((addr & mask, t));
        } else {
            let addr = hex_after(args, "host=").ok_or_else(bad)?;
            placed.entry(addr & mask).or_insert(t);
        }
    }
    let mut out = RequestLatency {
        requests: requests.len() as u64,
        placed: placed.len() as u64,
        ..Default::default()
    };
    for (addr, t) in requests {
        match placed.get(&addr) {
            None => out.unplaced += 1,
            Some(&p) if p < t => out.served_before += 1,
            Some(&p) => out.latencies_ns.push(p - t),
        }
    }
    out.latencies_ns.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
26514@1796011139.024972:postcopy_place_page host=0x7f072be00000
26512@1796011139.025017:postcopy_ram_fault_thread_request Request for HVA=0x7f072bec0123 rb=pc.ram offset=0xc0000 pid=26489
2026-11-30T03:58:56.977092Z qemu-system-x86_64: warning: something else
26514@1796011139.025018:postcopy_place_page host=0x7f072be01000
26512@1796011139.025100:postcopy_ram_fault_thread_request Request for HVA=0x7f072be01000 rb=pc.ram offset=0x1000 pid=26489
26514@1796011139.025066:postcopy_place_page_zero host=0x7f072be02000
26514@1796011139.026017:postcopy_place_page host=0x7f072bec0000
26512@1796011139.027000:postcopy_ram_fault_thread_request Request for HVA=0x7f0700000000 rb=pc.ram offset=0x0 pid=26489
";

    #[test]
    fn requests_are_matched_to_the_next_placement_of_their_page() {
        let r = parse(LOG, 4096).unwrap();
        assert_eq!(r.requests, 3);
        assert_eq!(r.placed, 4);
        assert_eq!(
            r.served_before, 1,
            "0x...01000 was placed before it was requested"
        );
        assert_eq!(r.unplaced, 1);
        assert_eq!(r.latencies_ns, vec![1_000_000]);
    }

    #[test]
    fn a_mangled_event_line_is_an_error_not_a_silent_gap() {
        let e = parse("1@2.3:postcopy_place_page host=zz\n", 4096).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert!(parse("1@x:postcopy_ram_fault_thread_request HVA=0x1000\n", 4096).is_err());
        assert_eq!(parse("", 4096).unwrap(), RequestLatency::default());
    }
}
