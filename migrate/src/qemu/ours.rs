//! pagehint as the peer: the harness's own source and destination as two processes, one in
//! each namespace of a [`ShapedLink`], with the emulated link switched off (`--bandwidth 0
//! --delay 0`) so that the kernel's `tbf` queue does the queueing, as it does for QEMU.
//!
//! The source (`pagehint-migrate --listen`) serves every session of a link; each workload is
//! one destination process (`--connect ... --json`) that runs the modes in turn, and its JSON
//! rows are read back. The background channel is paced at the same cap QEMU is given
//! (`--pace`, `SO_MAX_PACING_RATE`), and in preempt modes its unsent bytes are bounded by
//! `TCP_NOTSENT_LOWAT` (`--lowat auto`): the two socket options pagehint's design uses on a
//! real link.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::netns::{End, ShapedLink};
use super::QemuError;
use crate::harness::result::RunResult;
use crate::options::{MigrationMode, Workload};

/// How the pagehint runs are made.
#[derive(Clone, Debug)]
pub struct OursSetup {
    /// The `pagehint-migrate` binary (this one).
    pub exe: PathBuf,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// Pacing of the background channel, bits/s (QEMU's cap).
    pub pace_bps: u64,
    /// Image and workload seed.
    pub seed: u64,
    /// Stream playback rate, bytes/s.
    pub stream_rate: u64,
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
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Source {
    /// Starts the source and waits until it listens.
    pub fn start(link: &ShapedLink, setup: &OursSetup) -> Result<Self, QemuError> {
        let log = setup.workdir.join("pagehint-source.log");
        let err = File::create(&log)
            .map_err(|e| QemuError::Io(format!("creating {}", log.display()), e))?;
        let mut c = link.command(End::Source, &setup.exe);
        c.arg("--listen")
            .arg(format!("{}:{}", link.ip(End::Source), setup.port))
            .args(["--timeout", "60s"])
            .args(["--pin", if setup.pin { "auto" } else { "off" }])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err);
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
        let mut source = Self { child };
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

/// Runs `workload` in each of `modes` against the source of `link`; the rows of the runs
/// that finished (a failed run is an error naming the destination's log).
pub fn migrate(
    link: &ShapedLink,
    setup: &OursSetup,
    modes: &[MigrationMode],
    workload: Workload,
) -> Result<Vec<RunResult>, QemuError> {
    let json = setup.workdir.join(format!("pagehint-{workload}.json"));
    let _ = std::fs::remove_file(&json);
    let log = setup.workdir.join(format!("pagehint-{workload}.log"));
    let out =
        File::create(&log).map_err(|e| QemuError::Io(format!("creating {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| QemuError::Io("log".into(), e))?;
    let modes: Vec<&str> = modes.iter().map(|m| m.name()).collect();
    let mut c = link.command(End::Destination, &setup.exe);
    c.arg("--connect")
        .arg(format!("{}:{}", link.ip(End::Source), setup.port))
        .args(["--guest", "kvm", "--vcpus", "1", "--host-page", "4K"])
        .args(["--mem", &format!("{}M", setup.mem >> 20)])
        .args(["--precopy-rounds", "0", "--bandwidth", "0", "--delay", "0"])
        .args([
            "--pace",
            &setup.pace_bps.to_string(),
            "--lowat",
            &setup.lowat,
        ])
        .args(["--modes", &modes.join(","), "--workloads", workload.name()])
        .args(["--seed", &setup.seed.to_string()])
        .args(["--stream-rate", &setup.stream_rate.to_string()])
        .args(["--pin", if setup.pin { "auto" } else { "off" }])
        .args(["--timeout", "60s", "--quiet", "--json"])
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let t = Instant::now();
    let status = c
        .status()
        .map_err(|e| QemuError::Io("running the pagehint destination".into(), e))?;
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
    crate::harness::export::rows_from_json(&text).map_err(|e| {
        QemuError::Protocol(format!("{}: not the harness's JSON: {e}", json.display()))
    })
}
