//! The writer threads: each owns one PostgreSQL connection (tokio current-thread runtime +
//! tokio-postgres), group-commits the rows of every shard with binary COPY, and answers each
//! batch only after its transaction has committed. They share one channel from the shards
//! (`writer_connections` of them, 2 by default, so one can COPY while another commits).
//!
//! The loop is plain and blocking: gather messages from the crossbeam channel until the batch is
//! full or its first message has waited `batch_max_delay`, then `block_on` one transaction.
//! The database connection is driven only inside `block_on`, which is all it needs.
//!
//! Failures: a retriable error (connection lost, server shutting down, out of resources) keeps
//! the batch and retries it, reconnecting with back-off, for as long as it takes: nothing is
//! answered meanwhile, so shards stop acking and, once their in-flight limits fill, stop
//! reading. A unique violation means a device resent records already stored (its ack was
//! lost): the batch is written again through a staging table with `ON CONFLICT DO NOTHING`.
//! Any other error is split down to the one batch that causes it, which alone is answered
//! [`WriteOutcome::Failed`] (its device gets no ack and resends; the error is logged).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use futures::channel::oneshot;
use futures::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::copy::{COLUMNS, COPY_HEADER, COPY_TRAILER};
use crate::db;

/// Rows of one AVL frame or datagram, crossing from a shard to the writer.
pub struct WriterBatch {
    /// Binary COPY rows (no header or trailer), see [`super::copy::encode_rows`].
    pub rows: Bytes,
    /// How many rows `rows` holds.
    pub records: u32,
    /// Answered once the rows are committed, or have failed for good.
    pub done: oneshot::Sender<WriteOutcome>,
}

/// The writer's answer for one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// In a committed transaction: the frame may be acked.
    Committed,
    /// Refused by the database for good: the frame must not be acked.
    Failed,
}

/// A device connected or disconnected; recorded in `device_sessions`.
#[derive(Clone, Debug)]
pub struct SessionEvent {
    pub imei: u64,
    /// `connect` or `disconnect`.
    pub event: &'static str,
    pub at: SystemTime,
    pub shard: u32,
    /// `tcp` or `udp`.
    pub transport: &'static str,
    pub peer: Option<String>,
    pub reason: Option<String>,
}

/// What shards send to the writer.
pub enum WriterMsg {
    Rows(WriterBatch),
    Session(SessionEvent),
}

/// Settings of the writer thread.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub database_url: String,
    /// Database connections (writer threads) committing in parallel.
    pub connections: usize,
    pub batch_max_records: usize,
    pub batch_max_delay: Duration,
    /// Capacity of the channel from the shards (messages).
    pub channel_capacity: usize,
}

/// Counters of the writer, readable from any thread.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches_committed: AtomicU64,
    pub records_committed: AtomicU64,
    pub transactions: AtomicU64,
    pub dedup_transactions: AtomicU64,
    pub retries: AtomicU64,
    pub failed_batches: AtomicU64,
    pub session_events: AtomicU64,
    pub connected: AtomicU64,
}

/// The shards' side of the writer: a sender, the thread, and its counters.
pub struct WriterHandle {
    tx: Sender<WriterMsg>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<WriterStats>,
}

impl WriterHandle {
    /// A sender for a shard.
    pub fn sender(&self) -> Sender<WriterMsg> {
        self.tx.clone()
    }

