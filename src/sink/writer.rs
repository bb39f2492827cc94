//! The writer threads: each owns one PostgreSQL connection (tokio current-thread runtime +
//! tokio-postgres), group-commits the rows of every shard with binary COPY, and answers each
//! batch only after its transaction has committed. They share one channel from the shards
//! (`writer_connections` of them, 2 by default, so one can COPY while another commits).
//!
//! The loop is plain and blocking: gather messages from the crossbeam channel until the batch is
//! full or its first message has waited `batch_max_delay`, then `block_on` one transaction.
//! The database connection is driven only inside `block_on`, which is all it needs.
//!
//! Failures are sorted by one table, [`classify`](super::classify::classify):
//! - *retry* (connection lost, server shutting down or out of resources, serialization
//!   failure, deadlock): the batch is kept and retried, reconnecting with back-off. Nothing is
//!   answered meanwhile, so shards stop acking and, once their in-flight limits fill, stop
//!   reading. Retries end at the shutdown deadline ([`WriterHandle::close`]): what is still
//!   failing then is answered [`WriteOutcome::Failed`], never acked, and resent by its device.
//! - *duplicate* (a unique violation: a device resent records whose ack was lost): the batch
//!   is written again through a staging table with `ON CONFLICT DO NOTHING`.
//! - *refused* (the data: malformed COPY bytes, a value a column refuses): the batch is split
//!   down to the one frame that causes it, which alone is answered [`WriteOutcome::Failed`] (its
//!   device gets no ack and resends; the error is logged).
//! - *fatal* (missing table, privilege, authentication, database gone): the thread answers
//!   what it holds `Failed` and ends; `serve` sees it end and stops with the error.
//!
//! Session events (connect, disconnect, refused login) are written after the telemetry
//! transaction, in a statement of their own, so a refused event can only lose itself; they
//! have their own budget of `max_session_events_queued` (see [`WriterTx::send_event`]).
//!
//! Events for webhooks (`control::events`) go into the outbox table in the same
//! transactions: each session event's row with its `device_sessions` row (one statement),
//! and a batch's telemetry summaries ([`WriterBatch::telemetry`]) as one event per device in
//! the COPY's transaction, so that an acked frame's event cannot be lost (see
//! [`super::events`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};
use futures::channel::oneshot;
use futures::SinkExt;
use tokio::sync::watch;
use tokio_postgres::Client;

use super::classify::{classify_error, ErrorClass};
use super::events::{insert_sessions, insert_telemetry_events, telemetry_rows, TelemetryEvent};
use crate::db;
use crate::distribution::Distribution;
use crate::log_every::LogEvery;
use crate::shard::copy::{COLUMNS, COPY_HEADER, COPY_TRAILER};
use crate::supervise::OnExit;

/// Rows of one AVL frame or datagram, crossing from a shard to the writer.
pub struct WriterBatch {
    /// Binary COPY rows (no header or trailer), see [`crate::shard::copy::encode_rows`].
    pub rows: Bytes,
    /// How many rows `rows` holds.
    pub records: u32,
    /// Answered once the rows are committed, or have failed for good.
    pub done: oneshot::Sender<WriteOutcome>,
    /// The shard's room for these rows (its memory bound), released as the batch is answered
    /// and dropped: a device that does not read its acks cannot hold it.
    pub permit: crate::shard::budget::Permit,
    /// The frame's summary for a `devices/{imei}/telemetry` event, when its device wants
    /// them (`TelemetryPolicy::wants_telemetry`); `None` costs nothing. Boxed: most batches
    /// carry none, and the channel's messages stay small.
    pub telemetry: Option<Box<TelemetryEvent>>,
}

/// The writer's answer for one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// In a committed transaction: the frame may be acked.
    Committed,
    /// Not known to be committed (refused by the database, or still failing at the shutdown
    /// deadline): the frame must not be acked. Its device resends it; a copy that did commit
    /// after all is absorbed as a duplicate.
    Failed,
}

