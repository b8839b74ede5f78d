//! The source's outgoing side: pages framed onto the two channels through the emulated link.
//!
//! A run of pages is copied out of guest RAM (a volatile copy: vCPUs may be writing during
//! precopy), split into units — target pages in precopy, host pages in postcopy — and
//! consecutive units of the same kind (data or all-zero) become one frame: `PAGES` with the
//! bytes, or `ZERO` with none. Each frame takes its slot on the [`Link`]: the sender blocks
//! while the background queue is full and stamps the frame with its arrival time.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::memory::SourceMemory;
use crate::guest::layout::TARGET_PAGE;
use crate::link::Link;
use crate::sys::clock::sleep_until_unless;
use crate::wire::{write_parts, Channel, FrameHeader, FrameKind, Guard, WireError};

/// Which phase a page is sent in (for the accounting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before the switch-over (may be sent again).
    Precopy,
    /// After it (each host page exactly once).
    Postcopy,
    /// After it, on the urgent channel: a host page the background path claimed, sent again
    /// on purpose (a deliberate duplicate, counted apart).
    Resend,
}

/// Counters of what was sent (relaxed; read after the senders are joined).
#[derive(Debug, Default)]
pub struct Sent {
    /// Target pages sent in precopy.
    pub precopy_pages: AtomicU64,
    /// Link bytes in precopy.
    pub precopy_bytes: AtomicU64,
    /// Link bytes in postcopy.
    pub postcopy_bytes: AtomicU64,
    /// Host pages sent on the background channel in postcopy.
    pub bg_host_pages: AtomicU64,
    /// Host pages sent on the urgent channel.
    pub urgent_host_pages: AtomicU64,
    /// Of the postcopy host pages, all-zero ones (no payload).
    pub zero_host_pages: AtomicU64,
    /// Host pages sent again on the urgent channel (deliberate duplicates; not counted
    /// above).
    pub resent_host_pages: AtomicU64,
    /// Link bytes of those (counted in `postcopy_bytes` too).
    pub resent_bytes: AtomicU64,
    /// Set at the switch-over.
    precopy_over: AtomicBool,
}

/// Target pages `first .. first + count` of `block`, sent in units of `unit` target pages
/// (a unit is all-zero or not: a target page in precopy, a host page in postcopy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// RAM block.
    pub block: u32,
    /// First target page in the block.
    pub first: u64,
    /// Target pages.
    pub count: u64,
    /// Target pages per unit.
    pub unit: u64,
}

/// Test hooks of the outgoing side.
#[derive(Debug)]
pub struct Hooks {
    /// Flip a byte of the first data-area page sent in postcopy (once).
    pub corrupt_pending: AtomicBool,
    /// Drop both connections after this many postcopy host pages (0: never).
    pub drop_after: u64,
    /// Cut both connections after this many postcopy host pages sent on them (0: never)...
    pub cut_after: u64,
    /// ... this many more times.
    pub cuts_left: u64,
    /// Postcopy host pages sent before the current connections.
    pub cut_base: u64,
    /// The current connections have been cut already.
    pub cut_fired: AtomicBool,
}

/// Frames pages onto the channels.
#[derive(Debug)]
pub struct Outbound<'a> {
    /// Guest RAM.
    pub mem: &'a SourceMemory,
    /// The emulated link.
    pub link: Link,
    /// Main connection (background channel); replaced when a session is resumed.
    pub main: TcpStream,
    /// Urgent connection; replaced when a session is resumed.
    pub urgent: TcpStream,
    /// What was sent.
    pub sent: Sent,
    /// Test hooks.
    pub hooks: Hooks,
    /// A frame write on the main connection failed, perhaps part way (so no `ABORT` frame
    /// may follow it).
    pub torn_main: AtomicBool,
}

/// Why sending stopped.
#[derive(Debug)]
pub enum SendError {
    /// The connection failed.
    Wire(WireError),
    /// Guest memory could not be read.
    Memory(String),
    /// The drop hook fired.
    Dropped(u64),
    /// The cut hook fired.
    Cut(u64),
}

impl From<WireError> for SendError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

