//! Control-plane figures (issue 7), end to end over 127.0.0.1 against the real gateway binary.
//!
//! ```sh
//! cargo bench --bench control_plane                 # ~1 minute after the build
//! CP_COMMANDS=500 CP_DEVICES=200 cargo bench --bench control_plane   # shorter
//! TMPDIR=/dev/shm cargo bench --bench control_plane # PostgreSQL on tmpfs (diagnosis)
//! ```
//!
//! It starts a managed PostgreSQL of its own (`ManagedPostgres`, serve's default settings:
//! fsync on) in a temp dir, a webhook receiver of its own on 127.0.0.1, and
//! `fleetgate serve` (the binary built in the bench profile) with a command-scope API key and
//! one route (`devices/+/connected`, `devices/+/disconnected`, `commands/#`) to the receiver.
//! Then it measures:
//!
//! 1. **Command round trip**: one device connected over TCP answers each command frame at
//!    once; `CP_COMMANDS` (2000) sequential `POST /api/v1/commands`, each timed from just
//!    before the request is written to the moment the whole command frame is read on the
//!    device's socket. The next command is posted only after the previous one's
//!    `commands/{id}/completed` webhook arrived (a device has one command in flight: posting
//!    earlier would time the previous command's completion too).
//! 2. **Webhook delivery**: (a) those `completed` events, from the device's answer written to
//!    the event's arrival at the receiver (the whole path: answer, ledger transaction, NOTIFY,
//!    outbox read, POST); (b) `CP_DEVICES` (500) devices connect then disconnect (2 events
//!    each); each event's `time` (when it happened, RFC 3339 ms, truncated) against the
//!    receiver's clock at arrival.
//!
//! One summary line per figure; then the gateway's WARN/ERROR log lines, if any.
//! `CP_SAMPLES=FILE` also writes each measured command's timings there (one line each);
//! `BENCH_GATEWAY_BIN=PATH` runs that gateway binary instead of the one cargo built (A/B).
//!
//! `cargo bench --bench control_plane -- --receiver 127.0.0.1:PORT --for-s N` runs only the
//! receiver (answers 200 to every POST, counts them) for N seconds: the telemetry-webhook
//! A/B with loadgen in tuning/control-plane.md uses it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetgate::pg::{ManagedPostgres, PgOptions};
use fleetgate::protocol::command::{TYPE_COMMAND, TYPE_RESPONSE};
use fleetgate::protocol::imei::encode_login;
use fleetgate::protocol::tcp::encode_command_frame;
use fleetgate::protocol::{decode_frame, Codec, Frame, Imei, Status};
use hdrhistogram::Histogram;

mod common;
use common::{env_usize, Gateway, TempDir};

const API_KEY: &str = "cp-bench-key-5a1f";
const SECRET: &str = "cp-bench-secret";
/// Every wait of the bench is bounded by this.
const WAIT: Duration = Duration::from_secs(20);
const WARMUP_COMMANDS: usize = 50;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--receiver") {
        let addr = args.get(i + 1).expect("--receiver ADDR");
        let secs: u64 = args
            .iter()
            .position(|a| a == "--for-s")
            .and_then(|j| args.get(j + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        receiver_only(addr, Duration::from_secs(secs));
        return;
    }
    // `cargo bench` passes `--bench`; any other argument is a name filter we do not have.
    let commands = env_usize("CP_COMMANDS", 2000);
    let devices = env_usize("CP_DEVICES", 500);
    let started = Instant::now();

    let dir = TempDir::new("fgcp");
    println!("control_plane: PostgreSQL in {}", dir.path().display());
    let mut pg = ManagedPostgres::start(&dir.path().join("pg"), &PgOptions::default())
        .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"));
    let rx = Receiver::start();
    let hook = rx.url("/hook");
    let mut gw = Gateway::start(
        &pg.connection_string(),
        &dir.path().join("gw"),
        &format!(
            "telemetry_events = \"none\"\napi_keys = [\"{API_KEY}:command\"]\n\n[[routes]]\n\
             name = \"bench\"\n\
             topics = [\"devices/+/connected\", \"devices/+/disconnected\", \"commands/#\"]\n\
             url = \"{hook}\"\nsecret = \"{SECRET}\"\n"
        ),
    );
    println!(
        "control_plane: gateway {} pid {} devices on {}, API on {}, receiver on {} ({:.1} s to here)",
        gw.bin.display(),
        gw.pid(),
        gw.device_addr,
        gw.api_addr,
        rx.addr,
        started.elapsed().as_secs_f64()
    );

    let rt = command_round_trips(&gw, &rx, commands);
    let sess = session_events(&gw, &rx, devices);
    let rss = gw.peak_rss_kib();

    println!();
    rt.rtt.print(
        &format!("command round trip, POST written -> frame read on the device (N={commands})"),
        Some(5.0),
    );
    rt.accepted.print(
        &format!("  of which: POST written -> 202 read (N={commands})"),
        None,
    );
    rt.delivery.print(
        &format!(
            "webhook delivery, commands/{{id}}/completed, answer written -> receiver (N={commands})"
        ),
        Some(50.0),
    );
    sess.print(
        &format!(
            "webhook delivery, devices/+/connected|disconnected, event time -> receiver (N={})",
            sess.len()
        ),
        Some(50.0),
    );
    println!(
        "gateway RSS {} MiB; total bench time {:.1} s",
        rss / 1024,
        started.elapsed().as_secs_f64()
    );

    gw.terminate();
    let odd = gw.odd_log_lines();
    if odd.is_empty() {
        println!("gateway log: no WARN or ERROR lines");
    } else {
        println!(
            "gateway log: {} WARN/ERROR lines, the first ones:",
            odd.len()
        );
        for l in odd.iter().take(10) {
            println!("  {l}");
        }
    }
    drop(rx);
    if let Err(e) = pg.stop() {
        eprintln!("stopping PostgreSQL: {e}");
    }
}

