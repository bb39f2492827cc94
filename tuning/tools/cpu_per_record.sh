#!/bin/bash
# Gateway CPU per record at fleet scale: a fresh gateway (managed PostgreSQL in DATA_DIR),
# 19,000 trackers from loadgen sending 5-record frames at 12,000 records/s in all; the
# gateway's CPU time (utime+stime) and fleetgate_records_acked_total are read 25 s and 55 s
# after loadgen starts (after the logins, in steady load) and their ratio printed.
#
#   tuning/tools/cpu_per_record.sh [GATEWAY_BIN] [DATA_DIR]
#   (defaults: target/release/fleetgate /tmp/fg-cpu; loadgen from target/release)
#
# Needs the descriptor limit at its hard limit (raised here) and ~20,000 descriptors for the
# gateway; loadgen spreads its sockets over 4 processes and 4 source addresses.
set -euo pipefail
BIN=${1:-target/release/fleetgate}
DATA=${2:-/tmp/fg-cpu}
OUT=$(mktemp -d)
ulimit -n "$(ulimit -Hn)"
"$BIN" serve --data-dir "$DATA" --device-host 127.0.0.1 --device-port 5098 \
    --api-addr 127.0.0.1:8098 > "$OUT/gw.out" 2> "$OUT/gw.err" &
GW=$!
trap 'kill -TERM $GW 2>/dev/null; wait $GW 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do grep -q "^ready" "$OUT/gw.out" && break; sleep 0.5; done
grep -q "^ready" "$OUT/gw.out" || { cat "$OUT/gw.err"; exit 1; }
target/release/loadgen --addr 127.0.0.1:5098 --devices 19000 --processes 4 --source-addrs 4 \
    --records-per-frame 5 --rate 12000 --connect-rate 5000 --duration 70 --json \
    > "$OUT/loadgen.json" 2> "$OUT/loadgen.err" &
LG=$!
sample() {
    echo "$(awk '{print $14+$15}' /proc/$GW/stat) $(curl -s 127.0.0.1:8098/metrics |
        awk '/^fleetgate_records_acked_total/ {s+=$2} END {print s}')"
}
sleep 25; read -r t0 r0 <<< "$(sample)"
sleep 30; read -r t1 r1 <<< "$(sample)"
wait $LG
python3 - "$t0" "$r0" "$t1" "$r1" "$(getconf CLK_TCK)" <<'PY'
import sys
t0, r0, t1, r1, hz = map(float, sys.argv[1:])
cpu, recs = (t1 - t0) / hz, r1 - r0
print(f"gateway_cpu_s={cpu:.2f} records={recs:.0f} records_per_s={recs / 30:.0f} "
      f"us_per_record={cpu / recs * 1e6:.1f}")
PY
echo "loadgen's summary: $OUT/loadgen.json"
