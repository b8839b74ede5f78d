//! KVM's dirty log through a VM file descriptor, with manual re-protection (feature `kvm`).
//!
//! # What manual re-protection changes
//! By default `KVM_GET_DIRTY_LOG` hands the log over *and* clears it, write-protecting every
//! page it reports at once: the whole dirty set of a slot is re-protected at every sync, even
//! the pages that will not be sent for a while (each guest write to them then takes a fault,
//! and may be logged again for nothing). With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled
//! ([`enable_manual_protect`]), `KVM_GET_DIRTY_LOG` (kvm-ioctls' `VmFd::get_dirty_log`, as
//! before) only reads the log, and `KVM_CLEAR_DIRTY_LOG` ([`clear_dirty_log`]) clears and re-protects the pages named,
//! in chunks: QEMU clears each chunk just before it sends it. Here a precopy drain calls
//! [`KvmSlots::clear_dirty_log`] with the words it has just taken from the bitmap
//! ([`Drain::on_chunk`](crate::vmm::Drain::on_chunk)), before reading the pages: a write
//! after the clear faults and is logged again, so it is sent again (I7); a write before it is
//! in the page that is about to be read.
//!
//! # Protocol of a precopy round with manual clearing
//! 1. `KVM_GET_DIRTY_LOG` of every slot (kvm-ioctls' `VmFd::get_dirty_log`; not cleared),
//!    merged into the bitmap ([`KvmSlots::merge_dirty_log`]);
//! 2. a drain takes a chunk of dirty words from the bitmap, and clears exactly those pages in
//!    KVM ([`KvmSlots::clear_dirty_log`]: `KVM_CLEAR_DIRTY_LOG`, re-protecting them);
//! 3. then reads and sends the pages of the chunk.
//!
//! A failed clear loses nothing: KVM keeps the page's bit set, the next sync reports it again,
//! and it is sent again.
//!
//! # `unsafe`
//! Two `ioctl` calls with a pointer argument, each on a file descriptor the caller owns
//! (`AsRawFd`), pointing to a struct that lives for the call; the kernel only *reads* through
//! them, and the one buffer it reads (the clear mask) is checked first to be exactly as long
//! as the request says. (No `KVM_GET_DIRTY_LOG` here: the kernel would write as many bytes as
//! the slot has pages, which the VM file descriptor cannot tell us; kvm-ioctls'
//! `VmFd::get_dirty_log` sizes it from the slot size its caller gives.)

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};

#[cfg(doc)]
use crate::vmm::KvmSlots;

/// `_IOC(dir, KVMIO, nr, size)` as Linux's `asm-generic/ioctl.h` builds it (x86, arm64, riscv).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((KVMIO as u64) << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// `_IO(KVMIO, 0x03)`.
const KVM_CHECK_EXTENSION: u64 = ioc(0, 0x03, 0);
/// `_IOW(KVMIO, 0xa3, struct kvm_enable_cap)`.
const KVM_ENABLE_CAP: u64 = ioc(IOC_WRITE, 0xa3, std::mem::size_of::<kvm_enable_cap>());
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0xc0,
    std::mem::size_of::<kvm_clear_dirty_log>(),
);

// The numbers kvm-ioctls and the kernel headers use.
const _: () = assert!(KVM_ENABLE_CAP == 0x4068_aea3);
const _: () = assert!(KVM_CLEAR_DIRTY_LOG == 0xc018_aec0);

/// Calls `ioctl(fd, request, arg)`, mapping -1 to the OS error.
///
/// # Safety
/// `arg` must be what `request` expects: a value, or a pointer to memory the kernel may read
/// (and, for read requests, write) for the size the request encodes, valid for the call.
unsafe fn ioctl(fd: &impl AsRawFd, request: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the caller's contract; `as _` adapts the request type (c_ulong on glibc, c_int
    // on musl).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// What [`enable_manual_protect`] switched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManualProtect {
    /// `KVM_DIRTY_LOG_INITIALLY_SET`: slots created with dirty logging from now on start with
    /// every page dirty in KVM's log and none write-protected (protection is deferred to the
    /// first clear of each page, which spreads the cost of the first round).
    pub initially_set: bool,
}

/// The manual-protect flags this KVM supports (`KVM_CHECK_EXTENSION` of
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): 0 if none.
pub fn manual_protect_support(vm: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value.
    let r = unsafe {
        ioctl(
            vm,
            KVM_CHECK_EXTENSION,
            libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        )
    }?;
    Ok(u64::try_from(r).unwrap_or(0))
}

/// Enables manual dirty-log re-protection on a VM (`KVM_ENABLE_CAP` of
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), with `KVM_DIRTY_LOG_INITIALLY_SET` when
/// `initially_set` is asked and KVM supports it. Enable it before creating the memory slots
/// (initially-set applies to slots created after). From then on `KVM_GET_DIRTY_LOG`
/// (kvm-ioctls' `VmFd::get_dirty_log`) no longer clears the log: clear what you send with
/// [`KvmSlots::clear_dirty_log`] (or [`clear_dirty_log`]).
///
/// Fails with the OS error where KVM lacks the capability (`ENOTSUP` when
/// [`manual_protect_support`] reports 0).
pub fn enable_manual_protect(vm: &impl AsRawFd, initially_set: bool) -> io::Result<ManualProtect> {
    let supported = manual_protect_support(vm)?;
    if supported & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
        return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
    }
    let initially_set = initially_set && supported & u64::from(KVM_DIRTY_LOG_INITIALLY_SET) != 0;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    if initially_set {
        cap.args[0] |= u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
    }
    // SAFETY: KVM_ENABLE_CAP reads one `kvm_enable_cap`, which lives for the call.
    unsafe { ioctl(vm, KVM_ENABLE_CAP, &cap as *const _ as libc::c_ulong) }?;
    Ok(ManualProtect { initially_set })
}

/// `KVM_CLEAR_DIRTY_LOG`: clears, in `slot`'s log, the bits of `bitmap` for pages
/// `first_page .. first_page + pages` (bit `i % 64` of word `i / 64` is page
/// `first_page + i`) and write-protects those pages again, so the next write to them is
/// logged. Needs manual re-protection ([`enable_manual_protect`]). KVM's rules, checked here
/// before the call: `first_page` a multiple of 64, `pages` a multiple of 64 unless the range
/// reaches the slot's end, and `bitmap` exactly `pages.div_ceil(64)` words.
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    let words = (pages as usize).div_ceil(64);
    if first_page % 64 != 0 || pages == 0 || bitmap.len() != words {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut c = kvm_clear_dirty_log {
        slot,
        num_pages: pages,
        first_page,
        ..Default::default()
    };
    // KVM only reads the bitmap; the field is `*mut` in the C struct.
    c.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr().cast_mut().cast();
    // SAFETY: KVM_CLEAR_DIRTY_LOG reads one `kvm_clear_dirty_log` (living for the call) and
    // `ALIGN(pages, 64) / 8` bytes of bitmap through its pointer: exactly `bitmap`, checked
    // above; it does not write the bitmap.
    unsafe { ioctl(vm, KVM_CLEAR_DIRTY_LOG, &c as *const _ as libc::c_ulong) }?;
    Ok(())
}
