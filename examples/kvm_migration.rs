//! A rust-vmm VMM wires pagehint in (run: `cargo run --release --example kvm_migration
//! --features vm-memory,kvm [-- --dirty-log manual]`; needs `/dev/kvm`).
//!
//! The VMM has what a rust-vmm VMM has: a vm-memory `GuestMemoryMmap` over two regions with a
//! hole between them, a real KVM VM whose memory slots map them, and a vCPU running a guest
//! that writes pages of both regions, while a device model writes through vm-memory. It
//! migrates the guest to a second `GuestMemoryMmap` ("the destination"):
//!
//! * **precopy**: three rounds while the vCPU runs: `KVM_GET_DIRTY_LOG` of every slot into
//!   the shared bitmap, then a drain of the bitmap as GPA ranges, each range copied over;
//!   with `--dirty-log manual`, KVM's log is cleared chunk by chunk as the drain takes it
//!   (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_CLEAR_DIRTY_LOG`) instead of at every sync;
//! * **switch**: the vCPU stops; a last sync;
//! * **postcopy**: a `PageScheduler` over the same bitmap; the destination faults on one
//!   guest-physical address (an urgent request by GPA, served whole, with the hint), and the
//!   background path sends the rest.
//!
//! It then checks that every page dirty at the switch was sent exactly once in postcopy, and
//! that the destination's memory equals the source's byte for byte.
//!
//! **The glue**: the lines marked `// glue` are all the code that exists because of pagehint
//! (imports aside): 10 lines, rustfmt-formatted, counted with
//! `grep -c '// glue$' examples/kvm_migration.rs`. Manual clearing (`--dirty-log manual`) is
//! the lines marked `// glue: manual`: 3, of which 2 replace the drain's one line. The
//! dirty-rate lines (`// optional`) are what a VMM adds to decide when to switch over.
//! Everything else is what the VMM does anyway (describes and maps memory, runs KVM, copies
//! pages, hears faults) or this example's own checks.
//!
//! Where `/dev/kvm` does not open it says why and exits 0, unless `PAGEHINT_REQUIRE_KVM` is set
//! (as `scripts/test-all.sh` sets it wherever `/dev/kvm` opens): then it fails.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use pagehint::vmm::{kvm_log, GpaMap, GpaRange, KvmSlots, RegionBitmap};
use pagehint::{DirtyBitmap, DirtyRate, PageScheduler, SchedulerConfig};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

type Error = Box<dyn std::error::Error + Send + Sync>;

const PAGE: u64 = 4096;
const REGION: usize = 256 << 10;
/// Two regions with a hole (0x40000..0x80000) between them, as the VMM describes them.
const REGIONS: [(GuestAddress, usize); 2] =
    [(GuestAddress(0), REGION), (GuestAddress(0x8_0000), REGION)];
/// The guest's code: page 63 of region 0 (real mode, CS = 0x3f00).
const CODE_GPA: u64 = 0x3_f000;
/// Where the destination faults in postcopy: a page the guest writes in region 1.
const FAULT_GPA: u64 = 0x8_3010;

/// The guest, 16-bit real mode, AL = the pass number: writes AL into each of the first 16
/// pages of region 0 (ES = 0) and, on odd passes, of region 1 (DS = 0x8000), then `hlt`;
/// the next `KVM_RUN` starts the next pass.
const GUEST: [u8; 27] = [
    0x31, 0xdb, // 0: xor bx, bx
    0xb9, 0x10, 0x00, // 2: mov cx, 16
    0x26, 0x88, 0x47, 0x08, // 5: mov [es:bx+8], al
    0xa8, 0x01, // 9: test al, 1
    0x74, 0x03, // 11: jz 16
    0x88, 0x47, 0x10, // 13: mov [bx+0x10], al
    0x81, 0xc3, 0x00, 0x10, // 16: add bx, 0x1000
    0xe2, 0xef, // 20: loop 5
    0xf4, // 22: hlt
    0xfe, 0xc0, // 23: inc al
    0xeb, 0xe5, // 25: jmp 0
];

