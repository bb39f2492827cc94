//! The control API end to end: a real gateway process against a real PostgreSQL, HTTP over
//! TCP (`ureq`), devices on real sockets. Keys come from `FLEETGATE_API_KEYS` (and a config
//! file in the auth test).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::gateway::{frame, imei, metric_sum, records, wait_until, Device, Gateway};
use common::{TempDir, TestPg};
use fleetgate::protocol::command::{TYPE_COMMAND, TYPE_RESPONSE};
use fleetgate::protocol::tcp::encode_command_frame;
use fleetgate::protocol::{decode_frame, Codec, Frame, Imei, Status};
use serde_json::{json, Value};

const READ_KEY: &str = "rk-3f9a0c2d7e";
const CMD_KEY: &str = "ck-81b44e0a5c";

/// A gateway whose API takes [`READ_KEY`] (scope read) and [`CMD_KEY`] (scope command).
fn start(pg: &TestPg, extra: &[&str]) -> Gateway {
    let keys = format!("{READ_KEY}:read,{CMD_KEY}:command");
    Gateway::start_with_env(&pg.url(), 0, extra, &[("FLEETGATE_API_KEYS", &keys)])
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"))
}

/// How a request presents its key.
#[derive(Clone, Copy)]
enum Key<'a> {
    None,
    Header(&'a str),
    Bearer(&'a str),
}

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    allow: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// A JSON error answer with this status; its message.
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.content_type, "application/json", "{}", self.body);
        let v = self.json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {v}"))
            .to_string()
    }
}

/// The API of one gateway.
struct Http {
    base: String,
    agent: ureq::Agent,
}

impl Http {
    fn new(addr: SocketAddr) -> Http {
        Http {
            base: format!("http://{addr}"),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(20))
                .build(),
        }
    }

    fn send(&self, method: &str, path: &str, key: Key, body: Option<&str>) -> Answer {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        match key {
            Key::None => {}
            Key::Header(k) => req = req.set("x-api-key", k),
            Key::Bearer(k) => req = req.set("authorization", &format!("Bearer {k}")),
        }
        let res = match body {
            Some(b) => req.set("content-type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        Answer {
            status: resp.status(),
            content_type: resp.content_type().to_string(),
            allow: resp.header("allow").map(str::to_string),
            body: resp.into_string().unwrap(),
        }
    }

    fn get(&self, path: &str, key: Key) -> Answer {
        self.send("GET", path, key, None)
    }

    fn read(&self, path: &str) -> Answer {
        self.get(path, Key::Header(READ_KEY))
    }

    fn post(&self, path: &str, key: Key, body: &str) -> Answer {
        self.send("POST", path, key, Some(body))
    }

    /// Queues a command; its id.
    fn command(&self, body: Value) -> i64 {
        let a = self.post("/api/v1/commands", Key::Header(CMD_KEY), &body.to_string());
        assert_eq!(a.status, 202, "{}", a.body);
        let v = a.json();
        assert_eq!(v.as_object().unwrap().len(), 2, "exactly id and state: {v}");
        assert!(
            ["queued", "sent"].contains(&v["state"].as_str().unwrap()),
            "{v}"
        );
        v["id"].as_i64().unwrap()
    }

    /// Polls `GET path` until `cond` holds on its JSON, within `limit`; the last JSON.
    fn poll(&self, path: &str, limit: Duration, cond: impl Fn(&Answer) -> bool) -> Answer {
        let mut last = None;
        let ok = wait_until(limit, || {
            let a = self.read(path);
            let done = cond(&a);
            last = Some(a);
            done
        });
        let last = last.unwrap();
        assert!(
            ok,
            "GET {path}: condition not met in {limit:?}; last answer {last:?}"
        );
        last
    }
}

