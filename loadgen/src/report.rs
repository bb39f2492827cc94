//! The end-of-run report: one serde struct that is both the `--json` output and what a
//! `--processes` worker hands its parent, the merge of several of them (histograms merged
//! exactly, from their HdrHistogram V2 encoding), and the percentile table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Mode};
use crate::stats::{new_histogram, Stats};

/// A histogram as text: HdrHistogram's V2 encoding (what other HdrHistogram tools read), in
/// base64.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .expect("a histogram serializes into memory");
    BASE64.encode(bytes)
}

/// The histogram of [`encode_histogram`].
///
/// # Errors
/// Text that is not base64 of a V2 histogram.
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = BASE64
        .decode(text)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram does not decode: {e:?}"))
}

/// Milliseconds of a microsecond value.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Ack-latency percentiles of a run, ms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Acks measured (after the warmup).
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// The histogram itself (V2, base64), in a worker's report only: what the merge reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<String>,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let q = |p: f64| ms(h.value_at_quantile(p));
        Latency {
            count: h.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: ms(h.max()),
            histogram: None,
        }
    }
}

/// One second of the run (the second that ends `t_s` seconds after the start).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    pub t_s: u32,
    /// Records and frames acked during this second (all of them, warmup included).
    pub records: u64,
    pub frames: u64,
    pub records_per_s: f64,
    pub frames_per_s: f64,
    /// Ack-latency percentiles of this second's acks; null when nothing was acked.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Devices logged in at the end of the second, and since the start.
    pub connected: u64,
    pub logged_in: u64,
    /// Errors of this second: failed connects, refused logins, ack timeouts, bad acks.
    pub errors: u64,
    /// This second's latencies (V2, base64), from a worker only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<String>,
}

