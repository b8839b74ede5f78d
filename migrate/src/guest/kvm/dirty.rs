//! Where the guest's writes go: KVM's dirty log or dirty rings, merged into the shared
//! [`DirtyBitmap`] through pagehint's [`KvmSlots`].
//!
//! # Dirty log
//! [`DirtyTracker::sync`] takes `KVM_GET_DIRTY_LOG` of each RAM slot (KVM hands over and
//! clears the log, re-protecting the pages) and ORs it into the bitmap: once per precopy
//! round, and once after the vCPUs stop.
//!
//! # Dirty log, manual re-protection
//! With [`Tracking::LogManual`] the get only reads the log (KVM keeps it, and keeps the pages
//! writable); the precopy drain hands each chunk of words it takes from the bitmap to
//! [`DirtyTracker::taken`], which clears exactly those pages in KVM's log
//! (`KVM_CLEAR_DIRTY_LOG`, through pagehint's [`KvmSlots::clear_dirty_log`]), re-protecting
//! them, *before* the drain reads them: a write after the clear is logged again and sent
//! again (I7); a write before it is in the page read. A page is thus re-protected when it is
//! sent, not at every sync, and a page the guest keeps writing between two syncs faults once
//! per send instead of once per sync. Pages still dirty in the bitmap when precopy ends stay
//! set in KVM's log; the sync after the vCPUs stop merges them again (a no-op: they are
//! dirty already).
//!
//! # Dirty ring
//! Each vCPU has a ring of `kvm_dirty_gfn { flags, slot, offset }` entries mapped from its
//! descriptor at `KVM_DIRTY_LOG_PAGE_OFFSET`. KVM publishes an entry by setting `DIRTY` in
//! its flags (release); the harvester reads the flags with acquire, takes `(slot, offset)`,
//! and hands the entry back by setting `RESET` (release); `KVM_RESET_DIRTY_RINGS` then lets
//! KVM reuse the entries and re-protects their pages. Each ring has one harvester at a time
//! (a mutex): the harvesting thread, or the vCPU itself when KVM stops it because its ring
//! is full. Harvests run while senders claim pages: a page marked after its claim is sent
//! again (I7).

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::VcpuFd;
use pagehint::vmm::{DirtyRingEntry, KvmSlots, SlotMapping};
use pagehint::DirtyBitmap;

use super::vm::{KvmError, Tracking, Vm};
use crate::guest::layout::GuestLayout;

const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;

/// One vCPU's dirty ring, mapped.
#[derive(Debug)]
pub struct DirtyRing {
    entries: NonNull<kvm_dirty_gfn>,
    count: u32,
    fetch: u32,
}

// SAFETY: the mapping is process-wide; the ring is used under a mutex by one harvester.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps `bytes` of `vcpu`'s ring.
    pub fn map(vcpu: &VcpuFd, bytes: u32) -> std::io::Result<Self> {
        let page = 4096;
        // SAFETY: maps the vCPU's ring area as KVM documents (shared, read-write); the
        // mapping keeps the file alive, and is unmapped in `drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_DIRTY_LOG_PAGE_OFFSET as i64) * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            entries: NonNull::new(p.cast()).expect("mmap returned a non-null address"),
            count: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            fetch: 0,
        })
    }

    /// Takes every published entry, in order, and hands each back to KVM.
    pub fn harvest(&mut self, out: &mut Vec<DirtyRingEntry>) -> usize {
        let mut n = 0;
        loop {
            let i = (self.fetch % self.count) as usize;
            // SAFETY: `i < count` entries of the live mapping.
            let e = unsafe { self.entries.as_ptr().add(i) };
            // SAFETY: `flags` is the entry's first u32, 4-byte aligned, shared with KVM,
            // which writes it atomically.
            let flags = unsafe { &*(std::ptr::addr_of!((*e).flags) as *const AtomicU32) };
            // Acquire: pairs with KVM's release of DIRTY, so slot and offset are complete.
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return n;
            }
            // SAFETY: published by KVM (acquire above); KVM does not touch it until reset.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            out.push(DirtyRingEntry::new(slot, offset));
            // Release: our reads of the entry happen before KVM may reuse it.
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(
                self.entries.as_ptr().cast(),
                self.count as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// Moves the guest's writes from KVM into the bitmap.
pub struct DirtyTracker<'a> {
    vm: &'a Vm,
    bitmap: &'a DirtyBitmap,
    slots: KvmSlots,
    rings: Vec<Mutex<DirtyRing>>,
    rejected: AtomicU64,
    syncs: AtomicU64,
}

impl std::fmt::Debug for DirtyTracker<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("rings", &self.rings.len())
            .field("slots", &self.slots)
            .finish()
    }
}