/// The value of one series (`name{labels}` exactly as exposed).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Reads the next command-family frame the gateway sends to `dev`: (codec, type, the Codec 14
/// IMEI field, payload).
fn read_command(dev: &mut Device) -> (Codec, u8, Option<[u8; 8]>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Ok(Status::Complete((f, _))) = decode_frame(&buf, 1 << 16) {
            match f {
                Frame::Command(c) => return (c.codec, c.kind, c.imei_field, c.payload.to_vec()),
                other => panic!("expected a command frame, got {other:?}"),
            }
        }
        let n = dev
            .stream
            .read(&mut chunk)
            .expect("reading the command frame");
        assert!(n > 0, "the gateway closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Answers a command the way a device does (Codec 12 response).
fn answer(dev: &mut Device, text: &[u8]) {
    let mut out = Vec::new();
    encode_command_frame(Codec::C12, TYPE_RESPONSE, None, text, &mut out);
    dev.send(&out).unwrap();
}

#[test]
fn every_endpoint_but_the_probes_needs_a_key_with_the_scope() {
    let pg = TestPg::start();
    let dir = TempDir::new();
    let config = dir.path().join("fleetgate.toml");
    // One key from the file, one from the environment.
    std::fs::write(&config, "api_keys = [\"cfg-read-7d1e:read\"]\n").unwrap();
    let gw = Gateway::start_with_env(
        &pg.url(),
        0,
        &["--config", config.to_str().unwrap()],
        &[("FLEETGATE_API_KEYS", &format!("{CMD_KEY}:command"))],
    )
    .unwrap();
    let api = Http::new(gw.api);

    let h = api.get("/healthz", Key::None);
    assert_eq!((h.status, h.json()), (200, json!({"status": "ok"})));
    let m = api.get("/metrics", Key::None);
    assert_eq!(m.status, 200);
    assert!(
        m.content_type.starts_with("text/plain"),
        "{}",
        m.content_type
    );
    assert_eq!(api.get("/readyz", Key::None).status, 200);

    let e = api.get("/api/v1/devices", Key::None).error(401);
    assert!(e.contains("API key is required"), "{e}");
    api.get("/api/v1/devices", Key::Header("wrong-key-5a5a"))
        .error(401);
    api.get("/api/v1/stats", Key::Bearer("wrong-key-5a5a"))
        .error(401);
    assert_eq!(
        api.get("/api/v1/devices", Key::Header("cfg-read-7d1e"))
            .status,
        200
    );
    assert_eq!(
        api.get("/api/v1/stats", Key::Bearer("cfg-read-7d1e"))
            .status,
        200
    );
    let cmd = json!({"imei": "356307042441013", "command": "getver"}).to_string();
    let e = api
        .post("/api/v1/commands", Key::Header("cfg-read-7d1e"), &cmd)
        .error(403);
    assert!(e.contains("`command` scope"), "{e}");
    api.send(
        "DELETE",
        "/api/v1/commands/1",
        Key::Bearer("cfg-read-7d1e"),
        None,
    )
    .error(403);
    // The command key reads too, and sends, also as a bearer token.
    assert_eq!(api.get("/api/v1/devices", Key::Header(CMD_KEY)).status, 200);
    let a = api.post("/api/v1/commands", Key::Bearer(CMD_KEY), &cmd);
    assert_eq!(a.status, 202, "{}", a.body);

    // Refusals are counted, by reason...
    let m = api.get("/metrics", Key::None).body;
    let failures = |r: &str| {
        metric(
            &m,
            &format!("fleetgate_api_auth_failures_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(failures("missing_key"), Some(1.0), "{m}");
    assert_eq!(failures("wrong_key"), Some(2.0), "{m}");
    assert_eq!(failures("scope"), Some(2.0), "{m}");
    // ... and logged, never with a key in the log.
    let log = gw.log();
    assert!(log.contains("API request refused"), "{log}");
    for secret in ["wrong-key-5a5a", "cfg-read-7d1e", CMD_KEY] {
        assert!(!log.contains(secret), "a key leaked into the log");
    }

    // The document of it all, behind a key too.
    api.get("/api/v1/openapi.json", Key::None).error(401);
    let doc = api.read_with("/api/v1/openapi.json", "cfg-read-7d1e");
    assert!(
        doc["paths"]["/api/v1/devices/{imei}"]["get"].is_object(),
        "{doc}"
    );
    assert!(
        doc["components"]["schemas"]["CommandView"].is_object(),
        "{doc}"
    );
}

impl Http {
    fn read_with(&self, path: &str, key: &str) -> Value {
        let a = self.get(path, Key::Header(key));
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()
    }
}

#[test]
fn bad_requests_get_a_json_error_saying_what_is_wrong() {
    let pg = TestPg::start();
    let gw = start(&pg, &[]);
    let api = Http::new(gw.api);
    let post = |body: &str| api.post("/api/v1/commands", Key::Header(CMD_KEY), body);

    let cases: &[(&str, &str)] = &[
        ("{\"imei\": ", "invalid JSON"),
        ("[1, 2]", "invalid JSON"),
        (
            r#"{"imei": "356307042441013", "command": "x", "colour": "red"}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"imei": "35630704244101", "command": "x"}"#,
            "15 decimal digits",
        ),
        (
            r#"{"imei": "35630704244101a", "command": "x"}"#,
            "15 decimal digits",
        ),
        (
            r#"{"imei": "356307042441013", "command": "x", "hex": "00"}"#,
            "not both",
        ),
        (
            r#"{"imei": "356307042441013"}"#,
            "command or hex is required",
        ),
        (
            r#"{"imei": "356307042441013", "hex": "zz"}"#,
            "not valid hex",
        ),
        (
            r#"{"imei": "356307042441013", "command": "x", "codec": 8}"#,
            "12 or 14",
        ),
        (
            r#"{"imei": "356307042441013", "command": "x", "metadata": "m"}"#,
            "JSON object",
        ),
    ];
    for (body, why) in cases {
        let e = post(body).error(400);
        assert!(e.contains(why), "{body}: {e}");
    }
    let big = json!({"imei": "356307042441013", "command": "x".repeat(5000)}).to_string();
    assert!(post(&big).error(400).contains("at most 4096"));

    // A body declared larger than 64 KiB is refused before any of it is read.
    let mut s = TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /api/v1/commands HTTP/1.1\r\nhost: x\r\nx-api-key: {CMD_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 70000\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(
        raw.contains("{\"error\":\"the body is larger than 65536 bytes\"}"),
        "{raw}"
    );

    for (path, why) in [
        ("/api/v1/devices?limit=0", "limit must be 1 to 1000"),
        ("/api/v1/devices?limit=1001", "limit must be 1 to 1000"),
        ("/api/v1/devices?limit=ten", "bad query"),
        ("/api/v1/devices?colour=red", "bad query"),
        ("/api/v1/devices?cursor=12", "cursor"),
        ("/api/v1/devices?prefix=35x", "prefix"),
        ("/api/v1/devices/12345", "15 decimal digits"),
        ("/api/v1/devices/12345/commands", "15 decimal digits"),
        ("/api/v1/commands/first", "positive integer"),
    ] {
        let e = api.read(path).error(400);
        assert!(e.contains(why), "{path}: {e}");
    }
    assert!(api
        .read("/api/v1/commands/999999")
        .error(404)
        .contains("no command"));
    api.send(
        "DELETE",
        "/api/v1/commands/999999",
        Key::Header(CMD_KEY),
        None,
    )
    .error(404);
    assert!(api
        .read("/api/v2/devices")
        .error(404)
        .contains("no endpoint"));
    let a = api.send("PUT", "/api/v1/commands/1", Key::Header(CMD_KEY), None);
    a.error(405);
    assert_eq!(a.allow.as_deref(), Some("GET, DELETE"));
    api.send("DELETE", "/api/v1/devices", Key::Header(CMD_KEY), None)
        .error(405);
}

#[test]
fn devices_page_in_imei_order_and_show_their_live_session() {
    let pg = TestPg::start();
    let gw = start(&pg, &[]);
    let api = Http::new(gw.api);

    // 30 devices under two prefixes, connected in no particular order.
    let mut imeis: Vec<Imei> = (0..20)
        .map(|n| imei(356_000_000_000_000 + n * 7))
        .chain((0..10).map(|n| imei(357_000_000_000_000 + n * 13)))
        .collect();
    imeis.reverse();
    let mut devices: Vec<(Imei, Device)> = imeis
        .iter()
        .map(|&i| (i, Device::connect(gw.addr, i)))
        .collect();
    imeis.sort();
    let expected: Vec<String> = imeis.iter().map(|i| i.to_string()).collect();

    // Every device exactly once across pages, in order.
    let pages = |query: &str, limit: usize| -> (Vec<String>, usize) {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut n = 0;
        loop {
            let mut path = format!("/api/v1/devices?limit={limit}{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = api.read(&path);
            assert_eq!(page.status, 200, "{}", page.body);
            let page = page.json();
            n += 1;
            let got = page["devices"].as_array().unwrap();
            assert!(got.len() <= limit);
            seen.extend(got.iter().map(|d| d["imei"].as_str().unwrap().to_string()));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return (seen, n),
            }
            assert!(n < 100, "paging does not end");
        }
    };
    // Logins are handed to their owning shard asynchronously: wait until all are listed.
    assert!(
        wait_until(Duration::from_secs(20), || pages("", 1000).0.len() == 30),
        "not all 30 devices listed"
    );
    assert_eq!(pages("", 7), (expected.clone(), 5));
    assert_eq!(pages("", 30).0, expected);
    assert_eq!(pages("", 29).1, 2);
    let (with_357, _) = pages("&prefix=357", 4);
    assert_eq!(with_357, expected[20..].to_vec());
    let (with_356, _) = pages("&prefix=356000000000", 6);
    assert_eq!(with_356, expected[..20].to_vec());
    // 13 digits: 356000000000000 to ...099.
    assert_eq!(
        pages("&prefix=3560000000000", 100).0,
        expected[..15].to_vec()
    );
    assert_eq!(pages("&prefix=358", 10).0, Vec::<String>::new());

    // A device's live session, and its counters moving after a frame.
    let (id, dev) = devices.iter_mut().find(|(i, _)| *i == imeis[0]).unwrap();
    let path = format!("/api/v1/devices/{id}");
    let before = api.read(&path).json();
    assert_eq!(before["imei"], id.to_string());
    assert_eq!(before["transport"], "tcp");
    assert_eq!(
        before["shard"].as_u64().unwrap() as usize,
        fleetgate::shard::shard_for(*id, 2)
    );
    assert_eq!(
        before["remote_addr"],
        dev.stream.local_addr().unwrap().to_string()
    );
    assert!(before["connected_since"].is_string());
    assert_eq!(before["records_received"], 0);
    let recs = records(Codec::C8E, 3, 1_700_000_000_000, 1);
    assert_eq!(dev.send_frame(&frame(Codec::C8E, &recs)).unwrap(), 3);
    // The ack's bytes are shown once the shard has seen its write end, which can be after
    // the device read them.
    let after = api.poll(&path, Duration::from_secs(10), |a| {
        a.json()["records_received"] == 3 && a.json()["bytes_sent"].as_u64() >= Some(4)
    });
    let after = after.json();
    assert_eq!(after["frames_received"], 1);
    assert!(after["bytes_received"].as_u64().unwrap() > 0);
    assert!(
        after["bytes_sent"].as_u64().unwrap() >= 4,
        "at least the ack: {after}"
    );
    let pos = &after["last_position"];
    let last = recs.last().unwrap();
    assert_eq!(pos["lat"].as_f64().unwrap(), last.lat as f64 / 1e7);
    assert_eq!(pos["time"], "2023-11-14T22:13:22.000Z");

    // Once it disconnects: 404, with its last session from the database.
    let gone = *id;
    devices.retain(|(i, _)| *i != gone);
    let a = api.poll(
        &format!("/api/v1/devices/{gone}"),
        Duration::from_secs(20),
        |a| a.status == 404 && a.json()["last_session"]["event"] == "disconnect",
    );
    let v = a.json();
    assert!(
        v["error"].as_str().unwrap().contains("not connected"),
        "{v}"
    );
    assert_eq!(v["last_session"]["reason"], "closed by peer", "{v}");
    assert!(v["last_session"]["at"].is_string(), "{v}");
    assert!(v["last_session"]["peer"].is_string(), "{v}");
    // A device never seen: no last session.
    let a = api.read("/api/v1/devices/111111111111111");
    a.error(404);
    assert_eq!(a.json()["last_session"], Value::Null);
    // ... and the list no longer has it.
    assert!(wait_until(Duration::from_secs(10), || pages("", 100)
        .0
        .len()
        == 29));
    drop(devices);
}

#[test]
fn stats_and_metrics_count_what_was_acked() {
    let pg = TestPg::start();
    let gw = start(&pg, &[]);
    let api = Http::new(gw.api);

    let mut acked = 0u64;
    let mut devices = Vec::new();
    for n in 0..3u64 {
        let mut dev = Device::connect(gw.addr, imei(356_100_000_000_000 + n));
        for f in 0..2u32 {
            let recs = records(Codec::C8, 4 + n as usize, 1_700_000_000_000, f);
            acked += u64::from(dev.send_frame(&frame(Codec::C8, &recs)).unwrap());
        }
        devices.push(dev);
    }
    assert_eq!(acked, 2 * (4 + 5 + 6));

    // records/s looks a few seconds back: it shows the frames just sent.
    let stats = api.poll("/api/v1/stats", Duration::from_secs(4), |a| {
        let s = a.json();
        s["total"]["records_acked"] == acked && s["total"]["records_per_s"].as_f64() > Some(0.0)
    });
    let s = stats.json();
    assert_eq!(s["total"]["frames_received"], 6, "{s}");
    assert_eq!(s["total"]["connections_open"], 3, "{s}");
    assert_eq!(s["total"]["logins_accepted"], 3, "{s}");
    assert_eq!(s["total"]["logins_refused"], 0, "{s}");
    assert_eq!(s["total"]["bad_frames"], json!({"tcp": 0, "udp": 0}), "{s}");
    assert_eq!(s["shards"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["accepting"], true);
    assert!(
        s["writer"]["records_committed"].as_u64().unwrap() >= acked,
        "{s}"
    );
    // Every committed transaction timed and sized (acks come only after commit).
    let tx = &s["writer"]["transaction_records"];
    assert!(tx["count"].as_u64().unwrap() >= 1, "{s}");
    assert!(tx["max"].as_u64().unwrap() <= acked, "{s}");
    let commit = &s["writer"]["commit_latency_us"];
    assert_eq!(commit["count"], tx["count"], "{s}");
    assert!(commit["p99"].as_u64().unwrap() > 0, "{s}");
    assert!(s["writer"]["queue_depth"].is_u64(), "{s}");
    assert!(s["memory_rss_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    assert!(s["uptime_s"].as_f64().unwrap() > 0.0, "{s}");
    let per_shard: u64 = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sh| sh["records_acked"].as_u64().unwrap())
        .sum();
    assert_eq!(per_shard, acked);

    // The same counters in Prometheus text.
    let m = api.get("/metrics", Key::None).body;
    assert_eq!(
        metric_sum(&m, "fleetgate_records_acked_total"),
        acked as f64,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "fleetgate_frames_received_total"),
        6.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "fleetgate_connections_open"), 3.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "fleetgate_logins_total{shard=\"0\",result=\"accepted\"}"
        )
        .unwrap()
            + metric(
                &m,
                "fleetgate_logins_total{shard=\"1\",result=\"accepted\"}"
            )
            .unwrap(),
        3.0
    );
    assert!(metric_sum(&m, "fleetgate_writer_records_committed_total") >= acked as f64);
    assert!(
        m.contains("# TYPE fleetgate_writer_commit_seconds histogram"),
        "{m}"
    );
    assert_eq!(
        metric(&m, "fleetgate_writer_transaction_records_sum"),
        metric(&m, "fleetgate_writer_records_committed_total"),
        "{m}"
    );
    assert!(
        metric(&m, "fleetgate_writer_commit_seconds_count").unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "fleetgate_shard_accepting"), 2.0);
    assert!(metric_sum(&m, "fleetgate_rows_awaiting_commit_limit_bytes") > 0.0);
    assert!(
        m.contains("# TYPE fleetgate_records_acked_total counter"),
        "{m}"
    );
    assert!(m.contains("# TYPE fleetgate_uptime_seconds gauge"), "{m}");
    assert!(metric_sum(&m, "process_resident_memory_bytes") > 0.0, "{m}");
    // A bad frame is counted as one.
    let mut bad = Device::connect(gw.addr, imei(356_100_000_000_099));
    bad.send(&[
        0, 0, 0, 0, 0, 0, 0, 9, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0,
    ])
    .unwrap();
    assert!(bad.closed_within(Duration::from_secs(10)));
    api.poll("/api/v1/stats", Duration::from_secs(10), |a| {
        a.json()["total"]["bad_frames"]["tcp"] == 1
    });
    drop(devices);
}

#[test]
fn readyz_reports_the_database_going_away() {
    let mut pg = TestPg::start();
    let gw = start(&pg, &[]);
    let api = Http::new(gw.api);
    let r = api.get("/readyz", Key::None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"status": "ready", "failed": [], "database": "ok", "shards": "ok"})
    );

    pg.pg.stop().unwrap();
    let mut last = None;
    let down = wait_until(Duration::from_secs(20), || {
        let r = api.get("/readyz", Key::None);
        let down = r.status == 503;
        last = Some(r);
        down
    });
    let r = last.unwrap();
    assert!(down, "still ready with the database stopped: {}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "not ready");
    assert_eq!(v["failed"], json!(["database"]), "{v}");
    assert_eq!(v["shards"], "ok");
    // The probes that need no database still answer, and a database error is a 503 JSON.
    assert_eq!(api.get("/healthz", Key::None).status, 200);
    api.read("/api/v1/commands/1").error(503);
}

#[test]
fn the_api_refuses_to_start_open_without_keys_or_on_a_taken_port() {
    let pg = TestPg::start();
    let e = Gateway::start_with_env(&pg.url(), 0, &["--api-addr", "0.0.0.0:0"], &[])
        .err()
        .expect("started an API open to the network without keys");
    assert!(e.contains("without an API key"), "{e}");
    assert!(e.contains("exit Some("), "the gateway did not exit: {e}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = Gateway::start_with_env(&pg.url(), 0, &["--api-addr", &addr], &[])
        .err()
        .expect("started on a taken API port");
    assert!(e.contains("cannot bind the API address"), "{e}");

    // A bad key is named by its position, not shown.
    let e = Gateway::start_with_env(
        &pg.url(),
        0,
        &[],
        &[("FLEETGATE_API_KEYS", "good-key:read,s3cret-key:admin")],
    )
    .err()
    .expect("started with a bad key");
    assert!(e.contains("FLEETGATE_API_KEYS entry 2"), "{e}");
    assert!(!e.contains("s3cret-key"), "{e}");
}

#[test]
fn a_posted_command_reaches_the_device_socket_as_a_command_frame() {
    let pg = TestPg::start();
    let gw = start(&pg, &[]);
    let api = Http::new(gw.api);
    let (a, b) = (imei(356_307_042_441_013), imei(356_307_042_441_014));
    let mut dev_a = Device::connect(gw.addr, a);
    let mut dev_b = Device::connect(gw.addr, b);
    for d in [a, b] {
        // Listed once its owning shard has it: the dispatcher hears of it at the same time.
        api.poll(
            &format!("/api/v1/devices/{d}"),
            Duration::from_secs(10),
            |r| r.status == 200,
        );
    }

    let id = api.command(json!({
        "imei": a.to_string(), "command": "setdigout 1", "metadata": {"ticket": 42}
    }));
    let (codec, kind, imei_field, payload) = read_command(&mut dev_a);
    assert_eq!((codec, kind, imei_field), (Codec::C12, TYPE_COMMAND, None));
    assert_eq!(payload, b"setdigout 1");
    let v = api
        .poll(
            &format!("/api/v1/commands/{id}"),
            Duration::from_secs(10),
            |r| r.json()["state"] == "sent",
        )
        .json();
    assert_eq!(v["imei"], a.to_string());
    assert_eq!(v["command"], "setdigout 1");
    assert_eq!(v["metadata"], json!({"ticket": 42}));
    assert_eq!(v["attempts"], 1);
    assert!(v["sent_at"].is_string(), "{v}");
    let d = api.read(&format!("/api/v1/devices/{a}")).json();
    assert_eq!(d["commands_sent"], 1, "{d}");

    // The device's history; a cancel once it is sent is too late.
    let h = api
        .read(&format!("/api/v1/devices/{a}/commands?limit=10"))
        .json();
    assert_eq!(h["commands"].as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h["commands"][0]["id"], id, "{h}");
    assert_eq!(h["next_before"], Value::Null);
    let late = api.send(
        "DELETE",
        &format!("/api/v1/commands/{id}"),
        Key::Header(CMD_KEY),
        None,
    );
    assert!(late.error(409).contains("only a queued command"));
    assert_eq!(late.json()["command"]["state"], "sent");

    // A binary payload in Codec 14 carries the device's IMEI.
    let id = api.command(json!({"imei": b.to_string(), "hex": "00ff10", "codec": 14}));
    let (codec, kind, imei_field, payload) = read_command(&mut dev_b);
    assert_eq!((codec, kind), (Codec::C14, TYPE_COMMAND));
    assert_eq!(imei_field, Some(b.to_bcd_field()));
    assert_eq!(payload, [0x00, 0xff, 0x10]);
    let v = api.read(&format!("/api/v1/commands/{id}")).json();
    assert_eq!(
        (v["hex"].as_str(), v["codec"].as_i64()),
        (Some("00ff10"), Some(14))
    );
    assert_eq!(v["command"], Value::Null);
}

#[test]
fn a_command_for_an_offline_device_is_sent_when_it_logs_in() {
    let pg = TestPg::start();
    let gw = start(&pg, &[]);
    let api = Http::new(gw.api);
    let id_ = imei(352_093_081_452_251);

    let id = api.command(json!({"imei": id_.to_string(), "command": "getinfo", "ttl_s": 600}));
    let q = api.read(&format!("/api/v1/commands/{id}")).json();
    assert_eq!(q["state"], "queued", "{q}");
    assert!(q["expires_at"].is_string(), "{q}");

    // A queued command can be cancelled, once.
    let other = api.command(json!({"imei": "352093081452252", "command": "cpureset"}));
    let path = format!("/api/v1/commands/{other}");
    let c = api.send("DELETE", &path, Key::Header(CMD_KEY), None);
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.json()["state"], "cancelled");
    let again = api.send("DELETE", &path, Key::Header(CMD_KEY), None);
    again.error(409);
    assert_eq!(again.json()["command"]["state"], "cancelled");

    let mut dev = Device::connect(gw.addr, id_);
    let (codec, kind, _, payload) = read_command(&mut dev);
    assert_eq!((codec, kind), (Codec::C12, TYPE_COMMAND));
    assert_eq!(payload, b"getinfo");
    api.poll(
        &format!("/api/v1/commands/{id}"),
        Duration::from_secs(10),
        |a| a.json()["state"] == "sent",
    );
}

/// The whole round trip: command out, the device's Codec 12 response back, state `completed`.
#[test]
fn a_devices_answer_completes_its_command() {
    let pg = TestPg::start();
    let gw = start(&pg, &[]);
    let api = Http::new(gw.api);
    let id_ = imei(356_307_042_441_013);
    let mut dev = Device::connect(gw.addr, id_);
    let id = api.command(json!({"imei": id_.to_string(), "command": "setdigout 1"}));
    let (_, kind, _, payload) = read_command(&mut dev);
    assert_eq!(
        (kind, payload.as_slice()),
        (TYPE_COMMAND, &b"setdigout 1"[..])
    );
    answer(&mut dev, b"DOUT1:1");
    let v = api
        .poll(
            &format!("/api/v1/commands/{id}"),
            Duration::from_secs(10),
            |a| a.json()["state"] == "completed",
        )
        .json();
    assert_eq!(v["response"], "DOUT1:1", "{v}");
    assert!(v["finished_at"].is_string(), "{v}");

    // Answered, the device is free for the next command, delivered at once.
    let id2 = api.command(json!({"imei": id_.to_string(), "command": "getver"}));
    let (_, _, _, payload) = read_command(&mut dev);
    assert_eq!(payload, b"getver");
    answer(&mut dev, b"Ver:03.27.07");
    let v = api
        .poll(
            &format!("/api/v1/commands/{id2}"),
            Duration::from_secs(10),
            |a| a.json()["state"] == "completed",
        )
        .json();
    assert_eq!(v["response"], "Ver:03.27.07");
}

/// Checks a webhook request's signature the way a receiver would: HMAC-SHA256 with the
/// route's secret over `t.BODY`, compared with the `v1` of `X-Fleetgate-Signature`.
fn assert_signed(r: &common::receiver::Received, secret: &str) {
    use hmac::{Hmac, Mac};
    let sig = r.header("x-fleetgate-signature").expect("signature header");
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .unwrap_or_else(|| panic!("malformed signature {sig}"));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{}", r.body).as_bytes());
    assert_eq!(
        hex::encode(mac.finalize().into_bytes()),
        v1,
        "bad signature"
    );
    assert_eq!(r.header("x-fleetgate-event-id"), Some(r.id().as_str()));
}

/// A backend told by webhooks: a device connecting, its command completing (with the caller's
/// metadata and the device's answer), and its disconnection, which a receiver that is down
/// across a gateway restart still gets once it is back.
#[test]
fn webhooks_tell_the_backend_what_happened_signed_and_across_a_restart() {
    let pg = TestPg::start();
    let rx = common::receiver::Receiver::start(200);
    let dir = TempDir::new();
    let config = dir.path().join("fleetgate.toml");
    let secret = "wh-5ecret-91";
    std::fs::write(
        &config,
        format!(
            "[[routes]]\nname = \"backend\"\ntopics = [\"devices/+/connected\", \"devices/+/disconnected\", \"commands/#\"]\nurl = \"{}\"\nsecret = \"{secret}\"\n",
            rx.url("/hook")
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let mut gw = start(&pg, &["--config", cfg]);
    let api = Http::new(gw.api);
    let id_ = imei(356_307_042_441_013);
    let topic = |t: &str| format!("devices/{id_}/{t}");
    let got = |t: &str| {
        rx.delivered()
            .into_iter()
            .filter(|r| r.json()["topic"] == t)
            .count()
    };

    let mut dev = Device::connect(gw.addr, id_);
    assert!(wait_until(Duration::from_secs(15), || got(&topic(
        "connected"
    )) == 1));
    let id = api.command(json!({
        "imei": id_.to_string(), "command": "setdigout 1", "metadata": {"ticket": "T-17"}
    }));
    read_command(&mut dev);
    answer(&mut dev, b"DOUT1:1");
    let completed = format!("commands/{id}/completed");
    assert!(wait_until(Duration::from_secs(15), || got(&completed) == 1));
    for r in rx.delivered() {
        assert_signed(&r, secret);
    }
    let ev = rx
        .delivered()
        .into_iter()
        .find(|r| r.json()["topic"] == completed)
        .unwrap()
        .json();
    let data = &ev["data"];
    assert_eq!(data["imei"], json!(id_.to_string()), "{ev}");
    assert_eq!(data["command_id"], json!(id), "{ev}");
    assert_eq!(data["response"], "DOUT1:1", "{ev}");
    assert_eq!(data["metadata"], json!({"ticket": "T-17"}), "{ev}");
    assert_eq!(data["state"], "completed", "{ev}");
    // Counted once the receiver's answer is back, which is after it recorded the request.
    let mut metrics = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            metrics = api.get("/metrics", Key::None).body;
            metric(
                &metrics,
                "fleetgate_webhook_attempts_total{outcome=\"delivered\"}",
            ) >= Some(2.0)
        }),
        "{metrics}"
    );
    assert!(metric_sum(&metrics, "fleetgate_events_published_total") >= 1.0);

    // The receiver goes down; the device disconnects; the gateway restarts; the receiver
    // comes back: the disconnection still arrives, once.
    rx.set_status(503);
    drop(dev);
    assert!(wait_until(Duration::from_secs(15), || rx
        .received()
        .iter()
        .any(|r| r.json()["topic"] == topic("disconnected"))));
    assert_eq!(got(&topic("disconnected")), 0);
    gw.terminate(Duration::from_secs(30))
        .expect("gateway stops");
    let _gw2 = start(&pg, &["--config", cfg]);
    rx.set_status(200);
    assert!(wait_until(Duration::from_secs(30), || got(&topic(
        "disconnected"
    )) == 1));
    assert_eq!(
        got(&topic("connected")),
        1,
        "delivered events are not sent again"
    );
}

/// Two gateways share one database (a load balancer spreads trackers over them): a command
/// posted to either reaches the device where it is connected, and completes.
#[test]
fn a_command_posted_to_one_gateway_reaches_a_device_on_another() {
    let pg = TestPg::start();
    let a = start(&pg, &[]);
    let b = start(&pg, &[]);
    let id_ = imei(356_307_042_441_013);
    let mut dev = Device::connect(b.addr, id_);
    let (api_a, api_b) = (Http::new(a.api), Http::new(b.api));
    // Wait until gateway B knows the device (its devices list shows it).
    api_b.poll("/api/v1/devices", Duration::from_secs(10), |r| {
        r.json()["devices"].as_array().is_some_and(|d| d.len() == 1)
    });
    for (n, api) in [&api_a, &api_b, &api_a].into_iter().enumerate() {
        let text = format!("getparam {n}");
        let id = api.command(json!({"imei": id_.to_string(), "command": text}));
        let (_, kind, _, payload) = read_command(&mut dev);
        assert_eq!((kind, payload), (TYPE_COMMAND, text.clone().into_bytes()));
        answer(&mut dev, format!("answer {n}").as_bytes());
        let v = api_a
            .poll(
                &format!("/api/v1/commands/{id}"),
                Duration::from_secs(10),
                |r| r.json()["state"] == "completed",
            )
            .json();
        assert_eq!(v["response"], format!("answer {n}"));
    }
    // Sent once each: nothing more arrives on the device's socket.
    dev.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b1 = [0u8; 1];
    assert!(
        dev.stream.read(&mut b1).is_err(),
        "a command was sent twice"
    );
}
