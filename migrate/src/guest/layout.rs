//! Where everything lies in guest memory: the two RAM blocks and their guest-physical
//! addresses, the system area the guest boots from, and the windows the workloads work in.
//!
//! Guest RAM is two RAM blocks, as a PC has: `ram-below-4g` at guest-physical 0 (half of RAM,
//! at most 3 GiB) and `ram-above-4g` at 4 GiB (the rest). Between them lies the hole where the
//! vCPUs' status pages ([`MAILBOX_GPA`]) are mapped; they are device memory, not RAM, and are
//! never migrated.
//!
//! Pages are numbered globally (block 0's pages, then block 1's), as
//! [`pagehint::RamLayout`] numbers them; the destination maps all of RAM contiguously in that
//! order, so a page's byte offset there is `global page * 4 KiB`. The guest converts a global
//! page to its guest-physical address ([`GuestLayout::gpa`]).
//!
//! The **system area** at the start of block 0 holds what the guest boots with (the
//! parameter page, page tables, code, stacks), the page a device writes, and the generation
//! table (one `u32` per page, see [`crate::guest::image`]). The **data area** is the rest: every
//! page of it is signed, and the workloads' windows lie in it, away from page 0 where the
//! source's background scan starts (where precopy left off), so a guest that does not pull the
//! scan to itself waits for it:
//!
//! | window | what | where |
//! |---|---|---|
//! | `kv` | the hash table | an eighth of RAM from a quarter |
//! | `seq` | read in order | a thirty-second of RAM from the middle |
//! | `stream` | played at a fixed rate | a sixteenth of RAM from three quarters |
//!
//! With several vCPUs, `seq` and `stream` give each vCPU a window of its own
//! ([`GuestLayout::seq_window`], [`GuestLayout::stream_window`]): the data area is split into
//! one region per vCPU, and each region holds a window of the one-vCPU window's length (at
//! most what the region holds) at the same relative place, so N sequential readers (or N
//! streams) work in N places spread over RAM. vCPU 0's window with one vCPU is the table's.

use std::fmt;
use std::ops::Range;

use pagehint::{BlockSpec, PageLocation, RamLayout};

/// The unit of dirty tracking, signatures and checksums.
pub const TARGET_PAGE: u64 = 4096;
/// Guest-physical address of the second RAM block.
pub const HIGH_BASE: u64 = 4 << 30;
/// At most this much RAM lies below the hole.
pub const LOW_LIMIT: u64 = 3 << 30;
/// Guest-physical address of the vCPUs' status pages (one page per vCPU, in the hole).
pub const MAILBOX_GPA: u64 = 0xF000_0000;
/// Most vCPUs a guest may have (one stack page and one status page each).
pub const MAX_VCPUS: u32 = 64;
/// Largest guest RAM.
pub const MAX_MEM: u64 = 64 << 30;

/// The guest's parameter page (see [`crate::guest::image::Params`]).
pub const PARAMS_GPA: u64 = 0x1000;
/// A page that the source's device model rewrites through vm-memory while precopy runs.
pub const DEVICE_GPA: u64 = 0x2000;
/// Page-map level 4.
pub const PML4_GPA: u64 = 0x3000;
/// Page-directory-pointer table.
pub const PDPT_GPA: u64 = 0x4000;
/// Page directories (2 MiB pages), one per GiB of guest-physical space.
pub const PD_GPA: u64 = 0x5000;
/// The guest program.
pub const CODE_GPA: u64 = 0x50000;
/// Most bytes of guest code.
pub const CODE_MAX: u64 = 0x10000;
/// vCPU stacks, one page each; vCPU `i`'s stack ends at `STACKS_GPA + (i + 1) * 4 KiB`.
pub const STACKS_GPA: u64 = 0x60000;
/// The generation table: one little-endian `u32` per global page.
pub const GENTAB_GPA: u64 = 0x100000;

/// How guest RAM is backed on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostPageSize {
    /// 4 KiB anonymous memory.
    Small,
    /// 2 MiB hugetlb pages (placed whole by `UFFDIO_COPY`).
    Huge2M,
}

