//! What a dirty-log merge sits next to: the kernel's side of one sync of a real KVM slot.
//!
//! A VMM's dirty-log sync is `KVM_GET_DIRTY_LOG` (and, with manual protection, as QEMU uses
//! it, `KVM_CLEAR_DIRTY_LOG` of what it got) followed by the merge into its own bitmap. This
//! fixture times the kernel part on a real KVM memory slot of the same size and the same dirty
//! density as the merge's log: a `MAP_NORESERVE` anonymous mapping (nothing touched), a VM with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` and `KVM_DIRTY_LOG_INITIALLY_SET` (every page of a new
//! slot starts dirty), then the complement of the log cleared, so that the slot's dirty log is
//! exactly the merge's log. One timed iteration is `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`
//! of the bits it returned; between iterations (untimed) the slot is deleted and added again
//! to start from the same state.
//!
//! The pages are not mapped into the guest, so the clear's write-protection finds no page
//! table entries to change: this is the cheapest a sync of that log can be, a floor. It needs
//! `/dev/kvm` and the capability; `KvmLogSync::new` says why when it cannot run.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET`.
const MANUAL_PROTECT_AND_INITIALLY_SET: u64 = 1 | 2;
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 = 0xc018_aec0;
/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)` (called directly, into a
/// buffer allocated once: no allocation in the timed region).
const KVM_GET_DIRTY_LOG: u64 = 0x4010_ae42;
/// The slot's guest physical address: above 4 GiB, as a VMM maps high RAM.
const GPA: u64 = 1 << 32;

/// A VM with one dirty-logged slot of `bytes` whose log can be set to a given pattern.
pub struct KvmLogSync {
    vm: VmFd,
    _kvm: Kvm,
    host: *mut libc::c_void,
    bytes: u64,
    /// The log the slot is reset to before each timed sync.
    log: Vec<u64>,
    /// The complement of `log` (what is cleared after the slot is created all dirty).
    not_log: Vec<u64>,
    /// Where `KVM_GET_DIRTY_LOG` writes.
    got: Vec<u64>,
    /// Whether slot 0 exists (KVM refuses to delete a slot that does not).
    added: bool,
}

impl KvmLogSync {
    /// A slot of `bytes` (4 KiB pages, a multiple of 64 pages) whose dirty log will be `log`;
    /// `Err` says why the case cannot run here.
    pub fn new(bytes: u64, log: &[u64]) -> Result<Self, String> {
        let pages = bytes / 4096;
        if pages % 64 != 0 || log.len() as u64 != pages / 64 {
            return Err(format!(
                "a {bytes}-byte slot needs a log of {} words",
                pages / 64
            ));
        }
        let kvm = Kvm::new().map_err(|e| format!("/dev/kvm does not open: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        let cap = u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
        let supported = vm.check_extension_raw(cap);
        if supported as u64 & MANUAL_PROTECT_AND_INITIALLY_SET != MANUAL_PROTECT_AND_INITIALLY_SET {
            return Err("KVM lacks KVM_DIRTY_LOG_INITIALLY_SET".into());
        }
        let mut c = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        c.args[0] = MANUAL_PROTECT_AND_INITIALLY_SET;
        vm.enable_cap(&c)
            .map_err(|e| format!("enabling manual dirty-log protection: {e}"))?;
        // SAFETY: a fresh private anonymous mapping, never touched; unmapped on drop.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {bytes} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut s = Self {
            vm,
            _kvm: kvm,
            host,
            bytes,
            log: log.to_vec(),
            not_log: log.iter().map(|w| !w).collect(),
            got: vec![0; log.len()],
            added: false,
        };
        s.reset()?;
        Ok(s)
    }

    fn region(&self, size: u64) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: GPA,
            memory_size: size,
            userspace_addr: self.host as u64,
        }
    }

    /// `KVM_GET_DIRTY_LOG` into `got`.
    fn get(&mut self) -> Result<(), String> {
        let arg = kvm_dirty_log {
            slot: 0,
            padding1: 0,
            __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: self.got.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `got` has one bit per page of slot 0, as KVM writes it.
        let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_GET_DIRTY_LOG as _, &arg) };
        if r < 0 {
            return Err(format!(
                "KVM_GET_DIRTY_LOG: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG` of `bits` (one bit per page of the slot).
    fn clear(&self, bits: &[u64]) -> Result<(), String> {
        let arg = kvm_clear_dirty_log {
            slot: 0,
            num_pages: (bits.len() * 64) as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bits.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: the argument is a valid kvm_clear_dirty_log whose bitmap has num_pages bits.
        let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &arg) };
        if r < 0 {
            return Err(format!(
                "KVM_CLEAR_DIRTY_LOG: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Deletes and re-adds the slot (every page dirty again), then clears the complement of
    /// the log: the slot's dirty log is `log`.
    fn reset(&mut self) -> Result<(), String> {
        // SAFETY: deleting slot 0 (size 0), then adding it over the mapping this value owns.
        unsafe {
            if self.added {
                self.vm
                    .set_user_memory_region(self.region(0))
                    .map_err(|e| format!("deleting the slot: {e}"))?;
                self.added = false;
            }
            self.vm
                .set_user_memory_region(self.region(self.bytes))
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION of {} bytes: {e}", self.bytes))?;
            self.added = true;
        }
        self.clear(&self.not_log)
    }

    /// `iters` syncs (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` of what it returned); only
    /// the two ioctls are timed.
    pub fn sync(&mut self, iters: u64) -> Duration {
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            self.reset().expect("resetting the slot's dirty log");
            let t = Instant::now();
            self.get().expect("KVM_GET_DIRTY_LOG");
            self.clear(&self.got).expect("KVM_CLEAR_DIRTY_LOG");
            timed += t.elapsed();
        }
        assert_eq!(
            self.got, self.log,
            "the slot's dirty log is the merge's log"
        );
        timed
    }
}

impl Drop for KvmLogSync {
    fn drop(&mut self) {
        // SAFETY: the slot is deleted first, so KVM no longer refers to the mapping made in
        // `new`, which is then unmapped once.
        unsafe {
            if self.added {
                let _ = self.vm.set_user_memory_region(self.region(0));
            }
            libc::munmap(self.host, self.bytes as usize);
        }
    }
}
