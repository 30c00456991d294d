//! Restore: validate the whole file first (nothing changes on a bad file),
//! take the cluster lock, then propose `RestoreBegin`, the records in chunks
//! (`RestoreChunk`, each one log entry) and `RestoreEnd` through the leader.

use std::collections::BTreeMap;
use std::path::PathBuf;

use prost::Message as _;

use super::format::{self, FormatError, PartVisitor};
use super::{id_for, now_ms, BackupError, BackupService, JobInfo};
use crate::state::pb as spb;

/// A chunk is proposed once its records reach this many bytes.
const CHUNK_BYTES: usize = 128 * 1024;
/// After each chunk the restore pauses as long as the chunk took to commit
/// (times this fraction), so a restore leaves the nodes room for client
/// traffic and heartbeats: back to back, large entries starved heartbeats on
/// a loaded machine and cost leadership (docs/BENCHMARKS.md).
const PACE: f64 = 1.0;
/// Chunks proposed before waiting for their results (bounded).
const CHUNK_QUEUE: usize = 4;

/// Restore mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Merge,
    Replace,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "merge" => Some(Mode::Merge),
            "replace" => Some(Mode::Replace),
            _ => None,
        }
    }
    fn pb(self) -> i32 {
        match self {
            Mode::Merge => spb::RestoreMode::Merge as i32,
            Mode::Replace => spb::RestoreMode::Replace as i32,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Merge => "merge",
            Mode::Replace => "replace",
        }
    }
}

/// Collects records into chunks and hands full ones to a bounded channel.
struct Chunker {
    id: String,
    mode: i32,
    cur: spb::RestoreChunk,
    bytes: usize,
    tx: tokio::sync::mpsc::Sender<spb::RestoreChunk>,
    cluster: Option<spb::ClusterSettings>,
    dynsec: Vec<u8>,
}

impl Chunker {
    fn flush(&mut self) -> Result<(), FormatError> {
        if self.cur.sessions.is_empty() && self.cur.retained.is_empty() {
            return Ok(());
        }
        let next = spb::RestoreChunk { id: self.id.clone(), mode: self.mode, ..Default::default() };
        let chunk = std::mem::replace(&mut self.cur, next);
        self.bytes = 0;
        // The applying side stopped (it failed): stop reading.
        self.tx.blocking_send(chunk).map_err(|_| FormatError::Corrupt("restore stopped".into()))
    }
}