    /// Drops this handle's sender and waits until the writer has committed and answered
    /// everything it was sent (it exits once every sender is gone).
    pub fn join(self) {
        drop(self.tx);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Calls its function when dropped: at the end of the writer thread, also by a panic.
struct OnExit<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnExit<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Starts the writer: `cfg.connections` threads, each with its own database connection, all
/// taking batches from one channel, so that one transaction can be in COPY while another
/// commits (a single backend was the ingest ceiling, tuning/ingest.md). Acks stay in frame
/// order: each connection's acker answers its frames in the order they arrived. `on_exit`
/// runs when a writer thread ends, however it ends, so `serve` can stop loudly if one dies
/// while shards still need it.
///
/// # Errors
/// A thread cannot be spawned.
pub fn spawn(
    cfg: WriterConfig,
    on_exit: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<WriterHandle> {
    let (tx, rx) = crossbeam_channel::bounded(cfg.channel_capacity);
    let stats = Arc::new(WriterStats::default());
    let on_exit = Arc::new(on_exit);
    let mut threads = Vec::new();
    for n in 0..cfg.connections.max(1) {
        let (cfg, rx, st, on_exit) = (cfg.clone(), rx.clone(), stats.clone(), on_exit.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fleetgate-writer-{n}"))
            .spawn(move || {
                let _exit = OnExit(Some(move || on_exit()));
                Writer::new(cfg, rx, st).run()
            })?;
        threads.push(thread);
    }
    Ok(WriterHandle { tx, threads, stats })
}

/// Whether an error is worth retrying the same transaction for (after reconnecting).
pub fn is_retriable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: the socket or protocol failed under us.
        None => true,
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::LOCK_NOT_AVAILABLE
        }
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

struct Writer {
    cfg: WriterConfig,
    rx: Receiver<WriterMsg>,
    stats: Arc<WriterStats>,
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    backoff: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Writer {
    fn new(cfg: WriterConfig, rx: Receiver<WriterMsg>, stats: Arc<WriterStats>) -> Writer {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Writer {
            cfg,
            rx,
            stats,
            rt,
            client: None,
            backoff: BACKOFF_MIN,
        }
    }

    fn run(mut self) {
        let mut batches: Vec<WriterBatch> = Vec::new();
        let mut sessions: Vec<SessionEvent> = Vec::new();
        let mut open = true;
        while open {
            // Wait for the first message. (Housekeeping is the housekeeper thread's: it must
            // not depend on traffic.)
            match self.rx.recv() {
                Ok(m) => push(m, &mut batches, &mut sessions),
                Err(_) => break,
            }
            // Gather more until full or the first one has waited long enough.
            let deadline = Instant::now() + self.cfg.batch_max_delay;
            let mut records: usize = batches.iter().map(|b| b.records as usize).sum();
            while records < self.cfg.batch_max_records {
                match self.rx.recv_deadline(deadline) {
                    Ok(m) => {
                        if let WriterMsg::Rows(b) = &m {
                            records += b.records as usize;
                        }
                        push(m, &mut batches, &mut sessions);
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.commit(std::mem::take(&mut batches), std::mem::take(&mut sessions));
        }
        tracing::info!("Writer stopped: every batch answered.");
    }

    /// Writes `batches` and `sessions` in one transaction, retrying retriable failures until it
    /// succeeds, then answers every batch.
    fn commit(&mut self, batches: Vec<WriterBatch>, sessions: Vec<SessionEvent>) {
        let outcomes = self.write_retrying(&batches, &sessions);
        for (b, ok) in batches.into_iter().zip(outcomes) {
            if ok {
                self.stats.batches_committed.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .records_committed
                    .fetch_add(b.records as u64, Ordering::Relaxed);
                let _ = b.done.send(WriteOutcome::Committed);
            } else {
                self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                let _ = b.done.send(WriteOutcome::Failed);
            }
        }
    }

    /// One flag per batch: committed or failed for good.
    fn write_retrying(&mut self, batches: &[WriterBatch], sessions: &[SessionEvent]) -> Vec<bool> {
        let mut dedup = false;
        loop {
            if !self.ensure_connected() {
                continue;
            }
            let client = self.client.as_ref().expect("connected");
            let result = self.rt.block_on(write(client, batches, sessions, dedup));
            match result {
                Ok(()) => {
                    self.backoff = BACKOFF_MIN;
                    self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .session_events
                        .fetch_add(sessions.len() as u64, Ordering::Relaxed);
                    if dedup {
                        self.stats
                            .dedup_transactions
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return vec![true; batches.len()];
                }
                Err(e) if is_unique_violation(&e) && !dedup => {
                    tracing::debug!("Resent records in batch; writing through the staging table.");
                    dedup = true;
                }
                Err(e) if is_retriable(&e) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "Database write failed; will retry.");
                    if e.is_closed() || e.code().is_none() {
                        self.client = None;
                    }
                    self.sleep_backoff();
                }
                Err(e) if batches.len() > 1 => {
                    // Find the batch that causes it: each half on its own.
                    tracing::warn!(error = %e, batches = batches.len(), "Database refused a batch; splitting it.");
                    let mid = batches.len() / 2;
                    let mut flags = self.write_retrying(&batches[..mid], sessions);
                    flags.extend(self.write_retrying(&batches[mid..], &[]));
                    return flags;
                }
                Err(e) => {
                    tracing::error!(error = %e, records = batches.first().map_or(0, |b| b.records), "Database refused a frame's records; it will not be acked.");
                    // Sessions alone are retried without the refused rows.
                    if !batches.is_empty() && !sessions.is_empty() {
                        self.write_retrying(&[], sessions);
                    }
                    return vec![false; batches.len()];
                }
            }
        }
    }

    /// (Re)connects if needed; `false` after a failed attempt (and a pause).
    fn ensure_connected(&mut self) -> bool {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            match self.rt.block_on(db::connect_writer(&self.cfg.database_url)) {
                Ok(c) => {
                    tracing::info!("Writer connected to the database.");
                    self.stats.connected.store(1, Ordering::Relaxed);
                    self.client = Some(c);
                }
                Err(e) => {
                    self.stats.connected.store(0, Ordering::Relaxed);
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "Writer cannot reach the database; retrying.");
                    self.sleep_backoff();
                    return false;
                }
            }
        }
        true
    }

    fn sleep_backoff(&mut self) {
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

fn push(m: WriterMsg, batches: &mut Vec<WriterBatch>, sessions: &mut Vec<SessionEvent>) {
    match m {
        WriterMsg::Rows(b) => batches.push(b),
        WriterMsg::Session(s) => sessions.push(s),
    }
}

/// One transaction: the rows by COPY (into `telemetry`, or through the staging table when
/// `dedup`), the session events, commit.
async fn write(
    client: &Client,
    batches: &[WriterBatch],
    sessions: &[SessionEvent],
    dedup: bool,
) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        if !batches.is_empty() {
            let target = if dedup { "telemetry_stage" } else { "telemetry" };
            let sink = client.copy_in::<_, Bytes>(&format!("COPY {target} ({COLUMNS}) FROM STDIN (FORMAT binary)")).await?;
            futures::pin_mut!(sink);
            sink.feed(Bytes::from_static(COPY_HEADER)).await?;
            for b in batches {
                sink.feed(b.rows.clone()).await?;
            }
            sink.feed(Bytes::from_static(COPY_TRAILER)).await?;
            sink.as_mut().finish().await?;
            if dedup {
                client
                    .execute(&format!("INSERT INTO telemetry ({COLUMNS}) SELECT {COLUMNS} FROM telemetry_stage ON CONFLICT DO NOTHING"), &[])
                    .await?;
            }
        }
        if !sessions.is_empty() {
            insert_sessions(client, sessions).await?;
        }
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() && !client.is_closed() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

async fn insert_sessions(
    client: &Client,
    s: &[SessionEvent],
) -> Result<u64, tokio_postgres::Error> {
    let imei: Vec<i64> = s.iter().map(|e| e.imei as i64).collect();
    let event: Vec<&str> = s.iter().map(|e| e.event).collect();
    let at: Vec<SystemTime> = s.iter().map(|e| e.at).collect();
    let shard: Vec<i32> = s.iter().map(|e| e.shard as i32).collect();
    let transport: Vec<&str> = s.iter().map(|e| e.transport).collect();
    let peer: Vec<Option<&str>> = s.iter().map(|e| e.peer.as_deref()).collect();
    let reason: Vec<Option<&str>> = s.iter().map(|e| e.reason.as_deref()).collect();
    client
        .execute(
            "INSERT INTO device_sessions (imei, event, at, shard, transport, peer, reason)
             SELECT * FROM unnest($1::int8[], $2::text[], $3::timestamptz[], $4::int4[], $5::text[], $6::text[], $7::text[])",
            &[&imei, &event, &at, &shard, &transport, &peer, &reason],
        )
        .await
}
