//! The emulated network link between source and destination (this kernel has no `netem`).
//!
//! # Model
//! One link of `bandwidth` bits/s and `delay` one-way latency carries both page channels.
//! Each channel has a send queue (its socket buffers) of at most `queue` bytes:
//!
//! * **background channel**: frames are serialised one after the other; a frame's last byte
//!   leaves at `tail = max(now, tail) + size / bandwidth` and arrives `delay` later. When the
//!   queued bytes exceed `queue`, the sender blocks (a full socket buffer), so in steady state
//!   a page queued now arrives `queue / bandwidth` later. In vanilla postcopy the requested
//!   pages travel here too, behind the queue: that is why vanilla's fault latency is
//!   milliseconds. With a **low-water mark** (`lowat`, what `TCP_NOTSENT_LOWAT` does to a real
//!   socket) the sender blocks as soon as `lowat` bytes are unsent, so the pages it has
//!   claimed wait in the scanner's bitmap — where the urgent path can still take them — and
//!   not in the socket, where it cannot (see [`LinkParams::for_mode`]).
//! * **urgent channel** (preempt modes): its own socket, so its page does not wait behind
//!   the background queue, only behind what is already in the interface queue (at most
//!   `nic_queue` bytes of background data) before it is serialised; the background tail is
//!   pushed back by the urgent bytes (they share the wire).
//!
//! The source stamps every frame with its arrival time (source clock); the destination holds
//! each frame until then. The return path (requests) carries tiny frames in the other
//! direction and only adds `delay`. The model is a few integer operations under a mutex held
//! for nanoseconds; it is the harness's, not the scheduler's (which has no lock).

use std::sync::Mutex;

use crate::sys::clock::now_ns;

/// Link parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkParams {
    /// Bits per second; 0 means unlimited.
    pub bandwidth_bps: u64,
    /// One-way delay in nanoseconds.
    pub delay_ns: u64,
    /// Send-queue (socket buffer) depth of the background channel, in bytes.
    pub queue_bytes: u64,
    /// Background bytes an urgent frame may wait behind in the interface queue.
    pub nic_queue_bytes: u64,
    /// Unsent bytes the background channel may hold in preempt modes (0: the whole queue).
    pub lowat_bytes: u64,
    /// Kernel pacing of the background channel on a real link, bits/s (`SO_MAX_PACING_RATE`;
    /// 0: none): the bandwidth cap, applied smoothly by TCP instead of in bursts.
    pub pace_bps: u64,
}

impl LinkParams {
    /// 10 Gbit/s, 50 µs one way, 8 MiB of socket buffers, 64 KiB interface queue, no
    /// low-water mark.
    pub const DEFAULT: Self = Self {
        bandwidth_bps: 10_000_000_000,
        delay_ns: 50_000,
        queue_bytes: 8 << 20,
        nic_queue_bytes: 64 << 10,
        lowat_bytes: 0,
        pace_bps: 0,
    };

    /// The low-water mark `auto` picks for host pages of `host_page` bytes: 1 MiB, and at
    /// least two host pages (one on the wire while the next is written).
    pub fn auto_lowat(host_page: u64) -> u64 {
        (1 << 20).max(2 * host_page)
    }

    /// The link as the source runs it in `preempt` mode or not: in preempt modes the
    /// background channel's depth is the low-water mark (if set); vanilla keeps the whole
    /// queue, as QEMU's single postcopy channel does (it is the baseline).
    pub fn for_mode(self, preempt: bool) -> Self {
        if preempt && self.lowat_bytes > 0 {
            Self {
                queue_bytes: self.queue_bytes.min(self.lowat_bytes),
                ..self
            }
        } else {
            self
        }
    }

    /// Nanoseconds to serialise `bytes` (0 when unlimited).
    pub fn tx_ns(&self, bytes: u64) -> u64 {
        if self.bandwidth_bps == 0 {
            0
        } else {
            (u128::from(bytes) * 8 * 1_000_000_000 / u128::from(self.bandwidth_bps)) as u64
        }
    }

    /// Whether the link is emulated (a bandwidth is set); when it is not, the channels are
    /// real sockets on a real link and the low-water mark and pacing become socket options
    /// (`TCP_NOTSENT_LOWAT`, `SO_MAX_PACING_RATE`) on the background channel.
    pub fn emulated(&self) -> bool {
        self.bandwidth_bps > 0
    }

    /// On a real link, the `TCP_NOTSENT_LOWAT` of the background channel (0: none): the
    /// low-water mark in preempt modes; vanilla keeps the whole send buffer, as QEMU's single
    /// channel does (see `wire::configure_background`).
    pub fn socket_lowat(&self, preempt: bool) -> u64 {
        if !self.emulated() && preempt {
            self.lowat_bytes
        } else {
            0
        }
    }

    /// One-line description.
    pub fn describe(&self) -> String {
        if !self.emulated() {
            let lowat = match self.lowat_bytes {
                0 => "no low-water mark".to_string(),
                b => format!("TCP_NOTSENT_LOWAT {} KiB in preempt modes", b >> 10),
            };
            let pace = match self.pace_bps {
                0 => "no pacing".to_string(),
                b => format!("background paced at {:.2} Gbit/s", b as f64 / 1e9),
            };
            return format!("emulation off (a real link), {lowat}, {pace}");
        }
        let bw = if self.bandwidth_bps == 0 {
            "unlimited".to_string()
        } else {
            format!("{:.1} Gbit/s", self.bandwidth_bps as f64 / 1e9)
        };
        let lowat = if self.lowat_bytes == 0 {
            "no low-water mark".to_string()
        } else {
            format!(
                "{} KiB unsent at most in preempt modes ({} to drain)",
                self.lowat_bytes >> 10,
                crate::sys::clock::human_ns(self.tx_ns(self.lowat_bytes.min(self.queue_bytes)))
            )
        };
        format!(
            "{bw}, {} µs one way, {} KiB send queue ({} to drain), {}, {} KiB interface queue",
            self.delay_ns / 1000,
            self.queue_bytes >> 10,
            crate::sys::clock::human_ns(self.tx_ns(self.queue_bytes)),
            lowat,
            self.nic_queue_bytes >> 10,
        )
    }
}

