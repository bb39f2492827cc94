//! The ingest path end to end: a real `fleetgate serve` process, real bytes over 127.0.0.1,
//! real rows in a throwaway PostgreSQL.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::gateway::{
    datagram, deliver_all, frame, imei, records, udp_deliver, wait_until, Device, Gateway,
};
use common::TestPg;
use fleetgate::protocol::Codec;

const LONG: Duration = Duration::from_secs(60);

/// `devices` trackers from IMEI `imei_base` on, each delivering `frames_each` frames of ten
/// Codec 8E records with up to four in flight, reconnecting and resending until all are acked.
/// Each thread returns how many frames it resent.
fn spawn_fleet(
    addr: std::net::SocketAddr,
    imei_base: u64,
    devices: u64,
    frames_each: u64,
) -> Vec<std::thread::JoinHandle<usize>> {
    (0..devices)
        .map(|d| {
            std::thread::spawn(move || {
                let frames: Vec<_> = (0..frames_each)
                    .map(|f| {
                        let recs = records(
                            Codec::C8E,
                            10,
                            1_700_000_000_000 + f * 60_000,
                            (d * 100 + f) as u32,
                        );
                        (frame(Codec::C8E, &recs), 10)
                    })
                    .collect();
                deliver_all(
                    || addr,
                    imei(imei_base + d),
                    &frames,
                    4,
                    Duration::from_secs(240),
                )
            })
        })
        .collect()
}

#[test]
fn devices_of_every_codec_over_tcp_and_udp_store_exactly_what_was_acked() {
    let pg = TestPg::start();
    let gw = Gateway::start(&pg.url(), &[]);
    let codecs = [Codec::C8, Codec::C8E, Codec::C16];
    let handles: Vec<_> = (0..24u64)
        .map(|d| {
            let addr = gw.addr;
            std::thread::spawn(move || {
                let codec = codecs[d as usize % 3];
                let id = imei(356_000_000_000_000 + d);
                let frames: Vec<_> = (0..4u64)
                    .map(|f| {
                        let recs = records(
                            codec,
                            10,
                            1_700_000_000_000 + f * 100_000,
                            (d * 10 + f) as u32,
                        );
                        (frame(codec, &recs), 10)
                    })
                    .collect();
                deliver_all(|| addr, id, &frames, 1 + d as usize % 3, LONG);
            })
        })
        .collect();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (k, codec) in codecs.iter().enumerate() {
        let id = imei(357_000_000_000_000 + k as u64);
        let recs = records(*codec, 3, 1_700_000_000_000, k as u32);
        let ack = udp_deliver(
            &sock,
            gw.addr,
            &datagram(0xCA00 + k as u16, id, *codec, &recs),
            LONG,
        );
        assert_eq!(
            ack,
            [0x00, 0x05, 0xCA, k as u8, 0x01, k as u8, 3],
            "UDP ack echoes packet ids and counts"
        );
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE imei < 357000000000000"),
        24 * 4 * 10
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE imei >= 357000000000000"),
        9
    );
    assert_eq!(pg.scalar("SELECT count(DISTINCT imei) FROM telemetry"), 27);

    // The decoded values of one record of each codec, as sent.
    for (d, codec) in codecs.iter().enumerate() {
        let want = &records(*codec, 10, 1_700_000_000_000, (d * 10) as u32)[3];
        let r = &pg.rows(&format!(
                "SELECT extract(epoch FROM ts)::float8 * 1000, priority, lat, lon, alt, angle, sats, speed, event_io, gen_type,
                        io_ids, io_values, nx_ids, nx_values, codec
                   FROM telemetry WHERE imei = {} AND ts = to_timestamp({})",
                356_000_000_000_000u64 + d as u64,
                want.ts_ms as f64 / 1000.0
            ),
        )[0];
        assert_eq!(r.get::<_, f64>(0) as u64, want.ts_ms);
        assert_eq!(r.get::<_, i16>(1), want.priority as i16);
        assert_eq!(r.get::<_, f64>(2), want.lat as f64 / 1e7);
        assert_eq!(r.get::<_, f64>(3), want.lon as f64 / 1e7);
        assert_eq!(r.get::<_, i16>(4), want.alt);
        assert_eq!(r.get::<_, i32>(5), want.angle as i32);
        assert_eq!(r.get::<_, i16>(6), want.sats as i16);
        assert_eq!(r.get::<_, i32>(7), want.speed as i32);
        assert_eq!(r.get::<_, i32>(8), want.event_io as i32);
        assert_eq!(r.get::<_, Option<i16>>(9), want.gen_type.map(i16::from));
        let ids: Vec<i32> = r.get(10);
        let vals: Vec<i64> = r.get(11);
        assert_eq!(ids, [1, 66, 199, 16]);
        let want_vals: Vec<i64> = want
            .io
            .iter()
            .take(4)
            .map(|(_, v)| match v {
                fleetgate::protocol::OwnedIoValue::U8(x) => *x as i64,
                fleetgate::protocol::OwnedIoValue::U16(x) => *x as i64,
                fleetgate::protocol::OwnedIoValue::U32(x) => *x as i64,
                fleetgate::protocol::OwnedIoValue::U64(x) => *x as i64,
                fleetgate::protocol::OwnedIoValue::Nx(_) => unreachable!(),
            })
            .collect();
        assert_eq!(vals, want_vals);
        let nx_ids: Vec<i32> = r.get(12);
        let nx_vals: Vec<Vec<u8>> = r.get(13);
        if *codec == Codec::C8E {
            assert_eq!(nx_ids, [385]);
            assert_eq!(nx_vals.len(), 1);
        } else {
            assert!(nx_ids.is_empty() && nx_vals.is_empty());
        }
        assert_eq!(r.get::<_, i16>(14), codec.id() as i16);
    }
    // IO queryable in plain SQL by id.
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE io_value(io_ids, io_values, 66) >= 12000"),
        24 * 40 + 9
    );
    // Every TCP session recorded its connect and its disconnect.
    // Session rows are written by whichever writer thread takes them, so a device's connect
    // row can be committed after its disconnect row: wait for each.
    assert!(wait_until(LONG, || pg.scalar(
        "SELECT count(*) FROM device_sessions WHERE event = 'disconnect'"
    ) >= 24));
    assert!(wait_until(LONG, || pg.scalar(
        "SELECT count(*) FROM device_sessions WHERE event = 'connect'"
    ) >= 24));
    assert_eq!(
        pg.scalar("SELECT count(*) FROM device_sessions WHERE event = 'connect'"),
        24
    );
}

