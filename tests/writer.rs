//! The writer threads driven directly, without a gateway process: real COPY rows (encoded from
//! real frames), a real throwaway PostgreSQL that the tests stop and restart.

mod common;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::gateway::{frame, imei, records, wait_until};
use common::TestPg;
use fleetgate::protocol::{decode_frame, Codec, Frame, Status};
use fleetgate::shard::budget::ByteBudget;
use fleetgate::shard::copy::encode_rows;
use fleetgate::sink::writer::{self, WriterConfig, WriterHandle};
use fleetgate::sink::{SessionEvent, WriteOutcome, WriterBatch};
use futures::channel::oneshot;

const LONG: Duration = Duration::from_secs(60);

/// A writer on `pg` with `connections` threads; a batch waits up to `delay_ms` for company.
fn start_writer(pg: &TestPg, connections: usize, delay_ms: u64, events: usize) -> WriterHandle {
    writer::spawn(
        WriterConfig {
            database_url: pg.url(),
            connections,
            batch_max_records: 20_000,
            batch_max_delay: Duration::from_millis(delay_ms),
            max_session_events_queued: events,
        },
        || {},
    )
    .expect("spawning the writer")
}

/// The COPY rows of one Codec 8E frame of `n` records for device `id`, the way a shard makes
/// them: the frame's wire bytes, decoded, encoded.
fn rows(id: u64, n: usize, seed: u32) -> Bytes {
    let wire = frame(Codec::C8E, &records(Codec::C8E, n, 1_700_000_000_000, seed));
    let Ok(Status::Complete((Frame::Avl(avl), _))) = decode_frame(&wire, 16_384) else {
        panic!("an AVL frame");
    };
    let mut out = Vec::new();
    encode_rows(imei(id), &avl, 1_700_000_000_000_000, &mut out);
    out.into()
}

fn batch(rows: Bytes, records: u32) -> (WriterBatch, oneshot::Receiver<WriteOutcome>) {
    let (done, rx) = oneshot::channel();
    (
        WriterBatch {
            permit: ByteBudget::new(1 << 30).try_acquire(rows.len()).unwrap(),
            rows,
            records,
            done,
            telemetry: None,
        },
        rx,
    )
}

/// The writer's answer, if it comes within `limit`.
fn answer_within(
    rx: &mut oneshot::Receiver<WriteOutcome>,
    limit: Duration,
) -> Option<WriteOutcome> {
    let mut got = None;
    wait_until(limit, || match rx.try_recv() {
        Ok(Some(o)) => {
            got = Some(o);
            true
        }
        Ok(None) => false,
        Err(_) => panic!("the writer dropped a batch unanswered"),
    });
    got
}

fn event(id: u64, reason: Option<&str>) -> SessionEvent {
    SessionEvent {
        imei: id,
        event: "disconnect",
        at: SystemTime::now(),
        shard: 0,
        transport: "tcp",
        peer: Some("127.0.0.1:40000".into()),
        reason: reason.map(Into::into),
    }
}

/// A batch whose COPY bytes PostgreSQL cannot parse ("insufficient data left in message",
/// SQLSTATE 08P01, the connection-exception class) fails alone; a good batch in the same
/// transaction commits. It used to count as a lost connection and be retried forever.
#[test]
fn malformed_copy_rows_fail_their_batch_alone_and_the_rest_commits() {
    let pg = TestPg::start();
    let w = start_writer(&pg, 1, 300, 1024);
    let tx = w.sender();

    // The first field (imei, int8) declared 4 bytes long and cut to 4: int8recv reads past it.
    let good = rows(356_800_000_000_001, 3, 1);
    let mut bad = rows(356_800_000_000_002, 1, 2).to_vec();
    assert_eq!(
        bad[2..6],
        8i32.to_be_bytes(),
        "row starts with the 8-byte imei field"
    );
    bad[2..6].copy_from_slice(&4i32.to_be_bytes());
    bad.drain(10..14);

    let (bad, mut bad_rx) = batch(bad.into(), 1);
    let (good, mut good_rx) = batch(good, 3);
    // Both within one gathering window: one transaction, which PostgreSQL refuses.
    assert!(tx.send_rows(bad).is_ok() && tx.send_rows(good).is_ok());
    assert_eq!(
        answer_within(&mut bad_rx, Duration::from_secs(20)),
        Some(WriteOutcome::Failed)
    );
    assert_eq!(
        answer_within(&mut good_rx, Duration::from_secs(20)),
        Some(WriteOutcome::Committed)
    );
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), 3);
    assert_eq!(
        w.stats
            .failed_batches
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(tx);
    assert!(w.close(Instant::now() + LONG), "a clean close");
}

