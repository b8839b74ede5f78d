//! The side-by-side run: for each link class, a shaped link; on it, `--repeat` times, for each
//! workload, QEMU's migrations and pagehint's, each on each transport, QEMU first in even
//! repeats and pagehint first in odd ones (transports alternate the same way), so that
//! neither peer always meets the machine in the same state. Once per link and repeat, what
//! tracing costs each QEMU: QEMU ≥ 10.1 (untraced in its rows) once more traced, QEMU < 10.1
//! (traced in its rows, for latency) once more untraced — the same migration, preempt and
//! random where they run — which also cross-checks QEMU 11.1's own latency figures against
//! its trace in one run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cli::CompareOptions;
use super::export::{Comparison, LinkInfo, QemuInfo};
use super::latency::Latency;
use super::netns::{LinkSpec, ShapedLink};
use super::ours::{self, OursSetup, Transport};
use super::peer::{self, Preload, QemuMode, QemuOutcome, QemuRun, QemuSetup};
use super::side::{self, Anchor, RunKey, SideRow};
use super::QemuError;
use crate::guest::disk::{self, DiskSpec};
use crate::guest::kvm::{frame_tsc, vm::host_tsc_khz};
use crate::guest::layout::{GuestLayout, HostPageSize};
use crate::guest::STREAM_FRAME_PAGES;
use crate::options::Workload;
use crate::sys::hugepages::HugePages;
use crate::sys::pin::PinPlan;

/// Port of QEMU's migration on the destination.
const QEMU_PORT: u16 = 4451;
/// Port of pagehint's source on QEMU's transport (the next one: on pagehint's).
const PAGEHINT_PORT: u16 = 4452;

/// What tracing cost a QEMU in one repeat: the same migration traced and untraced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceProbe {
    /// Link.
    pub link: String,
    /// Repetition.
    pub repeat: u32,
    /// Peer.
    pub peer: String,
    /// Mode.
    pub mode: String,
    /// Workload.
    pub workload: String,
    /// Switch-over → last page placed, untraced / traced, ms.
    pub span_ms: (Option<f64>, Option<f64>),
    /// Blocktime, untraced / traced, ms.
    pub blocktime_ms: (f64, f64),
    /// Requests, untraced / traced.
    pub requests: (u64, u64),
    /// The traced run's own latency figures (QEMU ≥ 10.1), and its trace's.
    pub qmp_latency: Option<Latency>,
    /// ... the trace's.
    pub trace_latency: Option<Latency>,
    /// Why the probe run failed, if it did.
    pub error: Option<String>,
}

/// A QEMU peer of the comparison.
#[derive(Clone, Debug)]
struct QemuPeer {
    label: String,
    binary: PathBuf,
    /// QEMU ≥ 10.1: the hint, and latency in `query-migrate`.
    hint: bool,
    info: QemuInfo,
}

/// The QEMU peer `binary` is, by its version.
fn qemu_peer(binary: &Path) -> Result<QemuPeer, QemuError> {
    let line = peer::version(binary)?;
    let v = peer::short_version(&line);
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    let hint = (major, minor) >= (10, 1);
    Ok(QemuPeer {
        label: format!("QEMU {v}"),
        binary: binary.to_path_buf(),
        hint,
        info: QemuInfo {
            label: format!("QEMU {v}"),
            version: line,
            binary: binary.display().to_string(),
            role: if hint {
                "the hint, as merged (the anchor)".into()
            } else {
                "before the hint".into()
            },
            latency_from: if hint {
                "query-migrate (postcopy-latency, postcopy-latency-dist), untraced".into()
            } else {
                "request trace (postcopy_ram_fault_thread_request -> postcopy_page_req_del)".into()
            },
        },
    })
}

/// The QEMU peers of `o` (none without QEMU modes); an error if QEMU on pagehint's
/// transport would need the pace-preload library and it is not there.
fn qemu_peers(o: &CompareOptions) -> Result<Vec<QemuPeer>, QemuError> {
    let mut qemus = Vec::new();
    if !o.qemu_modes.is_empty() {
        for b in [&o.qemu10, &o.qemu11].into_iter().flatten() {
            qemus.push(qemu_peer(b)?);
        }
    }
    let paced_qemu = qemus.iter().any(|q| q.hint) && o.transports.contains(&Transport::Pagehint);
    if paced_qemu && !o.preload.exists() {
        return Err(QemuError::Setup(format!(
            "{} does not exist: QEMU on pagehint's transport needs the pace-preload library (cargo build --release -p pagehint-pace-preload), or --transports qemu",
            o.preload.display()
        )));
    }
    Ok(qemus)
}

