//! What a claim gives the caller: [`Claim`] (whole host pages it alone now sends) and the
//! outcomes of single claims ([`HostPageClaim`], [`PageClaim`]).

use crate::layout::{HostPage, PageLocation};

/// Dirty host pages that one claim made the caller the only sender of.
///
/// A claim covers an aligned run of whole host pages of one block, at most 64 of them; the
/// caller must send every host page [`host_pages`](Claim::host_pages) yields, whole.
///
/// # A claim is an obligation
/// The claimed bits have left the bitmap: nobody else will send these pages, and the scan
/// will not find them again. Dropping a claim unsent loses them (unless they are marked dirty
/// again). So `Claim`, the outcomes that carry one ([`HostPageClaim`], [`PageClaim`],
/// [`Served`](crate::Served)) and the methods that return them
/// ([`BackgroundScanner::next_claim`](crate::BackgroundScanner::next_claim),
/// [`PageHint::take`](crate::PageHint::take), ...) are `#[must_use]`: ignoring one is a
/// warning, also after `?`. A deliberate `let _ = ...` is not linted by rustc; clippy's
/// `let_underscore_must_use` (restriction group) catches that too.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?;
/// # let bitmap = pagehint::DirtyBitmap::new(&layout)?;
/// bitmap.claim_host_page(pagehint::PageLocation::new(0, 7))?; // error: unused `HostPageClaim`
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?;
/// # let bitmap = pagehint::DirtyBitmap::new(&layout)?;
/// bitmap.claim_page(pagehint::PageLocation::new(0, 7))?; // error: unused `PageClaim`
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
/// The same code with the outcome used compiles under the same lint:
/// ```
/// #![deny(unused_must_use)]
/// # let layout = pagehint::RamLayout::single("m", 1 << 20, 4096)?;
/// # let bitmap = pagehint::DirtyBitmap::new(&layout)?;
/// # bitmap.mark_all();
/// if let Some(claim) = bitmap.claim_host_page(pagehint::PageLocation::new(0, 7))?.into_claim() {
///     for hp in claim.host_pages() { /* send hp */ }
/// }
/// assert!(bitmap.claim_page(pagehint::PageLocation::new(0, 8))?.is_claimed());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a claim owns pages that have left the dirty bitmap: send them (or mark them dirty again), or they are lost"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub(super) block: u32,
    pub(super) first_page: u64,
    pub(super) host_shift: u32,
    pub(super) host_mask: u64,
    pub(super) dirty_pages: u64,
}

impl Claim {
    /// The block the claimed host pages are in.
    pub fn block(&self) -> u32 {
        self.block
    }
    /// Number of host pages claimed.
    pub fn host_page_count(&self) -> u32 {
        self.host_mask.count_ones()
    }
    /// Number of dirty target pages the claim cleared (the rest of each host page was clean
    /// but is sent with it).
    pub fn dirty_pages(&self) -> u64 {
        self.dirty_pages
    }
    /// Target pages that sending the claimed host pages whole transfers.
    pub fn pages_to_send(&self) -> u64 {
        u64::from(self.host_page_count()) << self.host_shift
    }
    /// The claimed host pages, in address order.
    pub fn host_pages(&self) -> impl Iterator<Item = HostPage> + '_ {
        let mut mask = self.host_mask;
        std::iter::from_fn(move || {
            if mask == 0 {
                return None;
            }
            let i = u64::from(mask.trailing_zeros());
            mask &= mask - 1;
            Some(HostPage {
                block: self.block,
                first_page: self.first_page + (i << self.host_shift),
                pages: 1 << self.host_shift,
            })
        })
    }
    /// The first target page of the claim's aligned run (host page 0 of [`host_mask`]).
    ///
    /// [`host_mask`]: Self::host_mask
    pub(crate) fn first_page(&self) -> u64 {
        self.first_page
    }
    /// Target pages per host page.
    pub(crate) fn host_page_pages(&self) -> u64 {
        1 << self.host_shift
    }
    /// The claimed host pages as a mask: bit `i` is the host page starting at target page
    /// `first_page + (i << host_shift)`.
    pub(crate) fn host_mask(&self) -> u64 {
        self.host_mask
    }
    /// The target page right after the last claimed host page (where a hint points).
    pub fn end(&self) -> PageLocation {
        let last = u64::from(63 - self.host_mask.leading_zeros());
        PageLocation::new(
            self.block,
            self.first_page + ((last + 1) << self.host_shift),
        )
    }
}

/// What [`DirtyBitmap::claim_host_page`](crate::DirtyBitmap::claim_host_page) got.
#[must_use = "a won claim owns pages that have left the dirty bitmap: send them, or they are lost"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPageClaim {
    /// The caller is now the only sender of these host pages (see [`Claim`]).
    Claimed(Claim),
    /// None of the host page's target pages was dirty: clean, or claimed by someone else.
    NotDirty,
}

impl HostPageClaim {
    /// The claim, if one was won.
    #[must_use = "a won claim owns pages that have left the dirty bitmap: send them, or they are lost"]
    pub fn into_claim(self) -> Option<Claim> {
        match self {
            Self::Claimed(c) => Some(c),
            Self::NotDirty => None,
        }
    }
    /// Whether a claim was won.
    pub fn is_claimed(&self) -> bool {
        matches!(self, Self::Claimed(_))
    }
}

impl From<Option<Claim>> for HostPageClaim {
    fn from(c: Option<Claim>) -> Self {
        c.map_or(Self::NotDirty, Self::Claimed)
    }
}

/// What [`DirtyBitmap::claim_page`](crate::DirtyBitmap::claim_page) got.
#[must_use = "a claimed page has left the dirty bitmap: send it (or mark it dirty again), or it is lost"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClaim {
    /// The page was dirty and its bit is now the caller's: send the page.
    Claimed,
    /// The page was not dirty: clean, or claimed by someone else.
    NotDirty,
}

impl PageClaim {
    /// Whether the page was claimed.
    pub fn is_claimed(self) -> bool {
        self == Self::Claimed
    }
}
