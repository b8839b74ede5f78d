//! The comparison: every workload × mode against one source (in-process over loopback, or a
//! remote one), with a progress bar; and the source-only mode that serves sessions.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::guest::layout::TARGET_PAGE;
use crate::harness::cli::{Endpoint, Invocation};
use crate::harness::result::RunResult;
use crate::options::{GuestKind, MigrationMode, Workload};
use crate::{LocalSource, SourceServer};

/// The runs of one invocation.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every run, in order; a failed one is a row with its error and how far it got.
    pub rows: Vec<RunResult>,
    /// Each failed run, in words.
    pub failures: Vec<String>,
    /// Wall time of the comparison.
    pub seconds: f64,
}

/// The header lines: what is migrated, how, over what.
pub fn header(o: &Invocation, source: &str) -> String {
    let c = &o.cfg;
    let l = c.layout();
    let mib = |p: u64| (p * TARGET_PAGE) >> 20;
    let guest = match c.guest.kind {
        GuestKind::Kvm => format!(
            "{}; {} vCPU{}; precopy {} round{} ({} tracking), then postcopy",
            o.guest_note,
            l.vcpus(),
            if l.vcpus() == 1 { "" } else { "s" },
            c.precopy.rounds,
            if c.precopy.rounds == 1 { "" } else { "s" },
            c.precopy.tracking
        ),
        GuestKind::Thread => format!("{}; postcopy", o.guest_note),
    };
    // The thread guest plays its stream window once, at the stream rate, however long.
    let playback = match c.guest.kind {
        GuestKind::Thread if o.workloads.contains(&Workload::Stream) => {
            let bytes = (l.stream.end - l.stream.start) * TARGET_PAGE;
            let ns = (u128::from(bytes) * 1_000_000_000 / u128::from(c.guest.stream_rate.max(1)))
                .min(u128::from(u64::MAX)) as u64;
            format!(
                " (the thread guest plays it once: about {} a run)",
                crate::sys::clock::human_ns(ns)
            )
        }
        _ => String::new(),
    };
    let blocks: Vec<String> = l
        .ram()
        .blocks()
        .iter()
        .zip(l.block_ranges())
        .map(|(b, (gpa, len))| format!("{} {} MiB at {gpa:#x}", b.name(), len >> 20))
        .collect();
    format!(
        "pagehint-migrate: {} MiB of guest RAM in {} host pages\n  guest        {guest}\n  RAM blocks   {}\n  source       {source}; background scan starts at page 0\n  link         {}\n  pinning      {}\n  workloads    seq: {} MiB at {} MiB | random: the {} MiB data area | stream: {} MiB at {} MiB, {}{playback} | kv: a {} MiB hash table at {} MiB\n",
        l.mem() >> 20,
        l.host_page(),
        blocks.join(", "),
        c.link.describe(),
        c.pin.describe(),
        mib(l.seq.end - l.seq.start),
        mib(l.seq.start),
        mib(l.data.end - l.data.start),
        mib(l.stream.end - l.stream.start),
        mib(l.stream.start),
        rate_text(c.guest.stream_rate),
        mib(l.kv.end - l.kv.start),
        mib(l.kv.start),
    ) + &per_vcpu_windows(o)
}

/// With several vCPUs: where each vCPU's own seq and stream windows lie, what `mixed` does,
/// and each stream's rate.
fn per_vcpu_windows(o: &Invocation) -> String {
    let l = o.cfg.layout();
    if l.vcpus() == 1 {
        return String::new();
    }
    let mib = |p: u64| (p * TARGET_PAGE) >> 20;
    let at = |w: fn(&crate::guest::layout::GuestLayout, u32) -> std::ops::Range<u64>| {
        let starts: Vec<String> = (0..l.vcpus())
            .map(|v| mib(w(l, v).start).to_string())
            .collect();
        format!(
            "{} MiB each at {} MiB",
            mib(w(l, 0).end - w(l, 0).start),
            starts.join(", ")
        )
    };
    let rate = |w: Workload| w.stream_rate_each(o.cfg.guest.stream_rate, l.vcpus()) >> 20;
    format!(
        "  per vCPU     seq: {} | stream: {}, {} MiB/s each | mixed: vCPU 0 plays the stream window ({} MiB/s), the others kv\n",
        at(crate::guest::layout::GuestLayout::seq_window),
        at(crate::guest::layout::GuestLayout::stream_window),
        rate(Workload::Stream),
        rate(Workload::Mixed),
    )
}

