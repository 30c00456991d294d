//! Backup, restore and disaster recovery of the replicated state.
//!
//! Owns: the backup file format ([`format`], proto/backup.proto), export of a
//! consistent copy of the State, validation and restore of a file (which
//! proposes the restore commands applied by `state::restore`), the backup
//! folder and its jobs, scheduled backups with retention, the REST routes
//! ([`http`], mounted by `admin` under `/api/v1/backups`), `raftmq ctl
//! backup` ([`cli`]) and offline recovery from data folders ([`recover`]).
//!
//! Must not touch: the State directly (it reads snapshots and proposes
//! commands through [`RaftNode`]), sled (offline recovery goes through
//! `crate::storage`), the broker.
//!
//! Consistency without stalling the broker: an export asks Raft for a new
//! snapshot (`RaftNode::snapshot`, the same mechanism as log compaction: the
//! state machine copies the State into its protobuf form under the read lock,
//! then encodes it off the lock) and streams the records of that snapshot,
//! which is exactly the state after one log entry (its index and term go in
//! the manifest). Apply continues meanwhile.
//!
//! One job at a time in the cluster: an export or restore first takes the
//! lock in the replicated state (`JobLock`, renewed every
//! [`LOCK_RENEW`] while it runs, lapsing after [`LOCK_TTL`] if its node
//! dies); a second request gets 409 naming the running job.

pub mod cli;
mod export;
pub mod format;
pub mod http;
pub mod recover;
mod restore;

pub mod pb {
    //! Generated from proto/backup.proto.
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/raftmq.backup.rs"));
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::raft::{NodeId, RaftError, RaftNode};
use crate::state::{self, State};
pub use format::FormatError;

/// File name prefix and suffix in the backup folder.
pub const FILE_PREFIX: &str = "raftmq-backup-";
pub const FILE_SUFFIX: &str = ".tar.gz";
/// The job lock lapses this long after its last renewal.
pub const LOCK_TTL: Duration = Duration::from_secs(30);
/// A running job renews its lock this often.
pub const LOCK_RENEW: Duration = Duration::from_secs(5);
/// How long a proposal waits for a leader to be known.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Free disk kept beyond the estimate of what a job writes.
const DISK_MARGIN: u64 = 16 * 1024 * 1024;

/// The `[backup]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// The backup folder; default `<data_dir>/backup`.
    pub dir: Option<PathBuf>,
    /// Scheduled backups every this many seconds (taken by the leader); 0 = off.
    pub interval_s: u64,
    /// Scheduled backups kept on each node (the oldest beyond it are
    /// deleted after a new one); 0 = keep all.
    pub retain: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig { dir: None, interval_s: 0, retain: 7 }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum BackupError {
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("another job is running: {0}")]
    Busy(String),
    #[error("not enough free disk in {dir}: {needed} bytes needed, {free} free")]
    Disk { dir: String, needed: u64, free: u64 },
    #[error("no backup {0}")]
    NotFound(String),
    #[error("raft: {0}")]
    Raft(#[from] RaftError),
    /// No leader could take the proposal (an election, or no quorum).
    #[error("no leader: {0}")]
    NoLeader(String),
    #[error("state: {0}")]
    State(String),
    /// The request conflicts with the cluster's state (409).
    #[error("{0}")]
    Refused(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("{0}")]
    Other(String),
}

impl From<std::io::Error> for BackupError {
    fn from(e: std::io::Error) -> Self {
        BackupError::Other(e.to_string())
    }
}

/// A job's progress, as `GET /api/v1/backups/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    /// "export" or "restore".
    pub kind: String,
    pub node_id: NodeId,
    /// "running", "complete", "failed" or "cancelled".
    pub state: String,
    /// What it does now ("snapshot", "writing", "validating", "applying", ...).
    pub phase: String,
    pub done: u64,
    pub total: u64,
    pub error: Option<String>,
    /// Restore: the backup restored; export: the file written.
    pub backup: Option<String>,
    /// Restore: "merge" or "replace".
    pub mode: Option<String>,
    /// Final counts (sessions, retained, ...).
    pub counts: BTreeMap<String, u64>,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
}

