//! fleetgate: a thread-per-core gateway between Teltonika GPS trackers and PostgreSQL.
//!
//! # Layout: the module path says on which thread code runs
//!
//! - [`protocol`]: PURE. The Teltonika codec: framing, AVL codecs 8/8E/16, commands
//!   (codecs 12-15), UDP datagrams, CRC. No IO, no async, no clock.
//! - [`session`]: PURE. A device's TCP session as a sans-IO state machine: handed bytes,
//!   commit outcomes and the time, it says what to submit, what to write and when to close.
//! - [`shard`]: state and messages of a shard (one glommio executor per core): its devices,
//!   connections, read buffers, byte budget, and `shard::copy` (PURE: records -> binary COPY
//!   rows, encoded on the shard that decoded them). A leaf: runs on a shard.
//! - [`conn`]: the IO drivers that run on a shard: TCP sessions around [`session`], the UDP
//!   loop.
//! - [`executor`]: the body of a shard thread: binds its SO_REUSEPORT sockets, accepts, serves
//!   its inbox, stops in order.
//! - [`sink`]: the writer core: `sink::writer` owns the database connections on its own
//!   threads and answers each batch after its commit; `sink::classify` (PURE) says what to do
//!   about each database error; `sink::events` puts the writer's events (sessions, telemetry)
//!   into the outbox in the same transactions.
//! - [`control`]: the control thread (tokio): `control::api` (the HTTP API, hyper),
//!   `control::commands` (command ledger and dispatch), `control::events` (routes, signing,
//!   the outbox, the webhook deliverer), `control::metrics` (stats and the Prometheus
//!   exposition, read from the other threads' atomics); talks to shards by message.
//! - [`housekeeper`]: its own thread (and database connection): partition upkeep and
//!   allow-list reloads on a clock, whether or not any device sends anything.
//! - [`db`]: connecting to PostgreSQL and the shared queries (allow-list, partition upkeep);
//!   async, runs on the tokio runtime
//!   of whichever thread awaits it (writer threads, the housekeeper thread, the main thread).
//! - [`pg`]: blocking management of a managed local PostgreSQL (initdb, start, stop) and the
//!   schema migrations; used by `main` before the shards start, and by the test harness.
//! - [`server`]: the main thread: starts database, writer and shards, waits for a signal,
//!   stops them in reverse order.
//! - [`policy`]: which devices may log in, and whose telemetry becomes events (read by
//!   shards, reloaded by the housekeeper).
//! - [`config`]: serde configuration, defaults, `FLEETGATE_<KEY>` overrides and validation.
//! - [`distribution`]: PURE. Percentiles and histogram buckets of values one thread records
//!   and another reads (the writer's commit times and transaction sizes).
//! - [`limits`]: the descriptor limit `serve` checks (and raises) at start, main thread.
//! - [`log_every`]: PURE. One log line per period, with the count held back, for conditions
//!   that can repeat at traffic speed (any thread).
//! - [`cli`]: operator tools on the main thread (`fleetgate decode`).
//! - [`supervise`]: noticing threads that end (any thread). [`time`]: PURE clock text.

pub mod cli;
pub mod config;
pub mod conn;
pub mod control;
pub mod db;
pub mod distribution;
pub mod executor;
pub mod housekeeper;
pub mod limits;
pub mod log_every;
pub mod pg;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shard;
pub mod sink;
pub mod supervise;
pub mod time;
