//! Disaster recovery.
//!
//! - [`recover`] (`raftmq recover --data-dir DIR... -o FILE`): reads the data
//!   folders of stopped nodes offline (each node's sled log is copied to a
//!   temporary folder first, so the originals are never written), rebuilds
//!   each node's State from its snapshot plus every entry of its log, and
//!   writes one backup: the newest state (highest last applied log id) is
//!   the base; older folders only add sessions the base lacks and retained
//!   messages newer than the base's. Import it with `ctl backup restore`.
//! - [`watch_quorum`]: a warning in the log and `raftmq_raft_quorum_reachable
//!   0` while this node cannot reach a serving leader (no quorum).

use std::path::{Path, PathBuf};
use std::time::Duration;

use openraft::storage::{RaftLogReader, RaftLogStorage};
use prost::Message as _;

use super::export::{write_backup, Progress};
use super::{pb, BackupError, BackupService, SnapshotAt};
use crate::raft::types::EntryPayload;
use crate::state::{self, Limits, State};
use crate::storage::{LogStore, SnapshotStore};

/// One folder's recovered state.
pub struct Recovered {
    pub dir: PathBuf,
    pub state: State,
    /// (term, index) of the last entry applied.
    pub last: (u64, u64),
    pub members: Vec<pb::Member>,
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

fn members_of(m: &crate::raft::types::StoredMembership) -> Vec<pb::Member> {
    let membership = m.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, a)| pb::Member {
            id: *id,
            cluster_addr: a.cluster_addr.clone(),
            mqtt_addr: a.mqtt_addr.clone(),
            admin_addr: a.admin_addr.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

/// Rebuilds the State of one stopped node's data folder.
pub async fn read_data_dir(dir: &Path, limits: Limits, scratch: &Path) -> Result<Recovered, BackupError> {
    let raft_dir = dir.join("raft");
    let log_dir = raft_dir.join("log");
    if !log_dir.is_dir() {
        return Err(BackupError::Other(format!(
            "{}: no raft/log folder (not a raftmq data folder)",
            dir.display()
        )));
    }
    let snap = SnapshotStore::open(&raft_dir.join("snapshot"))
        .and_then(|s| s.load())
        .map_err(|e| BackupError::Other(format!("{}: snapshot: {e}", dir.display())))?;
    let (mut state, mut last, mut members) = match &snap {
        Some((meta, bytes)) => {
            let st = State::from_snapshot_bytes(bytes, limits)
                .map_err(|e| BackupError::Other(format!("{}: snapshot state: {e}", dir.display())))?;
            let l = meta.last_log_id.map(|l| (l.leader_id.term, l.index)).unwrap_or((0, 0));
            (st, l, members_of(&meta.last_membership))
        }
        None => (State::new(limits), (0, 0), Vec::new()),
    };
    // A copy: opening sled may write (recovery), and the node may hold a lock.
    let copy = scratch.join(format!("log-{}", rand::random::<u64>()));
    copy_dir(&log_dir, &copy)
        .map_err(|e| BackupError::Other(format!("copying {}: {e}", log_dir.display())))?;
    let result = async {
        let mut store =
            LogStore::open(&copy).map_err(|e| BackupError::Other(format!("{}: log: {e}", dir.display())))?;
        // Every entry in the log, not only up to the saved commit index: that
        // index is flushed lazily (it may lag behind entries that did commit),
        // and losing acknowledged data is worse than keeping an operation
        // whose client never got an answer.
        let committed = store.read_committed().await?.map(|l| l.index).unwrap_or(0);
        let end = store.get_log_state().await?.last_log_id.map(|l| l.index);
        let mut reader = store.get_log_reader().await;
        let mut next = last.1 + u64::from(snap.is_some());
        if let Some(end) = end {
            if end > committed {
                tracing::info!(dir = %dir.display(), committed, last = end, "applying entries past the saved commit index");
            }
            while next <= end {
                let entries = reader.try_get_log_entries(next..=end).await?;
                if entries.is_empty() {
                    break;
                }
                for e in entries {
                    match &e.payload {
                        EntryPayload::Normal(b) => {
                            if let Ok(batch) = state::pb::Batch::decode(b.0.clone()) {
                                state.apply_batch(&batch);
                            }
                        }
                        EntryPayload::Membership(m) => {
                            members = members_of(&crate::raft::types::StoredMembership::new(
                                Some(e.log_id),
                                m.clone(),
                            ));
                        }
                        EntryPayload::Blank => {}
                    }
                    last = (e.log_id.leader_id.term, e.log_id.index);
                    next = e.log_id.index + 1;
                }
            }
        }
        drop(reader);
        let closed = store.on_closed();
        drop(store);
        let _ = tokio::time::timeout(Duration::from_secs(10), closed).await;
        Ok::<(), BackupError>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&copy);
    result?;
    Ok(Recovered { dir: dir.to_path_buf(), state, last, members })
}

/// Merges recovered states: the newest is the base; older ones add the
/// sessions it lacks and retained messages newer than its own.
pub fn merge(mut all: Vec<Recovered>) -> Option<(state::pb::Snapshot, (u64, u64), Vec<pb::Member>)> {
    all.sort_by_key(|r| std::cmp::Reverse(r.last));
    let mut it = all.into_iter();
    let base = it.next()?;
    let mut snap = base.state.snapshot();
    for other in it {
        let o = other.state.snapshot();
        for s in o.sessions {
            if let Err(i) = snap.sessions.binary_search_by(|x| x.client_id.cmp(&s.client_id)) {
                snap.sessions.insert(i, s);
            }
        }
        for r in o.retained {
            let Some(m) = &r.message else { continue };
            match snap.retained.binary_search_by(|x| {
                x.message.as_ref().map(|m| m.topic.as_str()).unwrap_or("").cmp(m.topic.as_str())
            }) {
                Ok(i) if snap.retained[i].set_at_ms < r.set_at_ms => snap.retained[i] = r,
                Ok(_) => {}
                Err(i) => snap.retained.insert(i, r),
            }
        }
    }
    Some((snap, base.last, base.members))
}

/// `raftmq recover`: see the module docs. Returns the manifest written.
pub async fn recover(
    dirs: &[PathBuf],
    out: &Path,
    limits: Limits,
    config: &pb::EffectiveConfig,
) -> Result<pb::Manifest, BackupError> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let scratch = parent.join(format!(".raftmq-recover-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut all = Vec::new();
    let mut failure = None;
    for d in dirs {
        match read_data_dir(d, limits, &scratch).await {
            Ok(r) => {
                tracing::info!(dir = %d.display(), term = r.last.0, index = r.last.1,
                    sessions = r.state.session_count(), retained = r.state.retained_count(), "read data folder");
                all.push(r);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if let Some(e) = failure {
        return Err(e);
    }
    let (snap, last, members) =
        merge(all).ok_or_else(|| BackupError::Other("no data folder given".into()))?;
    let at = SnapshotAt { state: snap.encode_to_vec().into(), log_index: last.1, log_term: last.0, members };
    let out = out.to_path_buf();
    let config = config.clone();
    tokio::task::spawn_blocking(move || write_backup(&at, &out, 0, &config, "recover", &Progress::default()))
        .await
        .map_err(|e| BackupError::Other(format!("writer: {e}")))?
}

/// Probes every second whether this node reaches a serving leader (itself,
/// or the leader's `/health/leader`); logs a warning while it does not.
pub async fn watch_quorum(svc: BackupService, stop: tokio_util::sync::CancellationToken) {
    let mut lost_since: Option<tokio::time::Instant> = None;
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let m = svc.raft().metrics();
        let reachable = if m.leader == Some(m.node_id) {
            m.serving
        } else if let Some(addr) = &m.leader_addr {
            matches!(
                crate::admin::client::request(
                    &addr.admin_addr,
                    hyper::Method::GET,
                    "/health/leader",
                    None,
                    &[],
                    None,
                    Duration::from_millis(800),
                )
                .await,
                Ok(r) if r.status == 200
            )
        } else {
            false
        };
        if reachable {
            if lost_since.take().is_some() && warned_at.is_some() {
                tracing::info!("a quorum is reachable again");
            }
            warned_at = None;
            svc.set_quorum(1);
            continue;
        }
        let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
        // A leader election takes well under 3 s; beyond it, say so.
        if since.elapsed() >= Duration::from_secs(3) {
            svc.set_quorum(0);
            if warned_at.is_none_or(|w| w.elapsed() >= Duration::from_secs(30)) {
                warned_at = Some(tokio::time::Instant::now());
                tracing::warn!(
                    node = m.node_id,
                    leader = ?m.leader,
                    voters = ?m.voters,
                    down_for_s = since.elapsed().as_secs(),
                    "NO QUORUM REACHABLE: the cluster cannot accept writes. If a majority of the nodes is lost \
                     for good, see README \"Disaster recovery\" (raftmq recover)"
                );
            }
        }
    }
}

/// `raftmq recover --force-new-cluster NEW_DIR --node-id N --i-accept-data-loss`:
/// when the quorum is lost for good, builds from one surviving node's
/// (stopped) data folder a NEW data folder in which node `node_id` is the only
/// voter, holding the survivor's state (every entry of its log applied) as
/// its snapshot. Started on it (same configuration), the node elects itself
/// and serves; the lost nodes are added back later with wiped data folders
/// and `join = true` (`raftmq ctl add-node`). Whatever only the lost nodes
/// had is gone: hence the loud flag. The survivor's folder is not modified.
pub async fn force_new_cluster(
    survivor: &Path,
    new_dir: &Path,
    node_id: u64,
    limits: Limits,
) -> Result<Recovered, BackupError> {
    use crate::raft::types::{LeaderId, LogId, Membership, NodeAddr, SnapshotMeta, StoredMembership, Vote};
    use openraft::vote::RaftLeaderId as _;
    if new_dir.exists() && std::fs::read_dir(new_dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(BackupError::Other(format!("{} exists and is not empty", new_dir.display())));
    }
    std::fs::create_dir_all(new_dir)?;
    let r = read_data_dir(survivor, limits, new_dir).await?;
    let me = r.members.iter().find(|m| m.id == node_id).ok_or_else(|| {
        let ids: Vec<u64> = r.members.iter().map(|m| m.id).collect();
        BackupError::Other(format!(
            "node {node_id} is not a member of the survivor's cluster (members: {ids:?})"
        ))
    })?;
    let addr = NodeAddr {
        cluster_addr: me.cluster_addr.clone(),
        mqtt_addr: me.mqtt_addr.clone(),
        admin_addr: me.admin_addr.clone(),
    };
    let (term, index) = r.last;
    let log_id = LogId::new(LeaderId::new(term, node_id), index);
    let membership = Membership::new(
        vec![std::collections::BTreeSet::from([node_id])],
        std::collections::BTreeMap::from([(node_id, addr)]),
    )
    .map_err(|e| BackupError::Other(format!("membership: {e}")))?;
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), membership),
    };
    let raft_dir = new_dir.join("raft");
    SnapshotStore::open(&raft_dir.join("snapshot"))
        .and_then(|s| s.save(&meta, &r.state.snapshot_bytes().into()))
        .map_err(|e| BackupError::Other(format!("writing the snapshot: {e}")))?;
    let mut store = LogStore::open(&raft_dir.join("log"))
        .map_err(|e| BackupError::Other(format!("creating the log: {e}")))?;
    // The log starts after the snapshot; the vote is of the last term, so
    // the node's first election is a newer term.
    store.purge(log_id).await?;
    store.save_committed(Some(log_id)).await?;
    store.save_vote(&Vote::new(term, node_id)).await?; // flushes everything
    let closed = store.on_closed();
    drop(store);
    let _ = tokio::time::timeout(Duration::from_secs(10), closed).await;
    Ok(r)
}
