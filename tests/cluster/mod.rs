//! Harness of the cluster tests: N real `raftmq serve --config` processes on
//! loopback (MQTT, admin and cluster port per node), each with its own data
//! directory in a temp dir and a TOML file carrying the static node list.
//! Nodes can be started in any order, killed with SIGKILL and restarted with
//! the same configuration and data. Each node's stdout/stderr goes to a log
//! file, printed when a test fails; dropping the [`Cluster`] kills every node.
//!
//! Owns nothing of the broker: it only talks to it as a user would (MQTT, the
//! health endpoints). Every wait is "until a condition or a deadline".
#![allow(dead_code)]

#[path = "../common/http.rs"]
mod http;
pub mod mqtt;

pub use http::{wait_for, POLL};

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use mqtt::{Client, Conn, Pkt};

/// What `/health/*` answers (admin::NodeStatus); only the fields the tests read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub node_id: u64,
    pub role: String,
    pub leader_id: Option<u64>,
    pub leader_mqtt_addr: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub serving: bool,
}

/// Options of a test cluster.
#[derive(Clone, Debug)]
pub struct Opts {
    pub nodes: u64,
    /// Extra `key = value` lines of the [cluster] section.
    pub cluster: Vec<String>,
    /// Extra `key = value` lines of the [mqtt] section.
    pub mqtt: Vec<String>,
    /// Nodes beyond `nodes` (ids nodes+1..): configured with `join = true`
    /// and absent from the others' static list, to be added at run time.
    pub joiners: u64,
    /// Extra TOML appended to one node's file (after every other table):
    /// (node id, text).
    pub extra: Vec<(u64, String)>,
    /// Extra `key = value` lines of every node's MQTT [[listeners]] table.
    pub listener: Vec<String>,
    /// The nodes' log filter (`RUST_LOG`) instead of `RAFTMQ_TEST_LOG` / info.
    pub log: Option<String>,
}

impl Opts {
    pub fn three() -> Opts {
        Opts {
            nodes: 3,
            cluster: vec![],
            mqtt: vec![],
            joiners: 0,
            extra: vec![],
            listener: vec![],
            log: None,
        }
    }
    pub fn nodes(mut self, n: u64) -> Opts {
        self.nodes = n;
        self
    }
    pub fn listener(mut self, line: &str) -> Opts {
        self.listener.push(line.into());
        self
    }
    pub fn log(mut self, filter: &str) -> Opts {
        self.log = Some(filter.into());
        self
    }
    pub fn cluster(mut self, line: &str) -> Opts {
        self.cluster.push(line.into());
        self
    }
    pub fn mqtt(mut self, line: &str) -> Opts {
        self.mqtt.push(line.into());
        self
    }
    pub fn joiners(mut self, n: u64) -> Opts {
        self.joiners = n;
        self
    }
    pub fn extra(mut self, id: u64, text: &str) -> Opts {
        self.extra.push((id, text.into()));
        self
    }
}

/// One node process.
pub struct Node {
    pub id: u64,
    pub mqtt: SocketAddr,
    pub admin: SocketAddr,
    pub cluster: SocketAddr,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    log_filter: Option<String>,
}

/// Distinct free loopback ports, below the kernel's ephemeral range (so no
/// outgoing connection, of this or another process, takes one between the
/// choice and the node's bind), picked at random and all bound at once before
/// being released.
fn free_ports(n: usize) -> Vec<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768)
        .max(10_001);
    let mut held = Vec::new();
    for _ in 0..10_000 {
        if held.len() == n {
            break;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", rand::random_range(10_000..low))) {
            held.push(l);
        }
    }
    assert_eq!(held.len(), n, "no {n} free ports below {low}");
    held.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect()
}

fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

