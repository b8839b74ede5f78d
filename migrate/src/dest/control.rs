//! The destination's control socket: how an operator resumes a paused postcopy from another
//! source, or gives it up, as QEMU's `migrate-recover` and `migrate-cancel` do.
//!
//! A Unix stream socket (`--control PATH`). A client sends one line and reads one line back:
//! * `status` → `ok: ...` what the destination is doing (precopy, postcopy with its pages,
//!   or paused: why, since when, where it retries, the last attempt's answer);
//! * `recover ADDR` → the paused postcopy tries the source at `ADDR` at once, and keeps
//!   trying there (`error: ...` when nothing is paused);
//! * `abort` → the paused postcopy gives up: the run ends with the break and this reason.
//!
//! One thread serves the socket, a client at a time (each line waited for at most
//! [`CLIENT_LIMIT`]); the recovery loop takes a command with [`Control::take`]. The socket
//! file is removed when the control is dropped. [`send`] is the client
//! (`pagehint-migrate recover`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a client may take to send its line or read the answer.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(2);

/// What the operator asked the paused postcopy to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Resume from the source at this address.
    Recover(SocketAddr),
    /// Give up.
    Abort,
}

/// Where the destination stands, as `status` tells it.
#[derive(Debug, Default)]
struct State {
    /// A paused postcopy waits for its source: why, and where it retries.
    paused: Option<String>,
    /// Otherwise, what it does.
    doing: String,
}

/// Shared between the socket's thread and the destination's runs.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    command: Mutex<Option<Command>>,
    /// A command came and is not taken yet (interrupts a recovery's attempt or wait).
    interrupt: AtomicBool,
    /// Host pages placed and pending (postcopy), for `status`.
    placed: AtomicU64,
    pending: AtomicU64,
    stop: AtomicBool,
}

