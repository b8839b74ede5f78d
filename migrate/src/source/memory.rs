//! The source's guest RAM: one mapping (normal or hugetlb pages, or a shared mapping of the
//! session's RAM file with `--ram-dir`) holding both RAM blocks back to back, with the
//! guest's image built straight into it, seen as a vm-memory
//! `GuestMemoryMmap<RegionBitmap>` of two regions (the two RAM blocks) whose writes through
//! vm-memory — the parameter page, the device model's writes — mark pagehint's shared
//! [`DirtyBitmap`], exactly as a rust-vmm VMM's device emulation does. The vCPUs' writes reach
//! the same bitmap through KVM's dirty log or rings ([`crate::guest::kvm::dirty`]). The image
//! itself marks nothing: a migration starts with every page dirty.
//!
//! Reads for sending go through vm-memory's volatile copies: the vCPUs may be writing the
//! same pages during precopy (a page changed while it was read is dirty again, and is sent
//! again: I7).

use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use pagehint::vmm::RegionBitmap;
use pagehint::DirtyBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::guest::image::{build_image, page_checksum, Params};
use crate::guest::layout::{
    GuestLayout, HostPageSize, DEVICE_GPA, GENTAB_GPA, PARAMS_GPA, TARGET_PAGE,
};

/// The source's guest RAM and its dirty bitmap.
#[derive(Debug)]
pub struct SourceMemory {
    layout: GuestLayout,
    // Declared before `ram`: its regions point into it (and do not unmap it).
    mem: GuestMemoryMmap<RegionBitmap>,
    ram: MmapMut,
    bitmap: Arc<DirtyBitmap>,
    hosts: [u64; 2],
}

impl SourceMemory {
    /// Maps RAM (hugetlb pages for 2 MiB host pages; a shared mapping of `file` when there
    /// is one, the two blocks one after the other), builds the image of `(layout, seed)`
    /// with the boot pieces `system` straight into it ([`build_image`]: `file` is new, every
    /// byte zero), and writes the parameter page through vm-memory.
    pub fn new(
        layout: &GuestLayout,
        seed: u64,
        system: &[(u64, Vec<u8>)],
        params: &Params,
        file: Option<&std::fs::File>,
    ) -> Result<Self, String> {
        let mut me = Self::map(layout.clone(), file)?;
        build_image(&me.layout, seed, system, &mut me.ram)
            .map_err(|e| format!("building the image: {e}"))?;
        let words: Vec<u8> = params
            .encode()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        me.mem
            .write_slice(&words, GuestAddress(PARAMS_GPA))
            .map_err(|e| format!("writing the parameter page: {e}"))?;
        Ok(me)
    }

    /// The RAM a session saved in `file` (the guest stopped at its switch-over): mapped as
    /// it is, every page clean.
    pub fn open(layout: GuestLayout, file: &std::fs::File) -> Result<Self, String> {
        Self::map(layout, Some(file))
    }

    fn map(layout: GuestLayout, file: Option<&std::fs::File>) -> Result<Self, String> {
        let bitmap =
            Arc::new(DirtyBitmap::new(layout.ram()).map_err(|e| format!("dirty bitmap: {e}"))?);
        let tracking =
            RegionBitmap::for_layout(&bitmap, layout.ram()).map_err(|e| e.to_string())?;
        let huge = layout.host_page() == HostPageSize::Huge2M;
        if huge && file.is_some() {
            return Err("RAM in a file (--ram-dir) needs 4 KiB host pages".into());
        }
        let len = usize::try_from(layout.mem()).map_err(|e| e.to_string())?;
        let mut opts = MmapOptions::new();
        opts.len(len);
        let (mapped, flags) = match file {
            // SAFETY: the file is this session's own (created by it, or saved by an earlier
            // session of this source and taken over): nothing else truncates it while mapped.
            Some(f) => (unsafe { opts.map_mut(f) }, libc::MAP_SHARED),
            None if huge => {
                // hugetlb: no MAP_NORESERVE, so a short pool fails here, not with SIGBUS later.
                opts.huge(Some(21));
                (
                    opts.map_anon(),
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                )
            }
            None => {
                opts.no_reserve_swap();
                (
                    opts.map_anon(),
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
        };
        let mut ram = mapped.map_err(|e| {
            format!(
                "mapping {} MiB of source RAM{}: {e}",
                len >> 20,
                if huge { " in hugetlb pages" } else { "" }
            )
        })?;
        let base = ram.as_mut_ptr();
        let regions = tracking
            .into_iter()
            .zip(layout.block_ranges())
            .enumerate()
            .map(|(b, (t, (gpa, len)))| {
                let at = (layout.block_first_page(b as u32) * TARGET_PAGE) as usize;
                // SAFETY: `at .. at + len` lies inside `ram` (the blocks are laid out back to
                // back in it), which outlives the regions (field order) and is page aligned.
                let region = unsafe {
                    MmapRegionBuilder::new_with_bitmap(len as usize, t)
                        .with_raw_mmap_pointer(base.add(at))
                }
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(|e| format!("source RAM block {b}: {e}"))?;
                GuestRegionMmap::new(region, GuestAddress(gpa))
                    .ok_or_else(|| "guest region overflows".to_string())
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())?;
        let mut hosts = [0u64; 2];
        for (h, (gpa, _)) in hosts.iter_mut().zip(layout.block_ranges()) {
            *h = mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|e| e.to_string())? as u64;
        }
        Ok(Self {
            layout,
            mem,
            ram,
            bitmap,
            hosts,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// The shared dirty bitmap.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// Host addresses of the two blocks (for KVM's memory slots).
    pub fn hosts(&self) -> [u64; 2] {
        self.hosts
    }

    /// Copies `buf.len()` bytes of block `block` from byte `offset` into `buf`.
    pub fn read(&self, block: u32, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let gpa = self.layout.block_ranges()[block as usize].0 + offset;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| format!("reading block {block} at {offset:#x}: {e}"))
    }

    /// The device model's write: rewrites the device page (a counter and a pattern), through
    /// vm-memory, so that the page is marked dirty in the shared bitmap.
    pub fn device_write(&self, n: u64) -> Result<(), String> {
        let mut page = [0u8; TARGET_PAGE as usize];
        for (i, w) in page.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(n.wrapping_mul(0x9e37_79b9) ^ i as u64).to_le_bytes());
        }
        self.mem
            .write_slice(&page, GuestAddress(DEVICE_GPA))
            .map_err(|e| format!("device write: {e}"))
    }

    /// The guest's generation table (the source is stopped).
    pub fn generations(&self) -> Result<Vec<u32>, String> {
        let mut buf = vec![0u8; (self.layout.pages() * 4) as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(GENTAB_GPA))
            .map_err(|e| format!("reading the generation table: {e}"))?;
        Ok(buf
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    }

    /// The checksum of every target page, global page order (the source is stopped).
    pub fn checksums(&self) -> Vec<u64> {
        // Both blocks lie back to back in `ram`, in global page order; nothing writes guest
        // RAM any more (the vCPUs and the device model are stopped), so a shared view is sound.
        self.ram
            .chunks_exact(TARGET_PAGE as usize)
            .map(page_checksum)
            .collect()
    }
}
