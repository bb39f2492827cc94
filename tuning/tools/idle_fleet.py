#!/usr/bin/env python3
"""Idle-fleet memory probe: trackers log in, send one Codec 8 frame each, wait for its ack,
then stay connected and silent; the gateway's RSS is read from /proc.

    # one figure: RSS before and after N devices (includes fixed costs of the first burst)
    python3 tuning/tools/idle_fleet.py --addr 127.0.0.1:5027 --pid PID --devices 10000

    # the slope: in one run, 2,000 devices, settle, read; 8,000 more, settle, read;
    # per_device_bytes = dRSS / 8,000 (pools and buffers grown by the first burst drop out)
    python3 tuning/tools/idle_fleet.py --addr 127.0.0.1:5027 --pid PID --steps 2000,10000 --pace 1000

`--steps` are cumulative totals; after each step the RSS is read once it has settled (two reads
`--settle` seconds apart differ by less than 64 KiB, at most 30 s). Each line shows VmRSS and
RssAnon (anonymous memory: the heap; the rest is the binary's file pages and shared memory).
`--pace` caps connects per second (0: as fast as they go).

Only 127.0.0.0/8 targets; every socket is closed at the end. One process holds every socket
(mind the descriptor limit: 20,000 per process on these machines)."""
import argparse, socket, struct, time, ipaddress, resource, sys

from teltonika import avl8, login


def status_kib(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
            k, v = line.split()[:2]
            out[k.rstrip(":")] = int(v)
    return out


def settled(pid: int, settle: float) -> dict:
    """The RSS once it stops moving (two reads `settle` s apart within 64 KiB), at most 30 s."""
    prev = status_kib(pid)
    deadline = time.time() + 30
    while True:
        time.sleep(settle)
        cur = status_kib(pid)
        if abs(cur["VmRSS"] - prev["VmRSS"]) < 64 or time.time() > deadline:
            return cur
        prev = cur


def connect(host, port, first, count, pace, imei_base):
    """`count` devices log in and get one frame acked; returns their sockets."""
    socks, t0 = [], time.time()
    for i in range(count):
        if pace > 0:
            ahead = t0 + i / pace - time.time()
            if ahead > 0:
                time.sleep(ahead)
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(login(str(imei_base + first + i).encode()))
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
    return socks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--devices", type=int, default=1000, help="one step of this many")
    ap.add_argument("--steps", help="cumulative device counts, e.g. 2000,10000")
    ap.add_argument("--pace", type=float, default=0, help="connects per second (0: no cap)")
    ap.add_argument("--imei-base", type=int, default=356_000_000_000_000)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--hold", type=float, default=0,
                    help="keep the fleet connected this many seconds after the last line "
                         "(time to snapshot the gateway, e.g. end a heaptrack run)")
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    port = int(port)
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit("refusing a non-loopback target")
    steps = [int(x) for x in a.steps.split(",")] if a.steps else [a.devices]
    if any(b <= c for c, b in zip([0] + steps, steps)):
        sys.exit("--steps must increase")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    before = status_kib(a.pid)
    socks, t0, reads = [], time.time(), []
    for n in steps:
        socks += connect(host, port, len(socks), n - len(socks), a.pace, a.imei_base)
        r = settled(a.pid, a.settle)
        reads.append((n, r))
        print(f"step devices={n} vmrss_kib={r['VmRSS']} rssanon_kib={r['RssAnon']} "
              f"rssfile_kib={r['RssFile']} t_s={time.time() - t0:.1f}", flush=True)
    for (n0, r0), (n1, r1) in zip(reads, reads[1:]):
        dn = n1 - n0
        print(f"slope devices={n0}->{n1} "
              f"per_device_bytes={(r1['VmRSS'] - r0['VmRSS']) * 1024 / dn:.0f} "
              f"anon_per_device_bytes={(r1['RssAnon'] - r0['RssAnon']) * 1024 / dn:.0f}")
    n, after = reads[-1]
    # The last line, as before: RSS before and after, over every device.
    print(f"devices={n} rss_before_kib={before['VmRSS']} rss_after_kib={after['VmRSS']} "
          f"per_device_bytes={(after['VmRSS'] - before['VmRSS']) * 1024 / n:.0f} "
          f"setup_s={time.time() - t0:.1f}", flush=True)
    time.sleep(a.hold)
    for s in socks:
        s.close()


main()
