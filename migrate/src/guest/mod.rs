//! The guest: its memory layout and image, and the two kinds that run it.
//!
//! * [`layout`]: RAM blocks, guest-physical addresses, the system area and the windows;
//! * [`image`]: signed pages, the generation table, the hash table, the parameter page;
//! * [`kvm`]: a KVM virtual machine whose vCPUs run generated x86-64 programs;
//! * [`disk`]: the same program as a bootable raw disk image, for QEMU;
//! * [`workload`]: what the guest does, every fact of each workload in one place (the
//!   thread guest, which reads the same image at the destination where KVM is missing, is
//!   in `dest::thread_guest`).

pub mod disk;
pub mod image;
pub mod kvm;
pub mod layout;
pub mod workload;

pub use workload::{GuestWait, Pause, Workload, STREAM_FRAME_PAGES};
