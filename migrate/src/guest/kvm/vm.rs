//! A KVM virtual machine over the harness's guest RAM: memory slots, the vCPUs' status
//! pages, vCPU creation, and the vCPU state that migrates.
//!
//! Slots: 0 = RAM block 0 at guest-physical 0, 1 = RAM block 1 at 4 GiB (both with
//! `KVM_MEM_LOG_DIRTY_PAGES` when dirty tracking is on), 2 = the status pages at
//! [`MAILBOX_GPA`] (device memory: neither tracked nor migrated).

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    kvm_enable_cap, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memmap2::MmapMut;

use super::boot;
use crate::guest::layout::{GuestLayout, MAILBOX_GPA};

/// `MSR_IA32_TSC`: the guest's time stamp counter (the stream workload paces itself by it).
const MSR_IA32_TSC: u32 = 0x10;
/// Slot of the status pages.
pub const MAILBOX_SLOT: u32 = 2;

/// A KVM call that failed, and what it was for.
#[derive(Debug)]
pub struct KvmError {
    /// What was being done.
    pub what: String,
    /// The kernel's answer.
    pub errno: i32,
}

impl fmt::Display for KvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            self.what,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for KvmError {}

/// Wraps a kvm-ioctls result with what it was for.
pub fn kvm<T>(
    what: impl FnOnce() -> String,
    r: Result<T, kvm_ioctls::Error>,
) -> Result<T, KvmError> {
    r.map_err(|e| KvmError {
        what: what(),
        errno: e.errno(),
    })
}

/// Whether `/dev/kvm` opens and can create a VM; `Err` says why not.
pub fn probe() -> Result<(), String> {
    let k = Kvm::new().map_err(|e| format!("/dev/kvm does not open: {e}"))?;
    if k.get_api_version() != 12 {
        return Err(format!(
            "KVM API version {} (12 expected)",
            k.get_api_version()
        ));
    }
    k.create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    Ok(())
}

/// The TSC frequency KVM gives a new vCPU, kHz: what any KVM guest on this host (QEMU's too)
/// counts in.
pub fn host_tsc_khz() -> Result<u32, KvmError> {
    let k = kvm(|| "opening /dev/kvm".into(), Kvm::new())?;
    let vm = kvm(|| "KVM_CREATE_VM".into(), k.create_vm())?;
    let vcpu = kvm(|| "KVM_CREATE_VCPU".into(), vm.create_vcpu(0))?;
    kvm(|| "KVM_GET_TSC_KHZ".into(), vcpu.get_tsc_khz())
}

/// How the VM tracks the guest's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// Not at all.
    Off,
    /// `KVM_GET_DIRTY_LOG`, which hands over and clears (re-protects) the log.
    Log,
    /// `KVM_GET_DIRTY_LOG` with manual re-protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`,
    /// initially set where offered): the get only reads the log, `KVM_CLEAR_DIRTY_LOG`
    /// clears and re-protects the pages named.
    LogManual,
    /// Dirty rings of this many bytes per vCPU.
    Ring(u32),
}

/// The vCPUs' status pages, shared with the guest.
#[derive(Debug)]
pub struct Mailboxes {
    map: MmapMut,
    vcpus: u32,
}

impl Mailboxes {
    fn new(vcpus: u32) -> std::io::Result<Self> {
        Ok(Self {
            map: MmapMut::map_anon(vcpus as usize * 4096)?,
            vcpus,
        })
    }

