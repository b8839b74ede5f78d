//! The page scheduler: a background scanner and an urgent path over one dirty bitmap.
//!
//! # Protocol
//! * **Urgent path** (the return-path thread): [`PageScheduler::serve`] validates a page
//!   request and claims the whole host page that contains it. If the claim wins, the caller
//!   sends that host page on the urgent channel and then calls [`PageScheduler::urgent_sent`],
//!   which offers the location right after it as a hint (set-if-empty). If the claim loses,
//!   the page is already on its way (or sent) on the background channel. In vanilla mode the
//!   request is queued for the background path instead.
//! * **Background path**: a [`BackgroundScanner`] takes the pending hint (or, in vanilla mode,
//!   a queued request whose page is still dirty) before each step and jumps there; it then
//!   finds the next host page that may be dirty, wrapping across blocks, and claims the
//!   aligned chunk of [`ClaimBatch`] target pages (whole host pages) around it.
//!
//! # Invariants
//! * **I1/I2** come from the bitmap: each dirty bit goes to one claim, claims hold whole host
//!   pages, and both paths claim through it.
//! * **I3 no false completion**: the scanner counts the pages it has verified clean
//!   *contiguously* since its last jump; a jump (hint or queued request) restarts the count.
//!   It reports the round complete only when that count covers the whole layout. In postcopy
//!   nothing re-dirties a page, and the urgent path only clears bits, so a verified page stays
//!   clean; hence "done" means no page is dirty, whatever hints were followed. (QEMU's scan
//!   compares against its position before the hint, and can report "all clean" early.)
//!   Precisely, "dirty" means *unclaimed*: when the scan ends, a wide host page whose summary
//!   election the urgent path has just won may still show page bits until that claim's word
//!   swaps finish; it is owned and will be sent, not lost (Spin's `I3BITS`, proofs/README.md).
//! * **I5**: every jump follows an urgent send (or a queued request) of a distinct dirty host
//!   page, so in postcopy there are finitely many jumps and the round ends.
//! * **I6**: a hint only moves the scan position; any position is valid input.
//!
//! # Several background senders
//! Like QEMU's multifd channels (which QEMU cannot use in postcopy), any number of
//! [`BackgroundScanner`]s may run over one scheduler, each on its own thread and channel;
//! [`PageScheduler::background_scanners`] starts them at evenly spaced positions of the
//! layout. Each page still goes to exactly one sender, because every claim goes through the
//! bitmap (I1/I2). The hint cell stays a single slot: a hint is taken by whichever scanner
//! polls first (the take is a swap, so no two scanners follow the same hint: I4), and that
//! scanner continues after the faulted page while the others keep their own positions. Each
//! scanner's "done" keeps its meaning (I3): the scanner verified every page clean since its
//! last jump, and in postcopy no path ever sets a bit, so no page is dirty, whichever scanner
//! or urgent path cleared it. "Done" means every page is *claimed*; the migration has sent
//! everything once every scanner reported done and every sender finished sending its claims.
//!
//! # Several fault streams
//! With [`HintPolicy::PerStream`] there is one hint slot per stream (a vCPU) instead of one
//! for the VM: requests name their stream ([`PageScheduler::serve_from`],
//! [`PageScheduler::urgent_sent_from`]; [`serve`](PageScheduler::serve) and
//! [`urgent_sent`](PageScheduler::urgent_sent) are stream 0's), and each scanner follows every
//! stream with its own cursor, in turn, beside its linear scan; a spent forward run hands its
//! edge to the linear scan as a jump (its count restarts). The protocol and how I3 and I5 keep
//! holding are in [`crate::cursors`].
//!
//! # Postcopy recovery
//! After a broken connection, QEMU rebuilds the source's dirty bitmap from the destination's
//! bitmap of received pages ("dirty = not received") and resumes. [`PageScheduler::recover_block`]
//! does that for one block. It takes `&mut self`: no scanner (which borrows the scheduler)
//! and no urgent call can run meanwhile, checked by the compiler; a scheduler shared through
//! an `Arc` is recovered with [`PageScheduler::recover_shared`], which refuses with
//! [`RecoveryError::SendersActive`] while another handle exists. A bitmap is driven by one
//! scheduler at a time ([`PageScheduler::with_bitmap`] refuses a second one), so no sender of
//! another scheduler can be claiming from it either.
//!
//! # Claim batch: throughput against urgent latency
//! One atomic per 4 KiB page costs about five times QEMU's plain bit operations under its
//! lock; one atomic per 64-page word is almost free. The background path therefore claims a
//! chunk of [`ClaimBatch`] target pages (1 to 64, rounded up to whole host pages) with one
//! atomic. The price: an urgent request for a page that the background path has claimed but
//! not yet sent waits for that chunk to be sent (up to `batch × page size` of link time:
//! 64 KiB, about 52 µs at 10 Gbit/s, for the default of 16 pages).

