//! `raftmq local-cluster --nodes N --dir DIR [--base-port P]`: N real node
//! processes on loopback, so a newcomer can try a cluster and failover with
//! one command.
//!
//! Node i (1..=N) gets MQTT on P+i-1, admin HTTP on P+100+i-1 and cluster
//! traffic on P+200+i-1 (default P = 21883), its data in DIR/node-i and its
//! configuration in DIR/node-i/raftmq.toml (the static list of all N nodes),
//! its log in DIR/node-i/raftmq.log and its process id in DIR/node-i/raftmq.pid.
//! Each node is this same binary running `serve --config`. A node that dies
//! is reported and the others keep running (kill one to try failover; bring
//! it back with `raftmq serve --config DIR/node-i/raftmq.toml`). SIGINT or
//! SIGTERM stops them all (SIGTERM to each, then SIGKILL after a grace time).
//!
//! Owns only the process supervision and the files it writes; the nodes
//! themselves know nothing of it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use tokio::process::{Child, Command};

/// Default base port: MQTT 21883.., admin 21983.., cluster 22083...
pub const DEFAULT_BASE_PORT: u16 = 21883;
/// Largest N: the three port ranges (100 apart) must not overlap.
pub const MAX_NODES: u16 = 99;
/// How long stopping nodes may take before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct LocalClusterArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Folder for the nodes' configurations, data and logs (created if needed).
    #[arg(long)]
    pub dir: PathBuf,
    /// MQTT port of node 1; admin ports start at +100, cluster ports at +200.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    pub base_port: u16,
}

#[derive(thiserror::Error, Debug)]
pub enum LocalClusterError {
    #[error("--nodes must be between 1 and {MAX_NODES}")]
    Nodes,
    #[error("--base-port {0} leaves no room for the admin and cluster ports (the highest must be <= 65535)")]
    Ports(u16),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} holds a cluster with another layout (its nodes keep their addresses in their data): \
         use the same --nodes and --base-port as before, or another --dir"
    )]
    OtherLayout { path: PathBuf },
    #[error("cannot find this program to start the nodes: {0}")]
    Exe(std::io::Error),
    #[error("cannot start node {id}: {source}")]
    Spawn { id: u16, source: std::io::Error },
    #[error("cannot start the runtime or the signal handlers: {0}")]
    Runtime(std::io::Error),
}

/// One node of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub id: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub mqtt: String,
    pub admin: String,
    pub cluster: String,
}

