//! pagehint as the peer: the harness's own source and destination as two processes, one in
//! each namespace of a [`ShapedLink`], with the emulated link switched off (`--bandwidth 0
//! --delay 0`) so that the kernel's `tbf` queue does the queueing, as it does for QEMU.
//!
//! A source (`pagehint-migrate --listen`) serves every session of a link and transport;
//! each run is one destination process (`--connect ... --json`, one mode, one workload), so
//! that the CPU time of its migration threads — and of the source's, which live for one
//! session — can be read per run from outside ([`super::cpu`]; the harness names them
//! `ph/src/bulk`, `ph/src/return`, `ph/dst/fault`, `ph/dst/urgent`, `ph/dst/bulk`).
//!
//! Two transports ([`Transport`]):
//! * **pagehint's** (as it ships): the background channel paced at the cap QEMU is given
//!   (`--pace`, `SO_MAX_PACING_RATE`) and, in preempt modes, its unsent bytes bounded by
//!   `TCP_NOTSENT_LOWAT` (`--lowat auto`): the two socket options pagehint's design uses on a
//!   real link;
//! * **QEMU's**: neither (`--pace 0 --lowat off`), and a source started with
//!   `--qemu-rate-limit` at the cap: QEMU's 100 ms-window limiter
//!   ([`crate::source::rate_limit`]).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::cpu::{CpuByThread, ThreadCpu};
use super::netns::{End, ShapedLink};
use super::QemuError;
use crate::guest::layout::HostPageSize;
use crate::harness::result::RunResult;
use crate::names::named_enum;
use crate::options::{CursorPolicy, MigrationMode, Workload};

named_enum!(
    /// How a peer's background stream meets the link.
    Transport, "transport" {
        /// QEMU's: a rate limiter that sends each 100 ms window's quota at line rate, then
        /// sleeps; no kernel pacing, no bound on unsent bytes.
        Qemu = 0, "qemu";
        /// pagehint's: kernel pacing (`SO_MAX_PACING_RATE`) at the cap, and at most 1 MiB
        /// unsent (`TCP_NOTSENT_LOWAT`) in preempt modes.
        Pagehint = 1, "pagehint";
    }
);

impl serde::Serialize for Transport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Transport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the pagehint runs are made.
#[derive(Clone, Debug)]
pub struct OursSetup {
    /// The `pagehint-migrate` binary (this one).
    pub exe: PathBuf,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Host page size of guest RAM (both sides).
    pub host_page: HostPageSize,
    /// Pacing of the background channel, bits/s (QEMU's cap).
    pub pace_bps: u64,
    /// Image and workload seed.
    pub seed: u64,
    /// Stream playback rate, bytes/s.
    pub stream_rate: u64,
    /// preempt-hints' cursors (`--stream-run`, `--stream-share`).
    pub cursors: CursorPolicy,
    /// `--lowat` of the background channel.
    pub lowat: String,
    /// Pin threads (`--pin auto`) or not.
    pub pin: bool,
    /// Logs and JSON.
    pub workdir: PathBuf,
    /// TCP port of the source.
    pub port: u16,
}

