//! The housekeeper thread: database upkeep that runs on a clock, not on traffic. Its own OS
//! thread, its own tokio current-thread runtime and its own database connection (reconnecting
//! with back-off), so that a gateway no device is allowed into still learns of a newly enabled
//! device, and tomorrow's partition exists whether or not anything was written today.
//!
//! - Partition upkeep ([`crate::db::maintain_partitions`]) every `partitions_every` (hourly in
//!   `serve`): creates the days ahead, drops those past retention.
//! - Under the `allow_list` policy, the allow-list is reloaded every `allow_list_reload`; when
//!   the set of enabled devices changed, `on_allow_list_change` is called (from this thread).
//! - Under `telemetry_events = "opted_in"` , the
//!   devices opted in to telemetry events are reloaded on the same period, the first time at
//!   once.
//!
//! `serve` has done both once before it starts the housekeeper, so the first round is one
//! period after the start. A failed round is logged and tried again after a short back-off;
//! the last allow-list stays in force meanwhile. Every wait and every query races the stop
//! signal, so [`Housekeeper::stop`] returns promptly even while the database hangs.

use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::DevicePolicyKind;
use crate::config::TelemetryEventsKind;
use crate::db;
use crate::policy::{DevicePolicy, TelemetryPolicy};

/// Settings of the housekeeper.
#[derive(Clone, Debug)]
pub struct HousekeeperConfig {
    pub database_url: String,
    /// Daily telemetry partitions created ahead of today.
    pub partitions_ahead_days: i32,
    /// Days of telemetry kept (0: forever).
    pub retention_days: i32,
    /// How often partitions are maintained.
    pub partitions_every: Duration,
    /// How often the allow-list is re-read (only under the `allow_list` policy).
    pub allow_list_reload: Duration,
}

/// A running housekeeper thread; stopped by [`Housekeeper::stop`] or on drop.
pub struct Housekeeper {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Housekeeper {
    /// Tells the thread to stop and waits for it (promptly: it is interrupted mid-wait or
    /// mid-query).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("The housekeeper thread panicked.");
            }
        }
    }
}

