//! Conversions between openraft's types and their protobuf form
//! (proto/raft.proto). Anything that arrives from disk or a peer goes through
//! a fallible conversion: a missing field is an error, never a panic.

use std::collections::{BTreeMap, BTreeSet};

use openraft::entry::RaftEntry;
use openraft::vote::RaftLeaderId;

use super::pb;
use super::types::{
    BatchPayload, Entry, EntryPayload, LeaderId, LogId, Membership, NodeAddr, SnapshotMeta, StoredMembership,
    Vote,
};

/// A protobuf message that does not describe a valid openraft value.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ConvertError {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("invalid membership: {0}")]
    Membership(String),
}

pub fn leader_id_to_pb(l: &LeaderId) -> pb::LeaderId {
    pb::LeaderId { term: l.term, node_id: l.node_id }
}

pub fn leader_id_from_pb(l: &pb::LeaderId) -> LeaderId {
    LeaderId::new(l.term, l.node_id)
}

pub fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote { leader_id: Some(leader_id_to_pb(&v.leader_id)), committed: v.committed }
}

pub fn vote_from_pb(v: &pb::Vote) -> Result<Vote, ConvertError> {
    let l = v.leader_id.as_ref().ok_or(ConvertError::Missing("Vote.leader_id"))?;
    Ok(if v.committed { Vote::new_committed(l.term, l.node_id) } else { Vote::new(l.term, l.node_id) })
}

/// Helper for required vote fields.
pub fn req_vote(v: &Option<pb::Vote>, field: &'static str) -> Result<Vote, ConvertError> {
    vote_from_pb(v.as_ref().ok_or(ConvertError::Missing(field))?)
}

pub fn log_id_to_pb(l: &LogId) -> pb::LogId {
    pb::LogId { leader_id: Some(leader_id_to_pb(&l.leader_id)), index: l.index }
}

pub fn opt_log_id_to_pb(l: &Option<LogId>) -> Option<pb::LogId> {
    l.as_ref().map(log_id_to_pb)
}

pub fn log_id_from_pb(l: &pb::LogId) -> Result<LogId, ConvertError> {
    let leader = l.leader_id.as_ref().ok_or(ConvertError::Missing("LogId.leader_id"))?;
    Ok(LogId::new(leader_id_from_pb(leader), l.index))
}

pub fn opt_log_id_from_pb(l: &Option<pb::LogId>) -> Result<Option<LogId>, ConvertError> {
    l.as_ref().map(log_id_from_pb).transpose()
}

pub fn node_to_pb(n: &NodeAddr) -> pb::Node {
    pb::Node {
        cluster_addr: n.cluster_addr.clone(),
        mqtt_addr: n.mqtt_addr.clone(),
        admin_addr: n.admin_addr.clone(),
    }
}

pub fn node_from_pb(n: &pb::Node) -> NodeAddr {
    NodeAddr {
        cluster_addr: n.cluster_addr.clone(),
        mqtt_addr: n.mqtt_addr.clone(),
        admin_addr: n.admin_addr.clone(),
    }
}

pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIds { ids: c.iter().copied().collect() })
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, node_to_pb(n))).collect(),
    }
}

pub fn membership_from_pb(m: &pb::Membership) -> Result<Membership, ConvertError> {
    let configs: Vec<BTreeSet<u64>> = m.configs.iter().map(|c| c.ids.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, NodeAddr> = m.nodes.iter().map(|(id, n)| (*id, node_from_pb(n))).collect();
    Membership::new(configs, nodes).map_err(|e| ConvertError::Membership(e.to_string()))
}

pub fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to_pb(m.log_id()),
        membership: Some(membership_to_pb(m.membership())),
    }
}

pub fn stored_membership_from_pb(m: &pb::StoredMembership) -> Result<StoredMembership, ConvertError> {
    let membership = m.membership.as_ref().ok_or(ConvertError::Missing("StoredMembership.membership"))?;
    Ok(StoredMembership::new(opt_log_id_from_pb(&m.log_id)?, membership_from_pb(membership)?))
}

pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(b) => pb::entry::Payload::Batch(b.0.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry { log_id: Some(log_id_to_pb(&e.log_id)), payload: Some(payload) }
}

pub fn entry_from_pb(e: pb::Entry) -> Result<Entry, ConvertError> {
    let log_id = log_id_from_pb(e.log_id.as_ref().ok_or(ConvertError::Missing("Entry.log_id"))?)?;
    let payload = match e.payload.ok_or(ConvertError::Missing("Entry.payload"))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Batch(b) => EntryPayload::Normal(BatchPayload(b)),
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(&m)?),
    };
    Ok(Entry::new(log_id, payload))
}

pub fn snapshot_meta_to_pb(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(&m.last_log_id),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
    }
}

pub fn snapshot_meta_from_pb(m: &pb::SnapshotMeta) -> Result<SnapshotMeta, ConvertError> {
    let sm = m.last_membership.as_ref().ok_or(ConvertError::Missing("SnapshotMeta.last_membership"))?;
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(&m.last_log_id)?,
        last_membership: stored_membership_from_pb(sm)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let lid = LogId::new(LeaderId::new(3, 2), 7);
        let mut nodes = BTreeMap::new();
        nodes.insert(
            1,
            NodeAddr { cluster_addr: "a:1".into(), mqtt_addr: "a:2".into(), admin_addr: "a:3".into() },
        );
        nodes.insert(2, NodeAddr::default());
        let m = Membership::new(vec![BTreeSet::from([1])], nodes).unwrap();
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Normal(BatchPayload(bytes::Bytes::from_static(b"xyz"))),
            EntryPayload::Membership(m.clone()),
        ] {
            let e = Entry::new(lid, payload);
            let back = entry_from_pb(entry_to_pb(&e)).unwrap();
            assert_eq!(format!("{e:?}"), format!("{back:?}"));
        }
        for v in [Vote::new(4, 1), Vote::new_committed(4, 1)] {
            assert_eq!(vote_from_pb(&vote_to_pb(&v)).unwrap(), v);
        }
        let sm = StoredMembership::new(Some(lid), m);
        assert_eq!(stored_membership_from_pb(&stored_membership_to_pb(&sm)).unwrap(), sm);
    }

    #[test]
    fn missing_fields_are_errors() {
        assert_eq!(vote_from_pb(&pb::Vote::default()), Err(ConvertError::Missing("Vote.leader_id")));
        assert!(entry_from_pb(pb::Entry::default()).is_err());
        let bad = pb::Membership { configs: vec![pb::NodeIds { ids: vec![9] }], nodes: BTreeMap::new() };
        assert!(matches!(membership_from_pb(&bad), Err(ConvertError::Membership(_))));
    }
}
