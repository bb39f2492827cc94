//! Sessions that nothing can wedge: a real `fleetgate serve`, real sockets on 127.0.0.1, a
//! real PostgreSQL that is stopped under the gateway's feet. Each test is a defect that was
//! found in the ingest path: cancellation, shutdown in every state, the byte bound, slow
//! readers, the connection cap at hand-over.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::gateway::{
    api_get, datagram, frame, imei, metric_sum, records, wait_until, Device, Gateway,
};
use common::TestPg;
use fleetgate::protocol::{Codec, Imei, OwnedIoValue, Record};
use fleetgate::shard::shard_for;

/// The gateways in these tests run two shards.
const SHARDS: usize = 2;

/// IMEIs from `base` on that the gateway's shard `shard` owns.
fn imeis_on_shard(shard: usize, base: u64, n: usize) -> Vec<Imei> {
    (0..)
        .map(|k| imei(base + k))
        .filter(|i| shard_for(*i, SHARDS) == shard)
        .take(n)
        .collect()
}

/// A Codec 8 frame near the 16 KiB default limit made of 1-byte IO elements: the worst case
/// of rows per wire byte (about 150 KiB of COPY rows).
fn worst_case_frame(seed: u64) -> Vec<u8> {
    worst_case_frame_of(seed, 30)
}

/// As [`worst_case_frame`], with `n` records (at most 30).
fn worst_case_frame_of(seed: u64, n: u64) -> Vec<u8> {
    let recs: Vec<Record> = (0..n)
        .map(|i| Record {
            ts_ms: 1_700_000_000_000 + seed * 100_000 + i * 1000,
            priority: 0,
            lon: 0,
            lat: 0,
            alt: 0,
            angle: 0,
            sats: 0,
            speed: 0,
            event_io: 0,
            gen_type: None,
            io: (1..=255u16)
                .map(|id| (id, OwnedIoValue::U8(id as u8)))
                .collect(),
        })
        .collect();
    let f = frame(Codec::C8, &recs);
    assert!(f.len() < 16 * 1024, "{}", f.len());
    f
}

/// COPY row bytes of an AVL frame: what it takes of its shard's budget.
fn rows_of(frame: &[u8]) -> usize {
    match fleetgate::protocol::decode_frame(frame, 1 << 20) {
        Ok(fleetgate::protocol::Status::Complete((fleetgate::protocol::Frame::Avl(avl), _))) => {
            fleetgate::shard::copy::rows_len(&avl)
        }
        other => panic!("not an AVL frame: {other:?}"),
    }
}

