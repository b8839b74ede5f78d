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
//!   not in the socket, where it cannot (see [`LinkParams::for_transport`]).
//! * **urgent channel** (preempt modes): its own socket, so its page does not wait behind
//!   the background queue, only behind what is already in the interface queue (at most
//!   `nic_queue` bytes of background data) before it is serialised; the background tail is
//!   pushed back by the urgent bytes (they share the wire).
//!
//! The source stamps every frame with its arrival time (source clock); the destination holds
//! each frame until then ([`Held`]). The return path (requests) carries tiny frames in the
//! other direction and only adds `delay`. The model is a few integer operations under a
//! mutex held for nanoseconds; it is the harness's, not the scheduler's (which has no lock).
//!
//! # A real link
//! With emulation off (`--bandwidth 0`) the channels are real sockets and the model's two
//! knobs become socket options on the background channel ([`configure_background`]): the
//! low-water mark as `TCP_NOTSENT_LOWAT`, the bandwidth cap as `SO_MAX_PACING_RATE`.
//!
//! Which channels a mode uses, and whether its background channel is held to the low-water
//! mark, is its [`Transport`]'s to say; the mark itself defaults to [`LowWater::Auto`].

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use crate::guest::layout::HostPageSize;
use crate::sys::clock::now_ns;

/// Where page requests travel, destination → source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestRoute {
    /// On the main connection's return path, beside `DONE` and the pings.
    Main,
    /// On the urgent connection, away from the main connection's socket, which the
    /// background stream keeps busy.
    Urgent,
}

/// How one mode's pages and requests travel, derived once from the mode
/// (`MigrationMode::transport`) and read by the source, the destination, the link and the
/// results alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    /// Requested pages travel on their own (urgent) connection, not behind the background
    /// stream.
    pub urgent_channel: bool,
    /// Where the destination sends its page requests.
    pub requests: RequestRoute,
    /// A request for a host page the background path already claimed is answered by
    /// sending it again on the urgent channel (a deliberate duplicate), instead of waiting
    /// for the background copy.
    pub resend: bool,
    /// The background channel holds at most the link's low-water mark of unsent bytes
    /// (`TCP_NOTSENT_LOWAT` on a real link), so that claimed pages wait in the bitmap, where
    /// a request can still take them; false: the whole send queue.
    pub low_water: bool,
    /// Each page request names its fault stream, the faulting vCPU (the destination knows
    /// it from userfaultfd's thread id), and the source keeps a hint slot per stream; false:
    /// every request is stream 0's (one slot).
    pub streams: bool,
}

/// The low-water mark of the background channel, as asked for (`--lowat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowWater {
    /// 1 MiB, and at least two host pages (one on the wire while the next is written).
    Auto,
    /// None: the whole send queue.
    Off,
    /// This many bytes (at least one host page).
    Bytes(u64),
}

impl LowWater {
    /// The mark in bytes for host pages of `host_page` (0: none).
    pub fn bytes(self, host_page: HostPageSize) -> u64 {
        let hp = host_page.bytes();
        match self {
            Self::Auto => (1 << 20).max(2 * hp),
            Self::Off => 0,
            Self::Bytes(b) => b.max(hp),
        }
    }
}

impl std::str::FromStr for LowWater {
    type Err = String;
    /// `auto`, `off` (or `0`), or a size (`512K`, `4M`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" | "0" => Ok(Self::Off),
            s => crate::values::parse_bytes(s)
                .map(Self::Bytes)
                .map_err(|e| format!("{s}: {e}")),
        }
    }
}

/// The fastest link rate (bandwidth, pacing) the command line and the source take: 10 Tbit/s.
pub const MAX_BANDWIDTH: u64 = 10_000_000_000_000;

