//! What the guest does while it is migrated: every fact about a workload, in one place.
//!
//! A workload has a command-line name and a wire code (the hello, the parameter page), a
//! one-line description (help texts list [`Workload::ALL`]), a window of guest memory
//! ([`Workload::window`], from [`GuestLayout`]), and a rule for what its longest pause is
//! ([`Workload::pause`]). Its behaviour lives where it runs, each behind an exhaustive
//! `match` on `Workload`, so that a workload added here without them does not compile:
//!
//! * the KVM guest's program: [`crate::guest::kvm::program`]'s `Gen::emit_workload`;
//! * the thread guest: `dest::thread_guest::run`.
//!
//! **Adding a workload**: a line in the table below (name, code, doc), an arm in each
//! `match` of this file, an emitter in the guest program, a loop in the thread guest, and,
//! if it works in a window of its own, that window in [`GuestLayout`] and the parameter
//! page ([`crate::guest::image::Params`]). The compiler names every `match` left out:
//!
//! ```compile_fail,E0004
//! use pagehint_migrate::guest::Workload;
//! // An emitter table that forgot a workload (`kv`) is refused, as the guest program's is.
//! fn emitter(w: Workload) -> &'static str {
//!     match w {
//!         Workload::Seq => "seq",
//!         Workload::Random => "random",
//!         Workload::Stream => "stream",
//!     }
//! }
//! ```

use std::ops::Range;

use super::layout::GuestLayout;
use crate::names::named_enum;

/// Frames of the stream workload, in target pages (64 KiB).
pub const STREAM_FRAME_PAGES: u64 = 16;

named_enum!(
    /// What the guest does while it is migrated.
    Workload, "workload" {
        /// Reads (and every eighth page writes) its window in order, over and over.
        Seq = 1, "seq";
        /// Reads random pages of the data area, writing a quarter of those it owns.
        Random = 2, "random";
        /// Plays its window in 64 KiB frames at a fixed rate, like video playback.
        Stream = 3, "stream";
        /// Looks keys up in a hash table built before the migration; updates an eighth.
        Kv = 4, "kv";
        /// vCPU 0 plays the stream; the others look keys up (kv): two localities at once.
        Mixed = 5, "mixed";
    }
);

/// What a workload's longest pause is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// The longest time the player was behind schedule (the guest measures it).
    Playback,
    /// The longest fault wait.
    LongestFault,
}

impl Workload {
    /// The default list: the four workloads of the seed's comparison (`mixed`, which needs
    /// several vCPUs to differ from `stream`, is asked for by name).
    pub const DEFAULT_LIST: &'static str = "seq,random,stream,kv";

    /// What it does, in a few words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Seq => "reads its window in order, writing every eighth page",
            Self::Random => "reads random pages of the data area, writing a quarter",
            Self::Stream => "plays its window in 64 KiB frames at a fixed rate",
            Self::Kv => "looks keys up in a hash table, updating an eighth",
            Self::Mixed => "vCPU 0 plays the stream, the other vCPUs look keys up",
        }
    }

    /// What vCPU `vcpu` of `vcpus` does in this workload, with several vCPUs: `seq` and
    /// `stream` give each vCPU a window of its own ([`GuestLayout::seq_window`]), `random`
    /// and `kv` share theirs, `mixed` is `stream` on vCPU 0 and `kv` on the others.
    pub fn role(self, vcpu: u32) -> Workload {
        match self {
            Self::Mixed if vcpu == 0 => Self::Stream,
            Self::Mixed => Self::Kv,
            w => w,
        }
    }

    /// How many of `vcpus` vCPUs play a stream.
    pub fn streams(self, vcpus: u32) -> u32 {
        (0..vcpus).filter(|&v| self.role(v) == Self::Stream).count() as u32
    }

    /// The rate each playing vCPU plays at when the guest streams `total` bytes/s in all:
    /// the streams share it (a one-vCPU guest plays at `total`), so that the guest asks for
    /// as much as with one stream, however many vCPUs play.
    pub fn stream_rate_each(self, total: u64, vcpus: u32) -> u64 {
        (total / u64::from(self.streams(vcpus).max(1))).max(1)
    }

    /// The pages it works in with one vCPU: its window, or (random) the whole data area
    /// (`mixed`: the stream's; its other vCPUs work in the hash table).
    pub fn window(self, layout: &GuestLayout) -> Range<u64> {
        match self {
            Self::Seq => layout.seq.clone(),
            Self::Random => layout.data.clone(),
            Self::Stream | Self::Mixed => layout.stream.clone(),
            Self::Kv => layout.kv.clone(),
        }
    }

    /// What its longest pause is: the streams' playback pause (the guest reports it),
    /// the longest fault for the others.
    pub fn pause(self) -> Pause {
        match self {
            Self::Stream | Self::Mixed => Pause::Playback,
            Self::Seq | Self::Random | Self::Kv => Pause::LongestFault,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::HostPageSize;

    #[test]
    fn every_workload_has_its_facts() {
        let l = GuestLayout::new(64 << 20, HostPageSize::Small, 1).unwrap();
        for &w in Workload::ALL {
            let win = w.window(&l);
            assert!(!win.is_empty() && win.end <= l.data.end, "{w}: {win:?}");
            assert!(win.start >= l.data.start, "{w}: {win:?}");
            assert!(!w.describe().is_empty());
            assert_eq!(Workload::from_code(w.code()), Some(w));
        }
        assert_eq!(Workload::NAMES, "seq, random, stream, kv, mixed");
        assert_eq!(Workload::LIST, "seq,random,stream,kv,mixed");
        assert!(Workload::DEFAULT_LIST
            .split(',')
            .all(|w| w.parse::<Workload>().is_ok()));
        assert_eq!(Workload::Stream.pause(), Pause::Playback);
        // Who plays, and at what rate: the guest's total is shared by its streams.
        assert_eq!(Workload::Stream.streams(4), 4);
        assert_eq!(Workload::Mixed.streams(4), 1);
        assert_eq!(Workload::Kv.streams(4), 0);
        assert_eq!(Workload::Stream.stream_rate_each(256 << 20, 4), 64 << 20);
        assert_eq!(Workload::Stream.stream_rate_each(256 << 20, 1), 256 << 20);
        assert_eq!(Workload::Mixed.stream_rate_each(256 << 20, 4), 256 << 20);
        assert_eq!(Workload::Mixed.role(0), Workload::Stream);
        assert_eq!(Workload::Mixed.role(3), Workload::Kv);
        assert_eq!(Workload::Seq.role(3), Workload::Seq);
    }
}

named_enum!(
    /// How the KVM guest waits when its stream is ahead of schedule (`--guest-wait`).
    GuestWait, "guest wait" {
        /// The host sleeps for it (the program asks with an `out`): its vCPU thread uses no
        /// CPU while it waits.
        Sleep = 0, "sleep";
        /// It spins until due, as a booted guest without a paravirtual sleep does (QEMU's, in
        /// `compare-qemu`): its vCPU thread keeps its CPU busy.
        Spin = 1, "spin";
    }
);