// Several fault streams: `serve_from`, `urgent_sent_from`, the scanner's cursors.
mod per_stream;

use std::fmt;

use crossbeam_utils::CachePadded;

use crate::bitmap::{Claim, DirtyBitmap, DirtyLogError, Found, LayoutMismatch};
use crate::cursors::Cursors;
use crate::hint::{Offer, PageHint};
use crate::layout::{HostPage, LocationError, PageLocation, RamLayout};
use crate::request::{RequestError, UrgentRequest};
use crate::stats::{bump, BackgroundCounters, LocalCounts, SchedulerStats, UrgentCounters};
use crate::streams::{HintSlots, StreamPolicy, StreamPolicyError};
use crate::sync::{Arc, Queue};

mod range;
pub use range::ServeRange;

/// How page requests reach the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One channel: requests are queued, and the background path jumps to them (QEMU's
    /// vanilla postcopy).
    Vanilla,
    /// A separate urgent channel: the return-path thread claims and sends requested pages
    /// itself (QEMU's postcopy-preempt).
    Preempt,
}

/// Whether the urgent path leaves hints for the background path (preempt mode only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintPolicy {
    /// No hints: the background scan ignores faults.
    Off,
    /// After each urgent send, offer the next location if no hint is pending (QEMU's
    /// page-hint patch).
    SetIfEmpty,
    /// One hint slot per fault stream (a vCPU, or any id the caller chooses below the count),
    /// each set-if-empty; the background scan follows every stream with its own cursor for a
    /// bounded run, in turn, beside its linear scan ([`crate::cursors`]). Requests name their
    /// stream: [`PageScheduler::serve_from`], [`PageScheduler::urgent_sent_from`].
    PerStream(StreamPolicy),
}

/// How many target pages one background claim takes (a power of two, 1 to 64), rounded up to
/// whole host pages. See the [module docs](self) for the trade-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimBatch {
    shift: u32,
}

/// A [`ClaimBatch`] that is not a power of two between 1 and 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchError(pub u64);

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "claim batch {} is not a power of two from 1 to 64 pages",
            self.0
        )
    }
}

impl std::error::Error for BatchError {}

impl ClaimBatch {
    /// One host page per claim (QEMU's granularity; highest atomic cost per page).
    pub const HOST_PAGE: Self = Self { shift: 0 };
    /// A whole 64-page word per claim (cheapest; longest wait for an overlapping request).
    pub const WORD: Self = Self { shift: 6 };
    /// The default, 16 target pages.
    pub const DEFAULT: Self = Self { shift: 4 };

    /// A batch of `pages` target pages.
    ///
    /// ```
    /// use pagehint::ClaimBatch;
    /// assert_eq!(ClaimBatch::pages(64)?, ClaimBatch::WORD);
    /// assert!(ClaimBatch::pages(48).is_err());
    /// # Ok::<(), pagehint::scheduler::BatchError>(())
    /// ```
    pub fn pages(pages: u64) -> Result<Self, BatchError> {
        if pages == 0 || pages > 64 || !pages.is_power_of_two() {
            return Err(BatchError(pages));
        }
        Ok(Self {
            shift: pages.trailing_zeros(),
        })
    }

    /// Target pages per claim (before rounding up to whole host pages).
    pub fn get(self) -> u64 {
        1 << self.shift
    }
}

impl Default for ClaimBatch {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How a [`PageScheduler`] behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Vanilla or preempt.
    pub mode: Mode,
    /// Hints on or off (ignored in vanilla mode, where requests move the scan instead).
    pub hint: HintPolicy,
    /// Target pages per background claim.
    pub batch: ClaimBatch,
}

impl SchedulerConfig {
    /// QEMU's vanilla postcopy.
    pub const fn vanilla() -> Self {
        Self {
            mode: Mode::Vanilla,
            hint: HintPolicy::Off,
            batch: ClaimBatch::DEFAULT,
        }
    }
    /// Postcopy-preempt without the hint (QEMU before its page-hint patch).
    pub const fn preempt() -> Self {
        Self {
            mode: Mode::Preempt,
            hint: HintPolicy::Off,
            batch: ClaimBatch::DEFAULT,
        }
    }
    /// Postcopy-preempt with the spatial-locality hint (QEMU 10.1's page-hint patch).
    pub const fn preempt_hint() -> Self {
        Self {
            mode: Mode::Preempt,
            hint: HintPolicy::SetIfEmpty,
            batch: ClaimBatch::DEFAULT,
        }
    }
    /// Postcopy-preempt following `streams` fault streams, one hint slot each, with the
    /// default [`StreamPolicy`] (see [`HintPolicy::PerStream`]).
    ///
    /// ```
    /// use pagehint::SchedulerConfig;
    /// assert_eq!(SchedulerConfig::preempt_hints(4)?.streams(), 4);
    /// assert!(SchedulerConfig::preempt_hints(0).is_err());
    /// # Ok::<(), pagehint::streams::StreamPolicyError>(())
    /// ```
    pub fn preempt_hints(streams: u32) -> Result<Self, StreamPolicyError> {
        Ok(Self {
            hint: HintPolicy::PerStream(StreamPolicy::new(streams)?),
            ..Self::preempt()
        })
    }
    /// The same configuration with another claim batch.
    pub const fn with_batch(self, batch: ClaimBatch) -> Self {
        Self { batch, ..self }
    }
    /// Fault streams, hence hint slots: 1 unless the hint policy is per stream.
    pub fn streams(&self) -> u32 {
        match self.hint {
            HintPolicy::PerStream(p) => p.streams(),
            HintPolicy::Off | HintPolicy::SetIfEmpty => 1,
        }
    }
    fn hints(&self) -> bool {
        self.mode == Mode::Preempt && self.hint != HintPolicy::Off
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::preempt_hint()
    }
}

