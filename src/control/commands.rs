//! The command ledger and its dispatcher. Runs on the control thread.
//!
//! A command posted to any gateway is a row of `commands` (migration V4), answered at once with
//! its id. When the device is connected to the gateway that takes the POST, that same
//! transaction claims the command and the shard writes it once committed (one commit from POST
//! to frame). Otherwise a `NOTIFY fleetgate_commands` tells every gateway sharing the database:
//! the gateway the device is connected to (it learns which devices are, from its shards) claims
//! the device's next queued command (highest priority first, expired ones skipped) and hands its
//! Codec 12/14 frame to the owning shard, which writes it when the session has no command in
//! flight. The claim is one transaction under a per-device advisory lock and only succeeds
//! while the device has no command in state `sent`: one command in flight per device, across
//! gateways, and no command is sent twice at once. Notifications can be missed (a reconnecting
//! listener), so the dispatcher also polls.
//!
//! The device's response completes the command (a Codec 14 refusal fails it); no answer within
//! `command_timeout_s`, or a session that ends with it in flight, puts it back in the queue
//! until `command_max_attempts` sends, then it fails. A queued command past its TTL expires.
//! The same command queued again while one is still queued supersedes the older one. A
//! command a gateway holds in flight and then forgets (the gateway died) is released after
//! twice the command timeout. Completed, failed and expired commands publish an event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Row;

use super::events::{publish_command_event, CommandEvent, CommandEventData, EventStats};
use crate::protocol::command::TYPE_COMMAND;
use crate::protocol::tcp::encode_command_frame;
use crate::protocol::{Codec, Imei};
use crate::shard::{shard_for, ShardMsg};
use crate::time::utc_text;

/// The notification channel that says "a command was queued for IMEI (the payload)".
pub const CHANNEL: &str = "fleetgate_commands";

/// The largest payload accepted (Teltonika devices take far less).
pub const MAX_PAYLOAD: usize = 4096;

/// A command as posted (`POST /api/v1/commands`), already validated.
#[derive(Clone, Debug, PartialEq)]
pub struct NewCommand {
    pub imei: Imei,
    pub payload: Payload,
    /// 12 or 14 (14: the frame carries the IMEI and the device refuses a foreign one).
    pub codec: Codec,
    /// The caller's, returned untouched in every view and event.
    pub metadata: serde_json::Value,
    /// Seconds the command may wait in the queue; `None`: until sent.
    pub ttl_s: Option<u64>,
    /// Higher first.
    pub priority: i32,
}

/// What is sent to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A text command (`"setdigout 1"`).
    Text(String),
    /// Raw bytes (posted as `"hex"`).
    Bytes(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Text(t) => t.as_bytes(),
            Payload::Bytes(b) => b,
        }
    }
}

/// A command as the API shows it (`GET /api/v1/commands/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommandView {
    pub id: i64,
    pub imei: String,
    /// The text, when posted as text.
    pub command: Option<String>,
    /// The payload as hex, when posted as hex.
    pub hex: Option<String>,
    pub codec: i16,
    pub state: String,
    /// The device's answer as text, once completed (or the refusal, when refused).
    pub response: Option<String>,
    pub metadata: serde_json::Value,
    pub priority: i32,
    pub attempts: i32,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    pub sent_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

/// What `DELETE /api/v1/commands/{id}` did.
#[derive(Clone, Debug, PartialEq)]
pub enum Cancelled {
    /// It was queued and is cancelled now.
    Done(CommandView),
    NotFound,
    /// It is past the queue (sent, or finished): nothing was changed.
    TooLate(CommandView),
}

/// A database error of the ledger, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct LedgerError {
    pub what: &'static str,
    pub detail: String,
}

fn ledger_err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> LedgerError {
    move |e| LedgerError {
        what,
        detail: crate::db::describe(&e),
    }
}

