//! The guest: its memory layout and image, and the two kinds that run it.
//!
//! * [`layout`]: RAM blocks, guest-physical addresses, the system area and the windows;
//! * [`image`]: signed pages, the generation table, the hash table, the parameter page;
//! * [`kvm`]: a KVM virtual machine whose vCPUs run generated x86-64 programs;
//! * [`thread`]: a host thread reading guest memory (the fallback where KVM is missing).

pub mod image;
pub mod kvm;
pub mod layout;
pub mod thread;
