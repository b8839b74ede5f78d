//! The remove model (`pagehint-uffd`'s `UFFD_EVENT_REMOVE` handling) and its mutants.
//!
//! # What runs
//! [`remove_model`] plays the kernel's part ([`Kernel`]: a userfaultfd in missing mode with
//! `UFFD_FEATURE_EVENT_REMOVE`, on the checker's mutex and condition variable) and runs the
//! handler's two roles on the real types, as `migrate/uffd/src/handler.rs` does:
//! * the **event thread** waits for events, reads them through the gate
//!   ([`ModelGate::read_and_mark`]: the write side), marks each removed host page and claims
//!   it away from the prefetchers in the real [`PageScheduler`]'s bitmap, then serves each
//!   fault: zeros on a removed page, else the page from the file if it wins the fault's claim
//!   ([`PageScheduler::serve`], then `urgent_sent`); a copy that meets a queued event
//!   (`EAGAIN`) waits for the next read;
//! * **prefetchers** run real [`BackgroundScanner`](pagehint::scheduler::BackgroundScanner)s
//!   and copy every host page they claim from the file through
//!   [`ModelGate::copy_unless_removed`] (the read side), retrying after `EAGAIN`;
//!
//! against
//! * the **balloon** (the model's main thread): for each removed range, `madvise(DONTNEED)` as
//!   the kernel does it — queue the REMOVE event (copies now fail with `EAGAIN`), sleep until
//!   the handler reads it, let copies through again, zap the range (a new *generation* of
//!   those pages) — and then touch every removed page, which must read zeros;
//! * a **vCPU** (when the case has touches): touches pages never removed, which must read the
//!   file's data.
//!
//! # What is checked (one checker for the gate and its mutants)
//! * **R1**: no copy of file data is ever attempted into a host page in a generation after a
//!   remove (that is stale data, whether or not it lands), and a removed page reads zeros;
//! * **R2**: no page is placed twice in one generation (no `EEXIST`);
//! * **R3**: every page never removed ends up holding the file's data.
//!
//! The gate is the real `pagehint_uffd_gate::RemoveGate`, or [`GateRewrite`]: the same gate
//! rewritten on the shim, whose control passes and whose MUTANTS mark removed pages after
//! releasing the write side ([`MarkAfterUnlock`]) and copy without the read side
//! ([`CopyWithoutReadSide`]): both must fail R1.

use std::collections::VecDeque;

use pagehint::{
    BlockSpec, Claim, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served,
    UrgentRequest,
};
use pagehint_uffd_gate::RemoveGate;

use crate::sync::{thread, Arc, AtomicBool, Condvar, Mutex, Ordering, RwLock};

/// Where a placed page's contents came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The memory file (the snapshot).
    File,
    /// Zeros (`UFFDIO_ZEROPAGE`).
    Zero,
}

/// A userfaultfd event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread touched host page `0` while it was missing.
    Fault(u64),
    /// `UFFD_EVENT_REMOVE` of host pages `[0, 1)`.
    Remove(u64, u64),
}

/// The answer to a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Placed (and any thread blocked on it woken).
    Done,
    /// `EAGAIN`: an event is queued and not yet read; nothing placed.
    Retry,
    /// `EEXIST`: the page was present.
    Exists,
}

/// One copy as the kernel saw it.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    /// Host page.
    pub hp: u64,
    /// Its generation at the time (0 until its first remove; each zap adds one).
    pub generation: u32,
    /// What was copied.
    pub fill: Fill,
    /// The answer.
    pub placed: Placed,
}

struct KernelState {
    content: Vec<Option<Fill>>,
    generation: Vec<u32>,
    queue: VecDeque<Event>,
    /// `mmap_changing`: REMOVE events queued and not yet completed (copies fail meanwhile).
    changing: u32,
    removes_queued: u64,
    removes_read: u64,
    attempts: Vec<Attempt>,
    stop: bool,
}

/// The kernel's side: guest memory registered in missing mode, the event queue, and the
/// remove sequence of `madvise(MADV_DONTNEED)` (`userfaultfd_remove()`, then the zap).
///
/// Bookkeeping of the model's, on the checker's mutex and condition variable (every step is
/// one the checker schedules; blocked threads sleep instead of spinning).
pub struct Kernel {
    state: Mutex<KernelState>,
    changed: Condvar,
}

