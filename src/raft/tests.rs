//! openraft's storage conformance suite against the sled log store and the
//! state-machine adapter, and the adapter's apply / snapshot behaviour.

use std::sync::Arc;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use openraft::RaftSnapshotBuilder;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;

use super::state_machine::StateMachine;
use super::types::{BatchPayload, Entry, EntryPayload, LeaderId, LogId, TypeConfig};
use super::EventSink;
use crate::state::pb::command::Cmd;
use crate::state::{self, Event, Limits, State};
use crate::storage::{LogStore, SnapshotStore};

/// Builds the stores of openraft's suite and keeps each one's counters. With
/// `node` set, the stores belong to a node that leads none of the suite's
/// entries, so every append takes the follower's inline flush.
#[derive(Default)]
struct Builder {
    node: Option<u64>,
    stats: Arc<Mutex<Vec<Arc<crate::storage::StorageStats>>>>,
}

fn open_pair(dir: &std::path::Path, sink: EventSink) -> (LogStore, StateMachine) {
    let log = LogStore::open(&dir.join("log")).unwrap();
    let snaps = SnapshotStore::open(&dir.join("snapshot")).unwrap();
    let state = Arc::new(RwLock::new(State::new(Limits::default())));
    (log, StateMachine::new(state, sink, snaps).unwrap())
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), openraft::StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, sm) = open_pair(dir.path(), Box::new(|_| {}));
        if let Some(node) = self.node {
            log = log.for_node(node);
        }
        self.stats.lock().push(log.stats());
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_on_a_follower() {
    let stats = Arc::new(Mutex::new(Vec::new()));
    Suite::test_all(Builder { node: Some(999), stats: stats.clone() }).await.unwrap();
    let inline: u64 =
        stats.lock().iter().map(|s| s.inline_flushes.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(inline > 0, "the suite's appends took the inline path");
}

fn retained_publish(topic: &str, payload: &'static str) -> state::pb::Command {
    state::pb::Command {
        cmd: Some(Cmd::Publish(state::pb::Publish {
            message: Some(state::pb::Message {
                topic: topic.into(),
                payload: Bytes::from_static(payload.as_bytes()),
                qos: 1,
                retain: true,
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn batch_entry(index: u64, commands: Vec<state::pb::Command>) -> Entry {
    let batch = state::pb::Batch { now_ms: 1_000, commands };
    Entry::new(
        LogId::new(LeaderId::new(1, 1), index),
        EntryPayload::Normal(BatchPayload(batch.encode_to_vec().into())),
    )
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) {
    let stream = futures_util::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
}

#[tokio::test]
async fn apply_updates_state_and_sends_events_then_snapshot_restores() {
    let dir = tempfile::tempdir().unwrap();
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let s = seen.clone();
    let (log, mut sm) = open_pair(dir.path(), Box::new(move |ev| s.lock().extend(ev)));

    let session = state::pb::Command {
        cmd: Some(Cmd::SessionOpen(state::pb::SessionOpen {
            client_id: "sub".into(),
            session_expiry_s: 60,
            protocol_version: 5,
            ..Default::default()
        })),
    };
    let subscribe = state::pb::Command {
        cmd: Some(Cmd::Subscribe(state::pb::Subscribe {
            client_id: "sub".into(),
            subscriptions: vec![state::pb::Subscription {
                filter: "a/#".into(),
                qos: 1,
                ..Default::default()
            }],
            queue_retained: false,
        })),
    };
    apply(&mut sm, vec![batch_entry(1, vec![session, subscribe, retained_publish("a/b", "one")])]).await;
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(1));
    assert!(
        seen.lock().contains(&Event::Deliver { client_id: "sub".into() }),
        "events reach the sink: {:?}",
        seen.lock()
    );

    // An undecodable batch is an error result for the entry, not a failure.
    let bad = Entry::new(
        LogId::new(LeaderId::new(1, 1), 2),
        EntryPayload::Normal(BatchPayload(Bytes::from_static(b"\xff\xff\xff"))),
    );
    apply(&mut sm, vec![bad]).await;
    assert_eq!(sm.applied_state().await.unwrap().0.map(|l| l.index), Some(2));

    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));

    // A second node installs it and has the same state.
    let dir2 = tempfile::tempdir().unwrap();
    let (_log2, mut sm2) = open_pair(dir2.path(), Box::new(|_| {}));
    sm2.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    assert_eq!(sm2.applied_state().await.unwrap().0, snap.meta.last_log_id);
    let current = sm2.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    let restored = State::from_snapshot_bytes(&current.snapshot, Limits::default()).unwrap();
    assert!(restored.retained("a/b").is_some());

    // The snapshot file survives a restart of the state machine.
    drop(sm);
    let closed = log.on_closed();
    drop(log);
    closed.await;
    let (_log3, mut sm3) = open_pair(dir.path(), Box::new(|_| {}));
    let reloaded = sm3.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(reloaded.meta, snap.meta);
}

#[tokio::test]
async fn log_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (1..=5).map(|i| batch_entry(i, vec![retained_publish("t", "x")])).collect();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        let (tx, rx) = TypeConfig::oneshot();
        log.append(entries.clone(), openraft::storage::IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        log.save_vote(&super::types::Vote::new_committed(1, 1)).await.unwrap();
        log.purge(entries[1].log_id).await.unwrap();
        let closed = log.on_closed();
        drop(log);
        closed.await;
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2));
    assert_eq!(st.last_log_id.map(|l| l.index), Some(5));
    let mut reader = log.get_log_reader().await;
    use openraft::RaftLogReader;
    let got = reader.try_get_log_entries(3..=5).await.unwrap();
    assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert_eq!(reader.read_vote().await.unwrap(), Some(super::types::Vote::new_committed(1, 1)));
}

#[tokio::test]
async fn purge_removes_the_entries_below_its_point_in_the_background() {
    use openraft::RaftLogReader;
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (1..=3000).map(|i| batch_entry(i, vec![retained_publish("t", "x")])).collect();
    let mut log = LogStore::open(dir.path()).unwrap();
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries.clone(), openraft::storage::IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
    // More than one purger chunk (1024 keys) below the point.
    log.purge(entries[2499].log_id).await.unwrap();
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2500));
    assert_eq!(st.last_log_id.map(|l| l.index), Some(3000));
    let mut reader = log.get_log_reader().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if reader.try_get_log_entries(1..=2500).await.unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "entries below the purge point still there");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let kept = reader.try_get_log_entries(2501..=3000).await.unwrap();
    assert_eq!(kept.len(), 500);
    assert_eq!(kept.first().map(|e| e.log_id.index), Some(2501));
}

