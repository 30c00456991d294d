#!/usr/bin/env bash
# Cluster (replicated) benchmarks of issue 3, with the load tool (`raftmq bench`):
#
#   qos1     replicated QoS 1 throughput: a fresh three-node raftmq cluster
#            (`raftmq local-cluster`, release build, fsync on as configured by
#            default) against a fresh Mosquitto 2 (persistence false), the same
#            p2p QoS 1 run with a persistent subscriber, interleaved A,B,B,A
#            (raftmq, mosquitto, mosquitto, raftmq) per round. Reports msg/s,
#            p99 publish-to-delivery and publish-to-PUBACK latency, the ratio
#            raftmq / mosquitto (target msg/s >= 1.0), and the leader's Raft
#            figures from /metrics (fsyncs, appends, entries per fsync, mean
#            commit, append-to-durable and replication latency) over the run.
#   storm    reconnect storm: STORM_CLIENTS (10,000) persistent clients connect
#            to the leader, subscribe and disconnect; the leader is killed with
#            kill -9; the new leader is found via /health/leader; all clients
#            reconnect to it (at most 64 handshakes in flight). Reports the time
#            to the new leader, the time until every client had its CONNACK
#            with session present = 1, and the sessions missing.
#   resume   the same storm without a kill (resume on the same leader), the
#            baseline for `storm`.
#
# After every raftmq run: RSS of each node and disk use of each data folder.
#
# Needs (installs nothing itself): cargo build --release; apt-get install -y mosquitto; curl.
#
# Environment:
#   RAFTMQ_BIN     raftmq binary (default: $CARGO_TARGET_DIR or ./target, release)
#   MOSQUITTO_BIN  mosquitto binary (default: mosquitto on PATH, or /usr/sbin/mosquitto)
#   CASES          subset of "qos1 storm resume" (default: all three)
#   ROUNDS         A,B,B,A blocks for qos1, runs for storm/resume (default 1)
#   MSGS           messages per qos1 run (default 300000)
#   PAIRS          publisher/subscriber pairs of qos1 (default 1, as compare.sh's p2p-qos1)
#   INFLIGHT       unacknowledged publishes per publisher (default 20, Mosquitto's max_inflight_messages)
#   STORM_CLIENTS  clients of the storm (default 10000)
#   OUT            directory for logs and raw RESULT lines (default: a new temp dir)
#   BENCH_TIMEOUT  --timeout of each tool run in seconds (default 180)
#   CHRT           if set (e.g. 10), run brokers and tool under `chrt -f $CHRT` (root)
#   KEEP_DATA      if set, keep each cluster's data folders (by default only the
#                  node logs are kept, as $OUT/<run>/node-N.log: a run writes up to
#                  ~120 MB per node)
#
# Raw lines are kept in $OUT/results.txt as "case=<name> broker=<name> RESULT ... <extra fields>".
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/target}
RAFTMQ_BIN=${RAFTMQ_BIN:-$target_dir/release/raftmq}
MOSQUITTO_BIN=${MOSQUITTO_BIN:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
CASES=${CASES:-qos1 storm resume}
ROUNDS=${ROUNDS:-1}
MSGS=${MSGS:-300000}
PAIRS=${PAIRS:-1}
INFLIGHT=${INFLIGHT:-20}
STORM_CLIENTS=${STORM_CLIENTS:-10000}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}
rt=()
if [[ -n "${CHRT:-}" ]]; then rt=(chrt -f "$CHRT"); fi
OUT=${OUT:-$(mktemp -d /tmp/raftmq-cluster.XXXXXX)}
mkdir -p "$OUT"
results=$OUT/results.txt
: >"$results"

for c in $CASES; do
  case $c in qos1 | storm | resume) ;; *) echo "unknown case '$c' (known: qos1 storm resume)" >&2; exit 2 ;; esac
done
[[ -x "$RAFTMQ_BIN" ]] || { echo "no raftmq binary at $RAFTMQ_BIN (cargo build --release)" >&2; exit 2; }
if [[ " $CASES " == *" qos1 "* ]]; then
  [[ -x "$MOSQUITTO_BIN" ]] || { echo "no mosquitto at $MOSQUITTO_BIN (apt-get install -y mosquitto)" >&2; exit 2; }
fi
command -v curl >/dev/null || { echo "curl is needed (health and metrics)" >&2; exit 2; }