fn pool_err(what: &'static str) -> impl Fn(deadpool_postgres::PoolError) -> LedgerError {
    move |e| LedgerError {
        what,
        detail: e.to_string(),
    }
}

/// Ledger settings.
#[derive(Clone, Debug)]
pub struct CommandsConfig {
    /// This gateway's name in `sent_by`.
    pub gateway: String,
    pub timeout: Duration,
    pub max_attempts: i32,
}

/// The ledger and dispatcher of one gateway. Shared by the API's tasks (`Arc`).
pub struct Commands {
    cfg: CommandsConfig,
    pool: deadpool_postgres::Pool,
    inboxes: Arc<Vec<futures::channel::mpsc::UnboundedSender<ShardMsg>>>,
    /// Devices connected to this gateway, and their shard.
    online: Mutex<HashMap<Imei, usize>>,
    /// Where the events this ledger publishes are counted, once their transaction commits.
    events: Mutex<Option<Arc<EventStats>>>,
}

const COLUMNS: &str = "id, imei, codec, command, payload, metadata, priority, state, attempts, \
     created_at, expires_at, sent_at, finished_at, response, error";

fn when(t: Option<std::time::SystemTime>) -> Option<String> {
    let ms = t?.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    utc_text(ms as u64)
}

fn view(r: &Row) -> CommandView {
    let command: Option<String> = r.get("command");
    let payload: Vec<u8> = r.get("payload");
    CommandView {
        id: r.get("id"),
        imei: Imei::new(r.get::<_, i64>("imei") as u64).map_or_else(String::new, |i| i.to_string()),
        hex: command.is_none().then(|| hex::encode(&payload)),
        command,
        codec: r.get("codec"),
        state: r.get("state"),
        response: r.get("response"),
        metadata: r.get("metadata"),
        priority: r.get("priority"),
        attempts: r.get("attempts"),
        created_at: when(r.get("created_at")),
        expires_at: when(r.get("expires_at")),
        sent_at: when(r.get("sent_at")),
        finished_at: when(r.get("finished_at")),
        error: r.get("error"),
    }
}

impl Commands {
    pub fn new(
        cfg: CommandsConfig,
        pool: deadpool_postgres::Pool,
        inboxes: Arc<Vec<futures::channel::mpsc::UnboundedSender<ShardMsg>>>,
    ) -> Commands {
        Commands {
            cfg,
            pool,
            inboxes,
            online: Mutex::new(HashMap::new()),
            events: Mutex::new(None),
        }
    }

    /// Counts the events this ledger publishes in `stats` (the deliverer's).
    pub fn count_events_in(&self, stats: Arc<EventStats>) {
        *self.events.lock().unwrap() = Some(stats);
    }

