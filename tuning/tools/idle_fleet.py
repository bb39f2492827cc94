#!/usr/bin/env python3
"""Idle-fleet memory probe: N trackers log in, send one Codec 8 frame each, wait for its ack,
then stay connected and silent; the gateway's RSS is read before and after (from /proc).

    python3 tuning/tools/idle_fleet.py --addr 127.0.0.1:5027 --pid PID --devices 10000

Only 127.0.0.0/8 targets; every socket is closed at the end. One process holds at most
`--devices` sockets (mind the descriptor limit: 20,000 per process on these machines)."""
import argparse, socket, struct, time, ipaddress, resource, sys

from teltonika import avl8, login


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--imei-base", type=int, default=356_000_000_000_000)
    ap.add_argument("--settle", type=float, default=3.0)
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit("refusing a non-loopback target")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    before = rss_kib(a.pid)
    socks, t0 = [], time.time()
    for i in range(a.devices):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(login(str(a.imei_base + i).encode()))
        socks.append(s)
    for s in socks:
        assert s.recv(1) == b"\x01", "login refused"
        s.sendall(avl8(1_700_000_000_000))
    for s in socks:
        got = b""
        while len(got) < 4:
            part = s.recv(4 - len(got))
            assert part, "the gateway closed the connection instead of acking"
            got += part
        assert struct.unpack(">I", got)[0] == 1
    time.sleep(a.settle)  # let the gateway's allocator settle; this measures, it waits for nothing
    after = rss_kib(a.pid)
    print(f"devices={a.devices} rss_before_kib={before} rss_after_kib={after} "
          f"per_device_bytes={(after - before) * 1024 / a.devices:.0f} setup_s={time.time() - t0:.1f}")
    for s in socks:
        s.close()


main()
