//! Command-line tools that run on the main thread: `decode` (and the clap definitions of every
//! subcommand live in `main.rs`).

pub mod decode;
