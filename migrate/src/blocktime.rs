//! Blocktime, as QEMU 10.1 reports it (`postcopy-blocktime`), from each fault's wait: the
//! destination's postcopy (`dest::faults`) and `pagehint-uffd`'s snapshot restore
//! (`pagehint_uffd::handler`) both measure with it.
//!
//! * **vCPU blocktime**: a vCPU is blocked from the moment its fault is read until that page
//!   is placed; the union of those intervals, per vCPU (the faulting thread id tells which);
//! * **total blocktime**: the time during which *every* vCPU was blocked at once.

/// Time each vCPU (by thread id, `tids[i]` = vCPU `i`) spent blocked, and the time all of
/// them were blocked at once, in ns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blocktime {
    /// Per vCPU.
    pub per_vcpu_ns: Vec<u64>,
    /// Every vCPU blocked at once (QEMU's `postcopy-blocktime`).
    pub all_ns: u64,
    /// Faults of vCPU threads.
    pub vcpu_faults: u64,
}

/// Computes [`Blocktime`] from each fault's wait: (faulting thread, read, its page placed),
/// in ns. A wait that ends no later than it starts adds nothing; a vCPU's overlapping waits
/// (the same page faulted again before it was placed) count once.
pub fn blocktime_of(waits: impl IntoIterator<Item = (u32, u64, u64)>, tids: &[u32]) -> Blocktime {
    let mut per: Vec<Vec<(u64, u64)>> = vec![Vec::new(); tids.len()];
    let mut vcpu_faults = 0;
    for (tid, read, placed) in waits {
        let Some(v) = tids.iter().position(|&t| t == tid && t != 0) else {
            continue;
        };
        vcpu_faults += 1;
        if placed > read {
            per[v].push((read, placed));
        }
    }
    let merged: Vec<Vec<(u64, u64)>> = per.into_iter().map(merge).collect();
    let per_vcpu_ns = merged
        .iter()
        .map(|iv| iv.iter().map(|(a, b)| b - a).sum())
        .collect();
    let all_ns = merged
        .iter()
        .skip(1)
        .fold(merged.first().cloned().unwrap_or_default(), |acc, iv| {
            intersect(&acc, iv)
        })
        .iter()
        .map(|(a, b)| b - a)
        .sum();
    Blocktime {
        per_vcpu_ns,
        all_ns,
        vcpu_faults,
    }
}

/// Sorted, disjoint union of intervals.
fn merge(mut iv: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    iv.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(iv.len());
    for (a, b) in iv {
        match out.last_mut() {
            Some((_, e)) if a <= *e => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Intersection of two sorted, disjoint interval lists.
fn intersect(x: &[(u64, u64)], y: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < x.len() && j < y.len() {
        let a = x[i].0.max(y[j].0);
        let b = x[i].1.min(y[j].1);
        if a < b {
            out.push((a, b));
        }
        if x[i].1 < y[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{blocktime_of, intersect, merge};

    #[test]
    fn a_vcpus_overlapping_waits_count_once() {
        // vCPU 0 (thread 7) waits 100..300, then 200..400 (the same page faulted again), and
        // not at all on a page placed before its fault was read; vCPU 1 (thread 9) waits
        // 250..350; thread 5 is no vCPU.
        let waits = [
            (7, 100, 300),
            (7, 200, 400),
            (7, 500, 450),
            (9, 250, 350),
            (5, 0, 1000),
        ];
        let b = blocktime_of(waits, &[7, 9]);
        assert_eq!(b.per_vcpu_ns, vec![300, 100]);
        assert_eq!(b.all_ns, 100);
        assert_eq!(b.vcpu_faults, 4);
    }

    #[test]
    fn intervals_merge_and_intersect() {
        assert_eq!(
            merge(vec![(5, 7), (1, 3), (2, 4), (7, 8)]),
            vec![(1, 4), (5, 8)]
        );
        assert_eq!(
            intersect(&[(1, 4), (5, 8)], &[(3, 6)]),
            vec![(3, 4), (5, 6)]
        );
        assert!(intersect(&[(1, 2)], &[(2, 3)]).is_empty());
    }
}
