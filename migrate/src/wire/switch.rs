//! The switch-over frame: what the source sends when it has stopped the guest and postcopy
//! begins (QEMU's device state plus its "discard" of pages dirtied since they were sent).
//!
//! Body, little endian: `stop_ns u64 | synced_ns u64 | built_ns u64 | rounds u64 | precopy
//! pages u64 | precopy bytes u64 | source run ns u64 | vcpus u64 | vcpus × VcpuState | blocks
//! u64 | per block: host pages u64, words u64, words × u64 | guest counters (10 × u64) |
//! rounds × dirty pages u64`.
//!
//! The per-block words are one bit per **host page** still to send (dirty since it was last
//! sent, or never sent): exactly the host pages the destination must discard and receive in
//! postcopy; every other host page it already holds.

use super::{Channel, WireError};
use crate::guest::kvm::vm::VcpuState;

/// The switch from precopy to postcopy.
#[derive(Clone, Debug)]
pub struct SwitchOver {
    /// When the source stopped the vCPUs (source clock).
    pub stop_ns: u64,
    /// When the vCPUs were out, their state saved and the last dirty pages synced (source
    /// clock): the downtime's first stage ends.
    pub synced_ns: u64,
    /// When the pending set and this frame were built, just before it was written (source
    /// clock): the downtime's second stage ends.
    pub built_ns: u64,
    /// Precopy rounds done.
    pub rounds: u64,
    /// Target pages sent in precopy (each resend counts).
    pub precopy_pages: u64,
    /// Bytes on the link in precopy (headers included).
    pub precopy_bytes: u64,
    /// How long the guest ran at the source.
    pub source_run_ns: u64,
    /// Each vCPU's state (none for the thread guest).
    pub vcpus: Vec<VcpuState>,
    /// Per block: one bit per host page still to send.
    pub pending: Vec<Vec<u64>>,
    /// Per block: host pages.
    pub host_pages: Vec<u64>,
    /// The guest program's counters at the source, summed over vCPUs: ops, writes, errors,
    /// then the first error (kind, page, two words, generation; zeros if none), frames, and
    /// the longest stream pause in TSC ticks.
    pub guest: [u64; 10],
    /// Dirty pages at the start of each precopy round.
    pub dirty_per_round: Vec<u64>,
}

impl SwitchOver {
    /// Host pages still to send, over all blocks.
    pub fn pending_host_pages(&self) -> u64 {
        self.pending
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let put = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
        for v in [
            self.stop_ns,
            self.synced_ns,
            self.built_ns,
            self.rounds,
            self.precopy_pages,
            self.precopy_bytes,
            self.source_run_ns,
            self.vcpus.len() as u64,
        ] {
            put(&mut out, v);
        }
        for s in &self.vcpus {
            out.extend_from_slice(&s.encode());
        }
        put(&mut out, self.pending.len() as u64);
        for (words, &hp) in self.pending.iter().zip(&self.host_pages) {
            put(&mut out, hp);
            put(&mut out, words.len() as u64);
            for &w in words {
                put(&mut out, w);
            }
        }
        for &v in &self.guest {
            put(&mut out, v);
        }
        put(&mut out, self.dirty_per_round.len() as u64);
        for &v in &self.dirty_per_round {
            put(&mut out, v);
        }
        out
    }

    /// Decodes a body, checking every count against what is left of it.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let bad = |what: &str| {
            WireError::Malformed(Channel::Background, format!("switch-over frame: {what}"))
        };
        let mut r = Reader { b, at: 0 };
        let mut head = [0u64; 8];
        for h in head.iter_mut() {
            *h = r.u64().ok_or_else(|| bad("truncated"))?;
        }
        let [stop_ns, synced_ns, built_ns, rounds, precopy_pages, precopy_bytes, source_run_ns, nvcpus] =
            head;
        if nvcpus > 64 {
            return Err(bad("more than 64 vCPUs"));
        }
        let mut vcpus = Vec::new();
        for _ in 0..nvcpus {
            let raw = r.bytes(VcpuState::LEN).ok_or_else(|| bad("truncated"))?;
            vcpus.push(VcpuState::decode(raw).ok_or_else(|| bad("vCPU state"))?);
        }
        let nblocks = r.u64().ok_or_else(|| bad("truncated"))?;
        if nblocks > 16 {
            return Err(bad("more than 16 blocks"));
        }
        let mut pending = Vec::new();
        let mut host_pages = Vec::new();
        for _ in 0..nblocks {
            let hp = r.u64().ok_or_else(|| bad("truncated"))?;
            let nwords = r.u64().ok_or_else(|| bad("truncated"))?;
            if nwords != hp.div_ceil(64) || nwords > (b.len() / 8) as u64 {
                return Err(bad("block bitmap length"));
            }
            let words = (0..nwords)
                .map(|_| r.u64())
                .collect::<Option<Vec<u64>>>()
                .ok_or_else(|| bad("truncated"))?;
            // No bit past the block's last host page.
            if hp % 64 != 0 && words.last().is_some_and(|&w| w >> (hp % 64) != 0) {
                return Err(bad("bits past the block's end"));
            }
            pending.push(words);
            host_pages.push(hp);
        }
        let mut guest = [0u64; 10];
        for g in guest.iter_mut() {
            *g = r.u64().ok_or_else(|| bad("truncated"))?;
        }
        let nrounds = r.u64().ok_or_else(|| bad("truncated"))?;
        if nrounds > (b.len() / 8) as u64 {
            return Err(bad("too many rounds"));
        }
        let dirty_per_round = (0..nrounds)
            .map(|_| r.u64())
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| bad("truncated"))?;
        if r.at != b.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            stop_ns,
            synced_ns,
            built_ns,
            rounds,
            precopy_pages,
            precopy_bytes,
            source_run_ns,
            vcpus,
            pending,
            host_pages,
            guest,
            dirty_per_round,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_bodies() {
        let s = SwitchOver {
            stop_ns: 5,
            synced_ns: 6,
            built_ns: 8,
            rounds: 2,
            precopy_pages: 100,
            precopy_bytes: 409_600,
            source_run_ns: 7,
            vcpus: vec![],
            pending: vec![vec![0b101], vec![u64::MAX, 1]],
            host_pages: vec![3, 65],
            guest: [1, 2, 0, 0, 0, 0, 0, 0, 3, 4],
            dirty_per_round: vec![10, 4],
        };
        let b = s.encode();
        let d = SwitchOver::decode(&b).unwrap();
        assert_eq!(d.pending, s.pending);
        assert_eq!(d.pending_host_pages(), 2 + 65);
        assert_eq!(d.dirty_per_round, s.dirty_per_round);
        assert_eq!((d.stop_ns, d.synced_ns, d.built_ns), (5, 6, 8));
        assert!(SwitchOver::decode(&b[..b.len() - 1]).is_err());
        let mut past = s.clone();
        past.pending[0] = vec![0b1000];
        assert!(SwitchOver::decode(&past.encode()).is_err());
    }
}
