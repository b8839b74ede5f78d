//! Guest RAM layout: RAM blocks, target and host page sizes, page locations.
//!
//! A [`RamLayout`] is immutable once built, so every other layer may index it without
//! synchronisation. It enforces, at construction, everything the layers above rely on:
//!
//! * the target page size is a power of two;
//! * each block's host page size is a power-of-two multiple of the target page size, and the
//!   block's length is a whole number of host pages (a host page is never cut by a block end);
//! * the number of blocks and the pages per block fit the [`PageHint`](crate::PageHint)
//!   packing ([`MAX_BLOCKS`], [`MAX_BLOCK_PAGES`]), so a location of this layout can always be
//!   offered as a hint without truncation.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// The default target page size, 4 KiB: the unit of dirty tracking.
pub const DEFAULT_TARGET_PAGE_SIZE: u64 = 4096;

/// Bits of a packed location given to the block index.
pub const BLOCK_BITS: u32 = 23;
/// Bits of a packed location given to the target page index within a block.
pub const PAGE_BITS: u32 = 40;
/// The largest number of RAM blocks a layout may have (2^23).
pub const MAX_BLOCKS: usize = 1 << BLOCK_BITS;
/// The largest number of target pages in one RAM block (2^40: 4 PiB of 4 KiB pages).
pub const MAX_BLOCK_PAGES: u64 = 1 << PAGE_BITS;

/// A target page: `page` is the index of the target page inside RAM block `block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageLocation {
    /// Index of the RAM block in its layout.
    pub block: u32,
    /// Index of the target page inside the block.
    pub page: u64,
}

impl PageLocation {
    /// A location from its block index and target page index.
    ///
    /// ```
    /// let loc = pagehint::PageLocation::new(1, 42);
    /// assert_eq!((loc.block, loc.page), (1, 42));
    /// ```
    pub const fn new(block: u32, page: u64) -> Self {
        Self { block, page }
    }
}

impl fmt::Display for PageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {} page {}", self.block, self.page)
    }
}

/// One host page: the unit that is sent, and placed at the destination, whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostPage {
    /// Index of the RAM block.
    pub block: u32,
    /// Index of the first target page of the host page inside the block.
    pub first_page: u64,
    /// Number of target pages in the host page (a power of two).
    pub pages: u64,
}

impl HostPage {
    /// The target pages of this host page, as indices inside its block.
    ///
    /// ```
    /// let hp = pagehint::HostPage { block: 0, first_page: 512, pages: 512 };
    /// assert_eq!(hp.page_range(), 512..1024);
    /// ```
    pub fn page_range(&self) -> Range<u64> {
        self.first_page..self.first_page + self.pages
    }

    /// Whether target page `loc` belongs to this host page.
    pub fn contains(&self, loc: PageLocation) -> bool {
        loc.block == self.block && self.page_range().contains(&loc.page)
    }
}

/// What a [`RamLayout`] is built from: one RAM block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// The block's name (QEMU's RAMBlock idstr, e.g. `pc.ram`).
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// Host page size in bytes (e.g. 4 KiB, 2 MiB, 1 GiB).
    pub host_page_size: u64,
}

impl BlockSpec {
    /// A block spec from its parts.
    ///
    /// ```
    /// let spec = pagehint::BlockSpec::new("pc.ram", 1 << 30, 2 << 20);
    /// assert_eq!(spec.host_page_size, 2 << 20);
    /// ```
    pub fn new(name: impl Into<String>, len: u64, host_page_size: u64) -> Self {
        Self {
            name: name.into(),
            len,
            host_page_size,
        }
    }
}

/// One RAM block of a validated layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    name: String,
    pages: u64,
    host_shift: u32,
    first_global: u64,
}

