//! The outbox's SQL (tables of migration V5): publishing events in the caller's transaction,
//! and what the deliverer asks of the database (leases, cursors, reading, pruning). Async,
//! on the runtime of whichever thread awaits it (the control thread).

use serde_json::{json, Value};
use tokio_postgres::{Client, GenericClient};

use super::route::OutboxEvent;
use super::topic::{command_topic, device_topic, CommandEvent, DeviceEvent};

/// A position in the delivery order: `(tx, id)` of an event (see the module doc).
pub type Position = (i64, i64);

// ===== publishing =====

/// Inserts one event into the outbox, in `db`'s transaction (a [`tokio_postgres::Transaction`]
/// or, for an implicit transaction of its own, a [`Client`]): it exists, and will be
/// delivered, exactly if that transaction commits. The commit wakes the deliverers
/// (`NOTIFY fleetgate_events`, by a trigger on the table). Returns the event id.
///
/// `imei` orders delivery: the events of one device reach each route in the order they were
/// published. `data` is sent as the body's `data` object.
///
/// # Errors
/// The insert fails (connection lost, the transaction already failed, table missing).
pub async fn publish<C: GenericClient + Sync>(
    db: &C,
    topic: &str,
    imei: u64,
    data: &Value,
) -> Result<i64, tokio_postgres::Error> {
    let data = data.to_string();
    let row = db
        .query_one(
            "INSERT INTO events (topic, imei, data) VALUES ($1, $2, $3::text::json) RETURNING id",
            &[&topic, &(imei as i64), &data],
        )
        .await?;
    Ok(row.get(0))
}

/// Publishes `devices/{imei}/{event}` with `data` (which should carry `"imei"`, the 15
/// digits as a string, as every device event does).
///
/// # Errors
/// As [`publish`].
pub async fn publish_device_event<C: GenericClient + Sync>(
    db: &C,
    imei: u64,
    event: DeviceEvent,
    data: &Value,
) -> Result<i64, tokio_postgres::Error> {
    publish(db, &device_topic(imei, event), imei, data).await
}

/// What a command event says: the `data` of `commands/{id}/{completed,failed,expired}`.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandEventData<'a> {
    pub imei: u64,
    pub command_id: i64,
    /// The command text as sent to the device.
    pub command: &'a str,
    /// The ledger's state name after the change.
    pub state: &'a str,
    /// The device's answer, if it gave one.
    pub response: Option<&'a str>,
    /// The caller's metadata, as given when the command was created.
    pub metadata: Option<&'a Value>,
    /// Why it failed or expired, if it did.
    pub error: Option<&'a str>,
}

impl CommandEventData<'_> {
    /// `{"imei","command_id","command","state","response","metadata","error"}`, nulls where
    /// absent, the IMEI as its 15 digits.
    pub fn to_json(&self) -> Value {
        json!({
            "imei": format!("{:015}", self.imei),
            "command_id": self.command_id,
            "command": self.command,
            "state": self.state,
            "response": self.response,
            "metadata": self.metadata,
            "error": self.error,
        })
    }
}

/// Publishes `commands/{id}/{event}`; call it in the transaction of the state change.
///
/// # Errors
/// As [`publish`].
pub async fn publish_command_event<C: GenericClient + Sync>(
    db: &C,
    event: CommandEvent,
    data: &CommandEventData<'_>,
) -> Result<i64, tokio_postgres::Error> {
    publish(
        db,
        &command_topic(data.command_id, event),
        data.imei,
        &data.to_json(),
    )
    .await
}

// ===== the deliverer's queries =====

/// Makes sure a state row exists for each route, and notes that a gateway has them
/// configured (`seen_at`), which keeps their events from being pruned.
pub(crate) async fn register_routes(
    c: &Client,
    names: &[String],
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO event_routes (route) SELECT unnest($1::text[])
         ON CONFLICT (route) DO UPDATE SET seen_at = now()",
        &[&names],
    )
    .await?;
    Ok(())
}

/// Takes the lease of `route` for `owner` (free, expired, or already ours) for `ttl_ms`;
/// returns the route's cursor if taken.
pub(crate) async fn take_lease(
    c: &Client,
    route: &str,
    owner: &str,
    ttl_ms: i64,
) -> Result<Option<Position>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "UPDATE event_routes
                SET owner = $2, lease_until = now() + $3::int8 * interval '1 millisecond', seen_at = now()
              WHERE route = $1
                AND (owner IS NULL OR owner = $2 OR lease_until IS NULL OR lease_until < now())
          RETURNING cursor_tx, cursor_id",
            &[&route, &owner, &ttl_ms],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Extends our lease of `route` and saves its cursor; `false` if the lease is no longer
