//! Restoring a [`State`] from a [`pb::Snapshot`]. A snapshot comes from disk or
//! a peer, so it is validated: anything a State could not have produced is an
//! `InvalidSnapshot` error, never a panic.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::session::{Delivery, InflightEntry, Session, SubOptions};
use super::{
    check_message, check_packet_id, check_qos, pb, receive_maximum, Limits, Retained, State, StateError,
    SNAPSHOT_FORMAT_VERSION,
};
use crate::topic::{self, SubscriptionTree};

fn invalid(msg: impl Into<String>) -> StateError {
    StateError::InvalidSnapshot(msg.into())
}

fn delivery(d: Option<pb::Delivery>) -> Result<Delivery, StateError> {
    let d = d.ok_or(StateError::MissingField("delivery"))?;
    let m = d.message.ok_or(StateError::MissingField("delivery.message"))?;
    check_message(&m)?;
    Ok(Delivery {
        message: Arc::new(m),
        qos: check_qos(d.qos)?,
        retain: d.retain,
        subscription_ids: d.subscription_ids,
    })
}

pub(super) fn session(p: pb::SessionState) -> Result<Session, StateError> {
    let mut s = Session::new(&p.client_id, p.created_at_ms);
    s.protocol_version = p.protocol_version;
    s.session_expiry_s = p.session_expiry_s;
    s.receive_maximum = receive_maximum(p.receive_maximum);
    if u32::from(s.receive_maximum) != p.receive_maximum {
        return Err(invalid(format!("{}: receive maximum {}", p.client_id, p.receive_maximum)));
    }
    s.online = p.online;
    s.disconnected_at_ms = p.disconnected_at_ms;
    s.connection_id = p.connection_id;
    for sub in p.subscriptions {
        if !topic::valid_topic_filter(&sub.filter) {
            return Err(StateError::InvalidFilter(sub.filter));
        }
        check_qos(sub.qos)?;
        if s.subscriptions.insert(sub.filter.clone(), sub).is_some() {
            return Err(invalid(format!("{}: duplicate subscription", p.client_id)));
        }
    }
    for e in p.inflight {
        let packet_id = check_packet_id(e.packet_id)?;
        if s.inflight_get(packet_id).is_some() {
            return Err(invalid(format!("{}: duplicate packet id {packet_id}", p.client_id)));
        }
        let delivery = delivery(e.delivery)?;
        if delivery.qos == 0 {
            return Err(invalid(format!("{}: QoS 0 in flight", p.client_id)));
        }
        s.insert_inflight(InflightEntry { packet_id, delivery, awaiting_pubcomp: e.awaiting_pubcomp });
    }
    for d in p.queue {
        s.push_queue(delivery(Some(d))?);
    }
    let mut incoming = BTreeSet::new();
    for id in p.incoming_qos2 {
        incoming.insert(check_packet_id(id)?);
    }
    s.incoming_qos2 = incoming;
    if let Some(w) = &p.will {
        check_message(w.message.as_ref().ok_or(StateError::MissingField("will.message"))?)?;
    }
    s.will = p.will;
    s.will_due_at_ms = p.will_due_at_ms;
    s.next_packet_id = check_packet_id(p.next_packet_id)?;
    s.dropped = p.dropped;
    s.expired = p.expired;
    Ok(s)
}

pub(super) fn restore(snap: pb::Snapshot, limits: Limits) -> Result<State, StateError> {
    if snap.format_version != SNAPSHOT_FORMAT_VERSION {
        return Err(invalid(format!("format version {}", snap.format_version)));
    }
    let mut sessions = super::Sessions::default();
    let mut tree = SubscriptionTree::new();
    for p in snap.sessions {
        let s = session(p)?;
        for (filter, sub) in &s.subscriptions {
            if topic::parse_shared(filter).is_none() {
                tree.insert(filter, s.client_id.clone(), SubOptions::from_pb(sub));
            }
        }
        let id = s.client_id.clone();
        if sessions.insert(s).is_some() {
            return Err(invalid(format!("duplicate session {id:?}")));
        }
    }
    let mut st = State::new(limits);
    if let Some(c) = snap.cluster {
        if c.pinned_leader == Some(0) {
            return Err(StateError::InvalidNodeId(0));
        }
        if pb::Mode::try_from(c.mode).is_err() {
            return Err(invalid(format!("mode {}", c.mode)));
        }
        st.cluster = c;
    }
    if let Some(d) = &snap.dynsec {
        let d = crate::dynsec::Dynsec::from_proto(d).map_err(|e| StateError::InvalidDynsec(e.to_string()))?;
        st.dynsec.store(Some(Arc::new(d)));
    }
    st.now_ms = snap.now_ms;
    st.sessions = sessions;
    st.tree = tree;
    for r in snap.retained {
        let m = r.message.ok_or(StateError::MissingField("retained.message"))?;
        check_message(&m)?;
        if st.retained.contains_key(&m.topic) {
            return Err(invalid(format!("duplicate retained topic {:?}", m.topic)));
        }
        st.set_retained(Retained { message: Arc::new(m), set_at_ms: r.set_at_ms });
    }
    Ok(st)
}
