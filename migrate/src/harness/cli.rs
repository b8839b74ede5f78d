//! The command line, parsed once into typed [`Invocation`]: every size, duration, rate and
//! enum is checked here, and the guest kind is decided here (KVM wherever `/dev/kvm` and
//! kernel-mode userfaultfd work, else the thread guest, saying why).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pagehint::ClaimBatch;

use crate::guest::layout::{GuestLayout, GuestLayoutError, HostPageSize};
use crate::link::{LinkParams, LowWater};
use crate::options::{
    CursorPolicy, DestFault, DirtyTracking, FaultPath, GuestKind, GuestSpec, GuestWait,
    MigrationMode, Precopy, RunConfig, SourceFault, SourceHooks, TestHooks, Workload,
};
use crate::source::ServeOptions;
use crate::sys::pin::PinPlan;
pub use crate::values::{parse_bits, parse_duration};
use crate::values::{parse_bytes, parse_list};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Pin {
    /// Guest + fault path on one CPU, background streams on another.
    Auto,
    /// Let the kernel place threads.
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Resend {
    /// Send an already-claimed page again on the urgent channel.
    On,
    /// Wait for the background copy (the old behaviour).
    Off,
    /// Run each preempt mode both ways, old then new.
    Both,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum DirtyLog {
    /// `KVM_GET_DIRTY_LOG` hands over and clears the log, write-protecting every page it
    /// reports at each sync.
    Auto,
    /// Manual re-protection: the get only reads the log; each chunk the precopy drain takes
    /// is cleared (`KVM_CLEAR_DIRTY_LOG`) just before its pages are read.
    Manual,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum GuestArg {
    /// KVM where `/dev/kvm` opens (and userfaultfd sees kernel faults), else thread.
    Auto,
    /// A KVM virtual machine.
    Kvm,
    /// A host thread.
    Thread,
}

const AFTER_HELP: &str = "\
Which side a flag applies to:
  without --listen/--connect  both sides, in this process over loopback: every flag
  --connect ADDR              the destination: every flag (its hello tells the source the
                              guest, the link, the modes' settings and the test hooks)
  --listen ADDR               the source only: --pin, --timeout, --quiet, --sessions, --once,
                              --max-recover, --max-sessions, --ram-dir, --qemu-rate-limit;
                              every other flag is refused (each destination's hello decides)

Postcopy recovery: when the connections break after the switch-over (closed, reset, or
both silent for --timeout), the destination keeps its guest blocked, reconnects with
backoff (to --connect, or --reconnect) for up to --recover-timeout, and sends its received
bitmap; the source, which keeps the session paused as long, resends what did not arrive and
postcopy goes on in the same mode, after any number of breaks. The results report the cuts
survived and the time spent recovering (--test-cut-after N --test-cuts K injects them).

Exit status: 0 every run completed and verified (targets are reported, not enforced, unless
--check); 1 a run failed verification, a target missed with --check, or an output file
could not be written; 2 bad input, or a run failed (it is still recorded, and the rest run).";

/// Flags a listening source uses; every other one is decided by each destination's hello.
const LISTEN_FLAGS: &[&str] = &[
    "listen",
    "pin",
    "timeout",
    "quiet",
    "sessions",
    "once",
    "qemu_rate_limit",
    "max_recover",
    "max_sessions",
    "ram_dir",
];

/// Migrate a guest (a KVM virtual machine, or a host thread) with precopy and postcopy using
/// the pagehint scheduler, and compare vanilla, preempt and preempt-hint on real guest
/// workloads (userfaultfd destination, TCP channels through an emulated link).
#[derive(Parser, Debug)]
#[command(
    name = "pagehint-migrate",
    version,
    args_conflicts_with_subcommands = true,
    allow_negative_numbers = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// What runs as the guest.
    #[arg(long, value_enum, default_value = "auto")]
    guest: GuestArg,
    /// vCPUs of the KVM guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM size (64M, 1G, ...), split into two RAM blocks around a 4 GiB hole.
    #[arg(long, allow_hyphen_values = true, default_value = "1G")]
    mem: String,
    /// Host page size: 4K, or 2M for hugetlb-backed guests (reserved and given back).
    #[arg(long, allow_hyphen_values = true, default_value = "4K")]
    host_page: String,
    /// Precopy rounds before postcopy (0: pure postcopy); they stop early when the dirty set
    /// stops shrinking.
    #[arg(long, default_value_t = 0)]
    precopy_rounds: u32,
    /// Track the KVM guest's writes with KVM's dirty rings instead of the dirty log.
    #[arg(long)]
    dirty_ring: bool,
    /// How the dirty log is re-protected (KVM guest, without --dirty-ring).
    #[arg(long, value_enum, default_value = "auto")]
    dirty_log: DirtyLog,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = MigrationMode::DEFAULT_LIST,
        action = clap::ArgAction::Set,
        help = format!(
            "Modes to compare, comma separated (once: a second --modes is refused): {}",
            MigrationMode::NAMES
        )
    )]
    modes: Vec<String>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = Workload::DEFAULT_LIST,
        action = clap::ArgAction::Set,
        help = format!("Guest workloads, comma separated: {}", Workload::NAMES)
    )]
    workloads: Vec<String>,
    /// Write the results as a JSON list to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG plot of fault waits and vCPU blocktime to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Emulated link bandwidth in bits/s (10G, 2.5G, 800M; 0 = unlimited).
    #[arg(long, allow_hyphen_values = true, default_value = "10G")]
    bandwidth: String,
    /// Emulated one-way delay (50us, 1ms, 0).
    #[arg(long, allow_hyphen_values = true, default_value = "50us")]
    delay: String,
    /// Send-queue (socket buffer) depth of the background channel.
    #[arg(long, allow_hyphen_values = true, default_value = "8M")]
    queue: String,
    /// Background bytes an urgent page may wait behind in the interface queue.
    #[arg(long, allow_hyphen_values = true, default_value = "64K")]
    nic_queue: String,
    /// Most unsent bytes on the background channel in preempt modes, like TCP_NOTSENT_LOWAT:
    /// auto (1M, at least two host pages), off (the whole send queue), or a size.
    #[arg(long, allow_hyphen_values = true, default_value = "auto")]
    lowat: String,
    /// With the emulated link off (--bandwidth 0): pace the background channel at this many
    /// bits/s in the kernel (SO_MAX_PACING_RATE; 0 = no pacing), the bandwidth cap of a
    /// real link.
    #[arg(long, allow_hyphen_values = true, default_value = "0")]
    pace: String,
    /// Target pages per background claim (1 to 64, a power of two).
    #[arg(long, default_value_t = 16)]
    claim_batch: u64,
    /// preempt-hints: target pages each vCPU's cursor may claim after its fault (the
    /// library's default run).
    #[arg(long, value_name = "PAGES", default_value_t = pagehint::streams::StreamPolicy::DEFAULT_RUN)]
    stream_run: u64,
    /// preempt-hints: cursor claims between two steps of the linear scan (the library's
    /// default share).
    #[arg(long, value_name = "N", default_value_t = pagehint::streams::StreamPolicy::DEFAULT_SHARE)]
    stream_share: u32,
    /// Playback rate of the stream workload, bytes/s.
    #[arg(long, allow_hyphen_values = true, default_value = "256M")]
    stream_rate: String,
    /// How the destination's KVM guest waits when its stream is ahead of schedule: sleep
    /// (the host sleeps for it) or spin (until due, as a booted guest does: compare-qemu
    /// gives pagehint's guest `spin`, as QEMU's has no other way).
    #[arg(long, default_value = "sleep")]
    guest_wait: String,
    /// Seed of the guest image and workloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Thread guest: use the software fault path even where userfaultfd works.
    #[arg(long)]
    no_uffd: bool,
    /// Thread pinning.
    #[arg(long, value_enum, default_value = "auto")]
    pin: Pin,
    /// Preempt modes: page requests travel on the urgent connection and a request for a page
    /// the background path already claimed is answered by sending it again on the urgent
    /// channel, within 1% of the bytes sent (on); or requests share the main connection with
    /// the background stream and
    /// wait for the background copy (off, the old behaviour); both: each preempt mode runs
    /// twice, old then new.
    #[arg(long, value_enum, default_value = "on")]
    resend: Resend,
    /// Run only the source, listening on ADDR (e.g. 0.0.0.0:4444), for a destination
    /// started elsewhere with --connect.
    #[arg(long, value_name = "ADDR", conflicts_with = "connect")]
    listen: Option<String>,
    /// Run only the destination, migrating from the source at ADDR.
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// Give up when the peer is silent this long (20s, 500ms; at least 200ms).
    #[arg(long, allow_hyphen_values = true, default_value = "20s")]
    timeout: String,
    /// With --listen: serve this many migrations, then exit (default: until killed).
    #[arg(long, value_name = "N", requires = "listen")]
    sessions: Option<u64>,
    /// With --listen: serve one migration, then exit (--sessions 1).
    #[arg(long, requires = "listen", conflicts_with = "sessions")]
    once: bool,
    /// Run the whole matrix N times (the modes of each workload in the opposite order every
    /// other time) and report the medians, each target's ratio of medians with its range
    /// over the repeats; the JSON keeps every run.
    #[arg(long, value_name = "N", default_value_t = 1)]
    repeat: u32,
    /// With --listen: QEMU's transport instead of pagehint's: the background sender keeps
    /// under QEMU's 100 ms-window rate limiter at this many bits/s (see
    /// source/rate_limit.rs); give the destinations --pace 0 --lowat off (compare-qemu does).
    #[arg(long, value_name = "BITS", requires = "listen")]
    qemu_rate_limit: Option<String>,
    /// With --listen: hold a session whose connections broke in postcopy paused at most this
    /// long for its destination to come back, whatever the destination asks for (30s).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    max_recover: Option<String>,
    /// With --listen: serve at most N sessions at once; one more destination is refused,
    /// saying so (4).
    #[arg(long, value_name = "N")]
    max_sessions: Option<usize>,
    /// With --listen: keep each session's guest RAM in a file in DIR (a tmpfs such as
    /// /dev/shm), so that a session whose destination did not come back in time, or whose
    /// source was killed, can be taken over by a later source started on DIR.
    #[arg(long, value_name = "DIR")]
    ram_dir: Option<PathBuf>,
    /// Exit with status 1 when a target misses (targets are otherwise only reported).
    #[arg(long)]
    check: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Postcopy recovery: when the connections break in postcopy, the destination keeps its
    /// guest blocked and reconnects (with backoff) for up to this long, and the source keeps
    /// the session paused as long (within its --max-recover); then the migration resumes where
    /// it was (30s; 0: off, a broken connection ends the run; `paused` or `forever`: no limit,
    /// as QEMU's postcopy-paused: the guest waits with its pages until the source comes back
    /// or an operator resumes it from another source, or gives it up, through --control).
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        default_value = "30s"
    )]
    recover_timeout: String,
    /// A control socket (a Unix socket at PATH) through which an operator resumes a paused
    /// postcopy from another source, or gives it up: `pagehint-migrate recover --dest PATH
    /// --connect ADDR | --abort | --status` (with --recover-timeout paused, a socket in the
    /// temporary folder when not given).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Postcopy recovery: reconnect to ADDR instead of the --connect address (the same
    /// source, reached another way).
    #[arg(long, value_name = "ADDR", requires = "connect")]
    reconnect: Option<String>,
    /// Test hook: the source cuts both connections after N postcopy host pages sent on them,
    /// as a broken network would; recovery resumes the run (see --test-cuts).
    #[arg(long, value_name = "N", default_value_t = 0)]
    test_cut_after: u64,
    /// Test hook: with --test-cut-after, cut the connections K times in each run.
    #[arg(long, value_name = "K", default_value_t = 1)]
    test_cuts: u64,
    /// Test hook: the destination sends N malformed page requests at the start of postcopy.
    #[arg(long, hide = true, default_value_t = 0)]
    inject_bad: u64,
    /// Test hook: the source drops both connections after N host pages.
    #[arg(long, hide = true, default_value_t = 0)]
    test_drop_after: u64,
    /// Test hook: the source corrupts a page or sends one twice (none, corrupt, duplicate).
    #[arg(long, hide = true, default_value = "none")]
    test_source_fault: String,
    /// Test hook: the destination overwrites pages placed twice (none, overwrite-duplicate).
    #[arg(long, hide = true, default_value = "none")]
    test_dest_fault: String,
    /// The flags given on the command line (not defaulted), by id.
    #[arg(skip)]
    given: Vec<String>,
}

