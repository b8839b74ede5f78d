//! `pagehint-uffd serve` as a process, as Firecracker meets it: every hostile handshake
//! makes it exit non-zero at once (and without burning CPU); a fatal error kills the VMM
//! (the `SO_PEERCRED` process), or only tells it with `--on-fatal notify`; a VMM in another
//! process is served with each handshake format (v1.7–v1.11 close the socket, and the
//! session ends when the VMM exits); and the README's restore steps run, in order, as
//! written.

#[path = "../../tests/common/scratch.rs"]
mod scratch;
#[path = "../../tests/common/within.rs"]
mod within;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pagehint_migrate::guest::kvm::ready_or_skip;
use pagehint_uffd::protocol::send_raw;
use scratch::Scratch;
use within::within;

const BIN: &str = env!("CARGO_BIN_EXE_pagehint-uffd");

fn tmp(name: &str) -> Scratch {
    Scratch::new("pagehint-serve", name)
}

/// `serve` on `dir/uffd.sock` over a 1 MiB memory file, with `extra` flags; returns once
/// the socket exists.
fn start_serve(dir: &Path, extra: &[&str]) -> (Child, PathBuf) {
    let mem = dir.join("mem");
    std::fs::write(&mem, vec![7u8; 1 << 20]).unwrap();
    let sock = dir.join("uffd.sock");
    let child = Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg("--mem-file")
        .arg(&mem)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, sock)
}

/// How a child ended: its status, and the CPU time it used (from `wait4`).
struct Ended {
    code: Option<i32>,
    signal: Option<i32>,
    cpu: Duration,
}

