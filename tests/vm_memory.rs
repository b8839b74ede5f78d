//! vm-memory integration (feature `vm-memory`): `GuestMemoryMmap<RegionBitmap>` tracks the
//! guest's writes into a pagehint `DirtyBitmap`, checked the way vm-memory checks its own
//! `AtomicBitmap` (its `test_guest_memory_and_region`, `test_bytes` and
//! `test_volatile_memory` helpers are private, so they are ported here onto the public API),
//! and the bitmap then drives a `PageScheduler` that sends exactly the written pages.
#![cfg(feature = "vm-memory")]

use std::fmt::Debug;
use std::mem::size_of_val;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pagehint::vmm::RegionBitmap;
use pagehint::{DirtyBitmap, PageLocation, PageScheduler, RamLayout, SchedulerConfig};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, VolatileMemory,
};

const REGION: usize = 0x10000;

/// Two adjacent 64 KiB regions tracking into one shared bitmap.
fn shared_memory() -> (RamLayout, Arc<DirtyBitmap>, GuestMemoryMmap<RegionBitmap>) {
    let layout: RamLayout = "r0:64K,r1:64K".parse().unwrap();
    let bitmap = Arc::new(DirtyBitmap::new(&layout).unwrap());
    let regions = RegionBitmap::for_layout(&bitmap, &layout)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let mmap = MmapRegionBuilder::new_with_bitmap(REGION, b)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .unwrap();
            GuestRegionMmap::new(mmap, GuestAddress((i * REGION) as u64)).unwrap()
        })
        .collect();
    let mem = GuestMemoryMmap::from_regions(regions).unwrap();
    (layout, bitmap, mem)
}

/// The same guest memory through vm-memory's own constructor: standalone bitmaps.
fn standalone_memory() -> GuestMemoryMmap<RegionBitmap> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ])
    .unwrap()
}

fn range_is_clean<B: Bitmap>(b: &B, start: usize, len: usize) -> bool {
    (start..start + len).all(|offset| !b.dirty_at(offset))
}

fn range_is_dirty<B: Bitmap>(b: &B, start: usize, len: usize) -> bool {
    (start..start + len).all(|offset| b.dirty_at(offset))
}

fn check_range<B: Bitmap>(b: &B, start: usize, len: usize, clean: bool) -> bool {
    if clean {
        range_is_clean(b, start, len)
    } else {
        range_is_dirty(b, start, len)
    }
}

/// vm-memory's `test_bytes`: `write`, `write_slice`, `write_obj` and `store` each mark the
/// range they write, `step` bytes apart.
fn check_bytes<F, G, M, A>(bytes: &M, check_range_fn: F, address_fn: G, step: usize)
where
    F: Fn(&M, usize, usize, bool) -> bool,
    G: Fn(usize) -> A,
    M: Bytes<A>,
    <M as Bytes<A>>::E: Debug,
{
    const BUF_SIZE: usize = 1024;
    let buf = vec![1u8; BUF_SIZE];
    let mut dirty_offset = 0x1000;
    let val = 1u64;

    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    assert_eq!(
        bytes.write(&buf, address_fn(dirty_offset)).unwrap(),
        BUF_SIZE
    );
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));

    dirty_offset += step;
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    bytes.write_slice(&buf, address_fn(dirty_offset)).unwrap();
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));

    dirty_offset += step;
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    bytes.write_obj(val, address_fn(dirty_offset)).unwrap();
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));

    dirty_offset += step;
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    bytes
        .store(val, address_fn(dirty_offset), Ordering::Relaxed)
        .unwrap();
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));
}

/// vm-memory's `test_guest_memory_region`.
fn check_guest_memory_region<R: GuestMemoryRegion>(region: &R) {
    let dirty_addr = MemoryRegionAddress(0x0);
    let val = 123u64;
    let dirty_len = size_of_val(&val);
    let slice = region.get_slice(dirty_addr, dirty_len).unwrap();
    assert!(range_is_clean(&region.bitmap(), 0, region.len() as usize));
    assert!(range_is_clean(slice.bitmap(), 0, dirty_len));
    region.write_obj(val, dirty_addr).unwrap();
    assert!(range_is_dirty(
        &region.bitmap(),
        dirty_addr.0 as usize,
        dirty_len
    ));
    assert!(range_is_dirty(slice.bitmap(), 0, dirty_len));
    check_bytes(
        region,
        |r: &R, start, len, clean| check_range(&r.bitmap(), start, len, clean),
        |offset| MemoryRegionAddress(offset as u64),
        0x1000,
    );
}

