//! End-to-end migrations of the thread guest through real TCP channels: every mode and
//! workload on userfaultfd (when this process may use it; CI runs as root, where it must),
//! hugetlb host pages, the software fault path; and the protocol's robustness: malformed
//! requests, a dropped connection, a killed source process, a silent source, refused
//! parameters, and verification catching a corrupted page and a page sent twice. Every test
//! bounds its own run time, so a hang is a failure.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{check_verified, command_line, config, huge_pages, is_root, migrate, within};
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::options::{DirtyTracking, FaultPath, GuestKind, SourceFault};
use pagehint_migrate::wire::{Guard, Hello, HelloReply, Role, WireError};
use pagehint_migrate::{
    run_destination, LinkParams, LocalSource, MigrationMode, PinPlan, RunError, Workload,
};

const MEM: u64 = 16 << 20;

fn cfg() -> pagehint_migrate::RunConfig {
    config(GuestKind::Thread, MEM, HostPageSize::Small, 1)
}

#[test]
fn every_mode_and_workload_migrates_and_verifies_on_userfaultfd() {
    let runs = within(Duration::from_secs(120), || {
        let c = cfg();
        let src = LocalSource::start(PinPlan::OFF, c.idle_timeout, true).unwrap();
        let mut out = Vec::new();
        for &w in Workload::ALL {
            for &m in MigrationMode::ALL {
                let r = run_destination(src.addr(), &c, m, w, &|_, _| {});
                out.push(r.unwrap_or_else(|e| panic!("{w} / {m}: {e}")));
            }
        }
        out
    });
    for r in &runs {
        check_verified(r);
        assert_eq!(r.setup.guest, "thread");
        if is_root() {
            assert!(
                r.waits.fault_path.starts_with("userfaultfd"),
                "{}",
                r.waits.fault_path
            );
        }
    }
    let get = |w: &str, m: &str| common::run_of(&runs, w, m);
    // Vanilla never uses the urgent channel; preempt-hint is the only mode with hints.
    assert_eq!(get("random", "vanilla").source.pages_urgent, 0);
    assert_eq!(get("random", "preempt").source.hints_offered, 0);
    let seq = get("seq", "preempt");
    assert!(
        seq.waits.faults > 0 && seq.source.pages_urgent > 0,
        "seq must fault in preempt mode"
    );
    // Whether the scan takes a hint depends on timing (on a loaded machine the scan may
    // finish before the guest's first fault is served): a run that took none is repeated,
    // up to three more times, and one of them must show the scan following the hint.
    let took_hint = get("seq", "preempt-hint").source.hints_taken > 0
        || (0..3).any(|_| {
            let c = cfg();
            let src = LocalSource::start(PinPlan::OFF, c.idle_timeout, true).unwrap();
            run_destination(
                src.addr(),
                &c,
                MigrationMode::PreemptHint,
                Workload::Seq,
                &|_, _| {},
            )
            .is_ok_and(|r| r.source.hints_taken > 0)
        });
    assert!(took_hint, "the scan must follow the hint");
    for r in &runs {
        // One machine: the ping estimate of the clock offset is within the ping's round trip.
        assert!(r.transfer.same_clock);
        assert!(
            r.transfer.clock_offset_us.abs() < 5_000.0,
            "{}",
            r.transfer.clock_offset_us
        );
        assert_eq!(r.setup.blocks, 2);
        assert_eq!(
            r.transfer.pending_host_pages,
            MEM / 4096,
            "pure postcopy: every page pending"
        );
    }
}

#[test]
fn huge_host_pages_are_placed_whole_on_hugetlb() {
    let Some(_huge) = huge_pages(64) else { return };
    let r = within(Duration::from_secs(60), || {
        let c = config(GuestKind::Thread, 64 << 20, HostPageSize::Huge2M, 1);
        migrate(c, MigrationMode::PreemptHint, Workload::Random)
    })
    .unwrap();
    check_verified(&r);
    assert_eq!(r.setup.host_page, 2 << 20);
    assert_eq!(
        r.source.pages_urgent % 512,
        0,
        "urgent pages come in whole 2 MiB host pages"
    );
}

#[test]
fn software_fault_path_migrates_and_says_so() {
    let r = within(Duration::from_secs(60), || {
        let mut c = cfg();
        c.fault_path = FaultPath::Software;
        migrate(c, MigrationMode::Preempt, Workload::Seq)
    })
    .unwrap();
    check_verified(&r);
    assert!(
        r.waits.fault_path.starts_with("software"),
        "{}",
        r.waits.fault_path
    );
    assert_eq!(r.waits.uffd_faults, 0);
    assert!(r.waits.faults > 0);
}

