//! QEMU itself, side by side: the harness's guest migrated by QEMU 10.0 (before the page
//! hint), by QEMU 11.1 (the hint, as merged) and by pagehint over the same real, shaped link
//! (`pagehint-migrate compare-qemu`), each on its own transport and on the other's.
//!
//! # What is the same for both
//! * **The guest**: the harness's guest program ([`crate::guest::kvm::program`]), for QEMU
//!   booted from a raw disk ([`crate::guest::disk`]) that runs the very same code on the same
//!   image, memory size and access pattern, on `--vcpus N` vCPUs (QEMU: `-smp N`; the disk
//!   starts the others) and `--host-page` 4 KiB or 2 MiB pages (QEMU: guest RAM a hugetlb
//!   `memory-backend-memfd`; pagehint: `--host-page 2M`; the pool reserved for the run).
//! * **The link**: two network namespaces joined by a veth pair shaped by `tc tbf`
//!   ([`netns`]); both sources run in one namespace and both destinations in the other, and
//!   pagehint's emulated link is off, so the kernel queue does the queueing for both.
//! * **The cap**: one rate for both (a fraction of the link rate). QEMU gets `max-bandwidth`
//!   and `max-postcopy-bandwidth`; pagehint paces its background channel at it.
//! * **The transport**, both ways ([`ours::Transport`]): QEMU's (its 100 ms-window rate
//!   limiter; for pagehint the same limiter, [`crate::source::rate_limit`]) and pagehint's
//!   (kernel pacing and a bound on unsent bytes; for QEMU the pace-preload library, which
//!   sets them on QEMU's own sockets), so that every ratio splits into what the
//!   scheduler/implementation did and what the transport did ([`side`]).
//! * **The migration**: pure postcopy (QEMU: `migrate` then at once `migrate-start-postcopy`;
//!   pagehint: `--precopy-rounds 0`).
//! * **The figures** ([`side`]): request latency ([`latency`]: QEMU's own figures where it has
//!   them, untraced; else one trace write per request, [`trace`]), blocktime, the same span of
//!   total time, CPU per GiB of the migration threads ([`cpu`]), requests and bytes, each
//!   taken where the peer measures it, with the same definition; `--repeat` times, with
//!   medians and min–max.
//!
//! # Flow
//! [`cli`] → [`compare`] (per link: [`netns`]; per repeat and workload: [`peer`] for QEMU with
//! [`qmp`], [`latency`], [`trace`], [`ours`] for pagehint; [`cpu`] for both) → [`side`] rows,
//! medians, splits and targets → [`export`].

pub mod cli;
pub mod compare;
pub mod cpu;
pub mod export;
pub mod latency;
pub mod netns;
pub mod ours;
pub mod peer;
pub mod qmp;
pub mod side;
pub mod trace;

use std::fmt;
use std::process::ExitCode;

