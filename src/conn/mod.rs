//! Per-connection tasks on a shard: [`tcp`] device sessions and the [`udp`] datagram loop.
//! Thin IO loops: fill a buffer, ask the codec, hand rows to the writer, answer after commit.

pub mod tcp;
pub mod udp;
