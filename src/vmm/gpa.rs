//! Guest physical addresses: where each RAM block lies in the guest's address space.
//!
//! The core crate names pages `(block, page)`; a VMM names them by guest physical address
//! (GPA): a fault address from the destination, a `MIG_RP_MSG_REQ_PAGES`-style request, a
//! range of a memory-range table. [`GpaMap`] holds the GPA of each block of a [`RamLayout`]
//! and converts both ways, and turns dirty words (from
//! [`DirtyBitmap::get_and_clear`](crate::DirtyBitmap::get_and_clear)) into coalesced GPA
//! ranges — what Cloud Hypervisor's `MemoryRangeTable::from_dirty_bitmap` builds.
//!
//! With feature `vm-memory`, `GpaMap::from_guest_memory` builds the layout and the map
//! from vm-memory's guest memory (`GuestMemoryBackend`, e.g. `GuestMemoryMmap`; one block
//! per region, in region order), so that region
//! *i*'s `RegionBitmap` tracks into block *i*.
//!
//! # Invariants
//! * blocks do not overlap in GPA space, and every GPA of every block fits a `u64`;
//! * block bases are aligned to the block's host page size, so a host page of the layout is
//!   a naturally aligned host page of the guest;
//! * [`location`](GpaMap::location) and [`gpa`](GpaMap::gpa) are inverse on every page of
//!   the layout; an address outside every block is a typed error, never a wrong page.

use std::fmt;

use crate::bitmap::low_mask;
use crate::layout::{LocationError, PageLocation, RamLayout};
use crate::request::UrgentRequest;

/// One guest-physical range: `len` bytes from `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpaRange {
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GpaRange {
    /// The range's first address as vm-memory's `GuestAddress` (feature `vm-memory`).
    #[cfg(feature = "vm-memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
    pub fn guest_address(&self) -> vm_memory::GuestAddress {
        vm_memory::GuestAddress(self.gpa)
    }
}

/// A guest memory region as a VMM describes it before mapping it: where it lies, how long it
/// is, and the page size backing it (a hugetlbfs page size, placed and sent whole), from
/// which [`GpaMap::from_regions`] builds the layout (one RAM block per region) and the map.
///
/// With feature `vm-memory`, `(GuestAddress, usize)` — what `GuestMemoryMmap::from_ranges`
/// takes — converts into one with base pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionSpec {
    /// Guest physical address of the region's first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// The page size backing the region (e.g. 2 MiB for hugetlbfs), if larger than the target
    /// page: each such page is claimed, sent and placed whole. `None`: target pages.
    pub host_page_size: Option<u64>,
}

impl RegionSpec {
    /// `len` bytes at `gpa`, backed by target-size pages.
    pub const fn new(gpa: u64, len: u64) -> Self {
        Self {
            gpa,
            len,
            host_page_size: None,
        }
    }

    /// The same region backed by hugetlbfs pages of `page_size` bytes.
    pub const fn hugetlbfs(self, page_size: u64) -> Self {
        Self {
            host_page_size: Some(page_size),
            ..self
        }
    }
}

/// `(GuestAddress, len)`, as `GuestMemoryMmap::from_ranges` takes it (feature `vm-memory`).
#[cfg(feature = "vm-memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
impl From<(vm_memory::GuestAddress, usize)> for RegionSpec {
    fn from((addr, len): (vm_memory::GuestAddress, usize)) -> Self {
        Self::new(addr.0, len as u64)
    }
}