/// A running `pagehint-migrate --listen` in the source namespace; killed on drop.
pub struct Source {
    child: Child,
    transport: Transport,
    port: u16,
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Source {
    /// Its transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Starts the source of `transport` (on `setup.port`, QEMU's transport on the next one)
    /// and waits until it listens.
    pub fn start(
        link: &ShapedLink,
        setup: &OursSetup,
        transport: Transport,
    ) -> Result<Self, QemuError> {
        let log = setup
            .workdir
            .join(format!("pagehint-source-{transport}.log"));
        let err = File::create(&log)
            .map_err(|e| QemuError::Io(format!("creating {}", log.display()), e))?;
        let port = setup.port + transport as u16;
        let mut c = link.command(End::Source, &setup.exe);
        c.arg("--listen")
            .arg(format!("{}:{port}", link.ip(End::Source)))
            .args(["--timeout", "60s"])
            .args(["--pin", if setup.pin { "auto" } else { "off" }]);
        if transport == Transport::Qemu {
            c.args(["--qemu-rate-limit", &setup.pace_bps.to_string()]);
        }
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err);
        let mut child = c
            .spawn()
            .map_err(|e| QemuError::Io("starting the pagehint source".into(), e))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(());
                }
            }
        });
        let mut source = Self {
            child,
            transport,
            port,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => Ok(source),
            Err(_) => {
                let _ = source.child.kill();
                Err(QemuError::Setup(format!(
                    "the pagehint source did not start listening: {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                )))
            }
        }
    }
}

/// One pagehint run and the CPU time of its migration threads (both processes).
#[derive(Clone, Debug)]
pub struct OursOutcome {
    /// The destination's result row.
    pub result: RunResult,
    /// CPU of the `ph/...` threads, ms, by `src:`/`dst:` name.
    pub cpu: CpuByThread,
    /// CPU of every other thread of both processes during the run, for the record.
    pub cpu_other: CpuByThread,
}

/// Runs `workload` in `mode` against `source` (whose transport the run takes): one
/// destination process; a failed run is an error naming the destination's log.
pub fn migrate(
    link: &ShapedLink,
    setup: &OursSetup,
    source: &Source,
    mode: MigrationMode,
    workload: Workload,
) -> Result<OursOutcome, QemuError> {
    let name = format!("pagehint-{workload}-{mode}-{}", source.transport);
    let json = setup.workdir.join(format!("{name}.json"));
    let _ = std::fs::remove_file(&json);
    let log = setup.workdir.join(format!("{name}.log"));
    let out =
        File::create(&log).map_err(|e| QemuError::Io(format!("creating {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| QemuError::Io("log".into(), e))?;
    let (pace, lowat) = match source.transport {
        Transport::Pagehint => (setup.pace_bps.to_string(), setup.lowat.clone()),
        Transport::Qemu => ("0".to_string(), "off".to_string()),
    };
    let mut c = link.command(End::Destination, &setup.exe);
    c.arg("--connect")
        .arg(format!("{}:{}", link.ip(End::Source), source.port))
        .args(["--guest", "kvm", "--vcpus", &setup.vcpus.to_string()])
        .args(["--host-page", &setup.host_page.to_string()])
        .args(["--mem", &format!("{}M", setup.mem >> 20)])
        .args(["--precopy-rounds", "0", "--bandwidth", "0", "--delay", "0"])
        .args(["--pace", &pace, "--lowat", &lowat])
        .args(["--modes", mode.name(), "--workloads", workload.name()])
        .args(["--seed", &setup.seed.to_string()])
        .args(["--stream-rate", &setup.stream_rate.to_string()])
        // The booted guest QEMU runs spins while its stream is ahead of schedule (no host
        // sleeps for it): pagehint's guest spins too, so both vCPUs keep their CPUs alike.
        .args(["--guest-wait", "spin"])
        .args(["--stream-run", &setup.cursors.run.to_string()])
        .args(["--stream-share", &setup.cursors.share.to_string()])
        .args(["--pin", if setup.pin { "auto" } else { "off" }])
        .args(["--timeout", "60s", "--quiet", "--json"])
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let t = Instant::now();
    let mut child = c
        .spawn()
        .map_err(|e| QemuError::Io("running the pagehint destination".into(), e))?;
    let pids = [source.child.id(), child.id()];
    let mut cpu = ThreadCpu::start(pids.to_vec(), || {});
    let status = child
        .wait()
        .map_err(|e| QemuError::Io("running the pagehint destination".into(), e))?;
    cpu.stop();
    let key = |mig: bool| {
        move |pid: u32, _: u32, name: &str| {
            let side = if pid == pids[1] { "dst" } else { "src" };
            (name.starts_with("ph/") == mig).then(|| format!("{side}:{name}"))
        }
    };
    let (cpu_mig, cpu_other) = (cpu.now(key(true)), cpu.now(key(false)));
    let text = std::fs::read_to_string(&json).map_err(|_| {
        QemuError::Exited(format!(
            "the pagehint destination ({status}, {:.0} s) wrote no results; see {}: {}",
            t.elapsed().as_secs_f64(),
            log.display(),
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ")
        ))
    })?;
    let mut rows: Vec<RunResult> = crate::harness::export::rows_from_json(&text).map_err(|e| {
        QemuError::Protocol(format!("{}: not the harness's JSON: {e}", json.display()))
    })?;
    if rows.len() != 1 {
        return Err(QemuError::Protocol(format!(
            "{}: {} rows for one run",
            json.display(),
            rows.len()
        )));
    }
    let result = rows.remove(0);
    // The run must be the guest asked for: its vCPUs and host pages, and one blocktime per
    // vCPU (an empty per-vCPU figure is an error, not a 0).
    let (v, hp) = (result.setup.vcpus, result.setup.host_page);
    let per = result.waits.vcpu_blocktime_ms.len();
    if v != setup.vcpus || hp != setup.host_page.bytes() || per != setup.vcpus as usize {
        return Err(QemuError::Protocol(format!(
            "{}: a run of {v} vCPU(s), {hp}-byte host pages and {per} per-vCPU blocktimes, not {} vCPU(s) and {}",
            json.display(),
            setup.vcpus,
            setup.host_page
        )));
    }
    Ok(OursOutcome {
        result,
        cpu: cpu_mig,
        cpu_other,
    })
}
