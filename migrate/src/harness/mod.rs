//! `pagehint-migrate` itself: the matrix of migrations (modes × workloads) in one invocation,
//! from the command line to the table, the JSON and the SVG.
//!
//! [`cli`] (the invocation, typed) → [`compare`] (the runs, one after the other; a source
//! and a destination each) → [`run`] (one migration: [`crate::dest`]'s run, then [`verify`]
//! and [`result`]; [`tail`] times every request's stages) → [`export`] (table, targets,
//! JSON, SVG; with `--repeat`, of the [`medians`]). Everything here stands on the shared base; nothing below imports it.

pub mod cli;
pub mod compare;
pub mod export;
pub mod medians;
pub mod result;
pub mod run;
pub mod tail;
pub mod verify;
