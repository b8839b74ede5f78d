//! The real link both migrations cross: two network namespaces joined by a veth pair, each
//! end shaped by a `tc tbf` qdisc (this kernel has no `netem`; `tbf` is a real kernel queue
//! with a real rate).
//!
//! The source side (QEMU's source, pagehint's `--listen` source) runs in one namespace, the
//! destination in the other, so every page and every request crosses the shaped veth and
//! waits in the same kernel queue whoever sent it. Both directions are shaped alike. The
//! namespaces are removed on drop (which removes the veth pair with them).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use super::QemuError;

/// Which end of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Where the sources run.
    Source,
    /// Where the destinations run.
    Destination,
}

/// A link class: the `tbf` rate and how long its queue may get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    /// Rate in bits/s.
    pub rate_bps: u64,
    /// `tbf`'s `latency`: the longest a packet may wait in the queue (sets its byte limit).
    pub queue: Duration,
}

impl LinkSpec {
    /// `tbf` bucket size: 1 ms at the rate, at least 64 KiB (a whole GSO packet).
    pub fn burst_bytes(&self) -> u64 {
        (self.rate_bps / 8 / 1000).max(64 << 10)
    }

    /// Short name, e.g. `10G`, `1G`, `2.5G`, `800M`.
    pub fn name(&self) -> String {
        let r = self.rate_bps as f64;
        if r >= 1e9 {
            format!("{}G", trim(r / 1e9))
        } else {
            format!("{}M", trim(r / 1e6))
        }
    }

    /// The `tc` arguments after `root`.
    pub fn tbf_args(&self) -> Vec<String> {
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}bit", self.rate_bps),
            "burst".into(),
            format!("{}", self.burst_bytes()),
            "latency".into(),
            format!("{}us", self.queue.as_micros()),
        ]
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Two namespaces, a veth pair between them, a `tbf` on each end.
#[derive(Debug)]
pub struct ShapedLink {
    names: [String; 2],
    spec: LinkSpec,
}

const SOURCE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const DEST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

