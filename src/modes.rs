//! The two modes of a cluster (DESIGN.md "Two modes, one binary") and the
//! switch between them.
//!
//! Every node of a cluster runs two Raft groups, each under a broker:
//! - the **cluster group** (all members; `state::State` replicated through
//!   the log): dynamic security and cluster settings in both modes, and in
//!   full-sync everything else too. Its broker serves only on the leader,
//!   and only in full-sync.
//! - the **local group**: a Raft group of one, on this node's disk only
//!   (`<data_dir>/local`). Its broker serves on every node, only in
//!   dynsec-sync: the node's own sessions, retained messages and queues,
//!   durable across restarts, never replicated. Both brokers share the
//!   authenticator, which reads dynamic security from the cluster group, so a
//!   change made through any node applies on every node.
//!
//! [`run`] follows the mode (`ClusterSettings.mode`, changed by `SetMode`)
//! and moves the gates that let each broker serve:
//! - **to dynsec-sync**: the cluster broker steps down (clients are told to
//!   use another server and reconnect through the load balancer); each node
//!   imports the cluster's sessions and retained messages into its local
//!   state once per switch (`mode_epoch` / `imported_epoch`, merge rules of a
//!   live restore), then serves. So a client finds its session on whichever
//!   node the load balancer picks. Nodes that are down at the switch start
//!   with their local state as it was.
//! - **to full-sync**: `SetMode` empties the cluster state's sessions and
//!   retained messages (the copy handed over at the previous switch); each
//!   node stops its local broker and merges its local state into the cluster
//!   state through the leader (merge rules: a session that exists is kept,
//!   subscriptions added, queued messages appended; for a retained topic the
//!   newest wins), then empties its local state. A node that is down then
//!   does it when it comes back. Nothing is dropped silently.
//!
//! Must not touch: the brokers' internals (it only moves gates and proposes
//! commands) or sockets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backup::BackupService;
use crate::broker::Broker;
use crate::raft::RaftNode;
use crate::state::{pb, State};

/// A restore chunk stays well below one log entry's size limit.
const CHUNK_BYTES: usize = 1 << 20;
/// Lock time of a local import (renewed by each step).
const LOCAL_LOCK_TTL_MS: u64 = 60_000;
/// How often the switch is retried after a failure (no leader, lock busy).
const RETRY: Duration = Duration::from_secs(1);
/// How long the local broker may take to disconnect its clients.
const DRAIN: Duration = Duration::from_secs(10);

/// What decides which broker takes a new connection. Cheap to read.
#[derive(Debug)]
pub struct Gates {
    /// The cluster broker may serve (full-sync).
    full: watch::Sender<bool>,
    /// The local broker may serve (dynsec-sync, handover imported).
    local: watch::Sender<bool>,
    /// New connections go to the local broker (dynsec-sync).
    dynsec: AtomicBool,
}

impl Default for Gates {
    fn default() -> Self {
        Self::new()
    }
}

impl Gates {
    /// Full-sync until [`run`] reads the mode: a node serves as before.
    pub fn new() -> Gates {
        Gates {
            full: watch::Sender::new(true),
            local: watch::Sender::new(false),
            dynsec: AtomicBool::new(false),
        }
    }

    pub fn full(&self) -> watch::Receiver<bool> {
        self.full.subscribe()
    }

    pub fn local(&self) -> watch::Receiver<bool> {
        self.local.subscribe()
    }

    /// New connections go to the local broker.
    pub fn dynsec(&self) -> bool {
        self.dynsec.load(Ordering::Relaxed)
    }
}

/// The cluster group as the local broker's control API: dynamic-security
/// requests its clients send are applied in the cluster group, here on the
/// leader or through the leader's admin API.
pub struct ClusterControl {
    pub raft: RaftNode,
    pub state: Arc<RwLock<State>>,
    /// The admin API token (`[admin] token`) for the leader's API.
    pub token: Option<String>,
}