impl RamBlock {
    /// The block's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Number of target pages in the block.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// Target pages per host page (a power of two).
    pub fn host_page_pages(&self) -> u64 {
        1 << self.host_shift
    }
    /// log2 of [`host_page_pages`](Self::host_page_pages).
    pub fn host_page_shift(&self) -> u32 {
        self.host_shift
    }
    /// Number of host pages in the block.
    pub fn host_pages(&self) -> u64 {
        self.pages >> self.host_shift
    }
    /// Global index of the block's first target page.
    pub fn first_global_page(&self) -> u64 {
        self.first_global
    }
}

/// Why a layout was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    /// A layout needs at least one block.
    NoBlocks,
    /// More blocks than a packed hint can name.
    TooManyBlocks {
        /// Blocks asked for.
        blocks: usize,
    },
    /// The target page size is zero or not a power of two.
    BadTargetPageSize(u64),
    /// A host page size is not a power-of-two multiple of the target page size.
    BadHostPageSize {
        /// The block.
        block: String,
        /// Its host page size.
        host_page_size: u64,
    },
    /// A block's length is zero or not a multiple of its host page size.
    BadBlockLength {
        /// The block.
        block: String,
        /// Its length.
        len: u64,
    },
    /// A block has more target pages than a packed hint can name.
    BlockTooLarge {
        /// The block.
        block: String,
        /// Its number of target pages.
        pages: u64,
    },
    /// The blocks add up to 2^64 bytes or more: byte offsets and `total_bytes` would wrap.
    TotalTooLarge {
        /// Target pages up to and including the block that crossed the limit.
        pages: u64,
        /// The target page size.
        target_page_size: u64,
    },
    /// Two blocks share a name.
    DuplicateName(String),
    /// A layout description could not be parsed.
    Parse(String),
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoBlocks => write!(f, "a RAM layout needs at least one block"),
            Self::TooManyBlocks { blocks } => {
                write!(f, "{blocks} RAM blocks, at most {MAX_BLOCKS} fit a packed page hint")
            }
            Self::BadTargetPageSize(s) => {
                write!(f, "target page size {s} is not a non-zero power of two")
            }
            Self::BadHostPageSize { block, host_page_size } => write!(
                f,
                "block {block}: host page size {host_page_size} is not a power-of-two multiple of the target page size"
            ),
            Self::BadBlockLength { block, len } => write!(
                f,
                "block {block}: length {len} is zero or not a whole number of host pages"
            ),
            Self::BlockTooLarge { block, pages } => write!(
                f,
                "block {block}: {pages} target pages, at most {MAX_BLOCK_PAGES} fit a packed page hint"
            ),
            Self::TotalTooLarge {
                pages,
                target_page_size,
            } => write!(
                f,
                "{pages} target pages of {target_page_size} bytes: the layout is 2^64 bytes or more"
            ),
            Self::DuplicateName(n) => write!(f, "two RAM blocks are named {n}"),
            Self::Parse(msg) => write!(f, "cannot parse RAM layout: {msg}"),
        }
    }
}

impl std::error::Error for LayoutError {}

/// Why a location, offset or range was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocationError {
    /// No block with this index.
    NoSuchBlock {
        /// The block index asked for.
        block: u32,
        /// How many blocks the layout has.
        blocks: usize,
    },
    /// The page (or byte offset, as a page) lies past the block's end.
    PageOutOfRange {
        /// The block.
        block: u32,
        /// The page asked for.
        page: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// A byte offset or length is not a multiple of the target page size.
    Misaligned {
        /// The block.
        block: u32,
        /// The offending offset or length in bytes.
        value: u64,
    },
    /// A range is empty or runs past the block's end.
    RangeOutOfBounds {
        /// The block.
        block: u32,
        /// First page of the range.
        first: u64,
        /// Number of pages in the range.
        count: u64,
    },
    /// A global page index past the layout's end.
    GlobalOutOfRange {
        /// The index asked for.
        index: u64,
        /// Pages in the layout.
        pages: u64,
    },
}

