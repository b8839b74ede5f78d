//! CPU time of a peer's migration threads, read from outside, the same way for both peers.
//!
//! A [`ThreadCpu`] sampler polls `/proc/<pid>/task/<tid>/{comm,schedstat}` of the watched
//! processes every [`POLL`] and keeps, per thread, a base and the latest reading.
//! `schedstat`'s first field is the time the thread ran, in ns (user and system together;
//! `stat`'s utime + stime count the same in 10 ms ticks). A thread running at the start (or
//! at [`ThreadCpu::rebase`], just before the migration starts) counts from its reading then;
//! a thread that appears later counts from 0, all of it (the migration threads of both peers
//! start with the migration). A thread that exits is read for the last time at most [`POLL`]
//! before: the migration threads end with the migration, so each loses at most that much.
//! Threads are told apart by tid, and summed by the caller's key.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often the sampler reads.
pub const POLL: Duration = Duration::from_millis(2);

/// CPU time per thread name, ms (several threads of one name are summed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuByThread(pub BTreeMap<String, f64>);

impl CpuByThread {
    /// All of them, ms.
    pub fn total_ms(&self) -> f64 {
        self.0.values().sum()
    }
}

/// The run time of thread `tid` of `pid`, ns, and its name.
pub fn read_thread(pid: u32, tid: u32) -> Option<(String, u64)> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let name = std::fs::read_to_string(format!("{dir}/comm")).ok()?;
    let stat = std::fs::read_to_string(format!("{dir}/schedstat")).ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some((name.trim().to_string(), ns))
}

/// The threads of `pid`.
pub fn tids(pid: u32) -> Vec<u32> {
    let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    d.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

#[derive(Debug, Default)]
struct Seen {
    /// tid → (pid, name, base, latest).
    threads: BTreeMap<u32, (u32, String, u64, u64)>,
    /// Threads appearing from now on count from 0.
    based: bool,
}

impl Seen {
    fn sample(&mut self, pids: &[u32]) {
        for &pid in pids {
            for tid in tids(pid) {
                let Some((name, ns)) = read_thread(pid, tid) else {
                    continue;
                };
                match self.threads.get_mut(&tid) {
                    Some(t) => {
                        t.1 = name;
                        t.3 = ns;
                    }
                    None => {
                        let base = if self.based { 0 } else { ns };
                        self.threads.insert(tid, (pid, name, base, ns));
                    }
                }
            }
        }
    }

    fn result(&self, key: &dyn Fn(u32, u32, &str) -> Option<String>) -> CpuByThread {
        let mut out = BTreeMap::new();
        for (&tid, (pid, name, first, latest)) in &self.threads {
            if let Some(k) = key(*pid, tid, name) {
                *out.entry(k).or_insert(0.0) += latest.saturating_sub(*first) as f64 / 1e6;
            }
        }
        CpuByThread(out)
    }
}

/// A thread-CPU sampler over some processes, until [`ThreadCpu::stop`] (or drop).
pub struct ThreadCpu {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

impl ThreadCpu {
    /// Starts sampling every thread of `pids` (the first reading now, before this returns,
    /// so that threads already running count from here). `also` runs after each sample on
    /// the sampler's thread (QEMU's pinner shares the loop).
    pub fn start(pids: Vec<u32>, mut also: impl FnMut() + Send + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        {
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            s.sample(&pids);
            s.based = true;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, seen2) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            // Relaxed: a stop flag polled every POLL; the samples go back through the mutex.
            while !s2.load(Ordering::Relaxed) {
                seen2
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .sample(&pids);
                also();
                std::thread::sleep(POLL);
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// CPU time so far of the threads `key(pid, tid, name)` gives a key, summed by key.
    pub fn now(&self, key: impl Fn(u32, u32, &str) -> Option<String>) -> CpuByThread {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .result(&key)
    }

    /// From now on, the threads running count from their reading now (the vCPUs, the main
    /// threads: what they did before, starting up, does not count).
    pub fn rebase(&self, pids: &[u32]) {
        let mut s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.sample(pids);
        for t in s.threads.values_mut() {
            t.2 = t.3;
        }
    }

    /// Stops sampling (the readings stay).
    pub fn stop(&mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        // Relaxed: see the loop.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ThreadCpu {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs until the calling thread has used `ms` of CPU (not wall) time, so that a loaded
    /// machine only makes it take longer.
    fn spin(ms: u64) {
        let start = crate::sys::clock::thread_cpu_ns();
        let mut x = 0u64;
        while crate::sys::clock::thread_cpu_ns() - start < ms * 1_000_000 {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
    }

    #[test]
    fn a_named_busy_thread_is_charged_and_an_idle_one_is_not() {
        let pid = std::process::id();
        let cpu = ThreadCpu::start(vec![pid], || {});
        // Both threads live until the sampler has seen the spinner's whole run (a thread
        // that exits keeps only its last reading).
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (done2, wait2) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::Builder::new()
            .name("cpu-test-busy".into())
            .spawn(move || {
                spin(120);
                let _ = wait.recv();
            })
            .unwrap();
        let idle = std::thread::Builder::new()
            .name("cpu-test-idle".into())
            .spawn(move || {
                let _ = wait2.recv();
            })
            .unwrap();
        let key = |_: u32, _: u32, n: &str| n.starts_with("cpu-test").then(|| n.to_string());
        let t = std::time::Instant::now();
        let mut r = cpu.now(key);
        while r.0.get("cpu-test-busy").copied().unwrap_or(0.0) < 120.0
            && t.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(20));
            r = cpu.now(key);
        }
        drop((done, done2));
        busy.join().unwrap();
        idle.join().unwrap();
        let mut cpu = cpu;
        cpu.stop();
        let busy = r.0.get("cpu-test-busy").copied().unwrap_or(0.0);
        let idle = r.0.get("cpu-test-idle").copied().unwrap_or(0.0);
        // The spinner used 120 ms of CPU by its own clock; the sleeper runs for microseconds.
        assert!(busy >= 120.0, "busy thread charged {busy} ms: {r:?}");
        assert!(idle < 5.0, "idle thread charged {idle} ms: {r:?}");
        assert!(!r.0.keys().any(|k| !k.starts_with("cpu-test")), "{r:?}");
    }

    #[test]
    fn rebasing_forgets_what_ran_before() {
        let pid = std::process::id();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (ran, first) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("cpu-test-rebase".into())
            .spawn(move || {
                spin(80);
                let _ = ran.send(());
                let _ = wait.recv();
                spin(20);
            })
            .unwrap();
        let mut cpu = ThreadCpu::start(vec![pid], || {});
        first.recv().unwrap();
        cpu.rebase(&[pid]);
        go.send(()).unwrap();
        t.join().unwrap();
        cpu.stop();
        let r = cpu.now(|_, _, n| (n == "cpu-test-rebase").then(|| n.to_string()));
        let ms = r.0.get("cpu-test-rebase").copied().unwrap_or(0.0);
        // Only the 20 ms after the rebase (the first 80 ms ran before it), less what the
        // last poll missed.
        assert!((0.0..60.0).contains(&ms), "charged {ms} ms: {r:?}");
    }
}
