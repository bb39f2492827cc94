//! The managed PostgreSQL, the migrations and the partition maintenance, against real
//! PostgreSQL clusters (one per test, see tests/common).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{connect, test_options, TempDir, TestPg};
use fleetgate::db::maintain_partitions;
use fleetgate::pg::{find_bin_dir, find_bin_dir_from, migrate, ManagedPostgres, PgError};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Today's UTC date plus `offset` days, as (year, month, day).
fn utc_date(offset: i64) -> (i64, u32, u32) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    civil_from_days(secs.div_euclid(86_400) + offset)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `telemetry_pYYYYMMDD` of today + `offset` days.
fn partition(offset: i64) -> String {
    let (y, m, d) = utc_date(offset);
    format!("telemetry_p{y:04}{m:02}{d:02}")
}

/// A timestamptz literal on today + `offset` days, at `time` UTC.
fn ts_on(offset: i64, time: &str) -> String {
    let (y, m, d) = utc_date(offset);
    format!("{y:04}-{m:02}-{d:02} {time}+00")
}

/// Insert one telemetry row (IO: 1=5, 239=1, 66=12345, 16=u64::MAX).
async fn insert(
    client: &Client,
    imei: i64,
    ts: &str,
    rec_hash: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO telemetry (imei, ts, received_at, codec, priority, lat, lon, alt, angle,
                                    sats, speed, event_io, gen_type, io_ids, io_values, nx_ids,
                                    nx_values, rec_hash)
             VALUES ($1, $2::text::timestamptz, now(), 142, 1, 54.6872, 25.2797, 112, 90, 12,
                     50, 0, NULL, '{1,239,66,16}', '{5,1,12345,-1}', '{10348}',
                     ARRAY['\\x0102'::bytea], $3)",
            &[&imei, &ts, &rec_hash],
        )
        .await
}

async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// The partition holding the rows of `imei` at `ts`.
async fn partition_of(client: &Client, imei: i64, ts: &str) -> String {
    client
        .query_one(
            "SELECT tableoid::regclass::text FROM telemetry WHERE imei = $1 AND ts = $2::text::timestamptz",
            &[&imei, &ts],
        )
        .await
        .unwrap()
        .get(0)
}

/// Insert one `device_sessions` row (a connect) of `imei` at `at`.
async fn insert_session(client: &Client, imei: i64, at: &str) {
    client
        .execute(
            "INSERT INTO device_sessions (imei, event, at, shard, transport, peer)
             VALUES ($1, 'connect', $2::text::timestamptz, 0, 'tcp', '10.0.0.1:5000')",
            &[&imei, &at],
        )
        .await
        .unwrap();
}

