#!/usr/bin/env python3
"""Control-plane latencies on loopback: command round trip (POST /api/v1/commands until the
Codec 12 frame is read on the device's socket) and webhook delivery (an event's `time`, when
it was published, until it reaches the receiver), for N sequential commands.

    python3 tuning/tools/control_rtt.py --bin target/release/fleetgate --commands 500

Starts its own gateway with a managed PostgreSQL in a temp dir, a webhook receiver and one
device, all on 127.0.0.1; everything is stopped at the end."""
import argparse, http.client, http.server, json, os, socket, struct, subprocess, tempfile, threading, time, datetime

from teltonika import codec12, login

KEY = "bench-key-1"


def read_exact(s, n):
    b = b""
    while len(b) < n:
        part = s.recv(n - len(b))
        if not part:
            raise EOFError
        b += part
    return b


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


arrivals = {}


class Hook(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        now = time.time()
        ev = json.loads(body)
        arrivals[ev["id"]] = (now, ev)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--commands", type=int, default=500)
    a = ap.parse_args()
    rx = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=rx.serve_forever, daemon=True).start()
    d = tempfile.mkdtemp(prefix="fgrtt", dir="/tmp")
    os.chmod(d, 0o755)
    cfg = os.path.join(d, "fg.toml")
    open(cfg, "w").write(
        f'[[routes]]\nname = "b"\ntopics = ["commands/#"]\nurl = "http://127.0.0.1:{rx.server_port}/h"\nsecret = "s"\n')
    env = dict(os.environ, FLEETGATE_API_KEYS=f"{KEY}:command", RUST_LOG="warn")
    gw = subprocess.Popen([a.bin, "serve", "--config", cfg, "--data-dir", os.path.join(d, "data"),
                           "--device-host", "127.0.0.1", "--device-port", "0", "--api-addr", "127.0.0.1:0"],
                          stdout=subprocess.PIPE, stderr=open(os.path.join(d, "gw.log"), "w"), env=env, text=True)
    try:
        line = gw.stdout.readline()
        dev_addr = line.split("device_addr=")[1].split()[0]
        api_addr = line.split("api_addr=")[1].split()[0]
        h, p = dev_addr.rsplit(":", 1)
        dev = socket.create_connection((h, int(p)), timeout=10)
        imei = b"356307042441013"
        dev.sendall(login(imei))
        assert read_exact(dev, 1) == b"\x01"
        ah, ap_ = api_addr.rsplit(":", 1)
        api = http.client.HTTPConnection(ah, int(ap_), timeout=10)
        time.sleep(0.5)  # let the control thread learn the device is online (not a measured wait)
        rtt = []
        for n in range(a.commands):
            body = json.dumps({"imei": imei.decode(), "command": f"getparam {n}"})
            t0 = time.perf_counter()
            api.request("POST", "/api/v1/commands", body, {"x-api-key": KEY, "content-type": "application/json"})
            r = api.getresponse()
            r.read()
            assert r.status == 202, r.status
            head = read_exact(dev, 8)
            rest = read_exact(dev, struct.unpack(">I", head[4:])[0] + 4)
            rtt.append((time.perf_counter() - t0) * 1000)
            dev.sendall(codec12(0x06, b"ok %d" % n))
        deadline = time.time() + 30
        while len(arrivals) < a.commands and time.time() < deadline:
            time.sleep(0.05)
        lat = []
        for now, ev in arrivals.values():
            t = datetime.datetime.strptime(ev["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
            lat.append((now - t.timestamp()) * 1000)
        print(f"command_round_trip_ms n={len(rtt)} p50={pct(rtt,50):.2f} p90={pct(rtt,90):.2f} p99={pct(rtt,99):.2f} max={max(rtt):.2f}")
        if lat:
            print(f"webhook_delivery_ms n={len(lat)} p50={pct(lat,50):.1f} p90={pct(lat,90):.1f} p99={pct(lat,99):.1f} max={max(lat):.1f} "
                  f"(event time has ms resolution)")
        else:
            print("webhook_delivery_ms: no event arrived")
    finally:
        gw.terminate()
        gw.wait(timeout=60)


main()
