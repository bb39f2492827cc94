//! The gateway as a real process (`fleetgate serve`), and simulated devices speaking raw bytes
//! to it over 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fleetgate::protocol::tcp::encode_avl_frame;
use fleetgate::protocol::udp::encode_datagram;
use fleetgate::protocol::{Codec, Imei, OwnedIoValue, Record};

use super::TempDir;

/// A running `fleetgate serve` against a test database.
pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The control API's address, from the ready line (`api_addr=`).
    pub api: SocketAddr,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl Gateway {
    /// Starts a gateway on any free port with two shards; waits for its ready line.
    pub fn start(db_url: &str, extra: &[&str]) -> Gateway {
        Gateway::start_on(db_url, 0, extra).unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    /// Starts a gateway on `port` (0: any); `Err` with its log when it does not become ready.
    pub fn start_on(db_url: &str, port: u16, extra: &[&str]) -> Result<Gateway, String> {
        Gateway::start_with_env(db_url, port, extra, &[])
    }

    /// As [`Gateway::start_on`], with environment variables (`FLEETGATE_API_KEYS`). The API
    /// listens on any free loopback port unless `extra` names an `--api-addr`.
    pub fn start_with_env(
        db_url: &str,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        Gateway::start_with_command(db_url, port, extra, env, |_| {})
    }

    /// As [`Gateway::start_with_env`], with `setup` applied to the command before it is
    /// spawned (a `pre_exec` that sets resource limits, say).
    pub fn start_with_command(
        db_url: &str,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
        setup: impl FnOnce(&mut Command),
    ) -> Result<Gateway, String> {
        let dir = TempDir::new();
        let api_addr: &[&str] = if extra.contains(&"--api-addr") {
            &[]
        } else {
            &["--api-addr", "127.0.0.1:0"]
        };
        let log = dir.path().join("gateway.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
        command
            .args([
                "serve",
                "--database-url",
                db_url,
                "--device-host",
                "127.0.0.1",
                "--shards",
                "2",
            ])
            .args(["--device-port", &port.to_string(), "--data-dir"])
            .arg(dir.path())
            .args(api_addr)
            .args(extra)
            .env("RUST_LOG", "fleetgate=debug")
            .env_remove("FLEETGATE_API_KEYS")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        setup(&mut command);
        let mut child = command.spawn().expect("spawning fleetgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ready device_addr=") {
                    let addr = rest.split(' ').next().unwrap().to_string();
                    let api = rest
                        .split(' ')
                        .find_map(|f| f.strip_prefix("api_addr="))
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send((addr, api));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((addr, api)) => Ok(Gateway {
                child: Some(child),
                addr: addr.parse().unwrap(),
                api: api.parse().expect("api_addr in the ready line"),
                log,
                _dir: dir,
            }),
            Err(_) => {
                // Its standard output closed (it is exiting), or it took too long.
                let mut status = None;
                wait_until(Duration::from_secs(10), || {
                    status = child.try_wait().ok().flatten();
                    status.is_some()
                });
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "exit {status:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status (waits at most `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Resident memory of the gateway process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; the answer is whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` distinct records from `ts_ms` on, with IO elements the codec can carry.
pub fn records(codec: Codec, n: usize, ts_ms: u64, seed: u32) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let k = seed.wrapping_mul(7919).wrapping_add(i as u32);
            let mut io = vec![
                (1u16, OwnedIoValue::U8((k % 2) as u8)),
                (66, OwnedIoValue::U16(12_000 + (k % 1000) as u16)),
                (199, OwnedIoValue::U32(k.wrapping_mul(31))),
                (16, OwnedIoValue::U64(u64::from(k) << 20)),
            ];
            if codec == Codec::C8E {
                io.push((385, OwnedIoValue::Nx(vec![0xde, 0xad, k as u8])));
            }
            Record {
                ts_ms: ts_ms + i as u64 * 1000,
                priority: (k % 3) as u8,
                lon: 250_000_000 + k as i32,
                lat: 546_000_000 - k as i32,
                alt: 100 + (k % 50) as i16,
                angle: (k % 360) as u16,
                sats: 9,
                speed: (k % 120) as u16,
                event_io: if codec == Codec::C8 { 1 } else { 385 },
                gen_type: (codec == Codec::C16).then_some(5),
                io,
            }
        })
        .collect()
}

/// The wire bytes of one AVL frame.
pub fn frame(codec: Codec, recs: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_avl_frame(codec, recs, &mut out).unwrap();
    out
}

/// The wire bytes of one UDP datagram.
pub fn datagram(packet_id: u16, imei: Imei, codec: Codec, recs: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_datagram(packet_id, packet_id as u8, imei, codec, recs, &mut out).unwrap();
    out
}

pub fn imei(n: u64) -> Imei {
    Imei::new(n).unwrap()
}

/// A simulated tracker on one TCP connection.
pub struct Device {
    pub stream: TcpStream,
}

impl Device {
    /// Connects and sends the login; returns the device and the gateway's 1-byte answer.
    pub fn login(addr: SocketAddr, imei: Imei) -> std::io::Result<(Device, u8)> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut login = Vec::new();
        fleetgate::protocol::imei::encode_login(imei, &mut login);
        stream.write_all(&login)?;
        let mut reply = [0u8; 1];
        stream.read_exact(&mut reply)?;
        Ok((Device { stream }, reply[0]))
    }

    /// A device that logged in and was accepted.
    pub fn connect(addr: SocketAddr, imei: Imei) -> Device {
        let (d, reply) = Device::login(addr, imei).expect("login");
        assert_eq!(reply, 1, "login of {imei} refused");
        d
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next 4-byte record ack.
    pub fn ack(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Sends a frame and waits for its ack.
    pub fn send_frame(&mut self, bytes: &[u8]) -> std::io::Result<u32> {
        self.send(bytes)?;
        self.ack()
    }

    /// Whether the gateway closed the connection (end of stream or reset) within `limit`;
    /// bytes it sends meanwhile are read and dropped.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut b = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// A device that keeps going until every frame is acked: on any error it reconnects (to
/// wherever `addr()` points now) and resends, from the first unacked frame, the way trackers
/// do. Returns how many frames it had to resend. Panics after `limit`.
pub fn deliver_all(
    addr: impl Fn() -> SocketAddr,
    imei: Imei,
    frames: &[(Vec<u8>, u32)],
    in_flight: usize,
    limit: Duration,
) -> usize {
    let deadline = Instant::now() + limit;
    let mut acked = 0;
    let mut resent = 0;
    while acked < frames.len() {
        assert!(
            Instant::now() < deadline,
            "{imei}: only {acked}/{} frames acked in {limit:?}",
            frames.len()
        );
        let Ok((mut dev, 1)) = Device::login(addr(), imei) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let mut sent = acked;
        let result: std::io::Result<()> = (|| {
            while acked < frames.len() {
                while sent < frames.len() && sent - acked < in_flight {
                    dev.send(&frames[sent].0)?;
                    sent += 1;
                }
                let n = dev.ack()?;
                assert_eq!(n, frames[acked].1, "{imei}: ack count of frame {acked}");
                acked += 1;
            }
            Ok(())
        })();
        if result.is_err() {
            resent += sent - acked;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    resent
}

/// Sends a datagram until its ack comes back; returns the ack. An answer with another packet
/// id is passed over, as a device does: every copy of a resent datagram is acked, so the
/// second ack of an earlier datagram on `sock` can arrive now.
pub fn udp_deliver(sock: &UdpSocket, addr: SocketAddr, dgram: &[u8], limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    loop {
        assert!(Instant::now() < deadline, "datagram never acked");
        sock.send_to(dgram, addr).unwrap();
        // Wait 500 ms for its ack, then send it again.
        let resend_at = Instant::now() + Duration::from_millis(500);
        loop {
            let left = resend_at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left)).unwrap();
            let mut b = [0u8; 64];
            let Ok((n, _)) = sock.recv_from(&mut b) else {
                break;
            };
            // Both start with a 2-byte length and the 2-byte packet id.
            if n >= 4 && b[2..4] == dgram[2..4] {
                return b[..n].to_vec();
            }
        }
    }
}

/// GET `path` on the API at `api`, over a fresh connection (no descriptor kept in the
/// gateway); `None` on any error or non-2xx answer.
pub fn api_get(api: SocketAddr, path: &str) -> Option<String> {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build()
        .get(&format!("http://{api}{path}"))
        .set("connection", "close")
        .call()
        .ok()?
        .into_string()
        .ok()
}

/// The samples of metric `name` (all label sets) in Prometheus text, summed.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.split('{').next()? == name).then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}
