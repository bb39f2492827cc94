//! Events, routes and webhooks, delivered from a durable outbox. The control thread's (a tokio
//! current-thread runtime); the writer threads insert their events with `sink::events`.
//!
//! # Events
//!
//! | topic | published by | data |
//! |---|---|---|
//! | `devices/{imei}/connected` | writer, with the session row | `imei`, `remote_addr`, `transport`, `shard` |
//! | `devices/{imei}/disconnected` | writer, with the session row | the same and `reason` |
//! | `devices/{imei}/login_refused` | writer (shards report refused logins) | the same and `reason` |
//! | `devices/{imei}/telemetry` | writer, in the COPY's transaction | `imei`, `records`, the last record's `time`, `lat`, `lon`, `alt`, `angle`, `sats`, `speed`, `io` |
//! | `commands/{id}/{completed,failed,expired}` | the command ledger, in its transaction | `imei`, `command_id`, `command`, `state`, `response`, `metadata`, `error` |
//!
//! `{imei}` is the 15 digits. Routes choose topics with MQTT filters ([`topic`]).
//!
//! # The outbox
//!
//! An event is a row of `events` (migration V5), inserted in the transaction of the fact it
//! reports, so it exists exactly if that fact committed; a trigger `NOTIFY`s
//! `fleetgate_events` in that transaction, which wakes the deliverers at its commit (they also
//! poll every second). Rows are read in `(tx, id)` order, `tx` being the inserting
//! transaction's id, and only below the oldest running transaction (`pg_snapshot_xmin`): ids
//! are taken before commit, so reading by id alone would skip an event whose transaction
//! commits after a later one's.
//!
//! **Delivery design.** Each route has a row in `event_routes` with its cursor (every
//! matching event up to it is delivered) and a lease (owner, expiry): a gateway takes the
//! lease with one `UPDATE … WHERE` the lease is free, expired or its own, renews it at a
//! quarter of its time (saving the cursor with it), and starts a request only when the
//! request's timeout ends before its lease does, so each route — and so each event — is sent
//! by one gateway at a time. The holder reads a bounded window of the route's events
//! ([`DelivererConfig::window`]) and sends them in order per device (a device's next event
//! waits for the answer to the previous one; other devices go meanwhile, up to
//! [`DelivererConfig::concurrency`] requests); a failed attempt (anything but 2xx, a
//! connection error, the timeout) is retried with exponential back-off, and the cursor only
//! moves over a delivered prefix. So: at-least-once (a crash re-sends what was delivered since
//! the last cursor save, about 100 ms of deliveries; the receiver de-duplicates by
//! event id), nothing lost across restarts (the cursor is in the database), in order per
//! device and route, and a receiver down for an hour costs the window, not memory: the
//! events wait in the table. A receiver that refuses one event forever holds its device back,
//! and its route once the window is full behind it; the lag gauge and the logs show it.
//! Events every live route has passed are deleted ([`outbox::prune`]). One cost of reading
//! below the oldest running transaction: a write transaction left open on the database holds
//! back every event published after it began, until it ends.
//!
//! # Pieces
//!
//! - [`topic`] (PURE): topics, filters, their SQL regex.
//! - [`sign`] (PURE): the `X-Fleetgate-Signature` HMAC.
//! - [`route`]: routes from the config, the [`Destination`] trait and [`Webhook`].
//! - [`outbox`]: the SQL, including [`publish`] for the control thread.
//! - [`deliverer`]: the task, [`run_deliverer`].

pub mod deliverer;
pub mod outbox;
pub mod route;
pub mod sign;
pub mod topic;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

pub use deliverer::run_deliverer;
pub use outbox::{
    publish, publish_command_event, publish_device_event, CommandEventData, Position,
};
pub use route::{
    routes_from_config, validate_routes, webhook_body, DeliveryError, Destination, OutboxEvent,
    Route, RouteError, Webhook,
};
pub use topic::{command_topic, device_topic, CommandEvent, DeviceEvent, TopicFilter};

