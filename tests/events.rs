//! Events and webhooks: the outbox in a real PostgreSQL, the deliverer on its own thread and
//! runtime, real HTTP receivers on 127.0.0.1 (tests/common/receiver.rs), and the writer
//! threads putting session and telemetry events into the outbox.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use common::gateway::{frame, imei, records, wait_until};
use common::receiver::{Received, Receiver, ReservedPort};
use common::TestPg;
use fleetgate::config::RouteConfig;
use fleetgate::control::events::topic::FILTER_CASES;
use fleetgate::control::events::{
    publish, publish_command_event, publish_device_event, routes_from_config, run_deliverer,
    CommandEvent, CommandEventData, DelivererConfig, DeviceEvent, EventStats, TopicFilter,
};
use fleetgate::protocol::{decode_frame, Codec, Frame, Status};
use fleetgate::shard::budget::ByteBudget;
use fleetgate::shard::copy::encode_rows;
use fleetgate::sink::writer::{self, WriterConfig};
use fleetgate::sink::{SessionEvent, TelemetryEvent, WriteOutcome, WriterBatch};
use futures::channel::oneshot;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec_0123456789";

// ===== helpers =====

/// A database connection for the test's own queries, on a runtime of its own.
struct Db {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Db {
    fn new(pg: &TestPg) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(pg.client());
        Db { rt, client }
    }

    /// Publishes a device event whose data is `{"imei", "seq"}`; returns its id.
    fn publish_seq(&self, imei: u64, seq: u32) -> i64 {
        let data = json!({"imei": format!("{imei:015}"), "seq": seq});
        self.rt
            .block_on(publish_device_event(
                &self.client,
                imei,
                DeviceEvent::Telemetry,
                &data,
            ))
            .unwrap()
    }

    fn scalar(&self, sql: &str) -> i64 {
        self.rt
            .block_on(self.client.query_one(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Whether every route's cursor is past every event in the outbox (all delivered or
    /// passed over), i.e. nothing more will be sent.
    fn all_routes_caught_up(&self, routes: usize) -> bool {
        self.scalar(
            "SELECT count(*) FROM event_routes r
              WHERE (r.cursor_tx, r.cursor_id) >= ALL (SELECT tx, id FROM events)",
        ) == routes as i64
    }
}

/// A deliverer on its own thread and current-thread runtime, as the control thread runs it.
struct Running {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<EventStats>,
}

impl Running {
    fn start(cfg: DelivererConfig) -> Running {
        // RUST_LOG=fleetgate=debug shows the deliverer's logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (stop, rx) = watch::channel(false);
        let stats = cfg.stats.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run_deliverer(cfg, rx));
        });
        Running {
            stop,
            thread: Some(thread),
            stats,
        }
    }

    /// Stops it and waits for it to end (it finishes what is in flight and releases its
    /// leases first).
    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            t.join().expect("the deliverer panicked");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.halt();
    }
}

fn route(name: &str, topics: &[&str], url: String) -> RouteConfig {
    RouteConfig {
        name: Some(name.into()),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        url,
        secret: SECRET.into(),
    }
}

/// A deliverer config with test timings: quick retries, short leases, no pruning.
fn deliverer(pg: &TestPg, routes: &[RouteConfig], gateway: &str) -> DelivererConfig {
    let timeout = Duration::from_secs(2);
    let mut c = DelivererConfig::new(
        pg.url(),
        routes_from_config(routes, timeout).unwrap(),
        gateway.into(),
    );
    c.request_timeout = timeout;
    c.retry_min = Duration::from_millis(20);
    c.retry_max = Duration::from_millis(200);
    c.lease_ttl = Duration::from_secs(4);
    c.prune_every = Duration::from_secs(3600);
    c
}

