//! Several fault streams, one hint slot each: a deterministic demonstration at the library
//! level, and the sweep that chose `StreamPolicy`'s default run and share.
//!
//! A discrete-time simulation drives the real `PageScheduler` on one thread. One tick is the
//! link time of one 4 KiB page. Postcopy starts with every page dirty. The background sender
//! asks its scanner for the next claim whenever its channel is idle; a claim of `n` pages
//! arrives `n` ticks later. Each guest stream (a vCPU) reads its own region page by page, one
//! page every `think` ticks. Reading a page that has not arrived is a fault: the request goes
//! through `serve_from(stream, ..)`; a won claim is sent on the urgent channel (its own link:
//! the page arrives a round trip, `rtt` ticks, later) and `urgent_sent_from` leaves the
//! stream's hint; a page already claimed by the background is waited for. Counted per
//! stream: urgent faults (`Served::Send`), waits on pages already on their way
//! (`Served::AlreadyClaimed`), and ticks blocked.
//!
//! What it shows: with one slot (`preempt_hint`, the QEMU seed's behaviour) each fault moves
//! the one scan to its stream, the other streams fault page after page; with one slot per
//! stream (`preempt_hints(4)`) each stream's faults drop to about one per run.
//!
//! `cargo test --release --test streams_demo -- --nocapture` prints the tables.

use pagehint::{
    HintPolicy, PageScheduler, RamLayout, SchedulerConfig, Served, StreamPolicy, UrgentRequest,
};

const PAGE: u64 = 4096;
const NEVER: u64 = u64::MAX;

/// One simulated guest stream: a sequential reader of `len` pages from `start`, forward or
/// backward.
#[derive(Clone, Copy, Debug)]
struct Reader {
    start: u64,
    len: u64,
    backward: bool,
    /// Reads bursts of `.1` consecutive pages at random places of the whole RAM instead
    /// (xorshift from seed `.0`); bursts of 1 page are random reads.
    random: Option<(u64, u64)>,
}

impl Reader {
    fn page(&self, i: u64, pages: u64) -> u64 {
        if let Some((seed, burst)) = self.random {
            let mut x = seed ^ (i / burst + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            return x % (pages - burst + 1) + i % burst;
        }
        if self.backward {
            self.start + self.len - 1 - i
        } else {
            self.start + i
        }
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    /// Guest RAM in 4 KiB pages (one block of 4 KiB host pages).
    pages: u64,
    readers: Vec<Reader>,
    /// Ticks between two reads of one stream.
    think: u64,
    /// Round trip of an urgent fault, in ticks.
    rtt: u64,
}

/// What each stream went through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Outcome {
    urgent: Vec<u64>,
    already_claimed: Vec<u64>,
    blocked: Vec<u64>,
}

impl Outcome {
    fn urgent_total(&self) -> u64 {
        self.urgent.iter().sum()
    }
    fn blocked_total(&self) -> u64 {
        self.blocked.iter().sum()
    }
}

/// How the urgent path names streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// `serve` + `urgent_sent` (the one-stream API: every stream is stream 0).
    OneStream,
    /// `serve_from(s, ..)` + `urgent_sent_from(s, ..)`.
    PerStream,
}

