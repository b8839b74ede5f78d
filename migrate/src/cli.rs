//! The command line, parsed once into typed [`Options`]: every size, duration, rate and
//! enum is checked here, and the guest kind is decided here (KVM wherever `/dev/kvm` and
//! kernel-mode userfaultfd work, else the thread guest, saying why).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pagehint::layout::parse_size;
use pagehint::ClaimBatch;

use crate::guest::layout::HostPageSize;
use crate::link::LinkParams;
use crate::options::{
    DestFault, DirtyTracking, FaultPath, GuestKind, GuestSpec, MigrationMode, Precopy, RunConfig,
    SourceFault, Workload,
};
use crate::pin::PinPlan;
use crate::values::parse_list;
pub use crate::values::{parse_bits, parse_duration};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Pin {
    /// Guest + fault path on one CPU, background streams on another.
    Auto,
    /// Let the kernel place threads.
    Off,
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

/// Migrate a guest (a KVM virtual machine, or a host thread) with precopy and postcopy using
/// the pagehint scheduler, and compare vanilla, preempt and preempt-hint on real guest
/// workloads (userfaultfd destination, TCP channels through an emulated link).
#[derive(Parser, Debug)]
#[command(
    name = "pagehint-migrate",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// What runs as the guest.
    #[arg(long, value_enum, default_value = "auto")]
    guest: GuestArg,
    /// vCPUs of the KVM guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM size (64M, 1G, ...), split into two RAM blocks around a 4 GiB hole.
    #[arg(long, default_value = "1G")]
    mem: String,
    /// Host page size: 4K, or 2M for hugetlb-backed guests (reserved and given back).
    #[arg(long, default_value = "4K")]
    host_page: String,
    /// Precopy rounds before postcopy (0: pure postcopy); they stop early when the dirty set
    /// stops shrinking.
    #[arg(long, default_value_t = 0)]
    precopy_rounds: u32,
    /// Track the KVM guest's writes with KVM's dirty rings instead of the dirty log.
    #[arg(long)]
    dirty_ring: bool,
    /// Modes to compare, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vanilla,preempt,preempt-hint"
    )]
    modes: Vec<String>,
    /// Guest workloads, comma separated: seq, random, stream, kv.
    #[arg(long, value_delimiter = ',', default_value = "seq,random,stream,kv")]
    workloads: Vec<String>,
    /// Write the results as a JSON list to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG plot of fault waits and vCPU blocktime to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Emulated link bandwidth in bits/s (10G, 2.5G, 800M; 0 = unlimited).
    #[arg(long, default_value = "10G")]
    bandwidth: String,
    /// Emulated one-way delay (50us, 1ms, 0).
    #[arg(long, default_value = "50us")]
    delay: String,
    /// Send-queue (socket buffer) depth of the background channel.
    #[arg(long, default_value = "8M")]
    queue: String,
    /// Background bytes an urgent page may wait behind in the interface queue.
    #[arg(long, default_value = "64K")]
    nic_queue: String,
    /// Most unsent bytes on the background channel in preempt modes, like TCP_NOTSENT_LOWAT:
    /// auto (1M, at least two host pages), off (the whole send queue), or a size.
    #[arg(long, default_value = "auto")]
    lowat: String,
    /// With the emulated link off (--bandwidth 0): pace the background channel at this many
    /// bits/s in the kernel (SO_MAX_PACING_RATE; 0 = no pacing), the bandwidth cap of a
    /// real link.
    #[arg(long, default_value = "0")]
    pace: String,
    /// Target pages per background claim (1 to 64, a power of two).
    #[arg(long, default_value_t = 16)]
    claim_batch: u64,
    /// Playback rate of the stream workload, bytes/s.
    #[arg(long, default_value = "256M")]
    stream_rate: String,
    /// Seed of the guest image and workloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Thread guest: use the software fault path even where userfaultfd works.
    #[arg(long)]
    no_uffd: bool,
    /// Thread pinning.
    #[arg(long, value_enum, default_value = "auto")]
    pin: Pin,
    /// Run only the source, listening on ADDR (e.g. 0.0.0.0:4444), for a destination
    /// started elsewhere with --connect.
    #[arg(long, value_name = "ADDR", conflicts_with = "connect")]
    listen: Option<String>,
    /// Run only the destination, migrating from the source at ADDR.
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// Give up when the peer is silent this long (20s, 500ms).
    #[arg(long, default_value = "20s")]
    timeout: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
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
}

/// What else `pagehint-migrate` does.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Migrate the same guest with QEMU 10.0 and with pagehint over the same shaped link
    /// (two network namespaces, a veth pair, tc tbf), side by side. Needs root, KVM and
    /// qemu-system-x86_64 (scripts/install-qemu.sh).
    CompareQemu(crate::qemu::cli::CompareQemuCli),
}

