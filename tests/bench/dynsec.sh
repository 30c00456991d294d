#!/usr/bin/env bash
# The dynamic-security benchmarks of issue 4 ("How it is checked"):
#  - p2p QoS 0 throughput with dynamic security on (1,000 clients, 100 roles,
#    10 ACLs each) against the same run with it off: raftmq's on/off ratio
#    must be >= 0.9; Mosquitto 2 with its plugin is measured the same way for
#    reference;
#  - CONNECT rate with password checks (every client one of the 1,000 users),
#    raftmq against Mosquitto 2.0.11 with its plugin; and the same without
#    passwords (anonymous, dynsec off), so the difference is the cost of the
#    password check.
# Both brokers load the same dynamic-security.json, written by
# tests/bench/gen_dynsec.py: raftmq with `raftmq ctl dynsec import`, Mosquitto
# as its plugin's `plugin_opt_config_file`. A fresh broker for every run; runs
# interleaved A,B,B,A as tests/bench/compare.sh does; medians and ratios at
# the end.
#
# Needs (installs nothing itself):
#   apt-get install -y mosquitto python3   # Mosquitto 2.0.x and its plugin
#   cargo build --release                  # target/release/raftmq (or set RAFTMQ_BIN)
#
# Environment:
#   RAFTMQ_BIN     raftmq binary (default: $CARGO_TARGET_DIR or ./target, release)
#   MOSQUITTO_BIN  mosquitto binary (default: mosquitto on PATH, or /usr/sbin/mosquitto)
#   DYNSEC_PLUGIN  Mosquitto's plugin (default: Debian's path below)
#   CASES          subset of: p2p-qos0 conn-rate conn-rate-anon (default: all)
#   ROUNDS         A,B,B,A blocks per case (default 1 -> 2 runs of each side)
#   ONLY           run only the pairs whose configurations all start with this
#                  (e.g. "raftmq": the p2p on/off pair of raftmq alone)
#   OUT            directory for logs and raw RESULT lines (default: a new temp dir)
#   BENCH_TIMEOUT  --timeout of each tool run in seconds (default 180)
#   P2P_MSGS       messages of the p2p case (default 300000)
#   CONNS          connections of the conn-rate cases (default 10000)
#   CHRT           if set (e.g. 10), run broker and tool under `chrt -f $CHRT`
#
# Raw lines are kept in $OUT/results.txt as "case=<name> config=<broker>-<on|off> RESULT ...".
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/target}
RAFTMQ_BIN=${RAFTMQ_BIN:-$target_dir/release/raftmq}
MOSQUITTO_BIN=${MOSQUITTO_BIN:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
DYNSEC_PLUGIN=${DYNSEC_PLUGIN:-/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so}
ROUNDS=${ROUNDS:-1}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}
P2P_MSGS=${P2P_MSGS:-300000}
CONNS=${CONNS:-10000}
rt=()
if [[ -n "${CHRT:-}" ]]; then rt=(chrt -f "$CHRT"); fi
OUT=${OUT:-$(mktemp -d /tmp/raftmq-dynsec.XXXXXX)}
mkdir -p "$OUT"
results=$OUT/results.txt
: >"$results"

PASSWORD=benchpw
CREDS="--username bench-{i} --user-count 1000 --password $PASSWORD"

# name | tool arguments | A,B,B,A pairs "A/B" (ratio = B / A) | figures (metric:cmp:goal)
declare -A CASE_ARGS CASE_PAIRS CASE_METRICS CASE_CREDS
ALL_CASES="p2p-qos0 conn-rate conn-rate-anon"
CASE_ARGS[p2p-qos0]="--scenario p2p --qos 0 --msgs $P2P_MSGS --topic-prefix bench/p2p"
CASE_PAIRS[p2p-qos0]="raftmq-off/raftmq-on mosquitto-off/mosquitto-on"
CASE_METRICS[p2p-qos0]="msgs_per_s:ge:0.9 broker_cpu_us_per_op:info:- lost:info:-"
CASE_ARGS[conn-rate]="--scenario conn-rate --clients $CONNS"
CASE_PAIRS[conn-rate]="mosquitto-on/raftmq-on"
CASE_METRICS[conn-rate]="conn_per_s:info:- broker_cpu_us_per_op:info:- p50_ms:info:- p99_ms:info:-"
CASE_ARGS[conn-rate-anon]="--scenario conn-rate --clients $CONNS"
CASE_PAIRS[conn-rate-anon]="mosquitto-off/raftmq-off"
CASE_METRICS[conn-rate-anon]="conn_per_s:info:- broker_cpu_us_per_op:info:- p50_ms:info:- p99_ms:info:-"
CASES=${CASES:-$ALL_CASES}

