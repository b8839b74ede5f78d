//! The switch-over frame: what the source sends when it has stopped the guest and postcopy
//! begins (QEMU's device state plus its "discard" of pages dirtied since they were sent).
//!
//! Body, little endian: `stop_ns u64 | stopped_ns u64 | synced_ns u64 | built_ns u64 | rounds
//! u64 | precopy pages u64 | precopy bytes u64 | source run ns u64 | vcpus u64 | vcpus ×
//! VcpuState | blocks u64 | per block: host pages u64, runs u64, runs × run | guest counters
//! (10 × u64) | syncs u64 | syncs × (dirty pages u64, sync ns u64, drain ns u64) | KVM's
//! precopy counters (7 × u64, [`PrecopyKvm`])`.
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
/// Most host pages a block may have (the largest guest in 4 KiB pages).
const MAX_HOST_PAGES: u64 = MAX_MEM / TARGET_PAGE;

/// One block's pending set: one bit per host page (bit `i % 64` of word `i / 64` for host
/// page `i`), held as the runs the wire carries, so that building it, sending it and
/// applying it cost memory per run rather than per page. Bits past the block's last host
/// page are never set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingSet {
    host_pages: u64,
    /// How many runs `items` holds.
    runs: u64,
    /// The runs, each followed by its literal words.
    items: Vec<u64>,
}

impl PendingSet {
    /// The set of a block of `host_pages` host pages with these `words` (one bit per host
    /// page); `None` unless there are exactly `host_pages.div_ceil(64)` words and no bit
    /// past the last host page.
    pub fn from_words(host_pages: u64, words: &[u64]) -> Option<Self> {
        let mut b = PendingBuilder::new(host_pages);
        words.iter().for_each(|&w| b.push(w));
        b.finish()
    }

    /// Host pages of the block.
    pub fn host_pages(&self) -> u64 {
        self.host_pages
    }

    /// The words, in order (`host_pages().div_ceil(64)` of them).
    pub fn words(&self) -> impl Iterator<Item = u64> + '_ {
        let mut at = 0;
        let mut left = (0u64, 0u64); // (the run's kind, words left in it)
        std::iter::from_fn(move || {
            while left.1 == 0 {
                let run = *self.items.get(at)?;
                at += 1;
                left = (run & !COUNT, run & COUNT);
            }
            left.1 -= 1;
            Some(match left.0 {
                ZEROS => 0,
                ONES => !0,
                _ => {
                    at += 1;
                    self.items[at - 1]
                }
            })
        })
    }

    /// The runs in order: `(word, count)` for `count` words that all equal `word` (zeros or
    /// ones), or the literal words of a run — what a consumer that can treat a whole run at
    /// once walks instead of [`words`](Self::words).
    pub fn segments(&self) -> impl Iterator<Item = Segment<'_>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let run = *self.items.get(at)?;
            let n = run & COUNT;
            at += 1;
            Some(match run & !COUNT {
                ZEROS => Segment::Fill(0, n),
                ONES => Segment::Fill(!0, n),
                _ => {
                    at += n as usize;
                    Segment::Literal(&self.items[at - n as usize..at])
                }
            })
        })
    }

    /// Host pages in the set.
    pub fn pending(&self) -> u64 {
        self.segments()
            .map(|s| match s {
                Segment::Fill(w, n) => u64::from(w.count_ones()) * n,
                Segment::Literal(ws) => ws.iter().map(|w| u64::from(w.count_ones())).sum(),
            })
            .sum()
    }

    /// Whether host page `i` of the block is in the set (a walk over the runs: for checks,
    /// not for loops).
    pub fn contains(&self, i: u64) -> bool {
        i < self.host_pages
            && self
                .words()
                .nth((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.host_pages, self.runs].iter().chain(&self.items) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, &'static str> {
        let host_pages = r.u64().ok_or("truncated")?;
        if host_pages > MAX_HOST_PAGES {
            return Err("more host pages than the largest guest has");
        }
        let runs = r.u64().ok_or("truncated")?;
        if runs > (r.b.len() / 8) as u64 {
            return Err("block bitmap runs");
        }
        let (mut words, mut items) = (0u64, Vec::new());
        let mut last = 0;
        for _ in 0..runs {
            let run = r.u64().ok_or("truncated")?;
            let n = run & COUNT;
            if n == 0 || words + n > host_pages.div_ceil(64) {
                return Err("block bitmap length");
            }
            items.push(run);
            match run & !COUNT {
                ZEROS => last = 0,
                ONES => last = !0,
                LITERAL => {
                    for _ in 0..n {
                        last = r.u64().ok_or("truncated")?;
                        items.push(last);
                    }
                }
                _ => return Err("unknown bitmap run"),
            }
            words += n;
        }
        if words != host_pages.div_ceil(64) {
            return Err("block bitmap length");
        }
        if host_pages % 64 != 0 && words > 0 && last >> (host_pages % 64) != 0 {
            return Err("bits past the block's end");
        }
        Ok(Self {
            host_pages,
            runs,
            items,
        })
    }
}

