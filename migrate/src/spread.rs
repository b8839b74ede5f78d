//! The median and the range of one measure over repeated runs, shared by the programs
//! (`--repeat`'s medians, compare-qemu's ratios, pagehint-uffd's comparison).

use serde::Serialize;

/// Median and range of the finite values of a measure.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// Median (of an even count: the mean of the middle two).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Values (the finite ones).
    pub n: usize,
}

impl Spread {
    /// Of the finite values of `v` (`None` if there is none: a median of nothing is not 0).
    pub fn of(v: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_with_ranges_of_the_finite_values() {
        let s = Spread::of([3.0, 1.0, 2.0, f64::INFINITY, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Spread::of([]).is_none());
        assert!(Spread::of([f64::INFINITY]).is_none());
    }
}