/// The QEMU the others are compared with (the newest with the hint, else the last) and the
/// one before the hint.
fn anchor(qemus: &[QemuPeer]) -> Option<Anchor> {
    qemus
        .iter()
        .rev()
        .find(|q| q.hint)
        .or(qemus.last())
        .map(|q| Anchor {
            qemu: q.label.clone(),
            before: qemus.iter().find(|b| !b.hint).map(|b| b.label.clone()),
        })
}

/// Checks KVM, creates the work directory, reserves the hugetlb pool of 2 MiB pages, writes
/// one boot disk per workload and warms memory up; returns the pool and the disks.
fn prepare_guests(o: &CompareOptions) -> Result<(Option<HugePages>, Vec<PathBuf>), QemuError> {
    crate::guest::kvm::vm::probe().map_err(|e| QemuError::Setup(format!("KVM: {e}")))?;
    let tsc_khz = host_tsc_khz().map_err(|e| QemuError::Setup(format!("KVM: {e}")))?;
    let workdir = &o.workdir.0;
    std::fs::create_dir_all(workdir)
        .map_err(|e| QemuError::Io(format!("creating {}", workdir.display()), e))?;
    let layout = GuestLayout::new(o.mem, o.host_page, o.vcpus)
        .map_err(|e| QemuError::Setup(format!("guest layout: {e}")))?;
    // 2 MiB pages: a source's and a destination's RAM at once (QEMU's two processes, or
    // pagehint's), from the hugetlb pool, reserved for the whole comparison and given back
    // when it ends; a pool the kernel cannot fill is an error before anything runs.
    let huge = match o.host_page {
        HostPageSize::Small => None,
        HostPageSize::Huge2M => Some(
            HugePages::reserve(2 * layout.host_pages())
                .map_err(|e| QemuError::Setup(format!("--host-page 2M: {e}")))?,
        ),
    };
    let mut disks = Vec::new();
    for &w in &o.workloads {
        let spec = DiskSpec {
            layout: layout.clone(),
            workload: w,
            seed: o.seed,
            frame_tsc: frame_tsc(o.stream_rate, STREAM_FRAME_PAGES, tsc_khz),
        };
        let path = workdir.join(format!("guest-{w}.img"));
        let img = disk::image(&spec).map_err(QemuError::Setup)?;
        std::fs::write(&path, img)
            .map_err(|e| QemuError::Io(format!("writing {}", path.display()), e))?;
        disks.push(path);
    }
    // First touches of memory this VM never used are several times slower (see
    // crate::sys::warm::warm_up): pay them once, before anything is measured.
    crate::sys::warm::warm_up(3 * o.mem, 0).map_err(QemuError::Setup)?;
    Ok((huge, disks))
}

/// One link of the comparison: the shaped link, how each peer runs on it, and pagehint's
/// sources on it, one per transport (fields in the order they are dropped: the sources
/// before the link).
struct OnLink<'a> {
    /// pagehint's sources, one per transport (none without pagehint modes).
    sources: Vec<ours::Source>,
    /// How pagehint runs on this link.
    osetup: OursSetup,
    /// The comparison's options.
    o: &'a CompareOptions,
    /// The QEMU peers.
    qemus: &'a [QemuPeer],
    /// One boot disk per workload.
    disks: &'a [PathBuf],
    /// The link's name.
    name: String,
    /// The link's rate, bits/s.
    rate_bps: u64,
    /// Both peers' bandwidth cap, bits/s.
    cap_bps: u64,
    /// The shaped link.
    link: ShapedLink,
}

