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
