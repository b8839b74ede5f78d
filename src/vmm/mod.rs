//! Adapters for Rust VMMs: KVM dirty logs and rings, and (feature `vm-memory`) vm-memory's
//! dirty-bitmap traits.
//!
//! A VMM built on rust-vmm keeps its memory model: guest memory stays a
//! `vm_memory::GuestMemoryMmap`, KVM keeps reporting dirty pages per memory slot. What changes
//! is where the dirty bits go: into one shared [`DirtyBitmap`](crate::DirtyBitmap), built for a
//! [`RamLayout`](crate::RamLayout) with one block per guest memory region, which
//!
//! * the guest memory marks through `RegionBitmap` (vm-memory's `Bitmap` trait, feature
//!   `vm-memory`; see `guest_memory`),
//! * the dirty-log thread fills through [`KvmSlots`] (`KVM_GET_DIRTY_LOG` or the dirty ring;
//!   see [`kvm`]),
//! * a precopy sender drains with [`DirtyBitmap::get_and_clear`](crate::DirtyBitmap::get_and_clear)
//!   or, as guest-physical ranges, [`GpaMap::drain`] (see [`ranges`]; with feature `kvm`, KVM's
//!   log cleared chunk by chunk as it goes: `kvm_log`),
//! * and, at the switch to postcopy, a [`PageScheduler`](crate::PageScheduler) drives
//!   ([`PageScheduler::with_bitmap`](crate::PageScheduler::with_bitmap)) with any number of
//!   background senders and the urgent path.
//!
//! This module sits at the top of the data flow: it uses the bitmap and scheduler, and
//! nothing below it knows about it. See `examples/vmm.rs` for the whole integration, and
//! `examples/kvm_migration.rs` for the same on real KVM in ten lines of glue:
//! [`GpaMap::from_regions`] (the layout and map before the memory exists),
//! [`KvmSlots::from_gpa_map`], [`KvmSlots::sync_dirty_log`], [`GpaMap::drain`],
//! [`GpaMap::serve_urgent`] and [`GpaMap::ranges`].

pub mod gpa;
pub mod kvm;
pub mod ranges;

#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod kvm_log;

#[cfg(feature = "vm-memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
pub mod guest_memory;

pub use gpa::{DirtyRanges, GpaError, GpaMap, GpaRange, RegionSpec};
pub use kvm::{DirtyRingEntry, KvmSlots, RingImport, SlotError, SlotMapping, SlotStats, SyncError};
pub use ranges::{ClaimRanges, Drain, UrgentRanges};

#[cfg(feature = "vm-memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
pub use guest_memory::{RegionBitmap, RegionBitmapError, RegionBitmapSlice};
