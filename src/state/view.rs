//! Structural sharing for [`State`]'s big collections, and [`StateView`]: a
//! frozen copy of everything a snapshot holds, taken in O(1).
//!
//! Sessions and retained messages live in persistent B-trees (`imbl::OrdMap`,
//! ordered like the `BTreeMap`s they replace). Capturing a view clones the
//! roots (a reference count each); the first later change to a shared tree
//! node copies that node (pointers, not sessions: sessions sit behind an
//! `Arc`), and the first change to a session the view still holds copies that
//! one session. So a snapshot, a backup digest or a mode switch holds the
//! State's lock only for the capture, and converts and encodes the view
//! afterwards while apply goes on.

use std::sync::Arc;

use imbl::OrdMap;
use sha2::{Digest, Sha256};

use super::{pb, Retained, Session, State, SNAPSHOT_FORMAT_VERSION};
use super::{
    SNAPSHOT_FIELD_CLUSTER, SNAPSHOT_FIELD_DYNSEC, SNAPSHOT_FIELD_RETAINED, SNAPSHOT_FIELD_SESSIONS,
};

/// Retained messages by topic.
pub(super) type RetainedMap = OrdMap<String, Retained>;

/// Persistent sessions by client id, each behind an `Arc` so that copying a
/// shared tree node copies pointers. Changing a session goes through
/// [`Sessions::get_mut`], which copies it only while a view still holds it.
#[derive(Debug, Clone, Default)]
pub(super) struct Sessions(OrdMap<String, Arc<Session>>);

impl Sessions {
    pub(super) fn get(&self, client_id: &str) -> Option<&Session> {
        self.0.get(client_id).map(|s| &**s)
    }

    pub(super) fn get_mut(&mut self, client_id: &str) -> Option<&mut Session> {
        self.0.get_mut(client_id).map(Arc::make_mut)
    }

    /// The session, created with `new` if there is none.
    pub(super) fn get_or_insert_with(
        &mut self,
        client_id: &str,
        new: impl FnOnce() -> Session,
    ) -> &mut Session {
        Arc::make_mut(self.0.entry(client_id.to_string()).or_insert_with(|| Arc::new(new())))
    }

    pub(super) fn contains_key(&self, client_id: &str) -> bool {
        self.0.contains_key(client_id)
    }

    /// Inserts under the session's client id; returns the one it replaced.
    pub(super) fn insert(&mut self, s: Session) -> Option<Arc<Session>> {
        self.0.insert(s.client_id.clone(), Arc::new(s))
    }

    pub(super) fn remove(&mut self, client_id: &str) -> Option<Arc<Session>> {
        self.0.remove(client_id)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// In client id order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Session> {
        self.0.values().map(|s| &**s)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Session)> {
        self.0.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Everything [`State::snapshot`] holds, frozen at [`State::capture`]:
/// later changes to the State do not show here. Cheap to clone; `Send`, so
/// it can be converted and encoded on another thread.
#[derive(Debug, Clone)]
pub struct StateView {
    now_ms: u64,
    sessions: OrdMap<String, Arc<Session>>,
    retained: RetainedMap,
    cluster: pb::ClusterSettings,
    dynsec: Option<Arc<crate::dynsec::Dynsec>>,
    /// Derived figures, taken with the capture for metrics.
    subscription_count: usize,
}

impl State {
    /// A frozen view of the state in O(1) (a few reference counts and the
    /// small cluster settings): the only part of a snapshot to do under the
    /// State's lock. Convert it with [`StateView::to_pb`] or
    /// [`StateView::encode_to_vec`] after the lock is released.
    pub fn capture(&self) -> StateView {
        StateView {
            now_ms: self.now_ms,
            sessions: self.sessions.0.clone(),
            retained: self.retained.clone(),
            cluster: self.cluster.clone(),
            dynsec: self.dynsec.load_full(),
            subscription_count: self.tree.len(),
        }
    }
}

impl StateView {
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Persistent non-shared subscriptions at the capture.
    pub fn subscription_count(&self) -> usize {
        self.subscription_count
    }

    /// Sessions in client id order.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values().map(|s| &**s)
    }

    fn retained_pb(r: &Retained) -> pb::RetainedMessage {
        pb::RetainedMessage { message: Some((*r.message).clone()), set_at_ms: r.set_at_ms }
    }

    /// The canonical snapshot: sessions by client id, retained by topic. O(state).
    pub fn to_pb(&self) -> pb::Snapshot {
        pb::Snapshot {
            format_version: SNAPSHOT_FORMAT_VERSION,
            now_ms: self.now_ms,
            sessions: self.sessions().map(Session::to_pb).collect(),
            retained: self.retained.values().map(Self::retained_pb).collect(),
            cluster: Some(self.cluster.clone()),
            dynsec: self.dynsec.as_ref().map(|d| d.to_proto()),
        }
    }

    /// The encoding of [`StateView::to_pb`], byte for byte, written one
    /// record at a time so the whole protobuf copy never exists at once.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        use prost::encoding::{message, uint32, uint64};
        let mut buf = Vec::new();
        // As prost's generated code: fields in number order, scalars left out
        // when they hold the default.
        if SNAPSHOT_FORMAT_VERSION != 0 {
            uint32::encode(1, &SNAPSHOT_FORMAT_VERSION, &mut buf);
        }
        if self.now_ms != 0 {
            uint64::encode(super::SNAPSHOT_FIELD_NOW, &self.now_ms, &mut buf);
        }
        for s in self.sessions() {
            message::encode(SNAPSHOT_FIELD_SESSIONS, &s.to_pb(), &mut buf);
        }
        for r in self.retained.values() {
            message::encode(SNAPSHOT_FIELD_RETAINED, &Self::retained_pb(r), &mut buf);
        }
        message::encode(SNAPSHOT_FIELD_CLUSTER, &self.cluster, &mut buf);
        if let Some(d) = &self.dynsec {
            message::encode(SNAPSHOT_FIELD_DYNSEC, &d.to_proto(), &mut buf);
        }
        buf
    }

    /// SHA-256 of [`StateView::encode_to_vec`] (= [`State::digest`] at the capture).
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.encode_to_vec()).into()
    }
}
