//! `pagehint-migrate`: migrate a KVM virtual machine (or a thread guest) with precopy and
//! postcopy in vanilla, preempt and preempt-hint modes under several workloads, and print
//! what the guest felt. A thin shell: cli → compare → export.

use std::process::ExitCode;

use clap::Parser;
use pagehint_migrate::cli::{Cli, Endpoint, Options};
use pagehint_migrate::hugepages::HugePages;
use pagehint_migrate::{compare, export};

const LEGEND: &str = "\
faults: vCPU accesses that found their page missing and waited; req p50/p99: request latency (fault read -> page placed)
blocktime: time every vCPU was blocked at once (QEMU's postcopy-blocktime); longest pause: stream: longest time behind schedule, others: longest fault
downtime: source vCPUs stop -> destination vCPUs run; postcopy: destination resumes -> last page placed
urgent/bg pages: 4 KiB pages sent by the urgent path / the background scan in postcopy; hints off/taken: offered / taken by the scan
guest ops/s: pages checked (or lookups) per second at the source in precopy -> at the destination in postcopy
verified: each missing page placed exactly once, memory equals the source's at the switch-over, the guest's own checks passed";

fn main() -> ExitCode {
    let opts = match Options::from_cli(Cli::parse()) {
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
    if let Some(first) = rows.first() {
        println!("\nfault path: {}\n", first.fault_path);
        print!("{}", export::table(rows));
        println!("\n{LEGEND}\n");
        println!("targets (ratios from this run):");
        print!("{}", export::targets_text(&export::targets(rows)));
        println!("\ntotal time {:.1} s", outcome.seconds);
    }
    let l = opts.cfg.layout();
    let subtitle = format!(
        "{} guest, {} vCPU(s), {} MiB in {} host pages, precopy {} round(s), link {}",
        opts.cfg.guest.kind,
        l.vcpus(),
        l.mem() >> 20,
        l.host_page(),
        opts.cfg.precopy.rounds,
        opts.cfg.link.describe(),
    );
    let mut status = ExitCode::SUCCESS;
    for (path, text) in [
        (&opts.json, export::json(rows)),
        (&opts.svg, export::svg(rows, &subtitle)),
    ] {
        if let Some(p) = path {
            match std::fs::write(p, text) {
                Ok(()) => println!("wrote {}", p.display()),
                Err(e) => {
                    eprintln!("error: writing {}: {e}", p.display());
                    status = ExitCode::from(1);
                }
            }
        }
    }
    if let Some(f) = outcome.failure {
        eprintln!("error: {f}");
        return ExitCode::from(2);
    }
    if rows.iter().any(|r| !r.verified) {
        eprintln!("error: some runs failed verification");
        return ExitCode::from(1);
    }
    status
}
