//! Long-lived, pinned worker threads driven job by job with barriers.
//!
//! Thread start-up and teardown are never inside a measurement: a [`Crew`] spawns its threads
//! once; each [`Crew::run`] hands every thread the same job, releases them together through a
//! start barrier, and returns when all of them have reached the done barrier. What a thread
//! measures it stores in shared state owned by the fixture (see `Stopwatch`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One thread's body: called once per job.
pub type Role<J> = Box<dyn FnMut(J) + Send>;

struct Shared<J> {
    ready: Barrier,
    start: Barrier,
    done: Barrier,
    job: Mutex<Option<J>>,
    panicked: AtomicBool,
    watch: Arc<Stopwatch>,
}

/// Worker threads that stay alive across jobs.
pub struct Crew<J: Copy + Send + 'static> {
    shared: Arc<Shared<J>>,
    handles: Vec<JoinHandle<()>>,
    /// Whether every thread that asked for a CPU got pinned to it.
    pub pinned: bool,
}

/// The CPUs threads may be pinned to (empty if the platform cannot say).
pub fn cpus() -> Vec<core_affinity::CoreId> {
    core_affinity::get_core_ids().unwrap_or_default()
}

impl<J: Copy + Send + 'static> Crew<J> {
    /// Spawns one thread per role; a role with `Some(i)` is pinned to CPU `i` modulo the
    /// number of CPUs (so a 2-CPU machine runs a 4-thread crew two threads per CPU). The
    /// roles coordinate through `watch`; a panicking role stops the others through it.
    pub fn new(roles: Vec<(Option<usize>, Role<J>)>, watch: Arc<Stopwatch>) -> Self {
        let shared = Arc::new(Shared {
            ready: Barrier::new(roles.len() + 1),
            start: Barrier::new(roles.len() + 1),
            done: Barrier::new(roles.len() + 1),
            job: Mutex::new(None),
            panicked: AtomicBool::new(false),
            watch,
        });
        let cpus = cpus();
        let pins = Arc::new(AtomicUsize::new(0));
        let wanted = roles.iter().filter(|(c, _)| c.is_some()).count();
        let handles = roles
            .into_iter()
            .enumerate()
            .map(|(i, (cpu, mut role))| {
                let shared = Arc::clone(&shared);
                let cpu = cpu.and_then(|c| cpus.get(c % cpus.len().max(1)).copied());
                let pins = Arc::clone(&pins);
                std::thread::Builder::new()
                    .name(format!("bench-crew-{i}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            if core_affinity::set_for_current(cpu) {
                                // Relaxed: read after the ready barrier.
                                pins.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        shared.ready.wait();
                        loop {
                            shared.start.wait();
                            let job = *shared.job.lock().unwrap();
                            let Some(job) = job else { return };
                            // A panicking role must still reach the done barrier, or the
                            // main thread would wait forever; `run` re-raises it.
                            let result =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    role(job)
                                }));
                            if result.is_err() {
                                // Relaxed: read by the main thread after the done barrier.
                                shared.panicked.store(true, Ordering::Relaxed);
                                // The other roles may be waiting for a stop that the
                                // panicking one would have given.
                                shared.watch.stop.store(true, Ordering::Relaxed);
                            }
                            shared.done.wait();
                        }
                    })
                    .expect("spawn a benchmark thread")
            })
            .collect();
        // Every thread has pinned itself (or failed to) once it reaches the ready barrier.
        shared.ready.wait();
        // Relaxed: the barrier orders the threads' increments before this load.
        let pinned = pins.load(Ordering::Relaxed) == wanted;
        Self {
            shared,
            handles,
            pinned,
        }
    }

    /// Runs `job` on every thread and waits until all of them have finished it.
    pub fn run(&self, job: J) {
        // Threads read the job only after the start barrier, and it is not changed again
        // until after the done barrier: this mutex is never contended inside a job.
        *self.shared.job.lock().unwrap() = Some(job);
        self.shared.start.wait();
        self.shared.done.wait();
        // Relaxed: the done barrier orders the store before this load.
        if self.shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a benchmark thread panicked (its message is above)");
        }
    }
}

impl<J: Copy + Send + 'static> Drop for Crew<J> {
    fn drop(&mut self) {
        *self.shared.job.lock().unwrap() = None;
        self.shared.start.wait();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The flags one job's threads coordinate with: background threads run until `stop`, the
/// measuring thread starts once `started` counts all of them, and stores its time in `nanos`.
#[derive(Default)]
pub struct Stopwatch {
    /// Set by the measuring thread when it is done; background threads then return.
    pub stop: AtomicBool,
    /// Background threads that have started working in this job.
    pub started: AtomicUsize,
    /// Nanoseconds measured in this job.
    pub nanos: AtomicU64,
    /// Per-operation latencies (ns) recorded in this job, when a fixture asks for them.
    pub samples: Mutex<Vec<u64>>,
}

impl Stopwatch {
    /// Clears the flags before a job.
    pub fn reset(&self) {
        // Relaxed everywhere: the crew's barriers order these stores before the job starts.
        self.stop.store(false, Ordering::Relaxed);
        self.started.store(0, Ordering::Relaxed);
        self.nanos.store(0, Ordering::Relaxed);
    }
    /// A background thread announces that it is running.
    pub fn announce(&self) {
        // Release: nothing is published through it; the measuring thread only waits for it.
        self.started.fetch_add(1, Ordering::Release);
    }
    /// The measuring thread waits until `n` background threads are running.
    pub fn wait_started(&self, n: usize) {
        // Acquire pairs with `announce`; the loop is outside the timed region. A stop (a
        // panicking role) ends the wait too.
        while self.started.load(Ordering::Acquire) < n && !self.stopped() {
            std::hint::spin_loop();
        }
    }
    /// Whether background threads should return.
    #[inline]
    pub fn stopped(&self) -> bool {
        // Relaxed: a stop request needs no data to travel with it; the done barrier orders
        // everything after the job.
        self.stop.load(Ordering::Relaxed)
    }
    /// The measuring thread records its time and stops the others.
    pub fn finish(&self, elapsed: Duration) {
        // Relaxed: read by the main thread after the done barrier.
        self.nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        // Relaxed: see `stopped`.
        self.stop.store(true, Ordering::Relaxed);
    }
    /// The time measured in the last job.
    pub fn elapsed(&self) -> Duration {
        // Relaxed: read after the done barrier.
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}
