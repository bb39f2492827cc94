//! The endpoints. Run on the control thread; they reach the shards by message (every inbox,
//! or the device's owner) and the database through the control thread's pool and ledger.
//! Each is documented for the OpenAPI document by its `#[utoipa::path]`.

use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use hyper::StatusCode;

use super::types::{
    page_size, parse_imei, prefix_range, Accepted, CancelConflict, CommandPage,
    DeviceCommandsQuery, DeviceNotConnected, DevicePage, DevicesQuery, ErrorBody, Health,
    LastSession, PostCommand, Readiness,
};
use super::{error, json, Api, Reply};
use crate::control::commands::{Cancelled, LedgerError};
use crate::control::metrics::Stats;
use crate::protocol::Imei;
use crate::shard::{shard_for, ShardMsg};

/// How long a shard may take to answer a query before the request fails (503): a shard
/// answers from its tables at once, unless it is stopping or wedged.
const SHARD_ANSWER: Duration = Duration::from_secs(5);
/// How long a database query of the API may take before the request fails (503).
const DB_ANSWER: Duration = Duration::from_secs(5);
/// How long `/readyz` waits for the database.
const READY_DB: Duration = Duration::from_secs(2);

fn db_unavailable(e: &LedgerError) -> Reply {
    tracing::warn!(error = %e, "API request failed: database error.");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("database unavailable ({})", e.what),
    )
}

fn db_timeout(what: &str) -> Reply {
    tracing::warn!(
        what,
        "API request failed: the database did not answer in time."
    );
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("database unavailable ({what}: no answer within {DB_ANSWER:?})"),
    )
}

/// Runs a ledger call with the API's deadline; a database error or timeout is the 503 reply.
async fn ledger<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, LedgerError>>,
) -> Result<T, Reply> {
    match tokio::time::timeout(DB_ANSWER, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(db_unavailable(&e)),
        Err(_) => Err(db_timeout(what)),
    }
}

// ===== health =====

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Up", body = Health)))]
pub async fn healthz() -> Reply {
    json(
        StatusCode::OK,
        &Health {
            status: "ok".into(),
        },
    )
}

/// Ready for devices: the database answers and every shard accepts.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready", body = Readiness),
              (status = 503, description = "A check failed; which one says", body = Readiness)))]
pub async fn readyz(api: &Api) -> Reply {
    let db = async {
        let client = api.pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| crate::db::describe(&e))?;
        Ok::<_, String>(())
    };
    let database = match tokio::time::timeout(READY_DB, db).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => format!("unreachable: {e}"),
        Err(_) => format!("no answer within {READY_DB:?}"),
    };
    let down: Vec<String> = api
        .gauges
        .shards
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.stats.accepting.load(std::sync::atomic::Ordering::Relaxed))
        .map(|(id, _)| id.to_string())
        .collect();
    let shards = if down.is_empty() {
        "ok".to_string()
    } else {
        format!("not accepting: shard {}", down.join(", "))
    };
    let failed: Vec<String> = [("database", &database), ("shards", &shards)]
        .into_iter()
        .filter(|(_, v)| *v != "ok")
        .map(|(k, _)| k.to_string())
        .collect();
    let status = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if failed.is_empty() {
            "ready"
        } else {
            "not ready"
        }
        .into(),
        failed,
        database,
        shards,
    };
    json(status, &body)
}

/// Prometheus text exposition of the gateway's counters.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String,
               content_type = "text/plain; version=0.0.4")))]
pub async fn metrics(api: &Api) -> Reply {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &api.registry) {
        tracing::error!(error = %e, "Encoding the metrics failed.");
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        );
    }
    Reply::new(StatusCode::OK)
        .content_type(prometheus_client::encoding::prometheus_text::CONTENT_TYPE)
        .body(Bytes::from(out))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "api",
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi(api: &Api) -> Reply {
    Reply::new(StatusCode::OK)
        .content_type("application/json")
        .body(api.openapi.clone())
}

// ===== devices =====

/// Connected devices in IMEI order, a page at a time.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DevicesQuery),
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, description = "A page", body = DevicePage),
              (status = 400, description = "Bad query", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 503, description = "A shard did not answer", body = ErrorBody)))]
