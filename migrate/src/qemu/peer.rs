//! QEMU as the peer: one postcopy migration of the harness's guest between two QEMU
//! processes, one in each namespace of a [`ShapedLink`].
//!
//! # Protocol of one run
//! 1. Start the source QEMU (KVM, [`QemuSetup::vcpus`] vCPUs, the guest's boot disk; with
//!    2 MiB host pages guest RAM is a `memory-backend-memfd` with `hugetlb=on`, as pagehint's
//!    `--host-page 2M` maps its RAM from hugetlb) and the destination QEMU
//!    (`-incoming defer`; with [`QemuRun::trace`], the request-only trace events of
//!    [`super::trace`]); with [`QemuRun::preload`], both under the pace-preload library
//!    (pagehint's transport on QEMU's sockets). A sampler reads the CPU time of every thread
//!    of both processes from here on ([`super::cpu`]) and pins QEMU's threads by name.
//! 2. Wait until the guest has built its image and every vCPU runs its workload (each vCPU's
//!    status page, read with `pmemsave`, counts its operations), then let it run for the
//!    settle time.
//! 3. Enable `postcopy-ram` (and `postcopy-preempt`) and `events` on both sides and
//!    `postcopy-blocktime` on the destination; cap the source with `max-bandwidth` **and**
//!    `max-postcopy-bandwidth` (the first alone does not cap postcopy).
//! 4. `migrate-incoming` on the destination, `migrate` then at once `migrate-start-postcopy`
//!    on the source (pure postcopy: like the harness with `--precopy-rounds 0`).
//! 5. Poll `query-migrate` on the source until `completed` (or `failed`), then on the
//!    destination until `completed`; read both, and the `MIGRATION` events' time stamps.
//! 6. Check that the guest still runs on the destination: **every** vCPU's status page says
//!    running with no failed check, and every vCPU's operation count grows.
//! 7. `quit` both (killed if they do not); read the trace and the preload's log.
//!
//! # Figures
//! * **span** (the total time compared with pagehint's): the source's `STOP` event (its
//!   vCPUs stopped: the switch-over) → the destination's `MIGRATION` `completed` event (its
//!   listen thread has loaded the last page). Not the source's `postcopy-active`: QEMU 11.1
//!   passes through a new `postcopy-device` state first and enters `postcopy-active` only
//!   when the destination has answered, at times hundreds of milliseconds later (seen here). QMP stamps events with the
//!   host's clock, the same for both processes.
//! * **blocktime**: the destination's `postcopy-blocktime` (every vCPU blocked at once);
//!   **vCPUs blocked**: the sum of its `postcopy-vcpu-blocktime` (one entry per vCPU, each
//!   that vCPU's blocked time); a reply without either, or with another count of vCPUs, is an
//!   error, never a 0. **latency**: [`super::latency`].
//! * **CPU**: the migration threads' run time ([`is_migration_thread`]), not the vCPU's.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cpu::{CpuByThread, ThreadCpu};
use super::latency::{self, Latency};
use super::netns::{End, ShapedLink};
use super::qmp::Qmp;
use super::trace;
use super::QemuError;
use crate::guest::disk::MAILBOX;
use crate::guest::kvm::program::mailbox as mb;
use crate::guest::kvm::GuestCounters;
use crate::guest::layout::{HostPageSize, TARGET_PAGE};
use crate::names::named_enum;
use crate::sys::pin::{PinPlan, Role};

named_enum!(
    /// QEMU's two postcopy modes.
    QemuMode, "QEMU mode" {
        /// `postcopy-ram`: urgent pages share the migration stream.
        Vanilla = 0, "vanilla";
        /// `postcopy-ram` + `postcopy-preempt`: urgent pages on their own channel (with the
        /// page hint from QEMU 10.1 on).
        Preempt = 1, "preempt";
    }
);

/// How long the destination's guest has to show its operation count growing after the
/// migration before it counts as not alive.
const ALIVE_WITHIN: Duration = Duration::from_secs(5);

/// How QEMU runs, for every run on a link.
#[derive(Clone, Debug)]
pub struct QemuSetup {
    /// `qemu-system-x86_64` (or the wrapper of a private prefix).
    pub binary: PathBuf,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// vCPUs (`-smp`).
    pub vcpus: u32,
    /// Host page size of guest RAM: 2 MiB puts it on hugetlb.
    pub host_page: HostPageSize,
    /// Bandwidth cap, bits/s (`max-bandwidth` and `max-postcopy-bandwidth`).
    pub cap_bps: u64,
    /// How long the guest runs at the source before migrating.
    pub settle: Duration,
    /// Where sockets, logs, traces and status snapshots go.
    pub workdir: PathBuf,
    /// TCP port of the migration on the destination.
    pub port: u16,
    /// Where QEMU's threads run: the harness's plan, by thread name (see [`qemu_role`]).
    pub pin: PinPlan,
}

