//! `pagehint-uffd`: Firecracker's handshake refused cleanly when it is wrong, removed ranges
//! served as zeros (from the memory file, and from a remote source over TCP), a fault on a
//! page the prefetcher owns timed until that copy lands, and a real KVM guest restored from a
//! snapshot through the handler with every policy, its own page checks clean and every page
//! placed exactly once.

#[path = "../../tests/common/scratch.rs"]
mod scratch;
#[path = "../../tests/common/within.rs"]
mod within;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use pagehint_migrate::guest::kvm::ready_or_skip;
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::sys::clock::now_ns;
use pagehint_migrate::sys::uffd::Userfault;
use pagehint_migrate::Workload;
use pagehint_uffd::compare::{restore_once, Trial};
use pagehint_uffd::handler::{
    handle_connection, Control, EndReason, HandlerError, HandlerOptions, HandlerReport, Policy,
};
use pagehint_uffd::protocol::{send_raw, GuestRegionUffdMapping, HandshakeFormat, ProtocolError};
use pagehint_uffd::remote::{serve_memory, RemoteSource};
use pagehint_uffd::source::{FileSource, PageSource};
use pagehint_uffd::vmm::take_snapshot;
use scratch::Scratch;
use within::within;

fn tmp(name: &str) -> Scratch {
    Scratch::new("pagehint-restore", name)
}

/// The file stays open after its folder is removed.
fn mem_file(name: &str, bytes: &[u8]) -> FileSource {
    let dir = tmp(name);
    let p = dir.join("mem");
    std::fs::write(&p, bytes).unwrap();
    FileSource::open(&p).unwrap()
}

/// Runs the handler on one end of a socket pair; `vmm` plays the VMM on the other.
fn handle(
    name: &str,
    opts: HandlerOptions,
    vmm: impl FnOnce(UnixStream) + Send + 'static,
) -> Result<HandlerReport, HandlerError> {
    let src = mem_file(name, &[7u8; 8192]);
    within(Duration::from_secs(10), move || {
        let (h, v) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || vmm(v));
        let r = handle_connection(&h, &src, &opts, &Control::default());
        t.join().unwrap();
        r
    })
}

fn short() -> HandlerOptions {
    HandlerOptions {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    }
}

#[test]
fn a_malformed_handshake_is_a_clear_error_never_a_hang() {
    let fd_of = || std::fs::File::open("/dev/null").unwrap();
    // Malformed JSON, with a descriptor.
    let r = handle("json", short(), move |v| {
        let f = fd_of();
        send_raw(&v, b"[{\"base_host_virt_addr\": oops", Some(f.as_fd())).unwrap();
        drop(v);
    });
    assert!(
        matches!(r, Err(HandlerError::Protocol(ProtocolError::Json(_)))),
        "{r:?}"
    );
    // Valid JSON, no descriptor.
    let r = handle("nofd", short(), |v| {
        let m = [GuestRegionUffdMapping::new(1 << 30, 8192, 0, 4096)];
        send_raw(&v, &serde_json::to_vec(&m).unwrap(), None).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    });
    assert!(
        matches!(
            r,
            Err(HandlerError::Protocol(ProtocolError::MissingDescriptor))
        ),
        "{r:?}"
    );
    // Closed before sending.
    let r = handle("closed", short(), drop);
    assert!(
        matches!(r, Err(HandlerError::Protocol(ProtocolError::Closed))),
        "{r:?}"
    );
    // Connected, silent: a timeout, not a hang.
    let r = handle("silent", short(), |v| {
        std::thread::sleep(Duration::from_millis(600));
        drop(v);
    });
    assert!(
        matches!(r, Err(HandlerError::Protocol(ProtocolError::Timeout(_)))),
        "{r:?}"
    );
    // Half a message, then closed.
    let r = handle("half", short(), move |mut v| {
        let f = fd_of();
        send_raw(&v, b"[{\"base_host_virt_addr\": 4096,", Some(f.as_fd())).unwrap();
        let _ = v.flush();
        drop(v);
    });
    assert!(
        matches!(r, Err(HandlerError::Protocol(ProtocolError::Json(_)))),
        "{r:?}"
    );
    // Regions past the memory file.
    let r = handle("past", short(), move |v| {
        let f = fd_of();
        let m = [GuestRegionUffdMapping::new(1 << 30, 1 << 20, 0, 4096)];
        send_raw(&v, &serde_json::to_vec(&m).unwrap(), Some(f.as_fd())).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    });
    assert!(
        matches!(r, Err(HandlerError::Protocol(ProtocolError::Invalid(_)))),
        "{r:?}"
    );
}

