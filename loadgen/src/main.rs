//! loadgen: a simulated fleet of Teltonika trackers for fleetgate.
//!
//! Every device is a tokio task that connects, logs in and streams AVL frames (or UDP
//! datagrams) built with fleetgate's own codec, keeping up to `--in-flight` frames unacked and
//! timing each frame from send to ack. A run is bounded: devices connect at `--connect-rate`,
//! send for `--duration` seconds (the first `--warmup` seconds are not measured), then wait a
//! few seconds for the last acks and stop. The summary is a fixed table (and a JSON line with
//! `--json`); `--verify-database-url` then counts the rows the run stored and compares them
//! with the records acked.
//!
//! - `frames.rs`: realistic records and their encoding.
//! - `device.rs`: the simulated device (TCP and UDP).
//! - `stats.rs`: counters, the latency histogram, the report.

mod device;
mod frames;
mod stats;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use fleetgate::protocol::{Codec, Imei};
use tokio::time::Instant;

use device::Plan;
use stats::{Report, RunShape, Stats};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long devices wait for outstanding acks after sending stops.
const DRAIN: Duration = Duration::from_secs(5);

/// AVL codec of the generated records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CodecArg {
    /// Codec 8: one-byte IO ids and counts.
    #[value(name = "8")]
    C8,
    /// Codec 8 Extended: two-byte IO ids and counts, plus variable-length (NX) elements.
    #[value(name = "8e", alias = "8E")]
    C8e,
    /// Codec 16: two-byte IO ids, one-byte counts, a generation type.
    #[value(name = "16")]
    C16,
}

impl CodecArg {
    fn codec(self) -> Codec {
        match self {
            CodecArg::C8 => Codec::C8,
            CodecArg::C8e => Codec::C8E,
            CodecArg::C16 => Codec::C16,
        }
    }
    fn name(self) -> &'static str {
        match self {
            CodecArg::C8 => "8",
            CodecArg::C8e => "8e",
            CodecArg::C16 => "16",
        }
    }
}

