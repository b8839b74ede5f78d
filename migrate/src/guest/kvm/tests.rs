//! The guest program on a real VM, without migration: every workload runs, writes, and
//! verifies its whole share of the data area clean; and its checks catch a corrupt, a
//! misplaced, a stale and a lost page. Skipped (with the reason printed) where `/dev/kvm`
//! does not open; `.ci/run` makes that skip a failure.

use std::time::Duration;

use memmap2::MmapMut;

use super::*;
use crate::guest::image::{words_of, Params, Template, PAGE_TAG};
use crate::guest::layout::{GuestLayout, HostPageSize, GENTAB_GPA, PARAMS_GPA, TARGET_PAGE};
use crate::guest::Workload;

fn kvm_or_skip(test: &str) -> bool {
    ready_or_skip(test)
}

/// Guest RAM as two anonymous mappings filled from a template.
struct Ram {
    blocks: [MmapMut; 2],
    layout: GuestLayout,
}

impl Ram {
    fn new(layout: &GuestLayout, seed: u64, workload: Workload) -> Self {
        Self::with(layout, seed, workload, true)
    }

    /// Guest RAM with the host-built image (`built`), or with only the boot pieces and a
    /// parameter page asking the program to build the image itself.
    fn with(layout: &GuestLayout, seed: u64, workload: Workload, built: bool) -> Self {
        let pieces = boot::system_pieces(layout).unwrap();
        let low = (layout.low_pages() * TARGET_PAGE) as usize;
        let mut b0 = MmapMut::map_anon(low).unwrap();
        let b1 = MmapMut::map_anon(layout.mem() as usize - low).unwrap();
        if built {
            let t = Template::build(layout, seed, &pieces).unwrap();
            b0.copy_from_slice(&t.bytes()[..low]);
            let mut b1 = b1;
            b1.copy_from_slice(&t.bytes()[low..]);
            return Self::finish(layout, seed, workload, [b0, b1], 0);
        }
        for (gpa, bytes) in &pieces {
            b0[*gpa as usize..*gpa as usize + bytes.len()].copy_from_slice(bytes);
        }
        Self::finish(layout, seed, workload, [b0, b1], 1)
    }

    fn finish(
        layout: &GuestLayout,
        seed: u64,
        workload: Workload,
        blocks: [MmapMut; 2],
        init: u64,
    ) -> Self {
        let mut ram = Self {
            blocks,
            layout: layout.clone(),
        };
        let mut params = Params::new(layout, workload, seed, 16);
        params.init = init;
        let params = params.encode();
        for (i, w) in params.iter().enumerate() {
            ram.write_u64(PARAMS_GPA + i as u64 * 8, *w);
        }
        ram
    }

    fn at(&mut self, page: u64) -> &mut [u8] {
        let low = self.layout.low_pages();
        let (b, p) = if page < low {
            (0, page)
        } else {
            (1, page - low)
        };
        &mut self.blocks[b][(p * TARGET_PAGE) as usize..((p + 1) * TARGET_PAGE) as usize]
    }

