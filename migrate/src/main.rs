//! `pagehint-migrate`: migrate guest RAM in postcopy (vanilla, preempt, preempt-hint) under
//! several guest workloads, on userfaultfd, and print what the guest felt.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pagehint::layout::parse_size;
use pagehint_migrate::config::{FaultPath, MigrationMode, RunConfig, SourceFault, Workload};
use pagehint_migrate::image::GuestPlan;
use pagehint_migrate::report::{self, RunResult};
use pagehint_migrate::uffd::Userfault;
use pagehint_migrate::{run_destination, LinkParams, LocalSource, PinPlan, SourceServer};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Pin {
    /// Guest + fault path on one CPU, background streams on another.
    Auto,
    /// Let the kernel place threads.
    Off,
}

/// Migrate guest RAM in postcopy with the pagehint scheduler and compare vanilla, preempt
/// and preempt-hint on real guest workloads (userfaultfd destination, TCP channels through
/// an emulated link).
#[derive(Parser, Debug)]
#[command(name = "pagehint-migrate", version)]
struct Cli {
    /// Guest RAM size (4K, 64M, 1G, ...).
    #[arg(long, default_value = "1G")]
    mem: String,
    /// Host page size: 4K, or 2M for huge-page-backed guests.
    #[arg(long, default_value = "4K")]
    host_page: String,
    /// Modes to compare, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vanilla,preempt,preempt-hint"
    )]
    modes: Vec<MigrationMode>,
    /// Guest workloads, comma separated: seq, random, stream, kv.
    #[arg(long, value_delimiter = ',', default_value = "seq,random,stream,kv")]
    workloads: Vec<Workload>,
    /// Write the results as a JSON list to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG plot of the fault-latency distributions to FILE.
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
    /// Target pages per background claim (1 to 64, a power of two).
    #[arg(long, default_value_t = 16)]
    claim_batch: u64,
    /// Playback rate of the stream workload, bytes/s.
    #[arg(long, default_value = "256M")]
    stream_rate: String,
    /// Seed of the guest image and workloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Use the software fault path even where userfaultfd works.
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
    /// Test hook: the destination sends N malformed page requests at the start.
    #[arg(long, hide = true, default_value_t = 0)]
    inject_bad: u64,
    /// Test hook: the source drops both connections after N host pages.
    #[arg(long, hide = true, default_value_t = 0)]
    test_drop_after: u64,
    /// Test hook: the source corrupts a page or sends one twice (none, corrupt, duplicate).
    #[arg(long, hide = true, default_value = "none")]
    test_source_fault: SourceFault,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let scale = match unit {
        "" | "s" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "ns" => 1.0,
        _ => return Err(format!("bad duration unit in {s:?} (s, ms, us, ns)")),
    };
    if !v.is_finite() || v < 0.0 || v * scale > 3.6e12 {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_nanos((v * scale) as u64))
}

fn parse_bits(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad bandwidth {s:?}"))?;
    let scale = match unit.trim_end_matches("bit").trim_end_matches("bps") {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        _ => return Err(format!("bad bandwidth unit in {s:?} (K, M, G bits/s)")),
    };
    if !v.is_finite() || v < 0.0 || v * scale > 1e13 {
        return Err(format!("bandwidth {s:?} out of range"));
    }
    Ok((v * scale) as u64)
}

fn size(what: &str, s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("--{what} {s}: {e}"))
}