fn simulate(sc: &Scenario, config: SchedulerConfig, api: Api) -> Outcome {
    let layout = RamLayout::single("ram", sc.pages * PAGE, PAGE).unwrap();
    let sched = PageScheduler::new(layout, config).unwrap();
    sched.bitmap().mark_all();
    let mut scanner = sched.background();
    let n = sc.readers.len();
    let mut arrive = vec![NEVER; sc.pages as usize];
    let mut out = Outcome {
        urgent: vec![0; n],
        already_claimed: vec![0; n],
        blocked: vec![0; n],
    };
    let mut next = vec![0u64; n]; // pages read by each stream
    let mut ready = vec![0u64; n]; // tick at which each stream reads next
    let mut waiting_since = vec![None::<u64>; n];
    let (mut busy_until, mut background_done) = (0u64, false);
    let mut t = 0u64;
    while (0..n).any(|s| next[s] < sc.readers[s].len) {
        if !background_done && busy_until <= t {
            match scanner.next_claim() {
                Some(claim) => {
                    let sent = claim.pages_to_send();
                    for hp in claim.host_pages() {
                        for p in hp.page_range() {
                            arrive[p as usize] = t + sent;
                        }
                    }
                    busy_until = t + sent;
                }
                None => background_done = true,
            }
        }
        for s in 0..n {
            let r = sc.readers[s];
            if next[s] >= r.len || ready[s] > t {
                continue;
            }
            let p = r.page(next[s], sc.pages);
            if arrive[p as usize] <= t {
                if let Some(since) = waiting_since[s].take() {
                    out.blocked[s] += t - since;
                }
                next[s] += 1;
                ready[s] = t + sc.think;
                continue;
            }
            if waiting_since[s].is_some() {
                continue; // still waiting for a page on its way
            }
            waiting_since[s] = Some(t);
            let req = UrgentRequest::new(0, p * PAGE, PAGE);
            let served = match api {
                Api::OneStream => sched.serve(req),
                Api::PerStream => sched.serve_from(s as u32, req),
            }
            .unwrap();
            match served {
                Served::Send(claim) => {
                    out.urgent[s] += 1;
                    for hp in claim.host_pages() {
                        for q in hp.page_range() {
                            arrive[q as usize] = t + sc.rtt;
                        }
                    }
                    match api {
                        Api::OneStream => {
                            sched.urgent_sent(&claim);
                        }
                        Api::PerStream => {
                            sched.urgent_sent_from(s as u32, &claim).unwrap();
                        }
                    }
                }
                Served::AlreadyClaimed(_) => out.already_claimed[s] += 1,
                Served::Queued(_) => unreachable!("preempt mode"),
            }
            ready[s] = arrive[p as usize];
        }
        t += 1;
    }
    if std::env::var_os("DEMO_DEBUG").is_some() {
        drop(scanner);
        for s in 0..sched.streams() {
            eprintln!("stream {s}: {:?}", sched.stream_stats(s).unwrap());
        }
        eprintln!("{:?} t={t}", sched.stats());
    }
    out
}

/// Four readers of 1024 pages (4 MiB) each in a 64 MiB guest, in separate regions, none at
/// the start of RAM; a fault round trip of `rtt` page times (100: 330 µs at 10 Gbit/s);
/// each reads a page every `think` ticks (8: the four together need half the link; 2: twice
/// the link). `backward[i]`: reader `i` reads its region from the top down.
fn four_readers(think: u64, rtt: u64, backward: [bool; 4]) -> Scenario {
    let starts = [3_000, 6_500, 10_000, 13_500];
    Scenario {
        pages: 16_384,
        readers: (0..4)
            .map(|i| Reader {
                start: starts[i],
                len: 1024,
                backward: backward[i],
                random: None,
            })
            .collect(),
        think,
        rtt,
    }
}

/// Reader 0 sequential, readers 1 to 3 reading 300 random pages of the whole RAM each (a
/// stream beside key-value lookups).
fn one_sequential_three_random(think: u64) -> Scenario {
    let mut sc = four_readers(think, 100, [false; 4]);
    for (i, r) in sc.readers.iter_mut().enumerate().skip(1) {
        r.random = Some((77 * i as u64, 1));
        r.len = 300;
    }
    sc
}

/// Four readers each reading 8 bursts of 128 consecutive pages at random places: a cursor
/// that outlives its burst only takes turns from the others.
fn bursty_readers(think: u64) -> Scenario {
    let mut sc = four_readers(think, 100, [false; 4]);
    for (i, r) in sc.readers.iter_mut().enumerate() {
        r.random = Some((1000 + 31 * i as u64, 128));
    }
    sc
}

fn per_stream(streams: u32, run: u64, share: u32) -> SchedulerConfig {
    let policy = StreamPolicy::new(streams)
        .unwrap()
        .with_run(run)
        .unwrap()
        .with_share(share)
        .unwrap();
    SchedulerConfig {
        hint: HintPolicy::PerStream(policy),
        ..SchedulerConfig::preempt()
    }
}

