//! Per-request latency of a QEMU destination from two trace events, one line per *request*
//! (used where `query-migrate` has no latency figures: QEMU < 10.1).
//!
//! The destination runs with `-trace enable=postcopy_ram_fault_thread_request` (the fault
//! thread has read a fault and is about to request the page: `Request for HVA=0x...`) and
//! `-trace enable=postcopy_page_req_del` (a page that had been requested was just placed:
//! `resolved page req 0x... total N`; QEMU emits it right after the `UFFDIO_COPY` that placed
//! it, only for requested pages), with `-msg timestamp=on`. A request's latency is the time
//! from its line to the first `req_del` of the same host page after it: the span the
//! pagehint harness measures (fault read → page placed). Both events exist in QEMU 10.0 and
//! 11.1; the per-page `postcopy_place_page` event is not used: one formatted write per placed
//! page (~131,000 per 512 MiB) slows QEMU measurably, one per request does not (compare-qemu
//! measures that, see [`super::compare`]).
//!
//! Two log prefixes are read: QEMU 10.0's `pid@seconds.micros:event args` and QEMU 11.1's
//! `2026-12-05T22:51:14.592235Z event args`. Lines that are not these events are ignored; an
//! event line that does not parse is an error (a changed format must not silently empty the
//! figures), and so is a log with requests but no latency at all ([`RequestLatency::check`]).

use std::collections::HashMap;

/// The events [`parse`] reads, as `-trace` arguments.
pub const EVENTS: [&str; 2] = ["postcopy_ram_fault_thread_request", "postcopy_page_req_del"];

/// Request latencies found in a trace log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestLatency {
    /// Request lines.
    pub requests: u64,
    /// Requests never followed by a placement of their page (QEMU found it already received
    /// and only woke the vCPU, or the log ended).
    pub unresolved: u64,
    /// Latency of every other request, ns, sorted.
    pub latencies_ns: Vec<u64>,
}