fn config(cli: &Cli) -> Result<RunConfig, String> {
    let cfg = RunConfig {
        mem: size("mem", &cli.mem)?,
        host_page: size("host-page", &cli.host_page)?,
        seed: cli.seed,
        link: LinkParams {
            bandwidth_bps: parse_bits(&cli.bandwidth)?,
            delay_ns: parse_duration(&cli.delay)?.as_nanos() as u64,
            queue_bytes: size("queue", &cli.queue)?,
            nic_queue_bytes: size("nic-queue", &cli.nic_queue)?,
        },
        claim_batch: cli.claim_batch,
        stream_rate: size("stream-rate", &cli.stream_rate)?.max(1),
        fault_path: if cli.no_uffd {
            FaultPath::Software
        } else {
            FaultPath::Auto
        },
        pin: match cli.pin {
            Pin::Auto => PinPlan::auto(),
            Pin::Off => PinPlan::OFF,
        },
        idle_timeout: parse_duration(&cli.timeout)?.max(Duration::from_millis(200)),
        inject_bad: cli.inject_bad,
        drop_after: cli.test_drop_after,
        source_fault: cli.test_source_fault,
    };
    if !cfg.host_page.is_power_of_two() || cfg.host_page < 4096 {
        return Err(format!(
            "--host-page {} is not a power of two of at least 4K",
            cli.host_page
        ));
    }
    pagehint::ClaimBatch::pages(cfg.claim_batch).map_err(|e| format!("--claim-batch: {e}"))?;
    GuestPlan::new(cfg.mem, cfg.host_page)?;
    if cfg.mem > pagehint_migrate::source::MAX_MEM {
        return Err(format!(
            "--mem {} is more than the harness's 64 GiB",
            cli.mem
        ));
    }
    // Source and destination each hold a copy of guest RAM.
    let copies = if cli.listen.is_some() || cli.connect.is_some() {
        1
    } else {
        2
    };
    if let Some(avail) = mem_available() {
        if cfg.mem * copies > avail {
            return Err(format!(
                "--mem {} needs {} MiB of memory ({} cop{} of guest RAM), only {} MiB are available",
                cli.mem,
                (cfg.mem * copies) >> 20,
                copies,
                if copies == 1 { "y" } else { "ies" },
                avail >> 20
            ));
        }
    }
    if cli.modes.is_empty() || cli.workloads.is_empty() {
        return Err("nothing to run: --modes and --workloads need at least one entry".into());
    }
    Ok(cfg)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {addr:?} resolves to nothing"))
}

fn serve(addr: &str, cfg: &RunConfig) -> ExitCode {
    let server = match SourceServer::bind(addr, cfg.pin, cfg.idle_timeout) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    match server.local_addr() {
        Ok(a) => println!("pagehint-migrate source listening on {a}"),
        Err(e) => println!("pagehint-migrate source listening ({e})"),
    }
    let _ = std::io::stdout().flush();
    let stop = AtomicBool::new(false);
    let mut n = 0;
    server.serve(&stop, |r| {
        n += 1;
        match r {
            Ok(rep) => {
                let s = &rep.summary.stats;
                eprintln!(
                    "session {n}: {} of {} MiB done: {} pages urgent, {} background, {} hints taken, {} bad requests rejected{}",
                    rep.mode,
                    rep.mem >> 20,
                    s.urgent_pages,
                    s.background_pages,
                    s.hints_taken,
                    s.bad_requests,
                    rep.summary
                        .rejected
                        .first()
                        .map(|m| format!(" (first: {m})"))
                        .unwrap_or_default()
                );
            }
            Err(e) => eprintln!("session {n} failed: {e}"),
        }
    });
    ExitCode::SUCCESS
}

fn print_header(cfg: &RunConfig, addr: &str) {
    let plan = GuestPlan::new(cfg.mem, cfg.host_page).expect("checked");
    let fault = match cfg.fault_path {
        FaultPath::Software => "software path (forced by --no-uffd)".to_string(),
        FaultPath::Auto => match Userfault::open() {
            Ok(u) => format!("userfaultfd, missing mode ({})", u.how()),
            Err(e) => format!(
                "SOFTWARE PATH: userfaultfd is not available ({e}); the guest checks the \
                 received bitmap before each access instead"
            ),
        },
    };
    let mib = |p: u64| (p * 4096) >> 20;
    println!(
        "pagehint-migrate: postcopy of {} MiB of guest RAM in {} KiB host pages",
        cfg.mem >> 20,
        cfg.host_page >> 10
    );
    println!("  source       {addr}; background scan starts at page 0");
    println!("  link         {}", cfg.link.describe());
    println!("  faults       {fault}");
    println!("  pinning      {}", cfg.pin.describe());
    println!(
        "  workloads    seq: {} MiB at {} MiB in order | random: all RAM until migrated | stream: {} MiB at {} MiB, {} MiB/s | kv: lookups in a {} MiB hash table at {} MiB",
        mib(plan.seq.end - plan.seq.start),
        mib(plan.seq.start),
        mib(plan.stream.end - plan.stream.start),
        mib(plan.stream.start),
        cfg.stream_rate >> 20,
        mib(plan.kv.end - plan.kv.start),
        mib(plan.kv.start),
    );
    println!();
}

