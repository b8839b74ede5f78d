//! One migration, whole: the destination's run ([`crate::dest`]), then its verification
//! ([`super::verify`]) and its measurements ([`super::result`]), apart from each other.

use std::net::SocketAddr;

use crate::dest::{self, RunError};
use crate::harness::result::RunResult;
use crate::harness::verify;
use crate::options::{MigrationMode, RunConfig, Workload};

/// Migrates guest RAM from the source at `addr` in `mode` while the guest runs `workload`,
/// verifies the result and measures it. `progress(placed, pending)` is called a few times
/// per second in postcopy.
pub fn run_destination(
    addr: SocketAddr,
    cfg: &RunConfig,
    mode: MigrationMode,
    workload: Workload,
    progress: &dyn Fn(u64, u64),
) -> Result<RunResult, RunError> {
    run_destination_with(addr, cfg, mode, workload, progress, None)
}

/// [`run_destination`] with the operator's `control` socket ([`dest::control`]).
pub fn run_destination_with(
    addr: SocketAddr,
    cfg: &RunConfig,
    mode: MigrationMode,
    workload: Workload,
    progress: &dyn Fn(u64, u64),
    control: Option<&dest::control::Control>,
) -> Result<RunResult, RunError> {
    let evidence = dest::run_with(addr, cfg, mode, workload, progress, control)?;
    let problems = verify::verify(cfg, workload, &evidence);
    Ok(RunResult::assemble(
        cfg, mode, workload, &evidence, problems,
    ))
}
