//! The integration a Rust VMM writes to migrate with pagehint (run:
//! `cargo run --release --example vmm --features vm-memory`).
//!
//! * **Guest memory**: two regions of a `vm_memory::GuestMemoryMmap<RegionBitmap>`, one RAM
//!   block each, backed by a shared file. Writes through vm-memory (device emulation, virtio)
//!   mark the shared [`DirtyBitmap`] through [`RegionBitmap`].
//! * **KVM**: vCPU writes bypass vm-memory; KVM reports them per memory slot. A fake KVM here
//!   writes through a second, untracked mapping of the same file and keeps per-slot dirty logs
//!   (slots 0 and 1) and a dirty ring (slot 2), as `KVM_GET_DIRTY_LOG` and
//!   `KVM_CAP_DIRTY_LOG_RING` would.
//! * **Dirty-log sync loop**: merges the logs and harvests the ring into the bitmap
//!   ([`KvmSlots`]).
//! * **Precopy**: a sender drains the bitmap with `get_and_clear` while the guest runs.
//! * **Postcopy**: the guest stops (here; in real postcopy it resumes on the destination),
//!   a [`PageScheduler`] takes over the same bitmap; three background senders and an urgent
//!   path for faults send the rest. The connection breaks half way; the destination's
//!   received bitmap rebuilds the send state (`recover_block`) and the senders resume.
//!
//! At the end the destination's memory must equal the source's, byte for byte. `main` runs
//! the phases in that order, one function each: `source`, `destination`, `precopy`,
//! `switch_to_postcopy`, `postcopy` (broken half way), `recover`, `postcopy` again, `check`.

use std::fs::OpenOptions;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagehint::vmm::{DirtyRingEntry, GpaMap, KvmSlots, RegionBitmap, SlotMapping};
use pagehint::{
    Claim, DirtyBitmap, PageLocation, PageScheduler, RamLayout, SchedulerConfig, Served,
    UrgentRequest,
};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

const MIB: usize = 1 << 20;
const REGION: usize = 16 * MIB;
const PAGE: usize = 4096;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A stand-in for KVM: vCPU writes go to guest RAM through a mapping vm-memory does not
/// track, and are logged per slot (dirty log) or in a ring, as KVM's hardware-assisted
/// dirty tracking would.
struct FakeKvm {
    vcpu_view: GuestMemoryMmap<()>,
    /// Slot id, first guest address, length, and (log slots) the dirty log words.
    log_slots: Vec<(u32, u64, usize, Vec<AtomicU64>)>,
    /// The ring slot: id, first guest address, length.
    ring_slot: (u32, u64, usize),
    ring: Mutex<Vec<DirtyRingEntry>>,
}

