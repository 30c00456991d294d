#!/usr/bin/env bash
# Compares raftmq with Mosquitto 2 under the load tool (`raftmq bench`), the
# way issue 2 sets its targets: same machine, a fresh broker for every run,
# runs interleaved A,B,B,A (raftmq, mosquitto, mosquitto, raftmq) per
# scenario, median ratios raftmq/mosquitto at the end.
#
# Needs (installs nothing itself):
#   apt-get install -y mosquitto         # Debian's Mosquitto 2.0.x
#   cargo build --release                # target/release/raftmq (or set RAFTMQ_BIN)
#
# Environment:
#   RAFTMQ_BIN     raftmq binary (default: $CARGO_TARGET_DIR or ./target, release)
#   BENCH_CMD      the load tool command (default: "$RAFTMQ_BIN bench")
#   BROKERS        "raftmq mosquitto" (default), or one of them alone for
#                  baseline runs (then each round runs it once, no ratios)
#   MOSQUITTO_BIN  mosquitto binary (default: mosquitto on PATH, or /usr/sbin/mosquitto)
#   CASES          space-separated subset of the case names below (default: all)
#   ROUNDS         A,B,B,A blocks per case (default 1 -> 2 runs of each broker)
#   OUT            directory for logs and raw RESULT lines (default: a new temp dir)
#   BENCH_TIMEOUT  --timeout of each tool run in seconds (default 180)
#   CHRT           if set (e.g. 10), run broker and tool under `chrt -f $CHRT`
#                  (SCHED_FIFO, needs root): on a machine shared with other
#                  work this removes most preemption noise (see docs/BENCHMARKS.md)
#
# Output: one line per run, then per case the median of each figure per broker
# and the ratio raftmq/mosquitto with the issue's target. Raw lines are kept in
# $OUT/results.txt as "case=<name> broker=<name> RESULT ...".
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/target}
RAFTMQ_BIN=${RAFTMQ_BIN:-$target_dir/release/raftmq}
MOSQUITTO_BIN=${MOSQUITTO_BIN:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
BENCH_CMD=${BENCH_CMD:-$RAFTMQ_BIN bench}
BROKERS=${BROKERS:-raftmq mosquitto}
ROUNDS=${ROUNDS:-1}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}
rt=()
if [[ -n "${CHRT:-}" ]]; then rt=(chrt -f "$CHRT"); fi
OUT=${OUT:-$(mktemp -d /tmp/raftmq-compare.XXXXXX)}
mkdir -p "$OUT"
results=$OUT/results.txt
: >"$results"

# name | tool arguments | figures compared (metric:target, see ratio_check)
# | tool threads (CASE_THREADS, default 1: the other core is left to the broker)
declare -A CASE_ARGS CASE_METRICS CASE_THREADS
ALL_CASES="p2p-qos0 p2p-qos1 fanout50-qos0 p2p-qos0-10k p2p-qos1-10k idle-10k idle-10k-sub idle-10k-auth conn-rate-10k conn-rate-10k-t1"
CASE_ARGS[p2p-qos0]="--scenario p2p --qos 0 --msgs 300000"
CASE_METRICS[p2p-qos0]="broker_cpu_us_per_op:le:0.667 msgs_per_s:ge:1 lost:info:-"
CASE_ARGS[p2p-qos1]="--scenario p2p --qos 1 --msgs 300000"
CASE_METRICS[p2p-qos1]="broker_cpu_us_per_op:le:0.667 msgs_per_s:ge:1"
CASE_ARGS[fanout50-qos0]="--scenario fanout --qos 0 --clients 50 --msgs 100000"
CASE_METRICS[fanout50-qos0]="broker_cpu_us_per_op:le:0.667 broker_cpu_us_per_delivery:info:- msgs_per_s:ge:1 lost:info:-"
CASE_ARGS[p2p-qos0-10k]="--scenario p2p --qos 0 --msgs 50000 --rate 10000"
CASE_METRICS[p2p-qos0-10k]="p99_ms:le:1 broker_cpu_us_per_op:info:- lost:info:-"
CASE_ARGS[p2p-qos1-10k]="--scenario p2p --qos 1 --msgs 50000 --rate 10000"
CASE_METRICS[p2p-qos1-10k]="p99_ms:le:1 broker_cpu_us_per_op:info:-"
CASE_ARGS[idle-10k]="--scenario idle-conns --clients 10000 --duration 5"
CASE_METRICS[idle-10k]="bytes_per_conn:le:1"
# The same with one subscription per connection (a topic of its own).
CASE_ARGS[idle-10k-sub]="--scenario idle-conns --clients 10000 --duration 5 --subscribe"
CASE_METRICS[idle-10k-sub]="bytes_per_conn:le:1"
# The same with a user name and password on every connection: both brokers
# refuse anonymous clients and check a password file (one user, $7$ hash).
CASE_ARGS[idle-10k-auth]="--scenario idle-conns --clients 10000 --duration 5 --username bench --password bench-pw"
CASE_METRICS[idle-10k-auth]="bytes_per_conn:le:1"
# Connection rate with two tool threads: with one, the tool spends ~130 us of
# CPU per connection here (more than either broker) and is itself the
# bottleneck at 85-92% of its core against both, so the figure measured the
# tool (docs/BENCHMARKS.md, session 8). conn-rate-10k-t1 keeps the
# single-threaded figure for comparison, without a target.
CASE_ARGS[conn-rate-10k]="--scenario conn-rate --clients 10000"
CASE_METRICS[conn-rate-10k]="conn_per_s:ge:1 broker_cpu_us_per_op:info:-"
CASE_THREADS[conn-rate-10k]=2
CASE_ARGS[conn-rate-10k-t1]="--scenario conn-rate --clients 10000"
CASE_METRICS[conn-rate-10k-t1]="conn_per_s:info:- broker_cpu_us_per_op:info:-"
CASES=${CASES:-$ALL_CASES}

