//! What real migrations meet beyond a clean run (thread guest, small RAM, a few seconds
//! each): a guest that keeps playing long after the last page is placed, a client that
//! connects and says nothing, a hello asking for more memory than the source has, a peer
//! that is not a pagehint-migrate source, a source that fails and says why, strangers at a
//! paused session's door (garbage, a new destination, a wrong token, a bad received bitmap),
//! refused with the reason while the session waits for its own, a hello never followed by
//! its urgent connection (the source released after the handshake deadline), and hello
//! values that would hold a source (refused at once, or capped). Every test bounds its own
//! run time, so a hang is a failure.

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
        took < handshake::HANDSHAKE_DEADLINE + Duration::from_secs(5),
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
        let g = Guard {
            stop: &stop,
            idle: Duration::from_secs(10),
            keepalive: None,
        };
        // A bare source: takes the hello and the urgent connection, answers both.
        let take = || {
            let (c, _) = listener.accept().unwrap();
            pagehint_migrate::wire::configure(&c).unwrap();
            let mut hb = [0u8; Hello::LEN];
            read_full(&c, &mut hb, &g, Channel::Handshake).unwrap();
            let ok = pagehint_migrate::wire::HelloReply {
                error: String::new(),
                token: 5,
                boot_id: pagehint_migrate::sys::clock::boot_id(),
            };
            ok.write(&c, &g).unwrap();
            c
        };
        let (main, _urgent) = (take(), take());
        handshake::answer_pings_until_start(&main, &g).unwrap();
        let why = b"the source guest failed: a test said so";
        let h = FrameHeader::abort(why.len());
        write_parts(&main, &[&h.encode(), why], &g, Channel::Background).unwrap();
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

/// The received bitmap of a destination that has every page of `c`'s guest.
fn all_received(c: &RunConfig) -> Vec<u64> {
    let mut out = Vec::new();
    for b in c.layout().ram().blocks() {
        let pages = b.pages();
        for w in 0..pages.div_ceil(64) {
            let bits = (pages - w * 64).min(64);
            out.push(if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            });
        }
    }
    out
}

/// A hand-made destination: sets a session up (pure postcopy, recovery asked for), sends
/// `START`, reads up to the switch-over, then drops both connections, as a cut would: the
/// source pauses the session. Returns the token.
fn a_session_cut_after_the_switch_over(addr: std::net::SocketAddr, c: &RunConfig) -> u64 {
    let h = Hello {
        recover_ms: 20_000,
        ..hello(c)
    };
    let conn = handshake::connect(addr, &h, c.idle_timeout).unwrap();
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
    loop {
        let mut hb = [0u8; FrameHeader::LEN];
        read_full(&conn.main, &mut hb, &g, Channel::Background).unwrap();
        let f = FrameHeader::decode(&hb, Channel::Background).unwrap();
        let mut body = vec![0u8; f.payload_len() as usize];
        read_full(&conn.main, &mut body, &g, Channel::Background).unwrap();
        if f.kind == FrameKind::Switch {
            break;
        }
    }
    let _ = conn.main.shutdown(std::net::Shutdown::Both);
    let _ = conn.urgent.shutdown(std::net::Shutdown::Both);
    conn.token
}

