//! The once-a-second sampler (the time series of the report and the chart) and the live
//! progress line on stderr. A worker process prints each sample as one JSON line on stderr
//! instead, for its parent to merge and show.
//!
//! The sampler is an OS thread of its own, not a task: it only reads atomics and the
//! sharded histograms, and on a saturated runtime (thousands of device tasks ready, or a
//! starved machine) a task would be polled seconds late, leaving holes in the series exactly
//! when it matters.

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::Plan;
use crate::report::{encode_histogram, SeriesPoint};
use crate::stats::Stats;

/// Marks a worker's sample line on its stderr (anything else there is passed on as it is).
pub const SAMPLE_PREFIX: &str = "loadgen-sample ";

/// What to do with each sample besides keeping it.
pub enum Output {
    /// A worker: one JSON line per sample on stderr, histogram included.
    Worker,
    /// A progress line every so many samples.
    Progress(ProgressLine),
    Quiet,
}

/// Takes a sample every second from `t0` until `stop` says so (a message, or its sender
/// dropped); returns them. Run it on a thread of its own.
pub fn sample_every_second(
    plan: Arc<Plan>,
    t0: Instant,
    mut out: Output,
    stop: Receiver<()>,
) -> Vec<SeriesPoint> {
    let s = &plan.stats;
    let mut series = Vec::new();
    let (mut last_at, mut last_records, mut last_frames, mut last_errors) = (t0, 0, 0, 0);
    let mut next = t0 + Duration::from_secs(1);
    // A message or a dropped sender ends the run; only the deadline means "sample now".
    while let Err(RecvTimeoutError::Timeout) =
        stop.recv_timeout(next.saturating_duration_since(Instant::now()))
    {
        let now = Instant::now();
        // A late wake (a starved machine) skips the seconds it missed rather than sampling
        // them all at once; the rate below covers the whole time since the last sample.
        let due = latest_due(next, now);
        next = due + Duration::from_secs(1);
        let t_s = due.duration_since(t0).as_secs_f64().round() as u32;
        let secs = now.duration_since(last_at).as_secs_f64().max(1e-3);
        let h = s.take_recent();
        let records = Stats::get(&s.records_acked);
        let frames = Stats::get(&s.frames_acked);
        let errors = s.errors_total();
        let mut p = SeriesPoint {
            t_s,
            records: records - last_records,
            frames: frames - last_frames,
            records_per_s: (records - last_records) as f64 / secs,
            frames_per_s: (frames - last_frames) as f64 / secs,
            p50_ms: None,
            p99_ms: None,
            connected: s.connected.load(Ordering::Relaxed),
            logged_in: Stats::get(&s.logged_in),
            errors: errors - last_errors,
            histogram: None,
        };
        p.set_latency(&h);
        (last_at, last_records, last_frames, last_errors) = (now, records, frames, errors);
        match &mut out {
            Output::Worker => {
                // The parent merges these exactly: live for its progress line, and from the
                // worker's final report for the series.
                p.histogram = Some(encode_histogram(&h));
                if let Ok(json) = serde_json::to_string(&p) {
                    eprintln!("{SAMPLE_PREFIX}{json}");
                }
            }
            Output::Progress(pl) => pl.show(&p, plan.devices, errors),
            Output::Quiet => {}
        }
        series.push(p);
    }
    if let Output::Progress(pl) = &mut out {
        pl.finish();
    }
    series
}

/// The last whole-second tick at or before `now`, starting from the tick `next` that woke
/// the sampler.
fn latest_due(next: Instant, now: Instant) -> Instant {
    let late = now.saturating_duration_since(next).as_secs();
    next + Duration::from_secs(late)
}

/// The live progress line: rewritten in place on a terminal, one line per update otherwise.
pub struct ProgressLine {
    /// Show every this many samples (seconds).
    every: u32,
    tty: bool,
    shown: bool,
}

impl ProgressLine {
    pub fn new(every: u32, tty: bool) -> ProgressLine {
        ProgressLine {
            every: every.max(1),
            tty,
            shown: false,
        }
    }

    /// Shows sample `p` of a fleet of `devices` with `errors` so far, if it is one to show.
    pub fn show(&mut self, p: &SeriesPoint, devices: u64, errors: u64) {
        if p.t_s % self.every != 0 {
            return;
        }
        let line = format_line(p, devices, errors);
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            // Back to the line start, the line, erase what a longer previous line left.
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
        self.shown = true;
    }

    /// Ends the in-place line, so that what follows starts on a line of its own.
    pub fn finish(&mut self) {
        if self.tty && self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

/// One progress line.
pub fn format_line(p: &SeriesPoint, devices: u64, errors: u64) -> String {
    let p99 = p.p99_ms.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    format!(
        "loadgen {:>4}s  connected {}/{devices}  logged in {}  {:.0} frames/s  {:.0} records/s \
         acked  p99(1s) {p99}  errors {errors}",
        p.t_s, p.connected, p.logged_in, p.frames_per_s, p.records_per_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_sampler_skips_to_the_last_second_due() {
        let t0 = Instant::now();
        let s = |n: f64| t0 + Duration::from_secs_f64(n);
        assert_eq!(latest_due(s(1.0), s(1.0)), s(1.0));
        assert_eq!(latest_due(s(1.0), s(1.9)), s(1.0));
        assert_eq!(
            latest_due(s(1.0), s(4.2)),
            s(4.0),
            "seconds 2 and 3 are skipped"
        );
        // Each second is sampled once: the next tick is after the one taken.
        let mut next = s(1.0);
        let mut ticks = Vec::new();
        for now in [1.05, 1.6, 2.0, 5.5, 6.01] {
            if s(now) >= next {
                let due = latest_due(next, s(now));
                ticks.push(due.duration_since(t0).as_secs_f64().round() as u32);
                next = due + Duration::from_secs(1);
            }
        }
        assert_eq!(ticks, [1, 2, 5, 6]);
    }

    #[test]
    fn the_line_says_what_the_second_did() {
        let p = SeriesPoint {
            t_s: 12,
            connected: 17_998,
            logged_in: 18_000,
            frames_per_s: 4512.4,
            records_per_s: 45_124.0,
            p99_ms: Some(12.34),
            ..SeriesPoint::default()
        };
        let l = format_line(&p, 18_000, 3);
        for part in [
            "12s",
            "connected 17998/18000",
            "logged in 18000",
            "4512 frames/s",
            "45124 records/s acked",
            "p99(1s) 12.3 ms",
            "errors 3",
        ] {
            assert!(l.contains(part), "{part:?} in {l:?}");
        }
        let quiet = SeriesPoint::default();
        assert!(format_line(&quiet, 1, 0).contains("p99(1s) -"));
    }
}
