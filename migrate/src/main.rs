//! `pagehint-migrate`: migrate a KVM virtual machine (or a thread guest) with precopy and
//! postcopy in vanilla, preempt and preempt-hint modes under several workloads, and print
//! what the guest felt. A thin shell: cli → compare → export.

use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches};
use pagehint_migrate::harness::cli::{Cli, Endpoint, Invocation, RecoverCli, RECOVER_ABOUT};
use pagehint_migrate::harness::export::TargetCheck;
use pagehint_migrate::harness::result::RunResult;
use pagehint_migrate::harness::{compare, export, medians};
use pagehint_migrate::qemu;
use pagehint_migrate::sys::hugepages::HugePages;

const LEGEND: &str = "\
faults: vCPU accesses that found their page missing and waited; req p50/p99: request latency (fault read -> page placed)
blocktime: time every vCPU was blocked at once (QEMU's postcopy-blocktime); longest pause: stream: longest time behind schedule, others: longest fault
downtime: source vCPUs stop -> destination vCPUs run; postcopy: destination resumes -> last page placed
urgent/bg pages: 4 KiB pages sent by the urgent path / the background scan in postcopy; hints off/taken: offered / taken by the scan
(no resend): the old preempt path (--resend off): requests share the main connection, and a page the background path claimed is waited for
median / slow 1%: each request's latency split into stages (request written, read by the source, answered, its copy on the wire, arrived, read, placed)
guest ops/s: pages checked (or lookups) per second at the source in precopy -> at the destination in postcopy
MiB/s: postcopy throughput, RAM still to send at the switch-over / postcopy time
cuts/recovery (with breaks): connection breaks survived in postcopy / time from the breaks to postcopy resumed
verified: each missing page placed exactly once (across all connections), memory equals the source's at the switch-over, the guest's own checks passed, no queued request lost (vanilla)";

/// What this invocation runs: the harness, or another program named by its subcommand.
enum Program {
    /// The harness's matrix of migrations.
    Migrate(Box<Cli>),
    /// `compare-qemu`.
    CompareQemu(Box<qemu::cli::CompareQemuCli>),
    /// `recover`.
    Recover(RecoverCli),
}

/// Parses this process's arguments: the harness's command line, with the other programs'
/// subcommands added (exits with clap's message on a parse error).
fn program() -> Program {
    let command = Cli::command()
        .subcommand(
            qemu::cli::CompareQemuCli::augment_args(clap::Command::new("compare-qemu"))
                .about(qemu::cli::ABOUT),
        )
        .subcommand(RecoverCli::augment_args(clap::Command::new("recover")).about(RECOVER_ABOUT));
    let mut m = command.get_matches();
    let parsed = match m.remove_subcommand() {
        Some((name, sub)) if name == "recover" => {
            RecoverCli::from_arg_matches(&sub).map(Program::Recover)
        }
        Some((_, sub)) => qemu::cli::CompareQemuCli::from_arg_matches(&sub)
            .map(|c| Program::CompareQemu(Box::new(c))),
        None => Cli::from_matches(&m).map(|c| Program::Migrate(Box::new(c))),
    };
    parsed.unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = match program() {
        Program::Migrate(cli) => cli,
        Program::CompareQemu(c) => return qemu::command(*c),
        Program::Recover(r) => return recover(r),
    };
    let opts = match Invocation::from_cli(*cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let _huge = match opts.huge_pages_needed() {
        0 => None,
        n => match HugePages::reserve(n) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("error: --host-page 2M: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if let Endpoint::Listen(addr) = &opts.endpoint {
        return match compare::serve(addr, &opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let outcome = match compare::run(&opts) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rows = &outcome.rows;
    // With --repeat: the table and the targets of the medians, each ratio with its range.
    let shown = if opts.repeat > 1 {
        medians::medians(rows)
    } else {
        rows.clone()
    };
    let targets = if opts.repeat > 1 {
        medians::median_targets(rows)
    } else {
        export::targets(rows)
    };
    if !rows.is_empty() {
        print_results(&opts, &outcome, &shown, &targets);
    }
    let subtitle = subtitle(&opts);
    let exit = export::Exit::of(rows, &outcome.failures, &targets, opts.check);
    let inv = export::Invocation {
        command_line: std::env::args().collect(),
        guest_note: &opts.guest_note,
        setup: &subtitle,
        seconds: outcome.seconds,
        failures: &outcome.failures,
        exit: exit.clone(),
    };
    let status = write_outputs([
        (&opts.json, export::json(&inv, rows, &targets)),
        (&opts.svg, export::svg(&shown, &subtitle)),
    ]);
    for f in &outcome.failures {
        eprintln!("error: {f}");
    }
    if exit.status != 0 {
        eprintln!("error: {}", exit.reason);
        return ExitCode::from(exit.status);
    }
    status
}

/// `recover`: sends the command to a running destination and prints its answer.
fn recover(r: RecoverCli) -> ExitCode {
    match r.run() {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints the fault path, the table (`shown`), the legend, the `targets` and the total time.
fn print_results(
    opts: &Invocation,
    outcome: &compare::Outcome,
    shown: &[RunResult],
    targets: &[TargetCheck],
) {
    let rows = &outcome.rows;
    if let Some(done) = rows.iter().find(|r| r.outcome.error.is_none()) {
        println!("\nfault path: {}\n", done.waits.fault_path);
    } else {
        println!();
    }
    if opts.repeat > 1 {
        println!("medians of {} repeats:", opts.repeat);
    }
    print!("{}", export::table(shown));
    println!("\n{LEGEND}\n");
    if opts.repeat > 1 {
        println!(
            "targets (ratios of the medians of {} repeats; the range of each repeat's own ratio):",
            opts.repeat
        );
        let ranges = medians::ranges(targets, rows, opts.repeat);
        print!("{}", export::targets_text_with(targets, &ranges));
    } else {
        println!("targets (ratios from this run):");
        print!("{}", export::targets_text(targets));
    }
    println!("\ntotal time {:.1} s", outcome.seconds);
}

/// The pictures' subtitle: the guest, its memory, precopy and the link.
fn subtitle(opts: &Invocation) -> String {
    let l = opts.cfg.layout();
    format!(
        "{}{} guest, {} vCPU(s), {} MiB in {} host pages, precopy {} round(s), link {}",
        if opts.repeat > 1 {
            format!("medians of {} repeats, ", opts.repeat)
        } else {
            String::new()
        },
        opts.cfg.guest.kind,
        l.vcpus(),
        l.mem() >> 20,
        l.host_page(),
        opts.cfg.precopy.rounds,
        opts.cfg.link.describe(),
    )
}

/// Writes each requested output whole (a temporary file renamed over it); failure if one
/// could not be written.
fn write_outputs<const N: usize>(outputs: [(&Option<std::path::PathBuf>, String); N]) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for (path, text) in outputs {
        if let Some(p) = path {
            match export::write_whole(p, &text) {
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