/// Opens a userfaultfd with remove events, or says why the test is skipped (and fails
/// instead when `PAGEHINT_REQUIRE_KVM` is set).
fn uffd_or_skip(test: &str) -> bool {
    match Userfault::open_with_remove_events() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("PAGEHINT_REQUIRE_KVM").is_none(),
                "{test}: userfaultfd does not open: {e}"
            );
            eprintln!("SKIPPED {test}: userfaultfd does not open: {e}");
            false
        }
    }
}

const PAGES: usize = 256;

/// Every Firecracker handshake that sends a page size is served: v1.7–v1.11 close the
/// socket right after the message, and the handler serves on (it stops watching the socket:
/// an idle wait costs a poll every 50 ms, never a busy loop); v1.12+ keep it, and its end
/// ends the session.
#[test]
fn every_firecracker_handshake_is_served_whether_the_socket_closes_or_not() {
    if !uffd_or_skip("every_firecracker_handshake_is_served_whether_the_socket_closes_or_not") {
        return;
    }
    let src = mem_file("formats", &contents());
    let runs = within(Duration::from_secs(60), move || {
        let mut runs = Vec::new();
        for format in [HandshakeFormat::PageSizeKib, HandshakeFormat::PageSizeBoth] {
            for policy in [Policy::OnDemand, Policy::Pagehint] {
                let Vmm { base, h, v, _uffd } = Vmm::with(format);
                let base = base as usize;
                // v1.7-v1.11: the socket is closed as soon as the message is sent.
                let mut v = Some(v);
                if !format.keeps_socket() {
                    v = None;
                }
                let opts = HandlerOptions {
                    policy,
                    ..Default::default()
                };
                let control = Control::default();
                let r = std::thread::scope(|s| {
                    let t = s.spawn(|| handle_connection(&h, &src, &opts, &control));
                    // Idle a while after the close.
                    std::thread::sleep(Duration::from_millis(300));
                    for p in 0..PAGES {
                        // SAFETY: inside the mapping; faults are served by the handler.
                        let b =
                            unsafe { std::ptr::read_volatile((base as *const u8).add(p * 4096)) };
                        assert_eq!(b, file_byte(p), "{format:?} {policy}: page {p}");
                    }
                    match v.take() {
                        Some(v) => drop(v), // the VMM exits: the session ends
                        None => control
                            .stop
                            .store(true, std::sync::atomic::Ordering::Relaxed),
                    }
                    t.join().unwrap().unwrap()
                });
                // SAFETY: the handler is done with it.
                unsafe { libc::munmap(base as *mut libc::c_void, Vmm::LEN) };
                runs.push((format, policy, r));
            }
        }
        runs
    });
    for (format, policy, report) in runs {
        {
            let what = format!("{format:?} {policy}: {report:?}");
            assert_eq!(report.handshake, Some(format), "{what}");
            assert_eq!(report.eexist, 0, "{what}");
            assert!(report.faults > 0 || policy != Policy::OnDemand, "{what}");
            if format.keeps_socket() {
                assert_eq!(report.ended_by, Some(EndReason::SocketClosed), "{what}");
                assert_eq!(report.socket_closed_ns, None, "{what}");
            } else {
                assert_eq!(report.ended_by, Some(EndReason::Stopped), "{what}");
                assert!(report.socket_closed_ns.is_some(), "{what}");
            }
            // At most one wake-up per fault, plus one per 50 ms of idling (the 300 ms idle
            // and the page reads), with a wide margin: a busy loop would count thousands.
            assert!(report.polls <= report.faults + 60, "{what}");
        }
    }
}