impl SeriesPoint {
    /// Sets the percentiles from `h`.
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        (self.p50_ms, self.p99_ms) = if h.is_empty() {
            (None, None)
        } else {
            (
                Some(ms(h.value_at_quantile(0.5))),
                Some(ms(h.value_at_quantile(0.99))),
            )
        };
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    /// Time for every device to get its first connect token (devices / --connect-rate).
    pub ramp_s: f64,
    pub warmup_s: f64,
    /// The window records/s and the percentiles are measured over.
    pub measured_s: f64,
    /// From the start to the end of the last device.
    pub wall_s: f64,
    /// The hard cap stopped the run (devices were aborted).
    pub hard_cap_hit: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Devices {
    pub total: u64,
    /// Logged in at least once.
    pub logged_in: u64,
    /// Never logged in: the connect failures.
    pub never_connected: u64,
    /// `--drop-fraction` devices.
    pub droppers: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectErrors {
    pub refused: u64,
    pub timeout: u64,
    /// EADDRNOTAVAIL: ephemeral ports of the source address exhausted.
    pub no_port: u64,
    /// EMFILE/ENFILE: out of descriptors.
    pub no_descriptor: u64,
    pub reset: u64,
    pub other: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Connects {
    /// Connection attempts: first ones, retries and reconnects.
    pub attempts: u64,
    /// Attempts that failed and were retried with back-off (not failures: see
    /// `devices.never_connected`).
    pub errors: u64,
    pub errors_by_cause: ConnectErrors,
    /// Logins answered `00`.
    pub logins_refused: u64,
    /// Connections re-established after a lost or dropped one.
    pub reconnects: u64,
    /// Connections cut on purpose (`--drop-fraction`).
    pub drops: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Frames {
    pub sent: u64,
    pub acked: u64,
    /// Sent again after a reconnect (TCP) or an ack timeout (UDP).
    pub resent: u64,
    pub ack_timeouts: u64,
    /// Acks with a wrong count, acks for nothing, undecodable gateway bytes.
    pub bad_acks: u64,
    pub unacked_at_end: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Records {
    pub acked: u64,
    pub acked_in_window: u64,
    /// Records acked per second in the measured window.
    pub per_s: f64,
    /// Open loop: records/s offered; 0 in closed loop.
    pub offered_per_s: f64,
    pub unacked_at_end: u64,
    /// Record timestamps of the run, ms since the Unix epoch (what the durability check
    /// counts).
    pub first_ts_ms: u64,
    pub last_ts_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Commands {
    /// Command frames received from the gateway.
    pub received: u64,
    /// Responses written.
    pub answered: u64,
}

/// The durability check: every acked record stored exactly once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verify {
    pub stored: u64,
    pub acked: u64,
    pub ok: bool,
    pub verdict: String,
}

impl Verify {
    /// Compares the rows found with the records acked; rows of frames still unacked at the
    /// end may be stored (committed, ack not yet read), which is named but still a mismatch.
    pub fn judge(stored: u64, acked: u64, unacked: u64) -> Verify {
        let verdict = if stored == acked {
            "OK: every acked record is stored exactly once".to_string()
        } else if stored > acked && stored <= acked + unacked {
            format!(
                "MISMATCH: {} more stored than acked, within the {unacked} records left unacked \
                 at the end",
                stored - acked
            )
        } else if stored > acked {
            format!(
                "MISMATCH: {} more stored than acked, more than the {unacked} records left \
                 unacked",
                stored - acked
            )
        } else {
            format!("MISMATCH: {} acked records are NOT stored", acked - stored)
        };
        Verify {
            stored,
            acked,
            ok: stored == acked,
            verdict,
        }
    }
}

/// Everything a run reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub config: Config,
    pub duration: Durations,
    pub devices: Devices,
    pub connects: Connects,
    pub frames: Frames,
    pub records: Records,
    /// Ack latency (send, or schedule in open loop, to ack), after the warmup.
    pub latency_ms: Latency,
    pub commands: Commands,
    /// `--verify-database-url`: null when not asked for.
    pub verify: Option<Verify>,
    /// One point per second from the start.
    pub series: Vec<SeriesPoint>,
}

impl Report {
    /// The report of one process's run; `keep_histograms` (a worker) keeps the encoded
    /// histograms for the merge.
    pub fn from_run(
        config: Config,
        s: &Stats,
        series: Vec<SeriesPoint>,
        wall_s: f64,
        hard_cap_hit: bool,
        keep_histograms: bool,
    ) -> Report {
        let h = s.latency();
        let mut latency_ms = Latency::of(&h);
        if keep_histograms {
            latency_ms.histogram = Some(encode_histogram(&h));
        }
        let get = Stats::get;
        let c = &s.connect_error;
        let droppers = (0..config.devices as usize)
            .filter(|&i| crate::device::is_dropper(i, config.drop_fraction))
            .count() as u64;
        let mut r = Report {
            duration: Durations {
                ramp_s: config.ramp().as_secs_f64(),
                warmup_s: config.warmup_s,
                measured_s: config.duration_s - config.warmup_s,
                wall_s,
                hard_cap_hit,
            },
            devices: Devices {
                total: config.devices,
                logged_in: get(&s.logged_in),
                never_connected: get(&s.never_connected),
                droppers,
            },
            connects: Connects {
                attempts: get(&s.connect_attempts),
                errors: get(&s.connect_errors),
                errors_by_cause: ConnectErrors {
                    refused: get(&c.refused),
                    timeout: get(&c.timeout),
                    no_port: get(&c.no_port),
                    no_descriptor: get(&c.no_descriptor),
                    reset: get(&c.reset),
                    other: get(&c.other),
                },
                logins_refused: get(&s.logins_refused),
                reconnects: get(&s.reconnects),
                drops: get(&s.drops),
            },
            frames: Frames {
                sent: get(&s.frames_sent),
                acked: get(&s.frames_acked),
                resent: get(&s.resends),
                ack_timeouts: get(&s.ack_timeouts),
                bad_acks: get(&s.bad_acks),
                unacked_at_end: get(&s.unacked_frames),
            },
            records: Records {
                acked: get(&s.records_acked),
                acked_in_window: get(&s.window_records),
                per_s: 0.0,
                offered_per_s: 0.0,
                unacked_at_end: get(&s.unacked_records),
                first_ts_ms: config.ts_base_ms,
                last_ts_ms: get(&s.max_ts),
            },
            latency_ms,
            commands: Commands {
                received: get(&s.commands_received),
                answered: get(&s.commands_answered),
            },
            verify: None,
            series,
            config,
        };
        r.derive_rates();
        r
    }

    /// Recomputes what follows from the counts and the config.
    fn derive_rates(&mut self) {
        self.records.per_s =
            self.records.acked_in_window as f64 / self.duration.measured_s.max(1e-9);
        self.records.offered_per_s = match self.config.mode {
            Mode::Closed => 0.0,
            Mode::Open => self.config.rate_records_per_s,
        };
    }

    /// One report of a run from its workers' reports, under the parent's `config`: counts
    /// summed, histograms merged (overall and per second, by second), so every percentile is
    /// exact. The result carries no histograms.
    ///
    /// # Errors
    /// A worker report without its histograms, or with one that does not decode.
    pub fn merge(config: Config, parts: &[Report]) -> Result<Report, String> {
        let mut total = new_histogram();
        let mut seconds: BTreeMap<u32, Vec<&SeriesPoint>> = BTreeMap::new();
        let mut m = Report {
            duration: Durations {
                ramp_s: config.ramp().as_secs_f64(),
                warmup_s: config.warmup_s,
                measured_s: config.duration_s - config.warmup_s,
                ..Durations::default()
            },
            devices: Devices::default(),
            connects: Connects::default(),
            frames: Frames::default(),
            records: Records {
                first_ts_ms: config.ts_base_ms,
                ..Records::default()
            },
            latency_ms: Latency::default(),
            commands: Commands::default(),
            verify: None,
            series: Vec::new(),
            config,
        };
        for p in parts {
            let h = p
                .latency_ms
                .histogram
                .as_deref()
                .ok_or("a worker report has no latency histogram")?;
            total
                .add(decode_histogram(h)?)
                .map_err(|e| format!("{e:?}"))?;
            let d = &mut m.duration;
            d.wall_s = d.wall_s.max(p.duration.wall_s);
            d.hard_cap_hit |= p.duration.hard_cap_hit;
            let (a, b) = (&mut m.devices, &p.devices);
            a.total += b.total;
            a.logged_in += b.logged_in;
            a.never_connected += b.never_connected;
            a.droppers += b.droppers;
            let (a, b) = (&mut m.connects, &p.connects);
            a.attempts += b.attempts;
            a.errors += b.errors;
            a.logins_refused += b.logins_refused;
            a.reconnects += b.reconnects;
            a.drops += b.drops;
            let (a, b) = (&mut a.errors_by_cause, &b.errors_by_cause);
            a.refused += b.refused;
            a.timeout += b.timeout;
            a.no_port += b.no_port;
            a.no_descriptor += b.no_descriptor;
            a.reset += b.reset;
            a.other += b.other;
            let (a, b) = (&mut m.frames, &p.frames);
            a.sent += b.sent;
            a.acked += b.acked;
            a.resent += b.resent;
            a.ack_timeouts += b.ack_timeouts;
            a.bad_acks += b.bad_acks;
            a.unacked_at_end += b.unacked_at_end;
            let (a, b) = (&mut m.records, &p.records);
            a.acked += b.acked;
            a.acked_in_window += b.acked_in_window;
            a.unacked_at_end += b.unacked_at_end;
            a.last_ts_ms = a.last_ts_ms.max(b.last_ts_ms);
            m.commands.received += p.commands.received;
            m.commands.answered += p.commands.answered;
            for pt in &p.series {
                seconds.entry(pt.t_s).or_default().push(pt);
            }
        }
        m.latency_ms = Latency::of(&total);
        m.series = seconds
            .into_values()
            .map(|pts| SeriesPoint::merge(&pts))
            .collect::<Result<_, _>>()?;
        m.derive_rates();
        Ok(m)
    }

    /// The table for people: what ran, the percentiles, the counts.
    pub fn table(&self) -> String {
        let c = &self.config;
        let load = match c.mode {
            Mode::Open => format!("open loop, {:.0} records/s offered", c.rate_records_per_s),
            Mode::Closed => "closed loop".to_string(),
        };
        let mut t = String::new();
        let _ = writeln!(
            t,
            "loadgen: {} devices ({} process{}), {:?} codec {}, {} records x {} IO per frame, \
             in-flight {}, {load}",
            c.devices,
            c.processes,
            if c.processes == 1 { "" } else { "es" },
            c.transport,
            c.codec.name(),
            c.records_per_frame,
            c.io_per_record,
            c.in_flight,
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            t,
            "\n  ack latency ms   {:>10} {:>10} {:>10} {:>10} {:>10}",
            "p50", "p90", "p99", "p99.9", "max"
        );
        let _ = writeln!(
            t,
            "                   {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}   ({} acks measured)\n",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<26}{v:>14}");
        };
        let d = &self.duration;
        row(
            "measured s",
            format!("{:.1} (after {:.1} warmup)", d.measured_s, d.warmup_s),
        );
        row("records/s acked", format!("{:.0}", self.records.per_s));
        if c.mode == Mode::Open {
            row(
                "records/s offered",
                format!("{:.0}", self.records.offered_per_s),
            );
        }
        row("records acked", self.records.acked.to_string());
        row(
            "frames sent / acked",
            format!("{} / {}", self.frames.sent, self.frames.acked),
        );
        row(
            "devices logged in",
            format!("{} of {}", self.devices.logged_in, self.devices.total),
        );
        row("never connected", self.devices.never_connected.to_string());
        let k = &self.connects;
        row("connect attempts", k.attempts.to_string());
        let e = &k.errors_by_cause;
        row(
            "connect errors (retried)",
            format!(
                "{} (refused {}, timeout {}, no port {}, no descriptor {}, reset {}, other {})",
                k.errors, e.refused, e.timeout, e.no_port, e.no_descriptor, e.reset, e.other
            ),
        );
        row("logins refused", k.logins_refused.to_string());
        row("reconnects", k.reconnects.to_string());
        row("drops (on purpose)", k.drops.to_string());
        row("resends", self.frames.resent.to_string());
        row("ack timeouts", self.frames.ack_timeouts.to_string());
        row("bad acks", self.frames.bad_acks.to_string());
        row(
            "commands received/answered",
            format!("{} / {}", self.commands.received, self.commands.answered),
        );
        row(
            "unacked at end",
            format!(
                "{} frames / {} records",
                self.frames.unacked_at_end, self.records.unacked_at_end
            ),
        );
        if let Some(v) = &self.verify {
            row(
                "durability",
                format!("stored {} acked {}: {}", v.stored, v.acked, v.verdict),
            );
        }
        if d.hard_cap_hit {
            row("hard cap", "HIT: devices were aborted".to_string());
        }
        t
    }
}

impl SeriesPoint {
    /// The processes' points of one second as one: counts summed, latencies merged from
    /// their histograms. The result carries no histogram.
    ///
    /// # Errors
    /// A point without its histogram, or with one that does not decode.
    pub fn merge(points: &[&SeriesPoint]) -> Result<SeriesPoint, String> {
        let mut acc = SeriesPoint {
            t_s: points.first().map_or(0, |p| p.t_s),
            ..SeriesPoint::default()
        };
        let mut h = new_histogram();
        for p in points {
            let text = p
                .histogram
                .as_deref()
                .ok_or("a worker's series point has no histogram")?;
            h.add(decode_histogram(text)?)
                .map_err(|e| format!("{e:?}"))?;
            acc.add(p);
        }
        acc.set_latency(&h);
        Ok(acc)
    }

    /// Adds another process's point of the same second (latency is merged apart).
    fn add(&mut self, o: &SeriesPoint) {
        self.records += o.records;
        self.frames += o.frames;
        self.records_per_s += o.records_per_s;
        self.frames_per_s += o.frames_per_s;
        self.connected += o.connected;
        self.logged_in += o.logged_in;
        self.errors += o.errors;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;

    fn hist(values: &[u64]) -> Histogram<u64> {
        let mut h = new_histogram();
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn histograms_survive_their_text_form() {
        let h = hist(&[1, 250, 250, 9_999, 1_000_000, 119_000_000]);
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back, h);
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram("AAAA").is_err());
    }

    /// A worker's report of `lat` latencies (us), acks per second as given.
    fn worker(config: &Config, lat: &[u64], seconds: &[(u32, &[u64])]) -> Report {
        let s = Stats::new();
        for &v in lat {
            s.record_latency(0, v, true);
        }
        Stats::add(&s.records_acked, 10 * lat.len() as u64);
        Stats::add(&s.window_records, 10 * lat.len() as u64);
        Stats::add(&s.connect_errors, 2);
        Stats::add(&s.connect_error.no_port, 2);
        let series = seconds
            .iter()
            .map(|&(t, v)| {
                let h = hist(v);
                let mut p = SeriesPoint {
                    t_s: t,
                    records: 10 * v.len() as u64,
                    records_per_s: 10.0 * v.len() as f64,
                    connected: 5,
                    histogram: Some(encode_histogram(&h)),
                    ..SeriesPoint::default()
                };
                p.set_latency(&h);
                p
            })
            .collect();
        Report::from_run(config.clone(), &s, series, 12.5, false, true)
    }

    #[test]
    fn merged_percentiles_are_those_of_all_latencies() {
        let c = sample();
        // Process A is fast, process B is slow: the merged p99 must see B's tail, which no
        // average of the two p99s gives.
        let a: Vec<u64> = (1..=990).map(|i| 1000 + i).collect();
        let b: Vec<u64> = (1..=10).map(|i| 500_000 + i * 1000).collect();
        let ra = worker(&c, &a, &[(1, &[1000, 2000]), (2, &[3000])]);
        let rb = worker(&c, &b, &[(2, &[900_000]), (3, &[50])]);
        let m = Report::merge(c.clone(), &[ra, rb]).unwrap();
        let all = hist(&[a, b].concat());
        assert_eq!(m.latency_ms, Latency::of(&all));
        assert_eq!(m.latency_ms.count, 1000);
        assert!(
            m.latency_ms.p999 > 500.0,
            "the slow process's tail is in the merge"
        );
        assert_eq!(m.records.acked, 10_000);
        assert_eq!(m.connects.errors, 4);
        assert_eq!(m.connects.errors_by_cause.no_port, 4);
        assert!(
            m.latency_ms.histogram.is_none(),
            "the merged report carries no histograms"
        );
        // Per second: points of the same second are summed and their latencies merged.
        let ts: Vec<u32> = m.series.iter().map(|p| p.t_s).collect();
        assert_eq!(ts, [1, 2, 3]);
        let two = &m.series[1];
        assert_eq!(two.records, 20);
        assert_eq!(two.connected, 10);
        let h2 = hist(&[3000, 900_000]);
        assert_eq!(two.p99_ms, Some(ms(h2.value_at_quantile(0.99))));
        assert!(m.series.iter().all(|p| p.histogram.is_none()));
        // A report without histograms cannot be merged.
        let mut bare = m.clone();
        bare.series.clear();
        assert!(Report::merge(c, &[bare]).is_err());
    }

    #[test]
    fn json_has_its_shape_and_round_trips() {
        let c = sample();
        let mut r = worker(&c, &[1000, 2000], &[(1, &[1000])]);
        r.verify = Some(Verify::judge(20, 20, 0));
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "config",
            "duration",
            "devices",
            "connects",
            "frames",
            "records",
            "latency_ms",
            "commands",
            "verify",
            "series",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert_eq!(v["config"]["codec"], "8e");
        assert_eq!(v["config"]["mode"], "open");
        assert_eq!(v["verify"]["ok"], true);
        for key in ["p50", "p90", "p99", "p999", "max", "count"] {
            assert!(v["latency_ms"][key].is_number(), "{key}");
        }
        assert!(v["series"][0]["p99_ms"].is_number());
        assert!(v["records"]["per_s"].is_number());
        assert!(v["connects"]["errors_by_cause"]["no_port"].is_number());
        // Without --verify-database-url the check is null, not absent.
        r.verify = None;
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(v["verify"].is_null());
    }

    #[test]
    fn verify_names_each_outcome() {
        assert!(Verify::judge(5, 5, 0).ok);
        let v = Verify::judge(4, 5, 0);
        assert!(!v.ok && v.verdict.contains("NOT stored"));
        let v = Verify::judge(7, 5, 3);
        assert!(!v.ok && v.verdict.contains("within"));
        let v = Verify::judge(9, 5, 3);
        assert!(!v.ok && v.verdict.contains("more than"));
    }
}