for c in $CASES; do
  [[ -n "${CASE_ARGS[$c]:-}" ]] || { echo "unknown case '$c' (known: $ALL_CASES)" >&2; exit 2; }
done
[[ -x "$RAFTMQ_BIN" ]] || { echo "no raftmq binary at $RAFTMQ_BIN (cargo build --release)" >&2; exit 2; }
[[ -x "$MOSQUITTO_BIN" ]] || { echo "no mosquitto at $MOSQUITTO_BIN (apt-get install -y mosquitto)" >&2; exit 2; }
[[ -f "$DYNSEC_PLUGIN" ]] || { echo "no dynamic-security plugin at $DYNSEC_PLUGIN" >&2; exit 2; }

dynsec_json=$OUT/dynamic-security.json
python3 "$here/tests/bench/gen_dynsec.py" "$dynsec_json" --password "$PASSWORD"

broker_pid=""
cleanup() {
  if [[ -n "$broker_pid" ]] && kill -0 "$broker_pid" 2>/dev/null; then
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Broker ports from below the ephemeral range (see compare.sh).
read -r eph_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || eph_low=32768
port_low=10000
port_high=$((eph_low - 1))
if ((port_high - port_low < 1000)); then port_low=61000 port_high=65000; fi

port_taken() {
  port_in_use "$1" && return 0
  command -v ss >/dev/null && [[ -n "$(ss -Hant "( sport = :$1 )" 2>/dev/null)" ]]
}

free_port() {
  local p tries=0
  while ((tries < 200)); do
    p=$((port_low + (RANDOM * 32768 + RANDOM) % (port_high - port_low + 1)))
    if ! port_taken "$p"; then echo "$p"; return 0; fi
    tries=$((tries + 1))
  done
  echo "no free port found" >&2
  return 1
}

wait_listening() {
  local port=$1 pid=$2 i
  for ((i = 0; i < 200; i++)); do
    port_in_use "$port" && return 0
    kill -0 "$pid" 2>/dev/null || { echo "broker $pid exited before listening" >&2; return 1; }
    sleep 0.05
  done
  echo "broker $pid not listening on $port after 10 s" >&2
  return 1
}

stop_broker() {
  cleanup
  broker_pid=""
}

# $1 port, $2 dir, $3 on|off
start_mosquitto() {
  local port=$1 dir=$2 dynsec=$3
  {
    echo "listener $port 127.0.0.1"
    echo "persistence false"
    echo "log_dest stderr"
    echo "log_type error"
    echo "max_queued_messages 1000000"
    if [[ $dynsec == on ]]; then
      cp "$dynsec_json" "$dir/dynamic-security.json"
      echo "allow_anonymous false"
      echo "plugin $DYNSEC_PLUGIN"
      echo "plugin_opt_config_file $dir/dynamic-security.json"
    else
      echo "allow_anonymous true"
    fi
  } >"$dir/mosquitto.conf"
  "${rt[@]}" "$MOSQUITTO_BIN" -c "$dir/mosquitto.conf" 2>"$dir/broker.log" &
  broker_pid=$!
}

admin_port=""
start_raftmq() {
  local port=$1 dir=$2
  admin_port=$(free_port)
  mkdir -p "$dir/data"
  # Same queue allowance as Mosquitto's max_queued_messages (compare.sh).
  RAFTMQ_MQTT__OUTBOX_CAPACITY=1000000 RAFTMQ_MQTT__MAX_QUEUED_MESSAGES=1000000 \
  "${rt[@]}" "$RAFTMQ_BIN" serve --mqtt-listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --data-dir "$dir/data" 2>"$dir/broker.log" >/dev/null &
  broker_pid=$!
}

# Turns dynamic security on in a running raftmq: the same file as Mosquitto's.
# Retried while the node is still electing itself (10 s).
raftmq_import() {
  local dir=$1 i
  for ((i = 0; i < 100; i++)); do
    if "$RAFTMQ_BIN" ctl --url "http://127.0.0.1:$admin_port" dynsec import "$dynsec_json" \
      >"$dir/import.out" 2>&1; then
      return 0
    fi
    kill -0 "$broker_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# $1 case, $2 config (<broker>-<on|off>), $3 run number
run_one() {
  local case=$1 config=$2 n=$3 dir port line broker dynsec
  broker=${config%-*}
  dynsec=${config##*-}
  dir=$OUT/$case-$config-$n
  mkdir -p "$dir"
  local attempt started=0
  for attempt in 1 2 3; do
    port=$(free_port)
    if [[ $broker == raftmq ]]; then
      start_raftmq "$port" "$dir"
      if [[ -n "$admin_port" ]]; then
        wait_listening "$admin_port" "$broker_pid" || { stop_broker; continue; }
      fi
    else
      start_mosquitto "$port" "$dir" "$dynsec"
    fi
    if wait_listening "$port" "$broker_pid"; then
      started=1
      break
    fi
    stop_broker
    cp "$dir/broker.log" "$dir/broker.log.$attempt" 2>/dev/null || true
  done
  if ((!started)); then
    echo "case=$case config=$config RESULT failed (broker did not start, see $dir/broker.log)" | tee -a "$results"
    return 0
  fi
  if [[ $broker == raftmq && $dynsec == on ]] && ! raftmq_import "$dir"; then
    stop_broker
    echo "case=$case config=$config RESULT failed (dynsec import, see $dir/import.out)" | tee -a "$results"
    return 0
  fi
  local creds=""
  if [[ $dynsec == on ]]; then creds=$CREDS; fi
  # shellcheck disable=SC2086 # CASE_ARGS and creds hold several words on purpose
  if "${rt[@]}" "$RAFTMQ_BIN" bench --host 127.0.0.1 --port "$port" --broker-pid "$broker_pid" --threads 1 \
    --timeout "$BENCH_TIMEOUT" ${CASE_ARGS[$case]} $creds >"$dir/bench.out" 2>"$dir/bench.err"; then
    line=$(grep '^RESULT ' "$dir/bench.out" | tail -n 1)
  else
    line="RESULT failed (see $dir/bench.err)"
  fi
  stop_broker
  echo "case=$case config=$config $line" | tee -a "$results"
}

# The pairs of a case that ONLY selects.
pairs_of() {
  local pair
  for pair in ${CASE_PAIRS[$1]}; do
    if [[ -z "${ONLY:-}" || ( ${pair%/*} == "$ONLY"* && ${pair#*/} == "$ONLY"* ) ]]; then echo "$pair"; fi
  done
}

n=0
for case in $CASES; do
  for pair in $(pairs_of "$case"); do
    a=${pair%/*} b=${pair#*/}
    for ((r = 0; r < ROUNDS; r++)); do
      for config in "$a" "$b" "$b" "$a"; do
        run_one "$case" "$config" "$n"
        n=$((n + 1))
      done
    done
  done
done

echo
echo "Medians [min-max]; ratio = B / A (raw lines: $results)"
for case in $CASES; do
  for pair in $(pairs_of "$case"); do
    a=${pair%/*} b=${pair#*/}
    for spec in ${CASE_METRICS[$case]}; do
      IFS=: read -r metric cmp goal <<<"$spec"
      awk -v case="$case" -v metric="$metric" -v cmp="$cmp" -v goal="$goal" -v A="$a" -v B="$b" '
        function median(arr, n,   i, j, t) {
          for (i = 2; i <= n; i++) { t = arr[i]; for (j = i - 1; j >= 1 && arr[j] > t; j--) arr[j + 1] = arr[j]; arr[j + 1] = t }
          if (n == 0) return "";
          return (n % 2) ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
        }
        $1 == "case=" case {
          c = $2; sub(/^config=/, "", c)
          if (c != A && c != B) next
          for (i = 3; i <= NF; i++) {
            split($i, kv, "=")
            if (kv[1] == metric && kv[2] != "-" && kv[2] != "") {
              if (c == A) xa[++na] = kv[2] + 0; else xb[++nb] = kv[2] + 0
            }
          }
        }
        END {
          ma = median(xa, na); mb = median(xb, nb)
          as = (na ? sprintf("%.4g [%.4g-%.4g]", ma, xa[1], xa[na]) : "-")
          bs = (nb ? sprintf("%.4g [%.4g-%.4g]", mb, xb[1], xb[nb]) : "-")
          line = sprintf("%-15s %-21s A=%s %-26s B=%s %-26s", case, metric, A, as, B, bs)
          if (!na || !nb || ma == 0) { print line " ratio=-"; exit }
          ratio = mb / ma
          verdict = ""
          if (cmp == "ge") verdict = (ratio >= goal) ? "target >= " goal ": met" : "target >= " goal ": NOT met"
          if (cmp == "le") verdict = (ratio <= goal) ? "target <= " goal ": met" : "target <= " goal ": NOT met"
          printf "%s ratio=%.3f  %s\n", line, ratio, verdict
        }' "$results"
    done
  done
done