impl RequestLatency {
    /// An error if there were requests and not one latency (a log format this parser does not
    /// know, or events that were not enabled): never a silent 0 µs.
    pub fn check(&self, requests_made: u64) -> Result<(), String> {
        if requests_made > 0 && self.latencies_ns.is_empty() {
            return Err(format!(
                "QEMU made {requests_made} page requests, but its trace gave no request latency ({} request lines, {} unresolved): the trace format or its events changed",
                self.requests, self.unresolved
            ));
        }
        Ok(())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-05T22:51:14.592235Z` → ns since the epoch.
fn iso_stamp(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, mo, da): (i64, u32, u32) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':');
    let (h, mi, se): (u64, u64, u64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ns_frac: u64 = frac.parse::<u64>().ok()? * 10u64.pow(9 - frac.len() as u32);
    let days = u64::try_from(days_from_civil(y, mo, da)).ok()?;
    Some(((days * 24 + h) * 60 + mi) * 60 * 1_000_000_000 + se * 1_000_000_000 + ns_frac)
}

/// `pid@sec.usec` → ns.
fn pid_stamp(head: &str) -> Option<u64> {
    let (_, t) = head.split_once('@')?;
    let (s, us) = t.split_once('.')?;
    let s: u64 = s.parse().ok()?;
    let us: u64 = us.parse().ok()?;
    Some(s * 1_000_000_000 + us * 1000)
}

/// A log line as (time stamp text, event, arguments), in either format; `None` for a line
/// that is not an event line of a known format.
fn split(line: &str) -> Option<(&str, &str, &str)> {
    // 11.1: `<ISO stamp> <event> <args>`.
    if let Some((stamp, rest)) = line.split_once(' ') {
        if stamp.ends_with('Z') && stamp.contains('T') {
            let (event, args) = rest.split_once(' ').unwrap_or((rest, ""));
            return Some((stamp, event, args));
        }
    }
    // 10.0: `<pid>@<sec>.<usec>:<event> <args>`.
    let (head, rest) = line.split_once(':')?;
    if !head.contains('@') {
        return None;
    }
    let (event, args) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((head, event, args))
}

fn hex_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start();
    let rest = rest.strip_prefix("0x").unwrap_or(rest);
    let digits: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&digits, 16).ok()
}

/// Reads a trace log; `page` is the host page size (addresses are rounded down to it).
pub fn parse(log: &str, page: u64) -> Result<RequestLatency, String> {
    let mask = !(page - 1);
    // Per page, the requests not yet resolved (times), in order.
    let mut open: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut out = RequestLatency::default();
    for (n, line) in log.lines().enumerate() {
        let Some((stamp, event, args)) = split(line) else {
            continue;
        };
        if !EVENTS.contains(&event) {
            continue;
        }
        let bad = || format!("trace line {}: cannot read {line:?}", n + 1);
        let t = iso_stamp(stamp)
            .or_else(|| pid_stamp(stamp))
            .ok_or_else(bad)?;
        if event == EVENTS[0] {
            let addr = hex_after(args, "HVA=").ok_or_else(bad)?;
            out.requests += 1;
            open.entry(addr & mask).or_default().push(t);
        } else {
            let addr = hex_after(args, "req").ok_or_else(bad)?;
            if let Some(waiting) = open.remove(&(addr & mask)) {
                for r in waiting {
                    out.latencies_ns.push(t.saturating_sub(r));
                }
            }
        }
    }
    out.unresolved = open.values().map(|v| v.len() as u64).sum();
    out.latencies_ns.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG_10: &str = "\
26512@1796011139.025017:postcopy_ram_fault_thread_request Request for HVA=0x7f072bec0123 rb=pc.ram offset=0xc0000 pid=26489
2026-11-30T03:58:56.977092Z qemu-system-x86_64: warning: something else
26514@1796011139.026017:postcopy_page_req_del resolved page req 0x7f072bec0000 total 0
26512@1796011139.027000:postcopy_ram_fault_thread_request Request for HVA=0x7f0700000000 rb=pc.ram offset=0x0 pid=26489
";

    const LOG_11: &str = "\
2026-12-05T22:51:14.592235Z postcopy_ram_fault_thread_request Request for HVA=0x7f935be05123 rb=pc.ram offset=0x5000 pid=26489
2026-12-05T22:51:14.592300Z postcopy_page_req_del resolved page req 0x7f935be06000 total 1
2026-12-05T22:51:14.593735Z postcopy_page_req_del resolved page req 0x7f935be05000 total 0
2026-12-05T23:59:59.999999Z qemu-system-x86_64: terminating on signal 15
";

    #[test]
    fn qemu_10_lines_pair_a_request_with_the_placement_of_its_page() {
        let r = parse(LOG_10, 4096).unwrap();
        assert_eq!(r.requests, 2);
        assert_eq!(
            r.unresolved, 1,
            "the second request's page was never placed"
        );
        assert_eq!(r.latencies_ns, vec![1_000_000]);
        assert!(r.check(2).is_ok());
    }

    #[test]
    fn qemu_11_iso_stamps_are_read_too() {
        let r = parse(LOG_11, 4096).unwrap();
        assert_eq!(r.requests, 1);
        assert_eq!(r.unresolved, 0);
        assert_eq!(r.latencies_ns, vec![1_500_000]);
        assert_eq!(
            iso_stamp("1970-01-02T00:00:01.5Z"),
            Some(86_401_500_000_000)
        );
        assert_eq!(
            iso_stamp("2026-12-05T22:51:14.592235Z"),
            Some(1_796_511_074_592_235_000)
        );
        assert_eq!(iso_stamp("2026-13-05T22:51:14.5Z"), None);
    }

    #[test]
    fn requests_without_latency_fail_the_row_instead_of_reading_zero() {
        // Only requests (the placement event was not enabled, or its format changed).
        let only = LOG_11.lines().next().unwrap();
        let r = parse(only, 4096).unwrap();
        let e = r.check(604).unwrap_err();
        assert!(
            e.contains("604 page requests") && e.contains("no request latency"),
            "{e}"
        );
        // An empty log with no requests made is fine; with requests made it is not.
        assert!(parse("", 4096).unwrap().check(0).is_ok());
        assert!(parse("", 4096).unwrap().check(3).is_err());
    }

    #[test]
    fn a_mangled_event_line_is_an_error_not_a_silent_gap() {
        let e = parse("1@2.3:postcopy_page_req_del resolved page req zz\n", 4096).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert!(parse("1@x:postcopy_ram_fault_thread_request HVA=0x1000\n", 4096).is_err());
        assert!(parse(
            "2026-12-05T25:51:14.592235Z postcopy_ram_fault_thread_request Request for HVA=0x1000\n",
            4096
        )
        .is_err());
    }
}