impl fmt::Display for LocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoSuchBlock { block, blocks } => {
                write!(f, "no RAM block {block} (the layout has {blocks})")
            }
            Self::PageOutOfRange { block, page, pages } => {
                write!(f, "page {page} is past the end of block {block} ({pages} pages)")
            }
            Self::Misaligned { block, value } => {
                write!(f, "block {block}: {value} is not a multiple of the target page size")
            }
            Self::RangeOutOfBounds { block, first, count } => write!(
                f,
                "block {block}: range of {count} pages from page {first} is empty or runs past the block"
            ),
            Self::GlobalOutOfRange { index, pages } => {
                write!(f, "global page {index} is past the layout's end ({pages} pages)")
            }
        }
    }
}

impl std::error::Error for LocationError {}

impl LocationError {
    /// `Ok` if target page `loc.page` lies inside a block of `pages` pages.
    pub(crate) fn check_page(loc: PageLocation, pages: u64) -> Result<(), Self> {
        if loc.page < pages {
            Ok(())
        } else {
            Err(Self::PageOutOfRange {
                block: loc.block,
                page: loc.page,
                pages,
            })
        }
    }

    /// `Ok` if `count` pages from `first` form a non-empty range inside a block of `pages`.
    pub(crate) fn check_range(block: u32, first: u64, count: u64, pages: u64) -> Result<(), Self> {
        match first.checked_add(count) {
            Some(end) if count > 0 && end <= pages => Ok(()),
            _ => Err(Self::RangeOutOfBounds {
                block,
                first,
                count,
            }),
        }
    }
}

/// The guest's RAM blocks and page sizes, validated once.
///
/// ```
/// use pagehint::{BlockSpec, RamLayout};
/// let layout = RamLayout::new(4096, [
///     BlockSpec::new("pc.ram", 1 << 30, 2 << 20),
///     BlockSpec::new("vga.vram", 16 << 20, 4096),
/// ])?;
/// assert_eq!(layout.total_pages(), (1 << 18) + 4096);
/// let hp = layout.host_page_of(pagehint::PageLocation::new(0, 1000))?;
/// assert_eq!(hp.first_page, 512);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    target_shift: u32,
    blocks: Vec<RamBlock>,
    total_pages: u64,
}

impl RamLayout {
    /// Validates and builds a layout from a target page size and blocks, in order.
    pub fn new(
        target_page_size: u64,
        blocks: impl IntoIterator<Item = BlockSpec>,
    ) -> Result<Self, LayoutError> {
        if target_page_size == 0 || !target_page_size.is_power_of_two() {
            return Err(LayoutError::BadTargetPageSize(target_page_size));
        }
        let target_shift = target_page_size.trailing_zeros();
        let mut out: Vec<RamBlock> = Vec::new();
        let mut total: u64 = 0;
        for spec in blocks {
            if out.len() == MAX_BLOCKS {
                return Err(LayoutError::TooManyBlocks {
                    blocks: out.len() + 1,
                });
            }
            let BlockSpec {
                name,
                len,
                host_page_size,
            } = spec;
            if host_page_size < target_page_size || !host_page_size.is_power_of_two() {
                return Err(LayoutError::BadHostPageSize {
                    block: name,
                    host_page_size,
                });
            }
            if len == 0 || len % host_page_size != 0 {
                return Err(LayoutError::BadBlockLength { block: name, len });
            }
            let pages = len >> target_shift;
            if pages > MAX_BLOCK_PAGES {
                return Err(LayoutError::BlockTooLarge { block: name, pages });
            }
            if out.iter().any(|b| b.name == name) {
                return Err(LayoutError::DuplicateName(name));
            }
            let host_shift = (host_page_size >> target_shift).trailing_zeros();
            // Cannot overflow: at most 2^23 blocks of at most 2^40 pages each.
            let end = total + pages;
            // Every byte offset of the layout, `total_bytes` included, must fit a u64.
            if end > u64::MAX >> target_shift {
                return Err(LayoutError::TotalTooLarge {
                    pages: end,
                    target_page_size,
                });
            }
            out.push(RamBlock {
                name,
                pages,
                host_shift,
                first_global: total,
            });
            total = end;
        }
        if out.is_empty() {
            return Err(LayoutError::NoBlocks);
        }
        Ok(Self {
            target_shift,
            blocks: out,
            total_pages: total,
        })
    }

