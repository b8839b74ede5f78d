//! The KVM guest: a virtual machine whose vCPUs run generated x86-64 workload programs over
//! the harness's guest RAM.
//!
//! * [`program`]: the guest program (assembled here) and its status-page ABI;
//! * [`boot`]: page tables, GDT and first registers;
//! * [`vm`]: memory slots, status pages, vCPUs, the vCPU state that migrates;
//! * [`vcpu`]: the `KVM_RUN` loop and the kick that stops a vCPU anywhere;
//! * [`dirty`]: KVM's dirty log and dirty rings into pagehint's bitmap;
//! * [`stats`]: KVM's own counters (page faults, TLB flushes).
//!
//! [`Machine`] puts them together for one side of a migration: the source boots the
//! program, runs it through precopy and stops it; the destination loads the stopped vCPUs'
//! state and runs them on, over memory that faults through userfaultfd.

pub mod boot;
pub mod dirty;
pub mod program;
pub mod stats;
pub mod vcpu;
pub mod vm;

use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};

use kvm_ioctls::VcpuFd;

use crate::guest::image::PageFault;
use crate::guest::layout::GuestLayout;
use crate::guest::GuestWait;
use crate::sys::pin::{PinPlan, Role};
use dirty::DirtyRing;
use program::mailbox as mb;
use stats::KvmStats;
use vcpu::{VcpuControl, VcpuEnd, VcpuEnv};
use vm::{KvmError, Tracking, VcpuState, Vm};

/// Why the KVM guest cannot run here, if it cannot: `/dev/kvm` must open and create a VM,
/// and userfaultfd must report kernel-mode faults (KVM's vCPUs fault inside the kernel).
pub fn unavailable() -> Option<String> {
    if let Err(e) = vm::probe() {
        return Some(e);
    }
    match crate::sys::uffd::Userfault::open() {
        Err(e) => Some(format!("userfaultfd does not open: {e}")),
        Ok(u) if !u.origin().sees_kernel_faults() => Some(
            "userfaultfd sees only user-mode faults here (KVM's vCPUs fault in the kernel)".into(),
        ),
        Ok(_) => None,
    }
}

/// For tests: whether the KVM guest can run here. Where it cannot, prints that `test` was
/// skipped and why, and returns false — unless `PAGEHINT_REQUIRE_KVM` is set (`.ci/run` sets
/// it wherever `/dev/kvm` opens), where it panics: a KVM test is never skipped on a machine
/// that has KVM.
pub fn ready_or_skip(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var_os("PAGEHINT_REQUIRE_KVM").is_some() => {
            panic!("{test}: PAGEHINT_REQUIRE_KVM is set, but the KVM guest cannot run: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: it needs KVM and kernel-mode userfaultfd: {why}");
            false
        }
    }
}

/// Bytes of dirty ring per vCPU (4096 entries).
pub const RING_BYTES: u32 = 64 << 10;

/// What the guest program reported in one vCPU's status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCounters {
    /// Pages checked, or lookups.
    pub ops: u64,
    /// Pages written.
    pub writes: u64,
    /// Failed checks.
    pub errors: u64,
    /// The first failure: kind, global page, the two words found, the generation expected.
    pub first_error: Option<(PageFault, u64, u64, u64, u64)>,
    /// Stream frames played.
    pub frames: u64,
    /// Frames finished more than one interval late.
    pub late_frames: u64,
    /// The stream's longest pause, TSC ticks.
    pub longest_pause_tsc: u64,
    /// Pages verified by the final check.
    pub verified: u64,
    /// 1 running, 2 verifying, 3 done.
    pub state: u64,
    /// The program's clock at its first completed operation (0: none yet).
    pub first_op_clock: u64,
    /// Operations completed before the host's window end, once the guest passed it.
    pub window_ops: u64,
    /// Whether the guest stamped everything it had to (the first operation, and the window's
    /// end if one was set).
    pub stamped: bool,
}

/// The stream's frame interval in TSC ticks: `frame_pages` pages at `rate` bytes/s on a TSC of
/// `tsc_khz`.
pub fn frame_tsc(rate: u64, frame_pages: u64, tsc_khz: u32) -> u64 {
    (u128::from(frame_pages * 4096) * u128::from(tsc_khz) * 1000 / u128::from(rate.max(1))) as u64
}

impl GuestCounters {
    /// The first failure in words.
    pub fn first_error_text(&self) -> Option<String> {
        self.first_error.map(|(k, page, w1, w2, gen)| {
            format!(
                "{} at page {page} (found {w1:#x}, {w2:#x}; generation {gen} expected)",
                k.describe()
            )
        })
    }
}