/// The largest frame either side writes, about: a precopy run of 256 target pages (1 MiB),
/// or one 2 MiB host page in postcopy, and a page for the header.
pub fn frame_max(host_page: u64) -> u64 {
    host_page.max(1 << 20) + 4096
}

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

    /// The link as the source runs it for `transport`: where the transport holds the
    /// background channel to the low-water mark (preempt modes), its depth is the mark (if
    /// set); otherwise the whole queue, as QEMU's single postcopy channel has (vanilla, the
    /// baseline).
    pub fn for_transport(self, transport: &Transport) -> Self {
        if transport.low_water && self.lowat_bytes > 0 {
            Self {
                queue_bytes: self.queue_bytes.min(self.lowat_bytes),
                ..self
            }
        } else {
            self
        }
    }

    /// Nanoseconds to serialise `bytes` (0 when unlimited; saturating).
    pub fn tx_ns(&self, bytes: u64) -> u64 {
        if self.bandwidth_bps == 0 {
            0
        } else {
            let ns = u128::from(bytes) * 8 * 1_000_000_000 / u128::from(self.bandwidth_bps);
            u64::try_from(ns).unwrap_or(u64::MAX)
        }
    }

    /// Checks the link as both sides run it: its rates within what the command line takes
    /// ([`MAX_BANDWIDTH`]), and, emulated, its deepest queue (the background send queue or
    /// the interface queue) and one frame of `frame` bytes drained, then delivered after the
    /// one-way delay, within `idle`: else a frame at the back of the queue would arrive after
    /// its receiver had given up on the link (and the sender would block that long). The
    /// error shows the arithmetic.
    pub fn check(&self, idle: Duration, frame: u64) -> Result<(), String> {
        for (what, v) in [("bandwidth", self.bandwidth_bps), ("pacing", self.pace_bps)] {
            if v > MAX_BANDWIDTH {
                return Err(format!(
                    "a link {what} of {v} bits/s (at most {MAX_BANDWIDTH})"
                ));
            }
        }
        let queue = self.queue_bytes.max(self.nic_queue_bytes);
        let drain = self.tx_ns(queue.saturating_add(frame));
        let total = drain.saturating_add(self.delay_ns);
        if total > idle.as_nanos() as u64 {
            let human = crate::sys::clock::human_ns;
            return Err(format!(
                "the link is too slow for the timeout: its {} KiB queue and a {} KiB frame take {} to drain at {} bits/s, plus {} of one-way delay: {} in all, longer than the {:?} timeout (a frame at the back of the queue would arrive after the peer gave up); raise the bandwidth or the timeout, or shorten the queue or the delay",
                queue >> 10,
                frame >> 10,
                human(drain),
                self.bandwidth_bps,
                human(self.delay_ns),
                human(total),
                idle
            ));
        }
        Ok(())
    }

    /// Whether the link is emulated (a bandwidth is set); when it is not, the channels are
    /// real sockets on a real link and the low-water mark and pacing become socket options
    /// (`TCP_NOTSENT_LOWAT`, `SO_MAX_PACING_RATE`) on the background channel.
    pub fn emulated(&self) -> bool {
        self.bandwidth_bps > 0
    }

    /// On a real link, the `TCP_NOTSENT_LOWAT` of the background channel (0: none): the
    /// low-water mark where the transport holds the channel to it; otherwise the whole send
    /// buffer, as QEMU's single channel has (see [`configure_background`]).
    pub fn socket_lowat(&self, transport: &Transport) -> u64 {
        if !self.emulated() && transport.low_water {
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

/// Frames due this soon are handed over at once rather than slept for.
const EARLY_NS: u64 = 5_000;

/// The receiving end of the emulated link: what arrived on a socket, held until its
/// arrival time (destination clock), in order.
#[derive(Debug)]
pub struct Held<T> {
    queue: VecDeque<(u64, T)>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
        }
    }
}

impl<T> Held<T> {
    /// Holds `item` until `due_ns` (0: hand it over at once).
    pub fn hold(&mut self, due_ns: u64, item: T) {
        self.queue.push_back((due_ns, item));
    }

    /// The first item if it is due at `now` (or within a few µs of it).
    pub fn take_due(&mut self, now: u64) -> Option<T> {
        if self.queue.front()?.0 <= now + EARLY_NS {
            self.queue.pop_front().map(|(_, item)| item)
        } else {
            None
        }
    }

    /// How long from `now` until the first item is due (`idle_ns` when nothing is held).
    pub fn wait_ns(&self, now: u64, idle_ns: u64) -> u64 {
        self.queue
            .front()
            .map_or(idle_ns, |(due, _)| due.saturating_sub(now))
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether an item held matches `f`.
    pub fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        self.queue.iter().any(|(_, item)| f(item))
    }

    /// The first item held, due or not.
    pub fn pop(&mut self) -> Option<T> {
        self.queue.pop_front().map(|(_, item)| item)
    }
}

/// On a real link (emulation off), the background channel's socket options: the pacing rate
/// as `SO_MAX_PACING_RATE` (the bandwidth cap, applied by TCP evenly instead of in bursts, so
/// an urgent page on the other socket finds the interface queue nearly empty) and, where the
/// transport holds the channel to it (preempt modes), the low-water mark as `TCP_NOTSENT_LOWAT` (the sender blocks with at most that many
/// unsent bytes, so claimed pages wait in the bitmap, where a request can still take them,
/// not in the socket, where it cannot). Vanilla keeps the whole send buffer, as QEMU's single
/// channel does: it is the baseline. Nothing on an emulated link, whose model does both.
pub fn configure_background(
    stream: &TcpStream,
    link: &LinkParams,
    transport: &Transport,
) -> io::Result<()> {
    if link.emulated() {
        return Ok(());
    }
    let lowat = link.socket_lowat(transport);
    if lowat > 0 {
        let v = u32::try_from(lowat).unwrap_or(u32::MAX);
        setsockopt_u32(stream, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, v)?;
    }
    if link.pace_bps > 0 {
        let v = u32::try_from(link.pace_bps / 8).unwrap_or(u32::MAX);
        setsockopt_u32(stream, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, v)?;
    }
    Ok(())
}

