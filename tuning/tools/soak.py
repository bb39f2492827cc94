#!/usr/bin/env python3
"""Soak probe: runs loadgen against a running gateway and samples the gateway's memory once a
second meanwhile; at the end one SVG with records/s, ack latency p50/p99 and gateway RSS over
time, and a CSV of the samples.

    python3 tuning/tools/soak.py --pid GATEWAY_PID --out /tmp/soak -- \\
        target/release/loadgen --addr 127.0.0.1:5027 --devices 10000 --rate 60000 \\
        --duration 1800 --json

Everything after `--` is the loadgen command; it must print its report with `--json`. The
gateway's RSS (VmRSS), its threads' CPU and its open descriptors are read from /proc, so the
gateway runs on this machine. Writes OUT/samples.csv, OUT/report.json, OUT/soak.svg and
prints a summary: memory and latency per tenth of the run (flat means flat there)."""
import argparse, json, os, subprocess, sys, threading, time


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_ticks(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except OSError:
        return None


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sampler(pid, t0, out, stop):
    hz = os.sysconf("SC_CLK_TCK")
    last = cpu_ticks(pid)
    n = 0
    while not stop.is_set():
        n += 1
        # Sleep to the next whole second after t0 (no drift over half an hour).
        stop.wait(max(0.0, t0 + n - time.time()))
        cpu = cpu_ticks(pid)
        pct = None if cpu is None or last is None else 100.0 * (cpu - last) / hz
        last = cpu
        out.append((n, rss_kib(pid), pct, fds(pid)))


def svg(series, samples, title):
    """Three stacked panels sharing the time axis."""
    W, H, L, R, PH, GAP, TOP = 960, 640, 70, 20, 160, 40, 40
    tmax = max([p["t_s"] for p in series] + [s[0] for s in samples] + [1])
    x = lambda t: L + (W - L - R) * t / tmax
    panels = [
        ("records/s", [(p["t_s"], p["records_per_s"]) for p in series], ["#1f77b4"], None),
        ("ack latency, ms (p50, p99)", None, ["#2ca02c", "#d62728"],
         [[(p["t_s"], p["p50_ms"]) for p in series if p.get("p50_ms") is not None],
          [(p["t_s"], p["p99_ms"]) for p in series if p.get("p99_ms") is not None]]),
        ("gateway RSS, MiB", [(t, r / 1024) for (t, r, _, _) in samples if r is not None], ["#9467bd"], None),
    ]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for i, (label, pts, colors, multi) in enumerate(panels):
        top = TOP + i * (PH + GAP)
        lines = multi if multi is not None else [pts]
        vmax = max([v for ln in lines for (_, v) in ln] + [1e-9]) * 1.1
        y = lambda v, top=top, vmax=vmax: top + PH - PH * v / vmax
        parts.append(f'<rect x="{L}" y="{top}" width="{W - L - R}" height="{PH}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{L + 4}" y="{top + 14}">{label}</text>')
        for k in range(5):
            v = vmax * k / 4
            parts.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>')
            parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        for ln, c in zip(lines, colors):
            if ln:
                d = " ".join(f"{x(t):.1f},{y(v):.1f}" for (t, v) in ln)
                parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.2" points="{d}"/>')
    bottom = TOP + 3 * (PH + GAP) - GAP
    for k in range(11):
        t = tmax * k / 10
        parts.append(f'<text x="{x(t):.1f}" y="{bottom + 16}" text-anchor="middle">{t:.0f}</text>')
    parts.append(f'<text x="{W / 2}" y="{bottom + 32}" text-anchor="middle">seconds since loadgen start</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("loadgen", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.loadgen[1:] if a.loadgen[:1] == ["--"] else a.loadgen
    if "--json" not in cmd:
        sys.exit("the loadgen command needs --json")
    os.makedirs(a.out, exist_ok=True)
    samples, stop = [], threading.Event()
    t0 = time.time()
    th = threading.Thread(target=sampler, args=(a.pid, t0, samples, stop), daemon=True)
    th.start()
    lg = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    stop.set()
    th.join(timeout=5)
    with open(f"{a.out}/samples.csv", "w") as f:
        f.write("t_s,rss_kib,cpu_pct,fds\n")
        for s in samples:
            f.write(",".join("" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v) for v in s) + "\n")
    lines = [l for l in lg.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"loadgen printed no report (exit {lg.returncode})")
    report = json.loads(lines[-1])
    open(f"{a.out}/report.json", "w").write(lines[-1])
    series = report["series"]
    cfg = report["config"]
    title = (f"soak: {cfg.get('devices')} devices, rate {cfg.get('rate_records_per_s')} records/s, "
             f"{cfg.get('duration_s')} s; gateway pid {a.pid}")
    open(f"{a.out}/soak.svg", "w").write(svg(series, samples, title))
    # Per tenth of the run: RSS at its end, p99 of the per-second p99s, mean records/s.
    n = max(len(series), 1)
    print(f"loadgen exit {lg.returncode}; acked {report['records'].get('acked')}; "
          f"verify {report.get('verify')}; latency_ms {report['latency_ms'].get('p50')}/"
          f"{report['latency_ms'].get('p99')}/{report['latency_ms'].get('max')} (p50/p99/max)")
    print("tenth  t_s   records/s  worst-second-p99-ms  rss-MiB-at-end  fds")
    for k in range(10):
        seg = series[k * n // 10:(k + 1) * n // 10]
        if not seg:
            continue
        t_end = seg[-1]["t_s"]
        rs = [s for s in samples if s[0] <= t_end and s[1] is not None]
        rate = sum(p["records_per_s"] for p in seg) / len(seg)
        p99 = max((p["p99_ms"] or 0) for p in seg)
        rss = rs[-1][1] / 1024 if rs else float("nan")
        fd = rs[-1][3] if rs else None
        print(f"{k + 1:5d} {t_end:5d} {rate:10.0f} {p99:20.1f} {rss:15.1f} {fd}")
    sys.exit(lg.returncode)


main()
