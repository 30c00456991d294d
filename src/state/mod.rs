//! The replicated state machine: everything a failover must preserve
//! (persistent sessions, their subscriptions, queues, in-flight messages and
//! QoS 2 state, pending wills; retained messages), changed only by applying
//! [`pb::Batch`]es of [`pb::Command`]s.
//!
//! Apply is deterministic: it reads no clock (time is the batch's `now_ms`,
//! never allowed to go backwards), uses no randomness, and iterates only
//! ordered collections, so replicas applying the same batches hold the same
//! [`State::snapshot_bytes`] and [`State::digest`]. Errors are results of one
//! command, never panics. The matching tree of persistent non-shared
//! subscriptions is derived from the sessions and rebuilt on restore.
//!
//! This module must not touch sockets, timers or the broker's fast path: the
//! broker proposes commands and reads sessions; [`Event`]s tell it what to wake.
//!
//! Documented choices:
//! - A full queue drops the *new* message and counts it (`Session::dropped`);
//!   `max_queued_*` of 0 means unlimited.
//! - QoS 0 copies are queued only for offline sessions with
//!   `queue_qos0_offline`; they are handed out (and removed) by the next
//!   SessionOpen and never enter the window.
//! - SessionOpen cancels a pending (delayed) will of the session, whether or
//!   not it starts clean (MQTT 5 3.1.2.5: a new connection before the delay has
//!   passed). It never fires one: to send the old connection's will on a
//!   takeover, the broker proposes its SessionClose first.
//! - A session ending (expiry, SessionRemove, SessionClose with expiry 0)
//!   publishes its pending will at that moment.
//! - Wills published by apply reach persistent sessions' non-shared
//!   subscriptions here; [`Event::Published`] hands them to the broker for
//!   everyone else (non-persistent sessions, shared groups).
//! - Retained messages for a new subscription are sent by the broker, or,
//!   with `Subscribe.queue_retained`, delivered through the session here (so a
//!   persistent session's packet ids all come from the state).
//! - A new leader (or a restarted node) proposes `ResetConnections` before
//!   serving: the snapshot still marks the sessions of lost connections online.
//! - `Limits` are configuration, not state: every replica must use the same.
//!
//! Reading for the broker: [`State::session`] gives a [`Session`]; a
//! connection sends `Session::inflight_after(last seen)` on each
//! [`Event::Deliver`], resends all of `Session::inflight` (DUP, or PUBREL for
//! `awaiting_pubcomp`) on resume, and reports acks in batched `Ack` commands.

pub mod pb {
    //! Generated from proto/state.proto.
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/raftmq.state.rs"));
}

mod dynsec;
mod restore;
mod session;
mod snapshot;
#[cfg(test)]
mod tests;
mod view;

use std::collections::BTreeSet;
use std::sync::Arc;

use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::topic::{self, SubscriptionTree};
pub use dynsec::{unavailable_response, DynsecView, NOT_INITIALISED};
pub use restore::{
    content_digest_of_snapshot, for_each_field, SNAPSHOT_FIELD_CLUSTER, SNAPSHOT_FIELD_DYNSEC,
    SNAPSHOT_FIELD_NOW, SNAPSHOT_FIELD_RETAINED, SNAPSHOT_FIELD_SESSIONS,
};
use session::message_expired;
pub use session::{Delivery, InflightEntry, Session, SubOptions};
pub use view::StateView;
use view::{RetainedMap, Sessions};

/// Version written in `Snapshot.format_version`.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// Session Expiry Interval meaning "never".
pub const EXPIRY_NEVER: u32 = u32::MAX;

/// Server limits that shape apply. Configuration, identical on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per session; 0 = unlimited.
    pub max_queued_messages: usize,
    /// Per session, topic + payload bytes; 0 = unlimited.
    pub max_queued_bytes: usize,
    /// Outgoing QoS 1/2 in flight per session, further capped by the client's
    /// Receive Maximum; 0 = only the client's.
    pub max_inflight: u16,
    /// Queue QoS 0 messages for offline persistent sessions.
    pub queue_qos0_offline: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued_messages: 1000,
            max_queued_bytes: 0,
            max_inflight: 100,
            queue_qos0_offline: false,
        }
    }
}