/// Why a GPA map, or one conversion, was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GpaError {
    /// A base was given for a different number of blocks than the layout has.
    BaseCount {
        /// Blocks in the layout.
        blocks: usize,
        /// Bases given.
        bases: usize,
    },
    /// A block's base is not aligned to its host page size.
    Misaligned {
        /// The block.
        block: u32,
        /// Its base.
        base: u64,
        /// Its host page size in bytes.
        host_page_size: u64,
    },
    /// A block would run past the end of the 64-bit address space.
    Overflow {
        /// The block.
        block: u32,
    },
    /// Two blocks overlap in GPA space.
    Overlap {
        /// The block with the lower base.
        first: u32,
        /// The block that starts inside it.
        second: u32,
    },
    /// No block holds this address (or this range is not inside one block).
    Unmapped {
        /// The address.
        gpa: u64,
        /// Bytes asked for from it.
        len: u64,
    },
    /// A location or range outside the layout.
    Location(LocationError),
    /// Dirty words have bits set past the block's last page.
    BitsPastEnd {
        /// The block.
        block: u32,
    },
    /// A page request of zero bytes.
    ZeroLength {
        /// The address it named.
        gpa: u64,
    },
    /// Building the layout from guest memory failed.
    Layout(crate::layout::LayoutError),
    /// A dirty bitmap was not built for this map's layout.
    Bitmap,
    /// A guest memory region is backed by hugetlbfs but was given target-size host pages: its
    /// huge pages must be sent and placed whole, so give their size.
    Hugetlbfs {
        /// The block (region index).
        block: u32,
    },
}

impl fmt::Display for GpaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BaseCount { blocks, bases } => {
                write!(f, "{bases} block bases given for a layout of {blocks} blocks")
            }
            Self::Misaligned {
                block,
                base,
                host_page_size,
            } => write!(
                f,
                "block {block} at GPA {base:#x} is not aligned to its {host_page_size}-byte host pages"
            ),
            Self::Overflow { block } => write!(f, "block {block} runs past the 64-bit GPA space"),
            Self::Overlap { first, second } => {
                write!(f, "blocks {first} and {second} overlap in GPA space")
            }
            Self::Unmapped { gpa, len } => write!(
                f,
                "GPA range {gpa:#x} + {len:#x} is not inside one RAM block"
            ),
            Self::Location(e) => write!(f, "{e}"),
            Self::BitsPastEnd { block } => {
                write!(f, "dirty words of block {block} mark pages past the block's end")
            }
            Self::ZeroLength { gpa } => write!(f, "page request of zero bytes at GPA {gpa:#x}"),
            Self::Layout(e) => write!(f, "guest memory does not make a layout: {e}"),
            Self::Bitmap => f.write_str("the dirty bitmap was not built for this GPA map's layout"),
            Self::Hugetlbfs { block } => write!(
                f,
                "region {block} is backed by hugetlbfs: give its huge page size as the host page size"
            ),
        }
    }
}

impl std::error::Error for GpaError {}

impl From<LocationError> for GpaError {
    fn from(e: LocationError) -> Self {
        Self::Location(e)
    }
}

/// A block's place in GPA space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placed {
    base: u64,
    /// Bytes (`pages << target shift`).
    len: u64,
    block: u32,
    /// log2 of target pages per host page.
    host_shift: u32,
}

/// Where each block of a [`RamLayout`] lies in guest physical address space.
///
/// ```
/// use pagehint::vmm::{GpaMap, GpaRange};
/// use pagehint::{DirtyBitmap, PageLocation, RamLayout};
/// // 2 GiB below the PCI hole, 2 GiB above 4 GiB with 2 MiB host pages
/// let layout: RamLayout = "ram-low:2G,ram-high:2G:2M".parse()?;
/// let map = GpaMap::new(&layout, &[0, 4 << 30])?;
/// assert_eq!(map.location(0x1_0000_3000)?, PageLocation::new(1, 3));
/// assert_eq!(map.gpa(PageLocation::new(1, 3))?, 0x1_0000_3000);
/// assert!(map.location(3 << 30).is_err()); // in the hole
///
/// // Precopy: drain block 1's dirty words and send them as GPA ranges.
/// let bitmap = DirtyBitmap::new(&layout)?;
/// bitmap.mark_range(1, 62, 4)?;
/// let mut words = [0u64; 2];
/// bitmap.get_and_clear(1, 0, &mut words)?;
/// let ranges: Vec<GpaRange> = map.dirty_ranges(1, 0, &words)?.collect();
/// assert_eq!(ranges, [GpaRange { gpa: (4 << 30) + 62 * 4096, len: 4 * 4096 }]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpaMap {
    /// Indexed by block.
    blocks: Vec<Placed>,
    /// Block indices sorted by base.
    by_base: Vec<u32>,
    target_shift: u32,
}

