//! A listening source that hostile clients cannot stop (thread guest, small RAM): a flood of
//! silent connections and half hellos during a migration with cuts, while a new destination
//! arrives; and one source process serving many destination sessions back to back through
//! hostile traffic (silent and half-open connections, garbage, bogus tokens, port-scan
//! connects) and cuts at random, every session verified, no handshake waiting long, the
//! source's memory flat.
//!
//! The soak's length: `PAGEHINT_SOAK_SESSIONS` (default 12, about a minute; `scripts/soak.sh`
//! runs 100), its random choices from `PAGEHINT_SOAK_SEED` (printed, to replay a run).
//! Every test bounds its own run time, so a hang is a failure.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{check_verified, config, start_listener};
use pagehint_migrate::guest::layout::HostPageSize;
use pagehint_migrate::handshake;
use pagehint_migrate::options::GuestKind;
use pagehint_migrate::wire::{Hello, Role};
use pagehint_migrate::{run_destination, MigrationMode, RunConfig, Workload};

/// A small random generator (xorshift64*): the soak's choices, replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("PAGEHINT_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

/// A source process listening on loopback (its log in `log`), and its address.
fn source(args: &[&str], log: &std::path::Path) -> (Child, SocketAddr) {
    let (child, addr) = start_listener(
        Command::new(env!("CARGO_BIN_EXE_pagehint-migrate"))
            .args(["--listen", "127.0.0.1:0", "--pin", "off"])
            .args(args)
            .stderr(std::fs::File::create(log).unwrap()),
    );
    (child, addr.parse().unwrap())
}

/// Resident memory of process `pid`, KiB (None once it has exited).
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// What a hostile client does, continuously, until stopped.
#[derive(Clone, Copy)]
struct Mischief {
    /// Connections held open saying nothing (reopened as the source closes them).
    silent: usize,
    /// Connections held open after the first 100 bytes of a hello.
    half: usize,
    /// Also, each round: garbage, a bogus urgent and a bogus resume hello, a connect-and-close.
    churn: bool,
}

