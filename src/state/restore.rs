//! Backup and restore inside the state machine: the cluster-wide job lock
//! (one backup or restore at a time) and the restore commands, applied like
//! every other command so every replica ends in the same state. The backup
//! file itself is `crate::backup`'s business; this file only knows records.
//!
//! Rules (DESIGN.md "Backup and restore"):
//! - `RestoreBegin` in replace mode empties the state (sessions end without
//!   their wills, retained messages go); cluster settings are set by
//!   `RestoreEnd`. A fresh cluster restored with replace holds exactly the
//!   backed-up state: [`State::content_digest`] equal.
//! - Merge: a session that exists is kept (not overwritten), it only gains
//!   the subscriptions it lacks and the backed-up queued and in-flight
//!   messages appended to its queue without their packet ids (limits apply;
//!   in-flight QoS 2 messages already PUBREC'd are skipped: the client has
//!   them); a session that does not exist is added as it was. A retained
//!   message on a topic that has one: the newer `set_at_ms` wins (the
//!   existing one on a tie). Cluster settings are kept.
//! - A restored session that was online in the backup is offline here (no
//!   connection exists), disconnected now, without its will.
//! - Replace is refused (deterministically) while a persistent session is
//!   connected: its client would be left on a session that no longer exists.
//! - Every restore command names its job and fails unless that job holds the
//!   lock, so a restore whose lock lapsed cannot interleave with another.

use std::sync::Arc;

use prost::Message as _;
use sha2::{Digest, Sha256};

use super::session::message_expired;
use super::{pb, snapshot, Applied, Event, Retained, State, StateError};
use crate::topic;

/// Field numbers of `pb::Snapshot` the digest and the exporter look at.
pub const SNAPSHOT_FIELD_NOW: u32 = 2;
pub const SNAPSHOT_FIELD_SESSIONS: u32 = 3;
pub const SNAPSHOT_FIELD_RETAINED: u32 = 4;
pub const SNAPSHOT_FIELD_CLUSTER: u32 = 10;
pub const SNAPSHOT_FIELD_DYNSEC: u32 = 11;

/// Calls `f(field number, whole field bytes (key included), payload)` for
/// each top-level field of an encoded message, in order, without decoding
/// the payloads: how a snapshot of a million records is streamed.
/// Length-delimited and varint fields only (all a Snapshot has).
pub fn for_each_field<'a>(
    bytes: &'a [u8],
    mut f: impl FnMut(u32, &'a [u8], &'a [u8]) -> Result<(), StateError>,
) -> Result<(), StateError> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut rest: &'a [u8] = bytes;
    while !rest.is_empty() {
        let start = rest;
        let (tag, wire) = decode_key(&mut rest)?;
        let payload: &'a [u8] = match wire {
            WireType::Varint => {
                let before = rest;
                decode_varint(&mut rest)?;
                &before[..before.len() - rest.len()]
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut rest)?;
                let len = usize::try_from(len).ok().filter(|l| *l <= rest.len()).ok_or_else(|| {
                    StateError::InvalidSnapshot(format!("field {tag}: length {len} past the end"))
                })?;
                let (p, r) = rest.split_at(len);
                rest = r;
                p
            }
            other => return Err(StateError::InvalidSnapshot(format!("field {tag}: wire type {other:?}"))),
        };
        let whole = &start[..start.len() - rest.len()];
        f(tag, whole, payload)?;
    }
    Ok(())
}

/// SHA-256 of a snapshot's content: the encoding without the clock
/// (`now_ms`) and without the running job (`cluster.job`). Equal on a backed-up
/// cluster and a fresh one restored from it with replace.
pub fn content_digest_of_snapshot(bytes: &[u8]) -> Result<[u8; 32], StateError> {
    let mut h = Sha256::new();
    for_each_field(bytes, |tag, whole, payload| {
        match tag {
            SNAPSHOT_FIELD_NOW => {}
            SNAPSHOT_FIELD_CLUSTER => {
                let mut c = pb::ClusterSettings::decode(payload)?;
                c.job = None;
                let mut buf = Vec::new();
                prost::encoding::message::encode(SNAPSHOT_FIELD_CLUSTER, &c, &mut buf);
                h.update(&buf);
            }
            _ => h.update(whole),
        }
        Ok(())
    })?;
    Ok(h.finalize().into())
}