/// One side's VM, its vCPUs and their controls.
#[derive(Debug)]
pub struct Machine {
    vm: Vm,
    /// Each locked by its thread while it runs.
    vcpus: Vec<Mutex<VcpuFd>>,
    controls: Vec<VcpuControl>,
    tsc_khz: u32,
    /// KVM's counters of each vCPU and of the VM (`None` where KVM has no stats file).
    stats: Option<(Vec<KvmStats>, KvmStats)>,
}

/// KVM's counters summed over a machine's vCPUs (see [`stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmCounters {
    /// Page faults KVM handled (`pf_taken`).
    pub faults: u64,
    /// Of those, fixed on the slow path (`pf_fixed`).
    pub fixed: u64,
    /// Of those, fixed on the fast path without the MMU lock (`pf_fast`), as most writes to
    /// pages write-protected for dirty logging are.
    pub fast: u64,
    /// Remote TLB flushes the VM asked for (`remote_tlb_flush`).
    pub tlb_flushes: u64,
}

impl KvmCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            faults: self.faults.saturating_sub(earlier.faults),
            fixed: self.fixed.saturating_sub(earlier.fixed),
            fast: self.fast.saturating_sub(earlier.fast),
            tlb_flushes: self.tlb_flushes.saturating_sub(earlier.tlb_flushes),
        }
    }
}

impl Machine {
    /// A VM over RAM blocks at host addresses `ram`, with its vCPUs created, and their dirty
    /// rings if `tracking` uses rings.
    ///
    /// # Safety
    /// As [`Vm::new`]: the RAM mappings outlive the machine.
    pub unsafe fn new(
        layout: &GuestLayout,
        ram: [u64; 2],
        tracking: Tracking,
    ) -> Result<(Self, Vec<DirtyRing>), KvmError> {
        // SAFETY: forwarded to the caller.
        let vm = unsafe { Vm::new(layout, ram, tracking) }?;
        let mut vcpus = Vec::new();
        let mut rings = Vec::new();
        for i in 0..layout.vcpus() {
            let v = vm.create_vcpu(i)?;
            if let Tracking::Ring(bytes) = tracking {
                rings.push(DirtyRing::map(&v, bytes).map_err(|e| KvmError {
                    what: format!("mapping vCPU {i}'s dirty ring"),
                    errno: e.raw_os_error().unwrap_or(libc::EINVAL),
                })?);
            }
            vcpus.push(v);
        }
        let tsc_khz = vm.tsc_khz(&vcpus[0])?;
        // Measurement only: a KVM without stats files (before Linux 5.14) still migrates.
        let stats = vcpus
            .iter()
            .map(|v| KvmStats::open(v, &["pf_taken", "pf_fixed", "pf_fast"]))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| Ok((v, KvmStats::open(vm.fd(), &["remote_tlb_flush"])?)))
            .ok();
        let vcpus = vcpus.into_iter().map(Mutex::new).collect();
        let controls = (0..layout.vcpus())
            .map(|_| VcpuControl::default())
            .collect();
        Ok((
            Self {
                vm,
                vcpus,
                controls,
                tsc_khz,
                stats,
            },
            rings,
        ))
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The vCPUs' controls.
    pub fn controls(&self) -> &[VcpuControl] {
        &self.controls
    }

    /// The guest's TSC frequency, kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Sets every vCPU to its boot state.
    pub fn boot(&self, seed: u64) -> Result<(), KvmError> {
        for (i, v) in self.vcpus.iter().enumerate() {
            let v = v.lock().unwrap_or_else(|p| p.into_inner());
            VcpuState::boot(&v, i as u32, seed)?.load(&v, false)?;
        }
        Ok(())
    }

    /// Loads the states saved at the source (one per vCPU, in order), and sets each
    /// program's clock offset so that its clock resumes where it stopped (the downtime does
    /// not count: the guest was not running), whatever KVM could do with the TSC.
    pub fn load(&self, states: &[VcpuState]) -> Result<(), KvmError> {
        if states.len() != self.vcpus.len() {
            return Err(KvmError {
                what: format!(
                    "{} vCPU states for {} vCPUs",
                    states.len(),
                    self.vcpus.len()
                ),
                errno: libc::EINVAL,
            });
        }
        for (i, (s, v)) in states.iter().zip(&self.vcpus).enumerate() {
            let v = v.lock().unwrap_or_else(|p| p.into_inner());
            s.load(&v, true)?;
            let now = VcpuState::read_tsc(&v)?;
            self.vm
                .mailboxes()
                .write(i as u32, mb::CLOCK_OFFSET, s.tsc.wrapping_sub(now));
        }
        Ok(())
    }

