//! The memory a migration holds (issue 26): a one-process run of a KVM guest keeps two copies
//! of guest RAM, the source's and the destination's, and no third. Its own test binary, so
//! that its 512 MiB run does not share the two CPUs with the KVM tests' precopy runs (their
//! dirty-set bounds assume the machine is theirs). Skipped, with the reason, where KVM or
//! kernel-mode userfaultfd is missing; `PAGEHINT_REQUIRE_KVM` turns that into a failure.

mod common;

use std::time::Duration;

use common::within;
use pagehint_migrate::guest::kvm::ready_or_skip;

/// Two copies of guest RAM, not three (issue 26): a one-process run (source and destination
/// in one process, the image built straight into the source's RAM, verification against the
/// checksums and generations the source sends) peaks at no more than 2.1× guest RAM, the
/// warm-up before measuring included. A third copy (a template to copy from, a reference to
/// verify against) would put it at 3×.
#[test]
fn a_one_process_run_holds_two_copies_of_guest_ram() {
    if !ready_or_skip("a_one_process_run_holds_two_copies_of_guest_ram") {
        return;
    }
    const GUEST: u64 = 512 << 20;
    let dir = std::env::temp_dir().join(format!("pagehint-two-copies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, log) = (dir.join("r.json"), dir.join("out.txt"));
    let (status, max_rss_kib) = within(Duration::from_secs(240), {
        let (json, log) = (json.clone(), log.clone());
        move || {
            let out = std::fs::File::create(&log).unwrap();
            // Reaped by `wait4` below, which also returns its peak RSS (`Child::wait` cannot).
            #[allow(clippy::zombie_processes)]
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
                .args([
                    "--mem",
                    "512M",
                    "--modes",
                    "preempt-hint",
                    "--workloads",
                    "random",
                ])
                .args(["--pin", "off", "--quiet", "--json"])
                .arg(&json)
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
            // SAFETY: waits for our own child, writing into the two locals.
            let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
            assert_eq!(
                r,
                child.id() as i32,
                "wait4: {}",
                std::io::Error::last_os_error()
            );
            (status, usage.ru_maxrss as u64)
        }
    });
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}: {out}"
    );
    let whole: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let rows = whole["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{whole}");
    assert_eq!(rows[0]["verified"], true, "{whole}");
    assert_eq!(rows[0]["guest"], "kvm");
    let ratio = (max_rss_kib << 10) as f64 / GUEST as f64;
    println!(
        "peak RSS {} MiB for {} MiB of guest RAM: {ratio:.3}×",
        max_rss_kib >> 10,
        GUEST >> 20
    );
    assert!(
        ratio <= 2.1,
        "peak RSS {max_rss_kib} KiB is {ratio:.3}× guest RAM (at most 2.1×: two copies)"
    );
}