#[test]
fn resends_are_stored_once_and_distinct_records_with_one_timestamp_both_survive() {
    let pg = TestPg::start();
    let gw = Gateway::start(&pg.url(), &[]);
    let id = imei(356_100_000_000_001);
    let recs = records(Codec::C8E, 5, 1_600_000_000_000, 1);
    let f = frame(Codec::C8E, &recs);
    // The ack got lost: the device sends the same frame again, on a new connection too.
    let mut dev = Device::connect(gw.addr, id);
    assert_eq!(dev.send_frame(&f).unwrap(), 5);
    assert_eq!(dev.send_frame(&f).unwrap(), 5);
    drop(dev);
    let mut dev = Device::connect(gw.addr, id);
    assert_eq!(dev.send_frame(&f).unwrap(), 5);
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), 5);

    // Two different records at the same instant: both kept. And a resend mixed with new ones.
    let mut same_ts = records(Codec::C8E, 2, 1_650_000_000_000, 2);
    same_ts[1].ts_ms = same_ts[0].ts_ms;
    let mut mixed = recs[..2].to_vec();
    mixed.extend(records(Codec::C8E, 3, 1_660_000_000_000, 3));
    assert_eq!(dev.send_frame(&frame(Codec::C8E, &same_ts)).unwrap(), 2);
    assert_eq!(dev.send_frame(&frame(Codec::C8E, &mixed)).unwrap(), 5);
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), 5 + 2 + 3);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE ts = to_timestamp(1650000000)"),
        2
    );

    // Timestamps from anywhere land: 1970, 2000, far future.
    let mut odd = records(Codec::C8, 3, 0, 4);
    odd[1].ts_ms = 946_684_800_000;
    odd[2].ts_ms = 4_102_444_800_000 * 3;
    assert_eq!(dev.send_frame(&frame(Codec::C8, &odd)).unwrap(), 3);
    let odd_times = "ts IN (to_timestamp(0), '2000-01-01Z', to_timestamp(12307334400))";
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM telemetry_default WHERE {odd_times}"
        )),
        3
    );
}