impl Cli {
    /// Parses `args` (the first is the program name), remembering which flags were given.
    pub fn try_parse_args_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::CommandFactory;
        Self::from_matches(&Self::command().try_get_matches_from(args)?)
    }

    /// The options in `m`, the matches of `Cli::command()` (or of a command built on it, with
    /// subcommands of other programs added), remembering which flags were given.
    pub fn from_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let mut cli = Self::from_arg_matches(m)?;
        let args: Vec<String> = Self::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        cli.given = args
            .into_iter()
            .filter(|id| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
            .collect();
        Ok(cli)
    }
}

/// `pagehint-migrate recover`: tells a destination's control socket what to do with its
/// paused postcopy.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["connect", "abort", "status"])))]
pub struct RecoverCli {
    /// The destination's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    pub dest: PathBuf,
    /// Resume the paused postcopy from the source at ADDR (a source that holds the session:
    /// the one that paused it, or one started on its --ram-dir).
    #[arg(long, value_name = "ADDR")]
    pub connect: Option<String>,
    /// Give the paused postcopy up (the run ends with the break).
    #[arg(long)]
    pub abort: bool,
    /// Say what the destination is doing.
    #[arg(long)]
    pub status: bool,
}

/// What `pagehint-migrate recover` does.
pub const RECOVER_ABOUT: &str = "Resume a paused postcopy from another source, or give it up, through a destination's control socket (QEMU's migrate-recover / migrate-cancel)";

