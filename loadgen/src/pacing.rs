//! PURE pacing arithmetic: the token bucket that paces connection attempts, the open-loop frame
//! interval, the back-off between failed connects, and how a fleet is split over processes.
//! Nothing here reads the clock: callers pass `now`, so every rule is a unit test.

use std::time::{Duration, Instant};

/// Paces events (connection attempts) to `rate` per second with bursts of up to `burst`.
///
/// It is a GCRA ("virtual scheduling") bucket: instead of refusing an attempt that finds the
/// bucket empty, [`TokenBucket::reserve`] hands out the instant at which the attempt may go.
/// Thousands of devices asking at once thus queue in arrival order and leave at exactly
/// `rate`, with no polling and no thundering herd when tokens refill: a connection storm is
/// turned into a steady stream of SYNs, which is what `--connect-rate` promises.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Time one token takes to refill; `None`: no pacing at all.
    interval: Option<Duration>,
    /// How far ahead of the steady schedule an attempt may run (burst - 1 intervals).
    slack: Duration,
    /// Theoretical arrival time of the next attempt on the steady schedule.
    tat: Option<Instant>,
}

impl TokenBucket {
    /// A bucket of `rate` tokens per second holding at most `burst` (at least 1); a rate of 0
    /// (or not finite) means unpaced.
    pub fn new(rate: f64, burst: u32) -> TokenBucket {
        let interval =
            (rate > 0.0 && rate.is_finite()).then(|| Duration::from_secs_f64(1.0 / rate));
        let slack = interval.map_or(Duration::ZERO, |i| i * burst.max(1).saturating_sub(1));
        TokenBucket {
            interval,
            slack,
            tat: None,
        }
    }

    /// The burst a connect rate gets: 10 ms worth of attempts, at least one. Enough to absorb
    /// timer granularity, too little to be a burst the gateway's backlog notices.
    pub fn default_burst(rate: f64) -> u32 {
        if rate > 0.0 && rate.is_finite() {
            (rate / 100.0).ceil().clamp(1.0, 1e6) as u32
        } else {
            1
        }
    }

    /// Takes a token: the instant (not before `now`) at which the caller may go.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let Some(interval) = self.interval else {
            return now;
        };
        let tat = self.tat.map_or(now, |t| t.max(now));
        let at = tat.checked_sub(self.slack).map_or(now, |t| t.max(now));
        self.tat = Some(tat + interval);
        at
    }
}

/// Exponential back-off for failed connection attempts: `min` doubling to `max`, with jitter
/// so that devices refused together do not come back together.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A back-off starting at `min`, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The pause after one more failure; `unit` is a random number in `[0, 1)` that spreads it
    /// over `[d/2, d)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// A success: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Open loop: the time between one device's frames so that `devices` devices sending
/// `records_per_frame` records per frame offer `records_per_s` records per second in total.
///
/// # Errors
/// A rate that is not a positive finite number.
pub fn frame_interval(
    records_per_s: f64,
    devices: u64,
    records_per_frame: usize,
) -> Result<Duration, String> {
    if !(records_per_s > 0.0 && records_per_s.is_finite()) {
        return Err(format!("--rate {records_per_s} is not a positive rate"));
    }
    let secs = devices as f64 * records_per_frame as f64 / records_per_s;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--rate {records_per_s} gives no usable frame interval"))
}

/// One process's part of a fleet: devices `offset..offset + count` of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub offset: u64,
    pub count: u64,
}

impl Share {
    /// The part of a fleet-wide rate (records/s, connects/s) that falls to this share, so
    /// that the processes together offer exactly the fleet's rate.
    pub fn of_rate(&self, rate: f64, total: u64) -> f64 {
        rate * self.count as f64 / total as f64
    }
}