impl Drop for Housekeeper {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Starts the housekeeper thread. `on_allow_list_change` is called on that thread after each
/// reload that changed the set of enabled devices; `telemetry`'s opted-in set (when its kind
/// is `opted_in`) is kept in step with `devices.telemetry_events` on the same period.
///
/// # Errors
/// The thread or its runtime cannot be created.
pub fn spawn(
    cfg: HousekeeperConfig,
    policy: Arc<DevicePolicy>,
    telemetry: Arc<TelemetryPolicy>,
    on_allow_list_change: impl Fn() + Send + 'static,
) -> std::io::Result<Housekeeper> {
    let telemetry = Some(telemetry).filter(|t| t.kind() == TelemetryEventsKind::OptedIn);
    let (stop, stop_rx) = watch::channel(false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("fleetgate-housekeeper".into())
        .spawn(move || {
            let hk = Keeper {
                cfg,
                policy,
                telemetry,
                on_change: Box::new(on_allow_list_change),
                stop: stop_rx,
                client: None,
                backoff: BACKOFF_MIN,
            };
            rt.block_on(hk.run());
            tracing::info!("Housekeeper stopped.");
        })?;
    Ok(Housekeeper {
        stop,
        thread: Some(thread),
    })
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The thread's state.
struct Keeper {
    cfg: HousekeeperConfig,
    policy: Arc<DevicePolicy>,
    /// Under `opted_in` only.
    telemetry: Option<Arc<TelemetryPolicy>>,
    on_change: Box<dyn Fn() + Send>,
    stop: watch::Receiver<bool>,
    client: Option<Client>,
    backoff: Duration,
}

/// Why a round ended early.
enum Interrupted {
    Stopped,
    Failed,
}

impl Keeper {
    async fn run(mut self) {
        let allow_list = self.policy.kind() == DevicePolicyKind::AllowList;
        let opt_in = self.telemetry.is_some();
        let start = Instant::now();
        let mut next_partitions = start + self.cfg.partitions_every;
        let mut next_allow_list = start + self.cfg.allow_list_reload;
        // `serve` loads the allow-list before the start, not the opt-in set: at once.
        let mut next_opt_in = start;
        loop {
            let mut due = next_partitions;
            if allow_list {
                due = due.min(next_allow_list);
            }
            if opt_in {
                due = due.min(next_opt_in);
            }
            if self
                .or_stop(tokio::time::sleep_until(due.into()))
                .await
                .is_none()
            {
                return;
            }
            let now = Instant::now();
            if now >= next_partitions {
                match self.maintain_partitions().await {
                    Ok(()) => next_partitions = now + self.cfg.partitions_every,
                    Err(Interrupted::Stopped) => return,
                    Err(Interrupted::Failed) => next_partitions = self.retry_at(),
                }
            }
            if allow_list && now >= next_allow_list {
                match self.reload_allow_list().await {
                    Ok(()) => next_allow_list = now + self.cfg.allow_list_reload,
                    Err(Interrupted::Stopped) => return,
                    Err(Interrupted::Failed) => next_allow_list = self.retry_at(),
                }
            }
            if opt_in && now >= next_opt_in {
                match self.reload_telemetry_opt_in().await {
                    Ok(()) => next_opt_in = now + self.cfg.allow_list_reload,
                    Err(Interrupted::Stopped) => return,
                    Err(Interrupted::Failed) => next_opt_in = self.retry_at(),
                }
            }
        }
    }

    /// When to try a failed round again: after the back-off, which doubles up to a cap.
    fn retry_at(&mut self) -> Instant {
        let at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        at
    }

    /// Runs `fut` unless the stop signal comes first (`None`).
    async fn or_stop<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        if *self.stop.borrow_and_update() {
            return None;
        }
        tokio::select! {
            out = fut => Some(out),
            // A change, or the handle gone: either way, stop.
            _ = self.stop.changed() => None,
        }
    }

    /// The connection, opened if needed.
    async fn client(&mut self) -> Result<(), Interrupted> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_some() {
            return Ok(());
        }
        let url = self.cfg.database_url.clone();
        match self.or_stop(db::connect(&url)).await {
            None => Err(Interrupted::Stopped),
            Some(Ok(c)) => {
                tracing::debug!("Housekeeper connected to the database.");
                self.client = Some(c);
                Ok(())
            }
            Some(Err(e)) => {
                tracing::warn!(error = %db::describe(&e), "Housekeeper cannot reach the database; retrying.");
                Err(Interrupted::Failed)
            }
        }
    }

    async fn maintain_partitions(&mut self) -> Result<(), Interrupted> {
        self.client().await?;
        let client = self.client.take().expect("connected");
        let (ahead, retention) = (self.cfg.partitions_ahead_days, self.cfg.retention_days);
        let result = self
            .or_stop(db::maintain_partitions(&client, ahead, retention))
            .await;
        self.client = Some(client);
        match result {
            None => Err(Interrupted::Stopped),
            Some(Ok(_)) => {
                self.backoff = BACKOFF_MIN;
                Ok(())
            }
            Some(Err(e)) => {
                let error = db::describe(&e);
                tracing::warn!(%error, "Partition maintenance failed; trying again soon.");
                Err(Interrupted::Failed)
            }
        }
    }

    async fn reload_allow_list(&mut self) -> Result<(), Interrupted> {
        self.client().await?;
        let client = self.client.take().expect("connected");
        let result = self.or_stop(db::load_allow_list(&client)).await;
        self.client = Some(client);
        match result {
            None => Err(Interrupted::Stopped),
            Some(Ok(set)) => {
                self.backoff = BACKOFF_MIN;
                let devices = set.len();
                if self.policy.set_allowed(set) {
                    tracing::info!(devices, "Allow-list changed.");
                    (self.on_change)();
                }
                Ok(())
            }
            Some(Err(e)) => {
                tracing::warn!(error = %db::describe(&e), "Allow-list reload failed; keeping the last one.");
                Err(Interrupted::Failed)
            }
        }
    }

    async fn reload_telemetry_opt_in(&mut self) -> Result<(), Interrupted> {
        self.client().await?;
        let client = self.client.take().expect("connected");
        let result = self.or_stop(db::load_telemetry_opt_in(&client)).await;
        self.client = Some(client);
        match result {
            None => Err(Interrupted::Stopped),
            Some(Ok(set)) => {
                self.backoff = BACKOFF_MIN;
                let devices = set.len();
                let policy = self
                    .telemetry
                    .as_ref()
                    .expect("reloaded only under opted_in");
                if policy.set_opted_in(set) {
                    tracing::info!(devices, "Devices opted in to telemetry events changed.");
                }
                Ok(())
            }
            Some(Err(e)) => {
                tracing::warn!(error = %db::describe(&e), "Reloading the telemetry opt-in failed; keeping the last set.");
                Err(Interrupted::Failed)
            }
        }
    }
}