impl State {
    /// The backup's dynamic-security state: replace sets it as it was (or
    /// leaves none); merge keeps existing entries and adds the others.
    fn restore_dynsec(&mut self, c: &pb::RestoreEnd) -> Result<(), StateError> {
        let replace = c.mode == pb::RestoreMode::Replace as i32;
        if c.dynsec.is_empty() {
            if replace {
                self.dynsec.store(None);
            }
            return Ok(());
        }
        let p = crate::dynsec::pb::DynsecState::decode(&c.dynsec[..])?;
        let backed_up =
            crate::dynsec::Dynsec::from_proto(&p).map_err(|e| StateError::InvalidDynsec(e.to_string()))?;
        let next = match (replace, self.dynsec.load_full()) {
            (false, Some(current)) => {
                let mut merged = (*current).clone();
                merged.merge_keep_existing(&backed_up);
                merged
            }
            _ => backed_up,
        };
        self.dynsec.store(Some(Arc::new(next)));
        Ok(())
    }

    /// See [`content_digest_of_snapshot`].
    pub fn content_digest(&self) -> [u8; 32] {
        // The canonical snapshot always decodes.
        content_digest_of_snapshot(&self.snapshot_bytes()).unwrap_or_default()
    }

    /// The backup or restore holding the cluster-wide lock, if any (it may
    /// have lapsed: compare `expires_at_ms` with [`State::now_ms`]).
    pub fn cluster_job(&self) -> Option<&pb::ClusterJob> {
        self.cluster.job.as_ref()
    }

    pub(super) fn apply_backup_command(
        &mut self,
        cmd: &pb::command::Cmd,
        out: &mut Applied,
    ) -> Result<(), StateError> {
        use pb::command::Cmd;
        match cmd {
            Cmd::JobLock(c) => self.job_lock(c),
            Cmd::JobRelease(c) => {
                if self.cluster.job.as_ref().is_some_and(|j| j.id == c.id) {
                    self.cluster.job = None;
                }
                Ok(())
            }
            Cmd::RestoreBegin(c) => {
                self.check_holder(&c.id)?;
                if c.mode == pb::RestoreMode::Replace as i32 {
                    let online = self.sessions.values().filter(|s| s.online).count();
                    if online > 0 {
                        return Err(StateError::Busy(format!(
                            "replace needs a cluster without connected persistent sessions; {online} connected"
                        )));
                    }
                    self.clear_for_replace(out);
                }
                Ok(())
            }
            Cmd::RestoreChunk(c) => {
                self.check_holder(&c.id)?;
                self.restore_chunk(c, out)
            }
            Cmd::RestoreEnd(c) => {
                self.check_holder(&c.id)?;
                if c.mode == pb::RestoreMode::Replace as i32 {
                    if let Some(cs) = &c.cluster {
                        if cs.pinned_leader == Some(0) {
                            return Err(StateError::InvalidNodeId(0));
                        }
                        if pb::Mode::try_from(cs.mode).is_err() {
                            return Err(StateError::InvalidSnapshot(format!("mode {}", cs.mode)));
                        }
                        self.cluster.pinned_leader = cs.pinned_leader;
                        self.cluster.mode = cs.mode;
                    }
                }
                self.restore_dynsec(c)
            }
            _ => Err(StateError::EmptyCommand),
        }
    }

    fn job_lock(&mut self, c: &pb::JobLock) -> Result<(), StateError> {
        let job = c.job.as_ref().ok_or(StateError::MissingField("job"))?;
        if job.id.is_empty() {
            return Err(StateError::MissingField("job.id"));
        }
        if let Some(cur) = &self.cluster.job {
            if cur.id != job.id && cur.expires_at_ms > self.now_ms {
                return Err(StateError::Busy(format!(
                    "{} {} is running on node {}",
                    cur.kind, cur.id, cur.node_id
                )));
            }
        }
        let mut job = job.clone();
        job.expires_at_ms = self.now_ms.saturating_add(c.ttl_ms);
        self.cluster.job = Some(job);
        Ok(())
    }

