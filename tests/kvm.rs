//! Real KVM: a tiny real-mode guest writes known pages of two memory slots, and what KVM
//! reports — `KVM_GET_DIRTY_LOG` per slot, or a `KVM_CAP_DIRTY_LOG_RING` harvest — goes
//! through [`KvmSlots`] into a [`DirtyBitmap`]. The pages marked must be exactly the pages
//! written (I7's input side: nothing lost, nothing invented).
//!
//! The layout is one block `ram` of 32 target pages mapped by two slots, as QEMU maps
//! `pc.ram` below and above a hole: slot 0 = pages 0..16 at GPA 0, slot 1 = pages 16..32 at
//! GPA 0x10000. The guest's code sits in page 1 and is only read.
//!
//! These tests need `/dev/kvm`. Where it does not open they print that they skipped, unless
//! `PAGEHINT_REQUIRE_KVM` is set (as `scripts/test-all.sh` does wherever `/dev/kvm` opens):
//! then a skip is a failure.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use pagehint::vmm::{DirtyRingEntry, KvmSlots, SlotMapping};
use pagehint::{DirtyBitmap, PageLocation, RamLayout};

const PAGE: u64 = 4096;
const SLOT_PAGES: u64 = 16;
const CODE_GPA: u64 = 0x1000;
/// Pages the guest writes: (slot, page in the slot). Page 1 of slot 0 holds the code.
const WRITES: [(u32, u64); 6] = [(0, 0), (0, 3), (0, 15), (1, 0), (1, 7), (1, 8)];

const DIRTY_GFN_F_DIRTY: u32 = 1;
const DIRTY_GFN_F_RESET: u32 = 2;

/// `/dev/kvm`, or `None` after saying why the test skips (a failure if KVM is required).
fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) if std::env::var_os("PAGEHINT_REQUIRE_KVM").is_some() => {
            panic!("{test}: PAGEHINT_REQUIRE_KVM is set but /dev/kvm does not open: {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped, /dev/kvm does not open: {e}");
            None
        }
    }
}

/// The guest: `mov byte [seg:page*4096 + 8], 0xab` for each write (ES = slot 0's base, DS =
/// slot 1's), then `hlt`.
fn program() -> Vec<u8> {
    let mut code = Vec::new();
    for &(slot, page) in &WRITES {
        if slot == 0 {
            code.push(0x26); // ES:
        }
        let off = (page * PAGE + 8) as u16;
        code.extend_from_slice(&[0xc6, 0x06]); // mov byte [disp16], imm8
        code.extend_from_slice(&off.to_le_bytes());
        code.push(0xab);
    }
    code.push(0xf4); // hlt
    code
}

/// Guest memory: 32 pages of anonymous memory, unmapped on drop.
struct GuestRam {
    base: NonNull<u8>,
    len: usize,
}

impl GuestRam {
    fn new() -> Self {
        let len = (2 * SLOT_PAGES * PAGE) as usize;
        // SAFETY: a fresh private anonymous mapping, owned by this value.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap guest RAM");
        let base = NonNull::new(p.cast::<u8>()).expect("mmap returned a non-null address");
        let code = program();
        // SAFETY: the code fits in page 1 of the mapping made above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                code.as_ptr(),
                base.as_ptr().add(CODE_GPA as usize),
                code.len(),
            )
        };
        Self { base, len }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once, after the VM is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The layout, the bitmap, and the slot map of the two KVM slots.
fn tracking() -> (RamLayout, DirtyBitmap, KvmSlots) {
    let layout = RamLayout::single("ram", 2 * SLOT_PAGES * PAGE, PAGE).unwrap();
    let bitmap = DirtyBitmap::new(&layout).unwrap();
    let mut slots = KvmSlots::new();
    for slot in 0..2 {
        slots
            .insert(
                &layout,
                SlotMapping {
                    slot,
                    block: 0,
                    first_page: u64::from(slot) * SLOT_PAGES,
                    pages: SLOT_PAGES,
                },
            )
            .unwrap();
    }
    (layout, bitmap, slots)
}

