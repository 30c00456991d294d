//! A node: wires configuration, authentication, the Raft node, the broker,
//! the MQTT listeners and the admin HTTP server together, and owns the order
//! of start-up and shutdown.
//!
//! A node always runs a [`RaftNode`]: a single node is a one-member Raft group
//! (the same code path as a cluster). With no `[cluster] nodes` configured,
//! the node is that group alone: it binds no cluster listener, bootstraps
//! the group on first start and advertises its first MQTT listener. Its
//! replicated state (sessions, queues, retained messages) lives in the Raft
//! data under `data_dir/raft` and survives restarts.
//!
//! Start-up binds every socket before serving anything, so a port in use or a
//! bad certificate stops the node with a clear error instead of leaving it half
//! up. A single node accepts MQTT connections once it serves (a moment after
//! start); a cluster node accepts at once, and refuses CONNECT (0x9C / 3)
//! unless it is the serving leader. Shutdown (SIGINT or SIGTERM) on the
//! leader first hands leadership over ([`Node::hand_over`]): it transfers it to
//! the most caught-up healthy voter, waits (bounded) until that node leads,
//! and lets its clients go with DISCONNECT 0x9C + the new leader's address, so
//! a rolling restart costs each client one reconnect. Then (on every node) it
//! stops accepting, lets the broker say goodbye to any client left (MQTT 5:
//! DISCONNECT 0x8B), and stops Raft. A second signal skips the hand-over.
//!
//! This module holds no protocol or state logic; it only connects the parts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{AdminError, AdminServer, AdminView, Mode, NodeStatus, Role};
use crate::auth::{AuthConfig, AuthError};
use crate::broker::{Broker, EventRelay};
use crate::config::Config;
use crate::listener::{Listener, ListenerError};
use crate::raft::{self, ClusterConfig, NodeInfo, RaftError, RaftNode};
use crate::state::{pb, State};

