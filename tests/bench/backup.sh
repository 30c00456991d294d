#!/usr/bin/env bash
# Backup benchmarks of issue 5 (not timed tests), on a fresh three-node
# cluster (`raftmq local-cluster`, release build):
#
#   restore  a synthetic backup of RETAINED retained messages and SESSIONS
#            persistent sessions (tests/bench/gen_backup.py) restored with
#            `ctl backup restore FILE --mode replace` through the leader:
#            seconds (upload + validation + apply through the log), peak RSS
#            of each node during it (VmHWM, reset before).
#   export   `ctl backup create` on the leader of that state: seconds, file
#            size, peak RSS of each node during it.
#   latency  MQTT QoS 1 p2p with a persistent subscriber (so every message goes
#            through the Raft log) at a fixed rate (`raftmq bench`, RATE msg/s
#            for LAT_SECONDS) against the leader: p99 publish-to-delivery and
#            publish-to-PUBACK latency with no export, then while exports run
#            back to back on the leader.
#
# Needs (installs nothing itself): cargo build --release; python3; curl.
#
# Environment:
#   RAFTMQ_BIN   raftmq binary (default: $CARGO_TARGET_DIR or ./target, release)
#   RETAINED     retained messages (default 1000000)
#   SESSIONS     persistent sessions (default 100000)
#   PAYLOAD      retained payload bytes (default 64)
#   RATE         msg/s of the latency runs (default 2000)
#   LAT_SECONDS  duration of each latency run (default 15)
#   SNAPSHOT_EVERY  [cluster] snapshot_every of the nodes (default 1000000, so
#                the periodic compaction snapshot, which every node takes at
#                about the same log index, does not fall into the latency runs:
#                they measure the export's cost, not compaction's)
#   OUT          directory for logs, files and raw RESULT lines (default: a new temp dir)
#
# Raw lines go to $OUT/results.txt as "case=<name> RESULT ...".
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/target}
RAFTMQ_BIN=${RAFTMQ_BIN:-$target_dir/release/raftmq}
RETAINED=${RETAINED:-1000000}
SESSIONS=${SESSIONS:-100000}
PAYLOAD=${PAYLOAD:-64}
RATE=${RATE:-2000}
LAT_SECONDS=${LAT_SECONDS:-15}
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-1000000}
OUT=${OUT:-$(mktemp -d /tmp/raftmq-backup-bench.XXXXXX)}
mkdir -p "$OUT"
results=$OUT/results.txt
: >"$results"

[[ -x "$RAFTMQ_BIN" ]] || { echo "no raftmq binary at $RAFTMQ_BIN (cargo build --release)" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 2; }

