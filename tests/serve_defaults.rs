//! `raftmq serve` with no configuration at all is a working broker bound to
//! localhost (MQTT 127.0.0.1:1883, admin 127.0.0.1:8080, data in ./data).
//!
//! The default ports may be taken on a shared machine, so the check runs in a
//! private network namespace (its own loopback), made with `unshare`.

use std::process::Command;

const SCRIPT: &str = r#"
set -eu
ip link set lo up
"$RAFTMQ" serve > serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
deadline=$(( $(date +%s) + 30 ))
# Wait (with a deadline) until the broker acknowledges a QoS 1 publish.
until mosquitto_pub -h 127.0.0.1 -p 1883 -t probe -m up -q 1 -r 2>/dev/null; do
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "broker did not come up"; cat serve.log; exit 1; fi
  sleep 0.05
done
got=$(mosquitto_sub -h 127.0.0.1 -p 1883 -t probe -C 1 -W 5)
[ "$got" = "up" ] || { echo "retained message: got '$got'"; exit 1; }
exec 3<>/dev/tcp/127.0.0.1/8080
printf 'GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
head -n 1 <&3 | grep -q ' 200 ' || { echo "/health/live is not 200"; exit 1; }
# Bound to localhost only, as Mosquitto 2 does without configuration.
listening=$(ss -ltnH)
echo "$listening" | grep -q '127.0.0.1:1883' || { echo "not on 127.0.0.1:1883: $listening"; exit 1; }
echo "$listening" | grep -q '127.0.0.1:8080' || { echo "not on 127.0.0.1:8080: $listening"; exit 1; }
if echo "$listening" | grep -Eq '(0\.0\.0\.0|\*|\[::\]):(1883|8080)'; then echo "listens beyond localhost: $listening"; exit 1; fi
[ -d data ] || { echo "no ./data folder"; exit 1; }
echo ok
"#;

#[test]
fn serve_with_no_configuration_is_a_localhost_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = running_as_root();
    let mut cmd = Command::new("unshare");
    // As root a plain network namespace; otherwise a user namespace makes it possible.
    if root {
        cmd.arg("-n");
    } else {
        cmd.arg("-rn");
    }
    let out = cmd
        .args(["bash", "-c", SCRIPT])
        .current_dir(dir.path())
        .env("RAFTMQ", env!("CARGO_BIN_EXE_raftmq"))
        .env_remove("RAFTMQ_DATA_DIR")
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout.trim_end().lines().last(), Some("ok"), "stdout:\n{stdout}");
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