/// Checks the signature header the way a receiver would: HMAC-SHA256 over `t.BODY`.
fn assert_signed(r: &Received) {
    let header = r.header("x-fleetgate-signature").expect("signature header");
    let (t, v1) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
        .unwrap_or_else(|| panic!("signature header {header:?}"));
    let t: u64 = t.parse().expect("t is unix seconds");
    let now = fleetgate::time::unix_now_ms() / 1000;
    assert!(t <= now && now - t < 120, "t={t} now={now}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(r.body.as_bytes());
    assert_eq!(v1, hex::encode(mac.finalize().into_bytes()), "signature");
    assert!(
        v1.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "lowercase hex: {v1}"
    );
}

/// Per device (the body's `data.imei`), the `data.seq`s in arrival order.
fn seqs_per_device(rs: &[Received]) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in rs {
        let b = r.json();
        let imei = b["data"]["imei"].as_str().unwrap().to_string();
        m.entry(imei)
            .or_default()
            .push(b["data"]["seq"].as_u64().unwrap());
    }
    m
}

const DEVICES: [u64; 3] = [356_307_042_441_013, 356_307_042_441_014, 7];

/// Publishes `per_device` events for each of [`DEVICES`], interleaved, seqs from `from`.
fn publish_round(db: &Db, from: u32, per_device: u32) -> Vec<i64> {
    let mut ids = Vec::new();
    for seq in from..from + per_device {
        for d in DEVICES {
            ids.push(db.publish_seq(d, seq));
        }
    }
    ids
}

fn distinct_ids(rs: &[Received]) -> HashSet<String> {
    rs.iter().map(Received::id).collect()
}

fn as_strings(ids: &[i64]) -> HashSet<String> {
    ids.iter().map(i64::to_string).collect()
}

// ===== (1) delivery: body, headers, signature, order =====

/// Published events arrive as signed POSTs with the exact body, the event id header and the
/// JSON content type, in order per device; a command event published inside a transaction
/// arrives only once that transaction commits.
#[test]
fn events_are_delivered_signed_exact_and_in_order() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    let rx = Receiver::start(200);
    let d = Running::start(deliverer(
        &pg,
        &[route("all", &["#"], rx.url("/hook"))],
        "gw-1",
    ));

    let mut ids = publish_round(&db, 0, 10);
    // A command event, in a transaction with other work: not before the commit.
    let metadata = json!({"ticket": "T-1"});
    let cmd_id = db.rt.block_on(async {
        let mut c = pg.client().await;
        let tx = c.transaction().await.unwrap();
        let id = publish_command_event(
            &tx,
            CommandEvent::Completed,
            &CommandEventData {
                imei: DEVICES[0],
                command_id: 17,
                command: "getinfo",
                state: "completed",
                response: Some("RTC:2019/6/10 10:04 Init:..."),
                metadata: Some(&metadata),
                error: None,
            },
        )
        .await
        .unwrap();
        // Published, not committed: the events before it are delivered, it is not.
        assert!(wait_until(LONG, || rx.delivered().len() >= 30));
        let count: i64 = db
            .client
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, 30);
        tx.commit().await.unwrap();
        id
    });
    ids.push(cmd_id);
    ids.extend(publish_round(&db, 10, 10));

    assert!(
        wait_until(LONG, || rx.delivered().len() >= ids.len()),
        "delivered {} of {}",
        rx.delivered().len(),
        ids.len()
    );
    assert!(
        !rx.delivered()[..30]
            .iter()
            .any(|r| r.json()["topic"] == "commands/17/completed"),
        "not before its transaction committed"
    );
    let got = rx.delivered();
    assert_eq!(got.len(), ids.len(), "each event once");
    assert_eq!(distinct_ids(&got), as_strings(&ids));

    // The exact body: {"id","topic","time","data"}, time = the event's publication time.
    let at: HashMap<String, u64> = db
        .rt
        .block_on(db.client.query(
            "SELECT id, (extract(epoch FROM at) * 1000)::int8 FROM events",
            &[],
        ))
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0).to_string(), r.get::<_, i64>(1) as u64))
        .collect();
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hook");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let id = r.id();
        assert_eq!(r.header("x-fleetgate-event-id"), Some(id.as_str()));
        assert_signed(r);
        let body = r.json();
        let topic = body["topic"].as_str().unwrap();
        let data = if id == cmd_id.to_string() {
            assert_eq!(topic, "commands/17/completed");
            r#"{"imei":"356307042441013","command_id":17,"command":"getinfo","state":"completed","response":"RTC:2019/6/10 10:04 Init:...","metadata":{"ticket":"T-1"},"error":null}"#.to_string()
        } else {
            let imei = body["data"]["imei"].as_str().unwrap();
            assert_eq!(topic, format!("devices/{imei}/telemetry"));
            format!(
                r#"{{"imei":"{imei}","seq":{}}}"#,
                body["data"]["seq"].as_u64().unwrap()
            )
        };
        let time = fleetgate::time::utc_text(at[&id]).unwrap();
        assert_eq!(
            r.body,
            format!(r#"{{"id":"{id}","topic":"{topic}","time":"{time}","data":{data}}}"#)
        );
    }
    let device_events: Vec<Received> = got
        .into_iter()
        .filter(|r| r.json()["topic"] != "commands/17/completed")
        .collect();
    for (imei, seqs) in seqs_per_device(&device_events) {
        assert_eq!(
            seqs,
            (0..20).collect::<Vec<u64>>(),
            "order of device {imei}"
        );
    }
    // Counted once the answer is back, which is after the receiver recorded the request.
    assert!(wait_until(LONG, || d
        .stats
        .delivered
        .load(Ordering::Relaxed)
        >= ids.len() as u64));
    assert_eq!(d.stats.delivered.load(Ordering::Relaxed), ids.len() as u64);
    assert_eq!(d.stats.failed_attempts.load(Ordering::Relaxed), 0);
    assert!(wait_until(LONG, || db.all_routes_caught_up(1)));
}

