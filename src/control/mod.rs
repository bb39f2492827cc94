//! The control plane: the admin/command API, the command ledger and dispatcher, event delivery
//! (webhooks) and metrics. Runs on its own thread (a tokio current-thread runtime), talks to
//! shards by message: it sends [`crate::shard::ShardMsg`]s to their inboxes, they answer on
//! oneshot channels or report through the [`ControlTx`] they were given.

pub mod api;
pub mod commands;
pub mod events;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::protocol::Imei;
use crate::shard::ShardMsg;
use crate::sink::writer::WriterStats;

use api::auth::ApiKeys;
use commands::{Commands, CommandsConfig};
use metrics::{Gauges, ShardGauges};

/// What shards report to the control thread.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlMsg {
    /// A device logged in on this gateway (its owning shard).
    DeviceOnline { imei: Imei, shard: usize },
    /// A device's session ended (and no newer connection replaced it).
    DeviceOffline { imei: Imei },
    /// Command `id` was handed to the device's socket.
    CommandSent { id: i64, imei: Imei },
    /// Command `id` was not sent (the device is not connected here, has a command in flight,
    /// or is ending), or was in flight when its session ended: it may be sent again.
    CommandUndelivered { id: i64, imei: Imei },
    /// The device answered command `id`: a response (`refused: false`) or a Codec 14 refusal.
    CommandAnswered {
        id: i64,
        imei: Imei,
        refused: bool,
        text: String,
    },
    /// Command `id` got no answer within the command timeout.
    CommandTimedOut { id: i64, imei: Imei },
}

/// The shards' side of the control channel: never blocks (unbounded: shards send a few
/// messages per session and per command, all bounded by sessions and commands in flight).
pub type ControlTx = mpsc::UnboundedSender<ControlMsg>;
/// The control thread's side.
pub type ControlRx = mpsc::UnboundedReceiver<ControlMsg>;

/// A new control channel.
pub fn channel() -> (ControlTx, ControlRx) {
    mpsc::unbounded_channel()
}

// ===== the control thread =====

/// Connections of the control thread's pool (API queries, the ledger's transactions).
const POOL_SIZE: usize = 8;

/// Why the control thread cannot start. Each message names the option to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("API keys: {0}")]
    Keys(String),
    #[error(
        "refusing to serve the API on {0} without an API key: set api_keys or {env}, or use a \
         loopback api_addr",
        env = api::auth::ENV_VAR
    )]
    OpenWithoutKeys(SocketAddr),
    #[error("cannot bind the API address {addr} (api_addr): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("database pool: {0}")]
    Pool(String),
    #[error("{0}")]
    Routes(String),
    #[error("starting the control thread: {0}")]
    Thread(std::io::Error),
}

/// The API's socket and keys, taken at the start of `serve` (before the database), so that a
/// port in use or an API open without keys stops `serve` before anything else runs.
pub struct ApiListener {
    listener: std::net::TcpListener,
    keys: ApiKeys,
}

impl ApiListener {
    /// Reads the keys (`api_keys` and [`api::auth::ENV_VAR`]) and binds `api_addr`.
    ///
    /// # Errors
    /// A key that does not parse, no key for a non-loopback address, or the bind fails.
    pub fn bind(cfg: &Config) -> Result<ApiListener, StartError> {
        let env = std::env::var(api::auth::ENV_VAR).ok();
        let keys = ApiKeys::load(&cfg.api_keys, env.as_deref()).map_err(StartError::Keys)?;
        let addr = cfg.api_addr;
        if keys.is_empty() && !addr.ip().is_loopback() {
            return Err(StartError::OpenWithoutKeys(addr));
        }
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| StartError::Bind { addr, source })?;
        if keys.is_empty() {
            tracing::warn!(%addr, "No API key configured: every authenticated API request will be refused.");
        }
        Ok(ApiListener { listener, keys })
    }

    /// The bound address (the real port when `api_addr` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound socket has an address")
    }
}

/// What the control thread is given by `serve`: the shards' inboxes and the counters of the
/// other threads (read, never written), the control channel, the database.
pub struct ControlLinks {
    pub config: Arc<Config>,
    pub database_url: String,
    pub control_rx: ControlRx,
    pub inboxes: Arc<Vec<UnboundedSender<ShardMsg>>>,
    /// One per shard, by shard id.
    pub shards: Vec<ShardGauges>,
    pub writer: Arc<WriterStats>,
    /// When `serve` started (uptime).
    pub started: Instant,
}