# Processes this script started: the local-cluster supervisor (whose nodes
# are in $cluster_dir/node-*/raftmq.pid) or one Mosquitto.
supervisor_pid="" mosquitto_pid="" cluster_dir=""
node_pids() {
  local f
  [[ -n "$cluster_dir" ]] || return 0
  for f in "$cluster_dir"/node-*/raftmq.pid; do [[ -f "$f" ]] && cat "$f"; done
}
stop_all() {
  if [[ -n "$mosquitto_pid" ]] && kill -0 "$mosquitto_pid" 2>/dev/null; then
    kill "$mosquitto_pid" 2>/dev/null || true
    wait "$mosquitto_pid" 2>/dev/null || true
  fi
  mosquitto_pid=""
  if [[ -n "$supervisor_pid" ]] && kill -0 "$supervisor_pid" 2>/dev/null; then
    kill "$supervisor_pid" 2>/dev/null || true   # SIGTERM: it stops its nodes
    wait "$supervisor_pid" 2>/dev/null || true
  fi
  supervisor_pid=""
  local p
  for p in $(node_pids); do
    if kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
  done
  cluster_dir=""
}
trap stop_all EXIT

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_taken() {
  port_in_use "$1" && return 0
  command -v ss >/dev/null && [[ -n "$(ss -Hant "( sport = :$1 )" 2>/dev/null)" ]]
}

# Listeners below the kernel's ephemeral range (the storm's client ports live inside it).
read -r eph_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || eph_low=32768
port_low=10000
port_high=$((eph_low - 301))

# A base port P with P..P+2, P+100..P+102 and P+200..P+202 all free (local-cluster's layout).
free_base() {
  local p tries=0 off ok
  while ((tries < 200)); do
    p=$((port_low + (RANDOM * 32768 + RANDOM) % (port_high - port_low + 1)))
    ok=1
    for off in 0 1 2 100 101 102 200 201 202; do
      if port_taken $((p + off)); then ok=0; break; fi
    done
    if ((ok)); then echo "$p"; return 0; fi
    tries=$((tries + 1))
  done
  echo "no free port range found" >&2
  return 1
}

http_code() { curl -s -o /dev/null -m 1 -w '%{http_code}' "$1" 2>/dev/null || true; }

# Prints the node number (1..3) whose /health/leader answers 200, waiting up
# to $2 seconds; skips node $3 (the one just killed).
wait_leader() {
  local base=$1 secs=$2 skip=${3:-0} i n
  for ((i = 0; i < secs * 50; i++)); do
    for n in 1 2 3; do
      ((n == skip)) && continue
      if [[ $(http_code "http://127.0.0.1:$((base + 100 + n - 1))/health/leader") == 200 ]]; then
        echo "$n"
        return 0
      fi
    done
    sleep 0.02
  done
  echo "no serving leader after $secs s" >&2
  return 1
}

start_cluster() {
  local dir=$1 base attempt
  for attempt in 1 2 3; do
    base=$(free_base)
    cluster_dir=$dir/cluster
    rm -rf "$cluster_dir"
    # Same queue allowance as compare.sh gives both brokers.
    RAFTMQ_MQTT__OUTBOX_CAPACITY=1000000 RAFTMQ_MQTT__MAX_QUEUED_MESSAGES=1000000 \
      "${rt[@]}" "$RAFTMQ_BIN" local-cluster --nodes 3 --dir "$cluster_dir" --base-port "$base" \
      >"$dir/local-cluster.out" 2>&1 &
    supervisor_pid=$!
    if leader=$(wait_leader "$base" 30); then
      cluster_base=$base
      return 0
    fi
    stop_all
  done
  echo "the cluster did not elect a serving leader (see $dir/local-cluster.out)" >&2
  return 1
}

# After a cluster run: keep the node logs, drop the data unless KEEP_DATA is set.
drop_data() {
  local dir=$1 n
  for n in 1 2 3; do cp "$dir/cluster/node-$n/raftmq.log" "$dir/node-$n.log" 2>/dev/null || true; done
  [[ -n "${KEEP_DATA:-}" ]] || rm -rf "$dir/cluster"
}

node_pid() { cat "$cluster_dir/node-$1/raftmq.pid" 2>/dev/null || echo 0; }

# " rss_kb_nodeN=.. disk_kb_nodeN=.." for every node (rss "-" when it is not running).
node_figures() {
  local n pid rss disk s=""
  for n in 1 2 3; do
    pid=$(node_pid "$n")
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    disk=$(du -sk --exclude=raftmq.log --exclude=raftmq.pid --exclude=raftmq.toml "$cluster_dir/node-$n" 2>/dev/null | awk '{print $1}')
    s+=" rss_kb_node$n=${rss:--} disk_kb_node$n=${disk:--}"
  done
  echo "$s"
}

