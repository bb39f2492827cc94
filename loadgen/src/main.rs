//! loadgen: a simulated fleet of Teltonika trackers for fleetgate.
//!
//! Every device is a tokio task that connects, logs in and streams AVL frames (or UDP
//! datagrams) built with fleetgate's own codec, keeping up to `--in-flight` frames unacked and
//! timing each frame from send to ack; it answers the commands the gateway sends it. A run is
//! bounded: connection attempts are paced at `--connect-rate`, devices send for `--duration`
//! seconds once every device had its first connect token (the first `--warmup` seconds are
//! not measured), wait a few seconds for the last acks and stop; a hard cap ends the run
//! whatever happens. The report is a percentile table, or one JSON object with `--json`;
//! `--chart` draws it; `--verify-database-url` then checks that what was acked is stored.
//!
//! - `config.rs`: the resolved run configuration (also a worker's whole input).
//! - `frames.rs`: realistic records and their encoding.
//! - `device.rs`: the simulated device (TCP and UDP), its connect path and command answers.
//! - `pacing.rs`: token bucket, back-off, open-loop interval, fleet split (pure).
//! - `stats.rs`: counters and histograms; `progress.rs`: per-second samples, progress line.
//! - `report.rs`: the report, its JSON, its exact merge; `chart.rs`: the SVG.
//! - `multi.rs`: `--processes`; `limits.rs`: the descriptor limit; `target.rs`: loopback only.
//! - `verify.rs`: the durability check.

mod chart;
mod config;
mod device;
mod frames;
mod limits;
mod multi;
mod pacing;
mod progress;
mod report;
mod stats;
mod target;
mod verify;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use fleetgate::protocol::Imei;
use tokio::time::Instant;

