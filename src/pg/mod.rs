//! Managed PostgreSQL and migrations (blocking; runs on the main thread before shards start).
//!
//! - [`managed`]: find the server binaries, `initdb` a cluster in the gateway's data dir, start
//!   it on a unix socket only (no TCP), adopt a server left running by an earlier run, stop it.
//! - [`migrate`]: the embedded `refinery` schema migrations (`migrations/V*.sql`) and the daily
//!   partition maintenance of `telemetry`.

pub mod managed;
pub mod migrate;

use std::path::PathBuf;

pub use managed::{find_bin_dir, find_bin_dir_from, ManagedPostgres, PgOptions};
pub use migrate::{migrate, migrate_blocking};

/// Everything that can go wrong while managing the local PostgreSQL or its schema.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {detail}. \
         Install them (Debian/Ubuntu: `apt-get install postgresql`), or set FLEETGATE_PG_BIN \
         to the directory holding them, or use an external database with `--database-url`"
    )]
    BinariesNotFound { detail: String },

    /// Running as root, but there is no `postgres` user to run the server as.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
         system user to run it as: create one (`useradd --system postgres`), run fleetgate as \
         an unprivileged user, or use an external database with `--database-url`"
    )]
    NoPostgresUser,

    /// The server user cannot reach the data dir.
    #[error(
        "the PostgreSQL server runs as user `{user}`, which cannot enter {dir} (mode {mode:o}); \
         run `chmod o+x {dir}` or choose a data dir under a world-traversable directory"
    )]
    NotTraversable {
        user: String,
        dir: PathBuf,
        mode: u32,
    },

    /// The unix socket path would be longer than the kernel allows.
    #[error(
        "the data dir {dir} is too long for a unix socket path ({len} bytes with the socket \
         name, at most {max}): choose a shorter data dir"
    )]
    SocketPathTooLong {
        dir: PathBuf,
        len: usize,
        max: usize,
    },

    /// A file system or process-spawn error.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// `initdb` failed.
    #[error("initdb of {dir} failed ({status}):\n{output}")]
    InitdbFailed {
        dir: PathBuf,
        status: String,
        output: String,
    },

    /// The server did not start (or did not become ready).
    #[error(
        "PostgreSQL in {dir} did not start: {reason}\n--- last lines of {log} ---\n{log_tail}"
    )]
    StartFailed {
        dir: PathBuf,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },

    /// `pg_ctl stop` failed.
    #[error("stopping PostgreSQL in {dir} failed ({status}):\n{output}")]
    StopFailed {
        dir: PathBuf,
        status: String,
        output: String,
    },

    /// A database error, with what we were doing.
    #[error("{what}: {source}")]
    Db {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A schema migration failed.
    #[error("schema migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

impl PgError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> PgError {
        PgError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn db(what: impl Into<String>, source: tokio_postgres::Error) -> PgError {
        PgError::Db {
            what: what.into(),
            source,
        }
    }
}

/// Run `fut` to completion on a helper thread with its own current-thread tokio runtime, so
/// blocking callers work both outside and inside an async context.
pub(crate) fn run_blocking<F, T>(fut: F) -> Result<T, PgError>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name("fleetgate-pg".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(fut))
        })
        .map_err(|e| PgError::io("spawning the database helper thread", e))?
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        .map_err(|e| PgError::io("building the database helper runtime", e))
}

/// [`crate::db::connect`], retrying until `patience` runs out (a server that is starting).
pub(crate) async fn connect_with_retry(
    url: &str,
    patience: std::time::Duration,
) -> Result<tokio_postgres::Client, PgError> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match crate::db::connect(url).await {
            Ok(client) => return Ok(client),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(PgError::db(format!("connecting to {url}"), e));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}