/// Waits up to `limit` for `pid` (a child) to end.
fn wait_for(pid: i32, limit: Duration) -> Ended {
    let t = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: plain out-parameters.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our child; WNOHANG never blocks.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            let tv = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
            };
            return Ended {
                code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
                signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
            };
        }
        assert!(
            t.elapsed() < limit,
            "pid {pid} still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// A blocking userfaultfd (no `O_NONBLOCK`).
fn blocking_uffd() -> Option<OwnedFd> {
    // SAFETY: userfaultfd(2) with flags only.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    // SAFETY: a new descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const ONE: &[u8] = br#"[{"base_host_virt_addr":1073741824,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;

/// Every hostile handshake makes `serve` exit non-zero, at once, with the reason on stderr,
/// having used almost no CPU (no busy loop while it waited).
#[test]
fn every_hostile_handshake_makes_serve_exit_non_zero_at_once() {
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let null = devnull.as_fd();
    let blocking = blocking_uffd();
    type Hostile<'a> = Box<dyn Fn(&UnixStream) + 'a>;
    let mut cases: Vec<(&str, Hostile<'_>, &str)> = vec![
        (
            "/dev/null as the descriptor",
            Box::new(|s| send_raw(s, ONE, Some(null)).unwrap()),
            "not a userfaultfd (it is /dev/null",
        ),
        (
            "malformed JSON",
            Box::new(|s| send_raw(s, b"[{\"base_host_virt_addr\": oops", Some(null)).unwrap()),
            "malformed",
        ),
        (
            "no descriptor",
            Box::new(|s| send_raw(s, ONE, None).unwrap()),
            "no userfaultfd",
        ),
        (
            "closed before sending",
            Box::new(|s| s.shutdown(std::net::Shutdown::Both).unwrap()),
            "closed the socket",
        ),
        (
            "silent",
            Box::new(|_| std::thread::sleep(Duration::from_millis(600))),
            "no complete handshake",
        ),
        (
            "regions past the memory file",
            Box::new(|s| {
                let past = br#"[{"base_host_virt_addr":1073741824,"size":4194304,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
                send_raw(s, past, Some(null)).unwrap()
            }),
            "past the memory file",
        ),
        (
            "formats mixed",
            Box::new(|s| {
                let mixed = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":8192,"size":4096,"offset":4096,"page_size_kib":4096}]"#;
                send_raw(s, mixed, Some(null)).unwrap()
            }),
            "region 1",
        ),
    ];
    if let Some(b) = &blocking {
        let b = b.as_fd();
        cases.push((
            "a blocking userfaultfd",
            Box::new(move |s| send_raw(s, ONE, Some(b)).unwrap()),
            "blocking mode",
        ));
    }
    for (what, hostile, want) in &cases {
        let dir = tmp("hostile");
        let (mut child, sock) = start_serve(
            &dir,
            &["--on-fatal", "notify", "--handshake-timeout", "300ms"],
        );
        let s = UnixStream::connect(&sock).unwrap();
        hostile(&s);
        let end = wait_for(child.id() as i32, Duration::from_secs(10));
        drop(s);
        let err = stderr_of(&mut child);
        assert_eq!(end.code, Some(1), "{what}: {err}");
        assert!(err.contains(want), "{what}: {err}");
        assert!(err.contains("left running"), "{what}: {err}");
        assert!(
            end.cpu < Duration::from_millis(500),
            "{what}: {:?}",
            end.cpu
        );
    }
}

/// A VMM in another process that sends a descriptor that is no userfaultfd: `serve` kills it
/// (`SIGKILL` to the `SO_PEERCRED` pid, as Firecracker's example handler does) and exits
/// non-zero, naming it.
#[test]
fn a_fatal_error_kills_the_vmm() {
    let dir = tmp("kill");
    let (mut child, sock) = start_serve(&dir, &[]);
    let vmm = within(Duration::from_secs(10), move || fork_hostile_vmm(&sock));
    let killed = wait_for(vmm, Duration::from_secs(10));
    assert_eq!(killed.signal, Some(libc::SIGKILL), "the VMM was killed");
    let end = wait_for(child.id() as i32, Duration::from_secs(10));
    let err = stderr_of(&mut child);
    assert_eq!(end.code, Some(1), "{err}");
    assert!(
        err.contains(&format!("killed the VMM (pid {vmm})")),
        "{err}"
    );
}

/// Forks a "VMM" that connects to `sock`, sends a handshake with `/dev/null` as its
/// descriptor, and waits to be killed. Everything the child needs is built before the fork:
/// the child makes system calls only.
fn fork_hostile_vmm(sock: &Path) -> i32 {
    let devnull = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: plain C structures, zero is valid for each.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = sock.as_os_str().as_encoded_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (d, &b) in addr.sun_path.iter_mut().zip(path) {
        *d = b as libc::c_char;
    }
    let mut iov = libc::iovec {
        iov_base: ONE.as_ptr() as *mut libc::c_void,
        iov_len: ONE.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_* compute sizes and walk our own buffer, which holds one descriptor.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        *libc::CMSG_DATA(c).cast::<i32>() = devnull.as_raw_fd();
    }
    // SAFETY: the child only makes system calls (no allocation, no locks) and never returns.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if s < 0 || libc::connect(s, (&raw const addr).cast(), len) != 0 {
                libc::_exit(3);
            }
            if libc::sendmsg(s, &msg, 0) < 0 {
                libc::_exit(4);
            }
            loop {
                libc::pause();
            }
        }
        pid
    }
}

