//! What one migration run is, as typed values parsed once: the mode, the guest (kind,
//! workload, vCPUs, layout), precopy and dirty tracking, the link and the test hooks.
//!
//! Every enum here has one name on the command line, one code on the wire (`code` /
//! `from_code`, checked), and nothing else converts them.

use std::time::Duration;

use pagehint::streams::{StreamPolicy, StreamPolicyError};
use pagehint::{ClaimBatch, HintPolicy, SchedulerConfig};

use crate::guest::layout::{GuestLayout, GuestLayoutError, HostPageSize};
pub use crate::guest::{GuestWait, Workload};
use crate::link::{LinkParams, LowWater};
pub use crate::link::{RequestRoute, Transport};
use crate::names::named_enum;
use crate::sys::pin::PinPlan;

named_enum!(
    /// How the source serves page requests.
    MigrationMode, "mode" {
        /// One channel; requests are queued and move the background scan (QEMU's postcopy).
        Vanilla = 0, "vanilla";
        /// A separate urgent channel, no hint (QEMU's postcopy-preempt before the seed).
        Preempt = 1, "preempt";
        /// Urgent channel plus the spatial-locality hint (the seed, QEMU 10.1): one slot.
        PreemptHint = 2, "preempt-hint";
        /// Urgent channel plus one hint slot per vCPU: requests name the faulting vCPU, and
        /// the background scan follows each vCPU's faults with its own cursor.
        PreemptHints = 3, "preempt-hints";
    }
);

impl MigrationMode {
    /// The default list: the seed's comparison (`preempt-hints`, a slot per vCPU, is asked
    /// for by name: with one vCPU it is one slot).
    pub const DEFAULT_LIST: &'static str = "vanilla,preempt,preempt-hint";

    /// The scheduler configuration with `batch` for a guest of `vcpus` vCPUs (1 to
    /// [`MAX_VCPUS`](crate::guest::layout::MAX_VCPUS), which `pagehint`'s
    /// [`MAX_STREAMS`](pagehint::streams::MAX_STREAMS) covers), whose cursors (a slot per
    /// vCPU) run as `cursors` says.
    pub fn scheduler(
        self,
        batch: ClaimBatch,
        vcpus: u32,
        cursors: CursorPolicy,
    ) -> Result<SchedulerConfig, String> {
        Ok(match self {
            Self::Vanilla => SchedulerConfig::vanilla(),
            Self::Preempt => SchedulerConfig::preempt(),
            Self::PreemptHint => SchedulerConfig::preempt_hint(),
            Self::PreemptHints => SchedulerConfig {
                hint: HintPolicy::PerStream(
                    cursors
                        .policy(vcpus)
                        .map_err(|e| format!("{self} with {vcpus} vCPUs: {e}"))?,
                ),
                ..SchedulerConfig::preempt()
            },
        }
        .with_batch(batch))
    }

    /// How this mode's pages and requests travel, with `--resend` as asked (it only
    /// applies where an urgent channel exists). Every place that opens, configures or reads
    /// a channel asks this, never the mode itself: a new mode is one more arm here.
    pub fn transport(self, resend: bool) -> Transport {
        let urgent = Transport {
            urgent_channel: true,
            requests: if resend {
                RequestRoute::Urgent
            } else {
                RequestRoute::Main
            },
            resend,
            low_water: true,
            streams: false,
        };
        match self {
            // QEMU's postcopy: one channel, requests queued for the background scan, the
            // whole send queue (the baseline).
            Self::Vanilla => Transport {
                urgent_channel: false,
                requests: RequestRoute::Main,
                resend: false,
                low_water: false,
                streams: false,
            },
            Self::Preempt | Self::PreemptHint => urgent,
            Self::PreemptHints => Transport {
                streams: true,
                ..urgent
            },
        }
    }
}

