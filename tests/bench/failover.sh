#!/usr/bin/env bash
# Failover benchmark (issue 3): time from `kill -9` of the leader to the first
# successful PUBLISH/PUBACK (QoS 1) on the new leader, over N failovers, on a
# three-node cluster of release builds on loopback; and a check that no
# acknowledged message is lost (a persistent subscriber, offline during the
# run, must find every PUBACKed message in its session afterwards).
#
# Not a timed test: run it by hand and record the figures in
# docs/BENCHMARKS.md ("Failover"):
#
#   tests/bench/failover.sh [--rounds 20] [--base-port 23883] [--no-build]
#
# The nodes use the layout of `raftmq local-cluster` (MQTT P+i-1, admin
# P+100+i-1, cluster P+200+i-1, data and raftmq.toml in DIR/node-i) but are
# started here, so the script owns their pids. The client (Python 3, stdlib
# only, a minimal MQTT 3.1.1 client) kills the leader itself, so the clock
# starts at the kill; it then polls /health/leader of the other nodes every
# 20 ms and, on a 200, connects and publishes until a PUBACK arrives.
set -euo pipefail

ROUNDS=20
BASE=23883
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --base-port) BASE="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "usage: $0 [--rounds N] [--base-port P] [--no-build]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release --bin raftmq)
fi
BIN="$TARGET/release/raftmq"
[ -x "$BIN" ] || { echo "no release binary at $BIN" >&2; exit 1; }

DIR="$(mktemp -d /tmp/raftmq-failover.XXXXXX)"
# The Python client starts the nodes and kills them (by pid) when it ends.
cleanup() { rm -rf "$DIR"; }
trap cleanup EXIT

HEARTBEAT_MS=50
ELECTION_MIN_MS=100
ELECTION_MAX_MS=250

nodes_list=""
for i in 1 2 3; do
  nodes_list+="  { id = $i, cluster_addr = \"127.0.0.1:$((BASE+200+i-1))\", mqtt_addr = \"127.0.0.1:$((BASE+i-1))\", admin_addr = \"127.0.0.1:$((BASE+100+i-1))\" },"$'\n'
done
for i in 1 2 3; do
  mkdir -p "$DIR/node-$i"
  cat > "$DIR/node-$i/raftmq.toml" <<TOML
node_id = $i
data_dir = "$DIR/node-$i/data"

[mqtt]
# The offline subscriber keeps every message of the run.
max_queued_messages = 1000000
sys_interval = 0

[[listeners]]
name = "default"
kind = "tcp"
bind = "127.0.0.1:$((BASE+i-1))"

[admin]
listen = "127.0.0.1:$((BASE+100+i-1))"

[cluster]
listen = "127.0.0.1:$((BASE+200+i-1))"
heartbeat_ms = $HEARTBEAT_MS
election_timeout_min_ms = $ELECTION_MIN_MS
election_timeout_max_ms = $ELECTION_MAX_MS
nodes = [
$nodes_list]
TOML
done

echo "binary: $BIN"
echo "data:   $DIR"
echo "election: heartbeat ${HEARTBEAT_MS} ms, election timeout ${ELECTION_MIN_MS}..${ELECTION_MAX_MS} ms"

python3 - "$BIN" "$DIR" "$BASE" "$ROUNDS" <<'PY'
import json, os, socket, struct, subprocess, sys, time, http.client

BIN, DIR, BASE, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
IDS = [1, 2, 3]
MQTT = {i: BASE + i - 1 for i in IDS}
ADMIN = {i: BASE + 100 + i - 1 for i in IDS}
procs = {}

