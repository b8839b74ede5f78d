//! `pagehint-migrate compare-qemu`'s command line, parsed once into [`CompareOptions`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use pagehint::layout::parse_size;

use super::netns::LinkSpec;
use super::ours::Transport;
use super::peer::QemuMode;
use crate::guest::disk::DISK_MAX_VCPUS;
use crate::guest::layout::{GuestLayout, HostPageSize};
use crate::options::{CursorPolicy, MigrationMode, Workload};
use crate::values::{parse_bits, parse_duration, parse_list};

/// `compare-qemu` in `pagehint-migrate --help`.
pub const ABOUT: &str = "Migrate the same guest with QEMU 10.0 (before the page hint), QEMU 11.1 (the hint, as merged) and pagehint over the same shaped link (two network namespaces, a veth pair, tc tbf), each on both transports, repeated; every ratio split into scheduler and transport. Needs root, KVM, both QEMUs (scripts/install-deps.sh) and the pace-preload library (cargo build --release -p pagehint-pace-preload)";

/// Migrate the same guest with QEMU 10.0 (before the page hint), QEMU 11.1 (the hint, as
/// merged) and pagehint over the same shaped link (two network namespaces, a veth pair,
/// `tc tbf`), each on its own transport and on the other's, repeated, and print them side by
/// side with every ratio split into scheduler and transport. Needs root, KVM, both QEMUs
/// (scripts/install-deps.sh) and the pace-preload library
/// (`cargo build --release -p pagehint-pace-preload`).
#[derive(Args, Debug)]
pub struct CompareQemuCli {
    /// Guest RAM (one RAM block below 4 GiB for QEMU's `pc` machine).
    #[arg(long, default_value = "512M")]
    mem: String,
    /// vCPUs of the guest, on both peers (QEMU: `-smp N`; pagehint: `--vcpus N`); each runs
    /// the workload in its own window.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Host page size of guest RAM on both peers: 4K, or 2M (hugetlb: QEMU's RAM is a
    /// `memory-backend-memfd` with `hugetlb=on`; pagehint's `--host-page 2M`); the huge pages
    /// are reserved for the run and given back after it.
    #[arg(long, default_value = "4K")]
    host_page: String,
    /// Guest workloads, comma separated: seq, random, stream, kv.
    #[arg(long, value_delimiter = ',', default_value = "seq,random,stream,kv")]
    workloads: Vec<String>,
    /// Link classes (`tbf` rates), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10G,1G")]
    links: Vec<String>,
    /// `tbf` queue: the longest a packet may wait in it.
    #[arg(long, default_value = "10ms")]
    link_queue: String,
    /// QEMU's modes, comma separated: vanilla, preempt (none: QEMU is not run).
    #[arg(long, value_delimiter = ',', default_value = "vanilla,preempt")]
    qemu_modes: Vec<String>,
    /// pagehint's modes, comma separated (none: pagehint is not run).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vanilla,preempt,preempt-hint"
    )]
    modes: Vec<String>,
    /// The bandwidth cap of both peers, as a fraction of the link rate (QEMU: max-bandwidth
    /// and max-postcopy-bandwidth; pagehint: pacing of its background channel).
    #[arg(long, default_value_t = 0.9)]
    cap: f64,
    /// pagehint's low-water mark on its background channel in preempt modes
    /// (TCP_NOTSENT_LOWAT): auto (1 MiB), off (the whole send buffer), or a size.
    #[arg(long, default_value = "auto")]
    lowat: String,
    /// QEMU before the hint (10.0), or `none`.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu10: String,
    /// QEMU with the hint (11.1; the anchor of the targets), or `none` (default: the private
    /// prefix scripts/install-deps.sh fills).
    #[arg(long)]
    qemu11: Option<String>,
    /// Transports of QEMU 11.1 and pagehint, comma separated: qemu (QEMU's 100 ms-window
    /// rate limiter), pagehint (kernel pacing and an unsent-bytes bound; for QEMU through
    /// the pace-preload library). QEMU 10.0 runs on its own only.
    #[arg(long, value_delimiter = ',', default_value = "qemu,pagehint")]
    transports: Vec<String>,
    /// Repetitions (peer order alternates); medians and min-max over them.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// The pace-preload library (default: libpagehint_pace_preload.so beside this program).
    #[arg(long, value_name = "FILE")]
    preload: Option<PathBuf>,
    /// Measure once per link and repeat what tracing costs each QEMU (one extra run each:
    /// QEMU 11.1 traced, QEMU 10.0 untraced; preempt, random): on or off.
    #[arg(long, default_value = "on")]
    trace_cost: String,
    /// How long the guest runs at the source before migrating (QEMU; pagehint's source starts
    /// migrating once its guest runs).
    #[arg(long, default_value = "1s")]
    settle: String,
    /// Playback rate of the stream workload, bytes/s.
    #[arg(long, default_value = "256M")]
    stream_rate: String,
    /// pagehint preempt-hints: target pages each vCPU's cursor may claim after its fault (the
    /// library's default run), as the harness's `--stream-run`.
    #[arg(long, value_name = "PAGES", default_value_t = pagehint::streams::StreamPolicy::DEFAULT_RUN)]
    stream_run: u64,
    /// pagehint preempt-hints: cursor claims between two steps of the linear scan (the
    /// library's default share), as the harness's `--stream-share`.
    #[arg(long, value_name = "N", default_value_t = pagehint::streams::StreamPolicy::DEFAULT_SHARE)]
    stream_share: u32,
    /// Seed of the guest image and workloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Thread placement of both peers: auto (the harness's plan: guest and fault path on one
    /// CPU, bulk streams on another; QEMU's threads placed alike by name) or off (none).
    #[arg(long, default_value = "auto")]
    pin: String,
    /// Where sockets, logs and traces go (default: a fresh folder under the temporary
    /// directory, removed after a successful run).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Write the comparison as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run nothing: read the runs of a JSON document this command wrote and derive the
    /// medians, splits and targets again (and print, and write --json/--svg).
    #[arg(long, value_name = "FILE")]
    from_json: Option<PathBuf>,
    /// Write an SVG plot to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// The comparison, typed.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Guest RAM, bytes.
    pub mem: u64,
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// Host page size of guest RAM.
    pub host_page: HostPageSize,
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Links, in order.
    pub links: Vec<LinkSpec>,
    /// QEMU's modes.
    pub qemu_modes: Vec<QemuMode>,
    /// pagehint's modes.
    pub modes: Vec<MigrationMode>,
    /// Cap of both peers, fraction of the link rate.
    pub cap: f64,
    /// pagehint's `--lowat`, checked.
    pub lowat: String,
    /// ... in bytes (0: off), for QEMU on pagehint's transport in preempt mode.
    pub lowat_bytes: u64,
    /// QEMU before the hint.
    pub qemu10: Option<PathBuf>,
    /// QEMU with the hint.
    pub qemu11: Option<PathBuf>,
    /// Transports of QEMU 11.1 and pagehint.
    pub transports: Vec<Transport>,
    /// Repetitions.
    pub repeat: u32,
    /// The pace-preload library.
    pub preload: PathBuf,
    /// Measure what tracing costs QEMU.
    pub trace_cost: bool,
    /// Guest run time at the source before a QEMU migration.
    pub settle: Duration,
    /// Stream rate, bytes/s.
    pub stream_rate: u64,
    /// pagehint preempt-hints' cursors.
    pub cursors: CursorPolicy,
    /// Seed.
    pub seed: u64,
    /// Pin both peers' threads.
    pub pin: bool,
    /// Work folder, and whether it was given (kept) or made (removed on success).
    pub workdir: (PathBuf, bool),
    /// JSON output.
    pub json: Option<PathBuf>,
    /// Derive from this JSON document's runs instead of running.
    pub from_json: Option<PathBuf>,
    /// SVG output.
    pub svg: Option<PathBuf>,
}

