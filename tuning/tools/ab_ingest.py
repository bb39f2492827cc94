#!/usr/bin/env python3
"""A/B ingest runs: old vs new gateway (or any labelled gateway configs), alternating.

usage: ab.py OUTFILE LABEL:BIN:DBNAME[:CONFIG] ... --runs N [loadgen args after --]
Each run: TRUNCATE telemetry (+ device_sessions, events when present) in DBNAME, CHECKPOINT,
wait (bounded) for the box to be quiet, start the gateway, run loadgen, sample RSS and CPU,
SIGTERM the gateway. Every loop is bounded in time and count. AB_QUIET_LIMIT_S (240): how long
to wait for a quiet box before a run (it goes ahead, marked NOISY, after that)."""
import json, os, re, signal, subprocess, sys, time

PSQL = "/usr/lib/postgresql/15/bin/psql"
SOCK = "host=/tmp/cpb/data port=54329 user=fleetgate dbname=%s"
LOADGEN = "/tmp/loadgen-new"
BUSY = re.compile(r"^(rustc|cargo|cc1|cc1plus|ld|ld\.lld|lld|collect2|cc|c\+\+|clang)$")


def psql(db, sql):
    return subprocess.run([PSQL, SOCK % db, "-Atq", "-c", sql], capture_output=True, text=True, timeout=120)


def busy_procs():
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            comm = open(f"/proc/{p}/comm").read().strip()
        except OSError:
            continue
        if BUSY.match(comm):
            out.append(comm)
    return out


def wait_quiet(limit=int(os.environ.get("AB_QUIET_LIMIT_S", "240")), need=5):
    t0 = time.time()
    quiet_since = None
    while time.time() - t0 < limit:
        if busy_procs():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since >= need:
            return time.time() - t0, True
        time.sleep(0.5)
    print("not quiet after", limit, "s:", sorted(set(busy_procs())), flush=True)
    return time.time() - t0, False