/// How `preempt-hints`' cursors run: the library's [`StreamPolicy`] but for its stream count,
/// which is the guest's vCPU count (`--stream-run`, `--stream-share`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CursorPolicy {
    /// Target pages a cursor may claim after each fault ([`StreamPolicy::run`]).
    pub run: u64,
    /// Cursor claims between two linear scan steps ([`StreamPolicy::share`]).
    pub share: u32,
}

impl CursorPolicy {
    /// The library's defaults.
    pub const DEFAULT: Self = Self {
        run: StreamPolicy::DEFAULT_RUN,
        share: StreamPolicy::DEFAULT_SHARE,
    };

    /// The policy for `streams` streams (a typed error for a run or a share of 0, or a count
    /// out of range).
    pub fn policy(self, streams: u32) -> Result<StreamPolicy, StreamPolicyError> {
        StreamPolicy::new(streams)?
            .with_run(self.run)?
            .with_share(self.share)
    }
}

named_enum!(
    /// What runs as the guest.
    GuestKind, "guest" {
        /// A KVM virtual machine: vCPUs running generated x86-64 programs.
        Kvm = 1, "kvm";
        /// A host thread that reads guest memory (no precopy writes, no dirty tracking).
        Thread = 2, "thread";
    }
);

named_enum!(
    /// How the source learns which pages the guest wrote during precopy.
    DirtyTracking, "dirty tracking" {
        /// Nothing runs at the source (thread guest), so nothing is tracked.
        None = 0, "none";
        /// `KVM_GET_DIRTY_LOG` per memory slot, once per precopy round.
        Log = 1, "log";
        /// KVM's per-vCPU dirty rings, harvested continuously.
        Ring = 2, "ring";
        /// `KVM_GET_DIRTY_LOG` with manual re-protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`,
        /// initially set): the get only reads the log, and each chunk the precopy drain takes
        /// is cleared with `KVM_CLEAR_DIRTY_LOG` just before its pages are read (QEMU's way).
        LogManual = 3, "log-manual";
    }
);

named_enum!(
    /// A fault injected on purpose (test hook): each must make the run fail verification.
    SourceFault, "source fault" {
        /// None.
        None = 0, "none";
        /// One byte of the first data-area page sent in postcopy is flipped.
        CorruptPage = 1, "corrupt";
        /// The first host page of the seq window is sent again when three quarters of the
        /// background's pages are out.
        DuplicatePage = 2, "duplicate";
    }
);

named_enum!(
    /// A destination fault injected on purpose (test hook).
    DestFault, "destination fault" {
        /// None.
        None = 0, "none";
        /// A page placed twice overwrites the first copy (`memcpy` after `EEXIST`), as a
        /// destination without atomic placement would: the guest must notice what it undid.
        OverwriteDuplicate = 1, "overwrite-duplicate";
    }
);

/// The test hooks the source runs, as the destination's hello asks for them: each makes a
/// run fail, or recover, on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceHooks {
    /// The source drops both connections after this many host pages, as a crashed source
    /// would (0: never).
    pub drop_after: u64,
    /// The source cuts both connections after this many postcopy host pages sent on them
    /// (0: never), [`cuts`](Self::cuts) times; recovery resumes the run.
    pub cut_after: u64,
    /// How many times the source cuts the connections.
    pub cuts: u64,
    /// A fault the source injects.
    pub fault: SourceFault,
}

impl SourceHooks {
    /// No hook.
    pub const NONE: Self = Self {
        drop_after: 0,
        cut_after: 0,
        cuts: 0,
        fault: SourceFault::None,
    };
}

/// Every test hook of a run: the source's (sent in the hello) and the destination's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestHooks {
    /// The source's.
    pub source: SourceHooks,
    /// Malformed page requests the destination sends at the start of postcopy.
    pub inject_bad: u64,
    /// A fault the destination injects.
    pub dest_fault: DestFault,
}

impl TestHooks {
    /// No hook.
    pub const NONE: Self = Self {
        source: SourceHooks::NONE,
        inject_bad: 0,
        dest_fault: DestFault::None,
    };
}

