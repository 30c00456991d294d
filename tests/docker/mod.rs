//! Docker for the tests: images built from our own binary (no image can be
//! pulled here: the binary and the shared libraries `ldd` lists are packed
//! into a root file system and `docker import`ed), private networks with
//! fixed subnets, and an [`Env`] that removes everything on drop (and prints
//! the containers' logs when the test failed). Used by tests/cluster_docker.rs
//! and tests/haproxy.rs.
//!
//! Convention (tests/cluster_docker.rs): a test skips with a SKIPPED line on
//! stderr only when `docker info` fails (no Docker daemon on this machine).
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs a command; Ok(stdout) on success, Err(stderr and status) otherwise.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(format!("{cmd:?}: {}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

pub fn docker(args: &[&str]) -> Result<String, String> {
    run(Command::new("docker").args(args))
}

pub fn must(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Everything the test created in Docker, removed on drop.
pub struct Env {
    pub prefix: String,
    pub image: Option<String>,
    pub networks: Vec<String>,
    pub containers: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.containers {
                eprintln!("---- docker logs {c} (last 80 lines) ----");
                if let Ok(o) = Command::new("docker").args(["logs", "--tail", "80", c]).output() {
                    eprintln!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                }
            }
        }
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
        if let Some(i) = &self.image {
            let _ = docker(&["rmi", "-f", i]);
        }
    }
}

/// Packs the raftmq binary (stripped) and its shared libraries into a root
/// file system and imports it as an image.
pub fn build_image(env: &mut Env) {
    let root = env.dir.path().join("rootfs");
    for d in ["data", "tmp", "etc"] {
        must(std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string()).map(|_| String::new()));
    }
    let bin = env!("CARGO_BIN_EXE_raftmq");
    let dest = root.join("raftmq");
    // Stripped, the debug binary is a tenth of its size: a quicker import.
    if run(Command::new("strip").arg("-o").arg(&dest).arg(bin)).is_err() {
        must(std::fs::copy(bin, &dest).map_err(|e| e.to_string()).map(|_| String::new()));
    }
    let libs = must(run(Command::new("ldd").arg(bin)));
    for lib in libs.split_whitespace().filter(|w| w.starts_with('/')) {
        let target = root.join(lib.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            must(std::fs::create_dir_all(parent).map_err(|e| e.to_string()).map(|_| String::new()));
        }
        // Copy the file a symlink points to, under the link's name.
        must(std::fs::copy(lib, &target).map_err(|e| format!("copy {lib}: {e}")).map(|_| String::new()));
    }
    must(
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/raftmq\n")
            .map_err(|e| e.to_string())
            .map(|_| String::new()),
    );
    let image = format!("{}:test", env.prefix);
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("tar: {e}"));
    let Some(tar_out) = tar.stdout.take() else { panic!("tar has no stdout") };
    env.image = Some(image.clone());
    let out = Command::new("docker")
        .args(["import", "-c", "ENTRYPOINT [\"/raftmq\"]", "-", &image])
        .stdin(Stdio::from(tar_out))
        .output()
        .unwrap_or_else(|e| panic!("docker import: {e}"));
    let tar_status = tar.wait().unwrap_or_else(|e| panic!("tar: {e}"));
    assert!(tar_status.success(), "tar of the root file system: {tar_status}");
    assert!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
}

/// Creates a network with a /24 of our own, so containers get fixed
/// addresses (`--ip`), known before they start and kept across a reconnect.
/// Returns the address prefix ("10.213.X.").
pub fn create_net(env: &mut Env, suffix: &str) -> String {
    let name = format!("{}-{suffix}", env.prefix);
    let base = std::process::id() + env.networks.len() as u32 * 101;
    for k in 0..40 {
        let x = (base + k * 7) % 250 + 2;
        let subnet = format!("10.213.{x}.0/24");
        if docker(&["network", "create", "--subnet", &subnet, &name]).is_ok() {
            env.networks.push(name);
            return format!("10.213.{x}.");
        }
    }
    panic!("could not create network {name} (every subnet tried overlaps)");
}

