//! fleetgate: a thread-per-core gateway between Teltonika GPS trackers and PostgreSQL.
//!
//! # Layout: the module path says on which thread code runs
//!
//! - [`protocol`]: PURE. The Teltonika codec: framing, AVL codecs 8/8E/16, commands
//!   (codecs 12-15), UDP datagrams, CRC. No IO, no async, no clock.
//! - [`shard`]: one glommio executor per core, with its own SO_REUSEPORT TCP listener and UDP
//!   socket; owns the devices whose IMEI hashes to it (sessions, counters).
//! - [`conn`]: per-connection tasks that run on a shard: TCP sessions and the UDP loop.
//! - [`sink`]: the writer core. `sink::copy` is PURE (records -> binary COPY rows, called on
//!   the shards); `sink::writer` owns the database connections on its own threads and answers
//!   each batch after its commit.
//! - [`housekeeper`]: its own thread (and database connection): partition upkeep and
//!   allow-list reloads on a clock, whether or not any device sends anything.
//! - [`db`]: connecting to PostgreSQL and the shared queries; async, runs on the tokio runtime
//!   of whichever thread awaits it (writer threads, the housekeeper thread, the main thread).
//! - [`pg`]: blocking management of a managed local PostgreSQL (initdb, start, stop) and the
//!   schema migrations; used by `main` before the shards start, and by the test harness.
//! - [`server`]: the main thread: starts database, writer and shards, waits for a signal,
//!   stops them in reverse order.
//! - [`policy`]: which devices may log in (read by shards, reloaded by the housekeeper).
//! - [`config`]: serde configuration, defaults and validation.
//! - [`cli`]: operator tools on the main thread (`fleetgate decode`).

pub mod cli;
pub mod config;
pub mod conn;
pub mod db;
pub mod housekeeper;
pub mod pg;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod sink;
