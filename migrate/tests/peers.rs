//! What real migrations meet beyond a clean run (thread guest, small RAM, a few seconds
//! each): a guest that keeps playing long after the last page is placed, a client that
//! connects and says nothing, a hello asking for more memory than the source has, a peer
//! that is not a pagehint-migrate source, a source that fails and says why, and strangers
//! at a paused session's door (garbage, a new destination, a wrong token, a bad received
//! bitmap), refused with the reason while the session waits for its own. Every test
//! bounds its own run time, so a hang is a failure.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{check_verified, config, within};
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::handshake::{self, ConnectError};
use pagehint_migrate::options::{GuestKind, GuestSpec};
use pagehint_migrate::sys::clock::now_ns;
use pagehint_migrate::wire::{
    read_full, write_parts, Channel, FrameHeader, FrameKind, Guard, Hello, Role, RpHeader, RpKind,
};
use pagehint_migrate::{
    run_destination, LocalSource, MigrationMode, PinPlan, RunConfig, RunError, Workload,
};

const MEM: u64 = 16 << 20;

fn cfg() -> RunConfig {
    config(GuestKind::Thread, MEM, HostPageSize::Small, 1)
}

fn hello(c: &RunConfig) -> Hello {
    Hello {
        recover_ms: 0,
        ..Hello::new(c, MigrationMode::Preempt, Workload::Seq)
    }
}

#[test]
fn a_guest_that_plays_long_after_the_last_page_does_not_time_the_source_out() {
    // The thread guest plays its stream window (a sixteenth of RAM: 1 MiB) at 384 KiB/s, so
    // about 2.7 s, most of it after postcopy has placed every page; the source gives up
    // after 1 s of silence on the return path. DONE goes out when the last page is placed.
    let r = within(Duration::from_secs(60), || {
        let src = LocalSource::start(PinPlan::OFF, Duration::from_secs(1), true).unwrap();
        let mut c = cfg();
        c.guest.stream_rate = 384 << 10;
        let t = Instant::now();
        let r = run_destination(
            src.addr(),
            &c,
            MigrationMode::Preempt,
            Workload::Stream,
            &|_, _| {},
        );
        (r, t.elapsed())
    });
    let (r, took) = r;
    let r = r.unwrap_or_else(|e| panic!("the guest outlived the source's idle limit: {e}"));
    check_verified(&r);
    assert!(
        took > Duration::from_secs(2),
        "the guest played its whole window ({took:?})"
    );
    assert!(
        r.transfer.duration_ms < 1000.0,
        "postcopy ended long before the guest did: {} ms",
        r.transfer.duration_ms
    );
}