/// Settings of [`run_deliverer`].
#[derive(Clone, Debug)]
pub struct DelivererConfig {
    pub database_url: String,
    pub routes: Vec<Route>,
    /// Names this gateway as a lease owner; distinct per gateway process on one database.
    pub gateway_id: String,
    /// The longest a request may take (the webhooks' own timeout): a request starts only if
    /// it ends this long before the lease does.
    pub request_timeout: Duration,
    /// First pause after a failed attempt; it doubles per attempt of that event …
    pub retry_min: Duration,
    /// … up to this.
    pub retry_max: Duration,
    /// Reads without a notification at least this often (a missed one costs this, at most).
    pub poll_interval: Duration,
    /// A route's lease lasts this long unless renewed (at a quarter of it). Must exceed
    /// `request_timeout` plus a second or nothing is ever sent; takeover after a crash waits
    /// for it.
    pub lease_ttl: Duration,
    /// Events of one route held in memory at most (read, not yet behind the cursor).
    pub window: usize,
    /// Requests in flight per route at most.
    pub concurrency: usize,
    /// How often delivered events are deleted.
    pub prune_every: Duration,
    /// The counters this deliverer updates.
    pub stats: Arc<EventStats>,
}

impl DelivererConfig {
    /// Defaults: 10 s requests, retries from 100 ms to 60 s, a 1 s poll, 30 s leases, a
    /// window of 1024 events and 32 requests per route, pruning every 10 s.
    pub fn new(database_url: String, routes: Vec<Route>, gateway_id: String) -> DelivererConfig {
        DelivererConfig {
            database_url,
            routes,
            gateway_id,
            request_timeout: Duration::from_secs(10),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
            window: 1024,
            concurrency: 32,
            prune_every: Duration::from_secs(10),
            stats: Arc::new(EventStats::default()),
        }
    }

    /// From `serve`'s configuration: its routes, `webhook_timeout_s`, `webhook_retry_max_s`
    /// (leases last three request timeouts, at least 30 s).
    ///
    /// # Errors
    /// A bad route (as [`validate_routes`]; `Config::validate` has checked them already).
    pub fn from_config(
        cfg: &crate::config::Config,
        database_url: String,
        gateway_id: String,
    ) -> Result<DelivererConfig, RouteError> {
        let timeout = cfg.webhook_timeout();
        let routes = routes_from_config(&cfg.routes, timeout)?;
        let mut d = DelivererConfig::new(database_url, routes, gateway_id);
        d.request_timeout = timeout;
        d.retry_max = cfg.webhook_retry_max().max(d.retry_min);
        d.lease_ttl = (timeout * 3).max(Duration::from_secs(30));
        Ok(d)
    }
}

/// A gateway id for leases: host name and process id (distinct per process; a restarted
/// gateway is a new owner, which takes over its old leases once they expire, or at once if
/// they were released at a clean stop).
pub fn default_gateway_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "fleetgate".into());
    format!("{host}:{}", std::process::id())
}

/// Counters and gauges of event delivery, readable from any thread (the metrics endpoint).
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events published by control-thread callers of [`publish`] and friends. They count
    /// them after their transaction commits (`fetch_add`); the writer's events are counted in
    /// `WriterStats::events_published`.
    pub published: AtomicU64,
    /// Deliveries answered 2xx.
    pub delivered: AtomicU64,
    /// Attempts that were a retry of an event that had failed before.
    pub retried: AtomicU64,
    /// Attempts that failed (non-2xx, connection error, timeout).
    pub failed_attempts: AtomicU64,
    /// Gauge: milliseconds the oldest undelivered event of a route held here has waited
    /// since it was published (the largest over those routes); 0 when caught up.
    pub lag_ms: AtomicU64,
    /// Gauge: events held in memory (the routes' windows).
    pub window_events: AtomicU64,
    /// Gauge: routes whose lease this gateway holds.
    pub routes_leased: AtomicU64,
    /// Delivered events deleted from the outbox.
    pub pruned: AtomicU64,
}
