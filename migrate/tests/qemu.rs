//! QEMU side by side, the short version CI runs: `pagehint-migrate compare-qemu` migrates a
//! 64 MiB guest running the random workload with QEMU 11.1 (postcopy-preempt with its page
//! hint) and with pagehint (preempt-hint), each on QEMU's transport and on pagehint's, over a
//! 1 Gbit/s `tbf`-shaped veth between two network namespaces, once, plus the run that
//! measures what tracing costs QEMU. It checks that every migration completed with the
//! guest alive and that **no figure is empty**: every row that made requests has a request
//! latency (QEMU's from its own `query-migrate` histogram, untraced), blocktime, total time
//! and CPU per GiB above 0 and finite, QEMU on pagehint's transport really had its sockets
//! configured by the preload library, the ratios of the attribution table are measured, and
//! the traced run's two latency sources both have samples. No timing thresholds: those are
//! the full comparison's, printed, not asserted.
//!
//! Two more, on QEMU 11.1 and pagehint's preempt-hint and preempt-hints over QEMU's transport,
//! check the same guest with **two vCPUs** (`--vcpus 2`: QEMU `-smp 2`, every vCPU alive, one
//! blocktime per vCPU on both peers and the "vCPUs blocked" sum with its ratios) and on **2 MiB
//! host pages** (`--host-page 2M`: QEMU's RAM on a hugetlb memfd; skipped with the reason where
//! the huge page pool cannot be filled, unless `PAGEHINT_REQUIRE_KVM` or
//! `PAGEHINT_REQUIRE_QEMU` is set).
//!
//! It needs KVM, root, QEMU 11.1 in the private prefix `scripts/install-deps.sh` fills, and
//! the pace-preload library (built here if missing). Where one is missing it says so and
//! skips, unless `PAGEHINT_REQUIRE_QEMU` is set (`scripts/test-all.sh` sets it where QEMU is
//! installed and `/dev/kvm` opens), which turns the skip into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use pagehint_migrate::guest::kvm::ready_or_skip;
use pagehint_migrate::qemu::cli::default_qemu11;
use pagehint_migrate::sys::hugepages::HugePages;
use serde_json::Value;

#[path = "common/scratch.rs"]
mod scratch;
use scratch::Scratch;

