//! QEMU itself, side by side: the harness's guest migrated by QEMU 10.0 and by pagehint over
//! the same real, shaped link (`pagehint-migrate compare-qemu`).
//!
//! # What is the same for both
//! * **The guest**: the harness's guest program ([`crate::guest::kvm::program`]), for QEMU
//!   booted from a raw disk ([`crate::guest::disk`]) that runs the very same code on the same
//!   image, memory size and access pattern; one vCPU, 4 KiB pages.
//! * **The link**: two network namespaces joined by a veth pair shaped by `tc tbf`
//!   ([`netns`]); both sources run in one namespace and both destinations in the other, and
//!   pagehint's emulated link is off, so the kernel queue does the queueing for both.
//! * **The cap**: QEMU gets `max-bandwidth` and `max-postcopy-bandwidth` at the link rate;
//!   pagehint paces its background channel at the same rate.
//! * **The migration**: pure postcopy (QEMU: `migrate` then at once `migrate-start-postcopy`;
//!   pagehint: `--precopy-rounds 0`).
//! * **The figures** ([`side`]): request latency, blocktime, total time, requests and bytes,
//!   each taken where the peer measures it, with the same definition.
//!
//! # Flow
//! [`cli`] → [`compare`] (per link: [`netns`]; per workload: [`peer`] for QEMU with [`qmp`] and
//! [`trace`], [`ours`] for pagehint) → [`side`] rows and targets → [`export`].

pub mod cli;
pub mod compare;
pub mod export;
pub mod netns;
pub mod ours;
pub mod peer;
pub mod qmp;
pub mod side;
pub mod trace;

use std::fmt;

/// Why a side-by-side step failed.
#[derive(Debug)]
pub enum QemuError {
    /// Something this machine lacks or refused (root, KVM, iproute2, QEMU).
    Setup(String),
    /// An I/O error, with what was being done.
    Io(String, std::io::Error),
    /// A QMP command failed.
    Command {
        /// `source` or `destination`.
        side: &'static str,
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A peer said something unexpected.
    Protocol(String),
    /// A peer took too long.
    Timeout(String),
    /// A peer exited, or the migration failed.
    Exited(String),
}

impl fmt::Display for QemuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(s) | Self::Protocol(s) | Self::Timeout(s) | Self::Exited(s) => {
                f.write_str(s)
            }
            Self::Io(what, e) => write!(f, "{what}: {e}"),
            Self::Command {
                side,
                command,
                class,
                desc,
            } => write!(f, "the {side} QEMU refused {command}: {class}: {desc}"),
        }
    }
}

impl std::error::Error for QemuError {}