fn main() -> Result<(), Error> {
    let manual = match std::env::args().skip_while(|a| a != "--dirty-log").nth(1) {
        None => false,
        Some(m) if m == "auto" => false,
        Some(m) if m == "manual" => true,
        Some(m) => return Err(format!("--dirty-log {m}: auto or manual").into()),
    };
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) if std::env::var_os("PAGEHINT_REQUIRE_KVM").is_some() => {
            return Err(
                format!("PAGEHINT_REQUIRE_KVM is set but /dev/kvm does not open: {e}").into(),
            )
        }
        Err(e) => {
            println!("kvm_migration: skipped, /dev/kvm does not open: {e}");
            return Ok(());
        }
    };
    let vm = kvm.create_vm()?;

    // Setup: the layout, the GPA map and the shared bitmap from the region descriptions, then
    // guest memory whose regions track into the bitmap, then KVM's slots over the regions.
    let (layout, map) = GpaMap::from_regions(PAGE, REGIONS)?; // glue
    let bitmap = Arc::new(DirtyBitmap::new(&layout)?); // glue
    let mem = guest_memory(RegionBitmap::for_layout(&bitmap, &layout)?)?; // glue
    let dest = GuestMemoryMmap::<()>::from_ranges(&REGIONS)?;
    if manual {
        kvm_log::enable_manual_protect(&vm, false)?; // glue: manual
    }
    map_slots(&vm, &mem)?;
    let slots = KvmSlots::from_gpa_map(&map); // glue
    mem.write_slice(&GUEST, GuestAddress(CODE_GPA))?; // the VMM loads the guest
    let mut vcpu = vm.create_vcpu(0)?;
    real_mode(&mut vcpu)?;

    // The copy to the destination (the network, here), counting postcopy's sends per page.
    let postcopy = Cell::new(false);
    let postcopy_sent = RefCell::new(BTreeMap::<u64, u32>::new());
    let mut send = |r: GpaRange| -> Result<(), Error> {
        let mut buf = vec![0u8; r.len as usize];
        mem.read_slice(&mut buf, GuestAddress(r.gpa))?; // reads do not mark pages dirty
        dest.write_slice(&buf, GuestAddress(r.gpa))?;
        if postcopy.get() {
            for page in (r.gpa..r.gpa + r.len).step_by(PAGE as usize) {
                *postcopy_sent.borrow_mut().entry(page).or_default() += 1;
            }
        }
        Ok(())
    };

    // Precopy: the vCPU runs on its own thread while the VMM syncs and drains.
    bitmap.mark_all(); // the first round sends everything
    let stop = AtomicBool::new(false);
    let passes = AtomicU64::new(0);
    let mut rate = DirtyRate::new(Duration::from_millis(100)); // optional
    std::thread::scope(|s| -> Result<(), Error> {
        let guest = s.spawn(|| run_vcpu(&mut vcpu, &stop, &passes));
        for round in 1..=3 {
            wait_for_passes(&passes, 2)?; // the guest writes while precopy runs
                                          // The device model: a DMA write through vm-memory (RegionBitmap marks it).
            mem.write_slice(&[round as u8; 512], GuestAddress(0x8_0000 + 40 * PAGE))?;
            slots.sync_dirty_log(&bitmap, |m| vm.get_dirty_log(m.slot, m.log_bytes()))?; // glue
            let (dirty, per_sec) = (bitmap.dirty_count(), rate.sample(&bitmap)); // optional
            if manual {
                let mut drain = map.drain(&bitmap)?.clear_kvm_log(&slots, &vm); // glue: manual
                drain.try_for_each(&mut send)?; // glue: manual
            } else {
                map.drain(&bitmap)?.try_for_each(&mut send)?; // glue
            }
            let per_sec = per_sec.unwrap_or(0.0);
            println!(
                "precopy round {round}: {dirty} dirty pages, {per_sec:.0} pages/s newly dirtied"
            );
        }
        // The guest runs on until the switch (two passes: both regions written), then stops.
        wait_for_passes(&passes, 2)?;
        // Relaxed: a stop request; the scope's join orders everything after it.
        stop.store(true, Ordering::Relaxed);
        guest.join().expect("vCPU thread")
    })?;
    slots.sync_dirty_log(&bitmap, |m| vm.get_dirty_log(m.slot, m.log_bytes()))?; // the last sync
    let at_switch = dirty_gpas(&map, &bitmap)?;
    println!(
        "switch: {} pages dirty ({:?})",
        at_switch.len(),
        slots.stats()
    );

    // Postcopy: the scheduler takes over the bitmap; the destination faults on a GPA.
    postcopy.set(true);
    let sched = PageScheduler::with_bitmap(layout, bitmap, SchedulerConfig::preempt_hint())?; // glue
    let fault = map.request_at(GuestAddress(FAULT_GPA), 1)?; // glue
    map.serve_urgent(&sched, fault)?.try_for_each(&mut send)?; // glue
    map.ranges(sched.background()).try_for_each(&mut send)?; // glue

    let sent = postcopy_sent.take();
    check(&mem, &dest, &at_switch, &sent, &sched)
}

