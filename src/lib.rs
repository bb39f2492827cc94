//! fleetgate: a thread-per-core gateway between Teltonika GPS trackers and PostgreSQL.
//!
//! # Layout: the module path says on which thread code runs
//!
//! - [`protocol`]: PURE. The Teltonika codec: framing, AVL codecs 8/8E/16, commands
//!   (codecs 12-15), UDP datagrams, CRC. No IO, no async, no clock.
//! - [`pg`]: blocking process management of a managed local PostgreSQL (initdb, start, stop)
//!   and schema migrations; called from `main` before the shards start, and by the test harness.
//! - [`sink`]: the writer core. `sink::copy` is PURE (record -> binary COPY row bytes, called on
//!   the shards); `sink::writer` owns the database connection on its own thread.
//! - [`shard`]: one glommio executor per core; owns its devices (sessions, stats, pending commands).
//! - [`conn`]: per-connection tasks that run on a shard: TCP sessions and the UDP datagram loop.
//! - [`config`]: serde configuration, defaults and validation.

pub mod config;
pub mod pg;
pub mod protocol;