/// What the urgent path does with a valid request.
///
/// `#[must_use]`: [`Served::Send`] owns a [`Claim`] (see [A claim is an obligation](Claim#a-claim-is-an-obligation)).
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # use pagehint::{PageScheduler, RamLayout, SchedulerConfig, UrgentRequest};
/// # let sched = PageScheduler::new(RamLayout::single("m", 1 << 20, 4096)?, SchedulerConfig::preempt())?;
/// sched.serve(UrgentRequest::new(0, 0, 4096))?; // error: unused `Served`
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "Served::Send owns pages that have left the dirty bitmap: send them and call urgent_sent, or they are lost"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Preempt: the caller now owns these host pages; send them on the urgent channel, then
    /// call [`PageScheduler::urgent_sent`].
    Send(Claim),
    /// Preempt: the host page was already claimed (on its way on the background channel, or
    /// sent); nothing to do.
    AlreadyClaimed(HostPage),
    /// Vanilla: queued for the background path.
    Queued(HostPage),
}

/// Layout, dirty bitmap, hint and request queue, shared by reference between the urgent
/// (return-path) thread and the background sender; no mutex.
///
/// ```
/// use pagehint::{PageScheduler, RamLayout, SchedulerConfig, Served, UrgentRequest};
/// let layout = RamLayout::single("pc.ram", 64 << 20, 4096)?;
/// let sched = PageScheduler::new(layout, SchedulerConfig::preempt_hint())?;
/// sched.bitmap().mark_all(); // postcopy starts with every page to send
/// std::thread::scope(|s| {
///     s.spawn(|| {
///         // return path: serve a fault at 1 MiB
///         if let Ok(Served::Send(claim)) = sched.serve(UrgentRequest::new(0, 1 << 20, 4096)) {
///             /* send claim.host_pages() on the urgent channel */
///             sched.urgent_sent(&claim);
///         }
///     });
///     s.spawn(|| {
///         for claim in sched.background() {
///             /* send claim.host_pages() on the background channel */
///             let _ = claim;
///         }
///     });
/// });
/// assert_eq!(sched.bitmap().dirty_pages(), 0);
/// let stats = sched.stats();
/// assert_eq!(stats.urgent_pages + stats.background_pages, 16384); // each page exactly once
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PageScheduler {
    layout: RamLayout,
    bitmap: Arc<DirtyBitmap>,
    /// One slot per stream; dereferences to stream 0's, the one-stream API's hint.
    hint: HintSlots,
    queue: Queue<PageLocation>,
    config: SchedulerConfig,
    urgent: CachePadded<UrgentCounters>,
    background: CachePadded<BackgroundCounters>,
}

impl PageScheduler {
    /// A scheduler over a clean bitmap for `layout`.
    pub fn new(layout: RamLayout, config: SchedulerConfig) -> std::io::Result<Self> {
        let bitmap = Arc::new(DirtyBitmap::new(&layout)?);
        // A fresh bitmap is driven by no one: attaching cannot fail.
        let _ = bitmap.attach();
        Ok(Self::assemble(layout, bitmap, config))
    }

