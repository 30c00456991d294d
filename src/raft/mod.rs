//! The Raft layer: openraft under the deterministic state machine.
//!
//! Owns the openraft glue: the type configuration ([`types`]), the protobuf
//! form of Raft data ([`convert`], proto/raft.proto), the state-machine
//! adapter ([`state_machine`]), the cluster transport ([`network`] client,
//! `server`, [`tls`]) and [`RaftNode`], the handle the broker uses. It does not
//! touch the broker, the MQTT protocol or sled (that is `crate::storage`).
//!
//! # Using it
//!
//! The broker's command pipeline stamps a `state::pb::Batch` and calls
//! [`RaftNode::propose`]; the batch becomes one log entry; once committed and
//! applied (on every node, in log order) the proposer gets the per-command
//! results in order, and the `Event`s go to the event sink of every node.
//!
//! - The sink is called on the state-machine task, after the entry is applied
//!   and before the proposer hears back: it must not block. Installing a
//!   snapshot replaces the State wholesale and raises no events.
//! - [`RaftError::OutcomeUnknown`]: the entry may still commit; never
//!   acknowledge it to a client as done, never blindly re-propose it.
//! - A leader cut off from its quorum keeps `propose` pending until the
//!   partition heals or it learns of a new leader: callers bound the wait,
//!   and stop serving when [`NodeMetrics::serving`] turns false.
//! - Data directory: `<data_dir>/raft/log` (sled: log, vote, committed,
//!   purged), `<data_dir>/raft/snapshot/snapshot.bin` (the newest snapshot).
//!
//! # Bootstrap: exactly one cluster, no manual step
//!
//! Only the node with the lowest id of the static `nodes` list ever calls
//! openraft's `initialize`, with the full list as voters, and only when its
//! own Raft state is pristine (no vote, no log, no snapshot). Every other node
//! starts empty and waits to be contacted by a leader. So whatever order the
//! nodes start in, there is one initial membership, proposed once: two
//! clusters cannot form. The cost: a fresh cluster forms only once the lowest
//! node has started (and a quorum with it). A node added later at run time
//! (`add_learner`) must be started with `join = true` (or not be the lowest
//! id of its list), so it never initializes a cluster of its own; a node
//! whose data directory was wiped must likewise be restarted with `join`.
//!
//! # Election settings (failover target: p50 <= 500 ms kill -> first PUBACK)
//!
//! Heartbeat every 50 ms; election timeout random in 100..250 ms; pre-vote on.
//! openraft gives every vote a lease of `election_timeout_max` since the last
//! heartbeat: a voter refuses other candidates until the lease runs out. So
//! after the leader dies, the first campaign that can win starts at about
//! `election_timeout_max` (250 ms) plus part of one election timeout; the new
//! leader then commits and applies a blank entry of its term and serves
//! ([`NodeMetrics::serving`]). Measured in-process on loopback: 360..460 ms
//! from shutdown to a serving leader (300..600 ms timeouts gave ~1 s, because
//! the 600 ms lease makes the first campaign fail). Pre-vote keeps a follower
//! that missed heartbeats (a scheduling stall) from disrupting a healthy
//! leader: the others still hold their lease and refuse it.

pub mod convert;
pub mod network;
pub mod pin;
mod server;
pub mod state_machine;
pub mod tls;
pub mod types;

#[cfg(test)]
mod tests;

pub mod pb {
    //! Generated from proto/raft.proto.
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/raftmq.raft.rs"));
}

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, InitializeError, RaftError as OrError};
use openraft::{Instant as _, ServerState, SnapshotPolicy};
use parking_lot::RwLock;
use prost::Message as _;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::{self, Applied, Event, State, StateError};
use crate::storage::{LogStore, SnapshotStore, StorageError, StorageStats, StorageStatsSnapshot};
pub use pin::MemberProgress;
pub use tls::{ClusterTls, TlsConfig, TlsError};
pub use types::{ApplyOutcome, BatchPayload, NodeAddr, NodeId, Raft, TypeConfig};

/// Largest encoded batch one log entry may carry: it must fit in one
/// AppendEntries frame ([`network::MAX_FRAME`]) with room to spare. The
/// pipeline must cut batches below this (and cap MQTT packet sizes).
pub const MAX_ENTRY_BYTES: usize = network::MAX_FRAME / 2;

