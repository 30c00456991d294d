#!/usr/bin/env bash
# Client-visible failover through HAProxy (issue 6): three raftmq nodes
# (release builds, loopback) behind a real HAProxy configured by the shipped
# haproxy/full-sync.cfg (only addresses, ports and the stats socket path
# substituted). N times: kill -9 the leader and measure the time from the
# kill to the first successful QoS 1 PUBLISH/PUBACK of a client that knows
# only HAProxy's address and simply reconnects (every 20 ms) until a publish
# is acknowledged. Reports p50/p99 and checks that no acknowledged message is
# lost (a persistent subscriber, offline during the run, must find every
# PUBACKed message in its session afterwards).
#
# Target (issue 6): p50 <= 1 s, p99 <= 2 s, nothing lost. Not a timed test:
# run it by hand and record the figures in docs/BENCHMARKS.md:
#
#   tests/bench/haproxy_failover.sh [--rounds 20] [--base-port 24883] [--no-build]
#
# Needs haproxy (Debian package) and python3 (stdlib only).
set -euo pipefail

ROUNDS=20
BASE=24883
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
HAPROXY="$(command -v haproxy || true)"
[ -n "$HAPROXY" ] || HAPROXY=/usr/sbin/haproxy
[ -x "$HAPROXY" ] || { echo "haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }

DIR="$(mktemp -d /tmp/raftmq-haproxy-failover.XXXXXX)"
cleanup() { rm -rf "$DIR"; }
trap cleanup EXIT

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
nodes = [
$nodes_list]
TOML
done

# HAProxy: the shipped file, frontends on BASE+300 (MQTT) and BASE+301 (TLS
# pass-through), servers = the three nodes, stats socket in DIR.
LB=$((BASE+300))
python3 - "$ROOT/haproxy/full-sync.cfg" "$DIR/haproxy.cfg" "$DIR" "$BASE" "$LB" <<'PY'
import re, sys
src, dst, d, base, lb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
out, n = [], {"bind": 0, "server": 0, "socket": 0}
for line in open(src):
    t = line.strip()
    if t.startswith("stats socket /run/haproxy/admin.sock"):
        line = line.replace("/run/haproxy/admin.sock", f"{d}/admin.sock"); n["socket"] += 1
    elif t == "bind :1883":
        line = line.replace(":1883", f"127.0.0.1:{lb}"); n["bind"] += 1
    elif t == "bind :8883":
        line = line.replace(":8883", f"127.0.0.1:{lb + 1}"); n["bind"] += 1
    else:
        m = re.match(r"(\s*)server n(\d) 10\.0\.0\.\d:\d+ check port 8080$", line.rstrip("\n"))
        if m:
            i = int(m.group(2))
            line = f"{m.group(1)}server n{i} 127.0.0.1:{base + i - 1} check port {base + 100 + i - 1}\n"
            n["server"] += 1
    out.append(line)
if n != {"bind": 2, "server": 6, "socket": 1}:
    sys.exit(f"haproxy/full-sync.cfg changed, update this script: {n}")
open(dst, "w").writelines(out)
PY
"$HAPROXY" -c -q -f "$DIR/haproxy.cfg"

echo "binary:  $BIN"
echo "haproxy: $("$HAPROXY" -v | head -1)"
echo "data:    $DIR"
echo "clients connect to HAProxy at 127.0.0.1:$LB only"

python3 - "$BIN" "$HAPROXY" "$DIR" "$BASE" "$LB" "$ROUNDS" <<'PY'
import json, os, socket, struct, subprocess, sys, time, http.client

BIN, HAPROXY, DIR, BASE, LB, ROUNDS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
IDS = [1, 2, 3]
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
hlog = open(f"{DIR}/haproxy.log", "ab")
procs["haproxy"] = subprocess.Popen([HAPROXY, "-db", "-f", f"{DIR}/haproxy.cfg"],
                                    stdin=subprocess.DEVNULL, stdout=hlog, stderr=hlog)
for i in IDS:
    start(i)
wait(settled, "the cluster to form")

def via_lb(cid, clean=True, deadline=30.0):
    """Connects through HAProxy until a CONNACK 0 (what a client does)."""
    end = time.monotonic() + deadline
    while True:
        try:
            return Conn(LB, cid, clean=clean, timeout=1.0)
        except OSError:
            if time.monotonic() > end:
                raise SystemExit(f"{cid}: no connection through HAProxy within {deadline} s")
            time.sleep(0.02)

sub = via_lb("bench-sub", clean=False)
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
    pub = via_lb("bench-pub")
    publish_for(pub, 0.3)
    t0 = time.monotonic()
    kill9(l)
    try:
        pub.sock.close()
    except OSError:
        pass
    first_ack = None
    attempts = 0
    while first_ack is None:
        if time.monotonic() - t0 > 30:
            raise SystemExit(f"round {r}: no PUBACK through HAProxy within 30 s of the kill")
        attempts += 1
        try:
            c = Conn(LB, "bench-pub", timeout=1.0)
            pid = pid % 65535 + 1
            n = next_num; next_num += 1
            c.publish1("bench/x", str(n).encode(), pid, timeout=1.0)
            first_ack = time.monotonic()
            acked.add(n)
            publish_for(c, 0.2)
            c.close()
        except OSError:
            time.sleep(0.02)
    ms = (first_ack - t0) * 1000
    times.append(ms)
    print(f"round {r + 1:2}: leader {l} killed, first PUBACK through HAProxy after {ms:7.1f} ms ({attempts} attempts)", flush=True)
    start(l)

wait(settled, "a settled cluster at the end")
got = set()
sub = via_lb("bench-sub", clean=False)
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
print(f"kill -9 -> first PUBACK through HAProxy: p50 {pct(50):.0f} ms, p99 {pct(99):.0f} ms, "
      f"min {times[0]:.0f} ms, max {times[-1]:.0f} ms, mean {sum(times) / len(times):.0f} ms")
print(f"acknowledged messages: {len(acked)}, received by the persistent subscriber: {len(got & acked)}, lost: {len(lost)}")
if lost:
    print(f"LOST (first 20): {lost[:20]}")
    sys.exit(1)
ok = pct(50) <= 1000 and pct(99) <= 2000
print("target p50 <= 1000 ms, p99 <= 2000 ms: " + ("met" if ok else "NOT MET"))
sys.exit(0 if ok else 1)
PY