#[test]
fn bad_input_is_refused_and_everyone_else_keeps_being_served() {
    let pg = TestPg::start();
    let gw = Gateway::start(
        &pg.url(),
        &["--login-timeout-s", "1", "--max-frame-len", "2048"],
    );
    let good = imei(356_200_000_000_000);
    let mut steady = Device::connect(gw.addr, good);
    let mut ts = 1_700_000_000_000;
    let mut check_steady = |steady: &mut Device| {
        ts += 60_000;
        assert_eq!(
            steady
                .send_frame(&frame(Codec::C8, &records(Codec::C8, 2, ts, 9)))
                .unwrap(),
            2
        );
    };

    // Garbage instead of a login: closed.
    let mut s = Device {
        stream: std::net::TcpStream::connect(gw.addr).unwrap(),
    };
    s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(s.closed_within(Duration::from_secs(10)));
    check_steady(&mut steady);

    // A malformed IMEI: answered 00, closed.
    let mut s = Device {
        stream: std::net::TcpStream::connect(gw.addr).unwrap(),
    };
    s.send(b"\x00\x0f35620000000000X").unwrap();
    let mut reply = [0u8; 1];
    std::io::Read::read_exact(&mut s.stream, &mut reply).unwrap();
    assert_eq!(reply, [0]);
    assert!(s.closed_within(Duration::from_secs(10)));

    // Oversize declared length after login: closed before any body is sent, nothing acked.
    let mut s = Device::connect(gw.addr, imei(356_200_000_000_001));
    s.send(&[0, 0, 0, 0, 0, 0x10, 0, 0]).unwrap();
    assert!(s.closed_within(Duration::from_secs(10)));
    check_steady(&mut steady);

    // Wrong CRC: closed, never acked, nothing stored.
    let mut s = Device::connect(gw.addr, imei(356_200_000_000_002));
    let mut f = frame(Codec::C8E, &records(Codec::C8E, 3, 1_700_000_000_000, 5));
    let n = f.len();
    f[n - 1] ^= 0x55;
    s.send(&f).unwrap();
    assert!(s.closed_within(Duration::from_secs(10)));
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE imei = 356200000000002"),
        0
    );

    // A socket that never logs in is closed after the login timeout.
    let mut silent = Device {
        stream: std::net::TcpStream::connect(gw.addr).unwrap(),
    };
    assert!(silent.closed_within(Duration::from_secs(10)));

    // A client that connects mid-frame and vanishes.
    let mut s = Device::connect(gw.addr, imei(356_200_000_000_003));
    s.send(&f[..20]).unwrap();
    drop(s);
    check_steady(&mut steady);

    // Garbage over UDP is dropped unanswered; a good datagram afterwards is acked.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(b"\x00\x03abc", gw.addr).unwrap();
    let recs = records(Codec::C8, 1, 1_700_000_000_000, 6);
    let ack = udp_deliver(
        &sock,
        gw.addr,
        &datagram(7, imei(356_200_000_000_004), Codec::C8, &recs),
        LONG,
    );
    assert_eq!(ack, [0, 5, 0, 7, 1, 7, 1]);

    check_steady(&mut steady);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM telemetry WHERE imei = 356200000000000"),
        4 * 2
    );
}

#[test]
fn silent_devices_are_closed_after_the_idle_timeout_and_the_connection_cap_holds() {
    let pg = TestPg::start();
    let gw = Gateway::start(
        &pg.url(),
        &["--idle-timeout-s", "1", "--max-connections-per-shard", "2"],
    );
    let mut quiet = Device::connect(gw.addr, imei(356_310_000_000_000));
    assert!(quiet.closed_within(Duration::from_secs(10)));
    assert!(wait_until(LONG, || pg.scalar(
        "SELECT count(*) FROM device_sessions WHERE reason = 'idle timeout'"
    ) == 1));

    // Two shards of two connections each: of five sockets that never log in, the gateway
    // refuses at least one long before the 30 s login timeout.
    let mut socks: Vec<_> = (0..5)
        .map(|_| Device {
            stream: std::net::TcpStream::connect(gw.addr).unwrap(),
        })
        .collect();
    let mut refused = 0;
    for s in &mut socks {
        refused += s.closed_within(Duration::from_secs(2)) as usize;
    }
    assert!(refused >= 1, "no connection refused over the cap");
}

#[test]
fn a_second_connection_for_an_imei_replaces_the_first() {
    let pg = TestPg::start();
    let gw = Gateway::start(&pg.url(), &[]);
    let id = imei(356_300_000_000_000);
    let mut first = Device::connect(gw.addr, id);
    assert_eq!(
        first
            .send_frame(&frame(
                Codec::C8,
                &records(Codec::C8, 1, 1_700_000_000_000, 1)
            ))
            .unwrap(),
        1
    );
    let mut second = Device::connect(gw.addr, id);
    assert!(first.closed_within(Duration::from_secs(10)));
    assert_eq!(
        second
            .send_frame(&frame(
                Codec::C8,
                &records(Codec::C8, 1, 1_700_000_100_000, 2)
            ))
            .unwrap(),
        1
    );
    assert!(wait_until(LONG, || {
        pg.scalar("SELECT count(*) FROM device_sessions WHERE event = 'disconnect' AND reason = 'replaced by a new connection'"
    ) == 1
    }));
}

