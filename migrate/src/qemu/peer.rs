//! QEMU as the peer: one postcopy migration of the harness's guest between two QEMU
//! processes, one in each namespace of a [`ShapedLink`].
//!
//! # Protocol of one run
//! 1. Start the source QEMU (KVM, one vCPU, the guest's boot disk) and the destination QEMU
//!    (`-incoming defer`, tracing the request and placement events, see [`super::trace`]).
//! 2. Wait until the guest has built its image and runs its workload (its status page, read
//!    with `pmemsave`, counts operations), then let it run for the settle time.
//! 3. Enable `postcopy-ram` (and `postcopy-preempt`) on both sides and `postcopy-blocktime` on
//!    the destination; cap the source with `max-bandwidth` **and** `max-postcopy-bandwidth`
//!    (the first alone does not cap postcopy).
//! 4. `migrate-incoming` on the destination, `migrate` then at once `migrate-start-postcopy`
//!    on the source (pure postcopy: like the harness with `--precopy-rounds 0`).
//! 5. Poll `query-migrate` on the source until `completed` (or `failed`), then on the
//!    destination until `completed`; read both.
//! 6. Check that the guest still runs on the destination: its status page says running, no
//!    failed checks, and its operation count grows over half a second.
//! 7. `quit` both (killed if they do not), read the trace.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::netns::{End, ShapedLink};
use super::qmp::Qmp;
use super::trace::{self, RequestLatency};
use super::QemuError;
use crate::guest::disk::MAILBOX;
use crate::guest::kvm::program::mailbox as mb;
use crate::guest::kvm::GuestCounters;
use crate::guest::layout::TARGET_PAGE;
use crate::names::named_enum;
use crate::pin::{PinPlan, Role};

named_enum!(
    /// QEMU's two postcopy modes.
    QemuMode, "QEMU mode (QEMU 10.0 has no hint)" {
        /// `postcopy-ram`: urgent pages share the migration stream.
        Vanilla = 0, "vanilla";
        /// `postcopy-ram` + `postcopy-preempt`: urgent pages on their own channel.
        Preempt = 1, "preempt";
    }
);

/// How QEMU runs.
#[derive(Clone, Debug)]
pub struct QemuSetup {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// Bandwidth cap, bits/s (`max-bandwidth` and `max-postcopy-bandwidth`).
    pub cap_bps: u64,
    /// How long the guest runs at the source before migrating.
    pub settle: Duration,
    /// Where sockets, logs, traces and status snapshots go.
    pub workdir: PathBuf,
    /// TCP port of the migration on the destination.
    pub port: u16,
    /// Where QEMU's threads run: the harness's plan, by thread name (see [`pin_threads`]).
    pub pin: PinPlan,
}

/// What one QEMU migration measured.
#[derive(Clone, Debug, Default)]
pub struct QemuOutcome {
    /// Source `query-migrate` `total-time`, ms (migrate → completed).
    pub total_ms: f64,
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
    /// Destination `postcopy-vcpu-blocktime`, ms.
    pub vcpu_blocktime_ms: Vec<f64>,
    /// From the destination's trace.
    pub latency: RequestLatency,
    /// Guest operations per second at the source before migrating.
    pub ops_before_per_s: f64,
    /// Guest operations per second from `migrate` to completion (postcopy: the source's
    /// status page froze at the switch; the destination's is read at completion).
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

/// Raises its flag when dropped (stops the pinner on every way out).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // Relaxed: see `pin_threads`.
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A QEMU process, killed on drop if still running.
struct Proc {
    child: Child,
    side: &'static str,
    log: PathBuf,
}

impl Proc {
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
                "{} does not run ({e}); scripts/install-qemu.sh installs QEMU 10.0 from bookworm-backports",
                binary.display()
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .next()
        .unwrap_or("QEMU (unknown version)")
        .trim()
        .to_string())
}

/// `10.0.2` from a `--version` line.
pub fn short_version(line: &str) -> String {
    line.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or("?")
        .to_string()
}