/// What the columns of the medians mean, printed under them.
const LEGEND: &str = "\
p50/p99: request latency, fault read -> page placed (QEMU >= 10.1: its own query-migrate histogram, untraced; QEMU 10.0: its request trace, one write per request)
blocktime: time every vCPU was blocked at once (QEMU: postcopy-blocktime); vCPUs blocked: each vCPU's blocked time, added up (QEMU: postcopy-vcpu-blocktime summed); total: switch-over -> last page placed (QEMU: source STOP event -> destination completed event)
CPU/GiB: run time of the migration threads (QEMU: mig/*; pagehint: ph/*) per GiB sent; not the vCPUs, not the main threads (in the JSON: cpu_other)
transport: qemu = a 100 ms-window rate limiter at line rate (QEMU's; pagehint with --qemu-rate-limit); pagehint = kernel pacing + unsent-bytes bound (pagehint's; QEMU with the pace-preload library)";

/// A list of names, comma-separated; `none` for none.
fn list<T>(v: &[T], name: impl Fn(&T) -> String) -> String {
    match v.iter().map(name).collect::<Vec<_>>().join(",") {
        l if l.is_empty() => "none".into(),
        l => l,
    }
}

/// Prints what the comparison will run, in one line.
fn print_options(o: &cli::CompareOptions) {
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or("none".into(), |p| p.display().to_string())
    };
    println!(
        "compare-qemu: {} MiB guest, {} vCPU(s), {} host pages, workloads {}, links {}, QEMU modes {} (10.0: {}, 11.1: {}), pagehint modes {}, transports {}, {} repeat(s)",
        o.mem >> 20,
        o.vcpus,
        o.host_page,
        list(&o.workloads, |w| w.name().into()),
        list(&o.links, |l| l.name()),
        list(&o.qemu_modes, |m| m.name().into()),
        path(&o.qemu10),
        path(&o.qemu11),
        list(&o.modes, |m| m.name().into()),
        list(&o.transports, |t| t.name().into()),
        o.repeat,
    );
}

/// Prints the comparison: peers, setup, links, medians, attribution, tracing's cost and
/// targets; returns whether every run completed with the guest alive.
fn print_comparison(c: &export::Comparison) -> bool {
    println!();
    for q in &c.qemus {
        println!(
            "{}: {} ({}); latency from {}",
            q.label, q.version, q.role, q.latency_from
        );
    }
    println!("{}", c.setup);
    for l in &c.links {
        println!(
            "link {}: {} (probe: {:.2} Gbit/s)",
            l.name,
            l.shaping,
            l.measured_bps / 1e9
        );
    }
    println!("\nmedians over the repeats:");
    print!("{}", export::medians(&c.series));
    println!("\n{LEGEND}\n");
    if let Some(a) = &c.anchor {
        print!("{}", export::attribution(&c.splits, a));
    }
    if !c.probes.is_empty() {
        println!("what tracing costs QEMU (the same migration untraced and traced):");
        print!("{}", export::tracing(&c.probes));
        println!();
    }
    println!("targets (medians over the repeats; >= {} requests on each side for latency and blocktime):", side::MIN_REQUESTS);
    print!("{}", side::targets_text(&c.targets));
    let (all_alive, alive) = export::alive_line(&c.rows);
    println!(
        "  [{}] {alive}; target: all",
        if all_alive { "PASS" } else { "MISS" }
    );
    println!("\ntotal time {:.0} s", c.seconds);
    all_alive
}

/// Writes `--json` and `--svg` where given; exit status 1 if one was not written.
fn write_outputs(o: &cli::CompareOptions, c: &export::Comparison) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for (p, text) in [(&o.json, export::json(c)), (&o.svg, export::svg(c))] {
        if let Some(p) = p {
            // Whole: a temporary file renamed over it, as the harness writes its own.
            match crate::harness::export::write_whole(p, &text) {
                Ok(()) => println!("wrote {}", p.display()),
                Err(e) => {
                    eprintln!("error: writing {}: {e}", p.display());
                    status = ExitCode::from(1);
                }
            }
        }
    }
    status
}

/// `pagehint-migrate compare-qemu`: cli → compare → export; the process's exit status
/// (0: every run completed with the guest alive; 1: one did not or an output was not
/// written; 2: the comparison could not run).
pub fn command(c: cli::CompareQemuCli) -> ExitCode {
    let o = match cli::CompareOptions::from_cli(c) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find this executable: {e}");
            return ExitCode::from(2);
        }
    };
    print_options(&o);
    let result = match &o.from_json {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| QemuError::Io(format!("reading {}", f.display()), e))
            .and_then(|t| compare::rederive(&t)),
        None => compare::run(&o, &exe, |r| println!("{}", export::run_line(r))),
    };
    let c = match result {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("(logs in {})", o.workdir.0.display());
            return ExitCode::from(2);
        }
    };
    let all_alive = print_comparison(&c);
    let status = write_outputs(&o, &c);
    if !all_alive {
        eprintln!(
            "error: some runs failed (logs in {})",
            o.workdir.0.display()
        );
        return ExitCode::from(1);
    }
    if !o.workdir.1 {
        let _ = std::fs::remove_dir_all(&o.workdir.0);
    }
    status
}

/// Why a side-by-side step failed.
#[derive(Debug)]
pub enum QemuError {
    /// Something this machine lacks or refused (root, KVM, iproute2, QEMU).
    Setup(String),
    /// An I/O error, with what was being done.
    Io(String, std::io::Error),
    /// A QMP command failed.
    Command {
        /// `source` or `destination`.
        side: &'static str,
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A peer said something unexpected.
    Protocol(String),
    /// A peer took too long.
    Timeout(String),
    /// A peer exited, or the migration failed.
    Exited(String),
}

impl fmt::Display for QemuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(s) | Self::Protocol(s) | Self::Timeout(s) | Self::Exited(s) => {
                f.write_str(s)
            }
            Self::Io(what, e) => write!(f, "{what}: {e}"),
            Self::Command {
                side,
                command,
                class,
                desc,
            } => write!(f, "the {side} QEMU refused {command}: {class}: {desc}"),
        }
    }
}

impl std::error::Error for QemuError {}
