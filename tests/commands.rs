//! The command ledger against a real PostgreSQL: queueing, superseding, one command in flight
//! per device across gateways, answers, timeouts, expiry, cancellation, and release of what a
//! dead gateway held. The shards are stood in for by their inboxes (what the dispatcher sends
//! them is read back here); the gateway-level round trip over a device socket is in
//! tests/api.rs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestPg;
use fleetgate::control::commands::{Cancelled, Commands, CommandsConfig, NewCommand, Payload};
use fleetgate::protocol::{decode_frame, Codec, Frame, Imei, Status};
use fleetgate::shard::ShardMsg;
use futures::channel::mpsc;

fn imei(n: u64) -> Imei {
    Imei::new(356_990_000_000_000 + n).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A ledger for gateway `name` with one shard whose inbox the test reads.
fn ledger(pg: &TestPg, name: &str) -> (Arc<Commands>, mpsc::UnboundedReceiver<ShardMsg>) {
    let (tx, rx) = mpsc::unbounded();
    let cmds = Commands::new(
        CommandsConfig {
            gateway: name.into(),
            timeout: Duration::from_secs(1),
            max_attempts: 2,
        },
        fleetgate::db::pool(&pg.url(), 4).unwrap(),
        Arc::new(vec![tx]),
    );
    (Arc::new(cmds), rx)
}

fn text(imei: Imei, t: &str) -> NewCommand {
    NewCommand {
        imei,
        payload: Payload::Text(t.into()),
        codec: Codec::C12,
        metadata: serde_json::json!({"order": 7}),
        ttl_s: None,
        priority: 0,
    }
}

/// The commands the dispatcher handed to the shard so far: (id, imei, text in the frame).
fn sent(rx: &mut mpsc::UnboundedReceiver<ShardMsg>) -> Vec<(i64, Imei, String)> {
    let mut out = Vec::new();
    while let Ok(m) = rx.try_recv() {
        if let ShardMsg::SendCommand { id, imei, frame } = m {
            let Ok(Status::Complete((Frame::Command(c), _))) = decode_frame(&frame, 1 << 16) else {
                panic!("not a command frame");
            };
            out.push((id, imei, c.text().unwrap_or("").to_string()));
        }
    }
    out
}

#[test]
fn one_command_in_flight_per_device_highest_priority_first_answered_in_order() {
    let pg = TestPg::start();
    let rt = rt();
    rt.block_on(async {
        let (cmds, mut rx) = ledger(&pg, "gw-a");
        let d = imei(1);
        let low = cmds.submit(text(d, "getinfo")).await.unwrap();
        let mut urgent = text(d, "setdigout 1");
        urgent.priority = 5;
        let high = cmds.submit(urgent).await.unwrap();
        assert_eq!(low.state, "queued");
        assert_eq!(low.metadata, serde_json::json!({"order": 7}));

        // Offline: nothing is sent.
        cmds.dispatch(d).await;
        assert!(sent(&mut rx).is_empty());

        cmds.device_online(d, 0).await;
        assert_eq!(sent(&mut rx), [(high.id, d, "setdigout 1".to_string())]);
        // The second waits for the first's answer.
        cmds.dispatch(d).await;
        assert!(sent(&mut rx).is_empty());
        cmds.answered(high.id, d, false, "DOUT1:1".into()).await;
        assert_eq!(sent(&mut rx), [(low.id, d, "getinfo".to_string())]);

        let done = cmds.get(high.id).await.unwrap().unwrap();
        assert_eq!(done.state, "completed");
        assert_eq!(done.response.as_deref(), Some("DOUT1:1"));
        assert_eq!(done.attempts, 1);

        // A Codec 14 refusal fails the command.
        cmds.answered(low.id, d, true, "".into()).await;
        assert_eq!(cmds.get(low.id).await.unwrap().unwrap().state, "failed");
    });
}

#[test]
fn two_gateways_never_have_one_device_s_commands_in_flight_twice() {
    let pg = TestPg::start();
    let rt = rt();
    rt.block_on(async {
        let (a, mut rx_a) = ledger(&pg, "gw-a");
        let (b, mut rx_b) = ledger(&pg, "gw-b");
        let d = imei(2);
        for n in 0..20 {
            a.submit(text(d, &format!("cmd {n}"))).await.unwrap();
        }
        // Both believe the device is theirs (a reconnect between gateways) and race.
        a.device_online(d, 0).await;
        b.device_online(d, 0).await;
        let mut handles = Vec::new();
        for _ in 0..10 {
            let (a, b) = (a.clone(), b.clone());
            handles.push(tokio::spawn(async move { a.dispatch(d).await }));
            handles.push(tokio::spawn(async move { b.dispatch(d).await }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let total = sent(&mut rx_a).len() + sent(&mut rx_b).len();
        assert_eq!(total, 1, "one command in flight per device");
    });
}

#[test]
fn a_command_for_a_device_connected_here_is_sent_by_the_post_itself() {
    let pg = TestPg::start();
    let rt = rt();
    rt.block_on(async {
        let (a, mut rx_a) = ledger(&pg, "gw-a");
        let (b, mut rx_b) = ledger(&pg, "gw-b");
        let d = imei(4);
        a.device_online(d, 0).await;
        // No dispatcher runs here: what reaches the shard was sent by `submit` itself.
        let first = a.submit(text(d, "getgps")).await.unwrap();
        assert_eq!(first.state, "sent", "{first:?}");
        assert_eq!(first.attempts, 1);
        assert!(first.sent_at.is_some());
        assert_eq!(sent(&mut rx_a), [(first.id, d, "getgps".to_string())]);
        // One in flight: the next waits, whoever takes the POST.
        let second = a.submit(text(d, "getver")).await.unwrap();
        assert_eq!(second.state, "queued");
        assert!(sent(&mut rx_a).is_empty());

        // Both gateways believe the device is theirs and take POSTs at once: still one in
        // flight.
        let e = imei(5);
        a.device_online(e, 0).await;
        b.device_online(e, 0).await;
        let mut handles = Vec::new();
        for n in 0..10 {
            let (a, b) = (a.clone(), b.clone());
            handles.push(tokio::spawn(async move {
                a.submit(text(e, &format!("a {n}"))).await.unwrap()
            }));
            handles.push(tokio::spawn(async move {
                b.submit(text(e, &format!("b {n}"))).await.unwrap()
            }));
        }
        let mut in_flight = 0;
        for h in handles {
            in_flight += usize::from(h.await.unwrap().state == "sent");
        }
        assert_eq!(in_flight, 1);
        assert_eq!(sent(&mut rx_a).len() + sent(&mut rx_b).len(), 1);
    });
}

#[test]
fn unanswered_commands_are_resent_then_fail_and_a_dead_gateway_s_are_released() {
    let pg = TestPg::start();
    let rt = rt();
    rt.block_on(async {
        let (cmds, mut rx) = ledger(&pg, "gw-a");
        let d = imei(3);
        let c = cmds.submit(text(d, "getgps")).await.unwrap();
        cmds.device_online(d, 0).await;
        assert_eq!(sent(&mut rx).len(), 1);
        // No answer: sent again (attempt 2 of 2), then failed.
        cmds.undelivered(c.id, d, "no answer").await;
        assert_eq!(sent(&mut rx).len(), 1);
        cmds.undelivered(c.id, d, "no answer").await;
        assert!(sent(&mut rx).is_empty());
        let v = cmds.get(c.id).await.unwrap().unwrap();
        assert_eq!((v.state.as_str(), v.attempts), ("failed", 2));
        assert_eq!(v.error.as_deref(), Some("no answer"));

        // A gateway that died holding a command in flight: another one releases it after twice
        // the command timeout, and sends it.
        let (dead, mut dead_rx) = ledger(&pg, "gw-dead");
        let e = imei(4);
        let held = dead.submit(text(e, "getver")).await.unwrap();
        dead.device_online(e, 0).await;
        assert_eq!(sent(&mut dead_rx).len(), 1);
        drop(dead);
        let (live, mut live_rx) = ledger(&pg, "gw-live");
        live.device_online(e, 0).await;
        assert!(sent(&mut live_rx).is_empty(), "still in flight elsewhere");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            live.sweep().await;
            let s = sent(&mut live_rx);
            if !s.is_empty() {
                assert_eq!(s[0].0, held.id);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never released");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn queued_commands_expire_are_superseded_and_can_be_cancelled() {
    let pg = TestPg::start();
    let rt = rt();
    rt.block_on(async {
        let (cmds, mut rx) = ledger(&pg, "gw-a");
        let d = imei(5);
        let mut short = text(d, "getinfo");
        short.ttl_s = Some(1);
        let short = cmds.submit(short).await.unwrap();
        let old = cmds.submit(text(d, "setdigout 1")).await.unwrap();
        let new = cmds.submit(text(d, "setdigout 1")).await.unwrap();
        assert_eq!(cmds.get(old.id).await.unwrap().unwrap().state, "superseded");
        let other = cmds.submit(text(d, "cpureset")).await.unwrap();

        match cmds.cancel(other.id).await.unwrap() {
            Cancelled::Done(v) => assert_eq!(v.state, "cancelled"),
            c => panic!("{c:?}"),
        }
        assert_eq!(cmds.cancel(i64::MAX).await.unwrap(), Cancelled::NotFound);

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cmds.get(short.id).await.unwrap().unwrap().state != "expired" {
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(200)).await;
            cmds.sweep().await;
        }
        // Only the surviving command reaches the device; then it is too late to cancel.
        cmds.device_online(d, 0).await;
        assert_eq!(sent(&mut rx), [(new.id, d, "setdigout 1".to_string())]);
        assert!(matches!(
            cmds.cancel(new.id).await.unwrap(),
            Cancelled::TooLate(_)
        ));
        let history = cmds.for_device(d, 10, None).await.unwrap();
        assert_eq!(history.len(), 4);
        assert!(
            history.windows(2).all(|w| w[0].id > w[1].id),
            "newest first"
        );
    });
}
