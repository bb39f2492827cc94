//! Schema migrations (`migrations/V*.sql`, embedded with `refinery`) and the daily partition
//! maintenance of `telemetry`.
//!
//! Note: `embed_migrations!` reads the migration directory at compile time; after *adding* a
//! migration file, touch this file (or `cargo clean -p fleetgate`) so it is picked up.

use std::time::Duration;

use super::PgError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Session advisory lock key serializing concurrent migration runs ("fleetgat" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x666c_6565_7467_6174;

/// Apply the pending migrations on this connection; returns how many were applied.
/// Concurrent callers (other gateways on the same database) are serialized with an advisory
/// lock.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<usize, PgError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(|e| PgError::db("taking the migration lock", e))?;
    let result = embedded::migrations::runner().run_async(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result?;
    unlock.map_err(|e| PgError::db("releasing the migration lock", e))?;
    let applied = report.applied_migrations().len();
    for m in report.applied_migrations() {
        tracing::info!(version = m.version(), name = m.name(), "applied migration");
    }
    Ok(applied)
}

/// [`migrate`] for blocking callers: connects to `url` on a helper thread (retrying for up to
/// 30 s while the server comes up) and applies the pending migrations.
pub fn migrate_blocking(url: &str) -> Result<usize, PgError> {
    let url = url.to_string();
    super::run_blocking(async move {
        let mut client = super::connect_with_retry(&url, Duration::from_secs(30)).await?;
        migrate(&mut client).await
    })?
}

/// Create the daily partitions `telemetry_pYYYYMMDD` (UTC days) from yesterday to
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
) -> Result<(i32, i32), PgError> {
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
        .await
        .map_err(|e| PgError::db("maintaining the telemetry partitions", e))?;
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
