//! The guest: its memory layout and image, and the two kinds that run it.
//!
//! * [`layout`]: RAM blocks, guest-physical addresses, the system area and the windows;
//! * [`image`]: signed pages, the generation table, the hash table, the parameter page;
//! * [`kvm`]: a KVM virtual machine whose vCPUs run generated x86-64 programs;
//! * [`disk`]: the same program as a bootable raw disk image, for QEMU;
//! * [`Workload`]: what the guest does (the thread guest, which reads the same image at the
//!   destination where KVM is missing, is in [`crate::dest::thread_guest`]).

pub mod disk;
pub mod image;
pub mod kvm;
pub mod layout;

use crate::names::named_enum;

/// Frames of the stream workload, in target pages (64 KiB).
pub const STREAM_FRAME_PAGES: u64 = 16;

named_enum!(
    /// What the guest does while it is migrated.
    Workload, "workload" {
        /// Reads (and every eighth page writes) its window in order, over and over.
        Seq = 1, "seq";
        /// Reads random pages of the data area, writing a quarter of those it owns.
        Random = 2, "random";
        /// Plays its window in 64 KiB frames at a fixed rate, like video playback.
        Stream = 3, "stream";
        /// Looks keys up in a hash table built before the migration; updates an eighth.
        Kv = 4, "kv";
    }
);
