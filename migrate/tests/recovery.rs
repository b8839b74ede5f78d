//! Postcopy recovery: connections cut mid-postcopy, any number of times, in every mode, with
//! the thread guest and the KVM guest; a source stopped longer than the idle limit and
//! continued; a relay on the first path that dies, the destination resuming at its
//! `--reconnect` address; a real partition (`ip link set down`, then `up`) between two
//! network namespaces (root only); and what ends a run instead: recovery switched off, a source
//! that crashed. Every resumed run verifies: each missing page placed by exactly one
//! connection, and the source's rebuild after each break agreeing with what the destination
//! lacked.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{check_verified, command_line, config, is_root, migrate, start_listener, within};
use pagehint_migrate::guest::kvm::ready_or_skip;
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::options::GuestKind;
use pagehint_migrate::qemu::netns::{End, LinkSpec, ShapedLink};
use pagehint_migrate::wire::WireError;
use pagehint_migrate::{
    run_destination, LocalSource, MigrationMode, PinPlan, RunConfig, RunError, RunResult, Workload,
};

/// Checks a run that survived `cuts` breaks.
fn check_resumed(r: &RunResult, cuts: u64) {
    check_verified(r);
    assert_eq!(
        r.recovery.cuts, cuts,
        "{} / {}: {:?}",
        r.setup.workload, r.setup.mode, r.recovery.cut_reasons
    );
    assert_eq!(r.recovery.recovery_ms.len() as u64, cuts);
    assert!(
        r.recovery.recovery_ms.iter().all(|&ms| ms > 0.0),
        "{:?}",
        r.recovery.recovery_ms
    );
    assert!(
        (r.recovery.recovery_total_ms - r.recovery.recovery_ms.iter().sum::<f64>()).abs() < 1e-6,
        "{r:?}"
    );
    // The hook cut each connection after it had sent pages; those still in flight were
    // lost with it and sent again (a connection may even have placed none of its own).
    assert!(r.recovery.resent_pages > 0, "{r:?}");
}

fn cut_config(kind: GuestKind, mem: u64, after: u64, cuts: u64) -> RunConfig {
    let mut c = config(kind, mem, HostPageSize::Small, 1);
    c.hooks.source.cut_after = after;
    c.hooks.source.cuts = cuts;
    c.recover_timeout = Duration::from_secs(10);
    c
}

#[test]
fn every_mode_survives_repeated_cuts_and_places_each_page_once() {
    // 16 MiB: 4096 host pages; cut after 300 on each connection, 4 times.
    let runs = within(Duration::from_secs(120), || {
        let c = cut_config(GuestKind::Thread, 16 << 20, 300, 4);
        let src = LocalSource::start(PinPlan::OFF, c.idle_timeout, true).unwrap();
        let mut out = Vec::new();
        for &w in [Workload::Random, Workload::Stream].iter() {
            for &m in MigrationMode::ALL {
                let r = run_destination(src.addr(), &c, m, w, &|_, _| {});
                out.push(r.unwrap_or_else(|e| panic!("{w} / {m}: {e}")));
            }
        }
        out
    });
    for r in &runs {
        check_resumed(r, 4);
        assert!(
            r.recovery
                .cut_reasons
                .iter()
                .all(|c| c.starts_with("connection lost")),
            "{:?}",
            r.recovery.cut_reasons
        );
    }
    // The hint state of a broken connection is dropped, and the mode stays: vanilla never
    // uses the urgent channel, preempt-hint still offers hints after the breaks.
    let get = |w: &str, m: &str| common::run_of(&runs, w, m);
    assert_eq!(get("random", "vanilla").source.pages_urgent, 0);
    assert_eq!(get("random", "preempt").source.hints_offered, 0);
    assert!(get("random", "preempt-hint").source.hints_offered > 0);
}

#[test]
fn a_kvm_guest_survives_repeated_cuts_in_every_mode() {
    if !ready_or_skip("a_kvm_guest_survives_repeated_cuts_in_every_mode") {
        return;
    }
    let runs = within(Duration::from_secs(180), || {
        // Pure postcopy: 8192 host pages to send, cut after 400 on each connection.
        let c = cut_config(GuestKind::Kvm, 32 << 20, 400, 3);
        let src = LocalSource::start(PinPlan::OFF, c.idle_timeout, true).unwrap();
        MigrationMode::ALL
            .iter()
            .map(|&m| {
                run_destination(src.addr(), &c, m, Workload::Kv, &|_, _| {})
                    .unwrap_or_else(|e| panic!("kv / {m}: {e}"))
            })
            .collect::<Vec<_>>()
    });
    for r in &runs {
        check_resumed(r, 3);
        assert_eq!(r.setup.guest, "kvm");
        assert!(
            r.guest_run.guest_verified_pages > 0,
            "the guest verified its RAM"
        );
    }
}