/// Receives the events of every applied entry, on every node (the same type
/// as the single-node pipeline's sink).
pub type EventSink = Box<dyn Fn(Vec<Event>) + Send + Sync>;

/// The per-command results of one applied batch.
pub type ProposeResults = Vec<Result<Applied, StateError>>;

/// One node of the static list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Raft RPCs, `host:port`.
    pub cluster_addr: String,
    /// MQTT address advertised to clients (Server Reference).
    pub mqtt_addr: String,
    /// Admin / health HTTP address.
    pub admin_addr: String,
}

impl NodeInfo {
    fn addr(&self) -> NodeAddr {
        NodeAddr {
            cluster_addr: self.cluster_addr.clone(),
            mqtt_addr: self.mqtt_addr.clone(),
            admin_addr: self.admin_addr.clone(),
        }
    }
}

/// `[cluster]` configuration. The default is a single node (id 1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Set from the node's top-level `node_id`; not a key of its own.
    #[serde(skip)]
    pub node_id: NodeId,
    /// Address the cluster listener binds (`host:port`).
    pub listen: String,
    /// The static list of nodes a fresh cluster bootstraps from.
    pub nodes: Vec<NodeInfo>,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub heartbeat_ms: u64,
    /// Build a snapshot (and compact the log) every this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the snapshot (lets a briefly lagging
    /// follower catch up from the log rather than a snapshot).
    pub keep_after_snapshot: u64,
    /// Never bootstrap: wait to be added to an existing cluster.
    pub join: bool,
    pub tls: Option<TlsConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 1,
            listen: "127.0.0.1:7800".into(),
            nodes: vec![NodeInfo {
                id: 1,
                cluster_addr: "127.0.0.1:7800".into(),
                mqtt_addr: "127.0.0.1:1883".into(),
                admin_addr: "127.0.0.1:8080".into(),
            }],
            election_timeout_min_ms: 100,
            election_timeout_max_ms: 250,
            heartbeat_ms: 50,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            join: false,
            tls: None,
        }
    }
}

/// Errors of the Raft layer.
#[derive(thiserror::Error, Debug)]
pub enum RaftError {
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    /// Not the leader: propose on the leader (None: no leader known now).
    #[error("not the leader; leader is {leader_id:?}")]
    ForwardToLeader { leader_id: Option<NodeId>, leader: Option<NodeAddr> },
    /// The entry was appended but then discarded by a leader change: it may
    /// or may not commit. Must not be acknowledged to a client as done.
    #[error("outcome unknown: the entry was discarded by a leader change (leader now {leader_id:?})")]
    OutcomeUnknown { leader_id: Option<NodeId> },
    /// The batch could not be decoded by apply (every replica agrees).
    #[error("state machine: {0}")]
    State(#[from] StateError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The encoded batch exceeds [`MAX_ENTRY_BYTES`]: split it.
    #[error("batch of {size} bytes exceeds the {max} bytes an entry may have")]
    TooLarge { size: usize, max: usize },
    /// The Raft node stopped (shutdown, or a storage failure).
    #[error("raft stopped: {0}")]
    Fatal(String),
    #[error("{0}")]
    Other(String),
}

/// The role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Candidate,
    Follower,
    Learner,
    Shutdown,
}

/// What the health endpoints and the serving rules need, in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMetrics {
    pub node_id: NodeId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    /// The leader's addresses, when known and in the membership.
    pub leader_addr: Option<NodeAddr>,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// Leader only: when a quorum last acknowledged it (None elsewhere). A
    /// leader past one election timeout without it must stop serving.
    pub quorum_acked_at: Option<tokio::time::Instant>,
    /// The DESIGN's condition to serve MQTT: leader, has applied an entry of
    /// its own term (hence everything committed before it), and a quorum
    /// acknowledged it within the last `election_timeout_max_ms`. Turns false
    /// within one heartbeat of any of these failing.
    pub serving: bool,
    /// Times this node saw the leader change (to a known leader).
    pub leader_changes: u64,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