#[test]
fn a_paused_session_refuses_strangers_with_a_reason_and_takes_its_own_destination_back() {
    within(Duration::from_secs(60), || {
        let c = cfg();
        let mut opts = pagehint_migrate::source::ServeOptions::new(PinPlan::OFF, c.idle_timeout);
        opts.max_sessions = 1;
        let src = LocalSource::with_options(opts, false).unwrap();
        let addr = src.addr();
        let token = a_session_cut_after_the_switch_over(addr, &c);
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
        let base = hello(&c);
        let with = move |role| base.with_role(role);
        let mut garbage = b"GET / HTTP/1.0\r\n\r\n".to_vec();
        garbage.resize(Hello::LEN, b' ');
        let e = ask(&garbage);
        assert!(e.contains("not a pagehint-migrate destination"), "{e}");
        // A new destination, once the source has noticed the cut: busy, saying why.
        let t = Instant::now();
        let e = loop {
            let e = ask(&with(Role::Main).encode());
            if e.contains("a session is paused") || t.elapsed() > Duration::from_secs(15) {
                break e;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(e.contains("busy: a session is paused"), "{e}");
        let e = ask(&with(Role::Resume { token: token ^ 1 }).encode());
        assert!(e.contains("no paused session with that token"), "{e}");
        let e = ask(&with(Role::Urgent { token }).encode());
        assert!(
            e.contains("no session here waits for an urgent connection"),
            "{e}"
        );
        let words = all_received(&c);
        let mut short = with(Role::Resume { token }).encode().to_vec();
        short.extend_from_slice(&3u64.to_le_bytes());
        short.extend_from_slice(&[0u8; 24]);
        let e = ask(&short);
        assert!(
            e.contains(&format!(
                "a received bitmap of 3 words for a guest of {}",
                words.len()
            )),
            "{e}"
        );
        // Its own destination, with every page: the session resumes with nothing left to
        // send, and ends with its summary at DONE.
        let (main, _urgent, again) = handshake::resume(
            addr,
            &with(Role::Main),
            token,
            &words,
            Duration::from_secs(1),
            Duration::from_secs(5),
            &AtomicBool::new(false),
        )
        .map_err(|e| format!("{e:?}"))
        .unwrap();
        assert_eq!(again, token, "the same session resumed");
        let done = RpHeader {
            kind: RpKind::Done,
            len: 0,
            sent_ns: now_ns(),
        };
        write_parts(&main, &[&done.encode()], &g, Channel::ReturnPath).unwrap();
        let summary = loop {
            let mut hb = [0u8; FrameHeader::LEN];
            read_full(&main, &mut hb, &g, Channel::Background).unwrap();
            let f = FrameHeader::decode(&hb, Channel::Background).unwrap();
            let mut body = vec![0u8; f.payload_len() as usize];
            read_full(&main, &mut body, &g, Channel::Background).unwrap();
            if f.kind == FrameKind::Summary {
                break pagehint_migrate::wire::Summary::decode(&body).unwrap();
            }
        };
        assert_eq!(summary.recoveries, vec![0], "nothing was left to send");
    });
}

#[test]
fn a_hello_never_followed_by_its_urgent_connection_releases_the_source_within_the_deadline() {
    within(Duration::from_secs(60), || {
        let c = cfg();
        let mut opts =
            pagehint_migrate::source::ServeOptions::new(PinPlan::OFF, Duration::from_secs(20));
        opts.max_sessions = 1;
        let src = LocalSource::with_options(opts, false).unwrap();
        // A valid main hello, answered, then silence: no urgent connection ever.
        let stop = AtomicBool::new(false);
        let g = Guard {
            stop: &stop,
            idle: Duration::from_secs(10),
            keepalive: None,
        };
        let half = TcpStream::connect(src.addr()).unwrap();
        pagehint_migrate::wire::configure(&half).unwrap();
        write_parts(&half, &[&hello(&c).encode()], &g, Channel::Handshake).unwrap();
        let reply = pagehint_migrate::wire::HelloReply::read(&half, &g).unwrap();
        assert!(reply.error.is_empty(), "{}", reply.error);
        // Meanwhile a second destination is told at once that the source is busy.
        let t = Instant::now();
        let e = handshake::connect(src.addr(), &hello(&c), c.idle_timeout)
            .expect_err("one session at a time");
        assert!(
            matches!(&e, ConnectError::Refused(why) if why.contains("busy with 1 session")),
            "{e:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // Within the handshake deadline (not the 20 s idle limit) the session is released,
        // and a real destination migrates.
        std::thread::sleep(handshake::HANDSHAKE_DEADLINE + Duration::from_millis(300));
        let t = Instant::now();
        let r = run_destination(
            src.addr(),
            &c,
            MigrationMode::Preempt,
            Workload::Seq,
            &|_, _| {},
        );
        check_verified(&r.unwrap_or_else(|e| panic!("the source was not released: {e}")));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        drop(half);
    });
}

#[test]
fn no_hello_value_holds_the_source_or_its_destination() {
    within(Duration::from_secs(90), || {
        let c = cfg();
        let src = LocalSource::start(PinPlan::OFF, Duration::from_secs(5), false).unwrap();
        // Vanilla: its background channel has the whole send queue (no low-water mark).
        let base = Hello {
            mode: MigrationMode::Vanilla,
            ..hello(&c)
        };
        let with_link = |f: &dyn Fn(&mut pagehint_migrate::LinkParams)| {
            let mut h = base.clone();
            f(&mut h.link);
            h
        };
        // Values the command line refuses, crafted into a hello: the source refuses them
        // at once, saying why, against its own --timeout.
        for (h, says) in [
            (
                with_link(&|l| l.delay_ns = u64::MAX),
                "too slow for the timeout",
            ),
            (
                with_link(&|l| l.bandwidth_bps = 1),
                "too slow for the timeout",
            ),
            (
                with_link(&|l| l.queue_bytes = u64::MAX),
                "too slow for the timeout",
            ),
            (
                with_link(&|l| l.nic_queue_bytes = u64::MAX),
                "too slow for the timeout",
            ),
            (
                with_link(&|l| l.pace_bps = u64::MAX),
                "at most 10000000000000",
            ),
            (
                with_link(&|l| l.bandwidth_bps = u64::MAX),
                "at most 10000000000000",
            ),
        ] {
            let t = Instant::now();
            match handshake::connect(src.addr(), &h, c.idle_timeout) {
                Err(ConnectError::Refused(why)) => {
                    assert!(why.contains(says), "{why}");
                    assert!(why.contains("the source's --timeout"), "{why}");
                }
                other => panic!(
                    "{:?}: expected a refusal, got {:?}",
                    h.link,
                    other.map(|_| ())
                ),
            }
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        }
        // Values taken within the source's limits: a recovery window of 2^64-1 ms (held
        // for --max-recover at most) and 2^32-1 precopy rounds (they stop when the dirty set
        // stops shrinking): the run completes.
        let mut long = cfg();
        long.recover_paused = true;
        long.precopy.rounds = u32::MAX;
        assert_eq!(
            pagehint_migrate::wire::Hello::new(&long, MigrationMode::Preempt, Workload::Seq)
                .recover_ms,
            u64::MAX
        );
        let r = run_destination(
            src.addr(),
            &long,
            MigrationMode::Preempt,
            Workload::Seq,
            &|_, _| {},
        );
        check_verified(&r.unwrap_or_else(|e| panic!("{e}")));
    });
}

#[test]
fn connections_past_the_pending_limit_are_refused_at_once_with_the_reason() {
    within(Duration::from_secs(30), || {
        let c = cfg();
        let mut opts = pagehint_migrate::source::ServeOptions::new(PinPlan::OFF, c.idle_timeout);
        opts.max_pending = 8;
        let src = LocalSource::with_options(opts, false).unwrap();
        let silent: Vec<TcpStream> = (0..8)
            .map(|_| TcpStream::connect(src.addr()).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let stop = AtomicBool::new(false);
        let g = Guard {
            stop: &stop,
            idle: Duration::from_secs(5),
            keepalive: None,
        };
        let t = Instant::now();
        let one_more = TcpStream::connect(src.addr()).unwrap();
        pagehint_migrate::wire::configure(&one_more).unwrap();
        let e = pagehint_migrate::wire::HelloReply::read(&one_more, &g)
            .unwrap()
            .error;
        assert_eq!(
            e,
            "too many connections waiting to say hello (8); try again"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // Once the silent ones have had their deadline, a destination gets in.
        drop(silent);
        let r = run_destination(
            src.addr(),
            &c,
            MigrationMode::Preempt,
            Workload::Seq,
            &|_, _| {},
        );
        check_verified(&r.unwrap_or_else(|e| panic!("{e}")));
    });
}
