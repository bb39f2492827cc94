//! `--processes N`: the fleet split over N copies of loadgen itself. One process can hold at
//! most its hard descriptor limit of sockets (20,000 here, not raisable), so a larger fleet
//! needs more processes; they also spread the frame encoding over more cores.
//!
//! The parent re-executes its own binary with `--worker CONFIG_JSON`: each worker gets a
//! contiguous IMEI range, its part of `--rate` and `--connect-rate`, and a common start time
//! on the wall clock, so the per-second series line up. A worker prints one JSON sample line
//! per second on stderr (merged here into the live progress line) and its report, histograms
//! included, on stdout; the parent merges the reports exactly (see [`Report::merge`]). The
//! parent waits for its workers up to the run's hard cap plus a grace period, then kills the
//! ones left (its own children, by handle).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::Config;
use crate::pacing::split;
use crate::progress::{ProgressLine, SAMPLE_PREFIX};
use crate::report::{Report, SeriesPoint};

/// Time the workers get between being started and the common start of the run.
const STARTUP: Duration = Duration::from_millis(1500);
/// Past the hard cap, how long the parent still waits for a worker's report.
const GRACE: Duration = Duration::from_secs(10);

/// What the reader threads tell the parent.
enum Event {
    Sample(SeriesPoint),
    Stdout(usize, String),
}

/// Runs `cfg` in `cfg.processes` worker processes and merges their reports.
///
/// # Errors
/// A worker that cannot be started, fails, prints no report, or outlives the hard cap.
pub fn run_parent(cfg: &Config, mut progress: Option<ProgressLine>) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("finding loadgen's own binary")?;
    let shares = split(cfg.devices, cfg.processes);
    let n = shares.len();
    let start_at = crate::now_ms() + STARTUP.as_millis() as u64;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for (i, share) in shares.iter().enumerate() {
        let wcfg = cfg.for_share(*share, cfg.threads, start_at);
        let mut child = Command::new(&exe)
            .arg("--worker")
            .arg(serde_json::to_string(&wcfg)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting worker process {i}"))?;
        let mut out = child.stdout.take().expect("stdout piped");
        let err = child.stderr.take().expect("stderr piped");
        let t = tx.clone();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            let _ = t.send(Event::Stdout(i, s));
        });
        let t = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                match line.strip_prefix(SAMPLE_PREFIX) {
                    Some(json) => match serde_json::from_str(json) {
                        Ok(p) => {
                            let _ = t.send(Event::Sample(p));
                        }
                        Err(e) => eprintln!("[process {i}] bad sample line: {e}"),
                    },
                    None => eprintln!("[process {i}] {line}"),
                }
            }
        });
        children.push(child);
    }
    drop(tx);

    let deadline = Instant::now() + STARTUP + Duration::from_secs_f64(cfg.hard_cap_s) + GRACE;
    let mut outputs: Vec<Option<String>> = vec![None; n];
    // Samples of each second until every worker has sent its own.
    let mut seconds: BTreeMap<u32, Vec<SeriesPoint>> = BTreeMap::new();
    let mut errors = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Sample(p)) => {
                let t = p.t_s;
                let pts = seconds.entry(t).or_default();
                pts.push(p);
                if pts.len() == n {
                    let pts = seconds.remove(&t).expect("entry just filled");
                    let refs: Vec<&SeriesPoint> = pts.iter().collect();
                    if let (Ok(m), Some(pl)) = (SeriesPoint::merge(&refs), progress.as_mut()) {
                        errors += m.errors;
                        pl.show(&m, cfg.devices, errors);
                    }
                }
            }
            Ok(Event::Stdout(i, s)) => outputs[i] = Some(s),
            // Every reader thread is done: every worker closed its pipes.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                for c in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!(
                    "worker processes did not finish within the hard cap ({:.0} s) plus {} s; \
                     killed them",
                    cfg.hard_cap_s,
                    GRACE.as_secs()
                );
            }
        }
    }
    if let Some(pl) = progress.as_mut() {
        pl.finish();
    }
    let mut parts = Vec::with_capacity(n);
    for (i, (child, out)) in children.iter_mut().zip(outputs).enumerate() {
        let status = child
            .wait()
            .with_context(|| format!("waiting for worker {i}"))?;
        if !status.success() {
            bail!("worker process {i} failed: {status}");
        }
        let out = out.unwrap_or_default();
        let r: Report = serde_json::from_str(out.trim())
            .with_context(|| format!("reading worker {i}'s report"))?;
        parts.push(r);
    }
    Report::merge(cfg.clone(), &parts).map_err(anyhow::Error::msg)
}
