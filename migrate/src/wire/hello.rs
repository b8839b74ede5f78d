//! The destination's hello (what it asks the source to migrate) and the source's reply.
//!
//! Hello: [`HELLO_MAGIC`] (`"PHMIGRT"` and the version byte), then one little-endian `u64`
//! per [`Word`], in the order `Word` declares them (the layout, declared once), then the
//! 36-byte boot id. Every word is decoded into its typed value and checked here (enum
//! codes, host page size, claim batch, the guest layout), so the rest of the source sees
//! only values that make sense; a bad word is a [`WireError::Malformed`] saying which.
//!
//! **Adding a field**: a new `Word` at the end (never in between: the words' positions are
//! the protocol), its value in [`Hello::word`] (an exhaustive `match`: a word without one
//! does not compile), its check in [`Hello::decode`], and a [`VERSION`] bump.
//!
//! A [`Role::Resume`] hello (postcopy recovery) is followed by the destination's received
//! bitmap: a `u64` word count, then that many little-endian words, one bit per target page,
//! block after block (each block in whole words), as [`pagehint::PageScheduler::recover_block`]
//! takes it.
//!
//! Reply: `"PHMIGRS"` and the version byte `| token u64 | boot id [36] | message length u32 | message` (empty when
//! accepted, at most 4096 bytes). The token is the session's; the answer to a resume carries
//! the token of the session that resumed: the same one, or a new one when a new source
//! session took a saved session over (`crate::source::saved`), whose urgent connection and
//! later resumes then use it.
//!
//! The last byte of both magics is the protocol version ([`super::VERSION`], beside every
//! magic): a peer of another version, or another service altogether, is named as such
//! instead of being misread.

use std::net::TcpStream;

use pagehint::ClaimBatch;

use super::{read_full, write_parts, Channel, Guard, WireError, HELLO_MAGIC, REPLY_MAGIC, VERSION};
use crate::guest::layout::HostPageSize;
use crate::link::{LinkParams, Transport};
use crate::options::{
    CursorPolicy, DirtyTracking, GuestKind, GuestSpec, MigrationMode, Precopy, RunConfig,
    SourceFault, SourceHooks, Workload,
};
use crate::sys::clock::boot_id;

/// Which connection a hello opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The main connection of a new session.
    Main,
    /// The urgent connection of the session with this token.
    Urgent {
        /// The session token from the main connection's reply.
        token: u64,
    },
    /// A new main connection for the paused session with this token (postcopy recovery);
    /// the received bitmap follows the hello.
    Resume {
        /// The session token from the first main connection's reply.
        token: u64,
    },
}

/// Migration parameters the destination sends when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Main or urgent connection.
    pub role: Role,
    /// Mode.
    pub mode: MigrationMode,
    /// What the guest runs.
    pub workload: Workload,
    /// The guest.
    pub guest: GuestSpec,
    /// Precopy before postcopy.
    pub precopy: Precopy,
    /// The emulated link.
    pub link: LinkParams,
    /// Background claim batch.
    pub claim_batch: ClaimBatch,
    /// How `preempt-hints`' cursors run.
    pub cursors: CursorPolicy,
    /// Target page (global) where the background scan starts.
    pub scan_start: u64,
    /// The test hooks the source runs.
    pub hooks: SourceHooks,
    /// How long the source keeps a session whose connections broke in postcopy, waiting for
    /// the destination to resume it, in ms (0: recovery off, a cut ends the session).
    pub recover_ms: u64,
    /// Preempt modes: page requests travel on the urgent connection, and a request for a host
    /// page the background path has already claimed is answered by sending that page again
    /// on the urgent channel (a deliberate duplicate); false: requests travel on the main
    /// connection and wait for the background copy (the old behaviour).
    pub resend: bool,
    /// Destination's boot id.
    pub boot_id: [u8; 36],
}

