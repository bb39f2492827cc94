//! The real loadgen binary against a tiny fake gateway on 127.0.0.1 (no PostgreSQL, no
//! fleetgate server): it answers logins with 01, acks every AVL frame with its record count
//! (TCP) or packet id (UDP), sends each connection one Codec 12 command after its first frame
//! and counts the answers. The runs are 2 s long and bounded by loadgen's own hard cap.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use fleetgate::protocol::command::{TYPE_COMMAND, TYPE_RESPONSE};
use fleetgate::protocol::tcp::{encode_command_frame, encode_record_ack};
use fleetgate::protocol::udp::{decode_datagram, encode_ack};
use fleetgate::protocol::{decode_frame, Codec, Frame, Status, DEFAULT_MAX_FRAME_LEN};
use serde_json::Value;

/// What the fake gateway saw.
#[derive(Default)]
struct Seen {
    logins: AtomicU64,
    frames: AtomicU64,
    records: AtomicU64,
    answers: AtomicU64,
    peers: Mutex<HashSet<IpAddr>>,
}

/// Serves one device connection until it closes.
fn serve(mut s: TcpStream, seen: Arc<Seen>) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut commanded = false;
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        let mut reply = Vec::new();
        loop {
            match decode_frame(&buf[at..], DEFAULT_MAX_FRAME_LEN) {
                Ok(Status::Complete((frame, used))) => {
                    match frame {
                        Frame::Login(_) => {
                            seen.logins.fetch_add(1, Ordering::Relaxed);
                            reply.push(0x01);
                        }
                        Frame::Avl(avl) => {
                            seen.frames.fetch_add(1, Ordering::Relaxed);
                            seen.records
                                .fetch_add(u64::from(avl.count()), Ordering::Relaxed);
                            reply.extend_from_slice(&encode_record_ack(u32::from(avl.count())));
                            if !commanded {
                                encode_command_frame(
                                    Codec::C12,
                                    TYPE_COMMAND,
                                    None,
                                    b"getinfo",
                                    &mut reply,
                                );
                                commanded = true;
                            }
                        }
                        Frame::Command(c) if c.kind == TYPE_RESPONSE => {
                            assert_eq!(c.text(), Some("loadgen ok: getinfo"));
                            seen.answers.fetch_add(1, Ordering::Relaxed);
                        }
                        Frame::Command(_) | Frame::Ping => {}
                    }
                    at += used;
                }
                Ok(Status::Partial(_)) => break,
                Err(e) => panic!("loadgen sent a bad frame: {e}"),
            }
        }
        buf.drain(..at);
        if !reply.is_empty() && s.write_all(&reply).is_err() {
            return;
        }
    }
}

/// A fake TCP gateway on 127.0.0.1; its address and what it sees.
fn tcp_gateway() -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            if let Ok(peer) = conn.peer_addr() {
                s2.peers.lock().unwrap().insert(peer.ip());
            }
            let s3 = s2.clone();
            thread::spawn(move || serve(conn, s3));
        }
    });
    (addr, seen)
}

/// A fake UDP gateway on 127.0.0.1 that acks every datagram.
fn udp_gateway() -> (SocketAddr, Arc<Seen>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let d = decode_datagram(&buf[..n]).expect("loadgen sent a bad datagram");
            s2.frames.fetch_add(1, Ordering::Relaxed);
            s2.records
                .fetch_add(u64::from(d.avl.count()), Ordering::Relaxed);
            let _ = sock.send_to(
                &encode_ack(d.packet_id, d.avl_packet_id, d.avl.count()),
                from,
            );
        }
    });
    (addr, seen)
}

/// Runs loadgen with `args` (plus a short run and a hard cap).
fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--duration", "2", "--warmup", "0.5", "--hard-cap", "30"])
        .args(args)
        .output()
        .expect("loadgen runs")
}

/// Stdout of a `--json` run: exactly one JSON object and nothing else.
fn one_json(out: &Output) -> Value {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{stderr}",
        out.status
    );
    let mut values = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>();
    let v = values
        .next()
        .unwrap_or_else(|| panic!("no JSON on stdout; stderr: {stderr}"))
        .expect("stdout is JSON");
    assert!(
        values.next().is_none(),
        "more than one JSON value on stdout"
    );
    assert!(
        stdout.starts_with('{') && stdout.ends_with("}\n"),
        "nothing else on stdout: {stdout}"
    );
    assert!(v.is_object());
    v
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count"))
}