impl Outbound<'_> {
    /// Sends `run` on `chan`, reading the pages into `buf`; returns when its last frame
    /// arrives on the emulated link (source clock).
    pub fn send_pages(
        &self,
        run: PageRun,
        chan: Channel,
        phase: Phase,
        guard: &Guard<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<u64, SendError> {
        let PageRun {
            block,
            first,
            count,
            unit,
        } = run;
        let bytes = (count * TARGET_PAGE) as usize;
        buf.resize(bytes, 0);
        self.mem
            .read(block, first * TARGET_PAGE, &mut buf[..bytes])
            .map_err(SendError::Memory)?;
        if phase == Phase::Postcopy {
            self.maybe_corrupt(block, first, &mut buf[..bytes]);
        }
        let resend = phase == Phase::Resend;
        let unit_bytes = (unit * TARGET_PAGE) as usize;
        let mut at = 0;
        let mut arrival = 0;
        while at < bytes {
            let zero = is_zero(&buf[at..at + unit_bytes]);
            let mut end = at + unit_bytes;
            while end < bytes && is_zero(&buf[end..end + unit_bytes]) == zero {
                end += unit_bytes;
            }
            let offset = (first * TARGET_PAGE) + at as u64;
            let payload: &[u8] = if zero { &[] } else { &buf[at..end] };
            let len = (end - at) as u64;
            let h = if zero {
                FrameHeader::zero(block, offset, len)
            } else {
                FrameHeader::pages(block, offset, len)
            };
            arrival = self.frame(if resend { h.resent() } else { h }, payload, chan, guard)?;
            let units = ((end - at) / unit_bytes) as u64;
            match phase {
                // Relaxed: counters read after the senders are joined.
                Phase::Precopy => {
                    self.sent
                        .precopy_pages
                        .fetch_add(units * unit, Ordering::Relaxed);
                }
                Phase::Postcopy => {
                    let c = if chan == Channel::Urgent {
                        &self.sent.urgent_host_pages
                    } else {
                        &self.sent.bg_host_pages
                    };
                    c.fetch_add(units, Ordering::Relaxed);
                    if zero {
                        self.sent
                            .zero_host_pages
                            .fetch_add(units, Ordering::Relaxed);
                    }
                    self.check_drop()?;
                }
                Phase::Resend => {
                    self.sent
                        .resent_host_pages
                        .fetch_add(units, Ordering::Relaxed);
                }
            }
            at = end;
        }
        Ok(arrival)
    }

    /// Sends one frame, `h` (stamped here with its arrival time) and its payload, on `chan`
    /// through the link. Returns its arrival time on the emulated link (source clock).
    pub fn frame(
        &self,
        h: FrameHeader,
        payload: &[u8],
        chan: Channel,
        guard: &Guard<'_>,
    ) -> Result<u64, WireError> {
        let wire = (FrameHeader::LEN + payload.len()) as u64;
        let (slot, stream) = match chan {
            Channel::Urgent => (self.link.urgent(wire), &self.urgent),
            _ => (self.link.background(wire), &self.main),
        };
        if slot.block_until_ns > 0 {
            // The queue drains within the idle limit (the hello's link is checked against
            // it); the sleep still looks at the stop flag every few ms.
            // Relaxed: a polled flag.
            if !sleep_until_unless(slot.block_until_ns, || guard.stop.load(Ordering::Relaxed)) {
                return Err(WireError::Stopped);
            }
        }
        let h = h.stamped(slot.arrival_ns);
        if let Err(e) = write_parts(stream, &[&h.encode(), payload], guard, chan) {
            // Part of the frame may be out: nothing more can follow it on this channel.
            if chan != Channel::Urgent {
                // Relaxed: read after the writing threads are joined.
                self.torn_main.store(true, Ordering::Relaxed);
            }
            return Err(e);
        }
        let counter = match h.kind {
            FrameKind::Pages | FrameKind::Zero if self.sent.precopy_done() => {
                &self.sent.postcopy_bytes
            }
            FrameKind::Pages | FrameKind::Zero => &self.sent.precopy_bytes,
            _ => return Ok(slot.arrival_ns),
        };
        // Relaxed (both): counters read after the senders are joined.
        counter.fetch_add(wire, Ordering::Relaxed);
        if h.resend {
            self.sent.resent_bytes.fetch_add(wire, Ordering::Relaxed);
        }
        Ok(slot.arrival_ns)
    }

    fn maybe_corrupt(&self, block: u32, first: u64, buf: &mut [u8]) {
        // Relaxed: a one-shot test-hook flag.
        if !self.hooks.corrupt_pending.load(Ordering::Relaxed) {
            return;
        }
        let l = self.mem.layout();
        let base = l.block_first_page(block) + first;
        for (i, page) in buf.chunks_exact_mut(TARGET_PAGE as usize).enumerate() {
            if l.data.contains(&(base + i as u64)) && !is_zero(page) {
                if self.hooks.corrupt_pending.swap(false, Ordering::Relaxed) {
                    page[100] ^= 0x40;
                }
                return;
            }
        }
    }

    fn check_drop(&self) -> Result<(), SendError> {
        let h = &self.hooks;
        if h.drop_after == 0 && (h.cut_after == 0 || h.cuts_left == 0) {
            return Ok(());
        }
        let total = self.sent_host_pages();
        if h.drop_after > 0 && total >= h.drop_after {
            return Err(SendError::Dropped(total));
        }
        let on_these = total - h.cut_base;
        // Relaxed: only picks which of the two senders reports the cut; the other one
        // finds its connection shut down.
        if h.cut_after > 0
            && h.cuts_left > 0
            && on_these >= h.cut_after
            && !h.cut_fired.swap(true, Ordering::Relaxed)
        {
            return Err(SendError::Cut(on_these));
        }
        Ok(())
    }

    /// Postcopy host pages sent so far, on every connection.
    pub fn sent_host_pages(&self) -> u64 {
        // Relaxed: an approximate total is enough for a test hook; exact once the senders
        // are joined.
        self.sent.bg_host_pages.load(Ordering::Relaxed)
            + self.sent.urgent_host_pages.load(Ordering::Relaxed)
    }
}

impl Sent {
    /// Marks the end of precopy (later page frames count as postcopy bytes).
    pub fn end_precopy(&self) {
        // Relaxed: set by the one precopy thread before the postcopy senders start.
        self.precopy_over.store(true, Ordering::Relaxed);
    }

    fn precopy_done(&self) -> bool {
        // Relaxed: see `end_precopy`.
        self.precopy_over.load(Ordering::Relaxed)
    }
}

/// Whether `b` is all zeros (word at a time).
pub fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to splits off unaligned ends.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&x| x == 0)
}
