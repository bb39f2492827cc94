//! Database upkeep that must not depend on traffic: the allow-list reload, seen from a device
//! over a real socket to a real gateway process, and the housekeeper thread driven directly.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::{imei, wait_until, Device, Gateway};
use common::{TempDir, TestPg};
use fleetgate::config::{DevicePolicyKind, TelemetryEventsKind};
use fleetgate::housekeeper::{self, HousekeeperConfig};
use fleetgate::policy::{DevicePolicy, TelemetryPolicy};

/// The login answer of `id`, or `None` when the connection failed.
fn login(gw: &Gateway, id: u64) -> Option<u8> {
    Device::login(gw.addr, imei(id))
        .ok()
        .map(|(_, reply)| reply)
}

/// No device is admitted, so nothing is ever written: the allow-list must still be reloaded.
/// (It used to be reloaded by the writer, which connects on its first batch: a gateway that
/// admitted nobody never learned of a newly enabled device.) Disabling a device ends its live
/// session too.
#[test]
fn a_device_enabled_while_nothing_is_admitted_may_log_in_after_a_reload() {
    let pg = TestPg::start();
    let dir = TempDir::new();
    let config = dir.path().join("fleetgate.toml");
    std::fs::write(&config, "allow_list_reload_s = 1\n").unwrap();
    let gw = Gateway::start(
        &pg.url(),
        &[
            "--device-policy",
            "allow_list",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let id = 356_900_000_000_001;
    assert_eq!(login(&gw, id), Some(0), "unknown device refused");

    pg.execute("INSERT INTO devices (imei) VALUES (356900000000001)");
    let start = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || login(&gw, id) == Some(1)),
        "the device enabled in `devices` was not admitted within 10 reload periods"
    );
    eprintln!("admitted {:?} after the insert", start.elapsed());

    // Disabling the device refuses its next login and ends the session it has now.
    let mut live = Device::connect(gw.addr, imei(id));
    pg.execute("UPDATE devices SET enabled = false WHERE imei = 356900000000001");
    assert!(
        live.closed_within(Duration::from_secs(10)),
        "the disabled device's live session was not ended"
    );
    assert!(
        wait_until(Duration::from_secs(10), || login(&gw, id) == Some(0)),
        "the disabled device was still admitted"
    );
    assert!(
        wait_until(Duration::from_secs(10), || pg.scalar(
            "SELECT count(*) FROM device_sessions WHERE reason = 'device disabled'"
        ) == 1),
        "no session ended with reason 'device disabled'"
    );
    assert!(gw.log().contains("Allow-list changed"), "{}", gw.log());
}

/// The housekeeper calls its callback after a reload that changed the set (not after one that
/// did not), and stops promptly, also while the database is down.
#[test]
fn the_housekeeper_reports_allow_list_changes_and_stops_promptly() {
    let mut pg = TestPg::start();
    let policy = Arc::new(DevicePolicy::new(DevicePolicyKind::AllowList));
    let changes = Arc::new(AtomicU64::new(0));
    let seen = changes.clone();
    let hk = housekeeper::spawn(
        HousekeeperConfig {
            database_url: pg.url(),
            partitions_ahead_days: 7,
            retention_days: 0,
            partitions_every: Duration::from_secs(3600),
            allow_list_reload: Duration::from_millis(100),
        },
        policy.clone(),
        Arc::new(TelemetryPolicy::new(TelemetryEventsKind::None)),
        move || {
            seen.fetch_add(1, Ordering::SeqCst);
        },
    )
    .unwrap();
    pg.execute("INSERT INTO devices (imei) VALUES (356900000000002)");
    assert!(wait_until(Duration::from_secs(10), || policy
        .admits(imei(356_900_000_000_002))));
    assert!(wait_until(Duration::from_secs(10), || changes
        .load(Ordering::SeqCst)
        == 1));
    // A disabled row leaves the set as it was: five more reload periods, no more calls. (An
    // absence cannot be polled for; the pause gives a wrong call time to happen.)
    pg.execute("INSERT INTO devices (imei, enabled) VALUES (356900000000003, false)");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(changes.load(Ordering::SeqCst), 1);

    // Database down: a few reloads fail (and the housekeeper backs off) before it is stopped.
    pg.pg.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    hk.stop();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        start.elapsed()
    );
    assert!(policy.admits(imei(356_900_000_000_002)), "last list kept");
}

/// The schema stays ready for `telemetry` to be distributed by `imei` on Citus
/// (tuning/beyond-one-box.md). Citus is not installed here: this checks, on plain PostgreSQL
/// with every migration and some daily partitions, what `create_distributed_table('telemetry',
/// 'imei')` would refuse.
#[test]
fn the_telemetry_table_stays_ready_to_be_distributed_by_imei() {
    let pg = TestPg::start();
    pg.rows("SELECT * FROM fleetgate_maintain_partitions(2, 0)");
    // The table and every partition of it (daily ones and the default).
    let family = "(SELECT 'telemetry'::regclass::oid
                   UNION ALL SELECT inhrelid FROM pg_inherits WHERE inhparent = 'telemetry'::regclass)";
    assert!(pg.scalar(&format!("SELECT count(*) FROM {family} f(oid)")) >= 4);
    // Every unique index (the dedup key, a primary key if one is ever added) holds the
    // distribution column: Citus can enforce uniqueness only within a shard.
    let unique = |cond: &str| {
        pg.scalar(&format!(
            "SELECT count(*) FROM pg_index x
               JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attname = 'imei'
              WHERE x.indisunique AND x.indrelid IN {family} AND {cond}"
        ))
    };
    assert_eq!(
        unique("NOT (a.attnum = ANY (x.indkey::int2[]))"),
        0,
        "a unique index without imei"
    );
    assert!(
        unique("true") >= 4,
        "the dedup key (imei, ts, rec_hash) on each partition"
    );
    // No foreign key from or to it (one to a table other than a reference table is refused).
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM pg_constraint
              WHERE contype = 'f' AND (conrelid IN {family} OR confrelid IN {family})"
        )),
        0
    );
    // No column default (a sequence would be evaluated on the coordinator per row), no
    // trigger (refused on distributed tables unless citus.enable_unsafe_triggers).
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM pg_attrdef WHERE adrelid IN {family}"
        )),
        0
    );
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid IN {family} AND NOT tgisinternal"
        )),
        0
    );
    // The distribution column: a NOT NULL bigint.
    let imei = pg.rows(
        "SELECT format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
          WHERE attrelid = 'telemetry'::regclass AND attname = 'imei'",
    );
    assert_eq!(imei[0].get::<_, String>(0), "bigint");
    assert!(imei[0].get::<_, bool>(1));
}