    /// A scheduler over an existing, shared bitmap: the one a VMM's guest memory and dirty-log
    /// sync have been marking (see [`crate::vmm`]). The bitmap keeps its dirty bits.
    ///
    /// Refused if the bitmap was not built for `layout`, or if another scheduler still
    /// drives it (one scheduler per bitmap: what makes [`recover_block`](Self::recover_block)
    /// safe). The bitmap is free again when this scheduler is dropped.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pagehint::{scheduler::AttachError, DirtyBitmap, PageScheduler, RamLayout, SchedulerConfig};
    /// let layout = RamLayout::single("pc.ram", 16 << 20, 4096)?;
    /// let bitmap = Arc::new(DirtyBitmap::new(&layout)?);
    /// bitmap.mark_range(0, 0, 10)?; // the guest ran before migration started
    /// let sched = PageScheduler::with_bitmap(layout.clone(), Arc::clone(&bitmap), SchedulerConfig::default())?;
    /// assert_eq!(sched.bitmap().dirty_pages(), 10);
    /// assert!(matches!(
    ///     PageScheduler::with_bitmap(layout.clone(), Arc::clone(&bitmap), SchedulerConfig::default()),
    ///     Err(AttachError::InUse)
    /// ));
    /// drop(sched);
    /// assert!(PageScheduler::with_bitmap(layout, bitmap, SchedulerConfig::default()).is_ok());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_bitmap(
        layout: RamLayout,
        bitmap: Arc<DirtyBitmap>,
        config: SchedulerConfig,
    ) -> Result<Self, AttachError> {
        bitmap.check_layout(&layout).map_err(AttachError::Layout)?;
        if !bitmap.attach() {
            return Err(AttachError::InUse);
        }
        Ok(Self::assemble(layout, bitmap, config))
    }

    fn assemble(layout: RamLayout, bitmap: Arc<DirtyBitmap>, config: SchedulerConfig) -> Self {
        Self {
            layout,
            bitmap,
            hint: HintSlots::sized(config.streams()),
            queue: Queue::new(),
            config,
            urgent: CachePadded::new(UrgentCounters::default()),
            background: CachePadded::new(BackgroundCounters::default()),
        }
    }

    /// The dirty bitmap as a shared handle (to hand to guest memory or a dirty-log thread).
    pub fn shared_bitmap(&self) -> Arc<DirtyBitmap> {
        Arc::clone(&self.bitmap)
    }

    /// The layout.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }
    /// The dirty bitmap (mark pages here; claim through the scheduler).
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }
    /// The hint cell: stream 0's slot (the only one unless the hint policy is per stream; all
    /// of them: [`hint_slots`](Self::hint_slots)).
    pub fn hint(&self) -> &PageHint {
        &self.hint
    }
    /// The configuration.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// A background scanner starting at the first page. Each scanner keeps its own scan
    /// position; the hint cell is shared.
    pub fn background(&self) -> BackgroundScanner<'_> {
        self.background_from(PageLocation::new(0, 0))
    }

    /// `n` background scanners for `n` sender threads, starting at evenly spaced positions:
    /// scanner `i` starts at the host page holding global page `i * total_pages / n`.
    /// See the [module docs](self) for how several scanners share the hint and what each
    /// one's "done" means.
    ///
    /// ```
    /// use pagehint::{PageScheduler, RamLayout, SchedulerConfig};
    /// let sched = PageScheduler::new("a:4M,b:4M".parse()?, SchedulerConfig::default())?;
    /// sched.bitmap().mark_all();
    /// let sent = std::sync::atomic::AtomicU64::new(0);
    /// std::thread::scope(|s| {
    ///     for scanner in sched.background_scanners(4) {
    ///         let sent = &sent;
    ///         s.spawn(move || {
    ///             for claim in scanner {
    ///                 sent.fetch_add(claim.pages_to_send(), std::sync::atomic::Ordering::Relaxed);
    ///             }
    ///         });
    ///     }
    /// });
    /// assert_eq!(sent.into_inner(), 2048); // every page exactly once
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn background_scanners(&self, n: usize) -> Vec<BackgroundScanner<'_>> {
        let total = u128::from(self.layout.total_pages());
        (0..n)
            .map(|i| {
                // Below `total`, so it fits a u64 and names a page of the layout.
                let global = (total * i as u128 / n as u128) as u64;
                let start = self
                    .layout
                    .location_of(global)
                    .and_then(|loc| self.layout.host_page_of(loc))
                    .map_or(PageLocation::new(0, 0), |hp| {
                        PageLocation::new(hp.block, hp.first_page)
                    });
                self.background_from(start)
            })
            .collect()
    }

    /// A background scanner starting at `start` (the first page if `start` is not in the
    /// layout).
    pub fn background_from(&self, start: PageLocation) -> BackgroundScanner<'_> {
        let start = self
            .layout
            .check(start)
            .map_or(PageLocation::new(0, 0), |_| start);
        BackgroundScanner {
            sched: self,
            cursors: self.new_cursors(),
            block: start.block,
            page: start.page,
            swept: 0,
            local: LocalCounts::default(),
            uncounted: 0,
        }
    }

    /// Serves a page request from the destination (urgent path): the request's bytes must lie
    /// in one host page (a fault: any length up to the host page size). Invalid requests are
    /// counted and refused without touching any state; so is a request covering several host
    /// pages ([`RequestError::SpansHostPages`]: never a silent partial serve), which
    /// [`serve_range`](Self::serve_range) serves whole.
    ///
    /// ```
    /// use pagehint::{PageScheduler, RamLayout, RequestError, SchedulerConfig, Served, UrgentRequest};
    /// let sched = PageScheduler::new(RamLayout::single("m", 1 << 20, 4096)?, SchedulerConfig::preempt())?;
    /// sched.bitmap().mark_all();
    /// assert!(matches!(sched.serve(UrgentRequest::new(0, 0x5000, 4096))?, Served::Send(_)));
    /// assert!(matches!(
    ///     sched.serve(UrgentRequest::new(0, 0x6000, 3 * 4096)),
    ///     Err(RequestError::SpansHostPages { host_pages: 3, .. })
    /// ));
    /// assert_eq!(sched.bitmap().dirty_pages(), 255); // the refused range claimed nothing
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "Served::Send owns pages that have left the dirty bitmap: send them and call urgent_sent, or they are lost"]
    pub fn serve(&self, req: UrgentRequest) -> Result<Served, RequestError> {
        let (loc, hp) = match self.check_request(req).and_then(|r| r.one_host_page()) {
            Ok(checked) => checked,
            Err(e) => {
                bump(&self.urgent.bad_requests, 1);
                return Err(e);
            }
        };
        match self.config.mode {
            Mode::Vanilla => {
                self.queue.push(loc);
                bump(&self.urgent.requests_queued, 1);
                Ok(Served::Queued(hp))
            }
            Mode::Preempt => match self.bitmap.claim_host_page(loc)?.into_claim() {
                Some(claim) => {
                    bump(&self.urgent.urgent_host_pages, 1);
                    bump(&self.urgent.urgent_pages, claim.pages_to_send());
                    Ok(Served::Send(claim))
                }
                None => {
                    bump(&self.urgent.urgent_already_claimed, 1);
                    Ok(Served::AlreadyClaimed(hp))
                }
            },
        }
    }

    /// Serves a page request for any range of one block (urgent path): every host page that
    /// holds a byte of it, as a sequence of [`Served`] outcomes. In preempt mode each
    /// [`Served::Send`] is a claim of the range's dirty host pages in one bitmap word (or one
    /// wide host page), and each host page of the range that was not dirty any more comes as
    /// [`Served::AlreadyClaimed`]; in vanilla mode each host page is queued
    /// ([`Served::Queued`]). Each host page of the range is reported exactly once, and each
    /// is claimed by exactly one path (I1, I2). An invalid request is counted and refused
    /// before anything is claimed.
    ///
    /// The outcomes are produced as the iterator is advanced (no allocation; a host page is
    /// claimed when its step comes). A step not taken claims nothing: dropping the iterator
    /// early leaves the rest of the range dirty, for the background path — nothing is lost,
    /// but it was not served urgently.
    ///
    /// ```
    /// use pagehint::{PageScheduler, RamLayout, SchedulerConfig, Served, UrgentRequest};
    /// let sched = PageScheduler::new(RamLayout::single("m", 1 << 20, 4096)?, SchedulerConfig::preempt_hint())?;
    /// sched.bitmap().mark_range(0, 0, 100)?;
    /// // the return path: a request for 3 pages from page 98 (pages 98 and 99 are dirty)
    /// let mut sent = 0;
    /// for served in sched.serve_range(UrgentRequest::new(0, 98 * 4096, 3 * 4096))? {
    ///     match served {
    ///         Served::Send(claim) => {
    ///             sent += claim.pages_to_send(); // send claim.host_pages() on the urgent channel
    ///             sched.urgent_sent(&claim);
    ///         }
    ///         Served::AlreadyClaimed(hp) => assert_eq!(hp.first_page, 100), // clean
    ///         Served::Queued(_) => unreachable!("preempt mode"),
    ///     }
    /// }
    /// assert_eq!(sent, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "the range is served as the iterator is advanced: iterate it, send each Served::Send claim and call urgent_sent"]
    pub fn serve_range(&self, req: UrgentRequest) -> Result<ServeRange<'_>, RequestError> {
        match self.check_request(req) {
            Ok(checked) => Ok(ServeRange::new(self, checked)),
            Err(e) => {
                bump(&self.urgent.bad_requests, 1);
                Err(e)
            }
        }
    }

    /// Decodes a request frame (pagehint's own, see [`request`](crate::request)) and serves
    /// it; malformed frames are counted as bad requests.
    #[must_use = "Served::Send owns pages that have left the dirty bitmap: send them and call urgent_sent, or they are lost"]
    pub fn serve_frame(&self, frame: &[u8]) -> Result<Served, RequestError> {
        match UrgentRequest::decode(frame) {
            Ok(req) => self.serve(req),
            Err(e) => {
                bump(&self.urgent.bad_requests, 1);
                Err(e.into())
            }
        }
    }

    /// Checks a request against the layout: a non-empty byte range inside one block.
    fn check_request(&self, req: UrgentRequest) -> Result<CheckedRequest, RequestError> {
        if req.len == 0 {
            return Err(RequestError::ZeroLength {
                block: req.block,
                offset: req.offset,
            });
        }
        let loc = self.layout.location_at(req.block, req.offset)?;
        let block = self.layout.block(req.block)?;
        let block_len = block.pages() << self.layout.target_page_shift();
        match req.offset.checked_add(req.len) {
            Some(end) if end <= block_len => Ok(CheckedRequest {
                first: loc,
                // `end - 1` is a byte of the block: its page is in the block.
                last_page: (end - 1) >> self.layout.target_page_shift(),
                host_shift: block.host_page_shift(),
            }),
            _ => Err(LocationError::RangeOutOfBounds {
                block: req.block,
                first: loc.page,
                count: req.len.div_ceil(self.layout.target_page_size()),
            }
            .into()),
        }
    }

    /// Tells the scheduler that an urgent claim has been sent; with hints on, offers the
    /// location right after it (set-if-empty) and says what became of the offer.
    pub fn urgent_sent(&self, claim: &Claim) -> Option<Offer> {
        self.offer_after(&self.hint, claim)
    }

    /// With hints on, offers the location after `claim` into `slot` (set-if-empty) and counts
    /// what became of the offer.
    #[inline]
    fn offer_after(&self, slot: &PageHint, claim: &Claim) -> Option<Offer> {
        if !self.config.hints() {
            return None;
        }
        let next = self.after(claim.end());
        // Cannot fail: layout locations always fit the hint's packing.
        let offer = slot.offer(next).ok()?;
        match offer {
            Offer::Accepted => bump(&self.urgent.hints_accepted, 1),
            Offer::Pending => bump(&self.urgent.hints_refused_pending, 1),
        }
        Some(offer)
    }

    /// `end` if it is a page of the layout, else the first page of the next block (wrapping).
    fn after(&self, end: PageLocation) -> PageLocation {
        if self.layout.check(end).is_ok() {
            end
        } else {
            let next = (end.block as usize + 1) % self.layout.blocks().len();
            PageLocation::new(next as u32, 0)
        }
    }

    /// A snapshot of the counters (exact when quiescent and every scanner has been dropped or
    /// has finished a round).
    pub fn stats(&self) -> SchedulerStats {
        let mut s = SchedulerStats::default();
        self.urgent.read_into(&mut s);
        self.background.read_into(&mut s);
        // Derived rather than counted (one fewer locked instruction each on the urgent path):
        // every valid request of `serve` is queued, claims one host page, or finds it already
        // claimed; a range request counts once, however many host pages it covered; and every
        // offer is accepted or refused. Saturating: a snapshot taken while a range is served
        // may see its host pages before their outcomes.
        s.requests = (s.requests_queued + s.urgent_host_pages + s.urgent_already_claimed)
            .saturating_sub(s.range_host_pages)
            + s.range_requests;
        s.hints_offered = s.hints_accepted + s.hints_refused_pending;
        s
    }

    /// Clears the hint, the request queue and the counters (QEMU's `ram_state_reset`), for a
    /// new migration over the same bitmap.
    pub fn reset(&self) {
        self.hint.clear();
        while self.queue.pop().is_some() {}
        self.urgent.reset();
        self.background.reset();
        self.hint.reset_counters();
    }

    /// Postcopy recovery for one block: rebuilds its send state from the destination's bitmap
    /// of received pages (bit `p % 64` of word `p / 64` set: page `p` was received), so that
    /// exactly the pages not received are dirty, as QEMU does after a broken connection. Also
    /// drops the pending hint and queued requests, which belong to the broken connection (the
    /// requests are counted in [`SchedulerStats::queued_dropped`]).
    /// Returns the number of pages left to send in the block.
    ///
    /// `&mut self` proves that no scanner and no urgent call of this scheduler runs, and no
    /// other scheduler drives the bitmap; senders must have stopped (and their in-flight
    /// pages count as not received unless the destination says otherwise). The received
    /// bitmap must have one bit per page of the block, in whole words, and no bit past the
    /// block's end; a malformed one is refused before anything changes (I8). Page bits that
    /// the guest sets concurrently through a shared bitmap are either superseded or kept.
    ///
    /// ```
    /// use pagehint::{PageScheduler, RamLayout, SchedulerConfig};
    /// let mut sched = PageScheduler::new(RamLayout::single("m", 1 << 20, 4096)?, SchedulerConfig::default())?;
    /// sched.bitmap().mark_all();
    /// let mut scanner = sched.background();
    /// let _ = scanner.next_claim(); // sent some pages, then the connection broke
    /// drop(scanner); // every sender stops
    /// // the destination received pages 0..16 and 64..128
    /// let received = [0xffff, !0, 0, 0];
    /// assert_eq!(sched.recover_block(0, &received)?, 256 - 16 - 64);
    /// assert_eq!(sched.bitmap().find_next_dirty(0, 0)?, Some(16));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// A live scanner borrows the scheduler, so recovering while it runs does not compile:
    ///
    /// ```compile_fail
    /// # use pagehint::{PageScheduler, RamLayout, SchedulerConfig};
    /// # let mut sched = PageScheduler::new(RamLayout::single("m", 1 << 20, 4096).unwrap(), SchedulerConfig::default()).unwrap();
    /// let scanner = sched.background();
    /// sched.recover_block(0, &[0; 4]).unwrap();
    /// drop(scanner);
    /// ```
    pub fn recover_block(&mut self, block: u32, received: &[u64]) -> Result<u64, RecoveryError> {
        let dirty = self
            .bitmap
            .reset_from_received(block, received)
            .map_err(RecoveryError::Received)?;
        self.hint.clear();
        // The broken connection's requests are dropped, and counted, so that every queued
        // request stays accounted for across recoveries (I5's bookkeeping).
        let mut dropped = 0;
        while self.queue.pop().is_some() {
            dropped += 1;
        }
        bump(&self.background.queued_dropped, dropped);
        Ok(dirty)
    }

    /// [`recover_block`](Self::recover_block) for a scheduler shared through an `Arc` (one
    /// handle per sender thread): refused with [`RecoveryError::SendersActive`] while any
    /// other handle exists, that is while any sender may still run.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pagehint::{scheduler::RecoveryError, PageScheduler, RamLayout, SchedulerConfig};
    /// let mut sched = Arc::new(PageScheduler::new(RamLayout::single("m", 1 << 20, 4096)?, SchedulerConfig::default())?);
    /// let sender = Arc::clone(&sched); // a sender thread's handle
    /// assert_eq!(
    ///     PageScheduler::recover_shared(&mut sched, 0, &[0; 4]),
    ///     Err(RecoveryError::SendersActive { handles: 1 })
    /// );
    /// drop(sender); // the sender thread exited
    /// assert_eq!(PageScheduler::recover_shared(&mut sched, 0, &[0; 4]), Ok(256));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn recover_shared(
        this: &mut Arc<Self>,
        block: u32,
        received: &[u64],
    ) -> Result<u64, RecoveryError> {
        let handles = Arc::strong_count(this) - 1;
        match Arc::get_mut(this) {
            Some(sched) => sched.recover_block(block, received),
            None => Err(RecoveryError::SendersActive {
                // At least one: `get_mut` fails only while another handle (strong or weak) exists.
                handles: handles.max(1),
            }),
        }
    }
}

