//! The side-by-side run: for each link class, a shaped link; on it, for each workload, QEMU's
//! migrations, then pagehint's, alternating so that both see the machine in the same state.

use std::path::Path;
use std::time::{Duration, Instant};

use super::cli::CompareOptions;
use super::export::{Comparison, LinkInfo};
use super::netns::ShapedLink;
use super::ours::{self, OursSetup};
use super::peer::{self, QemuSetup};
use super::side::{self, RunKey, SideRow};
use super::QemuError;
use crate::guest::disk::{self, DiskSpec};
use crate::guest::kvm::{frame_tsc, vm::host_tsc_khz};
use crate::guest::layout::{GuestLayout, HostPageSize};
use crate::guest::STREAM_FRAME_PAGES;
use crate::sys::pin::PinPlan;

/// Port of QEMU's migration on the destination.
const QEMU_PORT: u16 = 4451;
/// Port of pagehint's source.
const PAGEHINT_PORT: u16 = 4452;

/// Runs the comparison; `exe` is this `pagehint-migrate`, `line` receives one line per run.
pub fn run(
    o: &CompareOptions,
    exe: &Path,
    mut line: impl FnMut(&SideRow),
) -> Result<Comparison, QemuError> {
    let started = Instant::now();
    let qemu_version = peer::version(&o.qemu)?;
    let qemu_peer = format!("QEMU {}", peer::short_version(&qemu_version));
    crate::guest::kvm::vm::probe().map_err(|e| QemuError::Setup(format!("KVM: {e}")))?;
    let tsc_khz = host_tsc_khz().map_err(|e| QemuError::Setup(format!("KVM: {e}")))?;
    let workdir = &o.workdir.0;
    std::fs::create_dir_all(workdir)
        .map_err(|e| QemuError::Io(format!("creating {}", workdir.display()), e))?;
    let layout = GuestLayout::new(o.mem, HostPageSize::Small, 1)
        .map_err(|e| QemuError::Setup(format!("guest layout: {e}")))?;
    let mut disks = Vec::new();
    for &w in &o.workloads {
        let spec = DiskSpec {
            layout: layout.clone(),
            workload: w,
            seed: o.seed,
            frame_tsc: frame_tsc(o.stream_rate, STREAM_FRAME_PAGES, tsc_khz),
        };
        let path = workdir.join(format!("guest-{w}.img"));
        let img = disk::image(&spec).map_err(QemuError::Setup)?;
        std::fs::write(&path, img)
            .map_err(|e| QemuError::Io(format!("writing {}", path.display()), e))?;
        disks.push(path);
    }
    // First touches of memory this VM never used are several times slower (see
    // crate::sys::warm::warm_up): pay them once, before anything is measured.
    crate::sys::warm::warm_up(3 * o.mem, 0).map_err(QemuError::Setup)?;
    let mut rows = Vec::new();
    let mut links = Vec::new();
    for &spec in &o.links {
        let link = ShapedLink::create(spec)?;
        let name = spec.name();
        let measured = link.probe(Duration::from_secs(1))?;
        links.push(LinkInfo {
            name: name.clone(),
            rate_bps: spec.rate_bps,
            measured_bps: measured,
            shaping: link.describe(),
        });
        let qsetup = QemuSetup {
            binary: o.qemu.clone(),
            mem: o.mem,
            cap_bps: (spec.rate_bps as f64 * o.cap) as u64,
            settle: o.settle,
            workdir: workdir.clone(),
            port: QEMU_PORT,
            pin: if o.pin { PinPlan::auto() } else { PinPlan::OFF },
        };
        let osetup = OursSetup {
            exe: exe.to_path_buf(),
            mem: o.mem,
            pace_bps: (spec.rate_bps as f64 * o.cap) as u64,
            seed: o.seed,
            stream_rate: o.stream_rate,
            lowat: o.lowat.clone(),
            pin: o.pin,
            workdir: workdir.clone(),
            port: PAGEHINT_PORT,
        };
        let source = if o.modes.is_empty() {
            None
        } else {
            Some(ours::Source::start(&link, &osetup)?)
        };
        for (&w, disk) in o.workloads.iter().zip(&disks) {
            let key = |peer, mode| RunKey {
                link: &name,
                rate_bps: spec.rate_bps,
                peer,
                mode,
                workload: w.name(),
            };
            for &m in &o.qemu_modes {
                let k = key(&qemu_peer, m.name());
                let row = match peer::migrate(&link, &qsetup, m, disk) {
                    Ok(q) => SideRow::qemu(k, &q),
                    Err(e) => SideRow::failed(k, e.to_string()),
                };
                line(&row);
                rows.push(row);
            }
            if source.is_none() {
                continue;
            }
            let results = ours::migrate(&link, &osetup, &o.modes, w);
            for m in &o.modes {
                let k = key("pagehint", m.name());
                let row = match &results {
                    Ok(rs) => match rs.iter().find(|r| r.setup.mode == m.name()) {
                        Some(r) => SideRow::pagehint(&name, spec.rate_bps, r),
                        None => SideRow::failed(k, "the destination reported no such run".into()),
                    },
                    Err(e) => SideRow::failed(k, e.to_string()),
                };
                line(&row);
                rows.push(row);
            }
        }
    }
    let targets = side::targets(&rows);
    Ok(Comparison {
        qemu_version,
        setup: format!(
            "KVM guest, 1 vCPU, {} MiB, 4 KiB pages, pure postcopy; both capped at {:.0}% of the link rate (QEMU: max-bandwidth and max-postcopy-bandwidth, pagehint: its background channel paced, TCP_NOTSENT_LOWAT {} in preempt modes); threads {}",
            o.mem >> 20,
            o.cap * 100.0,
            o.lowat,
            if o.pin {
                "pinned alike (guest + fault path on one CPU, bulk streams on the other)"
            } else {
                "not pinned"
            },
        ),
        links,
        rows,
        targets,
        seconds: started.elapsed().as_secs_f64(),
    })
}
