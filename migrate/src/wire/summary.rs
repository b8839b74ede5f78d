//! What the source reports at the end of a migration: its scheduler's counters (and each fault
//! stream's, with a hint slot per stream), what it sent on each channel, the first rejected requests, how it handled each request ([`ReqTrace`],
//! for the per-stage timing of the harness's `tail`), and the checksum of every target page
//! as it was at the switch-over (the destination is verified against them).

use crate::names::code_enum;
use pagehint::streams::{StreamStats, MAX_STREAMS};
use pagehint::SchedulerStats;

use super::{Channel, WireError};

/// What the source reports at the end of a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The scheduler's counters.
    pub stats: SchedulerStats,
    /// Host pages written on the background channel.
    pub bg_host_pages: u64,
    /// Host pages written on the urgent channel.
    pub urgent_host_pages: u64,
    /// Of those, all-zero host pages sent as `ZERO` frames.
    pub zero_host_pages: u64,
    /// Link bytes sent in postcopy (headers included).
    pub postcopy_bytes: u64,
    /// The first few rejected requests, as the scheduler's error messages.
    pub rejected: Vec<String>,
    /// Checksum of every target page at the switch-over, global page order.
    pub checksums: Vec<u64>,
    /// The guest's generation table at the switch-over (one entry per global page; empty
    /// when nothing ran at the source).
    pub generations: Vec<u32>,
    /// Postcopy recovery: for each resumed connection, the target pages the rebuild from
    /// the destination's received bitmap left to send ("dirty = not received").
    pub recoveries: Vec<u64>,
    /// Host pages the urgent path sent again on purpose (deliberate duplicates).
    pub resent_host_pages: u64,
    /// Link bytes of those.
    pub resent_bytes: u64,
    /// Postcopy: how the source handled each valid request, and when (source clock).
    pub requests: Vec<ReqTrace>,
    /// Each fault stream's counters, where the mode keeps a hint slot per vCPU (empty
    /// otherwise: one slot's scan counts only in `stats`).
    pub streams: Vec<StreamCounts>,
}

/// What the background path did for one fault stream ([`pagehint::PageScheduler::stream_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounts {
    /// Hints taken from the stream's slot.
    pub hints_taken: u64,
    /// Of those, hints below the stream's previous one (its cursor bubbled both ways).
    pub backward_hints: u64,
    /// Claims of the stream's cursors.
    pub cursor_claims: u64,
    /// Target pages they claimed.
    pub cursor_pages: u64,
    /// Runs whose budget was spent.
    pub runs_spent: u64,
}

impl StreamCounts {
    /// Fields on the wire.
    const FIELDS: usize = 5;

    fn fields(&self) -> [u64; Self::FIELDS] {
        [
            self.hints_taken,
            self.backward_hints,
            self.cursor_claims,
            self.cursor_pages,
            self.runs_spent,
        ]
    }
}

impl From<StreamStats> for StreamCounts {
    fn from(s: StreamStats) -> Self {
        Self {
            hints_taken: s.hints_taken,
            backward_hints: s.backward_hints,
            cursor_claims: s.cursor_claims,
            cursor_pages: s.cursor_pages,
            runs_spent: s.runs_spent,
        }
    }
}

/// Most recoveries a summary carries.
const MAX_RECOVERIES: u64 = 1 << 16;

fn stats_fields(s: &SchedulerStats) -> [u64; 17] {
    [
        s.requests,
        s.bad_requests,
        s.requests_queued,
        s.queued_followed,
        s.urgent_host_pages,
        s.urgent_pages,
        s.urgent_already_claimed,
        s.background_claims,
        s.background_host_pages,
        s.background_pages,
        s.background_claims_lost,
        s.hints_offered,
        s.hints_accepted,
        s.hints_refused_pending,
        s.hints_taken,
        s.rounds,
        s.queued_stale,
    ]
}

