//! One log line per period for a condition that can repeat at traffic speed (connections
//! refused at the cap, failed accepts, session events dropped, API refusals): the first
//! occurrence is let through at once, the ones after it within the period are only counted,
//! and the next one let through says how many were held back. PURE apart from reading the
//! monotonic clock in [`LogEvery::new`] and [`LogEvery::ready`]; the decision itself,
//! [`LogEvery::ready_at`], takes the time as an argument and is unit-tested.
//!
//! It does not log: the caller logs when it is told to, with its own fields, and keeps its
//! own counter for the metrics (the limiter's count is only "since the last line"). Atomics
//! throughout, so one limiter can be shared by every thread that reports the same thing.
//!
//! ```
//! # use std::time::Duration;
//! # use fleetgate::log_every::LogEvery;
//! let refused = LogEvery::new(Duration::from_secs(10));
//! if let Some(held_back) = refused.ready() {
//!     // tracing::warn!(since_last_line = held_back + 1, "...");
//!     assert_eq!(held_back, 0);
//! }
//! assert_eq!(refused.ready(), None); // within the period: counted, not logged
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one occurrence through per period and counts the ones it holds back.
#[derive(Debug)]
pub struct LogEvery {
    start: Instant,
    period_ms: u64,
    /// Milliseconds after `start` when the next occurrence may pass.
    next_ms: AtomicU64,
    /// Occurrences held back since the last one let through.
    suppressed: AtomicU64,
}

impl LogEvery {
    pub fn new(period: Duration) -> LogEvery {
        LogEvery {
            start: Instant::now(),
            period_ms: period.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// An occurrence now. `Some(n)`: log it, `n` were held back since the last line;
    /// `None`: do not log (it is counted for the next line).
    pub fn ready(&self) -> Option<u64> {
        self.ready_at(self.start.elapsed())
    }

    /// [`LogEvery::ready`] at `elapsed` after the limiter was made.
    pub fn ready_at(&self, elapsed: Duration) -> Option<u64> {
        let now = elapsed.as_millis() as u64;
        let next = self.next_ms.load(Ordering::Acquire);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.period_ms,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(l: &LogEvery, ms: u64) -> Option<u64> {
        l.ready_at(Duration::from_millis(ms))
    }

    #[test]
    fn the_first_goes_out_at_once_then_one_per_period_with_the_count_held_back() {
        let l = LogEvery::new(Duration::from_secs(10));
        assert_eq!(at(&l, 0), Some(0));
        // A burst within the period: held back, counted.
        for ms in 1..=999 {
            assert_eq!(at(&l, ms), None);
        }
        assert_eq!(at(&l, 9_999), None);
        // The period is over: the next one goes out and says 1,000 were held back.
        assert_eq!(at(&l, 10_000), Some(1_000));
        assert_eq!(at(&l, 10_001), None);
        assert_eq!(at(&l, 20_000), Some(1));
    }

    #[test]
    fn after_a_quiet_spell_the_next_occurrence_is_logged_at_once() {
        let l = LogEvery::new(Duration::from_secs(10));
        assert_eq!(at(&l, 5), Some(0));
        // Hours later, a second episode is not silent.
        assert_eq!(at(&l, 3_600_000), Some(0));
        assert_eq!(at(&l, 3_600_001), None);
    }

    #[test]
    fn shared_by_threads_every_occurrence_is_either_logged_or_counted() {
        let l = std::sync::Arc::new(LogEvery::new(Duration::from_secs(3600)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| l.ready().is_some()).count())
            })
            .collect();
        let logged: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(logged, 1, "one line per period, whatever the threads");
        // What was held back comes out with the next line.
        assert_eq!(l.ready_at(Duration::from_secs(7200)), Some(39_999));
    }
}
