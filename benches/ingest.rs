//! Ingest through the gateway as a ratio to a plain COPY of the same rows into the same table
//! of the same PostgreSQL, in one run (issue 8: keep the ratio at or above 0.9), and the
//! gateway's own CPU per record, by thread kind.
//!
//! ```sh
//! cargo build --release -p loadgen && cargo bench --bench ingest     # ~3 minutes after the build
//! ING_ROUNDS=3 ING_DURATION=30 cargo bench --bench ingest            # longer
//! ```
//!
//! It starts a managed PostgreSQL (`ManagedPostgres`, serve's settings: fsync on,
//! shared_buffers 512 MB) in a temp dir (`TMPDIR`), applies the schema, then runs
//! `ING_ROUNDS` (2) rounds of two phases each, gateway then plain in odd rounds and plain then
//! gateway in even ones (ABBA, so a drift over the run does not favour one side); before
//! every phase `TRUNCATE telemetry, device_sessions, events` and `CHECKPOINT`, and a bounded
//! wait (`ING_QUIET_S`, 60 s) for no compiler to be running (else the phase is marked NOISY).
//!
//! - **gateway**: `fleetgate serve` (the bench build, or `BENCH_GATEWAY_BIN`), 2 shards,
//!   defaults (2 writer connections, batches up to 20,000 records), fresh per phase; loadgen
//!   (`ING_LOADGEN_BIN`, else `target/release/loadgen`) closed loop, Codec 8E, 25 IO
//!   elements per record: `--devices ING_DEVICES (200) --in-flight ING_IN_FLIGHT (4)
//!   --records-per-frame ING_RPF (50) --duration ING_DURATION (20)`, then
//!   the rows in `telemetry` counted afterwards (stored == acked; not loadgen's
//!   `--verify-database-url`, whose query would run inside the CPU window). Its figure is
//!   loadgen's records/s acked after commit (after its 1-s warm-up).
//! - **plain**: the same devices' records, made by loadgen's own generator
//!   (`loadgen/src/frames.rs`, compiled in: same IMEIs, seeds and timestamps' shape), encoded
//!   as the gateway encodes them (frame -> `decode_frame` -> `fleetgate::shard::copy::
//!   encode_rows`), as many as the last gateway phase stored, in chunks of `ING_CHUNK`
//!   (20,000: the writer's largest batch) records, all prepared before the clock starts. Then
//!   two threads, each with its own connection set up as the writer's
//!   (`fleetgate::db::connect_writer`: synchronous_commit on), take chunks in turn, each one
//!   `BEGIN; COPY telemetry (...) FROM STDIN (FORMAT binary); COMMIT`. Its figure is rows /
//!   wall time from the first BEGIN to the last COMMIT.
//!
//! `ING_SPLIT_CPUS=1` gives PostgreSQL a core of its own: the postmaster and its processes
//! are pinned to CPU 0 (backends forked later inherit it), this bench and everything it
//! starts (gateway, loadgen, the plain COPY threads) to CPU 1 (`taskset`). On a 2-core box
//! where loadgen, the gateway and PostgreSQL otherwise share both cores, the ratio then says
//! how well the gateway keeps PostgreSQL busy, rather than how much CPU it takes from it.
//!
//! During each phase: CPU of the gateway's threads by kind (`/proc/PID/task/*/stat`: shard-N,
//! fleetgate-writer-N, control, housekeeper, other) from loadgen's start to its exit, of
//! PostgreSQL (postmaster and its children), of loadgen (its rusage), and of the machine
//! (`/proc/stat`); per record stored, in µs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use fleetgate::pg::{ManagedPostgres, PgOptions};
use fleetgate::protocol::{decode_frame, Codec, Frame, Imei, Status};
use fleetgate::shard::copy::{encode_rows, COLUMNS, COPY_HEADER, COPY_TRAILER};
use futures::SinkExt;

mod common;
use common::*;

#[allow(dead_code, unused_imports)]
#[path = "../loadgen/src/frames.rs"]
mod frames;

const IMEI_BASE: u64 = 350_000_000_000_000;

struct Params {
    rounds: usize,
    devices: usize,
    in_flight: usize,
    rpf: usize,
    duration: usize,
    chunk: usize,
    quiet: Duration,
}