/// How long a single node waits to become the leader of its group of one
/// before it accepts MQTT anyway (CONNECTs are refused until it serves).
const SINGLE_NODE_START: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create the data folder {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("listener: {0}")]
    Listener(#[from] ListenerError),
    #[error("admin HTTP: {0}")]
    Admin(#[from] AdminError),
    #[error("raft: {0}")]
    Raft(#[from] RaftError),
    #[error("backup: {0}")]
    Backup(#[from] crate::backup::BackupError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

/// Logs to stderr; the filter comes from `RAFTMQ_LOG` (or `RUST_LOG`), default
/// `info,openraft=error` (openraft warns on every failed heartbeat to a node
/// that is down: 20 lines a second per peer).
pub fn init_logging() {
    let filter = std::env::var("RAFTMQ_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,openraft=error".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (tests) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs a node until SIGINT or SIGTERM.
pub fn run(config: Config) -> Result<(), NodeError> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(NodeError::Runtime)?;
    runtime.block_on(async move {
        let node = Node::start(config).await?;
        wait_for_signal().await?;
        info!("shutting down");
        tokio::select! {
            _ = node.hand_over() => {}
            r = wait_for_signal() => {
                r?;
                warn!("second signal: stopping without waiting for the leadership hand-over");
            }
        }
        node.stop().await;
        Ok(())
    })
}

/// A started node; `stop` ends it.
pub struct Node {
    broker: Broker,
    raft: RaftNode,
    /// The local group's broker and Raft node (cluster nodes; src/modes.rs).
    local_broker: Option<Broker>,
    local_raft: Option<RaftNode>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    mqtt_addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    handover_timeout: Duration,
}

/// The commit timeout of the pipeline: two maximal election timeouts (a
/// leader cut off from its quorum has stopped serving by then), at least 1 s
/// so a slow fsync under load does not fail healthy proposals.
pub fn commit_timeout(cluster: &ClusterConfig) -> Duration {
    Duration::from_millis(cluster.election_timeout_max_ms.saturating_mul(2).max(1000))
}

/// How long a stopping leader waits for another node to lead after asking
/// it to: two maximal election timeouts (an election started by the
/// transfer takes about one round trip), at least 500 ms.
pub fn handover_timeout(cluster: &ClusterConfig) -> Duration {
    Duration::from_millis(cluster.election_timeout_max_ms.saturating_mul(2).max(500))
}

/// How long a stopping leader waits for its clients to be told where the
/// new leader is.
const HANDOVER_DRAIN: Duration = Duration::from_secs(5);

impl Node {
    /// Binds every socket, starts Raft, then starts serving.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| NodeError::DataDir { path: config.data_dir.clone(), source })?;

        let auth = crate::auth::from_config(&AuthConfig {
            allow_anonymous: config.mqtt.allow_anonymous,
            password_file: config.mqtt.password_file.clone(),
        })?;
        if config.mqtt.allow_anonymous && config.mqtt.password_file.is_none() {
            let public = config.listeners.iter().any(|l| !l.bind.ip().is_loopback());
            if public {
                warn!("anonymous clients are allowed on a listener that is not on localhost");
            }
        }

        let dynsec_init = config.dynsec.init_admin()?;

        let mut listeners = Vec::with_capacity(config.listeners.len());
        for cfg in &config.listeners {
            listeners.push(Listener::bind(cfg).await?);
        }
        let mqtt_addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect();

        // Raft first: it restores State (snapshot + log) before the broker uses it.
        let single = config.cluster.nodes.is_empty();
        let mut cluster = config.cluster.clone();
        cluster.node_id = config.node_id;
        if single {
            cluster.nodes = vec![NodeInfo {
                id: config.node_id,
                cluster_addr: cluster.listen.clone(),
                mqtt_addr: mqtt_addrs.first().map(|a| a.to_string()).unwrap_or_default(),
                admin_addr: config.admin.listen.to_string(),
            }];
        }
        let state = Arc::new(RwLock::new(State::new(config.mqtt.state_limits())));
        // Dynamic security, once initialised, decides instead of the static rules.
        let auth: Arc<dyn crate::auth::Authenticator> = Arc::new(
            crate::auth::DynsecAuthenticator::new(
                auth,
                state.read().dynsec_view(),
                config.mqtt.allow_anonymous,
            )
            .with_acl_substitution(config.dynsec.acl_substitution),
        );
        let relay = EventRelay::new();
        // Dynamic-security kicks are applied by the cluster group but concern
        // the clients of both brokers: the local one (dynsec-sync) gets them too.
        let local_kicks: Arc<std::sync::OnceLock<Broker>> = Arc::new(std::sync::OnceLock::new());
        let sink: raft::EventSink = {
            let to_cluster_broker = relay.sink();
            let local_kicks = local_kicks.clone();
            Box::new(move |events: Vec<crate::state::Event>| {
                if let Some(local) = local_kicks.get() {
                    for e in &events {
                        if let crate::state::Event::DynsecKick { kicks } = e {
                            local.kick(kicks);
                        }
                    }
                }
                to_cluster_broker(events)
            })
        };
        let raft = if single {
            RaftNode::start_single(&cluster, &config.data_dir, state.clone(), sink).await?
        } else {
            RaftNode::start(&cluster, &config.data_dir, state.clone(), sink).await?
        };
        let backup = match crate::backup::BackupService::new(&config, raft.clone(), state.clone()) {
            Ok(b) => b,
            Err(e) => {
                let _ = raft.shutdown().await;
                return Err(e.into());
            }
        };
        let gates = Arc::new(crate::modes::Gates::new());
        let broker = Broker::with_raft_gated(
            config.mqtt.clone(),
            auth.clone(),
            state.clone(),
            raft.clone(),
            &relay,
            commit_timeout(&cluster),
            gates.full(),
        );
        // A cluster node also runs its local group (dynsec-sync, src/modes.rs).
        let local = if single {
            None
        } else {
            let mut local_cfg = cluster.clone();
            local_cfg.join = false;
            local_cfg.tls = None;
            local_cfg.nodes = vec![NodeInfo {
                id: config.node_id,
                cluster_addr: String::new(),
                mqtt_addr: mqtt_addrs.first().map(|a| a.to_string()).unwrap_or_default(),
                admin_addr: config.admin.listen.to_string(),
            }];
            let local_state = Arc::new(RwLock::new(State::new(config.mqtt.state_limits())));
            let local_relay = EventRelay::new();
            let local_dir = config.data_dir.join("local");
            let local_raft =
                match RaftNode::start_single(&local_cfg, &local_dir, local_state.clone(), local_relay.sink())
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        broker.shutdown().await;
                        let _ = raft.shutdown().await;
                        return Err(e.into());
                    }
                };
            let local_broker = Broker::with_raft_gated(
                config.mqtt.clone(),
                auth,
                local_state.clone(),
                local_raft.clone(),
                &local_relay,
                commit_timeout(&local_cfg),
                gates.local(),
            );
            if local_kicks.set(local_broker.clone()).is_err() {
                warn!("local broker registered twice for dynamic-security kicks");
            }
            local_broker.set_control(Arc::new(crate::modes::ClusterControl {
                raft: raft.clone(),
                state: state.clone(),
                token: config.admin.token.clone().filter(|t| !t.is_empty()),
            }));
            Some(crate::modes::Switch {
                gates: gates.clone(),
                cluster_raft: raft.clone(),
                cluster_state: state.clone(),
                local_raft,
                local_state,
                local_broker,
                backup: backup.clone(),
            })
        };
        let local_broker = local.as_ref().map(|l| l.local_broker.clone());
        let local_raft = local.as_ref().map(|l| l.local_raft.clone());

        let view = Arc::new(RaftView {
            raft: raft.clone(),
            broker: broker.clone(),
            backup: Some(backup.clone()),
            local_broker: local_broker.clone(),
            gates: gates.clone(),
        });
        let backup_routes = crate::backup::http::routes(backup.clone());
        let admin = match AdminServer::bind_with_extra(
            &config.admin,
            view,
            Some(Arc::new(raft.clone())),
            backup_routes,
        )
        .await
        {
            Ok(admin) => admin,
            Err(e) => {
                broker.shutdown().await;
                let _ = raft.shutdown().await;
                return Err(e.into());
            }
        };
        let admin_addr = admin.local_addr();

        let shutdown = CancellationToken::new();
        backup.spawn_background(shutdown.clone());
        let mut tasks = Vec::new();
        let admin_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = admin.run(admin_shutdown).await {
                warn!(error = %e, "admin HTTP server stopped");
            }
        }));
        if let Some(switch) = local {
            tasks.push(tokio::spawn(crate::modes::run(switch, shutdown.clone())));
        }
        if let Some((admin, password)) = dynsec_init {
            tasks.push(tokio::spawn(bootstrap_dynsec(raft.clone(), admin, password, shutdown.clone())));
        }
        if single && !broker.wait_serving(SINGLE_NODE_START).await {
            warn!("the single node does not serve yet; MQTT clients are refused until it does");
        }
        for listener in listeners {
            let broker = broker.clone();
            let local_broker = local_broker.clone();
            let gates = gates.clone();
            let handler = move |stream, peer: SocketAddr| {
                // The mode picks the broker: the cluster's (full-sync) or this
                // node's own (dynsec-sync).
                let broker = match &local_broker {
                    Some(local) if gates.dynsec() => local,
                    _ => &broker,
                };
                // The future itself, not wrapped in an async block that would keep
                // the stream's and peer's slots for the connection's lifetime.
                broker.connect_client(stream, peer)
            };
            tasks.push(tokio::spawn(listener.run(handler, shutdown.clone())));
        }
        info!(
            node_id = config.node_id,
            data_dir = %config.data_dir.display(),
            members = cluster.nodes.len(),
            "node started"
        );
        Ok(Node {
            broker,
            raft,
            local_broker,
            local_raft,
            shutdown,
            tasks,
            mqtt_addrs,
            admin_addr,
            handover_timeout: handover_timeout(&cluster),
        })
    }

    /// The bound MQTT listener addresses, in configuration order.
    pub fn mqtt_addrs(&self) -> &[SocketAddr] {
        &self.mqtt_addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn raft(&self) -> &RaftNode {
        &self.raft
    }

    /// Before stopping a leader: moves leadership to the most caught-up
    /// healthy voter (the pinned leader when it is one of them), waits up to
    /// [`handover_timeout`] until another node leads, then until this node's
    /// clients have been sent there (DISCONNECT 0x9C + Server Reference).
    /// Returns whether leadership moved. A follower, a single node, or a
    /// leader with no voter ready to take over returns at once (false).
    pub async fn hand_over(&self) -> bool {
        let m = self.raft.metrics();
        if m.role != raft::Role::Leader {
            return false;
        }
        let members = self.raft.members();
        let ready: Vec<&raft::pin::MemberProgress> = members
            .iter()
            .filter(|p| p.id != m.node_id && raft::pin::ready_to_lead(&m, &members, p.id).is_ok())
            .collect();
        let pinned = self.raft.pinned_leader();
        let Some(to) = ready
            .iter()
            .find(|p| Some(p.id) == pinned)
            .or_else(|| ready.iter().max_by_key(|p| (p.matched, std::cmp::Reverse(p.last_ack))))
            .map(|p| p.id)
        else {
            if m.voters.len() > 1 {
                warn!("no caught-up voter to hand leadership to; stopping without a transfer");
            }
            return false;
        };
        info!(to, "stopping the leader: handing leadership over first");
        if let Err(e) = self.raft.transfer_leader(to).await {
            warn!(error = %e, "leader transfer failed; stopping without it");
            return false;
        }
        let me = m.node_id;
        match self.raft.wait_for(self.handover_timeout, |m| m.leader.is_some_and(|l| l != me)).await {
            Ok(m) => info!(leader = ?m.leader, "leadership handed over"),
            Err(e) => {
                warn!(error = %e, "no other leader within {:?}; stopping anyway", self.handover_timeout);
                return false;
            }
        }
        if !self.broker.wait_stepped_down(HANDOVER_DRAIN).await {
            warn!("clients still connected after the hand-over; they get DISCONNECT 0x8B");
        }
        true
    }

    /// Stops accepting, disconnects every client, waits for the tasks, stops Raft.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.broker.shutdown().await;
        if let Some(local) = &self.local_broker {
            local.shutdown().await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(local) = &self.local_raft {
            if let Err(e) = local.shutdown().await {
                warn!(error = %e, "local raft shutdown");
            }
        }
        if let Err(e) = self.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
    }
}