/// vm-memory's `test_guest_memory_and_region`, for a guest memory built by `f`.
fn check_guest_memory_and_region<M: GuestMemoryBackend, F: Fn() -> M>(f: F) {
    let m = f();
    let dirty_addr = GuestAddress(0x1000);
    let val = 123u64;
    let dirty_len = size_of_val(&val);
    let (region, region_addr) = m.to_region_addr(dirty_addr).unwrap();
    let mut slices = m.get_slices(dirty_addr, dirty_len);
    let slice = slices.next().unwrap().unwrap();
    assert!(slices.next().is_none());
    assert!(range_is_clean(&region.bitmap(), 0, region.len() as usize));
    assert!(range_is_clean(slice.bitmap(), 0, dirty_len));
    m.write_obj(val, dirty_addr).unwrap();
    assert!(range_is_dirty(
        &region.bitmap(),
        region_addr.0 as usize,
        dirty_len
    ));
    assert!(range_is_dirty(slice.bitmap(), 0, dirty_len));

    check_guest_memory_region(f().find_region(GuestAddress(0)).unwrap());

    let check_range_closure = |m: &M, start: usize, len: usize, clean: bool| -> bool {
        m.get_slices(GuestAddress(start as u64), len).all(|r| {
            let slice = r.unwrap();
            check_range(slice.bitmap(), 0, slice.len(), clean)
        })
    };
    check_bytes(
        &f(),
        check_range_closure,
        |offset| GuestAddress(offset as u64),
        0x1000,
    );
}

/// vm-memory's `test_volatile_memory`: volatile slices, references and array references.
fn check_volatile_memory<M: VolatileMemory>(m: &M) {
    assert!(m.len() >= 0x8000);
    let (dirty_offset, get_ref_offset, array_ref_offset) = (0x1000, 0x2000, 0x3000);
    let val = 123u64;
    let dirty_len = size_of_val(&val);
    let s1 = m.as_volatile_slice();
    let s2 = m.get_slice(dirty_offset, dirty_len).unwrap();
    assert!(range_is_clean(s1.bitmap(), 0, s1.len()));
    assert!(range_is_clean(s2.bitmap(), 0, s2.len()));
    s1.write_obj(val, dirty_offset).unwrap();
    assert!(range_is_dirty(s1.bitmap(), dirty_offset, dirty_len));
    assert!(range_is_dirty(s2.bitmap(), 0, dirty_len));
    let v_ref = m.get_ref::<u64>(get_ref_offset).unwrap();
    assert!(range_is_clean(s1.bitmap(), get_ref_offset, dirty_len));
    v_ref.store(val);
    assert!(range_is_dirty(s1.bitmap(), get_ref_offset, dirty_len));
    let arr_ref = m.get_array_ref::<u64>(array_ref_offset, 1).unwrap();
    assert!(range_is_clean(s1.bitmap(), array_ref_offset, dirty_len));
    arr_ref.store(0, val);
    assert!(range_is_dirty(s1.bitmap(), array_ref_offset, dirty_len));
}

#[test]
fn shared_bitmap_passes_vm_memory_guest_memory_checks() {
    check_guest_memory_and_region(|| shared_memory().2);
}

#[test]
fn standalone_bitmaps_pass_vm_memory_guest_memory_checks() {
    check_guest_memory_and_region(standalone_memory);
}

#[test]
fn shared_bitmap_passes_vm_memory_volatile_memory_checks() {
    let (_, _, mem) = shared_memory();
    check_volatile_memory(&**mem.find_region(GuestAddress(0)).unwrap());
    let mem = standalone_memory();
    check_volatile_memory(&**mem.find_region(GuestAddress(0)).unwrap());
}

#[test]
fn guest_writes_land_in_the_shared_bitmap_per_block() {
    let (layout, bitmap, mem) = shared_memory();
    // 8 bytes at the last page of region 0 and 8 at the first of region 1, in one write
    mem.write_slice(&[0xab; 16], GuestAddress(REGION as u64 - 8))
        .unwrap();
    // a write_obj in the middle of region 1
    mem.write_obj(7u32, GuestAddress(REGION as u64 + 0x5000))
        .unwrap();
    let dirty: Vec<PageLocation> = (0..layout.total_pages())
        .map(|g| layout.location_of(g).unwrap())
        .filter(|&loc| bitmap.is_dirty(loc).unwrap())
        .collect();
    assert_eq!(
        dirty,
        vec![
            PageLocation::new(0, 15),
            PageLocation::new(1, 0),
            PageLocation::new(1, 5)
        ]
    );
    // reads mark nothing
    let _: u64 = mem.read_obj(GuestAddress(0x3000)).unwrap();
    assert_eq!(bitmap.dirty_pages(), 3);
    // the same bits are what a precopy consumer drains
    let mut words = [0u64; 1];
    assert_eq!(bitmap.get_and_clear(1, 0, &mut words).unwrap(), 2);
    assert_eq!(words[0], 0b10_0001);
    // nothing was past an end
    for r in mem.iter() {
        assert_eq!(r.bitmap().region().ignored_marks(), 0);
    }
}

