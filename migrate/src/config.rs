//! What one migration run is: the mode, the guest workload and the shared settings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use pagehint::{ClaimBatch, SchedulerConfig};

use crate::link::LinkParams;
use crate::pin::PinPlan;

/// How the source serves page requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationMode {
    /// One channel; requests are queued and move the background scan (QEMU's postcopy).
    Vanilla,
    /// A separate urgent channel, no hint (QEMU's postcopy-preempt before the seed).
    Preempt,
    /// Urgent channel plus the spatial-locality hint (the seed, QEMU 10.1).
    PreemptHint,
}

impl MigrationMode {
    /// All modes, in table order.
    pub const ALL: [Self; 3] = [Self::Vanilla, Self::Preempt, Self::PreemptHint];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vanilla => "vanilla",
            Self::Preempt => "preempt",
            Self::PreemptHint => "preempt-hint",
        }
    }

    /// The scheduler configuration with `batch`.
    pub fn scheduler(self, batch: ClaimBatch) -> SchedulerConfig {
        match self {
            Self::Vanilla => SchedulerConfig::vanilla(),
            Self::Preempt => SchedulerConfig::preempt(),
            Self::PreemptHint => SchedulerConfig::preempt_hint(),
        }
        .with_batch(batch)
    }

    /// Whether urgent pages travel on their own channel.
    pub fn preempt(self) -> bool {
        self != Self::Vanilla
    }

    /// Wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// From a wire code.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(usize::from(c)).copied()
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown mode {s:?} (vanilla, preempt, preempt-hint)"))
    }
}

/// What the guest does while it is migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Reads every page of a window in order, checksumming each.
    Seq,
    /// Reads random pages of all RAM until the migration completes.
    Random,
    /// Reads a window in order at a fixed rate, like video playback; reports pauses.
    Stream,
    /// Looks keys up in a hash table built in guest RAM before the migration.
    Kv,
}

impl Workload {
    /// All workloads, in table order.
    pub const ALL: [Self; 4] = [Self::Seq, Self::Random, Self::Stream, Self::Kv];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Seq => "seq",
            Self::Random => "random",
            Self::Stream => "stream",
            Self::Kv => "kv",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown workload {s:?} (seq, random, stream, kv)"))
    }
}

/// How the destination catches the guest's accesses to missing pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPath {
    /// userfaultfd if it can be opened, else the software path.
    Auto,
    /// The software path: the guest checks the received bitmap before each access.
    Software,
}

/// Settings shared by every run of one invocation.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Guest RAM bytes.
    pub mem: u64,
    /// Host page bytes (4 KiB or 2 MiB, ...).
    pub host_page: u64,
    /// Image and workload seed.
    pub seed: u64,
    /// The emulated link.
    pub link: LinkParams,
    /// Background claim batch, in target pages.
    pub claim_batch: u64,
    /// Stream workload rate, bytes per second.
    pub stream_rate: u64,
    /// Fault path.
    pub fault_path: FaultPath,
    /// Thread placement.
    pub pin: PinPlan,
    /// Longest silence of the peer before a run fails.
    pub idle_timeout: Duration,
    /// Test hook: malformed page requests the destination sends at the start.
    pub inject_bad: u64,
    /// Test hook: the source drops the connections after this many host pages (0: never).
    pub drop_after: u64,
    /// Test hook: a fault the source injects, to show that verification catches it.
    pub source_fault: SourceFault,
}

/// A fault the source injects on purpose (test hook): each must make the run fail
/// verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SourceFault {
    /// None.
    #[default]
    None,
    /// One byte of the first data page sent is flipped.
    CorruptPage,
    /// The first host page is sent a second time at the end (it must be refused: `EEXIST`).
    DuplicatePage,
}

impl SourceFault {
    /// Wire code.
    pub fn code(self) -> u64 {
        self as u64
    }
    /// From a wire code (unknown codes mean none).
    pub fn from_code(c: u64) -> Self {
        match c {
            1 => Self::CorruptPage,
            2 => Self::DuplicatePage,
            _ => Self::None,
        }
    }
}

impl FromStr for SourceFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "corrupt" => Ok(Self::CorruptPage),
            "duplicate" => Ok(Self::DuplicatePage),
            _ => Err(format!(
                "unknown source fault {s:?} (none, corrupt, duplicate)"
            )),
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            mem: 1 << 30,
            host_page: 4096,
            seed: 1,
            link: LinkParams::DEFAULT,
            claim_batch: ClaimBatch::DEFAULT.get(),
            stream_rate: 256 << 20,
            fault_path: FaultPath::Auto,
            pin: PinPlan::auto(),
            idle_timeout: Duration::from_secs(20),
            inject_bad: 0,
            drop_after: 0,
            source_fault: SourceFault::None,
        }
    }
}