#[test]
fn a_port_already_served_is_refused() {
    let pg = TestPg::start();
    let first = Gateway::start(&pg.url(), &[]);
    let second = Gateway::start_on(&pg.url(), first.addr.port(), &[]);
    let err = second
        .err()
        .expect("a second gateway on the same port must not start");
    assert!(err.contains("already in use"), "{err}");
}

#[test]
fn allow_list_refuses_unknown_and_disabled_devices() {
    let pg = TestPg::start();
    pg.scalar("WITH i AS (INSERT INTO devices (imei, enabled) VALUES (356400000000001, true), (356400000000002, false) RETURNING 1) SELECT count(*) FROM i");
    let gw = Gateway::start(&pg.url(), &["--device-policy", "allow_list"]);
    assert_eq!(
        Device::login(gw.addr, imei(356_400_000_000_001)).unwrap().1,
        1
    );
    assert_eq!(
        Device::login(gw.addr, imei(356_400_000_000_002)).unwrap().1,
        0
    );
    assert_eq!(
        Device::login(gw.addr, imei(356_400_000_000_003)).unwrap().1,
        0
    );
}

#[test]
fn sigterm_commits_and_acks_what_is_in_flight_then_exits() {
    let pg = TestPg::start();
    let mut gw = Gateway::start(&pg.url(), &[]);
    let mut devs: Vec<_> = (0..8u64)
        .map(|d| Device::connect(gw.addr, imei(356_500_000_000_000 + d)))
        .collect();
    for (d, dev) in devs.iter_mut().enumerate() {
        for f in 0..3u64 {
            dev.send(&frame(
                Codec::C8E,
                &records(Codec::C8E, 10, 1_700_000_000_000 + f * 60_000, d as u32),
            ))
            .unwrap();
        }
    }
    let status = gw
        .terminate(Duration::from_secs(30))
        .expect("gateway exits within its deadline");
    assert!(status.success(), "{status:?}");
    // Whatever was acked is stored; nothing stored is unaccounted for.
    let mut acked = 0;
    for dev in &mut devs {
        while let Ok(n) = dev.ack() {
            acked += n as i64;
        }
    }
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), acked);
}

/// Devices stream with several frames in flight; the gateway is SIGKILLed twice mid-stream
/// and restarted on the same port. Every device ends with every frame acked, and the table
/// holds each record exactly once.
#[test]
fn sigkill_during_load_loses_nothing_acked_and_duplicates_nothing() {
    let pg = TestPg::start();
    let gw = Gateway::start(&pg.url(), &[]);
    let port = gw.addr.port();
    let addr = gw.addr;
    let gw = std::sync::Arc::new(std::sync::Mutex::new(gw));
    let devices = 16u64;
    let frames_each = 30u64;
    let handles = spawn_fleet(addr, 356_600_000_000_000, devices, frames_each);
    for _ in 0..2 {
        let before = pg.scalar("SELECT count(*) FROM telemetry");
        assert!(wait_until(LONG, || pg
            .scalar("SELECT count(*) FROM telemetry")
            > before + 300));
        let mut g = gw.lock().unwrap();
        g.kill();
        *g = Gateway::start_on(&pg.url(), port, &[]).expect("restart on the same port");
    }
    let resent: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let total = (devices * frames_each * 10) as i64;
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), total);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM (SELECT DISTINCT imei, ts, rec_hash FROM telemetry) d"),
        total
    );
    eprintln!("frames resent after the kills: {resent}");
}

/// PostgreSQL stops during load: acks stop, the gateway's memory stays bounded, and when the
/// database is back ingest resumes by itself; every frame ends acked and stored once.
#[test]
fn database_outage_stops_acks_bounds_memory_and_recovers() {
    let mut pg = TestPg::start();
    let gw = Gateway::start(&pg.url(), &[]);
    let addr = gw.addr;
    let devices = 12u64;
    let frames_each = 40u64;
    let handles = spawn_fleet(addr, 356_700_000_000_000, devices, frames_each);
    assert!(wait_until(LONG, || pg
        .scalar("SELECT count(*) FROM telemetry")
        > 500));
    pg.pg.stop().unwrap();
    // During the outage the gateway holds at most its in-flight limits.
    let mut peak = 0;
    for _ in 0..40 {
        peak = peak.max(gw.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        peak > 0 && peak < 256 * 1024,
        "gateway RSS during the outage: {peak} KiB"
    );
    pg.pg.restart_after_stop().unwrap();
    for h in handles {
        h.join().unwrap();
    }
    let total = (devices * frames_each * 10) as i64;
    assert_eq!(pg.scalar("SELECT count(*) FROM telemetry"), total);
}
