//! The destination's hello (what it asks the source to migrate) and the source's reply.
//!
//! Hello: `"PHMIGRT"` and the version byte, then 26 little-endian `u64` fields in [`Hello::encode`]'s order, then
//! the 36-byte boot id. Every field is decoded into its typed value and checked here (enum
//! codes, host page size, claim batch, the guest layout), so the rest of the source sees
//! only values that make sense; a bad field is a [`WireError::Malformed`] saying which.
//!
//! A [`Role::Resume`] hello (postcopy recovery) is followed by the destination's received
//! bitmap: a `u64` word count, then that many little-endian words, one bit per target page,
//! block after block (each block in whole words), as [`pagehint::PageScheduler::recover_block`]
//! takes it.
//!
//! Reply: `"PHMIGRS"` and the version byte `| token u64 | boot id [36] | message length u32 | message` (empty when
//! accepted, at most 4096 bytes).
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
    DirtyTracking, GuestKind, GuestSpec, MigrationMode, Precopy, SourceFault, Workload,
};

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
    /// Target page (global) where the background scan starts.
    pub scan_start: u64,
    /// Test hook: the source drops both connections after this many host pages (0: never).
    pub drop_after: u64,
    /// Test hook: a fault the source injects.
    pub source_fault: SourceFault,
    /// Test hook: the source cuts both connections after this many postcopy host pages sent
    /// on one pair of connections (0: never), [`cuts`](Self::cuts) times.
    pub cut_after: u64,
    /// Test hook: how many times the source cuts the connections.
    pub cuts: u64,
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
const FIELDS: usize = 26;
const LEN: usize = 8 + FIELDS * 8 + 36;

impl Hello {
    /// How the asked-for mode's pages and requests travel.
    pub fn transport(&self) -> Transport {
        self.mode.transport(self.resend)
    }

    /// Encoded size.
    pub const LEN: usize = LEN;

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; LEN] {
        let (role, token) = match self.role {
            Role::Main => (1, 0),
            Role::Urgent { token } => (2, token),
            Role::Resume { token } => (3, token),
        };
        let l = &self.guest.layout;
        let vals: [u64; FIELDS] = [
            role,
            token,
            self.mode.code(),
            self.workload.code(),
            self.guest.kind.code(),
            l.mem(),
            l.host_page().bytes(),
            u64::from(l.vcpus()),
            self.guest.seed,
            self.guest.stream_rate,
            u64::from(self.precopy.rounds),
            self.precopy.tracking.code(),
            self.link.bandwidth_bps,
            self.link.delay_ns,
            self.link.queue_bytes,
            self.link.nic_queue_bytes,
            self.claim_batch.get(),
            self.scan_start,
            self.drop_after,
            self.source_fault.code(),
            self.link.lowat_bytes,
            self.link.pace_bps,
            self.cut_after,
            self.cuts,
            self.recover_ms,
            u64::from(self.resend),
        ];
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(&HELLO_MAGIC);
        for (i, v) in vals.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
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
        let v = |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().expect("8"));
        let role = match (v(0), v(1)) {
            (1, _) => Role::Main,
            (2, token) => Role::Urgent { token },
            (3, token) => Role::Resume { token },
            (r, _) => return Err(bad(format!("unknown connection role {r}"))),
        };
        let mode =
            MigrationMode::from_code(v(2)).ok_or_else(|| bad(format!("unknown mode {}", v(2))))?;
        let workload =
            Workload::from_code(v(3)).ok_or_else(|| bad(format!("unknown workload {}", v(3))))?;
        let kind = GuestKind::from_code(v(4))
            .ok_or_else(|| bad(format!("unknown guest kind {}", v(4))))?;
        let host_page = HostPageSize::from_bytes(v(6))
            .ok_or_else(|| bad(format!("host page of {} bytes (4 KiB or 2 MiB)", v(6))))?;
        let vcpus = u32::try_from(v(7)).map_err(|_| bad(format!("{} vCPUs", v(7))))?;
        let mut guest =
            GuestSpec::new(kind, v(5), host_page, vcpus).map_err(|e| bad(format!("guest: {e}")))?;
        guest.seed = v(8);
        guest.stream_rate = match v(9) {
            0 => return Err(bad("stream rate of 0 bytes/s".into())),
            r => r,
        };
        let rounds = u32::try_from(v(10)).map_err(|_| bad(format!("{} precopy rounds", v(10))))?;
        let tracking = DirtyTracking::from_code(v(11))
            .ok_or_else(|| bad(format!("unknown dirty tracking {}", v(11))))?;
        let claim_batch = ClaimBatch::pages(v(16)).map_err(|e| bad(e.to_string()))?;
        if v(17) >= guest.layout.pages() {
            return Err(bad(format!(
                "scan start page {} is outside guest RAM",
                v(17)
            )));
        }
        let source_fault = SourceFault::from_code(v(19))
            .ok_or_else(|| bad(format!("unknown source fault {}", v(19))))?;
        let resend = match v(25) {
            0 => false,
            1 => true,
            r => return Err(bad(format!("resend flag {r} (0 or 1)"))),
        };
        let mut boot_id = [0u8; 36];
        boot_id.copy_from_slice(&b[LEN - 36..]);
        Ok(Self {
            role,
            mode,
            workload,
            guest,
            precopy: Precopy { rounds, tracking },
            link: LinkParams {
                bandwidth_bps: v(12),
                delay_ns: v(13),
                queue_bytes: v(14),
                nic_queue_bytes: v(15),
                lowat_bytes: v(20),
                pace_bps: v(21),
            },
            claim_batch,
            scan_start: v(17),
            drop_after: v(18),
            source_fault,
            cut_after: v(22),
            cuts: v(23),
            recover_ms: v(24),
            resend,
            boot_id,
        })
    }
}

/// Longest refusal message a reply carries.
const MAX_REPLY_MESSAGE: u32 = 4096;

/// The source's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    /// Empty when accepted, else why not.
    pub error: String,
    /// Session token for the urgent connection.
    pub token: u64,
    /// Source's boot id.
    pub boot_id: [u8; 36],
}

impl HelloReply {
    /// Writes the reply.
    pub fn write(&self, s: &TcpStream, guard: &Guard<'_>) -> Result<(), WireError> {
        let msg = self.error.as_bytes();
        let msg = &msg[..msg.len().min(MAX_REPLY_MESSAGE as usize)];
        let mut head = Vec::with_capacity(56);
        head.extend_from_slice(&REPLY_MAGIC);
        head.extend_from_slice(&self.token.to_le_bytes());
        head.extend_from_slice(&self.boot_id);
        head.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        write_parts(s, &[&head, msg], guard, Channel::Handshake)
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
            scan_start: 7,
            drop_after: 0,
            source_fault: SourceFault::DuplicatePage,
            cut_after: 100,
            cuts: 3,
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
            e.contains("protocol version 3, this source version 6"),
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
            e.contains("protocol version 3, this destination version 6"),
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
        ] {
            let mut b = good;
            b[8 + field * 8..16 + field * 8].copy_from_slice(&value.to_le_bytes());
            let e = Hello::decode(&b).unwrap_err().to_string();
            assert!(e.contains(says), "field {field}: {e}");
        }
    }
}
