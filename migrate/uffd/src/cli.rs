//! `pagehint-uffd`'s command line: parsed once into typed options.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pagehint::layout::parse_size;

use super::compare::CompareOptions;
use super::handler::{HandlerOptions, Policy};
use super::protocol::HandshakeFormat;
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::options::Workload;
use pagehint_migrate::values::parse_duration;

/// A userfaultfd page-fault handler for Firecracker snapshot restore, loading memory with
/// pagehint's scheduler; and the tools to measure it.
#[derive(Debug, Parser)]
#[command(name = "pagehint-uffd", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one VMM: listen on SOCKET (Firecracker's `mem_backend.backend_path`), receive
    /// the userfaultfd and the regions (any Firecracker release from v1.7), serve faults from
    /// MEM_FILE (or from a memory server at REMOTE) until the VMM goes. On a fatal error the
    /// VMM is killed (its vCPUs would wait forever) and the exit status is non-zero.
    Serve {
        /// The Unix socket to listen on (created; removed afterwards).
        #[arg(long)]
        socket: PathBuf,
        /// The snapshot memory file.
        #[arg(long, required_unless_present = "remote", conflicts_with = "remote")]
        mem_file: Option<PathBuf>,
        /// HOST:PORT of a `pagehint-uffd mem-server` to fetch pages from over TCP (pull-mode
        /// postcopy) instead of a file.
        #[arg(long)]
        remote: Option<String>,
        /// How long a memory server may stay silent before a fetch fails (with --remote):
        /// 5s, 800ms (`--remote-timeout-s N`: N seconds).
        #[arg(long, alias = "remote-timeout-s", default_value = "5s")]
        remote_timeout: String,
        /// The loading policy (its help lists every policy).
        #[arg(long, default_value = "pagehint", help = format!("One of {}", Policy::names()))]
        policy: String,
        /// Prefetcher threads (pagehint policies).
        #[arg(long, default_value_t = 1)]
        prefetchers: usize,
        /// How long to wait for the handshake once the VMM connects (`--handshake-timeout-s
        /// N`: N seconds).
        #[arg(long, alias = "handshake-timeout-s", default_value = "5s")]
        handshake_timeout: String,
        /// Write the session's report here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The record file: written by --policy record (each host page's first fault, in
        /// order), followed by --policy recorded and recorded+pagehint.
        #[arg(long)]
        record: Option<PathBuf>,
        /// With --policy record: record the faults of the first DURATION only (500ms, 2s;
        /// default: the whole session).
        #[arg(long)]
        record_for: Option<String>,
        /// On a fatal error: `kill` the VMM (SIGKILL to the SO_PEERCRED pid, as Firecracker's
        /// example handler does), or only `notify` (print the error; the VMM must notice).
        #[arg(long, default_value = "kill")]
        on_fatal: String,
    },
    /// Serve a memory file over TCP to `serve --remote` handlers (the source side of
    /// pull-mode postcopy), until interrupted.
    MemServer {
        /// Address to listen on, e.g. 0.0.0.0:7070.
        #[arg(long)]
        listen: String,
        /// The memory file.
        #[arg(long)]
        mem_file: PathBuf,
        /// How long a connection may stay silent before it is dropped (`--idle-s N`: N
        /// seconds).
        #[arg(long, alias = "idle-s", default_value = "600s")]
        idle: String,
    },
    /// Boot the KVM guest, run a workload, and write a snapshot (mem + vmstate) to DIR.
    Snapshot {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Guest RAM.
        #[arg(long, default_value = "64M")]
        mem: String,
        /// vCPUs.
        #[arg(long, default_value_t = 2)]
        vcpus: u32,
        /// The workload (its help lists every workload).
        #[arg(long, default_value = "kv", help = format!("One of {}", Workload::NAMES))]
        workload: String,
        /// 4K or 2M (2M: the restore maps hugetlb pages).
        #[arg(long, default_value = "4K")]
        host_page: String,
        /// How long the workload runs before the snapshot (200ms, 1s).
        #[arg(long, default_value = "200ms")]
        warm: String,
        /// The same in milliseconds (the older spelling).
        #[arg(long, hide = true, conflicts_with = "warm")]
        warm_ms: Option<u64>,
    },
    /// Play Firecracker's part: restore the snapshot in DIR through the handler at SOCKET.
    Restore {
        /// The snapshot directory.
        #[arg(long)]
        dir: PathBuf,
        /// The handler's socket.
        #[arg(long)]
        socket: PathBuf,
        /// How long the workload runs before the guest verifies and stops (500ms, 2s): the
        /// window the guest counts its work in.
        #[arg(long, default_value = "500ms")]
        run_for: String,
        /// The same in milliseconds (the older spelling).
        #[arg(long, hide = true, conflicts_with = "run_for")]
        run_ms: Option<u64>,
        /// Send the handshake of this Firecracker release (1.7 to 1.11: page_size_kib only,
        /// the socket closed at once; 1.12 and later: both fields, the socket kept).
        #[arg(long, default_value = "1.16")]
        firecracker: String,
    },
    /// Compare the policies on every workload (one snapshot each, one record run, then
    /// every policy --repeat times): work in the window, faults, blocktime; table, JSON, SVG.
    Compare {
        /// Working directory for snapshots and sockets.
        #[arg(long, default_value = "/tmp/pagehint-uffd-compare")]
        dir: PathBuf,
        /// Guest RAM.
        #[arg(long, default_value = "256M")]
        mem: String,
        /// vCPUs.
        #[arg(long, default_value_t = 2)]
        vcpus: u32,
        /// 4K or 2M.
        #[arg(long, default_value = "4K")]
        host_page: String,
        /// Comma-separated workloads.
        #[arg(long, default_value = Workload::DEFAULT_LIST)]
        workloads: String,
        /// Comma-separated workloads also replayed on a snapshot of another seed with the
        /// first one's record (the working set changes between record and replay); `none`.
        #[arg(long, default_value = "random,kv")]
        changed: String,
        /// Comma-separated policies (default: on-demand, linear, pagehint, recorded,
        /// recorded+pagehint).
        #[arg(long)]
        policies: Option<String>,
        /// Prefetcher threads (pagehint policies).
        #[arg(long, default_value_t = 1)]
        prefetchers: usize,
        /// How long the workload runs after resume: the window (500ms, 2s).
        #[arg(long, default_value = "500ms")]
        run_for: String,
        /// The same in milliseconds (the older spelling).
        #[arg(long, hide = true, conflicts_with = "run_for")]
        run_ms: Option<u64>,
        /// Restores per workload and policy; medians and min-max are reported, and the
        /// targets judged on the medians.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// JSON output.
        #[arg(long)]
        json: Option<PathBuf>,
        /// SVG output.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

/// Settings of `serve`.
#[derive(Debug)]
pub struct ServeOptions {
    /// Socket path.
    pub socket: PathBuf,
    /// Where pages come from.
    pub source: SourceSpec,
    /// Handler settings.
    pub handler: HandlerOptions,
    /// JSON report path.
    pub json: Option<PathBuf>,
    /// What to do with the VMM on a fatal error.
    pub on_fatal: OnFatal,
}

/// What `serve` does with the VMM when it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFatal {
    /// `SIGKILL` to its process (Firecracker's example handler's panic hook).
    Kill,
    /// Only print the error and exit non-zero.
    Notify,
}