/// A device connected or disconnected (recorded in `device_sessions` and published as an
/// event), or its login was refused (only published: `devices/{imei}/login_refused`).
#[derive(Clone, Debug)]
pub struct SessionEvent {
    pub imei: u64,
    /// `connect`, `disconnect` or `login_refused`.
    pub event: &'static str,
    pub at: SystemTime,
    pub shard: u32,
    /// `tcp` or `udp`.
    pub transport: &'static str,
    pub peer: Option<String>,
    pub reason: Option<String>,
}

/// What crosses the channel to the writer threads.
enum WriterMsg {
    Rows(WriterBatch),
    Session(SessionEvent),
}

/// Settings of the writer threads.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub database_url: String,
    /// Database connections (writer threads) committing in parallel.
    pub connections: usize,
    pub batch_max_records: usize,
    pub batch_max_delay: Duration,
    /// Session events the writer may hold (queued or waiting for the database) at most; more
    /// are dropped and counted, so a reconnect storm during an outage costs bounded memory.
    pub max_session_events_queued: usize,
}

/// Counters of the writer, readable from any thread.
#[derive(Debug)]
pub struct WriterStats {
    pub batches_committed: AtomicU64,
    pub records_committed: AtomicU64,
    pub transactions: AtomicU64,
    pub dedup_transactions: AtomicU64,
    pub retries: AtomicU64,
    /// Batches answered [`WriteOutcome::Failed`], for any reason.
    pub failed_batches: AtomicU64,
    /// Of those, batches still failing with a retriable error when the shutdown deadline
    /// passed (or queued behind them).
    pub failed_at_deadline: AtomicU64,
    /// Session events written to `device_sessions`.
    pub session_events: AtomicU64,
    /// Session events not kept: the event budget was exhausted, or the writer was gone, or the
    /// shutdown deadline passed before the database took them.
    pub session_events_dropped: AtomicU64,
    /// Session events the database refused (each one logged).
    pub session_events_refused: AtomicU64,
    /// Events committed to the outbox by the writer (session events and telemetry events).
    pub events_published: AtomicU64,
    pub connected: AtomicU64,
    /// Time from a gathering's first statement to its commit answered (retries included), in
    /// microseconds. A gathering (the shards' batches one writer thread took together) is one
    /// transaction, unless the database refuses part of it: then it is split, and this counts
    /// it once, split or not.
    pub commit_us: Distribution,
    /// Records committed per gathering (as `commit_us`).
    pub transaction_records: Distribution,
    /// Messages (batches and session events) waiting in the writer's queue when a writer
    /// thread last began a transaction.
    pub queue_depth: AtomicU64,
}

impl Default for WriterStats {
    fn default() -> WriterStats {
        WriterStats {
            batches_committed: AtomicU64::new(0),
            records_committed: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            dedup_transactions: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            failed_at_deadline: AtomicU64::new(0),
            session_events: AtomicU64::new(0),
            session_events_dropped: AtomicU64::new(0),
            session_events_refused: AtomicU64::new(0),
            events_published: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            // Up to 10 minutes; up to a million records.
            commit_us: Distribution::new(600_000_000),
            transaction_records: Distribution::new(1_000_000),
            queue_depth: AtomicU64::new(0),
        }
    }
}

/// State shared by the writer threads and every [`WriterTx`].
struct Shared {
    stats: Arc<WriterStats>,
    /// Session events sent and not yet written or dropped by a writer thread.
    events_held: AtomicUsize,
    max_events: usize,
    /// Paces the "budget exhausted" warning.
    drop_log: LogEvery,
    /// Writer threads still running.
    live: AtomicUsize,
    /// The error that ended a writer thread, for `serve`'s exit message.
    fatal: Mutex<Option<String>>,
}

// ===== impl WriterTx =====