/// A source that fails on one page.
struct FailingSource {
    file: FileSource,
    bad_offset: u64,
}

impl PageSource for FailingSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset == self.bad_offset {
            return Err(std::io::Error::other("disk on fire"));
        }
        self.file.read_at(offset, buf)
    }
    fn size(&self) -> Option<u64> {
        self.file.size()
    }
}

/// A page the prefetcher cannot read fails the session, at once, with that error (it used
/// to be a note in the report while the session went on: a vCPU touching that page would
/// have waited forever).
#[test]
fn a_prefetcher_that_cannot_read_a_page_fails_the_session() {
    if !uffd_or_skip("a_prefetcher_that_cannot_read_a_page_fails_the_session") {
        return;
    }
    let src = FailingSource {
        file: mem_file("failing", &contents()),
        bad_offset: 200 * 4096,
    };
    let r = within(Duration::from_secs(30), move || {
        let Vmm { base, h, v, _uffd } = Vmm::new();
        let opts = HandlerOptions {
            policy: Policy::Linear,
            ..Default::default()
        };
        let r = handle_connection(&h, &src, &opts, &Control::default());
        drop(v);
        // SAFETY: the handler is done with it.
        unsafe { libc::munmap(base, Vmm::LEN) };
        r
    });
    match r {
        Err(HandlerError::Source { offset, error }) => {
            assert_eq!(offset, 200 * 4096);
            assert!(error.to_string().contains("disk on fire"));
        }
        other => panic!("{other:?}"),
    }
}

/// A record of another snapshot (an offset past these regions), or none, is a typed error
/// before anything is served.
#[test]
fn a_record_that_does_not_fit_the_regions_is_refused() {
    if !uffd_or_skip("a_record_that_does_not_fit_the_regions_is_refused") {
        return;
    }
    let dir = tmp("bad-record");
    let bad = dir.join("record");
    pagehint_uffd::record::write(&bad, &[0, 4096, (PAGES as u64 + 3) * 4096]).unwrap();
    let twice = dir.join("twice");
    pagehint_uffd::record::write(&twice, &[4096, 0, 4096]).unwrap();
    let src = mem_file("bad-record-mem", &contents());
    let cases = [
        (Some(bad), "entry 2"),
        (Some(twice), "recorded twice"),
        (Some(dir.join("missing")), "No such file"),
        (None, "needs a record file"),
    ];
    let results = within(Duration::from_secs(30), move || {
        cases.map(|(record, want)| {
            let Vmm { base, h, v, _uffd } = Vmm::new();
            let opts = HandlerOptions {
                policy: Policy::RecordedPagehint,
                record: record.clone(),
                ..Default::default()
            };
            let r = handle_connection(&h, &src, &opts, &Control::default());
            drop(v);
            // SAFETY: nothing was served.
            unsafe { libc::munmap(base, Vmm::LEN) };
            (record, want, r)
        })
    });
    for (record, want, r) in results {
        match r {
            Err(e @ (HandlerError::Record(_) | HandlerError::NoRecord(_))) => {
                assert!(e.to_string().contains(want), "{e}")
            }
            other => panic!("{record:?}: {other:?}"),
        }
    }
}

/// Page `p`'s byte in the memory file.
fn file_byte(p: usize) -> u8 {
    p as u8 | 1
}

/// A user-space "VMM" in this process: `PAGES` pages mapped anonymously and registered, the
/// handshake sent on `v`; the handler's end is `h`. Unmap `base` once the handler is done.
struct Vmm {
    base: *mut libc::c_void,
    h: UnixStream,
    v: UnixStream,
    _uffd: Userfault,
}

