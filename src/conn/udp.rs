//! The shard's UDP socket: each datagram is decoded, its rows go to the writer, and the ack
//! (echoing the datagram's packet id and AVL packet id) is sent once they are committed.
//! Runs on a shard.
//!
//! Datagrams take room in the same byte budget as TCP frames; while the shard waits for room
//! it reads no datagrams (the kernel's receive buffer holds or drops them, and devices resend
//! unacked ones), and the wait ends when the shard stops.
//!
//! Nothing is logged above debug per datagram: a refused one (bad bytes, a device the policy
//! does not admit) can come at line rate from anyone who can reach the port, so it is counted
//! (`fleetgate_bad_frames_total{transport="udp"}`, `fleetgate_logins_total{result="refused"}`)
//! and logged at debug only.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{select, Either};
use glommio::net::UdpSocket;

use crate::log_every::LogEvery;
use crate::protocol::udp::{decode_datagram, encode_ack};
use crate::shard::copy::{encode_rows, rows_len};
use crate::shard::{spawn_detached, Shard, ShardStats};
use crate::sink::{TelemetryEvent, WriteOutcome, WriterBatch};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// Serves datagrams until the shard stops.
pub async fn serve(shard: Rc<Shard>, sock: Rc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let recv_failed = LogEvery::new(Duration::from_secs(10));
    loop {
        let received = {
            let stop = shard.stopping.clone();
            let recv = sock.recv_from(&mut buf);
            futures::pin_mut!(recv);
            match select(recv, stop).await {
                Either::Left((r, _)) => r,
                Either::Right(_) => return,
            }
        };
        let (n, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                if let Some(held_back) = recv_failed.ready() {
                    tracing::warn!(shard = shard.id, error = %e, failures = held_back + 1, "UDP receive failed.");
                }
                continue;
            }
        };
        ShardStats::inc(&shard.stats.udp_datagrams);
        let d = match decode_datagram(&buf[..n]) {
            Ok(d) => d,
            Err(e) => {
                ShardStats::inc(&shard.stats.udp_errors);
                tracing::debug!(shard = shard.id, %peer, error = %e, "Bad datagram refused.");
                continue;
            }
        };
        if !shard.policy.admits(d.imei) {
            ShardStats::inc(&shard.stats.logins_rejected);
            tracing::debug!(shard = shard.id, imei = %d.imei, "Datagram refused by the device policy.");
            continue;
        }
        let need = rows_len(&d.avl);
        let permit = match shard.budget.try_acquire(need) {
            Some(p) => p,
            None => {
                let stop = shard.stopping.clone();
                match select(shard.budget.acquire(need), stop).await {
                    Either::Left((p, _)) => p,
                    Either::Right(_) => return,
                }
            }
        };
        let ack = encode_ack(d.packet_id, d.avl_packet_id, d.avl.count());
        let records = d.avl.count() as u32;
        let mut rows = Vec::with_capacity(need);
        encode_rows(d.imei, &d.avl, crate::time::unix_now_us(), &mut rows);
        let (done, rx) = oneshot::channel();
        let batch = WriterBatch {
            rows: rows.into(),
            records,
            done,
            permit,
            telemetry: shard
                .telemetry
                .wants_telemetry(d.imei)
                .then(|| Box::new(TelemetryEvent::from_avl(d.imei, &d.avl))),
        };
        if shard.writer.send_rows(batch).is_err() {
            tracing::error!(shard = shard.id, "Writer gone; datagram not accepted.");
            continue;
        }
        let (s, sock, imei) = (shard.clone(), sock.clone(), d.imei);
        spawn_detached(&shard.gate, async move {
            if rx.await == Ok(WriteOutcome::Committed) {
                s.count_stored(imei, records);
                if sock.send_to(&ack, peer).await.is_ok() {
                    s.stats
                        .udp_records_acked
                        .fetch_add(records as u64, Ordering::Relaxed);
                }
            }
        });
    }
}
