//! pagehint's transport for another program, by `LD_PRELOAD`: every TCP socket the program
//! connects or accepts gets the two socket options pagehint's background channel uses on a
//! real link.
//!
//! * `PAGEHINT_PACE_BPS` (bits/s): `SO_MAX_PACING_RATE` (bytes/s in the kernel), so TCP sends
//!   the program's bytes evenly at that rate instead of in bursts that fill the interface
//!   queue;
//! * `PAGEHINT_NOTSENT_LOWAT` (bytes): `TCP_NOTSENT_LOWAT`, so at most that many bytes wait
//!   unsent in the socket;
//! * `PAGEHINT_PRELOAD_LOG` (a file): one line appended per socket configured
//!   (`pid fd call pace=B/s lowat=B`), so that whoever runs the program can check that the
//!   options were set, not assume it.
//!
//! `compare-qemu` runs QEMU's source and destination with it ("QEMU with pagehint's
//! transport"). It wraps `connect`, `accept` and `accept4`: each calls the next definition
//! (`dlsym(RTLD_NEXT, ...)`, libc's), and on success — for `connect` also when a non-blocking
//! connect is under way (`EINPROGRESS`) — sets the options on a TCP socket (`SO_DOMAIN`
//! `AF_INET`/`AF_INET6`, `SO_PROTOCOL` `IPPROTO_TCP`); other sockets (QMP's UNIX socket) are
//! left alone. `errno` is what the wrapped call left. A variable that is unset, empty or not
//! a number sets nothing; a failed `setsockopt` is logged, and the call's result is unchanged.
//! It builds against the system's libc and works under a newer one too (it is loaded by
//! QEMU 11.1's own `ld.so` from trixie in its private prefix as well as by the system's).

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

use libc::{sockaddr, socklen_t};

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type AcceptFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;

/// The next definition of `name` (a NUL-terminated symbol name), looked up once.
fn next(cell: &OnceLock<usize>, name: &'static [u8]) -> usize {
    *cell.get_or_init(|| {
        // SAFETY: `name` is NUL-terminated; RTLD_NEXT looks the symbol up in the objects
        // loaded after this one (libc), which is what a preload wrapper must call.
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) as usize }
    })
}

/// The value of environment variable `name` (NUL-terminated) as a number, if set.
fn env_u64(name: &'static [u8]) -> Option<u64> {
    // SAFETY: `name` is NUL-terminated; getenv returns null or a NUL-terminated string that
    // stays valid while the environment is not changed (QEMU does not change it).
    let p = unsafe { libc::getenv(name.as_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated (above).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().ok()?.trim().parse().ok().filter(|&v| v > 0)
}

fn getsockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: a pointer to a live c_int and its exact length; the kernel writes at most that.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn setsockopt_u32(fd: c_int, level: c_int, name: c_int, v: u32) -> bool {
    // SAFETY: a pointer to a live u32 with its exact length; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const u32).cast(),
            std::mem::size_of::<u32>() as socklen_t,
        )
    };
    r == 0
}

fn is_tcp(fd: c_int) -> bool {
    let domain = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN);
    let proto = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL);
    matches!(domain, Some(libc::AF_INET | libc::AF_INET6)) && proto == Some(libc::IPPROTO_TCP)
}

/// Appends `line` to `PAGEHINT_PRELOAD_LOG`, if set (one `write` with `O_APPEND`, so lines of
/// concurrent callers do not interleave).
fn log(line: &str) {
    let name = b"PAGEHINT_PRELOAD_LOG\0";
    // SAFETY: as in `env_u64`.
    let path = unsafe { libc::getenv(name.as_ptr().cast::<c_char>()) };
    if path.is_null() {
        return;
    }
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            path,
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return;
    }
    // SAFETY: the buffer is live for its length; fd is ours.
    unsafe {
        libc::write(fd, line.as_ptr().cast(), line.len());
        libc::close(fd);
    }
}

/// Sets the options on `fd` if it is a TCP socket. Keeps `errno`.
fn configure(fd: c_int, call: &str) {
    // SAFETY: errno is thread-local; reading it has no other effect.
    let saved = unsafe { *libc::__errno_location() };
    let pace =
        env_u64(b"PAGEHINT_PACE_BPS\0").map(|bps| u32::try_from(bps / 8).unwrap_or(u32::MAX));
    let lowat = env_u64(b"PAGEHINT_NOTSENT_LOWAT\0").map(|b| u32::try_from(b).unwrap_or(u32::MAX));
    if (pace.is_some() || lowat.is_some()) && is_tcp(fd) {
        let mut line = format!("{} {fd} {call}", std::process::id());
        if let Some(p) = pace {
            let ok = setsockopt_u32(fd, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, p);
            line += &format!(" pace={p}{}", if ok { "" } else { "(failed)" });
        }
        if let Some(l) = lowat {
            let ok = setsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, l);
            line += &format!(" lowat={l}{}", if ok { "" } else { "(failed)" });
        }
        line.push('\n');
        log(&line);
    }
    // SAFETY: as above; restores what the wrapped call left.
    unsafe { *libc::__errno_location() = saved };
}

static CONNECT: OnceLock<usize> = OnceLock::new();
static ACCEPT: OnceLock<usize> = OnceLock::new();
static ACCEPT4: OnceLock<usize> = OnceLock::new();

/// `connect(2)`, then pagehint's transport on a TCP socket (see the crate docs).
///
/// # Safety
/// As `connect(2)`: `addr` points to `len` readable bytes of a socket address.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let f = next(&CONNECT, b"connect\0");
    if f == 0 {
        // SAFETY: errno is thread-local.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: libc's connect, with the caller's arguments.
    let r = unsafe { std::mem::transmute::<usize, ConnectFn>(f)(fd, addr, len) };
    // SAFETY: errno is thread-local.
    if r == 0 || unsafe { *libc::__errno_location() } == libc::EINPROGRESS {
        configure(fd, "connect");
    }
    r
}

/// `accept(2)`, then pagehint's transport on the accepted TCP socket.
///
/// # Safety
/// As `accept(2)`: `addr` is null or points to `*len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let f = next(&ACCEPT, b"accept\0");
    if f == 0 {
        // SAFETY: errno is thread-local.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: libc's accept, with the caller's arguments.
    let r = unsafe { std::mem::transmute::<usize, AcceptFn>(f)(fd, addr, len) };
    if r >= 0 {
        configure(r, "accept");
    }
    r
}

/// `accept4(2)`, then pagehint's transport on the accepted TCP socket.
///
/// # Safety
/// As `accept4(2)`: `addr` is null or points to `*len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let f = next(&ACCEPT4, b"accept4\0");
    if f == 0 {
        // SAFETY: errno is thread-local.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: libc's accept4, with the caller's arguments.
    let r = unsafe { std::mem::transmute::<usize, Accept4Fn>(f)(fd, addr, len, flags) };
    if r >= 0 {
        configure(r, "accept4");
    }
    r
}