/// Guest memory: anonymous regions, each tracking into its block of the shared bitmap (the
/// VMM's usual region setup, with pagehint's bitmaps instead of vm-memory's `AtomicBitmap`).
fn guest_memory(tracking: Vec<RegionBitmap>) -> Result<GuestMemoryMmap<RegionBitmap>, Error> {
    let regions = REGIONS
        .iter()
        .zip(tracking)
        .map(|(&(addr, len), bitmap)| {
            let mmap = MmapRegionBuilder::new_with_bitmap(len, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()?;
            GuestRegionMmap::new(mmap, addr).ok_or_else(|| Error::from("region overflows"))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// KVM memory slot *i* = guest memory region *i*, with dirty logging.
fn map_slots(vm: &VmFd, mem: &GuestMemoryMmap<RegionBitmap>) -> Result<(), Error> {
    for (slot, &(addr, len)) in REGIONS.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: addr.0,
            memory_size: len as u64,
            userspace_addr: mem.get_host_address(addr)? as u64,
        };
        // SAFETY: the region's memory is mapped by `mem`, which outlives the VM.
        unsafe { vm.set_user_memory_region(region) }?;
    }
    Ok(())
}

/// Real mode at `CODE_GPA`, ES = region 0, DS = region 1, AL = 1.
fn real_mode(vcpu: &mut VcpuFd) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = CODE_GPA;
    sregs.cs.selector = (CODE_GPA >> 4) as u16;
    sregs.es.base = 0;
    sregs.es.selector = 0;
    sregs.ds.base = REGIONS[1].0 .0;
    sregs.ds.selector = (REGIONS[1].0 .0 >> 4) as u16;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0;
    regs.rax = 1;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// Runs the guest pass after pass until `stop`.
fn run_vcpu(vcpu: &mut VcpuFd, stop: &AtomicBool, passes: &AtomicU64) -> Result<(), Error> {
    // Relaxed: a stop request; the scope's join orders everything after it.
    while !stop.load(Ordering::Relaxed) {
        match vcpu.run()? {
            // Relaxed: a progress count; the guest's writes reach the VMM through KVM's log.
            VcpuExit::Hlt => passes.fetch_add(1, Ordering::Relaxed),
            other => return Err(format!("unexpected exit from the guest: {other:?}").into()),
        };
        std::thread::sleep(Duration::from_micros(200));
    }
    // Relaxed: read by the thread that counted.
    println!("the vCPU ran {} passes", passes.load(Ordering::Relaxed));
    Ok(())
}

/// Waits until the vCPU has run `n` more passes (however loaded the machine is).
fn wait_for_passes(passes: &AtomicU64, n: u64) -> Result<(), Error> {
    // Relaxed: a progress count, polled.
    let target = passes.load(Ordering::Relaxed) + n;
    let start = std::time::Instant::now();
    // Relaxed: as above.
    while passes.load(Ordering::Relaxed) < target {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("the vCPU made no progress for a minute".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The GPAs of the dirty pages (the example's own record, for the check).
fn dirty_gpas(map: &GpaMap, bitmap: &DirtyBitmap) -> Result<Vec<u64>, Error> {
    let mut out = vec![];
    for block in 0..bitmap.blocks() as u32 {
        let mut from = 0;
        while let Some(page) = bitmap.find_next_dirty(block, from)? {
            out.push(map.gpa(pagehint::PageLocation::new(block, page))?);
            from = page + 1;
        }
    }
    Ok(out)
}

/// Every page dirty at the switch sent exactly once in postcopy, nothing else; the
/// destination equal to the source.
fn check(
    mem: &GuestMemoryMmap<RegionBitmap>,
    dest: &GuestMemoryMmap<()>,
    at_switch: &[u64],
    sent: &BTreeMap<u64, u32>,
    sched: &PageScheduler,
) -> Result<(), Error> {
    let want: BTreeMap<u64, u32> = at_switch.iter().map(|&g| (g, 1)).collect();
    if *sent != want {
        return Err(format!("postcopy sent {sent:?}, expected each of {at_switch:x?} once").into());
    }
    if !at_switch.contains(&(FAULT_GPA & !(PAGE - 1))) {
        return Err("the faulting page was not dirty at the switch".into());
    }
    let (mut a, mut b) = (vec![0u8; REGION], vec![0u8; REGION]);
    for &(addr, _) in &REGIONS {
        mem.read_slice(&mut a, addr)?;
        dest.read_slice(&mut b, addr)?;
        if a != b {
            return Err(format!("the region at {:#x} differs at the destination", addr.0).into());
        }
    }
    let st = sched.stats();
    println!(
        "postcopy: {} pages, each dirty page sent once (urgent {}, background {}); \
         destination memory equals the source ({} KiB)",
        at_switch.len(),
        st.urgent_pages,
        st.background_pages,
        (2 * REGION) >> 10,
    );
    Ok(())
}