/// Deterministic per-command errors (and restore errors).
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum StateError {
    #[error("unknown session {0:?}")]
    UnknownSession(String),
    #[error("invalid topic filter {0:?}")]
    InvalidFilter(String),
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    #[error("invalid QoS {0}")]
    InvalidQos(u32),
    #[error("invalid packet id {0}")]
    InvalidPacketId(u32),
    #[error("invalid retain handling {0}")]
    InvalidRetainHandling(u32),
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("command has no content")]
    EmptyCommand,
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    #[error("protobuf decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("invalid node id {0}")]
    InvalidNodeId(u64),
    #[error("invalid dynamic-security state: {0}")]
    InvalidDynsec(String),
    /// A request handed to another Raft group (a dynamic-security request of
    /// dynsec-sync mode) did not complete.
    #[error("not applied: {0}")]
    Unavailable(String),
    /// The cluster-wide backup/restore lock is held by another job.
    #[error("busy: {0}")]
    Busy(String),
}

/// What the broker learns from applying a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The session has new in-flight messages to send (its connection, if any,
    /// should look). Only raised for online sessions.
    Deliver { client_id: String },
    /// A message produced by apply itself (a will), already delivered to
    /// persistent sessions' non-shared subscriptions; the broker routes it on
    /// the fast path to the others (non-persistent sessions, shared groups).
    Published { message: pb::Message },
    /// The session is gone (expired, removed, or closed with expiry 0).
    SessionEnded { client_id: String },
    /// A dynamic-security change: these clients must be disconnected
    /// (DISCONNECT 0x98, no will) wherever they are connected.
    DynsecKick { kicks: crate::dynsec::Kicks },
    /// A restore added these sessions or gave them subscriptions: the broker
    /// registers them (and their subscriptions) on its fast path.
    SessionsRestored { client_ids: Vec<String> },
}

/// Result of one command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub events: Vec<Event>,
    /// SessionOpen: a session was resumed (CONNACK session present).
    pub session_present: bool,
    /// Subscribe / Unsubscribe: per filter, whether it already existed.
    /// Release: one entry, whether the packet id was recorded.
    pub existed: Vec<bool>,
    /// SessionOpen: QoS 0 messages queued while offline, removed from the
    /// queue, to be sent once. Subscribe with `queue_retained`: the QoS 0
    /// retained messages to send.
    pub qos0_to_send: Vec<Delivery>,
    /// Publish: the incoming QoS 2 packet id was already recorded, so the
    /// message was not routed again.
    pub duplicate: bool,
    /// DynsecControl: the response document for `$CONTROL/.../response`.
    pub dynsec_response: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Retained {
    message: Arc<pb::Message>,
    set_at_ms: u64,
}

/// The replicated state. See the module docs.
#[derive(Debug)]
pub struct State {
    limits: Limits,
    /// Largest `now_ms` applied.
    now_ms: u64,
    /// Sessions and retained messages are structurally shared (view.rs), so
    /// [`State::capture`] is O(1).
    sessions: Sessions,
    retained: RetainedMap,
    /// (expires_at_ms, topic) of retained messages that expire, so a Tick
    /// only looks at what is due. Derived; rebuilt on restore.
    retained_expiry: BTreeSet<(u64, String)>,
    /// Persistent sessions' non-shared subscriptions: filter -> client id -> options.
    tree: SubscriptionTree<String, SubOptions>,
    /// Cluster settings (pinned leader, mode): replicated like everything else.
    cluster: pb::ClusterSettings,
    /// Dynamic security (clients, groups, roles, ACLs); see dynsec.rs.
    dynsec: DynsecView,
}

/// One matched session while routing, before copies are made.
struct Target<'a> {
    client_id: &'a str,
    qos: u8,
    retain_as_published: bool,
    ids: Vec<u32>,
}