/// A run of a [`PendingSet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    /// This many words (the second) of this word (the first: zeros or all ones).
    Fill(u64, u64),
    /// These words.
    Literal(&'a [u64]),
}

/// Builds a [`PendingSet`] a word at a time: zero and all-ones words join runs of their
/// kind, any other word a run of literal words.
#[derive(Debug)]
pub struct PendingBuilder {
    set: PendingSet,
    /// Words pushed.
    words: u64,
    /// The open run: its index in `items`.
    open: Option<usize>,
    /// The last word pushed.
    last: u64,
}

impl PendingBuilder {
    /// A builder for a block of `host_pages` host pages.
    pub fn new(host_pages: u64) -> Self {
        Self {
            set: PendingSet {
                host_pages,
                ..PendingSet::default()
            },
            words: 0,
            open: None,
            last: 0,
        }
    }

    /// Appends the next word.
    pub fn push(&mut self, w: u64) {
        let kind = match w {
            0 => ZEROS,
            u64::MAX => ONES,
            _ => LITERAL,
        };
        let items = &mut self.set.items;
        match self.open {
            Some(i) if items[i] & !COUNT == kind && items[i] & COUNT < COUNT => items[i] += 1,
            _ => {
                self.open = Some(items.len());
                items.push(kind | 1);
                self.set.runs += 1;
            }
        }
        if kind == LITERAL {
            items.push(w);
        }
        self.words += 1;
        self.last = w;
    }

    /// Appends `n` words of zeros (`ones` false) or all ones: one step, whatever `n`.
    pub fn push_fill(&mut self, ones: bool, n: u64) {
        if n == 0 {
            return;
        }
        let w = if ones { !0 } else { 0 };
        self.push(w);
        // The push left a fill run open, and a fill run is the last item (no words follow it).
        let i = self.set.items.len() - 1;
        let room = COUNT - (self.set.items[i] & COUNT);
        let more = (n - 1).min(room);
        self.set.items[i] += more;
        self.words += more;
        if n - 1 > more {
            // More words than one run counts (2^62): never for a real block, but exact.
            self.open = None;
            self.push_fill(ones, n - 1 - more);
        }
    }

    /// The set; `None` unless exactly the block's words were pushed, with no bit past its
    /// last host page.
    pub fn finish(self) -> Option<PendingSet> {
        let hp = self.set.host_pages;
        let past = !hp.is_multiple_of(64) && self.words > 0 && self.last >> (hp % 64) != 0;
        (self.words == hp.div_ceil(64) && hp <= MAX_HOST_PAGES && !past).then_some(self.set)
    }
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
    /// Per block: the host pages still to send.
    pub pending: Vec<PendingSet>,
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
        self.pending.iter().map(PendingSet::pending).sum()
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
        for set in &self.pending {
            set.encode(&mut out);
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
        for _ in 0..nblocks {
            pending.push(PendingSet::decode(&mut r).map_err(bad)?);
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
            stopped_ns,
            synced_ns,
            built_ns,
            rounds,
            precopy_pages,
            precopy_bytes,
            source_run_ns,
            vcpus,
            pending,
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

    fn set(host_pages: u64, words: &[u64]) -> PendingSet {
        PendingSet::from_words(host_pages, words).expect("a valid set")
    }

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
            pending: vec![set(3, &[0b101]), set(65, &[u64::MAX, 1])],
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
            (d.stop_ns, d.stopped_ns, d.synced_ns, d.built_ns),
            (5, 6, 7, 8)
        );
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
        // A whole (or empty) set is a few words on the wire, whatever its size.
        let mut big = s.clone();
        let mut tail = vec![0u64; (1 << 15) + 1];
        tail[1 << 15] = 0b101;
        big.pending = vec![set(1 << 21, &vec![!0; 1 << 15]), set((1 << 21) + 3, &tail)];
        let enc = big.encode();
        assert!(enc.len() < s.encode().len() + 64, "{} bytes", enc.len());
        let d = SwitchOver::decode(&enc).unwrap();
        assert_eq!(d.pending, big.pending);
        assert_eq!(d.pending_host_pages(), (1 << 21) + 2);
    }

