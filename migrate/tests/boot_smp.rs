//! The boot disk with several vCPUs under QEMU: the bootstrap processor wakes the others
//! (INIT and start-up IPIs), each enters long mode and runs the same program with its own
//! vCPU index, and each one's status page shows it running its own workload with no failed
//! check; a machine with more processors than the image's vCPUs runs the image's count and
//! parks the rest. No migration: `compare-qemu` migrates this guest.
//!
//! It needs KVM and QEMU (`qemu-system-x86_64`). Where one is missing it says so and skips,
//! unless `PAGEHINT_REQUIRE_QEMU` is set (`scripts/test-all.sh` sets it where it installed
//! QEMU and `/dev/kvm` opens), which turns the skip into a failure.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pagehint_migrate::guest::disk::{self, DiskSpec, MAILBOX};
use pagehint_migrate::guest::kvm::program::mailbox as mb;
use pagehint_migrate::guest::kvm::{frame_tsc, ready_or_skip, vm::host_tsc_khz, GuestCounters};
use pagehint_migrate::guest::layout::{GuestLayout, HostPageSize, TARGET_PAGE};
use pagehint_migrate::guest::{Workload, STREAM_FRAME_PAGES};
use pagehint_migrate::qemu::qmp::Qmp;
use serde_json::json;

const QEMU: &str = "qemu-system-x86_64";

fn ready(test: &str) -> bool {
    if !ready_or_skip(test) {
        return false;
    }
    let why = match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!("{QEMU} --version failed: {}", o.status),
        Err(e) => format!("{QEMU} does not run ({e}); scripts/install-deps.sh installs it"),
    };
    if std::env::var_os("PAGEHINT_REQUIRE_QEMU").is_some() {
        panic!("{test}: PAGEHINT_REQUIRE_QEMU is set, but: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// A QEMU that is killed when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the disk for `vcpus` vCPUs running `w` on a QEMU with `smp` processors, and returns
/// the status pages of the first `pages` vCPUs once every vCPU of the image has checked
/// pages (or after 3 minutes: on a loaded machine the firmware alone took 40 s).
fn boot(dir: &Path, vcpus: u32, smp: u32, w: Workload, pages: u32) -> Vec<GuestCounters> {
    let layout = GuestLayout::new(32 << 20, HostPageSize::Small, vcpus).unwrap();
    let spec = DiskSpec {
        layout,
        workload: w,
        seed: 3,
        frame_tsc: frame_tsc(64 << 20, STREAM_FRAME_PAGES, host_tsc_khz().unwrap()),
    };
    let img = dir.join(format!("guest-{vcpus}-{smp}-{w}.img"));
    std::fs::write(&img, disk::image(&spec).unwrap()).unwrap();
    let sock = dir.join(format!("qmp-{vcpus}-{smp}-{w}"));
    let _ = std::fs::remove_file(&sock);
    let _vm = Vm(Command::new(QEMU)
        .args([
            "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "32M",
        ])
        .args(["-smp", &smp.to_string()])
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
            img.display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let mut q = Qmp::connect(&sock, "guest", Duration::from_secs(10)).unwrap();
    let mut read = |i: u32| {
        let file = dir.join(format!("status-{vcpus}-{smp}-{w}-{i}.bin"));
        let addr = MAILBOX + u64::from(i) * TARGET_PAGE;
        q.execute(
            "pmemsave",
            json!({"val": addr, "size": TARGET_PAGE, "filename": file.to_string_lossy()}),
        )
        .unwrap();
        let page = std::fs::read(&file).unwrap();
        GuestCounters::decode(|o| {
            let o = o as usize;
            u64::from_le_bytes(page[o..o + 8].try_into().unwrap())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let c: Vec<GuestCounters> = (0..pages).map(&mut read).collect();
        if c[..vcpus as usize].iter().all(|c| c.ops > 100) || Instant::now() > deadline {
            return c;
        }
    }
}

#[test]
fn every_vcpu_of_the_boot_disk_runs_the_program_under_qemu() {
    let test = "every_vcpu_of_the_boot_disk_runs_the_program_under_qemu";
    if !ready(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pagehint-boot-smp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The three machines boot at once (the firmware is slow on a loaded machine); the third
    // has three processors for an image of two vCPUs.
    let [two, four, three] = std::thread::scope(|s| {
        [
            (2, 2, Workload::Seq, 2),
            (4, 4, Workload::Mixed, 4),
            (2, 3, Workload::Seq, 3),
        ]
        .map(|(vcpus, smp, w, pages)| {
            let dir = &dir;
            s.spawn(move || boot(dir, vcpus, smp, w, pages))
        })
        .map(|h| h.join().unwrap())
    });
    for (vcpus, w, c) in [(2, Workload::Seq, two), (4, Workload::Mixed, four)] {
        for (i, c) in c.iter().enumerate() {
            assert_eq!(c.state, mb::RUNNING, "{w}, {vcpus} vCPUs: vCPU {i}: {c:?}");
            assert!(
                c.ops > 100,
                "{w}, {vcpus} vCPUs: vCPU {i} ran no workload: {c:?}"
            );
            assert_eq!(c.errors, 0, "{w}, vCPU {i}: {:?}", c.first_error_text());
        }
        // Every vCPU that plays a stream plays frames; kv (and seq) vCPUs play none.
        for (i, c) in c.iter().enumerate() {
            let plays = w.role(i as u32) == Workload::Stream;
            assert_eq!(c.frames > 0, plays, "{w}: vCPU {i}: {c:?}");
        }
    }
    // Three processors for an image of two vCPUs: the third parks, its status page untouched.
    let c = three;
    assert!(c[..2].iter().all(|c| c.ops > 100 && c.errors == 0), "{c:?}");
    assert_eq!(c[2], GuestCounters::default(), "the extra processor parked");
    let _ = std::fs::remove_dir_all(&dir);
}