fn node_metrics(m: &openraft::RaftMetrics<TypeConfig>) -> NodeMetrics {
    let role = match m.state {
        ServerState::Leader => Role::Leader,
        ServerState::Candidate => Role::Candidate,
        ServerState::Follower => Role::Follower,
        ServerState::Learner => Role::Learner,
        ServerState::Shutdown => Role::Shutdown,
    };
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let serving = role == Role::Leader
        && m.vote.committed
        && m.last_applied.as_ref().is_some_and(|l| l.leader_id == m.vote.leader_id);
    NodeMetrics {
        node_id: m.id,
        role,
        term: m.current_term,
        leader: m.current_leader,
        leader_addr: m.current_leader.and_then(|l| membership.get_node(&l).cloned()),
        last_log_index: m.last_log_index,
        commit_index: m.cluster_committed.as_ref().map(|l| l.index),
        applied_index: m.last_applied.as_ref().map(|l| l.index),
        snapshot_index: m.snapshot.as_ref().map(|l| l.index),
        purged_index: m.purged.as_ref().map(|l| l.index),
        quorum_acked_at: m.last_quorum_acked.as_ref().map(|t| tokio::time::Instant::now() - t.elapsed()),
        serving,
        leader_changes: 0,
        voters,
        learners,
    }
}

/// A running Raft node. See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    id: NodeId,
    raft: Raft,
    metrics: watch::Receiver<NodeMetrics>,
    stop: Arc<watch::Sender<bool>>,
    /// Resolves when the log store has released its files.
    store_closed: Arc<tokio::sync::Mutex<Option<StoreClosed>>>,
    storage_stats: Arc<StorageStats>,
    replication_stats: Arc<network::ReplicationStats>,
    /// Counts the leader transfers this node asked for (the broker stops
    /// taking new clients while one is under way, broker::serving).
    transfers: Arc<watch::Sender<u64>>,
    /// The State this node applies into (the pin task reads its settings).
    state: Arc<RwLock<State>>,
}

type StoreClosed = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// How long `shutdown` waits for the log store to release its files.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