fn unix_ms_f(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

/// Latencies in microseconds.
struct Hist(Histogram<u64>);

impl Hist {
    fn new() -> Hist {
        Hist(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap())
    }

    fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros() as u64);
    }

    fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    fn len(&self) -> u64 {
        self.0.len()
    }

    fn print(&self, what: &str, target_ms: Option<f64>) {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        let verdict = match target_ms {
            Some(t) if ms(0.99) < t => format!("; target p99 < {t} ms: met"),
            Some(t) => format!("; target p99 < {t} ms: NOT met"),
            None => String::new(),
        };
        println!(
            "{what}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms{verdict}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            self.0.max() as f64 / 1000.0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (i) and (ii a): commands.

struct RoundTrips {
    rtt: Hist,
    accepted: Hist,
    delivery: Hist,
}

fn command_round_trips(gw: &Gateway, rx: &Receiver, n: usize) -> RoundTrips {
    let imei = Imei::new(356_307_042_441_013).unwrap();
    let mut dev = Device::connect(gw.device_addr, imei);
    let mut api = Api::connect(gw.api_addr);
    let mut out = RoundTrips {
        rtt: Hist::new(),
        accepted: Hist::new(),
        delivery: Hist::new(),
    };
    let body = format!("{{\"imei\":\"{imei}\",\"command\":\"getver\"}}");
    // CP_SAMPLES=FILE: one line per measured command, microseconds: start (since the first
    // command), round trip, 202, completed-event delivery.
    let mut samples = std::env::var_os("CP_SAMPLES")
        .map(|p| std::fs::File::create(p).expect("creating CP_SAMPLES"));
    let started = Instant::now();
    for i in 0..WARMUP_COMMANDS + n {
        let t0 = Instant::now();
        api.write_post("/api/v1/commands", &body);
        // Whichever comes first: the 202 or the frame on the device's socket.
        let mut answer: Option<(Instant, u16, String)> = None;
        let mut frame_at: Option<Instant> = None;
        while answer.is_none() || frame_at.is_none() {
            let deadline = t0 + WAIT;
            assert!(
                Instant::now() < deadline,
                "command {i}: nothing within {WAIT:?}"
            );
            let (api_ready, dev_ready) = poll2(
                (answer.is_none()).then_some(&api.stream),
                (frame_at.is_none()).then_some(&dev.stream),
                deadline,
            );
            if api_ready {
                if let Some((status, body)) = api.try_read_response() {
                    answer = Some((Instant::now(), status, body));
                }
            }
            if dev_ready && dev.try_read_command() {
                frame_at = Some(Instant::now());
                dev.answer(b"ver:bench");
            }
        }
        let (accepted_at, status, body) = answer.unwrap();
        let frame_at = frame_at.unwrap();
        let answered_at = dev.answered_at.unwrap();
        assert_eq!(status, 202, "POST /api/v1/commands: {status} {body}");
        let id = json_field(&body, "id");
        let topic = format!("commands/{id}/completed");
        let ev = rx
            .wait_for(|e| e.topic == topic, WAIT)
            .unwrap_or_else(|| panic!("no {topic} webhook within {WAIT:?}"));
        if i >= WARMUP_COMMANDS {
            out.rtt.record(frame_at - t0);
            out.accepted.record(accepted_at - t0);
            out.delivery.record(ev.arrived - answered_at);
            if let Some(f) = samples.as_mut() {
                let us = |d: Duration| d.as_micros();
                let _ = writeln!(
                    f,
                    "{} {} {} {}",
                    us(t0 - started),
                    us(frame_at - t0),
                    us(accepted_at - t0),
                    us(ev.arrived - answered_at)
                );
            }
        }
    }
    out
}

/// Blocks until one of the given sockets is readable (or the deadline); which ones are.
fn poll2(a: Option<&TcpStream>, b: Option<&TcpStream>, deadline: Instant) -> (bool, bool) {
    let fd = |s: Option<&TcpStream>| s.map_or(-1, |s| s.as_raw_fd());
    let mut fds = [
        libc::pollfd {
            fd: fd(a),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: fd(b),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: two valid pollfd structs (a negative fd is ignored by poll).
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if r <= 0 {
        return (false, false);
    }
    let ready = |p: &libc::pollfd| p.fd >= 0 && p.revents != 0;
    (ready(&fds[0]), ready(&fds[1]))
}

/// The value of `"key":` in a flat JSON object, as text (numbers and strings).
fn json_field(body: &str, key: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => panic!("no {key} in {body}"),
        other => other.to_string(),
    }
}

/// A device on one TCP connection that answers commands (Codec 12 responses).
struct Device {
    stream: TcpStream,
    buf: Vec<u8>,
    answered_at: Option<Instant>,
}

impl Device {
    fn connect(addr: SocketAddr, imei: Imei) -> Device {
        let mut stream = TcpStream::connect(addr).expect("device connect");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut login = Vec::new();
        encode_login(imei, &mut login);
        stream.write_all(&login).unwrap();
        let mut reply = [0u8; 1];
        stream.read_exact(&mut reply).expect("login answer");
        assert_eq!(reply[0], 1, "login of {imei} refused");
        Device {
            stream,
            buf: Vec::new(),
            answered_at: None,
        }
    }

    /// Reads what is there (the socket is readable); true once a whole command frame is in
    /// (it is then consumed).
    fn try_read_command(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).expect("device read");
        assert!(n > 0, "the gateway closed the device's connection");
        self.buf.extend_from_slice(&chunk[..n]);
        match decode_frame(&self.buf, 1 << 16) {
            Ok(Status::Complete((Frame::Command(c), used))) => {
                assert_eq!(c.kind, TYPE_COMMAND, "a command frame");
                self.buf.drain(..used);
                true
            }
            Ok(Status::Complete((other, _))) => panic!("expected a command frame, got {other:?}"),
            Ok(Status::Partial(_)) => false,
            Err(e) => panic!("bad frame from the gateway: {e:?}"),
        }
    }

    fn answer(&mut self, text: &[u8]) {
        let mut out = Vec::new();
        encode_command_frame(Codec::C12, TYPE_RESPONSE, None, text, &mut out);
        self.stream.write_all(&out).expect("device answer");
        self.answered_at = Some(Instant::now());
    }
}

/// A keep-alive HTTP/1.1 client of the API, on one connection.
struct Api {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl Api {
    fn connect(addr: SocketAddr) -> Api {
        let stream = TcpStream::connect(addr).expect("API connect");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Api {
            stream,
            addr,
            buf: Vec::new(),
        }
    }

    fn write_post(&mut self, path: &str, body: &str) {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nx-api-key: {API_KEY}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.stream.write_all(req.as_bytes()).expect("API write");
    }

    /// Reads what is there (the socket is readable); the response once whole.
    fn try_read_response(&mut self) -> Option<(u16, String)> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).expect("API read");
        assert!(n > 0, "the API closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
        let end = self.buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if self.buf.len() < end + len {
            return None;
        }
        let body = String::from_utf8_lossy(&self.buf[end..end + len]).to_string();
        self.buf.drain(..end + len);
        Some((status, body))
    }
}

// ---------------------------------------------------------------------------------------------
// (ii b): session events.

fn session_events(gw: &Gateway, rx: &Receiver, n: usize) -> Hist {
    let base = 351_000_000_000_000u64;
    let first = rx.count();
    // Connect at ~500/s, hold, then disconnect at the same pace: bounded and not one burst.
    let pace = Duration::from_millis(2);
    let mut devs = Vec::with_capacity(n);
    for k in 0..n as u64 {
        devs.push(Device::connect(
            gw.device_addr,
            Imei::new(base + k).unwrap(),
        ));
        std::thread::sleep(pace);
    }
    std::thread::sleep(Duration::from_millis(500));
    for d in devs {
        drop(d);
        std::thread::sleep(pace);
    }
    let ours = |e: &Event| {
        e.topic.starts_with("devices/351")
            && (e.topic.ends_with("/connected") || e.topic.ends_with("/disconnected"))
    };
    assert!(
        rx.wait_until(
            |evs| evs[first..].iter().filter(|e| ours(e)).count() >= 2 * n,
            WAIT * 3
        ),
        "not all {} session events arrived within {:?}",
        2 * n,
        WAIT * 3
    );
    let mut h = Hist::new();
    for e in rx.events_from(first).iter().filter(|e| ours(e)) {
        let Some(t) = parse_rfc3339_ms(&e.time) else {
            panic!("bad time {:?}", e.time)
        };
        let lat_ms = unix_ms_f(e.arrived_wall) - t as f64;
        h.record_us((lat_ms.max(0.0) * 1000.0) as u64);
    }
    h
}

/// `2019-06-10T10:04:46.000Z` -> milliseconds since the Unix epoch.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let ms = if b[19] == b'.' { num(20..23)? } else { 0 };
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

// ---------------------------------------------------------------------------------------------
// The webhook receiver: a thread per connection, keep-alive, answers 200 at once.

#[derive(Clone)]
struct Event {
    topic: String,
    time: String,
    arrived: Instant,
    arrived_wall: SystemTime,
}

struct RxState {
    events: Mutex<Vec<Event>>,
    cv: Condvar,
    count: AtomicU64,
    stop: AtomicBool,
    /// Keep the parsed events (the bench) or only count them (receiver-only mode).
    keep: bool,
}

struct Receiver {
    addr: SocketAddr,
    state: Arc<RxState>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0", true)
    }

    fn start_on(addr: &str, keep: bool) -> Receiver {
        let listener = TcpListener::bind(addr).expect("binding the receiver");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RxState {
            events: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            count: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            keep,
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        Receiver { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn count(&self) -> usize {
        self.state.events.lock().unwrap().len()
    }

    fn events_from(&self, from: usize) -> Vec<Event> {
        self.state.events.lock().unwrap()[from..].to_vec()
    }

    /// The first event (of those not waited for before) matching `pred`, waiting up to `limit`.
    fn wait_for(&self, pred: impl Fn(&Event) -> bool, limit: Duration) -> Option<Event> {
        let deadline = Instant::now() + limit;
        let mut evs = self.state.events.lock().unwrap();
        loop {
            if let Some(e) = evs.iter().rev().find(|e| pred(e)) {
                return Some(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            evs = self.state.cv.wait_timeout(evs, left).unwrap().0;
        }
    }

    /// Waits up to `limit` for `cond` on every event received so far.
    fn wait_until(&self, cond: impl Fn(&[Event]) -> bool, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut evs = self.state.events.lock().unwrap();
        while !cond(&evs) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            evs = self.state.cv.wait_timeout(evs, left).unwrap().0;
        }
        true
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, st: &RxState) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    'conn: loop {
        // Request line and headers. A read timeout keeps what a partial line has so far.
        let mut len = 0usize;
        line.clear();
        loop {
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if st.stop.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            line.clear();
        }
        let mut body = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match reader.read(&mut body[got..]) {
                Ok(0) => return,
                Ok(k) => got += k,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if st.stop.load(Ordering::Acquire) {
                        return;
                    }
                }
                Err(_) => break 'conn,
            }
        }
        let arrived = Instant::now();
        let arrived_wall = SystemTime::now();
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
        st.count.fetch_add(1, Ordering::Relaxed);
        if st.keep {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let ev = Event {
                topic: v["topic"].as_str().unwrap_or_default().to_string(),
                time: v["time"].as_str().unwrap_or_default().to_string(),
                arrived,
                arrived_wall,
            };
            st.events.lock().unwrap().push(ev);
            st.cv.notify_all();
        }
    }
}

/// Only the receiver, for `for_s`: prints how many requests it answered every 5 s.
fn receiver_only(addr: &str, for_s: Duration) {
    let rx = Receiver::start_on(addr, false);
    println!("receiver on {} for {:?}", rx.addr, for_s);
    let end = Instant::now() + for_s;
    let mut last = 0;
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_secs(5).min(end.saturating_duration_since(Instant::now())),
        );
        let n = rx.state.count.load(Ordering::Relaxed);
        println!("receiver: {n} requests answered (+{})", n - last);
        last = n;
    }
}

// ---------------------------------------------------------------------------------------------