impl HostPageSize {
    /// Bytes per host page.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Small => 4096,
            Self::Huge2M => 2 << 20,
        }
    }

    /// Target pages per host page.
    pub const fn pages(self) -> u64 {
        self.bytes() / TARGET_PAGE
    }

    /// From a byte size.
    pub fn from_bytes(b: u64) -> Option<Self> {
        match b {
            4096 => Some(Self::Small),
            0x20_0000 => Some(Self::Huge2M),
            _ => None,
        }
    }
}

impl fmt::Display for HostPageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Small => "4K",
            Self::Huge2M => "2M",
        })
    }
}

impl std::str::FromStr for HostPageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "4K" | "4k" | "4096" => Ok(Self::Small),
            "2M" | "2m" => Ok(Self::Huge2M),
            _ => Err(format!("host page {s:?}: 4K or 2M")),
        }
    }
}

/// Why a guest layout cannot be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestLayoutError {
    /// RAM is not a whole number of host pages per block.
    NotWholeHostPages {
        /// RAM bytes.
        mem: u64,
        /// Host page.
        host_page: HostPageSize,
    },
    /// Too little RAM for the system area and the windows.
    TooSmall {
        /// RAM bytes.
        mem: u64,
        /// The least that works with this host page.
        min: u64,
    },
    /// More RAM than the harness handles.
    TooLarge {
        /// RAM bytes.
        mem: u64,
    },
    /// vCPU count out of range.
    Vcpus(u32),
    /// Too little RAM to give each vCPU windows of its own (a host page each at least).
    NoRoomPerVcpu {
        /// RAM bytes.
        mem: u64,
        /// vCPUs.
        vcpus: u32,
    },
}

impl fmt::Display for GuestLayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotWholeHostPages { mem, host_page } => write!(
                f,
                "{} of RAM does not split into two blocks of whole {host_page} host pages",
                human_size(*mem)
            ),
            Self::TooSmall { mem, min } => write!(
                f,
                "{} of RAM is too small: at least {} with this host page",
                human_size(*mem),
                human_size(*min)
            ),
            Self::TooLarge { mem } => write!(
                f,
                "{} GiB of RAM is more than the harness's {} GiB",
                mem >> 30,
                MAX_MEM >> 30
            ),
            Self::Vcpus(n) => write!(f, "{n} vCPUs: 1 to {MAX_VCPUS}"),
            Self::NoRoomPerVcpu { mem, vcpus } => write!(
                f,
                "{} of RAM is too small to give each of {vcpus} vCPUs windows of its own (a host page each); use more RAM or fewer vCPUs",
                human_size(*mem)
            ),
        }
    }
}

impl std::error::Error for GuestLayoutError {}