impl Vmm {
    const LEN: usize = PAGES * 4096;

    /// The handshake as Firecracker v1.12+ send it.
    fn new() -> Self {
        Self::with(HandshakeFormat::PageSizeBoth)
    }

    /// The handshake in `format`, byte for byte as those releases send it (the caller
    /// closes `v` where they do).
    fn with(format: HandshakeFormat) -> Self {
        // SAFETY: a fresh private anonymous mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let uffd = Userfault::open_with_remove_events().unwrap();
        // SAFETY: our mapping, unmapped after the handler is done.
        unsafe { uffd.register(base as u64, Self::LEN as u64) }.unwrap();
        let (h, v) = UnixStream::pair().unwrap();
        let maps = [GuestRegionUffdMapping::new(
            base as u64,
            Self::LEN as u64,
            0,
            4096,
        )];
        send_raw(&v, &format.encode(&maps), Some(uffd.as_fd())).unwrap();
        Self {
            base,
            h,
            v,
            _uffd: uffd,
        }
    }
}

/// A user-space "VMM" in this process: a registered anonymous region served by the handler
/// from `src`; pages read back with the file's contents; a range removed with
/// `MADV_DONTNEED` (what the balloon does) faults again on zeros, never on stale file data.
///
/// Policies `recorded` and `recorded+pagehint` follow the record at `record`, which policy
/// `record` writes (it comes first in [`Policy::ALL`]).
fn remove_scenario(src: &dyn PageSource, policy: Policy, record: &Path) -> HandlerReport {
    let len = Vmm::LEN;
    let Vmm { base, h, v, _uffd } = Vmm::new();
    let opts = HandlerOptions {
        policy,
        prefetchers: 2,
        record: Some(record.to_path_buf()),
        ..Default::default()
    };
    let control = Control::default();
    let report = std::thread::scope(|s| {
        let t = s.spawn(|| handle_connection(&h, src, &opts, &control));
        let at = |p: usize| {
            // SAFETY: inside the mapping; faults are served by the handler.
            unsafe { std::ptr::read_volatile((base as *const u8).add(p * 4096 + 5)) }
        };
        for p in (0..PAGES).step_by(7) {
            assert_eq!(at(p), file_byte(p), "{policy}: page {p}");
        }
        // The balloon takes pages 64..128.
        // SAFETY: our mapping.
        let r = unsafe {
            libc::madvise(
                (base as *mut u8).add(64 * 4096).cast(),
                64 * 4096,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        for p in 0..PAGES {
            let want = if (64..128).contains(&p) {
                0
            } else {
                file_byte(p)
            };
            assert_eq!(at(p), want, "{policy}: page {p} after the remove");
        }
        // As a VMM lingering for the last pages: every page in before the session ends (a
        // prefetcher may still hold claims on removed pages it has not reached yet).
        while !control.all_loaded() {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(v);
        t.join().unwrap()
    })
    .unwrap();
    assert_eq!(report.eexist, 0, "{policy}: {report:?}");
    assert_eq!(report.remove_events, 1, "{policy}");
    assert_eq!(report.zero_filled, 64, "{policy}: {report:?}");
    assert!(report.all_loaded_ns.is_some(), "{policy}: {report:?}");
    // Every page placed from the file exactly once, or removed before it was loaded.
    let from_file = report.fault_placed + report.prefetched;
    assert_eq!(
        from_file + report.removed_unloaded + report.removed_skipped,
        PAGES as u64,
        "{policy}: {report:?}"
    );
    // SAFETY: the handler is done with it.
    unsafe { libc::munmap(base, len) };
    report
}

fn contents() -> Vec<u8> {
    (0..PAGES * 4096).map(|i| file_byte(i / 4096)).collect()
}

/// The memory file, but the read of page 0 says when it starts and then waits for `release`
/// (or for its sender to be dropped).
struct HeldSource {
    file: FileSource,
    reading: mpsc::SyncSender<()>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl PageSource for HeldSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset == 0 {
            let _ = self.reading.try_send(());
            let _ = self.release.lock().unwrap().recv();
        }
        self.file.read_at(offset, buf)
    }
    fn size(&self) -> Option<u64> {
        self.file.size()
    }
}

/// A fault on a page the prefetcher owns (its copy still to come) is not served by the event
/// thread, but the vCPU waits all the same: its wait runs until the prefetcher's copy lands.
#[test]
fn a_fault_on_a_page_the_prefetcher_owns_waits_until_its_copy_lands() {
    if !uffd_or_skip("a_fault_on_a_page_the_prefetcher_owns_waits_until_its_copy_lands") {
        return;
    }
    let (reading, started) = mpsc::sync_channel(1);
    let (release, release_rx) = mpsc::channel();
    let src = HeldSource {
        file: mem_file("held", &contents()),
        reading,
        release: Mutex::new(release_rx),
    };
    let (report, released) = within(Duration::from_secs(30), move || {
        let Vmm { base, h, v, _uffd } = Vmm::new();
        let base = base as usize;
        // Linear: one prefetcher, from page 0 up.
        let opts = HandlerOptions {
            policy: Policy::Linear,
            ..Default::default()
        };
        let control = Control::default();
        let r = std::thread::scope(|s| {
            let t = s.spawn(|| handle_connection(&h, &src, &opts, &control));
            started
                .recv_timeout(Duration::from_secs(10))
                .expect("the prefetcher reads page 0 first");
            // SAFETY: inside the mapping; the fault is served by the handler.
            let vcpu = s.spawn(|| unsafe { std::ptr::read_volatile((base as *const u8).add(5)) });
            // Time for the fault to be read while the prefetcher holds page 0 (a wide margin:
            // the handler reads it within microseconds on an idle machine).
            std::thread::sleep(Duration::from_secs(1));
            let released = now_ns();
            release.send(()).unwrap();
            assert_eq!(vcpu.join().unwrap(), file_byte(0));
            while !control.all_loaded() {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(v);
            (t.join().unwrap().unwrap(), released)
        });
        // SAFETY: the handler is done with it.
        unsafe { libc::munmap(base as *mut libc::c_void, Vmm::LEN) };
        r
    });
    assert_eq!(report.eexist, 0, "{report:?}");
    assert_eq!(report.fault_placed, 0, "{report:?}");
    assert!(report.fault_already_claimed >= 1, "{report:?}");
    let on_0: Vec<_> = report.fault_records.iter().filter(|f| f.hp == 0).collect();
    assert!(!on_0.is_empty(), "{report:?}");
    assert!(
        on_0[0].read_ns < released,
        "the fault was read while the prefetcher held page 0: {on_0:?}"
    );
    for f in on_0 {
        assert!(f.placed_ns >= released, "{f:?} (released at {released})");
        assert!(
            f.blocked_ns() >= released.saturating_sub(f.read_ns),
            "{f:?} (released at {released})"
        );
    }
}

#[test]
fn removed_ranges_come_back_as_zeros_and_pages_are_placed_once() {
    if !uffd_or_skip("removed_ranges_come_back_as_zeros_and_pages_are_placed_once") {
        return;
    }
    let src = mem_file("remove", &contents());
    let record_dir = tmp("remove-record");
    let record = record_dir.join("record");
    let ordered = Policy::ALL.iter().position(|&p| p == Policy::Record)
        < Policy::ALL.iter().position(|p| p.follows_record());
    assert!(ordered, "the record is written before it is followed");
    for policy in Policy::ALL {
        let r = remove_scenario(&src, policy, &record);
        if policy.follows_record() {
            // The record holds the pages read in order (every seventh), and the balloon's
            // faults on zeros: a removed page is never filled from the file even when
            // recorded.
            assert!(r.record_pages > 0, "{policy}: {r:?}");
        }
    }
}

/// Pull-mode postcopy: the same scenario with every page fetched over TCP from a memory
/// server (the remote source), for every policy.
#[test]
fn a_remote_source_over_tcp_serves_the_handler() {
    if !uffd_or_skip("a_remote_source_over_tcp_serves_the_handler") {
        return;
    }
    let file = mem_file("remote", &contents());
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = AtomicBool::new(false);
    within(Duration::from_secs(30), move || {
        std::thread::scope(|s| {
            let server = s.spawn(|| serve_memory(&listener, &file, &stop, Duration::from_secs(5)));
            let mut fetched = 0;
            let record_dir = tmp("remote-record");
            let record = record_dir.join("record");
            for policy in Policy::ALL {
                let src = RemoteSource::connect(addr, 3, Duration::from_secs(5)).unwrap();
                let r = remove_scenario(&src, policy, &record);
                fetched += r.fault_placed + r.prefetched;
            }
            // Relaxed: a polled flag.
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let st = server.join().unwrap().unwrap();
            // Each page placed from the source was fetched once (kept across EAGAIN retries);
            // a fetch is wasted only on a page removed while it was in flight (at most one per
            // prefetcher and one for the event thread, per policy).
            assert!(
                (fetched..=fetched + 4 * 3).contains(&st.answered),
                "{fetched} placed: {st:?}"
            );
            assert_eq!(st.refused, 0, "{st:?}");
        })
    });
}

#[test]
fn a_kvm_guest_restores_through_the_handler_with_clean_page_checks() {
    if !ready_or_skip("a_kvm_guest_restores_through_the_handler_with_clean_page_checks") {
        return;
    }
    within(Duration::from_secs(60), || {
        let dir = Scratch::for_bytes("pagehint-restore", "snap-kv", 32 << 20);
        let snap = take_snapshot(
            &dir,
            32 << 20,
            HostPageSize::Small,
            2,
            Workload::Kv,
            11,
            Duration::from_millis(100),
        )
        .unwrap();
        let sockets = tmp("sock");
        let record = sockets.join("record");
        // The record first: the two policies that follow it read it.
        let mut policies = vec![Policy::Record];
        policies.extend(Policy::ALL.into_iter().filter(|p| *p != Policy::Record));
        for policy in policies {
            let (out, rep) = restore_once(&Trial {
                snap: &snap,
                dir: &sockets,
                handler: HandlerOptions {
                    policy,
                    prefetchers: 2,
                    record: Some(record.clone()),
                    ..Default::default()
                },
                run_for: Duration::from_millis(200),
                linger: Duration::from_secs(10),
                handshake: HandshakeFormat::PageSizeBoth,
            })
            .unwrap();
            assert_eq!(out.errors, 0, "{policy}: {:?}", out.first_error);
            assert_eq!(
                out.verified,
                snap.layout.data.end - snap.layout.data.start,
                "{policy}"
            );
            assert!(out.ops > 0, "{policy}");
            assert_eq!(rep.eexist, 0, "{policy}: {rep:?}");
            if policy.prefetchers(2) == 0 {
                assert!(rep.faults > 0, "{policy}");
            }
            assert!(
                rep.fault_placed + rep.prefetched <= rep.host_pages,
                "{policy}: no page placed twice: {rep:?}"
            );
            if policy.follows_record() {
                assert!(
                    rep.record_pages > 0 && rep.record_placed > 0,
                    "{policy}: {rep:?}"
                );
            }
            if policy.lingers() {
                assert_eq!(
                    rep.fault_placed + rep.prefetched,
                    rep.host_pages,
                    "{policy}: every page exactly once: {rep:?}"
                );
                assert!(rep.all_loaded_ns.is_some(), "{policy}: {rep:?}");
            }
        }
    });
}