#[test]
fn with_recovery_off_a_cut_ends_the_run() {
    let r = within(Duration::from_secs(30), || {
        let mut c = cut_config(GuestKind::Thread, 16 << 20, 300, 1);
        c.recover_timeout = Duration::ZERO;
        migrate(c, MigrationMode::Preempt, Workload::Seq)
    });
    match r {
        Err(RunError::Wire(WireError::Closed(_) | WireError::Io(..))) => {}
        other => panic!("expected the cut to end the run, got {other:?}"),
    }
}

#[test]
fn a_source_stopped_longer_than_the_idle_limit_is_resumed_when_it_continues() {
    // The source process is stopped (SIGSTOP) mid-postcopy for 2.5 s: the destination's
    // 1 s idle limit finds both channels silent, keeps its guest and reconnects until the
    // source continues (SIGCONT) and takes the session back.
    let (mut child, addr, placed, stopper) =
        common::source_stopped_mid_postcopy(Some(Duration::from_millis(2500)));
    let r = within(Duration::from_secs(40), move || {
        let mut c = config(GuestKind::Thread, 16 << 20, HostPageSize::Small, 1);
        c.idle_timeout = Duration::from_secs(1);
        c.recover_timeout = Duration::from_secs(20);
        c.link.bandwidth_bps = 50_000_000;
        run_destination(
            addr,
            &c,
            MigrationMode::PreemptHint,
            Workload::Random,
            // Relaxed: a progress figure for the stopper thread.
            &|n, _| placed.store(n, Ordering::Relaxed),
        )
    });
    stopper.join().unwrap();
    let status = child.wait().unwrap();
    let r = r.unwrap_or_else(|e| panic!("the stopped source was not resumed: {e}"));
    check_resumed(&r, 1);
    assert!(
        r.recovery.cut_reasons[0].contains("background and urgent channels"),
        "{:?}",
        r.recovery.cut_reasons
    );
    assert!(
        r.recovery.recovery_ms[0] >= 1000.0,
        "{:?}",
        r.recovery.recovery_ms
    );
    assert!(
        status.success(),
        "the source served its one session: {status}"
    );
}

#[test]
fn the_command_line_reports_cuts_survived_and_recovery_time() {
    let (out, rows, _) = command_line(
        "recovery_cli",
        &[
            "--guest",
            "thread",
            "--mem",
            "16M",
            "--modes",
            "vanilla,preempt-hint",
            "--workloads",
            "random",
            "--pin",
            "off",
            "--quiet",
            "--test-cut-after",
            "500",
            "--test-cuts",
            "2",
        ],
    );
    assert!(out.contains("cuts/recovery"), "{out}");
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["cuts"], 2, "{r}");
        assert_eq!(r["recovery_ms"].as_array().unwrap().len(), 2, "{r}");
        assert!(r["recovery_total_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["verified"], true, "{r}");
    }
}