fn check_qos(q: u32) -> Result<u8, StateError> {
    if q <= 2 {
        Ok(q as u8)
    } else {
        Err(StateError::InvalidQos(q))
    }
}

fn check_packet_id(id: u32) -> Result<u16, StateError> {
    match u16::try_from(id) {
        Ok(id) if id != 0 => Ok(id),
        _ => Err(StateError::InvalidPacketId(id)),
    }
}

fn check_message(m: &pb::Message) -> Result<(), StateError> {
    if !topic::valid_topic_name(&m.topic) {
        return Err(StateError::InvalidTopic(m.topic.clone()));
    }
    check_qos(m.qos)?;
    Ok(())
}

fn receive_maximum(v: u32) -> u16 {
    match u16::try_from(v) {
        Ok(0) | Err(_) => u16::MAX,
        Ok(v) => v,
    }
}

impl State {
    pub fn new(limits: Limits) -> State {
        State {
            limits,
            now_ms: 0,
            sessions: Sessions::default(),
            retained: RetainedMap::new(),
            retained_expiry: BTreeSet::new(),
            tree: SubscriptionTree::new(),
            cluster: pb::ClusterSettings::default(),
            dynsec: DynsecView::default(),
        }
    }

    /// The cluster settings (pinned leader, mode).
    pub fn cluster_settings(&self) -> &pb::ClusterSettings {
        &self.cluster
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The largest `now_ms` applied so far.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Decodes a batch from a log entry.
    pub fn decode_batch(bytes: &[u8]) -> Result<pb::Batch, StateError> {
        Ok(pb::Batch::decode(bytes)?)
    }

    /// Applies every command of the batch in order. A deterministic error
    /// (unknown session, bad filter) is a result for that command, not a panic.
    pub fn apply_batch(&mut self, batch: &pb::Batch) -> Vec<Result<Applied, StateError>> {
        self.now_ms = self.now_ms.max(batch.now_ms);
        batch.commands.iter().map(|c| self.apply_command(c)).collect()
    }

    /// Applies one command at the current time (the last batch's `now_ms`).
    pub fn apply_command(&mut self, cmd: &pb::Command) -> Result<Applied, StateError> {
        use pb::command::Cmd;
        let mut out = Applied::default();
        match cmd.cmd.as_ref().ok_or(StateError::EmptyCommand)? {
            Cmd::SessionOpen(c) => self.session_open(c, &mut out)?,
            Cmd::SessionClose(c) => self.session_close(c, &mut out)?,
            Cmd::SessionRemove(c) => {
                if !self.sessions.contains_key(&c.client_id) {
                    return Err(StateError::UnknownSession(c.client_id.clone()));
                }
                self.end_session(&c.client_id, &mut out);
            }
            Cmd::Subscribe(c) => self.subscribe(c, &mut out)?,
            Cmd::Unsubscribe(c) => self.unsubscribe(c, &mut out)?,
            Cmd::Publish(c) => self.publish(c, &mut out)?,
            Cmd::Release(c) => {
                let id = check_packet_id(c.packet_id)?;
                let s = self
                    .sessions
                    .get_mut(&c.client_id)
                    .ok_or_else(|| StateError::UnknownSession(c.client_id.clone()))?;
                out.existed.push(s.incoming_qos2.remove(&id));
            }
            Cmd::Ack(c) => self.ack(c, &mut out),
            Cmd::Tick(_) => self.tick(&mut out),
            Cmd::ResetConnections(c) => self.reset_connections(c, &mut out),
            Cmd::PinLeader(c) => {
                if c.node_id == Some(0) {
                    return Err(StateError::InvalidNodeId(0));
                }
                self.cluster.pinned_leader = c.node_id;
            }
            Cmd::SetMode(c) => self.set_mode(c, &mut out)?,
            Cmd::MarkImported(c) => self.cluster.imported_epoch = c.epoch,
            Cmd::DynsecControl(c) => self.dynsec_control(c, &mut out),
            Cmd::DynsecSet(c) => self.dynsec_set(c, &mut out)?,
            c @ (Cmd::JobLock(_)
            | Cmd::JobRelease(_)
            | Cmd::RestoreBegin(_)
            | Cmd::RestoreChunk(_)
            | Cmd::RestoreEnd(_)) => self.apply_backup_command(c, &mut out)?,
        }
        Ok(out)
    }

    /// See `SetMode` in proto/state.proto.
    fn set_mode(&mut self, c: &pb::SetMode, out: &mut Applied) -> Result<(), StateError> {
        let mode = pb::Mode::try_from(c.mode)
            .map_err(|_| StateError::InvalidSnapshot(format!("mode {}", c.mode)))?;
        if self.cluster.mode == mode as i32 {
            return Ok(());
        }
        self.cluster.mode = mode as i32;
        self.cluster.mode_epoch += 1;
        if mode == pb::Mode::FullSync {
            // The copy handed over at the switch to dynsec-sync: stale now
            // (the nodes merge what they served back in). No wills: these
            // sessions did not end, they moved.
            let ids: Vec<String> = self.sessions.keys().cloned().collect();
            for id in ids {
                self.drop_session(&id);
                out.events.push(Event::SessionEnded { client_id: id });
            }
            let topics: Vec<String> = self.retained.keys().cloned().collect();
            for t in topics {
                self.remove_retained(&t);
            }
        }
        Ok(())
    }

    fn session_open(&mut self, c: &pb::SessionOpen, out: &mut Applied) -> Result<(), StateError> {
        if let Some(w) = &c.will {
            let m = w.message.as_ref().ok_or(StateError::MissingField("will.message"))?;
            check_message(m)?;
        }
        let now = self.now_ms;
        let existed = self.sessions.contains_key(&c.client_id);
        if existed && c.clean_start {
            // The old session's state is discarded; its pending will is
            // cancelled by the new connection (see the module docs).
            self.drop_session(&c.client_id);
        }
        let s = self.sessions.get_or_insert_with(&c.client_id, || Session::new(&c.client_id, now));
        out.session_present = existed && !c.clean_start;
        s.protocol_version = c.protocol_version;
        s.session_expiry_s = c.session_expiry_s;
        s.receive_maximum = receive_maximum(c.receive_maximum);
        s.online = true;
        s.disconnected_at_ms = 0;
        s.connection_id = c.connection_id;
        s.will = c.will.clone();
        s.will_due_at_ms = 0;
        out.qos0_to_send = s.take_qos0(now);
        let window = s.window(self.limits.max_inflight);
        s.fill_window(window, now);
        if s.inflight_len() > 0 {
            out.events.push(Event::Deliver { client_id: c.client_id.clone() });
        }
        Ok(())
    }

    fn session_close(&mut self, c: &pb::SessionClose, out: &mut Applied) -> Result<(), StateError> {
        let s = self
            .sessions
            .get_mut(&c.client_id)
            .ok_or_else(|| StateError::UnknownSession(c.client_id.clone()))?;
        if !s.online || (c.connection_id != 0 && c.connection_id != s.connection_id) {
            // Already closed, or a stale close from a connection taken over.
            return Ok(());
        }
        if let Some(e) = c.session_expiry_s {
            s.session_expiry_s = e;
        }
        self.go_offline(&c.client_id, c.publish_will, out);
        Ok(())
    }

    /// Every online session goes offline now, as if its connection closed.
    fn reset_connections(&mut self, c: &pb::ResetConnections, out: &mut Applied) {
        let online: Vec<String> =
            self.sessions.values().filter(|s| s.online).map(|s| s.client_id.clone()).collect();
        for client_id in online {
            self.go_offline(&client_id, c.publish_wills, out);
        }
    }

    /// The session's connection is gone at now: schedule or fire or delete the
    /// will, and end the session if its expiry is 0.
    fn go_offline(&mut self, client_id: &str, publish_will: bool, out: &mut Applied) {
        let now = self.now_ms;
        let Some(s) = self.sessions.get_mut(client_id) else { return };
        s.online = false;
        s.disconnected_at_ms = now;
        let mut fire_now = false;
        match (&s.will, publish_will) {
            (Some(w), true) => {
                if w.delay_s == 0 {
                    fire_now = true;
                } else {
                    s.will_due_at_ms = now.saturating_add(u64::from(w.delay_s) * 1000).max(1);
                }
            }
            _ => s.will = None,
        }
        let ends = s.session_expiry_s == 0;
        if fire_now {
            self.fire_will(client_id, out);
        }
        if ends {
            self.end_session(client_id, out);
        }
    }

    /// Removes a session and its tree entries; returns it.
    fn drop_session(&mut self, client_id: &str) -> Option<Arc<Session>> {
        let s = self.sessions.remove(client_id)?;
        let key = s.client_id.clone();
        for f in s.subscriptions.keys() {
            if topic::parse_shared(f).is_none() {
                self.tree.remove(f, &key);
            }
        }
        Some(s)
    }

    /// The session ends: removed, its pending will published, SessionEnded.
    fn end_session(&mut self, client_id: &str, out: &mut Applied) {
        let Some(s) = self.drop_session(client_id) else { return };
        if s.will_due_at_ms != 0 {
            if let Some(w) = s.will.clone() {
                self.publish_will(client_id, w, out);
            }
        }
        out.events.push(Event::SessionEnded { client_id: client_id.to_string() });
    }

    /// Publishes the session's will now (it stays in the session otherwise).
    fn fire_will(&mut self, client_id: &str, out: &mut Applied) {
        let Some(s) = self.sessions.get_mut(client_id) else { return };
        s.will_due_at_ms = 0;
        if let Some(w) = s.will.take() {
            self.publish_will(client_id, w, out);
        }
    }

    fn publish_will(&mut self, client_id: &str, w: pb::Will, out: &mut Applied) {
        let Some(mut m) = w.message else { return };
        m.expires_at_ms = match w.message_expiry_interval_s {
            Some(s) => self.now_ms.saturating_add(u64::from(s) * 1000),
            None => 0,
        };
        let m = Arc::new(m);
        self.route(&m, client_id, &[], out);
        out.events.push(Event::Published { message: (*m).clone() });
    }

    fn subscribe(&mut self, c: &pb::Subscribe, out: &mut Applied) -> Result<(), StateError> {
        // Validate everything first so a bad command changes nothing.
        for sub in &c.subscriptions {
            if !topic::valid_topic_filter(&sub.filter) {
                return Err(StateError::InvalidFilter(sub.filter.clone()));
            }
            check_qos(sub.qos)?;
            if sub.retain_handling > 2 {
                return Err(StateError::InvalidRetainHandling(sub.retain_handling));
            }
        }
        let now = self.now_ms;
        let State { sessions, tree, retained, limits, .. } = self;
        let s =
            sessions.get_mut(&c.client_id).ok_or_else(|| StateError::UnknownSession(c.client_id.clone()))?;
        for sub in &c.subscriptions {
            let existed = s.subscriptions.insert(sub.filter.clone(), sub.clone()).is_some();
            out.existed.push(existed);
            if topic::parse_shared(&sub.filter).is_some() {
                continue;
            }
            tree.insert(&sub.filter, c.client_id.clone(), SubOptions::from_pb(sub));
            let wanted = match sub.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if !(c.queue_retained && wanted) {
                continue;
            }
            // Retained-on-subscribe copies always carry RETAIN=1.
            let ids = if sub.subscription_id != 0 { vec![sub.subscription_id] } else { Vec::new() };
            let sub_qos = sub.qos.min(2) as u8;
            for r in retained_matching(retained, &sub.filter, now) {
                let m = &r.message;
                let msg_qos = m.qos.min(2) as u8;
                if msg_qos.min(sub_qos) == 0 && s.online {
                    let d =
                        Delivery { message: m.clone(), qos: 0, retain: true, subscription_ids: ids.clone() };
                    out.qos0_to_send.push(d);
                } else {
                    deliver(s, limits, m, msg_qos, sub_qos, true, ids.clone(), out);
                }
            }
        }
        Ok(())
    }

    fn unsubscribe(&mut self, c: &pb::Unsubscribe, out: &mut Applied) -> Result<(), StateError> {
        let s = self
            .sessions
            .get_mut(&c.client_id)
            .ok_or_else(|| StateError::UnknownSession(c.client_id.clone()))?;
        for f in &c.filters {
            let existed = s.subscriptions.remove(f).is_some();
            if existed && topic::parse_shared(f).is_none() {
                self.tree.remove(f, &c.client_id);
            }
            out.existed.push(existed);
        }
        Ok(())
    }

    fn publish(&mut self, c: &pb::Publish, out: &mut Applied) -> Result<(), StateError> {
        let m = c.message.as_ref().ok_or(StateError::MissingField("message"))?;
        check_message(m)?;
        if let Some(id) = c.incoming_qos2_packet_id {
            let id = check_packet_id(id)?;
            // Only a persistent publisher's ids live here; a non-persistent
            // publisher's are tracked by its connection.
            if let Some(s) = self.sessions.get_mut(&c.publisher_client_id) {
                if !s.incoming_qos2.insert(id) {
                    out.duplicate = true;
                    return Ok(());
                }
            }
        }
        let m = Arc::new(m.clone());
        self.route(&m, &c.publisher_client_id, &c.shared_targets, out);
        Ok(())
    }

    /// Retains and delivers `m` to persistent sessions: matching non-shared
    /// subscriptions (one copy per session) plus the given shared targets.
    fn route(
        &mut self,
        m: &Arc<pb::Message>,
        publisher: &str,
        shared: &[pb::SharedTarget],
        out: &mut Applied,
    ) {
        let now = self.now_ms;
        if message_expired(m, now) {
            return;
        }
        if m.retain {
            if m.payload.is_empty() {
                self.remove_retained(&m.topic);
            } else {
                self.set_retained(Retained { message: m.clone(), set_at_ms: now });
            }
        }
        let msg_qos = m.qos.min(2) as u8;
        if msg_qos == 0 && !self.limits.queue_qos0_offline {
            // QoS 0 copies are never kept here: nothing to do.
            return;
        }
        let State { tree, sessions, limits, .. } = self;

        let mut targets: Vec<Target<'_>> = Vec::new();
        tree.matches(&m.topic, |_, client_id, o| {
            if o.no_local && client_id == publisher {
                return;
            }
            targets.push(Target {
                client_id,
                qos: o.qos,
                retain_as_published: o.retain_as_published,
                ids: if o.subscription_id != 0 { vec![o.subscription_id] } else { Vec::new() },
            });
        });
        // Overlapping subscriptions of one session: one copy, max QoS, all ids.
        targets.sort_by(|a, b| a.client_id.cmp(b.client_id));
        targets.dedup_by(|later, first| {
            if later.client_id != first.client_id {
                return false;
            }
            first.qos = first.qos.max(later.qos);
            first.retain_as_published |= later.retain_as_published;
            first.ids.append(&mut later.ids);
            true
        });
        for t in targets {
            if let Some(s) = sessions.get_mut(t.client_id) {
                deliver(s, limits, m, msg_qos, t.qos, t.retain_as_published, t.ids, out);
            }
        }

        for st in shared {
            let Some(s) = sessions.get_mut(&st.client_id) else { continue };
            let mut hit: Option<(u8, bool, Vec<u32>)> = None;
            for (filter, sub) in &s.subscriptions {
                if !st.filter.is_empty() && *filter != st.filter {
                    continue;
                }
                let Some((_, inner)) = topic::parse_shared(filter) else { continue };
                if !topic::matches(inner, &m.topic) {
                    continue;
                }
                let h = hit.get_or_insert((0, false, Vec::new()));
                h.0 = h.0.max(sub.qos.min(2) as u8);
                h.1 |= sub.retain_as_published;
                if sub.subscription_id != 0 {
                    h.2.push(sub.subscription_id);
                }
            }
            if let Some((qos, rap, ids)) = hit {
                deliver(s, limits, m, msg_qos, qos, rap, ids, out);
            }
        }
    }

    fn ack(&mut self, c: &pb::Ack, out: &mut Applied) {
        let now = self.now_ms;
        // Sessions whose window may have room now, refilled once each.
        let mut touched: Vec<&str> = Vec::new();
        for a in &c.acks {
            // Acks are batched lazily: the session or entry may be gone; skip.
            let Some(s) = self.sessions.get_mut(&a.client_id) else { continue };
            let Ok(id) = check_packet_id(a.packet_id) else { continue };
            let Some(e) = s.inflight_get_mut(id) else { continue };
            match pb::AckKind::try_from(a.kind) {
                Ok(pb::AckKind::Puback) if e.delivery.qos == 1 => {
                    s.remove_inflight(id);
                    touched.push(&a.client_id);
                }
                Ok(pb::AckKind::Pubrec) if e.delivery.qos == 2 => e.awaiting_pubcomp = true,
                Ok(pb::AckKind::Pubcomp) if e.delivery.qos == 2 => {
                    s.remove_inflight(id);
                    touched.push(&a.client_id);
                }
                _ => {}
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for client_id in touched {
            let Some(s) = self.sessions.get_mut(client_id) else { continue };
            let window = s.window(self.limits.max_inflight);
            if s.fill_window(window, now) && s.online {
                out.events.push(Event::Deliver { client_id: client_id.to_string() });
            }
        }
    }

    fn tick(&mut self, out: &mut Applied) {
        let now = self.now_ms;
        // One pass over the sessions (a tick visits every one of them), then
        // the changes. Firing wills neither ends sessions nor makes a queued
        // message due (a will's copy expires after now, or is not routed), so
        // the three lists are what separate passes after each step would give.
        let (mut wills, mut ended, mut queues) = (Vec::new(), Vec::new(), Vec::new());
        for s in self.sessions.values() {
            if s.will_due_at_ms != 0 && s.will_due_at_ms <= now {
                wills.push(s.client_id.clone());
            }
            if s.expires_at_ms().is_some_and(|t| t <= now) {
                ended.push(s.client_id.clone());
            }
            if s.queue_expiry_due(now) {
                queues.push(s.client_id.clone());
            }
        }
        for c in wills {
            self.fire_will(&c, out);
        }
        for c in ended {
            self.end_session(&c, out);
        }
        // Only sessions with something due are changed: a session changed
        // while a view holds it is copied.
        for c in queues {
            if let Some(s) = self.sessions.get_mut(&c) {
                s.expire_queue(now);
            }
        }
        while let Some((at, _)) = self.retained_expiry.first() {
            if *at > now {
                break;
            }
            if let Some((_, topic)) = self.retained_expiry.pop_first() {
                self.retained.remove(&topic);
            }
        }
    }

    fn set_retained(&mut self, r: Retained) {
        self.remove_retained(&r.message.topic);
        if r.message.expires_at_ms != 0 {
            self.retained_expiry.insert((r.message.expires_at_ms, r.message.topic.clone()));
        }
        self.retained.insert(r.message.topic.clone(), r);
    }

    fn remove_retained(&mut self, topic: &str) {
        if let Some(old) = self.retained.remove(topic) {
            if old.message.expires_at_ms != 0 {
                self.retained_expiry.remove(&(old.message.expires_at_ms, old.message.topic.clone()));
            }
        }
    }

    pub fn session(&self, client_id: &str) -> Option<&Session> {
        self.sessions.get(client_id)
    }

    /// Sessions in client id order.
    pub fn sessions(&self) -> impl Iterator<Item = (&str, &Session)> {
        self.sessions.iter()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Persistent non-shared subscriptions (the matching tree's size).
    pub fn subscription_count(&self) -> usize {
        self.tree.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// The retained message of exactly `topic`, if any.
    pub fn retained(&self, topic: &str) -> Option<&pb::Message> {
        self.retained.get(topic).map(|r| &*r.message)
    }

    /// Retained messages matching a subscription filter, not expired at
    /// `now_ms`, in topic order. A shared filter gets none (MQTT 5 4.8.2).
    pub fn retained_matching(&self, filter: &str, now_ms: u64) -> Vec<&pb::Message> {
        retained_matching(&self.retained, filter, now_ms).into_iter().map(|r| &*r.message).collect()
    }

    /// The canonical snapshot: sessions by client id, retained by topic.
    /// O(state): under a lock, take [`State::capture`] and convert after.
    pub fn snapshot(&self) -> pb::Snapshot {
        self.capture().to_pb()
    }

    /// Protobuf encoding of [`State::snapshot`]. O(state), like it.
    pub fn snapshot_bytes(&self) -> Vec<u8> {
        self.capture().encode_to_vec()
    }

    /// Restores a State; the snapshot is validated, not trusted.
    pub fn from_snapshot(s: pb::Snapshot, limits: Limits) -> Result<State, StateError> {
        snapshot::restore(s, limits)
    }

    /// Decodes and restores.
    pub fn from_snapshot_bytes(bytes: &[u8], limits: Limits) -> Result<State, StateError> {
        snapshot::restore(pb::Snapshot::decode(bytes)?, limits)
    }

    /// SHA-256 of [`State::snapshot_bytes`]: equal on replicas that applied the same log.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.snapshot_bytes()).into()
    }
}

/// Retained entries matching `filter`, live at `now_ms`, in topic order.
fn retained_matching<'a>(retained: &'a RetainedMap, filter: &str, now_ms: u64) -> Vec<&'a Retained> {
    if filter.starts_with(topic::SHARED_PREFIX) {
        return Vec::new();
    }
    let live = |r: &&Retained| !message_expired(&r.message, now_ms);
    if !filter.contains(['+', '#']) {
        return retained.get(filter).filter(live).into_iter().collect();
    }
    // Only topics starting with the filter's literal levels can match.
    let wild = filter.split('/').position(|l| l == "+" || l == "#").unwrap_or(0);
    let prefix_len: usize = filter.split('/').take(wild).map(|l| l.len() + 1).sum();
    // "a/#" also matches "a": compare without the trailing '/'.
    let prefix = &filter[..prefix_len.saturating_sub(1)];
    let from: (std::ops::Bound<&str>, std::ops::Bound<&str>) =
        (std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded);
    retained
        .range::<_, str>(from)
        .take_while(|(t, _)| t.starts_with(prefix))
        .filter(|(t, r)| live(r) && topic::matches(filter, t))
        .map(|(_, r)| r)
        .collect()
}

/// Gives one session its copy of `m`: QoS 1/2 into the window while it has
/// room and nothing waits before it, else into the queue; QoS 0 only queued
/// for offline sessions when `queue_qos0_offline` (online ones get it on the
/// broker's fast path).
#[allow(clippy::too_many_arguments)]
fn deliver(
    s: &mut Session,
    limits: &Limits,
    m: &Arc<pb::Message>,
    msg_qos: u8,
    sub_qos: u8,
    retain_as_published: bool,
    mut ids: Vec<u32>,
    out: &mut Applied,
) {
    let qos = msg_qos.min(sub_qos);
    if qos == 0 && (s.online || !limits.queue_qos0_offline) {
        return;
    }
    ids.sort_unstable();
    ids.dedup();
    let d =
        Delivery { message: m.clone(), qos, retain: m.retain && retain_as_published, subscription_ids: ids };
    if qos > 0 && s.queued_qos12 == 0 && s.inflight_len() < s.window(limits.max_inflight) {
        match s.push_inflight(d) {
            Ok(_) => {
                if s.online {
                    out.events.push(Event::Deliver { client_id: s.client_id.clone() });
                }
                return;
            }
            Err(d) => {
                s.enqueue(d, limits.max_queued_messages, limits.max_queued_bytes);
                return;
            }
        }
    }
    s.enqueue(d, limits.max_queued_messages, limits.max_queued_bytes);
}