/// A rate in bytes/s, in the largest unit that keeps it whole enough.
fn rate_text(r: u64) -> String {
    match r {
        r if r >= 10 << 20 => format!("{} MiB/s", r >> 20),
        r if r >= 10 << 10 => format!("{} KiB/s", r >> 10),
        r => format!("{r} B/s"),
    }
}

/// Serves sessions as the source only (`--listen`), until killed or `--sessions` have been
/// served: one line on stderr per event (a session started, paused, resumed, ended;
/// connections refused, a few lines however many).
pub fn serve(addr: &str, o: &Invocation) -> Result<(), String> {
    let server = SourceServer::bind_with(addr, o.serve.clone())
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    match server.local_addr() {
        Ok(a) => println!("pagehint-migrate source listening on {a}"),
        Err(e) => println!("pagehint-migrate source listening ({e})"),
    }
    let _ = std::io::stdout().flush();
    let stop = AtomicBool::new(false);
    server.serve(&stop, o.sessions, &|e| eprintln!("{e}"));
    Ok(())
}

/// Runs every workload × mode; prints one line per run. A failed run is recorded (with how
/// far it got) and the rest go on.
pub fn run(o: &Invocation) -> Result<Outcome, String> {
    let local;
    let (addr, shown): (SocketAddr, String) = match &o.endpoint {
        Endpoint::Connect(a) => (*a, format!("{a} (remote)")),
        Endpoint::Local => {
            local = LocalSource::start(o.cfg.pin, o.cfg.idle_timeout, true)
                .map_err(|e| format!("cannot start the source: {e}"))?;
            (
                local.addr(),
                format!("in-process on {} (TCP loopback)", local.addr()),
            )
        }
        Endpoint::Listen(_) => return Err("a listening source runs no comparison".into()),
    };
    print!("{}", header(o, &shown));
    let control = open_control(o)?;
    warm_up(o)?;
    let runs = repeated(&matrix(o), o.repeat);
    let started = Instant::now();
    let mut out = Outcome::default();
    for (i, &(repeat, (w, m, resend))) in runs.iter().enumerate() {
        let mut cfg = o.cfg.clone();
        cfg.resend = resend;
        let label = crate::harness::result::mode_label(m, resend);
        let pb = progress_bar(o.quiet);
        pb.set_prefix(format!("[{}/{}] {w} / {label}", i + 1, runs.len()));
        let reached = std::cell::Cell::new(None);
        let progress = |n: u64, total: u64| {
            reached.set(Some((n, total)));
            pb.set_length(total.max(1));
            pb.set_position(n);
        };
        let r = crate::harness::run::run_destination_with(
            addr,
            &cfg,
            m,
            w,
            &progress,
            control.as_ref(),
        );
        pb.finish_and_clear();
        let at = format!("[{}/{}]", i + 1, runs.len());
        match r {
            Ok(r) => {
                print_run(&at, &label, &r);
                out.rows.push(RunResult {
                    setup: crate::harness::result::Setup { repeat, ..r.setup },
                    ..r
                });
            }
            Err(e) => {
                let reached = match reached.get() {
                    Some((n, total)) => {
                        format!("postcopy: {n} of {total} host pages placed")
                    }
                    None => "before postcopy (setup, handshake or precopy)".to_string(),
                };
                println!("{at} {w:<7} {label:<24} FAILED ({reached}): {e}");
                out.failures.push(format!("{w} / {m}: {e}"));
                let mut r = RunResult::failed(&cfg, m, w, e.to_string(), reached);
                r.setup.repeat = repeat;
                out.rows.push(r);
            }
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Opens the `--control` socket, if asked for, and says how to use it.
fn open_control(o: &Invocation) -> Result<Option<crate::dest::control::Control>, String> {
    Ok(match &o.control {
        Some(p) => {
            let c = crate::dest::control::Control::open(p)?;
            println!(
                "  control      {} (pagehint-migrate recover --dest {} --connect ADDR | --abort | --status)",
                p.display(),
                p.display()
            );
            Some(c)
        }
        None => None,
    })
}

/// Touches the memory the runs need once before measuring, and says how long it took.
fn warm_up(o: &Invocation) -> Result<(), String> {
    let (normal, huge) = o.memory_needed();
    let secs = crate::sys::warm::warm_up(normal, huge)?;
    println!(
        "  warm-up      touched {} MiB once before measuring ({secs:.1} s): first touches are slow on nested VMs\n",
        (normal + (huge << 21)) >> 20
    );
    Ok(())
}

/// Every workload × mode × `--resend` variant, in order.
fn matrix(o: &Invocation) -> Vec<(Workload, MigrationMode, bool)> {
    // A mode whose transport `--resend` does not change (vanilla: no urgent channel) runs
    // once, whatever `--resend` says.
    o.workloads
        .iter()
        .flat_map(|&w| {
            o.modes.iter().flat_map(move |&m| {
                let variants: &[bool] = if m.transport(true) != m.transport(false) {
                    &o.resend
                } else {
                    &[false]
                };
                variants.iter().map(move |&r| (w, m, r))
            })
        })
        .collect()
}

/// One run's progress bar over the pages placed (hidden with `quiet`).
fn progress_bar(quiet: bool) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1)
    };
    pb.set_style(
        ProgressStyle::with_template("{prefix:<28} [{bar:32}] {percent:>3}% of pages  {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

/// Prints a finished run's line (`at`: its place, `[i/n]`), its tail and the source's
/// rejections.
fn print_run(at: &str, label: &str, r: &RunResult) {
    println!(
        "{at} {:<7} {:<24} precopy {:>6.1} ms, downtime {:>5.1} ms, postcopy {:>7.1} ms, {:>6} faults, request p50 {:>8.1} µs, blocktime {:>8.1} ms, {}",
        r.setup.workload,
        label,
        r.transfer.precopy_ms,
        r.transfer.downtime_ms,
        r.transfer.duration_ms,
        r.waits.faults,
        r.waits.request_p50_us,
        r.waits.blocktime_ms,
        if r.outcome.verified {
            "verified".to_string()
        } else {
            format!("NOT VERIFIED: {}", r.outcome.problems.join("; "))
        }
    );
    if r.tail.requests > 0 {
        println!("        median   {}", r.tail.median.describe());
        println!("        slow 1%  {}", r.tail.slowest_1pct.describe());
    }
    if r.source.bad_requests > 0 {
        println!(
            "        the source rejected {} malformed page requests and went on (first: {})",
            r.source.bad_requests,
            r.source.rejected.first().cloned().unwrap_or_default()
        );
    }
}

/// The runs of `repeat` repeats of `matrix`, each with its repeat's index: every other
/// repeat runs each workload's modes in the opposite order, so that no mode always runs
/// first (after the machine rested) or last.
fn repeated<T: Copy>(
    matrix: &[(Workload, T, bool)],
    repeat: u32,
) -> Vec<(u32, (Workload, T, bool))> {
    let mut out = Vec::new();
    for r in 0..repeat {
        let mut i = 0;
        while i < matrix.len() {
            let w = matrix[i].0;
            let n = matrix[i..].iter().take_while(|x| x.0 == w).count();
            let group = &matrix[i..i + n];
            if r % 2 == 1 {
                out.extend(group.iter().rev().map(|&x| (r, x)));
            } else {
                out.extend(group.iter().map(|&x| (r, x)));
            }
            i += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_alternate_the_order_of_each_workloads_modes() {
        let (s, r) = (Workload::Seq, Workload::Random);
        let m = [(s, 1, true), (s, 2, true), (r, 1, true), (r, 2, true)];
        let order: Vec<(u32, Workload, i32)> = repeated(&m, 3)
            .into_iter()
            .map(|(k, (w, x, _))| (k, w, x))
            .collect();
        assert_eq!(
            order,
            [
                (0, s, 1),
                (0, s, 2),
                (0, r, 1),
                (0, r, 2),
                (1, s, 2),
                (1, s, 1),
                (1, r, 2),
                (1, r, 1),
                (2, s, 1),
                (2, s, 2),
                (2, r, 1),
                (2, r, 2),
            ]
        );
        assert_eq!(repeated(&m, 1).len(), 4);
    }
}
