//! Counters and ack-latency histograms that the device tasks share across the runtime's
//! worker threads, and the once-a-second sample that feeds the progress line, the time series
//! and the chart.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Histograms are sharded by device so that worker threads rarely meet on a lock.
const HIST_SHARDS: usize = 16;
/// Largest latency the histogram resolves: 120 s, in microseconds (larger ones saturate).
pub const HIST_MAX_US: u64 = 120_000_000;

/// An empty latency histogram (microseconds, 3 significant digits). Every histogram of a run,
/// in every process, has these bounds, so they merge exactly.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// Why one connection attempt failed. Each cause points at a different culprit: `no_port` is
/// ephemeral port exhaustion (spread over `--source-addrs`), `no_descriptor` this process's
/// descriptor limit (use `--processes`), `refused` a full or absent listener, `timeout` a
/// gateway (or a loadgen) too busy to finish the handshake and login in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectErrorKind {
    Refused,
    Timeout,
    NoPort,
    NoDescriptor,
    /// Reset or closed during connect or login.
    Reset,
    Other,
}

impl ConnectErrorKind {
    /// The cause of a failed `connect`, login write or login read.
    pub fn of(e: &io::Error) -> ConnectErrorKind {
        match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => return ConnectErrorKind::NoPort,
            Some(libc::EMFILE) | Some(libc::ENFILE) => return ConnectErrorKind::NoDescriptor,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ConnectErrorKind::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => ConnectErrorKind::Reset,
            _ => ConnectErrorKind::Other,
        }
    }
}

/// Failed connection attempts by cause.
#[derive(Default)]
pub struct ConnectErrorCounters {
    pub refused: AtomicU64,
    pub timeout: AtomicU64,
    pub no_port: AtomicU64,
    pub no_descriptor: AtomicU64,
    pub reset: AtomicU64,
    pub other: AtomicU64,
}

/// Everything the devices count. Counters are plain relaxed atomics.
pub struct Stats {
    hists: Vec<Mutex<Histogram<u64>>>,
    /// Latencies since the last sample (warmup included).
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
    /// Devices logged in right now (a gauge: up at login, down when the session ends).
    pub connected: AtomicU64,
    /// Devices that never logged in during the run: the connect failures.
    pub never_connected: AtomicU64,
    /// Connection attempts (connect + login), first ones, retries and reconnects.
    pub connect_attempts: AtomicU64,
    /// Attempts that failed and were retried after a back-off; by cause in `connect_error`.
    pub connect_errors: AtomicU64,
    pub connect_error: ConnectErrorCounters,
    /// Connections re-established after a lost or dropped one.
    pub reconnects: AtomicU64,
    /// Frames sent again after a reconnect (TCP) or an ack timeout (UDP).
    pub resends: AtomicU64,
    /// Wrong ack counts, acks for no frame, and undecodable bytes from the gateway.
    pub bad_acks: AtomicU64,
    /// Logins answered `00`.
    pub logins_refused: AtomicU64,
    /// Connections given up because the oldest frame's ack did not come in time (TCP), or
    /// datagrams whose ack did not come in time (UDP).
    pub ack_timeouts: AtomicU64,
    /// Connections a `--drop-fraction` device cut mid-frame on purpose.
    pub drops: AtomicU64,
    /// Codec 12/14 command frames received from the gateway.
    pub commands_received: AtomicU64,
    /// Responses written for them.
    pub commands_answered: AtomicU64,
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
        let hist = || Mutex::new(new_histogram());
        let z = || AtomicU64::new(0);
        Stats {
            hists: (0..HIST_SHARDS).map(|_| hist()).collect(),
            recent: (0..HIST_SHARDS).map(|_| hist()).collect(),
            frames_sent: z(),
            frames_acked: z(),
            records_acked: z(),
            window_frames: z(),
            window_records: z(),
            logged_in: z(),
            connected: z(),
            never_connected: z(),
            connect_attempts: z(),
            connect_errors: z(),
            connect_error: ConnectErrorCounters::default(),
            reconnects: z(),
            resends: z(),
            bad_acks: z(),
            logins_refused: z(),
            ack_timeouts: z(),
            drops: z(),
            commands_received: z(),
            commands_answered: z(),
            unacked_frames: z(),
            unacked_records: z(),
            max_ts: z(),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts a failed connection attempt under its cause.
    pub fn connect_failed(&self, kind: ConnectErrorKind) {
        let c = &self.connect_error;
        Stats::add(&self.connect_errors, 1);
        Stats::add(
            match kind {
                ConnectErrorKind::Refused => &c.refused,
                ConnectErrorKind::Timeout => &c.timeout,
                ConnectErrorKind::NoPort => &c.no_port,
                ConnectErrorKind::NoDescriptor => &c.no_descriptor,
                ConnectErrorKind::Reset => &c.reset,
                ConnectErrorKind::Other => &c.other,
            },
            1,
        );
    }

    /// Every kind of error so far, for the progress line and the series.
    pub fn errors_total(&self) -> u64 {
        Stats::get(&self.connect_errors)
            + Stats::get(&self.ack_timeouts)
            + Stats::get(&self.bad_acks)
            + Stats::get(&self.logins_refused)
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

    /// All shards' measured latencies in one histogram.
    pub fn latency(&self) -> Histogram<u64> {
        merge_shards(&self.hists, false)
    }

    /// The latencies recorded since the last call (for the once-a-second sample).
    pub fn take_recent(&self) -> Histogram<u64> {
        merge_shards(&self.recent, true)
    }
}

/// The sum of `shards`, optionally emptying them.
fn merge_shards(shards: &[Mutex<Histogram<u64>>], reset: bool) -> Histogram<u64> {
    let mut all = new_histogram();
    for h in shards {
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        all.add(&*h).expect("same bounds");
        if reset {
            h.reset();
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_are_classified_by_cause() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            ConnectErrorKind::of(&os(libc::EADDRNOTAVAIL)),
            ConnectErrorKind::NoPort
        );
        assert_eq!(
            ConnectErrorKind::of(&os(libc::EMFILE)),
            ConnectErrorKind::NoDescriptor
        );
        assert_eq!(
            ConnectErrorKind::of(&os(libc::ECONNREFUSED)),
            ConnectErrorKind::Refused
        );
        assert_eq!(
            ConnectErrorKind::of(&io::Error::from(io::ErrorKind::TimedOut)),
            ConnectErrorKind::Timeout
        );
        assert_eq!(
            ConnectErrorKind::of(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            ConnectErrorKind::Reset
        );
        let s = Stats::new();
        s.connect_failed(ConnectErrorKind::NoPort);
        s.connect_failed(ConnectErrorKind::NoPort);
        s.connect_failed(ConnectErrorKind::Timeout);
        assert_eq!(Stats::get(&s.connect_errors), 3);
        assert_eq!(Stats::get(&s.connect_error.no_port), 2);
        assert_eq!(s.errors_total(), 3);
    }

    #[test]
    fn recent_latencies_are_taken_once() {
        let s = Stats::new();
        s.record_latency(0, 1000, false);
        s.record_latency(17, 3000, true);
        assert_eq!(s.latency().len(), 1, "warmup latencies are not measured");
        let r = s.take_recent();
        assert_eq!(r.len(), 2);
        assert_eq!(s.take_recent().len(), 0, "taking empties");
        assert_eq!(s.latency().len(), 1, "the run's histogram stays");
    }
}
