//! One persistent session inside [`super::State`]: subscriptions, the outgoing
//! in-flight window with its packet ids, the queue behind it, incoming QoS 2
//! ids and the will. The broker reads it (`&Session`); only `State` changes it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::pb;

/// Largest packet id; ids run 1..=65535 and wrap.
const MAX_PACKET_ID: u16 = u16::MAX;

/// One copy of a message for one session.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Shared by every session the message was delivered to.
    pub message: Arc<pb::Message>,
    /// Effective QoS: min(publication QoS, subscription QoS).
    pub qos: u8,
    /// RETAIN flag to send (Retain As Published).
    pub retain: bool,
    /// Every matching subscription identifier, ascending.
    pub subscription_ids: Vec<u32>,
}

impl Delivery {
    /// Bytes the delivery counts against `max_queued_bytes`: topic + payload.
    pub fn size(&self) -> usize {
        self.message.topic.len() + self.message.payload.len()
    }

    pub(crate) fn is_expired(&self, now_ms: u64) -> bool {
        message_expired(&self.message, now_ms)
    }

    pub(crate) fn to_pb(&self) -> pb::Delivery {
        pb::Delivery {
            message: Some((*self.message).clone()),
            qos: u32::from(self.qos),
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
        }
    }
}

pub(crate) fn message_expired(m: &pb::Message, now_ms: u64) -> bool {
    m.expires_at_ms != 0 && m.expires_at_ms <= now_ms
}

/// An outgoing QoS 1/2 message with its packet id.
#[derive(Debug, Clone, PartialEq)]
pub struct InflightEntry {
    pub packet_id: u16,
    pub delivery: Delivery,
    /// PUBREC received: the connection (re)sends PUBREL, not the PUBLISH.
    pub awaiting_pubcomp: bool,
}

/// Subscription options as kept in the matching tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 = none.
    pub subscription_id: u32,
}

impl SubOptions {
    pub(crate) fn from_pb(s: &pb::Subscription) -> SubOptions {
        SubOptions {
            // Validated to be <= 2 before it gets here.
            qos: s.qos.min(2) as u8,
            no_local: s.no_local,
            retain_as_published: s.retain_as_published,
            subscription_id: s.subscription_id,
        }
    }
}

/// A persistent session. Read access for the broker; changed only by `State`.
#[derive(Debug, Clone)]
pub struct Session {
    pub(crate) client_id: String,
    pub(crate) protocol_version: u32,
    pub(crate) session_expiry_s: u32,
    pub(crate) receive_maximum: u16,
    pub(crate) online: bool,
    pub(crate) disconnected_at_ms: u64,
    pub(crate) connection_id: u64,
    pub(crate) created_at_ms: u64,
    /// Filter as given (with `$share/` prefix for shared ones) -> options.
    pub(crate) subscriptions: BTreeMap<String, pb::Subscription>,
    /// Window, in the order entries entered it (sequence number -> entry), so a
    /// resume resends in the original order even after packet ids wrapped.
    pub(crate) inflight: BTreeMap<u64, InflightEntry>,
    /// packet id -> sequence number in `inflight`.
    pub(crate) inflight_ids: BTreeMap<u16, u64>,
    pub(crate) next_seq: u64,
    pub(crate) queue: VecDeque<Delivery>,
    pub(crate) queued_bytes: usize,
    /// QoS 1/2 entries in `queue` (QoS 0 ones wait for the next SessionOpen).
    pub(crate) queued_qos12: usize,
    /// Lower bound of the queue's expiry times (0 = nothing expires), so a
    /// Tick skips queues with nothing due without scanning them.
    pub(crate) queue_min_expiry: u64,
    pub(crate) incoming_qos2: BTreeSet<u16>,
    pub(crate) will: Option<pb::Will>,
    pub(crate) will_due_at_ms: u64,
    pub(crate) next_packet_id: u16,
    pub(crate) dropped: u64,
    pub(crate) expired: u64,
}