# utime+stime of every node in clock ticks, "t1 t2 t3" ("0" when it is not running).
node_ticks() {
  local n pid s=""
  for n in 1 2 3; do
    pid=$(node_pid "$n")
    s+=" $(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}' || true)"
  done
  echo "$s" | awk '{print ($1 == "" ? 0 : $1), ($2 == "" ? 0 : $2), ($3 == "" ? 0 : $3)}'
}

# " cpu_us_per_msg_nodeN=.. cluster_cpu_us_per_msg=.." from two node_ticks samples.
cpu_figures() {
  local hz
  hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
  awk -v a="$1" -v b="$2" -v msgs="$3" -v hz="$hz" 'BEGIN {
    split(a, x, " "); split(b, y, " "); tot = 0
    for (i = 1; i <= 3; i++) {
      us = (y[i] - x[i]) * 1e6 / hz; tot += us
      printf " cpu_us_per_msg_node%d=%s", i, (msgs > 0 ? sprintf("%.2f", us / msgs) : "-")
    }
    printf " cluster_cpu_us_per_msg=%s\n", (msgs > 0 ? sprintf("%.2f", tot / msgs) : "-")
  }'
}

# One value of the leader's /metrics (a counter or a _sum/_count line without labels).
metric() { awk -v m="$2" '$1 == m {print $2; exit}' "$1"; }
# The sum of a metric over all its labelled series (e.g. every peer's _sum).
metric_all() { awk -v m="$2{" 'index($1, m) == 1 {s += $2} END {print s + 0}' "$1"; }

# Mean in ms of a histogram between two dumps, from its _sum and _count (all series).
hist_mean_ms() {
  local a=$1 b=$2 name=$3 s0 s1 c0 c1
  s0=$(metric "$a" "${name}_sum") s1=$(metric "$b" "${name}_sum")
  c0=$(metric "$a" "${name}_count") c1=$(metric "$b" "${name}_count")
  if [[ -z $s1 ]]; then
    s0=$(metric_all "$a" "${name}_sum") s1=$(metric_all "$b" "${name}_sum")
    c0=$(metric_all "$a" "${name}_count") c1=$(metric_all "$b" "${name}_count")
  fi
  awk -v s0="${s0:-0}" -v s1="${s1:-0}" -v c0="${c0:-0}" -v c1="${c1:-0}" \
    'BEGIN { c = c1 - c0; print (c > 0 ? sprintf("%.3f", (s1 - s0) / c * 1000) : "-") }'
}

# " fsyncs=.. appends=.. entries=.. msgs_per_fsync=.. commit_mean_ms=.. append_mean_ms=.. replication_mean_ms=.."
# from two /metrics dumps of the leader (append: its own log; replication: to its followers).
raft_figures() {
  local a=$1 b=$2 msgs=$3 f0 f1 ap0 ap1 e0 e1 cs0 cs1 cc0 cc1
  f0=$(metric "$a" raftmq_raft_fsyncs_total) f1=$(metric "$b" raftmq_raft_fsyncs_total)
  ap0=$(metric "$a" raftmq_raft_appends_total) ap1=$(metric "$b" raftmq_raft_appends_total)
  e0=$(metric "$a" raftmq_raft_entries_appended_total) e1=$(metric "$b" raftmq_raft_entries_appended_total)
  cs0=$(metric "$a" raftmq_raft_commit_latency_seconds_sum) cs1=$(metric "$b" raftmq_raft_commit_latency_seconds_sum)
  cc0=$(metric "$a" raftmq_raft_commit_latency_seconds_count) cc1=$(metric "$b" raftmq_raft_commit_latency_seconds_count)
  awk -v f0="${f0:-0}" -v f1="${f1:-0}" -v a0="${ap0:-0}" -v a1="${ap1:-0}" -v e0="${e0:-0}" -v e1="${e1:-0}" \
    -v s0="${cs0:-0}" -v s1="${cs1:-0}" -v c0="${cc0:-0}" -v c1="${cc1:-0}" -v msgs="$msgs" 'BEGIN {
      f = f1 - f0; a = a1 - a0; e = e1 - e0; c = c1 - c0
      printf " fsyncs=%d appends=%d entries=%d", f, a, e
      printf " msgs_per_fsync=%s entries_per_fsync=%s", (f > 0 ? sprintf("%.1f", msgs / f) : "-"), (f > 0 ? sprintf("%.1f", e / f) : "-")
      printf " msgs_per_entry=%s", (e > 0 ? sprintf("%.1f", msgs / e) : "-")
      printf " commit_mean_ms=%s commits=%d", (c > 0 ? sprintf("%.3f", (s1 - s0) / c * 1000) : "-"), c
    }'
  printf ' append_mean_ms=%s replication_mean_ms=%s\n' \
    "$(hist_mean_ms "$a" "$b" raftmq_raft_append_latency_seconds)" \
    "$(hist_mean_ms "$a" "$b" raftmq_raft_replication_latency_seconds)"
}