impl GpaMap {
    /// Places block *i* of `layout` at GPA `bases[i]`. Refuses a base count that does not
    /// match, a base not aligned to its block's host page size, a block past the end of the
    /// address space, and overlapping blocks.
    pub fn new(layout: &RamLayout, bases: &[u64]) -> Result<Self, GpaError> {
        if bases.len() != layout.blocks().len() {
            return Err(GpaError::BaseCount {
                blocks: layout.blocks().len(),
                bases: bases.len(),
            });
        }
        let shift = layout.target_page_shift();
        let mut blocks = Vec::with_capacity(bases.len());
        for (i, (b, &base)) in layout.blocks().iter().zip(bases).enumerate() {
            let block = i as u32;
            // Cannot overflow: the layout checked that every byte offset fits a u64.
            let len = b.pages() << shift;
            let host_page_size = b.host_page_pages() << shift;
            if base % host_page_size != 0 {
                return Err(GpaError::Misaligned {
                    block,
                    base,
                    host_page_size,
                });
            }
            // The last byte must be addressable: base + len - 1 <= u64::MAX.
            if base.checked_add(len - 1).is_none() {
                return Err(GpaError::Overflow { block });
            }
            blocks.push(Placed {
                base,
                len,
                block,
                host_shift: b.host_page_shift(),
            });
        }
        let mut by_base: Vec<u32> = (0..blocks.len() as u32).collect();
        by_base.sort_by_key(|&b| blocks[b as usize].base);
        for w in by_base.windows(2) {
            let (a, b) = (blocks[w[0] as usize], blocks[w[1] as usize]);
            if b.base - a.base < a.len {
                return Err(GpaError::Overlap {
                    first: a.block,
                    second: b.block,
                });
            }
        }
        Ok(Self {
            blocks,
            by_base,
            target_shift: shift,
        })
    }