impl FakeKvm {
    /// A vCPU stores `value` at guest address `gpa`.
    fn vcpu_write(&self, gpa: u64, value: u64) -> Result<(), Error> {
        self.vcpu_view.write_obj(value, GuestAddress(gpa))?;
        let page = |base: u64| (gpa - base) / PAGE as u64;
        for (_, base, len, log) in &self.log_slots {
            if (*base..*base + *len as u64).contains(&gpa) {
                let p = page(*base);
                // Release: the write above is visible to whoever fetches the log.
                log[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
            }
        }
        let (slot, base, len) = self.ring_slot;
        if (base..base + len as u64).contains(&gpa) {
            self.ring
                .lock()
                .unwrap()
                .push(DirtyRingEntry::new(slot, page(base)));
        }
        Ok(())
    }

    /// `KVM_GET_DIRTY_LOG` (with clearing): the slot's log, one bit per page.
    fn get_dirty_log(&self, i: usize) -> (u32, Vec<u64>) {
        let (slot, _, _, log) = &self.log_slots[i];
        // Acquire: pairs with the vCPU's release, so the merged pages' contents are visible.
        (
            *slot,
            log.iter().map(|w| w.swap(0, Ordering::Acquire)).collect(),
        )
    }

    /// Harvests the dirty ring (`KVM_RESET_DIRTY_RINGS` afterwards in a real VMM).
    fn harvest_ring(&self) -> Vec<DirtyRingEntry> {
        std::mem::take(&mut *self.ring.lock().unwrap())
    }
}

/// One dirty-log sync: every log slot and the ring into the shared bitmap.
fn sync_dirty_log(kvm: &FakeKvm, slots: &KvmSlots, bitmap: &DirtyBitmap) -> Result<u64, Error> {
    let mut pages = 0;
    for i in 0..kvm.log_slots.len() {
        let (slot, log) = kvm.get_dirty_log(i);
        pages += slots.merge_dirty_log(bitmap, slot, &log)?;
    }
    let ring = slots.import_dirty_ring(bitmap, kvm.harvest_ring());
    if let Some(e) = ring.first_error {
        return Err(e.into());
    }
    Ok(pages + ring.marked)
}

/// The destination: its memory and which pages arrived.
struct Destination {
    mem: GuestMemoryMmap<()>,
    layout: RamLayout,
    /// Where each block lies in guest physical memory (the same on both sides).
    gpas: GpaMap,
    received: Vec<AtomicBool>,
}

impl Destination {
    /// Copies target page `page` of `block` from the source (the "network").
    fn receive(&self, src: &GuestMemoryMmap<RegionBitmap>, block: u32, page: u64) {
        let loc = PageLocation::new(block, page);
        let gpa = GuestAddress(self.gpas.gpa(loc).expect("a page of the layout"));
        let mut buf = [0u8; PAGE];
        // Reads do not mark pages dirty.
        src.read_slice(&mut buf, gpa).expect("source page");
        self.mem.write_slice(&buf, gpa).expect("destination page");
        let g = self
            .layout
            .global_index(PageLocation::new(block, page))
            .expect("a page of the layout");
        // Relaxed: bookkeeping, read after the senders are joined.
        self.received[g as usize].store(true, Ordering::Relaxed);
    }

    /// Forgets a page whose copy went stale (dirtied again after it was sent).
    fn discard(&self, block: u32, page: u64) {
        let g = self
            .layout
            .global_index(PageLocation::new(block, page))
            .expect("a page of the layout");
        // Relaxed: bookkeeping; no sender runs during the discard.
        self.received[g as usize].store(false, Ordering::Relaxed);
    }

    fn receive_claim(&self, src: &GuestMemoryMmap<RegionBitmap>, claim: &Claim) {
        for hp in claim.host_pages() {
            for page in hp.page_range() {
                self.receive(src, hp.block, page);
            }
        }
    }