fn setsockopt_u32(stream: &TcpStream, level: i32, name: i32, v: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor (borrowed from `stream` for the call) and a pointer
    // to a live u32 with its exact length; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&v as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    /// A preempt mode's transport, and vanilla's.
    const PREEMPT: Transport = Transport {
        urgent_channel: true,
        requests: RequestRoute::Urgent,
        resend: true,
        low_water: true,
        streams: false,
    };
    const VANILLA: Transport = Transport {
        urgent_channel: false,
        requests: RequestRoute::Main,
        resend: false,
        low_water: false,
        streams: false,
    };

    fn getsockopt_u32(s: &TcpStream, level: i32, name: i32) -> u32 {
        let mut v = 0u32;
        let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: a valid socket and a live u32 with its length; the kernel writes at most it.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&mut v as *mut u32).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    #[test]
    fn a_real_link_gets_the_low_water_mark_in_preempt_modes_and_pacing_always() {
        let real = LinkParams {
            bandwidth_bps: 0,
            lowat_bytes: 1 << 20,
            pace_bps: 8_000_000_000,
            ..LinkParams::DEFAULT
        };
        let lowat = |s: &TcpStream| getsockopt_u32(s, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT);
        let pace = |s: &TcpStream| getsockopt_u32(s, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE);
        let (preempt, _p) = pair();
        let (p, v) = (PREEMPT, VANILLA);
        configure_background(&preempt, &real, &p).unwrap();
        assert_eq!(lowat(&preempt), 1 << 20);
        assert_eq!(pace(&preempt), 1_000_000_000, "bytes per second");
        let (vanilla, _v) = pair();
        let before = lowat(&vanilla);
        configure_background(&vanilla, &real, &v).unwrap();
        assert_eq!(
            lowat(&vanilla),
            before,
            "vanilla keeps the whole send buffer"
        );
        assert_eq!(pace(&vanilla), 1_000_000_000);
        // An emulated link models both; the socket is left alone.
        let (emulated, _e) = pair();
        let (p0, l0) = (pace(&emulated), lowat(&emulated));
        configure_background(
            &emulated,
            &LinkParams {
                bandwidth_bps: 10_000_000_000,
                ..real
            },
            &p,
        )
        .unwrap();
        assert_eq!((pace(&emulated), lowat(&emulated)), (p0, l0));
    }

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
        assert_eq!(p.for_transport(&VANILLA).queue_bytes, 1000);
        let l = Link::new(p.for_transport(&PREEMPT));
        l.background_at(0, 400);
        let b = l.background_at(0, 400); // 800 bytes queued > 500
        assert_eq!(b.block_until_ns, 800 - 500 + 500 / 16);
        assert_eq!(LowWater::Auto.bytes(HostPageSize::Small), 1 << 20);
        assert_eq!(LowWater::Auto.bytes(HostPageSize::Huge2M), 4 << 20);
        assert_eq!(LowWater::Bytes(4096).bytes(HostPageSize::Huge2M), 2 << 20);
        assert_eq!("off".parse::<LowWater>(), Ok(LowWater::Off));
        assert_eq!("512K".parse::<LowWater>(), Ok(LowWater::Bytes(512 << 10)));
        assert!("lots".parse::<LowWater>().is_err());
    }

    #[test]
    fn the_receiver_holds_frames_until_they_are_due_in_order() {
        let mut h = Held::default();
        assert_eq!(h.wait_ns(0, 777), 777, "nothing held: the idle slice");
        h.hold(100_000, 'a');
        h.hold(50_000, 'b'); // arrives after 'a' on the same socket: stays behind it
        assert_eq!(h.take_due(0), None);
        assert_eq!(h.wait_ns(40_000, 777), 60_000);
        assert_eq!(h.take_due(96_000), Some('a'), "due within a few µs");
        assert_eq!(h.take_due(96_000), Some('b'));
        assert!(h.is_empty());
        h.hold(u64::MAX, 'c');
        assert!(h.any(|&c| c == 'c'));
        assert_eq!(h.pop(), Some('c'), "taken whether due or not");
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
