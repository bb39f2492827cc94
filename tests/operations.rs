//! What an operator meets: logs in a file (no colour codes; JSON lines on request), the
//! environment overriding the configuration, and the descriptor limit (raised at start, warned
//! about when short, and running out of descriptors counted, logged and survived). Runs the
//! real binary against a real PostgreSQL.

mod common;

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::gateway::{
    api_get as get, frame, imei, metric_sum, records, wait_until, Device, Gateway,
};
use common::TestPg;
use fleetgate::protocol::Codec;

/// Some of everything a running gateway logs: a device that logs in, sends and is acked,
/// a connection that sends garbage, one that never logs in.
fn exercise(g: &Gateway) {
    let mut dev = Device::connect(g.addr, imei(356307042441013));
    let recs = records(Codec::C8E, 3, 1_700_000_000_000, 1);
    assert_eq!(dev.send_frame(&frame(Codec::C8E, &recs)).unwrap(), 3);
    drop(dev);
    let mut bad = TcpStream::connect(g.addr).unwrap();
    std::io::Write::write_all(&mut bad, b"\xff\xffGET / HTTP/1.1\r\n\r\n").unwrap();
    drop(TcpStream::connect(g.addr).unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || g
            .log()
            .contains("Bad input; closing the connection.")),
        "the bad connection was not logged"
    );
}

/// The `failures=N` field of a log line.
fn failures_field(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("failures="))?
        .parse()
        .ok()
}

/// Sets RLIMIT_NOFILE of the process about to be spawned.
fn with_nofile(soft: u64, hard: u64) -> impl FnOnce(&mut Command) {
    with_rlimit(libc::RLIMIT_NOFILE, soft, hard)
}