/// CPU of one phase, in clock ticks.
#[derive(Default)]
struct PhaseCpu {
    /// (kind, user, sys) of the gateway's threads.
    gateway: Vec<(&'static str, u64, u64)>,
    postgres: u64,
    loadgen: u64,
    machine_busy: u64,
    machine_total: u64,
    wall_s: f64,
}

struct Phase {
    kind: &'static str,
    records: u64,
    per_s: f64,
    noisy: bool,
    cpu: PhaseCpu,
    note: String,
}

fn main() {
    let p = Params {
        rounds: env_usize("ING_ROUNDS", 2),
        devices: env_usize("ING_DEVICES", 200),
        in_flight: env_usize("ING_IN_FLIGHT", 4),
        rpf: env_usize("ING_RPF", 50),
        duration: env_usize("ING_DURATION", 20),
        chunk: env_usize("ING_CHUNK", 20_000),
        quiet: Duration::from_secs_f64(env_f64("ING_QUIET_S", 60.0)),
    };
    let loadgen = loadgen_bin();
    let started = Instant::now();
    let dir = TempDir::new("fging");
    println!("ingest: PostgreSQL in {}", dir.path().display());
    let mut pg = ManagedPostgres::start(&dir.path().join("pg"), &PgOptions::default())
        .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"));
    let url = pg.connection_string();
    fleetgate::pg::migrate_blocking(&url).expect("applying the schema");
    let postmaster = std::fs::read_to_string(pg.pgdata().join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
        .expect("postmaster.pid");
    if env_usize("ING_SPLIT_CPUS", 0) == 1 {
        split_cpus(postmaster);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin = rt
        .block_on(fleetgate::db::connect(&url))
        .expect("admin connection");

    let mut phases: Vec<Phase> = Vec::new();
    let mut last_gateway_rows: Option<u64> = None;
    for round in 1..=p.rounds {
        let order: [&str; 2] = if round % 2 == 1 {
            ["gateway", "plain"]
        } else {
            ["plain", "gateway"]
        };
        for kind in order {
            rt.block_on(
                admin.batch_execute("TRUNCATE telemetry, device_sessions, events; CHECKPOINT"),
            )
            .expect("truncate");
            let noisy = !wait_quiet(p.quiet);
            let ph = if kind == "gateway" {
                let ph = gateway_phase(
                    &p,
                    &url,
                    &dir.path().join(format!("gw{round}")),
                    &loadgen,
                    postmaster,
                    noisy,
                );
                last_gateway_rows = Some(ph.records);
                ph
            } else {
                let rows = last_gateway_rows.unwrap_or(
                    // Before any gateway phase (never with ABBA): what loadgen would roughly send.
                    (p.devices * p.rpf * 1000) as u64,
                );
                plain_phase(&p, &url, rows, postmaster, noisy)
            };
            let stored: i64 = rt
                .block_on(admin.query_one("SELECT count(*) FROM telemetry", &[]))
                .expect("count")
                .get(0);
            let check = if ph.kind == "gateway" {
                // The table was empty before the phase: every acked record stored, once.
                if stored as u64 == ph.records {
                    "stored == acked"
                } else {
                    "stored != acked (NOT OK)"
                }
            } else {
                "rows"
            };
            println!(
                "round {round} {:<7} {:>9} records, {:>9.0} records/s{}{}; {check}: {stored}",
                ph.kind,
                ph.records,
                ph.per_s,
                if ph.noisy { " NOISY" } else { "" },
                ph.note
            );
            print_cpu(&ph);
            phases.push(ph);
        }
    }

    println!();
    println!(
        "ingest: loadgen --devices {} --in-flight {} --records-per-frame {} --duration {} (codec 8E, 25 IO); plain COPY in chunks of {} rows over 2 connections",
        p.devices, p.in_flight, p.rpf, p.duration, p.chunk
    );
    let mut ratios = Vec::new();
    for round in 1..=p.rounds {
        let g = &phases[2 * (round - 1)..2 * round];
        let gw = g.iter().find(|x| x.kind == "gateway").unwrap();
        let pl = g.iter().find(|x| x.kind == "plain").unwrap();
        let r = gw.per_s / pl.per_s;
        ratios.push(r);
        println!(
            "round {round}: gateway {:.0} records/s, plain COPY {:.0} records/s, ratio {r:.3}{}",
            gw.per_s,
            pl.per_s,
            if gw.noisy || pl.noisy { " (NOISY)" } else { "" }
        );
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "ingest ratio gateway / plain COPY: mean {mean:.3}, min {min:.3} over {} rounds; target >= 0.9: {}",
        ratios.len(),
        if mean >= 0.9 { "met" } else { "NOT met" }
    );
    // Gateway CPU per record, all gateway phases together.
    let (mut recs, mut by): (u64, HashMap<&str, (u64, u64)>) = (0, HashMap::new());
    for ph in phases.iter().filter(|x| x.kind == "gateway") {
        recs += ph.records;
        for (k, u, s) in &ph.cpu.gateway {
            let e = by.entry(k).or_default();
            e.0 += u;
            e.1 += s;
        }
    }
    let us = |ticks: u64| ticks as f64 / clk_tck() * 1e6 / recs.max(1) as f64;
    let mut line = String::new();
    let mut total = 0;
    for k in ["shard", "writer", "control", "housekeeper", "other"] {
        if let Some((u, s)) = by.get(k) {
            total += u + s;
            line.push_str(&format!(
                " {k} {:.3} (user {:.3}, sys {:.3});",
                us(u + s),
                us(*u),
                us(*s)
            ));
        }
    }
    let pg_ticks: u64 = phases
        .iter()
        .filter(|x| x.kind == "gateway")
        .map(|x| x.cpu.postgres)
        .sum();
    println!(
        "gateway CPU per record stored, µs (all gateway phases, {recs} records):{line} total {:.3}; PostgreSQL {:.3}",
        us(total),
        us(pg_ticks)
    );
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());
    drop(admin);
    if let Err(e) = pg.stop() {
        eprintln!("stopping PostgreSQL: {e}");
    }
}

fn print_cpu(ph: &Phase) {
    let c = &ph.cpu;
    let tck = clk_tck();
    let pct = |t: u64| t as f64 / tck / c.wall_s.max(1e-9) * 100.0;
    let per = |t: u64| t as f64 / tck * 1e6 / ph.records.max(1) as f64;
    let gw: u64 = c.gateway.iter().map(|(_, u, s)| u + s).sum();
    let mut parts: Vec<String> = c
        .gateway
        .iter()
        .map(|(k, u, s)| format!("{k} {:.0}%", pct(u + s)))
        .collect();
    if parts.is_empty() {
        parts.push("-".into());
    }
    let busy = c.machine_busy;
    let other = busy.saturating_sub(gw + c.postgres + c.loadgen);
    println!(
        "    CPU over {:.1} s, % of one core: gateway {:.0}% ({}), PostgreSQL {:.0}%, loadgen {:.0}%, rest of machine {:.0}% (machine {:.0}% of {:.0}%); µs per record: gateway {:.3}, PostgreSQL {:.3}",
        c.wall_s,
        pct(gw),
        parts.join(", "),
        pct(c.postgres),
        pct(c.loadgen),
        pct(other),
        pct(busy),
        c.machine_total as f64 / tck / c.wall_s.max(1e-9) * 100.0,
        per(gw),
        per(c.postgres)
    );
}

/// PostgreSQL (the postmaster and its processes) on CPU 0; this process, its threads and
/// whatever it starts from now on, on CPU 1.
fn split_cpus(postmaster: u32) {
    let pin = |cpu: &str, pid: u32| {
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", cpu, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok
    };
    assert!(pin("0", postmaster), "pinning the postmaster failed");
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            });
        // A process that ended meanwhile cannot be pinned, nor needs to be.
        if ppid == Some(postmaster) {
            pin("0", pid);
        }
    }
    assert!(pin("1", std::process::id()), "pinning the bench failed");
    println!("ingest: PostgreSQL pinned to CPU 0, the bench, gateway and loadgen to CPU 1");
}