impl ClusterConfig {
    /// Checks what a typo could break: unique ids, this node listed (unless
    /// joining), timeouts that allow an election.
    pub fn validate(&self) -> Result<(), RaftError> {
        let bad = |m: String| Err(RaftError::Config(m));
        let ids: BTreeSet<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        if ids.len() != self.nodes.len() {
            return bad("duplicate node id in `nodes`".into());
        }
        if !self.join && !ids.contains(&self.node_id) {
            return bad(format!(
                "node_id {} is not in `nodes` (set join = true to join a cluster)",
                self.node_id
            ));
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 > self.election_timeout_min_ms {
            return bad("heartbeat_ms must be > 0 and at most half of election_timeout_min_ms".into());
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return bad("election_timeout_max_ms must be greater than election_timeout_min_ms".into());
        }
        if self.snapshot_every == 0 {
            return bad("snapshot_every must be > 0".into());
        }
        Ok(())
    }

    fn openraft_config(&self) -> Result<openraft::Config, RaftError> {
        let c = openraft::Config {
            cluster_name: "raftmq".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 60_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            // A follower further behind than this gets a snapshot.
            replication_lag_threshold: self.snapshot_every.saturating_mul(2),
            // Purge as soon as a snapshot covers the entries (minus the kept tail).
            purge_batch_size: self.snapshot_every.clamp(1, 256),
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        c.validate().map_err(|e| RaftError::Config(e.to_string()))
    }

    /// Whether this node bootstraps the cluster (see the module docs).
    fn is_bootstrap_node(&self) -> bool {
        !self.join && self.nodes.iter().map(|n| n.id).min() == Some(self.node_id)
    }
}

impl RaftNode {
    /// Opens the node's storage under `data_dir/raft`, restores `state` from
    /// the newest snapshot plus the log, listens on `config.listen` and joins
    /// or bootstraps the cluster. Must run inside a tokio runtime.
    pub async fn start(
        config: &ClusterConfig,
        data_dir: &Path,
        state: Arc<RwLock<State>>,
        event_sink: EventSink,
    ) -> Result<RaftNode, RaftError> {
        Self::start_with(config, data_dir, state, event_sink, true).await
    }

    /// [`RaftNode::start`] for a group of one that talks to no peer: binds
    /// no cluster listener (several single-node brokers can run side by side
    /// without a cluster port). `config.nodes` must be this node alone.
    pub async fn start_single(
        config: &ClusterConfig,
        data_dir: &Path,
        state: Arc<RwLock<State>>,
        event_sink: EventSink,
    ) -> Result<RaftNode, RaftError> {
        if config.nodes.len() != 1 || config.nodes[0].id != config.node_id {
            return Err(RaftError::Config("a single node lists exactly itself in `nodes`".into()));
        }
        Self::start_with(config, data_dir, state, event_sink, false).await
    }

    async fn start_with(
        config: &ClusterConfig,
        data_dir: &Path,
        state: Arc<RwLock<State>>,
        event_sink: EventSink,
        listen: bool,
    ) -> Result<RaftNode, RaftError> {
        config.validate()?;
        let raft_config = Arc::new(config.openraft_config()?);
        let dir = data_dir.join("raft");
        let log_store = LogStore::open(&dir.join("log"))?.for_node(config.node_id);
        let store_closed: StoreClosed = Box::pin(log_store.on_closed());
        let storage_stats = log_store.stats();
        let snapshots = SnapshotStore::open(&dir.join("snapshot")).map_err(StorageError::from)?;
        let tls = config.tls.as_ref().map(ClusterTls::load).transpose()?;
        let listener = if listen {
            Some(
                TcpListener::bind(&config.listen)
                    .await
                    .map_err(|source| RaftError::Listen { addr: config.listen.clone(), source })?,
            )
        } else {
            None
        };

        let sm = state_machine::StateMachine::new(state.clone(), event_sink, snapshots)
            .map_err(StorageError::from)?;
        let replication_stats = Arc::new(network::ReplicationStats::default());
        let network = network::NetworkFactory::new(config.node_id, tls.clone(), replication_stats.clone());
        let raft = Raft::new(config.node_id, raft_config, network, log_store, sm)
            .await
            .map_err(|e| RaftError::Fatal(e.to_string()))?;

        let (stop_tx, stop_rx) = watch::channel(false);
        if let Some(listener) = listener {
            tokio::spawn(server::serve(listener, raft.clone(), tls, stop_rx.clone()));
        }
        let metrics = spawn_metrics(
            &raft,
            stop_rx,
            Duration::from_millis(config.heartbeat_ms),
            Duration::from_millis(config.election_timeout_max_ms),
        );

        let node = RaftNode {
            id: config.node_id,
            raft,
            metrics,
            stop: Arc::new(stop_tx),
            store_closed: Arc::new(tokio::sync::Mutex::new(Some(store_closed))),
            storage_stats,
            replication_stats,
            transfers: Arc::new(watch::Sender::new(0)),
            state,
        };
        pin::spawn(node.clone(), node.stop.subscribe());
        if config.is_bootstrap_node() {
            node.bootstrap(config).await?;
        }
        Ok(node)
    }

    async fn bootstrap(&self, config: &ClusterConfig) -> Result<(), RaftError> {
        if self.raft.is_initialized().await.map_err(|e| RaftError::Fatal(e.to_string()))? {
            return Ok(());
        }
        let members: BTreeMap<NodeId, NodeAddr> = config.nodes.iter().map(|n| (n.id, n.addr())).collect();
        tracing::info!(node = self.id, ?members, "bootstrapping a new cluster from the static node list");
        match self.raft.initialize(members).await {
            Ok(()) | Err(OrError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(RaftError::Other(format!("initialize: {e}"))),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Replicates one batch as one log entry; resolves once it is committed and
    /// applied here, with the result of each command in order.
    pub async fn propose(
        &self,
        batch: &state::pb::Batch,
    ) -> Result<Vec<Result<Applied, StateError>>, RaftError> {
        self.propose_indexed(batch).await.map(|(_, results)| results)
    }

    /// [`RaftNode::propose`], also returning the log index of the entry.
    pub async fn propose_indexed(
        &self,
        batch: &state::pb::Batch,
    ) -> Result<(u64, Vec<Result<Applied, StateError>>), RaftError> {
        let bytes = batch.encode_to_vec();
        if bytes.len() > MAX_ENTRY_BYTES {
            // It could never be replicated (one entry must fit one frame).
            return Err(RaftError::TooLarge { size: bytes.len(), max: MAX_ENTRY_BYTES });
        }
        match self.raft.client_write(BatchPayload(bytes.into())).await {
            Ok(resp) => Ok((resp.log_id.index, resp.data.0?)),
            Err(OrError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(RaftError::ForwardToLeader { leader_id: f.leader_id, leader: f.leader_node })
            }
            Err(OrError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
                Err(RaftError::OutcomeUnknown { leader_id: f.leader_id })
            }
            Err(OrError::APIError(e)) => Err(RaftError::Other(e.to_string())),
            Err(OrError::Fatal(e)) => Err(RaftError::Fatal(e.to_string())),
        }
    }

    /// Replicates one command stamped with this node's clock (admin
    /// operations: pinning, dynamic-security init and import) and returns its
    /// result once committed and applied here.
    pub async fn apply_command(&self, cmd: state::pb::Command) -> Result<Applied, RaftError> {
        use std::time::{SystemTime, UNIX_EPOCH};
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let batch = state::pb::Batch { now_ms, commands: vec![cmd] };
        match self.propose(&batch).await?.pop() {
            Some(Ok(applied)) => Ok(applied),
            Some(Err(e)) => Err(RaftError::State(e)),
            None => Err(RaftError::Other("no result for the command".into())),
        }
    }

    /// The cluster settings this node has applied (mode, pinned leader).
    pub fn cluster_settings(&self) -> state::pb::ClusterSettings {
        self.state.read().cluster_settings().clone()
    }

    /// The dynamic-security state this node has applied, if initialised.
    pub fn dynsec(&self) -> Option<Arc<crate::dynsec::Dynsec>> {
        self.state.read().dynsec()
    }

    /// Hands one batch to Raft as one log entry and returns once Raft has
    /// queued it, with a future for its outcome (like [`RaftNode::propose_indexed`]).
    /// Entries submitted one after another (each `submit` awaited before the
    /// next) are appended, committed and applied in submission order: they go
    /// through one FIFO channel to the Raft core. That is what lets the
    /// pipeline keep several batches in flight without reordering them.
    pub async fn submit(
        &self,
        batch: &state::pb::Batch,
    ) -> Result<
        impl std::future::Future<Output = Result<(u64, ProposeResults), RaftError>> + Send + 'static,
        RaftError,
    > {
        let bytes = batch.encode_to_vec();
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(RaftError::TooLarge { size: bytes.len(), max: MAX_ENTRY_BYTES });
        }
        let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
        self.raft
            .client_write_ff(BatchPayload(bytes.into()), Some(responder))
            .await
            .map_err(|e| RaftError::Fatal(e.to_string()))?;
        Ok(async move {
            match rx.await {
                Ok(Ok(resp)) => Ok((resp.log_id.index, resp.data.0?)),
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                    Err(RaftError::ForwardToLeader { leader_id: f.leader_id, leader: f.leader_node })
                }
                Ok(Err(ClientWriteError::LogEntryDiscarded(f))) => {
                    Err(RaftError::OutcomeUnknown { leader_id: f.leader_id })
                }
                Ok(Err(e)) => Err(RaftError::Other(e.to_string())),
                // The responder was dropped: Raft stopped (or the entry was
                // dropped without a verdict): the outcome is unknown.
                Err(_) => Err(RaftError::OutcomeUnknown { leader_id: None }),
            }
        })
    }

    /// The latest metrics.
    pub fn metrics(&self) -> NodeMetrics {
        self.metrics.borrow().clone()
    }

    /// Metrics as they change (role, leader, indexes), for the serving rules.
    pub fn subscribe(&self) -> watch::Receiver<NodeMetrics> {
        self.metrics.clone()
    }

    /// Leader by openraft's state (see [`NodeMetrics::serving`] for "may serve").
    pub fn is_leader(&self) -> bool {
        self.metrics.borrow().role == Role::Leader
    }

    /// Waits until `cond` holds for the metrics, at most `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&NodeMetrics) -> bool,
    ) -> Result<NodeMetrics, RaftError> {
        let mut rx = self.metrics.clone();
        let wait = async {
            loop {
                {
                    let m = rx.borrow_and_update();
                    if cond(&m) {
                        return Ok(m.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(RaftError::Fatal("metrics closed".into()));
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| RaftError::Timeout(timeout))?
    }

    /// Asks the leader (this node) to hand leadership to `to`; ignored when this
    /// node is not the leader. Completion shows in the metrics.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), RaftError> {
        if self.is_leader() {
            self.transfers.send_modify(|n| *n += 1);
        }
        self.raft.trigger().transfer_leader(to).await.map_err(|e| RaftError::Fatal(e.to_string()))
    }

    /// Changes each time this node, as leader, asks for a leader transfer.
    pub fn subscribe_transfers(&self) -> watch::Receiver<u64> {
        self.transfers.subscribe()
    }

    /// Adds (or updates) a non-voting member; returns once it is committed
    /// (with `blocking`, once the learner has caught up).
    pub async fn add_learner(&self, id: NodeId, addr: NodeAddr, blocking: bool) -> Result<(), RaftError> {
        self.raft.add_learner(id, addr, blocking).await.map(|_| ()).map_err(write_error)
    }

    /// Sets the voters (they must already be members); `retain` keeps removed
    /// voters as learners.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>, retain: bool) -> Result<(), RaftError> {
        self.raft.change_membership(voters, retain).await.map(|_| ()).map_err(write_error)
    }

    /// Builds a snapshot now (and compacts the log after it), waiting at most `timeout`.
    pub async fn snapshot(&self, timeout: Duration) -> Result<u64, RaftError> {
        let target = self.metrics().applied_index;
        self.raft.trigger().snapshot().await.map_err(|e| RaftError::Fatal(e.to_string()))?;
        let m = self.wait_for(timeout, |m| m.snapshot_index >= target).await?;
        Ok(m.snapshot_index.unwrap_or(0))
    }

    /// Log store counters: group commits (fsyncs), appends, entries, bytes,
    /// flush latency.
    pub fn storage_stats(&self) -> StorageStatsSnapshot {
        self.storage_stats.snapshot()
    }

    /// Appends the latency histograms of this node's log and replication:
    /// `raftmq_raft_append_latency_seconds` (append to durable, every node)
    /// and `raftmq_raft_replication_latency_seconds{peer}` (as leader).
    pub fn render_latency_metrics(&self, out: &mut String) {
        self.storage_stats.append_latency.render(
            out,
            "raftmq_raft_append_latency_seconds",
            "From appending entries to the log to their fsync (durable), on this node.",
        );
        self.replication_stats.render_prometheus(out);
    }

    /// The openraft handle, for what this wrapper does not cover.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Stops the node: Raft core, the cluster listener and its connections;
    /// returns once the data directory is released (it can be reopened).
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        let _ = self.stop.send(true);
        self.raft.shutdown().await.map_err(|e| RaftError::Fatal(e.to_string()))?;
        if let Some(closed) = self.store_closed.lock().await.take() {
            tokio::time::timeout(STORE_CLOSE_TIMEOUT, closed)
                .await
                .map_err(|_| RaftError::Other("log store still open after shutdown".into()))?;
        }
        Ok(())
    }
}

fn write_error(e: OrError<TypeConfig, ClientWriteError<TypeConfig>>) -> RaftError {
    match e {
        OrError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            RaftError::ForwardToLeader { leader_id: f.leader_id, leader: f.leader_node }
        }
        OrError::APIError(e) => RaftError::Other(e.to_string()),
        OrError::Fatal(e) => RaftError::Fatal(e.to_string()),
    }
}

/// Mirrors openraft's metrics into a plain tokio watch of [`NodeMetrics`],
/// re-evaluated every heartbeat too: losing quorum contact changes nothing in
/// openraft's metrics, yet must turn `serving` off within `lease`.
fn spawn_metrics(
    raft: &Raft,
    mut stop: watch::Receiver<bool>,
    tick: Duration,
    lease: Duration,
) -> watch::Receiver<NodeMetrics> {
    let mut src = raft.metrics();
    let mut tracker = LeaderTracker::default();
    let first = tracker.update(node_metrics(&src.borrow_watched()), lease);
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                r = src.changed() => if r.is_err() { return },
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let m = tracker.update(node_metrics(&src.borrow_watched()), lease);
            let shut = m.role == Role::Shutdown;
            tx.send_if_modified(|cur| {
                let changed = *cur != m;
                *cur = m;
                changed
            });
            if shut {
                return;
            }
        }
    });
    rx
}

/// Counts leader changes and applies the quorum-contact rule to `serving`.
#[derive(Default)]
struct LeaderTracker {
    last_leader: Option<NodeId>,
    changes: u64,
}

impl LeaderTracker {
    fn update(&mut self, mut m: NodeMetrics, lease: Duration) -> NodeMetrics {
        if m.leader.is_some() && m.leader != self.last_leader {
            self.changes += 1;
            self.last_leader = m.leader;
        }
        m.leader_changes = self.changes;
        let alone = m.voters.len() == 1 && m.voters.contains(&m.node_id);
        let quorum_fresh = alone || m.quorum_acked_at.is_some_and(|t| t.elapsed() < lease);
        m.serving = m.serving && quorum_fresh;
        m
    }
}