/// pagehint's transport for QEMU: the pace-preload library and what it sets.
#[derive(Clone, Debug)]
pub struct Preload {
    /// `libpagehint_pace_preload.so`.
    pub library: PathBuf,
    /// `SO_MAX_PACING_RATE`, bits/s.
    pub pace_bps: u64,
    /// `TCP_NOTSENT_LOWAT`, bytes (0: not set).
    pub lowat: u64,
}

/// What varies between QEMU runs on a link.
#[derive(Clone, Debug)]
pub struct QemuRun<'a> {
    /// The mode.
    pub mode: QemuMode,
    /// The guest's boot disk.
    pub disk: &'a Path,
    /// Trace the destination's requests (one write per request; for latency where QMP has
    /// none, or to measure what tracing costs).
    pub trace: bool,
    /// pagehint's transport on QEMU's sockets (None: QEMU's own).
    pub preload: Option<&'a Preload>,
}

/// What one QEMU migration measured.
#[derive(Clone, Debug, Default)]
pub struct QemuOutcome {
    /// Source `query-migrate` `total-time`, ms (migrate → completed at the source).
    pub total_ms: f64,
    /// Source `STOP` event → destination `completed` event, ms.
    pub span_ms: Option<f64>,
    /// Source `downtime`, ms.
    pub downtime_ms: f64,
    /// Source `ram.precopy-bytes`.
    pub precopy_bytes: u64,
    /// Source `ram.postcopy-bytes`.
    pub postcopy_bytes: u64,
    /// Source `ram.postcopy-requests`.
    pub requests: u64,
    /// Destination `postcopy-blocktime`, ms.
    pub blocktime_ms: f64,
    /// Destination `postcopy-vcpu-blocktime`, ms, one per vCPU.
    pub vcpu_blocktime_ms: Vec<f64>,
    /// QEMU's own latency figures (QEMU ≥ 10.1).
    pub qmp_latency: Option<Latency>,
    /// From the destination's request trace, when traced.
    pub trace_latency: Option<Latency>,
    /// CPU time of the migration threads of both processes, ms, by `src:`/`dst:` name.
    pub cpu: CpuByThread,
    /// CPU time of every other thread (the vCPUs among them), for the record.
    pub cpu_other: CpuByThread,
    /// Sockets the preload library configured (source, destination), from its log.
    pub preloaded_sockets: (u64, u64),
    /// Guest operations per second at the source before migrating.
    pub ops_before_per_s: f64,
    /// Guest operations per second from `migrate` to completion.
    pub ops_postcopy_per_s: f64,
    /// Guest operations per second at the destination after completion.
    pub ops_after_per_s: f64,
    /// Failed guest checks (source and destination).
    pub guest_errors: u64,
    /// The guest runs on the destination after the migration, without failed checks.
    pub guest_alive: bool,
    /// QEMU threads pinned (by name), both processes.
    pub pinned_threads: Vec<String>,
    /// The source's full `query-migrate` reply.
    pub source_info: Value,
    /// The destination's full `query-migrate` reply.
    pub dest_info: Value,
}

/// A QEMU process, killed on drop if still running.
struct Proc {
    child: Child,
    side: &'static str,
    log: PathBuf,
}