/// The contenders of one scenario: no hint, one slot, one slot per stream (default policy).
fn contenders(name: &str, sc: &Scenario) -> [Outcome; 3] {
    let none = simulate(sc, SchedulerConfig::preempt(), Api::OneStream);
    let one = simulate(sc, SchedulerConfig::preempt_hint(), Api::OneStream);
    let streams = sc.readers.len() as u32;
    let per = simulate(
        sc,
        SchedulerConfig::preempt_hints(streams).unwrap(),
        Api::PerStream,
    );
    println!("\n{name} (think {}, rtt {}):", sc.think, sc.rtt);
    println!("| configuration | urgent faults | urgent faults per stream | waits on pages already claimed | ticks blocked per stream | ticks blocked |");
    println!("|---|---:|---|---|---|---:|");
    for (label, o) in [
        ("preempt (no hint)", &none),
        ("preempt_hint (one slot)", &one),
        ("preempt_hints (a slot per stream)", &per),
    ] {
        println!(
            "| {label} | {} | {:?} | {:?} | {:?} | {} |",
            o.urgent_total(),
            o.urgent,
            o.already_claimed,
            o.blocked,
            o.blocked_total()
        );
    }
    [none, one, per]
}

#[test]
fn i5_four_sequential_streams_fault_less_with_a_slot_each() {
    let [none, one, per] = contenders("four forward readers", &four_readers(6, 100, [false; 4]));
    assert!(
        none.urgent_total() > 250,
        "without hints most pages fault: {none:?}"
    );
    // One slot: each fault moves the one scan; a stream it left faults again when it
    // catches up. A slot each: every stream is followed by its own cursor, and the linear
    // scan takes over where a run ends.
    assert!(
        per.urgent_total() * 2 <= one.urgent_total(),
        "one slot {one:?}, a slot each {per:?}"
    );
    assert!(per.blocked_total() * 2 <= one.blocked_total());
}

#[test]
fn i5_backward_streams_fault_page_after_page_with_one_slot_not_with_bubbling() {
    let [_, one, per] = contenders(
        "two forward, two backward readers",
        &four_readers(6, 100, [false, true, false, true]),
    );
    // The one scan runs forward from each fault: a backward reader faults on most of its
    // pages. Its own cursor bubbles below its faults.
    assert!(one.urgent[1] > 100 && one.urgent[3] > 100, "{one:?}");
    assert!(per.urgent[1] <= 8 && per.urgent[3] <= 8, "{per:?}");
    assert!(per.urgent_total() * 10 <= one.urgent_total());
}

#[test]
fn i5_a_sequential_stream_keeps_its_cursor_beside_random_readers() {
    let [_, one, per] = contenders(
        "one sequential reader, three random readers",
        &one_sequential_three_random(4),
    );
    // With one slot, every random fault takes the scan away from the sequential reader.
    assert!(
        per.urgent[0] * 2 <= one.urgent[0] && per.blocked[0] * 2 <= one.blocked[0],
        "the sequential reader: one slot {one:?}, a slot each {per:?}"
    );
    // The random readers gain nothing and lose nothing (within 5%).
    let random = |o: &Outcome| o.blocked[1..].iter().sum::<u64>();
    assert!(random(&per) * 100 <= random(&one) * 105);
}

#[test]
fn link_bound_readers_lose_a_little_to_one_slot() {
    // Four readers that together need 1.33 times the link: every stream waits for the link
    // whatever the order. The one slot's scan gives the whole link to the stream that
    // faulted last; round robin gives each a quarter, and the linear scan its share.
    let [_, one, per] = contenders(
        "four forward readers, link-bound",
        &four_readers(3, 100, [false; 4]),
    );
    assert!(
        per.blocked_total() * 100 <= one.blocked_total() * 115,
        "a slot each blocks at most 15% longer: one slot {one:?}, a slot each {per:?}"
    );
}

