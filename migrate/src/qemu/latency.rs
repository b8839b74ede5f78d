//! QEMU's request latency, taken where QEMU gives it without being perturbed.
//!
//! * **QEMU ≥ 10.1** reports it in the destination's `query-migrate` (seen in 11.1.3, read
//!   from real output): `postcopy-latency` is the mean fault latency in **ns** over the faults
//!   it tracked (fault read by the fault thread → page placed, the same span as the
//!   harness's), `postcopy-vcpu-latency` the mean per vCPU, `postcopy-non-vcpu-latency` the
//!   mean of faults by other threads, and `postcopy-latency-dist` a histogram: element *N*
//!   counts the faults whose latency fell in [2^N µs, 2^(N+1) µs). Its sum is the number of
//!   samples (604 for 604 `postcopy-requests` in the run it was checked on). p50 and p99 are
//!   read from the histogram ([`Histogram::percentile_us`]: log-linear inside the bucket the
//!   rank falls in), so they carry the bucket's resolution (a factor of 2 at worst; the mean
//!   is exact). `compare-qemu` cross-checks them against the request trace once per link.
//! * **QEMU < 10.1** has none: the request-only trace ([`super::trace`]).
//!
//! Either way, a run that made requests and yields no latency sample is an error, never 0 µs.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::trace::RequestLatency;
use crate::harness::result::percentile_ns;

/// Where a row's request latency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LatencySource {
    /// QEMU's `query-migrate` (`postcopy-latency`, `postcopy-latency-dist`).
    QmpHistogram,
    /// The destination's request trace (`postcopy_ram_fault_thread_request` →
    /// `postcopy_page_req_del`).
    RequestTrace,
    /// The pagehint harness's own measurement (fault read → page placed, every request).
    Harness,
}

impl LatencySource {
    /// In words, for tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::QmpHistogram => "qmp",
            Self::RequestTrace => "trace",
            Self::Harness => "own",
        }
    }
}

/// A run's request latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Where it came from.
    pub source: LatencySource,
    /// Samples.
    pub samples: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Mean, µs (exact where the peer reports it; QEMU < 10.1 and pagehint: from the samples
    /// where they are all there, else none).
    pub mean_us: Option<f64>,
}

/// `postcopy-latency-dist`: counts per power-of-two bucket of µs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram(pub Vec<u64>);