for c in $CASES; do
  [[ -n "${CASE_ARGS[$c]:-}" ]] || { echo "unknown case '$c' (known: $ALL_CASES)" >&2; exit 2; }
done
case " $BROKERS " in
  " raftmq mosquitto " | " mosquitto raftmq ") order="raftmq mosquitto mosquitto raftmq" ;;
  " raftmq " | " mosquitto ") order=${BROKERS// /} ;;
  *) echo "BROKERS must be 'raftmq mosquitto', 'raftmq' or 'mosquitto'" >&2; exit 2 ;;
esac
if [[ " $order " == *" raftmq "* || "$BENCH_CMD" == "$RAFTMQ_BIN bench" ]]; then
  [[ -x "$RAFTMQ_BIN" ]] || { echo "no raftmq binary at $RAFTMQ_BIN (cargo build --release)" >&2; exit 2; }
fi
if [[ " $order " == *" mosquitto "* ]]; then
  [[ -x "$MOSQUITTO_BIN" ]] || { echo "no mosquitto at $MOSQUITTO_BIN (apt-get install -y mosquitto)" >&2; exit 2; }
fi

broker_pid=""
cleanup() {
  if [[ -n "$broker_pid" ]] && kill -0 "$broker_pid" 2>/dev/null; then
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports for the brokers come from below the kernel's ephemeral range: the
# thousands of client connections (and their TIME_WAIT leftovers) of the
# connection cases occupy ports inside it, and a listener cannot bind those.
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

# Waits until something listens on the port (10 s), or the broker died.
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

# Connections tracked by netfilter (each closed loopback connection stays in
# the table for nf_conntrack_tcp_timeout_time_wait, 120 s). A full table drops
# SYNs, which the client retransmits after 1 s: runs back to back (10,000
# connections each) filled it and gave one broker or the other p99 handshakes
# of 1,000 ms. Before each run, wait (3 minutes at most) until there is room
# for 50,000 more.
wait_conntrack_room() {
  local count_file=/proc/sys/net/netfilter/nf_conntrack_count max_file=/proc/sys/net/netfilter/nf_conntrack_max
  [[ -r $count_file && -r $max_file ]] || return 0
  local max count i waited=0
  max=$(<"$max_file")
  for ((i = 0; i < 180; i++)); do
    count=$(<"$count_file")
    ((count + 50000 <= max)) && break
    waited=1
    sleep 1
  done
  if ((waited)); then echo "waited for room in the conntrack table ($count of $max entries)" >&2; fi
}

stop_broker() {
  cleanup
  broker_pid=""
}

# Cases whose brokers require a user name and password (see idle-10k-auth).
needs_auth() { [[ $1 == *-auth ]]; }

write_password_file() {
  "$RAFTMQ_BIN" passwd bench bench-pw >"$1/passwd"
}

start_mosquitto() {
  local port=$1 dir=$2 auth=${3:-} anonymous=true
  if [[ -n "$auth" ]]; then
    write_password_file "$dir"
    anonymous="false
password_file $dir/passwd"
  fi
  cat >"$dir/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous $anonymous
persistence false
log_dest stderr
log_type error
max_queued_messages 1000000
CONF
  "${rt[@]}" "$MOSQUITTO_BIN" -c "$dir/mosquitto.conf" 2>"$dir/broker.log" &
  broker_pid=$!
}

start_raftmq() {
  local port=$1 dir=$2 auth=${3:-} admin
  local -a auth_env=()
  admin=$(free_port)
  mkdir -p "$dir/data"
  if [[ -n "$auth" ]]; then
    write_password_file "$dir"
    auth_env=(RAFTMQ_MQTT__ALLOW_ANONYMOUS=false "RAFTMQ_MQTT__PASSWORD_FILE=$dir/passwd")
  fi
  # Same queue allowance as the Mosquitto configuration above (max_queued_messages
  # 1000000), so neither broker drops messages for a subscriber in a burst.
  env "${auth_env[@]}" RAFTMQ_MQTT__OUTBOX_CAPACITY=1000000 RAFTMQ_MQTT__MAX_QUEUED_MESSAGES=1000000 \
  "${rt[@]}" "$RAFTMQ_BIN" serve --mqtt-listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --data-dir "$dir/data" 2>"$dir/broker.log" >/dev/null &
  broker_pid=$!
}

run_one() {
  local case=$1 broker=$2 n=$3 dir port line
  dir=$OUT/$case-$broker-$n
  mkdir -p "$dir"
  local attempt started=0
  # A port can still be taken between the check and the bind: retry on another.
  wait_conntrack_room
  for attempt in 1 2 3; do
    port=$(free_port)
    "start_$broker" "$port" "$dir" "$(needs_auth "$case" && echo auth)"
    if wait_listening "$port" "$broker_pid"; then
      started=1
      break
    fi
    stop_broker
    cp "$dir/broker.log" "$dir/broker.log.$attempt" 2>/dev/null || true
  done
  if ((!started)); then
    echo "case=$case broker=$broker RESULT failed (broker did not start, see $dir/broker.log)" | tee -a "$results"
    return 0
  fi
  # shellcheck disable=SC2086 # BENCH_CMD and CASE_ARGS hold several words on purpose
  if "${rt[@]}" $BENCH_CMD --host 127.0.0.1 --port "$port" --broker-pid "$broker_pid" --threads "${CASE_THREADS[$case]:-1}" \
    --timeout "$BENCH_TIMEOUT" ${CASE_ARGS[$case]} >"$dir/bench.out" 2>"$dir/bench.err"; then
    line=$(grep '^RESULT ' "$dir/bench.out" | tail -n 1)
  else
    line="RESULT failed (see $dir/bench.err)"
  fi
  stop_broker
  echo "case=$case broker=$broker $line" | tee -a "$results"
}

n=0
for case in $CASES; do
  for ((r = 0; r < ROUNDS; r++)); do
    for broker in $order; do
      run_one "$case" "$broker" "$n"
      n=$((n + 1))
    done
  done
done

echo
echo "Medians per broker; ratio = raftmq / mosquitto (raw lines: $results)"
for case in $CASES; do
  for spec in ${CASE_METRICS[$case]}; do
    IFS=: read -r metric cmp goal <<<"$spec"
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
        line = sprintf("%-15s %-22s raftmq=%-26s mosquitto=%-26s", case, metric, rs, ms)
        if (!nr || !nm || m == 0) { print line " ratio=-"; exit }
        ratio = r / m
        verdict = ""
        if (cmp == "le") verdict = (ratio <= goal) ? "target <= " goal ": met" : "target <= " goal ": NOT met"
        if (cmp == "ge") verdict = (ratio >= goal) ? "target >= " goal ": met" : "target >= " goal ": NOT met"
        printf "%s ratio=%.3f  %s\n", line, ratio, verdict
      }' "$results"
  done
done
