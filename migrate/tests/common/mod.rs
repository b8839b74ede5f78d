//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

#[path = "within.rs"]
mod within_;
pub use within_::within;
pub mod scratch;
use scratch::Scratch;

use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::options::{GuestKind, GuestSpec};
use pagehint_migrate::sys::hugepages::HugePages;
use pagehint_migrate::{
    run_destination, LocalSource, MigrationMode, PinPlan, RunConfig, RunError, RunResult, Workload,
};

/// A configuration for a small guest, unpinned, with a test-sized idle limit.
pub fn config(kind: GuestKind, mem: u64, host_page: HostPageSize, vcpus: u32) -> RunConfig {
    let mut c = RunConfig::new(GuestSpec::new(kind, mem, host_page, vcpus).unwrap());
    c.idle_timeout = Duration::from_secs(10);
    c.pin = PinPlan::OFF;
    c
}

/// Whether this process is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Starts a source process from `cmd` (a `--listen` command line, stderr already chosen) and
/// returns it with the address it announced on its first line of output.
pub fn start_listener(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    (child, addr)
}

/// A `--listen --once` source process that is stopped (`SIGSTOP`) as soon as the
/// destination has placed a page (store the placed count into the returned counter from the
/// run's progress callback): both connections stay open and fall silent, as in a partition.
/// With `resume_after`, the source is continued (`SIGCONT`) that long after. Join the
/// returned thread before ending the child.
pub fn source_stopped_mid_postcopy(
    resume_after: Option<Duration>,
) -> (Child, SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    let (child, addr) = start_listener(
        Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
            .args(["--listen", "127.0.0.1:0", "--pin", "off", "--once"])
            .stderr(Stdio::null()),
    );
    let pid = child.id() as i32;
    let placed = Arc::new(AtomicU64::new(0));
    let stopper = {
        let placed = Arc::clone(&placed);
        std::thread::spawn(move || {
            // Relaxed: a polled progress figure.
            while placed.load(Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            // SAFETY: signals our own child process.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            if let Some(after) = resume_after {
                std::thread::sleep(after);
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        })
    };
    (child, addr.parse().unwrap(), placed, stopper)
}

/// The run of workload `w` in mode `m` among `runs` (panics if it did not run).
pub fn run_of<'a>(runs: &'a [RunResult], w: &str, m: &str) -> &'a RunResult {
    runs.iter()
        .find(|r| r.setup.workload == w && r.setup.mode == m)
        .unwrap_or_else(|| panic!("no {w} / {m} run"))
}

/// One migration against a fresh in-process source.
pub fn migrate(cfg: RunConfig, mode: MigrationMode, w: Workload) -> Result<RunResult, RunError> {
    let src = LocalSource::start(PinPlan::OFF, cfg.idle_timeout, true).unwrap();
    run_destination(src.addr(), &cfg, mode, w, &|_, _| {})
}

/// Checks what every verified run must show.
pub fn check_verified(r: &RunResult) {
    assert!(
        r.outcome.verified,
        "{} / {}: {:?}",
        r.setup.workload, r.setup.mode, r.outcome.problems
    );
    assert_eq!(r.placement.placed_twice, 0);
    assert_eq!(
        r.source.pages_urgent + r.source.pages_background,
        r.transfer.pending_host_pages * r.setup.host_page / 4096 + r.recovery.resent_pages,
        "{} / {}: every missing page sent exactly once in postcopy (I1), but for those lost with a broken connection",
        r.setup.workload,
        r.setup.mode
    );
    if r.recovery.cuts == 0 {
        assert_eq!(
            r.recovery.resent_pages, 0,
            "nothing is sent twice without a break"
        );
    }
    assert_eq!(
        r.recovery.placed_per_connection.len() as u64,
        r.recovery.cuts + 1
    );
    assert_eq!(
        r.recovery.placed_per_connection.iter().sum::<u64>(),
        r.transfer.pending_host_pages,
        "every missing page placed by exactly one connection"
    );
    assert_eq!(r.guest_run.guest_check_errors, 0);
    assert!(
        r.waits.raced_faults <= r.waits.faults,
        "raced faults are faults"
    );
}

/// Huge pages for a test: one test at a time reserves them (the pool is global).
pub fn huge_pages(pages: u64) -> Option<(MutexGuard<'static, ()>, HugePages)> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    match HugePages::reserve(pages) {
        Ok(h) => Some((guard, h)),
        Err(e) if !is_root() => {
            eprintln!("SKIPPED: hugetlb test needs root to reserve huge pages: {e}");
            None
        }
        Err(e) => panic!("reserving {pages} huge pages as root: {e}"),
    }
}

/// Runs the command line with `args` plus `--json` and `--svg` into a scratch folder named
/// after `test`; checks it succeeded (and its JSON says so); returns its stdout, the JSON's
/// rows and the SVG text.
pub fn command_line(test: &str, args: &[&str]) -> (String, Vec<serde_json::Value>, String) {
    let dir = Scratch::new(test, "cli");
    let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
    let out = within(Duration::from_secs(180), {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (json, svg) = (json.clone(), svg.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
                .args(&args)
                .arg("--json")
                .arg(&json)
                .arg("--svg")
                .arg(&svg)
                .output()
                .unwrap()
        }
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(whole["exit_status"], 0, "{whole}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    (stdout, whole["rows"].as_array().unwrap().clone(), svg)
}
