//! Snapshots of the KVM guest, and a restore VMM that does what Firecracker does on
//! `PUT /snapshot/load` with a `Uffd` memory backend.
//!
//! * [`take_snapshot`] boots the KVM guest (its workload, its signed pages), runs it a while,
//!   stops its vCPUs and writes the snapshot: `mem` (guest RAM, the low block then the high
//!   block, as Firecracker's memory file holds its regions back to back) and `vmstate` (the
//!   layout, the workload and every vCPU's state, as JSON).
//! * [`restore`] maps guest memory anonymously (or from hugetlb), opens a userfaultfd with
//!   `UFFD_FEATURE_EVENT_REMOVE` (as Firecracker requires; thread ids too, which Firecracker
//!   does not ask for, so that blocktime can be told per vCPU), registers both regions,
//!   connects to the handler's socket and sends the region JSON and the descriptor in the
//!   format of the Firecracker releases asked for (v1.7–v1.11 then close the socket at once;
//!   v1.12+ keep it until they are done, which ends the handler), then loads the vCPU state
//!   and runs the vCPUs: every guest page faults through the handler. After `run_for`, the
//!   guest is asked to verify its whole share of memory (its own page checks) and stop.
//!
//! # What the guest measures
//! Restore users measure work, not faults: the guest program stamps its own progress in its
//! status page (`op_done` in `pagehint_migrate::guest::kvm::program`): the program's clock
//! at its first completed operation (a page checked, a key looked up), and how many
//! operations it completed before the window's end, `run_for` after the resume on its own
//! clock. The program's clock is set to resume where the snapshot left it at the moment
//! the vCPU state is loaded, [`RestoreOutcome::resumed_ns`] (microseconds before the vCPU
//! threads start), so a stamp converts to this host's clock exactly.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};
use serde::{Deserialize, Serialize};

use super::protocol::{send_handshake, GuestRegionUffdMapping, HandshakeFormat};
use pagehint_migrate::guest::image::{Params, Template};
use pagehint_migrate::guest::kvm::program::mailbox as mb;
use pagehint_migrate::guest::kvm::vcpu::VcpuEnd;
use pagehint_migrate::guest::kvm::vm::{Tracking, VcpuState};
use pagehint_migrate::guest::kvm::{boot, GuestCounters, Machine};
use pagehint_migrate::guest::layout::{GuestLayout, HostPageSize, PARAMS_GPA, TARGET_PAGE};
use pagehint_migrate::guest::{GuestWait, STREAM_FRAME_PAGES};
use pagehint_migrate::options::Workload;
use pagehint_migrate::sys::clock::now_ns;
use pagehint_migrate::sys::pin::PinPlan;
use pagehint_migrate::sys::uffd::Userfault;

/// The stream workload's rate in the snapshot's guest (bytes/s).
pub const STREAM_RATE: u64 = 256 << 20;

/// What `vmstate` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM bytes.
    pub mem: u64,
    /// Host page size the snapshot was laid out for (4096 or 2097152).
    pub host_page: u64,
    /// The workload the guest runs.
    pub workload: String,
    /// The image seed.
    pub seed: u64,
    /// Each vCPU's saved state ([`VcpuState::encode`]), hex.
    pub vcpus: Vec<String>,
}

/// A snapshot on disk.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// Its state.
    pub state: VmState,
    /// The guest layout.
    pub layout: GuestLayout,
    /// The workload.
    pub workload: Workload,
    /// The vCPU states.
    pub vcpus: Vec<VcpuState>,
}

impl Snapshot {
    /// The memory file.
    pub fn mem_path(&self) -> PathBuf {
        self.dir.join("mem")
    }

