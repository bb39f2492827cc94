//! The deliverer task: leases routes, reads their events from the outbox into a bounded
//! window, sends them (in order per device, several devices at once), retries with back-off,
//! saves each route's cursor, prunes what every route has. One async task on the control
//! thread's tokio runtime; see the module doc of `control::events` for the design.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{watch, Notify};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::outbox::{self, Position};
use super::route::{DeliveryError, OutboxEvent, Route};
use super::{DelivererConfig, EventStats};
use crate::db;

/// The notification channel the outbox trigger notifies.
const CHANNEL: &str = "fleetgate_events";
/// Longest a database call may take before the connection is taken for broken.
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before a database (re)connection is tried again.
const DB_RETRY: Duration = Duration::from_secs(1);
/// How soon to read again when committed events wait behind a running transaction.
const REPOLL: Duration = Duration::from_millis(5);
/// Cursor saves are at most this frequent (a restart re-sends at most what was delivered
/// since the last save).
const SAVE_EVERY: Duration = Duration::from_millis(100);

/// A finished attempt: which route (and which holding of its lease), which event.
struct Attempt {
    route: usize,
    generation: u64,
    key: Position,
    imei: u64,
    result: Result<(), DeliveryError>,
}

/// An event in a route's window.
struct Slot {
    event: OutboxEvent,
    attempts: u32,
    delivered: bool,
}

/// One route's delivery state while this gateway holds its lease.
struct RouteState {
    route: Route,
    regex: String,
    /// Bumped at each lease taken or lost: answers of an earlier holding are ignored.
    generation: u64,
    /// While held: when our lease ends at the latest, by our clock (measured from before the
    /// renewal was sent, so never later than the database's).
    lease_until: Option<Instant>,
    next_renewal: Instant,
    /// Every matching event up to here is delivered.
    cursor: Position,
    saved: Position,
    last_save: Instant,
    /// Where the next read starts.
    read_pos: Position,
    /// There may be more to read (a notification, the poll, a full read).
    more: bool,
    repoll_at: Option<Instant>,
    /// Read and not yet behind the cursor, in delivery order.
    window: BTreeMap<Position, Slot>,
    /// Per device, its undelivered events in order: only the first may be in flight.
    queues: HashMap<u64, VecDeque<Position>>,
    /// Devices whose first event may be sent now.
    ready: VecDeque<u64>,
    /// Devices waiting out a back-off.
    backoff: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: usize,
    /// Milliseconds the oldest undelivered event has waited (0 when caught up).
    lag_ms: u64,
}

impl RouteState {
    fn new(route: Route, now: Instant) -> RouteState {
        RouteState {
            regex: route.sql_regex(),
            route,
            generation: 0,
            lease_until: None,
            next_renewal: now,
            cursor: (0, 0),
            saved: (0, 0),
            last_save: now,
            read_pos: (0, 0),
            more: false,
            repoll_at: None,
            window: BTreeMap::new(),
            queues: HashMap::new(),
            ready: VecDeque::new(),
            backoff: BinaryHeap::new(),
            in_flight: 0,
            lag_ms: 0,
        }
    }

    fn held(&self) -> bool {
        self.lease_until.is_some()
    }

    /// Starts a holding at `cursor`.
    fn take(&mut self, cursor: Position, until: Instant) {
        self.drop_window();
        self.lease_until = Some(until);
        self.cursor = cursor;
        self.saved = cursor;
        self.read_pos = cursor;
        self.more = true;
    }

    /// The lease is gone (or given up): forget everything read; answers still on their way
    /// are ignored.
    fn lose(&mut self) {
        self.drop_window();
        self.lease_until = None;
        self.more = false;
        self.lag_ms = 0;
    }

    fn drop_window(&mut self) {
        self.generation += 1;
        self.window.clear();
        self.queues.clear();
        self.ready.clear();
        self.backoff.clear();
        self.in_flight = 0;
        self.repoll_at = None;
    }

    /// Adds read events to the window (in order, after everything already there).
    fn add(&mut self, events: Vec<OutboxEvent>) {
        for e in events {
            let key = e.key();
            self.read_pos = key;
            // The SQL regex chose it; the filters are the reference (they agree, see the
            // tests): a row they do not match is passed over.
            if !self.route.matches(&e.topic) {
                continue;
            }
            let q = self.queues.entry(e.imei).or_default();
            if q.is_empty() {
                self.ready.push_back(e.imei);
            }
            q.push_back(key);
            self.window.insert(
                key,
                Slot {
                    event: e,
                    attempts: 0,
                    delivered: false,
                },
            );
        }
        self.advance();
    }