/// How the destination catches the guest's accesses to missing pages (thread guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPath {
    /// userfaultfd if it can be opened, else the software path.
    Auto,
    /// The software path: the guest checks the received bitmap before each access.
    Software,
}

/// The guest of a run: kind, size, host pages, vCPUs, the workload's pace and its seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    /// KVM VM or host thread.
    pub kind: GuestKind,
    /// RAM, blocks and windows.
    pub layout: GuestLayout,
    /// Stream playback rate, bytes per second.
    pub stream_rate: u64,
    /// Image and workload seed.
    pub seed: u64,
    /// How the KVM guest waits out its stream's schedule (the destination's choice).
    pub wait: GuestWait,
}

impl GuestSpec {
    /// A guest of `mem` bytes (the thread guest is one thread: `vcpus` must be 1).
    pub fn new(
        kind: GuestKind,
        mem: u64,
        host_page: HostPageSize,
        vcpus: u32,
    ) -> Result<Self, GuestLayoutError> {
        if kind == GuestKind::Thread && vcpus != 1 {
            return Err(GuestLayoutError::Vcpus(vcpus));
        }
        Ok(Self {
            kind,
            layout: GuestLayout::new(mem, host_page, vcpus)?,
            stream_rate: 256 << 20,
            seed: 1,
            wait: GuestWait::Sleep,
        })
    }
}

/// Precopy before postcopy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precopy {
    /// At most this many rounds (0: pure postcopy). Rounds stop early when the dirty set
    /// stops shrinking.
    pub rounds: u32,
    /// How dirty pages are found.
    pub tracking: DirtyTracking,
}

/// Settings shared by every run of one invocation.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The guest.
    pub guest: GuestSpec,
    /// Precopy rounds and dirty tracking.
    pub precopy: Precopy,
    /// The emulated link.
    pub link: LinkParams,
    /// Background claim batch.
    pub claim_batch: ClaimBatch,
    /// How `preempt-hints`' cursors run.
    pub cursors: CursorPolicy,
    /// Fault path (thread guest; the KVM guest always uses userfaultfd).
    pub fault_path: FaultPath,
    /// Thread placement.
    pub pin: PinPlan,
    /// Longest silence of the peer before a run fails.
    pub idle_timeout: Duration,
    /// Postcopy recovery: how long the destination keeps reconnecting after its connections
    /// broke in postcopy, and the source keeps the session paused (zero: recovery off, a
    /// broken connection ends the run).
    pub recover_timeout: Duration,
    /// Postcopy recovery without a time limit, as QEMU's `postcopy-paused`: the destination
    /// keeps its guest paused with its pages and keeps trying (the source, or where an
    /// operator points it through the control socket) until it resumes or the operator
    /// gives up; `recover_timeout` is then not a limit.
    pub recover_paused: bool,
    /// Postcopy recovery: where to reconnect (None: the address first connected to).
    pub reconnect: Option<std::net::SocketAddr>,
    /// Faults injected on purpose.
    pub hooks: TestHooks,
    /// Preempt modes: requests travel on the urgent connection, and a request for a host
    /// page the background path already claimed is answered by sending it again on the
    /// urgent channel (false: requests travel on the main connection and wait for the
    /// background copy, the old behaviour).
    pub resend: bool,
}

impl RunConfig {
    /// The default settings for `guest`.
    pub fn new(guest: GuestSpec) -> Self {
        let tracking = match guest.kind {
            GuestKind::Kvm => DirtyTracking::Log,
            GuestKind::Thread => DirtyTracking::None,
        };
        let link = LinkParams {
            lowat_bytes: LowWater::Auto.bytes(guest.layout.host_page()),
            ..LinkParams::DEFAULT
        };
        Self {
            guest,
            precopy: Precopy {
                rounds: 0,
                tracking,
            },
            link,
            claim_batch: ClaimBatch::DEFAULT,
            cursors: CursorPolicy::DEFAULT,
            fault_path: FaultPath::Auto,
            pin: PinPlan::auto(),
            idle_timeout: Duration::from_secs(20),
            recover_timeout: Duration::from_secs(30),
            recover_paused: false,
            reconnect: None,
            hooks: TestHooks::NONE,
            resend: true,
        }
    }

