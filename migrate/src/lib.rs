//! `pagehint-migrate`: a real live-migration harness for the `pagehint` scheduler — a KVM
//! virtual machine (or a host thread) migrated with precopy and postcopy between two
//! processes or machines, over two TCP channels through an emulated link.
//!
//! # Data flow
//! `options` (typed settings, parsed once) → `guest` (layout, image, the KVM guest and its
//! programs, the thread guest) → `source` (guest RAM, the VM, precopy, the switch-over, the
//! scheduler in postcopy) → `wire` / `link` / `handshake` (frames, the emulated link, both
//! sides of connection setup) → `dest` (placement, faults, the guest resumed; the run's
//! evidence) → `verify` and `result` (what held and what was measured) → `run` (the three
//! together) → `compare` / `export` (the matrix of runs, targets, table, JSON, SVG). `main`
//! is a thin shell over `cli` → `compare` → `export`.
//!
//! [`qemu`] (`pagehint-migrate compare-qemu`) sits on top: the same guest booted from a disk
//! ([`guest::disk`]) and migrated by QEMU, and this harness's source and destination as two
//! processes, over one real shaped link; `main` runs it as `qemu::cli` → `qemu::compare` →
//! `qemu::export`.
//!
//! # The guest kinds
//! * **KVM** ([`guest::kvm`]): vCPUs run generated x86-64 workload programs that read,
//!   write and check signed pages; KVM's dirty log or dirty rings feed the source's bitmap
//!   during precopy; at the destination the vCPUs fault through userfaultfd.
//! * **thread** ([`dest::thread_guest`]): a host thread reads the same image at the destination
//!   (the fallback where `/dev/kvm` is missing).

pub mod blocktime;
pub mod dest;
pub mod guest;
pub mod handshake;
pub mod harness;
pub mod link;
mod names;
pub mod options;
pub mod qemu;
pub mod restore;
pub mod source;
pub mod svg;
pub mod sys;
pub mod values;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use dest::RunError;
pub use harness::result::RunResult;
pub use harness::run::run_destination;
pub use link::LinkParams;
pub use options::{FaultPath, GuestKind, MigrationMode, RunConfig, Workload};
pub use source::SourceServer;
pub use sys::pin::PinPlan;

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
                server.serve(&s2, None, |r| {
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