#[test]
fn the_scheduler_sends_exactly_what_the_guest_wrote_with_its_contents() {
    let (layout, bitmap, mem) = shared_memory();
    for (i, addr) in [0x0u64, 0x4000, 0x10_008, 0x1f_ff8].into_iter().enumerate() {
        mem.write_obj(0x1111_0000u64 + i as u64, GuestAddress(addr))
            .unwrap();
    }
    let sched =
        PageScheduler::with_bitmap(layout.clone(), bitmap, SchedulerConfig::default()).unwrap();
    let mut sent = Vec::new();
    for claim in sched.background_scanners(2).into_iter().flatten() {
        for hp in claim.host_pages() {
            for page in hp.page_range() {
                // the sender reads the page through guest memory
                let base = hp.block as u64 * REGION as u64 + page * 4096;
                let mut buf = [0u8; 4096];
                mem.read_slice(&mut buf, GuestAddress(base)).unwrap();
                sent.push((
                    PageLocation::new(hp.block, page),
                    buf.iter().any(|&b| b != 0),
                ));
            }
        }
    }
    sent.sort();
    // default batch is 16 pages: claims cover whole 16-page chunks around the dirty pages,
    // and every dirty page (the ones with non-zero contents) is among them exactly once
    let written: Vec<_> = sent.iter().filter(|(_, nz)| *nz).map(|(l, _)| *l).collect();
    assert_eq!(
        written,
        vec![
            PageLocation::new(0, 0),
            PageLocation::new(0, 4),
            PageLocation::new(1, 0),
            PageLocation::new(1, 15)
        ]
    );
    let mut pages: Vec<_> = sent.iter().map(|(l, _)| *l).collect();
    pages.dedup();
    assert_eq!(pages.len(), sent.len(), "I1: a page sent twice");
    assert_eq!(sched.bitmap().dirty_pages(), 0);
}

#[test]
fn marks_past_a_region_end_are_cut_and_counted() {
    let (_, bitmap, mem) = shared_memory();
    let r1 = mem.find_region(GuestAddress(REGION as u64)).unwrap();
    // vm-memory never marks past a region itself; a direct mark past the end is cut
    r1.bitmap().mark_dirty(REGION - 0x800, 0x1000);
    r1.bitmap().slice_at(REGION).mark_dirty(0, 1);
    assert_eq!(r1.bitmap().region().ignored_marks(), 2);
    assert_eq!(bitmap.block_dirty_pages(1).unwrap(), 1);
    assert_eq!(bitmap.block_dirty_pages(0).unwrap(), 0);
}

/// `AtomicBitmap` parity: a standalone bitmap (`NewBitmap::with_len`, what
/// `GuestMemoryMmap::from_ranges` builds) uses the host's page size, as `AtomicBitmap` does;
/// both agree on `len` and on which offsets a write dirtied.
#[test]
fn standalone_bitmaps_use_the_host_page_size_like_atomic_bitmap() {
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    // SAFETY: sysconf has no preconditions.
    let host = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    for len in [0, 1, 4096, 5000, 1 << 20, (1 << 20) + 1] {
        let ours = RegionBitmap::with_len(len);
        let theirs = AtomicBitmap::with_len(len);
        assert_eq!(ours.len(), theirs.len(), "len {len}");
        if len == 0 {
            continue;
        }
        assert_eq!(ours.page_size(), host);
        let (off, n) = (len / 3, len.min(100));
        ours.mark_dirty(off, n);
        theirs.mark_dirty(off, n);
        for probe in (0..len).step_by(host as usize / 2) {
            assert_eq!(
                ours.dirty_at(probe),
                theirs.dirty_at(probe),
                "len {len} at {probe}"
            );
        }
        assert_eq!(ours.get_and_reset(), theirs.get_and_reset(), "len {len}");
    }
}

/// `get_and_reset`, `reset`, `len` and `Clone`, which Cloud Hypervisor and Firecracker call
/// on `AtomicBitmap`: the same words; `reset` refuses while a scheduler drives the bitmap;
/// a clone shares the block.
#[test]
fn region_bitmap_get_and_reset_reset_and_clone() {
    let (layout, bitmap, _mem) = shared_memory();
    let r1 = RegionBitmap::for_block(Arc::clone(&bitmap), &layout, 1).unwrap();
    assert_eq!(r1.len(), 16);
    let clone = r1.clone();
    clone.mark_dirty(0x3000, 0x1001); // pages 3 and 4, through the clone
    assert!(r1.dirty_at(0x4000), "the clone shares the block");
    assert_eq!(r1.get_and_reset(), [0b11000]);
    assert!(!clone.dirty_at(0x3000));

    r1.mark_dirty(0, 0x3000);
    assert_eq!(r1.reset(), Ok(3));
    assert_eq!(bitmap.dirty_pages(), 0);

    r1.mark_dirty(0, 0x1000);
    let sched = PageScheduler::with_bitmap(
        layout.clone(),
        Arc::clone(&bitmap),
        SchedulerConfig::preempt(),
    )
    .unwrap();
    assert_eq!(
        r1.reset(),
        Err(pagehint::vmm::RegionBitmapError::Driven { block: 1 }),
        "pages a scheduler drives are not discarded"
    );
    assert_eq!(sched.background().count(), 1, "the page is still sent");
    drop(sched);
    assert_eq!(r1.reset(), Ok(0));
}