    /// The guest layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.guest.layout
    }

    /// The postcopy recovery window as the hello carries it: whole ms, at least 1 when
    /// recovery is on (0: off; `u64::MAX` when paused without a limit: the source holds the
    /// session as long as its own `--max-recover` lets it).
    pub fn recover_ms(&self) -> u64 {
        if self.recover_paused {
            return u64::MAX;
        }
        match self.recover_timeout.as_millis() {
            0 if !self.recover_timeout.is_zero() => 1,
            ms => ms.try_into().unwrap_or(u64::MAX),
        }
    }

    /// How `mode`'s pages and requests travel in these runs (with [`resend`](Self::resend)).
    pub fn transport(&self, mode: MigrationMode) -> Transport {
        mode.transport(self.resend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip_and_unknown_ones_are_errors() {
        for &m in MigrationMode::ALL {
            assert_eq!(m.name().parse::<MigrationMode>(), Ok(m));
            assert_eq!(MigrationMode::from_code(m.code()), Some(m));
        }
        for &w in Workload::ALL {
            assert_eq!(Workload::from_code(w.code()), Some(w));
        }
        assert!(MigrationMode::from_code(9).is_none());
        let e = "fast".parse::<MigrationMode>().unwrap_err();
        assert!(
            e.contains("vanilla, preempt, preempt-hint, preempt-hints"),
            "{e}"
        );
        let (b, c) = (ClaimBatch::DEFAULT, CursorPolicy::DEFAULT);
        assert_eq!(
            MigrationMode::PreemptHint
                .scheduler(b, 4, c)
                .unwrap()
                .streams(),
            1
        );
        let hints = MigrationMode::PreemptHints.scheduler(b, 4, c).unwrap();
        assert_eq!(hints, SchedulerConfig::preempt_hints(4).unwrap());
        assert!(MigrationMode::PreemptHints.scheduler(b, 0, c).is_err());
        let short = CursorPolicy { run: 64, share: 4 };
        match MigrationMode::PreemptHints
            .scheduler(b, 2, short)
            .unwrap()
            .hint
        {
            HintPolicy::PerStream(p) => assert_eq!((p.streams(), p.run(), p.share()), (2, 64, 4)),
            h => panic!("{h:?}"),
        }
        let none = CursorPolicy { run: 0, ..short };
        assert!(MigrationMode::PreemptHints.scheduler(b, 2, none).is_err());
        assert_eq!("ring".parse::<DirtyTracking>(), Ok(DirtyTracking::Ring));
        assert_eq!(DirtyTracking::from_code(3), Some(DirtyTracking::LogManual));
    }

    #[test]
    fn each_mode_says_how_its_pages_and_requests_travel() {
        let v = MigrationMode::Vanilla.transport(true);
        assert!(!v.urgent_channel && !v.resend && !v.low_water);
        assert_eq!(v.requests, RequestRoute::Main);
        assert!(!v.streams);
        for m in [
            MigrationMode::Preempt,
            MigrationMode::PreemptHint,
            MigrationMode::PreemptHints,
        ] {
            let t = m.transport(true);
            assert!(t.urgent_channel && t.resend && t.low_water);
            // Only the per-vCPU mode names the faulting vCPU in its requests.
            assert_eq!(t.streams, m == MigrationMode::PreemptHints);
            assert_eq!(t.requests, RequestRoute::Urgent);
            let old = m.transport(false);
            assert!(old.urgent_channel && !old.resend);
            assert_eq!(old.requests, RequestRoute::Main);
        }
    }
}