    /// The layout and the map of guest memory described before it exists: one RAM block per
    /// region, in the order given, named `ram@<gpa>`, in `target_page_size` target pages, each
    /// with its region's host page size. Build the shared [`DirtyBitmap`](crate::DirtyBitmap)
    /// for the layout, then the regions with their bitmaps
    /// (`RegionBitmap::for_layout`, feature `vm-memory`): region *i* tracks into block *i*, and KVM slot *i* maps it
    /// ([`KvmSlots::from_gpa_map`](crate::vmm::KvmSlots::from_gpa_map)).
    ///
    /// ```
    /// use pagehint::vmm::{GpaMap, RegionSpec};
    /// // 1 GiB below a hole, 2 GiB of 2 MiB hugetlbfs pages above 4 GiB
    /// let (layout, map) = GpaMap::from_regions(4096, [
    ///     RegionSpec::new(0, 1 << 30),
    ///     RegionSpec::new(4 << 30, 2 << 30).hugetlbfs(2 << 20),
    /// ])?;
    /// assert_eq!(layout.blocks()[1].host_page_pages(), 512);
    /// assert_eq!(map.location((4 << 30) + 4096)?, pagehint::PageLocation::new(1, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_regions<R: Into<RegionSpec>>(
        target_page_size: u64,
        regions: impl IntoIterator<Item = R>,
    ) -> Result<(RamLayout, Self), GpaError> {
        let regions: Vec<RegionSpec> = regions.into_iter().map(Into::into).collect();
        let layout = RamLayout::new(
            target_page_size,
            regions.iter().map(|r| {
                crate::layout::BlockSpec::new(
                    format!("ram@{:#x}", r.gpa),
                    r.len,
                    r.host_page_size.unwrap_or(target_page_size),
                )
            }),
        )
        .map_err(GpaError::Layout)?;
        let bases: Vec<u64> = regions.iter().map(|r| r.gpa).collect();
        let map = Self::new(&layout, &bases)?;
        Ok((layout, map))
    }

    /// The layout and map of vm-memory guest memory (feature `vm-memory`; any
    /// `GuestMemoryBackend`, the region collection `GuestMemoryMmap` is, which vm-memory
    /// called `GuestMemory` before 0.18): one block per
    /// region in region order, named `ram@<base>`, `target_page_size` target pages and
    /// `host_page_size` host pages (what backs the regions: 4 KiB, or 2 MiB for hugetlbfs; a
    /// region that says it is on hugetlbfs with target-size host pages is refused,
    /// [`GpaError::Hugetlbfs`]). Region *i* then tracks into block *i*
    /// ([`RegionBitmap::for_layout`](crate::vmm::RegionBitmap::for_layout)).
    ///
    /// ```
    /// use pagehint::vmm::GpaMap;
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[
    ///     (GuestAddress(0), 1 << 20),
    ///     (GuestAddress(1 << 32), 2 << 20),
    /// ])?;
    /// let (layout, map) = GpaMap::from_guest_memory(&mem, 4096, 4096)?;
    /// assert_eq!(layout.blocks()[1].name(), "ram@0x100000000");
    /// assert_eq!(map.location((1 << 32) + 8192)?, pagehint::PageLocation::new(1, 2));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "vm-memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
    pub fn from_guest_memory<M: vm_memory::GuestMemoryBackend + ?Sized>(
        mem: &M,
        target_page_size: u64,
        host_page_size: u64,
    ) -> Result<(RamLayout, Self), GpaError> {
        use vm_memory::GuestMemoryRegion;
        if host_page_size <= target_page_size {
            if let Some(i) = mem.iter().position(|r| r.is_hugetlbfs() == Some(true)) {
                return Err(GpaError::Hugetlbfs { block: i as u32 });
            }
        }
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let layout = RamLayout::new(
            target_page_size,
            regions.iter().map(|&(base, len)| {
                crate::layout::BlockSpec::new(format!("ram@{base:#x}"), len, host_page_size)
            }),
        )
        .map_err(GpaError::Layout)?;
        let bases: Vec<u64> = regions.iter().map(|&(base, _)| base).collect();
        let map = Self::new(&layout, &bases)?;
        Ok((layout, map))
    }

    /// Where block `block` lies (a block may end at the very top of the address space, so
    /// this is a base and a length rather than a `Range<u64>`).
    pub fn block_range(&self, block: u32) -> Result<GpaRange, GpaError> {
        let p = self.placed(block)?;
        Ok(GpaRange {
            gpa: p.base,
            len: p.len,
        })
    }

    /// The target page holding `gpa`.
    pub fn location(&self, gpa: u64) -> Result<PageLocation, GpaError> {
        let p = self.holding(gpa, 1)?;
        Ok(PageLocation::new(
            p.block,
            (gpa - p.base) >> self.target_shift,
        ))
    }

    /// The GPA of the first byte of page `loc`.
    pub fn gpa(&self, loc: PageLocation) -> Result<u64, GpaError> {
        let p = self.placed(loc.block)?;
        LocationError::check_page(loc, p.len >> self.target_shift)?;
        Ok(p.base + (loc.page << self.target_shift))
    }

    /// The page request for `len` bytes at `gpa` (a fault address and its page size): the
    /// range must lie inside one block.
    ///
    /// ```
    /// # use pagehint::{vmm::GpaMap, RamLayout, UrgentRequest};
    /// # let layout: RamLayout = "low:1M,high:1M".parse()?;
    /// let map = GpaMap::new(&layout, &[0, 1 << 32])?;
    /// assert_eq!(map.request((1 << 32) + 0x5000, 4096)?, UrgentRequest::new(1, 0x5000, 4096));
    /// assert!(map.request(0xff000, 8192).is_err()); // runs off the end of block 0
    /// assert!(map.request(0x5000, 0).is_err()); // empty: refused here, not later by `serve`
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn request(&self, gpa: u64, len: u64) -> Result<UrgentRequest, GpaError> {
        if len == 0 {
            return Err(GpaError::ZeroLength { gpa });
        }
        let p = self.holding(gpa, len)?;
        Ok(UrgentRequest::new(p.block, gpa - p.base, len))
    }

    /// [`location`](Self::location) for a `GuestAddress` (feature `vm-memory`).
    #[cfg(feature = "vm-memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
    pub fn location_at(&self, addr: vm_memory::GuestAddress) -> Result<PageLocation, GpaError> {
        self.location(addr.0)
    }

    /// [`gpa`](Self::gpa) as a `GuestAddress` (feature `vm-memory`).
    #[cfg(feature = "vm-memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
    pub fn guest_address(&self, loc: PageLocation) -> Result<vm_memory::GuestAddress, GpaError> {
        self.gpa(loc).map(vm_memory::GuestAddress)
    }

    /// [`request`](Self::request) for a `GuestAddress` (feature `vm-memory`): the page request
    /// for `len` bytes at `addr`.
    ///
    /// ```
    /// # use pagehint::{vmm::GpaMap, UrgentRequest};
    /// use vm_memory::GuestAddress;
    /// let (_, map) = GpaMap::from_regions(4096, [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])?;
    /// assert_eq!(map.request_at(GuestAddress((1 << 32) + 0x5000), 4096)?, UrgentRequest::new(1, 0x5000, 4096));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "vm-memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
    pub fn request_at(
        &self,
        addr: vm_memory::GuestAddress,
        len: u64,
    ) -> Result<UrgentRequest, GpaError> {
        self.request(addr.0, len)
    }

    /// Number of blocks (regions).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Bitmap words per host page of `block` (at least 1); 1 for a block it does not have.
    pub(crate) fn host_page_words(&self, block: u32) -> usize {
        self.blocks
            .get(block as usize)
            .map_or(1, |p| 1usize << p.host_shift.saturating_sub(6))
    }

    /// Whether `bitmap` was built for this map's layout (the same blocks, pages and host page
    /// sizes; names are not kept).
    pub(crate) fn fits(&self, bitmap: &crate::DirtyBitmap) -> bool {
        bitmap.blocks() == self.blocks.len()
            && self.blocks.iter().all(|p| {
                bitmap.block_shape(p.block) == Some((p.len >> self.target_shift, p.host_shift))
            })
    }

    /// Target page size in bytes.
    pub fn target_page_size(&self) -> u64 {
        1 << self.target_shift
    }

    /// The dirty pages of `words` (dirty words of block `block` from word `from_word`, as
    /// [`DirtyBitmap::get_and_clear`](crate::DirtyBitmap::get_and_clear) fills them) as GPA
    /// ranges, runs of consecutive dirty pages coalesced (also across words), in address
    /// order.
    ///
    /// Refused, as [`DirtyBitmap::merge_dirty_log`](crate::DirtyBitmap::merge_dirty_log)
    /// refuses a log: words that reach past the block's last word
    /// ([`GpaError::Location`]), and bits past the block's last page in its last word
    /// ([`GpaError::BitsPastEnd`]); so every range lies inside the block, also for a block that
    /// ends at the very top of the address space. An empty `words` at any `from_word` up to
    /// the block's word count yields nothing.
    ///
    /// ```
    /// # use pagehint::{vmm::{GpaError, GpaMap}, RamLayout};
    /// let layout: RamLayout = "a:4K,b:4K".parse()?; // one page each
    /// let map = GpaMap::new(&layout, &[0, 0x1000])?;
    /// assert_eq!(map.dirty_ranges(0, 0, &[0b1])?.count(), 1);
    /// // bit 1 of block a's only word is past its end: not block b's page
    /// assert_eq!(map.dirty_ranges(0, 0, &[0b10]).unwrap_err(), GpaError::BitsPastEnd { block: 0 });
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dirty_ranges<'a>(
        &self,
        block: u32,
        from_word: usize,
        words: &'a [u64],
    ) -> Result<DirtyRanges<'a>, GpaError> {
        let p = *self.placed(block)?;
        let pages = p.len >> self.target_shift;
        // At most 2^40 pages per block (the layout's bound), so the word count fits.
        let block_words = pages.div_ceil(64);
        let out_of_bounds = || LocationError::RangeOutOfBounds {
            block,
            first: (from_word as u64).saturating_mul(64),
            count: (words.len() as u64).saturating_mul(64),
        };
        let end_word = (from_word as u64)
            .checked_add(words.len() as u64)
            .filter(|&end| end <= block_words)
            .ok_or_else(out_of_bounds)?;
        let tail = pages % 64;
        if end_word == block_words && tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return Err(GpaError::BitsPastEnd { block });
        }
        // `from_word < block_words` whenever `words` is non-empty, so the first page is in the
        // block and its GPA is at most the block's last byte: no overflow.
        let first_gpa = match words.is_empty() {
            true => p.base,
            false => p.base + ((from_word as u64 * 64) << self.target_shift),
        };
        Ok(DirtyRanges {
            words,
            word: 0,
            bits: words.first().copied().unwrap_or(0),
            base: first_gpa,
            shift: self.target_shift,
        })
    }

    fn placed(&self, block: u32) -> Result<&Placed, GpaError> {
        self.blocks
            .get(block as usize)
            .ok_or(GpaError::Location(LocationError::NoSuchBlock {
                block,
                blocks: self.blocks.len(),
            }))
    }

    /// The block holding all of `gpa .. gpa + len` (`len >= 1`).
    fn holding(&self, gpa: u64, len: u64) -> Result<&Placed, GpaError> {
        // The last block starting at or below `gpa`.
        let i = self
            .by_base
            .partition_point(|&b| self.blocks[b as usize].base <= gpa);
        let unmapped = GpaError::Unmapped { gpa, len };
        let p = match i.checked_sub(1) {
            Some(i) => &self.blocks[self.by_base[i] as usize],
            None => return Err(unmapped),
        };
        let off = gpa - p.base;
        match off.checked_add(len) {
            Some(end) if end <= p.len => Ok(p),
            _ => Err(unmapped),
        }
    }
}