#[test]
fn closed_loop_run_is_acked_answers_commands_and_reports_one_json_object() {
    let (addr, seen) = tcp_gateway();
    let chart = std::env::temp_dir().join(format!("loadgen-test-{}.svg", std::process::id()));
    let out = loadgen(&[
        "--addr",
        &addr.to_string(),
        "--devices",
        "12",
        "--connect-rate",
        "500",
        "--source-addrs",
        "3",
        "--command-delay-ms",
        "20",
        "--json",
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let v = one_json(&out);
    assert_eq!(n(&v["devices"]["total"]), 12);
    assert_eq!(n(&v["devices"]["logged_in"]), 12);
    assert_eq!(n(&v["devices"]["never_connected"]), 0);
    let acked = n(&v["frames"]["acked"]);
    assert!(acked > 0, "frames acked: {v}");
    assert_eq!(
        n(&v["records"]["acked"]),
        acked * 10,
        "10 records per frame"
    );
    assert!(n(&v["records"]["acked"]) <= seen.records.load(Ordering::Relaxed));
    assert!(v["records"]["per_s"].as_f64().unwrap() > 0.0);
    assert!(n(&v["latency_ms"]["count"]) > 0);
    assert!(v["latency_ms"]["p99"].as_f64().unwrap() >= v["latency_ms"]["p50"].as_f64().unwrap());
    assert_eq!(n(&v["connects"]["errors"]), 0);
    assert_eq!(v["config"]["mode"], "closed");
    assert!(v["verify"].is_null());
    // Every device got one command on its connection and answered it after 20 ms.
    assert_eq!(n(&v["commands"]["received"]), 12);
    assert_eq!(n(&v["commands"]["answered"]), 12);
    assert_eq!(seen.answers.load(Ordering::Relaxed), 12);
    // --source-addrs 3: the devices came from 127.0.0.2, .3 and .4.
    let peers = seen.peers.lock().unwrap().clone();
    let want: HashSet<IpAddr> = (2..=4).map(|h| IpAddr::from([127, 0, 0, h])).collect();
    assert_eq!(peers, want);
    let series = v["series"].as_array().unwrap();
    assert!(series.len() >= 2, "a point per second: {series:?}");
    assert!(series
        .iter()
        .any(|p| p["records_per_s"].as_f64().unwrap() > 0.0));
    let svg = std::fs::read_to_string(&chart).expect("the chart is written");
    let _ = std::fs::remove_file(&chart);
    assert!(svg.starts_with("<svg") && svg.contains("Records acked per second"));
}

#[test]
fn two_processes_merge_into_one_report() {
    let (addr, seen) = tcp_gateway();
    let out = loadgen(&[
        "--addr",
        &addr.to_string(),
        "--devices",
        "10",
        "--processes",
        "2",
        "--threads",
        "1",
        "--json",
    ]);
    let v = one_json(&out);
    assert_eq!(n(&v["config"]["processes"]), 2);
    assert_eq!(n(&v["devices"]["total"]), 10);
    assert_eq!(n(&v["devices"]["logged_in"]), 10);
    assert_eq!(
        seen.logins.load(Ordering::Relaxed),
        10,
        "each device once, in one process"
    );
    let acked = n(&v["frames"]["acked"]);
    assert!(acked > 0);
    assert!(acked <= seen.frames.load(Ordering::Relaxed));
    assert!(n(&v["latency_ms"]["count"]) > 0);
    assert!(
        v["latency_ms"].get("histogram").is_none(),
        "merged: no histograms left"
    );
    let series = v["series"].as_array().unwrap();
    assert!(!series.is_empty());
    // The merged seconds count the devices of both processes.
    assert!(
        series.iter().any(|p| n(&p["connected"]) == 10),
        "{series:?}"
    );
    assert!(series.iter().all(|p| p.get("histogram").is_none()));
}

#[test]
fn open_loop_with_drops_resends_what_was_cut() {
    let (addr, seen) = tcp_gateway();
    let out = loadgen(&[
        "--addr",
        &addr.to_string(),
        "--devices",
        "8",
        "--rate",
        "800",
        "--drop-fraction",
        "0.5",
        "--drop-interval",
        "0.4",
        "--json",
    ]);
    let v = one_json(&out);
    assert_eq!(v["config"]["mode"], "open");
    assert_eq!(n(&v["devices"]["droppers"]), 4);
    let drops = n(&v["connects"]["drops"]);
    assert!(drops > 0, "drops: {v}");
    assert!(n(&v["connects"]["reconnects"]) >= drops);
    assert!(
        n(&v["frames"]["resent"]) >= drops,
        "each cut frame goes again"
    );
    assert!(n(&v["records"]["acked"]) > 0);
    assert!(n(&v["records"]["acked"]) <= seen.records.load(Ordering::Relaxed));
    // 800 records/s offered for 1.5 s measured: acked near that (a loose bound).
    let per_s = v["records"]["per_s"].as_f64().unwrap();
    assert!(per_s > 400.0 && per_s < 1200.0, "records/s {per_s}");
}

#[test]
fn udp_devices_are_acked() {
    let (addr, seen) = udp_gateway();
    let out = loadgen(&[
        "--addr",
        &addr.to_string(),
        "--udp",
        "--devices",
        "5",
        "--json",
    ]);
    let v = one_json(&out);
    assert_eq!(v["config"]["transport"], "udp");
    assert!(n(&v["frames"]["acked"]) > 0);
    assert!(n(&v["frames"]["acked"]) <= seen.frames.load(Ordering::Relaxed));
}

#[test]
fn a_non_loopback_target_is_refused_before_any_traffic() {
    for addr in [
        "192.0.2.1:5027",
        "[2001:db8::1]:5027",
        "gateway.example.com:5027",
    ] {
        let out = loadgen(&["--addr", addr, "--devices", "1", "--json"]);
        assert!(!out.status.success(), "{addr} accepted");
        assert!(out.stdout.is_empty(), "{addr}: nothing on stdout");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("not a loopback address") && stderr.contains("--allow-remote"),
            "{addr}: {stderr}"
        );
    }
}

#[test]
fn the_hard_cap_ends_a_run_whatever_its_duration() {
    let (addr, _seen) = tcp_gateway();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--addr", &addr.to_string(), "--devices", "4", "--json"])
        .args(["--duration", "600", "--hard-cap", "2"])
        .output()
        .expect("loadgen runs");
    let took = started.elapsed();
    let v = one_json(&out);
    assert_eq!(v["duration"]["hard_cap_hit"], true);
    assert!(n(&v["frames"]["acked"]) > 0);
    // 2 s of cap, plus start-up and the runtime's 1 s shutdown allowance at most.
    assert!(took < std::time::Duration::from_secs(8), "took {took:?}");
}