field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k {print $2; exit}'; }

bench() { "${rt[@]}" "$RAFTMQ_BIN" bench --threads 1 --timeout "$BENCH_TIMEOUT" "$@"; }

run_qos1_raftmq() {
  local dir=$1 port pid admin line extra ticks0 ticks1
  start_cluster "$dir"
  port=$((cluster_base + leader - 1)) admin=$((cluster_base + 100 + leader - 1)) pid=$(node_pid "$leader")
  curl -s -m 5 "http://127.0.0.1:$admin/metrics" >"$dir/metrics.before" || true
  ticks0=$(node_ticks)
  if bench --host 127.0.0.1 --port "$port" --broker-pid "$pid" --scenario p2p --qos 1 --msgs "$MSGS" \
    --clients "$PAIRS" --inflight "$INFLIGHT" --persistent >"$dir/bench.out" 2>"$dir/bench.err"; then
    line=$(grep '^RESULT ' "$dir/bench.out" | tail -n 1)
  else
    line="RESULT failed (see $dir/bench.err)"
  fi
  ticks1=$(node_ticks)
  curl -s -m 5 "http://127.0.0.1:$admin/metrics" >"$dir/metrics.after" || true
  extra=" leader=$leader$(raft_figures "$dir/metrics.before" "$dir/metrics.after" "$(field "$line" published)")"
  extra+="$(cpu_figures "$ticks0" "$ticks1" "$(field "$line" published)")$(node_figures)"
  stop_all
  drop_data "$dir"
  echo "case=qos1 broker=raftmq $line$extra" | tee -a "$results"
}

run_qos1_mosquitto() {
  local dir=$1 port line attempt
  for attempt in 1 2 3; do
    port=$(($(free_base)))
    cat >"$dir/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
max_queued_messages 1000000
CONF
    "${rt[@]}" "$MOSQUITTO_BIN" -c "$dir/mosquitto.conf" 2>"$dir/broker.log" &
    mosquitto_pid=$!
    local i
    for ((i = 0; i < 200; i++)); do port_in_use "$port" && break; sleep 0.05; done
    port_in_use "$port" && break
    stop_all
  done
  if bench --host 127.0.0.1 --port "$port" --broker-pid "$mosquitto_pid" --scenario p2p --qos 1 --msgs "$MSGS" \
    --clients "$PAIRS" --inflight "$INFLIGHT" --persistent >"$dir/bench.out" 2>"$dir/bench.err"; then
    line=$(grep '^RESULT ' "$dir/bench.out" | tail -n 1)
  else
    line="RESULT failed (see $dir/bench.err)"
  fi
  stop_all
  echo "case=qos1 broker=mosquitto $line" | tee -a "$results"
}

# storm (kill=1) or resume (kill=0).
run_storm() {
  local dir=$1 kill=$2 case port pid line setup t0 t1 old extra new_leader_ms=-
  case=$([[ $kill == 1 ]] && echo storm || echo resume)
  start_cluster "$dir"
  port=$((cluster_base + leader - 1)) pid=$(node_pid "$leader")
  if ! bench --host 127.0.0.1 --port "$port" --broker-pid "$pid" --scenario reconnect-storm --qos 1 \
    --clients "$STORM_CLIENTS" --storm-phase setup >"$dir/setup.out" 2>"$dir/setup.err"; then
    echo "case=$case broker=raftmq RESULT failed (setup, see $dir/setup.err)" | tee -a "$results"
    stop_all
    return 0
  fi
  setup=$(grep '^RESULT ' "$dir/setup.out" | tail -n 1)
  extra=" setup_conn_per_s=$(field "$setup" conn_per_s) setup_failed=$(grep -o 'failed [0-9]*' "$dir/setup.out" | head -1 | awk '{print $2}')"
  extra+="$(node_figures | sed 's/ \([a-z_]*node[0-9]\)=/ setup_\1=/g')"
  old=$leader
  if [[ $kill == 1 ]]; then
    t0=$(date +%s%N)
    kill -9 "$pid"
    leader=$(wait_leader "$cluster_base" 30 "$old") || leader=""
    t1=$(date +%s%N)
    if [[ -z "$leader" ]]; then
      echo "case=$case broker=raftmq RESULT failed (no new leader)" | tee -a "$results"
      stop_all
      return 0
    fi
    new_leader_ms=$(((t1 - t0) / 1000000))
    port=$((cluster_base + leader - 1)) pid=$(node_pid "$leader")
  fi
  if bench --host 127.0.0.1 --port "$port" --broker-pid "$pid" --scenario reconnect-storm --qos 1 \
    --clients "$STORM_CLIENTS" --storm-phase resume >"$dir/bench.out" 2>"$dir/bench.err"; then
    line=$(grep '^RESULT ' "$dir/bench.out" | tail -n 1)
  else
    line="RESULT failed (see $dir/bench.err)"
  fi
  extra+=" old_leader=$old leader=$leader kill_to_leader_ms=$new_leader_ms$(node_figures)"
  stop_all
  drop_data "$dir"
  echo "case=$case broker=raftmq $line$extra" | tee -a "$results"
}