    /// The received bitmap of `block`, as the destination sends it after a broken connection.
    fn received_bitmap(&self, block: u32) -> Vec<u64> {
        let b = &self.layout.blocks()[block as usize];
        let first = self
            .layout
            .global_index(PageLocation::new(block, 0))
            .expect("block exists");
        let mut words = vec![0u64; b.pages().div_ceil(64) as usize];
        for p in 0..b.pages() {
            // Relaxed: read after the senders are joined.
            if self.received[(first + p) as usize].load(Ordering::Relaxed) {
                words[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        words
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The source VMM: guest memory that tracks into the shared bitmap, and KVM's view of it.
struct Source {
    layout: RamLayout,
    bitmap: Arc<DirtyBitmap>,
    mem: GuestMemoryMmap<RegionBitmap>,
    slots: KvmSlots,
    kvm: FakeKvm,
}

fn main() -> Result<(), Error> {
    let src = source()?;
    let dest = destination(&src.layout)?;
    let left = precopy(&src, &dest)?;
    let mut sched = switch_to_postcopy(&src, &dest)?;
    let faults = postcopy(&src, &dest, &sched, Some(left / 2));
    let missing = dest
        .received
        .iter()
        // Relaxed: read after the senders were joined.
        .filter(|r| !r.load(Ordering::Relaxed))
        .count();
    println!("postcopy: the connection broke after {faults} faults; {missing} pages never arrived");
    let to_resend = recover(&mut sched, &dest)?;
    let faults = postcopy(&src, &dest, &sched, None);
    let st = sched.stats();
    println!(
        "recovered: {to_resend} pages to resend; resumed with {faults} faults; \
         background sent {} pages, urgent {} pages, {} hints taken of {} accepted",
        st.background_pages, st.urgent_pages, st.hints_taken, st.hints_accepted
    );
    check(&src, &dest)
}

/// Guest memory: one RAM block per region, region 1 declared with 2 MiB host pages, both
/// tracking into one shared bitmap; and the KVM slots over it: block 0 whole (slot 0, dirty
/// log), block 1 in two halves (slot 1 with a dirty log, slot 2 with the dirty ring).
fn source() -> Result<Source, Error> {
    let layout: RamLayout = "ram-low:16M,ram-high:16M:2M".parse()?;
    let bitmap = Arc::new(DirtyBitmap::new(&layout)?);
    let path = std::env::temp_dir().join(format!("pagehint-vmm-example-{}", std::process::id()));
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?,
    );
    std::fs::remove_file(&path)?; // the mappings keep it alive
    file.set_len(2 * REGION as u64)?;
    let regions = RegionBitmap::for_layout(&bitmap, &layout)?
        .into_iter()
        .enumerate()
        .map(|(i, tracking)| {
            let mmap = MmapRegionBuilder::new_with_bitmap(REGION, tracking)
                .with_file_offset(FileOffset::from_arc(file.clone(), (i * REGION) as u64))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()?;
            GuestRegionMmap::new(mmap, GuestAddress((i * REGION) as u64))
                .ok_or_else(|| Error::from("guest region overflows"))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mem = GuestMemoryMmap::from_regions(regions)?;

    let mut slots = KvmSlots::new();
    let half = (REGION / 2 / PAGE) as u64;
    slots.insert(
        &layout,
        SlotMapping {
            slot: 0,
            block: 0,
            first_page: 0,
            pages: 2 * half,
        },
    )?;
    slots.insert(
        &layout,
        SlotMapping {
            slot: 1,
            block: 1,
            first_page: 0,
            pages: half,
        },
    )?;
    slots.insert(
        &layout,
        SlotMapping {
            slot: 2,
            block: 1,
            first_page: half,
            pages: half,
        },
    )?;
    let log = |pages: u64| (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    let kvm = FakeKvm {
        vcpu_view: GuestMemoryMmap::from_ranges_with_files([
            (
                GuestAddress(0),
                REGION,
                Some(FileOffset::from_arc(file.clone(), 0)),
            ),
            (
                GuestAddress(REGION as u64),
                REGION,
                Some(FileOffset::from_arc(file.clone(), REGION as u64)),
            ),
        ])?,
        log_slots: vec![
            (0, 0, REGION, log(2 * half)),
            (1, REGION as u64, REGION / 2, log(half)),
        ],
        ring_slot: (2, (REGION + REGION / 2) as u64, REGION / 2),
        ring: Mutex::new(Vec::new()),
    };
    Ok(Source {
        layout,
        bitmap,
        mem,
        slots,
        kvm,
    })
}

/// The destination: empty memory at the same guest physical addresses.
fn destination(layout: &RamLayout) -> Result<Destination, Error> {
    Ok(Destination {
        mem: GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION),
            (GuestAddress(REGION as u64), REGION),
        ])?,
        layout: layout.clone(),
        gpas: GpaMap::new(layout, &[0, REGION as u64])?,
        received: (0..layout.total_pages())
            .map(|_| AtomicBool::new(false))
            .collect(),
    })
}

/// Precopy: the guest runs (2 vCPUs, 1 device) while the sync loop feeds the bitmap and the
/// precopy sender drains it with `get_and_clear`, as guest-physical ranges. Returns the pages
/// dirty at the switch.
fn precopy(src: &Source, dest: &Destination) -> Result<u64, Error> {
    let Source {
        layout,
        bitmap,
        mem,
        slots,
        kvm,
    } = src;
    bitmap.mark_all(); // the first pass sends everything
    let stop_guest = AtomicBool::new(false);
    let precopy_pages = AtomicU64::new(0);
    let guest_writes = std::thread::scope(|s| -> Result<u64, Error> {
        let mut guest = Vec::new();
        for vcpu in 0..2u64 {
            let (kvm, stop) = (&kvm, &stop_guest);
            guest.push(s.spawn(move || -> Result<u64, Error> {
                let mut x = 0x2545_f491_4f6c_dd1d ^ vcpu;
                let mut n = 0u64;
                // Relaxed: a stop request; the scope's join orders everything after it.
                while !stop.load(Ordering::Relaxed) {
                    // a working set: 7 writes in 8 go to the first 2 MiB of a region
                    let r = xorshift(&mut x);
                    let span = if r % 8 == 0 { REGION } else { 2 * MIB } as u64;
                    let gpa = ((r >> 8) % 2 * REGION as u64 + (r >> 16) % span) & !7;
                    kvm.vcpu_write(gpa, n)?;
                    n += 1;
                    if n % 256 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                Ok(n)
            }));
        }
        {
            let (mem, stop) = (&mem, &stop_guest);
            guest.push(s.spawn(move || -> Result<u64, Error> {
                // a virtio device: DMA writes through vm-memory, tracked by RegionBitmap
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                let mut n = 0u64;
                // Relaxed: as above.
                while !stop.load(Ordering::Relaxed) {
                    let gpa = xorshift(&mut x) % (2 * REGION as u64 - 512);
                    mem.write_slice(&[0x5a; 512], GuestAddress(gpa))?;
                    n += 1;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Ok(n)
            }));
        }
        let (kvm, slots, bitmap) = (&kvm, &slots, &bitmap);
        let sync = s.spawn(move || -> Result<(), Error> {
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(300) {
                sync_dirty_log(kvm, slots, bitmap)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        // the precopy sender, on this thread: host-page-aligned get_and_clear chunks
        let mut buf = [0u64; 8];
        while !sync.is_finished() {
            for block in 0..layout.blocks().len() as u32 {
                let words = bitmap.block_words(block)?;
                for from in (0..words).step_by(buf.len()) {
                    let n = buf.len().min(words - from);
                    if bitmap.get_and_clear(block, from, &mut buf[..n])? == 0 {
                        continue;
                    }
                    // the dirty words as guest-physical ranges, runs coalesced
                    for range in dest.gpas.dirty_ranges(block, from, &buf[..n])? {
                        for gpa in (range.gpa..range.gpa + range.len).step_by(PAGE) {
                            let loc = dest.gpas.location(gpa)?;
                            dest.receive(mem, loc.block, loc.page);
                            // Relaxed: a count, read after the scope.
                            precopy_pages.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        sync.join().expect("sync thread")?;
        // Relaxed: a stop request, see above.
        stop_guest.store(true, Ordering::Relaxed);
        let mut writes = 0;
        for g in guest {
            writes += g.join().expect("guest thread")?;
        }
        Ok(writes)
    })?;
    // The vCPUs stopped: one last sync, so every write is in the bitmap.
    sync_dirty_log(kvm, slots, bitmap)?;
    let left = bitmap.dirty_pages();
    println!(
        "precopy: {guest_writes} guest writes; sent {} pages while the guest ran; \
         {left} pages dirty at the switch",
        // Relaxed: read after the scope.
        precopy_pages.load(Ordering::Relaxed),
    );
    println!("  KVM import: {:?}", slots.stats());

    Ok(left)
}

/// The switch to postcopy: the destination discards what is dirty (QEMU's discard bitmap:
/// its copy is stale), then the scheduler takes over the same bitmap.
fn switch_to_postcopy(src: &Source, dest: &Destination) -> Result<PageScheduler, Error> {
    let (layout, bitmap) = (&src.layout, &src.bitmap);
    for block in 0..layout.blocks().len() as u32 {
        let mut from = 0;
        while let Some(page) = bitmap.find_next_dirty(block, from)? {
            dest.discard(block, page);
            from = page + 1;
        }
    }
    Ok(PageScheduler::with_bitmap(
        layout.clone(),
        Arc::clone(bitmap),
        SchedulerConfig::preempt_hint(),
    )?)
}

/// Runs the postcopy senders (a return path serving random faults, three background
/// scanners) until every page is sent, or until `break_after` pages were sent (the connection
/// breaks: senders stop, and what they had claimed never arrives). Returns the faults served.
fn postcopy(
    src: &Source,
    dest: &Destination,
    sched: &PageScheduler,
    break_after: Option<u64>,
) -> usize {
    let (layout, mem) = (&src.layout, &src.mem);
    let broken = AtomicBool::new(false);
    let faults = AtomicUsize::new(0);
    let sent = AtomicU64::new(0);
    let count = |claim: &Claim| {
        // Relaxed: a count; it only decides when to simulate the break.
        let n = sent.fetch_add(claim.pages_to_send(), Ordering::Relaxed);
        if break_after.is_some_and(|b| n >= b) {
            // Relaxed: the break is simulated; the scope's join orders it for the main thread.
            broken.store(true, Ordering::Relaxed);
        }
    };
    std::thread::scope(|s| {
        // the return path: faults from the destination's guest
        s.spawn(|| {
            let mut x = 0xdead_beef_u64;
            let total = layout.total_pages();
            // Relaxed: a stop request; the scope's join orders everything after it.
            while !broken.load(Ordering::Relaxed) && sched.bitmap().dirty_pages() > 0 {
                let loc = layout
                    .location_of(xorshift(&mut x) % total)
                    .expect("in range");
                let req = UrgentRequest::new(loc.block, loc.page * PAGE as u64, PAGE as u64);
                if let Ok(Served::Send(claim)) = sched.serve(req) {
                    count(&claim);
                    // Relaxed: as above.
                    if broken.load(Ordering::Relaxed) {
                        return; // in flight when the connection broke
                    }
                    dest.receive_claim(mem, &claim);
                    sched.urgent_sent(&claim);
                    // Relaxed: a count, read after the scope.
                    faults.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for scanner in sched.background_scanners(3) {
            let (broken, dest, mem, count) = (&broken, &dest, &mem, &count);
            s.spawn(move || {
                for claim in scanner {
                    count(&claim);
                    // Relaxed: as above.
                    if broken.load(Ordering::Relaxed) {
                        return; // in flight when the connection broke
                    }
                    dest.receive_claim(mem, &claim);
                }
            });
        }
    });
    faults.into_inner()
}

/// Recovery: dirty = not received, block by block. Returns the pages to send again.
fn recover(sched: &mut PageScheduler, dest: &Destination) -> Result<u64, Error> {
    let mut to_resend = 0;
    for block in 0..sched.layout().blocks().len() as u32 {
        to_resend += sched.recover_block(block, &dest.received_bitmap(block))?;
    }
    Ok(to_resend)
}

/// The destination holds the source's memory, and no write went past a region.
fn check(src: &Source, dest: &Destination) -> Result<(), Error> {
    let mem = &src.mem;
    let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    for addr in (0..2 * REGION).step_by(PAGE) {
        mem.read_slice(&mut a, GuestAddress(addr as u64))?;
        dest.mem.read_slice(&mut b, GuestAddress(addr as u64))?;
        if a != b {
            return Err(format!("page at {addr:#x} differs at the destination").into());
        }
    }
    for r in mem.iter() {
        assert_eq!(r.bitmap().ignored_marks(), 0, "no write went past a region");
    }
    println!(
        "destination memory equals the source: {} MiB checked",
        2 * REGION / MIB
    );
    Ok(())
}