impl<'a> OnLink<'a> {
    /// Creates the link of `spec`, measures it and starts pagehint's sources on it.
    fn start(
        o: &'a CompareOptions,
        exe: &Path,
        spec: LinkSpec,
        qemus: &'a [QemuPeer],
        disks: &'a [PathBuf],
    ) -> Result<(Self, LinkInfo), QemuError> {
        let link = ShapedLink::create(spec)?;
        let name = spec.name();
        let measured = link.probe(Duration::from_secs(1))?;
        let info = LinkInfo {
            name: name.clone(),
            rate_bps: spec.rate_bps,
            measured_bps: measured,
            shaping: link.describe(),
        };
        let cap_bps = (spec.rate_bps as f64 * o.cap) as u64;
        let osetup = OursSetup {
            exe: exe.to_path_buf(),
            mem: o.mem,
            vcpus: o.vcpus,
            host_page: o.host_page,
            pace_bps: cap_bps,
            seed: o.seed,
            stream_rate: o.stream_rate,
            cursors: o.cursors,
            lowat: o.lowat.clone(),
            pin: o.pin,
            workdir: o.workdir.0.clone(),
            port: PAGEHINT_PORT,
        };
        let mut sources = Vec::new();
        if !o.modes.is_empty() {
            for &t in &o.transports {
                sources.push(ours::Source::start(&link, &osetup, t)?);
            }
        }
        let on = OnLink {
            sources,
            osetup,
            o,
            qemus,
            disks,
            name,
            rate_bps: spec.rate_bps,
            cap_bps,
            link,
        };
        Ok((on, info))
    }

    /// How QEMU `binary` runs on this link.
    fn qemu_setup(&self, binary: &Path) -> QemuSetup {
        let o = self.o;
        QemuSetup {
            binary: binary.to_path_buf(),
            mem: o.mem,
            vcpus: o.vcpus,
            host_page: o.host_page,
            cap_bps: self.cap_bps,
            settle: o.settle,
            workdir: o.workdir.0.clone(),
            port: QEMU_PORT,
            pin: if o.pin { PinPlan::auto() } else { PinPlan::OFF },
        }
    }

    /// Repeat `rep`: for each workload, QEMU's runs and pagehint's, QEMU first in even
    /// repeats and pagehint first (transports reversed) in odd ones.
    fn repeat(&self, rep: u32, record: &mut dyn FnMut(SideRow)) {
        let flip = rep % 2 == 1;
        let mut transports = self.o.transports.clone();
        if flip {
            transports.reverse();
        }
        for (&w, disk) in self.o.workloads.iter().zip(self.disks) {
            if flip {
                self.ours_runs(rep, &transports, w, record);
                self.qemu_runs(rep, &transports, w, disk, record);
            } else {
                self.qemu_runs(rep, &transports, w, disk, record);
                self.ours_runs(rep, &transports, w, record);
            }
        }
    }

    /// Every QEMU's runs of workload `w` in each QEMU mode, on each transport (QEMU < 10.1
    /// on its own only, traced).
    fn qemu_runs(
        &self,
        rep: u32,
        transports: &[Transport],
        w: Workload,
        disk: &Path,
        record: &mut dyn FnMut(SideRow),
    ) {
        for q in self.qemus {
            let setup = self.qemu_setup(&q.binary);
            let ts: Vec<Transport> = if q.hint {
                transports.to_vec()
            } else {
                vec![Transport::Qemu]
            };
            for &m in &self.o.qemu_modes {
                for &t in &ts {
                    let pre = preload(self.o, self.cap_bps, m, t);
                    let run = QemuRun {
                        mode: m,
                        disk,
                        trace: !q.hint,
                        preload: pre.as_ref(),
                    };
                    let k = RunKey {
                        repeat: rep,
                        link: &self.name,
                        rate_bps: self.rate_bps,
                        peer: &q.label,
                        mode: m.name(),
                        transport: t,
                        workload: w.name(),
                        traced: !q.hint,
                    };
                    record(match peer::migrate(&self.link, &setup, &run) {
                        Ok(out) => SideRow::qemu(&k, &out),
                        Err(e) => SideRow::failed(&k, e.to_string()),
                    });
                }
            }
        }
    }

