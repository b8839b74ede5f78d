//! Thread placement. Cross-vCPU wake-ups cost about 60 µs on small VMs, more than the
//! emulated link delay, so where threads run decides what a fault costs.
//!
//! The `auto` plan splits the threads by path:
//! * **fault CPU** (the last allowed CPU): the guest thread, the destination's fault thread
//!   and urgent receiver, and the source's return-path thread. A fault is a chain of
//!   wake-ups guest → fault thread → return path → urgent receiver → guest; each hop is a
//!   same-CPU switch (a few µs), and the guest is blocked while they run, so they do not
//!   compete with it. This is what a VMM does when it keeps its fault thread near the vCPU.
//! * **bulk CPU** (the first allowed CPU): the source's background sender and the
//!   destination's background receiver, which stream pages at link rate.
//! * **vCPUs after the first** float over both CPUs (set explicitly, so that they do not
//!   inherit the CPU of the thread that started them); `compare-qemu` places QEMU's the same.
//!
//! With one allowed CPU, or `--pin off`, nothing is pinned.

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// What a harness thread does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The guest workload.
    Guest,
    /// The destination's userfaultfd reader.
    FaultThread,
    /// The destination's urgent-channel receiver.
    UrgentReceiver,
    /// The source's return-path (urgent) thread.
    ReturnPath,
    /// The source's background sender.
    BackgroundSender,
    /// The destination's background receiver.
    BackgroundReceiver,
    /// vCPUs after the first (they float: with two CPUs there is no third to give them).
    ExtraVcpu,
    /// The source's housekeeping: dirty-ring harvesting, the device model.
    Housekeeping,
}

impl Role {
    /// The name a thread dedicated to this role takes ([`PinPlan::apply_named`]; as QEMU's
    /// `mig/...` threads have theirs), so that its CPU time can be read per thread from
    /// outside (`compare-qemu`); `None` for the guest and housekeeping.
    pub fn thread_name(self) -> Option<&'static std::ffi::CStr> {
        Some(match self {
            Self::FaultThread => c"ph/dst/fault",
            Self::UrgentReceiver => c"ph/dst/urgent",
            Self::BackgroundReceiver => c"ph/dst/bulk",
            Self::ReturnPath => c"ph/src/return",
            Self::BackgroundSender => c"ph/src/bulk",
            Self::Guest | Self::ExtraVcpu | Self::Housekeeping => return None,
        })
    }
}

/// Which CPU each role runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PinPlan {
    fault_cpu: Option<usize>,
    bulk_cpu: Option<usize>,
}

impl PinPlan {
    /// No pinning.
    pub const OFF: Self = Self {
        fault_cpu: None,
        bulk_cpu: None,
    };

    /// The plan described in the module docs, over the CPUs this process may use.
    pub fn auto() -> Self {
        let Ok(set) = sched_getaffinity(None) else {
            return Self::OFF;
        };
        let cpus: Vec<usize> = (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect();
        if cpus.len() < 2 {
            return Self::OFF;
        }
        Self {
            fault_cpu: cpus.last().copied(),
            bulk_cpu: cpus.first().copied(),
        }
    }

    /// The CPU of `role`, if it is pinned.
    pub fn cpu(&self, role: Role) -> Option<usize> {
        match role {
            Role::Guest | Role::FaultThread | Role::UrgentReceiver | Role::ReturnPath => {
                self.fault_cpu
            }
            Role::BackgroundSender | Role::BackgroundReceiver | Role::Housekeeping => self.bulk_cpu,
            Role::ExtraVcpu => None,
        }
    }

    /// Pins the calling thread for `role` (best effort: failure leaves it unpinned).
    pub fn apply(&self, role: Role) {
        let _ = self.apply_to(None, role);
    }

    /// [`PinPlan::apply`] for a thread that does nothing but `role`'s migration work, which
    /// also takes its role's name ([`Role::thread_name`]), pinned or not.
    pub fn apply_named(&self, role: Role) {
        if let Some(name) = role.thread_name() {
            let _ = rustix::thread::set_name(name);
        }
        self.apply(role);
    }

    /// Pins thread `tid` (another process's too, with the right to) for `role`; `None` is the
    /// calling thread. Whether it was pinned.
    pub fn apply_to(&self, tid: Option<rustix::thread::Pid>, role: Role) -> bool {
        let mut set = CpuSet::new();
        match (role, self.cpu(role)) {
            (_, Some(cpu)) => set.set(cpu),
            // Floating over both CPUs, said explicitly: a vCPU thread would otherwise inherit
            // whatever CPU the thread that started it was pinned to (and QEMU's and pagehint's
            // differ there).
            (Role::ExtraVcpu, None) => match (self.fault_cpu, self.bulk_cpu) {
                (Some(f), Some(b)) => {
                    set.set(f);
                    set.set(b);
                }
                _ => return false,
            },
            (_, None) => return false,
        }
        sched_setaffinity(tid, &set).is_ok()
    }

    /// One-line description.
    pub fn describe(&self) -> String {
        match (self.fault_cpu, self.bulk_cpu) {
            (Some(f), Some(b)) => {
                format!("guest + fault path on CPU {f}, background streams on CPU {b}")
            }
            _ => "off (threads float)".to_string(),
        }
    }
}