/// ours (expired and taken, or released).
pub(crate) async fn renew_lease(
    c: &Client,
    route: &str,
    owner: &str,
    ttl_ms: i64,
    cursor: Position,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE event_routes
                SET lease_until = now() + $3::int8 * interval '1 millisecond', seen_at = now(),
                    cursor_tx = $4, cursor_id = $5
              WHERE route = $1 AND owner = $2 AND lease_until > now()",
            &[&route, &owner, &ttl_ms, &cursor.0, &cursor.1],
        )
        .await?;
    Ok(n == 1)
}

/// Saves the cursor and gives the lease up, so another gateway may take it at once.
pub(crate) async fn release_lease(
    c: &Client,
    route: &str,
    owner: &str,
    cursor: Position,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE event_routes SET owner = NULL, lease_until = NULL, cursor_tx = $3, cursor_id = $4
              WHERE route = $1 AND owner = $2 AND lease_until > now()",
            &[&route, &owner, &cursor.0, &cursor.1],
        )
        .await?;
    Ok(n == 1)
}

/// What one read of the outbox found.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    /// Events after the cursor matching the route's regex, in delivery order.
    pub events: Vec<OutboxEvent>,
    /// Every transaction with a smaller id has ended: no event below it can still appear.
    pub horizon: i64,
    /// Some events are committed but not yet readable (a transaction that started earlier
    /// is still running): read again soon rather than wait for the next notification.
    pub beyond_horizon: bool,
}

/// Up to `limit` events after `after` whose topic matches `regex`, among those whose
/// inserting transaction is older than every running one (all in one snapshot).
pub(crate) async fn fetch(
    c: &Client,
    after: Position,
    regex: &str,
    limit: i64,
) -> Result<Fetched, tokio_postgres::Error> {
    let rows = c
        .query(
            "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin)
             SELECT h.xmin, (SELECT max(tx) FROM events) >= h.xmin,
                    e.tx, e.id, e.topic, e.imei, (extract(epoch FROM e.at) * 1000)::int8, e.data::text
               FROM h LEFT JOIN LATERAL (
                    SELECT * FROM events
                     WHERE (tx, id) > ($1, $2) AND tx < h.xmin AND topic ~ $3
                     ORDER BY tx, id LIMIT $4) e ON true",
            &[&after.0, &after.1, &regex, &limit],
        )
        .await?;
    let mut out = Fetched::default();
    for r in rows {
        out.horizon = r.get(0);
        out.beyond_horizon = r.get::<_, Option<bool>>(1).unwrap_or(false);
        let Some(tx) = r.get::<_, Option<i64>>(2) else {
            continue;
        };
        out.events.push(OutboxEvent {
            tx,
            id: r.get(3),
            topic: r.get(4),
            imei: r.get::<_, i64>(5) as u64,
            at_ms: r.get::<_, i64>(6).max(0) as u64,
            data: r.get(7),
        });
    }
    Ok(out)
}

/// Rows deleted per statement when pruning, so that no statement holds many locks or runs
/// long.
const PRUNE_CHUNK: i64 = 10_000;

/// Deletes the events every live route has delivered (routes no gateway has had configured
/// for a day do not count; with no live route, every event that can no longer change is
/// deleted: nobody is there to take it). Returns how many went.
pub(crate) async fn prune(c: &Client) -> Result<u64, tokio_postgres::Error> {
    let floor = c
        .query_one(
            "SELECT coalesce(
                      (SELECT ARRAY[cursor_tx, cursor_id] FROM event_routes
                        WHERE seen_at > now() - interval '1 day'
                        ORDER BY cursor_tx, cursor_id LIMIT 1),
                      ARRAY[pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1,
                            9223372036854775807])",
            &[],
        )
        .await?;
    let floor: Vec<i64> = floor.get(0);
    let mut total = 0;
    loop {
        let n = c
            .execute(
                "DELETE FROM events WHERE (tx, id) IN (
                   SELECT tx, id FROM events WHERE (tx, id) <= ($1, $2)
                    ORDER BY tx, id LIMIT $3)",
                &[&floor[0], &floor[1], &PRUNE_CHUNK],
            )
            .await?;
        total += n;
        if n < PRUNE_CHUNK as u64 {
            return Ok(total);
        }
    }
}