/// A request checked against the layout: its first target page and its last.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CheckedRequest {
    first: PageLocation,
    last_page: u64,
    host_shift: u32,
}

impl CheckedRequest {
    /// The request's one host page, or [`RequestError::SpansHostPages`].
    #[inline]
    fn one_host_page(self) -> Result<(PageLocation, HostPage), RequestError> {
        let (first_hp, last_hp) = (
            self.first.page >> self.host_shift,
            self.last_page >> self.host_shift,
        );
        if first_hp != last_hp {
            return Err(RequestError::SpansHostPages {
                block: self.first.block,
                first_page: self.first.page,
                host_pages: last_hp - first_hp + 1,
            });
        }
        Ok((
            self.first,
            HostPage {
                block: self.first.block,
                first_page: first_hp << self.host_shift,
                pages: 1 << self.host_shift,
            },
        ))
    }
}

impl Drop for PageScheduler {
    fn drop(&mut self) {
        self.bitmap.detach();
    }
}

/// Why [`PageScheduler::with_bitmap`] refused a bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachError {
    /// The bitmap was built for another layout.
    Layout(LayoutMismatch),
    /// Another scheduler drives the bitmap.
    InUse,
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layout(e) => e.fmt(f),
            Self::InUse => f.write_str("another page scheduler drives this dirty bitmap"),
        }
    }
}

