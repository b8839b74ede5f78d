//! userfaultfd(2) in missing mode: the kernel mechanism QEMU's postcopy destination uses.
//!
//! Protocol: guest memory is registered in `UFFDIO_REGISTER_MODE_MISSING`; a thread that
//! touches a page not yet placed blocks in the kernel and a fault event (the address) is
//! queued on the descriptor; the fault thread reads it and asks the source for the page; a
//! receiver places the page with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`), which maps it
//! atomically and wakes the blocked thread. Placing a page that is already present fails with
//! `EEXIST`: in postcopy that means a page was sent twice, and it is reported as such.
//!
//! The syscall comes from `rustix`; the handful of ioctl structures and numbers are defined
//! here from `<linux/userfaultfd.h>` (stable kernel ABI, size-checked below), so nothing needs
//! libclang or a C toolchain.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::ioctl::{self, opcode, Ioctl, IoctlOutput, Opcode, Updater};
use rustix::mm::{userfaultfd, UserfaultfdFlags};

const UFFDIO: u8 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_USER_MODE_ONLY: u32 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: an 8-byte header and a 24-byte union; for a page fault the union is
/// `{flags: u64, address: u64, ptid: u32}`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = {
    assert!(std::mem::size_of::<UffdioApi>() == 24);
    assert!(std::mem::size_of::<UffdioRange>() == 16);
    assert!(std::mem::size_of::<UffdioRegister>() == 32);
    assert!(std::mem::size_of::<UffdioCopy>() == 40);
    assert!(std::mem::size_of::<UffdioZeropage>() == 32);
    assert!(std::mem::size_of::<UffdMsg>() == 32);
};

const UFFDIO_API_OP: Opcode = opcode::read_write::<UffdioApi>(UFFDIO, 0x3F);
const UFFDIO_REGISTER_OP: Opcode = opcode::read_write::<UffdioRegister>(UFFDIO, 0x00);
const UFFDIO_UNREGISTER_OP: Opcode = opcode::read::<UffdioRange>(UFFDIO, 0x01);
const UFFDIO_COPY_OP: Opcode = opcode::read_write::<UffdioCopy>(UFFDIO, 0x03);
const UFFDIO_ZEROPAGE_OP: Opcode = opcode::read_write::<UffdioZeropage>(UFFDIO, 0x04);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: Opcode = opcode::none(UFFDIO, 0x00);

/// `ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW, flags)`: returns a new descriptor.
struct NewUffd(u32);

// SAFETY: the opcode takes an integer argument and returns a new file descriptor.
unsafe impl Ioctl for NewUffd {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        USERFAULTFD_IOC_NEW
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.0 as usize as *mut std::ffi::c_void
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<OwnedFd> {
        // SAFETY: on success the ioctl returns a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(out) })
    }
}

/// Why a page could not be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceError {
    /// `EEXIST`: a page of the range was already present, i.e. it was placed twice.
    AlreadyPlaced {
        /// Guest address of the range.
        addr: u64,
    },
    /// Any other failure of the ioctl.
    Os(Errno),
}

impl fmt::Display for PlaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyPlaced { addr } => {
                write!(f, "page at {addr:#x} placed twice (UFFDIO_COPY: EEXIST)")
            }
            Self::Os(e) => write!(f, "placing a page failed: {e}"),
        }
    }
}

impl std::error::Error for PlaceError {}

/// A userfaultfd descriptor with one registered range.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    how: &'static str,
}

impl Userfault {
    /// Opens a userfaultfd: the syscall, then the syscall in user-mode-only mode (allowed to
    /// unprivileged users), then `/dev/userfaultfd`. The error of the first attempt is
    /// returned if all fail.
    pub fn open() -> io::Result<Self> {
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: the descriptor gives access to faults of this process only.
        let first = match unsafe { userfaultfd(flags) } {
            Ok(fd) => return Self::handshake(fd, "userfaultfd(2)"),
            Err(e) => e,
        };
        let user_only = flags | UserfaultfdFlags::from_bits_retain(UFFD_USER_MODE_ONLY);
        // SAFETY: as above; user-mode-only faults suffice, the guest is a user thread.
        if let Ok(fd) = unsafe { userfaultfd(user_only) } {
            return Self::handshake(fd, "userfaultfd(2), user-mode only");
        }
        if let Ok(dev) = std::fs::File::open("/dev/userfaultfd") {
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
            if let Ok(fd) = unsafe { ioctl::ioctl(&dev, NewUffd(flags.bits())) } {
                return Self::handshake(fd, "/dev/userfaultfd");
            }
        }
        Err(first.into())
    }