    /// Queues a command: stored, older identical queued ones superseded; claimed and handed to
    /// the shard at once when the device is connected here with nothing in flight, else every
    /// gateway is told.
    ///
    /// # Errors
    /// The database refused or cannot be reached.
    pub async fn submit(&self, c: NewCommand) -> Result<CommandView, LedgerError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(pool_err("queueing a command"))?;
        let text = match &c.payload {
            Payload::Text(t) => Some(t.as_str()),
            Payload::Bytes(_) => None,
        };
        let ttl = c.ttl_s.map(|s| s as f64);
        let key = c.imei.as_u64() as i64;
        let codec = c.codec.id() as i16;
        let insert = client
            .prepare_cached(&format!(
                "WITH new AS (
                   INSERT INTO commands (imei, codec, command, payload, metadata, priority, expires_at)
                   VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
                   RETURNING {COLUMNS}
                 ), superseded AS (
                   UPDATE commands SET state = 'superseded', finished_at = now(),
                                       superseded_by = (SELECT id FROM new)
                    WHERE imei = $1 AND state = 'queued' AND codec = $2 AND payload = $4
                 )
                 SELECT * FROM new"
            ))
            .await
            .map_err(ledger_err("queueing a command"))?;
        let tx = client
            .transaction()
            .await
            .map_err(ledger_err("queueing a command"))?;
        // Stored, and identical queued ones superseded, in one statement (the statement's
        // snapshot cannot see the new row, so it is never its own superseder).
        let payload = c.payload.bytes();
        let params: [Param; 7] = [
            &key,
            &codec,
            &text,
            &payload,
            &c.metadata,
            &c.priority,
            &ttl,
        ];
        let stored = tx.query_one(&insert, &params);
        // The device is connected here: claim its next command in this same transaction (one
        // commit, no notification round trip) and hand it to the shard once committed. The
        // claim is pipelined behind the insert (sent without waiting; the server runs them in
        // order, the claim seeing the new row). Else, or when it has a command in flight,
        // every gateway is told; the answer to the one in flight dispatches the next.
        let (row, claimed) = if self.online.lock().unwrap().contains_key(&c.imei) {
            let claim = Claim::prepare(&tx).await?;
            futures::try_join!(
                async { stored.await.map_err(ledger_err("queueing a command")) },
                claim.run(&tx, c.imei, &self.cfg.gateway),
            )?
        } else {
            (
                stored.await.map_err(ledger_err("queueing a command"))?,
                None,
            )
        };
        let id: i64 = row.get("id");
        if claimed.is_none() {
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &c.imei.as_u64().to_string()],
            )
            .await
            .map_err(ledger_err("notifying the gateways"))?;
        }
        tx.commit()
            .await
            .map_err(ledger_err("queueing a command"))?;
        let mut v = view(&row);
        if let Some(claimed) = claimed {
            if claimed.get::<_, i64>("id") == id {
                v = view(&claimed);
            }
            self.send(c.imei, &claimed);
        }
        Ok(v)
    }

    /// One command.
    ///
    /// # Errors
    /// The database refused or cannot be reached.
    pub async fn get(&self, id: i64) -> Result<Option<CommandView>, LedgerError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(pool_err("reading a command"))?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM commands WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(ledger_err("reading a command"))?;
        Ok(row.as_ref().map(view))
    }

    /// A device's commands, newest first: at most `limit`, older than `before` when given.
    ///
    /// # Errors
    /// The database refused or cannot be reached.
    pub async fn for_device(
        &self,
        imei: Imei,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<CommandView>, LedgerError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(pool_err("listing commands"))?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM commands WHERE imei = $1 AND id < $2
                      ORDER BY id DESC LIMIT $3"
                ),
                &[&(imei.as_u64() as i64), &before.unwrap_or(i64::MAX), &limit],
            )
            .await
            .map_err(ledger_err("listing commands"))?;
        Ok(rows.iter().map(view).collect())
    }

    /// Cancels a queued command.
    ///
    /// # Errors
    /// The database refused or cannot be reached.
    pub async fn cancel(&self, id: i64) -> Result<Cancelled, LedgerError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(pool_err("cancelling a command"))?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE commands SET state = 'cancelled', finished_at = now()
                      WHERE id = $1 AND state = 'queued' RETURNING {COLUMNS}"
                ),
                &[&id],
            )
            .await
            .map_err(ledger_err("cancelling a command"))?;
        if let Some(r) = row {
            return Ok(Cancelled::Done(view(&r)));
        }
        Ok(match self.get(id).await? {
            Some(v) => Cancelled::TooLate(v),
            None => Cancelled::NotFound,
        })
    }

    /// A device logged in here: it may have commands waiting.
    pub async fn device_online(&self, imei: Imei, shard: usize) {
        self.online.lock().unwrap().insert(imei, shard);
        self.dispatch(imei).await;
    }

    pub fn device_offline(&self, imei: Imei) {
        self.online.lock().unwrap().remove(&imei);
    }

    /// Devices connected here.
    pub fn online(&self) -> Vec<Imei> {
        self.online.lock().unwrap().keys().copied().collect()
    }

    /// Sends `imei`'s next queued command if it is connected here and has none in flight.
    pub async fn dispatch(&self, imei: Imei) {
        if !self.online.lock().unwrap().contains_key(&imei) {
            return;
        }
        match self.claim(imei).await {
            Ok(Some(claimed)) => self.send(imei, &claimed),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%imei, error = %e, "Command dispatch failed; the poll retries.")
            }
        }
    }

    /// Hands a claimed command's Codec 12/14 frame to the shard that owns `imei`.
    fn send(&self, imei: Imei, claimed: &Row) {
        let id: i64 = claimed.get("id");
        let payload: &[u8] = claimed.get("payload");
        let codec = if claimed.get::<_, i16>("codec") == 14 {
            Codec::C14
        } else {
            Codec::C12
        };
        let mut frame = Vec::with_capacity(payload.len() + 32);
        encode_command_frame(
            codec,
            TYPE_COMMAND,
            (codec == Codec::C14).then_some(imei),
            &payload,
            &mut frame,
        );
        let owner = shard_for(imei, self.inboxes.len());
        let _ = self.inboxes[owner].unbounded_send(ShardMsg::SendCommand { id, imei, frame });
    }

    /// Marks `imei`'s next queued command sent by this gateway, if it has none in flight.
    async fn claim(&self, imei: Imei) -> Result<Option<Row>, LedgerError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(pool_err("claiming a command"))?;
        let tx = client
            .transaction()
            .await
            .map_err(ledger_err("claiming a command"))?;
        let claimed = Claim::prepare(&tx)
            .await?
            .run(&tx, imei, &self.cfg.gateway)
            .await?;
        tx.commit()
            .await
            .map_err(ledger_err("claiming a command"))?;
        Ok(claimed)
    }

    /// The device answered command `id`.
    pub async fn answered(&self, id: i64, imei: Imei, refused: bool, text: String) {
        let (state, error) = if refused {
            (
                "failed",
                Some("refused by the device (Codec 14: not its IMEI)"),
            )
        } else {
            ("completed", None)
        };
        let result = self
            .finish(
                "UPDATE commands SET state = $2, response = $3, error = $4, finished_at = now()
                  WHERE id = $1 AND state = 'sent'",
                &[&id, &state, &text, &error],
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(command = id, error = %e, "Recording a command's answer failed.");
        }
        self.dispatch(imei).await;
    }

    /// Command `id` was not answered in time, or not delivered: back in the queue while
    /// attempts remain, else failed.
    pub async fn undelivered(&self, id: i64, imei: Imei, why: &str) {
        let result = self
            .finish(
                "UPDATE commands
                    SET state = CASE WHEN attempts >= $2 THEN 'failed' ELSE 'queued' END,
                        error = CASE WHEN attempts >= $2 THEN $3 ELSE error END,
                        finished_at = CASE WHEN attempts >= $2 THEN now() END,
                        sent_by = NULL
                  WHERE id = $1 AND state = 'sent'",
                &[&id, &self.cfg.max_attempts, &why],
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(command = id, error = %e, "Requeueing a command failed.");
        }
        self.dispatch(imei).await;
    }

    /// Runs one state change (an UPDATE that returns the commands it changed) in a transaction
    /// that also publishes the event of each command it finished: completed, failed, expired.
    async fn finish(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, LedgerError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(pool_err("updating a command"))?;
        let tx = client
            .transaction()
            .await
            .map_err(ledger_err("updating a command"))?;
        let rows = tx
            .query(&format!("{sql} RETURNING {COLUMNS}"), params)
            .await
            .map_err(ledger_err("updating a command"))?;
        let mut published = 0;
        for r in &rows {
            let v = view(r);
            let event = match v.state.as_str() {
                "completed" => CommandEvent::Completed,
                "failed" => CommandEvent::Failed,
                "expired" => CommandEvent::Expired,
                _ => continue,
            };
            let command = v.command.as_deref().or(v.hex.as_deref()).unwrap_or("");
            let data = CommandEventData {
                imei: r.get::<_, i64>("imei") as u64,
                command_id: v.id,
                command,
                state: &v.state,
                response: v.response.as_deref(),
                metadata: Some(&v.metadata),
                error: v.error.as_deref(),
            };
            publish_command_event(&*tx, event, &data)
                .await
                .map_err(ledger_err("publishing a command event"))?;
            published += 1;
        }
        tx.commit()
            .await
            .map_err(ledger_err("updating a command"))?;
        if let Some(stats) = self.events.lock().unwrap().as_ref() {
            stats
                .published
                .fetch_add(published, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(rows.len() as u64)
    }

    /// Upkeep on a clock: queued commands past their TTL expire; commands held in flight for
    /// more than twice the command timeout (their gateway died) go back to the queue; devices
    /// connected here with queued commands are dispatched (a missed notification).
    pub async fn sweep(&self) {
        let stale = (self.cfg.timeout * 2).as_secs_f64();
        let result = self
            .finish(
                "UPDATE commands SET state = 'expired', finished_at = now()
                  WHERE state = 'queued' AND expires_at <= now()",
                &[],
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "Expiring commands failed.");
        }
        let result = self
            .finish(
                "UPDATE commands
                    SET state = CASE WHEN attempts >= $2 THEN 'failed' ELSE 'queued' END,
                        error = CASE WHEN attempts >= $2 THEN 'no answer' ELSE error END,
                        finished_at = CASE WHEN attempts >= $2 THEN now() END,
                        sent_by = NULL
                  WHERE state = 'sent' AND sent_at < now() - make_interval(secs => $1)",
                &[&stale, &self.cfg.max_attempts],
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "Releasing stale commands failed.");
        }
        let online: Vec<i64> = self.online().iter().map(|i| i.as_u64() as i64).collect();
        self.dispatch_waiting(&online).await;
    }

    /// Dispatches those of `devices` that have queued commands (one query for all).
    async fn dispatch_waiting(&self, devices: &[i64]) {
        if devices.is_empty() {
            return;
        }
        let online = devices;
        let waiting = match self.pool.get().await {
            Ok(c) => c
                .query(
                    "SELECT DISTINCT imei FROM commands WHERE state = 'queued' AND imei = ANY($1)",
                    &[&online],
                )
                .await
                .map_err(ledger_err("polling for commands")),
            Err(e) => Err(pool_err("polling for commands")(e)),
        };
        match waiting {
            Ok(rows) => {
                for r in rows {
                    if let Some(imei) = Imei::new(r.get::<_, i64>(0) as u64) {
                        self.dispatch(imei).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "Polling for commands failed."),
        }
    }
}

/// A statement parameter.
type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// Claiming a device's next command: its two statements, prepared once per pooled connection
/// (deadpool's statement cache).
struct Claim {
    lock: tokio_postgres::Statement,
    next: tokio_postgres::Statement,
}

impl Claim {
    async fn prepare(tx: &deadpool_postgres::Transaction<'_>) -> Result<Claim, LedgerError> {
        let next = format!(
            "UPDATE commands SET state = 'sent', attempts = attempts + 1, sent_at = now(),
                        sent_by = $2
                  WHERE id = (SELECT id FROM commands
                               WHERE imei = $1 AND state = 'queued'
                                 AND (expires_at IS NULL OR expires_at > now())
                                 AND NOT EXISTS (SELECT 1 FROM commands
                                                  WHERE imei = $1 AND state = 'sent')
                               ORDER BY priority DESC, id LIMIT 1)
                  RETURNING {COLUMNS}"
        );
        let (lock, next) = futures::try_join!(
            tx.prepare_cached("SELECT pg_advisory_xact_lock($1)"),
            tx.prepare_cached(&next),
        )
        .map_err(ledger_err("claiming a command"))?;
        Ok(Claim { lock, next })
    }

    /// Marks `imei`'s next queued command (highest priority first, unexpired) sent by
    /// `gateway` within `tx`, unless the device has a command in flight; returns its row
    /// (`COLUMNS`). The device's advisory lock (held to the end of `tx`) serializes claims across
    /// gateways; the claim is pipelined behind it, one round trip for both, and still takes its
    /// snapshot only once the lock is held (a statement's snapshot is taken when it starts).
    async fn run(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        imei: Imei,
        gateway: &str,
    ) -> Result<Option<Row>, LedgerError> {
        let key = imei.as_u64() as i64;
        let (lock, next): ([Param; 1], [Param; 2]) = ([&key], [&key, &gateway]);
        let (_, claimed) = futures::try_join!(
            tx.execute(&self.lock, &lock),
            tx.query_opt(&self.next, &next),
        )
        .map_err(ledger_err("claiming a command"))?;
        Ok(claimed)
    }
}

/// How often the ledger's upkeep runs (expiry, stale commands, the dispatch poll).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Devices that just logged in are looked up together, this often (a reconnect storm costs
/// one query per period, not one per device).
const ONLINE_BATCH_EVERY: Duration = Duration::from_millis(20);

/// The dispatcher: reacts to the shards' reports, to notifications of queued commands, and to
/// its clock, until `stop` turns true.
pub async fn run(
    cmds: Arc<Commands>,
    mut rx: super::ControlRx,
    db_url: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (notify_tx, mut notify_rx) = tokio::sync::mpsc::unbounded_channel::<Imei>();
    let listener = tokio::spawn(listen(db_url, notify_tx));
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut batch = tokio::time::interval(ONLINE_BATCH_EVERY);
    let mut just_online: Vec<i64> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            msg = rx.recv() => match msg {
                None => break,
                Some(super::ControlMsg::DeviceOnline { imei, shard }) => {
                    cmds.online.lock().unwrap().insert(imei, shard);
                    just_online.push(imei.as_u64() as i64);
                }
                Some(m) => handle(&cmds, m).await,
            },
            Some(imei) = notify_rx.recv() => cmds.dispatch(imei).await,
            _ = batch.tick(), if !just_online.is_empty() => {
                let devices = std::mem::take(&mut just_online);
                cmds.dispatch_waiting(&devices).await;
            }
            _ = sweep.tick() => cmds.sweep().await,
        }
    }
    listener.abort();
}