    fn word(&self, vcpu: u32, offset: i32) -> &AtomicU64 {
        assert!(vcpu < self.vcpus && (0..4096).contains(&offset) && offset % 8 == 0);
        // SAFETY: in bounds and 8-byte aligned (checked); the mapping lives as long as
        // `self`; the guest writes these words with plain stores and the host only with
        // atomics, so no Rust reference aliases a concurrently written non-atomic.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(vcpu as usize * 4096 + offset as usize) as *const AtomicU64)
        }
    }

    /// Reads word `offset` of vCPU `vcpu`'s page.
    pub fn read(&self, vcpu: u32, offset: i32) -> u64 {
        // Relaxed: counters and flags the guest publishes; x86 keeps them in order anyway,
        // and nothing else is read through them.
        self.word(vcpu, offset).load(Ordering::Relaxed)
    }

    /// Writes word `offset` of vCPU `vcpu`'s page.
    pub fn write(&self, vcpu: u32, offset: i32, v: u64) {
        // Relaxed: a flag or parameter the guest polls.
        self.word(vcpu, offset).store(v, Ordering::Relaxed);
    }

    fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }
}

/// A VM over guest RAM the caller owns.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    cpuid: CpuId,
    mailboxes: Mailboxes,
    tracking: Tracking,
    block_bytes: [u64; 2],
}

impl Vm {
    /// A VM whose RAM block `i` is `len` bytes at host address `ram[i]`, with `tracking`.
    ///
    /// # Safety
    /// `ram[i]` must be mappings of the layout's block sizes that stay mapped (and are not
    /// remapped) for as long as the VM exists: the guest reads and writes them.
    pub unsafe fn new(
        layout: &GuestLayout,
        ram: [u64; 2],
        tracking: Tracking,
    ) -> Result<Self, KvmError> {
        let kvm_ = kvm(|| "opening /dev/kvm".into(), Kvm::new())?;
        let fd = kvm(|| "KVM_CREATE_VM".into(), kvm_.create_vm())?;
        if let Tracking::Ring(bytes) = tracking {
            // Before any vCPU exists, as KVM requires. ACQ_REL where offered (the ordering
            // contract for harvesting on any architecture), else the plain ring.
            let cap = if fd.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)) > 0 {
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL
            } else {
                KVM_CAP_DIRTY_LOG_RING
            };
            let max = fd.check_extension_raw(u64::from(cap));
            if max <= 0 || (bytes as i32) > max {
                return Err(KvmError {
                    what: format!("dirty ring of {bytes} bytes (KVM offers {max})"),
                    errno: libc::ENOTSUP,
                });
            }
            let mut c = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            c.args[0] = u64::from(bytes);
            kvm(|| "enabling the dirty ring".into(), fd.enable_cap(&c))?;
        }
        if tracking == Tracking::LogManual {
            // Before the slots: initially-set applies to slots created after it.
            pagehint::vmm::kvm_log::enable_manual_protect(&fd, true).map_err(|e| KvmError {
                what: "enabling manual dirty-log protection".into(),
                errno: e.raw_os_error().unwrap_or(libc::ENOTSUP),
            })?;
        }
        let cpuid = kvm(
            || "KVM_GET_SUPPORTED_CPUID".into(),
            kvm_.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        let mailboxes = Mailboxes::new(layout.vcpus()).map_err(|e| KvmError {
            what: "mapping the status pages".into(),
            errno: e.raw_os_error().unwrap_or(libc::ENOMEM),
        })?;
        let log = if tracking == Tracking::Off {
            0
        } else {
            KVM_MEM_LOG_DIRTY_PAGES
        };
        let ranges = layout.block_ranges();
        for (slot, (&(gpa, len), &host)) in ranges.iter().zip(&ram).enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: log,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: host,
            };
            // SAFETY: the caller guarantees the mapping outlives the VM.
            kvm(|| format!("memory slot {slot}"), unsafe {
                fd.set_user_memory_region(region)
            })?;
        }
        let mb = kvm_userspace_memory_region {
            slot: MAILBOX_SLOT,
            flags: 0,
            guest_phys_addr: MAILBOX_GPA,
            memory_size: u64::from(layout.vcpus()) * 4096,
            userspace_addr: mailboxes.addr(),
        };
        // SAFETY: the status pages are owned by `self` and outlive the slot.
        kvm(|| "status-page slot".into(), unsafe {
            fd.set_user_memory_region(mb)
        })?;
        Ok(Self {
            fd,
            cpuid,
            mailboxes,
            tracking,
            block_bytes: [ranges[0].1, ranges[1].1],
        })
    }

    /// The VM descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The status pages.
    pub fn mailboxes(&self) -> &Mailboxes {
        &self.mailboxes
    }

    /// How writes are tracked.
    pub fn tracking(&self) -> Tracking {
        self.tracking
    }

    /// Creates vCPU `index` with the host's supported CPUID (long mode needs it).
    pub fn create_vcpu(&self, index: u32) -> Result<VcpuFd, KvmError> {
        let v = kvm(
            || format!("creating vCPU {index}"),
            self.fd.create_vcpu(u64::from(index)),
        )?;
        kvm(
            || format!("vCPU {index}: KVM_SET_CPUID2"),
            v.set_cpuid2(&self.cpuid),
        )?;
        Ok(v)
    }

    /// `KVM_GET_DIRTY_LOG` of RAM block `block`: what the guest wrote since the last call
    /// ([`Tracking::Log`]), or since each page was last cleared ([`Tracking::LogManual`]).
    pub fn dirty_log(&self, block: u32) -> Result<Vec<u64>, KvmError> {
        kvm(
            || format!("KVM_GET_DIRTY_LOG of slot {block}"),
            self.fd
                .get_dirty_log(block, self.block_bytes[block as usize] as usize),
        )
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects the pages harvested from every ring.
    pub fn reset_dirty_rings(&self) -> Result<u32, KvmError> {
        // SAFETY: KVM_RESET_DIRTY_RINGS (_IO(KVMIO, 0xc7)) takes no argument and returns a count.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), 0xaec7 as _) };
        if r < 0 {
            return Err(KvmError {
                what: "KVM_RESET_DIRTY_RINGS".into(),
                errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            });
        }
        Ok(r as u32)
    }

    /// The TSC frequency KVM gives vCPUs, kHz.
    pub fn tsc_khz(&self, vcpu: &VcpuFd) -> Result<u32, KvmError> {
        kvm(|| "KVM_GET_TSC_KHZ".into(), vcpu.get_tsc_khz())
    }
}

