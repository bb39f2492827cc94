//! The gateway's figures, read from the counters the other threads keep: `GET /api/v1/stats`
//! (JSON) and `GET /metrics` (Prometheus text). Runs on the control thread.
//!
//! Nothing is counted twice: shards, budgets and the writer count in their own atomics, and
//! both endpoints read them at request time through one [`Gauges::snapshot`]; the Prometheus
//! side is a `prometheus-client` collector over that snapshot, not a second set of counters.
//! The one thing kept here is a few seconds of samples of the record counters, for the
//! records/s figure of the JSON (Prometheus users compute rates themselves).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use utoipa::ToSchema;

use crate::control::events::EventStats;
use crate::distribution::{Distribution, Summary};
use crate::shard::budget::ByteBudget;
use crate::shard::ShardStats;
use crate::sink::writer::WriterStats;

use super::api::auth::Denied;

/// How far back records/s looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// How often the record counters are sampled for it.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What the control thread reads of one shard (handed over by `serve` when the shard is made).
#[derive(Clone, Debug)]
pub struct ShardGauges {
    pub stats: Arc<ShardStats>,
    pub budget: ByteBudget,
}

/// Counters of the API itself.
#[derive(Debug, Default)]
pub struct ApiCounters {
    pub missing_key: AtomicU64,
    pub wrong_key: AtomicU64,
    pub scope: AtomicU64,
    /// Failed accepts of API connections (out of descriptors and the like).
    pub accept_errors: AtomicU64,
}

