//! The writer core: everything between decoded records and committed rows.
//!
//! - [`classify`]: PURE, what the writer does about each database error (retry, absorb a
//!   duplicate, split the batch, or stop).
//! - [`writer`]: the writer threads (tokio current-thread runtime + tokio-postgres) that own
//!   their database connections, group-commit batches from every shard, and answer each batch
//!   once its transaction has committed. Shards talk to them through a [`WriterTx`].

//! - [`events`]: the writer's outbox rows (session and telemetry events), and
//!   [`TelemetryEvent`], the frame summary a shard builds (PURE) for a telemetry event.

pub mod classify;
pub mod events;
pub mod writer;

pub use events::{TelemetryEvent, TelemetryIo};
pub use writer::{SessionEvent, WriteOutcome, WriterBatch, WriterHandle, WriterTx};