/// The samples of metric `name` (all label sets) in the gateway's Prometheus text, summed.
fn metric(api: SocketAddr, name: &str) -> u64 {
    metric_sum(&api_get(api, "/metrics").expect("metrics"), name) as u64
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Logs in without waiting for the answer and sends `frames`; the socket is returned still
/// open (the test decides what it reads).
fn login_and_send(addr: SocketAddr, id: Imei, frames: &[Vec<u8>]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut login = Vec::new();
    fleetgate::protocol::imei::encode_login(id, &mut login);
    s.write_all(&login).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    for f in frames {
        if s.write_all(f).is_err() {
            break; // the gateway stopped reading: back-pressure, as intended
        }
    }
    s
}

/// A config file for the gateway: small kernel socket buffers, so that a device that does not
/// read blocks the gateway's writes after a couple of thousand acks rather than a million.
fn small_socket_buffers(dir: &common::TempDir) -> String {
    let path = dir.path().join("fleetgate.toml");
    std::fs::write(&path, "tcp_send_buffer_bytes = 4096\n").unwrap();
    path.to_string_lossy().into_owned()
}

/// Devices with a tiny receive window that never read. Each pipelines thousands of small
/// frames, whose acks fill its window and the gateway's (small) send buffer until the
/// gateway's writes block, then worst-case frames: a shard that kept their room until their acks were written
/// would be out of budget after one such device. Returns once the gateway stopped reading
/// every one of them (3 s without progress).
fn non_readers(addr: SocketAddr, ids: &[Imei]) -> Vec<TcpStream> {
    let mut frames: Vec<Vec<u8>> = (0..10_000u64)
        .map(|f| {
            frame(
                Codec::C8,
                &records(Codec::C8, 1, 1_700_000_000_000 + f * 1000, 3),
            )
        })
        .collect();
    frames.extend((0..20).map(worst_case_frame));
    let frames = std::sync::Arc::new(frames);
    let hogs: Vec<_> = ids
        .iter()
        .map(|&id| {
            let frames = frames.clone();
            std::thread::spawn(move || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.set_recv_buffer_size(1).unwrap();
                s.connect(&addr.into()).unwrap();
                let mut s: TcpStream = s.into();
                let mut login = Vec::new();
                fleetgate::protocol::imei::encode_login(id, &mut login);
                s.write_all(&login).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                for f in frames.iter() {
                    if s.write_all(f).is_err() {
                        break;
                    }
                }
                s
            })
        })
        .collect();
    hogs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Defect: SIGTERM could hang forever during a database outage (a UDP loop parked on a shard
/// permit never saw shutdown; the main thread joined shards with no deadline). Now `serve`
/// exits within `shutdown_timeout_s` plus a small margin with TCP and UDP traffic parked on
/// the byte budget, and acks nothing it did not commit.
#[test]
fn sigterm_during_an_outage_with_traffic_parked_exits_in_time_acking_nothing() {
    let mut pg = TestPg::start();
    let dir = common::TempDir::new();
    let mut gw = Gateway::start(
        &pg.url(),
        &[
            "--config",
            &small_socket_buffers(&dir),
            "--shutdown-timeout-s",
            "2",
            "--max-bytes-in-flight-per-shard",
            "1048576",
        ],
    );
    let addr = gw.addr;
    // Devices that never read, their ack writes stuck in the kernel.
    let hogs = non_readers(addr, &imeis_on_shard(1, 356_801_000_000_000, 4));
    pg.pg.stop().unwrap();

    // TCP: more worst-case frames than both shards' budgets hold.
    let senders: Vec<_> = (0..8u64)
        .map(|d| {
            std::thread::spawn(move || {
                let frames: Vec<_> = (0..10).map(|f| worst_case_frame(d * 10 + f)).collect();
                login_and_send(addr, imei(356_800_000_000_000 + d), &frames)
            })
        })
        .collect();
    let mut socks: Vec<TcpStream> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    // UDP: datagrams that find the budgets full.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in 0..200u16 {
        let recs = records(
            Codec::C8,
            20,
            1_700_000_000_000 + n as u64 * 60_000,
            n as u32,
        );
        udp.send_to(
            &datagram(n, imei(356_810_000_000_000 + n as u64), Codec::C8, &recs),
            addr,
        )
        .unwrap();
    }

    let started = Instant::now();
    let status = gw.terminate(Duration::from_secs(20));
    let took = started.elapsed();
    assert!(status.is_some(), "gateway still running after {took:?}");
    assert!(took < Duration::from_secs(2 + 5), "exit took {took:?}");

    // Nothing was committed during the outage, so nothing may have been acked: a device reads
    // its login answer and then only the end of the stream.
    for s in &mut socks {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(got.len() <= 1, "acked during an outage: {got:?}");
    }
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 64];
    assert!(udp.recv_from(&mut b).is_err(), "a datagram was acked");
    drop(hogs);
    pg.pg.restart_after_stop().unwrap();
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE imei >= 356800000000000 AND imei < 356801000000000"),
        0
    );
}