pub async fn list_devices(api: &Api, q: DevicesQuery) -> Reply {
    let limit = match page_size(q.limit) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let range = match q.prefix.as_deref().map(prefix_range).transpose() {
        Ok(r) => r.unwrap_or((Imei::new(0).expect("0"), Imei::new(Imei::MAX).expect("max"))),
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let after = match q.cursor.as_deref().map(parse_imei).transpose() {
        Ok(a) => a,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "cursor must be the 15-digit IMEI of a previous page's next_cursor",
            )
        }
    };
    // One more than the page from each shard: if the shards have more than `limit` together,
    // there is a next page.
    let mut waiting = Vec::with_capacity(api.inboxes.len());
    for (shard, inbox) in api.inboxes.iter().enumerate() {
        let (reply, rx) = oneshot::channel();
        let msg = ShardMsg::ListDevices {
            range,
            after,
            limit: limit + 1,
            reply,
        };
        if inbox.unbounded_send(msg).is_err() {
            return shard_gone(shard);
        }
        waiting.push(rx);
    }
    let answers = match tokio::time::timeout(SHARD_ANSWER, futures::future::join_all(waiting)).await
    {
        Ok(a) => a,
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("a shard did not answer within {SHARD_ANSWER:?}"),
            )
        }
    };
    let mut devices = Vec::new();
    for (shard, a) in answers.into_iter().enumerate() {
        match a {
            Ok(page) => devices.extend(page),
            Err(_) => return shard_gone(shard),
        }
    }
    // 15 digits each: text order is IMEI order.
    devices.sort_unstable_by(|a, b| a.imei.cmp(&b.imei));
    let more = devices.len() > limit;
    devices.truncate(limit);
    let next_cursor = more
        .then(|| devices.last().map(|d| d.imei.clone()))
        .flatten();
    json(
        StatusCode::OK,
        &DevicePage {
            devices,
            next_cursor,
        },
    )
}

fn shard_gone(shard: usize) -> Reply {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("shard {shard} is not answering (stopping?)"),
    )
}

/// A connected device's live session; for one that is not connected, 404 with its last
/// recorded session.
#[utoipa::path(get, path = "/api/v1/devices/{imei}", tag = "devices",
    params(("imei" = String, Path, description = "15 digits")),
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, description = "Connected", body = super::types::mirror::DeviceInfo),
              (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, description = "Not connected", body = DeviceNotConnected),
              (status = 503, body = ErrorBody)))]
pub async fn get_device(api: &Api, imei: &str) -> Reply {
    let imei = match parse_imei(imei) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let owner = shard_for(imei, api.inboxes.len());
    let (reply, rx) = oneshot::channel();
    if api.inboxes[owner]
        .unbounded_send(ShardMsg::GetDevice { imei, reply })
        .is_err()
    {
        return shard_gone(owner);
    }
    match tokio::time::timeout(SHARD_ANSWER, rx).await {
        Ok(Ok(Some(info))) => json(StatusCode::OK, &info),
        Ok(Ok(None)) => match tokio::time::timeout(DB_ANSWER, last_session(api, imei)).await {
            Ok(Ok(last_session)) => json(
                StatusCode::NOT_FOUND,
                &DeviceNotConnected {
                    error: format!("device {imei} is not connected to this gateway"),
                    last_session,
                },
            ),
            Ok(Err(e)) => db_unavailable(&e),
            Err(_) => db_timeout("reading the last session"),
        },
        Ok(Err(_)) => shard_gone(owner),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("shard {owner} did not answer within {SHARD_ANSWER:?}"),
        ),
    }
}

/// The device's last connect or disconnect row.
async fn last_session(api: &Api, imei: Imei) -> Result<Option<LastSession>, LedgerError> {
    let what = "reading the last session";
    let client = api.pool.get().await.map_err(|e| LedgerError {
        what,
        detail: e.to_string(),
    })?;
    let row = client
        .query_opt(
            "SELECT at, event, reason, peer, shard, transport FROM device_sessions
              WHERE imei = $1 ORDER BY at DESC, id DESC LIMIT 1",
            &[&(imei.as_u64() as i64)],
        )
        .await
        .map_err(|e| LedgerError {
            what,
            detail: crate::db::describe(&e),
        })?;
    Ok(row.map(|r| {
        let at: std::time::SystemTime = r.get("at");
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        LastSession {
            at: crate::time::utc_text(ms),
            event: r.get("event"),
            reason: r.get("reason"),
            peer: r.get("peer"),
            shard: r.get("shard"),
            transport: r.get("transport"),
        }
    }))
}

