//! What the end-to-end benches (`ingest`, `handover`, `control_plane`) share: a temp dir, the gateway process,
//! CPU readings from /proc, a bounded wait for a quiet machine. Every wait here is bounded.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Clock ticks per second of /proc's CPU times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// `(comm, utime, stime)` of a /proc `stat` line (comm may hold spaces and parentheses).
fn parse_stat(s: &str) -> Option<(String, u64, u64, u32)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
    // After the comm: state(0) ppid(1) ... utime(11) stime(12).
    Some((
        comm,
        f.get(11)?.parse().ok()?,
        f.get(12)?.parse().ok()?,
        f.get(1)?.parse().ok()?,
    ))
}

/// One thread's CPU so far, in clock ticks.
#[derive(Clone, Debug)]
pub struct ThreadCpu {
    pub comm: String,
    pub user: u64,
    pub sys: u64,
}

/// Every thread of `pid`, by thread id.
pub fn threads_cpu(pid: u32) -> HashMap<u32, ThreadCpu> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(e.path().join("stat")) {
            if let Some((comm, user, sys, _)) = parse_stat(&s) {
                out.insert(tid, ThreadCpu { comm, user, sys });
            }
        }
    }
    out
}

/// The kind of a gateway thread, from its name (`/proc/.../comm`, at most 15 bytes).
pub fn thread_kind(comm: &str) -> &'static str {
    if comm.starts_with("shard-") {
        "shard"
    } else if comm.starts_with("fleetgate-write") {
        "writer"
    } else if comm == "control" {
        "control"
    } else if comm.starts_with("fleetgate-house") {
        "housekeeper"
    } else {
        "other"
    }
}

/// CPU ticks `(user, sys)` per thread kind between two readings (threads born in between
/// count from zero).
pub fn cpu_by_kind(
    before: &HashMap<u32, ThreadCpu>,
    after: &HashMap<u32, ThreadCpu>,
) -> Vec<(&'static str, u64, u64)> {
    let mut by: Vec<(&'static str, u64, u64)> = Vec::new();
    for (tid, a) in after {
        let (u0, s0) = before.get(tid).map_or((0, 0), |b| (b.user, b.sys));
        let kind = thread_kind(&a.comm);
        let (du, ds) = (a.user.saturating_sub(u0), a.sys.saturating_sub(s0));
        match by.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(e) => {
                e.1 += du;
                e.2 += ds;
            }
            None => by.push((kind, du, ds)),
        }
    }
    let order = ["shard", "writer", "control", "housekeeper", "other"];
    by.sort_by_key(|(k, _, _)| order.iter().position(|o| o == k));
    by
}

/// CPU ticks (user + sys) of `pid` and of its child processes (PostgreSQL's postmaster and
/// its backends), live ones only.
pub fn process_tree_ticks(pid: u32) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            if let Some((_, u, s, ppid)) = parse_stat(&s) {
                if p == pid || ppid == pid {
                    total += u + s;
                }
            }
        }
    }
    total
}

/// `(busy, total)` ticks of the whole machine, from /proc/stat.
pub fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Names of compiler-like processes running now (other people's builds on a shared box).
pub fn compilers_running() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        if !e
            .file_name()
            .to_str()
            .is_some_and(|t| t.parse::<u32>().is_ok())
        {
            continue;
        }
        if let Ok(c) = std::fs::read_to_string(e.path().join("comm")) {
            let c = c.trim();
            if [
                "rustc",
                "cargo",
                "cc",
                "cc1",
                "ld",
                "collect2",
                "clippy-driver",
                "rust-lld",
            ]
            .contains(&c)
                || c.starts_with("ld.")
                || c.starts_with("fuzz")
            {
                out.push(c.to_string());
            }
        }
    }
    out
}

/// Waits up to `limit` for 3 s in a row without compilers running; `false` (noisy) if none
/// came.
pub fn wait_quiet(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut quiet_since: Option<Instant> = None;
    while Instant::now() < deadline {
        if compilers_running().is_empty() {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(3) {
                return true;
            }
        } else {
            quiet_since = None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// The text without its ANSI colour sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `fleetgate serve` against a database, devices and API on 127.0.0.1, any free ports.
pub struct Gateway {
    pub bin: PathBuf,
    child: Option<Child>,
    pub device_addr: SocketAddr,
    pub api_addr: SocketAddr,
    log: PathBuf,
}

impl Gateway {
    /// Starts the gateway (`BENCH_GATEWAY_BIN`, else the binary cargo built for this bench)
    /// with `config` as its TOML file and waits (at most 60 s) for its ready line.
    pub fn start(db_url: &str, dir: &Path, config: &str) -> Gateway {
        std::fs::create_dir_all(dir).unwrap();
        let cfg_path = dir.join("fleetgate.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let log = dir.join("gateway.log");
        let bin = std::env::var_os("BENCH_GATEWAY_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_fleetgate").into());
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--config")
            .arg(&cfg_path)
            .args(["--database-url", db_url])
            .args(["--device-host", "127.0.0.1", "--device-port", "0"])
            .args(["--shards", "2", "--api-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", Path::new(&bin).display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ready ") {
                    let f: HashMap<&str, &str> = rest
                        .split(' ')
                        .filter_map(|kv| kv.split_once('='))
                        .collect();
                    let _ = tx.send((
                        f.get("device_addr").unwrap_or(&"").to_string(),
                        f.get("api_addr").unwrap_or(&"").to_string(),
                    ));
                }
            }
        });
        let Ok((dev, api)) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the gateway did not become ready; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let device_addr: SocketAddr = dev.parse().expect("device_addr");
        Gateway {
            bin: bin.into(),
            child: Some(child),
            device_addr: SocketAddr::from(([127, 0, 0, 1], device_addr.port())),
            api_addr: api.parse().expect("api_addr"),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// VmHWM (peak RSS), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 20 s.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("the gateway did not stop within 20 s of SIGTERM; killing it");
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The gateway's WARN and ERROR log lines.
    pub fn odd_log_lines(&self) -> Vec<String> {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_string)
            .collect()
    }

    /// One GET on the API (no key: loopback), its body.
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.api_addr).expect("API connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.api_addr
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("API read");
        match out.split_once("\r\n\r\n") {
            Some((_, body)) => body.to_string(),
            None => out,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A directory under `std::env::temp_dir()` (`TMPDIR`), removed on drop. Short names: the
/// cluster's unix socket lives in it.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("{prefix}{}-{:x}", std::process::id(), nanos));
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