// ===== (2) receiver down, then up =====

/// Connection refused, then 500s, then 200: every event arrives, none is answered 2xx
/// twice, the order per device holds, and the deliverer held at most its window meanwhile.
#[test]
fn a_receiver_down_then_up_gets_everything_in_order() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    // A port nobody listens on (for now), held so that nothing else takes it meanwhile.
    let port = ReservedPort::new();
    let url = port.url("/down");
    let mut cfg = deliverer(&pg, &[route("r", &["devices/#"], url)], "gw-1");
    cfg.window = 8;
    let d = Running::start(cfg);

    let mut ids = publish_round(&db, 0, 10);
    assert!(
        wait_until(LONG, || d.stats.failed_attempts.load(Ordering::Relaxed)
            >= 6),
        "connection refused counts as a failed attempt"
    );
    assert!(d.stats.window_events.load(Ordering::Relaxed) <= 8);

    // Up, but failing.
    let rx = port.start(500);
    assert!(wait_until(LONG, || rx.received().len() >= 6));
    assert!(rx.delivered().is_empty());
    ids.extend(publish_round(&db, 10, 5));
    assert!(d.stats.window_events.load(Ordering::Relaxed) <= 8);

    rx.set_status(200);
    assert!(
        wait_until(LONG, || distinct_ids(&rx.delivered()).len() >= ids.len()),
        "delivered {} of {}",
        distinct_ids(&rx.delivered()).len(),
        ids.len()
    );
    let got = rx.delivered();
    assert_eq!(distinct_ids(&got), as_strings(&ids), "nothing lost");
    assert_eq!(
        got.len(),
        ids.len(),
        "an event answered 2xx is not sent again"
    );
    for (imei, seqs) in seqs_per_device(&got) {
        assert_eq!(
            seqs,
            (0..15).collect::<Vec<u64>>(),
            "order of device {imei}"
        );
    }
    for r in &got {
        assert_signed(r);
    }
    let st = &d.stats;
    assert!(st.retried.load(Ordering::Relaxed) >= 6);
    // Counted once the answer is back, which is after the receiver recorded the request.
    assert!(wait_until(LONG, || st.delivered.load(Ordering::Relaxed)
        >= ids.len() as u64));
    assert_eq!(st.delivered.load(Ordering::Relaxed), ids.len() as u64);
    assert!(wait_until(LONG, || st.lag_ms.load(Ordering::Relaxed) == 0
        && st.window_events.load(Ordering::Relaxed) == 0));
}

// ===== (3) restart =====

