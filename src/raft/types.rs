//! The openraft type configuration of raftmq: what a log entry carries
//! ([`BatchPayload`]), what applying it answers ([`ApplyOutcome`]) and what the
//! membership knows of a node ([`NodeAddr`]).

use std::fmt;

use bytes::Bytes;

use crate::state::{Applied, StateError};

/// The application data of one log entry: a `state::pb::Batch`, kept encoded
/// so the leader encodes it once and the log, the network and the followers
/// only copy bytes. It is decoded once, when applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPayload(pub Bytes);

impl fmt::Display for BatchPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch({} bytes)", self.0.len())
    }
}

/// Per-command results of one applied entry, in command order; `Err` for the
/// whole entry when its batch cannot be decoded (the same on every replica).
/// Blank and membership entries answer `Ok(vec![])`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOutcome(pub Result<Vec<Result<Applied, StateError>>, StateError>);

/// A node's addresses, as stored in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddr {
    /// Raft RPCs (`host:port`).
    pub cluster_addr: String,
    /// MQTT, advertised to clients as Server Reference.
    pub mqtt_addr: String,
    /// Admin / health HTTP.
    pub admin_addr: String,
}

/// Raft node ids: the `id` of the static node list.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of raftmq.
    pub TypeConfig:
        D = BatchPayload,
        R = ApplyOutcome,
        NodeId = NodeId,
        Node = NodeAddr,
);

/// openraft's types instantiated for [`TypeConfig`].
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type EntryPayload = openraft::alias::EntryPayloadOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, NodeAddr>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot whose data is the encoded `state::pb::Snapshot`.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Bytes>;
pub type Raft = openraft::Raft<TypeConfig, crate::raft::state_machine::StateMachine>;
