//! Urgent requests that overtake the background copy: deliberate duplicates at the
//! destination ([`pagehint::CopyLedger`]) and their mutants.
//!
//! In postcopy, a request for a host page the background path has already claimed
//! (`Served::AlreadyClaimed`) is answered by sending the page again on the urgent channel
//! (`pagehint-migrate --resend on`). The destination's two receivers (background and urgent
//! channel) each hand every copy they receive to the ledger, which says: place the first
//! copy of a page, drop the other kind's copy after it (a deliberate duplicate: identical,
//! since the source is stopped), and hand a second copy of the same kind to the placement
//! (a real double placement, which the placement refuses and reports). Placement is modelled
//! as the destination's software path does it (the page's contents, then its present bit
//! with `Release`), where nothing but the ledger keeps two placers apart.
//!
//! The guest waits for its page (`Acquire` on the present bit), reads it, and writes it.
//! Checked, after every thread has been joined:
//! * **I1** — each page that came is placed exactly once ("placed twice");
//! * **overtake-stale** — the guest's write is what the page holds at the end: no copy,
//!   dropped or late, overwrote it; and the guest read the source's contents;
//! * **overtake-lost** — every requested page was placed: a request does not wait forever.
//!
//! Two models:
//! * [`duplicate_pair_model`] (loom, exhaustive): one host page, its background copy and
//!   its urgent resend arriving on two receiver threads while the guest touches the page;
//! * [`overtake_model`] (shuttle, bigger): the real [`PageScheduler`] in preempt mode, a
//!   background sender and an urgent server (which resends what the background path already
//!   claimed) feeding two channels, two receivers and a guest requesting pages.
//!
//! Subjects ([`Gate`]): the real [`CopyLedger`] (must pass) and [`FlawedGate`] rewrites,
//! the flaw a const parameter ([`ControlGate`], no flaw, must pass too):
//! * MUTANT [`PlaceEachKind`]: the first copy *of each kind* is placed — a duplicate placed
//!   twice (I1);
//! * MUTANT [`DropStillCopies`]: the duplicate is counted as dropped but its bytes are still
//!   copied into the page — a stale copy overwriting the guest's write (overtake-stale);
//! * MUTANT [`ExpectResend`]: the background copy of a requested page is dropped in the
//!   belief that the resend will place it, and the resend is dropped when the background
//!   copy came first — nobody places it: the request waits forever (overtake-lost).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use pagehint::{
    Arrival, ClaimBatch, CopyKind, CopyLedger, PageScheduler, RamLayout, SchedulerConfig, Served,
    UrgentRequest,
};

use crate::sync::{thread, Arc, AtomicU64, ContentWord, Mutex, Ordering};

/// What decides, per copy of a host page, whether it is placed.
pub trait Gate: Send + Sync + 'static {
    /// A gate for `host_pages` host pages, none come.
    fn with_pages(host_pages: u64) -> Self;
    /// A copy of `kind` of host page `hp` came: what to do with it.
    fn arrive(&self, hp: u64, kind: CopyKind) -> Arrival;
    /// Whether a dropped duplicate's bytes are copied into the page all the same (a flaw).
    fn copies_dropped(&self) -> bool {
        false
    }
}

impl Gate for CopyLedger {
    fn with_pages(host_pages: u64) -> Self {
        CopyLedger::new(host_pages)
    }
    fn arrive(&self, hp: u64, kind: CopyKind) -> Arrival {
        CopyLedger::arrive(self, hp, kind)
    }
}

/// A rewrite of the ledger (one word of bits per page) with flaw `FLAW`.
pub struct FlawedGate<const FLAW: u8> {
    bits: Vec<AtomicU64>,
}

/// The rewrite without a flaw (must pass, like the real ledger).
pub type ControlGate = FlawedGate<0>;
/// MUTANT: the first copy of each kind is placed (a duplicate placed twice).
pub type PlaceEachKind = FlawedGate<1>;
/// MUTANT: a dropped duplicate's bytes are still copied into the page.
pub type DropStillCopies = FlawedGate<2>;
/// MUTANT: the background copy is dropped when a resend is expected; the resend is dropped
/// when the background copy came first.
pub type ExpectResend = FlawedGate<3>;

fn bit(kind: CopyKind) -> u64 {
    match kind {
        CopyKind::Sent => 1,
        CopyKind::Resent => 2,
    }
}