impl Summary {
    /// Encodes the summary.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.checksums.len() * 8);
        let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
        for v in stats_fields(&self.stats) {
            put(v);
        }
        put(self.bg_host_pages);
        put(self.urgent_host_pages);
        put(self.zero_host_pages);
        put(self.postcopy_bytes);
        put(self.rejected.len() as u64);
        put(self.checksums.len() as u64);
        for r in &self.rejected {
            out.extend_from_slice(&(r.len() as u32).to_le_bytes());
            out.extend_from_slice(r.as_bytes());
        }
        for c in &self.checksums {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(&(self.generations.len() as u64).to_le_bytes());
        for g in &self.generations {
            out.extend_from_slice(&g.to_le_bytes());
        }
        out.extend_from_slice(&(self.recoveries.len() as u64).to_le_bytes());
        for r in &self.recoveries {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&self.resent_host_pages.to_le_bytes());
        out.extend_from_slice(&self.resent_bytes.to_le_bytes());
        out.extend_from_slice(&(self.requests.len() as u64).to_le_bytes());
        for r in &self.requests {
            for v in r.fields() {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.streams.len() as u64).to_le_bytes());
        for st in &self.streams {
            for v in st.fields() {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a summary, checking every length.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let bad = || WireError::Malformed(Channel::Background, "truncated summary".into());
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], WireError> {
            let s = b.get(at..at + n).ok_or_else(bad)?;
            at += n;
            Ok(s)
        };
        let mut u = [0u64; 23];
        for v in u.iter_mut() {
            *v = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        }
        let mut stats = SchedulerStats::default();
        stats.requests = u[0];
        stats.bad_requests = u[1];
        stats.requests_queued = u[2];
        stats.queued_followed = u[3];
        stats.urgent_host_pages = u[4];
        stats.urgent_pages = u[5];
        stats.urgent_already_claimed = u[6];
        stats.background_claims = u[7];
        stats.background_host_pages = u[8];
        stats.background_pages = u[9];
        stats.background_claims_lost = u[10];
        stats.hints_offered = u[11];
        stats.hints_accepted = u[12];
        stats.hints_refused_pending = u[13];
        stats.hints_taken = u[14];
        stats.rounds = u[15];
        stats.queued_stale = u[16];
        let (nrej, nsum) = (u[21], u[22]);
        if nrej > 64 || nsum > (b.len() / 8) as u64 {
            return Err(bad());
        }
        let mut rejected = Vec::new();
        for _ in 0..nrej {
            let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
            rejected.push(String::from_utf8_lossy(take(len)?).into_owned());
        }
        let mut checksums = Vec::with_capacity(nsum as usize);
        for _ in 0..nsum {
            checksums.push(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")));
        }
        let ngen = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        if ngen > (b.len() / 4) as u64 {
            return Err(bad());
        }
        let mut generations = Vec::with_capacity(ngen as usize);
        for _ in 0..ngen {
            generations.push(u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")));
        }
        let nrec = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        if nrec > MAX_RECOVERIES {
            return Err(bad());
        }
        let mut recoveries = Vec::with_capacity(nrec as usize);
        for _ in 0..nrec {
            recoveries.push(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")));
        }
        let resent_host_pages = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let resent_bytes = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let nreq = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        if nreq > (b.len() / (8 * ReqTrace::FIELDS)) as u64 {
            return Err(bad());
        }
        let mut requests = Vec::with_capacity(nreq as usize);
        for _ in 0..nreq {
            let mut f = [0u64; ReqTrace::FIELDS];
            for v in f.iter_mut() {
                *v = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
            }
            requests.push(ReqTrace::from_fields(f));
        }
        let nstreams = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        if nstreams > u64::from(MAX_STREAMS) {
            return Err(bad());
        }
        let mut streams = Vec::with_capacity(nstreams as usize);
        for _ in 0..nstreams {
            let mut f = [0u64; StreamCounts::FIELDS];
            for v in f.iter_mut() {
                *v = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
            }
            streams.push(StreamCounts {
                hints_taken: f[0],
                backward_hints: f[1],
                cursor_claims: f[2],
                cursor_pages: f[3],
                runs_spent: f[4],
            });
        }
        Ok(Self {
            stats,
            bg_host_pages: u[17],
            urgent_host_pages: u[18],
            zero_host_pages: u[19],
            postcopy_bytes: u[20],
            rejected,
            checksums,
            generations,
            recoveries,
            resent_host_pages,
            resent_bytes,
            requests,
            streams,
        })
    }
}

code_enum!(
    /// How the source answered a request.
    pub enum ReqPath: u64 {
        /// Claimed by the urgent path and sent on the urgent channel.
        Urgent = 0,
        /// Already claimed by the background path: the page comes on the background channel.
        Background = 1,
        /// Vanilla: queued for the background path.
        Queued = 2,
        /// Already claimed by the background path but not yet (or only just) written: sent again
        /// on the urgent channel; the destination places whichever copy arrives first.
        Resent = 3,
    }
);

impl ReqPath {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Urgent => "urgent",
            Self::Background => "background",
            Self::Queued => "queued",
            Self::Resent => "resent",
        }
    }
}

/// One request as the source handled it (source clock, ns; 0: did not happen).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqTrace {
    /// Global host page requested.
    pub host_page: u64,
    /// The return-path thread read the request.
    pub read_ns: u64,
    /// The scheduler answered (after the emulated link's delay).
    pub served_ns: u64,
    /// How ([`ReqPath`] code).
    pub path: u64,
    /// Urgent copy: its frame written to the socket.
    pub urgent_written_ns: u64,
    /// Urgent copy: its arrival on the emulated link.
    pub urgent_arrival_ns: u64,
    /// Background copy: claimed by the background scan.
    pub bg_claim_ns: u64,
    /// Background copy: its frame written to the socket.
    pub bg_written_ns: u64,
    /// Background copy: its arrival on the emulated link.
    pub bg_arrival_ns: u64,
}

impl ReqTrace {
    /// Fields on the wire.
    pub const FIELDS: usize = 9;