/// Events published while no deliverer runs are delivered by the next one, from where the
/// last one stopped: nothing lost, and nothing sent twice (a clean stop finishes what is in
/// flight and saves the cursor: at-least-once allows duplicates only after a crash); the order
/// per device holds across the restart.
#[test]
fn nothing_is_lost_across_a_restart_of_the_deliverer() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    let rx = Receiver::start(200);
    let routes = [route("r", &["#"], rx.url("/r"))];

    let first = Running::start(deliverer(&pg, &routes, "gw-1"));
    let mut ids = publish_round(&db, 0, 10);
    assert!(wait_until(LONG, || rx.delivered().len() >= ids.len()));
    // More while it runs, then stop it at once, whatever it is doing.
    ids.extend(publish_round(&db, 10, 10));
    first.stop();
    let before_restart = rx.delivered().len();

    // More while none runs.
    ids.extend(publish_round(&db, 20, 10));
    let second = Running::start(deliverer(&pg, &routes, "gw-2"));
    ids.extend(publish_round(&db, 30, 5));
    assert!(
        wait_until(LONG, || distinct_ids(&rx.delivered()).len() >= ids.len()),
        "delivered {} of {}",
        distinct_ids(&rx.delivered()).len(),
        ids.len()
    );
    let got = rx.delivered();
    assert_eq!(distinct_ids(&got), as_strings(&ids), "nothing lost");
    // At-least-once: a duplicate may only be an event the first deliverer had sent.
    let mut seen = HashMap::<String, usize>::new();
    for r in &got {
        *seen.entry(r.id()).or_default() += 1;
    }
    let first_ids = distinct_ids(&got[..before_restart]);
    for (id, n) in &seen {
        assert!(
            *n == 1 || first_ids.contains(id),
            "event {id} sent {n} times"
        );
    }
    // The clean stop saved the cursor past everything it had delivered.
    assert_eq!(got.len(), ids.len(), "nothing sent twice");
    for (imei, seqs) in seqs_per_device(&got) {
        assert_eq!(
            seqs,
            (0..35).collect::<Vec<u64>>(),
            "order of device {imei}"
        );
    }
    assert!(before_restart >= 30);
    // Counted once the answer is back, which is after the receiver recorded the request.
    assert!(wait_until(
        LONG,
        || second.stats.delivered.load(Ordering::Relaxed) as usize >= ids.len() - before_restart
    ));
    assert_eq!(
        second.stats.delivered.load(Ordering::Relaxed) as usize,
        ids.len() - before_restart
    );
}

// ===== (4) two gateways on one database =====

/// Two deliverers (two gateways) on one database, two routes: every event reaches each
/// route exactly once, also when one gateway stops midway and the other takes its routes.
#[test]
fn two_gateways_deliver_each_event_once() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    let rx = Receiver::start(200);
    let routes = [
        route("a", &["#"], rx.url("/a")),
        route("b", &["devices/+/telemetry"], rx.url("/b")),
    ];
    let one = Running::start(deliverer(&pg, &routes, "gw-1"));
    let two = Running::start(deliverer(&pg, &routes, "gw-2"));

    let mut ids = Vec::new();
    for round in 0..4 {
        ids.extend(publish_round(&db, round * 5, 5));
    }
    assert!(wait_until(LONG, || rx.delivered().len() >= 2 * ids.len()));
    assert_eq!(
        one.stats.routes_leased.load(Ordering::Relaxed)
            + two.stats.routes_leased.load(Ordering::Relaxed),
        2,
        "each route is leased by one gateway"
    );
    // One gateway goes; the other takes its routes over.
    one.stop();
    for round in 4..8 {
        ids.extend(publish_round(&db, round * 5, 5));
    }
    assert!(
        wait_until(LONG, || rx.delivered().len() >= 2 * ids.len()),
        "delivered {} of {}",
        rx.delivered().len(),
        2 * ids.len()
    );
    assert!(wait_until(LONG, || two
        .stats
        .routes_leased
        .load(Ordering::Relaxed)
        == 2));
    assert!(wait_until(LONG, || db.all_routes_caught_up(2)));
    let got = rx.delivered();
    for path in ["/a", "/b"] {
        let mut count = HashMap::<String, usize>::new();
        for r in got.iter().filter(|r| r.path == path) {
            *count.entry(r.id()).or_default() += 1;
        }
        assert_eq!(
            count.keys().cloned().collect::<HashSet<_>>(),
            as_strings(&ids),
            "{path}: every event"
        );
        assert!(count.values().all(|&n| n == 1), "{path}: each exactly once");
        let on_path: Vec<Received> = got.iter().filter(|r| r.path == path).cloned().collect();
        for (imei, seqs) in seqs_per_device(&on_path) {
            assert_eq!(
                seqs,
                (0..40).collect::<Vec<u64>>(),
                "{path}: order of {imei}"
            );
        }
    }
}