/// Registers both slots with dirty logging on.
fn map_slots(vm: &VmFd, ram: &GuestRam) {
    for slot in 0..2u32 {
        let region = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: u64::from(slot) * SLOT_PAGES * PAGE,
            memory_size: SLOT_PAGES * PAGE,
            userspace_addr: ram.base.as_ptr() as u64 + u64::from(slot) * SLOT_PAGES * PAGE,
        };
        // SAFETY: the region lies inside `ram`, which outlives the VM in every test.
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    }
}

/// Runs the guest in real mode from `CODE_GPA` until it halts.
fn run_guest(vcpu: &mut VcpuFd) {
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.es.base = 0;
    sregs.es.selector = 0;
    sregs.ds.base = SLOT_PAGES * PAGE;
    sregs.ds.selector = ((SLOT_PAGES * PAGE) >> 4) as u16;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::Hlt => {}
        other => panic!("unexpected exit from the test guest: {other:?}"),
    }
}

/// The pages the guest wrote, as block pages.
fn written() -> BTreeSet<u64> {
    WRITES
        .iter()
        .map(|&(slot, page)| u64::from(slot) * SLOT_PAGES + page)
        .collect()
}

/// The pages the bitmap holds dirty (claiming them, which also checks each is claimable).
fn marked(bitmap: &DirtyBitmap) -> BTreeSet<u64> {
    (0..2 * SLOT_PAGES)
        .filter(|&p| {
            bitmap
                .claim_page(PageLocation::new(0, p))
                .unwrap()
                .is_claimed()
        })
        .collect()
}

#[test]
fn get_dirty_log_into_kvm_slots_marks_exactly_the_pages_written() {
    let Some(kvm) = kvm_or_skip("get_dirty_log_into_kvm_slots_marks_exactly_the_pages_written")
    else {
        return;
    };
    let ram = GuestRam::new();
    let vm = kvm.create_vm().unwrap();
    map_slots(&vm, &ram);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let (_layout, bitmap, slots) = tracking();

    // Nothing written yet: the first logs are empty (pages were write-protected at slot
    // creation; nothing reported is invented).
    for slot in 0..2 {
        let log = vm
            .get_dirty_log(slot, (SLOT_PAGES * PAGE) as usize)
            .unwrap();
        assert_eq!(slots.merge_dirty_log(&bitmap, slot, &log).unwrap(), 0);
    }
    run_guest(&mut vcpu);
    let mut total = 0;
    for slot in 0..2 {
        let log = vm
            .get_dirty_log(slot, (SLOT_PAGES * PAGE) as usize)
            .unwrap();
        total += slots.merge_dirty_log(&bitmap, slot, &log).unwrap();
    }
    assert_eq!(total, WRITES.len() as u64);
    assert_eq!(marked(&bitmap), written());
    // KVM handed the log over and cleared it: a second sync adds nothing.
    for slot in 0..2 {
        let log = vm
            .get_dirty_log(slot, (SLOT_PAGES * PAGE) as usize)
            .unwrap();
        assert_eq!(slots.merge_dirty_log(&bitmap, slot, &log).unwrap(), 0);
    }
    assert_eq!(bitmap.dirty_pages(), 0);
    // SAFETY: reads back what the guest wrote, in the mapping it wrote to.
    let byte = unsafe {
        *ram.base
            .as_ptr()
            .add((SLOT_PAGES * PAGE + 7 * PAGE + 8) as usize)
    };
    assert_eq!(byte, 0xab, "the guest ran and wrote");
}

/// One vCPU's dirty ring, mapped from its descriptor.
struct Ring {
    entries: NonNull<kvm_dirty_gfn>,
    count: usize,
    fetch: usize,
}

impl Ring {
    fn map(vcpu: &VcpuFd, bytes: usize) -> Self {
        // SAFETY: maps the vCPU's ring area as KVM documents (shared, read-write); unmapped
        // on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE as i64,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap the dirty ring");
        Self {
            entries: NonNull::new(p.cast()).expect("non-null mapping"),
            count: bytes / std::mem::size_of::<kvm_dirty_gfn>(),
            fetch: 0,
        }
    }