impl Kernel {
    /// `host_pages` pages, all missing.
    pub fn new(host_pages: u64) -> Self {
        let n = host_pages as usize;
        Self {
            state: Mutex::new(KernelState {
                content: vec![None; n],
                generation: vec![0; n],
                queue: VecDeque::new(),
                changing: 0,
                removes_queued: 0,
                removes_read: 0,
                attempts: Vec::new(),
                stop: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, KernelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        g: crate::sync::MutexGuard<'a, KernelState>,
    ) -> crate::sync::MutexGuard<'a, KernelState> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` of host page `hp`.
    pub fn copy(&self, hp: u64, fill: Fill) -> Placed {
        let mut s = self.lock();
        let i = hp as usize;
        let placed = if s.changing > 0 {
            Placed::Retry
        } else if s.content[i].is_some() {
            Placed::Exists
        } else {
            s.content[i] = Some(fill);
            Placed::Done
        };
        let generation = s.generation[i];
        s.attempts.push(Attempt {
            hp,
            generation,
            fill,
            placed,
        });
        drop(s);
        self.changed.notify_all();
        placed
    }

    /// `read(2)` on the descriptor: every queued event.
    pub fn read_events(&self) -> Vec<Event> {
        let mut s = self.lock();
        let events: Vec<Event> = s.queue.drain(..).collect();
        s.removes_read += events
            .iter()
            .filter(|e| matches!(e, Event::Remove(..)))
            .count() as u64;
        drop(s);
        self.changed.notify_all();
        events
    }

    /// `madvise(MADV_DONTNEED)` of host pages `[lo, hi)`.
    pub fn remove(&self, lo: u64, hi: u64) {
        let mut s = self.lock();
        s.changing += 1;
        s.queue.push_back(Event::Remove(lo, hi));
        s.removes_queued += 1;
        let me = s.removes_queued;
        self.changed.notify_all();
        while s.removes_read < me {
            s = self.wait(s);
        }
        // Read: the remover wakes and copies are let through again, before the zap (the
        // kernel's `userfaultfd_event_wait_completion` returns, then `madvise` re-takes the
        // mmap lock and zaps).
        s.changing -= 1;
        drop(s);
        self.changed.notify_all();
        let mut s = self.lock();
        for hp in lo..hi {
            s.content[hp as usize] = None;
            s.generation[hp as usize] += 1;
        }
        drop(s);
        self.changed.notify_all();
    }

    /// A guest access to host page `hp`: faults (and sleeps until it is placed) if missing.
    pub fn touch(&self, hp: u64) -> Fill {
        let mut s = self.lock();
        let i = hp as usize;
        if s.content[i].is_none() {
            s.queue.push_back(Event::Fault(hp));
            self.changed.notify_all();
        }
        loop {
            if let Some(f) = s.content[i] {
                return f;
            }
            s = self.wait(s);
        }
    }

    /// The event thread's poll: sleeps until an event is queued, or (`retrying`) until copies
    /// may succeed again. False: stopped with nothing left.
    pub fn wait_for_work(&self, retrying: bool) -> bool {
        let mut s = self.lock();
        loop {
            if !s.queue.is_empty() || (retrying && s.changing == 0) {
                return true;
            }
            if s.stop && !retrying {
                return false;
            }
            s = self.wait(s);
        }
    }

    /// A prefetcher after `EAGAIN`: sleeps until copies may succeed again.
    pub fn wait_quiet(&self) {
        let mut s = self.lock();
        while s.changing > 0 {
            s = self.wait(s);
        }
    }

    /// Ends the event thread once the queue is empty.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }
}

/// The gate between reading REMOVE events and the prefetchers' copies: the real
/// [`RemoveGate`], or [`GateRewrite`].
pub trait ModelGate: Send + Sync + 'static {
    /// A gate over `host_pages` host pages.
    fn new(host_pages: usize) -> Self;
    /// The event thread: runs `read` (which reads the events) and marks the pages of every
    /// REMOVE event, calling `newly_removed` for each page marked for the first time, all
    /// before any copy may check a mark again.
    fn read_and_mark(
        &self,
        read: &mut dyn FnMut() -> Vec<Event>,
        newly_removed: &mut dyn FnMut(u64),
    ) -> Vec<Event>;
    /// A prefetcher: runs `copy` unless `hp` is removed (`None`).
    fn copy_unless_removed(&self, hp: u64, copy: &mut dyn FnMut() -> Placed) -> Option<Placed>;
    /// The event thread: whether `hp` is removed.
    fn is_removed(&self, hp: u64) -> bool;
}

fn removed_pages(events: &[Event]) -> impl Iterator<Item = u64> + '_ {
    events.iter().flat_map(|e| match *e {
        Event::Remove(lo, hi) => lo..hi,
        Event::Fault(_) => 0..0,
    })
}

impl ModelGate for RemoveGate {
    fn new(host_pages: usize) -> Self {
        RemoveGate::new(host_pages)
    }
    fn read_and_mark(
        &self,
        read: &mut dyn FnMut() -> Vec<Event>,
        newly_removed: &mut dyn FnMut(u64),
    ) -> Vec<Event> {
        self.read_events(|ev| {
            let events = read();
            for hp in removed_pages(&events) {
                if ev.mark_removed(hp as usize) {
                    newly_removed(hp);
                }
            }
            events
        })
    }
    fn copy_unless_removed(&self, hp: u64, copy: &mut dyn FnMut() -> Placed) -> Option<Placed> {
        RemoveGate::copy_unless_removed(self, hp as usize, copy)
    }
    fn is_removed(&self, hp: u64) -> bool {
        RemoveGate::is_removed(self, hp as usize)
    }
}

/// The control: no flaw (must pass).
pub const CONTROL: u8 = 0;
/// MUTANT: marks removed pages after releasing the write side.
pub const MARK_AFTER_UNLOCK: u8 = 1;
/// MUTANT: a prefetcher checks the mark under the read side, then copies without it.
pub const COPY_WITHOUT_READ_SIDE: u8 = 2;

/// The gate rewritten on the shim, with flaw `FLAW` ([`CONTROL`], [`MARK_AFTER_UNLOCK`],
/// [`COPY_WITHOUT_READ_SIDE`]).
pub struct GateRewrite<const FLAW: u8> {
    lock: RwLock<()>,
    removed: Vec<AtomicBool>,
}

/// [`GateRewrite`] without a flaw.
pub type ControlGate = GateRewrite<CONTROL>;
/// MUTANT: marking removed pages after releasing the lock.
pub type MarkAfterUnlock = GateRewrite<MARK_AFTER_UNLOCK>;
/// MUTANT: a prefetcher copying without holding the read side.
pub type CopyWithoutReadSide = GateRewrite<COPY_WITHOUT_READ_SIDE>;

impl<const FLAW: u8> GateRewrite<FLAW> {
    fn mark(&self, hp: u64) -> bool {
        // Relaxed: as the real gate (published by the write side's release), or, in the
        // mutant, not published in time: that is the flaw.
        !self.removed[hp as usize].swap(true, Ordering::Relaxed)
    }
}

impl<const FLAW: u8> ModelGate for GateRewrite<FLAW> {
    fn new(host_pages: usize) -> Self {
        Self {
            lock: RwLock::new(()),
            removed: (0..host_pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }
    fn read_and_mark(
        &self,
        read: &mut dyn FnMut() -> Vec<Event>,
        newly_removed: &mut dyn FnMut(u64),
    ) -> Vec<Event> {
        let write = self.lock.write().unwrap_or_else(|p| p.into_inner());
        let events = read();
        if FLAW == MARK_AFTER_UNLOCK {
            drop(write);
        }
        for hp in removed_pages(&events) {
            if self.mark(hp) {
                newly_removed(hp);
            }
        }
        events
    }
    fn copy_unless_removed(&self, hp: u64, copy: &mut dyn FnMut() -> Placed) -> Option<Placed> {
        let read = self.lock.read().unwrap_or_else(|p| p.into_inner());
        // Relaxed: stored under the write side, which the read side excludes.
        let removed = self.removed[hp as usize].load(Ordering::Relaxed);
        if FLAW == COPY_WITHOUT_READ_SIDE {
            drop(read);
        }
        (!removed).then(copy)
    }
    fn is_removed(&self, hp: u64) -> bool {
        // Relaxed: only the event thread stores, and it asks.
        self.removed[hp as usize].load(Ordering::Relaxed)
    }
}

/// A case of [`remove_model`].
#[derive(Clone, Debug)]
pub struct RemoveCase {
    /// Host pages of 4 KiB, in one region.
    pub host_pages: u64,
    /// Prefetcher threads.
    pub prefetchers: usize,
    /// Whether the scheduler follows faults (the hint).
    pub hint: bool,
    /// The balloon's `madvise` calls, in order: host pages `[lo, hi)`.
    pub removes: Vec<(u64, u64)>,
    /// The vCPU's accesses, in order (pages no remove covers); empty: no vCPU thread.
    pub touches: Vec<u64>,
}

impl RemoveCase {
    fn removed(&self, hp: u64) -> bool {
        self.removes.iter().any(|&(lo, hi)| (lo..hi).contains(&hp))
    }
}

struct Handler<G> {
    gate: G,
    sched: PageScheduler,
    kernel: Kernel,
}

impl<G: ModelGate> Handler<G> {
    fn prefetch(&self, scanner: pagehint::scheduler::BackgroundScanner<'_>) {
        for claim in scanner {
            for hp in claim.host_pages() {
                loop {
                    let copied = self.gate.copy_unless_removed(hp.first_page, &mut || {
                        self.kernel.copy(hp.first_page, Fill::File)
                    });
                    match copied {
                        Some(Placed::Retry) => self.kernel.wait_quiet(),
                        None | Some(Placed::Done | Placed::Exists) => break,
                    }
                }
            }
        }
    }

    fn events(&self) {
        let mut pending: Vec<(u64, Option<Claim>)> = Vec::new();
        while self.kernel.wait_for_work(!pending.is_empty()) {
            let events = self
                .gate
                .read_and_mark(&mut || self.kernel.read_events(), &mut |hp| {
                    // Claimed away: no prefetcher loads it (the handler's `mark_removed`).
                    let c = self
                        .sched
                        .bitmap()
                        .claim_host_page(PageLocation::new(0, hp))
                        .expect("a page of the layout");
                    let _ = c.into_claim();
                });
            for e in events {
                let Event::Fault(hp) = e else { continue };
                if self.gate.is_removed(hp) {
                    pending.push((hp, None));
                    continue;
                }
                match self.sched.serve(UrgentRequest::new(0, hp * 4096, 4096)) {
                    Ok(Served::Send(c)) => pending.push((hp, Some(c))),
                    Ok(_) => {} // a prefetcher owns it: its copy wakes the vCPU
                    Err(e) => panic!("a fault outside the layout: {e}"),
                }
            }
            pending.retain(|(hp, claim)| {
                let fill = if self.gate.is_removed(*hp) {
                    Fill::Zero
                } else {
                    Fill::File
                };
                match self.kernel.copy(*hp, fill) {
                    Placed::Retry => true,
                    Placed::Done | Placed::Exists => {
                        if let Some(c) = claim {
                            let _ = self.sched.urgent_sent(c);
                        }
                        false
                    }
                }
            });
        }
    }
}

/// Runs `case` with gate `G` and checks R1–R3 (module docs); panics with the invariant's name.
pub fn remove_model<G: ModelGate>(case: &RemoveCase) {
    let layout = RamLayout::new(4096, [BlockSpec::new("ram", case.host_pages * 4096, 4096)])
        .expect("a small layout");
    let config = if case.hint {
        SchedulerConfig::preempt_hint()
    } else {
        SchedulerConfig::preempt()
    };
    let sched = PageScheduler::new(layout, config).expect("a small bitmap");
    sched.bitmap().mark_all(); // nothing loaded yet
    let h = Arc::new(Handler {
        gate: G::new(case.host_pages as usize),
        sched,
        kernel: Kernel::new(case.host_pages),
    });
    let events = {
        let h = Arc::clone(&h);
        thread::spawn(move || h.events())
    };
    let prefetchers: Vec<_> = (0..case.prefetchers)
        .map(|i| {
            let h = Arc::clone(&h);
            let n = case.prefetchers;
            thread::spawn(move || {
                h.prefetch(h.sched.background_scanners(n).swap_remove(i));
            })
        })
        .collect();
    let vcpu = (!case.touches.is_empty()).then(|| {
        let h = Arc::clone(&h);
        let touches = case.touches.clone();
        thread::spawn(move || {
            touches
                .iter()
                .map(|&hp| (hp, h.kernel.touch(hp)))
                .collect::<Vec<_>>()
        })
    });
    // The balloon.
    let mut read = Vec::new();
    for &(lo, hi) in &case.removes {
        h.kernel.remove(lo, hi);
        for hp in lo..hi {
            read.push((hp, h.kernel.touch(hp)));
        }
    }
    let vcpu_read = vcpu.map(|t| t.join().expect("vCPU")).unwrap_or_default();
    for p in prefetchers {
        p.join().expect("prefetcher");
    }
    h.kernel.stop();
    events.join().expect("event thread");

    let s = h.kernel.lock();
    for a in &s.attempts {
        assert!(
            !(a.fill == Fill::File && a.generation > 0),
            "R1: file data copied into host page {} after its remove (generation {}, {:?})",
            a.hp,
            a.generation,
            a.placed
        );
    }
    for &(hp, fill) in &read {
        assert_eq!(
            fill,
            Fill::Zero,
            "R1: removed host page {hp} read {fill:?} data"
        );
    }
    for a in &s.attempts {
        assert!(
            a.placed != Placed::Exists,
            "R2: host page {} placed twice in generation {} (second: {:?})",
            a.hp,
            a.generation,
            a.fill
        );
    }
    for hp in (0..case.host_pages).filter(|&hp| !case.removed(hp)) {
        assert_eq!(
            s.content[hp as usize],
            Some(Fill::File),
            "R3: host page {hp}, never removed, does not hold the file's data"
        );
    }
    for &(hp, fill) in &vcpu_read {
        assert_eq!(
            fill,
            Fill::File,
            "R3: the vCPU read {fill:?} at host page {hp}"
        );
    }
}
