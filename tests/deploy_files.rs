//! The shipped deployment files are valid as shipped: every HAProxy
//! configuration passes `haproxy -c` (HAProxy from Debian, installed by
//! tests/run.sh), and the container, Kubernetes and Grafana files parse.
//! These are offline checks; tests/haproxy.rs runs the configurations.

mod cluster;
mod lb;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lb::haproxy_bin;
use raftmq::config::{Config, Overrides};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        panic!("cannot read {}", dir.display());
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_with_ext(&p, ext));
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn every_haproxy_configuration_passes_haproxy_check() {
    let bin = haproxy_bin();
    let mut files = files_with_ext(&root().join("haproxy"), "cfg");
    files.extend(files_with_ext(&root().join("deploy"), "cfg"));
    let names: Vec<String> =
        files.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into()).collect();
    for expected in ["full-sync.cfg", "dynsec-sync.cfg"] {
        assert!(names.iter().any(|n| n == expected), "haproxy/{expected} is missing (found {names:?})");
    }
    for f in &files {
        let out = Command::new(&bin).arg("-c").arg("-f").arg(f).output();
        let out = match out {
            Ok(o) => o,
            Err(e) => panic!("run {} -c: {e}", bin.display()),
        };
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "haproxy -c -f {} failed:\n{text}", f.display());
        // A warning usually means a misspelt or ignored keyword. The compose
        // file names servers by container name, which resolve only inside
        // Docker (`init-addr ... none` lets HAProxy start without them).
        let warnings: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("[WARNING]") && !l.contains("could not resolve address"))
            .collect();
        assert!(warnings.is_empty(), "haproxy -c -f {} warns:\n{text}", f.display());
    }
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    match std::fs::read_to_string(&p) {
        Ok(s) => s,
        Err(e) => panic!("read {}: {e}", p.display()),
    }
}

/// Loads a node configuration the way `raftmq serve --config` does.
fn load_config(text: &str) -> Config {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("raftmq.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write: {e}"));
    match Config::load(Some(&path), &Overrides::default()) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{text}"),
    }
}

#[test]
fn docker_compose_file_and_its_node_configurations_are_valid() {
    for i in 1..=3u64 {
        let c = load_config(&read(&format!("deploy/compose/node{i}.toml")));
        assert_eq!(c.node_id, i);
        assert_eq!(c.cluster.nodes.len(), 3);
        assert_eq!(c.admin.listen.port(), 8080, "HAProxy checks port 8080");
        assert_eq!(c.listeners[0].bind.port(), 1883);
    }
    let compose = read("deploy/docker-compose.yml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&compose).unwrap_or_else(|e| panic!("YAML: {e}"));
    let services = doc.get("services").and_then(|s| s.as_mapping()).expect("services");
    let names: BTreeSet<String> = services.keys().filter_map(|k| k.as_str()).map(str::to_string).collect();
    assert_eq!(names, ["haproxy", "raftmq1", "raftmq2", "raftmq3"].map(String::from).into());
    // Docker's own check of the file, with whichever Compose is installed.
    let tools: [(&str, &[&str]); 2] = [("docker", &["compose"]), ("docker-compose", &[])];
    let mut checked = false;
    for (bin, pre) in tools {
        let probe = Command::new(bin).args(pre).arg("version").output();
        if !probe.is_ok_and(|o| o.status.success()) {
            continue;
        }
        let out = Command::new(bin)
            .args(pre)
            .args(["-f"])
            .arg(root().join("deploy/docker-compose.yml"))
            .args(["config", "-q"])
            .output()
            .unwrap_or_else(|e| panic!("{bin}: {e}"));
        assert!(
            out.status.success(),
            "{bin} {pre:?} config -q: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked = true;
        break;
    }
    if !checked {
        eprintln!("NOT CHECKED by Docker: neither `docker compose` nor `docker-compose` is installed");
    }
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.lines().any(|l| l.trim() == "FROM debian:bookworm-slim"), "{dockerfile}");
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        let src = line.split_whitespace().nth(1).unwrap_or_default();
        if src != "target/release/raftmq" {
            assert!(root().join(src).exists(), "Dockerfile copies {src}, which does not exist");
        }
    }
}

fn yaml_docs(rel: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn get<'a>(v: &'a serde_yaml::Value, path: &str) -> &'a serde_yaml::Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(key),
        }
        .unwrap_or_else(|| panic!("no {path} (at {key}) in {v:?}"));
    }
    cur
}