/// loadgen's binary: `ING_LOADGEN_BIN`, else `target/release/loadgen` beside this bench's
/// own `target/release/deps/`.
fn loadgen_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ING_LOADGEN_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("loadgen"))
        .unwrap();
    assert!(
        p.exists(),
        "no loadgen at {}: `cargo build --release -p loadgen` first, or set ING_LOADGEN_BIN",
        p.display()
    );
    p
}

fn gateway_phase(
    p: &Params,
    url: &str,
    dir: &std::path::Path,
    loadgen: &std::path::Path,
    postmaster: u32,
    noisy: bool,
) -> Phase {
    let mut gw = Gateway::start(url, dir, "telemetry_events = \"none\"\n");
    let pid = gw.pid();
    let (t0, g0, pg0, m0) = (
        Instant::now(),
        threads_cpu(pid),
        process_tree_ticks(postmaster),
        machine_ticks(),
    );
    // Reaped below by wait4 (for its rusage), which clippy does not see.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(loadgen)
        .args(["--addr", &gw.device_addr.to_string(), "--json"])
        .args(["--devices", &p.devices.to_string()])
        .args(["--in-flight", &p.in_flight.to_string()])
        .args(["--records-per-frame", &p.rpf.to_string()])
        .args(["--duration", &p.duration.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning loadgen");
    let lg_pid = child.id() as i32;
    let mut stdout = child.stdout.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    // Bounded wait for loadgen's exit, with its rusage (its CPU).
    let deadline = Instant::now() + Duration::from_secs(p.duration as u64 + 120);
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    loop {
        // SAFETY: our own child's pid; status and rusage are valid out-pointers.
        let r = unsafe { libc::wait4(lg_pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == lg_pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe { libc::kill(lg_pid, libc::SIGKILL) };
            panic!("loadgen did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (g1, pg1, m1, wall) = (
        threads_cpu(pid),
        process_tree_ticks(postmaster),
        machine_ticks(),
        t0.elapsed().as_secs_f64(),
    );
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let loadgen_ticks = ((tv(ru.ru_utime) + tv(ru.ru_stime)) * clk_tck()) as u64;
    let out = reader.join().unwrap();
    let rss = gw.peak_rss_kib();
    gw.terminate();
    for l in gw.odd_log_lines().iter().take(5) {
        println!("    gateway log: {l}");
    }
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!("loadgen's output is not JSON ({e}), exit status {status}: {out}")
    });
    let acked = v["records"]["acked"].as_u64().unwrap_or(0);
    let per_s = v["records"]["per_s"].as_f64().unwrap_or(0.0);
    Phase {
        kind: "gateway",
        records: acked,
        per_s,
        noisy,
        cpu: PhaseCpu {
            gateway: cpu_by_kind(&g0, &g1),
            postgres: pg1.saturating_sub(pg0),
            loadgen: loadgen_ticks,
            machine_busy: m1.0 - m0.0,
            machine_total: m1.1 - m0.1,
            wall_s: wall,
        },
        note: format!(
            " (acked; p50 {} p99 {} ms; gateway VmHWM {} MiB)",
            v["latency_ms"]["p50"],
            v["latency_ms"]["p99"],
            rss / 1024
        ),
    }
}

/// Blocks (bounded: 600 s) until `flag` is set.
fn wait_flag(flag: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !flag.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "waited 600 s for the main thread"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `rows` records of the loadgen fleet as binary COPY streams of at most `chunk` records each
/// (header, rows, trailer), in the order a closed loop sends them: one frame per device in
/// turn.
fn plain_rows(p: &Params, rows: u64) -> Vec<Bytes> {
    let now_ms = fleetgate::time::unix_now_ms();
    let ts_base = now_ms.div_ceil(1000) * 1000;
    let io = frames::default_io_per_record(Codec::C8E);
    let mut gens: Vec<(Imei, frames::FrameGen)> = (0..p.devices)
        .map(|idx| {
            let imei = Imei::new(IMEI_BASE + idx as u64).unwrap();
            let first_ts = ts_base + (idx as u64 % 1000);
            let g = frames::FrameGen::new(Codec::C8E, imei, first_ts, p.rpf, io, imei.as_u64());
            (imei, g)
        })
        .collect();
    let mut out = Vec::new();
    let mut cur = BytesMut::new();
    let mut in_chunk = 0usize;
    let mut done = 0u64;
    let mut frame = Vec::new();
    let mut enc = Vec::new();
    'all: loop {
        for (imei, g) in gens.iter_mut() {
            if done >= rows {
                break 'all;
            }
            frame.clear();
            g.next_tcp_frame(&mut frame);
            let avl = match decode_frame(&frame, u32::MAX - 64) {
                Ok(Status::Complete((Frame::Avl(a), _))) => a,
                other => panic!("loadgen's frame does not decode: {other:?}"),
            };
            let n = avl.count() as usize;
            if in_chunk + n > p.chunk && in_chunk > 0 {
                cur.put_slice(COPY_TRAILER);
                out.push(std::mem::take(&mut cur).freeze());
                in_chunk = 0;
            }
            if in_chunk == 0 {
                cur.put_slice(COPY_HEADER);
            }
            enc.clear();
            encode_rows(*imei, &avl, fleetgate::time::unix_now_us(), &mut enc);
            cur.put_slice(&enc);
            in_chunk += n;
            done += n as u64;
        }
    }
    if in_chunk > 0 {
        cur.put_slice(COPY_TRAILER);
        out.push(cur.freeze());
    }
    out
}

fn plain_phase(p: &Params, url: &str, rows: u64, postmaster: u32, noisy: bool) -> Phase {
    let t_gen = Instant::now();
    let chunks = Arc::new(plain_rows(p, rows));
    let bytes: usize = chunks.iter().map(Bytes::len).sum();
    let gen_s = t_gen.elapsed().as_secs_f64();
    let next = Arc::new(AtomicUsize::new(0));
    // `go`: both connections are up, the clock starts. Each thread then says when it is done
    // and keeps its connection (its backend, and so the backend's CPU in /proc) until
    // `release`, after the readings. Every wait is bounded: a thread that fails drops its
    // sender and the main thread's wait ends.
    let (go, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut threads = Vec::new();
    for _ in 0..2 {
        let (chunks, next, url) = (chunks.clone(), next.clone(), url.to_string());
        let (go, release) = (go.clone(), release.clone());
        let (ready_tx, done_tx) = (ready_tx.clone(), done_tx.clone());
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = fleetgate::db::connect_writer(&url)
                    .await
                    .expect("plain COPY connection");
                let _ = ready_tx.send(());
                wait_flag(&go);
                let sql = format!("COPY telemetry ({COLUMNS}) FROM STDIN (FORMAT binary)");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(chunk) = chunks.get(i) else { break };
                    client.batch_execute("BEGIN").await.expect("BEGIN");
                    let sink = client.copy_in::<_, Bytes>(&sql).await.expect("COPY");
                    futures::pin_mut!(sink);
                    sink.feed(chunk.clone()).await.expect("COPY data");
                    sink.as_mut().finish().await.expect("COPY end");
                    client.batch_execute("COMMIT").await.expect("COMMIT");
                }
                let _ = done_tx.send(());
                wait_flag(&release);
                drop(client);
            });
        }));
    }
    drop((ready_tx, done_tx));
    for _ in 0..2 {
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a plain COPY connection did not come up");
    }
    let (pg0, m0) = (process_tree_ticks(postmaster), machine_ticks());
    let t0 = Instant::now();
    go.store(true, Ordering::Release);
    for _ in 0..2 {
        done_rx
            .recv_timeout(Duration::from_secs(600))
            .expect("plain COPY failed or did not finish within 600 s");
    }
    let wall = t0.elapsed().as_secs_f64();
    let (pg1, m1) = (process_tree_ticks(postmaster), machine_ticks());
    release.store(true, Ordering::Release);
    for t in threads {
        t.join().expect("a plain COPY thread failed");
    }
    // Our own CPU (the two COPY threads feeding ready bytes) is small and counted as "rest".
    Phase {
        kind: "plain",
        records: rows,
        per_s: rows as f64 / wall,
        noisy,
        cpu: PhaseCpu {
            gateway: Vec::new(),
            postgres: pg1.saturating_sub(pg0),
            loadgen: 0,
            machine_busy: m1.0 - m0.0,
            machine_total: m1.1 - m0.1,
            wall_s: wall,
        },
        note: format!(
            " ({} chunks, {:.0} MiB of COPY data, prepared in {gen_s:.1} s before the clock)",
            chunks.len(),
            bytes as f64 / 1048576.0
        ),
    }
}
