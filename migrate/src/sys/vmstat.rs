//! The kernel's memory-management counters (`/proc/vmstat`): what page allocation, reclaim,
//! compaction and transparent huge pages did over a stretch of time, to tell what the machine
//! costs from what a program does.
//!
//! The counters are machine-wide: on a shared machine they include every other process's
//! work over the same stretch.

use serde::{Deserialize, Serialize};

/// The counters read, or their difference over a stretch of time (pages or events).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vmstat {
    /// Pages allocated, all zones (`pgalloc_*`).
    pub pgalloc: u64,
    /// Pages freed (`pgfree`).
    pub pgfree: u64,
    /// Page faults (`pgfault`).
    pub pgfault: u64,
    /// Transparent huge pages allocated at a fault (`thp_fault_alloc`).
    pub thp_fault_alloc: u64,
    /// Transparent huge pages collapsed by khugepaged (`thp_collapse_alloc`).
    pub thp_collapse_alloc: u64,
    /// Pages scanned for reclaim by kswapd (`pgscan_kswapd`).
    pub pgscan_kswapd: u64,
    /// Pages scanned for reclaim by allocating threads themselves (`pgscan_direct`).
    pub pgscan_direct: u64,
    /// Pages reclaimed (`pgsteal_kswapd` + `pgsteal_direct`).
    pub pgsteal: u64,
    /// Allocations that stalled for direct reclaim (`allocstall_*`).
    pub allocstall: u64,
    /// Allocations that stalled for compaction (`compact_stall`).
    pub compact_stall: u64,
}

/// Why the counters could not be read.
#[derive(Debug)]
pub struct VmstatError(String);

impl std::fmt::Display for VmstatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/proc/vmstat: {}", self.0)
    }
}

impl std::error::Error for VmstatError {}

impl Vmstat {
    /// The counters now.
    pub fn read() -> Result<Self, VmstatError> {
        let text =
            std::fs::read_to_string("/proc/vmstat").map_err(|e| VmstatError(e.to_string()))?;
        Self::parse(&text)
    }

    /// The counters of `/proc/vmstat`'s text (`name value` lines; unknown names ignored).
    pub fn parse(text: &str) -> Result<Self, VmstatError> {
        let mut v = Self::default();
        let mut seen = false;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(name), Some(value)) = (it.next(), it.next()) else {
                continue;
            };
            let n: u64 = value
                .parse()
                .map_err(|_| VmstatError(format!("{name}: {value:?} is not a count")))?;
            let slot = match name {
                "pgfree" => &mut v.pgfree,
                "pgfault" => &mut v.pgfault,
                "thp_fault_alloc" => &mut v.thp_fault_alloc,
                "thp_collapse_alloc" => &mut v.thp_collapse_alloc,
                "pgscan_kswapd" => &mut v.pgscan_kswapd,
                "pgscan_direct" => &mut v.pgscan_direct,
                "pgsteal_kswapd" | "pgsteal_direct" => &mut v.pgsteal,
                "compact_stall" => &mut v.compact_stall,
                n if n.starts_with("pgalloc_") => &mut v.pgalloc,
                n if n.starts_with("allocstall_") => &mut v.allocstall,
                _ => continue,
            };
            *slot += n;
            seen |= name == "pgfault";
        }
        if !seen {
            return Err(VmstatError("no pgfault counter".into()));
        }
        Ok(v)
    }

    /// What happened from `earlier` to `self` (a counter that went backwards reads 0).
    pub fn since(&self, earlier: &Self) -> Self {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Self {
            pgalloc: d(self.pgalloc, earlier.pgalloc),
            pgfree: d(self.pgfree, earlier.pgfree),
            pgfault: d(self.pgfault, earlier.pgfault),
            thp_fault_alloc: d(self.thp_fault_alloc, earlier.thp_fault_alloc),
            thp_collapse_alloc: d(self.thp_collapse_alloc, earlier.thp_collapse_alloc),
            pgscan_kswapd: d(self.pgscan_kswapd, earlier.pgscan_kswapd),
            pgscan_direct: d(self.pgscan_direct, earlier.pgscan_direct),
            pgsteal: d(self.pgsteal, earlier.pgsteal),
            allocstall: d(self.allocstall, earlier.allocstall),
            compact_stall: d(self.compact_stall, earlier.compact_stall),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_are_summed_over_zones_and_differenced() {
        let a = Vmstat::parse(
            "nr_free_pages 5\npgalloc_dma 1\npgalloc_normal 10\npgfault 7\nallocstall_normal 2\nallocstall_movable 1\npgsteal_kswapd 4\npgsteal_direct 1\n",
        )
        .unwrap();
        assert_eq!(
            (a.pgalloc, a.pgfault, a.allocstall, a.pgsteal),
            (11, 7, 3, 5)
        );
        let b = Vmstat {
            pgalloc: 111,
            pgfault: 9,
            ..a
        };
        let d = b.since(&a);
        assert_eq!((d.pgalloc, d.pgfault, d.allocstall), (100, 2, 0));
        assert_eq!(a.since(&b).pgalloc, 0);
        assert!(Vmstat::parse("pgfault x\n").is_err());
        assert!(Vmstat::parse("pgalloc_normal 3\n").is_err());
        assert!(Vmstat::read().is_ok_and(|v| v.pgfault > 0));
    }
}