n=0
for c in $CASES; do
  for ((r = 0; r < ROUNDS; r++)); do
    if [[ $c == qos1 ]]; then
      for b in raftmq mosquitto mosquitto raftmq; do
        mkdir -p "$OUT/$c-$b-$n"
        "run_qos1_$b" "$OUT/$c-$b-$n"
        n=$((n + 1))
      done
    else
      mkdir -p "$OUT/$c-$n"
      run_storm "$OUT/$c-$n" "$([[ $c == storm ]] && echo 1 || echo 0)"
      n=$((n + 1))
    fi
  done
done

echo
echo "Medians [range] per broker; ratio = raftmq / mosquitto (raw lines: $results)"
summary() {
  local case=$1 metric=$2 cmp=$3 goal=$4
  awk -v case="$case" -v metric="$metric" -v cmp="$cmp" -v goal="$goal" '
    function median(arr, n,   i, j, t) {
      for (i = 2; i <= n; i++) { t = arr[i]; for (j = i - 1; j >= 1 && arr[j] > t; j--) arr[j + 1] = arr[j]; arr[j + 1] = t }
      if (n == 0) return "";
      return (n % 2) ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
    }
    $1 == "case=" case {
      b = $2; sub(/^broker=/, "", b)
      for (i = 3; i <= NF; i++) {
        split($i, kv, "=")
        if (kv[1] == metric && kv[2] != "-" && kv[2] != "") {
          if (b == "raftmq") ra[++nr] = kv[2] + 0; else mo[++nm] = kv[2] + 0
        }
      }
    }
    END {
      r = median(ra, nr); m = median(mo, nm)
      rs = (nr ? sprintf("%.4g [%.4g-%.4g]", r, ra[1], ra[nr]) : "-")
      ms = (nm ? sprintf("%.4g [%.4g-%.4g]", m, mo[1], mo[nm]) : "-")
      line = sprintf("%-7s %-20s raftmq=%-28s mosquitto=%-28s", case, metric, rs, ms)
      if (!nr || !nm || m == 0 || cmp == "info") { print line; exit }
      ratio = r / m
      if (cmp == "ratio") { printf "%s ratio=%.3f\n", line, ratio; exit }
      verdict = (cmp == "ge") ? ((ratio >= goal) ? "target >= " goal ": met" : "target >= " goal ": NOT met") \
                              : ((ratio <= goal) ? "target <= " goal ": met" : "target <= " goal ": NOT met")
      printf "%s ratio=%.3f  %s\n", line, ratio, verdict
    }' "$results"
}
for c in $CASES; do
  case $c in
    qos1)
      summary qos1 msgs_per_s ge 1
      for m in p50_ms p99_ms ack_p50_ms ack_p99_ms broker_cpu_us_per_op lost; do summary qos1 "$m" ratio -; done
      for m in cluster_cpu_us_per_msg cpu_us_per_msg_node1 cpu_us_per_msg_node2 cpu_us_per_msg_node3 msgs_per_fsync msgs_per_entry entries_per_fsync commit_mean_ms append_mean_ms replication_mean_ms rss_kb_node1 rss_kb_node2 rss_kb_node3 disk_kb_node1 disk_kb_node2 disk_kb_node3; do
        summary qos1 "$m" info -
      done
      ;;
    storm | resume)
      for m in kill_to_leader_ms elapsed_s conn_per_s p99_ms sessions_present sessions_missing setup_conn_per_s \
        setup_rss_kb_node1 setup_rss_kb_node2 setup_rss_kb_node3 rss_kb_node1 rss_kb_node2 rss_kb_node3 \
        disk_kb_node1 disk_kb_node2 disk_kb_node3; do
        summary "$c" "$m" info -
      done
      ;;
  esac
done