impl PartVisitor for Chunker {
    fn record(&mut self, name: &str, rec: Vec<u8>) -> Result<(), FormatError> {
        let bad = |e: prost::DecodeError| FormatError::Corrupt(format!("{name}: {e}"));
        let len = rec.len();
        match name {
            format::PART_SESSIONS => {
                self.cur.sessions.push(spb::SessionState::decode(&rec[..]).map_err(bad)?)
            }
            format::PART_RETAINED => {
                self.cur.retained.push(spb::RetainedMessage::decode(&rec[..]).map_err(bad)?)
            }
            format::PART_CLUSTER => self.cluster = Some(spb::ClusterSettings::decode(&rec[..]).map_err(bad)?),
            format::PART_DYNSEC => self.dynsec = rec,
            _ => return Ok(()),
        }
        self.bytes += len;
        if self.bytes >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

fn cmd(c: spb::command::Cmd) -> spb::Command {
    spb::Command { cmd: Some(c) }
}

impl BackupService {
    /// Validates `path` (errors say what is wrong; nothing changed), takes
    /// the lock, and restores in the background. Returns the job id.
    pub async fn start_restore(
        &self,
        path: PathBuf,
        backup: &str,
        mode: Mode,
    ) -> Result<String, BackupError> {
        let p = path.clone();
        let manifest = tokio::task::spawn_blocking(move || format::validate(&p))
            .await
            .map_err(|e| BackupError::Other(format!("validator: {e}")))??;
        let total: u64 = manifest
            .parts
            .iter()
            .filter(|p| p.name == format::PART_SESSIONS || p.name == format::PART_RETAINED)
            .map(|p| p.records)
            .sum();
        if mode == Mode::Replace {
            let online = self.inner.state.read().sessions().filter(|(_, s)| s.online()).count();
            if online > 0 {
                return Err(BackupError::Refused(format!(
                    "replace needs a cluster without connected persistent sessions ({online} connected): \
                     disconnect them, or restore with mode merge"
                )));
            }
        }
        let id = format!("restore-{}", id_for(now_ms()));
        self.lock(&id, "restore").await?;
        self.put_job(JobInfo {
            id: id.clone(),
            kind: "restore".into(),
            node_id: self.node_id(),
            state: "running".into(),
            phase: "applying".into(),
            done: 0,
            total,
            error: None,
            backup: Some(backup.to_string()),
            mode: Some(mode.name().into()),
            counts: BTreeMap::new(),
            started_at_ms: now_ms(),
            finished_at_ms: None,
        });
        let svc = self.clone();
        let job = id.clone();
        tokio::spawn(async move {
            let renewal = svc.spawn_renewal(job.clone(), "restore");
            let result = svc.run_restore(&job, path, mode).await;
            drop(renewal);
            svc.unlock(&job).await;
            svc.finish_job(&job, result);
        });
        Ok(id)
    }

    async fn propose_one(&self, c: spb::command::Cmd) -> Result<(), BackupError> {
        match self.propose(vec![cmd(c)]).await?.into_iter().next().flatten() {
            None => Ok(()),
            Some(e) => Err(BackupError::State(e)),
        }
    }

    async fn run_restore(
        &self,
        id: &str,
        path: PathBuf,
        mode: Mode,
    ) -> Result<BTreeMap<String, u64>, BackupError> {
        self.propose_one(spb::command::Cmd::RestoreBegin(spb::RestoreBegin {
            id: id.into(),
            mode: mode.pb(),
        }))
        .await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<spb::RestoreChunk>(CHUNK_QUEUE);
        let mut chunker = Chunker {
            id: id.into(),
            mode: mode.pb(),
            cur: spb::RestoreChunk { id: id.into(), mode: mode.pb(), ..Default::default() },
            bytes: 0,
            tx,
            cluster: None,
            dynsec: Vec::new(),
        };
        // Second pass: read and chunk on a blocking thread; hashes are checked
        // again (a file changed since validation fails the restore).
        let reader = tokio::task::spawn_blocking(move || {
            format::read_all(&path, Some(&mut chunker))?;
            chunker.flush()?;
            Ok::<_, FormatError>((chunker.cluster, chunker.dynsec))
        });
        let (mut sessions, mut retained, mut chunks) = (0u64, 0u64, 0u64);
        let mut failure: Option<BackupError> = None;
        while let Some(chunk) = rx.recv().await {
            if failure.is_some() {
                continue;
            }
            let (s, r) = (chunk.sessions.len() as u64, chunk.retained.len() as u64);
            let started = tokio::time::Instant::now();
            match self.propose_one(spb::command::Cmd::RestoreChunk(chunk)).await {
                Ok(()) => {
                    let pause = started.elapsed().mul_f64(PACE).min(std::time::Duration::from_secs(1));
                    tokio::time::sleep(pause).await;
                    sessions += s;
                    retained += r;
                    chunks += 1;
                    let done = sessions + retained;
                    self.update_job(id, |j| j.done = done);
                }
                Err(e) => {
                    failure = Some(e);
                    // Dropping the receiver stops the reader.
                    rx.close();
                }
            }
        }
        let read = reader.await.map_err(|e| BackupError::Other(format!("reader: {e}")))?;
        if let Some(e) = failure {
            return Err(e);
        }
        let (cluster, dynsec) = read?;
        let has_dynsec = !dynsec.is_empty();
        self.propose_one(spb::command::Cmd::RestoreEnd(spb::RestoreEnd {
            id: id.into(),
            mode: mode.pb(),
            cluster,
            dynsec: dynsec.into(),
        }))
        .await?;
        let mut counts = BTreeMap::new();
        counts.insert("sessions".into(), sessions);
        counts.insert("retained".into(), retained);
        counts.insert("chunks".into(), chunks);
        counts.insert("dynsec".into(), u64::from(has_dynsec));
        Ok(counts)
    }
}
