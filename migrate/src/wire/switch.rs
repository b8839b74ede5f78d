//! The switch-over frame: what the source sends when it has stopped the guest and postcopy
//! begins (QEMU's device state plus its "discard" of pages dirtied since they were sent).
//!
//! Body, little endian: `stop_ns u64 | stopped_ns u64 | synced_ns u64 | built_ns u64 | rounds
//! u64 | precopy pages u64 | precopy bytes u64 | source run ns u64 | vcpus u64 | vcpus ×
//! VcpuState | blocks u64 | per block: host pages u64, runs u64, runs × run | guest counters
//! (10 × u64) | rounds × dirty pages u64`.
//!
//! Each block's pending set is one bit per **host page** still to send (dirty since it was
//! last sent, or never sent): exactly the host pages the destination must discard and receive
//! in postcopy; every other host page it already holds. Its words (bit `i % 64` of word
//! `i / 64` for host page `i`) travel as runs, so that the frame does not grow with RAM where
//! the set is whole or empty (pure postcopy; a converged precopy): a run is a `u64` whose top
//! two bits say what it is and whose low 62 bits count words — `0`: that many words of
//! zeros, `1`: of ones, `2`: that many words follow as they are.

use super::{Channel, WireError};
use crate::guest::kvm::vm::VcpuState;
use crate::guest::layout::{MAX_MEM, TARGET_PAGE};

/// A run of zero words (top two bits of a run).
const ZEROS: u64 = 0;
/// A run of all-ones words.
const ONES: u64 = 1 << 62;
/// Literal words follow.
const LITERAL: u64 = 2 << 62;
/// The word count of a run.
const COUNT: u64 = (1 << 62) - 1;

/// `words` as runs (see the module docs): how many, and the runs with their literal words.
fn runs(words: &[u64]) -> (u64, Vec<u64>) {
    let (mut n, mut out) = (0, Vec::new());
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let same = words[i..].iter().take_while(|&&x| x == w).count();
        n += 1;
        if (w == 0 || w == !0) && same > 1 {
            out.push(if w == 0 { ZEROS } else { ONES } | same as u64);
            i += same;
            continue;
        }
        // Literal words up to the next run of two or more zero or all-ones words.
        let start = i;
        while i < words.len() {
            let x = words[i];
            if (x == 0 || x == !0) && words.get(i + 1) == Some(&x) {
                break;
            }
            i += 1;
        }
        out.push(LITERAL | (i - start) as u64);
        out.extend_from_slice(&words[start..i]);
    }
    (n, out)
}

/// The switch from precopy to postcopy.
#[derive(Clone, Debug)]
pub struct SwitchOver {
    /// When the source stopped the vCPUs (source clock).
    pub stop_ns: u64,
    /// When the vCPUs were out with their state saved, and the device model and the dirty
    /// harvest stopped (source clock): the downtime's first stage ends.
    pub stopped_ns: u64,
    /// When the last dirty pages were synced into the bitmap (source clock).
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
            self.stopped_ns,
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
            let (n, runs) = runs(words);
            put(&mut out, hp);
            put(&mut out, n);
            for r in runs {
                put(&mut out, r);
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
        let mut head = [0u64; 9];
        for h in head.iter_mut() {
            *h = r.u64().ok_or_else(|| bad("truncated"))?;
        }
        let [stop_ns, stopped_ns, synced_ns, built_ns, rounds, precopy_pages, precopy_bytes, source_run_ns, nvcpus] =
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
            if hp > MAX_MEM / TARGET_PAGE {
                return Err(bad("more host pages than the largest guest has"));
            }
            let nwords = hp.div_ceil(64) as usize;
            let nruns = r.u64().ok_or_else(|| bad("truncated"))?;
            if nruns > (b.len() / 8) as u64 {
                return Err(bad("block bitmap runs"));
            }
            let mut words = Vec::with_capacity(nwords);
            for _ in 0..nruns {
                let run = r.u64().ok_or_else(|| bad("truncated"))?;
                let n = (run & COUNT) as usize;
                if n == 0 || words.len() + n > nwords {
                    return Err(bad("block bitmap length"));
                }
                match run & !COUNT {
                    ZEROS => words.resize(words.len() + n, 0),
                    ONES => words.resize(words.len() + n, !0),
                    LITERAL => {
                        for _ in 0..n {
                            words.push(r.u64().ok_or_else(|| bad("truncated"))?);
                        }
                    }
                    _ => return Err(bad("unknown bitmap run")),
                }
            }
            if words.len() != nwords {
                return Err(bad("block bitmap length"));
            }
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
            stopped_ns,
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
            stopped_ns: 6,
            synced_ns: 7,
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
        assert_eq!(
            (d.stop_ns, d.stopped_ns, d.synced_ns, d.built_ns),
            (5, 6, 7, 8)
        );
        assert!(SwitchOver::decode(&b[..b.len() - 1]).is_err());
        let mut past = s.clone();
        past.pending[0] = vec![0b1000];
        assert!(SwitchOver::decode(&past.encode()).is_err());
        // A whole (or empty) set is a few words on the wire, whatever its size.
        let mut big = s.clone();
        big.host_pages = vec![1 << 21, (1 << 21) + 3];
        big.pending = vec![vec![!0; 1 << 15], vec![0; (1 << 15) + 1]];
        big.pending[1][1 << 15] = 0b101;
        let enc = big.encode();
        assert!(enc.len() < s.encode().len() + 64, "{} bytes", enc.len());
        assert_eq!(SwitchOver::decode(&enc).unwrap().pending, big.pending);
    }