/// QEMU's modes and pagehint's, and the two QEMUs (None: `none`), checked and typed.
type Peers = (
    Vec<QemuMode>,
    Vec<MigrationMode>,
    Option<PathBuf>,
    Option<PathBuf>,
);

/// A list of modes; `none` runs no mode of that peer.
fn modes<T: std::str::FromStr<Err = String>>(what: &str, v: &[String]) -> Result<Vec<T>, String> {
    if v.len() == 1 && v[0] == "none" {
        Ok(Vec::new())
    } else {
        parse_list(what, v)
    }
}

impl CompareOptions {
    /// Checks and types the command line.
    pub fn from_cli(c: CompareQemuCli) -> Result<Self, String> {
        let (mem, host_page) = Self::guest(&c)?;
        let workloads: Vec<Workload> = parse_list("workloads", &c.workloads)?;
        let links = Self::links(&c)?;
        if !(c.cap > 0.0 && c.cap <= 1.0) {
            return Err(format!(
                "--cap: {} (a fraction of the link rate, 0 < cap <= 1)",
                c.cap
            ));
        }
        let (qemu_modes, modes, qemu10, qemu11) = Self::peers(&c)?;
        let no_qemu = qemu_modes.is_empty() || (qemu10.is_none() && qemu11.is_none());
        if links.is_empty() || (no_qemu && modes.is_empty()) {
            return Err("nothing to compare".into());
        }
        let transports: Vec<Transport> = parse_list("transports", &c.transports)?;
        if transports.is_empty() {
            return Err("--transports: at least one".into());
        }
        if c.repeat == 0 {
            return Err("--repeat: at least 1".into());
        }
        let trace_cost = match c.trace_cost.as_str() {
            "on" => true,
            "off" => false,
            t => return Err(format!("--trace-cost: {t:?} (on, off)")),
        };
        let preload = match c.preload {
            Some(ref p) => p.clone(),
            None => default_preload()?,
        };
        let pin = match c.pin.as_str() {
            "auto" => true,
            "off" => false,
            p => return Err(format!("--pin: {p:?} (auto, off)")),
        };
        let workdir = match c.workdir {
            Some(ref d) => (d.clone(), true),
            None => (
                std::env::temp_dir().join(format!("pagehint-compare-qemu-{}", std::process::id())),
                false,
            ),
        };
        let (lowat, lowat_bytes) = Self::lowat(&c, host_page)?;
        Ok(Self {
            mem,
            vcpus: c.vcpus,
            host_page,
            workloads,
            links,
            qemu_modes,
            modes,
            cap: c.cap,
            lowat,
            lowat_bytes,
            qemu10,
            qemu11,
            transports,
            repeat: c.repeat,
            preload,
            trace_cost,
            settle: parse_duration(&c.settle).map_err(|e| format!("--settle: {e}"))?,
            stream_rate: Self::stream_rate(&c)?,
            cursors: Self::cursors(&c)?,
            seed: c.seed,
            pin,
            workdir,
            json: c.json,
            from_json: c.from_json,
            svg: c.svg,
        })
    }