    fn handshake(fd: OwnedFd, how: &'static str) -> io::Result<Self> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
        unsafe { ioctl::ioctl(&fd, Updater::<UFFDIO_API_OP, _>::new(&mut api)) }?;
        Ok(Self { fd, how })
    }

    /// How the descriptor was obtained.
    pub fn how(&self) -> &'static str {
        self.how
    }

    /// Registers `[start, start + len)` in missing mode.
    ///
    /// # Safety
    /// The range must be a private anonymous mapping that stays mapped while registered.
    pub unsafe fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        unsafe { ioctl::ioctl(&self.fd, Updater::<UFFDIO_REGISTER_OP, _>::new(&mut reg)) }?;
        Ok(())
    }

    /// Unregisters the range, which wakes every thread blocked on it (their faults are then
    /// resolved by the kernel as ordinary anonymous faults). Used to abort a run.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe {
            ioctl::ioctl(
                &self.fd,
                Updater::<UFFDIO_UNREGISTER_OP, _>::new(&mut range),
            )
        }?;
        Ok(())
    }

    /// Places `src` at guest address `dst` atomically and wakes threads waiting on it.
    ///
    /// # Safety
    /// `[dst, dst + src.len())` must lie in the registered range.
    pub unsafe fn copy(&self, dst: u64, src: &[u8]) -> Result<(), PlaceError> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; `src` is readable for `len`.
            let r = unsafe { ioctl::ioctl(&self.fd, Updater::<UFFDIO_COPY_OP, _>::new(&mut c)) };
            match r {
                Ok(()) => done += c.copy.max(0) as u64,
                // A partial copy (e.g. interrupted): continue after the copied part.
                Err(Errno::AGAIN) if c.copy > 0 => done += c.copy as u64,
                Err(Errno::AGAIN) => {}
                Err(Errno::EXIST) => return Err(PlaceError::AlreadyPlaced { addr: dst + done }),
                Err(e) => return Err(PlaceError::Os(e)),
            }
        }
        Ok(())
    }

    /// Maps zero pages at `[dst, dst + len)` and wakes threads waiting on them.
    ///
    /// # Safety
    /// The range must lie in the registered range.
    pub unsafe fn zero(&self, dst: u64, len: u64) -> Result<(), PlaceError> {
        let mut done = 0u64;
        while done < len {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: dst + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`.
            let r =
                unsafe { ioctl::ioctl(&self.fd, Updater::<UFFDIO_ZEROPAGE_OP, _>::new(&mut z)) };
            match r {
                Ok(()) => done += z.zeropage.max(0) as u64,
                Err(Errno::AGAIN) if z.zeropage > 0 => done += z.zeropage as u64,
                Err(Errno::AGAIN) => {}
                Err(Errno::EXIST) => return Err(PlaceError::AlreadyPlaced { addr: dst + done }),
                Err(e) => return Err(PlaceError::Os(e)),
            }
        }
        Ok(())
    }

    /// Waits up to `timeout_ns` for fault events; true if some may be ready.
    pub fn wait(&self, timeout_ns: u64) -> io::Result<bool> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match poll(&mut fds, Some(&crate::clock::timespec(timeout_ns))) {
            Ok(n) => Ok(n > 0),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the pending events and appends the addresses of page faults to `out`.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> io::Result<()> {
        let mut msgs = [UffdMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: [0; 3],
        }; 64];
        loop {
            // SAFETY: `UffdMsg` is plain old data; the kernel writes whole messages.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(
                    msgs.as_mut_ptr().cast::<u8>(),
                    std::mem::size_of_val(&msgs),
                )
            };
            match rustix::io::read(&self.fd, buf) {
                Ok(n) => {
                    let count = n / std::mem::size_of::<UffdMsg>();
                    for m in &msgs[..count] {
                        if m.event == UFFD_EVENT_PAGEFAULT {
                            out.push(m.arg[1]);
                        }
                    }
                    if count < msgs.len() {
                        return Ok(());
                    }
                }
                Err(Errno::AGAIN) | Err(Errno::INTR) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