/// What a vCPU carries from the source to the destination: general and system registers
/// and the TSC (all this guest uses: no FPU, no interrupts, no APIC).
#[derive(Clone)]
pub struct VcpuState {
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// The guest's clock when it stopped: `MSR_IA32_TSC` plus the program's clock offset
    /// (see [`super::program::mailbox::CLOCK_OFFSET`]).
    pub tsc: u64,
}

impl fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .field("tsc", &self.tsc)
            .finish()
    }
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: `T` is one of the plain-old-data KVM structures (integers only, no padding
    // that could be uninitialised: they come zero-initialised from the kernel or Default).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: the length matches; every bit pattern is a valid value of these integer-only
    // structures.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len());
    }
    Some(v)
}

impl VcpuState {
    /// Encoded size.
    pub const LEN: usize = std::mem::size_of::<kvm_regs>() + std::mem::size_of::<kvm_sregs>() + 8;

    /// The boot state of vCPU `index` over `vcpu`'s fresh system registers.
    pub fn boot(vcpu: &VcpuFd, index: u32, seed: u64) -> Result<Self, KvmError> {
        let base = kvm(|| format!("vCPU {index}: KVM_GET_SREGS"), vcpu.get_sregs())?;
        Ok(Self {
            regs: boot::boot_regs(index, seed),
            sregs: boot::boot_sregs(base),
            tsc: 0,
        })
    }