    /// A layout with one block of `len` bytes and host pages of `host_page_size` bytes, with
    /// 4 KiB target pages.
    ///
    /// ```
    /// let layout = pagehint::RamLayout::single("pc.ram", 64 << 20, 4096)?;
    /// assert_eq!(layout.total_pages(), 16384);
    /// # Ok::<(), pagehint::LayoutError>(())
    /// ```
    pub fn single(name: &str, len: u64, host_page_size: u64) -> Result<Self, LayoutError> {
        Self::new(
            DEFAULT_TARGET_PAGE_SIZE,
            [BlockSpec::new(name, len, host_page_size)],
        )
    }

    /// Parses a layout description: comma-separated `name:len[:host_page_size]` blocks,
    /// optionally preceded by `target=SIZE;`. Sizes take `K`, `M`, `G`, `T` suffixes (powers
    /// of 1024); the host page size defaults to the target page size.
    ///
    /// ```
    /// let layout: pagehint::RamLayout = "pc.ram:1G:2M,vga:16M".parse()?;
    /// assert_eq!(layout.blocks().len(), 2);
    /// assert_eq!(layout.blocks()[0].host_page_pages(), 512);
    /// assert!("pc.ram:1G:3M".parse::<pagehint::RamLayout>().is_err());
    /// # Ok::<(), pagehint::LayoutError>(())
    /// ```
    pub fn parse(desc: &str) -> Result<Self, LayoutError> {
        let mut target = DEFAULT_TARGET_PAGE_SIZE;
        let mut rest = desc.trim();
        if let Some(after) = rest.strip_prefix("target=") {
            let (size, blocks) = after.split_once(';').ok_or_else(|| {
                LayoutError::Parse("`target=SIZE` must be followed by `;`".into())
            })?;
            target = parse_size(size)?;
            rest = blocks;
        }
        let mut specs = Vec::new();
        for item in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let mut parts = item.split(':');
            let name = parts.next().unwrap_or_default().trim();
            if name.is_empty() {
                return Err(LayoutError::Parse(format!("block `{item}` has no name")));
            }
            let len = parse_size(
                parts
                    .next()
                    .ok_or_else(|| LayoutError::Parse(format!("block `{item}` has no length")))?,
            )?;
            let host = match parts.next() {
                Some(s) => parse_size(s)?,
                None => target,
            };
            if parts.next().is_some() {
                return Err(LayoutError::Parse(format!(
                    "block `{item}` has too many fields"
                )));
            }
            specs.push(BlockSpec::new(name, len, host));
        }
        Self::new(target, specs)
    }

    /// The target page size in bytes.
    pub fn target_page_size(&self) -> u64 {
        1 << self.target_shift
    }
    /// log2 of the target page size.
    pub fn target_page_shift(&self) -> u32 {
        self.target_shift
    }
    /// The blocks, in layout order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }
    /// Total number of target pages over all blocks.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }
    /// Total guest RAM in bytes (below 2^64: [`new`](Self::new) refuses larger layouts).
    pub fn total_bytes(&self) -> u64 {
        self.total_pages << self.target_shift
    }

    /// The block with index `block`.
    pub fn block(&self, block: u32) -> Result<&RamBlock, LocationError> {
        self.blocks
            .get(block as usize)
            .ok_or(LocationError::NoSuchBlock {
                block,
                blocks: self.blocks.len(),
            })
    }

    /// The index of the block named `name`, if any.
    pub fn block_index(&self, name: &str) -> Option<u32> {
        self.blocks
            .iter()
            .position(|b| b.name == name)
            .map(|i| i as u32)
    }

    /// Checks that `loc` names a target page of this layout.
    pub fn check(&self, loc: PageLocation) -> Result<&RamBlock, LocationError> {
        let b = self.block(loc.block)?;
        LocationError::check_page(loc, b.pages)?;
        Ok(b)
    }

    /// The dense global index of `loc` (blocks laid end to end, in layout order).
    pub fn global_index(&self, loc: PageLocation) -> Result<u64, LocationError> {
        Ok(self.check(loc)?.first_global + loc.page)
    }

    /// The location of dense global page `index`.
    ///
    /// ```
    /// let layout: pagehint::RamLayout = "a:8K,b:8K".parse()?;
    /// let loc = layout.location_of(3)?;
    /// assert_eq!((loc.block, loc.page), (1, 1));
    /// assert_eq!(layout.global_index(loc)?, 3);
    /// assert!(layout.location_of(4).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn location_of(&self, index: u64) -> Result<PageLocation, LocationError> {
        if index >= self.total_pages {
            return Err(LocationError::GlobalOutOfRange {
                index,
                pages: self.total_pages,
            });
        }
        let i = self.blocks.partition_point(|b| b.first_global <= index) - 1;
        Ok(PageLocation::new(
            i as u32,
            index - self.blocks[i].first_global,
        ))
    }

    /// The host page that target page `loc` belongs to.
    pub fn host_page_of(&self, loc: PageLocation) -> Result<HostPage, LocationError> {
        let b = self.check(loc)?;
        let pages = b.host_page_pages();
        Ok(HostPage {
            block: loc.block,
            first_page: loc.page & !(pages - 1),
            pages,
        })
    }

    /// The target page at byte `offset` of block `block` (any offset inside the page).
    pub fn location_at(&self, block: u32, offset: u64) -> Result<PageLocation, LocationError> {
        let loc = PageLocation::new(block, offset >> self.target_shift);
        self.check(loc).map(|_| loc)
    }

    /// The target pages covered by `len` bytes at byte `offset` of block `block`; both must
    /// be page aligned and the range non-empty and inside the block.
    ///
    /// ```
    /// let layout = pagehint::RamLayout::single("pc.ram", 1 << 20, 4096)?;
    /// assert_eq!(layout.page_range(0, 8192, 4096)?, 2..3);
    /// assert!(layout.page_range(0, 100, 4096).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn page_range(
        &self,
        block: u32,
        offset: u64,
        len: u64,
    ) -> Result<Range<u64>, LocationError> {
        let mask = self.target_page_size() - 1;
        for value in [offset, len] {
            if value & mask != 0 {
                return Err(LocationError::Misaligned { block, value });
            }
        }
        let first = offset >> self.target_shift;
        let count = len >> self.target_shift;
        self.check_range(block, first, count)?;
        Ok(first..first + count)
    }

    /// Checks that `count` pages from `first` form a non-empty range inside block `block`.
    pub fn check_range(
        &self,
        block: u32,
        first: u64,
        count: u64,
    ) -> Result<&RamBlock, LocationError> {
        let b = self.block(block)?;
        LocationError::check_range(block, first, count, b.pages)?;
        Ok(b)
    }

    /// The target page after `loc` in scan order: the next page of the block, else the first
    /// page of the next block, wrapping from the last block to the first.
    pub fn next_location(&self, loc: PageLocation) -> Result<PageLocation, LocationError> {
        let b = self.check(loc)?;
        Ok(if loc.page + 1 < b.pages {
            PageLocation::new(loc.block, loc.page + 1)
        } else {
            PageLocation::new(((loc.block as usize + 1) % self.blocks.len()) as u32, 0)
        })
    }
}