impl ApiCounters {
    pub fn denied(&self, d: Denied) {
        let c = match d {
            Denied::Missing => &self.missing_key,
            Denied::Wrong => &self.wrong_key,
            Denied::Scope => &self.scope,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the figures are read from.
#[derive(Debug)]
pub struct Gauges {
    pub shards: Vec<ShardGauges>,
    pub writer: Arc<WriterStats>,
    /// The webhook deliverer's counters (and the ledger's published events).
    pub events: Arc<EventStats>,
    /// When `serve` started (uptime).
    pub started: Instant,
    pub api: ApiCounters,
    /// Samples of each shard's records acked (TCP + UDP), oldest first, within [`RATE_WINDOW`].
    samples: Mutex<VecDeque<(Instant, Vec<u64>)>>,
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn records_of(s: &ShardStats) -> u64 {
    load(&s.records_acked) + load(&s.udp_records_acked)
}

impl Gauges {
    pub fn new(
        shards: Vec<ShardGauges>,
        writer: Arc<WriterStats>,
        events: Arc<EventStats>,
        started: Instant,
    ) -> Gauges {
        Gauges {
            shards,
            writer,
            events,
            started,
            api: ApiCounters::default(),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// Takes a sample of the record counters (every [`SAMPLE_EVERY`]) and forgets those that
    /// fell out of the window.
    pub fn sample(&self, now: Instant) {
        let counts = self.shards.iter().map(|g| records_of(&g.stats)).collect();
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((now, counts));
        // Keep one sample at or beyond the window's start, so that the window is covered.
        while s.len() > 2 && now.duration_since(s[1].0) >= RATE_WINDOW {
            s.pop_front();
        }
    }

    /// Records/s of each shard, from the oldest sample in the window to `now`'s counts.
    fn rates(&self, now: Instant, counts: &[u64]) -> Vec<f64> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match s.front() {
            Some((t, old)) if now.duration_since(*t) >= Duration::from_millis(100) => {
                let dt = now.duration_since(*t).as_secs_f64();
                counts
                    .iter()
                    .zip(old)
                    .map(|(new, old)| new.saturating_sub(*old) as f64 / dt)
                    .collect()
            }
            _ => vec![0.0; counts.len()],
        }
    }

    /// The figures now.
    pub fn snapshot(&self) -> Stats {
        let now = Instant::now();
        let mut shards: Vec<ShardFigures> = self
            .shards
            .iter()
            .enumerate()
            .map(|(id, g)| ShardFigures::read(id, g))
            .collect();
        let counts: Vec<u64> = shards.iter().map(|s| s.counters.records_acked).collect();
        for (s, rate) in shards.iter_mut().zip(self.rates(now, &counts)) {
            s.counters.records_per_s = rate;
        }
        let total = shards
            .iter()
            .fold(Counters::default(), |t, s| t.plus(&s.counters));
        let w = &*self.writer;
        let batches = load(&w.batches_committed);
        let records = load(&w.records_committed);
        Stats {
            uptime_s: now.duration_since(self.started).as_secs_f64(),
            memory_rss_bytes: rss_bytes(),
            accepting: shards.iter().all(|s| s.accepting),
            total,
            shards,
            writer: WriterFigures {
                connected: load(&w.connected) > 0,
                batches_committed: batches,
                records_committed: records,
                mean_batch_records: (batches > 0).then(|| records as f64 / batches as f64),
                transactions: load(&w.transactions),
                dedup_transactions: load(&w.dedup_transactions),
                retries: load(&w.retries),
                failed_batches: load(&w.failed_batches),
                failed_at_deadline: load(&w.failed_at_deadline),
                session_events_written: load(&w.session_events),
                session_events_dropped: load(&w.session_events_dropped),
                session_events_refused: load(&w.session_events_refused),
                queue_depth: load(&w.queue_depth),
                transaction_records: w.transaction_records.summary(),
                commit_latency_us: w.commit_us.summary(),
            },
            events: EventFigures {
                published: load(&w.events_published) + load(&self.events.published),
                delivered: load(&self.events.delivered),
                retried: load(&self.events.retried),
                failed_attempts: load(&self.events.failed_attempts),
                lag_s: load(&self.events.lag_ms) as f64 / 1000.0,
                in_memory: load(&self.events.window_events),
                routes_leased: load(&self.events.routes_leased),
                pruned: load(&self.events.pruned),
            },
            api: ApiFigures {
                auth_missing_key: load(&self.api.missing_key),
                auth_wrong_key: load(&self.api.wrong_key),
                auth_scope: load(&self.api.scope),
                accept_errors: load(&self.api.accept_errors),
            },
        }
    }
}

/// Resident memory of this process (`VmRSS` of /proc/self/status), if it can be read.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

// ===== the figures, as `GET /api/v1/stats` shows them =====

/// `GET /api/v1/stats`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Stats {
    /// Seconds since `serve` started.
    pub uptime_s: f64,
    /// Resident memory of the process (null where /proc cannot be read).
    pub memory_rss_bytes: Option<u64>,
    /// Every shard is bound and accepting devices.
    pub accepting: bool,
    /// The shards' counters added up.
    pub total: Counters,
    pub shards: Vec<ShardFigures>,
    pub writer: WriterFigures,
    pub events: EventFigures,
    pub api: ApiFigures,
}

/// Events and their webhook delivery.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventFigures {
    /// Events put in the outbox (by the writer and the command ledger).
    pub published: u64,
    /// Webhook requests answered 2xx.
    pub delivered: u64,
    /// Attempts that retried an event that had failed before.
    pub retried: u64,
    /// Attempts that failed (non-2xx, connection error, timeout).
    pub failed_attempts: u64,
    /// How long the oldest undelivered event of the routes this gateway delivers has waited.
    pub lag_s: f64,
    /// Events held in memory by the deliverer (bounded by its windows).
    pub in_memory: u64,
    /// Routes this gateway delivers now (holds the lease of).
    pub routes_leased: u64,
    /// Delivered events deleted from the outbox.
    pub pruned: u64,
}

/// One shard.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ShardFigures {
    pub shard: usize,
    pub accepting: bool,
    #[serde(flatten)]
    pub counters: Counters,
}

impl ShardFigures {
    fn read(shard: usize, g: &ShardGauges) -> ShardFigures {
        let s = &*g.stats;
        ShardFigures {
            shard,
            accepting: s.accepting.load(Ordering::Relaxed),
            counters: Counters {
                connections_open: load(&s.connections_open),
                connections_accepted: load(&s.connections_accepted),
                connections_refused: load(&s.connections_refused),
                accept_errors: load(&s.accept_errors),
                logins_accepted: load(&s.logins_accepted),
                logins_refused: load(&s.logins_rejected),
                login_timeouts: load(&s.login_timeouts),
                idle_timeouts: load(&s.idle_timeouts),
                write_timeouts: load(&s.write_timeouts),
                handoffs: load(&s.handoffs),
                handoffs_failed: load(&s.handoffs_failed),
                replaced: load(&s.replaced),
                disabled: load(&s.disabled),
                frames_received: load(&s.frames_received),
                frames_failed: load(&s.frames_failed),
                bad_frames: BadFrames {
                    tcp: load(&s.decode_errors),
                    udp: load(&s.udp_errors),
                },
                records_acked: records_of(s),
                records_acked_tcp: load(&s.records_acked),
                records_acked_udp: load(&s.udp_records_acked),
                records_per_s: 0.0,
                udp_datagrams: load(&s.udp_datagrams),
                device_commands_received: load(&s.commands_received),
                devices_untracked: load(&s.devices_untracked),
                bytes_awaiting_commit: g.budget.used() as u64,
                bytes_awaiting_commit_limit: g.budget.limit() as u64,
            },
        }
    }
}

/// A shard's counters (or all shards' together). Counters count since start.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct Counters {
    /// Open device connections now.
    pub connections_open: u64,
    pub connections_accepted: u64,
    /// Refused at the connection cap (at accept or at hand-over).
    pub connections_refused: u64,
    pub accept_errors: u64,
    pub logins_accepted: u64,
    /// Bad IMEI, or not admitted by the device policy.
    pub logins_refused: u64,
    pub login_timeouts: u64,
    pub idle_timeouts: u64,
    pub write_timeouts: u64,
    /// Logged-in connections moved to their owning shard, and moves that failed.
    pub handoffs: u64,
    pub handoffs_failed: u64,
    /// Sessions replaced by a newer connection of the same device.
    pub replaced: u64,
    /// Sessions ended because the device policy stopped admitting the device.
    pub disabled: u64,
    /// AVL frames received over TCP.
    pub frames_received: u64,
    /// Frames whose records the database refused.
    pub frames_failed: u64,
    pub bad_frames: BadFrames,
    /// Records stored and acked (TCP and UDP).
    pub records_acked: u64,
    pub records_acked_tcp: u64,
    pub records_acked_udp: u64,
    /// Records acked per second over the last few seconds.
    pub records_per_s: f64,
    pub udp_datagrams: u64,
    /// Command-family frames (Codec 12-15) received from devices.
    pub device_commands_received: u64,
    /// Devices not tracked because a shard's device table was full.
    pub devices_untracked: u64,
    /// Bytes of rows held awaiting their commit (the memory bound), and the bound.
    pub bytes_awaiting_commit: u64,
    pub bytes_awaiting_commit_limit: u64,
}

/// Input that closed a connection or was dropped, by transport. (The shards count bad TCP
/// input, a bad frame or data before the login, as one figure; per-kind counts are not kept.)
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct BadFrames {
    pub tcp: u64,
    pub udp: u64,
}

impl Counters {
    fn plus(self, o: &Counters) -> Counters {
        Counters {
            connections_open: self.connections_open + o.connections_open,
            connections_accepted: self.connections_accepted + o.connections_accepted,
            connections_refused: self.connections_refused + o.connections_refused,
            accept_errors: self.accept_errors + o.accept_errors,
            logins_accepted: self.logins_accepted + o.logins_accepted,
            logins_refused: self.logins_refused + o.logins_refused,
            login_timeouts: self.login_timeouts + o.login_timeouts,
            idle_timeouts: self.idle_timeouts + o.idle_timeouts,
            write_timeouts: self.write_timeouts + o.write_timeouts,
            handoffs: self.handoffs + o.handoffs,
            handoffs_failed: self.handoffs_failed + o.handoffs_failed,
            replaced: self.replaced + o.replaced,
            disabled: self.disabled + o.disabled,
            frames_received: self.frames_received + o.frames_received,
            frames_failed: self.frames_failed + o.frames_failed,
            bad_frames: BadFrames {
                tcp: self.bad_frames.tcp + o.bad_frames.tcp,
                udp: self.bad_frames.udp + o.bad_frames.udp,
            },
            records_acked: self.records_acked + o.records_acked,
            records_acked_tcp: self.records_acked_tcp + o.records_acked_tcp,
            records_acked_udp: self.records_acked_udp + o.records_acked_udp,
            records_per_s: self.records_per_s + o.records_per_s,
            udp_datagrams: self.udp_datagrams + o.udp_datagrams,
            device_commands_received: self.device_commands_received + o.device_commands_received,
            devices_untracked: self.devices_untracked + o.devices_untracked,
            bytes_awaiting_commit: self.bytes_awaiting_commit + o.bytes_awaiting_commit,
            bytes_awaiting_commit_limit: self.bytes_awaiting_commit_limit
                + o.bytes_awaiting_commit_limit,
        }
    }
}

/// The writer threads together.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WriterFigures {
    /// A writer connection to the database is up.
    pub connected: bool,
    pub batches_committed: u64,
    pub records_committed: u64,
    /// Records per committed batch, on average since start.
    pub mean_batch_records: Option<f64>,
    pub transactions: u64,
    /// Transactions that replayed a batch with `ON CONFLICT DO NOTHING` (a resend).
    pub dedup_transactions: u64,
    pub retries: u64,
    pub failed_batches: u64,
    /// Failed batches still retrying when the shutdown deadline passed.
    pub failed_at_deadline: u64,
    pub session_events_written: u64,
    pub session_events_dropped: u64,
    pub session_events_refused: u64,
    /// Messages (batches, session events) waiting for a writer thread when one last began a
    /// transaction.
    pub queue_depth: u64,
    /// Records per committed transaction, since start.
    pub transaction_records: Summary,
    /// A transaction's first statement to its commit answered (retries included), in
    /// microseconds, since start.
    pub commit_latency_us: Summary,
}

