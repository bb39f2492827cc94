//! `fleetgate serve` and `fleetgate migrate`: the main thread. Binds the API socket, starts the
//! database (managed or external), applies migrations, starts the writer threads, the
//! housekeeper thread, one glommio executor per shard and then the control thread (API and
//! command dispatch), waits for SIGTERM/SIGINT (or a thread that dies), then stops them in
//! reverse order: the control thread, shards (stop accepting, commit and ack what is in
//! flight, close), the housekeeper, the writer (drained until the shutdown deadline), then the
//! managed PostgreSQL.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::channel::mpsc;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::{Config, DevicePolicyKind};
use crate::control::metrics::ShardGauges;
use crate::control::ControlLinks;
use crate::db;
use crate::executor::ShardSpec;
use crate::housekeeper::{self, HousekeeperConfig};
use crate::pg::{ManagedPostgres, PgOptions};
use crate::policy::{DevicePolicy, TelemetryPolicy};
use crate::shard::budget::ByteBudget;
use crate::shard::{ShardLinks, ShardMsg, ShardStats};
use crate::sink::writer::{self, WriterConfig};
use crate::supervise::OnExit;

/// How long a shard may take to bind and report ready.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the control thread may take to stop (its requests in progress get 2 s).
const CONTROL_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the housekeeper maintains the daily partitions.
const PARTITIONS_EVERY: Duration = Duration::from_secs(3600);

/// The database `serve` talks to: an external URL, or a managed PostgreSQL it stops on exit.
struct Database {
    url: String,
    _managed: Option<ManagedPostgres>,
}

fn open_database(cfg: &Config) -> anyhow::Result<Database> {
    if !cfg.database_url.is_empty() {
        return Ok(Database {
            url: cfg.database_url.clone(),
            _managed: None,
        });
    }
    let pg = ManagedPostgres::start(&cfg.data_dir, &PgOptions::default()).with_context(|| {
        format!(
            "starting the managed PostgreSQL in {}",
            cfg.data_dir.display()
        )
    })?;
    tracing::info!(data_dir = %cfg.data_dir.display(), port = pg.port(), "Managed PostgreSQL running.");
    Ok(Database {
        url: pg.connection_string(),
        _managed: Some(pg),
    })
}

/// Migrations, partitions, and the first allow-list load, before anything is accepted.
fn prepare_database(
    rt: &tokio::runtime::Runtime,
    url: &str,
    cfg: &Config,
    policy: &DevicePolicy,
) -> anyhow::Result<()> {
    rt.block_on(async {
        let mut client = db::connect(url)
            .await
            .map_err(|e| anyhow!("connecting to PostgreSQL: {}", db::describe(&e)))?;
        crate::pg::migrate(&mut client).await?;
        db::maintain_partitions(&client, cfg.partitions_ahead_days, cfg.retention_days)
            .await
            .map_err(|e| anyhow!("maintaining the partitions: {}", db::describe(&e)))?;
        if policy.kind() == DevicePolicyKind::AllowList {
            let allowed = db::load_allow_list(&client)
                .await
                .map_err(|e| anyhow!("loading the allow-list: {}", db::describe(&e)))?;
            policy.set_allowed(allowed);
        }
        anyhow::Ok(())
    })
}

/// `fleetgate migrate`: apply the migrations and exit.
///
/// # Errors
/// The database cannot be started or reached, or a migration fails.
pub fn migrate_only(cfg: &Config) -> anyhow::Result<()> {
    let db = open_database(cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    prepare_database(
        &rt,
        &db.url,
        cfg,
        &DevicePolicy::new(DevicePolicyKind::Open),
    )?;
    println!("migrations applied");
    Ok(())
}

/// The device address `serve` will bind its shards to; for port 0, with the sockets that keep
/// the port it picked until the shards have bound it.
pub struct DevicePort {
    pub addr: SocketAddr,
    /// A TCP socket (bound, not listening: it takes no connection) and a UDP socket on the
    /// port, both SO_REUSEADDR and SO_REUSEPORT so that the shards' sockets bind beside them.
    /// Dropped once the shards are up, before anyone is told the port.
    _hold: Option<(socket2::Socket, socket2::Socket)>,
}

/// Picks the device port and refuses one that is already served: SO_REUSEPORT would
/// otherwise let a second gateway bind it and split the traffic silently. A plain bind (no
/// SO_REUSEPORT) fails while any listener holds the port.
///
/// Port 0 (any) is held, not probed: a port picked and let go could be taken by another
/// socket before the shards bind it, and the UDP port of the TCP port picked may be in use;
/// then another port is picked.
pub fn reserve_device_port(host: IpAddr, port: u16) -> anyhow::Result<DevicePort> {
    let in_use = |proto: &str, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("device port {port}/{proto} on {host} is already in use (another gateway?); stop it or pass another --device-port")
        } else {
            anyhow!("cannot bind device port {port}/{proto} on {host}: {e}")
        }
    };
    if port == 0 {
        return hold_any_port(host);
    }
    let tcp = std::net::TcpListener::bind((host, port)).map_err(|e| in_use("tcp", e))?;
    let addr = tcp.local_addr()?;
    let udp = std::net::UdpSocket::bind(addr).map_err(|e| in_use("udp", e))?;
    drop((tcp, udp));
    Ok(DevicePort { addr, _hold: None })
}