impl RecoverCli {
    /// Sends the command; the destination's answer, or why not.
    pub fn run(&self) -> Result<String, String> {
        let line = match (&self.connect, self.abort) {
            (Some(a), _) => format!("recover {a}"),
            (None, true) => "abort".to_string(),
            (None, false) => "status".to_string(),
        };
        crate::dest::control::send(&self.dest, &line)
    }
}

/// Where this process stands in the migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Both sides, over loopback.
    Local,
    /// The source only, listening here.
    Listen(String),
    /// The destination only, migrating from this source.
    Connect(SocketAddr),
}

/// The whole invocation, typed: every run's settings ([`RunConfig`]) and what to run, where, and
/// what to write.
#[derive(Clone, Debug)]
pub struct Invocation {
    /// Settings of every run.
    pub cfg: RunConfig,
    /// Modes, in order.
    pub modes: Vec<MigrationMode>,
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// JSON output.
    pub json: Option<PathBuf>,
    /// SVG output.
    pub svg: Option<PathBuf>,
    /// Local, source or destination.
    pub endpoint: Endpoint,
    /// No progress bar.
    pub quiet: bool,
    /// Which guest runs, and why.
    pub guest_note: String,
    /// `--listen`: migrations to serve before exiting (None: until killed).
    pub sessions: Option<u64>,
    /// A missed target fails the invocation (status 1).
    pub check: bool,
    /// `--resend`: the settings each preempt mode runs with, in order.
    pub resend: Vec<bool>,
    /// `--repeat`: how many times the matrix runs (at least 1).
    pub repeat: u32,
    /// `--listen`: the source's own limits.
    pub serve: ServeOptions,
    /// The destination's control socket (`--control`).
    pub control: Option<PathBuf>,
}

