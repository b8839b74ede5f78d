//! The operating system, wrapped: every system call the harness makes outside its sockets
//! and KVM is behind one of these modules, each with typed errors.
//!
//! * [`uffd`]: userfaultfd in missing mode (register, read faults, place pages);
//! * [`discard`]: many ranges of memory dropped at once (`MADV_DONTNEED`);
//! * [`clock`]: one monotonic nanosecond clock, precise sleeps, the boot id;
//! * [`pin`]: which CPU each harness thread runs on;
//! * [`warm`]: available memory, and the warm-up before measuring;
//! * [`hugepages`]: 2 MiB hugetlb pages reserved for a run and given back;
//! * [`vmstat`]: the kernel's page allocation, reclaim, compaction and THP counters;
//! * [`fds`]: the file-descriptor limit a listening source raises.
//!
//! Nothing here knows about migration: these modules import nothing else of the crate.

pub mod clock;
pub mod discard;
pub mod fds;
pub mod hugepages;
pub mod pin;
pub mod uffd;
pub mod vmstat;
pub mod warm;