    /// pagehint's runs of workload `w` in each of its modes, on each transport.
    fn ours_runs(
        &self,
        rep: u32,
        transports: &[Transport],
        w: Workload,
        record: &mut dyn FnMut(SideRow),
    ) {
        for &m in &self.o.modes {
            for &t in transports {
                let Some(src) = self.sources.iter().find(|s| s.transport() == t) else {
                    continue;
                };
                let k = RunKey {
                    repeat: rep,
                    link: &self.name,
                    rate_bps: self.rate_bps,
                    peer: "pagehint",
                    mode: m.name(),
                    transport: t,
                    workload: w.name(),
                    traced: false,
                };
                record(match ours::migrate(&self.link, &self.osetup, src, m, w) {
                    Ok(out) => SideRow::pagehint(&k, &out),
                    Err(e) => SideRow::failed(&k, e.to_string()),
                });
            }
        }
    }

    /// What tracing costs each QEMU in repeat `rep`, paired with its rows among `rows`.
    fn trace_probes(&self, rep: u32, rows: &[SideRow]) -> Vec<TraceProbe> {
        let mut probes = Vec::new();
        for q in self.qemus {
            let setup = self.qemu_setup(&q.binary);
            if let Some(p) = trace_probe(
                self.o, &self.link, &self.name, rep, q, &setup, self.disks, rows,
            ) {
                probes.push(p);
            }
        }
        probes
    }
}

/// The comparison's setup, in words.
fn setup_text(o: &CompareOptions) -> String {
    format!(
        "KVM guest, {} vCPU{}, {} MiB, {} host pages, pure postcopy; {} repeat{} (peer order alternating); both capped at {:.0}% of the link rate; transports: QEMU's (max-bandwidth and max-postcopy-bandwidth: a 100 ms-window rate limiter at line rate; pagehint: the same limiter, --qemu-rate-limit) and pagehint's (kernel pacing at the cap, {} in preempt modes; QEMU: the pace-preload library on its sockets); preempt-hints' cursors: runs of {} pages, {} cursor claims per linear step; threads {}",
        o.vcpus,
        if o.vcpus == 1 { "" } else { "s" },
        o.mem >> 20,
        match o.host_page {
            HostPageSize::Small => "4 KiB",
            HostPageSize::Huge2M => "2 MiB (hugetlb)",
        },
        o.repeat,
        if o.repeat == 1 { "" } else { "s" },
        o.cap * 100.0,
        match o.lowat_bytes {
            0 => "no bound on unsent bytes".to_string(),
            b if b % (1 << 20) == 0 => format!("at most {} MiB unsent", b >> 20),
            b => format!("at most {} KiB unsent", b.div_ceil(1 << 10)),
        },
        o.cursors.run,
        o.cursors.share,
        if o.pin {
            "pinned alike (vCPU 0 + fault path on one CPU, bulk streams on the other, further vCPUs floating over both)"
        } else {
            "not pinned"
        },
    )
}