/// Splits `total` devices over `parts` processes as evenly as possible (the first
/// `total % parts` get one more), in IMEI order.
pub fn split(total: u64, parts: u64) -> Vec<Share> {
    let parts = parts.clamp(1, total.max(1));
    let (base, extra) = (total / parts, total % parts);
    let mut offset = 0;
    (0..parts)
        .map(|i| {
            let count = base + u64::from(i < extra);
            let s = Share { offset, count };
            offset += count;
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_spaces_attempts_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 1);
        let at: Vec<_> = (0..4).map(|_| b.reserve(t0) - t0).collect();
        assert_eq!(at, [ms(0), ms(100), ms(200), ms(300)]);
    }

    #[test]
    fn bucket_allows_its_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3);
        let at: Vec<_> = (0..5).map(|_| b.reserve(t0) - t0).collect();
        assert_eq!(at, [ms(0), ms(0), ms(0), ms(100), ms(200)]);
    }

    #[test]
    fn bucket_refills_while_idle_but_not_beyond_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2);
        b.reserve(t0);
        b.reserve(t0);
        // Long idle: only `burst` attempts go at once afterwards.
        let later = t0 + Duration::from_secs(10);
        let at: Vec<_> = (0..3).map(|_| b.reserve(later) - later).collect();
        assert_eq!(at, [ms(0), ms(0), ms(100)]);
    }

    #[test]
    fn bucket_storm_of_5000_per_s_takes_the_expected_time() {
        // 18,000 devices at 5,000 connects/s: the last one goes after 3.6 s, not before.
        let t0 = Instant::now();
        let rate = 5000.0;
        let mut b = TokenBucket::new(rate, TokenBucket::default_burst(rate));
        let last = (0..18_000).map(|_| b.reserve(t0)).last().unwrap() - t0;
        let expect = Duration::from_secs_f64((18_000 - 50) as f64 / rate);
        assert!(last.abs_diff(expect) < ms(1), "{last:?} vs {expect:?}");
    }

    #[test]
    fn unpaced_bucket_never_delays() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.0, 1);
        assert!((0..1000).all(|_| b.reserve(t0) == t0));
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(ms(100), ms(1000));
        let full: Vec<_> = (0..6).map(|_| b.next_delay(0.999_999)).collect();
        let full_ms: Vec<_> = full.iter().map(|d| d.as_millis()).collect();
        assert_eq!(full_ms, [99, 199, 399, 799, 999, 999]);
        b.reset();
        assert_eq!(
            b.next_delay(0.0),
            ms(50),
            "half the delay at the low end of the jitter"
        );
    }

    #[test]
    fn open_loop_interval_offers_the_fleet_rate() {
        // 1,000 devices x 10 records per frame at 50,000 records/s: a frame every 0.2 s.
        let iv = frame_interval(50_000.0, 1000, 10).unwrap();
        assert_eq!(iv, ms(200));
        let offered = 1000.0 * 10.0 / iv.as_secs_f64();
        assert!((offered - 50_000.0).abs() < 1e-6);
        assert!(frame_interval(0.0, 10, 1).is_err());
        assert!(frame_interval(f64::NAN, 10, 1).is_err());
        assert!(frame_interval(f64::INFINITY, 10, 1).is_err());
    }

    #[test]
    fn shares_cover_the_fleet_and_keep_the_per_device_interval() {
        let shares = split(18_001, 4);
        assert_eq!(
            shares.iter().map(|s| s.count).collect::<Vec<_>>(),
            [4501, 4500, 4500, 4500]
        );
        assert_eq!(shares[0].offset, 0);
        for w in shares.windows(2) {
            assert_eq!(w[1].offset, w[0].offset + w[0].count, "contiguous");
        }
        let rate = 90_000.0;
        let sum: f64 = shares.iter().map(|s| s.of_rate(rate, 18_001)).sum();
        assert!((sum - rate).abs() < 1e-6, "the shares offer the whole rate");
        let fleet = frame_interval(rate, 18_001, 10).unwrap();
        for s in &shares {
            let own = frame_interval(s.of_rate(rate, 18_001), s.count, 10).unwrap();
            assert!(
                own.abs_diff(fleet) < Duration::from_nanos(10),
                "{own:?} vs {fleet:?}"
            );
        }
        assert_eq!(split(3, 8).len(), 3, "no empty processes");
        assert_eq!(
            split(10, 1),
            [Share {
                offset: 0,
                count: 10
            }]
        );
    }
}