/// Sets a resource limit of the process about to be spawned.
fn with_rlimit(
    resource: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
) -> impl FnOnce(&mut Command) {
    move |cmd| {
        // SAFETY: between fork and exec only setrlimit(2) runs, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(resource, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// This process's RLIMIT_NOFILE (the gateway's children inherit it).
fn nofile() -> (u64, u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
    (l.rlim_cur as u64, l.rlim_max as u64)
}

/// The "Max open files" soft and hard limits of process `pid`.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

#[test]
fn a_log_file_holds_no_colour_codes() {
    let pg = TestPg::start();
    let mut g = Gateway::start(&pg.url(), &[]);
    exercise(&g);
    assert!(g
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let log = g.log();
    assert!(log.contains("fleetgate ready.") && log.contains("fleetgate stopped."));
    if let Some(at) = log.find('\u{1b}') {
        panic!(
            "an escape code in the log file at byte {at}: {:?}",
            &log[at.saturating_sub(60)..(at + 20).min(log.len())]
        );
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let pg = TestPg::start();
    // Through its environment variable: the override of a key as a real process reads it.
    let mut g = Gateway::start_with_env(&pg.url(), 0, &[], &[("FLEETGATE_LOG_FORMAT", "json")])
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    exercise(&g);
    assert!(g
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let log = g.log();
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        let level = v["level"].as_str().unwrap_or_default();
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "no level: {line}"
        );
        let message = v["fields"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fields.message: {line}"));
        messages.push(message.to_string());
    }
    for m in [
        "fleetgate ready.",
        "Bad input; closing the connection.",
        "fleetgate stopped.",
    ] {
        assert!(messages.iter().any(|x| x == m), "{m:?} not logged: {log}");
    }
}

#[test]
fn an_unknown_or_bad_variable_stops_serve_naming_it() {
    for (var, value, says) in [
        (
            "FLEETGATE_MAX_CONECTIONS_PER_SHARD",
            "10",
            "FLEETGATE_MAX_CONECTIONS_PER_SHARD is not a configuration option",
        ),
        ("FLEETGATE_DEVICE_PORT", "port", "option `device_port`"),
        ("FLEETGATE_LOG_FORMAT", "xml", "option `log_format`"),
    ] {
        // Refused while reading the configuration: no database is needed to see it.
        let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["serve", "--database-url", "host=/nonexistent"])
            .env_remove("FLEETGATE_CONFIG")
            .env(var, value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(
            stderr.contains(var) && stderr.contains(says),
            "{var}={value}: {stderr}"
        );
    }
}

#[test]
fn the_descriptor_soft_limit_is_raised_to_the_hard_limit() {
    let (_, hard) = nofile();
    assert!(
        hard >= 4096,
        "this test needs a descriptor hard limit of at least 4096, not {hard}"
    );
    let pg = TestPg::start();
    // 2 shards x 1000 connections + the margin fit under the hard limit, not under 1024.
    let g = Gateway::start_with_command(
        &pg.url(),
        0,
        &["--max-connections-per-shard", "1000"],
        &[],
        with_nofile(1024, hard),
    )
    .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    assert_eq!(open_files_limit(g.pid()), (hard, hard));
    let log = g.log();
    assert!(
        log.contains("Raised the descriptor soft limit"),
        "not logged: {log}"
    );
    assert!(
        !log.contains("Descriptor limit"),
        "warned needlessly: {log}"
    );
}

#[test]
fn running_out_of_descriptors_is_warned_counted_logged_and_survived() {
    const LIMIT: u64 = 256;
    let pg = TestPg::start();
    // Soft and hard alike: the gateway cannot raise it, and says so.
    let g = Gateway::start_with_command(&pg.url(), 0, &[], &[], with_nofile(LIMIT, LIMIT))
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    let log = g.log();
    assert!(
        log.contains("Descriptor limit (RLIMIT_NOFILE) below what the connection cap may need")
            && log.contains("LimitNOFILE="),
        "no warning in the log: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("fleetgate: warning: the descriptor limit is 256")),
        "no plain line on standard error: {log}"
    );
    let before = metric_sum(
        &get(g.api, "/metrics").expect("metrics"),
        "fleetgate_accept_errors_total",
    );
    assert_eq!(before, 0.0);

    // More connections than the gateway has descriptors: the kernel completes them all (the
    // backlog), the gateway cannot accept them all.
    let clients: Vec<TcpStream> = (0..LIMIT + 64)
        .map(|_| TcpStream::connect(g.addr).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || g
            .log()
            .contains("Too many open files")),
        "no failed accept logged"
    );
    // The API's listener runs out too: a connection waits in its backlog, every accept of it
    // fails (retried every 100 ms) and is counted; logged once, not ten times a second.
    let api_probe = TcpStream::connect(g.api).unwrap();
    // Held until a shard has failed a hundred times (it retries every 10 ms): logged with the
    // count, not once per failure, nor in a burst of lines.
    let mut busy_shard = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let log = g.log();
            let line = log.lines().find(|l| {
                l.contains("Accept failed") && failures_field(l).is_some_and(|n| n >= 100)
            });
            if let Some(l) = line {
                busy_shard = l
                    .split_whitespace()
                    .find(|w| w.starts_with("shard="))
                    .unwrap()
                    .to_string();
            }
            line.is_some()
        }),
        "no line counting a hundred failed accepts: {}",
        g.log()
    );
    let lines = g
        .log()
        .lines()
        .filter(|l| l.contains("Accept failed") && l.split_whitespace().any(|w| w == busy_shard))
        .count();
    assert_eq!(
        lines, 2,
        "{busy_shard}: the first failure, then one line with the count"
    );
    drop(clients);

    // The descriptors come back as the connections close; the API answers again.
    let mut errors = 0.0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            errors = get(g.api, "/metrics")
                .map(|m| metric_sum(&m, "fleetgate_accept_errors_total"))
                .unwrap_or(0.0);
            errors > 0.0
        }),
        "accept errors not counted"
    );
    assert!(errors >= 100.0, "{errors} accept errors counted");
    drop(api_probe);
    let api_errors = get(g.api, "/metrics")
        .map(|m| metric_sum(&m, "fleetgate_api_accept_errors_total"))
        .unwrap_or(0.0);
    assert!(api_errors >= 2.0, "{api_errors} API accept errors counted");
    let api_lines = g
        .log()
        .lines()
        .filter(|l| l.contains("Accepting an API connection failed"))
        .count();
    assert!(
        (1..=2).contains(&api_lines),
        "{api_lines} lines for {api_errors} failed API accepts:\n{}",
        g.log()
    );

    // And it serves again: a device logs in, sends, is acked.
    let mut dev = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            dev = Device::login(g.addr, imei(356307042441013))
                .ok()
                .filter(|(_, reply)| *reply == 1);
            dev.is_some()
        }),
        "no login after the descriptors came back"
    );
    let (mut dev, _) = dev.unwrap();
    let recs = records(Codec::C8E, 2, 1_700_000_000_000, 2);
    assert_eq!(dev.send_frame(&frame(Codec::C8E, &recs)).unwrap(), 2);
}