/// Where `serve` reads pages from.
#[derive(Debug)]
pub enum SourceSpec {
    /// The snapshot memory file.
    File(PathBuf),
    /// A memory server over TCP.
    Remote {
        /// HOST:PORT.
        addr: String,
        /// Silence allowed per fetch.
        timeout: Duration,
    },
}

/// What to run, checked.
#[derive(Debug)]
pub enum Action {
    /// Serve one VMM.
    Serve(ServeOptions),
    /// Serve a memory file over TCP.
    MemServer {
        /// Listen address.
        listen: String,
        /// Memory file.
        mem_file: PathBuf,
        /// Idle limit per connection.
        idle: Duration,
    },
    /// Write a snapshot.
    Snapshot {
        /// Directory.
        dir: PathBuf,
        /// RAM bytes.
        mem: u64,
        /// vCPUs.
        vcpus: u32,
        /// Workload.
        workload: Workload,
        /// Host page size.
        host_page: HostPageSize,
        /// Warm-up.
        warm: Duration,
    },
    /// Restore as the VMM.
    Restore {
        /// Snapshot directory.
        dir: PathBuf,
        /// Handler socket.
        socket: PathBuf,
        /// Workload time.
        run_for: Duration,
        /// The handshake to send.
        handshake: HandshakeFormat,
    },
    /// Compare.
    Compare(CompareOptions, Option<PathBuf>, Option<PathBuf>),
}

