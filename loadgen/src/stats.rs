//! Counters and the ack-latency histogram that the device tasks share, and the end-of-run
//! report (a fixed table, and optionally one JSON line).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Histograms are sharded by device so that worker threads rarely meet on a lock.
const HIST_SHARDS: usize = 16;
/// Largest latency the histogram resolves: 120 s, in microseconds (larger ones saturate).
const HIST_MAX_US: u64 = 120_000_000;

/// Everything the devices count. Counters are plain relaxed atomics.
pub struct Stats {
    hists: Vec<Mutex<Histogram<u64>>>,
    /// Latencies since the last progress line (warmup included).
    recent: Vec<Mutex<Histogram<u64>>>,
    /// Frames written (first sends; resends are counted apart).
    pub frames_sent: AtomicU64,
    /// Frames (datagrams) acked with the right count, over the whole run.
    pub frames_acked: AtomicU64,
    /// Records of those frames.
    pub records_acked: AtomicU64,
    /// Frames acked inside the measurement window (after warmup, before the send stop).
    pub window_frames: AtomicU64,
    /// Records of those frames: the basis of records/s.
    pub window_records: AtomicU64,
    /// Devices that logged in at least once.
    pub logged_in: AtomicU64,
    /// Connections re-established after a lost one.
    pub reconnects: AtomicU64,
    /// Frames sent again after a reconnect (TCP) or an ack timeout (UDP).
    pub resends: AtomicU64,
    /// Wrong ack counts, and acks for no frame.
    pub errors: AtomicU64,
    /// Logins answered `00`.
    pub login_rejects: AtomicU64,
    /// Failed or timed-out connection attempts and logins.
    pub connect_errors: AtomicU64,
    /// Connections given up because the oldest frame's ack did not come in time (TCP), or
    /// datagrams whose ack did not come in time (UDP).
    pub ack_timeouts: AtomicU64,
    /// Frames still unacked when the run ended.
    pub unacked_frames: AtomicU64,
    /// Records of those frames.
    pub unacked_records: AtomicU64,
    /// Largest record timestamp generated, ms since the Unix epoch.
    pub max_ts: AtomicU64,
}