/// A port free for both TCP and UDP on `host`, held (see [`DevicePort`]).
fn hold_any_port(host: IpAddr) -> anyhow::Result<DevicePort> {
    use socket2::{Domain, Protocol, Socket, Type};
    let any = SocketAddr::new(host, 0);
    let domain = Domain::for_address(any);
    let cannot = |e: std::io::Error| anyhow!("cannot bind a device port on {host}: {e}");
    for _ in 0..32 {
        let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(cannot)?;
        tcp.set_reuse_address(true).map_err(cannot)?;
        tcp.set_reuse_port(true).map_err(cannot)?;
        tcp.bind(&any.into()).map_err(cannot)?;
        let addr = tcp
            .local_addr()
            .map_err(cannot)?
            .as_socket()
            .ok_or_else(|| anyhow!("cannot bind a device port on {host}: no address"))?;
        let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(cannot)?;
        udp.set_reuse_address(true).map_err(cannot)?;
        udp.set_reuse_port(true).map_err(cannot)?;
        match udp.bind(&addr.into()) {
            Ok(()) => {
                return Ok(DevicePort {
                    addr,
                    _hold: Some((tcp, udp)),
                })
            }
            // Its UDP twin is taken: another port.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(cannot(e)),
        }
    }
    bail!("cannot find a port free for both TCP and UDP on {host}")
}

