//! `pagehint-migrate`: a real live-migration harness for the `pagehint` scheduler — a KVM
//! virtual machine (or a host thread) migrated with precopy and postcopy between two
//! processes or machines, over two TCP channels through an emulated link — as three
//! programs over one shared base.
//!
//! # The three programs
//! * **`pagehint-migrate`** ([`harness`]): the matrix of migrations, modes × workloads;
//!   `main` is a thin shell over `harness::cli` → `harness::compare` (each run:
//!   `harness::run` = [`dest::run`] → `harness::verify` and `harness::result`) →
//!   `harness::export` (table, targets, JSON, SVG).
//! * **`pagehint-migrate compare-qemu`** ([`qemu`]): the same guest booted from a disk
//!   ([`guest::disk`]) and migrated by QEMU, and this harness's source and destination as
//!   two processes, over one real shaped link; `qemu::cli` → `qemu::compare` →
//!   `qemu::export`. It reads the harness's results: it is the one wing above another.
//! * **`pagehint-uffd`** (its own crate, `migrate/uffd`, over this one's base): a
//!   Firecracker-compatible userfaultfd handler that restores snapshots with the scheduler,
//!   and its policy comparison.
//!
//! # The base, bottom up
//! [`sys`] (userfaultfd, clock, pinning, memory, hugetlb; imports nothing of the crate) →
//! `names` (the code enums' macro), [`values`] (durations, rates, lists) →
//! [`guest`] (the workloads, layout, image, the KVM guest and its programs, the boot disk) →
//! [`link`] (the emulated link, a mode's [`link::Transport`], the low-water mark) →
//! [`options`] (a run's typed settings) → [`wire`] (every message, declared once, over
//! [`wire::io`]) → [`handshake`] → [`source`] and [`dest`] (the two sides of a migration,
//! [`dest::run`] leaving its evidence); [`blocktime`], [`spread`] and [`svg`] are shared by
//! the programs. Imports only point down (lower modules never name higher ones, and no wing
//! names another but `qemu` → `harness`; `pagehint-uffd` names neither): `tests/structure.rs`
//! checks it.
//!
//! # The guest kinds
//! * **KVM** ([`guest::kvm`]): vCPUs run generated x86-64 workload programs that read,
//!   write and check signed pages; KVM's dirty log or dirty rings feed the source's bitmap
//!   during precopy; at the destination the vCPUs fault through userfaultfd.
//! * **thread** ([`dest::thread_guest`]): a host thread reads the same image at the destination
//!   (the fallback where `/dev/kvm` is missing).
//!
//! # Where to change what
//! Each extension point has one home; a place forgotten is a compile error (an exhaustive
//! `match`), or a test failure where noted.
//! * **A workload**: [`guest::workload`] (its name, code, window, pause rule, description;
//!   help texts list [`guest::Workload::ALL`]); then the arms the compiler asks for: the
//!   guest program's emitter (`guest::kvm::program`, `Gen::emit_workload`) and the thread
//!   guest's loop (`dest::thread_guest::run`); a new window goes in [`guest::layout`] and the
//!   parameter page ([`guest::image::Params`]).
//! * **A migration mode**: [`options::MigrationMode`] (its name and code) and its
//!   [`link::Transport`] in `MigrationMode::transport` (urgent channel, where requests
//!   travel, the resend, the low-water mark) and its scheduler in `MigrationMode::scheduler`;
//!   the source, the destination, the link and the results read the transport, never the
//!   mode. Targets between modes: `harness::export`'s `MODE_TARGETS`.
//! * **A wire field**: [`wire::hello::Word`] (a new word at the end), its value in
//!   [`wire::Hello::word`] (exhaustive), its check in [`wire::Hello::decode`], the typed
//!   setting in [`options`], and a [`wire::VERSION`] bump (the golden-bytes test fails
//!   until the layout and the version agree). Frames: [`wire::frame`]; a session's sequence
//!   is drawn in [`wire`].
//! * **A restore policy**: `pagehint_uffd::policy` (name, scheduler, scans, prefetchers,
//!   linger); the handler and the comparison ask it and name no policy.
//! * **A target**: `harness::export::targets` (keyed by [`guest::Workload`] and
//!   [`options::MigrationMode`]); `pagehint_uffd::compare`'s ratios for `pagehint-uffd`.
//! * **A result field**: the part of [`harness::result::RunResult`] it belongs to (each
//!   part is flattened into the same JSON object) and the key list its test pins.
//! * **A listening source's limit** (what it lets wait, how long it holds a paused
//!   session): [`source::ServeOptions`] and its flag in `harness::cli` (`serve_options`,
//!   and the listener's flags list); the door ([`source::door`]) and the sessions read it.
//! * **A system call**: a wrapper in [`sys`], with a typed error.

pub mod blocktime;
pub mod dest;
pub mod guest;
pub mod handshake;
pub mod harness;
pub mod link;
mod names;
pub mod options;
pub mod qemu;
pub mod source;
pub mod spread;
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
    /// Starts a source on `127.0.0.1` (an ephemeral port). Session failures and refused
    /// connections are printed to stderr when `log` is set.
    pub fn start(pin: PinPlan, idle: Duration, log: bool) -> std::io::Result<Self> {
        Self::with_options(source::ServeOptions::new(pin, idle), log)
    }

    /// [`start`](Self::start) with the listening source's limits `opts`.
    pub fn with_options(opts: source::ServeOptions, log: bool) -> std::io::Result<Self> {
        let server = SourceServer::bind_with("127.0.0.1:0", opts)?;
        let addr = server.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("source".into())
            .spawn(move || {
                server.serve(&s2, None, &|e| {
                    let worth = matches!(
                        e,
                        source::ServerEvent::Ended { result: Err(_), .. }
                            | source::ServerEvent::Refused { .. }
                            | source::ServerEvent::Note(_)
                    );
                    if log && worth {
                        eprintln!("source: {e}");
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