/// The database is down and stays down: closing the writer with a 2 s deadline returns in
/// time, and the batch it was retrying is answered Failed, not left hanging (it used to retry,
/// and `join` to wait, for as long as the outage lasted).
#[test]
fn close_ends_retries_at_the_deadline_and_answers_failed() {
    let mut pg = TestPg::start();
    let w = start_writer(&pg, 2, 5, 1024);
    pg.pg.stop().unwrap();
    let tx = w.sender();
    let (b, mut rx) = batch(rows(356_800_000_000_010, 2, 3), 2);
    assert!(tx.send_rows(b).is_ok());
    drop(tx);
    let stats = w.stats.clone();
    assert!(
        wait_until(LONG, || stats
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2),
        "the writer is retrying"
    );
    assert_eq!(
        rx.try_recv(),
        Ok(None),
        "nothing answered during the outage"
    );

    let start = Instant::now();
    let deadline = start + Duration::from_secs(2);
    // On a helper thread, so that a close that never returns fails the test instead of hanging.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(w.close(deadline));
    });
    let clean = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("close returns soon after its deadline");
    let took = start.elapsed();
    assert!(!clean, "a close cut short by the deadline says so");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "close took {took:?}"
    );
    assert_eq!(rx.try_recv(), Ok(Some(WriteOutcome::Failed)));
    assert_eq!(
        stats
            .failed_at_deadline
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A session event that PostgreSQL refuses (`text` cannot hold a NUL byte) arrives with a
/// frame: the frame commits, the good event is stored, the bad one alone is dropped and
/// counted. It used to share the frame's transaction and make the frame fail.
#[test]
fn a_session_event_the_database_refuses_loses_only_itself() {
    let pg = TestPg::start();
    let w = start_writer(&pg, 1, 300, 1024);
    let tx = w.sender();
    let (b, mut rx) = batch(rows(356_800_000_000_020, 4, 4), 4);
    assert!(tx.send_event(event(356_800_000_000_020, Some("closed by peer"))));
    assert!(tx.send_event(event(356_800_000_000_021, Some("bad\0reason"))));
    assert!(tx.send_rows(b).is_ok());
    assert_eq!(
        answer_within(&mut rx, Duration::from_secs(20)),
        Some(WriteOutcome::Committed)
    );
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), 4);
    let stats = w.stats.clone();
    assert!(wait_until(LONG, || stats
        .session_events_refused
        .load(std::sync::atomic::Ordering::Relaxed)
        == 1));
    assert_eq!(
        pg.scalar("SELECT count(*) FROM device_sessions WHERE imei = 356800000000020"),
        1
    );
    assert_eq!(pg.scalar("SELECT count(*) FROM device_sessions"), 1);
    drop(tx);
    assert!(w.close(Instant::now() + LONG), "a clean close");
}

/// A reconnect storm during an outage: far more session events than their budget. Telemetry
/// is still accepted (events used to fill the shared channel, and then frames failed with
/// "writer unavailable"); the events over budget are dropped and counted, the others kept;
/// when the database is back, the frames commit and the kept events are written.
#[test]
fn session_events_over_budget_during_an_outage_never_refuse_telemetry() {
    let mut pg = TestPg::start();
    let budget = 32;
    let w = start_writer(&pg, 2, 5, budget);
    pg.pg.stop().unwrap();
    let tx = w.sender();
    let mut answers = Vec::new();
    let mut accepted = 0;
    for f in 0..10u64 {
        for e in 0..100 {
            accepted +=
                tx.send_event(event(356_800_000_001_000 + e, Some("idle timeout"))) as usize;
        }
        let (b, rx) = batch(rows(356_800_000_000_100 + f, 5, 10 + f as u32), 5);
        assert!(tx.send_rows(b).is_ok(), "frame {f} refused by the writer");
        answers.push(rx);
    }
    let dropped = w
        .stats
        .session_events_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(accepted, budget);
    assert_eq!(dropped as usize, 1000 - budget);
    for rx in &mut answers {
        assert_eq!(
            rx.try_recv(),
            Ok(None),
            "nothing answered during the outage"
        );
    }

    pg.pg.restart_after_stop().unwrap();
    for rx in &mut answers {
        assert_eq!(answer_within(rx, LONG), Some(WriteOutcome::Committed));
    }
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), 50);
    let stats = w.stats.clone();
    assert!(wait_until(LONG, || stats
        .session_events
        .load(std::sync::atomic::Ordering::Relaxed)
        == budget as u64));
    assert_eq!(
        pg.scalar("SELECT count(*) FROM device_sessions"),
        budget as i64
    );
    // The budget is free again.
    assert!(tx.send_event(event(356_800_000_002_000, None)));
    drop(tx);
    assert!(w.close(Instant::now() + LONG), "a clean close");
}
