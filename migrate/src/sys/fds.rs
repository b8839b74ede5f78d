//! File descriptors and the accept queue: a listening source holds a descriptor per
//! connection that has not said hello yet, so it raises its soft limit to the hard one (as
//! Go's runtime does at start) and sizes what it lets wait by what it may hold; and it
//! deepens its accept queue, so that a burst of connections arriving while its door thread is
//! off the CPU is queued, not dropped (a dropped SYN costs the client a second).

use std::os::fd::AsRawFd;

/// The accept queue a listening source asks for (the kernel caps it at `somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Deepens the accept queue of the listening socket `l` to `backlog` (`listen(2)` again).
pub fn set_backlog(l: &std::net::TcpListener, backlog: i32) -> Result<(), std::io::Error> {
    // SAFETY: a valid listening socket descriptor, borrowed for the call.
    if unsafe { libc::listen(l.as_raw_fd(), backlog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit; returns the soft limit now
/// in force (an error leaves it as it was, and says so).
pub fn raise_limit() -> Result<u64, std::io::Error> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a pointer to a live rlimit the kernel fills.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: a valid resource and a pointer to a live rlimit the kernel reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        r = want;
    }
    Ok(r.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_takes_a_deeper_queue() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_backlog(&l, BACKLOG).unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(l.accept().unwrap().1, c.local_addr().unwrap());
        let not = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // SAFETY: a valid descriptor; listen on a UDP socket fails, and changes nothing.
        assert_ne!(unsafe { libc::listen(not.as_raw_fd(), 8) }, 0);
    }

    #[test]
    fn the_soft_limit_rises_to_the_hard_one() {
        let n = raise_limit().unwrap();
        assert!(n >= 64, "{n}");
        assert_eq!(raise_limit().unwrap(), n, "idempotent");
    }
}