    fn write_u64(&mut self, addr: u64, v: u64) {
        let page = addr / TARGET_PAGE;
        let off = (addr % TARGET_PAGE) as usize;
        self.at(page)[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn words(&mut self, page: u64) -> Vec<u64> {
        words_of(self.at(page), 0)
    }

    fn addrs(&self) -> [u64; 2] {
        [
            self.blocks[0].as_ptr() as u64,
            self.blocks[1].as_ptr() as u64,
        ]
    }
}

#[test]
fn every_workload_runs_writes_and_verifies_clean() {
    if !kvm_or_skip("every_workload_runs_writes_and_verifies_clean") {
        return;
    }
    let layout = GuestLayout::new(32 << 20, HostPageSize::Small, 2).unwrap();
    for &w in Workload::ALL {
        let mut ram = Ram::new(&layout, 3, w);
        let counters = run_and_finish(&mut ram, Duration::from_millis(150));
        let verified: u64 = counters.iter().map(|c| c.verified).sum();
        assert_eq!(
            verified,
            layout.data.end - layout.data.start,
            "{w}: {counters:?}"
        );
        for (i, c) in counters.iter().enumerate() {
            assert_eq!(c.errors, 0, "{w} vCPU {i}: {:?}", c.first_error_text());
            assert_eq!(c.state, mb::DONE, "{w} vCPU {i}");
        }
        let ops: u64 = counters.iter().map(|c| c.ops).sum();
        let writes: u64 = counters.iter().map(|c| c.writes).sum();
        assert!(ops > 100, "{w}: {ops} ops");
        assert!(writes > 0, "{w}: no writes");
        if w == Workload::Stream {
            assert!(counters[0].frames > 10, "{counters:?}");
        }
    }
}

/// Boots, runs `run_for`, asks the programs to finish (verify) and waits for them.
fn run_and_finish(ram: &mut Ram, run_for: Duration) -> Vec<GuestCounters> {
    run_until(ram, run_for, |_| true)
}

/// Runs the guest for at least `run_for`, then until `done` holds for its counters (checked
/// every 10 ms, for at most 30 s more: a loaded CI machine may give the vCPUs little CPU),
/// then asks every vCPU to finish.
fn run_until(
    ram: &mut Ram,
    run_for: Duration,
    done: impl Fn(&[GuestCounters]) -> bool,
) -> Vec<GuestCounters> {
    let layout = ram.layout.clone();
    // SAFETY: `ram` outlives the machine.
    let (m, _) = unsafe { Machine::new(&layout, ram.addrs(), Tracking::Log) }.unwrap();
    m.boot(5).unwrap();
    m.set_stream_rate(256 << 20, 16);
    let ends: Vec<VcpuEnd> = std::thread::scope(|s| {
        let handles = m.run(s, PinPlan::OFF, GuestWait::Sleep, None);
        std::thread::sleep(run_for);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done(&m.counters()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        m.finish_all();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, e) in ends.iter().enumerate() {
        assert!(matches!(e, VcpuEnd::Done), "vCPU {i}: {e:?}");
    }
    m.counters()
}

#[test]
fn the_guest_catches_corrupt_misplaced_stale_and_lost_pages() {
    if !kvm_or_skip("the_guest_catches_corrupt_misplaced_stale_and_lost_pages") {
        return;
    }
    let layout = GuestLayout::new(32 << 20, HostPageSize::Small, 1).unwrap();
    let signed = |ram: &mut Ram, from: u64| {
        (from..layout.data.end)
            .find(|&p| ram.words(p)[2] & PAGE_TAG == PAGE_TAG)
            .unwrap()
    };
    let cases: [(&str, PageFault); 4] = [
        ("corrupt", PageFault::Corrupt),
        ("misplaced", PageFault::Misplaced),
        ("stale", PageFault::Stale),
        ("lost", PageFault::Lost),
    ];
    for (what, expect) in cases {
        let mut ram = Ram::new(&layout, 3, Workload::Kv);
        let p = signed(&mut ram, layout.data.start + 10);
        match what {
            "corrupt" => ram.at(p)[100] ^= 0x40,
            "misplaced" => {
                let q = signed(&mut ram, p + 1);
                let copy = ram.at(q).to_vec();
                ram.at(p).copy_from_slice(&copy);
            }
            "stale" => {
                // The table says the guest has written the page since (generation 4).
                let at = GENTAB_GPA + p * 4;
                let off = (at % TARGET_PAGE) as usize;
                ram.at(at / TARGET_PAGE)[off..off + 4].copy_from_slice(&4u32.to_le_bytes());
            }
            _ => ram.at(p).fill(0),
        }
        let c = run_and_finish(&mut ram, Duration::from_millis(20));
        assert_eq!(c[0].errors, 1, "{what}: {:?}", c[0].first_error_text());
        let (kind, page, ..) = c[0].first_error.unwrap();
        assert_eq!((kind, page), (expect, p), "{what}");
    }
}

#[test]
fn a_booted_guest_builds_the_image_the_host_would() {
    if !kvm_or_skip("a_booted_guest_builds_the_image_the_host_would") {
        return;
    }
    let layout = GuestLayout::new(32 << 20, HostPageSize::Small, 2).unwrap();
    let mut ram = Ram::with(&layout, 9, Workload::Seq, false);
    // The guest builds its image first (about a second unloaded): run until every vCPU has
    // also run its workload.
    let c = run_until(&mut ram, Duration::from_millis(1500), |c| {
        c.iter().all(|c| c.ops > 0)
    });
    for (i, c) in c.iter().enumerate() {
        assert_eq!(c.errors, 0, "vCPU {i}: {:?}", c.first_error_text());
        assert!(c.ops > 0, "vCPU {i} ran its workload after the build");
    }
    // Compare the data area and the generation table with the host's template; the seq
    // workload has rewritten some pages since, so compare those only by their check.
    let t = Template::build(&layout, 9, &boot::system_pieces(&layout).unwrap()).unwrap();
    let (mut same, mut rewritten) = (0, 0);
    for p in layout.data.clone() {
        let gen_host = crate::guest::image::generation(t.bytes(), p);
        let mine = ram.at(p).to_vec();
        let host = &t.bytes()[(p * TARGET_PAGE) as usize..((p + 1) * TARGET_PAGE) as usize];
        let at = GENTAB_GPA + p * 4;
        let off = (at % TARGET_PAGE) as usize;
        let gen_mine =
            u32::from_le_bytes(ram.at(at / TARGET_PAGE)[off..off + 4].try_into().unwrap());
        if gen_mine == gen_host {
            assert_eq!(&mine[..], host, "page {p} differs from the host's image");
            same += 1;
        } else {
            // Only the seq windows are written, each by its own vCPU.
            let window = (0..layout.vcpus()).map(|v| layout.seq_window(v));
            assert!(
                window.clone().any(|w| w.contains(&p)) && gen_mine > gen_host,
                "page {p}: {gen_host} -> {gen_mine}"
            );
            rewritten += 1;
        }
    }
    let windows: u64 = (0..layout.vcpus())
        .map(|v| layout.seq_window(v))
        .map(|w| w.end - w.start)
        .sum();
    assert!(same > layout.data.end - layout.data.start - windows);
    let _ = rewritten;
}