impl Default for LinkParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Debug, Default)]
struct State {
    /// When the last queued background byte leaves.
    bg_tail: u64,
    /// When the last queued urgent byte leaves.
    urgent_tail: u64,
}

/// When a frame arrives, and until when its sender must block first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Arrival time of the frame's last byte (source clock).
    pub arrival_ns: u64,
    /// The sender blocks until then before writing (its queue was full); 0 if not.
    pub block_until_ns: u64,
}

/// The shared link of one migration.
#[derive(Debug)]
pub struct Link {
    params: LinkParams,
    state: Mutex<State>,
}

impl Link {
    /// A link with `params`, idle.
    pub fn new(params: LinkParams) -> Self {
        Self {
            params,
            state: Mutex::new(State::default()),
        }
    }

    /// The parameters.
    pub fn params(&self) -> LinkParams {
        self.params
    }

    /// Queues `bytes` on the background channel at `now`.
    pub fn background_at(&self, now: u64, bytes: u64) -> Slot {
        let p = &self.params;
        let tx = p.tx_ns(bytes);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let start = s.bg_tail.max(now);
        s.bg_tail = start + tx;
        let queue_ns = p.tx_ns(p.queue_bytes);
        let backlog = s.bg_tail - now;
        // Block until the queue has drained to 15/16 of its depth (hysteresis: the sender
        // wakes once per few frames, not once per frame).
        let block_until_ns = if backlog > queue_ns {
            s.bg_tail - queue_ns + queue_ns / 16
        } else {
            0
        };
        Slot {
            arrival_ns: s.bg_tail + p.delay_ns,
            block_until_ns,
        }
    }

    /// Queues `bytes` on the urgent channel at `now`.
    pub fn urgent_at(&self, now: u64, bytes: u64) -> Slot {
        let p = &self.params;
        let tx = p.tx_ns(bytes);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let busy = s.bg_tail.saturating_sub(now);
        let wait = busy.min(p.tx_ns(p.nic_queue_bytes));
        let start = s.urgent_tail.max(now + wait);
        s.urgent_tail = start + tx;
        if busy > 0 {
            s.bg_tail += tx;
        }
        Slot {
            arrival_ns: s.urgent_tail + p.delay_ns,
            block_until_ns: 0,
        }
    }

    /// [`background_at`](Self::background_at) now.
    pub fn background(&self, bytes: u64) -> Slot {
        self.background_at(now_ns(), bytes)
    }

    /// [`urgent_at`](Self::urgent_at) now.
    pub fn urgent(&self, bytes: u64) -> Slot {
        self.urgent_at(now_ns(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: LinkParams = LinkParams {
        bandwidth_bps: 8_000_000_000, // 1 byte per ns
        delay_ns: 100,
        queue_bytes: 1000,
        nic_queue_bytes: 50,
        lowat_bytes: 0,
        pace_bps: 0,
    };

    #[test]
    fn background_serialises_and_blocks_when_the_queue_is_full() {
        let l = Link::new(P);
        let a = l.background_at(0, 400);
        assert_eq!(
            a,
            Slot {
                arrival_ns: 500,
                block_until_ns: 0
            }
        );
        let b = l.background_at(0, 400);
        assert_eq!(b.arrival_ns, 900);
        let c = l.background_at(0, 400); // 1200 bytes queued > 1000
        assert_eq!(c.arrival_ns, 1300);
        assert_eq!(c.block_until_ns, 1200 - 1000 + 1000 / 16);
    }

    #[test]
    fn urgent_waits_only_behind_the_interface_queue() {
        let l = Link::new(P);
        l.background_at(0, 1000);
        let u = l.urgent_at(0, 10);
        assert_eq!(u.arrival_ns, 50 + 10 + 100);
        // the background tail moved back by the urgent bytes
        assert_eq!(l.background_at(0, 0).arrival_ns, 1010 + 100);
        // idle link: no wait
        let idle = Link::new(P);
        assert_eq!(idle.urgent_at(0, 10).arrival_ns, 110);
    }

    #[test]
    fn the_low_water_mark_bounds_the_background_queue_in_preempt_modes_only() {
        let p = LinkParams {
            lowat_bytes: 500,
            ..P
        };
        assert_eq!(p.for_mode(false).queue_bytes, 1000);
        let l = Link::new(p.for_mode(true));
        l.background_at(0, 400);
        let b = l.background_at(0, 400); // 800 bytes queued > 500
        assert_eq!(b.block_until_ns, 800 - 500 + 500 / 16);
        assert_eq!(LinkParams::auto_lowat(4096), 1 << 20);
        assert_eq!(LinkParams::auto_lowat(2 << 20), 4 << 20);
    }

    #[test]
    fn unlimited_bandwidth_only_delays() {
        let l = Link::new(LinkParams {
            bandwidth_bps: 0,
            ..P
        });
        assert_eq!(l.background_at(5, 1 << 30).arrival_ns, 105);
        assert_eq!(l.urgent_at(5, 1 << 30).arrival_ns, 105);
    }
}