fn run(program: &str, args: &[&str]) -> Result<(), QemuError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| QemuError::Io(format!("running {program}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(QemuError::Setup(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl ShapedLink {
    /// Creates the namespaces (named after this process, so that parallel runs do not
    /// collide), the veth pair and the shaping. Needs root and iproute2.
    pub fn create(spec: LinkSpec) -> Result<Self, QemuError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(QemuError::Setup(
                "the shaped link needs root (network namespaces, tc)".into(),
            ));
        }
        let pid = std::process::id();
        let names = [format!("phq{pid}s"), format!("phq{pid}d")];
        // Leftovers of a killed run with this pid: remove them first.
        for n in &names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
        let link = Self { names, spec };
        let [s, d] = [&link.names[0], &link.names[1]];
        run("ip", &["netns", "add", s])?;
        run("ip", &["netns", "add", d])?;
        run(
            "ip",
            &[
                "link", "add", s, "netns", s, "type", "veth", "peer", "name", d, "netns", d,
            ],
        )?;
        for (ns, ip) in [(s, SOURCE_IP), (d, DEST_IP)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", ns],
            )?;
            run("ip", &["-n", ns, "link", "set", ns, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        link.shape(spec)?;
        Ok(link)
    }

    /// Takes `end`'s side of the veth pair down (`ip link set ... down`: a partition, nothing
    /// crosses) or up again.
    pub fn set_link(&self, end: End, up: bool) -> Result<(), QemuError> {
        let ns = self.namespace(end);
        run(
            "ip",
            &["-n", ns, "link", "set", ns, if up { "up" } else { "down" }],
        )
    }

    /// Replaces the shaping of both ends.
    pub fn shape(&self, spec: LinkSpec) -> Result<(), QemuError> {
        for ns in &self.names {
            let mut args: Vec<String> = ["-n", ns, "qdisc", "replace", "dev", ns, "root"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(spec.tbf_args());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run("tc", &a)?;
        }
        Ok(())
    }

    /// The shaping.
    pub fn spec(&self) -> LinkSpec {
        self.spec
    }

    /// The namespace of `end`.
    pub fn namespace(&self, end: End) -> &str {
        match end {
            End::Source => &self.names[0],
            End::Destination => &self.names[1],
        }
    }

    /// The address of `end` on the link.
    pub fn ip(&self, end: End) -> Ipv4Addr {
        match end {
            End::Source => SOURCE_IP,
            End::Destination => DEST_IP,
        }
    }

    /// `program` to be run inside `end`'s namespace (`ip netns exec`).
    pub fn command(&self, end: End, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.namespace(end)]).arg(program);
        c
    }

    /// What the shaping is, as `tc` was told.
    pub fn describe(&self) -> String {
        format!(
            "veth between two network namespaces, each end `tc qdisc ... root {}`",
            self.spec.tbf_args().join(" ")
        )
    }

    /// Measures the link: one TCP stream from the source end to the destination end for
    /// `secs`, bits/s received. The two ends are threads of this process moved into the
    /// namespaces (`setns` moves only the calling thread).
    pub fn probe(&self, time: Duration) -> Result<f64, QemuError> {
        let enter = |end: End| -> Result<(), QemuError> {
            let path = format!("/run/netns/{}", self.namespace(end));
            let f = File::open(&path).map_err(|e| QemuError::Io(format!("opening {path}"), e))?;
            move_into_link_name_space(f.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| QemuError::Io(format!("entering {path}"), e.into()))
        };
        let addr = SocketAddr::from((self.ip(End::Destination), 0));
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let recv = s.spawn(move || -> Result<f64, QemuError> {
                enter(End::Destination)?;
                let l =
                    TcpListener::bind(addr).map_err(|e| QemuError::Io("probe bind".into(), e))?;
                let _ = tx.send(
                    l.local_addr()
                        .map_err(|e| QemuError::Io("probe".into(), e))?,
                );
                let (mut c, _) = l
                    .accept()
                    .map_err(|e| QemuError::Io("probe accept".into(), e))?;
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                let start = Instant::now();
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(e) => return Err(QemuError::Io("probe read".into(), e)),
                    }
                }
                Ok(n as f64 * 8.0 / start.elapsed().as_secs_f64())
            });
            let send = s.spawn(move || -> Result<(), QemuError> {
                enter(End::Source)?;
                let to = rx
                    .recv_timeout(Duration::from_secs(5))
                    .map_err(|_| QemuError::Setup("the probe's receiver did not start".into()))?;
                let mut c =
                    TcpStream::connect(to).map_err(|e| QemuError::Io("probe connect".into(), e))?;
                let buf = vec![0x5au8; 1 << 20];
                let start = Instant::now();
                while start.elapsed() < time {
                    c.write_all(&buf)
                        .map_err(|e| QemuError::Io("probe write".into(), e))?;
                }
                Ok(())
            });
            let sent = send
                .join()
                .map_err(|_| QemuError::Setup("probe sender panicked".into()))?;
            let got = recv
                .join()
                .map_err(|_| QemuError::Setup("probe receiver panicked".into()))?;
            sent?;
            got
        })
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_name_and_size_their_queue() {
        let g10 = LinkSpec {
            rate_bps: 10_000_000_000,
            queue: Duration::from_millis(5),
        };
        assert_eq!(g10.name(), "10G");
        assert_eq!(g10.burst_bytes(), 1_250_000);
        assert_eq!(
            g10.tbf_args().join(" "),
            "tbf rate 10000000000bit burst 1250000 latency 5000us"
        );
        let m = LinkSpec {
            rate_bps: 800_000_000,
            queue: Duration::from_millis(5),
        };
        assert_eq!(m.name(), "800M");
        assert_eq!(m.burst_bytes(), 100_000);
        let g25 = LinkSpec {
            rate_bps: 2_500_000_000,
            ..m
        };
        assert_eq!(g25.name(), "2.5G");
        let small = LinkSpec {
            rate_bps: 100_000_000,
            ..m
        };
        assert_eq!(small.burst_bytes(), 64 << 10);
    }
}
