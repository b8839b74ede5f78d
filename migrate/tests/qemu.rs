//! QEMU side by side, the short version CI runs: `pagehint-migrate compare-qemu` migrates a
//! 64 MiB guest running the random workload with QEMU (vanilla, preempt) and with pagehint
//! (vanilla, preempt, preempt-hint) over a 1 Gbit/s `tbf`-shaped veth between two network
//! namespaces. It checks that every migration completed and that the guest survived it (no
//! timing thresholds: those are the full comparison's, printed, not asserted).
//!
//! It needs KVM, root and QEMU. Where one is missing it says so and skips, unless
//! `PAGEHINT_REQUIRE_QEMU` is set (`scripts/test-all.sh` sets it where it installed QEMU and
//! `/dev/kvm` opens), which turns the skip into a failure.

use std::process::Command;

use pagehint_migrate::guest::kvm::ready_or_skip;

fn ready(test: &str) -> bool {
    if !ready_or_skip(test) {
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("the shaped link needs root (network namespaces, tc)".to_string())
    } else {
        match Command::new("qemu-system-x86_64").arg("--version").output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("qemu-system-x86_64 --version failed: {}", o.status)),
            Err(e) => Some(format!(
                "qemu-system-x86_64 does not run ({e}); scripts/install-deps.sh installs it"
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

#[test]
fn qemu_and_pagehint_both_migrate_the_guest_over_the_same_shaped_link() {
    let test = "qemu_and_pagehint_both_migrate_the_guest_over_the_same_shaped_link";
    if !ready(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pagehint-qemu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("side.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
        .args([
            "compare-qemu",
            "--mem",
            "64M",
            "--workloads",
            "random",
            "--links",
            "1G",
        ])
        .arg("--workdir")
        .arg(dir.join("work"))
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(dir.join("side.svg"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compare-qemu failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(c["qemu_version"].as_str().unwrap().contains("QEMU"));
    let link = &c["links"][0];
    assert_eq!(link["name"], "1G");
    let measured = link["measured_bps"].as_f64().unwrap();
    assert!(
        measured > 0.5e9 && measured < 1.1e9,
        "the tbf shapes the link: {measured} bit/s"
    );
    let rows = c["rows"].as_array().unwrap();
    let who: Vec<(bool, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["peer"].as_str().unwrap().starts_with("QEMU"),
                r["mode"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        who,
        [
            (true, "vanilla"),
            (true, "preempt"),
            (false, "vanilla"),
            (false, "preempt"),
            (false, "preempt-hint")
        ]
    );
    for r in rows {
        let name = format!("{} {}", r["peer"], r["mode"]);
        assert_eq!(r["completed"], true, "{name}: {}", r["error"]);
        assert_eq!(
            r["guest_alive"], true,
            "{name}: the guest did not survive: {}",
            r["error"]
        );
        assert_eq!(r["guest_errors"], 0, "{name}");
        assert!(
            r["requests"].as_u64().unwrap() > 0,
            "{name}: the random guest faults"
        );
        assert!(
            r["postcopy_bytes"].as_u64().unwrap() >= 32 << 20,
            "{name}: RAM went over in postcopy"
        );
        assert!(
            r["request_p50_us"].as_f64().unwrap() > 0.0,
            "{name}: latencies measured"
        );
    }
    assert!(stdout.contains("targets (ratios from this run)"));
    let svg = std::fs::read_to_string(dir.join("side.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let _ = std::fs::remove_dir_all(&dir);
}