/// One backup file, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub id: String,
    pub node_id: NodeId,
    pub file: String,
    pub created_at: String,
    pub created_at_ms: u64,
    pub size: u64,
    /// "complete", or the state of the export job writing it.
    pub state: String,
}

/// `GET /api/v1/backups/{id}`: the file, its manifest, and the job if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDetail {
    pub info: Option<BackupInfo>,
    pub manifest: Option<ManifestJson>,
    pub job: Option<JobInfo>,
}

/// The manifest in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestJson {
    pub format_version: u32,
    pub cluster_id: String,
    pub nodes: Vec<MemberJson>,
    pub mode: String,
    pub log_index: u64,
    pub log_term: u64,
    pub created_at: String,
    pub created_at_ms: u64,
    pub node_id: u64,
    pub writer_version: String,
    pub content_digest: String,
    pub source: String,
    pub parts: Vec<PartJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberJson {
    pub id: u64,
    pub cluster_addr: String,
    pub mqtt_addr: String,
    pub admin_addr: String,
    pub voter: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartJson {
    pub name: String,
    pub records: u64,
    pub bytes: u64,
    pub sha256: String,
}

impl From<&pb::Manifest> for ManifestJson {
    fn from(m: &pb::Manifest) -> Self {
        ManifestJson {
            format_version: m.format_version,
            cluster_id: m.cluster_id.clone(),
            nodes: m
                .nodes
                .iter()
                .map(|n| MemberJson {
                    id: n.id,
                    cluster_addr: n.cluster_addr.clone(),
                    mqtt_addr: n.mqtt_addr.clone(),
                    admin_addr: n.admin_addr.clone(),
                    voter: n.voter,
                })
                .collect(),
            mode: if m.mode == 1 { "dynsec-sync".into() } else { "full-sync".into() },
            log_index: m.log_index,
            log_term: m.log_term,
            created_at: utc_text(m.created_at_ms),
            created_at_ms: m.created_at_ms,
            node_id: m.node_id,
            writer_version: m.writer_version.clone(),
            content_digest: m.content_digest.clone(),
            source: m.source.clone(),
            parts: m
                .parts
                .iter()
                .map(|p| PartJson {
                    name: p.name.clone(),
                    records: p.records,
                    bytes: p.bytes,
                    sha256: p.sha256.clone(),
                })
                .collect(),
        }
    }
}

/// `GET /api/v1/state/digest`: this replica's state digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestInfo {
    pub node_id: u64,
    pub applied_index: u64,
    /// SHA-256 of the whole snapshot (clock included).
    pub digest: String,
    /// `State::content_digest`: without the clock and the job lock.
    pub content_digest: String,
    pub sessions: u64,
    pub retained: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn utc_parts(ms: u64) -> (i64, u32, u32, u64, u64, u64, u64) {
    let secs = ms / 1000;
    let (y, mo, d) = civil((secs / 86_400) as i64);
    let s = secs % 86_400;
    (y, mo, d, s / 3600, s / 60 % 60, s % 60, ms % 1000)
}

/// `2026-11-21T08:32:04.123Z`.
pub fn utc_text(ms: u64) -> String {
    let (y, mo, d, h, mi, s, milli) = utc_parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// A backup id from its time: `20261121T083204.123Z` (sorts by time).
pub fn id_for(ms: u64) -> String {
    let (y, mo, d, h, mi, s, milli) = utc_parts(ms);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{milli:03}Z")
}

/// Whether `id` has the shape of a backup id (so it is safe in a path).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !id.starts_with('.')
}

pub fn file_name(id: &str) -> String {
    format!("{FILE_PREFIX}{id}{FILE_SUFFIX}")
}

/// The id of a backup file name, if it is one.
pub fn id_of_file(name: &str) -> Option<&str> {
    let id = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
    valid_id(id).then_some(id)
}

/// Free bytes on the file system holding `dir`.
pub fn free_disk(dir: &Path) -> Result<u64, BackupError> {
    fs2::available_space(dir).map_err(|e| BackupError::Other(format!("free disk of {}: {e}", dir.display())))
}

fn check_disk(dir: &Path, needed: u64) -> Result<(), BackupError> {
    let free = free_disk(dir)?;
    let needed = needed.saturating_add(DISK_MARGIN);
    if free < needed {
        return Err(BackupError::Disk { dir: dir.display().to_string(), needed, free });
    }
    Ok(())
}

/// The effective configuration, secrets replaced and listed.
pub fn effective_config(config: &crate::config::Config) -> pb::EffectiveConfig {
    let mut c = config.clone();
    let mut redacted = Vec::new();
    if c.admin.token.as_deref().is_some_and(|t| !t.is_empty()) {
        c.admin.token = Some("<redacted>".into());
        redacted.push("admin.token".to_string());
    }
    pb::EffectiveConfig { text: format!("{c:#?}"), redacted }
}

/// Everything the backup routes and jobs share. Cheap to clone.
#[derive(Clone)]
pub struct BackupService {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: NodeId,
    dir: PathBuf,
    data_dir: PathBuf,
    raft: RaftNode,
    state: Arc<RwLock<State>>,
    config: pb::EffectiveConfig,
    cfg: BackupConfig,
    /// Token of the admin API, to call the peers' APIs.
    token: Option<String>,
    /// Jobs started on this node (bounded: the newest [`MAX_JOBS`] kept).
    jobs: Mutex<BTreeMap<String, JobInfo>>,
    /// 1 while a quorum is reachable from this node (see [`recover::watch_quorum`]).
    quorum: AtomicU8,
}

const MAX_JOBS: usize = 64;

impl BackupService {
    pub fn new(
        config: &crate::config::Config,
        raft: RaftNode,
        state: Arc<RwLock<State>>,
    ) -> Result<BackupService, BackupError> {
        let dir = config.backup.dir.clone().unwrap_or_else(|| config.data_dir.join("backup"));
        std::fs::create_dir_all(&dir).map_err(|e| {
            BackupError::Other(format!("cannot create the backup folder {}: {e}", dir.display()))
        })?;
        Ok(BackupService {
            inner: Arc::new(Inner {
                node_id: config.node_id,
                dir,
                data_dir: config.data_dir.clone(),
                raft,
                state,
                config: effective_config(config),
                cfg: config.backup.clone(),
                token: config.admin.token.clone().filter(|t| !t.is_empty()),
                jobs: Mutex::new(BTreeMap::new()),
                quorum: AtomicU8::new(1),
            }),
        })
    }

    /// Starts the scheduler and the quorum watch; they end with `stop`.
    pub fn spawn_background(&self, stop: tokio_util::sync::CancellationToken) {
        tokio::spawn(recover::watch_quorum(self.clone(), stop.clone()));
        if self.inner.cfg.interval_s > 0 {
            tokio::spawn(export::schedule(self.clone(), stop));
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn raft(&self) -> &RaftNode {
        &self.inner.raft
    }

    pub fn token(&self) -> Option<&str> {
        self.inner.token.as_deref()
    }

    /// 1 while this node reaches a quorum (a serving leader), else 0.
    pub fn quorum_reachable(&self) -> u8 {
        self.inner.quorum.load(Ordering::Relaxed)
    }

    pub(crate) fn set_quorum(&self, v: u8) {
        self.inner.quorum.store(v, Ordering::Relaxed);
    }

    /// Appends this module's Prometheus metrics.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP raftmq_raft_quorum_reachable 1 while this node reaches a serving leader with a quorum.\n\
             # TYPE raftmq_raft_quorum_reachable gauge\nraftmq_raft_quorum_reachable {}",
            self.quorum_reachable()
        );
        let running = self.inner.jobs.lock().values().filter(|j| j.state == "running").count();
        let _ = writeln!(
            out,
            "# HELP raftmq_backup_jobs_running Backup or restore jobs running on this node.\n\
             # TYPE raftmq_backup_jobs_running gauge\nraftmq_backup_jobs_running {running}"
        );
    }

    /// Blocking (it encodes the whole state): call from a blocking thread.
    pub fn digest(&self) -> DigestInfo {
        // An O(1) capture under the lock, the encoding after it: apply does not wait.
        let view = self.inner.state.read().capture();
        let (sessions, retained) = (view.session_count() as u64, view.retained_count() as u64);
        let bytes = view.encode_to_vec();
        drop(view);
        let digest =
            format::hex(&sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes)));
        let content = state::content_digest_of_snapshot(&bytes).map(|d| format::hex(&d)).unwrap_or_default();
        DigestInfo {
            node_id: self.inner.node_id,
            applied_index: self.inner.raft.metrics().applied_index.unwrap_or(0),
            digest,
            content_digest: content,
            sessions,
            retained,
        }
    }

    pub fn path_of(&self, id: &str) -> Option<PathBuf> {
        if !valid_id(id) {
            return None;
        }
        let p = self.inner.dir.join(file_name(id));
        p.is_file().then_some(p)
    }

    /// The backups in this node's folder (and exports running here), oldest first.
    pub fn list_local(&self) -> Vec<BackupInfo> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.inner.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(id) = id_of_file(&name) else { continue };
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                let created_at_ms = format::read_manifest(&e.path()).map(|m| m.created_at_ms).unwrap_or(0);
                out.push(BackupInfo {
                    id: id.to_string(),
                    node_id: self.inner.node_id,
                    file: name,
                    created_at: utc_text(created_at_ms),
                    created_at_ms,
                    size,
                    state: "complete".into(),
                });
            }
        }
        for j in self.inner.jobs.lock().values() {
            if j.kind == "export" && j.state != "complete" && !out.iter().any(|b| b.id == j.id) {
                out.push(BackupInfo {
                    id: j.id.clone(),
                    node_id: j.node_id,
                    file: file_name(&j.id),
                    created_at: utc_text(j.started_at_ms),
                    created_at_ms: j.started_at_ms,
                    size: 0,
                    state: j.state.clone(),
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn job(&self, id: &str) -> Option<JobInfo> {
        self.inner.jobs.lock().get(id).cloned()
    }

    fn put_job(&self, j: JobInfo) {
        let mut jobs = self.inner.jobs.lock();
        jobs.insert(j.id.clone(), j);
        while jobs.len() > MAX_JOBS {
            let oldest = jobs.iter().find(|(_, j)| j.state != "running").map(|(k, _)| k.clone());
            match oldest {
                Some(k) => jobs.remove(&k),
                None => break,
            };
        }
    }

    fn update_job(&self, id: &str, f: impl FnOnce(&mut JobInfo)) {
        if let Some(j) = self.inner.jobs.lock().get_mut(id) {
            f(j);
        }
    }

    /// Deletes a backup file of this node (not one being written).
    pub fn delete(&self, id: &str) -> Result<(), BackupError> {
        if self.job(id).is_some_and(|j| j.state == "running") {
            return Err(BackupError::Busy(format!("export {id} is running")));
        }
        let p = self.path_of(id).ok_or_else(|| BackupError::NotFound(id.to_string()))?;
        std::fs::remove_file(&p)?;
        Ok(())
    }

    /// Proposes commands through the leader (this node, or the leader's
    /// admin API); returns each command's error, if any.
    /// While no leader is known (an election), it retries for [`LEADER_WAIT`].
    pub async fn propose(&self, cmds: Vec<state::pb::Command>) -> Result<Vec<Option<String>>, BackupError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match self.propose_once(&cmds).await {
                Err(BackupError::NoLeader(why)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%why, "no leader to propose to; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => return r,
            }
        }
    }

    async fn propose_once(&self, cmds: &[state::pb::Command]) -> Result<Vec<Option<String>>, BackupError> {
        let batch = state::pb::Batch { now_ms: now_ms(), commands: cmds.to_vec() };
        let raft = &self.inner.raft;
        if raft.is_leader() {
            return match raft.propose(&batch).await {
                Ok(results) => Ok(results_to_errors(results)),
                Err(e @ RaftError::ForwardToLeader { .. }) => Err(BackupError::NoLeader(e.to_string())),
                Err(e) => Err(e.into()),
            };
        }
        http::propose_via_leader(self, &batch).await
    }

    /// Takes (or renews) the cluster-wide job lock.
    pub async fn lock(&self, id: &str, kind: &str) -> Result<(), BackupError> {
        let job = state::pb::ClusterJob {
            id: id.to_string(),
            kind: kind.to_string(),
            node_id: self.inner.node_id,
            expires_at_ms: 0,
        };
        let cmd = state::pb::command::Cmd::JobLock(state::pb::JobLock {
            job: Some(job),
            ttl_ms: LOCK_TTL.as_millis() as u64,
        });
        let errs = self.propose(vec![state::pb::Command { cmd: Some(cmd) }]).await?;
        match errs.into_iter().next().flatten() {
            None => Ok(()),
            Some(e) => Err(BackupError::Busy(e.trim_start_matches("busy: ").to_string())),
        }
    }

    pub async fn unlock(&self, id: &str) {
        let cmd = state::pb::command::Cmd::JobRelease(state::pb::JobRelease { id: id.to_string() });
        if let Err(e) = self.propose(vec![state::pb::Command { cmd: Some(cmd) }]).await {
            tracing::warn!(job = id, error = %e, "could not release the backup lock (it lapses by itself)");
        }
    }

    /// Renews the lock of job `id` until `done` fires.
    fn spawn_renewal(&self, id: String, kind: &'static str) -> tokio_util::sync::DropGuard {
        let token = tokio_util::sync::CancellationToken::new();
        let guard = token.clone().drop_guard();
        let svc = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(LOCK_RENEW) => {}
                }
                if let Err(e) = svc.lock(&id, kind).await {
                    tracing::warn!(job = %id, error = %e, "could not renew the backup lock");
                }
            }
        });
        guard
    }

    /// Members and their addresses now (from the Raft membership).
    pub fn members(&self) -> Vec<(NodeId, crate::raft::NodeAddr, bool)> {
        use openraft::async_runtime::watch::WatchReceiver as _;
        let m = self.inner.raft.raft().metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        membership.nodes().map(|(id, addr)| (*id, addr.clone(), voters.contains(id))).collect()
    }
}