/// `fleetgate serve`.
///
/// # Errors
/// Start-up failures (database, port, a shard that cannot bind) and a shard that dies.
pub fn serve(cfg: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    // Before anything opens a descriptor: raise the soft limits if the hard ones allow, say so
    // loudly if the connection cap still cannot be met, and stop here if the shards could not
    // start their io_uring.
    crate::limits::check_descriptors(&cfg);
    crate::limits::check_memlock(&cfg).map_err(|e| anyhow!(e))?;
    let cfg = Arc::new(cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // First of all: from here on SIGTERM/SIGINT are recorded instead of killing us, so a stop
    // during initdb or migrations cannot leave the managed PostgreSQL running.
    let mut signals = StopSignals::register(&rt)?;
    // The API's socket and keys before anything that takes time: a port in use, or an API
    // open to the network without keys, stops `serve` here.
    let api = crate::control::ApiListener::bind(&cfg)?;
    let db = open_database(&cfg)?;
    // Returning drops `db`, which stops the managed PostgreSQL.
    if stop_requested(&mut signals, &rt, "starting the database") {
        return Ok(());
    }
    let policy = Arc::new(DevicePolicy::new(cfg.device_policy));
    prepare_database(&rt, &db.url, &cfg, &policy)?;
    // The last step that takes time before the writer and the shards start; from then on
    // `wait_for_stop` sees a signal, also one that came while they started.
    if stop_requested(&mut signals, &rt, "applying the migrations") {
        return Ok(());
    }
    let device_port = reserve_device_port(cfg.device_host, cfg.device_port)?;
    let device_addr = device_port.addr;

    let nr_shards = cfg.shards;
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel::<Exit>();
    let writer_exit = exit_tx.clone();
    let writer = writer::spawn(
        WriterConfig {
            database_url: db.url.clone(),
            connections: cfg.writer_connections,
            batch_max_records: cfg.batch_max_records,
            batch_max_delay: cfg.batch_max_delay(),
            max_session_events_queued: cfg.max_session_events_queued,
        },
        move || {
            let _ = writer_exit.send(Exit::Writer);
        },
    )?;
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..nr_shards)
        .map(|_| mpsc::unbounded::<ShardMsg>())
        .unzip();
    let inboxes = Arc::new(senders);
    let policy_inboxes = inboxes.clone();
    // Shards report on it from their start; the control thread reads it once they are up.
    let (control_tx, control_rx) = crate::control::channel();
    let telemetry = Arc::new(TelemetryPolicy::new(cfg.telemetry_events));
    let housekeeper = housekeeper::spawn(
        HousekeeperConfig {
            database_url: db.url.clone(),
            partitions_ahead_days: cfg.partitions_ahead_days,
            retention_days: cfg.retention_days,
            partitions_every: PARTITIONS_EVERY,
            allow_list_reload: Duration::from_secs(cfg.allow_list_reload_s),
        },
        policy.clone(),
        telemetry.clone(),
        // New logins are checked against the new set already; each shard ends the live
        // sessions of devices it no longer admits.
        move || {
            for tx in policy_inboxes.iter() {
                let _ = tx.unbounded_send(ShardMsg::PolicyChanged);
            }
        },
    )?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut shards = Vec::new();
    // What the control thread reads of each shard (its counters and byte budget).
    let mut shard_gauges = Vec::new();
    for (shard_id, inbox) in receivers.into_iter().enumerate() {
        let gauges = ShardGauges {
            stats: Arc::new(ShardStats::default()),
            budget: ByteBudget::new(cfg.max_bytes_in_flight_per_shard),
        };
        shard_gauges.push(gauges.clone());
        let spec = ShardSpec {
            links: ShardLinks {
                id: shard_id,
                nr_shards,
                config: cfg.clone(),
                inboxes: inboxes.clone(),
                writer: writer.sender(),
                control: control_tx.clone(),
                policy: policy.clone(),
                telemetry: telemetry.clone(),
                stats: gauges.stats,
                budget: gauges.budget,
            },
            device_addr,
            inbox,
        };
        let (ready, exit, timeout) = (ready_tx.clone(), exit_tx.clone(), cfg.shutdown_timeout());
        let placement = if cfg.pin_cpus {
            Placement::Fixed(shard_id % ncpu)
        } else {
            Placement::Unbound
        };
        let handle = LocalExecutorBuilder::new(placement)
            .ring_depth(crate::executor::RING_DEPTH)
            .name(&format!("shard-{shard_id}"))
            .spawn(move || async move {
                // Sent however the thread ends, a panic included: a dead shard is never silent.
                let _exit = OnExit(Some(move || {
                    let _ = exit.send(Exit::Shard(shard_id, std::thread::panicking()));
                }));
                crate::executor::run(spec, ready, timeout).await;
            })
            .map_err(|e| anyhow!("starting shard {shard_id}: {e}"))?;
        shards.push(handle);
    }
    drop(ready_tx);

    let mut start_error = None;
    let mut shards_exited = 0;
    for _ in 0..nr_shards {
        match ready_rx.recv_timeout(SHARD_START_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                start_error = Some(anyhow!(e));
                break;
            }
            Err(_) => {
                start_error = Some(anyhow!(
                    "a shard did not start within {SHARD_START_TIMEOUT:?}"
                ));
                break;
            }
        }
    }
    // Every shard has bound the port (or failed to): it needs holding no longer.
    drop(device_port);

    // The control thread, once the shards' inboxes are served.
    let control = match start_error {
        Some(e) => Err(e),
        None => {
            let control_exit = exit_tx.clone();
            crate::control::spawn(
                api,
                ControlLinks {
                    config: cfg.clone(),
                    database_url: db.url.clone(),
                    control_rx,
                    inboxes: inboxes.clone(),
                    shards: shard_gauges,
                    writer: writer.stats.clone(),
                    started,
                },
                move || {
                    let _ = control_exit.send(Exit::Control);
                },
            )
            .map_err(anyhow::Error::from)
        }
    };
    drop(exit_tx);

    let (control, stop_reason) = match control {
        Err(e) => (None, Err(e)),
        Ok(control) => {
            println!(
                "ready device_addr={device_addr} shards={nr_shards} api_addr={}",
                control.addr()
            );
            tracing::info!(%device_addr, shards = nr_shards, "fleetgate ready.");
            let stop_reason = rt.block_on(wait_for_stop(
                &mut signals,
                &mut exit_rx,
                &mut shards_exited,
            ));
            (Some(control), stop_reason)
        }
    };
    // A writer that died on a fatal database error says which.
    let stop_reason = stop_reason.map_err(|e| match writer.fatal_error() {
        Some(fatal) => anyhow!("{e}: {fatal}"),
        None => e,
    });

    // Stop in reverse order of start: the control thread (no more API requests or commands
    // into the shards), shards, then the writer, then the database. Each shard ends within its
    // shutdown timeout (it aborts what is left then); a shard that does not is left behind,
    // logged, rather than waited for.
    let deadline = Instant::now() + cfg.shutdown_timeout() + Duration::from_secs(2);
    if let Some(control) = control {
        control.stop(Instant::now() + CONTROL_STOP_TIMEOUT);
    }
    for tx in inboxes.iter() {
        let _ = tx.unbounded_send(ShardMsg::Shutdown);
    }
    let mut running = nr_shards - shards_exited;
    let stuck = rt.block_on(async {
        while running > 0 {
            match tokio::time::timeout_at(deadline.into(), exit_rx.recv()).await {
                Ok(Some(Exit::Shard(..))) => running -= 1,
                Ok(Some(Exit::Writer | Exit::Control)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        running
    });
    if stuck > 0 {
        tracing::error!(
            shards = stuck,
            "Shards did not stop by the shutdown deadline; leaving them."
        );
    } else {
        // Every shard's body has ended (a panic was reported as it happened): this is quick.
        for h in shards {
            let _ = h.join();
        }
    }
    housekeeper.stop();
    if !writer.close(deadline) {
        tracing::error!("Writer did not flush before the shutdown deadline; unacked records will be resent by the devices.");
        stop_reason?;
        bail!("shutdown deadline passed before the writer flushed");
    }
    tracing::info!("fleetgate stopped.");
    drop(db);
    stop_reason
}

/// A thread of the gateway that ended.
enum Exit {
    /// A shard thread, and whether it panicked.
    Shard(usize, bool),
    Writer,
    Control,
}

/// SIGTERM and SIGINT, caught from the start of `serve` on: installing the handlers replaces
/// the default action (exit at once), and a signal that arrives before anybody waits for it is
/// kept until it is asked for.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// # Errors
    /// The handlers cannot be installed.
    fn register(rt: &tokio::runtime::Runtime) -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        // The signal streams belong to the runtime whose driver feeds them.
        let _rt = rt.enter();
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
        })
    }

    /// Waits for either signal; its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// The signal received so far, if any, without waiting.
    fn pending(&mut self, rt: &tokio::runtime::Runtime) -> Option<&'static str> {
        rt.block_on(async {
            tokio::select! {
                biased;
                name = self.recv() => Some(name),
                // A delivered signal reaches the streams only when the runtime's driver runs;
                // `yield_now` lets it run once before `recv` is polled again.
                () = tokio::task::yield_now() => None,
            }
        })
    }
}