/// The control socket of one destination process.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control {
    /// Opens the socket at `path` (a stale socket file left by a dead process is replaced;
    /// one that answers is someone else's) and serves it on a thread.
    pub fn open(path: &Path) -> Result<Self, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "--control {}: another process listens there",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("--control {}: {e}", path.display()))?;
        let shared = Arc::new(Shared::default());
        lock(&shared.state).doing = "starting".into();
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(&listener, &s2))
            .map_err(|e| format!("--control: {e}"))?;
        Ok(Self {
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the destination does now (not paused).
    pub fn doing(&self, what: String) {
        let mut s = lock(&self.shared.state);
        s.paused = None;
        s.doing = what;
    }

    /// Postcopy's progress: `placed` of `pending` host pages.
    pub fn progress(&self, placed: u64, pending: u64) {
        // Relaxed (both): figures for `status`, read alone.
        self.shared.placed.store(placed, Ordering::Relaxed);
        self.shared.pending.store(pending, Ordering::Relaxed);
    }

    /// The postcopy is paused: `why`, and where it stands.
    pub fn paused(&self, why: String) {
        lock(&self.shared.state).paused = Some(why);
    }

    /// The operator's command, if one came (taken: each is acted on once).
    pub fn take(&self) -> Option<Command> {
        let mut c = lock(&self.shared.command);
        // Relaxed: the flag only wakes waits early; the command is read under the lock.
        self.shared.interrupt.store(false, Ordering::Relaxed);
        c.take()
    }

    /// Raised while a command waits to be taken (a recovery's waits end early on it).
    pub fn interrupt(&self) -> &AtomicBool {
        &self.shared.interrupt
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // Relaxed: a polled flag; the join waits for the thread.
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The socket's thread: one client at a time, until stopped.
fn serve(listener: &UnixListener, shared: &Shared) {
    // Relaxed: a polled flag.
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((c, _)) => {
                let _ = answer(c, shared);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reads one line from `c` and answers it.
fn answer(c: UnixStream, shared: &Shared) -> std::io::Result<()> {
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(CLIENT_LIMIT))?;
    c.set_write_timeout(Some(CLIENT_LIMIT))?;
    let mut line = String::new();
    BufReader::new(c.try_clone()?.take(4096)).read_line(&mut line)?;
    let reply = reply(line.trim(), shared);
    (&c).write_all(format!("{reply}\n").as_bytes())
}

/// The answer to `line`.
fn reply(line: &str, shared: &Shared) -> String {
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    let state = lock(&shared.state);
    match (verb, arg.trim()) {
        ("status", "") => format!("ok: {}", status(&state, shared)),
        ("recover", addr) if !addr.is_empty() => {
            if state.paused.is_none() {
                return format!(
                    "error: nothing is paused to recover ({})",
                    status(&state, shared)
                );
            }
            match addr.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(a)) => {
                    *lock(&shared.command) = Some(Command::Recover(a));
                    // Relaxed: see `Control::take`.
                    shared.interrupt.store(true, Ordering::Relaxed);
                    format!("ok: resuming from {a}")
                }
                Ok(None) => format!("error: {addr} resolves to nothing"),
                Err(e) => format!("error: {addr}: {e}"),
            }
        }
        ("abort", "") => {
            if state.paused.is_none() {
                return format!(
                    "error: nothing is paused to abort ({})",
                    status(&state, shared)
                );
            }
            *lock(&shared.command) = Some(Command::Abort);
            // Relaxed: see `Control::take`.
            shared.interrupt.store(true, Ordering::Relaxed);
            "ok: giving the paused postcopy up".into()
        }
        _ => format!("error: unknown command {line:?} (status, recover ADDR, abort)"),
    }
}

fn status(state: &State, shared: &Shared) -> String {
    // Relaxed (both): figures for display.
    let (placed, pending) = (
        shared.placed.load(Ordering::Relaxed),
        shared.pending.load(Ordering::Relaxed),
    );
    match &state.paused {
        Some(why) => format!("paused: {why}; {placed} of {pending} host pages placed"),
        None if pending > 0 => format!("{}: {placed} of {pending} host pages placed", state.doing),
        None => state.doing.clone(),
    }
}

/// The client: sends `line` to the control socket at `path` and returns the answer (an
/// `error: ...` answer is an error).
pub fn send(path: &Path, line: &str) -> Result<String, String> {
    let c = UnixStream::connect(path).map_err(|e| {
        format!(
            "{}: {e} (is a destination running with --control?)",
            path.display()
        )
    })?;
    c.set_read_timeout(Some(CLIENT_LIMIT * 2))
        .and_then(|()| c.set_write_timeout(Some(CLIENT_LIMIT)))
        .and_then(|()| (&c).write_all(format!("{line}\n").as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(&c)
        .read_line(&mut answer)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let answer = answer.trim().to_string();
    match answer.strip_prefix("error: ") {
        Some(e) => Err(e.to_string()),
        None if answer.is_empty() => Err(format!("{}: no answer", path.display())),
        None => Ok(answer.strip_prefix("ok: ").unwrap_or(&answer).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_answers_status_takes_recover_and_abort_only_while_paused() {
        let path = std::env::temp_dir().join(format!("ctl-test-{}.sock", std::process::id()));
        let c = Control::open(&path).unwrap();
        assert!(Control::open(&path)
            .unwrap_err()
            .contains("another process listens"));
        c.doing("postcopy".into());
        c.progress(5, 10);
        assert_eq!(
            send(&path, "status").unwrap(),
            "postcopy: 5 of 10 host pages placed"
        );
        let e = send(&path, "recover 127.0.0.1:9").unwrap_err();
        assert!(e.contains("nothing is paused"), "{e}");
        assert!(send(&path, "abort")
            .unwrap_err()
            .contains("nothing is paused"));
        assert!(send(&path, "fly").unwrap_err().contains("unknown command"));
        c.paused("the source is gone; retrying 127.0.0.1:4444".into());
        assert!(send(&path, "status")
            .unwrap()
            .starts_with("paused: the source is gone"));
        assert_eq!(
            send(&path, "recover 127.0.0.1:9").unwrap(),
            "resuming from 127.0.0.1:9"
        );
        assert_eq!(
            c.take(),
            Some(Command::Recover("127.0.0.1:9".parse().unwrap()))
        );
        assert_eq!(c.take(), None, "each command is acted on once");
        assert!(send(&path, "recover nowhere").is_err());
        send(&path, "abort").unwrap();
        assert_eq!(c.take(), Some(Command::Abort));
        drop(c);
        assert!(!path.exists(), "the socket file goes with it");
        assert!(send(&path, "status").unwrap_err().contains("--control"));
    }
}
