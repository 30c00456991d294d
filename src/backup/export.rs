//! Export: a snapshot at one log index -> a backup file; and the scheduler.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::format::{self, PartWriter};
use super::{
    cluster_settings_of, id_for, now_ms, pb, BackupError, BackupService, JobInfo, SnapshotAt, FILE_PREFIX,
};
use crate::state;

/// How long the snapshot an export reads may take to build.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Progress and cancellation shared with the blocking writer.
#[derive(Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub cancel: AtomicBool,
}

/// Writes the backup of `snap` to `out` (blocking). Temporary parts go to a
/// folder next to `out`, removed afterwards.
pub fn write_backup(
    snap: &SnapshotAt,
    out: &Path,
    node_id: u64,
    config: &pb::EffectiveConfig,
    source: &str,
    progress: &Progress,
) -> Result<pb::Manifest, BackupError> {
    let tmp: PathBuf = out.with_extension("gz.parts");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let result = write_parts(snap, out, &tmp, node_id, config, source, progress);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn write_parts(
    snap: &SnapshotAt,
    out: &Path,
    tmp: &Path,
    node_id: u64,
    config: &pb::EffectiveConfig,
    source: &str,
    progress: &Progress,
) -> Result<pb::Manifest, BackupError> {
    let bytes = &snap.state[..];
    let mut total = 0u64;
    let mut state_now_ms = 0u64;
    state::for_each_field(bytes, |tag, _, payload| {
        match tag {
            state::SNAPSHOT_FIELD_SESSIONS | state::SNAPSHOT_FIELD_RETAINED => total += 1,
            state::SNAPSHOT_FIELD_NOW => {
                let mut p = payload;
                state_now_ms = prost::encoding::decode_varint(&mut p)?;
            }
            _ => {}
        }
        Ok(())
    })
    .map_err(|e| BackupError::State(e.to_string()))?;
    progress.total.store(total, Ordering::Relaxed);

    let mut sessions = PartWriter::create(tmp, format::PART_SESSIONS)?;
    let mut retained = PartWriter::create(tmp, format::PART_RETAINED)?;
    let mut done = 0u64;
    let mut failed: Option<BackupError> = None;
    state::for_each_field(bytes, |tag, _, payload| {
        let r = match tag {
            state::SNAPSHOT_FIELD_SESSIONS => sessions.raw(payload),
            state::SNAPSHOT_FIELD_RETAINED => retained.raw(payload),
            _ => return Ok(()),
        };
        if let Err(e) = r {
            failed = Some(e.into());
            return Err(state::StateError::InvalidSnapshot("write failed".into()));
        }
        done += 1;
        if done % 1024 == 0 {
            progress.done.store(done, Ordering::Relaxed);
            if progress.cancel.load(Ordering::Relaxed) {
                failed = Some(BackupError::Cancelled("membership changed during the export".into()));
                return Err(state::StateError::InvalidSnapshot("cancelled".into()));
            }
        }
        Ok(())
    })
    .map_err(|e| failed.take().unwrap_or_else(|| BackupError::State(e.to_string())))?;
    progress.done.store(done, Ordering::Relaxed);

    let settings = cluster_settings_of(bytes)?;
    let mut cluster = PartWriter::create(tmp, format::PART_CLUSTER)?;
    cluster.record(&settings)?;
    let mut cfg = PartWriter::create(tmp, format::PART_CONFIG)?;
    cfg.record(config)?;
    // One record, the encoded raftmq.dynsec.DynsecState; no part when dynamic
    // security is not initialised.
    let mut dynsec = None;
    state::for_each_field(bytes, |tag, _, payload| {
        if tag == state::SNAPSHOT_FIELD_DYNSEC {
            dynsec = Some(payload);
        }
        Ok(())
    })
    .map_err(|e| BackupError::State(e.to_string()))?;
    let dynsec = match dynsec {
        Some(payload) => {
            let mut w = PartWriter::create(tmp, format::PART_DYNSEC)?;
            w.raw(payload)?;
            Some(w)
        }
        None => None,
    };

    let content_digest =
        state::content_digest_of_snapshot(bytes).map_err(|e| BackupError::State(e.to_string()))?;
    let mut parts = Vec::new();
    let mut files = Vec::new();
    for w in [sessions, retained, cluster, cfg].into_iter().chain(dynsec) {
        let (p, f) = w.finish()?;
        parts.push(p);
        files.push(f);
    }
    if progress.cancel.load(Ordering::Relaxed) {
        return Err(BackupError::Cancelled("membership changed during the export".into()));
    }
    let manifest = pb::Manifest {
        magic: format::MAGIC.into(),
        format_version: format::FORMAT_VERSION,
        cluster_id: super::cluster_id(&snap.members),
        nodes: snap.members.clone(),
        mode: settings.mode as u32,
        log_index: snap.log_index,
        log_term: snap.log_term,
        created_at_ms: now_ms(),
        node_id,
        writer_version: env!("CARGO_PKG_VERSION").into(),
        parts,
        state_now_ms,
        content_digest: format::hex(&content_digest),
        source: source.into(),
    };
    format::write_archive(out, &manifest, &files)?;
    Ok(manifest)
}

fn members_key(svc: &BackupService) -> Vec<(u64, bool)> {
    let mut v: Vec<(u64, bool)> = svc.members().into_iter().map(|(id, _, voter)| (id, voter)).collect();
    v.sort_unstable();
    v
}

impl BackupService {
    /// Starts an export: checks the disk, takes the cluster lock (Busy when
    /// another job holds it), then writes in the background. Returns the id.
    pub async fn start_export(&self) -> Result<String, BackupError> {
        // Estimate: the newest snapshot's size, twice (parts + archive).
        let estimate = std::fs::metadata(self.raft_snapshot_file()).map(|m| m.len()).unwrap_or(0);
        super::check_disk(self.dir(), estimate.saturating_mul(2))?;
        let started = now_ms();
        let mut id = id_for(started);
        if self.path_of(&id).is_some() || self.job(&id).is_some() {
            id = id_for(started + 1);
        }
        self.lock(&id, "export").await?;
        let job = JobInfo {
            id: id.clone(),
            kind: "export".into(),
            node_id: self.node_id(),
            state: "running".into(),
            phase: "snapshot".into(),
            done: 0,
            total: 0,
            error: None,
            backup: Some(id.clone()),
            mode: None,
            counts: BTreeMap::new(),
            started_at_ms: started,
            finished_at_ms: None,
        };
        self.put_job(job);
        let svc = self.clone();
        let job_id = id.clone();
        tokio::spawn(async move {
            let renewal = svc.spawn_renewal(job_id.clone(), "export");
            let result = svc.run_export(&job_id).await;
            drop(renewal);
            svc.unlock(&job_id).await;
            svc.finish_job(&job_id, result);
        });
        Ok(id)
    }

    fn raft_snapshot_file(&self) -> PathBuf {
        self.inner.data_dir.join("raft").join("snapshot").join("snapshot.bin")
    }

    pub(crate) fn finish_job(&self, id: &str, result: Result<BTreeMap<String, u64>, BackupError>) {
        self.update_job(id, |j| {
            j.finished_at_ms = Some(now_ms());
            match result {
                Ok(counts) => {
                    j.state = "complete".into();
                    j.phase = "done".into();
                    j.done = j.total.max(j.done);
                    j.counts = counts;
                }
                Err(BackupError::Cancelled(why)) => {
                    j.state = "cancelled".into();
                    j.error = Some(why);
                }
                Err(e) => {
                    j.state = "failed".into();
                    j.error = Some(e.to_string());
                }
            }
        });
        if let Some(j) = self.job(id) {
            tracing::info!(job = id, kind = %j.kind, state = %j.state, error = ?j.error, counts = ?j.counts, "backup job ended");
        }
    }

    async fn run_export(&self, id: &str) -> Result<BTreeMap<String, u64>, BackupError> {
        let before = members_key(self);
        let t0 = tokio::time::Instant::now();
        self.raft().snapshot(SNAPSHOT_TIMEOUT).await?;
        let snapshot_ms = t0.elapsed().as_millis() as u64;
        let snap = self
            .raft()
            .raft()
            .get_snapshot()
            .await
            .map_err(|e| BackupError::Other(format!("reading the snapshot: {e}")))?
            .ok_or_else(|| BackupError::Other("no snapshot was built".into()))?;
        let (log_index, log_term) =
            snap.meta.last_log_id.map(|l| (l.index, l.leader_id.term)).unwrap_or((0, 0));
        let membership = snap.meta.last_membership.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members: Vec<pb::Member> = membership
            .nodes()
            .map(|(id, a)| pb::Member {
                id: *id,
                cluster_addr: a.cluster_addr.clone(),
                mqtt_addr: a.mqtt_addr.clone(),
                admin_addr: a.admin_addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let at = SnapshotAt { state: snap.snapshot, log_index, log_term, members };
        super::check_disk(self.dir(), (at.state.len() as u64).saturating_mul(2))?;
        self.update_job(id, |j| j.phase = "writing".into());
        let progress = Arc::new(Progress::default());
        let out = self.dir().join(super::file_name(id));
        let writer = {
            let progress = progress.clone();
            let node = self.node_id();
            let config = self.inner.config.clone();
            let out = out.clone();
            tokio::task::spawn_blocking(move || write_backup(&at, &out, node, &config, "export", &progress))
        };
        tokio::pin!(writer);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let manifest = loop {
            tokio::select! {
                r = &mut writer => break r.map_err(|e| BackupError::Other(format!("writer: {e}")))??,
                _ = tick.tick() => {
                    let (done, total) =
                        (progress.done.load(Ordering::Relaxed), progress.total.load(Ordering::Relaxed));
                    self.update_job(id, |j| { j.done = done; j.total = total; });
                    if members_key(self) != before {
                        progress.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        };
        if members_key(self) != before {
            let _ = std::fs::remove_file(&out);
            return Err(BackupError::Cancelled("membership changed during the export".into()));
        }
        let mut counts = BTreeMap::new();
        counts.insert("snapshot_ms".into(), snapshot_ms);
        counts.insert("write_ms".into(), t0.elapsed().as_millis() as u64 - snapshot_ms);
        for p in &manifest.parts {
            counts.insert(p.name.trim_end_matches(".pbd").to_string(), p.records);
        }
        counts.insert("log_index".into(), manifest.log_index);
        counts.insert("bytes".into(), std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0));
        Ok(counts)
    }

    /// Deletes the oldest backups of this node beyond `retain`.
    fn apply_retention(&self, retain: usize) {
        if retain == 0 {
            return;
        }
        let mut files: Vec<String> = std::fs::read_dir(self.dir())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with(FILE_PREFIX) && super::id_of_file(n).is_some())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        while files.len() > retain {
            let old = files.remove(0);
            match std::fs::remove_file(self.dir().join(&old)) {
                Ok(()) => tracing::info!(file = %old, "deleted an old backup (retention)"),
                Err(e) => tracing::warn!(file = %old, error = %e, "could not delete an old backup"),
            }
        }
    }
}

/// Scheduled backups: every `interval_s`, the leader exports; retention
/// applies after each success.
pub async fn schedule(svc: BackupService, stop: tokio_util::sync::CancellationToken) {
    let interval = Duration::from_secs(svc.inner.cfg.interval_s);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !svc.raft().metrics().serving {
            continue;
        }
        match svc.start_export().await {
            Ok(id) => {
                // Wait for it to end (bounded by the lock's lifetime checks).
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    match svc.job(&id) {
                        Some(j) if j.state == "running" => continue,
                        Some(j) if j.state == "complete" => {
                            svc.apply_retention(svc.inner.cfg.retain);
                            break;
                        }
                        _ => break,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "scheduled backup not taken"),
        }
    }
}