#[test]
fn kubernetes_manifests_parse_and_wire_the_cluster() {
    let docs = yaml_docs("deploy/kubernetes/raftmq.yaml");
    let kind = |k: &str| -> Vec<&serde_yaml::Value> {
        docs.iter().filter(|d| d.get("kind").and_then(|x| x.as_str()) == Some(k)).collect()
    };
    let sts = kind("StatefulSet");
    assert_eq!(sts.len(), 1);
    let sts = sts[0];
    let pod = get(sts, "spec.template.spec");
    let container = get(pod, "containers.0");
    assert_eq!(get(container, "readinessProbe.httpGet.path").as_str(), Some("/health/leader"));
    assert_eq!(get(container, "livenessProbe.httpGet.path").as_str(), Some("/health/live"));
    assert!(get(pod, "terminationGracePeriodSeconds").as_u64().is_some_and(|s| s >= 10));
    assert_eq!(get(sts, "spec.podManagementPolicy").as_str(), Some("Parallel"));
    assert_eq!(get(sts, "spec.volumeClaimTemplates.0.metadata.name").as_str(), Some("data"));
    let headless = get(sts, "spec.serviceName").as_str().expect("serviceName");
    let services = kind("Service");
    let hs = services
        .iter()
        .find(|s| get(s, "metadata.name").as_str() == Some(headless))
        .expect("the headless service");
    assert_eq!(get(hs, "spec.clusterIP").as_str(), Some("None"));
    assert_eq!(get(hs, "spec.publishNotReadyAddresses").as_bool(), Some(true));
    let ports: Vec<u64> = get(hs, "spec.ports")
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p.get("port").and_then(|x| x.as_u64()))
        .collect();
    assert!(ports.contains(&7800), "{ports:?}");
    assert!(services.iter().any(|s| get(s, "metadata.name").as_str() == Some("raftmq")));
    assert_eq!(kind("PodDisruptionBudget").len(), 1);
    // The configuration every pod loads, with the node id the start command
    // derives from the pod ordinal (RAFTMQ_NODE_ID = ordinal + 1).
    let cm = kind("ConfigMap");
    let toml = get(cm[0], "data").get("raftmq.toml").and_then(|t| t.as_str()).expect("raftmq.toml");
    for id in 1..=3u64 {
        let c = load_config(&format!("node_id = {id}\n{toml}"));
        let me = c.cluster.nodes.iter().find(|n| n.id == id).expect("listed");
        assert_eq!(me.cluster_addr, format!("raftmq-{}.{headless}:7800", id - 1));
    }
    let command = get(container, "command").as_sequence().expect("command");
    let script = command.last().and_then(|x| x.as_str()).unwrap_or_default();
    assert!(script.contains("RAFTMQ_NODE_ID") && script.contains("exec "), "{script}");
}

#[test]
fn systemd_unit_verifies() {
    let unit = read("deploy/systemd/raftmq.service");
    for needed in
        ["[Unit]", "[Service]", "[Install]", "KillSignal=SIGTERM", "ExecStart=/usr/local/bin/raftmq serve"]
    {
        assert!(unit.contains(needed), "raftmq.service lacks {needed}");
    }
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("NOT CHECKED by systemd: systemd-analyze is not installed");
        return;
    };
    assert!(probe.status.success());
    // verify needs the binary to exist: point ExecStart at the one under test.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("raftmq.service");
    let text = unit.replace("/usr/local/bin/raftmq", env!("CARGO_BIN_EXE_raftmq"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write: {e}"));
    let out =
        Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap_or_else(|e| panic!("{e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn keepalived_tracks_the_leader_health() {
    let conf = read("deploy/keepalived/keepalived.conf");
    assert!(conf.contains("/health/leader"), "the track script asks /health/leader");
    for needed in ["vrrp_script", "track_script", "virtual_ipaddress", "vrrp_version 3"] {
        assert!(conf.contains(needed), "keepalived.conf lacks {needed}");
    }
    let opens = conf.matches('{').count();
    assert_eq!(opens, conf.matches('}').count(), "unbalanced braces");
}

/// Metric names a PromQL expression uses (histogram series by base name).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("raftmq_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        out.push(base.to_string());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_uses_only_metrics_a_node_exports() {
    let text = read("deploy/grafana/raftmq-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("JSON: {e}"));
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 20, "only {} queries", all.len());
    let used: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();

    let c = cluster::Cluster::start(&cluster::Opts::three().nodes(1)).await;
    c.leader(Duration::from_secs(20)).await;
    let (code, body) = cluster::http_get(c.node(1).admin, "/metrics").await.expect("/metrics");
    assert_eq!(code, 200);
    let exported: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics no node exports: {unknown:?}");
    // And it shows the essentials.
    for m in ["raftmq_raft_serving", "raftmq_clients_connected", "raftmq_raft_commit_latency_seconds"] {
        assert!(used.contains(m), "the dashboard does not show {m}");
    }
}