/// Requests the API turned away.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ApiFigures {
    pub auth_missing_key: u64,
    pub auth_wrong_key: u64,
    pub auth_scope: u64,
    /// Failed accepts of API connections (out of descriptors and the like).
    pub accept_errors: u64,
}

// ===== Prometheus =====

/// The registry `GET /metrics` encodes: one collector over [`Gauges`].
pub fn registry(gauges: Arc<Gauges>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Exposition(gauges)));
    r
}

/// Reads [`Gauges::snapshot`] at each scrape.
#[derive(Debug)]
struct Exposition(Arc<Gauges>);

/// One sample of a family: its labels and value.
type Sample = (Vec<(&'static str, String)>, Value);

/// A sample's value: counts and sizes are integers, and shown as such.
#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

/// Writes one metric family.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    ty: MetricType,
    samples: Vec<Sample>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, ty)?;
    for (labels, v) in samples {
        let e = m.encode_family(&labels)?;
        match (ty, v) {
            (MetricType::Counter, Value::Int(v)) => ConstCounter::new(v).encode(e)?,
            (MetricType::Counter, Value::Float(v)) => ConstCounter::new(v).encode(e)?,
            (_, Value::Int(v)) => ConstGauge::new(v).encode(e)?,
            (_, Value::Float(v)) => ConstGauge::new(v).encode(e)?,
        }
    }
    Ok(())
}

