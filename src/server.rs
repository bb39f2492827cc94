//! `fleetgate serve` and `fleetgate migrate`: the main thread. Starts the database (managed or
//! external), applies migrations, starts the writer threads, the housekeeper thread and one
//! glommio executor per shard, waits for SIGTERM/SIGINT (or a shard or writer that dies), then
//! stops them in reverse order: shards (stop accepting, commit and ack what is in flight,
//! close), the housekeeper, the writer (drained until the shutdown deadline), then the managed
//! PostgreSQL.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::channel::mpsc;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::{Config, DevicePolicyKind};
use crate::db;
use crate::housekeeper::{self, HousekeeperConfig};
use crate::pg::{ManagedPostgres, PgOptions};
use crate::policy::DevicePolicy;
use crate::shard::{ShardMsg, ShardSpec, ShardStats};
use crate::sink::writer::{self, WriterConfig};

/// How long a shard may take to bind and report ready.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(30);

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
        crate::pg::maintain_partitions(&client, cfg.partitions_ahead_days, cfg.retention_days)
            .await?;
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

/// Picks the device port and refuses one that is already served: SO_REUSEPORT would
/// otherwise let a second gateway bind it and split the traffic silently. A plain bind (no
/// SO_REUSEPORT) fails while any listener holds the port.
pub fn reserve_device_port(host: IpAddr, port: u16) -> anyhow::Result<SocketAddr> {
    let in_use = |proto: &str, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("device port {port}/{proto} on {host} is already in use (another gateway?); stop it or pass another --device-port")
        } else {
            anyhow!("cannot bind device port {port}/{proto} on {host}: {e}")
        }
    };
    let tcp = std::net::TcpListener::bind((host, port)).map_err(|e| in_use("tcp", e))?;
    let addr = tcp.local_addr()?;
    let udp = std::net::UdpSocket::bind(addr).map_err(|e| in_use("udp", e))?;
    drop((tcp, udp));
    Ok(addr)
}

/// `fleetgate serve`.
///
/// # Errors
/// Start-up failures (database, port, a shard that cannot bind) and a shard that dies.
pub fn serve(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let db = open_database(&cfg)?;
    let policy = Arc::new(DevicePolicy::new(cfg.device_policy));
    prepare_database(&rt, &db.url, &cfg, &policy)?;
    let device_addr = reserve_device_port(cfg.device_host, cfg.device_port)?;

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
    let housekeeper = housekeeper::spawn(
        HousekeeperConfig {
            database_url: db.url.clone(),
            partitions_ahead_days: cfg.partitions_ahead_days,
            retention_days: cfg.retention_days,
            partitions_every: PARTITIONS_EVERY,
            allow_list_reload: Duration::from_secs(cfg.allow_list_reload_s),
        },
        policy.clone(),
        // New logins are checked against the new set already; ending the sessions of devices
        // that were disabled is the shards' job, to be wired here.
        || tracing::info!("Allow-list changed; new logins are checked against it."),
    )?;

    let (senders, receivers): (Vec<_>, Vec<_>) = (0..nr_shards)
        .map(|_| mpsc::unbounded::<ShardMsg>())
        .unzip();
    let inboxes = Arc::new(senders);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut shards = Vec::new();
    for (shard_id, inbox) in receivers.into_iter().enumerate() {
        let st = Arc::new(ShardStats::default());
        let spec = ShardSpec {
            shard_id,
            nr_shards,
            config: cfg.clone(),
            device_addr,
            inboxes: inboxes.clone(),
            inbox,
            writer: writer.sender(),
            policy: policy.clone(),
            stats: st,
        };
        let (ready, exit, timeout) = (ready_tx.clone(), exit_tx.clone(), cfg.shutdown_timeout());
        let placement = if cfg.pin_cpus {
            Placement::Fixed(shard_id % ncpu)
        } else {
            Placement::Unbound
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{shard_id}"))
            .spawn(move || async move {
                crate::shard::run(spec, ready, timeout).await;
                let _ = exit.send(Exit::Shard(shard_id));
            })
            .map_err(|e| anyhow!("starting shard {shard_id}: {e}"))?;
        shards.push(handle);
    }
    drop((ready_tx, exit_tx));

    let mut start_error = None;
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

    let stop_reason = match start_error {
        Some(e) => Err(e),
        None => {
            println!(
                "ready device_addr={device_addr} shards={nr_shards} api_addr={}",
                cfg.api_addr
            );
            tracing::info!(%device_addr, shards = nr_shards, "fleetgate ready.");
            rt.block_on(wait_for_stop(&mut exit_rx))
        }
    };
    // A writer that died on a fatal database error says which.
    let stop_reason = stop_reason.map_err(|e| match writer.fatal_error() {
        Some(fatal) => anyhow!("{e}: {fatal}"),
        None => e,
    });

    // Stop in reverse order of start: shards, then the writer, then the database.
    let deadline = Instant::now() + cfg.shutdown_timeout() + Duration::from_secs(2);
    for tx in inboxes.iter() {
        let _ = tx.unbounded_send(ShardMsg::Shutdown);
    }
    for h in shards {
        if h.join().is_err() {
            tracing::error!("A shard thread panicked.");
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
    Shard(usize),
    Writer,
}

/// Waits for SIGTERM or SIGINT (`Ok`), or for a shard or the writer that ends on its own (`Err`).
async fn wait_for_stop(
    exit_rx: &mut tokio::sync::mpsc::UnboundedReceiver<Exit>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down."); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down."); Ok(()) }
        exit = exit_rx.recv() => Err(match exit {
            Some(Exit::Shard(id)) => anyhow!("shard {id} stopped unexpectedly"),
            _ => anyhow!("the writer thread stopped unexpectedly"),
        }),
    }
}
