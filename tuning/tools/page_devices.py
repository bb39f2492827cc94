#!/usr/bin/env python3
"""Walks `GET /api/v1/devices` page by page and times it: each page's latency and the whole walk.

    python3 tuning/tools/page_devices.py --api 127.0.0.1:8080 --key KEY --limit 1000 --walks 5

Each walk starts without a cursor and follows `next_cursor` until it is null; every page is
checked (IMEIs strictly increasing across the walk, at most `--limit` per page). One line per
walk, then the page latencies over all walks (p50/p90/p99/max, milliseconds). `--expect N`
fails the run unless every walk saw exactly N devices. One keep-alive connection (`http.client`),
so a page's time is the gateway's: the request, the shards' answers, the merge and the JSON.

Only loopback targets."""
import argparse, http.client, ipaddress, json, sys, time


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True, help="HOST:PORT of the gateway's api_addr")
    ap.add_argument("--key", required=True, help="an API key with the read scope")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--expect", type=int, help="devices every walk must see")
    a = ap.parse_args()
    host, port = a.api.rsplit(":", 1)
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit("refusing a non-loopback target")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    pages_ms = []
    for w in range(a.walks):
        cursor, seen, last, n_pages = None, 0, "", 0
        t0 = time.perf_counter()
        while True:
            path = f"/api/v1/devices?limit={a.limit}" + (f"&cursor={cursor}" if cursor else "")
            t = time.perf_counter()
            conn.request("GET", path, headers={"x-api-key": a.key})
            r = conn.getresponse()
            body = r.read()
            pages_ms.append((time.perf_counter() - t) * 1000)
            if r.status != 200:
                sys.exit(f"{path}: {r.status} {body[:200]!r}")
            page = json.loads(body)
            devs = page["devices"]
            assert len(devs) <= a.limit, f"{len(devs)} devices on a page of {a.limit}"
            for d in devs:
                assert d["imei"] > last, f"IMEI order broken at {d['imei']} after {last}"
                last = d["imei"]
            seen += len(devs)
            n_pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        walk_ms = (time.perf_counter() - t0) * 1000
        print(f"walk {w + 1}: devices={seen} pages={n_pages} total_ms={walk_ms:.1f}", flush=True)
        if a.expect is not None and seen != a.expect:
            sys.exit(f"walk {w + 1} saw {seen} devices, expected {a.expect}")
    print(f"pages={len(pages_ms)} limit={a.limit} page_ms p50={pct(pages_ms, 50):.2f} "
          f"p90={pct(pages_ms, 90):.2f} p99={pct(pages_ms, 99):.2f} max={max(pages_ms):.2f}")


main()