/// The shortest `--timeout`.
const MIN_TIMEOUT: Duration = Duration::from_millis(200);

/// An error if `v` names a value twice.
fn unique<T: PartialEq + std::fmt::Display>(what: &str, v: &[T]) -> Result<(), String> {
    for (i, x) in v.iter().enumerate() {
        if v[..i].contains(x) {
            return Err(format!("--{what}: {x} is given twice"));
        }
    }
    Ok(())
}

/// Checks, before any run, that an output file can be written at the end (whole: a
/// temporary file beside it, renamed over it), creating nothing: an existing file is opened
/// for writing, a new one's folder takes a file.
fn writable(flag: &str, p: &std::path::Path) -> Result<(), String> {
    if p.is_dir() {
        return Err(format!("--{flag} {}: is a directory", p.display()));
    }
    let cannot = |e: std::io::Error| format!("--{flag} {}: cannot write it: {e}", p.display());
    if p.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(p)
            .map(drop)
            .map_err(cannot)?;
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let probe = dir.join(format!(".pagehint-migrate-probe-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(cannot)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn size(what: &str, s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| format!("--{what} {s}: {e}"))
}

/// Copies of guest RAM in normal memory: the source's RAM (the image is built straight into
/// it) and the destination's; with 2 MiB host pages both are hugetlb pages instead. Nothing
/// else holds a copy: verification compares the destination with the checksums and the
/// generation table the source sends (under 0.3% of RAM).
fn normal_copies(endpoint: &Endpoint, host_page: HostPageSize) -> u64 {
    match (endpoint, host_page) {
        (Endpoint::Local, HostPageSize::Small) => 2,
        (Endpoint::Listen(_) | Endpoint::Connect(_), HostPageSize::Small) => 1,
        (_, HostPageSize::Huge2M) => 0,
    }
}

/// A listening source takes only its own flags: the others (`given`) would be ignored.
fn refuse_ignored(given: &[String]) -> Result<(), String> {
    let ignored: Vec<String> = given
        .iter()
        .filter(|id| !LISTEN_FLAGS.contains(&id.as_str()))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    if ignored.is_empty() {
        return Ok(());
    }
    Err(format!(
        "--listen serves what each destination's hello asks for: {} would be ignored here; give {} to the --connect side (a listening source takes only --pin, --timeout, --quiet, --sessions, --once, --max-recover, --max-sessions, --ram-dir, --qemu-rate-limit)",
        ignored.join(", "),
        if ignored.len() == 1 { "it" } else { "them" }
    ))
}

/// The guest: its kind (KVM where it works, saying why not), RAM, host page, vCPUs, seed
/// and stream rate; and a note saying which guest runs and why.
fn guest(cli: &Cli) -> Result<(GuestSpec, String), String> {
    let host_page: HostPageSize = cli
        .host_page
        .parse()
        .map_err(|e| format!("--host-page: {e}"))?;
    let mem = size("mem", &cli.mem)?;
    let (kind, note) = match cli.guest {
        GuestArg::Thread => (
            GuestKind::Thread,
            "thread guest (--guest thread)".to_string(),
        ),
        GuestArg::Kvm => match crate::guest::kvm::unavailable() {
            None => (
                GuestKind::Kvm,
                "KVM virtual machine (--guest kvm)".to_string(),
            ),
            Some(why) => return Err(format!("--guest kvm: {why}")),
        },
        GuestArg::Auto => match crate::guest::kvm::unavailable() {
            None => (
                GuestKind::Kvm,
                "KVM virtual machine (/dev/kvm opens)".to_string(),
            ),
            Some(why) => (
                GuestKind::Thread,
                format!("THREAD GUEST, the fallback: {why}"),
            ),
        },
    };
    if kind == GuestKind::Thread && cli.vcpus != 1 {
        return Err(format!(
            "--vcpus {}: the thread guest is one thread (--vcpus needs the KVM guest)",
            cli.vcpus
        ));
    }
    let mut guest = GuestSpec::new(kind, mem, host_page, cli.vcpus).map_err(|e| match e {
        GuestLayoutError::Vcpus(_) => format!("--vcpus {}: {e}", cli.vcpus),
        e => format!("--mem {} with --host-page {}: {e}", cli.mem, cli.host_page),
    })?;
    guest.seed = cli.seed;
    guest.wait = cli.guest_wait.parse::<GuestWait>()?;
    guest.stream_rate = match size("stream-rate", &cli.stream_rate)? {
        0 => {
            return Err(format!(
                "--stream-rate {}: a stream needs a rate above 0 bytes/s",
                cli.stream_rate
            ))
        }
        r => r,
    };
    Ok((guest, note))
}

/// Precopy rounds and how the guest's writes are tracked.
fn precopy(cli: &Cli, kind: GuestKind) -> Result<Precopy, String> {
    let tracking = match (kind, cli.dirty_ring, cli.dirty_log) {
        (GuestKind::Thread, true, _) => return Err("--dirty-ring needs the KVM guest".into()),
        (GuestKind::Thread, false, DirtyLog::Manual) => {
            return Err("--dirty-log manual needs the KVM guest".into())
        }
        (GuestKind::Thread, false, DirtyLog::Auto) => DirtyTracking::None,
        (GuestKind::Kvm, true, DirtyLog::Manual) => {
            return Err("--dirty-log manual applies to the dirty log, not --dirty-ring".into())
        }
        (GuestKind::Kvm, true, DirtyLog::Auto) => DirtyTracking::Ring,
        (GuestKind::Kvm, false, DirtyLog::Auto) => DirtyTracking::Log,
        (GuestKind::Kvm, false, DirtyLog::Manual) => DirtyTracking::LogManual,
    };
    Ok(Precopy {
        rounds: cli.precopy_rounds,
        tracking,
    })
}

/// The link: emulated (bandwidth, delay, queues) or real (pacing), and the low-water mark.
fn link(cli: &Cli, host_page: HostPageSize) -> Result<LinkParams, String> {
    let link = LinkParams {
        bandwidth_bps: parse_bits(&cli.bandwidth).map_err(|e| format!("--bandwidth: {e}"))?,
        delay_ns: parse_duration(&cli.delay)
            .map_err(|e| format!("--delay: {e}"))?
            .as_nanos() as u64,
        queue_bytes: size("queue", &cli.queue)?,
        nic_queue_bytes: size("nic-queue", &cli.nic_queue)?,
        lowat_bytes: cli
            .lowat
            .parse::<LowWater>()
            .map_err(|e| format!("--lowat {e}"))?
            .bytes(host_page),
        pace_bps: parse_bits(&cli.pace).map_err(|e| format!("--pace: {e}"))?,
    };
    if link.pace_bps > 0 && link.emulated() {
        return Err("--pace paces a real link: it needs --bandwidth 0 (emulation off)".into());
    }
    Ok(link)
}

/// Every mode's link drains within `--timeout` (the arithmetic in the error otherwise).
fn drains(cli: &Cli, cfg: &RunConfig, modes: &[MigrationMode]) -> Result<(), String> {
    let frame = crate::link::frame_max(cfg.layout().host_page().bytes());
    for &m in modes {
        let link = cfg.link.for_transport(&cfg.transport(m));
        link.check(cfg.idle_timeout, frame).map_err(|e| {
            format!(
                "--bandwidth {} --queue {} --delay {} --timeout {} ({m}): {e}",
                cli.bandwidth, cli.queue, cli.delay, cli.timeout
            )
        })?;
    }
    Ok(())
}

/// How the thread guest's faults are caught (`--no-uffd`).
fn fault_path(cli: &Cli, kind: GuestKind) -> Result<FaultPath, String> {
    if !cli.no_uffd {
        return Ok(FaultPath::Auto);
    }
    if kind == GuestKind::Kvm {
        return Err(
            "--no-uffd needs the thread guest (KVM's vCPUs fault through userfaultfd)".into(),
        );
    }
    Ok(FaultPath::Software)
}

/// `--timeout`, at least [`MIN_TIMEOUT`].
fn idle_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s).map_err(|e| format!("--timeout {s}: {e}"))? {
        t if t < MIN_TIMEOUT => Err(format!(
            "--timeout {s}: at least {MIN_TIMEOUT:?} (a peer silent this long is given up on)"
        )),
        t => Ok(t),
    }
}

