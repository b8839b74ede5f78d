//! Snapshot restore through userfaultfd: `pagehint-uffd`, a page-fault handler that speaks
//! Firecracker's protocol and loads guest memory with pagehint's scheduler, and a small
//! restore VMM that plays Firecracker's part for the tests and the comparison. A crate of
//! its own (one crate per program, as Firecracker keeps them) over `pagehint-migrate`'s
//! shared base: its guest, its system wrappers, blocktime and the SVG writer; it imports
//! nothing of the other two programs.
//!
//! * [`protocol`]: the handshake (the region JSON and the descriptor over a Unix socket), in
//!   Firecracker's format (the version is stated there);
//! * [`source`]: where pages come from (the snapshot memory file);
//! * [`remote`]: pages over TCP from a memory server (pull-mode postcopy), and that server;
//! * [`policy`]: how pages are loaded, every policy's facts in one place;
//! * [`record`]: a restore's recorded working set (the file `record` writes and `recorded`
//!   follows);
//! * [`handler`]: the page server (faults, prefetchers, removed ranges) and its report;
//! * [`vmm`]: snapshots of the KVM guest, and the restore VMM;
//! * [`compare`] / [`export`]: the policy comparison, its table, JSON and SVG;
//! * [`cli`]: the `pagehint-uffd` command line.
//!
//! Data flows one way: `protocol`, `record` and `source` (or `remote`) feed `handler`; `vmm` uses the guest and
//! `protocol`; `compare` runs both; the binary (`main.rs`) is `cli` → `compare`/`handler` → `export`.

pub mod cli;
pub mod compare;
pub mod export;
pub mod handler;
pub mod policy;
pub mod protocol;
pub mod record;
pub mod remote;
pub mod source;
pub mod vmm;