impl FromStr for RamLayout {
    type Err = LayoutError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Parses a byte size such as `4096`, `4K`, `2M`, `1G`, `16T` (suffixes are powers of 1024),
/// as the layout string does.
///
/// Not API (hidden from the docs, not covered by semver): public only so that
/// `pagehint-migrate`'s command line reads sizes as the layout string does.
///
/// ```
/// assert_eq!(pagehint::layout::parse_size("2M")?, 2 << 20);
/// assert!(pagehint::layout::parse_size("2Q").is_err());
/// assert!(pagehint::layout::parse_size("99999999999T").is_err());
/// # Ok::<(), pagehint::LayoutError>(())
/// ```
#[doc(hidden)]
pub fn parse_size(s: &str) -> Result<u64, LayoutError> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(LayoutError::Parse(format!("unknown size suffix in `{s}`"))),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| LayoutError::Parse(format!("`{s}` is not a size")))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| LayoutError::Parse(format!("size `{s}` overflows 64 bits")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_layouts() {
        assert_eq!(RamLayout::new(4096, []), Err(LayoutError::NoBlocks));
        assert_eq!(
            RamLayout::new(3000, [BlockSpec::new("a", 4096, 4096)]),
            Err(LayoutError::BadTargetPageSize(3000))
        );
        assert!(matches!(
            RamLayout::new(4096, [BlockSpec::new("a", 1 << 21, 3 << 20)]),
            Err(LayoutError::BadHostPageSize { .. })
        ));
        assert!(matches!(
            RamLayout::new(4096, [BlockSpec::new("a", 1 << 21, 2048)]),
            Err(LayoutError::BadHostPageSize { .. })
        ));
        assert!(matches!(
            RamLayout::new(4096, [BlockSpec::new("a", 3 << 20, 2 << 20)]),
            Err(LayoutError::BadBlockLength { .. })
        ));
        assert!(matches!(
            RamLayout::new(4096, [BlockSpec::new("a", 0, 4096)]),
            Err(LayoutError::BadBlockLength { .. })
        ));
        assert!(matches!(
            RamLayout::new(4096, [BlockSpec::new("a", 1 << 53, 1 << 30)]),
            Err(LayoutError::BlockTooLarge { .. })
        ));
        assert!(matches!(
            RamLayout::new(
                4096,
                [
                    BlockSpec::new("a", 4096, 4096),
                    BlockSpec::new("a", 4096, 4096)
                ]
            ),
            Err(LayoutError::DuplicateName(_))
        ));
    }

    #[test]
    fn one_gib_host_pages_and_16_tib() {
        let l = RamLayout::new(4096, [BlockSpec::new("big", 16 << 40, 1 << 30)]).unwrap();
        assert_eq!(l.total_pages(), 1 << 32);
        assert_eq!(l.blocks()[0].host_page_pages(), 1 << 18);
        let hp = l.host_page_of(PageLocation::new(0, (1 << 32) - 1)).unwrap();
        assert_eq!(hp.first_page, (1 << 32) - (1 << 18));
    }

    #[test]
    fn locations_round_trip_and_errors() {
        let l: RamLayout = "a:16K:8K,b:8K".parse().unwrap();
        for g in 0..l.total_pages() {
            assert_eq!(l.global_index(l.location_of(g).unwrap()).unwrap(), g);
        }
        assert!(matches!(
            l.check(PageLocation::new(2, 0)),
            Err(LocationError::NoSuchBlock { .. })
        ));
        assert!(matches!(
            l.check(PageLocation::new(1, 2)),
            Err(LocationError::PageOutOfRange { .. })
        ));
        assert_eq!(
            l.next_location(PageLocation::new(1, 1)).unwrap(),
            PageLocation::new(0, 0)
        );
        assert_eq!(
            l.next_location(PageLocation::new(0, 3)).unwrap(),
            PageLocation::new(1, 0)
        );
        assert!(l.page_range(0, 0, 0).is_err());
        assert!(l.page_range(0, 4096, 4 * 4096).is_err());
        assert!(l.check_range(0, u64::MAX, 2).is_err());
        assert_eq!(l.location_at(0, 4097).unwrap(), PageLocation::new(0, 1));
    }

    #[test]
    fn parse_errors_are_typed() {
        for bad in [
            "",
            ":4K",
            "a",
            "a:4K:4K:4K",
            "target=4K",
            "a:xyz",
            "a:4K,a:4K",
            "target=3K;a:3K",
        ] {
            assert!(bad.parse::<RamLayout>().is_err(), "{bad}");
        }
    }
}