fn start(
    link: &ShapedLink,
    setup: &QemuSetup,
    end: End,
    disk: &Path,
    extra: &[String],
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
    c.args(["-name", &format!("pagehint-{side},debug-threads=on")])
        .args(["-machine", "pc", "-accel", "kvm", "-cpu", "host"])
        .args(["-m", &format!("{}M", setup.mem >> 20), "-smp", "1"])
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
/// gives them: the vCPU and the fault path (fault thread, preempt-channel receiver, return
/// path, which in postcopy-preempt sends the urgent pages itself) on the fault CPU, the bulk
/// streams (migration thread, the destination's listen thread that loads the main stream)
/// on the bulk CPU, as [`crate::pin`] places pagehint's.
pub fn qemu_role(thread: &str) -> Option<Role> {
    Some(match thread {
        "CPU 0/KVM" => Role::Guest,
        "mig/dst/fault" => Role::FaultThread,
        "mig/dst/preempt" => Role::UrgentReceiver,
        "mig/src/return" => Role::ReturnPath,
        "mig/src/main" => Role::BackgroundSender,
        "mig/dst/listen" => Role::BackgroundReceiver,
        _ => return None,
    })
}

/// Pins the threads of processes `pids` by [`qemu_role`] until `stop`, looking for new ones
/// every 2 ms (the migration threads start with `migrate`). The threads pinned, by name.
pub fn pin_threads(plan: PinPlan, pids: &[u32], stop: &AtomicBool) -> Vec<String> {
    let mut done: Vec<(u32, String)> = Vec::new();
    // Relaxed: a stop flag polled every 2 ms; nothing is published through it.
    while !stop.load(Ordering::Relaxed) {
        for &pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if done.iter().any(|(d, _)| *d == tid) {
                    continue;
                }
                let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let name = name.trim();
                if let Some(role) = qemu_role(name) {
                    let id = rustix::thread::Pid::from_raw(tid as i32);
                    if plan.apply_to(id, role) {
                        done.push((tid, name.to_string()));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    done.into_iter().map(|(_, n)| n).collect()
}

fn status_page(q: &mut Qmp, workdir: &Path, side: &str) -> Result<GuestCounters, QemuError> {
    let file = workdir.join(format!("{side}-status.bin"));
    q.execute(
        "pmemsave",
        json!({"val": MAILBOX, "size": TARGET_PAGE, "filename": file.to_string_lossy()}),
    )?;
    let page = std::fs::read(&file)
        .map_err(|e| QemuError::Io(format!("reading {}", file.display()), e))?;
    if page.len() < TARGET_PAGE as usize {
        return Err(QemuError::Protocol(format!(
            "pmemsave wrote {} bytes of the status page",
            page.len()
        )));
    }
    Ok(GuestCounters::decode(|o| {
        let o = o as usize;
        u64::from_le_bytes(page[o..o + 8].try_into().expect("8 bytes"))
    }))
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64().unwrap_or(0.0)
}

/// Migrates the guest booted from `disk` from one QEMU to another across `link`.
pub fn migrate(
    link: &ShapedLink,
    setup: &QemuSetup,
    mode: QemuMode,
    disk: &Path,
) -> Result<QemuOutcome, QemuError> {
    let trace_file = setup.workdir.join("destination.trace");
    let _ = std::fs::remove_file(&trace_file);
    let mut trace_args: Vec<String> = Vec::new();
    for e in trace::EVENTS {
        trace_args.push("-trace".into());
        trace_args.push(format!("enable={e}"));
    }
    trace_args.extend([
        "-D".to_string(),
        trace_file.to_string_lossy().into_owned(),
        "-msg".into(),
        "timestamp=on".into(),
        "-incoming".into(),
        "defer".into(),
    ]);
    let (mut src, src_sock) = start(link, setup, End::Source, disk, &[])?;
    let (mut dst, dst_sock) = start(link, setup, End::Destination, disk, &trace_args)?;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(Arc::clone(&stop));
    let pinner = (setup.pin != PinPlan::OFF).then(|| {
        let (stop, plan) = (Arc::clone(&stop), setup.pin);
        let pids = [src.child.id(), dst.child.id()];
        std::thread::spawn(move || pin_threads(plan, &pids, &stop))
    });
    let wait = Duration::from_secs(10);
    let mut s = Qmp::connect(&src_sock, "source", wait)?;
    let mut d = Qmp::connect(&dst_sock, "destination", wait)?;

    // 2. The guest builds its image (about 10 s per GiB here), then runs its workload.
    let boot_limit = Duration::from_secs(30 + 60 * (setup.mem >> 30).max(1));
    let t = Instant::now();
    let first = loop {
        src.check_alive()?;
        let c = status_page(&mut s, &setup.workdir, "source")?;
        if c.state == mb::RUNNING && c.ops > 0 {
            break c;
        }
        if t.elapsed() > boot_limit {
            return Err(QemuError::Timeout(format!(
                "the guest did not start its workload within {boot_limit:?} (state {}, ops {})",
                c.state, c.ops
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let t0 = Instant::now();
    std::thread::sleep(setup.settle);
    let before = status_page(&mut s, &setup.workdir, "source")?;
    let ops_before_per_s = (before.ops - first.ops) as f64 / t0.elapsed().as_secs_f64();

    // 3. Capabilities and the bandwidth cap.
    let mut caps = vec![json!({"capability": "postcopy-ram", "state": true})];
    if mode == QemuMode::Preempt {
        caps.push(json!({"capability": "postcopy-preempt", "state": true}));
    }
    s.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    let mut dcaps = caps.clone();
    dcaps.push(json!({"capability": "postcopy-blocktime", "state": true}));
    d.execute("migrate-set-capabilities", json!({ "capabilities": dcaps }))?;
    let cap = setup.cap_bps / 8;
    s.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": cap, "max-postcopy-bandwidth": cap}),
    )?;

    // 4. Pure postcopy.
    d.execute(
        "migrate-incoming",
        json!({"uri": format!("tcp:{}:{}", link.ip(End::Destination), setup.port)}),
    )?;
    let t_migrate = Instant::now();
    s.execute(
        "migrate",
        json!({"uri": format!("tcp:{}:{}", link.ip(End::Destination), setup.port)}),
    )?;
    s.execute("migrate-start-postcopy", json!({}))?;

    // 5. Completion on both sides.
    let limit = Duration::from_secs_f64(
        30.0 + 4.0 * (setup.mem as f64 * 8.0) / (setup.cap_bps.max(1) as f64),
    );
    let t = Instant::now();
    let source_info = loop {
        let q = s.execute("query-migrate", json!({}))?;
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
        dst.check_alive()?;
        std::thread::sleep(Duration::from_millis(20));
    };
    let t = Instant::now();
    let dest_info = loop {
        let q = d.execute("query-migrate", json!({}))?;
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

    // 6. The guest runs on at the destination.
    let a = status_page(&mut d, &setup.workdir, "destination")?;
    let ta = Instant::now();
    let frozen = status_page(&mut s, &setup.workdir, "source")?;
    let ops_postcopy_per_s =
        a.ops.saturating_sub(frozen.ops) as f64 / (ta - t_migrate).as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let b = status_page(&mut d, &setup.workdir, "destination")?;
    let running = d.execute("query-status", json!({}))?;
    let ops_after_per_s = b.ops.saturating_sub(a.ops) as f64 / ta.elapsed().as_secs_f64();
    let guest_errors = before.errors.max(b.errors);
    let guest_alive =
        running["running"] == true && b.state == mb::RUNNING && b.ops > a.ops && b.errors == 0;

    // Relaxed: the pinner only polls the flag; its result comes back through join.
    stop.store(true, Ordering::Relaxed);
    let pinned_threads = pinner
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();

    // 7. Done.
    for (side, info) in [("source", &source_info), ("destination", &dest_info)] {
        let _ = std::fs::write(
            setup.workdir.join(format!("{side}-query-migrate.json")),
            serde_json::to_string_pretty(info).unwrap_or_default(),
        );
    }
    src.finish(Some(&mut s));
    dst.finish(Some(&mut d));
    let log = std::fs::read_to_string(&trace_file)
        .map_err(|e| QemuError::Io(format!("reading {}", trace_file.display()), e))?;
    let latency = trace::parse(&log, TARGET_PAGE).map_err(QemuError::Protocol)?;
    Ok(QemuOutcome {
        total_ms: num(&source_info, &["total-time"]),
        downtime_ms: num(&source_info, &["downtime"]),
        precopy_bytes: num(&source_info, &["ram", "precopy-bytes"]) as u64,
        postcopy_bytes: num(&source_info, &["ram", "postcopy-bytes"]) as u64,
        requests: num(&source_info, &["ram", "postcopy-requests"]) as u64,
        blocktime_ms: num(&dest_info, &["postcopy-blocktime"]),
        vcpu_blocktime_ms: dest_info["postcopy-vcpu-blocktime"]
            .as_array()
            .map(|v| v.iter().map(|x| x.as_f64().unwrap_or(0.0)).collect())
            .unwrap_or_default(),
        latency,
        ops_before_per_s,
        ops_postcopy_per_s,
        ops_after_per_s,
        guest_errors,
        guest_alive,
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
}