impl Cluster {
    /// Writes the configuration of every node; starts none.
    pub fn new(opts: &Opts) -> Cluster {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let total = opts.nodes + opts.joiners;
        let ports = free_ports(3 * total as usize);
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut nodes = Vec::new();
        for i in 0..total as usize {
            let id = i as u64 + 1;
            let node_dir = dir.path().join(format!("node-{id}"));
            if let Err(e) = std::fs::create_dir_all(&node_dir) {
                panic!("create {}: {e}", node_dir.display());
            }
            nodes.push(Node {
                id,
                mqtt: addr(ports[3 * i]),
                admin: addr(ports[3 * i + 1]),
                cluster: addr(ports[3 * i + 2]),
                config: node_dir.join("raftmq.toml"),
                data_dir: node_dir.join("data"),
                log: node_dir.join("node.log"),
                child: None,
            });
        }
        let entry = |n: &Node| {
            format!(
                "  {{ id = {}, cluster_addr = \"{}\", mqtt_addr = \"{}\", admin_addr = \"{}\" }},\n",
                n.id, n.cluster, n.mqtt, n.admin
            )
        };
        let initial: String = nodes.iter().filter(|n| n.id <= opts.nodes).map(entry).collect();
        let full: String = nodes.iter().map(entry).collect();
        for n in &nodes {
            let mut t = format!(
                "node_id = {}\ndata_dir = {}\n\n[mqtt]\n",
                n.id,
                toml_str(&n.data_dir.display().to_string())
            );
            for l in &opts.mqtt {
                t.push_str(l);
                t.push('\n');
            }
            t.push_str(&format!(
                "\n[[listeners]]\nname = \"default\"\nkind = \"tcp\"\nbind = \"{}\"\n",
                n.mqtt
            ));
            for l in &opts.listener {
                t.push_str(l);
                t.push('\n');
            }
            t.push_str(&format!("\n[admin]\nlisten = \"{}\"\n", n.admin));
            t.push_str(&format!("\n[cluster]\nlisten = \"{}\"\n", n.cluster));
            for l in &opts.cluster {
                t.push_str(l);
                t.push('\n');
            }
            if n.id > opts.nodes {
                t.push_str(&format!("join = true\nnodes = [\n{full}]\n"));
            } else {
                t.push_str(&format!("nodes = [\n{initial}]\n"));
            }
            for (id, text) in &opts.extra {
                if *id == n.id {
                    t.push('\n');
                    t.push_str(text);
                    t.push('\n');
                }
            }
            if let Err(e) = std::fs::write(&n.config, t) {
                panic!("write {}: {e}", n.config.display());
            }
        }
        Cluster { dir, nodes, log_filter: opts.log.clone() }
    }

