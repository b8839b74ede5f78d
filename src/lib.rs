//! Lock-free page scheduling for live migration.
//!
//! `pagehint` gives a virtual-machine monitor the machinery of QEMU's postcopy-preempt page
//! scheduling — a dirty bitmap, a background scanner, an urgent path for faulted pages, and
//! the spatial-locality page hint of QEMU 10.1 — **without a bitmap mutex**:
//!
//! * [`PageHint`]: a single-slot cell, `(block, page)` and a valid bit packed in one
//!   `AtomicU64`; compare-exchange set-if-empty to offer, swap to take.
//! * [`DirtyBitmap`]: one bit per target page in `AtomicU64` words; claims give each dirty
//!   page, and each whole host page (4 KiB, 2 MiB, 1 GiB), to exactly one sender.
//! * [`PageScheduler`]: the background scanner ([`BackgroundScanner`]: wraparound across RAM
//!   blocks, follows hints) and the urgent path ([`PageScheduler::serve`]), composed so that
//!   every page is sent exactly once and the scan never reports "done" while a page is dirty,
//!   whatever hints it followed.
//!
//! # Design
//! The numbered guarantees I1–I8 (exactly once, whole host pages, no false completion, the
//! hint slot, progress, advisory hints, no lost dirtying, harmless bad input), the ordering
//! contract, the data flow and the map from each guarantee to the tests, models and proofs
//! that check it are written once, in [`design`]. Every atomic goes through one private shim
//! module that selects `core`, loom (`--cfg pagehint_loom`) or shuttle atomics, so the same
//! code is model-checked.
//!
//! # Features and minimum Rust
//! * default: the core (layout, bitmap, hint, scheduler, GPA map, KVM slot and ring import);
//!   Rust **1.80**.
//! * `vm-memory`: vm-memory's `Bitmap` backend (`vmm::RegionBitmap`) and the
//!   `GuestAddress` API of [`vmm::GpaMap`]; Rust 1.80.
//! * `kvm`: kvm-bindings conversions and manual dirty-log clearing (`vmm::kvm_log`:
//!   `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_CLEAR_DIRTY_LOG` on any `AsRawFd`, no
//!   kvm-ioctls); Rust **1.85** (kvm-bindings 0.14: cargo 1.80 fails reading its manifest).
//!
//! # Example
//! ```
//! use pagehint::{PageScheduler, RamLayout, SchedulerConfig, Served, UrgentRequest};
//!
//! let layout: RamLayout = "pc.ram:64M:2M,vga:16M".parse()?;
//! let sched = PageScheduler::new(layout, SchedulerConfig::preempt_hint())?;
//! sched.bitmap().mark_all(); // switch to postcopy: every page still to send
//!
//! // Return path: the destination faulted on block 0, offset 5 MiB.
//! match sched.serve(UrgentRequest::new(0, 5 << 20, 4096))? {
//!     Served::Send(claim) => {
//!         // ... send claim.host_pages() on the urgent channel, then:
//!         sched.urgent_sent(&claim); // hint: continue right after this host page
//!     }
//!     Served::AlreadyClaimed(_) | Served::Queued(_) => {}
//! }
//!
//! // Background sender: starts right after the faulted 2 MiB page.
//! let mut scanner = sched.background();
//! let first = scanner.next_claim().unwrap();
//! assert_eq!(first.host_pages().next().unwrap().first_page, 1536);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod storage;
mod sync;

pub mod bitmap;
pub mod cursors;
pub mod design;
pub mod hint;
pub mod layout;
pub mod overtake;
pub mod request;
pub mod scheduler;
pub mod stats;
pub mod streams;
pub mod vmm;

pub use bitmap::{
    Claim, DirtyBitmap, DirtyLogError, DirtyRate, HostPageClaim, LayoutMismatch, PageClaim,
};
pub use hint::PageHint;
pub use layout::{
    BlockSpec, HostPage, LayoutError, LocationError, PageLocation, RamBlock, RamLayout,
};
pub use overtake::{Arrival, CopyKind, CopyLedger};
pub use request::{RequestError, UrgentRequest};
pub use scheduler::{
    AttachError, BackgroundScanner, ClaimBatch, HintPolicy, Mode, PageScheduler, RecoveryError,
    SchedulerConfig, Served,
};
pub use stats::SchedulerStats;
pub use streams::{ClaimSource, HintSlots, StreamPolicy, StreamStats};

/// The README's Rust snippets, compiled and run as doctests so that they cannot rot (one
/// of them builds vm-memory regions, hence the feature).
#[cfg(all(doctest, feature = "vm-memory"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
