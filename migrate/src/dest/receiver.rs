//! The destination's receivers: one per channel, each holding frames until their arrival
//! time on the emulated link ([`Held`]) and then applying them in order.
//!
//! On the main channel, page frames before the `SWITCH` frame are precopy pages (copied in);
//! the `SWITCH` frame is applied in place — discard, register userfaultfd — before any later
//! frame, and handed to the main thread, which starts the guest; page frames after it (and
//! all urgent-channel frames) are postcopy placements. `SUMMARY` ends the main channel.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::memory::Via;
use super::{Applied, Dest, RunError};
use crate::link::Held;
use crate::sys::clock::now_ns;
use crate::wire::{
    read_full, wait_readable, Channel, FrameHeader, FrameKind, Summary, SwitchOver, WireError,
    POLL_SLICE,
};

/// A frame read and held: its header, its payload, and when it was read (destination
/// clock).
type Frame = (FrameHeader, Vec<u8>, u64);

impl Dest<'_> {
    /// Receives and applies the frames of `chan` on `stream` until the summary (background
    /// channel) or an error. If the connection breaks before the switch-over it brought has
    /// been applied, the frames up to it are applied at once (recovery needs it).
    pub(super) fn receiver(&self, stream: &TcpStream, chan: Channel) -> Result<(), RunError> {
        let mut held = Held::default();
        let r = self.receive(stream, chan, &mut held);
        if r.is_err() && held.any(|f: &Frame| f.0.kind == FrameKind::Switch) {
            while let Some((h, buf, recv)) = held.pop() {
                self.apply(&h, &buf, chan, recv)?;
                if h.kind == FrameKind::Switch {
                    break;
                }
            }
        }
        r
    }

    fn receive(
        &self,
        stream: &TcpStream,
        chan: Channel,
        held: &mut Held<Frame>,
    ) -> Result<(), RunError> {
        // Stopped with this connection (a break, or the run's end).
        let g = crate::wire::Guard {
            stop: &self.conn_stop,
            ..self.guard(true)
        };
        let mut pool: Vec<Vec<u8>> = Vec::new();
        let mut last = now_ns();
        loop {
            let now = now_ns();
            while let Some((h, buf, recv)) = held.take_due(now) {
                if self.apply(&h, &buf, chan, recv)? {
                    return Ok(());
                }
                pool.push(buf);
            }
            if self.conn_stopped() {
                return Err(WireError::Stopped.into());
            }
            // Every page is in and `DONE` sent: the urgent channel has nothing more to bring
            // (only the summary, on the main one, is still awaited).
            // Relaxed: a polled flag.
            if chan == Channel::Urgent && held.is_empty() && self.finished.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Every wait is a slice at most: the stop flag and the idle rule are looked at
            // whatever the frames held say.
            let slice = POLL_SLICE.as_nanos() as u64;
            let timeout = held.wait_ns(now, slice).min(slice);
            let ready = wait_readable(stream, timeout).map_err(|e| WireError::Io(chan, e))?;
            if !ready {
                if held.is_empty() {
                    g.check(last, chan).map_err(|e| self.both_silent(e))?;
                }
                continue;
            }
            let mut hb = [0u8; FrameHeader::LEN];
            read_full(stream, &mut hb, &g, chan)?;
            let h = FrameHeader::decode(&hb, chan)?;
            let mut buf = pool.pop().unwrap_or_default();
            buf.resize(h.payload_len() as usize, 0);
            read_full(stream, &mut buf, &g, chan)?;
            last = now_ns();
            // Relaxed: coarse progress figures.
            self.frames.fetch_add(1, Ordering::Relaxed);
            if chan == Channel::Background {
                self.bg_progress.store(last, Ordering::Relaxed);
            } else {
                self.urgent_progress.store(last, Ordering::Relaxed);
            }
            match h.kind {
                FrameKind::Pages | FrameKind::Zero | FrameKind::Switch | FrameKind::Summary => {
                    let due = if h.kind == FrameKind::Summary {
                        0
                    } else {
                        self.to_local(h.arrival_ns)
                    };
                    self.check_due(due, last, chan)?;
                    held.hold(due, (h, buf, last));
                }
                FrameKind::Abort => {
                    let msg = String::from_utf8_lossy(&buf).into_owned();
                    return Err(WireError::PeerAbort(chan, msg).into());
                }
                FrameKind::Pong => {}
            }
        }
    }

    /// A frame read at `read` and due at `due` on the emulated link: both sides refuse a
    /// link that does not drain within the idle limit, so a frame due later than that is
    /// either a source that ignores it or clocks that disagree; holding it would be a hang.
    fn check_due(&self, due: u64, read: u64, chan: Channel) -> Result<(), WireError> {
        let idle = self.cfg.idle_timeout;
        let ahead = due.saturating_sub(read);
        if ahead > idle.as_nanos() as u64 {
            return Err(WireError::Malformed(
                chan,
                format!(
                    "a frame due {} after it was read, beyond the {idle:?} timeout: the source's clock or link disagrees with this side's",
                    crate::sys::clock::human_ns(ahead)
                ),
            ));
        }
        Ok(())
    }

    /// Whether the channel whose last frame `stamp` holds has been silent for most (half)
    /// of `idle`: two channels cut at once fall silent at about the same time.
    pub(super) fn channel_quiet(&self, stamp: &AtomicU64, idle: Duration) -> bool {
        // Relaxed: a coarse timestamp compared with a limit of seconds.
        now_ns().saturating_sub(stamp.load(Ordering::Relaxed)) > idle.as_nanos() as u64 / 2
    }

    /// A receiver's timeout, named for both channels when both fell silent: the urgent
    /// receiver's idle timer already runs from the background channel's last frame; the
    /// background's counts the urgent channel (preempt modes) by its last frame too.
    pub(super) fn both_silent(&self, e: WireError) -> WireError {
        let WireError::Timeout(chan, idle) = e else {
            return e;
        };
        if chan == Channel::Urgent
            || (self.transport.urgent_channel && self.channel_quiet(&self.urgent_progress, idle))
        {
            WireError::Timeout(Channel::Both, idle)
        } else {
            e
        }
    }

    /// Applies one due frame (read at `recv`); true when the channel is done (the summary
    /// arrived).
    fn apply(
        &self,
        h: &FrameHeader,
        buf: &[u8],
        chan: Channel,
        recv: u64,
    ) -> Result<bool, RunError> {
        let data = (h.kind == FrameKind::Pages).then_some(buf);
        match h.kind {
            FrameKind::Pages | FrameKind::Zero => {
                let switched = self
                    .switch
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some();
                if chan == Channel::Background && !switched {
                    self.mem.precopy_place(h.block, h.offset, h.len, data)?;
                } else {
                    let via = Via {
                        chan: if chan == Channel::Urgent {
                            Via::URGENT
                        } else {
                            Via::BACKGROUND
                        },
                        recv_ns: recv,
                        resend: h.resend,
                    };
                    self.mem.place(h.block, h.offset, h.len, data, via)?;
                }
            }
            FrameKind::Switch if chan == Channel::Background => {
                let start_ns = now_ns();
                let switch = SwitchOver::decode(buf)?;
                self.mem.switch(&switch)?;
                *self.switch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Applied {
                    switch,
                    start_ns,
                    end_ns: now_ns(),
                });
                self.switch_ready.notify_all();
            }
            FrameKind::Summary if chan == Channel::Background => {
                let s = Summary::decode(buf)?;
                *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                return Ok(true);
            }
            k => {
                return Err(
                    WireError::Malformed(chan, format!("a {k:?} frame on the {chan}")).into(),
                );
            }
        }
        Ok(false)
    }
}