    #[test]
    fn pending_sets_give_back_their_words_and_refuse_bad_shapes() {
        for words in [
            vec![],
            vec![5],
            vec![0, 0, 0],
            vec![!0, !0, 7, 0, !0, 0, 0, 9, 9, !0],
            vec![0, 5, 0, 0, !0, !0, !0, 1, 0],
        ] {
            let n = words.len() as u64 * 64;
            let p = set(n, &words);
            assert_eq!(p.words().collect::<Vec<_>>(), words);
            assert_eq!(p.host_pages(), n);
            let ones: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            assert_eq!(p.pending(), ones);
            for i in [0, 1, 64, 130, 511, n.saturating_sub(1), n] {
                let want = i < n && words[(i / 64) as usize] & (1 << (i % 64)) != 0;
                assert_eq!(p.contains(i), want, "{words:x?} {i}");
            }
        }
        // Runs join: nine words of ones and zeros are three runs, not nine.
        let p = set(9 * 64, &[!0, !0, !0, 0, 0, 0, !0, !0, !0]);
        assert_eq!((p.runs, p.items.len()), (3, 3));
        assert_eq!(
            p.segments().collect::<Vec<_>>(),
            vec![
                Segment::Fill(!0, 3),
                Segment::Fill(0, 3),
                Segment::Fill(!0, 3)
            ]
        );
        let q = set(3 * 64 + 5, &[5, 6, 0, 0b10]);
        assert_eq!(
            q.segments().collect::<Vec<_>>(),
            vec![
                Segment::Literal(&[5, 6]),
                Segment::Fill(0, 1),
                Segment::Literal(&[0b10])
            ]
        );
        // A fill of any length is one step, and joins what was pushed word by word.
        let mut b = PendingBuilder::new(1 << 24);
        b.push(!0);
        b.push_fill(true, (1 << 18) - 2);
        b.push_fill(false, 0);
        b.push(!0);
        let f = b.finish().unwrap();
        assert_eq!((f.runs, f.items.len(), f.pending()), (1, 1, 1 << 24));
        assert!(PendingSet::from_words(128, &[0]).is_none(), "too few words");
        assert!(
            PendingSet::from_words(3, &[0b1000]).is_none(),
            "a bit past the end"
        );
        assert!(PendingSet::from_words(MAX_HOST_PAGES + 64, &[]).is_none());
    }

    #[test]
    fn bad_runs_on_the_wire_are_refused() {
        // A body whose one block is `host pages` and these runs.
        let body = |hp: u64, runs: &[u64]| {
            let mut s = sample();
            s.pending = vec![];
            let mut b = s.encode();
            // After the blocks: the guest counters, the syncs (three words each), KVM's.
            let at = b.len() - 8 * (10 + 1 + 3 * s.dirty_per_round.len() + PrecopyKvm::WORDS);
            let mut mid = 1u64.to_le_bytes().to_vec();
            mid.extend(hp.to_le_bytes());
            mid.extend((runs.len() as u64).to_le_bytes());
            runs.iter().for_each(|r| mid.extend(r.to_le_bytes()));
            b.splice(at - 8..at, mid);
            SwitchOver::decode(&b).map(|d| d.pending)
        };
        let ok = body(128, &[ONES | 2]).unwrap();
        assert_eq!(ok[0].words().collect::<Vec<_>>(), vec![!0, !0]);
        for (hp, runs, says) in [
            (128, vec![ONES | 3], "length"),
            (128, vec![ONES | 1], "length"),
            (128, vec![ZEROS, ONES | 2], "length"),
            (128, vec![(3 << 62) | 2], "unknown"),
            (100, vec![ONES | 2], "past the block's end"),
            (u64::MAX, vec![ONES | COUNT], "largest guest"),
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
            pending: vec![set(64, &[1])],
            guest: [0; 10],
            dirty_per_round: vec![3],
            sync_ns: vec![5],
            drain_ns: vec![6],
            kvm: PrecopyKvm::default(),
        }
    }
}