const LEGEND: &str = "\
faults: guest accesses that found their page missing and waited for it; p50/p99/max: their latency
stall: total time the guest waited on faults; migration: postcopy start to the last page placed
longest pause: stream: longest time the player was behind schedule; others: the longest single fault
urgent/bg pages: 4 KiB pages sent by the urgent path / the background scan
hints off/taken: hints offered by the urgent path / taken by the background scan (preempt-hint only)
verified: every page equals the source's, the guest read correct data, nothing was placed twice";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(addr) = &cli.listen {
        return serve(addr, &cfg);
    }
    let local;
    let (addr, shown) = match &cli.connect {
        Some(a) => match resolve(a) {
            Ok(s) => (s, format!("{a} (remote)")),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => match LocalSource::start(cfg.pin, cfg.idle_timeout, true) {
            Ok(l) => {
                local = l;
                (
                    local.addr(),
                    format!("in-process on {} (TCP loopback)", local.addr()),
                )
            }
            Err(e) => {
                eprintln!("error: cannot start the source: {e}");
                return ExitCode::from(2);
            }
        },
    };
    print_header(&cfg, &shown);
    let runs: Vec<(Workload, MigrationMode)> = cli
        .workloads
        .iter()
        .flat_map(|&w| cli.modes.iter().map(move |&m| (w, m)))
        .collect();
    let started = Instant::now();
    let mut rows: Vec<RunResult> = Vec::new();
    let mut failure = None;
    for (i, &(w, m)) in runs.iter().enumerate() {
        let pb = if cli.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(1)
        };
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:<28} [{bar:32}] {percent:>3}% of pages  {elapsed}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix(format!("[{}/{}] {w} / {m}", i + 1, runs.len()));
        let progress = |n: u64, total: u64| {
            pb.set_length(total);
            pb.set_position(n);
        };
        let r = run_destination(addr, &cfg, m, w, &progress);
        pb.finish_and_clear();
        match r {
            Ok(r) => {
                println!(
                    "[{}/{}] {:<7} {:<13} migrated in {:>7.1} ms ({:.0} MiB/s), {:>6} faults, p50 {:>8.1} µs, stall {:>8.1} ms, {}",
                    i + 1,
                    runs.len(),
                    r.workload,
                    r.mode,
                    r.duration_ms,
                    r.throughput_mib_s,
                    r.faults,
                    r.fault_p50_us,
                    r.stall_ms,
                    if r.verified { "verified".to_string() } else { format!("NOT VERIFIED: {}", r.problems.join("; ")) }
                );
                if r.bad_requests > 0 {
                    println!(
                        "        the source rejected {} malformed page requests and went on (first: {})",
                        r.bad_requests,
                        r.rejected.first().cloned().unwrap_or_default()
                    );
                }
                rows.push(r);
            }
            Err(e) => {
                failure = Some(format!("{w} / {m}: {e}"));
                break;
            }
        }
    }
    if let Some(first) = rows.first() {
        println!("\nfault path: {}\n", first.fault_path);
        print!("{}", report::table(&rows));
        println!("\n{LEGEND}\n");
        println!("targets (ratios from this run):");
        print!("{}", report::targets_text(&report::targets(&rows)));
        println!("\ntotal time {:.1} s", started.elapsed().as_secs_f64());
    }
    let subtitle = format!(
        "{} MiB, {} KiB host pages, link {}; {}",
        cfg.mem >> 20,
        cfg.host_page >> 10,
        cfg.link.describe(),
        rows.first().map_or("", |r| r.fault_path.as_str())
    );
    let mut status = ExitCode::SUCCESS;
    if let Some(path) = &cli.json {
        match std::fs::write(path, report::json(&rows)) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("error: writing {}: {e}", path.display());
                status = ExitCode::from(1);
            }
        }
    }
    if let Some(path) = &cli.svg {
        match std::fs::write(path, report::svg(&rows, &subtitle)) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("error: writing {}: {e}", path.display());
                status = ExitCode::from(1);
            }
        }
    }
    if let Some(f) = failure {
        eprintln!("error: {f}");
        return ExitCode::from(2);
    }
    if rows.iter().any(|r| !r.verified) {
        eprintln!("error: some runs failed verification");
        return ExitCode::from(1);
    }
    status
}
