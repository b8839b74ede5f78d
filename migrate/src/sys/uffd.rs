//! userfaultfd(2) in missing mode: the kernel mechanism QEMU's postcopy destination uses.
//!
//! Protocol: guest memory is registered in `UFFDIO_REGISTER_MODE_MISSING`; a thread (a KVM
//! vCPU thread inside `KVM_RUN`, or the thread guest) that touches a page not yet placed
//! blocks in the kernel, and a fault event — the address, whether it was a write, and the
//! faulting thread's id (`UFFD_FEATURE_THREAD_ID`, which per-vCPU blocktime needs) — is
//! queued on the descriptor. The fault thread reads it and asks the source for the page; a
//! receiver places the page with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`), which maps it
//! atomically and wakes the blocked thread. Placing a page that is already present fails
//! with `EEXIST`: in postcopy that means a page was sent twice, and it is reported as such.
//!
//! Structures, constants and ioctl numbers come from `linux-raw-sys` (which `rustix` already
//! builds on); only `USERFAULTFD_IOC_NEW` is defined here. hugetlbfs has no
//! `UFFDIO_ZEROPAGE`: a zero huge page is placed with `UFFDIO_COPY` of zeros.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_copy, uffdio_range, uffdio_register, uffdio_zeropage,
    UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EXACT_ADDRESS, UFFD_FEATURE_MISSING_HUGETLBFS,
    UFFD_FEATURE_THREAD_ID, UFFD_PAGEFAULT_FLAG_WRITE, UFFD_USER_MODE_ONLY,
};
use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::ioctl::{self, opcode, Ioctl, IoctlOutput, Opcode, Updater};
use rustix::mm::{userfaultfd, UserfaultfdFlags};

/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (not in linux-raw-sys).
const USERFAULTFD_IOC_NEW: Opcode = opcode::none(0xAA, 0x00);
const API: Opcode = UFFDIO_API as Opcode;
const REGISTER: Opcode = UFFDIO_REGISTER as Opcode;
const UNREGISTER: Opcode = UFFDIO_UNREGISTER as Opcode;
const COPY: Opcode = UFFDIO_COPY as Opcode;
const ZEROPAGE: Opcode = UFFDIO_ZEROPAGE as Opcode;
const WAKE: Opcode = UFFDIO_WAKE as Opcode;

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
        /// Address of the page found present.
        addr: u64,
    },
    /// `EAGAIN` before anything was placed, from [`Userfault::try_copy`] /
    /// [`Userfault::try_zero`]: the address space is changing (an event such as
    /// `UFFD_EVENT_REMOVE` is queued and not yet read). Read the events, then retry.
    Retry,
    /// `ESRCH`: the address space the range was registered in is gone (the process that
    /// registered it has exited, or is exiting): nothing will fault there again.
    Gone,
    /// Any other failure of the ioctl.
    Os(Errno),
}

impl fmt::Display for PlaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyPlaced { addr } => {
                write!(f, "page at {addr:#x} placed twice (UFFDIO_COPY: EEXIST)")
            }
            Self::Retry => write!(f, "placing a page must wait: an event is pending (EAGAIN)"),
            Self::Gone => write!(
                f,
                "the registering process's address space is gone (UFFDIO_COPY: ESRCH)"
            ),
            Self::Os(e) => write!(f, "placing a page failed: {e}"),
        }
    }
}

impl std::error::Error for PlaceError {}

/// Why a received descriptor is refused ([`Userfault::from_received`]).
#[derive(Debug)]
pub enum ReceivedError {
    /// Not a userfaultfd: what its `/proc/self/fd` link reads instead.
    NotUserfaultfd {
        /// The link, e.g. `/dev/null` or `pipe:[1234]`.
        link: String,
    },
    /// A userfaultfd without `O_NONBLOCK`.
    Blocking,
    /// Its link or flags could not be read.
    Io(io::Error),
}

impl fmt::Display for ReceivedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUserfaultfd { link } => write!(
                f,
                "the descriptor received is not a userfaultfd (it is {link}; a userfaultfd is \
                 anon_inode:[userfaultfd])"
            ),
            Self::Blocking => write!(
                f,
                "the userfaultfd received is in blocking mode: open it with O_NONBLOCK \
                 (UFFD_NONBLOCK), as Firecracker does"
            ),
            Self::Io(e) => write!(f, "inspecting the descriptor received: {e}"),
        }
    }
}

