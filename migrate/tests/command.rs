//! The command line as a user meets it (thread guest, small RAM): a listener that serves one
//! migration and exits, every run recorded when some fail, and outputs checked before any
//! run. Every test bounds its own run time, so a hang is a failure.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::within;

/// A small, quiet, unpinned preempt run of the thread guest.
const SMALL: &[&str] = &[
    "--guest", "thread", "--mem", "16M", "--pin", "off", "--quiet", "--modes", "preempt",
];

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
}

/// A client of `addr` that sends `bytes` and reads the answer (if any).
fn knock(addr: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(bytes).unwrap();
    let mut answer = vec![0u8; 60];
    let n = c.read(&mut answer).unwrap_or(0);
    answer.truncate(n);
    answer
}

#[test]
fn a_listener_with_once_serves_one_migration_and_exits() {
    let (source, addr) = common::start_listener(
        exe()
            .args(["--listen", "127.0.0.1:0", "--pin", "off", "--once"])
            .stderr(Stdio::piped()),
    );
    // Strangers first: garbage, and a destination that says hello and goes away. Neither
    // is a session (--once still serves the real one), and the log says each once.
    let mut garbage = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    garbage.resize(pagehint_migrate::wire::Hello::LEN, b' ');
    assert!(knock(&addr, &garbage).starts_with(b"PHMIGRS"));
    let cfg = common::config(
        pagehint_migrate::options::GuestKind::Thread,
        16 << 20,
        pagehint_migrate::guest::layout::HostPageSize::Small,
        1,
    );
    let hello = pagehint_migrate::wire::Hello::new(
        &cfg,
        pagehint_migrate::MigrationMode::Preempt,
        pagehint_migrate::Workload::Seq,
    );
    assert!(knock(&addr, &hello.encode()).starts_with(b"PHMIGRS"));
    let dest = within(Duration::from_secs(60), move || {
        exe()
            .args(["--connect", &addr])
            .args(SMALL)
            .args(["--workloads", "seq"])
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&dest.stdout);
    assert!(
        dest.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    assert!(stdout.contains("verified"), "{stdout}");
    let out = within(Duration::from_secs(20), move || {
        source.wait_with_output().unwrap()
    });
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the listener exits 0 after its one session: {log}"
    );
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("refused a connection from 127.0.0.1:")
            && l.ends_with("protocol error on the handshake: not a pagehint-migrate destination (its hello starts \"GET / HT\")")),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l.ends_with("the destination did not open its urgent connection within 2s of the answer to its hello; the session is released")),
        "the right wait: {log}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.matches("protocol error").count() <= 1),
        "no doubled prefix: {log}"
    );
    // The two strangers were not sessions: the one migration is session 1.
    let started: Vec<&&str> = lines.iter().filter(|l| l.contains(": started: ")).collect();
    assert_eq!(started.len(), 1, "{log}");
    assert!(
        started[0].starts_with("session 1: started: seq / preempt"),
        "{log}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains(" done: ")).count(),
        1,
        "{log}"
    );
    assert!(!log.contains("session 2"), "{log}");
}

#[test]
fn failed_runs_are_recorded_with_how_far_they_got_and_the_rest_still_run() {
    let dir = std::env::temp_dir().join(format!("pagehint-failed-rows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let out = within(Duration::from_secs(60), {
        let json = json.clone();
        move || {
            exe()
                .args(SMALL)
                .args([
                    "--workloads",
                    "seq,random",
                    // Test hook: the source drops both connections after 100 host pages.
                    "--test-drop-after",
                    "100",
                    "--json",
                ])
                .arg(&json)
                .output()
                .unwrap()
        }
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    let whole: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(whole["exit_status"], 2, "{whole}");
    assert_eq!(whole["exit_reason"], "2 of 2 runs failed");
    assert_eq!(whole["failures"].as_array().unwrap().len(), 2);
    assert!(whole["command_line"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "--test-drop-after"));
    let rows = whole["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "both runs recorded: {rows:?}");
    for r in rows {
        // Nothing was measured: null, not zero.
        for k in [
            "faults",
            "request_p50_us",
            "blocktime_ms",
            "downtime_ms",
            "tail",
        ] {
            assert!(r[k].is_null(), "{k}: {r}");
        }
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("connection lost")),
            "{r}"
        );
        // Postcopy, with the pages placed, unless the drop beat the switch-over frame's
        // arrival (the destination then never left precopy, and says so).
        assert!(
            r["reached"].as_str().is_some_and(|e| {
                (e.starts_with("postcopy: ") && e.ends_with(" of 4096 host pages placed"))
                    || e == "before postcopy (setup, handshake or precopy)"
            }),
            "{r}"
        );
        assert_eq!(r["verified"], false);
        assert_eq!(r["stream_rate"], 256u64 << 20);
    }
    assert_eq!(
        stdout.matches("FAILED").count(),
        4,
        "two run lines, two table rows: {stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_output_is_refused_before_any_run() {
    let t = Instant::now();
    let out = exe()
        .args([
            "--guest",
            "thread",
            "--mem",
            "16M",
            "--svg",
            "/nonexistent-dir/p.svg",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--svg /nonexistent-dir/p.svg: cannot write it"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "nothing ran"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_run_killed_before_its_end_leaves_the_previous_json_whole() {
    let dir = std::env::temp_dir().join(format!("pagehint-killed-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    std::fs::write(&json, "{\"previous\": true}").unwrap();
    // A slow link: the run is still going when it is killed.
    let mut run = exe()
        .args(SMALL)
        .args(["--workloads", "random", "--bandwidth", "100M", "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let _ = run.kill();
    let _ = run.wait();
    assert_eq!(
        std::fs::read_to_string(&json).unwrap(),
        "{\"previous\": true}",
        "a killed run leaves the previous file as it was"
    );
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["r.json"], "and nothing half-written beside it");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_link_too_slow_for_the_timeout_is_refused_up_front_not_run_until_killed() {
    for args in [
        &["--bandwidth", "1"][..],
        &["--bandwidth", "1K", "--timeout", "2s"][..],
        &["--bandwidth", "100K", "--timeout", "2s"][..],
        &["--delay", "60s"][..],
    ] {
        let out = within(Duration::from_secs(20), {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            move || exe().args(SMALL).args(&args).output().unwrap()
        });
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("longer than the"), "{args:?}: {err}");
        assert!(
            String::from_utf8_lossy(&out.stdout).is_empty(),
            "{args:?}: nothing ran"
        );
    }
}