/// Whether a stop was asked for during start-up, by the step `after` at the latest (logged).
fn stop_requested(signals: &mut StopSignals, rt: &tokio::runtime::Runtime, after: &str) -> bool {
    match signals.pending(rt) {
        Some(name) => {
            tracing::info!(
                signal = name,
                after,
                "Stop requested during start-up: stopping."
            );
            true
        }
        None => false,
    }
}

/// Waits for SIGTERM or SIGINT (`Ok`), or for a shard or the writer that ends on its own (`Err`).
async fn wait_for_stop(
    signals: &mut StopSignals,
    exit_rx: &mut tokio::sync::mpsc::UnboundedReceiver<Exit>,
    shards_exited: &mut usize,
) -> anyhow::Result<()> {
    tokio::select! {
        name = signals.recv() => { tracing::info!("{name}: shutting down."); Ok(()) }
        exit = exit_rx.recv() => Err(match exit {
            Some(Exit::Shard(id, panicked)) => {
                *shards_exited += 1;
                if panicked {
                    anyhow!("shard {id} panicked; stopping rather than dropping its devices silently")
                } else {
                    anyhow!("shard {id} stopped unexpectedly")
                }
            }
            Some(Exit::Control) => anyhow!("the control thread stopped unexpectedly"),
            _ => anyhow!("the writer thread stopped unexpectedly"),
        }),
    }
}