/// `--flag`'s duration: `ms` milliseconds if the older spelling gave them, else `s` parsed
/// as every command parses durations.
fn duration(flag: &str, s: &str, ms: Option<u64>) -> Result<Duration, String> {
    match ms {
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => parse_duration(s).map_err(|e| format!("--{flag}: {e}")),
    }
}

fn workload_list(flag: &str, s: &str) -> Result<Vec<Workload>, String> {
    s.split(',')
        .map(|w| w.trim().parse().map_err(|e| format!("--{flag}: {e}")))
        .collect()
}

fn policy(s: &str) -> Result<Policy, String> {
    Policy::parse(s).ok_or_else(|| format!("--policy {s}: one of {}", Policy::names()))
}

/// A size (`--what`).
fn size(s: &str, what: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("--{what}: {e}"))
}

/// `--host-page`.
fn host_page_of(s: &str) -> Result<HostPageSize, String> {
    s.parse::<HostPageSize>()
        .map_err(|e| format!("--host-page: {e}"))
}

/// `serve`'s page source: the memory file, or the memory server at `remote`.
fn source_spec(
    mem_file: Option<PathBuf>,
    remote: Option<String>,
    remote_timeout: &str,
) -> Result<SourceSpec, String> {
    Ok(match (mem_file, remote) {
        (Some(f), None) => SourceSpec::File(f),
        (None, Some(addr)) => SourceSpec::Remote {
            addr,
            timeout: duration("remote-timeout", remote_timeout, None)?.max(Duration::from_secs(1)),
        },
        _ => return Err("give one of --mem-file and --remote".into()),
    })
}

/// `serve`'s handler options: the policy `p`, with the record it needs.
fn handler_options(
    p: &str,
    prefetchers: usize,
    handshake_timeout: &str,
    record: Option<PathBuf>,
    record_for: Option<String>,
) -> Result<HandlerOptions, String> {
    let policy = policy(p)?;
    if (policy.writes_record() || policy.follows_record()) && record.is_none() {
        return Err(format!("--policy {policy} needs --record FILE"));
    }
    Ok(HandlerOptions {
        policy,
        prefetchers,
        handshake_timeout: duration("handshake-timeout", handshake_timeout, None)?,
        record,
        record_for: match record_for {
            Some(d) => Some(duration("record-for", &d, None)?),
            None => None,
        },
    })
}

/// `--on-fatal`: kill or notify.
fn on_fatal_of(s: &str) -> Result<OnFatal, String> {
    match s {
        "kill" => Ok(OnFatal::Kill),
        "notify" => Ok(OnFatal::Notify),
        o => Err(format!("--on-fatal {o}: kill or notify")),
    }
}

/// `--changed`: `none`, or a list of workloads.
fn changed_list(changed: &str) -> Result<Vec<Workload>, String> {
    if changed == "none" {
        Ok(Vec::new())
    } else {
        workload_list("changed", changed)
    }
}

/// `--policies`: the policies listed, or all of [`Policy::COMPARED`].
fn policy_list(policies: Option<String>) -> Result<Vec<Policy>, String> {
    match policies {
        None => Ok(Policy::COMPARED.to_vec()),
        Some(list) => list.split(',').map(|p| policy(p.trim())).collect(),
    }
}