/// One comparison at a time: each takes both CPUs (and the 2 MiB one the huge page pool).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `compare-qemu` with `args` (plus `--workdir`, `--json` and `--svg` in `dir`); checks
/// it succeeded; returns its JSON document and stdout.
fn compare_qemu(dir: &Path, args: &[&str]) -> (Value, String) {
    let json = dir.join("side.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
        .arg("compare-qemu")
        .args(args)
        .arg("--workdir")
        .arg(dir.join("work"))
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(dir.join("side.svg"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compare-qemu failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let c: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (c, stdout)
}

fn ready(test: &str) -> bool {
    if !ready_or_skip(test) {
        return false;
    }
    let qemu11 = default_qemu11();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("the shaped link needs root (network namespaces, tc)".to_string())
    } else {
        match Command::new(&qemu11).arg("--version").output() {
            Ok(o)
                if o.status.success()
                    && String::from_utf8_lossy(&o.stdout).contains("version 11.1") =>
            {
                None
            }
            Ok(o) => Some(format!(
                "{} --version: {} {}",
                qemu11.display(),
                o.status,
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
            )),
            Err(e) => Some(format!(
                "{} does not run ({e}); scripts/install-deps.sh installs QEMU 11.1 there",
                qemu11.display()
            )),
        }
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("PAGEHINT_REQUIRE_QEMU").is_some() => {
            panic!("{test}: PAGEHINT_REQUIRE_QEMU is set, but: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// The pace-preload library beside the harness binary, built with the same profile if
/// missing (`cargo test -p pagehint-migrate` alone does not build other workspace members).
fn preload() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_pagehint-migrate"));
    let dir = exe.parent().unwrap();
    let find = || {
        [dir.to_path_buf(), dir.join("deps")]
            .iter()
            .map(|d| d.join("libpagehint_pace_preload.so"))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return p;
    }
    let mut c = Command::new(env!("CARGO"));
    c.args(["build", "-p", "pagehint-pace-preload"]);
    if dir.ends_with("release") {
        c.arg("--release");
    }
    let st = c.status().expect("cargo runs");
    assert!(st.success(), "building pagehint-pace-preload: {st}");
    find().unwrap_or_else(|| panic!("no libpagehint_pace_preload.so in {}", dir.display()))
}

/// A figure that must be measured: above 0 and finite.
fn measured(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what}: empty figure {x}");
    x
}

#[test]
fn qemu_11_and_pagehint_migrate_the_guest_on_both_transports_with_no_empty_figure() {
    let test = "qemu_11_and_pagehint_migrate_the_guest_on_both_transports_with_no_empty_figure";
    if !ready(test) {
        return;
    }
    let preload = preload();
    let _one = one_at_a_time();
    let dir = Scratch::new("pagehint-qemu", "test");
    let preload = preload.to_string_lossy();
    let (c, stdout) = compare_qemu(
        &dir,
        &[
            "--mem",
            "64M",
            "--workloads",
            "random",
            "--links",
            "1G",
            "--repeat",
            "1",
            "--qemu10",
            "none",
            "--qemu-modes",
            "preempt",
            "--modes",
            "preempt-hint",
            "--transports",
            "qemu,pagehint",
            "--preload",
            &preload,
        ],
    );
    let qemus = c["qemus"].as_array().unwrap();
    assert_eq!(qemus.len(), 1);
    assert!(qemus[0]["version"]
        .as_str()
        .unwrap()
        .contains("version 11.1"));
    let link = &c["links"][0];
    assert_eq!(link["name"], "1G");
    let measured_bps = link["measured_bps"].as_f64().unwrap();
    assert!(
        measured_bps > 0.5e9 && measured_bps < 1.1e9,
        "the tbf shapes the link: {measured_bps} bit/s"
    );
    let rows = c["rows"].as_array().unwrap();
    let who: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["peer"].as_str().unwrap(),
                r["mode"].as_str().unwrap(),
                r["transport"].as_str().unwrap(),
            )
        })
        .collect();
    let q = qemus[0]["label"].as_str().unwrap();
    assert_eq!(
        who,
        [
            (q, "preempt", "qemu"),
            (q, "preempt", "pagehint"),
            ("pagehint", "preempt-hint", "qemu"),
            ("pagehint", "preempt-hint", "pagehint"),
        ]
    );
    for r in rows {
        let name = format!("{} {} [{}]", r["peer"], r["mode"], r["transport"]);
        assert_eq!(r["completed"], true, "{name}: {}", r["error"]);
        assert_eq!(
            r["guest_alive"], true,
            "{name}: the guest did not survive: {}",
            r["error"]
        );
        assert_eq!(r["guest_errors"], 0, "{name}");
        let requests = r["requests"].as_u64().unwrap();
        assert!(requests > 0, "{name}: the random guest faults");
        let lat = &r["latency"];
        assert!(
            lat.is_object(),
            "{name}: {requests} requests and no latency"
        );
        assert!(
            lat["samples"].as_u64().unwrap() > 0,
            "{name}: no latency samples"
        );
        let p50 = measured(&lat["p50_us"], &format!("{name} p50"));
        let p99 = measured(&lat["p99_us"], &format!("{name} p99"));
        assert!(p99 >= p50, "{name}: p99 {p99} < p50 {p50}");
        measured(&r["blocktime_ms"], &format!("{name} blocktime"));
        measured(&r["span_ms"], &format!("{name} total"));
        measured(&r["cpu_ms_per_gib"], &format!("{name} CPU per GiB"));
        assert!(
            r["postcopy_bytes"].as_u64().unwrap() >= 32 << 20,
            "{name}: RAM went over in postcopy"
        );
        if r["peer"] == q {
            assert_eq!(lat["source"], "qmp-histogram", "{name}: QEMU 11.1 untraced");
            assert_eq!(r["traced"], false, "{name}");
            let threads = r["cpu_threads"].as_object().unwrap();
            assert!(
                threads.contains_key("src:mig/src/main"),
                "{name}: {threads:?}"
            );
            assert!(
                threads.contains_key("dst:mig/dst/listen"),
                "{name}: {threads:?}"
            );
        } else {
            let threads = r["cpu_threads"].as_object().unwrap();
            assert!(
                threads.contains_key("src:ph/src/bulk"),
                "{name}: {threads:?}"
            );
            assert!(
                threads.contains_key("dst:ph/dst/bulk"),
                "{name}: {threads:?}"
            );
        }
        if r["peer"] == q && r["transport"] == "pagehint" {
            let s = &r["preloaded_sockets"];
            assert!(
                s[0].as_u64().unwrap() >= 1 && s[1].as_u64().unwrap() >= 1,
                "{name}: the preload library configured no socket: {s}"
            );
        }
    }
    // Every ratio of the attribution table of request latency is measured and finite.
    let splits = c["splits"].as_array().unwrap();
    for s in splits
        .iter()
        .filter(|s| s["figure"] == "p50" || s["figure"] == "p99")
    {
        for k in [
            "shipped",
            "sched_qemu_transport",
            "sched_pagehint_transport",
            "transport_pagehint",
            "transport_qemu",
        ] {
            let m = &s[k]["Measured"];
            assert!(m.is_object(), "{} {k}: {}", s["figure"], s[k]);
            measured(&m["median"], &format!("{} {k}", s["figure"]));
        }
    }
    assert!(
        splits.iter().any(|s| s["figure"] == "p99"),
        "the attribution table has the p99 row"
    );
    // What tracing costs QEMU, and its own latency against its trace's, from one run.
    let probes = c["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 1, "{probes:?}");
    let p = &probes[0];
    assert!(p["error"].is_null(), "{}", p["error"]);
    for k in ["qmp_latency", "trace_latency"] {
        assert!(p[k]["samples"].as_u64().unwrap() > 0, "probe {k}: {}", p[k]);
        measured(&p[k]["p50_us"], &format!("probe {k} p50"));
    }
    assert!(stdout.contains("targets (medians over the repeats"));
    assert!(stdout.contains("what tracing costs QEMU"));
    assert!(!c["targets"].as_array().unwrap().is_empty());
    let svg = std::fs::read_to_string(dir.join("side.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

/// Checks a `--vcpus 2` comparison of QEMU 11.1 preempt against pagehint preempt-hint and
/// preempt-hints on QEMU's transport: every run completed with every vCPU alive, and every
/// row has its blocktime, **one blocked time per vCPU** (each above 0: the random guest
/// faults on both), their sum, and the "vCPUs blocked" ratios against both pagehint modes.
fn check_two_vcpus(c: &Value, stdout: &str, what: &str) {
    let q = c["qemus"][0]["label"].as_str().unwrap();
    let rows = c["rows"].as_array().unwrap();
    let who: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["peer"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        who,
        [
            (q, "preempt"),
            ("pagehint", "preempt-hint"),
            ("pagehint", "preempt-hints")
        ],
        "{what}"
    );
    for r in rows {
        let name = format!("{what}: {} {}", r["peer"], r["mode"]);
        assert_eq!(r["completed"], true, "{name}: {}", r["error"]);
        assert_eq!(r["guest_alive"], true, "{name}: {}", r["error"]);
        assert_eq!(r["guest_errors"], 0, "{name}");
        measured(&r["blocktime_ms"], &format!("{name} blocktime"));
        let per = r["vcpu_blocktime_ms"].as_array().unwrap();
        assert_eq!(per.len(), 2, "{name}: one blocked time per vCPU: {per:?}");
        let sum: f64 = per
            .iter()
            .enumerate()
            .map(|(i, v)| measured(v, &format!("{name} vCPU {i} blocked")))
            .sum();
        // Every vCPU blocked at once is no longer than any one vCPU blocked: pagehint's
        // figures hold to it. QEMU's are QEMU's, reported as it gives them: QEMU 11.1 on
        // 2 MiB pages once gave postcopy-blocktime 1092 ms beside per-vCPU figures summing
        // to 786 ms (the README says so).
        let bt = r["blocktime_ms"].as_f64().unwrap();
        if r["peer"] == "pagehint" {
            assert!(
                bt <= sum + 1.0,
                "{name}: blocktime {bt} > vCPUs blocked {sum}"
            );
        }
        let lat = &r["latency"];
        measured(&lat["p50_us"], &format!("{name} p50"));
    }
    // Against each pagehint mode, the blocktime ratios are measured where both runs made
    // enough requests for one (MIN_REQUESTS, 20), and "not comparable" with the counts where
    // not: never missing.
    let splits = c["splits"].as_array().unwrap();
    let requests = |peer: &str, mode: &str| {
        rows.iter()
            .find(|r| r["peer"] == peer && r["mode"] == mode)
            .unwrap()["requests"]
            .as_u64()
            .unwrap()
    };
    for mode in ["preempt-hint", "preempt-hints"] {
        let enough = requests(q, "preempt").min(requests("pagehint", mode)) >= 20;
        for figure in ["blocktime", "vcpus-blocked"] {
            let s = splits
                .iter()
                .find(|s| s["mode"] == mode && s["figure"] == figure)
                .unwrap_or_else(|| panic!("{what}: no {figure} split against {mode}"));
            let r = &s["sched_qemu_transport"];
            if enough {
                assert!(r["Measured"].is_object(), "{what} {mode} {figure}: {r}");
                measured(&r["Measured"]["median"], &format!("{what} {mode} {figure}"));
            } else {
                assert!(
                    r["NotComparable"].is_object(),
                    "{what} {mode} {figure}: {r}"
                );
            }
        }
    }
    assert!(stdout.contains("vCPUs blocked"), "{what}: {stdout}");
    assert!(
        stdout.contains("pagehint preempt-hints (above 1"),
        "{what}: the attribution against preempt-hints: {stdout}"
    );
}

/// The arguments of a short two-vCPU comparison on QEMU's transport.
const TWO_VCPUS: [&str; 18] = [
    "--vcpus",
    "2",
    "--workloads",
    "random",
    "--links",
    "1G",
    "--repeat",
    "1",
    "--qemu10",
    "none",
    "--qemu-modes",
    "preempt",
    "--modes",
    "preempt-hint,preempt-hints",
    "--transports",
    "qemu",
    "--trace-cost",
    "off",
];

#[test]
fn two_vcpus_migrate_on_qemu_11_and_pagehint_with_a_blocked_time_per_vcpu() {
    let test = "two_vcpus_migrate_on_qemu_11_and_pagehint_with_a_blocked_time_per_vcpu";
    if !ready(test) {
        return;
    }
    let _one = one_at_a_time();
    let dir = Scratch::new("pagehint-qemu", "smp");
    let mut args = vec!["--mem", "64M"];
    args.extend(TWO_VCPUS);
    let (c, stdout) = compare_qemu(&dir, &args);
    assert!(
        c["setup"]
            .as_str()
            .unwrap()
            .contains("2 vCPUs, 64 MiB, 4 KiB"),
        "{}",
        c["setup"]
    );
    check_two_vcpus(&c, &stdout, "2 vCPUs, 4 KiB");
}

#[test]
fn two_vcpus_migrate_on_2m_hugetlb_pages_on_both_peers() {
    let test = "two_vcpus_migrate_on_2m_hugetlb_pages_on_both_peers";
    if !ready(test) {
        return;
    }
    let _one = one_at_a_time();
    // 128 MiB (the least with 2 MiB pages), a source's and a destination's at once.
    let _huge = match HugePages::reserve(2 * 64) {
        Ok(h) => h,
        Err(e)
            if std::env::var_os("PAGEHINT_REQUIRE_KVM").is_some()
                || std::env::var_os("PAGEHINT_REQUIRE_QEMU").is_some() =>
        {
            panic!("{test}: PAGEHINT_REQUIRE_KVM/QEMU is set, but the huge page pool: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: the huge page pool: {e}");
            return;
        }
    };
    let dir = Scratch::new("pagehint-qemu", "huge");
    let mut args = vec!["--mem", "128M", "--host-page", "2M"];
    args.extend(TWO_VCPUS);
    let (c, stdout) = compare_qemu(&dir, &args);
    assert!(
        c["setup"]
            .as_str()
            .unwrap()
            .contains("2 vCPUs, 128 MiB, 2 MiB (hugetlb)"),
        "{}",
        c["setup"]
    );
    check_two_vcpus(&c, &stdout, "2 vCPUs, 2 MiB");
}