def start(i):
    log = open(f"{DIR}/node-{i}/node.log", "ab")
    procs[i] = subprocess.Popen([BIN, "serve", "--config", f"{DIR}/node-{i}/raftmq.toml"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=dict(os.environ, RUST_LOG="warn", NO_COLOR="1"))

def kill9(i):
    procs[i].kill()
    procs[i].wait()

def health(i, timeout=0.2):
    try:
        c = http.client.HTTPConnection("127.0.0.1", ADMIN[i], timeout=timeout)
        c.request("GET", "/health/leader")
        r = c.getresponse()
        body = r.read()
        c.close()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, None
    except OSError:
        return None, None

def wait(cond, what, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")

def leader():
    for i in IDS:
        if health(i)[0] == 200:
            return i
    return None

def settled():
    st = {i: health(i) for i in IDS}
    lead = [i for i in IDS if st[i][0] == 200]
    if len(lead) != 1 or any(st[i][1] is None for i in IDS):
        return None
    l = st[lead[0]][1]
    if all(st[i][1].get("leader_id") == lead[0] and st[i][1].get("term") == l["term"]
           and st[i][1].get("applied_index", 0) >= l["commit_index"] for i in IDS):
        return lead[0]
    return None

# ---- minimal MQTT 3.1.1
def varint(n):
    out = b""
    while True:
        b = n % 128; n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out

def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x

def pkt(first, body):
    return bytes([first]) + varint(len(body)) + body

class Conn:
    def __init__(self, port, cid, clean=True, timeout=1.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(pkt(0x10, s("MQTT") + bytes([4, 0x02 if clean else 0]) + struct.pack(">H", 60) + s(cid)))
        t, body = self.read(timeout)
        if t >> 4 != 2:
            raise OSError(f"expected CONNACK, got {t:#x}")
        self.session_present = body[0] & 1 == 1
        if body[1] != 0:
            raise OSError(f"CONNACK code {body[1]}")

    def take(self):
        """One whole packet from the buffer: (first byte, body), or None."""
        n, mult, i = 0, 1, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            n += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(self.buf) < i + n:
            return None
        first, body = self.buf[0], self.buf[i:i + n]
        self.buf = self.buf[i + n:]
        return first, body

    def read(self, timeout):
        self.sock.settimeout(timeout)
        while True:
            p = self.take()
            if p is not None:
                return p
            d = self.sock.recv(65536)
            if not d:
                raise OSError("closed")
            self.buf += d

    def publish1(self, topic, payload, pid, timeout=2.0):
        self.sock.sendall(pkt(0x32, s(topic) + struct.pack(">H", pid) + payload))
        while True:
            t, body = self.read(timeout)
            if t >> 4 == 4 and struct.unpack(">H", body[:2])[0] == pid:
                return

    def subscribe(self, flt, qos):
        self.sock.sendall(pkt(0x82, struct.pack(">H", 1) + s(flt) + bytes([qos])))
        t, body = self.read(5.0)
        if t >> 4 != 9 or body[2] != qos:
            raise OSError("SUBACK refused")

    def close(self):
        try:
            self.sock.sendall(b"\xe0\x00")
            self.sock.close()
        except OSError:
            pass

# ---- run
def stop_all():
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()

import atexit
atexit.register(stop_all)
for i in IDS:
    start(i)
wait(settled, "the cluster to form")

sub = Conn(MQTT[leader()], "bench-sub", clean=False)
sub.subscribe("bench/#", 1)
sub.close()

acked = set()
next_num = 0
pid = 0
def publish_for(conn, seconds):
    global next_num, pid
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pid = pid % 65535 + 1
        n = next_num; next_num += 1
        conn.publish1("bench/x", str(n).encode(), pid)
        acked.add(n)

times = []
for r in range(ROUNDS):
    l = wait(settled, "a settled cluster")
    pub = Conn(MQTT[l], "bench-pub")
    publish_for(pub, 0.3)
    others = [i for i in IDS if i != l]
    t0 = time.monotonic()
    kill9(l)
    try:
        pub.sock.close()
    except OSError:
        pass
    first_ack = None
    while first_ack is None:
        if time.monotonic() - t0 > 30:
            raise SystemExit(f"round {r}: no PUBACK within 30 s of the kill")
        for i in others:
            if health(i, timeout=0.1)[0] != 200:
                continue
            try:
                c = Conn(MQTT[i], "bench-pub", timeout=0.5)
                pid = pid % 65535 + 1
                n = next_num; next_num += 1
                c.publish1("bench/x", str(n).encode(), pid, timeout=1.0)
                first_ack = time.monotonic()
                acked.add(n)
                publish_for(c, 0.2)
                c.close()
                break
            except OSError:
                pass
        else:
            time.sleep(0.02)
    ms = (first_ack - t0) * 1000
    times.append(ms)
    print(f"round {r + 1:2}: leader {l} killed, first PUBACK after {ms:7.1f} ms", flush=True)
    start(l)

wait(settled, "a settled cluster at the end")
# No acknowledged message lost: the persistent subscriber drains its session.
got = set()
sub = Conn(MQTT[leader()], "bench-sub", clean=False)
if not sub.session_present:
    raise SystemExit("LOST: the persistent subscriber's session is gone")
end = time.monotonic() + 60
while not acked <= got and time.monotonic() < end:
    try:
        t, body = sub.read(2.0)
    except socket.timeout:
        break
    if t >> 4 == 3:
        qos = (t >> 1) & 3
        tl = struct.unpack(">H", body[:2])[0]
        off = 2 + tl
        p = None
        if qos:
            p = struct.unpack(">H", body[off:off + 2])[0]; off += 2
            sub.sock.sendall(pkt(0x40, struct.pack(">H", p)))
        got.add(int(body[off:]))
sub.close()
lost = sorted(acked - got)

times.sort()
def pct(p):
    k = max(0, min(len(times) - 1, int(round(p / 100 * len(times) + 0.5)) - 1))
    return times[k]
print()
print(f"failovers: {len(times)}")
print(f"kill -9 -> first PUBACK on the new leader: p50 {pct(50):.0f} ms, p99 {pct(99):.0f} ms, "
      f"min {times[0]:.0f} ms, max {times[-1]:.0f} ms, mean {sum(times) / len(times):.0f} ms")
print(f"acknowledged messages: {len(acked)}, received by the persistent subscriber: {len(got & acked)}, lost: {len(lost)}")
if lost:
    print(f"LOST (first 20): {lost[:20]}")
    sys.exit(1)
PY