    /// The guest's RAM and host page size, checked with its vCPUs.
    fn guest(c: &CompareQemuCli) -> Result<(u64, HostPageSize), String> {
        let mem = parse_size(&c.mem).map_err(|e| format!("--mem: {e}"))?;
        if mem > (2 << 30) {
            return Err("--mem: at most 2G (QEMU's `pc` machine keeps RAM in one block below 4 GiB only up to there)".into());
        }
        let host_page: HostPageSize = c
            .host_page
            .parse()
            .map_err(|e| format!("--host-page: {e}"))?;
        if !(1..=DISK_MAX_VCPUS).contains(&c.vcpus) {
            return Err(format!(
                "--vcpus {}: 1 to {DISK_MAX_VCPUS} (the boot disk's most)",
                c.vcpus
            ));
        }
        GuestLayout::new(mem, host_page, c.vcpus)
            .map_err(|e| format!("--mem/--vcpus/--host-page: {e}"))?;
        Ok((mem, host_page))
    }

    /// The link classes: each rate of `--links` with the `--link-queue`.
    fn links(c: &CompareQemuCli) -> Result<Vec<LinkSpec>, String> {
        let queue = parse_duration(&c.link_queue).map_err(|e| format!("--link-queue: {e}"))?;
        if queue.is_zero() {
            return Err("--link-queue: a tbf queue needs a length".into());
        }
        c.links
            .iter()
            .map(|l| {
                let rate_bps = parse_bits(l).map_err(|e| format!("--links: {e}"))?;
                if rate_bps < 1_000_000 {
                    return Err(format!("--links: {l}: at least 1 Mbit/s"));
                }
                Ok(LinkSpec { rate_bps, queue })
            })
            .collect::<Result<Vec<_>, String>>()
    }

    /// QEMU's modes, pagehint's, and the QEMU before the hint and the one with it.
    fn peers(c: &CompareQemuCli) -> Result<Peers, String> {
        let qemu_modes: Vec<QemuMode> = modes("qemu-modes", &c.qemu_modes)?;
        let modes: Vec<MigrationMode> = modes("modes", &c.modes)?;
        let binary = |v: &str| (v != "none").then(|| PathBuf::from(v));
        let qemu10 = binary(&c.qemu10);
        let qemu11 = match &c.qemu11 {
            Some(v) => binary(v),
            None => Some(default_qemu11()),
        };
        Ok((qemu_modes, modes, qemu10, qemu11))
    }

    /// pagehint's `--lowat`, checked, and the bound it sets in bytes (0: off).
    fn lowat(c: &CompareQemuCli, host_page: HostPageSize) -> Result<(String, u64), String> {
        let lowat = match c.lowat.as_str() {
            "auto" | "off" => c.lowat.clone(),
            l => parse_size(l)
                .map(|_| l.to_string())
                .map_err(|e| format!("--lowat: {e} (auto, off or a size)"))?,
        };
        let bytes = c
            .lowat
            .parse::<crate::link::LowWater>()
            .map_err(|e| format!("--lowat: {e}"))?
            .bytes(host_page);
        Ok((lowat, bytes))
    }