/// `bytes` as a size is typed: `3 GiB`, `64 MiB`, `12 KiB`, or `4097 bytes`.
pub fn human_size(bytes: u64) -> String {
    match bytes {
        0 => "0 bytes".into(),
        b if b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// The guest's memory layout; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    mem: u64,
    host_page: HostPageSize,
    vcpus: u32,
    ram: RamLayout,
    low_pages: u64,
    system: Range<u64>,
    /// Pages every workload may read (and, by their owner, write): signed pages.
    pub data: Range<u64>,
    /// The hash table (`kv`).
    pub kv: Range<u64>,
    /// The sequential window (`seq`).
    pub seq: Range<u64>,
    /// The stream window (`stream`).
    pub stream: Range<u64>,
}

impl GuestLayout {
    /// The least RAM (a power of two) a guest with `host_page` host pages can have.
    pub fn min_mem(host_page: HostPageSize) -> u64 {
        let mut m = 4 * host_page.bytes();
        while m < MAX_MEM && Self::new(m, host_page, 1).is_err() {
            m *= 2;
        }
        m
    }

    /// The layout of `mem` bytes of RAM in `host_page` host pages, for `vcpus` vCPUs.
    pub fn new(mem: u64, host_page: HostPageSize, vcpus: u32) -> Result<Self, GuestLayoutError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(GuestLayoutError::Vcpus(vcpus));
        }
        if mem > MAX_MEM {
            return Err(GuestLayoutError::TooLarge { mem });
        }
        let hp = host_page.bytes();
        if mem < 2 * hp {
            return Err(GuestLayoutError::TooSmall {
                mem,
                min: Self::min_mem(host_page),
            });
        }
        if !mem.is_multiple_of(hp) {
            return Err(GuestLayoutError::NotWholeHostPages { mem, host_page });
        }
        let pages = mem / TARGET_PAGE;
        let low = (mem / 2 / hp * hp).min(LOW_LIMIT);
        let low_pages = low / TARGET_PAGE;
        let per = host_page.pages();
        let down = |p: u64| p / per * per;
        let span = |start: u64, len: u64| down(start)..down(start) + down(len).max(per);
        let system_end = (GENTAB_GPA + pages * 4).div_ceil(hp) * hp / TARGET_PAGE;
        let kv = span(pages / 4, pages / 8);
        let seq = span(pages / 2, pages / 32);
        let stream = span(pages / 4 * 3, pages / 16);
        // The system area must end before the first window, and every window inside RAM.
        let min = (system_end * 4 + 32 * per).max(32 * per) * TARGET_PAGE;
        if system_end > kv.start || stream.end > pages || pages < 32 * per {
            return Err(GuestLayoutError::TooSmall {
                mem,
                min: min.next_power_of_two(),
            });
        }
        let data = system_end..pages;
        for v in 0..vcpus {
            for one in [&seq, &stream] {
                if spread(&data, one, per, v, vcpus).is_empty() {
                    return Err(GuestLayoutError::NoRoomPerVcpu { mem, vcpus });
                }
            }
        }
        let ram = RamLayout::new(
            TARGET_PAGE,
            [
                BlockSpec::new("ram-below-4g", low, hp),
                BlockSpec::new("ram-above-4g", mem - low, hp),
            ],
        )
        .map_err(|_| GuestLayoutError::NotWholeHostPages { mem, host_page })?;
        Ok(Self {
            mem,
            host_page,
            vcpus,
            ram,
            low_pages,
            system: 0..system_end,
            data,
            kv,
            seq,
            stream,
        })
    }

    /// RAM bytes.
    pub fn mem(&self) -> u64 {
        self.mem
    }
    /// Host page size.
    pub fn host_page(&self) -> HostPageSize {
        self.host_page
    }
    /// vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }
    /// The RAM blocks, as the scheduler sees them.
    pub fn ram(&self) -> &RamLayout {
        &self.ram
    }
    /// Target pages of RAM.
    pub fn pages(&self) -> u64 {
        self.mem / TARGET_PAGE
    }
    /// Pages of block 0 (below the hole).
    pub fn low_pages(&self) -> u64 {
        self.low_pages
    }
    /// The system area's pages (code, tables, generation table; not signed).
    pub fn system(&self) -> Range<u64> {
        self.system.clone()
    }
    /// Host pages of RAM.
    pub fn host_pages(&self) -> u64 {
        self.mem / self.host_page.bytes()
    }

    /// Guest-physical address of global page `page`.
    pub fn gpa(&self, page: u64) -> u64 {
        if page < self.low_pages {
            page * TARGET_PAGE
        } else {
            HIGH_BASE + (page - self.low_pages) * TARGET_PAGE
        }
    }

    /// Global page at guest-physical address `gpa`, if it is RAM.
    pub fn page_at_gpa(&self, gpa: u64) -> Option<u64> {
        let low_end = self.low_pages * TARGET_PAGE;
        if gpa < low_end {
            Some(gpa / TARGET_PAGE)
        } else if gpa >= HIGH_BASE && gpa - HIGH_BASE < self.mem - low_end {
            Some(self.low_pages + (gpa - HIGH_BASE) / TARGET_PAGE)
        } else {
            None
        }
    }

    /// Block and block page of global page `page` (`page` < [`pages`](Self::pages)).
    pub fn location(&self, page: u64) -> PageLocation {
        if page < self.low_pages {
            PageLocation::new(0, page)
        } else {
            PageLocation::new(1, page - self.low_pages)
        }
    }

    /// Global page of a block page.
    pub fn global(&self, loc: PageLocation) -> u64 {
        if loc.block == 0 {
            loc.page
        } else {
            self.low_pages + loc.page
        }
    }

    /// `(guest-physical address, bytes)` of each block, in block order.
    pub fn block_ranges(&self) -> [(u64, u64); 2] {
        let low = self.low_pages * TARGET_PAGE;
        [(0, low), (HIGH_BASE, self.mem - low)]
    }

    /// First global page of `block`.
    pub fn block_first_page(&self, block: u32) -> u64 {
        if block == 0 {
            0
        } else {
            self.low_pages
        }
    }

    /// The guest-physical end of RAM (what the page tables must cover).
    pub fn gpa_end(&self) -> u64 {
        HIGH_BASE + (self.mem - self.low_pages * TARGET_PAGE)
    }

    /// vCPU `vcpu`'s own `seq` window (see the [module docs](self)): [`seq`](Self::seq)
    /// with one vCPU.
    pub fn seq_window(&self, vcpu: u32) -> Range<u64> {
        spread(
            &self.data,
            &self.seq,
            self.host_page.pages(),
            vcpu,
            self.vcpus,
        )
    }

    /// vCPU `vcpu`'s own `stream` window (see the [module docs](self)):
    /// [`stream`](Self::stream) with one vCPU.
    pub fn stream_window(&self, vcpu: u32) -> Range<u64> {
        spread(
            &self.data,
            &self.stream,
            self.host_page.pages(),
            vcpu,
            self.vcpus,
        )
    }

    /// The part of `range` (global pages) that vCPU `i` of `n` works on: contiguous shares,
    /// the last one taking the remainder.
    pub fn share(range: &Range<u64>, i: u32, n: u32) -> Range<u64> {
        let len = range.end - range.start;
        let part = len / u64::from(n);
        let start = range.start + part * u64::from(i);
        let end = if i + 1 == n { range.end } else { start + part };
        start..end
    }
}