/// The `imei` of every row of `table`, sorted: the tests below give each row its own.
async fn imeis(client: &Client, table: &str) -> Vec<i64> {
    client
        .query(&format!("SELECT imei FROM {table} ORDER BY imei"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Names of the partitions of `telemetry`, sorted.
async fn partitions(client: &Client) -> Vec<String> {
    let mut names: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'telemetry'::regclass",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn migrations_apply_once_and_the_schema_is_exact() {
    let dir = TempDir::new();
    let pg = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    let url = pg.connection_string();
    assert!(
        url.starts_with(&format!("host={} ", pg.socket_dir().display())),
        "{url}"
    );
    assert!(url.contains(&format!("port={}", pg.port())), "{url}");
    assert!(url.ends_with("user=fleetgate dbname=fleetgate"), "{url}");

    let mut client = connect(&url).await;
    assert_eq!(migrate(&mut client).await.unwrap(), 5);
    assert_eq!(migrate(&mut client).await.unwrap(), 0);

    // Column order and types are the binary COPY layout of the writer.
    let cols: Vec<(String, String, String)> = client
        .query(
            "SELECT column_name::text, udt_name::text, is_nullable::text
               FROM information_schema.columns
              WHERE table_name = 'telemetry' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected = [
        ("imei", "int8", "NO"),
        ("ts", "timestamptz", "NO"),
        ("received_at", "timestamptz", "NO"),
        ("codec", "int2", "NO"),
        ("priority", "int2", "NO"),
        ("lat", "float8", "NO"),
        ("lon", "float8", "NO"),
        ("alt", "int2", "NO"),
        ("angle", "int4", "NO"),
        ("sats", "int2", "NO"),
        ("speed", "int4", "NO"),
        ("event_io", "int4", "NO"),
        ("gen_type", "int2", "YES"),
        ("io_ids", "_int4", "NO"),
        ("io_values", "_int8", "NO"),
        ("nx_ids", "_int4", "NO"),
        ("nx_values", "_bytea", "NO"),
        ("rec_hash", "int8", "NO"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(cols, expected);

    // V2.
    client
        .execute("INSERT INTO devices (imei) VALUES (356307042441013)", &[])
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO device_sessions (imei, event, at, shard, transport, peer)
             VALUES (356307042441013, 'connect', now(), 0, 'tcp', '10.0.0.1:5000')",
            &[],
        )
        .await
        .unwrap();
    let bad = client
        .execute(
            "INSERT INTO device_sessions (imei, event, at, shard, transport)
             VALUES (1, 'reboot', now(), 0, 'tcp')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(&SqlState::CHECK_VIOLATION));
    let enabled: bool = client
        .query_one("SELECT enabled FROM devices", &[])
        .await
        .unwrap()
        .get(0);
    assert!(enabled);
    let index: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'device_sessions'
               AND indexdef LIKE '%(imei, at)%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(index, 1);

    // V3: retention finds old sessions by time alone.
    let index: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'device_sessions'
               AND indexdef LIKE '%btree (at)'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(index, 1);

    // V4: the command ledger; its states are checked.
    let bad = client
        .execute(
            "INSERT INTO commands (imei, codec, payload, state) VALUES (1, 12, 'x', 'lost')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(&SqlState::CHECK_VIOLATION));
    let queued: String = client
        .query_one(
            "INSERT INTO commands (imei, codec, payload) VALUES (1, 14, 'x') RETURNING state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, "queued");

    // V5: the outbox, the routes' delivery state, the telemetry opt-in.
    let cols = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT column_name::text, udt_name::text, is_nullable::text
                       FROM information_schema.columns
                      WHERE table_name = $1 ORDER BY ordinal_position",
                    &[&table],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {}",
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2)
                    )
                })
                .collect::<Vec<String>>()
        }
    };
    assert_eq!(
        cols("events").await,
        [
            "tx int8 NO",
            "id int8 NO",
            "topic text NO",
            "imei int8 NO",
            "at timestamptz NO",
            "data json NO"
        ]
    );
    assert_eq!(
        cols("event_routes").await,
        [
            "route text NO",
            "cursor_tx int8 NO",
            "cursor_id int8 NO",
            "owner text YES",
            "lease_until timestamptz YES",
            "seen_at timestamptz NO"
        ]
    );
    let opted_in: bool = client
        .query_one("SELECT telemetry_events FROM devices", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!opted_in, "telemetry events are opt-in");
    // An insert takes its transaction's id, and a trigger notifies the deliverers.
    let trigger: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'events_notify'
               AND tgrelid = 'events'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(trigger, 1);
    let row = client
        .query_one(
            "INSERT INTO events (topic, imei, data) VALUES ('devices/1/connected', 1, '{}')
             RETURNING tx = pg_current_xact_id()::text::bigint",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

#[tokio::test]
async fn maintenance_creates_yesterday_today_and_ahead() {
    let t = TestPg::start();
    let client = t.client().await;
    assert_eq!(partitions(&client).await, vec!["telemetry_default"]);

    assert_eq!(maintain_partitions(&client, 3, 0).await.unwrap(), (5, 0));
    assert_eq!(maintain_partitions(&client, 3, 0).await.unwrap(), (0, 0));
    let mut expected: Vec<String> = (-1..=3).map(partition).collect();
    expected.push("telemetry_default".into());
    expected.sort();
    assert_eq!(partitions(&client).await, expected);

    // Day boundaries are UTC midnights.
    let noon = ts_on(0, "12:00:00");
    insert(&client, 1, &noon, 1).await.unwrap();
    assert_eq!(partition_of(&client, 1, &noon).await, partition(0));
    let midnight = ts_on(1, "00:00:00");
    insert(&client, 1, &midnight, 1).await.unwrap();
    assert_eq!(partition_of(&client, 1, &midnight).await, partition(1));
    let last = ts_on(0, "23:59:59.999999");
    insert(&client, 1, &last, 1).await.unwrap();
    assert_eq!(partition_of(&client, 1, &last).await, partition(0));
}

#[tokio::test]
async fn epoch_and_far_times_land_in_the_default_partition() {
    let t = TestPg::start();
    let client = t.client().await;
    maintain_partitions(&client, 1, 0).await.unwrap();
    for ts in [
        "1970-01-01 00:00:00+00",
        "2000-01-01 00:00:00+00",
        "2099-01-01 00:00:00+00",
    ] {
        insert(&client, 7, ts, 1).await.unwrap();
        assert_eq!(partition_of(&client, 7, ts).await, "telemetry_default");
    }
    assert_eq!(count(&client, "telemetry_default").await, 3);
}

#[tokio::test]
async fn maintenance_moves_default_rows_into_the_new_partition() {
    let t = TestPg::start();
    let client = t.client().await;
    maintain_partitions(&client, 1, 0).await.unwrap();

    let rows = [
        ts_on(10, "00:00:00"),
        ts_on(10, "12:00:00"),
        ts_on(10, "23:59:59.999999"),
    ];
    for (i, ts) in rows.iter().enumerate() {
        insert(&client, 42, ts, i as i64).await.unwrap();
    }
    insert(&client, 42, "1970-01-01 00:00:00+00", 9)
        .await
        .unwrap();
    assert_eq!(count(&client, "telemetry").await, 4);
    assert_eq!(count(&client, "telemetry_default").await, 4);

    // today+2 ..= today+10: the last one needs the rows moved out of the default partition.
    assert_eq!(maintain_partitions(&client, 10, 0).await.unwrap(), (9, 0));
    assert_eq!(count(&client, "telemetry").await, 4);
    assert_eq!(count(&client, &partition(10)).await, 3);
    assert_eq!(count(&client, "telemetry_default").await, 1); // the 1970 row
    for ts in &rows {
        assert_eq!(partition_of(&client, 42, ts).await, partition(10));
    }
    // The moved rows kept everything, the dedup key included.
    let io: i64 = client
        .query_one(
            "SELECT io_value(io_ids, io_values, 66) FROM telemetry WHERE ts = $1::text::timestamptz",
            &[&rows[1]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(io, 12345);
    let dup = insert(&client, 42, &rows[1], 1).await.unwrap_err();
    assert_eq!(dup.code(), Some(&SqlState::UNIQUE_VIOLATION));

    // The next UTC day is still the default partition's.
    let next = ts_on(11, "00:00:00");
    insert(&client, 42, &next, 0).await.unwrap();
    assert_eq!(partition_of(&client, 42, &next).await, "telemetry_default");
}

#[tokio::test]
async fn retention_drops_old_daily_partitions_but_never_the_default() {
    let t = TestPg::start();
    let client = t.client().await;
    assert_eq!(maintain_partitions(&client, 1, 0).await.unwrap(), (3, 0));
    // Old daily partitions, as an earlier run would have left them.
    let three_days_ago = partition(-3);
    client
        .batch_execute(&format!(
            "CREATE TABLE telemetry_p20200101 PARTITION OF telemetry
               FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00');
             CREATE TABLE {three_days_ago} PARTITION OF telemetry
               FOR VALUES FROM ('{}') TO ('{}');",
            ts_on(-3, "00:00:00"),
            ts_on(-2, "00:00:00")
        ))
        .await
        .unwrap();
    insert(&client, 1, "2020-01-01 12:00:00+00", 1)
        .await
        .unwrap();
    insert(&client, 1, &ts_on(-3, "12:00:00"), 1).await.unwrap();
    insert(&client, 1, "1970-01-01 00:00:00+00", 1)
        .await
        .unwrap();
    insert(&client, 1, &ts_on(-1, "12:00:00"), 1).await.unwrap();

    // 0 keeps forever.
    assert_eq!(maintain_partitions(&client, 1, 0).await.unwrap(), (0, 0));
    assert_eq!(partitions(&client).await.len(), 6);

    // 2 days: the 2020 day and the day three days ago go; yesterday (ends today 00:00) stays.
    assert_eq!(maintain_partitions(&client, 1, 2).await.unwrap(), (0, 2));
    let mut expected: Vec<String> = (-1..=1).map(partition).collect();
    expected.push("telemetry_default".into());
    expected.sort();
    assert_eq!(partitions(&client).await, expected);
    // The 1970 row of the default partition went too (see the next test), not the partition.
    assert_eq!(count(&client, "telemetry").await, 1);
    assert_eq!(count(&client, "telemetry_default").await, 0);

    // Even a retention of one day drops neither the default partition nor yesterday's, and
    // the default partition still takes the rows no daily partition holds.
    assert_eq!(maintain_partitions(&client, 1, 1).await.unwrap(), (0, 0));
    assert_eq!(partitions(&client).await, expected);
    let epoch = "1970-01-01 00:00:00+00";
    insert(&client, 1, epoch, 2).await.unwrap();
    assert_eq!(partition_of(&client, 1, epoch).await, "telemetry_default");
}

#[tokio::test]
async fn retention_prunes_the_default_partition_and_the_sessions_by_whole_days() {
    let t = TestPg::start();
    let client = t.client().await;
    // Yesterday, today and tomorrow get daily partitions; other times land in the default one.
    assert_eq!(maintain_partitions(&client, 1, 0).await.unwrap(), (3, 0));
    // (imei, time, kept with a retention of 2 days): the same rule as for daily partitions,
    // a row goes once the whole UTC day it falls on is older than the retention window.
    let rows = [
        (1, "1970-01-01 00:00:00+00".to_string(), false),
        (2, "2000-01-01 00:00:00+00".to_string(), false),
        (3, ts_on(-3, "23:59:59.999999"), false),
        (4, ts_on(-2, "00:00:00"), true),
        (5, ts_on(5, "12:00:00"), true), // beyond the daily partitions
        (6, "2099-01-01 00:00:00+00".to_string(), true),
    ];
    for (imei, ts, _) in &rows {
        insert(&client, *imei, ts, 1).await.unwrap();
        assert_eq!(partition_of(&client, *imei, ts).await, "telemetry_default");
        insert_session(&client, *imei, ts).await;
    }
    // A row of a daily partition and a session of now: retention of those is not at stake.
    insert(&client, 7, &ts_on(-1, "00:00:00"), 1).await.unwrap();
    client
        .execute(
            "INSERT INTO device_sessions (imei, event, at, shard, transport)
             VALUES (7, 'disconnect', now(), 0, 'udp')",
            &[],
        )
        .await
        .unwrap();
    let all: Vec<i64> = (1..=7).collect();

    // 0 keeps everything.
    assert_eq!(maintain_partitions(&client, 1, 0).await.unwrap(), (0, 0));
    assert_eq!(imeis(&client, "telemetry").await, all);
    assert_eq!(imeis(&client, "device_sessions").await, all);

    // 2 days: old rows go from the default partition and from the sessions; no partition is
    // dropped, so the counts returned stay those of partitions.
    assert_eq!(maintain_partitions(&client, 1, 2).await.unwrap(), (0, 0));
    let kept: Vec<i64> = rows
        .iter()
        .filter(|(_, _, kept)| *kept)
        .map(|(imei, _, _)| *imei)
        .collect();
    assert_eq!(imeis(&client, "telemetry_default").await, kept);
    let mut kept_and_7 = kept.clone();
    kept_and_7.push(7);
    assert_eq!(imeis(&client, "telemetry").await, kept_and_7);
    assert_eq!(imeis(&client, "device_sessions").await, kept_and_7);
    assert!(partitions(&client)
        .await
        .contains(&"telemetry_default".to_string()));

    // Nothing more to prune on the next run.
    assert_eq!(maintain_partitions(&client, 1, 2).await.unwrap(), (0, 0));
    assert_eq!(imeis(&client, "device_sessions").await, kept_and_7);
}

#[tokio::test]
async fn unique_key_rejects_a_resend_but_not_a_different_record() {
    let t = TestPg::start();
    let client = t.client().await;
    maintain_partitions(&client, 1, 0).await.unwrap();
    for ts in [ts_on(0, "08:00:00"), "1970-01-01 00:00:00+00".to_string()] {
        insert(&client, 356307042441013, &ts, 77).await.unwrap();
        let err = insert(&client, 356307042441013, &ts, 77).await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{ts}");
        // Same device and time, different record bytes: kept.
        insert(&client, 356307042441013, &ts, 78).await.unwrap();
        // Same time and bytes from another device: kept.
        insert(&client, 356307042441014, &ts, 77).await.unwrap();
    }
    assert_eq!(count(&client, "telemetry").await, 6);
}

#[tokio::test]
async fn io_value_finds_a_value_by_id() {
    let t = TestPg::start();
    let client = t.client().await;
    insert(&client, 5, "2024-03-01 10:00:00+00", 1)
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT io_value(io_ids, io_values, 66), io_value(io_ids, io_values, 1),
                    io_value(io_ids, io_values, 16), io_value(io_ids, io_values, 999)
               FROM telemetry",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(12345));
    assert_eq!(row.get::<_, Option<i64>>(1), Some(5));
    assert_eq!(
        row.get::<_, Option<i64>>(2).map(|v| v as u64),
        Some(u64::MAX)
    );
    assert_eq!(row.get::<_, Option<i64>>(3), None);
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM telemetry WHERE io_value(io_ids, io_values, 239) = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn stop_and_restart_keep_the_data() {
    let mut t = TestPg::start();
    let client = t.client().await;
    maintain_partitions(&client, 1, 0).await.unwrap();
    insert(&client, 1, &ts_on(0, "01:00:00"), 1).await.unwrap();
    insert(&client, 1, "1970-01-01 00:00:00+00", 1)
        .await
        .unwrap();
    drop(client);
    let port = t.pg.port();

    t.pg.stop().unwrap();
    t.pg.stop().unwrap(); // idempotent
    assert!(!t.pg.is_running());
    assert!(!t.pg.pgdata().join("postmaster.pid").exists());
    assert!(tokio_postgres::connect(&t.url(), tokio_postgres::NoTls)
        .await
        .is_err());

    t.pg.restart_after_stop().unwrap();
    assert!(t.pg.is_running());
    assert_eq!(t.pg.port(), port);
    let client = t.client().await;
    assert_eq!(count(&client, "telemetry").await, 2);
}

#[tokio::test]
async fn a_server_left_running_is_adopted() {
    let dir = TempDir::new();
    let first = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    assert!(!first.was_adopted());
    let url = first.connection_string();
    let port = first.port();
    {
        let mut client = connect(&url).await;
        migrate(&mut client).await.unwrap();
        insert(&client, 3, "2024-01-01 00:00:00+00", 1)
            .await
            .unwrap();
    }
    // The gateway is SIGKILLed: nobody stops the server.
    std::mem::forget(first);

    let mut second = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    assert!(second.was_adopted());
    assert_eq!(second.port(), port);
    assert_eq!(second.connection_string(), url);
    let mut client = connect(&url).await;
    assert_eq!(migrate(&mut client).await.unwrap(), 0);
    assert_eq!(count(&client, "telemetry").await, 1);
    drop(client);

    second.stop().unwrap();
    assert!(!dir.path().join("pgdata/postmaster.pid").exists());
    let third = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    assert!(!third.was_adopted());
    let client = connect(&third.connection_string()).await;
    assert_eq!(count(&client, "telemetry").await, 1);
}

#[tokio::test]
async fn a_killed_server_is_started_again() {
    let dir = TempDir::new();
    let mut first = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    {
        let mut client = connect(&first.connection_string()).await;
        migrate(&mut client).await.unwrap();
        insert(&client, 3, "2024-01-01 00:00:00+00", 1)
            .await
            .unwrap();
    }
    let pid_file = std::fs::read_to_string(first.pgdata().join("postmaster.pid")).unwrap();
    let pid: i32 = pid_file.lines().next().unwrap().parse().unwrap();
    // SAFETY: plain kill(2) of the postmaster we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Gone (or a zombie nobody reaps) within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        if stat.is_empty() || state.starts_with('Z') {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "postmaster {pid} survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The stale pid file is still there; stopping finds no server and is fine with it.
    assert!(first.pgdata().join("postmaster.pid").exists());
    first.stop().unwrap();

    let second = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    assert!(!second.was_adopted());
    let client = connect(&second.connection_string()).await;
    assert_eq!(count(&client, "telemetry").await, 1);
}

#[test]
fn a_start_failure_reports_the_server_log() {
    let dir = TempDir::new();
    let opts = fleetgate::pg::PgOptions {
        fsync: false,
        shared_buffers_mb: u32::MAX, // out of range for shared_buffers
    };
    let err = ManagedPostgres::start(dir.path(), &opts).unwrap_err();
    assert!(matches!(err, PgError::StartFailed { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("shared_buffers"), "{msg}");
    assert!(msg.contains("postgres.log"), "{msg}");
}

#[test]
fn an_untraversable_parent_is_a_clear_error() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the server runs as ourselves, nothing to check");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = ManagedPostgres::start(&locked.join("data"), &test_options()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PgError::NotTraversable { .. }), "{err:?}");
    assert!(msg.contains("chmod o+x"), "{msg}");
    assert!(msg.contains(&*locked.to_string_lossy()), "{msg}");
}

#[test]
fn bin_dir_lookup() {
    // The environment is not touched: the variable's value is passed in.
    let empty = TempDir::new();
    let err = find_bin_dir_from(Some(empty.path().as_os_str().to_owned())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PgError::BinariesNotFound { .. }), "{err:?}");
    assert!(msg.contains("FLEETGATE_PG_BIN="), "{msg}");
    assert!(msg.contains(&*empty.path().to_string_lossy()), "{msg}");
    assert!(msg.contains("postgres, initdb, pg_ctl"), "{msg}");
    assert!(msg.contains("apt-get install postgresql"), "{msg}");
    assert!(msg.contains("--database-url"), "{msg}");

    // Unset (or empty): the machine's installation.
    let found = find_bin_dir_from(None).unwrap();
    assert!(found.join("postgres").is_file(), "{}", found.display());
    assert_eq!(find_bin_dir_from(Some("".into())).unwrap(), found);
    // An explicit, valid directory is taken as is.
    assert_eq!(
        find_bin_dir_from(Some(found.clone().into())).unwrap(),
        found
    );
    if std::env::var_os("FLEETGATE_PG_BIN").is_none() {
        assert_eq!(find_bin_dir().unwrap(), found);
    }
}