/// The nodes for `args` (no files touched). `dir` should be absolute.
pub fn plan(nodes: u16, dir: &Path, base_port: u16) -> Result<Vec<NodePlan>, LocalClusterError> {
    if nodes == 0 || nodes > MAX_NODES {
        return Err(LocalClusterError::Nodes);
    }
    let highest = u32::from(base_port) + 200 + u32::from(nodes) - 1;
    if base_port == 0 || highest > u32::from(u16::MAX) {
        return Err(LocalClusterError::Ports(base_port));
    }
    Ok((1..=nodes)
        .map(|i| {
            let port = |offset: u16| format!("127.0.0.1:{}", base_port + offset + i - 1);
            let node_dir = dir.join(format!("node-{i}"));
            NodePlan {
                id: i,
                config: node_dir.join("raftmq.toml"),
                dir: node_dir,
                mqtt: port(0),
                admin: port(100),
                cluster: port(200),
            }
        })
        .collect())
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The configuration file of `node` in a cluster of `all`.
pub fn config_text(node: &NodePlan, all: &[NodePlan]) -> String {
    let mut t = String::new();
    let _ =
        writeln!(t, "# Written by `raftmq local-cluster`: node {} of {} on loopback.", node.id, all.len());
    let _ = writeln!(t, "# Start this node alone with: raftmq serve --config {}", node.config.display());
    let _ = writeln!(t, "node_id = {}", node.id);
    let _ = writeln!(t, "data_dir = {}", toml_str(&node.dir.to_string_lossy()));
    let _ =
        writeln!(t, "\n[[listeners]]\nname = \"default\"\nkind = \"tcp\"\nbind = {}", toml_str(&node.mqtt));
    let _ = writeln!(t, "\n[admin]\nlisten = {}", toml_str(&node.admin));
    let _ = writeln!(t, "\n[cluster]\nlisten = {}\nnodes = [", toml_str(&node.cluster));
    for n in all {
        let _ = writeln!(
            t,
            "  {{ id = {}, cluster_addr = {}, mqtt_addr = {}, admin_addr = {} }},",
            n.id,
            toml_str(&n.cluster),
            toml_str(&n.mqtt),
            toml_str(&n.admin)
        );
    }
    t.push_str("]\n");
    t
}

/// Creates the folders and writes every node's configuration. A folder used
/// before keeps its data, so it must be for the same layout.
pub fn write_configs(nodes: &[NodePlan]) -> Result<(), LocalClusterError> {
    for n in nodes {
        if let Ok(old) = std::fs::read_to_string(&n.config) {
            if old != config_text(n, nodes) {
                return Err(LocalClusterError::OtherLayout { path: n.dir.clone() });
            }
        }
    }
    for n in nodes {
        std::fs::create_dir_all(&n.dir)
            .map_err(|source| LocalClusterError::Write { path: n.dir.clone(), source })?;
        std::fs::write(&n.config, config_text(n, nodes))
            .map_err(|source| LocalClusterError::Write { path: n.config.clone(), source })?;
    }
    Ok(())
}

/// The table printed at start.
pub fn format_table(nodes: &[NodePlan]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.mqtt.clone(),
                n.admin.clone(),
                n.cluster.clone(),
                n.config.display().to_string(),
            ]
        })
        .collect();
    crate::ctl::table(&["NODE", "MQTT", "ADMIN", "CLUSTER", "CONFIG"], &rows)
}

/// Runs the command until SIGINT/SIGTERM.
pub fn run(args: LocalClusterArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("raftmq local-cluster: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: LocalClusterArgs) -> Result<ExitCode, LocalClusterError> {
    std::fs::create_dir_all(&args.dir)
        .map_err(|source| LocalClusterError::Write { path: args.dir.clone(), source })?;
    let dir = std::fs::canonicalize(&args.dir)
        .map_err(|source| LocalClusterError::Write { path: args.dir.clone(), source })?;
    let nodes = plan(args.nodes, &dir, args.base_port)?;
    write_configs(&nodes)?;
    let exe = std::env::current_exe().map_err(LocalClusterError::Exe)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LocalClusterError::Runtime)?;
    runtime.block_on(supervise(exe, nodes, dir))
}

fn spawn_node(exe: &Path, n: &NodePlan) -> Result<Child, LocalClusterError> {
    let log_path = n.dir.join("raftmq.log");
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| LocalClusterError::Write { path: log_path.clone(), source })
    };
    let child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&n.config)
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| LocalClusterError::Spawn { id: n.id, source })?;
    if let Some(pid) = child.id() {
        let pid_path = n.dir.join("raftmq.pid");
        std::fs::write(&pid_path, format!("{pid}\n"))
            .map_err(|source| LocalClusterError::Write { path: pid_path, source })?;
    }
    Ok(child)
}