impl Proc {
    /// Quits QEMU (over `qmp` when given) and waits up to 5 s for it to exit.
    fn finish(mut self, qmp: Option<&mut Qmp>) {
        if let Some(q) = qmp {
            let _ = q.execute("quit", json!({}));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An error with the end of its log if QEMU has exited.
    fn check_alive(&mut self) -> Result<(), QemuError> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                Err(QemuError::Exited(format!(
                    "the {} QEMU exited ({status}): {}",
                    self.side,
                    log.lines().rev().take(4).collect::<Vec<_>>().join(" | ")
                )))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `qemu-system-x86_64 --version`'s first line, e.g. `QEMU emulator version 10.0.2 (...)`.
pub fn version(binary: &Path) -> Result<String, QemuError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| {
            QemuError::Setup(format!(
                "{} does not run ({e}); scripts/install-deps.sh installs QEMU 10.0 (system) and QEMU 11.1 (.deps/qemu-11.1)",
                binary.display()
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim();
    // A wrapper left pointing at a removed prefix runs, fails and prints nothing: refused
    // here, before a run starts, rather than labelled "unknown" and failing every run.
    if !out.status.success() || !line.contains("version") {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(QemuError::Setup(format!(
            "{} --version failed ({}): {}; scripts/install-deps.sh installs QEMU 10.0 (system) and QEMU 11.1 (.deps/qemu-11.1)",
            binary.display(),
            out.status,
            err.lines().last().unwrap_or("no output").trim()
        )));
    }
    Ok(line.to_string())
}

/// `10.0.2` from a `--version` line.
pub fn short_version(line: &str) -> String {
    line.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or("?")
        .to_string()
}

/// Starts the QEMU of `end` in its namespace; returns it and its QMP socket's path.
fn start(
    link: &ShapedLink,
    setup: &QemuSetup,
    end: End,
    disk: &Path,
    extra: &[String],
    preload: Option<(&Preload, &Path)>,
) -> Result<(Proc, PathBuf), QemuError> {
    let side = match end {
        End::Source => "source",
        End::Destination => "destination",
    };
    let sock = setup.workdir.join(format!("{side}.qmp"));
    let _ = std::fs::remove_file(&sock);
    let log = setup.workdir.join(format!("{side}.log"));
    let out =
        File::create(&log).map_err(|e| QemuError::Io(format!("creating {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| QemuError::Io("log".into(), e))?;
    let mut c = link.command(end, &setup.binary);
    if let Some((p, plog)) = preload {
        c.env("LD_PRELOAD", &p.library)
            .env("PAGEHINT_PACE_BPS", p.pace_bps.to_string())
            .env("PAGEHINT_PRELOAD_LOG", plog);
        if p.lowat > 0 {
            c.env("PAGEHINT_NOTSENT_LOWAT", p.lowat.to_string());
        }
    }
    let mib = setup.mem >> 20;
    c.args(["-name", &format!("pagehint-{side},debug-threads=on")]);
    match setup.host_page {
        HostPageSize::Small => c.args(["-machine", "pc"]),
        // QEMU postcopy on hugetlb: RAM is one memfd of 2 MiB pages (shared, as QEMU's
        // postcopy on hugetlb needs), each placed whole by UFFDIO_COPY.
        HostPageSize::Huge2M => c
            .args(["-machine", "pc,memory-backend=ram", "-object"])
            .arg(format!(
                "memory-backend-memfd,id=ram,size={mib}M,hugetlb=on,hugetlbsize=2M,share=on"
            )),
    };
    c.args(["-accel", "kvm", "-cpu", "host"])
        .args(["-m", &format!("{mib}M"), "-smp", &setup.vcpus.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=ide,snapshot=on",
            disk.display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = c
        .spawn()
        .map_err(|e| QemuError::Io(format!("starting the {side} QEMU"), e))?;
    Ok((Proc { child, side, log }, sock))
}

/// The harness's thread roles of QEMU's threads, by the names `-name ...,debug-threads=on`
/// gives them: the first vCPU and the fault path (fault thread, preempt-channel receiver, return
/// path, which in postcopy-preempt sends the urgent pages itself) on the fault CPU, the other
/// vCPUs floating over both CPUs, the bulk
/// streams (migration thread, the destination's listen thread that loads the main stream)
/// on the bulk CPU, as [`crate::sys::pin`] places pagehint's.
pub fn qemu_role(thread: &str) -> Option<Role> {
    Some(match thread {
        // vCPU 0 as pagehint's first vCPU; the others float over both CPUs as pagehint's do.
        "CPU 0/KVM" => Role::Guest,
        t if is_vcpu_thread(t) => Role::ExtraVcpu,
        "mig/dst/fault" => Role::FaultThread,
        "mig/dst/preempt" => Role::UrgentReceiver,
        "mig/src/return" => Role::ReturnPath,
        "mig/src/main" => Role::BackgroundSender,
        "mig/dst/listen" => Role::BackgroundReceiver,
        _ => return None,
    })
}

/// Whether a QEMU thread is a vCPU's (`CPU <i>/KVM`).
fn is_vcpu_thread(name: &str) -> bool {
    name.strip_prefix("CPU ")
        .and_then(|t| t.strip_suffix("/KVM"))
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a QEMU thread is one of the migration threads compared: the `mig/...` threads
/// (source: the migration thread, which sends the main stream, and the return path, which
/// reads requests and, in preempt mode, sends urgent pages; destination: the fault thread,
/// the preempt channel's receiver, and the listen thread, which loads the main stream in
/// postcopy). Not the vCPUs, not the I/O and RCU helpers, and not the main threads: the
/// destination's loads the device state and registers and discards guest RAM before the
/// listen thread takes over, the source's runs QMP — as pagehint's main threads do their
/// equivalents (and the harness's verification), which are not counted either. Their CPU
/// time is kept apart (`cpu_other`, `src:main` and `dst:main`).
pub fn is_migration_thread(name: &str) -> bool {
    name.starts_with("mig/")
}

/// Pins, by [`qemu_role`], the threads of `pids` not pinned yet; adds their names to `done`.
fn pin_new(plan: PinPlan, pids: &[u32], done: &mut Vec<(u32, String)>) {
    for &pid in pids {
        for tid in super::cpu::tids(pid) {
            if done.iter().any(|(d, _)| *d == tid) {
                continue;
            }
            let name =
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            let name = name.trim();
            if let Some(role) = qemu_role(name) {
                let id = rustix::thread::Pid::from_raw(tid as i32);
                if plan.apply_to(id, role) {
                    done.push((tid, name.to_string()));
                }
            }
        }
    }
}

/// Lines of the preload library's log written by process `pid` (sockets it configured).
fn preloaded(log: &str, pid: u32) -> u64 {
    log.lines()
        .filter(|l| l.split_whitespace().next() == Some(&pid.to_string()))
        .count() as u64
}

/// The time stamp, µs since the epoch, of the first `event` (with `status`, for
/// `MIGRATION`).
fn event_us(events: &[Value], event: &str, status: Option<&str>) -> Option<u64> {
    events
        .iter()
        .filter(|e| e["event"] == event && status.is_none_or(|s| e["data"]["status"] == s))
        .filter_map(|e| {
            let t = &e["timestamp"];
            Some(t["seconds"].as_u64()? * 1_000_000 + t["microseconds"].as_u64()?)
        })
        .next()
}

/// Every vCPU's status page (vCPU `i`'s at [`MAILBOX`] + `i` pages), read in one
/// `pmemsave`.
#[derive(Clone, Debug)]
struct StatusPages(Vec<GuestCounters>);

impl StatusPages {
    /// Operations of all vCPUs.
    fn ops(&self) -> u64 {
        self.0.iter().map(|c| c.ops).sum()
    }

    /// Failed checks of all vCPUs.
    fn errors(&self) -> u64 {
        self.0.iter().map(|c| c.errors).sum()
    }

    /// Every vCPU runs its workload.
    fn all_running(&self) -> bool {
        self.0.iter().all(|c| c.state == mb::RUNNING)
    }

    /// Every vCPU's operation count is above its count in `before`.
    fn all_grew_since(&self, before: &Self) -> bool {
        self.0.len() == before.0.len() && self.0.iter().zip(&before.0).all(|(b, a)| b.ops > a.ops)
    }

    /// `vCPU 0 state 0x1 ops 12 errors 0; vCPU 1 ...`.
    fn describe(&self) -> String {
        self.0
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "vCPU {i} state {:#x} ops {} errors {}",
                    c.state, c.ops, c.errors
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Every vCPU's status page on `side`, read with `pmemsave` into the work directory.
fn status_pages(
    q: &mut Qmp,
    workdir: &Path,
    side: &str,
    vcpus: u32,
) -> Result<StatusPages, QemuError> {
    let file = workdir.join(format!("{side}-status.bin"));
    let size = u64::from(vcpus) * TARGET_PAGE;
    q.execute(
        "pmemsave",
        json!({"val": MAILBOX, "size": size, "filename": file.to_string_lossy()}),
    )?;
    let pages = std::fs::read(&file)
        .map_err(|e| QemuError::Io(format!("reading {}", file.display()), e))?;
    if pages.len() < size as usize {
        return Err(QemuError::Protocol(format!(
            "pmemsave wrote {} bytes of {vcpus} status pages",
            pages.len()
        )));
    }
    Ok(StatusPages(
        pages
            .chunks_exact(TARGET_PAGE as usize)
            .map(|page| {
                GuestCounters::decode(|o| {
                    let o = o as usize;
                    u64::from_le_bytes(page[o..o + 8].try_into().expect("8 bytes"))
                })
            })
            .collect(),
    ))
}

/// The destination's blocktime figures: `postcopy-blocktime` and one
/// `postcopy-vcpu-blocktime` entry per vCPU, ms; missing ones are an error, not a 0.
fn blocktimes(dest_info: &Value, vcpus: u32) -> Result<(f64, Vec<f64>), QemuError> {
    let total = dest_info["postcopy-blocktime"].as_f64().ok_or_else(|| {
        QemuError::Protocol(format!(
            "the destination's query-migrate has no postcopy-blocktime: {dest_info}"
        ))
    })?;
    let per: Option<Vec<f64>> = dest_info["postcopy-vcpu-blocktime"]
        .as_array()
        .and_then(|v| v.iter().map(Value::as_f64).collect());
    match per {
        Some(v) if v.len() == vcpus as usize => Ok((total, v)),
        _ => Err(QemuError::Protocol(format!(
            "the destination's query-migrate has no postcopy-vcpu-blocktime for {vcpus} vCPUs: {}",
            dest_info["postcopy-vcpu-blocktime"]
        ))),
    }
}

/// The number at `path` in a QMP reply, 0 where there is none.
fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64().unwrap_or(0.0)
}

/// The destination's extra arguments: the trace events when traced, then `-incoming defer`.
fn dest_args(run: &QemuRun<'_>, trace_file: &Path) -> Vec<String> {
    let mut dest_args: Vec<String> = Vec::new();
    if run.trace {
        for e in trace::EVENTS {
            dest_args.push("-trace".into());
            dest_args.push(format!("enable={e}"));
        }
        dest_args.extend([
            "-D".to_string(),
            trace_file.to_string_lossy().into_owned(),
            "-msg".into(),
            "timestamp=on".into(),
        ]);
    }
    dest_args.extend(["-incoming".into(), "defer".into()]);
    dest_args
}

/// Samples the CPU time of every thread of `pids` and, unless `plan` is off, pins QEMU's
/// threads as they appear; returns the sampler and the names of the threads pinned so far.
fn sample_and_pin(plan: PinPlan, pids: [u32; 2]) -> (ThreadCpu, Arc<Mutex<Vec<String>>>) {
    let mut pinned = Vec::new();
    let pinned_names = Arc::new(Mutex::new(Vec::new()));
    let names2 = Arc::clone(&pinned_names);
    let cpu = ThreadCpu::start(pids.to_vec(), move || {
        if plan != PinPlan::OFF {
            pin_new(plan, &pids, &mut pinned);
            *names2.lock().unwrap_or_else(|p| p.into_inner()) = pinned
                .iter()
                .map(|(_, n)| n.clone())
                .collect::<Vec<String>>();
        }
    });
    (cpu, pinned_names)
}

/// The source `STOP` event → the destination `MIGRATION` `completed` event, ms.
fn span_ms(source_events: &[Value], dest_events: &[Value]) -> Option<f64> {
    match (
        event_us(source_events, "STOP", None),
        event_us(dest_events, "MIGRATION", Some("completed")),
    ) {
        (Some(a), Some(b)) if b >= a => Some((b - a) as f64 / 1e3),
        _ => None,
    }
}

/// What step 6 saw of the guest.
struct Liveness {
    /// Guest operations per second from `migrate` to completion.
    ops_postcopy_per_s: f64,
    /// Guest operations per second at the destination after completion.
    ops_after_per_s: f64,
    /// Failed guest checks (source and destination).
    guest_errors: u64,
    /// The guest runs on the destination, without failed checks.
    guest_alive: bool,
}

/// The two QEMU processes of a run, their QMP connections and the sampler of their
/// threads (fields in the order they are dropped).
struct Peers {
    /// The destination's QMP connection.
    d: Qmp,
    /// The source's QMP connection.
    s: Qmp,
    /// CPU time of every thread of both processes; pins QEMU's threads too.
    cpu: ThreadCpu,
    /// Names of the threads pinned so far (written by the sampler).
    pinned: Arc<Mutex<Vec<String>>>,
    /// QEMU's pids, source then destination.
    pids: [u32; 2],
    /// The destination QEMU.
    dst: Proc,
    /// The source QEMU.
    src: Proc,
}

impl Peers {
    /// Step 1: starts both QEMUs and the sampler and pinner of their threads, and connects
    /// to their QMP sockets.
    fn launch(
        link: &ShapedLink,
        setup: &QemuSetup,
        run: &QemuRun<'_>,
        trace_file: &Path,
        preload_log: &Path,
    ) -> Result<Self, QemuError> {
        let dest_args = dest_args(run, trace_file);
        let preload = run.preload.map(|p| (p, preload_log));
        let (src, src_sock) = start(link, setup, End::Source, run.disk, &[], preload)?;
        let (dst, dst_sock) = start(link, setup, End::Destination, run.disk, &dest_args, preload)?;
        // `ip netns exec` execs QEMU (and the wrapper of a private prefix execs it too): the
        // child's pid is QEMU's.
        let pids = [src.child.id(), dst.child.id()];
        let (cpu, pinned) = sample_and_pin(setup.pin, pids);
        let wait = Duration::from_secs(10);
        let s = Qmp::connect(&src_sock, "source", wait)?;
        let d = Qmp::connect(&dst_sock, "destination", wait)?;
        Ok(Peers {
            d,
            s,
            cpu,
            pinned,
            pids,
            dst,
            src,
        })
    }

    /// The source's status pages.
    fn source_pages(&mut self, setup: &QemuSetup) -> Result<StatusPages, QemuError> {
        status_pages(&mut self.s, &setup.workdir, "source", setup.vcpus)
    }

    /// The destination's status pages.
    fn dest_pages(&mut self, setup: &QemuSetup) -> Result<StatusPages, QemuError> {
        status_pages(&mut self.d, &setup.workdir, "destination", setup.vcpus)
    }

    /// Step 2: waits until the guest has built its image (about 10 s per GiB here) and runs
    /// its workload on every vCPU, then for the settle time; returns the status pages then
    /// and the operations per second over the settle time.
    fn settle(&mut self, setup: &QemuSetup) -> Result<(StatusPages, f64), QemuError> {
        let boot_limit = Duration::from_secs(30 + 60 * (setup.mem >> 30).max(1));
        let t = Instant::now();
        let first = loop {
            self.src.check_alive()?;
            let c = self.source_pages(setup)?;
            if c.all_running() && c.0.iter().all(|v| v.ops > 0) {
                break c;
            }
            if t.elapsed() > boot_limit {
                return Err(QemuError::Timeout(format!(
                    "the guest did not start its workload on every vCPU within {boot_limit:?} ({})",
                    c.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let t0 = Instant::now();
        std::thread::sleep(setup.settle);
        let before = self.source_pages(setup)?;
        let ops_before_per_s =
            before.ops().saturating_sub(first.ops()) as f64 / t0.elapsed().as_secs_f64();
        Ok((before, ops_before_per_s))
    }

    /// Step 3: the capabilities on both sides and the bandwidth cap on the source.
    fn configure(&mut self, setup: &QemuSetup, mode: QemuMode) -> Result<(), QemuError> {
        let mut caps = vec![
            json!({"capability": "postcopy-ram", "state": true}),
            json!({"capability": "events", "state": true}),
        ];
        if mode == QemuMode::Preempt {
            caps.push(json!({"capability": "postcopy-preempt", "state": true}));
        }
        self.s
            .execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        let mut dcaps = caps.clone();
        dcaps.push(json!({"capability": "postcopy-blocktime", "state": true}));
        self.d
            .execute("migrate-set-capabilities", json!({ "capabilities": dcaps }))?;
        let cap = setup.cap_bps / 8;
        self.s.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": cap, "max-postcopy-bandwidth": cap}),
        )?;
        Ok(())
    }

    /// Step 4: pure postcopy; returns when `migrate` was issued.
    fn start_postcopy(
        &mut self,
        link: &ShapedLink,
        setup: &QemuSetup,
    ) -> Result<Instant, QemuError> {
        self.d.execute(
            "migrate-incoming",
            json!({"uri": format!("tcp:{}:{}", link.ip(End::Destination), setup.port)}),
        )?;
        // The migration threads start now; the main threads and vCPUs count from here.
        self.cpu.rebase(&self.pids);
        let t_migrate = Instant::now();
        self.s.execute(
            "migrate",
            json!({"uri": format!("tcp:{}:{}", link.ip(End::Destination), setup.port)}),
        )?;
        self.s.execute("migrate-start-postcopy", json!({}))?;
        Ok(t_migrate)
    }

    /// Step 5: polls the source, then the destination, until each reports completion;
    /// returns their `query-migrate` replies.
    fn wait_completed(&mut self, setup: &QemuSetup) -> Result<(Value, Value), QemuError> {
        let limit = Duration::from_secs_f64(
            30.0 + 4.0 * (setup.mem as f64 * 8.0) / (setup.cap_bps.max(1) as f64),
        );
        let t = Instant::now();
        let source_info = loop {
            let q = self.s.execute("query-migrate", json!({}))?;
            match q["status"].as_str() {
                Some("completed") => break q,
                Some("failed") | Some("cancelled") => {
                    return Err(QemuError::Exited(format!(
                        "the migration {}: {}",
                        q["status"].as_str().unwrap_or("?"),
                        q["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ => {}
            }
            if t.elapsed() > limit {
                return Err(QemuError::Timeout(format!(
                    "the migration did not complete within {limit:?}: {q}"
                )));
            }
            self.dst.check_alive()?;
            std::thread::sleep(Duration::from_millis(20));
        };
        let t = Instant::now();
        let dest_info = loop {
            let q = self.d.execute("query-migrate", json!({}))?;
            if q["status"] == "completed" {
                break q;
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(QemuError::Timeout(format!(
                    "the destination did not report completion: {q}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok((source_info, dest_info))
    }

    /// Stops the sampler (the migration threads have ended; what they ran is in); returns
    /// the CPU time of the migration threads and that of every other thread.
    fn cpu_time(&mut self) -> (CpuByThread, CpuByThread) {
        self.cpu.stop();
        let pids = self.pids;
        let key = |mig: bool| {
            move |pid: u32, tid: u32, name: &str| {
                let dest = pid == pids[1];
                let main = tid == pid;
                (is_migration_thread(name) == mig).then(|| {
                    let side = if dest { "dst" } else { "src" };
                    format!("{side}:{}", if main { "main" } else { name })
                })
            }
        };
        (self.cpu.now(key(true)), self.cpu.now(key(false)))
    }

    /// Step 6: whether the guest runs on at the destination, and its operations per second
    /// during and after the migration.
    fn liveness(
        &mut self,
        setup: &QemuSetup,
        mode: QemuMode,
        t_migrate: Instant,
        before: &StatusPages,
    ) -> Result<Liveness, QemuError> {
        let a = self.dest_pages(setup)?;
        let ta = Instant::now();
        let frozen = self.source_pages(setup)?;
        let ops_postcopy_per_s =
            a.ops().saturating_sub(frozen.ops()) as f64 / (ta - t_migrate).as_secs_f64();
        // Alive: every vCPU running, its operation count growing, no failed check on any.
        // Looked at every 500 ms for up to ALIVE_WITHIN, so that a vCPU a loaded host did not
        // schedule in one look is not taken for a dead guest; a failed check or a stopped VM
        // ends the wait at once.
        let (b, running) = loop {
            std::thread::sleep(Duration::from_millis(500));
            let b = self.dest_pages(setup)?;
            let running = self.d.execute("query-status", json!({}))?;
            let settled = b.errors() != 0 || running["running"] != true || b.all_grew_since(&a);
            if settled || ta.elapsed() >= ALIVE_WITHIN {
                break (b, running);
            }
        };
        let _ = self.s.execute("query-status", json!({}))?;
        let ops_after_per_s = b.ops().saturating_sub(a.ops()) as f64 / ta.elapsed().as_secs_f64();
        let guest_errors = before.errors().max(b.errors());
        let guest_alive = running["running"] == true
            && b.all_running()
            && b.all_grew_since(&a)
            && b.errors() == 0;
        if !guest_alive {
            eprintln!(
                "QEMU {} {}: the guest is not alive at the destination: VM {}, over {:?}: before {}; after {}",
                setup.binary.display(),
                mode,
                running["status"],
                ta.elapsed(),
                a.describe(),
                b.describe(),
            );
        }
        Ok(Liveness {
            ops_postcopy_per_s,
            ops_after_per_s,
            guest_errors,
            guest_alive,
        })
    }

    /// Names of the threads pinned, both processes.
    fn pinned_threads(&self) -> Vec<String> {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Step 7: saves both `query-migrate` replies and both sides' events in the work
    /// directory, then quits both QEMUs.
    fn finish(self, setup: &QemuSetup, source_info: &Value, dest_info: &Value) {
        let Peers {
            mut d,
            mut s,
            dst,
            src,
            ..
        } = self;
        for (side, info) in [("source", source_info), ("destination", dest_info)] {
            let _ = std::fs::write(
                setup.workdir.join(format!("{side}-query-migrate.json")),
                serde_json::to_string_pretty(info).unwrap_or_default(),
            );
        }
        let _ = std::fs::write(
            setup.workdir.join("events.json"),
            serde_json::to_string_pretty(&json!({"source": s.events, "destination": d.events}))
                .unwrap_or_default(),
        );
        src.finish(Some(&mut s));
        dst.finish(Some(&mut d));
    }
}

/// Latency from the destination's request trace (None when not traced); no trace file is
/// no event, an error only if requests were made.
fn trace_latency(
    run: &QemuRun<'_>,
    trace_file: &Path,
    requests: u64,
) -> Result<Option<Latency>, QemuError> {
    if !run.trace {
        return Ok(None);
    }
    let log = match std::fs::read_to_string(trace_file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        r => r.map_err(|e| QemuError::Io(format!("reading {}", trace_file.display()), e))?,
    };
    let t = trace::parse(&log, TARGET_PAGE).map_err(QemuError::Protocol)?;
    Ok(Some(
        latency::from_trace(&t, requests).map_err(QemuError::Protocol)?,
    ))
}

/// Sockets the preload library configured in (source, destination) by its log, (0, 0)
/// without it; an error if it configured none in either.
fn preloaded_sockets(
    run: &QemuRun<'_>,
    preload_log: &Path,
    pids: [u32; 2],
) -> Result<(u64, u64), QemuError> {
    if run.preload.is_none() {
        return Ok((0, 0));
    }
    let log = std::fs::read_to_string(preload_log).unwrap_or_default();
    let n = (preloaded(&log, pids[0]), preloaded(&log, pids[1]));
    if n.0 == 0 || n.1 == 0 {
        return Err(QemuError::Setup(format!(
            "the pace-preload library configured {} source and {} destination sockets: QEMU did not run with pagehint's transport ({})",
            n.0,
            n.1,
            preload_log.display()
        )));
    }
    Ok(n)
}

/// Migrates the guest booted from `run.disk` from one QEMU to another across `link`.
pub fn migrate(
    link: &ShapedLink,
    setup: &QemuSetup,
    run: &QemuRun<'_>,
) -> Result<QemuOutcome, QemuError> {
    let trace_file = setup.workdir.join("destination.trace");
    let _ = std::fs::remove_file(&trace_file);
    let preload_log = setup.workdir.join("preload.log");
    let _ = std::fs::remove_file(&preload_log);
    let mut peers = Peers::launch(link, setup, run, &trace_file, &preload_log)?;
    let (before, ops_before_per_s) = peers.settle(setup)?;
    peers.configure(setup, run.mode)?;
    let t_migrate = peers.start_postcopy(link, setup)?;
    let (source_info, dest_info) = peers.wait_completed(setup)?;
    let (cpu_mig, cpu_other) = peers.cpu_time();
    let live = peers.liveness(setup, run.mode, t_migrate, &before)?;
    let pinned_threads = peers.pinned_threads();
    let span_ms = span_ms(&peers.s.events, &peers.d.events);
    let pids = peers.pids;
    peers.finish(setup, &source_info, &dest_info);
    let requests = num(&source_info, &["ram", "postcopy-requests"]) as u64;
    let (blocktime_ms, vcpu_blocktime_ms) = blocktimes(&dest_info, setup.vcpus)?;
    let qmp_latency = latency::from_qmp(&dest_info, requests).map_err(QemuError::Protocol)?;
    let trace_latency = trace_latency(run, &trace_file, requests)?;
    let preloaded_sockets = preloaded_sockets(run, &preload_log, pids)?;
    Ok(QemuOutcome {
        total_ms: num(&source_info, &["total-time"]),
        span_ms,
        downtime_ms: num(&source_info, &["downtime"]),
        precopy_bytes: num(&source_info, &["ram", "precopy-bytes"]) as u64,
        postcopy_bytes: num(&source_info, &["ram", "postcopy-bytes"]) as u64,
        requests,
        blocktime_ms,
        vcpu_blocktime_ms,
        qmp_latency,
        trace_latency,
        cpu: cpu_mig,
        cpu_other,
        preloaded_sockets,
        ops_before_per_s,
        ops_postcopy_per_s: live.ops_postcopy_per_s,
        ops_after_per_s: live.ops_after_per_s,
        guest_errors: live.guest_errors,
        guest_alive: live.guest_alive,
        pinned_threads,
        source_info,
        dest_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_banner() {
        assert_eq!(
            short_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            "10.0.2"
        );
        assert_eq!(short_version("something else"), "?");
    }

    /// A binary that runs but fails (a wrapper whose prefix was removed) is refused with
    /// what it said, not labelled "unknown" and run.
    #[test]
    fn a_qemu_that_does_not_answer_its_version_is_refused_with_why() {
        let dir =
            std::env::temp_dir().join(format!("pagehint-qemu-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wrapper = dir.join("qemu-system-x86_64");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\necho \"exec: /gone/qemu-system-x86_64.real: not found\" >&2\nexit 127\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let err = version(&wrapper).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.contains("--version failed") && err.contains("not found"),
            "{err}"
        );
        let err = version(Path::new("/nonexistent/qemu"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not run"), "{err}");
    }

    /// QEMU's vCPUs are placed as pagehint's: the first with the fault path, the others
    /// floating over both CPUs (not all on the fault path's CPU, where they would compete
    /// with QEMU's fault thread and not with pagehint's).
    #[test]
    fn vcpu_threads_are_placed_as_pagehints_vcpus() {
        assert_eq!(qemu_role("CPU 0/KVM"), Some(Role::Guest));
        for t in ["CPU 1/KVM", "CPU 15/KVM"] {
            assert_eq!(qemu_role(t), Some(Role::ExtraVcpu), "{t}");
        }
        for t in ["CPU /KVM", "CPU x/KVM", "CPU 1/TCG", "mig/src/main"] {
            assert!(
                !matches!(qemu_role(t), Some(Role::Guest | Role::ExtraVcpu)),
                "{t}"
            );
        }
    }

    #[test]
    fn a_guest_is_alive_only_if_every_vcpu_runs_on() {
        let page = |ops: u64, errors: u64| GuestCounters {
            ops,
            errors,
            state: mb::RUNNING,
            ..GuestCounters::default()
        };
        let before = StatusPages(vec![page(10, 0), page(20, 0)]);
        assert!(StatusPages(vec![page(11, 0), page(21, 0)]).all_grew_since(&before));
        // One vCPU stuck (its operations did not grow), though the sum grew: not alive.
        let stuck = StatusPages(vec![page(50, 0), page(20, 0)]);
        assert!(stuck.ops() > before.ops());
        assert!(!stuck.all_grew_since(&before));
        // Another count of vCPUs is not the same guest.
        assert!(!StatusPages(vec![page(11, 0)]).all_grew_since(&before));
        // A failed check or a stopped workload on any vCPU shows.
        assert_eq!(StatusPages(vec![page(11, 0), page(21, 2)]).errors(), 2);
        let mut done = page(21, 0);
        done.state = mb::RUNNING + 1;
        assert!(!StatusPages(vec![page(11, 0), done]).all_running());
    }

    #[test]
    fn blocktimes_need_one_entry_per_vcpu_and_are_never_made_up() {
        let q = json!({"postcopy-blocktime": 549, "postcopy-vcpu-blocktime": [550, 548]});
        assert_eq!(blocktimes(&q, 2).unwrap(), (549.0, vec![550.0, 548.0]));
        // Another vCPU count, no list, no total: errors, not zeros.
        assert!(blocktimes(&q, 1).is_err());
        assert!(blocktimes(&q, 4).is_err());
        assert!(blocktimes(&json!({"postcopy-blocktime": 549}), 1).is_err());
        assert!(blocktimes(&json!({"postcopy-vcpu-blocktime": [5]}), 1).is_err());
        let e = blocktimes(
            &json!({"postcopy-blocktime": 1, "postcopy-vcpu-blocktime": [1, "x"]}),
            2,
        );
        assert!(e.is_err());
    }

    #[test]
    fn the_span_runs_from_the_source_stop_to_the_destination_completion() {
        // QEMU 11.1.3's events of one run (time stamps shortened).
        let ev = |event: &str, status: Option<&str>, s: u64, us: u64| {
            let mut e = json!({"event": event, "timestamp": {"seconds": s, "microseconds": us}});
            if let Some(st) = status {
                e["data"] = json!({ "status": st });
            }
            e
        };
        let source = [
            ev("MIGRATION", Some("setup"), 448, 669_631),
            ev("MIGRATION", Some("active"), 448, 672_368),
            ev("STOP", None, 448, 676_339),
            ev("MIGRATION", Some("postcopy-device"), 448, 677_260),
            ev("MIGRATION", Some("postcopy-active"), 448, 728_987),
            ev("MIGRATION", Some("completed"), 453, 419_077),
        ];
        let dest = [
            ev("MIGRATION", Some("postcopy-active"), 448, 685_955),
            ev("RESUME", None, 448, 686_708),
            ev("MIGRATION", Some("completed"), 453, 415_782),
        ];
        assert_eq!(event_us(&source, "STOP", None), Some(448_676_339));
        assert_eq!(
            event_us(&dest, "MIGRATION", Some("completed")),
            Some(453_415_782)
        );
        assert_eq!(event_us(&dest, "STOP", None), None);
    }
}