    /// The fields in wire order.
    pub fn fields(&self) -> [u64; Self::FIELDS] {
        [
            self.host_page,
            self.read_ns,
            self.served_ns,
            self.path,
            self.urgent_written_ns,
            self.urgent_arrival_ns,
            self.bg_claim_ns,
            self.bg_written_ns,
            self.bg_arrival_ns,
        ]
    }

    /// From the fields in wire order.
    pub fn from_fields(f: [u64; Self::FIELDS]) -> Self {
        Self {
            host_page: f[0],
            read_ns: f[1],
            served_ns: f[2],
            path: f[3],
            urgent_written_ns: f[4],
            urgent_arrival_ns: f[5],
            bg_claim_ns: f[6],
            bg_written_ns: f[7],
            bg_arrival_ns: f[8],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_round_trips_and_rejects_truncation() {
        let mut stats = SchedulerStats::default();
        // Every counter distinct, so a field decoded into another's place shows.
        stats.requests = 3;
        stats.bad_requests = 5;
        stats.requests_queued = 7;
        stats.queued_followed = 11;
        stats.queued_stale = 13;
        stats.urgent_host_pages = 17;
        stats.urgent_pages = 19;
        stats.urgent_already_claimed = 23;
        stats.background_claims = 29;
        stats.background_host_pages = 31;
        stats.background_pages = 37;
        stats.background_claims_lost = 41;
        stats.hints_offered = 43;
        stats.hints_accepted = 47;
        stats.hints_refused_pending = 53;
        stats.hints_taken = 59;
        stats.rounds = 1;
        let s = Summary {
            stats,
            bg_host_pages: 10,
            urgent_host_pages: 2,
            zero_host_pages: 1,
            postcopy_bytes: 4096,
            rejected: vec!["bad".into()],
            checksums: vec![1, 2, 3],
            generations: vec![0, 2, 4],
            recoveries: vec![100, 7],
            resent_host_pages: 4,
            resent_bytes: 16_512,
            requests: vec![ReqTrace {
                host_page: 5,
                read_ns: 10,
                served_ns: 60,
                path: 1,
                bg_claim_ns: 3,
                bg_written_ns: 70,
                bg_arrival_ns: 90,
                ..ReqTrace::default()
            }],
            streams: vec![
                StreamCounts {
                    hints_taken: 61,
                    backward_hints: 67,
                    cursor_claims: 71,
                    cursor_pages: 73,
                    runs_spent: 79,
                },
                StreamCounts::default(),
            ],
        };
        let b = s.encode();
        assert_eq!(Summary::decode(&b).unwrap(), s);
        assert!(Summary::decode(&b[..b.len() - 1]).is_err());
    }
}