impl<'a> DirtyTracker<'a> {
    /// A tracker for `vm`'s RAM slots (slot `i` = block `i` of `layout`) into `bitmap`,
    /// with the vCPUs' `rings` when the VM tracks with rings.
    pub fn new(
        vm: &'a Vm,
        layout: &GuestLayout,
        bitmap: &'a DirtyBitmap,
        rings: Vec<DirtyRing>,
    ) -> Result<Self, String> {
        let mut slots = KvmSlots::new();
        for (b, block) in layout.ram().blocks().iter().enumerate() {
            slots
                .insert(
                    layout.ram(),
                    SlotMapping {
                        slot: b as u32,
                        block: b as u32,
                        first_page: 0,
                        pages: block.pages(),
                    },
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(Self {
            vm,
            bitmap,
            slots,
            rings: rings.into_iter().map(Mutex::new).collect(),
            rejected: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        })
    }

    /// Moves everything KVM has recorded into the bitmap; returns the pages marked.
    pub fn sync(&self) -> Result<u64, String> {
        // Relaxed: a counter.
        self.syncs.fetch_add(1, Ordering::Relaxed);
        match self.vm.tracking() {
            Tracking::Off => Ok(0),
            Tracking::Log | Tracking::LogManual => {
                let mut marked = 0;
                for m in self.slots.iter() {
                    let log = self.vm.dirty_log(m.slot).map_err(|e| e.to_string())?;
                    marked += self
                        .slots
                        .merge_dirty_log(self.bitmap, m.slot, &log)
                        .map_err(|e| e.to_string())?;
                }
                Ok(marked)
            }
            Tracking::Ring(_) => {
                let mut marked = 0;
                for i in 0..self.rings.len() as u32 {
                    marked += self.harvest_ring(i, false)?;
                }
                self.vm
                    .reset_dirty_rings()
                    .map_err(|e: KvmError| e.to_string())?;
                Ok(marked)
            }
        }
    }

    /// The precopy drain took `words` (dirty words of block `block` from word `from_word`)
    /// from the bitmap and is about to read their pages: with manual re-protection, clears
    /// exactly those pages in KVM's log (re-protecting them); otherwise nothing to do.
    /// Returns the pages cleared. A clear KVM refuses is an error (it would lose nothing —
    /// the pages stay in KVM's log — but it means the comparison is not what it says).
    pub fn taken(&self, block: u32, from_word: usize, words: &[u64]) -> Result<u64, String> {
        if self.vm.tracking() != Tracking::LogManual || words.iter().all(|&w| w == 0) {
            return Ok(0);
        }
        self.slots
            .clear_dirty_log(self.vm.fd(), block, from_word, words)
            .map_err(|e| format!("KVM_CLEAR_DIRTY_LOG of block {block}: {e}"))
    }

    /// `KVM_CLEAR_DIRTY_LOG` calls made and the pages they cleared.
    pub fn clears(&self) -> (u64, u64) {
        let s = self.slots.stats();
        (s.logs_cleared, s.cleared_pages)
    }

    /// Harvests vCPU `i`'s ring (and resets the rings if `reset`); returns the pages marked.
    pub fn harvest_ring(&self, i: u32, reset: bool) -> Result<u64, String> {
        let mut batch = Vec::new();
        {
            let mut ring = self.rings[i as usize]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            ring.harvest(&mut batch);
        }
        let r = self.slots.import_dirty_ring(self.bitmap, batch);
        if r.rejected > 0 {
            // Relaxed: a counter.
            self.rejected.fetch_add(r.rejected, Ordering::Relaxed);
        }
        if reset {
            self.vm.reset_dirty_rings().map_err(|e| e.to_string())?;
        }
        Ok(r.marked)
    }

    /// Ring entries refused (unknown slot or offset): must stay 0.
    pub fn rejected(&self) -> u64 {
        // Relaxed: read after the run.
        self.rejected.load(Ordering::Relaxed)
    }

    /// Syncs done.
    pub fn syncs(&self) -> u64 {
        // Relaxed: read after the run.
        self.syncs.load(Ordering::Relaxed)
    }
}