    /// pagehint's cursor policy, checked as the library checks it (a run or share of 0 is
    /// refused here, before any run).
    fn cursors(c: &CompareQemuCli) -> Result<CursorPolicy, String> {
        let p = CursorPolicy {
            run: c.stream_run,
            share: c.stream_share,
        };
        p.policy(c.vcpus.max(1))
            .map_err(|e| format!("--stream-run/--stream-share: {e}"))?;
        Ok(p)
    }

    /// The stream workload's rate, bytes/s, above 0.
    fn stream_rate(c: &CompareQemuCli) -> Result<u64, String> {
        match parse_size(&c.stream_rate)
            .map_err(|e| format!("--stream-rate {}: {e}", c.stream_rate))?
        {
            0 => Err(format!(
                "--stream-rate {}: a stream needs a rate above 0 bytes/s",
                c.stream_rate
            )),
            r => Ok(r),
        }
    }
}

/// QEMU 11.1's wrapper in the private prefix `scripts/install-deps.sh` fills.
pub fn default_qemu11() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".deps/qemu-11.1/bin/qemu-system-x86_64")
}

/// `libpagehint_pace_preload.so` beside this program (cargo builds workspace libraries into
/// the same folder).
fn default_preload() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    Ok([dir.to_path_buf(), dir.join("deps")]
        .iter()
        .map(|d| d.join("libpagehint_pace_preload.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("libpagehint_pace_preload.so")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        c: CompareQemuCli,
    }

    fn options(args: &[&str]) -> Result<CompareOptions, String> {
        let line =
            Line::try_parse_from(std::iter::once("compare-qemu").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        CompareOptions::from_cli(line.c)
    }

    #[test]
    fn vcpus_and_host_pages_are_checked_and_typed() {
        let o = options(&["--mem", "64M"]).unwrap();
        assert_eq!((o.vcpus, o.host_page), (1, HostPageSize::Small));
        let o = options(&["--vcpus", "4", "--host-page", "2M", "--mem", "256M"]).unwrap();
        assert_eq!((o.vcpus, o.host_page), (4, HostPageSize::Huge2M));
        // pagehint's low-water mark in whole host pages, and QEMU's preload given the same.
        assert_eq!(o.lowat_bytes % HostPageSize::Huge2M.bytes(), 0);
        for (args, says) in [
            (&["--vcpus", "0"][..], "--vcpus 0"),
            (&["--vcpus", "17"][..], "--vcpus 17"),
            (&["--host-page", "1G"][..], "--host-page"),
            (
                &["--vcpus", "2", "--host-page", "2M", "--mem", "32M"][..],
                "too small",
            ),
        ] {
            let e = options(args).expect_err(&format!("{args:?}"));
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    /// preempt-hints' cursor policy reaches pagehint's runs as the harness takes it, and a
    /// policy the library refuses is refused before any run.
    #[test]
    fn the_cursor_policy_is_checked_and_passed_on() {
        let o = options(&[]).unwrap();
        assert_eq!(o.cursors, CursorPolicy::DEFAULT);
        let o = options(&["--stream-run", "16384", "--stream-share", "8"]).unwrap();
        assert_eq!(
            o.cursors,
            CursorPolicy {
                run: 16384,
                share: 8
            }
        );
        for (args, says) in [
            (&["--stream-run", "0"][..], "run"),
            (&["--stream-share", "0"][..], "claim"),
        ] {
            let e = options(args).expect_err(&format!("{args:?}"));
            assert!(
                e.contains("--stream-run/--stream-share") && e.contains(says),
                "{e}"
            );
        }
    }

    /// `scripts/measure-streams-qemu.sh`'s command line, with its shell variables given
    /// values, parses (the script is run by hand, not by CI).
    #[test]
    fn the_streams_script_command_parses() {
        let script = include_str!("../../../scripts/measure-streams-qemu.sh");
        let start = script
            .find("compare-qemu")
            .expect("the script runs compare-qemu");
        let mut cmd = String::new();
        for line in script[start..].lines() {
            cmd.push_str(line.trim_end_matches('\\'));
            cmd.push(' ');
            if !line.ends_with('\\') {
                break;
            }
        }
        let cmd = cmd
            .replace("\"$n\"", "4")
            .replace("\"$hp\"", "2M")
            .replace("\"$work\"", "seq,stream")
            .replace("\"$rate\"", "64M")
            .replace("\"$repeat\"", "3");
        let args: Vec<&str> = cmd
            .split_whitespace()
            .skip(1)
            .take_while(|a| *a != "--json")
            .collect();
        assert!(!args.iter().any(|a| a.contains('$')), "{args:?}");
        let o = options(&args).unwrap();
        assert_eq!(
            (o.vcpus, o.host_page, o.repeat),
            (4, HostPageSize::Huge2M, 3)
        );
    }
}