/// Runs `serve` and `restore` as two processes over a real KVM guest, once with each
/// handshake format: both exit 0, the guest's checks are clean, and the session ends as
/// the format says (v1.7–v1.11: the VMM's process exits; v1.12+: its socket closes).
#[test]
fn a_vmm_in_another_process_is_served_with_each_handshake() {
    if !ready_or_skip("a_vmm_in_another_process_is_served_with_each_handshake") {
        return;
    }
    within(Duration::from_secs(240), || {
        let dir = Scratch::for_bytes("pagehint-serve", "two-processes", 40 << 20);
        let snap = dir.join("snap");
        let out = Command::new(BIN)
            .args(["snapshot", "--mem", "32M", "--workload", "kv", "--dir"])
            .arg(&snap)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // How each session ends: v1.7-v1.11 when the VMM's process exits (or, if a prefetcher
        // notices first, when its address space is gone); v1.12+ when its socket closes
        // (which it does before it exits).
        for (release, ended_by, format) in [
            ("1.9", ["vmm-exited", "address-space-gone"], "v1.7-v1.11"),
            ("1.16", ["socket-closed", "address-space-gone"], "v1.12+"),
        ] {
            let sock = dir.join(format!("uffd-{release}.sock"));
            let json = dir.join(format!("serve-{release}.json"));
            let mut serve = Command::new(BIN)
                .args(["serve", "--policy", "pagehint", "--socket"])
                .arg(&sock)
                .arg("--mem-file")
                .arg(snap.join("mem"))
                .arg("--json")
                .arg(&json)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let restore = Command::new(BIN)
                .args([
                    "restore",
                    "--run-for",
                    "200ms",
                    "--firecracker",
                    release,
                    "--dir",
                ])
                .arg(&snap)
                .arg("--socket")
                .arg(&sock)
                .output()
                .unwrap();
            let served = wait_for(serve.id() as i32, Duration::from_secs(60));
            let err = stderr_of(&mut serve);
            assert!(
                restore.status.success(),
                "{release}: {}",
                String::from_utf8_lossy(&restore.stderr)
            );
            assert_eq!(served.code, Some(0), "{release}: {err}");
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
            assert!(
                ended_by.iter().any(|e| r["ended_by"] == *e),
                "{release}: {r}"
            );
            assert_eq!(r["handshake"], format, "{release}: {r}");
            assert_eq!(r["eexist"], 0, "{release}: {r}");
            assert_eq!(r["watched_vmm_process"], true, "{release}: {r}");
            let o: serde_json::Value = serde_json::from_slice(&restore.stdout).unwrap();
            assert_eq!(o["errors"], 0, "{release}: {o}");
            assert!(o["window_ops"].as_u64().unwrap() > 0, "{release}: {o}");
        }
    });
}

/// The README's restore section: its first `sh` block, run in order by `bash -e` as
/// written, with three substitutions (this build's binary for `target/release/...`, a
/// temporary directory for `/tmp/`, a free port for 7070), after the build line; and every
/// `pagehint-uffd` command of the section (the comparison's too) parses.
#[test]
fn the_readme_restore_steps_run_in_order() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme
        .split("\n## Snapshot restore with pagehint-uffd\n")
        .nth(1)
        .expect("the README's restore section")
        .split("\n## ")
        .next()
        .unwrap();
    let blocks: Vec<&str> = section
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 2, "the steps, and the comparison");
    let bin = "target/release/pagehint-uffd";
    for b in &blocks {
        for line in b.lines().filter(|l| l.starts_with(bin)) {
            let cmd = line.split(" &").next().unwrap().split(" #").next().unwrap();
            let args: Vec<&str> = cmd.split_whitespace().collect();
            let parsed = <pagehint_uffd::cli::Cli as clap::Parser>::try_parse_from(&args)
                .map_err(|e| e.to_string())
                .and_then(|c| c.action());
            assert!(parsed.is_ok(), "{line}: {:?}", parsed.err());
        }
    }
    let steps = blocks[0];
    let first = steps.lines().next().unwrap();
    assert_eq!(
        first, "cargo build --release -p pagehint-uffd",
        "the build comes first"
    );
    if !ready_or_skip("the_readme_restore_steps_run_in_order") {
        return;
    }
    // The section's snapshot is 256 MiB: in memory where there is room for it.
    let dir = Scratch::for_bytes("pagehint-serve", "readme", 300 << 20);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script: String = steps
        .lines()
        .skip(1)
        .map(|l| {
            l.replace("/tmp/", &format!("{}/", dir.display()))
                .replace("7070", &port.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n");
    let d = dir.display().to_string();
    assert!(
        !script.replace(&d, "").contains("/tmp/"),
        "every path is substituted"
    );
    // The binary last: this build's path may itself lie under /tmp (a clone in `mktemp -d`).
    let script = script.replace(bin, BIN);
    let out = within(Duration::from_secs(480), move || {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(&dir)
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