    /// Reads the snapshot in `dir`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let p = dir.join("vmstate");
        let text = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let state: VmState =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let host = HostPageSize::from_bytes(state.host_page)
            .ok_or_else(|| format!("host page {} in vmstate", state.host_page))?;
        let workload: Workload = state.workload.parse().map_err(|e: String| e)?;
        let vcpus = state
            .vcpus
            .iter()
            .map(|h| unhex(h).and_then(|b| VcpuState::decode(&b)))
            .collect::<Option<Vec<_>>>()
            .ok_or("a vCPU state in vmstate does not decode")?;
        let layout =
            GuestLayout::new(state.mem, host, vcpus.len() as u32).map_err(|e| e.to_string())?;
        let mem = dir.join("mem");
        let len = fs::metadata(&mem)
            .map_err(|e| format!("{}: {e}", mem.display()))?
            .len();
        if len != state.mem {
            return Err(format!(
                "{}: {len} bytes, vmstate says {}",
                mem.display(),
                state.mem
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            layout,
            workload,
            vcpus,
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn kvm_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Boots the guest (`vcpus` vCPUs, `mem` bytes laid out for `host_page`), runs `workload`
/// for `warm`, stops it and writes the snapshot into `dir`.
pub fn take_snapshot(
    dir: &Path,
    mem: u64,
    host_page: HostPageSize,
    vcpus: u32,
    workload: Workload,
    seed: u64,
    warm: Duration,
) -> Result<Snapshot, String> {
    let layout = GuestLayout::new(mem, host_page, vcpus).map_err(|e| e.to_string())?;
    let pieces = boot::system_pieces(&layout)?;
    let t =
        Template::build(&layout, seed, &pieces).map_err(|e| format!("building the image: {e}"))?;
    let low = (layout.low_pages() * TARGET_PAGE) as usize;
    let map = |n: usize| MmapMut::map_anon(n.max(1)).map_err(|e| format!("mapping RAM: {e}"));
    let mut b0 = map(low)?;
    let mut b1 = map(mem as usize - low)?;
    b0[..low].copy_from_slice(&t.bytes()[..low]);
    b1[..mem as usize - low].copy_from_slice(&t.bytes()[low..]);
    for (i, w) in Params::new(&layout, workload, seed, STREAM_FRAME_PAGES)
        .encode()
        .iter()
        .enumerate()
    {
        let at = PARAMS_GPA as usize + i * 8;
        b0[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    // SAFETY: the mappings outlive the machine (dropped at the end of this function).
    let (m, _) = unsafe {
        Machine::new(
            &layout,
            [b0.as_ptr() as u64, b1.as_ptr() as u64],
            Tracking::Off,
        )
    }
    .map_err(kvm_err)?;
    m.boot(seed).map_err(kvm_err)?;
    m.set_stream_rate(
        workload.stream_rate_each(STREAM_RATE, vcpus),
        STREAM_FRAME_PAGES,
    );
    let ends: Vec<VcpuEnd> = std::thread::scope(|s| {
        let hs = m.run(s, PinPlan::OFF, GuestWait::Sleep, None);
        std::thread::sleep(warm);
        m.kick_all();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(VcpuEnd::Failed("vCPU thread panicked".into()))
            })
            .collect()
    });
    let mut states = Vec::new();
    for (i, e) in ends.into_iter().enumerate() {
        match e {
            VcpuEnd::Stopped(s) => states.push(*s),
            other => return Err(format!("vCPU {i} did not stop cleanly: {other:?}")),
        }
    }
    if let Some((i, c)) = m.counters().iter().enumerate().find(|(_, c)| c.errors > 0) {
        return Err(format!(
            "vCPU {i} found errors before the snapshot: {:?}",
            c.first_error_text()
        ));
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut memf = Vec::with_capacity(mem as usize);
    memf.extend_from_slice(&b0[..low]);
    memf.extend_from_slice(&b1[..mem as usize - low]);
    fs::write(dir.join("mem"), &memf).map_err(|e| format!("writing mem: {e}"))?;
    let state = VmState {
        mem,
        host_page: host_page.bytes(),
        workload: workload.to_string(),
        seed,
        vcpus: states.iter().map(|s| hex(&s.encode())).collect(),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
    fs::write(dir.join("vmstate"), json).map_err(|e| format!("writing vmstate: {e}"))?;
    Snapshot::load(dir)
}

/// Guest memory for a restore: one mapping per region, anonymous or hugetlb
/// (`MAP_NORESERVE`).
#[derive(Debug)]
pub struct GuestRam([MmapMut; 2]);

impl GuestRam {
    fn map(sizes: [u64; 2], huge: bool) -> io::Result<Self> {
        let map = |len: u64| {
            let mut o = MmapOptions::new();
            o.len(len.max(if huge { 2 << 20 } else { 4096 }) as usize)
                .no_reserve_swap();
            if huge {
                o.huge(Some(21));
            }
            o.map_anon()
        };
        Ok(Self([map(sizes[0])?, map(sizes[1])?]))
    }

    fn addr(&self, i: usize) -> u64 {
        self.0[i].as_ptr() as u64
    }
}

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The handler's socket.
    pub socket: PathBuf,
    /// Back guest memory with 2 MiB hugetlb pages (the snapshot must be laid out for them).
    pub hugetlb: bool,
    /// How long the workload runs before the guest is asked to verify and stop.
    pub run_for: Duration,
    /// After the guest is done, keep running (memory mapped, socket open) up to this long
    /// while `loaded()` says the handler is still loading: a VMM keeps running after its
    /// workload, and "time until all memory is loaded" needs the handler to get there.
    pub linger: Duration,
    /// Which Firecracker releases' handshake to send.
    pub handshake: HandshakeFormat,
    /// How long to wait for a handler to listen on the socket.
    pub connect_wait: Duration,
}

/// What a restore measured.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreOutcome {
    /// The resume: when the vCPU state was loaded, the program clocks set to go on from the
    /// snapshot's (ns; the vCPU threads start microseconds later).
    pub resumed_ns: u64,
    /// When the guest was asked to verify and stop (ns): `run_for` after the resume, or a
    /// little later.
    pub stop_ns: u64,
    /// When every vCPU had reported done (ns).
    pub done_ns: u64,
    /// The window: `run_for` (ns).
    pub window_ns: u64,
    /// Workload operations completed in the window, all vCPUs, as the guest counted them on
    /// its own clock (module docs).
    pub window_ops: u64,
    /// When the guest completed its first operation (ns, this host's clock; any vCPU).
    pub first_op_ns: Option<u64>,
    /// CPU time the vCPU threads got in the window (ms, all together; from each thread's
    /// `/proc/self/task/TID/schedstat`, 0 where the kernel keeps none).
    pub vcpu_run_ms: f64,
    /// Time in the window the vCPU threads were runnable but had no CPU (ms, all together):
    /// what a busy machine takes from the guest, whatever the policy.
    pub vcpu_queue_ms: f64,
    /// Workload operations done before the guest saw the stop request, all vCPUs.
    pub ops: u64,
    /// Pages verified by the guest's final check.
    pub verified: u64,
    /// The guest's page-check errors (must be 0).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Each vCPU's thread id (to attribute faults).
    pub tids: Vec<u32>,
    /// The status pages.
    #[serde(skip)]
    pub counters: Vec<GuestCounters>,
}

/// A finished restore: what it measured, and guest memory, still mapped until this is
/// dropped (a handler may still be placing pages; a VMM unmaps its memory only when it is
/// done with its handler, or when it exits).
#[derive(Debug)]
pub struct Restored {
    /// What it measured.
    pub outcome: RestoreOutcome,
    /// Guest memory.
    pub ram: GuestRam,
}

/// Program-clock ticks in `ns` on a TSC of `tsc_khz`.
fn ticks(ns: u64, tsc_khz: u32) -> u64 {
    (u128::from(ns) * u128::from(tsc_khz) / 1_000_000) as u64
}

/// Nanoseconds in `ticks` on a TSC of `tsc_khz`.
fn ticks_ns(ticks: u64, tsc_khz: u32) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_khz.max(1))) as u64
}

/// The CPU time and the run-queue wait of threads `tids` of this process, summed (ns; 0
/// for a thread whose schedstat cannot be read).
fn sched_clocks(tids: &[u32]) -> (u64, u64) {
    tids.iter()
        .filter_map(|t| {
            let s = fs::read_to_string(format!("/proc/self/task/{t}/schedstat")).ok()?;
            let mut f = s.split_whitespace().map(|w| w.parse::<u64>().ok());
            Some((f.next()??, f.next()??))
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Restores `snap` through the handler listening on `opts.socket`.
pub fn restore(
    snap: &Snapshot,
    opts: &RestoreOptions,
    loaded: &dyn Fn() -> bool,
) -> Result<Restored, String> {
    let layout = &snap.layout;
    if opts.hugetlb != (layout.host_page() == HostPageSize::Huge2M) {
        return Err(
            "hugetlb backing needs a snapshot laid out for 2 MiB pages, and only it".into(),
        );
    }
    let ranges = layout.block_ranges();
    let sizes = [ranges[0].1, ranges[1].1];
    let ram = GuestRam::map(sizes, opts.hugetlb).map_err(|e| format!("mapping guest RAM: {e}"))?;
    let uffd = Userfault::open_with_remove_events().map_err(|e| format!("userfaultfd: {e}"))?;
    if !uffd.origin().sees_kernel_faults() {
        return Err("userfaultfd sees only user-mode faults here; KVM needs kernel faults".into());
    }
    let maps = register(&ram, sizes, &uffd, layout.host_page().bytes())?;
    let sock = send_handshake(
        &opts.socket,
        &maps,
        &uffd,
        opts.handshake,
        opts.connect_wait,
    )
    .map_err(|e| format!("handshake on {}: {e}", opts.socket.display()))?;
    // SAFETY: `ram` outlives the machine (declared before it, and returned after it).
    let (m, _) = unsafe { Machine::new(layout, [ram.addr(0), ram.addr(1)], Tracking::Off) }
        .map_err(kvm_err)?;
    m.set_stream_rate(
        snap.workload.stream_rate_each(STREAM_RATE, layout.vcpus()),
        STREAM_FRAME_PAGES,
    );
    let window_ns = opts.run_for.as_nanos() as u64;
    let khz = m.tsc_khz();
    m.load(&snap.vcpus).map_err(kvm_err)?;
    let resumed_ns = now_ns();
    // Each program's clock now reads its saved value: the window ends `run_for` later.
    for (i, s) in snap.vcpus.iter().enumerate() {
        m.vm().mailboxes().write(
            i as u32,
            mb::WINDOW_END,
            s.tsc.wrapping_add(ticks(window_ns, khz)).max(1),
        );
    }
    let mut out = RestoreOutcome {
        resumed_ns,
        stop_ns: 0,
        done_ns: 0,
        window_ns,
        window_ops: 0,
        first_op_ns: None,
        vcpu_run_ms: 0.0,
        vcpu_queue_ms: 0.0,
        ops: 0,
        verified: 0,
        errors: 0,
        first_error: None,
        tids: Vec::new(),
        counters: Vec::new(),
    };
    let ends = run_window(&m, &mut out, opts.run_for);
    let until = now_ns() + opts.linger.as_nanos() as u64;
    while now_ns() < until && !loaded() {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(sock); // v1.12+: the handler's signal that the VMM is done
    for (i, e) in ends.iter().enumerate() {
        if !matches!(e, VcpuEnd::Done) {
            return Err(format!("vCPU {i}: {e:?}"));
        }
    }
    tally(&mut out, &m, snap, khz);
    drop(m);
    Ok(Restored { outcome: out, ram })
}

/// Registers guest memory's regions (`sizes`, the empty ones left out) with `uffd`: their
/// mappings for the handshake, in host pages of `page` bytes.
fn register(
    ram: &GuestRam,
    sizes: [u64; 2],
    uffd: &Userfault,
    page: u64,
) -> Result<Vec<GuestRegionUffdMapping>, String> {
    let mut maps = Vec::new();
    let mut offset = 0;
    for (i, &len) in sizes.iter().enumerate() {
        if len == 0 {
            continue;
        }
        // SAFETY: our own private mapping, alive until `ram` drops (after the VM).
        unsafe { uffd.register(ram.addr(i), len) }.map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
        maps.push(GuestRegionUffdMapping::new(ram.addr(i), len, offset, page));
        offset += len;
    }
    Ok(maps)
}

/// Runs the vCPUs for `run_for` from `out.resumed_ns` (or until one ends), measuring their
/// scheduler clocks and operations into `out`, then stops them: how each ended.
fn run_window(m: &Machine, out: &mut RestoreOutcome, run_for: Duration) -> Vec<VcpuEnd> {
    std::thread::scope(|s| {
        let hs = m.run(s, PinPlan::OFF, GuestWait::Sleep, None);
        let deadline = out.resumed_ns + run_for.as_nanos() as u64;
        // The vCPU threads' scheduler clocks over the window (each thread gives its id
        // as it starts).
        while now_ns() < deadline && m.controls().iter().any(|c| c.tid() == 0) {
            std::thread::yield_now();
        }
        let tids: Vec<u32> = m.controls().iter().map(|c| c.tid()).collect();
        let start = sched_clocks(&tids);
        while now_ns() < deadline && !hs.iter().any(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let end = sched_clocks(&tids);
        out.vcpu_run_ms = (end.0.saturating_sub(start.0)) as f64 / 1e6;
        out.vcpu_queue_ms = (end.1.saturating_sub(start.1)) as f64 / 1e6;
        out.ops = m.counters().iter().map(|c| c.ops).sum();
        out.stop_ns = now_ns();
        m.finish_all();
        let ends = hs
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(VcpuEnd::Failed("vCPU thread panicked".into()))
            })
            .collect();
        out.done_ns = now_ns();
        ends
    })
}

/// Adds the guest's own counters to `out` once its vCPUs are done: the work in the window,
/// the first operation, the checks (`khz`: the TSC's rate; `snap`: the clocks at resume).
fn tally(out: &mut RestoreOutcome, m: &Machine, snap: &Snapshot, khz: u32) {
    out.counters = m.counters();
    for (c, s) in out.counters.iter().zip(&snap.vcpus) {
        // Stamped: the first operation at or after the window's end counted those before
        // it; else every operation came before the end (the stop came after it).
        out.window_ops += if c.stamped { c.window_ops } else { c.ops };
        if c.first_op_clock != 0 {
            let t = out.resumed_ns + ticks_ns(c.first_op_clock.wrapping_sub(s.tsc), khz);
            out.first_op_ns = Some(out.first_op_ns.map_or(t, |f: u64| f.min(t)));
        }
    }
    out.tids = m.controls().iter().map(|c| c.tid()).collect();
    out.verified = out.counters.iter().map(|c| c.verified).sum();
    out.errors = out.counters.iter().map(|c| c.errors).sum();
    out.first_error = out.counters.iter().find_map(|c| c.first_error_text());
}