use config::{CodecArg, Config, Mode, Transport, DRAIN};
use device::Plan;
use pacing::TokenBucket;
use progress::{Output, ProgressLine};
use report::{Report, Verify};
use stats::Stats;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Simulated Teltonika fleets for fleetgate: closed- or open-loop load over TCP or UDP,
/// connection storms, devices that answer commands and drop their connection, ack-latency
/// histograms, and a check that what was acked is what was stored.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Opts {
    /// Gateway device address (TCP, or UDP with --udp). Must be loopback (127.0.0.0/8, ::1,
    /// localhost) unless --allow-remote is given.
    #[arg(long, default_value = "127.0.0.1:5027")]
    addr: String,
    /// Allow a non-loopback --addr (and --verify-database-url host). Load tests send only to
    /// machines you own and run.
    #[arg(long)]
    allow_remote: bool,
    /// Number of simulated devices (one task and one connection or socket each).
    #[arg(long, default_value_t = 100)]
    devices: u64,
    /// IMEI of the first device; the devices use imei-base .. imei-base + devices.
    #[arg(long, default_value_t = 350_000_000_000_000)]
    imei_base: u64,
    /// AVL codec: 8, 8e or 16.
    #[arg(long, value_enum, default_value = "8e")]
    codec: CodecArg,
    /// AVL records per frame (1-255).
    #[arg(long, default_value_t = 10)]
    records_per_frame: usize,
    /// IO elements per record [default: 25 for 8e (10 one-byte, 7 two-byte, 5 four-byte,
    /// 2 eight-byte values and one 17-byte NX), 24 for 8 and 16 (the same without the NX)].
    #[arg(long)]
    io_per_record: Option<usize>,
    /// Frames per device sent and awaiting their ack, at most. Real devices send one frame at
    /// a time; more pushes throughput.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Open loop: records per second offered by the whole fleet (each device sends a frame
    /// every devices x records-per-frame / rate seconds, whatever the acks do; latency counts
    /// from each frame's scheduled time). 0: closed loop, each device sends whenever its
    /// in-flight window allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Send UDP datagrams instead of TCP frames; acks are matched by packet id.
    #[arg(long)]
    udp: bool,
    /// Seconds of sending, counted from when the last device got its first connect token
    /// (devices / connect-rate after the start).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the start of --duration excluded from the histogram and the rate.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connection attempts per second, across the fleet (first connects, retries and
    /// reconnects alike, through one token bucket). 0: unpaced.
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
    /// Seconds a connect plus login may take before the attempt counts as a timeout.
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    /// Spread TCP/UDP sockets over this many source addresses, 127.0.0.2 .. 127.0.0.(N+1)
    /// (1-254), so that ephemeral ports do not run out (about 28,000 per source address
    /// towards one gateway port, TIME_WAIT included). 0: the kernel's choice.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=254))]
    source_addrs: u8,
    /// Tokio worker threads per process [default: the cores, divided among --processes].
    #[arg(long)]
    threads: Option<usize>,
    /// Split the fleet over this many loadgen processes (re-executions of this binary), each
    /// with its own descriptor limit; their results are merged exactly.
    #[arg(long, default_value_t = 1)]
    processes: u64,
    /// Seconds to wait for a frame's ack before giving it up: TCP reconnects and resends the
    /// unacked frames, UDP resends the datagram.
    #[arg(long, default_value_t = 5.0)]
    ack_timeout: f64,
    /// Fraction (0-1) of TCP devices that now and then cut their connection half-way through
    /// a frame without waiting for acks, reconnect and resend what is unacked.
    #[arg(long, default_value_t = 0.0)]
    drop_fraction: f64,
    /// Mean seconds between two cuts of a --drop-fraction device (each drawn from 0.5x-1.5x).
    #[arg(long, default_value_t = 5.0)]
    drop_interval: f64,
    /// Milliseconds a device takes to answer a Codec 12/14 command from the gateway.
    #[arg(long, default_value_t = 100)]
    command_delay_ms: u64,
    /// Seconds after which the run is stopped whatever happens [default: the connect ramp +
    /// duration + 5 s drain + 30 s].
    #[arg(long)]
    hard_cap: Option<f64>,
    /// After the run, count the rows stored in `telemetry` for this run's IMEI range and
    /// timestamp window and compare them with the records acked; exit 1 if they differ.
    /// Also used before the run to start timestamps past any earlier run's.
    #[arg(long)]
    verify_database_url: Option<String>,
    /// Print exactly one JSON object on stdout (and nothing else there) instead of the table.
    #[arg(long)]
    json: bool,
    /// Write an SVG chart of records/s and ack-latency p50/p99 per second to this file.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Draw --chart from this saved --json report instead of running (nothing is sent).
    #[arg(long, value_name = "REPORT_JSON", requires = "chart")]
    replot: Option<PathBuf>,
    /// Show a progress line on stderr every this many seconds (0: never) [default: 1 when
    /// stderr is a terminal, else never].
    #[arg(long)]
    progress: Option<u32>,
    /// Internal: run as one worker process of --processes, with this configuration (JSON).
    #[arg(long, hide = true)]
    worker: Option<String>,
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    let result = match (&opts.worker, &opts.replot) {
        (Some(json), _) => worker_main(json),
        (None, Some(saved)) => replot(saved, opts.chart.as_deref()),
        (None, None) => run(opts),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn secs(what: &str, v: f64) -> anyhow::Result<f64> {
    if v.is_finite() && v >= 0.0 && Duration::try_from_secs_f64(v).is_ok() {
        Ok(v)
    } else {
        bail!("--{what} {v} is not a number of seconds")
    }
}

/// Checks the options and resolves them into a [`Config`] (without the timestamps).
fn to_config(o: &Opts) -> anyhow::Result<Config> {
    let addr = target::resolve_target(&o.addr, o.allow_remote).map_err(anyhow::Error::msg)?;
    if let Some(url) = &o.verify_database_url {
        target::check_database_url(url, o.allow_remote).map_err(anyhow::Error::msg)?;
    }
    let codec = o.codec.codec();
    let io = o
        .io_per_record
        .unwrap_or_else(|| frames::default_io_per_record(codec));
    frames::check_shape(codec, o.records_per_frame, io).map_err(anyhow::Error::msg)?;
    if o.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if o.imei_base
        .checked_add(o.devices - 1)
        .and_then(Imei::new)
        .is_none()
    {
        bail!(
            "--imei-base {} + --devices {} passes 15 digits",
            o.imei_base,
            o.devices
        );
    }
    if o.in_flight == 0 {
        bail!("--in-flight must be at least 1");
    }
    if o.processes == 0 || o.processes > o.devices {
        bail!("--processes must be between 1 and --devices");
    }
    let threads = match o.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / o.processes as usize).max(1)
        }
    };
    let duration_s = secs("duration", o.duration)?;
    let warmup_s = secs("warmup", o.warmup)?;
    if duration_s == 0.0 || warmup_s >= duration_s {
        bail!("--warmup must be shorter than --duration");
    }
    let mode = if o.rate == 0.0 {
        Mode::Closed
    } else {
        pacing::frame_interval(o.rate, o.devices, o.records_per_frame)
            .map_err(anyhow::Error::msg)?;
        Mode::Open
    };
    if !(o.connect_rate >= 0.0 && o.connect_rate.is_finite()) {
        bail!("--connect-rate must be 0 or more");
    }
    if o.source_addrs > 0 && !addr.ip().is_ipv4() {
        bail!("--source-addrs spreads over 127.0.0.x: it needs an IPv4 --addr");
    }
    if !(0.0..=1.0).contains(&o.drop_fraction) {
        bail!("--drop-fraction must be between 0 and 1");
    }
    if o.drop_fraction > 0.0 && o.udp {
        bail!("--drop-fraction applies to TCP devices (UDP has no connection to drop)");
    }
    let drop_interval_s = secs("drop-interval", o.drop_interval)?;
    if o.drop_fraction > 0.0 && drop_interval_s == 0.0 {
        bail!("--drop-interval must be more than 0");
    }
    let mut cfg = Config {
        addr,
        transport: if o.udp {
            Transport::Udp
        } else {
            Transport::Tcp
        },
        codec: o.codec,
        devices: o.devices,
        imei_base: o.imei_base,
        processes: o.processes,
        threads,
        records_per_frame: o.records_per_frame,
        io_per_record: io,
        in_flight: o.in_flight,
        mode,
        rate_records_per_s: o.rate,
        duration_s,
        warmup_s,
        ack_timeout_s: secs("ack-timeout", o.ack_timeout)?,
        connect_rate: o.connect_rate,
        connect_timeout_s: secs("connect-timeout", o.connect_timeout)?,
        source_addrs: o.source_addrs,
        drop_fraction: o.drop_fraction,
        drop_interval_s,
        command_delay_ms: o.command_delay_ms,
        hard_cap_s: 0.0,
        ts_base_ms: 0,
        start_at_unix_ms: None,
    };
    cfg.hard_cap_s = match o.hard_cap {
        Some(h) if secs("hard-cap", h)? > 0.0 => h,
        Some(_) => bail!("--hard-cap must be more than 0"),
        None => cfg.auto_hard_cap().as_secs_f64(),
    };
    Ok(cfg)
}

