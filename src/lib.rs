//! pagehint
#![cfg_attr(docsrs, feature(doc_cfg))]
pub mod bitmap;
pub mod hint;
pub mod layout;
pub mod request;
pub mod scheduler;
pub mod stats;
mod storage;
mod sync;

pub use bitmap::{Claim, DirtyBitmap, DirtyLogError};
pub use hint::PageHint;
pub use layout::{
    BlockSpec, HostPage, LayoutError, LocationError, PageLocation, RamBlock, RamLayout,
};
pub use request::{RequestError, UrgentRequest};
pub use scheduler::{
    BackgroundScanner, ClaimBatch, HintPolicy, Mode, PageScheduler, SchedulerConfig, Served,
};
pub use stats::SchedulerStats;
