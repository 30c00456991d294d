//! The state-machine adapter: openraft's `RaftStateMachine` around the
//! broker's `Arc<RwLock<State>>`. Applies each committed entry's Batch with
//! `State::apply_batch`, hands the events to the event sink and the
//! per-command results to the proposer; builds, stores and installs
//! snapshots (`State::capture` + last applied log id + membership: the
//! capture is O(1) under the State's lock, the encoding happens on a blocking
//! thread while apply goes on).
//!
//! The State itself lives in memory only: on restart openraft installs the
//! newest snapshot file and re-applies the log up to the saved committed id.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{OptionalSend, RaftSnapshotBuilder};
use parking_lot::{Mutex, RwLock};
use prost::Message as _;

use super::types::{
    ApplyOutcome, BatchPayload, EntryPayload, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
use super::EventSink;
use crate::state::{self, State};
use crate::storage::SnapshotStore;

/// The newest snapshot: what `get_current_snapshot` returns and followers get.
type Current = Option<(SnapshotMeta, Bytes)>;

/// Shared between the state machine and its background snapshot builders.
struct Snapshots {
    store: SnapshotStore,
    current: Mutex<Current>,
    /// Serializes file writes (a background build and an install may race).
    writing: Mutex<()>,
}

impl Snapshots {
    /// Stores `meta`/`data` unless a snapshot at least as new is already
    /// stored (blocking: run on a blocking thread).
    fn save_if_newer(&self, meta: &SnapshotMeta, data: &Bytes) -> io::Result<()> {
        let _w = self.writing.lock();
        if let Some((cur, _)) = &*self.current.lock() {
            if cur.last_log_id >= meta.last_log_id {
                return Ok(());
            }
        }
        self.store.save(meta, data)?;
        *self.current.lock() = Some((meta.clone(), data.clone()));
        Ok(())
    }
}

async fn save_in_background(snaps: Arc<Snapshots>, meta: SnapshotMeta, data: Bytes) -> io::Result<()> {
    tokio::task::spawn_blocking(move || snaps.save_if_newer(&meta, &data))
        .await
        .map_err(|e| io::Error::other(format!("snapshot writer: {e}")))?
}

/// See the module docs.
pub struct StateMachine {
    state: Arc<RwLock<State>>,
    sink: EventSink,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snaps: Arc<Snapshots>,
}

impl StateMachine {
    /// Loads the newest snapshot file (openraft installs it at start-up).
    pub fn new(state: Arc<RwLock<State>>, sink: EventSink, store: SnapshotStore) -> io::Result<StateMachine> {
        let current = store.load()?;
        Ok(StateMachine {
            state,
            sink,
            last_applied: None,
            last_membership: StoredMembership::default(),
            snaps: Arc::new(Snapshots { store, current: Mutex::new(current), writing: Mutex::new(()) }),
        })
    }

    fn apply_batch(&self, bytes: &Bytes, events: &mut Vec<state::Event>) -> ApplyOutcome {
        let batch = match state::pb::Batch::decode(bytes.clone()) {
            Ok(b) => b,
            // Every replica fails the same way on the same bytes.
            Err(e) => return ApplyOutcome(Err(e.into())),
        };
        let mut results = self.state.write().apply_batch(&batch);
        for applied in results.iter_mut().flatten() {
            events.append(&mut applied.events);
        }
        ApplyOutcome(Ok(results))
    }
}

/// Captures the state at one applied log id; encodes and writes it later,
/// off the state lock and off the apply path.
pub struct SnapshotBuilder {
    state: state::StateView,
    meta: SnapshotMeta,
    snaps: Arc<Snapshots>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Bytes;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Encoding a large state takes a while (about a second for a million
        // retained messages): not on an async worker, where it would delay
        // the tasks queued behind it (the Raft core, heartbeats).
        let view = self.state.clone();
        let data = tokio::task::spawn_blocking(move || Bytes::from(view.encode_to_vec()))
            .await
            .map_err(|e| io::Error::other(format!("snapshot encoder: {e}")))?;
        save_in_background(self.snaps.clone(), self.meta.clone(), data.clone()).await?;
        Ok(Snapshot { meta: self.meta.clone(), snapshot: data })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Bytes;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let mut events = Vec::new();
            let outcome = match &entry.payload {
                EntryPayload::Blank => ApplyOutcome(Ok(Vec::new())),
                EntryPayload::Normal(BatchPayload(bytes)) => self.apply_batch(bytes, &mut events),
                EntryPayload::Membership(m) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    ApplyOutcome(Ok(Vec::new()))
                }
            };
            self.last_applied = Some(entry.log_id);
            // Events first, as the single-node pipeline does: connections learn
            // of new in-flight messages before the proposer hears back.
            if !events.is_empty() {
                (self.sink)(events);
            }
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        Some(self.get_snapshot_builder().await)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // The only work under the lock: an O(1) capture (structural sharing),
        // so apply does not wait for a snapshot of a large state.
        let state = self.state.read().capture();
        SnapshotBuilder {
            state,
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.last_membership.clone(),
            },
            snaps: self.snaps.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Bytes) -> Result<(), io::Error> {
        let limits = *self.state.read().limits();
        let mut restored = State::from_snapshot_bytes(&snapshot, limits)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot state: {e}")))?;
        {
            let mut state = self.state.write();
            // The authenticator holds the old State's dynsec view: keep it live.
            restored.adopt_dynsec_view(state.dynsec_view());
            *state = restored;
        }
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        save_in_background(self.snaps.clone(), meta.clone(), snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.snaps.current.lock().clone().map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}