/// Raises the descriptor limit and warns when `per_process` devices still do not fit.
fn check_descriptors(per_process: u64) {
    let before = limits::nofile().map(|l| l.soft).unwrap_or(0);
    match limits::raise_nofile() {
        Ok(now) => {
            if let Some(w) = limits::warning(per_process, before, now) {
                eprintln!("loadgen: {w}");
            }
        }
        Err(e) => eprintln!("loadgen: cannot read or raise the descriptor limit: {e}"),
    }
}

fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let mut cfg = to_config(&o)?;
    let per_process = cfg.devices.div_ceil(cfg.processes);
    check_descriptors(per_process);
    let imei_hi = cfg.imei_base + cfg.devices;
    let db = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Timestamps: now, rounded up to a second, and past whatever an earlier run against the
    // same database stored for these IMEIs.
    cfg.ts_base_ms = now_ms().div_ceil(1000) * 1000;
    if let Some(url) = &o.verify_database_url {
        let prior = db
            .block_on(verify::prior_max_ts(url, cfg.imei_base, imei_hi))
            .context("reading earlier runs' timestamps")?;
        if let Some(prior) = prior {
            cfg.ts_base_ms = cfg.ts_base_ms.max((prior / 1000 + 1) * 1000);
        }
    }
    let tty = std::io::stderr().is_terminal();
    let progress = match o.progress {
        Some(0) => None,
        Some(every) => Some(ProgressLine::new(every, tty)),
        None => tty.then(|| ProgressLine::new(1, tty)),
    };
    eprintln!(
        "loadgen: {} devices -> {} ({:?}, {} process(es) x {} threads), IMEIs {}..{imei_hi}, \
         connects {}/s (ramp {:.1} s), run {:.1} s, hard cap {:.0} s",
        cfg.devices,
        cfg.addr,
        cfg.transport,
        cfg.processes,
        cfg.threads,
        cfg.imei_base,
        cfg.connect_rate,
        cfg.ramp().as_secs_f64(),
        cfg.duration_s,
        cfg.hard_cap_s
    );

    let mut report = if cfg.processes > 1 {
        multi::run_parent(&cfg, progress)?
    } else {
        let out = progress.map_or(Output::Quiet, Output::Progress);
        run_local(&cfg, out, false)?
    };

    let mut code = ExitCode::SUCCESS;
    if let Some(url) = &o.verify_database_url {
        let stored = db
            .block_on(verify::count_stored(
                url,
                cfg.imei_base,
                imei_hi,
                report.records.first_ts_ms,
                report.records.last_ts_ms,
            ))
            .context("verifying against the database")?;
        let v = Verify::judge(stored, report.records.acked, report.records.unacked_at_end);
        if !v.ok {
            code = ExitCode::FAILURE;
        }
        report.verify = Some(v);
    }
    if let Some(path) = &o.chart {
        let svg = chart::render_svg(&report).map_err(anyhow::Error::msg)?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("loadgen: chart written to {}", path.display());
    }
    if o.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.duration.hard_cap_hit {
        eprintln!("loadgen: the hard cap stopped the run before every device finished");
    }
    Ok(code)
}