/// vCPU `i` of `n`'s window for the one-vCPU window `one` of `data`: in the `i`-th share of
/// `data`, at `one`'s relative place in `data`, `one`'s length or what the share holds from
/// there, in whole host pages of `per` target pages (empty if not even one fits).
fn spread(data: &Range<u64>, one: &Range<u64>, per: u64, i: u32, n: u32) -> Range<u64> {
    if n == 1 {
        return one.clone();
    }
    let region = GuestLayout::share(data, i, n);
    let (d, r) = (data.end - data.start, region.end - region.start);
    let rel = (u128::from(one.start - data.start) * u128::from(r) / u128::from(d)) as u64;
    let start = (region.start + rel).div_ceil(per) * per;
    let end = (start + (one.end - one.start)).min(region.end / per * per);
    start..end.max(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_blocks_around_the_hole_and_windows_in_the_data_area() {
        let l = GuestLayout::new(1 << 30, HostPageSize::Small, 2).unwrap();
        assert_eq!(l.ram().blocks().len(), 2);
        assert_eq!(l.low_pages(), (512 << 20) / 4096);
        assert_eq!(l.gpa(0), 0);
        assert_eq!(l.gpa(l.low_pages()), HIGH_BASE);
        assert_eq!(l.page_at_gpa(HIGH_BASE + 8192), Some(l.low_pages() + 2));
        assert_eq!(l.page_at_gpa(MAILBOX_GPA), None);
        assert!(l.system().end <= l.kv.start && l.data.start == l.system().end);
        assert!(l.stream.end <= l.pages());
        for p in [0, 5, l.low_pages(), l.pages() - 1] {
            assert_eq!(l.global(l.location(p)), p);
            assert_eq!(l.page_at_gpa(l.gpa(p)), Some(p));
        }
        let h = GuestLayout::new(64 << 20, HostPageSize::Huge2M, 2).unwrap();
        assert_eq!(h.seq.start % 512, 0);
        assert_eq!(h.system().end, 512); // one 2 MiB host page
    }

    #[test]
    fn bad_sizes_are_typed_errors() {
        assert!(matches!(
            GuestLayout::new(64 << 20, HostPageSize::Small, 0),
            Err(GuestLayoutError::Vcpus(0))
        ));
        let e = GuestLayout::new(67 << 20, HostPageSize::Huge2M, 1).unwrap_err();
        assert!(
            matches!(e, GuestLayoutError::NotWholeHostPages { .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with("67 MiB of RAM does not split"),
            "{e}"
        );
        let e = GuestLayout::new(2 << 20, HostPageSize::Small, 1).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        // No RAM at all, or less than two host pages: too small, with the least that works.
        for (mem, hp) in [(0, HostPageSize::Small), (3 << 20, HostPageSize::Huge2M)] {
            let e = GuestLayout::new(mem, hp, 1).unwrap_err();
            let min = GuestLayout::min_mem(hp);
            assert_eq!(e, GuestLayoutError::TooSmall { mem, min });
            assert!(GuestLayout::new(min, hp, 1).is_ok());
            assert!(GuestLayout::new(min / 2, hp, 1).is_err());
        }
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(human_size(3000 << 10), "3000 KiB");
        assert_eq!(human_size(4097), "4097 bytes");
        assert_eq!(human_size(2 << 30), "2 GiB");
        assert!(GuestLayout::new(128 << 30, HostPageSize::Small, 1).is_err());
    }

    #[test]
    fn each_vcpu_has_its_own_window_spread_over_ram() {
        for hp in [HostPageSize::Small, HostPageSize::Huge2M] {
            let one = GuestLayout::new(1 << 30, hp, 1).unwrap();
            assert_eq!(one.seq_window(0), one.seq);
            assert_eq!(one.stream_window(0), one.stream);
            for n in [2, 3, 4, 8, 64] {
                let l = GuestLayout::new(1 << 30, hp, n).unwrap();
                let per = hp.pages();
                for w in [GuestLayout::seq_window, GuestLayout::stream_window] {
                    let wins: Vec<Range<u64>> = (0..n).map(|v| w(&l, v)).collect();
                    for (v, win) in wins.iter().enumerate() {
                        let region = GuestLayout::share(&l.data, v as u32, n);
                        assert!(!win.is_empty() && win.start % per == 0 && win.end % per == 0);
                        assert!(
                            win.start >= region.start && win.end <= region.end,
                            "{n}: {v}"
                        );
                    }
                    // Spread: each window a region further than the one before (give or
                    // take a host page of rounding, and the last region's remainder).
                    let gap = (l.data.end - l.data.start) / u64::from(n);
                    for p in wins.windows(2) {
                        let d = p[1].start - p[0].start;
                        assert!(d.abs_diff(gap) <= per + u64::from(n), "{n}: {p:?}");
                    }
                }
                if n <= 4 {
                    // Whole one-vCPU lengths while the regions hold them.
                    let s = l.stream_window(n - 1);
                    assert_eq!(s.end - s.start, l.stream.end - l.stream.start, "{n}");
                }
            }
        }
        // Too small to give every vCPU a host page of each window: a typed error.
        let e = GuestLayout::new(64 << 20, HostPageSize::Huge2M, 64).unwrap_err();
        assert_eq!(
            e,
            GuestLayoutError::NoRoomPerVcpu {
                mem: 64 << 20,
                vcpus: 64
            }
        );
        assert!(e.to_string().contains("each of 64 vCPUs"), "{e}");
    }

    #[test]
    fn shares_cover_the_range() {
        let r = 10..111;
        let parts: Vec<_> = (0..3).map(|i| GuestLayout::share(&r, i, 3)).collect();
        assert_eq!(parts[0].start, 10);
        assert_eq!(parts[2].end, 111);
        assert_eq!(parts[0].end, parts[1].start);
    }
}