/// A hostile client on its own thread; counts what it did.
struct Hostile {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hostile {
    fn start(addr: SocketAddr, hello: Hello, m: Mischief, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let (s2, o2) = (Arc::clone(&stop), Arc::clone(&opened));
        let thread = std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut silent: Vec<TcpStream> = Vec::new();
            let mut half: Vec<TcpStream> = Vec::new();
            let good = hello.encode();
            let connect = || {
                let c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
                // Relaxed: a count for the report.
                o2.fetch_add(1, Ordering::Relaxed);
                c.set_nonblocking(true).ok()?;
                Some(c)
            };
            // Whether the source has answered or closed it (then it is replaced).
            let done = |c: &TcpStream| {
                let mut b = [0u8; 64];
                !matches!((&*c).read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
            };
            // Relaxed: a polled flag.
            while !s2.load(Ordering::Relaxed) {
                silent.retain(|c| !done(c));
                half.retain(|c| !done(c));
                while silent.len() < m.silent {
                    match connect() {
                        Some(c) => silent.push(c),
                        None => break,
                    }
                }
                while half.len() < m.half {
                    match connect() {
                        Some(c) => {
                            let _ = (&c).write(&good[..100]);
                            half.push(c);
                        }
                        None => break,
                    }
                }
                if m.churn {
                    let mut junk = vec![0u8; Hello::LEN];
                    junk.iter_mut().for_each(|b| *b = rng.next() as u8);
                    let bogus_urgent = hello.with_role(Role::Urgent { token: rng.next() }).encode();
                    let bogus_resume = hello.with_role(Role::Resume { token: rng.next() }).encode();
                    for bytes in [&junk[..], &bogus_urgent[..], &bogus_resume[..], &[][..]] {
                        if let Some(c) = connect() {
                            let _ = (&c).write(bytes);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50 + rng.below(100)));
            }
        });
        Self {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    /// Stops it; how many connections it opened.
    fn stop(mut self) -> u64 {
        // Relaxed: a polled flag; the join waits.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Relaxed: the thread has been joined.
        self.opened.load(Ordering::Relaxed)
    }
}

fn small() -> RunConfig {
    let mut c = config(GuestKind::Thread, 16 << 20, HostPageSize::Small, 1);
    c.recover_timeout = Duration::from_secs(10);
    c
}

/// Runs a migration; returns it and the time from its start to its first progress report
/// (set-up, handshake, the switch-over: the migration has started).
fn timed_run(
    addr: SocketAddr,
    c: &RunConfig,
    m: MigrationMode,
    w: Workload,
) -> (pagehint_migrate::RunResult, Duration) {
    let t = Instant::now();
    let started = Mutex::new(None);
    let r = run_destination(addr, c, m, w, &|_, _| {
        let mut s = started.lock().unwrap();
        if s.is_none() {
            *s = Some(t.elapsed());
        }
    })
    .unwrap_or_else(|e| panic!("{w} / {m}: {e}"));
    let started = started.into_inner().unwrap().unwrap_or(t.elapsed());
    (r, started)
}

#[test]
fn a_flood_of_silent_and_half_hello_clients_stops_neither_a_migration_with_cuts_nor_a_new_destination(
) {
    let dir = std::env::temp_dir().join(format!("soak-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("source.log");
    let (mut src, addr) = source(&[], &log);
    let c = small();
    let hello = Hello::new(&c, MigrationMode::Preempt, Workload::Seq);
    let flood = Hostile::start(
        addr,
        hello.clone(),
        Mischief {
            silent: 500,
            half: 20,
            churn: false,
        },
        seed(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = common::within(Duration::from_secs(120), move || {
        // The migration: three cuts, each resumed through the flood.
        let mut cut = small();
        cut.hooks.source.cut_after = 800;
        cut.hooks.source.cuts = 3;
        cut.link.bandwidth_bps = 200_000_000;
        let first = std::thread::spawn(move || {
            timed_run(addr, &cut, MigrationMode::PreemptHint, Workload::Random)
        });
        std::thread::sleep(Duration::from_millis(300));
        // A new destination arriving meanwhile: its handshake, then a whole migration.
        let t = Instant::now();
        let probe = handshake::connect(addr, &hello, Duration::from_secs(10));
        let handshake = t.elapsed();
        drop(probe.map_err(|e| format!("{e:?}")).unwrap());
        let second = timed_run(addr, &small(), MigrationMode::Preempt, Workload::Kv);
        (first.join().unwrap(), second, handshake)
    });
    let opened = flood.stop();
    let ((first, _), (second, second_start), handshake) = out;
    let _ = src.kill();
    let _ = src.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "flood: {opened} hostile connections; the migration survived {} cuts (recovery {:?} ms); a new destination's handshake took {:.1} ms, its migration started after {:.1} ms",
        first.recovery.cuts,
        first.recovery.recovery_ms,
        handshake.as_secs_f64() * 1e3,
        second_start.as_secs_f64() * 1e3
    );
    check_verified(&first);
    assert_eq!(first.recovery.cuts, 3, "{:?}", first.recovery.cut_reasons);
    check_verified(&second);
    assert!(opened >= 520, "the flood was on: {opened}");
    assert!(
        handshake < Duration::from_secs(1),
        "a new destination waited {handshake:?} for its handshake\n{log}"
    );
    // The refusals are a few lines, not one per connection.
    let refused = log.lines().filter(|l| l.starts_with("refused")).count();
    assert!(refused < 50, "{refused} lines of refusals:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_source_serves_sessions_back_to_back_through_hostile_traffic_and_random_cuts() {
    let sessions: u64 = std::env::var("PAGEHINT_SOAK_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let seed = seed();
    eprintln!("soak: {sessions} sessions, PAGEHINT_SOAK_SEED={seed}");
    let dir = std::env::temp_dir().join(format!("soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("source.log");
    let n = sessions.to_string();
    let (mut src, addr) = source(
        &["--sessions", &n, "--timeout", "10s", "--max-recover", "5s"],
        &log,
    );
    let pid = src.id();
    let c = small();
    let hostile = Hostile::start(
        addr,
        Hello::new(&c, MigrationMode::Preempt, Workload::Seq),
        Mischief {
            silent: 50,
            half: 10,
            churn: true,
        },
        seed ^ 0x5eed,
    );
    let limit = Duration::from_secs(30 + 15 * sessions);
    let (starts, rss, cuts) = common::within(limit, move || {
        let mut rng = Rng(seed);
        let (mut starts, mut rss, mut cuts) = (Vec::new(), Vec::new(), 0);
        for i in 0..sessions {
            let mut c = small();
            let m = MigrationMode::ALL[rng.below(3) as usize];
            let w = [Workload::Seq, Workload::Random, Workload::Kv][rng.below(3) as usize];
            let k = rng.below(3);
            if k > 0 {
                c.hooks.source.cut_after = 200 + rng.below(1500);
                c.hooks.source.cuts = k;
            }
            let (r, started) = timed_run(addr, &c, m, w);
            check_verified(&r);
            assert_eq!(
                r.recovery.cuts, k,
                "session {i}: {:?}",
                r.recovery.cut_reasons
            );
            cuts += k;
            starts.push(started);
            // (After the last session the source exits.)
            rss.extend(rss_kib(pid));
        }
        (starts, rss, cuts)
    });
    let opened = hostile.stop();
    let status = common::within(Duration::from_secs(30), move || src.wait().unwrap());
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let worst = starts.iter().max().copied().unwrap_or_default();
    // From the second session on: the first builds the image template the others reuse.
    let (base, last) = (rss[1.min(rss.len() - 1)], *rss.last().unwrap());
    let (base_at, last_at) = (2.min(rss.len()), rss.len());
    let growth = (last as f64 - base as f64) / base as f64 * 100.0;
    eprintln!(
        "soak: {sessions} sessions verified ({cuts} cuts), {opened} hostile connections; slowest start {:.1} ms; source RSS {base} KiB after session {base_at}, {last} KiB after session {last_at} ({growth:+.1}%)",
        worst.as_secs_f64() * 1e3
    );
    assert!(
        status.success(),
        "the source served its --sessions and exited 0: {status}\n{log_text}"
    );
    assert_eq!(
        log_text.lines().filter(|l| l.contains(" done: ")).count() as u64,
        sessions,
        "{log_text}"
    );
    assert!(
        worst < Duration::from_secs(5),
        "a session waited {worst:?} to start\n{log_text}"
    );
    if cuts > 0 {
        // The destinations ask for 10 s; this source holds a paused session 5 s at most,
        // and says so.
        assert!(
            log_text.contains("holding it up to 5s for its destination to resume it (it asked for 10s; --max-recover caps it)"),
            "{log_text}"
        );
    }
    assert!(
        growth <= 10.0,
        "the source's memory grew {growth:.1}%: {rss:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