    #[test]
    fn bitmap_runs_round_trip_every_mix_and_bad_runs_are_refused() {
        let w = |v: &[u64]| v.to_vec();
        for words in [
            w(&[]),
            w(&[5]),
            w(&[0, 0, 0]),
            w(&[!0, !0, 7, 0, !0, 0, 0, 9, 9, !0]),
            w(&[0, 5, 0, 0, !0, !0, !0, 1, 0]),
        ] {
            let runs = runs(&words);
            let n = words.len() as u64;
            let s = SwitchOver {
                host_pages: vec![n * 64],
                pending: vec![words.clone()],
                ..sample()
            };
            assert_eq!(
                SwitchOver::decode(&s.encode()).unwrap().pending[0],
                words,
                "{runs:x?}"
            );
        }
        // Runs that overflow the block, a run of no words, an unknown kind, a huge block.
        let body = |hp: u64, runs: &[u64]| {
            let s = sample();
            let mut b = s.encode();
            // Replace the (empty) blocks part: `blocks u64` is followed by the counters.
            let at = b.len() - 8 * (10 + 1 + s.dirty_per_round.len());
            let mut mid = 1u64.to_le_bytes().to_vec();
            mid.extend(hp.to_le_bytes());
            mid.extend((runs.len() as u64).to_le_bytes());
            runs.iter().for_each(|r| mid.extend(r.to_le_bytes()));
            b.splice(at - 8..at, mid);
            SwitchOver::decode(&b).map(|d| d.pending)
        };
        assert_eq!(body(128, &[ONES | 2]).unwrap(), vec![vec![!0, !0]]);
        for (hp, runs, says) in [
            (128, vec![ONES | 3], "length"),
            (128, vec![ONES | 1], "length"),
            (128, vec![ZEROS, ONES | 2], "length"),
            (128, vec![(3 << 62) | 2], "unknown"),
            (u64::MAX, vec![ONES | COUNT], "largest guest"),
            (64, vec![LITERAL | 1], "truncated"),
        ] {
            let e = body(hp, &runs).unwrap_err().to_string();
            assert!(e.contains(says), "{runs:x?}: {e}");
        }
    }

    fn sample() -> SwitchOver {
        SwitchOver {
            stop_ns: 1,
            stopped_ns: 2,
            synced_ns: 3,
            built_ns: 4,
            rounds: 0,
            precopy_pages: 0,
            precopy_bytes: 0,
            source_run_ns: 0,
            vcpus: vec![],
            pending: vec![],
            host_pages: vec![],
            guest: [0; 10],
            dirty_per_round: vec![3],
        }
    }
}