impl Cli {
    /// Checks the arguments.
    pub fn action(self) -> Result<Action, String> {
        Ok(match self.command {
            Command::Serve {
                socket,
                mem_file,
                remote,
                remote_timeout,
                policy: p,
                prefetchers,
                handshake_timeout,
                json,
                record,
                record_for,
                on_fatal,
            } => Action::Serve(ServeOptions {
                socket,
                source: source_spec(mem_file, remote, &remote_timeout)?,
                handler: handler_options(&p, prefetchers, &handshake_timeout, record, record_for)?,
                json,
                on_fatal: on_fatal_of(&on_fatal)?,
            }),
            Command::MemServer {
                listen,
                mem_file,
                idle,
            } => Action::MemServer {
                listen,
                mem_file,
                idle: duration("idle", &idle, None)?.max(Duration::from_secs(1)),
            },
            Command::Snapshot {
                dir,
                mem,
                vcpus,
                workload,
                host_page,
                warm,
                warm_ms,
            } => Action::Snapshot {
                dir,
                mem: size(&mem, "mem")?,
                vcpus,
                workload: workload.parse().map_err(|e| format!("--workload: {e}"))?,
                host_page: host_page_of(&host_page)?,
                warm: duration("warm", &warm, warm_ms)?,
            },
            Command::Restore {
                dir,
                socket,
                run_for,
                run_ms,
                firecracker,
            } => Action::Restore {
                dir,
                socket,
                run_for: duration("run-for", &run_for, run_ms)?,
                handshake: HandshakeFormat::of_release(&firecracker)
                    .map_err(|e| format!("--firecracker: {e}"))?,
            },
            Command::Compare {
                dir,
                mem,
                vcpus,
                host_page,
                workloads,
                changed,
                policies,
                prefetchers,
                run_for,
                run_ms,
                repeat,
                json,
                svg,
            } => Action::Compare(
                CompareOptions {
                    dir,
                    mem: size(&mem, "mem")?,
                    vcpus,
                    host_page: host_page_of(&host_page)?,
                    workloads: workload_list("workloads", &workloads)?,
                    changed: changed_list(&changed)?,
                    policies: policy_list(policies)?,
                    prefetchers: prefetchers.max(1),
                    run_for: duration("run-for", &run_for, run_ms)?,
                    warm: Duration::from_millis(200),
                    linger: Duration::from_secs(30),
                    repeat: match repeat {
                        0 => return Err("--repeat: at least 1".into()),
                        n => n,
                    },
                },
                json,
                svg,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(args: &[&str]) -> Result<Action, String> {
        let all = ["pagehint-uffd"].iter().chain(args);
        Cli::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .action()
    }

    #[test]
    fn durations_parse_as_everywhere_and_the_older_spellings_still_work() {
        let restore = |args: &[&str]| match action(
            &[&["restore", "--dir", "d", "--socket", "s"], args].concat(),
        ) {
            Ok(Action::Restore { run_for, .. }) => Ok(run_for),
            Ok(a) => panic!("{a:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(restore(&[]), Ok(Duration::from_millis(500)));
        assert_eq!(restore(&["--run-for", "2s"]), Ok(Duration::from_secs(2)));
        assert_eq!(restore(&["--run-ms", "20"]), Ok(Duration::from_millis(20)));
        assert!(restore(&["--run-for", "2x"])
            .unwrap_err()
            .contains("--run-for"));
        assert!(restore(&["--run-for", "1s", "--run-ms", "5"]).is_err());
        let serve = |args: &[&str]| match action(
            &[&["serve", "--socket", "s", "--remote", "h:1"], args].concat(),
        ) {
            Ok(Action::Serve(o)) => (o.source, o.handler.handshake_timeout),
            r => panic!("{r:?}"),
        };
        let (source, handshake) =
            serve(&["--remote-timeout-s", "7", "--handshake-timeout", "800ms"]);
        assert_eq!(handshake, Duration::from_millis(800));
        assert!(
            matches!(source, SourceSpec::Remote { timeout, .. } if timeout == Duration::from_secs(7))
        );
        let (source, _) = serve(&["--remote-timeout", "1500ms"]);
        assert!(
            matches!(source, SourceSpec::Remote { timeout, .. } if timeout == Duration::from_millis(1500))
        );
    }
}
