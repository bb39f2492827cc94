//! `fleetgate serve` asked to stop before it is ready: the managed PostgreSQL it started must
//! not outlive it. Runs the real binary against a fresh data dir (initdb included).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::gateway::wait_until;
use common::TempDir;

/// The pid in `postmaster.pid`, once the server has written it.
fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok().filter(|&p| p > 0)
}

/// Whether process `pid` lives (a zombie nobody reaped counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !(state.starts_with('Z') || state.starts_with('X'))
        }
        Err(_) => false,
    }
}

/// Kills what a failed run leaves behind: the gateway, and a postmaster it did not stop
/// (SIGQUIT: immediate shutdown), so that a failing test does not leak a server.
struct Leftovers {
    child: Option<Child>,
    pgdata: PathBuf,
    log: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = postmaster_pid(&self.pgdata).filter(|&p| alive(p)) {
            // SAFETY: plain kill(2) of the postmaster of our own temp data dir.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
            wait_until(Duration::from_secs(30), || !alive(pid));
        }
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[test]
fn sigterm_during_startup_stops_the_managed_postgres() {
    let dir = TempDir::new();
    let data_dir = dir.path().join("data");
    let pgdata = data_dir.join("pgdata");
    let log = dir.path().join("gateway.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["serve", "--device-port", "0", "--device-host", "127.0.0.1"])
        .args(["--api-addr", "127.0.0.1:0"])
        .args(["--shards", "1", "--data-dir"])
        .arg(&data_dir)
        // No database flag, nor its variables: the managed PostgreSQL.
        .env_remove("FLEETGATE_DATABASE_URL")
        .env_remove("FLEETGATE_CONFIG")
        .env("RUST_LOG", "fleetgate=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning fleetgate");
    let mut run = Leftovers {
        child: Some(child),
        pgdata: pgdata.clone(),
        log,
    };
    let child = run.child.as_mut().unwrap();

    // initdb, then `pg_ctl start`: the server exists from its pid file on, well before
    // migrations and `ready`.
    let mut exited = None;
    let started = wait_until(Duration::from_secs(120), || {
        exited = child.try_wait().unwrap();
        exited.is_some() || postmaster_pid(&pgdata).is_some()
    });
    assert!(
        started && exited.is_none(),
        "no postmaster.pid within 120 s (gateway exit: {exited:?})"
    );
    let pid = postmaster_pid(&pgdata).unwrap();

    // SAFETY: plain kill(2) of the gateway we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut status = None;
    wait_until(Duration::from_secs(120), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.expect("the gateway did not exit within 120 s of SIGTERM");

    let stopped = wait_until(Duration::from_secs(30), || {
        !pgdata.join("postmaster.pid").exists() && !alive(pid)
    });
    assert!(
        stopped,
        "the managed PostgreSQL (pid {pid}) is still running after the gateway exited ({status})"
    );
    assert!(status.success(), "gateway exit: {status}");
}
