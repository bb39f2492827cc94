#!/bin/bash
# Gateway restart storm (tuning/fleet-scale.md): DEVICES trackers connected and sending, the
# gateway is SIGKILLed after KILL_AT seconds and started again (same command) as soon as the
# old process is gone; loadgen's devices reconnect and resend what was not acked, and
# --verify-database-url checks every acked record is stored exactly once.
#   DB="host=... dbname=fleetgate" OUT=/tmp/storm tuning/tools/restart_storm.sh
set -u
DB=${DB:?a database URL the gateway and loadgen use}
OUT=${OUT:-/tmp/restart-storm}; FG=${FG:-target/release/fleetgate}; LG=${LG:-target/release/loadgen}
DEVICES=${DEVICES:-19000}; KILL_AT=${KILL_AT:-35}; PORT=${PORT:-5027}
mkdir -p "$OUT"
start() { "$FG" serve --database-url "$DB" --data-dir "$OUT/gw" --device-host 127.0.0.1 --device-port "$PORT" \
            --shards 2 --api-addr 127.0.0.1:0 > "$OUT/gw-$1.out" 2> "$OUT/gw-$1.log" & echo $!; }
ready() { grep -q ready "$OUT/gw-$1.out"; }
pid=$(start a)
for i in $(seq 200); do ready a && break; sleep 0.1; done
"$LG" --addr 127.0.0.1:$PORT --devices "$DEVICES" --processes 4 --source-addrs 4 --connect-rate 5000 \
    --records-per-frame 5 --rate $((DEVICES / 6)) --duration 90 --json --verify-database-url "$DB" \
    --chart "$OUT/loadgen.svg" > "$OUT/report.json" 2> "$OUT/loadgen.err" &
lg=$!
sleep "$KILL_AT"
echo "kill -9 at $(date +%T.%N)"; t0=$(date +%s.%N); kill -9 "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
echo "old process gone after $(echo "$(date +%s.%N) - $t0" | bc) s"
for try in $(seq 100); do
  pid=$(start b)
  for i in $(seq 300); do ready b && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  ready b && break
  sleep 0.5
done
echo "restarted (try $try), ready after $(echo "$(date +%s.%N) - $t0" | bc) s"
wait $lg; echo "loadgen exit $?"
kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
