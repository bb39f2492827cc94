//! The writer core: everything between decoded records and committed rows.
//!
//! - [`copy`]: PURE binary COPY row encoding, called on the shards.
//! - [`classify`]: PURE, what the writer does about each database error (retry, absorb a
//!   duplicate, split the batch, or stop).
//! - [`writer`]: the writer thread (tokio current-thread runtime + tokio-postgres) that owns the
//!   database connection, group-commits batches from every shard, and answers each batch once
//!   its transaction has committed.

pub mod classify;
pub mod copy;
pub mod writer;

pub use writer::{SessionEvent, WriteOutcome, WriterBatch, WriterHandle, WriterMsg};