#[test]
fn one_stream_behaves_as_the_one_slot_api() {
    // The one-stream API on a per-stream scheduler is stream 0; with a single reader, a
    // per-stream scheduler faults as the one slot does (the cursor follows it for a run, then
    // the linear scan continues from the run's end).
    let sc = Scenario {
        readers: vec![Reader {
            start: 5_000,
            len: 4096,
            backward: false,
            random: None,
        }],
        ..four_readers(6, 100, [false; 4])
    };
    let one = simulate(&sc, SchedulerConfig::preempt_hint(), Api::OneStream);
    let per = simulate(
        &sc,
        SchedulerConfig::preempt_hints(1).unwrap(),
        Api::OneStream,
    );
    let from = simulate(
        &sc,
        SchedulerConfig::preempt_hints(1).unwrap(),
        Api::PerStream,
    );
    assert_eq!(
        per, from,
        "serve/urgent_sent are stream 0's serve_from/urgent_sent_from"
    );
    assert_eq!(per, one, "one reader: the same faults as one slot");
}

/// The sweep behind `StreamPolicy`'s defaults. For each run (64 to 4096 pages) and share (4
/// to 64 cursor claims per linear step), the ticks blocked in seven scenarios (all streams;
/// the sequential reader alone beside random readers, whose own time no policy changes), and
/// the worst ratio to the best policy of each scenario ("regret"). The defaults must stay
/// within 5% of the smallest worst-case regret: a change to the algorithm that moves the
/// optimum fails here and says to retune.
#[test]
fn policy_sweep_supports_the_defaults() {
    let scenarios = [
        ("forward, think 8", four_readers(8, 100, [false; 4])),
        (
            "forward, think 6, rtt 300",
            four_readers(6, 300, [false; 4]),
        ),
        (
            "forward, link-bound (think 3)",
            four_readers(3, 100, [false; 4]),
        ),
        (
            "2 forward + 2 backward, think 6",
            four_readers(6, 100, [false, true, false, true]),
        ),
        (
            "1 sequential (counted) + 3 random, think 4",
            one_sequential_three_random(4),
        ),
        ("bursts of 128 pages, think 4", bursty_readers(4)),
        (
            "bursts of 128 pages, link-bound (think 2)",
            bursty_readers(2),
        ),
    ];
    let blocked = |i: usize, o: Outcome| {
        if i == 4 {
            o.blocked[0]
        } else {
            o.blocked_total()
        }
    };
    let runs = [64, 256, 512, 1024, 2048, 4096];
    let shares = [4, 16, 64, 128];
    let mut table = Vec::new();
    for run in runs {
        for share in shares {
            let b: Vec<u64> = scenarios
                .iter()
                .enumerate()
                .map(|(i, (_, sc))| {
                    blocked(i, simulate(sc, per_stream(4, run, share), Api::PerStream))
                })
                .collect();
            table.push(((run, share), b));
        }
    }
    let best: Vec<u64> = (0..scenarios.len())
        .map(|i| table.iter().map(|(_, b)| b[i]).min().unwrap().max(1))
        .collect();
    let regret = |b: &[u64]| {
        b.iter()
            .zip(&best)
            .map(|(&x, &m)| x as f64 / m as f64)
            .fold(0.0, f64::max)
    };
    println!("\nsweep: ticks blocked (one slot per stream, 4 streams; the first row: one slot)");
    let mut head = "| run, share |".to_string();
    for (name, _) in &scenarios {
        head += &format!(" {name} |");
    }
    println!("{head} worst / best |");
    println!("|---|{}---:|", "---:|".repeat(scenarios.len()));
    let one: Vec<u64> = scenarios
        .iter()
        .enumerate()
        .map(|(i, (_, sc))| {
            blocked(
                i,
                simulate(sc, SchedulerConfig::preempt_hint(), Api::OneStream),
            )
        })
        .collect();
    let line = |b: &[u64]| b.iter().map(u64::to_string).collect::<Vec<_>>().join(" | ");
    println!("| one slot | {} | {:.2} |", line(&one), regret(&one));
    for ((run, share), b) in &table {
        println!("| {run}, {share} | {} | {:.2} |", line(b), regret(b));
    }
    let min = table
        .iter()
        .map(|(_, b)| regret(b))
        .fold(f64::INFINITY, f64::min);
    let default = table
        .iter()
        .find(|(p, _)| *p == (StreamPolicy::DEFAULT_RUN, StreamPolicy::DEFAULT_SHARE))
        .map(|(_, b)| regret(b))
        .expect("the defaults are in the sweep");
    assert!(
        default <= min * 1.05,
        "the defaults' worst regret {default:.2} against the sweep's best {min:.2}: retune"
    );
}