/// The shards' side of the writer: cheap to clone, one per shard, usable from any thread.
///
/// Rows and session events travel on one channel, which is unbounded: the shards bound what
/// they hold awaiting commit (frames in flight per connection and per shard, and the bytes of
/// those frames), and every batch in the channel is one of those, so its length is bounded by
/// what the shards allow. Session events are not held back by any frame limit, so they have a
/// budget of their own here ([`WriterConfig::max_session_events_queued`]), and they never take
/// room from telemetry: a reconnect storm during an outage drops events, not frames.
#[derive(Clone)]
pub struct WriterTx {
    tx: Sender<WriterMsg>,
    shared: Arc<Shared>,
}

impl WriterTx {
    /// Hands a frame's rows to the writer. Never blocks.
    ///
    /// # Errors
    /// Only when the writer is gone (every thread ended: shutdown, or a fatal database error);
    /// the batch comes back, unanswered.
    pub fn send_rows(&self, batch: WriterBatch) -> Result<(), WriterBatch> {
        self.tx.send(WriterMsg::Rows(batch)).map_err(|e| match e.0 {
            WriterMsg::Rows(b) => b,
            WriterMsg::Session(_) => unreachable!("sent rows"),
        })
    }

    /// Hands a session event to the writer if the event budget allows. Never blocks. `false`:
    /// the event was dropped (budget exhausted, or writer gone) and counted in
    /// [`WriterStats::session_events_dropped`]; the events already held are kept and written
    /// once the database takes them. The budget warning is logged at most every few seconds.
    pub fn send_event(&self, ev: SessionEvent) -> bool {
        let s = &*self.shared;
        let reserved = s
            .events_held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < s.max_events).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            s.stats
                .session_events_dropped
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = s.drop_log.ready() {
                tracing::warn!(
                    budget = s.max_events,
                    imei = ev.imei,
                    event = ev.event,
                    dropped_since_last_warning = suppressed + 1,
                    dropped_total = s.stats.session_events_dropped.load(Ordering::Relaxed),
                    "Session event budget exhausted: the events already queued are kept and \
                     written when the database takes them; newer ones are dropped and counted."
                );
            }
            return false;
        }
        if self.tx.send(WriterMsg::Session(ev)).is_err() {
            s.events_held.fetch_sub(1, Ordering::AcqRel);
            s.stats
                .session_events_dropped
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

// ===== impl WriterHandle =====

/// The owner's side of the writer: senders for the shards, the shutdown, the counters.
pub struct WriterHandle {
    tx: WriterTx,
    /// Dropped by [`WriterHandle::close`]: wakes idle threads so they see the deadline.
    stop: Sender<()>,
    deadline: watch::Sender<Option<Instant>>,
    /// One message per writer thread that ended.
    ended: Receiver<()>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<WriterStats>,
}

/// How long after the deadline [`WriterHandle::close`] waits for threads to answer what they
/// hold and end; they see the deadline at once, so this is only for a stuck thread.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

impl WriterHandle {
    /// A sender for a shard.
    pub fn sender(&self) -> WriterTx {
        self.tx.clone()
    }

    /// The database error that ended a writer thread, if one did.
    pub fn fatal_error(&self) -> Option<String> {
        self.tx
            .shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Shuts the writer down: it drains what it was sent (every other sender should be gone
    /// by now, e.g. the shards stopped), retrying failures until `deadline`. A batch still
    /// failing with a retriable error at `deadline`, and anything queued behind it, is answered
    /// [`WriteOutcome::Failed`] (never acked: its device resends), and the threads end. Returns
    /// within `deadline` plus a short grace.
    ///
    /// `true`: everything sent was answered on its merits (committed, or refused for itself)
    /// and every thread ended. `false`: the deadline cut retries short, a thread had already
    /// ended on a fatal error, or a thread did not end in time (it is left behind).
    pub fn close(self, deadline: Instant) -> bool {
        let WriterHandle {
            tx,
            stop,
            deadline: deadline_tx,
            ended,
            threads,
            stats,
        } = self;
        deadline_tx.send_replace(Some(deadline));
        let shared = tx.shared.clone();
        drop((tx, stop));
        let limit = deadline + CLOSE_GRACE;
        let mut all_ended = true;
        for _ in 0..threads.len() {
            if ended.recv_deadline(limit).is_err() {
                all_ended = false;
                break;
            }
        }
        if !all_ended {
            tracing::error!("A writer thread did not end by the shutdown deadline; leaving it.");
            return false;
        }
        for t in threads {
            let _ = t.join();
        }
        let cut_short = stats.failed_at_deadline.load(Ordering::Relaxed);
        let fatal = shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if cut_short > 0 {
            tracing::error!(
                batches = cut_short,
                "Shutdown deadline passed while the database still refused writes; those frames were not acked and will be resent."
            );
        }
        cut_short == 0 && !fatal
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
    let (tx, rx) = crossbeam_channel::unbounded();
    let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let (deadline, deadline_rx) = watch::channel(None);
    let (ended_tx, ended) = crossbeam_channel::unbounded();
    let stats = Arc::new(WriterStats::default());
    let n = cfg.connections.max(1);
    let shared = Arc::new(Shared {
        stats: stats.clone(),
        events_held: AtomicUsize::new(0),
        max_events: cfg.max_session_events_queued,
        drop_log: LogEvery::new(Duration::from_secs(10)),
        live: AtomicUsize::new(n),
        fatal: Mutex::new(None),
    });
    let on_exit = Arc::new(on_exit);
    let mut threads = Vec::new();
    for i in 0..n {
        let writer = Writer {
            cfg: cfg.clone(),
            rx: rx.clone(),
            stop: stop_rx.clone(),
            deadline: deadline_rx.clone(),
            shared: shared.clone(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            client: None,
            backoff: BACKOFF_MIN,
            stopped: None,
        };
        let (on_exit, ended_tx) = (on_exit.clone(), ended_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fleetgate-writer-{i}"))
            .spawn(move || {
                let _exit = OnExit(Some(move || {
                    let _ = ended_tx.send(());
                    on_exit()
                }));
                writer.run()
            })?;
        threads.push(thread);
    }
    Ok(WriterHandle {
        tx: WriterTx { tx, shared },
        stop,
        deadline,
        ended,
        threads,
        stats,
    })
}

// ===== impl Writer =====

/// Why a writer thread stops retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The shutdown deadline passed.
    Deadline,
    /// A fatal database error (see [`ErrorClass::Fatal`]).
    Fatal,
}

struct Writer {
    cfg: WriterConfig,
    rx: Receiver<WriterMsg>,
    /// Disconnected when the owner closes the writer.
    stop: Receiver<()>,
    /// The shutdown deadline, once the owner set one.
    deadline: watch::Receiver<Option<Instant>>,
    shared: Arc<Shared>,
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    backoff: Duration,
    /// Set once nothing more is to be written: everything is answered `Failed` from then on.
    stopped: Option<Stop>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Writer {
    fn run(mut self) {
        let mut batches: Vec<WriterBatch> = Vec::new();
        let mut sessions: Vec<SessionEvent> = Vec::new();
        let mut open = true;
        while open && self.stopped.is_none() {
            match self.next_message() {
                Some(m) => push(m, &mut batches, &mut sessions),
                None => break,
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
            self.commit(std::mem::take(&mut batches));
            self.record_sessions(std::mem::take(&mut sessions));
        }
        let last = self.shared.live.fetch_sub(1, Ordering::AcqRel) == 1;
        if self.stopped == Some(Stop::Deadline) || self.deadline_passed() || last {
            // Nobody will write what is still queued: answer it now rather than leave shards
            // waiting. (After a fatal error the other threads keep going; the last one to end
            // answers for all.)
            self.fail_queued();
        }
        match self.stopped {
            None => tracing::info!("Writer stopped: every batch answered."),
            Some(Stop::Deadline) => {
                tracing::warn!("Writer stopped at the shutdown deadline.")
            }
            Some(Stop::Fatal) => tracing::error!("Writer stopped on a fatal database error."),
        }
    }

    /// The next message to start a batch with; `None` when the thread should end: every
    /// sender is gone, or the owner closed the writer and the deadline passed.
    fn next_message(&mut self) -> Option<WriterMsg> {
        loop {
            // (Copied out: a watch borrow holds a lock, not to be held while blocking.)
            let deadline = *self.deadline.borrow();
            if let Some(deadline) = deadline {
                if Instant::now() >= deadline {
                    return None;
                }
                return self.rx.recv_deadline(deadline).ok();
            }
            select! {
                recv(self.rx) -> m => return m.ok(),
                recv(self.stop) -> _ => {
                    // Closed (the deadline is set first), or the handle was dropped without a
                    // deadline: then wait for the senders to go, as before.
                    let deadline = *self.deadline.borrow();
                    if deadline.is_none() {
                        return self.rx.recv().ok();
                    }
                }
            }
        }
    }

    fn deadline_passed(&self) -> bool {
        self.deadline.borrow().is_some_and(|d| Instant::now() >= d)
    }

    /// Answers everything still queued `Failed` and drops queued session events.
    fn fail_queued(&mut self) {
        let (mut failed, mut events) = (0u64, 0usize);
        while let Ok(m) = self.rx.try_recv() {
            match m {
                WriterMsg::Rows(b) => {
                    failed += 1;
                    let _ = b.done.send(WriteOutcome::Failed);
                }
                WriterMsg::Session(_) => events += 1,
            }
        }
        let st = &self.shared.stats;
        st.failed_batches.fetch_add(failed, Ordering::Relaxed);
        if self.stopped != Some(Stop::Fatal) {
            st.failed_at_deadline.fetch_add(failed, Ordering::Relaxed);
        }
        self.drop_events(events);
    }

    /// Writes `batches` in one transaction (split when the database refuses part of it), then
    /// answers every batch.
    fn commit(&mut self, batches: Vec<WriterBatch>) {
        if batches.is_empty() {
            return;
        }
        self.shared
            .stats
            .queue_depth
            .store(self.rx.len() as u64, Ordering::Relaxed);
        let started = Instant::now();
        let outcomes = self.write_rows(&batches);
        let st = &self.shared.stats;
        let committed: u64 = batches
            .iter()
            .zip(&outcomes)
            .filter(|(_, ok)| **ok)
            .map(|(b, _)| b.records as u64)
            .sum();
        if committed > 0 {
            st.commit_us.record(started.elapsed().as_micros() as u64);
            st.transaction_records.record(committed);
        }
        for (b, ok) in batches.into_iter().zip(outcomes) {
            if ok {
                st.batches_committed.fetch_add(1, Ordering::Relaxed);
                st.records_committed
                    .fetch_add(b.records as u64, Ordering::Relaxed);
                let _ = b.done.send(WriteOutcome::Committed);
            } else {
                st.failed_batches.fetch_add(1, Ordering::Relaxed);
                let _ = b.done.send(WriteOutcome::Failed);
            }
        }
    }

    /// One flag per batch: committed, or failed for good.
    fn write_rows(&mut self, batches: &[WriterBatch]) -> Vec<bool> {
        let mut dedup = false;
        loop {
            if let Some(stop) = self.stopped {
                if stop == Stop::Deadline {
                    self.shared
                        .stats
                        .failed_at_deadline
                        .fetch_add(batches.len() as u64, Ordering::Relaxed);
                }
                return vec![false; batches.len()];
            }
            if !self.ensure_connected() {
                continue;
            }
            let client = self.client.as_ref().expect("connected");
            let result = self.until_deadline(write(client, batches, dedup));
            let Some(result) = result else {
                // Cut short: the COMMIT may or may not have happened; Failed is safe either
                // way (a resend of committed rows is absorbed). The connection is in an
                // unknown state.
                self.cut_short();
                continue;
            };
            let e = match result {
                Ok(events) => {
                    self.backoff = BACKOFF_MIN;
                    let st = &self.shared.stats;
                    st.events_published.fetch_add(events, Ordering::Relaxed);
                    st.transactions.fetch_add(1, Ordering::Relaxed);
                    if dedup {
                        st.dedup_transactions.fetch_add(1, Ordering::Relaxed);
                    }
                    return vec![true; batches.len()];
                }
                Err(e) => e,
            };
            match classify_error(&e) {
                ErrorClass::Duplicate if !dedup => {
                    tracing::debug!("Resent records in batch; writing through the staging table.");
                    dedup = true;
                }
                ErrorClass::Retry => self.retry_after(&e, "Database write failed; will retry."),
                ErrorClass::Fatal => self.fatal(&e, "writing telemetry"),
                ErrorClass::Duplicate | ErrorClass::Refused if batches.len() > 1 => {
                    // Find the batch that causes it: each half on its own.
                    tracing::warn!(error = %db::describe(&e), batches = batches.len(), "Database refused a batch; splitting it.");
                    let mid = batches.len() / 2;
                    let mut flags = self.write_rows(&batches[..mid]);
                    flags.extend(self.write_rows(&batches[mid..]));
                    return flags;
                }
                ErrorClass::Duplicate | ErrorClass::Refused => {
                    tracing::error!(error = %db::describe(&e), records = batches[0].records, "Database refused a frame's records; it will not be acked.");
                    return vec![false];
                }
            }
        }
    }

    /// Writes the session events in a statement of their own, after the telemetry they
    /// arrived with, so that an event the database refuses (a NUL byte in a reason: `text`
    /// refuses it) can fail no frame. Refused events are split down to the offending one,
    /// which is dropped, counted and logged; the others are written.
    fn record_sessions(&mut self, sessions: Vec<SessionEvent>) {
        if !sessions.is_empty() {
            self.write_sessions(&sessions);
        }
    }

    /// Each event leaves the budget here, once its fate is known.
    fn write_sessions(&mut self, sessions: &[SessionEvent]) {
        loop {
            if self.stopped.is_some() {
                self.drop_events(sessions.len());
                return;
            }
            if !self.ensure_connected() {
                continue;
            }
            let client = self.client.as_ref().expect("connected");
            let result = self.until_deadline(insert_sessions(client, sessions));
            let Some(result) = result else {
                self.cut_short();
                continue;
            };
            let e = match result {
                Ok(events) => {
                    self.backoff = BACKOFF_MIN;
                    self.shared
                        .stats
                        .events_published
                        .fetch_add(events, Ordering::Relaxed);
                    self.shared
                        .events_held
                        .fetch_sub(sessions.len(), Ordering::AcqRel);
                    self.shared
                        .stats
                        .session_events
                        .fetch_add(sessions.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) => e,
            };
            match classify_error(&e) {
                ErrorClass::Retry => {
                    self.retry_after(&e, "Writing session events failed; will retry.")
                }
                ErrorClass::Fatal => self.fatal(&e, "writing session events"),
                ErrorClass::Duplicate | ErrorClass::Refused if sessions.len() > 1 => {
                    let mid = sessions.len() / 2;
                    self.write_sessions(&sessions[..mid]);
                    self.write_sessions(&sessions[mid..]);
                    return;
                }
                ErrorClass::Duplicate | ErrorClass::Refused => {
                    let ev = &sessions[0];
                    self.shared.events_held.fetch_sub(1, Ordering::AcqRel);
                    self.shared
                        .stats
                        .session_events_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %db::describe(&e), imei = ev.imei, event = ev.event, reason = ?ev.reason, peer = ?ev.peer, "Database refused a session event; it is dropped.");
                    return;
                }
            }
        }
    }

    /// Session events that will not be written: out of the budget, counted as dropped.
    fn drop_events(&self, n: usize) {
        if n > 0 {
            self.shared.events_held.fetch_sub(n, Ordering::AcqRel);
            self.shared
                .stats
                .session_events_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// (Re)connects if needed; `false` after a failed attempt (and a pause), or once stopped.
    fn ensure_connected(&mut self) -> bool {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_some() {
            return true;
        }
        let connected = match self.until_deadline(db::connect_writer(&self.cfg.database_url)) {
            None => {
                self.cut_short();
                return false;
            }
            Some(r) => r,
        };
        match connected {
            Ok(c) => {
                tracing::info!("Writer connected to the database.");
                self.shared.stats.connected.store(1, Ordering::Relaxed);
                self.client = Some(c);
                true
            }
            Err(e) => {
                self.shared.stats.connected.store(0, Ordering::Relaxed);
                if classify_error(&e) == ErrorClass::Fatal {
                    self.fatal(&e, "connecting");
                } else {
                    self.retry_after(&e, "Writer cannot reach the database; retrying.");
                }
                false
            }
        }
    }

    /// Counts a retriable failure, drops the connection if it is gone, and pauses (back-off,
    /// cut short by the shutdown deadline).
    fn retry_after(&mut self, e: &tokio_postgres::Error, msg: &'static str) {
        self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %db::describe(e), "{msg}");
        if e.is_closed() || e.code().is_none() {
            self.client = None;
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        // (A timer must be made inside the runtime: hence the async block.)
        if self
            .until_deadline(async move { tokio::time::sleep(pause).await })
            .is_none()
        {
            self.cut_short();
        }
    }

    /// A fatal error: log it, remember it for `serve`, stop writing.
    fn fatal(&mut self, e: &tokio_postgres::Error, doing: &str) {
        let msg = format!("database error {doing}: {}", db::describe(e));
        tracing::error!(error = %msg, "No retry can fix this database error; the writer stops and what it holds is not acked.");
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(msg);
        self.stopped = Some(Stop::Fatal);
        self.client = None;
    }

    /// Runs `fut` on this thread's runtime, unless the shutdown deadline passes first: then
    /// `None` (and the caller calls [`Writer::cut_short`]).
    fn until_deadline<F: Future>(&self, fut: F) -> Option<F::Output> {
        let mut deadline = self.deadline.clone();
        self.rt.block_on(async move {
            tokio::select! {
                out = fut => Some(out),
                () = deadline_reached(&mut deadline) => None,
            }
        })
    }

    /// The shutdown deadline passed: stop writing; the connection (maybe mid-transaction) is
    /// dropped.
    fn cut_short(&mut self) {
        self.stopped = Some(Stop::Deadline);
        self.client = None;
    }
}

/// Completes when the shutdown deadline is set and has passed; never if none is ever set.
async fn deadline_reached(rx: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let deadline = *rx.borrow_and_update();
        if let Some(d) = deadline {
            tokio::time::sleep_until(d.into()).await;
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn push(m: WriterMsg, batches: &mut Vec<WriterBatch>, sessions: &mut Vec<SessionEvent>) {
    match m {
        WriterMsg::Rows(b) => batches.push(b),
        WriterMsg::Session(s) => sessions.push(s),
    }
}

/// One transaction: the rows by COPY (into `telemetry`, or through the staging table when
/// `dedup`), the batches' telemetry events, commit. Returns the events inserted.
async fn write(
    client: &Client,
    batches: &[WriterBatch],
    dedup: bool,
) -> Result<u64, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        let target = if dedup { "telemetry_stage" } else { "telemetry" };
        let sink = client
            .copy_in::<_, Bytes>(&format!(
                "COPY {target} ({COLUMNS}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
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
        let events = match telemetry_rows(batches) {
            Some(rows) => insert_telemetry_events(client, &rows).await?,
            None => 0,
        };
        client.batch_execute("COMMIT").await?;
        Ok(events)
    }
    .await;
    if result.is_err() && !client.is_closed() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}
