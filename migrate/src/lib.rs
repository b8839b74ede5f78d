//! `pagehint-migrate`: a real postcopy migration harness for the `pagehint` scheduler.
//!
//! A source process (or thread) holds guest RAM and runs the [`pagehint::PageScheduler`]; a
//! destination maps guest RAM, registers it with userfaultfd, runs a guest workload on it and
//! measures every fault while pages arrive over two TCP channels through an emulated link.
//! See [`source`], [`dest`], [`link`] and [`workload`]; the binary compares the three modes
//! (vanilla, preempt, preempt-hint) on each workload and checks the project's targets.
//!
//! Data flow: `image` (source RAM) → `source` (scheduler + senders) → `wire` / `link` (TCP,
//! emulated timing) → `dest` (receivers, fault thread) → `guest` / `workload` → `report`.

pub mod clock;
pub mod config;
pub mod dest;
pub mod guest;
pub mod image;
pub mod link;
pub mod pin;
pub mod report;
pub mod source;
pub mod uffd;
pub mod wire;
pub mod workload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use config::{FaultPath, MigrationMode, RunConfig, Workload};
pub use dest::{run_destination, RunError};
pub use link::LinkParams;
pub use pin::PinPlan;
pub use report::RunResult;
pub use source::SourceServer;

/// A source server on a loopback port, served by a background thread until dropped.
#[derive(Debug)]
pub struct LocalSource {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LocalSource {
    /// Starts a source on `127.0.0.1` (an ephemeral port). Session failures are printed to
    /// stderr when `log` is set.
    pub fn start(pin: PinPlan, idle: Duration, log: bool) -> std::io::Result<Self> {
        let server = SourceServer::bind("127.0.0.1:0", pin, idle)?;
        let addr = server.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("source".into())
            .spawn(move || {
                server.serve(&s2, |r| {
                    if let Err(e) = r {
                        if log {
                            eprintln!("source: session ended: {e}");
                        }
                    }
                })
            })?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        // Relaxed: the server polls the flag.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