async fn supervise(exe: PathBuf, nodes: Vec<NodePlan>, dir: PathBuf) -> Result<ExitCode, LocalClusterError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(LocalClusterError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(LocalClusterError::Runtime)?;

    let mut children: Vec<Option<Child>> = Vec::with_capacity(nodes.len());
    for n in &nodes {
        match spawn_node(&exe, n) {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop_all(&mut children).await;
                return Err(e);
            }
        }
    }
    let first_admin = nodes.first().map(|n| n.admin.clone()).unwrap_or_default();
    println!("raftmq local cluster: {} nodes in {} (Ctrl-C stops them all)\n", nodes.len(), dir.display());
    print!("{}", format_table(&nodes));
    println!("\nLogs: {}/node-N/raftmq.log", dir.display());
    println!("Status: raftmq ctl --url http://{first_admin} status");
    println!(
        "Kill a node to try failover; bring it back with: raftmq serve --config {}/node-N/raftmq.toml",
        dir.display()
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    loop {
        if children.iter().all(Option::is_none) {
            println!("every node has stopped");
            return Ok(ExitCode::FAILURE);
        }
        let waits = children
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| c.as_mut().map(|c| Box::pin(async move { (i, c.wait().await) })));
        let exited = tokio::select! {
            ((i, status), _, _) = futures_util::future::select_all(waits) => (i, status),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let (i, status) = exited;
        let id = nodes[i].id;
        match status {
            Ok(s) => println!(
                "node {id} exited ({s}); the others keep running. Restart it with: raftmq serve --config {}",
                nodes[i].config.display()
            ),
            Err(e) => println!("node {id}: cannot wait for its process: {e}"),
        }
        let _ = std::io::stdout().flush();
        children[i] = None;
    }
    println!("stopping {} nodes", children.iter().filter(|c| c.is_some()).count());
    stop_all(&mut children).await;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM to every running child, then SIGKILL to those still running after
/// [`STOP_GRACE`].
async fn stop_all(children: &mut [Option<Child>]) {
    for c in children.iter().flatten() {
        if let Some(pid) = c.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    for c in children.iter_mut() {
        if let Some(child) = c {
            if tokio::time::timeout_at(deadline, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        *c = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    #[test]
    fn ports_follow_the_documented_layout() {
        let p = plan(3, Path::new("/x"), DEFAULT_BASE_PORT).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].mqtt.as_str(), p[0].admin.as_str(), p[0].cluster.as_str()),
            ("127.0.0.1:21883", "127.0.0.1:21983", "127.0.0.1:22083")
        );
        assert_eq!(
            (p[2].mqtt.as_str(), p[2].admin.as_str(), p[2].cluster.as_str()),
            ("127.0.0.1:21885", "127.0.0.1:21985", "127.0.0.1:22085")
        );
        assert_eq!(p[1].config, PathBuf::from("/x/node-2/raftmq.toml"));
        assert!(matches!(plan(0, Path::new("/x"), 1000), Err(LocalClusterError::Nodes)));
        assert!(matches!(plan(100, Path::new("/x"), 1000), Err(LocalClusterError::Nodes)));
        assert!(matches!(plan(3, Path::new("/x"), 65400), Err(LocalClusterError::Ports(_))));
    }

    #[test]
    fn written_configuration_loads_as_that_node() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = plan(3, &dir.path().join("with \"quote"), 30000).unwrap();
        write_configs(&nodes).unwrap();
        let cfg = Config::load(Some(&nodes[1].config), &Overrides::default()).unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.data_dir, nodes[1].dir);
        assert_eq!(cfg.listeners.len(), 1);
        assert_eq!(cfg.listeners[0].bind.to_string(), "127.0.0.1:30001");
        assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:30101");
        assert_eq!(cfg.cluster.listen, "127.0.0.1:30201");
        assert_eq!(cfg.cluster.node_id, 2);
        let ids: Vec<u64> = cfg.cluster.nodes.iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(cfg.cluster.nodes[2].admin_addr, "127.0.0.1:30102");
        assert_eq!(cfg.cluster.nodes[0].mqtt_addr, "127.0.0.1:30000");
        assert!(!cfg.cluster.join);
        cfg.cluster.validate().unwrap();

        // Same layout again: fine (a restart of the demo keeps its data); another: refused.
        write_configs(&nodes).unwrap();
        let other = plan(3, &dir.path().join("with \"quote"), 30010).unwrap();
        assert!(matches!(write_configs(&other), Err(LocalClusterError::OtherLayout { .. })));
    }

    #[test]
    fn table_lists_every_node() {
        let nodes = plan(2, Path::new("/d"), DEFAULT_BASE_PORT).unwrap();
        let t = format_table(&nodes);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE  MQTT"));
        assert!(lines[2].contains("127.0.0.1:21884") && lines[2].contains("/d/node-2/raftmq.toml"));
    }
}