/// Defect: sessions parked on back-pressure could not be cancelled (replacement relied on
/// shutdown(2) waking a read that nobody was waiting on), so each reconnect of a device
/// during an outage leaked a descriptor, a buffer and a connection slot. Now the replaced
/// session ends whatever it awaits: 200 reconnects leave descriptors and memory flat.
#[test]
fn reconnecting_200_times_during_an_outage_leaks_nothing() {
    let mut pg = TestPg::start();
    let gw = Gateway::start(&pg.url(), &[]);
    let addr = gw.addr;
    pg.pg.stop().unwrap();
    let id = imei(356_820_000_000_000);
    // Enough small frames to fill the connection's in-flight window, so its session is parked.
    let frames: Vec<_> = (0..20u64)
        .map(|f| {
            frame(
                Codec::C8,
                &records(Codec::C8, 1, 1_700_000_000_000 + f * 1000, 1),
            )
        })
        .collect();
    let reconnect = || {
        let (mut d, answer) = Device::login(addr, id).unwrap();
        assert_eq!(answer, 1);
        for f in &frames {
            d.send(f).unwrap();
        }
        d
    };
    // Warm up (allocator, tables), then measure.
    for _ in 0..20 {
        drop(reconnect());
    }
    let last = reconnect();
    assert!(wait_until(Duration::from_secs(10), || open_fds(gw.pid()) > 0));
    let (fds0, rss0) = (open_fds(gw.pid()), gw.rss_kib());
    for _ in 0..200 {
        drop(reconnect());
    }
    let _last = reconnect();
    drop(last);
    // The replaced sessions go at once; allow the last few to be in their closing steps.
    assert!(
        wait_until(Duration::from_secs(10), || open_fds(gw.pid()) <= fds0 + 5),
        "descriptors: {fds0} before, {} after 200 reconnects",
        open_fds(gw.pid())
    );
    let rss1 = gw.rss_kib();
    assert!(
        rss1 < rss0 + 16 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    pg.pg.restart_after_stop().unwrap();
}

/// Defect: the memory bound counted frames, not bytes; a 16 KiB frame of 1-byte IO elements
/// becomes ~150 KiB of rows, so "8192 frames per shard" could mean gigabytes during an outage.
/// Now a shard holds at most `max_bytes_in_flight_per_shard` of rows awaiting commit.
#[test]
fn worst_case_frames_during_an_outage_stay_within_the_byte_bound() {
    let mut pg = TestPg::start();
    let bound: u64 = 4 << 20;
    let gw = Gateway::start(
        &pg.url(),
        &["--max-bytes-in-flight-per-shard", &bound.to_string()],
    );
    let addr = gw.addr;
    // Warm the gateway up with one worst-case frame stored and acked.
    let mut warm = Device::connect(addr, imei(356_830_000_000_999));
    assert_eq!(warm.send_frame(&worst_case_frame(999)).unwrap(), 30);
    let rss0 = gw.rss_kib();
    pg.pg.stop().unwrap();

    // 40 devices x 16 frames x ~150 KiB = ~94 MiB of rows if nothing bounded them.
    let flood: Vec<_> = (0..40u64)
        .map(|d| {
            std::thread::spawn(move || {
                let frames: Vec<_> = (0..16).map(|f| worst_case_frame(d * 16 + f)).collect();
                login_and_send(addr, imei(356_830_000_000_000 + d), &frames)
            })
        })
        .collect();
    let socks: Vec<_> = flood.into_iter().map(|h| h.join().unwrap()).collect();
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        peak = peak.max(gw.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two shards' bounds, plus a fixed overhead: read buffers of 40 connections holding a
    // frame each (16 KiB), the writer's batch being retried, allocator slack.
    let limit = rss0 + 2 * bound / 1024 + 24 * 1024;
    assert!(
        peak < limit,
        "RSS {peak} KiB during the outage, limit {limit} KiB (was {rss0} KiB)"
    );
    drop(socks);
    pg.pg.restart_after_stop().unwrap();
}

/// A frame that finds its shard's byte budget full is put back, unsubmitted, and taken again
/// once there is room (`conn::tcp`: `Taken::NoRoom`, `Session::put_back`). Four devices on one
/// shard pipeline worst-case frames during an outage, several times the shard's 1 MiB bound,
/// so most of their frames wait for room; then the database comes back. Every frame is stored,
/// acked once and in order (frame k has 20 + k records, so a frame lost, doubled or acked out
/// of turn shows in the acks), and counted once.
#[test]
fn frames_that_wait_for_room_are_acked_once_in_order_once_there_is_room() {
    let mut pg = TestPg::start();
    let bound = 1usize << 20;
    let gw = Gateway::start(
        &pg.url(),
        &["--max-bytes-in-flight-per-shard", &bound.to_string()],
    );
    let (addr, api) = (gw.addr, gw.api);
    let ids = imeis_on_shard(0, 356_860_000_000_000, 4);
    let frames_each = 8u64;
    let frames: Vec<Vec<(u32, Vec<u8>)>> = (0..ids.len() as u64)
        .map(|d| {
            (0..frames_each)
                .map(|k| (20 + k as u32, worst_case_frame_of(d * 100 + k, 20 + k)))
                .collect()
        })
        .collect();
    // Frames that hold room at once hold at most `bound` bytes: once the frames decoded (a
    // prefix of each device's) are more than that even if they were the smallest, one waits.
    let mut rows: Vec<usize> = frames.iter().flatten().map(|(_, f)| rows_of(f)).collect();
    rows.sort_unstable();
    let some_waited = |decoded: u64| rows.iter().take(decoded as usize).sum::<usize>() > bound;
    let fit = bound / rows[0];
    pg.pg.stop().unwrap();

    let devices: Vec<_> = ids
        .iter()
        .zip(frames.clone())
        .map(|(&id, frames)| {
            std::thread::spawn(move || {
                let mut d = Device::connect(addr, id);
                d.stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                // Blocks while the gateway does not read (the frame in front waits for room).
                for (_, f) in &frames {
                    d.send(f).unwrap();
                }
                let acks: Vec<u32> = frames.iter().map(|_| d.ack().unwrap()).collect();
                // Nothing more: no frame acked twice.
                d.stream
                    .set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut extra = [0u8; 4];
                let more = d.stream.read(&mut extra);
                assert!(
                    matches!(&more, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
                    "{id}: more after its acks: {more:?}"
                );
                acks
            })
        })
        .collect();
    // Frames wait for room. (Frames are counted once, when first decoded; at most one per
    // device waits.)
    assert!(
        wait_until(Duration::from_secs(20), || some_waited(metric(
            api,
            "fleetgate_frames_received_total"
        ))),
        "no frame waited for room: {} decoded, rows {rows:?}",
        metric(api, "fleetgate_frames_received_total")
    );
    // An upper bound ("never more than"), which no condition can be waited for: half a second
    // for a frame decoded too many to show up in the count before it is read.
    std::thread::sleep(Duration::from_millis(500));
    let decoded = metric(api, "fleetgate_frames_received_total");
    eprintln!("{decoded} frames decoded during the outage; {fit} of the smallest fit");
    assert!(
        decoded <= fit as u64 + ids.len() as u64,
        "{decoded} decoded during the outage, {fit} fit, {} devices",
        ids.len()
    );
    assert_eq!(
        metric(api, "fleetgate_records_acked_total"),
        0,
        "acked during the outage"
    );
    pg.pg.restart_after_stop().unwrap();

    for (d, h) in devices.into_iter().enumerate() {
        let acks = h.join().unwrap();
        let want: Vec<u32> = frames[d].iter().map(|(n, _)| *n).collect();
        assert_eq!(acks, want, "device {d}: acks not one per frame in order");
    }
    let per_device: u64 = (0..frames_each).map(|k| 20 + k).sum();
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE imei >= 356860000000000 AND imei < 356861000000000"),
        (per_device * ids.len() as u64) as i64
    );
    let sent = frames_each * ids.len() as u64;
    assert_eq!(metric(api, "fleetgate_frames_received_total"), sent);
    assert_eq!(
        metric(api, "fleetgate_records_acked_total"),
        per_device * ids.len() as u64
    );
}

/// Defect: a slow reader held shard-wide permits until its ack had been written (with a 30 s
/// write timeout), so devices that never read stalled every device of their shard. Now the
/// shard's budget comes back when the writer answers; a device that does not read stalls only
/// itself (and is closed after `write_timeout_s`).
#[test]
fn devices_that_never_read_do_not_stall_their_shard() {
    let pg = TestPg::start();
    let dir = common::TempDir::new();
    let gw = Gateway::start(
        &pg.url(),
        &[
            "--config",
            &small_socket_buffers(&dir),
            "--max-bytes-in-flight-per-shard",
            "1048576",
            "--write-timeout-s",
            "5",
        ],
    );
    let addr = gw.addr;
    let ids = imeis_on_shard(0, 356_840_000_000_000, 9);
    let (normal, silent) = ids.split_first().unwrap();
    let hogs = non_readers(addr, silent);

    // A normal device on the same shard still gets every ack promptly.
    let mut dev = Device::connect(addr, *normal);
    dev.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut worst = Duration::ZERO;
    for f in 0..20u64 {
        let fr = worst_case_frame(1000 + f);
        let t = Instant::now();
        assert_eq!(dev.send_frame(&fr).expect("an ack within 5 s"), 30);
        worst = worst.max(t.elapsed());
    }
    eprintln!("the normal device's slowest ack beside 8 non-readers: {worst:?}");
    // The non-readers' writes were indeed stuck: each is closed by the write timeout.
    assert!(wait_until(Duration::from_secs(30), || pg.scalar(
        "SELECT count(*) FROM device_sessions WHERE reason = 'write timeout: device does not read'"
    ) == 8));
    drop(hogs);
}

/// Defect: adopting a connection handed over by another shard ignored the connection cap, so
/// a shard could hold any number of connections. Now the owning shard refuses (and counts)
/// those over its cap: the device reconnects later.
#[test]
fn the_connection_cap_holds_for_handed_over_connections() {
    let pg = TestPg::start();
    let gw = Gateway::start(&pg.url(), &["--max-connections-per-shard", "1"]);
    let ids = imeis_on_shard(0, 356_850_000_000_000, 8);
    let mut served = Vec::new();
    for id in ids {
        if let Ok((d, 1)) = Device::login(gw.addr, id) {
            served.push(d);
        }
    }
    // Shard 0 owns every one of them and may hold one connection.
    let mut alive = 0;
    for d in &mut served {
        let fr = frame(Codec::C8, &records(Codec::C8, 1, 1_700_000_000_000, 1));
        if d.send_frame(&fr).is_ok() {
            alive += 1;
        }
    }
    assert_eq!(alive, 1, "{} logins answered 01", served.len());
}