/// Iterator of [`GpaMap::dirty_ranges`]: coalesced runs of dirty pages as GPA ranges.
#[derive(Clone, Debug)]
pub struct DirtyRanges<'a> {
    words: &'a [u64],
    /// Index of the word `bits` came from.
    word: usize,
    /// The bits of that word not yet reported.
    bits: u64,
    /// GPA of the first page of word 0.
    base: u64,
    shift: u32,
}

impl DirtyRanges<'_> {
    /// The next set bit at or after the current position, as a page index from word 0.
    fn next_set(&mut self) -> Option<u64> {
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.words.get(self.word)?;
        }
        Some(self.word as u64 * 64 + u64::from(self.bits.trailing_zeros()))
    }

    /// The end of the run of set bits starting at page `start` (clears them).
    fn run_end(&mut self, start: u64) -> u64 {
        let mut end = start;
        loop {
            let bit = end % 64;
            let ones = u64::from((self.bits >> bit).trailing_ones());
            // Clear the run's bits in this word.
            self.bits &= !(low_mask(ones) << bit);
            end += ones;
            if bit + ones < 64 {
                return end;
            }
            // The run reaches the end of the word: continue in the next one.
            self.word += 1;
            match self.words.get(self.word) {
                Some(&w) if w & 1 != 0 => self.bits = w,
                Some(&w) => {
                    self.bits = w;
                    return end;
                }
                None => {
                    self.bits = 0;
                    return end;
                }
            }
        }
    }
}

