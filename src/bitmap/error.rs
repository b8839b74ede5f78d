//! Why a dirty log merge or a layout check failed.

use std::fmt;

use crate::layout::LocationError;

/// Why a dirty log could not be merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirtyLogError {
    /// The block does not exist.
    Location(LocationError),
    /// The log does not have one bit per page of the block, in whole words.
    WrongLength {
        /// The block.
        block: u32,
        /// Words the block's log must have.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// The log's last word has bits set past the block's last page.
    BitsPastEnd {
        /// The block.
        block: u32,
    },
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Location(e) => e.fmt(f),
            Self::WrongLength {
                block,
                expected,
                got,
            } => {
                write!(
                    f,
                    "dirty log for block {block} has {got} words, expected {expected}"
                )
            }
            Self::BitsPastEnd { block } => {
                write!(
                    f,
                    "dirty log for block {block} marks pages past the block's end"
                )
            }
        }
    }
}

impl std::error::Error for DirtyLogError {}

impl From<LocationError> for DirtyLogError {
    fn from(e: LocationError) -> Self {
        Self::Location(e)
    }
}

/// A bitmap that was not built for the layout it is used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutMismatch {
    /// The bitmap and the layout have different numbers of blocks.
    BlockCount {
        /// Blocks in the bitmap.
        bitmap: usize,
        /// Blocks in the layout.
        layout: usize,
    },
    /// A block has a different number of target pages, or a different host page size, in the
    /// bitmap and in the layout.
    BlockShape {
        /// The block.
        block: u32,
    },
}

impl fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlockCount { bitmap, layout } => write!(
                f,
                "dirty bitmap has {bitmap} blocks but the layout has {layout}"
            ),
            Self::BlockShape { block } => write!(
                f,
                "block {block} has another size or host page size in the dirty bitmap than in the layout"
            ),
        }
    }
}

impl std::error::Error for LayoutMismatch {}
