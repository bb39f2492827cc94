//! Shard hand-over cost, end to end: `cargo bench --bench handover` (~1 minute after the build).
//!
//! The kernel spreads new connections over the shards' SO_REUSEPORT listeners by a hash of
//! the connection's addresses; a device whose connection lands on a shard that does not own
//! its IMEI (`shard_for`) is handed over after its login: the accepting shard `dup`s the
//! socket and sends it, with any bytes read past the login, to the owner's inbox
//! (`conn::tcp::hand_over`); the owner registers it and starts the session there
//! (`conn::tcp::adopt`), which answers the login `01`. A device that lands on its owner gets
//! its `01` from a task spawned on the same shard. So the login answer's latency, handed-over
//! minus same-shard, is what one hand-over costs a device.
//!
//! It starts a managed PostgreSQL (serve's settings) in a temp dir and `fleetgate serve`
//! (2 shards; the bench build, or `BENCH_GATEWAY_BIN`), then logs in `HO_LOGINS` (3000)
//! devices one after the other, each on a new connection with its own IMEI, timing from just
//! before the login is written to the `01` read (the connect itself is not timed). After each
//! login it reads `fleetgate_handoffs_total{result="ok"}` from `/metrics`: if it rose, the
//! connection was handed over. The connections stay open until the end (an idle device costs
//! nothing), so disconnects do not land in the middle of later logins. The first
//! `HO_WARMUP` (200) logins are not counted. Both kinds are interleaved at random by the
//! kernel's hash, so a drift during the run affects both alike.
//!
//! Prints, per kind, the count and the latency percentiles (µs), and the difference of the
//! medians and of the means: the hand-over cost.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use fleetgate::pg::{ManagedPostgres, PgOptions};
use fleetgate::protocol::imei::encode_login;
use fleetgate::protocol::Imei;
use hdrhistogram::Histogram;

mod common;
use common::*;

const IMEI_BASE: u64 = 352_000_000_000_000;
const WAIT: Duration = Duration::from_secs(20);

fn handoffs_ok(gw: &Gateway) -> u64 {
    gw.get("/metrics")
        .lines()
        .filter(|l| l.starts_with("fleetgate_handoffs") && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn main() {
    let logins = env_usize("HO_LOGINS", 3000);
    let warmup = env_usize("HO_WARMUP", 200);
    let started = Instant::now();
    let dir = TempDir::new("fgho");
    println!("handover: PostgreSQL in {}", dir.path().display());
    let mut pg = ManagedPostgres::start(&dir.path().join("pg"), &PgOptions::default())
        .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"));
    if !wait_quiet(Duration::from_secs(60)) {
        println!("handover: compilers were running; figures NOISY");
    }
    let mut gw = Gateway::start(
        &pg.connection_string(),
        &dir.path().join("gw"),
        "telemetry_events = \"none\"\n",
    );
    println!(
        "handover: gateway {} pid {}, devices on {}",
        gw.bin.display(),
        gw.pid(),
        gw.device_addr
    );
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut handed, mut same) = (new_hist(), new_hist());
    let mut conns = Vec::with_capacity(logins + warmup);
    let mut last = handoffs_ok(&gw);
    let mut login = Vec::new();
    for i in 0..warmup + logins {
        let imei = Imei::new(IMEI_BASE + i as u64).unwrap();
        let mut s = TcpStream::connect(gw.device_addr).expect("device connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        login.clear();
        encode_login(imei, &mut login);
        let t0 = Instant::now();
        s.write_all(&login).expect("login write");
        let mut reply = [0u8; 1];
        s.read_exact(&mut reply).expect("login answer");
        let us = t0.elapsed().as_micros() as u64;
        assert_eq!(reply[0], 1, "login of {imei} refused");
        let now = handoffs_ok(&gw);
        let was_handed = now > last;
        last = now;
        if i >= warmup {
            let h = if was_handed { &mut handed } else { &mut same };
            h.saturating_record(us.max(1));
        }
        conns.push(s);
    }
    let print = |what: &str, h: &Histogram<u64>| {
        println!(
            "{what}: N={}, login -> 01 µs: p50 {}, p90 {}, p99 {}, max {}, mean {:.1}",
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.max(),
            h.mean()
        );
    };
    println!();
    print("same shard  ", &same);
    print("handed over ", &handed);
    println!(
        "hand-over cost (handed over - same shard): p50 {} µs, mean {:.1} µs, p90 {} µs",
        handed.value_at_quantile(0.5) as i64 - same.value_at_quantile(0.5) as i64,
        handed.mean() - same.mean(),
        handed.value_at_quantile(0.9) as i64 - same.value_at_quantile(0.9) as i64,
    );
    println!(
        "handover: {} logins ({} counted), {:.1} s in all",
        warmup + logins,
        logins,
        started.elapsed().as_secs_f64()
    );
    drop(conns);
    gw.terminate();
    let odd = gw.odd_log_lines();
    if odd.is_empty() {
        println!("gateway log: no WARN or ERROR lines");
    } else {
        for l in odd.iter().take(10) {
            println!("gateway log: {l}");
        }
    }
    if let Err(e) = pg.stop() {
        eprintln!("stopping PostgreSQL: {e}");
    }
}