// ===== (5) routes and wildcards =====

/// Each event reaches every route whose filters match it, and no other.
#[test]
fn routes_get_the_events_their_filters_match() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    let rx = Receiver::start(200);
    let routes = [
        route("connected", &["devices/+/connected"], rx.url("/connected")),
        route("commands", &["commands/#"], rx.url("/commands")),
        route("one-device", &["devices/356307042441013/#"], rx.url("/one")),
        route("all", &["#"], rx.url("/all")),
        route(
            "ends",
            &["commands/+/failed", "devices/+/disconnected"],
            rx.url("/ends"),
        ),
        route("nothing", &["nothing/+"], rx.url("/nothing")),
    ];
    let _d = Running::start(deliverer(&pg, &routes, "gw-1"));

    let a = 356_307_042_441_013u64;
    let b = 356_307_042_441_014u64;
    let topics: Vec<String> = db.rt.block_on(async {
        let mut out = Vec::new();
        for (imei, ev) in [
            (a, DeviceEvent::Connected),
            (b, DeviceEvent::Connected),
            (a, DeviceEvent::Telemetry),
            (b, DeviceEvent::LoginRefused),
            (a, DeviceEvent::Disconnected),
        ] {
            let data = json!({"imei": format!("{imei:015}")});
            publish_device_event(&db.client, imei, ev, &data)
                .await
                .unwrap();
            out.push(format!("devices/{imei:015}/{}", ev.as_str()));
        }
        for (id, ev) in [(1, CommandEvent::Completed), (2, CommandEvent::Failed)] {
            let data = CommandEventData {
                imei: b,
                command_id: id,
                command: "getver",
                state: ev.as_str(),
                response: None,
                metadata: None,
                error: Some("device refused"),
            };
            publish_command_event(&db.client, ev, &data).await.unwrap();
            out.push(format!("commands/{id}/{}", ev.as_str()));
        }
        // A topic of a kind not known yet: only `#` takes it.
        publish(&db.client, "gateway/started", 0, &json!({}))
            .await
            .unwrap();
        out.push("gateway/started".into());
        out
    });
    assert!(wait_until(LONG, || db.all_routes_caught_up(routes.len())));
    let got = rx.delivered();
    // Sorted: the order holds per device only.
    let on = |path: &str| -> Vec<String> {
        let mut v: Vec<String> = got
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.json()["topic"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let s = |v: &[&str]| {
        let mut v: Vec<String> = v.iter().map(|t| t.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        on("/connected"),
        s(&[
            "devices/356307042441013/connected",
            "devices/356307042441014/connected"
        ])
    );
    assert_eq!(
        on("/commands"),
        s(&["commands/1/completed", "commands/2/failed"])
    );
    assert_eq!(
        on("/one"),
        s(&[
            "devices/356307042441013/connected",
            "devices/356307042441013/telemetry",
            "devices/356307042441013/disconnected"
        ])
    );
    let mut want = topics.clone();
    want.sort();
    assert_eq!(on("/all"), want);
    assert_eq!(
        on("/ends"),
        s(&["devices/356307042441013/disconnected", "commands/2/failed"])
    );
    assert!(on("/nothing").is_empty());
    assert_eq!(got.len(), 2 + 2 + 3 + topics.len() + 2);
}

/// The SQL regex the deliverer selects a route's events with answers as the filter does, in
/// PostgreSQL itself, for every case of the filter unit tests.
#[test]
fn sql_regexes_agree_with_the_filters() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    for &(filter, topic, want) in FILTER_CASES {
        let f = TopicFilter::parse(filter).unwrap();
        let re = f.sql_regex();
        let got: bool = db
            .rt
            .block_on(
                db.client
                    .query_one("SELECT $1::text ~ $2::text", &[&topic, &re]),
            )
            .unwrap_or_else(|e| panic!("{filter} -> {re}: {e}"))
            .get(0);
        assert_eq!(got, want, "{filter} ({re}) vs {topic}");
        assert_eq!(f.matches(topic), want, "{filter} vs {topic}");
    }
}

// ===== pruning =====

/// Events every route has passed are deleted; an event a route still owes stays until it
/// is delivered there.
#[test]
fn delivered_events_are_pruned_and_owed_ones_kept() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    let up = Receiver::start(200);
    // Held so that nothing else takes the port before the receiver starts on it.
    let port = ReservedPort::new();
    let routes = [
        route("up", &["#"], up.url("/up")),
        route("down", &["#"], port.url("/down")),
    ];
    let mut cfg = deliverer(&pg, &routes, "gw-1");
    cfg.prune_every = Duration::from_millis(100);
    let d = Running::start(cfg);
    let ids = publish_round(&db, 0, 4);
    assert!(wait_until(LONG, || up.delivered().len() >= ids.len()));
    // Pruning has had its turns meanwhile (at least one: 100 ms) and kept what "down" owes.
    assert!(wait_until(LONG, || d
        .stats
        .failed_attempts
        .load(Ordering::Relaxed)
        >= 12));
    assert_eq!(db.scalar("SELECT count(*) FROM events"), ids.len() as i64);
    assert_eq!(d.stats.pruned.load(Ordering::Relaxed), 0);

    let down = port.start(200);
    assert!(wait_until(LONG, || down.delivered().len() >= ids.len()));
    assert!(wait_until(LONG, || db
        .scalar("SELECT count(*) FROM events")
        == 0));
    // Counted once the deliverer has the DELETE's answer, which is after it committed.
    assert!(wait_until(LONG, || d.stats.pruned.load(Ordering::Relaxed)
        >= ids.len() as u64));
    assert_eq!(d.stats.pruned.load(Ordering::Relaxed), ids.len() as u64);
}