    /// Every published entry, in order, each handed back to KVM.
    fn harvest(&mut self) -> Vec<DirtyRingEntry> {
        let mut out = Vec::new();
        loop {
            // SAFETY: `fetch % count` indexes the live mapping.
            let e = unsafe { self.entries.as_ptr().add(self.fetch % self.count) };
            // SAFETY: `flags` is the entry's first, 4-byte aligned u32, which KVM writes
            // atomically.
            let flags = unsafe { &*std::ptr::addr_of!((*e).flags).cast::<AtomicU32>() };
            // Acquire: pairs with KVM's release of DIRTY, so slot and offset are complete.
            if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                return out;
            }
            // SAFETY: published (acquire above); KVM leaves it alone until it is reset.
            let gfn = unsafe { std::ptr::read(e) };
            out.push(entry(&gfn));
            // Release: the read of the entry happens before KVM may reuse it.
            flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(
                self.entries.as_ptr().cast(),
                self.count * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// The crate's conversion: from the kernel struct with feature `kvm`, else from the tuple.
#[cfg(feature = "kvm")]
fn entry(gfn: &kvm_dirty_gfn) -> DirtyRingEntry {
    DirtyRingEntry::from(gfn)
}
#[cfg(not(feature = "kvm"))]
fn entry(gfn: &kvm_dirty_gfn) -> DirtyRingEntry {
    DirtyRingEntry::from((gfn.slot, gfn.offset))
}

#[test]
fn dirty_ring_harvest_into_kvm_slots_marks_exactly_the_pages_written() {
    let test = "dirty_ring_harvest_into_kvm_slots_marks_exactly_the_pages_written";
    let Some(kvm) = kvm_or_skip(test) else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let (cap, max) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .map(|cap| (cap, vm.check_extension_raw(u64::from(cap))))
        .find(|&(_, max)| max > 0)
        .unwrap_or((0, 0));
    if max <= 0 {
        assert!(
            std::env::var_os("PAGEHINT_REQUIRE_KVM").is_none() || !cfg!(target_arch = "x86_64"),
            "{test}: this x86-64 KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)"
        );
        eprintln!("{test}: skipped, this KVM has no dirty ring");
        return;
    }
    let bytes = (max as usize).min(64 << 10);
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = bytes as u64;
    vm.enable_cap(&c).expect("enable the dirty ring");
    let ram = GuestRam::new();
    map_slots(&vm, &ram);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut ring = Ring::map(&vcpu, bytes);
    let (_layout, bitmap, slots) = tracking();

    assert!(ring.harvest().is_empty(), "nothing written yet");
    run_guest(&mut vcpu);
    let batch = ring.harvest();
    assert_eq!(
        batch.len(),
        WRITES.len(),
        "one entry per page written: {batch:?}"
    );
    let report = slots.import_dirty_ring(&bitmap, batch);
    assert_eq!((report.marked, report.rejected), (WRITES.len() as u64, 0));
    assert_eq!(marked(&bitmap), written());
    // SAFETY: KVM_RESET_DIRTY_RINGS (_IO(KVMIO, 0xc7)) takes no argument; it re-protects the
    // harvested pages and returns how many entries it reset.
    let reset = unsafe { libc::ioctl(vm.as_raw_fd(), 0xaec7 as _) };
    assert_eq!(reset, WRITES.len() as i32, "KVM_RESET_DIRTY_RINGS");
    assert!(ring.harvest().is_empty(), "nothing published twice");
}

/// The guest of [`program`], looping: after its `hlt`, a further `KVM_RUN` writes the same
/// pages again.
#[cfg(feature = "kvm")]
fn looping_program() -> Vec<u8> {
    let mut code = program();
    let len = code.len() as i64 + 2; // with the jmp
    code.push(0xeb); // jmp short start
    code.push(i8::try_from(-len).expect("a short jump") as u8);
    code
}

/// Real KVM, manual dirty-log clearing (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, feature `kvm`):
/// `KVM_GET_DIRTY_LOG` no longer clears the log; `KvmSlots::clear_dirty_log` clears exactly
/// the pages a drain took, in every slot that maps them, and re-protects them, so that the
/// guest's next write to them is logged again (I7) while the pages not cleared stay reported.
#[cfg(feature = "kvm")]
#[test]
fn manual_dirty_log_clear_in_chunks_as_the_drain_takes_them() {
    use pagehint::vmm::kvm_log::{enable_manual_protect, manual_protect_support};
    let test = "manual_dirty_log_clear_in_chunks_as_the_drain_takes_them";
    let Some(kvm) = kvm_or_skip(test) else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    if manual_protect_support(&vm).unwrap() == 0 {
        assert!(
            std::env::var_os("PAGEHINT_REQUIRE_KVM").is_none() || !cfg!(target_arch = "x86_64"),
            "{test}: this x86-64 KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
        );
        eprintln!("{test}: skipped, this KVM has no manual dirty-log protection");
        return;
    }
    let manual = enable_manual_protect(&vm, false).expect("enable manual protection");
    assert!(!manual.initially_set);
    let ram = GuestRam::new();
    let code = looping_program();
    // SAFETY: the code fits in page 1 of the mapping `GuestRam::new` made.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            ram.base.as_ptr().add(CODE_GPA as usize),
            code.len(),
        )
    };
    map_slots(&vm, &ram);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let (_layout, bitmap, slots) = tracking();
    let sync = |bitmap: &DirtyBitmap| {
        slots
            .sync_dirty_log(bitmap, |m| vm.get_dirty_log(m.slot, m.log_bytes()))
            .expect("KVM_GET_DIRTY_LOG")
    };
    let n = WRITES.len() as u64;

    run_guest(&mut vcpu);
    // The log is read, not cleared: a second sync reports the same pages.
    assert_eq!(sync(&bitmap), n);
    assert_eq!(sync(&bitmap), n, "KVM_GET_DIRTY_LOG cleared the log");
    assert_eq!(bitmap.dirty_count(), n);

    // A drain takes the block's only word, and clears exactly those pages in KVM (both
    // slots: slot 1 maps pages 16..32 of the block).
    let mut words = [0u64];
    assert_eq!(bitmap.get_and_clear(0, 0, &mut words).unwrap(), n);
    assert_eq!(slots.clear_dirty_log(&vm, 0, 0, &words).unwrap(), n);
    assert_eq!(sync(&bitmap), 0, "the cleared pages are no longer reported");
    let st = slots.stats();
    assert_eq!(
        (st.logs_cleared, st.cleared_pages, st.clears_failed),
        (2, n, 0)
    );

    // The guest writes the same pages again: re-protected by the clear, they are logged.
    vcpu.run().expect("KVM_RUN");
    assert_eq!(sync(&bitmap), n);
    assert_eq!(marked(&bitmap), written());
    // Clear only slot 0's pages: slot 1's stay in KVM's log.
    let slot0 = WRITES.iter().filter(|w| w.0 == 0).count() as u64;
    let words = [written()
        .iter()
        .filter(|&&p| p < SLOT_PAGES)
        .fold(0u64, |w, p| w | 1 << p)];
    assert_eq!(slots.clear_dirty_log(&vm, 0, 0, &words).unwrap(), slot0);
    assert_eq!(sync(&bitmap), n - slot0);
    // Words past the block are refused before any ioctl.
    assert!(slots.clear_dirty_log(&vm, 0, usize::MAX, &[1, 1]).is_err());

    // Initially set: a slot created after enabling starts with every page in KVM's log.
    let vm2 = kvm.create_vm().unwrap();
    if enable_manual_protect(&vm2, true).unwrap().initially_set {
        let ram2 = GuestRam::new();
        map_slots(&vm2, &ram2);
        let fresh = DirtyBitmap::new(&_layout).unwrap();
        let all = slots
            .sync_dirty_log(&fresh, |m| vm2.get_dirty_log(m.slot, m.log_bytes()))
            .unwrap();
        assert_eq!(all, 2 * SLOT_PAGES);
    }
}