/// Postcopy recovery: how long to keep trying (None: paused without a limit), and where to
/// reconnect.
fn recovery(cli: &Cli) -> Result<(Option<Duration>, Option<SocketAddr>), String> {
    let timeout = match cli.recover_timeout.as_str() {
        "paused" | "forever" => None,
        t => {
            Some(parse_duration(t).map_err(|e| format!("--recover-timeout {t}: {e} (or paused)"))?)
        }
    };
    let reconnect = match &cli.reconnect {
        None => None,
        Some(r) => Some(
            r.to_socket_addrs()
                .map_err(|e| format!("--reconnect {r:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("--reconnect {r:?}: no address"))?,
        ),
    };
    Ok((timeout, reconnect))
}

/// The test hooks; cuts need recovery (`recover_timeout` above 0).
fn hooks(cli: &Cli, recover_timeout: Duration) -> Result<TestHooks, String> {
    if cli.test_cut_after > 0 && recover_timeout.is_zero() {
        return Err(
            "--test-cut-after needs postcopy recovery (a --recover-timeout above 0)".into(),
        );
    }
    if cli.test_cut_after == 0 && cli.test_cuts != 1 {
        return Err("--test-cuts needs --test-cut-after N (the pages after which to cut)".into());
    }
    if cli.test_cut_after > 0 && cli.test_cuts == 0 {
        return Err("--test-cuts: at least 1 (or leave --test-cut-after out)".into());
    }
    Ok(TestHooks {
        source: SourceHooks {
            drop_after: cli.test_drop_after,
            cut_after: cli.test_cut_after,
            cuts: if cli.test_cut_after > 0 {
                cli.test_cuts
            } else {
                0
            },
            fault: cli.test_source_fault.parse::<SourceFault>()?,
        },
        inject_bad: cli.inject_bad,
        dest_fault: cli.test_dest_fault.parse::<DestFault>()?,
    })
}

/// A listening source's own limits (`--max-recover`, `--max-sessions`, `--ram-dir`) and
/// transport (`--qemu-rate-limit`); the flags of a listener only.
fn serve_options(cli: &Cli, cfg: &RunConfig) -> Result<ServeOptions, String> {
    let mut o = ServeOptions::new(cfg.pin, cfg.idle_timeout);
    if cli.listen.is_none() {
        for (flag, given) in [
            ("--max-recover", cli.max_recover.is_some()),
            ("--max-sessions", cli.max_sessions.is_some()),
            ("--ram-dir", cli.ram_dir.is_some()),
            ("--sessions", cli.sessions.is_some()),
            ("--once", cli.once),
        ] {
            if given {
                return Err(format!(
                    "{flag} is a listening source's (--listen); this process is {}",
                    if cli.connect.is_some() {
                        "the destination (--connect)"
                    } else {
                        "both sides, in one process"
                    }
                ));
            }
        }
        return Ok(o);
    }
    if let Some(m) = &cli.max_recover {
        o.max_recover = parse_duration(m).map_err(|e| format!("--max-recover {m}: {e}"))?;
    }
    if let Some(n) = cli.max_sessions {
        if n == 0 {
            return Err("--max-sessions 0: at least 1".into());
        }
        o.max_sessions = n;
    }
    if let Some(d) = &cli.ram_dir {
        if !d.is_dir() {
            return Err(format!("--ram-dir {}: not a directory", d.display()));
        }
        o.ram_dir = Some(d.clone());
    }
    if let Some(b) = &cli.qemu_rate_limit {
        o.qemu_rate_limit_bps =
            match parse_bits(b).map_err(|e| format!("--qemu-rate-limit: {e}"))? {
                0 => return Err("--qemu-rate-limit: a rate above 0 bits/s".into()),
                v => v,
            };
    }
    Ok(o)
}

/// Both sides, the source only, or the destination only.
fn endpoint(cli: &Cli) -> Result<Endpoint, String> {
    Ok(match (&cli.listen, &cli.connect) {
        (Some(l), _) => Endpoint::Listen(l.clone()),
        (None, Some(c)) => Endpoint::Connect(
            c.to_socket_addrs()
                .map_err(|e| format!("--connect {c:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("--connect {c:?} resolves to nothing"))?,
        ),
        (None, None) => Endpoint::Local,
    })
}

/// An error unless this process's copies of guest RAM (`--mem`, typed as `mem`) fit in the
/// memory available.
fn fits(endpoint: &Endpoint, mem: &str, layout: &GuestLayout) -> Result<(), String> {
    let copies = normal_copies(endpoint, layout.host_page());
    crate::sys::warm::check_fits(
        &format!(
            "--mem {mem} ({copies} cop{} of guest RAM)",
            if copies == 1 { "y" } else { "ies" }
        ),
        layout.mem() * copies,
        crate::sys::warm::mem_available(),
    )
}

impl Invocation {
    /// Parses `cli` into options, deciding the guest kind: each phase checks its own flags.
    pub fn from_cli(cli: Cli) -> Result<Self, String> {
        if cli.listen.is_some() {
            refuse_ignored(&cli.given)?;
        }
        let (guest, guest_note) = guest(&cli)?;
        let host_page = guest.layout.host_page();
        let mut cfg = RunConfig::new(guest);
        cfg.precopy = precopy(&cli, cfg.guest.kind)?;
        cfg.link = link(&cli, host_page)?;
        cfg.claim_batch =
            ClaimBatch::pages(cli.claim_batch).map_err(|e| format!("--claim-batch: {e}"))?;
        cfg.cursors = CursorPolicy {
            run: cli.stream_run,
            share: cli.stream_share,
        };
        cfg.cursors
            .policy(cfg.layout().vcpus())
            .map_err(|e| format!("--stream-run / --stream-share: {e}"))?;
        cfg.fault_path = fault_path(&cli, cfg.guest.kind)?;
        cfg.pin = match cli.pin {
            Pin::Auto => PinPlan::auto(),
            Pin::Off => PinPlan::OFF,
        };
        cfg.idle_timeout = idle_timeout(&cli.timeout)?;
        let (window, reconnect) = recovery(&cli)?;
        cfg.reconnect = reconnect;
        match window {
            Some(w) => cfg.recover_timeout = w,
            None => cfg.recover_paused = true,
        }
        cfg.hooks = hooks(&cli, cfg.recover_timeout)?;
        let control = match (&cli.control, cfg.recover_paused) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => Some(
                std::env::temp_dir().join(format!("pagehint-migrate-{}.ctl", std::process::id())),
            ),
            (None, false) => None,
        };
        let endpoint = endpoint(&cli)?;
        // A listening source checks each hello's guest against its memory instead.
        if !matches!(endpoint, Endpoint::Listen(_)) {
            fits(&endpoint, &cli.mem, cfg.layout())?;
        }
        let modes = parse_list("modes", &cli.modes)?;
        let workloads = parse_list("workloads", &cli.workloads)?;
        unique("modes", &modes)?;
        unique("workloads", &workloads)?;
        if !matches!(endpoint, Endpoint::Listen(_)) {
            drains(&cli, &cfg, &modes)?;
        }
        for (flag, path) in [("json", &cli.json), ("svg", &cli.svg)] {
            if let Some(p) = path {
                writable(flag, p)?;
            }
        }
        let resend = match cli.resend {
            Resend::On => vec![true],
            Resend::Off => vec![false],
            Resend::Both => vec![false, true],
        };
        cfg.resend = resend[0];
        if cli.repeat == 0 {
            return Err("--repeat 0: at least 1 (the matrix runs once by default)".into());
        }
        let serve = serve_options(&cli, &cfg)?;
        Ok(Self {
            serve,
            control,
            resend,
            repeat: cli.repeat,
            cfg,
            modes,
            workloads,
            json: cli.json,
            svg: cli.svg,
            endpoint,
            quiet: cli.quiet,
            guest_note,
            sessions: match (cli.once, cli.sessions) {
                (true, _) => Some(1),
                (false, Some(0)) => {
                    return Err(
                        "--sessions 0: at least 1 (or leave it out to serve until killed)".into(),
                    )
                }
                (false, n) => n,
            },
            check: cli.check,
        })
    }

    /// Bytes of normal memory and 2 MiB hugetlb pages this process maps for one run.
    pub fn memory_needed(&self) -> (u64, u64) {
        let l = self.cfg.layout();
        (
            normal_copies(&self.endpoint, l.host_page()) * l.mem(),
            self.huge_pages_needed(),
        )
    }

    /// 2 MiB pages this process needs in hugetlb (0 for 4 KiB host pages).
    pub fn huge_pages_needed(&self) -> u64 {
        let l = self.cfg.layout();
        if l.host_page() != HostPageSize::Huge2M {
            return 0;
        }
        let copies = match self.endpoint {
            Endpoint::Local => 2,
            _ => 1,
        };
        copies * l.host_pages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Result<Invocation, String> {
        let mem: &[&str] = if args.contains(&"--mem") {
            &[]
        } else {
            &["--mem", "16M"]
        };
        let cli = Cli::try_parse_args_from(
            ["pagehint-migrate", "--guest", "thread"]
                .iter()
                .chain(mem)
                .chain(args),
        )
        .map_err(|e| e.to_string())?;
        Invocation::from_cli(cli)
    }

    fn error(args: &[&str]) -> String {
        match options(args) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_listener_refuses_the_flags_it_would_ignore_and_takes_its_own() {
        let e = Invocation::from_cli(
            Cli::try_parse_args_from([
                "pagehint-migrate",
                "--listen",
                "127.0.0.1:0",
                "--mem",
                "64M",
                "--bandwidth",
                "1G",
            ])
            .unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("--mem, --bandwidth would be ignored"), "{e}");
        let o = Invocation::from_cli(
            Cli::try_parse_args_from([
                "pagehint-migrate",
                "--listen",
                "127.0.0.1:0",
                "--pin",
                "off",
                "--timeout",
                "5s",
                "--once",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(o.sessions, Some(1));
        assert_eq!(o.cfg.idle_timeout, Duration::from_secs(5));
        // --sessions and --once belong to the listener.
        assert!(options(&["--sessions", "2"]).is_err());
        assert!(options(&["--once"]).is_err());
        let o = Invocation::from_cli(
            Cli::try_parse_args_from([
                "pagehint-migrate",
                "--listen",
                "127.0.0.1:0",
                "--max-recover",
                "5s",
                "--max-sessions",
                "2",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(o.serve.max_recover, Duration::from_secs(5));
        assert_eq!(o.serve.max_sessions, 2);
        let e = Invocation::from_cli(
            Cli::try_parse_args_from([
                "pagehint-migrate",
                "--listen",
                "127.0.0.1:0",
                "--max-sessions",
                "0",
            ])
            .unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("--max-sessions 0: at least 1"), "{e}");
        // QEMU's transport is a listener's option too, beside its limits.
        let listen = |rate: &str| {
            Invocation::from_cli(
                Cli::try_parse_args_from([
                    "pagehint-migrate",
                    "--listen",
                    "127.0.0.1:0",
                    "--max-sessions",
                    "2",
                    "--qemu-rate-limit",
                    rate,
                ])
                .unwrap(),
            )
        };
        let o = listen("900M").unwrap();
        assert_eq!(o.serve.qemu_rate_limit_bps, 900_000_000);
        assert_eq!(o.serve.max_sessions, 2);
        let e = listen("0").unwrap_err();
        assert!(
            e.contains("--qemu-rate-limit: a rate above 0 bits/s"),
            "{e}"
        );
        assert_eq!(options(&[]).unwrap().serve.qemu_rate_limit_bps, 0);
        assert!(options(&["--qemu-rate-limit", "900M"]).is_err());
    }

    #[test]
    fn bad_values_name_their_option_and_echo_what_was_typed() {
        for (args, says) in [
            (
                &["--stream-rate", "0"][..],
                "--stream-rate 0: a stream needs a rate above 0",
            ),
            (&["--timeout", "0"][..], "--timeout 0: at least 200ms"),
            (
                &["--guest-wait", "nap"][..],
                "unknown guest wait \"nap\" (sleep, spin)",
            ),
            (
                &["--timeout", "100ms"][..],
                "--timeout 100ms: at least 200ms",
            ),
            (
                &["--modes", "preempt,preempt"][..],
                "--modes: preempt is given twice",
            ),
            (
                &["--workloads", "seq,kv,seq"][..],
                "--workloads: seq is given twice",
            ),
            (
                &["--mem", "0"][..],
                "--mem 0 with --host-page 4K: 0 bytes of RAM is too small",
            ),
            (
                &["--mem", "3000K"][..],
                "--mem 3000K with --host-page 4K: 3000 KiB",
            ),
            (&["--mem", "-1"][..], "--mem -1"),
            (&["--delay", "-1ms"][..], "--delay"),
            (&["--vcpus", "-1"][..], "--vcpus"),
            (&["--claim-batch", "-4"][..], "--claim-batch"),
            (&["--host-page", "8K"][..], "--host-page"),
            (
                &["--json", "/nonexistent-dir/r.json"][..],
                "--json /nonexistent-dir/r.json: cannot write it",
            ),
            (&["--svg", "/"][..], "--svg /: is a directory"),
            (&["--recover-timeout", "-1s"][..], "--recover-timeout -1s"),
            (
                &["--test-cuts", "3"][..],
                "--test-cuts needs --test-cut-after",
            ),
            (
                &["--test-cut-after", "100", "--test-cuts", "0"][..],
                "--test-cuts: at least 1",
            ),
            (
                &["--test-cut-after", "100", "--recover-timeout", "0"][..],
                "--test-cut-after needs postcopy recovery",
            ),
            (
                &["--vcpus", "2"][..],
                "--vcpus 2: the thread guest is one thread",
            ),
            (&["--mem", "1X"][..], "--mem 1X: unknown size suffix in `1X`"),
            (&["--queue", "lots"][..], "--queue lots: unknown size suffix in `lots`"),
            (&["--lowat", "1X"][..], "--lowat 1X: unknown size suffix"),
            (
                &["--bandwidth", "1K", "--timeout", "2s", "--modes", "vanilla"][..],
                "--bandwidth 1K --queue 8M --delay 50us --timeout 2s (vanilla): the link is too slow for the timeout: its 8192 KiB queue and a 1028 KiB frame take 21.0 h to drain at 1000 bits/s",
            ),
            (
                &["--bandwidth", "100K", "--timeout", "2s", "--modes", "preempt"][..],
                "longer than the 2s timeout",
            ),
            (&["--delay", "30s"][..], "longer than the 20s timeout"),
            (
                &["--connect", "127.0.0.1:1", "--once"][..],
                "--once is a listening source's (--listen); this process is the destination (--connect)",
            ),
            (
                &["--connect", "127.0.0.1:1", "--sessions", "3"][..],
                "--sessions is a listening source's",
            ),
            (&["--max-recover", "5s"][..], "--max-recover is a listening source's (--listen); this process is both sides"),
            (&["--ram-dir", "/tmp"][..], "--ram-dir is a listening source's"),
        ] {
            let e = error(args);
            assert!(e.contains(says), "{args:?}: {e}");
        }
        let e = error(&["--workloads", "seq", "--workloads", "kv"]);
        assert!(
            e.contains("'--workloads <WORKLOADS>' cannot be used multiple times"),
            "{e}"
        );
        let o = options(&["--modes", "preempt", "--timeout", "200ms", "--check"]).unwrap();
        assert!(o.check);
        assert_eq!(o.modes, vec![MigrationMode::Preempt]);
    }

    #[test]
    fn recovery_flags_reach_the_run_and_a_listener_refuses_them() {
        let o = options(&[]).unwrap();
        assert_eq!(o.cfg.recover_timeout, Duration::from_secs(30));
        assert_eq!(
            (o.cfg.hooks.source.cut_after, o.cfg.hooks.source.cuts),
            (0, 0)
        );
        let o = options(&[
            "--recover-timeout",
            "5s",
            "--test-cut-after",
            "100",
            "--test-cuts",
            "3",
        ])
        .unwrap();
        assert_eq!(o.cfg.recover_timeout, Duration::from_secs(5));
        assert_eq!(
            (o.cfg.hooks.source.cut_after, o.cfg.hooks.source.cuts),
            (100, 3)
        );
        assert_eq!(
            options(&["--recover-timeout", "0"])
                .unwrap()
                .cfg
                .recover_timeout,
            Duration::ZERO
        );
        let o = Invocation::from_cli(
            Cli::try_parse_args_from([
                "pagehint-migrate",
                "--connect",
                "127.0.0.1:4444",
                "--reconnect",
                "127.0.0.1:5555",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(o.cfg.reconnect, Some("127.0.0.1:5555".parse().unwrap()));
        let e = Invocation::from_cli(
            Cli::try_parse_args_from([
                "pagehint-migrate",
                "--listen",
                "127.0.0.1:0",
                "--recover-timeout",
                "5s",
            ])
            .unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("--recover-timeout would be ignored"), "{e}");
    }
}