#[test]
fn malformed_requests_are_rejected_counted_and_the_migration_goes_on() {
    for mode in [
        MigrationMode::Vanilla,
        MigrationMode::PreemptHint,
        MigrationMode::PreemptHints,
    ] {
        let r = within(Duration::from_secs(60), move || {
            let mut c = cfg();
            c.hooks.inject_bad = 14;
            migrate(c, mode, Workload::Random)
        })
        .unwrap();
        check_verified(&r);
        assert_eq!(r.source.bad_requests, 14, "{mode}");
        let all = r.source.rejected.join("\n");
        assert!(all.contains("malformed page request"), "{all}");
        assert!(all.contains("out of range"), "{all}");
        assert!(all.contains("unknown stream"), "{all}");
    }
}

#[test]
fn a_dropped_connection_ends_the_run_with_a_clear_error() {
    let start = Instant::now();
    let r = within(Duration::from_secs(30), || {
        let mut c = cfg();
        c.hooks.source.drop_after = 1000;
        migrate(c, MigrationMode::Preempt, Workload::Seq)
    });
    let e = r.expect_err("the source dropped the connections");
    // The drop hook is a crashed source: its session is gone, so the destination's attempt
    // to resume it is refused, with the reason.
    match &e {
        RunError::Recovery { why, .. } => {
            assert!(why.contains("no paused session"), "{why}")
        }
        e => panic!("expected a refused recovery, got {e:?}"),
    }
    assert!(e.to_string().starts_with("connection lost"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_killed_source_process_ends_the_run_with_a_clear_error() {
    let (mut child, addr) = common::start_listener(
        Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
            .args(["--listen", "127.0.0.1:0", "--pin", "off"])
            .stderr(Stdio::null()),
    );
    let addr = addr.parse().unwrap();
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let _ = child.kill();
        let _ = child.wait();
    });
    let r = within(Duration::from_secs(30), move || {
        // A slow link so that the migration is still running when the source dies.
        let mut c = cfg();
        c.link = LinkParams {
            bandwidth_bps: 50_000_000,
            ..c.link
        };
        // The dead source cannot take the session back: recovery gives up after this.
        c.recover_timeout = Duration::from_secs(1);
        run_destination(
            addr,
            &c,
            MigrationMode::PreemptHint,
            Workload::Stream,
            &|_, _| {},
        )
    });
    killer.join().unwrap();
    let e = r.expect_err(&format!("source process {pid} was killed"));
    assert!(e.to_string().starts_with("connection lost"), "{e}");
}

#[test]
fn a_silent_source_times_out_instead_of_hanging() {
    // A fake source that accepts the migration and then sends nothing.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let g = Guard {
            stop: &stop,
            idle: Duration::from_secs(30),
            keepalive: None,
        };
        let mut held = Vec::new();
        for _ in 0..2 {
            let (s, _) = listener.accept().unwrap();
            pagehint_migrate::wire::configure(&s).unwrap();
            let mut b = [0u8; Hello::LEN];
            pagehint_migrate::wire::read_full(
                &s,
                &mut b,
                &g,
                pagehint_migrate::wire::Channel::Handshake,
            )
            .unwrap();
            let h = Hello::decode(&b).unwrap();
            HelloReply {
                error: String::new(),
                token: 5,
                boot_id: pagehint_migrate::sys::clock::boot_id(),
            }
            .write(&s, &g)
            .unwrap();
            assert!(matches!(h.role, Role::Main | Role::Urgent { token: 5 }));
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(20));
        drop(held);
    });
    let start = Instant::now();
    let r = within(Duration::from_secs(15), move || {
        let mut c = cfg();
        c.idle_timeout = Duration::from_secs(1);
        run_destination(addr, &c, MigrationMode::Preempt, Workload::Seq, &|_, _| {})
    });
    let e = r.expect_err("nothing arrives");
    assert!(
        matches!(
            e,
            RunError::Wire(WireError::Timeout(..)) | RunError::Stalled { .. }
        ),
        "{e:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn the_source_refuses_bad_parameters_with_a_reason() {
    let r = within(Duration::from_secs(30), || {
        // The thread guest does not run at the source: there is nothing to track.
        let mut c = cfg();
        c.precopy.tracking = DirtyTracking::Ring;
        migrate(c, MigrationMode::Preempt, Workload::Seq)
    });
    match r {
        Err(RunError::Refused(msg)) => assert!(msg.contains("no dirty tracking"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_command_line_prints_the_comparison_and_writes_json_and_svg() {
    let (stdout, rows, svg) = command_line(
        "pagehint-migrate-thread",
        &[
            "--guest",
            "thread",
            "--mem",
            "16M",
            "--quiet",
            "--workloads",
            "seq,stream",
        ],
    );
    assert!(
        stdout.contains("targets (ratios from this run)"),
        "{stdout}"
    );
    assert!(stdout.contains("thread guest (--guest thread)"), "{stdout}");
    assert_eq!(rows.len(), 6);
    for r in &rows {
        for key in [
            "mode",
            "workload",
            "guest",
            "vcpus",
            "blocks",
            "precopy_rounds",
            "dirty_tracking",
            "faults",
            "fault_p50_us",
            "blocktime_ms",
            "vcpu_blocktime_ms",
            "downtime_ms",
            "request_p50_us",
            "request_p99_us",
            "guest_check_errors",
            "longest_pause_ms",
            "bandwidth_bps",
            "delay_us",
            "claim_batch",
            "stream_rate",
            "seed",
            "verified",
        ] {
            assert!(r.get(key).is_some(), "missing {key} in {r}");
        }
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["guest"], "thread");
    }
    assert!(
        svg.starts_with("<svg") && svg.contains("preempt-hint") && svg.contains("vCPU blocktime")
    );

    // Bad input on the command line: a clear error and a failing status.
    for (args, says) in [
        (
            &["--mem", "16M", "--delay", "5parsecs"][..],
            "bad duration unit",
        ),
        (&["--mem", "16M", "--host-page", "8K"][..], "host page"),
        (
            &["--guest", "thread", "--mem", "16M", "--dirty-ring"][..],
            "needs the KVM guest",
        ),
        (&["--mem", "16M", "--modes", "fast"][..], "unknown mode"),
    ] {
        let bad = Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
            .args(args)
            .output()
            .unwrap();
        assert!(!bad.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn verification_catches_a_corrupted_page_and_a_page_sent_twice() {
    for path in [FaultPath::Auto, FaultPath::Software] {
        for (fault, expect) in [
            (SourceFault::CorruptPage, "differ from the source"),
            (SourceFault::DuplicatePage, "placed twice"),
        ] {
            let r = within(Duration::from_secs(60), move || {
                let mut c = cfg();
                c.fault_path = path;
                c.hooks.source.fault = fault;
                migrate(c, MigrationMode::PreemptHint, Workload::Seq)
            })
            .unwrap();
            assert!(!r.outcome.verified, "{fault:?} on {path:?} went unnoticed");
            let problems = r.outcome.problems.join("; ");
            assert!(
                problems.contains(expect),
                "{fault:?} on {path:?}: {problems}"
            );
            if fault == SourceFault::DuplicatePage && path == FaultPath::Auto && is_root() {
                assert!(problems.contains("EEXIST"), "{problems}");
            }
        }
    }
}

#[test]
fn the_tail_breakdown_adds_up_and_resent_pages_are_counted_duplicates() {
    // Both behaviours on the random workload (software fault path too, where nothing but the
    // copy ledger keeps two placers of a page apart): every requested page is timed stage by
    // stage, the stages add up to its latency, and each dropped duplicate is one the source
    // resent; the old behaviour resends nothing.
    let runs = within(Duration::from_secs(120), || {
        let src = LocalSource::start(PinPlan::OFF, cfg().idle_timeout, true).unwrap();
        let mut out = Vec::new();
        for path in [FaultPath::Auto, FaultPath::Software] {
            for resend in [false, true] {
                let mut c = cfg();
                c.fault_path = path;
                c.resend = resend;
                let r = run_destination(
                    src.addr(),
                    &c,
                    MigrationMode::PreemptHint,
                    Workload::Random,
                    &|_, _| {},
                );
                out.push(r.unwrap_or_else(|e| panic!("{path:?} resend {resend}: {e}")));
            }
        }
        out
    });
    for r in &runs {
        check_verified(r);
        assert_eq!(r.placement.placed_twice, 0);
        let t = &r.tail;
        assert!(
            t.requests > 0 && t.requests <= r.waits.requests_sent,
            "{t:?}"
        );
        for g in [&t.median, &t.slowest_1pct] {
            let s = &g.stages_us;
            let sum = s.request_write
                + s.return_path
                + s.source_serve
                + s.to_wire
                + s.link
                + s.receive
                + s.place;
            assert!((sum - g.latency_us).abs() < 0.01, "{g:?}");
            assert_eq!(g.paths.unknown, 0, "every request has a source record");
        }
        assert!(
            r.placement.duplicate_pages <= r.source.resent_host_pages,
            "{r:?}"
        );
        if r.setup.resend {
            // Resends stay within 1% of the postcopy bytes.
            assert!(
                r.source.resent_bytes * 100 <= r.transfer.postcopy_bytes,
                "{r:?}"
            );
        } else {
            assert_eq!(
                (r.source.resent_host_pages, r.placement.duplicate_pages),
                (0, 0)
            );
        }
    }
}