    fn check_holder(&self, id: &str) -> Result<(), StateError> {
        match &self.cluster.job {
            Some(j) if j.id == id => Ok(()),
            Some(j) => Err(StateError::Busy(format!("{} {} holds the lock, not {id}", j.kind, j.id))),
            None => Err(StateError::Busy(format!("job {id} does not hold the lock"))),
        }
    }

    /// Replace: everything goes (no wills are published), except the lock.
    fn clear_for_replace(&mut self, out: &mut Applied) {
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        for id in ids {
            self.drop_session(&id);
            out.events.push(Event::SessionEnded { client_id: id });
        }
        self.retained.clear();
        self.retained_expiry.clear();
    }

    fn restore_chunk(&mut self, c: &pb::RestoreChunk, out: &mut Applied) -> Result<(), StateError> {
        let merge = c.mode != pb::RestoreMode::Replace as i32;
        // Validate the whole chunk first so a bad one changes nothing.
        let mut sessions = Vec::with_capacity(c.sessions.len());
        for p in &c.sessions {
            sessions.push(snapshot::session(p.clone())?);
        }
        for r in &c.retained {
            super::check_message(r.message.as_ref().ok_or(StateError::MissingField("retained.message"))?)?;
        }
        let now = self.now_ms;
        let mut restored = Vec::new();
        for mut s in sessions {
            let id = s.client_id.clone();
            if merge && self.sessions.contains_key(&id) {
                if self.merge_into_existing(s, out) {
                    restored.push(id);
                }
                continue;
            }
            self.drop_session(&id);
            if s.online {
                // Its connection is not here: offline from now, and its will
                // (meant for that connection's end) is dropped.
                s.online = false;
                s.disconnected_at_ms = now;
                s.will = None;
                s.will_due_at_ms = 0;
            }
            for (filter, sub) in &s.subscriptions {
                if topic::parse_shared(filter).is_none() {
                    self.tree.insert(filter, id.clone(), super::SubOptions::from_pb(sub));
                }
            }
            self.sessions.insert(s);
            restored.push(id);
        }
        for r in &c.retained {
            let Some(m) = &r.message else { continue };
            if message_expired(m, now) {
                continue;
            }
            if merge && self.retained.get(&m.topic).is_some_and(|old| old.set_at_ms >= r.set_at_ms) {
                continue;
            }
            self.set_retained(Retained { message: Arc::new(m.clone()), set_at_ms: r.set_at_ms });
        }
        if !restored.is_empty() {
            out.events.push(Event::SessionsRestored { client_ids: restored });
        }
        Ok(())
    }

    /// Merge rule for a session that exists. Returns whether it gained subscriptions.
    fn merge_into_existing(&mut self, b: super::Session, out: &mut Applied) -> bool {
        let now = self.now_ms;
        let State { sessions, tree, limits, .. } = self;
        let Some(s) = sessions.get_mut(&b.client_id) else { return false };
        let mut gained = false;
        for (filter, sub) in &b.subscriptions {
            if s.subscriptions.contains_key(filter) {
                continue;
            }
            s.subscriptions.insert(filter.clone(), sub.clone());
            if topic::parse_shared(filter).is_none() {
                tree.insert(filter, s.client_id.clone(), super::SubOptions::from_pb(sub));
            }
            gained = true;
        }
        let inflight = b.inflight.into_values().filter(|e| !e.awaiting_pubcomp).map(|e| e.delivery);
        for d in inflight.chain(b.queue) {
            if !d.is_expired(now) {
                s.enqueue(d, limits.max_queued_messages, limits.max_queued_bytes);
            }
        }
        let window = s.window(limits.max_inflight);
        if s.fill_window(window, now) && s.online {
            out.events.push(Event::Deliver { client_id: s.client_id.clone() });
        }
        gained
    }
}