#[test]
fn a_client_that_connects_and_says_nothing_does_not_hold_up_a_real_destination() {
    let (r, took) = within(Duration::from_secs(60), || {
        // The source's idle limit is 20 s; the destination gives up on the source after 10.
        let src = LocalSource::start(PinPlan::OFF, Duration::from_secs(20), true).unwrap();
        let silent = TcpStream::connect(src.addr()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let r = run_destination(
            src.addr(),
            &cfg(),
            MigrationMode::PreemptHint,
            Workload::Random,
            &|_, _| {},
        );
        drop(silent);
        (r, t.elapsed())
    });
    check_verified(&r.unwrap_or_else(|e| panic!("a silent client blocked the source: {e}")));
    assert!(
        took < handshake::HELLO_DEADLINE + Duration::from_secs(5),
        "took {took:?}"
    );
}

#[test]
fn the_source_refuses_a_guest_that_does_not_fit_in_its_memory_and_says_why() {
    let big = pagehint_migrate::guest::layout::MAX_MEM;
    // The source holds one copy of guest RAM (the image is built straight into it).
    if pagehint_migrate::sys::warm::mem_available().is_some_and(|a| a >= big) {
        eprintln!("SKIPPED: this machine has room for a 64 GiB guest at the source");
        return;
    }
    let r = within(Duration::from_secs(30), move || {
        let c = cfg();
        let src = LocalSource::start(PinPlan::OFF, c.idle_timeout, false).unwrap();
        let mut h = hello(&c);
        h.guest = GuestSpec::new(GuestKind::Thread, big, HostPageSize::Small, 1).unwrap();
        handshake::connect(src.addr(), &h, c.idle_timeout).map(|_| ())
    });
    match r {
        Err(ConnectError::Refused(why)) => {
            assert!(why.contains("a 65536 MiB guest"), "{why}");
            assert!(why.contains("MiB are available"), "{why}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_peer_that_is_not_a_pagehint_migrate_source_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n");
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = within(Duration::from_secs(30), move || {
        run_destination(
            addr,
            &cfg(),
            MigrationMode::Preempt,
            Workload::Seq,
            &|_, _| {},
        )
    })
    .expect_err("an HTTP server is no source");
    let msg = e.to_string();
    assert!(msg.contains("not a pagehint-migrate source"), "{msg}");
    assert!(msg.contains("HTTP/1.0"), "{msg}");
}

#[test]
fn a_failing_source_sends_its_reason_in_an_abort_frame() {
    // A destination that breaks the protocol after START: the source fails with a protocol
    // error and must say so on the main connection before closing it.
    let msg = within(Duration::from_secs(30), || {
        let c = cfg();
        let src = LocalSource::start(PinPlan::OFF, c.idle_timeout, false).unwrap();
        let conn = handshake::connect(src.addr(), &hello(&c), c.idle_timeout).unwrap();
        let stop = AtomicBool::new(false);
        let g = Guard {
            stop: &stop,
            idle: Duration::from_secs(10),
            keepalive: None,
        };
        let start = RpHeader {
            kind: RpKind::Start,
            len: 0,
            sent_ns: now_ns(),
        };
        write_parts(&conn.main, &[&start.encode()], &g, Channel::ReturnPath).unwrap();
        write_parts(
            &conn.main,
            &[b"not a frame at all"],
            &g,
            Channel::ReturnPath,
        )
        .unwrap();
        // Read page frames until the abort.
        loop {
            let mut hb = [0u8; FrameHeader::LEN];
            read_full(&conn.main, &mut hb, &g, Channel::Background)
                .expect("the source closed without an ABORT frame");
            let h = FrameHeader::decode(&hb, Channel::Background).unwrap();
            let mut body = vec![0u8; h.payload_len() as usize];
            read_full(&conn.main, &mut body, &g, Channel::Background).unwrap();
            if h.kind == FrameKind::Abort {
                break String::from_utf8(body).unwrap();
            }
        }
    });
    assert!(msg.contains("protocol error on the return path"), "{msg}");
    assert!(msg.contains("magic"), "{msg}");
}

#[test]
fn the_destination_reports_the_reason_a_source_gave() {
    // A source that refuses nothing but aborts right after START with a reason.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let r = handshake::accept(&listener, &stop, Duration::from_secs(10), |_| Ok(()));
        let (acc, ()) = r.unwrap();
        let g = Guard {
            stop: &stop,
            idle: Duration::from_secs(10),
            keepalive: None,
        };
        handshake::answer_pings_until_start(&acc.main, &g).unwrap();
        let why = b"the source guest failed: a test said so";
        let h = FrameHeader::abort(why.len());
        write_parts(&acc.main, &[&h.encode(), why], &g, Channel::Background).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = within(Duration::from_secs(30), move || {
        run_destination(
            addr,
            &cfg(),
            MigrationMode::Preempt,
            Workload::Seq,
            &|_, _| {},
        )
    })
    .expect_err("the source aborted");
    assert!(matches!(e, RunError::Wire(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("the source aborted") && msg.contains("a test said so"),
        "{msg}"
    );
}

#[test]
fn a_source_that_falls_silent_mid_postcopy_is_reported_on_both_channels() {
    use std::sync::atomic::Ordering;
    // A source process, stopped (SIGSTOP) once postcopy is under way: both connections stay
    // open and both fall silent, as in a network partition.
    let (mut child, addr, placed, stopper) = common::source_stopped_mid_postcopy(None);
    let r = within(Duration::from_secs(30), move || {
        // A slow link, so that postcopy is still running when the source stops.
        let mut c = cfg();
        c.idle_timeout = Duration::from_secs(1);
        c.recover_timeout = Duration::from_secs(2);
        c.link.bandwidth_bps = 50_000_000;
        run_destination(
            addr,
            &c,
            MigrationMode::Preempt,
            Workload::Random,
            // Relaxed: a progress figure for the stopper thread.
            &|n, _| placed.store(n, Ordering::Relaxed),
        )
    });
    stopper.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let e = r.expect_err("the source stopped");
    // The destination tried to resume for the recovery window, then gave up.
    match &e {
        RunError::Recovery { cut, why } => {
            assert!(cut.contains("background and urgent channels"), "{cut}");
            assert!(why.contains("did not take the session back"), "{why}");
        }
        e => panic!("expected a failed recovery, got {e:?}"),
    }
}

#[test]
fn a_paused_session_refuses_strangers_with_a_reason_and_takes_its_own_destination_back() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let waiter = std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        handshake::accept_resume(
            &listener,
            &stop,
            Duration::from_secs(5),
            Duration::from_secs(20),
            7,
            4,
        )
    });
    let stop = AtomicBool::new(false);
    let g = Guard {
        stop: &stop,
        idle: Duration::from_secs(5),
        keepalive: None,
    };
    let ask = |bytes: &[u8]| {
        let c = TcpStream::connect(addr).unwrap();
        pagehint_migrate::wire::configure(&c).unwrap();
        write_parts(&c, &[bytes], &g, Channel::Handshake).unwrap();
        pagehint_migrate::wire::HelloReply::read(&c, &g)
            .unwrap()
            .error
    };
    let base = hello(&cfg());
    let with = move |role| base.with_role(role);
    let mut garbage = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    garbage.resize(Hello::LEN, b' ');
    let e = ask(&garbage);
    assert!(e.contains("not a pagehint-migrate destination"), "{e}");
    let e = ask(&with(Role::Main).encode());
    assert!(e.contains("busy: a session is paused"), "{e}");
    let e = ask(&with(Role::Resume { token: 8 }).encode());
    assert!(e.contains("no paused session with that token"), "{e}");
    let mut short = with(Role::Resume { token: 7 }).encode().to_vec();
    short.extend_from_slice(&3u64.to_le_bytes());
    short.extend_from_slice(&[0u8; 24]);
    let e = ask(&short);
    assert!(
        e.contains("a received bitmap of 3 words for a guest of 4"),
        "{e}"
    );
    let (main, urgent) = within(Duration::from_secs(10), move || {
        handshake::resume(
            addr,
            &with(Role::Main),
            7,
            &[1, 2, 3, u64::MAX],
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .map_err(|e| format!("{e:?}"))
    })
    .unwrap();
    let (m, u, received) = waiter.join().unwrap().unwrap();
    assert_eq!(received, vec![1, 2, 3, u64::MAX]);
    assert_eq!(m.peer_addr().unwrap(), main.local_addr().unwrap());
    assert_eq!(u.peer_addr().unwrap(), urgent.local_addr().unwrap());
}