impl std::error::Error for AttachError {}

/// Why postcopy recovery refused to rebuild a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryError {
    /// The received bitmap is malformed for the block (or the block does not exist).
    Received(DirtyLogError),
    /// Other handles to the scheduler exist: senders may still run.
    SendersActive {
        /// Other handles (strong references) to the scheduler.
        handles: usize,
    },
}

impl fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Received(e) => write!(f, "received bitmap refused: {e}"),
            Self::SendersActive { handles } => write!(
                f,
                "cannot recover while senders run: {handles} other handle(s) to the scheduler"
            ),
        }
    }
}

impl std::error::Error for RecoveryError {}

impl fmt::Debug for PageScheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageScheduler")
            .field("config", &self.config)
            .field("bitmap", &self.bitmap)
            .field("hint", &*self.hint)
            .finish_non_exhaustive()
    }
}

/// Publish a scanner's local counts after this many claims.
const PUBLISH_EVERY: u64 = 64;

/// The background path: a scan position over the layout, following hints.
///
/// Yields claims until a round completes ([`None`]); iterating again starts a new round.
/// Several scanners may run over one scheduler; each claim still goes to one of them, and
/// each scanner's "done" still means that no page is left unclaimed (in postcopy; see the
/// [module docs](self)).
pub struct BackgroundScanner<'a> {
    sched: &'a PageScheduler,
    /// Per-stream mode: one cursor per stream, beside the linear scan ([`crate::cursors`]).
    cursors: Option<Box<Cursors>>,
    block: u32,
    page: u64,
    /// Pages verified clean, contiguously, ending at (block, page), since the last jump.
    swept: u64,
    local: LocalCounts,
    /// Dirty pages claimed but not yet counted in the bitmap's dirty count (counted in
    /// batches, with the statistics: the claim loop pays no shared RMW for the count).
    uncounted: u64,
}

