#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine of the project's kind (Debian + Rust):
# installs the Debian packages the tests drive (Mosquitto's clients and broker,
# iproute2 for private network namespaces, HAProxy), checks formatting and lints, then
# runs every test. README.md and .ci/run use exactly this command.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# HAProxy in front of a cluster (tests/haproxy.rs, tests/deploy_files.rs); Debian puts it in /usr/sbin.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "tests/run.sh: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