    /// Runs `raftmq ctl --url http://ADMIN-of-`via` ARGS...`: (success, stdout + stderr).
    pub fn ctl(&self, via: u64, args: &[&str]) -> (bool, String) {
        let url = format!("http://{}", self.node(via).admin);
        let out = Command::new(env!("CARGO_BIN_EXE_raftmq"))
            .arg("ctl")
            .arg("--url")
            .arg(&url)
            .args(args)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => (
                o.status.success(),
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            ),
            Err(e) => (false, format!("spawn raftmq ctl: {e}")),
        }
    }

    /// [`Cluster::ctl`] without blocking the runtime (the command may wait for
    /// a catch-up or a leader change).
    pub async fn ctl_async(&self, via: u64, args: &[&str]) -> (bool, String) {
        let url = format!("http://{}", self.node(via).admin);
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_raftmq"))
            .arg("ctl")
            .arg("--url")
            .arg(&url)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await;
        match out {
            Ok(o) => (
                o.status.success(),
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            ),
            Err(e) => (false, format!("spawn raftmq ctl: {e}")),
        }
    }

    /// Waits until node `id` is the one serving leader.
    pub async fn wait_leader_is(&self, id: u64, timeout: Duration) {
        let ep = self.ep();
        wait_for(&format!("node {id} to be the serving leader"), timeout, || {
            let ep = ep.clone();
            async move {
                let mut serving = Vec::new();
                for &(n, _, _) in &ep.nodes {
                    if let Some((200, _)) = ep.health(n).await {
                        serving.push(n);
                    }
                }
                (serving == [id]).then_some(())
            }
        })
        .await;
    }

    /// Writes the configuration and starts every node (1..=N), waiting until
    /// each answers /health/live; does not wait for a leader.
    pub async fn start(opts: &Opts) -> Cluster {
        let mut c = Cluster::new(opts);
        for id in 1..=opts.nodes {
            c.spawn(id);
        }
        // Joiners are started by the test (Cluster::restart), not here.
        for id in 1..=opts.nodes {
            c.wait_live(id).await;
        }
        c
    }

    pub fn node(&self, id: u64) -> &Node {
        match self.nodes.iter().find(|n| n.id == id) {
            Some(n) => n,
            None => panic!("no node {id}"),
        }
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        match self.nodes.iter_mut().find(|n| n.id == id) {
            Some(n) => n,
            None => panic!("no node {id}"),
        }
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Starts node `id` (its log is appended to, so a restart keeps the history).
    pub fn spawn(&mut self, id: u64) {
        let filter = self
            .log_filter
            .clone()
            .unwrap_or_else(|| std::env::var("RAFTMQ_TEST_LOG").unwrap_or_else(|_| "info".into()));
        let n = self.node_mut(id);
        assert!(!n.running(), "node {id} is already running");
        let log = match std::fs::OpenOptions::new().create(true).append(true).open(&n.log) {
            Ok(f) => f,
            Err(e) => panic!("open {}: {e}", n.log.display()),
        };
        let log_err = match log.try_clone() {
            Ok(f) => f,
            Err(e) => panic!("clone log handle: {e}"),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_raftmq"))
            .arg("serve")
            .arg("--config")
            .arg(&n.config)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn();
        match child {
            Ok(c) => n.child = Some(c),
            Err(e) => panic!("spawn node {id}: {e}"),
        }
    }

    /// Restarts a stopped node with the same configuration and data, and waits
    /// until it answers /health/live.
    pub async fn restart(&mut self, id: u64) {
        self.spawn(id);
        self.wait_live(id).await;
    }

    /// SIGKILL (kill -9) and reap.
    pub fn kill9(&mut self, id: u64) {
        let n = self.node_mut(id);
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (graceful stop), then waits for the process to exit, at most
    /// `timeout`; returns its exit status. Panics if it is still running then.
    pub async fn sigterm(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        self.signal(id, "-TERM");
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.node_mut(id);
            if let Some(c) = n.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    n.child = None;
                    return status;
                }
            }
            if Instant::now() > deadline {
                panic!("node {id} still running {timeout:?} after SIGTERM");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn signal(&mut self, id: u64, sig: &str) {
        let Some(pid) = self.node_mut(id).child.as_ref().map(|c| c.id()) else {
            panic!("node {id} is not running");
        };
        match Command::new("kill").arg(sig).arg(pid.to_string()).status() {
            Ok(s) if s.success() => {}
            other => panic!("kill {sig} {pid}: {other:?}"),
        }
    }

    pub async fn wait_live(&mut self, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let admin = self.node(id).admin;
            if let Some((200, _)) = http_get(admin, "/health/live").await {
                return;
            }
            if !self.node_mut(id).running() {
                panic!("node {id} exited during start:\n{}", self.node(id).log_text());
            }
            if Instant::now() > deadline {
                panic!("node {id} not live within 20 s");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The addresses of every node, for tasks that connect while the test
    /// kills and restarts nodes.
    pub fn ep(&self) -> Endpoints {
        Endpoints { nodes: self.nodes.iter().map(|n| (n.id, n.mqtt, n.admin)).collect() }
    }

    pub async fn health(&self, id: u64) -> Option<(u16, Option<Status>)> {
        self.ep().health(id).await
    }

    pub async fn leader(&self, timeout: Duration) -> u64 {
        self.ep().leader(timeout).await
    }

    pub async fn leader_among(&self, ids: &[u64], timeout: Duration) -> u64 {
        self.ep().leader_among(ids, timeout).await
    }

    pub async fn settled(&self, ids: &[u64], timeout: Duration) -> Vec<Status> {
        self.ep().settled(ids, timeout).await
    }

    pub async fn connect_leader(&self, conn: &Conn, timeout: Duration) -> mqtt::Res<(Client, bool, u64)> {
        self.ep().connect_leader(conn, timeout).await
    }

    /// Prints the last lines of every node's log (on test failure).
    pub fn print_logs(&self, lines: usize) {
        let mut err = std::io::stderr();
        for n in &self.nodes {
            let text = n.log_text();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            let _ = writeln!(err, "---- node {} log (last {} lines) ----", n.id, all.len() - from);
            for l in &all[from..] {
                let _ = writeln!(err, "{l}");
            }
        }
        let _ = writeln!(err, "---- end of node logs ----");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            self.print_logs(120);
        }
    }
}

/// Node addresses (id, MQTT, admin): cheap to clone into tasks.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub nodes: Vec<(u64, SocketAddr, SocketAddr)>,
}

impl Endpoints {
    fn admin(&self, id: u64) -> SocketAddr {
        match self.nodes.iter().find(|n| n.0 == id) {
            Some(n) => n.2,
            None => panic!("no node {id}"),
        }
    }

    /// `/health/leader` of node `id`: (HTTP status, parsed body).
    pub async fn health(&self, id: u64) -> Option<(u16, Option<Status>)> {
        let (code, body) = http_get(self.admin(id), "/health/leader").await?;
        Some((code, serde_json::from_str(&body).ok()))
    }

    /// The node whose /health/leader answers 200, polled on every node until
    /// the deadline. Panics at the deadline.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        let ids: Vec<u64> = self.nodes.iter().map(|n| n.0).collect();
        self.leader_among(&ids, timeout).await
    }

    /// Like [`Cluster::leader`], polling only `ids`.
    pub async fn leader_among(&self, ids: &[u64], timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for &id in ids {
                if let Some((200, _)) = self.health(id).await {
                    leaders.push(id);
                }
            }
            if leaders.len() == 1 {
                return leaders[0];
            }
            if Instant::now() > deadline {
                panic!("no single serving leader among {ids:?} within {timeout:?} (200 from {leaders:?})");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until exactly one of `ids` answers 200 on /health/leader and all of
    /// `ids` report that leader and the same term, with applied index equal to
    /// the leader's commit index; returns the statuses (in `ids` order).
    pub async fn settled(&self, ids: &[u64], timeout: Duration) -> Vec<Status> {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            let mut st = Vec::new();
            let mut serving = Vec::new();
            for &id in ids {
                match self.health(id).await {
                    Some((code, Some(s))) => {
                        if code == 200 {
                            serving.push(id);
                        }
                        st.push(s);
                    }
                    other => {
                        last = vec![format!("node {id}: {other:?}")];
                        break;
                    }
                }
            }
            if st.len() == ids.len() && serving.len() == 1 {
                let l = serving[0];
                let lead = st.iter().find(|s| s.node_id == l).cloned();
                if let Some(lead) = lead {
                    let agree = st.iter().all(|s| {
                        s.leader_id == Some(l) && s.term == lead.term && s.applied_index >= lead.commit_index
                    });
                    if agree {
                        return st;
                    }
                }
            }
            if !st.is_empty() {
                last = st.iter().map(|s| format!("{s:?}")).collect();
            }
            if Instant::now() > deadline {
                panic!("cluster {ids:?} not settled within {timeout:?}; last statuses:\n{}", last.join("\n"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Connects `conn` to the serving leader: polls every node's /health/leader
    /// and connects to the one answering 200, following a CONNACK 0x9C's Server
    /// Reference; retries every [`POLL`] until the deadline. Returns the client,
    /// the session-present flag and the node id it is connected to.
    pub async fn connect_leader(&self, conn: &Conn, timeout: Duration) -> mqtt::Res<(Client, bool, u64)> {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            let mut target: Option<(u64, SocketAddr)> = None;
            for &(id, mqtt, _) in &self.nodes {
                if let Some((200, _)) = self.health(id).await {
                    target = Some((id, mqtt));
                    break;
                }
            }
            if let Some((id, addr)) = target {
                match self.try_connect(id, addr, conn).await {
                    Ok(r) => return Ok(r),
                    Err(e) => last = e,
                }
            } else {
                last = "no node answers 200 on /health/leader".into();
            }
            if Instant::now() > deadline {
                return Err(format!("{}: no leader connection within {timeout:?}: {last}", conn.client_id));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn try_connect(&self, id: u64, addr: SocketAddr, conn: &Conn) -> mqtt::Res<(Client, bool, u64)> {
        let (cl, ack) = Client::connect(addr, conn, Duration::from_secs(3)).await?;
        match ack {
            Pkt::ConnAck { code: 0, session_present, .. } => Ok((cl, session_present, id)),
            Pkt::ConnAck { code: mqtt::USE_ANOTHER_SERVER, props, .. } => {
                // Follow the Server Reference once (the leader moved between the
                // health check and the CONNECT).
                let reference = mqtt::prop_str(&props, mqtt::SERVER_REFERENCE).map(str::to_string);
                let Some(r) = reference else {
                    return Err(format!("node {id}: 0x9C without Server Reference"));
                };
                let Some(&(nid, nmqtt, _)) = self.nodes.iter().find(|n| n.1.to_string() == r) else {
                    return Err(format!("node {id}: Server Reference {r} is no node's MQTT address"));
                };
                let (cl, ack) = Client::connect(nmqtt, conn, Duration::from_secs(3)).await?;
                match ack {
                    Pkt::ConnAck { code: 0, session_present, .. } => Ok((cl, session_present, nid)),
                    other => Err(format!("node {nid} (by reference): {other:?}")),
                }
            }
            other => Err(format!("node {id}: {other:?}")),
        }
    }
}

/// A minimal HTTP/1.1 GET: (status, body); None when the node does not answer
/// within one second.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http::http_get_within(addr, path, Duration::from_secs(1)).await
}
