//! The durability check against PostgreSQL: every record acked is stored exactly once. Before
//! the run it finds where earlier runs' timestamps end (so this run's rows are its own);
//! after it, it counts this run's rows and compares them with the records acked.

use anyhow::Context;

/// Runs `query` with `params` on a fresh connection and returns its one row; closes the
/// connection cleanly (so the server logs no lost client).
async fn query_one(
    url: &str,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> anyhow::Result<tokio_postgres::Row> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    let conn = tokio::spawn(conn);
    let row = client.query_one(query, params).await;
    drop(client);
    let _ = conn.await;
    Ok(row?)
}

/// The newest record timestamp (ms) stored for IMEIs `lo..hi`, if any: one index probe per
/// device (a backward scan of each partition's `(imei, ts, rec_hash)` index).
pub async fn prior_max_ts(url: &str, lo: u64, hi: u64) -> anyhow::Result<Option<u64>> {
    let row = query_one(
        url,
        "SELECT (extract(epoch FROM max(x.m)) * 1000)::bigint
           FROM generate_series($1::bigint, $2::bigint - 1) AS d(imei),
                LATERAL (SELECT max(t.ts) AS m FROM telemetry t
                          WHERE t.imei = d.imei AND t.ts < timestamptz '9999-01-01') x",
        &[&(lo as i64), &(hi as i64)],
    )
    .await?;
    Ok(row.get::<_, Option<i64>>(0).map(|v| v.max(0) as u64))
}

/// Rows of `telemetry` for IMEIs `lo..hi` stamped `ts_lo..=ts_hi` (ms since the Unix epoch):
/// one `(imei, ts)` index range scan per device, so the cost follows the run's rows, not the
/// table's.
pub async fn count_stored(
    url: &str,
    lo: u64,
    hi: u64,
    ts_lo: u64,
    ts_hi: u64,
) -> anyhow::Result<u64> {
    let row = query_one(
        url,
        "SELECT coalesce(sum(x.n), 0)::bigint
           FROM generate_series($1::bigint, $2::bigint - 1) AS d(imei),
                LATERAL (SELECT count(*) AS n FROM telemetry t
                          WHERE t.imei = d.imei
                            AND t.ts >= timestamptz 'epoch' + $3::bigint * interval '1 millisecond'
                            AND t.ts <= timestamptz 'epoch' + $4::bigint * interval '1 millisecond') x",
        &[&(lo as i64), &(hi as i64), &(ts_lo as i64), &(ts_hi as i64)],
    )
    .await?;
    Ok(row.get::<_, i64>(0) as u64)
}