impl Env {
    /// An empty environment whose Docker objects are named `raftmq-it-PID-XXXX...`.
    pub fn new() -> Env {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Env {
            prefix: format!("raftmq-it-{}-{nanos:x}", std::process::id()),
            image: None,
            networks: vec![],
            containers: vec![],
            dir,
        }
    }
}

/// False (after printing why) when there is no Docker daemon.
pub fn available() -> bool {
    match docker(&["info"]) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: docker info failed (no Docker daemon): {e}");
            false
        }
    }
}

/// A node's configuration: MQTT on :1883, admin on :8080, Raft on :7800
/// of its cluster-network address; the static list of `nodes` (id, cluster
/// address, admin-network address).
pub fn node_config(id: u64, nodes: &[(u64, IpAddr, IpAddr)], election_timeout_max_ms: u64) -> String {
    let mut t = format!(
        "node_id = {id}\ndata_dir = \"/data\"\n\n[mqtt]\n\n[[listeners]]\nname = \"default\"\nkind = \"tcp\"\nbind = \"0.0.0.0:1883\"\n\n[admin]\nlisten = \"0.0.0.0:8080\"\n\n[cluster]\nlisten = \"0.0.0.0:7800\"\nelection_timeout_min_ms = 100\nelection_timeout_max_ms = {election_timeout_max_ms}\nheartbeat_ms = 50\n"
    );
    for (nid, cip, aip) in nodes {
        t.push_str(&format!(
            "\n[[cluster.nodes]]\nid = {nid}\ncluster_addr = \"{cip}:7800\"\nmqtt_addr = \"{aip}:1883\"\nadmin_addr = \"{aip}:8080\"\n"
        ));
    }
    t
}

pub fn write(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

/// Three nodes in containers of `image`, each on two networks the test
/// creates: the cluster network (Raft traffic, the one a test partitions)
/// and an admin network that stays connected, through which the host
/// reaches MQTT and the health endpoints. Containers are created (not
/// started) with fixed addresses, so the static node list is written before
/// they start. Returns the cluster network's name and (id, cluster address,
/// admin-network address) of each node; `env.containers[id - 1]` is node id.
pub fn start_three(
    env: &mut Env,
    image: &str,
    election_timeout_max_ms: u64,
) -> (String, Vec<(u64, IpAddr, IpAddr)>) {
    let cprefix = create_net(env, "cluster");
    let cnet = env.networks[env.networks.len() - 1].clone();
    let aprefix = create_net(env, "admin");
    let anet = env.networks[env.networks.len() - 1].clone();
    let mut nodes = Vec::new();
    let mut cfgs: Vec<PathBuf> = Vec::new();
    for id in 1..=3u64 {
        let name = format!("{}-n{id}", env.prefix);
        let cfg = env.dir.path().join(format!("node-{id}.toml"));
        write(&cfg, "");
        let cip = format!("{cprefix}{}", 10 + id);
        let aip = format!("{aprefix}{}", 10 + id);
        let mount = format!("{}:/raftmq.toml:ro", cfg.display());
        must(docker(&[
            "create",
            "--name",
            &name,
            "--hostname",
            &format!("n{id}"),
            "--network",
            &cnet,
            "--ip",
            &cip,
            "-v",
            &mount,
            "-e",
            "RUST_LOG=info",
            "-e",
            "NO_COLOR=1",
            image,
            "serve",
            "--config",
            "/raftmq.toml",
        ]));
        env.containers.push(name.clone());
        must(docker(&["network", "connect", "--ip", &aip, &anet, &name]));
        cfgs.push(cfg);
        let parse = |s: &str| -> IpAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
        nodes.push((id, parse(&cip), parse(&aip)));
    }
    for (i, cfg) in cfgs.iter().enumerate() {
        write(cfg, &node_config(i as u64 + 1, &nodes, election_timeout_max_ms));
    }
    for c in &env.containers {
        must(docker(&["start", c]));
    }
    (cnet, nodes)
}
