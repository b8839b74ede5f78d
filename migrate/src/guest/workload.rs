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
    /// What it does, in a few words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Seq => "reads its window in order, writing every eighth page",
            Self::Random => "reads random pages of the data area, writing a quarter",
            Self::Stream => "plays its window in 64 KiB frames at a fixed rate",
            Self::Kv => "looks keys up in a hash table, updating an eighth",
        }
    }

    /// The pages it works in: its window, or (random) the whole data area.
    pub fn window(self, layout: &GuestLayout) -> Range<u64> {
        match self {
            Self::Seq => layout.seq.clone(),
            Self::Random => layout.data.clone(),
            Self::Stream => layout.stream.clone(),
            Self::Kv => layout.kv.clone(),
        }
    }

    /// What its longest pause is: the stream's playback pause (the guest reports it),
    /// the longest fault for the others.
    pub fn pause(self) -> Pause {
        match self {
            Self::Stream => Pause::Playback,
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
        assert_eq!(Workload::NAMES, "seq, random, stream, kv");
        assert_eq!(Workload::LIST, "seq,random,stream,kv");
        assert_eq!(Workload::Stream.pause(), Pause::Playback);
    }
}
