//! The preload library in a real process: this test re-runs itself with `LD_PRELOAD` (the
//! child connects and accepts a TCP socket over loopback and a UNIX socket, and prints the
//! options each TCP end got), then checks what the child saw and what the library logged.
//! The same check on a child run without the library must fail (the mutant), so the check
//! can tell a configured socket from a default one.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;

const PACE_BPS: u64 = 80_000_000;
const LOWAT: u32 = 65_536;

fn opt(fd: i32, level: i32, name: i32) -> u32 {
    let mut v: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: a live u32 and its length.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut u32).cast(), &mut len) };
    assert_eq!(r, 0, "getsockopt: {}", std::io::Error::last_os_error());
    v
}

fn describe(what: &str, fd: i32) -> String {
    format!(
        "{what} pace={} lowat={}",
        opt(fd, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE),
        opt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT)
    )
}

/// The child: a TCP connection and a UNIX one, through the wrapped calls.
fn child() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    println!("{}", describe("connect", c.as_raw_fd()));
    println!("{}", describe("accept", a.as_raw_fd()));
    let dir = std::env::temp_dir().join(format!("pace-preload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let ul = UnixListener::bind(&path).unwrap();
    let mut u = UnixStream::connect(&path).unwrap();
    let _ = ul.accept().unwrap();
    let _ = u.read(&mut []);
    let _ = std::fs::remove_dir_all(&dir);
}

fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps.to_path_buf(), deps.parent().unwrap().to_path_buf()]
        .iter()
        .map(|d| d.join("libpagehint_pace_preload.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "libpagehint_pace_preload.so not found next to {}",
                exe.display()
            )
        })
}

/// Runs the child (with the library if `preload`) and checks both TCP ends and the log.
fn run_child(preload: bool) -> Result<(), String> {
    let log =
        std::env::temp_dir().join(format!("pace-preload-{}-{preload}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.env("PAGEHINT_PRELOAD_CHILD", "1")
        .env("PAGEHINT_PACE_BPS", PACE_BPS.to_string())
        .env("PAGEHINT_NOTSENT_LOWAT", LOWAT.to_string())
        .env("PAGEHINT_PRELOAD_LOG", &log);
    if preload {
        c.env("LD_PRELOAD", library());
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let want = format!("pace={} lowat={LOWAT}", PACE_BPS / 8);
    for end in ["connect", "accept"] {
        let line = format!("{end} {want}");
        if !stdout.lines().any(|l| l == line) {
            return Err(format!("expected {line:?}, the child saw:\n{stdout}"));
        }
    }
    let lines: Vec<&str> = logged.lines().collect();
    let configured = |call: &str| {
        lines
            .iter()
            .filter(|l| l.split_whitespace().nth(2) == Some(call) && l.ends_with(&want))
            .count()
    };
    if lines.len() != 2
        || configured("connect") != 1
        || configured("accept4") + configured("accept") != 1
    {
        return Err(format!(
            "expected one connect and one accept logged (the UNIX socket left alone), got:\n{logged}"
        ));
    }
    Ok(())
}

fn main() {
    if std::env::var_os("PAGEHINT_PRELOAD_CHILD").is_some() {
        child();
        return;
    }
    run_child(true).unwrap_or_else(|e| panic!("with the library preloaded: {e}"));
    let e = run_child(false).expect_err("the mutant (no library) must fail the check");
    assert!(e.contains("expected \"connect pace="), "{e}");
    println!(
        "preload: TCP sockets paced and bounded through the library; without it the check fails"
    );
}