/// Runs the comparison; `exe` is this `pagehint-migrate`, `line` receives each run.
pub fn run(
    o: &CompareOptions,
    exe: &Path,
    mut line: impl FnMut(&SideRow),
) -> Result<Comparison, QemuError> {
    let started = Instant::now();
    let qemus = qemu_peers(o)?;
    let anchor = anchor(&qemus);
    let (_huge, disks) = prepare_guests(o)?;
    let mut rows = Vec::new();
    let mut probes = Vec::new();
    let mut links = Vec::new();
    for &spec in &o.links {
        let (on, info) = OnLink::start(o, exe, spec, &qemus, &disks)?;
        links.push(info);
        for rep in 0..o.repeat {
            on.repeat(rep, &mut |row: SideRow| {
                line(&row);
                rows.push(row);
            });
            if o.trace_cost {
                probes.extend(on.trace_probes(rep, &rows));
            }
        }
    }
    let targets = anchor
        .as_ref()
        .map(|a| side::targets(&rows, a))
        .unwrap_or_default();
    let splits = anchor
        .as_ref()
        .map(|a| side::splits(&rows, a))
        .unwrap_or_default();
    Ok(Comparison {
        qemus: qemus.iter().map(|q| q.info.clone()).collect(),
        anchor,
        setup: setup_text(o),
        links,
        series: side::series(&rows),
        rows,
        probes,
        splits,
        targets,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The preload of QEMU on transport `t` (None: QEMU's own): pacing at the cap, and in
/// preempt mode the unsent-bytes bound pagehint's preempt modes use.
fn preload(o: &CompareOptions, cap_bps: u64, m: QemuMode, t: Transport) -> Option<Preload> {
    (t == Transport::Pagehint).then(|| Preload {
        library: o.preload.clone(),
        pace_bps: cap_bps,
        lowat: if m == QemuMode::Preempt {
            o.lowat_bytes
        } else {
            0
        },
    })
}

/// One run of `q` with its tracing flipped, paired with its regular run of this repeat
/// (QEMU's transport; preempt and random where they ran, else the first mode and workload).
#[allow(clippy::too_many_arguments)]
fn trace_probe(
    o: &CompareOptions,
    link: &ShapedLink,
    name: &str,
    rep: u32,
    q: &QemuPeer,
    setup: &QemuSetup,
    disks: &[PathBuf],
    rows: &[SideRow],
) -> Option<TraceProbe> {
    let mode = if o.qemu_modes.contains(&QemuMode::Preempt) {
        QemuMode::Preempt
    } else {
        *o.qemu_modes.first()?
    };
    let wi = o
        .workloads
        .iter()
        .position(|&w| w == Workload::Random)
        .unwrap_or(0);
    let w = *o.workloads.get(wi)?;
    let regular = rows.iter().find(|r| {
        r.repeat == rep
            && r.link == name
            && r.peer == q.label
            && r.mode == mode.name()
            && r.transport == Transport::Qemu
            && r.workload == w.name()
    })?;
    let run = QemuRun {
        mode,
        disk: &disks[wi],
        trace: q.hint,
        preload: None,
    };
    let out: Result<QemuOutcome, QemuError> = peer::migrate(link, setup, &run);
    let mut p = TraceProbe {
        link: name.into(),
        repeat: rep,
        peer: q.label.clone(),
        mode: mode.name().into(),
        workload: w.name().into(),
        span_ms: (None, None),
        blocktime_ms: (0.0, 0.0),
        requests: (0, 0),
        qmp_latency: None,
        trace_latency: None,
        error: None,
    };
    let out = match out {
        Ok(x) => x,
        Err(e) => {
            p.error = Some(e.to_string());
            return Some(p);
        }
    };
    if q.hint {
        // The regular row is untraced; this run traced.
        p.span_ms = (regular.span_ms, out.span_ms);
        p.blocktime_ms = (regular.blocktime_ms, out.blocktime_ms);
        p.requests = (regular.requests, out.requests);
        p.qmp_latency = out.qmp_latency.clone();
        p.trace_latency = out.trace_latency.clone();
    } else {
        // The regular row is traced; this run not.
        p.span_ms = (out.span_ms, regular.span_ms);
        p.blocktime_ms = (out.blocktime_ms, regular.blocktime_ms);
        p.requests = (out.requests, regular.requests);
        p.trace_latency = regular.latency.clone();
    }
    if !regular.completed {
        p.error = Some(format!(
            "the regular run failed: {}",
            regular.error.as_deref().unwrap_or("?")
        ));
    }
    Some(p)
}

/// What a comparison's JSON holds of its runs (the derived tables are derived again).
#[derive(Deserialize)]
struct Recorded {
    qemus: Vec<QemuInfo>,
    anchor: Option<Anchor>,
    setup: String,
    links: Vec<LinkInfo>,
    rows: Vec<SideRow>,
    probes: Vec<TraceProbe>,
    seconds: f64,
}

/// The comparison of the runs recorded in a JSON document this command wrote
/// (`--from-json`): medians, splits and targets derived again, nothing run.
pub fn rederive(json: &str) -> Result<Comparison, QemuError> {
    let r: Recorded = serde_json::from_str(json)
        .map_err(|e| QemuError::Protocol(format!("not a compare-qemu JSON document: {e}")))?;
    let targets = r
        .anchor
        .as_ref()
        .map(|a| side::targets(&r.rows, a))
        .unwrap_or_default();
    let splits = r
        .anchor
        .as_ref()
        .map(|a| side::splits(&r.rows, a))
        .unwrap_or_default();
    Ok(Comparison {
        qemus: r.qemus,
        anchor: r.anchor,
        setup: r.setup,
        links: r.links,
        series: side::series(&r.rows),
        rows: r.rows,
        probes: r.probes,
        splits,
        targets,
        seconds: r.seconds,
    })
}