/// A control request waits at most this long for the leader.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl crate::broker::ControlApi for ClusterControl {
    fn initialised(&self) -> bool {
        self.state.read().dynsec().is_some()
    }

    fn submit(
        &self,
        prepared: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        let raft = self.raft.clone();
        let token = self.token.clone();
        Box::pin(async move {
            if raft.is_leader() {
                let c = pb::DynsecControl { request: prepared.into() };
                let applied = raft
                    .apply_command(cmd(pb::command::Cmd::DynsecControl(c)))
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(applied.dynsec_response.unwrap_or_default());
            }
            let m = raft.metrics();
            let admin = m.leader_addr.map(|a| a.admin_addr).ok_or("no leader known")?;
            let path = format!("{}/dynsec/control", crate::admin::API_PREFIX);
            let resp = crate::admin::client::request(
                &admin,
                hyper::Method::POST,
                &path,
                token.as_deref(),
                &[],
                Some(prepared.into()),
                CONTROL_TIMEOUT,
            )
            .await
            .map_err(|e| format!("leader's admin API: {e}"))?;
            if resp.status != 200 {
                return Err(format!("leader's admin API: HTTP {}", resp.status));
            }
            Ok(resp.body.to_vec())
        })
    }
}

/// The local group of a node and what switching needs.
pub struct Switch {
    pub gates: Arc<Gates>,
    pub cluster_raft: RaftNode,
    pub cluster_state: Arc<RwLock<State>>,
    pub local_raft: RaftNode,
    pub local_state: Arc<RwLock<State>>,
    pub local_broker: Broker,
    /// Proposes into the cluster group through its leader, with the job lock.
    pub backup: BackupService,
}

fn cmd(c: pb::command::Cmd) -> pb::Command {
    pb::Command { cmd: Some(c) }
}

/// Sessions and retained messages in restore chunks of bounded size.
fn chunks(id: &str, snap: pb::Snapshot) -> Vec<pb::RestoreChunk> {
    let mode = pb::RestoreMode::Merge as i32;
    let mut out = Vec::new();
    let mut cur = pb::RestoreChunk { id: id.into(), mode, ..Default::default() };
    let mut bytes = 0usize;
    let flush = |cur: &mut pb::RestoreChunk, bytes: &mut usize, out: &mut Vec<pb::RestoreChunk>| {
        if *bytes > 0 {
            out.push(std::mem::replace(cur, pb::RestoreChunk { id: id.into(), mode, ..Default::default() }));
            *bytes = 0;
        }
    };
    for s in snap.sessions {
        bytes += s.encoded_len() + 8;
        cur.sessions.push(s);
        if bytes >= CHUNK_BYTES {
            flush(&mut cur, &mut bytes, &mut out);
        }
    }
    for r in snap.retained {
        bytes += r.encoded_len() + 8;
        cur.retained.push(r);
        if bytes >= CHUNK_BYTES {
            flush(&mut cur, &mut bytes, &mut out);
        }
    }
    flush(&mut cur, &mut bytes, &mut out);
    out
}

impl Switch {
    fn mode(&self) -> (bool, u64) {
        let st = self.cluster_state.read();
        let c = st.cluster_settings();
        (c.mode == pb::Mode::DynsecSync as i32, c.mode_epoch)
    }

    fn local_has_content(&self) -> bool {
        let st = self.local_state.read();
        st.session_count() > 0 || st.retained_count() > 0
    }

    async fn local(&self, c: pb::command::Cmd) -> Result<(), String> {
        self.local_raft.apply_command(cmd(c)).await.map(drop).map_err(|e| e.to_string())
    }

    async fn local_lock(&self, id: &str, kind: &str) -> Result<(), String> {
        let job = pb::ClusterJob {
            id: id.into(),
            kind: kind.into(),
            node_id: self.local_raft.id(),
            expires_at_ms: 0,
        };
        self.local(pb::command::Cmd::JobLock(pb::JobLock { job: Some(job), ttl_ms: LOCAL_LOCK_TTL_MS })).await
    }

    /// Dynsec-sync: the cluster state (as this replica holds it after the
    /// switch) merged into the local state, once per switch.
    async fn import(&self, epoch: u64) -> Result<(), String> {
        // Capture under the lock (O(1)), convert after it.
        let view = self.cluster_state.read().capture();
        let snap = view.to_pb();
        let (sessions, retained) = (snap.sessions.len(), snap.retained.len());
        let id = format!("mode-import-{epoch}");
        let merge = pb::RestoreMode::Merge as i32;
        self.local_lock(&id, "mode-import").await?;
        let result = async {
            self.local(pb::command::Cmd::RestoreBegin(pb::RestoreBegin { id: id.clone(), mode: merge }))
                .await?;
            for chunk in chunks(&id, snap) {
                self.local(pb::command::Cmd::RestoreChunk(chunk)).await?;
            }
            let end = pb::RestoreEnd { id: id.clone(), mode: merge, ..Default::default() };
            self.local(pb::command::Cmd::RestoreEnd(end)).await?;
            self.local(pb::command::Cmd::MarkImported(pb::MarkImported { epoch })).await
        }
        .await;
        let _ = self.local(pb::command::Cmd::JobRelease(pb::JobRelease { id })).await;
        result?;
        info!(
            sessions,
            retained, "dynsec-sync: the cluster's sessions and retained messages are served here too"
        );
        Ok(())
    }