impl Session {
    pub(crate) fn new(client_id: &str, now_ms: u64) -> Session {
        Session {
            client_id: client_id.to_string(),
            protocol_version: 0,
            session_expiry_s: 0,
            receive_maximum: MAX_PACKET_ID,
            online: false,
            disconnected_at_ms: 0,
            connection_id: 0,
            created_at_ms: now_ms,
            subscriptions: BTreeMap::new(),
            inflight: BTreeMap::new(),
            inflight_ids: BTreeMap::new(),
            next_seq: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            queued_qos12: 0,
            queue_min_expiry: 0,
            incoming_qos2: BTreeSet::new(),
            will: None,
            will_due_at_ms: 0,
            next_packet_id: 1,
            dropped: 0,
            expired: 0,
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// 4 = MQTT 3.1.1, 5 = MQTT 5.0.
    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// Seconds; `u32::MAX` = never expires.
    pub fn session_expiry_s(&self) -> u32 {
        self.session_expiry_s
    }

    pub fn receive_maximum(&self) -> u16 {
        self.receive_maximum
    }

    /// Whether a connection holds the session.
    pub fn online(&self) -> bool {
        self.online
    }

    pub fn disconnected_at_ms(&self) -> u64 {
        self.disconnected_at_ms
    }

    pub fn connection_id(&self) -> u64 {
        self.connection_id
    }

    /// In-flight entries in the order they entered the window (the resend order).
    pub fn inflight(&self) -> impl Iterator<Item = &InflightEntry> {
        self.inflight.values()
    }

    /// In-flight entries that entered the window after the one numbered
    /// `after` (None = all), with their sequence numbers, in order. Lets a
    /// connection send only what is new since its last wake-up. Sequence
    /// numbers grow within one State; a State restored from a snapshot
    /// numbers its entries afresh.
    pub fn inflight_after(&self, after: Option<u64>) -> impl Iterator<Item = (u64, &InflightEntry)> {
        use std::ops::Bound;
        let from = match after {
            Some(seq) => Bound::Excluded(seq),
            None => Bound::Unbounded,
        };
        self.inflight.range((from, Bound::Unbounded)).map(|(&seq, e)| (seq, e))
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    pub fn inflight_get(&self, packet_id: u16) -> Option<&InflightEntry> {
        self.inflight_ids.get(&packet_id).and_then(|seq| self.inflight.get(seq))
    }

    /// Messages waiting behind the window (and QoS 0 ones kept while offline).
    pub fn queue(&self) -> impl Iterator<Item = &Delivery> {
        self.queue.iter()
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Subscriptions by filter (shared ones with their `$share/GROUP/` prefix).
    pub fn subscriptions(&self) -> impl Iterator<Item = &pb::Subscription> {
        self.subscriptions.values()
    }

    pub fn subscription(&self, filter: &str) -> Option<&pb::Subscription> {
        self.subscriptions.get(filter)
    }

    /// Incoming QoS 2 packet ids not yet released (PUBREL), ascending.
    pub fn incoming_qos2(&self) -> impl Iterator<Item = u16> + '_ {
        self.incoming_qos2.iter().copied()
    }

    pub fn has_incoming_qos2(&self, packet_id: u16) -> bool {
        self.incoming_qos2.contains(&packet_id)
    }

    pub fn will(&self) -> Option<&pb::Will> {
        self.will.as_ref()
    }

    /// When the pending will is published; None when no will is pending.
    pub fn will_due_at_ms(&self) -> Option<u64> {
        (self.will_due_at_ms != 0).then_some(self.will_due_at_ms)
    }

    /// Messages dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Queued messages dropped because they expired.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// When the session expires if it stays offline; None if online or never.
    pub fn expires_at_ms(&self) -> Option<u64> {
        if self.online || self.session_expiry_s == u32::MAX {
            return None;
        }
        Some(self.disconnected_at_ms.saturating_add(u64::from(self.session_expiry_s) * 1000))
    }

    /// Size of the in-flight window: the client's Receive Maximum capped by the
    /// server's limit (0 = no server cap).
    pub(crate) fn window(&self, max_inflight: u16) -> usize {
        let cap = if max_inflight == 0 { MAX_PACKET_ID } else { max_inflight };
        usize::from(self.receive_maximum.min(cap).max(1))
    }

    /// Next free packet id: 1..=65535, wrapping, skipping ids in flight.
    fn assign_packet_id(&mut self) -> Option<u16> {
        for _ in 0..MAX_PACKET_ID {
            let id = self.next_packet_id.max(1);
            self.next_packet_id = id.checked_add(1).unwrap_or(1);
            if !self.inflight_ids.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Puts `d` into the window with a new packet id. Gives `d` back when every
    /// id is taken (impossible while the window is at most 65535).
    pub(crate) fn push_inflight(&mut self, d: Delivery) -> Result<u16, Delivery> {
        let Some(packet_id) = self.assign_packet_id() else {
            return Err(d);
        };
        self.insert_inflight(InflightEntry { packet_id, delivery: d, awaiting_pubcomp: false });
        Ok(packet_id)
    }

    pub(crate) fn insert_inflight(&mut self, e: InflightEntry) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight_ids.insert(e.packet_id, seq);
        self.inflight.insert(seq, e);
    }

    pub(crate) fn remove_inflight(&mut self, packet_id: u16) -> Option<InflightEntry> {
        let seq = self.inflight_ids.remove(&packet_id)?;
        self.inflight.remove(&seq)
    }

    pub(crate) fn inflight_get_mut(&mut self, packet_id: u16) -> Option<&mut InflightEntry> {
        let seq = self.inflight_ids.get(&packet_id)?;
        self.inflight.get_mut(seq)
    }

    /// Appends to the queue unless a limit is reached ("drop newest, count it";
    /// 0 = no limit). Returns whether it was queued.
    pub(crate) fn enqueue(&mut self, d: Delivery, max_messages: usize, max_bytes: usize) -> bool {
        let size = d.size();
        if (max_messages != 0 && self.queue.len() >= max_messages)
            || (max_bytes != 0 && self.queued_bytes.saturating_add(size) > max_bytes)
        {
            self.dropped += 1;
            return false;
        }
        self.push_queue(d);
        true
    }

    /// Appends without checking limits (restore from a snapshot).
    pub(crate) fn push_queue(&mut self, d: Delivery) {
        self.queued_bytes += d.size();
        let e = d.message.expires_at_ms;
        if e != 0 && (self.queue_min_expiry == 0 || e < self.queue_min_expiry) {
            self.queue_min_expiry = e;
        }
        if d.qos > 0 {
            self.queued_qos12 += 1;
        }
        self.queue.push_back(d);
    }

    fn take_queue_at(&mut self, i: usize) -> Option<Delivery> {
        let d = self.queue.remove(i)?;
        self.queued_bytes -= d.size();
        if d.qos > 0 {
            self.queued_qos12 -= 1;
        }
        Some(d)
    }

    /// Moves queued QoS 1/2 messages into the window while it has room,
    /// dropping expired ones. QoS 0 entries stay (they go out at the next
    /// SessionOpen). Returns whether anything entered the window.
    pub(crate) fn fill_window(&mut self, window: usize, now_ms: u64) -> bool {
        let mut added = false;
        let mut i = 0;
        while self.inflight.len() < window && self.queued_qos12 > 0 && i < self.queue.len() {
            if self.queue[i].qos == 0 {
                i += 1;
                continue;
            }
            let Some(d) = self.take_queue_at(i) else { break };
            if d.is_expired(now_ms) {
                self.expired += 1;
                continue;
            }
            if let Err(d) = self.push_inflight(d) {
                // No free packet id: put it back and stop.
                self.queued_bytes += d.size();
                self.queued_qos12 += 1;
                self.queue.insert(i, d);
                break;
            }
            added = true;
        }
        added
    }

    /// Removes and returns the queued QoS 0 messages, in order.
    pub(crate) fn take_qos0(&mut self, now_ms: u64) -> Vec<Delivery> {
        if self.queue.len() == self.queued_qos12 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queued_qos12);
        for d in self.queue.drain(..) {
            if d.qos > 0 {
                kept.push_back(d);
            } else {
                self.queued_bytes -= d.size();
                if message_expired(&d.message, now_ms) {
                    self.expired += 1;
                } else {
                    out.push(d);
                }
            }
        }
        self.queue = kept;
        out
    }

    /// Whether [`Session::expire_queue`] has something to drop at `now_ms`.
    pub(crate) fn queue_expiry_due(&self, now_ms: u64) -> bool {
        self.queue_min_expiry != 0 && self.queue_min_expiry <= now_ms
    }

    /// Drops expired messages from the queue.
    pub(crate) fn expire_queue(&mut self, now_ms: u64) {
        if !self.queue_expiry_due(now_ms) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut min = 0;
        for d in self.queue.drain(..) {
            if d.is_expired(now_ms) {
                self.queued_bytes -= d.size();
                if d.qos > 0 {
                    self.queued_qos12 -= 1;
                }
                self.expired += 1;
            } else {
                let e = d.message.expires_at_ms;
                if e != 0 && (min == 0 || e < min) {
                    min = e;
                }
                kept.push_back(d);
            }
        }
        self.queue = kept;
        self.queue_min_expiry = min;
    }

    pub(crate) fn to_pb(&self) -> pb::SessionState {
        pb::SessionState {
            client_id: self.client_id.clone(),
            protocol_version: self.protocol_version,
            session_expiry_s: self.session_expiry_s,
            receive_maximum: u32::from(self.receive_maximum),
            online: self.online,
            disconnected_at_ms: self.disconnected_at_ms,
            connection_id: self.connection_id,
            subscriptions: self.subscriptions.values().cloned().collect(),
            inflight: self
                .inflight
                .values()
                .map(|e| pb::InflightEntry {
                    packet_id: u32::from(e.packet_id),
                    delivery: Some(e.delivery.to_pb()),
                    awaiting_pubcomp: e.awaiting_pubcomp,
                })
                .collect(),
            queue: self.queue.iter().map(Delivery::to_pb).collect(),
            incoming_qos2: self.incoming_qos2.iter().map(|&id| u32::from(id)).collect(),
            will: self.will.clone(),
            will_due_at_ms: self.will_due_at_ms,
            next_packet_id: u32::from(self.next_packet_id),
            dropped: self.dropped,
            expired: self.expired,
            created_at_ms: self.created_at_ms,
        }
    }
}