fn results_to_errors(results: crate::raft::ProposeResults) -> Vec<Option<String>> {
    results.into_iter().map(|r| r.err().map(|e| e.to_string())).collect()
}

/// Encoded cluster id of a membership: the first 16 hex digits of the
/// SHA-256 of its sorted `id=cluster_addr` list.
pub fn cluster_id(members: &[pb::Member]) -> String {
    let mut v: Vec<String> = members.iter().map(|m| format!("{}={}", m.id, m.cluster_addr)).collect();
    v.sort();
    let d = <sha2::Sha256 as sha2::Digest>::digest(v.join(",").as_bytes());
    format::hex(&d[..8])
}

/// The encoded state snapshot as bytes plus where it is in the log.
pub struct SnapshotAt {
    pub state: Bytes,
    pub log_index: u64,
    pub log_term: u64,
    pub members: Vec<pb::Member>,
}

/// Decodes a snapshot's cluster settings without the job lock.
fn cluster_settings_of(snapshot: &[u8]) -> Result<state::pb::ClusterSettings, BackupError> {
    let mut out = state::pb::ClusterSettings::default();
    state::for_each_field(snapshot, |tag, _, payload| {
        if tag == state::SNAPSHOT_FIELD_CLUSTER {
            out = state::pb::ClusterSettings::decode(payload)?;
        }
        Ok(())
    })
    .map_err(|e| BackupError::State(e.to_string()))?;
    out.job = None;
    Ok(out)
}

#[cfg(test)]
mod tests;