    /// Tells the program how fast each of its streams plays (`rate` bytes/s in frames of
    /// `frame_pages`; see [`Workload::stream_rate_each`](crate::guest::Workload::stream_rate_each)).
    pub fn set_stream_rate(&self, rate: u64, frame_pages: u64) {
        let ticks = frame_tsc(rate, frame_pages, self.tsc_khz);
        for i in 0..self.controls.len() as u32 {
            self.vm.mailboxes().write(i, mb::FRAME_TSC, ticks);
        }
    }

    /// Runs every vCPU on its own thread of `scope` until it is kicked, done or failed,
    /// waiting out its stream's schedule as `wait` says. `ring_full(i)` harvests vCPU `i`'s
    /// dirty ring when KVM says it is full.
    pub fn run<'s>(
        &'s self,
        scope: &'s Scope<'s, '_>,
        pin: PinPlan,
        wait: GuestWait,
        ring_full: Option<&'s (dyn Fn(u32) -> Result<(), String> + Sync)>,
    ) -> Vec<ScopedJoinHandle<'s, VcpuEnd>> {
        let mailboxes = self.vm.mailboxes();
        let tsc_khz = self.tsc_khz;
        let spin = wait == GuestWait::Spin;
        self.vcpus
            .iter()
            .zip(&self.controls)
            .enumerate()
            .map(|(i, (vcpu, ctl))| {
                std::thread::Builder::new()
                    .name(format!("vcpu{i}"))
                    .spawn_scoped(scope, move || {
                        pin.apply(if i == 0 { Role::Guest } else { Role::ExtraVcpu });
                        crate::sys::clock::tight_timer_slack();
                        let env = VcpuEnv {
                            index: i as u32,
                            mailboxes,
                            tsc_khz,
                            ring_full,
                            spin,
                        };
                        let mut vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
                        vcpu::run(&mut vcpu, ctl, &env)
                    })
                    .expect("spawning a vCPU thread")
            })
            .collect()
    }

    /// Kicks every vCPU (each saves its state and returns [`VcpuEnd::Stopped`]).
    pub fn kick_all(&self) {
        for c in &self.controls {
            c.kick();
        }
    }

    /// Asks every program to stop, verify its share and report done.
    pub fn finish_all(&self) {
        for (i, c) in self.controls.iter().enumerate() {
            self.vm.mailboxes().write(i as u32, mb::STOP, 1);
            c.wake();
        }
    }

    /// Whether every program reported that it started.
    pub fn all_started(&self) -> bool {
        self.controls.iter().all(|c| c.started())
    }

    /// KVM's counters now, summed over the vCPUs (`None` where KVM has no stats files).
    pub fn kvm_counters(&self) -> Result<Option<KvmCounters>, KvmError> {
        let Some((vcpus, vm)) = &self.stats else {
            return Ok(None);
        };
        let mut c = KvmCounters {
            tlb_flushes: vm.read()?[0],
            ..KvmCounters::default()
        };
        for v in vcpus {
            let r = v.read()?;
            (c.faults, c.fixed, c.fast) = (c.faults + r[0], c.fixed + r[1], c.fast + r[2]);
        }
        Ok(Some(c))
    }

    /// What each vCPU's program reported.
    pub fn counters(&self) -> Vec<GuestCounters> {
        let m = self.vm.mailboxes();
        (0..self.controls.len() as u32)
            .map(|i| GuestCounters::decode(|o| m.read(i, o)))
            .collect()
    }
}

impl GuestCounters {
    /// Decodes a status page, given its word at each byte offset (see [`mb`]).
    pub fn decode(r: impl Fn(i32) -> u64) -> Self {
        Self {
            ops: r(mb::OPS),
            writes: r(mb::WRITES),
            errors: r(mb::ERRORS),
            first_error: (r(mb::ERRORS) > 0).then(|| {
                (
                    PageFault::from_code(r(mb::ERR_KIND)).unwrap_or(PageFault::Corrupt),
                    r(mb::ERR_PAGE),
                    r(mb::ERR_W1),
                    r(mb::ERR_W2),
                    r(mb::ERR_GEN),
                )
            }),
            frames: r(mb::FRAMES),
            late_frames: r(mb::LATE_FRAMES),
            longest_pause_tsc: r(mb::LONGEST_PAUSE),
            verified: r(mb::VERIFIED),
            state: r(mb::STATE),
            first_op_clock: r(mb::FIRST_OP_CLOCK),
            window_ops: r(mb::WINDOW_OPS),
            stamped: r(mb::STAMPED) != 0,
        }
    }
}

#[cfg(test)]
mod tests;