/// Simulated Teltonika fleets for fleetgate: closed-loop or fixed-rate load, ack-latency
/// histograms, and a check that what was acked is what was stored.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Opts {
    /// Gateway device address (TCP, or UDP with --udp).
    #[arg(long, default_value = "127.0.0.1:5027")]
    addr: String,
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
    /// Seconds of sending, counted from when the last device was due to connect.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the start of --duration excluded from the histogram and the rate.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Frames per second per device (fixed offered load; latency then counts from each
    /// frame's scheduled time). 0: closed loop, send whenever the in-flight window allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Send UDP datagrams instead of TCP frames; acks are matched by packet id.
    #[arg(long)]
    udp: bool,
    /// Devices that start connecting per second at the start (0: all at once), so that
    /// thousands of devices do not arrive as one burst of SYNs.
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to wait for a frame's ack before giving it up: TCP reconnects and resends the
    /// unacked frames, UDP resends the datagram.
    #[arg(long, default_value_t = 5.0)]
    ack_timeout: f64,
    /// After the run, count the rows stored in `telemetry` for this run's IMEI range and
    /// timestamp window and compare them with the records acked; exit 1 if they differ.
    /// Also used before the run to start timestamps past any earlier run's.
    #[arg(long)]
    verify_database_url: Option<String>,
    /// Also print the summary as one JSON line.
    #[arg(long)]
    json: bool,
    /// Print acked records/s to stderr every this many seconds (0: never).
    #[arg(long, default_value_t = 5.0)]
    progress: f64,
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    match run(opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving --addr {addr}"))?
        .next()
        .with_context(|| format!("--addr {addr} resolves to nothing"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn secs(what: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{what} {v} is not a number of seconds"))
}

fn run(o: Opts) -> anyhow::Result<ExitCode> {
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
    if o.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let duration = secs("duration", o.duration)?;
    let warmup = secs("warmup", o.warmup)?;
    if warmup >= duration {
        bail!("--warmup must be shorter than --duration");
    }
    let ack_timeout = secs("ack-timeout", o.ack_timeout)?;
    let interval = if o.rate == 0.0 {
        None
    } else if o.rate > 0.0 && o.rate.is_finite() {
        Some(Duration::from_secs_f64(1.0 / o.rate))
    } else {
        bail!("--rate {} is not a rate", o.rate);
    };
    if !(o.connect_rate >= 0.0 && o.connect_rate.is_finite()) {
        bail!("--connect-rate must be 0 or more");
    }
    let addr = resolve(&o.addr)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()?;
    let (imei_lo, imei_hi) = (o.imei_base, o.imei_base + o.devices);

    // Timestamps: now, rounded up to a second, and past whatever an earlier run against the
    // same database stored for these IMEIs.
    let mut ts_base = now_ms().div_ceil(1000) * 1000;
    if let Some(url) = &o.verify_database_url {
        let prior = rt
            .block_on(prior_max_ts(url, imei_lo, imei_hi))
            .context("reading earlier runs' timestamps")?;
        if let Some(prior) = prior {
            ts_base = ts_base.max((prior / 1000 + 1) * 1000);
        }
    }

    let ramp = if o.connect_rate > 0.0 {
        Duration::from_secs_f64(o.devices as f64 / o.connect_rate)
    } else {
        Duration::ZERO
    };
    let t0 = Instant::now() + Duration::from_millis(50);
    let send_from = t0 + ramp;
    let plan = Arc::new(Plan {
        addr,
        codec,
        records_per_frame: o.records_per_frame,
        io_per_record: io,
        in_flight: o.in_flight,
        interval,
        ack_timeout,
        imei_base: o.imei_base,
        ts_base,
        measure_from: send_from + warmup,
        send_until: send_from + duration,
        drain_until: send_from + duration + DRAIN,
        stats: Stats::new(),
    });
    eprintln!(
        "loadgen: {} devices -> {addr} ({}), IMEIs {imei_lo}..{imei_hi}, first record ts {ts_base} ms, ramp {:.1} s, run {:.1} s",
        o.devices,
        if o.udp { "udp" } else { "tcp" },
        ramp.as_secs_f64(),
        duration.as_secs_f64()
    );

    rt.block_on(async {
        let mut tasks = Vec::with_capacity(o.devices as usize);
        for idx in 0..o.devices as usize {
            let start = if o.connect_rate > 0.0 {
                t0 + Duration::from_secs_f64(idx as f64 / o.connect_rate)
            } else {
                t0
            };
            let p = plan.clone();
            tasks.push(if o.udp {
                tokio::spawn(device::run_udp(p, idx, start))
            } else {
                tokio::spawn(device::run_tcp(p, idx, start))
            });
        }
        let progress = (o.progress > 0.0)
            .then(|| tokio::spawn(progress(plan.clone(), Duration::from_secs_f64(o.progress))));
        // Every device stops by itself at drain_until; the margin covers a stuck one.
        let all = async {
            for t in tasks.iter_mut() {
                let _ = t.await;
            }
        };
        if tokio::time::timeout_at(plan.drain_until + Duration::from_secs(2), all)
            .await
            .is_err()
        {
            eprintln!("loadgen: some devices did not stop in time; aborting them");
            for t in &tasks {
                t.abort();
            }
        }
        if let Some(p) = progress {
            p.abort();
        }
    });

    let shape = RunShape {
        transport: if o.udp { "udp" } else { "tcp" },
        codec: o.codec.name(),
        devices: o.devices,
        records_per_frame: o.records_per_frame as u64,
        io_per_record: io as u64,
        in_flight: o.in_flight as u64,
        rate: o.rate,
        duration_s: duration.as_secs_f64(),
        warmup_s: warmup.as_secs_f64(),
    };
    let mut report = Report::new(shape, &plan.stats);
    print!("{}", report.table());

    let mut code = ExitCode::SUCCESS;
    if let Some(url) = &o.verify_database_url {
        let ts_hi = plan.stats.max_ts.load(Ordering::Relaxed);
        let stored = rt
            .block_on(count_stored(url, imei_lo, imei_hi, ts_base, ts_hi))
            .context("verifying against the database")?;
        report.stored = Some(stored);
        let acked = report.records_acked;
        let verdict = if stored == acked {
            "OK".to_string()
        } else if stored > acked && stored <= acked + report.unacked_records {
            code = ExitCode::FAILURE;
            format!("MISMATCH: {} more stored than acked, within the {} records left unacked at the end", stored - acked, report.unacked_records)
        } else if stored > acked {
            code = ExitCode::FAILURE;
            format!(
                "MISMATCH: {} more stored than acked, more than the {} records left unacked",
                stored - acked,
                report.unacked_records
            )
        } else {
            code = ExitCode::FAILURE;
            format!("MISMATCH: {} acked records are NOT stored", acked - stored)
        };
        println!(
            "verify: stored {stored} {} acked {acked} (telemetry rows for IMEIs {imei_lo}..{imei_hi}, ts {ts_base}..={ts_hi} ms): {verdict}",
            if stored == acked { "==" } else { "!=" }
        );
    }
    if o.json {
        println!("{}", report.json());
    }
    Ok(code)
}

/// Prints acked records/s and the ack latencies of the last interval to stderr every `every`.
async fn progress(plan: Arc<Plan>, every: Duration) {
    let s = &plan.stats;
    let start = Instant::now();
    let mut last = (start, 0u64);
    let mut tick = tokio::time::interval_at(start + every, every);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let acked = s.records_acked.load(Ordering::Relaxed);
        let rate = (acked - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        let h = s.take_recent();
        let ms = |us: u64| us as f64 / 1000.0;
        eprintln!(
            "loadgen: t={:>5.1}s records acked {acked} ({rate:.0}/s), latency p50 {:.1} p99 {:.1} max {:.1} ms, \
             logged in {}, reconnects {}, errors {}",
            now.duration_since(start).as_secs_f64(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            s.logged_in.load(Ordering::Relaxed),
            s.reconnects.load(Ordering::Relaxed),
            s.errors.load(Ordering::Relaxed)
        );
        last = (now, acked);
    }
}

/// Runs `query` with `params` on a fresh connection and returns its one row; closes the
/// connection cleanly (so the server logs no lost client).
async fn query_one(
    url: &str,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> anyhow::Result<tokio_postgres::Row> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    let conn = tokio::spawn(conn);
    let row = client.query_one(query, params).await;
    drop(client);
    let _ = conn.await;
    Ok(row?)
}

/// The newest record timestamp (ms) stored for IMEIs `lo..hi`, if any: one index probe per
/// device (a backward scan of each partition's `(imei, ts, rec_hash)` index).
async fn prior_max_ts(url: &str, lo: u64, hi: u64) -> anyhow::Result<Option<u64>> {
    let row = query_one(
        url,
        "SELECT (extract(epoch FROM max(x.m)) * 1000)::bigint
           FROM generate_series($1::bigint, $2::bigint - 1) AS d(imei),
                LATERAL (SELECT max(t.ts) AS m FROM telemetry t
                          WHERE t.imei = d.imei AND t.ts < timestamptz '9999-01-01') x",
        &[&(lo as i64), &(hi as i64)],
    )
    .await?;
    Ok(row.get::<_, Option<i64>>(0).map(|v| v.max(0) as u64))
}

/// Rows of `telemetry` for IMEIs `lo..hi` stamped `ts_lo..=ts_hi` (ms since the Unix epoch):
/// one `(imei, ts)` index range scan per device, so the cost follows the run's rows, not the
/// table's.
async fn count_stored(url: &str, lo: u64, hi: u64, ts_lo: u64, ts_hi: u64) -> anyhow::Result<u64> {
    let row = query_one(
        url,
        "SELECT coalesce(sum(x.n), 0)::bigint
           FROM generate_series($1::bigint, $2::bigint - 1) AS d(imei),
                LATERAL (SELECT count(*) AS n FROM telemetry t
                          WHERE t.imei = d.imei
                            AND t.ts >= timestamptz 'epoch' + $3::bigint * interval '1 millisecond'
                            AND t.ts <= timestamptz 'epoch' + $4::bigint * interval '1 millisecond') x",
        &[&(lo as i64), &(hi as i64), &(ts_lo as i64), &(ts_hi as i64)],
    )
    .await?;
    Ok(row.get::<_, i64>(0) as u64)
}