// ===== (6) the writer's events =====

fn avl_batch(
    id: u64,
    recs: &[fleetgate::protocol::Record],
    with_telemetry: bool,
) -> (WriterBatch, oneshot::Receiver<WriteOutcome>) {
    let wire = frame(Codec::C8E, recs);
    let Ok(Status::Complete((Frame::Avl(avl), _))) = decode_frame(&wire, 16_384) else {
        panic!("an AVL frame");
    };
    let mut rows = Vec::new();
    encode_rows(imei(id), &avl, 1_700_000_000_000_000, &mut rows);
    let telemetry = with_telemetry.then(|| Box::new(TelemetryEvent::from_avl(imei(id), &avl)));
    let (done, rx) = oneshot::channel();
    (
        WriterBatch {
            permit: ByteBudget::new(1 << 30).try_acquire(rows.len()).unwrap(),
            rows: rows.into(),
            records: avl.count() as u32,
            done,
            telemetry,
        },
        rx,
    )
}

fn session(id: u64, event: &'static str, reason: Option<&str>) -> SessionEvent {
    SessionEvent {
        imei: id,
        event,
        at: SystemTime::now(),
        shard: 1,
        transport: "tcp",
        peer: Some("127.0.0.1:40000".into()),
        reason: reason.map(Into::into),
    }
}