impl std::error::Error for ReceivedError {}

/// One page fault read from the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address.
    pub addr: u64,
    /// A write fault.
    pub write: bool,
    /// The faulting thread's id (0 without `UFFD_FEATURE_THREAD_ID`).
    pub tid: u32,
}

/// One event read from the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdEvent {
    /// A page fault.
    Fault(Fault),
    /// `UFFD_EVENT_REMOVE`: `madvise(MADV_DONTNEED / MADV_REMOVE)` dropped `[start, end)`
    /// (Firecracker's balloon); the range stays registered and faults again, on zeros.
    Remove {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// Any other event (fork, remap, unmap: not enabled by a Firecracker-style VMM).
    Other(u8),
}

/// Where a userfaultfd descriptor came from, which decides whose faults it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `userfaultfd(2)`: every fault, the kernel's (KVM's) included.
    Syscall,
    /// `/dev/userfaultfd`: every fault, the kernel's included.
    Device,
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY` (what an unprivileged user may open):
    /// faults of user-mode code only, not KVM's, whose vCPUs fault in the kernel.
    UserModeOnly,
    /// Received from another process (a VMM), which opened it.
    Received,
}

impl Origin {
    /// In words (part of the fault path the results report).
    pub fn describe(self) -> &'static str {
        match self {
            Self::Syscall => "userfaultfd(2)",
            Self::Device => "/dev/userfaultfd",
            Self::UserModeOnly => "userfaultfd(2), user-mode only",
            Self::Received => "received from the VMM",
        }
    }

    /// Whether faults taken in the kernel (a KVM vCPU's) reach this descriptor.
    pub fn sees_kernel_faults(self) -> bool {
        match self {
            Self::Syscall | Self::Device | Self::Received => true,
            Self::UserModeOnly => false,
        }
    }
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    origin: Origin,
}

impl Userfault {
    /// Opens a userfaultfd: the syscall, then the syscall in user-mode-only mode (allowed to
    /// unprivileged users; not enough for KVM, whose faults happen in the kernel), then
    /// `/dev/userfaultfd`. Asks for thread ids and hugetlbfs where the kernel has them. The
    /// error of the first attempt is returned if all fail.
    pub fn open() -> io::Result<Self> {
        Self::open_with(0)
    }

    /// As [`open`](Self::open), also asking for `UFFD_FEATURE_EVENT_REMOVE` (what Firecracker
    /// requires of its descriptor: the balloon's `madvise` then reports removed ranges).
    pub fn open_with_remove_events() -> io::Result<Self> {
        Self::open_with(u64::from(UFFD_FEATURE_EVENT_REMOVE))
    }

    /// A descriptor received from another process (a VMM), which has already done the
    /// `UFFDIO_API` handshake and registered its memory. Its features are unknown here:
    /// faults carry a thread id only if the VMM asked for one (0 otherwise).
    ///
    /// Checked first, so that a wrong descriptor is refused at once rather than polled
    /// forever: it must be a userfaultfd (its `/proc/self/fd` link reads
    /// `anon_inode:[userfaultfd]`; a second `UFFDIO_API` cannot tell, since the VMM's first
    /// one already answered it) in non-blocking mode (`poll(2)` on a blocking userfaultfd
    /// reports only `POLLERR`).
    pub fn from_received(fd: OwnedFd) -> Result<Self, ReceivedError> {
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(ReceivedError::Io)?;
        let link = link.to_string_lossy().into_owned();
        if link != "anon_inode:[userfaultfd]" {
            return Err(ReceivedError::NotUserfaultfd { link });
        }
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| ReceivedError::Io(e.into()))?;
        if !flags.contains(rustix::fs::OFlags::NONBLOCK) {
            return Err(ReceivedError::Blocking);
        }
        Ok(Self {
            fd,
            origin: Origin::Received,
        })
    }

    fn open_with(extra: u64) -> io::Result<Self> {
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: the descriptor gives access to faults of this process only.
        let first = match unsafe { userfaultfd(flags) } {
            Ok(fd) => return Self::handshake(fd, Origin::Syscall, extra),
            Err(e) => e,
        };
        if let Ok(dev) = std::fs::File::open("/dev/userfaultfd") {
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
            if let Ok(fd) = unsafe { ioctl::ioctl(&dev, NewUffd(flags.bits())) } {
                return Self::handshake(fd, Origin::Device, extra);
            }
        }
        let user_only = flags | UserfaultfdFlags::from_bits_retain(UFFD_USER_MODE_ONLY);
        // SAFETY: as above; user-mode-only faults suffice for the thread guest.
        if let Ok(fd) = unsafe { userfaultfd(user_only) } {
            return Self::handshake(fd, Origin::UserModeOnly, extra);
        }
        Err(first.into())
    }

    fn handshake(fd: OwnedFd, origin: Origin, extra: u64) -> io::Result<Self> {
        let wanted = extra
            | u64::from(
                UFFD_FEATURE_THREAD_ID
                    | UFFD_FEATURE_MISSING_HUGETLBFS
                    | UFFD_FEATURE_EXACT_ADDRESS,
            );
        // Ask for the features; a kernel without some refuses the API call, so fall back to
        // none on a fresh descriptor's worth of state (the API call may be repeated only if
        // it failed).
        for features in [wanted, extra | u64::from(UFFD_FEATURE_THREAD_ID), extra] {
            let mut api = uffdio_api {
                api: u64::from(UFFD_API),
                features,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
            if unsafe { ioctl::ioctl(&fd, Updater::<API, _>::new(&mut api)) }.is_ok() {
                return Ok(Self { fd, origin });
            }
        }
        Err(io::Error::other("UFFDIO_API refused every feature set"))
    }

    /// Where the descriptor came from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Registers `[start, start + len)` in missing mode.
    ///
    /// # Safety
    /// The range must be a private anonymous (or hugetlb) mapping that stays mapped while
    /// registered.
    pub unsafe fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = uffdio_register {
            range: uffdio_range { start, len },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        unsafe { ioctl::ioctl(&self.fd, Updater::<REGISTER, _>::new(&mut reg)) }?;
        Ok(())
    }

    /// Unregisters the range, which wakes every thread blocked on it (their faults are then
    /// resolved by the kernel as ordinary faults). Used to abort a run.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { ioctl::ioctl(&self.fd, Updater::<UNREGISTER, _>::new(&mut range)) }?;
        Ok(())
    }

    /// Places `src` at `dst` atomically and wakes threads waiting on it.
    ///
    /// # Safety
    /// `[dst, dst + src.len())` must lie in the registered range.
    pub unsafe fn copy(&self, dst: u64, src: &[u8]) -> Result<(), PlaceError> {
        // SAFETY: forwarded to the caller.
        unsafe { self.copy_inner(dst, src, false) }
    }

    /// As [`copy`](Self::copy), but returns [`PlaceError::Retry`] instead of spinning when
    /// the kernel answers `EAGAIN` with nothing placed yet: a thread that also reads the
    /// events must not spin while the event that blocks it waits to be read.
    ///
    /// # Safety
    /// As [`copy`](Self::copy).
    pub unsafe fn try_copy(&self, dst: u64, src: &[u8]) -> Result<(), PlaceError> {
        // SAFETY: forwarded to the caller.
        unsafe { self.copy_inner(dst, src, true) }
    }

    unsafe fn copy_inner(&self, dst: u64, src: &[u8], give_up: bool) -> Result<(), PlaceError> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            let mut c = uffdio_copy {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; `src` is readable for `len`.
            let r = unsafe { ioctl::ioctl(&self.fd, Updater::<COPY, _>::new(&mut c)) };
            done += placed(r, c.copy, dst, done, give_up)?;
        }
        Ok(())
    }

    /// Maps zero pages at `[dst, dst + len)` and wakes threads waiting on them (not for
    /// hugetlbfs: copy zeros there).
    ///
    /// # Safety
    /// The range must lie in the registered range.
    pub unsafe fn zero(&self, dst: u64, len: u64) -> Result<(), PlaceError> {
        // SAFETY: forwarded to the caller.
        unsafe { self.zero_inner(dst, len, false) }
    }

    /// As [`zero`](Self::zero), returning [`PlaceError::Retry`] on `EAGAIN` with nothing
    /// placed (see [`try_copy`](Self::try_copy)).
    ///
    /// # Safety
    /// As [`zero`](Self::zero).
    pub unsafe fn try_zero(&self, dst: u64, len: u64) -> Result<(), PlaceError> {
        // SAFETY: forwarded to the caller.
        unsafe { self.zero_inner(dst, len, true) }
    }

    unsafe fn zero_inner(&self, dst: u64, len: u64, give_up: bool) -> Result<(), PlaceError> {
        let mut done = 0u64;
        while done < len {
            let mut z = uffdio_zeropage {
                range: uffdio_range {
                    start: dst + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`.
            let r = unsafe { ioctl::ioctl(&self.fd, Updater::<ZEROPAGE, _>::new(&mut z)) };
            done += placed(r, z.zeropage, dst, done, give_up)?;
        }
        Ok(())
    }

    /// Wakes the threads waiting on faults in `[start, start + len)` without placing
    /// anything: they retry, and fault again if the page is still missing.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`; no memory is written.
        unsafe { ioctl::ioctl(&self.fd, Updater::<WAKE, _>::new(&mut r)) }.map_err(Into::into)
    }

    /// Waits up to `timeout_ns` for fault events; true if some may be ready.
    pub fn wait(&self, timeout_ns: u64) -> io::Result<bool> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match poll(&mut fds, Some(&crate::sys::clock::timespec(timeout_ns))) {
            Ok(n) => Ok(n > 0),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the pending events and appends the page faults to `out`.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<()> {
        self.read_each(|e| {
            if let UffdEvent::Fault(f) = e {
                out.push(f);
            }
        })
    }

    /// Reads the pending events, in order, and appends them to `out`.
    pub fn read_events(&self, out: &mut Vec<UffdEvent>) -> io::Result<()> {
        self.read_each(|e| out.push(e))
    }

    /// Reads the pending events and hands each to `f`, in order.
    fn read_each(&self, mut f: impl FnMut(UffdEvent)) -> io::Result<()> {
        const N: usize = 64;
        let mut buf = [0u8; N * std::mem::size_of::<uffd_msg>()];
        loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(n) => {
                    let count = n / std::mem::size_of::<uffd_msg>();
                    for raw in buf[..n].chunks_exact(std::mem::size_of::<uffd_msg>()) {
                        // SAFETY: the kernel wrote whole `struct uffd_msg`s (plain data, any bit
                        // pattern valid); read unaligned from the byte buffer.
                        let m: uffd_msg = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
                        let kind = u32::from(m.event);
                        f(if kind == UFFD_EVENT_PAGEFAULT {
                            // SAFETY: the `pagefault` member is the one a PAGEFAULT event fills.
                            let pf = unsafe { m.arg.pagefault };
                            UffdEvent::Fault(Fault {
                                addr: pf.address,
                                write: pf.flags & u64::from(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                                // SAFETY: `ptid` is the union's only member.
                                tid: unsafe { pf.feat.ptid },
                            })
                        } else if kind == UFFD_EVENT_REMOVE {
                            // SAFETY: the `remove` member is the one a REMOVE event fills.
                            let r = unsafe { m.arg.remove };
                            UffdEvent::Remove {
                                start: r.start,
                                end: r.end,
                            }
                        } else {
                            UffdEvent::Other(m.event)
                        });
                    }
                    if count < N {
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

/// What one `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` call at `dst + done` did, from its result and
/// the bytes it reports `moved`: the bytes placed (0: call again), or why placing stops
/// (`give_up`: `EAGAIN` with nothing placed yet is [`PlaceError::Retry`]).
fn placed(
    r: Result<(), Errno>,
    moved: i64,
    dst: u64,
    done: u64,
    give_up: bool,
) -> Result<u64, PlaceError> {
    match r {
        Ok(()) => Ok(moved.max(0) as u64),
        // A partial copy (e.g. interrupted): continue after the copied part.
        Err(Errno::AGAIN) if moved > 0 => Ok(moved as u64),
        Err(Errno::AGAIN) if give_up && done == 0 => Err(PlaceError::Retry),
        Err(Errno::AGAIN) => Ok(0),
        Err(Errno::EXIST) => Err(PlaceError::AlreadyPlaced { addr: dst + done }),
        Err(Errno::SRCH) => Err(PlaceError::Gone),
        Err(e) => Err(PlaceError::Os(e)),
    }
}