/// A device's commands, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{imei}/commands", tag = "commands",
    params(("imei" = String, Path, description = "15 digits"), DeviceCommandsQuery),
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, description = "A page", body = CommandPage),
              (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn device_commands(api: &Api, imei: &str, q: DeviceCommandsQuery) -> Reply {
    let imei = match parse_imei(imei) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let limit = match page_size(q.limit) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let commands = match ledger(
        "listing commands",
        api.cmds.for_device(imei, limit as i64, q.before),
    )
    .await
    {
        Ok(c) => c,
        Err(r) => return r,
    };
    let next_before = (commands.len() == limit)
        .then(|| commands.last().map(|c| c.id))
        .flatten();
    json(
        StatusCode::OK,
        &CommandPage {
            commands,
            next_before,
        },
    )
}

// ===== stats =====

/// Per shard and in total: connections, logins, records/s, frames, bad input, bytes awaiting
/// commit; the writer; memory and uptime.
#[utoipa::path(get, path = "/api/v1/stats", tag = "stats",
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, body = Stats),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn stats(api: &Api) -> Reply {
    json(StatusCode::OK, &api.gauges.snapshot())
}

// ===== commands =====

/// Queues a command for a device (sent when it is connected to a gateway of this database).
#[utoipa::path(post, path = "/api/v1/commands", tag = "commands",
    request_body = PostCommand,
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 202, description = "Queued", body = Accepted),
              (status = 400, description = "Bad JSON or a bad field", body = ErrorBody),
              (status = 401, body = ErrorBody),
              (status = 403, description = "The key has no `command` scope", body = ErrorBody),
              (status = 413, description = "Body over 64 KiB", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn post_command(api: &Api, body: &[u8]) -> Reply {
    let posted: PostCommand = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    let cmd = match posted.validate() {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let imei = cmd.imei;
    match ledger("queueing a command", api.cmds.submit(cmd)).await {
        Ok(v) => {
            // Per request: the ledger (`commands`) is the record of every command, not the log.
            tracing::debug!(command = v.id, %imei, "Command queued.");
            json(
                StatusCode::ACCEPTED,
                &Accepted {
                    id: v.id,
                    state: v.state,
                },
            )
            .header("location", &format!("/api/v1/commands/{}", v.id))
        }
        Err(r) => r,
    }
}

fn parse_id(id: &str) -> Result<i64, Reply> {
    match id.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "command id must be a positive integer",
        )),
    }
}

/// A command and what became of it.
#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "commands",
    params(("id" = i64, Path)),
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, body = super::types::mirror::CommandView),
              (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn get_command(api: &Api, id: &str) -> Reply {
    let id = match parse_id(id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    match ledger("reading a command", api.cmds.get(id)).await {
        Ok(Some(v)) => json(StatusCode::OK, &v),
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("no command {id}")),
        Err(r) => r,
    }
}

/// Cancels a queued command.
#[utoipa::path(delete, path = "/api/v1/commands/{id}", tag = "commands",
    params(("id" = i64, Path)),
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, description = "Cancelled", body = super::types::mirror::CommandView),
              (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody),
              (status = 403, description = "The key has no `command` scope", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "Already sent or finished", body = CancelConflict),
              (status = 503, body = ErrorBody)))]
pub async fn cancel_command(api: &Api, id: &str) -> Reply {
    let id = match parse_id(id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    match ledger("cancelling a command", api.cmds.cancel(id)).await {
        Ok(Cancelled::Done(v)) => {
            tracing::debug!(command = id, "Command cancelled.");
            json(StatusCode::OK, &v)
        }
        Ok(Cancelled::NotFound) => error(StatusCode::NOT_FOUND, &format!("no command {id}")),
        Ok(Cancelled::TooLate(v)) => json(
            StatusCode::CONFLICT,
            &CancelConflict {
                error: format!(
                    "command {id} is {}: only a queued command can be cancelled",
                    v.state
                ),
                command: v,
            },
        ),
        Err(r) => r,
    }
}