supervisor_pid="" cluster_dir=$OUT/cluster exporter_pid=""
node_pid() { cat "$cluster_dir/node-$1/raftmq.pid" 2>/dev/null || echo 0; }
stop_all() {
  if [[ -n "$exporter_pid" ]] && kill -0 "$exporter_pid" 2>/dev/null; then kill "$exporter_pid" 2>/dev/null || true; fi
  if [[ -n "$supervisor_pid" ]] && kill -0 "$supervisor_pid" 2>/dev/null; then
    kill "$supervisor_pid" 2>/dev/null || true   # SIGTERM: it stops its nodes
    wait "$supervisor_pid" 2>/dev/null || true
  fi
  local n p
  for n in 1 2 3; do
    p=$(node_pid "$n")
    if [[ "$p" != 0 ]] && kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
  done
}
trap stop_all EXIT

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
read -r eph_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || eph_low=32768
free_base() {
  local p tries=0 off ok
  while ((tries < 200)); do
    p=$((10000 + (RANDOM * 32768 + RANDOM) % (eph_low - 301 - 10000)))
    ok=1
    for off in 0 1 2 100 101 102 200 201 202; do
      if port_in_use $((p + off)); then ok=0; break; fi
    done
    if ((ok)); then echo "$p"; return 0; fi
    tries=$((tries + 1))
  done
  echo "no free port range found" >&2
  return 1
}
http_code() { curl -s -o /dev/null -m 1 -w '%{http_code}' "$1" 2>/dev/null || true; }
wait_leader() {
  local i n
  for ((i = 0; i < 1500; i++)); do
    for n in 1 2 3; do
      if [[ $(http_code "http://127.0.0.1:$((base + 100 + n - 1))/health/leader") == 200 ]]; then
        echo "$n"
        return 0
      fi
    done
    sleep 0.02
  done
  echo "no serving leader" >&2
  return 1
}
# Resets the peak RSS of every node (Linux: clear_refs 5).
reset_peaks() {
  local n
  for n in 1 2 3; do echo 5 >"/proc/$(node_pid "$n")/clear_refs" 2>/dev/null || true; done
}
# " peak_rss_kb_nodeN=.." of every node.
peaks() {
  local n s=""
  for n in 1 2 3; do
    s+=" peak_rss_kb_node$n=$(awk '/^VmHWM:/ {print $2}' "/proc/$(node_pid "$n")/status" 2>/dev/null || echo -)"
  done
  echo "$s"
}
now() { date +%s.%N; }
# Times any node stopped serving (lost leadership or quorum contact) so far.
stepdowns() { cat "$cluster_dir"/node-*/raftmq.log 2>/dev/null | grep -c "stopped serving MQTT" || true; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

echo "generating a backup of $RETAINED retained messages and $SESSIONS sessions ..."
t0=$(now)
python3 "$here/tests/bench/gen_backup.py" "$OUT/synthetic.tar.gz" "$RETAINED" "$SESSIONS" "$PAYLOAD"
echo "generated in $(secs "$t0" "$(now)") s: $(du -h "$OUT/synthetic.tar.gz" | cut -f1)"

base=$(free_base)
RAFTMQ_MQTT__MAX_QUEUED_MESSAGES=1000000 RAFTMQ_CLUSTER__SNAPSHOT_EVERY=$SNAPSHOT_EVERY \
  "$RAFTMQ_BIN" local-cluster --nodes 3 --dir "$cluster_dir" --base-port "$base" >"$OUT/local-cluster.out" 2>&1 &
supervisor_pid=$!
leader=$(wait_leader)
url="http://127.0.0.1:$((base + 100 + leader - 1))"
mqtt_port=$((base + leader - 1))
echo "leader: node $leader ($url)"

# ---- restore
reset_peaks
sd0=$(stepdowns)
t0=$(now)
"$RAFTMQ_BIN" ctl --url "$url" backup restore "$OUT/synthetic.tar.gz" --mode replace 2>/dev/null | tee "$OUT/restore.out"
line="case=restore RESULT retained=$RETAINED sessions=$SESSIONS seconds=$(secs "$t0" "$(now)")$(peaks) stepdowns=$(($(stepdowns) - sd0))"
echo "$line" | tee -a "$results"
curl -s "$url/api/v1/state/digest" >"$OUT/digest-after-restore.json"

# Leadership may have moved (counted in the node logs); follow it.
leader=$(wait_leader)
url="http://127.0.0.1:$((base + 100 + leader - 1))"
mqtt_port=$((base + leader - 1))

# ---- export
reset_peaks
sd0=$(stepdowns)
t0=$(now)
"$RAFTMQ_BIN" ctl --url "$url" backup create 2>/dev/null | tee "$OUT/export.out"
bytes=$(grep -o 'bytes=[0-9]*' "$OUT/export.out" | cut -d= -f2)
line="case=export RESULT retained=$RETAINED sessions=$SESSIONS seconds=$(secs "$t0" "$(now)") file_bytes=${bytes:--}$(peaks) stepdowns=$(($(stepdowns) - sd0))"
echo "$line" | tee -a "$results"

# ---- latency with and without an export running
leader=$(wait_leader)
url="http://127.0.0.1:$((base + 100 + leader - 1))"
mqtt_port=$((base + leader - 1))
bench() {
  "$RAFTMQ_BIN" bench --host 127.0.0.1 --port "$mqtt_port" --scenario p2p --qos 1 --rate "$RATE" \
    --duration "$LAT_SECONDS" --protocol 5 --persistent >"$OUT/$1.out" 2>&1 || echo "bench exited with $? (see $OUT/$1.out)" >&2
  grep '^RESULT' "$OUT/$1.out" || echo "RESULT none"
}
sd0=$(stepdowns)
r=$(bench latency-idle)
echo "case=latency-idle $r stepdowns=$(($(stepdowns) - sd0))" | tee -a "$results"
sd0=$(stepdowns)
(
  while true; do "$RAFTMQ_BIN" ctl --url "$url" backup create >>"$OUT/exports-under-load.out" 2>&1 || true; done
) &
exporter_pid=$!
r=$(bench latency-export)
kill "$exporter_pid" 2>/dev/null || true
wait "$exporter_pid" 2>/dev/null || true
exporter_pid=""
n_exports=$(grep -c "written on node" "$OUT/exports-under-load.out" || true)
echo "case=latency-export $r exports_during_run=$n_exports stepdowns=$(($(stepdowns) - sd0))" | tee -a "$results"
echo "results: $results"