#[test]
fn a_partition_between_two_namespaces_is_recovered_when_the_link_comes_back() {
    if !is_root() {
        eprintln!("SKIPPED a_partition_between_two_namespaces_is_recovered_when_the_link_comes_back: network namespaces need root");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err()
        || Command::new("tc").arg("-V").output().is_err()
    {
        eprintln!("SKIPPED a_partition_between_two_namespaces_is_recovered_when_the_link_comes_back: iproute2 (ip, tc) is missing");
        return;
    }
    let link = ShapedLink::create(LinkSpec {
        rate_bps: 100_000_000,
        queue: Duration::from_millis(20),
    })
    .unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_pagehint-migrate"));
    let port = 4400 + (std::process::id() % 1000) as u16;
    let src_addr = format!("{}:{port}", link.ip(End::Source));
    let (mut source, listening) = start_listener(
        link.command(End::Source, exe)
            .args([
                "--listen",
                &src_addr,
                "--pin",
                "off",
                "--once",
                "--timeout",
                "1s",
            ])
            .stderr(Stdio::piped()),
    );
    assert_eq!(listening, src_addr);
    let dir = std::env::temp_dir().join(format!("recovery-netns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    // 64 MiB over 100 Mbit/s: about 5.5 s of postcopy; the link goes down 1.5 s in, for 3 s.
    let mut dest = link.command(End::Destination, exe);
    let dest = dest
        .args(["--connect", &src_addr, "--guest", "thread", "--mem", "64M"])
        .args([
            "--bandwidth",
            "0",
            "--delay",
            "0",
            "--modes",
            "preempt-hint",
        ])
        .args(["--workloads", "random", "--pin", "off", "--timeout", "1s"])
        .args(["--recover-timeout", "30s", "--quiet", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    link.set_link(End::Destination, false).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    link.set_link(End::Destination, true).unwrap();
    let out = within(Duration::from_secs(60), move || {
        dest.wait_with_output().unwrap()
    });
    let _ = source.kill();
    let source_log = within(Duration::from_secs(10), move || {
        source
            .wait_with_output()
            .map(|o| o.stderr)
            .unwrap_or_default()
    });
    assert!(
        out.status.success(),
        "{}\n{}\nthe source's log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&source_log)
    );
    let whole: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = &whole["rows"][0];
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "partition: {} cut(s) survived, recovery {} ms, postcopy {:.0} ms, {} pages sent again, placed per connection {}",
        r["cuts"], r["recovery_ms"], r["duration_ms"].as_f64().unwrap_or(0.0), r["resent_pages"], r["placed_per_connection"]
    );
    assert_eq!(r["verified"], true, "{r}");
    assert!(r["cuts"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        r["recovery_total_ms"].as_f64().unwrap() > 1000.0,
        "the link was down for 3 s: {r}"
    );
}

/// A TCP forwarder to `to`: every connection made to it is relayed; `cut()` shuts every
/// relayed connection down at once, and closes any later one unanswered, as a dead
/// middlebox would.
struct Relay {
    addr: std::net::SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(to: std::net::SocketAddr) -> Self {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let dead: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (kept, gone) = (Arc::clone(&conns), Arc::clone(&dead));
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(a) = c else { return };
                // Relaxed: a flag set once by the test.
                if gone.load(Ordering::Relaxed) {
                    continue; // dropped: closed unanswered
                }
                let Ok(b) = TcpStream::connect(to) else {
                    return;
                };
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                let mut list = kept.lock().unwrap();
                list.push(a.try_clone().unwrap());
                list.push(b.try_clone().unwrap());
                for (mut from, mut into) in
                    [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, conns, dead }
    }

    fn cut(&self) {
        // Relaxed: a flag read by the accept loop.
        self.dead.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_destination_resumes_through_another_address_when_the_first_path_dies() {
    // The first connections go through a relay, which dies mid-postcopy; --reconnect names
    // the source's own address, and the migration resumes there.
    let r = within(Duration::from_secs(60), || {
        let mut c = config(GuestKind::Thread, 16 << 20, HostPageSize::Small, 1);
        c.recover_timeout = Duration::from_secs(10);
        c.link.bandwidth_bps = 200_000_000;
        let src = LocalSource::start(PinPlan::OFF, c.idle_timeout, true).unwrap();
        let relay = Relay::start(src.addr());
        c.reconnect = Some(src.addr());
        let cut = std::sync::atomic::AtomicBool::new(false);
        run_destination(
            relay.addr,
            &c,
            MigrationMode::Preempt,
            Workload::Random,
            &|placed, _| {
                // Relaxed: a one-shot flag of this callback.
                if placed > 500 && !cut.swap(true, Ordering::Relaxed) {
                    relay.cut();
                }
            },
        )
    });
    let r = r.unwrap_or_else(|e| panic!("not resumed through --reconnect: {e}"));
    check_resumed(&r, 1);
}

#[test]
fn a_paused_postcopy_waits_for_its_operator_and_resumes_from_a_new_source_on_the_saved_ram() {
    paused_then_taken_over(GuestKind::Thread, 16 << 20, 30_000_000, Workload::Random);
}

#[test]
fn a_paused_kvm_guest_is_resumed_from_a_new_source_on_the_saved_ram() {
    if !ready_or_skip("a_paused_kvm_guest_is_resumed_from_a_new_source_on_the_saved_ram") {
        return;
    }
    let r = paused_then_taken_over(GuestKind::Kvm, 32 << 20, 60_000_000, Workload::Kv);
    assert_eq!(r.setup.guest, "kvm");
    assert!(
        r.guest_run.guest_verified_pages > 0,
        "the guest verified its RAM"
    );
}

/// A destination paused without a limit (`recover_paused`) whose source, keeping RAM in a
/// `--ram-dir`, is killed mid-postcopy; it waits past its `--recover-timeout`, a new source
/// is started on the directory, and the operator (`pagehint-migrate recover`) points the
/// destination at it: the migration completes and verifies across both sources.
fn paused_then_taken_over(kind: GuestKind, mem: u64, bps: u64, w: Workload) -> RunResult {
    use pagehint_migrate::dest::control::{self, Control};
    use pagehint_migrate::harness::run::run_destination_with;
    let dir = std::env::temp_dir().join(format!("recovery-paused-{kind}-{}", std::process::id()));
    let ram = dir.join("ram");
    std::fs::create_dir_all(&ram).unwrap();
    let ctl = dir.join("ctl");
    let exe = env!("CARGO_BIN_EXE_pagehint-migrate");
    let listen = |once: bool| {
        let mut cmd = Command::new(exe);
        cmd.args(["--listen", "127.0.0.1:0", "--pin", "off", "--ram-dir"])
            .arg(&ram)
            .stderr(Stdio::piped());
        if once {
            cmd.arg("--once");
        }
        start_listener(&mut cmd)
    };
    // Source A keeps guest RAM in files; it is killed (SIGKILL) mid-postcopy.
    let (mut a, a_addr) = listen(false);
    let control = Control::open(&ctl).unwrap();
    let mut c = config(kind, mem, HostPageSize::Small, 1);
    c.idle_timeout = Duration::from_secs(2);
    c.recover_paused = true;
    // Not a limit when paused: the destination waits longer than this below.
    c.recover_timeout = Duration::from_secs(1);
    c.link.bandwidth_bps = bps;
    let placed = std::sync::atomic::AtomicU64::new(0);
    let r = std::thread::scope(|s| {
        let run = s.spawn(|| {
            run_destination_with(
                a_addr.parse().unwrap(),
                &c,
                MigrationMode::PreemptHint,
                w,
                // Relaxed: a progress figure for this test's thread.
                &|n, _| placed.store(n, Ordering::Relaxed),
                Some(&control),
            )
        });
        let t = std::time::Instant::now();
        // Relaxed: a progress figure.
        while placed.load(Ordering::Relaxed) < 300 && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = a.kill();
        let _ = a.wait();
        // Paused, past its --recover-timeout: still waiting, and saying so.
        std::thread::sleep(Duration::from_secs(3));
        let status = control::send(&ctl, "status").unwrap();
        assert!(status.starts_with("paused: "), "{status}");
        assert!(
            !run.is_finished(),
            "the paused destination waits for its operator"
        );
        // Source B, started on the same RAM directory, holds the saved session; the
        // operator points the destination at it.
        let (mut b, b_addr) = listen(true);
        let out = Command::new(exe)
            .args(["recover", "--dest"])
            .arg(&ctl)
            .args(["--connect", &b_addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("resuming from {b_addr}")),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let t = std::time::Instant::now();
        while !run.is_finished() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "not resumed in 60 s: a hang"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = run.join().unwrap();
        let status = within(Duration::from_secs(20), move || b.wait().unwrap());
        assert!(
            status.success(),
            "source B served its one session: {status}"
        );
        r
    });
    let r = r.unwrap_or_else(|e| panic!("the paused postcopy was not resumed: {e}"));
    eprintln!(
        "paused {kind}: {} cut(s), break to resumed {:?} ms (3 s of it waiting for the operator), {} host pages placed per connection {:?}, takeovers {}",
        r.recovery.cuts,
        r.recovery.recovery_ms,
        r.transfer.pending_host_pages,
        r.recovery.placed_per_connection,
        r.recovery.takeovers
    );
    assert!(r.outcome.verified, "{:?}", r.outcome.problems);
    assert_eq!(r.recovery.takeovers, 1, "{:?}", r.recovery.cut_reasons);
    assert!(r.recovery.cuts >= 1);
    assert_eq!(r.placement.placed_twice, 0);
    assert_eq!(
        r.recovery.placed_per_connection.iter().sum::<u64>(),
        r.transfer.pending_host_pages,
        "every missing page placed by exactly one connection, across both sources"
    );
    let left: Vec<_> = std::fs::read_dir(&ram).unwrap().collect();
    assert!(
        left.is_empty(),
        "the finished session's files are gone: {left:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    r
}