impl Stats {
    /// Zeroed counters and empty histograms.
    pub fn new() -> Stats {
        let hist = || {
            Mutex::new(
                Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds"),
            )
        };
        Stats {
            hists: (0..HIST_SHARDS).map(|_| hist()).collect(),
            recent: (0..HIST_SHARDS).map(|_| hist()).collect(),
            frames_sent: AtomicU64::new(0),
            frames_acked: AtomicU64::new(0),
            records_acked: AtomicU64::new(0),
            window_frames: AtomicU64::new(0),
            window_records: AtomicU64::new(0),
            logged_in: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resends: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            login_rejects: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            ack_timeouts: AtomicU64::new(0),
            unacked_frames: AtomicU64::new(0),
            unacked_records: AtomicU64::new(0),
            max_ts: AtomicU64::new(0),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one send->ack latency of device `device`, in microseconds; `measured`: past
    /// the warmup, so it counts for the report too.
    pub fn record_latency(&self, device: usize, us: u64, measured: bool) {
        let us = us.max(1);
        if measured {
            let mut h = self.hists[device % HIST_SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            h.saturating_record(us);
        }
        let mut r = self.recent[device % HIST_SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.saturating_record(us);
    }

    /// All shards' latencies in one histogram.
    pub fn latency(&self) -> Histogram<u64> {
        merge(&self.hists, false)
    }

    /// The latencies recorded since the last call (for progress lines).
    pub fn take_recent(&self) -> Histogram<u64> {
        merge(&self.recent, true)
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The sum of `shards`, optionally emptying them.
fn merge(shards: &[Mutex<Histogram<u64>>], reset: bool) -> Histogram<u64> {
    let mut all = Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds");
    for h in shards {
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        all.add(&*h).expect("same bounds");
        if reset {
            h.reset();
        }
    }
    all
}

/// What was run: the part of the options the report repeats.
pub struct RunShape {
    pub transport: &'static str,
    pub codec: &'static str,
    pub devices: u64,
    pub records_per_frame: u64,
    pub io_per_record: u64,
    pub in_flight: u64,
    /// Frames/s per device; 0 = closed loop.
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
}

/// The end-of-run figures.
pub struct Report {
    pub shape: RunShape,
    pub logged_in: u64,
    pub frames_sent: u64,
    pub frames_acked: u64,
    pub records_acked: u64,
    /// Seconds of the measurement window (duration - warmup).
    pub window_s: f64,
    pub window_records: u64,
    pub window_frames: u64,
    pub latency_count: u64,
    /// p50, p90, p99, p99.9, max in ms.
    pub latency_ms: [f64; 5],
    pub reconnects: u64,
    pub resends: u64,
    pub errors: u64,
    pub login_rejects: u64,
    pub connect_errors: u64,
    pub ack_timeouts: u64,
    pub unacked_frames: u64,
    pub unacked_records: u64,
    /// Rows found by `--verify-database-url`, when it was given.
    pub stored: Option<u64>,
}

impl Report {
    /// The figures of a finished run.
    pub fn new(shape: RunShape, s: &Stats) -> Report {
        let h = s.latency();
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        let latency_ms = if h.is_empty() {
            [0.0; 5]
        } else {
            [q(0.5), q(0.9), q(0.99), q(0.999), h.max() as f64 / 1000.0]
        };
        let window_s = (shape.duration_s - shape.warmup_s).max(1e-9);
        Report {
            shape,
            logged_in: Stats::get(&s.logged_in),
            frames_sent: Stats::get(&s.frames_sent),
            frames_acked: Stats::get(&s.frames_acked),
            records_acked: Stats::get(&s.records_acked),
            window_s,
            window_records: Stats::get(&s.window_records),
            window_frames: Stats::get(&s.window_frames),
            latency_count: h.len(),
            latency_ms,
            reconnects: Stats::get(&s.reconnects),
            resends: Stats::get(&s.resends),
            errors: Stats::get(&s.errors),
            login_rejects: Stats::get(&s.login_rejects),
            connect_errors: Stats::get(&s.connect_errors),
            ack_timeouts: Stats::get(&s.ack_timeouts),
            unacked_frames: Stats::get(&s.unacked_frames),
            unacked_records: Stats::get(&s.unacked_records),
            stored: None,
        }
    }

    /// Records acked per second inside the measurement window.
    pub fn records_per_s(&self) -> f64 {
        self.window_records as f64 / self.window_s
    }

    /// Offered records/s of a fixed-rate run (0 for closed loop).
    pub fn offered_records_per_s(&self) -> f64 {
        self.shape.rate * (self.shape.devices * self.shape.records_per_frame) as f64
    }

    /// The fixed summary table.
    pub fn table(&self) -> String {
        let sh = &self.shape;
        let load = if sh.rate > 0.0 {
            format!(
                "{} frames/s per device = {:.0} records/s offered",
                sh.rate,
                self.offered_records_per_s()
            )
        } else {
            "closed loop".to_string()
        };
        let mut t = String::new();
        let _ = writeln!(
            t,
            "loadgen: {} codec {}, {} records x {} IO per frame, in-flight {}, {}",
            sh.transport, sh.codec, sh.records_per_frame, sh.io_per_record, sh.in_flight, load
        );
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<22}{v:>14}");
        };
        row("devices", format!("{}", sh.devices));
        row("duration s", format!("{:.1}", sh.duration_s));
        row("frames acked", format!("{}", self.frames_acked));
        row("records acked", format!("{}", self.records_acked));
        row("records/s acked", format!("{:.0}", self.records_per_s()));
        let names = [
            "ack latency p50 ms",
            "ack latency p90 ms",
            "ack latency p99 ms",
            "ack latency p999 ms",
            "ack latency max ms",
        ];
        for (name, v) in names.iter().zip(self.latency_ms) {
            row(name, format!("{v:.2}"));
        }
        row("reconnects", format!("{}", self.reconnects));
        row("resends", format!("{}", self.resends));
        row("errors", format!("{}", self.errors));
        let _ = writeln!(
            t,
            "  (measured {:.1} s after {:.1} s warmup; {} latencies; {} of {} devices logged in; frames sent {}; \
             login rejects {}; connect errors {}; ack timeouts {}; unacked at end {} frames / {} records)",
            self.window_s,
            sh.warmup_s,
            self.latency_count,
            self.logged_in,
            sh.devices,
            self.frames_sent,
            self.login_rejects,
            self.connect_errors,
            self.ack_timeouts,
            self.unacked_frames,
            self.unacked_records
        );
        t
    }

    /// The summary as one JSON object (no trailing newline).
    pub fn json(&self) -> String {
        let sh = &self.shape;
        let [p50, p90, p99, p999, max] = self.latency_ms;
        let stored = self.stored.map_or("null".to_string(), |s| s.to_string());
        format!(
            concat!(
                "{{\"transport\":\"{}\",\"codec\":\"{}\",\"devices\":{},\"records_per_frame\":{},\"io_per_record\":{},",
                "\"in_flight\":{},\"rate_frames_per_device\":{},\"offered_records_per_s\":{:.0},\"duration_s\":{:.3},",
                "\"warmup_s\":{:.3},\"measured_s\":{:.3},\"logged_in\":{},\"frames_sent\":{},\"frames_acked\":{},\"records_acked\":{},",
                "\"window_frames\":{},\"window_records\":{},\"records_per_s\":{:.1},\"latency_count\":{},",
                "\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},",
                "\"reconnects\":{},\"resends\":{},\"errors\":{},\"login_rejects\":{},\"connect_errors\":{},",
                "\"ack_timeouts\":{},\"unacked_frames\":{},\"unacked_records\":{},\"stored\":{}}}"
            ),
            sh.transport,
            sh.codec,
            sh.devices,
            sh.records_per_frame,
            sh.io_per_record,
            sh.in_flight,
            sh.rate,
            self.offered_records_per_s(),
            sh.duration_s,
            sh.warmup_s,
            self.window_s,
            self.logged_in,
            self.frames_sent,
            self.frames_acked,
            self.records_acked,
            self.window_frames,
            self.window_records,
            self.records_per_s(),
            self.latency_count,
            p50,
            p90,
            p99,
            p999,
            max,
            self.reconnects,
            self.resends,
            self.errors,
            self.login_rejects,
            self.connect_errors,
            self.ack_timeouts,
            self.unacked_frames,
            self.unacked_records,
            stored
        )
    }
}