    /// Full-sync: this node's local state merged into the cluster state
    /// through the leader, then emptied.
    async fn merge_back(&self) -> Result<(), String> {
        if !self.local_broker.wait_stepped_down(DRAIN).await {
            return Err("the local broker still has clients".into());
        }
        // Its clients are gone: they moved to the leader, they did not die.
        self.local(pb::command::Cmd::ResetConnections(pb::ResetConnections { publish_wills: false })).await?;
        let view = self.local_state.read().capture();
        let snap = view.to_pb();
        let (sessions, retained) = (snap.sessions.len(), snap.retained.len());
        let id = format!("mode-merge-{}-{}", self.local_raft.id(), crate::backup::now_ms());
        let merge = pb::RestoreMode::Merge as i32;
        self.backup.lock(&id, "mode-merge").await.map_err(|e| e.to_string())?;
        let mut steps =
            vec![cmd(pb::command::Cmd::RestoreBegin(pb::RestoreBegin { id: id.clone(), mode: merge }))];
        steps.extend(chunks(&id, snap).into_iter().map(|c| cmd(pb::command::Cmd::RestoreChunk(c))));
        steps.push(cmd(pb::command::Cmd::RestoreEnd(pb::RestoreEnd {
            id: id.clone(),
            mode: merge,
            ..Default::default()
        })));
        let mut result = Ok(());
        for step in steps {
            match self.backup.propose(vec![step]).await {
                Ok(errs) => {
                    if let Some(e) = errs.into_iter().flatten().next() {
                        result = Err(e);
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            }
        }
        self.backup.unlock(&id).await;
        result?;
        // Merged: empty the local state so a later switch starts clean.
        let clear = format!("mode-clear-{}", crate::backup::now_ms());
        let replace = pb::RestoreMode::Replace as i32;
        self.local_lock(&clear, "mode-clear").await?;
        let cleared = async {
            self.local(pb::command::Cmd::RestoreBegin(pb::RestoreBegin { id: clear.clone(), mode: replace }))
                .await?;
            let end = pb::RestoreEnd {
                id: clear.clone(),
                mode: replace,
                cluster: Some(self.local_state.read().cluster_settings().clone()),
                dynsec: Default::default(),
            };
            self.local(pb::command::Cmd::RestoreEnd(end)).await
        }
        .await;
        let _ = self.local(pb::command::Cmd::JobRelease(pb::JobRelease { id: clear })).await;
        cleared?;
        info!(
            sessions,
            retained, "full-sync: this node's local sessions and retained messages merged into the cluster"
        );
        Ok(())
    }

    /// One look at the mode; returns when there is nothing left to do now.
    async fn step(&self) -> Result<(), String> {
        let (dynsec, epoch) = self.mode();
        self.gates.dynsec.store(dynsec, Ordering::Relaxed);
        if dynsec {
            self.gates.full.send_if_modified(|v| std::mem::replace(v, false));
            let imported = self.local_state.read().cluster_settings().imported_epoch;
            if imported < epoch {
                self.gates.local.send_if_modified(|v| std::mem::replace(v, false));
                self.import(epoch).await?;
            }
            self.gates.local.send_if_modified(|v| !std::mem::replace(v, true));
        } else {
            self.gates.local.send_if_modified(|v| std::mem::replace(v, false));
            self.gates.full.send_if_modified(|v| !std::mem::replace(v, true));
            if self.local_has_content() {
                self.merge_back().await?;
            }
        }
        Ok(())
    }
}

/// Follows the mode until `stop` (see the module docs).
pub async fn run(switch: Switch, stop: CancellationToken) {
    let mut cluster = switch.cluster_raft.subscribe();
    loop {
        let wait = match switch.step().await {
            Ok(()) => None,
            Err(e) => {
                warn!(error = %e, "mode switch not finished; retrying");
                Some(RETRY)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = cluster.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(5))) => {}
        }
    }
}