/// `--replot`: the chart of a saved report.
fn replot(saved: &std::path::Path, chart: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(saved).with_context(|| format!("reading {}", saved.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a loadgen --json report", saved.display()))?;
    let path = chart.context("--replot needs --chart FILE")?;
    let svg = chart::render_svg(&report).map_err(anyhow::Error::msg)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// A worker of `--processes`: runs its share and prints its report, histograms included.
fn worker_main(json: &str) -> anyhow::Result<ExitCode> {
    let cfg: Config = serde_json::from_str(json).context("reading the worker configuration")?;
    // The parent warned already; the limit it raised is inherited, this only makes sure.
    let _ = limits::raise_nofile();
    let report = run_local(&cfg, Output::Worker, true)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Runs the devices of `cfg` in this process.
fn run_local(cfg: &Config, out: Output, keep_histograms: bool) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()?;
    let t0 = match cfg.start_at_unix_ms {
        Some(at) => Instant::now() + Duration::from_millis(at.saturating_sub(now_ms())),
        None => Instant::now() + Duration::from_millis(50),
    };
    let send_from = t0 + cfg.ramp();
    let send_until = send_from + Duration::from_secs_f64(cfg.duration_s);
    let hard_stop = t0 + Duration::from_secs_f64(cfg.hard_cap_s);
    let plan = Arc::new(Plan {
        addr: cfg.addr,
        codec: cfg.codec.codec(),
        records_per_frame: cfg.records_per_frame,
        io_per_record: cfg.io_per_record,
        in_flight: cfg.in_flight,
        devices: cfg.devices,
        interval: cfg.frame_interval(),
        ack_timeout: Duration::from_secs_f64(cfg.ack_timeout_s),
        connect_timeout: Duration::from_secs_f64(cfg.connect_timeout_s),
        imei_base: cfg.imei_base,
        ts_base: cfg.ts_base_ms,
        source_addrs: cfg.source_addrs,
        drop_fraction: cfg.drop_fraction,
        drop_interval: Duration::from_secs_f64(cfg.drop_interval_s),
        command_delay: Duration::from_millis(cfg.command_delay_ms),
        measure_from: send_from + Duration::from_secs_f64(cfg.warmup_s),
        send_until,
        drain_until: (send_until + DRAIN).min(hard_stop),
        connects: Mutex::new(TokenBucket::new(
            cfg.connect_rate,
            TokenBucket::default_burst(cfg.connect_rate),
        )),
        stats: Stats::new(),
    });

    let (series, hard_cap_hit) = rt.block_on(async {
        let mut tasks = Vec::with_capacity(cfg.devices as usize);
        for idx in 0..cfg.devices as usize {
            let p = plan.clone();
            tasks.push(match cfg.transport {
                Transport::Udp => tokio::spawn(device::run_udp(p, idx, t0)),
                Transport::Tcp => tokio::spawn(device::run_tcp(p, idx, t0)),
            });
        }
        let (stop, stopped) = std::sync::mpsc::channel();
        let sampler = {
            let plan = plan.clone();
            let t0 = t0.into_std();
            std::thread::Builder::new()
                .name("loadgen-sampler".into())
                .spawn(move || progress::sample_every_second(plan, t0, out, stopped))?
        };
        // Every device stops by itself at drain_until; the hard cap covers a stuck one.
        let all = async {
            for t in tasks.iter_mut() {
                let _ = t.await;
            }
        };
        let timed_out = tokio::time::timeout_at(hard_stop, all).await.is_err();
        if timed_out {
            for t in &tasks {
                t.abort();
            }
        }
        // Devices stop by themselves at a drain deadline the cap moved forward: the run was
        // cut all the same if it got there.
        let cut = send_until + DRAIN > hard_stop && Instant::now() >= hard_stop;
        let hit = timed_out || cut;
        let _ = stop.send(());
        anyhow::Ok((sampler.join().unwrap_or_default(), hit))
    })?;
    let wall_s = Instant::now().saturating_duration_since(t0).as_secs_f64();
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(Report::from_run(
        cfg.clone(),
        &plan.stats,
        series,
        wall_s,
        hard_cap_hit,
        keep_histograms,
    ))
}