impl Histogram {
    /// Samples.
    pub fn samples(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q`-th percentile (0 < q ≤ 100), µs: the bucket [2^N, 2^(N+1)) µs that holds the
    /// rank `ceil(q/100 · n)`, and inside it log-linear by the rank's position among the
    /// bucket's samples (each sample at the middle of its share). `None` without samples.
    pub fn percentile_us(&self, q: f64) -> Option<f64> {
        let n = self.samples();
        if n == 0 {
            return None;
        }
        let rank = ((q / 100.0 * n as f64).ceil() as u64).clamp(1, n);
        let mut below = 0;
        for (i, &c) in self.0.iter().enumerate() {
            if c > 0 && below + c >= rank {
                let pos = (rank - below) as f64 - 0.5;
                return Some(2f64.powi(i as i32) * 2f64.powf(pos / c as f64));
            }
            below += c;
        }
        None
    }
}

/// QEMU's own latency figures from a destination `query-migrate` reply: `Ok(None)` when this
/// QEMU has none (< 10.1), an error when it has them but they do not read, or hold no sample
/// although `requests` were made.
pub fn from_qmp(dest_info: &Value, requests: u64) -> Result<Option<Latency>, String> {
    let Some(dist) = dest_info.get("postcopy-latency-dist") else {
        return Ok(None);
    };
    let counts: Option<Vec<u64>> = dist
        .as_array()
        .map(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
        .unwrap_or(None);
    let h = Histogram(
        counts.ok_or_else(|| format!("postcopy-latency-dist is not a list of counts: {dist}"))?,
    );
    let mean_ns = dest_info.get("postcopy-latency").and_then(Value::as_f64);
    let samples = h.samples();
    match (h.percentile_us(50.0), h.percentile_us(99.0)) {
        (Some(p50), Some(p99)) => Ok(Some(Latency {
            source: LatencySource::QmpHistogram,
            samples,
            p50_us: p50,
            p99_us: p99,
            mean_us: mean_ns.map(|ns| ns / 1e3),
        })),
        _ if requests > 0 => Err(format!(
            "QEMU made {requests} page requests, but its postcopy-latency-dist holds no sample: {dist}"
        )),
        _ => Ok(Some(Latency {
            source: LatencySource::QmpHistogram,
            samples: 0,
            p50_us: 0.0,
            p99_us: 0.0,
            mean_us: None,
        })),
    }
}

/// The latency of a request trace, checked against the `requests` QEMU made.
pub fn from_trace(t: &RequestLatency, requests: u64) -> Result<Latency, String> {
    t.check(requests)?;
    let l = &t.latencies_ns;
    Ok(Latency {
        source: LatencySource::RequestTrace,
        samples: l.len() as u64,
        p50_us: percentile_ns(l, 50.0) as f64 / 1e3,
        p99_us: percentile_ns(l, 99.0) as f64 / 1e3,
        mean_us: (!l.is_empty()).then(|| l.iter().sum::<u64>() as f64 / l.len() as f64 / 1e3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The destination's reply of a real QEMU 11.1.3 run (128 MiB, random, preempt, 1 Gbit/s).
    fn real() -> Value {
        json!({
            "postcopy-blocktime": 1099,
            "postcopy-latency": 1802439,
            "postcopy-latency-dist": [0,0,0,0,1,2,1,2,1,73,402,91,20,11,0,0,0,0,0,0,0,0,0,0],
            "postcopy-non-vcpu-latency": 0,
            "postcopy-vcpu-blocktime": [1088],
            "postcopy-vcpu-latency": [1802439],
            "status": "completed"
        })
    }

    #[test]
    fn qemu_11s_histogram_gives_percentiles_inside_their_buckets() {
        let l = from_qmp(&real(), 604).unwrap().unwrap();
        assert_eq!(l.samples, 604);
        assert_eq!(l.mean_us, Some(1802.439));
        // Rank 302 of 604 is in bucket 10 ([1024, 2048) µs), rank 598 in bucket 13.
        assert!((1024.0..2048.0).contains(&l.p50_us), "{l:?}");
        assert!((8192.0..16384.0).contains(&l.p99_us), "{l:?}");
        // The mean lies between them, as the histogram says it must.
        assert!(l.p50_us < 1802.439 * 1.2 && l.p99_us > 1802.439);
    }

    #[test]
    fn a_histogram_percentile_is_monotone_and_exact_at_bucket_edges() {
        let h = Histogram(vec![0, 0, 4]);
        let (a, b) = (
            h.percentile_us(1.0).unwrap(),
            h.percentile_us(100.0).unwrap(),
        );
        assert!(a >= 4.0 && b < 8.0 && a < b);
        let h = Histogram(vec![1, 1]);
        assert!(h.percentile_us(50.0).unwrap() < 2.0);
        assert!(h.percentile_us(51.0).unwrap() >= 2.0);
        assert_eq!(Histogram(vec![0; 5]).percentile_us(50.0), None);
    }

    #[test]
    fn requests_without_samples_are_an_error_and_old_qemus_have_no_figures() {
        let mut empty = real();
        empty["postcopy-latency-dist"] = json!([0, 0, 0]);
        let e = from_qmp(&empty, 12).unwrap_err();
        assert!(
            e.contains("12 page requests") && e.contains("no sample"),
            "{e}"
        );
        assert_eq!(from_qmp(&empty, 0).unwrap().unwrap().samples, 0);
        let mut bad = real();
        bad["postcopy-latency-dist"] = json!("x");
        assert!(from_qmp(&bad, 1).is_err());
        // QEMU 10.0's destination reply.
        let old = json!({"status": "completed", "postcopy-blocktime": 38, "postcopy-vcpu-blocktime": [38]});
        assert_eq!(from_qmp(&old, 5).unwrap(), None);
    }
}