/// `[dynsec] init_admin`: until the cluster has dynamic-security state, the
/// leader proposes the first admin (only if still uninitialised, so nodes
/// racing each other and restarts change nothing once it exists).
async fn bootstrap_dynsec(raft: RaftNode, admin: String, password: String, stop: CancellationToken) {
    use crate::dynsec::{Dynsec, PasswordHash};
    let mut metrics = raft.subscribe();
    let initial = Dynsec::initial(&admin, PasswordHash::new(password.as_bytes()));
    loop {
        if raft.dynsec().is_some() {
            return;
        }
        if raft.is_leader() {
            let cmd = pb::Command {
                cmd: Some(pb::command::Cmd::DynsecSet(pb::DynsecSet {
                    state: Some(initial.to_proto()),
                    only_if_uninitialised: true,
                })),
            };
            match raft.apply_command(cmd).await {
                Ok(applied) if applied.existed.first() == Some(&false) => {
                    info!(%admin, "dynamic security initialised from [dynsec] init_admin");
                    return;
                }
                Ok(_) => return,
                Err(e) => warn!(error = %e, "dynamic security bootstrap failed; retrying"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = metrics.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn wait_for_signal() -> Result<(), NodeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(NodeError::Signal)?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(NodeError::Signal),
        _ = term.recv() => Ok(()),
    }
}

/// What the admin endpoints report: the Raft view of this node plus the
/// broker's serving flag (full-sync: ready = leader = serving).
struct RaftView {
    raft: RaftNode,
    broker: Broker,
    backup: Option<crate::backup::BackupService>,
    /// The broker of this node's local group (dynsec-sync), on cluster nodes.
    local_broker: Option<Broker>,
    gates: Arc<crate::modes::Gates>,
}

impl RaftView {
    /// The broker that takes this node's clients in the current mode.
    fn active_broker(&self) -> &Broker {
        match &self.local_broker {
            Some(local) if self.gates.dynsec() => local,
            _ => &self.broker,
        }
    }
}

fn admin_role(r: raft::Role) -> Role {
    match r {
        raft::Role::Leader => Role::Leader,
        raft::Role::Candidate => Role::Candidate,
        raft::Role::Learner => Role::Learner,
        raft::Role::Follower | raft::Role::Shutdown => Role::Follower,
    }
}

impl AdminView for RaftView {
    fn node_status(&self) -> NodeStatus {
        let m = self.raft.metrics();
        // Serving needs both: Raft's rule, and the broker having taken over
        // the sessions (ResetConnections applied, router rebuilt).
        let dynsec = self.gates.dynsec();
        // Dynsec-sync: every member whose local broker serves (its handover
        // imported); full-sync: only the serving leader.
        let serving =
            if dynsec { self.active_broker().is_serving() } else { m.serving && self.broker.is_serving() };
        NodeStatus {
            node_id: m.node_id,
            role: admin_role(m.role),
            leader_id: m.leader,
            leader_mqtt_addr: m.leader_addr.as_ref().map(|a| a.mqtt_addr.clone()),
            term: m.term,
            commit_index: m.commit_index.unwrap_or(0),
            applied_index: m.applied_index.unwrap_or(0),
            mode: if dynsec { Mode::DynsecSync } else { Mode::FullSync },
            serving,
            ready: serving,
        }
    }

    fn render_metrics(&self, out: &mut String) {
        let broker = self.active_broker();
        broker.metrics().render_prometheus(out);
        render_raft_metrics(&self.raft, broker.is_serving(), out);
        if let Some(b) = &self.backup {
            b.render_metrics(out);
        }
        self.broker.pipeline().commit_stats().render_prometheus(out);
        self.raft.render_latency_metrics(out);
        render_state_metrics(&self.broker.state().read(), out);
    }
}

/// This replica's view of the replicated State (equal on every node once
/// they have applied the same entries).
fn render_state_metrics(st: &State, out: &mut String) {
    use std::fmt::Write as _;
    let (mut queued, mut inflight) = (0usize, 0usize);
    for (_, s) in st.sessions() {
        queued += s.queue_len();
        inflight += s.inflight_len();
    }
    let rows: [(&str, &str, usize); 5] = [
        ("raftmq_state_sessions", "Persistent sessions in the replicated state", st.session_count()),
        ("raftmq_state_subscriptions", "Subscriptions of persistent sessions", st.subscription_count()),
        ("raftmq_state_retained", "Retained messages", st.retained_count()),
        ("raftmq_state_queued_messages", "Messages queued for persistent sessions", queued),
        ("raftmq_state_inflight_messages", "Messages in flight to persistent sessions", inflight),
    ];
    for (name, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help} (this replica).\n# TYPE {name} gauge\n{name} {value}");
    }
}

/// Raft figures in Prometheus text format.
fn render_raft_metrics(raft: &RaftNode, serving: bool, out: &mut String) {
    use std::fmt::Write as _;
    let m = raft.metrics();
    let s = raft.storage_stats();
    let commit = m.commit_index.unwrap_or(0);
    let applied = m.applied_index.unwrap_or(0);
    let rows: [(&str, &str, &str, f64); 16] = [
        ("raftmq_raft_term", "gauge", "Current Raft term", m.term as f64),
        (
            "raftmq_raft_is_leader",
            "gauge",
            "1 on the leader",
            f64::from(u8::from(m.role == raft::Role::Leader)),
        ),
        ("raftmq_raft_serving", "gauge", "1 while this node serves MQTT", f64::from(u8::from(serving))),
        ("raftmq_raft_leader_changes_total", "counter", "Leader changes seen", m.leader_changes as f64),
        ("raftmq_raft_last_log_index", "gauge", "Last log index", m.last_log_index.unwrap_or(0) as f64),
        ("raftmq_raft_commit_index", "gauge", "Committed log index", commit as f64),
        ("raftmq_raft_applied_index", "gauge", "Applied log index", applied as f64),
        (
            "raftmq_raft_apply_lag",
            "gauge",
            "Committed entries not yet applied",
            commit.saturating_sub(applied) as f64,
        ),
        (
            "raftmq_raft_snapshot_index",
            "gauge",
            "Log index of the newest snapshot",
            m.snapshot_index.unwrap_or(0) as f64,
        ),
        ("raftmq_raft_voters", "gauge", "Voting members", m.voters.len() as f64),
        (
            "raftmq_raft_fsyncs_total",
            "counter",
            "Log flushes (fsync), one per group commit",
            s.flushes as f64,
        ),
        ("raftmq_raft_appends_total", "counter", "Log append calls", s.appends as f64),
        ("raftmq_raft_entries_appended_total", "counter", "Log entries appended", s.entries as f64),
        ("raftmq_raft_bytes_appended_total", "counter", "Log bytes appended", s.bytes as f64),
        ("raftmq_raft_flush_p50_seconds", "gauge", "Log flush latency, median", s.flush_p50_us as f64 / 1e6),
        (
            "raftmq_raft_flush_p99_seconds",
            "gauge",
            "Log flush latency, 99th percentile",
            s.flush_p99_us as f64 / 1e6,
        ),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}\n{name} {value}");
    }
}

#[cfg(test)]
mod tests {
    //! Three in-process nodes: the serving rules when leadership moves.

    use super::*;
    use crate::admin::AdminConfig;
    use crate::listener::ListenerConfig;
    use crate::protocol::{
        self, reason, Connect, ConnectProperties, Packet, ProtocolVersion, ProtocolVersionOrDefault,
    };
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start_three(dir: &std::path::Path) -> Vec<Node> {
        // Held until all are chosen: no port twice.
        let held: Vec<std::net::TcpListener> =
            (0..9).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let p: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        let ports: Vec<(u16, u16, u16)> = (0..3).map(|i| (p[3 * i], p[3 * i + 1], p[3 * i + 2])).collect();
        let infos: Vec<NodeInfo> = ports
            .iter()
            .enumerate()
            .map(|(i, (m, a, c))| NodeInfo {
                id: i as u64 + 1,
                cluster_addr: format!("127.0.0.1:{c}"),
                mqtt_addr: format!("127.0.0.1:{m}"),
                admin_addr: format!("127.0.0.1:{a}"),
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, (m, a, c)) in ports.iter().enumerate() {
            let config = Config {
                node_id: i as u64 + 1,
                data_dir: dir.join(format!("node-{}", i + 1)),
                listeners: vec![ListenerConfig {
                    bind: format!("127.0.0.1:{m}").parse().unwrap(),
                    ..Default::default()
                }],
                admin: AdminConfig { listen: format!("127.0.0.1:{a}").parse().unwrap(), token: None },
                cluster: ClusterConfig {
                    node_id: i as u64 + 1,
                    listen: format!("127.0.0.1:{c}"),
                    nodes: infos.clone(),
                    ..Default::default()
                },
                ..Default::default()
            };
            nodes.push(Node::start(config).await.unwrap());
        }
        nodes
    }

    async fn leader_of(nodes: &[Node]) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let serving: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].broker().is_serving()).collect();
            if serving.len() == 1 {
                return serving[0];
            }
            assert!(tokio::time::Instant::now() < deadline, "no single serving leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    struct Client {
        s: TcpStream,
        buf: BytesMut,
    }

    impl Client {
        async fn connect(addr: SocketAddr, clean_start: bool) -> (Client, Packet) {
            let s = TcpStream::connect(addr).await.unwrap();
            let mut c = Client { s, buf: BytesMut::new() };
            let connect = Packet::Connect(Connect {
                protocol: ProtocolVersionOrDefault(ProtocolVersion::V5),
                clean_start,
                keep_alive: 60,
                client_id: "mover".into(),
                properties: ConnectProperties { session_expiry_interval: Some(600), ..Default::default() },
                ..Default::default()
            });
            let mut out = BytesMut::new();
            protocol::encode(&connect, ProtocolVersion::V5, &mut out).unwrap();
            c.s.write_all(&out).await.unwrap();
            let p = c.recv().await.expect("CONNACK");
            (c, p)
        }

        async fn recv(&mut self) -> Option<Packet> {
            loop {
                if let Ok(Some(p)) = protocol::decode(&mut self.buf, Some(ProtocolVersion::V5), 1 << 20) {
                    return Some(p);
                }
                let read =
                    tokio::time::timeout(Duration::from_secs(10), self.s.read_buf(&mut self.buf)).await;
                match read {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_hands_over_disconnects_with_use_another_server() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = start_three(dir.path()).await;
        let l = leader_of(&nodes).await;
        let (mut c, ack) = Client::connect(nodes[l].mqtt_addrs()[0], true).await;
        assert!(matches!(ack, Packet::ConnAck(ref a) if a.reason_code == 0), "{ack:?}");

        let to = (l + 1) % 3;
        nodes[l].raft().transfer_leader(to as u64 + 1).await.unwrap();
        match c.recv().await {
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, reason::USE_ANOTHER_SERVER);
                // The reference is the new leader once this node knows it.
                if let Some(r) = &d.server_reference {
                    assert_eq!(r, &nodes[to].mqtt_addrs()[0].to_string());
                }
            }
            other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
        }
        assert!(c.recv().await.is_none(), "closed after DISCONNECT");
        let l2 = leader_of(&nodes).await;
        assert_eq!(l2, to);
        // The old leader now refers new clients to the new one (once it has
        // heard from it: until then it refuses without a reference).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, ack) = Client::connect(nodes[l].mqtt_addrs()[0], false).await;
            let Packet::ConnAck(a) = ack else { panic!("{ack:?}") };
            assert_eq!(a.reason_code, reason::USE_ANOTHER_SERVER);
            if let Some(r) = a.properties.server_reference {
                assert_eq!(r, nodes[to].mqtt_addrs()[0].to_string());
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the old leader never learnt the new one");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The session moved with the leadership: it is present on the new leader.
        let (_, ack) = Client::connect(nodes[to].mqtt_addrs()[0], false).await;
        assert!(matches!(ack, Packet::ConnAck(ref a) if a.reason_code == 0 && a.session_present), "{ack:?}");
        for n in nodes {
            n.stop().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopping_leader_hands_over_and_points_its_clients_at_the_new_leader() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = start_three(dir.path()).await;
        let l = leader_of(&nodes).await;
        // A follower has nothing to hand over.
        assert!(!nodes[(l + 1) % 3].hand_over().await);
        let (mut c, ack) = Client::connect(nodes[l].mqtt_addrs()[0], true).await;
        assert!(matches!(ack, Packet::ConnAck(ref a) if a.reason_code == 0), "{ack:?}");

        let started = std::time::Instant::now();
        assert!(nodes[l].hand_over().await, "leadership did not move");
        let new = nodes[l].raft().metrics().leader.expect("a new leader") as usize - 1;
        assert_ne!(new, l);
        // Bounded by the hand-over timeout plus the drain, in practice far less.
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        // The client was already told, with the new leader's address.
        match c.recv().await {
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, reason::USE_ANOTHER_SERVER);
                assert_eq!(d.server_reference, Some(nodes[new].mqtt_addrs()[0].to_string()));
            }
            other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
        }
        assert!(!nodes[l].broker().is_serving());
        assert_eq!(leader_of(&nodes).await, new);
        for n in nodes {
            n.stop().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_without_quorum_stops_serving_and_disconnects() {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = start_three(dir.path()).await;
        let l = leader_of(&nodes).await;
        let (mut c, ack) = Client::connect(nodes[l].mqtt_addrs()[0], true).await;
        assert!(matches!(ack, Packet::ConnAck(ref a) if a.reason_code == 0), "{ack:?}");
        let leader = nodes.remove(l);
        for n in nodes {
            n.stop().await;
        }
        // Within an election timeout or so the cut-off leader closes its clients.
        let started = std::time::Instant::now();
        match c.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, reason::USE_ANOTHER_SERVER),
            other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(!leader.broker().is_serving());
        let status = RaftView {
            raft: leader.raft().clone(),
            broker: leader.broker().clone(),
            backup: None,
            local_broker: None,
            gates: Arc::new(crate::modes::Gates::new()),
        }
        .node_status();
        assert!(!status.serving && !status.ready, "{status:?}");
        // And refuses new ones.
        let (_, ack) = Client::connect(leader.mqtt_addrs()[0], true).await;
        assert!(
            matches!(ack, Packet::ConnAck(ref a) if a.reason_code == reason::USE_ANOTHER_SERVER),
            "{ack:?}"
        );
        leader.stop().await;
    }
}