/// Declares the hello's words in wire order, with `Word::ALL`.
macro_rules! words {
    ($($(#[$m:meta])* $w:ident,)+) => {
        /// The hello's `u64` words, in wire order: the layout of the hello.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Word {
            $($(#[$m])* $w,)+
        }

        impl Word {
            /// Every word, in wire order.
            pub const ALL: &'static [Self] = &[$(Self::$w),+];
        }
    };
}

words! {
    /// The connection's [`Role`]: 1 main, 2 urgent, 3 resume.
    Role,
    /// The session token (urgent and resume connections; 0 for main).
    Token,
    /// [`MigrationMode`] code.
    Mode,
    /// [`Workload`] code.
    Workload,
    /// [`GuestKind`] code.
    GuestKind,
    /// Guest RAM, bytes.
    Mem,
    /// Host page, bytes.
    HostPage,
    /// vCPUs.
    Vcpus,
    /// Image and workload seed.
    Seed,
    /// Stream playback rate, bytes/s.
    StreamRate,
    /// Precopy rounds.
    PrecopyRounds,
    /// [`DirtyTracking`] code.
    DirtyTracking,
    /// Link bandwidth, bits/s.
    LinkBandwidth,
    /// Link one-way delay, ns.
    LinkDelay,
    /// Link send queue, bytes.
    LinkQueue,
    /// Link interface queue, bytes.
    LinkNicQueue,
    /// Background claim batch, target pages.
    ClaimBatch,
    /// Where the background scan starts (global target page).
    ScanStart,
    /// Test hook: drop after this many host pages.
    DropAfter,
    /// Test hook: [`SourceFault`] code.
    SourceFault,
    /// Link low-water mark, bytes.
    LinkLowat,
    /// Link pacing, bits/s.
    LinkPace,
    /// Test hook: cut after this many postcopy host pages.
    CutAfter,
    /// Test hook: cuts.
    Cuts,
    /// Postcopy recovery window, ms.
    RecoverMs,
    /// 0 or 1: the resend of already-claimed pages.
    Resend,
    /// `preempt-hints`: target pages a cursor may claim after each fault.
    StreamRun,
    /// `preempt-hints`: cursor claims between two linear scan steps.
    StreamShare,
}

impl Word {
    /// Byte offset of this word in an encoded hello.
    const fn at(self) -> usize {
        8 + self as usize * 8
    }
}

const FIELDS: usize = Word::ALL.len();
const LEN: usize = 8 + FIELDS * 8 + 36;

impl Hello {
    /// Encoded size.
    pub const LEN: usize = LEN;

    /// The hello of a new session that migrates a guest set up as `cfg` in `mode` while it
    /// runs `workload`: the main connection's, the background scan from page 0, this
    /// machine's boot id.
    pub fn new(cfg: &RunConfig, mode: MigrationMode, workload: Workload) -> Self {
        Self {
            role: Role::Main,
            mode,
            workload,
            guest: cfg.guest.clone(),
            precopy: cfg.precopy,
            link: cfg.link,
            claim_batch: cfg.claim_batch,
            cursors: cfg.cursors,
            scan_start: 0,
            hooks: cfg.hooks.source,
            recover_ms: cfg.recover_ms(),
            resend: cfg.resend,
            boot_id: boot_id(),
        }
    }

    /// The same hello for another connection of the session.
    pub fn with_role(&self, role: Role) -> Self {
        Self {
            role,
            ..self.clone()
        }
    }

    /// How the asked-for mode's pages and requests travel.
    pub fn transport(&self) -> Transport {
        self.mode.transport(self.resend)
    }

    /// The value of word `w`.
    pub fn word(&self, w: Word) -> u64 {
        let (g, l, link, hooks) = (&self.guest, &self.guest.layout, &self.link, &self.hooks);
        match w {
            Word::Role => match self.role {
                Role::Main => 1,
                Role::Urgent { .. } => 2,
                Role::Resume { .. } => 3,
            },
            Word::Token => match self.role {
                Role::Main => 0,
                Role::Urgent { token } | Role::Resume { token } => token,
            },
            Word::Mode => self.mode.code(),
            Word::Workload => self.workload.code(),
            Word::GuestKind => g.kind.code(),
            Word::Mem => l.mem(),
            Word::HostPage => l.host_page().bytes(),
            Word::Vcpus => u64::from(l.vcpus()),
            Word::Seed => g.seed,
            Word::StreamRate => g.stream_rate,
            Word::PrecopyRounds => u64::from(self.precopy.rounds),
            Word::DirtyTracking => self.precopy.tracking.code(),
            Word::LinkBandwidth => link.bandwidth_bps,
            Word::LinkDelay => link.delay_ns,
            Word::LinkQueue => link.queue_bytes,
            Word::LinkNicQueue => link.nic_queue_bytes,
            Word::ClaimBatch => self.claim_batch.get(),
            Word::ScanStart => self.scan_start,
            Word::DropAfter => hooks.drop_after,
            Word::SourceFault => hooks.fault.code(),
            Word::LinkLowat => link.lowat_bytes,
            Word::LinkPace => link.pace_bps,
            Word::CutAfter => hooks.cut_after,
            Word::Cuts => hooks.cuts,
            Word::RecoverMs => self.recover_ms,
            Word::Resend => u64::from(self.resend),
            Word::StreamRun => self.cursors.run,
            Word::StreamShare => u64::from(self.cursors.share),
        }
    }

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(&HELLO_MAGIC);
        for &w in Word::ALL {
            b[w.at()..w.at() + 8].copy_from_slice(&self.word(w).to_le_bytes());
        }
        b[LEN - 36..].copy_from_slice(&self.boot_id);
        b
    }

    /// Decodes and checks a hello.
    pub fn decode(b: &[u8; LEN]) -> Result<Self, WireError> {
        let bad = |what: String| WireError::Malformed(Channel::Handshake, what);
        let found: &[u8; 8] = b[..8].try_into().expect("8 bytes");
        if *found != HELLO_MAGIC {
            return Err(bad(mismatch(
                found,
                &HELLO_MAGIC,
                "destination",
                "source",
                "its hello starts",
            )));
        }
        let v = |w: Word| u64::from_le_bytes(b[w.at()..w.at() + 8].try_into().expect("8"));
        let role = match (v(Word::Role), v(Word::Token)) {
            (1, _) => Role::Main,
            (2, token) => Role::Urgent { token },
            (3, token) => Role::Resume { token },
            (r, _) => return Err(bad(format!("unknown connection role {r}"))),
        };
        let guest = decode_guest(&v).map_err(bad)?;
        let unknown = |w: Word, what: &str| bad(format!("unknown {what} {}", v(w)));
        let mode =
            MigrationMode::from_code(v(Word::Mode)).ok_or_else(|| unknown(Word::Mode, "mode"))?;
        let workload = Workload::from_code(v(Word::Workload))
            .ok_or_else(|| unknown(Word::Workload, "workload"))?;
        let rounds = u32::try_from(v(Word::PrecopyRounds))
            .map_err(|_| bad(format!("{} precopy rounds", v(Word::PrecopyRounds))))?;
        let tracking = DirtyTracking::from_code(v(Word::DirtyTracking))
            .ok_or_else(|| unknown(Word::DirtyTracking, "dirty tracking"))?;
        let claim_batch = ClaimBatch::pages(v(Word::ClaimBatch)).map_err(|e| bad(e.to_string()))?;
        let scan_start = v(Word::ScanStart);
        if scan_start >= guest.layout.pages() {
            return Err(bad(format!(
                "scan start page {scan_start} is outside guest RAM"
            )));
        }
        let fault = SourceFault::from_code(v(Word::SourceFault))
            .ok_or_else(|| unknown(Word::SourceFault, "source fault"))?;
        let resend = match v(Word::Resend) {
            0 => false,
            1 => true,
            r => return Err(bad(format!("resend flag {r} (0 or 1)"))),
        };
        let cursors = CursorPolicy {
            run: v(Word::StreamRun),
            share: u32::try_from(v(Word::StreamShare))
                .map_err(|_| bad(format!("stream share {}", v(Word::StreamShare))))?,
        };
        cursors
            .policy(1)
            .map_err(|e| bad(format!("stream cursors: {e}")))?;
        let mut boot_id = [0u8; 36];
        boot_id.copy_from_slice(&b[LEN - 36..]);
        Ok(Self {
            role,
            mode,
            workload,
            guest,
            precopy: Precopy { rounds, tracking },
            link: LinkParams {
                bandwidth_bps: v(Word::LinkBandwidth),
                delay_ns: v(Word::LinkDelay),
                queue_bytes: v(Word::LinkQueue),
                nic_queue_bytes: v(Word::LinkNicQueue),
                lowat_bytes: v(Word::LinkLowat),
                pace_bps: v(Word::LinkPace),
            },
            claim_batch,
            cursors,
            scan_start,
            hooks: SourceHooks {
                drop_after: v(Word::DropAfter),
                cut_after: v(Word::CutAfter),
                cuts: v(Word::Cuts),
                fault,
            },
            recover_ms: v(Word::RecoverMs),
            resend,
            boot_id,
        })
    }
}

/// The guest words, checked: kind, RAM and host page (a layout that makes sense), vCPUs,
/// seed, stream rate.
fn decode_guest(v: &dyn Fn(Word) -> u64) -> Result<GuestSpec, String> {
    let kind = GuestKind::from_code(v(Word::GuestKind))
        .ok_or_else(|| format!("unknown guest kind {}", v(Word::GuestKind)))?;
    let host_page = HostPageSize::from_bytes(v(Word::HostPage))
        .ok_or_else(|| format!("host page of {} bytes (4 KiB or 2 MiB)", v(Word::HostPage)))?;
    let vcpus = u32::try_from(v(Word::Vcpus)).map_err(|_| format!("{} vCPUs", v(Word::Vcpus)))?;
    let mut guest =
        GuestSpec::new(kind, v(Word::Mem), host_page, vcpus).map_err(|e| format!("guest: {e}"))?;
    guest.seed = v(Word::Seed);
    guest.stream_rate = match v(Word::StreamRate) {
        0 => return Err("stream rate of 0 bytes/s".into()),
        r => r,
    };
    Ok(guest)
}

/// Why `found` is not the magic `want`: another version of this protocol, or another
/// service altogether (`peer` names what we expected, `how` what it sent).
fn mismatch(found: &[u8; 8], want: &[u8; 8], peer: &str, us: &str, how: &str) -> String {
    if found[..7] == want[..7] {
        format!(
            "the {peer} speaks protocol version {}, this {us} version {}",
            found[7].escape_ascii(),
            VERSION.escape_ascii()
        )
    } else {
        format!("not a pagehint-migrate {peer} ({how} \"{}\")", shown(found))
    }
}

/// `found`, an 8-byte magic, as printable text.
fn shown(found: &[u8]) -> String {
    found.escape_ascii().to_string()
}
/// Longest refusal message a reply carries.
const MAX_REPLY_MESSAGE: u32 = 4096;

/// The source's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    /// Empty when accepted, else why not.
    pub error: String,
    /// Session token for the urgent connection (after a takeover, the new session's).
    pub token: u64,
    /// Source's boot id.
    pub boot_id: [u8; 36],
}

impl HelloReply {
    /// The reply's bytes (a message longer than 4096 bytes is cut at a character
    /// boundary).
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.error.len().min(MAX_REPLY_MESSAGE as usize);
        while !self.error.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &self.error.as_bytes()[..end];
        let mut out = Vec::with_capacity(56 + msg.len());
        out.extend_from_slice(&REPLY_MAGIC);
        out.extend_from_slice(&self.token.to_le_bytes());
        out.extend_from_slice(&self.boot_id);
        out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        out.extend_from_slice(msg);
        out
    }

    /// Writes the reply.
    pub fn write(&self, s: &TcpStream, guard: &Guard<'_>) -> Result<(), WireError> {
        write_parts(s, &[&self.encode()], guard, Channel::Handshake)
    }

    /// Reads a reply; a peer that is not a pagehint-migrate source (or speaks another
    /// version) is named as such.
    pub fn read(s: &TcpStream, guard: &Guard<'_>) -> Result<Self, WireError> {
        let mut magic = [0u8; 8];
        read_full(s, &mut magic, guard, Channel::Handshake).map_err(|e| match e {
            WireError::Closed(c) => WireError::Malformed(
                c,
                "the peer closed the connection without answering the hello: not a pagehint-migrate source?".into(),
            ),
            e => e,
        })?;
        if magic != REPLY_MAGIC {
            let what = mismatch(&magic, &REPLY_MAGIC, "source", "destination", "it answered");
            return Err(WireError::Malformed(Channel::Handshake, what));
        }
        let mut head = [0u8; 48];
        read_full(s, &mut head, guard, Channel::Handshake)?;
        let len = u32::from_le_bytes(head[44..48].try_into().expect("4 bytes"));
        if len > MAX_REPLY_MESSAGE {
            return Err(WireError::Malformed(
                Channel::Handshake,
                format!("hello reply message of {len} bytes"),
            ));
        }
        let mut msg = vec![0u8; len as usize];
        read_full(s, &mut msg, guard, Channel::Handshake)?;
        let mut boot_id = [0u8; 36];
        boot_id.copy_from_slice(&head[8..44]);
        Ok(Self {
            error: String::from_utf8_lossy(&msg).into_owned(),
            token: u64::from_le_bytes(head[0..8].try_into().expect("8 bytes")),
            boot_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        let guest = GuestSpec::new(GuestKind::Kvm, 64 << 20, HostPageSize::Small, 2).unwrap();
        Hello {
            role: Role::Urgent { token: 9 },
            mode: MigrationMode::PreemptHint,
            workload: Workload::Kv,
            guest,
            precopy: Precopy {
                rounds: 3,
                tracking: DirtyTracking::Ring,
            },
            link: LinkParams::DEFAULT,
            claim_batch: ClaimBatch::pages(32).unwrap(),
            cursors: CursorPolicy { run: 512, share: 8 },
            scan_start: 7,
            hooks: SourceHooks {
                drop_after: 0,
                fault: SourceFault::DuplicatePage,
                cut_after: 100,
                cuts: 3,
            },
            recover_ms: 5000,
            resend: true,
            boot_id: [b'x'; 36],
        }
    }

    #[test]
    fn hello_round_trips() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let r = Hello {
            role: Role::Resume { token: 11 },
            ..hello()
        };
        assert_eq!(Hello::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn another_service_or_version_is_named_in_both_directions() {
        let mut b = hello().encode();
        b[7] = b'3';
        let e = Hello::decode(&b).unwrap_err().to_string();
        assert!(
            e.contains("protocol version 3, this source version 7"),
            "{e}"
        );
        b[..8].copy_from_slice(b"GET / HT");
        let e = Hello::decode(&b).unwrap_err().to_string();
        assert!(e.contains("not a pagehint-migrate destination"), "{e}");

        use std::io::Write;
        use std::sync::atomic::AtomicBool;
        let stop = AtomicBool::new(false);
        let g = Guard {
            stop: &stop,
            idle: std::time::Duration::from_secs(5),
            keepalive: None,
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let read_after = |answer: &[u8]| {
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.write_all(answer).unwrap();
            drop(s);
            super::super::configure(&c).unwrap();
            HelloReply::read(&c, &g)
        };
        let e = read_after(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a pagehint-migrate source"), "{e}");
        assert!(e.contains("SSH-2.0-"), "{e}");
        let e = read_after(b"PHMIGRS3").unwrap_err().to_string();
        assert!(
            e.contains("protocol version 3, this destination version 7"),
            "{e}"
        );
        let e = read_after(b"").unwrap_err().to_string();
        assert!(e.contains("not a pagehint-migrate source"), "{e}");
        // A real reply, refusal and all, round-trips.
        let reply = HelloReply {
            error: "no".into(),
            token: 7,
            boot_id: [b'b'; 36],
        };
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        reply.write(&s, &g).unwrap();
        super::super::configure(&c).unwrap();
        assert_eq!(HelloReply::read(&c, &g).unwrap(), reply);
    }

    /// The encoding of [`hello`], as protocol version 7 has it: a change to the layout
    /// changes these bytes (and must bump the version).
    const GOLDEN: &[&str] = &[
        "50484d4947525437020000000000000009000000000000000200000000000000040000000000000001000000",
        "0000000000000004000000000010000000000000020000000000000001000000000000000000001000000000",
        "0300000000000000020000000000000000e40b540200000050c3000000000000000080000000000000000100",
        "0000000020000000000000000700000000000000000000000000000002000000000000000000000000000000",
        "0000000000000000640000000000000003000000000000008813000000000000010000000000000000020000",
        "0000000008000000000000007878787878787878787878787878787878787878787878787878787878787878",
        "78787878",
    ];

    #[test]
    fn the_hello_encodes_as_the_protocol_says() {
        let hex: String = hello()
            .encode()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        assert_eq!(hex, GOLDEN.concat());
        assert_eq!(Hello::LEN, 8 + 28 * 8 + 36);
        assert_eq!(VERSION, b'7', "a new version needs new golden bytes");
    }

    #[test]
    fn every_bad_field_is_named() {
        let good = hello().encode();
        for (field, value, says) in [
            (2, 9u64, "unknown mode"),
            (3, 0, "unknown workload"),
            (6, 8192, "host page"),
            (7, 0, "vCPUs"),
            (11, 7, "dirty tracking"),
            (16, 48, "48"),
            (17, 1u64 << 40, "scan start"),
            (5, 3 << 20, "guest"),
            (9, 0, "stream rate of 0"),
            (25, 2, "resend flag"),
            (26, 0, "a cursor's run must be at least one page"),
            (27, 0, "at least one claim per linear scan step"),
            (27, 1 << 40, "stream share 1099511627776"),
        ] {
            let mut b = good;
            b[8 + field * 8..16 + field * 8].copy_from_slice(&value.to_le_bytes());
            let e = Hello::decode(&b).unwrap_err().to_string();
            assert!(e.contains(says), "field {field}: {e}");
        }
    }
}