    /// Moves the cursor over the delivered front of the window.
    fn advance(&mut self) {
        while let Some(entry) = self.window.first_entry() {
            if !entry.get().delivered {
                break;
            }
            let (key, _) = entry.remove_entry();
            self.cursor = key;
        }
        if self.window.is_empty() && self.read_pos > self.cursor {
            self.cursor = self.read_pos;
        }
    }

    /// Whether a read is due: there may be more, and the window has room. Not for a sliver
    /// of room: the window refills in useful reads.
    fn wants_read(&self, window: usize) -> bool {
        let room = window.saturating_sub(self.window.len());
        self.held() && self.more && room > 0 && (room >= window / 4 || self.window.is_empty())
    }

    fn update_lag(&mut self, now_ms: u64) {
        // After `advance` the window's first event is the oldest undelivered one.
        self.lag_ms = match self.window.values().next() {
            Some(s) => now_ms.saturating_sub(s.event.at_ms),
            None if self.more => self.lag_ms,
            None => 0,
        };
    }
}

/// Why the loop is in the state it is.
struct Deliverer {
    cfg: DelivererConfig,
    stats: Arc<EventStats>,
    routes: Vec<RouteState>,
    client: Option<Client>,
    listener: Option<Client>,
    /// Poked by the listening connection's task at each notification.
    notified: Arc<Notify>,
    next_connect: Instant,
    next_poll: Instant,
    next_prune: Instant,
    in_flight: FuturesUnordered<BoxFuture<'static, Attempt>>,
    /// Stopping: only events behind one already delivered are sent (see
    /// [`Deliverer::shut_down`]).
    draining: bool,
}