    /// The vCPU's TSC as KVM reports it (what `rdtsc` returns in the guest).
    pub fn read_tsc(vcpu: &VcpuFd) -> Result<u64, KvmError> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| KvmError {
            what: "building the MSR list".into(),
            errno: libc::EINVAL,
        })?;
        let n = kvm(|| "KVM_GET_MSRS (TSC)".into(), vcpu.get_msrs(&mut msrs))?;
        if n != 1 {
            return Err(KvmError {
                what: "KVM_GET_MSRS returned no TSC".into(),
                errno: libc::EINVAL,
            });
        }
        Ok(msrs.as_slice()[0].data)
    }

    /// Reads a stopped vCPU's state (`tsc` is the raw TSC; add the clock offset).
    pub fn save(vcpu: &VcpuFd) -> Result<Self, KvmError> {
        let regs = kvm(|| "KVM_GET_REGS".into(), vcpu.get_regs())?;
        let sregs = kvm(|| "KVM_GET_SREGS".into(), vcpu.get_sregs())?;
        let tsc = Self::read_tsc(vcpu)?;
        Ok(Self { regs, sregs, tsc })
    }

    /// Loads the state into a vCPU that has not run. If `set_tsc` (a booting vCPU keeps
    /// KVM's), the TSC is moved to `tsc` through the vCPU's TSC offset
    /// (`KVM_VCPU_TSC_OFFSET`; writing `MSR_IA32_TSC` from the host is no good: KVM treats a
    /// write within a second of what it expects as an attempt to synchronise vCPUs and
    /// keeps its own offset), or the MSR where the attribute is missing. Some KVMs cannot
    /// move it at all (on PVM the guest's user code reads the host's TSC), so the caller
    /// reads it back and makes up the difference in the program's clock offset.
    pub fn load(&self, vcpu: &VcpuFd, set_tsc: bool) -> Result<(), KvmError> {
        kvm(|| "KVM_SET_SREGS".into(), vcpu.set_sregs(&self.sregs))?;
        kvm(|| "KVM_SET_REGS".into(), vcpu.set_regs(&self.regs))?;
        if set_tsc {
            // SAFETY: rdtsc has no preconditions; KVM's host TSC is this one (no scaling:
            // both sides run at KVM's default frequency).
            let host = unsafe { core::arch::x86_64::_rdtsc() };
            let offset = self.tsc.wrapping_sub(host);
            let attr = kvm_bindings::kvm_device_attr {
                flags: 0,
                group: kvm_bindings::KVM_VCPU_TSC_CTRL,
                attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
                addr: &offset as *const u64 as u64,
            };
            // SAFETY: KVM_HAS_DEVICE_ATTR / KVM_SET_DEVICE_ATTR (_IOW(KVMIO, 0xe3 / 0xe1,
            // struct kvm_device_attr)) read the attribute, and the u64 at `addr`, which lives
            // across the calls.
            let has = unsafe { libc::ioctl(vcpu.as_raw_fd(), 0x4018_aee3, &attr) } == 0;
            if has {
                // SAFETY: as above.
                if unsafe { libc::ioctl(vcpu.as_raw_fd(), 0x4018_aee1, &attr) } != 0 {
                    return Err(KvmError {
                        what: "KVM_SET_DEVICE_ATTR (TSC offset)".into(),
                        errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                    });
                }
                return Ok(());
            }
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: self.tsc,
                ..Default::default()
            }])
            .map_err(|_| KvmError {
                what: "building the MSR list".into(),
                errno: libc::EINVAL,
            })?;
            kvm(|| "KVM_SET_MSRS (TSC)".into(), vcpu.set_msrs(&msrs))?;
        }
        Ok(())
    }

    /// The wire encoding: the KVM structures as the kernel lays them out, then the TSC.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(as_bytes(&self.regs));
        out.extend_from_slice(as_bytes(&self.sregs));
        out.extend_from_slice(&self.tsc.to_le_bytes());
        out
    }

    /// Decodes [`encode`](Self::encode)'s bytes (`None` if the length is wrong).
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        let r = std::mem::size_of::<kvm_regs>();
        let s = std::mem::size_of::<kvm_sregs>();
        Some(Self {
            regs: from_bytes(&b[..r])?,
            sregs: from_bytes(&b[r..r + s])?,
            tsc: u64::from_le_bytes(b[r + s..].try_into().ok()?),
        })
    }
}
