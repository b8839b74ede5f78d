//! The switch-over frame: what the source sends when it has stopped the guest and postcopy
//! begins (QEMU's device state plus its "discard" of pages dirtied since they were sent).
//!
//! Body, little endian: `stop_ns u64 | rounds u64 | precopy pages u64 | precopy bytes u64 |
//! source run ns u64 | vcpus u64 | vcpus × VcpuState | blocks u64 | per block: host pages
//! u64, words u64, words × u64 | guest counters (10 × u64) | syncs u64 | syncs × (dirty pages
//! u64, sync ns u64, drain ns u64) | KVM's precopy counters (7 × u64, [`PrecopyKvm`])`.
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
    /// Per entry of `dirty_per_round`: its sync's time, ns.
    pub sync_ns: Vec<u64>,
    /// Per entry of `dirty_per_round`: its drain's time, ns (0: not drained).
    pub drain_ns: Vec<u64>,
    /// KVM's side of precopy.
    pub kvm: PrecopyKvm,
}

/// KVM's side of precopy at the source, over the rounds (from the first sync to the end of
/// the last drain).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyKvm {
    /// The vCPUs' counters below were read (KVM has stats files).
    pub counted: bool,
    /// Page faults KVM handled, all vCPUs (`pf_taken`).
    pub faults: u64,
    /// Of those, fixed on the slow path (`pf_fixed`).
    pub fixed: u64,
    /// Of those, fixed on the fast path (`pf_fast`).
    pub fast: u64,
    /// Remote TLB flushes (`remote_tlb_flush`).
    pub tlb_flushes: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls (manual re-protection).
    pub log_clears: u64,
    /// Pages they cleared.
    pub cleared_pages: u64,
}

impl PrecopyKvm {
    const WORDS: usize = 7;

    fn words(&self) -> [u64; Self::WORDS] {
        [
            u64::from(self.counted),
            self.faults,
            self.fixed,
            self.fast,
            self.tlb_flushes,
            self.log_clears,
            self.cleared_pages,
        ]
    }

    fn from_words(w: [u64; Self::WORDS]) -> Option<Self> {
        let [counted, faults, fixed, fast, tlb_flushes, log_clears, cleared_pages] = w;
        Some(Self {
            counted: match counted {
                0 => false,
                1 => true,
                _ => return None,
            },
            faults,
            fixed,
            fast,
            tlb_flushes,
            log_clears,
            cleared_pages,
        })
    }
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
        for (i, &v) in self.dirty_per_round.iter().enumerate() {
            put(&mut out, v);
            put(&mut out, self.sync_ns.get(i).copied().unwrap_or(0));
            put(&mut out, self.drain_ns.get(i).copied().unwrap_or(0));
        }
        for v in self.kvm.words() {
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
        let stop_ns = r.u64().ok_or_else(|| bad("truncated"))?;
        let mut head = [0u64; 5];
        for h in head.iter_mut() {
            *h = r.u64().ok_or_else(|| bad("truncated"))?;
        }
        let [rounds, precopy_pages, precopy_bytes, source_run_ns, nvcpus] = head;
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
        let (mut dirty_per_round, mut sync_ns, mut drain_ns) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..nrounds {
            for v in [&mut dirty_per_round, &mut sync_ns, &mut drain_ns] {
                v.push(r.u64().ok_or_else(|| bad("truncated"))?);
            }
        }
        let mut kvm = [0u64; PrecopyKvm::WORDS];
        for k in kvm.iter_mut() {
            *k = r.u64().ok_or_else(|| bad("truncated"))?;
        }
        let kvm = PrecopyKvm::from_words(kvm).ok_or_else(|| bad("KVM counters flag"))?;
        if r.at != b.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            stop_ns,
            rounds,
            precopy_pages,
            precopy_bytes,
            source_run_ns,
            vcpus,
            pending,
            host_pages,
            guest,
            dirty_per_round,
            sync_ns,
            drain_ns,
            kvm,
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
            rounds: 2,
            precopy_pages: 100,
            precopy_bytes: 409_600,
            source_run_ns: 7,
            vcpus: vec![],
            pending: vec![vec![0b101], vec![u64::MAX, 1]],
            host_pages: vec![3, 65],
            guest: [1, 2, 0, 0, 0, 0, 0, 0, 3, 4],
            dirty_per_round: vec![10, 4],
            sync_ns: vec![8, 9],
            drain_ns: vec![11, 0],
            kvm: PrecopyKvm {
                counted: true,
                faults: 12,
                fixed: 5,
                fast: 7,
                tlb_flushes: 3,
                log_clears: 2,
                cleared_pages: 10,
            },
        };
        let b = s.encode();
        let d = SwitchOver::decode(&b).unwrap();
        assert_eq!(d.pending, s.pending);
        assert_eq!(d.pending_host_pages(), 2 + 65);
        assert_eq!(d.dirty_per_round, s.dirty_per_round);
        assert_eq!(
            (d.sync_ns, d.drain_ns),
            (s.sync_ns.clone(), s.drain_ns.clone())
        );
        assert_eq!(d.kvm, s.kvm);
        let mut flag = b.clone();
        let at = flag.len() - 8 * PrecopyKvm::WORDS;
        flag[at] = 2;
        assert!(SwitchOver::decode(&flag).is_err());
        assert!(SwitchOver::decode(&b[..b.len() - 1]).is_err());
        let mut past = s.clone();
        past.pending[0] = vec![0b1000];
        assert!(SwitchOver::decode(&past.encode()).is_err());
    }
}