def cpu_ticks(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except OSError:
        return 0


def pg_pids():
    master = int(open("/tmp/cpb/data/pgdata/postmaster.pid").readline())
    pids = [master]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
                if ppid == master:
                    pids.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def total_busy():
    f = open("/proc/stat").readline().split()[1:]
    v = list(map(int, f))
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def rss_kib(pid, key="VmRSS"):
    try:
        for l in open(f"/proc/{pid}/status"):
            if l.startswith(key + ":"):
                return int(l.split()[1])
    except OSError:
        pass
    return 0


def run_one(label, binary, db, config, lg_args, n):
    # Reset the tables, checkpoint.
    tables = psql(db, "SELECT string_agg(t, ',') FROM unnest(ARRAY['telemetry','device_sessions','events']) t "
                      "WHERE to_regclass(t) IS NOT NULL").stdout.strip()
    r = psql(db, (f"TRUNCATE {tables}; " if tables else "") + "CHECKPOINT;")
    assert r.returncode == 0, r.stderr
    waited, quiet = wait_quiet()
    gwdir = f"/tmp/cpb/gw-{label}"
    os.makedirs(gwdir, exist_ok=True)
    log = open(f"{gwdir}/run{n}.log", "w")
    cmd = [binary, "serve", "--database-url", SOCK % db, "--data-dir", gwdir, "--device-host", "127.0.0.1",
           "--device-port", "0", "--shards", "2", "--api-addr", "127.0.0.1:0"]
    if config:
        cmd[2:2] = ["--config", config]
    gw = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    port = None
    t0 = time.time()
    while time.time() - t0 < 60:
        line = gw.stdout.readline()
        if not line:
            break
        m = re.match(r"ready device_addr=\S+:(\d+)", line)
        if m:
            port = m.group(1)
            am = re.search(r"api_addr=(\S+)", line)
            api = am.group(1) if am else None
            break
    assert port, f"{label}: gateway not ready"
    lg = subprocess.Popen([LOADGEN, "--addr", f"127.0.0.1:{port}", "--json", "--verify-database-url", SOCK % db]
                          + lg_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    pgp = pg_pids()
    b0, t0b = total_busy()
    g0, l0 = cpu_ticks(gw.pid), cpu_ticks(lg.pid)
    pg0 = {p: cpu_ticks(p) for p in pgp}
    p0 = 0
    ts0 = time.time()
    rss_max = 0
    l1 = l0
    deadline = time.time() + 120
    while lg.poll() is None and time.time() < deadline:
        rss_max = max(rss_max, rss_kib(gw.pid))
        l1 = max(l1, cpu_ticks(lg.pid))
        time.sleep(0.5)
        # Sample CPU near the end of sending (loadgen drains up to 5 s after --duration).
    b1, t1b = total_busy()
    g1 = cpu_ticks(gw.pid)
    p1 = sum(cpu_ticks(p) - pg0.get(p, 0) for p in pg_pids())
    ts1 = time.time()
    if lg.poll() is None:
        lg.kill()
    out, err = lg.communicate(timeout=30)
    hwm = rss_kib(gw.pid, "VmHWM")
    metrics = {}
    if api:
        import urllib.request
        for attempt in range(2):
            try:
                txt = urllib.request.urlopen(f"http://{api}/metrics", timeout=5).read().decode()
                for l in txt.splitlines():
                    if l.startswith(("fleetgate_events", "fleetgate_webhook", "fleetgate_session_events", "fleetgate_writer")):
                        k, v = l.rsplit(" ", 1)
                        metrics[k] = float(v)
                break
            except Exception as e:
                metrics["error"] = str(e)
                time.sleep(1)
    ev_rows = psql(db, "SELECT count(*) FROM events").stdout.strip() if "events" in tables else None
    gw.send_signal(signal.SIGTERM)
    try:
        gw.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gw.kill()
        gw.wait()
    log.close()
    hz = os.sysconf("SC_CLK_TCK")
    wall = ts1 - ts0
    cores = os.cpu_count()
    res = {"label": label, "run": n, "quiet": quiet, "waited_s": round(waited, 1),
           "loadgen_rc": lg.returncode, "rss_max_mib": round(rss_max / 1024), "vmhwm_mib": round(hwm / 1024),
           "gw_cpu_pct": round(100 * (g1 - g0) / hz / wall), "pg_cpu_pct": round(100 * (p1 - p0) / hz / wall),
           "loadgen_cpu_pct": round(100 * (l1 - l0) / hz / wall),
           "other_cpu_pct": round(100 * (b1 - b0) / (t1b - t0b) * cores - 100 * (g1 - g0 + p1 - p0 + l1 - l0) / hz / wall),
           "box_busy_pct": round(100 * (b1 - b0) / (t1b - t0b) * cores), "wall_s": round(wall, 1)}
    res["metrics"] = metrics
    res["events_rows_at_end"] = ev_rows
    js = [l for l in out.splitlines() if l.startswith("{")]
    if js:
        res["loadgen"] = json.loads(js[-1])
    else:
        res["loadgen_out"] = out[-2000:]
    res["loadgen_err_tail"] = err[-600:]
    logtext = open(f"{gwdir}/run{n}.log").read()
    odd = [l for l in logtext.splitlines() if " WARN " in l or " ERROR " in l]
    res["log_warn_error"] = len(odd)
    res["log_first_odd"] = odd[:5]
    return res


def main():
    outfile = sys.argv[1]
    rest = sys.argv[2:]
    sep = rest.index("--")
    specs, lg_args = rest[:sep], rest[sep + 1:]
    runs = 3
    if "--runs" in specs:
        i = specs.index("--runs")
        runs = int(specs[i + 1])
        del specs[i:i + 2]
    variants = []
    for s in specs:
        parts = s.split(":")
        variants.append((parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else None))
    with open(outfile, "a") as f:
        for n in range(1, runs + 1):
            for (label, binary, db, config) in variants:
                r = run_one(label, binary, db, config, lg_args, n)
                f.write(json.dumps(r) + "\n")
                f.flush()
                lgj = r.get("loadgen", {})
                print(time.strftime("%H:%M:%S"), label, n, "quiet" if r["quiet"] else "NOISY",
                      {k: lgj.get(k) for k in list(lgj)[:40]}, "rss", r["rss_max_mib"], "gwcpu", r["gw_cpu_pct"],
                      "pgcpu", r["pg_cpu_pct"], "box", r["box_busy_pct"], "odd", r["log_warn_error"], flush=True)


main()