impl BackgroundScanner<'_> {
    /// The current scan position.
    pub fn position(&self) -> PageLocation {
        PageLocation::new(self.block, self.page)
    }

    /// Moves the scan to `to`, restarting the count of pages verified clean (I3).
    fn jump(&mut self, to: PageLocation) {
        if (to.block, to.page) != (self.block, self.page) {
            self.block = to.block;
            self.page = to.page;
            self.swept = 0;
        }
    }

    /// Follows the pending hint (preempt) or a queued request whose page is still dirty
    /// (vanilla).
    #[inline]
    fn follow(&mut self) {
        let sched = self.sched;
        match sched.config.mode {
            Mode::Preempt if self.cursors.is_some() => self.follow_streams(),
            Mode::Preempt => {
                if let Some(to) = sched.hint.take() {
                    self.local.hints_taken += 1;
                    // Any value is harmless (I6); one outside the layout is simply not followed.
                    if sched.layout.check(to).is_ok() {
                        self.jump(to);
                    }
                }
            }
            Mode::Vanilla => {
                while let Some(loc) = sched.queue.pop() {
                    // Queued locations were checked by `serve`. A stale "dirty" answer (the
                    // snapshot is relaxed) costs one lost claim attempt, nothing more; a
                    // clean one costs one load, not a search of the rest of the block.
                    if sched.bitmap.host_page_may_be_dirty(loc.block, loc.page) {
                        self.local.queued_followed += 1;
                        self.jump(loc);
                        break;
                    }
                    // Already sent (by a background path: the urgent path sends nothing in
                    // vanilla mode).
                    self.local.queued_stale += 1;
                }
            }
        }
    }

    /// One step of the linear scan: claims the next chunk that may be dirty, moving the
    /// position and adding what it passed to the count of pages verified clean.
    #[inline]
    fn linear_step(&mut self, batch: u32) -> Found {
        let step = self.sched.bitmap.scan_step(self.block, self.page, batch);
        self.swept += step.end - self.page;
        self.page = step.end;
        if step.block_end {
            self.advance_block();
        }
        step.found
    }

    fn advance_block(&mut self) {
        self.block = ((self.block as usize + 1) % self.sched.layout.blocks().len()) as u32;
        self.page = 0;
    }

    fn publish(&mut self) {
        if let Some(c) = self.cursors.as_deref_mut() {
            c.publish(&self.sched.hint);
        }
        self.local.publish(&self.sched.background);
        self.sched
            .bitmap
            .count_cleared(std::mem::take(&mut self.uncounted));
    }

    /// The next claim to send on the background channel, or `None` when a full contiguous
    /// sweep found no dirty page (the round is complete; I3).
    ///
    /// ```compile_fail
    /// #![deny(unused_must_use)]
    /// # use pagehint::{PageScheduler, RamLayout, SchedulerConfig};
    /// # let sched = PageScheduler::new(RamLayout::single("m", 1 << 20, 4096)?, SchedulerConfig::preempt())?;
    /// sched.background().next_claim(); // error: unused return value
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "a claim owns pages that have left the dirty bitmap: send them (or mark them dirty again), or they are lost"]
    pub fn next_claim(&mut self) -> Option<Claim> {
        let sched = self.sched;
        let total = sched.layout.total_pages();
        let batch = sched.config.batch.shift;
        loop {
            self.follow();
            // A cursor's claim (per-stream mode: the linear scan stays), or a linear step.
            let found = match self.cursor_turn() {
                Some(c) => Found::Won(c),
                None => self.linear_step(batch),
            };
            match found {
                Found::Won(c) => {
                    self.uncounted += c.dirty_pages();
                    self.local.claims += 1;
                    self.local.host_pages += u64::from(c.host_page_count());
                    self.local.pages += c.pages_to_send();
                    if self.local.claims >= PUBLISH_EVERY {
                        self.publish();
                    }
                    return Some(c);
                }
                Found::Lost => self.local.lost += 1,
                Found::Clean => {}
            }
            if self.swept >= total {
                self.swept = 0;
                self.local.rounds += 1;
                self.publish();
                return None;
            }
        }
    }
}

impl Iterator for BackgroundScanner<'_> {
    type Item = Claim;
    fn next(&mut self) -> Option<Claim> {
        self.next_claim()
    }
}

impl Drop for BackgroundScanner<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}

impl fmt::Debug for BackgroundScanner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackgroundScanner")
            .field("position", &self.position())
            .field("swept", &self.swept)
            .finish()
    }
}