/// Runs until `stop` turns true (or its sender is dropped): delivers the events of every
/// route whose lease this gateway holds. At the stop, what is in flight is awaited (at most
/// the request timeout), the cursors are saved and the leases given up, so another gateway
/// takes over at once, and, while the receivers answer, nothing is sent twice.
pub async fn run_deliverer(cfg: DelivererConfig, mut stop: watch::Receiver<bool>) {
    let now = Instant::now();
    let stats = cfg.stats.clone();
    let routes = cfg
        .routes
        .iter()
        .cloned()
        .map(|r| RouteState::new(r, now))
        .collect();
    let mut d = Deliverer {
        next_prune: now + cfg.prune_every,
        cfg,
        stats,
        routes,
        client: None,
        listener: None,
        notified: Arc::new(Notify::new()),
        next_connect: now,
        next_poll: now,
        in_flight: FuturesUnordered::new(),
        draining: false,
    };
    tracing::info!(
        routes = d.routes.len(),
        gateway = %d.cfg.gateway_id,
        "Event deliverer started."
    );
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        d.round().await;
        let wake = d.next_wake();
        let notified = d.notified.clone();
        tokio::select! {
            Some(a) = d.in_flight.next(), if !d.in_flight.is_empty() => d.finished(a),
            () = notified.notified() => d.mark_more(),
            r = stop.changed() => {
                if r.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
        // Everything else that has finished meanwhile, without waiting.
        while let Some(Some(a)) = d.in_flight.next().now_or_never() {
            d.finished(a);
        }
    }
    d.shut_down().await;
    tracing::info!("Event deliverer stopped.");
}

impl Deliverer {
    /// One pass over what is due: connections, leases, reads, sends, saves, pruning.
    async fn round(&mut self) {
        let now = Instant::now();
        if self.client.as_ref().is_some_and(Client::is_closed) {
            tracing::warn!("Event deliverer lost its database connection; reconnecting.");
            self.client = None;
        }
        if self.listener.as_ref().is_some_and(Client::is_closed) {
            self.listener = None;
        }
        if (self.client.is_none() || self.listener.is_none()) && now >= self.next_connect {
            self.connect().await;
        }
        if now >= self.next_poll {
            // The fallback for a missed notification (listener down, or a reconnect gap).
            self.next_poll = now + self.cfg.poll_interval;
            self.mark_more();
        }
        for i in 0..self.routes.len() {
            self.lease(i).await;
            self.read(i).await;
            self.send(i);
            self.save(i).await;
        }
        if now >= self.next_prune && self.client.is_some() {
            self.next_prune = now + self.cfg.prune_every;
            let c = self.client.as_ref().expect("connected");
            let result = tokio::time::timeout(DB_TIMEOUT, outbox::prune(c)).await;
            match result {
                Ok(Ok(n)) => {
                    if n > 0 {
                        self.stats.pruned.fetch_add(n, Ordering::Relaxed);
                        tracing::debug!(events = n, "Delivered events pruned.");
                    }
                }
                Ok(Err(e)) => self.db_failed(&e, "pruning delivered events"),
                Err(_) => self.db_timed_out("pruning delivered events"),
            }
        }
        self.gauges();
    }

    fn gauges(&mut self) {
        let now_ms = crate::time::unix_now_ms();
        let (mut lag, mut held, mut leased) = (0, 0, 0);
        for r in &mut self.routes {
            if r.held() {
                r.update_lag(now_ms);
                lag = lag.max(r.lag_ms);
                held += r.window.len() as u64;
                leased += 1;
            }
        }
        self.stats.lag_ms.store(lag, Ordering::Relaxed);
        self.stats.window_events.store(held, Ordering::Relaxed);
        self.stats.routes_leased.store(leased, Ordering::Relaxed);
    }

    /// The earliest moment something is due.
    fn next_wake(&self) -> Instant {
        let mut at = self.next_poll.min(self.next_prune);
        if self.client.is_none() || self.listener.is_none() {
            at = at.min(self.next_connect);
        }
        for r in &self.routes {
            at = at.min(r.next_renewal);
            if !r.held() {
                continue;
            }
            if let Some(t) = r.repoll_at {
                at = at.min(t);
            }
            if let Some(Reverse((t, _))) = r.backoff.peek() {
                at = at.min(*t);
            }
            if r.cursor != r.saved {
                at = at.min(r.last_save + SAVE_EVERY);
            }
            if self.client.is_some() && r.wants_read(self.cfg.window) {
                // A read is due (e.g. after one whose rows the filters passed over).
                return Instant::now();
            }
        }
        at
    }

    fn mark_more(&mut self) {
        for r in &mut self.routes {
            if r.held() {
                r.more = true;
            }
        }
    }

    async fn connect(&mut self) {
        let url = self.cfg.database_url.clone();
        if self.client.is_none() {
            match tokio::time::timeout(DB_TIMEOUT, db::connect(&url)).await {
                Ok(Ok(c)) => {
                    let names: Vec<String> =
                        self.routes.iter().map(|r| r.route.name.clone()).collect();
                    match tokio::time::timeout(DB_TIMEOUT, outbox::register_routes(&c, &names))
                        .await
                    {
                        Ok(Ok(())) => self.client = Some(c),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %db::describe(&e), "Event deliverer cannot register its routes; retrying.")
                        }
                        Err(_) => tracing::warn!(
                            "Event deliverer timed out registering its routes; retrying."
                        ),
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %db::describe(&e), "Event deliverer cannot reach the database; retrying.")
                }
                Err(_) => tracing::warn!("Event deliverer timed out connecting; retrying."),
            }
        }
        if self.listener.is_none() {
            match tokio::time::timeout(DB_TIMEOUT, listen(&url, self.notified.clone())).await {
                Ok(Ok(c)) => {
                    self.listener = Some(c);
                    // Whatever was notified while nobody listened.
                    self.mark_more();
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %db::describe(&e), "Event deliverer cannot listen for events; polling meanwhile.")
                }
                Err(_) => tracing::warn!("Event deliverer timed out listening; polling meanwhile."),
            }
        }
        if self.client.is_none() || self.listener.is_none() {
            self.next_connect = Instant::now() + DB_RETRY;
        }
    }

    fn db_failed(&mut self, e: &tokio_postgres::Error, doing: &str) {
        tracing::warn!(error = %db::describe(e), "Event deliverer: database error {doing}; will retry.");
        if e.is_closed() || e.code().is_none() {
            self.client = None;
            self.next_connect = Instant::now() + DB_RETRY;
        }
    }

    fn db_timed_out(&mut self, doing: &str) {
        tracing::warn!("Event deliverer: database timed out {doing}; reconnecting.");
        self.client = None;
        self.next_connect = Instant::now() + DB_RETRY;
    }

    /// Takes or renews route `i`'s lease when due, saving its cursor.
    async fn lease(&mut self, i: usize) {
        let now = Instant::now();
        let r = &mut self.routes[i];
        if let Some(until) = r.lease_until {
            if now >= until {
                tracing::warn!(route = %r.route.name, "Event route lease ran out before it was renewed; its deliveries stop here.");
                r.lose();
            }
        }
        if now < r.next_renewal {
            return;
        }
        let Some(c) = self.client.as_ref() else {
            return;
        };
        let ttl = self.cfg.lease_ttl;
        let ttl_ms = ttl.as_millis() as i64;
        let (name, owner) = (r.route.name.clone(), self.cfg.gateway_id.clone());
        r.next_renewal = now + ttl / 4;
        if r.held() {
            let cursor = r.cursor;
            let result = tokio::time::timeout(
                DB_TIMEOUT,
                outbox::renew_lease(c, &name, &owner, ttl_ms, cursor),
            )
            .await;
            match result {
                Ok(Ok(true)) => {
                    r.lease_until = Some(now + ttl);
                    r.saved = cursor;
                    r.last_save = now;
                }
                Ok(Ok(false)) => {
                    tracing::warn!(route = %name, "Event route lease lost to another gateway.");
                    r.lose();
                }
                Ok(Err(e)) => {
                    r.next_renewal = now + ttl / 16;
                    self.db_failed(&e, "renewing a route lease");
                }
                Err(_) => {
                    r.next_renewal = now + ttl / 16;
                    self.db_timed_out("renewing a route lease");
                }
            }
        } else {
            let result =
                tokio::time::timeout(DB_TIMEOUT, outbox::take_lease(c, &name, &owner, ttl_ms))
                    .await;
            match result {
                Ok(Ok(Some(cursor))) => {
                    tracing::info!(route = %name, cursor = ?cursor, "Event route lease taken.");
                    r.take(cursor, now + ttl);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => self.db_failed(&e, "taking a route lease"),
                Err(_) => self.db_timed_out("taking a route lease"),
            }
        }
    }

    /// Reads more of route `i`'s events when it may have some and its window has room.
    async fn read(&mut self, i: usize) {
        let now = Instant::now();
        let window = self.cfg.window;
        let r = &mut self.routes[i];
        if !r.held() {
            return;
        }
        if r.repoll_at.is_some_and(|t| now >= t) {
            r.repoll_at = None;
            r.more = true;
        }
        if !r.wants_read(window) {
            return;
        }
        let room = window.saturating_sub(r.window.len());
        let Some(c) = self.client.as_ref() else {
            return;
        };
        let (after, regex) = (r.read_pos, r.regex.clone());
        let result =
            tokio::time::timeout(DB_TIMEOUT, outbox::fetch(c, after, &regex, room as i64)).await;
        match result {
            Ok(Ok(f)) => {
                let full = f.events.len() == room;
                r.add(f.events);
                if !full {
                    // Everything below the horizon is read: the next read starts there.
                    let horizon = (f.horizon - 1, i64::MAX);
                    if horizon > r.read_pos {
                        r.read_pos = horizon;
                    }
                    r.advance();
                    r.more = false;
                    if f.beyond_horizon {
                        r.repoll_at = Some(now + REPOLL);
                    }
                }
            }
            Ok(Err(e)) => {
                // Not again at once: after the reconnect pause.
                r.more = false;
                r.repoll_at = Some(now + DB_RETRY);
                self.db_failed(&e, "reading events");
            }
            Err(_) => {
                r.more = false;
                r.repoll_at = Some(now + DB_RETRY);
                self.db_timed_out("reading events");
            }
        }
    }

    /// Starts as many of route `i`'s ready events as its concurrency and its lease allow.
    fn send(&mut self, i: usize) {
        let now = Instant::now();
        let (concurrency, timeout) = (self.cfg.concurrency, self.cfg.request_timeout);
        let r = &mut self.routes[i];
        let Some(until) = r.lease_until else {
            return;
        };
        // Stopping: only the events behind the last one delivered, so the cursor can pass
        // it (whatever stays beyond the cursor would be sent again by the next holder).
        let frontier = if self.draining {
            match r.window.iter().rev().find(|(_, s)| s.delivered) {
                Some((k, _)) => Some(*k),
                None => return,
            }
        } else {
            None
        };
        while let Some(Reverse((t, _))) = r.backoff.peek() {
            if *t > now {
                break;
            }
            let Reverse((_, imei)) = r.backoff.pop().expect("peeked");
            r.ready.push_back(imei);
        }
        // A request must end (at the latest by its timeout) while the lease is ours, so that
        // no other gateway sends the same route's events meanwhile.
        if now + timeout + Duration::from_secs(1) >= until {
            return;
        }
        let mut skipped = Vec::new();
        while r.in_flight < concurrency {
            let Some(imei) = r.ready.pop_front() else {
                break;
            };
            let Some(&key) = r.queues.get(&imei).and_then(VecDeque::front) else {
                continue;
            };
            if frontier.is_some_and(|f| key > f) {
                // Kept for a later pass: the frontier may move past it.
                skipped.push(imei);
                continue;
            }
            let slot = r
                .window
                .get_mut(&key)
                .expect("queued events are in the window");
            if slot.attempts > 0 {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            slot.attempts += 1;
            let fut = r.route.destination.deliver(&slot.event);
            let generation = r.generation;
            r.in_flight += 1;
            self.in_flight.push(Box::pin(async move {
                Attempt {
                    route: i,
                    generation,
                    key,
                    imei,
                    result: fut.await,
                }
            }));
        }
        r.ready.extend(skipped);
    }

    /// An attempt ended.
    fn finished(&mut self, a: Attempt) {
        let (retry_min, retry_max) = (self.cfg.retry_min, self.cfg.retry_max);
        let r = &mut self.routes[a.route];
        if a.generation != r.generation {
            return;
        }
        r.in_flight -= 1;
        match a.result {
            Ok(()) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                if let Some(s) = r.window.get_mut(&a.key) {
                    s.delivered = true;
                }
                let q = r
                    .queues
                    .get_mut(&a.imei)
                    .expect("a queue per device in flight");
                q.pop_front();
                if q.is_empty() {
                    r.queues.remove(&a.imei);
                } else {
                    r.ready.push_back(a.imei);
                }
                r.advance();
            }
            Err(e) => {
                self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                let attempts = r.window.get(&a.key).map_or(1, |s| s.attempts);
                let pause = retry_min
                    .saturating_mul(1 << (attempts - 1).min(20))
                    .min(retry_max);
                // Logged at the first failure and then ever more rarely (1, 2, 4, 8, ...).
                if attempts.is_power_of_two() {
                    tracing::warn!(route = %r.route.name, event = a.key.1, imei = a.imei, attempts, retry_in = ?pause, error = %e, "Event not delivered; will retry.");
                }
                r.backoff.push(Reverse((Instant::now() + pause, a.imei)));
            }
        }
    }

    /// Saves route `i`'s cursor if it moved (at most every [`SAVE_EVERY`]); this renews the
    /// lease too.
    async fn save(&mut self, i: usize) {
        let r = &self.routes[i];
        if r.held() && r.cursor != r.saved && Instant::now() >= r.last_save + SAVE_EVERY {
            self.routes[i].next_renewal = Instant::now();
            self.lease(i).await;
        }
    }

    /// Lets what is in flight finish, and sends the events still behind one already
    /// delivered (events of several devices go at once, so a later one may be answered before
    /// an earlier one is sent), without retries, for at most the request timeout plus a
    /// second; then saves the cursors and releases the leases. With the receivers answering,
    /// the cursor then covers everything delivered and the next holder sends nothing twice.
    async fn shut_down(&mut self) {
        self.draining = true;
        for r in &mut self.routes {
            r.backoff.clear();
        }
        let deadline = Instant::now() + self.cfg.request_timeout + Duration::from_secs(1);
        loop {
            for i in 0..self.routes.len() {
                self.send(i);
            }
            if self.in_flight.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline.into(), self.in_flight.next()).await {
                Ok(Some(a)) => {
                    self.finished(a);
                    // No retries now.
                    for r in &mut self.routes {
                        r.backoff.clear();
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        let Some(c) = self.client.as_ref() else {
            return;
        };
        for r in &mut self.routes {
            if !r.held() {
                continue;
            }
            let (name, cursor) = (r.route.name.clone(), r.cursor);
            match tokio::time::timeout(
                DB_TIMEOUT,
                outbox::release_lease(c, &name, &self.cfg.gateway_id, cursor),
            )
            .await
            {
                Ok(Ok(_)) => {
                    tracing::info!(route = %name, cursor = ?cursor, "Event route lease released.")
                }
                Ok(Err(e)) => {
                    tracing::warn!(route = %name, error = %db::describe(&e), "Could not release an event route lease; it expires by itself.")
                }
                Err(_) => {
                    tracing::warn!(route = %name, "Releasing an event route lease timed out; it expires by itself.")
                }
            }
            r.lose();
        }
        self.gauges();
    }
}

/// A connection that `LISTEN`s on [`CHANNEL`]; each notification pokes `notified` (pokes
/// fold into one: a read after it sees everything committed before it).
async fn listen(url: &str, notified: Arc<Notify>) -> Result<Client, tokio_postgres::Error> {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => notified.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "Event listening connection ended.");
                    break;
                }
            }
        }
        // The client sees the connection closed and the deliverer opens another.
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(client)
}