/// Session events reach the outbox with their `device_sessions` rows (a refused login only
/// the outbox); a transaction's telemetry summaries become one event per device, the latest
/// position with the records summed, committed with the rows.
#[test]
fn the_writer_puts_session_and_telemetry_events_in_the_outbox() {
    let pg = TestPg::start();
    let db = Db::new(&pg);
    let w = writer::spawn(
        WriterConfig {
            database_url: pg.url(),
            connections: 1,
            batch_max_records: 20_000,
            // Everything below is sent at once and must land in one gathering window (one
            // transaction): a window a loaded machine cannot overrun between two sends.
            batch_max_delay: Duration::from_secs(2),
            max_session_events_queued: 1024,
        },
        || {},
    )
    .unwrap();
    let tx = w.sender();
    let (a, b) = (356_800_000_000_001u64, 356_800_000_000_002u64);

    // Device a: two frames (3 then 2 records), device b: one frame without a summary (its
    // device does not want telemetry events). Made before anything is sent.
    let first = records(Codec::C8E, 3, 1_700_000_000_000, 1);
    let second = records(Codec::C8E, 2, 1_700_000_100_000, 2);
    let (batches, answers): (Vec<_>, Vec<_>) =
        [(a, &first, true), (a, &second, true), (b, &first, false)]
            .into_iter()
            .map(|(id, recs, summary)| avl_batch(id, recs, summary))
            .unzip();
    assert!(tx.send_event(session(a, "connect", None)));
    assert!(tx.send_event(session(b, "login_refused", Some("device not allowed"))));
    for batch in batches {
        tx.send_rows(batch).map_err(|_| ()).unwrap();
    }
    for mut rx in answers {
        assert!(wait_until(LONG, || matches!(
            rx.try_recv(),
            Ok(Some(WriteOutcome::Committed))
        )));
    }
    assert!(tx.send_event(session(a, "disconnect", Some("idle timeout"))));
    assert!(wait_until(LONG, || {
        w.stats.events_published.load(Ordering::Relaxed) == 4
    }));
    assert_eq!(w.stats.transactions.load(Ordering::Relaxed), 1);

    let rows: Vec<(String, i64, Value)> = db
        .rt
        .block_on(db.client.query(
            "SELECT topic, imei, data::text FROM events ORDER BY tx, id",
            &[],
        ))
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                serde_json::from_str(&r.get::<_, String>(2)).unwrap(),
            )
        })
        .collect();
    let topics: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        topics,
        [
            // The telemetry transaction commits first, then the session statement.
            "devices/356800000000001/telemetry",
            "devices/356800000000001/connected",
            "devices/356800000000002/login_refused",
            "devices/356800000000001/disconnected",
        ]
    );
    let last = &second[1];
    let telemetry = &rows[0].2;
    assert_eq!(telemetry["imei"], "356800000000001");
    assert_eq!(telemetry["records"], 5, "summed over the device's frames");
    assert_eq!(
        telemetry["time"],
        fleetgate::time::utc_text(last.ts_ms).unwrap()
    );
    assert_eq!(telemetry["lat"], last.lat as f64 / 1e7);
    assert_eq!(telemetry["lon"], last.lon as f64 / 1e7);
    assert_eq!(telemetry["speed"], last.speed);
    assert_eq!(telemetry["sats"], last.sats);
    let io = telemetry["io"].as_object().unwrap();
    assert_eq!(io.len(), last.io.len());
    for (id, v) in &last.io {
        let want = match v {
            fleetgate::protocol::OwnedIoValue::Nx(bytes) => Value::from(hex::encode(bytes)),
            v => Value::from(match *v {
                fleetgate::protocol::OwnedIoValue::U8(x) => x as u64,
                fleetgate::protocol::OwnedIoValue::U16(x) => x as u64,
                fleetgate::protocol::OwnedIoValue::U32(x) => x as u64,
                fleetgate::protocol::OwnedIoValue::U64(x) => x,
                fleetgate::protocol::OwnedIoValue::Nx(_) => unreachable!(),
            }),
        };
        assert_eq!(io[&id.to_string()], want, "io {id}");
    }
    assert_eq!(
        rows[1].2,
        json!({"imei": "356800000000001", "remote_addr": "127.0.0.1:40000", "transport": "tcp", "shard": 1})
    );
    assert_eq!(
        rows[2].2,
        json!({"imei": "356800000000002", "reason": "device not allowed", "remote_addr": "127.0.0.1:40000", "transport": "tcp", "shard": 1})
    );
    assert_eq!(rows[3].2["reason"], "idle timeout");
    // The refused login is no session row.
    assert_eq!(
        db.scalar("SELECT count(*) FROM device_sessions WHERE imei = 356800000000002"),
        0
    );
    assert_eq!(db.scalar("SELECT count(*) FROM device_sessions"), 2);
    assert_eq!(db.scalar("SELECT count(*) FROM telemetry"), 8);
    assert!(w.close(std::time::Instant::now() + Duration::from_secs(5)));
}
