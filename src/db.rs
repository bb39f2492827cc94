//! Connecting to PostgreSQL, and the queries more than one thread needs (the allow-list, the
//! partition upkeep). The functions are
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

/// The devices whose telemetry is published as events under `telemetry_events = "opted_in"`
/// (column `devices.telemetry_events`, migration V5).
///
/// # Errors
/// The query fails (connection lost, column missing: migrations not applied, privilege).
pub async fn load_telemetry_opt_in(c: &Client) -> Result<HashSet<u64>, tokio_postgres::Error> {
    let rows = c
        .query("SELECT imei FROM devices WHERE telemetry_events", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
}

/// Creates the daily partitions `telemetry_pYYYYMMDD` (UTC days) from yesterday to
/// today + `ahead_days`, and drop the daily partitions whose whole day is older than
/// now - `retention_days` (0: keep forever; the default partition is never dropped). Rows of a
/// new partition's day that sat in `telemetry_default` are moved into it. With a retention, the
/// rows of `telemetry_default` and of `device_sessions` whose whole day is older go too (no
/// partition drop would ever remove them); how many is logged. Returns `(created, dropped)`
/// partitions. Runs SQL function `fleetgate_maintain_partitions` (migrations V1, V3).
pub async fn maintain_partitions(
    client: &tokio_postgres::Client,
    ahead_days: i32,
    retention_days: i32,
) -> Result<(i32, i32), tokio_postgres::Error> {
    // The function leaves the pruned row counts in transaction-local settings; this statement
    // reads them in its own transaction, after the function has run (a PL/pgSQL set-returning
    // function runs to completion before its first row is returned).
    let row = client
        .query_one(
            "SELECT created, dropped,
                    current_setting('fleetgate.pruned_telemetry_default', true),
                    current_setting('fleetgate.pruned_device_sessions', true)
               FROM fleetgate_maintain_partitions($1, $2)",
            &[&ahead_days, &retention_days],
        )
        .await?;
    let (created, dropped): (i32, i32) = (row.get(0), row.get(1));
    if created > 0 || dropped > 0 {
        tracing::info!(created, dropped, "telemetry partitions maintained");
    }
    // Unset (NULL, or '' once the setting exists in the session) when nothing was pruned.
    let pruned = |i: usize| -> i64 {
        row.get::<_, Option<String>>(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (telemetry_default, device_sessions) = (pruned(2), pruned(3));
    if telemetry_default > 0 || device_sessions > 0 {
        tracing::info!(
            retention_days,
            telemetry_default,
            device_sessions,
            "Retention deleted old rows."
        );
    }
    Ok((created, dropped))
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

/// A small pool of connections for the control thread, whose queries are many and short and
/// some of which are transactions (a transaction needs a connection of its own). Connections
/// are opened on demand and again after they were lost.
///
/// # Errors
/// `url` is not a valid connection string.
pub fn pool(url: &str, size: usize) -> Result<deadpool_postgres::Pool, String> {
    let cfg: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(mgr)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| e.to_string())
}