impl Cli {
    /// The subcommand, if one was given (taken out; the rest is the harness's options).
    pub fn take_command(&mut self) -> Option<Command> {
        self.command.take()
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

/// The whole invocation, typed.
#[derive(Clone, Debug)]
pub struct Options {
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
}

fn size(what: &str, s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("--{what} {s}: {e}"))
}

/// Copies of guest RAM in normal memory: the image template and the source's RAM (source),
/// the destination's RAM; with 2 MiB host pages both RAMs are hugetlb pages instead.
fn normal_copies(endpoint: &Endpoint, host_page: HostPageSize) -> u64 {
    match (endpoint, host_page) {
        (Endpoint::Local, HostPageSize::Small) => 3,
        (Endpoint::Local, HostPageSize::Huge2M) => 1,
        (Endpoint::Listen(_), HostPageSize::Small) => 2,
        (Endpoint::Listen(_), HostPageSize::Huge2M) => 1,
        (Endpoint::Connect(_), HostPageSize::Small) => 1,
        (Endpoint::Connect(_), HostPageSize::Huge2M) => 0,
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Options {
    /// Parses `cli` into options, deciding the guest kind.
    pub fn from_cli(cli: Cli) -> Result<Self, String> {
        let host_page: HostPageSize = cli
            .host_page
            .parse()
            .map_err(|e| format!("--host-page: {e}"))?;
        let mem = size("mem", &cli.mem)?;
        let (kind, guest_note) = match cli.guest {
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
        let mut guest = GuestSpec::new(kind, mem, host_page, cli.vcpus)
            .map_err(|e| format!("--mem / --vcpus: {e}"))?;
        guest.seed = cli.seed;
        guest.stream_rate = size("stream-rate", &cli.stream_rate)?.max(1);
        let tracking = match (kind, cli.dirty_ring) {
            (GuestKind::Thread, true) => return Err("--dirty-ring needs the KVM guest".into()),
            (GuestKind::Thread, false) => DirtyTracking::None,
            (GuestKind::Kvm, true) => DirtyTracking::Ring,
            (GuestKind::Kvm, false) => DirtyTracking::Log,
        };
        if kind == GuestKind::Thread && cli.vcpus != 1 {
            return Err("--vcpus needs the KVM guest (the thread guest is one thread)".into());
        }
        let mut cfg = RunConfig::new(guest);
        cfg.precopy = Precopy {
            rounds: cli.precopy_rounds,
            tracking,
        };
        cfg.link = LinkParams {
            bandwidth_bps: parse_bits(&cli.bandwidth).map_err(|e| format!("--bandwidth: {e}"))?,
            delay_ns: parse_duration(&cli.delay)
                .map_err(|e| format!("--delay: {e}"))?
                .as_nanos() as u64,
            queue_bytes: size("queue", &cli.queue)?,
            nic_queue_bytes: size("nic-queue", &cli.nic_queue)?,
            lowat_bytes: match cli.lowat.as_str() {
                "auto" => LinkParams::auto_lowat(host_page.bytes()),
                "off" | "0" => 0,
                s => size("lowat", s)?.max(host_page.bytes()),
            },
            pace_bps: parse_bits(&cli.pace).map_err(|e| format!("--pace: {e}"))?,
        };
        if cfg.link.pace_bps > 0 && cfg.link.emulated() {
            return Err("--pace paces a real link: it needs --bandwidth 0 (emulation off)".into());
        }
        cfg.claim_batch =
            ClaimBatch::pages(cli.claim_batch).map_err(|e| format!("--claim-batch: {e}"))?;
        cfg.fault_path = if cli.no_uffd {
            if kind == GuestKind::Kvm {
                return Err(
                    "--no-uffd needs the thread guest (KVM's vCPUs fault through userfaultfd)"
                        .into(),
                );
            }
            FaultPath::Software
        } else {
            FaultPath::Auto
        };
        cfg.pin = match cli.pin {
            Pin::Auto => PinPlan::auto(),
            Pin::Off => PinPlan::OFF,
        };
        cfg.idle_timeout = parse_duration(&cli.timeout)
            .map_err(|e| format!("--timeout: {e}"))?
            .max(Duration::from_millis(200));
        cfg.inject_bad = cli.inject_bad;
        cfg.drop_after = cli.test_drop_after;
        cfg.source_fault = cli.test_source_fault.parse::<SourceFault>()?;
        cfg.dest_fault = cli.test_dest_fault.parse::<DestFault>()?;
        let endpoint = match (&cli.listen, &cli.connect) {
            (Some(l), _) => Endpoint::Listen(l.clone()),
            (None, Some(c)) => Endpoint::Connect(
                c.to_socket_addrs()
                    .map_err(|e| format!("--connect {c:?}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("--connect {c:?} resolves to nothing"))?,
            ),
            (None, None) => Endpoint::Local,
        };
        let normal_copies = normal_copies(&endpoint, host_page);
        if let Some(avail) = mem_available() {
            if mem * normal_copies > avail {
                return Err(format!(
                    "--mem {} needs {} MiB of memory ({normal_copies} copies of guest RAM), only {} MiB are available",
                    cli.mem,
                    (mem * normal_copies) >> 20,
                    avail >> 20
                ));
            }
        }
        Ok(Self {
            cfg,
            modes: parse_list("modes", &cli.modes)?,
            workloads: parse_list("workloads", &cli.workloads)?,
            json: cli.json,
            svg: cli.svg,
            endpoint,
            quiet: cli.quiet,
            guest_note,
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
