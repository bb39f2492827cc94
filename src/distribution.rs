//! PURE (any thread). A distribution recorded on one thread and read on another: the writer
//! records each transaction's commit time and size, the control thread reads percentiles for
//! `/api/v1/stats` and cumulative buckets for `/metrics`. An hdrhistogram (3 significant
//! digits) behind a mutex held only to record one value or to read; the exact sum beside it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;
use utoipa::ToSchema;

pub struct Distribution {
    h: Mutex<Histogram<u64>>,
    sum: AtomicU64,
    /// Values above are recorded as `max`.
    max: u64,
}

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Distribution")
            .field(&self.summary())
            .finish()
    }
}

/// Percentiles of a [`Distribution`] since start, in its unit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct Summary {
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

impl Distribution {
    /// Values from 1 to `max` (larger ones count as `max`).
    pub fn new(max: u64) -> Distribution {
        Distribution {
            h: Mutex::new(Histogram::new_with_bounds(1, max.max(2), 3).expect("histogram bounds")),
            sum: AtomicU64::new(0),
            max: max.max(2),
        }
    }

    pub fn record(&self, v: u64) {
        let v = v.clamp(1, self.max);
        self.sum.fetch_add(v, Ordering::Relaxed);
        let mut h = self.h.lock().unwrap_or_else(|p| p.into_inner());
        // Within bounds by the clamp, so this cannot fail.
        let _ = h.record(v);
    }

    pub fn summary(&self) -> Summary {
        let h = self.h.lock().unwrap_or_else(|p| p.into_inner());
        let n = h.len();
        let q = |q: f64| (n > 0).then(|| h.value_at_quantile(q));
        Summary {
            count: n,
            mean: (n > 0).then(|| self.sum.load(Ordering::Relaxed) as f64 / n as f64),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: (n > 0).then(|| h.max()),
        }
    }

    /// Count, sum, and for each bound the number of values at most that bound (to within the
    /// histogram's 3 significant digits): a Prometheus histogram's series.
    pub fn cumulative(&self, bounds: &[u64]) -> (u64, u64, Vec<u64>) {
        let h = self.h.lock().unwrap_or_else(|p| p.into_inner());
        let le = bounds
            .iter()
            .map(|&b| {
                if b >= h.max() {
                    h.len()
                } else {
                    h.count_between(0, b)
                }
            })
            .collect();
        (h.len(), self.sum.load(Ordering::Relaxed), le)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_buckets_of_known_values() {
        let d = Distribution::new(60_000_000);
        assert_eq!(d.summary(), Summary::default());
        for v in 1..=100 {
            d.record(v * 1000);
        }
        let s = d.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.mean, Some(50_500.0));
        assert!((49_900..=50_100).contains(&s.p50.unwrap()), "{s:?}");
        assert!((98_900..=99_100).contains(&s.p99.unwrap()), "{s:?}");
        assert!((99_900..=100_100).contains(&s.max.unwrap()), "{s:?}");
        let (n, sum, le) = d.cumulative(&[500, 10_000, 50_000, 1_000_000]);
        assert_eq!((n, sum), (100, 5_050_000));
        assert_eq!(le, vec![0, 10, 50, 100]);
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let d = Distribution::new(1000);
        d.record(0);
        d.record(5000);
        let s = d.summary();
        assert_eq!(s.count, 2);
        assert_eq!(s.max, Some(1000));
    }
}