impl Iterator for DirtyRanges<'_> {
    type Item = GpaRange;

    fn next(&mut self) -> Option<GpaRange> {
        let start = self.next_set()?;
        let end = self.run_end(start);
        Some(GpaRange {
            gpa: self.base + (start << self.shift),
            len: (end - start) << self.shift,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RamLayout {
        "low:1M,high:2M:2M".parse().unwrap()
    }

    #[test]
    fn bad_maps_are_typed_errors() {
        let l = layout();
        assert_eq!(
            GpaMap::new(&l, &[0]),
            Err(GpaError::BaseCount {
                blocks: 2,
                bases: 1
            })
        );
        assert!(matches!(
            GpaMap::new(&l, &[0, 0x1000]),
            Err(GpaError::Misaligned { block: 1, .. })
        ));
        assert_eq!(
            GpaMap::new(&l, &[0, 0]),
            Err(GpaError::Overlap {
                first: 0,
                second: 1
            })
        );
        assert_eq!(
            GpaMap::new(&l, &[!0xfff, 0]),
            Err(GpaError::Overflow { block: 0 })
        );
        // The very top of the address space is fine.
        let top = GpaMap::new(&l, &[0, 0u64.wrapping_sub(2 << 20)]).unwrap();
        assert_eq!(top.location(u64::MAX).unwrap(), PageLocation::new(1, 511));
        let r = top.block_range(1).unwrap();
        assert_eq!(r.gpa.checked_add(r.len - 1), Some(u64::MAX));
    }

    #[test]
    fn gpa_and_location_are_inverse_and_holes_are_errors() {
        let l = layout();
        let map = GpaMap::new(&l, &[1 << 32, 0]).unwrap();
        for (b, block) in l.blocks().iter().enumerate() {
            for page in 0..block.pages() {
                let loc = PageLocation::new(b as u32, page);
                let gpa = map.gpa(loc).unwrap();
                assert_eq!(map.location(gpa).unwrap(), loc);
                assert_eq!(map.location(gpa + 4095).unwrap(), loc);
            }
        }
        assert!(map.location(2 << 20).is_err());
        assert!(map.location((1 << 32) + (1 << 20)).is_err());
        assert!(map.gpa(PageLocation::new(0, 256)).is_err());
        assert!(map.gpa(PageLocation::new(2, 0)).is_err());
        assert_eq!(
            map.request(1 << 32, 0),
            Err(GpaError::ZeroLength { gpa: 1 << 32 })
        );
        assert!(map.request((1 << 32) + (1 << 20) - 4096, 4097).is_err());
    }

    #[test]
    fn dirty_ranges_coalesce_across_words() {
        let l: RamLayout = "m:1M".parse().unwrap(); // 256 pages, 4 words
        let map = GpaMap::new(&l, &[0x4000_0000]).unwrap();
        let words = [1 << 63, !0, 0b1011, 0];
        let got: Vec<_> = map.dirty_ranges(0, 0, &words).unwrap().collect();
        let r = |p: u64, n: u64| GpaRange {
            gpa: 0x4000_0000 + p * 4096,
            len: n * 4096,
        };
        assert_eq!(got, [r(63, 1 + 64 + 2), r(131, 1)]);
        let got: Vec<_> = map.dirty_ranges(0, 1, &words[1..3]).unwrap().collect();
        assert_eq!(got, [r(64, 66), r(131, 1)]);
        assert_eq!(map.dirty_ranges(0, 0, &[0; 4]).unwrap().count(), 0);
        assert_eq!(
            map.dirty_ranges(0, 0, &[!0; 4])
                .unwrap()
                .collect::<Vec<_>>(),
            [r(0, 256)]
        );
        assert!(map.dirty_ranges(0, 3, &[0; 2]).is_err());
        assert!(map.dirty_ranges(0, usize::MAX, &[0; 2]).is_err());
        assert!(map.dirty_ranges(1, 0, &[0]).is_err());
    }

    /// Every bit pattern of a few words against a page-by-page model.
    #[test]
    fn dirty_ranges_match_a_page_by_page_walk() {
        let l: RamLayout = "m:1M".parse().unwrap();
        let map = GpaMap::new(&l, &[0]).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        // Fewer rounds under Miri, which runs the unit tests two orders of magnitude slower.
        for _ in 0..if cfg!(miri) { 40 } else { 2000 } {
            let mut words = [0u64; 4];
            for w in &mut words {
                // xorshift, with runs: AND/OR of draws gives long 0 and 1 runs
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let a = x;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *w = if a % 3 == 0 { a | x } else { a & x };
            }
            let mut pages = vec![];
            for (i, w) in words.iter().enumerate() {
                for b in 0..64 {
                    if w >> b & 1 == 1 {
                        pages.push(i as u64 * 64 + b);
                    }
                }
            }
            let ranges: Vec<_> = map.dirty_ranges(0, 0, &words).unwrap().collect();
            let mut from_ranges = vec![];
            for (k, r) in ranges.iter().enumerate() {
                assert!(r.len > 0);
                if k > 0 {
                    let prev = ranges[k - 1];
                    assert!(prev.gpa + prev.len < r.gpa, "not coalesced: {ranges:?}");
                }
                from_ranges.extend((r.gpa / 4096)..(r.gpa + r.len) / 4096);
            }
            assert_eq!(from_ranges, pages);
        }
    }
}