/// The running control thread.
pub struct ControlHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Disconnected when the thread's body ends.
    ended: std::sync::mpsc::Receiver<()>,
}

/// Starts the control thread: the API on `api`'s socket and the command dispatcher
/// ([`commands::run`]), on one tokio current-thread runtime. `on_exit` is called on that
/// thread when it ends, however (a panic included).
///
/// # Errors
/// The pool cannot be made (a bad database URL) or the thread cannot be started.
pub fn spawn(
    api: ApiListener,
    links: ControlLinks,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<ControlHandle, StartError> {
    let addr = api.local_addr();
    let pool = crate::db::pool(&links.database_url, POOL_SIZE).map_err(StartError::Pool)?;
    let cmds = Arc::new(Commands::new(
        CommandsConfig {
            gateway: links.config.gateway_id.clone(),
            timeout: links.config.command_timeout(),
            max_attempts: links.config.command_max_attempts,
        },
        pool.clone(),
        links.inboxes.clone(),
    ));
    let deliverer = events::DelivererConfig::from_config(
        &links.config,
        links.database_url.clone(),
        links.config.gateway_id.clone(),
    )
    .map_err(|e| StartError::Routes(e.to_string()))?;
    cmds.count_events_in(deliverer.stats.clone());
    let gauges = Arc::new(Gauges::new(
        links.shards,
        links.writer,
        deliverer.stats.clone(),
        links.started,
    ));
    let (stop, stop_rx) = watch::channel(false);
    let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
    let ApiListener { listener, keys } = api;
    let state = api::Api::new(keys, cmds.clone(), pool, links.inboxes, gauges.clone());
    let (control_rx, url) = (links.control_rx, links.database_url);
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let _ended = ended_tx;
            let _exit = crate::supervise::OnExit(Some(on_exit));
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "The control thread cannot build its runtime.");
                    return;
                }
            };
            rt.block_on(run(
                listener, state, cmds, deliverer, gauges, control_rx, url, stop_rx,
            ));
        })
        .map_err(StartError::Thread)?;
    tracing::info!(%addr, "API listening.");
    Ok(ControlHandle {
        addr,
        stop,
        thread: Some(thread),
        ended,
    })
}

/// The control thread's body: the API, the dispatcher, the webhook deliverer and the rate
/// sampler until `stop`.
#[allow(clippy::too_many_arguments)]
async fn run(
    listener: std::net::TcpListener,
    state: api::Api,
    cmds: Arc<Commands>,
    deliverer: events::DelivererConfig,
    gauges: Arc<Gauges>,
    control_rx: ControlRx,
    url: String,
    stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "The API socket cannot be served.");
            return;
        }
    };
    let dispatcher = tokio::spawn(commands::run(cmds, control_rx, url, stop.clone()));
    // Also runs with no routes: it prunes delivered events.
    let deliverer = tokio::spawn(events::run_deliverer(deliverer, stop.clone()));
    let sampler = tokio::spawn(async move {
        let mut every = tokio::time::interval(metrics::SAMPLE_EVERY);
        loop {
            every.tick().await;
            gauges.sample(Instant::now());
        }
    });
    api::serve(listener, Arc::new(state), stop).await;
    sampler.abort();
    if let Err(e) = dispatcher.await {
        tracing::error!(error = %e, "The command dispatcher failed.");
    }
    if let Err(e) = deliverer.await {
        tracing::error!(error = %e, "The webhook deliverer failed.");
    }
}

impl ControlHandle {
    /// The API's address (with the real port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the API (requests in progress get a short grace) and the dispatcher, and waits
    /// for the thread until `deadline`; `false` when it had not ended by then (it is left).
    pub fn stop(mut self, deadline: Instant) -> bool {
        self.stop.send_replace(true);
        let left = deadline.saturating_duration_since(Instant::now());
        // The sender end is dropped when the thread's body ends.
        let ended = matches!(
            self.ended.recv_timeout(left.max(Duration::from_millis(1))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
        let thread = self.thread.take().expect("stopped once");
        if ended {
            if thread.join().is_err() {
                tracing::error!("The control thread panicked.");
            }
        } else {
            tracing::error!("The control thread did not stop by the deadline; leaving it.");
        }
        ended
    }
}