#[test]
fn the_dashboard_queries_only_metrics_the_gateway_exposes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() > 20, "{} queries", exprs.len());
    // Every `fleetgate_…`/`process_…` word of every query.
    let mut queried = std::collections::BTreeSet::new();
    for e in &exprs {
        for (at, _) in e.match_indices(|c: char| c == 'f' || c == 'p') {
            let word: String = e[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let starts_word = at == 0 || !e.as_bytes()[at - 1].is_ascii_alphanumeric();
            if starts_word && (word.starts_with("fleetgate_") || word.starts_with("process_")) {
                queried.insert(word);
            }
        }
    }

    let pg = TestPg::start();
    let g = Gateway::start(&pg.url(), &[]);
    let text = get(g.api, "/metrics").expect("metrics");
    let exposed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = queried
        .iter()
        .filter(|m| !exposed.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exposed: {missing:?}\n{text}"
    );
    for m in [
        "fleetgate_records_acked_total",
        "fleetgate_rows_awaiting_commit_limit_bytes",
        "fleetgate_accept_errors_total",
        "process_resident_memory_bytes",
    ] {
        assert!(queried.contains(m), "the dashboard does not show {m}");
    }
}

#[test]
fn too_little_locked_memory_for_io_uring_stops_serve_at_once_saying_which_limit() {
    // Under glommio's 512 KiB minimum the shards cannot start: said before anything starts
    // (no database is reached), rather than as shards that time out 30 s later.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
    cmd.args([
        "serve",
        "--database-url",
        "host=/nonexistent",
        "--shards",
        "2",
    ])
    .args(["--api-addr", "127.0.0.1:0", "--device-port", "0"])
    .env_remove("FLEETGATE_CONFIG")
    .stdin(Stdio::null());
    with_rlimit(libc::RLIMIT_MEMLOCK, 256 * 1024, 256 * 1024)(&mut cmd);
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("RLIMIT_MEMLOCK") && stderr.contains("LimitMEMLOCK="),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn normal_traffic_logs_no_line_per_frame_or_session_at_info() {
    let pg = TestPg::start();
    // The default filter (the harness asks for debug).
    let mut g = Gateway::start_with_env(&pg.url(), 0, &[], &[("RUST_LOG", "info")])
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    let imeis: Vec<u64> = (0..20).map(|i| 356307042441013 + i * 1_000_000).collect();
    for (n, &i) in imeis.iter().enumerate() {
        let mut dev = Device::connect(g.addr, imei(i));
        for f in 0..3u64 {
            let recs = records(Codec::C8E, 2, 1_700_000_000_000 + f * 10_000, n as u32);
            assert_eq!(dev.send_frame(&frame(Codec::C8E, &recs)).unwrap(), 2);
        }
    }
    assert!(g
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let log = g.log();
    // Every shard is listening before the gateway says it is ready (the CI run of f0b9440 saw
    // shard 1's line after the ready line).
    let (start_up, _) = log.split_once("fleetgate ready.").expect("a ready line");
    for shard in ["shard=0", "shard=1"] {
        assert!(
            start_up
                .lines()
                .any(|l| l.contains("Shard listening.") && l.contains(shard)),
            "{shard} not listening before the ready line:\n{log}"
        );
    }
    let during = lines_during(&log);
    // At most a few one-time lines (threads that finish starting after the ready line: writer
    // threads connecting, the event deliverer starting as the control thread comes up):
    // nothing per frame or per device.
    let once = ["Writer connected", "deliverer started", "API listening"];
    assert!(
        during.len() <= 6 && during.iter().all(|l| once.iter().any(|o| l.contains(o))),
        "logged at info during normal traffic (60 frames, 20 sessions):\n{}",
        during.join("\n")
    );
    for i in imeis {
        assert!(!log.contains(&i.to_string()), "device {i} named in the log");
    }
}

/// The lines of `log` after the ready line, up to the shutdown line. Anchored on the ready
/// line itself, not on how much of the log had been read when the harness saw the gateway
/// ready: the reader of standard error may lag behind the start-up lines.
fn lines_during(log: &str) -> Vec<&str> {
    log.lines()
        .skip_while(|l| !l.contains("fleetgate ready."))
        .skip(1)
        .take_while(|l| !l.contains("shutting down."))
        .collect()
}

#[test]
fn hostile_traffic_logs_no_line_per_connection_datagram_or_request_at_info() {
    const N: usize = 40;
    let pg = TestPg::start();
    // Every login refused (empty allow-list), a connection cap the burst below exceeds, and
    // an API key so that wrong keys are refused.
    let mut g = Gateway::start_with_env(
        &pg.url(),
        0,
        &[
            "--device-policy",
            "allow_list",
            "--max-connections-per-shard",
            "8",
        ],
        &[("RUST_LOG", "info"), ("FLEETGATE_API_KEYS", "right:read")],
    )
    .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    let metrics =
        |name: &str| get(g.api, "/metrics").map_or(0.0, |m| metric_sum(&m, name)) as usize;
    let imeis: Vec<u64> = (0..N as u64)
        .map(|i| 356307042441013 + i * 1_000_000)
        .collect();
    // Logins the policy refuses (answered 00), then garbage, then connections that close
    // before logging in: one at a time, so that none meets the cap.
    for &i in &imeis {
        let (_dev, reply) = Device::login(g.addr, imei(i)).expect("login answered");
        assert_eq!(reply, 0, "{i} was let in");
    }
    for _ in 0..N {
        let mut bad = TcpStream::connect(g.addr).unwrap();
        std::io::Write::write_all(&mut bad, b"\xff\xffGET / HTTP/1.1\r\n\r\n").unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut bad, &mut sink);
    }
    for _ in 0..N {
        drop(TcpStream::connect(g.addr).unwrap());
    }
    // Datagrams: garbage, and devices the policy does not admit.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let recs = records(Codec::C8E, 1, 1_700_000_000_000, 1);
    for (n, &i) in imeis.iter().enumerate() {
        udp.send_to(b"\x00\x01garbage", g.addr).unwrap();
        let d = common::gateway::datagram(n as u16, imei(i), Codec::C8E, &recs);
        udp.send_to(&d, g.addr).unwrap();
    }
    // A burst of connections held open past the cap (2 shards x 8).
    let held: Vec<TcpStream> = (0..N)
        .filter_map(|_| TcpStream::connect(g.addr).ok())
        .collect();
    // API requests with a wrong key.
    for _ in 0..N {
        let r = ureq::get(&format!("http://{}/api/v1/stats", g.api))
            .set("x-api-key", "wrong")
            .call();
        assert!(matches!(r, Err(ureq::Error::Status(401, _))), "{r:?}");
    }
    // All of it reached the gateway.
    assert!(
        wait_until(Duration::from_secs(20), || {
            // Refused logins and datagrams of refused devices count as refused logins (as
            // does the garbage on TCP, a bad login); the bad datagrams as bad frames.
            metrics("fleetgate_logins_total") >= 2 * N
                && metrics("fleetgate_bad_frames_total") >= N
                && metrics("fleetgate_connections_refused_total") >= 1
                && metrics("fleetgate_api_auth_failures_total") >= N
        }),
        "{}",
        get(g.api, "/metrics").unwrap_or_default()
    );
    drop(held);
    assert!(g
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let log = g.log();
    let during = lines_during(&log);
    // One-time lines, and the rate-limited ones: at most one per shard or per period.
    let allowed = [
        ("Writer connected", 2),
        ("deliverer started", 1),
        ("API listening", 1),
        ("Allow-list changed", 1),
        ("Connections refused: connection limit reached", 2),
        ("API request refused", 1),
    ];
    for l in &during {
        assert!(
            allowed.iter().any(|(a, _)| l.contains(a)),
            "logged at info under hostile traffic ({N} refused logins, garbage connections, \
             silent connections, bad datagrams, refused datagrams, a burst past the cap, \
             wrong API keys):\n{}",
            during.join("\n")
        );
    }
    for (a, most) in allowed {
        let n = during.iter().filter(|l| l.contains(a)).count();
        assert!(n <= most, "{n} lines of {a:?}:\n{}", during.join("\n"));
    }
    for i in imeis {
        assert!(!log.contains(&i.to_string()), "device {i} named in the log");
    }
}
