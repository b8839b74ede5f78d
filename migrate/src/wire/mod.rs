//! The harness's wire format, declared here once, over blocking I/O that never hangs
//! ([`io`]).
//!
//! Two TCP connections per migration, as QEMU's postcopy-preempt has:
//! * **main**: source → destination the precopy pages, the switch-over, then the page frames
//!   of the background channel (and, in vanilla, every page); destination → source the return
//!   path (page requests, `DONE`, pings).
//! * **urgent**: source → destination page frames sent by the return-path thread (preempt);
//!   destination → source the page requests in preempt modes with `resend` (the default),
//!   so that a request never waits behind the main connection's socket, which the
//!   background stream keeps busy in both directions (its lock, its backlog). Which mode
//!   uses which is [`crate::options::Transport`]'s to say.
//!
//! # A whole session
//! ```text
//! destination                                   source
//!   main ── Hello{Main, every parameter} ─────────▶  checks it, prepares guest RAM (and VM)
//!   main ◀──────────── HelloReply{token | error} ──
//! urgent ── Hello{Urgent, token} ─────────────────▶  accepts only that token
//! urgent ◀──────────── HelloReply{token} ─────────
//!   main ── PING ─▶ ◀─ PONG{source clock} ── (×n)    clock offset (across machines)
//!   main ── START ────────────────────────────────▶  precopy begins, the guest runs there
//!   main ◀──────────── PAGES / ZERO (precopy) ─────  rounds of dirty pages
//!   main ◀──────────── SWITCH{vCPUs, to discard} ──  the guest stops there; postcopy begins
//!        (discard, register userfaultfd, the guest resumes here)
//!   main ◀──────────── PAGES / ZERO (background) ──  the scheduler's background scan
//! urgent ── REQUEST{stream, page} ────────────────▶  (vanilla, or --resend off: on main)
//! urgent ◀──────────── PAGES (urgent, maybe RESEND)  the urgent path (preempt modes)
//!   main ── DONE ─────────────────────────────────▶  every page is in
//!   main ◀──────────── PONG (×n, while it sums) ───  a keep-alive every 100 ms
//!   main ◀──────────── SUMMARY{counters, sums} ────  then the source closes
//!                      (ABORT{why}: the source failed, on either channel, at any time)
//!   ... connections break in postcopy (recovery on):
//!   main ── Hello{Resume, token} + received bitmap ▶  the paused session resumes
//!   main ◀──────────── HelloReply{token'} ──────────  token' = token, or a new source
//!                                                      session's that took it over
//! urgent ── Hello{Urgent, token'} ────────────────▶  postcopy goes on
//! ```
//!
//! * [`frame`]: page frames and return-path frames;
//! * [`hello`]: what the destination asks for, and the source's answer;
//! * [`switch`]: the switch-over from precopy to postcopy (vCPU state, pages to discard);
//! * [`summary`]: what the source reports at the end;
//! * [`io`]: reads and writes with a stop flag and an idle limit, and [`WireError`].
//!
//! # Versions and magics
//! Every magic of the protocol is here, beside [`VERSION`]. The hello and its reply end
//! their magic with the version byte, so a peer of another version (or another service
//! altogether) is named as such at the first message; frames, which only follow a hello,
//! carry short magics of their own. Bump [`VERSION`] with any change to any message.

pub mod frame;
pub mod hello;
pub mod io;
pub mod summary;
pub mod switch;

pub use frame::{FrameHeader, FrameKind, RequestBody, RpHeader, RpKind};
pub use hello::{Hello, HelloReply, Role};
pub use io::{
    configure, read_full, wait_readable, write_parts, Channel, Guard, WireError, POLL_SLICE,
};
pub use summary::Summary;
pub use switch::{PendingBuilder, PendingSet, Segment, SwitchOver};

/// The protocol version both directions carry (the last byte of the hello's and the
/// reply's magic).
pub const VERSION: u8 = b'7';
/// The hello's magic: `"PHMIGRT"` and [`VERSION`].
pub const HELLO_MAGIC: [u8; 8] = versioned(*b"PHMIGRT");
/// The hello reply's magic: `"PHMIGRS"` and [`VERSION`].
pub const REPLY_MAGIC: [u8; 8] = versioned(*b"PHMIGRS");
/// A page frame's magic.
pub const PAGE_MAGIC: u16 = 0x4750;
/// A return-path frame's magic.
pub const RP_MAGIC: u16 = 0x5052;

/// A magic: seven letters, then [`VERSION`] (so that bumping the version changes both).
const fn versioned(name: [u8; 7]) -> [u8; 8] {
    let mut m = [VERSION; 8];
    let mut i = 0;
    while i < 7 {
        m[i] = name[i];
        i += 1;
    }
    m
}