/// Buckets of `fleetgate_writer_commit_seconds`, in microseconds.
const COMMIT_BOUNDS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];
/// Buckets of `fleetgate_writer_transaction_records`.
const TRANSACTION_RECORDS_BOUNDS: [u64; 9] =
    [1, 10, 100, 500, 1_000, 5_000, 10_000, 20_000, 50_000];

/// Writes a distribution as a Prometheus histogram, its values and bounds divided by `per_unit`
/// (1e6 for microseconds shown as seconds).
fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    d: &Distribution,
    bounds: &[u64],
    per_unit: f64,
) -> Result<(), std::fmt::Error> {
    let (count, sum, le) = d.cumulative(bounds);
    // The encoder takes each bucket's own count and accumulates them.
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = bounds
        .iter()
        .zip(le)
        .map(|(&b, c)| {
            let own = c.saturating_sub(below);
            below = below.max(c);
            (b as f64 / per_unit, own)
        })
        .collect();
    buckets.push((f64::INFINITY, count.saturating_sub(below)));
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(sum as f64 / per_unit, count, &buckets, None)
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let st = self.0.snapshot();
        let shard = |s: &ShardFigures| vec![("shard", s.shard.to_string())];
        let with = |s: &ShardFigures, k: &'static str, v: &str| {
            vec![("shard", s.shard.to_string()), (k, v.to_string())]
        };
        let per_shard = |f: &dyn Fn(&ShardFigures) -> Value| -> Vec<Sample> {
            st.shards.iter().map(|s| (shard(s), f(s))).collect()
        };
        let per_shard_by =
            |k: &'static str, parts: &[(&str, &dyn Fn(&Counters) -> u64)]| -> Vec<Sample> {
                st.shards
                    .iter()
                    .flat_map(|s| {
                        parts
                            .iter()
                            .map(move |(v, f)| (with(s, k, v), Value::Int(f(&s.counters))))
                    })
                    .collect()
            };
        let e = &mut enc;
        let bytes = Unit::Bytes;
        let seconds = Unit::Seconds;

        family(
            e,
            "fleetgate_shard_accepting",
            "1 while the shard is bound and accepting devices.",
            None,
            Gauge,
            per_shard(&|s| Value::Int(s.accepting as u64)),
        )?;
        family(
            e,
            "fleetgate_connections_open",
            "Open device connections.",
            None,
            Gauge,
            per_shard(&|s| Value::Int(s.counters.connections_open)),
        )?;
        family(
            e,
            "fleetgate_connections_accepted",
            "Device connections accepted.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.connections_accepted)),
        )?;
        family(
            e,
            "fleetgate_connections_refused",
            "Device connections refused at the connection cap.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.connections_refused)),
        )?;
        family(
            e,
            "fleetgate_accept_errors",
            "Errors accepting device connections.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.accept_errors)),
        )?;
        family(
            e,
            "fleetgate_logins",
            "Device logins, by result.",
            None,
            Counter,
            per_shard_by(
                "result",
                &[
                    ("accepted", &|c| c.logins_accepted),
                    ("refused", &|c| c.logins_refused),
                ],
            ),
        )?;
        family(
            e,
            "fleetgate_connection_timeouts",
            "Connections closed by a timeout, by kind.",
            None,
            Counter,
            per_shard_by(
                "kind",
                &[
                    ("login", &|c| c.login_timeouts),
                    ("idle", &|c| c.idle_timeouts),
                    ("write", &|c| c.write_timeouts),
                ],
            ),
        )?;
        family(
            e,
            "fleetgate_handoffs",
            "Logged-in connections moved to their owning shard, by result.",
            None,
            Counter,
            per_shard_by(
                "result",
                &[("ok", &|c| c.handoffs), ("failed", &|c| c.handoffs_failed)],
            ),
        )?;
        family(
            e,
            "fleetgate_sessions_ended",
            "Sessions ended by the gateway, by cause.",
            None,
            Counter,
            per_shard_by(
                "cause",
                &[("replaced", &|c| c.replaced), ("disabled", &|c| c.disabled)],
            ),
        )?;
        family(
            e,
            "fleetgate_frames_received",
            "AVL frames received over TCP.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.frames_received)),
        )?;
        family(
            e,
            "fleetgate_frames_failed",
            "Frames whose records the database refused.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.frames_failed)),
        )?;
        family(
            e,
            "fleetgate_bad_frames",
            "Bad device input (connection closed, or datagram dropped), by transport.",
            None,
            Counter,
            per_shard_by(
                "transport",
                &[
                    ("tcp", &|c| c.bad_frames.tcp),
                    ("udp", &|c| c.bad_frames.udp),
                ],
            ),
        )?;
        family(
            e,
            "fleetgate_records_acked",
            "Records stored and acked, by transport.",
            None,
            Counter,
            per_shard_by(
                "transport",
                &[
                    ("tcp", &|c| c.records_acked_tcp),
                    ("udp", &|c| c.records_acked_udp),
                ],
            ),
        )?;
        family(
            e,
            "fleetgate_udp_datagrams",
            "UDP datagrams received.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.udp_datagrams)),
        )?;
        family(
            e,
            "fleetgate_device_commands_received",
            "Command-family frames (Codec 12-15) received from devices.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.device_commands_received)),
        )?;
        family(
            e,
            "fleetgate_devices_untracked",
            "Devices not tracked: the shard's device table was full.",
            None,
            Counter,
            per_shard(&|s| Value::Int(s.counters.devices_untracked)),
        )?;
        family(
            e,
            "fleetgate_rows_awaiting_commit",
            "Bytes of rows the shard holds awaiting their commit.",
            Some(&bytes),
            Gauge,
            per_shard(&|s| Value::Int(s.counters.bytes_awaiting_commit)),
        )?;
        family(
            e,
            "fleetgate_rows_awaiting_commit_limit",
            "The shard's bound on bytes of rows awaiting commit.",
            Some(&bytes),
            Gauge,
            per_shard(&|s| Value::Int(s.counters.bytes_awaiting_commit_limit)),
        )?;

        let w = &st.writer;
        let one = |v: u64| vec![(Vec::new(), Value::Int(v))];
        family(
            e,
            "fleetgate_writer_connected",
            "1 while a writer connection to the database is up.",
            None,
            Gauge,
            one(w.connected as u64),
        )?;
        family(
            e,
            "fleetgate_writer_batches_committed",
            "Batches committed.",
            None,
            Counter,
            one(w.batches_committed),
        )?;
        family(
            e,
            "fleetgate_writer_records_committed",
            "Records committed.",
            None,
            Counter,
            one(w.records_committed),
        )?;
        family(
            e,
            "fleetgate_writer_queue_depth",
            "Batches and session events waiting for a writer thread when one last began a transaction.",
            None,
            Gauge,
            one(st.writer.queue_depth),
        )?;
        histogram(
            e,
            "fleetgate_writer_commit",
            "A writer transaction's first statement to its commit answered, retries included \
             (a transaction split because part of it was refused counts once).",
            Some(&seconds),
            &self.0.writer.commit_us,
            &COMMIT_BOUNDS_US,
            1e6,
        )?;
        histogram(
            e,
            "fleetgate_writer_transaction_records",
            "Records per committed writer transaction (a transaction split because part of \
             it was refused counts once).",
            None,
            &self.0.writer.transaction_records,
            &TRANSACTION_RECORDS_BOUNDS,
            1.0,
        )?;
        family(
            e,
            "fleetgate_writer_transactions",
            "Transactions run.",
            None,
            Counter,
            one(w.transactions),
        )?;
        family(
            e,
            "fleetgate_writer_dedup_transactions",
            "Transactions replaying a resent batch without duplicates.",
            None,
            Counter,
            one(w.dedup_transactions),
        )?;
        family(
            e,
            "fleetgate_writer_retries",
            "Retries after a retriable database error.",
            None,
            Counter,
            one(w.retries),
        )?;
        family(
            e,
            "fleetgate_writer_batches_failed",
            "Batches answered failed (their frames are not acked).",
            None,
            Counter,
            one(w.failed_batches),
        )?;
        family(
            e,
            "fleetgate_writer_batches_failed_at_deadline",
            "Batches still failing when the shutdown deadline passed.",
            None,
            Counter,
            one(w.failed_at_deadline),
        )?;
        family(
            e,
            "fleetgate_session_events",
            "Connect/disconnect events, by outcome.",
            None,
            Counter,
            vec![
                (
                    vec![("outcome", "written".to_string())],
                    Value::Int(w.session_events_written),
                ),
                (
                    vec![("outcome", "dropped".to_string())],
                    Value::Int(w.session_events_dropped),
                ),
                (
                    vec![("outcome", "refused".to_string())],
                    Value::Int(w.session_events_refused),
                ),
            ],
        )?;
        let ev = &st.events;
        family(
            e,
            "fleetgate_events_published",
            "Events put in the outbox.",
            None,
            Counter,
            one(ev.published),
        )?;
        family(
            e,
            "fleetgate_webhook_attempts",
            "Webhook requests, by outcome (delivered: answered 2xx).",
            None,
            Counter,
            vec![
                (
                    vec![("outcome", "delivered".to_string())],
                    Value::Int(ev.delivered),
                ),
                (
                    vec![("outcome", "failed".to_string())],
                    Value::Int(ev.failed_attempts),
                ),
            ],
        )?;
        family(
            e,
            "fleetgate_webhook_retries",
            "Webhook attempts that retried an event that had failed before.",
            None,
            Counter,
            one(ev.retried),
        )?;
        family(
            e,
            "fleetgate_events_lag",
            "Age of the oldest undelivered event of the routes this gateway delivers.",
            Some(&seconds),
            Gauge,
            vec![(Vec::new(), Value::Float(ev.lag_s))],
        )?;
        family(
            e,
            "fleetgate_events_in_memory",
            "Events the deliverer holds in memory.",
            None,
            Gauge,
            one(ev.in_memory),
        )?;
        family(
            e,
            "fleetgate_api_auth_failures",
            "API requests refused, by reason.",
            None,
            Counter,
            vec![
                (
                    vec![("reason", "missing_key".to_string())],
                    Value::Int(st.api.auth_missing_key),
                ),
                (
                    vec![("reason", "wrong_key".to_string())],
                    Value::Int(st.api.auth_wrong_key),
                ),
                (
                    vec![("reason", "scope".to_string())],
                    Value::Int(st.api.auth_scope),
                ),
            ],
        )?;
        family(
            e,
            "fleetgate_api_accept_errors",
            "Failed accepts of API connections (out of descriptors and the like).",
            None,
            Counter,
            one(st.api.accept_errors),
        )?;
        family(
            e,
            "fleetgate_uptime",
            "Time since the gateway started.",
            Some(&seconds),
            Gauge,
            vec![(Vec::new(), Value::Float(st.uptime_s))],
        )?;
        if let Some(rss) = st.memory_rss_bytes {
            family(
                e,
                "process_resident_memory",
                "Resident memory size.",
                Some(&bytes),
                Gauge,
                vec![(Vec::new(), Value::Int(rss))],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(n: usize) -> Arc<Gauges> {
        let shards = (0..n)
            .map(|_| ShardGauges {
                stats: Arc::new(ShardStats::default()),
                budget: ByteBudget::new(1 << 20),
            })
            .collect();
        Arc::new(Gauges::new(
            shards,
            Arc::new(WriterStats::default()),
            Arc::new(EventStats::default()),
            Instant::now(),
        ))
    }

    #[test]
    fn rates_come_from_the_samples_in_the_window() {
        let g = gauges(2);
        let t0 = Instant::now();
        g.sample(t0);
        g.shards[0]
            .stats
            .records_acked
            .store(100, Ordering::Relaxed);
        g.shards[1]
            .stats
            .udp_records_acked
            .store(50, Ordering::Relaxed);
        let rates = g.rates(t0 + Duration::from_secs(2), &[100, 50]);
        assert_eq!(rates, vec![50.0, 25.0]);
        // Samples older than the window go, but one stays at its start.
        for s in 1..=10 {
            g.sample(t0 + Duration::from_secs(s));
        }
        let kept = g.samples.lock().unwrap();
        assert_eq!(kept.front().unwrap().0, t0 + Duration::from_secs(5));
    }

    #[test]
    fn the_exposition_reads_the_counters_in_prometheus_text() {
        let g = gauges(2);
        g.shards[1].stats.records_acked.store(7, Ordering::Relaxed);
        g.shards[1]
            .stats
            .udp_records_acked
            .store(3, Ordering::Relaxed);
        g.writer.records_committed.store(10, Ordering::Relaxed);
        g.api.denied(Denied::Scope);
        g.api.accept_errors.fetch_add(2, Ordering::Relaxed);
        // Three transactions: 2 ms, 30 ms and 3 s; 100, 100 and 15,000 records.
        for us in [2_000, 30_000, 3_000_000] {
            g.writer.commit_us.record(us);
        }
        for n in [100, 100, 15_000] {
            g.writer.transaction_records.record(n);
        }
        g.writer.queue_depth.store(5, Ordering::Relaxed);
        let _held = g.shards[0].budget.try_acquire(4096).unwrap();
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry(g.clone()))
            .unwrap();
        for line in [
            "# TYPE fleetgate_records_acked_total counter",
            "fleetgate_records_acked_total{shard=\"1\",transport=\"tcp\"} 7",
            "fleetgate_records_acked_total{shard=\"1\",transport=\"udp\"} 3",
            "fleetgate_writer_records_committed_total 10",
            "fleetgate_api_auth_failures_total{reason=\"scope\"} 1",
            "fleetgate_api_accept_errors_total 2",
            "# TYPE fleetgate_rows_awaiting_commit_bytes gauge",
            "fleetgate_rows_awaiting_commit_bytes{shard=\"0\"} 4096",
            "fleetgate_shard_accepting{shard=\"0\"} 0",
            "# TYPE fleetgate_writer_commit_seconds histogram",
            "fleetgate_writer_commit_seconds_count 3",
            "fleetgate_writer_commit_seconds_bucket{le=\"0.001\"} 0",
            "fleetgate_writer_commit_seconds_bucket{le=\"0.0025\"} 1",
            "fleetgate_writer_commit_seconds_bucket{le=\"0.025\"} 1",
            "fleetgate_writer_commit_seconds_bucket{le=\"0.05\"} 2",
            "fleetgate_writer_commit_seconds_bucket{le=\"2.5\"} 2",
            "fleetgate_writer_commit_seconds_bucket{le=\"5\"} 3",
            "fleetgate_writer_commit_seconds_bucket{le=\"+Inf\"} 3",
            "fleetgate_writer_transaction_records_bucket{le=\"100\"} 2",
            "fleetgate_writer_transaction_records_bucket{le=\"10000\"} 2",
            "fleetgate_writer_transaction_records_bucket{le=\"20000\"} 3",
            "fleetgate_writer_transaction_records_sum 15200.0",
            "fleetgate_writer_queue_depth 5",
        ] {
            assert!(out.lines().any(|l| l == line), "no `{line}` in:\n{out}");
        }
        assert!(
            out.contains("# TYPE fleetgate_uptime_seconds gauge"),
            "{out}"
        );
        let st = g.snapshot();
        assert_eq!(st.total.records_acked, 10);
        assert_eq!(st.shards[0].counters.bytes_awaiting_commit, 4096);
    }
}