async fn handle(cmds: &Commands, msg: super::ControlMsg) {
    use super::ControlMsg as M;
    match msg {
        M::DeviceOnline { imei, shard } => cmds.device_online(imei, shard).await,
        M::DeviceOffline { imei } => cmds.device_offline(imei),
        M::CommandSent { id, imei } => tracing::debug!(command = id, %imei, "Command sent."),
        M::CommandUndelivered { id, imei } => cmds.undelivered(id, imei, "not delivered").await,
        M::CommandAnswered {
            id,
            imei,
            refused,
            text,
        } => cmds.answered(id, imei, refused, text).await,
        M::CommandTimedOut { id, imei } => cmds.undelivered(id, imei, "no answer").await,
    }
}

/// `LISTEN fleetgate_commands` on a connection of its own, reconnecting while the database is
/// away; each notification names a device with a newly queued command.
async fn listen(url: String, tx: tokio::sync::mpsc::UnboundedSender<Imei>) {
    use futures::StreamExt;
    loop {
        let Ok((client, mut conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
        else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(m)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = m {
                    if ntx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        if client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .is_ok()
        {
            while let Some(p) = nrx.recv().await {
                if let Some(imei) = p.parse().ok().and_then(Imei::new) {
                    if tx.send(imei).is_err() {
                        return;
                    }
                }
            }
        }
        driver.abort();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
