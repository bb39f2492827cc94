//! Connecting to PostgreSQL, and the queries more than one thread needs. The functions are
//! async and run on the tokio runtime of the thread that awaits them: a writer thread, the
//! housekeeper thread, or the main thread while `serve` starts.
//!
//! One module so that every connection of the gateway is opened the same way (no TLS: the
//! managed server listens on a unix socket only, and an external database is reached the way
//! its URL says), and so that the writer's session settings live next to the connect call
//! they belong to.

use std::collections::HashSet;

use tokio_postgres::{Client, NoTls};

/// Connects to `url` and drives the connection on the current tokio runtime (it ends when
/// the returned client is dropped, or the server goes away: `Client::is_closed` then says so).
///
/// # Errors
/// The server cannot be reached or refuses the connection (the error's SQLSTATE says why).
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "Database connection ended.");
        }
    });
    Ok(client)
}

/// A connection for a writer thread: [`connect`], then the session settings the writer relies
/// on. `synchronous_commit = on` whatever the server's default, because an ack promises the
/// records are durable; the session's own staging table receives a batch that must be
/// replayed with `ON CONFLICT DO NOTHING` (a resend), emptied at each commit.
///
/// # Errors
/// As [`connect`]; also when `telemetry` does not exist (migrations not applied).
pub async fn connect_writer(url: &str) -> Result<Client, tokio_postgres::Error> {
    let client = connect(url).await?;
    client
        .batch_execute(
            "SET synchronous_commit = on;
             CREATE TEMP TABLE IF NOT EXISTS telemetry_stage (LIKE telemetry) ON COMMIT DELETE ROWS;",
        )
        .await?;
    Ok(client)
}

/// The enabled IMEIs of the `devices` table: who may log in under the `allow_list` policy.
///
/// # Errors
/// The query fails (connection lost, table missing, privilege).
pub async fn load_allow_list(c: &Client) -> Result<HashSet<u64>, tokio_postgres::Error> {
    let rows = c
        .query("SELECT imei FROM devices WHERE enabled", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
}

/// An error as one log-friendly line: `tokio_postgres::Error`'s `Display` says only
/// "db error" for everything the server refused, the server's words are in its source.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(" (");
            s.push_str(detail);
            s.push(')');
        }
        return s;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}