#[tokio::test]
async fn a_follower_flushes_within_append_a_leader_through_the_flusher() {
    use openraft::storage::IOFlushed;
    let dir = tempfile::tempdir().unwrap();
    // Entries led by node 1, appended by node 2: a follower's append.
    let mut follower = LogStore::open(&dir.path().join("f")).unwrap().for_node(2);
    let (tx, mut rx) = TypeConfig::oneshot();
    follower
        .append(vec![batch_entry(1, vec![retained_publish("t", "x")])], IOFlushed::signal(tx))
        .await
        .unwrap();
    assert!(matches!(rx.try_recv(), Ok(Ok(()))), "flushed and answered within append");
    assert_eq!(follower.stats().snapshot().flushes, 1);
    assert_eq!(follower.stats().inline_flushes.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The same entries appended by node 1, their leader: the flusher answers.
    let mut leader = LogStore::open(&dir.path().join("l")).unwrap().for_node(1);
    let (tx, rx) = TypeConfig::oneshot();
    leader
        .append(vec![batch_entry(1, vec![retained_publish("t", "x")])], IOFlushed::signal(tx))
        .await
        .unwrap();
    rx.await.unwrap().unwrap();
    assert_eq!(leader.stats().snapshot().flushes, 1);
    assert_eq!(
        leader.stats().inline_flushes.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the leader's flusher"
    );
    assert_eq!(leader.stats().append_latency.count(), 1);
    assert_eq!(follower.stats().append_latency.count(), 1);
    // Both kept their entry across a reopen (what a power cut would show is
    // not testable here; the flush count and the inline answer are).
    for (name, store) in [("f", follower), ("l", leader)] {
        let closed = store.on_closed();
        drop(store);
        closed.await;
        let mut again = LogStore::open(&dir.path().join(name)).unwrap();
        let st = again.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id.map(|l| l.index), Some(1), "{name}");
    }
}