impl<const FLAW: u8> Gate for FlawedGate<FLAW> {
    fn with_pages(host_pages: u64) -> Self {
        Self {
            bits: (0..host_pages).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn arrive(&self, hp: u64, kind: CopyKind) -> Arrival {
        let b = bit(kind);
        // Relaxed: as the real ledger (one read-modify-write per copy decides).
        let prev = self.bits[hp as usize].fetch_or(b, Ordering::Relaxed);
        match FLAW {
            1 if prev & b == 0 => Arrival::Place,
            // Requests in the models are for pages whose resend is expected: the background
            // copy "leaves it to the resend".
            3 if kind == CopyKind::Sent && prev == 0 => Arrival::Duplicate,
            3 if kind == CopyKind::Resent && prev != 0 => Arrival::Duplicate,
            _ if prev == 0 => Arrival::Place,
            _ if prev & b == 0 => Arrival::Duplicate,
            _ => Arrival::Again,
        }
    }
    fn copies_dropped(&self) -> bool {
        FLAW == 2
    }
}

/// The source's contents of host page `hp` (the source is stopped: every copy carries it).
fn source_value(hp: u64) -> u64 {
    1000 + hp
}

/// What the guest writes into host page `hp` once it has it.
fn guest_value(hp: u64) -> u64 {
    2000 + hp
}

/// Destination memory: per host page, its contents, its present bit, and how many times it
/// was placed (bookkeeping the checkers do not see).
struct DestPages {
    content: Vec<ContentWord>,
    present: Vec<AtomicU64>,
    placed: Vec<StdAtomicU64>,
    written: Vec<StdAtomicU64>,
}

impl DestPages {
    fn new(n: u64) -> Self {
        Self {
            content: (0..n).map(|_| ContentWord::new(0)).collect(),
            present: (0..n).map(|_| AtomicU64::new(0)).collect(),
            placed: (0..n).map(|_| StdAtomicU64::new(0)).collect(),
            written: (0..n).map(|_| StdAtomicU64::new(0)).collect(),
        }
    }

    /// A receiver applies a copy of `hp` as `gate` says.
    fn apply<G: Gate>(&self, gate: &G, hp: u64, kind: CopyKind) {
        let i = hp as usize;
        match gate.arrive(hp, kind) {
            Arrival::Place | Arrival::Again => {
                // Bookkeeping: counted before the contents, so a second placer is caught
                // whatever the interleaving.
                let n = self.placed[i].fetch_add(1, StdOrdering::Relaxed) + 1;
                assert!(n == 1, "I1: host page {hp} placed twice ({kind:?} copy)");
                // Relaxed: published by the Release store of the present bit.
                self.content[i].store(source_value(hp), Ordering::Relaxed);
                // Release: the contents before the present bit (the software fault path).
                self.present[i].store(1, Ordering::Release);
            }
            Arrival::Duplicate => {
                if gate.copies_dropped() {
                    // The flaw: the dropped copy's bytes land in the page anyway.
                    self.content[i].store(source_value(hp), Ordering::Relaxed);
                }
            }
        }
    }

    /// The guest's access to `hp` once, if it is present: reads it (it must be the source's
    /// contents or the guest's own write) and writes its own value. Whether it was present.
    fn guest_touch(&self, hp: u64) -> bool {
        let i = hp as usize;
        // Acquire: pairs with the placement's Release; the contents are visible.
        if self.present[i].load(Ordering::Acquire) == 0 {
            return false;
        }
        // Relaxed: ordered after the placement by the Acquire above.
        let v = self.content[i].load(Ordering::Relaxed);
        assert!(
            v == source_value(hp) || v == guest_value(hp),
            "overtake-stale: the guest read {v} from host page {hp}"
        );
        // Relaxed: after placement the guest is the page's one writer; checked after joins.
        self.content[i].store(guest_value(hp), Ordering::Relaxed);
        // Relaxed: bookkeeping, read after the guest has been joined.
        self.written[i].store(1, StdOrdering::Relaxed);
        true
    }

    /// The checks at the end (every thread joined): each page in `came` placed once, each
    /// in `requested` placed, and a page the guest wrote holds the guest's write.
    fn check(&self, came: &[u64], requested: &[u64]) {
        for &hp in requested {
            assert!(
                // Relaxed: bookkeeping, read after every thread has been joined.
                self.placed[hp as usize].load(StdOrdering::Relaxed) == 1,
                "overtake-lost: requested host page {hp} was never placed (the request waits forever)"
            );
        }
        for &hp in came {
            let i = hp as usize;
            // Relaxed: bookkeeping, read after every thread has been joined.
            let n = self.placed[i].load(StdOrdering::Relaxed);
            assert!(n <= 1, "I1: host page {hp} placed {n} times");
            // Relaxed: bookkeeping, read after every thread has been joined.
            if self.written[i].load(StdOrdering::Relaxed) == 1 {
                // Relaxed: every writer has been joined.
                let v = self.content[i].load(Ordering::Relaxed);
                assert!(
                    v == guest_value(hp),
                    "overtake-stale: host page {hp} holds {v} after the guest wrote {}: a copy overwrote it",
                    guest_value(hp)
                );
            }
        }
    }
}

/// loom: one host page whose background copy and urgent resend arrive on two receiver
/// threads while the guest touches the page once (see the module).
pub fn duplicate_pair_model<G: Gate>() {
    let gate = Arc::new(G::with_pages(1));
    let mem = Arc::new(DestPages::new(1));
    let receivers: Vec<_> = [CopyKind::Sent, CopyKind::Resent]
        .into_iter()
        .map(|kind| {
            let (gate, mem) = (Arc::clone(&gate), Arc::clone(&mem));
            thread::spawn(move || mem.apply(&*gate, 0, kind))
        })
        .collect();
    let guest = {
        let mem = Arc::clone(&mem);
        thread::spawn(move || {
            mem.guest_touch(0);
        })
    };
    for r in receivers {
        r.join().expect("receiver");
    }
    guest.join().expect("guest");
    // The guest's wait ends once the page is in: it touches it now if it had not (a page
    // it wrote is left as it is, for the check).
    if mem.written[0].load(StdOrdering::Relaxed) == 0 {
        mem.guest_touch(0);
    }
    mem.check(&[0], &[0]);
}

/// A case of [`overtake_model`]: one block of `pages` target pages (4 KiB host pages), all
/// dirty; background claims of `batch`; the guest requests `requests` in order.
#[derive(Clone, Debug)]
pub struct OvertakeCase {
    /// Target pages (= host pages).
    pub pages: u64,
    /// Background claim batch.
    pub batch: u64,
    /// Pages the guest faults on, in order.
    pub requests: Vec<u64>,
}

type Channel = Arc<Mutex<VecDeque<(u64, CopyKind)>>>;

/// shuttle: the real scheduler in preempt mode behind two channels (see the module).
pub fn overtake_model<G: Gate>(case: &OvertakeCase) {
    let layout = RamLayout::single("ram", case.pages * 4096, 4096).expect("layout");
    let config =
        SchedulerConfig::preempt().with_batch(ClaimBatch::pages(case.batch).expect("batch"));
    let sched = Arc::new(PageScheduler::new(layout, config).expect("scheduler"));
    sched.bitmap().mark_all();
    let gate = Arc::new(G::with_pages(case.pages));
    let mem = Arc::new(DestPages::new(case.pages));
    let bg: Channel = Arc::new(Mutex::new(VecDeque::new()));
    let urgent: Channel = Arc::new(Mutex::new(VecDeque::new()));
    let requests: Arc<Mutex<VecDeque<u64>>> = Arc::new(Mutex::new(VecDeque::new()));
    // Flags and counters of the model's plumbing (not the subject): SeqCst, so that the
    // guest's "it will never come" is exact on std threads too.
    let bg_done = Arc::new(AtomicU64::new(0));
    let guest_done = Arc::new(AtomicU64::new(0));
    let urgent_done = Arc::new(AtomicU64::new(0));
    let bg_receiver_done = Arc::new(AtomicU64::new(0));
    // Requests served, urgent copies pushed, urgent copies applied.
    let progress = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let sender = {
        let (sched, bg, bg_done) = (Arc::clone(&sched), Arc::clone(&bg), Arc::clone(&bg_done));
        thread::spawn(move || {
            let mut scanner = sched.background();
            while let Some(claim) = scanner.next_claim() {
                let mut q = bg.lock().expect("bg");
                q.extend(claim.host_pages().map(|hp| (hp.first_page, CopyKind::Sent)));
            }
            // SeqCst: model plumbing (see above).
            bg_done.store(1, Ordering::SeqCst);
        })
    };
    let server = {
        let (sched, urgent, requests) = (
            Arc::clone(&sched),
            Arc::clone(&urgent),
            Arc::clone(&requests),
        );
        let (guest_done, urgent_done) = (Arc::clone(&guest_done), Arc::clone(&urgent_done));
        let progress = Arc::clone(&progress);
        thread::spawn(move || loop {
            let next = requests.lock().expect("requests").pop_front();
            let Some(page) = next else {
                // SeqCst: model plumbing (see above).
                if guest_done.load(Ordering::SeqCst) != 0
                    && requests.lock().expect("requests").is_empty()
                {
                    // SeqCst: model plumbing (see above).
                    urgent_done.store(1, Ordering::SeqCst);
                    return;
                }
                thread::yield_now();
                continue;
            };
            let frame = UrgentRequest::new(0, page * 4096, 4096).encode();
            match sched.serve_frame(&frame).expect("valid request") {
                Served::Send(claim) => {
                    let mut q = urgent.lock().expect("urgent");
                    q.extend(claim.host_pages().map(|hp| (hp.first_page, CopyKind::Sent)));
                    // SeqCst: model plumbing (see above).
                    progress[1].fetch_add(claim.host_page_count().into(), Ordering::SeqCst);
                    drop(q);
                    let _ = sched.urgent_sent(&claim);
                }
                Served::AlreadyClaimed(hp) => {
                    // The resend: the background copy may not have arrived yet.
                    urgent
                        .lock()
                        .expect("urgent")
                        .push_back((hp.first_page, CopyKind::Resent));
                    // SeqCst: model plumbing (see above).
                    progress[1].fetch_add(1, Ordering::SeqCst);
                }
                Served::Queued(_) => unreachable!("preempt mode queues nothing"),
            }
            // SeqCst: model plumbing (see above).
            progress[0].fetch_add(1, Ordering::SeqCst);
        })
    };
    // A receiver: applies its channel's copies until its sender is done and it is empty;
    // then raises `ended`; counts each applied copy in `applied` (if any).
    let receiver = |chan: Channel,
                    done: Arc<AtomicU64>,
                    ended: Option<Arc<AtomicU64>>,
                    applied: Option<Arc<[AtomicU64; 3]>>| {
        let (gate, mem) = (Arc::clone(&gate), Arc::clone(&mem));
        thread::spawn(move || loop {
            let next = chan.lock().expect("channel").pop_front();
            match next {
                Some((hp, kind)) => {
                    mem.apply(&*gate, hp, kind);
                    if let Some(a) = &applied {
                        // SeqCst: model plumbing (see above).
                        a[2].fetch_add(1, Ordering::SeqCst);
                    }
                }
                // SeqCst: model plumbing (see above).
                None if done.load(Ordering::SeqCst) != 0
                    && chan.lock().expect("channel").is_empty() =>
                {
                    if let Some(e) = &ended {
                        // SeqCst: model plumbing (see above).
                        e.store(1, Ordering::SeqCst);
                    }
                    return;
                }
                None => thread::yield_now(),
            }
        })
    };
    let bg_receiver = receiver(
        Arc::clone(&bg),
        Arc::clone(&bg_done),
        Some(Arc::clone(&bg_receiver_done)),
        None,
    );
    let urgent_receiver = receiver(
        Arc::clone(&urgent),
        Arc::clone(&urgent_done),
        None,
        Some(Arc::clone(&progress)),
    );
    let guest = {
        let (mem, requests, guest_done) = (
            Arc::clone(&mem),
            Arc::clone(&requests),
            Arc::clone(&guest_done),
        );
        let wanted = case.requests.clone();
        let (bg_receiver_done, progress) = (Arc::clone(&bg_receiver_done), Arc::clone(&progress));
        thread::spawn(move || {
            let mut asked = 0;
            for hp in wanted {
                if mem.guest_touch(hp) {
                    continue;
                }
                requests.lock().expect("requests").push_back(hp);
                asked += 1;
                // Wait for the page. It will never come once the background channel is
                // drained and every request was served and its urgent copy applied.
                while !mem.guest_touch(hp) {
                    // SeqCst (all three): model plumbing (see above).
                    if bg_receiver_done.load(Ordering::SeqCst) == 1
                        && progress[0].load(Ordering::SeqCst) == asked
                        && progress[2].load(Ordering::SeqCst) == progress[1].load(Ordering::SeqCst)
                    {
                        // One last look: the page may have been placed meanwhile.
                        mem.guest_touch(hp);
                        break;
                    }
                    thread::yield_now();
                }
            }
            // SeqCst: model plumbing (see above).
            guest_done.store(1, Ordering::SeqCst);
        })
    };
    guest.join().expect("guest");
    server.join().expect("server");
    sender.join().expect("sender");
    bg_receiver.join().expect("bg receiver");
    urgent_receiver.join().expect("urgent receiver");
    let all: Vec<u64> = (0..case.pages).collect();
    mem.check(&all, &case.requests);
    for hp in all {
        assert!(
            // Relaxed: bookkeeping, read after every thread has been joined.
            mem.placed[hp as usize].load(StdOrdering::Relaxed) == 1,
            "overtake-lost: host page {hp} was never placed"
        );
    }
}
